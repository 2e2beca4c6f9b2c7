//! The cluster as control sees it, whatever the source: namespaces, pods, services and mesh
//! policies, reduced to what the compiler needs. Sources produce `Object`s; `Cluster` holds them.
use std::{collections::BTreeMap, net::IpAddr};

use anyhow::{Context as _, Result, anyhow, bail};
use k8s_openapi::{
    api::core::v1::{Namespace, Pod, Service},
    apimachinery::pkg::util::intstr::IntOrString,
};
use serde_json::Value;

use crate::istio::{self, PolicyObject};

/// Namespace label that enrolls a namespace; the same label `disabled` on a pod opts it out.
pub const MESH_LABEL: &str = "trellis.dev/mesh";

#[derive(Debug, Clone, PartialEq)]
pub struct PodInfo {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    pub node: String,
    pub service_account: String,
    pub ips: Vec<IpAddr>,
    pub labels: BTreeMap<String, String>,
    /// Running (or no phase given, as in hand-written YAML) with an IP, and not being deleted.
    pub ready: bool,
    /// Named container ports, for services whose targetPort is a name.
    pub named_ports: BTreeMap<String, u32>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum TargetPort {
    Number(u32),
    Name(String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct PortInfo {
    pub name: String,
    pub port: u32,
    pub target: TargetPort,
    pub app_protocol: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ServiceInfo {
    pub namespace: String,
    pub name: String,
    /// None: no selector (endpoints managed by hand; not derived).
    pub selector: Option<BTreeMap<String, String>>,
    pub cluster_ips: Vec<IpAddr>,
    pub ports: Vec<PortInfo>,
}

/// One object from a source.
#[derive(Debug, Clone, PartialEq)]
pub enum Object {
    Namespace {
        name: String,
        labels: BTreeMap<String, String>,
    },
    Pod(PodInfo),
    Service(ServiceInfo),
    Policy(PolicyObject),
}

impl Object {
    /// `Kind namespace/name`, for messages.
    pub fn describe(&self) -> String {
        match self {
            Object::Namespace { name, .. } => format!("Namespace {name}"),
            Object::Pod(p) => format!("Pod {}/{}", p.namespace, p.name),
            Object::Service(s) => format!("Service {}/{}", s.namespace, s.name),
            Object::Policy(p) => format!("{} {}/{}", p.kind, p.namespace, p.name),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Cluster {
    pub namespaces: BTreeMap<String, BTreeMap<String, String>>,
    /// By UID.
    pub pods: BTreeMap<String, PodInfo>,
    /// By `namespace/name`.
    pub services: BTreeMap<String, ServiceInfo>,
    /// By `kind/namespace/name`.
    pub policies: BTreeMap<String, PolicyObject>,
}

impl Cluster {
    pub fn insert(&mut self, obj: Object) {
        match obj {
            Object::Namespace { name, labels } => {
                self.namespaces.insert(name, labels);
            }
            Object::Pod(p) => {
                self.pods.insert(p.uid.clone(), p);
            }
            Object::Service(s) => {
                self.services
                    .insert(format!("{}/{}", s.namespace, s.name), s);
            }
            Object::Policy(p) => {
                self.policies
                    .insert(format!("{}/{}/{}", p.kind, p.namespace, p.name), p);
            }
        }
    }

    /// Whether a pod is enrolled: its namespace has `trellis.dev/mesh=enabled` and the pod does
    /// not carry `trellis.dev/mesh=disabled`.
    pub fn in_mesh(&self, pod: &PodInfo) -> bool {
        let ns_enabled = self
            .namespaces
            .get(&pod.namespace)
            .and_then(|l| l.get(MESH_LABEL))
            .is_some_and(|v| v == "enabled");
        ns_enabled && pod.labels.get(MESH_LABEL).is_none_or(|v| v != "disabled")
    }
}

/// Parses one Kubernetes object (as JSON), checking it is a kind Trellis reads.
pub fn parse_object(doc: &Value) -> Result<Object> {
    let api_version = doc
        .get("apiVersion")
        .and_then(Value::as_str)
        .context("apiVersion: missing")?;
    let kind = doc
        .get("kind")
        .and_then(Value::as_str)
        .context("kind: missing")?;
    let (group, _version) = api_version.split_once('/').unwrap_or(("", api_version));
    match (group, kind) {
        ("", "Namespace") if api_version == "v1" => namespace(typed(doc)?),
        ("", "Pod") if api_version == "v1" => pod(typed(doc)?),
        ("", "Service") if api_version == "v1" => service(typed(doc)?),
        ("networking.istio.io", _) | ("security.istio.io", _) => policy(api_version, kind, doc),
        _ => bail!(
            "unsupported kind {kind} (apiVersion {api_version}); Trellis reads v1 Namespace, Pod, Service and \
             the Istio kinds {}",
            istio::KINDS.map(|(_, k)| k).join(", ")
        ),
    }
}

fn typed<T: serde::de::DeserializeOwned>(doc: &Value) -> Result<T> {
    serde_path_to_error::deserialize(doc).map_err(|e| anyhow!("{}: {}", e.path(), e.inner()))
}

fn name_of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> Result<String> {
    meta.name
        .clone()
        .filter(|n| !n.is_empty())
        .context("metadata.name: missing")
}

fn namespace(ns: Namespace) -> Result<Object> {
    Ok(Object::Namespace {
        name: name_of(&ns.metadata)?,
        labels: ns.metadata.labels.unwrap_or_default(),
    })
}

fn pod(p: Pod) -> Result<Object> {
    let name = name_of(&p.metadata)?;
    let namespace = p
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    // Hand-written YAML may leave out the UID: derive a stable one from the name.
    let uid = p.metadata.uid.clone().unwrap_or_else(|| {
        uuid::Uuid::new_v5(
            &uuid::Uuid::NAMESPACE_OID,
            format!("trellis/pod/{namespace}/{name}").as_bytes(),
        )
        .to_string()
    });
    let spec = p.spec.unwrap_or_default();
    let status = p.status.unwrap_or_default();
    let mut ips: Vec<IpAddr> = Vec::new();
    let listed = status
        .pod_ips
        .iter()
        .flatten()
        .map(|i| i.ip.clone())
        .chain(status.pod_ip.clone());
    for ip in listed {
        let ip: IpAddr = ip
            .parse()
            .map_err(|_| anyhow!("status.podIP: {ip:?} is not an IP address"))?;
        if !ips.contains(&ip) {
            ips.push(ip);
        }
    }
    let running = status.phase.as_deref().is_none_or(|ph| ph == "Running");
    let named_ports = spec
        .containers
        .iter()
        .flat_map(|c| c.ports.iter().flatten())
        .filter_map(|p| Some((p.name.clone()?, p.container_port as u32)))
        .collect();
    Ok(Object::Pod(PodInfo {
        ready: running && !ips.is_empty() && p.metadata.deletion_timestamp.is_none(),
        uid,
        namespace,
        name,
        node: spec.node_name.clone().unwrap_or_default(),
        service_account: spec
            .service_account_name
            .clone()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "default".into()),
        ips,
        labels: p.metadata.labels.unwrap_or_default(),
        named_ports,
    }))
}

fn service(s: Service) -> Result<Object> {
    let name = name_of(&s.metadata)?;
    let namespace = s
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let spec = s.spec.unwrap_or_default();
    let mut cluster_ips = Vec::new();
    for ip in spec
        .cluster_ips
        .iter()
        .flatten()
        .chain(spec.cluster_ip.iter())
    {
        if ip == "None" || ip.is_empty() {
            continue;
        }
        let ip: IpAddr = ip
            .parse()
            .map_err(|_| anyhow!("spec.clusterIP: {ip:?} is not an IP address"))?;
        if !cluster_ips.contains(&ip) {
            cluster_ips.push(ip);
        }
    }
    let mut ports = Vec::new();
    for (i, p) in spec.ports.iter().flatten().enumerate() {
        let port = u32::try_from(p.port)
            .ok()
            .filter(|p| (1..=65535).contains(p))
            .with_context(|| format!("spec.ports[{i}].port: {} is not a port", p.port))?;
        let target = match &p.target_port {
            None => TargetPort::Number(port),
            Some(IntOrString::Int(n)) => TargetPort::Number(*n as u32),
            Some(IntOrString::String(s)) => TargetPort::Name(s.clone()),
        };
        ports.push(PortInfo {
            name: p.name.clone().unwrap_or_default(),
            port,
            target,
            app_protocol: p.app_protocol.clone(),
        });
    }
    Ok(Object::Service(ServiceInfo {
        namespace,
        name,
        selector: spec.selector.filter(|s| !s.is_empty()),
        cluster_ips,
        ports,
    }))
}

fn policy(api_version: &str, kind: &str, doc: &Value) -> Result<Object> {
    let group = api_version.split('/').next().unwrap_or_default();
    let Some((group, _)) = istio::KINDS.iter().find(|(g, k)| *k == kind && *g == group) else {
        bail!(
            "unsupported kind {kind} in {api_version} (supported: {})",
            istio::KINDS.map(|(_, k)| k).join(", ")
        );
    };
    let versions: &[&str] = if *group == "networking.istio.io" {
        &["v1", "v1beta1", "v1alpha3"]
    } else {
        &["v1", "v1beta1"]
    };
    let version = api_version.split('/').nth(1).unwrap_or_default();
    if !versions.contains(&version) {
        bail!(
            "apiVersion {api_version}: unsupported version (supported: {})",
            versions.join(", ")
        );
    }
    if let Some(extra) = doc.as_object().and_then(|o| {
        o.keys()
            .find(|k| !["apiVersion", "kind", "metadata", "spec", "status"].contains(&k.as_str()))
    }) {
        bail!("{extra}: unknown top-level field");
    }
    let meta: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta =
        serde_json::from_value(doc.get("metadata").cloned().unwrap_or_default())
            .context("metadata")?;
    let name = name_of(&meta)?;
    let (kind, spec) = istio::parse_spec(
        kind,
        doc.get("spec")
            .unwrap_or(&Value::Object(Default::default())),
    )?;
    Ok(Object::Policy(PolicyObject {
        kind,
        namespace: meta.namespace.unwrap_or_else(|| "default".into()),
        name,
        spec,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn err(doc: Value) -> String {
        format!("{:#}", parse_object(&doc).unwrap_err())
    }

    #[test]
    fn pods_take_ips_node_account_and_a_stable_uid() {
        let doc = json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "web", "namespace": "shop", "labels": {"app": "web"}},
            "spec": {"nodeName": "n1", "serviceAccountName": "web-sa",
                     "containers": [{"name": "c", "ports": [{"name": "http", "containerPort": 8080}]}]},
            "status": {"podIP": "10.244.1.10", "podIPs": [{"ip": "10.244.1.10"}, {"ip": "fd00::10"}]}});
        let Object::Pod(p) = parse_object(&doc).unwrap() else {
            panic!()
        };
        assert_eq!(p.node, "n1");
        assert_eq!(p.service_account, "web-sa");
        assert_eq!(p.ips.len(), 2);
        assert!(p.ready);
        assert_eq!(p.named_ports["http"], 8080);
        let Object::Pod(again) = parse_object(&doc).unwrap() else {
            panic!()
        };
        assert_eq!(p.uid, again.uid, "derived UIDs must be stable");
    }

    #[test]
    fn mesh_membership_follows_labels() {
        let mut c = Cluster::default();
        c.insert(Object::Namespace {
            name: "shop".into(),
            labels: [(MESH_LABEL.into(), "enabled".into())].into(),
        });
        let mut p = PodInfo {
            uid: "u".into(),
            namespace: "shop".into(),
            name: "p".into(),
            node: "n".into(),
            service_account: "default".into(),
            ips: vec![],
            labels: Default::default(),
            ready: true,
            named_ports: Default::default(),
        };
        assert!(c.in_mesh(&p));
        p.labels.insert(MESH_LABEL.into(), "disabled".into());
        assert!(!c.in_mesh(&p));
        p.namespace = "other".into();
        p.labels.clear();
        assert!(!c.in_mesh(&p));
    }

    #[test]
    fn wrong_kinds_and_fields_are_named() {
        assert!(
            err(json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x"}}))
                .contains("unsupported kind Deployment")
        );
        assert!(err(json!({"kind": "Pod"})).contains("apiVersion: missing"));
        let e = err(
            json!({"apiVersion": "networking.istio.io/v1", "kind": "VirtualService", "metadata": {"name": "r"},
            "spec": {"hosts": ["reviews"], "http": [{"route": [{"destination": {"host": "reviews"}}], "mirrorPercent": 5}]}}),
        );
        assert!(
            e.contains("spec.http[0]") && e.contains("mirrorPercent"),
            "{e}"
        );
        let e = err(
            json!({"apiVersion": "networking.istio.io/v1", "kind": "VirtualService", "metadata": {"name": "r"},
            "spec": {"hosts": ["reviews"], "http": [{"route": [{"destination": {"host": "a"}, "weight": 80}, {"destination": {"host": "b"}, "weight": 30}]}]}}),
        );
        assert!(
            e.contains("spec.http[0].route: weights add up to 110"),
            "{e}"
        );
        let e = err(
            json!({"apiVersion": "networking.istio.io/v1", "kind": "Sidecar", "metadata": {"name": "s"}, "spec": {}}),
        );
        assert!(e.contains("unsupported kind Sidecar"), "{e}");
        let e = err(
            json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "status": {"podIP": "nope"}}),
        );
        assert!(e.contains("status.podIP"), "{e}");
        let e = err(
            json!({"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication", "metadata": {"name": "p"}, "spec": {"mtls": {"mode": "MAYBE"}}}),
        );
        assert!(e.contains("spec.mtls.mode") && e.contains("STRICT"), "{e}");
    }

    #[test]
    fn istio_yaml_in_older_versions_is_accepted() {
        let doc = json!({"apiVersion": "networking.istio.io/v1alpha3", "kind": "DestinationRule", "metadata": {"name": "reviews", "namespace": "shop"},
            "spec": {"host": "reviews", "subsets": [{"name": "v1", "labels": {"version": "v1"}}],
                     "trafficPolicy": {"loadBalancer": {"simple": "LEAST_REQUEST"}, "outlierDetection": {"consecutive5xxErrors": 3, "interval": "1s", "baseEjectionTime": "30s"}}}});
        let Object::Policy(p) = parse_object(&doc).unwrap() else {
            panic!()
        };
        assert_eq!((p.kind, p.namespace.as_str()), ("DestinationRule", "shop"));
    }
}

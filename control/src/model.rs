//! The cluster as control sees it, whatever the source: namespaces, pods, services and mesh
//! policies, reduced to what the compiler needs. Sources produce `Object`s; `Cluster` holds them.
use std::{collections::BTreeMap, net::IpAddr, sync::Arc};

use anyhow::{Context as _, Result, anyhow, bail};
use k8s_openapi::{
    api::core::v1::{Namespace, Pod, Secret, Service},
    apimachinery::pkg::util::intstr::IntOrString,
};
use serde_json::Value;

use crate::{
    istio::{self, PolicyObject},
    names,
};

/// Namespace label that enrolls a namespace; the same label `disabled` on a pod opts it out.
pub const MESH_LABEL: &str = "trellis.dev/mesh";

/// Namespace label with the namespace's outbound traffic policy, `REGISTRY_ONLY` or `ALLOW_ANY`
/// (Istio's meshConfig.outboundTrafficPolicy); on the root namespace it is the mesh-wide
/// default. Absent everywhere: ALLOW_ANY.
pub const OUTBOUND_LABEL: &str = "trellis.dev/outbound-traffic-policy";
const OUTBOUND_MODES: [&str; 2] = ["REGISTRY_ONLY", "ALLOW_ANY"];

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodInfo {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    /// Istio's workload name ([`workload_name`]).
    pub workload: String,
    pub node: String,
    pub service_account: String,
    pub ips: Vec<IpAddr>,
    pub labels: BTreeMap<String, String>,
    /// Running (or no phase given, as in hand-written YAML) with an IP: in the mesh, even while
    /// being deleted (its containers still run and must stay captured until they stop).
    pub running: bool,
    /// Being deleted (it has a deletion timestamp).
    pub terminating: bool,
    /// Named container ports, for services whose targetPort is a name.
    pub named_ports: BTreeMap<String, u32>,
}

impl PodInfo {
    /// Running and not being deleted: an endpoint of its services.
    pub fn ready(&self) -> bool {
        self.running && !self.terminating
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetPort {
    Number(u32),
    Name(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortInfo {
    pub name: String,
    pub port: u32,
    pub target: TargetPort,
    pub app_protocol: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceInfo {
    pub namespace: String,
    pub name: String,
    /// None: no selector (endpoints managed by hand; not derived).
    pub selector: Option<BTreeMap<String, String>>,
    pub cluster_ips: Vec<IpAddr>,
    pub ports: Vec<PortInfo>,
}

/// A `kubernetes.io/tls` Secret: a certificate chain and its key, in PEM, both checked to parse.
/// Gateways name them in `credentialName`.
#[derive(Clone, PartialEq)]
pub struct TlsSecret {
    pub namespace: String,
    pub name: String,
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for TlsSecret {
    /// Never the key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TlsSecret({}/{})", self.namespace, self.name)
    }
}

/// One object from a source.
#[derive(Debug, Clone, PartialEq)]
pub enum Object {
    Namespace {
        name: String,
        labels: BTreeMap<String, String>,
    },
    /// Shared: the sources rebuild the model from their objects on every change, and a model
    /// compares its pods by pointer first.
    Pod(Arc<PodInfo>),
    Service(Arc<ServiceInfo>),
    Policy(Arc<PolicyObject>),
    Secret(TlsSecret),
}

impl Object {
    /// `Kind namespace/name`, for messages.
    pub fn describe(&self) -> String {
        match self {
            Object::Namespace { name, .. } => format!("Namespace {name}"),
            Object::Pod(p) => format!("Pod {}/{}", p.namespace, p.name),
            Object::Service(s) => format!("Service {}/{}", s.namespace, s.name),
            Object::Policy(p) => format!("{} {}/{}", p.kind, p.namespace, p.name),
            Object::Secret(s) => format!("Secret {}/{}", s.namespace, s.name),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Cluster {
    pub namespaces: BTreeMap<String, BTreeMap<String, String>>,
    /// By UID.
    pub pods: BTreeMap<String, Arc<PodInfo>>,
    /// By `namespace/name`.
    pub services: BTreeMap<String, Arc<ServiceInfo>>,
    /// By `kind/namespace/name`.
    pub policies: BTreeMap<String, Arc<PolicyObject>>,
    /// TLS Secrets, by `namespace/name`.
    pub secrets: BTreeMap<String, TlsSecret>,
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
            Object::Secret(s) => {
                self.secrets
                    .insert(format!("{}/{}", s.namespace, s.name), s);
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

    /// Whether pods in `namespace` may reach only what the mesh knows: the namespace's own
    /// label decides, else the root namespace's, else the mesh-wide default.
    pub fn registry_only(&self, namespace: &str, mesh: &crate::compile::Mesh) -> bool {
        let mode = |ns: &str| {
            self.namespaces
                .get(ns)
                .and_then(|l| l.get(OUTBOUND_LABEL))
                .map(String::as_str)
        };
        match mode(namespace).or(mode(&mesh.root_namespace)) {
            Some(m) => m == "REGISTRY_ONLY",
            None => mesh.registry_only,
        }
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
        ("", "Secret") if api_version == "v1" => secret(typed(doc)?),
        ("networking.istio.io", _) | ("security.istio.io", _) => policy(api_version, kind, doc),
        _ => bail!(
            "unsupported kind {kind} (apiVersion {api_version}); Trellis reads v1 Namespace, Pod, Service, Secret (kubernetes.io/tls) and \
             the Istio kinds {}",
            istio::KINDS.map(|(_, k)| k).join(", ")
        ),
    }
}

fn typed<T: serde::de::DeserializeOwned>(doc: &Value) -> Result<T> {
    serde_path_to_error::deserialize(doc).map_err(|e| anyhow!("{}: {}", e.path(), e.inner()))
}

type Meta = k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

/// The object's name (checked by `rule`, as Kubernetes checks that kind's names), after checking
/// its namespace and labels the same way the API server would.
fn name_of(meta: &Meta, rule: fn(&str) -> Result<(), String>) -> Result<String> {
    let name = meta
        .name
        .clone()
        .filter(|n| !n.is_empty())
        .context("metadata.name: missing")?;
    rule(&name).map_err(|e| anyhow!("metadata.name: {e}"))?;
    if let Some(ns) = &meta.namespace {
        names::dns1123_label(ns).map_err(|e| anyhow!("metadata.namespace: {e}"))?;
    }
    names::labels(
        "metadata.labels",
        meta.labels.as_ref().unwrap_or(&BTreeMap::new()),
    )
    .map_err(|e| anyhow!(e))?;
    Ok(name)
}

fn namespace(ns: Namespace) -> Result<Object> {
    let labels = ns.metadata.labels.clone().unwrap_or_default();
    if let Some(mode) = labels.get(OUTBOUND_LABEL)
        && !OUTBOUND_MODES.contains(&mode.as_str())
    {
        bail!(
            "metadata.labels.{OUTBOUND_LABEL}: {mode:?} is not supported (supported: {})",
            OUTBOUND_MODES.join(", ")
        );
    }
    Ok(Object::Namespace {
        name: name_of(&ns.metadata, names::dns1123_label)?,
        labels,
    })
}

/// Only `kubernetes.io/tls` Secrets are read (kube mode watches only those); both halves must
/// parse, so a gateway never gets a certificate it cannot serve.
fn secret(s: Secret) -> Result<Object> {
    use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};
    let name = name_of(&s.metadata, names::dns1123_subdomain)?;
    let ty = s.type_.as_deref().unwrap_or("Opaque");
    if ty != "kubernetes.io/tls" {
        bail!("type: {ty:?} is not supported (Trellis reads only kubernetes.io/tls Secrets)");
    }
    let field = |key: &str| -> Result<String> {
        let bytes = s
            .data
            .as_ref()
            .and_then(|d| d.get(key))
            .map(|b| b.0.clone())
            .or_else(|| {
                s.string_data
                    .as_ref()
                    .and_then(|d| d.get(key))
                    .map(|v| v.clone().into_bytes())
            })
            .with_context(|| format!("data.{key}: missing"))?;
        String::from_utf8(bytes).map_err(|_| anyhow!("data.{key}: not PEM text"))
    };
    let (cert_pem, key_pem) = (field("tls.crt")?, field("tls.key")?);
    let certs = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow!("data.tls.crt: {e}"))?;
    if certs.is_empty() {
        bail!("data.tls.crt: no PEM certificate in it");
    }
    PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| anyhow!("data.tls.key: no usable PEM private key: {e}"))?;
    Ok(Object::Secret(TlsSecret {
        namespace: s.metadata.namespace.unwrap_or_else(|| "default".into()),
        name,
        cert_pem,
        key_pem,
    }))
}

/// The workload a pod belongs to, as Istio names it for metrics: its controller's name, with a
/// ReplicaSet's pod-template hash taken off (the Deployment) and a Job's schedule suffix taken
/// off (the CronJob); the pod's own name when no controller owns it.
fn workload_name(meta: &Meta, pod_name: &str) -> String {
    let Some(owner) = meta
        .owner_references
        .iter()
        .flatten()
        .find(|o| o.controller == Some(true))
    else {
        return pod_name.to_owned();
    };
    let hash = meta
        .labels
        .as_ref()
        .and_then(|l| l.get("pod-template-hash"));
    match owner.kind.as_str() {
        "ReplicaSet" => match hash.and_then(|h| owner.name.strip_suffix(h.as_str())) {
            Some(deployment) => deployment
                .strip_suffix('-')
                .unwrap_or(deployment)
                .to_owned(),
            None => owner.name.clone(),
        },
        // A CronJob's Jobs are named NAME-<minutes since the epoch>.
        "Job" => match owner.name.rsplit_once('-') {
            Some((cron, at))
                if (8..=10).contains(&at.len()) && at.bytes().all(|b| b.is_ascii_digit()) =>
            {
                cron.to_owned()
            }
            _ => owner.name.clone(),
        },
        _ => owner.name.clone(),
    }
}

fn pod(p: Pod) -> Result<Object> {
    let name = name_of(&p.metadata, names::dns1123_subdomain)?;
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
    for (at, v) in [
        ("spec.nodeName", &spec.node_name),
        ("spec.serviceAccountName", &spec.service_account_name),
    ] {
        if let Some(v) = v.as_deref().filter(|v| !v.is_empty()) {
            names::dns1123_subdomain(v).map_err(|e| anyhow!("{at}: {e}"))?;
        }
    }
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
    let mut named_ports = BTreeMap::new();
    for (i, c) in spec.containers.iter().enumerate() {
        for (j, p) in c.ports.iter().flatten().enumerate() {
            let at = format!("spec.containers[{i}].ports[{j}].containerPort");
            let port = port_number(&at, p.container_port)?;
            if let Some(name) = &p.name {
                named_ports.insert(name.clone(), port);
            }
        }
    }
    let running = running && !ips.is_empty();
    let workload = workload_name(&p.metadata, &name);
    Ok(Object::Pod(Arc::new(PodInfo {
        running,
        terminating: p.metadata.deletion_timestamp.is_some(),
        uid,
        namespace,
        name,
        workload,
        node: spec.node_name.clone().unwrap_or_default(),
        service_account: spec
            .service_account_name
            .clone()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "default".into()),
        ips,
        labels: p.metadata.labels.unwrap_or_default(),
        named_ports,
    })))
}

/// A port number as Kubernetes allows it: 1 to 65535.
fn port_number(at: &str, n: i32) -> Result<u32> {
    u32::try_from(n)
        .ok()
        .filter(|p| (1..=65535).contains(p))
        .with_context(|| format!("{at}: {n} is not a port (1 to 65535)"))
}

fn service(s: Service) -> Result<Object> {
    let name = name_of(&s.metadata, names::dns1035_label)?;
    let namespace = s
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let spec = s.spec.unwrap_or_default();
    if let Some(sel) = &spec.selector {
        names::labels("spec.selector", sel).map_err(|e| anyhow!(e))?;
    }
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
        let port = port_number(&format!("spec.ports[{i}].port"), p.port)?;
        let target = match &p.target_port {
            None => TargetPort::Number(port),
            Some(IntOrString::Int(n)) => {
                TargetPort::Number(port_number(&format!("spec.ports[{i}].targetPort"), *n)?)
            }
            Some(IntOrString::String(s)) => TargetPort::Name(s.clone()),
        };
        ports.push(PortInfo {
            name: p.name.clone().unwrap_or_default(),
            port,
            target,
            app_protocol: p.app_protocol.clone(),
        });
    }
    Ok(Object::Service(Arc::new(ServiceInfo {
        namespace,
        name,
        selector: spec.selector.filter(|s| !s.is_empty()),
        cluster_ips,
        ports,
    })))
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
    let meta: Meta = serde_json::from_value(doc.get("metadata").cloned().unwrap_or_default())
        .context("metadata")?;
    let name = name_of(&meta, names::dns1123_subdomain)?;
    let (kind, spec) = istio::parse_spec(
        kind,
        doc.get("spec")
            .unwrap_or(&Value::Object(Default::default())),
    )?;
    Ok(Object::Policy(Arc::new(PolicyObject {
        kind,
        namespace: meta.namespace.unwrap_or_else(|| "default".into()),
        name,
        spec,
    })))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn err(doc: Value) -> String {
        format!("{:#}", parse_object(&doc).unwrap_err())
    }

    #[test]
    fn outbound_traffic_policy_comes_from_the_namespace_then_the_root() {
        let ns = |name: &str, mode: Option<&str>| {
            let labels = mode.map_or(json!({}), |m| json!({OUTBOUND_LABEL: m}));
            parse_object(&json!({"apiVersion": "v1", "kind": "Namespace",
                "metadata": {"name": name, "labels": labels}}))
            .unwrap()
        };
        let mut c = Cluster::default();
        c.insert(ns("shop", Some("REGISTRY_ONLY")));
        c.insert(ns("open", Some("ALLOW_ANY")));
        c.insert(ns("plain", None));
        let mesh = crate::compile::Mesh::new("td");
        let ro = |c: &Cluster, ns: &str| c.registry_only(ns, &mesh);
        assert!(ro(&c, "shop"));
        assert!(!ro(&c, "open") && !ro(&c, "plain"));
        c.insert(ns("trellis-system", Some("REGISTRY_ONLY")));
        assert!(ro(&c, "plain") && !ro(&c, "open"));
        let e = err(json!({"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": "x", "labels": {OUTBOUND_LABEL: "registry_only"}}}));
        assert!(
            e.contains("metadata.labels.trellis.dev/outbound-traffic-policy: \"registry_only\" is not supported"),
            "{e}"
        );
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
        assert!(p.ready());
        assert_eq!(p.named_ports["http"], 8080);
        let Object::Pod(again) = parse_object(&doc).unwrap() else {
            panic!()
        };
        assert_eq!(p.uid, again.uid, "derived UIDs must be stable");
    }

    #[test]
    fn pods_are_named_by_their_workload_as_istio_names_it() {
        let workload = |name: &str, hash: Option<&str>, owner: Option<(&str, &str)>| {
            let labels = hash.map_or(json!({}), |h| json!({"pod-template-hash": h}));
            let owners = owner.map_or(json!([]), |(kind, name)| {
                json!([{"apiVersion": "apps/v1", "kind": kind, "name": name, "uid": "u", "controller": true}])
            });
            let doc = json!({"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name, "namespace": "shop", "labels": labels, "ownerReferences": owners}});
            let Object::Pod(p) = parse_object(&doc).unwrap() else {
                panic!()
            };
            p.workload.clone()
        };
        let web = Some(("ReplicaSet", "web-7967496c8b"));
        assert_eq!(
            workload("web-7967496c8b-hv2zq", Some("7967496c8b"), web),
            "web"
        );
        // A ReplicaSet of its own (no Deployment's hash in its name) is the workload.
        assert_eq!(workload("rs-x1", None, Some(("ReplicaSet", "rs"))), "rs");
        let job = Some(("Job", "report-29412345"));
        assert_eq!(workload("report-29412345-abcde", None, job), "report");
        let job = Some(("Job", "migrate-v2"));
        assert_eq!(workload("migrate-v2-abcde", None, job), "migrate-v2");
        let sts = Some(("StatefulSet", "db"));
        assert_eq!(workload("db-0", None, sts), "db");
        assert_eq!(workload("standalone", None, None), "standalone");
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
            workload: "p".into(),
            node: "n".into(),
            service_account: "default".into(),
            ips: vec![],
            labels: Default::default(),
            running: true,
            terminating: false,
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

    /// Hostile input is refused with the field named; none of it may panic.
    #[test]
    fn hostile_numbers_and_names_are_refused() {
        let vs = |http: Value| {
            err(
                json!({"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
                "metadata": {"name": "r", "namespace": "shop"}, "spec": {"hosts": ["reviews"], "http": http}}),
            )
        };
        let dst = |w: i64| json!({"destination": {"host": "reviews"}, "weight": w});
        let e = vs(json!([{"route": [dst(2147483647), dst(2147483647), dst(102)]}]));
        assert!(
            e.contains("spec.http[0].route[0].weight: 2147483647 is not 0 to 100"),
            "{e}"
        );
        let e = vs(json!([{"route": [dst(150)]}]));
        assert!(
            e.contains("spec.http[0].route[0].weight: 150 is not 0 to 100"),
            "{e}"
        );
        let e = vs(json!([{"route": [dst(4294967296)]}]));
        assert!(e.contains("spec.http[0].route[0].weight"), "{e}");
        let huge = format!("{}h", "9".repeat(30));
        let e = vs(json!([{"route": [dst(100)], "timeout": huge}]));
        assert!(
            e.contains("spec.http[0].timeout") && e.contains("not a duration"),
            "{e}"
        );

        let dr = |subsets: Value| {
            err(
                json!({"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
                "metadata": {"name": "r"}, "spec": {"host": "reviews", "subsets": subsets}}),
            )
        };
        let e = dr(json!([{"name": "version one", "labels": {"version": "v1"}}]));
        assert!(
            e.contains("spec.subsets[0].name: \"version one\" is not a DNS-1123 label"),
            "{e}"
        );
        let e = dr(json!([{"name": "v1", "labels": {"bad label!!/=x": "v1"}}]));
        assert!(
            e.contains("spec.subsets[0].labels: label key \"bad label!!/=x\""),
            "{e}"
        );

        let pod = |meta: Value, spec: Value| {
            err(json!({"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec}))
        };
        let e = pod(
            json!({"name": "web", "labels": {"app": "a\u{0}b"}}),
            json!({}),
        );
        assert!(e.contains("metadata.labels: label value \"a\\0b\""), "{e}");
        let e = pod(json!({"name": "Web App"}), json!({}));
        assert!(
            e.contains("metadata.name: \"Web App\" is not a DNS-1123 subdomain"),
            "{e}"
        );
        let e = pod(json!({"name": "web", "namespace": "a.b"}), json!({}));
        assert!(e.contains("metadata.namespace"), "{e}");
        let e = pod(
            json!({"name": "web"}),
            json!({"containers": [{"name": "c", "ports": [{"name": "http", "containerPort": -1}]}]}),
        );
        assert!(
            e.contains("spec.containers[0].ports[0].containerPort: -1 is not a port"),
            "{e}"
        );
        let e = pod(
            json!({"name": "web"}),
            json!({"serviceAccountName": "../root", "containers": []}),
        );
        assert!(e.contains("spec.serviceAccountName"), "{e}");

        let e = err(
            json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
            "spec": {"ports": [{"port": 80, "targetPort": -80}]}}),
        );
        assert!(
            e.contains("spec.ports[0].targetPort: -80 is not a port"),
            "{e}"
        );
        let e = err(json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "9web"}}));
        assert!(e.contains("DNS-1035"), "{e}");
        let e = err(
            json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
            "spec": {"selector": {"app": "has space"}}}),
        );
        assert!(e.contains("spec.selector: label value"), "{e}");
        let e = err(
            json!({"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
            "metadata": {"name": "p"}, "spec": {"selector": {"matchLabels": {"=": "x"}}}}),
        );
        assert!(
            e.contains("spec.selector.matchLabels: label key \"=\""),
            "{e}"
        );
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

    #[test]
    fn tls_secrets_are_read_and_checked() {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["shop.example".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let doc = |ty: &str, crt: &str, k: &str| {
            json!({"apiVersion": "v1", "kind": "Secret", "type": ty,
                "metadata": {"name": "shop-cert", "namespace": "trellis-system"},
                "stringData": {"tls.crt": crt, "tls.key": k}})
        };
        let Object::Secret(s) =
            parse_object(&doc("kubernetes.io/tls", &cert.pem(), &key.serialize_pem())).unwrap()
        else {
            panic!("not a Secret")
        };
        assert_eq!(
            (s.namespace.as_str(), s.name.as_str()),
            ("trellis-system", "shop-cert")
        );
        assert!(
            !format!("{s:?}").contains("PRIVATE KEY"),
            "the key is never printed"
        );
        // `data` is base64, as the API server serves it.
        let mut b64 = doc("kubernetes.io/tls", "", "");
        b64["stringData"] = json!(null);
        b64["data"] = json!({"tls.crt": base64(cert.pem().as_bytes()), "tls.key": base64(key.serialize_pem().as_bytes())});
        assert!(matches!(parse_object(&b64), Ok(Object::Secret(_))));
        assert_eq!(
            err(doc("Opaque", &cert.pem(), &key.serialize_pem())),
            "type: \"Opaque\" is not supported (Trellis reads only kubernetes.io/tls Secrets)"
        );
        assert_eq!(
            err(doc("kubernetes.io/tls", "junk", &key.serialize_pem())),
            "data.tls.crt: no PEM certificate in it"
        );
        assert!(
            err(doc("kubernetes.io/tls", &cert.pem(), "junk"))
                .starts_with("data.tls.key: no usable PEM private key"),
        );
    }

    fn base64(bytes: &[u8]) -> String {
        const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut out = String::new();
        for c in bytes.chunks(3) {
            let n = c
                .iter()
                .enumerate()
                .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
            for i in 0..4 {
                out.push(if i <= c.len() {
                    A[(n >> (18 - 6 * i) & 63) as usize] as char
                } else {
                    '='
                });
            }
        }
        out
    }
}

//! Compiles the cluster model into what one node's agent needs: its own enrolled workloads, the
//! enrolled pods on other nodes (peers), every service with endpoints derived from running pods,
//! and the mesh policies that apply there.
use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Instant,
};

use tokio::sync::watch;
use tracing::error;
use trellis_api as api;

use crate::{
    metrics::Metrics,
    model::{Cluster, PodInfo, ServiceInfo, TargetPort},
    routes::{self, Policies},
    tcp_routes,
};

/// Namespace whose security policies apply mesh-wide (Istio's root namespace), by default.
pub const ROOT_NAMESPACE: &str = "trellis-system";

/// Mesh-wide settings (what Istio keeps in meshConfig), from control's flags.
#[derive(Debug, Clone, PartialEq)]
pub struct Mesh {
    pub trust_domain: String,
    /// Whose selector-less security policies apply mesh-wide, and whose outbound-policy label
    /// is every namespace's default.
    pub root_namespace: String,
    /// The outbound traffic policy of namespaces that (and whose root namespace) say nothing:
    /// REGISTRY_ONLY when true, else ALLOW_ANY.
    pub registry_only: bool,
}

impl Mesh {
    /// The defaults: root namespace `trellis-system`, ALLOW_ANY.
    pub fn new(trust_domain: &str) -> Self {
        Self {
            trust_domain: trust_domain.to_owned(),
            root_namespace: ROOT_NAMESPACE.to_owned(),
            registry_only: false,
        }
    }
}

/// A resource's kind and name (as in `api::ResourceKey`).
pub type Key = (i32, String);

/// A node's config, keyed so two versions can be diffed. The resources are shared with the
/// compile they came from and with every other node's config.
pub type NodeConfig = BTreeMap<Key, Arc<api::Resource>>;

pub fn spiffe_id(trust_domain: &str, namespace: &str, service_account: &str) -> String {
    format!("spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}")
}

/// The cluster compiled once for every node. Nodes differ only in which pods are theirs
/// (workloads, with the fields only their own agent needs, rather than peers) and in which
/// security policies reach them.
pub struct Compiled {
    /// Running enrolled pods, by UID.
    pub(crate) pods: BTreeMap<String, CompiledPod>,
    /// Services, ServiceEntries and routing policies: the same on every node.
    pub(crate) shared: BTreeMap<Key, Arc<api::Resource>>,
    /// What each Service was compiled from, by `namespace/name`.
    services: BTreeMap<String, CompiledService>,
    /// What every Service's routes and endpoints depend on beside its own object and pods.
    routing: Routing,
    /// AuthorizationPolicies and PeerAuthentications, with their namespace.
    pub(crate) security: BTreeMap<Key, (String, Arc<api::Resource>)>,
    /// The namespaces each node has pods of.
    namespaces: HashMap<String, HashSet<String>>,
    root_namespace: String,
    /// Unique to this compile.
    pub(crate) id: u64,
    /// What differs from the compile this one shares with (the one before), if any.
    pub(crate) changed: Option<Changed>,
}

/// The pods and shared resources whose resource is not the compile before's, or that are gone.
/// (Security policies are few, and compared whole.)
pub(crate) struct Changed {
    /// The compile before's `id`.
    pub(crate) since: u64,
    pub(crate) pods: Vec<String>,
    pub(crate) shared: Vec<Key>,
}

static COMPILES: AtomicU64 = AtomicU64::new(0);

/// A Service's inputs beside `Routing` (what they compiled to is in `shared`).
struct CompiledService {
    source: Arc<ServiceInfo>,
    /// The ready pods it selected, in UID order.
    pods: Vec<Arc<PodInfo>>,
}

/// The parts of the model that any Service's compile may read besides its own object and pods:
/// namespaces (whether endpoints are in the mesh), the mesh policies (routes, traffic policy)
/// and the Services (hosts routes name). While these are unchanged, a Service whose object and
/// selected pods are the same objects as last time compiles as it did (most, on a pod change).
#[derive(PartialEq)]
struct Routing {
    namespaces: BTreeMap<String, BTreeMap<String, String>>,
    policies: Vec<Arc<crate::istio::PolicyObject>>,
    services: Vec<Arc<ServiceInfo>>,
}

impl Routing {
    fn of(cluster: &Cluster) -> Self {
        Self {
            namespaces: cluster.namespaces.clone(),
            policies: cluster.policies.values().cloned().collect(),
            services: cluster.services.values().cloned().collect(),
        }
    }
}

#[derive(Clone)]
pub(crate) struct CompiledPod {
    /// What it was compiled from.
    source: Arc<PodInfo>,
    registry_only: bool,
    gateway_ports: Vec<api::GatewayPort>,
    /// As its own node's agent gets it, and as every other node's does.
    workload: Arc<api::Resource>,
    peer: Arc<api::Resource>,
}

impl CompiledPod {
    /// The pod's kind and resource as `node` gets it.
    pub(crate) fn on(&self, node: &str) -> (api::Kind, &Arc<api::Resource>) {
        if self.source.node == node {
            (api::Kind::Workload, &self.workload)
        } else {
            (api::Kind::Peer, &self.peer)
        }
    }
}

impl Compiled {
    /// Compiles `cluster`. A resource equal to its version in `previous` is that version, so the
    /// nodes' diffs see it unchanged without comparing it again.
    pub fn new(cluster: &Cluster, mesh: &Mesh, previous: Option<&Compiled>) -> Self {
        let trust_domain = mesh.trust_domain.as_str();
        let policies = Policies::new(cluster);
        let mut pods = BTreeMap::new();
        let mut changed_pods = Vec::new();
        for p in cluster
            .pods
            .values()
            .filter(|p| p.running && cluster.in_mesh(p))
        {
            let registry_only = cluster.registry_only(&p.namespace, mesh);
            let gateway_ports = crate::gateways::ports(cluster, &policies, p);
            let old = previous.and_then(|c| c.pods.get(&p.uid));
            // The same pod object, in a namespace with the same policy, serving the same gateway
            // ports: compiled as before (most pods, on most changes).
            if let Some(old) = old.filter(|o| {
                Arc::ptr_eq(&o.source, p)
                    && o.registry_only == registry_only
                    && o.gateway_ports == gateway_ports
            }) {
                pods.insert(p.uid.clone(), old.clone());
                continue;
            }
            let peer = api::Workload {
                uid: p.uid.clone(),
                namespace: p.namespace.clone(),
                name: p.name.clone(),
                workload_name: p.workload.clone(),
                service_account: p.service_account.clone(),
                ips: p.ips.iter().map(ToString::to_string).collect(),
                labels: p.labels.clone().into_iter().collect(),
                identity: spiffe_id(trust_domain, &p.namespace, &p.service_account),
                node: p.node.clone(),
                registry_only: false,
                gateway_ports: Vec::new(),
            };
            let workload = api::Workload {
                registry_only,
                gateway_ports: gateway_ports.clone(),
                ..peer.clone()
            };
            let compiled = CompiledPod {
                source: p.clone(),
                registry_only,
                gateway_ports,
                workload: reuse(
                    old.map(|o| &o.workload),
                    api::resource::Resource::Workload(workload),
                ),
                peer: reuse(old.map(|o| &o.peer), api::resource::Resource::Peer(peer)),
            };
            let same = old.is_some_and(|o| {
                o.source.node == p.node
                    && Arc::ptr_eq(&o.workload, &compiled.workload)
                    && Arc::ptr_eq(&o.peer, &compiled.peer)
            });
            if !same {
                changed_pods.push(p.uid.clone());
            }
            pods.insert(p.uid.clone(), compiled);
        }
        let mut shared = Shared::new(previous.map(|c| &c.shared));
        let routing = Routing::of(cluster);
        let same_routing = previous.is_some_and(|p| p.routing == routing);
        let by_label = PodsByLabel::new(cluster);
        let mut services = BTreeMap::new();
        for (name, s) in &cluster.services {
            let pods = s
                .selector
                .as_ref()
                .map(|sel| by_label.select(&s.namespace, sel))
                .unwrap_or_default();
            let key = (api::Kind::Service as i32, name.clone());
            let unchanged = previous
                .filter(|c| {
                    same_routing
                        && c.services
                            .get(name)
                            .is_some_and(|o| Arc::ptr_eq(&o.source, s) && same_pods(&o.pods, &pods))
                })
                .and_then(|c| c.shared.get(&key));
            match unchanged {
                Some(r) => shared.keep(key, r.clone()),
                None => {
                    let svc = service(cluster, &policies, &pods, s, trust_domain);
                    shared.add(key, api::resource::Resource::Service(svc));
                }
            }
            services.insert(
                name.clone(),
                CompiledService {
                    source: s.clone(),
                    pods: pods.into_iter().cloned().collect(),
                },
            );
        }
        for svc in crate::service_entries::services(cluster, &policies, trust_domain) {
            let key = (
                api::Kind::Service as i32,
                format!("{}/{}", svc.namespace, svc.name),
            );
            shared.add(key, api::resource::Resource::Service(svc));
        }
        let mut security = BTreeMap::new();
        for (name, p) in &cluster.policies {
            let key = (api::Kind::Policy as i32, name.clone());
            let is_security = matches!(p.kind, "AuthorizationPolicy" | "PeerAuthentication");
            let old = previous.and_then(|c| {
                if is_security {
                    c.security.get(&key).map(|(_, r)| r)
                } else {
                    c.shared.get(&key)
                }
            });
            // The same policies as the compile before: the same resources, not even compared.
            let r = match old.filter(|_| same_routing) {
                Some(r) => r.clone(),
                None => {
                    let policy = api::resource::Resource::Policy(api::Policy {
                        kind: p.kind.to_owned(),
                        namespace: p.namespace.clone(),
                        name: p.name.clone(),
                        spec_json: p.spec.to_string(),
                    });
                    reuse(old, policy)
                }
            };
            if is_security {
                security.insert(key, (p.namespace.clone(), r));
            } else {
                shared.keep(key, r);
            }
        }
        let (shared, mut changed_shared) = (shared.resources, shared.changed);
        let mut namespaces: HashMap<String, HashSet<String>> = HashMap::new();
        for p in pods.values() {
            namespaces
                .entry(p.source.node.clone())
                .or_default()
                .insert(p.source.namespace.clone());
        }
        let changed = previous.map(|prev| {
            let gone = |old: &String| !pods.contains_key(old);
            changed_pods.extend(prev.pods.keys().filter(|k| gone(k)).cloned());
            let gone = |old: &Key| !shared.contains_key(old);
            changed_shared.extend(prev.shared.keys().filter(|k| gone(k)).cloned());
            Changed {
                since: prev.id,
                pods: changed_pods,
                shared: changed_shared,
            }
        });
        Self {
            pods,
            shared,
            services,
            routing,
            security,
            namespaces,
            root_namespace: mesh.root_namespace.clone(),
            id: COMPILES.fetch_add(1, Ordering::Relaxed),
            changed,
        }
    }

    /// What `node`'s agent gets, whole.
    pub fn node(&self, node: &str) -> NodeConfig {
        self.resources(node).map(|(k, r)| (k, r.clone())).collect()
    }

    /// What `node`'s agent gets, one resource at a time (a snapshot is sent as it is read).
    pub fn resources<'a>(
        &'a self,
        node: &'a str,
    ) -> impl Iterator<Item = (Key, &'a Arc<api::Resource>)> + Send + 'a {
        let pods = self.pods.iter().map(move |(uid, p)| {
            let (kind, r) = p.on(node);
            ((kind as i32, uid.clone()), r)
        });
        let shared = self.shared.iter().map(|(k, r)| (k.clone(), r));
        let security = self
            .security
            .iter()
            .filter(move |(_, (namespace, _))| self.reaches(namespace, node))
            .map(|(key, (_, r))| (key.clone(), r));
        pods.chain(shared).chain(security)
    }

    /// Whether a security policy in `namespace` goes to `node`: server-side policies matter only
    /// where their namespace has workloads (or mesh-wide).
    pub(crate) fn reaches(&self, namespace: &str, node: &str) -> bool {
        namespace == self.root_namespace
            || self
                .namespaces
                .get(node)
                .is_some_and(|n| n.contains(namespace))
    }

    /// What `node` gets under `key`, if anything.
    pub fn get(&self, node: &str, key: &Key) -> Option<&Arc<api::Resource>> {
        let (kind, name) = key;
        if *kind == api::Kind::Workload as i32 || *kind == api::Kind::Peer as i32 {
            let (k, r) = self.pods.get(name)?.on(node);
            return (k as i32 == *kind).then_some(r);
        }
        self.shared.get(key).or_else(|| {
            let (namespace, r) = self.security.get(key)?;
            self.reaches(namespace, node).then_some(r)
        })
    }
}

/// The shared resources of a compile being built, and which differ from the compile before's.
struct Shared<'a> {
    previous: Option<&'a BTreeMap<Key, Arc<api::Resource>>>,
    resources: BTreeMap<Key, Arc<api::Resource>>,
    changed: Vec<Key>,
}

impl<'a> Shared<'a> {
    fn new(previous: Option<&'a BTreeMap<Key, Arc<api::Resource>>>) -> Self {
        Self {
            previous,
            resources: BTreeMap::new(),
            changed: Vec::new(),
        }
    }

    /// Adds `r` under `key`: the compile before's resource there if equal.
    fn add(&mut self, key: Key, r: api::resource::Resource) {
        let old = self.previous.and_then(|p| p.get(&key));
        let r = reuse(old, r);
        self.keep(key, r);
    }

    /// Adds `r` under `key` as it is.
    fn keep(&mut self, key: Key, r: Arc<api::Resource>) {
        let old = self.previous.and_then(|p| p.get(&key));
        if !old.is_some_and(|o| Arc::ptr_eq(o, &r)) {
            self.changed.push(key.clone());
        }
        self.resources.insert(key, r);
    }
}

/// Whether two selections are the same pod objects.
fn same_pods(a: &[Arc<PodInfo>], b: &[&Arc<PodInfo>]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(a, b)| Arc::ptr_eq(a, b))
}

/// `previous` when it equals `new`, else `new`, shared.
fn reuse(
    previous: Option<&Arc<api::Resource>>,
    new: api::resource::Resource,
) -> Arc<api::Resource> {
    let new = api::Resource {
        resource: Some(new),
    };
    match previous {
        Some(old) if **old == new => old.clone(),
        _ => Arc::new(new),
    }
}

/// `node`'s config compiled from `cluster` alone (for tests and fuzzing; control keeps the
/// compile of the previous model to share with).
pub fn node_config(cluster: &Cluster, node: &str, mesh: &Mesh) -> NodeConfig {
    Compiled::new(cluster, mesh, None).node(node)
}

/// Compiles every version of the model into `out`, once for all nodes, off the runtime's
/// threads (a large cluster takes a while). `out` holds None until the source has read the
/// whole cluster: a config compiled before would tell the agents to drop what they serve.
pub async fn follow(
    mut model: watch::Receiver<Arc<Cluster>>,
    mut ready: watch::Receiver<bool>,
    mesh: Mesh,
    out: watch::Sender<Option<Arc<Compiled>>>,
    metrics: Arc<Metrics>,
) {
    if ready.wait_for(|r| *r).await.is_err() {
        return;
    }
    loop {
        let cluster = model.borrow_and_update().clone();
        let previous = out.borrow().clone();
        let mesh = mesh.clone();
        let start = Instant::now();
        let compiled = tokio::task::spawn_blocking(move || {
            Compiled::new(&cluster, &mesh, previous.as_deref())
        })
        .await;
        match compiled {
            Ok(c) => {
                metrics.compiled(start.elapsed());
                out.send_replace(Some(Arc::new(c)));
            }
            // The nodes keep the last good compile; the next change is compiled afresh.
            Err(e) => error!("compiling the cluster failed: {e}"),
        }
        if model.changed().await.is_err() {
            return;
        }
    }
}

/// Ready pods by (namespace, label key, label value), so a service's selector looks at the pods
/// carrying one of its labels instead of every pod in the cluster.
struct PodsByLabel<'a>(HashMap<(&'a str, &'a str, &'a str), Vec<&'a Arc<PodInfo>>>);

impl<'a> PodsByLabel<'a> {
    fn new(cluster: &'a Cluster) -> Self {
        let mut index: HashMap<_, Vec<_>> = HashMap::new();
        for p in cluster.pods.values().filter(|p| p.ready()) {
            for (k, v) in &p.labels {
                index
                    .entry((p.namespace.as_str(), k.as_str(), v.as_str()))
                    .or_default()
                    .push(p);
            }
        }
        Self(index)
    }

    /// The ready pods in `namespace` matching a non-empty `selector`, in UID order.
    fn select(
        &self,
        namespace: &str,
        selector: &BTreeMap<String, String>,
    ) -> Vec<&'a Arc<PodInfo>> {
        let Some((k, v)) = selector.iter().next() else {
            return Vec::new();
        };
        self.0
            .get(&(namespace, k.as_str(), v.as_str()))
            .into_iter()
            .flatten()
            .filter(|p| selector.iter().all(|(k, v)| p.labels.get(k) == Some(v)))
            .copied()
            .collect()
    }
}

/// `s` compiled, with `pods` (what its selector selects) as its endpoints.
fn service(
    cluster: &Cluster,
    policies: &Policies,
    pods: &[&Arc<PodInfo>],
    s: &ServiceInfo,
    trust_domain: &str,
) -> api::Service {
    let endpoints = pods
        .iter()
        .map(|p| api::Endpoint {
            pod_uid: p.uid.clone(),
            pod_name: p.name.clone(),
            workload_name: p.workload.clone(),
            ips: p.ips.iter().map(ToString::to_string).collect(),
            node: p.node.clone(),
            in_mesh: cluster.in_mesh(p),
            identity: spiffe_id(trust_domain, &p.namespace, &p.service_account),
            labels: p.labels.clone().into_iter().collect(),
            ports: s
                .ports
                .iter()
                .filter_map(|port| {
                    let target = match &port.target {
                        TargetPort::Number(n) => Some(*n),
                        TargetPort::Name(name) => p.named_ports.get(name).copied(),
                    }?;
                    Some((port.name.clone(), target))
                })
                .collect(),
            hostname: String::new(),
        })
        .collect();
    api::Service {
        namespace: s.namespace.clone(),
        name: s.name.clone(),
        vips: s.cluster_ips.iter().map(ToString::to_string).collect(),
        ports: s
            .ports
            .iter()
            .map(|p| {
                let proto = protocol(p.app_protocol.as_deref(), &p.name);
                let http = proto.is_http();
                api::ServicePort {
                    name: p.name.clone(),
                    port: p.port,
                    target_port: match p.target {
                        TargetPort::Number(n) => n,
                        TargetPort::Name(_) => 0,
                    },
                    protocol: proto as i32,
                    http_routes: if http {
                        routes::http_routes(cluster, policies, s, p)
                    } else {
                        Vec::new()
                    },
                    traffic_policy: routes::traffic_policy(policies, s),
                    tcp_route: if http {
                        None
                    } else {
                        let key = format!("{}/{}", s.namespace, s.name);
                        tcp_routes::mesh_route(cluster, policies, &key, p.port)
                    },
                }
            })
            .collect(),
        endpoints,
        host: String::new(),
        original_destination: false,
        export_to: Vec::new(),
    }
}

/// appProtocol wins; otherwise Istio's port-name convention (`http-…`, `grpc-…`); else TCP.
pub fn protocol(app_protocol: Option<&str>, port_name: &str) -> api::Protocol {
    let from = |s: &str| match s.to_ascii_lowercase().as_str() {
        "http" => Some(api::Protocol::Http),
        "http2" | "kubernetes.io/h2c" => Some(api::Protocol::Http2),
        "grpc" => Some(api::Protocol::Grpc),
        "tcp" => Some(api::Protocol::Tcp),
        _ => None,
    };
    app_protocol
        .and_then(from)
        .or_else(|| from(port_name.split('-').next().unwrap_or_default()))
        .unwrap_or(api::Protocol::Tcp)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        held::Held,
        model::{MESH_LABEL, Object, PortInfo},
    };

    fn pod(uid: &str, ns: &str, node: &str, labels: &[(&str, &str)]) -> Object {
        Object::Pod(Arc::new(PodInfo {
            uid: uid.into(),
            namespace: ns.into(),
            name: format!("pod-{uid}"),
            workload: format!("pod-{uid}"),
            node: node.into(),
            service_account: "sa".into(),
            ips: vec![format!("10.0.0.{}", uid.len()).parse().unwrap()],
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            running: true,
            terminating: false,
            named_ports: [("http".to_string(), 9080)].into(),
        }))
    }

    fn cluster() -> Cluster {
        let mut c = Cluster::default();
        c.insert(Object::Namespace {
            name: "shop".into(),
            labels: [(MESH_LABEL.into(), "enabled".into())].into(),
        });
        c.insert(Object::Namespace {
            name: "legacy".into(),
            labels: Default::default(),
        });
        c.insert(pod("a", "shop", "n1", &[("app", "reviews")]));
        c.insert(pod("bb", "shop", "n2", &[("app", "reviews")]));
        c.insert(pod(
            "ccc",
            "shop",
            "n1",
            &[("app", "web"), (MESH_LABEL, "disabled")],
        ));
        c.insert(pod("dddd", "legacy", "n1", &[("app", "reviews")]));
        c.insert(Object::Service(Arc::new(ServiceInfo {
            namespace: "shop".into(),
            name: "reviews".into(),
            selector: Some([("app".to_string(), "reviews".to_string())].into()),
            cluster_ips: vec!["10.96.0.10".parse().unwrap()],
            ports: vec![PortInfo {
                name: "http".into(),
                port: 80,
                target: TargetPort::Name("http".into()),
                app_protocol: None,
            }],
        })));
        c
    }

    #[test]
    fn a_node_gets_its_enrolled_workloads_and_all_services() {
        let cfg = node_config(&cluster(), "n1", &Mesh::new("cluster.local"));
        let workloads: Vec<&str> = cfg
            .keys()
            .filter(|(k, _)| *k == api::Kind::Workload as i32)
            .map(|(_, n)| n.as_str())
            .collect();
        assert_eq!(
            workloads,
            ["a"],
            "only n1's enrolled pods (not opted-out, not in unlabelled namespaces)"
        );
        let svc = match &cfg[&(api::Kind::Service as i32, "shop/reviews".into())].resource {
            Some(api::resource::Resource::Service(s)) => s.clone(),
            other => panic!("{other:?}"),
        };
        assert_eq!(
            svc.endpoints.len(),
            2,
            "both reviews pods in shop, on any node"
        );
        assert!(
            svc.endpoints
                .iter()
                .all(|e| e.in_mesh && e.ports["http"] == 9080)
        );
        assert_eq!(svc.ports[0].protocol, api::Protocol::Http as i32);
        assert_eq!(
            svc.endpoints[0].identity,
            "spiffe://cluster.local/ns/shop/sa/sa"
        );
    }

    #[test]
    fn a_terminating_pod_stays_captured_but_serves_no_more() {
        let mut c = cluster();
        if let Some(p) = c.pods.values_mut().find(|p| p.uid == "a") {
            Arc::make_mut(p).terminating = true;
        }
        let cfg = node_config(&c, "n1", &Mesh::new("cluster.local"));
        assert!(
            cfg.contains_key(&(api::Kind::Workload as i32, "a".into())),
            "its containers still run: STRICT must still hold for them"
        );
        let Some(api::resource::Resource::Service(svc)) =
            &cfg[&(api::Kind::Service as i32, "shop/reviews".into())].resource
        else {
            panic!("reviews compiled");
        };
        assert_eq!(svc.endpoints.len(), 1, "only the pod not being deleted");
    }

    #[test]
    fn virtual_services_compile_into_the_http_routes_of_the_service_they_name() {
        let mut c = cluster();
        let policy = |kind: &'static str, name: &str, spec: serde_json::Value| {
            Object::Policy(Arc::new(crate::istio::PolicyObject {
                kind,
                namespace: "shop".into(),
                name: name.into(),
                spec,
            }))
        };
        c.insert(policy(
            "DestinationRule",
            "reviews",
            serde_json::json!({"host": "reviews.shop.svc.cluster.local",
                "subsets": [{"name": "v2", "labels": {"version": "v2"}}]}),
        ));
        c.insert(policy(
            "VirtualService",
            "reviews",
            serde_json::json!({"hosts": ["reviews"], "http": [
                {"match": [{"headers": {"End-User": {"exact": "jason"}}}],
                 "route": [{"destination": {"host": "reviews", "subset": "v2"}}]},
                {"match": [{"port": 9999}], "route": [{"destination": {"host": "reviews"}}]},
                {"route": [{"destination": {"host": "10.96.0.10", "subset": "v3"}, "weight": 100}]}]}),
        ));
        c.insert(policy(
            "VirtualService",
            "other",
            serde_json::json!({"hosts": ["ratings"], "http": [{"route": [{"destination": {"host": "ratings"}}]}]}),
        ));
        let cfg = node_config(&c, "n1", &Mesh::new("cluster.local"));
        let svc = match &cfg[&(api::Kind::Service as i32, "shop/reviews".into())].resource {
            Some(api::resource::Resource::Service(s)) => s.clone(),
            other => panic!("{other:?}"),
        };
        let routes = &svc.ports[0].http_routes;
        assert_eq!(
            routes.len(),
            2,
            "the port-9999 route does not apply to port 80: {routes:?}"
        );
        assert_eq!(routes[0].name, "shop/reviews/0");
        assert!(routes[0].matches[0].headers.contains_key("end-user"));
        let d = &routes[0].destinations[0];
        assert_eq!((d.service.as_str(), d.weight), ("shop/reviews", 100));
        assert_eq!(
            d.subset_labels,
            [("version".to_owned(), "v2".to_owned())].into()
        );
        // A subset no DestinationRule defines selects no pod (Istio: 503), never all of them.
        let d = &routes[1].destinations[0];
        assert_eq!(d.subset, "v3");
        assert!(d.subset_labels.contains_key("trellis.dev/undefined-subset"));
    }

    #[test]
    fn the_mesh_wide_outbound_policy_and_root_namespace_come_from_control() {
        use crate::model::OUTBOUND_LABEL;
        let registry_only = |c: &Cluster, mesh: &Mesh| match &node_config(c, "n1", mesh)
            [&(api::Kind::Workload as i32, "a".into())]
            .resource
        {
            Some(api::resource::Resource::Workload(w)) => w.registry_only,
            other => panic!("{other:?}"),
        };
        let mut c = cluster();
        let mut mesh = Mesh::new("td");
        assert!(!registry_only(&c, &mesh), "ALLOW_ANY by default");
        mesh.registry_only = true;
        assert!(registry_only(&c, &mesh), "the mesh-wide default");
        let ns = |name: &str, outbound: &str| Object::Namespace {
            name: name.into(),
            labels: [
                (MESH_LABEL.into(), "enabled".into()),
                (OUTBOUND_LABEL.into(), outbound.into()),
            ]
            .into(),
        };
        c.insert(ns("shop", "ALLOW_ANY"));
        assert!(!registry_only(&c, &mesh), "the namespace's own label wins");
        // A root namespace of the operator's choosing: its label, and its policies mesh-wide.
        let mut c = cluster();
        let mesh = Mesh {
            root_namespace: "mesh-root".into(),
            ..Mesh::new("td")
        };
        c.insert(ns("mesh-root", "REGISTRY_ONLY"));
        c.insert(Object::Policy(Arc::new(crate::istio::PolicyObject {
            kind: "AuthorizationPolicy",
            namespace: "mesh-root".into(),
            name: "deny-all".into(),
            spec: serde_json::json!({}),
        })));
        assert!(registry_only(&c, &mesh), "the root namespace's label");
        let cfg = node_config(&c, "n1", &mesh);
        assert!(
            cfg.contains_key(&(
                api::Kind::Policy as i32,
                "AuthorizationPolicy/mesh-root/deny-all".into()
            )),
            "the root namespace's security policies reach every node"
        );
        let other_root = node_config(&c, "n1", &Mesh::new("td"));
        assert!(!other_root.contains_key(&(
            api::Kind::Policy as i32,
            "AuthorizationPolicy/mesh-root/deny-all".into()
        )));
    }

    #[test]
    fn changes_are_upserts_and_removals() {
        let mesh = Mesh::new("td");
        let c = cluster();
        let old = Arc::new(Compiled::new(&c, &mesh, None));
        let mut c2 = c.clone();
        c2.pods.remove("a");
        let new = Compiled::new(&c2, &mesh, Some(&old));
        let held = Held::new(old.clone(), Default::default());
        let (ups, rm) = held.changes("n1", &new);
        assert_eq!(
            rm,
            [api::ResourceKey {
                kind: api::Kind::Workload as i32,
                name: "a".into()
            }]
        );
        assert_eq!(ups.len(), 1, "the service lost an endpoint");
        // Two compiles on (the node skipped one): the same changes, found the long way.
        let third = Compiled::new(&c2, &mesh, Some(&new));
        assert_eq!(held.changes("n1", &third), held.changes("n1", &new));
        assert_eq!(held.changes("n1", &old), (vec![], vec![]));
        // Fresh compiles (nothing shared) compare by value: still no change.
        let again = Compiled::new(&c, &mesh, None);
        assert_eq!(held.changes("n1", &again), (vec![], vec![]));
        // On another node, `a` is a peer.
        let (_, rm) = held.changes("n2", &new);
        assert_eq!(rm[0].kind, api::Kind::Peer as i32);
    }

    #[test]
    fn what_a_node_kept_instead_is_compared_afresh() {
        let mesh = Mesh::new("td");
        let c = cluster();
        let compiled = Arc::new(Compiled::new(&c, &mesh, None));
        let key = (api::Kind::Service as i32, "shop/reviews".to_owned());
        // The node never got the service (too large): it is sent until it arrives.
        let held = Held::new(compiled.clone(), [(key.clone(), None)].into());
        let (ups, rm) = held.changes("n1", &compiled);
        assert_eq!((ups.len(), rm.len()), (1, 0));
        assert_eq!(ups[0].0, key);
        assert_eq!(held.get("n1", &key), None);
        // Deleted meanwhile: nothing to remove on a node that never had it.
        let mut c2 = c.clone();
        c2.services.clear();
        let gone = Compiled::new(&c2, &mesh, Some(&compiled));
        let (ups, rm) = held.changes("n1", &gone);
        assert!(ups.is_empty() && rm.is_empty(), "{ups:?} {rm:?}");
    }

    #[test]
    fn security_policies_follow_the_namespaces_a_node_has_pods_of() {
        let mesh = Mesh::new("td");
        let mut c = cluster();
        c.insert(Object::Policy(Arc::new(crate::istio::PolicyObject {
            kind: "AuthorizationPolicy",
            namespace: "shop".into(),
            name: "deny".into(),
            spec: serde_json::json!({}),
        })));
        let old = Arc::new(Compiled::new(&c, &mesh, None));
        let key = (
            api::Kind::Policy as i32,
            "AuthorizationPolicy/shop/deny".to_owned(),
        );
        assert!(old.get("n1", &key).is_some());
        assert!(old.get("n3", &key).is_none(), "no shop pod on n3");
        let mut c2 = c.clone();
        c2.insert(pod("eeeee", "shop", "n3", &[("app", "web")]));
        let new = Compiled::new(&c2, &mesh, Some(&old));
        let (ups, _) = Held::new(old, Default::default()).changes("n3", &new);
        assert!(ups.iter().any(|(k, _)| *k == key), "{ups:?}");
    }

    #[test]
    fn a_recompile_shares_what_did_not_change_so_nodes_diff_by_pointer() {
        let mesh = Mesh::new("td");
        let c = cluster();
        let first = Compiled::new(&c, &mesh, None);
        let mut c2 = c.clone();
        if let Some(p) = c2.pods.values_mut().find(|p| p.uid == "bb") {
            Arc::make_mut(p)
                .labels
                .insert("version".into(), "v2".into());
        }
        let second = Compiled::new(&c2, &mesh, Some(&first));
        let (old, new) = (first.node("n1"), second.node("n1"));
        let first = Arc::new(first);
        let same = |kind: api::Kind, name: &str| {
            let key = (kind as i32, name.to_owned());
            Arc::ptr_eq(&old[&key], &new[&key])
        };
        assert!(same(api::Kind::Workload, "a"), "an untouched pod");
        assert!(!same(api::Kind::Peer, "bb"), "the relabelled pod");
        assert!(
            !same(api::Kind::Service, "shop/reviews"),
            "its endpoint's labels changed"
        );
        let (ups, rm) = Held::new(first, Default::default()).changes("n1", &second);
        assert_eq!(ups.len(), 2, "{ups:?}");
        assert!(rm.is_empty());
        // Every node's config holds the same shared resource.
        let key = (api::Kind::Service as i32, "shop/reviews".to_owned());
        assert!(Arc::ptr_eq(&new[&key], &second.node("n2")[&key]));
        // A pod is a workload on its own node and a peer elsewhere.
        assert!(
            second
                .node("n2")
                .contains_key(&(api::Kind::Peer as i32, "a".into()))
        );
    }

    #[test]
    fn a_service_compiles_again_only_when_its_pods_or_the_routing_inputs_change() {
        let mesh = Mesh::new("td");
        let mut c = cluster();
        c.insert(Object::Service(Arc::new(ServiceInfo {
            name: "web".into(),
            selector: Some([("app".to_string(), "web".to_string())].into()),
            cluster_ips: vec!["10.96.0.11".parse().unwrap()],
            ..(*c.services["shop/reviews"]).clone()
        })));
        let first = Compiled::new(&c, &mesh, None);
        let key = |name: &str| (api::Kind::Service as i32, format!("shop/{name}"));
        let recompiled = |before: &Compiled, after: &Compiled, name: &str| {
            let changed = after.changed.as_ref().unwrap();
            let ptr = !Arc::ptr_eq(&before.shared[&key(name)], &after.shared[&key(name)]);
            assert_eq!(ptr, changed.shared.contains(&key(name)), "{name}");
            ptr
        };

        // A new reviews pod: reviews gets it, web is not compiled again.
        let mut c2 = c.clone();
        c2.insert(pod("eeeee", "shop", "n2", &[("app", "reviews")]));
        let second = Compiled::new(&c2, &mesh, Some(&first));
        assert!(recompiled(&first, &second, "reviews"));
        assert!(!recompiled(&first, &second, "web"));
        let api::resource::Resource::Service(svc) =
            second.shared[&key("reviews")].resource.as_ref().unwrap()
        else {
            panic!("not a service");
        };
        assert_eq!(svc.endpoints.len(), 3);

        // A VirtualService for web: web's routes change; reviews is compiled again (routing
        // inputs changed) and, being equal, stays the same resource.
        let mut c3 = c2.clone();
        c3.insert(Object::Policy(Arc::new(crate::istio::PolicyObject {
            kind: "VirtualService",
            namespace: "shop".into(),
            name: "web".into(),
            spec: serde_json::json!({
                "hosts": ["web"],
                "http": [{"route": [{"destination": {"host": "web"}}], "timeout": "2s"}]
            }),
        })));
        let third = Compiled::new(&c3, &mesh, Some(&second));
        assert!(recompiled(&second, &third, "web"));
        assert!(!recompiled(&second, &third, "reviews"));

        // The namespace leaves the mesh: endpoints are no longer in it, though no pod changed.
        let mut c4 = c3.clone();
        c4.namespaces.get_mut("shop").unwrap().remove(MESH_LABEL);
        let fourth = Compiled::new(&c4, &mesh, Some(&third));
        assert!(recompiled(&third, &fourth, "reviews"));
    }

    #[test]
    fn protocols_from_app_protocol_then_name() {
        assert_eq!(protocol(Some("grpc"), "tcp-x"), api::Protocol::Grpc);
        assert_eq!(protocol(None, "http2-web"), api::Protocol::Http2);
        assert_eq!(protocol(None, "http"), api::Protocol::Http);
        assert_eq!(protocol(None, "metrics"), api::Protocol::Tcp);
    }
}

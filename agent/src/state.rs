//! What the proxy knows of the mesh, rebuilt from control's config on every update: services by
//! VIP and port, workloads by IP, and each local pod's PeerAuthentication mode. Connections read
//! one immutable snapshot; the config follower is its only writer.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, LazyLock, OnceLock,
        atomic::{AtomicUsize, Ordering},
    },
};

use hyper::{HeaderMap, Method};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use trellis_api as api;
use trellis_common::HBONE_PORT;

use crate::{
    authz::{PodPolicies, Policy as AuthzPolicy},
    config::NodeConfig,
    http_route::{self, Destination, HttpRoute, Policy, TrafficPolicy},
    metrics::Label,
    proxy::{ServerTls, TlsOrigination, best_host},
};

/// The namespace whose selector-less PeerAuthentication and AuthorizationPolicy apply mesh-wide
/// (as Istio's root namespace), when control names none.
pub const ROOT_NAMESPACE: &str = "trellis-system";

/// How many `tcp` routes one connection may follow (a route to a service with its own route).
const MAX_ROUTE_HOPS: u8 = 4;

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Workload {
    pub name: Label,
    pub namespace: Label,
    /// The SPIFFE ID, when the pod is in the mesh (reached over HBONE).
    pub identity: Option<String>,
    pub node: Label,
    /// The `app` and `version` labels, for metrics.
    pub app: Label,
    pub version: Label,
    /// Istio's canonical service and revision (Kiali groups its graph by them).
    pub canonical_service: Label,
    pub canonical_revision: Label,
    /// The pod's labels, for DestinationRule subsets.
    #[serde(skip)]
    pub labels: BTreeMap<String, String>,
}

impl Workload {
    /// A workload named `name` (Istio's workload name: a Deployment's, not its pod's), its metric labels read from the pod's `labels` as Istio reads
    /// them.
    pub fn new(
        name: &str,
        namespace: &str,
        identity: Option<String>,
        node: &str,
        labels: &std::collections::HashMap<String, String>,
    ) -> Self {
        let first = |keys: &[&str], default: &str| {
            keys.iter()
                .find_map(|k| labels.get(*k))
                .map_or(default, String::as_str)
                .into()
        };
        Self {
            name: name.into(),
            namespace: namespace.into(),
            identity,
            node: node.into(),
            app: first(&["app"], name),
            version: first(&["version"], "unknown"),
            canonical_service: first(
                &[
                    "service.istio.io/canonical-name",
                    "app.kubernetes.io/name",
                    "app",
                ],
                name,
            ),
            canonical_revision: first(
                &[
                    "service.istio.io/canonical-revision",
                    "app.kubernetes.io/version",
                    "version",
                ],
                "latest",
            ),
            labels: labels.clone().into_iter().collect(),
        }
    }
}

/// `name`, or `fallback` when control left it empty (an older control, a pods file).
fn or<'a>(name: &'a str, fallback: &'a str) -> &'a str {
    if name.is_empty() { fallback } else { name }
}

#[derive(Debug, Serialize)]
pub struct Endpoint {
    pub workload: Arc<Workload>,
    pub ip: IpAddr,
    pub port: u16,
}

#[derive(Debug, Serialize)]
pub struct ServicePort {
    pub namespace: String,
    pub name: String,
    /// The DNS name: `<name>.<namespace>.svc.cluster.local`, or a ServiceEntry's host.
    fqdn: String,
    pub port: u16,
    /// Declared HTTP, HTTP/2 or gRPC (appProtocol or port name): proxied per request on the
    /// client's node.
    pub http: bool,
    /// Declared HTTP/2 or gRPC: a gateway speaks HTTP/2 to it whatever its client spoke.
    pub http2: bool,
    /// VirtualService routes (HTTP ports); none: every request balanced over all endpoints.
    pub routes: Vec<HttpRoute>,
    /// From the service's DestinationRule.
    pub traffic: TrafficPolicy,
    pub endpoints: Vec<Endpoint>,
    /// ServiceEntry endpoints named by host (resolution DNS), with their ports.
    pub resolve: Vec<(String, u16)>,
    /// ServiceEntry resolution NONE: connections go where the app sent them.
    pub original_destination: bool,
    /// A mesh-bound VirtualService `tcp` route for this port: connections go to its
    /// destinations instead of this service's endpoints.
    pub tcp_route: Option<TcpRoute>,
    /// TLS to originate to endpoints outside the mesh (DestinationRule `tls.mode: SIMPLE`).
    pub tls: Option<Arc<TlsOrigination>>,
    /// ServiceEntry `exportTo`: the namespaces whose pods see it; empty: all.
    pub export_to: Vec<String>,
    /// Where requests go when no route names a destination.
    #[serde(skip)]
    default_target: Resolved,
    #[serde(skip)]
    next: AtomicUsize,
}

/// A VirtualService `tcp` route: destination services by weight (subsets are not applied).
#[derive(Debug, Serialize)]
pub struct TcpRoute {
    pub name: String,
    pub destinations: Vec<Destination>,
}

impl TcpRoute {
    fn compile(r: &api::TcpRoute) -> Self {
        Self {
            name: r.name.clone(),
            destinations: r.destinations.iter().map(http_route::destination).collect(),
        }
    }
}

/// A server port of a Gateway that selects a local pod: where connections to it go.
#[derive(Debug, Serialize)]
pub struct GatewayPort {
    /// `namespace/name` of the Gateway.
    pub gateway: String,
    pub mode: GatewayMode,
    /// TCP: None when no VirtualService bound to the Gateway routes this port.
    pub route: Option<TcpRoute>,
    /// TLS to terminate first (HTTPS, TLS `mode: SIMPLE`).
    pub tls: Option<Arc<ServerTls>>,
    /// HTTP: routes by the request's Host.
    pub virtual_hosts: Vec<VirtualHost>,
    /// TLS passed through: routes by SNI.
    pub sni_routes: Vec<SniRoute>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum GatewayMode {
    Tcp,
    Http,
    TlsPassthrough,
}

impl GatewayPort {
    fn compile(g: &api::GatewayPort) -> Self {
        let mode = match api::GatewayMode::try_from(g.mode) {
            Ok(api::GatewayMode::Http) => GatewayMode::Http,
            Ok(api::GatewayMode::TlsPassthrough) => GatewayMode::TlsPassthrough,
            _ => GatewayMode::Tcp,
        };
        Self {
            gateway: g.gateway.clone(),
            mode,
            route: g.route.as_ref().map(TcpRoute::compile),
            tls: (!g.certificates.is_empty()).then(|| {
                Arc::new(ServerTls::compile(
                    &g.certificates,
                    mode == GatewayMode::Http,
                ))
            }),
            virtual_hosts: g
                .virtual_hosts
                .iter()
                .map(|v| VirtualHost {
                    hosts: v.hosts.clone(),
                    // NodeConfig::apply checked that these compile.
                    routes: v
                        .routes
                        .iter()
                        .filter_map(|r| HttpRoute::compile(r).ok())
                        .collect(),
                })
                .collect(),
            sni_routes: g
                .sni_routes
                .iter()
                .filter_map(|r| {
                    Some(SniRoute {
                        hosts: r.sni_hosts.clone(),
                        route: TcpRoute::compile(r.route.as_ref()?),
                    })
                })
                .collect(),
        }
    }

    /// Connections are spliced as they come (no TLS to terminate, no request to route).
    pub fn plain_tcp(&self) -> bool {
        self.mode == GatewayMode::Tcp && self.tls.is_none()
    }
}

/// A gateway's `http` routes for some hosts.
#[derive(Debug, Serialize)]
pub struct VirtualHost {
    pub hosts: Vec<String>,
    pub routes: Vec<HttpRoute>,
}

/// A gateway's `tls` route for some SNI names.
#[derive(Debug, Serialize)]
pub struct SniRoute {
    pub hosts: Vec<String>,
    pub route: TcpRoute,
}

/// Where an HTTP request came in: to a service port (its VIP and port), or to a local gateway
/// pod's server port (the pod's address and port).
#[derive(Debug, Clone, Copy)]
pub enum HttpEntry {
    Service(SocketAddr),
    Gateway(SocketAddr),
}

impl HttpEntry {
    pub fn addr(self) -> SocketAddr {
        match self {
            Self::Service(a) | Self::Gateway(a) => a,
        }
    }
}

impl ServicePort {
    /// `<name>.<namespace>.svc.cluster.local` or the ServiceEntry host, as Istio's
    /// `destination_service`.
    pub fn host(&self) -> String {
        self.fqdn.clone()
    }

    /// Whether pods in `ns` see it (ServiceEntry `exportTo`).
    pub fn visible_to(&self, ns: &str) -> bool {
        self.export_to.is_empty() || self.export_to.iter().any(|n| n == ns)
    }
}

/// Inbound plaintext handling for a local pod and port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum MtlsMode {
    Unset,
    Disable,
    Permissive,
    Strict,
}

#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct PeerAuth {
    /// The pod's mode (PERMISSIVE when nothing says otherwise).
    pub mode: Option<MtlsMode>,
    pub ports: BTreeMap<u16, MtlsMode>,
}

impl PeerAuth {
    pub fn strict(&self) -> bool {
        self.mode == Some(MtlsMode::Strict)
    }

    /// Whether plaintext to `port` must be refused.
    pub fn refuses_plaintext(&self, port: u16) -> bool {
        self.ports.get(&port).copied().or(self.mode) == Some(MtlsMode::Strict)
    }
}

/// Where one HTTP request may go and what its route does to it.
#[derive(Debug)]
pub struct HttpDecision {
    pub target: Arc<Target>,
    pub policy: Arc<Policy>,
    /// The uri prefix the route matched on, if it was a prefix match (for `rewrite.uri`).
    pub matched_prefix: Option<String>,
    /// Where this request's copy goes, when the route mirrors it.
    pub mirror: Option<Arc<Target>>,
}

/// A destination's endpoints and how to balance over them.
#[derive(Debug)]
pub struct Target {
    /// `namespace/name:port/subset`: what balancing state and connection limits are kept by.
    pub cluster: String,
    /// The destination service's host name.
    pub service: String,
    /// As Istio's Envoy names clusters in access logs and spans: `outbound|PORT|SUBSET|HOST`.
    pub envoy_cluster: String,
    pub candidates: Vec<Candidate>,
    pub traffic: TrafficPolicy,
    /// The destination port is declared HTTP/2 or gRPC.
    pub http2: bool,
}

impl Target {
    fn of(
        svc: &ServicePort,
        subset: &str,
        labels: &BTreeMap<String, String>,
        subset_traffic: Option<&TrafficPolicy>,
        vip: SocketAddr,
    ) -> Result<Self, HttpRefusal> {
        let candidates: Vec<Candidate> = svc
            .endpoints
            .iter()
            .filter(|e| e.ip.is_ipv4() == vip.is_ipv4())
            .filter(|e| {
                labels
                    .iter()
                    .all(|(k, v)| e.workload.labels.get(k) == Some(v))
            })
            .map(|e| Candidate {
                addr: SocketAddr::new(e.ip, e.port),
                workload: e.workload.clone(),
            })
            .collect();
        if candidates.is_empty() {
            return Err(HttpRefusal::NoUpstream(format!(
                "{}/{} subset {subset:?} has no endpoint",
                svc.namespace, svc.name
            )));
        }
        Ok(Self {
            cluster: format!("{}/{}:{}/{subset}", svc.namespace, svc.name, svc.port),
            envoy_cluster: format!("outbound|{}|{subset}|{}", svc.port, svc.fqdn),
            service: svc.host(),
            candidates,
            traffic: subset_traffic.unwrap_or(&svc.traffic).clone(),
            http2: svc.http2,
        })
    }
}

/// An endpoint a request may go to.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub addr: SocketAddr,
    pub workload: Arc<Workload>,
}

impl Candidate {
    pub fn route(&self, service: &str) -> Route {
        to(
            self.addr,
            Some(self.workload.clone()),
            Some(service.to_owned()),
            None,
        )
    }
}

/// The [`Target`] a route destination (or a service without routes) resolves to, made on the
/// first request in each address family and kept for the life of the snapshot that holds it:
/// endpoints do not change within a snapshot, so later requests share it instead of building
/// the endpoint list and names again.
#[derive(Debug, Default, Clone)]
pub struct Resolved([OnceLock<(u16, Resolution)>; 2]);

type Resolution = Result<Arc<Target>, HttpRefusal>;

impl Resolved {
    /// The target for requests to `port` in `vip`'s family, from `make` the first time. A
    /// destination serves one port, so `port` differing from the kept one only bypasses the memo.
    fn get(
        &self,
        vip: SocketAddr,
        port: u16,
        make: impl FnOnce() -> Result<Target, HttpRefusal>,
    ) -> Resolution {
        let slot = &self.0[usize::from(vip.is_ipv6())];
        if let Some((kept, target)) = slot.get()
            && *kept == port
        {
            return target.clone();
        }
        let made = make().map(Arc::new);
        let _ = slot.set((port, made.clone()));
        made
    }
}

/// Why an HTTP request has nowhere to go.
#[derive(Debug, Clone)]
pub enum HttpRefusal {
    /// The service has routes and none matches (Istio answers 404).
    NoRoute,
    /// The chosen destination has no endpoint (503, Envoy's "no healthy upstream").
    NoUpstream(String),
}

/// Where an outbound connection goes.
#[derive(Debug)]
pub enum Route {
    /// To a mesh endpoint: HBONE to its `<pod IP>:15008`, asking for `target`.
    Hbone {
        hbone: SocketAddr,
        target: SocketAddr,
        identity: String,
        workload: Arc<Workload>,
        service: Option<String>,
    },
    /// Plain TCP to `addr` (a pod outside the mesh, or a destination outside the cluster),
    /// with TLS originated when the destination's DestinationRule says so.
    Passthrough {
        addr: SocketAddr,
        workload: Option<Arc<Workload>>,
        service: Option<String>,
        tls: Option<Arc<TlsOrigination>>,
    },
    /// Plain TCP to `host` (a ServiceEntry endpoint with resolution DNS), resolved now in
    /// `dst`'s family by the pod's resolver.
    Resolve {
        host: String,
        port: u16,
        v4: bool,
        service: String,
        tls: Option<Arc<TlsOrigination>>,
    },
    /// A service with no endpoint for this address family.
    NoEndpoints { service: String },
}

impl Route {
    /// The destination service's host name, `unknown` when the destination is no service.
    pub fn service(&self) -> &str {
        match self {
            Self::Hbone { service, .. } | Self::Passthrough { service, .. } => {
                service.as_deref().unwrap_or("unknown")
            }
            Self::Resolve { service, .. } | Self::NoEndpoints { service } => service,
        }
    }
}

#[derive(Debug, Default, Serialize)]
pub struct MeshState {
    pub version: u64,
    pub trust_domain: String,
    /// By VIP and service port.
    pub services: HashMap<SocketAddr, Arc<ServicePort>>,
    /// The same, by `namespace/name` and service port (route destinations name services).
    #[serde(skip)]
    by_name: HashMap<(String, u16), Arc<ServicePort>>,
    /// Every pod control told us of (endpoints anywhere, workloads here), by IP.
    pub workloads: HashMap<IpAddr, Arc<Workload>>,
    /// Local pods' PeerAuthentication, by pod UID.
    pub peer_auth: HashMap<String, PeerAuth>,
    /// The AuthorizationPolicies that select each local pod, by pod UID (none: absent).
    pub authz: HashMap<String, Arc<PodPolicies>>,
    /// Local pods whose outbound traffic policy is REGISTRY_ONLY, by UID.
    pub registry_only: HashSet<String>,
    /// Every address the mesh knows (pods, Service VIPs, ServiceEntry addresses and endpoint
    /// IPs): what REGISTRY_ONLY pods may reach.
    pub registry: BTreeSet<IpNet>,
    /// Local pods' addresses and ports that a service declares HTTP/1 (served at L7 inbound).
    pub http_ports: HashSet<SocketAddr>,
    /// Local pods' addresses and ports by the Service that selects them there (the first by
    /// host name when several do): what the destination side reports as `destination_service`,
    /// since the tunnel names only the pod.
    #[serde(skip)]
    pub served: HashMap<SocketAddr, Arc<ServicePort>>,
    /// Service and ServiceEntry host names and their virtual addresses (the agent's DNS).
    pub dns: crate::dns::Names,
    /// Local gateway pods' server ports, by pod address and port.
    pub gateways: HashMap<SocketAddr, Arc<GatewayPort>>,
}

impl MeshState {
    pub fn build(cfg: &NodeConfig, node: &str) -> Self {
        let root = if cfg.root_namespace.is_empty() {
            ROOT_NAMESPACE
        } else {
            &cfg.root_namespace
        };
        let mut workloads: HashMap<IpAddr, Arc<Workload>> = HashMap::new();
        let local: Vec<&api::Workload> = cfg.workloads().collect();
        for w in cfg.workloads().chain(cfg.peers()) {
            let info = Arc::new(Workload::new(
                or(&w.workload_name, &w.name),
                &w.namespace,
                Some(w.identity.clone()),
                if w.node.is_empty() { node } else { &w.node },
                &w.labels,
            ));
            for ip in w.ips.iter().filter_map(|ip| ip.parse().ok()) {
                workloads.insert(ip, info.clone());
            }
        }
        let local_ips: HashSet<IpAddr> = local
            .iter()
            .flat_map(|w| w.ips.iter().filter_map(|ip| ip.parse().ok()))
            .collect();
        let mut http_ports = HashSet::new();
        let mut served: HashMap<SocketAddr, Arc<ServicePort>> = HashMap::new();
        let mut services = HashMap::new();
        let mut by_name = HashMap::new();
        for s in cfg.services() {
            // A ServiceEntry's endpoints are no pods: metrics name them "unknown", as Istio does.
            let external = !s.host.is_empty();
            let eps: Vec<(Arc<Workload>, &api::Endpoint)> = s
                .endpoints
                .iter()
                .map(|e| {
                    let name = if external {
                        "unknown"
                    } else {
                        or(&e.workload_name, &e.pod_name)
                    };
                    let info = Arc::new(Workload::new(
                        name,
                        if external { "unknown" } else { &s.namespace },
                        e.in_mesh.then(|| e.identity.clone()),
                        &e.node,
                        &e.labels,
                    ));
                    if !external {
                        for ip in e.ips.iter().filter_map(|ip| ip.parse().ok()) {
                            workloads.entry(ip).or_insert_with(|| info.clone());
                        }
                    }
                    (info, e)
                })
                .collect();
            let fqdn = if external {
                s.host.clone()
            } else {
                format!("{}.{}.svc.cluster.local", s.name, s.namespace)
            };
            for p in &s.ports {
                let Ok(port) = u16::try_from(p.port) else {
                    continue;
                };
                let endpoints: Vec<Endpoint> = eps
                    .iter()
                    .flat_map(|(info, e)| {
                        let target = e.ports.get(&p.name).copied().unwrap_or(p.target_port);
                        e.ips.iter().filter_map(move |ip| {
                            Some(Endpoint {
                                workload: info.clone(),
                                ip: ip.parse().ok()?,
                                port: u16::try_from(target).ok()?,
                            })
                        })
                    })
                    .collect();
                let resolve = eps
                    .iter()
                    .filter(|(_, e)| !e.hostname.is_empty())
                    .filter_map(|(_, e)| {
                        let target = e.ports.get(&p.name).copied().unwrap_or(p.target_port);
                        Some((e.hostname.clone(), u16::try_from(target).ok()?))
                    })
                    .collect();
                let protocol = api::Protocol::try_from(p.protocol);
                let http = protocol.is_ok_and(api::Protocol::is_http);
                let http2 = matches!(protocol, Ok(api::Protocol::Http2 | api::Protocol::Grpc));
                if http {
                    http_ports.extend(
                        endpoints
                            .iter()
                            .filter(|e| local_ips.contains(&e.ip))
                            .map(|e| SocketAddr::new(e.ip, e.port)),
                    );
                }
                let sp = Arc::new(ServicePort {
                    namespace: s.namespace.clone(),
                    name: s.name.clone(),
                    fqdn: fqdn.clone(),
                    port,
                    http,
                    http2,
                    // NodeConfig::apply checked that these compile.
                    routes: p
                        .http_routes
                        .iter()
                        .filter_map(|r| HttpRoute::compile(r).ok())
                        .collect(),
                    traffic: TrafficPolicy::compile(p.traffic_policy.as_ref()),
                    endpoints,
                    resolve,
                    original_destination: s.original_destination,
                    tcp_route: p.tcp_route.as_ref().map(TcpRoute::compile),
                    tls: p
                        .traffic_policy
                        .as_ref()
                        .and_then(|t| t.tls.as_ref())
                        .map(|t| Arc::new(TlsOrigination::compile(t))),
                    export_to: s.export_to.clone(),
                    default_target: Resolved::default(),
                    next: AtomicUsize::new(0),
                });
                for vip in s.vips.iter().filter_map(|v| v.parse::<IpAddr>().ok()) {
                    services.insert(SocketAddr::new(vip, port), sp.clone());
                }
                for e in sp.endpoints.iter().filter(|e| local_ips.contains(&e.ip)) {
                    served
                        .entry(SocketAddr::new(e.ip, e.port))
                        .and_modify(|had| {
                            if sp.fqdn < had.fqdn {
                                *had = sp.clone();
                            }
                        })
                        .or_insert_with(|| sp.clone());
                }
                by_name.insert((format!("{}/{}", s.namespace, s.name), port), sp);
            }
        }
        let policies: Vec<(String, PeerAuthSpec)> = cfg
            .policies()
            .filter(|p| p.kind == "PeerAuthentication")
            .filter_map(|p| {
                Some((
                    p.namespace.clone(),
                    serde_json::from_str(&p.spec_json).ok()?,
                ))
            })
            .collect();
        let peer_auth = local
            .iter()
            .map(|w| {
                (
                    w.uid.clone(),
                    peer_auth_for(&policies, root, &w.namespace, &w.labels),
                )
            })
            .collect();
        // NodeConfig::apply checked that these compile.
        let authz_policies: Vec<Arc<AuthzPolicy>> = cfg
            .policies()
            .filter(|p| p.kind == "AuthorizationPolicy")
            .filter_map(|p| AuthzPolicy::compile(&p.namespace, &p.name, &p.spec_json).ok())
            .map(Arc::new)
            .collect();
        let authz = local
            .iter()
            .map(|w| {
                let selected = PodPolicies::select(&authz_policies, root, &w.namespace, &w.labels);
                (w.uid.clone(), Arc::new(selected))
            })
            .filter(|(_, p)| !p.is_empty())
            .collect();
        let registry_only = local
            .iter()
            .filter(|w| w.registry_only)
            .map(|w| w.uid.clone())
            .collect();
        let registry = workloads
            .keys()
            .copied()
            .chain(services.keys().map(SocketAddr::ip))
            .map(IpNet::from)
            .chain(
                cfg.policies()
                    .filter(|p| p.kind == "ServiceEntry")
                    .flat_map(|p| service_entry_nets(&p.spec_json)),
            )
            .collect();
        let mut gateways = HashMap::new();
        for w in &local {
            for g in &w.gateway_ports {
                let Ok(port) = u16::try_from(g.port) else {
                    continue;
                };
                let compiled = Arc::new(GatewayPort::compile(g));
                for ip in w.ips.iter().filter_map(|ip| ip.parse::<IpAddr>().ok()) {
                    gateways.insert(SocketAddr::new(ip, port), compiled.clone());
                }
            }
        }
        let mut dns = crate::dns::Names::default();
        for (vip, svc) in &services {
            dns.add(&svc.fqdn, vip.ip());
            dns.export(&svc.fqdn, &svc.export_to);
        }
        Self {
            version: cfg.version,
            trust_domain: cfg.trust_domain.clone(),
            services,
            by_name,
            workloads,
            peer_auth,
            authz,
            registry_only,
            registry,
            http_ports,
            served,
            dns,
            gateways,
        }
    }

    /// The service at `dst` as pods in `ns` see it (a ServiceEntry not exported to `ns` is
    /// not there for them).
    pub fn service(&self, dst: SocketAddr, ns: &str) -> Option<&Arc<ServicePort>> {
        self.services.get(&dst).filter(|s| s.visible_to(ns))
    }

    /// Where a connection from a pod in `ns` to `dst` goes; services are balanced round robin.
    pub fn route(&self, dst: SocketAddr, ns: &str) -> Route {
        match self.service(dst, ns) {
            Some(svc) => self.route_service(svc, dst, MAX_ROUTE_HOPS),
            None => to(dst, self.workloads.get(&dst.ip()).cloned(), None, None),
        }
    }

    /// Where a connection to a local gateway pod's server port `target` goes: None when
    /// `target` is no gateway port (the connection is for the pod's app).
    pub fn gateway_route(&self, target: SocketAddr) -> Option<Route> {
        let g = self.gateways.get(&target)?;
        Some(match &g.route {
            // The gateway's own routes only: the mesh's route for the destination (the one
            // that sent the client here) does not apply at the gateway.
            Some(r) => self.follow(r, target, 0),
            None => Route::NoEndpoints {
                service: format!("gateway {} port {}", g.gateway, target.port()),
            },
        })
    }

    /// Where a connection to a local gateway pod's TLS passthrough port `target` goes, by the
    /// SNI it asked for.
    pub fn gateway_sni_route(&self, target: SocketAddr, sni: Option<&str>) -> Route {
        let g = self.gateways.get(&target);
        match g
            .zip(sni)
            .and_then(|(g, sni)| best_host(&g.sni_routes, |r| &r.hosts, sni))
        {
            Some(r) => self.follow(&r.route, target, 0),
            None => Route::NoEndpoints {
                service: format!(
                    "{} port {}: no tls route for SNI {}",
                    g.map_or("no gateway", |g| &g.gateway),
                    target.port(),
                    sni.unwrap_or("(none)")
                ),
            },
        }
    }

    /// A `tcp` route's destination, picked by weight, then (while `hops` allow) that service's
    /// own route.
    fn follow(&self, r: &TcpRoute, dst: SocketAddr, hops: u8) -> Route {
        let Some(d) = http_route::pick(&r.destinations) else {
            return Route::NoEndpoints {
                service: format!("route {} (every weight 0)", r.name),
            };
        };
        let (service, port) = (&d.service, if d.port == 0 { dst.port() } else { d.port });
        match self.by_name.get(&(service.clone(), port)) {
            Some(next) => self.route_service(next, dst, hops),
            None => Route::NoEndpoints {
                service: format!("{service} port {port}"),
            },
        }
    }

    /// `hops` bounds chains of routes (a route to a service that has its own route).
    fn route_service(&self, svc: &ServicePort, dst: SocketAddr, hops: u8) -> Route {
        if let Some(r) = &svc.tcp_route
            && hops > 0
        {
            return self.follow(r, dst, hops - 1);
        }
        if svc.original_destination {
            return Route::Passthrough {
                addr: dst,
                workload: None,
                service: Some(svc.host()),
                tls: svc.tls.clone(),
            };
        }
        if !svc.resolve.is_empty() {
            let (host, port) =
                &svc.resolve[svc.next.fetch_add(1, Ordering::Relaxed) % svc.resolve.len()];
            return Route::Resolve {
                host: host.clone(),
                port: *port,
                v4: dst.is_ipv4(),
                service: svc.host(),
                tls: svc.tls.clone(),
            };
        }
        let family: Vec<&Endpoint> = svc
            .endpoints
            .iter()
            .filter(|e| e.ip.is_ipv4() == dst.is_ipv4())
            .collect();
        if family.is_empty() {
            return Route::NoEndpoints {
                service: svc.host(),
            };
        }
        let e = family[svc.next.fetch_add(1, Ordering::Relaxed) % family.len()];
        to(
            SocketAddr::new(e.ip, e.port),
            Some(e.workload.clone()),
            Some(svc.host()),
            svc.tls.clone(),
        )
    }

    /// Where one HTTP request may go: the first matching route (of the service, or of the
    /// gateway's virtual host for `host`), a destination by weight, and that destination's
    /// endpoints (its subset, the entry's family); the proxy picks one with the traffic policy
    /// and what it knows of their health.
    pub fn route_http(
        &self,
        entry: HttpEntry,
        host: &str,
        method: &Method,
        path: &str,
        headers: &HeaderMap,
    ) -> Result<HttpDecision, HttpRefusal> {
        let vip = entry.addr();
        let routes = match entry {
            HttpEntry::Service(vip) => {
                let svc = self
                    .services
                    .get(&vip)
                    .ok_or_else(|| HttpRefusal::NoUpstream(format!("{vip} is not a service")))?;
                if svc.routes.is_empty() {
                    static NO_POLICY: LazyLock<Arc<Policy>> = LazyLock::new(Default::default);
                    return Ok(HttpDecision {
                        target: svc.default_target.get(vip, vip.port(), || {
                            Target::of(svc, "", &BTreeMap::new(), None, vip)
                        })?,
                        policy: NO_POLICY.clone(),
                        matched_prefix: None,
                        mirror: None,
                    });
                }
                &svc.routes
            }
            // A Host no VirtualService bound to the gateway serves: 404, as Istio's gateway.
            HttpEntry::Gateway(addr) => {
                let g = self.gateways.get(&addr).ok_or(HttpRefusal::NoRoute)?;
                let host = host.rsplit_once(':').map_or(host, |(h, port)| {
                    if port.bytes().all(|b| b.is_ascii_digit()) {
                        h
                    } else {
                        host
                    }
                });
                &best_host(&g.virtual_hosts, |v| &v.hosts, host)
                    .ok_or(HttpRefusal::NoRoute)?
                    .routes
            }
        };
        let (route, matched_prefix) = routes
            .iter()
            .find_map(|r| Some((r, r.matched(method, path, headers)?)))
            .ok_or(HttpRefusal::NoRoute)?;
        let dst = route.pick().ok_or_else(|| {
            HttpRefusal::NoUpstream(format!("route {}: every weight is 0", route.name))
        })?;
        let mirror = route
            .policy
            .mirror
            .as_ref()
            .filter(|(_, percent)| fastrand::f64() * 100.0 < *percent)
            .and_then(|(m, _)| self.target(m, vip).ok());
        Ok(HttpDecision {
            target: self.target(dst, vip)?,
            policy: route.policy.clone(),
            matched_prefix: matched_prefix.map(str::to_owned),
            mirror,
        })
    }

    /// A route destination's endpoints, for requests that came to `vip`.
    fn target(&self, dst: &Destination, vip: SocketAddr) -> Result<Arc<Target>, HttpRefusal> {
        let port = if dst.port == 0 { vip.port() } else { dst.port };
        dst.resolved.get(vip, port, || {
            let svc = self
                .by_name
                .get(&(dst.service.clone(), port))
                .ok_or_else(|| {
                    HttpRefusal::NoUpstream(format!("{} has no port {port}", dst.service))
                })?;
            Target::of(
                svc,
                &dst.subset,
                &dst.subset_labels,
                dst.traffic.as_ref(),
                vip,
            )
        })
    }

    pub fn peer_auth(&self, uid: &str) -> PeerAuth {
        self.peer_auth.get(uid).cloned().unwrap_or_default()
    }

    /// The AuthorizationPolicies that select a local pod; None when there are none.
    pub fn authz(&self, uid: &str) -> Option<Arc<PodPolicies>> {
        self.authz.get(uid).cloned()
    }
}

fn to(
    addr: SocketAddr,
    workload: Option<Arc<Workload>>,
    service: Option<String>,
    tls: Option<Arc<TlsOrigination>>,
) -> Route {
    match workload {
        Some(w) if w.identity.is_some() => Route::Hbone {
            hbone: SocketAddr::new(addr.ip(), HBONE_PORT),
            target: addr,
            identity: w.identity.clone().unwrap_or_default(),
            workload: w,
            service,
        },
        workload => Route::Passthrough {
            addr,
            workload,
            service,
            tls,
        },
    }
}

/// A ServiceEntry's `addresses` and its endpoints' IP addresses (endpoints named by host name
/// need DNS, which the agent does not do yet).
fn service_entry_nets(spec_json: &str) -> Vec<IpNet> {
    #[derive(Deserialize)]
    struct Spec {
        #[serde(default)]
        addresses: Vec<String>,
        #[serde(default)]
        endpoints: Vec<Endpoint>,
    }
    #[derive(Deserialize)]
    struct Endpoint {
        #[serde(default)]
        address: String,
    }
    let Ok(spec) = serde_json::from_str::<Spec>(spec_json) else {
        return Vec::new();
    };
    spec.addresses
        .iter()
        .chain(spec.endpoints.iter().map(|e| &e.address))
        .filter_map(|a| {
            a.parse::<IpNet>()
                .ok()
                .or_else(|| a.parse::<IpAddr>().ok().map(IpNet::from))
        })
        .collect()
}

/// The part of a validated PeerAuthentication the proxy acts on.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PeerAuthSpec {
    #[serde(default)]
    selector: Option<Selector>,
    #[serde(default)]
    mtls: Option<ModeSpec>,
    #[serde(default)]
    port_level_mtls: BTreeMap<String, ModeSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Selector {
    #[serde(default)]
    match_labels: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
struct ModeSpec {
    mode: MtlsMode,
}

/// Istio's precedence: a selector policy in the pod's namespace, then the namespace's policy,
/// then the mesh-wide one; UNSET defers to the next level; PERMISSIVE when none decides.
fn peer_auth_for(
    policies: &[(String, PeerAuthSpec)],
    root: &str,
    namespace: &str,
    labels: &std::collections::HashMap<String, String>,
) -> PeerAuth {
    let selects = |p: &PeerAuthSpec| {
        p.selector
            .as_ref()
            .is_some_and(|s| s.match_labels.iter().all(|(k, v)| labels.get(k) == Some(v)))
    };
    let workload = policies
        .iter()
        .find(|(ns, p)| ns == namespace && selects(p))
        .map(|(_, p)| p);
    let namespace_wide = policies
        .iter()
        .find(|(ns, p)| ns == namespace && p.selector.is_none())
        .map(|(_, p)| p);
    let mesh = policies
        .iter()
        .find(|(ns, p)| ns == root && p.selector.is_none())
        .map(|(_, p)| p);
    let decided = |p: Option<&PeerAuthSpec>| {
        p.and_then(|p| p.mtls.as_ref())
            .map(|m| m.mode)
            .filter(|m| *m != MtlsMode::Unset)
    };
    let mode = decided(workload)
        .or(decided(namespace_wide))
        .or(decided(mesh))
        .or(Some(MtlsMode::Permissive));
    let ports = workload
        .map(|p| {
            p.port_level_mtls
                .iter()
                .filter_map(|(port, m)| Some((port.parse().ok()?, m.mode)))
                .filter(|(_, m)| *m != MtlsMode::Unset)
                .collect()
        })
        .unwrap_or_default();
    PeerAuth { mode, ports }
}

#[cfg(test)]
mod tests {
    use super::*;
    use api::resource::Resource;

    fn policy(ns: &str, name: &str, spec: serde_json::Value) -> api::Resource {
        api::Resource {
            resource: Some(Resource::Policy(api::Policy {
                kind: "PeerAuthentication".into(),
                namespace: ns.into(),
                name: name.into(),
                spec_json: spec.to_string(),
            })),
        }
    }

    fn config() -> NodeConfig {
        let mut cfg = NodeConfig::default();
        let web = api::Workload {
            uid: "u-web".into(),
            namespace: "shop".into(),
            name: "web".into(),
            ips: vec!["10.244.1.10".into()],
            labels: [("app".to_owned(), "web".to_owned())].into(),
            identity: "spiffe://cluster.local/ns/shop/sa/web".into(),
            ..Default::default()
        };
        let endpoint = |name: &str, ip: &str, in_mesh| api::Endpoint {
            pod_name: name.into(),
            ips: vec![ip.into()],
            node: "n2".into(),
            in_mesh,
            identity: format!("spiffe://cluster.local/ns/shop/sa/{name}"),
            ports: [("http".to_owned(), 9080)].into(),
            ..Default::default()
        };
        let svc = api::Service {
            namespace: "shop".into(),
            name: "reviews".into(),
            vips: vec!["10.96.0.20".into()],
            ports: vec![api::ServicePort {
                name: "http".into(),
                port: 80,
                target_port: 9080,
                ..Default::default()
            }],
            endpoints: vec![
                endpoint("reviews-v1", "10.244.2.10", true),
                endpoint("legacy", "10.244.2.11", false),
            ],
            ..Default::default()
        };
        let port = |n: u32| api::ServicePort {
            name: "tcp".into(),
            port: n,
            target_port: n,
            ..Default::default()
        };
        // ServiceEntry hosts: resolution DNS at an allocated address, and resolution NONE.
        let redis = api::Service {
            namespace: "shop".into(),
            name: "redis.example".into(),
            host: "redis.example".into(),
            vips: vec!["240.240.0.9".into()],
            ports: vec![port(6379)],
            endpoints: vec![api::Endpoint {
                hostname: "redis.example".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        let any = api::Service {
            namespace: "shop".into(),
            name: "db.example".into(),
            host: "db.example".into(),
            vips: vec!["192.0.2.5".into()],
            ports: vec![port(5432)],
            original_destination: true,
            ..Default::default()
        };
        cfg.apply(&api::ConfigUpdate {
            version: 1,
            snapshot: true,
            upserts: vec![
                api::Resource {
                    resource: Some(Resource::Workload(web)),
                },
                api::Resource {
                    resource: Some(Resource::Service(svc)),
                },
                api::Resource {
                    resource: Some(Resource::Service(redis)),
                },
                api::Resource {
                    resource: Some(Resource::Service(any)),
                },
            ],
            ..Default::default()
        })
        .unwrap();
        cfg
    }

    #[test]
    fn service_entry_hosts_resolve_or_pass_through_and_answer_dns() {
        let state = MeshState::build(&config(), "n1");
        match state.route("240.240.0.9:6379".parse().unwrap(), "shop") {
            Route::Resolve {
                host,
                port,
                v4,
                service,
                ..
            } => assert_eq!(
                (host.as_str(), port, v4, service.as_str()),
                ("redis.example", 6379, true, "redis.example")
            ),
            other => panic!("{other:?}"),
        }
        match state.route("192.0.2.5:5432".parse().unwrap(), "shop") {
            Route::Passthrough { addr, service, .. } => {
                assert_eq!(addr, "192.0.2.5:5432".parse().unwrap());
                assert_eq!(service.as_deref(), Some("db.example"));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            *state.dns.get("redis.example", "shop").unwrap(),
            ["240.240.0.9".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(
            *state
                .dns
                .get("reviews.shop.svc.cluster.local", "shop")
                .unwrap(),
            ["10.96.0.20".parse::<IpAddr>().unwrap()]
        );
        assert!(state.registry.contains(&"240.240.0.9/32".parse().unwrap()));
    }

    #[test]
    fn services_balance_round_robin_over_mesh_and_plain_endpoints() {
        let state = MeshState::build(&config(), "n1");
        let vip: SocketAddr = "10.96.0.20:80".parse().unwrap();
        let mut seen = Vec::new();
        for _ in 0..4 {
            match state.route(vip, "shop") {
                Route::Hbone {
                    hbone,
                    target,
                    identity,
                    service,
                    ..
                } => {
                    assert_eq!(hbone, "10.244.2.10:15008".parse().unwrap());
                    assert_eq!(target, "10.244.2.10:9080".parse().unwrap());
                    assert_eq!(identity, "spiffe://cluster.local/ns/shop/sa/reviews-v1");
                    assert_eq!(service.as_deref(), Some("reviews.shop.svc.cluster.local"));
                    seen.push("mesh");
                }
                Route::Passthrough { addr, .. } => {
                    assert_eq!(addr, "10.244.2.11:9080".parse().unwrap());
                    seen.push("plain");
                }
                r => panic!("unexpected {r:?}"),
            }
        }
        assert_eq!(seen, ["mesh", "plain", "mesh", "plain"]);
        // A pod IP directly: HBONE when in the mesh; unknown addresses pass through.
        assert!(matches!(
            state.route("10.244.2.10:9080".parse().unwrap(), "shop"),
            Route::Hbone { .. }
        ));
        assert!(matches!(
            state.route("192.0.2.1:443".parse().unwrap(), "shop"),
            Route::Passthrough { workload: None, .. }
        ));
        assert!(matches!(
            state.route("[fd00:96::20]:80".parse().unwrap(), "shop"),
            Route::Passthrough { .. }
        ));
    }

    #[test]
    fn a_destinations_target_is_made_once_per_snapshot() {
        let vip: SocketAddr = "10.96.0.20:80".parse().unwrap();
        let decide = |state: &MeshState| {
            let headers = HeaderMap::new();
            match state.route_http(HttpEntry::Service(vip), "", &Method::GET, "/", &headers) {
                Ok(d) => d.target,
                Err(e) => panic!("{e:?}"),
            }
        };
        let mut cfg = config();
        let state = MeshState::build(&cfg, "n1");
        let first = decide(&state);
        assert!(Arc::ptr_eq(&first, &decide(&state)), "made again");
        assert_eq!(first.candidates.len(), 2);
        assert_eq!(
            first.envoy_cluster,
            "outbound|80||reviews.shop.svc.cluster.local"
        );

        // The next snapshot, an endpoint fewer: its own target, never the last one's.
        let mut reviews = cfg
            .services()
            .find(|s| s.name == "reviews")
            .unwrap()
            .clone();
        reviews.endpoints.retain(|e| e.pod_name == "reviews-v1");
        cfg.apply(&api::ConfigUpdate {
            version: 2,
            upserts: vec![api::Resource {
                resource: Some(Resource::Service(reviews)),
            }],
            ..Default::default()
        })
        .unwrap();
        let next = decide(&MeshState::build(&cfg, "n1"));
        let addrs: Vec<SocketAddr> = next.candidates.iter().map(|c| c.addr).collect();
        assert_eq!(addrs, ["10.244.2.10:9080".parse().unwrap()]);
    }

    #[test]
    fn peer_authentication_follows_istio_precedence() {
        let mode = |policies: Vec<api::Resource>| {
            let mut cfg = config();
            cfg.apply(&api::ConfigUpdate {
                version: 2,
                upserts: policies,
                ..Default::default()
            })
            .unwrap();
            MeshState::build(&cfg, "n1").peer_auth("u-web")
        };
        assert_eq!(mode(vec![]).mode, Some(MtlsMode::Permissive));
        let mesh_strict = policy(
            ROOT_NAMESPACE,
            "default",
            serde_json::json!({"mtls": {"mode": "STRICT"}}),
        );
        assert!(mode(vec![mesh_strict.clone()]).strict());
        let ns_permissive = policy(
            "shop",
            "default",
            serde_json::json!({"mtls": {"mode": "PERMISSIVE"}}),
        );
        assert!(!mode(vec![mesh_strict.clone(), ns_permissive.clone()]).strict());
        let web_unset_with_port = policy(
            "shop",
            "web",
            serde_json::json!({"selector": {"matchLabels": {"app": "web"}}, "mtls": {"mode": "UNSET"},
                               "portLevelMtls": {"9080": {"mode": "STRICT"}}}),
        );
        let pa = mode(vec![mesh_strict, ns_permissive, web_unset_with_port]);
        assert!(!pa.strict(), "UNSET defers to the namespace policy");
        assert!(pa.refuses_plaintext(9080));
        assert!(!pa.refuses_plaintext(8080));
        let other_app = policy(
            "shop",
            "other",
            serde_json::json!({"selector": {"matchLabels": {"app": "other"}}, "mtls": {"mode": "STRICT"}}),
        );
        assert!(!mode(vec![other_app]).strict());
    }
}

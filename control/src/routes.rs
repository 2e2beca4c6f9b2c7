//! Compiles VirtualServices and DestinationRules into the HTTP routes of each service port: hosts
//! (short name, `name.namespace`, FQDN or VIP) resolved to Services, subsets to pod labels. The
//! agent then needs no Istio knowledge: it matches, picks by weight and balances.
use std::{collections::HashMap, net::IpAddr};

use trellis_api as api;

use crate::{
    istio::{
        DestinationRuleSpec, GatewaySpec, HeaderOperations, PolicyObject, ServiceEntrySpec,
        StringMatch, TrafficPolicy, VirtualServiceSpec, parse_duration,
    },
    model::{Cluster, PortInfo, ServiceInfo},
};

/// The cluster's VirtualServices, DestinationRules, ServiceEntries and Gateways, parsed once per
/// compile rather than once per service port or pod (a large VirtualService made that the cost
/// of a whole compile).
pub struct Policies<'a> {
    pub(crate) virtual_services: Vec<(&'a PolicyObject, VirtualServiceSpec)>,
    pub(crate) destination_rules: Vec<(&'a PolicyObject, DestinationRuleSpec)>,
    pub(crate) service_entries: Vec<(&'a PolicyObject, ServiceEntrySpec)>,
    pub(crate) gateways: Vec<(&'a PolicyObject, GatewaySpec)>,
    /// Each ServiceEntry host's namespace (the first entry naming it, in key order).
    pub(crate) service_entry_hosts: HashMap<String, &'a str>,
    /// The VirtualServices (indices into `virtual_services`, ascending) and DestinationRules
    /// whose hosts name each Service, by (namespace, name): resolved once per compile, not once
    /// per service port (every port checking every object was most of a large compile).
    vs_by_service: HashMap<(&'a str, &'a str), Vec<usize>>,
    dr_by_service: HashMap<(&'a str, &'a str), Vec<usize>>,
}

impl<'a> Policies<'a> {
    pub fn new(cluster: &'a Cluster) -> Self {
        fn parsed<'a, T: serde::de::DeserializeOwned>(
            cluster: &'a Cluster,
            kind: &str,
        ) -> Vec<(&'a PolicyObject, T)> {
            cluster
                .policies
                .values()
                .filter(|p| p.kind == kind)
                // Validated when read, so this parses; a spec that did not would be skipped.
                .filter_map(|p| Some((&**p, T::deserialize(&p.spec).ok()?)))
                .collect()
        }
        let service_entries: Vec<(&PolicyObject, ServiceEntrySpec)> =
            parsed(cluster, "ServiceEntry");
        let mut service_entry_hosts = HashMap::new();
        for (p, se) in &service_entries {
            for h in &se.hosts {
                service_entry_hosts
                    .entry(h.clone())
                    .or_insert(p.namespace.as_str());
            }
        }
        let virtual_services: Vec<(&PolicyObject, VirtualServiceSpec)> =
            parsed(cluster, "VirtualService");
        let destination_rules: Vec<(&PolicyObject, DestinationRuleSpec)> =
            parsed(cluster, "DestinationRule");
        let vs_by_service = by_service(
            cluster,
            virtual_services
                .iter()
                .map(|(p, vs)| (p.namespace.as_str(), vs.hosts.as_slice())),
        );
        let dr_by_service = by_service(
            cluster,
            destination_rules
                .iter()
                .map(|(p, dr)| (p.namespace.as_str(), std::slice::from_ref(&dr.host))),
        );
        Self {
            virtual_services,
            destination_rules,
            service_entries,
            gateways: parsed(cluster, "Gateway"),
            service_entry_hosts,
            vs_by_service,
            dr_by_service,
        }
    }
}

/// The objects (by index) whose hosts, written in their namespace, resolve to each Service.
fn by_service<'a, 'h>(
    cluster: &'a Cluster,
    objects: impl Iterator<Item = (&'h str, &'h [String])>,
) -> HashMap<(&'a str, &'a str), Vec<usize>> {
    let mut index: HashMap<_, Vec<usize>> = HashMap::new();
    for (i, (namespace, hosts)) in objects.enumerate() {
        for h in hosts {
            if let Some(s) = resolve(cluster, h, namespace) {
                let objects = index
                    .entry((s.namespace.as_str(), s.name.as_str()))
                    .or_default();
                // Two hosts of one object naming the same Service.
                if objects.last() != Some(&i) {
                    objects.push(i);
                }
            }
        }
    }
    index
}

/// The indices `index` holds for `svc`, ascending.
fn indices<'i>(
    index: &'i HashMap<(&'i str, &'i str), Vec<usize>>,
    svc: &'i ServiceInfo,
) -> &'i [usize] {
    index
        .get(&(svc.namespace.as_str(), svc.name.as_str()))
        .map_or(&[], Vec::as_slice)
}

/// `host` as written in an object in `namespace`, resolved to a Service.
pub fn resolve<'a>(cluster: &'a Cluster, host: &str, namespace: &str) -> Option<&'a ServiceInfo> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return cluster
            .services
            .values()
            .find(|s| s.cluster_ips.contains(&ip))
            .map(|s| &**s);
    }
    let host = host.strip_suffix(".svc.cluster.local").unwrap_or(host);
    let (name, ns) = host.split_once('.').unwrap_or((host, namespace));
    cluster.services.get(&format!("{ns}/{name}")).map(|s| &**s)
}

/// A route destination's weight: as given (negatives as 0), else all of it for a route's only
/// destination and none otherwise (Istio's defaults).
pub(crate) fn weight(given: Option<i32>, single: bool) -> u32 {
    match given {
        Some(w) => w.max(0) as u32,
        None if single => 100,
        None => 0,
    }
}

/// The routes of `svc`'s HTTP port `port`, from every VirtualService bound to the mesh naming
/// `svc` (ordered by namespace and name; first match wins).
pub fn http_routes(
    cluster: &Cluster,
    policies: &Policies,
    svc: &ServiceInfo,
    port: &PortInfo,
) -> Vec<api::HttpRoute> {
    indices(&policies.vs_by_service, svc)
        .iter()
        .map(|&i| &policies.virtual_services[i])
        .filter(|(_, vs)| vs.binds_mesh())
        .flat_map(|(p, vs)| {
            (0..vs.http.len()).filter_map(|i| compile_http(cluster, policies, p, vs, i, port.port))
        })
        .collect()
}

/// Route `i` of `vs` (in `p`'s namespace) for requests that came to `port` (a service port, or
/// a gateway's server port); None when its every match is for another port. A destination
/// without a port goes to the port the request came to.
pub(crate) fn compile_http(
    cluster: &Cluster,
    policies: &Policies,
    p: &PolicyObject,
    vs: &VirtualServiceSpec,
    i: usize,
    port: u32,
) -> Option<api::HttpRoute> {
    let route = &vs.http[i];
    let matches: Vec<api::HttpMatch> = route
        .matches
        .iter()
        .filter(|m| m.port.is_none_or(|n| n == port))
        .map(|m| api::HttpMatch {
            uri: m.uri.as_ref().map(string_match),
            headers: m
                .headers
                .iter()
                .map(|(k, v)| (k.to_ascii_lowercase(), string_match(v)))
                .collect(),
            method: m.method.as_ref().map(string_match),
            port: m.port.unwrap_or(0),
        })
        .collect();
    // Every match was for another port: the route does not apply here.
    if !route.matches.is_empty() && matches.is_empty() {
        return None;
    }
    let single = route.route.len() == 1;
    let destinations = route
        .route
        .iter()
        .filter_map(|d| {
            let dst = resolve(cluster, &d.destination.host, &p.namespace)?;
            let subset = d.destination.subset.clone().unwrap_or_default();
            let (subset_labels, subset_traffic_policy) =
                subset_of(policies, dst, &subset, &p.namespace);
            Some(api::WeightedDestination {
                service: format!("{}/{}", dst.namespace, dst.name),
                port: d.destination.port.as_ref().map_or(0, |p| p.number),
                subset_labels,
                subset_traffic_policy,
                subset,
                weight: weight(d.weight, single),
            })
        })
        .collect();
    let ms = |d: &Option<String>| {
        d.as_deref()
            .and_then(parse_duration)
            .map_or(0, |d| d.as_millis().min(u128::from(u32::MAX)) as u32)
    };
    Some(api::HttpRoute {
        name: format!("{}/{}/{i}", p.namespace, p.name),
        matches,
        destinations,
        timeout_ms: ms(&route.timeout),
        retries: route.retries.as_ref().map(|r| api::HttpRetry {
            attempts: r.attempts.max(0) as u32,
            per_try_timeout_ms: ms(&r.per_try_timeout),
            retry_on: r
                .retry_on
                .as_deref()
                .unwrap_or("connect-failure,reset")
                .split(',')
                .map(|c| c.trim().to_owned())
                .filter(|c| !c.is_empty())
                .collect(),
        }),
        mirror: route.mirror.as_ref().and_then(|m| {
            let dst = resolve(cluster, &m.host, &p.namespace)?;
            let subset = m.subset.clone().unwrap_or_default();
            let (subset_labels, subset_traffic_policy) =
                subset_of(policies, dst, &subset, &p.namespace);
            Some(api::WeightedDestination {
                service: format!("{}/{}", dst.namespace, dst.name),
                port: m.port.as_ref().map_or(0, |p| p.number),
                subset_labels,
                subset_traffic_policy,
                subset,
                weight: 100,
            })
        }),
        // Istio mirrors every request when no percentage is given.
        mirror_percent: route.mirror_percentage.as_ref().map_or(100.0, |p| p.value),
        rewrite: route.rewrite.as_ref().map(|r| api::HttpRewrite {
            uri: r.uri.clone().unwrap_or_default(),
            authority: r.authority.clone().unwrap_or_default(),
        }),
        request_headers: route
            .headers
            .as_ref()
            .and_then(|h| h.request.as_ref())
            .map(header_ops),
        response_headers: route
            .headers
            .as_ref()
            .and_then(|h| h.response.as_ref())
            .map(header_ops),
        fault: route.fault.as_ref().map(|f| api::HttpFault {
            delay_ms: f
                .delay
                .as_ref()
                .map_or(0, |d| ms(&Some(d.fixed_delay.clone()))),
            delay_percent: f
                .delay
                .as_ref()
                .map_or(0.0, |d| d.percentage.as_ref().map_or(100.0, |p| p.value)),
            abort_status: f.abort.as_ref().map_or(0, |a| a.http_status.max(0) as u32),
            abort_percent: f
                .abort
                .as_ref()
                .map_or(0.0, |a| a.percentage.as_ref().map_or(100.0, |p| p.value)),
        }),
    })
}

/// The DestinationRules for `dst`: the client's namespace first, then the service's, then any.
fn rules_for<'p>(
    policies: &'p Policies,
    dst: &ServiceInfo,
    client_ns: &str,
) -> Vec<&'p DestinationRuleSpec> {
    let mut rules: Vec<(&str, &DestinationRuleSpec)> = indices(&policies.dr_by_service, dst)
        .iter()
        .map(|&i| &policies.destination_rules[i])
        .map(|(p, dr)| (p.namespace.as_str(), dr))
        .collect();
    rules.sort_by_key(|(ns, _)| (*ns != client_ns, *ns != dst.namespace));
    rules.into_iter().map(|(_, dr)| dr).collect()
}

/// The service-level trafficPolicy of the first DestinationRule for `svc`.
pub fn traffic_policy(policies: &Policies, svc: &ServiceInfo) -> Option<api::TrafficPolicy> {
    rules_for(policies, svc, &svc.namespace)
        .into_iter()
        .find_map(|dr| dr.traffic_policy.as_ref())
        .map(compile_policy)
}

/// The labels and trafficPolicy of `subset` of `dst`. A subset no rule defines selects nothing.
fn subset_of(
    policies: &Policies,
    dst: &ServiceInfo,
    subset: &str,
    client_ns: &str,
) -> (HashMap<String, String>, Option<api::TrafficPolicy>) {
    if subset.is_empty() {
        return Default::default();
    }
    let rules = rules_for(policies, dst, client_ns);
    match rules
        .iter()
        .find_map(|dr| dr.subsets.iter().find(|s| s.name == subset))
    {
        Some(s) => (
            s.labels.clone().into_iter().collect(),
            s.traffic_policy.as_ref().map(compile_policy),
        ),
        // Istio answers 503 for an undefined subset: a label no pod has selects nothing.
        None => (
            [("trellis.dev/undefined-subset".to_owned(), subset.to_owned())].into(),
            None,
        ),
    }
}

pub(crate) fn compile_policy(tp: &TrafficPolicy) -> api::TrafficPolicy {
    use api::load_balancer::Simple;
    let ms = |d: &Option<String>| {
        d.as_deref()
            .and_then(parse_duration)
            .map_or(0, |d| d.as_millis().min(u128::from(u32::MAX)) as u32)
    };
    let n = |v: Option<i32>| v.map_or(0, |v| v.max(0) as u32);
    api::TrafficPolicy {
        load_balancer: tp.load_balancer.as_ref().map(|lb| api::LoadBalancer {
            simple: match lb.simple.as_deref() {
                Some("LEAST_REQUEST") => Simple::LeastRequest,
                Some("RANDOM") => Simple::Random,
                _ => Simple::RoundRobin,
            } as i32,
            hash_header: lb
                .consistent_hash
                .as_ref()
                .map(|h| h.http_header_name.to_ascii_lowercase())
                .unwrap_or_default(),
        }),
        connection_pool: tp.connection_pool.as_ref().map(|cp| api::ConnectionPool {
            max_connections: n(cp.tcp.as_ref().and_then(|t| t.max_connections)),
            http1_max_pending_requests: n(cp
                .http
                .as_ref()
                .and_then(|h| h.http1_max_pending_requests)),
            http2_max_requests: n(cp.http.as_ref().and_then(|h| h.http2_max_requests)),
            max_requests_per_connection: n(cp
                .http
                .as_ref()
                .and_then(|h| h.max_requests_per_connection)),
        }),
        outlier_detection: tp
            .outlier_detection
            .as_ref()
            .map(|od| api::OutlierDetection {
                consecutive_5xx_errors: od.consecutive5xx_errors.unwrap_or(5),
                interval_ms: match ms(&od.interval) {
                    0 => 10_000,
                    v => v,
                },
                base_ejection_time_ms: match ms(&od.base_ejection_time) {
                    0 => 30_000,
                    v => v,
                },
                max_ejection_percent: od
                    .max_ejection_percent
                    .map_or(10, |v| v.clamp(0, 100) as u32),
            }),
        tls: tp
            .tls
            .as_ref()
            .filter(|t| t.mode == "SIMPLE")
            .map(|t| api::TlsOrigination {
                sni: t.sni.clone().unwrap_or_default(),
                ca_file: t.ca_certificates.clone().unwrap_or_default(),
            }),
    }
}

fn header_ops(h: &HeaderOperations) -> api::HeaderOperations {
    api::HeaderOperations {
        set: h.set.clone().into_iter().collect(),
        add: h.add.clone().into_iter().collect(),
        remove: h.remove.clone(),
    }
}

fn string_match(m: &StringMatch) -> api::StringMatch {
    use api::string_match::Kind;
    api::StringMatch {
        kind: Some(match m {
            StringMatch::Exact(s) => Kind::Exact(s.clone()),
            StringMatch::Prefix(s) => Kind::Prefix(s.clone()),
            StringMatch::Regex(s) => Kind::Regex(s.clone()),
        }),
    }
}

//! Compiles VirtualServices and DestinationRules into the HTTP routes of each service port: hosts
//! (short name, `name.namespace`, FQDN or VIP) resolved to Services, subsets to pod labels. The
//! agent then needs no Istio knowledge: it matches, picks by weight and balances.
use std::net::IpAddr;

use trellis_api as api;

use crate::{
    istio::{
        DestinationRuleSpec, HeaderOperations, StringMatch, VirtualServiceSpec, parse_duration,
    },
    model::{Cluster, PortInfo, ServiceInfo},
};

/// `host` as written in an object in `namespace`, resolved to a Service.
pub fn resolve<'a>(cluster: &'a Cluster, host: &str, namespace: &str) -> Option<&'a ServiceInfo> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return cluster
            .services
            .values()
            .find(|s| s.cluster_ips.contains(&ip));
    }
    let host = host.strip_suffix(".svc.cluster.local").unwrap_or(host);
    let (name, ns) = host.split_once('.').unwrap_or((host, namespace));
    cluster.services.get(&format!("{ns}/{name}"))
}

fn same(a: &ServiceInfo, b: &ServiceInfo) -> bool {
    a.namespace == b.namespace && a.name == b.name
}

/// The routes of `svc`'s HTTP port `port`, from every VirtualService naming `svc` (ordered by
/// namespace and name; first match wins).
pub fn http_routes(cluster: &Cluster, svc: &ServiceInfo, port: &PortInfo) -> Vec<api::HttpRoute> {
    let mut out = Vec::new();
    for p in cluster
        .policies
        .values()
        .filter(|p| p.kind == "VirtualService")
    {
        let Ok(vs) = serde_json::from_value::<VirtualServiceSpec>(p.spec.clone()) else {
            continue;
        };
        if !vs
            .hosts
            .iter()
            .any(|h| resolve(cluster, h, &p.namespace).is_some_and(|s| same(s, svc)))
        {
            continue;
        }
        for (i, route) in vs.http.iter().enumerate() {
            let matches: Vec<api::HttpMatch> = route
                .matches
                .iter()
                .filter(|m| m.port.is_none_or(|n| n == port.port))
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
                continue;
            }
            let single = route.route.len() == 1;
            let destinations = route
                .route
                .iter()
                .filter_map(|d| {
                    let dst = resolve(cluster, &d.destination.host, &p.namespace)?;
                    let subset = d.destination.subset.clone().unwrap_or_default();
                    Some(api::WeightedDestination {
                        service: format!("{}/{}", dst.namespace, dst.name),
                        port: d.destination.port.as_ref().map_or(0, |p| p.number),
                        subset_labels: subset_labels(cluster, dst, &subset, &p.namespace),
                        subset,
                        weight: match d.weight {
                            Some(w) => w.max(0) as u32,
                            None if single => 100,
                            None => 0,
                        },
                    })
                })
                .collect();
            let ms = |d: &Option<String>| {
                d.as_deref()
                    .and_then(parse_duration)
                    .map_or(0, |d| d.as_millis().min(u128::from(u32::MAX)) as u32)
            };
            out.push(api::HttpRoute {
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
            });
        }
    }
    out
}

/// The labels of `subset` of `dst`, from the first DestinationRule for it (the client's
/// namespace first, then the service's, then any). A subset no rule defines selects nothing.
fn subset_labels(
    cluster: &Cluster,
    dst: &ServiceInfo,
    subset: &str,
    client_ns: &str,
) -> std::collections::HashMap<String, String> {
    if subset.is_empty() {
        return Default::default();
    }
    let mut rules: Vec<(&str, DestinationRuleSpec)> = cluster
        .policies
        .values()
        .filter(|p| p.kind == "DestinationRule")
        .filter_map(|p| {
            let dr: DestinationRuleSpec = serde_json::from_value(p.spec.clone()).ok()?;
            resolve(cluster, &dr.host, &p.namespace)
                .is_some_and(|s| same(s, dst))
                .then_some((p.namespace.as_str(), dr))
        })
        .collect();
    rules.sort_by_key(|(ns, _)| (*ns != client_ns, *ns != dst.namespace));
    rules
        .iter()
        .find_map(|(_, dr)| dr.subsets.iter().find(|s| s.name == subset))
        .map(|s| s.labels.clone().into_iter().collect())
        // Istio answers 503 for an undefined subset: a label no pod has selects nothing.
        .unwrap_or_else(|| [("trellis.dev/undefined-subset".to_owned(), subset.to_owned())].into())
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

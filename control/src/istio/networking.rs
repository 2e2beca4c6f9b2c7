//! `networking.istio.io/v1`: VirtualService, DestinationRule, ServiceEntry, Gateway (subset).
use std::collections::BTreeMap;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{
    Validate,
    common::{Percent, StringMatch, check_duration, check_enum},
};
use crate::names::{self, dns1123_label};

#[derive(CustomResource, Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "networking.istio.io",
    version = "v1",
    kind = "VirtualService",
    namespaced
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VirtualServiceSpec {
    /// Short name, FQDN or service VIP the rules apply to.
    pub hosts: Vec<String>,
    /// `mesh` (the node proxies, the default) and Gateways (`<name>` or `<namespace>/<name>`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gateways: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub http: Vec<HttpRoute>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tcp: Vec<TcpRoute>,
    /// By SNI, at gateways whose server passes TLS through.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tls: Vec<TlsRoute>,
}

impl VirtualServiceSpec {
    /// Whether the node proxies apply it (no `gateways`, or `mesh` among them).
    pub fn binds_mesh(&self) -> bool {
        self.gateways.is_empty() || self.gateways.iter().any(|g| g == "mesh")
    }
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRoute {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, rename = "match", skip_serializing_if = "Vec::is_empty")]
    pub matches: Vec<HttpMatchRequest>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub route: Vec<HttpRouteDestination>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<HttpRetry>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault: Option<HttpFault>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rewrite: Option<HttpRewrite>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headers: Option<Headers>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror: Option<Destination>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror_percentage: Option<Percent>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpMatchRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uri: Option<StringMatch>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, StringMatch>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<StringMatch>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRouteDestination {
    pub destination: Destination,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<i32>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Destination {
    pub host: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subset: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<PortSelector>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PortSelector {
    pub number: u32,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRetry {
    pub attempts: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_try_timeout: Option<String>,
    /// Comma-separated: 5xx, gateway-error, connect-failure, reset, retriable-4xx.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_on: Option<String>,
}

pub const RETRY_ON: [&str; 5] = [
    "5xx",
    "gateway-error",
    "connect-failure",
    "reset",
    "retriable-4xx",
];

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpFault {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay: Option<FaultDelay>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abort: Option<FaultAbort>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FaultDelay {
    pub fixed_delay: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percentage: Option<Percent>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FaultAbort {
    pub http_status: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percentage: Option<Percent>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRewrite {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uri: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authority: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Headers {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<HeaderOperations>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response: Option<HeaderOperations>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HeaderOperations {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub set: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub add: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remove: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TcpRoute {
    #[serde(default, rename = "match", skip_serializing_if = "Vec::is_empty")]
    pub matches: Vec<TcpMatch>,
    pub route: Vec<RouteDestination>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TcpMatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u32>,
    /// Only for these of the VirtualService's gateways (`mesh`, a Gateway); empty: all of them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gateways: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TlsRoute {
    #[serde(rename = "match")]
    pub matches: Vec<TlsMatch>,
    pub route: Vec<RouteDestination>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TlsMatch {
    /// `*`, `*.example.com` or a name.
    pub sni_hosts: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u32>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gateways: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouteDestination {
    pub destination: Destination,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<i32>,
}

impl Validate for VirtualServiceSpec {
    fn validate(&self) -> Result<(), String> {
        if self.hosts.is_empty() {
            return Err("hosts: at least one host is required".into());
        }
        for (i, g) in self.gateways.iter().enumerate() {
            if g == "mesh" {
                continue;
            }
            let (ns, name) = g.split_once('/').unwrap_or(("default", g));
            names::dns1123_label(ns)
                .and_then(|()| names::dns1123_subdomain(name))
                .map_err(|e| format!("gateways[{i}]: {g:?} is not \"mesh\", <gateway> or <namespace>/<gateway>: {e}"))?;
        }
        if !self.tls.is_empty() && self.gateways.iter().all(|g| g == "mesh") {
            return Err(
                "tls: routes by SNI are served at gateways only: bind the VirtualService to a Gateway"
                    .into(),
            );
        }
        for (i, r) in self.http.iter().enumerate() {
            let at = format!("http[{i}]");
            if r.route.is_empty() && r.fault.as_ref().and_then(|f| f.abort.as_ref()).is_none() {
                return Err(format!("{at}.route: at least one destination is required"));
            }
            check_weights(&at, r.route.iter().map(|d| d.weight))?;
            for (j, d) in r.route.iter().enumerate() {
                check_destination(&format!("{at}.route[{j}].destination"), &d.destination)?;
            }
            if let Some(m) = &r.mirror {
                check_destination(&format!("{at}.mirror"), m)?;
            }
            for (j, m) in r.matches.iter().enumerate() {
                let at = format!("{at}.match[{j}]");
                if let Some(p) = m.port {
                    check_port(&format!("{at}.port"), p)?;
                }
                for (name, sm) in [("uri", &m.uri), ("method", &m.method)] {
                    if let Some(sm) = sm {
                        sm.validate(&format!("{at}.{name}"))?;
                    }
                }
                for (h, sm) in &m.headers {
                    check_header_name(&format!("{at}.headers"), h)?;
                    sm.validate(&format!("{at}.headers.{h}"))?;
                }
            }
            if let Some(h) = &r.headers {
                for (side, ops) in [("request", &h.request), ("response", &h.response)] {
                    if let Some(ops) = ops {
                        check_header_ops(&format!("{at}.headers.{side}"), ops)?;
                    }
                }
            }
            check_duration(&format!("{at}.timeout"), &r.timeout)?;
            if let Some(retries) = &r.retries {
                if retries.attempts < 0 {
                    return Err(format!("{at}.retries.attempts: must not be negative"));
                }
                check_duration(
                    &format!("{at}.retries.perTryTimeout"),
                    &retries.per_try_timeout,
                )?;
                for cond in retries
                    .retry_on
                    .iter()
                    .flat_map(|s| s.split(','))
                    .map(str::trim)
                {
                    if !RETRY_ON.contains(&cond) {
                        return Err(format!(
                            "{at}.retries.retryOn: {cond:?} is not supported (supported: {})",
                            RETRY_ON.join(", ")
                        ));
                    }
                }
            }
            if let Some(fault) = &r.fault {
                if let Some(d) = &fault.delay {
                    check_duration(
                        &format!("{at}.fault.delay.fixedDelay"),
                        &Some(d.fixed_delay.clone()),
                    )?;
                    if let Some(p) = &d.percentage {
                        p.validate(&format!("{at}.fault.delay.percentage"))?;
                    }
                }
                if let Some(a) = &fault.abort {
                    if !(200..=599).contains(&a.http_status) {
                        return Err(format!(
                            "{at}.fault.abort.httpStatus: {} is not an HTTP status",
                            a.http_status
                        ));
                    }
                    if let Some(p) = &a.percentage {
                        p.validate(&format!("{at}.fault.abort.percentage"))?;
                    }
                }
            }
            if let Some(p) = &r.mirror_percentage {
                p.validate(&format!("{at}.mirrorPercentage"))?;
            }
        }
        for (i, r) in self.tcp.iter().enumerate() {
            let at = format!("tcp[{i}]");
            if r.route.is_empty() {
                return Err(format!("{at}.route: at least one destination is required"));
            }
            check_weights(&at, r.route.iter().map(|d| d.weight))?;
            for (j, d) in r.route.iter().enumerate() {
                check_destination(&format!("{at}.route[{j}].destination"), &d.destination)?;
            }
            for (j, m) in r.matches.iter().enumerate() {
                if let Some(p) = m.port {
                    check_port(&format!("{at}.match[{j}].port"), p)?;
                }
            }
        }
        for (i, r) in self.tls.iter().enumerate() {
            let at = format!("tls[{i}]");
            if r.route.is_empty() {
                return Err(format!("{at}.route: at least one destination is required"));
            }
            if r.matches.is_empty() {
                return Err(format!("{at}.match: at least one match is required"));
            }
            check_weights(&at, r.route.iter().map(|d| d.weight))?;
            for (j, d) in r.route.iter().enumerate() {
                check_destination(&format!("{at}.route[{j}].destination"), &d.destination)?;
            }
            for (j, m) in r.matches.iter().enumerate() {
                let at = format!("{at}.match[{j}]");
                if m.sni_hosts.is_empty() {
                    return Err(format!("{at}.sniHosts: at least one host is required"));
                }
                for (k, h) in m.sni_hosts.iter().enumerate() {
                    check_host_pattern(&format!("{at}.sniHosts[{k}]"), h)?;
                }
                if let Some(p) = m.port {
                    check_port(&format!("{at}.port"), p)?;
                }
            }
        }
        Ok(())
    }
}

/// A host as Gateways and SNI matches write it: `*`, `*.<name>` or a DNS name.
fn check_host_pattern(at: &str, host: &str) -> Result<(), String> {
    let name = host.strip_prefix("*.").unwrap_or(host);
    if host == "*" {
        return Ok(());
    }
    names::dns1123_subdomain(&name.to_ascii_lowercase())
        .map_err(|e| format!("{at}: {host:?} is not `*`, `*.<domain>` or a host name: {e}"))
}

/// Weights are optional, but each given is 0 to 100 (as Istio requires), and with more than one
/// destination they sum to 100. Checked one by one before adding, so no sum can overflow.
/// The node proxy puts these names and values into requests and answers: what HTTP does not
/// allow would make it refuse the whole update for the node.
fn check_header_name(at: &str, name: &str) -> Result<(), String> {
    hyper::header::HeaderName::from_bytes(name.as_bytes())
        .map(drop)
        .map_err(|_| format!("{at}: {name:?} is not a valid HTTP header name"))
}

fn check_header_ops(at: &str, ops: &HeaderOperations) -> Result<(), String> {
    for (op, pairs) in [("set", &ops.set), ("add", &ops.add)] {
        for (name, value) in pairs {
            check_header_name(&format!("{at}.{op}"), name)?;
            hyper::header::HeaderValue::from_str(value).map_err(|_| {
                format!("{at}.{op}.{name}: {value:?} is not a valid HTTP header value")
            })?;
        }
    }
    for name in &ops.remove {
        check_header_name(&format!("{at}.remove"), name)?;
    }
    Ok(())
}

fn check_weights(at: &str, weights: impl Iterator<Item = Option<i32>>) -> Result<(), String> {
    let weights: Vec<Option<i32>> = weights.collect();
    if weights.iter().all(Option::is_none) {
        return Ok(());
    }
    for (i, w) in weights.iter().enumerate() {
        if let Some(w) = w.filter(|w| !(0..=100).contains(w)) {
            return Err(format!("{at}.route[{i}].weight: {w} is not 0 to 100"));
        }
    }
    let sum: i64 = weights.iter().map(|w| i64::from(w.unwrap_or(0))).sum();
    if weights.len() > 1 && sum != 100 {
        return Err(format!("{at}.route: weights add up to {sum}, not 100"));
    }
    Ok(())
}

/// A destination: a host, a subset named as Istio requires, a port that is one.
fn check_destination(at: &str, d: &Destination) -> Result<(), String> {
    if d.host.is_empty() {
        return Err(format!("{at}.host: required"));
    }
    if let Some(s) = &d.subset {
        dns1123_label(s).map_err(|e| format!("{at}.subset: {e}"))?;
    }
    if let Some(p) = &d.port {
        check_port(&format!("{at}.port.number"), p.number)?;
    }
    Ok(())
}

pub fn check_port(at: &str, port: u32) -> Result<(), String> {
    if (1..=65535).contains(&port) {
        Ok(())
    } else {
        Err(format!("{at}: {port} is not a port (1 to 65535)"))
    }
}

#[derive(CustomResource, Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "networking.istio.io",
    version = "v1",
    kind = "DestinationRule",
    namespaced
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DestinationRuleSpec {
    pub host: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traffic_policy: Option<TrafficPolicy>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subsets: Vec<Subset>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Subset {
    pub name: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traffic_policy: Option<TrafficPolicy>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TrafficPolicy {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_balancer: Option<LoadBalancer>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_pool: Option<ConnectionPool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<OutlierDetection>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<ClientTls>,
}

/// Istio's ClientTLSSettings, the part Trellis does: TLS origination to hosts outside the mesh.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClientTls {
    /// DISABLE or SIMPLE.
    pub mode: String,
    /// Absolute path, on every node, of a PEM file with the CAs to trust.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_certificates: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sni: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LoadBalancer {
    /// ROUND_ROBIN, LEAST_REQUEST or RANDOM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub simple: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consistent_hash: Option<ConsistentHash>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConsistentHash {
    pub http_header_name: String,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConnectionPool {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<TcpPool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpPool>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TcpPool {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<i32>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpPool {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http1_max_pending_requests: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http2_max_requests: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_requests_per_connection: Option<i32>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OutlierDetection {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consecutive5xx_errors: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_ejection_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_ejection_percent: Option<i32>,
}

impl TrafficPolicy {
    fn validate(&self, at: &str) -> Result<(), String> {
        if let Some(lb) = &self.load_balancer {
            check_enum(
                &format!("{at}.loadBalancer.simple"),
                &lb.simple,
                &["ROUND_ROBIN", "LEAST_REQUEST", "RANDOM"],
            )?;
            if lb.simple.is_some() && lb.consistent_hash.is_some() {
                return Err(format!(
                    "{at}.loadBalancer: give either simple or consistentHash, not both"
                ));
            }
        }
        if let Some(pool) = &self.connection_pool {
            let limits = [
                (
                    "tcp.maxConnections",
                    pool.tcp.as_ref().and_then(|t| t.max_connections),
                ),
                (
                    "http.http1MaxPendingRequests",
                    pool.http
                        .as_ref()
                        .and_then(|h| h.http1_max_pending_requests),
                ),
                (
                    "http.http2MaxRequests",
                    pool.http.as_ref().and_then(|h| h.http2_max_requests),
                ),
                (
                    "http.maxRequestsPerConnection",
                    pool.http
                        .as_ref()
                        .and_then(|h| h.max_requests_per_connection),
                ),
            ];
            if let Some((name, v)) = limits.iter().find(|(_, v)| v.is_some_and(|v| v < 1)) {
                return Err(format!(
                    "{at}.connectionPool.{name}: {} must be at least 1",
                    v.unwrap_or(0)
                ));
            }
        }
        if let Some(tls) = &self.tls {
            check_enum(
                &format!("{at}.tls.mode"),
                &Some(tls.mode.clone()),
                &["DISABLE", "SIMPLE"],
            )?;
            match tls.ca_certificates.as_deref() {
                Some(path) if path.starts_with('/') => {}
                Some(path) => {
                    return Err(format!(
                        "{at}.tls.caCertificates: {path:?} is not an absolute path"
                    ));
                }
                None if tls.mode == "SIMPLE" => {
                    return Err(format!(
                        "{at}.tls.caCertificates: required for SIMPLE (the system's roots are not used)"
                    ));
                }
                None => {}
            }
            if let Some(sni) = &tls.sni {
                names::dns1123_subdomain(sni).map_err(|e| format!("{at}.tls.sni: {e}"))?;
            }
        }
        if let Some(od) = &self.outlier_detection {
            check_duration(&format!("{at}.outlierDetection.interval"), &od.interval)?;
            check_duration(
                &format!("{at}.outlierDetection.baseEjectionTime"),
                &od.base_ejection_time,
            )?;
            if od
                .max_ejection_percent
                .is_some_and(|p| !(0..=100).contains(&p))
            {
                return Err(format!(
                    "{at}.outlierDetection.maxEjectionPercent: must be 0 to 100"
                ));
            }
        }
        Ok(())
    }
}

impl Validate for DestinationRuleSpec {
    fn validate(&self) -> Result<(), String> {
        if self.host.is_empty() {
            return Err("host: required".into());
        }
        if let Some(tp) = &self.traffic_policy {
            tp.validate("trafficPolicy")?;
        }
        let mut seen = std::collections::BTreeSet::new();
        for (i, s) in self.subsets.iter().enumerate() {
            dns1123_label(&s.name).map_err(|e| format!("subsets[{i}].name: {e}"))?;
            if !seen.insert(&s.name) {
                return Err(format!("subsets[{i}].name: {:?} is used twice", s.name));
            }
            names::labels(&format!("subsets[{i}].labels"), &s.labels)?;
            if let Some(tp) = &s.traffic_policy {
                tp.validate(&format!("subsets[{i}].trafficPolicy"))?;
            }
        }
        Ok(())
    }
}

#[derive(CustomResource, Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "networking.istio.io",
    version = "v1",
    kind = "ServiceEntry",
    namespaced
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceEntrySpec {
    pub hosts: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<ServiceEntryPort>,
    /// MESH_EXTERNAL (default) or MESH_INTERNAL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location: Option<String>,
    /// NONE, STATIC or DNS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolution: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<WorkloadEntry>,
    /// `.` (the entry's namespace), `*` (all, the default), `~` (none) or namespace names.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub export_to: Vec<String>,
}

impl ServiceEntrySpec {
    /// The namespaces that see the entry (`namespace` is its own); empty: all of them.
    pub fn exported_to(&self, namespace: &str) -> Vec<String> {
        if self.export_to.is_empty() || self.export_to.iter().any(|n| n == "*") {
            return Vec::new();
        }
        let mut out: Vec<String> = self
            .export_to
            .iter()
            .map(|n| if n == "." { namespace } else { n }.to_owned())
            .collect();
        out.sort();
        out.dedup();
        out
    }
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceEntryPort {
    pub number: u32,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_port: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadEntry {
    /// An IP address (resolution STATIC) or a host name (resolution DNS).
    pub address: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub ports: BTreeMap<String, u32>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// MESH_INTERNAL: the service account the endpoint runs as; it is then reached over HBONE
    /// mTLS and must present `spiffe://<td>/ns/<entry's namespace>/sa/<this>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account: Option<String>,
}

pub const PORT_PROTOCOLS: [&str; 6] = ["HTTP", "HTTP2", "GRPC", "TCP", "TLS", "HTTPS"];

impl Validate for ServiceEntrySpec {
    fn validate(&self) -> Result<(), String> {
        if self.hosts.is_empty() {
            return Err("hosts: at least one host is required".into());
        }
        check_enum(
            "location",
            &self.location,
            &["MESH_EXTERNAL", "MESH_INTERNAL"],
        )?;
        check_enum("resolution", &self.resolution, &["NONE", "STATIC", "DNS"])?;
        for (i, n) in self.export_to.iter().enumerate() {
            if !matches!(n.as_str(), "." | "*" | "~") {
                dns1123_label(n).map_err(|e| {
                    format!("exportTo[{i}]: {n:?} is not \".\", \"*\", \"~\" or a namespace: {e}")
                })?;
            }
        }
        if self.export_to.len() > 1 && self.export_to.iter().any(|n| n == "~") {
            return Err("exportTo: \"~\" (no namespace) cannot be listed with others".into());
        }
        for (i, p) in self.ports.iter().enumerate() {
            check_enum(
                &format!("ports[{i}].protocol"),
                &p.protocol,
                &PORT_PROTOCOLS,
            )?;
            check_port(&format!("ports[{i}].number"), p.number)?;
            if let Some(t) = p.target_port {
                check_port(&format!("ports[{i}].targetPort"), t)?;
            }
        }
        for (i, a) in self.addresses.iter().enumerate() {
            if a.parse::<ipnet::IpNet>().is_err() && a.parse::<std::net::IpAddr>().is_err() {
                return Err(format!(
                    "addresses[{i}]: {a:?} is not an IP address or CIDR"
                ));
            }
        }
        let resolution = self.resolution.as_deref().unwrap_or("NONE");
        for (i, h) in self.hosts.iter().enumerate() {
            let name = h.strip_prefix("*.").unwrap_or(h);
            names::dns1123_subdomain(name).map_err(|e| format!("hosts[{i}]: {e}"))?;
            if h.starts_with("*.") && resolution == "DNS" {
                return Err(format!(
                    "hosts[{i}]: {h:?}: a wildcard host cannot be resolved (resolution DNS)"
                ));
            }
        }
        for (i, e) in self.endpoints.iter().enumerate() {
            names::labels(&format!("endpoints[{i}].labels"), &e.labels)?;
            let ip = e.address.parse::<std::net::IpAddr>().is_ok();
            match resolution {
                "STATIC" if !ip => {
                    return Err(format!(
                        "endpoints[{i}].address: {:?} is not an IP address (resolution STATIC)",
                        e.address
                    ));
                }
                "DNS" if !ip => names::dns1123_subdomain(&e.address)
                    .map_err(|m| format!("endpoints[{i}].address: {m}"))?,
                "NONE" => {
                    return Err(format!(
                        "endpoints[{i}]: resolution NONE takes no endpoints (traffic goes where the app sent it)"
                    ));
                }
                _ => {}
            }
            if let Some(sa) = &e.service_account {
                names::dns1123_subdomain(sa)
                    .map_err(|m| format!("endpoints[{i}].serviceAccount: {m}"))?;
                if self.location.as_deref() != Some("MESH_INTERNAL") {
                    return Err(format!(
                        "endpoints[{i}].serviceAccount: only a MESH_INTERNAL entry's endpoints have mesh identities"
                    ));
                }
            }
            for (name, port) in &e.ports {
                check_port(&format!("endpoints[{i}].ports.{name}"), *port)?;
            }
        }
        if self.resolution.as_deref() == Some("STATIC") && self.endpoints.is_empty() {
            return Err("endpoints: resolution STATIC needs at least one endpoint".into());
        }
        Ok(())
    }
}

#[derive(CustomResource, Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "networking.istio.io",
    version = "v1",
    kind = "Gateway",
    namespaced
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GatewaySpec {
    #[serde(default)]
    pub selector: BTreeMap<String, String>,
    pub servers: Vec<GatewayServer>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GatewayServer {
    pub port: GatewayPort,
    /// `*`, `*.example.com`, a name, or `<namespace>/<host>` (the namespace part is ignored).
    pub hosts: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<ServerTls>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl GatewayServer {
    /// The server's hosts without Istio's optional `<namespace>/` prefix.
    pub fn host_names(&self) -> Vec<String> {
        self.hosts
            .iter()
            .map(|h| h.rsplit_once('/').map_or(h.as_str(), |(_, h)| h).to_owned())
            .collect()
    }

    /// How the server takes connections: TCP, HTTP (maybe over TLS) or TLS passed through.
    pub fn mode(&self) -> &'static str {
        match self.port.protocol.as_str() {
            "HTTP" | "HTTPS" | "HTTP2" | "GRPC" => "HTTP",
            "TLS" if self.tls.as_ref().is_some_and(|t| t.mode == "PASSTHROUGH") => "PASSTHROUGH",
            _ => "TCP",
        }
    }
}

/// A server's TLS: terminated here (SIMPLE) with a Secret's or files' certificate, or passed
/// through to the destination chosen by SNI (PASSTHROUGH).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServerTls {
    pub mode: String,
    /// A `kubernetes.io/tls` Secret in the Gateway's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential_name: Option<String>,
    /// Absolute paths on the gateway's node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_certificate: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub private_key: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GatewayPort {
    pub number: u32,
    pub protocol: String,
    pub name: String,
}

impl Validate for GatewaySpec {
    fn validate(&self) -> Result<(), String> {
        names::labels("selector", &self.selector)?;
        let mut seen: BTreeMap<u32, (usize, &str, bool)> = BTreeMap::new();
        for (i, s) in self.servers.iter().enumerate() {
            let at = format!("servers[{i}]");
            check_port(&format!("{at}.port.number"), s.port.number)?;
            check_enum(
                &format!("{at}.port.protocol"),
                &Some(s.port.protocol.clone()),
                &["HTTP", "HTTPS", "HTTP2", "GRPC", "TCP", "TLS"],
            )?;
            if s.hosts.is_empty() {
                return Err(format!("{at}.hosts: at least one host is required"));
            }
            for (j, h) in s.host_names().iter().enumerate() {
                check_host_pattern(&format!("{at}.hosts[{j}]"), h)?;
            }
            check_server_tls(&at, s)?;
            // One port is one listener: its servers differ by host only.
            let terminates = s.tls.as_ref().is_some_and(|t| t.mode == "SIMPLE");
            let (first, mode, tls) =
                *seen
                    .entry(s.port.number)
                    .or_insert((i, s.mode(), terminates));
            if (mode, tls) != (s.mode(), terminates) {
                return Err(format!(
                    "{at}.port: port {} is also servers[{first}]'s, which takes {mode}{}; servers \
                     sharing a port must take the same protocol and TLS mode",
                    s.port.number,
                    if tls { " over TLS" } else { "" }
                ));
            }
        }
        Ok(())
    }
}

fn check_server_tls(at: &str, s: &GatewayServer) -> Result<(), String> {
    let protocol = s.port.protocol.as_str();
    let Some(tls) = &s.tls else {
        if matches!(protocol, "HTTPS" | "TLS") {
            return Err(format!("{at}.tls: protocol {protocol} needs tls settings"));
        }
        return Ok(());
    };
    let at = format!("{at}.tls");
    let modes: &[&str] = match protocol {
        "HTTPS" => &["SIMPLE"],
        "TLS" => &["SIMPLE", "PASSTHROUGH"],
        _ => {
            return Err(format!(
                "{at}: protocol {protocol} takes no tls settings (use HTTPS or TLS)"
            ));
        }
    };
    check_enum(&format!("{at}.mode"), &Some(tls.mode.clone()), modes)?;
    let files = [&tls.server_certificate, &tls.private_key];
    if tls.mode == "PASSTHROUGH" {
        if tls.credential_name.is_some() || files.iter().any(|f| f.is_some()) {
            return Err(format!(
                "{at}: mode PASSTHROUGH takes no certificate (the destination terminates TLS)"
            ));
        }
        return Ok(());
    }
    match (
        &tls.credential_name,
        &tls.server_certificate,
        &tls.private_key,
    ) {
        (Some(name), None, None) => {
            names::dns1123_subdomain(name).map_err(|e| format!("{at}.credentialName: {e}"))
        }
        (None, Some(cert), Some(key)) => {
            for (field, path) in [("serverCertificate", cert), ("privateKey", key)] {
                if !path.starts_with('/') {
                    return Err(format!("{at}.{field}: {path:?} is not an absolute path"));
                }
            }
            Ok(())
        }
        _ => Err(format!(
            "{at}: mode SIMPLE needs either credentialName or both serverCertificate and privateKey"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_origination_needs_simple_an_absolute_ca_file_and_a_dns_sni() {
        let dr = |tls: serde_json::Value| -> Result<(), String> {
            serde_json::from_value::<DestinationRuleSpec>(
                serde_json::json!({"host": "db.example", "trafficPolicy": {"tls": tls}}),
            )
            .map_err(|e| e.to_string())?
            .validate()
        };
        assert_eq!(
            dr(
                serde_json::json!({"mode": "SIMPLE", "caCertificates": "/etc/ca.pem", "sni": "db.example"})
            ),
            Ok(())
        );
        assert_eq!(dr(serde_json::json!({"mode": "DISABLE"})), Ok(()));
        let e = dr(serde_json::json!({"mode": "ISTIO_MUTUAL"})).unwrap_err();
        assert!(
            e.starts_with("trafficPolicy.tls.mode: \"ISTIO_MUTUAL\" is not supported"),
            "{e}"
        );
        let e = dr(serde_json::json!({"mode": "SIMPLE"})).unwrap_err();
        assert!(
            e.starts_with("trafficPolicy.tls.caCertificates: required"),
            "{e}"
        );
        let e = dr(serde_json::json!({"mode": "SIMPLE", "caCertificates": "ca.pem"})).unwrap_err();
        assert!(e.contains("is not an absolute path"), "{e}");
        let e = dr(serde_json::json!({"mode": "SIMPLE", "caCertificates": "/ca.pem", "credentialName": "x"}))
            .unwrap_err();
        assert!(e.contains("credentialName"), "{e}");
    }

    #[test]
    fn weights_are_bounded_before_they_are_added() {
        let w = |ws: &[i32]| check_weights("http[0]", ws.iter().map(|w| Some(*w)));
        // Found by a hostile tester: this used to overflow the i32 sum and panic.
        assert_eq!(
            w(&[i32::MAX, i32::MAX, 102]),
            Err("http[0].route[0].weight: 2147483647 is not 0 to 100".into())
        );
        assert_eq!(
            w(&[150]),
            Err("http[0].route[0].weight: 150 is not 0 to 100".into())
        );
        assert_eq!(
            w(&[50, -1, 51]),
            Err("http[0].route[1].weight: -1 is not 0 to 100".into())
        );
        assert_eq!(
            w(&[60, 60]),
            Err("http[0].route: weights add up to 120, not 100".into())
        );
        assert_eq!(w(&[100]), Ok(()));
        assert_eq!(w(&[0, 100]), Ok(()));
        assert_eq!(check_weights("x", [None, None].into_iter()), Ok(()));
    }

    #[test]
    fn destinations_name_subsets_and_ports_as_istio_does() {
        let d = |subset: &str, port: u32| Destination {
            host: "reviews".into(),
            subset: Some(subset.into()),
            port: Some(PortSelector { number: port }),
        };
        assert_eq!(check_destination("d", &d("v1", 9080)), Ok(()));
        let e = check_destination("d", &d("version one", 9080)).unwrap_err();
        assert!(
            e.starts_with("d.subset: \"version one\" is not a DNS-1123 label"),
            "{e}"
        );
        let e = check_destination("d", &d("v1", 70000)).unwrap_err();
        assert_eq!(e, "d.port.number: 70000 is not a port (1 to 65535)");
    }

    /// Found by fuzz/ istio_yaml: control accepted a header name the node proxy cannot use, and
    /// the agent then refused the node's whole update.
    #[test]
    fn header_edits_and_matches_use_valid_http_names_and_values() {
        let vs = |http: &str| -> VirtualServiceSpec {
            serde_json::from_str(&format!(r#"{{"hosts":["web"],"http":[{http}]}}"#)).unwrap()
        };
        let route = r#""route":[{"destination":{"host":"web"}}]"#;
        let ok = vs(&format!(
            r#"{{{route},"headers":{{"response":{{"set":{{"x-served-by":"v1"}},"remove":["server"]}}}}}}"#
        ));
        assert_eq!(ok.validate(), Ok(()));
        let bad_name = vs(&format!(
            r#"{{{route},"headers":{{"response":{{"set":{{"x served-b*y":"v1"}}}}}}}}"#
        ));
        assert_eq!(
            bad_name.validate(),
            Err(
                "http[0].headers.response.set: \"x served-b*y\" is not a valid HTTP header name"
                    .into()
            )
        );
        let bad_value = vs(&format!(
            r#"{{{route},"headers":{{"request":{{"add":{{"x-a":"line\nbreak"}}}}}}}}"#
        ));
        assert!(
            bad_value
                .validate()
                .unwrap_err()
                .contains("is not a valid HTTP header value")
        );
        let bad_remove = vs(&format!(
            r#"{{{route},"headers":{{"request":{{"remove":["a b"]}}}}}}"#
        ));
        assert!(
            bad_remove
                .validate()
                .unwrap_err()
                .starts_with("http[0].headers.request.remove")
        );
        let bad_match = vs(&format!(
            r#"{{{route},"match":[{{"headers":{{"bad:name":{{"exact":"x"}}}}}}]}}"#
        ));
        assert!(
            bad_match
                .validate()
                .unwrap_err()
                .starts_with("http[0].match[0].headers")
        );
    }

    #[test]
    fn gateway_servers_say_what_tls_they_need() {
        let gw = |servers: serde_json::Value| -> Result<(), String> {
            serde_json::from_value::<GatewaySpec>(
                serde_json::json!({"selector": {"app": "gw"}, "servers": servers}),
            )
            .map_err(|e| e.to_string())?
            .validate()
        };
        let server = |protocol: &str, tls: serde_json::Value| {
            let mut s = serde_json::json!({"port": {"number": 443, "name": "p", "protocol": protocol}, "hosts": ["shop.example"]});
            if !tls.is_null() {
                s["tls"] = tls;
            }
            s
        };
        let simple = serde_json::json!({"mode": "SIMPLE", "credentialName": "shop-cert"});
        assert_eq!(
            gw(serde_json::json!([server("HTTPS", simple.clone())])),
            Ok(())
        );
        assert_eq!(
            gw(serde_json::json!([server(
                "TLS",
                serde_json::json!({"mode": "PASSTHROUGH"})
            )])),
            Ok(())
        );
        assert_eq!(
            gw(serde_json::json!([server(
                "HTTPS",
                serde_json::json!({"mode": "SIMPLE",
                "serverCertificate": "/etc/gw/tls.crt", "privateKey": "/etc/gw/tls.key"})
            )])),
            Ok(())
        );
        for (servers, want) in [
            (
                serde_json::json!([server("HTTPS", serde_json::Value::Null)]),
                "servers[0].tls: protocol HTTPS needs tls settings",
            ),
            (
                serde_json::json!([server("HTTP", simple.clone())]),
                "servers[0].tls: protocol HTTP takes no tls settings (use HTTPS or TLS)",
            ),
            (
                serde_json::json!([server(
                    "HTTPS",
                    serde_json::json!({"mode": "MUTUAL", "credentialName": "c"})
                )]),
                "servers[0].tls.mode: \"MUTUAL\" is not supported (supported: SIMPLE)",
            ),
            (
                serde_json::json!([server("HTTPS", serde_json::json!({"mode": "SIMPLE"}))]),
                "servers[0].tls: mode SIMPLE needs either credentialName or both serverCertificate and privateKey",
            ),
            (
                serde_json::json!([server(
                    "HTTPS",
                    serde_json::json!({"mode": "SIMPLE", "serverCertificate": "tls.crt", "privateKey": "/k"})
                )]),
                "servers[0].tls.serverCertificate: \"tls.crt\" is not an absolute path",
            ),
            (
                serde_json::json!([server(
                    "TLS",
                    serde_json::json!({"mode": "PASSTHROUGH", "credentialName": "c"})
                )]),
                "servers[0].tls: mode PASSTHROUGH takes no certificate (the destination terminates TLS)",
            ),
            (
                serde_json::json!([
                    server("HTTPS", simple.clone()),
                    server("TCP", serde_json::Value::Null)
                ]),
                "servers[1].port: port 443 is also servers[0]'s, which takes HTTP over TLS; servers sharing a port must take the same protocol and TLS mode",
            ),
            (
                serde_json::json!([server("UDP", serde_json::Value::Null)]),
                "servers[0].port.protocol: \"UDP\" is not supported (supported: HTTP, HTTPS, HTTP2, GRPC, TCP, TLS)",
            ),
        ] {
            assert_eq!(gw(servers), Err(want.to_owned()));
        }
    }

    #[test]
    fn tls_routes_need_a_gateway_and_sni_hosts() {
        let vs = |v: serde_json::Value| -> Result<(), String> {
            serde_json::from_value::<VirtualServiceSpec>(v)
                .map_err(|e| e.to_string())?
                .validate()
        };
        let route = serde_json::json!([{"destination": {"host": "db"}}]);
        assert_eq!(
            vs(
                serde_json::json!({"hosts": ["db.example"], "gateways": ["gw"],
                "tls": [{"match": [{"sniHosts": ["db.example"]}], "route": route}]})
            ),
            Ok(())
        );
        assert_eq!(
            vs(serde_json::json!({"hosts": ["db.example"],
                "tls": [{"match": [{"sniHosts": ["db.example"]}], "route": route}]})),
            Err("tls: routes by SNI are served at gateways only: bind the VirtualService to a Gateway".into())
        );
        assert_eq!(
            vs(
                serde_json::json!({"hosts": ["db.example"], "gateways": ["gw"],
                "tls": [{"match": [{"sniHosts": []}], "route": route}]})
            ),
            Err("tls[0].match[0].sniHosts: at least one host is required".into())
        );
    }
}

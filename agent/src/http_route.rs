//! HTTP routes as control compiled them from VirtualServices and DestinationRules: matching a
//! request (first route wins), and picking a destination by weight.
use std::{collections::BTreeMap, sync::Arc, time::Duration};

use anyhow::{Context as _, Result};
use hyper::{HeaderMap, Method, StatusCode};
use serde::Serialize;
use trellis_api as api;

use crate::state::Resolved;

#[derive(Debug, Serialize)]
pub struct HttpRoute {
    pub name: String,
    #[serde(skip)]
    matches: Vec<HttpMatch>,
    pub destinations: Vec<Destination>,
    /// Shared with every request the route decides.
    pub policy: Arc<Policy>,
}

/// What a route does to each request besides choosing where it goes.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Policy {
    /// Whole-request deadline, retries included.
    pub timeout: Option<Duration>,
    pub retry: Option<Retry>,
    pub fault: Fault,
    pub rewrite: Option<Rewrite>,
    pub request_headers: HeaderOps,
    pub response_headers: HeaderOps,
    /// Where copies of requests go, and for which share of them (0-100).
    pub mirror: Option<(Destination, f64)>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Rewrite {
    pub uri: Option<String>,
    pub authority: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct HeaderOps {
    pub set: Vec<(String, String)>,
    pub add: Vec<(String, String)>,
    pub remove: Vec<String>,
}

impl HeaderOps {
    fn new(h: Option<&api::HeaderOperations>) -> Result<Self> {
        let Some(h) = h else {
            return Ok(Self::default());
        };
        let pairs =
            |m: &std::collections::HashMap<String, String>| -> Result<Vec<(String, String)>> {
                let mut v: Vec<(String, String)> = m
                    .iter()
                    .map(|(k, v)| {
                        hyper::header::HeaderName::from_bytes(k.as_bytes())
                            .with_context(|| format!("bad header name {k:?}"))?;
                        hyper::header::HeaderValue::from_str(v)
                            .with_context(|| format!("bad value for header {k}"))?;
                        Ok((k.to_ascii_lowercase(), v.clone()))
                    })
                    .collect::<Result<_>>()?;
                v.sort();
                Ok(v)
            };
        Ok(Self {
            set: pairs(&h.set)?,
            add: pairs(&h.add)?,
            remove: h.remove.iter().map(|k| k.to_ascii_lowercase()).collect(),
        })
    }

    /// Applies the operations: remove, then set (replacing), then add (appending).
    pub fn apply(&self, headers: &mut HeaderMap) {
        use hyper::header::{HeaderName, HeaderValue};
        for k in &self.remove {
            headers.remove(k.as_str());
        }
        // Names and values were checked when the route was compiled.
        let parse = |k: &str, v: &str| {
            Some((
                HeaderName::from_bytes(k.as_bytes()).ok()?,
                HeaderValue::from_str(v).ok()?,
            ))
        };
        for (k, v) in &self.set {
            if let Some((k, v)) = parse(k, v) {
                headers.insert(k, v);
            }
        }
        for (k, v) in &self.add {
            if let Some((k, v)) = parse(k, v) {
                headers.append(k, v);
            }
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Retry {
    /// Tries after the first.
    pub attempts: u32,
    pub per_try_timeout: Option<Duration>,
    pub on: RetryOn,
}

/// Istio's retryOn conditions.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct RetryOn {
    pub server_error: bool,
    pub gateway_error: bool,
    pub connect_failure: bool,
    pub reset: bool,
    pub retriable_4xx: bool,
}

impl RetryOn {
    fn parse(conditions: &[String]) -> Result<Self> {
        let mut on = Self::default();
        for c in conditions {
            match c.as_str() {
                "5xx" => on.server_error = true,
                "gateway-error" => on.gateway_error = true,
                "connect-failure" => on.connect_failure = true,
                "reset" => on.reset = true,
                "retriable-4xx" => on.retriable_4xx = true,
                other => anyhow::bail!("unsupported retryOn condition {other:?}"),
            }
        }
        Ok(on)
    }

    /// Whether an answer with `status` is tried again.
    pub fn status(&self, status: StatusCode) -> bool {
        (self.server_error && status.is_server_error())
            || (self.gateway_error && matches!(status.as_u16(), 502..=504))
            || (self.retriable_4xx && status == StatusCode::CONFLICT)
    }
}

/// Fault injection: a share of requests delayed, a share answered without reaching upstream.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Fault {
    pub delay: Option<(Duration, f64)>,
    #[serde(serialize_with = "abort_status")]
    pub abort: Option<(StatusCode, f64)>,
}

fn abort_status<S: serde::Serializer>(
    abort: &Option<(StatusCode, f64)>,
    s: S,
) -> Result<S::Ok, S::Error> {
    abort.map(|(code, p)| (code.as_u16(), p)).serialize(s)
}

impl Fault {
    /// Rolls the dice for one request: (delay to add, status to answer instead).
    pub fn roll(&self) -> (Option<Duration>, Option<StatusCode>) {
        let hit = |percent: f64| fastrand::f64() * 100.0 < percent;
        (
            self.delay.filter(|(_, p)| hit(*p)).map(|(d, _)| d),
            self.abort.filter(|(_, p)| hit(*p)).map(|(s, _)| s),
        )
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Destination {
    /// `<namespace>/<name>` of the Service.
    pub service: String,
    /// The Service port; 0: the port the request came to.
    pub port: u16,
    pub subset: String,
    pub subset_labels: BTreeMap<String, String>,
    pub weight: u32,
    /// The subset's trafficPolicy, replacing the service's.
    pub traffic: Option<TrafficPolicy>,
    #[serde(skip)]
    pub resolved: Resolved,
}

/// A DestinationRule's trafficPolicy, as the proxy applies it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TrafficPolicy {
    pub lb: Lb,
    /// Requests with the same value of this header go to the same endpoint.
    pub hash_header: Option<String>,
    pub pool: Option<PoolLimits>,
    pub outlier: Option<Outlier>,
}

#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub enum Lb {
    #[default]
    RoundRobin,
    LeastRequest,
    Random,
}

#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq, Hash)]
pub struct PoolLimits {
    /// Requests in flight at once (HTTP/1: one per connection); 0: unlimited.
    pub max_active: u32,
    /// Requests waiting for one of those; beyond, 503 with `x-trellis-overflow: 1`.
    pub max_pending: u32,
    /// 0: unlimited.
    pub max_requests_per_connection: u32,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct Outlier {
    pub consecutive_5xx: u32,
    pub base_ejection: Duration,
    pub max_ejection_percent: u32,
}

impl TrafficPolicy {
    pub fn compile(tp: Option<&api::TrafficPolicy>) -> Self {
        use api::load_balancer::Simple;
        let Some(tp) = tp else {
            return Self::default();
        };
        let lb = tp.load_balancer.as_ref();
        Self {
            lb: match lb.map(|l| l.simple()) {
                Some(Simple::LeastRequest) => Lb::LeastRequest,
                Some(Simple::Random) => Lb::Random,
                _ => Lb::RoundRobin,
            },
            hash_header: lb.map(|l| l.hash_header.clone()).filter(|h| !h.is_empty()),
            pool: tp.connection_pool.as_ref().and_then(|cp| {
                // HTTP/1 upstreams carry one request per connection, so maxConnections and
                // http2MaxRequests both bound the requests in flight: the smaller wins.
                let active = [cp.max_connections, cp.http2_max_requests]
                    .into_iter()
                    .filter(|n| *n > 0)
                    .min()
                    .unwrap_or(0);
                let limits = PoolLimits {
                    max_active: active,
                    max_pending: cp.http1_max_pending_requests,
                    max_requests_per_connection: cp.max_requests_per_connection,
                };
                (limits.max_active > 0 || limits.max_requests_per_connection > 0).then_some(limits)
            }),
            outlier: tp
                .outlier_detection
                .as_ref()
                .filter(|o| o.consecutive_5xx_errors > 0)
                .map(|o| Outlier {
                    consecutive_5xx: o.consecutive_5xx_errors,
                    base_ejection: Duration::from_millis(u64::from(o.base_ejection_time_ms)),
                    max_ejection_percent: o.max_ejection_percent.min(100),
                }),
        }
    }
}

#[derive(Debug)]
struct HttpMatch {
    uri: Option<Matcher>,
    headers: Vec<(String, Matcher)>,
    method: Option<Matcher>,
}

#[derive(Debug)]
enum Matcher {
    Exact(String),
    Prefix(String),
    Regex(regex::Regex),
}

impl Matcher {
    fn new(m: &api::StringMatch) -> Result<Self> {
        use api::string_match::Kind;
        Ok(
            match m.kind.as_ref().context("a string match with no kind")? {
                Kind::Exact(s) => Matcher::Exact(s.clone()),
                Kind::Prefix(s) => Matcher::Prefix(s.clone()),
                // Istio (RE2) matches the whole value.
                Kind::Regex(re) => Matcher::Regex(
                    regex::Regex::new(&format!("^(?:{re})$"))
                        .with_context(|| format!("bad regex {re:?}"))?,
                ),
            },
        )
    }

    fn matches(&self, value: &str) -> bool {
        match self {
            Matcher::Exact(s) => value == s,
            Matcher::Prefix(s) => value.starts_with(s.as_str()),
            Matcher::Regex(re) => re.is_match(value),
        }
    }
}

pub(crate) fn destination(d: &api::WeightedDestination) -> Destination {
    Destination {
        service: d.service.clone(),
        port: u16::try_from(d.port).unwrap_or(0),
        subset: d.subset.clone(),
        subset_labels: d.subset_labels.clone().into_iter().collect(),
        weight: d.weight,
        traffic: d
            .subset_traffic_policy
            .as_ref()
            .map(|tp| TrafficPolicy::compile(Some(tp))),
        resolved: Resolved::default(),
    }
}

impl HttpRoute {
    pub fn compile(r: &api::HttpRoute) -> Result<Self> {
        let matches = r
            .matches
            .iter()
            .map(|m| {
                Ok(HttpMatch {
                    uri: m.uri.as_ref().map(Matcher::new).transpose()?,
                    headers: m
                        .headers
                        .iter()
                        .map(|(k, v)| Ok((k.to_ascii_lowercase(), Matcher::new(v)?)))
                        .collect::<Result<_>>()?,
                    method: m.method.as_ref().map(Matcher::new).transpose()?,
                })
            })
            .collect::<Result<_>>()
            .with_context(|| format!("route {}", r.name))?;
        let destinations = r.destinations.iter().map(destination).collect();
        let ms = |ms: u32| (ms > 0).then(|| Duration::from_millis(u64::from(ms)));
        let policy = Policy {
            timeout: ms(r.timeout_ms),
            retry: r
                .retries
                .as_ref()
                .filter(|x| x.attempts > 0)
                .map(|x| {
                    Ok::<_, anyhow::Error>(Retry {
                        attempts: x.attempts.min(10),
                        per_try_timeout: ms(x.per_try_timeout_ms),
                        on: RetryOn::parse(&x.retry_on)?,
                    })
                })
                .transpose()
                .with_context(|| format!("route {}", r.name))?,
            fault: match &r.fault {
                Some(f) => Fault {
                    delay: ms(f.delay_ms).map(|d| (d, f.delay_percent)),
                    abort: match f.abort_status {
                        0 => None,
                        s => Some((
                            u16::try_from(s)
                                .ok()
                                .and_then(|s| StatusCode::from_u16(s).ok())
                                .with_context(|| format!("route {}: abort status {s}", r.name))?,
                            f.abort_percent,
                        )),
                    },
                },
                None => Fault::default(),
            },
            rewrite: r.rewrite.as_ref().map(|w| Rewrite {
                uri: (!w.uri.is_empty()).then(|| w.uri.clone()),
                authority: (!w.authority.is_empty()).then(|| w.authority.clone()),
            }),
            mirror: r
                .mirror
                .as_ref()
                .map(|m| (destination(m), r.mirror_percent)),
            request_headers: HeaderOps::new(r.request_headers.as_ref())
                .with_context(|| format!("route {}: request headers", r.name))?,
            response_headers: HeaderOps::new(r.response_headers.as_ref())
                .with_context(|| format!("route {}: response headers", r.name))?,
        };
        Ok(Self {
            name: r.name.clone(),
            matches,
            destinations,
            policy: Arc::new(policy),
        })
    }

    /// Whether the request matches: any one match (each of whose conditions must hold), or
    /// always when the route has none.
    pub fn matches(&self, method: &Method, path: &str, headers: &HeaderMap) -> bool {
        self.matched(method, path, headers).is_some()
    }

    /// The match that selected the request: Some(uri prefix it matched on, if it was a prefix
    /// match), for the URI rewrite; None when the route does not match.
    pub fn matched(
        &self,
        method: &Method,
        path: &str,
        headers: &HeaderMap,
    ) -> Option<Option<&str>> {
        if self.matches.is_empty() {
            return Some(None);
        }
        self.matches
            .iter()
            .find(|m| {
                m.uri.as_ref().is_none_or(|u| u.matches(path))
                    && m.method.as_ref().is_none_or(|x| x.matches(method.as_str()))
                    && m.headers.iter().all(|(name, x)| {
                        headers
                            .get(name.as_str())
                            .and_then(|v| v.to_str().ok())
                            .is_some_and(|v| x.matches(v))
                    })
            })
            .map(|m| match &m.uri {
                Some(Matcher::Prefix(p)) => Some(p.as_str()),
                _ => None,
            })
    }

    /// A destination chosen at random in proportion to the weights; None if all are zero.
    pub fn pick(&self) -> Option<&Destination> {
        pick(&self.destinations)
    }
}

/// One of `destinations` (an HTTP or a TCP route's) chosen at random in proportion to the
/// weights; None if all are zero.
pub fn pick(destinations: &[Destination]) -> Option<&Destination> {
    // Summed as u64: control sends weights of 0-100, but the agent checks no total, and u32
    // weights overflow a u32 sum (found by fuzzing, fuzz/ http_route).
    let total: u64 = destinations.iter().map(|d| u64::from(d.weight)).sum();
    if total == 0 {
        return None;
    }
    let mut r = fastrand::u64(0..total);
    destinations.iter().find(|d| {
        let w = u64::from(d.weight);
        if r < w {
            return true;
        }
        r -= w;
        false
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sm(kind: api::string_match::Kind) -> Option<api::StringMatch> {
        Some(api::StringMatch { kind: Some(kind) })
    }

    #[test]
    fn matches_uri_headers_and_method_and_picks_by_weight() {
        use api::string_match::Kind;
        let route = HttpRoute::compile(&api::HttpRoute {
            name: "shop/reviews/0".into(),
            matches: vec![
                api::HttpMatch {
                    headers: [(
                        "End-User".to_owned(),
                        api::StringMatch {
                            kind: Some(Kind::Exact("jason".into())),
                        },
                    )]
                    .into(),
                    ..Default::default()
                },
                api::HttpMatch {
                    uri: sm(Kind::Regex("/api/v[0-9]+/.*".into())),
                    method: sm(Kind::Exact("POST".into())),
                    ..Default::default()
                },
            ],
            destinations: vec![
                api::WeightedDestination {
                    service: "shop/reviews".into(),
                    subset: "v1".into(),
                    weight: 80,
                    ..Default::default()
                },
                api::WeightedDestination {
                    service: "shop/reviews".into(),
                    subset: "v2".into(),
                    weight: 20,
                    ..Default::default()
                },
            ],
            ..Default::default()
        })
        .unwrap();
        let mut h = HeaderMap::new();
        assert!(!route.matches(&Method::GET, "/", &h));
        h.insert("end-user", "jason".parse().unwrap());
        assert!(route.matches(&Method::GET, "/", &h));
        let h = HeaderMap::new();
        assert!(route.matches(&Method::POST, "/api/v2/x", &h));
        assert!(!route.matches(&Method::GET, "/api/v2/x", &h));
        assert!(
            !route.matches(&Method::POST, "/x/api/v2/x", &h),
            "regex is anchored"
        );
        let v2 = (0..10_000)
            .filter(|_| route.pick().unwrap().subset == "v2")
            .count();
        assert!((1_700..2_300).contains(&v2), "{v2} of 10000 to v2");

        let bad = api::HttpRoute {
            matches: vec![api::HttpMatch {
                uri: sm(Kind::Regex("(".into())),
                ..Default::default()
            }],
            ..Default::default()
        };
        assert!(HttpRoute::compile(&bad).is_err());
    }

    /// fuzz/ http_route's crash: weights whose sum overflows a u32 panicked (debug) or skewed
    /// and emptied the choice (release).
    #[test]
    fn weights_summing_past_u32_are_still_picked_in_proportion() {
        let route = |weights: &[u32]| {
            HttpRoute::compile(&api::HttpRoute {
                destinations: weights
                    .iter()
                    .enumerate()
                    .map(|(i, w)| api::WeightedDestination {
                        subset: i.to_string(),
                        weight: *w,
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            })
            .unwrap()
        };
        let r = route(&[u32::MAX, u32::MAX, 0]);
        let second = (0..1_000)
            .filter(|_| r.pick().unwrap().subset == "1")
            .count();
        assert!(
            (400..600).contains(&second),
            "{second} of 1000 to the second"
        );
        // Wrapped to 0 in a u32, which meant "every weight is 0".
        assert!(route(&[1 << 31, 1 << 31]).pick().is_some());
    }
}

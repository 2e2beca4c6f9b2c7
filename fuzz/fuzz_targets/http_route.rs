//! HTTP route matching and weighted choice (agent/src/http_route.rs): routes as control might
//! send them, requests as a client might send them. Nothing panics; a matched route either
//! picks one of its own destinations or, only when every weight is 0, none; a prefix match
//! reports a prefix of the path.
#![no_main]

use arbitrary::Arbitrary;
use hyper::{
    HeaderMap, Method,
    header::{HeaderName, HeaderValue},
};
use libfuzzer_sys::fuzz_target;
use trellis_agent::http_route::HttpRoute;
use trellis_api as api;

#[derive(Arbitrary, Debug)]
enum Str {
    Exact(String),
    Prefix(String),
    Regex(String),
    /// A match with no kind, which the agent must refuse rather than match everything.
    Missing,
}

impl Str {
    fn api(self) -> api::StringMatch {
        use api::string_match::Kind;
        api::StringMatch {
            kind: match self {
                Str::Exact(s) => Some(Kind::Exact(s)),
                Str::Prefix(s) => Some(Kind::Prefix(s)),
                Str::Regex(s) => Some(Kind::Regex(s)),
                Str::Missing => None,
            },
        }
    }
}

#[derive(Arbitrary, Debug)]
struct Match {
    uri: Option<Str>,
    method: Option<Str>,
    headers: Vec<(String, Str)>,
}

#[derive(Arbitrary, Debug)]
struct Route {
    matches: Vec<Match>,
    destinations: Vec<(String, u32, String, u32)>,
    timeout_ms: u32,
    retries: Option<(u32, u32, Vec<String>)>,
    fault: Option<(u32, f64, u32, f64)>,
    request_headers: Vec<(String, String)>,
    remove_headers: Vec<String>,
}

#[derive(Arbitrary, Debug)]
struct Input {
    routes: Vec<Route>,
    method: Vec<u8>,
    path: String,
    headers: Vec<(Vec<u8>, Vec<u8>)>,
    seed: u64,
}

fn api_route(i: usize, r: Route) -> api::HttpRoute {
    api::HttpRoute {
        name: format!("shop/fuzz/{i}"),
        matches: r
            .matches
            .into_iter()
            .map(|m| api::HttpMatch {
                uri: m.uri.map(Str::api),
                method: m.method.map(Str::api),
                headers: m.headers.into_iter().map(|(k, v)| (k, v.api())).collect(),
                port: 0,
            })
            .collect(),
        destinations: r
            .destinations
            .into_iter()
            .map(|(service, port, subset, weight)| api::WeightedDestination {
                service,
                port,
                subset,
                weight,
                ..Default::default()
            })
            .collect(),
        timeout_ms: r.timeout_ms,
        retries: r
            .retries
            .map(|(attempts, per_try_timeout_ms, retry_on)| api::HttpRetry {
                attempts,
                per_try_timeout_ms,
                retry_on,
            }),
        fault: r
            .fault
            .map(
                |(delay_ms, delay_percent, abort_status, abort_percent)| api::HttpFault {
                    delay_ms,
                    delay_percent,
                    abort_status,
                    abort_percent,
                },
            ),
        request_headers: Some(api::HeaderOperations {
            set: r.request_headers.into_iter().collect(),
            remove: r.remove_headers,
            ..Default::default()
        }),
        ..Default::default()
    }
}

fuzz_target!(|input: Input| {
    fastrand::seed(input.seed);
    let Ok(method) = Method::from_bytes(&input.method) else {
        return;
    };
    let mut headers = HeaderMap::new();
    for (k, v) in &input.headers {
        if let (Ok(k), Ok(v)) = (HeaderName::from_bytes(k), HeaderValue::from_bytes(v)) {
            headers.append(k, v);
        }
    }
    let routes: Vec<HttpRoute> = input
        .routes
        .into_iter()
        .enumerate()
        .filter_map(|(i, r)| HttpRoute::compile(&api_route(i, r)).ok())
        .collect();
    // First route that matches wins, as in `MeshState::route_http`.
    let Some((route, prefix)) = routes
        .iter()
        .find_map(|r| Some((r, r.matched(&method, &input.path, &headers)?)))
    else {
        return;
    };
    if let Some(p) = prefix {
        assert!(
            input.path.starts_with(p),
            "{p:?} is not a prefix of {:?}",
            input.path
        );
    }
    match route.pick() {
        Some(d) => {
            assert!(
                route.destinations.iter().any(|x| std::ptr::eq(x, d)),
                "not one of the route's"
            );
            assert!(d.weight > 0, "a destination of weight 0 was chosen");
        }
        None => assert!(route.destinations.iter().all(|d| d.weight == 0)),
    }
    let _ = route.policy.fault.roll();
    route.policy.request_headers.apply(&mut headers);
});

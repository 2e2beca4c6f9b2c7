//! `trellisctl graph`: a live service graph from the agents' Istio metrics, served as one static
//! page and `/graph.json`. A scraper task (the only owner of the scrapes) reads every agent's
//! `/metrics` each interval and publishes the graph of the last two scrapes.
use std::{
    collections::{BTreeMap, BTreeSet},
    convert::Infallible,
    net::SocketAddr,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use http_body_util::Full;
use hyper::{Response, StatusCode, body::Bytes, header, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::sync::watch;

use crate::{
    prom::{Sample, histogram_quantile},
    stat,
    targets::Agent,
};

const PAGE: &str = include_str!("graph.html");

/// One edge: traffic from a workload to a workload (or to a service outside the mesh).
#[derive(Debug, Default, Clone, Serialize, PartialEq)]
pub struct Edge {
    pub source: String,
    pub destination: String,
    /// `http`, `grpc` or `tcp`.
    pub protocol: String,
    pub rps: f64,
    /// Share of requests answered 5xx.
    pub error_rate: f64,
    pub p99_ms: Option<f64>,
    /// Every connection mutual TLS.
    pub mtls: bool,
    /// Bytes per second, both ways (TCP).
    pub bytes_per_second: f64,
}

#[derive(Debug, Default, Clone, Serialize, PartialEq)]
pub struct Graph {
    pub nodes: Vec<String>,
    pub edges: Vec<Edge>,
    /// Why the last scrape failed, if it did (the graph is then the last good one).
    pub error: Option<String>,
}

/// Serves the page and the graph on `listen` until stopped.
pub async fn serve(listen: SocketAddr, agents: Vec<Agent>, interval: Duration) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen} (set --listen)"))?;
    println!("serving the graph on http://{}/", listener.local_addr()?);
    let (tx, rx) = watch::channel(Graph::default());
    tokio::spawn(scrape_loop(agents, interval, tx));
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let rx = rx.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let resp = match req.uri().path() {
                    "/" => reply(StatusCode::OK, "text/html; charset=utf-8", PAGE.into()),
                    "/graph.json" => reply(
                        StatusCode::OK,
                        "application/json",
                        serde_json::to_string(&*rx.borrow()).unwrap_or_default(),
                    ),
                    _ => reply(
                        StatusCode::NOT_FOUND,
                        "text/plain",
                        "try / or /graph.json\n".into(),
                    ),
                };
                async move { Ok::<_, Infallible>(resp) }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn reply(code: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = code;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    resp
}

async fn scrape_loop(agents: Vec<Agent>, interval: Duration, tx: watch::Sender<Graph>) {
    let mut last: Option<(Instant, Vec<Sample>)> = None;
    loop {
        match stat::scrape(&agents).await {
            Ok(now) => {
                let at = Instant::now();
                if let Some((then, before)) = &last {
                    tx.send_replace(build(before, &now, at - *then));
                }
                last = Some((at, now));
            }
            Err(e) => tx.send_modify(|g| g.error = Some(format!("{e:#}"))),
        }
        tokio::time::sleep(interval).await;
    }
}

type Key = (String, String, String);

/// An edge being summed: the edge, its 5xx per second, and its latency buckets by `le`.
type Sum = (Edge, f64, BTreeMap<String, (f64, f64)>);

/// The graph between two scrapes: requests and TCP traffic as the destinations' proxies report
/// them, and as the callers' report traffic to destinations outside the mesh.
pub fn build(before: &[Sample], after: &[Sample], window: Duration) -> Graph {
    // Services whose destinations report them; a caller's report of one with no workload is
    // the same traffic seen before routing (an HTTP port's connection), not another edge.
    let reported: BTreeSet<&str> = after
        .iter()
        .filter(|s| s.label("reporter") == "destination")
        .map(|s| s.label("destination_service"))
        .collect();
    let counted = |s: &Sample| match s.label("reporter") {
        "destination" => true,
        "source" => {
            s.label("destination_workload") == "unknown"
                && !reported.contains(s.label("destination_service"))
        }
        _ => false,
    };
    let key = |s: &Sample| -> Key {
        let workload = |ns: &str, w: &str| format!("{}/{}", s.label(ns), s.label(w));
        let source = if s.label("source_workload") == "unknown" {
            "unknown".to_owned()
        } else {
            workload("source_workload_namespace", "source_workload")
        };
        let destination = if s.label("destination_workload") == "unknown" {
            s.label("destination_service").to_owned()
        } else {
            workload("destination_workload_namespace", "destination_workload")
        };
        (source, destination, s.label("request_protocol").to_owned())
    };
    let old: BTreeMap<(&str, &BTreeMap<String, String>), f64> = before
        .iter()
        .filter(|s| counted(s))
        .map(|s| ((s.name.as_str(), &s.labels), s.value))
        .collect();
    let secs = window.as_secs_f64().max(0.001);
    let mut edges: BTreeMap<Key, Sum> = BTreeMap::new();
    for s in after.iter().filter(|s| counted(s)) {
        let grown = s.value
            - old
                .get(&(s.name.as_str(), &s.labels))
                .copied()
                .filter(|w| *w <= s.value)
                .unwrap_or(0.0);
        let k = key(s);
        let (edge, errors, buckets) = edges.entry(k.clone()).or_insert_with(|| {
            let e = Edge {
                source: k.0.clone(),
                destination: k.1.clone(),
                protocol: k.2.clone(),
                mtls: true,
                ..Default::default()
            };
            (e, 0.0, BTreeMap::new())
        });
        edge.mtls &= s.label("connection_security_policy") == "mutual_tls";
        match s.name.as_str() {
            "istio_requests_total" => {
                edge.rps += grown / secs;
                if s.label("response_code").starts_with('5') {
                    *errors += grown / secs;
                }
            }
            "istio_request_duration_milliseconds_bucket" => {
                let le = s.label("le").to_owned();
                let bound = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().unwrap_or(f64::NAN)
                };
                buckets.entry(le).or_insert((bound, 0.0)).1 += grown;
            }
            "istio_tcp_sent_bytes_total" | "istio_tcp_received_bytes_total" => {
                edge.bytes_per_second += grown / secs;
            }
            _ => {}
        }
    }
    let mut nodes = BTreeSet::new();
    let edges = edges
        .into_values()
        .map(|(mut e, errors, buckets)| {
            if e.rps > 0.0 {
                e.error_rate = errors / e.rps;
            }
            let b: Vec<(f64, f64)> = buckets.into_values().filter(|(b, _)| !b.is_nan()).collect();
            e.p99_ms = histogram_quantile(0.99, &b);
            nodes.insert(e.source.clone());
            nodes.insert(e.destination.clone());
            e
        })
        .filter(|e| e.rps > 0.0 || e.bytes_per_second > 0.0)
        .collect();
    Graph {
        nodes: nodes.into_iter().collect(),
        edges,
        error: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prom::parse;

    #[test]
    fn edges_carry_rates_errors_latency_mtls_and_bytes() {
        let l = |reporter: &str, src: &str, dst: &str, svc: &str, proto: &str, extra: &str| {
            format!(
                "{{reporter=\"{reporter}\",source_workload=\"{src}\",source_workload_namespace=\"shop\",\
                 destination_workload=\"{dst}\",destination_workload_namespace=\"shop\",destination_service=\"{svc}\",\
                 request_protocol=\"{proto}\",connection_security_policy=\"mutual_tls\"{extra}}}"
            )
        };
        let web = "web.shop.svc.cluster.local";
        let db = "db.shop.svc.cluster.local";
        let before = parse(&format!(
            "istio_requests_total{} 10\nistio_tcp_sent_bytes_total{} 1000\n",
            l(
                "destination",
                "user",
                "web",
                web,
                "http",
                ",response_code=\"200\""
            ),
            l("destination", "web", "db", db, "tcp", ""),
        ))
        .unwrap();
        let after = parse(&format!(
            "istio_requests_total{} 30\nistio_requests_total{} 5\n\
             istio_request_duration_milliseconds_bucket{} 20\nistio_request_duration_milliseconds_bucket{} 25\n\
             istio_requests_total{} 999\n\
             istio_tcp_sent_bytes_total{} 3000\nistio_tcp_received_bytes_total{} 2000\n\
             istio_tcp_sent_bytes_total{} 500\nistio_tcp_sent_bytes_total{} 700\n",
            l("destination", "user", "web", web, "http", ",response_code=\"200\""),
            l("destination", "user", "web", web, "http", ",response_code=\"503\""),
            l("destination", "user", "web", web, "http", ",response_code=\"200\",le=\"10\""),
            l("destination", "user", "web", web, "http", ",response_code=\"200\",le=\"+Inf\""),
            l("source", "user", "web", web, "http", ",response_code=\"200\""),
            l("destination", "web", "db", db, "tcp", ""),
            l("destination", "web", "db", db, "tcp", ""),
            l("source", "cart", "unknown", "redis.example", "tcp", ""),
            // The caller's view of an HTTP port's connection: the destinations report web.
            l("source", "user", "unknown", web, "tcp", ""),
        ))
        .unwrap();
        let g = build(&before, &after, Duration::from_secs(5));
        assert_eq!(
            g.nodes,
            [
                "redis.example",
                "shop/cart",
                "shop/db",
                "shop/user",
                "shop/web"
            ]
        );
        assert_eq!(g.edges.len(), 3, "{:?}", g.edges);
        let web = g
            .edges
            .iter()
            .find(|e| e.destination == "shop/web")
            .unwrap();
        assert_eq!(
            (web.source.as_str(), web.protocol.as_str()),
            ("shop/user", "http")
        );
        assert_eq!(
            web.rps, 5.0,
            "the source's report of the same requests is not counted again"
        );
        assert_eq!(web.error_rate, 0.2);
        assert!(web.mtls);
        assert_eq!(web.p99_ms, Some(10.0));
        let db = g.edges.iter().find(|e| e.destination == "shop/db").unwrap();
        assert_eq!(db.bytes_per_second, 800.0);
        let out = g.edges.iter().find(|e| e.source == "shop/cart").unwrap();
        assert_eq!(
            (out.destination.as_str(), out.bytes_per_second),
            ("redis.example", 100.0)
        );
    }
}

//! `trellisctl graph`: a live service graph, served as one static page and `/graph.json`, as
//! Kiali draws it: workload → service → workload, from the destination proxies' Istio metrics.
//! With `--prometheus`, rates over the last minute from its API; without, a scraper task (the
//! only owner of the scrapes) reads every agent's `/metrics` each interval and takes the rates
//! between the last two scrapes.
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
    fetch::Endpoint,
    prom::{Sample, histogram_quantile},
    prometheus::query_vector,
    stat,
    targets::Agent,
};

const PAGE: &str = include_str!("graph.html");

/// One edge: a workload calling a service, or a service's traffic reaching a workload. One per
/// pair, as Kiali draws them: requests and TCP bytes on it summed.
#[derive(Debug, Default, Clone, Serialize, PartialEq)]
pub struct Edge {
    /// `workload:NS/NAME`, `service:NS/NAME` (or `service:HOST` outside the mesh).
    pub source: String,
    pub target: String,
    /// The requests' protocol (`http`, `grpc`), or `tcp` for connections alone.
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
    /// Why the last update failed, if it did (the graph is then the last good one).
    pub error: Option<String>,
}

/// Where the graph's figures come from.
pub enum Source {
    Agents(Vec<Agent>),
    Prometheus(Endpoint),
}

/// Serves the page and the graph on `listen` until stopped.
pub async fn serve(listen: SocketAddr, source: Source, interval: Duration) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen} (set --listen)"))?;
    println!("serving the graph on http://{}/", listener.local_addr()?);
    let (tx, rx) = watch::channel(Graph::default());
    tokio::spawn(update_loop(source, interval, tx));
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

async fn update_loop(source: Source, interval: Duration, tx: watch::Sender<Graph>) {
    let mut last: Option<(Instant, Vec<Sample>)> = None;
    loop {
        let update = match &source {
            Source::Prometheus(p) => from_prometheus(p).await.map(|rates| Some(build(&rates))),
            Source::Agents(agents) => stat::scrape(agents).await.map(|now| {
                let at = Instant::now();
                let graph = last
                    .as_ref()
                    .map(|(then, before)| build(&rates(before, &now, at - *then)));
                last = Some((at, now));
                graph
            }),
        };
        match update {
            Ok(Some(graph)) => {
                tx.send_replace(graph);
            }
            Ok(None) => {}
            Err(e) => tx.send_modify(|g| g.error = Some(format!("{e:#}"))),
        }
        tokio::time::sleep(interval).await;
    }
}

/// The labels an edge is told by.
const BY: &str = "reporter, source_workload, source_workload_namespace, destination_workload, \
    destination_workload_namespace, destination_service, destination_service_name, \
    destination_service_namespace, request_protocol, connection_security_policy";

/// Per-second rates over the last minute, per edge's labels, as samples named by their metric.
async fn from_prometheus(prometheus: &Endpoint) -> Result<Vec<Sample>> {
    let mut out = Vec::new();
    for (metric, extra) in [
        ("istio_requests_total", ", response_code"),
        ("istio_request_duration_milliseconds_bucket", ", le"),
        ("istio_tcp_sent_bytes_total", ""),
        ("istio_tcp_received_bytes_total", ""),
    ] {
        let promql = format!("sum by ({BY}{extra}) (rate({metric}[1m]))");
        for mut s in query_vector(prometheus, &promql).await? {
            s.name = metric.to_owned();
            out.push(s);
        }
    }
    Ok(out)
}

/// Each counter's growth between two scrapes, per second (a counter that went down, an agent
/// that restarted, counts from zero).
pub fn rates(before: &[Sample], after: &[Sample], window: Duration) -> Vec<Sample> {
    let old: BTreeMap<(&str, &BTreeMap<String, String>), f64> = before
        .iter()
        .map(|s| ((s.name.as_str(), &s.labels), s.value))
        .collect();
    let secs = window.as_secs_f64().max(0.001);
    after
        .iter()
        .map(|s| {
            let was = old
                .get(&(s.name.as_str(), &s.labels))
                .copied()
                .filter(|w| *w <= s.value)
                .unwrap_or(0.0);
            Sample {
                value: (s.value - was) / secs,
                ..s.clone()
            }
        })
        .collect()
}

type Key = (String, String);

/// An edge being summed: the edge, its 5xx per second, and its latency buckets by `le`.
type Sum = (Edge, f64, BTreeMap<String, (f64, f64)>);

/// The graph from per-second rates: requests and TCP traffic as the destinations' proxies
/// report them, and as the callers' report traffic to destinations that report nothing
/// (outside the mesh).
pub fn build(rates: &[Sample]) -> Graph {
    // Services whose destinations report them; a caller's report of one with no workload is
    // the same traffic seen before routing (an HTTP port's connection), not another edge.
    let reported: BTreeSet<&str> = rates
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
    let mut edges: BTreeMap<Key, Sum> = BTreeMap::new();
    for s in rates.iter().filter(|s| counted(s)) {
        let known = |v: &str| !v.is_empty() && v != "unknown";
        let workload = |ns: &str, w: &str| {
            if known(s.label(w)) {
                format!("workload:{}/{}", s.label(ns), s.label(w))
            } else {
                "workload:unknown".to_owned()
            }
        };
        let service = if known(s.label("destination_service_name")) {
            format!(
                "service:{}/{}",
                s.label("destination_service_namespace"),
                s.label("destination_service_name")
            )
        } else {
            format!("service:{}", s.label("destination_service"))
        };
        let source = workload("source_workload_namespace", "source_workload");
        let mut hops = vec![(source, service.clone())];
        if known(s.label("destination_workload")) {
            hops.push((
                service,
                workload("destination_workload_namespace", "destination_workload"),
            ));
        }
        for k in hops {
            let (edge, errors, buckets) = edges.entry(k.clone()).or_insert_with(|| {
                let e = Edge {
                    source: k.0.clone(),
                    target: k.1.clone(),
                    mtls: true,
                    ..Default::default()
                };
                (e, 0.0, BTreeMap::new())
            });
            edge.mtls &= s.label("connection_security_policy") == "mutual_tls";
            let protocol = s.label("request_protocol");
            match s.name.as_str() {
                "istio_requests_total" | "istio_request_duration_milliseconds_bucket"
                    if protocol != "tcp" =>
                {
                    edge.protocol = protocol.to_owned()
                }
                _ if edge.protocol.is_empty() => edge.protocol = "tcp".into(),
                _ => {}
            }
            match s.name.as_str() {
                "istio_requests_total" => {
                    edge.rps += s.value;
                    if s.label("response_code").starts_with('5') {
                        *errors += s.value;
                    }
                }
                "istio_request_duration_milliseconds_bucket" => {
                    let le = s.label("le").to_owned();
                    let bound = if le == "+Inf" {
                        f64::INFINITY
                    } else {
                        le.parse().unwrap_or(f64::NAN)
                    };
                    buckets.entry(le).or_insert((bound, 0.0)).1 += s.value;
                }
                "istio_tcp_sent_bytes_total" | "istio_tcp_received_bytes_total" => {
                    edge.bytes_per_second += s.value;
                }
                _ => {}
            }
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
            e
        })
        .filter(|e| e.rps > 0.0 || e.bytes_per_second > 0.0)
        .inspect(|e| {
            nodes.insert(e.source.clone());
            nodes.insert(e.target.clone());
        })
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
    fn edges_go_workload_to_service_to_workload_with_their_figures() {
        let l = |reporter: &str, src: &str, dst: &str, svc: &str, proto: &str, extra: &str| {
            let (name, ns) = match svc.split_once('.') {
                Some((n, rest)) if rest.starts_with("shop.svc") => (n, "shop"),
                _ => ("", ""),
            };
            format!(
                "{{reporter=\"{reporter}\",source_workload=\"{src}\",source_workload_namespace=\"shop\",\
                 destination_workload=\"{dst}\",destination_workload_namespace=\"shop\",destination_service=\"{svc}\",\
                 destination_service_name=\"{name}\",destination_service_namespace=\"{ns}\",\
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
                "web-1",
                web,
                "http",
                ",response_code=\"200\""
            ),
            l("destination", "web-1", "db", db, "tcp", ""),
        ))
        .unwrap();
        let after = parse(&format!(
            "istio_requests_total{} 30\nistio_requests_total{} 5\n\
             istio_request_duration_milliseconds_bucket{} 20\nistio_request_duration_milliseconds_bucket{} 25\n\
             istio_requests_total{} 999\n\
             istio_tcp_sent_bytes_total{} 3000\nistio_tcp_received_bytes_total{} 2000\n\
             istio_tcp_sent_bytes_total{} 500\nistio_tcp_sent_bytes_total{} 700\n",
            l("destination", "user", "web-1", web, "http", ",response_code=\"200\""),
            l("destination", "user", "web-1", web, "http", ",response_code=\"503\""),
            l("destination", "user", "web-1", web, "http", ",response_code=\"200\",le=\"10\""),
            l("destination", "user", "web-1", web, "http", ",response_code=\"200\",le=\"+Inf\""),
            l("source", "user", "web-1", web, "http", ",response_code=\"200\""),
            l("destination", "web-1", "db", db, "tcp", ""),
            l("destination", "web-1", "db", db, "tcp", ""),
            l("source", "cart", "unknown", "redis.example", "tcp", ""),
            // The caller's view of an HTTP port's connection: the destinations report web.
            l("source", "user", "unknown", web, "tcp", ""),
        ))
        .unwrap();
        let g = build(&rates(&before, &after, Duration::from_secs(5)));
        assert_eq!(
            g.nodes,
            [
                "service:redis.example",
                "service:shop/db",
                "service:shop/web",
                "workload:shop/cart",
                "workload:shop/db",
                "workload:shop/user",
                "workload:shop/web-1",
            ]
        );
        let edge = |from: &str, to: &str| {
            g.edges
                .iter()
                .find(|e| e.source == from && e.target == to)
                .unwrap_or_else(|| panic!("no {from} -> {to} in {:?}", g.edges))
        };
        assert_eq!(
            edge("workload:shop/web-1", "service:shop/db").protocol,
            "tcp"
        );
        for (from, to) in [
            ("workload:shop/user", "service:shop/web"),
            ("service:shop/web", "workload:shop/web-1"),
        ] {
            let e = edge(from, to);
            assert_eq!(e.protocol, "http");
            assert_eq!(e.rps, 5.0, "the source's report is not counted again");
            assert_eq!(e.error_rate, 0.2);
            assert!(e.mtls);
            assert_eq!(e.p99_ms, Some(10.0));
        }
        assert_eq!(
            edge("workload:shop/web-1", "service:shop/db").bytes_per_second,
            800.0
        );
        assert_eq!(
            edge("workload:shop/cart", "service:redis.example").bytes_per_second,
            100.0
        );
        assert_eq!(g.edges.len(), 5, "{:?}", g.edges);
    }
}

//! What a person looks at: a real Prometheus scrapes both agents and control while the shop
//! serves HTTP and TCP under STRICT mutual TLS, and answers the PromQL that Istio's dashboards
//! and Kiali's graph run, with Istio's labels; every panel of the Grafana dashboard in
//! deploy/grafana returns data.
mod shop;

use std::time::{Duration, Instant};

use serde_json::Value;
use shop::*;
use trellis_e2e::{prometheus::Prometheus, serde_json};

/// Every label Istio's standard request metrics carry (docs/observability.md), but
/// `grpc_response_status`, which Trellis does not fill.
const ISTIO_LABELS: [&str; 24] = [
    "reporter",
    "source_workload",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_canonical_service",
    "source_canonical_revision",
    "source_cluster",
    "destination_workload",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_service",
    "destination_service_name",
    "destination_service_namespace",
    "destination_canonical_service",
    "destination_canonical_revision",
    "destination_cluster",
    "request_protocol",
    "response_code",
    "response_flags",
    "connection_security_policy",
];

const SERVICE: &str = "server.shop.svc.cluster.local";

/// Sends HTTP requests and TCP bytes from client to server through the mesh for `secs`
/// seconds (at most 200 requests), so Prometheus sees the counters grow across scrapes: paced,
/// since 200 unpaced requests can all land between two 1 s scrapes, and a series that first
/// appears at its final value has a rate of zero.
fn traffic(shop: &Shop, secs: u64) -> usize {
    let url = format!("http://{VIP}:8081/");
    let start = Instant::now();
    let mut requests = 0;
    while start.elapsed() < Duration::from_secs(secs) && requests < 200 {
        std::thread::sleep(Duration::from_millis(20));
        let body = http_get(&shop.client, &url, &[]);
        assert_eq!(body["client_identity"], spiffe("shop", "client"), "{body}");
        requests += 1;
        if requests % 10 == 0 {
            let out = blast(&shop.client, shop.vip(7000), 64 << 10);
            assert_eq!(out["ok"], true, "{out}");
        }
    }
    requests
}

fn label<'a>(series: &'a Value, name: &str) -> &'a str {
    series["metric"][name].as_str().unwrap_or("")
}

fn value(series: &Value) -> f64 {
    series["value"][1]
        .as_str()
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN)
}

/// The series of `promql` once one satisfies `ok` (Prometheus needs two scrapes for a rate).
fn eventually(prom: &Prometheus, promql: &str, ok: impl Fn(&Value) -> bool) -> Vec<Value> {
    let mut last = Vec::new();
    prom.wait(promql, Duration::from_secs(20), |p| {
        last = p.query(promql);
        last.iter().any(&ok)
    });
    last
}

#[test]
fn prometheus_answers_istios_dashboard_and_kiali_queries_from_both_reporters() {
    let shop = Shop::start();
    shop.control.write("pa.yaml", &peer_auth("STRICT"));
    shop.eventually("STRICT enforced", || {
        shop.outsider
            .connect(addr(shop.server.ip4, 8080), "x")
            .get("banner")
            .is_none()
    });
    let prom = Prometheus::start(&shop.cluster);
    prom.wait_targets_up(3);
    let sent = traffic(&shop, 4);
    assert!(sent >= 5, "only {sent} requests in 4 s");

    // Istio's workload dashboard: incoming requests by workload and code, from the server's side.
    let q = "sum(rate(istio_requests_total{reporter=\"destination\"}[1m])) by (destination_workload, destination_workload_namespace, response_code)";
    let series = eventually(&prom, q, |s| {
        label(s, "destination_workload") == "server" && value(s) > 0.0
    });
    let s = series
        .iter()
        .find(|s| label(s, "destination_workload") == "server")
        .unwrap();
    assert_eq!(
        (
            label(s, "destination_workload_namespace"),
            label(s, "response_code")
        ),
        ("shop", "200"),
        "{series:?}"
    );

    // Its latency panel: a p99 that is a number of milliseconds.
    let q = "histogram_quantile(0.99, sum(rate(istio_request_duration_milliseconds_bucket{reporter=\"destination\"}[1m])) by (le, destination_workload))";
    let series = eventually(&prom, q, |s| label(s, "destination_workload") == "server");
    let p99 = value(&series[0]);
    assert!(p99.is_finite() && p99 > 0.0, "p99 {p99}: {series:?}");

    // TCP bytes, from the server's side, between named workloads.
    let q = "sum(rate(istio_tcp_sent_bytes_total{reporter=\"destination\"}[1m])) by (source_workload, destination_workload)";
    eventually(&prom, q, |s| {
        label(s, "source_workload") == "client"
            && label(s, "destination_workload") == "server"
            && value(s) > 0.0
    });
    // The destination side names the Service the client addressed, though the tunnel named the pod.
    let q = "sum(istio_tcp_received_bytes_total{reporter=\"destination\", destination_workload=\"server\"}) by (destination_service, destination_service_name, destination_service_namespace)";
    let series = eventually(&prom, q, |s| value(s) > 0.0);
    assert!(
        series
            .iter()
            .all(|s| label(s, "destination_service") == SERVICE
                && label(s, "destination_service_name") == "server"
                && label(s, "destination_service_namespace") == "shop"),
        "{series:?}"
    );

    // Under STRICT no request leaves without mutual TLS: the query Istio's mesh dashboard uses
    // is empty (or zero), while the same requests are there with mutual_tls.
    let plain = prom.query("sum(rate(istio_requests_total{reporter=\"source\", connection_security_policy!=\"mutual_tls\"}[1m]))");
    assert!(plain.iter().all(|s| value(s) == 0.0), "{plain:?}");
    eventually(
        &prom,
        "sum(rate(istio_requests_total{reporter=\"source\", connection_security_policy=\"mutual_tls\"}[1m]))",
        |s| value(s) > 0.0,
    );

    // Kiali's graph query: an edge client -> server with Istio's canonical names, from each reporter.
    let q = "sum(rate(istio_requests_total{reporter=~\"source|destination\"}[1m])) by (reporter, source_workload_namespace, source_workload, source_canonical_service, source_canonical_revision, destination_service_namespace, destination_service_name, destination_workload_namespace, destination_workload, destination_canonical_service, destination_canonical_revision, request_protocol, response_code, response_flags)";
    let series = eventually(&prom, q, |s| label(s, "reporter") == "destination");
    for reporter in ["source", "destination"] {
        let edge = series
            .iter()
            .find(|s| label(s, "reporter") == reporter)
            .unwrap_or_else(|| panic!("no {reporter} series: {series:?}"));
        let got: Vec<&str> = [
            "source_workload_namespace",
            "source_workload",
            "source_canonical_service",
            "source_canonical_revision",
            "destination_service_namespace",
            "destination_service_name",
            "destination_workload_namespace",
            "destination_workload",
            "destination_canonical_service",
            "destination_canonical_revision",
            "request_protocol",
            "response_code",
            "response_flags",
        ]
        .iter()
        .map(|l| label(edge, l))
        .collect();
        assert_eq!(
            got,
            [
                "shop", "client", "client", "v1", "shop", "server", "shop", "server", "server",
                "v1", "http", "200", "-"
            ],
            "{reporter}: {edge}"
        );
        assert!(value(edge) > 0.0, "{edge}");
    }

    // Every Istio label, with identities as SPIFFE IDs, on each reporter's series.
    for reporter in ["source", "destination"] {
        let series = prom.query(&format!(
            "istio_requests_total{{reporter=\"{reporter}\", destination_workload=\"server\"}}"
        ));
        let s = series
            .first()
            .unwrap_or_else(|| panic!("no {reporter} series"));
        for l in ISTIO_LABELS {
            assert!(
                s["metric"].get(l).is_some(),
                "{reporter}: label {l} missing: {s}"
            );
        }
        assert_eq!(
            label(s, "source_principal"),
            spiffe("shop", "client"),
            "{s}"
        );
        assert_eq!(
            label(s, "destination_principal"),
            spiffe("shop", "server"),
            "{s}"
        );
        assert_eq!(label(s, "destination_service"), SERVICE, "{s}");
        assert_eq!(label(s, "connection_security_policy"), "mutual_tls", "{s}");
        assert_eq!(label(s, "source_cluster"), "Kubernetes", "{s}");
    }

    // Every panel of the shipped Grafana dashboard returns data for the shop's workloads.
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/grafana/trellis-workloads.json"
    );
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let panels = dashboard["panels"].as_array().expect("panels");
    assert!(!panels.is_empty());
    for panel in panels {
        for target in panel["targets"].as_array().expect("targets") {
            let expr = target["expr"]
                .as_str()
                .unwrap()
                .replace("$namespace", "shop")
                .replace("$workload", "server|client");
            let series = eventually(&prom, &expr, |s| !value(s).is_nan());
            assert!(
                !series.is_empty(),
                "panel {}: {expr}: no data",
                panel["title"]
            );
        }
    }
}

//! Istio's standard TCP and HTTP metrics, so existing Grafana and Kiali dashboards read them,
//! served with `/healthz` and `/readyz` on :15020.
use std::{
    convert::Infallible,
    fmt,
    net::SocketAddr,
    ops::Deref,
    sync::{Arc, LazyLock},
};

use anyhow::{Context as _, Result};
use hyper::{Request, StatusCode, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder, text::encode},
    metrics::{
        counter::Counter,
        family::Family,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};
use tokio::net::TcpListener;
use tracing::{info, warn};

use crate::{admin::reply, proxy::Failure, ready::Readiness};

/// A label value that connections share: a clone is a reference count, not a copy of the
/// string (every open connection holds its seventeen labels for its `tcp_closed` count).
#[derive(Clone, Debug, Default, Hash, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(transparent)]
pub struct Label(Arc<str>);

impl Label {
    /// Istio's value for what the proxy cannot tell.
    pub fn unknown() -> Self {
        static UNKNOWN: LazyLock<Label> = LazyLock::new(|| Label::from("unknown"));
        UNKNOWN.clone()
    }
}

impl From<&str> for Label {
    fn from(s: &str) -> Self {
        Self(s.into())
    }
}

impl Deref for Label {
    type Target = str;

    fn deref(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Label {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl EncodeLabelValue for Label {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> fmt::Result {
        EncodeLabelValue::encode(&&*self.0, encoder)
    }
}

/// Istio's standard label names, with Istio's meanings (docs/observability.md). Not carried:
/// `grpc_response_status` (requests are counted at the response's head, before a gRPC status
/// in the trailers exists).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet, Default)]
pub struct TcpLabels {
    /// `source` (the client's node proxy) or `destination` (the server's).
    pub reporter: &'static str,
    pub source_workload: Label,
    pub source_workload_namespace: Label,
    pub source_principal: Label,
    pub source_app: Label,
    pub source_version: Label,
    pub source_canonical_service: Label,
    pub source_canonical_revision: Label,
    pub source_cluster: &'static str,
    pub destination_workload: Label,
    pub destination_workload_namespace: Label,
    pub destination_principal: Label,
    pub destination_app: Label,
    pub destination_version: Label,
    pub destination_canonical_service: Label,
    pub destination_canonical_revision: Label,
    pub destination_cluster: &'static str,
    /// The host name (`reviews.shop.svc.cluster.local`), and its name and namespace parts.
    pub destination_service: Label,
    pub destination_service_name: Label,
    pub destination_service_namespace: Label,
    pub request_protocol: &'static str,
    /// `mutual_tls` or `none`.
    pub connection_security_policy: &'static str,
    /// Envoy's flags: `-` for none, `UF` upstream connect failure, `UH` no healthy upstream,
    /// and for HTTP `NR`, `FI`, `DI`, `UT`, `URX` (see proxy/http_outbound.rs).
    pub response_flags: &'static str,
}

/// One connection's byte counters: `received` from the client (downstream), `sent` to it.
/// Counted while the connection is open, so long-lived connections show their traffic.
#[derive(Clone)]
pub struct ByteCounters {
    pub received: Counter,
    pub sent: Counter,
}

/// Istio's HTTP labels: the TCP ones plus the answer's status.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    #[prometheus(flatten)]
    pub tcp: TcpLabels,
    pub response_code: u16,
}

/// One request's figures.
#[derive(Clone, Copy)]
pub struct RequestFigures {
    pub took: std::time::Duration,
    pub request_bytes: u64,
    pub response_bytes: u64,
}

/// Istio's request metrics (count, duration, request and response sizes) of one label set.
#[derive(Clone)]
struct RequestMetrics {
    count: Counter,
    duration: Histogram,
    request_bytes: Histogram,
    response_bytes: Histogram,
}

impl RequestMetrics {
    fn record(&self, r: RequestFigures) {
        self.count.inc();
        self.duration.observe(r.took.as_secs_f64() * 1000.0);
        self.request_bytes.observe(r.request_bytes as f64);
        self.response_bytes.observe(r.response_bytes as f64);
    }
}

/// One connection's request metrics for the label set its last request had, found by a key
/// that is cheap to compare (what varies on the connection: status, flags, destination…).
/// Requests on a connection mostly repeat their labels; those skip building thirteen label
/// strings and hashing them four times.
pub struct LastRequest<K> {
    last: std::sync::Mutex<Option<(K, RequestMetrics)>>,
}

impl<K> Default for LastRequest<K> {
    fn default() -> Self {
        Self {
            last: std::sync::Mutex::new(None),
        }
    }
}

impl<K: PartialEq> LastRequest<K> {
    /// Records `request` under `key`'s labels, built from it by `labels` only when `key` is
    /// not the last one.
    pub fn record_with(
        &self,
        metrics: &Metrics,
        key: K,
        labels: impl FnOnce(&K) -> HttpLabels,
        request: RequestFigures,
    ) {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        match &*last {
            Some((k, m)) if *k == key => m.record(request),
            _ => {
                let m = metrics.request_metrics(&labels(&key));
                m.record(request);
                *last = Some((key, m));
            }
        }
    }
}

/// Istio's buckets for request durations (ms).
const DURATION_BUCKETS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];

type Histograms = Family<HttpLabels, Histogram, fn() -> Histogram>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FailureLabels {
    reason: Failure,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PodLabels {
    /// `namespace/name`
    pod: String,
}

/// What became of one DNS query from a pod.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum DnsAnswer {
    /// A mesh name, answered by the agent.
    mesh,
    /// Forwarded to the pod's resolver, which answered.
    forwarded,
    /// Forwarded, and the resolver did not answer (the pod got SERVFAIL).
    failed,
    /// Not a DNS query (FORMERR, or nothing when it had no id).
    malformed,
    /// Dropped: too many of the pod's queries were already being forwarded.
    dropped,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DnsLabels {
    answer: DnsAnswer,
}

pub struct Metrics {
    requests: Family<HttpLabels, Counter>,
    duration: Histograms,
    request_bytes: Histograms,
    response_bytes: Histograms,
    opened: Family<TcpLabels, Counter>,
    closed: Family<TcpLabels, Counter>,
    sent: Family<TcpLabels, Counter>,
    received: Family<TcpLabels, Counter>,
    failures: Family<FailureLabels, Counter>,
    egress_refused: Family<PodLabels, Counter>,
    dns: Family<DnsLabels, Counter>,
    /// Spans exported and dropped (`--otlp-endpoint`), and tap records a slow reader missed.
    pub spans: crate::otlp::Counts,
    pub tap_dropped: Counter,
    registry: Registry,
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        let mut m = Self {
            requests: Family::default(),
            duration: Family::new_with_constructor(|| {
                Histogram::new(DURATION_BUCKETS.iter().copied())
            }),
            request_bytes: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(1.0, 10.0, 10))
            }),
            response_bytes: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(1.0, 10.0, 10))
            }),
            opened: Family::default(),
            closed: Family::default(),
            sent: Family::default(),
            received: Family::default(),
            failures: Family::default(),
            egress_refused: Family::default(),
            dns: Family::default(),
            spans: Default::default(),
            tap_dropped: Counter::default(),
            registry: Registry::default(),
        };
        let mut registry = Registry::default();
        registry.register("istio_requests", "HTTP requests", m.requests.clone());
        registry.register(
            "istio_request_duration_milliseconds",
            "HTTP request durations",
            m.duration.clone(),
        );
        registry.register(
            "istio_request_bytes",
            "HTTP request body sizes",
            m.request_bytes.clone(),
        );
        registry.register(
            "istio_response_bytes",
            "HTTP response body sizes",
            m.response_bytes.clone(),
        );
        registry.register(
            "istio_tcp_connections_opened",
            "TCP connections opened",
            m.opened.clone(),
        );
        registry.register(
            "istio_tcp_connections_closed",
            "TCP connections closed",
            m.closed.clone(),
        );
        registry.register(
            "istio_tcp_sent_bytes",
            "Bytes sent to the client (downstream) on TCP connections",
            m.sent.clone(),
        );
        registry.register(
            "istio_tcp_received_bytes",
            "Bytes received from the client (downstream) on TCP connections",
            m.received.clone(),
        );
        registry.register(
            "trellis_connection_failures",
            "Connections refused or failed before they were proxied, by reason (each counted; \
             their log lines are rate-limited)",
            m.failures.clone(),
        );
        registry.register(
            "trellis_egress_refused",
            "Connects and UDP sends the kernel refused a REGISTRY_ONLY pod, by pod",
            m.egress_refused.clone(),
        );
        registry.register(
            "trellis_dns_queries",
            "DNS queries from enrolled pods, by what became of them",
            m.dns.clone(),
        );
        registry.register(
            "trellis_spans_exported",
            "Spans sent to the OTLP collector (--otlp-endpoint)",
            m.spans.exported.clone(),
        );
        registry.register(
            "trellis_spans_dropped",
            "Spans dropped: the export queue was full or the collector did not take them",
            m.spans.dropped.clone(),
        );
        registry.register(
            "trellis_tap_records_dropped",
            "Access-log records a tap reader missed by reading too slowly",
            m.tap_dropped.clone(),
        );
        m.registry = registry;
        Arc::new(m)
    }

    /// One HTTP request, counted under `labels`.
    pub fn request(&self, labels: &HttpLabels, r: RequestFigures) {
        self.request_metrics(labels).record(r);
    }

    /// The four request metrics of one label set, to record into.
    fn request_metrics(&self, labels: &HttpLabels) -> RequestMetrics {
        RequestMetrics {
            count: self.requests.get_or_create(labels).clone(),
            duration: self.duration.get_or_create(labels).clone(),
            request_bytes: self.request_bytes.get_or_create(labels).clone(),
            response_bytes: self.response_bytes.get_or_create(labels).clone(),
        }
    }

    /// A connection opened; its bytes are counted into the counters it gets back as they move.
    pub fn opened(&self, labels: &TcpLabels) -> ByteCounters {
        self.opened.get_or_create(labels).inc();
        ByteCounters {
            received: self.received.get_or_create(labels).clone(),
            sent: self.sent.get_or_create(labels).clone(),
        }
    }

    /// A connection that failed before any byte moved, with its Envoy flag.
    pub fn failed(&self, labels: &mut TcpLabels, flag: &'static str) {
        labels.response_flags = flag;
        self.opened(labels);
        self.closed(labels);
    }

    /// `n` more of a pod's connects or UDP sends refused by REGISTRY_ONLY.
    pub fn egress_refused(&self, pod: &str, n: u64) {
        self.egress_refused
            .get_or_create(&PodLabels {
                pod: pod.to_owned(),
            })
            .inc_by(n);
    }

    /// One DNS query from a pod.
    pub fn dns(&self, answer: DnsAnswer) {
        self.dns.get_or_create(&DnsLabels { answer }).inc();
    }

    /// A connection refused or failed before it was proxied.
    pub fn failure(&self, reason: Failure) {
        self.failures.get_or_create(&FailureLabels { reason }).inc();
    }

    pub fn closed(&self, labels: &TcpLabels) {
        self.closed.get_or_create(labels).inc();
    }

    /// The counter a connection with `labels` counts its close in, taken when it opens, so an
    /// open connection need not keep its labels.
    pub fn closing(&self, labels: &TcpLabels) -> Counter {
        self.closed.get_or_create(labels).clone()
    }

    fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

pub async fn bind(addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the metrics endpoint on {addr} (set --metrics-addr)"))
}

pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, readiness: Readiness) {
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "metrics endpoint listening");
    }
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                warn!("metrics accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let (metrics, readiness) = (metrics.clone(), readiness.clone());
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                let resp = match req.uri().path() {
                    "/metrics" => reply(
                        StatusCode::OK,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        metrics.encode(),
                    ),
                    "/healthz" => reply(StatusCode::OK, "text/plain", "ok\n".into()),
                    "/readyz" => crate::admin::readyz(&readiness),
                    _ => reply(
                        StatusCode::NOT_FOUND,
                        "text/plain",
                        "not found; try /metrics, /healthz, /readyz\n".into(),
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

#[cfg(test)]
mod tests {
    use std::{cell::Cell, time::Duration};

    use super::*;

    fn sample<'a>(text: &'a str, metric: &str, code: u16) -> Option<&'a str> {
        text.lines()
            .find(|l| {
                l.starts_with(&format!("{metric}{{"))
                    && l.contains(&format!("response_code=\"{code}\""))
            })
            .and_then(|l| l.rsplit(' ').next())
    }

    #[test]
    fn a_repeated_label_set_is_built_once_and_every_request_counts() {
        let metrics = Metrics::new();
        let last = LastRequest::<u16>::default();
        let built = Cell::new(0);
        let figures = RequestFigures {
            took: Duration::from_millis(2),
            request_bytes: 10,
            response_bytes: 1024,
        };
        let labels = |code: &u16| {
            built.set(built.get() + 1);
            HttpLabels {
                tcp: TcpLabels {
                    reporter: "destination",
                    ..TcpLabels::default()
                },
                response_code: *code,
            }
        };
        for code in [200, 200, 200, 503, 200] {
            last.record_with(&metrics, code, labels, figures);
        }
        // Built for the first 200, the 503, and the 200 after it.
        assert_eq!(built.get(), 3);
        let text = metrics.encode();
        assert_eq!(sample(&text, "istio_requests_total", 200), Some("4"));
        assert_eq!(sample(&text, "istio_requests_total", 503), Some("1"));
        for histogram in [
            "istio_request_duration_milliseconds",
            "istio_request_bytes",
            "istio_response_bytes",
        ] {
            let count = format!("{histogram}_count");
            assert_eq!(sample(&text, &count, 200), Some("4"), "{count}: {text}");
        }
    }
}

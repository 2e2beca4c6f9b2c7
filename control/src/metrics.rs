//! Control's Prometheus metrics, served with `/healthz` and `/readyz` on `--metrics-addr`: what
//! each node was sent (and what could not be), and how the sources are faring.
use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, atomic::Ordering},
};

use anyhow::{Context as _, Result};
use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Bytes, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};
use tokio::{net::TcpListener, sync::watch};
use tracing::{info, warn};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NodeLabels {
    pub node: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabels {
    /// `dir` or `kube`.
    pub source: &'static str,
}

pub struct Metrics {
    messages: Family<NodeLabels, Counter>,
    bytes: Family<NodeLabels, Counter>,
    largest: Family<NodeLabels, Gauge>,
    undeliverable: Family<NodeLabels, Gauge>,
    version_sent: Family<NodeLabels, Gauge>,
    version_accepted: Family<NodeLabels, Gauge>,
    streams: Family<NodeLabels, Gauge>,
    source_restarts: Family<SourceLabels, Counter>,
    objects_rejected: Gauge,
    compile_seconds: Histogram,
    registry: Registry,
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        let mut m = Self {
            messages: Family::default(),
            bytes: Family::default(),
            largest: Family::default(),
            undeliverable: Family::default(),
            version_sent: Family::default(),
            version_accepted: Family::default(),
            streams: Family::default(),
            source_restarts: Family::default(),
            objects_rejected: Gauge::default(),
            // 1 ms to about 16 s.
            compile_seconds: Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(0.001, 2.0, 15),
            ),
            registry: Registry::default(),
        };
        let mut r = Registry::default();
        r.register(
            "trellis_control_config_messages",
            "ConfigUpdate messages sent, per node (an update may span several)",
            m.messages.clone(),
        );
        r.register(
            "trellis_control_config_bytes",
            "Encoded bytes of ConfigUpdate messages sent, per node",
            m.bytes.clone(),
        );
        r.register(
            "trellis_control_config_largest_message_bytes",
            "The largest ConfigUpdate message sent to the node so far, in bytes",
            m.largest.clone(),
        );
        r.register(
            "trellis_control_undeliverable_resources",
            "Resources withheld from the node now because one alone exceeds the message limit",
            m.undeliverable.clone(),
        );
        r.register(
            "trellis_control_config_version_sent",
            "The last config version sent to the node's agent",
            m.version_sent.clone(),
        );
        r.register(
            "trellis_control_config_version_accepted",
            "The last config version the node's agent acknowledged as applied; behind \
             trellis_control_config_version_sent while an update is in flight or was rejected",
            m.version_accepted.clone(),
        );
        r.register(
            "trellis_control_agent_streams",
            "Config streams open to the node's agent now (1 when it is connected)",
            m.streams.clone(),
        );
        r.register(
            "trellis_control_source_restarts",
            "Times a source task failed or panicked and was started again",
            m.source_restarts.clone(),
        );
        r.register(
            "trellis_control_objects_rejected",
            "Objects (or whole files, in dir mode) rejected now; the errors are in the log",
            m.objects_rejected.clone(),
        );
        r.register(
            "trellis_control_compile_seconds",
            "Time to compile the cluster model once for every node, after a change",
            m.compile_seconds.clone(),
        );
        m.registry = r;
        Arc::new(m)
    }

    /// One ConfigUpdate message of `bytes` sent to `node`.
    pub fn message_sent(&self, node: &str, bytes: usize) {
        let labels = NodeLabels { node: node.into() };
        let bytes = u64::try_from(bytes).unwrap_or(u64::MAX);
        self.messages.get_or_create(&labels).inc();
        self.bytes.get_or_create(&labels).inc_by(bytes);
        self.largest
            .get_or_create(&labels)
            .inner()
            .fetch_max(i64::try_from(bytes).unwrap_or(i64::MAX), Ordering::Relaxed);
    }

    pub fn set_undeliverable(&self, node: &str, count: usize) {
        self.undeliverable
            .get_or_create(&NodeLabels { node: node.into() })
            .set(i64::try_from(count).unwrap_or(i64::MAX));
    }

    pub fn set_version_sent(&self, node: &str, version: u64) {
        self.version_sent
            .get_or_create(&NodeLabels { node: node.into() })
            .set(i64::try_from(version).unwrap_or(i64::MAX));
    }

    pub fn set_version_accepted(&self, node: &str, version: u64) {
        self.version_accepted
            .get_or_create(&NodeLabels { node: node.into() })
            .set(i64::try_from(version).unwrap_or(i64::MAX));
    }

    pub fn set_streams(&self, node: &str, open: u32) {
        self.streams
            .get_or_create(&NodeLabels { node: node.into() })
            .set(i64::from(open));
    }

    pub fn source_restarted(&self, source: &'static str) {
        self.source_restarts
            .get_or_create(&SourceLabels { source })
            .inc();
    }

    pub fn set_rejected(&self, count: usize) {
        self.objects_rejected
            .set(i64::try_from(count).unwrap_or(i64::MAX));
    }

    pub fn compiled(&self, took: std::time::Duration) {
        self.compile_seconds.observe(took.as_secs_f64());
    }

    pub fn encode(&self) -> String {
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

/// Serves `/metrics`, `/healthz`, and `/readyz` (ready once the source has read the cluster).
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, ready: watch::Receiver<bool>) {
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
        let (metrics, ready) = (metrics.clone(), ready.clone());
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                let resp = match req.uri().path() {
                    "/metrics" => reply(
                        StatusCode::OK,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        metrics.encode(),
                    ),
                    "/healthz" => reply(StatusCode::OK, "text/plain", "ok\n".into()),
                    "/readyz" if *ready.borrow() => {
                        reply(StatusCode::OK, "text/plain", "ready\n".into())
                    }
                    "/readyz" => reply(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "text/plain",
                        "not ready: the cluster has not been read yet\n".into(),
                    ),
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

fn reply(code: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = code;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    resp
}

#[cfg(test)]
mod tests {
    /// `trellisctl check` compares these two per node to tell an agent behind.
    #[test]
    fn versions_sent_and_accepted_are_gauges_per_node() {
        let m = super::Metrics::new();
        m.set_version_sent("n1", 3);
        m.set_version_accepted("n1", 2);
        m.set_streams("n1", 1);
        let text = m.encode();
        for line in [
            "trellis_control_config_version_sent{node=\"n1\"} 3",
            "trellis_control_config_version_accepted{node=\"n1\"} 2",
            "trellis_control_agent_streams{node=\"n1\"} 1",
        ] {
            assert!(text.contains(line), "{line} not in:\n{text}");
        }
    }
}

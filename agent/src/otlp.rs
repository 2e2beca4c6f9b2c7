//! OTLP trace export (`--otlp-endpoint`): spans go through a bounded queue to one task that
//! sends them in batches over gRPC (OTLP's TraceService). A request never waits for it: when
//! the queue is full, or a batch cannot be delivered, its spans are dropped and counted in
//! `trellis_spans_dropped_total`.
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use opentelemetry_proto::tonic::{
    collector::trace::v1::{ExportTraceServiceRequest, trace_service_client::TraceServiceClient},
    common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value::Value},
    resource::v1::Resource,
    trace::v1::{ResourceSpans, ScopeSpans, Span},
};
use prometheus_client::metrics::counter::Counter;
use tokio::sync::mpsc;
use tracing::warn;

/// Spans waiting to be sent; more than this and new ones are dropped.
const QUEUE: usize = 4096;
/// At most this many spans a request to the collector.
const BATCH: usize = 512;
/// A batch goes out when full or this long after its first span.
const LINGER: Duration = Duration::from_secs(1);
/// A collector that takes longer than this to answer loses the batch.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Exporter {
    tx: mpsc::Sender<Span>,
    dropped: Counter,
}

/// Counters the exporter keeps, registered with the agent's metrics.
#[derive(Clone, Default)]
pub struct Counts {
    pub exported: Counter,
    pub dropped: Counter,
}

impl Exporter {
    /// Starts exporting to `endpoint` (`http://HOST:PORT`, OTLP over gRPC) as `node`'s proxy.
    /// Connects lazily: a collector that is down costs nothing but the spans sent meanwhile.
    pub fn start(endpoint: &str, node: &str, counts: Counts) -> Result<Self> {
        if !endpoint.starts_with("http://") {
            bail!(
                "--otlp-endpoint {endpoint:?}: give http://HOST:PORT (OTLP over gRPC, plaintext; \
                 an OpenTelemetry collector's default is port 4317)"
            );
        }
        let channel = tonic::transport::Endpoint::from_shared(endpoint.to_owned())
            .with_context(|| format!("--otlp-endpoint {endpoint:?} is not a URL"))?
            .connect_timeout(Duration::from_secs(5))
            .timeout(EXPORT_TIMEOUT)
            .connect_lazy();
        let (tx, rx) = mpsc::channel(QUEUE);
        let resource = Resource {
            attributes: vec![
                attribute("service.name", "trellis-proxy"),
                attribute("node_id", node),
            ],
            ..Default::default()
        };
        tokio::spawn(export(
            TraceServiceClient::new(channel),
            rx,
            resource,
            counts.clone(),
        ));
        Ok(Self {
            tx,
            dropped: counts.dropped,
        })
    }

    /// Queues a span, or drops it if the queue is full.
    pub fn send(&self, span: Span) {
        if self.tx.try_send(span).is_err() {
            self.dropped.inc();
        }
    }
}

async fn export(
    mut client: TraceServiceClient<tonic::transport::Channel>,
    mut rx: mpsc::Receiver<Span>,
    resource: Resource,
    counts: Counts,
) {
    let mut batch = Vec::with_capacity(BATCH);
    let mut failures = 0u64;
    while let Some(first) = rx.recv().await {
        batch.push(first);
        let linger = tokio::time::sleep(LINGER);
        tokio::pin!(linger);
        while batch.len() < BATCH {
            tokio::select! {
                span = rx.recv() => match span {
                    Some(s) => batch.push(s),
                    None => break,
                },
                () = &mut linger => break,
            }
        }
        let n = batch.len() as u64;
        let request = ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(resource.clone()),
                scope_spans: vec![ScopeSpans {
                    scope: Some(InstrumentationScope {
                        name: "trellis".into(),
                        version: env!("CARGO_PKG_VERSION").into(),
                        ..Default::default()
                    }),
                    spans: std::mem::take(&mut batch),
                    schema_url: String::new(),
                }],
                schema_url: String::new(),
            }],
        };
        match client.export(request).await {
            Ok(_) => {
                counts.exported.inc_by(n);
            }
            Err(e) => {
                counts.dropped.inc_by(n);
                failures += 1;
                // The first failure and then one in a hundred: a collector that is down
                // should not flood the log.
                if failures % 100 == 1 {
                    warn!(
                        failures,
                        "exporting spans failed: {}; they are dropped",
                        e.message()
                    );
                }
            }
        }
    }
}

pub fn attribute(key: &str, value: impl Into<String>) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue {
            value: Some(Value::StringValue(value.into())),
        }),
        ..Default::default()
    }
}

pub fn int_attribute(key: &str, value: i64) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue {
            value: Some(Value::IntValue(value)),
        }),
        ..Default::default()
    }
}

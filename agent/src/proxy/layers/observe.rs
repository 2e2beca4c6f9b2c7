//! Observe (outermost): continues or starts the W3C trace, makes the request a `tracing` span
//! with one access-log line (target `trellis::access`, on with `--access-log`) and records
//! Istio's request metrics (reporter `source`).
use std::sync::Arc;

use hyper::body::Body as _;
use tower::Layer;
use tracing::Instrument as _;

use super::{Next, Outcome, Req, around, call};
use crate::proxy::{PodCtx, Shared, labels, trace};

pub fn layer(pod: Arc<PodCtx>, shared: Arc<Shared>) -> impl Layer<Next, Service = Next> + Clone {
    around(move |mut req: Req, next: Next| {
        let (pod, shared) = (pod.clone(), shared.clone());
        async move {
            let start = std::time::Instant::now();
            let request_bytes = req.body().size_hint().exact().unwrap_or(0);
            let grpc = crate::proxy::http::is_grpc(req.headers());
            let trace = trace::continue_trace(req.headers_mut());
            let span = tracing::info_span!(
                target: "trellis::access",
                "http_request",
                trace_id = %trace.trace_id,
                span_id = %trace.span_id,
                parent_id = trace.parent_id.as_deref().unwrap_or(""),
                pod = %pod.name,
                method = %req.method(),
                path = req.uri().path(),
            );
            let (method, path) = (req.method().clone(), req.uri().path().to_owned());
            let mut resp = call(next, req).instrument(span.clone()).await;
            let outcome = resp
                .extensions_mut()
                .remove::<Outcome>()
                .unwrap_or_default();
            span.in_scope(|| {
                tracing::info!(
                    target: "trellis::access",
                    %method,
                    path,
                    status = resp.status().as_u16(),
                    response_flags = outcome.flags,
                    service = outcome.service.as_deref().unwrap_or("unknown"),
                    duration_ms = start.elapsed().as_secs_f64() * 1000.0,
                    "http request"
                )
            });
            let source = pod.workload(&shared.state.borrow());
            let mut labels = labels(
                "source",
                source.as_deref(),
                pod.identity.as_deref(),
                outcome.destination.as_deref(),
                outcome.service.as_deref(),
                outcome
                    .destination
                    .as_ref()
                    .is_some_and(|w| w.identity.is_some()),
            );
            labels.request_protocol = if grpc { "grpc" } else { "http" };
            labels.response_flags = outcome.flags;
            shared.metrics.request(
                labels,
                resp.status().as_u16(),
                start.elapsed(),
                request_bytes,
                resp.body().size_hint().exact().unwrap_or(0),
            );
            resp
        }
    })
}

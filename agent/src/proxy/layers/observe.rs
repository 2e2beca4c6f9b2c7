//! Observe (outermost): continues or starts the W3C trace, makes the request a `tracing` span
//! with one access-log line (target `trellis::access`, on with `--access-log`) and records
//! Istio's request metrics (reporter `source`).
use std::sync::Arc;

use hyper::body::Body as _;
use tower::Layer;
use tracing::Instrument as _;

use super::{Next, Outcome, Req, around, call};
use crate::{
    metrics::{HttpLabels, LastRequest, RequestFigures},
    proxy::{PodCtx, Shared, labels, trace},
    state::Workload,
};

pub fn layer(pod: Arc<PodCtx>, shared: Arc<Shared>) -> impl Layer<Next, Service = Next> + Clone {
    let requests = Arc::new(LastRequest::<Key>::default());
    around(move |mut req: Req, next: Next| {
        let (pod, shared, requests) = (pod.clone(), shared.clone(), requests.clone());
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
            // Kept for the log line only when the access log is on.
            let logged =
                (!span.is_disabled()).then(|| (req.method().clone(), req.uri().path().to_owned()));
            let mut resp = call(next, req).instrument(span.clone()).await;
            let outcome = resp
                .extensions_mut()
                .remove::<Outcome>()
                .unwrap_or_default();
            let code = resp.status().as_u16();
            if let Some((method, path)) = logged {
                span.in_scope(|| {
                    tracing::info!(
                        target: "trellis::access",
                        %method,
                        path,
                        status = code,
                        response_flags = outcome.flags,
                        service = outcome.service.as_deref().unwrap_or("unknown"),
                        duration_ms = start.elapsed().as_secs_f64() * 1000.0,
                        "http request"
                    )
                });
            }
            let key = Key {
                source: pod.workload(&shared.state.borrow()),
                destination: outcome.destination,
                service: outcome.service,
                grpc,
                flags: outcome.flags,
                code,
            };
            let figures = RequestFigures {
                took: start.elapsed(),
                request_bytes,
                response_bytes: resp.body().size_hint().exact().unwrap_or(0),
            };
            let label_set = |key: &Key| {
                let mut tcp = labels(
                    "source",
                    key.source.as_deref(),
                    pod.identity.as_deref(),
                    key.destination.as_deref(),
                    key.service.as_deref(),
                    key.destination
                        .as_ref()
                        .is_some_and(|w| w.identity.is_some()),
                );
                tcp.request_protocol = if key.grpc { "grpc" } else { "http" };
                tcp.response_flags = key.flags;
                HttpLabels {
                    tcp,
                    response_code: key.code,
                }
            };
            requests.record_with(&shared.metrics, key, label_set, figures);
            resp
        }
    })
}

/// What a request's metric labels are made of, compared cheaply: workloads by identity of the
/// state entry (a changed workload is a new entry), the rest by value.
struct Key {
    source: Option<Arc<Workload>>,
    destination: Option<Arc<Workload>>,
    service: Option<String>,
    grpc: bool,
    flags: &'static str,
    code: u16,
}

impl PartialEq for Key {
    fn eq(&self, o: &Self) -> bool {
        let same = |a: &Option<Arc<Workload>>, b: &Option<Arc<Workload>>| match (a, b) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            (None, None) => true,
            _ => false,
        };
        same(&self.source, &o.source)
            && same(&self.destination, &o.destination)
            && (self.service.as_deref(), self.grpc, self.flags, self.code)
                == (o.service.as_deref(), o.grpc, o.flags, o.code)
    }
}

//! Observe (outermost): continues or starts the trace, makes the request a `tracing` span,
//! reports it (access log, taps, an OTLP CLIENT span: [`exchange`]) and records Istio's request
//! metrics (reporter `source`).
use std::sync::Arc;

use hyper::body::Body as _;
use tower::Layer;
use tracing::Instrument as _;

use super::{Downstream, Next, Outcome, Req, around};
use crate::{
    metrics::{HttpLabels, LastRequest, RequestFigures},
    proxy::{
        PodCtx, Shared,
        exchange::{Answer, Ends, Exchange, Side, request_span},
        labels,
    },
    state::{Target, Workload},
};

pub fn layer(
    pod: Arc<PodCtx>,
    shared: Arc<Shared>,
    downstream: Downstream,
) -> impl Layer<Next, Service = Next> + Clone {
    let requests = Arc::new(LastRequest::<Key>::default());
    around(move |mut req: Req, next: Next| {
        let (pod, shared, requests) = (pod.clone(), shared.clone(), requests.clone());
        async move {
            let start = std::time::Instant::now();
            let request_bytes = req.body().size_hint().exact().unwrap_or(0);
            let grpc = crate::proxy::http::is_grpc(req.headers());
            let (trace, span) = request_span(&shared, &pod.name, &mut req);
            let exchange = Exchange::begin(
                &shared,
                Side::Source,
                &req,
                &trace,
                &span,
                (Some(downstream.local), downstream.remote),
            );
            if let Some(x) = &exchange {
                req = x.count_request(req);
            }
            let mut resp = next.call(req).instrument(span).await;
            let outcome = resp
                .extensions_mut()
                .remove::<Outcome>()
                .unwrap_or_default();
            let code = resp.status().as_u16();
            let source = pod.workload(&shared.state.borrow());
            let service = outcome.target.as_ref().map(|t| t.service.as_str());
            if let Some(x) = exchange {
                let answer = Answer {
                    code,
                    flags: outcome.flags,
                    upstream_host: outcome.upstream,
                    upstream_cluster: outcome
                        .target
                        .as_ref()
                        .filter(|_| outcome.upstream.is_some())
                        .map(|t| t.envoy_cluster.clone()),
                    failure: outcome.failure.map(|f| format!("{f:?}")),
                    ends: Ends {
                        source: source.clone(),
                        source_principal: pod.identity.clone(),
                        destination_principal: outcome
                            .destination
                            .as_ref()
                            .and_then(|w| w.identity.clone()),
                        destination: outcome.destination.clone(),
                        service: service.map(str::to_owned),
                    },
                };
                resp = x.respond(answer, resp);
            }
            let key = Key {
                source,
                destination: outcome.destination,
                target: outcome.target,
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
                    key.service(),
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
    target: Option<Arc<Target>>,
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
            && (self.service(), self.grpc, self.flags, self.code)
                == (o.service(), o.grpc, o.flags, o.code)
    }
}

impl Key {
    fn service(&self) -> Option<&str> {
        self.target.as_ref().map(|t| t.service.as_str())
    }
}

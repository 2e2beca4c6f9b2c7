//! Route: matches the request against the service's VirtualService routes (at a gateway: those
//! of the virtual host for its Host) and picks the destination (by weight); the decision rides
//! in the request's extensions for the layers below. No route: 404 (NR); no usable
//! destination: 503 (UH).
use std::sync::Arc;

use hyper::StatusCode;
use tower::Layer;
use tracing::warn;

use super::{Next, Req, around, local, outcome};
use crate::{
    proxy::{PodCtx, Shared, http},
    state::{HttpEntry, HttpRefusal},
};

pub fn layer(
    entry: HttpEntry,
    pod: Arc<PodCtx>,
    shared: Arc<Shared>,
) -> impl Layer<Next, Service = Next> + Clone {
    around(move |mut req: Req, next: Next| {
        // HTTP/2 carries the host in the authority, HTTP/1.1 in the Host header.
        let host = req
            .uri()
            .authority()
            .map(|a| a.as_str())
            .or_else(|| {
                req.headers()
                    .get(hyper::header::HOST)
                    .and_then(|h| h.to_str().ok())
            })
            .unwrap_or("");
        let chosen = shared.state.borrow().route_http(
            entry,
            host,
            req.method(),
            req.uri().path(),
            req.headers(),
        );
        let vip = entry.addr();
        let pod = pod.clone();
        async move {
            let decision = match chosen {
                Ok(d) => Arc::new(d),
                Err(HttpRefusal::NoRoute) => {
                    return local(StatusCode::NOT_FOUND, "no route matched\n", "NR");
                }
                Err(HttpRefusal::NoUpstream(why)) => {
                    warn!(pod = %pod.name, %vip, "no upstream: {why}");
                    return local(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "no healthy upstream\n",
                        "UH",
                    );
                }
            };
            // A gateway's client chose its HTTP version for the gateway, not for the service
            // behind it: the service gets the version its port declares.
            if matches!(entry, HttpEntry::Gateway(_)) {
                http::set_version(&mut req, decision.target.http2);
            }
            let target = decision.target.clone();
            req.extensions_mut().insert(target.clone());
            req.extensions_mut().insert(decision);
            let mut resp = next.call(req).await;
            outcome(&mut resp).target = Some(target);
            resp
        }
    })
}

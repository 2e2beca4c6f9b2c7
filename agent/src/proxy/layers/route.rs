//! Route: matches the request against the service's VirtualService routes and picks the
//! destination (by weight); the decision rides in the request's extensions for the layers
//! below. No route: 404 (NR); no usable destination: 503 (UH).
use std::{net::SocketAddr, sync::Arc};

use hyper::StatusCode;
use tower::Layer;
use tracing::warn;

use super::{Next, Req, around, call, local, outcome};
use crate::{
    proxy::{PodCtx, Shared},
    state::HttpRefusal,
};

pub fn layer(
    vip: SocketAddr,
    pod: Arc<PodCtx>,
    shared: Arc<Shared>,
) -> impl Layer<Next, Service = Next> + Clone {
    around(move |mut req: Req, next: Next| {
        let chosen =
            shared
                .state
                .borrow()
                .route_http(vip, req.method(), req.uri().path(), req.headers());
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
            let service = decision.target.service.clone();
            req.extensions_mut().insert(decision.target.clone());
            req.extensions_mut().insert(decision);
            let mut resp = call(next, req).await;
            outcome(&mut resp).service = Some(service);
            resp
        }
    })
}

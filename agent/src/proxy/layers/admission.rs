//! Admission: the destination's connection-pool limits (`maxConnections`, `http2MaxRequests`,
//! `http1MaxPendingRequests`). The permit holds for the whole request, retries included; a full
//! pool answers 503 with `x-trellis-overflow: 1` (UO).
use std::sync::Arc;

use hyper::{StatusCode, header::HeaderValue};
use tower::Layer;

use super::{Next, Req, around, local};
use crate::{
    proxy::{Shared, balance::Overflow},
    state::Target,
};

pub fn layer(shared: Arc<Shared>) -> impl Layer<Next, Service = Next> + Clone {
    around(move |req: Req, next: Next| {
        let shared = shared.clone();
        async move {
            let Some(target) = req.extensions().get::<Arc<Target>>().cloned() else {
                return next.call(req).await;
            };
            let _permit = match shared
                .balancer
                .admit(&target.cluster, target.traffic.pool)
                .await
            {
                Ok(permit) => permit,
                Err(Overflow) => {
                    let mut resp = local(StatusCode::SERVICE_UNAVAILABLE, "overflow\n", "UO");
                    resp.headers_mut()
                        .insert("x-trellis-overflow", HeaderValue::from_static("1"));
                    return resp;
                }
            };
            next.call(req).await
        }
    })
}

//! Timeout: the route's deadline over all tries; when it passes, 504 (UT).
use hyper::StatusCode;
use tower::Layer;

use super::{Next, Req, around, decision, local};

pub fn layer() -> impl Layer<Next, Service = Next> + Clone {
    around(|req: Req, next: Next| async move {
        let Some(t) = decision(&req).and_then(|d| d.policy.timeout) else {
            return next.call(req).await;
        };
        tokio::time::timeout(t, next.call(req))
            .await
            .unwrap_or_else(|_| {
                local(
                    StatusCode::GATEWAY_TIMEOUT,
                    "upstream request timeout\n",
                    "UT",
                )
            })
    })
}

//! Header edits: the route's `headers.request` set/add/remove before the request goes on, and
//! `headers.response` on the answer.
use tower::Layer;

use super::{Next, Req, around, decision};

pub fn layer() -> impl Layer<Next, Service = Next> + Clone {
    around(|mut req: Req, next: Next| async move {
        let Some(d) = decision(&req) else {
            return next.call(req).await;
        };
        d.policy.request_headers.apply(req.headers_mut());
        let mut resp = next.call(req).await;
        d.policy.response_headers.apply(resp.headers_mut());
        resp
    })
}

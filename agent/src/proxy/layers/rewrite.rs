//! Rewrite: `rewrite.uri` replaces the prefix the route matched on (or the whole path), keeping
//! the query; `rewrite.authority` replaces the authority (Host, and `:authority` in HTTP/2).
use hyper::{Version, header::HeaderValue};
use tower::Layer;
use tracing::debug;

use super::{Next, Req, around, decision};

pub fn layer() -> impl Layer<Next, Service = Next> + Clone {
    around(|mut req: Req, next: Next| async move {
        if let Some(d) = decision(&req) {
            rewrite(
                &mut req,
                d.policy.rewrite.as_ref(),
                d.matched_prefix.as_deref(),
            );
        }
        next.call(req).await
    })
}

fn rewrite(req: &mut Req, rw: Option<&crate::http_route::Rewrite>, matched_prefix: Option<&str>) {
    let Some(rw) = rw else {
        return;
    };
    if let Some(to) = &rw.uri {
        let path = req.uri().path();
        let new_path = match matched_prefix {
            Some(prefix) => format!("{to}{}", &path[prefix.len().min(path.len())..]),
            None => to.clone(),
        };
        let pq = match req.uri().query() {
            Some(q) => format!("{new_path}?{q}"),
            None => new_path,
        };
        let mut parts = req.uri().clone().into_parts();
        match pq.parse() {
            Ok(pq) => parts.path_and_query = Some(pq),
            Err(e) => debug!("rewritten path {pq:?} is not a URI: {e}"),
        }
        if let Ok(uri) = hyper::Uri::from_parts(parts) {
            *req.uri_mut() = uri;
        }
    }
    if let Some(host) = &rw.authority
        && let Ok(v) = HeaderValue::from_str(host)
    {
        if req.version() == Version::HTTP_2 {
            let mut parts = req.uri().clone().into_parts();
            match host.parse() {
                Ok(authority) => parts.authority = Some(authority),
                Err(e) => debug!("rewritten authority {host:?} is not one: {e}"),
            }
            if let Ok(uri) = hyper::Uri::from_parts(parts) {
                *req.uri_mut() = uri;
            }
        }
        req.headers_mut().insert(hyper::header::HOST, v);
    }
}

//! Mirror: a copy of the request goes to the route's mirror destination in the background (Host
//! gets Envoy's `-shadow` suffix; the answer is dropped). The body is buffered for it, up to
//! 1 MiB; larger bodies and upgrades are not mirrored.
use std::{sync::Arc, time::Duration};

use http_body_util::{BodyExt as _, Limited};
use hyper::{Request, body::Body as _, header::HeaderValue};
use tower::Layer;
use tracing::debug;

use super::{
    Next, Req, around, decision, full, is_upgrade,
    retry::BODY_LIMIT,
    upstream::{PerTryTimeout, Upstream},
};
use crate::{
    proxy::{PodCtx, Shared},
    state::Target,
};

/// How long a mirrored copy may take before it is abandoned.
const TIMEOUT: Duration = Duration::from_secs(10);

pub fn layer(pod: Arc<PodCtx>, shared: Arc<Shared>) -> impl Layer<Next, Service = Next> + Clone {
    around(move |req: Req, next: Next| {
        let (pod, shared) = (pod.clone(), shared.clone());
        async move {
            match decision(&req).and_then(|d| d.mirror.clone()) {
                Some(mirror) => next.call(copy(req, mirror, pod, shared).await).await,
                None => next.call(req).await,
            }
        }
    })
}

/// Sends a copy of `req` to `mirror` and gives back the request, its body now buffered.
async fn copy(req: Req, mirror: Arc<Target>, pod: Arc<PodCtx>, shared: Arc<Shared>) -> Req {
    if is_upgrade(&req) || req.body().size_hint().lower() > BODY_LIMIT as u64 {
        return req;
    }
    let (parts, body) = req.into_parts();
    let bytes = match Limited::new(body, BODY_LIMIT).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            debug!("not mirroring: reading the body: {e}");
            hyper::body::Bytes::new()
        }
    };
    let mut copy = Request::from_parts(parts.clone(), full(bytes.clone()));
    *copy.extensions_mut() = hyper::http::Extensions::new();
    copy.extensions_mut().insert(mirror.clone());
    copy.extensions_mut().insert(PerTryTimeout(TIMEOUT));
    if let Some(host) = copy
        .headers()
        .get(hyper::header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(|h| format!("{}-shadow", h.split(':').next().unwrap_or(h)))
        && let Ok(v) = HeaderValue::from_str(&host)
    {
        copy.headers_mut().insert(hyper::header::HOST, v);
    }
    tokio::spawn(async move {
        let resp = Upstream::new(pod, shared).send(copy).await;
        debug!(cluster = mirror.cluster, status = %resp.status(), "mirrored request answered");
    });
    Request::from_parts(parts, full(bytes))
}

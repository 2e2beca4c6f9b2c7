//! HTTP/1.1 from a pod to a service port declared HTTP, proxied at L7 on the client's node: every
//! request is balanced on its own over the service's endpoints (through HBONE for mesh ones), so
//! routing can decide per request. Keep-alive and chunked bodies pass through hyper; upgrades
//! (WebSocket) are spliced once the server agrees; a malformed request gets 400 and the
//! connection is closed.
use std::{collections::HashMap, convert::Infallible, net::SocketAddr, sync::Arc};

use anyhow::{Result, bail};
use http_body_util::BodyExt;
use hyper::{
    Request, Response, StatusCode, body::Incoming, client::conn::http1::SendRequest,
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use tokio::sync::Mutex;
use tracing::{debug, warn};

use super::{
    PodCtx, Shared, connect, hbone,
    http::{self, Body},
};
use crate::state::{HttpRefusal, Route};

/// Upstream HTTP/1 connections of one downstream connection, by endpoint.
type Upstreams = Arc<Mutex<HashMap<SocketAddr, SendRequest<Incoming>>>>;

/// Serves one captured connection to the HTTP service port `vip`.
pub async fn serve<C>(client: C, vip: SocketAddr, pod: Arc<PodCtx>, shared: Arc<Shared>)
where
    C: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let upstreams: Upstreams = Arc::default();
    let service = service_fn(move |req| {
        let (pod, shared, upstreams) = (pod.clone(), shared.clone(), upstreams.clone());
        async move { Ok::<_, Infallible>(forward(req, vip, &pod, &shared, &upstreams).await) }
    });
    if let Err(e) = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(client), service)
        .with_upgrades()
        .await
    {
        debug!(%vip, "outbound HTTP/1 connection ended: {e}");
    }
}

async fn forward(
    mut req: Request<Incoming>,
    vip: SocketAddr,
    pod: &PodCtx,
    shared: &Shared,
    upstreams: &Upstreams,
) -> Response<Body> {
    let route =
        shared
            .state
            .borrow()
            .route_http(vip, req.method(), req.uri().path(), req.headers());
    let route = match route {
        Ok(r) => r,
        Err(HttpRefusal::NoRoute) => {
            return http::error(StatusCode::NOT_FOUND, "no route matched\n");
        }
        Err(HttpRefusal::NoUpstream(why)) => {
            warn!(pod = %pod.name, %vip, "no upstream: {why}");
            return http::error(StatusCode::SERVICE_UNAVAILABLE, "no healthy upstream\n");
        }
    };
    let client_upgrade = hyper::upgrade::on(&mut req);
    let sent = async {
        let (target, mut sender) = upstream(route, pod, shared, upstreams).await?;
        sender.ready().await?;
        let resp = sender.send_request(req).await;
        // Keep the connection for the next request unless it is done.
        if !sender.is_closed() {
            upstreams.lock().await.insert(target, sender);
        }
        Ok::<_, anyhow::Error>(resp?)
    };
    let mut resp = match sent.await {
        Ok(resp) => resp,
        Err(e) => {
            warn!(pod = %pod.name, %vip, "HTTP request failed: {e:#}");
            return http::error(StatusCode::SERVICE_UNAVAILABLE, "upstream connect error\n");
        }
    };
    http::pass_upgrade(client_upgrade, &mut resp);
    resp.map(BodyExt::boxed)
}

/// A sender to the endpoint `route` chose: this connection's idle one, or a new one.
async fn upstream(
    route: Route,
    pod: &PodCtx,
    shared: &Shared,
    upstreams: &Upstreams,
) -> Result<(SocketAddr, SendRequest<Incoming>)> {
    let target = match &route {
        Route::Hbone { target, .. } => *target,
        Route::Passthrough { addr, .. } => *addr,
        Route::NoEndpoints { service } => bail!("{service} has no endpoint"),
    };
    if let Some(s) = upstreams.lock().await.remove(&target)
        && s.is_ready()
    {
        return Ok((target, s));
    }
    let sender = match route {
        Route::Hbone {
            hbone,
            target,
            identity,
            ..
        } => {
            let Some(tls) = pod.identity.as_deref().and_then(|id| shared.tls.get(id)) else {
                bail!("no certificate for this pod yet");
            };
            let tunnel = hbone::open(&shared.pool, pod, &tls, hbone, target, &identity).await?;
            http::client(tunnel.into_inner()).await?
        }
        _ => {
            http::client(TokioIo::new(
                connect(pod.socket_for(target)?, target).await?,
            ))
            .await?
        }
    };
    Ok((target, sender))
}

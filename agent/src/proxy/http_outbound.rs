//! HTTP/1.1 from a pod to a service port declared HTTP, proxied at L7 on the client's node: every
//! request is balanced on its own over the service's endpoints (through HBONE for mesh ones), so
//! routing can decide per request. Keep-alive and chunked bodies pass through hyper; upgrades
//! (WebSocket) are spliced once the server agrees; a malformed request gets 400 and the
//! connection is closed. The matched route's policy applies in order: fault injection (delay,
//! abort), then the timeout around all tries, then retries, each try with its own timeout.
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
use crate::{
    http_route::{Policy, Retry},
    state::{HttpDecision, HttpRefusal, Route},
};

/// Upstream HTTP/1 connections of one downstream connection, by endpoint.
type Upstreams = Arc<Mutex<HashMap<SocketAddr, SendRequest<Body>>>>;

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
    let chosen =
        shared
            .state
            .borrow()
            .route_http(vip, req.method(), req.uri().path(), req.headers());
    let HttpDecision {
        route,
        policy,
        matched_prefix,
    } = match chosen {
        Ok(d) => d,
        Err(e) => return refusal(pod, vip, e),
    };
    // Fault injection first: an aborted request never reaches upstream.
    let (delay, abort) = policy.fault.roll();
    if let Some(d) = delay {
        tokio::time::sleep(d).await;
    }
    if let Some(status) = abort {
        return http::error(status, "fault filter abort\n");
    }
    rewrite(&mut req, &policy, matched_prefix.as_deref());
    policy.request_headers.apply(req.headers_mut());
    let attempt = async {
        match &policy.retry {
            // Upgrades cannot be replayed; neither can a body larger than we keep.
            Some(retry) if !is_upgrade(&req) => {
                with_retries(req, route, retry, vip, pod, shared, upstreams).await
            }
            _ => {
                let upgrade = hyper::upgrade::on(&mut req);
                let mut resp = send(req.map(BodyExt::boxed), route, None, pod, shared, upstreams)
                    .await
                    .map_err(|e| e.to_string())?;
                http::pass_upgrade(upgrade, &mut resp);
                Ok(resp.map(BodyExt::boxed))
            }
        }
    };
    let answered = match policy.timeout {
        Some(t) => tokio::time::timeout(t, attempt)
            .await
            .unwrap_or_else(|_| Err("timeout".to_owned())),
        None => attempt.await,
    };
    match answered {
        Ok(mut resp) => {
            policy.response_headers.apply(resp.headers_mut());
            resp
        }
        Err(e) if e == "timeout" => {
            http::error(StatusCode::GATEWAY_TIMEOUT, "upstream request timeout\n")
        }
        Err(e) => {
            warn!(pod = %pod.name, %vip, "HTTP request failed: {e}");
            http::error(StatusCode::SERVICE_UNAVAILABLE, "upstream connect error\n")
        }
    }
}

fn refusal(pod: &PodCtx, vip: SocketAddr, e: HttpRefusal) -> Response<Body> {
    match e {
        HttpRefusal::NoRoute => http::error(StatusCode::NOT_FOUND, "no route matched\n"),
        HttpRefusal::NoUpstream(why) => {
            warn!(pod = %pod.name, %vip, "no upstream: {why}");
            http::error(StatusCode::SERVICE_UNAVAILABLE, "no healthy upstream\n")
        }
    }
}

/// `rewrite.uri` replaces the prefix the route matched on (or the whole path), keeping the query;
/// `rewrite.authority` replaces the Host header.
fn rewrite<B>(req: &mut Request<B>, policy: &Policy, matched_prefix: Option<&str>) {
    let Some(rw) = &policy.rewrite else {
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
        match pq.parse() {
            Ok(uri) => *req.uri_mut() = uri,
            Err(e) => debug!("rewritten path {pq:?} is not a URI: {e}"),
        }
    }
    if let Some(host) = &rw.authority
        && let Ok(v) = hyper::header::HeaderValue::from_str(host)
    {
        req.headers_mut().insert(hyper::header::HOST, v);
    }
}

fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.headers().contains_key(hyper::header::UPGRADE)
}

/// Request bodies up to this size are kept so that a retry can send them again.
const RETRY_BODY_LIMIT: usize = 1 << 20;

/// Sends `req`, trying again (on a freshly chosen endpoint) when the route's retry policy says
/// so; the last answer or error stands when the tries run out.
async fn with_retries(
    req: Request<Incoming>,
    first: Route,
    retry: &Retry,
    vip: SocketAddr,
    pod: &PodCtx,
    shared: &Shared,
    upstreams: &Upstreams,
) -> Result<Response<Body>, String> {
    let (parts, body) = req.into_parts();
    let body = http_body_util::Limited::new(body, RETRY_BODY_LIMIT)
        .collect()
        .await
        .map_err(|e| format!("reading the request body: {e}"))?
        .to_bytes();
    let mut route = Some(first);
    let mut last = Err(String::new());
    for attempt in 0..=retry.attempts {
        if attempt > 0 {
            tokio::time::sleep(RETRY_BACKOFF * attempt).await;
        }
        let route = match route.take() {
            Some(r) => r,
            None => {
                let chosen = shared.state.borrow().route_http(
                    vip,
                    &parts.method,
                    parts.uri.path(),
                    &parts.headers,
                );
                match chosen {
                    Ok(d) => d.route,
                    Err(e) => return Ok(refusal(pod, vip, e)),
                }
            }
        };
        let mut req = Request::from_parts(parts.clone(), full(body.clone()));
        // The downstream connection's own extensions (hyper's upgrade handle) stay behind.
        *req.extensions_mut() = hyper::http::Extensions::new();
        let sent = send(req, route, retry.per_try_timeout, pod, shared, upstreams).await;
        let again = match &sent {
            Ok(resp) => retry.on.status(resp.status()),
            Err(Failure::Connect(_)) => retry.on.connect_failure,
            Err(Failure::Reset(_)) => retry.on.reset,
            // As Envoy: a try that timed out counts as a 504.
            Err(Failure::PerTryTimeout) => retry.on.status(StatusCode::GATEWAY_TIMEOUT),
        };
        last = sent
            .map(|r| r.map(BodyExt::boxed))
            .map_err(|e| e.to_string());
        if !again {
            break;
        }
        debug!(pod = %pod.name, %vip, attempt, "retrying");
    }
    last
}

const RETRY_BACKOFF: std::time::Duration = std::time::Duration::from_millis(25);

fn full(bytes: hyper::body::Bytes) -> Body {
    http_body_util::Full::new(bytes)
        .map_err(|never| match never {})
        .boxed()
}

/// How one try failed.
#[derive(Debug)]
enum Failure {
    /// No connection to the endpoint.
    Connect(String),
    /// The connection broke before a complete answer.
    Reset(String),
    PerTryTimeout,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Connect(e) => write!(f, "connect failure: {e}"),
            Failure::Reset(e) => write!(f, "reset: {e}"),
            Failure::PerTryTimeout => write!(f, "per-try timeout"),
        }
    }
}

/// One try: an upstream connection to the endpoint `route` chose, then the request.
async fn send(
    req: Request<Body>,
    route: Route,
    per_try: Option<std::time::Duration>,
    pod: &PodCtx,
    shared: &Shared,
    upstreams: &Upstreams,
) -> Result<Response<Incoming>, Failure> {
    let attempt = async {
        let (target, mut sender) = upstream(route, pod, shared, upstreams)
            .await
            .map_err(|e| Failure::Connect(format!("{e:#}")))?;
        sender
            .ready()
            .await
            .map_err(|e| Failure::Connect(e.to_string()))?;
        let resp = sender.send_request(req).await;
        // Keep the connection for the next request unless it is done.
        if !sender.is_closed() {
            upstreams.lock().await.insert(target, sender);
        }
        resp.map_err(|e| Failure::Reset(e.to_string()))
    };
    match per_try {
        Some(t) => tokio::time::timeout(t, attempt)
            .await
            .unwrap_or(Err(Failure::PerTryTimeout)),
        None => attempt.await,
    }
}

/// A sender to the endpoint `route` chose: this connection's idle one, or a new one.
async fn upstream(
    route: Route,
    pod: &PodCtx,
    shared: &Shared,
    upstreams: &Upstreams,
) -> Result<(SocketAddr, SendRequest<Body>)> {
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

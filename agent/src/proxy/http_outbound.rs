//! HTTP from a pod to a service port declared HTTP, HTTP/2 or gRPC, proxied at L7 on the client's
//! node. The client may speak HTTP/1.1 or HTTP/2 with prior knowledge (h2c, as gRPC does); each
//! request goes upstream in the version it came in, balanced on its own over the service's
//! endpoints (through HBONE for mesh ones), so routing can decide per request. Keep-alive,
//! chunked bodies and trailers pass through hyper; upgrades (WebSocket) are spliced once the
//! server agrees; a malformed request gets 400 and the connection is closed. The matched route's
//! policy applies in order: fault injection (delay, abort), then the timeout around all tries,
//! then retries, each try with its own timeout.
use std::{collections::HashMap, convert::Infallible, net::SocketAddr, sync::Arc};

use anyhow::{Result, bail};
use http_body_util::BodyExt;
use hyper::body::Body as _;
use hyper::{Request, Response, StatusCode, Version, body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::sync::Mutex;
use tracing::{Instrument as _, debug, warn};

use super::{
    PodCtx, Shared,
    balance::Overflow,
    connect, hbone,
    http::{self, Body, Sender},
    labels, trace,
};
use crate::{
    http_route::{Policy, Retry},
    state::{HttpRefusal, Route, Target, Workload},
};

/// An upstream connection and how many requests it has carried.
struct Pooled {
    sender: Sender<Body>,
    used: u32,
}

/// Upstream connections of one downstream connection, by endpoint and HTTP version. An HTTP/1.1
/// one is taken out while it carries a request; an HTTP/2 one stays and is shared.
type Upstreams = Arc<Mutex<HashMap<(SocketAddr, Version), Pooled>>>;

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
    if let Err(e) = http::server()
        .serve_connection_with_upgrades(TokioIo::new(client), service)
        .await
    {
        debug!(%vip, "outbound HTTP connection ended: {e}");
    }
}

/// What metrics say about one request besides its status.
struct Outcome {
    /// Envoy's response flags: `-`, NR no route, UH no healthy upstream, FI fault abort, DI
    /// delay injected, UT timeout, URX retries exhausted, UF connect failure.
    flags: &'static str,
    destination: Option<Arc<Workload>>,
    service: Option<String>,
}

/// Proxies one request and records Istio's request metrics for it (reporter `source`).
async fn forward(
    mut req: Request<Incoming>,
    vip: SocketAddr,
    pod: &Arc<PodCtx>,
    shared: &Arc<Shared>,
    upstreams: &Upstreams,
) -> Response<Body> {
    let start = std::time::Instant::now();
    let request_bytes = req.body().size_hint().exact().unwrap_or(0);
    let trace = trace::continue_trace(req.headers_mut());
    let span = tracing::info_span!(
        "http_request",
        trace_id = %trace.trace_id,
        span_id = %trace.span_id,
        parent_id = trace.parent_id.as_deref().unwrap_or(""),
        pod = %pod.name,
        method = %req.method(),
        path = req.uri().path(),
    );
    let (method, path) = (req.method().clone(), req.uri().path().to_owned());
    let grpc = req
        .headers()
        .get(hyper::header::CONTENT_TYPE)
        .is_some_and(|t| t.as_bytes().starts_with(b"application/grpc"));
    let (resp, outcome) = proxy_request(req, vip, pod, shared, upstreams)
        .instrument(span.clone())
        .await;
    span.in_scope(|| {
        tracing::info!(
            %method,
            path,
            status = resp.status().as_u16(),
            response_flags = outcome.flags,
            service = outcome.service.as_deref().unwrap_or("unknown"),
            duration_ms = start.elapsed().as_secs_f64() * 1000.0,
            "http request"
        )
    });
    let source = pod.workload(&shared.state.borrow());
    let mut labels = labels(
        "source",
        source.as_deref(),
        pod.identity.as_deref(),
        outcome.destination.as_deref(),
        outcome.service.as_deref(),
        outcome
            .destination
            .as_ref()
            .is_some_and(|w| w.identity.is_some()),
    );
    labels.request_protocol = if grpc { "grpc" } else { "http" };
    labels.response_flags = outcome.flags;
    shared.metrics.request(
        labels,
        resp.status().as_u16(),
        start.elapsed(),
        request_bytes,
        resp.body().size_hint().exact().unwrap_or(0),
    );
    resp
}

async fn proxy_request(
    req: Request<Incoming>,
    vip: SocketAddr,
    pod: &Arc<PodCtx>,
    shared: &Arc<Shared>,
    upstreams: &Upstreams,
) -> (Response<Body>, Outcome) {
    let chosen =
        shared
            .state
            .borrow()
            .route_http(vip, req.method(), req.uri().path(), req.headers());
    let decision = match chosen {
        Ok(d) => d,
        Err(e) => return refusal(pod, vip, e),
    };
    let policy = &decision.policy;
    let mut outcome = Outcome {
        flags: "-",
        destination: None,
        service: Some(decision.target.service.clone()),
    };
    // Fault injection first: an aborted request never reaches upstream.
    let (delay, abort) = policy.fault.roll();
    if let Some(d) = delay {
        outcome.flags = "DI";
        tokio::time::sleep(d).await;
    }
    if let Some(status) = abort {
        outcome.flags = "FI";
        return (http::error(status, "fault filter abort\n"), outcome);
    }
    let mut req = req.map(BodyExt::boxed);
    rewrite(&mut req, policy, decision.matched_prefix.as_deref());
    policy.request_headers.apply(req.headers_mut());
    // The connection pool's admission holds for the whole request, retries included.
    let _admitted = match shared
        .balancer
        .admit(&decision.target.cluster, decision.target.traffic.pool)
        .await
    {
        Ok(permit) => permit,
        Err(Overflow) => {
            outcome.flags = "UO";
            let mut resp = http::error(StatusCode::SERVICE_UNAVAILABLE, "overflow\n");
            resp.headers_mut().insert(
                "x-trellis-overflow",
                hyper::header::HeaderValue::from_static("1"),
            );
            return (resp, outcome);
        }
    };
    if let Some(mirror) = decision.mirror {
        req = mirror_copy(req, mirror, pod, shared).await;
    }
    let call = Call {
        target: &decision.target,
        pod,
        shared,
        upstreams,
    };
    let attempt = async {
        match &policy.retry {
            // Upgrades cannot be replayed; neither can a body larger than we keep.
            Some(retry) if !is_upgrade(&req) => call.with_retries(req, retry).await,
            _ => {
                let upgrade = hyper::upgrade::on(&mut req);
                let (mut resp, to) = call
                    .once(req, None)
                    .await
                    .map_err(|e| Failed::Upstream(e.to_string(), false))?;
                http::pass_upgrade(upgrade, &mut resp);
                Ok((resp.map(BodyExt::boxed), to, false))
            }
        }
    };
    let answered = match policy.timeout {
        Some(t) => tokio::time::timeout(t, attempt)
            .await
            .unwrap_or_else(|_| Err(Failed::Timeout)),
        None => attempt.await,
    };
    let resp = match answered {
        Ok((mut resp, to, retried_out)) => {
            outcome.destination = Some(to);
            if retried_out {
                outcome.flags = "URX";
            }
            policy.response_headers.apply(resp.headers_mut());
            resp
        }
        Err(Failed::Timeout) => {
            outcome.flags = "UT";
            http::error(StatusCode::GATEWAY_TIMEOUT, "upstream request timeout\n")
        }
        Err(Failed::Upstream(e, retried_out)) => {
            warn!(pod = %pod.name, %vip, "HTTP request failed: {e}");
            outcome.flags = if retried_out { "URX" } else { "UF" };
            http::error(StatusCode::SERVICE_UNAVAILABLE, "upstream connect error\n")
        }
    };
    (resp, outcome)
}

/// Why no upstream answer came back.
enum Failed {
    /// The route's timeout ran out.
    Timeout,
    /// The last try failed (and whether retries ran out on it).
    Upstream(String, bool),
}

fn refusal(pod: &PodCtx, vip: SocketAddr, e: HttpRefusal) -> (Response<Body>, Outcome) {
    let outcome = |flags| Outcome {
        flags,
        destination: None,
        service: None,
    };
    match e {
        HttpRefusal::NoRoute => (
            http::error(StatusCode::NOT_FOUND, "no route matched\n"),
            outcome("NR"),
        ),
        HttpRefusal::NoUpstream(why) => {
            warn!(pod = %pod.name, %vip, "no upstream: {why}");
            (
                http::error(StatusCode::SERVICE_UNAVAILABLE, "no healthy upstream\n"),
                outcome("UH"),
            )
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
        // HTTP/2 carries the authority in the URI (`:authority`), HTTP/1.1 in Host.
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

/// Sends a copy of `req` to `mirror` in the background (Host gets Envoy's `-shadow` suffix; the
/// answer is dropped) and gives back the request, its body now buffered (up to 1 MiB; a larger
/// body is not mirrored).
async fn mirror_copy(
    req: Request<Body>,
    mirror: Target,
    pod: &Arc<PodCtx>,
    shared: &Arc<Shared>,
) -> Request<Body> {
    if is_upgrade(&req) || req.body().size_hint().lower() > RETRY_BODY_LIMIT as u64 {
        return req;
    }
    let (parts, body) = req.into_parts();
    let bytes = match http_body_util::Limited::new(body, RETRY_BODY_LIMIT)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            debug!("not mirroring: reading the body: {e}");
            hyper::body::Bytes::new()
        }
    };
    let mut copy = Request::from_parts(parts.clone(), full(bytes.clone()));
    *copy.extensions_mut() = hyper::http::Extensions::new();
    if let Some(host) = copy
        .headers()
        .get(hyper::header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(|h| format!("{}-shadow", h.split(':').next().unwrap_or(h)))
        && let Ok(v) = hyper::header::HeaderValue::from_str(&host)
    {
        copy.headers_mut().insert(hyper::header::HOST, v);
    }
    let (pod, shared) = (pod.clone(), shared.clone());
    tokio::spawn(async move {
        let upstreams = Upstreams::default();
        let call = Call {
            target: &mirror,
            pod: &pod,
            shared: &shared,
            upstreams: &upstreams,
        };
        if let Err(e) = call.once(copy, Some(MIRROR_TIMEOUT)).await {
            debug!(cluster = mirror.cluster, "mirrored request failed: {e}");
        }
    });
    Request::from_parts(parts, full(bytes))
}

/// How long a mirrored copy may take before it is abandoned.
const MIRROR_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.headers().contains_key(hyper::header::UPGRADE)
}

/// Request bodies up to this size are kept so that a retry can send them again.
const RETRY_BODY_LIMIT: usize = 1 << 20;
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

/// One request's tries, all within the cluster its route chose.
struct Call<'a> {
    target: &'a Target,
    pod: &'a PodCtx,
    shared: &'a Shared,
    upstreams: &'a Upstreams,
}

impl Call<'_> {
    /// Sends `req`, trying again (on a freshly balanced endpoint) when the route's retry policy
    /// says so; the last answer or error stands when the tries run out (then flagged as such).
    async fn with_retries(
        &self,
        req: Request<Body>,
        retry: &Retry,
    ) -> Result<(Response<Body>, Arc<Workload>, bool), Failed> {
        let (parts, body) = req.into_parts();
        let body = http_body_util::Limited::new(body, RETRY_BODY_LIMIT)
            .collect()
            .await
            .map_err(|e| Failed::Upstream(format!("reading the request body: {e}"), false))?
            .to_bytes();
        let mut last = Err(Failed::Upstream(String::new(), false));
        for attempt in 0..=retry.attempts {
            if attempt > 0 {
                tokio::time::sleep(RETRY_BACKOFF * attempt).await;
                debug!(pod = %self.pod.name, cluster = self.target.cluster, attempt, "retrying");
            }
            let mut req = Request::from_parts(parts.clone(), full(body.clone()));
            // The downstream connection's own extensions (hyper's upgrade handle) stay behind.
            *req.extensions_mut() = hyper::http::Extensions::new();
            let sent = self.once(req, retry.per_try_timeout).await;
            let again = match &sent {
                Ok((resp, _)) => retry.on.status(resp.status()),
                Err(Failure::Connect(_)) => retry.on.connect_failure,
                Err(Failure::Reset(_)) => retry.on.reset,
                // As Envoy: a try that timed out counts as a 504.
                Err(Failure::PerTryTimeout) => retry.on.status(StatusCode::GATEWAY_TIMEOUT),
            };
            let exhausted = again && attempt == retry.attempts;
            last = sent
                .map(|(r, to)| (r.map(BodyExt::boxed), to, exhausted))
                .map_err(|e| Failed::Upstream(e.to_string(), exhausted));
            if !again {
                break;
            }
        }
        last
    }

    /// One try: an endpoint chosen by the balancer, its connection, the request; the outcome
    /// feeds outlier detection.
    async fn once(
        &self,
        req: Request<Body>,
        per_try: Option<std::time::Duration>,
    ) -> Result<(Response<Incoming>, Arc<Workload>), Failure> {
        let balancer = &self.shared.balancer;
        let candidate = balancer.choose(self.target, req.headers()).clone();
        let _in_flight = balancer.start(candidate.addr);
        let route = candidate.route(&self.target.service);
        let limits = self.target.traffic.pool;
        let attempt = async {
            let max_requests = limits.map_or(0, |l| l.max_requests_per_connection);
            let (key, mut pooled) = upstream(
                route,
                req.version(),
                max_requests,
                self.pod,
                self.shared,
                self.upstreams,
            )
            .await
            .map_err(|e| Failure::Connect(format!("{e:#}")))?;
            pooled
                .sender
                .ready()
                .await
                .map_err(|e| Failure::Connect(causes(e)))?;
            let resp = pooled.sender.send(req).await;
            // An HTTP/1.1 connection goes back for the next request unless it is done or used up.
            let spent = max_requests > 0 && pooled.used >= max_requests;
            if matches!(pooled.sender, Sender::Http1(_)) && !pooled.sender.is_closed() && !spent {
                self.upstreams.lock().await.insert(key, pooled);
            }
            resp.map_err(|e| Failure::Reset(causes(e)))
        };
        let result = match per_try {
            Some(t) => tokio::time::timeout(t, attempt)
                .await
                .unwrap_or(Err(Failure::PerTryTimeout)),
            None => attempt.await,
        };
        let failed = result
            .as_ref()
            .map_or(true, |r| r.status().is_server_error());
        balancer.record(candidate.addr, self.target.traffic.outlier, failed);
        result.map(|r| (r, candidate.workload))
    }
}

/// hyper's error with its causes: its own text alone says only which step failed.
fn causes(e: hyper::Error) -> String {
    format!("{:#}", anyhow::Error::new(e))
}

/// A connection to the endpoint `route` chose, in `version`: this downstream connection's idle
/// (HTTP/1.1) or shared (HTTP/2) one, or a new one. Counts the request against it; a shared one
/// used up by `maxRequestsPerConnection` (`max_requests`, 0 for no limit) leaves the map.
async fn upstream(
    route: Route,
    version: Version,
    max_requests: u32,
    pod: &PodCtx,
    shared: &Shared,
    upstreams: &Upstreams,
) -> Result<((SocketAddr, Version), Pooled)> {
    let target = match &route {
        Route::Hbone { target, .. } => *target,
        Route::Passthrough { addr, .. } => *addr,
        Route::NoEndpoints { service } => bail!("{service} has no endpoint"),
    };
    let key = (target, version);
    {
        let mut map = upstreams.lock().await;
        if let Some(p) = map.get_mut(&key)
            && !p.sender.is_closed()
            && let Some(sender) = p.sender.share()
        {
            p.used += 1;
            let used = p.used;
            if max_requests > 0 && used >= max_requests {
                map.remove(&key);
            }
            return Ok((key, Pooled { sender, used }));
        }
        if let Some(mut p) = map.remove(&key)
            && p.sender.is_ready()
        {
            p.used += 1;
            return Ok((key, p));
        }
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
            Sender::handshake(TokioIo::new(tunnel), version).await?
        }
        _ => {
            let tcp = connect(pod.socket_for(target)?, target).await?;
            Sender::handshake(TokioIo::new(tcp), version).await?
        }
    };
    let pooled = Pooled { sender, used: 1 };
    if let Some(sender) = pooled.sender.share() {
        upstreams
            .lock()
            .await
            .insert(key, Pooled { sender, used: 1 });
    }
    Ok((key, pooled))
}

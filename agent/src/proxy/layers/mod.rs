//! The outbound HTTP request path as tower layers, one per behaviour, outermost first:
//!
//! `observe` (trace span, log line, Istio request metrics) → `route` (VirtualService match; the
//! decision rides in the request's extensions) → `fault` (delay, abort) → `rewrite` (uri,
//! authority) → `headers` (request and response edits) → `admission` (connection-pool limits) →
//! `mirror` (a copy to the shadow destination) → `timeout` (the route's deadline over all tries)
//! → `retry` (tries again on what `retryOn` names) → `upstream` (one try: balance, connect, send).
//!
//! Every layer turns a request into an answer and never fails: failures are answers (503, 504,
//! …) that carry an [`Outcome`] in their extensions, which outer layers read (retry decides on
//! it, observe reports its flags).
use std::{future::Future, net::SocketAddr, pin::Pin, sync::Arc};

use hyper::{Request, Response};
use tower::{Layer, ServiceBuilder};

use super::{PodCtx, Shared, http::Body};
use crate::state::{HttpDecision, HttpEntry, Target, Workload};

mod admission;
mod fault;
mod headers;
mod mirror;
mod observe;
mod retry;
mod rewrite;
mod route;
mod timeout;
mod upstream;

pub type Req = Request<Body>;
pub type Resp = Response<Body>;
type Answer = Pin<Box<dyn Future<Output = Resp> + Send>>;

/// The rest of the stack below a layer. The stack is built once per downstream connection and
/// each request (each try) passes through it, so a clone is a reference count, not a copy of
/// every layer below.
#[derive(Clone)]
pub struct Next(Arc<dyn Fn(Req) -> Answer + Send + Sync>);

impl Next {
    fn new<F, Fut>(f: F) -> Self
    where
        F: Fn(Req) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Resp> + Send + 'static,
    {
        Self(Arc::new(move |req| Box::pin(f(req))))
    }

    /// Passes `req` to the rest of the stack.
    pub fn call(&self, req: Req) -> Answer {
        (self.0)(req)
    }
}

/// Where a downstream connection came from and went to, for access logs and spans.
#[derive(Clone, Copy)]
pub struct Downstream {
    /// The address the client connected to (a service's, or a gateway's server port).
    pub local: SocketAddr,
    /// The client, when known.
    pub remote: Option<SocketAddr>,
}

/// The whole stack for one downstream connection to a service port or a gateway's server port.
pub fn stack(
    entry: HttpEntry,
    pod: Arc<PodCtx>,
    shared: Arc<Shared>,
    downstream: Downstream,
) -> Next {
    let upstream = upstream::Upstream::new(pod.clone(), shared.clone());
    ServiceBuilder::new()
        .layer(observe::layer(pod.clone(), shared.clone(), downstream))
        .layer(route::layer(entry, pod.clone(), shared.clone()))
        .layer(fault::layer())
        .layer(rewrite::layer())
        .layer(headers::layer())
        .layer(admission::layer(shared.clone()))
        .layer(mirror::layer(pod, shared))
        .layer(timeout::layer())
        .layer(retry::layer())
        .service(Next::new(move |req| upstream.clone().send(req)))
}

/// A layer that runs `f` around the rest of the stack.
fn around<F, Fut>(f: F) -> impl Layer<Next, Service = Next> + Clone
where
    F: Fn(Req, Next) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Resp> + Send + 'static,
{
    tower::layer::layer_fn(move |next: Next| {
        let f = f.clone();
        Next::new(move |req| f(req, next.clone()))
    })
}

/// What the route layer decided for this request; None only if it has not run.
fn decision(req: &Req) -> Option<Arc<HttpDecision>> {
    req.extensions().get::<Arc<HttpDecision>>().cloned()
}

/// How one try failed, for `retryOn`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// No connection to the endpoint.
    Connect,
    /// The connection broke before a complete answer.
    Reset,
    /// The try's own timeout ran out.
    PerTryTimeout,
}

/// What metrics and retries learn about an answer besides its status.
#[derive(Clone)]
pub struct Outcome {
    /// Envoy's response flags: `-`, NR no route, UH no healthy upstream, FI fault abort, DI
    /// delay injected, UT timeout, URX retries exhausted, UF connect failure, UO overflow.
    pub flags: &'static str,
    /// The endpoint that answered, if one did.
    pub destination: Option<Arc<Workload>>,
    /// Where the route sent the request (its service, and its cluster once `upstream` is set).
    pub target: Option<Arc<Target>>,
    /// The endpoint's address, once one was chosen.
    pub upstream: Option<SocketAddr>,
    /// Set on an answer the proxy made because the try failed.
    pub failure: Option<Failure>,
}

impl Default for Outcome {
    fn default() -> Self {
        Self {
            flags: "-",
            destination: None,
            target: None,
            upstream: None,
            failure: None,
        }
    }
}

/// The answer's outcome, to read or amend.
fn outcome(resp: &mut Resp) -> &mut Outcome {
    resp.extensions_mut().get_or_insert_default()
}

/// An answer made by the proxy, with its flags.
fn local(code: hyper::StatusCode, text: &'static str, flags: &'static str) -> Resp {
    let mut resp = super::http::error(code, text);
    outcome(&mut resp).flags = flags;
    resp
}

/// A request that asks to switch protocols (WebSocket): sent once, never copied.
fn is_upgrade(req: &Req) -> bool {
    req.headers().contains_key(hyper::header::UPGRADE)
}

/// A body of bytes already in hand (kept for a retry or a mirror copy).
fn full(bytes: hyper::body::Bytes) -> Body {
    use http_body_util::BodyExt as _;
    http_body_util::Full::new(bytes)
        .map_err(|never| match never {})
        .boxed()
}

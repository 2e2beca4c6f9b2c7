//! HTTP inbound to a port its service declares HTTP, HTTP/2 or gRPC: each request goes to the app
//! with the caller's verified identity in `x-forwarded-client-cert` (Envoy's and Istio's header,
//! `By=<server>;URI=<client>`) when it came over HBONE, and without that header when it came in
//! plaintext. Whatever the client sent in it is always removed first, so the app can trust it.
//! The app is spoken to in the client's HTTP version (h2c for HTTP/2) over one connection.
//! Upgrades (WebSocket) are passed through once the app agrees.
use std::{collections::HashMap, convert::Infallible, net::SocketAddr, sync::Arc, time::Instant};

use hyper::{
    Request, Response, StatusCode,
    body::{Body as _, Incoming},
    header::HeaderValue,
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
    sync::Mutex,
};
use tracing::{Instrument as _, debug};

use super::{
    HttpLimits, PodCtx, Shared,
    authorize::{self, Caller, DENIED_FLAG},
    exchange::{Answer, Ends, Exchange, Side, request_span},
    guard::Admission,
    http::{self, Body, Sender},
    inbound::to_app,
};
use crate::metrics::{ByteCounters, HttpLabels, LastRequest, RequestFigures, TcpLabels};

pub const XFCC: &str = "x-forwarded-client-cert";

/// The connection to the app: the one made for the tunnel until the first request picks its
/// HTTP version, then a sender in that version; a new connection once the app has closed it
/// (apps close idle keep-alive connections, while the tunnel in front of them stays open).
enum App {
    Unused(TcpStream),
    Speaking(Sender<Body>),
    Closed,
}

/// Where the app is and who is calling it.
struct Target {
    pod: Arc<PodCtx>,
    addr: SocketAddr,
    /// The client: the calling pod (over HBONE, its own address) or whoever connected.
    peer: SocketAddr,
    caller: Caller,
    /// `x-forwarded-client-cert` for mutual-TLS callers.
    xfcc: Option<HeaderValue>,
    /// The connection's metric labels (reporter `destination`).
    labels: TcpLabels,
    /// Its request metrics by what varies per request: status, protocol, flags.
    requests: LastRequest<(u16, &'static str, &'static str)>,
    /// Requests that came without a tunnel count their bodies here; a tunnel counts its bytes.
    bytes: Option<ByteCounters>,
    shared: Arc<Shared>,
}

impl Target {
    /// Who called whom, from the mesh state: the caller's workload only if its identity agrees.
    fn ends(&self) -> Ends {
        let state = self.shared.state.borrow();
        Ends {
            source: state
                .workloads
                .get(&self.peer.ip())
                .filter(|w| w.identity == self.caller.identity)
                .cloned(),
            source_principal: self.caller.identity.clone(),
            destination: self.pod.workload(&state),
            destination_principal: self.pod.identity.clone(),
            service: Some(self.labels.destination_service.to_string()).filter(|s| s != "unknown"),
        }
    }

    /// Counts one request in Istio's request metrics.
    fn count(&self, protocol: &'static str, flags: &'static str, code: u16, r: RequestFigures) {
        let labels = |_: &_| HttpLabels {
            tcp: TcpLabels {
                request_protocol: protocol,
                response_flags: flags,
                ..self.labels.clone()
            },
            response_code: code,
        };
        self.requests
            .record_with(&self.shared.metrics, (code, protocol, flags), labels, r);
        if let Some(bytes) = &self.bytes {
            bytes.received.inc_by(r.request_bytes);
            bytes.sent.inc_by(r.response_bytes);
        }
    }
}

/// Serves HTTP/1.1 or HTTP/2 from `client` (`peer`), forwarding to `addr` in `pod` over `app` (a
/// connection already made) or one made for the first request. Each request is first decided
/// by the pod's AuthorizationPolicies, and counted in Istio's request metrics.
#[allow(clippy::too_many_arguments)] // one connection's whole context, each piece distinct
pub async fn serve<C>(
    client: C,
    app: Option<TcpStream>,
    pod: Arc<PodCtx>,
    addr: SocketAddr,
    peer: SocketAddr,
    caller: Caller,
    labels: &TcpLabels,
    shared: &Arc<Shared>,
    limits: &HttpLimits,
) where
    C: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let Some(xfcc) = xfcc(&pod, &caller) else {
        return debug!(caller = caller.identity, "identity not usable in a header");
    };
    let app = Arc::new(Mutex::new(app.map_or(App::Closed, App::Unused)));
    let target = Arc::new(Target {
        pod,
        addr,
        peer,
        caller,
        xfcc,
        labels: labels.clone(),
        requests: LastRequest::default(),
        bytes: None,
        shared: shared.clone(),
    });
    let service = service_fn(move |req: Request<Incoming>| {
        forward(req.map(http::boxed), app.clone(), target.clone())
    });
    if let Err(e) = http::serve(client, service, limits).await {
        debug!("inbound HTTP connection ended: {e}");
    }
}

/// The `x-forwarded-client-cert` value for a mutual-TLS caller (None inside for a plaintext
/// one); None if an identity cannot be a header.
fn xfcc(pod: &PodCtx, caller: &Caller) -> Option<Option<HeaderValue>> {
    match (pod.identity.as_deref(), caller.identity.as_deref()) {
        (Some(server), Some(client)) => HeaderValue::from_str(&format!("By={server};URI={client}"))
            .ok()
            .map(Some),
        _ => Some(None),
    }
}

/// The targets of requests that came straight on one HBONE connection (`hbone::DIRECT`), each
/// served as one HTTP connection would be: counted as a connection opened when its first
/// request came and closed when the HBONE connection ends.
#[derive(Default)]
pub struct Direct {
    targets: std::sync::Mutex<HashMap<SocketAddr, Arc<DirectTarget>>>,
}

struct DirectTarget {
    app: Arc<Mutex<App>>,
    target: Arc<Target>,
    _admission: Admission,
}

impl Drop for DirectTarget {
    fn drop(&mut self) {
        self.target.shared.metrics.closed(&self.target.labels);
    }
}

/// What a direct request's first arrival for a target needs to serve it.
pub struct DirectStart {
    pub caller: Caller,
    pub labels: TcpLabels,
    pub admission: Admission,
}

impl Direct {
    /// Serves `req` for `addr` in `pod`, from `peer`; `start` is called (under a lock, so
    /// once) for the first request to `addr`, and may refuse it with an answer.
    pub async fn serve(
        &self,
        mut req: Request<Body>,
        pod: &Arc<PodCtx>,
        addr: SocketAddr,
        peer: SocketAddr,
        shared: &Arc<Shared>,
        start: impl FnOnce() -> Result<DirectStart, Box<Response<Body>>>,
    ) -> Response<Body> {
        req.headers_mut().remove(&super::hbone::DIRECT);
        let found = {
            let mut targets = self.targets.lock().unwrap_or_else(|p| p.into_inner());
            match targets.get(&addr) {
                Some(t) => t.clone(),
                None => {
                    let DirectStart {
                        caller,
                        labels,
                        admission,
                    } = match start() {
                        Ok(s) => s,
                        Err(refused) => return *refused,
                    };
                    let Some(xfcc) = xfcc(pod, &caller) else {
                        return http::error(StatusCode::FORBIDDEN, "identity not usable\n");
                    };
                    let bytes = Some(shared.metrics.opened(&labels));
                    let t = Arc::new(DirectTarget {
                        app: Arc::new(Mutex::new(App::Closed)),
                        target: Arc::new(Target {
                            pod: pod.clone(),
                            addr,
                            peer,
                            caller,
                            xfcc,
                            labels,
                            requests: LastRequest::default(),
                            bytes,
                            shared: shared.clone(),
                        }),
                        _admission: admission,
                    });
                    targets.insert(addr, t.clone());
                    t
                }
            }
        };
        match forward(req, found.app.clone(), found.target.clone()).await {
            Ok(resp) => resp,
            Err(never) => match never {},
        }
    }
}

async fn forward(
    mut req: Request<Body>,
    app: Arc<Mutex<App>>,
    target: Arc<Target>,
) -> Result<Response<Body>, Infallible> {
    let start = Instant::now();
    let shared = &target.shared;
    let (trace, span) = request_span(shared, &target.pod.name, &mut req);
    let exchange = Exchange::begin(
        shared,
        Side::Destination,
        &req,
        &trace,
        &span,
        (Some(target.addr), Some(target.peer)),
    );
    let report = |resp: Response<Body>, flags: &'static str| match exchange {
        Some(x) => {
            let answer = Answer {
                code: resp.status().as_u16(),
                flags,
                upstream_host: (flags == "-").then_some(target.addr),
                upstream_cluster: Some(format!("inbound|{}||", target.addr.port())),
                failure: None,
                ends: target.ends(),
            };
            x.respond(answer, resp)
        }
        None => resp,
    };
    let protocol = if http::is_grpc(req.headers()) {
        "grpc"
    } else {
        "http"
    };
    let request_bytes = req.body().size_hint().exact().unwrap_or(0);
    let figures = |response_bytes| RequestFigures {
        took: start.elapsed(),
        request_bytes,
        response_bytes,
    };
    let resp = match authorize::request(
        &target.shared,
        &target.pod,
        &target.caller,
        target.addr.port(),
        &req,
    ) {
        Some(denied) => {
            // Counted as Istio does: a 403, also for gRPC (answered PERMISSION_DENIED).
            target.count(protocol, DENIED_FLAG, 403, figures(0));
            return Ok(report(denied, DENIED_FLAG));
        }
        None => pass(req, &app, &target).instrument(span.clone()).await,
    };
    let response_bytes = resp.body().size_hint().exact().unwrap_or(0);
    target.count(
        protocol,
        "-",
        resp.status().as_u16(),
        figures(response_bytes),
    );
    Ok(report(resp, "-"))
}

/// Sends an authorized request on to the app.
async fn pass(mut req: Request<Body>, app: &Mutex<App>, target: &Target) -> Response<Body> {
    req.headers_mut().remove(XFCC);
    if let Some(v) = &target.xfcc {
        req.headers_mut().insert(XFCC, v.clone());
    }
    let client_upgrade = hyper::upgrade::on(&mut req);
    let sent = {
        let mut app = app.lock().await;
        speak(&mut app, target, req.version()).await;
        match &mut *app {
            // HTTP/2 multiplexes: send outside the lock, so requests run concurrently.
            App::Speaking(sender) => match sender.share() {
                Some(mut shared) => {
                    drop(app);
                    send(&mut shared, req).await
                }
                None => send(sender, req).await,
            },
            _ => Err(None),
        }
    };
    let mut resp = match sent {
        Ok(resp) => resp,
        Err(e) => {
            if let Some(e) = e {
                debug!("forwarding to the app: {e}");
            }
            return http::error(StatusCode::BAD_GATEWAY, "upstream connect error\n");
        }
    };
    http::pass_upgrade(client_upgrade, &mut resp);
    resp.map(http::boxed)
}

/// Leaves `app` speaking `version` over an open connection, when the app can be reached.
async fn speak(app: &mut App, target: &Target, version: hyper::Version) {
    let tcp = match std::mem::replace(app, App::Closed) {
        App::Speaking(sender) if !sender.is_closed() => {
            *app = App::Speaking(sender);
            return;
        }
        App::Unused(tcp) => tcp,
        _ => match to_app(&target.pod, target.addr).await {
            Ok(tcp) => tcp,
            Err(e) => return debug!("reconnecting to the app: {e}"),
        },
    };
    match Sender::handshake(TokioIo::new(tcp), version).await {
        Ok(sender) => *app = App::Speaking(sender),
        Err(e) => debug!("handshake with the app: {e:#}"),
    }
}

async fn send(
    app: &mut Sender<Body>,
    req: Request<Body>,
) -> Result<Response<Incoming>, Option<hyper::Error>> {
    app.ready().await?;
    Ok(app.send(req).await?)
}

//! Inbound: HBONE on 15008 (mutual TLS, the client's SPIFFE ID checked, then a CONNECT stream per
//! connection to the app) and captured plaintext on 15006 (passed to the app unless the pod's
//! PeerAuthentication is STRICT for that port and the connection was not opened by the node
//! itself, whose kubelet probes the pod).
use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use h2::{RecvStream, server::SendResponse};
use http_body_util::BodyExt as _;
use hyper::{Method, Request, Response, StatusCode, Uri, body::Bytes};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use super::{
    CONNECT_TIMEOUT, Failure, Metered, PodCtx, Shared,
    authorize::{self, Caller},
    canonical,
    conn_log::{Closing, ConnLog},
    connect, gateway,
    guard::Admission,
    h2_stream::{RecvBody, Tunnel, answer},
    hbone::{self, CONNECTION_WINDOW, MAX_FRAME, STREAM_WINDOW},
    http, http_inbound, labels, proxy_port,
    read_ahead::ReadAhead,
    reset, splice,
};
use crate::{
    proxy::HttpLimits,
    state::{GatewayMode, MeshState, Route},
    tls,
};

/// How a local gateway pod's server port that does more than splice (TLS, HTTP) takes
/// connections; None for other ports.
fn l7_gateway(state: &MeshState, target: SocketAddr) -> Option<GatewayMode> {
    state
        .gateways
        .get(&target)
        .filter(|g| !g.plain_tcp())
        .map(|g| g.mode)
}

/// Plaintext captured by sk_lookup for one of the pod's app ports.
pub async fn plaintext(client: TcpStream, peer: SocketAddr, pod: Arc<PodCtx>, shared: Arc<Shared>) {
    let dst = match client.local_addr() {
        Ok(a) => canonical(a),
        Err(e) => return warn!(pod = %pod.name, "inbound connection without a local address: {e}"),
    };
    // Steered connections keep the app's port; one addressed to 15006 itself was not steered.
    if proxy_port(dst.port()) {
        reset(&client);
        if let Some(suppressed) = shared.fail(Failure::proxy_port) {
            warn!(pod = %pod.name, client = %peer, orig_dst = %dst, suppressed, "connection to the proxy's own port refused");
        }
        return;
    }
    let (strict, authz, source, destination, http, gateway, l7, service) = {
        let state = shared.state.borrow();
        let gateway = state.gateway_route(dst);
        let l7 = l7_gateway(&state, dst);
        let service = destination_service(&state, gateway.as_ref(), dst);
        (
            // A gateway's server ports take traffic from outside the mesh: that is what they
            // are for, so STRICT does not refuse it there.
            gateway.is_none() && state.peer_auth(&pod.uid).refuses_plaintext(dst.port()),
            state.authz.contains_key(&pod.uid),
            state.workloads.get(&peer.ip()).cloned(),
            pod.workload(&state),
            gateway.is_none() && state.http_ports.contains(&dst),
            gateway,
            l7,
            service,
        )
    };
    // Only a socket in the node's own netns (kubelet's probes) may pass STRICT in plaintext, and
    // AuthorizationPolicy does not apply to it (as Istio exempts kubelet's probes from both);
    // the kernel recorded who opened the connection, and forwarded traffic has no record.
    let from_node =
        (strict || authz) && shared.maps.node_conns.take(peer, dst) == Some(shared.node_netns);
    if strict && !from_node {
        reset(&client);
        if let Some(suppressed) = shared.fail(Failure::strict) {
            info!(direction = "inbound", pod = %pod.name, client = %peer, orig_dst = %dst, suppressed, "plaintext refused: PeerAuthentication is STRICT");
        }
        return;
    }
    info!(direction = "inbound", pod = %pod.name, client = %peer, orig_dst = %dst, "connection captured");
    let labels = labels(
        "destination",
        source.as_deref(),
        None,
        destination.as_deref(),
        service.as_deref(),
        false,
    );
    let caller = Caller {
        identity: None,
        ip: peer.ip(),
        from_node,
    };
    let _ = client.set_nodelay(true);
    if let Some(mode) = l7 {
        // HTTP is authorized request by request.
        if mode != GatewayMode::Http
            && authorize::connection(&shared, &pod, &caller, dst.port(), &labels).is_err()
        {
            return reset(&client);
        }
        let client = Metered::new(client, shared.metrics.opened(&labels));
        gateway::serve(client, dst, caller, pod.clone(), shared.clone(), &labels).await;
        return shared.metrics.closed(&labels);
    }
    if http {
        // Served at L7 to decide each request's authorization and to strip any forged client
        // identity header; the app connection is made for the first request, not for a client
        // that has sent nothing.
        let client = Metered::new(client, shared.metrics.opened(&labels));
        http_inbound::serve(
            client,
            None,
            pod.clone(),
            dst,
            peer,
            caller,
            &labels,
            &shared,
            &shared.http,
        )
        .await;
        return shared.metrics.closed(&labels);
    }
    if authorize::connection(&shared, &pod, &caller, dst.port(), &labels).is_err() {
        return reset(&client);
    }
    let app = match gateway {
        None => to_app(&pod, dst).await.map(Upstream::App),
        Some(route) => {
            info!(direction = "inbound", pod = %pod.name, client = %peer, orig_dst = %dst, destination = route.service(), "connection to a gateway port");
            super::outbound::from_gateway(&pod, &shared, route)
                .await
                .map(Upstream::Out)
        }
    };
    let app = match app {
        Ok(app) => app,
        Err(e) => {
            return warn!(direction = "inbound", pod = %pod.name, orig_dst = %dst, "connection failed: {e}");
        }
    };
    let log = ConnLog::start(&shared, "inbound", peer, dst);
    let client = Metered::new(client, shared.metrics.opened(&labels));
    let labels = Box::new(labels);
    match app {
        Upstream::App(app) => spliced(client, app, labels, &pod, &shared, caller, dst, log).await,
        Upstream::Out(out) => spliced(client, out, labels, &pod, &shared, caller, dst, log).await,
    }
}

/// Splices a TCP connection until it ends, or until a config change makes the pod's
/// AuthorizationPolicies deny it; (bytes from the client, bytes to it), or why it ended.
pub(super) async fn guarded_splice<C, A>(
    client: &mut C,
    app: &mut A,
    pod: &PodCtx,
    shared: &Shared,
    caller: Caller,
    dst: SocketAddr,
) -> Result<(u64, u64), String>
where
    C: AsyncRead + AsyncWrite + Unpin,
    A: AsyncRead + AsyncWrite + Unpin,
{
    let revoked = authorize::revoked(shared.state.clone(), &pod.uid, &caller, dst.port());
    tokio::select! {
        spliced = splice(client, app) => spliced.map_err(|e| e.to_string()),
        policy = revoked => {
            info!(direction = "inbound", pod = %pod.name, client = %caller.ip, orig_dst = %dst, policy, "open connection closed: an AuthorizationPolicy now denies it");
            Err(format!("an AuthorizationPolicy ({policy}) now denies it"))
        }
    }
}

/// Splices an accepted connection or stream to the app (or a gateway's destination) under the
/// pod's policies, holding only what its close needs ([`Closing`]).
#[allow(clippy::too_many_arguments)] // one stream's whole context, each piece distinct
async fn spliced<C: super::Io, A: super::Io>(
    mut client: Metered<C>,
    mut app: A,
    labels: Box<crate::metrics::TcpLabels>,
    pod: &PodCtx,
    shared: &Shared,
    caller: Caller,
    target: SocketAddr,
    log: Option<Box<ConnLog>>,
) {
    let closing = Closing::new(shared, labels, log);
    let result = guarded_splice(&mut client, &mut app, pod, shared, caller, target).await;
    closing.closed(shared, result);
}

/// Connects to the app from the pod's own address, which sk_lookup never steers, so the app sees
/// an ordinary connection whether it listens on 0.0.0.0 or the pod IP.
pub(super) async fn to_app(pod: &PodCtx, dst: SocketAddr) -> std::io::Result<TcpStream> {
    let sock = pod.socket_for(dst)?;
    bind_address_no_port(&sock)?;
    sock.bind(SocketAddr::new(dst.ip(), 0))?;
    connect(sock, dst).await
}

/// Leaves the source port to `connect`, which needs it unique only per 4-tuple. A `bind` to port
/// 0 must find a port no other socket on the address holds, TIME_WAIT ones included: under a
/// high connection rate that search was a quarter of the agents' time.
fn bind_address_no_port(sock: &tokio::net::TcpSocket) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let on: libc::c_int = 1;
    // SAFETY: a valid socket, and an option value of the size given.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// An HBONE connection from another node's (or this node's) proxy.
pub async fn hbone(stream: TcpStream, peer: SocketAddr, pod: Arc<PodCtx>, shared: Arc<Shared>) {
    let Some(tls) = pod.identity.as_deref().and_then(|id| shared.tls.get(id)) else {
        return warn!(pod = %pod.name, client = %peer, "HBONE connection refused: this pod has no certificate yet");
    };
    let _ = stream.set_nodelay(true);
    let accepted = tokio::time::timeout(
        CONNECT_TIMEOUT,
        TlsAcceptor::from(tls.server.clone()).accept(ReadAhead::new(stream)),
    )
    .await;
    let refused = |error: String| {
        if let Some(suppressed) = shared.fail(Failure::handshake) {
            warn!(pod = %pod.name, client = %peer, error, suppressed, "HBONE handshake refused");
        }
    };
    let stream = match accepted {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return refused(e.to_string()),
        Err(_) => return refused("timed out".into()),
    };
    let client_id = match tls::peer_identity(stream.get_ref().1.peer_certificates()) {
        Ok(id) => Arc::new(id),
        Err(e) => return refused(format!("{e:#}")),
    };
    debug!(pod = %pod.name, client = %peer, client_identity = %client_id, "HBONE connection accepted");
    // Each stream is a connection of the client pod's: as many may be open at once as the
    // pod's connection budget allows (they are counted against it in `tunnel`).
    let streams = u32::try_from(shared.limits.per_pod).unwrap_or(u32::MAX);
    let handshake = h2::server::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_concurrent_streams(streams)
        .max_header_list_size(shared.http.max_header_bytes)
        .handshake::<_, Bytes>(stream);
    let mut conn = match tokio::time::timeout(CONNECT_TIMEOUT, handshake).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => return debug!(client = %peer, "HBONE connection without HTTP/2: {e}"),
        Err(_) => return debug!(client = %peer, "HBONE connection without HTTP/2: timed out"),
    };
    let direct = Arc::new(http_inbound::Direct::default());
    // Accepting also drives the connection: it runs until the client closes it.
    while let Some(accepted) = conn.accept().await {
        let (req, respond) = match accepted {
            Ok(stream) => stream,
            Err(e) => return debug!(client = %peer, "HBONE connection ended: {e}"),
        };
        let (pod, shared, client_id) = (pod.clone(), shared.clone(), client_id.clone());
        let direct = direct.clone();
        tokio::spawn(async move {
            if req.method() == Method::CONNECT {
                tunnel(req, respond, peer, &client_id, pod, shared).await;
            } else {
                let (head, recv) = req.into_parts();
                let body = RecvBody::new(recv, &head.headers).boxed();
                let req = Request::from_parts(head, body);
                // Boxed: a CONNECT stream's task is only as large as a tunnel needs.
                let resp = Box::pin(direct_request(
                    req, peer, &client_id, &pod, &shared, &direct,
                ))
                .await;
                answer(respond, resp).await;
            }
        });
    }
}

/// Why a CONNECT request on the HBONE port is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    NotConnect,
    /// The authority is not an `ip:port`.
    BadAuthority,
    /// Not one of this pod's addresses: the HBONE port is not a relay to anywhere else.
    NotThisPod(SocketAddr),
    /// One of the proxy's own listeners, which would connect to itself.
    ProxyPort(SocketAddr),
}

impl Refused {
    pub fn status(self) -> StatusCode {
        match self {
            Refused::NotConnect => StatusCode::METHOD_NOT_ALLOWED,
            Refused::BadAuthority => StatusCode::BAD_REQUEST,
            Refused::NotThisPod(_) | Refused::ProxyPort(_) => StatusCode::FORBIDDEN,
        }
    }
}

/// Where a CONNECT request for a pod with addresses `pod_ips` may go: only to one of those
/// addresses, on a port that is not the proxy's own. Pure, so it can be fuzzed (fuzz/).
pub fn connect_target(
    method: &Method,
    uri: &Uri,
    pod_ips: &[IpAddr],
) -> Result<SocketAddr, Refused> {
    if method != Method::CONNECT {
        return Err(Refused::NotConnect);
    }
    target_of(uri.authority().map_or("", |a| a.as_str()), pod_ips)
}

/// `authority` as one of `pod_ips`' app ports (see `connect_target`).
fn target_of(authority: &str, pod_ips: &[IpAddr]) -> Result<SocketAddr, Refused> {
    let target = authority
        .parse::<SocketAddr>()
        .map_err(|_| Refused::BadAuthority)?;
    check_target(target, pod_ips)
}

/// `target` if it is one of `pod_ips`' app ports (see `connect_target`).
pub(super) fn check_target(target: SocketAddr, pod_ips: &[IpAddr]) -> Result<SocketAddr, Refused> {
    if !pod_ips.contains(&target.ip()) {
        return Err(Refused::NotThisPod(target));
    }
    if proxy_port(target.port()) {
        return Err(Refused::ProxyPort(target));
    }
    Ok(target)
}

/// What the mesh state says of a stream from `peer` (proven to be `client_id`) to `target`.
pub(super) struct Stream {
    /// An HTTP port of the pod's own (not a gateway's): served at L7.
    pub http: bool,
    pub gateway: Option<Route>,
    pub l7: Option<GatewayMode>,
    pub labels: crate::metrics::TcpLabels,
    pub caller: Caller,
}

pub(super) fn stream(
    shared: &Shared,
    pod: &PodCtx,
    peer: SocketAddr,
    client_id: &str,
    target: SocketAddr,
) -> Stream {
    let state = shared.state.borrow();
    // The stream comes from the client pod's own address; trust that only if the identity agrees.
    let source = state
        .workloads
        .get(&peer.ip())
        .filter(|w| w.identity.as_deref() == Some(client_id));
    let gateway = state.gateway_route(target);
    let l7 = l7_gateway(&state, target);
    let service = destination_service(&state, gateway.as_ref(), target);
    Stream {
        http: gateway.is_none() && state.http_ports.contains(&target),
        labels: labels(
            "destination",
            source.map(|w| &**w),
            Some(client_id),
            pod.workload(&state).as_deref(),
            service.as_deref(),
            true,
        ),
        gateway,
        l7,
        caller: Caller {
            identity: Some(client_id.to_owned()),
            ip: peer.ip(),
            from_node: false,
        },
    }
}

/// An HTTP/2 request sent straight on the HBONE connection (`hbone::DIRECT`), for one of the
/// pod's HTTP ports; served as a request inside a tunnel to that port would be.
async fn direct_request(
    req: Request<http::Body>,
    peer: SocketAddr,
    client_id: &str,
    pod: &Arc<PodCtx>,
    shared: &Arc<Shared>,
    direct: &http_inbound::Direct,
) -> Response<http::Body> {
    let refuse = |code: StatusCode| {
        let mut resp = http::error(code, "not a direct HBONE request for this pod\n");
        resp.headers_mut()
            .insert(&hbone::DIRECT, hyper::header::HeaderValue::from_static("0"));
        resp
    };
    let target = req
        .headers()
        .get(&hbone::DIRECT)
        .and_then(|v| v.to_str().ok())
        .ok_or(Refused::NotConnect)
        .and_then(|t| target_of(t, &pod.ips));
    let target = match target {
        Ok(t) => t,
        Err(refused) => return refuse(refused.status()),
    };
    let start = || {
        let Stream {
            http,
            l7,
            labels,
            caller,
            ..
        } = stream(shared, pod, peer, client_id, target);
        if !http || l7.is_some() {
            // Served otherwise now (a config change): the client tunnels from now on.
            return Err(Box::new(refuse(StatusCode::MISDIRECTED_REQUEST)));
        }
        let admission = shared.limits.admit(&pod.budget).map_err(|limit| {
            if let Some(suppressed) = shared.fail(limit) {
                warn!(pod = %pod.name, client_identity = client_id, %target, suppressed, reason = ?limit, "HBONE request refused: limit reached");
            }
            Box::new(http::error(
                StatusCode::SERVICE_UNAVAILABLE,
                "connection limit reached\n",
            ))
        })?;
        info!(direction = "inbound", pod = %pod.name, client = %peer, client_identity = client_id, orig_dst = %target, "HBONE requests without a tunnel");
        Ok(http_inbound::DirectStart {
            caller,
            labels,
            admission,
        })
    };
    direct.serve(req, pod, target, peer, shared, start).await
}

/// One CONNECT stream: open the app connection, answer 200, then splice (or serve HTTP) until
/// it ends.
async fn tunnel(
    req: Request<RecvStream>,
    respond: SendResponse<Bytes>,
    peer: SocketAddr,
    client_id: &str,
    pod: Arc<PodCtx>,
    shared: Arc<Shared>,
) {
    // Boxed, and freed once decided: this task lives as long as the stream, and deciding
    // (connecting to the app, or a gateway's destination) needs more room than serving.
    let opening = Box::pin(open_tunnel(req, respond, peer, client_id, &pod, &shared));
    let Some(opened) = opening.await else { return };
    let Opened {
        client,
        app,
        http,
        target,
        caller,
        labels,
        admission,
    } = opened;
    match app {
        None => {
            Box::pin(gateway::serve(
                client,
                target,
                caller,
                pod.clone(),
                shared.clone(),
                &labels,
            ))
            .await;
            shared.metrics.closed(&labels);
        }
        Some(Upstream::App(app)) if http => {
            serve_http(
                client,
                app,
                pod.clone(),
                target,
                peer,
                caller,
                &labels,
                &shared,
            )
            .await
        }
        Some(app) => {
            let log = ConnLog::start(&shared, "inbound", peer, target);
            match app {
                Upstream::App(app) => {
                    spliced(client, app, labels, &pod, &shared, caller, target, log).await
                }
                Upstream::Out(out) => {
                    spliced(client, out, labels, &pod, &shared, caller, target, log).await
                }
            }
        }
    }
    drop(admission);
}

/// A CONNECT stream answered 200, and what serving it needs.
struct Opened {
    client: Metered<hbone::Stream>,
    /// None for a gateway's L7 port, which `gateway::serve` connects onward itself.
    app: Option<Upstream>,
    /// An HTTP port of the pod's own: served at L7.
    http: bool,
    target: SocketAddr,
    caller: Caller,
    labels: Box<crate::metrics::TcpLabels>,
    admission: Admission,
}

/// Decides a CONNECT stream: refused with a status, or connected onward and answered 200.
async fn open_tunnel(
    req: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
    peer: SocketAddr,
    client_id: &str,
    pod: &Arc<PodCtx>,
    shared: &Arc<Shared>,
) -> Option<Opened> {
    let mut refuse = |code: StatusCode| {
        if let Err(e) = respond.send_response(status(code), true) {
            debug!(client = %peer, "answering an HBONE CONNECT: {e}");
        }
        None
    };
    let target = match connect_target(req.method(), req.uri(), &pod.ips) {
        Ok(t) => t,
        Err(refused) => {
            match refused {
                Refused::NotThisPod(target) => {
                    warn!(pod = %pod.name, client_identity = client_id, %target, "HBONE CONNECT to an address that is not this pod's; refused")
                }
                Refused::ProxyPort(target) => {
                    if let Some(suppressed) = shared.fail(Failure::proxy_port) {
                        warn!(pod = %pod.name, client_identity = client_id, %target, suppressed, "HBONE CONNECT to the proxy's own port refused");
                    }
                }
                Refused::NotConnect | Refused::BadAuthority => {}
            }
            return refuse(refused.status());
        }
    };
    let admission = match shared.limits.admit(&pod.budget) {
        Ok(a) => a,
        Err(limit) => {
            if let Some(suppressed) = shared.fail(limit) {
                warn!(pod = %pod.name, client_identity = client_id, %target, suppressed, reason = ?limit, "HBONE stream refused: limit reached");
            }
            return refuse(StatusCode::SERVICE_UNAVAILABLE);
        }
    };
    let Stream {
        http,
        gateway,
        l7,
        labels,
        caller,
    } = stream(shared, pod, peer, client_id, target);
    if !http
        && l7 != Some(GatewayMode::Http)
        && let Err(policy) = authorize::connection(shared, pod, &caller, target.port(), &labels)
    {
        debug!(pod = %pod.name, client_identity = client_id, %target, policy, "HBONE stream refused");
        return refuse(StatusCode::FORBIDDEN);
    }
    let app = if l7.is_some() {
        info!(direction = "inbound", pod = %pod.name, client = %peer, client_identity = client_id, orig_dst = %target, "HBONE stream to a gateway port");
        None
    } else {
        // The pod's app, or (a gateway port) the gateway route's destination outside the mesh.
        let app = match gateway {
            None => {
                info!(direction = "inbound", pod = %pod.name, client = %peer, client_identity = client_id, orig_dst = %target, "HBONE stream");
                to_app(pod, target).await.map(Upstream::App)
            }
            Some(route) => {
                info!(direction = "inbound", pod = %pod.name, client = %peer, client_identity = client_id, orig_dst = %target, destination = route.service(), "HBONE stream to a gateway port");
                super::outbound::from_gateway(pod, shared, route)
                    .await
                    .map(Upstream::Out)
            }
        };
        match app {
            Ok(app) => Some(app),
            Err(e) => {
                warn!(pod = %pod.name, %target, "connecting to the app (or the gateway's destination): {e}");
                return refuse(StatusCode::SERVICE_UNAVAILABLE);
            }
        }
    };
    let mut ok = status(StatusCode::OK);
    if http {
        // Its next HTTP/2 requests may come without a tunnel (`hbone::DIRECT`).
        ok.headers_mut()
            .insert(&hbone::DIRECT, hyper::header::HeaderValue::from_static("1"));
    }
    let send = match respond.send_response(ok, false) {
        Ok(send) => send,
        Err(e) => {
            warn!(pod = %pod.name, %target, "HBONE stream did not open: {e}");
            return None;
        }
    };
    let client = Metered::new(
        hbone::Stream::new(Tunnel::new(send, req.into_body())),
        shared.metrics.opened(&labels),
    );
    Some(Opened {
        client,
        app,
        http,
        target,
        caller,
        // Boxed: the stream's task keeps its labels only while it needs them (see `spliced`).
        labels: Box::new(labels),
        admission,
    })
}

/// Serves an accepted stream (`client`, already counted) to the pod's HTTP port `target` at
/// L7 until it closes, forwarding to `app`; each request decided by the pod's policies.
#[allow(clippy::too_many_arguments)] // one stream's whole context, each piece distinct
pub(super) async fn serve_http<C>(
    client: C,
    app: TcpStream,
    pod: Arc<PodCtx>,
    target: SocketAddr,
    peer: SocketAddr,
    caller: Caller,
    labels: &crate::metrics::TcpLabels,
    shared: &Arc<Shared>,
) where
    C: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // The peer is a proxy (another node's, or this agent's own L7 client), which closes idle
    // keep-alive connections itself at `header_read_timeout`: waiting twice that here means
    // this side never closes one the peer is about to reuse.
    let limits = HttpLimits {
        header_read_timeout: shared.http.header_read_timeout * 2,
        ..shared.http
    };
    // Boxed: the stream's task is only as large as a splice needs.
    Box::pin(http_inbound::serve(
        client,
        Some(app),
        pod,
        target,
        peer,
        caller,
        labels,
        shared,
        &limits,
    ))
    .await;
    shared.metrics.closed(labels);
}

/// Where an HBONE stream goes once accepted.
enum Upstream {
    /// The pod's app.
    App(TcpStream),
    /// Out of the mesh, for a gateway pod's server port.
    Out(Box<dyn super::Io>),
}

fn status(code: StatusCode) -> Response<()> {
    let mut resp = Response::new(());
    *resp.status_mut() = code;
    resp
}

/// What the destination side reports as `destination_service`: the gateway route's service on
/// a gateway's port, else the Service that selects the pod on this port.
fn destination_service(
    state: &MeshState,
    gateway: Option<&Route>,
    target: SocketAddr,
) -> Option<String> {
    match gateway {
        Some(route) => Some(route.service().to_owned()),
        None => state.served.get(&target).map(|s| s.host()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_goes_only_to_the_pods_own_addresses_and_app_ports() {
        let pod: Vec<IpAddr> = vec![
            "10.244.1.2".parse().unwrap(),
            "fd00:244:1::2".parse().unwrap(),
        ];
        let go = |method: &Method, uri: &str| {
            connect_target(method, &uri.parse().unwrap(), &pod).map_err(Refused::status)
        };
        assert_eq!(
            go(&Method::CONNECT, "10.244.1.2:8080"),
            Ok("10.244.1.2:8080".parse().unwrap())
        );
        assert_eq!(
            go(&Method::CONNECT, "[fd00:244:1::2]:80"),
            Ok("[fd00:244:1::2]:80".parse().unwrap())
        );
        assert_eq!(
            go(&Method::GET, "10.244.1.2:8080"),
            Err(StatusCode::METHOD_NOT_ALLOWED)
        );
        assert_eq!(
            go(&Method::CONNECT, "pod.shop:8080"),
            Err(StatusCode::BAD_REQUEST)
        );
        assert_eq!(
            go(&Method::CONNECT, "10.244.1.3:8080"),
            Err(StatusCode::FORBIDDEN)
        );
        // The IPv4-mapped form is another address, not a way around the check.
        assert_eq!(
            go(&Method::CONNECT, "[::ffff:10.244.1.2]:8080"),
            Err(StatusCode::FORBIDDEN)
        );
        for port in trellis_common::PROXY_PORTS {
            assert_eq!(
                go(&Method::CONNECT, &format!("10.244.1.2:{port}")),
                Err(StatusCode::FORBIDDEN)
            );
        }
    }

    #[tokio::test]
    async fn the_source_port_is_chosen_at_connect_not_at_bind() {
        for ip in ["127.0.0.1", "::1"] {
            let ip: IpAddr = ip.parse().unwrap();
            let listener = tokio::net::TcpListener::bind((ip, 0)).await.unwrap();
            let sock = if ip.is_ipv4() {
                tokio::net::TcpSocket::new_v4()
            } else {
                tokio::net::TcpSocket::new_v6()
            }
            .unwrap();
            bind_address_no_port(&sock).unwrap();
            sock.bind(SocketAddr::new(ip, 0)).unwrap();
            assert_eq!(sock.local_addr().unwrap().port(), 0, "{ip}: bound a port");
            let stream = connect(sock, listener.local_addr().unwrap()).await.unwrap();
            let local = stream.local_addr().unwrap();
            assert_eq!(local.ip(), ip);
            assert_ne!(local.port(), 0);
            let (_, peer) = listener.accept().await.unwrap();
            assert_eq!(peer, local);
        }
    }
}

//! The node proxy. Each enrolled pod gets, inside its own netns, 127.0.0.1:15001 and [::1]:15001
//! (outbound capture), [::]:15006 (inbound plaintext capture) and, once it has an identity,
//! [::]:15008 (inbound HBONE), and UDP 127.0.0.1:15053 and [::1]:15053 (DNS). One agent process
//! serves every pod on the node.
mod authorize;
mod balance;
mod conn_log;
mod copy;
mod exchange;
mod gateway;
mod guard;
mod h2_stream;
mod hbone;
mod http;
mod http_inbound;
mod http_outbound;
mod inbound;
mod layers;
mod local;
mod originate;
mod outbound;
mod pool;
mod read_ahead;
mod terminate;
mod trace;
mod workers;

use std::{
    future::Future,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use anyhow::{Context as _, Result};
use socket2::{Domain, Socket, Type};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpSocket, TcpStream},
    sync::{Semaphore, watch},
    task::JoinHandle,
};
use tracing::{error, warn};
use trellis_common::{
    DNS_CAPTURE_PORT, HBONE_PORT, INBOUND_PORT, OUTBOUND_PORT, POD_DNS4, POD_DNS6, PROXY_PORTS,
};

pub use guard::{ConnLimits, Failure, HttpLimits, LogThrottle, open_file_budget};
pub use inbound::{Refused, connect_target};
pub use local::LocalPods;
pub use originate::TlsOrigination;
pub use pool::Pool;
pub use terminate::{ServerTls, best as best_host};
pub use workers::Workers;

use crate::{
    dns,
    metrics::{ByteCounters, Label, Metrics, TcpLabels},
    netns::Netns,
    redirect::ProxyMaps,
    state::{MeshState, Workload},
    tls::TlsStore,
};

/// How long an onward connect (or a TLS handshake) may take before the connection is given up.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// What every connection handler shares; one per agent.
pub struct Shared {
    pub maps: ProxyMaps,
    pub state: watch::Receiver<Arc<MeshState>>,
    pub tls: TlsStore,
    pub pool: Pool,
    /// This node's pods that serve HBONE: streams between two of them stay in the agent.
    pub local: LocalPods,
    pub balancer: balance::Balancer,
    pub metrics: Arc<Metrics>,
    /// The node's own network namespace (its cookie): plaintext that a socket there opened
    /// (kubelet's health probes) reaches pods even under STRICT, as in Istio.
    pub node_netns: u64,
    pub limits: ConnLimits,
    pub http: HttpLimits,
    pub throttle: LogThrottle,
    /// Where ServiceEntry hosts are resolved for a pod that has asked no resolver itself.
    pub dns_upstream: Option<SocketAddr>,
    /// Access log, taps and trace export.
    pub observe: crate::access::Observe,
    /// The threads connections are served on.
    pub workers: Workers,
}

impl Shared {
    /// Counts a failure; Some(suppressed) when it should also be logged (with how many like it
    /// went unlogged since the last).
    pub fn fail(&self, kind: Failure) -> Option<u64> {
        self.metrics.failure(kind);
        self.throttle.allow(kind)
    }
}

/// Whether a destination port is one of the proxy's own listeners: never proxied to, since the
/// proxy would connect to itself.
fn proxy_port(port: u16) -> bool {
    PROXY_PORTS.contains(&port)
}

/// What connection handlers need to know about their pod.
pub struct PodCtx {
    pub uid: String,
    /// `namespace/name`, for logs.
    pub name: String,
    /// The pod's namespace: a Service's short DNS name is looked up in it.
    pub namespace: String,
    pub ips: Vec<IpAddr>,
    /// The pod's SPIFFE ID; None for pods that are captured but have no identity (pods file).
    pub identity: Option<String>,
    pub netns: Netns,
    pub netns_cookie: u64,
    pub home: Arc<Netns>,
    /// The pod's connection budget (`--max-connections-per-pod`).
    pub budget: Arc<Semaphore>,
}

impl PodCtx {
    /// A socket in the pod's netns, so the pod's own address is the source on the wire.
    pub(crate) fn socket_for(&self, dst: SocketAddr) -> io::Result<TcpSocket> {
        self.netns.run_in(&self.home, || {
            if dst.is_ipv4() {
                TcpSocket::new_v4()
            } else {
                TcpSocket::new_v6()
            }
        })?
    }

    /// This pod as metrics name it, from the mesh state.
    fn workload(&self, state: &MeshState) -> Option<Arc<Workload>> {
        self.ips
            .iter()
            .find_map(|ip| state.workloads.get(ip).cloned())
    }
}

pub struct PodListeners {
    outbound: Vec<std::net::TcpListener>,
    pub inbound: std::net::TcpListener,
    hbone: Option<std::net::TcpListener>,
    /// UDP DNS on 127.0.0.1:15053 and, where the pod has IPv6, [::1]:15053.
    dns: Vec<std::net::UdpSocket>,
}

impl PodListeners {
    /// Binds the capture listeners (and, for a pod with an identity, HBONE's) in the pod's netns.
    pub fn bind(netns: &Netns, home: &Netns, with_hbone: bool) -> Result<Self> {
        netns.run_in(home, || -> Result<Self> {
            let mut outbound = vec![listen(
                SocketAddr::from((Ipv4Addr::LOCALHOST, OUTBOUND_PORT)),
                true,
            )?];
            // A pod without IPv6 has no ::1; its IPv6 connects then fail as they would anyway.
            match listen(SocketAddr::from((Ipv6Addr::LOCALHOST, OUTBOUND_PORT)), true) {
                Ok(l) => outbound.push(l),
                Err(e) => warn!("no IPv6 outbound capture listener in this pod: {e:#}"),
            }
            let inbound = listen_any(INBOUND_PORT)?;
            let hbone = with_hbone.then(|| listen_any(HBONE_PORT)).transpose()?;
            let mut dns = Vec::new();
            for ip in [
                IpAddr::from(Ipv4Addr::LOCALHOST),
                IpAddr::from(Ipv6Addr::LOCALHOST),
            ] {
                // Without it the pod's DNS for that family is simply not steered (see dns_flags).
                match udp(SocketAddr::new(ip, DNS_CAPTURE_PORT)) {
                    Ok(s) => dns.push(s),
                    Err(e) => warn!("no DNS listener on {ip} in this pod: {e:#}"),
                }
            }
            Ok(Self {
                outbound,
                inbound,
                hbone,
                dns,
            })
        })?
    }

    /// `POD_DNS4`/`POD_DNS6` for the DNS listeners bound: the kernel steers only to those.
    pub fn dns_flags(&self) -> u32 {
        self.dns
            .iter()
            .filter_map(|s| s.local_addr().ok())
            .map(|a| if a.is_ipv4() { POD_DNS4 } else { POD_DNS6 })
            .fold(0, |f, b| f | b)
    }
}

fn udp(addr: SocketAddr) -> Result<std::net::UdpSocket> {
    Ok(bind(addr, Type::DGRAM, true)?.into())
}

/// A non-blocking socket of type `ty` bound to `addr` (IPv6 only, or dual-stack).
fn bind(addr: SocketAddr, ty: Type, v6_only: bool) -> Result<Socket> {
    let sock = Socket::new(Domain::for_address(addr), ty.nonblocking().cloexec(), None)?;
    if addr.is_ipv6() {
        sock.set_only_v6(v6_only)?;
    }
    // A listener rebinds over connections of an earlier agent left in TIME_WAIT; a UDP socket
    // must not let another share its port.
    if ty == Type::STREAM {
        sock.set_reuse_address(true)?;
    }
    sock.bind(&addr.into())
        .with_context(|| format!("binding {addr} in the pod's network namespace"))?;
    Ok(sock)
}

/// Dual-stack where the pod has IPv6, so one socket serves both of its addresses.
fn listen_any(port: u16) -> Result<std::net::TcpListener> {
    listen(SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)), false)
        .or_else(|_| listen(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)), true))
}

fn listen(addr: SocketAddr, v6_only: bool) -> Result<std::net::TcpListener> {
    let sock = bind(addr, Type::STREAM, v6_only)?;
    sock.listen(1024)?;
    Ok(sock.into())
}

/// The pod's accept loops; dropping it stops accepting (connections in flight finish).
pub struct PodProxy {
    tasks: Vec<JoinHandle<()>>,
    /// Where the pod is listed in `Shared::local`, while it serves HBONE.
    local: Option<(Arc<Shared>, Arc<PodCtx>)>,
}

impl Drop for PodProxy {
    fn drop(&mut self) {
        if let Some((shared, pod)) = &self.local {
            shared.local.remove(pod);
        }
        for t in &self.tasks {
            t.abort();
        }
    }
}

pub fn spawn(pod: Arc<PodCtx>, listeners: PodListeners, shared: Arc<Shared>) -> Result<PodProxy> {
    let mut tasks = Vec::new();
    for l in listeners.outbound {
        tasks.push(accept_loop(l, &pod, &shared, outbound::handle)?);
    }
    tasks.push(accept_loop(
        listeners.inbound,
        &pod,
        &shared,
        inbound::plaintext,
    )?);
    let serves_hbone = listeners.hbone.is_some();
    if let Some(l) = listeners.hbone {
        tasks.push(accept_loop(l, &pod, &shared, inbound::hbone)?);
    }
    for s in listeners.dns {
        let (pod, shared2) = (pod.clone(), shared.clone());
        tasks.push(shared.workers.spawn(async move {
            match tokio::net::UdpSocket::from_std(s) {
                Ok(sock) => dns::serve_udp(sock, pod, shared2).await,
                Err(e) => error!(pod = %pod.name, "cannot serve DNS: {e}"),
            }
        }));
    }
    // Listed last, so a pod whose proxy failed to start is never listed.
    let local = serves_hbone.then(|| {
        shared.local.add(&pod);
        (shared.clone(), pod.clone())
    });
    Ok(PodProxy { tasks, local })
}

/// Accepts connections within the pod's and the node's limits (past them: reset at once) and
/// hands each to a worker to handle in its own task, which holds its place under the limits
/// until it ends.
fn accept_loop<F, Fut>(
    listener: std::net::TcpListener,
    pod: &Arc<PodCtx>,
    shared: &Arc<Shared>,
    handle: F,
) -> Result<JoinHandle<()>>
where
    F: Fn(TcpStream, SocketAddr, Arc<PodCtx>, Arc<Shared>) -> Fut + Send + Copy + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let (pod, shared2) = (pod.clone(), shared.clone());
    Ok(shared.workers.spawn(async move {
        let shared = shared2;
        // Registered here, with the reactor of the worker that accepts.
        let listener = match TcpListener::from_std(listener) {
            Ok(l) => l,
            Err(e) => return error!(pod = %pod.name, "cannot accept connections: {e}"),
        };
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok((stream, peer)) => (stream, canonical(peer)),
                Err(e) => {
                    // Typically EMFILE: back off rather than spin.
                    if let Some(suppressed) = shared.fail(Failure::accept) {
                        warn!(pod = %pod.name, suppressed, "accept failed: {e}; backing off");
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            match shared.limits.admit(&pod.budget) {
                Ok(admission) => {
                    let (pod, shared2) = (pod.clone(), shared.clone());
                    shared.workers.serve(stream, move |stream| async move {
                        handle(stream, peer, pod, shared2).await;
                        drop(admission);
                    });
                }
                Err(limit) => {
                    reset(&stream);
                    if let Some(suppressed) = shared.fail(limit) {
                        warn!(pod = %pod.name, client = %peer, suppressed, reason = ?limit, "connection refused: limit reached");
                    }
                }
            }
        }
    }))
}

/// Makes dropping `stream` send a reset, so the client sees a refusal, not an empty reply.
fn reset(stream: &TcpStream) {
    let _ = socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO));
}

/// Dual-stack listeners see IPv4 peers as IPv4-mapped IPv6: show them as IPv4.
fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

pub(crate) async fn connect(sock: TcpSocket, dst: SocketAddr) -> io::Result<TcpStream> {
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, sock.connect(dst))
        .await
        .map_err(|_| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!("connecting to {dst} timed out"),
            )
        })??;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// A byte stream the proxy splices: a TCP connection, or TLS over one.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}

impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Copies both ways until both sides close; returns (bytes from `a`, bytes from `b`).
async fn splice<A, B>(a: &mut A, b: &mut B) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    copy::bidirectional(a, b).await
}

/// Istio's cluster name for a cluster that sets none (one cluster: no multi-cluster mesh).
const CLUSTER: &str = "Kubernetes";

/// Labels for one side of a connection, filled from what the mesh state knows.
fn labels(
    reporter: &'static str,
    source: Option<&Workload>,
    source_principal: Option<&str>,
    destination: Option<&Workload>,
    service: Option<&str>,
    mtls: bool,
) -> TcpLabels {
    let unknown = Label::unknown;
    let of =
        |w: Option<&Workload>, f: fn(&Workload) -> &Label| w.map_or_else(unknown, |w| f(w).clone());
    let (service_name, service_namespace) = service.map_or(("unknown", "unknown"), service_parts);
    TcpLabels {
        reporter,
        source_workload: of(source, |w| &w.name),
        source_workload_namespace: of(source, |w| &w.namespace),
        source_principal: source_principal.map_or_else(unknown, Label::from),
        source_app: of(source, |w| &w.app),
        source_version: of(source, |w| &w.version),
        source_canonical_service: of(source, |w| &w.canonical_service),
        source_canonical_revision: of(source, |w| &w.canonical_revision),
        source_cluster: if source.is_some() { CLUSTER } else { "unknown" },
        destination_workload: of(destination, |w| &w.name),
        destination_workload_namespace: of(destination, |w| &w.namespace),
        destination_principal: destination
            .and_then(|w| w.identity.as_deref())
            .map_or_else(unknown, Label::from),
        destination_app: of(destination, |w| &w.app),
        destination_version: of(destination, |w| &w.version),
        destination_canonical_service: of(destination, |w| &w.canonical_service),
        destination_canonical_revision: of(destination, |w| &w.canonical_revision),
        destination_cluster: if destination.is_some() {
            CLUSTER
        } else {
            "unknown"
        },
        destination_service: service.map_or_else(unknown, Label::from),
        destination_service_name: service_name.into(),
        destination_service_namespace: service_namespace.into(),
        request_protocol: "tcp",
        connection_security_policy: if mtls { "mutual_tls" } else { "none" },
        response_flags: "-",
    }
}

/// A Service's host name as Istio's `destination_service_name` and `_namespace`:
/// `<name>.<namespace>.svc.<domain>`; any other host (a ServiceEntry's) is its own name, in no
/// namespace the host tells.
fn service_parts(host: &str) -> (&str, &str) {
    let mut parts = host.splitn(4, '.');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(name), Some(ns), Some("svc"), Some(_)) => (name, ns),
        _ if host == "unknown" => ("unknown", "unknown"),
        _ => (host, "unknown"),
    }
}

/// The client side of a connection, counting its bytes into the connection's metrics as they
/// move: reads are bytes received from the client, writes bytes sent to it.
pub struct Metered<T> {
    inner: T,
    bytes: ByteCounters,
}

impl<T> Metered<T> {
    pub fn new(inner: T, bytes: ByteCounters) -> Self {
        Self { inner, bytes }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Metered<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        self.bytes
            .received
            .inc_by((buf.filled().len() - before) as u64);
        poll
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Metered<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = poll {
            self.bytes.sent.inc_by(n as u64);
        }
        poll
    }

    // Vectored, so HTTP/2 writes a frame's head and its payload in one system call, not two.
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = poll {
            self.bytes.sent.inc_by(n as u64);
        }
        poll
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::ops::Deref as _;

    use super::*;

    #[test]
    fn labels_carry_istio_canonical_names_and_the_service_parts() {
        let pod = |labels: &[(&str, &str)]| {
            let labels = labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            Workload::new("reviews-v2", "shop", Some("id".into()), "n2", &labels)
        };
        let from = pod(&[("app", "web")]);
        let to = pod(&[
            ("app", "reviews"),
            ("version", "v2"),
            ("service.istio.io/canonical-name", "reviews-api"),
        ]);
        let l = labels(
            "destination",
            Some(&from),
            None,
            Some(&to),
            Some("reviews.shop.svc.cluster.local"),
            true,
        );
        assert_eq!(
            (
                l.source_canonical_service.deref(),
                l.source_canonical_revision.deref(),
                l.source_cluster
            ),
            ("web", "latest", CLUSTER)
        );
        assert_eq!(
            (
                l.destination_canonical_service.deref(),
                l.destination_canonical_revision.deref(),
                l.destination_app.deref()
            ),
            ("reviews-api", "v2", "reviews")
        );
        assert_eq!(
            (
                l.destination_service_name.deref(),
                l.destination_service_namespace.deref()
            ),
            ("reviews", "shop")
        );
        let none = labels("source", None, None, None, Some("api.example.com"), false);
        assert_eq!(
            (
                none.destination_service_name.deref(),
                none.destination_service_namespace.deref(),
                none.destination_cluster,
                none.source_canonical_service.deref()
            ),
            ("api.example.com", "unknown", "unknown", "unknown")
        );
        assert_eq!(service_parts("unknown"), ("unknown", "unknown"));
    }
}

//! The pod-side sockets and, for now, a byte splice: each enrolled pod gets 127.0.0.1:15001 and
//! [::1]:15001 (outbound capture) and [::]:15006 (inbound capture) inside its own netns. The mesh
//! proxy (HBONE, routing) replaces the splice in a later step.
use std::{
    io,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use anyhow::{Context as _, Result};
use socket2::{Domain, Socket, Type};
use tokio::{
    net::{TcpListener, TcpSocket, TcpStream},
    task::JoinHandle,
};
use tracing::{debug, info, warn};
use trellis_common::{INBOUND_PORT, OUTBOUND_PORT};

use crate::{netns::Netns, redirect::OrigDstTable};

/// How long an onward connect may take before the captured connection is given up.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// What connection handlers need to know about their pod.
pub struct PodCtx {
    /// `namespace/name`, for logs.
    pub name: String,
    pub netns: Netns,
    pub netns_cookie: u64,
    pub home: Arc<Netns>,
}

impl PodCtx {
    /// A socket in the pod's netns, so the pod's own address is the source on the wire.
    fn socket_for(&self, dst: SocketAddr) -> io::Result<TcpSocket> {
        self.netns.run_in(&self.home, || {
            if dst.is_ipv4() {
                TcpSocket::new_v4()
            } else {
                TcpSocket::new_v6()
            }
        })?
    }
}

pub struct PodListeners {
    outbound: Vec<std::net::TcpListener>,
    pub inbound: std::net::TcpListener,
}

impl PodListeners {
    /// Binds the capture listeners inside the pod's netns.
    pub fn bind(netns: &Netns, home: &Netns) -> Result<Self> {
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
            // Dual-stack, so one socket serves the pod's IPv4 and IPv6 addresses.
            let inbound = listen(
                SocketAddr::from((Ipv6Addr::UNSPECIFIED, INBOUND_PORT)),
                false,
            )
            .or_else(|_| {
                listen(
                    SocketAddr::from((Ipv4Addr::UNSPECIFIED, INBOUND_PORT)),
                    true,
                )
            })?;
            Ok(Self { outbound, inbound })
        })?
    }
}

fn listen(addr: SocketAddr, v6_only: bool) -> Result<std::net::TcpListener> {
    let sock = Socket::new(
        Domain::for_address(addr),
        Type::STREAM.nonblocking().cloexec(),
        None,
    )?;
    if addr.is_ipv6() {
        sock.set_only_v6(v6_only)?;
    }
    sock.set_reuse_address(true)?;
    sock.bind(&addr.into())
        .with_context(|| format!("binding {addr} in the pod's network namespace"))?;
    sock.listen(1024)?;
    Ok(sock.into())
}

/// The pod's accept loops; dropping it stops accepting (connections in flight finish).
pub struct PodProxy {
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for PodProxy {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

pub fn spawn(
    pod: Arc<PodCtx>,
    listeners: PodListeners,
    table: Arc<OrigDstTable>,
) -> Result<PodProxy> {
    let mut tasks = Vec::new();
    for l in listeners.outbound {
        let listener = TcpListener::from_std(l)?;
        let (pod, table) = (pod.clone(), table.clone());
        tasks.push(tokio::spawn(accept_loop(listener, move |s, peer| {
            tokio::spawn(outbound(s, peer, pod.clone(), table.clone()));
        })));
    }
    let listener = TcpListener::from_std(listeners.inbound)?;
    tasks.push(tokio::spawn(accept_loop(listener, move |s, peer| {
        tokio::spawn(inbound(s, peer, pod.clone()));
    })));
    Ok(PodProxy { tasks })
}

async fn accept_loop(listener: TcpListener, mut handle: impl FnMut(TcpStream, SocketAddr)) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => handle(stream, peer),
            Err(e) => {
                // Typically EMFILE: back off rather than spin.
                warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn outbound(client: TcpStream, peer: SocketAddr, pod: Arc<PodCtx>, table: Arc<OrigDstTable>) {
    let Some(dst) = table.take(pod.netns_cookie, peer) else {
        warn!(pod = %pod.name, client = %peer, "no original destination recorded for a connection to the capture port; closing it");
        return;
    };
    info!(direction = "outbound", pod = %pod.name, client = %peer, orig_dst = %dst, "connection captured");
    let result = async { splice(client, connect(pod.socket_for(dst)?, dst).await?).await }.await;
    report(&pod, "outbound", dst, result);
}

async fn inbound(client: TcpStream, peer: SocketAddr, pod: Arc<PodCtx>) {
    // The listener is dual-stack: show IPv4 peers as IPv4.
    let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
    let dst = match client.local_addr() {
        Ok(a) => SocketAddr::new(a.ip().to_canonical(), a.port()),
        Err(e) => return warn!(pod = %pod.name, "inbound connection without a local address: {e}"),
    };
    info!(direction = "inbound", pod = %pod.name, client = %peer, orig_dst = %dst, "connection captured");
    let result = async {
        let sock = pod.socket_for(dst)?;
        // From the pod's own address: sk_lookup never steers a pod's connections to itself.
        sock.bind(SocketAddr::new(dst.ip(), 0))?;
        splice(client, connect(sock, dst).await?).await
    }
    .await;
    report(&pod, "inbound", dst, result);
}

async fn connect(sock: TcpSocket, dst: SocketAddr) -> io::Result<TcpStream> {
    tokio::time::timeout(CONNECT_TIMEOUT, sock.connect(dst))
        .await
        .map_err(|_| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!("connecting to {dst} timed out"),
            )
        })?
}

async fn splice(mut a: TcpStream, mut b: TcpStream) -> io::Result<(u64, u64)> {
    a.set_nodelay(true)?;
    b.set_nodelay(true)?;
    tokio::io::copy_bidirectional(&mut a, &mut b).await
}

fn report(pod: &PodCtx, direction: &str, dst: SocketAddr, result: io::Result<(u64, u64)>) {
    match result {
        Ok((sent, received)) => {
            debug!(direction, pod = %pod.name, orig_dst = %dst, sent, received, "connection closed")
        }
        Err(e) => warn!(direction, pod = %pod.name, orig_dst = %dst, "connection failed: {e}"),
    }
}

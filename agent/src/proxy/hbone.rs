//! HBONE: a TCP connection carried as an HTTP/2 CONNECT stream over mutual TLS 1.3 to the
//! destination pod's port 15008. Client side here; the server is in `inbound`.
use std::{
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use h2::{Ping, PingPong, client::SendRequest};
use http_body_util::BodyExt as _;
use hyper::{
    Method, Request, Response, StatusCode,
    body::{Body as _, Bytes},
    header::HeaderName,
};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, ReadBuf};
use tokio_rustls::TlsConnector;
use tracing::debug;

use super::{
    CONNECT_TIMEOUT, PodCtx, Shared, connect,
    h2_stream::{RecvBody, Tunnel, h2_head, send_body},
    http::Body,
    pool,
    read_ahead::ReadAhead,
};
use crate::tls::{self, WorkloadTls};

/// HTTP/2 flow-control windows: big enough that one stream fills a fast link.
pub const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
pub const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
pub const MAX_FRAME: u32 = 1024 * 1024;
/// Trellis's own addition to HBONE, between two of its agents: an HTTP/2 request sent straight
/// on the pooled connection, with the target pod's `ip:port` in this header, instead of inside
/// a CONNECT tunnel carrying a second HTTP/2 connection. One codec per hop instead of two. A
/// server agent offers it by answering a CONNECT for an HTTP port with this header set to `1`;
/// a peer that never does (another HBONE implementation) only ever sees CONNECT.
pub static DIRECT: HeaderName = HeaderName::from_static("trellis-direct");
/// Pings on pooled connections, so a peer that vanished is noticed: one every `KEEPALIVE`,
/// and the connection is closed when one goes unanswered for `KEEPALIVE_TIMEOUT`.
const KEEPALIVE: Duration = Duration::from_secs(30);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// Opens a tunnel from `pod`, with its current certificate, to `target` through `hbone`, whose
/// server must prove `identity`.
pub async fn open(
    shared: &Shared,
    pod: &PodCtx,
    hbone: SocketAddr,
    target: SocketAddr,
    identity: &str,
) -> Result<Stream> {
    let Some(tls) = pod.identity.as_deref().and_then(|id| shared.tls.get(id)) else {
        bail!("no certificate for this pod yet; a mesh endpoint cannot be reached without one");
    };
    let (pool, tls) = (&shared.pool, &*tls);
    let key = key(pod, hbone, identity);
    // A pooled connection may have died since its last use (its peer's agent restarted, say):
    // then it reports closed, and the second try makes a fresh one.
    let mut last = None;
    for _ in 0..2 {
        let sender = pool
            .get(&key, tls.svid.received, || {
                handshake(pod, tls, hbone, identity)
            })
            .await?;
        let head = Request::builder()
            .method(Method::CONNECT)
            .uri(target.to_string())
            .body(())?;
        let sent = async {
            let (resp, send) = sender.open(head, false).await?;
            Ok::<_, h2::Error>((resp.await?, send))
        };
        match sent.await {
            Ok((resp, send)) if resp.status() == StatusCode::OK => {
                if resp.headers().get(&DIRECT).is_some_and(|v| v == "1") {
                    pool.set_direct(&key, target, true).await;
                }
                return Ok(Stream::new(Tunnel::new(send, resp.into_body())));
            }
            Ok((resp, _)) => bail!("{hbone} answered CONNECT {target} with {}", resp.status()),
            Err(e) if sender.failed(&e) => last = Some(e),
            Err(e) => return Err(e).context(format!("CONNECT {target} via {hbone}")),
        }
    }
    Err(last.expect("set on retry")).context(format!("CONNECT {target} via {hbone}"))
}

/// One pooled HBONE connection's client side; clones share it.
#[derive(Clone)]
pub struct Sender {
    h2: SendRequest<Bytes>,
    /// Set when the connection has ended, or failed under a request.
    closed: Arc<AtomicBool>,
}

impl Sender {
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Whether `e` means the connection is gone; marks it so when the error says that.
    fn failed(&self, e: &h2::Error) -> bool {
        if e.is_io() || e.is_go_away() {
            self.closed.store(true, Ordering::Release);
        }
        self.is_closed()
    }

    /// Opens a stream with `head` (and no body if `end`): the answer to come, and the stream's
    /// sending side. A failure of the connection itself marks it closed, so the pool replaces it.
    async fn open(
        &self,
        head: Request<()>,
        end: bool,
    ) -> Result<(h2::client::ResponseFuture, h2::SendStream<Bytes>), h2::Error> {
        let opened = async { self.h2.clone().ready().await?.send_request(head, end) };
        opened.await.inspect_err(|e| {
            self.failed(e);
        })
    }

    /// Sends an HTTP/2 request on the connection (not in a tunnel: see `DIRECT`).
    pub async fn send(&self, req: Request<Body>) -> Result<Response<Body>, h2::Error> {
        let (mut head, body) = req.into_parts();
        h2_head(&mut head.headers, &body, None);
        let end = body.is_end_stream();
        let (resp, send) = self.open(Request::from_parts(head, ()), end).await?;
        if !end {
            tokio::spawn(send_body(body, send));
        }
        let (head, recv) = resp.await?.into_parts();
        let body = RecvBody::new(recv, &head.headers).boxed();
        Ok(Response::from_parts(head, body))
    }
}

/// The pooled connection from `pod` to `hbone` if the agent there takes HTTP/2 requests for
/// `target` directly (see `DIRECT`).
pub async fn direct(
    shared: &Shared,
    pod: &PodCtx,
    hbone: SocketAddr,
    target: SocketAddr,
    identity: &str,
) -> Option<Sender> {
    let tls = shared.tls.get(pod.identity.as_deref()?)?;
    let key = key(pod, hbone, identity);
    shared.pool.direct(&key, tls.svid.received, target).await
}

/// Stops sending requests for `target` directly: the agent at `hbone` no longer takes them.
pub async fn forget_direct(
    shared: &Shared,
    pod: &PodCtx,
    hbone: SocketAddr,
    target: SocketAddr,
    identity: &str,
) {
    let key = key(pod, hbone, identity);
    shared.pool.set_direct(&key, target, false).await;
}

fn key(pod: &PodCtx, hbone: SocketAddr, identity: &str) -> pool::Key {
    pool::Key {
        worker: super::workers::current(),
        source: pod.uid.clone(),
        hbone,
        identity: identity.to_owned(),
    }
}

/// A new mutual-TLS HTTP/2 connection from `pod`'s netns to `hbone`.
async fn handshake(
    pod: &PodCtx,
    tls: &WorkloadTls,
    hbone: SocketAddr,
    identity: &str,
) -> Result<Sender> {
    let tcp = connect(pod.socket_for(hbone)?, hbone)
        .await
        .with_context(|| format!("connecting to {hbone}"))?;
    let stream = tokio::time::timeout(
        CONNECT_TIMEOUT,
        TlsConnector::from(tls.client.clone()).connect(tls::server_name(), ReadAhead::new(tcp)),
    )
    .await
    .with_context(|| format!("TLS handshake with {hbone} timed out"))?
    .with_context(|| format!("TLS handshake with {hbone}"))?;
    let peer = tls::peer_identity(stream.get_ref().1.peer_certificates())?;
    if peer != identity {
        bail!("{hbone} presented {peer}, but control says it runs as {identity}; refusing it");
    }
    let (h2, conn) = h2::client::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .enable_push(false)
        .handshake::<_, Bytes>(stream)
        .await
        .with_context(|| format!("HTTP/2 handshake with {hbone}"))?;
    let closed = Arc::new(AtomicBool::new(false));
    tokio::spawn(drive(conn, hbone, closed.clone()));
    debug!(source = %pod.name, %hbone, peer, "new pooled HBONE connection");
    Ok(Sender { h2, closed })
}

/// Runs a pooled connection until it ends: its peer closes it, it fails, a keepalive ping goes
/// unanswered, or nobody holds it and its last stream is done.
async fn drive<T>(
    mut conn: h2::client::Connection<T, Bytes>,
    hbone: SocketAddr,
    closed: Arc<AtomicBool>,
) where
    T: AsyncRead + AsyncWrite + Unpin,
{
    let pings = conn.ping_pong();
    let ended = tokio::select! {
        ended = &mut conn => ended.map_err(|e| e.to_string()),
        silent = keepalive(pings) => Err(silent),
    };
    closed.store(true, Ordering::Release);
    if let Err(e) = ended {
        debug!(%hbone, "pooled HBONE connection ended: {e}");
    }
}

/// Pings the peer every `KEEPALIVE`; returns why it stopped answering.
async fn keepalive(pings: Option<PingPong>) -> String {
    let Some(mut pings) = pings else {
        return std::future::pending().await;
    };
    loop {
        tokio::time::sleep(KEEPALIVE).await;
        match tokio::time::timeout(KEEPALIVE_TIMEOUT, pings.ping(Ping::opaque())).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return format!("keepalive ping failed: {e}"),
            Err(_) => return format!("no answer to a keepalive ping in {KEEPALIVE_TIMEOUT:?}"),
        }
    }
}

/// How long, and for how many bytes, a stream dropped half-open waits for the peer to end its side.
const LINGER: Duration = Duration::from_secs(5);
const LINGER_BYTES: u64 = 1 << 20;

/// One HBONE stream as a byte stream, closing like TCP does. Dropped before the peer has ended
/// its side, it ends ours and reads out the peer's rest (bounded) in the background, instead of
/// leaving the HTTP/2 stream half-open, which resets it: a reset is an abort, and a peer that
/// receives one can lose an answer it has already been sent (hyper fails an HTTP/1 request whose
/// connection reports a write error before the response head was parsed).
pub struct Stream {
    io: Option<Tunnel>,
    /// The peer ended its side (read returned end of stream).
    peer_done: bool,
}

impl Stream {
    pub fn new(tunnel: Tunnel) -> Self {
        Self {
            io: Some(tunnel),
            peer_done: false,
        }
    }

    fn io(&mut self) -> Pin<&mut Tunnel> {
        Pin::new(self.io.as_mut().expect("taken only on drop"))
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = self.io().poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(())))
            && buf.filled().len() == before
            && buf.remaining() > 0
        {
            self.peer_done = true;
        }
        polled
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.io().poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.io().poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.io().poll_shutdown(cx)
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        let Some(mut io) = self.io.take() else { return };
        if self.peer_done {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        runtime.spawn(async move {
            let linger = async {
                io.shutdown().await?;
                tokio::io::copy(&mut (&mut io).take(LINGER_BYTES), &mut tokio::io::sink()).await
            };
            if let Ok(Err(e)) = tokio::time::timeout(LINGER, linger).await {
                debug!("HBONE stream ended with an error: {e}");
            }
        });
    }
}

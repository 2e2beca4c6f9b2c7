//! HBONE: a TCP connection carried as an HTTP/2 CONNECT stream over mutual TLS 1.3 to the
//! destination pod's port 15008. Client side here; the server is in `inbound`.
use std::{
    net::SocketAddr,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use http_body_util::{BodyExt as _, Empty};
use hyper::{Method, Request, StatusCode, Version, header::HeaderName, upgrade::Upgraded};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, ReadBuf};
use tokio_rustls::TlsConnector;
use tracing::debug;

pub use super::pool::Sender;
use super::{CONNECT_TIMEOUT, PodCtx, Shared, connect, pool, read_ahead::ReadAhead};
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
/// Pings on idle pooled connections, so a peer that vanished is noticed.
const KEEPALIVE: Duration = Duration::from_secs(30);

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
        let mut sender = pool
            .get(&key, tls.svid.received, || {
                handshake(pod, tls, hbone, identity)
            })
            .await?;
        let request = Request::builder()
            .method(Method::CONNECT)
            .version(Version::HTTP_2)
            .uri(target.to_string())
            .body(Empty::new().map_err(|never| match never {}).boxed())?;
        let sent = async {
            sender.ready().await?;
            sender.send_request(request).await
        };
        match sent.await {
            Ok(resp) if resp.status() == StatusCode::OK => {
                if resp.headers().get(&DIRECT).is_some_and(|v| v == "1") {
                    pool.set_direct(&key, target, true).await;
                }
                return hyper::upgrade::on(resp)
                    .await
                    .map(Stream::new)
                    .context("the HBONE stream did not open");
            }
            Ok(resp) => bail!("{hbone} answered CONNECT {target} with {}", resp.status()),
            Err(e) if sender.is_closed() => last = Some(e),
            Err(e) => return Err(e).context(format!("CONNECT {target} via {hbone}")),
        }
    }
    Err(last.expect("set on retry")).context(format!("CONNECT {target} via {hbone}"))
}

/// The pooled connection from `pod` to `hbone` if the agent there takes HTTP/2 requests for
/// `target` directly (see `DIRECT`).
pub async fn direct(
    shared: &Shared,
    pod: &PodCtx,
    hbone: SocketAddr,
    target: SocketAddr,
    identity: &str,
) -> Option<pool::Sender> {
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
) -> Result<pool::Sender> {
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
    let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .keep_alive_interval(KEEPALIVE)
        .timer(hyper_util::rt::TokioTimer::new())
        .handshake(TokioIo::new(stream))
        .await
        .with_context(|| format!("HTTP/2 handshake with {hbone}"))?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            debug!(%hbone, "pooled HBONE connection ended: {e}");
        }
    });
    debug!(source = %pod.name, %hbone, peer, "new pooled HBONE connection");
    Ok(sender)
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
    io: Option<TokioIo<Upgraded>>,
    /// The peer ended its side (read returned end of stream).
    peer_done: bool,
}

impl Stream {
    pub fn new(upgraded: Upgraded) -> Self {
        Self {
            io: Some(TokioIo::new(upgraded)),
            peer_done: false,
        }
    }

    fn io(&mut self) -> Pin<&mut TokioIo<Upgraded>> {
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

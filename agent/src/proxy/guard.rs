//! Defences of the accept paths: connection limits per pod and per node, HTTP server limits, an
//! idle timeout, and failures that are counted every time but logged only a few times a window,
//! so a flood of bad connections can neither exhaust the node nor fill its disk.
use std::{
    future::Future,
    io,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use prometheus_client::encoding::EncodeLabelValue;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    sync::{OwnedSemaphorePermit, Semaphore},
    time::{Instant, Sleep},
};

/// Why a connection was refused or failed before it was proxied: the `reason` label of
/// `trellis_connection_failures_total`.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)] // label values as Prometheus shows them
pub enum Failure {
    /// The pod has `--max-connections-per-pod` connections open.
    pod_limit,
    /// The node has `--max-connections` connections open.
    node_limit,
    /// Addressed to one of the proxy's own ports.
    proxy_port,
    /// Plaintext to a STRICT port, not opened by the node itself.
    strict,
    /// A TLS handshake on 15008 failed or timed out, or the peer's identity was unusable.
    handshake,
    /// accept() failed (typically out of descriptors).
    accept,
    /// An AuthorizationPolicy denied the connection or request.
    authz,
    /// A REGISTRY_ONLY pod connected to a ServiceEntry address not exported to its namespace
    /// (the kernel's registry is the node's; the proxy refuses what the pod may not see).
    not_exported,
}

const FAILURES: usize = 8;

/// At most this many log lines per failure kind per window; the rest are counted only.
const LOG_BURST: u64 = 10;
const LOG_WINDOW: Duration = Duration::from_secs(10);

/// Log throttles, one per failure kind.
pub struct LogThrottle {
    windows: [Mutex<Window>; FAILURES],
}

struct Window {
    start: std::time::Instant,
    logged: u64,
    suppressed: u64,
}

impl Default for LogThrottle {
    fn default() -> Self {
        Self {
            windows: std::array::from_fn(|_| {
                Mutex::new(Window {
                    start: std::time::Instant::now(),
                    logged: 0,
                    suppressed: 0,
                })
            }),
        }
    }
}

impl LogThrottle {
    /// Whether to log this occurrence of `kind`; Some(n) says n similar lines were suppressed
    /// since the last one logged.
    pub fn allow(&self, kind: Failure) -> Option<u64> {
        let mut w = self.windows[kind as usize]
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if w.start.elapsed() >= LOG_WINDOW {
            w.start = std::time::Instant::now();
            w.logged = 0;
        }
        if w.logged >= LOG_BURST {
            w.suppressed += 1;
            return None;
        }
        w.logged += 1;
        Some(std::mem::take(&mut w.suppressed))
    }
}

/// How many connections may be open at once, node-wide and per pod.
pub struct ConnLimits {
    node: Arc<Semaphore>,
    pub per_pod: usize,
}

/// A connection's place under the limits, held for its life.
pub struct Admission {
    _node: OwnedSemaphorePermit,
    _pod: OwnedSemaphorePermit,
}

impl ConnLimits {
    pub fn new(node: usize, per_pod: usize) -> Self {
        Self {
            node: Arc::new(Semaphore::new(node)),
            per_pod,
        }
    }

    /// A new pod's own budget.
    pub fn pod_budget(&self) -> Arc<Semaphore> {
        Arc::new(Semaphore::new(self.per_pod))
    }

    /// Admits one more connection for the pod with `budget`, or says which limit stops it.
    pub fn admit(&self, budget: &Arc<Semaphore>) -> Result<Admission, Failure> {
        let pod = budget
            .clone()
            .try_acquire_owned()
            .map_err(|_| Failure::pod_limit)?;
        let node = self
            .node
            .clone()
            .try_acquire_owned()
            .map_err(|_| Failure::node_limit)?;
        Ok(Admission {
            _node: node,
            _pod: pod,
        })
    }
}

/// Raises the soft open-file limit to the hard one (the default soft limit, often 1024, would
/// cap the node at a few hundred connections) and returns the default node-wide connection limit:
/// what that leaves after a reserve for listeners, control and metrics. A connection passed
/// through as plain TCP holds two descriptors, so the accept loop can still meet EMFILE; it then
/// backs off instead of spinning.
pub fn open_file_budget() -> std::io::Result<(u64, usize)> {
    const RESERVE: u64 = 2048;
    let soft = rlimit::increase_nofile_limit(u64::MAX)?;
    let limit = usize::try_from(soft.saturating_sub(RESERVE).max(1024)).unwrap_or(usize::MAX);
    Ok((soft, limit))
}

/// Limits of the HTTP servers the proxy runs for apps' connections.
#[derive(Clone, Copy, Debug)]
pub struct HttpLimits {
    /// HTTP/1: the time a request's head may take to arrive, counted from when the server starts
    /// waiting for it, so it also bounds an idle keep-alive connection.
    pub header_read_timeout: Duration,
    /// Any connection with no byte moving either way for this long is closed.
    pub idle_timeout: Duration,
    /// The largest request head (HTTP/1) or header list (HTTP/2) accepted, in bytes.
    pub max_header_bytes: u32,
    /// Concurrent HTTP/2 streams per connection.
    pub max_concurrent_streams: u32,
}

/// A connection closed when no byte has moved either way for `idle`: reads then fail with
/// `TimedOut`, which ends whatever serves it.
pub struct Idle<T> {
    inner: T,
    idle: Duration,
    timer: Pin<Box<Sleep>>,
    last: Arc<AtomicU64>,
    epoch: Instant,
}

impl<T> Idle<T> {
    pub fn new(inner: T, idle: Duration) -> Self {
        Self {
            inner,
            idle,
            timer: Box::pin(tokio::time::sleep(idle)),
            last: Arc::new(AtomicU64::new(0)),
            epoch: Instant::now(),
        }
    }

    fn touch(&self) {
        let ms = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last.store(ms, Ordering::Relaxed);
    }

    /// Pending while the connection is live; re-arms the timer from the last activity.
    fn poll_expired(&mut self, cx: &mut Context<'_>) -> bool {
        loop {
            if self.timer.as_mut().poll(cx).is_pending() {
                return false;
            }
            let last = self.epoch + Duration::from_millis(self.last.load(Ordering::Relaxed));
            let deadline = last + self.idle;
            if deadline <= Instant::now() {
                return true;
            }
            self.timer.as_mut().reset(deadline);
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Idle<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(r) => {
                if buf.filled().len() > before {
                    self.touch();
                }
                Poll::Ready(r)
            }
            Poll::Pending if self.poll_expired(cx) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "idle timeout: no bytes either way",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Idle<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(poll, Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        poll
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(poll, Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
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
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    #[test]
    fn throttle_logs_a_burst_then_counts_what_it_suppressed() {
        let t = LogThrottle::default();
        for _ in 0..LOG_BURST {
            assert_eq!(t.allow(Failure::handshake), Some(0));
        }
        for _ in 0..5 {
            assert_eq!(t.allow(Failure::handshake), None);
        }
        // Another kind has its own budget.
        assert_eq!(t.allow(Failure::strict), Some(0));
        // A new window logs again and reports what was suppressed.
        t.windows[Failure::handshake as usize].lock().unwrap().start -= LOG_WINDOW;
        assert_eq!(t.allow(Failure::handshake), Some(5));
        assert_eq!(t.allow(Failure::handshake), Some(0));
    }

    #[test]
    fn limits_refuse_past_the_pod_and_the_node_budget() {
        let limits = ConnLimits::new(3, 2);
        let (a, b) = (limits.pod_budget(), limits.pod_budget());
        let a1 = limits.admit(&a).unwrap();
        let _a2 = limits.admit(&a).unwrap();
        assert_eq!(limits.admit(&a).err(), Some(Failure::pod_limit));
        let _b1 = limits.admit(&b).unwrap();
        assert_eq!(limits.admit(&b).err(), Some(Failure::node_limit));
        drop(a1);
        assert!(
            limits.admit(&b).is_ok(),
            "a closed connection frees its place"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn idle_connections_time_out_and_busy_ones_do_not() {
        let (client, server) = tokio::io::duplex(64);
        let mut idle = Idle::new(server, Duration::from_secs(10));
        let mut client = client;
        let mut buf = [0u8; 8];
        // Traffic every 6 s keeps it open past the 10 s limit.
        for _ in 0..3 {
            tokio::time::advance(Duration::from_secs(6)).await;
            client.write_all(b"x").await.unwrap();
            assert_eq!(idle.read(&mut buf).await.unwrap(), 1);
        }
        let err = idle.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
    }
}

//! Plain HTTP GETs to the mesh's endpoints, from this host's network namespace or from inside
//! another one (a node of the test harness, or the node's own when trellisctl runs in a pod).
use std::{
    fmt,
    fs::File,
    net::SocketAddr,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use anyhow::{Context as _, Result, anyhow, bail};
use http_body_util::{BodyExt as _, Empty, Limited};
use hyper::{
    Request,
    body::{Bytes, Incoming},
    header,
};
use hyper_util::rt::TokioIo;
use k8s_openapi::api::core::v1::Pod;
use socket2::{Domain, Socket, Type};

/// How long one request may take, connect included.
const TIMEOUT: Duration = Duration::from_secs(5);
/// The largest body read: a config dump of a big node is a few MB.
const MAX_BODY: usize = 64 << 20;

/// An HTTP endpoint: an address, reached from the network namespace at `netns` (None: this
/// process's own), or a pod's port reached through the API server (`forward`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub netns: Option<PathBuf>,
    pub addr: SocketAddr,
    pub forward: Option<Forward>,
}

/// A pod whose ports are reached by a port-forward through the API server (kubelet connects to
/// the port on the pod's localhost, so a node agent's localhost-only admin endpoint is reached
/// too: the agent's pod shares its node's network namespace).
#[derive(Clone)]
pub struct Forward {
    pub pods: Box<kube::Api<Pod>>,
    pub namespace: String,
    pub name: String,
}

impl fmt::Debug for Forward {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "pod {}/{}", self.namespace, self.name)
    }
}

impl PartialEq for Forward {
    fn eq(&self, other: &Self) -> bool {
        (&self.namespace, &self.name) == (&other.namespace, &other.name)
    }
}

impl Eq for Forward {}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.forward, &self.netns) {
            (Some(pod), _) => write!(
                f,
                "{pod:?} port {} through the API server",
                self.addr.port()
            ),
            (None, Some(ns)) => write!(f, "{} in netns {}", self.addr, ns.display()),
            (None, None) => write!(f, "{}", self.addr),
        }
    }
}

/// One answer.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    /// The `Date` header, if the server sent one.
    pub date: Option<SystemTime>,
    pub body: String,
}

impl Reply {
    /// The body, if the status is 200; else an error naming the endpoint, path and status.
    pub fn ok_body(self, what: &str) -> Result<String> {
        match self.status {
            200 => Ok(self.body),
            code => bail!("{what}: HTTP {code}: {}", self.body.trim()),
        }
    }
}

/// A network namespace by name (`ip netns` names, under /var/run/netns) or by path.
pub fn netns_path(name: &str) -> PathBuf {
    if name.starts_with('/') {
        PathBuf::from(name)
    } else {
        Path::new("/var/run/netns").join(name)
    }
}

impl Endpoint {
    pub fn new(netns: Option<PathBuf>, addr: SocketAddr) -> Self {
        Self {
            netns,
            addr,
            forward: None,
        }
    }

    /// `port` of the pod `forward` names, through the API server.
    pub fn forwarded(forward: Forward, port: u16) -> Self {
        Self {
            netns: None,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            forward: Some(forward),
        }
    }

    /// GET `path`, within `TIMEOUT`.
    pub async fn get(&self, path: &str) -> Result<Reply> {
        tokio::time::timeout(TIMEOUT, self.request(path))
            .await
            .map_err(|_| anyhow!("GET {path} from {self}: no answer within {TIMEOUT:?}"))?
            .with_context(|| format!("GET {path} from {self}"))
    }

    /// GET `path` and the response's head; its body is read by the caller.
    async fn send(&self, path: &str) -> Result<hyper::Response<Incoming>> {
        if let Some(pod) = &self.forward {
            return self.send_forwarded(pod, path).await;
        }
        let socket = match &self.netns {
            Some(ns) => socket_in(ns, self.addr)?,
            None => Socket::new(Domain::for_address(self.addr), Type::STREAM, None)?,
        };
        socket.set_nonblocking(true)?;
        let stream = tokio::net::TcpSocket::from_std_stream(socket.into())
            .connect(self.addr)
            .await?;
        get(stream, self.addr, path).await
    }

    async fn send_forwarded(&self, pod: &Forward, path: &str) -> Result<hyper::Response<Incoming>> {
        let port = self.addr.port();
        let mut forward = pod
            .pods
            .portforward(&pod.name, &[port])
            .await
            .context("opening a port-forward through the API server")?;
        let stream = forward
            .take_stream(port)
            .context("the port-forward has no stream")?;
        let refused = forward.take_error(port);
        match get(stream, self.addr, path).await {
            Ok(resp) => Ok(resp),
            // The pod's side says why (nothing listening, say) on the error channel.
            Err(e) => match refused {
                Some(why) => match tokio::time::timeout(Duration::from_secs(1), why).await {
                    Ok(Some(why)) => bail!("the port-forward failed: {}", why.trim()),
                    _ => Err(e),
                },
                None => Err(e),
            },
        }
    }

    async fn request(&self, path: &str) -> Result<Reply> {
        let resp = self.send(path).await?;
        let status = resp.status().as_u16();
        let date = resp
            .headers()
            .get(header::DATE)
            .and_then(|d| d.to_str().ok())
            .and_then(|d| httpdate::parse_http_date(d).ok());
        let body = Limited::new(resp.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|e| anyhow!("reading the body: {e}"))?
            .to_bytes();
        Ok(Reply {
            status,
            date,
            body: String::from_utf8_lossy(&body).into_owned(),
        })
    }

    /// GET `path` for a body that streams on (a tap): the body, once the head said 200.
    pub async fn stream(&self, path: &str) -> Result<Incoming> {
        let resp = tokio::time::timeout(TIMEOUT, self.send(path))
            .await
            .map_err(|_| anyhow!("GET {path} from {self}: no answer within {TIMEOUT:?}"))?
            .with_context(|| format!("GET {path} from {self}"))?;
        if resp.status() == hyper::StatusCode::OK {
            return Ok(resp.into_body());
        }
        let status = resp.status().as_u16();
        let body =
            tokio::time::timeout(TIMEOUT, Limited::new(resp.into_body(), 64 << 10).collect())
                .await
                .ok()
                .and_then(Result::ok)
                .map(|b| String::from_utf8_lossy(&b.to_bytes()).trim().to_owned())
                .unwrap_or_default();
        bail!("GET {path} from {self}: HTTP {status}: {body}")
    }
}

/// GET `path` over `io`, an HTTP/1.1 connection to `addr`.
async fn get<T>(io: T, addr: SocketAddr, path: &str) -> Result<hyper::Response<Incoming>>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
    tokio::spawn(conn);
    let req = Request::get(path)
        .header(header::HOST, addr.to_string())
        .body(Empty::<Bytes>::new())?;
    Ok(sender.send_request(req).await?)
}

/// A TCP socket created inside the network namespace at `netns`: a socket stays in the
/// namespace it was made in, so only its creation needs a thread that entered it (and that
/// thread ends right after, never running anything else there).
fn socket_in(netns: &Path, addr: SocketAddr) -> Result<Socket> {
    let ns = File::open(netns).with_context(|| {
        format!(
            "opening network namespace {} (a name from `ip netns list` or a path such as /proc/PID/ns/net)",
            netns.display()
        )
    })?;
    std::thread::spawn(move || -> Result<Socket> {
        // SAFETY: setns on an fd we hold open; it changes only this thread's namespace.
        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            let e = std::io::Error::last_os_error();
            bail!("entering the network namespace: {e} (trellisctl needs root for this)");
        }
        Ok(Socket::new(Domain::for_address(addr), Type::STREAM, None)?)
    })
    .join()
    .map_err(|_| anyhow!("the thread entering the network namespace panicked"))?
}

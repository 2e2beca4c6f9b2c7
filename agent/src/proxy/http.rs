//! What the HTTP paths share: error answers, the server that speaks HTTP/1.1 and HTTP/2 (h2c,
//! told apart by the HTTP/2 preface), upstream connections in the request's own version, and
//! upgrade pass-through.
use anyhow::Result;
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::{
    Request, Response, StatusCode, Version,
    body::{Bytes, Incoming},
    client::conn::{http1, http2},
    upgrade::OnUpgrade,
};
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
};
use tracing::debug;

use super::{HttpLimits, guard::Idle, splice};

/// Any body the proxy passes on: hyper's own, or one arriving on an HBONE connection's stream.
pub type Body = BoxBody<Bytes, BodyError>;

/// Why a body stopped short. (A concrete type: with a boxed `dyn Error` here, the layers' async
/// closures no longer type-check.)
#[derive(Debug)]
pub enum BodyError {
    Hyper(hyper::Error),
    H2(h2::Error),
}

impl std::fmt::Display for BodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Hyper(e) => e.fmt(f),
            Self::H2(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for BodyError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Hyper(e) => Some(e),
            Self::H2(e) => Some(e),
        }
    }
}

impl From<hyper::Error> for BodyError {
    fn from(e: hyper::Error) -> Self {
        Self::Hyper(e)
    }
}

impl From<h2::Error> for BodyError {
    fn from(e: h2::Error) -> Self {
        Self::H2(e)
    }
}

/// Whether a request or answer is gRPC (by its content type).
pub fn is_grpc(headers: &hyper::HeaderMap) -> bool {
    headers
        .get(hyper::header::CONTENT_TYPE)
        .is_some_and(|t| t.as_bytes().starts_with(b"application/grpc"))
}

/// `body` as a `Body`.
pub fn boxed<B>(body: B) -> Body
where
    B: hyper::body::Body<Data = Bytes> + Send + Sync + 'static,
    B::Error: Into<BodyError>,
{
    body.map_err(Into::into).boxed()
}

pub fn error(code: StatusCode, text: &'static str) -> Response<Body> {
    let mut resp = Response::new(
        Full::new(Bytes::from_static(text.as_bytes()))
            .map_err(|never| match never {})
            .boxed(),
    );
    *resp.status_mut() = code;
    resp
}

/// Serves one downstream connection: HTTP/1.1 (keep-alive, upgrades) or HTTP/2 with prior
/// knowledge, whichever the client speaks, within `limits`.
pub async fn serve<C, S, B>(
    client: C,
    service: S,
    limits: &HttpLimits,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>>
where
    C: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes as usize);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(limits.max_header_bytes)
        .max_concurrent_streams(limits.max_concurrent_streams);
    let io = TokioIo::new(Idle::new(client, limits.idle_timeout));
    builder.serve_connection_with_upgrades(io, service).await
}

/// An upstream connection in one HTTP version, driven by its own task.
pub enum Sender<B> {
    /// One request at a time; upgrades allowed.
    Http1(http1::SendRequest<B>),
    /// Many concurrent streams (h2c, or HTTP/2 inside an HBONE stream).
    Http2(http2::SendRequest<B>),
}

impl<B> Sender<B>
where
    B: hyper::body::Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    /// Handshakes over `io` in `version` (HTTP/2 for HTTP/2, else HTTP/1.1).
    pub async fn handshake<T>(io: T, version: Version) -> Result<Self>
    where
        T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    {
        if version == Version::HTTP_2 {
            let (sender, conn) = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .handshake(io)
                .await?;
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    debug!("upstream HTTP/2 connection ended: {e}");
                }
            });
            return Ok(Self::Http2(sender));
        }
        let (sender, conn) = http1::handshake(io).await?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                debug!("upstream HTTP/1 connection ended: {e}");
            }
        });
        Ok(Self::Http1(sender))
    }

    /// Whether it can take a request now without waiting.
    pub fn is_ready(&self) -> bool {
        match self {
            Self::Http1(s) => s.is_ready(),
            Self::Http2(s) => s.is_ready(),
        }
    }

    pub fn is_closed(&self) -> bool {
        match self {
            Self::Http1(s) => s.is_closed(),
            Self::Http2(s) => s.is_closed(),
        }
    }

    pub async fn ready(&mut self) -> hyper::Result<()> {
        match self {
            Self::Http1(s) => s.ready().await,
            Self::Http2(s) => s.ready().await,
        }
    }

    pub async fn send(&mut self, req: Request<B>) -> hyper::Result<Response<Incoming>> {
        match self {
            Self::Http1(s) => s.send_request(req).await,
            Self::Http2(s) => s.send_request(req).await,
        }
    }

    /// Another handle on the same connection, where the version multiplexes.
    pub fn share(&self) -> Option<Self> {
        match self {
            Self::Http1(_) => None,
            Self::Http2(s) => Some(Self::Http2(s.clone())),
        }
    }
}

/// Makes `req` an HTTP/2 request (`http2`) or an HTTP/1.1 one, moving the host between the
/// Host header (HTTP/1.1) and the URI's authority (HTTP/2).
pub fn set_version<B>(req: &mut Request<B>, http2: bool) {
    use hyper::{header::HOST, http::uri};
    let want = if http2 {
        Version::HTTP_2
    } else {
        Version::HTTP_11
    };
    if req.version() == want {
        return;
    }
    *req.version_mut() = want;
    let path = req
        .uri()
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| uri::PathAndQuery::from_static("/"));
    if http2 {
        let host = req
            .headers_mut()
            .remove(HOST)
            .and_then(|h| uri::Authority::try_from(h.as_bytes()).ok());
        if let Some(authority) = host.or_else(|| req.uri().authority().cloned()) {
            let mut parts = uri::Parts::default();
            parts.scheme = Some(uri::Scheme::HTTP);
            parts.authority = Some(authority);
            parts.path_and_query = Some(path);
            if let Ok(u) = hyper::Uri::from_parts(parts) {
                *req.uri_mut() = u;
            }
        }
    } else {
        if let Some(a) = req.uri().authority()
            && !req.headers().contains_key(HOST)
            && let Ok(v) = hyper::header::HeaderValue::from_str(a.as_str())
        {
            req.headers_mut().insert(HOST, v);
        }
        *req.uri_mut() = hyper::Uri::from(path);
    }
}

/// When the server switched protocols, splices the two upgraded connections.
pub fn pass_upgrade<B>(downstream: OnUpgrade, resp: &mut Response<B>) {
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        return;
    }
    let upstream = hyper::upgrade::on(resp);
    tokio::spawn(async move {
        if let (Ok(d), Ok(u)) = (downstream.await, upstream.await) {
            let _ = splice(&mut TokioIo::new(d), &mut TokioIo::new(u)).await;
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_move_the_host_between_header_and_authority() {
        let mut req = Request::builder()
            .version(Version::HTTP_2)
            .uri("https://shop.example/cart?id=1")
            .body(())
            .unwrap();
        set_version(&mut req, false);
        assert_eq!(req.version(), Version::HTTP_11);
        assert_eq!(req.uri(), "/cart?id=1");
        assert_eq!(req.headers()["host"], "shop.example");

        set_version(&mut req, true);
        assert_eq!(req.version(), Version::HTTP_2);
        assert_eq!(req.uri(), "http://shop.example/cart?id=1");
        assert!(!req.headers().contains_key("host"));

        // Already in the version wanted: untouched.
        let mut same = Request::builder().uri("/x").body(()).unwrap();
        set_version(&mut same, false);
        assert_eq!(same.uri(), "/x");
    }
}

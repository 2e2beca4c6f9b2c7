//! What the HTTP/1.1 paths share: error answers, upstream connections, upgrade pass-through.
use anyhow::Result;
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::{
    Response, StatusCode,
    body::{Bytes, Incoming},
    client::conn::http1::SendRequest,
    upgrade::OnUpgrade,
};
use hyper_util::rt::TokioIo;
use tracing::debug;

use super::splice;

pub type Body = BoxBody<Bytes, hyper::Error>;

pub fn error(code: StatusCode, text: &'static str) -> Response<Body> {
    let mut resp = Response::new(
        Full::new(Bytes::from_static(text.as_bytes()))
            .map_err(|never| match never {})
            .boxed(),
    );
    *resp.status_mut() = code;
    resp
}

/// An HTTP/1.1 client connection over `io`, driven by its own task (upgrades allowed).
pub async fn client<T, B>(io: T) -> Result<SendRequest<B>>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(io).await?;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            debug!("upstream HTTP/1 connection ended: {e}");
        }
    });
    Ok(sender)
}

/// When the server switched protocols, splices the two upgraded connections.
pub fn pass_upgrade(downstream: OnUpgrade, resp: &mut Response<Incoming>) {
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

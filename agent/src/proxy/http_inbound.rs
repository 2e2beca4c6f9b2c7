//! HTTP/1.1 inbound to a port its service declares HTTP: each request goes to the app with the
//! caller's verified identity in `x-forwarded-client-cert` (Envoy's and Istio's header,
//! `By=<server>;URI=<client>`) when it came over HBONE, and without that header when it came in
//! plaintext. Whatever the client sent in it is always removed first, so the app can trust it.
//! Upgrades (WebSocket) are passed through once the app agrees.
use std::{convert::Infallible, sync::Arc};

use http_body_util::BodyExt;
use hyper::{
    Request, Response, StatusCode, body::Incoming, header::HeaderValue, service::service_fn,
};
use hyper_util::rt::TokioIo;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
    sync::Mutex,
};
use tracing::debug;

use super::http::{self, Body};

pub const XFCC: &str = "x-forwarded-client-cert";

/// Serves HTTP/1.1 from `client`, forwarding to `app` over one connection. `identities` is
/// (server, client) for mutual-TLS callers, None for plaintext ones.
pub async fn serve<C>(client: C, app: TcpStream, identities: Option<(&str, &str)>)
where
    C: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let xfcc = match identities {
        Some((server, client)) => match HeaderValue::from_str(&format!("By={server};URI={client}"))
        {
            Ok(v) => Some(v),
            Err(_) => return debug!(client, "identity not usable in a header"),
        },
        None => None,
    };
    let sender = match http::client(TokioIo::new(app)).await {
        Ok(s) => s,
        Err(e) => return debug!("HTTP/1 handshake with the app: {e:#}"),
    };
    let sender = Arc::new(Mutex::new(sender));
    let service = service_fn(move |req| forward(req, sender.clone(), xfcc.clone()));
    if let Err(e) = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(client), service)
        .with_upgrades()
        .await
    {
        debug!("inbound HTTP/1 connection ended: {e}");
    }
}

async fn forward(
    mut req: Request<Incoming>,
    app: Arc<Mutex<hyper::client::conn::http1::SendRequest<Incoming>>>,
    xfcc: Option<HeaderValue>,
) -> Result<Response<Body>, Infallible> {
    req.headers_mut().remove(XFCC);
    if let Some(v) = xfcc {
        req.headers_mut().insert(XFCC, v);
    }
    let client_upgrade = hyper::upgrade::on(&mut req);
    let sent = {
        let mut app = app.lock().await;
        match app.ready().await {
            Ok(()) => app.send_request(req).await,
            Err(e) => Err(e),
        }
    };
    let mut resp = match sent {
        Ok(resp) => resp,
        Err(e) => {
            debug!("forwarding to the app: {e}");
            return Ok(http::error(
                StatusCode::BAD_GATEWAY,
                "upstream connect error\n",
            ));
        }
    };
    http::pass_upgrade(client_upgrade, &mut resp);
    Ok(resp.map(BodyExt::boxed))
}

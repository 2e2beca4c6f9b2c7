//! HTTP inbound to a port its service declares HTTP, HTTP/2 or gRPC: each request goes to the app
//! with the caller's verified identity in `x-forwarded-client-cert` (Envoy's and Istio's header,
//! `By=<server>;URI=<client>`) when it came over HBONE, and without that header when it came in
//! plaintext. Whatever the client sent in it is always removed first, so the app can trust it.
//! The app is spoken to in the client's HTTP version (h2c for HTTP/2) over one connection.
//! Upgrades (WebSocket) are passed through once the app agrees.
use std::{convert::Infallible, io, sync::Arc};

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

use super::http::{self, Body, Sender};

pub const XFCC: &str = "x-forwarded-client-cert";

/// The connection to the app: opened for the first request, in that request's version, and
/// opened again when the app has closed it (apps close idle keep-alive connections; the tunnel
/// in front of them stays open).
enum App {
    Connected(TcpStream),
    Speaking(Sender<Incoming>),
    Closed,
}

/// Connects to the app again.
pub type Reconnect = Arc<dyn Fn() -> BoxFuture<io::Result<TcpStream>> + Send + Sync>;
type BoxFuture<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>;

/// Serves HTTP/1.1 or HTTP/2 from `client`, forwarding to `app` (and to a connection from
/// `reconnect` once the app closed that one). `identities` is (server, client) for mutual-TLS
/// callers, None for plaintext ones.
pub async fn serve<C>(
    client: C,
    app: TcpStream,
    reconnect: Reconnect,
    identities: Option<(&str, &str)>,
) where
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
    let app = Arc::new(Mutex::new(App::Connected(app)));
    let service = service_fn(move |req| forward(req, app.clone(), reconnect.clone(), xfcc.clone()));
    if let Err(e) = http::server()
        .serve_connection_with_upgrades(TokioIo::new(client), service)
        .await
    {
        debug!("inbound HTTP connection ended: {e}");
    }
}

async fn forward(
    mut req: Request<Incoming>,
    app: Arc<Mutex<App>>,
    reconnect: Reconnect,
    xfcc: Option<HeaderValue>,
) -> Result<Response<Body>, Infallible> {
    req.headers_mut().remove(XFCC);
    if let Some(v) = xfcc {
        req.headers_mut().insert(XFCC, v);
    }
    let client_upgrade = hyper::upgrade::on(&mut req);
    let sent = {
        let mut app = app.lock().await;
        if matches!(&*app, App::Speaking(s) if s.is_closed()) || matches!(&*app, App::Closed) {
            *app = match reconnect().await {
                Ok(tcp) => App::Connected(tcp),
                Err(e) => {
                    debug!("reconnecting to the app: {e}");
                    App::Closed
                }
            };
        }
        if let App::Connected(_) = &*app
            && let App::Connected(tcp) = std::mem::replace(&mut *app, App::Closed)
        {
            match Sender::handshake(TokioIo::new(tcp), req.version()).await {
                Ok(sender) => *app = App::Speaking(sender),
                Err(e) => debug!("handshake with the app: {e:#}"),
            }
        }
        match &mut *app {
            // HTTP/2 multiplexes: send outside the lock, so requests run concurrently.
            App::Speaking(sender) => match sender.share() {
                Some(mut shared) => {
                    drop(app);
                    send(&mut shared, req).await
                }
                None => send(sender, req).await,
            },
            _ => Err(None),
        }
    };
    let mut resp = match sent {
        Ok(resp) => resp,
        Err(e) => {
            if let Some(e) = e {
                debug!("forwarding to the app: {e}");
            }
            return Ok(http::error(
                StatusCode::BAD_GATEWAY,
                "upstream connect error\n",
            ));
        }
    };
    http::pass_upgrade(client_upgrade, &mut resp);
    Ok(resp.map(BodyExt::boxed))
}

async fn send(
    app: &mut Sender<Incoming>,
    req: Request<Incoming>,
) -> Result<Response<Incoming>, Option<hyper::Error>> {
    app.ready().await?;
    Ok(app.send(req).await?)
}

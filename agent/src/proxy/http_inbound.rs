//! HTTP inbound to a port its service declares HTTP, HTTP/2 or gRPC: each request goes to the app
//! with the caller's verified identity in `x-forwarded-client-cert` (Envoy's and Istio's header,
//! `By=<server>;URI=<client>`) when it came over HBONE, and without that header when it came in
//! plaintext. Whatever the client sent in it is always removed first, so the app can trust it.
//! The app is spoken to in the client's HTTP version (h2c for HTTP/2) over one connection.
//! Upgrades (WebSocket) are passed through once the app agrees.
use std::{convert::Infallible, net::SocketAddr, sync::Arc};

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

use super::{
    HttpLimits, PodCtx,
    http::{self, Body, Sender},
    inbound::to_app,
};

pub const XFCC: &str = "x-forwarded-client-cert";

/// The connection to the app: the one made for the tunnel until the first request picks its
/// HTTP version, then a sender in that version; a new connection once the app has closed it
/// (apps close idle keep-alive connections, while the tunnel in front of them stays open).
enum App {
    Unused(TcpStream),
    Speaking(Sender<Incoming>),
    Closed,
}

/// Where the app is: its pod and address.
struct Target {
    pod: Arc<PodCtx>,
    addr: SocketAddr,
}

/// Serves HTTP/1.1 or HTTP/2 from `client`, forwarding to `addr` in `pod` over `app` (a
/// connection already made) or one made for the first request. `identities` is (server, client)
/// for mutual-TLS callers, None for plaintext ones.
pub async fn serve<C>(
    client: C,
    app: Option<TcpStream>,
    pod: Arc<PodCtx>,
    addr: SocketAddr,
    identities: Option<(&str, &str)>,
    limits: &HttpLimits,
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
    let app = Arc::new(Mutex::new(app.map_or(App::Closed, App::Unused)));
    let target = Arc::new(Target { pod, addr });
    let service = service_fn(move |req| forward(req, app.clone(), target.clone(), xfcc.clone()));
    if let Err(e) = http::serve(client, service, limits).await {
        debug!("inbound HTTP connection ended: {e}");
    }
}

async fn forward(
    mut req: Request<Incoming>,
    app: Arc<Mutex<App>>,
    target: Arc<Target>,
    xfcc: Option<HeaderValue>,
) -> Result<Response<Body>, Infallible> {
    req.headers_mut().remove(XFCC);
    if let Some(v) = xfcc {
        req.headers_mut().insert(XFCC, v);
    }
    let client_upgrade = hyper::upgrade::on(&mut req);
    let sent = {
        let mut app = app.lock().await;
        speak(&mut app, &target, req.version()).await;
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

/// Leaves `app` speaking `version` over an open connection, when the app can be reached.
async fn speak(app: &mut App, target: &Target, version: hyper::Version) {
    let tcp = match std::mem::replace(app, App::Closed) {
        App::Speaking(sender) if !sender.is_closed() => {
            *app = App::Speaking(sender);
            return;
        }
        App::Unused(tcp) => tcp,
        _ => match to_app(&target.pod, target.addr).await {
            Ok(tcp) => tcp,
            Err(e) => return debug!("reconnecting to the app: {e}"),
        },
    };
    match Sender::handshake(TokioIo::new(tcp), version).await {
        Ok(sender) => *app = App::Speaking(sender),
        Err(e) => debug!("handshake with the app: {e:#}"),
    }
}

async fn send(
    app: &mut Sender<Incoming>,
    req: Request<Incoming>,
) -> Result<Response<Incoming>, Option<hyper::Error>> {
    app.ready().await?;
    Ok(app.send(req).await?)
}

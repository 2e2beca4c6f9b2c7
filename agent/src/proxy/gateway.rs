//! A gateway pod's server ports that do more than splice: HTTP (HTTPS once TLS is terminated
//! with the server's certificate) routed request by request by the VirtualServices bound to the
//! Gateway, with the node proxy's whole L7 stack, to mesh destinations over HBONE as the
//! gateway's identity; TLS terminated and then routed as TCP; and TLS passed through untouched
//! to the destination its SNI selects. Plain TCP ports are spliced in `inbound`.
use std::{convert::Infallible, io, net::SocketAddr, sync::Arc};

use hyper::{Request, body::Incoming};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::{debug, info, warn};

use super::{
    CONNECT_TIMEOUT, Io, PodCtx, Shared,
    authorize::{self, Caller, DENIED_FLAG},
    http, inbound, layers, outbound,
};
use crate::{
    metrics::{HttpLabels, RequestFigures, TcpLabels},
    state::{GatewayMode, HttpEntry},
};

/// The most a ClientHello may take before the connection is refused (TLS allows 16 KiB records;
/// a hello with many extensions may span a few).
const MAX_HELLO: usize = 64 * 1024;

/// Serves a connection to the local gateway pod's server port `target`, from `caller` (already
/// authorized for the connection where the port is not HTTP).
pub async fn serve<C: Io + 'static>(
    client: C,
    target: SocketAddr,
    caller: Caller,
    pod: Arc<PodCtx>,
    shared: Arc<Shared>,
    labels: &TcpLabels,
) {
    let Some(port) = shared.state.borrow().gateways.get(&target).cloned() else {
        return;
    };
    if port.mode == GatewayMode::TlsPassthrough {
        return passthrough(client, target, caller, &pod, &shared).await;
    }
    let client: Box<dyn Io> = match &port.tls {
        Some(tls) => match tls.accept(client).await {
            Ok(s) => Box::new(s),
            Err(e) => {
                return warn!(pod = %pod.name, client = %caller.ip, gateway = port.gateway, port = target.port(), "{e}");
            }
        },
        None => Box::new(client),
    };
    if port.mode == GatewayMode::Http {
        return serve_http(client, target, caller, pod, shared, labels).await;
    }
    // TLS terminated, then routed as TCP.
    let route = shared.state.borrow().gateway_route(target);
    let Some(route) = route else { return };
    info!(direction = "inbound", pod = %pod.name, client = %caller.ip, orig_dst = %target, destination = route.service(), "TLS terminated at a gateway port");
    forward(client, &[], route, target, caller, &pod, &shared).await;
}

/// Each request: the gateway pod's AuthorizationPolicies, then the L7 stack with the gateway's
/// virtual hosts as its routes.
async fn serve_http(
    client: Box<dyn Io>,
    target: SocketAddr,
    caller: Caller,
    pod: Arc<PodCtx>,
    shared: Arc<Shared>,
    labels: &TcpLabels,
) {
    // The client's port is not known here (only its address, for policy).
    let downstream = layers::Downstream {
        local: target,
        remote: None,
    };
    let stack = layers::stack(
        HttpEntry::Gateway(target),
        pod.clone(),
        shared.clone(),
        downstream,
    );
    let (limits, labels) = (shared.http, labels.clone());
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let denied = authorize::request(&shared, &pod, &caller, target.port(), &req);
        if denied.is_some() {
            let mut labels = labels.clone();
            labels.response_flags = DENIED_FLAG;
            labels.request_protocol = if http::is_grpc(req.headers()) {
                "grpc"
            } else {
                "http"
            };
            let labels = HttpLabels {
                tcp: labels,
                response_code: 403,
            };
            shared.metrics.request(
                &labels,
                RequestFigures {
                    took: std::time::Duration::ZERO,
                    request_bytes: 0,
                    response_bytes: 0,
                },
            );
        }
        let stack = stack.clone();
        async move {
            Ok::<_, Infallible>(match denied {
                Some(resp) => resp,
                None => stack.call(req.map(http::boxed)).await,
            })
        }
    });
    if let Err(e) = http::serve(client, service, &limits).await {
        debug!(gateway = %target, "gateway HTTP connection ended: {e}");
    }
}

/// Reads the ClientHello, routes by its SNI, and sends it and the rest on unchanged.
async fn passthrough<C: Io>(
    mut client: C,
    target: SocketAddr,
    caller: Caller,
    pod: &PodCtx,
    shared: &Shared,
) {
    let (hello, sni) = match client_hello(&mut client).await {
        Ok(h) => h,
        Err(e) => {
            return info!(pod = %pod.name, client = %caller.ip, orig_dst = %target, "TLS passthrough refused: {e}");
        }
    };
    let route = shared
        .state
        .borrow()
        .gateway_sni_route(target, sni.as_deref());
    info!(direction = "inbound", pod = %pod.name, client = %caller.ip, orig_dst = %target, sni = sni.as_deref().unwrap_or(""), destination = route.service(), "TLS passed through a gateway port");
    forward(client, &hello, route, target, caller, pod, shared).await;
}

/// Connects where `route` goes (as the gateway pod), sends `first` (bytes already read from the
/// client), then splices until either side ends or a policy change denies the caller.
async fn forward<C: Io>(
    mut client: C,
    first: &[u8],
    route: crate::state::Route,
    target: SocketAddr,
    caller: Caller,
    pod: &PodCtx,
    shared: &Shared,
) {
    let mut upstream = match outbound::from_gateway(pod, shared, route).await {
        Ok(u) => u,
        Err(e) => {
            return warn!(direction = "inbound", pod = %pod.name, orig_dst = %target, "connection failed: {e}");
        }
    };
    if let Err(e) = upstream.write_all(first).await {
        return debug!(pod = %pod.name, orig_dst = %target, "sending the ClientHello on: {e}");
    }
    let _ = inbound::guarded_splice(&mut client, &mut upstream, pod, shared, caller, target).await;
}

/// The bytes of the client's TLS ClientHello and the server name it asks for.
async fn client_hello<C: Io>(client: &mut C) -> io::Result<(Vec<u8>, Option<String>)> {
    let read = async {
        let mut acceptor = rustls::server::Acceptor::default();
        let mut hello = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            let n = client.read(&mut chunk).await?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "closed before its TLS ClientHello",
                ));
            }
            hello.extend_from_slice(&chunk[..n]);
            if hello.len() > MAX_HELLO {
                return Err(io::Error::other("ClientHello larger than 64 KiB"));
            }
            let mut fresh = &chunk[..n];
            while !fresh.is_empty() {
                acceptor.read_tls(&mut fresh)?;
            }
            match acceptor.accept() {
                Ok(Some(accepted)) => {
                    let sni = accepted.client_hello().server_name().map(str::to_owned);
                    return Ok((hello, sni));
                }
                Ok(None) => {}
                Err((e, _)) => return Err(io::Error::other(format!("not TLS: {e}"))),
            }
        }
    };
    tokio::time::timeout(CONNECT_TIMEOUT, read)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no ClientHello in time"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_hello_is_read_whole_and_its_sni_found() {
        let (mut a, mut b) = tokio::io::duplex(64 * 1024);
        // A real ClientHello, from a rustls client asking for shop.example.
        let config = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        let mut conn =
            rustls::ClientConnection::new(Arc::new(config), "shop.example".try_into().unwrap())
                .unwrap();
        let mut bytes = Vec::new();
        conn.write_tls(&mut bytes).unwrap();
        // Sent in small pieces, as a slow client would.
        for piece in bytes.chunks(7) {
            a.write_all(piece).await.unwrap();
        }
        let (hello, sni) = client_hello(&mut b).await.unwrap();
        assert_eq!(sni.as_deref(), Some("shop.example"));
        assert_eq!(hello, bytes, "every byte read is kept to send on");

        // Not TLS: refused, not waited on.
        let (mut a, mut b) = tokio::io::duplex(1024);
        a.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let e = client_hello(&mut b).await.unwrap_err();
        assert!(e.to_string().starts_with("not TLS"), "{e}");
        // Closed early.
        let (a, mut b) = tokio::io::duplex(1024);
        drop(a);
        assert_eq!(
            client_hello(&mut b).await.unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof
        );
    }
}

//! HTTP from a pod to a service port declared HTTP, HTTP/2 or gRPC, proxied at L7 on the client's
//! node. The client may speak HTTP/1.1 or HTTP/2 with prior knowledge (h2c, as gRPC does); each
//! request goes through the policy layers (`layers`) and upstream in the version it came in,
//! balanced on its own over the service's endpoints (through HBONE for mesh ones), so routing can
//! decide per request. Keep-alive, chunked bodies and trailers pass through hyper; upgrades
//! (WebSocket) are spliced once the server agrees; a malformed request gets 400 and the
//! connection is closed.
use std::{convert::Infallible, net::SocketAddr, sync::Arc};

use hyper::{Request, body::Incoming};
use tracing::debug;

use super::{PodCtx, Shared, http, layers};
use crate::state::HttpEntry;

/// Serves one connection captured from `peer` to the HTTP service port `vip`.
pub async fn serve<C>(
    client: C,
    peer: SocketAddr,
    vip: SocketAddr,
    pod: Arc<PodCtx>,
    shared: Arc<Shared>,
) where
    C: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let downstream = layers::Downstream {
        local: vip,
        remote: Some(peer),
    };
    let stack = layers::stack(HttpEntry::Service(vip), pod, shared.clone(), downstream);
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let answer = stack.call(req.map(http::boxed));
        async move { Ok::<_, Infallible>(answer.await) }
    });
    if let Err(e) = http::serve(client, service, &shared.http).await {
        debug!(%vip, "outbound HTTP connection ended: {e}");
    }
}

//! Outbound: a pod's captured connection → its original destination → service endpoint →
//! HBONE (mesh endpoints) or plain TCP (everything else).
use std::{net::SocketAddr, sync::Arc};

use tokio::net::TcpStream;
use tracing::{debug, info, warn};

use super::{
    Failure, Io, Metered, PodCtx, Shared,
    conn_log::{Closing, ConnLog},
    connect, hbone, http_outbound, labels,
    local::{self, Local, Near},
    proxy_port, reset, splice,
};
use trellis_common::DNS_PORT;

use crate::{dns, state::Route};

pub async fn handle(client: TcpStream, peer: SocketAddr, pod: Arc<PodCtx>, shared: Arc<Shared>) {
    let Some(dst) = shared.maps.orig_dst.take(pod.netns_cookie, peer) else {
        warn!(pod = %pod.name, client = %peer, "no original destination recorded for a connection to the capture port; closing it");
        return;
    };
    // The kernel refuses these connects from enrolled pods; this holds even if it did not.
    if proxy_port(dst.port()) {
        reset(&client);
        if let Some(suppressed) = shared.fail(Failure::proxy_port) {
            warn!(pod = %pod.name, client = %peer, orig_dst = %dst, suppressed, "connection to the proxy's own port refused");
        }
        return;
    }
    let _ = client.set_nodelay(true);
    if dst.port() == DNS_PORT {
        debug!(pod = %pod.name, client = %peer, resolver = %dst, "DNS over TCP captured");
        return Box::pin(dns::serve_tcp(client, dst, pod, shared)).await;
    }
    let (http, source, hidden) = {
        let state = shared.state.borrow();
        let hidden = state.registry_only.contains(&pod.uid)
            && state.services.contains_key(&dst)
            && state.service(dst, &pod.namespace).is_none();
        let http = state
            .service(dst, &pod.namespace)
            .filter(|s| s.http)
            .map(|s| {
                let mtls = s.endpoints.iter().all(|e| e.workload.identity.is_some());
                (s.host(), mtls)
            });
        (http, pod.workload(&state), hidden)
    };
    if hidden {
        reset(&client);
        if let Some(suppressed) = shared.fail(Failure::not_exported) {
            warn!(pod = %pod.name, client = %peer, orig_dst = %dst, suppressed, "connection refused: REGISTRY_ONLY, and the ServiceEntry at this address is not exported to the pod's namespace");
        }
        return;
    }
    if let Some((service, mtls)) = http {
        // Balanced per request, so the endpoint is chosen later, request by request.
        let labels = labels(
            "source",
            source.as_deref(),
            pod.identity.as_deref(),
            None,
            Some(&service),
            mtls,
        );
        info!(direction = "outbound", pod = %pod.name, client = %peer, orig_dst = %dst, protocol = "http", "connection captured");
        let client = Metered::new(client, shared.metrics.opened(&labels));
        let closed = shared.metrics.closing(&labels);
        drop(labels);
        // Boxed, here and below: an async fn's future is as large as its largest state, and
        // every connection's task would otherwise reserve room for the HTTP server and the
        // connection set-up while it only splices bytes (thousands of idle connections).
        Box::pin(http_outbound::serve(
            client,
            peer,
            dst,
            pod.clone(),
            shared.clone(),
        ))
        .await;
        closed.inc();
        return;
    }
    let route = shared.state.borrow().route(dst, &pod.namespace);
    let source = source.as_deref();
    let mut log = ConnLog::start(&shared, "outbound", peer, dst);
    match route {
        Route::Hbone {
            hbone,
            target,
            identity,
            workload,
            service,
        } => {
            let mut labels = labels(
                "source",
                source,
                pod.identity.as_deref(),
                Some(&workload),
                service.as_deref(),
                true,
            );
            info!(direction = "outbound", pod = %pod.name, client = %peer, orig_dst = %dst, %target, peer_identity = identity, "connection captured");
            let upstream =
                match Box::pin(mesh(&shared, &pod, peer.port(), hbone, target, &identity)).await {
                    Ok(upstream) => upstream,
                    Err(e) => {
                        warn!(pod = %pod.name, orig_dst = %dst, "connection failed: {e:#}");
                        return shared.metrics.failed(&mut labels, "UF");
                    }
                };
            ConnLog::upstream(&mut log, target);
            Box::pin(spliced(
                client,
                upstream,
                Box::new(labels),
                &shared,
                &pod,
                dst,
                log,
            ))
            .await;
        }
        Route::NoEndpoints { service } => {
            warn!(pod = %pod.name, orig_dst = %dst, service, "the service has no endpoint for this address family; closing the connection");
            let mut labels = labels(
                "source",
                source,
                pod.identity.as_deref(),
                None,
                Some(&service),
                false,
            );
            shared.metrics.failed(&mut labels, "UH");
        }
        // Plain TCP (maybe TLS originated) to a pod outside the mesh or a host outside the
        // cluster.
        outside => {
            let workload = match &outside {
                Route::Passthrough { workload, .. } => workload.clone(),
                _ => None,
            };
            let mut labels = labels(
                "source",
                source,
                pod.identity.as_deref(),
                workload.as_deref(),
                Some(outside.service()),
                false,
            );
            let upstream = Box::pin(plain(&pod, &shared, outside)).await.map(|(stream, addr)| {
                info!(direction = "outbound", pod = %pod.name, client = %peer, orig_dst = %dst, target = %addr, "connection captured");
                ConnLog::upstream(&mut log, addr);
                stream
            });
            match upstream {
                Ok(upstream) => {
                    Box::pin(spliced(
                        client,
                        Upstream::Plain(upstream),
                        Box::new(labels),
                        &shared,
                        &pod,
                        dst,
                        log,
                    ))
                    .await
                }
                Err(e) => {
                    warn!(pod = %pod.name, orig_dst = %dst, "connection failed: {e}");
                    shared.metrics.failed(&mut labels, "UF");
                }
            }
        }
    }
}

/// What a captured client is spliced to.
enum Upstream {
    /// A tunnel to a mesh destination's HBONE port.
    Hbone(hbone::Stream),
    /// A mesh destination's app on this node, accepted on its behalf here ([`local`]).
    Local(Box<local::Accepted>),
    /// Out of the mesh; or a pipe to a same-node pod's inbound HTTP proxy ([`local::http`]).
    Plain(Box<dyn Io>),
}

/// Opens the way from `pod` to `target`, which `hbone` serves as `identity`: in this agent when
/// it serves both ends ([`local`]), else over HBONE.
async fn mesh(
    shared: &Arc<Shared>,
    pod: &PodCtx,
    client_port: u16,
    hbone: SocketAddr,
    target: SocketAddr,
    identity: &str,
) -> anyhow::Result<Upstream> {
    if let Some(local) = local::serves(shared, pod, hbone, identity) {
        match local::open(shared, pod, local, client_port, target).await {
            Local::Open(Near::Splice(accepted)) => return Ok(Upstream::Local(accepted)),
            Local::Open(Near::Pipe(pipe)) => return Ok(Upstream::Plain(Box::new(pipe))),
            Local::Refused(why) => anyhow::bail!(why),
            Local::Remote => {}
        }
    }
    Ok(Upstream::Hbone(
        hbone::open(shared, pod, hbone, target, identity).await?,
    ))
}

/// A connection to where a gateway's route goes, as the gateway pod: HBONE with the pod's
/// identity to a mesh destination, else [`plain`].
pub(super) async fn from_gateway(
    pod: &PodCtx,
    shared: &Shared,
    route: Route,
) -> std::io::Result<Box<dyn Io>> {
    let Route::Hbone {
        hbone,
        target,
        identity,
        ..
    } = route
    else {
        return plain(pod, shared, route).await.map(|(stream, _)| stream);
    };
    let tunnel = hbone::open(shared, pod, hbone, target, &identity)
        .await
        .map_err(|e| std::io::Error::other(format!("{e:#}")))?;
    Ok(Box::new(tunnel))
}

/// A connection from the pod's netns to where `route` goes outside the mesh (TLS when the
/// destination's rule originates it), and the address it reached: how outbound passthrough and
/// gateways leave the mesh (mesh destinations are not reached this way).
pub(super) async fn plain(
    pod: &PodCtx,
    shared: &Shared,
    route: Route,
) -> std::io::Result<(Box<dyn Io>, SocketAddr)> {
    let (addr, host, tls) = match route {
        Route::Passthrough {
            addr, service, tls, ..
        } => (addr, service.unwrap_or_else(|| addr.ip().to_string()), tls),
        Route::Resolve {
            host,
            port,
            v4,
            tls,
            ..
        } => {
            let ip = dns::resolve(pod, shared, &host, v4).await?;
            (SocketAddr::new(ip, port), host, tls)
        }
        Route::Hbone { target, .. } => {
            return Err(std::io::Error::other(format!(
                "{target} is in the mesh: a gateway forwards only out of it for now"
            )));
        }
        Route::NoEndpoints { service } => {
            return Err(std::io::Error::other(format!("{service} has no endpoint")));
        }
    };
    let tcp = connect(pod.socket_for(addr)?, addr).await?;
    let stream: Box<dyn Io> = match tls {
        Some(tls) => Box::new(tls.connect(tcp, &host).await?),
        None => Box::new(tcp),
    };
    Ok((stream, addr))
}

/// Splices the client to its upstream until both sides close. Its own (boxed) future, so a
/// connection's task is sized for this, its longest state, holding only what its close needs
/// ([`Closing`]).
async fn spliced(
    client: TcpStream,
    mut upstream: Upstream,
    labels: Box<crate::metrics::TcpLabels>,
    shared: &Shared,
    pod: &PodCtx,
    dst: SocketAddr,
    log: Option<Box<ConnLog>>,
) {
    let mut client = Metered::new(client, shared.metrics.opened(&labels));
    let closing = Closing::new(shared, labels, log);
    // By reference: a binding moved out of `upstream` would be a second slot of its size.
    let result = match &mut upstream {
        Upstream::Hbone(tunnel) => splice(&mut client, tunnel).await.map_err(|e| e.to_string()),
        Upstream::Plain(plain) => splice(&mut client, plain).await.map_err(|e| e.to_string()),
        // Boxed: a tunnel's splice does not reserve room for the destination side's.
        Upstream::Local(accepted) => Box::pin(accepted.splice(&mut client, shared)).await,
    };
    match &result {
        Ok((received, sent)) => {
            debug!(direction = "outbound", pod = %pod.name, orig_dst = %dst, received, sent, "connection closed")
        }
        Err(e) => {
            debug!(direction = "outbound", pod = %pod.name, orig_dst = %dst, "connection ended with an error: {e}")
        }
    }
    closing.closed(shared, result);
}

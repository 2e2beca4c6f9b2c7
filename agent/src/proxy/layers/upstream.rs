//! Upstream (innermost): one try. An endpoint of the target the route chose, picked by the
//! balancer; a connection to it in the request's HTTP version (through HBONE for mesh
//! endpoints); the request; the outcome fed to outlier detection. Upstream connections belong to
//! one downstream connection: an HTTP/1.1 one is taken while it carries a request, an HTTP/2 one
//! is shared.
use std::{collections::HashMap, net::SocketAddr, sync::Arc, time::Duration};

use anyhow::{Result, bail};
use hyper::{StatusCode, Version, header::HeaderValue, upgrade::OnUpgrade};
use hyper_util::rt::TokioIo;
use tokio::sync::Mutex;
use tracing::warn;

use super::{Failure, Req, Resp, local, outcome};
use crate::{
    proxy::{
        PodCtx, Shared, connect, hbone,
        http::{self, Body, Sender},
        local::{self as same_node, Local},
    },
    state::{Route, Target},
};

/// A deadline for one try (`perTryTimeout`, or the mirror's), in the request's extensions.
#[derive(Clone, Copy)]
pub struct PerTryTimeout(pub Duration);

/// An upstream connection and how many requests it has carried.
struct Pooled {
    sender: Sender<Body>,
    used: u32,
}

type Conns = Arc<Mutex<HashMap<(SocketAddr, Version), Pooled>>>;

#[derive(Clone)]
pub struct Upstream {
    pod: Arc<PodCtx>,
    shared: Arc<Shared>,
    conns: Conns,
}

impl Upstream {
    pub fn new(pod: Arc<PodCtx>, shared: Arc<Shared>) -> Self {
        Self {
            pod,
            shared,
            conns: Conns::default(),
        }
    }

    /// One try of `req`.
    pub async fn send(self, mut req: Req) -> Resp {
        let Some(target) = req.extensions().get::<Arc<Target>>().cloned() else {
            return local(
                StatusCode::SERVICE_UNAVAILABLE,
                "no healthy upstream\n",
                "UH",
            );
        };
        let per_try = req.extensions().get::<PerTryTimeout>().map(|t| t.0);
        let downstream_upgrade = req.extensions_mut().remove::<OnUpgrade>();
        let balancer = &self.shared.balancer;
        let candidate = balancer.choose(&target, req.headers()).clone();
        let _in_flight = balancer.start(candidate.addr);
        let route = candidate.route(&target.service);
        let max_requests = target
            .traffic
            .pool
            .map_or(0, |l| l.max_requests_per_connection);
        let attempt = self.try_once(req, route, max_requests);
        let result = match per_try {
            Some(t) => tokio::time::timeout(t, attempt)
                .await
                .unwrap_or_else(|_| Err((Failure::PerTryTimeout, "per-try timeout".into()))),
            None => attempt.await,
        };
        let failed = result
            .as_ref()
            .map_or(true, |r| r.status().is_server_error());
        balancer.record(candidate.addr, target.traffic.outlier, failed);
        match result {
            Ok(mut resp) => {
                if let Some(upgrade) = downstream_upgrade {
                    http::pass_upgrade(upgrade, &mut resp);
                }
                let outcome = outcome(&mut resp);
                outcome.destination = Some(candidate.workload);
                outcome.upstream = Some(candidate.addr);
                resp
            }
            Err((failure, e)) => {
                warn!(pod = %self.pod.name, cluster = target.cluster, "HTTP request failed: {e}");
                let mut resp = match failure {
                    Failure::PerTryTimeout => local(
                        StatusCode::GATEWAY_TIMEOUT,
                        "upstream request timeout\n",
                        "UT",
                    ),
                    _ => local(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "upstream connect error\n",
                        "UF",
                    ),
                };
                let outcome = outcome(&mut resp);
                outcome.failure = Some(failure);
                outcome.upstream = Some(candidate.addr);
                resp
            }
        }
    }

    async fn try_once(
        &self,
        req: Req,
        route: Route,
        max_requests: u32,
    ) -> Result<Resp, (Failure, String)> {
        if req.version() == Version::HTTP_2
            && let Route::Hbone {
                hbone,
                target,
                identity,
                ..
            } = &route
            && let Some(sender) =
                hbone::direct(&self.shared, &self.pod, *hbone, *target, identity).await
        {
            return self
                .send_direct(sender, req, (*hbone, *target, identity))
                .await;
        }
        let (key, mut pooled) = self
            .connection(route, req.version(), max_requests)
            .await
            .map_err(|e| (Failure::Connect, format!("connect failure: {e:#}")))?;
        pooled
            .sender
            .ready()
            .await
            .map_err(|e| (Failure::Connect, format!("connect failure: {}", causes(e))))?;
        let resp = pooled.sender.send(req).await;
        // An HTTP/1.1 connection goes back for the next request unless it is done or used up.
        let spent = max_requests > 0 && pooled.used >= max_requests;
        if matches!(pooled.sender, Sender::Http1(_)) && !pooled.sender.is_closed() && !spent {
            self.conns.lock().await.insert(key, pooled);
        }
        resp.map(|r| r.map(http::boxed))
            .map_err(|e| (Failure::Reset, format!("reset: {}", causes(e))))
    }

    /// Sends an HTTP/2 request straight on the pooled HBONE connection (`hbone::DIRECT`) to
    /// the agent at `hbone`, for `target`.
    async fn send_direct(
        &self,
        sender: hbone::Sender,
        mut req: Req,
        (hbone, target, identity): (SocketAddr, SocketAddr, &str),
    ) -> Result<Resp, (Failure, String)> {
        let value = HeaderValue::from_str(&target.to_string()).expect("an address is a header");
        req.headers_mut().insert(&hbone::DIRECT, value);
        let resp = sender
            .send(req)
            .await
            .map_err(|e| (Failure::Reset, format!("reset: {e}")))?;
        if resp.status() == StatusCode::MISDIRECTED_REQUEST
            && resp.headers().contains_key(&hbone::DIRECT)
        {
            // Its port is no longer served that way (a config change there): tunnel from now on.
            hbone::forget_direct(&self.shared, &self.pod, hbone, target, identity).await;
            return Err((
                Failure::Connect,
                format!("{hbone} no longer takes requests for {target} directly"),
            ));
        }
        Ok(resp)
    }

    /// A connection to the endpoint `route` chose, in `version`: an idle (HTTP/1.1) or shared
    /// (HTTP/2) one, or a new one. Counts the request against it; a shared one used up by
    /// `maxRequestsPerConnection` (`max_requests`, 0 for no limit) is not shared again.
    async fn connection(
        &self,
        route: Route,
        version: Version,
        max_requests: u32,
    ) -> Result<((SocketAddr, Version), Pooled)> {
        let target = match &route {
            Route::Hbone { target, .. } => *target,
            Route::Passthrough { addr, .. } => *addr,
            Route::NoEndpoints { service } => bail!("{service} has no endpoint"),
            Route::Resolve { service, .. } => {
                bail!("{service} is resolved by DNS, not routed per request")
            }
        };
        let key = (target, version);
        {
            let mut conns = self.conns.lock().await;
            if let Some(p) = conns.get_mut(&key)
                && !p.sender.is_closed()
                && let Some(sender) = p.sender.share()
            {
                p.used += 1;
                let used = p.used;
                if max_requests > 0 && used >= max_requests {
                    conns.remove(&key);
                }
                return Ok((key, Pooled { sender, used }));
            }
            if let Some(mut p) = conns.remove(&key)
                && p.sender.is_ready()
            {
                p.used += 1;
                return Ok((key, p));
            }
        }
        let (pod, shared) = (&self.pod, &self.shared);
        let sender = match route {
            Route::Hbone {
                hbone,
                target,
                identity,
                ..
            } => {
                // A pod this agent serves too is reached without HBONE (`proxy::local`).
                let near = match same_node::serves(shared, pod, hbone, &identity) {
                    Some(dest) => same_node::http(shared, pod, dest, target).await,
                    None => Local::Remote,
                };
                match near {
                    Local::Open(pipe) => Sender::handshake(TokioIo::new(pipe), version).await?,
                    Local::Refused(why) => bail!(why),
                    Local::Remote => {
                        let tunnel = hbone::open(shared, pod, hbone, target, &identity).await?;
                        Sender::handshake(TokioIo::new(tunnel), version).await?
                    }
                }
            }
            _ => {
                let tcp = connect(pod.socket_for(target)?, target).await?;
                Sender::handshake(TokioIo::new(tcp), version).await?
            }
        };
        let pooled = Pooled { sender, used: 1 };
        if let Some(sender) = pooled.sender.share() {
            self.conns
                .lock()
                .await
                .insert(key, Pooled { sender, used: 1 });
        }
        Ok((key, pooled))
    }
}

/// hyper's error with its causes: its own text alone says only which step failed.
fn causes(e: hyper::Error) -> String {
    format!("{:#}", anyhow::Error::new(e))
}

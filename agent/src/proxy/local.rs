//! Same-node mesh streams. When a pod connects to a plain TCP port of another pod this agent
//! serves, the agent holds both ends' certificates: a TLS handshake and HTTP/2 framing between
//! two of its own sockets would prove nothing it does not know already. So the stream is decided
//! exactly as an HBONE CONNECT from that pod would be (the caller's SPIFFE ID before the
//! destination's AuthorizationPolicies, its connection budget, both reporters' metrics and
//! access-log records with the same labels), then the client is spliced straight to the app.
//! Connections to such a pod's HTTP port ([`http`]: an HTTP service's, or one to the port by
//! the pod's address) reach the destination's inbound HTTP proxy through an in-memory pipe
//! instead of a tunnel. Gateway ports still go through HBONE.
use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{Arc, RwLock},
};

use tokio::{io::DuplexStream, net::TcpStream};
use tracing::{debug, info, warn};
use trellis_common::HBONE_PORT;

use super::{
    Metered, PodCtx, Shared,
    authorize::{self, Caller},
    conn_log::{Closing, ConnLog},
    guard::Admission,
    inbound::{self, Refused},
};
use crate::metrics::TcpLabels;

/// This agent's pods that serve HBONE, by address; entries come and go with their pod's proxy.
#[derive(Default)]
pub struct LocalPods(RwLock<HashMap<IpAddr, Arc<PodCtx>>>);

impl LocalPods {
    pub fn add(&self, pod: &Arc<PodCtx>) {
        let mut pods = self.0.write().unwrap_or_else(|p| p.into_inner());
        for ip in &pod.ips {
            pods.insert(*ip, pod.clone());
        }
    }

    /// Forgets `pod`'s addresses, unless a newer pod already holds one.
    pub fn remove(&self, pod: &Arc<PodCtx>) {
        let mut pods = self.0.write().unwrap_or_else(|p| p.into_inner());
        pods.retain(|_, p| !Arc::ptr_eq(p, pod));
    }

    fn get(&self, ip: IpAddr) -> Option<Arc<PodCtx>> {
        let pods = self.0.read().unwrap_or_else(|p| p.into_inner());
        pods.get(&ip).cloned()
    }
}

/// What a same-node stream came to.
pub enum Local<T> {
    /// Not a pod on this node, or a port it serves otherwise: the caller goes through HBONE.
    Remote,
    /// Refused as the HBONE CONNECT would have been; why.
    Refused(String),
    Open(T),
}

impl<T> Local<T> {
    fn map<U>(self, f: impl FnOnce(T) -> U) -> Local<U> {
        match self {
            Local::Remote => Local::Remote,
            Local::Refused(why) => Local::Refused(why),
            Local::Open(t) => Local::Open(f(t)),
        }
    }
}

/// How the source side reaches a destination this agent serves.
pub enum Near {
    /// A plain TCP port: the client is spliced to the app.
    Splice(Box<Accepted>),
    /// An HTTP port: a pipe to the destination's inbound HTTP proxy ([`http`]).
    Pipe(DuplexStream),
}

/// A stream the destination's side has accepted, with its app connection open.
pub struct Accepted {
    pod: Arc<PodCtx>,
    peer: SocketAddr,
    target: SocketAddr,
    app: TcpStream,
    /// Taken when the splice starts, so the open stream keeps them once.
    labels: Option<Box<TcpLabels>>,
    caller: Option<Caller>,
    /// Held until the stream ends, as the HBONE stream's is.
    _admission: Admission,
}

/// The pod at `hbone` if this agent serves it as `identity` and a stream from `source` to it
/// can skip HBONE. Anything HBONE would refuse before its CONNECT (no certificate yet at either
/// end, another identity than control expects) goes that way, to be refused there as always.
/// Cheap and synchronous: every mesh connection asks.
pub fn serves(
    shared: &Shared,
    source: &PodCtx,
    hbone: SocketAddr,
    identity: &str,
) -> Option<Arc<PodCtx>> {
    if hbone.port() != HBONE_PORT {
        return None;
    }
    let pod = shared.local.get(hbone.ip())?;
    let client_id = source.identity.as_deref()?;
    (pod.identity.as_deref() == Some(identity)
        && shared.tls.get(identity).is_some()
        && shared.tls.get(client_id).is_some())
    .then_some(pod)
}

/// A stream the destination's side took, as it would take an HBONE CONNECT, with its app
/// connection open.
struct Taken {
    peer: SocketAddr,
    /// To an HTTP port of the pod's own, which its inbound HTTP proxy serves.
    http: bool,
    labels: TcpLabels,
    caller: Caller,
    admission: Admission,
    app: TcpStream,
}

/// Takes a stream from `source` (port `client_port`) to `target` in `pod` as the HBONE server
/// would take its CONNECT: a plain TCP port (unless `only_http`) or an HTTP port of the pod's
/// own; anything else is left to HBONE.
async fn take(
    shared: &Shared,
    source: &PodCtx,
    pod: &PodCtx,
    client_port: u16,
    target: SocketAddr,
    only_http: bool,
) -> Local<Taken> {
    let Some(client_id) = source.identity.as_deref() else {
        return Local::Remote;
    };
    // Where an HBONE connection from the source pod would come from: its own address (the
    // captured client socket is on loopback), which the destination checks against the identity.
    let Some(ip) = source
        .ips
        .iter()
        .find(|ip| ip.is_ipv4() == target.is_ipv4())
    else {
        return Local::Remote;
    };
    let peer = SocketAddr::new(*ip, client_port);
    match inbound::check_target(target, &pod.ips) {
        Ok(_) => {}
        Err(Refused::NotThisPod(_)) => return Local::Remote,
        Err(refused) => return Local::Refused(format!("refused with {}", refused.status())),
    }
    let stream = inbound::stream(shared, pod, peer, client_id, target);
    if (only_http && !stream.http) || stream.gateway.is_some() || stream.l7.is_some() {
        return Local::Remote;
    }
    let admission = match shared.limits.admit(&pod.budget) {
        Ok(a) => a,
        Err(limit) => {
            if let Some(suppressed) = shared.fail(limit) {
                warn!(pod = %pod.name, client_identity = client_id, %target, suppressed, reason = ?limit, "local stream refused: limit reached");
            }
            return Local::Refused(format!("{}'s connection limit reached", pod.name));
        }
    };
    // An HTTP port's policies decide each request there, as over an HBONE tunnel.
    if !stream.http
        && let Err(policy) =
            authorize::connection(shared, pod, &stream.caller, target.port(), &stream.labels)
    {
        debug!(pod = %pod.name, client_identity = client_id, %target, policy, "local stream refused");
        return Local::Refused(format!("an AuthorizationPolicy ({policy}) denies it"));
    }
    if stream.http {
        info!(direction = "inbound", pod = %pod.name, client = %peer, client_identity = client_id, orig_dst = %target, "local HTTP stream");
    } else {
        info!(direction = "inbound", pod = %pod.name, client = %peer, client_identity = client_id, orig_dst = %target, "local stream");
    }
    match inbound::to_app(pod, target).await {
        Ok(app) => Local::Open(Taken {
            peer,
            http: stream.http,
            labels: stream.labels,
            caller: stream.caller,
            admission,
            app,
        }),
        Err(e) => {
            warn!(pod = %pod.name, %target, "connecting to the app: {e}");
            Local::Refused(format!("connecting to the app: {e}"))
        }
    }
}

/// A stream from `source` (its client socket's port `client_port`) to `target`, a port of
/// `pod` (from [`serves`]).
pub async fn open(
    shared: &Arc<Shared>,
    source: &PodCtx,
    pod: Arc<PodCtx>,
    client_port: u16,
    target: SocketAddr,
) -> Local<Near> {
    take(shared, source, &pod, client_port, target, false)
        .await
        .map(|taken| {
            if taken.http {
                return Near::Pipe(pipe(shared, pod, target, taken));
            }
            Near::Splice(Box::new(Accepted {
                pod,
                peer: taken.peer,
                target,
                app: taken.app,
                labels: Some(Box::new(taken.labels)),
                caller: Some(taken.caller),
                _admission: taken.admission,
            }))
        })
}

/// An HTTP connection from `source`'s L7 client to `target`, an HTTP port of `pod` (from
/// [`serves`]): a [`pipe`] to the destination's inbound HTTP proxy.
pub async fn http(
    shared: &Arc<Shared>,
    source: &PodCtx,
    pod: Arc<PodCtx>,
    target: SocketAddr,
) -> Local<DuplexStream> {
    // No client socket: port 0 says so in the destination's logs.
    take(shared, source, &pod, 0, target, true)
        .await
        .map(|taken| pipe(shared, pod, target, taken))
}

/// One end of an in-memory pipe whose other end the destination's inbound HTTP proxy serves,
/// exactly as it serves an HBONE stream to that port (each request decided by the pod's
/// policies, the caller's identity given to the app, both reporters' metrics). No TLS, no
/// HTTP/2 framing of a tunnel, no sockets between the two.
fn pipe(shared: &Arc<Shared>, pod: Arc<PodCtx>, target: SocketAddr, taken: Taken) -> DuplexStream {
    let (near, far) = tokio::io::duplex(PIPE);
    let shared = shared.clone();
    tokio::spawn(async move {
        let Taken {
            peer,
            labels,
            caller,
            admission,
            app,
            ..
        } = taken;
        let far = Metered::new(far, shared.metrics.opened(&labels));
        inbound::serve_http(far, app, pod, target, peer, caller, &labels, &shared).await;
        drop(admission);
    });
    near
}

/// Each way of a same-node HTTP pipe holds up to this much before its writer waits, as a socket
/// buffer would.
const PIPE: usize = 64 * 1024;

impl Accepted {
    /// Splices `client` (already counted for the source side) to the app until both close, or
    /// until the destination's policies deny it; counted and logged for the destination side
    /// as an HBONE stream is. (bytes from the client, bytes to it), or why it ended. By
    /// reference: the source side's task then holds its upstream once, whichever kind it is.
    pub async fn splice(
        &mut self,
        client: &mut Metered<TcpStream>,
        shared: &Shared,
    ) -> Result<(u64, u64), String> {
        let (Some(labels), Some(caller)) = (self.labels.take(), self.caller.take()) else {
            return Err("spliced twice".into());
        };
        let log = ConnLog::start(shared, "inbound", self.peer, self.target);
        let mut client = Metered::new(client, shared.metrics.opened(&labels));
        let closing = Closing::new(shared, labels, log);
        let result = inbound::guarded_splice(
            &mut client,
            &mut self.app,
            &self.pod,
            shared,
            caller,
            self.target,
        )
        .await;
        closing.closed(shared, result.clone());
        result
    }
}

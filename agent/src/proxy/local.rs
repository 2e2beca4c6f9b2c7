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

/// What the destination's side knows of a stream it took, as it would of an HBONE CONNECT.
struct Taken {
    client_id: String,
    peer: SocketAddr,
    labels: TcpLabels,
    caller: Caller,
    admission: Admission,
}

/// Takes a stream from `source` (port `client_port`) to `target` in `pod` as the HBONE server
/// would take its CONNECT, if `target` is a plain TCP port (`http` false) or an HTTP port of the
/// pod's own (`http` true); anything else is left to HBONE.
fn take(
    shared: &Shared,
    source: &PodCtx,
    pod: &PodCtx,
    client_port: u16,
    target: SocketAddr,
    http: bool,
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
    if stream.http != http || stream.gateway.is_some() || stream.l7.is_some() {
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
    Local::Open(Taken {
        client_id: client_id.to_owned(),
        peer,
        labels: stream.labels,
        caller: stream.caller,
        admission,
    })
}

/// A stream from `source` (its client socket's port `client_port`) to `target`, a plain TCP
/// port of `pod` (from [`serves`]).
pub async fn open(
    shared: &Shared,
    source: &PodCtx,
    pod: Arc<PodCtx>,
    client_port: u16,
    target: SocketAddr,
) -> Local<Box<Accepted>> {
    let taken = match take(shared, source, &pod, client_port, target, false) {
        Local::Open(taken) => taken,
        Local::Remote => return Local::Remote,
        Local::Refused(why) => return Local::Refused(why),
    };
    let client_id = &taken.client_id;
    if let Err(policy) =
        authorize::connection(shared, &pod, &taken.caller, target.port(), &taken.labels)
    {
        debug!(pod = %pod.name, client_identity = client_id, %target, policy, "local stream refused");
        return Local::Refused(format!("an AuthorizationPolicy ({policy}) denies it"));
    }
    info!(direction = "inbound", pod = %pod.name, client = %taken.peer, client_identity = client_id, orig_dst = %target, "local stream");
    let app = match inbound::to_app(&pod, target).await {
        Ok(app) => app,
        Err(e) => {
            warn!(pod = %pod.name, %target, "connecting to the app: {e}");
            return Local::Refused(format!("connecting to the app: {e}"));
        }
    };
    Local::Open(Box::new(Accepted {
        pod,
        peer: taken.peer,
        target,
        app,
        labels: Some(Box::new(taken.labels)),
        caller: Some(taken.caller),
        _admission: taken.admission,
    }))
}

/// An HTTP connection from `source` to `target`, an HTTP port of `pod` (from [`serves`]): one
/// end of an in-memory pipe whose other end the destination's inbound HTTP proxy serves,
/// exactly as it serves an HBONE stream to that port (each request decided by the pod's
/// policies, the caller's identity given to the app, both reporters' metrics). No TLS, no
/// HTTP/2 framing of a tunnel, no sockets between the two. `client_port` is the captured
/// client socket's, or 0 for the L7 client's own connection (there is no socket).
pub async fn http(
    shared: &Arc<Shared>,
    source: &PodCtx,
    pod: Arc<PodCtx>,
    client_port: u16,
    target: SocketAddr,
) -> Local<DuplexStream> {
    let taken = match take(shared, source, &pod, client_port, target, true) {
        Local::Open(taken) => taken,
        Local::Remote => return Local::Remote,
        Local::Refused(why) => return Local::Refused(why),
    };
    info!(direction = "inbound", pod = %pod.name, client = %taken.peer, client_identity = taken.client_id, orig_dst = %target, "local HTTP stream");
    let app = match inbound::to_app(&pod, target).await {
        Ok(app) => app,
        Err(e) => {
            warn!(pod = %pod.name, %target, "connecting to the app: {e}");
            return Local::Refused(format!("connecting to the app: {e}"));
        }
    };
    let (near, far) = tokio::io::duplex(PIPE);
    let shared = shared.clone();
    tokio::spawn(async move {
        let Taken {
            peer,
            labels,
            caller,
            admission,
            ..
        } = taken;
        let far = Metered::new(far, shared.metrics.opened(&labels));
        inbound::serve_http(far, app, pod, target, peer, caller, &labels, &shared).await;
        drop(admission);
    });
    Local::Open(near)
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

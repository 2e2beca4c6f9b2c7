//! The `trellis.v1.MeshControl` gRPC service: per-node config streams, acknowledgements, and
//! certificate signing.
use std::{
    collections::BTreeMap,
    pin::Pin,
    sync::{Arc, Mutex},
};

use serde::Serialize;
use tokio::sync::{mpsc, watch};
use tokio_stream::{Stream, wrappers::ReceiverStream};
use tonic::{Request, Response, Status};
use tracing::{error, info, warn};
use trellis_api::{self as api, mesh_control_server::MeshControl};

use prost::Message as _;

use crate::{
    auth::Authenticator,
    ca::{Ca, SignError},
    chunks::{self, Oversized},
    compile::{self, Compiled},
    held::Held,
    metrics::Metrics,
    model::Cluster,
};

/// What control knows about each node's agent.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct NodeStatus {
    /// The last version sent to the node.
    pub sent: u64,
    /// The last version the node accepted.
    pub accepted: Option<u64>,
    /// The last rejection: (version, reason).
    pub rejected: Option<(u64, String)>,
    /// Streams open now.
    pub streams: u32,
}

/// Shared by every request: the model, the CA, who may call, and per-node bookkeeping.
pub struct ControlState {
    pub model: watch::Receiver<Arc<Cluster>>,
    /// False until the source has read the cluster once; nothing is served before.
    ready: watch::Receiver<bool>,
    /// The model compiled for every node (`compile::follow`); None before it is ready.
    compiled: watch::Receiver<Option<Arc<Compiled>>>,
    pub ca: Ca,
    pub auth: Authenticator,
    /// Mesh-wide settings every node's config is compiled with.
    pub mesh: compile::Mesh,
    metrics: Arc<Metrics>,
    nodes: Mutex<BTreeMap<String, NodeStatus>>,
}

impl ControlState {
    pub fn new(
        model: watch::Receiver<Arc<Cluster>>,
        ready: watch::Receiver<bool>,
        compiled: watch::Receiver<Option<Arc<Compiled>>>,
        ca: Ca,
        auth: Authenticator,
        mesh: compile::Mesh,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        Arc::new(Self {
            model,
            ready,
            compiled,
            ca,
            auth,
            mesh,
            metrics,
            nodes: Mutex::new(BTreeMap::new()),
        })
    }

    pub fn nodes(&self) -> BTreeMap<String, NodeStatus> {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, NodeStatus>> {
        self.nodes.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn next_version(&self, node: &str) -> u64 {
        let mut nodes = self.lock();
        let st = nodes.entry(node.to_owned()).or_default();
        st.sent += 1;
        self.metrics.set_version_sent(node, st.sent);
        st.sent
    }

    fn streams(&self, node: &str, delta: i32) {
        let mut nodes = self.lock();
        let st = nodes.entry(node.to_owned()).or_default();
        st.streams = st.streams.saturating_add_signed(delta);
        self.metrics.set_streams(node, st.streams);
    }

    /// Authenticates the caller and checks it may act for `node`.
    async fn authorize<T>(&self, req: &Request<T>, node: &str) -> Result<(), Status> {
        if node.is_empty() {
            return Err(Status::invalid_argument("node: required"));
        }
        self.auth.check(req.metadata(), node).await
    }
}

pub struct MeshControlService(pub Arc<ControlState>);

type UpdateStream = Pin<Box<dyn Stream<Item = Result<api::ConfigUpdate, Status>> + Send>>;

#[tonic::async_trait]
impl MeshControl for MeshControlService {
    type SubscribeStream = UpdateStream;

    async fn subscribe(
        &self,
        req: Request<api::SubscribeRequest>,
    ) -> Result<Response<UpdateStream>, Status> {
        let node = req.get_ref().node.clone();
        self.0.authorize(&req, &node).await?;
        // One message waiting: with hundreds of nodes, buffered messages are most of the memory.
        let (tx, rx) = mpsc::channel(1);
        let state = self.0.clone();
        info!(node, "agent subscribed");
        tokio::spawn(async move {
            state.streams(&node, 1);
            stream_updates(&state, &node, tx).await;
            state.streams(&node, -1);
            info!(node, "agent stream closed");
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn ack(
        &self,
        req: Request<api::AckRequest>,
    ) -> Result<Response<api::AckResponse>, Status> {
        let ack = req.get_ref().clone();
        self.0.authorize(&req, &ack.node).await?;
        let mut nodes = self.0.lock();
        let st = nodes.entry(ack.node.clone()).or_default();
        if ack.version > st.sent {
            return Err(Status::invalid_argument(format!(
                "version {} was never sent to {}",
                ack.version, ack.node
            )));
        }
        if ack.error.is_empty() {
            let accepted = st.accepted.map_or(ack.version, |v| v.max(ack.version));
            st.accepted = Some(accepted);
            self.0.metrics.set_version_accepted(&ack.node, accepted);
        } else {
            warn!(
                node = ack.node,
                version = ack.version,
                "agent rejected config: {}",
                ack.error
            );
            st.rejected = Some((ack.version, ack.error));
        }
        Ok(Response::new(api::AckResponse {}))
    }

    async fn sign(
        &self,
        req: Request<api::SignRequest>,
    ) -> Result<Response<api::SignResponse>, Status> {
        let node = req.get_ref().node.clone();
        self.0.authorize(&req, &node).await?;
        if !*self.0.ready.borrow() {
            return Err(Status::unavailable(
                "control has not read the cluster yet; retry shortly",
            ));
        }
        let cluster = self.0.model.borrow().clone();
        let chain = self
            .0
            .ca
            .sign_workload(&req.get_ref().csr_pem, &node, |ns, sa| {
                cluster.pods.values().any(|p| {
                    p.node == node
                        && p.namespace == ns
                        && p.service_account == sa
                        && p.running
                        && cluster.in_mesh(p)
                })
            });
        match chain {
            Ok(cert_chain_pem) => Ok(Response::new(api::SignResponse {
                cert_chain_pem,
                root_pem: self.0.ca.root_pem().to_owned(),
            })),
            Err(e @ SignError::NotOnNode { .. }) => Err(Status::permission_denied(e.to_string())),
            Err(e @ SignError::Internal(_)) => Err(Status::internal(e.to_string())),
            Err(e) => Err(Status::invalid_argument(e.to_string())),
        }
    }
}

/// Sends a snapshot, then an update whenever the node's compiled config changes; each update
/// split into messages of about `chunks::CHUNK_BYTES`.
async fn stream_updates(
    state: &ControlState,
    node: &str,
    tx: mpsc::Sender<Result<api::ConfigUpdate, Status>>,
) {
    let mut compiled = state.compiled.clone();
    let mut held: Option<Held> = None;
    let mut reported: Vec<Oversized> = Vec::new();
    loop {
        // None until the source has read the whole cluster: nothing is sent before.
        let current = compiled.borrow_and_update().clone();
        if let Some(current) = current
            && !send(state, node, &tx, &current, &mut held, &mut reported).await
        {
            return; // the agent went away
        }
        tokio::select! {
            changed = compiled.changed() => if changed.is_err() { return },
            () = tx.closed() => return,
        }
    }
}

/// Sends `node` what changed from what it holds (`held`) to `compiled`: a snapshot the first
/// time, read from the compile as it is sent. False when the agent went away.
async fn send(
    state: &ControlState,
    node: &str,
    tx: &mpsc::Sender<Result<api::ConfigUpdate, Status>>,
    compiled: &Arc<Compiled>,
    held: &mut Option<Held>,
    reported: &mut Vec<Oversized>,
) -> bool {
    let max = chunks::MAX_RESOURCE_BYTES;
    let mut oversized = Vec::new();
    let snapshot = held.is_none();
    // What changed, with each upsert's encoded size; those no message can carry are withheld.
    let (upserts, removals) = match &*held {
        None => (Vec::new(), Vec::new()),
        Some(h) => {
            let (upserts, removals) = h.changes(node, compiled);
            let upserts: Vec<_> = upserts
                .into_iter()
                .filter_map(|(k, r)| Some((chunks::fits(&k, &r, max, &mut oversized)?, r)))
                .collect();
            (upserts, removals)
        }
    };
    if snapshot || !upserts.is_empty() || !removals.is_empty() {
        let header = api::ConfigUpdate {
            version: state.next_version(node),
            snapshot,
            trust_domain: state.mesh.trust_domain.clone(),
            root_namespace: state.mesh.root_namespace.clone(),
            ..Default::default()
        };
        let mut chunker = chunks::Chunker::new(header, chunks::CHUNK_BYTES);
        for key in removals {
            if let Some(full) = chunker.remove(key)
                && !deliver(state, node, tx, full).await
            {
                return false;
            }
        }
        let snapshot_items = snapshot
            .then(|| compiled.resources(node))
            .into_iter()
            .flatten()
            .filter_map(|(k, r)| Some((chunks::fits(&k, r, max, &mut oversized)?, r)));
        let changed = upserts.iter().map(|(bytes, r)| (*bytes, r));
        for (bytes, r) in snapshot_items.chain(changed) {
            if let Some(full) = chunker.upsert(r, bytes)
                && !deliver(state, node, tx, full).await
            {
                return false;
            }
        }
        if !deliver(state, node, tx, chunker.finish()).await {
            return false;
        }
        if snapshot {
            crate::memory::release_freed();
        }
    }
    // The node keeps the version it has, if any; every change tries it again.
    let kept = oversized
        .iter()
        .map(|o| {
            let has = held.as_ref().and_then(|h| h.get(node, &o.key));
            (o.key.clone(), has)
        })
        .collect();
    if oversized != *reported {
        report_oversized(state, node, &oversized);
        *reported = oversized;
    }
    *held = Some(Held::new(compiled.clone(), kept));
    true
}

/// Sends one message. False when the agent went away.
async fn deliver(
    state: &ControlState,
    node: &str,
    tx: &mpsc::Sender<Result<api::ConfigUpdate, Status>>,
    msg: api::ConfigUpdate,
) -> bool {
    state.metrics.message_sent(node, msg.encoded_len());
    tx.send(Ok(msg)).await.is_ok()
}

fn report_oversized(state: &ControlState, node: &str, oversized: &[Oversized]) {
    state.metrics.set_undeliverable(node, oversized.len());
    for o in oversized {
        let kind = match api::Kind::try_from(o.key.0) {
            Ok(api::Kind::Workload) => "workload",
            Ok(api::Kind::Peer) => "peer",
            Ok(api::Kind::Service) => "service",
            Ok(api::Kind::Policy) => "policy",
            _ => "resource",
        };
        error!(
            node,
            resource = format!("{kind} {}", o.key.1),
            bytes = o.bytes,
            limit = chunks::MAX_RESOURCE_BYTES,
            "resource too large to send to the node; it keeps the version it has, if any"
        );
    }
}

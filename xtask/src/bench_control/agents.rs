//! Simulated agents: one gRPC/TLS subscriber per node in this process, each doing what the
//! agent's config client does (agent/src/config.rs): gather an update's messages until `more`
//! is unset, apply it to the resources it holds (a snapshot replaces them), then Ack its version.
//! After each Ack returns, an agent reports the update's size and whether it now holds what the
//! change under measurement should have produced.
use std::{collections::BTreeMap, time::Duration};

use anyhow::{Context as _, Result, bail};
use prost::Message as _;
use tokio::{
    sync::{mpsc, watch},
    time::Instant,
};
use tonic::{
    Request,
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint},
};
use trellis_api::{self as api, mesh_control_client::MeshControlClient, resource::Resource};

/// What one node should hold once a change has reached it.
#[derive(Clone, Debug)]
pub enum Expect {
    /// Service `<namespace>/<name>` has (or no longer has) the endpoint named `pod`.
    Endpoint {
        service: String,
        pod: String,
        present: bool,
    },
    /// Service `<namespace>/<name>`'s weighted route sends `weight` to its first destination.
    Weight { service: String, weight: u32 },
}

impl Expect {
    fn holds(&self, resources: &BTreeMap<(i32, String), api::Resource>) -> bool {
        let service = |name: &str| match resources
            .get(&(api::Kind::Service as i32, name.to_owned()))
            .and_then(|r| r.resource.as_ref())
        {
            Some(Resource::Service(s)) => Some(s.clone()),
            _ => None,
        };
        match self {
            Expect::Endpoint {
                service: name,
                pod,
                present,
            } => service(name)
                .is_some_and(|s| s.endpoints.iter().any(|e| &e.pod_name == pod) == *present),
            Expect::Weight {
                service: name,
                weight,
            } => service(name).is_some_and(|s| {
                s.ports
                    .iter()
                    .flat_map(|p| &p.http_routes)
                    .any(|r| r.destinations.len() == 2 && r.destinations[0].weight == *weight)
            }),
        }
    }
}

/// One applied and acknowledged update.
#[derive(Debug)]
pub struct Applied {
    pub agent: usize,
    pub snapshot: bool,
    /// Resources held after applying it.
    pub resources: usize,
    /// Encoded bytes of the update's messages, as control counts them.
    pub bytes: usize,
    /// When its Ack returned.
    pub acked: Instant,
    /// The id of the change being measured, if this agent now holds its result.
    pub holds: Option<usize>,
}

pub struct Credentials {
    pub url: String,
    pub ca_pem: String,
    /// A name in control's certificate.
    pub server_name: String,
    /// Each agent's bearer token, by node index.
    pub tokens: Vec<String>,
}

/// Starts one agent per node; they connect (retrying until `connect_within`) and keep
/// reporting until the receiver is dropped. An agent that fails reports the error instead.
pub fn start(
    creds: Credentials,
    nodes: Vec<String>,
    expect: watch::Receiver<Option<(usize, Expect)>>,
    connect_within: Duration,
) -> mpsc::UnboundedReceiver<Result<Applied>> {
    let (tx, rx) = mpsc::unbounded_channel();
    let creds = std::sync::Arc::new(creds);
    for (agent, node) in nodes.into_iter().enumerate() {
        let (tx, creds, expect) = (tx.clone(), creds.clone(), expect.clone());
        tokio::spawn(async move {
            let result = run(agent, &node, &creds, expect, connect_within, &tx).await;
            let _ = tx.send(Err(result
                .err()
                .unwrap_or_else(|| anyhow::anyhow!("control closed the stream"))
                .context(format!("agent for {node}"))));
        });
    }
    rx
}

async fn connect(creds: &Credentials, within: Duration) -> Result<Channel> {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&creds.ca_pem))
        .domain_name(creds.server_name.clone());
    let endpoint = Endpoint::from_shared(creds.url.clone())?
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(5));
    let deadline = Instant::now() + within;
    loop {
        match endpoint.connect().await {
            Ok(channel) => return Ok(channel),
            Err(e) if Instant::now() > deadline => {
                return Err(e).with_context(|| format!("connecting to control at {}", creds.url));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

async fn run(
    agent: usize,
    node: &str,
    creds: &Credentials,
    expect: watch::Receiver<Option<(usize, Expect)>>,
    connect_within: Duration,
    tx: &mpsc::UnboundedSender<Result<Applied>>,
) -> Result<()> {
    let token = &creds.tokens[agent];
    let channel = connect(creds, connect_within).await?;
    let header: tonic::metadata::MetadataValue<_> = format!("Bearer {token}").parse()?;
    let mut client = MeshControlClient::with_interceptor(channel, move |mut req: Request<()>| {
        req.metadata_mut().insert("authorization", header.clone());
        Ok(req)
    })
    .max_decoding_message_size(api::MAX_MESSAGE_BYTES);
    let mut stream = client
        .subscribe(api::SubscribeRequest {
            node: node.to_owned(),
        })
        .await
        .context("subscribing")?
        .into_inner();
    let mut resources = BTreeMap::new();
    // The update being gathered, and the encoded bytes of its messages so far.
    let mut assembler = api::Assembler::default();
    let mut bytes = 0;
    while let Some(msg) = stream.message().await.context("reading the stream")? {
        bytes += msg.encoded_len();
        let Some(update) = assembler.push(msg)? else {
            continue;
        };
        if update.snapshot {
            resources.clear();
        }
        for key in update.removals {
            resources.remove(&(key.kind, key.name));
        }
        for r in update.upserts {
            resources.insert(key_of(&r)?, r);
        }
        client
            .ack(api::AckRequest {
                node: node.to_owned(),
                version: update.version,
                error: String::new(),
            })
            .await
            .with_context(|| format!("acknowledging version {}", update.version))?;
        let acked = Instant::now();
        let holds = match &*expect.borrow() {
            Some((id, e)) if e.holds(&resources) => Some(*id),
            _ => None,
        };
        let applied = Applied {
            agent,
            snapshot: update.snapshot,
            resources: resources.len(),
            bytes: std::mem::take(&mut bytes),
            acked,
            holds,
        };
        if tx.send(Ok(applied)).is_err() {
            return Ok(());
        }
    }
    Ok(())
}

fn key_of(r: &api::Resource) -> Result<(i32, String)> {
    Ok(match &r.resource {
        Some(Resource::Workload(w)) => (api::Kind::Workload as i32, w.uid.clone()),
        Some(Resource::Peer(w)) => (api::Kind::Peer as i32, w.uid.clone()),
        Some(Resource::Service(s)) => (
            api::Kind::Service as i32,
            format!("{}/{}", s.namespace, s.name),
        ),
        Some(Resource::Policy(p)) => (
            api::Kind::Policy as i32,
            format!("{}/{}/{}", p.kind, p.namespace, p.name),
        ),
        None => bail!("a resource with nothing in it"),
    })
}

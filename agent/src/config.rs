//! The agent's side of the control API: subscribe to this node's config, apply each update (or
//! reject it with a reason, keeping the last good state), acknowledge it, and reconnect with
//! backoff when control goes away.
use std::{collections::BTreeMap, net::IpAddr, path::PathBuf, time::Duration};

use anyhow::{Context as _, Result, bail};
use tonic::{
    Request, Status,
    service::{Interceptor, interceptor::InterceptedService},
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint},
};
use tracing::{info, warn};
use trellis_api::{self as api, mesh_control_client::MeshControlClient, resource::Resource};

/// How to reach control.
#[derive(Clone, Debug)]
pub struct ControlEndpoint {
    /// e.g. `https://127.0.0.1:15012`
    pub url: String,
    /// The mesh root that signed control's certificate.
    pub ca_file: PathBuf,
    /// Name to check control's certificate against.
    pub server_name: String,
    pub token_file: PathBuf,
}

#[derive(Clone)]
pub struct BearerToken(tonic::metadata::MetadataValue<tonic::metadata::Ascii>);

impl Interceptor for BearerToken {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        Ok(req)
    }
}

pub type Client = MeshControlClient<InterceptedService<Channel, BearerToken>>;

impl ControlEndpoint {
    pub async fn connect(&self) -> Result<Client> {
        let ca = std::fs::read_to_string(&self.ca_file)
            .with_context(|| format!("reading {}", self.ca_file.display()))?;
        let token = std::fs::read_to_string(&self.token_file)
            .with_context(|| format!("reading {}", self.token_file.display()))?;
        let header = format!("Bearer {}", token.trim())
            .parse()
            .context("the token is not a valid header value")?;
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(ca))
            .domain_name(self.server_name.clone());
        let channel = Endpoint::from_shared(self.url.clone())?
            .tls_config(tls)?
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await
            .with_context(|| format!("connecting to control at {}", self.url))?;
        Ok(
            MeshControlClient::with_interceptor(channel, BearerToken(header))
                .max_decoding_message_size(api::MAX_MESSAGE_BYTES)
                .max_encoding_message_size(api::MAX_MESSAGE_BYTES),
        )
    }
}

/// The node's config as last applied.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodeConfig {
    pub version: u64,
    pub trust_domain: String,
    /// Istio's root namespace, as control names it.
    pub root_namespace: String,
    pub resources: BTreeMap<(i32, String), api::Resource>,
}

impl NodeConfig {
    /// Applies an update, or says why it cannot (leaving `self` unchanged).
    pub fn apply(&mut self, update: &api::ConfigUpdate) -> Result<()> {
        let mut next = if update.snapshot {
            BTreeMap::new()
        } else {
            self.resources.clone()
        };
        for key in &update.removals {
            next.remove(&(key.kind, key.name.clone()));
        }
        for r in &update.upserts {
            next.insert(key_of(r)?, r.clone());
        }
        self.resources = next;
        self.version = update.version;
        self.trust_domain = update.trust_domain.clone();
        self.root_namespace = update.root_namespace.clone();
        Ok(())
    }

    pub fn workloads(&self) -> impl Iterator<Item = &api::Workload> {
        self.resources.values().filter_map(|r| match &r.resource {
            Some(Resource::Workload(w)) => Some(w),
            _ => None,
        })
    }

    /// Enrolled pods on other nodes.
    pub fn peers(&self) -> impl Iterator<Item = &api::Workload> {
        self.resources.values().filter_map(|r| match &r.resource {
            Some(Resource::Peer(w)) => Some(w),
            _ => None,
        })
    }

    pub fn services(&self) -> impl Iterator<Item = &api::Service> {
        self.resources.values().filter_map(|r| match &r.resource {
            Some(Resource::Service(s)) => Some(s),
            _ => None,
        })
    }

    pub fn policies(&self) -> impl Iterator<Item = &api::Policy> {
        self.resources.values().filter_map(|r| match &r.resource {
            Some(Resource::Policy(p)) => Some(p),
            _ => None,
        })
    }
}

/// The key a resource is stored under; checks what the agent relies on.
fn key_of(r: &api::Resource) -> Result<(i32, String)> {
    let ips = |ips: &[String], what: &str| -> Result<()> {
        for ip in ips {
            ip.parse::<IpAddr>()
                .with_context(|| format!("{what}: {ip:?} is not an IP address"))?;
        }
        Ok(())
    };
    Ok(match &r.resource {
        Some(Resource::Workload(w)) => {
            ips(&w.ips, &format!("workload {}/{}", w.namespace, w.name))?;
            for g in &w.gateway_ports {
                for r in g.virtual_hosts.iter().flat_map(|v| &v.routes) {
                    crate::http_route::HttpRoute::compile(r).with_context(|| {
                        format!(
                            "gateway {} port {} (pod {}/{})",
                            g.gateway, g.port, w.namespace, w.name
                        )
                    })?;
                }
            }
            (api::Kind::Workload as i32, w.uid.clone())
        }
        Some(Resource::Peer(w)) => {
            ips(&w.ips, &format!("peer {}/{}", w.namespace, w.name))?;
            (api::Kind::Peer as i32, w.uid.clone())
        }
        Some(Resource::Service(s)) => {
            ips(&s.vips, &format!("service {}/{}", s.namespace, s.name))?;
            for p in &s.ports {
                for r in &p.http_routes {
                    crate::http_route::HttpRoute::compile(r).with_context(|| {
                        format!("service {}/{} port {}", s.namespace, s.name, p.port)
                    })?;
                }
            }
            for e in &s.endpoints {
                ips(
                    &e.ips,
                    &format!("service {}/{} endpoint {}", s.namespace, s.name, e.pod_name),
                )?;
            }
            (
                api::Kind::Service as i32,
                format!("{}/{}", s.namespace, s.name),
            )
        }
        Some(Resource::Policy(p)) => {
            serde_json::from_str::<serde_json::Value>(&p.spec_json).with_context(|| {
                format!("{} {}/{}: spec is not JSON", p.kind, p.namespace, p.name)
            })?;
            if p.kind == "AuthorizationPolicy" {
                crate::authz::Policy::compile(&p.namespace, &p.name, &p.spec_json)?;
            }
            (
                api::Kind::Policy as i32,
                format!("{}/{}/{}", p.kind, p.namespace, p.name),
            )
        }
        None => bail!("a resource with no content"),
    })
}

/// Follows control for `node` until the process ends: every applied update (with the config as
/// it stands after it) goes to `on_update`. Connection failures are retried with backoff
/// (0.5 s doubling to 10 s); the last good config is kept meanwhile.
pub async fn follow(
    endpoint: ControlEndpoint,
    node: String,
    mut on_update: impl FnMut(&NodeConfig, &api::ConfigUpdate),
) {
    let mut config = NodeConfig::default();
    let mut backoff = Duration::from_millis(500);
    loop {
        match session(&endpoint, &node, &mut config, &mut on_update, &mut backoff).await {
            Ok(()) => warn!("control closed the config stream; reconnecting"),
            Err(e) => warn!(
                "config stream from control: {e:#}; retrying in {backoff:?} (serving version {})",
                config.version
            ),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}

async fn session(
    endpoint: &ControlEndpoint,
    node: &str,
    config: &mut NodeConfig,
    on_update: &mut impl FnMut(&NodeConfig, &api::ConfigUpdate),
    backoff: &mut Duration,
) -> Result<()> {
    let mut client = endpoint.connect().await?;
    let mut stream = client
        .subscribe(api::SubscribeRequest {
            node: node.to_owned(),
        })
        .await?
        .into_inner();
    let mut assembler = api::Assembler::default();
    while let Some(msg) = stream.message().await? {
        *backoff = Duration::from_millis(500);
        // An update is applied (and acknowledged) whole, once its last message is here; a
        // broken sequence ends the session, and the next one starts with a snapshot.
        let Some(update) = assembler.push(msg)? else {
            continue;
        };
        let error = match config.apply(&update) {
            Ok(()) => {
                info!(
                    version = update.version,
                    snapshot = update.snapshot,
                    upserts = update.upserts.len(),
                    removals = update.removals.len(),
                    "config applied"
                );
                on_update(config, &update);
                if update.snapshot {
                    crate::memory::release_freed();
                }
                String::new()
            }
            Err(e) => {
                warn!(version = update.version, "rejecting config update: {e:#}");
                format!("{e:#}")
            }
        };
        client
            .ack(api::AckRequest {
                node: node.to_owned(),
                version: update.version,
                error,
            })
            .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workload(uid: &str, ip: &str) -> api::Resource {
        api::Resource {
            resource: Some(Resource::Workload(api::Workload {
                uid: uid.into(),
                ips: vec![ip.into()],
                ..Default::default()
            })),
        }
    }

    #[test]
    fn updates_split_over_messages_are_applied_whole_once_the_last_arrives() {
        let msg = |version, more, uid: &str| api::ConfigUpdate {
            version,
            snapshot: true,
            more,
            upserts: vec![workload(uid, "10.0.0.1")],
            ..Default::default()
        };
        let mut a = api::Assembler::default();
        assert_eq!(a.push(msg(1, true, "a")).unwrap(), None);
        assert_eq!(a.push(msg(1, true, "b")).unwrap(), None);
        let whole = a.push(msg(1, false, "c")).unwrap().expect("complete");
        let mut c = NodeConfig::default();
        c.apply(&whole).unwrap();
        assert_eq!(
            c.workloads().map(|w| w.uid.as_str()).collect::<Vec<_>>(),
            ["a", "b", "c"]
        );
        // A single message is an update of its own.
        assert!(a.push(msg(2, false, "d")).unwrap().is_some());
        // A new version before the last message of the previous one is refused.
        assert_eq!(a.push(msg(3, true, "e")).unwrap(), None);
        let e = a.push(msg(4, false, "f")).unwrap_err();
        assert!(
            format!("{e}").contains("version 4 before finishing version 3"),
            "{e}"
        );
    }

    #[test]
    fn snapshots_replace_updates_patch_bad_updates_change_nothing() {
        let mut c = NodeConfig::default();
        c.apply(&api::ConfigUpdate {
            version: 1,
            snapshot: true,
            upserts: vec![workload("a", "10.0.0.1")],
            ..Default::default()
        })
        .unwrap();
        c.apply(&api::ConfigUpdate {
            version: 2,
            upserts: vec![workload("b", "10.0.0.2")],
            ..Default::default()
        })
        .unwrap();
        assert_eq!(c.workloads().count(), 2);
        let bad = api::ConfigUpdate {
            version: 3,
            upserts: vec![workload("c", "not-an-ip")],
            ..Default::default()
        };
        let before = c.clone();
        assert!(format!("{:#}", c.apply(&bad).unwrap_err()).contains("not an IP address"));
        assert_eq!(c, before);
        let rm = api::ResourceKey {
            kind: api::Kind::Workload as i32,
            name: "a".into(),
        };
        c.apply(&api::ConfigUpdate {
            version: 4,
            removals: vec![rm],
            ..Default::default()
        })
        .unwrap();
        assert_eq!(
            c.workloads().map(|w| w.uid.as_str()).collect::<Vec<_>>(),
            ["b"]
        );
        c.apply(&api::ConfigUpdate {
            version: 5,
            snapshot: true,
            ..Default::default()
        })
        .unwrap();
        assert_eq!(c.resources.len(), 0);
    }
}

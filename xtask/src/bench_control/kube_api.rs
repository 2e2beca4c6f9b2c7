//! The `kube` source: a real kube-apiserver on etcd (the tests' harness), filled through the API
//! with the generated cluster, and the agents' pod-bound service-account tokens.
use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use futures_util::{StreamExt as _, TryStreamExt as _, stream};
use k8s_openapi::{
    api::{
        authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec},
        core::v1::{Namespace, Pod, Secret, Service, ServiceAccount},
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{
    Api, Client,
    api::{ApiResource, DeleteParams, DynamicObject, Patch, PatchParams, PostParams},
};
use serde_json::{Value, json};
use tokio::time::Instant;
use trellis_e2e::apiserver::KubeApiServer;

use super::cluster::{self, Change, Pod as BenchPod};
use crate::cmd;

/// API requests in flight while filling the cluster: enough to keep the API server busy on two
/// cores, few enough not to trip its max-in-flight limit (400).
const IN_FLIGHT: usize = 32;
/// Where control keeps its CA, and the agents' pods and service account (deploy/rbac).
const SYSTEM: &str = "trellis-system";

pub struct Kube {
    api: KubeApiServer,
    client: Client,
    /// Agent `n`'s pod-bound token.
    pub agent_tokens: Vec<String>,
}

/// Starts the API server with the mesh CRDs and deploy/rbac, and creates the cluster.
pub async fn start() -> Result<Kube> {
    let bin = trellis_e2e::apiserver::binary();
    if !bin.is_file() {
        bail!(
            "{} is missing: run `cargo xtask setup` (it builds kube-apiserver and installs etcd)",
            bin.display()
        );
    }
    eprintln!("bench: starting kube-apiserver and etcd");
    let api = tokio::task::spawn_blocking(|| {
        let api = KubeApiServer::start();
        let path = |p: &str| cmd::root().join(p).to_string_lossy().into_owned();
        api.kubectl(&["apply", "-f", &path("deploy/crds/istio-subset.yaml")]);
        api.kubectl(&["apply", "-f", &path("deploy/rbac/trellis.yaml")]);
        api.kubectl(&[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd",
            "--all",
        ]);
        api
    })
    .await
    .context("starting kube-apiserver")?;
    let client = client(&api.kubeconfig_path()).await?;
    let mut kube = Kube {
        api,
        client,
        agent_tokens: Vec::new(),
    };
    kube.fill().await?;
    Ok(kube)
}

async fn client(kubeconfig: &Path) -> Result<Client> {
    let kc = kube::config::Kubeconfig::read_from(kubeconfig)?;
    let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?;
    Ok(Client::try_from(cfg)?)
}

impl Kube {
    async fn fill(&mut self) -> Result<()> {
        let started = Instant::now();
        let namespaces = (0..cluster::NAMESPACES).map(cluster::namespace).collect();
        self.create_all("namespaces", namespaces).await?;
        // No controller-manager here to make each namespace's `default` service account.
        let accounts = (0..cluster::NAMESPACES)
            .map(|n| {
                json!({
                    "apiVersion": "v1",
                    "kind": "ServiceAccount",
                    "metadata": {"name": "default", "namespace": cluster::namespace_name(n)},
                })
            })
            .collect();
        self.create_all("service accounts", accounts).await?;
        let agents = (0..cluster::NODES).map(agent_pod).collect();
        self.create_all("agent pods", agents).await?;
        let services = (0..cluster::SERVICES).map(cluster::service).collect();
        self.create_all("services", services).await?;
        let istio = (0..cluster::VIRTUAL_SERVICES)
            .flat_map(|v| {
                [
                    cluster::virtual_service(v, 90),
                    cluster::destination_rule(v),
                ]
            })
            .collect();
        self.create_all("VirtualServices and DestinationRules", istio)
            .await?;
        let pods = (0..cluster::PODS).map(BenchPod::initial);
        let client = &self.client;
        let mut done = 0;
        let mut created = stream::iter(pods)
            .map(|p| async move { add_pod(client, &p).await })
            .buffer_unordered(IN_FLIGHT);
        while created.try_next().await?.is_some() {
            done += 1;
            if done % 1000 == 0 {
                eprintln!("bench: created {done}/{} running pods", cluster::PODS);
            }
        }
        drop(created);
        for n in 0..cluster::NODES {
            let token = self
                .token("trellis-agent", Some(&format!("agent-{n}")))
                .await?;
            self.agent_tokens.push(token);
        }
        eprintln!(
            "bench: cluster created through the API in {:.1} s",
            started.elapsed().as_secs_f64()
        );
        Ok(())
    }

    async fn create_all(&self, what: &str, objects: Vec<Value>) -> Result<()> {
        let n = objects.len();
        stream::iter(objects)
            .map(|o| async move { create(&self.client, &o).await })
            .buffer_unordered(IN_FLIGHT)
            .try_collect::<Vec<_>>()
            .await?;
        eprintln!("bench: created {n} {what}");
        Ok(())
    }

    /// A service-account token, bound to an agent pod (as its projected token is) or not.
    async fn token(&self, account: &str, pod: Option<&str>) -> Result<String> {
        let bound_object_ref = match pod {
            Some(name) => {
                let uid = Api::<Pod>::namespaced(self.client.clone(), SYSTEM)
                    .get(name)
                    .await?
                    .metadata
                    .uid;
                Some(BoundObjectReference {
                    api_version: Some("v1".into()),
                    kind: Some("Pod".into()),
                    name: Some(name.into()),
                    uid,
                })
            }
            None => None,
        };
        let request = TokenRequest {
            metadata: ObjectMeta::default(),
            spec: TokenRequestSpec {
                audiences: Vec::new(),
                bound_object_ref,
                expiration_seconds: Some(3600),
            },
            status: None,
        };
        let answer = Api::<ServiceAccount>::namespaced(self.client.clone(), SYSTEM)
            .create_token_request(account, &PostParams::default(), &request)
            .await
            .with_context(|| format!("requesting a token for {SYSTEM}/{account}"))?;
        Ok(answer
            .status
            .context("a token request without status")?
            .token)
    }

    /// A kubeconfig in `dir` for control, as its own service account: deploy/rbac's permissions
    /// are what is measured.
    pub async fn control_kubeconfig(&self, dir: &Path) -> Result<PathBuf> {
        let token = self.token("trellis-control", None).await?;
        let path = dir.join("control.kubeconfig");
        std::fs::write(
            &path,
            format!(
                "apiVersion: v1\nkind: Config\ncurrent-context: c\n\
                 clusters: [{{name: c, cluster: {{server: \"{}\", certificate-authority: \"{}\"}}}}]\n\
                 users: [{{name: control, user: {{token: \"{token}\"}}}}]\n\
                 contexts: [{{name: c, context: {{cluster: c, user: control}}}}]\n",
                self.api.server_url(),
                self.api.dir().join("ca.pem").display(),
            ),
        )?;
        Ok(path)
    }

    /// The mesh root control created in its Secret on start.
    pub async fn mesh_root(&self, within: Duration) -> Result<String> {
        let secrets = Api::<Secret>::namespaced(self.client.clone(), SYSTEM);
        let deadline = Instant::now() + within;
        loop {
            let root = secrets
                .get_opt("trellis-ca")
                .await?
                .and_then(|s| s.data?.remove("ca.crt"));
            if let Some(pem) = root {
                return Ok(String::from_utf8(pem.0)?);
            }
            if Instant::now() > deadline {
                bail!("control did not create Secret {SYSTEM}/trellis-ca within {within:?}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Makes the change through the API; returns when the call that makes it visible returns.
    pub async fn apply(&self, change: &Change) -> Result<()> {
        match change {
            Change::AddPod(p) => add_pod(&self.client, p).await,
            Change::RemovePod(p) => {
                // Grace period 0: no kubelet here to confirm the pod's containers stopped.
                Api::<Pod>::namespaced(self.client.clone(), &p.namespace)
                    .delete(&p.name, &DeleteParams::default().grace_period(0))
                    .await?;
                Ok(())
            }
            Change::EditVs { v, weight } => {
                let vs = istio_resource("VirtualService")?;
                Api::<DynamicObject>::namespaced_with(
                    self.client.clone(),
                    &cluster::vs_namespace(*v),
                    &vs,
                )
                .patch(
                    &cluster::vs_name(*v),
                    &PatchParams::default(),
                    &Patch::Merge(json!({"spec": cluster::virtual_service_spec(*v, *weight)})),
                )
                .await?;
                Ok(())
            }
        }
    }
}

/// Creates the pod, then sets its status as kubelet would: from then on it is an endpoint.
async fn add_pod(client: &Client, p: &BenchPod) -> Result<()> {
    create(client, &p.object()).await?;
    Api::<Pod>::namespaced(client.clone(), &p.namespace)
        .patch_status(
            &p.name,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": p.status()})),
        )
        .await
        .with_context(|| format!("setting pod {}/{}'s status", p.namespace, p.name))?;
    Ok(())
}

/// The agent's pod on node `n`, which its token is bound to (control checks the node).
fn agent_pod(n: usize) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": format!("agent-{n}"), "namespace": SYSTEM},
        "spec": {
            "nodeName": cluster::node(n),
            "serviceAccountName": "trellis-agent",
            "automountServiceAccountToken": false,
            "containers": [{"name": "agent", "image": "trellis-agent"}],
        },
    })
}

fn istio_resource(kind: &str) -> Result<ApiResource> {
    trellis_control::istio::api_resources()
        .into_iter()
        .find(|r| r.kind == kind)
        .with_context(|| format!("no mesh CRD for {kind}"))
}

async fn create(client: &Client, object: &Value) -> Result<()> {
    let kind = object["kind"].as_str().unwrap_or_default();
    let resource = match kind {
        "Namespace" => ApiResource::erase::<Namespace>(&()),
        "Pod" => ApiResource::erase::<Pod>(&()),
        "Service" => ApiResource::erase::<Service>(&()),
        "ServiceAccount" => ApiResource::erase::<ServiceAccount>(&()),
        _ => istio_resource(kind)?,
    };
    let api: Api<DynamicObject> = match object["metadata"]["namespace"].as_str() {
        Some(ns) => Api::namespaced_with(client.clone(), ns, &resource),
        None => Api::all_with(client.clone(), &resource),
    };
    let name = object["metadata"]["name"].as_str().unwrap_or_default();
    api.create(
        &PostParams::default(),
        &serde_json::from_value(object.clone())?,
    )
    .await
    .with_context(|| format!("creating {kind} {name}"))?;
    Ok(())
}

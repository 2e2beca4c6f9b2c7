//! `--kube`: the agents and control found through the Kubernetes API (KUBECONFIG,
//! ~/.kube/config, or a pod's service account), and the cluster's own checks: the API server
//! answers, the mesh's CRDs are installed and established, control's Deployment and the agents'
//! DaemonSet are ready.
use std::net::{IpAddr, SocketAddr, UdpSocket};

use anyhow::{Context as _, Result, bail};
use k8s_openapi::{
    api::{
        apps::v1::{DaemonSet, Deployment},
        core::v1::Pod,
    },
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use kube::{Api, Client, api::ListParams};

use crate::{
    check::Outcome,
    fetch::{Endpoint, Forward},
    targets::{Agent, Reach},
};

/// The names `deploy/` gives Trellis's workloads (and their pods' `app.kubernetes.io/name`).
const AGENT: &str = "trellis-agent";
const CONTROL: &str = "trellis-control";
/// Control's `--metrics-addr` port in deploy/control.yaml.
const CONTROL_METRICS_PORT: u16 = 15014;
const INSTALL: &str =
    "install Trellis: `kubectl apply -k deploy/` or `trellis-control install | kubectl apply -f -`";

pub struct Cluster {
    client: Client,
    namespace: String,
    /// Reach every agent and control through the API server, even where an address would do.
    forward_all: bool,
}

impl Cluster {
    pub async fn connect(namespace: &str, forward_all: bool) -> Result<Self> {
        let client = Client::try_default().await.context(
            "no Kubernetes API to talk to (--kube reads KUBECONFIG, ~/.kube/config, or a pod's service account)",
        )?;
        Ok(Self {
            client,
            namespace: namespace.to_owned(),
            forward_all,
        })
    }

    /// Every agent pod, as the node it runs on. An agent on this host is reached on localhost
    /// (trellisctl runs on the node, in the host's network namespace, as the agent does); any
    /// other through the API server, by port-forwards to its pod.
    pub async fn agents(&self) -> Result<Vec<Agent>> {
        let pods = self.pods(AGENT).await?;
        if pods.is_empty() {
            bail!("no {AGENT} pods in namespace {}: {INSTALL}", self.namespace);
        }
        pods.iter()
            .map(|pod| {
                let (node, host) = placement(pod)?;
                let reach = if is_local(host) && !self.forward_all {
                    Reach::Local
                } else {
                    Reach::Pod(self.forward(pod))
                };
                Ok(Agent { node, reach })
            })
            .collect()
    }

    fn forward(&self, pod: &Pod) -> Forward {
        Forward {
            pods: Box::new(Api::namespaced(self.client.clone(), &self.namespace)),
            namespace: self.namespace.clone(),
            name: pod.metadata.name.clone().unwrap_or_default(),
        }
    }

    /// Control's metrics endpoint: its running pod, at its address or through the API server.
    pub async fn control(&self) -> Result<Endpoint> {
        let pods = self.pods(CONTROL).await?;
        let pod = pods
            .iter()
            .find(|p| phase(p) == "Running")
            .with_context(|| {
                format!(
                    "no running {CONTROL} pod in namespace {} ({} found): see `kubectl -n {0} describe deploy/{CONTROL}`",
                    self.namespace,
                    pods.len()
                )
            })?;
        let ip = pod
            .status
            .as_ref()
            .and_then(|s| s.pod_ip.as_deref()?.parse::<IpAddr>().ok());
        Ok(match ip {
            Some(ip) if !self.forward_all => {
                Endpoint::new(None, SocketAddr::new(ip, CONTROL_METRICS_PORT))
            }
            _ => Endpoint::forwarded(self.forward(pod), CONTROL_METRICS_PORT),
        })
    }

    async fn pods(&self, app: &str) -> Result<Vec<Pod>> {
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &self.namespace);
        let params = ListParams::default().labels(&format!("app.kubernetes.io/name={app}"));
        Ok(api
            .list(&params)
            .await
            .with_context(|| format!("listing {app} pods in namespace {}", self.namespace))?
            .items)
    }

    /// The API server, the CRDs, control's Deployment and the agents' DaemonSet.
    pub async fn checks(&self) -> Vec<Outcome> {
        let mut out = Vec::new();
        match self.client.apiserver_version().await {
            Ok(v) => out.push(Outcome::pass(format!(
                "Kubernetes API reachable (v{}.{})",
                v.major, v.minor
            ))),
            Err(e) => {
                out.push(Outcome::fail(
                    "Kubernetes API reachable",
                    format!("{e}"),
                    "check KUBECONFIG and that the API server runs (kubectl version)",
                ));
                return out;
            }
        }
        let crds: Api<CustomResourceDefinition> = Api::all(self.client.clone());
        for name in trellis_control::istio::crd_names() {
            let what = format!("CRD {name} installed");
            out.push(match crds.get_opt(&name).await {
                Ok(Some(crd)) if established(&crd) => Outcome::pass(what),
                Ok(Some(_)) => Outcome::fail(
                    what,
                    "present but not Established",
                    format!("see `kubectl describe crd {name}`"),
                ),
                Ok(None) => Outcome::fail(what, "not installed", INSTALL),
                Err(e) => Outcome::fail(
                    what,
                    format!("{e}"),
                    "trellisctl needs to read customresourcedefinitions",
                ),
            });
        }
        let deployments: Api<Deployment> = Api::namespaced(self.client.clone(), &self.namespace);
        let what = format!("deploy/{CONTROL} ready in namespace {}", self.namespace);
        out.push(match deployments.get_opt(CONTROL).await {
            Ok(Some(d)) => {
                let status = d.status.unwrap_or_default();
                let (ready, want) = (
                    status.ready_replicas.unwrap_or(0),
                    d.spec.and_then(|s| s.replicas).unwrap_or(1),
                );
                if ready >= want && ready > 0 {
                    Outcome::pass(format!("{what} ({ready}/{want})"))
                } else {
                    Outcome::fail(
                        what,
                        format!("{ready} of {want} replicas ready"),
                        format!(
                            "see `kubectl -n {} describe deploy/{CONTROL}`",
                            self.namespace
                        ),
                    )
                }
            }
            Ok(None) => Outcome::fail(what, "not found", INSTALL),
            Err(e) => Outcome::fail(what, format!("{e}"), "check trellisctl's RBAC"),
        });
        let daemonsets: Api<DaemonSet> = Api::namespaced(self.client.clone(), &self.namespace);
        let what = format!("ds/{AGENT} ready on every node");
        out.push(match daemonsets.get_opt(AGENT).await {
            Ok(Some(ds)) => {
                let status = ds.status.unwrap_or_default();
                let (ready, want) = (status.number_ready, status.desired_number_scheduled);
                if ready == want && want > 0 {
                    Outcome::pass(format!("{what} ({ready}/{want})"))
                } else {
                    Outcome::fail(
                        what,
                        format!("{ready} of {want} agents ready"),
                        format!(
                            "see `kubectl -n {} get pods -o wide -l app.kubernetes.io/name={AGENT}` and the agents' logs",
                            self.namespace
                        ),
                    )
                }
            }
            Ok(None) => Outcome::fail(what, "not found", INSTALL),
            Err(e) => Outcome::fail(what, format!("{e}"), "check trellisctl's RBAC"),
        });
        out
    }
}

fn phase(pod: &Pod) -> &str {
    pod.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("Unknown")
}

fn established(crd: &CustomResourceDefinition) -> bool {
    crd.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| {
            c.iter()
                .any(|c| c.type_ == "Established" && c.status == "True")
        })
}

/// The node an agent pod runs on, and that node's address.
fn placement(pod: &Pod) -> Result<(String, IpAddr)> {
    let name = pod.metadata.name.as_deref().unwrap_or("?");
    let node = pod
        .spec
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .with_context(|| format!("agent pod {name} is not scheduled to a node yet"))?;
    let ip = pod
        .status
        .as_ref()
        .and_then(|s| s.host_ip.as_deref())
        .and_then(|ip| ip.parse().ok())
        .with_context(|| {
            format!(
                "agent pod {name} on node {node} has no host address yet (phase {})",
                phase(pod)
            )
        })?;
    Ok((node, ip))
}

/// Whether `ip` is one of this host's addresses: only then can it be bound.
fn is_local(ip: IpAddr) -> bool {
    UdpSocket::bind(SocketAddr::new(ip, 0)).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(node: Option<&str>, host_ip: Option<&str>) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "trellis-agent-x"},
            "spec": {"containers": [], "nodeName": node},
            "status": {"phase": "Running", "hostIP": host_ip},
        }))
        .unwrap()
    }

    #[test]
    fn an_agent_is_placed_by_its_node_and_host_address() {
        let (node, ip) = placement(&pod(Some("n1"), Some("127.0.0.1"))).unwrap();
        assert_eq!((node.as_str(), is_local(ip)), ("n1", true));
        // TEST-NET-1: never one of this host's addresses.
        let (_, ip) = placement(&pod(Some("n2"), Some("192.0.2.7"))).unwrap();
        assert!(!is_local(ip));
        let e = placement(&pod(None, None)).unwrap_err().to_string();
        assert!(e.contains("not scheduled"), "{e}");
        let e = placement(&pod(Some("n3"), None)).unwrap_err().to_string();
        assert!(e.contains("no host address yet (phase Running)"), "{e}");
    }
}

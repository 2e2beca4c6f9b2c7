//! Telling an uninstall from a restart when Kubernetes stops the agent. A restart (rollout,
//! upgrade, node drain) must leave capture pinned, so STRICT pods stay closed and the next agent
//! adopts it; an uninstall must remove it, or every enrolled pod's traffic would be steered into
//! listeners that no longer exist. On SIGTERM the agent asks the API server about its DaemonSet.
use std::time::Duration;

use k8s_openapi::api::{apps::v1::DaemonSet, core::v1::Namespace};
use kube::{Api, Client};

/// The DaemonSet that runs this agent, as `namespace/name` (`--daemonset`).
#[derive(Clone, Debug)]
pub struct DaemonSetRef {
    pub namespace: String,
    pub name: String,
}

impl std::str::FromStr for DaemonSetRef {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.split_once('/') {
            Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
                Ok(Self {
                    namespace: ns.to_owned(),
                    name: name.to_owned(),
                })
            }
            _ => Err(format!("{s:?}: expected NAMESPACE/NAME")),
        }
    }
}

/// What stopping means, and why.
#[derive(Debug, PartialEq)]
pub enum Verdict {
    Uninstall(String),
    Restart(String),
}

/// The API server's answer bounds how long a stop takes; past this the agent keeps capture.
const ASK_TIMEOUT: Duration = Duration::from_secs(5);

/// Asks the API server (in-cluster credentials) whether the agent's DaemonSet is going away.
pub async fn verdict(ds: &DaemonSetRef) -> Verdict {
    match tokio::time::timeout(ASK_TIMEOUT, ask(ds)).await {
        Ok(v) => v,
        Err(_) => Verdict::Restart(format!(
            "the API server did not answer within {ASK_TIMEOUT:?}; keeping capture"
        )),
    }
}

async fn ask(ds: &DaemonSetRef) -> Verdict {
    let client = match Client::try_default().await {
        Ok(c) => c,
        Err(e) => {
            return Verdict::Restart(format!("no Kubernetes credentials ({e}); keeping capture"));
        }
    };
    let namespace = Api::<Namespace>::all(client.clone())
        .get_opt(&ds.namespace)
        .await;
    let daemonset = Api::<DaemonSet>::namespaced(client, &ds.namespace)
        .get_opt(&ds.name)
        .await;
    judge(
        &ds.namespace,
        &ds.name,
        namespace.map(|n| n.is_some_and(|n| n.metadata.deletion_timestamp.is_none())),
        daemonset.map(|d| d.is_some_and(|d| d.metadata.deletion_timestamp.is_none())),
    )
}

/// The decision from whether the namespace and the DaemonSet still exist and are not being
/// deleted. Refused credentials mean the agent's service account or its RBAC is gone, which only
/// an uninstall does; any other error keeps capture (a restart with the API server unreachable
/// must not open STRICT pods).
fn judge(
    ns: &str,
    name: &str,
    namespace: Result<bool, kube::Error>,
    daemonset: Result<bool, kube::Error>,
) -> Verdict {
    let refused =
        |e: &kube::Error| matches!(e, kube::Error::Api(s) if s.code == 401 || s.code == 403);
    match (namespace, daemonset) {
        (Ok(false), _) => Verdict::Uninstall(format!("namespace {ns} is being deleted")),
        (_, Ok(false)) => {
            Verdict::Uninstall(format!("DaemonSet {ns}/{name} is deleted or being deleted"))
        }
        (Err(e), _) | (_, Err(e)) if refused(&e) => Verdict::Uninstall(format!(
            "the API server refuses the agent's credentials ({e}): its service account or RBAC was removed"
        )),
        (Err(e), _) | (_, Err(e)) => Verdict::Restart(format!(
            "asking the API server failed ({e}); keeping capture"
        )),
        (Ok(true), Ok(true)) => Verdict::Restart(format!("DaemonSet {ns}/{name} remains")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api_error(code: u16) -> kube::Error {
        kube::Error::Api(Box::new(kube::core::Status {
            code,
            ..Default::default()
        }))
    }

    #[test]
    fn only_a_going_daemonset_or_namespace_or_lost_access_uninstalls() {
        let uninstall = |v: Verdict| matches!(v, Verdict::Uninstall(_));
        assert!(!uninstall(judge("n", "d", Ok(true), Ok(true))));
        assert!(uninstall(judge("n", "d", Ok(true), Ok(false))));
        assert!(uninstall(judge("n", "d", Ok(false), Ok(true))));
        assert!(uninstall(judge("n", "d", Err(api_error(403)), Ok(true))));
        assert!(uninstall(judge("n", "d", Ok(true), Err(api_error(401)))));
        assert!(!uninstall(judge("n", "d", Err(api_error(500)), Ok(true))));
        assert!(!uninstall(judge("n", "d", Ok(true), Err(api_error(503)))));
    }

    #[test]
    fn daemonset_refs_need_a_namespace_and_a_name() {
        let r: DaemonSetRef = "trellis-system/trellis-agent".parse().unwrap();
        assert_eq!(
            (r.namespace.as_str(), r.name.as_str()),
            ("trellis-system", "trellis-agent")
        );
        for bad in ["", "x", "/x", "x/", "a/b/c"] {
            assert!(bad.parse::<DaemonSetRef>().is_err(), "{bad:?}");
        }
    }
}

//! Who may call control, and for which node.
//!
//! - Dir mode: a bootstrap token read from a file (`authorization: Bearer …`); its holder may act
//!   for any node.
//! - Kube mode: the agent's projected service-account token, checked with a TokenReview. It must
//!   belong to the agent's service account and be bound to a pod, and that pod must run on the
//!   node the call is for: an agent can only ever speak for its own node. A token found good is
//!   trusted for `REVIEWED_FOR` without asking again (as the API server's own webhook token
//!   cache does), so a config update's 1,000 acknowledgements do not cost 2,000 API calls.
use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use k8s_openapi::api::{
    authentication::v1::{TokenReview, TokenReviewSpec},
    core::v1::Pod,
};
use kube::{Api, Client, api::PostParams};
use tonic::{Status, metadata::MetadataMap};

pub enum Authenticator {
    BootstrapToken(String),
    Kube {
        client: Client,
        namespace: String,
        service_account: String,
        reviewed: Reviewed,
    },
}

/// How long a token found good is trusted without another TokenReview.
pub const REVIEWED_FOR: Duration = Duration::from_secs(30);

/// At most this many tokens are remembered (one per agent; a bound on what callers can grow).
const MAX_REVIEWED: usize = 100_000;

/// Tokens found good recently: their agent pod, and when that was checked.
#[derive(Default)]
pub struct Reviewed(Mutex<HashMap<String, (AgentPod, Instant)>>);

/// The agent pod a token is bound to, and the node it runs on.
#[derive(Clone, Debug, PartialEq)]
pub struct AgentPod {
    name: String,
    node: String,
}

impl Reviewed {
    /// `token`'s agent pod, if it was checked within `REVIEWED_FOR` of `now`.
    fn get(&self, token: &str, now: Instant) -> Option<AgentPod> {
        let map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let (pod, at) = map.get(token)?;
        (now.duration_since(*at) < REVIEWED_FOR).then(|| pod.clone())
    }

    fn insert(&self, token: &str, pod: AgentPod, now: Instant) {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= MAX_REVIEWED {
            map.retain(|_, (_, at)| now.duration_since(*at) < REVIEWED_FOR);
            if map.len() >= MAX_REVIEWED {
                map.clear();
            }
        }
        map.insert(token.to_owned(), (pod, now));
    }
}

/// The extra field a pod-bound service-account token carries.
const POD_NAME: &str = "authentication.kubernetes.io/pod-name";

impl Authenticator {
    pub fn bootstrap_token_file(path: &std::path::Path) -> anyhow::Result<Self> {
        let token = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("reading --bootstrap-token-file {}: {e}", path.display()))?
            .trim()
            .to_owned();
        anyhow::ensure!(
            token.len() >= 16,
            "the bootstrap token in {} is shorter than 16 characters",
            path.display()
        );
        Ok(Self::BootstrapToken(token))
    }

    /// Checks the caller's credentials allow acting for `node`.
    pub async fn check(&self, meta: &MetadataMap, node: &str) -> Result<(), Status> {
        let presented = meta
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| Status::unauthenticated("missing `authorization: Bearer <token>`"))?;
        match self {
            Authenticator::BootstrapToken(token)
                if constant_time_eq(presented.as_bytes(), token.as_bytes()) =>
            {
                Ok(())
            }
            Authenticator::BootstrapToken(_) => Err(Status::unauthenticated("bad token")),
            Authenticator::Kube {
                client,
                namespace,
                service_account,
                reviewed,
            } => {
                let now = Instant::now();
                let pod = match reviewed.get(presented, now) {
                    Some(pod) => pod,
                    None => {
                        let pod = agent_pod(client, presented, namespace, service_account).await?;
                        reviewed.insert(presented, pod.clone(), now);
                        pod
                    }
                };
                if pod.node != node {
                    return Err(Status::permission_denied(format!(
                        "agent pod {namespace}/{} runs on node {}, not {node}",
                        pod.name, pod.node
                    )));
                }
                Ok(())
            }
        }
    }
}

/// The agent pod `token` is bound to, if it is a valid agent token.
async fn agent_pod(
    client: &Client,
    token: &str,
    namespace: &str,
    service_account: &str,
) -> Result<AgentPod, Status> {
    let pod = review(client, token, namespace, service_account).await?;
    let node = Api::<Pod>::namespaced(client.clone(), namespace)
        .get_opt(&pod)
        .await
        .map_err(|e| Status::unavailable(format!("looking up agent pod {namespace}/{pod}: {e}")))?
        .and_then(|p| p.spec?.node_name)
        .ok_or_else(|| {
            Status::permission_denied(format!(
                "agent pod {namespace}/{pod} is not scheduled on a node"
            ))
        })?;
    Ok(AgentPod { name: pod, node })
}

/// The name of the pod the token is bound to, if it is a valid agent token.
async fn review(
    client: &Client,
    token: &str,
    namespace: &str,
    service_account: &str,
) -> Result<String, Status> {
    let review = TokenReview {
        spec: TokenReviewSpec {
            token: Some(token.to_owned()),
            ..Default::default()
        },
        ..Default::default()
    };
    let status = Api::<TokenReview>::all(client.clone())
        .create(&PostParams::default(), &review)
        .await
        .map_err(|e| Status::unavailable(format!("TokenReview failed: {e}")))?
        .status
        .unwrap_or_default();
    if status.authenticated != Some(true) {
        return Err(Status::unauthenticated(format!(
            "token rejected: {}",
            status.error.unwrap_or_default()
        )));
    }
    let user = status.user.unwrap_or_default();
    let want = format!("system:serviceaccount:{namespace}:{service_account}");
    if user.username.as_deref() != Some(want.as_str()) {
        return Err(Status::permission_denied(format!(
            "{} is not the agent's service account {want}",
            user.username.unwrap_or_default()
        )));
    }
    user.extra
        .and_then(|mut e| e.remove(POD_NAME))
        .and_then(|v| v.into_iter().next())
        .ok_or_else(|| {
            Status::unauthenticated(
                "the token is not bound to a pod: mount a projected service-account token",
            )
        })
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn token_must_match() {
        let auth = Authenticator::BootstrapToken("0123456789abcdef".into());
        let mut meta = MetadataMap::new();
        assert_eq!(
            auth.check(&meta, "n").await.unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        meta.insert(
            "authorization",
            "Bearer wrong-token-000000".parse().unwrap(),
        );
        assert_eq!(
            auth.check(&meta, "n").await.unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        meta.insert("authorization", "Bearer 0123456789abcdef".parse().unwrap());
        assert!(auth.check(&meta, "n").await.is_ok());
    }

    #[test]
    fn a_reviewed_token_is_trusted_for_a_while_then_reviewed_again() {
        let reviewed = Reviewed::default();
        let t0 = Instant::now();
        assert_eq!(reviewed.get("tok", t0), None);
        let pod = AgentPod {
            name: "agent-1".into(),
            node: "node-a".into(),
        };
        reviewed.insert("tok", pod.clone(), t0);
        assert_eq!(reviewed.get("tok", t0 + REVIEWED_FOR / 2), Some(pod));
        assert_eq!(reviewed.get("other", t0), None);
        assert_eq!(reviewed.get("tok", t0 + REVIEWED_FOR), None, "expired");
    }
}

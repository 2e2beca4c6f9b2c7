//! Who may call control, and for which node.
//!
//! - Dir mode: a bootstrap token read from a file (`authorization: Bearer …`); its holder may act
//!   for any node.
//! - Kube mode: the agent's projected service-account token, checked with a TokenReview. It must
//!   belong to the agent's service account and be bound to a pod, and that pod must run on the
//!   node the call is for: an agent can only ever speak for its own node.
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
    },
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
            } => {
                let pod = review(client, presented, namespace, service_account).await?;
                let on = Api::<Pod>::namespaced(client.clone(), namespace)
                    .get_opt(&pod)
                    .await
                    .map_err(|e| {
                        Status::unavailable(format!("looking up agent pod {namespace}/{pod}: {e}"))
                    })?
                    .and_then(|p| p.spec?.node_name)
                    .ok_or_else(|| {
                        Status::permission_denied(format!(
                            "agent pod {namespace}/{pod} is not scheduled on a node"
                        ))
                    })?;
                if on != node {
                    return Err(Status::permission_denied(format!(
                        "agent pod {namespace}/{pod} runs on node {on}, not {node}"
                    )));
                }
                Ok(())
            }
        }
    }
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
}

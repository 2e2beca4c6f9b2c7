//! Workload identities: one SVID per service account with a pod on this node. The key pair is
//! made here and never leaves the node; control signs a CSR for it. Each certificate is renewed
//! at half its lifetime, and the old one stays in use until the new one arrives, so renewal never
//! leaves a connection without a certificate.
use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::{Duration, SystemTime},
};

use anyhow::{Context as _, Result, bail};
use rcgen::{CertificateParams, KeyPair, SanType};
use tokio::sync::watch;
use tracing::{info, warn};
use trellis_api as api;

use crate::config::{Client, ControlEndpoint};

#[derive(Debug)]
pub struct Svid {
    /// `spiffe://<trust-domain>/ns/<ns>/sa/<sa>`
    pub identity: String,
    /// Leaf then root, PEM.
    pub cert_chain_pem: String,
    pub key_pem: String,
    pub root_pem: String,
    /// When it arrived (not `notBefore`, which signers backdate for clock skew).
    pub received: SystemTime,
    pub not_after: SystemTime,
}

impl Svid {
    /// When to renew: half way through the certificate's life as this node saw it.
    pub fn renew_at(&self) -> SystemTime {
        let life = self
            .not_after
            .duration_since(self.received)
            .unwrap_or_default();
        self.received + life / 2
    }
}

/// The certificates in force, by identity.
pub type Svids = BTreeMap<String, Arc<Svid>>;

/// How long to wait before retrying a failed signing request.
const RETRY: Duration = Duration::from_secs(2);

/// Keeps `svids` holding a current certificate for every identity in `wanted`, until `wanted`
/// closes.
pub async fn manage(
    endpoint: ControlEndpoint,
    node: String,
    mut wanted: watch::Receiver<BTreeSet<String>>,
    svids: watch::Sender<Svids>,
) {
    let mut client: Option<Client> = None;
    loop {
        let want = wanted.borrow_and_update().clone();
        svids.send_if_modified(|s| {
            let before = s.len();
            s.retain(|id, _| want.contains(id));
            s.len() != before
        });
        let now = SystemTime::now();
        let mut next = now + Duration::from_secs(3600);
        for id in &want {
            let due = svids.borrow().get(id).map_or(now, |s| s.renew_at());
            if due > now {
                next = next.min(due);
                continue;
            }
            let result = async {
                let c = match &mut client {
                    Some(c) => c,
                    None => client.insert(endpoint.connect().await?),
                };
                fetch(c, &node, id).await
            }
            .await;
            match result {
                Ok(svid) => {
                    info!(identity = id, expires = ?svid.not_after, "certificate issued");
                    next = next.min(svid.renew_at());
                    svids.send_modify(|s| {
                        s.insert(id.clone(), Arc::new(svid));
                    });
                }
                Err(e) => {
                    client = None; // reconnect next time, in case the channel is what failed
                    warn!(
                        identity = id,
                        "getting a certificate: {e:#}; retrying in {RETRY:?}"
                    );
                    next = next.min(now + RETRY);
                }
            }
        }
        let sleep = next.duration_since(SystemTime::now()).unwrap_or_default();
        tokio::select! {
            changed = wanted.changed() => if changed.is_err() { return },
            () = tokio::time::sleep(sleep) => {}
        }
    }
}

async fn fetch(client: &mut Client, node: &str, identity: &str) -> Result<Svid> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![SanType::URI(identity.try_into()?)];
    let csr_pem = params.serialize_request(&key)?.pem()?;
    let resp = client
        .sign(api::SignRequest {
            node: node.to_owned(),
            csr_pem,
        })
        .await
        .map_err(|s| anyhow::anyhow!("control refused: {}", s.message()))?
        .into_inner();
    let (not_after, san) = inspect(&resp.cert_chain_pem)?;
    if san != identity {
        bail!("control signed {san:?}, not the requested {identity:?}");
    }
    Ok(Svid {
        identity: identity.to_owned(),
        cert_chain_pem: resp.cert_chain_pem,
        key_pem: key.serialize_pem(),
        root_pem: resp.root_pem,
        received: SystemTime::now(),
        not_after,
    })
}

/// The leaf's expiry and its URI SAN.
fn inspect(chain_pem: &str) -> Result<(SystemTime, String)> {
    let (_, pem) =
        x509_parser::pem::parse_x509_pem(chain_pem.as_bytes()).context("the chain is not PEM")?;
    let cert = pem.parse_x509().context("the leaf is not X.509")?;
    let at = |t: x509_parser::time::ASN1Time| {
        SystemTime::UNIX_EPOCH + Duration::from_secs(t.timestamp().max(0) as u64)
    };
    let validity = cert.validity();
    let san = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .and_then(|ext| {
            ext.value.general_names.iter().find_map(|n| match n {
                x509_parser::extensions::GeneralName::URI(u) => Some(u.to_string()),
                _ => None,
            })
        })
        .context("the certificate has no URI SAN")?;
    Ok((at(validity.not_after), san))
}

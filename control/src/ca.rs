//! The mesh certificate authority: one root, kept across restarts, that signs workload SVIDs
//! (X.509 with a SPIFFE URI SAN) and control's own serving certificate.
use std::{fs, io::Write as _, os::unix::fs::OpenOptionsExt as _, path::Path, time::Duration};

use anyhow::{Context as _, Result};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use time::OffsetDateTime;

/// Root lifetime when control creates one.
const ROOT_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Backdating, for clocks a little behind control's.
const SKEW: Duration = Duration::from_secs(300);

pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    root_pem: String,
    trust_domain: String,
    workload_ttl: Duration,
}

/// Why a signing request was refused; shown to the caller.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    #[error("malformed CSR: {0}")]
    BadCsr(String),
    #[error(
        "the CSR must carry exactly one SAN, the URI spiffe://{0}/ns/<namespace>/sa/<service-account>"
    )]
    BadIdentity(String),
    #[error("no pod on node {node} runs as {identity}")]
    NotOnNode { node: String, identity: String },
    #[error("signing failed: {0}")]
    Internal(String),
}

impl Ca {
    /// A CA from a root certificate and key (PEM).
    pub fn from_pem(
        cert_pem: &str,
        key_pem: &str,
        trust_domain: &str,
        workload_ttl: Duration,
    ) -> Result<Self> {
        let key = KeyPair::from_pem(key_pem).context("parsing the CA key")?;
        let issuer =
            Issuer::from_ca_cert_pem(cert_pem, key).context("parsing the CA certificate")?;
        Ok(Self {
            issuer,
            root_pem: cert_pem.to_owned(),
            trust_domain: trust_domain.to_owned(),
            workload_ttl,
        })
    }

    /// A fresh self-signed root: (certificate PEM, key PEM).
    pub fn generate_root(trust_domain: &str) -> Result<(String, String)> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Trellis");
        dn.push(
            DnType::CommonName,
            format!("Trellis mesh root ({trust_domain})"),
        );
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - SKEW;
        params.not_after = now + ROOT_TTL;
        let cert = params.self_signed(&key)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// Loads `ca.pem` and `ca-key.pem` from `dir`, creating them on first start.
    pub fn load_or_create_in(
        dir: &Path,
        trust_domain: &str,
        workload_ttl: Duration,
    ) -> Result<Self> {
        let (cert_path, key_path) = (dir.join("ca.pem"), dir.join("ca-key.pem"));
        if !cert_path.exists() && !key_path.exists() {
            fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            let (cert, key) = Self::generate_root(trust_domain)?;
            write_private(&key_path, &key)?;
            fs::write(&cert_path, &cert)
                .with_context(|| format!("writing {}", cert_path.display()))?;
            tracing::info!(cert = %cert_path.display(), "created the mesh root CA");
        }
        let cert = fs::read_to_string(&cert_path)
            .with_context(|| format!("reading {}", cert_path.display()))?;
        let key = fs::read_to_string(&key_path)
            .with_context(|| format!("reading {}", key_path.display()))?;
        Self::from_pem(&cert, &key, trust_domain, workload_ttl)
    }

    /// Kube mode: the root lives in Secret `namespace/name` (keys `ca.crt`, `ca.key`), created
    /// on first start. Two replicas starting at once both create; the loser reads the winner's.
    pub async fn load_or_create_secret(
        client: &kube::Client,
        namespace: &str,
        name: &str,
        trust_domain: &str,
        workload_ttl: Duration,
    ) -> Result<Self> {
        use k8s_openapi::{ByteString, api::core::v1::Secret};
        use kube::api::{Api, PostParams};
        let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
        let read = |s: Secret| -> Result<(String, String)> {
            let mut data = s.data.unwrap_or_default();
            let mut take = |k: &str| {
                data.remove(k)
                    .map(|b| String::from_utf8_lossy(&b.0).into_owned())
                    .with_context(|| format!("Secret {namespace}/{name} has no {k}"))
            };
            Ok((take("ca.crt")?, take("ca.key")?))
        };
        let existing = api
            .get_opt(name)
            .await
            .with_context(|| format!("reading Secret {namespace}/{name}"))?;
        let (cert, key) = match existing {
            Some(s) => read(s)?,
            None => {
                let (cert, key) = Self::generate_root(trust_domain)?;
                let secret = Secret {
                    metadata: kube::api::ObjectMeta {
                        name: Some(name.into()),
                        namespace: Some(namespace.into()),
                        ..Default::default()
                    },
                    data: Some(
                        [
                            ("ca.crt".to_owned(), ByteString(cert.clone().into_bytes())),
                            ("ca.key".to_owned(), ByteString(key.clone().into_bytes())),
                        ]
                        .into(),
                    ),
                    ..Default::default()
                };
                match api.create(&PostParams::default(), &secret).await {
                    Ok(_) => {
                        tracing::info!(secret = %format!("{namespace}/{name}"), "created the mesh root CA");
                        (cert, key)
                    }
                    Err(kube::Error::Api(e)) if e.code == 409 => read(api.get(name).await?)?,
                    Err(e) => {
                        return Err(e)
                            .with_context(|| format!("creating Secret {namespace}/{name}"));
                    }
                }
            }
        };
        Self::from_pem(&cert, &key, trust_domain, workload_ttl)
    }

    pub fn root_pem(&self) -> &str {
        &self.root_pem
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// Signs a workload CSR if `allowed(namespace, service_account)` says a pod on the caller's
    /// node runs as that identity. Returns the certificate chain (leaf, root) as PEM.
    pub fn sign_workload(
        &self,
        csr_pem: &str,
        node: &str,
        allowed: impl Fn(&str, &str) -> bool,
    ) -> Result<String, SignError> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| SignError::BadCsr(e.to_string()))?;
        let identity = match csr.params.subject_alt_names.as_slice() {
            [SanType::URI(uri)] => uri.as_str().to_owned(),
            _ => return Err(SignError::BadIdentity(self.trust_domain.clone())),
        };
        let (ns, sa) = self
            .parse_identity(&identity)
            .ok_or_else(|| SignError::BadIdentity(self.trust_domain.clone()))?;
        if !allowed(ns, sa) {
            return Err(SignError::NotOnNode {
                node: node.to_owned(),
                identity,
            });
        }
        let mut params = CertificateParams::default();
        params.subject_alt_names =
            vec![SanType::URI(identity.clone().try_into().map_err(|_| {
                SignError::BadIdentity(self.trust_domain.clone())
            })?)];
        params.distinguished_name = DistinguishedName::new();
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let now = OffsetDateTime::now_utc();
        params.not_before = now - SKEW;
        params.not_after = now + self.workload_ttl;
        let cert = params
            .signed_by(&csr.public_key, &self.issuer)
            .map_err(|e| SignError::Internal(e.to_string()))?;
        Ok(format!("{}{}", cert.pem(), self.root_pem))
    }

    /// `spiffe://<td>/ns/<ns>/sa/<sa>` → (ns, sa), for this trust domain only.
    pub fn parse_identity<'a>(&self, id: &'a str) -> Option<(&'a str, &'a str)> {
        let rest = id
            .strip_prefix("spiffe://")?
            .strip_prefix(self.trust_domain.as_str())?;
        let mut parts = rest.strip_prefix('/')?.split('/');
        match (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) {
            (Some("ns"), Some(ns), Some("sa"), Some(sa), None)
                if !ns.is_empty() && !sa.is_empty() =>
            {
                Some((ns, sa))
            }
            _ => None,
        }
    }

    /// Control's own TLS certificate for `names` (DNS names or IPs): (chain PEM, key PEM).
    pub fn serving_cert(&self, names: &[String]) -> Result<(String, String)> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(names.to_vec())?;
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, "trellis-control");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let now = OffsetDateTime::now_utc();
        params.not_before = now - SKEW;
        params.not_after = now + ROOT_TTL / 10;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok((
            format!("{}{}", cert.pem(), self.root_pem),
            key.serialize_pem(),
        ))
    }
}

fn write_private(path: &Path, text: &str) -> Result<()> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(text.as_bytes())?;
    Ok(())
}

/// A key and CSR for `identity`, as an agent makes them (for tests of signing; the agent makes
/// its own, since it does not link control).
pub fn workload_csr(identity: &str) -> Result<(String, String)> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![SanType::URI(identity.try_into()?)];
    let csr = params.serialize_request(&key)?;
    Ok((csr.pem()?, key.serialize_pem()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ca() -> Ca {
        let (cert, key) = Ca::generate_root("cluster.local").unwrap();
        Ca::from_pem(&cert, &key, "cluster.local", Duration::from_secs(24 * 3600)).unwrap()
    }

    #[test]
    fn signs_only_identities_on_the_node() {
        let ca = ca();
        let (csr, _key) = workload_csr("spiffe://cluster.local/ns/shop/sa/web").unwrap();
        let chain = ca
            .sign_workload(&csr, "n1", |ns, sa| ns == "shop" && sa == "web")
            .unwrap();
        assert_eq!(chain.matches("BEGIN CERTIFICATE").count(), 2);
        let err = ca.sign_workload(&csr, "n1", |_, _| false).unwrap_err();
        assert_eq!(
            err.to_string(),
            "no pod on node n1 runs as spiffe://cluster.local/ns/shop/sa/web"
        );
    }

    #[test]
    fn refuses_foreign_or_malformed_identities() {
        let ca = ca();
        for id in [
            "spiffe://evil.org/ns/shop/sa/web",
            "spiffe://cluster.local/ns/shop",
            "spiffe://cluster.local/ns/a/sa/b/c",
        ] {
            let (csr, _) = workload_csr(id).unwrap();
            assert!(
                matches!(
                    ca.sign_workload(&csr, "n1", |_, _| true),
                    Err(SignError::BadIdentity(_))
                ),
                "{id}"
            );
        }
        assert!(matches!(
            ca.sign_workload("garbage", "n1", |_, _| true),
            Err(SignError::BadCsr(_))
        ));
    }

    #[test]
    fn root_is_kept_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let a = Ca::load_or_create_in(dir.path(), "td", Duration::from_secs(60)).unwrap();
        let b = Ca::load_or_create_in(dir.path(), "td", Duration::from_secs(60)).unwrap();
        assert_eq!(a.root_pem(), b.root_pem());
        use std::os::unix::fs::PermissionsExt as _;
        let mode = fs::metadata(dir.path().join("ca-key.pem"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}

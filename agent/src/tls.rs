//! Mutual TLS 1.3 for HBONE, built from a workload's SVID. Chains are checked against the mesh
//! root; identities are SPIFFE URIs, which carry no DNS name, so the client's verifier checks the
//! chain only and the caller compares the peer's SPIFFE ID with the one control said it has
//! before a byte of the app's data is sent.
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use anyhow::{Context as _, Result, bail};
use rustls::{
    ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{CryptoProvider, WebPkiSupportedAlgorithms},
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime, pem::PemObject},
    server::{ParsedCertificate, WebPkiClientVerifier},
};

use tokio::sync::watch;

use crate::identity::{Svid, Svids};

/// HBONE's ALPN: HTTP/2 only.
const ALPN_H2: &[u8] = b"h2";

pub(crate) fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The TLS configs one workload identity uses as HBONE client and server.
pub struct WorkloadTls {
    pub svid: Arc<Svid>,
    pub client: Arc<ClientConfig>,
    pub server: Arc<ServerConfig>,
}

impl WorkloadTls {
    pub fn new(svid: Arc<Svid>) -> Result<Self> {
        let provider = provider();
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(svid.cert_chain_pem.as_bytes())
                .collect::<Result<_, _>>()
                .context("the workload certificate chain is not PEM")?;
        let key = PrivateKeyDer::from_pem_slice(svid.key_pem.as_bytes())
            .context("the workload key is not PEM")?;
        let mut roots = RootCertStore::empty();
        for root in CertificateDer::pem_slice_iter(svid.root_pem.as_bytes()) {
            roots
                .add(root.context("the mesh root is not PEM")?)
                .context("the mesh root is not a usable CA certificate")?;
        }
        let roots = Arc::new(roots);

        let client_verifier =
            WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
                .build()
                .context("building the client certificate verifier")?;
        let mut server = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(client_verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .context("the workload certificate does not match its key")?;
        server.alpn_protocols = vec![ALPN_H2.to_vec()];

        let verifier = Arc::new(MeshServerVerifier {
            roots,
            algorithms: provider.signature_verification_algorithms,
        });
        let mut client = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_auth_cert(chain, key)
            .context("the workload certificate does not match its key")?;
        client.alpn_protocols = vec![ALPN_H2.to_vec()];
        Ok(Self {
            svid,
            client: Arc::new(client),
            server: Arc::new(server),
        })
    }
}

/// The server name sent in HBONE handshakes; nothing checks it (identities are SPIFFE URIs).
pub fn server_name() -> ServerName<'static> {
    ServerName::try_from("hbone.trellis.invalid").expect("static name")
}

/// The SPIFFE ID (URI SAN) of the leaf a peer presented.
pub fn peer_identity(certs: Option<&[CertificateDer<'_>]>) -> Result<String> {
    let leaf = certs
        .and_then(|c| c.first())
        .context("the peer presented no certificate")?;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref())
        .context("the peer's certificate is not X.509")?;
    let san = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .context("the peer's certificate has no subject alternative name")?;
    for name in &san.value.general_names {
        if let x509_parser::extensions::GeneralName::URI(uri) = name
            && uri.starts_with("spiffe://")
        {
            return Ok((*uri).to_owned());
        }
    }
    bail!("the peer's certificate has no spiffe:// URI")
}

/// Checks a server's chain against the mesh root (no name check: see the module comment).
#[derive(Debug)]
struct MeshServerVerifier {
    roots: Arc<RootCertStore>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for MeshServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.algorithms.all,
        )?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// TLS configs for the identities this node holds, rebuilt when a certificate is renewed.
pub struct TlsStore {
    svids: watch::Receiver<Svids>,
    built: Mutex<HashMap<String, Arc<WorkloadTls>>>,
}

impl TlsStore {
    pub fn new(svids: watch::Receiver<Svids>) -> Self {
        Self {
            svids,
            built: Mutex::default(),
        }
    }

    /// The configs for `identity`'s current certificate; None until it has one.
    pub fn get(&self, identity: &str) -> Option<Arc<WorkloadTls>> {
        let svid = self.svids.borrow().get(identity).cloned()?;
        let mut built = self.built.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(t) = built.get(identity)
            && Arc::ptr_eq(&t.svid, &svid)
        {
            return Some(t.clone());
        }
        match WorkloadTls::new(svid) {
            Ok(t) => {
                let t = Arc::new(t);
                built.insert(identity.to_owned(), t.clone());
                Some(t)
            }
            Err(e) => {
                tracing::warn!(identity, "unusable workload certificate: {e:#}");
                None
            }
        }
    }
}

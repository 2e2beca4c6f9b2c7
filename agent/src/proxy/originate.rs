//! TLS origination to hosts outside the mesh (a DestinationRule's `tls.mode: SIMPLE` for a
//! ServiceEntry host): the app speaks plaintext to the mesh, the proxy speaks TLS to the host,
//! checking its certificate against the rule's CA file.
use std::{io, path::PathBuf, sync::Arc};

use rustls::{
    ClientConfig, RootCertStore,
    pki_types::{CertificateDer, ServerName, pem::PemObject},
};
use serde::Serialize;
use tokio::net::TcpStream;
use tokio_rustls::{TlsConnector, client::TlsStream};

/// Where and how to originate TLS.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TlsOrigination {
    /// The name sent and checked; None: the host connected to.
    pub sni: Option<String>,
    pub ca_file: PathBuf,
}

impl TlsOrigination {
    pub fn compile(t: &trellis_api::TlsOrigination) -> Self {
        Self {
            sni: (!t.sni.is_empty()).then(|| t.sni.clone()),
            ca_file: PathBuf::from(&t.ca_file),
        }
    }

    /// TLS over `tcp` to `host` (or the SNI). The CA file is read per connection, so a rotated
    /// bundle is used at once.
    pub async fn connect(&self, tcp: TcpStream, host: &str) -> io::Result<TlsStream<TcpStream>> {
        let pem = std::fs::read(&self.ca_file).map_err(|e| {
            io::Error::other(format!(
                "reading the CA file {}: {e}",
                self.ca_file.display()
            ))
        })?;
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(&pem) {
            let cert = cert.map_err(|e| {
                io::Error::other(format!(
                    "{}: not PEM certificates: {e}",
                    self.ca_file.display()
                ))
            })?;
            roots.add(cert).map_err(io::Error::other)?;
        }
        if roots.is_empty() {
            return Err(io::Error::other(format!(
                "{} holds no certificate",
                self.ca_file.display()
            )));
        }
        let config = ClientConfig::builder_with_provider(crate::tls::provider())
            .with_safe_default_protocol_versions()
            .map_err(io::Error::other)?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let name = ServerName::try_from(self.sni.as_deref().unwrap_or(host).to_owned())
            .map_err(io::Error::other)?;
        TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
    }
}

//! Wiring: a source feeds the model, the gRPC server serves it over TLS with the mesh CA.
use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::{Context as _, Result};
use tokio::{net::TcpListener, sync::watch, task::JoinHandle};
use tonic::transport::{Identity, Server, ServerTlsConfig};
use tracing::info;

use crate::{
    auth::Authenticator,
    ca::Ca,
    model::Cluster,
    server::{ControlState, MeshControlService},
    source::dir::DirSource,
};

/// How often the directory source looks for changes.
const POLL: Duration = Duration::from_millis(300);

pub struct ControlConfig {
    pub source_dir: PathBuf,
    pub listen: SocketAddr,
    pub trust_domain: String,
    /// Where the root CA is kept (`ca.pem`, `ca-key.pem`); created on first start.
    pub ca_dir: PathBuf,
    pub bootstrap_token_file: PathBuf,
    /// DNS names and IPs in control's serving certificate.
    pub server_names: Vec<String>,
    pub workload_cert_ttl: Duration,
}

/// A running control service; dropping it stops it.
pub struct Control {
    pub addr: SocketAddr,
    pub state: Arc<ControlState>,
    /// Errors of the source's bad files, as they stand.
    pub source_errors: watch::Receiver<Vec<String>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Control {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

pub async fn start(cfg: ControlConfig) -> Result<Control> {
    let ca = Ca::load_or_create_in(&cfg.ca_dir, &cfg.trust_domain, cfg.workload_cert_ttl)?;
    let auth = Authenticator::bootstrap_token_file(&cfg.bootstrap_token_file)?;
    let mut source = DirSource::new(&cfg.source_dir)?;
    source.poll();
    let (model_tx, model_rx) = watch::channel(Arc::new(source.cluster()));
    let (errors_tx, errors_rx) = watch::channel(source.errors());
    let poller = tokio::spawn(async move {
        loop {
            tokio::time::sleep(POLL).await;
            if source.poll() {
                let cluster = source.cluster();
                model_tx.send_if_modified(|m| replace_if_changed(m, cluster));
                errors_tx.send_replace(source.errors());
            }
        }
    });

    let (cert, key) = ca.serving_cert(&cfg.server_names)?;
    let state = ControlState::new(model_rx, ca, auth);
    let listener = TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("binding {} (set --listen)", cfg.listen))?;
    let addr = listener.local_addr()?;
    let tls = ServerTlsConfig::new().identity(Identity::from_pem(cert, key));
    let service =
        trellis_api::mesh_control_server::MeshControlServer::new(MeshControlService(state.clone()));
    let router = Server::builder()
        .tls_config(tls)
        .context("configuring TLS")?
        .add_service(service);
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    let server = tokio::spawn(async move {
        if let Err(e) = router.serve_with_incoming(incoming).await {
            tracing::error!("gRPC server stopped: {e}");
        }
    });
    info!(%addr, source = %cfg.source_dir.display(), "control listening");
    Ok(Control {
        addr,
        state,
        source_errors: errors_rx,
        tasks: vec![poller, server],
    })
}

fn replace_if_changed(current: &mut Arc<Cluster>, next: Cluster) -> bool {
    if **current == next {
        return false;
    }
    *current = Arc::new(next);
    true
}

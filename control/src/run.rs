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
    source,
};

/// How often the directory source looks for changes.
const POLL: Duration = Duration::from_millis(300);

pub enum Mode {
    /// A directory of YAML; the CA in a directory; agents present a bootstrap token.
    Dir {
        path: PathBuf,
        ca_dir: PathBuf,
        bootstrap_token_file: PathBuf,
    },
    /// The Kubernetes API; the CA in Secret `<namespace>/<ca_secret>`; agents present their
    /// projected token for service account `<namespace>/<agent_service_account>`.
    Kube {
        client: kube::Client,
        namespace: String,
        ca_secret: String,
        agent_service_account: String,
    },
}

pub struct ControlConfig {
    pub mode: Mode,
    pub listen: SocketAddr,
    pub trust_domain: String,
    /// DNS names and IPs in control's serving certificate.
    pub server_names: Vec<String>,
    pub workload_cert_ttl: Duration,
}

/// A running control service; dropping it stops it.
pub struct Control {
    pub addr: SocketAddr,
    pub state: Arc<ControlState>,
    /// Errors of bad source objects, as they stand.
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
    let (model_tx, model_rx) = watch::channel(Arc::new(Cluster::default()));
    let (errors_tx, errors_rx) = watch::channel(Vec::new());
    let (ready_tx, ready_rx) = watch::channel(false);
    let (ca, auth, source_task) = match cfg.mode {
        Mode::Dir {
            path,
            ca_dir,
            bootstrap_token_file,
        } => {
            let ca = Ca::load_or_create_in(&ca_dir, &cfg.trust_domain, cfg.workload_cert_ttl)?;
            let auth = Authenticator::bootstrap_token_file(&bootstrap_token_file)?;
            let mut src = source::dir::DirSource::new(&path)?;
            info!(source = %path.display(), "reading the cluster from a directory");
            let task = tokio::spawn(async move {
                let mut first = true;
                loop {
                    if src.poll() || first {
                        let cluster = src.cluster();
                        model_tx.send_if_modified(|m| replace_if_changed(m, cluster));
                        errors_tx.send_replace(src.errors());
                        ready_tx.send_replace(true);
                        first = false;
                    }
                    tokio::time::sleep(POLL).await;
                }
            });
            (ca, auth, task)
        }
        Mode::Kube {
            client,
            namespace,
            ca_secret,
            agent_service_account,
        } => {
            let ca = Ca::load_or_create_secret(
                &client,
                &namespace,
                &ca_secret,
                &cfg.trust_domain,
                cfg.workload_cert_ttl,
            )
            .await?;
            let auth = Authenticator::Kube {
                client: client.clone(),
                namespace,
                service_account: agent_service_account,
            };
            info!("watching the cluster through the Kubernetes API");
            (
                ca,
                auth,
                tokio::spawn(source::kube::run(client, model_tx, errors_tx, ready_tx)),
            )
        }
    };

    let (cert, key) = ca.serving_cert(&cfg.server_names)?;
    let state = ControlState::new(model_rx, ready_rx, ca, auth);
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
    info!(%addr, "control listening");
    Ok(Control {
        addr,
        state,
        source_errors: errors_rx,
        tasks: vec![source_task, server],
    })
}

fn replace_if_changed(current: &mut Arc<Cluster>, next: Cluster) -> bool {
    if **current == next {
        return false;
    }
    *current = Arc::new(next);
    true
}

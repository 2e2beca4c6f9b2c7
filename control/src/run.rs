//! Wiring: a source (supervised) feeds the model, the gRPC server serves it over TLS with the
//! mesh CA, and the metrics endpoint reports on both.
use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context as _, Result};
use tokio::{net::TcpListener, sync::watch, task::JoinHandle};
use tonic::transport::{Identity, Server, ServerTlsConfig};
use tracing::info;

use crate::{
    auth::Authenticator,
    ca::Ca,
    metrics::{self, Metrics},
    model::Cluster,
    server::{ControlState, MeshControlService},
    source::{self, Outputs, supervise},
};

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
    /// Istio's root namespace (mesh-wide security policies and outbound-policy label).
    pub root_namespace: String,
    /// The mesh-wide outbound traffic policy is REGISTRY_ONLY (else ALLOW_ANY).
    pub registry_only: bool,
    /// DNS names and IPs in control's serving certificate.
    pub server_names: Vec<String>,
    pub workload_cert_ttl: Duration,
    /// Where to serve `/metrics`, `/healthz` and `/readyz` (plain HTTP); None: not served.
    pub metrics_listen: Option<SocketAddr>,
}

/// A running control service; dropping it stops it.
pub struct Control {
    pub addr: SocketAddr,
    /// Where the metrics endpoint listens, if it does.
    pub metrics_addr: Option<SocketAddr>,
    pub state: Arc<ControlState>,
    pub metrics: Arc<Metrics>,
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
    let metrics = Metrics::new();
    let (model, model_rx) = watch::channel(Arc::new(Cluster::default()));
    let (errors, errors_rx) = watch::channel(Vec::new());
    let (ready, ready_rx) = watch::channel(false);
    let out = Arc::new(Outputs {
        model,
        errors,
        ready,
        metrics: metrics.clone(),
    });
    let (ca, auth, source_task) = match cfg.mode {
        Mode::Dir {
            path,
            ca_dir,
            bootstrap_token_file,
        } => {
            let ca = Ca::load_or_create_in(&ca_dir, &cfg.trust_domain, cfg.workload_cert_ttl)?;
            let auth = Authenticator::bootstrap_token_file(&bootstrap_token_file)?;
            // Kept across restarts of the source, so bad files keep their last good objects.
            let src = Arc::new(Mutex::new(source::dir::DirSource::new(&path)?));
            info!(source = %path.display(), "reading the cluster from a directory");
            let task = tokio::spawn(supervise("dir", metrics.clone(), move || {
                source::dir::run(src.clone(), out.clone())
            }));
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
                reviewed: Default::default(),
            };
            info!("watching the cluster through the Kubernetes API");
            let task = tokio::spawn(supervise("kube", metrics.clone(), move || {
                source::kube::run(client.clone(), out.clone())
            }));
            (ca, auth, task)
        }
    };
    let mut tasks = vec![source_task];
    let metrics_addr = match cfg.metrics_listen {
        Some(addr) => {
            let listener = metrics::bind(addr).await?;
            let bound = listener.local_addr()?;
            tasks.push(tokio::spawn(metrics::serve(
                listener,
                metrics.clone(),
                ready_rx.clone(),
            )));
            Some(bound)
        }
        None => None,
    };

    let (cert, key) = ca.serving_cert(&cfg.server_names)?;
    let mesh = crate::compile::Mesh {
        trust_domain: cfg.trust_domain.clone(),
        root_namespace: cfg.root_namespace.clone(),
        registry_only: cfg.registry_only,
    };
    let (compiled, compiled_rx) = watch::channel(None);
    tasks.push(tokio::spawn(crate::compile::follow(
        model_rx.clone(),
        ready_rx.clone(),
        mesh.clone(),
        compiled,
        metrics.clone(),
    )));
    let state = ControlState::new(
        model_rx,
        ready_rx,
        compiled_rx,
        ca,
        auth,
        mesh,
        metrics.clone(),
    );
    let listener = TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("binding {} (set --listen)", cfg.listen))?;
    let addr = listener.local_addr()?;
    let tls = ServerTlsConfig::new().identity(Identity::from_pem(cert, key));
    let service =
        trellis_api::mesh_control_server::MeshControlServer::new(MeshControlService(state.clone()))
            .max_encoding_message_size(trellis_api::MAX_MESSAGE_BYTES)
            .max_decoding_message_size(trellis_api::MAX_MESSAGE_BYTES);
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
    tasks.push(server);
    Ok(Control {
        addr,
        metrics_addr,
        state,
        metrics,
        source_errors: errors_rx,
        tasks,
    })
}

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};
use trellis_control::{
    install,
    istio::parse_duration,
    run::{self, ControlConfig, Mode},
};

#[derive(Parser)]
#[command(
    name = "trellis-control",
    version,
    about = "Trellis control service: watches the cluster, streams per-node config to agents over gRPC/TLS, \
             and signs workload certificates."
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Where the cluster comes from: `kube` (watch the Kubernetes API, using $KUBECONFIG or the
    /// in-cluster service account) or `dir:PATH` (a directory of Kubernetes YAML: Namespaces,
    /// Pods with spec.nodeName and status.podIP, Services, Istio policies; re-read on change).
    #[arg(long, default_value = "kube", value_parser = parse_source)]
    source: Source,
    /// Kube mode: control's namespace, holding the CA Secret and the agents' service account.
    #[arg(long, default_value = "trellis-system")]
    namespace: String,
    /// Kube mode: the Secret (in --namespace) holding the mesh root CA; created on first start.
    #[arg(long, default_value = "trellis-ca")]
    ca_secret: String,
    /// Kube mode: the service account agents run as; only its pod-bound tokens are accepted.
    #[arg(long, default_value = "trellis-agent")]
    agent_service_account: String,
    /// gRPC (TLS) listen address for agents.
    #[arg(long, default_value = "0.0.0.0:15012")]
    listen: SocketAddr,
    /// Plain-HTTP address for /metrics (Prometheus), /healthz and /readyz (15014, as istiod's).
    #[arg(long, default_value = "0.0.0.0:15014")]
    metrics_addr: SocketAddr,
    /// SPIFFE trust domain: identities are spiffe://<trust-domain>/ns/<ns>/sa/<sa>.
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
    /// Istio's root namespace: its selector-less PeerAuthentication and AuthorizationPolicies
    /// apply mesh-wide, and its outbound-traffic-policy label is every namespace's default.
    #[arg(long, default_value = trellis_control::compile::ROOT_NAMESPACE, value_parser = dns_label)]
    root_namespace: String,
    /// The mesh-wide outbound traffic policy (Istio's meshConfig.outboundTrafficPolicy.mode), for
    /// namespaces whose label (and the root namespace's) says nothing.
    #[arg(long, value_enum, default_value_t = Outbound::AllowAny)]
    outbound_traffic_policy: Outbound,
    /// Dir mode: directory holding the mesh root CA (ca.pem, ca-key.pem). Created on first
    /// start and reused after; put your own root there to supply one.
    #[arg(long, default_value = "/var/lib/trellis-control")]
    ca_dir: PathBuf,
    /// Dir mode: file with the token agents must present (`authorization: Bearer <token>`).
    #[arg(long)]
    bootstrap_token_file: Option<PathBuf>,
    /// Names (DNS or IP) in control's TLS certificate; agents must dial one of them.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "trellis-control,trellis-control.trellis-system.svc,localhost,127.0.0.1"
    )]
    server_names: Vec<String>,
    /// Lifetime of workload certificates (e.g. 24h, 90m; at least 10s, and below 10m only for
    /// tests: each agent renews at half life).
    #[arg(long, default_value = "24h")]
    workload_cert_ttl: String,
    /// Log filter (level or tracing directives).
    #[arg(long, default_value = "info", env = "TRELLIS_LOG")]
    log_level: String,
}

#[derive(Subcommand)]
enum Command {
    /// Print the manifests that install Trellis on a cluster (deploy/: CRDs, RBAC, control,
    /// the agent DaemonSet), for `trellis-control install | kubectl apply -f -`.
    Install {
        /// The agent's image.
        #[arg(long, default_value_t = install::Values::default().agent_image)]
        agent_image: String,
        /// Control's image.
        #[arg(long, default_value_t = install::Values::default().control_image)]
        control_image: String,
        /// SPIFFE trust domain of the workloads' identities.
        #[arg(long, default_value_t = install::Values::default().trust_domain)]
        trust_domain: String,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, clap::ValueEnum)]
enum Outbound {
    #[value(name = "ALLOW_ANY")]
    AllowAny,
    #[value(name = "REGISTRY_ONLY")]
    RegistryOnly,
}

fn dns_label(s: &str) -> Result<String, String> {
    trellis_control::names::dns1123_label(s).map(|()| s.to_owned())
}

#[derive(Clone, Debug, PartialEq)]
enum Source {
    Kube,
    Dir(PathBuf),
}

fn parse_source(s: &str) -> Result<Source, String> {
    match s.split_once(':') {
        Some(("dir", path)) if !path.is_empty() => Ok(Source::Dir(PathBuf::from(path))),
        None if s == "kube" => Ok(Source::Kube),
        _ => Err(format!("expected `kube` or `dir:PATH`, got {s:?}")),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::Install {
        agent_image,
        control_image,
        trust_domain,
    }) = &cli.command
    {
        let values = install::Values {
            agent_image: agent_image.clone(),
            control_image: control_image.clone(),
            trust_domain: trust_domain.clone(),
        };
        return match install::render(&values) {
            Ok(yaml) => {
                print!("{yaml}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("trellis-control install: {e:#}");
                ExitCode::from(2)
            }
        };
    }
    let filter = match tracing_subscriber::EnvFilter::try_new(&cli.log_level) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("trellis-control: bad --log-level: {e}");
            return ExitCode::from(2);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colours only on a terminal: `kubectl logs` and files get plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match tokio::runtime::Runtime::new()
        .map_err(anyhow::Error::from)
        .and_then(|rt| rt.block_on(run(cli)))
    {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<()> {
    let Some(ttl) = parse_duration(&cli.workload_cert_ttl) else {
        bail!(
            "--workload-cert-ttl {:?}: not a duration (e.g. 24h)",
            cli.workload_cert_ttl
        );
    };
    if ttl < Duration::from_secs(10) {
        bail!("--workload-cert-ttl must be at least 10s (certificates are renewed at half life)");
    }
    if ttl < Duration::from_secs(600) {
        tracing::warn!(
            ttl = cli.workload_cert_ttl,
            "workload certificates this short are renewed every few minutes or faster; meant for tests"
        );
    }
    let mode = match cli.source {
        Source::Dir(path) => Mode::Dir {
            path,
            ca_dir: cli.ca_dir,
            bootstrap_token_file: cli
                .bootstrap_token_file
                .context("--source dir: needs --bootstrap-token-file")?,
        },
        Source::Kube => Mode::Kube {
            client: kube::Client::try_default().await.context(
                "connecting to Kubernetes (set KUBECONFIG, or run in a pod with a service account)",
            )?,
            namespace: cli.namespace,
            ca_secret: cli.ca_secret,
            agent_service_account: cli.agent_service_account,
        },
    };
    let _control = run::start(ControlConfig {
        mode,
        listen: cli.listen,
        metrics_listen: Some(cli.metrics_addr),
        trust_domain: cli.trust_domain,
        root_namespace: cli.root_namespace,
        registry_only: cli.outbound_traffic_policy == Outbound::RegistryOnly,
        server_names: cli.server_names,
        workload_cert_ttl: ttl,
    })
    .await?;
    // SIGTERM is how Kubernetes stops a pod; without it control would wait out the grace period.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("listening for SIGTERM")?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.context("waiting for Ctrl-C")?,
        _ = term.recv() => {}
    }
    tracing::info!("stopping");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_is_kube_or_a_dir() {
        assert_eq!(
            parse_source("dir:/etc/trellis").unwrap(),
            Source::Dir(PathBuf::from("/etc/trellis"))
        );
        assert_eq!(parse_source("kube").unwrap(), Source::Kube);
        for bad in ["", "dir:", "file:/x", "kubernetes"] {
            assert!(parse_source(bad).is_err(), "{bad:?} accepted");
        }
    }
}

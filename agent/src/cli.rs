//! Command line: `trellis-agent run` and `trellis-agent cleanup`.
use std::{net::SocketAddr, path::PathBuf, process::ExitCode, sync::Arc, time::Duration};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};
use ipnet::IpNet;
use tokio::{io::unix::AsyncFd, signal::unix::SignalKind};
use tracing::{error, info, level_filters::LevelFilter};
use tracing_subscriber::EnvFilter;

use crate::{
    access::{self, Observe},
    admin, cgroup,
    metrics::{self, Metrics},
    netns::Netns,
    otlp,
    pods::{PodSource, PodsFile, Reconciler},
    proxy::{self, ConnLimits, HttpLimits, LogThrottle, Pool, Shared, Workers},
    ready::Readiness,
    redirect::{self, Redirect, RedirectConfig},
    state::MeshState,
    tap::Tap,
    tls::TlsStore,
    uninstall::{self, Verdict},
};

#[derive(Parser)]
#[command(
    name = "trellis-agent",
    version,
    about = "Trellis node agent: captures enrolled pods' traffic with eBPF and proxies it."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log filter: a level (error, warn, info, debug, trace) or tracing directives such as
    /// `info,trellis_agent=debug`. At debug the kernel programs' own log lines appear too.
    #[arg(long, global = true, default_value = "info", env = "TRELLIS_LOG")]
    log_level: String,
    /// Log line format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Access log: a record per proxied HTTP request from both node proxies and per TCP
    /// connection at close. `text`: a log line each (target `trellis::access`, in
    /// --log-format's format); `json`: Envoy's default JSON fields, a line each on stdout.
    /// Bare `--access-log` means `text`. Off by default, as in Istio: at high request rates it
    /// costs about a quarter of the proxy's throughput.
    #[arg(
        long,
        global = true,
        env = "TRELLIS_ACCESS_LOG",
        value_enum,
        num_args = 0..=1,
        default_missing_value = "text",
        default_value = "off"
    )]
    access_log: access::Format,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Scheduler {
    /// Each worker thread runs its own runtime and keeps the connections it is given, with
    /// everything they start: no wake-ups across threads, more requests per core.
    ThreadPerCore,
    /// tokio's work-stealing pool: an idle thread takes tasks from a busy one.
    WorkStealing,
}

#[derive(Subcommand)]
enum Command {
    /// Load and attach the capture programs (adopting any pinned by an earlier agent), enroll
    /// the pods listed in --pods, and proxy their traffic. Runs until SIGTERM or Ctrl-C; capture
    /// stays pinned after it exits.
    Run(Box<RunArgs>),
    /// Detach and remove everything the agent pinned for a node. Stop the agent first.
    Cleanup(PinArgs),
    /// Subscribe to control as NODE and print each config update it sends (acknowledging it),
    /// without capturing anything: to see what control tells this node.
    WatchConfig(WatchArgs),
}

#[derive(clap::Args)]
struct WatchArgs {
    /// This node's name.
    #[arg(long, env = "NODE_NAME")]
    node: String,
    #[command(flatten)]
    control: ControlArgs,
}

#[derive(clap::Args)]
struct ControlArgs {
    /// Control's gRPC address, e.g. https://trellis-control.trellis-system.svc:15012.
    #[arg(long)]
    control_url: Option<String>,
    /// The mesh root CA (PEM) that signed control's certificate (dir mode: <ca-dir>/ca.pem).
    #[arg(long)]
    control_ca: Option<PathBuf>,
    /// Name in control's certificate to check (default: the URL's host).
    #[arg(long)]
    control_server_name: Option<String>,
    /// File holding the token presented to control (kube mode: the projected service-account
    /// token; dir mode: the bootstrap token).
    #[arg(long)]
    control_token_file: Option<PathBuf>,
}

impl ControlArgs {
    fn endpoint(self) -> Result<crate::config::ControlEndpoint> {
        let (Some(url), Some(ca_file), Some(token_file)) =
            (self.control_url, self.control_ca, self.control_token_file)
        else {
            bail!("talking to control needs --control-url, --control-ca and --control-token-file");
        };
        let server_name = match self.control_server_name {
            Some(n) => n,
            None => url
                .parse::<hyper::Uri>()
                .ok()
                .and_then(|u| u.host().map(str::to_owned))
                .with_context(|| format!("--control-url {url:?} has no host"))?,
        };
        Ok(crate::config::ControlEndpoint {
            url,
            ca_file,
            server_name,
            token_file,
        })
    }
}

#[derive(clap::Args)]
struct PinArgs {
    /// This node's name; names the pin directory (<pin-root>/<node>).
    #[arg(long, env = "NODE_NAME")]
    node: String,
    /// Where programs, links and maps are pinned (on a BPF filesystem).
    #[arg(long, default_value = "/sys/fs/bpf/trellis")]
    pin_root: PathBuf,
}

#[derive(clap::Args)]
struct RunArgs {
    /// Proxy worker threads (default: one per CPU). With 1, the proxy runs on the main thread
    /// (tokio's current-thread scheduler).
    #[arg(long, env = "TRELLIS_WORKER_THREADS", value_parser = clap::value_parser!(u16).range(1..=256))]
    worker_threads: Option<u16>,
    /// How the worker threads share connections. No effect with one worker thread.
    #[arg(long, value_enum, default_value_t = Scheduler::ThreadPerCore, env = "TRELLIS_SCHEDULER")]
    scheduler: Scheduler,
    #[command(flatten)]
    pins: PinArgs,
    /// cgroup v2 directory the capture programs attach to; pods are found below it in the
    /// kubelet layout (kubepods.slice/… or kubepods/…). Default: the cgroup v2 mount point.
    #[arg(long)]
    cgroup_root: Option<PathBuf>,
    /// JSON file listing the pods to capture: {"pods":[{"uid","namespace","name","ips":[..]}]}.
    /// Re-read when it changes; a bad edit is reported and the previous list kept. Without it,
    /// the pods come from control (--control-url …), which also issues their certificates.
    #[arg(long)]
    pods: Option<PathBuf>,
    #[command(flatten)]
    control: ControlArgs,
    /// Admin endpoint (/healthz, /readyz, /pods). Keep it on localhost.
    #[arg(long, default_value = "127.0.0.1:15000")]
    admin_addr: SocketAddr,
    /// Metrics endpoint (/metrics in Prometheus format, /healthz, /readyz).
    #[arg(long, default_value = "0.0.0.0:15020")]
    metrics_addr: SocketAddr,
    /// Destination ports never captured outbound, comma-separated (e.g. 22,2379).
    #[arg(long, value_delimiter = ',')]
    exclude_ports: Vec<u16>,
    /// Destination CIDRs never captured outbound, comma-separated (e.g. 169.254.0.0/16,fd00::/8).
    #[arg(long, value_delimiter = ',')]
    exclude_cidrs: Vec<IpNet>,
    /// Resolver (ADDR:PORT) for ServiceEntry hosts with resolution DNS when the pod has asked
    /// none itself (a gateway pod). Default: the first nameserver in /etc/resolv.conf.
    #[arg(long)]
    dns_upstream: Option<SocketAddr>,
    #[command(flatten)]
    limits: LimitArgs,
    #[command(flatten)]
    traces: TraceArgs,
    /// The DaemonSet running this agent (NAMESPACE/NAME). On SIGTERM the agent asks the API
    /// server about it: if it, or its namespace, is gone or being deleted, or the API server
    /// refuses the agent's credentials, Trellis is being uninstalled and the agent removes its
    /// capture; otherwise (a restart, an upgrade) capture stays pinned for the next agent.
    /// Without it capture always stays (remove it with `trellis-agent cleanup`).
    #[arg(long, env = "TRELLIS_DAEMONSET")]
    daemonset: Option<uninstall::DaemonSetRef>,
}

/// Trace export (docs/observability-traces-logs.md).
#[derive(clap::Args)]
struct TraceArgs {
    /// Export a span per proxied HTTP request, from both node proxies, to this OTLP/gRPC
    /// collector (http://HOST:PORT; an OpenTelemetry collector, Jaeger or Tempo listen on 4317).
    #[arg(long, env = "TRELLIS_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
    /// Percentage (0 to 100) of the traces started at this proxy that are sampled; a request
    /// that carries a trace context keeps its caller's decision.
    #[arg(long, env = "TRELLIS_TRACE_SAMPLING", default_value_t = 1.0, value_parser = parse_percent)]
    trace_sampling: f64,
}

fn parse_percent(text: &str) -> Result<f64, String> {
    match text.trim_end_matches('%').parse::<f64>() {
        Ok(p) if (0.0..=100.0).contains(&p) => Ok(p),
        _ => Err(format!(
            "{text:?} is not a percentage from 0 to 100 (e.g. 1, 0.5 or 100)"
        )),
    }
}

/// What one client, pod or flood may take of the node (docs/agent.md, "Limits").
#[derive(clap::Args)]
struct LimitArgs {
    /// Connections open at once through the node's proxy, all pods together; past it new ones
    /// are reset. Default: the open-file limit (raised to its hard limit at start) less 2048.
    #[arg(long, env = "TRELLIS_MAX_CONNECTIONS")]
    max_connections: Option<usize>,
    /// Connections open at once per pod (captured in, captured out and HBONE streams to it).
    #[arg(long, env = "TRELLIS_MAX_CONNECTIONS_PER_POD", default_value_t = 16384)]
    max_connections_per_pod: usize,
    /// HTTP/1: how long a request's head may take to arrive, counted from when the proxy starts
    /// waiting for it (so it also closes idle keep-alive connections), e.g. 30s.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    http_header_read_timeout: Duration,
    /// HTTP connections with no byte moving either way for this long are closed (Envoy's
    /// default, 1h).
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    http_idle_timeout: Duration,
    /// Largest request head (HTTP/1) or header list (HTTP/2), in bytes (Envoy's default, 60 KiB).
    #[arg(long, default_value_t = 60 * 1024, value_parser = clap::value_parser!(u32).range(8192..=1024 * 1024))]
    http_max_header_bytes: u32,
    /// Concurrent HTTP/2 streams per app connection.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..))]
    http_max_concurrent_streams: u32,
}

/// A duration such as `500ms`, `30s`, `5m` or `1h`, more than zero and at most a week (timers
/// add it to the clock, which must not overflow).
fn parse_duration(text: &str) -> Result<Duration, String> {
    const WEEK: Duration = Duration::from_secs(7 * 24 * 3600);
    match humantime::parse_duration(text) {
        Ok(d) if !d.is_zero() && d <= WEEK => Ok(d),
        Ok(_) => Err("must be more than zero and at most a week".into()),
        Err(e) => Err(format!("{e} (write e.g. 500ms, 30s, 5m or 1h)")),
    }
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let text_access_log = cli.access_log == access::Format::Text;
    if let Err(e) = init_logging(&cli.log_level, cli.log_format, text_access_log) {
        eprintln!("trellis-agent: {e:#}");
        return ExitCode::from(2);
    }
    let result = match cli.command {
        Command::Cleanup(args) => redirect::cleanup(&args.pin_root, &args.node)
            .map(|()| info!(node = args.node, "removed all pinned capture state")),
        Command::WatchConfig(args) => tokio::runtime::Runtime::new()
            .context("starting the runtime")
            .and_then(|rt| rt.block_on(watch_config(args))),
        Command::Run(args) => {
            // One worker: everything on this thread, without the work-stealing scheduler's
            // wake-ups across threads and its per-batch bookkeeping. Thread per core: the proxy
            // has threads of its own (`proxy::Workers`) and this one runs the agent's own work
            // (pods, config, admin).
            let mut runtime = if args.worker_threads == Some(1) || args.per_core() {
                tokio::runtime::Builder::new_current_thread()
            } else {
                let mut multi = tokio::runtime::Builder::new_multi_thread();
                if let Some(n) = args.worker_threads {
                    multi.worker_threads(n.into());
                }
                multi
            };
            runtime
                .enable_all()
                .build()
                .context("starting the runtime")
                .and_then(|rt| rt.block_on(run(*args, cli.access_log)))
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The text access log's target (`access`), on or off whatever the level says.
const ACCESS_ON: &str = "trellis::access=info";
const ACCESS_OFF: &str = "trellis::access=off";

fn init_logging(filter: &str, format: LogFormat, access_log: bool) -> Result<()> {
    let filter = EnvFilter::try_new(filter)
        .with_context(|| format!("bad --log-level {filter:?}"))?
        .add_directive(if access_log {
            ACCESS_ON.parse()?
        } else {
            ACCESS_OFF.parse()?
        });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colours only on a terminal: `kubectl logs` and files get plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    }
    .map_err(|e| anyhow::anyhow!("{e}"))
}

impl RunArgs {
    /// Thread per core, unless work stealing is asked for or there is one worker (the main
    /// thread itself).
    fn per_core(&self) -> bool {
        self.scheduler == Scheduler::ThreadPerCore && self.worker_threads != Some(1)
    }
}

async fn run(args: RunArgs, access_log: access::Format) -> Result<()> {
    let per_core = args.per_core();
    let cgroup_root = match args.cgroup_root {
        Some(root) => root,
        None => cgroup::cgroup2_mount()?,
    };
    let cfg = RedirectConfig {
        pin_root: args.pins.pin_root,
        node: args.pins.node,
        cgroup_root: cgroup_root.clone(),
        exclude_ports: args.exclude_ports,
        exclude_cidrs: args.exclude_cidrs,
        kernel_debug_log: LevelFilter::current() >= LevelFilter::DEBUG,
    };
    let (redirect, maps, logger) = Redirect::open(&cfg)?;
    crate::memory::release_freed();
    let admin = admin::bind(args.admin_addr).await?;
    let metrics_listener = metrics::bind(args.metrics_addr).await?;
    info!(node = cfg.node, cgroup_root = %cgroup_root.display(), "capture programs attached");
    tokio::spawn(forward_kernel_logs(logger));

    let home = Arc::new(Netns::current().context("opening the agent's own network namespace")?);
    let (svids_tx, svids) = tokio::sync::watch::channel(crate::identity::Svids::new());
    let (state_tx, state) = tokio::sync::watch::channel(Arc::new(MeshState::default()));
    let metrics = Metrics::new();
    let limits = args.limits;
    let (open_files, node_limit) =
        proxy::open_file_budget().context("raising the open-file limit")?;
    let max_connections = limits.max_connections.unwrap_or(node_limit);
    info!(
        open_files,
        max_connections,
        per_pod = limits.max_connections_per_pod,
        "connection limits"
    );
    let workers = if per_core {
        // One per CPU this process may use (its cgroup's quota counts).
        let n = args.worker_threads.map_or_else(
            || std::thread::available_parallelism().map_or(1, |n| n.get()),
            usize::from,
        );
        info!(workers = n, "thread per core");
        Workers::per_core(n)?
    } else {
        Workers::Runtime
    };
    let shared = Arc::new(Shared {
        workers,
        maps,
        state: state.clone(),
        tls: TlsStore::new(svids.clone()),
        pool: Pool::default(),
        local: Default::default(),
        balancer: Default::default(),
        metrics: metrics.clone(),
        node_netns: crate::netns::netns_cookie(std::os::fd::AsFd::as_fd(&metrics_listener))
            .context("reading the node's network namespace cookie")?,
        limits: ConnLimits::new(max_connections, limits.max_connections_per_pod),
        http: HttpLimits {
            header_read_timeout: limits.http_header_read_timeout,
            idle_timeout: limits.http_idle_timeout,
            max_header_bytes: limits.http_max_header_bytes,
            max_concurrent_streams: limits.http_max_concurrent_streams,
        },
        throttle: LogThrottle::default(),
        dns_upstream: args.dns_upstream.or_else(crate::dns::system_resolver),
        observe: Observe {
            format: access_log,
            tap: Tap::new(metrics.tap_dropped.clone()),
            traces: args
                .traces
                .otlp_endpoint
                .as_deref()
                .map(|e| otlp::Exporter::start(e, &cfg.node, metrics.spans.clone()))
                .transpose()?,
            sampling: args.traces.trace_sampling,
            node: cfg.node.clone(),
        },
    });
    let admin_shared = shared.clone();
    let mut reconciler = Reconciler::new(redirect, cgroup_root, home, shared);
    let mut source = match (args.pods, &args.control.control_url) {
        (Some(file), None) => PodSource::File(PodsFile::new(&file)),
        (None, Some(_)) => PodSource::control(
            args.control.endpoint()?,
            cfg.node.clone(),
            svids_tx,
            state_tx,
        ),
        _ => bail!(
            "give exactly one pod source: --pods FILE, or --control-url with --control-ca and --control-token-file"
        ),
    };
    // A config change reaches the kernel (STRICT and REGISTRY_ONLY marks, the registry) at once,
    // not at the next tick.
    let mut changes = state.clone();
    let readiness = Readiness {
        status: reconciler.status(),
        svids,
        state,
    };
    tokio::spawn(admin::serve(admin, readiness.clone(), admin_shared));
    tokio::spawn(metrics::serve(metrics_listener, metrics, readiness));

    let mut term = tokio::signal::unix::signal(SignalKind::terminate())?;
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            Ok(()) = changes.changed() => {}
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        }
        if let Some(pods) = source.poll() {
            reconciler.set_desired(pods);
        }
        reconciler.reconcile();
    }
    let verdict = match &args.daemonset {
        Some(ds) => uninstall::verdict(ds).await,
        None => Verdict::Restart("no --daemonset to ask about".into()),
    };
    match verdict {
        Verdict::Uninstall(why) => {
            info!("stopping for good ({why}): removing capture");
            reconciler
                .remove_capture()
                .context("removing capture on uninstall")?;
            info!("capture removed; pods talk directly again");
        }
        Verdict::Restart(why) => {
            info!("stopping ({why}); capture stays attached (pinned) for the next agent")
        }
    }
    Ok(())
}

async fn watch_config(args: WatchArgs) -> Result<()> {
    let endpoint = args.control.endpoint()?;
    crate::config::follow(endpoint, args.node, |config, update| {
        let kind = if update.snapshot { "snapshot" } else { "update" };
        println!(
            "version {} ({kind}): {} upserts, {} removals; now {} workloads, {} services, {} policies",
            update.version,
            update.upserts.len(),
            update.removals.len(),
            config.workloads().count(),
            config.services().count(),
            config.policies().count()
        );
        for w in config.workloads() {
            println!("  workload {}/{} {} {}", w.namespace, w.name, w.ips.join(","), w.identity);
        }
    })
    .await;
    Ok(())
}

/// Copies the kernel programs' aya-log records into our log.
async fn forward_kernel_logs(logger: aya_log::EbpfLogger<&'static dyn log::Log>) {
    // SAFETY: the logger owns its ring buffer fd for as long as the AsyncFd holds the logger.
    let mut fd = match unsafe { AsyncFd::register(logger) } {
        Ok(fd) => fd,
        Err(e) => return error!("cannot poll the kernel log ring buffer: {e}"),
    };
    loop {
        let Ok(mut guard) = fd.readable_mut().await else {
            return;
        };
        guard.get_inner_mut().flush();
        guard.clear_ready();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_log_flag_is_text_when_bare_and_sampling_a_percentage() {
        let parse = |args: &[&str]| Cli::try_parse_from(args).map(|c| c.access_log);
        let base = ["trellis-agent", "cleanup", "--node", "n"];
        assert_eq!(parse(&base).unwrap(), access::Format::Off);
        assert_eq!(
            parse(&[&base[..], &["--access-log"]].concat()).unwrap(),
            access::Format::Text
        );
        assert_eq!(
            parse(&[&base[..], &["--access-log", "json"]].concat()).unwrap(),
            access::Format::Json
        );
        assert!(parse(&[&base[..], &["--access-log", "xml"]].concat()).is_err());
        // The flag's old boolean values (TRELLIS_ACCESS_LOG=true) keep their meaning.
        assert_eq!(
            parse(&[&base[..], &["--access-log=true"]].concat()).unwrap(),
            access::Format::Text
        );
        assert_eq!(
            parse(&[&base[..], &["--access-log=false"]].concat()).unwrap(),
            access::Format::Off
        );
        assert_eq!(parse_percent("100"), Ok(100.0));
        assert_eq!(parse_percent("0.5%"), Ok(0.5));
        assert!(parse_percent("101").is_err() && parse_percent("-1").is_err());
    }

    #[test]
    fn durations_are_positive_and_need_a_unit() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        for bad in [
            "30",
            "s",
            "0s",
            "-1s",
            "10x",
            "8days",
            "9999999999999999999h",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad} accepted");
        }
    }
}

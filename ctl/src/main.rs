//! trellisctl: validates mesh YAML offline, checks a node and the mesh, and shows what the agents
//! hold and how workloads fare. See docs/trellisctl.md.
mod analyze;
mod check;
mod cluster;
mod fetch;
mod graph;
mod prom;
mod prometheus;
mod stat;
mod table;
mod tap;
mod targets;
mod workloads;

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use anyhow::Result;
use clap::{Args, Parser, Subcommand};

use targets::Agent;

#[derive(Parser)]
#[command(
    name = "trellisctl",
    version,
    about = "Inspect and check a Trellis mesh"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Where the agents are.
#[derive(Args)]
struct AgentArgs {
    /// A node's agent: NODE=NETNS (its node's network namespace, by `ip netns` name or path),
    /// NODE=local (this host's), NODE=HOST:PORT (its metrics port only), or NODE alone (a
    /// namespace of that name). Repeat for each node; none: the agent on this host.
    #[arg(long = "agent", value_name = "NODE=WHERE", conflicts_with = "kube")]
    agents: Vec<Agent>,
    /// Find the agents (and, for check, control) through the Kubernetes API: KUBECONFIG,
    /// ~/.kube/config or a pod's service account.
    #[arg(long)]
    kube: bool,
    /// Trellis's namespace, with --kube.
    #[arg(long, default_value = "trellis-system", value_name = "NS")]
    trellis_namespace: String,
    /// With --kube: reach every agent and control through the API server (port-forwards to
    /// their pods), as from outside the cluster's network. Without it only agents on other
    /// nodes are.
    #[arg(long, requires = "kube")]
    port_forward: bool,
}

impl AgentArgs {
    async fn cluster(&self) -> Result<Option<cluster::Cluster>> {
        if !self.kube {
            return Ok(None);
        }
        let cluster = cluster::Cluster::connect(&self.trellis_namespace, self.port_forward).await?;
        Ok(Some(cluster))
    }

    /// The agents named, found in the cluster, or the one on this host.
    async fn resolve(&self) -> Result<Vec<Agent>> {
        match self.cluster().await? {
            Some(cluster) => cluster.agents().await,
            None => Ok(targets::agents(&self.agents)),
        }
    }

    /// `node`'s agent.
    async fn node(&self, node: &str) -> Result<Agent> {
        if !self.kube {
            return targets::agent_for(node, &self.agents);
        }
        let agents = self.resolve().await?;
        let known: Vec<&str> = agents.iter().map(|a| a.node.as_str()).collect();
        match agents.iter().find(|a| a.node == node) {
            Some(a) => Ok(a.clone()),
            None => anyhow::bail!(
                "no agent on node {node:?}; agents run on: {}",
                known.join(", ")
            ),
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Validate Kubernetes and Istio YAML offline, with control's own parser.
    Analyze {
        /// Files, or directories read as control's dir source reads them.
        #[arg(required = true, value_name = "FILE|DIR")]
        paths: Vec<PathBuf>,
    },
    /// Check the node's kernel, control, and every agent; exit 1 if anything is wrong.
    Check {
        /// Only the node checks (kernel, BTF, cgroup v2, bpffs, BPF features).
        #[arg(long)]
        kernel_only: bool,
        /// Control's --metrics-addr (/metrics, /healthz, /readyz). Default: 127.0.0.1:15014,
        /// or with --kube control's pod.
        #[arg(long, value_name = "ADDR")]
        control_metrics: Option<SocketAddr>,
        /// The network namespace to reach control's metrics from.
        #[arg(long, value_name = "NETNS")]
        control_netns: Option<String>,
        #[command(flatten)]
        agents: AgentArgs,
    },
    /// A node agent's config, as its proxy uses it (pretty JSON).
    ConfigDump {
        /// The node (as named by --agent, or an --agent value itself).
        node: String,
        #[command(flatten)]
        agents: AgentArgs,
    },
    /// Enrolled pods per node: identity, certificate expiry, protocol per port, mTLS mode, policies.
    Workloads {
        /// Only this namespace (default: all).
        #[arg(short, long)]
        namespace: Option<String>,
        #[command(flatten)]
        agents: AgentArgs,
    },
    /// A workload's success rate, requests per second and latency percentiles.
    Stat {
        /// deploy/NAME: the workload (Istio's destination_workload label).
        target: String,
        #[arg(short, long, default_value = "default")]
        namespace: String,
        /// Query this Prometheus (http://HOST:PORT) over the last minute, instead of the agents.
        #[arg(long, value_name = "URL")]
        prometheus: Option<String>,
        /// The network namespace to reach Prometheus from.
        #[arg(long, value_name = "NETNS")]
        prometheus_netns: Option<String>,
        /// Without Prometheus: how long between the two scrapes of the agents.
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        window: Duration,
        #[command(flatten)]
        agents: AgentArgs,
    },
    /// Live requests through a workload, as its callers' and its own node proxies see them.
    Tap {
        /// deploy/NAME: the workload (as source or destination).
        target: String,
        #[arg(short, long, default_value = "default")]
        namespace: String,
        /// Only requests whose path starts so.
        #[arg(long, value_name = "PREFIX")]
        path_prefix: Option<String>,
        /// Only requests of this method.
        #[arg(long)]
        method: Option<String>,
        /// Stop after this many requests.
        #[arg(long, value_name = "N")]
        max: Option<u64>,
        /// Stop after this long (e.g. 30s).
        #[arg(long, value_parser = humantime::parse_duration)]
        duration: Option<Duration>,
        /// `json`: each request as the agent's access-log record.
        #[arg(short, long, default_value = "text", value_parser = ["text", "json"])]
        output: String,
        #[command(flatten)]
        agents: AgentArgs,
    },
    /// Serve a live service graph (workload → service → workload): a page and /graph.json.
    Graph {
        /// Where to serve it.
        #[arg(long, default_value = "127.0.0.1:15080", value_name = "ADDR")]
        listen: SocketAddr,
        /// Rates over the last minute from this Prometheus (http://HOST:PORT), instead of the agents.
        #[arg(long, value_name = "URL")]
        prometheus: Option<String>,
        /// The network namespace to reach Prometheus from.
        #[arg(long, value_name = "NETNS")]
        prometheus_netns: Option<String>,
        /// How often the graph is updated; from the agents, rates are over the last interval.
        #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
        interval: Duration,
        #[command(flatten)]
        agents: AgentArgs,
    },
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    match run(Cli::parse()).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs the command; false when it found something wrong (and said what).
async fn run(cli: Cli) -> Result<bool> {
    match cli.command {
        Command::Analyze { paths } => {
            let report = analyze::analyze(&paths)?;
            print!("{}", report.render());
            Ok(report.errors.is_empty())
        }
        Command::Check {
            kernel_only,
            control_metrics,
            control_netns,
            agents,
        } => {
            let default_control = SocketAddr::from(([127, 0, 0, 1], 15014));
            let mut cluster_checks = Vec::new();
            let (control, agents) = match agents.cluster().await? {
                Some(cluster) if !kernel_only => {
                    cluster_checks = cluster.checks().await;
                    let control = match control_metrics {
                        Some(addr) => targets::control(addr, control_netns.as_deref()),
                        None => cluster.control().await.unwrap_or_else(|e| {
                            cluster_checks.push(check::Outcome::fail(
                                "control's pod found",
                                format!("{e:#}"),
                                "see control's Deployment",
                            ));
                            targets::control(default_control, None)
                        }),
                    };
                    let agents = cluster.agents().await.unwrap_or_else(|e| {
                        cluster_checks.push(check::Outcome::fail(
                            "agents' pods found",
                            format!("{e:#}"),
                            "see the agents' DaemonSet",
                        ));
                        Vec::new()
                    });
                    (control, agents)
                }
                _ => (
                    targets::control(
                        control_metrics.unwrap_or(default_control),
                        control_netns.as_deref(),
                    ),
                    agents.resolve().await?,
                ),
            };
            let mesh = (!kernel_only).then_some(check::Mesh {
                cluster: cluster_checks,
                control: &control,
                agents: &agents,
            });
            let outcomes = check::run(mesh).await;
            for o in &outcomes {
                println!("{}", o.line());
            }
            let failed = outcomes.iter().filter(|o| o.result.is_err()).count();
            let skipped = outcomes.iter().filter(|o| o.skipped.is_some()).count();
            let made = outcomes.len() - skipped;
            let note = if skipped > 0 {
                format!(" ({skipped} not checked)")
            } else {
                String::new()
            };
            if failed == 0 {
                println!("\nall {made} checks passed{note}");
            } else {
                println!("\n{failed} of {made} checks failed{note}");
            }
            Ok(failed == 0)
        }
        Command::ConfigDump { node, agents } => {
            let agent = agents.node(&node).await?;
            print!("{}", workloads::config_dump(&agent).await?);
            Ok(true)
        }
        Command::Workloads { namespace, agents } => {
            let mut views = Vec::new();
            let mut ok = true;
            for agent in agents.resolve().await? {
                match workloads::fetch(&agent).await {
                    Ok(v) => views.push(v),
                    Err(e) => {
                        eprintln!("node {}: {e:#}", agent.node);
                        ok = false;
                    }
                }
            }
            print!("{}", workloads::render(&views, namespace.as_deref()));
            Ok(ok)
        }
        Command::Stat {
            target,
            namespace,
            prometheus,
            prometheus_netns,
            window,
            agents,
        } => {
            let name = stat::workload_name(&target)?;
            let golden = match prometheus {
                Some(url) => {
                    let ep = prometheus::endpoint(&url, prometheus_netns.as_deref()).await?;
                    stat::from_prometheus(&ep, name, &namespace).await?
                }
                None => {
                    stat::from_agents(&agents.resolve().await?, name, &namespace, window).await?
                }
            };
            print!("{}", stat::render(name, &namespace, &golden));
            Ok(true)
        }
        Command::Tap {
            target,
            namespace,
            path_prefix,
            method,
            max,
            duration,
            output,
            agents,
        } => {
            let filter = tap::Filter {
                namespace: &namespace,
                workload: stat::workload_name(&target)?,
                path_prefix: path_prefix.as_deref(),
                method: method.as_deref(),
            };
            let limits = tap::Limits { max, duration };
            tap::run(&agents.resolve().await?, &filter, output == "json", limits).await
        }
        Command::Graph {
            listen,
            prometheus,
            prometheus_netns,
            interval,
            agents,
        } => {
            let source = match prometheus {
                Some(url) => graph::Source::Prometheus(
                    prometheus::endpoint(&url, prometheus_netns.as_deref()).await?,
                ),
                None => graph::Source::Agents(agents.resolve().await?),
            };
            graph::serve(listen, source, interval).await?;
            Ok(true)
        }
    }
}

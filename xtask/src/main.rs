//! `cargo xtask <task>`: the project's own commands. See README.md.
mod apiserver;
mod bench;
mod bench_control;
mod cluster;
mod cmd;
mod demo;
mod ebpf;
mod fuzz;
mod images;
mod manifests;
mod setup;
mod test;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Trellis developer tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what this machine lacks: nightly rust-src, bpf-linker 0.13.0 (built against
    /// nightly's own LLVM, cached in ~/.cache/trellis), Debian packages the tests use,
    /// cargo-fuzz. Idempotent.
    Setup,
    /// Build the kernel programs (through the agent's build script) and print the object's path.
    BuildEbpf,
    /// Run setup if needed, then every test: formatting, clippy, unit, integration and
    /// real-kernel end-to-end tests, the demo, and 10 s of each fuzz target. Needs root.
    Test {
        /// Extra arguments for `cargo test` (after `--`), e.g. a test name filter.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Run the fuzz targets in fuzz/ (cargo-fuzz, libFuzzer) from their committed corpora and
    /// print how many inputs each executed. See docs/fuzzing.md.
    Fuzz {
        /// One target (istio_yaml, config_apply, http_route, hbone_connect, orig_dst, authz, dns_answer); default:
        /// all of them, one after the other.
        target: Option<String>,
        /// Seconds per target (the default: 10).
        #[arg(long, conflicts_with = "runs")]
        time: Option<u64>,
        /// Executions per target, instead of a time.
        #[arg(long)]
        runs: Option<u64>,
    },
    /// Build the container images (agent, control, the test app) without a Docker daemon: OCI
    /// archives in target/images/, imported into the `cluster up` node when one runs.
    Images {
        /// Pack the debug binaries instead of building release ones (quicker, for tests).
        #[arg(long)]
        debug: bool,
        /// Where to write the archives (default: target/images).
        #[arg(long, value_name = "DIR")]
        out: Option<std::path::PathBuf>,
    },
    /// Write the generated deployment files: the mesh CRDs in deploy/crds/ (a test checks the
    /// committed copy is current).
    Manifests,
    /// Bring up a node with demo pods under the real agent, send traffic through the capture
    /// layer, and print what was captured. Stays up until Ctrl-C unless --once.
    Demo {
        /// Run the scenario once, print the summary and exit (non-zero if anything failed).
        #[arg(long)]
        once: bool,
    },
    /// Benchmark on a two-node cluster, the same pods without the mesh (direct) and through
    /// Trellis: iperf3 throughput, 1 KB echo latency at 1000 req/s, connection rate, agent CPU
    /// and memory; and HTTP/1.1 and HTTP/2 latency and max request rate with an L7 route, also
    /// through haproxy for reference. Prints tables. Needs root. `bench control` measures
    /// trellis-control at scale instead.
    #[command(args_conflicts_with_subcommands = true)]
    Bench {
        #[command(subcommand)]
        section: Option<BenchSection>,
        /// Also write every raw figure to this JSON file.
        #[arg(long, value_name = "FILE")]
        json: Option<std::path::PathBuf>,
        /// Seconds per measured run (throughput, latency, connection rate).
        #[arg(long, default_value_t = 10)]
        duration_secs: u64,
        /// Record the proxies with perf during each latency, connection-rate and max-rate run,
        /// into this directory (data and a flat summary per run).
        #[arg(long, value_name = "DIR")]
        profile: Option<std::path::PathBuf>,
        /// The agents' proxy worker threads (`--worker-threads`); default one per CPU.
        #[arg(long, value_name = "N")]
        agent_worker_threads: Option<u16>,
        /// The agents' scheduler (`--scheduler`); default the agent's own, thread per core.
        #[arg(long, value_name = "SCHEDULER", value_parser = ["thread-per-core", "work-stealing"])]
        agent_scheduler: Option<String>,
        /// Run each L7 latency step this many times in a row (the issue's "in each of 5
        /// consecutive runs": `--repeat 5`).
        #[arg(long, default_value_t = 1, value_name = "N")]
        repeat: u32,
        /// Measure only Trellis (no direct, haproxy or pair phases, so no ratios or targets):
        /// a quicker run while tuning the agent.
        #[arg(long)]
        mesh_only: bool,
    },
    /// A real single-node Kubernetes on this machine (kubelet, containerd, kube-proxy, built by
    /// setup): `up` stays up until `down` or Ctrl-C and prints how to use kubectl with it;
    /// `down` removes everything it made; `status` shows each daemon and the node. Needs root.
    Cluster {
        #[command(subcommand)]
        action: cluster::Action,
    },
}

#[derive(Subcommand)]
enum BenchSection {
    /// trellis-control with 10,000 pods, 1,000 services, 200 VirtualServices and 50 simulated
    /// agents: how long a change takes to reach every agent, update and snapshot sizes,
    /// control's memory and CPU. Needs `cargo xtask setup` for `--source kube`.
    Control(bench_control::Args),
}

fn main() -> ExitCode {
    let result = match Cli::parse().task {
        Task::Setup => setup::run(),
        Task::BuildEbpf => ebpf::run(),
        Task::Test { args } => test::run(&args),
        Task::Demo { once } => demo::run(once),
        Task::Fuzz { target, time, runs } => fuzz::run(
            target.as_deref(),
            match (runs, time) {
                (Some(n), _) => fuzz::Limit::Runs(n),
                (None, t) => fuzz::Limit::Secs(t.unwrap_or(10)),
            },
        ),
        Task::Manifests => manifests::run(),
        Task::Images { debug, out } => images::run(debug, out),
        Task::Bench {
            section: Some(BenchSection::Control(args)),
            ..
        } => bench_control::run(args),
        Task::Bench {
            section: None,
            json,
            duration_secs,
            profile,
            agent_worker_threads,
            agent_scheduler,
            repeat,
            mesh_only,
        } => bench::run(
            json,
            duration_secs,
            profile,
            bench::Threads {
                workers: agent_worker_threads,
                scheduler: agent_scheduler,
            },
            repeat,
            mesh_only,
        ),
        Task::Cluster { action } => cluster::run(action),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

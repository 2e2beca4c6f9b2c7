//! `cargo xtask bench control`: trellis-control at scale. The release binary serves a generated
//! cluster (10,000 pods on 50 nodes, 1,000 services, 200 VirtualServices) from `dir:` YAML or
//! a real kube-apiserver to 50 simulated agents, and the bench times each of a series of
//! changes from the write until every agent has acknowledged the update that carries it.
//! See docs/benchmarks.md, "Control plane at scale".
mod agents;
mod cluster;
mod dir_files;
mod kube_api;
mod report;

use std::{
    fs,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};
use tokio::{sync::watch, time::Instant};

use agents::{Applied, Credentials, Expect};
use cluster::{Change, Cluster};

#[derive(clap::Args)]
pub struct Args {
    /// Also write every raw figure to this JSON file.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Where control reads the cluster from: YAML files (`dir`), a real kube-apiserver
    /// (`kube`, built by `cargo xtask setup`), or one after the other.
    #[arg(long, value_enum, default_value_t = Sources::Both)]
    source: Sources,
    /// Changes measured per source (pod added, endpoint removed, VirtualService edited, in turn).
    #[arg(long, default_value_t = 100, value_name = "N")]
    changes: usize,
}

#[derive(Clone, Copy, PartialEq, clap::ValueEnum)]
enum Sources {
    Dir,
    Kube,
    Both,
}

/// Past this, a change that has not reached every agent fails the run. Far above the target, so
/// that a slow control is measured rather than cut off.
const CHANGE_TIMEOUT: Duration = Duration::from_secs(120);
/// Control start to every agent holding its snapshot (kube mode lists 10,000 pods first).
const START_TIMEOUT: Duration = Duration::from_secs(180);

pub fn run(args: Args) -> Result<()> {
    if !(1..=1000).contains(&args.changes) {
        bail!("--changes must be 1..=1000");
    }
    crate::setup::tools()?;
    let bin = crate::bench::build_release()?.join("trellis-control");
    let sources: &[&str] = match args.source {
        Sources::Dir => &["dir"],
        Sources::Kube => &["kube"],
        Sources::Both => &["dir", "kube"],
    };
    let rt = tokio::runtime::Runtime::new()?;
    let mut reports = Vec::new();
    for source in sources {
        let dir = std::env::temp_dir().join(format!(
            "trellis-bench-control-{}-{source}",
            std::process::id()
        ));
        fs::create_dir_all(&dir)?;
        // Kept when the run fails: control's log is there.
        let report = rt
            .block_on(bench(source, &bin, &dir, args.changes))
            .with_context(|| {
                format!(
                    "bench control, source {source} (files in {})",
                    dir.display()
                )
            })?;
        let _ = fs::remove_dir_all(&dir);
        reports.push(report);
    }
    report::print(&reports, args.changes);
    if let Some(path) = args.json {
        let all = json!({
            "cluster": {
                "nodes": cluster::NODES,
                "pods": cluster::PODS,
                "services": cluster::SERVICES,
                "virtual_services": cluster::VIRTUAL_SERVICES,
                "agents": cluster::NODES,
            },
            "sources": reports,
        });
        fs::write(&path, serde_json::to_string_pretty(&all)? + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("bench: wrote {}", path.display());
    }
    Ok(())
}

enum Target {
    Dir(dir_files::Dir),
    Kube(Box<kube_api::Kube>),
}

impl Target {
    async fn apply(&self, model: &Cluster, change: &Change) -> Result<()> {
        match self {
            Target::Dir(d) => d.apply(model, change),
            Target::Kube(k) => k.apply(change).await,
        }
    }
}

/// trellis-control as a child process, stopped on drop.
struct ControlProcess {
    child: Child,
    log: PathBuf,
}

impl ControlProcess {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails, with the end of its log, if control has exited.
    fn check(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            let log = fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            bail!("trellis-control exited ({status}):\n{}", tail.join("\n"));
        }
        Ok(())
    }
}

impl Drop for ControlProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> Result<SocketAddr> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

async fn bench(source: &str, bin: &Path, work: &Path, changes: usize) -> Result<Value> {
    let mut model = Cluster::new();
    let (listen, metrics) = (free_port()?, free_port()?);
    let mut command = Command::new(bin);
    command.args([
        "--listen",
        &listen.to_string(),
        "--metrics-addr",
        &metrics.to_string(),
    ]);
    let target = if source == "dir" {
        let dir = dir_files::Dir::create(&work.join("cluster"), &model)?;
        eprintln!("bench: cluster written as YAML in {}", dir.path.display());
        let token = work.join("token");
        fs::write(&token, "bench-control-bootstrap-token")?;
        command
            .arg(format!("--source=dir:{}", dir.path.display()))
            .arg("--ca-dir")
            .arg(work.join("ca"))
            .arg("--bootstrap-token-file")
            .arg(token);
        Target::Dir(dir)
    } else {
        let kube = kube_api::start().await?;
        command
            .args(["--source", "kube"])
            .env("KUBECONFIG", kube.control_kubeconfig(work).await?);
        Target::Kube(Box::new(kube))
    };
    let log = work.join("control.log");
    let started = Instant::now();
    eprintln!("bench: starting trellis-control --source {source}");
    let mut control = ControlProcess {
        child: command
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log)?)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?,
        log,
    };
    wait_listening(listen, &mut control).await?;
    let (ca_pem, tokens) = match &target {
        Target::Dir(_) => (
            fs::read_to_string(work.join("ca/ca.pem"))?,
            vec!["bench-control-bootstrap-token".to_owned(); cluster::NODES],
        ),
        Target::Kube(k) => (
            k.mesh_root(Duration::from_secs(30)).await?,
            k.agent_tokens.clone(),
        ),
    };
    let (expect_tx, expect_rx) = watch::channel(None);
    let mut applied = agents::start(
        Credentials {
            url: format!("https://{listen}"),
            ca_pem,
            server_name: "localhost".into(),
            tokens,
        },
        (0..cluster::NODES).map(cluster::node).collect(),
        expect_rx,
        START_TIMEOUT,
    );

    // Every agent's snapshot.
    let mut snapshots: Vec<Option<Applied>> = (0..cluster::NODES).map(|_| None).collect();
    while snapshots.iter().any(Option::is_none) {
        control.check()?;
        let Ok(next) = tokio::time::timeout(Duration::from_secs(1), applied.recv()).await else {
            if started.elapsed() > START_TIMEOUT {
                let have = snapshots.iter().flatten().count();
                bail!(
                    "only {have}/{} agents had a snapshot after {START_TIMEOUT:?}",
                    cluster::NODES
                );
            }
            continue;
        };
        let a = next.context("every agent stopped")??;
        if !a.snapshot {
            bail!("agent {} got an update before its snapshot", a.agent);
        }
        let i = a.agent;
        snapshots[i] = Some(a);
    }
    let first_snapshots = started.elapsed();
    let snapshots: Vec<Applied> = snapshots.into_iter().flatten().collect();
    // Every pod (as a workload or a peer), service and policy; and in kube mode the API
    // server's own `kubernetes` Service.
    let want = cluster::PODS
        + cluster::SERVICES
        + 2 * cluster::VIRTUAL_SERVICES
        + usize::from(matches!(target, Target::Kube(_)));
    if let Some(a) = snapshots.iter().find(|a| a.resources != want) {
        bail!(
            "agent {} holds {} resources after its snapshot, not the {want} generated (see {})",
            a.agent,
            a.resources,
            control.log.display()
        );
    }
    let rejected = rejected_objects(metrics)?;
    if rejected != 0 {
        bail!(
            "control refused {rejected} generated objects (see {})",
            control.log.display()
        );
    }
    eprintln!(
        "bench: {source}: all {} agents hold their snapshot {:.2} s after control started",
        cluster::NODES,
        first_snapshots.as_secs_f64()
    );

    let pid = control.pid();
    let (cpu_start, peak_start, rss_start) = (cpu_secs(pid)?, mb(pid, "VmHWM")?, mb(pid, "VmRSS")?);
    let (agents_start, machine_start) = (cpu_secs(std::process::id())?, machine_cpu_secs()?);
    // From here VmHWM is the peak during the changes.
    fs::write(format!("/proc/{pid}/clear_refs"), "5")?;
    let changes_started = Instant::now();
    let mut measured = Vec::new();
    for c in 0..changes {
        control.check()?;
        let change = model.change(c);
        let what = change.describe();
        // Nothing else changes the cluster, so nothing else should arrive; this keeps a stray
        // update from being counted as this change's.
        while let Ok(a) = applied.try_recv() {
            a?;
        }
        expect_tx.send_replace(Some((c, expect(&change))));
        target
            .apply(&model, &change)
            .await
            .with_context(|| format!("change {c} ({what})"))?;
        let written = Instant::now();
        let deadline = written + CHANGE_TIMEOUT;
        let mut bytes = vec![0; cluster::NODES];
        let mut acked: Vec<Option<Instant>> = vec![None; cluster::NODES];
        while acked.iter().any(Option::is_none) {
            let next = tokio::time::timeout_at(deadline, applied.recv()).await;
            let Ok(next) = next else {
                let have = acked.iter().flatten().count();
                bail!(
                    "change {c} ({what}): {have}/{} agents had acknowledged it {CHANGE_TIMEOUT:?} after it was written",
                    cluster::NODES
                );
            };
            let a = next.context("every agent stopped")??;
            if acked[a.agent].is_none() {
                bytes[a.agent] += a.bytes;
                if a.holds == Some(c) {
                    acked[a.agent] = Some(a.acked);
                }
            }
        }
        let last = acked.into_iter().flatten().max().unwrap_or(written);
        let latency = last.saturating_duration_since(written);
        measured.push(json!({
            "kind": change.kind(),
            "change": what,
            "one_pod": change.one_pod(),
            "latency_ms": ms(latency),
            "bytes_per_agent": bytes,
        }));
        if (c + 1) % 10 == 0 || c + 1 == changes {
            eprintln!(
                "bench: {source}: {}/{changes} changes; the last reached every agent in {:.0} ms",
                c + 1,
                ms(latency)
            );
        }
        // A pause that varies from change to change, so writes land at every phase of dir
        // mode's poll instead of locking onto it.
        tokio::time::sleep(Duration::from_millis((c * 131 % 300) as u64)).await;
    }
    let changes_wall = changes_started.elapsed();
    control.check()?;
    let cpu_changes = cpu_secs(pid)? - cpu_start;
    let agents_changes = cpu_secs(std::process::id())? - agents_start;
    let machine_changes = machine_cpu_secs()? - machine_start;
    let (peak_changes, rss_end) = (mb(pid, "VmHWM")?, mb(pid, "VmRSS")?);
    drop(control);
    drop(applied);

    let mut snapshot_bytes: Vec<usize> = snapshots.iter().map(|a| a.bytes).collect();
    snapshot_bytes.sort_unstable();
    Ok(json!({
        "source": source,
        "first_snapshots_s": first_snapshots.as_secs_f64(),
        "snapshot_bytes_per_node": snapshot_bytes,
        "control": {
            "rss_peak_start_mb": peak_start,
            "rss_after_start_mb": rss_start,
            "rss_peak_changes_mb": peak_changes,
            "rss_end_mb": rss_end,
            "cpu_start_s": cpu_start,
            "cpu_changes_s": cpu_changes,
            "changes_wall_s": changes_wall.as_secs_f64(),
        },
        // The machine is shared: what else ran beside control during the changes.
        "cpu_during_changes": {
            "agents_s": agents_changes,
            "machine_s": machine_changes,
            "others_s": machine_changes - cpu_changes - agents_changes,
        },
        "changes": measured,
    }))
}

/// What every node holds once `change` has reached it.
fn expect(change: &Change) -> Expect {
    match change {
        Change::AddPod(p) | Change::RemovePod(p) => Expect::Endpoint {
            service: p.service_key(),
            pod: p.name.clone(),
            present: matches!(change, Change::AddPod(_)),
        },
        Change::EditVs { v, weight } => Expect::Weight {
            service: format!("{}/{}", cluster::vs_namespace(*v), cluster::vs_name(*v)),
            weight: *weight,
        },
    }
}

async fn wait_listening(addr: SocketAddr, control: &mut ControlProcess) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        control.check()?;
        if Instant::now() > deadline {
            bail!("trellis-control did not listen on {addr} within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// `trellis_control_objects_rejected` from control's metrics endpoint (plain HTTP).
fn rejected_objects(metrics: SocketAddr) -> Result<u64> {
    let mut s = TcpStream::connect_timeout(&metrics, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: {metrics}\r\nConnection: close\r\n\r\n"
    )?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    text.lines()
        .find_map(|l| l.strip_prefix("trellis_control_objects_rejected "))
        .and_then(|v| v.trim().parse().ok())
        .context("no trellis_control_objects_rejected in control's metrics")
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) as f64 }
}

/// Seconds of CPU every process on the machine has used: /proc/stat's first line, less idle
/// and iowait.
fn machine_cpu_secs() -> Result<f64> {
    let stat = fs::read_to_string("/proc/stat")?;
    let f: Vec<u64> = stat
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("cpu "))
        .context("no cpu line in /proc/stat")?
        .split_whitespace()
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is inside user).
    let busy: u64 = f
        .iter()
        .take(8)
        .enumerate()
        .filter(|(i, _)| !matches!(i, 3 | 4))
        .map(|(_, v)| v)
        .sum();
    Ok(busy as f64 / clock_ticks())
}

/// Seconds of CPU (user + system) the process has used: /proc/PID/stat fields 14 and 15.
fn cpu_secs(pid: u32) -> Result<f64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let f: Vec<u64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|v| v.parse().ok())
        .collect();
    let [utime, stime] = f[..] else {
        bail!("unexpected /proc/{pid}/stat: {stat}");
    };
    Ok((utime + stime) as f64 / clock_ticks())
}

/// A /proc/PID/status memory field in MB (10^6 bytes).
fn mb(pid: u32, field: &str) -> Result<f64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map(|kib| kib * 1024.0 / 1e6)
        .with_context(|| format!("no {field} in /proc/{pid}/status"))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

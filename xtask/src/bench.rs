//! `cargo xtask bench`: the same client and server pods on a two-node cluster, measured without
//! the mesh (direct), through a pair of haproxies doing the mesh's work (mutual TLS between the
//! nodes: pair.rs), and through Trellis (control plus an agent per node); the L7 section (l7.rs)
//! also through a single plaintext haproxy. Prints tables and optionally writes every raw figure
//! as JSON. See docs/benchmarks.md.
mod haproxy;
mod l7;
mod memory;
mod pair;
mod profile;
mod same_node;

use std::{
    fs,
    io::{BufRead as _, BufReader, Read as _},
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use trellis_e2e::{
    Agent, Cluster, Node, Pod,
    control::Control,
    node::binary,
    serde_json::{self, Value, json},
};

use crate::{cmd, setup};

const NAMESPACE: &str = "bench";
const ECHO_PORT: u16 = 7000;
const IPERF_PORT: u16 = 5201;
/// The service VIP control is given for the server (used if the mesh serves VIPs).
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 70);
/// The latency run: a 1 KB echo at 1000 requests/s over 4 connections.
const RATE: u32 = 1000;
const CONNS: u32 = 4;
const SIZE: u32 = 1024;
/// The byte-exact check that opens each phase (and shows whether the connection was captured).
const BLAST_BYTES: u64 = 64 << 20;

/// Targets from the issue, shown beside the figures: throughput against direct and against the
/// pair, added p99 at RATE, the busier agent's CPU scaled to 1000 req/s and its peak RSS under
/// RATE, new connections per second against direct.
const TARGET_THROUGHPUT_RATIO: f64 = 0.5;
const TARGET_ADDED_P99_MS: f64 = 0.20;
const TARGET_VCPU_PER_1000: f64 = 0.06;
const TARGET_RSS_MB: f64 = 20.0;
const TARGET_IDLE_RSS_MB: f64 = 15.0;
const TARGET_HELD_RSS_MB: f64 = 60.0;
const TARGET_CONNECT_RATIO: f64 = 0.5;

/// How the agents run their proxy threads.
pub struct Threads {
    /// `--worker-threads` (default one per CPU).
    pub workers: Option<u16>,
    /// `--scheduler` (default the agent's, thread per core).
    pub scheduler: Option<String>,
}

pub fn run(
    json_out: Option<PathBuf>,
    duration_secs: u64,
    profile: Option<PathBuf>,
    threads: Threads,
    repeat: u32,
    mesh_only: bool,
) -> Result<()> {
    if !(1..=600).contains(&duration_secs) {
        bail!("--duration-secs must be 1..=600");
    }
    if !(1..=20).contains(&repeat) {
        bail!("--repeat must be 1..=20");
    }
    if let Some(dir) = profile {
        profile::enable(dir)?;
    }
    setup::tools()?;
    cmd::require_root("cargo xtask bench")?;
    if setup::which("iperf3").is_none() {
        bail!("iperf3 is missing (cargo xtask setup installs it)");
    }
    haproxy::binary()?;
    let bin_dir = build_release()?;
    // SAFETY: no other thread runs yet; the harness reads this to find its binaries.
    unsafe { std::env::set_var("TRELLIS_BIN_DIR", &bin_dir) };
    eprintln!("bench: binaries from {}", bin_dir.display());

    let duration = Duration::from_secs(duration_secs);
    let report = bench(duration, &threads, repeat, mesh_only)?;
    print_table(&report, duration_secs, &threads);
    if let Some(path) = json_out {
        fs::write(&path, serde_json::to_string_pretty(&report)? + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("bench: wrote {}", path.display());
    }
    Ok(())
}

/// Numbers come from optimized builds of everything that is measured. `bench control` builds
/// the same set, so both share one set of features and release artifacts (another set would
/// rebuild shared dependencies). Returns the directory of the binaries.
pub fn build_release() -> Result<PathBuf> {
    cmd::run(cmd::cargo().args([
        "build",
        "--release",
        "--bins",
        "-p",
        "trellis-agent",
        "-p",
        "trellis-control",
        "-p",
        "trellis-e2e",
    ]))?;
    Ok(cmd::target_dir().join("release"))
}

/// Brings the cluster up, runs the phases, and returns every figure. Everything made here is
/// removed when this returns (or unwinds): agents first, then control, pods and nodes.
fn bench(duration: Duration, threads: &Threads, repeat: u32, mesh_only: bool) -> Result<Value> {
    eprintln!(
        "bench: creating a two-node cluster; pods client, haproxy, pair-near and server-near on \
         node 1, server and pair-far on node 2"
    );
    let cluster = Cluster::new(2);
    let (n1, n2) = (&cluster.nodes[0], &cluster.nodes[1]);
    let client = n1.add_pod("client");
    // Not in the mesh: control is never told of them.
    let proxy_pod = n1.add_pod("haproxy");
    let (pair_near, pair_far) = (n1.add_pod("pair-near"), n2.add_pod("pair-far"));
    let server = n2.add_pod("server");
    // A 5 s connect loop closes tens of thousands of connections: let TIME-WAIT ports be reused
    // (needs TCP timestamps, on by default), in every namespace a connection starts from.
    for netns in [
        &client.netns,
        &proxy_pod.netns,
        &pair_near.netns,
        &pair_far.netns,
        &server.netns,
        &n1.name,
        &n2.name,
    ] {
        sysctl(netns, "net.ipv4.tcp_tw_reuse=1")?;
    }
    let _echo = start_echo(&server)?;
    let _iperf = start_iperf(&server)?;
    let _http = l7::start_server(&server)?;
    let near = same_node::NearServer::start(n1)?;
    let target = IpAddr::V4(server.ip4);

    let (direct, l7_direct, l7_haproxy, pair, l7_pair) = if mesh_only {
        eprintln!("bench: --mesh-only: skipping the direct, haproxy and pair phases");
        Default::default()
    } else {
        peers(
            &client, &proxy_pod, &pair_near, &pair_far, &server, duration, repeat,
        )?
    };
    let direct_near = if mesh_only {
        Value::Null
    } else {
        same_node::direct(&client, &near, duration)?
    };

    eprintln!("bench: phase trellis: starting control and an agent per node");
    let files = control_files(n1, n2, &client, &server);
    let files: Vec<(&str, &str)> = files.iter().map(|(n, y)| (*n, y.as_str())).collect();
    let control = Control::start(&cluster, &files);
    let workers = threads.workers.map(|n| n.to_string());
    let mut agent_args: Vec<&str> = match &workers {
        Some(n) => vec!["--worker-threads", n],
        None => Vec::new(),
    };
    if let Some(s) = &threads.scheduler {
        agent_args.extend(["--scheduler", s]);
    }
    let a1 = Agent::start_with_control_and(n1, &control, &agent_args);
    let a2 = Agent::start_with_control_and(n2, &control, &agent_args);
    a1.wait_pod_state(&client, "enrolled");
    a2.wait_pod_state(&server, "enrolled");
    wait_certificate(&a1, "bench-client")?;
    wait_certificate(&a2, "bench-server")?;
    eprintln!("bench: both pods enrolled; client -> {target} through the agents");
    let agents: Vec<(String, u32)> = [&a1, &a2]
        .iter()
        .map(|a| {
            Ok((
                format!("agent {}", a.node),
                a.pid().context("agent not running")?,
            ))
        })
        .collect::<Result<_>>()?;
    let pids: Vec<u32> = agents.iter().map(|a| a.1).collect();
    let idle = memory::resident(&pids)?;
    eprintln!(
        "bench: phase trellis: agents idle, RSS {} MB",
        idle["per_process"]
    );
    let mut trellis = phase("trellis", &client, target, &agents, duration, true)?;
    trellis["idle_rss_mb"] = idle;
    trellis["held"] = held(
        &client,
        SocketAddr::new(target, ECHO_PORT),
        &pids,
        memory::HELD,
        &trellis["idle_rss_mb"],
        "trellis",
    )?;

    // Through the service VIP as well, if the agents serve VIPs yet.
    let vip = SocketAddr::new(IpAddr::V4(VIP), ECHO_PORT);
    let probe = run_in(
        &client,
        &loadgen(),
        &[
            "blast",
            &vip.to_string(),
            "--bytes",
            "65536",
            "--timeout-secs",
            "5",
        ],
        Duration::from_secs(15),
    );
    trellis["vip"] = match probe {
        Ok(v) if v["ok"] == true => {
            eprintln!("bench: phase trellis: latency via the service VIP {vip}");
            json!({ "addr": vip.to_string(), "latency": latency(&client, vip, duration)? })
        }
        Ok(v) => bail!("the agents do not serve the service VIP {vip}: {v}"),
        Err(e) => bail!("the agents do not serve the service VIP {vip}: {e:#}"),
    };
    let l7_trellis = l7::phase(
        &client,
        &l7::Path::trellis(agents.clone()),
        duration,
        repeat,
    )?;
    let trellis_near = same_node::trellis(&client, &near, n1, &control, &a1, duration)?;

    let (file, policy) = l7::authz::policy_file();
    eprintln!(
        "bench: phase trellis with a {}-rule AuthorizationPolicy on the server",
        l7::authz::RULES
    );
    control.write(file, &policy);
    l7::authz::wait_in_force(&client)?;
    let l7_authz = l7::phase(&client, &l7::authz::path(agents), duration, 1)?;
    eprintln!("bench: removing agents, control, pods and nodes");
    Ok(json!({
        "duration_secs": duration.as_secs(),
        "agent_worker_threads": threads.workers,
        "agent_scheduler": threads.scheduler,
        "repeat": repeat,
        "mesh_only": mesh_only,
        "load": { "rate": RATE, "conns": CONNS, "size": SIZE },
        "summary": summary(&direct, &pair, &trellis),
        "direct": direct,
        "pair": pair,
        "trellis": trellis,
        "authz": l7::authz::summary(&l7_trellis, &l7_authz),
        "l7": l7::report(l7_direct, l7_haproxy, l7_pair, l7_trellis),
        "same_node": same_node::report(direct_near, trellis_near),
    }))
}

/// The phases without the mesh: direct, through one plaintext haproxy, and through the haproxy
/// mTLS pair. Returns (direct, direct L7, haproxy L7, pair, pair L7).
fn peers(
    client: &Pod,
    proxy_pod: &Pod,
    near: &Pod,
    far: &Pod,
    server: &Pod,
    duration: Duration,
    repeat: u32,
) -> Result<(Value, Value, Value, Value, Value)> {
    let target = IpAddr::V4(server.ip4);
    eprintln!("bench: phase direct (no mesh): client -> {target}");
    let direct = phase("direct", client, target, &[], duration, false)?;
    let l7_direct = l7::phase(client, &l7::Path::direct(server), duration, repeat)?;

    eprintln!(
        "bench: phase haproxy (no mesh): client -> haproxy in pod {} -> {target}",
        proxy_pod.name
    );
    let l7_haproxy = {
        let haproxy = haproxy::start_plain(proxy_pod, l7::upstream(server))?;
        l7::phase(
            client,
            &l7::Path::haproxy(proxy_pod, &haproxy),
            duration,
            repeat,
        )?
    };

    eprintln!(
        "bench: phase pair (no mesh): client -> haproxy in pod {} -> mutual TLS 1.3 -> haproxy in pod {} -> {target}",
        near.name, far.name
    );
    let (pair, l7_pair) = {
        let pair = pair::Pair::start(near, far, server)?;
        let pids: Vec<u32> = pair.procs().iter().map(|p| p.1).collect();
        let idle = memory::resident(&pids)?;
        let mut l4 = phase("pair", client, pair.at, &pair.procs(), duration, false)?;
        l4["idle_rss_mb"] = idle;
        l4["held"] = held(
            client,
            SocketAddr::new(pair.at, ECHO_PORT),
            &pids,
            memory::HELD_PAIR,
            &l4["idle_rss_mb"],
            "pair",
        )?;
        (
            l4,
            l7::phase(client, &l7::Path::pair(&pair), duration, repeat)?,
        )
    };
    Ok((direct, l7_direct, l7_haproxy, pair, l7_pair))
}

/// One phase's runs, all from `client` to `target`. With proxies (name, pid), their CPU and
/// memory too.
fn phase(
    name: &str,
    client: &Pod,
    target: IpAddr,
    proxies: &[(String, u32)],
    duration: Duration,
    expect_captured: bool,
) -> Result<Value> {
    let echo = SocketAddr::new(target, ECHO_PORT);
    let pids: Vec<u32> = proxies.iter().map(|p| p.1).collect();
    let cpu0 = cpu_secs(&pids)?;

    eprintln!("bench: phase {name}: blast {BLAST_BYTES} bytes through the echo (byte-exact)");
    let blast = run_in(
        client,
        &loadgen(),
        &[
            "blast",
            &echo.to_string(),
            "--bytes",
            &BLAST_BYTES.to_string(),
        ],
        Duration::from_secs(150),
    )?;
    if blast["ok"] != true {
        bail!("phase {name}: the echo was not byte-exact: {blast}");
    }
    // The capture layer rewrites a captured connect() to the local proxy, so the client's
    // socket is bound to loopback: check the phase measures what it says.
    let local: SocketAddr = blast["local"]
        .as_str()
        .and_then(|l| l.parse().ok())
        .with_context(|| format!("blast printed no local address: {blast}"))?;
    if local.ip().is_loopback() != expect_captured {
        bail!(
            "phase {name}: the client's connection was {}captured (local address {local})",
            if expect_captured { "not " } else { "" }
        );
    }

    eprintln!(
        "bench: phase {name}: iperf3 single stream, {} s",
        duration.as_secs()
    );
    let secs = duration.as_secs().to_string();
    let iperf = run_in(
        client,
        Path::new("iperf3"),
        &[
            "-c",
            &target.to_string(),
            "-p",
            &IPERF_PORT.to_string(),
            "-t",
            &secs,
            "--connect-timeout",
            "3000",
            "-J",
        ],
        duration + Duration::from_secs(30),
    )?;
    let sum = &iperf["end"]["sum_received"];
    let Some(bps) = sum["bits_per_second"].as_f64() else {
        bail!("iperf3 reported no throughput: {}", iperf["error"]);
    };
    let throughput = json!({
        "bits_per_second": bps,
        "bytes": sum["bytes"],
        "retransmits": iperf["end"]["sum_sent"]["retransmits"],
    });

    // Peak memory so far, then reset so the latency run's own peak can be read.
    let mut peaks = peak_rss_mb(&pids)?;
    reset_peak_rss(&pids);
    eprintln!(
        "bench: phase {name}: latency, {SIZE} B echo at {RATE}/s over {CONNS} connections, {} s (+1 s warm-up)",
        duration.as_secs()
    );
    let (cpu_l0, t_l0) = (cpu_secs(&pids)?, Instant::now());
    let lat = profile::around(&format!("{name}-echo-latency"), &pids, duration, || {
        latency(client, echo, duration)
    })?;
    let (cpu_l1, wall_l) = (cpu_secs(&pids)?, t_l0.elapsed().as_secs_f64());
    let peaks_latency = peak_rss_mb(&pids)?;
    let rss_latency = rss_mb(&pids, "VmRSS")?;

    eprintln!(
        "bench: phase {name}: connection rate, 4 threads, {} s",
        duration.as_secs()
    );
    let connect = profile::around(&format!("{name}-connect-rate"), &pids, duration, || {
        run_in(
            client,
            &loadgen(),
            &[
                "connect-rate",
                &echo.to_string(),
                "--threads",
                "4",
                "--duration-secs",
                &secs,
            ],
            duration + Duration::from_secs(30),
        )
    })?;
    let cpu1 = cpu_secs(&pids)?;
    for (p, l) in peaks.iter_mut().zip(&peaks_latency) {
        *p = p.max(*l);
    }
    for (p, now) in peaks.iter_mut().zip(peak_rss_mb(&pids)?) {
        *p = p.max(now);
    }

    let mut out = json!({
        "target": echo.to_string(),
        "blast": blast,
        "throughput": throughput,
        "latency": lat,
        "connect_rate": connect,
    });
    if !proxies.is_empty() {
        let per_process: Vec<Value> = proxies
            .iter()
            .enumerate()
            .map(|(i, (name, _))| {
                let cpu_latency = cpu_l1[i] - cpu_l0[i];
                json!({
                    "name": name,
                    "pid": pids[i],
                    "cpu_secs_phase": cpu1[i] - cpu0[i],
                    "cpu_secs_latency_run": cpu_latency,
                    "vcpu_latency_run": cpu_latency / wall_l,
                    "peak_rss_mb_phase": peaks[i],
                    "peak_rss_mb_latency_run": peaks_latency[i],
                    "rss_mb_after_latency_run": rss_latency[i],
                })
            })
            .collect();
        let sum = |v: &[f64]| v.iter().sum::<f64>();
        let max = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
        let vcpu: Vec<f64> = (0..pids.len())
            .map(|i| (cpu_l1[i] - cpu_l0[i]) / wall_l)
            .collect();
        out["proxies"] = json!({
            "per_process": per_process,
            "cpu_secs_phase_total": sum(&cpu1) - sum(&cpu0),
            "latency_run_wall_secs": wall_l,
            "vcpu_latency_run_total": sum(&vcpu),
            // Per process (the busier of the two), scaled to 1000 req/s.
            "vcpu_per_1000_rps": max(&vcpu) * 1000.0 / f64::from(RATE),
            "vcpu_per_1000_rps_total": sum(&vcpu) * 1000.0 / f64::from(RATE),
            "peak_rss_mb_phase": max(&peaks),
            "peak_rss_mb_latency_run": max(&peaks_latency),
            "peak_rss_mb_latency_run_total": sum(&peaks_latency),
        });
    }
    Ok(out)
}

/// The proxies' memory with `conns` idle connections open through them.
fn held(
    client: &Pod,
    echo: SocketAddr,
    pids: &[u32],
    conns: u32,
    idle: &Value,
    phase: &str,
) -> Result<Value> {
    eprintln!("bench: phase {phase}: {conns} idle connections held open to {echo}");
    memory::with_held_connections(client, echo, pids, conns, idle)
        .with_context(|| format!("phase {phase}: held connections"))
}

fn latency(client: &Pod, addr: SocketAddr, duration: Duration) -> Result<Value> {
    let v = run_in(
        client,
        &loadgen(),
        &[
            "latency",
            &addr.to_string(),
            "--rate",
            &RATE.to_string(),
            "--conns",
            &CONNS.to_string(),
            "--size",
            &SIZE.to_string(),
            "--duration-secs",
            &duration.as_secs().to_string(),
        ],
        duration + Duration::from_secs(30),
    )?;
    Ok(v)
}

fn loadgen() -> PathBuf {
    binary("trellis-loadgen")
}

fn sysctl(netns: &str, setting: &str) -> Result<()> {
    let status = Command::new("ip")
        .args(["netns", "exec", netns, "sysctl", "-q", "-w", setting])
        .status()?;
    if !status.success() {
        bail!("sysctl {setting} in {netns} failed");
    }
    Ok(())
}

/// Runs `program args` as the pod's app, bounded by `limit`, and parses the last line it printed
/// as JSON (all of it for iperf3 -J).
fn run_in(pod: &Pod, program: &Path, args: &[&str], limit: Duration) -> Result<Value> {
    let mut cmd = Command::new(program);
    cmd.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
    let what = format!("{} {}", program.display(), args.join(" "));
    let mut child = pod
        .spawn_app(&mut cmd)
        .with_context(|| format!("starting {what} in pod {}", pod.name))?;
    // Readers drain the pipes while the child runs (iperf3's JSON can outgrow a pipe).
    let drain = |r: Option<Box<dyn std::io::Read + Send>>| {
        thread::spawn(move || {
            let mut s = String::new();
            if let Some(mut r) = r {
                let _ = r.read_to_string(&mut s);
            }
            s
        })
    };
    let out = drain(child.stdout.take().map(|s| Box::new(s) as _));
    let err = drain(child.stderr.take().map(|s| Box::new(s) as _));
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{what} did not finish within {limit:?}");
        }
        thread::sleep(Duration::from_millis(20));
    };
    let (out, err) = (
        out.join().unwrap_or_default(),
        err.join().unwrap_or_default(),
    );
    let text = if program == Path::new("iperf3") {
        out.trim()
    } else {
        out.lines().last().unwrap_or_default()
    };
    let v: Value = serde_json::from_str(text)
        .with_context(|| format!("{what} ({status}) printed no JSON: {out:?}, stderr {err:?}"))?;
    if !status.success() && program != Path::new("iperf3") && v["ok"] != false {
        bail!("{what} failed ({status}): {out} {err}");
    }
    Ok(v)
}

/// The echo server, as the server pod's app; killed on drop (or with the pod).
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_echo(server: &Pod) -> Result<Server> {
    start_app(server, &["echo-serve", &format!("[::]:{ECHO_PORT}")])
}

/// `trellis-loadgen args` as the pod's app, once it printed that it is ready.
fn start_app(pod: &Pod, args: &[&str]) -> Result<Server> {
    let mut cmd = Command::new(loadgen());
    cmd.args(args).stdout(Stdio::piped());
    let mut child = pod.spawn_app(&mut cmd)?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("piped")).read_line(&mut line)?;
    let server = Server(child);
    if line.trim() != "ready" {
        bail!(
            "trellis-loadgen {} did not start (printed {line:?})",
            args.join(" ")
        );
    }
    Ok(server)
}

fn start_iperf(server: &Pod) -> Result<Server> {
    let mut cmd = Command::new("iperf3");
    cmd.args(["-s", "-p", &IPERF_PORT.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut child = Server(server.spawn_app(&mut cmd)?);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !listening(child.0.id(), IPERF_PORT) {
        if let Some(status) = child.0.try_wait()? {
            bail!("iperf3 -s exited ({status})");
        }
        if Instant::now() > deadline {
            bail!("iperf3 -s did not listen on port {IPERF_PORT} within 10 s");
        }
        thread::sleep(Duration::from_millis(20));
    }
    Ok(child)
}

/// Whether process `pid`'s network namespace has a TCP listener on `port` (from its own
/// /proc/<pid>/net view, so no connection is made to find out).
fn listening(pid: u32, port: u16) -> bool {
    ["tcp", "tcp6"].iter().any(|f| {
        fs::read_to_string(format!("/proc/{pid}/net/{f}"))
            .unwrap_or_default()
            .lines()
            .skip(1)
            .any(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.len() > 3
                    && f[3] == "0A"
                    && f[1]
                        .rsplit(':')
                        .next()
                        .and_then(|p| u16::from_str_radix(p, 16).ok())
                        == Some(port)
            })
    })
}

/// Control's view: namespace `bench` in the mesh, the two pods, and a service for the server.
fn control_files(n1: &Node, n2: &Node, client: &Pod, server: &Pod) -> Vec<(&'static str, String)> {
    let pod = |pod: &Pod, node: &Node, app: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {}, namespace: {NAMESPACE}, uid: {}, labels: {{app: {app}}}}}\n\
             spec: {{nodeName: {}, serviceAccountName: {app}, containers: []}}\n\
             status: {{phase: Running, podIPs: [{{ip: \"{}\"}}, {{ip: \"{}\"}}]}}\n",
            pod.name, pod.uid, node.name, pod.ip4, pod.ip6
        )
    };
    let mut files = vec![
        (
            "ns.yaml",
            format!(
                "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {NAMESPACE}, labels: {{trellis.dev/mesh: enabled}}}}\n"
            ),
        ),
        ("client.yaml", pod(client, n1, "bench-client")),
        ("server.yaml", pod(server, n2, "bench-server")),
        (
            "service.yaml",
            format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: bench-server, namespace: {NAMESPACE}}}\n\
                 spec: {{clusterIP: {VIP}, selector: {{app: bench-server}}, ports: [\
                 {{name: echo, port: {ECHO_PORT}, targetPort: {ECHO_PORT}}}, \
                 {{name: iperf, port: {IPERF_PORT}, targetPort: {IPERF_PORT}}}]}}\n"
            ),
        ),
    ];
    files.extend(l7::control_files());
    files
}

/// Waits until the agent holds the certificate for service account `sa` (if it lists them).
fn wait_certificate(agent: &Agent, sa: &str) -> Result<()> {
    let identity = format!("spiffe://cluster.local/ns/{NAMESPACE}/sa/{sa}");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match agent.admin("/certificates") {
            Ok((404, _)) => return Ok(()),
            Ok((200, body)) if body.contains(&identity) => return Ok(()),
            _ if Instant::now() > deadline => bail!(
                "agent on {} holds no certificate for {identity} after 20 s",
                agent.node
            ),
            _ => thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// Seconds of CPU (user + system) each process has used.
fn cpu_secs(pids: &[u32]) -> Result<Vec<f64>> {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    pids.iter()
        .map(|pid| {
            let stat = fs::read_to_string(format!("/proc/{pid}/stat"))
                .with_context(|| format!("agent {pid} is gone"))?;
            // Fields after the command name (which may hold spaces) start at field 3 (state);
            // utime and stime are fields 14 and 15.
            let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
            let f: Vec<&str> = rest.split_whitespace().collect();
            let field = |n: usize| f.get(n - 3).and_then(|v| v.parse::<u64>().ok());
            match (field(14), field(15)) {
                (Some(u), Some(s)) => Ok((u + s) as f64 / ticks),
                _ => bail!("unexpected /proc/{pid}/stat: {stat}"),
            }
        })
        .collect()
}

/// A /proc/<pid>/status memory field (kB) in MB, per process.
fn rss_mb(pids: &[u32], field: &str) -> Result<Vec<f64>> {
    pids.iter()
        .map(|pid| {
            let status = fs::read_to_string(format!("/proc/{pid}/status"))
                .with_context(|| format!("agent {pid} is gone"))?;
            status
                .lines()
                .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
                .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
                .map(|kb| kb / 1024.0)
                .with_context(|| format!("no {field} in /proc/{pid}/status"))
        })
        .collect()
}

fn peak_rss_mb(pids: &[u32]) -> Result<Vec<f64>> {
    rss_mb(pids, "VmHWM")
}

/// Resets the peak RSS (VmHWM) to the current RSS (`clear_refs` value 5).
fn reset_peak_rss(pids: &[u32]) {
    for pid in pids {
        let _ = fs::write(format!("/proc/{pid}/clear_refs"), "5");
    }
}

// ---------------------------------------------------------------- report

fn f(v: &Value) -> Option<f64> {
    v.as_f64()
}

fn summary(direct: &Value, pair: &Value, trellis: &Value) -> Value {
    let gbps = |p: &Value| f(&p["throughput"]["bits_per_second"]).map(|b| b / 1e9);
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if a > 0.0 => Some(b / a),
        _ => None,
    };
    let p99 = |p: &Value| f(&p["latency"]["p99_ms"]);
    let added_p99 = p99(trellis).zip(p99(direct)).map(|(t, d)| t - d);
    let cps = |p: &Value| f(&p["connect_rate"]["per_sec"]);
    let (vs_direct, vs_pair) = (
        ratio(gbps(direct), gbps(trellis)),
        ratio(gbps(pair), gbps(trellis)),
    );
    let connect = ratio(cps(direct), cps(trellis));
    let vcpu = f(&trellis["proxies"]["vcpu_per_1000_rps"]);
    let rss = f(&trellis["proxies"]["peak_rss_mb_latency_run"]);
    let idle = f(&trellis["idle_rss_mb"]["max"]);
    let held = f(&trellis["held"]["rss_mb"]["max"]);
    let met = |v: Option<f64>, ok: fn(f64) -> bool| v.map(ok);
    json!({
        "throughput_ratio": vs_direct,
        "throughput_ratio_to_pair": vs_pair,
        "added_p99_ms": added_p99,
        "pair_added_p99_ms": p99(pair).zip(p99(direct)).map(|(t, d)| t - d),
        "connect_ratio": connect,
        "agent_vcpu_per_1000_rps": vcpu,
        "pair_vcpu_per_1000_rps": f(&pair["proxies"]["vcpu_per_1000_rps"]),
        "agent_peak_rss_mb_at_rate": rss,
        "agent_idle_rss_mb": idle,
        "agent_held_rss_mb": held,
        "targets": {
            "throughput_ratio_min": TARGET_THROUGHPUT_RATIO,
            "throughput_ratio_to_pair_min": 1.0,
            "added_p99_ms_max": TARGET_ADDED_P99_MS,
            "agent_vcpu_per_1000_rps_max": TARGET_VCPU_PER_1000,
            "agent_peak_rss_mb_at_rate_max": TARGET_RSS_MB,
            "agent_idle_rss_mb_max": TARGET_IDLE_RSS_MB,
            "agent_held_rss_mb_max": TARGET_HELD_RSS_MB,
            "connect_ratio_min": TARGET_CONNECT_RATIO,
        },
        "met": {
            "throughput": met(vs_direct, |r| r >= TARGET_THROUGHPUT_RATIO),
            "throughput_pair": met(vs_pair, |r| r >= 1.0),
            "added_p99": met(added_p99, |d| d <= TARGET_ADDED_P99_MS),
            "agent_vcpu": met(vcpu, |v| v <= TARGET_VCPU_PER_1000),
            "agent_rss": met(rss, |m| m <= TARGET_RSS_MB),
            "agent_idle_rss": met(idle, |m| m <= TARGET_IDLE_RSS_MB),
            "agent_held_rss": met(held, |m| m <= TARGET_HELD_RSS_MB),
            "connect": met(connect, |r| r >= TARGET_CONNECT_RATIO),
        },
    })
}

fn print_table(r: &Value, secs: u64, threads: &Threads) {
    let (d, p, t, s) = (&r["direct"], &r["pair"], &r["trellis"], &r["summary"]);
    let num = |v: &Value, digits: usize| f(v).map_or("-".into(), |x| format!("{x:.digits$}"));
    let int = |v: &Value| v.as_u64().map_or("-".into(), |x| x.to_string());
    let pct = |a: &Value, b: &Value| match (f(a), f(b)) {
        (Some(a), Some(b)) if a > 0.0 => format!("{:.0}%", b / a * 100.0),
        _ => "-".into(),
    };
    let delta = |a: &Value, b: &Value| match (f(a), f(b)) {
        (Some(a), Some(b)) => format!("{:+.3} ms", b - a),
        _ => "-".into(),
    };
    let verdict = |met: &Value, target: String| match met.as_bool() {
        Some(true) => format!("{target} (met)"),
        Some(false) => format!("{target} (MISSED)"),
        None => target,
    };
    let gbit = |p: &Value| json!(f(&p["throughput"]["bits_per_second"]).map(|b| b / 1e9));
    let mbit = |p: &Value| p["blast"]["mbit_per_sec"].clone();
    // metric, direct, pair, trellis, trellis vs direct, trellis vs pair, target.
    let row = |label: String, v: [String; 3], vs: [String; 2], target: String| {
        let [a, b, c] = v;
        let [x, y] = vs;
        vec![label, a, b, c, x, y, target]
    };
    let mut rows = vec![
        [
            "metric",
            "direct",
            "haproxy mTLS pair",
            "trellis",
            "trellis vs direct",
            "trellis vs pair",
            "target",
        ]
        .map(String::from)
        .to_vec(),
    ];
    let [gd, gp, gt] = [d, p, t].map(gbit);
    rows.push(row(
        "TCP throughput, 1 stream, iperf3 (Gbit/s)".into(),
        [num(&gd, 2), num(&gp, 2), num(&gt, 2)],
        [pct(&gd, &gt), pct(&gp, &gt)],
        format!(
            "{}; {}",
            verdict(
                &s["met"]["throughput"],
                format!("≥ {:.0}% of direct", TARGET_THROUGHPUT_RATIO * 100.0)
            ),
            verdict(&s["met"]["throughput_pair"], "≥ 100% of the pair".into())
        ),
    ));
    let [md, mp, mt] = [d, p, t].map(mbit);
    rows.push(row(
        "echo round trip, byte-exact (Mbit/s each way)".into(),
        [num(&md, 0), num(&mp, 0), num(&mt, 0)],
        [pct(&md, &mt), pct(&mp, &mt)],
        String::new(),
    ));
    for (key, label) in [
        ("p50_ms", "p50"),
        ("p90_ms", "p90"),
        ("p99_ms", "p99"),
        ("max_ms", "max"),
    ] {
        let [a, b, c] = [d, p, t].map(|x| &x["latency"][key]);
        rows.push(row(
            format!("latency {label}, 1 KB echo at {RATE}/s, {CONNS} conns (ms)"),
            [num(a, 3), num(b, 3), num(c, 3)],
            [delta(a, c), delta(b, c)],
            if key == "p99_ms" {
                verdict(
                    &s["met"]["added_p99"],
                    format!("≤ +{TARGET_ADDED_P99_MS:.2} ms vs direct"),
                )
            } else {
                String::new()
            },
        ));
    }
    rows.push(row(
        "  requests completed / errors".into(),
        [d, p, t].map(|x| {
            format!(
                "{} / {}",
                int(&x["latency"]["requests"]),
                int(&x["latency"]["errors"])
            )
        }),
        [String::new(), String::new()],
        String::new(),
    ));
    let [cd, cp, ct] = [d, p, t].map(|x| &x["connect_rate"]["per_sec"]);
    rows.push(row(
        "connections per second (4 threads)".into(),
        [num(cd, 0), num(cp, 0), num(ct, 0)],
        [pct(cd, ct), pct(cp, ct)],
        verdict(
            &s["met"]["connect"],
            format!("≥ {:.0}% of direct", TARGET_CONNECT_RATIO * 100.0),
        ),
    ));
    rows.push(row(
        "  connection errors".into(),
        [d, p, t].map(|x| int(&x["connect_rate"]["errors"])),
        [String::new(), String::new()],
        String::new(),
    ));
    let proxies = |x: &Value, key: &str, digits: usize| {
        if x["proxies"].is_null() {
            "-".to_owned()
        } else {
            num(&x["proxies"][key], digits)
        }
    };
    let ratio = |key: &str| match (f(&p["proxies"][key]), f(&t["proxies"][key])) {
        (Some(a), Some(b)) if a > 0.0 => format!("{:.2}×", b / a),
        _ => "-".into(),
    };
    rows.push(row(
        "proxies' CPU over the phase (s, both nodes)".into(),
        [d, p, t].map(|x| proxies(x, "cpu_secs_phase_total", 2)),
        [String::new(), ratio("cpu_secs_phase_total")],
        String::new(),
    ));
    rows.push(row(
        "vCPU per 1000 req/s, busier proxy (echo)".into(),
        [d, p, t].map(|x| proxies(x, "vcpu_per_1000_rps", 3)),
        [String::new(), ratio("vcpu_per_1000_rps")],
        verdict(
            &s["met"]["agent_vcpu"],
            format!("≤ {TARGET_VCPU_PER_1000:.2}"),
        ),
    ));
    rows.push(row(
        "vCPU per 1000 req/s, both proxies".into(),
        [d, p, t].map(|x| proxies(x, "vcpu_per_1000_rps_total", 3)),
        [String::new(), ratio("vcpu_per_1000_rps_total")],
        String::new(),
    ));
    rows.push(row(
        format!("peak RSS at {RATE} req/s, busier proxy (MB)"),
        [d, p, t].map(|x| proxies(x, "peak_rss_mb_latency_run", 1)),
        [String::new(), ratio("peak_rss_mb_latency_run")],
        verdict(&s["met"]["agent_rss"], format!("≤ {TARGET_RSS_MB:.0} MB")),
    ));
    rows.push(row(
        format!("peak RSS at {RATE} req/s, both proxies (MB)"),
        [d, p, t].map(|x| proxies(x, "peak_rss_mb_latency_run_total", 1)),
        [String::new(), ratio("peak_rss_mb_latency_run_total")],
        String::new(),
    ));
    rows.push(row(
        "peak RSS over the phase, larger proxy (MB)".into(),
        [d, p, t].map(|x| proxies(x, "peak_rss_mb_phase", 1)),
        [String::new(), ratio("peak_rss_mb_phase")],
        String::new(),
    ));
    let memory = |x: &Value, key: &str| {
        let each: Vec<String> = x[key]["rss_mb"]["per_process"]
            .as_array()
            .or(x[key]["per_process"].as_array())
            .map(|a| a.iter().map(|v| num(v, 1)).collect())
            .unwrap_or_default();
        let max = f(&x[key]["rss_mb"]["max"]).or(f(&x[key]["max"]));
        match max {
            Some(m) => format!("{m:.1} ({})", each.join(" + ")),
            None => "-".into(),
        }
    };
    let kb = |x: &Value| f(&x["held"]["kb_per_conn"]["max"]);
    let proxies_kb = |x: &Value| kb(x).map_or("-".into(), |k| format!("{k:.2}"));
    let kb_ratio = || match (kb(p), kb(t)) {
        (Some(a), Some(b)) if a > 0.0 => format!("{:.2}×", b / a),
        _ => "-".into(),
    };
    let mem_ratio = |key: &str| {
        let max = |x: &Value| f(&x[key]["rss_mb"]["max"]).or(f(&x[key]["max"]));
        match (max(p), max(t)) {
            (Some(a), Some(b)) if a > 0.0 => format!("{:.2}×", b / a),
            _ => "-".into(),
        }
    };
    rows.push(row(
        "RSS idle, busier proxy (each) (MB)".into(),
        [d, p, t].map(|x| memory(x, "idle_rss_mb")),
        [String::new(), mem_ratio("idle_rss_mb")],
        verdict(
            &s["met"]["agent_idle_rss"],
            format!("≤ {TARGET_IDLE_RSS_MB:.0} MB"),
        ),
    ));
    rows.push(row(
        format!(
            "RSS with idle connections open ({}k; the pair {}k), busier proxy (each) (MB)",
            memory::HELD / 1000,
            memory::HELD_PAIR / 1000
        ),
        [d, p, t].map(|x| memory(x, "held")),
        [String::new(), String::new()],
        verdict(
            &s["met"]["agent_held_rss"],
            format!("≤ {TARGET_HELD_RSS_MB:.0} MB"),
        ),
    ));
    rows.push(row(
        "  KB per idle connection, busier proxy".into(),
        [d, p, t].map(proxies_kb),
        [String::new(), kb_ratio()],
        String::new(),
    ));
    if let Some(p99) = f(&t["vip"]["latency"]["p99_ms"]) {
        rows.push(row(
            "latency p99 via the service VIP (ms)".into(),
            ["-".into(), "-".into(), format!("{p99:.3}")],
            [String::new(), String::new()],
            String::new(),
        ));
    }
    let scheduler = threads.scheduler.as_deref().unwrap_or("thread-per-core");
    let threads = match threads.workers {
        Some(1) => "1 (the main thread)".to_owned(),
        Some(n) => format!("{n}, {scheduler}"),
        None => format!("one per CPU, {scheduler}"),
    };
    println!(
        "\nTrellis benchmark: 2 nodes, client pod on node 1 -> server pod on node 2, {secs} s per \
         run; the pair: haproxy on each node, mutual TLS 1.3 between them; agent worker threads: \
         {threads}\n"
    );
    print_rows(&rows);
    println!(
        "\nL7: HTTP server in the server pod; haproxy alone in its own pod on node 1; the haproxy \
         mTLS pair; trellis via the service VIP with a VirtualService route; {secs} s per run\n"
    );
    print_rows(&l7::rows(&r["l7"]));
    println!(
        "\nThe cost of authorization: the Trellis L7 path with and without a {}-rule AuthorizationPolicy (the matching rule last)\n",
        l7::authz::RULES
    );
    print_rows(&l7::authz::rows(&r["authz"]));
    println!(
        "\nSame node: the client to a second server pod on node 1, where the agent splices the \
         two pods' sockets without TLS, and passes HTTP to the destination's inbound proxy in \
         memory (identity, policy and metrics as across nodes); {secs} s per run\n"
    );
    print_rows(&same_node::rows(&r["same_node"]));
    println!();
}

/// A Markdown table, the first row as its header.
fn print_rows(rows: &[Vec<String>]) {
    let columns = rows.first().map_or(0, Vec::len);
    let widths: Vec<usize> = (0..columns)
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    for (i, row) in rows.iter().enumerate() {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c}{}", " ".repeat(w - c.chars().count())))
            .collect();
        println!("| {} |", cells.join(" | "));
        if i == 0 {
            let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
            println!("|-{}-|", rule.join("-|-"));
        }
    }
}

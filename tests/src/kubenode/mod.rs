//! A real single-node Kubernetes on this machine: etcd and kube-apiserver (`KubeApiServer`),
//! kube-controller-manager, kube-scheduler, containerd (CRI), kubelet and kube-proxy (iptables
//! mode), all built or installed by `cargo xtask setup`. Every daemon keeps its state in one run
//! directory and listens on its own socket or loopback ports. One node at a time per machine
//! (kubelet's `kubepods` cgroups and kube-proxy's chains are machine-wide): a lock says so.
//!
//! What was made is recorded in `<run dir>/state.json` as it is made, so the node is removed on
//! drop, by `cargo xtask cluster down`, or by the next start after its owner was killed.
mod config;
mod teardown;

use std::{
    fs::{self, File},
    os::{fd::AsRawFd, unix::process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde::{Deserialize, Serialize};

use crate::{apiserver, apiserver::KubeApiServer, oci};

pub use teardown::leftovers;

pub const NODE_NAME: &str = "trellis-node";
/// The node's pods get addresses here, on bridge `BRIDGE` (gateway .1, the node's side).
pub const POD_CIDR: &str = "10.87.0.0/24";
pub const BRIDGE: &str = "trellis-cni0";
/// The node's address: the bridge's (kubelet refuses a loopback node IP, and the API server
/// reaches kubelet, for logs and exec, at the node's InternalIP).
pub const NODE_IP: &str = "10.87.0.1";
/// The CNI network's name (containerd's result cache files start with it).
pub const NETWORK: &str = "trellis-node";
/// The sandbox image, built from tests/images/pause.c and imported at start (no registry here).
pub const PAUSE_IMAGE: &str = "localhost/trellis/pause:1";
/// The daemons a node runs besides etcd and kube-apiserver, in start order.
pub const DAEMONS: [&str; 5] = [
    "containerd",
    "kube-controller-manager",
    "kube-scheduler",
    "kubelet",
    "kube-proxy",
];

/// Where `cargo xtask setup` caches the Kubernetes binaries it builds.
pub fn kube_dir() -> PathBuf {
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"));
    home.join(".cache/trellis/kube").join(apiserver::VERSION)
}

/// A cached Kubernetes binary (kubelet, kube-proxy, …).
pub fn binary(name: &str) -> PathBuf {
    kube_dir().join(name)
}

/// The run directory (fixed: one node at a time, and `cluster status/down` must find it).
pub fn run_dir() -> PathBuf {
    std::env::temp_dir().join("trellis-kubenode")
}

fn state_path() -> PathBuf {
    run_dir().join("state.json")
}

/// Everything a node made that outlives its processes, recorded as it is made.
#[derive(Serialize, Deserialize, Default, Debug, Clone)]
pub struct State {
    /// The process that started the node (and removes it on exit).
    pub owner: u32,
    pub dir: PathBuf,
    pub api_dir: PathBuf,
    pub kubeconfig: PathBuf,
    /// (name, pid) of every daemon, etcd and kube-apiserver included.
    pub daemons: Vec<(String, u32)>,
    /// Kernel settings as they were before the node started.
    pub sysctls: Vec<(String, String)>,
    pub pod_logs_before: Vec<String>,
    pub container_logs_before: Vec<String>,
    pub run_containerd_existed: bool,
}

impl State {
    /// The recorded state of a node on this machine, if any.
    pub fn load() -> Option<State> {
        serde_json::from_slice(&fs::read(state_path()).ok()?).ok()
    }

    fn save(&self) {
        let tmp = self.dir.join("state.json.tmp");
        fs::write(
            &tmp,
            serde_json::to_vec_pretty(self).expect("state serializes"),
        )
        .and_then(|()| fs::rename(&tmp, state_path()))
        .expect("writing the node's state file");
    }

    pub fn pid(&self, name: &str) -> Option<u32> {
        self.daemons.iter().find(|(n, _)| n == name).map(|d| d.1)
    }

    /// Whether the recorded pid of `name` still runs that program (not a zombie, not reused).
    pub fn alive(&self, name: &str) -> bool {
        self.pid(name).is_some_and(|pid| {
            fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(name))
        })
    }

    /// Whether the process that started the node still runs (a zombie does not).
    pub fn owner_alive(&self) -> bool {
        fs::read_to_string(format!("/proc/{}/stat", self.owner)).is_ok_and(|s| {
            // "pid (comm) S …": the state follows the last ')'.
            s.rsplit_once(')')
                .is_some_and(|(_, rest)| !rest.trim_start().starts_with(['Z', 'X']))
        })
    }

    /// Resident memory of every daemon and shim of the node and its pods' processes, in bytes.
    pub fn memory_bytes(&self) -> u64 {
        let mut pids: Vec<u32> = self.daemons.iter().map(|d| d.1).collect();
        pids.extend(teardown::shim_pids(&self.dir).into_iter().map(|p| p as u32));
        pids.extend(teardown::kubepods_pids());
        pids.sort();
        pids.dedup();
        pids.iter().map(|p| rss_bytes(*p)).sum()
    }
}

fn rss_bytes(pid: u32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// Removes the node recorded on this machine if its owner is gone; says what it did.
pub fn sweep_leftovers() -> Vec<String> {
    match State::load() {
        Some(state) if !state.owner_alive() => {
            eprintln!(
                "kubenode: removing the node left by process {} (it is gone)",
                state.owner
            );
            teardown::teardown(&state)
        }
        _ => Vec::new(),
    }
}

/// A running node. Dropping it removes everything it made.
pub struct KubeNode {
    state: State,
    api: Option<KubeApiServer>,
    children: Vec<Child>,
    removed: bool,
    _lock: File,
    /// (step, time since start) for each start step, for reports and measurements.
    pub timings: Vec<(String, Duration)>,
    started: Instant,
}

/// What the machine lacks to run a node, if anything (every item says how to fix it).
pub fn missing_requirements() -> Vec<String> {
    let mut missing = Vec::new();
    if unsafe { libc::geteuid() } != 0 {
        missing.push("root (kubelet, containerd and kube-proxy need it)".to_owned());
    }
    for name in DAEMONS.iter().filter(|d| **d != "containerd") {
        if !binary(name).is_file() {
            missing.push(format!(
                "{} (cargo xtask setup builds it)",
                binary(name).display()
            ));
        }
    }
    if !apiserver::binary().is_file() {
        missing.push(format!(
            "{} (cargo xtask setup builds it)",
            apiserver::binary().display()
        ));
    }
    for (bin, pkg) in [
        ("containerd", "containerd"),
        ("ctr", "containerd"),
        ("runc", "runc"),
        ("etcd", "etcd-server"),
        ("iptables", "iptables"),
        ("conntrack", "conntrack"),
        ("ipset", "ipset"),
        ("kubectl", "kubectl 1.24 or newer, from the machine"),
        ("gcc", "gcc"),
    ] {
        if !on_path(bin) {
            missing.push(format!("{bin} (install {pkg}; cargo xtask setup does)"));
        }
    }
    for plugin in ["bridge", "host-local", "loopback"] {
        if !Path::new("/usr/lib/cni").join(plugin).is_file() {
            missing.push(format!(
                "/usr/lib/cni/{plugin} (install containernetworking-plugins; cargo xtask setup does)"
            ));
        }
    }
    missing
}

fn on_path(bin: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|p| {
        std::env::split_paths(&p)
            .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
            .any(|d| d.join(bin).is_file())
    })
}

/// Takes the machine-wide node lock, or says who holds it.
fn lock() -> Result<File> {
    let path = std::env::temp_dir().join("trellis-kubenode.lock");
    let file = File::create(&path).with_context(|| format!("creating {}", path.display()))?;
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let owner = State::load().map_or("another process".to_owned(), |s| {
            format!("process {}", s.owner)
        });
        bail!(
            "a real Kubernetes node already runs on this machine (started by {owner}); \
             one at a time: stop it first (`cargo xtask cluster down`)"
        );
    }
    Ok(file)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

fn entries(dir: &str) -> Vec<String> {
    fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

impl KubeNode {
    /// Starts every daemon, imports the sandbox image and waits until the node is Ready and the
    /// default service account exists. Progress goes to stderr.
    pub fn start() -> Result<Self> {
        let missing = missing_requirements();
        if !missing.is_empty() {
            bail!(
                "this machine cannot run a real Kubernetes node; missing:\n  {}",
                missing.join("\n  ")
            );
        }
        let lock = lock()?;
        let problems = sweep_leftovers();
        if !problems.is_empty() {
            bail!(
                "an earlier node could not be removed completely: {}",
                problems.join("; ")
            );
        }
        let dir = run_dir();
        let _ = fs::remove_dir_all(&dir);
        for d in ["cni/net.d", "kubelet/pki", "images"] {
            fs::create_dir_all(dir.join(d))?;
        }
        let state = State {
            owner: std::process::id(),
            dir: dir.clone(),
            sysctls: teardown::read_sysctls(),
            pod_logs_before: entries("/var/log/pods"),
            container_logs_before: entries("/var/log/containers"),
            run_containerd_existed: Path::new("/run/containerd").exists(),
            ..State::default()
        };
        state.save();
        let mut node = KubeNode {
            state,
            api: None,
            children: Vec::new(),
            removed: false,
            _lock: lock,
            timings: Vec::new(),
            started: Instant::now(),
        };
        // From here on a failure drops `node`, which removes whatever was made.
        node.start_all()?;
        Ok(node)
    }

    fn step(&mut self, what: &str) {
        let t = self.started.elapsed();
        eprintln!("kubenode: {what} ({:.1} s)", t.as_secs_f64());
        self.timings.push((what.to_owned(), t));
    }

    fn start_all(&mut self) -> Result<()> {
        let dir = self.state.dir.clone();
        // The bridge exists first: the API server and kubelet serve on the node's address, and
        // the CNI bridge plugin adopts it.
        for args in [
            format!("link add {BRIDGE} type bridge"),
            format!("addr add {NODE_IP}/24 dev {BRIDGE}"),
            format!("link set {BRIDGE} up"),
        ] {
            output(Command::new("ip").args(args.split_whitespace()))
                .context("creating the node's bridge")?;
        }
        eprintln!("kubenode: starting etcd and kube-apiserver");
        let api = KubeApiServer::start_for_node(NODE_IP);
        self.state.api_dir = api.dir().to_owned();
        self.state.kubeconfig = api.kubeconfig_path();
        let (etcd, apiserver) = api.pids();
        self.state.daemons.push(("etcd".into(), etcd));
        self.state
            .daemons
            .push(("kube-apiserver".into(), apiserver));
        self.api = Some(api);
        self.state.save();
        self.step("kube-apiserver ready");

        fs::write(dir.join("containerd.toml"), config::containerd(&dir))?;
        fs::write(dir.join("cni/net.d/10-trellis.conflist"), config::cni(&dir))?;
        self.spawn(
            "containerd",
            Command::new("containerd")
                .arg("--config")
                .arg(dir.join("containerd.toml")),
        )?;
        self.wait_containerd()?;
        self.step("containerd ready");
        self.import_pause()?;
        self.step("pause image imported");

        let kubeconfig = self.state.kubeconfig.clone();
        let api_dir = self.state.api_dir.clone();
        self.spawn(
            "kube-controller-manager",
            Command::new(binary("kube-controller-manager"))
                .arg(format!("--kubeconfig={}", kubeconfig.display()))
                .args([
                    "--leader-elect=false",
                    "--port=0",
                    "--bind-address=127.0.0.1",
                ])
                .arg(format!("--secure-port={}", free_port()))
                .arg(format!(
                    "--service-account-private-key-file={}",
                    api_dir.join("sa.key").display()
                ))
                .arg(format!(
                    "--root-ca-file={}",
                    api_dir.join("ca.pem").display()
                ))
                .arg("--use-service-account-credentials=false")
                .arg(format!(
                    "--cert-dir={}",
                    dir.join("controller-manager").display()
                )),
        )?;
        self.spawn(
            "kube-scheduler",
            Command::new(binary("kube-scheduler"))
                .arg(format!("--kubeconfig={}", kubeconfig.display()))
                .args([
                    "--leader-elect=false",
                    "--port=0",
                    "--bind-address=127.0.0.1",
                ])
                .arg(format!("--secure-port={}", free_port()))
                .arg(format!("--cert-dir={}", dir.join("scheduler").display())),
        )?;
        fs::write(
            dir.join("kubelet.yaml"),
            config::kubelet(free_port(), free_port()),
        )?;
        self.spawn(
            "kubelet",
            Command::new(binary("kubelet"))
                .arg(format!("--config={}", dir.join("kubelet.yaml").display()))
                .arg(format!("--kubeconfig={}", kubeconfig.display()))
                .args(["--container-runtime=remote", "--runtime-request-timeout=2m"])
                .arg(format!(
                    "--container-runtime-endpoint=unix://{}",
                    dir.join("containerd.sock").display()
                ))
                .arg(format!("--root-dir={}", dir.join("kubelet").display()))
                .arg(format!("--cert-dir={}", dir.join("kubelet/pki").display()))
                .arg(format!("--hostname-override={NODE_NAME}"))
                .arg(format!("--node-ip={NODE_IP}")),
        )?;
        self.step("kubelet started");
        self.start_kube_proxy()?;
        self.wait_ready()?;
        self.step("node Ready");
        self.wait_for(
            Duration::from_secs(60),
            "the default service account",
            |n| {
                n.kubectl(&["get", "serviceaccount", "default", "-o", "name"])
                    .is_ok()
            },
        )?;
        Ok(())
    }

    /// Starts kube-proxy (iptables mode) for this node.
    pub fn start_kube_proxy(&mut self) -> Result<()> {
        // Host-originated connects to Service addresses are routed before kube-proxy's DNAT: no
        // blackhole may be left from `stop_kube_proxy`.
        let _ =
            output(Command::new("ip").args(["route", "del", "blackhole", apiserver::SERVICE_CIDR]));
        let kubeconfig = self.state.kubeconfig.clone();
        self.spawn(
            "kube-proxy",
            Command::new(binary("kube-proxy"))
                .arg(format!("--kubeconfig={}", kubeconfig.display()))
                .arg(format!("--hostname-override={NODE_NAME}"))
                .args(["--proxy-mode=iptables", "--oom-score-adj=0"])
                .arg(format!("--cluster-cidr={POD_CIDR}"))
                // Node ports on the bridge only: on loopback they would need route_localnet.
                .arg(format!("--nodeport-addresses={NODE_IP}/32"))
                // Leave the machine's conntrack settings alone.
                .args([
                    "--conntrack-max-per-core=0",
                    "--conntrack-tcp-timeout-established=0",
                    "--conntrack-tcp-timeout-close-wait=0",
                ])
                .arg(format!("--metrics-bind-address=127.0.0.1:{}", free_port()))
                .arg(format!("--healthz-bind-address=127.0.0.1:{}", free_port())),
        )
    }

    /// Stops kube-proxy and removes its rules: Service addresses then work only where something
    /// else (the mesh) resolves them. Meanwhile they are blackholed, so that nothing untranslated
    /// is routed off the machine. `start_kube_proxy` brings it back.
    pub fn stop_kube_proxy(&mut self) -> Result<()> {
        teardown::stop(&self.state, "kube-proxy");
        teardown::kube_proxy_cleanup().map_err(anyhow::Error::msg)?;
        output(Command::new("ip").args(["route", "add", "blackhole", apiserver::SERVICE_CIDR]))?;
        if let Some(i) = self.state.daemons.iter().position(|d| d.0 == "kube-proxy") {
            let (_, pid) = self.state.daemons.remove(i);
            if let Some(c) = self.children.iter().position(|c| c.id() == pid) {
                let _ = self.children.remove(c).wait();
            }
        }
        self.state.save();
        Ok(())
    }

    /// Starts a daemon in its own process group (Ctrl-C on a terminal must not kill it before
    /// the orderly teardown), logging to `<name>.log`, and records its pid.
    fn spawn(&mut self, name: &str, cmd: &mut Command) -> Result<()> {
        let log = File::create(self.state.dir.join(format!("{name}.log")))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        self.state.daemons.push((name.to_owned(), child.id()));
        self.children.push(child);
        self.state.save();
        Ok(())
    }

    /// Fails with the log's tail if a daemon has exited.
    fn check_daemons(&self) -> Result<()> {
        for (name, _) in &self.state.daemons {
            if !self.state.alive(name) {
                bail!(
                    "{name} exited; the end of its log:\n{}",
                    self.log_tail(name, 30)
                );
            }
        }
        Ok(())
    }

    /// The last `n` lines of a daemon's log.
    pub fn log_tail(&self, name: &str, n: usize) -> String {
        let path = match name {
            "kube-apiserver" => self.state.api_dir.join("apiserver.log"),
            "etcd" => self.state.api_dir.join("etcd.log"),
            _ => self.state.dir.join(format!("{name}.log")),
        };
        let log = fs::read_to_string(path).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    fn wait_for(
        &self,
        timeout: Duration,
        what: &str,
        mut done: impl FnMut(&Self) -> bool,
    ) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while !done(self) {
            self.check_daemons()?;
            if Instant::now() > deadline {
                bail!("{what} not there within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(())
    }

    fn wait_containerd(&self) -> Result<()> {
        self.wait_for(Duration::from_secs(30), "containerd's socket", |n| {
            n.ctr(&["version"]).is_ok()
        })
    }

    fn wait_ready(&self) -> Result<()> {
        let ready = |n: &Self| {
            n.kubectl(&[
                "get",
                "node",
                NODE_NAME,
                "-o",
                r#"jsonpath={.status.conditions[?(@.type=="Ready")].status}"#,
            ])
            .is_ok_and(|s| s.trim() == "True")
        };
        self.wait_for(Duration::from_secs(120), "node Ready", ready)
            .with_context(|| format!("kubelet's log ends:\n{}", self.log_tail("kubelet", 20)))
    }

    /// `ctr` against this node's containerd, in the CRI namespace.
    pub fn ctr(&self, args: &[&str]) -> Result<String> {
        ctr(&self.state, args)
    }

    /// kubectl as cluster admin against this node's API server.
    pub fn kubectl(&self, args: &[&str]) -> Result<String> {
        output(
            Command::new("kubectl")
                .arg("--kubeconfig")
                .arg(&self.state.kubeconfig)
                .args(args),
        )
    }

    /// Imports an OCI or Docker image archive into the node's containerd, for pods that use it
    /// with `imagePullPolicy: IfNotPresent` (no registry is reachable here).
    pub fn import_image(&self, tar: &Path) -> Result<()> {
        import_image(&self.state, tar)
    }

    /// Packs and imports an image (see `oci::Image`).
    pub fn import(&self, image: &oci::Image) -> Result<()> {
        let images = self.state.dir.join("images");
        let tar = images.join(format!("{}.tar", image.name.replace(['/', ':'], "_")));
        image.write_tar(&images.join("work"), &tar)?;
        self.import_image(&tar)
    }

    fn import_pause(&self) -> Result<()> {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("images/pause.c");
        let bin = self.state.dir.join("images/pause");
        output(
            Command::new("gcc")
                .args(["-static", "-Os", "-o"])
                .arg(&bin)
                .arg(&src),
        )
        .context("building the pause binary")?;
        let mut image = oci::Image::new(PAUSE_IMAGE, &["/pause"]);
        image.files.push(("/pause".into(), bin));
        self.import(&image)
    }

    pub fn state(&self) -> &State {
        &self.state
    }

    pub fn kubeconfig(&self) -> &Path {
        &self.state.kubeconfig
    }

    /// Removes the node now and returns what it could not remove (the same happens on drop).
    pub fn stop(mut self) -> Vec<String> {
        self.remove()
    }

    fn remove(&mut self) -> Vec<String> {
        self.removed = true;
        let problems = teardown::teardown(&self.state);
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.children.clear();
        // Its processes are gone; this only reaps them and removes its directory.
        self.api = None;
        let _ = fs::remove_dir_all(&self.state.dir);
        problems
    }
}

impl Drop for KubeNode {
    fn drop(&mut self) {
        if self.removed {
            return;
        }
        for p in self.remove() {
            eprintln!("kubenode: warning: {p}");
        }
    }
}

/// `ctr` against the containerd of the node `state` describes, in the CRI namespace.
pub fn ctr(state: &State, args: &[&str]) -> Result<String> {
    output(
        Command::new("ctr")
            .arg("--address")
            .arg(state.dir.join("containerd.sock"))
            .args(["--namespace", "k8s.io"])
            .args(args),
    )
}

/// Imports an OCI or Docker image archive into that node's containerd.
pub fn import_image(state: &State, tar: &Path) -> Result<()> {
    ctr(state, &["images", "import", &tar.to_string_lossy()])
        .map(drop)
        .with_context(|| format!("importing {}", tar.display()))
}

/// Runs a command; its stdout, or an error with what it printed on both streams.
fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {:?}", cmd.get_program()))?;
    if !out.status.success() {
        // What a failing command printed on stdout says why as often as its stderr does (a
        // tool run with `kubectl exec` reports its error as JSON there).
        bail!(
            "{:?} failed ({}): {} {}",
            cmd.get_program(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

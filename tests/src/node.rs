//! Nodes and pods as network namespaces with kubelet-style cgroups.
use std::{
    fs,
    io::{BufRead, BufReader},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Mutex,
        atomic::{AtomicU8, Ordering},
    },
    time::{Duration, Instant},
};

use crate::sys::{self, ip, run};

/// kubelet's two cgroup layouts.
#[derive(Clone, Copy, Debug)]
pub enum CgroupDriver {
    /// `kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod<uid_>.slice`
    Systemd,
    /// `kubepods/besteffort/pod<uid>`
    Cgroupfs,
}

pub struct Node {
    /// Network namespace name; also the agent's node name and cgroup root's name.
    pub name: String,
    pub index: u8,
    /// The node's cgroup root (what kubelet would see as the cgroup v2 root).
    pub cgroup_root: PathBuf,
    next_pod: AtomicU8,
}

impl Node {
    /// `trellis-testpod connect` from the node itself (its host namespace and a cgroup of the
    /// node's, no pod), as kubelet probes a pod.
    pub fn connect(&self, addr: SocketAddr, data: &str) -> serde_json::Value {
        connect_from(&self.name, Some(&self.host_cgroup()), addr, data)
    }

    /// Where the node's own daemons (kubelet) run: under the node's cgroup root, outside any pod.
    pub fn host_cgroup(&self) -> PathBuf {
        self.cgroup_root.join("kubelet.service")
    }

    /// Node `index` (1-based) of a cluster: bridge `br0` at 10.244.<index>.1/24 and fd00:244:<index>::1/64.
    pub fn new(index: u8) -> Self {
        crate::require_privileges();
        let name = sys::unique_name();
        let cgroup_root = sys::cgroup2_mount().join(&name);
        let node = Self {
            name,
            index,
            cgroup_root,
            next_pod: AtomicU8::new(10),
        };
        sys::add_netns(&node.name);
        fs::create_dir(&node.cgroup_root).expect("creating the node's cgroup root");
        fs::create_dir(node.host_cgroup()).expect("creating the node's own cgroup");
        ip(&node.name, "link add br0 type bridge mcast_snooping 0");
        ip(&node.name, &format!("addr add 10.244.{index}.1/24 dev br0"));
        ip(
            &node.name,
            &format!("-6 addr add fd00:244:{index}::1/64 dev br0 nodad"),
        );
        ip(&node.name, "link set br0 up");
        node
    }

    pub fn add_pod(&self, name: &str) -> Pod {
        self.add_pod_with(name, CgroupDriver::Systemd)
    }

    pub fn add_pod_with(&self, name: &str, driver: CgroupDriver) -> Pod {
        let k = self.next_pod.fetch_add(1, Ordering::Relaxed);
        let netns = format!("{}-{name}", self.name);
        let uid = format!(
            "{:08x}-0000-4000-8000-{:012x}",
            std::process::id(),
            u64::from(self.index) << 16 | u64::from(k)
        );
        let qos = "besteffort";
        let cgroup = match driver {
            CgroupDriver::Systemd => self.cgroup_root.join(format!(
                "kubepods.slice/kubepods-{qos}.slice/kubepods-{qos}-pod{}.slice",
                uid.replace('-', "_")
            )),
            CgroupDriver::Cgroupfs => self.cgroup_root.join(format!("kubepods/{qos}/pod{uid}")),
        };
        let pod = Pod {
            name: name.to_owned(),
            uid,
            netns,
            ip4: Ipv4Addr::new(10, 244, self.index, k),
            ip6: format!("fd00:244:{}::{k}", self.index)
                .parse()
                .expect("valid IPv6"),
            cgroup,
            children: Mutex::new(Vec::new()),
        };
        sys::add_netns(&pod.netns);
        let n = &pod.netns;
        ip(
            n,
            &format!(
                "link add eth0 type veth peer name vp{k} netns {}",
                self.name
            ),
        );
        ip(&self.name, &format!("link set vp{k} master br0 up"));
        ip(n, &format!("addr add {}/24 dev eth0", pod.ip4));
        ip(n, &format!("-6 addr add {}/64 dev eth0 nodad", pod.ip6));
        ip(n, "link set eth0 up");
        ip(n, &format!("route add default via 10.244.{}.1", self.index));
        ip(
            n,
            &format!("-6 route add default via fd00:244:{}::1", self.index),
        );
        for c in ["cri-containerd-pause.scope", "cri-containerd-app.scope"] {
            fs::create_dir_all(pod.cgroup.join(c)).expect("creating pod cgroups");
        }
        // The sandbox process that holds the pod's namespace, like kubelet's pause container.
        let pause = sys::spawn_in(
            &pod.netns,
            Some(&pod.cgroup.join("cri-containerd-pause.scope")),
            Command::new("sleep").arg("infinity"),
        )
        .expect("starting the pod's sandbox process");
        pod.children.lock().unwrap().push(pause);
        pod
    }
}

/// Several nodes joined through a "fabric" network namespace: each node has an uplink
/// `10.0.0.<i>/24` (`fd00::<i>/64`) on the fabric's bridge and routes the other nodes' pod
/// subnets via their uplinks, so pod addresses cross nodes unchanged, as with a routed CNI.
pub struct Cluster {
    // Nodes are dropped (and their uplinks with them) before the fabric.
    pub nodes: Vec<Node>,
    fabric: String,
}

impl Cluster {
    /// The fabric's own address, where cluster services (control) listen.
    pub const SERVICES_IP: &str = "10.0.0.254";

    /// The fabric's network namespace.
    pub fn fabric(&self) -> &str {
        &self.fabric
    }

    pub fn new(count: u8) -> Self {
        crate::require_privileges();
        let fabric = sys::unique_name();
        sys::add_netns(&fabric);
        ip(&fabric, "link add br0 type bridge mcast_snooping 0");
        ip(
            &fabric,
            &format!("addr add {}/24 dev br0", Self::SERVICES_IP),
        );
        ip(&fabric, "link set br0 up");
        let nodes: Vec<Node> = (1..=count).map(Node::new).collect();
        for node in &nodes {
            let i = node.index;
            ip(
                &node.name,
                &format!("link add up0 type veth peer name n{i} netns {fabric}"),
            );
            ip(&fabric, &format!("link set n{i} master br0 up"));
            ip(&node.name, &format!("addr add 10.0.0.{i}/24 dev up0"));
            ip(
                &node.name,
                &format!("-6 addr add fd00::{i}/64 dev up0 nodad"),
            );
            ip(&node.name, "link set up0 up");
            for key in ["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"] {
                run(
                    "ip",
                    &["netns", "exec", &node.name, "sysctl", "-q", "-w", key],
                );
            }
            for other in nodes.iter().filter(|o| o.index != i) {
                let j = other.index;
                ip(
                    &node.name,
                    &format!("route add 10.244.{j}.0/24 via 10.0.0.{j}"),
                );
                ip(
                    &node.name,
                    &format!("-6 route add fd00:244:{j}::/64 via fd00::{j}"),
                );
            }
        }
        Self { nodes, fabric }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.nodes.clear();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.fabric])
            .status();
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        sys::remove_cgroup_tree(&self.cgroup_root);
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

pub struct Pod {
    pub name: String,
    pub uid: String,
    pub netns: String,
    pub ip4: Ipv4Addr,
    pub ip6: Ipv6Addr,
    /// The pod-level cgroup; processes live in `cri-containerd-*.scope` below it.
    pub cgroup: PathBuf,
    children: Mutex<Vec<Child>>,
}

/// Where the harness's helper binaries are: beside the running executable (or one level up,
/// for test executables in target/*/deps), or in $TRELLIS_BIN_DIR.
pub fn binary(name: &str) -> PathBuf {
    let mut dirs: Vec<PathBuf> = std::env::var_os("TRELLIS_BIN_DIR")
        .map(PathBuf::from)
        .into_iter()
        .collect();
    if let Ok(exe) = std::env::current_exe() {
        dirs.extend(exe.parent().map(Path::to_owned));
        dirs.extend(exe.parent().and_then(Path::parent).map(Path::to_owned));
    }
    dirs.iter().map(|d| d.join(name)).find(|p| p.is_file()).unwrap_or_else(|| {
        panic!("{name} not found in {dirs:?}: build it first (cargo build --workspace --bins; cargo xtask test does)")
    })
}

impl Pod {
    pub fn ips(&self) -> [IpAddr; 2] {
        [IpAddr::V4(self.ip4), IpAddr::V6(self.ip6)]
    }

    fn app_cgroup(&self) -> PathBuf {
        self.cgroup.join("cri-containerd-app.scope")
    }

    /// Starts the test app serving on `port` (all addresses, IPv4 and IPv6); waits until it listens.
    pub fn serve(&self, port: u16) {
        self.start_app(Command::new(binary("trellis-testpod")).args([
            "serve",
            &self.name,
            &format!("[::]:{port}"),
        ]));
    }

    /// Starts a server in this pod as its app and waits for the `ready` line it prints once it
    /// listens; it is killed with the pod.
    pub fn start_app(&self, cmd: &mut Command) {
        cmd.stdout(Stdio::piped());
        let mut child = self.spawn_app(cmd).expect("starting the app");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("piped"))
            .read_line(&mut line)
            .expect("reading the app's ready line");
        assert_eq!(
            line.trim(),
            "ready",
            "the app in {} did not start",
            self.name
        );
        self.children.lock().unwrap().push(child);
    }

    /// Connects from this pod (as its app would) to `addr`, sends `data`, and returns what the
    /// test app printed: `{"local", "banner": {"server","local","peer"}, "echo"}` or `{"error"}`.
    pub fn connect(&self, addr: SocketAddr, data: &str) -> serde_json::Value {
        connect_from(&self.netns, Some(&self.app_cgroup()), addr, data)
    }

    /// Spawns `cmd` in this pod's network namespace and app cgroup, as the pod's app container
    /// would run it (so the capture layer treats it as the app). The caller owns the child; it is
    /// killed with the pod's cgroup on drop at the latest.
    pub fn spawn_app(&self, cmd: &mut Command) -> std::io::Result<Child> {
        sys::spawn_in(&self.netns, Some(&self.app_cgroup()), cmd)
    }

    /// The TCP connections to or from port 15008 (HBONE) in this pod's network namespace, as
    /// `ss` lists them (listeners not included).
    pub fn hbone_sockets(&self) -> Vec<String> {
        let filter = "( sport = :15008 or dport = :15008 )";
        let mut cmd = Command::new("ss");
        cmd.args(["-Htn", filter])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let out = self
            .spawn_app(&mut cmd)
            .unwrap()
            .wait_with_output()
            .unwrap();
        assert!(out.status.success(), "ss: {out:?}");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// Kills the pod's processes (its sandbox too), as when a pod dies.
    pub fn kill_processes(&self) {
        for mut c in self.children.lock().unwrap().drain(..) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// This pod as the API server would report it (for control's directory source).
    pub fn yaml(&self, namespace: &str, node: &Node, service_account: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {}, namespace: {namespace}, uid: {}}}\n\
             spec: {{nodeName: {}, serviceAccountName: {service_account}, containers: []}}\n\
             status: {{phase: Running, podIPs: [{{ip: \"{}\"}}, {{ip: \"{}\"}}]}}\n",
            self.name, self.uid, node.name, self.ip4, self.ip6
        )
    }

    /// This pod as the agent's pods file lists it.
    pub fn spec(&self, namespace: &str) -> serde_json::Value {
        serde_json::json!({ "uid": self.uid, "namespace": namespace, "name": self.name, "ips": self.ips() })
    }
}

/// Runs `trellis-testpod connect ADDR DATA` in `netns` (and `cgroup`); what it printed.
fn connect_from(
    netns: &str,
    cgroup: Option<&Path>,
    addr: SocketAddr,
    data: &str,
) -> serde_json::Value {
    let mut cmd = Command::new(binary("trellis-testpod"));
    cmd.args(["connect", &addr.to_string(), data])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = sys::spawn_in(netns, cgroup, &mut cmd).expect("starting the test client");
    let deadline = Instant::now() + Duration::from_secs(15);
    let out = wait_bounded(child, deadline);
    serde_json::from_slice(&out).unwrap_or_else(|e| {
        panic!(
            "test client printed {:?}: {e}",
            String::from_utf8_lossy(&out)
        )
    })
}

fn wait_bounded(mut child: Child, deadline: Instant) -> Vec<u8> {
    loop {
        if let Some(_status) = child.try_wait().expect("waiting for the test client") {
            let out = child.wait_with_output().expect("collecting output");
            return out.stdout;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("test client did not finish within 15 s");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        self.kill_processes();
        sys::remove_cgroup_tree(&self.cgroup);
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .status();
    }
}

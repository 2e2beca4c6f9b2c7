//! A real DNS server outside the mesh for the DNS and egress tests: dnsmasq in a pod's network
//! namespace, and dig run as a pod's app.
use std::{
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use trellis_e2e::Pod;

/// dnsmasq in the outsider's namespace (outside the mesh), authoritative for
/// `external.example` and answering NXDOMAIN for anything in `cluster.local` itself, so a mesh
/// answer can only have come from the agent.
pub struct Dnsmasq {
    child: Child,
    log: std::path::PathBuf,
}

impl Dnsmasq {
    pub fn start(pod: &Pod) -> Self {
        Self::start_with(pod, &[])
    }

    /// With more dnsmasq options (more `--address=` records).
    pub fn start_with(pod: &Pod, extra: &[&str]) -> Self {
        let dir = std::env::temp_dir().join(format!("trellis-dnsmasq-{}", pod.netns));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("dnsmasq.log");
        let mut cmd = Command::new("dnsmasq");
        cmd.args([
            "--keep-in-foreground",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
            &format!("--listen-address={}", pod.ip4),
            &format!("--listen-address={}", pod.ip6),
            "--address=/external.example/192.0.2.10",
            "--address=/external.example/2001:db8::10",
            "--local=/cluster.local/",
            "--log-queries",
            "--log-facility=-",
            "--user=root",
            &format!("--pid-file={}", dir.join("pid").display()),
        ])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
        let child = pod
            .spawn_app(&mut cmd)
            .expect("starting dnsmasq (cargo xtask setup installs it)");
        let d = Self { child, log };
        let start = Instant::now();
        while dig(pod, &[&format!("@{}", pod.ip4), "external.example"]) != "192.0.2.10" {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "dnsmasq did not start: {}",
                d.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        d
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `dig +short` from `pod` (as its app); its output, trimmed.
pub fn dig(pod: &Pod, args: &[&str]) -> String {
    let mut cmd = Command::new("dig");
    cmd.args(["+short", "+tries=1", "+time=3"]).args(args);
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let out = pod.spawn_app(&mut cmd).unwrap().wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Runs the shell command `cmd` in `pod` (as its app) with `resolv_conf` mounted over
/// /etc/resolv.conf in a private mount namespace, as a container runtime gives a pod its own.
pub fn with_resolv_conf(pod: &Pod, resolv_conf: &str, cmd: &str) -> std::process::Output {
    let file = std::env::temp_dir().join(format!("trellis-resolv-{}", pod.netns));
    std::fs::write(&file, resolv_conf).unwrap();
    let script = format!(
        "mount --bind {} /etc/resolv.conf && exec {cmd}",
        file.display()
    );
    let mut c = Command::new("unshare");
    c.args(["--mount", "--propagation", "private", "sh", "-c", &script]);
    c.stdout(Stdio::piped()).stderr(Stdio::piped());
    let out = pod.spawn_app(&mut c).unwrap().wait_with_output().unwrap();
    let _ = std::fs::remove_file(&file);
    out
}

/// A pod's resolv.conf naming `resolver`, with the Kubernetes search path of namespace `ns`.
pub fn resolv_conf(resolver: impl std::fmt::Display, ns: &str) -> String {
    format!(
        "nameserver {resolver}\nsearch {ns}.svc.cluster.local svc.cluster.local cluster.local\n\
         options ndots:5 attempts:2 timeout:2\n"
    )
}

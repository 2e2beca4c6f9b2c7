//! The world outside the mesh, for tests and the demo: real servers run in a pod's network
//! namespace that is not enrolled (dnsmasq as the resolver, redis-server as a managed database),
//! the clients pods run against them (dig, redis-cli, with a pod's own resolv.conf), and tcpdump
//! on a node's link.
use std::{
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::{Pod, sys};

/// dnsmasq in the outsider's namespace (outside the mesh), authoritative for
/// `external.example` and answering NXDOMAIN for anything in `cluster.local` itself, so a mesh
/// answer can only have come from the agent.
pub struct Dnsmasq {
    child: Child,
    /// Its pid file and log, removed with it.
    dir: std::path::PathBuf,
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
        let d = Self { child, dir, log };
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
        let _ = std::fs::remove_dir_all(&self.dir);
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

/// Captures `link` in the network namespace `netns` (a node's uplink in the fabric, say) with
/// tcpdump `filter` while `f` runs; returns the raw capture.
pub fn capture(netns: &str, link: &str, filter: &str, f: impl FnOnce()) -> Vec<u8> {
    let file = std::env::temp_dir().join(format!("{}.pcap", sys::unique_name()));
    let mut tcpdump = Command::new("ip")
        .args([
            "netns",
            "exec",
            netns,
            "tcpdump",
            "-i",
            link,
            "--immediate-mode",
            "-U",
            "-s",
            "0",
            "-w",
        ])
        .arg(&file)
        .args(filter.split_whitespace())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting tcpdump (cargo xtask setup installs it)");
    // tcpdump says "listening on" once the capture is live.
    let mut err = std::io::BufReader::new(tcpdump.stderr.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut err, &mut line).unwrap();
    assert!(line.contains("listening"), "tcpdump: {line}");
    f();
    std::thread::sleep(Duration::from_millis(300));
    unsafe { libc::kill(tcpdump.id() as i32, libc::SIGINT) };
    let _ = tcpdump.wait();
    let mut rest = String::new();
    let _ = std::io::Read::read_to_string(&mut err, &mut rest);
    eprintln!("{line}{rest}");
    let bytes = std::fs::read(&file).unwrap();
    let _ = std::fs::remove_file(&file);
    bytes
}

pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Debian's redis-server on both of `pod`'s addresses, without persistence; killed on drop.
pub struct Redis(Child);

impl Redis {
    pub fn start(pod: &Pod) -> Self {
        Self::start_with(pod, &[])
    }

    /// With more redis-server options (a `--tls-port`, say); port 6379 is always served.
    pub fn start_with(pod: &Pod, extra: &[&str]) -> Self {
        let mut cmd = Command::new("redis-server");
        cmd.args([
            "--bind",
            &pod.ip4.to_string(),
            &pod.ip6.to_string(),
            "--port",
            "6379",
            "--save",
            "",
            "--appendonly",
            "no",
            "--protected-mode",
            "no",
        ])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        let redis = Self(
            pod.spawn_app(&mut cmd)
                .expect("starting redis-server (cargo xtask setup installs it)"),
        );
        let start = Instant::now();
        while redis_cli(pod, None, &["-h", &pod.ip4.to_string(), "PING"]) != "PONG" {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "redis-server did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        redis
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `redis-cli ARGS` as `pod`'s app (with `resolv_conf` as its /etc/resolv.conf, if given): what
/// it printed, stdout and stderr, trimmed.
pub fn redis_cli(pod: &Pod, resolv: Option<&str>, args: &[&str]) -> String {
    let out = match resolv {
        Some(conf) => with_resolv_conf(pod, conf, &format!("redis-cli {}", args.join(" "))),
        None => {
            let mut cmd = Command::new("redis-cli");
            cmd.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
            pod.spawn_app(&mut cmd)
                .and_then(|c| c.wait_with_output())
                .expect("running redis-cli (cargo xtask setup installs it)")
        }
    };
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
    .trim()
    .to_owned()
}

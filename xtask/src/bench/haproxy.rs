//! haproxy, the bench's reference proxy: alone as a plain L7 proxy in its own pod on the client's
//! node, and as a pair doing the mesh's work (`pair`). Every configuration routes HTTP as the
//! mesh's VirtualService does (match a header, set one; 404 without it).
use std::{
    fs::{self, File},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use trellis_e2e::Pod;

use super::{Server, l7, listening};
use crate::setup;

/// Where the single haproxy listens in its pod: HTTP/1.1 on one port, h2c prior knowledge on
/// the other.
pub const H1_PORT: u16 = 8080;
pub const H2_PORT: u16 = 8082;

pub fn binary() -> Result<PathBuf> {
    setup::which("haproxy")
        .context("haproxy is missing (cargo xtask setup installs it): the bench compares with it")
}

/// A running haproxy; killed and its files removed on drop.
pub struct HaProxy {
    pub pid: u32,
    _process: Server,
    files: [PathBuf; 2],
}

impl HaProxy {
    /// Starts haproxy in `pod` with `config` (files named after `name`) and waits until it
    /// listens on every port of `ports`.
    pub fn start(pod: &Pod, name: &str, config: &str, ports: &[u16]) -> Result<Self> {
        let base = files_dir().join(format!("{name}-{}", std::process::id()));
        let (config_file, log) = (base.with_extension("cfg"), base.with_extension("log"));
        fs::write(&config_file, config)
            .with_context(|| format!("writing {}", config_file.display()))?;
        let out = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let mut cmd = Command::new(binary()?);
        // -db: stay in the foreground, one process (its threads are all in its CPU figures).
        cmd.arg("-db")
            .arg("-f")
            .arg(&config_file)
            .stdout(Stdio::from(out.try_clone()?))
            .stderr(Stdio::from(out));
        let mut child = Server(
            pod.spawn_app(&mut cmd)
                .with_context(|| format!("starting haproxy {name} in pod {}", pod.name))?,
        );
        let pid = child.0.id();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !ports.iter().all(|p| listening(pid, *p)) {
            let said = || fs::read_to_string(&log).unwrap_or_default();
            if let Some(status) = child.0.try_wait()? {
                bail!("haproxy {name} exited ({status}): {}", said());
            }
            if Instant::now() > deadline {
                bail!(
                    "haproxy {name} did not listen on ports {ports:?} within 10 s: {}",
                    said()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
        Ok(Self {
            pid,
            _process: child,
            files: [config_file, log],
        })
    }
}

impl Drop for HaProxy {
    fn drop(&mut self) {
        for f in &self.files {
            let _ = fs::remove_file(f);
        }
    }
}

/// Where haproxy's configurations, logs and (for the pair) certificates are written.
pub fn files_dir() -> PathBuf {
    std::env::temp_dir()
}

/// The single haproxy in front of `upstream` (which speaks HTTP/1.1 and h2c).
pub fn start_plain(pod: &Pod, upstream: SocketAddr) -> Result<HaProxy> {
    HaProxy::start(
        pod,
        "trellis-bench-haproxy",
        &plain_config(upstream),
        &[H1_PORT, H2_PORT],
    )
}

/// haproxy's defaults (one thread per CPU) and the connection limits every configuration shares:
/// as many connections as the open-file limit allows (haproxy takes two descriptors for each
/// connection it proxies; the limit here is 20,000, and the bench cannot raise it), and idle
/// timeouts longer than the bench, so the memory step's idle connections stay open as they do
/// through the mesh.
pub fn globals(extra: &str) -> String {
    format!(
        "global\n    maxconn 9500\n{extra}\
         defaults\n    timeout connect 5s\n    timeout client 10m\n    timeout server 10m\n"
    )
}

/// The route, in a `mode http` frontend: a request without the MATCH header is refused with
/// 404, as the mesh's route does; the others get SET.
pub fn route() -> String {
    let (m, mv) = l7::MATCH;
    let (s, sv) = l7::SET;
    format!(
        "    http-request deny deny_status 404 unless {{ req.hdr({m}) -m str {mv} }}\n\
         \x20   http-request set-header {s} {sv}\n"
    )
}

fn plain_config(upstream: SocketAddr) -> String {
    let route = route();
    globals("")
        + &format!(
            "frontend h1\n    mode http\n    bind :{H1_PORT}\n{route}    default_backend upstream_h1\n\
             frontend h2\n    mode http\n    bind :{H2_PORT} proto h2\n{route}    default_backend upstream_h2\n\
             backend upstream_h1\n    mode http\n    server app {upstream}\n\
             backend upstream_h2\n    mode http\n    server app {upstream} proto h2\n"
        )
}

/// `path` as haproxy's configuration writes a file name.
pub fn file(path: &Path) -> String {
    path.display().to_string()
}

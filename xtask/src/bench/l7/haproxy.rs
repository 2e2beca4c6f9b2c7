//! haproxy as a plain L7 proxy, the bench's reference: in its own pod on the client's node,
//! doing the same per-request work as the mesh's route (match a header, set one).
use std::{
    fs::{self, File},
    net::SocketAddr,
    path::PathBuf,
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use trellis_e2e::Pod;

use super::{MATCH, SET};
use crate::{
    bench::{Server, listening},
    setup,
};

/// Where haproxy listens in its pod: HTTP/1.1 on one port, h2c prior knowledge on the other.
pub const H1_PORT: u16 = 8080;
pub const H2_PORT: u16 = 8082;

pub fn binary() -> Result<PathBuf> {
    setup::which("haproxy").context(
        "haproxy is missing (cargo xtask setup installs it): the L7 bench compares with it",
    )
}

/// A running haproxy; killed and its files removed on drop.
pub struct HaProxy {
    pub pid: u32,
    _process: Server,
    files: [PathBuf; 2],
}

impl HaProxy {
    /// Starts haproxy in `pod` in front of `upstream` (which speaks HTTP/1.1 and h2c) and waits
    /// until it listens on both ports.
    pub fn start(pod: &Pod, upstream: SocketAddr) -> Result<Self> {
        let base =
            std::env::temp_dir().join(format!("trellis-bench-haproxy-{}", std::process::id()));
        let (config, log) = (base.with_extension("cfg"), base.with_extension("log"));
        fs::write(&config, config_text(upstream))
            .with_context(|| format!("writing {}", config.display()))?;
        let out = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let mut cmd = Command::new(binary()?);
        // -db: stay in the foreground, one process (its threads are all in its CPU figures).
        cmd.arg("-db")
            .arg("-f")
            .arg(&config)
            .stdout(Stdio::from(out.try_clone()?))
            .stderr(Stdio::from(out));
        let mut child = Server(
            pod.spawn_app(&mut cmd)
                .with_context(|| format!("starting haproxy in pod {}", pod.name))?,
        );
        let pid = child.0.id();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !(listening(pid, H1_PORT) && listening(pid, H2_PORT)) {
            let said = || fs::read_to_string(&log).unwrap_or_default();
            if let Some(status) = child.0.try_wait()? {
                bail!("haproxy exited ({status}): {}", said());
            }
            if Instant::now() > deadline {
                bail!(
                    "haproxy did not listen on ports {H1_PORT} and {H2_PORT} within 10 s: {}",
                    said()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
        Ok(Self {
            pid,
            _process: child,
            files: [config, log],
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

/// `mode http` with haproxy's defaults otherwise (one thread per CPU). A request without the
/// MATCH header is refused with 404, as the mesh's route does; the others get SET.
fn config_text(upstream: SocketAddr) -> String {
    let (m, mv) = MATCH;
    let (s, sv) = SET;
    let route = format!(
        "    http-request deny deny_status 404 unless {{ req.hdr({m}) -m str {mv} }}\n\
         \x20   http-request set-header {s} {sv}\n"
    );
    format!(
        "global\n    maxconn 4096\n\
         defaults\n    mode http\n    timeout connect 5s\n    timeout client 30s\n    timeout server 30s\n\
         frontend h1\n    bind :{H1_PORT}\n{route}    default_backend upstream_h1\n\
         frontend h2\n    bind :{H2_PORT} proto h2\n{route}    default_backend upstream_h2\n\
         backend upstream_h1\n    server app {upstream}\n\
         backend upstream_h2\n    server app {upstream} proto h2\n"
    )
}

//! The proxies' memory at rest and with many idle connections open through them: the issue's
//! "idle agent" and "10k open idle connections" RSS rows.
use std::{
    io::{BufRead as _, BufReader},
    net::SocketAddr,
    process::{Command, Stdio},
    sync::mpsc,
    thread,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use trellis_e2e::{
    Pod,
    serde_json::{self, Value, json},
};

use super::{Server, loadgen, rss_mb};

/// Idle connections held open through the agents (the figure), and through the
/// haproxy pair: as many as its open-file limit allows (two descriptors per connection, a hard
/// limit of 20,000 here that the bench cannot raise).
pub const HELD: u32 = 10_000;
pub const HELD_PAIR: u32 = 9_000;
const HOLD_SECS: u64 = 5;
/// Opening them costs a round trip each through both proxies; far more than enough.
const OPEN_LIMIT: Duration = Duration::from_secs(180);

/// Each process's resident memory now (MB), and the largest.
pub fn resident(pids: &[u32]) -> Result<Value> {
    let each = rss_mb(pids, "VmRSS")?;
    Ok(json!({ "per_process": each, "max": each.iter().copied().fold(0.0, f64::max) }))
}

/// Opens `conns` connections from `client` to the echo at `echo` (each echoes a byte), reads
/// the proxies' resident memory while they sit idle, then checks every one still echoes. With
/// the proxies' idle memory (`resident` before), also what each connection added (KB).
pub fn with_held_connections(
    client: &Pod,
    echo: SocketAddr,
    pids: &[u32],
    conns: u32,
    idle: &Value,
) -> Result<Value> {
    let mut cmd = Command::new(loadgen());
    cmd.args([
        "hold",
        &echo.to_string(),
        "--conns",
        &conns.to_string(),
        "--duration-secs",
        &HOLD_SECS.to_string(),
    ])
    .stdout(Stdio::piped());
    let mut child = Server(client.spawn_app(&mut cmd)?);
    let stdout = child.0.stdout.take().context("stdout is piped")?;
    let (tx, lines) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let what = format!("trellis-loadgen hold {echo} --conns {conns}");
    let mut next = |limit: Duration| -> Result<String> {
        match lines.recv_timeout(limit) {
            Ok(line) => Ok(line?),
            Err(mpsc::RecvTimeoutError::Timeout) => bail!("{what}: nothing within {limit:?}"),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                bail!("{what} exited early ({:?})", child.0.wait())
            }
        }
    };
    let ready = next(OPEN_LIMIT)?;
    if ready != "ready" {
        bail!("{what} did not open its connections: {ready}");
    }
    // Let the proxies settle (buffers released after the handshakes) before reading.
    thread::sleep(Duration::from_secs(1));
    let rss = resident(pids)?;
    let report: Value = serde_json::from_str(&next(Duration::from_secs(HOLD_SECS + 60))?)
        .with_context(|| format!("{what} printed no JSON"))?;
    if report["alive"] != conns {
        bail!("{what}: not every held connection still echoed: {report}");
    }
    let kb_per_conn: Vec<Option<f64>> = (0..pids.len())
        .map(|i| {
            let (held, idle) = (
                rss["per_process"][i].as_f64()?,
                idle["per_process"][i].as_f64()?,
            );
            Some((held - idle) * 1024.0 / f64::from(conns))
        })
        .collect();
    let max_kb = kb_per_conn.iter().flatten().copied().fold(0.0, f64::max);
    Ok(json!({
        "held": conns,
        "rss_mb": rss,
        "kb_per_conn": { "per_process": kb_per_conn, "max": max_kb },
    }))
}

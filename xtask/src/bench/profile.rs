//! `--profile DIR`: `perf record` of the proxy processes during each measured step they work in
//! (the latency, connection-rate and max-rate runs), and a flat summary of each (`perf report`, by process and
//! symbol, entries over 1%) beside its data, to keep where the time goes with the figures.
use std::{
    fs,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::OnceLock,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};

static DIR: OnceLock<PathBuf> = OnceLock::new();

/// Profiles go to `dir` for the rest of the run (made if missing); needs `perf`.
pub fn enable(dir: PathBuf) -> Result<()> {
    if crate::setup::which("perf").is_none() {
        bail!("--profile needs perf (Debian's linux-perf)");
    }
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let _ = DIR.set(dir);
    Ok(())
}

/// A recording in progress; `finish` waits for it and writes its summary.
pub struct Recording {
    child: Child,
    data: PathBuf,
}

/// Starts recording `pids` for `duration` as `name` when profiling is on.
pub fn record(name: &str, pids: &[u32], duration: Duration) -> Result<Option<Recording>> {
    let (Some(dir), false) = (DIR.get(), pids.is_empty()) else {
        return Ok(None);
    };
    let data = dir.join(format!("{}.data", name.replace([' ', '/', '(', ')'], "_")));
    let pids: Vec<String> = pids.iter().map(u32::to_string).collect();
    let child = Command::new("perf")
        .args([
            "record",
            "-q",
            "-F",
            "997",
            "-g",
            "-p",
            &pids.join(","),
            "-o",
        ])
        .arg(&data)
        .args(["--", "sleep", &duration.as_secs().to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting perf record")?;
    Ok(Some(Recording { child, data }))
}

impl Recording {
    pub fn finish(mut self) -> Result<()> {
        self.child.wait().context("waiting for perf record")?;
        let out = Command::new("perf")
            .args(["report", "--stdio", "--no-children", "-g", "none"])
            .args(["--sort", "comm,dso,symbol", "--percent-limit", "1", "-i"])
            .arg(&self.data)
            .stderr(Stdio::null())
            .output()
            .context("perf report")?;
        let summary = self.data.with_extension("txt");
        fs::write(&summary, &out.stdout)
            .with_context(|| format!("writing {}", summary.display()))?;
        eprintln!("bench: profile {}", summary.display());
        Ok(())
    }
}

/// Runs `f` while recording `pids` as `name` (for at most `duration`).
pub fn around<T>(
    name: &str,
    pids: &[u32],
    duration: Duration,
    f: impl FnOnce() -> Result<T>,
) -> Result<T> {
    let recording = record(name, pids, duration)?;
    let out = f();
    if let Some(r) = recording {
        r.finish()?;
    }
    out
}

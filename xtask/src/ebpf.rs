//! `cargo xtask build-ebpf`: the kernel programs are built by the agent's build script (aya-build,
//! nightly, build-std=core); this runs that build and reports where the object landed.
use std::{io::BufRead as _, path::PathBuf, process::Stdio};

use anyhow::{Context as _, Result, bail};

use crate::cmd;

pub fn run() -> Result<()> {
    let object = build()?;
    let size = std::fs::metadata(&object)?.len();
    println!("{}  ({size} bytes)", object.display());
    Ok(())
}

/// Builds the agent (and so the kernel programs) and returns the object's path.
pub fn build() -> Result<PathBuf> {
    eprintln!("$ cargo build -p trellis-agent --message-format=json-render-diagnostics");
    let mut child = cmd::cargo()
        .args([
            "build",
            "-p",
            "trellis-agent",
            "--message-format=json-render-diagnostics",
        ])
        .current_dir(cmd::root())
        .stdout(Stdio::piped())
        .spawn()
        .context("running cargo build")?;
    let mut out_dir = None;
    for line in std::io::BufReader::new(child.stdout.take().expect("piped")).lines() {
        let line = line?;
        // {"reason":"build-script-executed","package_id":"path+file://…/agent#trellis-agent@0.1.0",…,"out_dir":"…"}
        if line.contains("\"build-script-executed\"") && line.contains("trellis-agent@") {
            out_dir = line
                .split("\"out_dir\":\"")
                .nth(1)
                .and_then(|s| s.split('"').next())
                .map(PathBuf::from);
        }
    }
    if !child.wait()?.success() {
        bail!("building the agent and its kernel programs failed (run `cargo xtask setup` first?)");
    }
    let object = out_dir
        .context("cargo did not report the agent's build-script output")?
        .join("trellis");
    if !object.is_file() {
        bail!("expected the kernel object at {}", object.display());
    }
    Ok(object)
}

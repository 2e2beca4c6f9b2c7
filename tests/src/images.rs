//! Trellis's container images (`cargo xtask images`, and the real-node tests): the agent, control
//! and the test apps, each only executables and the shared libraries they load.
//! Debug information is stripped: it is most of a binary's size and no use inside a pod.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::oci;

/// The images' tag: the workspace version, which the manifests in deploy/ name too.
pub const TAG: &str = env!("CARGO_PKG_VERSION");

/// An image Trellis builds: its name and the binaries in it (the first is the entrypoint).
pub struct Spec {
    pub name: &'static str,
    pub binaries: &'static [&'static str],
}

/// The agent and control, and the test apps the end-to-end pods run.
pub const IMAGES: [Spec; 3] = [
    Spec {
        name: "localhost/trellis/agent",
        binaries: &["trellis-agent"],
    },
    Spec {
        name: "localhost/trellis/control",
        binaries: &["trellis-control"],
    },
    Spec {
        name: "localhost/trellis/apps",
        binaries: &["trellis-demo-app", "trellis-testpod"],
    },
];

impl Spec {
    /// The full reference, e.g. `localhost/trellis/agent:0.1.0`.
    pub fn reference(&self) -> String {
        format!("{}:{TAG}", self.name)
    }

    /// The image built from `bin_dir` (target/debug or target/release), with stripped copies of
    /// the binaries kept in `work`.
    pub fn image(&self, bin_dir: &Path, work: &Path) -> Result<oci::Image> {
        std::fs::create_dir_all(work)?;
        let at = |b: &str| format!("/usr/local/bin/{b}");
        let mut image = oci::Image::new(&self.reference(), &[&at(self.binaries[0])]);
        for binary in self.binaries {
            image =
                image.executable_with_libs(&stripped(&bin_dir.join(binary), work)?, &at(binary))?;
        }
        Ok(image)
    }
}

/// The image named `name` (`localhost/trellis/agent` …).
pub fn spec(name: &str) -> &'static Spec {
    IMAGES
        .iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no image {name}"))
}

/// A copy of `built` without debug information, in `work`.
fn stripped(built: &Path, work: &Path) -> Result<PathBuf> {
    if !built.is_file() {
        bail!(
            "{} is missing: build it first (cargo build --bins)",
            built.display()
        );
    }
    let out_path = work.join(built.file_name().context("a binary has a file name")?);
    let out = Command::new("objcopy")
        .arg("--strip-debug")
        .arg(built)
        .arg(&out_path)
        .output()
        .context("running objcopy (binutils)")?;
    if !out.status.success() {
        bail!(
            "objcopy --strip-debug {}: {}",
            built.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out_path)
}

/// Writes every image as an OCI archive `<out>/<name>-<tag>.tar`; returns (reference, archive).
pub fn write_all(bin_dir: &Path, out: &Path) -> Result<Vec<(String, PathBuf)>> {
    let work = out.join("work");
    let mut written = Vec::new();
    for spec in &IMAGES {
        let file = spec.name.rsplit('/').next().unwrap_or(spec.name);
        let tar = out.join(format!("trellis-{file}-{TAG}.tar"));
        spec.image(bin_dir, &work.join("bin"))?
            .write_tar(&work.join("layout"), &tar)?;
        written.push((spec.reference(), tar));
    }
    let _ = std::fs::remove_dir_all(&work);
    Ok(written)
}

//! `cargo xtask manifests`: writes the generated deployment files (the mesh CRDs) into deploy/.
use anyhow::{Context as _, Result};

use crate::cmd;

pub fn run() -> Result<()> {
    let path = cmd::root().join(trellis_control::istio::CRDS_FILE);
    std::fs::create_dir_all(path.parent().expect("has a parent"))?;
    std::fs::write(&path, trellis_control::istio::crds_yaml()?)
        .with_context(|| format!("writing {}", path.display()))?;
    eprintln!("manifests: wrote {}", path.display());
    Ok(())
}

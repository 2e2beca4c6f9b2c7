//! `cargo xtask images`: Trellis's container images without a Docker daemon. Builds the binaries,
//! packs each as an OCI archive in target/images/ (for `ctr images import` or `docker load`) and
//! imports them into the node of `cargo xtask cluster up` when one runs.
use std::{fs, path::PathBuf};

use anyhow::Result;
use trellis_e2e::{images, kubenode};

use crate::cmd;

pub fn run(debug: bool, out: Option<PathBuf>) -> Result<()> {
    let profile = if debug { "debug" } else { "release" };
    let mut build = cmd::cargo();
    build.args(["build", "--bins"]);
    if !debug {
        build.arg("--release");
    }
    for package in ["trellis-agent", "trellis-control", "trellis-e2e"] {
        build.args(["-p", package]);
    }
    cmd::run(&mut build)?;
    let out = out.unwrap_or_else(|| cmd::target_dir().join("images"));
    fs::create_dir_all(&out)?;
    eprintln!(
        "images: packing the {profile} binaries into {}",
        out.display()
    );
    let written = images::write_all(&cmd::target_dir().join(profile), &out)?;
    for (reference, tar) in &written {
        let size = fs::metadata(tar)?.len();
        println!(
            "{reference:40} {:6.1} MB  {}",
            size as f64 / 1e6,
            tar.display()
        );
    }
    let running = kubenode::State::load().filter(|s| s.alive("containerd"));
    match running {
        Some(state) => {
            for (reference, tar) in &written {
                eprintln!("images: importing {reference} into the node's containerd");
                kubenode::import_image(&state, tar)?;
            }
        }
        None => println!(
            "\nNo `cargo xtask cluster up` node runs here. Load the archives with\n  \
               ctr --namespace k8s.io images import <archive>     (containerd)\n  \
               docker load -i <archive>                           (Docker)\n\
             or push them to your registry and point deploy/kustomization.yaml at it."
        ),
    }
    Ok(())
}

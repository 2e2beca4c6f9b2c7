//! `cargo xtask setup`: make a fresh machine able to build and test Trellis. Each step checks
//! first and says what it found or did, so a second run takes seconds.
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context as _, Result, bail};

use crate::cmd::{self, output};

const BPF_LINKER_VERSION: &str = "0.13.0";
/// Debian packages the tests and the demo use: `ip` (netns, veth, bridges), bpftool (tests
/// inspect attachments independently of the agent), tcpdump (tests check the wire between nodes
/// holds no plaintext), iptables (tests set up kube-proxy's NodePort NAT); iperf3 and haproxy
/// (the L7 reference proxy) for `cargo xtask bench`; dnsmasq (the real resolver outside the mesh)
/// and dig for the DNS tests (`dnsmasq-base`: the binary alone, no system service); redis-server
/// (the "managed Redis" of the egress scenario; its service is not started in a container);
/// prometheus (the real one the observability tests and the demo scrape the agents with) and
/// chromium (the headless browser that tests the traffic graph page).
const DEBIAN_PACKAGES: &[(&str, &str)] = &[
    ("iproute2", "ip"),
    ("bpftool", "bpftool"),
    ("openssl", "openssl"),
    ("iperf3", "iperf3"),
    ("haproxy", "haproxy"),
    ("tcpdump", "tcpdump"),
    ("iptables", "iptables"),
    ("dnsmasq-base", "dnsmasq"),
    ("bind9-dnsutils", "dig"),
    ("redis-server", "redis-server"),
    ("prometheus", "prometheus"),
    ("chromium", "chromium"),
];

pub fn run() -> Result<()> {
    tools()?;
    cargo_fuzz()?;
    crate::apiserver::ensure()?;
    eprintln!("setup: done");
    Ok(())
}

/// The set-up steps that building and running the agent need (not the Kubernetes API server).
pub fn tools() -> Result<()> {
    nightly_rust_src()?;
    bpf_linker()?;
    debian_packages()
}

fn nightly_rust_src() -> Result<()> {
    if output("rustup", &["run", "nightly", "rustc", "--version"]).is_none() {
        eprintln!("setup: installing the nightly toolchain (the eBPF programs need it)");
        cmd::run(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))?;
    }
    let installed = output(
        "rustup",
        &["component", "list", "--toolchain", "nightly", "--installed"],
    )
    .unwrap_or_default();
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        eprintln!("setup: nightly rust-src present");
        return Ok(());
    }
    eprintln!("setup: adding nightly rust-src (build-std=core for bpfel-unknown-none)");
    cmd::run(Command::new("rustup").args([
        "component",
        "add",
        "rust-src",
        "--toolchain",
        "nightly",
    ]))
}

/// cargo-fuzz, which builds and runs the fuzz targets in fuzz/ (`cargo install` keeps it in
/// ~/.cargo/bin, so this builds it once).
pub fn cargo_fuzz() -> Result<()> {
    if let Some(v) = output("cargo", &["fuzz", "--version"]) {
        eprintln!("setup: {} present", v.trim());
        return Ok(());
    }
    eprintln!("setup: installing cargo-fuzz (about two minutes)");
    let start = Instant::now();
    cmd::run(cmd::cargo().args(["install", "cargo-fuzz", "--locked"]))?;
    eprintln!("setup: cargo-fuzz installed in {:.0?}", start.elapsed());
    Ok(())
}

fn cache_dir() -> PathBuf {
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"));
    home.join(".cache/trellis")
}

fn bpf_linker() -> Result<()> {
    if let Some(v) = output("bpf-linker", &["--version"])
        && v.contains(BPF_LINKER_VERSION)
    {
        eprintln!("setup: bpf-linker {BPF_LINKER_VERSION} present");
        return Ok(());
    }
    // bpf-linker links against LLVM; the one that matches the nightly compiler is the nightly
    // toolchain's own libLLVM. Give cargo install a prefix whose lib/ holds it under both names.
    let sysroot = output("rustc", &["+nightly", "--print", "sysroot"])
        .context("rustc +nightly --print sysroot")?;
    let lib = Path::new(sysroot.trim()).join("lib");
    let llvm = fs::read_dir(&lib)?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("libLLVM.so."))
        .with_context(|| {
            format!(
                "no libLLVM.so.* in {}: is the nightly toolchain complete?",
                lib.display()
            )
        })?;
    let major = llvm
        .trim_start_matches("libLLVM.so.")
        .split('.')
        .next()
        .unwrap_or_default()
        .to_owned();
    let prefix = cache_dir().join("llvm-prefix");
    let prefix_lib = prefix.join("lib");
    fs::create_dir_all(&prefix_lib)?;
    for name in ["libLLVM.so", llvm.as_str()] {
        let link = prefix_lib.join(name);
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink(lib.join(&llvm), &link)
            .with_context(|| format!("linking {}", link.display()))?;
    }
    eprintln!(
        "setup: building bpf-linker {BPF_LINKER_VERSION} against nightly's {llvm} (about a minute)"
    );
    let start = Instant::now();
    cmd::run(
        cmd::cargo()
            .args([
                "install",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--no-default-features",
            ])
            .args(["--features", &format!("llvm-{major}")])
            .arg("--target-dir")
            .arg(cache_dir().join("bpf-linker-target"))
            .env("LLVM_PREFIX", &prefix),
    )?;
    eprintln!("setup: bpf-linker built in {:.0?}", start.elapsed());
    Ok(())
}

fn debian_packages() -> Result<()> {
    let missing: Vec<&str> = DEBIAN_PACKAGES
        .iter()
        .filter(|(_, bin)| which(bin).is_none())
        .map(|(pkg, _)| *pkg)
        .collect();
    if missing.is_empty() {
        eprintln!(
            "setup: Debian packages present ({})",
            DEBIAN_PACKAGES
                .iter()
                .map(|p| p.0)
                .collect::<Vec<_>>()
                .join(", ")
        );
        return Ok(());
    }
    if which("apt-get").is_none() {
        bail!("missing {missing:?} and no apt-get to install them: install them by hand");
    }
    cmd::apt_install(&missing, "the tests use them")
}

/// `bin` on PATH or in the sbin directories (haproxy is in /usr/sbin).
pub fn which(bin: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join(bin))
        .find(|p| p.is_file())
}

//! Setup step: real Kubernetes binaries for the tests: kube-apiserver for the API tests, and
//! kubelet, kube-scheduler, kube-controller-manager and kube-proxy for the real node
//! (`trellis_e2e::kubenode`). No registry ships them, so build them from Debian bookworm's
//! `kubernetes` source package (1.20.2, vendored Go dependencies) with Debian's Go, offline, from
//! one source fetch. Cached outside the checkout; about 15 minutes on 2 cores the first time.
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context as _, Result, bail};
use trellis_e2e::{apiserver, kubenode};

use crate::cmd;

const SOURCE_VERSION: &str = "1.20.5+really1.20.2-1.1+deb12u1";
/// golang-go builds it; etcd-server runs under it; reflect2 replaces the vendored copy, whose
/// 1.0.1 breaks under Go >= 1.18 whenever json-iterator encodes a map (pretty-printed JSON or
/// YAML responses, e.g. to curl or `?pretty=true`); dpkg-dev unpacks the source;
/// make and rsync run Kubernetes' own build (which generates the OpenAPI code first).
/// The real node runs on Debian's containerd, runc and CNI plugins (bridge, host-local, portmap,
/// loopback in /usr/lib/cni); kube-proxy and kubelet need iptables and conntrack, and
/// `kube-proxy --cleanup` fails without ipset (it also removes IPVS mode's sets).
const PACKAGES: [&str; 12] = [
    "golang-go",
    "etcd-server",
    "golang-github-modern-go-reflect2-dev",
    "dpkg-dev",
    "make",
    "rsync",
    "containerd",
    "runc",
    "containernetworking-plugins",
    "iptables",
    "conntrack",
    "ipset",
];
/// What is built, with the time each took on a fresh 2-core machine. The first build also
/// generates code (about 8 minutes of it) and the Go cache is shared, so later ones are quicker.
const BINARIES: [(&str, &str); 5] = [
    ("kube-apiserver", "about 10 minutes"),
    ("kubelet", "about 2 minutes, 11 if it is the first"),
    ("kube-controller-manager", "about 1.5 minutes"),
    ("kube-scheduler", "under a minute"),
    ("kube-proxy", "under a minute"),
];
const REFLECT2: &str = "/usr/share/gocode/src/github.com/modern-go/reflect2";

pub fn ensure() -> Result<()> {
    // The tests drive the server with kubectl >= 1.24 (`patch --subresource=status`); Debian's
    // own kubectl is 1.20, so it must come with the machine.
    if cmd::output("kubectl", &["version", "--client"]).is_none() {
        bail!("kubectl (1.24 or newer) is not installed; the Kubernetes tests need it");
    }
    install_packages()?;
    let missing: Vec<(&str, &str, PathBuf)> = BINARIES
        .iter()
        .map(|&(name, took)| (name, took, target(name)))
        .filter(|(_, _, bin)| !bin.is_file())
        .collect();
    if missing.is_empty() {
        eprintln!(
            "setup: Kubernetes {} binaries present ({})",
            apiserver::VERSION,
            BINARIES.map(|b| b.0).join(", ")
        );
        return Ok(());
    }
    let work = kubenode::kube_dir().join("build");
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work)?;
    fetch_source(&work)?;
    prepare(&work)?;
    let all = Instant::now();
    for (name, took, bin) in &missing {
        eprintln!(
            "setup: building {name} {} from Debian source ({took} on 2 cores)",
            apiserver::VERSION
        );
        let start = Instant::now();
        build(&work, name, bin)?;
        eprintln!("setup: {name} built in {:.0?}", start.elapsed());
    }
    eprintln!(
        "setup: {} Kubernetes binaries built in {:.0?}",
        missing.len(),
        all.elapsed()
    );
    let _ = fs::remove_dir_all(&work);
    Ok(())
}

/// Where `name` is cached (kube-apiserver where the API tests look for it).
fn target(name: &str) -> PathBuf {
    if name == "kube-apiserver" {
        apiserver::binary()
    } else {
        kubenode::binary(name)
    }
}

fn install_packages() -> Result<()> {
    let missing: Vec<&str> = PACKAGES
        .into_iter()
        .filter(|p| {
            !Command::new("dpkg")
                .args(["-s", p])
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    cmd::apt_install(&missing, "to build and run Kubernetes")
}

/// `apt-get source` through a private APT configuration (deb-src lines of its own), so the
/// machine's /etc/apt is never touched.
fn fetch_source(work: &Path) -> Result<()> {
    let apt = work.join("apt");
    for d in ["lists/partial", "archives/partial", "sources.list.d"] {
        fs::create_dir_all(apt.join(d))?;
    }
    fs::write(
        apt.join("sources.list"),
        "deb-src http://deb.debian.org/debian bookworm main\n\
         deb-src http://deb.debian.org/debian bookworm-updates main\n\
         deb-src http://deb.debian.org/debian-security bookworm-security main\n",
    )?;
    let opts = [
        format!(
            "-oDir::Etc::SourceList={}",
            apt.join("sources.list").display()
        ),
        format!(
            "-oDir::Etc::SourceParts={}",
            apt.join("sources.list.d").display()
        ),
        format!("-oDir::State::Lists={}", apt.join("lists").display()),
        format!("-oDir::Cache::Archives={}", apt.join("archives").display()),
    ];
    eprintln!("setup: fetching Debian's kubernetes {SOURCE_VERSION} source package");
    cmd::run(Command::new("apt-get").args(&opts).args(["update", "-q"]))?;
    cmd::run(
        Command::new("apt-get")
            .args(&opts)
            .args([
                "source",
                "--download-only",
                &format!("kubernetes={SOURCE_VERSION}"),
            ])
            .current_dir(work),
    )?;
    let dsc = format!("kubernetes_{SOURCE_VERSION}.dsc");
    cmd::run(
        Command::new("dpkg-source")
            .args(["-x", &dsc, "src"])
            .current_dir(work),
    )
}

/// Replaces the vendored reflect2 and writes the version file the build reads.
fn prepare(work: &Path) -> Result<()> {
    let src = work.join("src");
    let vendored = src.join("vendor/github.com/modern-go/reflect2");
    fs::remove_dir_all(&vendored).with_context(|| format!("removing {}", vendored.display()))?;
    cmd::run(Command::new("cp").arg("-r").arg(REFLECT2).arg(&vendored))?;
    // The version comes from a file since there is no git history.
    fs::write(
        work.join("version.env"),
        format!(
            "KUBE_GIT_VERSION='{}'\nKUBE_GIT_MAJOR='1'\nKUBE_GIT_MINOR='20'\nKUBE_GIT_TREE_STATE='clean'\n\
             KUBE_GIT_COMMIT='faecb196815e248d3ecfb03c680a4507229c2a56'\n",
            apiserver::VERSION
        ),
    )?;
    Ok(())
}

/// Kubernetes' own build, as Debian's package runs it: it generates code (OpenAPI definitions
/// are not in the source) and builds in GOPATH mode; one Go cache serves every binary.
fn build(work: &Path, name: &str, bin: &Path) -> Result<()> {
    let src = work.join("src");
    let status = Command::new("make")
        .arg(format!("WHAT=cmd/{name}"))
        .current_dir(&src)
        .env("HOME", work)
        .env("KUBE_GIT_VERSION_FILE", work.join("version.env"))
        .env("KUBE_BUILD_PLATFORMS", "linux/amd64")
        .env("GOCACHE", work.join("gocache"))
        .env("GO111MODULE", "off")
        .env("GOFLAGS", "")
        .env("CGO_ENABLED", "0")
        .status()
        .context("running make")?;
    if !status.success() {
        bail!(
            "building {name} failed ({status}); the source is in {}",
            src.display()
        );
    }
    let built = src.join("_output/bin").join(name);
    fs::create_dir_all(bin.parent().context("binary path has a parent")?)?;
    let tmp = bin.with_extension("partial");
    fs::copy(&built, &tmp).with_context(|| format!("copying {}", built.display()))?;
    fs::rename(&tmp, bin)?;
    Ok(())
}

//! Setup step: a real kube-apiserver for the Kubernetes tests. No registry ships one, so build it
//! from Debian bookworm's `kubernetes` source package (1.20.2, vendored Go dependencies) with
//! Debian's Go, offline. Cached outside the checkout; about 7 minutes the first time.
use std::{fs, path::Path, process::Command, time::Instant};

use anyhow::{Context as _, Result, bail};
use trellis_e2e::apiserver;

use crate::cmd;

const SOURCE_VERSION: &str = "1.20.5+really1.20.2-1.1+deb12u1";
/// golang-go builds it; etcd-server runs under it; reflect2 replaces the vendored copy, whose
/// 1.0.1 breaks under Go >= 1.18 whenever json-iterator encodes a map (pretty-printed JSON or
/// YAML responses, e.g. to curl or `?pretty=true`); dpkg-dev unpacks the source;
/// make and rsync run Kubernetes' own build (which generates the OpenAPI code first).
const PACKAGES: [&str; 6] = [
    "golang-go",
    "etcd-server",
    "golang-github-modern-go-reflect2-dev",
    "dpkg-dev",
    "make",
    "rsync",
];
const REFLECT2: &str = "/usr/share/gocode/src/github.com/modern-go/reflect2";

pub fn ensure() -> Result<()> {
    // The tests drive the server with kubectl >= 1.24 (`patch --subresource=status`); Debian's
    // own kubectl is 1.20, so it must come with the machine.
    if cmd::output("kubectl", &["version", "--client"]).is_none() {
        bail!("kubectl (1.24 or newer) is not installed; the Kubernetes tests need it");
    }
    let bin = apiserver::binary();
    if bin.is_file() {
        eprintln!("setup: kube-apiserver {} present", apiserver::VERSION);
        return Ok(());
    }
    install_packages()?;
    let work = bin
        .parent()
        .context("binary path has a parent")?
        .join("build");
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work)?;
    fetch_source(&work)?;
    eprintln!(
        "setup: building kube-apiserver {} from Debian source (about 7 minutes on 2 cores)",
        apiserver::VERSION
    );
    let start = Instant::now();
    build(&work, &bin)?;
    eprintln!("setup: kube-apiserver built in {:.0?}", start.elapsed());
    let _ = fs::remove_dir_all(&work);
    Ok(())
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
    cmd::apt_install(&missing, "to build and run kube-apiserver")
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

fn build(work: &Path, bin: &Path) -> Result<()> {
    let src = work.join("src");
    let vendored = src.join("vendor/github.com/modern-go/reflect2");
    fs::remove_dir_all(&vendored).with_context(|| format!("removing {}", vendored.display()))?;
    cmd::run(Command::new("cp").arg("-r").arg(REFLECT2).arg(&vendored))?;
    // Kubernetes' own build, as Debian's package runs it: it generates code (OpenAPI definitions
    // are not in the source) and builds in GOPATH mode. The version comes from a file since
    // there is no git history.
    let version_file = work.join("version.env");
    fs::write(
        &version_file,
        format!(
            "KUBE_GIT_VERSION='{}'\nKUBE_GIT_MAJOR='1'\nKUBE_GIT_MINOR='20'\nKUBE_GIT_TREE_STATE='clean'\n\
             KUBE_GIT_COMMIT='faecb196815e248d3ecfb03c680a4507229c2a56'\n",
            apiserver::VERSION
        ),
    )?;
    let status = Command::new("make")
        .arg("WHAT=cmd/kube-apiserver")
        .current_dir(&src)
        .env("HOME", work)
        .env("KUBE_GIT_VERSION_FILE", &version_file)
        .env("KUBE_BUILD_PLATFORMS", "linux/amd64")
        .env("GOCACHE", work.join("gocache"))
        .env("GO111MODULE", "off")
        .env("GOFLAGS", "")
        .env("CGO_ENABLED", "0")
        .status()
        .context("running make")?;
    if !status.success() {
        bail!(
            "building kube-apiserver failed ({status}); the source is in {}",
            src.display()
        );
    }
    let built = src.join("_output/bin/kube-apiserver");
    let tmp = bin.with_extension("partial");
    fs::copy(&built, &tmp).with_context(|| format!("copying {}", built.display()))?;
    fs::rename(&tmp, bin)?;
    Ok(())
}

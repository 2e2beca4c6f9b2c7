//! OCI image archives built without a container daemon or registry: files are copied into a root
//! filesystem, packed as one uncompressed layer with GNU tar (sorted, owner 0, mtime 0, so the
//! same inputs give the same digests) and described by a config, a manifest and an index whose
//! `io.containerd.image.name` annotation names the image for `ctr images import`.
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};
use serde_json::json;

/// An image to pack: files (path in the image, file on this machine) and the entrypoint.
pub struct Image {
    /// Full reference, e.g. `localhost/trellis/testpod:dev`.
    pub name: String,
    pub files: Vec<(String, PathBuf)>,
    pub entrypoint: Vec<String>,
}

impl Image {
    pub fn new(name: &str, entrypoint: &[&str]) -> Self {
        Self {
            name: name.to_owned(),
            files: Vec::new(),
            entrypoint: entrypoint.iter().map(|s| s.to_string()).collect(),
        }
    }

    /// Adds a dynamically linked executable at `at` together with the shared libraries and loader
    /// `ldd` names, at the same paths as on this machine (so the image needs no base).
    pub fn executable_with_libs(mut self, binary: &Path, at: &str) -> Result<Self> {
        self.files.push((at.to_owned(), binary.to_owned()));
        for lib in shared_libs(binary)? {
            let inside = lib.to_string_lossy().into_owned();
            if !self.files.iter().any(|(p, _)| *p == inside) {
                self.files.push((inside, lib));
            }
        }
        Ok(self)
    }

    /// Writes the image as an OCI image-layout tar at `out`, using `work` as scratch space.
    pub fn write_tar(&self, work: &Path, out: &Path) -> Result<()> {
        let _ = fs::remove_dir_all(work);
        let rootfs = work.join("rootfs");
        let layout = work.join("layout");
        let blobs = layout.join("blobs/sha256");
        fs::create_dir_all(&blobs)?;
        fs::create_dir_all(rootfs.join("tmp"))?;
        for (inside, host) in &self.files {
            let dest = rootfs.join(inside.trim_start_matches('/'));
            fs::create_dir_all(dest.parent().context("image path has a parent")?)?;
            // fs::copy keeps the permission bits (executables stay executable).
            fs::copy(host, &dest).with_context(|| format!("copying {}", host.display()))?;
        }
        let layer = work.join("layer.tar");
        tar(&rootfs, &layer, &["."])?;
        let layer_digest = add_blob(&blobs, &fs::read(&layer)?)?;
        let config = json!({
            "architecture": "amd64",
            "os": "linux",
            "config": {
                "Entrypoint": self.entrypoint,
                "Env": ["PATH=/usr/local/bin:/usr/bin:/bin"],
            },
            "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{layer_digest}")]},
        });
        let config = serde_json::to_vec(&config)?;
        let config_digest = add_blob(&blobs, &config)?;
        let manifest = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": format!("sha256:{config_digest}"),
                "size": config.len(),
            },
            "layers": [{
                "mediaType": "application/vnd.oci.image.layer.v1.tar",
                "digest": format!("sha256:{layer_digest}"),
                "size": fs::metadata(&layer)?.len(),
            }],
        }))?;
        let manifest_digest = add_blob(&blobs, &manifest)?;
        let tag = self.name.rsplit_once(':').map_or("latest", |(_, t)| t);
        let index = json!({
            "schemaVersion": 2,
            "manifests": [{
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": format!("sha256:{manifest_digest}"),
                "size": manifest.len(),
                "platform": {"architecture": "amd64", "os": "linux"},
                "annotations": {
                    "io.containerd.image.name": self.name,
                    "org.opencontainers.image.ref.name": tag,
                },
            }],
        });
        fs::write(layout.join("index.json"), serde_json::to_vec(&index)?)?;
        fs::write(
            layout.join("oci-layout"),
            r#"{"imageLayoutVersion":"1.0.0"}"#,
        )?;
        tar(&layout, out, &["oci-layout", "index.json", "blobs"])?;
        let _ = fs::remove_dir_all(work);
        Ok(())
    }
}

/// The libraries and loader an executable loads, as `ldd` reports them (none when static).
fn shared_libs(binary: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .context("running ldd")?;
    let text = String::from_utf8_lossy(&out.stdout);
    // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x…)" or "/lib64/ld-linux-x86-64.so.2 (0x…)"
    Ok(text
        .lines()
        .filter_map(|l| {
            let path = l.split("=>").last()?.split_whitespace().next()?;
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect())
}

/// Stores `data` as a blob named by its sha256 and returns the hex digest.
fn add_blob(blobs: &Path, data: &[u8]) -> Result<String> {
    let tmp = blobs.join("incoming");
    fs::write(&tmp, data)?;
    let out = Command::new("sha256sum")
        .arg(&tmp)
        .output()
        .context("running sha256sum")?;
    let digest = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .filter(|d| d.len() == 64)
        .context("sha256sum printed no digest")?
        .to_owned();
    fs::rename(&tmp, blobs.join(&digest))?;
    Ok(digest)
}

/// A reproducible tar of `entries` in `dir`.
fn tar(dir: &Path, out: &Path, entries: &[&str]) -> Result<()> {
    let status = Command::new("tar")
        .args([
            "--sort=name",
            "--owner=0",
            "--group=0",
            "--numeric-owner",
            "--mtime=@0",
            "--format=posix",
            "--pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime",
            "-cf",
        ])
        .arg(out)
        .arg("-C")
        .arg(dir)
        .args(entries)
        .status()
        .context("running tar")?;
    if !status.success() {
        bail!("tar of {} failed ({status})", dir.display());
    }
    Ok(())
}

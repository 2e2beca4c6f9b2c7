//! Finding a pod's cgroup the way kubelet lays it out, and the processes inside it.
use std::{
    fs,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};

/// The cgroup v2 mount point, read from /proc/mounts (its place differs between distributions).
pub fn cgroup2_mount() -> Result<PathBuf> {
    let mounts = fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    mounts
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (_, dir, fstype) = (fields.next()?, fields.next()?, fields.next()?);
            (fstype == "cgroup2").then(|| PathBuf::from(dir))
        })
        .next()
        .context("no cgroup2 filesystem is mounted: Trellis needs cgroup v2 (mount -t cgroup2 none /sys/fs/cgroup)")
}

/// Pod UIDs become path components, so accept only what Kubernetes generates.
pub fn validate_uid(uid: &str) -> Result<()> {
    if uid.is_empty() || uid.len() > 64 || !uid.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
        bail!("invalid pod UID {uid:?}: expected a UUID such as 3f2a…-…");
    }
    Ok(())
}

/// Where kubelet puts a pod's cgroup, for both cgroup drivers and every QoS class.
fn candidates(root: &Path, uid: &str) -> Vec<PathBuf> {
    let systemd_uid = uid.replace('-', "_");
    let mut paths = vec![
        root.join(format!("kubepods.slice/kubepods-pod{systemd_uid}.slice")),
        root.join(format!("kubepods/pod{uid}")),
    ];
    for qos in ["burstable", "besteffort"] {
        paths.push(root.join(format!(
            "kubepods.slice/kubepods-{qos}.slice/kubepods-{qos}-pod{systemd_uid}.slice"
        )));
        paths.push(root.join(format!("kubepods/{qos}/pod{uid}")));
    }
    paths
}

pub fn find_pod_cgroup(root: &Path, uid: &str) -> Result<PathBuf> {
    validate_uid(uid)?;
    candidates(root, uid).into_iter().find(|p| p.is_dir()).with_context(|| {
        format!(
            "no cgroup for pod {uid} under {} (looked for kubepods.slice/…-pod{}.slice and kubepods/…/pod{uid}); \
             is the pod running on this node, and is --cgroup-root right?",
            root.display(),
            uid.replace('-', "_")
        )
    })
}

/// The cgroup v2 id the kernel reports (`bpf_get_current_ancestor_cgroup_id`) is the inode number.
pub fn cgroup_id(path: &Path) -> Result<u64> {
    Ok(fs::metadata(path)
        .with_context(|| format!("stat {}", path.display()))?
        .ino())
}

/// A process in the cgroup or any cgroup below it (containers sit below the pod cgroup).
pub fn any_pid(path: &Path) -> Result<Option<u32>> {
    let procs = path.join("cgroup.procs");
    let text =
        fs::read_to_string(&procs).with_context(|| format!("reading {}", procs.display()))?;
    if let Some(pid) = text.lines().find_map(|l| l.trim().parse().ok()) {
        return Ok(Some(pid));
    }
    for entry in fs::read_dir(path).with_context(|| format!("listing {}", path.display()))? {
        let entry = entry?;
        if entry.file_type()?.is_dir()
            && let Some(pid) = any_pid(&entry.path())?
        {
            return Ok(Some(pid));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "0b6d1a4e-8c55-4d7e-9a37-2f1c9e6b3a10";

    #[test]
    fn finds_every_kubelet_layout() {
        for rel in [
            "kubepods.slice/kubepods-pod0b6d1a4e_8c55_4d7e_9a37_2f1c9e6b3a10.slice",
            "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod0b6d1a4e_8c55_4d7e_9a37_2f1c9e6b3a10.slice",
            "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod0b6d1a4e_8c55_4d7e_9a37_2f1c9e6b3a10.slice",
            "kubepods/pod0b6d1a4e-8c55-4d7e-9a37-2f1c9e6b3a10",
            "kubepods/burstable/pod0b6d1a4e-8c55-4d7e-9a37-2f1c9e6b3a10",
            "kubepods/besteffort/pod0b6d1a4e-8c55-4d7e-9a37-2f1c9e6b3a10",
        ] {
            let root = tempfile::tempdir().unwrap();
            fs::create_dir_all(root.path().join(rel)).unwrap();
            assert_eq!(
                find_pod_cgroup(root.path(), UID).unwrap(),
                root.path().join(rel)
            );
        }
    }

    #[test]
    fn missing_pod_names_uid_and_root() {
        let root = tempfile::tempdir().unwrap();
        let err = find_pod_cgroup(root.path(), UID).unwrap_err().to_string();
        assert!(err.contains(UID) && err.contains("--cgroup-root"), "{err}");
    }

    #[test]
    fn rejects_path_like_uids() {
        for bad in ["", "../etc", "abc/def", "x y"] {
            assert!(validate_uid(bad).is_err(), "{bad:?} accepted");
        }
        validate_uid(UID).unwrap();
    }

    #[test]
    fn any_pid_searches_child_cgroups() {
        let root = tempfile::tempdir().unwrap();
        fs::write(root.path().join("cgroup.procs"), "").unwrap();
        let child = root.path().join("container");
        fs::create_dir(&child).unwrap();
        fs::write(child.join("cgroup.procs"), "4242\n").unwrap();
        assert_eq!(any_pid(root.path()).unwrap(), Some(4242));
        fs::write(child.join("cgroup.procs"), "").unwrap();
        assert_eq!(any_pid(root.path()).unwrap(), None);
    }
}

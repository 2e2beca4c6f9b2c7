//! The pin directory `/sys/fs/bpf/trellis/<node>`: maps under `maps/`, cgroup links under
//! `links/`, each pod's sk_lookup link under `pods/<uid>/`. Pins keep capture alive while no
//! agent runs; a lock on the directory keeps two agents from sharing it.
use std::{
    fs::{self, File},
    io,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};
use aya::programs::links::{FdLink, PinnedLink};

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

pub struct PinDir {
    root: PathBuf,
    _lock: File,
}

impl PinDir {
    /// Creates (if needed) and locks the node's pin directory.
    pub fn lock(pin_root: &Path, node: &str) -> Result<Self> {
        if node.is_empty() || node.contains('/') || node.starts_with('.') {
            bail!("invalid node name {node:?}");
        }
        ensure_bpffs(pin_root)?;
        let root = pin_root.join(node);
        for dir in [
            root.clone(),
            root.join("maps"),
            root.join("links"),
            root.join("pods"),
        ] {
            fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let lock = File::open(&root).with_context(|| format!("opening {}", root.display()))?;
        // SAFETY: flock on an fd we own.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
                bail!(
                    "another trellis-agent is running for node {node:?} (it holds the lock on {}); \
                     stop it first, or give this one a different --node or --pin-root",
                    root.display()
                );
            }
            return Err(err).with_context(|| format!("locking {}", root.display()));
        }
        Ok(Self { root, _lock: lock })
    }

    pub fn maps(&self) -> PathBuf {
        self.root.join("maps")
    }

    pub fn link(&self, name: &str) -> PathBuf {
        self.root.join("links").join(name)
    }

    pub fn pod_dir(&self, uid: &str) -> PathBuf {
        self.root.join("pods").join(uid)
    }

    /// UIDs of pods that have pinned state (possibly left by an earlier agent).
    pub fn pinned_pods(&self) -> Result<Vec<String>> {
        let dir = self.root.join("pods");
        let mut uids = Vec::new();
        for entry in fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))? {
            uids.push(entry?.file_name().to_string_lossy().into_owned());
        }
        Ok(uids)
    }

    /// Removes everything: links (which detaches the programs), maps, directories.
    pub fn remove_all(self) -> Result<()> {
        remove_tree(&self.root)
    }
}

/// Pins `link` at `path`, replacing (and so detaching) whatever link was pinned there. The new
/// link is attached before the old one goes, so capture never lapses; running both for an
/// instant is harmless (the second program sees an already-rewritten loopback destination).
pub fn replace_pinned_link(link: FdLink, path: &Path) -> Result<()> {
    unpin_link(path)?;
    link.pin(path)
        .with_context(|| format!("pinning link at {}", path.display()))?;
    Ok(())
}

/// Unpins the link at `path` if there is one; it detaches once no agent holds it open.
pub fn unpin_link(path: &Path) -> Result<()> {
    if !path.exists() {
        return Ok(());
    }
    let pinned =
        PinnedLink::from_pin(path).with_context(|| format!("opening {}", path.display()))?;
    drop(
        pinned
            .unpin()
            .with_context(|| format!("unpinning {}", path.display()))?,
    );
    Ok(())
}

fn remove_tree(dir: &Path) -> Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    for entry in fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            remove_tree(&path)?;
        } else {
            fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        }
    }
    fs::remove_dir(dir).with_context(|| format!("removing {}", dir.display()))
}

/// Pins need a BPF filesystem. Mount one at /sys/fs/bpf when the host has not (a DaemonSet
/// normally gets the host's).
fn ensure_bpffs(pin_root: &Path) -> Result<()> {
    let bpffs = Path::new("/sys/fs/bpf");
    if !pin_root.starts_with(bpffs) || is_bpffs(bpffs)? {
        return Ok(());
    }
    tracing::info!("mounting a BPF filesystem at /sys/fs/bpf (none was mounted)");
    // SAFETY: static NUL-terminated strings.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            c"/sys/fs/bpf".as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error())
            .context("mounting bpffs at /sys/fs/bpf (the agent must run as root)");
    }
    Ok(())
}

fn is_bpffs(path: &Path) -> Result<bool> {
    let cpath = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())?;
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid path and out-pointer.
    if unsafe { libc::statfs(cpath.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error())
            .with_context(|| format!("statfs {}", path.display()));
    }
    Ok(st.f_type as i64 == BPF_FS_MAGIC)
}

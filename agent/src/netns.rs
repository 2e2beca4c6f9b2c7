//! Network namespaces: the agent creates sockets inside pods' namespaces and returns home.
use std::{
    fs::File,
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd},
    os::unix::fs::MetadataExt as _,
};

/// An open handle on a network namespace; the namespace lives as long as the handle (or any
/// socket created in it).
#[derive(Debug)]
pub struct Netns {
    file: File,
}

impl Netns {
    pub fn of_pid(pid: u32) -> io::Result<Self> {
        File::open(format!("/proc/{pid}/ns/net")).map(|file| Self { file })
    }

    /// The calling thread's namespace (the agent's own, when called at start-up).
    pub fn current() -> io::Result<Self> {
        File::open("/proc/thread-self/ns/net").map(|file| Self { file })
    }

    pub fn inode(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.ino())
    }

    /// Runs `f` on this thread inside the namespace, then switches back to `home`. Sockets
    /// created by `f` stay in this namespace. `f` must not block or yield: other work may be
    /// scheduled on this thread afterwards.
    pub fn run_in<T>(&self, home: &Netns, f: impl FnOnce() -> T) -> io::Result<T> {
        setns(self.file.as_fd())?;
        let out = f();
        // Failing to return would leave an agent thread in a pod's namespace: not survivable.
        if let Err(e) = setns(home.file.as_fd()) {
            panic!("cannot return to the agent's network namespace: {e}");
        }
        Ok(out)
    }
}

impl AsFd for Netns {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

fn setns(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: plain syscall on a valid fd.
    if unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The cookie the kernel gives a socket's network namespace (`bpf_get_netns_cookie`).
pub fn netns_cookie(sock: BorrowedFd<'_>) -> io::Result<u64> {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: the buffer and its length are valid for the call.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

//! Low-level helpers: commands, namespaces, cgroups, unique names, sweeping leftovers.
use std::{
    fs::{self, File},
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Once,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

/// Every name this harness creates starts with this, then the pid, so a later run can tell
/// whether its creator is still alive.
pub const PREFIX: &str = "trl";

/// A name unique to this process and call: `trl<pid>x<n>`.
pub fn unique_name() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "{PREFIX}{}x{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Runs a command to completion; panics with its output if it fails.
pub fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run {program}: {e} (cargo xtask setup installs what the tests need)")
        });
    assert!(
        out.status.success(),
        "{program} {} failed: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `ip -n NETNS ...`
pub fn ip(netns: &str, args: &str) {
    let mut all = vec!["-n", netns];
    all.extend(args.split_whitespace());
    run("ip", &all);
}

pub fn cgroup2_mount() -> PathBuf {
    let mounts = fs::read_to_string("/proc/mounts").expect("reading /proc/mounts");
    mounts
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() > 2 && f[2] == "cgroup2").then(|| PathBuf::from(f[1]))
        })
        .expect("no cgroup v2 filesystem mounted: the capture layer needs cgroup v2")
}

pub fn netns_path(name: &str) -> PathBuf {
    Path::new("/var/run/netns").join(name)
}

/// Spawns `cmd` inside network namespace `netns` and, if given, cgroup `cgroup` (a directory).
/// Joining happens in the child before exec, through fds opened here (`ip netns exec` would also
/// remount /sys, hiding the cgroup tree).
pub fn spawn_in(netns: &str, cgroup: Option<&Path>, cmd: &mut Command) -> std::io::Result<Child> {
    let ns = File::open(netns_path(netns))?;
    let procs = cgroup
        .map(|c| {
            fs::OpenOptions::new()
                .write(true)
                .open(c.join("cgroup.procs"))
        })
        .transpose()?;
    let ns_fd = ns.as_raw_fd();
    let procs_fd = procs.as_ref().map(|f| f.as_raw_fd());
    // SAFETY: only async-signal-safe syscalls on fds that stay open until spawn returns.
    unsafe {
        cmd.pre_exec(move || {
            if let Some(fd) = procs_fd
                && libc::write(fd, b"0".as_ptr().cast(), 1) != 1
            {
                return Err(std::io::Error::last_os_error());
            }
            if libc::setns(ns_fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.stdin(Stdio::null()).spawn()
}

/// Connects to `addr` from inside `netns` (the socket is created there, then this thread returns).
pub fn connect_in(netns: &str, addr: SocketAddr) -> std::io::Result<TcpStream> {
    let target = File::open(netns_path(netns))?;
    let home = File::open("/proc/thread-self/ns/net")?;
    let sock = unsafe {
        assert_eq!(
            libc::setns(target.as_raw_fd(), libc::CLONE_NEWNET),
            0,
            "setns into {netns}"
        );
        let domain = if addr.is_ipv4() {
            libc::AF_INET
        } else {
            libc::AF_INET6
        };
        let fd = libc::socket(domain, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert_eq!(
            libc::setns(home.as_raw_fd(), libc::CLONE_NEWNET),
            0,
            "setns home"
        );
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        socket2_free_connect(fd, addr)?
    };
    sock.set_read_timeout(Some(Duration::from_secs(5)))?;
    Ok(sock)
}

/// A listener bound to `addr` inside `netns` (made there, then this thread returns), for a
/// server the test runs itself, e.g. a collector the agents send to.
pub fn listen_in(netns: &str, addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let target = File::open(netns_path(netns))?;
    let home = File::open("/proc/thread-self/ns/net")?;
    // SAFETY: setns on this thread only, and back before returning.
    unsafe {
        assert_eq!(
            libc::setns(target.as_raw_fd(), libc::CLONE_NEWNET),
            0,
            "setns into {netns}"
        );
    }
    let listener = std::net::TcpListener::bind(addr);
    // SAFETY: as above.
    unsafe {
        assert_eq!(
            libc::setns(home.as_raw_fd(), libc::CLONE_NEWNET),
            0,
            "setns home"
        );
    }
    listener
}

fn socket2_free_connect(fd: i32, addr: SocketAddr) -> std::io::Result<TcpStream> {
    use std::os::fd::FromRawFd;
    // SAFETY: fd is a fresh socket we own.
    let stream = unsafe { TcpStream::from_raw_fd(fd) };
    let (storage, len) = sockaddr(addr);
    // SAFETY: storage holds a valid sockaddr of length len.
    if unsafe { libc::connect(fd, (&raw const storage).cast(), len) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(stream)
}

fn sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as _,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            unsafe { std::ptr::write((&raw mut storage).cast(), sin) };
            size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as _,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: 0,
            };
            unsafe { std::ptr::write((&raw mut storage).cast(), sin6) };
            size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

/// A plain HTTP/1.0 GET from inside `netns`; returns (status code, body).
pub fn http_get(netns: &str, addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    http_get_over(connect_in(netns, addr)?, addr, path)
}

/// A plain HTTP/1.0 GET over `s`, a connection to `addr`; returns (status code, body).
pub fn http_get_over(
    mut s: std::net::TcpStream,
    addr: SocketAddr,
    path: &str,
) -> std::io::Result<(u16, String)> {
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let code = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((code, body))
}

/// Forwards connections to `port` on this host's loopback (or any free port when that one is
/// taken) to `target` inside `netns`, from a background thread, for a person's browser: the
/// demo's Prometheus and graph page live in the cluster's fabric. Returns the local address.
pub fn forward(netns: &str, port: u16, target: SocketAddr) -> std::io::Result<SocketAddr> {
    let listener = std::net::TcpListener::bind(("127.0.0.1", port))
        .or_else(|_| std::net::TcpListener::bind("127.0.0.1:0"))?;
    let local = listener.local_addr()?;
    let netns = netns.to_owned();
    std::thread::spawn(move || {
        for client in listener.incoming().flatten() {
            let Ok(upstream) = connect_in(&netns, target) else {
                continue;
            };
            let _ = upstream.set_read_timeout(None);
            for (mut from, mut to) in [
                (client.try_clone(), upstream.try_clone()),
                (upstream.try_clone(), client.try_clone()),
            ]
            .into_iter()
            .filter_map(|(a, b)| Some((a.ok()?, b.ok()?)))
            {
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut from, &mut to);
                    let _ = to.shutdown(std::net::Shutdown::Write);
                });
            }
        }
    });
    Ok(local)
}

/// Kills every process in a cgroup tree and removes it, deepest first.
pub fn remove_cgroup_tree(dir: &Path) {
    if !dir.exists() {
        return;
    }
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                remove_cgroup_tree(&e.path());
            }
        }
    }
    for _ in 0..100 {
        let procs = fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
        if procs.trim().is_empty() && fs::remove_dir(dir).is_ok() {
            return;
        }
        for pid in procs.lines().filter_map(|p| p.trim().parse::<i32>().ok()) {
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!("warning: could not remove cgroup {}", dir.display());
}

fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// The creator pid encoded in a harness name (`trl<pid>x…`).
fn owner(name: &str) -> Option<u32> {
    name.strip_prefix(PREFIX)?.split('x').next()?.parse().ok()
}

/// Removes namespaces, cgroups and pins left by harness runs whose process is gone (once per
/// process).
pub fn sweep_stale() {
    static ONCE: Once = Once::new();
    ONCE.call_once(sweep);
}

/// One sweep (see `sweep_stale`).
pub fn sweep() {
    {
        let stale = |name: &str| owner(name).is_some_and(|pid| !pid_alive(pid));
        let cg = cgroup2_mount();
        for e in fs::read_dir(&cg).into_iter().flatten().flatten() {
            if stale(&e.file_name().to_string_lossy()) {
                remove_cgroup_tree(&e.path());
            }
        }
        for e in fs::read_dir("/var/run/netns")
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = e.file_name().to_string_lossy().into_owned();
            if stale(&name) {
                let _ = Command::new("ip").args(["netns", "del", &name]).status();
            }
        }
        for dir in ["/sys/fs/bpf/trellis", "/etc/netns"] {
            for e in fs::read_dir(dir).into_iter().flatten().flatten() {
                if stale(&e.file_name().to_string_lossy()) {
                    remove_tree(&e.path());
                }
            }
        }
    }
}

/// rm -r that also works on bpffs (where pins are removed with unlink).
pub fn remove_tree(dir: &Path) {
    for e in fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            remove_tree(&p)
        } else {
            let _ = fs::remove_file(&p);
        }
    }
    let _ = fs::remove_dir(dir);
}

/// Names of the BPF programs attached to a cgroup (bpftool's view, independent of the agent).
pub fn cgroup_programs(cgroup: &Path) -> Vec<String> {
    let out = run(
        "bpftool",
        &["-j", "cgroup", "show", &cgroup.to_string_lossy()],
    );
    let progs: Vec<serde_json::Value> =
        serde_json::from_str(if out.trim().is_empty() { "[]" } else { &out })
            .unwrap_or_else(|e| panic!("bpftool cgroup show printed {out:?}: {e}"));
    progs
        .iter()
        .map(|p| p["name"].as_str().unwrap_or_default().to_owned())
        .collect()
}

/// How many sk_lookup links are attached to network namespace `netns`.
pub fn sk_lookup_links(netns: &str) -> usize {
    use std::os::unix::fs::MetadataExt as _;
    let ino = fs::metadata(netns_path(netns)).expect("netns exists").ino();
    let out = run("bpftool", &["-j", "link", "show"]);
    let links: Vec<serde_json::Value> = serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("bpftool link show printed {out:?}: {e}"));
    links
        .iter()
        .filter(|l| {
            l["type"] == "netns" && l["attach_type"] == "sk_lookup" && l["netns_ino"] == ino
        })
        .count()
}

/// Creates network namespace `name` with loopback up and IPv6 duplicate address detection off:
/// otherwise link-local addresses stay tentative for about 2 s, and a node cannot route IPv6
/// for its pods until then.
pub fn add_netns(name: &str) {
    run("ip", &["netns", "add", name]);
    run(
        "ip",
        &[
            "netns",
            "exec",
            name,
            "sysctl",
            "-q",
            "-w",
            "net.ipv6.conf.all.accept_dad=0",
            "net.ipv6.conf.default.accept_dad=0",
        ],
    );
    ip(name, "link set lo up");
}

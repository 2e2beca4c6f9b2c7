//! Removing a real node, from its recorded `State` alone (so `cargo xtask cluster down` and the
//! next run can clean up after a process that was killed), and checking nothing is left.
//!
//! What a node leaves on this machine if it is not removed: kubelet's and kube-proxy's KUBE-*
//! iptables chains (KUBE-FIREWALL drops non-loopback traffic to 127/8, which breaks the loopback
//! tests), kernel settings kubelet and kube-proxy change, the `kubepods` cgroups (kubelet never
//! removes a pod's v2 directory), containerd's shims and mounts, the CNI bridge, pod logs.
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use super::{BRIDGE, NETWORK, State};
use crate::sys;

/// Every kernel setting a node may change, restored to what it was before.
pub const SYSCTLS: &[&str] = &[
    "net/ipv4/ip_forward",
    "net/ipv4/conf/all/route_localnet",
    "net/bridge/bridge-nf-call-iptables",
    "net/bridge/bridge-nf-call-ip6tables",
    "vm/overcommit_memory",
    "vm/panic_on_oom",
    "kernel/panic",
    "kernel/panic_on_oops",
    "kernel/keys/root_maxkeys",
    "kernel/keys/root_maxbytes",
];

pub fn read_sysctls() -> Vec<(String, String)> {
    SYSCTLS
        .iter()
        .filter_map(|k| {
            let v = fs::read_to_string(Path::new("/proc/sys").join(k)).ok()?;
            Some((k.to_string(), v.trim().to_owned()))
        })
        .collect()
}

/// Removes everything `state` describes; returns what could not be removed.
pub fn teardown(state: &State) -> Vec<String> {
    let mut problems = Vec::new();
    // Orderly first, while the API server and kubelet still run: no controllers to recreate
    // pods, then every pod deleted so kubelet stops its sandboxes (CNI DEL) itself.
    stop(state, "kube-controller-manager");
    stop(state, "kube-scheduler");
    if state.alive("kube-apiserver") && state.alive("kubelet") {
        delete_pods(state);
    }
    stop(state, "kubelet");
    stop(state, "kube-proxy");
    if let Err(e) = kube_proxy_cleanup() {
        problems.push(e);
    }
    stop(state, "containerd");
    kill_shims(&state.dir);
    for cg in kubepods_cgroups() {
        sys::remove_cgroup_tree(&cg);
        if cg.exists() {
            problems.push(format!("cgroup {} is still there", cg.display()));
        }
    }
    unmount_under(&state.dir);
    let _ = Command::new("ip")
        .args(["link", "del", BRIDGE])
        .stderr(std::process::Stdio::null())
        .status();
    // Left by a `stop_kube_proxy` whose test ended before `start_kube_proxy`.
    let _ = Command::new("ip")
        .args(["route", "del", "blackhole", crate::apiserver::SERVICE_CIDR])
        .stderr(std::process::Stdio::null())
        .status();
    for cmd in ["iptables", "ip6tables"] {
        if let Err(e) = remove_chains(cmd, "KUBE-") {
            problems.push(e);
        }
    }
    for (key, value) in &state.sysctls {
        let path = Path::new("/proc/sys").join(key);
        let now = fs::read_to_string(&path).unwrap_or_default();
        if now.trim() != value && fs::write(&path, value).is_err() {
            problems.push(format!("could not restore {key} to {value}"));
        }
    }
    remove_new_entries("/var/log/pods", &state.pod_logs_before);
    remove_new_entries("/var/log/containers", &state.container_logs_before);
    for e in fs::read_dir("/var/lib/cni/results")
        .into_iter()
        .flatten()
        .flatten()
    {
        if e.file_name()
            .to_string_lossy()
            .starts_with(&format!("{NETWORK}-"))
        {
            let _ = fs::remove_file(e.path());
        }
    }
    if !state.run_containerd_existed {
        let _ = fs::remove_dir_all("/run/containerd");
    }
    stop(state, "kube-apiserver");
    stop(state, "etcd");
    for dir in [&state.api_dir, &state.dir] {
        if !dir.as_os_str().is_empty() {
            let _ = fs::remove_dir_all(dir);
        }
    }
    problems
}

/// What is left of a node on this machine (empty when it was removed completely).
pub fn leftovers(state: &State) -> Vec<String> {
    let mut left = Vec::new();
    for (name, pid) in &state.daemons {
        if state.alive(name) {
            left.push(format!("{name} (pid {pid}) still runs"));
        }
    }
    if !shim_pids(&state.dir).is_empty() {
        left.push("containerd shims still run".into());
    }
    for cmd in ["iptables", "ip6tables"] {
        for (table, chain) in chains(cmd).unwrap_or_default() {
            if chain.starts_with("KUBE-") {
                left.push(format!("{cmd} chain {chain} in table {table}"));
            }
        }
    }
    for cg in kubepods_cgroups() {
        left.push(format!("cgroup {}", cg.display()));
    }
    if Path::new("/sys/class/net").join(BRIDGE).exists() {
        left.push(format!("bridge {BRIDGE}"));
    }
    let mounts = mounts_under(&state.dir);
    if !mounts.is_empty() {
        left.push(format!("mounts {mounts:?}"));
    }
    for dir in [&state.dir, &state.api_dir] {
        if dir.exists() {
            left.push(format!("directory {}", dir.display()));
        }
    }
    for (key, value) in &state.sysctls {
        let now = fs::read_to_string(Path::new("/proc/sys").join(key)).unwrap_or_default();
        if now.trim() != value {
            left.push(format!("sysctl {key} is {} (was {value})", now.trim()));
        }
    }
    left
}

/// SIGTERM, then SIGKILL after 10 s, to the daemon `name` if its recorded pid still runs it.
pub(super) fn stop(state: &State, name: &str) {
    let Some(pid) = state.pid(name) else { return };
    if !state.alive(name) {
        return;
    }
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(10);
    while state.alive(name) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    if state.alive(name) {
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Deletes every pod and waits (at most 30 s) until containerd runs no task.
fn delete_pods(state: &State) {
    let _ = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(&state.kubeconfig)
        .args([
            "delete",
            "pods",
            "--all",
            "--all-namespaces",
            "--grace-period=0",
            "--force",
            "--wait=false",
            "--request-timeout=10s",
        ])
        .output();
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let out = Command::new("ctr")
            .arg("--address")
            .arg(state.dir.join("containerd.sock"))
            .args(["--namespace", "k8s.io", "tasks", "ls"])
            .output();
        match out {
            Ok(o) if o.status.success() => {
                if !String::from_utf8_lossy(&o.stdout).contains("RUNNING") {
                    return;
                }
            }
            _ => return,
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

pub(super) fn kube_proxy_cleanup() -> Result<(), String> {
    let bin = super::binary("kube-proxy");
    if !bin.is_file() {
        return Ok(());
    }
    let out = Command::new(&bin)
        .arg("--cleanup")
        .output()
        .map_err(|e| format!("kube-proxy --cleanup: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "kube-proxy --cleanup failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(())
}

/// containerd's shims outlive containerd by design; ours are the ones given our socket.
pub(super) fn shim_pids(dir: &Path) -> Vec<i32> {
    let sock = dir.join("containerd.sock").to_string_lossy().into_owned();
    fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let pid: i32 = e.file_name().to_str()?.parse().ok()?;
            let cmdline = fs::read(e.path().join("cmdline")).ok()?;
            let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
            let is_shim = args
                .first()
                .is_some_and(|a| String::from_utf8_lossy(a).contains("containerd-shim"));
            let ours = args.iter().any(|a| **a == *sock.as_bytes());
            (is_shim && ours).then_some(pid)
        })
        .collect()
}

fn kill_shims(dir: &Path) {
    for _ in 0..50 {
        let pids = shim_pids(dir);
        if pids.is_empty() {
            return;
        }
        for pid in pids {
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Pids of every process in the v2 `kubepods` tree (the pods' containers).
pub(super) fn kubepods_pids() -> Vec<u32> {
    fn walk(dir: &Path, pids: &mut Vec<u32>) {
        let procs = fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
        pids.extend(procs.lines().filter_map(|p| p.trim().parse::<u32>().ok()));
        for e in fs::read_dir(dir).into_iter().flatten().flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                walk(&e.path(), pids);
            }
        }
    }
    let mut pids = Vec::new();
    walk(&sys::cgroup2_mount().join("kubepods"), &mut pids);
    pids
}

/// Every `kubepods` cgroup kubelet made: in the v2 hierarchy and in each v1 one.
fn kubepods_cgroups() -> Vec<PathBuf> {
    let mounts = fs::read_to_string("/proc/mounts").unwrap_or_default();
    mounts
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() > 2 && (f[2] == "cgroup" || f[2] == "cgroup2"))
                .then(|| Path::new(f[1]).join("kubepods"))
        })
        .filter(|p| p.exists())
        .collect()
}

/// Mount points at or below `dir`, deepest first (`/proc/self/mountinfo` escapes spaces).
fn mounts_under(dir: &Path) -> Vec<String> {
    let prefix = dir.to_string_lossy().into_owned();
    if prefix.is_empty() {
        return Vec::new();
    }
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut found: Vec<String> = info
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4))
        .map(|m| m.replace("\\040", " "))
        .filter(|m| *m == prefix || m.starts_with(&format!("{prefix}/")))
        .collect();
    found.sort_by_key(|m| std::cmp::Reverse(m.len()));
    found.dedup();
    found
}

fn unmount_under(dir: &Path) {
    // A path mounted several times (kubelet bind-mounts its root on itself) needs one umount
    // per mount, so go round until nothing is left.
    for _ in 0..10 {
        let mounts = mounts_under(dir);
        if mounts.is_empty() {
            return;
        }
        for m in mounts {
            let c = std::ffi::CString::new(m).expect("no NUL in a mount point");
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
    }
}

/// (table, chain) of every user-defined chain, from `<cmd>-save`.
fn chains(cmd: &str) -> Result<Vec<(String, String)>, String> {
    let mut all = Vec::new();
    for table in ["filter", "nat", "mangle"] {
        for line in save(cmd, table)?.lines() {
            if let Some(rest) = line.strip_prefix(':') {
                let name = rest.split_whitespace().next().unwrap_or_default();
                all.push((table.to_owned(), name.to_owned()));
            }
        }
    }
    Ok(all)
}

fn save(cmd: &str, table: &str) -> Result<String, String> {
    let out = Command::new(format!("{cmd}-save"))
        .args(["-t", table])
        .output()
        .map_err(|e| format!("{cmd}-save: {e}"))?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Removes every chain named `prefix*` in filter, nat and mangle, and the rules that jump to
/// them, in one `<cmd>-restore --noflush` per table (rules are deleted by their own saved text).
fn remove_chains(cmd: &str, prefix: &str) -> Result<(), String> {
    for table in ["filter", "nat", "mangle"] {
        let saved = save(cmd, table)?;
        let ours: Vec<&str> = saved
            .lines()
            .filter_map(|l| l.strip_prefix(':')?.split_whitespace().next())
            .filter(|c| c.starts_with(prefix))
            .collect();
        if ours.is_empty() {
            continue;
        }
        let mut script = format!("*{table}\n");
        for line in saved.lines() {
            let Some(rule) = line.strip_prefix("-A ") else {
                continue;
            };
            let chain = rule.split_whitespace().next().unwrap_or_default();
            if !chain.starts_with(prefix) && rule.contains(&format!("-j {prefix}")) {
                script.push_str(&format!("-D {rule}\n"));
            }
        }
        for c in &ours {
            script.push_str(&format!("-F {c}\n"));
        }
        for c in &ours {
            script.push_str(&format!("-X {c}\n"));
        }
        script.push_str("COMMIT\n");
        let mut child = Command::new(format!("{cmd}-restore"))
            .arg("--noflush")
            .stdin(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .map_err(|e| format!("{cmd}-restore: {e}"))?;
        use std::io::Write as _;
        child
            .stdin
            .take()
            .expect("piped")
            .write_all(script.as_bytes())
            .map_err(|e| format!("{cmd}-restore: {e}"))?;
        let out = child
            .wait_with_output()
            .map_err(|e| format!("{cmd}-restore: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "{cmd}-restore could not remove the {prefix}* chains of table {table}: {}\n{script}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
    }
    Ok(())
}

fn remove_new_entries(dir: &str, before: &[String]) {
    for e in fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !before.contains(&name) {
            let p = e.path();
            if p.is_dir() && !p.is_symlink() {
                let _ = fs::remove_dir_all(&p);
            } else {
                let _ = fs::remove_file(&p);
            }
        }
    }
}

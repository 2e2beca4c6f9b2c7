//! A Kubernetes node on one machine, for tests and the demo: the node is a network namespace with
//! a bridge; each pod is a network namespace on a veth to that bridge with a kubelet-style cgroup
//! (systemd or cgroupfs driver) holding its processes. Only addresses inside these namespaces are
//! used. Everything is removed on drop (also when a test panics), and leftovers of runs that were
//! killed are swept on the next run.
pub mod agent;
pub mod apiserver;
pub mod control;
pub mod images;
pub mod kubenode;
pub mod node;
pub mod oci;
pub mod outside;
pub mod prometheus;
pub mod sys;

pub use agent::Agent;
pub use node::{CgroupDriver, Cluster, Node, Pod};
/// The harness speaks JSON (agent logs, test app output); users get the same crate.
pub use serde_json;

/// Fails (never skips) when the machine cannot run these tests, saying why.
pub fn require_privileges() {
    assert!(
        unsafe { libc::geteuid() } == 0,
        "these tests build network namespaces, cgroups and eBPF programs: run them as root (cargo xtask test does)"
    );
    assert!(
        std::path::Path::new("/sys/kernel/btf/vmlinux").exists(),
        "this kernel has no BTF (/sys/kernel/btf/vmlinux): Trellis's eBPF programs need it"
    );
    sys::cgroup2_mount();
    sys::sweep_stale();
}

//! The harness itself: it must leave nothing behind, even when a test panics or is killed.
use std::{panic, path::Path};

use trellis_e2e::{Node, sys};

#[test]
fn a_panicking_test_leaves_no_namespaces_or_cgroups() {
    let made = panic::catch_unwind(|| {
        let node = Node::new(1);
        let pod = node.add_pod("p");
        let names = (
            node.name.clone(),
            pod.netns.clone(),
            node.cgroup_root.clone(),
            pod.cgroup.clone(),
        );
        assert!(sys::netns_path(&pod.netns).exists() && pod.cgroup.is_dir());
        panic::panic_any(names);
    })
    .unwrap_err();
    let (node, pod, node_cg, pod_cg) = *made
        .downcast::<(String, String, std::path::PathBuf, std::path::PathBuf)>()
        .unwrap();
    assert!(!sys::netns_path(&node).exists(), "node netns left behind");
    assert!(!sys::netns_path(&pod).exists(), "pod netns left behind");
    assert!(!node_cg.exists() && !pod_cg.exists(), "cgroups left behind");
}

#[test]
fn leftovers_of_a_killed_run_are_swept() {
    trellis_e2e::require_privileges();
    // A name whose owner pid cannot exist (above any pid_max).
    let name = "trl4294967290x0";
    sys::run("ip", &["netns", "add", name]);
    let cg = sys::cgroup2_mount().join(name);
    std::fs::create_dir_all(cg.join("kubepods")).unwrap();
    sys::sweep();
    assert!(!sys::netns_path(name).exists(), "stale netns not swept");
    assert!(!cg.exists(), "stale cgroup not swept");
    assert!(!Path::new("/sys/fs/bpf/trellis").join(name).exists());
}

//! End to end on a real Kubernetes node on this machine (`trellis_e2e::kubenode`): kubelet,
//! containerd and kube-proxy built and installed by `cargo xtask setup`, a pod from a locally
//! built image, and a teardown that leaves nothing behind. Never skipped: without root or a
//! binary it fails and says what is missing.
use std::{
    io::{BufRead as _, BufReader},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    path::Path,
    time::{Duration, Instant},
};

use trellis_e2e::{
    kubenode::{self, KubeNode},
    oci, sys,
};

const IMAGE: &str = "localhost/trellis/testpod:dev";

fn pod_yaml() -> String {
    format!(
        r#"apiVersion: v1
kind: Pod
metadata:
  name: echo
  namespace: default
spec:
  automountServiceAccountToken: false
  terminationGracePeriodSeconds: 1
  containers:
  - name: echo
    image: {IMAGE}
    imagePullPolicy: IfNotPresent
    args: ["serve", "echo", "0.0.0.0:8080"]
    ports:
    - containerPort: 8080
    readinessProbe:
      tcpSocket:
        port: 8080
      periodSeconds: 1
"#
    )
}

#[test]
fn a_pod_runs_on_a_real_node_and_nothing_is_left() {
    let missing = kubenode::missing_requirements();
    assert!(
        missing.is_empty(),
        "this test runs a real Kubernetes node; missing:\n  {}",
        missing.join("\n  ")
    );
    let start = Instant::now();
    let node = KubeNode::start().unwrap_or_else(|e| panic!("starting the node: {e:#}"));
    let node_ready = start.elapsed();

    let image = oci::Image::new(IMAGE, &["/trellis-testpod"])
        .executable_with_libs(
            Path::new(env!("CARGO_BIN_EXE_trellis-testpod")),
            "/trellis-testpod",
        )
        .unwrap();
    node.import(&image).unwrap();
    let manifest = std::env::temp_dir().join(format!("{}-pod.yaml", sys::unique_name()));
    std::fs::write(&manifest, pod_yaml()).unwrap();
    node.kubectl(&["apply", "-f", &manifest.to_string_lossy()])
        .unwrap();
    let _ = std::fs::remove_file(&manifest);
    let ready = node.kubectl(&["wait", "--for=condition=Ready", "pod/echo", "--timeout=90s"]);
    if let Err(e) = ready {
        panic!(
            "the pod did not become Ready: {e:#}\n{}\nkubelet:\n{}",
            node.kubectl(&["describe", "pod", "echo"])
                .unwrap_or_default(),
            node.log_tail("kubelet", 30)
        );
    }
    let pod_ready = start.elapsed();

    // Its address is on the node's bridge, and it answers there from the host.
    let ip: Ipv4Addr = node
        .kubectl(&["get", "pod", "echo", "-o", "jsonpath={.status.podIP}"])
        .unwrap()
        .trim()
        .parse()
        .expect("the pod has an IPv4 address");
    assert!(
        ip.octets()[..3] == [10, 87, 0],
        "pod IP {ip} is outside the node's pod CIDR {}",
        kubenode::POD_CIDR
    );
    let addr = SocketAddr::from((ip, 8080));
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("connecting to the pod at {addr}: {e}"));
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut banner = String::new();
    BufReader::new(&stream).read_line(&mut banner).unwrap();
    let banner: serde_json::Value = serde_json::from_str(&banner).unwrap();
    assert_eq!(banner["server"], "echo", "{banner}");
    assert_eq!(banner["local"], addr.to_string(), "{banner}");
    drop(stream);
    // The API server reaches kubelet at the node's address (logs, exec).
    let logs = node.kubectl(&["logs", "echo"]).unwrap();
    assert_eq!(logs.trim(), "ready", "kubectl logs echo");

    // kubelet's cgroupfs layout, which the agent finds pods by: the container's v2 directory
    // is kubepods/besteffort/pod<uid>/<container id>.
    let uid = node
        .kubectl(&["get", "pod", "echo", "-o", "jsonpath={.metadata.uid}"])
        .unwrap();
    let pod_cgroup = sys::cgroup2_mount()
        .join("kubepods/besteffort")
        .join(format!("pod{}", uid.trim()));
    let containers = std::fs::read_dir(&pod_cgroup)
        .unwrap_or_else(|e| panic!("{}: {e}", pod_cgroup.display()))
        .flatten()
        .filter(|e| e.file_name().len() == 64)
        .count();
    assert_eq!(containers, 2, "pause and echo in {}", pod_cgroup.display());

    let deleting = Instant::now();
    node.kubectl(&["delete", "pod", "echo", "--timeout=60s"])
        .unwrap();
    let deleted = deleting.elapsed();
    assert!(
        TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_err(),
        "the deleted pod still answers at {addr}"
    );

    let memory = node.state().memory_bytes();
    let state = node.state().clone();
    let stopping = Instant::now();
    let problems = node.stop();
    let teardown = stopping.elapsed();
    assert!(problems.is_empty(), "teardown: {problems:?}");
    let left = kubenode::leftovers(&state);
    assert!(left.is_empty(), "left on the machine: {left:?}");
    eprintln!(
        "measured: node Ready {:.1} s after start, first pod Ready {:.1} s, pod deleted in {:.1} s, \
         teardown {:.1} s, \
         node memory (RSS of every daemon, shim and pod process) {} MB",
        node_ready.as_secs_f64(),
        pod_ready.as_secs_f64(),
        deleted.as_secs_f64(),
        teardown.as_secs_f64(),
        memory / 1_000_000
    );
}

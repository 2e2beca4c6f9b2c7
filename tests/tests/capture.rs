//! End-to-end tests of the capture layer on the real kernel: real eBPF programs attached by the
//! real agent binary, pods as network namespaces with kubelet-style cgroups.
use std::{
    net::{IpAddr, SocketAddr},
    path::Path,
    time::{Duration, Instant},
};

use trellis_e2e::{Agent, CgroupDriver, Node, Pod, sys};

fn addr(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

/// Connects from `from` to `to` through the test app, checks the echo, and says whether the
/// connection was captured. The kernel decides that, not the agent: a captured connect() was
/// rewritten to the loopback capture listener, so the app's own end is on loopback.
fn connect_captured(from: &Pod, to: SocketAddr) -> (bool, u16) {
    let out = from.connect(to, "ping");
    assert_eq!(out["echo"], "ping", "{} -> {to}: {out}", from.name);
    let local: SocketAddr = out["local"].as_str().unwrap().parse().unwrap();
    (local.ip().is_loopback(), local.port())
}

/// The agent's log line for the captured connection from `client_port` to `dst`.
fn capture_line(
    agent: &Agent,
    direction: &str,
    dst: SocketAddr,
    client_port: u16,
) -> serde_json::Value {
    agent.wait_log(
        &format!("{direction} capture of {dst} from port {client_port}"),
        |v| {
            v["message"] == "connection captured"
                && v["direction"] == direction
                && v["orig_dst"] == dst.to_string()
                && v["client"]
                    .as_str()
                    .and_then(|c| c.parse::<SocketAddr>().ok())
                    .is_some_and(|c| c.port() == client_port)
        },
    )
}

#[test]
fn outbound_reports_exact_original_destination_v4_and_v6() {
    let node = Node::new(1);
    let client = node.add_pod("client");
    let server = node.add_pod("server");
    server.serve(8080);
    let agent = Agent::start_with(&node, &[&client], &["--log-level", "debug"]);
    agent.wait_pod_state(&client, "enrolled");

    for dst in [addr(server.ip4, 8080), addr(server.ip6, 8080)] {
        let (captured, port) = connect_captured(&client, dst);
        assert!(
            captured,
            "connection to {dst} from an enrolled pod was not redirected"
        );
        let line = capture_line(&agent, "outbound", dst, port);
        assert_eq!(line["pod"], "default/client", "{line}");
    }
    // The kernel programs' own aya-log lines reach the agent's log at debug level.
    agent.wait_log("connect4's kernel log line", |v| {
        v["message"] == format!("connect4 captured {}:8080", server.ip4)
    });
    agent.wait_log("connect6's kernel log line", |v| {
        v["message"] == format!("connect6 captured [{}]:8080", server.ip6)
    });
}

#[test]
fn unenrolled_pods_excluded_ports_and_cidrs_are_not_redirected() {
    let node = Node::new(1);
    // The cgroupfs driver layout (kubepods/besteffort/pod<uid>) must work like the systemd one.
    let client = node.add_pod_with("client", CgroupDriver::Cgroupfs);
    let bystander = node.add_pod("bystander");
    let server = node.add_pod("server");
    server.serve(8080);
    server.serve(9090);
    let excluded_net = format!("{}/128", server.ip6);
    let agent = Agent::start_with(
        &node,
        &[&client],
        &["--exclude-ports", "9090", "--exclude-cidrs", &excluded_net],
    );
    agent.wait_pod_state(&client, "enrolled");

    let (captured, port) = connect_captured(&client, addr(server.ip4, 8080));
    assert!(captured, "enrolled pod (cgroupfs layout) not redirected");
    capture_line(&agent, "outbound", addr(server.ip4, 8080), port);

    assert!(
        !connect_captured(&bystander, addr(server.ip4, 8080)).0,
        "a pod that is not enrolled was redirected"
    );
    assert!(
        !connect_captured(&client, addr(server.ip4, 9090)).0,
        "an excluded port was redirected"
    );
    assert!(
        !connect_captured(&client, addr(server.ip6, 8080)).0,
        "an excluded CIDR was redirected"
    );
    assert!(
        connect_captured(&client, addr(server.ip4, 8080)).0,
        "capture stopped"
    );

    // Unenrolled at runtime: capture stops, connections still work.
    agent.set_pods(&[]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !agent.pods().is_empty() {
        assert!(
            Instant::now() < deadline,
            "agent kept the pod: {:?}",
            agent.pods()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        !connect_captured(&client, addr(server.ip4, 8080)).0,
        "an unenrolled pod is still redirected"
    );
    assert!(
        !Path::new(&format!(
            "/sys/fs/bpf/trellis/{}/pods/{}",
            node.name, client.uid
        ))
        .exists(),
        "pod pins left behind"
    );
}

#[test]
fn inbound_lands_on_15006_and_the_onward_connection_is_not_recaptured() {
    let node = Node::new(1);
    let client = node.add_pod("client");
    let server = node.add_pod("server");
    server.serve(8080);
    let agent = Agent::start(&node, &[&server]);
    agent.wait_pod_state(&server, "enrolled");

    for dst in [addr(server.ip4, 8080), addr(server.ip6, 8080)] {
        let out = client.connect(dst, "hello");
        assert_eq!(out["echo"], "hello", "{out}");
        let local: SocketAddr = out["local"].as_str().unwrap().parse().unwrap();
        let line = capture_line(&agent, "inbound", dst, local.port());
        assert_eq!(line["pod"], "default/server");
        assert_eq!(
            line["client"],
            local.to_string(),
            "client address must be the true peer"
        );
        // The app was reached by the proxy from the pod's own address, and that connection was
        // not steered back into the proxy.
        let peer: SocketAddr = out["banner"]["peer"].as_str().unwrap().parse().unwrap();
        assert_eq!(peer.ip(), dst.ip(), "{out}");
        assert_eq!(out["banner"]["local"], dst.to_string());
        let recaptured = agent
            .captures()
            .into_iter()
            .filter(|(d, _, c, _)| d == "inbound" && c == &peer.to_string())
            .count();
        assert_eq!(
            recaptured, 0,
            "the proxy's own onward connection was captured again"
        );
    }
}

#[test]
fn pod_to_pod_on_one_node_is_captured_at_both_ends() {
    let node = Node::new(1);
    let client = node.add_pod("client");
    let server = node.add_pod("server");
    server.serve(8080);
    let agent = Agent::start(&node, &[&client, &server]);
    agent.wait_pod_state(&client, "enrolled");
    agent.wait_pod_state(&server, "enrolled");
    let dst = addr(server.ip4, 8080);
    let (captured, port) = connect_captured(&client, dst);
    assert!(captured);
    capture_line(&agent, "outbound", dst, port);
    agent.wait_log("the inbound side", |v| {
        v["direction"] == "inbound" && v["orig_dst"] == dst.to_string()
    });
}

#[test]
fn sigkill_restart_adopts_pins_and_cleanup_removes_them() {
    let node = Node::new(1);
    let client = node.add_pod("client");
    let server = node.add_pod("server");
    server.serve(8080);
    let dst = addr(server.ip4, 8080);
    let mut agent = Agent::start(&node, &[&client, &server]);
    agent.wait_pod_state(&client, "enrolled");
    agent.wait_pod_state(&server, "enrolled");
    assert!(connect_captured(&client, dst).0);
    let attached = |node: &Node| {
        let mut p = sys::cgroup_programs(&node.cgroup_root);
        p.sort();
        p
    };
    assert_eq!(
        attached(&node),
        [
            "trellis_connect4",
            "trellis_connect6",
            "trellis_getpeername4",
            "trellis_getpeername6",
            "trellis_recvmsg4",
            "trellis_recvmsg6",
            "trellis_sendmsg4",
            "trellis_sendmsg6",
            "trellis_sock_ops"
        ]
    );
    assert_eq!(sys::sk_lookup_links(&server.netns), 1);

    agent.kill9();
    // Still pinned, still capturing: the connect is redirected to a capture port nobody serves.
    let out = client.connect(dst, "ping");
    assert!(
        out["error"].as_str().is_some_and(|e| e.contains("refused")),
        "capture lapsed with the agent dead: {out}"
    );
    assert_eq!(attached(&node).len(), 9);

    agent.restart();
    agent.wait_pod_state(&client, "enrolled");
    agent.wait_pod_state(&server, "enrolled");
    let (captured, port) = connect_captured(&client, dst);
    assert!(captured);
    capture_line(&agent, "outbound", dst, port);
    assert_eq!(
        attached(&node).len(),
        9,
        "restart duplicated attachments: {:?}",
        attached(&node)
    );
    assert_eq!(
        sys::sk_lookup_links(&server.netns),
        1,
        "restart duplicated the sk_lookup link"
    );

    agent.kill9();
    let out = agent.cleanup();
    assert!(
        out.status.success(),
        "cleanup failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !Path::new(&format!("/sys/fs/bpf/trellis/{}", node.name)).exists(),
        "pins left after cleanup"
    );
    assert!(
        attached(&node).is_empty(),
        "programs still attached after cleanup: {:?}",
        attached(&node)
    );
    assert_eq!(sys::sk_lookup_links(&server.netns), 0);
    assert!(
        !connect_captured(&client, dst).0,
        "still captured after cleanup"
    );
}

#[test]
fn bad_input_gets_clear_errors_and_other_pods_keep_working() {
    let node = Node::new(1);
    let good = node.add_pod("good");
    let doomed = node.add_pod("doomed");
    let empty = node.add_pod("empty");
    empty.kill_processes(); // cgroup exists, no process: sandbox not running
    let server = node.add_pod("server");
    server.serve(8080);
    let dst = addr(server.ip4, 8080);
    let ghost = "deadbeef-0000-4000-8000-000000000001";

    let agent = Agent::start(&node, &[&good, &doomed]);
    let mut pods = vec![
        good.spec("default"),
        doomed.spec("default"),
        empty.spec("default"),
    ];
    pods.push(serde_json::json!({"uid": ghost, "namespace": "default", "name": "ghost", "ips": ["10.244.1.99"]}));
    agent.write_pods_file(&serde_json::json!({ "pods": pods }).to_string());

    let deadline = Instant::now() + Duration::from_secs(10);
    let error_of = |uid: &str| {
        agent
            .pods()
            .into_iter()
            .find(|p| p["uid"] == uid)
            .and_then(|p| p["error"].as_str().map(str::to_owned))
    };
    while error_of(ghost).is_none() || error_of(&empty.uid).is_none() {
        assert!(Instant::now() < deadline, "{:?}", agent.pods());
        std::thread::sleep(Duration::from_millis(50));
    }
    let ghost_err = error_of(ghost).unwrap();
    assert!(
        ghost_err.contains("no cgroup for pod") && ghost_err.contains(ghost),
        "{ghost_err}"
    );
    let empty_err = error_of(&empty.uid).unwrap();
    assert!(empty_err.contains("has no processes"), "{empty_err}");
    assert!(
        connect_captured(&good, dst).0,
        "a good pod stopped being served"
    );

    // A pod whose processes die (its netns vanishes) is dropped with a reason.
    agent.wait_pod_state(&doomed, "enrolled");
    doomed.kill_processes();
    let _ = std::process::Command::new("ip")
        .args(["netns", "del", &doomed.netns])
        .status();
    let status = agent.wait_pod_state(&doomed, "failed");
    let why = status["error"].as_str().unwrap_or_default();
    assert!(
        why.contains("exited") || why.contains("has no processes"),
        "{status}"
    );
    assert!(
        connect_captured(&good, dst).0,
        "a good pod stopped being served"
    );

    // Malformed pods file: reported, last good list kept.
    agent.write_pods_file("{\"pods\": [ this is not json");
    agent.wait_log("the bad pods file warning", |v| {
        v["message"]
            .as_str()
            .is_some_and(|m| m.contains("still serving the previous pod list"))
    });
    assert_eq!(agent.wait_pod_state(&good, "enrolled")["state"], "enrolled");
    assert!(connect_captured(&good, dst).0);

    // A second agent for the same node refuses to start and says why.
    let log = agent.scratch("second.log");
    let mut second = agent.spawn_extra(&log).expect("spawning a second agent");
    let status = second.wait().expect("waiting for the second agent");
    assert!(!status.success());
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("another trellis-agent is running"), "{text}");
    assert!(
        connect_captured(&good, dst).0,
        "the first agent stopped serving"
    );
}

#[test]
fn cross_node_connections_are_captured_on_both_nodes() {
    let cluster = trellis_e2e::Cluster::new(2);
    let (n1, n2) = (&cluster.nodes[0], &cluster.nodes[1]);
    let client = n1.add_pod("client");
    let outsider = n1.add_pod("outsider");
    let server = n2.add_pod("server");
    server.serve(8080);
    let a1 = Agent::start(n1, &[&client]);
    let a2 = Agent::start(n2, &[&server]);
    a1.wait_pod_state(&client, "enrolled");
    a2.wait_pod_state(&server, "enrolled");

    for dst in [addr(server.ip4, 8080), addr(server.ip6, 8080)] {
        let out = client.connect(dst, "ping");
        assert_eq!(
            out["echo"],
            "ping",
            "{dst}: {out}\nnode 1 agent:\n{}\nnode 2 agent:\n{}",
            a1.log_text(),
            a2.log_text()
        );
        let local: SocketAddr = out["local"].as_str().unwrap().parse().unwrap();
        let (captured, port) = (local.ip().is_loopback(), local.port());
        assert!(captured, "{dst}: not captured on the client's node");
        capture_line(&a1, "outbound", dst, port);
        // The server's node takes it inbound; the client address is the client pod's own.
        let line = a2.wait_log("the inbound capture", |v| {
            v["direction"] == "inbound"
                && v["orig_dst"] == dst.to_string()
                && v["client"].as_str().is_some_and(|c| {
                    c.parse::<SocketAddr>()
                        .is_ok_and(|c| c.ip() == client.ips()[usize::from(dst.is_ipv6())])
                })
        });
        assert_eq!(line["pod"], "default/server");
    }
    // A pod that is not enrolled crosses nodes directly, and is still taken inbound at the server.
    let out = outsider.connect(addr(server.ip4, 8080), "hi");
    assert_eq!(out["echo"], "hi", "{out}");
    let local: SocketAddr = out["local"].as_str().unwrap().parse().unwrap();
    assert_eq!(
        local.ip(),
        IpAddr::V4(outsider.ip4),
        "the outsider was captured"
    );
    capture_line(&a2, "inbound", addr(server.ip4, 8080), local.port());
}

#[test]
fn the_agent_takes_pods_and_certificates_from_control_and_survives_its_absence() {
    let cluster = trellis_e2e::Cluster::new(1);
    let node = &cluster.nodes[0];
    let client = node.add_pod("client");
    let server = node.add_pod("server");
    server.serve(8080);
    let shop = |labels: &str| {
        format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: shop, labels: {{{labels}}}}}\n")
    };
    let mut control = trellis_e2e::control::Control::start(
        &cluster,
        &[
            ("ns.yaml", &shop("trellis.dev/mesh: enabled")),
            ("client.yaml", &client.yaml("shop", node, "client")),
        ],
    );
    let agent = Agent::start_with_control(node, &control);
    let status = agent.wait_pod_state(&client, "enrolled");
    assert_eq!(status["namespace"], "shop", "{status}");
    let dst = addr(server.ip4, 8080);
    let (captured, port) = connect_captured(&client, dst);
    assert!(
        captured,
        "a pod control lists was not captured:\n{}",
        control.log_text()
    );
    capture_line(&agent, "outbound", dst, port);

    // Its identity's certificate, from control, on the admin endpoint.
    let deadline = Instant::now() + Duration::from_secs(10);
    let identity = "spiffe://cluster.local/ns/shop/sa/client";
    loop {
        let (_, body) = agent.admin("/certificates").unwrap();
        if body.contains(identity) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no certificate for {identity}: {body}\n{}",
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // The namespace leaves the mesh: capture stops. It comes back: capture resumes.
    control.write("ns.yaml", &shop(""));
    let deadline = Instant::now() + Duration::from_secs(10);
    while agent.pods().iter().any(|p| p["uid"] == client.uid.as_str()) {
        assert!(
            Instant::now() < deadline,
            "the agent kept the pod: {:?}",
            agent.pods()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        !connect_captured(&client, dst).0,
        "still captured after leaving the mesh"
    );
    control.write("ns.yaml", &shop("trellis.dev/mesh: enabled"));
    agent.wait_pod_state(&client, "enrolled");

    // Control goes away: the agent keeps serving its last config.
    control.kill();
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        connect_captured(&client, dst).0,
        "capture stopped when control went away"
    );
    assert_eq!(
        agent.wait_pod_state(&client, "enrolled")["state"],
        "enrolled"
    );
}

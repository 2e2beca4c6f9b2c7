//! End-to-end tests of the capture layer on the real kernel: real eBPF programs attached by the
//! real agent binary, pods as network namespaces with kubelet-style cgroups.
use std::net::SocketAddr;

use trellis_e2e::{Agent, CgroupDriver, Node, Pod};

fn addr(ip: impl Into<std::net::IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

/// Connects from `from` to `to`, asserts the echo came back from the right server, and returns
/// the client's local port (to find the connection in the agent's log).
fn round_trip(from: &Pod, to: SocketAddr, server: &str) -> u16 {
    let out = from.connect(to, "ping");
    assert_eq!(
        out["echo"],
        "ping",
        "{from_name} -> {to}: {out}",
        from_name = from.name
    );
    assert_eq!(out["banner"]["server"], server, "{out}");
    out["local"]
        .as_str()
        .unwrap()
        .parse::<SocketAddr>()
        .unwrap()
        .port()
}

fn captured(agent: &Agent, direction: &str, pod: &Pod, dst: SocketAddr) -> bool {
    agent.captures().iter().any(|(d, p, _, o)| {
        d == direction && p.ends_with(&format!("/{}", pod.name)) && *o == dst.to_string()
    })
}

#[test]
fn outbound_is_captured_with_exact_original_destination() {
    let node = Node::new(1);
    let client = node.add_pod("client");
    let server = node.add_pod("server");
    server.serve(8080);
    let agent = Agent::start(&node, &[&client]);
    agent.wait_pod_state(&client, "enrolled");

    for dst in [addr(server.ip4, 8080), addr(server.ip6, 8080)] {
        let port = round_trip(&client, dst, "server");
        let line = agent.wait_log("the captured connection", |v| {
            v["message"] == "connection captured" && v["orig_dst"] == dst.to_string()
        });
        assert_eq!(line["direction"], "outbound");
        assert_eq!(line["pod"], "default/client");
        let client_port: SocketAddr = line["client"].as_str().unwrap().parse().unwrap();
        assert_eq!(
            client_port.port(),
            port,
            "the agent matched a different connection: {line}"
        );
        assert!(
            client_port.ip().is_loopback(),
            "captured connections arrive on the loopback listener: {line}"
        );
    }
}

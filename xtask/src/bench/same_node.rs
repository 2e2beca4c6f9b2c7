//! The same-node section: the client to a second server pod on its own node, directly and
//! through the mesh, where the agent splices the two pods' sockets without TLS, and hands HTTP
//! requests to the destination's inbound proxy in memory (see docs/datapath.md). L4 and L7, as
//! across nodes. No haproxy pair here: it has no same-node mode to compare.
use std::net::IpAddr;

use anyhow::Result;
use trellis_e2e::{
    Agent, Node, Pod,
    control::Control,
    serde_json::{Value, json},
};

use super::{
    ECHO_PORT, IPERF_PORT, NAMESPACE, Server, f, l7, phase, start_echo, start_iperf, sysctl,
};

/// The service account (and app) of the server pod on the client's node.
const SA: &str = "bench-near";

/// The second server pod, on node 1 with the client, serving the echo, iperf3 and HTTP as the
/// server pod does; not in the mesh until [`trellis`].
pub struct NearServer {
    pub pod: Pod,
    _echo: Server,
    _iperf: Server,
    _http: Server,
}

impl NearServer {
    pub fn start(node: &Node) -> Result<Self> {
        let pod = node.add_pod("server-near");
        sysctl(&pod.netns, "net.ipv4.tcp_tw_reuse=1")?;
        let (echo, iperf, http) = (
            start_echo(&pod)?,
            start_iperf(&pod)?,
            l7::start_server(&pod)?,
        );
        Ok(Self {
            pod,
            _echo: echo,
            _iperf: iperf,
            _http: http,
        })
    }

    fn target(&self) -> IpAddr {
        IpAddr::V4(self.pod.ip4)
    }
}

/// The client to the near server without the mesh.
pub fn direct(client: &Pod, near: &NearServer, duration: std::time::Duration) -> Result<Value> {
    eprintln!(
        "bench: phase direct, same node (no mesh): client -> {}",
        near.target()
    );
    let mut out = phase(
        "direct-same-node",
        client,
        near.target(),
        &[],
        duration,
        false,
    )?;
    out["l7"] = l7::phase(client, &l7::Path::near(&near.pod, None), duration, 1)?;
    Ok(out)
}

/// Tells control of the near server (only now, so the main phases' memory figures are those
/// of the two-pod agents) and measures the client to it through node 1's agent alone.
pub fn trellis(
    client: &Pod,
    near: &NearServer,
    node: &Node,
    control: &Control,
    agent: &Agent,
    duration: std::time::Duration,
) -> Result<Value> {
    let pod = &near.pod;
    control.write(
        "server-near.yaml",
        &format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {}, namespace: {NAMESPACE}, uid: {}, labels: {{app: {SA}}}}}\n\
             spec: {{nodeName: {}, serviceAccountName: {SA}, containers: []}}\n\
             status: {{phase: Running, podIPs: [{{ip: \"{}\"}}, {{ip: \"{}\"}}]}}\n",
            pod.name, pod.uid, node.name, pod.ip4, pod.ip6
        ),
    );
    let (file, http) = l7::near_control_file(SA);
    control.write(file, &http);
    agent.wait_pod_state(pod, "enrolled");
    super::wait_certificate(agent, SA)?;
    eprintln!(
        "bench: phase trellis, same node: client -> {} through the agent on {} (echo {ECHO_PORT}, iperf3 {IPERF_PORT})",
        near.target(),
        node.name
    );
    let pid = agent
        .pid()
        .ok_or_else(|| anyhow::anyhow!("agent not running"))?;
    let agent = (format!("agent {}", node.name), pid);
    let mut out = phase(
        "trellis-same-node",
        client,
        near.target(),
        std::slice::from_ref(&agent),
        duration,
        true,
    )?;
    out["l7"] = l7::phase(client, &l7::Path::near(pod, Some(agent)), duration, 1)?;
    Ok(out)
}

pub fn report(direct: Value, trellis: Value) -> Value {
    json!({ "direct": direct, "trellis": trellis })
}

/// The section's table: direct, trellis, and trellis against direct.
pub fn rows(r: &Value) -> Vec<Vec<String>> {
    let (d, t) = (&r["direct"], &r["trellis"]);
    let num = |v: Option<f64>, digits: usize| v.map_or("-".into(), |x| format!("{x:.digits$}"));
    let pct = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if a > 0.0 => format!("{:.0}%", b / a * 100.0),
        _ => "-".into(),
    };
    let delta = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) => format!("{:+.3} ms", b - a),
        _ => "-".into(),
    };
    let mut rows = vec![
        ["metric", "direct", "trellis", "trellis vs direct"]
            .map(String::from)
            .to_vec(),
    ];
    let gbit = |p: &Value| f(&p["throughput"]["bits_per_second"]).map(|b| b / 1e9);
    rows.push(vec![
        "TCP throughput, 1 stream, iperf3 (Gbit/s)".into(),
        num(gbit(d), 2),
        num(gbit(t), 2),
        pct(gbit(d), gbit(t)),
    ]);
    for (key, label) in [("p50_ms", "p50"), ("p99_ms", "p99")] {
        let ms = |p: &Value| f(&p["latency"][key]);
        rows.push(vec![
            format!("latency {label}, 1 KB echo at {} req/s (ms)", super::RATE),
            num(ms(d), 3),
            num(ms(t), 3),
            delta(ms(d), ms(t)),
        ]);
    }
    let cps = |p: &Value| f(&p["connect_rate"]["per_sec"]);
    rows.push(vec![
        "connections per second (4 threads)".into(),
        num(cps(d), 0),
        num(cps(t), 0),
        pct(cps(d), cps(t)),
    ]);
    // A figure only the mesh phase has.
    let agent = |label: &str, v: String| vec![label.into(), "-".into(), v, String::new()];
    rows.push(agent(
        "vCPU per 1000 req/s, the agent (echo)",
        num(f(&t["proxies"]["vcpu_per_1000_rps"]), 3),
    ));
    for (key, label) in [("h1", "HTTP/1.1"), ("h2", "HTTP/2 (h2c)")] {
        let p99 = |p: &Value| f(&p["l7"][key]["latency"]["p99_ms"]);
        rows.push(vec![
            format!("{label} latency p99, 1 KB at {} req/s (ms)", super::RATE),
            num(p99(d), 3),
            num(p99(t), 3),
            delta(p99(d), p99(t)),
        ]);
        let rps = |p: &Value| f(&p["l7"][key]["max_rate"]["rps"]);
        rows.push(vec![
            format!("{label} max req/s, 32 in flight"),
            num(rps(d), 0),
            num(rps(t), 0),
            pct(rps(d), rps(t)),
        ]);
        rows.push(agent(
            "  req/s per agent core",
            num(f(&t["l7"][key]["proxy"]["rps_per_core"]), 0),
        ));
    }
    rows
}

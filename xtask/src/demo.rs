//! `cargo xtask demo`: a two-node mesh on this machine running a small shop. `user` calls `web`,
//! which calls `catalog` and `reviews` (v1 on node 1, v2 on node 2) through their service
//! addresses; every hop is captured by eBPF and carried over HBONE (mutual TLS) by the node
//! proxies. The summary shows who called whom, with which identities, and the bytes, read from
//! the agents' own Istio metrics; each app reports the caller identity the mesh vouched for.
//! Act two routes reviews by weight and by header; act three (`demo/egress.rs`) sends `cart` to a
//! Redis outside the mesh through an egress gateway.
use std::{
    collections::BTreeMap,
    net::SocketAddr,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use trellis_e2e::serde_json::{self, Value};
use trellis_e2e::{
    Agent, Cluster, Node, Pod, control::Control, node::binary, prometheus::Prometheus, sys,
};

use crate::{cmd, setup};

mod egress;
mod graph;

const NS: &str = "shop";
const REQUESTS: usize = 8;

struct App {
    pod: &'static str,
    node: usize,
    service: &'static str,
    version: &'static str,
    calls: &'static [&'static str],
}

/// Service name, VIP.
const SERVICES: [(&str, &str); 3] = [
    ("web", "10.96.0.10"),
    ("catalog", "10.96.0.11"),
    ("reviews", "10.96.0.12"),
];

const APPS: [App; 4] = [
    App {
        pod: "web",
        node: 0,
        service: "web",
        version: "v1",
        calls: &["catalog", "reviews"],
    },
    App {
        pod: "catalog",
        node: 1,
        service: "catalog",
        version: "v1",
        calls: &[],
    },
    App {
        pod: "reviews-v1",
        node: 0,
        service: "reviews",
        version: "v1",
        calls: &[],
    },
    App {
        pod: "reviews-v2",
        node: 1,
        service: "reviews",
        version: "v2",
        calls: &[],
    },
];

fn vip(service: &str) -> &'static str {
    SERVICES
        .iter()
        .find(|(s, _)| *s == service)
        .map(|(_, v)| *v)
        .expect("a demo service")
}

pub fn run(once: bool) -> Result<()> {
    setup::run()?;
    cmd::require_root("cargo xtask demo")?;
    cmd::run(cmd::cargo().args(["build", "--bins"]))?;

    eprintln!(
        "demo: creating two nodes (network namespaces joined by a fabric) and the shop's pods"
    );
    let cluster = Cluster::new(2);
    let pods: Vec<(Pod, &App)> = APPS
        .iter()
        .map(|a| (cluster.nodes[a.node].add_pod(a.pod), a))
        .collect();
    let user = cluster.nodes[0].add_pod("user");
    for (pod, app) in &pods {
        start_app(pod, app);
    }

    let mut files = vec![(
        "ns.yaml".to_owned(),
        format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {NS}, labels: {{trellis.dev/mesh: enabled}}}}\n"
        ),
    )];
    for (pod, app) in &pods {
        let node = &cluster.nodes[app.node];
        files.push((
            format!("{}.yaml", app.pod),
            pod_yaml(pod, node, app.service, app.service, app.version),
        ));
    }
    files.push((
        "user.yaml".into(),
        pod_yaml(&user, &cluster.nodes[0], "user", "user", "v1"),
    ));
    for (name, vip) in SERVICES {
        files.push((
            format!("svc-{name}.yaml"),
            format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {NS}}}\n\
                 spec: {{clusterIP: {vip}, selector: {{app: {name}}}, ports: [{{name: http, port: 80, targetPort: 8080}}]}}\n"
            ),
        ));
    }
    let refs: Vec<(&str, &str)> = files
        .iter()
        .map(|(n, y)| (n.as_str(), y.as_str()))
        .collect();
    eprintln!("demo: starting trellis-control (dir mode) and one trellis-agent per node");
    let control = Control::start(&cluster, &refs);
    let mut agents: Vec<Agent> = cluster
        .nodes
        .iter()
        .map(|n| Agent::start_with_control(n, &control))
        .collect();
    for (pod, app) in &pods {
        agents[app.node].wait_pod_state(pod, "enrolled");
    }
    agents[0].wait_pod_state(&user, "enrolled");
    for (i, agent) in agents.iter().enumerate() {
        let want = APPS.iter().filter(|a| a.node == i).count() + usize::from(i == 0);
        wait_certificates(agent, want)?;
    }
    eprintln!("demo: starting Prometheus (scrapes both agents and control every second)");
    let prometheus = Prometheus::start(&cluster);

    println!("\nTrellis demo: the shop on a two-node mesh");
    for (i, node) in cluster.nodes.iter().enumerate() {
        let here: Vec<String> = pods
            .iter()
            .filter(|(_, a)| a.node == i)
            .map(|(p, a)| format!("{} ({} {})", p.name, p.ip4, a.version))
            .chain((i == 0).then(|| format!("user ({})", user.ip4)))
            .collect();
        println!("  node {} [{}]: {}", i + 1, node.name, here.join(", "));
    }
    println!(
        "  services: {}",
        SERVICES
            .iter()
            .map(|(s, v)| format!("{s} {v}:80"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!("\n  user -> http://{}/ ({REQUESTS} requests)", vip("web"));

    let mut failures = Vec::new();
    let mut versions: BTreeMap<String, usize> = BTreeMap::new();
    for i in 1..=REQUESTS {
        match get(&user, &format!("http://{}:80/", vip("web"))) {
            Ok(body) => {
                let calls: Vec<String> = body["calls"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|c| {
                        if let Some(e) = c["error"].as_str() {
                            failures.push(format!("request {i}: web's call failed: {e}"));
                            return format!("FAILED ({e})");
                        }
                        let pod = c["pod"].as_str().unwrap_or("?");
                        if c["service"] == "reviews" {
                            *versions.entry(pod.to_owned()).or_default() += 1;
                        }
                        let seen = c["client_identity"].as_str().unwrap_or("none");
                        if !seen.ends_with("/ns/shop/sa/web") {
                            failures.push(format!(
                                "request {i}: {pod} saw caller {seen}, not shop/web"
                            ));
                        }
                        format!(
                            "{pod} {} (saw {})",
                            c["version"].as_str().unwrap_or("?"),
                            short(seen)
                        )
                    })
                    .collect();
                let seen = body["client_identity"].as_str().unwrap_or("none");
                if !seen.ends_with("/ns/shop/sa/user") {
                    failures.push(format!("request {i}: web saw caller {seen}, not shop/user"));
                }
                println!(
                    "  {i:>2}. user -> web {} (saw {}) -> {}",
                    body["version"].as_str().unwrap_or("?"),
                    short(seen),
                    calls.join(", ")
                );
            }
            Err(e) => {
                println!("  {i:>2}. FAILED: {e:#}");
                failures.push(format!("request {i}: {e:#}"));
            }
        }
    }
    println!(
        "  reviews answered by: {}",
        versions
            .iter()
            .map(|(p, n)| format!("{p} x{n}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    if versions.len() < 2 {
        failures.push("reviews was not balanced over both versions".into());
    }

    println!("\n  Who called whom (from the destination proxies' istio_tcp_* metrics):");
    println!(
        "  {:<38} {:<40} {:>5} {:>9} {:>9}  security",
        "source identity", "destination identity", "conns", "bytes in", "bytes out"
    );
    let edges = edges(&cluster)?;
    for e in &edges {
        println!(
            "  {:<38} {:<40} {:>5} {:>9} {:>9}  {}",
            short(&e.source),
            short(&e.destination),
            e.connections,
            e.received,
            e.sent,
            e.security
        );
    }
    for (from, to) in [("user", "web"), ("web", "catalog"), ("web", "reviews")] {
        let found = edges.iter().any(|e| {
            e.source.ends_with(&format!("/sa/{from}"))
                && e.destination.ends_with(&format!("/sa/{to}"))
                && e.security == "mutual_tls"
                && e.connections > 0
        });
        if !found {
            failures.push(format!(
                "no mutual-TLS traffic {from} -> {to} in the metrics"
            ));
        }
    }
    prometheus_edges(&prometheus, &mut failures);
    let url = if once {
        format!(
            "{} (in the fabric namespace {})",
            prometheus.url(),
            cluster.fabric()
        )
    } else {
        let local = sys::forward(
            cluster.fabric(),
            Prometheus::PORT,
            format!("{}:{}", Cluster::SERVICES_IP, Prometheus::PORT).parse()?,
        )?;
        format!("http://{local}")
    };
    println!("\n  Prometheus: {url}   (Grafana dashboard: deploy/grafana/, docs/observability.md)");
    println!(
        "  metrics: ip netns exec {} curl -s http://127.0.0.1:15020/metrics   (node 2: {})",
        cluster.nodes[0].name, cluster.nodes[1].name
    );
    println!(
        "  admin:   ip netns exec {} curl -s http://127.0.0.1:15000/config_dump   (also /pods, /certificates)",
        cluster.nodes[0].name
    );
    println!(
        "  logs:    {} and {}",
        agents[0].log_file().display(),
        agents[1].log_file().display()
    );

    canary_and_header_route(&control, &user, &mut failures);
    let graph_page = match graph::start(&cluster, &prometheus) {
        Ok(page) => {
            graph::check_in_browser(&cluster, &page, &mut failures);
            if !once {
                let local = sys::forward(cluster.fabric(), graph::PORT, page.addr)?;
                println!("  graph page: http://{local}   (live: redrawn every 2 s)");
            }
            Some(page)
        }
        Err(e) => {
            failures.push(format!("the graph page: {e:#}"));
            None
        }
    };
    egress::act_three(&cluster, &control, &mut agents, &pods[0].0, &mut failures);

    if !failures.is_empty() {
        for f in &failures {
            eprintln!("demo: FAILED: {f}");
        }
        bail!("{} demo check(s) failed", failures.len());
    }
    println!(
        "\n  every hop went over mutual TLS; each app saw its caller's verified identity\n  \
         (x-forwarded-client-cert, added by the destination node's proxy on HTTP ports)."
    );
    if !once {
        println!("\nUp. Press Ctrl-C to remove everything.");
        wait_for_signal();
    }
    eprintln!("demo: stopping agents and control, removing pods and nodes");
    drop(graph_page);
    drop(prometheus);
    drop(agents);
    drop(control);
    Ok(())
}

/// The service graph as Prometheus sees it (Kiali's query, summed over the run): one line per
/// edge; an edge the shop must have and Prometheus lacks is a failure.
fn prometheus_edges(prometheus: &Prometheus, failures: &mut Vec<String>) {
    const QUERY: &str = "sum(istio_requests_total{reporter=\"destination\"}) by (source_workload, destination_service_name, destination_workload, connection_security_policy)";
    let want = [("user", "web"), ("web", "catalog"), ("web", "reviews")];
    let label = |s: &Value, l: &str| s["metric"][l].as_str().unwrap_or("?").to_owned();
    let has = |series: &[Value], (from, to): (&str, &str)| {
        series.iter().any(|s| {
            label(s, "source_workload") == from && label(s, "destination_service_name") == to
        })
    };
    // Prometheus scrapes each second; the counters of the last requests show up within a few.
    let deadline = Instant::now() + Duration::from_secs(15);
    let series = loop {
        let series = prometheus.query(QUERY);
        if want.iter().all(|e| has(&series, *e)) || Instant::now() > deadline {
            break series;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    println!(
        "\n  The graph as Prometheus sees it (requests counted by the destinations' proxies):"
    );
    for s in &series {
        println!(
            "  {:<10} -> {:<10} ({:<12}) {:>4} requests  {}",
            label(s, "source_workload"),
            label(s, "destination_service_name"),
            label(s, "destination_workload"),
            s["value"][1].as_str().unwrap_or("?"),
            label(s, "connection_security_policy")
        );
    }
    for (from, to) in want.iter().filter(|e| !has(&series, **e)) {
        failures.push(format!("Prometheus has no requests {from} -> {to}"));
    }
}

/// The reviews versions web's calls reached over `count` requests from `user`, one connection
/// each.
fn reviews_versions(user: &Pod, count: usize, headers: &[&str]) -> Result<BTreeMap<String, usize>> {
    let url = format!("http://{}:80/", vip("web"));
    let mut args = Vec::new();
    for h in headers {
        args.extend(["--header", h]);
    }
    let mut seen = BTreeMap::new();
    for _ in 0..count {
        let b = get_with(user, &url, &args)?;
        for c in b["calls"].as_array().into_iter().flatten() {
            if c["service"] == "reviews" {
                let v = c["version"].as_str().unwrap_or("failed").to_owned();
                *seen.entry(v).or_default() += 1;
            }
        }
    }
    Ok(seen)
}

/// Act two: Istio's canary and header routing on reviews, done by the node proxy on web's node
/// (no waypoint), with the counts.
fn canary_and_header_route(control: &Control, user: &Pod, failures: &mut Vec<String>) {
    const SUBSETS: &str = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: reviews, namespace: shop}\n\
        spec: {host: reviews, subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}]}\n";
    const CANARY: &str = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: reviews, namespace: shop}\n\
        spec: {hosts: [reviews], http: [{route: [{destination: {host: reviews, subset: v1}, weight: 80}, {destination: {host: reviews, subset: v2}, weight: 20}]}]}\n";
    const JASON: &str = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: reviews, namespace: shop}\n\
        spec: {hosts: [reviews], http: [{match: [{headers: {end-user: {exact: jason}}}], route: [{destination: {host: reviews, subset: v2}}]}, \
        {route: [{destination: {host: reviews, subset: v1}}]}]}\n";
    let wait = |what: &str, ok: &dyn Fn() -> bool| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !ok() {
            if Instant::now() > deadline {
                return Err(format!("{what} never took effect"));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    };
    let versions = |n, h: &[&str]| reviews_versions(user, n, h).unwrap_or_default();

    println!(
        "\n  Canary: VirtualService reviews, 80% to v1 and 20% to v2 (DestinationRule subsets by version)"
    );
    control.write("reviews-subsets.yaml", SUBSETS);
    control.write("reviews-vs.yaml", JASON);
    // The header route first, to know the routes have arrived before switching to weights.
    if let Err(e) = wait("the header route", &|| {
        versions(10, &["end-user: jason"]).get("v2") == Some(&10)
    }) {
        return failures.push(e);
    }
    control.write("reviews-vs.yaml", CANARY);
    if let Err(e) = wait("the canary", &|| {
        versions(10, &["end-user: jason"]).contains_key("v1")
    }) {
        return failures.push(e);
    }
    let canary = match reviews_versions(user, 100, &[]) {
        Ok(c) => c,
        Err(e) => return failures.push(format!("canary requests: {e:#}")),
    };
    let v2 = canary.get("v2").copied().unwrap_or(0);
    println!(
        "  100 requests: reviews v1 x{}, v2 x{v2}",
        canary.get("v1").copied().unwrap_or(0)
    );
    // 20 expected; 8..=35 is about three standard deviations either side.
    if !(8..=35).contains(&v2) || canary.len() != 2 {
        failures.push(format!("the 80/20 canary gave {canary:?}"));
    }

    println!("\n  Header route: end-user: jason goes to v2, everyone else to v1");
    control.write("reviews-vs.yaml", JASON);
    if let Err(e) = wait("the header route", &|| {
        versions(10, &[]).get("v1") == Some(&10)
    }) {
        return failures.push(e);
    }
    let jason = versions(20, &["end-user: jason"]);
    let others = versions(20, &["end-user: mary"]);
    println!("  jason x20: {jason:?}   mary x20: {others:?}");
    if jason.get("v2") != Some(&20) || others.get("v1") != Some(&20) {
        failures.push(format!(
            "header route gave jason {jason:?}, mary {others:?}"
        ));
    }
}

fn pod_yaml(pod: &Pod, node: &Node, sa: &str, app: &str, version: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {}, namespace: {NS}, uid: {}, labels: {{app: {app}, version: {version}}}}}\n\
         spec: {{nodeName: {}, serviceAccountName: {sa}, containers: []}}\n\
         status: {{phase: Running, podIPs: [{{ip: \"{}\"}}, {{ip: \"{}\"}}]}}\n",
        pod.name, pod.uid, node.name, pod.ip4, pod.ip6
    )
}

/// Starts `app`'s server in `pod` (it stops with the pod).
fn start_app(pod: &Pod, app: &App) {
    let mut cmd = Command::new(binary("trellis-demo-app"));
    cmd.args([
        "serve",
        "--service",
        app.service,
        "--version",
        app.version,
        "--pod",
        app.pod,
        "--listen",
        "[::]:8080",
    ]);
    for c in app.calls {
        cmd.args(["--call", &format!("http://{}:80/", vip(c))]);
    }
    pod.start_app(&mut cmd);
}

fn get(from: &Pod, url: &str) -> Result<Value> {
    get_with(from, url, &[])
}

/// GET from `from` as its app would, with extra `trellis-demo-app get` arguments.
fn get_with(from: &Pod, url: &str, extra: &[&str]) -> Result<Value> {
    let mut cmd = Command::new(binary("trellis-demo-app"));
    cmd.args(["get", url])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = from.spawn_app(&mut cmd)?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait()?.is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{url}: no answer within 60 s");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("{}", String::from_utf8_lossy(&out.stderr).trim());
    }
    serde_json::from_slice(&out.stdout).context("the app's answer is not JSON")
}

fn wait_certificates(agent: &Agent, want: usize) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok((200, body)) = agent.admin("/certificates")
            && serde_json::from_str::<Vec<Value>>(&body).is_ok_and(|c| c.len() >= want)
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "node {}: certificates not issued within 20 s; agent log: {}",
                agent.node,
                agent.log_file().display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

struct Edge {
    source: String,
    destination: String,
    security: String,
    connections: u64,
    received: u64,
    sent: u64,
}

/// Connections and bytes per (source, destination) as the destination proxies report them.
fn edges(cluster: &Cluster) -> Result<Vec<Edge>> {
    let mut out: BTreeMap<(String, String, String), Edge> = BTreeMap::new();
    for node in &cluster.nodes {
        let (code, text) = sys::http_get(
            &node.name,
            "127.0.0.1:15020".parse::<SocketAddr>()?,
            "/metrics",
        )
        .with_context(|| format!("reading node {}'s metrics", node.name))?;
        if code != 200 {
            bail!("node {}: /metrics answered {code}", node.name);
        }
        for line in text
            .lines()
            .filter(|l| l.contains("reporter=\"destination\""))
        {
            let (Some((name, rest)), Some(value)) = (
                line.split_once('{'),
                line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()),
            ) else {
                continue;
            };
            let label = |k: &str| {
                rest.split(&format!("{k}=\""))
                    .nth(1)
                    .and_then(|v| v.split('"').next())
                    .unwrap_or("unknown")
                    .to_owned()
            };
            let key = (
                label("source_principal"),
                label("destination_principal"),
                label("connection_security_policy"),
            );
            let e = out.entry(key.clone()).or_insert(Edge {
                source: key.0,
                destination: key.1,
                security: key.2,
                connections: 0,
                received: 0,
                sent: 0,
            });
            let v = value as u64;
            match name {
                "istio_tcp_connections_opened_total" => e.connections += v,
                "istio_tcp_received_bytes_total" => e.received += v,
                "istio_tcp_sent_bytes_total" => e.sent += v,
                _ => {}
            }
        }
    }
    Ok(out.into_values().collect())
}

/// `spiffe://cluster.local/ns/shop/sa/web` → `shop/web`.
fn short(id: &str) -> String {
    id.strip_prefix("spiffe://")
        .and_then(|r| r.split_once("/ns/"))
        .map(|(_, r)| r.replace("/sa/", "/"))
        .unwrap_or_else(|| id.to_owned())
}

fn wait_for_signal() {
    // SAFETY: blocking SIGINT/SIGTERM on this thread, then waiting for one of them.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        let mut sig = 0;
        libc::sigwait(&set, &mut sig);
    }
}

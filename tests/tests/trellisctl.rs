//! End-to-end tests of the `trellisctl` binary: against the shop's running mesh (check,
//! workloads, config-dump, stat after real HTTP traffic; check failing with its fix when an
//! agent is not there and when control is stopped), and `analyze` on YAML with known errors.
mod shop;

use std::{
    process::Command,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use shop::{Shop, TD, VIP, http_get, spiffe};
use trellis_e2e::{node::binary, prometheus::Prometheus, sys};

/// Runs trellisctl with `args`; (exit status 0, stdout, stderr).
fn ctl(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(binary("trellisctl"))
        .args(args)
        .output()
        .expect("running trellisctl (build it first: cargo build --bins)");
    // Shown with --nocapture: what a user would see.
    eprintln!(
        "$ trellisctl {}\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `--agent NODE=NETNS` for both of the shop's agents (a harness node's name is its netns's).
fn agent_args(shop: &Shop) -> Vec<String> {
    shop.cluster.nodes[..2]
        .iter()
        .flat_map(|n| ["--agent".to_owned(), format!("{0}={0}", n.name)])
        .collect()
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

#[test]
fn analyze_names_file_object_and_field_and_passes_the_examples() {
    let dir = std::env::temp_dir().join(format!("{}-analyze", sys::unique_name()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("reviews.yaml");
    std::fs::write(
        &file,
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: reviews, namespace: shop}\n\
         spec:\n  hosts: [reviews]\n  http:\n  - route:\n    - destination: {host: reviews, subset: v1}\n      weight: 80\n\
         \x20   - destination: {host: reviews, subset: v2}\n      weight: 30\n---\n\
         apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: shop}\n\
         spec: {mtls: {mode: STRICTER}}\n---\n\
         apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {trellis.dev/mesh: enabled}}\n",
    )
    .unwrap();
    let (ok, out, err) = ctl(&["analyze", dir.to_str().unwrap()]);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(!ok, "analyze must exit 1 on errors:\n{out}{err}");
    let f = file.display();
    assert!(
        out.contains(&format!(
            "{f}: VirtualService shop/reviews: spec.http[0].route: weights add up to 110, not 100\n"
        )),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "{f}: PeerAuthentication shop/default: spec.mtls.mode: \"STRICTER\" is not supported"
        )),
        "{out}"
    );
    assert!(out.ends_with("✘ 2 error(s); 1 objects valid\n"), "{out}");

    let examples = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/examples");
    let (ok, out, err) = ctl(&[
        "analyze",
        &format!("{examples}/shop"),
        &format!("{examples}/traffic"),
    ]);
    assert!(ok, "{out}{err}");
    assert!(
        out.starts_with('✔') && out.ends_with("objects valid\n"),
        "{out}"
    );
}

#[test]
fn trellisctl_reads_the_running_mesh_and_fails_checks_with_their_fix() {
    let mut shop = Shop::start();
    let agents = agent_args(&shop);
    let (n1, n2) = (
        shop.cluster.nodes[0].name.clone(),
        shop.cluster.nodes[1].name.clone(),
    );
    let fabric = shop.cluster.fabric().to_owned();
    let control = [
        "--control-netns",
        &fabric,
        "--control-metrics",
        "127.0.0.1:15014",
    ];

    // check: all ✔ on the running mesh.
    let mut args = vec!["check"];
    args.extend(control);
    args.extend(strs(&agents));
    let (ok, out, err) = ctl(&args);
    assert!(
        ok,
        "check failed on a healthy mesh:\n{out}{err}\n{}",
        shop.logs()
    );
    assert!(!out.contains('✘'), "{out}");
    for line in [
        "✔ kernel supports sk_lookup programs".to_owned(),
        "✔ kernel supports sockhash maps (sockmap)".to_owned(),
        "✔ bpffs mounted at /sys/fs/bpf".to_owned(),
        "✔ control ready".to_owned(),
        "✔ control's clock within 5s of this host's".to_owned(),
        "✔ control accepted every object of its source".to_owned(),
        format!("✔ agent {n1} ready"),
        format!("✔ agent {n2} ready"),
        format!("✔ agent {n1} connected to control and acked the latest config (version "),
        format!("✔ agent {n2} connected to control and acked the latest config (version "),
        format!("✔ agent {n2}'s certificates valid and not near expiry (1 held)"),
        format!("✔ agent {n1}'s clock within 5s of this host's"),
    ] {
        assert!(out.contains(&line), "no {line:?} in:\n{out}");
    }

    // workloads: the shop's pods with their SPIFFE identities, protocols and mTLS mode.
    let mut args = vec!["workloads", "-n", "shop"];
    args.extend(strs(&agents));
    let (ok, out, err) = ctl(&args);
    assert!(ok, "{out}{err}");
    let row = |pod: &str| {
        out.lines()
            .find(|l| l.split_whitespace().nth(2) == Some(pod))
            .unwrap_or_else(|| panic!("no row for {pod}:\n{out}"))
            .split_whitespace()
            .collect::<Vec<_>>()
    };
    assert!(out.starts_with("NODE "), "{out}");
    let client = row("client");
    assert_eq!(
        client[..5],
        [
            n1.as_str(),
            "shop",
            "client",
            "enrolled",
            &spiffe("shop", "client")
        ],
        "{out}"
    );
    // The default certificate lifetime is 24 h, so "in 23h..".
    assert!(client[5] == "in" && client[6].starts_with("23h"), "{out}");
    let server = row("server");
    assert_eq!(
        server[..5],
        [
            n2.as_str(),
            "shop",
            "server",
            "enrolled",
            &spiffe("shop", "server")
        ],
        "{out}"
    );
    assert_eq!(server[7], "7000/tcp,8080/tcp,9080/http", "{out}");
    assert_eq!(server[8], "PERMISSIVE", "{out}");
    assert!(
        !out.contains("outsider"),
        "-n shop shows only shop's pods:\n{out}"
    );

    // config-dump: the node's config as JSON, with the server's identity and its HTTP port.
    let mut args = vec!["config-dump", &n2];
    args.extend(strs(&agents));
    let (ok, out, err) = ctl(&args);
    assert!(ok, "{out}{err}");
    let dump: serde_json::Value = serde_json::from_str(&out).expect("config-dump prints JSON");
    assert_eq!(dump["trust_domain"], TD);
    assert_eq!(
        dump["workloads"][shop.server.ip4.to_string()]["identity"],
        spiffe("shop", "server"),
        "{out}"
    );
    assert_eq!(
        dump["services"][format!("{VIP}:8081")]["http"],
        true,
        "{out}"
    );
    // Without --agent, a node name is read as its network namespace's.
    let (ok, out2, err) = ctl(&["config-dump", &n2]);
    assert!(
        ok && out2.contains(&spiffe("shop", "server")),
        "{out2}{err}"
    );

    // stat: real HTTP requests client → server while the agents are scraped twice.
    let stop = AtomicBool::new(false);
    let (ok, out, err) = std::thread::scope(|s| {
        s.spawn(|| {
            let start = Instant::now();
            while !stop.load(Ordering::Relaxed) && start.elapsed() < Duration::from_secs(30) {
                let body = http_get(&shop.client, &format!("http://{VIP}:8081/"), &[]);
                assert_eq!(body["service"], "server", "{body}");
            }
        });
        let mut args = vec!["stat", "deploy/server", "-n", "shop", "--window", "3s"];
        args.extend(strs(&agents));
        let r = ctl(&args);
        stop.store(true, Ordering::Relaxed);
        r
    });
    assert!(ok, "{out}{err}");
    let cols: Vec<&str> = out
        .lines()
        .nth(1)
        .expect("a row")
        .split_whitespace()
        .collect();
    assert_eq!(cols[..2], ["server", "shop"], "{out}");
    assert_eq!(cols[3], "100.00%", "{out}");
    let rps: f64 = cols[4].parse().unwrap();
    assert!(rps > 0.0, "no requests counted:\n{out}");
    assert!(cols[5].ends_with("ms") && cols[7].ends_with("ms"), "{out}");

    // tap: the server's requests, live from both agents, while the client calls it.
    let mut cmd = Command::new(binary("trellisctl"));
    cmd.args(["tap", "deploy/server", "-n", "shop", "--method", "get"])
        .args(["--max", "10", "--duration", "20s", "-o", "json"])
        .args(&agents)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut tap = cmd.spawn().expect("running trellisctl tap");
    let start = Instant::now();
    // Requests made before the tap's streams open go untapped: call until it has its ten.
    while tap.try_wait().unwrap().is_none() && start.elapsed() < Duration::from_secs(25) {
        http_get(&shop.client, &format!("http://{VIP}:8081/tapped"), &[]);
    }
    let _ = tap.kill();
    let out = tap.wait_with_output().unwrap();
    let (text, err) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    eprintln!("$ trellisctl tap deploy/server -n shop --method get --max 10 -o json\n{text}{err}");
    assert!(out.status.success(), "{text}{err}");
    assert!(err.contains("tapping shop/server on 2 node(s)"), "{err}");
    let records: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("tap -o json prints one record a line"))
        .collect();
    assert_eq!(records.len(), 10, "{text}");
    for r in &records {
        assert_eq!(
            (
                &r["destination_workload"],
                &r["method"],
                &r["path"],
                &r["response_code"]
            ),
            (
                &"server".into(),
                &"GET".into(),
                &"/tapped".into(),
                &200.into()
            ),
            "{r}"
        );
    }
    for reporter in ["source", "destination"] {
        assert!(
            records.iter().any(|r| r["reporter"] == reporter),
            "no {reporter} record:\n{text}"
        );
    }

    // check from the fabric's namespace, agents by their metrics address (as from another
    // machine): all passes, and the admin-only checks say why they were not made.
    let mut cmd = Command::new(binary("trellisctl"));
    cmd.args(["check", "--control-metrics", "10.0.0.254:15014"])
        .args(["--agent", &format!("{n1}=10.0.0.1:15020")])
        .args(["--agent", &format!("{n2}=10.0.0.2:15020")])
        .stdout(std::process::Stdio::piped());
    let out = sys::spawn_in(&fabric, None, &mut cmd)
        .expect("running trellisctl in the fabric")
        .wait_with_output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    eprintln!("$ trellisctl check (in the fabric, agents by address)\n{text}");
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains(&format!("✔ agent {n2} connected to control and acked the latest config"))
            && text.contains(&format!(
                "- agent {n2}'s certificates valid and not near expiry: not checked (node {n2}'s admin endpoint listens on the node's localhost only"
            ))
            && text.contains("(2 not checked)"),
        "{text}"
    );

    // check, with an agent that is not there: ✘ with the fix, exit 1.
    let mut args = vec!["check"];
    args.extend(control);
    args.extend(["--agent", "ghost=trl-no-such-netns"]);
    let (ok, out, _) = ctl(&args);
    assert!(!ok, "{out}");
    let ghost = out
        .lines()
        .find(|l| l.starts_with("✘ agent ghost reachable"))
        .unwrap_or_else(|| panic!("no ✘ for the missing agent:\n{out}"));
    assert!(
        ghost.contains("opening network namespace /var/run/netns/trl-no-such-netns")
            && ghost.contains(" — "),
        "{ghost}"
    );

    // check, with control stopped: ✘ with the fix, and the agents' acks cannot be confirmed.
    shop.control.kill();
    let mut args = vec!["check"];
    args.extend(control);
    args.extend(strs(&agents));
    let (ok, out, _) = ctl(&args);
    assert!(!ok, "{out}");
    let line = out
        .lines()
        .find(|l| l.starts_with("✘ control reachable"))
        .unwrap_or_else(|| panic!("no ✘ for control:\n{out}"));
    assert!(line.contains("— start trellis-control"), "{line}");
    assert!(
        out.contains(&format!("✘ agent {n1} connected to control and acked the latest config: control's metrics could not be read")),
        "{out}"
    );
    // The node's own checks still pass.
    let (ok, out, err) = ctl(&["check", "--kernel-only"]);
    assert!(ok && !out.contains("control"), "{out}{err}");
}

#[test]
fn stat_reads_istio_queries_from_prometheus() {
    let shop = Shop::start();
    let prometheus = Prometheus::start(&shop.cluster);
    // Both agents and control scraped before the traffic, so that its counters are seen growing.
    prometheus.wait_targets_up(3);
    // Requests for 5 s, so that Prometheus scrapes the counters growing several times.
    let start = Instant::now();
    let mut sent = 0;
    while start.elapsed() < Duration::from_secs(5) {
        let body = http_get(&shop.client, &format!("http://{VIP}:8081/"), &[]);
        assert_eq!(body["service"], "server", "{body}");
        sent += 1;
    }
    std::thread::sleep(Duration::from_millis(1500)); // the last scrape
    let url = prometheus.url();
    let (ok, out, err) = ctl(&[
        "stat",
        "deploy/server",
        "-n",
        "shop",
        "--prometheus",
        &url,
        "--prometheus-netns",
        shop.cluster.fabric(),
    ]);
    // The graph from the same Prometheus: client → server → server, over mutual TLS.
    let (graph_server, graph_addr) = start_graph(&[
        "--prometheus",
        &url,
        "--prometheus-netns",
        shop.cluster.fabric(),
    ]);
    let start = Instant::now();
    let graph = loop {
        let (_, json) = local_get(&graph_addr, "/graph.json");
        let graph: serde_json::Value = serde_json::from_str(&json).expect("graph.json is JSON");
        let drawn = |from, to| {
            edge(&graph, from, to).is_some_and(|e| {
                e["protocol"] == "http" && e["rps"].as_f64() > Some(0.0) && e["mtls"] == true
            })
        };
        if drawn(CLIENT, SERVICE) && drawn(SERVICE, SERVER) {
            break graph;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no edges from Prometheus: {graph}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    eprintln!("graph.json from Prometheus: {graph:#}");
    drop(graph_server);
    drop(prometheus);
    assert!(ok, "{out}{err}");
    let cols: Vec<&str> = out
        .lines()
        .nth(1)
        .expect("a row")
        .split_whitespace()
        .collect();
    assert_eq!(
        cols[..4],
        ["server", "shop", "destination", "100.00%"],
        "{out}"
    );
    let rps: f64 = cols[4].parse().unwrap();
    assert!(
        rps > 0.0,
        "{sent} requests sent, none in Prometheus:\n{out}"
    );
    assert!(cols[5].ends_with("ms") && cols[7].ends_with("ms"), "{out}");

    // A Prometheus that is not there: an error naming it, exit 1.
    let (ok, _, err) = ctl(&[
        "stat",
        "deploy/server",
        "-n",
        "shop",
        "--prometheus",
        &url,
        "--prometheus-netns",
        shop.cluster.fabric(),
    ]);
    assert!(
        !ok && err.contains("querying Prometheus at 10.0.0.254:9090"),
        "{err}"
    );
}

/// A plain HTTP/1.0 GET on this host's loopback; (status, body).
fn local_get(addr: &str, path: &str) -> (u16, String) {
    let addr: std::net::SocketAddr = addr.parse().expect("an address");
    let s = std::net::TcpStream::connect(addr).expect("connecting to trellisctl graph");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    sys::http_get_over(s, addr, path).expect("a GET to trellisctl graph")
}

/// `trellisctl graph` running; killed on drop.
struct GraphServer(std::process::Child);

/// Starts `trellisctl graph` on a free port with `args`; it and its address.
fn start_graph(args: &[&str]) -> (GraphServer, String) {
    use std::io::BufRead;
    let mut child = Command::new(binary("trellisctl"))
        .args(["graph", "--listen", "127.0.0.1:0", "--interval", "1s"])
        .args(args)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("starting trellisctl graph");
    let mut first = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    let server = GraphServer(child);
    let addr = first
        .trim()
        .strip_prefix("serving the graph on http://")
        .and_then(|a| a.strip_suffix('/'))
        .unwrap_or_else(|| panic!("unexpected first line {first:?}"))
        .to_owned();
    (server, addr)
}

impl Drop for GraphServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn graph_serves_the_meshs_edges_with_rates_and_mtls() {
    let shop = Shop::start();
    let agents = agent_args(&shop);
    let (server, addr) = start_graph(&strs(&agents));

    let (code, page) = local_get(&addr, "/");
    assert!(code == 200 && page.contains("graph.json"), "{code} {page}");

    // HTTP and TCP traffic through the mesh, while the agents are scraped every second.
    let start = Instant::now();
    let graph = loop {
        let body = http_get(&shop.client, &format!("http://{VIP}:8081/"), &[]);
        assert_eq!(body["service"], "server", "{body}");
        let blasted = shop::blast(&shop.client, shop.vip(7000), 200_000);
        assert_eq!(blasted["ok"], true, "{blasted}");
        let (_, json) = local_get(&addr, "/graph.json");
        let graph: serde_json::Value = serde_json::from_str(&json).expect("graph.json is JSON");
        if shop_edges_drawn(&graph) {
            break graph;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "no client → server edges with traffic in 20 s: {graph}"
        );
    };
    drop(server);
    eprintln!("graph.json: {graph:#}");
    for (from, to) in [(CLIENT, SERVICE), (SERVICE, SERVER)] {
        let e = edge(&graph, from, to).unwrap();
        assert_eq!(e["protocol"], "http", "{e}");
        assert_eq!(e["mtls"], true, "{e}");
        assert_eq!(e["error_rate"], 0.0, "{e}");
        assert!(e["p99_ms"].as_f64().is_some(), "{e}");
    }
    // The client's own view of its HTTP connections (no workload yet) is no other node.
    assert_eq!(
        graph["nodes"],
        serde_json::json!([SERVICE, CLIENT, SERVER]),
        "{graph}"
    );
}

const CLIENT: &str = "workload:shop/client";
const SERVICE: &str = "service:shop/server";
const SERVER: &str = "workload:shop/server";

/// The edge `source` → `target` in a /graph.json.
fn edge(graph: &serde_json::Value, source: &str, target: &str) -> Option<serde_json::Value> {
    graph["edges"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|e| e["source"] == source && e["target"] == target)
        .cloned()
}

/// client → server → server drawn, each edge with the HTTP requests and the TCP bytes.
fn shop_edges_drawn(graph: &serde_json::Value) -> bool {
    [(CLIENT, SERVICE), (SERVICE, SERVER)]
        .iter()
        .all(|(from, to)| {
            edge(graph, from, to).is_some_and(|e| {
                e["rps"].as_f64() > Some(0.0) && e["bytes_per_second"].as_f64() > Some(0.0)
            })
        })
}

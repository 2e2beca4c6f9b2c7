//! End-to-end tests of HTTP at L7 in the node proxies: a service port declared HTTP is proxied
//! per request on the client's node (and the server's node tells the app who called).
use std::process::{Command, Stdio};

use trellis_e2e::{Agent, Cluster, Node, Pod, control::Control, node::binary};

const VIP: &str = "10.96.0.20";

fn pod_yaml(pod: &Pod, node: &Node, app: &str, version: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {}, namespace: shop, uid: {}, labels: {{app: {app}, version: {version}}}}}\n\
         spec: {{nodeName: {}, serviceAccountName: {app}, containers: []}}\n\
         status: {{phase: Running, podIPs: [{{ip: \"{}\"}}, {{ip: \"{}\"}}]}}\n",
        pod.name, pod.uid, node.name, pod.ip4, pod.ip6
    )
}

fn serve(pod: &Pod, version: &str) {
    serve_with(pod, "web", version, &[]);
}

fn serve_with(pod: &Pod, service: &str, version: &str, extra: &[&str]) {
    pod.start_app(
        Command::new(binary("trellis-demo-app"))
            .args([
                "serve",
                "--service",
                service,
                "--version",
                version,
                "--pod",
                &pod.name,
                "--listen",
                "[::]:8080",
            ])
            .args(extra),
    );
}

/// Runs the demo app's client in `pod` with `args`; (success, stdout, stderr).
fn app(pod: &Pod, args: &[&str]) -> (bool, String, String) {
    let mut cmd = Command::new(binary("trellis-demo-app"));
    cmd.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
    let out = pod.spawn_app(&mut cmd).unwrap().wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn service(name: &str, vip: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: shop}}\n\
         spec: {{clusterIP: {vip}, selector: {{app: {name}}}, ports: [{{name: http, port: 80, targetPort: 8080}}]}}\n"
    )
}

const FLAKY: &str = "10.96.0.21";
const SLOW: &str = "10.96.0.22";
const PAIR: &str = "10.96.0.23";

/// client on node 1; web v1 on node 1 and v2 on node 2 behind one HTTP service; on node 2 also
/// `flaky` (every other answer a 503) and `slow` (answers after 2 s), each its own service; and
/// `pair`: a good pod on node 1, one answering only 500s on node 2.
struct Web {
    agents: Vec<Agent>,
    control: Control,
    client: Pod,
    /// web-v1, web-v2, flaky, slow, pair-good, pair-bad.
    pods: Vec<Pod>,
    cluster: Cluster,
}

impl Web {
    fn start() -> Self {
        let cluster = Cluster::new(2);
        let (n1, n2) = (&cluster.nodes[0], &cluster.nodes[1]);
        let client = n1.add_pod("client");
        let v1 = n1.add_pod("web-v1");
        let v2 = n2.add_pod("web-v2");
        let flaky = n2.add_pod("flaky");
        let slow = n2.add_pod("slow");
        let good = n1.add_pod("pair-good");
        let bad = n2.add_pod("pair-bad");
        serve(&v1, "v1");
        serve(&v2, "v2");
        serve_with(
            &flaky,
            "flaky",
            "v1",
            &["--fail-percent", "50", "--fail-status", "503"],
        );
        serve_with(&slow, "slow", "v1", &["--delay-ms", "2000"]);
        serve_with(&good, "pair", "good", &[]);
        serve_with(
            &bad,
            "pair",
            "bad",
            &["--fail-percent", "100", "--fail-status", "500"],
        );
        let control = Control::start(
            &cluster,
            &[
                (
                    "ns.yaml",
                    "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {trellis.dev/mesh: enabled}}\n",
                ),
                ("client.yaml", &pod_yaml(&client, n1, "client", "v1")),
                ("v1.yaml", &pod_yaml(&v1, n1, "web", "v1")),
                ("v2.yaml", &pod_yaml(&v2, n2, "web", "v2")),
                ("flaky.yaml", &pod_yaml(&flaky, n2, "flaky", "v1")),
                ("slow.yaml", &pod_yaml(&slow, n2, "slow", "v1")),
                ("svc-flaky.yaml", &service("flaky", FLAKY)),
                ("svc-slow.yaml", &service("slow", SLOW)),
                ("good.yaml", &pod_yaml(&good, n1, "pair", "good")),
                ("bad.yaml", &pod_yaml(&bad, n2, "pair", "bad")),
                ("svc-pair.yaml", &service("pair", PAIR)),
                (
                    "svc.yaml",
                    &format!(
                        "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: shop}}\n\
                         spec: {{clusterIP: {VIP}, selector: {{app: web}}, ports: [{{name: http, port: 80, targetPort: 8080}}]}}\n"
                    ),
                ),
            ],
        );
        let agents = vec![
            // The access log (one line per request, with its trace span) helps read failures.
            // Thread per core (the default) on the client's node, with more workers than this
            // host has cores, so connections and their pooled HBONE connections are spread over
            // them.
            Agent::start_with_control_and(n1, &control, &["--access-log", "--worker-threads", "3"]),
            // One worker thread runs the agent on tokio's current-thread scheduler, a runtime
            // of its own: every request here crosses both kinds.
            Agent::start_with_control_and(n2, &control, &["--access-log", "--worker-threads", "1"]),
        ];
        agents[0].wait_pod_state(&client, "enrolled");
        agents[1].wait_pod_state(&v2, "enrolled");
        for (agent, want) in [(&agents[0], 3), (&agents[1], 4)] {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
            while !agent.admin("/certificates").is_ok_and(|(_, b)| {
                serde_json::from_str::<Vec<serde_json::Value>>(&b).is_ok_and(|c| c.len() >= want)
            }) {
                assert!(std::time::Instant::now() < deadline, "{}", agent.log_text());
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
        }
        Self {
            agents,
            control,
            client,
            pods: vec![v1, v2, flaky, slow, good, bad],
            cluster,
        }
    }
}

#[test]
fn keep_alive_requests_are_balanced_one_by_one_and_carry_the_callers_identity() {
    let web = Web::start();
    let (ok, out, err) = app(
        &web.client,
        &["get", &format!("http://{VIP}:80/"), "--count", "10"],
    );
    assert!(ok, "{err}\n{}", web.agents[0].log_text());
    let bodies: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    let versions: Vec<&str> = bodies
        .iter()
        .map(|b| b["version"].as_str().unwrap())
        .collect();
    // One client connection, ten requests, alternating endpoints: balanced per request.
    assert_eq!(
        versions.iter().filter(|v| **v == "v1").count(),
        5,
        "{versions:?}"
    );
    assert_eq!(
        versions.iter().filter(|v| **v == "v2").count(),
        5,
        "{versions:?}"
    );
    assert!(
        versions.windows(2).all(|w| w[0] != w[1]),
        "not round robin: {versions:?}"
    );
    for b in &bodies {
        assert_eq!(
            b["client_identity"], "spiffe://cluster.local/ns/shop/sa/client",
            "{b}"
        );
    }
    // The client's node saw one connection and proxied it as HTTP.
    web.agents[0].wait_log("the HTTP capture", |v| {
        v["message"] == "connection captured" && v["protocol"] == "http"
    });
}

#[test]
fn a_keep_alive_connection_outlives_the_apps_idle_timeout() {
    let web = Web::start();
    // The demo app closes a connection idle for 5 s. Three requests 5.5 s apart on one client
    // connection (alternating versions by round robin): the third finds the first one's app
    // connection closed, and the server's proxy connects to the app again instead of failing.
    let (ok, out, err) = app(
        &web.client,
        &[
            "get",
            &format!("http://{VIP}:80/"),
            "--count",
            "3",
            "--pause-ms",
            "5500",
        ],
    );
    assert!(ok, "{err}\n{}", web.agents[0].log_text());
    let bodies: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(bodies.len(), 3, "{out}");
    assert_eq!(bodies[0]["pod"], bodies[2]["pod"], "{out}");
    assert_ne!(bodies[0]["pod"], bodies[1]["pod"], "{out}");
    // The app saw a new connection (another source port) for the third request.
    assert_ne!(bodies[0]["client"], bodies[2]["client"], "{out}");
}

#[test]
fn malformed_requests_get_400_and_the_connection_closes() {
    let web = Web::start();
    for garbage in [
        "NOT HTTP AT ALL\\r\\n\\r\\n",
        "GET / HTTP/1.1\\r\\nbad header line\\r\\n\\r\\n",
    ] {
        let (ok, out, err) = app(&web.client, &["raw", &format!("{VIP}:80"), garbage]);
        assert!(ok, "{garbage}: {err}");
        let back: String = serde_json::from_str(&out).unwrap();
        assert!(back.starts_with("HTTP/1.1 400"), "{garbage}: {back:?}");
    }
    // HTTP/2: the preface, then bytes that are no frame. The proxy answers its SETTINGS, then a
    // GOAWAY (frame type 7, stream 0) and closes.
    let preface_then_garbage =
        "PRI * HTTP/2.0\\r\\n\\r\\nSM\\r\\n\\r\\nnot a frame at all, not at all";
    let (ok, out, err) = app(
        &web.client,
        &["raw", &format!("{VIP}:80"), preface_then_garbage],
    );
    assert!(ok, "{err}");
    let back: String = serde_json::from_str(&out).unwrap();
    assert!(
        back.contains("\0\0\u{8}\u{7}\0\0\0\0\0"),
        "no GOAWAY: {back:?}"
    );
    // The proxy is unharmed: a good request right after works.
    let (ok, out, err) = app(&web.client, &["get", &format!("http://{VIP}:80/")]);
    assert!(ok, "{err}");
    assert!(out.contains("\"service\":\"web\""), "{out}");
}

/// The traffic-management guide's examples (docs/traffic-management.md), applied as they are.
macro_rules! example {
    ($file:literal) => {
        include_str!(concat!("../../docs/examples/traffic/", $file))
    };
}
const DR: &str = example!("web-subsets.yaml");

fn vs(http: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: web, namespace: shop}}\n\
         spec: {{hosts: [web], http: [{http}]}}\n"
    )
}

/// `count` requests on one connection from the client; the bodies.
fn requests(web: &Web, count: usize, headers: &[&str]) -> Vec<serde_json::Value> {
    let url = format!("http://{VIP}:80/");
    let count = count.to_string();
    let mut args = vec!["get", url.as_str(), "--count", count.as_str()];
    for h in headers {
        args.extend(["--header", h]);
    }
    let (ok, out, err) = app(&web.client, &args);
    assert!(ok, "{err}\n{}", web.agents[0].log_text());
    match serde_json::from_str(&out).unwrap() {
        serde_json::Value::Array(a) => a,
        one => vec![one],
    }
}

fn versions(bodies: &[serde_json::Value]) -> (usize, usize) {
    let n = |v: &str| bodies.iter().filter(|b| b["version"] == v).count();
    (n("v1"), n("v2"))
}

/// Polls `ok` every 0.1 s for up to 10 s (until new config has reached the client's node);
/// fails naming `what`, with the client node agent's log.
fn eventually(web: &Web, what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !ok() {
        assert!(
            std::time::Instant::now() < deadline,
            "never: {what}\n{}",
            web.agents[0].log_text()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// Polls until `ok` holds for a fresh batch of requests.
fn until(web: &Web, what: &str, headers: &[&str], ok: impl Fn(&[serde_json::Value]) -> bool) {
    eventually(web, what, || ok(&requests(web, 20, headers)));
}

#[test]
fn canary_weights_split_traffic_and_change_without_failing_a_request() {
    let web = Web::start();
    web.control.write("dr.yaml", DR);
    web.control
        .write("vs.yaml", example!("web-canary-0-100.yaml"));
    until(&web, "all to v2", &[], |b| versions(b) == (0, 20));
    web.control
        .write("vs.yaml", example!("web-canary-80-20.yaml"));
    until(&web, "some to v1", &[], |b| versions(b).0 > 0);

    // 80/20 over 2000 requests: 20% ± 3% to v2.
    let bodies = requests(&web, 2000, &[]);
    let (v1, v2) = versions(&bodies);
    assert_eq!(v1 + v2, 2000);
    let share = v2 as f64 / 2000.0;
    println!(
        "80/20 canary: {v1} to v1, {v2} to v2 ({:.1}%)",
        share * 100.0
    );
    assert!((0.17..=0.23).contains(&share), "v2 got {v2} of 2000");

    // Weights to 0/100 while requests flow: none fails, and within 1 s all go to v2.
    let url = format!("http://{VIP}:80/");
    let mut cmd = Command::new(binary("trellis-demo-app"));
    cmd.args(["get", &url, "--count", "4000"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let run = web.client.spawn_app(&mut cmd).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1000));
    let changed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    web.control
        .write("vs.yaml", example!("web-canary-0-100.yaml"));
    let out = run.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "a request failed across the change: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bodies: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let at = |b: &serde_json::Value| b["at_ms"].as_u64().unwrap();
    let before = bodies.iter().filter(|b| at(b) < changed).count();
    let after: Vec<&serde_json::Value> = bodies.iter().filter(|b| at(b) > changed + 1000).collect();
    assert!(
        before > 50 && after.len() > 50,
        "the run did not span the change: {before} before, {} after",
        after.len()
    );
    let late_v1 = after.iter().filter(|b| b["version"] == "v1").count();
    assert_eq!(
        late_v1, 0,
        "{late_v1} requests went to v1 more than 1 s after the change"
    );
}

#[test]
fn header_routes_send_jason_to_v2_and_everyone_else_to_v1() {
    let web = Web::start();
    web.control.write("dr.yaml", DR);
    web.control
        .write("vs.yaml", example!("web-header-route.yaml"));
    until(&web, "jason to v2", &["end-user: jason"], |b| {
        versions(b) == (0, 20)
    });
    assert_eq!(versions(&requests(&web, 50, &[])), (50, 0));
    assert_eq!(versions(&requests(&web, 50, &["end-user: jason"])), (0, 50));
    assert_eq!(versions(&requests(&web, 50, &["end-user: mary"])), (50, 0));

    // Only the header route: everyone else has no route (Istio answers 404).
    web.control.write(
        "vs.yaml",
        &vs("{match: [{headers: {end-user: {exact: jason}}}], route: [{destination: {host: web, subset: v2}}]}"),
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let (ok, _, err) = app(&web.client, &["get", &format!("http://{VIP}:80/")]);
        if !ok {
            assert!(err.contains("404"), "{err}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no 404 without a matching route"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// `count` requests to `url` from the client, whatever they answer: (statuses, latencies in ms).
fn tally(
    web: &Web,
    url: &str,
    count: usize,
) -> (std::collections::BTreeMap<String, u64>, Vec<u64>) {
    let (ok, out, err) = app(&web.client, &["tally", url, "--count", &count.to_string()]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    (
        serde_json::from_value(v["statuses"].clone()).unwrap(),
        serde_json::from_value(v["ms"].clone()).unwrap(),
    )
}

/// Polls `url` until its answer satisfies `ok` (the route reached the client's node).
fn until_answer(
    web: &Web,
    url: &str,
    what: &str,
    ok: impl Fn(&std::collections::BTreeMap<String, u64>) -> bool,
) {
    eventually(web, what, || ok(&tally(web, url, 4).0));
}

#[test]
fn retries_hide_a_flaky_endpoint_and_timeouts_cut_a_slow_one() {
    let web = Web::start();
    let flaky = format!("http://{FLAKY}:80/");
    // Without retries, half the answers are 503s.
    let (statuses, _) = tally(&web, &flaky, 200);
    let good = statuses.get("200").copied().unwrap_or(0);
    println!("flaky without retries: {statuses:?}");
    assert!((80..=120).contains(&good), "{statuses:?}");
    // attempts 3 on 5xx: the client sees (nearly) only successes.
    web.control
        .write("vs-flaky.yaml", example!("flaky-retries.yaml"));
    until_answer(&web, &flaky, "retries in force", |s| {
        s.get("200") == Some(&4)
    });
    let (statuses, _) = tally(&web, &flaky, 200);
    println!("flaky with 3 retries on 5xx: {statuses:?}");
    assert!(
        statuses.get("200").copied().unwrap_or(0) >= 198,
        "{statuses:?}"
    );

    // timeout 0.5 s against a 2 s upstream: 504 after 0.5 s (± 0.1 s).
    let slow = format!("http://{SLOW}:80/");
    web.control
        .write("vs-slow.yaml", example!("slow-timeout.yaml"));
    until_answer(&web, &slow, "the timeout in force", |s| {
        s.get("504").is_some()
    });
    let (statuses, ms) = tally(&web, &slow, 3);
    assert_eq!(statuses.get("504"), Some(&3), "{statuses:?}");
    assert!(
        ms.iter().all(|m| (400..=600).contains(m)),
        "504 after {ms:?} ms"
    );
}

/// How many requests the web pods have served, asked of each pod directly.
fn served(web: &Web) -> u64 {
    served_by(web, &web.pods[..2])
}

fn served_by(web: &Web, pods: &[Pod]) -> u64 {
    pods.iter()
        .map(|p| {
            let (ok, out, err) = app(
                &web.client,
                &["get", &format!("http://{}:8080/count", p.ip4)],
            );
            assert!(ok, "{err}");
            serde_json::from_str::<serde_json::Value>(&out).unwrap()["served"]
                .as_u64()
                .unwrap()
        })
        .sum()
}

#[test]
fn injected_faults_delay_and_abort_requests() {
    let web = Web::start();
    let url = format!("http://{VIP}:80/");
    let (_, plain) = tally(&web, &url, 5);
    web.control
        .write("vs.yaml", example!("web-fault-delay.yaml"));
    until_answer(&web, &url, "the delay in force", |_| true);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let delayed = loop {
        let (statuses, ms) = tally(&web, &url, 5);
        if ms.iter().all(|m| *m >= 300) {
            assert_eq!(statuses.get("200"), Some(&5), "{statuses:?}");
            break ms;
        }
        assert!(std::time::Instant::now() < deadline, "no delay: {ms:?}");
    };
    println!("latency without fault {plain:?} ms, with a 300 ms delay {delayed:?} ms");

    web.control
        .write("vs.yaml", example!("web-fault-abort.yaml"));
    until_answer(&web, &url, "the abort in force", |s| {
        s.get("418") == Some(&4)
    });
    let before = served(&web);
    let (statuses, _) = tally(&web, &url, 20);
    assert_eq!(statuses.get("418"), Some(&20), "{statuses:?}");
    assert_eq!(served(&web), before, "an aborted request reached the app");
    let aborted = requests_metric(&web, &[("response_code", "418"), ("response_flags", "FI")]);
    assert!(aborted >= 20.0, "{aborted} aborts in istio_requests_total");
}

#[test]
fn routes_rewrite_the_path_and_host_and_edit_headers_both_ways() {
    let web = Web::start();
    web.control
        .write("vs.yaml", example!("web-rewrite-headers.yaml"));
    let request = "GET /api/items?page=2 HTTP/1.1\\r\\nhost: web\\r\\nx-debug: 1\\r\\nconnection: close\\r\\n\\r\\n";
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let back = loop {
        let (ok, out, err) = app(&web.client, &["raw", &format!("{VIP}:80"), request]);
        assert!(ok, "{err}");
        let back: String = serde_json::from_str(&out).unwrap();
        if back.contains("x-served-by: trellis") {
            break back;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "route never applied: {back}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    let (head, body) = back.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        !head.to_ascii_lowercase().contains("content-type"),
        "not removed: {head}"
    );
    let body: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(body["path"], "/v1/items?page=2", "{body}");
    assert_eq!(body["headers"]["host"], "web.internal", "{body}");
    assert_eq!(body["headers"]["x-trellis-route"], "api", "{body}");
    assert!(body["headers"].get("x-debug").is_none(), "{body}");
    // Outside the matched prefix there is no route: 404.
    let (ok, _, err) = app(&web.client, &["get", &format!("http://{VIP}:80/other")]);
    assert!(!ok && err.contains("404"), "{err}");
}

/// The sum of `istio_requests_total` samples on node 1 (the client's, reporter `source`) whose
/// labels include all of `labels`.
fn requests_metric(web: &Web, labels: &[(&str, &str)]) -> f64 {
    let (code, text) = trellis_e2e::sys::http_get(
        &web.cluster.nodes[0].name,
        "127.0.0.1:15020".parse().unwrap(),
        "/metrics",
    )
    .unwrap();
    assert_eq!(code, 200);
    text.lines()
        .filter(|l| l.starts_with("istio_requests_total{"))
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn a_full_connection_pool_answers_503_overflow_and_metrics_count_it() {
    let web = Web::start();
    web.control
        .write("dr-slow.yaml", example!("slow-connection-pool.yaml"));
    let slow = format!("{SLOW}:80");
    let burst = |n: usize| -> Vec<String> {
        let children: Vec<_> = (0..n)
            .map(|_| {
                let mut cmd = Command::new(binary("trellis-demo-app"));
                cmd.args([
                    "raw",
                    &slow,
                    "GET / HTTP/1.1\\r\\nhost: slow\\r\\nconnection: close\\r\\n\\r\\n",
                ])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
                web.client.spawn_app(&mut cmd).unwrap()
            })
            .collect();
        children
            .into_iter()
            .map(|c| {
                let out = c.wait_with_output().unwrap();
                serde_json::from_slice::<String>(&out.stdout).unwrap_or_default()
            })
            .collect()
    };
    // Wait until the client's node holds the limit (its admin endpoint shows it): a burst
    // straddling the change would mix limited and unlimited requests.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    while !web.agents[0]
        .admin("/config_dump")
        .is_ok_and(|(_, b)| b.contains("\"max_active\": 1"))
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the pool limit never arrived"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let answers = burst(20);
    let overflows = answers
        .iter()
        .filter(|a| a.starts_with("HTTP/1.1 503") && a.contains("x-trellis-overflow: 1"))
        .count();
    let served = answers
        .iter()
        .filter(|a| a.starts_with("HTTP/1.1 200"))
        .count();
    println!(
        "20 concurrent requests, maxConnections 1, http1MaxPendingRequests 1: {served} served, {overflows} overflowed"
    );
    // One in flight and one queued get through; the rest overflow.
    assert!((1..=2).contains(&served), "{served} served: {answers:?}");
    assert!(overflows >= 17, "{overflows} overflows: {answers:?}");
    let counted = requests_metric(&web, &[("response_code", "503"), ("response_flags", "UO")]);
    assert!(
        counted >= overflows as f64,
        "{counted} overflows in istio_requests_total"
    );
}

#[test]
fn outlier_detection_ejects_a_failing_pod_and_lets_it_back_after_the_ejection_time() {
    let web = Web::start();
    let pair = format!("http://{PAIR}:80/");
    web.control
        .write("dr-pair.yaml", example!("pair-outlier-detection.yaml"));
    // Until the rule is in force, round robin keeps sending every other request to the bad pod.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        let (statuses, _) = tally(&web, &pair, 20);
        // Three 500s in a row eject it for 3 s: the rest of the batch all succeeds.
        if statuses.get("500").copied().unwrap_or(0) <= 3
            && statuses.get("200").copied().unwrap_or(0) >= 17
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never ejected: {statuses:?}\n{}",
            web.agents[0].log_text()
        );
        std::thread::sleep(std::time::Duration::from_millis(3500));
    }
    let (statuses, _) = tally(&web, &pair, 20);
    assert_eq!(
        statuses.get("200"),
        Some(&20),
        "while ejected: {statuses:?}"
    );
    web.agents[0].wait_log("the ejection", |v| v["message"] == "outlier ejected");
    // After baseEjectionTime (3 s, then 6 s for a second ejection) the pod gets traffic again.
    std::thread::sleep(std::time::Duration::from_millis(6500));
    let (statuses, _) = tally(&web, &pair, 4);
    assert!(
        statuses.get("500").copied().unwrap_or(0) >= 1,
        "never back: {statuses:?}"
    );
}

#[test]
fn consistent_hash_keeps_each_user_on_one_endpoint() {
    let web = Web::start();
    web.control
        .write("dr.yaml", example!("web-consistent-hash.yaml"));
    // Round robin alternates; once hashing is in force one user sees one version only.
    until(&web, "hashing in force", &["x-user: alice"], |b| {
        versions(b).0.is_multiple_of(20)
    });
    let mut seen = std::collections::BTreeSet::new();
    for user in ["alice", "bob", "carol", "dave", "erin", "frank"] {
        let (v1, v2) = versions(&requests(&web, 10, &[&format!("x-user: {user}")]));
        assert!(
            v1 == 10 || v2 == 10,
            "{user} moved between endpoints: {v1} v1, {v2} v2"
        );
        seen.insert(v1 == 10);
    }
    assert_eq!(seen.len(), 2, "six users all hashed to one endpoint");
}

const GREETER: &str = "10.96.0.24";

/// Runs the gRPC app's client in the client pod; the replies, or the error.
fn grpc(web: &Web, call: &[&str], headers: &[&str]) -> Result<Vec<serde_json::Value>, String> {
    let mut cmd = Command::new(binary("trellis-grpc-app"));
    cmd.args(["call", &format!("http://{GREETER}:9090")])
        .args(call)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for h in headers {
        cmd.args(["--header", h]);
    }
    let out = web
        .client
        .spawn_app(&mut cmd)
        .unwrap()
        .wait_with_output()
        .unwrap();
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    Ok(serde_json::from_slice(&out.stdout).unwrap())
}

#[test]
fn grpc_unary_and_streaming_calls_are_routed_by_header() {
    let web = Web::start();
    // A gRPC server (h2c) beside the web app in web-v1 (node 1) and web-v2 (node 2).
    for (pod, version) in [(&web.pods[0], "v1"), (&web.pods[1], "v2")] {
        pod.start_app(Command::new(binary("trellis-grpc-app")).args([
            "serve",
            "--version",
            version,
            "--pod",
            &pod.name,
            "--listen",
            "[::]:9090",
        ]));
    }
    web.control.write(
        "svc-greeter.yaml",
        &format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: greeter, namespace: shop}}\n\
             spec: {{clusterIP: {GREETER}, selector: {{app: web}}, ports: [{{name: grpc, port: 9090}}]}}\n"
        ),
    );
    web.control
        .write("greeter.yaml", example!("greeter-header-route.yaml"));
    let versions = |replies: &[serde_json::Value]| -> Vec<String> {
        replies
            .iter()
            .map(|r| r["version"].as_str().unwrap_or_default().to_owned())
            .collect()
    };
    // Until the route is in force, calls are balanced over both versions.
    eventually(&web, "the gRPC route in force", || {
        (0..6).all(|_| grpc(&web, &["hello"], &[]).is_ok_and(|r| versions(&r) == ["v1"]))
    });
    let jason = ["end-user: jason"];
    for (headers, want) in [(&[][..], "v1"), (&jason[..], "v2")] {
        // Unary, server streaming and bidirectional streaming, each several times.
        for _ in 0..3 {
            let hello = grpc(&web, &["hello"], headers).unwrap();
            assert_eq!(versions(&hello), [want], "{headers:?}: {hello:?}");
            assert_eq!(
                hello[0]["client_identity"], "spiffe://cluster.local/ns/shop/sa/client",
                "{hello:?}"
            );
            let count = grpc(&web, &["count", "50"], headers).unwrap();
            assert_eq!(count.len(), 50, "{count:?}");
            assert!(versions(&count).iter().all(|v| v == want), "{count:?}");
            assert!(
                count.iter().enumerate().all(|(i, r)| r["seq"] == i),
                "out of order: {count:?}"
            );
            let chat = grpc(&web, &["chat", "20"], headers).unwrap();
            assert_eq!(chat.len(), 20, "{chat:?}");
            assert!(versions(&chat).iter().all(|v| v == want), "{chat:?}");
            assert!(
                chat.iter()
                    .enumerate()
                    .all(|(i, r)| r["message"] == format!("hello {i}")),
                "{chat:?}"
            );
        }
    }
    // Calls after the first to v2 (on the other node) went straight on the HBONE connection,
    // without a tunnel (hbone::DIRECT); the streams and the caller's identity above held.
    web.agents[1].wait_log("gRPC requests without a tunnel", |v| {
        v["message"] == "HBONE requests without a tunnel"
            && v["orig_dst"].as_str().is_some_and(|d| d.ends_with(":9090"))
    });
    // Metrics call them gRPC: 3 rounds of 3 calls to v2 (a stream counts once).
    let grpc_calls = requests_metric(
        &web,
        &[("request_protocol", "grpc"), ("destination_version", "v2")],
    );
    assert!(grpc_calls >= 9.0, "{grpc_calls} gRPC calls to v2 counted");
}

#[test]
fn many_short_connections_do_not_exhaust_the_tunnels() {
    let web = Web::start();
    // More connections than one HTTP/2 connection's concurrent streams (200): each must release
    // its HBONE stream when it ends.
    for i in 0..300 {
        let (ok, _, err) = app(&web.client, &["get", &format!("http://{VIP}:80/")]);
        assert!(ok, "request {i}: {err}");
    }
}

#[test]
fn trace_context_is_continued_or_started_and_each_request_is_a_span() {
    let web = Web::start();
    // No trace context: the proxy starts a trace, and the app sees it.
    let body = requests(&web, 1, &[]).remove(0);
    let started = body["headers"]["traceparent"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let parts: Vec<&str> = started.split('-').collect();
    assert!(
        parts.len() == 4 && parts[0] == "00" && parts[1].len() == 32 && parts[2].len() == 16,
        "{body}"
    );
    // A caller's trace is continued: same trace id, a new span id for the proxy's hop;
    // tracestate and B3 pass through as they were.
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let sent = [
        "traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "tracestate: congo=t61rcWkgMzE",
        "x-b3-traceid: 463ac35c9f6413ad48485a3953bb6124",
        "x-b3-spanid: a2fb4a1d1a96d312",
        "x-b3-sampled: 1",
    ];
    let body = requests(&web, 1, &sent).remove(0);
    let h = &body["headers"];
    let tp = h["traceparent"].as_str().unwrap_or_default();
    assert!(tp.starts_with(&format!("00-{trace_id}-")), "{body}");
    assert!(
        !tp.contains("00f067aa0ba902b7"),
        "the proxy's hop needs its own span id: {tp}"
    );
    assert_eq!(h["tracestate"], "congo=t61rcWkgMzE");
    assert_eq!(h["x-b3-traceid"], "463ac35c9f6413ad48485a3953bb6124");
    assert_eq!(h["x-b3-spanid"], "a2fb4a1d1a96d312");
    // The client's node logged the request as a span of that trace, its parent the caller's
    // (web-v1 is on that node too: its destination side logs the same trace, as the child).
    let line = web.agents[0].wait_log("the request's span", |v| {
        v["message"] == "http request"
            && v["reporter"] == "source"
            && v.to_string().contains(trace_id)
    });
    assert!(line.to_string().contains("00f067aa0ba902b7"), "{line}");
    assert_eq!(line["status"], 200, "{line}");
}

#[test]
fn mirrored_requests_reach_the_shadow_and_its_answers_are_ignored() {
    let web = Web::start();
    let pair = &web.pods[4..6];
    web.control.write("vs.yaml", example!("web-mirror.yaml"));
    let url = format!("http://{VIP}:80/");
    // Until the route arrives, pair serves nothing.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while served_by(&web, pair) == 0 {
        assert_eq!(tally(&web, &url, 1).0.get("200"), Some(&1));
        assert!(std::time::Instant::now() < deadline, "nothing mirrored");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let before = served_by(&web, pair);
    // pair's bad pod answers 500 to half the copies: the callers never see it.
    let (statuses, _) = tally(&web, &url, 20);
    assert_eq!(statuses.get("200"), Some(&20), "{statuses:?}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while served_by(&web, pair) < before + 20 {
        assert!(
            std::time::Instant::now() < deadline,
            "{} of 20 copies arrived",
            served_by(&web, pair) - before
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[test]
fn upgrades_pass_through_both_proxies() {
    let web = Web::start();
    let request = "GET /chat HTTP/1.1\\r\\nhost: web\\r\\nconnection: upgrade\\r\\nupgrade: echo\\r\\n\\r\\nhello over the upgraded stream";
    let (ok, out, err) = app(&web.client, &["raw", &format!("{VIP}:80"), request]);
    assert!(ok, "{err}");
    let back: String = serde_json::from_str(&out).unwrap();
    assert!(back.starts_with("HTTP/1.1 101"), "{back:?}");
    assert!(back.ends_with("hello over the upgraded stream"), "{back:?}");
}

#[test]
fn requests_to_a_pod_on_the_same_node_skip_hbone_but_keep_identity_policy_and_metrics() {
    let web = Web::start();
    let client_id = "spiffe://cluster.local/ns/shop/sa/client";
    // Half of these go to web-v1, on the client's node, half to web-v2 across.
    let bodies = requests(&web, 20, &[]);
    assert_eq!(versions(&bodies), (10, 10), "{bodies:?}");
    for b in &bodies {
        assert_eq!(b["client_identity"], client_id, "{b}");
    }
    // web-v1's destination side took them in the client's agent, from the client's identity...
    let taken = web.agents[0].wait_log("the local HTTP stream", |v| {
        v["message"] == "local HTTP stream" && v["client_identity"] == client_id
    });
    assert_eq!(taken["pod"], "shop/web-v1", "{taken}");
    // So does a request to web-v1's HTTP port by its own address, which the client's side
    // splices as TCP: the destination's proxy serves it from the captured client's port.
    let v1 = &web.pods[0];
    let by_address = format!("{}:8080", v1.ip4);
    let (ok, out, err) = app(&web.client, &["get", &format!("http://{by_address}/")]);
    assert!(ok, "{err}\n{}", web.agents[0].log_text());
    let body: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(body["client_identity"], client_id, "{body}");
    let taken = web.agents[0].wait_log("the local HTTP stream by address", |v| {
        v["message"] == "local HTTP stream"
            && v["orig_dst"] == by_address
            && v["client"] != format!("{}:0", web.client.ip4)
    });
    assert_eq!(taken["client_identity"], client_id, "{taken}");
    // ...all without an HBONE connection to web-v1, while the one to node 2 is there.
    assert!(v1.hbone_sockets().is_empty(), "{:?}", v1.hbone_sockets());
    assert!(!web.client.hbone_sockets().is_empty());
    // Both reporters count web-v1's requests between the two identities, as across nodes.
    for reporter in ["source", "destination"] {
        let counted = requests_metric(
            &web,
            &[
                ("reporter", reporter),
                ("source_principal", client_id),
                (
                    "destination_principal",
                    "spiffe://cluster.local/ns/shop/sa/web",
                ),
                ("destination_version", "v1"),
                ("connection_security_policy", "mutual_tls"),
                ("response_code", "200"),
            ],
        );
        assert!(counted >= 10.0, "{reporter}: {counted}");
    }
    // web-v1's policies decide each request with the caller's identity.
    web.control.write(
        "deny-private.yaml",
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
         metadata: {name: deny-private, namespace: shop}\n\
         spec: {selector: {matchLabels: {app: web}}, action: DENY, rules: [{from: [{source: {principals: [cluster.local/ns/shop/sa/client]}}], to: [{operation: {paths: [/private]}}]}]}\n",
    );
    let only = |code: &str| std::collections::BTreeMap::from([(code.to_owned(), 10)]);
    eventually(&web, "the policy in force on both nodes", || {
        tally(&web, &format!("http://{VIP}:80/private"), 10).0 == only("403")
    });
    assert_eq!(tally(&web, &format!("http://{VIP}:80/"), 10).0, only("200"));
    web.agents[0].wait_log("web-v1's denial", |v| {
        v["message"] == "denied by AuthorizationPolicy"
            && v["pod"] == "shop/web-v1"
            && v["client_identity"] == client_id
            && v["policy"] == "shop/deny-private"
    });
}

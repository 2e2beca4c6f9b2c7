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
    let mut cmd = Command::new(binary("trellis-demo-app"));
    cmd.args([
        "serve",
        "--service",
        "web",
        "--version",
        version,
        "--pod",
        &pod.name,
        "--listen",
        "[::]:8080",
    ])
    .stdout(Stdio::piped());
    let mut child = pod.spawn_app(&mut cmd).expect("starting the demo app");
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(line.trim(), "ready");
    // Killed with the pod's cgroup.
    std::mem::forget(child);
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

/// client on node 1; web v1 on node 1 and v2 on node 2 behind one HTTP service.
struct Web {
    agents: Vec<Agent>,
    _control: Control,
    client: Pod,
    _pods: Vec<Pod>,
    _cluster: Cluster,
}

impl Web {
    fn start() -> Self {
        let cluster = Cluster::new(2);
        let (n1, n2) = (&cluster.nodes[0], &cluster.nodes[1]);
        let client = n1.add_pod("client");
        let v1 = n1.add_pod("web-v1");
        let v2 = n2.add_pod("web-v2");
        serve(&v1, "v1");
        serve(&v2, "v2");
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
            Agent::start_with_control(n1, &control),
            Agent::start_with_control(n2, &control),
        ];
        agents[0].wait_pod_state(&client, "enrolled");
        agents[1].wait_pod_state(&v2, "enrolled");
        for (agent, want) in [(&agents[0], 2), (&agents[1], 1)] {
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
            _control: control,
            client,
            _pods: vec![v1, v2],
            _cluster: cluster,
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
    // The proxy is unharmed: a good request right after works.
    let (ok, out, err) = app(&web.client, &["get", &format!("http://{VIP}:80/")]);
    assert!(ok, "{err}");
    assert!(out.contains("\"service\":\"web\""), "{out}");
}

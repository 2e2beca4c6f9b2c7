//! The shop the mesh tests run on: two nodes with an agent each, control in dir mode, a client
//! and a server in the mesh namespace `shop` and an outsider in `legacy`; with helpers to drive
//! and observe it. Shared by several test crates, each of which uses part of it.
#![allow(dead_code)]

use std::{
    net::{IpAddr, SocketAddr},
    process::{Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use trellis_e2e::{Agent, Cluster, Node, Pod, control::Control, node::binary, sys};

pub const VIP: &str = "10.96.0.10";
pub const TD: &str = "cluster.local";

pub fn addr(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

pub fn spiffe(ns: &str, sa: &str) -> String {
    format!("spiffe://{TD}/ns/{ns}/sa/{sa}")
}

pub fn namespace(name: &str, mesh: bool) -> String {
    let labels = if mesh {
        "trellis.dev/mesh: enabled"
    } else {
        ""
    };
    format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: {name}, labels: {{{labels}}}}}\n")
}

pub fn pod_yaml(pod: &Pod, ns: &str, node: &Node, sa: &str, app: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {}, namespace: {ns}, uid: {}, labels: {{app: {app}, version: v1}}}}\n\
         spec: {{nodeName: {}, serviceAccountName: {sa}, containers: []}}\n\
         status: {{phase: Running, podIPs: [{{ip: \"{}\"}}, {{ip: \"{}\"}}]}}\n",
        pod.name, pod.uid, node.name, pod.ip4, pod.ip6
    )
}

pub fn service_yaml() -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: server, namespace: shop}}\n\
         spec: {{clusterIP: {VIP}, selector: {{app: server}}, ports: [{{name: tcp-echo, port: 80, targetPort: 8080}}, {{name: tcp-bulk, port: 7000, targetPort: 7000}}, {{name: http, port: 8081, targetPort: 9080}}]}}\n"
    )
}

pub fn peer_auth(mode: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{name: default, namespace: shop}}\n\
         spec: {{mtls: {{mode: {mode}}}}}\n"
    )
}

/// client (node 1) and server (node 2) in the mesh namespace `shop`; outsider (node 1) in
/// `legacy`, outside the mesh. Fields drop in order: agents, control, pods, then the cluster.
pub struct Shop {
    pub agents: Vec<Agent>,
    pub control: Control,
    pub client: Pod,
    pub server: Pod,
    pub outsider: Pod,
    pub cluster: Cluster,
}

impl Shop {
    pub fn start() -> Self {
        Self::start_on(2, &[])
    }

    /// As `start`, on `nodes` nodes (past the second have no agent), control run with `args`.
    pub fn start_on(nodes: u8, args: &[&str]) -> Self {
        Self::start_with(nodes, args, &[])
    }

    /// As `start_on`, the agents run with `agent_args`.
    pub fn start_with(nodes: u8, args: &[&str], agent_args: &[&str]) -> Self {
        let cluster = Cluster::new(nodes);
        let (n1, n2) = (&cluster.nodes[0], &cluster.nodes[1]);
        let client = n1.add_pod("client");
        let outsider = n1.add_pod("outsider");
        let server = n2.add_pod("server");
        client.serve(8080);
        server.serve(8080);
        serve_bulk(&server);
        serve_http(&server);
        let control = Control::start_with(
            &cluster,
            &[
                ("ns-shop.yaml", &namespace("shop", true)),
                ("ns-legacy.yaml", &namespace("legacy", false)),
                (
                    "client.yaml",
                    &pod_yaml(&client, "shop", n1, "client", "client"),
                ),
                (
                    "server.yaml",
                    &pod_yaml(&server, "shop", n2, "server", "server"),
                ),
                (
                    "outsider.yaml",
                    &pod_yaml(&outsider, "legacy", n1, "outsider", "outsider"),
                ),
                ("svc.yaml", &service_yaml()),
            ],
            args,
        );
        let agents = vec![
            Agent::start_with_control_and(n1, &control, agent_args),
            Agent::start_with_control_and(n2, &control, agent_args),
        ];
        let shop = Self {
            agents,
            control,
            client,
            server,
            outsider,
            cluster,
        };
        shop.agents[0].wait_pod_state(&shop.client, "enrolled");
        shop.agents[1].wait_pod_state(&shop.server, "enrolled");
        wait_certificate(&shop.agents[0], &spiffe("shop", "client"));
        wait_certificate(&shop.agents[1], &spiffe("shop", "server"));
        shop
    }

    /// A gateway pod `name` (app and service account `name`) in the mesh namespace
    /// `trellis-system` on node 2, enrolled and with its certificate.
    pub fn add_gateway(&self, name: &str) -> Pod {
        let node = &self.cluster.nodes[1];
        let gw = node.add_pod(name);
        self.control
            .write("ns-system.yaml", &namespace("trellis-system", true));
        self.control.write(
            &format!("{name}-pod.yaml"),
            &pod_yaml(&gw, "trellis-system", node, name, name),
        );
        self.agents[1].wait_pod_state(&gw, "enrolled");
        wait_certificate(&self.agents[1], &spiffe("trellis-system", name));
        gw
    }

    pub fn logs(&self) -> String {
        format!(
            "node 1 agent:\n{}\nnode 2 agent:\n{}\ncontrol:\n{}",
            self.agents[0].log_text(),
            self.agents[1].log_text(),
            self.control.log_text()
        )
    }

    pub fn vip(&self, port: u16) -> SocketAddr {
        addr(VIP.parse::<IpAddr>().unwrap(), port)
    }

    /// Waits (at most 10 s) until `ok` holds, as config changes reach the proxies
    /// asynchronously; how long it took.
    pub fn eventually(&self, what: &str, mut ok: impl FnMut() -> bool) -> Duration {
        let start = Instant::now();
        while !ok() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "{what}: not within 10 s\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        start.elapsed()
    }
}

/// Captures the link between node 2 and the fabric (tcpdump `filter`) while `f` runs; returns
/// the raw capture.
pub fn capture_link(shop: &Shop, filter: &str, f: impl FnOnce()) -> Vec<u8> {
    trellis_e2e::outside::capture(shop.cluster.fabric(), "n2", filter, f)
}

pub fn serve_bulk(pod: &Pod) {
    pod.start_app(Command::new(binary("trellis-loadgen")).args(["echo-serve", "[::]:7000"]));
}

/// The demo app on 9080: it answers JSON with the client identity the mesh vouched for.
pub fn serve_http(pod: &Pod) {
    pod.start_app(Command::new(binary("trellis-demo-app")).args([
        "serve",
        "--service",
        "server",
        "--pod",
        &pod.name,
        "--listen",
        "[::]:9080",
    ]));
}

/// One GET from `pod` (as its app), with `headers`; the JSON body.
pub fn http_get(pod: &Pod, url: &str, headers: &[&str]) -> serde_json::Value {
    let mut cmd = Command::new(binary("trellis-demo-app"));
    cmd.args(["get", url]);
    for h in headers {
        cmd.args(["--header", h]);
    }
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let out = pod.spawn_app(&mut cmd).unwrap().wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "GET {url} from {}: {}",
        pod.name,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

pub fn wait_certificate(agent: &Agent, identity: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if agent
            .admin("/certificates")
            .is_ok_and(|(_, body)| body.contains(identity))
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no certificate for {identity}:\n{}",
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Sends `bytes` through `from` to `to` (an echo server) and checks every byte came back.
pub fn blast(from: &Pod, to: SocketAddr, bytes: u64) -> serde_json::Value {
    let mut cmd = Command::new(binary("trellis-loadgen"));
    cmd.args(["blast", &to.to_string(), "--bytes", &bytes.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = from.spawn_app(&mut cmd).expect("starting blast");
    let out = child.wait_with_output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(
        |_| serde_json::json!({"ok": false, "stderr": String::from_utf8_lossy(&out.stderr)}),
    );
    v
}

/// Starts, as `from`'s app, a transfer to the echo at `to` far longer than any test waits for
/// (16 GiB, at most 60 s); the caller owns the child.
pub fn long_blast(from: &Pod, to: SocketAddr) -> std::process::Child {
    let mut cmd = Command::new(binary("trellis-loadgen"));
    cmd.args([
        "blast",
        &to.to_string(),
        "--bytes",
        &(16u64 << 30).to_string(),
        "--timeout-secs",
        "60",
    ])
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    from.spawn_app(&mut cmd).expect("starting blast")
}

/// The agent's /metrics on :15020, read from inside its node.
pub fn metrics(node: &Node) -> String {
    let (code, body) = sys::http_get(&node.name, "127.0.0.1:15020".parse().unwrap(), "/metrics")
        .expect("reading /metrics");
    assert_eq!(code, 200, "{body}");
    body
}

/// The value of the first sample of `name` whose labels contain every one of `labels`.
pub fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .find(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// A certificate for `identity` signed by `issuer`, valid from `from` to `until` (relative to
/// now), as an SVID the agent's TLS code can use; `root_pem` is what it trusts.
pub fn svid(
    issuer: &rcgen::Issuer<'_, rcgen::KeyPair>,
    identity: &str,
    from: time::Duration,
    until: time::Duration,
    root_pem: &str,
) -> Arc<trellis_agent::identity::Svid> {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.subject_alt_names = vec![rcgen::SanType::URI(identity.try_into().unwrap())];
    params.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now + from;
    params.not_after = now + until;
    let cert = params.signed_by(&key, issuer).unwrap();
    Arc::new(trellis_agent::identity::Svid {
        identity: identity.to_owned(),
        cert_chain_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        root_pem: root_pem.to_owned(),
        received: std::time::SystemTime::now(),
        not_after: std::time::SystemTime::now() + Duration::from_secs(3600),
    })
}

/// Speaks HBONE to `hbone` from inside `netns` as the holder of `svid`: CONNECT to `target`, then
/// read the app's banner line.
pub async fn hbone_call(
    netns: &str,
    hbone: SocketAddr,
    target: SocketAddr,
    svid: Arc<trellis_agent::identity::Svid>,
) -> Result<String, String> {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use tokio::io::AsyncBufReadExt;
    let tls = trellis_agent::tls::WorkloadTls::new(svid).map_err(|e| e.to_string())?;
    let tcp = sys::connect_in(netns, hbone).map_err(|e| e.to_string())?;
    tcp.set_nonblocking(true).unwrap();
    let tcp = tokio::net::TcpStream::from_std(tcp).unwrap();
    let stream = tokio_rustls::TlsConnector::from(tls.client.clone())
        .connect(trellis_agent::tls::server_name(), tcp)
        .await
        .map_err(|e| format!("TLS: {e}"))?;
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .map_err(|e| format!("HTTP/2: {e}"))?;
    tokio::spawn(conn);
    let req = hyper::Request::builder()
        .method(hyper::Method::CONNECT)
        .uri(target.to_string())
        .body(http_body_util::Empty::<hyper::body::Bytes>::new())
        .unwrap();
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| format!("CONNECT: {e}"))?;
    if resp.status() != 200 {
        return Err(format!("CONNECT answered {}", resp.status()));
    }
    let up = hyper::upgrade::on(resp).await.map_err(|e| e.to_string())?;
    let mut banner = String::new();
    tokio::io::BufReader::new(TokioIo::new(up))
        .read_line(&mut banner)
        .await
        .map_err(|e| format!("reading: {e}"))?;
    Ok(banner)
}

/// `trellis-loadgen churn` from `pod` to `to`: `conns` held connections and a stream of new
/// ones for `secs` seconds. Returns its report.
pub fn churn(pod: &Pod, to: SocketAddr, conns: u32, secs: u32) -> std::process::Child {
    let mut cmd = Command::new(binary("trellis-loadgen"));
    cmd.args([
        "churn",
        &to.to_string(),
        "--conns",
        &conns.to_string(),
        "--duration-secs",
        &secs.to_string(),
    ])
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    pod.spawn_app(&mut cmd).expect("starting churn")
}

pub fn report(child: std::process::Child) -> serde_json::Value {
    let out = child.wait_with_output().unwrap();
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "churn printed {:?} ({e}); stderr {:?}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

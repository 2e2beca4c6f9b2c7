//! End-to-end tests of what a user sees of the mesh's traffic: JSON access logs from both node
//! proxies (and per TCP connection), the admin endpoint's live `tap`, and OTLP traces sent to a
//! collector this test runs (OTLP's gRPC TraceService, in the cluster's fabric namespace) for a
//! user → web → reviews chain across both nodes.
use std::{
    collections::HashMap,
    io::{Read, Write},
    net::SocketAddr,
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    },
    common::v1::any_value::Value as AnyValue,
    trace::v1::{Span, span::SpanKind},
};
use serde_json::Value;
use trellis_e2e::{Agent, Cluster, Node, Pod, agent::ADMIN, control::Control, node::binary, sys};

const WEB: &str = "10.96.0.30";
const REVIEWS: &str = "10.96.0.31";
const COLLECTOR: &str = "10.0.0.254:4317";

/// Spans received, each with the `node_id` of the resource that sent it.
#[derive(Clone, Default)]
struct Collector(Arc<Mutex<Vec<(String, Span)>>>);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.0.lock().unwrap();
        for rs in req.into_inner().resource_spans {
            let node = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|a| a.key == "node_id")
                .and_then(|a| a.value.as_ref()?.value.as_ref())
                .map(|v| match v {
                    AnyValue::StringValue(s) => s.clone(),
                    other => format!("{other:?}"),
                })
                .unwrap_or_default();
            for ss in rs.scope_spans {
                spans.extend(ss.spans.into_iter().map(|s| (node.clone(), s)));
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

impl Collector {
    /// Serves OTLP/gRPC at COLLECTOR in the cluster's fabric; stops with the returned runtime.
    fn start(cluster: &Cluster) -> (Self, tokio::runtime::Runtime) {
        let listener = sys::listen_in(cluster.fabric(), COLLECTOR.parse().unwrap())
            .expect("binding the test collector in the fabric");
        listener.set_nonblocking(true).unwrap();
        let rt = tokio::runtime::Runtime::new().unwrap();
        let collector = Self::default();
        let service = TraceServiceServer::new(collector.clone());
        rt.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await
                .expect("the test collector failed");
        });
        (collector, rt)
    }

    fn spans(&self) -> Vec<(String, Span)> {
        self.0.lock().unwrap().clone()
    }
}

fn pod_yaml(pod: &Pod, node: &Node, app: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {}, namespace: shop, uid: {}, labels: {{app: {app}, version: v1}}}}\n\
         spec: {{nodeName: {}, serviceAccountName: {app}, containers: []}}\n\
         status: {{phase: Running, podIPs: [{{ip: \"{}\"}}, {{ip: \"{}\"}}]}}\n",
        pod.name, pod.uid, node.name, pod.ip4, pod.ip6
    )
}

fn service(name: &str, vip: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: shop}}\n\
         spec: {{clusterIP: {vip}, selector: {{app: {name}}}, ports: [{{name: http, port: 80, targetPort: 8080}}]}}\n"
    )
}

/// user on node 1 → web on node 2 → reviews on node 1, every agent with `agent_args`.
struct Shop {
    collector: Collector,
    _rt: tokio::runtime::Runtime,
    agents: Vec<Agent>,
    user: Pod,
    web: Pod,
    reviews: Pod,
    _control: Control,
    cluster: Cluster,
}

impl Shop {
    fn start(agent_args: &[&str]) -> Self {
        let cluster = Cluster::new(2);
        let (n1, n2) = (&cluster.nodes[0], &cluster.nodes[1]);
        let (collector, rt) = Collector::start(&cluster);
        let user = n1.add_pod("user");
        let web = n2.add_pod("web");
        let reviews = n1.add_pod("reviews");
        let serve = |pod: &Pod, name: &str, extra: &[&str]| {
            pod.start_app(
                Command::new(binary("trellis-demo-app"))
                    .args(["serve", "--service", name, "--version", "v1", "--pod"])
                    .args([&pod.name, "--listen", "[::]:8080"])
                    .args(extra),
            )
        };
        serve(
            &web,
            "web",
            &["--call", &format!("http://{REVIEWS}:80/reviews/1")],
        );
        serve(&reviews, "reviews", &[]);
        reviews.serve(7000);
        let control = Control::start(
            &cluster,
            &[
                (
                    "ns.yaml",
                    "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {trellis.dev/mesh: enabled}}\n",
                ),
                ("user.yaml", &pod_yaml(&user, n1, "user")),
                ("web.yaml", &pod_yaml(&web, n2, "web")),
                ("reviews.yaml", &pod_yaml(&reviews, n1, "reviews")),
                ("svc-web.yaml", &service("web", WEB)),
                ("svc-reviews.yaml", &service("reviews", REVIEWS)),
            ],
        );
        let agents = vec![
            Agent::start_with_control_and(n1, &control, agent_args),
            Agent::start_with_control_and(n2, &control, agent_args),
        ];
        agents[0].wait_pod_state(&user, "enrolled");
        agents[1].wait_pod_state(&web, "enrolled");
        for (agent, want) in [(&agents[0], 2), (&agents[1], 1)] {
            let deadline = Instant::now() + Duration::from_secs(15);
            while !agent.admin("/certificates").is_ok_and(|(_, b)| {
                serde_json::from_str::<Vec<Value>>(&b).is_ok_and(|c| c.len() >= want)
            }) {
                assert!(Instant::now() < deadline, "{}", agent.log_text());
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Self {
            collector,
            _rt: rt,
            agents,
            user,
            web,
            reviews,
            _control: control,
            cluster,
        }
    }

    /// user → web (→ reviews), with extra request headers; web's answer.
    fn call(&self, headers: &[&str]) -> Value {
        let url = format!("http://{WEB}:80/product?id=7");
        let mut args = vec!["get", url.as_str()];
        for h in headers {
            args.extend(["--header", h]);
        }
        let out = self
            .user
            .spawn_app(
                Command::new(binary("trellis-demo-app"))
                    .args(&args)
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped()),
            )
            .unwrap()
            .wait_with_output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.agents[0].log_text()
        );
        let body: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(body["calls"][0]["service"], "reviews", "{body}");
        body
    }

    /// Waits until `pred` holds for the collector's spans.
    fn wait_spans(
        &self,
        what: &str,
        pred: impl Fn(&[(String, Span)]) -> bool,
    ) -> Vec<(String, Span)> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let spans = self.collector.spans();
            if pred(&spans) {
                return spans;
            }
            assert!(
                Instant::now() < deadline,
                "the collector never got {what}: {spans:#?}\n{}\n{}",
                self.agents[0].log_text(),
                self.agents[1].log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn spiffe(sa: &str) -> String {
    format!("spiffe://cluster.local/ns/shop/sa/{sa}")
}

/// The JSON access-log records (they have `reporter`; the agent's own log lines do not).
fn records(agent: &Agent) -> Vec<Value> {
    agent
        .logs()
        .into_iter()
        .filter(|v| v.get("reporter").is_some())
        .collect()
}

fn wait_record(agent: &Agent, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(r) = records(agent).into_iter().find(|r| pred(r)) {
            return r;
        }
        assert!(
            Instant::now() < deadline,
            "no access-log record of {what}:\n{}",
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn attrs(span: &Span) -> HashMap<String, String> {
    span.attributes
        .iter()
        .map(|a| {
            let v = match a.value.as_ref().and_then(|v| v.value.as_ref()) {
                Some(AnyValue::StringValue(s)) => s.clone(),
                Some(AnyValue::IntValue(i)) => i.to_string(),
                other => format!("{other:?}"),
            };
            (a.key.clone(), v)
        })
        .collect()
}

#[test]
fn json_access_logs_come_from_both_proxies_with_envoys_fields() {
    let shop = Shop::start(&["--access-log", "json"]);
    shop.call(&["x-request-id: req-42", "user-agent: shopper/1.0"]);
    let (n1, n2) = (&shop.agents[0], &shop.agents[1]);
    let by_id = |r: &Value| r["request_id"] == "req-42" && r["path"] == "/product?id=7";
    let source = wait_record(n1, "user → web at the source", |r| {
        by_id(r) && r["reporter"] == "source"
    });
    let dest = wait_record(n2, "user → web at the destination", |r| {
        by_id(r) && r["reporter"] == "destination"
    });
    for r in [&source, &dest] {
        assert_eq!(r["method"], "GET", "{r}");
        assert_eq!(r["protocol"], "HTTP/1.1", "{r}");
        assert_eq!(r["response_code"], 200, "{r}");
        assert_eq!(r["response_flags"], "-", "{r}");
        assert_eq!(r["user_agent"], "shopper/1.0", "{r}");
        assert!(r["authority"].as_str().unwrap().starts_with(WEB), "{r}");
        assert_eq!(r["source_workload"], shop.user.name.as_str(), "{r}");
        assert_eq!(r["source_principal"], spiffe("user"), "{r}");
        assert_eq!(r["destination_workload"], shop.web.name.as_str(), "{r}");
        assert_eq!(r["destination_principal"], spiffe("web"), "{r}");
        assert_eq!(r["destination_namespace"], "shop", "{r}");
        assert!(
            r["bytes_sent"].as_u64().unwrap() > 100,
            "the body web answered: {r}"
        );
        assert_eq!(r["bytes_received"], 0, "{r}");
        assert!(r["start_time"].as_str().unwrap().ends_with('Z'), "{r}");
        assert_eq!(r["trace_id"].as_str().unwrap().len(), 32, "{r}");
        for null in [
            "upstream_local_address",
            "requested_server_name",
            "route_name",
        ] {
            assert!(r[null].is_null(), "{null}: {r}");
        }
        // web called reviews before answering, so the exchange took as long as that at least.
        assert!(
            r["upstream_service_time"].as_u64().unwrap() <= r["duration"].as_u64().unwrap() + 1,
            "{r}"
        );
    }
    let web_addr = format!("{}:8080", shop.web.ip4);
    assert_eq!(source["upstream_host"], web_addr, "{source}");
    assert_eq!(
        source["downstream_local_address"],
        format!("{WEB}:80"),
        "{source}"
    );
    assert!(
        source["downstream_remote_address"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.1:"),
        "a captured connect comes from loopback: {source}"
    );
    for r in [&source, &dest] {
        assert_eq!(
            r["destination_service"], "web.shop.svc.cluster.local",
            "{r}"
        );
    }
    assert_eq!(
        source["upstream_cluster"], "outbound|80||web.shop.svc.cluster.local",
        "{source}"
    );
    assert_eq!(dest["upstream_host"], web_addr, "{dest}");
    assert_eq!(dest["upstream_cluster"], "inbound|8080||", "{dest}");
    assert!(
        dest["downstream_remote_address"]
            .as_str()
            .unwrap()
            .starts_with(&format!("{}:", shop.user.ip4)),
        "{dest}"
    );
    // The same request, one trace: the destination's hop is the source's child.
    assert_eq!(source["trace_id"], dest["trace_id"]);
    // web → reviews: logged by node 2 (source) and node 1 (destination).
    wait_record(n2, "web → reviews at the source", |r| {
        r["reporter"] == "source"
            && r["path"] == "/reviews/1"
            && r["response_code"] == 200
            && r["destination_workload"] == shop.reviews.name.as_str()
    });
    wait_record(n1, "web → reviews at the destination", |r| {
        r["reporter"] == "destination"
            && r["path"] == "/reviews/1"
            && r["source_principal"] == spiffe("web")
    });

    // A TCP connection: one record at close on each side, with its bytes.
    let addr: SocketAddr = format!("{}:7000", shop.reviews.ip4).parse().unwrap();
    let answer = shop.user.connect(addr, "hello");
    assert_eq!(answer["echo"], "hello", "{answer}");
    for (agent, direction) in [(n1, "outbound"), (n1, "inbound")] {
        let r = wait_record(agent, &format!("the TCP connection ({direction})"), |r| {
            r["direction"] == direction && r["downstream_local_address"] == addr.to_string()
        });
        assert!(r["bytes_received"].as_u64().unwrap() >= 5, "{r}");
        assert!(r["bytes_sent"].as_u64().unwrap() >= 5, "{r}");
        assert_eq!(r["source_principal"], spiffe("user"), "{r}");
        assert!(r["duration"].is_u64(), "{r}");
    }
}

/// Opens `/tap?query` on `node`'s admin endpoint; returns the connection once the stream's
/// head has arrived (records after that are in it).
fn open_tap(node: &Node, query: &str) -> std::net::TcpStream {
    let mut s = sys::connect_in(&node.name, ADMIN.parse().unwrap()).unwrap();
    write!(s, "GET /tap?{query} HTTP/1.1\r\nHost: admin\r\n\r\n").unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(
            s.read(&mut byte).unwrap(),
            1,
            "tap closed: {}",
            String::from_utf8_lossy(&head)
        );
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    s
}

/// Reads the tap's records until `enough` holds for them (at most 10 s).
fn read_tap(s: &mut std::net::TcpStream, enough: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut text = Vec::new();
    loop {
        // Chunked: size lines and record lines alternate; the records are the JSON ones.
        let records: Vec<Value> = String::from_utf8_lossy(&text)
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(Value::is_object)
            .collect();
        if enough(&records) {
            return records;
        }
        assert!(Instant::now() < deadline, "tap gave only {records:#?}");
        let mut buf = [0u8; 4096];
        match s.read(&mut buf) {
            Ok(0) => panic!("the tap closed"),
            Ok(n) => text.extend_from_slice(&buf[..n]),
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(e) => panic!("reading the tap: {e}"),
        }
    }
}

#[test]
fn tap_streams_a_workloads_requests_live_and_filters_them() {
    // No access log: taps work without it.
    let shop = Shop::start(&[]);
    let n2 = &shop.cluster.nodes[1];
    let bad = sys::http_get(&n2.name, ADMIN.parse().unwrap(), "/tap?namespace=shop").unwrap();
    assert_eq!(bad.0, 400, "{bad:?}");
    assert!(bad.1.contains("workload"), "{bad:?}");

    let query = format!("namespace=shop&workload={}", shop.web.name);
    let mut tap = open_tap(n2, &query);
    let mut only_reviews = open_tap(n2, &format!("{query}&path_prefix=/reviews&method=GET"));
    for _ in 0..3 {
        shop.call(&[]);
    }
    let both = |rs: &[Value], n| {
        rs.iter().filter(|r| r["reporter"] == "destination").count() >= n
            && rs.iter().filter(|r| r["reporter"] == "source").count() >= n
    };
    let records = read_tap(&mut tap, |rs| both(rs, 3));
    // web as destination: user → web, seen by node 2's inbound side.
    let inbound = records
        .iter()
        .find(|r| r["reporter"] == "destination")
        .unwrap();
    assert_eq!(inbound["method"], "GET", "{inbound}");
    assert_eq!(inbound["path"], "/product?id=7", "{inbound}");
    assert_eq!(inbound["response_code"], 200, "{inbound}");
    assert_eq!(
        inbound["source_workload"],
        shop.user.name.as_str(),
        "{inbound}"
    );
    assert_eq!(inbound["source_principal"], spiffe("user"), "{inbound}");
    assert_eq!(
        inbound["destination_workload"],
        shop.web.name.as_str(),
        "{inbound}"
    );
    assert_eq!(inbound["destination_principal"], spiffe("web"), "{inbound}");
    // web as source: web → reviews, seen by node 2's outbound side.
    let outbound = records.iter().find(|r| r["reporter"] == "source").unwrap();
    assert_eq!(outbound["path"], "/reviews/1", "{outbound}");
    assert_eq!(outbound["source_principal"], spiffe("web"), "{outbound}");
    assert_eq!(
        outbound["destination_workload"],
        shop.reviews.name.as_str(),
        "{outbound}"
    );
    assert_eq!(
        outbound["destination_principal"],
        spiffe("reviews"),
        "{outbound}"
    );
    // Nothing of other workloads' requests.
    assert!(
        records
            .iter()
            .all(|r| r["source_workload"] == shop.web.name.as_str()
                || r["destination_workload"] == shop.web.name.as_str()),
        "{records:#?}"
    );
    let filtered = read_tap(&mut only_reviews, |rs| rs.len() >= 3);
    assert!(
        filtered
            .iter()
            .all(|r| r["path"].as_str().unwrap().starts_with("/reviews")),
        "{filtered:#?}"
    );
    // A closed tap is let go of: the agent keeps serving requests, none waits on a reader.
    drop(tap);
    drop(only_reviews);
    for _ in 0..3 {
        shop.call(&[]);
    }
}

#[test]
fn traces_of_a_two_hop_call_reach_the_collector_as_one_trace() {
    let shop = Shop::start(&[
        "--otlp-endpoint",
        &format!("http://{COLLECTOR}"),
        "--trace-sampling",
        "100",
    ]);
    let body = shop.call(&[]);
    let tp = body["headers"]["traceparent"].as_str().unwrap().to_owned();
    let trace_id = tp.split('-').nth(1).unwrap().to_owned();
    let ours = |s: &Span| hex(&s.trace_id) == trace_id;
    // Four spans: user → web at both ends, web → reviews at both ends.
    let spans = shop.wait_spans("the call's four spans", |spans| {
        spans.iter().filter(|(_, s)| ours(s)).count() >= 4
    });
    let spans: Vec<&(String, Span)> = spans.iter().filter(|(_, s)| ours(s)).collect();
    assert_eq!(spans.len(), 4, "{spans:#?}");
    let find = |kind: SpanKind, path: &str| {
        spans
            .iter()
            .find(|(_, s)| s.kind == kind as i32 && attrs(s)["http.url"].ends_with(path))
            .unwrap_or_else(|| panic!("no {kind:?} span for {path}: {spans:#?}"))
    };
    let (n1, n2) = (&shop.cluster.nodes[0].name, &shop.cluster.nodes[1].name);
    let client1 = find(SpanKind::Client, "/product?id=7");
    let server1 = find(SpanKind::Server, "/product?id=7");
    let client2 = find(SpanKind::Client, "/reviews/1");
    let server2 = find(SpanKind::Server, "/reviews/1");
    // Each from the node whose proxy saw it.
    assert_eq!(
        [&client1.0, &server1.0, &client2.0, &server2.0],
        [n1, n2, n2, n1]
    );
    let (c1, s1, c2, s2) = (&client1.1, &server1.1, &client2.1, &server2.1);
    // client span → server span → next client span → its server span.
    assert!(
        c1.parent_span_id.is_empty(),
        "the user sent no context: {c1:?}"
    );
    assert_eq!(s1.parent_span_id, c1.span_id);
    assert_eq!(c2.parent_span_id, s1.span_id);
    assert_eq!(s2.parent_span_id, c2.span_id);
    // The app saw the server span's context.
    assert_eq!(tp.split('-').nth(2).unwrap(), hex(&s1.span_id));
    // Durations non-zero and nested: each span within its parent.
    for (outer, inner) in [(c1, s1), (s1, c2), (c2, s2)] {
        assert!(
            inner.end_time_unix_nano > inner.start_time_unix_nano,
            "{inner:?}"
        );
        // Clocks are one machine's; allow a millisecond of rounding either side.
        let slack = 1_000_000;
        assert!(
            inner.start_time_unix_nano + slack >= outer.start_time_unix_nano
                && inner.end_time_unix_nano <= outer.end_time_unix_nano + slack,
            "{inner:?} not within {outer:?}"
        );
    }
    let a = attrs(c1);
    assert_eq!(a["http.method"], "GET");
    assert!(a["http.url"].starts_with(&format!("http://{WEB}")), "{a:?}");
    assert_eq!(a["http.status_code"], "200");
    assert_eq!(a["component"], "proxy");
    assert_eq!(a["node_id"], *n1);
    assert_eq!(
        a["upstream_cluster"],
        "outbound|80||web.shop.svc.cluster.local"
    );
    assert_eq!(a["source.principal"], spiffe("user"));
    assert_eq!(a["destination.principal"], spiffe("web"));
    assert_eq!(a["istio.canonical_service"], "user");
    assert!(a["peer.address"].starts_with("127.0.0.1:"), "{a:?}");
    let a = attrs(s1);
    assert_eq!(a["istio.canonical_service"], "web");
    assert_eq!(a["source.principal"], spiffe("user"));
    assert!(
        a["peer.address"].starts_with(&shop.user.ip4.to_string()),
        "{a:?}"
    );
    assert_eq!(attrs(s2)["destination.principal"], spiffe("reviews"));

    // B3 alone continues the caller's trace too.
    let b3_trace = "463ac35c9f6413ad48485a3953bb6124";
    shop.call(&[
        &format!("x-b3-traceid: {b3_trace}"),
        "x-b3-spanid: a2fb4a1d1a96d312",
        "x-b3-sampled: 1",
    ]);
    let spans = shop.wait_spans("the B3 call's spans", |spans| {
        spans
            .iter()
            .filter(|(_, s)| hex(&s.trace_id) == b3_trace)
            .count()
            >= 4
    });
    let first = spans.iter().find(|(_, s)| {
        hex(&s.trace_id) == b3_trace
            && s.kind == SpanKind::Client as i32
            && hex(&s.parent_span_id) == "a2fb4a1d1a96d312"
    });
    assert!(first.is_some(), "{spans:#?}");
}

#[test]
fn sampling_zero_exports_nothing_but_honours_a_callers_sampled_trace() {
    let shop = Shop::start(&[
        "--otlp-endpoint",
        &format!("http://{COLLECTOR}"),
        "--trace-sampling",
        "0",
    ]);
    for _ in 0..5 {
        let body = shop.call(&[]);
        let tp = body["headers"]["traceparent"].as_str().unwrap();
        assert!(
            tp.ends_with("-00"),
            "not sampled, and said so downstream: {tp}"
        );
    }
    // The caller decided to sample: both hops honour it, so the exporter does work here…
    let trace_id = "0af7651916cd43dd8448eb211c80319c";
    shop.call(&[&format!("traceparent: 00-{trace_id}-b7ad6b7169203331-01")]);
    let spans = shop.wait_spans("the sampled call's spans", |spans| {
        spans
            .iter()
            .filter(|(_, s)| hex(&s.trace_id) == trace_id)
            .count()
            >= 4
    });
    // …and nothing else was exported (the batches go out within a second).
    std::thread::sleep(Duration::from_secs(2));
    let spans_now = shop.collector.spans();
    assert!(
        spans_now.iter().all(|(_, s)| hex(&s.trace_id) == trace_id),
        "unsampled requests exported: {spans_now:#?}"
    );
    assert_eq!(spans.len(), 4, "{spans:#?}");
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn an_unreachable_collector_slows_no_request_and_its_spans_are_counted_dropped() {
    // Nothing listens on this port of the fabric: every export fails.
    let shop = Shop::start(&[
        "--otlp-endpoint",
        "http://10.0.0.254:4318",
        "--trace-sampling",
        "100",
    ]);
    let started = Instant::now();
    for _ in 0..5 {
        shop.call(&[]);
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "requests waited on the exporter: {:?}",
        started.elapsed()
    );
    let node = &shop.cluster.nodes[0].name;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (code, text) =
            sys::http_get(node, "127.0.0.1:15020".parse().unwrap(), "/metrics").unwrap();
        assert_eq!(code, 200);
        let dropped: f64 = text
            .lines()
            .find_map(|l| l.strip_prefix("trellis_spans_dropped_total "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0);
        // Node 1 saw the user → web client span and the web → reviews server span of each call.
        if dropped >= 10.0 {
            assert!(text.contains("trellis_spans_exported_total 0"), "{text}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "spans not counted as dropped:\n{text}\n{}",
            shop.agents[0].log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    shop.agents[0].wait_log("the export failure", |v| {
        v["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("exporting spans failed"))
    });
}

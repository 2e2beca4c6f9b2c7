//! End-to-end tests of AuthorizationPolicy on the real kernel: enforced by the server's node
//! proxy, at L4 on TCP ports (the HBONE CONNECT answered 403, plaintext reset, open connections
//! closed when a new DENY covers them) and at L7 on HTTP/1.1, h2c and gRPC ports.
mod shop;

use std::{
    net::SocketAddr,
    process::{Command, Stdio},
    time::Duration,
};

use shop::*;
use trellis_e2e::{Pod, node::binary};

const GREETER: &str = "10.96.0.11";

fn policy(name: &str, spec: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
         metadata: {{name: {name}, namespace: shop}}\nspec: {spec}\n"
    )
}

/// Whether an echo through `to` from `pod` came back.
fn echoes(pod: &Pod, to: SocketAddr) -> bool {
    pod.connect(to, "hi")["echo"] == "hi"
}

/// `curl` from `pod` (as its app): (status, body).
fn curl(pod: &Pod, args: &[&str]) -> (u16, String) {
    let body = pod.name.clone() + ".body";
    let path = std::env::temp_dir().join(body);
    let mut cmd = Command::new("curl");
    cmd.args(["-s", "--max-time", "5", "-o"])
        .arg(&path)
        .args(["-w", "%{http_code}"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let out = pod.spawn_app(&mut cmd).unwrap().wait_with_output().unwrap();
    let code = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0);
    let body = std::fs::read_to_string(&path).unwrap_or_default();
    let _ = std::fs::remove_file(path);
    (code, body)
}

fn denials(node_metrics: &str) -> f64 {
    sample(
        node_metrics,
        "trellis_connection_failures_total",
        &[("reason", "authz")],
    )
    .unwrap_or(0.0)
}

/// These agents share work the other way from the default (thread per core), so every policy
/// path is also proven on tokio's work-stealing pool.
const WORK_STEALING: &[&str] = &["--scheduler", "work-stealing"];

#[test]
fn tcp_policies_deny_beats_allow_allow_nothing_and_open_connections_close() {
    let shop = Shop::start_with(2, &[], WORK_STEALING);
    let echo = shop.vip(80);
    let direct = addr(shop.server.ip4, 8080);
    assert!(echoes(&shop.client, echo));
    assert!(echoes(&shop.outsider, direct), "PERMISSIVE plaintext");

    // ALLOW only shop/client: the mesh caller passes; the plaintext outsider has no principal.
    shop.control.write(
        "allow.yaml",
        &policy(
            "allow-client",
            "{selector: {matchLabels: {app: server}}, rules: [{from: [{source: {principals: [cluster.local/ns/shop/sa/client]}}]}]}",
        ),
    );
    shop.eventually("plaintext refused by the ALLOW policy", || {
        !echoes(&shop.outsider, direct)
    });
    assert!(echoes(&shop.client, echo), "{}", shop.logs());
    // The echo that first failed may have been one opened just before the policy and closed by
    // it: a fresh connection is the one denied.
    assert!(!echoes(&shop.outsider, direct));
    shop.agents[1].wait_log("the plaintext denial", |v| {
        v["message"] == "denied by AuthorizationPolicy"
            && v["policy"] == "no ALLOW policy matched"
            && v["client_identity"] == "none"
    });

    // An ipBlocks rule lets the outsider's address in, plaintext as it is.
    shop.control.write(
        "allow-ip.yaml",
        &policy(
            "allow-outsider-ip",
            &format!(
                "{{rules: [{{from: [{{source: {{ipBlocks: [\"{}/32\"]}}}}]}}]}}",
                shop.outsider.ip4
            ),
        ),
    );
    shop.eventually("the ipBlocks ALLOW", || echoes(&shop.outsider, direct));

    // Open connections from the client, then DENY its namespace on the bulk echo port: DENY
    // beats ALLOW, and the open connections are closed, not left running.
    let bulk = shop.vip(7000);
    let held = churn(&shop.client, bulk, 3, 6);
    std::thread::sleep(Duration::from_millis(1500));
    let written = unix_ms();
    shop.control.write(
        "deny.yaml",
        &policy(
            "deny-shop-bulk",
            "{action: DENY, rules: [{from: [{source: {namespaces: [shop]}}], to: [{operation: {ports: [\"7000\"]}}]}]}",
        ),
    );
    let report = report(held);
    assert_eq!(report["lost"], 3, "{report}\n{}", shop.logs());
    let closed_after: Vec<u64> = report["lost_at_ms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap().saturating_sub(written))
        .collect();
    println!("open connections closed {closed_after:?} ms after the DENY was written");
    assert!(
        closed_after.iter().all(|&ms| ms < 2000),
        "closed {closed_after:?} ms after the policy was written"
    );
    shop.agents[1].wait_log("the closing", |v| {
        v["message"] == "open connection closed: an AuthorizationPolicy now denies it"
            && v["policy"] == "shop/deny-shop-bulk"
    });
    let out = blast(&shop.client, bulk, 1000);
    assert_ne!(out["ok"], true, "{out}");
    shop.agents[1].wait_log("the new connection's denial", |v| {
        v["message"] == "denied by AuthorizationPolicy"
            && v["policy"] == "shop/deny-shop-bulk"
            && v["client_identity"] == spiffe("shop", "client")
    });
    // Other ports are not covered by the DENY: the echo port still works for the client.
    assert!(echoes(&shop.client, echo));
    let m = metrics(&shop.cluster.nodes[1]);
    assert!(denials(&m) >= 2.0, "{m}");
    assert!(
        sample(
            &m,
            "istio_tcp_connections_opened_total",
            &[("response_flags", "RBAC"), ("source_workload", "client")]
        )
        .is_some_and(|n| n >= 1.0),
        "{m}"
    );

    // `spec: {}` (ALLOW with no rules) lets nothing in, over the mesh or not.
    for f in ["deny.yaml", "allow.yaml", "allow-ip.yaml"] {
        shop.control.remove(f);
    }
    shop.eventually("policies removed", || echoes(&shop.client, echo));
    shop.control
        .write("nothing.yaml", &policy("allow-nothing", "{}"));
    shop.eventually("allow-nothing", || {
        !echoes(&shop.client, echo) && !echoes(&shop.outsider, direct)
    });
    let out = blast(&shop.client, bulk, 1000);
    assert_ne!(out["ok"], true, "{out}");
    // Except for the server's own node (kubelet's health probes), as under STRICT: another
    // node's plaintext is denied.
    let out = shop.cluster.nodes[1].connect(direct, "probe");
    assert_eq!(out["echo"], "probe", "{out}\n{}", shop.logs());
    let out = shop.cluster.nodes[0].connect(direct, "probe");
    assert!(
        out.get("banner").is_none(),
        "another node got through: {out}"
    );

    // A policy with an unsupported field is refused with its path; the last good one stays.
    shop.control.write(
        "nothing.yaml",
        &policy(
            "allow-nothing",
            "{rules: [{from: [{source: {requestPrincipals: [\"*\"]}}]}]}",
        ),
    );
    shop.eventually("the refusal in control's log", || {
        shop.control.log_text().contains(
            "spec.rules[0].from[0].source.requestPrincipals: unknown field `requestPrincipals`",
        )
    });
    assert!(
        !echoes(&shop.client, echo),
        "the last good policy still applies"
    );
}

#[test]
fn http_rules_on_http1_h2c_and_grpc() {
    let shop = Shop::start_with(2, &[], WORK_STEALING);
    shop.server
        .start_app(Command::new(binary("trellis-grpc-app")).args([
            "serve",
            "--version",
            "v1",
            "--pod",
            &shop.server.name,
            "--listen",
            "[::]:9090",
        ]));
    shop.control.write(
        "svc-greeter.yaml",
        &format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: greeter, namespace: shop}}\n\
             spec: {{clusterIP: {GREETER}, selector: {{app: server}}, ports: [{{name: grpc, port: 9090}}]}}\n"
        ),
    );
    let web = format!("http://{VIP}:8081");
    let h2 = format!("http://{GREETER}:9090");
    let grpc = |call: &str| -> Result<String, String> {
        let mut cmd = Command::new(binary("trellis-grpc-app"));
        cmd.args(["call", &h2])
            .args(call.split(' '))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let out = shop
            .client
            .spawn_app(&mut cmd)
            .unwrap()
            .wait_with_output()
            .unwrap();
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        if out.status.success() {
            Ok(text(&out.stdout))
        } else {
            Err(text(&out.stderr))
        }
    };
    shop.eventually("the gRPC service", || grpc("hello").is_ok());
    assert_eq!(curl(&shop.client, &[&format!("{web}/admin")]).0, 200);

    // DENY: /admin (and below) for everyone, POST from anyone but shop/client, and any request
    // carrying `x-user: mallory`; gRPC's Count method by path.
    shop.control.write(
        "deny.yaml",
        &policy(
            "deny-l7",
            "{action: DENY, selector: {matchLabels: {app: server}}, rules: [\
               {to: [{operation: {paths: [\"/admin*\", /trellis.test.v1.Greeter/Count]}}]},\
               {from: [{source: {notPrincipals: [cluster.local/ns/shop/sa/client]}}], to: [{operation: {methods: [POST]}}]},\
               {when: [{key: \"request.headers[x-user]\", values: [mallory]}]}]}",
        ),
    );
    let took = shop.eventually("the DENY in force", || {
        curl(&shop.client, &[&format!("{web}/admin")]).0 == 403
    });
    println!("L7 DENY in force {took:?} after it was written");
    let (code, body) = curl(&shop.client, &[&format!("{web}/admin/users")]);
    assert_eq!((code, body.as_str()), (403, "RBAC: access denied"));
    // Normalized before matching: a dot segment does not get around the rule.
    let (code, _) = curl(
        &shop.client,
        &["--path-as-is", &format!("{web}/public/../admin")],
    );
    assert_eq!(code, 403);
    assert_eq!(curl(&shop.client, &[&format!("{web}/")]).0, 200);
    // POST: allowed for shop/client (the exception), denied for the plaintext outsider.
    assert_eq!(
        curl(&shop.client, &["-X", "POST", &format!("{web}/")]).0,
        200
    );
    let direct = format!("http://{}:9080/", shop.server.ip4);
    assert_eq!(curl(&shop.outsider, &["-X", "POST", &direct]).0, 403);
    assert_eq!(curl(&shop.outsider, &[&direct]).0, 200);
    // The header condition.
    let (code, _) = curl(&shop.client, &["-H", "x-user: mallory", &format!("{web}/")]);
    assert_eq!(code, 403);
    assert_eq!(
        curl(&shop.client, &["-H", "x-user: alice", &format!("{web}/")]).0,
        200
    );

    // h2c (prior knowledge) to the gRPC server's port: the same rules, per request.
    let h2c = |path: &str| {
        curl(
            &shop.client,
            &["--http2-prior-knowledge", &format!("{h2}{path}")],
        )
    };
    assert_eq!(h2c("/admin").0, 403);
    assert_eq!(h2c("/anything").0, 200, "tonic answers any h2 request");

    // gRPC: Hello passes, Count is PERMISSION_DENIED.
    let hello = grpc("hello").unwrap();
    assert!(
        hello.contains("spiffe://cluster.local/ns/shop/sa/client"),
        "{hello}"
    );
    let e = grpc("count 3").unwrap_err();
    assert!(
        e.contains("PermissionDenied") || e.contains("permission"),
        "{e}"
    );
    assert!(e.contains("RBAC: access denied"), "{e}");

    // After the first call's tunnel, the client's agent sent these calls straight on the HBONE
    // connection (hbone::DIRECT): the rules, the caller's identity and metrics held there too.
    shop.agents[1].wait_log("requests without a tunnel", |v| {
        v["message"] == "HBONE requests without a tunnel"
            && v["orig_dst"].as_str().is_some_and(|d| d.ends_with(":9090"))
    });
    shop.agents[1].wait_log("a request's denial", |v| {
        v["message"] == "denied by AuthorizationPolicy"
            && v["policy"] == "shop/deny-l7"
            && v["what"] == "request"
    });
    let m = metrics(&shop.cluster.nodes[1]);
    let denied = sample(
        &m,
        "istio_requests_total",
        &[
            ("reporter", "destination"),
            ("response_code", "403"),
            ("response_flags", "RBAC"),
            ("source_workload", "client"),
            ("request_protocol", "http"),
            ("destination_service", "server.shop.svc.cluster.local"),
        ],
    );
    assert!(denied.is_some_and(|n| n >= 4.0), "{m}");
    let allowed = sample(
        &m,
        "istio_requests_total",
        &[("reporter", "destination"), ("response_code", "200")],
    );
    assert!(allowed.is_some_and(|n| n >= 1.0), "{m}");

    // AUDIT marks without deciding.
    shop.control.write(
        "audit.yaml",
        &policy(
            "audit-all",
            "{action: AUDIT, rules: [{to: [{operation: {paths: [/audited]}}]}]}",
        ),
    );
    shop.eventually("the audit line", || {
        curl(&shop.client, &[&format!("{web}/audited")]).0 == 200
            && shop.agents[1].logs().iter().any(|v| {
                v["message"] == "AuthorizationPolicy audit" && v["policy"] == "shop/audit-all"
            })
    });
}

//! The ingress gateway on the real kernel: a process outside the mesh connects to a gateway
//! pod's server port; the gateway pod's node proxy routes it by the VirtualServices bound to the
//! Gateway to a mesh Service over HBONE, as the gateway's identity, so the destination's
//! AuthorizationPolicy can name the gateway. TCP; HTTPS with TLS terminated at the gateway (a
//! Secret's certificate, and files') and an HTTP split there; TLS passed through by SNI.
mod shop;

use std::{
    net::SocketAddr,
    path::Path,
    process::{Command, Stdio},
};

use shop::{Shop, addr, metrics, pod_yaml, sample, spiffe};

const PORT: u16 = 7000;

#[test]
fn outside_traffic_enters_through_the_gateway_as_the_gateways_identity() {
    let shop = Shop::start();
    let gw = shop.add_gateway("ingressgateway");
    shop.control.write(
        "gw.yaml",
        &format!(
            "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {{name: ingressgateway, namespace: trellis-system}}\n\
             spec: {{selector: {{app: ingressgateway}}, servers: [{{port: {{number: {PORT}, name: tcp-echo, protocol: TCP}}, hosts: [\"*\"]}}]}}\n"
        ),
    );
    shop.control.write(
        "vs.yaml",
        &format!(
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: echo-in, namespace: shop}}\n\
             spec: {{hosts: [server.shop.svc.cluster.local], gateways: [trellis-system/ingressgateway], \
             tcp: [{{match: [{{port: {PORT}}}], route: [{{destination: {{host: server.shop.svc.cluster.local, port: {{number: 80}}}}}}]}}]}}\n"
        ),
    );
    // The server takes its echo port only from the gateway.
    shop.control.write(
        "server-authz.yaml",
        &format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: only-gateway, namespace: shop}}\n\
             spec: {{selector: {{matchLabels: {{app: server}}}}, action: ALLOW, rules: [{{from: [{{source: {{principals: [\"{}\"]}}}}], \
             to: [{{operation: {{ports: [\"8080\"]}}}}]}}]}}\n",
            spiffe("trellis-system", "ingressgateway").trim_start_matches("spiffe://")
        ),
    );

    // From outside the mesh (the legacy outsider), in plaintext, to the gateway's address.
    let mut out = serde_json::Value::Null;
    shop.eventually("the way in through the gateway", || {
        out = shop.outsider.connect(addr(gw.ip4, PORT), "hello");
        out["echo"] == "hello"
    });
    assert_eq!(out["banner"]["server"], "server", "{out}");
    // Straight to the server, and from a mesh pod of another identity: refused by its policy.
    shop.eventually("the server's policy in force", || {
        shop.outsider.connect(addr(shop.server.ip4, 8080), "hello")["echo"] != "hello"
            && shop.client.connect(shop.vip(80), "hello")["echo"] != "hello"
    });
    // Still open through the gateway.
    let out = shop.outsider.connect(addr(gw.ip4, PORT), "again");
    assert_eq!(out["echo"], "again", "{out}");

    // The server's node saw the gateway's identity on the mesh leg.
    let m = metrics(&shop.cluster.nodes[1]);
    let via = sample(
        &m,
        "istio_tcp_connections_opened_total",
        &[
            ("reporter", "destination"),
            (
                "source_principal",
                &spiffe("trellis-system", "ingressgateway"),
            ),
            ("destination_workload", "server"),
            ("connection_security_policy", "mutual_tls"),
        ],
    );
    assert!(via.is_some_and(|n| n >= 1.0), "{m}");
    // The gateway's own node counted the outside connection, destined for the service.
    let entered = sample(
        &m,
        "istio_tcp_connections_opened_total",
        &[
            ("reporter", "destination"),
            ("destination_workload", "ingressgateway"),
            ("destination_service", "server.shop.svc.cluster.local"),
        ],
    );
    assert!(entered.is_some_and(|n| n >= 1.0), "{m}");
}

/// A test CA: its PEM and an issuer for server certificates.
fn test_ca() -> (String, rcgen::Issuer<'static, rcgen::KeyPair>) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "ingress test CA");
    let pem = ca.self_signed(&key).unwrap().pem();
    (pem, rcgen::Issuer::new(ca, key))
}

/// A certificate for `host` with common name `cn` (how a test tells two apart): (cert, key) PEM.
fn server_cert(
    issuer: &rcgen::Issuer<'_, rcgen::KeyPair>,
    host: &str,
    cn: &str,
) -> (String, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec![host.to_owned()]).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, cn);
    (
        params.signed_by(&key, issuer).unwrap().pem(),
        key.serialize_pem(),
    )
}

/// A `kubernetes.io/tls` Secret, as JSON (which is YAML) for control's directory.
fn tls_secret(ns: &str, name: &str, (cert, key): &(String, String)) -> String {
    serde_json::json!({"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
        "metadata": {"name": name, "namespace": ns},
        "stringData": {"tls.crt": cert, "tls.key": key}})
    .to_string()
}

/// curl from `pod` to `url` with `host` resolved to `to`, trusting `ca`: (exit code, stdout).
fn curl(
    pod: &trellis_e2e::Pod,
    ca: &Path,
    host: &str,
    to: SocketAddr,
    url: &str,
    extra: &[&str],
) -> (i32, String) {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--max-time", "5", "--cacert"])
        .arg(ca)
        .args(["--resolve", &format!("{host}:{}:{}", to.port(), to.ip())])
        .args(extra)
        .arg(url)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let out = pod.spawn_app(&mut cmd).unwrap().wait_with_output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), text)
}

/// The subject of the certificate `pod` is served at `to` for SNI `host`.
fn served_subject(pod: &trellis_e2e::Pod, to: SocketAddr, host: &str) -> String {
    let out = pod
        .spawn_app(
            Command::new("sh")
                .args(["-c", &format!("openssl s_client -connect {to} -servername {host} </dev/null 2>/dev/null | openssl x509 -noout -subject")])
                .stdout(Stdio::piped()),
        )
        .unwrap()
        .wait_with_output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[test]
fn https_is_terminated_at_the_gateway_split_there_and_passed_through_by_sni() {
    let shop = Shop::start();
    let (n1, n2) = (&shop.cluster.nodes[0], &shop.cluster.nodes[1]);
    let dir = tempfile::tempdir().unwrap();
    let (ca_pem, issuer) = test_ca();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, &ca_pem).unwrap();

    // A second version of the server (node 1), for the split; and a TLS server of its own on
    // the server pod (node 2), for passthrough: it presents its own certificate.
    let v2 = n1.add_pod("server-v2");
    v2.start_app(
        Command::new(trellis_e2e::node::binary("trellis-demo-app")).args([
            "serve",
            "--service",
            "server",
            "--version",
            "v2",
            "--pod",
            "server-v2",
            "--listen",
            "[::]:9080",
        ]),
    );
    let secure = server_cert(&issuer, "secure.example", "secure");
    let (secure_crt, secure_key) = (dir.path().join("secure.crt"), dir.path().join("secure.key"));
    std::fs::write(&secure_crt, &secure.0).unwrap();
    std::fs::write(&secure_key, &secure.1).unwrap();
    let mut s_server = shop
        .server
        .spawn_app(
            Command::new("openssl")
                .args(["s_server", "-accept", "9443", "-www", "-cert"])
                .arg(&secure_crt)
                .arg("-key")
                .arg(&secure_key)
                .stdin(Stdio::null())
                .stdout(Stdio::null()),
        )
        .unwrap();
    shop.control.write(
        "server-v2.yaml",
        &pod_yaml(&v2, "shop", n1, "server", "server").replace("version: v1", "version: v2"),
    );
    shop.control.write(
        "secure-svc.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: secure, namespace: shop}\n\
         spec: {clusterIP: 10.96.0.50, selector: {app: server, version: v1}, ports: [{name: tls, port: 443, targetPort: 9443}]}\n",
    );
    shop.control.write(
        "dr.yaml",
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: server, namespace: shop}\n\
         spec: {host: server, subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}]}\n",
    );

    // The gateway's certificates: shop.example from a Secret, files.example from files.
    let gw = shop.add_gateway("ingressgateway");
    let (files_crt, files_key) = (dir.path().join("files.crt"), dir.path().join("files.key"));
    let files_v1 = server_cert(&issuer, "files.example", "files one");
    std::fs::write(&files_crt, &files_v1.0).unwrap();
    std::fs::write(&files_key, &files_v1.1).unwrap();
    shop.control.write(
        "shop-cert.yaml",
        &tls_secret(
            "trellis-system",
            "shop-cert",
            &server_cert(&issuer, "shop.example", "shop one"),
        ),
    );
    shop.control.write(
        "gw.yaml",
        &format!(
            "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {{name: ingressgateway, namespace: trellis-system}}\n\
             spec: {{selector: {{app: ingressgateway}}, servers: [\
             {{port: {{number: 443, name: https, protocol: HTTPS}}, hosts: [shop.example], tls: {{mode: SIMPLE, credentialName: shop-cert}}}}, \
             {{port: {{number: 443, name: https-files, protocol: HTTPS}}, hosts: [files.example], \
               tls: {{mode: SIMPLE, serverCertificate: {}, privateKey: {}}}}}, \
             {{port: {{number: 80, name: http, protocol: HTTP}}, hosts: [\"*\"]}}, \
             {{port: {{number: 8443, name: tls, protocol: TLS}}, hosts: [secure.example], tls: {{mode: PASSTHROUGH}}}}]}}\n",
            files_crt.display(),
            files_key.display()
        ),
    );
    // The server's HTTP port takes requests only from the gateway.
    shop.control.write(
        "server-authz.yaml",
        &format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: only-gateway, namespace: shop}}\n\
             spec: {{selector: {{matchLabels: {{app: server}}}}, action: ALLOW, rules: [{{from: [{{source: {{principals: [\"{}\"]}}}}], \
             to: [{{operation: {{ports: [\"9080\", \"9443\"]}}}}]}}]}}\n",
            spiffe("trellis-system", "ingressgateway").trim_start_matches("spiffe://")
        ),
    );
    shop.control.write(
        "vs.yaml",
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: shop-in, namespace: shop}\n\
         spec: {hosts: [shop.example, files.example], gateways: [trellis-system/ingressgateway], http: [\
           {match: [{uri: {prefix: /v2}}], route: [{destination: {host: server, subset: v2, port: {number: 8081}}}]}, \
           {route: [{destination: {host: server, subset: v1, port: {number: 8081}}, weight: 80}, \
                    {destination: {host: server, subset: v2, port: {number: 8081}}, weight: 20}]}]}\n",
    );
    shop.control.write(
        "vs-tls.yaml",
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: secure-in, namespace: shop}\n\
         spec: {hosts: [secure.example], gateways: [trellis-system/ingressgateway], \
           tls: [{match: [{sniHosts: [secure.example]}], route: [{destination: {host: secure, port: {number: 443}}}]}]}\n",
    );

    let https = addr(gw.ip4, 443);
    // From outside the mesh: TLS terminated at the gateway with the Secret's certificate (curl
    // checks it against the test CA), the request routed to the server over HBONE.
    let mut out = (0, String::new());
    shop.eventually("HTTPS through the gateway", || {
        out = curl(
            &shop.outsider,
            &ca,
            "shop.example",
            https,
            "https://shop.example/v2/x",
            &[],
        );
        out.0 == 0 && out.1.contains("\"pod\":\"server-v2\"")
    });
    let body: serde_json::Value = serde_json::from_str(&out.1).unwrap();
    assert_eq!(
        body["client_identity"],
        spiffe("trellis-system", "ingressgateway"),
        "{body}"
    );
    assert_eq!(
        served_subject(&shop.outsider, https, "shop.example"),
        "subject=CN = shop one"
    );

    // 80/20 at the gateway: 200 requests on one connection.
    let (code, bodies) = curl(
        &shop.outsider,
        &ca,
        "shop.example",
        https,
        "https://shop.example/[1-200]",
        &[],
    );
    assert_eq!(code, 0, "{bodies}");
    let pods: Vec<String> = serde_json::Deserializer::from_str(&bodies)
        .into_iter::<serde_json::Value>()
        .map(|b| b.unwrap()["pod"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(pods.len(), 200);
    let to_v2 = pods.iter().filter(|p| *p == "server-v2").count();
    // 40 expected; the bounds are more than three standard deviations (5.7) away.
    assert!((20..=60).contains(&to_v2), "{to_v2} of 200 went to v2");

    // A Host no VirtualService bound to the gateway serves: 404, over HTTPS and plain HTTP.
    let (_, answer) = curl(
        &shop.outsider,
        &ca,
        "shop.example",
        https,
        "https://shop.example/",
        &[
            "-H",
            "Host: other.example",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
        ],
    );
    assert_eq!(answer, "404");
    let http = addr(gw.ip4, 80);
    let (_, answer) = curl(
        &shop.outsider,
        &ca,
        "other.example",
        http,
        "http://other.example/",
        &["-o", "/dev/null", "-w", "%{http_code}"],
    );
    assert_eq!(answer, "404");
    let (code, answer) = curl(
        &shop.outsider,
        &ca,
        "shop.example",
        http,
        "http://shop.example/v2",
        &[],
    );
    assert!(code == 0 && answer.contains("server-v2"), "{answer}");

    // Straight to the server from outside, past the gateway: refused by its policy.
    let (_, answer) = curl(
        &shop.outsider,
        &ca,
        "x",
        addr(shop.server.ip4, 9080),
        "http://x:9080/",
        &["-o", "/dev/null", "-w", "%{http_code}"],
    );
    assert_eq!(answer, "403");

    // The gateway's own AuthorizationPolicy, decided per request: /admin is denied from outside.
    // (On the TLS passthrough port its path is not seen, so, as Istio does, the DENY would apply
    // to every connection there: it names port 443 only.)
    shop.control.write(
        "gw-authz.yaml",
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: no-admin, namespace: trellis-system}\n\
         spec: {selector: {matchLabels: {app: ingressgateway}}, action: DENY, rules: [{to: [{operation: {ports: [\"443\"], paths: [\"/admin*\"]}}]}]}\n",
    );
    let mut answer = (0, String::new());
    shop.eventually("the gateway's policy in force", || {
        answer = curl(
            &shop.outsider,
            &ca,
            "shop.example",
            https,
            "https://shop.example/admin/x",
            &[],
        );
        answer.1 == "RBAC: access denied"
    });
    let (code, answer) = curl(
        &shop.outsider,
        &ca,
        "shop.example",
        https,
        "https://shop.example/v2/ok",
        &[],
    );
    assert!(code == 0 && answer.contains("server-v2"), "{answer}");
    assert!(
        shop.agents[1]
            .log_text()
            .contains("trellis-system/no-admin")
    );

    // Certificate rotation, without a restart: the Secret rewritten, then the files.
    shop.control.write(
        "shop-cert.yaml",
        &tls_secret(
            "trellis-system",
            "shop-cert",
            &server_cert(&issuer, "shop.example", "shop two"),
        ),
    );
    shop.eventually("the rotated Secret served", || {
        served_subject(&shop.outsider, https, "shop.example") == "subject=CN = shop two"
    });
    assert_eq!(
        served_subject(&shop.outsider, https, "files.example"),
        "subject=CN = files one"
    );
    let (code, answer) = curl(
        &shop.outsider,
        &ca,
        "files.example",
        https,
        "https://files.example/v2",
        &[],
    );
    assert!(code == 0 && answer.contains("server-v2"), "{answer}");
    let files_v2 = server_cert(&issuer, "files.example", "files two");
    std::fs::write(&files_key, &files_v2.1).unwrap();
    std::fs::write(&files_crt, &files_v2.0).unwrap();
    shop.eventually("the rotated files served", || {
        served_subject(&shop.outsider, https, "files.example") == "subject=CN = files two"
    });
    // A bad Secret is refused by control; the last good certificate keeps serving.
    shop.control.write(
        "shop-cert.yaml",
        &tls_secret(
            "trellis-system",
            "shop-cert",
            &("junk".into(), "junk".into()),
        ),
    );
    shop.eventually("control reports the bad Secret", || {
        shop.control
            .log_text()
            .contains("data.tls.crt: no PEM certificate in it")
    });
    let (code, answer) = curl(
        &shop.outsider,
        &ca,
        "shop.example",
        https,
        "https://shop.example/v2",
        &[],
    );
    assert!(code == 0 && answer.contains("server-v2"), "{answer}");

    // TLS passed through by SNI: the client gets the server's own certificate, end to end.
    let passthrough = addr(gw.ip4, 8443);
    let mut out = (0, String::new());
    shop.eventually("TLS through the gateway", || {
        out = curl(
            &shop.outsider,
            &ca,
            "secure.example",
            passthrough,
            "https://secure.example:8443/",
            &[],
        );
        out.0 == 0 && out.1.contains("s_server")
    });
    assert_eq!(
        served_subject(&shop.outsider, passthrough, "secure.example"),
        "subject=CN = secure"
    );
    // An SNI no route takes: closed, nothing served.
    let (code, _) = curl(
        &shop.outsider,
        &ca,
        "unknown.example",
        passthrough,
        "https://unknown.example:8443/",
        &[],
    );
    assert_ne!(code, 0);

    // The gateway's node counted the requests it routed, with the gateway as the source and the
    // subset's version as the destination; the server's node saw the gateway's principal.
    let m = metrics(n2);
    let routed = sample(
        &m,
        "istio_requests_total",
        &[
            ("reporter", "source"),
            ("source_workload", "ingressgateway"),
            ("destination_version", "v2"),
            ("destination_service", "server.shop.svc.cluster.local"),
            ("response_code", "200"),
        ],
    );
    assert!(routed.is_some_and(|n| n >= 20.0), "{m}");
    let m1 = metrics(n1);
    let seen = sample(
        &m1,
        "istio_requests_total",
        &[
            ("reporter", "destination"),
            (
                "source_principal",
                &spiffe("trellis-system", "ingressgateway"),
            ),
            ("destination_workload", "server-v2"),
            ("connection_security_policy", "mutual_tls"),
        ],
    );
    assert!(seen.is_some_and(|n| n >= 20.0), "{m1}");
    let _ = s_server.kill();
    let _ = s_server.wait();
}

//! End-to-end tests of the mesh data path on the real kernel: two nodes (network namespaces)
//! with an agent each, control in dir mode, pods talking through HBONE (HTTP/2 CONNECT over
//! mutual TLS 1.3) between the nodes' proxies.
mod shop;

use std::{
    process::Command,
    sync::Arc,
    time::{Duration, Instant},
};

use shop::*;
use trellis_e2e::{outside::contains, sys};

#[test]
fn cross_node_traffic_is_mutual_tls_with_true_identities_both_ways() {
    let shop = Shop::start();
    let (n1, n2) = (&shop.cluster.nodes[0], &shop.cluster.nodes[1]);

    // Through the service VIP (round robin over one endpoint), and to pod IPs of both families.
    for (from, to, server, agent) in [
        (&shop.client, shop.vip(80), "server", &shop.agents[1]),
        (
            &shop.client,
            addr(shop.server.ip6, 8080),
            "server",
            &shop.agents[1],
        ),
        (
            &shop.server,
            addr(shop.client.ip4, 8080),
            "client",
            &shop.agents[0],
        ),
    ] {
        let out = from.connect(to, "ping");
        assert_eq!(
            out["echo"],
            "ping",
            "{} -> {to}: {out}\n{}",
            from.name,
            shop.logs()
        );
        assert_eq!(out["banner"]["server"], server, "{out}");
        // The app sees a connection from its own pod address (the proxy's onward hop).
        let stream = agent.wait_log("the HBONE stream", |v| {
            v["message"] == "HBONE stream" && v["client_identity"] == spiffe("shop", &from.name)
        });
        assert_eq!(stream["pod"], format!("shop/{server}"), "{stream}");
    }

    // Many at once, each with its own payload.
    std::thread::scope(|scope| {
        let threads: Vec<_> = (0..40)
            .map(|i| {
                let (c, to) = (&shop.client, shop.vip(80));
                let data = format!("payload-{i}-{}", "x".repeat(i * 100));
                scope.spawn(move || (c.connect(to, &data), data))
            })
            .collect();
        for (i, t) in threads.into_iter().enumerate() {
            let (out, data) = t.join().unwrap();
            assert_eq!(out["echo"], data.as_str(), "connection {i}: {out}");
        }
    });

    // Large transfers, byte-exact, both directions at once (the echo sends it all back).
    for _ in 0..2 {
        let out = blast(&shop.client, shop.vip(7000), 64 << 20);
        assert_eq!(out["ok"], true, "{out}\n{}", shop.logs());
    }

    // Istio's metrics, from both ends.
    let src = metrics(n1);
    let labels = [
        ("source_principal", spiffe("shop", "client")),
        ("destination_principal", spiffe("shop", "server")),
        ("connection_security_policy", "mutual_tls".to_owned()),
    ];
    let labels: Vec<(&str, &str)> = labels.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut with = labels.clone();
    with.push(("reporter", "source"));
    with.push(("destination_service", "server.shop.svc.cluster.local"));
    let opened = sample(&src, "istio_tcp_connections_opened_total", &with)
        .unwrap_or_else(|| panic!("no source-side sample:\n{src}"));
    assert!(opened >= 41.0, "opened {opened}\n{src}");
    let dst = metrics(n2);
    let mut with = labels.clone();
    with.push(("reporter", "destination"));
    with.push(("source_workload", "client"));
    let received = sample(&dst, "istio_tcp_received_bytes_total", &with)
        .unwrap_or_else(|| panic!("no destination-side sample:\n{dst}"));
    assert!(received >= (128 << 20) as f64, "received {received}\n{dst}");
}

#[test]
fn bytes_are_counted_while_a_connection_is_still_open() {
    let shop = Shop::start();
    // A long transfer through the VIP.
    let mut child = long_blast(&shop.client, shop.vip(7000));
    let with = [
        ("reporter", "source"),
        ("destination_service", "server.shop.svc.cluster.local"),
    ];
    let deadline = Instant::now() + Duration::from_secs(20);
    let src = loop {
        let src = metrics(&shop.cluster.nodes[0]);
        let received = sample(&src, "istio_tcp_received_bytes_total", &with).unwrap_or(0.0);
        let sent = sample(&src, "istio_tcp_sent_bytes_total", &with).unwrap_or(0.0);
        if received >= (64 << 20) as f64 && sent >= (64 << 20) as f64 {
            break src;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "the transfer ended before its bytes were counted:\n{src}"
        );
        assert!(Instant::now() < deadline, "bytes never counted:\n{src}");
        std::thread::sleep(Duration::from_millis(100));
    };
    // Counted while open: the connection has not closed.
    let opened = sample(&src, "istio_tcp_connections_opened_total", &with).unwrap_or(0.0);
    let closed = sample(&src, "istio_tcp_connections_closed_total", &with).unwrap_or(0.0);
    assert!(opened > closed, "opened {opened}, closed {closed}\n{src}");
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn the_wire_between_nodes_carries_tls_not_plaintext() {
    let shop = Shop::start();
    let marker = format!("TRELLIS-SECRET-{}", sys::unique_name());
    let pcap = capture_link(&shop, "tcp", || {
        let out = shop.client.connect(shop.vip(80), &marker);
        assert_eq!(out["echo"], marker.as_str(), "{out}\n{}", shop.logs());
    });
    assert!(
        !contains(&pcap, marker.as_bytes()),
        "the payload crossed the link in plaintext"
    );
    // A TLS 1.3 handshake (record type 22, legacy version 3.1 or 3.3) to port 15008 did.
    assert!(
        contains(&pcap, &[0x16, 0x03, 0x01]) || contains(&pcap, &[0x16, 0x03, 0x03]),
        "no TLS handshake on the link ({} bytes captured)",
        pcap.len()
    );
    assert!(
        contains(&pcap, &15008u16.to_be_bytes()),
        "nothing to port 15008"
    );
    // The capture does see plaintext when there is some: the outsider is not in the mesh.
    let pcap = capture_link(&shop, "tcp", || {
        let out = shop.outsider.connect(addr(shop.server.ip4, 8080), &marker);
        assert_eq!(out["echo"], marker.as_str(), "{out}");
    });
    assert!(
        contains(&pcap, marker.as_bytes()),
        "the capture missed a plaintext payload; the check above proves nothing"
    );
}

#[test]
fn strict_peer_authentication_refuses_plaintext_even_while_the_agent_is_down() {
    let mut shop = Shop::start();
    let server = addr(shop.server.ip4, 8080);
    // PERMISSIVE (the default): a pod outside the mesh reaches a mesh pod in plaintext.
    let out = shop.outsider.connect(server, "hello");
    assert_eq!(out["echo"], "hello", "{out}");
    assert_eq!(out["banner"]["server"], "server");

    shop.control.write("pa.yaml", &peer_auth("STRICT"));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = shop.outsider.connect(server, "hello");
        if out.get("banner").is_none() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "STRICT not enforced within 10 s: {out}\n{}",
            shop.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    shop.agents[1].wait_log("the refusal", |v| {
        v["message"] == "plaintext refused: PeerAuthentication is STRICT"
    });
    // Mesh traffic still flows (it arrives over HBONE, not as plaintext).
    let out = shop.client.connect(shop.vip(80), "mesh");
    assert_eq!(out["echo"], "mesh", "{out}\n{}", shop.logs());
    // The server's own node (kubelet's health probes) still reaches it in plaintext; another
    // node does not.
    let out = shop.cluster.nodes[1].connect(server, "probe");
    assert_eq!(out["echo"], "probe", "{out}\n{}", shop.logs());
    // It was taken by the proxy (not missed by the capture), from the node's bridge address.
    let bridge = format!("10.244.{}.1:", shop.cluster.nodes[1].index);
    shop.agents[1].wait_log("the probe's capture", |v| {
        v["message"] == "connection captured"
            && v["direction"] == "inbound"
            && v["client"].as_str().is_some_and(|c| c.starts_with(&bridge))
    });
    let out = shop.cluster.nodes[0].connect(server, "probe");
    assert!(
        out.get("banner").is_none(),
        "another node's plaintext reached a STRICT pod: {out}"
    );

    // No agent on the server's node: the kernel drops plaintext to the STRICT pod rather than
    // letting it through to the app.
    std::thread::sleep(Duration::from_millis(600)); // the agent syncs STRICT marks every 0.5 s
    shop.agents[1].kill9();
    let out = shop.outsider.connect(server, "sneak");
    assert!(
        out.get("banner").is_none(),
        "plaintext reached a STRICT pod: {out}"
    );

    // Back to PERMISSIVE, with the agent back: plaintext is served again.
    shop.agents[1].restart();
    shop.control.write("pa.yaml", &peer_auth("PERMISSIVE"));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = shop.outsider.connect(server, "again");
        if out["echo"] == "again" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "PERMISSIVE not restored: {out}\n{}",
            shop.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn impostors_are_refused_at_both_ends() {
    let shop = Shop::start_on(3, &[]);
    let ca = shop.control.ca_dir();
    let root = std::fs::read_to_string(ca.join("ca.pem")).unwrap();
    let key =
        rcgen::KeyPair::from_pem(&std::fs::read_to_string(ca.join("ca-key.pem")).unwrap()).unwrap();
    let mesh = rcgen::Issuer::from_ca_cert_pem(&root, key).unwrap();
    let foreign = {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        rcgen::Issuer::new(params, key)
    };
    let hour = time::Duration::hours(1);
    let client_id = spiffe("shop", "client");
    let hbone = addr(shop.server.ip4, 15008);
    let target = addr(shop.server.ip4, 8080);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let call = |svid| rt.block_on(hbone_call(&shop.outsider.netns, hbone, target, svid));

    // A properly signed, current certificate gets through: the harness itself works.
    let banner =
        call(svid(&mesh, &client_id, -hour, hour, &root)).expect("a valid client was refused");
    assert!(banner.contains("\"server\":\"server\""), "{banner}");
    // Another CA's certificate, an expired one, one not yet valid: refused.
    for (what, bad) in [
        ("another CA", svid(&foreign, &client_id, -hour, hour, &root)),
        ("expired", svid(&mesh, &client_id, -hour * 2, -hour, &root)),
        (
            "not yet valid",
            svid(&mesh, &client_id, hour, hour * 2, &root),
        ),
    ] {
        let got = call(bad);
        assert!(
            got.is_err(),
            "a client with a certificate from {what} got through: {got:?}"
        );
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let refusals = shop.agents[1]
            .logs()
            .iter()
            .filter(|v| v["message"] == "HBONE handshake refused")
            .count();
        if refusals >= 3 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "server agent logged {refusals} refusals:\n{}",
            shop.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // A server with the wrong identity: control says the rogue pod (on node 3, which has no
    // agent) runs as shop/rogue, but what answers on its HBONE port proves shop/server.
    let n3 = &shop.cluster.nodes[2];
    let rogue = n3.add_pod("rogue");
    let mut holder = rogue.spawn_app(Command::new("sleep").arg("120")).unwrap();
    let rogue_ns = trellis_agent::netns::Netns::of_pid(holder.id()).unwrap();
    let home = trellis_agent::netns::Netns::current().unwrap();
    let listener = rogue_ns
        .run_in(&home, || std::net::TcpListener::bind("[::]:15008"))
        .unwrap()
        .unwrap();
    listener.set_nonblocking(true).unwrap();
    let impostor = trellis_agent::tls::WorkloadTls::new(svid(
        &mesh,
        &spiffe("shop", "server"),
        -hour,
        hour,
        &root,
    ))
    .unwrap();
    let handshakes = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = handshakes.clone();
    rt.spawn(async move {
        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(impostor.server.clone());
        while let Ok((tcp, _)) = listener.accept().await {
            if let Ok(tls) = acceptor.accept(tcp).await {
                seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::time::sleep(Duration::from_secs(5)).await;
                drop(tls);
            }
        }
    });
    shop.control.write(
        "rogue.yaml",
        &pod_yaml(&rogue, "shop", n3, "rogue", "rogue"),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let line = loop {
        let out = shop.client.connect(addr(rogue.ip4, 8080), "secret");
        assert!(out.get("banner").is_none(), "reached the impostor: {out}");
        if let Some(line) = shop.agents[0].logs().into_iter().find(|v| {
            v["message"]
                .as_str()
                .is_some_and(|m| m.contains("presented") && m.contains("refusing it"))
        }) {
            break line;
        }
        assert!(
            Instant::now() < deadline,
            "no identity refusal logged:\n{}",
            shop.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let message = line["message"].as_str().unwrap();
    assert!(
        message.contains(&spiffe("shop", "server")) && message.contains(&spiffe("shop", "rogue")),
        "{message}"
    );
    assert!(
        handshakes.load(std::sync::atomic::Ordering::SeqCst) >= 1,
        "the proxy never reached the impostor"
    );
    let _ = holder.kill();
    let _ = holder.wait();
}

#[test]
fn the_mesh_rides_out_a_control_outage_and_an_agent_restart() {
    let mut shop = Shop::start();
    let bulk = shop.vip(7000);

    // Control stops: connections held across the moment and new ones keep working.
    let run = churn(&shop.client, bulk, 4, 3);
    std::thread::sleep(Duration::from_millis(500));
    shop.control.kill();
    let out = report(run);
    assert_eq!(
        out["lost"], 0,
        "connections lost while control was away: {out}"
    );
    let probes = out["probes"].as_array().unwrap();
    assert!(probes.len() > 20, "{out}");
    assert!(
        probes.iter().all(|p| p[1] == true),
        "a new connection failed while control was away: {out}\n{}",
        shop.logs()
    );

    // A change made while control was away reaches the agents once it is back (resync).
    shop.control.write("pa.yaml", &peer_auth("STRICT"));
    shop.control.restart(&shop.cluster);
    let deadline = Instant::now() + Duration::from_secs(20);
    while shop
        .outsider
        .connect(addr(shop.server.ip4, 8080), "x")
        .get("banner")
        .is_some()
    {
        assert!(
            Instant::now() < deadline,
            "the agents did not resync with control:\n{}",
            shop.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // The client node's agent is killed and restarted under load.
    let held = 8;
    let run = churn(&shop.client, bulk, held, 6);
    std::thread::sleep(Duration::from_millis(1500));
    shop.agents[0].kill9();
    let restarted = unix_ms();
    shop.agents[0].restart();
    let ready_ms = unix_ms() - restarted;
    let out = report(run);
    let probes = out["probes"].as_array().unwrap();
    let back = probes
        .iter()
        .find(|p| p[0].as_u64().unwrap() >= restarted && p[1] == true)
        .unwrap_or_else(|| {
            panic!(
                "no new connection worked after the restart: {out}\n{}",
                shop.logs()
            )
        });
    let recovered_ms = back[0].as_u64().unwrap() - restarted;
    let failed = probes.iter().filter(|p| p[1] == false).count();
    println!(
        "agent restart under load: {} of {held} in-flight connections lost; {failed} new connections \
         failed; new connections worked again {recovered_ms} ms after the new agent started \
         (ready after {ready_ms} ms)",
        out["lost"]
    );
    assert!(
        recovered_ms <= 2000,
        "new connections took {recovered_ms} ms to work again: {out}"
    );
    // Once back, every later probe works.
    assert!(
        probes
            .iter()
            .filter(|p| p[0].as_u64().unwrap() > back[0].as_u64().unwrap())
            .all(|p| p[1] == true),
        "connections failed after recovery: {out}"
    );
}

#[test]
fn http_ports_tell_the_app_the_verified_caller_and_strip_forgeries() {
    let shop = Shop::start();
    let forged = format!(
        "x-forwarded-client-cert: By=x;URI={}",
        spiffe("shop", "admin")
    );
    // Over the mesh: the app sees the caller's verified identity, whatever the caller claimed.
    for url in [
        format!("http://{VIP}:8081/"),
        format!("http://{}:9080/", shop.server.ip4),
    ] {
        let body = http_get(&shop.client, &url, &[&forged]);
        assert_eq!(
            body["client_identity"],
            spiffe("shop", "client"),
            "{url}: {body}\n{}",
            shop.logs()
        );
    }
    // In plaintext (PERMISSIVE) from outside the mesh: no identity, and the forgery is removed.
    let body = http_get(
        &shop.outsider,
        &format!("http://{}:9080/", shop.server.ip4),
        &[&forged],
    );
    assert!(body["client_identity"].is_null(), "{body}");
    // Not an HTTP port: bytes pass untouched (the echo app's banner and echo).
    let out = shop.client.connect(shop.vip(80), "GET / HTTP/1.1\r\n\r\n");
    assert_eq!(out["echo"], "GET / HTTP/1.1\r\n\r\n", "{out}");
}

#[test]
fn certificate_renewal_under_load_drops_no_connection() {
    // 10 s certificates: each agent renews at half life, every 5 s, during the run.
    let shop = Shop::start_on(2, &["--workload-cert-ttl", "10s"]);
    let run = churn(&shop.client, shop.vip(7000), 4, 12);
    let out = report(run);
    assert_eq!(out["lost"], 0, "connections lost across renewals: {out}");
    let probes = out["probes"].as_array().unwrap();
    assert!(
        probes.iter().all(|p| p[1] == true),
        "a new connection failed across renewals: {out}\n{}",
        shop.logs()
    );
    for (agent, sa) in [(&shop.agents[0], "client"), (&shop.agents[1], "server")] {
        let issued = agent
            .logs()
            .iter()
            .filter(|v| v["message"] == "certificate issued" && v["identity"] == spiffe("shop", sa))
            .count();
        assert!(
            issued >= 3,
            "{sa}: {issued} certificates issued, wanted renewals:\n{}",
            shop.logs()
        );
    }
}

#[test]
fn same_node_streams_skip_tls_but_keep_identity_policy_and_metrics() {
    let shop = Shop::start();
    let n1 = &shop.cluster.nodes[0];
    // A second mesh pod on the client's node: its streams to the client pod stay on the node.
    let neighbour = n1.add_pod("neighbour");
    shop.control.write(
        "neighbour.yaml",
        &pod_yaml(&neighbour, "shop", n1, "neighbour", "neighbour"),
    );
    shop.agents[0].wait_pod_state(&neighbour, "enrolled");
    wait_certificate(&shop.agents[0], &spiffe("shop", "neighbour"));
    serve_bulk(&shop.client);

    for to in [addr(shop.client.ip4, 8080), addr(shop.client.ip6, 8080)] {
        let out = neighbour.connect(to, "ping");
        assert_eq!(out["echo"], "ping", "{to}: {out}\n{}", shop.logs());
        assert_eq!(out["banner"]["server"], "client", "{out}");
    }
    let stream = shop.agents[0].wait_log("the local stream", |v| {
        v["message"] == "local stream" && v["client_identity"] == spiffe("shop", "neighbour")
    });
    assert_eq!(stream["pod"], "shop/client", "{stream}");
    let out = blast(&neighbour, addr(shop.client.ip4, 7000), 64 << 20);
    assert_eq!(out["ok"], true, "{out}\n{}", shop.logs());
    // No HBONE connection between the two pods: none in either's network namespace...
    for pod in [&neighbour, &shop.client] {
        let sockets = pod.hbone_sockets();
        assert!(sockets.is_empty(), "{}: {sockets:?}", pod.name);
    }
    // ...where the pooled one to the other node shows once the client calls there.
    assert_eq!(shop.client.connect(shop.vip(80), "x")["echo"], "x");
    assert!(!shop.client.hbone_sockets().is_empty());

    // Both reporters count it as an HBONE stream between the two identities.
    let m = metrics(n1);
    for (reporter, min) in [
        ("source", (64u64 << 20) as f64),
        ("destination", (64u64 << 20) as f64),
    ] {
        let with = [
            ("reporter", reporter),
            ("source_workload", "neighbour"),
            ("source_principal", &spiffe("shop", "neighbour")),
            ("destination_workload", "client"),
            ("destination_principal", &spiffe("shop", "client")),
            ("connection_security_policy", "mutual_tls"),
        ];
        let received = sample(&m, "istio_tcp_received_bytes_total", &with)
            .unwrap_or_else(|| panic!("no {reporter} sample:\n{m}"));
        assert!(received >= min, "{reporter} received {received}\n{m}");
        let opened = sample(&m, "istio_tcp_connections_opened_total", &with).unwrap_or(0.0);
        assert!(opened >= 3.0, "{reporter} opened {opened}\n{m}");
    }

    // The destination's policies see the caller's identity: a DENY for the neighbour closes its
    // open stream and refuses new ones, while the server (same port, other node) still passes.
    let mut child = long_blast(&neighbour, addr(shop.client.ip4, 7000));
    shop.eventually("the long stream open", || {
        shop.agents[0]
            .logs()
            .iter()
            .filter(|v| {
                v["message"] == "local stream"
                    && v["orig_dst"] == addr(shop.client.ip4, 7000).to_string()
            })
            .count()
            >= 2
    });
    shop.control.write(
        "deny-neighbour.yaml",
        &format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
             metadata: {{name: deny-neighbour, namespace: shop}}\n\
             spec: {{selector: {{matchLabels: {{app: client}}}}, action: DENY, rules: [{{from: [{{source: {{principals: [{TD}/ns/shop/sa/neighbour]}}}}]}}]}}\n"
        ),
    );
    shop.agents[0].wait_log("the open stream's closing", |v| {
        v["message"] == "open connection closed: an AuthorizationPolicy now denies it"
            && v["policy"] == "shop/deny-neighbour"
    });
    shop.eventually("the long stream ended", || {
        child.try_wait().unwrap().is_some()
    });
    let out = neighbour.connect(addr(shop.client.ip4, 8080), "x");
    assert_ne!(out["echo"], "x", "{out}");
    shop.agents[0].wait_log("the new stream's denial", |v| {
        v["message"] == "denied by AuthorizationPolicy"
            && v["policy"] == "shop/deny-neighbour"
            && v["client_identity"] == spiffe("shop", "neighbour")
    });
    let out = shop.server.connect(addr(shop.client.ip4, 8080), "y");
    assert_eq!(out["echo"], "y", "{out}\n{}", shop.logs());
}

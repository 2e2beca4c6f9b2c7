//! The egress gateway on the real kernel: a meshed client reaches a host outside the mesh only
//! through a gateway pod (client node proxy → HBONE mutual TLS → the gateway's node proxy → the
//! host), configured with Istio's own egress-gateway objects (ServiceEntry, Gateway, a
//! VirtualService bound to the mesh and to the gateway); the gateway's AuthorizationPolicy lets
//! only one identity through.
mod shop;

use shop::{
    Shop, addr, capture_link, contains,
    dns::{Dnsmasq, dig},
    metrics, namespace, pod_yaml, sample, spiffe, wait_certificate,
};

const GATEWAY_VIP: &str = "10.96.0.30";

fn config() -> Vec<(&'static str, String)> {
    vec![
        ("se.yaml", "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: memorystore, namespace: shop}\n\
          spec: {hosts: [redis.memorystore.example], location: MESH_EXTERNAL, resolution: DNS, \
          ports: [{number: 6379, name: tcp-redis, protocol: TCP}]}\n".into()),
        ("gw-svc.yaml", format!("apiVersion: v1\nkind: Service\nmetadata: {{name: egressgateway, namespace: trellis-system}}\n\
          spec: {{clusterIP: {GATEWAY_VIP}, selector: {{app: egressgateway}}, ports: [{{name: tcp-redis, port: 16379, targetPort: 16379}}]}}\n")),
        ("gw.yaml", "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: egressgateway, namespace: trellis-system}\n\
          spec: {selector: {app: egressgateway}, servers: [{port: {number: 16379, name: tcp-redis, protocol: TCP}, hosts: [redis.memorystore.example]}]}\n".into()),
        ("vs.yaml", "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: redis-through-egress, namespace: shop}\n\
          spec: {hosts: [redis.memorystore.example], gateways: [mesh, trellis-system/egressgateway], tcp: [\
          {match: [{gateways: [mesh], port: 6379}], route: [{destination: {host: egressgateway.trellis-system.svc.cluster.local, port: {number: 16379}}}]}, \
          {match: [{gateways: [trellis-system/egressgateway], port: 16379}], route: [{destination: {host: redis.memorystore.example, port: {number: 6379}}}]}]}\n".into()),
        ("gw-authz.yaml", format!("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: only-client, namespace: trellis-system}}\n\
          spec: {{selector: {{matchLabels: {{app: egressgateway}}}}, action: ALLOW, rules: [{{from: [{{source: {{principals: [\"{}\"]}}}}]}}]}}\n",
          spiffe("shop", "client").trim_start_matches("spiffe://"))),
    ]
}

#[test]
fn a_meshed_client_reaches_an_external_host_only_through_the_egress_gateway() {
    let mut shop = Shop::start();
    // The gateway pod, in the mesh on node 2 (the outsider, the "managed Redis", is on node 1).
    let gw = shop.cluster.nodes[1].add_pod("egressgateway");
    shop.outsider.serve(6379);
    let dns = Dnsmasq::start_with(
        &shop.outsider,
        &[&format!(
            "--address=/redis.memorystore.example/{}",
            shop.outsider.ip4
        )],
    );
    // The gateway pod never asks a resolver itself: its node resolves external hosts here.
    let upstream = addr(shop.outsider.ip4, 53).to_string();
    shop.agents[1].restart_with(&["--dns-upstream", &upstream]);
    shop.control
        .write("ns-system.yaml", &namespace("trellis-system", true));
    shop.control.write(
        "gw-pod.yaml",
        &pod_yaml(
            &gw,
            "trellis-system",
            &shop.cluster.nodes[1],
            "egressgateway",
            "egressgateway",
        ),
    );
    for (name, yaml) in config() {
        shop.control.write(name, &yaml);
    }
    shop.agents[1].wait_pod_state(&gw, "enrolled");
    wait_certificate(&shop.agents[1], &spiffe("trellis-system", "egressgateway"));

    let at = format!("@{}", shop.outsider.ip4);
    let mut vip = String::new();
    shop.eventually("the external host answered with its mesh address", || {
        vip = dig(&shop.client, &[&at, "redis.memorystore.example"]);
        vip.starts_with("240.240.")
    });
    let to = addr(vip.parse::<std::net::Ipv4Addr>().unwrap(), 6379);

    // The client's connection by name reaches Redis from the gateway's address, not its own.
    let mut out = serde_json::Value::Null;
    shop.eventually("the route through the gateway", || {
        out = shop.client.connect(to, "PING");
        out["echo"] == "PING"
    });
    assert_eq!(out["banner"]["server"], "outsider", "{out}");
    let peer = out["banner"]["peer"].as_str().unwrap_or_default();
    assert!(
        peer.contains(&gw.ip4.to_string()),
        "Redis saw {peer}, not the gateway\n{out}"
    );

    // The gateway's node proxy saw the client's identity, counted it with the external host as
    // the destination, and its node asked the resolver (not the client's node).
    let m = metrics(&shop.cluster.nodes[1]);
    let through = sample(
        &m,
        "istio_tcp_connections_opened_total",
        &[
            ("reporter", "destination"),
            ("source_principal", &spiffe("shop", "client")),
            ("destination_workload", "egressgateway"),
            ("destination_service", "redis.memorystore.example"),
        ],
    );
    assert!(through.is_some_and(|n| n >= 1.0), "{m}");
    assert!(
        dns.log().contains(&format!(
            "query[A] redis.memorystore.example from {}",
            gw.ip4
        )),
        "{}",
        dns.log()
    );

    // Another identity (the server pod, shop/server) is refused at the gateway by its policy.
    let denied = shop.server.connect(to, "PING");
    assert_ne!(denied["echo"], "PING", "{denied}");
    shop.agents[1].wait_log("the gateway's denial, naming its policy", |v| {
        v["message"] == "denied by AuthorizationPolicy"
            && v["pod"] == "trellis-system/egressgateway"
            && v["client_identity"] == spiffe("shop", "server").as_str()
            && v["allow_policies"] == "trellis-system/only-client"
    });

    // On the wire: the client-to-gateway leg (HBONE, 15008) carries no Redis command in
    // plaintext; the gateway-to-Redis leg (6379, outside the mesh) does, as it would without
    // TLS origination, which shows the marker is on the wire to be found.
    let marker = "SET cart-42 secret-basket";
    let hbone = capture_link(&shop, "tcp port 15008", || {
        assert_eq!(shop.client.connect(to, marker)["echo"], marker);
    });
    assert!(
        contains(&hbone, &15008u16.to_be_bytes()),
        "no HBONE captured"
    );
    assert!(
        !contains(&hbone, marker.as_bytes()),
        "the command crossed the mesh in plaintext"
    );
    let outside = capture_link(&shop, "tcp port 6379", || {
        assert_eq!(shop.client.connect(to, marker)["echo"], marker);
    });
    assert!(
        contains(&outside, marker.as_bytes()),
        "the gateway's upstream leg was not captured"
    );
}

//! The scenario the project grew from, on the real kernel: `cart` (here the shop's `client`,
//! service account shop/client) reaches a managed Redis outside the mesh
//! (`redis.memorystore.example`: Debian's redis-server, named by a real dnsmasq, in the
//! `legacy` outsider's namespace) only through an egress gateway pod: client node proxy → HBONE
//! mutual TLS → the gateway's node proxy → Redis. Configured with Istio's own egress-gateway
//! objects (ServiceEntry, Gateway, a VirtualService bound to the mesh and to the gateway); the
//! gateway's AuthorizationPolicy lets only shop/client through; shop is REGISTRY_ONLY.
mod shop;

use trellis_e2e::outside::{Dnsmasq, Redis, contains, redis_cli, resolv_conf};

use shop::{
    Shop, addr, capture_link, metrics, namespace, pod_yaml, sample, spiffe, wait_certificate,
};

const GATEWAY_VIP: &str = "10.96.0.30";
const HOST: &str = "redis.memorystore.example";

fn config() -> Vec<(&'static str, String)> {
    vec![
        ("ns-shop.yaml", "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {trellis.dev/mesh: enabled, \
          trellis.dev/outbound-traffic-policy: REGISTRY_ONLY}}\n".into()),
        ("se.yaml", format!("apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: memorystore, namespace: shop}}\n\
          spec: {{hosts: [{HOST}], location: MESH_EXTERNAL, resolution: DNS, \
          ports: [{{number: 6379, name: tcp-redis, protocol: TCP}}]}}\n")),
        ("gw-svc.yaml", format!("apiVersion: v1\nkind: Service\nmetadata: {{name: egressgateway, namespace: trellis-system}}\n\
          spec: {{clusterIP: {GATEWAY_VIP}, selector: {{app: egressgateway}}, ports: [{{name: tcp-redis, port: 16379, targetPort: 16379}}]}}\n")),
        ("gw.yaml", format!("apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {{name: egressgateway, namespace: trellis-system}}\n\
          spec: {{selector: {{app: egressgateway}}, servers: [{{port: {{number: 16379, name: tcp-redis, protocol: TCP}}, hosts: [{HOST}]}}]}}\n")),
        ("vs.yaml", format!("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: redis-through-egress, namespace: shop}}\n\
          spec: {{hosts: [{HOST}], gateways: [mesh, trellis-system/egressgateway], tcp: [\
          {{match: [{{gateways: [mesh], port: 6379}}], route: [{{destination: {{host: egressgateway.trellis-system.svc.cluster.local, port: {{number: 16379}}}}}}]}}, \
          {{match: [{{gateways: [trellis-system/egressgateway], port: 16379}}], route: [{{destination: {{host: {HOST}, port: {{number: 6379}}}}}}]}}]}}\n")),
        ("gw-authz.yaml", format!("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: only-cart, namespace: trellis-system}}\n\
          spec: {{selector: {{matchLabels: {{app: egressgateway}}}}, action: ALLOW, rules: [{{from: [{{source: {{principals: [\"{}\"]}}}}]}}]}}\n",
          spiffe("shop", "client").trim_start_matches("spiffe://"))),
    ]
}

#[test]
fn cart_reaches_memorystore_only_through_the_egress_gateway() {
    let mut shop = Shop::start();
    // The gateway pod, in the mesh on node 2 (Redis, the outsider, is on node 1).
    let gw = shop.cluster.nodes[1].add_pod("egressgateway");
    let _redis = Redis::start(&shop.outsider);
    let dns = Dnsmasq::start_with(
        &shop.outsider,
        &[
            &format!("--address=/{HOST}/{}", shop.outsider.ip4),
            &format!("--address=/{HOST}/{}", shop.outsider.ip6),
        ],
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
    let conf = resolv_conf(shop.outsider.ip4, "shop");
    let cart = |args: &[&str]| redis_cli(&shop.client, Some(&conf), args);

    // 1. cart: PING, SET, GET by name, through the gateway.
    shop.eventually("cart's PING through the gateway", || {
        cart(&["-h", HOST, "PING"]) == "PONG"
    });
    assert_eq!(cart(&["-h", HOST, "SET", "cart-42", "secret-basket"]), "OK");
    assert_eq!(cart(&["-h", HOST, "GET", "cart-42"]), "secret-basket");
    // Redis saw the gateway, not cart.
    let clients = redis_cli(
        &shop.outsider,
        None,
        &["-h", &shop.outsider.ip4.to_string(), "CLIENT", "LIST"],
    );
    assert!(
        !clients.contains(&format!("addr={}:", shop.client.ip4)),
        "Redis saw cart directly: {clients}"
    );
    let m = metrics(&shop.cluster.nodes[1]);
    let through = sample(
        &m,
        "istio_tcp_connections_opened_total",
        &[
            ("reporter", "destination"),
            ("source_principal", &spiffe("shop", "client")),
            ("source_workload", "client"),
            ("destination_workload", "egressgateway"),
            ("destination_service", HOST),
        ],
    );
    assert!(through.is_some_and(|n| n >= 3.0), "{m}");
    assert!(
        dns.log()
            .contains(&format!("query[A] {HOST} from {}", gw.ip4))
            || dns
                .log()
                .contains(&format!("query[AAAA] {HOST} from {}", gw.ip4)),
        "the gateway's node did not resolve the host:\n{}",
        dns.log()
    );

    // 2. cart straight to the Redis address, bypassing the name: refused in the kernel, as is
    //    any unregistered address.
    for ip in [shop.outsider.ip4.to_string(), "192.0.2.1".to_owned()] {
        let out = cart(&["-h", &ip, "PING"]);
        assert!(out.contains("Operation not permitted"), "{ip}: {out}");
    }

    // 3. web (the shop's server, shop/server): refused at the gateway, the policy named.
    let web = redis_cli(&shop.server, Some(&conf), &["-h", HOST, "PING"]);
    assert_ne!(web, "PONG");
    shop.agents[1].wait_log("the gateway's denial, naming its policy", |v| {
        v["message"] == "denied by AuthorizationPolicy"
            && v["pod"] == "trellis-system/egressgateway"
            && v["client_identity"] == spiffe("shop", "server").as_str()
            && v["allow_policies"] == "trellis-system/only-cart"
    });

    // 4. On the wire: the cart-to-gateway leg (HBONE, 15008) carries no Redis command in
    //    plaintext; the gateway-to-Redis leg (6379, outside the mesh, no TLS origination)
    //    does, which shows the command is on the wire to be found.
    let hbone = capture_link(&shop, "tcp port 15008", || {
        assert_eq!(cart(&["-h", HOST, "SET", "cart-43", "hidden-basket"]), "OK");
    });
    assert!(
        contains(&hbone, &15008u16.to_be_bytes()),
        "no HBONE captured"
    );
    assert!(
        !contains(&hbone, b"hidden-basket"),
        "a Redis command crossed the mesh in plaintext"
    );
    let outside = capture_link(&shop, "tcp port 6379", || {
        assert_eq!(cart(&["-h", HOST, "SET", "cart-44", "hidden-basket"]), "OK");
    });
    assert!(
        contains(&outside, b"hidden-basket"),
        "the gateway's upstream leg was not captured"
    );
}

//! Act three: the scenario the project grew from. `cart` (shop/cart) reaches a managed Redis
//! outside the cluster (`redis.memorystore.example`: redis-server in a network namespace the
//! mesh does not know, named by dnsmasq there) only through an egress gateway pod; the gateway's
//! AuthorizationPolicy lets only shop/cart through; shop is REGISTRY_ONLY.
use trellis_e2e::{
    Agent, Cluster, Pod,
    control::Control,
    outside::{Dnsmasq, Redis, capture, contains, redis_cli, resolv_conf},
};

use super::{NS, pod_yaml, wait_certificates};

const HOST: &str = "redis.memorystore.example";

/// Runs the scenario and prints its four outcomes; what went wrong goes to `failures`.
pub fn act_three(
    cluster: &Cluster,
    control: &Control,
    agents: &mut [Agent],
    web: &Pod,
    failures: &mut Vec<String>,
) {
    println!(
        "\n  Egress: cart -> {HOST}:6379 (redis-server outside the mesh), only through the egress gateway"
    );
    let (n1, n2) = (&cluster.nodes[0], &cluster.nodes[1]);
    let cart = n1.add_pod("cart");
    let gateway = n2.add_pod("egressgateway");
    let outside = n1.add_pod("memorystore");
    let _redis = Redis::start(&outside);
    let _dns = Dnsmasq::start_with(
        &outside,
        &[
            &format!("--address=/{HOST}/{}", outside.ip4),
            &format!("--address=/{HOST}/{}", outside.ip6),
        ],
    );
    // The gateway pod asks no resolver itself: its node resolves external hosts with this one.
    agents[1].restart_with(&["--dns-upstream", &format!("{}:53", outside.ip4)]);
    for (name, yaml) in config(cluster, &cart, &gateway) {
        control.write(&name, &yaml);
    }
    agents[0].wait_pod_state(&cart, "enrolled");
    agents[1].wait_pod_state(&gateway, "enrolled");
    // Identities: web, reviews, user and cart on node 1; catalog, reviews and the gateway on 2.
    for (agent, want) in [(&agents[0], 4), (&agents[1], 3)] {
        if let Err(e) = wait_certificates(agent, want) {
            failures.push(format!("egress: {e:#}"));
            return;
        }
    }
    let conf = resolv_conf(outside.ip4, NS);
    let cli = |pod: &Pod, args: &[&str]| redis_cli(pod, Some(&conf), args);

    // 1. cart, by name, through the gateway.
    // The config arrives object by object: until the VirtualService does, the host is reached
    // without the gateway. Wait until the gateway's node counts cart's connections.
    let mut ping = String::new();
    for _ in 0..50 {
        ping = cli(&cart, &["-h", HOST, "PING"]);
        if ping == "PONG" && gateway_source(cluster).contains("shop/sa/cart") {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let set = cli(&cart, &["-h", HOST, "SET", "cart-42", "basket"]);
    let get = cli(&cart, &["-h", HOST, "GET", "cart-42"]);
    println!(
        "  1. cart: redis-cli -h {HOST} PING / SET cart-42 basket / GET cart-42 -> {ping} / {set} / {get}"
    );
    if (ping.as_str(), set.as_str(), get.as_str()) != ("PONG", "OK", "basket") {
        failures.push(format!(
            "egress: cart's Redis commands gave {ping:?}, {set:?}, {get:?}"
        ));
    }
    let source = gateway_source(cluster);
    println!("     the gateway's metrics: {source}");
    if !source.contains("shop/sa/cart") {
        failures.push("egress: the gateway's metrics do not show shop/cart as the source".into());
    }

    // 2. cart straight to Redis's address: refused in the kernel (REGISTRY_ONLY).
    let direct = cli(&cart, &["-h", &outside.ip4.to_string(), "PING"]);
    println!(
        "  2. cart: redis-cli -h {} PING (its address, bypassing the name) -> {direct}",
        outside.ip4
    );
    if !direct.contains("Operation not permitted") {
        failures.push(format!("egress: cart reached Redis by address: {direct:?}"));
    }

    // 3. web, another identity: refused at the gateway by its policy.
    let denied = cli(web, &["-h", HOST, "PING"]);
    let logged = agents[1].logs().into_iter().find(|v| {
        v["message"] == "denied by AuthorizationPolicy"
            && v["pod"] == "trellis-system/egressgateway"
    });
    let policy = logged
        .as_ref()
        .map(|v| {
            format!(
                "{} ({})",
                v["allow_policies"].as_str().unwrap_or("?"),
                v["client_identity"].as_str().unwrap_or("?")
            )
        })
        .unwrap_or_else(|| "not logged".into());
    println!(
        "  3. web:  redis-cli -h {HOST} PING -> {}; the gateway's log names {policy}",
        if denied.is_empty() {
            "(connection closed)"
        } else {
            &denied
        }
    );
    if denied == "PONG" || logged.is_none() {
        failures.push(format!(
            "egress: web was not refused at the gateway: {denied:?}, log {policy}"
        ));
    }

    // 4. The wire between cart's node and the gateway's: HBONE, no Redis command in plaintext.
    let pcap = capture(cluster.fabric(), "n2", "tcp port 15008", || {
        let _ = cli(&cart, &["-h", HOST, "SET", "cart-43", "hidden-basket"]);
    });
    let clear = contains(&pcap, b"hidden-basket");
    println!(
        "  4. tcpdump on node 2's link, port 15008, during SET cart-43 hidden-basket: {} bytes captured, {}",
        pcap.len(),
        if clear {
            "the command IS in plaintext"
        } else {
            "no Redis command in plaintext"
        }
    );
    if clear || pcap.is_empty() {
        failures.push("egress: the HBONE leg was not captured, or carried plaintext".into());
    }
}

/// The source principals the gateway's node counted for connections to the external host.
fn gateway_source(cluster: &Cluster) -> String {
    let node = &cluster.nodes[1].name;
    let Ok((200, m)) = trellis_e2e::sys::http_get(
        node,
        "127.0.0.1:15020".parse().expect("an address"),
        "/metrics",
    ) else {
        return "unreadable".into();
    };
    m.lines()
        .filter(|l| {
            l.starts_with("istio_tcp_connections_opened_total{")
                && l.contains(&format!("destination_service=\"{HOST}\""))
                && l.contains("reporter=\"destination\"")
        })
        .filter_map(|l| {
            let p = l.split("source_principal=\"").nth(1)?.split('"').next()?;
            Some(format!("{p} -> {HOST} x{}", l.rsplit(' ').next()?))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn config(cluster: &Cluster, cart: &Pod, gateway: &Pod) -> Vec<(String, String)> {
    let (n1, n2) = (&cluster.nodes[0], &cluster.nodes[1]);
    let gw_pod = pod_yaml(gateway, n2, "egressgateway", "egressgateway", "v1")
        .replace(&format!("namespace: {NS}"), "namespace: trellis-system");
    [
        ("ns.yaml", format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: {NS}, labels: {{trellis.dev/mesh: enabled, trellis.dev/outbound-traffic-policy: REGISTRY_ONLY}}}}\n")),
        ("ns-system.yaml", "apiVersion: v1\nkind: Namespace\nmetadata: {name: trellis-system, labels: {trellis.dev/mesh: enabled}}\n".to_owned()),
        ("cart.yaml", pod_yaml(cart, n1, "cart", "cart", "v1")),
        ("egressgateway.yaml", gw_pod),
        ("se.yaml", format!("apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: memorystore, namespace: {NS}}}\n\
          spec: {{hosts: [{HOST}], location: MESH_EXTERNAL, resolution: DNS, ports: [{{number: 6379, name: tcp-redis, protocol: TCP}}]}}\n")),
        ("gw-svc.yaml", "apiVersion: v1\nkind: Service\nmetadata: {name: egressgateway, namespace: trellis-system}\n\
          spec: {clusterIP: 10.96.0.30, selector: {app: egressgateway}, ports: [{name: tcp-redis, port: 16379, targetPort: 16379}]}\n".to_owned()),
        ("gw.yaml", format!("apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {{name: egressgateway, namespace: trellis-system}}\n\
          spec: {{selector: {{app: egressgateway}}, servers: [{{port: {{number: 16379, name: tcp-redis, protocol: TCP}}, hosts: [{HOST}]}}]}}\n")),
        ("gw-authz.yaml", "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: only-cart, namespace: trellis-system}\n\
          spec: {selector: {matchLabels: {app: egressgateway}}, action: ALLOW, rules: [{from: [{source: {principals: [cluster.local/ns/shop/sa/cart]}}]}]}\n".to_owned()),
        ("vs-redis.yaml", format!("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: redis-through-egress, namespace: {NS}}}\n\
          spec: {{hosts: [{HOST}], gateways: [mesh, trellis-system/egressgateway], tcp: [\
          {{match: [{{gateways: [mesh], port: 6379}}], route: [{{destination: {{host: egressgateway.trellis-system.svc.cluster.local, port: {{number: 16379}}}}}}]}}, \
          {{match: [{{gateways: [trellis-system/egressgateway], port: 16379}}], route: [{{destination: {{host: {HOST}, port: {{number: 6379}}}}}}]}}]}}\n")),
    ]
    .into_iter()
    .map(|(n, y)| (n.to_owned(), y))
    .collect()
}

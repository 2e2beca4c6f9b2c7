//! The scenario the project grew from, on the real kernel: `cart` (here the shop's `client`,
//! service account shop/client) reaches a managed Redis outside the mesh
//! (`redis.memorystore.example`: Debian's redis-server, named by a real dnsmasq, in the
//! `legacy` outsider's namespace) only through an egress gateway pod: client node proxy → HBONE
//! mutual TLS → the gateway's node proxy → Redis. Configured with Istio's own egress-gateway
//! objects (ServiceEntry, Gateway, a VirtualService bound to the mesh and to the gateway); the
//! gateway's AuthorizationPolicy lets only shop/client through; shop is REGISTRY_ONLY.
mod shop;

use std::path::{Path, PathBuf};

use trellis_e2e::outside::{Dnsmasq, Redis, contains, redis_cli, resolv_conf};

use shop::{Shop, addr, capture_link, metrics, sample, spiffe};

const GATEWAY_VIP: &str = "10.96.0.30";
const HOST: &str = "redis.memorystore.example";
/// The same Redis's TLS port, under a name whose DestinationRule originates TLS at the gateway.
const TLS_HOST: &str = "secure.memorystore.example";

/// A CA and a certificate for `TLS_HOST` it signed, as redis-server and the gateway read them:
/// (CA file, certificate file, key file).
fn tls_files(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "memorystore test CA");
    let ca_pem = ca.self_signed(&ca_key).unwrap().pem();
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec![TLS_HOST.to_owned()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    let files = (
        dir.join("ca.pem"),
        dir.join("redis.pem"),
        dir.join("redis-key.pem"),
    );
    std::fs::write(&files.0, ca_pem).unwrap();
    std::fs::write(&files.1, cert.pem()).unwrap();
    std::fs::write(&files.2, key.serialize_pem()).unwrap();
    files
}

fn config(ca_file: &Path) -> Vec<(&'static str, String)> {
    vec![
        ("ns-shop.yaml", "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {trellis.dev/mesh: enabled, \
          trellis.dev/outbound-traffic-policy: REGISTRY_ONLY}}\n".into()),
        ("se.yaml", format!("apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: memorystore, namespace: shop}}\n\
          spec: {{hosts: [{HOST}], location: MESH_EXTERNAL, resolution: DNS, \
          ports: [{{number: 6379, name: tcp-redis, protocol: TCP}}]}}\n")),
        ("gw-svc.yaml", format!("apiVersion: v1\nkind: Service\nmetadata: {{name: egressgateway, namespace: trellis-system}}\n\
          spec: {{clusterIP: {GATEWAY_VIP}, selector: {{app: egressgateway}}, ports: [{{name: tcp-redis, port: 16379, targetPort: 16379}}, \
          {{name: tcp-redis-tls, port: 16380, targetPort: 16380}}]}}\n")),
        ("gw.yaml", format!("apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {{name: egressgateway, namespace: trellis-system}}\n\
          spec: {{selector: {{app: egressgateway}}, servers: [{{port: {{number: 16379, name: tcp-redis, protocol: TCP}}, hosts: [{HOST}]}}, \
          {{port: {{number: 16380, name: tcp-redis-tls, protocol: TCP}}, hosts: [{TLS_HOST}]}}]}}\n")),
        ("se-tls.yaml", format!("apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: memorystore-tls, namespace: shop}}\n\
          spec: {{hosts: [{TLS_HOST}], location: MESH_EXTERNAL, resolution: DNS, \
          ports: [{{number: 6380, name: tcp-redis-tls, protocol: TCP}}]}}\n")),
        ("vs-tls.yaml", format!("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: redis-tls-through-egress, namespace: shop}}\n\
          spec: {{hosts: [{TLS_HOST}], gateways: [mesh, trellis-system/egressgateway], tcp: [\
          {{match: [{{gateways: [mesh], port: 6380}}], route: [{{destination: {{host: egressgateway.trellis-system.svc.cluster.local, port: {{number: 16380}}}}}}]}}, \
          {{match: [{{gateways: [trellis-system/egressgateway], port: 16380}}], route: [{{destination: {{host: {TLS_HOST}, port: {{number: 6380}}}}}}]}}]}}\n")),
        ("dr-tls.yaml", format!("apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: memorystore-tls, namespace: shop}}\n\
          spec: {{host: {TLS_HOST}, trafficPolicy: {{tls: {{mode: SIMPLE, caCertificates: {}}}}}}}\n", ca_file.display())),
        ("gw-authz.yaml", format!("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: only-cart, namespace: trellis-system}}\n\
          spec: {{selector: {{matchLabels: {{app: egressgateway}}}}, action: ALLOW, rules: [{{from: [{{source: {{principals: [\"{}\"]}}}}]}}]}}\n",
          spiffe("shop", "client").trim_start_matches("spiffe://"))),
        ("vs.yaml", format!("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: redis-through-egress, namespace: shop}}\n\
          spec: {{hosts: [{HOST}], gateways: [mesh, trellis-system/egressgateway], tcp: [\
          {{match: [{{gateways: [mesh], port: 6379}}], route: [{{destination: {{host: egressgateway.trellis-system.svc.cluster.local, port: {{number: 16379}}}}}}]}}, \
          {{match: [{{gateways: [trellis-system/egressgateway], port: 16379}}], route: [{{destination: {{host: {HOST}, port: {{number: 6379}}}}}}]}}]}}\n")),
    ]
}

#[test]
fn cart_reaches_memorystore_only_through_the_egress_gateway() {
    let mut shop = Shop::start();
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = tls_files(dir.path());
    let path = |p: &PathBuf| p.display().to_string();
    let _redis = Redis::start_with(
        &shop.outsider,
        &[
            "--tls-port",
            "6380",
            "--tls-cert-file",
            &path(&cert),
            "--tls-key-file",
            &path(&key),
            "--tls-ca-cert-file",
            &path(&ca),
            "--tls-auth-clients",
            "no",
        ],
    );
    let dns = Dnsmasq::start_with(
        &shop.outsider,
        &[
            &format!("--address=/{HOST}/{}", shop.outsider.ip4),
            &format!("--address=/{HOST}/{}", shop.outsider.ip6),
            &format!("--address=/{TLS_HOST}/{}", shop.outsider.ip4),
            &format!("--address=/{TLS_HOST}/{}", shop.outsider.ip6),
        ],
    );
    // The gateway pod never asks a resolver itself: its node resolves external hosts here.
    let upstream = addr(shop.outsider.ip4, 53).to_string();
    shop.agents[1].restart_with(&["--dns-upstream", &upstream]);
    // The gateway pod, in the mesh on node 2 (Redis, the outsider, is on node 1).
    let gw = shop.add_gateway("egressgateway");
    for (name, yaml) in config(&ca) {
        shop.control.write(name, &yaml);
    }
    let conf = resolv_conf(shop.outsider.ip4, "shop");
    let cart = |args: &[&str]| redis_cli(&shop.client, Some(&conf), args);

    // Connections through the gateway, as its node counts them (the config arrives object by
    // object: until the VirtualService does, the host is reached without the gateway).
    let through = || {
        sample(
            &metrics(&shop.cluster.nodes[1]),
            "istio_tcp_connections_opened_total",
            &[
                ("reporter", "destination"),
                ("source_principal", &spiffe("shop", "client")),
                ("source_workload", "client"),
                ("destination_workload", "egressgateway"),
                ("destination_service", HOST),
            ],
        )
        .unwrap_or(0.0)
    };

    // 1. cart: PING, SET, GET by name, through the gateway.
    shop.eventually("cart's PING through the gateway", || {
        cart(&["-h", HOST, "PING"]) == "PONG" && through() >= 1.0
    });
    let before = through();
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
    assert_eq!(
        through(),
        before + 2.0,
        "SET and GET went through the gateway"
    );
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
    shop.eventually("web refused at the gateway", || {
        redis_cli(&shop.server, Some(&conf), &["-h", HOST, "PING"]) != "PONG"
    });
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

    // 5. TLS origination at the gateway: cart speaks plain Redis to the TLS-only port's name;
    //    the gateway speaks TLS to Redis, checking its certificate against the rule's CA.
    let tls = |args: &[&str]| {
        let mut all = vec!["-h", TLS_HOST, "-p", "6380"];
        all.extend(args);
        cart(&all)
    };
    shop.eventually("cart's PING through the gateway's TLS", || {
        tls(&["PING"]) == "PONG"
    });
    let leg = capture_link(&shop, "tcp port 6380", || {
        assert_eq!(tls(&["SET", "cart-45", "tls-basket"]), "OK");
    });
    assert!(
        contains(&leg, &6380u16.to_be_bytes()),
        "the TLS leg was not captured"
    );
    assert!(
        !contains(&leg, b"tls-basket"),
        "the gateway's leg to Redis is not TLS"
    );
    assert_eq!(cart(&["-h", HOST, "GET", "cart-45"]), "tls-basket");
    // A CA file that is not there: no connection, and the gateway's log says why.
    let gone = dir.path().join("gone.pem");
    let rule = config(&gone)
        .into_iter()
        .find(|(n, _)| *n == "dr-tls.yaml")
        .unwrap();
    shop.control.write(rule.0, &rule.1);
    shop.eventually("the broken rule in force", || tls(&["PING"]) != "PONG");
    shop.agents[1].wait_log("the CA file's error", |v| {
        v["message"]
            .as_str()
            .is_some_and(|m| m.contains("reading the CA file"))
    });
}

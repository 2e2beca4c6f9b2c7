//! The ingress gateway for TCP on the real kernel: a process outside the mesh connects to a
//! gateway pod's server port in plaintext; the gateway pod's node proxy routes it by the
//! Gateway's VirtualService to a mesh Service over HBONE, as the gateway's identity, so the
//! destination's AuthorizationPolicy can name the gateway.
mod shop;

use shop::{Shop, addr, metrics, sample, spiffe};

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

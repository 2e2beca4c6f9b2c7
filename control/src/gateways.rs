//! What a gateway pod serves: the servers of every Gateway whose selector matches the pod,
//! merged by port, each with what routes it — `tcp` routes for TCP (and TLS terminated here),
//! `http` routes by Host for HTTP and HTTPS, `tls` routes by SNI for TLS passed through — from
//! the VirtualServices bound to that Gateway, and the certificates its TLS servers present.
use std::collections::BTreeMap;

use trellis_api as api;

use crate::{
    istio::{GatewayServer, PolicyObject, VirtualServiceSpec},
    model::{Cluster, PodInfo},
    routes::{self, Policies},
    tcp_routes,
};

/// The gateway ports of `pod` (none for a pod no Gateway selects).
pub fn ports(cluster: &Cluster, policies: &Policies, pod: &PodInfo) -> Vec<api::GatewayPort> {
    let mut out: BTreeMap<u32, api::GatewayPort> = BTreeMap::new();
    for (g, spec) in &policies.gateways {
        let selects = !spec.selector.is_empty()
            && spec
                .selector
                .iter()
                .all(|(k, v)| pod.labels.get(k) == Some(v));
        if !selects {
            continue;
        }
        let name = format!("{}/{}", g.namespace, g.name);
        // As a VirtualService in namespace `ns` may name this Gateway.
        let bound = |ns: &str, r: &str| r == name || (r == g.name && ns == g.namespace);
        let bound_vs = || {
            policies
                .virtual_services
                .iter()
                .filter(move |(p, vs)| vs.gateways.iter().any(|r| bound(&p.namespace, r)))
        };
        for server in &spec.servers {
            let number = server.port.number;
            // Another Gateway selecting the pod got this port first: it keeps it.
            let port = out.entry(number).or_insert_with(|| api::GatewayPort {
                port: number,
                gateway: name.clone(),
                route: bound_vs().find_map(|(p, vs)| {
                    tcp_routes::first_for_port(cluster, policies, p, vs, number, |r| {
                        bound(&p.namespace, r)
                    })
                }),
                mode: mode(server) as i32,
                ..Default::default()
            });
            if port.gateway != name {
                continue;
            }
            let hosts = server.host_names();
            if let Some(cert) = certificate(cluster, g, server, &hosts) {
                port.certificates.push(cert);
            }
            for (p, vs) in bound_vs() {
                match mode(server) {
                    api::GatewayMode::Http => {
                        if let Some(v) = virtual_host(cluster, policies, p, vs, number, &hosts)
                            && !port.virtual_hosts.contains(&v)
                        {
                            port.virtual_hosts.push(v);
                        }
                    }
                    api::GatewayMode::TlsPassthrough => {
                        for r in
                            sni_routes(cluster, policies, p, vs, number, |r| bound(&p.namespace, r))
                        {
                            if !port.sni_routes.contains(&r) {
                                port.sni_routes.push(r);
                            }
                        }
                    }
                    api::GatewayMode::Tcp => {}
                }
            }
        }
    }
    out.into_values().collect()
}

fn mode(server: &GatewayServer) -> api::GatewayMode {
    match server.mode() {
        "HTTP" => api::GatewayMode::Http,
        "PASSTHROUGH" => api::GatewayMode::TlsPassthrough,
        _ => api::GatewayMode::Tcp,
    }
}

/// The certificate a server terminating TLS presents. A `credentialName` that names no TLS
/// Secret in the Gateway's namespace gives an empty one: the gateway then refuses handshakes
/// for those hosts, saying which Secret is missing (as Istio's gateway serves no certificate).
fn certificate(
    cluster: &Cluster,
    g: &PolicyObject,
    server: &GatewayServer,
    hosts: &[String],
) -> Option<api::ServerCertificate> {
    let tls = server.tls.as_ref().filter(|t| t.mode == "SIMPLE")?;
    let mut cert = api::ServerCertificate {
        hosts: hosts.to_vec(),
        ..Default::default()
    };
    match &tls.credential_name {
        Some(name) => {
            let key = format!("{}/{name}", g.namespace);
            match cluster.secrets.get(&key) {
                Some(s) => {
                    cert.cert_pem = s.cert_pem.clone();
                    cert.key_pem = s.key_pem.clone();
                    cert.source = format!("Secret {key}");
                }
                None => cert.source = format!("Secret {key} (not found)"),
            }
        }
        None => {
            cert.cert_file = tls.server_certificate.clone().unwrap_or_default();
            cert.key_file = tls.private_key.clone().unwrap_or_default();
            cert.source = cert.cert_file.clone();
        }
    }
    Some(cert)
}

/// Host `name` is covered by `pattern` (`*`, `*.example.com` or a name; case-insensitive).
pub fn host_matches(pattern: &str, name: &str) -> bool {
    let (pattern, name) = (pattern.to_ascii_lowercase(), name.to_ascii_lowercase());
    match pattern.strip_prefix('*') {
        Some("") => true,
        Some(suffix) => name.ends_with(suffix) && name.len() > suffix.len(),
        None => pattern == name,
    }
}

/// `vs`'s hosts that the server serves, with its `http` routes for `port`; None when it has no
/// such host or route. A destination with no port goes to its service's only port.
fn virtual_host(
    cluster: &Cluster,
    policies: &Policies,
    p: &PolicyObject,
    vs: &VirtualServiceSpec,
    port: u32,
    server_hosts: &[String],
) -> Option<api::VirtualHost> {
    let hosts: Vec<String> = vs
        .hosts
        .iter()
        .filter(|h| {
            server_hosts
                .iter()
                .any(|s| host_matches(s, h) || host_matches(h, s))
        })
        .cloned()
        .collect();
    let mut routes: Vec<api::HttpRoute> = (0..vs.http.len())
        .filter_map(|i| routes::compile_http(cluster, policies, p, vs, i, port))
        .collect();
    if hosts.is_empty() || routes.is_empty() {
        return None;
    }
    let only_port = |service: &str| match cluster.services.get(service) {
        Some(s) if s.ports.len() == 1 => s.ports[0].port,
        _ => 0,
    };
    for d in routes
        .iter_mut()
        .flat_map(|r| r.destinations.iter_mut().chain(r.mirror.as_mut()))
        .filter(|d| d.port == 0)
    {
        d.port = only_port(&d.service);
    }
    Some(api::VirtualHost { hosts, routes })
}

/// `vs`'s `tls` routes with a match for `port` on the gateway `bound` names.
fn sni_routes(
    cluster: &Cluster,
    policies: &Policies,
    p: &PolicyObject,
    vs: &VirtualServiceSpec,
    port: u32,
    bound: impl Fn(&str) -> bool,
) -> Vec<api::SniRoute> {
    let mut out = Vec::new();
    for (i, r) in vs.tls.iter().enumerate() {
        let route = tcp_routes::compile(
            cluster,
            policies,
            p,
            format!("{}/{}/tls/{i}", p.namespace, p.name),
            &r.route,
        );
        for m in &r.matches {
            let here = m.port.is_none_or(|n| n == port)
                && (m.gateways.is_empty() || m.gateways.iter().any(|g| bound(g)));
            if here {
                out.push(api::SniRoute {
                    sni_hosts: m.sni_hosts.clone(),
                    route: Some(route.clone()),
                });
            }
        }
    }
    out
}
#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        model::{Object, PortInfo, ServiceInfo, TargetPort},
        tcp_routes::mesh_route,
    };

    fn policy(kind: &'static str, ns: &str, name: &str, spec: serde_json::Value) -> Object {
        Object::Policy(std::sync::Arc::new(PolicyObject {
            kind,
            namespace: ns.into(),
            name: name.into(),
            spec,
        }))
    }

    /// Istio's egress-gateway task for a TCP host: one VirtualService bound to the mesh and to
    /// the gateway.
    fn cluster() -> Cluster {
        let mut c = Cluster::default();
        c.insert(Object::Service(std::sync::Arc::new(ServiceInfo {
            namespace: "istio-system".into(),
            name: "egressgateway".into(),
            selector: Some([("istio".to_string(), "egressgateway".to_string())].into()),
            cluster_ips: vec!["10.96.0.30".parse().unwrap()],
            ports: vec![PortInfo {
                name: "tcp".into(),
                port: 16379,
                target: TargetPort::Number(16379),
                app_protocol: None,
            }],
        })));
        c.insert(policy(
            "ServiceEntry",
            "shop",
            "redis",
            serde_json::json!({
            "hosts": ["redis.example"], "resolution": "DNS",
            "ports": [{"number": 6379, "name": "tcp"}]}),
        ));
        c.insert(policy("Gateway", "istio-system", "egressgateway", serde_json::json!({
            "selector": {"istio": "egressgateway"},
            "servers": [{"port": {"number": 16379, "name": "tcp", "protocol": "TCP"}, "hosts": ["redis.example"]}]})));
        c.insert(policy("VirtualService", "shop", "redis", serde_json::json!({
            "hosts": ["redis.example"], "gateways": ["mesh", "istio-system/egressgateway"],
            "tcp": [
                {"match": [{"gateways": ["mesh"], "port": 6379}],
                 "route": [{"destination": {"host": "egressgateway.istio-system.svc.cluster.local", "port": {"number": 16379}}}]},
                {"match": [{"gateways": ["istio-system/egressgateway"], "port": 16379}],
                 "route": [{"destination": {"host": "redis.example", "port": {"number": 6379}}}]}]})));
        c
    }

    #[test]
    fn the_mesh_sends_the_host_to_the_gateway_and_the_gateway_sends_it_out() {
        let c = cluster();
        let policies = Policies::new(&c);
        let mesh = mesh_route(&c, &policies, "shop/redis.example", 6379).unwrap();
        assert_eq!(mesh.name, "shop/redis/tcp/0");
        assert_eq!(mesh.destinations.len(), 1);
        let d = &mesh.destinations[0];
        assert_eq!(
            (d.service.as_str(), d.port, d.weight),
            ("istio-system/egressgateway", 16379, 100)
        );
        // Another port of the host, or the gateway's own service: no mesh route.
        assert!(mesh_route(&c, &policies, "shop/redis.example", 6380).is_none());
        assert!(mesh_route(&c, &policies, "istio-system/egressgateway", 16379).is_none());

        let gw_pod = PodInfo {
            uid: "g".into(),
            namespace: "istio-system".into(),
            name: "egressgateway-1".into(),
            workload: "egressgateway".into(),
            node: "n1".into(),
            service_account: "egressgateway".into(),
            ips: vec!["10.244.1.5".parse().unwrap()],
            labels: [("istio".to_string(), "egressgateway".to_string())].into(),
            running: true,
            terminating: false,
            named_ports: Default::default(),
        };
        let served = ports(&c, &policies, &gw_pod);
        assert_eq!(served.len(), 1);
        assert_eq!(
            (served[0].port, served[0].gateway.as_str()),
            (16379, "istio-system/egressgateway")
        );
        let r = served[0].route.as_ref().unwrap();
        assert_eq!(r.name, "shop/redis/tcp/1");
        assert_eq!(
            (r.destinations[0].service.as_str(), r.destinations[0].port),
            ("shop/redis.example", 6379)
        );
        // A pod the Gateway does not select gets nothing.
        let other = PodInfo {
            labels: Default::default(),
            ..gw_pod
        };
        assert!(ports(&c, &policies, &other).is_empty());
    }

    fn ingress(c: &mut Cluster) -> PodInfo {
        c.insert(Object::Service(std::sync::Arc::new(ServiceInfo {
            namespace: "shop".into(),
            name: "web".into(),
            selector: Some([("app".to_string(), "web".to_string())].into()),
            cluster_ips: vec!["10.96.0.40".parse().unwrap()],
            ports: vec![PortInfo {
                name: "http".into(),
                port: 80,
                target: TargetPort::Number(8080),
                app_protocol: None,
            }],
        })));
        c.insert(Object::Secret(crate::model::TlsSecret {
            namespace: "trellis-system".into(),
            name: "shop-cert".into(),
            cert_pem: "CERT".into(),
            key_pem: "KEY".into(),
        }));
        c.insert(policy("Gateway", "trellis-system", "ingress", serde_json::json!({
            "selector": {"app": "ingress"},
            "servers": [
                {"port": {"number": 443, "name": "https", "protocol": "HTTPS"}, "hosts": ["shop.example"],
                 "tls": {"mode": "SIMPLE", "credentialName": "shop-cert"}},
                {"port": {"number": 443, "name": "https-admin", "protocol": "HTTPS"}, "hosts": ["shop/admin.example"],
                 "tls": {"mode": "SIMPLE", "credentialName": "gone"}},
                {"port": {"number": 8443, "name": "tls", "protocol": "TLS"}, "hosts": ["*.example"],
                 "tls": {"mode": "PASSTHROUGH"}}]})));
        c.insert(policy(
            "VirtualService",
            "shop",
            "web",
            serde_json::json!({
            "hosts": ["shop.example"], "gateways": ["trellis-system/ingress"],
            "http": [{"route": [
                {"destination": {"host": "web", "subset": "v1"}, "weight": 80},
                {"destination": {"host": "web", "subset": "v2"}, "weight": 20}]}]}),
        ));
        c.insert(policy(
            "VirtualService",
            "shop",
            "pass",
            serde_json::json!({
            "hosts": ["db.example"], "gateways": ["trellis-system/ingress"],
            "tls": [{"match": [{"sniHosts": ["db.example"], "port": 8443}],
                     "route": [{"destination": {"host": "web", "port": {"number": 80}}}]}]}),
        ));
        PodInfo {
            uid: "i".into(),
            namespace: "trellis-system".into(),
            name: "ingress-1".into(),
            workload: "ingress".into(),
            node: "n1".into(),
            service_account: "ingress".into(),
            ips: vec!["10.244.1.6".parse().unwrap()],
            labels: [("app".to_string(), "ingress".to_string())].into(),
            running: true,
            terminating: false,
            named_ports: Default::default(),
        }
    }

    #[test]
    fn an_ingress_gateway_terminates_tls_routes_by_host_and_passes_tls_through_by_sni() {
        let mut c = Cluster::default();
        let pod = ingress(&mut c);
        let policies = Policies::new(&c);
        let served = ports(&c, &policies, &pod);
        assert_eq!(served.len(), 2, "two servers on 443 are one port");
        let https = &served[0];
        assert_eq!(
            (https.port, https.mode),
            (443, api::GatewayMode::Http as i32)
        );
        let certs: Vec<(&[String], &str, &str)> = https
            .certificates
            .iter()
            .map(|c| (c.hosts.as_slice(), c.source.as_str(), c.cert_pem.as_str()))
            .collect();
        assert_eq!(
            certs,
            vec![
                (
                    &["shop.example".to_owned()][..],
                    "Secret trellis-system/shop-cert",
                    "CERT"
                ),
                (
                    &["admin.example".to_owned()][..],
                    "Secret trellis-system/gone (not found)",
                    ""
                ),
            ]
        );
        assert_eq!(https.virtual_hosts.len(), 1);
        let vh = &https.virtual_hosts[0];
        assert_eq!(vh.hosts, ["shop.example"]);
        let d = &vh.routes[0].destinations;
        // The service's only port is filled in: the gateway's own port is none of web's.
        assert_eq!(
            d.iter()
                .map(|d| (d.service.as_str(), d.subset.as_str(), d.port, d.weight))
                .collect::<Vec<_>>(),
            [("shop/web", "v1", 80, 80), ("shop/web", "v2", 80, 20)]
        );
        // The gateway's routes are not the mesh's.
        let web = &c.services["shop/web"];
        assert!(routes::http_routes(&c, &policies, web, &web.ports[0]).is_empty());

        let tls = &served[1];
        assert_eq!(
            (tls.port, tls.mode),
            (8443, api::GatewayMode::TlsPassthrough as i32)
        );
        assert!(tls.certificates.is_empty());
        assert_eq!(tls.sni_routes.len(), 1);
        assert_eq!(tls.sni_routes[0].sni_hosts, ["db.example"]);
        let r = tls.sni_routes[0].route.as_ref().unwrap();
        assert_eq!(
            (r.name.as_str(), r.destinations[0].service.as_str()),
            ("shop/pass/tls/0", "shop/web")
        );
    }

    #[test]
    fn hosts_match_exactly_or_by_wildcard() {
        assert!(host_matches("*", "shop.example"));
        assert!(host_matches("*.example", "Shop.Example"));
        assert!(!host_matches("*.example", "example"));
        assert!(host_matches("shop.example", "SHOP.example"));
        assert!(!host_matches("shop.example", "cart.example"));
    }
}

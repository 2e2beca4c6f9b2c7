//! VirtualService `tcp` routes. Bound to the mesh, they send a service port's connections
//! elsewhere (a ServiceEntry host's to an egress gateway, say); bound to a Gateway, they say
//! where the gateway's pods send what arrives on a server port.
use trellis_api as api;

use crate::{
    istio::{PolicyObject, TcpRoute, VirtualServiceSpec},
    model::{Cluster, PodInfo},
    routes::{self, Policies},
};

/// A destination host as written in an object in `namespace`, as the `namespace/name` key the
/// agent knows services by: a Service (any form `routes::resolve` takes) or a ServiceEntry host.
pub fn destination_key(
    cluster: &Cluster,
    policies: &Policies,
    host: &str,
    namespace: &str,
) -> Option<String> {
    if let Some(s) = routes::resolve(cluster, host, namespace) {
        return Some(format!("{}/{}", s.namespace, s.name));
    }
    let ns = policies.service_entry_hosts.get(host)?;
    Some(format!("{ns}/{host}"))
}

/// The first mesh-bound `tcp` route for port `port` of the service known as `key`.
pub fn mesh_route(
    cluster: &Cluster,
    policies: &Policies,
    key: &str,
    port: u32,
) -> Option<api::TcpRoute> {
    policies
        .virtual_services
        .iter()
        .filter(|(_, vs)| !vs.tcp.is_empty())
        .filter(|(_, vs)| vs.gateways.is_empty() || vs.gateways.iter().any(|g| g == "mesh"))
        .filter(|(p, vs)| {
            vs.hosts.iter().any(|h| {
                destination_key(cluster, policies, h, &p.namespace).as_deref() == Some(key)
            })
        })
        .find_map(|(p, vs)| first_for_port(cluster, policies, p, vs, port, |g| g == "mesh"))
}

/// The server ports of every Gateway whose selector matches `pod`, each with the first `tcp`
/// route for it among the VirtualServices bound to that Gateway (none: nothing is forwarded).
pub fn gateway_ports(
    cluster: &Cluster,
    policies: &Policies,
    pod: &PodInfo,
) -> Vec<api::GatewayPort> {
    let mut out = Vec::new();
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
        for server in &spec.servers {
            let route = policies.virtual_services.iter().find_map(|(p, vs)| {
                // As a VirtualService in `p`'s namespace may name this Gateway.
                let bound = |r: &str| r == name || (r == g.name && p.namespace == g.namespace);
                vs.gateways.iter().any(|r| bound(r)).then_some(())?;
                first_for_port(cluster, policies, p, vs, server.port.number, bound)
            });
            out.push(api::GatewayPort {
                port: server.port.number,
                gateway: name.clone(),
                route,
            });
        }
    }
    out
}

/// The first `tcp` route of `vs` with a match for `port` on the gateway `bound` names (`mesh`
/// or a Gateway, as a VirtualService in `p`'s namespace may write it).
fn first_for_port(
    cluster: &Cluster,
    policies: &Policies,
    p: &PolicyObject,
    vs: &VirtualServiceSpec,
    port: u32,
    bound: impl Fn(&str) -> bool,
) -> Option<api::TcpRoute> {
    let (i, r) = vs.tcp.iter().enumerate().find(|(_, r)| {
        r.matches.is_empty()
            || r.matches.iter().any(|m| {
                m.port.is_none_or(|n| n == port)
                    && (m.gateways.is_empty() || m.gateways.iter().any(|g| bound(g)))
            })
    })?;
    Some(compile(cluster, policies, p, i, r))
}

fn compile(
    cluster: &Cluster,
    policies: &Policies,
    p: &PolicyObject,
    i: usize,
    r: &TcpRoute,
) -> api::TcpRoute {
    let single = r.route.len() == 1;
    api::TcpRoute {
        name: format!("{}/{}/tcp/{i}", p.namespace, p.name),
        destinations: r
            .route
            .iter()
            // A destination that names nothing known is left out (its weight goes nowhere).
            .filter_map(|d| {
                Some(api::WeightedDestination {
                    service: destination_key(cluster, policies, &d.destination.host, &p.namespace)?,
                    port: d.destination.port.as_ref().map_or(0, |p| p.number),
                    weight: routes::weight(d.weight, single),
                    ..Default::default()
                })
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Object, PortInfo, ServiceInfo, TargetPort};

    fn policy(kind: &'static str, ns: &str, name: &str, spec: serde_json::Value) -> Object {
        Object::Policy(PolicyObject {
            kind,
            namespace: ns.into(),
            name: name.into(),
            spec,
        })
    }

    /// Istio's egress-gateway task for a TCP host: one VirtualService bound to the mesh and to
    /// the gateway.
    fn cluster() -> Cluster {
        let mut c = Cluster::default();
        c.insert(Object::Service(ServiceInfo {
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
        }));
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
            node: "n1".into(),
            service_account: "egressgateway".into(),
            ips: vec!["10.244.1.5".parse().unwrap()],
            labels: [("istio".to_string(), "egressgateway".to_string())].into(),
            running: true,
            terminating: false,
            named_ports: Default::default(),
        };
        let ports = gateway_ports(&c, &policies, &gw_pod);
        assert_eq!(ports.len(), 1);
        assert_eq!(
            (ports[0].port, ports[0].gateway.as_str()),
            (16379, "istio-system/egressgateway")
        );
        let r = ports[0].route.as_ref().unwrap();
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
        assert!(gateway_ports(&c, &policies, &other).is_empty());
    }
}

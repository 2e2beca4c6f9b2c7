//! VirtualService `tcp` routes. Bound to the mesh, they send a service port's connections
//! elsewhere (a ServiceEntry host's to an egress gateway, say); bound to a Gateway, they say
//! where the gateway's pods send what arrives on a server port (`gateways`).
use trellis_api as api;

use crate::{
    istio::{PolicyObject, RouteDestination, VirtualServiceSpec},
    model::Cluster,
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

/// The first `tcp` route of `vs` with a match for `port` on the gateway `bound` names (`mesh`
/// or a Gateway, as a VirtualService in `p`'s namespace may write it).
pub(crate) fn first_for_port(
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
    Some(compile(
        cluster,
        policies,
        p,
        format!("{}/{}/tcp/{i}", p.namespace, p.name),
        &r.route,
    ))
}

/// Route destinations (of a `tcp` or `tls` route named `name`, in `p`'s namespace) as the agent
/// follows them.
pub(crate) fn compile(
    cluster: &Cluster,
    policies: &Policies,
    p: &PolicyObject,
    name: String,
    route: &[RouteDestination],
) -> api::TcpRoute {
    let single = route.len() == 1;
    api::TcpRoute {
        name,
        destinations: route
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

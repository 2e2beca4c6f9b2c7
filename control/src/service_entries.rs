//! ServiceEntries compiled into services the node proxy routes like any other: one per host,
//! reached at the entry's addresses or, when it has none, at a virtual address control
//! allocates (as Istio's DNS auto-allocation), with the entry's endpoints.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use trellis_api as api;

use crate::{
    compile::spiffe_id,
    istio::{ServiceEntrySpec, WorkloadEntry},
    model::Cluster,
    routes::Policies,
    tcp_routes,
};

/// Auto-allocated addresses: Istio's ranges (class E for IPv4, a documentation-like /48 for
/// IPv6), never routed on the wire: the capture layer takes every connect to them.
const AUTO_V4: [u8; 2] = [240, 240];
const AUTO_V6: [u16; 3] = [0x2001, 0x2, 0];
/// Slots in the auto-allocation ranges (the last two bytes, .0.0 and .255.255 left out).
const SLOTS: u32 = 65534;

/// One service per ServiceEntry host (wildcard hosts have no address and are not routed).
pub fn services(cluster: &Cluster, policies: &Policies, trust_domain: &str) -> Vec<api::Service> {
    let entries: Vec<(&str, &ServiceEntrySpec)> = policies
        .service_entries
        .iter()
        .map(|(p, se)| (p.namespace.as_str(), se))
        .collect();
    let wanted: BTreeSet<(&str, &str)> = entries
        .iter()
        .filter(|(_, se)| needs_allocation(se))
        .flat_map(|(ns, se)| se.hosts.iter().map(move |h| (*ns, h.as_str())))
        .filter(|(_, h)| !h.starts_with('*'))
        .collect();
    let allocated = allocate(&wanted);
    let mut out = Vec::new();
    for (ns, se) in &entries {
        for host in se.hosts.iter().filter(|h| !h.starts_with('*')) {
            let vips: Vec<String> = match allocated.get(&(*ns, host.as_str())) {
                Some(slot) => vec![v4(*slot).to_string(), v6(*slot).to_string()],
                None => se
                    .addresses
                    .iter()
                    .filter_map(|a| single_address(a))
                    .map(|ip| ip.to_string())
                    .collect(),
            };
            let mut svc = service(ns, host, vips, se, trust_domain);
            // A DestinationRule for the host (by its exact name): its trafficPolicy, TLS
            // origination included.
            let traffic = policies
                .destination_rules
                .iter()
                .find(|(_, dr)| dr.host == *host)
                .and_then(|(_, dr)| dr.traffic_policy.as_ref())
                .map(crate::routes::compile_policy);
            for p in &mut svc.ports {
                p.traffic_policy = traffic.clone();
                p.tcp_route =
                    tcp_routes::mesh_route(cluster, policies, &format!("{ns}/{host}"), p.port);
            }
            out.push(svc);
        }
    }
    out
}

/// Istio allocates for entries with no addresses whose traffic the mesh resolves itself.
fn needs_allocation(se: &ServiceEntrySpec) -> bool {
    se.addresses.is_empty() && se.resolution.as_deref().unwrap_or("NONE") != "NONE"
}

/// An address, or a CIDR naming exactly one (a /32 or /128).
fn single_address(a: &str) -> Option<IpAddr> {
    if let Ok(ip) = a.parse() {
        return Some(ip);
    }
    let net: ipnet::IpNet = a.parse().ok()?;
    (net.prefix_len() == net.max_prefix_len()).then(|| net.addr())
}

/// A slot per host: from a hash of `namespace/host`, so a host keeps its address as others
/// come and go; collisions take the next free slot, in name order.
fn allocate<'a>(wanted: &BTreeSet<(&'a str, &'a str)>) -> BTreeMap<(&'a str, &'a str), u32> {
    let mut taken = BTreeSet::new();
    let mut out = BTreeMap::new();
    for key in wanted {
        let mut slot = fnv1a(&format!("{}/{}", key.0, key.1)) % SLOTS;
        while !taken.insert(slot) {
            slot = (slot + 1) % SLOTS;
        }
        out.insert(*key, slot);
    }
    out
}

fn fnv1a(s: &str) -> u32 {
    s.bytes().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

fn v4(slot: u32) -> Ipv4Addr {
    let n = slot + 1;
    Ipv4Addr::new(AUTO_V4[0], AUTO_V4[1], (n >> 8) as u8, n as u8)
}

fn v6(slot: u32) -> Ipv6Addr {
    let [a, b, c] = AUTO_V6;
    Ipv6Addr::new(a, b, c, 0, 0, 0, 0, (slot + 1) as u16)
}

fn service(
    ns: &str,
    host: &str,
    vips: Vec<String>,
    se: &ServiceEntrySpec,
    trust_domain: &str,
) -> api::Service {
    let resolution = se.resolution.as_deref().unwrap_or("NONE");
    let ports: Vec<api::ServicePort> = se
        .ports
        .iter()
        .map(|p| api::ServicePort {
            name: p.name.clone(),
            port: p.number,
            target_port: p.target_port.unwrap_or(p.number),
            // Proxied at L4: VirtualService routing to external hosts is not compiled yet.
            protocol: api::Protocol::Tcp as i32,
            http_routes: Vec::new(),
            traffic_policy: None,
            tcp_route: None,
        })
        .collect();
    let endpoint = |e: &WorkloadEntry| {
        let ip = e.address.parse::<IpAddr>().is_ok();
        api::Endpoint {
            pod_uid: String::new(),
            pod_name: String::new(),
            workload_name: String::new(),
            ips: if ip {
                vec![e.address.clone()]
            } else {
                Vec::new()
            },
            hostname: if ip { String::new() } else { e.address.clone() },
            node: String::new(),
            in_mesh: e.service_account.is_some(),
            identity: e
                .service_account
                .as_deref()
                .map(|sa| spiffe_id(trust_domain, ns, sa))
                .unwrap_or_default(),
            labels: e.labels.clone().into_iter().collect(),
            ports: se
                .ports
                .iter()
                .filter_map(|p| Some((p.name.clone(), *e.ports.get(&p.name)?)))
                .collect(),
        }
    };
    let endpoints = match resolution {
        "NONE" => Vec::new(),
        // DNS without endpoints: the host itself is resolved.
        "DNS" if se.endpoints.is_empty() => vec![endpoint(&WorkloadEntry {
            address: host.to_owned(),
            ..WorkloadEntry::default()
        })],
        _ => se.endpoints.iter().map(endpoint).collect(),
    };
    api::Service {
        namespace: ns.to_owned(),
        name: host.to_owned(),
        vips,
        ports,
        endpoints,
        host: host.to_owned(),
        original_destination: resolution == "NONE",
        export_to: se.exported_to(ns),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{istio::PolicyObject, model::Object};

    fn cluster(entries: &[(&str, &str, serde_json::Value)]) -> Cluster {
        let mut c = Cluster::default();
        for (ns, name, spec) in entries {
            c.insert(Object::Policy(std::sync::Arc::new(PolicyObject {
                kind: "ServiceEntry",
                namespace: (*ns).into(),
                name: (*name).into(),
                spec: spec.clone(),
            })));
        }
        c
    }

    #[test]
    fn hosts_without_addresses_get_stable_virtual_addresses() {
        let redis = serde_json::json!({"hosts": ["redis.memorystore.example"], "resolution": "DNS",
            "ports": [{"number": 6379, "name": "tcp-redis", "protocol": "TCP"}]});
        let c1 = cluster(&[("shop", "redis", redis.clone())]);
        let one = services(&c1, &Policies::new(&c1), "td");
        assert_eq!(one.len(), 1);
        let s = &one[0];
        assert_eq!(
            (s.host.as_str(), s.name.as_str()),
            ("redis.memorystore.example", "redis.memorystore.example")
        );
        assert!(s.vips[0].starts_with("240.240."), "{:?}", s.vips);
        assert!(s.vips[1].starts_with("2001:2::"), "{:?}", s.vips);
        assert_eq!(s.endpoints[0].hostname, "redis.memorystore.example");
        assert!(!s.original_destination);
        // Another entry does not move it.
        let other = serde_json::json!({"hosts": ["api.example", "*.wild.example"], "resolution": "DNS",
            "ports": [{"number": 443, "name": "tls", "protocol": "TLS"}]});
        let c2 = cluster(&[("shop", "redis", redis), ("shop", "api", other)]);
        let two = services(&c2, &Policies::new(&c2), "td");
        assert_eq!(two.len(), 2, "the wildcard host is not routed");
        let again = two
            .iter()
            .find(|s| s.host == "redis.memorystore.example")
            .unwrap();
        assert_eq!(again.vips, s.vips);
        let api = two.iter().find(|s| s.host == "api.example").unwrap();
        assert_ne!(api.vips, s.vips);
    }

    #[test]
    fn static_none_and_mesh_internal_entries() {
        let c = cluster(&[
            (
                "db",
                "pg",
                serde_json::json!({"hosts": ["pg.internal"], "addresses": ["10.1.0.5/32"],
                "location": "MESH_INTERNAL", "resolution": "STATIC",
                "ports": [{"number": 5432, "name": "tcp-pg", "targetPort": 6432}],
                "endpoints": [{"address": "10.1.0.7", "serviceAccount": "pg", "ports": {"tcp-pg": 7432}},
                              {"address": "10.1.0.8"}]}),
            ),
            (
                "db",
                "any",
                serde_json::json!({"hosts": ["any.example"], "addresses": ["10.2.0.0/16"],
                "ports": [{"number": 80, "name": "http"}]}),
            ),
        ]);
        let out = services(&c, &Policies::new(&c), "td");
        let pg = out.iter().find(|s| s.host == "pg.internal").unwrap();
        assert_eq!(pg.vips, ["10.1.0.5"]);
        assert_eq!(pg.ports[0].target_port, 6432);
        assert_eq!(pg.endpoints[0].ips, ["10.1.0.7"]);
        assert!(pg.endpoints[0].in_mesh);
        assert_eq!(pg.endpoints[0].identity, "spiffe://td/ns/db/sa/pg");
        assert_eq!(pg.endpoints[0].ports["tcp-pg"], 7432);
        assert!(!pg.endpoints[1].in_mesh && pg.endpoints[1].identity.is_empty());
        let any = out.iter().find(|s| s.host == "any.example").unwrap();
        assert!(any.original_destination && any.endpoints.is_empty());
        assert!(
            any.vips.is_empty(),
            "a CIDR is no single address to route by"
        );
    }

    #[test]
    fn export_to_names_the_namespaces_that_see_a_host() {
        let se = |export: serde_json::Value| {
            serde_json::json!({"hosts": ["db.example"], "resolution": "DNS", "exportTo": export,
                "ports": [{"number": 5432, "name": "tcp"}]})
        };
        let c = cluster(&[
            (
                "billing",
                "own",
                se(serde_json::json!([".", "shop", "shop"])),
            ),
            ("billing", "all", se(serde_json::json!(["*", "."]))),
        ]);
        let out = services(&c, &Policies::new(&c), "cluster.local");
        let exported: Vec<&[String]> = out.iter().map(|s| s.export_to.as_slice()).collect();
        assert!(exported.contains(&&["billing".to_owned(), "shop".to_owned()][..]));
        assert!(exported.contains(&&[][..]), "* is every namespace");
        let check = |export: serde_json::Value| {
            serde_json::from_value::<ServiceEntrySpec>(se(export))
                .unwrap()
                .validate()
        };
        use crate::istio::Validate as _;
        assert_eq!(check(serde_json::json!(["~"])), Ok(()));
        assert_eq!(
            check(serde_json::json!(["~", "shop"])),
            Err("exportTo: \"~\" (no namespace) cannot be listed with others".into())
        );
        assert!(
            check(serde_json::json!(["Shop!"]))
                .unwrap_err()
                .starts_with("exportTo[0]: \"Shop!\" is not \".\", \"*\", \"~\" or a namespace")
        );
    }
}

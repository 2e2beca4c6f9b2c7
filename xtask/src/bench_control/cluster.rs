//! The generated cluster: 20 mesh namespaces, 10,000 pods on 50 nodes (200 each), 1,000
//! Services of 10 pods each (one pod per node, so every service spans 10 nodes), and on 200 of
//! them a VirtualService (a header match to subset v2, then a v1/v2 weighted split) with its
//! DestinationRule; and the changes made to it. Objects are plain JSON, written as YAML files
//! for `dir:` and created through the API for `kube`.
use std::collections::BTreeMap;

use serde_json::{Value, json};

pub const NODES: usize = 50;
pub const NAMESPACES: usize = 20;
pub const PODS: usize = 10_000;
pub const SERVICES: usize = 1_000;
pub const VIRTUAL_SERVICES: usize = 200;
const PODS_PER_SERVICE: usize = PODS / SERVICES;
const SERVICES_PER_NS: usize = SERVICES / NAMESPACES;
const VS_PER_NS: usize = VIRTUAL_SERVICES / NAMESPACES;
/// The v1 share of every split before any edit.
const FIRST_WEIGHT: u32 = 90;

pub fn node(n: usize) -> String {
    format!("node-{n}")
}

pub fn namespace_name(n: usize) -> String {
    format!("bench-{n}")
}

#[derive(Clone, Debug)]
pub struct Pod {
    pub namespace: String,
    pub name: String,
    pub node: String,
    /// The service selecting it (`app` label), in `namespace`.
    pub app: String,
    pub version: &'static str,
    pub ip: String,
}

impl Pod {
    /// Pod `i` of the initial 10,000: pods 10s..10s+9 back service s, on ten adjacent nodes.
    pub fn initial(i: usize) -> Self {
        let service = i / PODS_PER_SERVICE;
        Self {
            namespace: namespace_name(service / SERVICES_PER_NS),
            name: format!("pod-{i}"),
            node: node(i % NODES),
            app: format!("svc-{}", service % SERVICES_PER_NS),
            version: if i.is_multiple_of(2) { "v1" } else { "v2" },
            ip: ip(i),
        }
    }

    /// The pod added by change `c`, with addresses after the initial pods'.
    pub fn added(c: usize) -> Self {
        Self {
            namespace: namespace_name(c % NAMESPACES),
            name: format!("added-{c}"),
            node: node(c % NODES),
            app: format!("svc-{}", c % SERVICES_PER_NS),
            version: "v1",
            ip: ip(PODS + c),
        }
    }

    /// `<namespace>/<service>`: the Service resource agents get, whose endpoints this pod is in.
    pub fn service_key(&self) -> String {
        format!("{}/{}", self.namespace, self.app)
    }

    /// As created: scheduled, with no status (the API server ignores status on create).
    pub fn object(&self) -> Value {
        json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": self.name,
                "namespace": self.namespace,
                "labels": {"app": self.app, "version": self.version},
            },
            "spec": {
                "nodeName": self.node,
                "serviceAccountName": "default",
                "automountServiceAccountToken": false,
                "containers": [{
                    "name": "app",
                    "image": "app",
                    "ports": [{"name": "http", "containerPort": 8080}],
                }],
            },
        })
    }

    /// As kubelet leaves a running pod.
    pub fn status(&self) -> Value {
        json!({"phase": "Running", "podIP": self.ip, "podIPs": [{"ip": self.ip}]})
    }

    /// With its status, as written for `dir:`.
    pub fn object_with_status(&self) -> Value {
        let mut o = self.object();
        o["status"] = self.status();
        o
    }
}

/// 10.244.0.1 onwards, 250 to a /24.
fn ip(i: usize) -> String {
    format!("10.244.{}.{}", i / 250, i % 250 + 1)
}

pub fn namespace(n: usize) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": namespace_name(n), "labels": {"trellis.dev/mesh": "enabled"}},
    })
}

/// Service `k`: `svc-<k % 50>` in namespace `k / 50`, VIP from 10.96.1.1 on (clear of the
/// `kubernetes` Service's 10.96.0.1).
pub fn service(k: usize) -> Value {
    let name = format!("svc-{}", k % SERVICES_PER_NS);
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace_name(k / SERVICES_PER_NS)},
        "spec": {
            "selector": {"app": name},
            "clusterIP": format!("10.96.{}.{}", 1 + k / 250, k % 250 + 1),
            "ports": [{"name": "http", "port": 80, "targetPort": 8080}],
        },
    })
}

/// VirtualService `v` (and its DestinationRule) routes service `svc-<v % 10>` of namespace
/// `v / 10`.
pub fn vs_namespace(v: usize) -> String {
    namespace_name(v / VS_PER_NS)
}

pub fn vs_name(v: usize) -> String {
    format!("svc-{}", v % VS_PER_NS)
}

pub fn virtual_service_spec(v: usize, weight: u32) -> Value {
    let host = vs_name(v);
    let to = |subset: &str| json!({"host": host, "subset": subset});
    json!({
        "hosts": [host],
        "http": [
            {
                "name": "canary",
                "match": [{"headers": {"x-canary": {"exact": "1"}}}],
                "route": [{"destination": to("v2")}],
            },
            {
                "name": "split",
                "route": [
                    {"destination": to("v1"), "weight": weight},
                    {"destination": to("v2"), "weight": 100 - weight},
                ],
            },
        ],
    })
}

pub fn virtual_service(v: usize, weight: u32) -> Value {
    json!({
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": {"name": vs_name(v), "namespace": vs_namespace(v)},
        "spec": virtual_service_spec(v, weight),
    })
}

pub fn destination_rule(v: usize) -> Value {
    json!({
        "apiVersion": "networking.istio.io/v1",
        "kind": "DestinationRule",
        "metadata": {"name": vs_name(v), "namespace": vs_namespace(v)},
        "spec": {
            "host": vs_name(v),
            "subsets": [
                {"name": "v1", "labels": {"version": "v1"}},
                {"name": "v2", "labels": {"version": "v2"}},
            ],
        },
    })
}

#[derive(Clone, Debug)]
pub enum Change {
    AddPod(Pod),
    /// Deletes the pod, so it stops being an endpoint of its service.
    RemovePod(Pod),
    /// Sets VirtualService `v`'s v1 weight.
    EditVs {
        v: usize,
        weight: u32,
    },
}

impl Change {
    pub fn kind(&self) -> &'static str {
        match self {
            Change::AddPod(_) => "pod added",
            Change::RemovePod(_) => "endpoint removed",
            Change::EditVs { .. } => "VirtualService edited",
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Change::AddPod(p) => format!("pod {}/{} added on {}", p.namespace, p.name, p.node),
            Change::RemovePod(p) => format!("pod {}/{} deleted", p.namespace, p.name),
            Change::EditVs { v, weight } => format!(
                "VirtualService {}/{} split set to {weight}/{}",
                vs_namespace(*v),
                vs_name(*v),
                100 - weight
            ),
        }
    }

    /// One pod's worth of change (the "incremental update for a one-pod change").
    pub fn one_pod(&self) -> bool {
        !matches!(self, Change::EditVs { .. })
    }
}

/// The cluster as it stands, and the next change to it.
pub struct Cluster {
    /// Every pod by node, then name.
    pub pods: BTreeMap<String, BTreeMap<String, Pod>>,
    /// Each VirtualService's v1 weight.
    pub weights: Vec<u32>,
}

impl Cluster {
    pub fn new() -> Self {
        let mut pods: BTreeMap<String, BTreeMap<String, Pod>> = BTreeMap::new();
        for p in (0..PODS).map(Pod::initial) {
            pods.entry(p.node.clone())
                .or_default()
                .insert(p.name.clone(), p);
        }
        Self {
            pods,
            weights: vec![FIRST_WEIGHT; VIRTUAL_SERVICES],
        }
    }

    /// Change `c` (of at most `PODS`): the three kinds in turn, spread over namespaces, services
    /// and nodes; applied to this model.
    pub fn change(&mut self, c: usize) -> Change {
        match c % 3 {
            0 => {
                let p = Pod::added(c);
                self.pods
                    .entry(p.node.clone())
                    .or_default()
                    .insert(p.name.clone(), p.clone());
                Change::AddPod(p)
            }
            1 => {
                // 97 is prime to 10,000: a different initial pod each time.
                let p = Pod::initial(c * 97 % PODS);
                self.pods.get_mut(&p.node).and_then(|on| on.remove(&p.name));
                Change::RemovePod(p)
            }
            _ => {
                let v = c * 7 % VIRTUAL_SERVICES;
                let mut weight = 10 + (c * 13 % 81) as u32;
                if weight == self.weights[v] {
                    weight += 1;
                }
                self.weights[v] = weight;
                Change::EditVs { v, weight }
            }
        }
    }
}

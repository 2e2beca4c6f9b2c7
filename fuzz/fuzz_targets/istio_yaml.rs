//! A file in control's dir source (control/src/source/dir.rs `parse_file`: YAML, every document
//! parsed and validated, Istio kinds included), added to the shop example's namespace, pods and
//! services, then compiled for each node. Nothing panics, and whatever control compiles from
//! objects it accepted, the agent accepts too.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use trellis_agent::config::NodeConfig;
use trellis_api as api;
use trellis_control::{compile, model::Cluster, source::dir::parse_file};

const SHOP: [&str; 3] = [
    include_str!("../../docs/examples/shop/namespace.yaml"),
    include_str!("../../docs/examples/shop/pods.yaml"),
    include_str!("../../docs/examples/shop/services.yaml"),
];

fn shop() -> &'static Cluster {
    static SHOP_CLUSTER: OnceLock<Cluster> = OnceLock::new();
    SHOP_CLUSTER.get_or_init(|| {
        let mut c = Cluster::default();
        for file in SHOP {
            for doc in parse_file(file).expect("the shop example parses") {
                c.insert(doc.object.expect("the shop example is valid"));
            }
        }
        c
    })
}

fuzz_target!(|data: &[u8]| {
    // The dir source reads files as UTF-8 and refuses the others whole.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(docs) = parse_file(text) else { return };
    let mut cluster = shop().clone();
    for doc in docs {
        if let Ok(object) = doc.object {
            cluster.insert(object);
        }
    }
    for node in ["node-1", "node-2"] {
        let compiled = compile::node_config(&cluster, node, &compile::Mesh::new("cluster.local"));
        let update = api::ConfigUpdate {
            version: 1,
            snapshot: true,
            upserts: compiled.values().map(|r| api::Resource::clone(r)).collect(),
            trust_domain: "cluster.local".into(),
            ..Default::default()
        };
        if let Err(e) = NodeConfig::default().apply(&update) {
            panic!("the agent rejects what control compiled: {e:#}");
        }
    }
});

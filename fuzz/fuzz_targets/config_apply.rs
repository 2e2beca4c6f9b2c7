//! The agent applying control's updates (agent/src/config.rs, agent/src/state.rs): the input
//! is a stream of length-delimited `ConfigUpdate` messages, gathered by the agent's assembler,
//! applied, and turned into the proxy's `MeshState`, which then routes a connection and a
//! request to each service and gateway port. A rejected update leaves the config exactly as it was.
#![no_main]

use hyper::{HeaderMap, Method};
use libfuzzer_sys::fuzz_target;
use prost::Message as _;
use trellis_agent::{
    config::NodeConfig,
    state::{HttpEntry, MeshState},
};
use trellis_api as api;

fuzz_target!(|data: &[u8]| {
    fastrand::seed(data.len() as u64);
    let mut buf = data;
    let mut assembler = api::Assembler::default();
    let mut config = NodeConfig::default();
    while let Ok(msg) = api::ConfigUpdate::decode_length_delimited(&mut buf) {
        let update = match assembler.push(msg) {
            Ok(Some(update)) => update,
            Ok(None) => continue,
            // The agent ends the session; the next one starts with a fresh assembler.
            Err(_) => {
                assembler = api::Assembler::default();
                continue;
            }
        };
        let before = config.clone();
        if config.apply(&update).is_err() {
            assert_eq!(config, before, "a rejected update changed the config");
            continue;
        }
        assert_eq!(
            (config.version, &config.trust_domain),
            (update.version, &update.trust_domain)
        );
        if update.snapshot {
            assert!(config.resources.len() <= update.upserts.len());
        }
        let state = MeshState::build(&config, "n1");
        for (vip, svc) in &state.services {
            let _ = state.route(*vip, "shop");
            if svc.http {
                let entry = HttpEntry::Service(*vip);
                let _ = state.route_http(entry, "", &Method::GET, "/", &HeaderMap::new());
            }
        }
        // Gateway ports (their certificates, from the update, parsed too), by every route kind.
        for addr in state.gateways.keys() {
            let _ = state.gateway_route(*addr);
            let _ = state.gateway_sni_route(*addr, Some("shop.example"));
            let entry = HttpEntry::Gateway(*addr);
            let _ = state.route_http(
                entry,
                "shop.example:443",
                &Method::GET,
                "/",
                &HeaderMap::new(),
            );
        }
    }
});

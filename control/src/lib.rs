//! trellis-control: watches the cluster, compiles per-node config, streams it to agents, and
//! signs workload certificates. See docs/control.md.
pub mod auth;
pub mod ca;
pub mod chunks;
pub mod compile;
pub mod gateways;
pub mod held;
pub mod install;
pub mod istio;
pub mod memory;
pub mod metrics;
pub mod model;
pub mod names;
pub mod routes;
pub mod run;
pub mod server;
pub mod service_entries;
pub mod source;
pub mod tcp_routes;

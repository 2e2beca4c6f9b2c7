//! The Trellis node agent. See docs/capture.md for how capture works.
pub mod admin;
pub mod authz;
pub mod cgroup;
pub mod cli;
pub mod config;
pub mod dns;
pub mod http_route;
pub mod identity;
pub mod memory;
pub mod metrics;
pub mod netns;
pub mod pods;
pub mod proxy;
pub mod redirect;
pub mod state;
pub mod tls;
pub mod uninstall;

//! A real single-node Kubernetes on this machine: where `cargo xtask setup` caches the
//! Kubernetes binaries a node runs (kubelet, kube-controller-manager, kube-scheduler,
//! kube-proxy), beside kube-apiserver.
use std::path::PathBuf;

use crate::apiserver;

/// Where `cargo xtask setup` caches the Kubernetes binaries it builds.
pub fn kube_dir() -> PathBuf {
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"));
    home.join(".cache/trellis/kube").join(apiserver::VERSION)
}

/// A cached Kubernetes binary (kubelet, kube-proxy, …).
pub fn binary(name: &str) -> PathBuf {
    kube_dir().join(name)
}

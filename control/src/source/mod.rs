//! Where the cluster model comes from: a directory of YAML (`dir`) or the Kubernetes API (`kube`).
pub mod dir;
pub mod kube;

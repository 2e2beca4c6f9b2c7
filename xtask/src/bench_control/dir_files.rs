//! The `dir:` source: the generated cluster as YAML files, one per node's pods, per namespace's
//! services and per namespace's VirtualServices and DestinationRules (each well under control's
//! 1024-document limit). A change rewrites one file atomically (write, then rename).
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};
use serde_json::Value;

use super::cluster::{self, Change, Cluster};

pub struct Dir {
    pub path: PathBuf,
}

impl Dir {
    pub fn create(path: &Path, model: &Cluster) -> Result<Self> {
        std::fs::create_dir_all(path)?;
        let dir = Self {
            path: path.to_owned(),
        };
        let namespaces: Vec<Value> = (0..cluster::NAMESPACES).map(cluster::namespace).collect();
        dir.write("namespaces.yaml", &namespaces)?;
        for node in model.pods.keys() {
            dir.write_node(model, node)?;
        }
        for n in 0..cluster::NAMESPACES {
            let per_ns = cluster::SERVICES / cluster::NAMESPACES;
            let services: Vec<Value> = (n * per_ns..(n + 1) * per_ns)
                .map(cluster::service)
                .collect();
            dir.write(&format!("services-{n}.yaml"), &services)?;
            dir.write_istio(model, n)?;
        }
        Ok(dir)
    }

    /// Rewrites the file the change is in; returns once it is in place.
    pub fn apply(&self, model: &Cluster, change: &Change) -> Result<()> {
        match change {
            Change::AddPod(p) | Change::RemovePod(p) => self.write_node(model, &p.node),
            Change::EditVs { v, .. } => {
                self.write_istio(model, v / (cluster::VIRTUAL_SERVICES / cluster::NAMESPACES))
            }
        }
    }

    fn write_node(&self, model: &Cluster, node: &str) -> Result<()> {
        let pods: Vec<Value> = model.pods[node]
            .values()
            .map(|p| p.object_with_status())
            .collect();
        self.write(&format!("{node}.yaml"), &pods)
    }

    /// Namespace `n`'s VirtualServices and DestinationRules.
    fn write_istio(&self, model: &Cluster, n: usize) -> Result<()> {
        let per_ns = cluster::VIRTUAL_SERVICES / cluster::NAMESPACES;
        let objects: Vec<Value> = (n * per_ns..(n + 1) * per_ns)
            .flat_map(|v| {
                [
                    cluster::virtual_service(v, model.weights[v]),
                    cluster::destination_rule(v),
                ]
            })
            .collect();
        self.write(&format!("istio-{n}.yaml"), &objects)
    }

    /// Control reads only `*.yaml` files, so the half-written `.tmp` is never seen.
    fn write(&self, name: &str, objects: &[Value]) -> Result<()> {
        let yaml = serde_saphyr::to_string_multiple(objects)
            .with_context(|| format!("writing {name} as YAML"))?;
        let tmp = self.path.join(format!("{name}.tmp"));
        std::fs::write(&tmp, yaml).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, self.path.join(name))?;
        Ok(())
    }
}

//! `--source dir:PATH`: a directory of ordinary Kubernetes YAML (multi-document files), re-read
//! when it changes. Each file is all or nothing: a file with any bad document keeps its last good
//! version, and the error names the file, the document and the field.
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::SystemTime,
};

use anyhow::{Context as _, Result};
use serde_json::Value;
use tracing::{info, warn};

use crate::model::{Cluster, Object, parse_object};

struct FileState {
    stamp: (SystemTime, u64),
    /// The last good parse.
    objects: Vec<Object>,
    error: Option<String>,
}

pub struct DirSource {
    dir: PathBuf,
    files: BTreeMap<PathBuf, FileState>,
}

impl DirSource {
    pub fn new(dir: &Path) -> Result<Self> {
        anyhow::ensure!(
            dir.is_dir(),
            "--source dir:{}: not a directory",
            dir.display()
        );
        Ok(Self {
            dir: dir.to_owned(),
            files: BTreeMap::new(),
        })
    }

    /// Re-reads what changed. Returns true if the model may have changed.
    pub fn poll(&mut self) -> bool {
        let mut changed = false;
        let present = match yaml_files(&self.dir) {
            Ok(f) => f,
            Err(e) => {
                warn!("reading {}: {e:#}", self.dir.display());
                return false;
            }
        };
        let gone: Vec<PathBuf> = self
            .files
            .keys()
            .filter(|p| !present.contains_key(*p))
            .cloned()
            .collect();
        for p in gone {
            info!(file = %p.display(), "file removed; dropping its objects");
            self.files.remove(&p);
            changed = true;
        }
        for (path, stamp) in present {
            if self.files.get(&path).is_some_and(|f| f.stamp == stamp) {
                continue;
            }
            changed = true;
            let parsed = std::fs::read_to_string(&path)
                .map_err(anyhow::Error::from)
                .and_then(|t| parse_file(&t));
            let state = self.files.entry(path.clone()).or_insert(FileState {
                stamp,
                objects: Vec::new(),
                error: None,
            });
            state.stamp = stamp;
            match parsed {
                Ok(objects) => {
                    info!(file = %path.display(), objects = objects.len(), "loaded");
                    state.objects = objects;
                    state.error = None;
                }
                Err(e) => {
                    let msg = format!("{}: {e:#}", path.display());
                    warn!(
                        "{msg}; keeping this file's last good objects ({})",
                        state.objects.len()
                    );
                    state.error = Some(msg);
                }
            }
        }
        changed
    }

    /// The model from every file's last good objects.
    pub fn cluster(&self) -> Cluster {
        let mut c = Cluster::default();
        for f in self.files.values() {
            for o in &f.objects {
                c.insert(o.clone());
            }
        }
        c
    }

    /// Current errors, one per bad file.
    pub fn errors(&self) -> Vec<String> {
        self.files
            .values()
            .filter_map(|f| f.error.clone())
            .collect()
    }
}

fn yaml_files(dir: &Path) -> Result<BTreeMap<PathBuf, (SystemTime, u64)>> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let path = entry?.path();
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .unwrap_or_default();
        if path.is_file() && matches!(ext, "yaml" | "yml" | "json") {
            let m = std::fs::metadata(&path)?;
            out.insert(path, (m.modified()?, m.len()));
        }
    }
    Ok(out)
}

/// Parses every document of a file; the first bad one fails the file.
pub fn parse_file(text: &str) -> Result<Vec<Object>> {
    let docs: Vec<Value> =
        serde_saphyr::from_multiple(text).map_err(|e| anyhow::anyhow!("not valid YAML: {e}"))?;
    let mut objects = Vec::new();
    for (i, doc) in docs.iter().enumerate().filter(|(_, d)| !d.is_null()) {
        let label = describe(doc);
        let obj = parse_object(doc).with_context(|| format!("document {} ({label})", i + 1))?;
        objects.push(obj);
    }
    Ok(objects)
}

fn describe(doc: &Value) -> String {
    let s = |v: Option<&Value>| v.and_then(Value::as_str).unwrap_or("?").to_owned();
    let meta = doc.get("metadata");
    let ns = meta
        .and_then(|m| m.get("namespace"))
        .and_then(Value::as_str);
    let name = s(meta.and_then(|m| m.get("name")));
    format!(
        "{} {}",
        s(doc.get("kind")),
        ns.map_or(name.clone(), |ns| format!("{ns}/{name}"))
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: shop\n  labels: {trellis.dev/mesh: enabled}\n---\n\
        apiVersion: v1\nkind: Pod\nmetadata: {name: web, namespace: shop}\nspec: {nodeName: n1, containers: []}\nstatus: {podIP: 10.244.1.2}\n";

    /// The examples in docs/ are what newcomers run first: they must load cleanly.
    #[test]
    fn the_documented_examples_load_without_errors() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/examples/shop");
        let mut src = DirSource::new(&dir).unwrap();
        src.poll();
        assert_eq!(src.errors(), Vec::<String>::new());
        let c = src.cluster();
        assert_eq!(
            (
                c.namespaces.len(),
                c.pods.len(),
                c.services.len(),
                c.policies.len()
            ),
            (1, 3, 2, 4)
        );
    }

    #[test]
    fn bad_files_keep_their_last_good_objects_and_name_the_problem() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("shop.yaml");
        std::fs::write(&file, GOOD).unwrap();
        let mut src = DirSource::new(dir.path()).unwrap();
        assert!(src.poll());
        assert_eq!(src.cluster().pods.len(), 1);
        assert!(!src.poll(), "nothing changed");

        std::fs::write(
            &file,
            format!("{GOOD}---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: d}}\n"),
        )
        .unwrap();
        assert!(src.poll());
        let errors = src.errors();
        assert!(
            errors[0].contains("shop.yaml") && errors[0].contains("document 3 (Deployment d)"),
            "{errors:?}"
        );
        assert_eq!(src.cluster().pods.len(), 1, "last good objects kept");

        std::fs::write(&file, "kind: [unclosed").unwrap();
        src.poll();
        assert!(
            src.errors()[0].contains("not valid YAML"),
            "{:?}",
            src.errors()
        );
        assert_eq!(src.cluster().pods.len(), 1);

        std::fs::remove_file(&file).unwrap();
        assert!(src.poll());
        assert!(src.cluster().pods.is_empty() && src.errors().is_empty());
    }
}

//! `--source dir:PATH`: a directory of ordinary Kubernetes YAML (multi-document files), re-read
//! when it changes. A bad document is refused and its object keeps its last good version (others
//! in the file still apply); a file that is not valid YAML, or breaks a limit, keeps all its last
//! good objects. Errors name the file, the document, the object and the field.
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, SystemTime},
};

use anyhow::{Context as _, Result, anyhow, bail};
use notify::Watcher as _;
use serde_json::Value;
use serde_saphyr::budget::BudgetBreach;
use tracing::{info, warn};

use super::{Outputs, parse_contained};
use crate::model::{Cluster, Object};

/// How soon a change is read after the kernel reports it: writing or renaming one file makes
/// several events, read once.
const SETTLE: Duration = Duration::from_millis(10);

/// How often the directory is read without an event: a safety net where the filesystem does not
/// report changes (some network and FUSE filesystems), and the only way if watching fails.
const POLL: Duration = Duration::from_secs(5);
const POLL_UNWATCHED: Duration = Duration::from_millis(300);

/// Limits on one file (docs/control.md): they bound the memory and time one file can cost.
pub const MAX_FILE_BYTES: u64 = 64 << 20;
pub const MAX_DOCUMENTS: usize = 1024;
pub const MAX_NODES: usize = 250_000;
pub const MAX_DEPTH: usize = 64;

struct FileState {
    stamp: (SystemTime, u64),
    /// The last good version of each object, by `Kind namespace/name`.
    objects: BTreeMap<String, Object>,
    /// The file's error, or one per refused document.
    errors: Vec<String>,
}

pub struct DirSource {
    dir: PathBuf,
    files: BTreeMap<PathBuf, FileState>,
}

/// Reads `src` whenever the kernel reports a change in its directory (inotify), and at least every
/// `POLL`, and publishes what it reads, until the task is stopped.
pub async fn run(src: Arc<Mutex<DirSource>>, out: Arc<Outputs>) -> Result<()> {
    let dir = src
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .dir
        .clone();
    let (tx, mut events) = tokio::sync::mpsc::channel(1);
    // Kept for as long as the loop runs: dropping it stops the watch.
    let watcher = notify::recommended_watcher(move |_: notify::Result<notify::Event>| {
        let _ = tx.try_send(()); // one pending wake-up is enough
    })
    .and_then(|mut w| {
        w.watch(&dir, notify::RecursiveMode::NonRecursive)
            .map(|()| w)
    });
    let poll = match &watcher {
        Ok(_) => POLL,
        Err(e) => {
            warn!(dir = %dir.display(), "cannot watch for changes ({e}); reading it every {POLL_UNWATCHED:?}");
            POLL_UNWATCHED
        }
    };
    let mut first = true;
    loop {
        let read = {
            let mut src = src.lock().unwrap_or_else(PoisonError::into_inner);
            (src.poll() || first).then(|| (src.cluster(), src.errors()))
        };
        if let Some((cluster, errors)) = read {
            out.publish(cluster, errors);
            first = false;
        }
        tokio::select! {
            Some(()) = events.recv() => {
                tokio::time::sleep(SETTLE).await;
                while events.try_recv().is_ok() {}
            }
            () = tokio::time::sleep(poll) => {}
        }
    }
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
            let parsed = read_file(&path, stamp.1);
            let state = self.files.entry(path.clone()).or_insert(FileState {
                stamp,
                objects: BTreeMap::new(),
                errors: Vec::new(),
            });
            state.stamp = stamp;
            state.update(&path, parsed);
        }
        changed
    }

    /// The model from every file's last good objects.
    pub fn cluster(&self) -> Cluster {
        let mut c = Cluster::default();
        for f in self.files.values() {
            for o in f.objects.values() {
                c.insert(o.clone());
            }
        }
        c
    }

    /// Current errors: one per bad file, or per refused document.
    pub fn errors(&self) -> Vec<String> {
        self.files
            .values()
            .flat_map(|f| f.errors.iter().cloned())
            .collect()
    }
}

impl FileState {
    fn update(&mut self, path: &Path, parsed: Result<Vec<Document>>) {
        let file = path.display();
        let docs = match parsed {
            Ok(docs) => docs,
            Err(e) => {
                let msg = format!("{file}: {e:#}");
                warn!(
                    "{msg}; keeping this file's last good objects ({})",
                    self.objects.len()
                );
                self.errors = vec![msg];
                return;
            }
        };
        let mut objects = BTreeMap::new();
        self.errors.clear();
        for doc in docs {
            match doc.object {
                Ok(o) => {
                    objects.insert(doc.key, o);
                }
                Err(e) => {
                    let msg = format!("{file}: document {} ({}): {e}", doc.index, doc.key);
                    match self.objects.remove(&doc.key) {
                        Some(good) => {
                            warn!("{msg}; keeping its last good version");
                            objects.insert(doc.key, good);
                        }
                        None => warn!("{msg}; refused"),
                    }
                    self.errors.push(msg);
                }
            }
        }
        info!(file = %file, objects = objects.len(), refused = self.errors.len(), "loaded");
        self.objects = objects;
    }
}

/// The files of `dir` the source reads (`*.yaml`, `*.yml`, `*.json`, not in subdirectories), with
/// their modification time and size.
pub fn yaml_files(dir: &Path) -> Result<BTreeMap<PathBuf, (SystemTime, u64)>> {
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

/// Reads and parses one file of `len` bytes, refusing it whole beyond `MAX_FILE_BYTES`.
pub fn read_file(path: &Path, len: u64) -> Result<Vec<Document>> {
    if len > MAX_FILE_BYTES {
        bail!("file is {len} bytes, more than {MAX_FILE_BYTES} (the limit, 64 MiB; split it)");
    }
    parse_file(&std::fs::read_to_string(path)?)
}

/// One document of a file: its place in the file (from 1), its object's key (`Kind
/// namespace/name`) and the object, or why it was refused (starting with the field's path).
pub struct Document {
    pub index: usize,
    pub key: String,
    pub object: Result<Object, String>,
}

/// Parses every document of a file. An error here is about the file as a whole.
pub fn parse_file(text: &str) -> Result<Vec<Document>> {
    let mut budget = serde_saphyr::Budget::default();
    budget.max_documents = MAX_DOCUMENTS;
    budget.max_nodes = MAX_NODES;
    budget.max_depth = MAX_DEPTH;
    // A node costs one or two events (a scalar; a map's start and end), so nodes breach first.
    budget.max_events = 4 * MAX_NODES;
    let mut options = serde_saphyr::Options::default();
    options.budget = Some(budget);
    let docs: Vec<Value> =
        serde_saphyr::from_multiple_with_options(text, options).map_err(yaml_error)?;
    Ok(docs
        .iter()
        .enumerate()
        .filter(|(_, d)| !d.is_null())
        .map(|(i, doc)| Document {
            index: i + 1,
            key: describe(doc),
            object: parse_contained(doc),
        })
        .collect())
}

/// A budget breach is a limit of ours: say which, and what to do.
fn yaml_error(e: serde_saphyr::Error) -> anyhow::Error {
    let serde_saphyr::Error::Budget { breach, .. } = e.without_snippet() else {
        return anyhow!("not valid YAML: {e}");
    };
    match breach {
        BudgetBreach::Documents { .. } => {
            anyhow!("file has more than {MAX_DOCUMENTS} documents (the limit; split it)")
        }
        BudgetBreach::Nodes { .. } | BudgetBreach::Events { .. } => anyhow!(
            "file has more than {MAX_NODES} YAML nodes (values, lists and maps; the limit; split it)"
        ),
        BudgetBreach::Depth { .. } => {
            anyhow!("file nests more than {MAX_DEPTH} levels deep (the limit)")
        }
        other => anyhow!("file exceeds a YAML parser limit ({other:?}); simplify or split it"),
    }
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
    fn a_bad_document_keeps_its_objects_last_good_version_and_no_other() {
        let vs = |weights: &str, host: &str| {
            format!(
                "---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: reviews, namespace: shop}}\n\
                 spec: {{hosts: [reviews], http: [{{route: [{weights}]}}]}}\n---\n\
                 apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: ratings, namespace: shop}}\n\
                 spec: {{hosts: [{host}], http: [{{route: [{{destination: {{host: ratings}}}}]}}]}}\n"
            )
        };
        let good = "{destination: {host: reviews, subset: v1}, weight: 100}";
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("routes.yaml");
        std::fs::write(&file, format!("{GOOD}{}", vs(good, "ratings"))).unwrap();
        let mut src = DirSource::new(dir.path()).unwrap();
        src.poll();
        assert_eq!(src.errors(), Vec::<String>::new());
        let before = src.cluster();

        // The hostile tester's weights: refused, named, and only that object is held back.
        let hostile = "{destination: {host: a}, weight: 2147483647}, {destination: {host: b}, weight: 2147483647}, \
                       {destination: {host: c}, weight: 102}";
        std::fs::write(&file, format!("{GOOD}{}", vs(hostile, "ratings.shop"))).unwrap();
        assert!(src.poll());
        let errors = src.errors();
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(
            errors[0].contains("routes.yaml: document 3 (VirtualService shop/reviews): spec.http[0].route[0].weight: 2147483647 is not 0 to 100"),
            "{errors:?}"
        );
        let after = src.cluster();
        let reviews = "VirtualService/shop/reviews";
        assert_eq!(
            after.policies[reviews], before.policies[reviews],
            "last good kept"
        );
        let ratings = &after.policies["VirtualService/shop/ratings"];
        assert_eq!(
            ratings.spec["hosts"][0], "ratings.shop",
            "the good document applied"
        );

        // A new object that is bad from the start is simply absent.
        std::fs::write(
            &file,
            format!("{GOOD}{}", vs(hostile, "ratings")).replace("name: reviews", "name: fresh"),
        )
        .unwrap();
        src.poll();
        assert!(
            !src.cluster()
                .policies
                .contains_key("VirtualService/shop/fresh")
        );
        assert!(
            !src.cluster().policies.contains_key(reviews),
            "removed from the file"
        );
    }

    #[test]
    fn limits_are_named_in_their_errors() {
        let doc = "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n";
        let many = vec![doc; MAX_DOCUMENTS + 1].join("---\n");
        let e = format!("{:#}", parse_file(&many).err().unwrap());
        assert_eq!(e, "file has more than 1024 documents (the limit; split it)");
        assert_eq!(
            parse_file(&vec![doc; MAX_DOCUMENTS].join("---\n"))
                .unwrap()
                .len(),
            1024
        );
        let deep = format!(
            "{}1{}",
            "[".repeat(MAX_DEPTH + 1),
            "]".repeat(MAX_DEPTH + 1)
        );
        let e = format!("{:#}", parse_file(&deep).err().unwrap());
        assert!(e.contains("more than 64 levels"), "{e}");
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

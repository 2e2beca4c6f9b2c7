//! `--source kube`: watches Namespaces, Pods, Services, TLS Secrets (gateways' `credentialName`)
//! and the Istio kinds through the API server
//! (kube-rs watchers, which re-list and resume by themselves after errors and server restarts).
//! Objects are watched untyped and parsed with the same code as dir mode, so one bad object is
//! reported and skipped (its last good version kept) instead of breaking a whole watch.
use std::{collections::BTreeMap, sync::Arc};

use anyhow::Result;
use futures_util::StreamExt as _;
use k8s_openapi::api::core::v1::{Namespace, Pod, Secret, Service};
use kube::{
    Api, Client,
    api::{ApiResource, DynamicObject},
    runtime::{WatchStreamExt as _, watcher},
};
use serde_json::Value;
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::{Outputs, parse_contained};
use crate::{
    istio,
    model::{Cluster, Object},
};

/// The kinds watched: the three core kinds must list before control serves; a mesh CRD that is
/// not installed, or Secrets control may not read, are reported and retried, and do not hold
/// control up.
fn kinds() -> Vec<(ApiResource, bool)> {
    let mut kinds = vec![
        (ApiResource::erase::<Namespace>(&()), true),
        (ApiResource::erase::<Pod>(&()), true),
        (ApiResource::erase::<Service>(&()), true),
        (ApiResource::erase::<Secret>(&()), false),
    ];
    kinds.extend(istio::api_resources().into_iter().map(|r| (r, false)));
    kinds
}

/// Only TLS Secrets: control has no use for (and should not hold) any other.
fn watch_config(resource: &ApiResource) -> watcher::Config {
    let config = watcher::Config::default();
    if resource.kind == "Secret" {
        return config.fields("type=kubernetes.io/tls");
    }
    config
}

#[derive(Default)]
struct Entry {
    good: Option<Object>,
    error: Option<String>,
}

/// One kind's objects by `namespace/name`.
type Store = BTreeMap<String, Entry>;

struct Kind {
    resource: ApiResource,
    required: bool,
    store: Store,
    /// A re-list in progress (watcher Init … InitDone).
    relist: Option<Store>,
    /// Listed once, or (optional kinds) failed once.
    settled: bool,
}

enum Msg {
    Event(usize, Box<watcher::Event<DynamicObject>>),
    Failed(usize),
}

/// Runs until the task is stopped; publishes once the required kinds have listed.
pub async fn run(client: Client, out: Arc<Outputs>) -> Result<()> {
    let (tx, mut rx) = mpsc::channel(1024);
    let mut kinds: Vec<Kind> = kinds()
        .into_iter()
        .map(|(resource, required)| Kind {
            resource,
            required,
            store: Store::new(),
            relist: None,
            settled: false,
        })
        .collect();
    for (i, kind) in kinds.iter().enumerate() {
        let api: Api<DynamicObject> = Api::all_with(client.clone(), &kind.resource);
        let tx = tx.clone();
        let name = kind.resource.kind.clone();
        let config = watch_config(&kind.resource);
        tokio::spawn(async move {
            let mut stream = watcher(api, config).default_backoff().boxed();
            while let Some(ev) = stream.next().await {
                let msg = match ev {
                    Ok(ev) => Msg::Event(i, Box::new(ev)),
                    Err(e) => {
                        warn!(kind = name, "watch failed (retrying with backoff): {e}");
                        Msg::Failed(i)
                    }
                };
                if tx.send(msg).await.is_err() {
                    return;
                }
            }
        });
    }
    drop(tx);
    while let Some(msg) = rx.recv().await {
        handle(&mut kinds, msg);
        while let Ok(msg) = rx.try_recv() {
            handle(&mut kinds, msg);
        }
        if !kinds.iter().all(|k| k.settled || !k.required) {
            continue;
        }
        let mut cluster = Cluster::default();
        let mut errs = Vec::new();
        for k in &kinds {
            for e in k.store.values() {
                if let Some(o) = &e.good {
                    cluster.insert(o.clone());
                }
                errs.extend(e.error.clone());
            }
        }
        if !*out.ready.borrow() {
            info!("initial lists done; serving");
        }
        out.publish(cluster, errs);
    }
    anyhow::bail!("every watch ended")
}

fn handle(kinds: &mut [Kind], msg: Msg) {
    match msg {
        Msg::Failed(i) => kinds[i].settled |= !kinds[i].required,
        Msg::Event(i, ev) => {
            let kind = &mut kinds[i];
            match *ev {
                watcher::Event::Init => kind.relist = Some(Store::new()),
                watcher::Event::InitApply(obj) => {
                    let store = kind.relist.get_or_insert_default();
                    let (key, parsed) = parse(&kind.resource, &obj);
                    let previous = kind.store.get(&key).and_then(|e| e.good.clone());
                    store.insert(key, entry(previous, parsed));
                }
                watcher::Event::InitDone => {
                    kind.store = kind.relist.take().unwrap_or_default();
                    kind.settled = true;
                }
                watcher::Event::Apply(obj) => {
                    let (key, parsed) = parse(&kind.resource, &obj);
                    let previous = kind.store.get(&key).and_then(|e| e.good.clone());
                    kind.store.insert(key, entry(previous, parsed));
                }
                watcher::Event::Delete(obj) => {
                    let (key, _) = parse(&kind.resource, &obj);
                    kind.store.remove(&key);
                }
            }
        }
    }
}

/// A bad new version keeps the object's previous good version, with the error beside it.
fn entry(previous: Option<Object>, parsed: Result<Object, String>) -> Entry {
    match parsed {
        Ok(o) => Entry {
            good: Some(o),
            error: None,
        },
        Err(e) => {
            warn!("{e}; keeping its last good version");
            Entry {
                good: previous,
                error: Some(e),
            }
        }
    }
}

fn parse(resource: &ApiResource, obj: &DynamicObject) -> (String, Result<Object, String>) {
    let ns = obj.metadata.namespace.clone().unwrap_or_default();
    let name = obj.metadata.name.clone().unwrap_or_default();
    let key = format!("{ns}/{name}");
    let label = if ns.is_empty() {
        format!("{} {name}", resource.kind)
    } else {
        format!("{} {key}", resource.kind)
    };
    let parsed = serde_json::to_value(obj)
        .map_err(|e| e.to_string())
        .and_then(|mut v| {
            // List items may come without their type; the watch knows it.
            v["apiVersion"] = Value::String(resource.api_version.clone());
            v["kind"] = Value::String(resource.kind.clone());
            parse_contained(&v).map_err(|e| format!("{label}: {e}"))
        });
    (key, parsed)
}

//! What a node's agent holds, and what changed for it from one compile to the next: the work
//! each node's stream does per change. The two compiles' ordered maps are walked side by side,
//! and resources the compiles share are compared by pointer, so what did not change costs
//! neither an allocation nor a lookup.
use std::{collections::BTreeMap, sync::Arc};

use itertools::{EitherOrBoth, Itertools as _};
use trellis_api as api;

use crate::compile::{Compiled, Key};

/// A node's view of the last compile it was sent, except `kept`: resources too large to send,
/// for which the node has its previous version (Some) or nothing (None).
pub struct Held {
    compiled: Arc<Compiled>,
    kept: BTreeMap<Key, Option<Arc<api::Resource>>>,
}

/// Resources to upsert (with their keys) and keys to remove.
pub type Changes = (Vec<(Key, Arc<api::Resource>)>, Vec<api::ResourceKey>);

impl Held {
    pub fn new(compiled: Arc<Compiled>, kept: BTreeMap<Key, Option<Arc<api::Resource>>>) -> Self {
        Self { compiled, kept }
    }

    /// What the node has under `key`.
    pub fn get(&self, node: &str, key: &Key) -> Option<Arc<api::Resource>> {
        match self.kept.get(key) {
            Some(kept) => kept.clone(),
            None => self.compiled.get(node, key).cloned(),
        }
    }

    /// What `node` needs to go from what it holds to its view of `new`.
    pub fn changes(&self, node: &str, new: &Compiled) -> Changes {
        let mut out = Out::default();
        let old = &*self.compiled;
        match &new.changed {
            _ if std::ptr::eq(old, new) => {}
            // The usual case: the node holds the compile before, and only what changed is looked at.
            Some(changed) if changed.since == old.id => {
                for uid in &changed.pods {
                    let (o, n) = (old.pods.get(uid), new.pods.get(uid));
                    out.pod(uid, o.map(|p| p.on(node)), n.map(|p| p.on(node)));
                }
                for key in &changed.shared {
                    out.compare(key.0, &key.1, old.shared.get(key), new.shared.get(key));
                }
            }
            // The node skipped a compile (or a compile failed): all of it, side by side.
            _ => {
                for pair in old
                    .pods
                    .iter()
                    .merge_join_by(&new.pods, |a, b| a.0.cmp(b.0))
                {
                    let (uid, o, n) = split(pair);
                    out.pod(uid, o.map(|p| p.on(node)), n.map(|p| p.on(node)));
                }
                for pair in old
                    .shared
                    .iter()
                    .merge_join_by(&new.shared, |a, b| a.0.cmp(b.0))
                {
                    let ((kind, name), o, n) = split(pair);
                    out.compare(*kind, name, o, n);
                }
            }
        }
        if !std::ptr::eq(old, new) {
            let (o, n) = (security(old, node), security(new, node));
            for pair in o.merge_join_by(n, |a, b| a.0.cmp(b.0)) {
                let ((kind, name), o, n) = match pair {
                    EitherOrBoth::Left((k, o)) => (k, o, None),
                    EitherOrBoth::Right((k, n)) => (k, None, n),
                    EitherOrBoth::Both((k, o), (_, n)) => (k, o, n),
                };
                out.compare(*kind, name, o, n);
            }
        }
        // What the node kept instead of the compiled version: compared afresh.
        if !self.kept.is_empty() {
            out.upserts.retain(|(k, _)| !self.kept.contains_key(k));
            out.removals
                .retain(|k| !self.kept.contains_key(&(k.kind, k.name.clone())));
            for (key, kept) in &self.kept {
                out.compare(key.0, &key.1, kept.as_ref(), new.get(node, key));
            }
        }
        (out.upserts, out.removals)
    }
}

/// `c`'s security policies as `node` sees them: None where one does not reach it.
fn security<'a>(
    c: &'a Compiled,
    node: &'a str,
) -> impl Iterator<Item = (&'a Key, Option<&'a Arc<api::Resource>>)> + 'a {
    c.security
        .iter()
        .map(move |(key, (namespace, r))| (key, c.reaches(namespace, node).then_some(r)))
}

fn split<'a, K, V>(pair: EitherOrBoth<(&'a K, &'a V)>) -> (&'a K, Option<&'a V>, Option<&'a V>) {
    match pair {
        EitherOrBoth::Left((k, o)) => (k, Some(o), None),
        EitherOrBoth::Right((k, n)) => (k, None, Some(n)),
        EitherOrBoth::Both((k, o), (_, n)) => (k, Some(o), Some(n)),
    }
}

#[derive(Default)]
struct Out {
    upserts: Vec<(Key, Arc<api::Resource>)>,
    removals: Vec<api::ResourceKey>,
}

impl Out {
    /// Records what it takes to go from `old` to `new` for the pod `uid` (each as its kind and
    /// resource on the node).
    fn pod(
        &mut self,
        uid: &str,
        old: Option<(api::Kind, &Arc<api::Resource>)>,
        new: Option<(api::Kind, &Arc<api::Resource>)>,
    ) {
        match (old, new) {
            // A pod that changed node: another kind, so another key.
            (Some((ok, _)), Some((nk, n))) if ok != nk => {
                self.remove(ok as i32, uid);
                self.upsert((nk as i32, uid.to_owned()), n);
            }
            (o, n) => {
                let kind = o.or(n).map_or(0, |(k, _)| k as i32);
                self.compare(kind, uid, o.map(|(_, r)| r), n.map(|(_, r)| r));
            }
        }
    }

    /// Records what it takes to go from `old` to `new` under (`kind`, `name`).
    fn compare(
        &mut self,
        kind: i32,
        name: &str,
        old: Option<&Arc<api::Resource>>,
        new: Option<&Arc<api::Resource>>,
    ) {
        match (old, new) {
            (Some(o), Some(n)) if Arc::ptr_eq(o, n) || o == n => {}
            (_, Some(n)) => self.upsert((kind, name.to_owned()), n),
            (Some(_), None) => self.remove(kind, name),
            (None, None) => {}
        }
    }

    fn upsert(&mut self, key: Key, r: &Arc<api::Resource>) {
        self.upserts.push((key, r.clone()));
    }

    fn remove(&mut self, kind: i32, name: &str) {
        self.removals.push(api::ResourceKey {
            kind,
            name: name.to_owned(),
        });
    }
}

//! Which pods this node's agent captures: the desired set (from a pods file for now; from the
//! control service later), and the reconciler that makes the capture layer match it.
use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    net::IpAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::SystemTime,
};

use anyhow::{Context as _, Result, bail};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::{
    cgroup, config,
    config::ControlEndpoint,
    identity,
    netns::{self, Netns},
    proxy::{self, PodCtx, PodListeners, PodProxy, Shared},
    redirect::Redirect,
    state::MeshState,
};

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PodSpec {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    #[serde(default)]
    pub ips: Vec<IpAddr>,
    /// The SPIFFE ID control assigned; pods from a pods file have none (capture only, no HBONE).
    #[serde(skip)]
    pub identity: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PodsDoc {
    pods: Vec<PodSpec>,
}

/// Parses a pods file: `{"pods": [{"uid", "namespace", "name", "ips": [..]}]}`.
pub fn parse_pods(text: &str) -> Result<Vec<PodSpec>> {
    let doc: PodsDoc = serde_json::from_str(text)?;
    let mut seen = HashSet::new();
    for pod in &doc.pods {
        cgroup::validate_uid(&pod.uid)?;
        if !seen.insert(&pod.uid) {
            bail!("pod UID {} is listed twice", pod.uid);
        }
        if pod.ips.iter().filter(|ip| ip.is_ipv4()).count() > 1
            || pod.ips.iter().filter(|ip| ip.is_ipv6()).count() > 1
        {
            bail!(
                "pod {}/{}: at most one IPv4 and one IPv6 address",
                pod.namespace,
                pod.name
            );
        }
    }
    Ok(doc.pods)
}

/// Watches a pods file; a bad edit is reported and the last good list kept.
pub struct PodsFile {
    path: PathBuf,
    seen: Option<(SystemTime, u64)>,
}

impl PodsFile {
    pub fn new(path: &Path) -> Self {
        Self {
            path: path.to_owned(),
            seen: None,
        }
    }

    /// The new pod list if the file changed and parses.
    pub fn poll(&mut self) -> Option<Vec<PodSpec>> {
        let stamp = std::fs::metadata(&self.path)
            .and_then(|m| Ok((m.modified()?, m.len())))
            .ok();
        if stamp.is_none() || stamp == self.seen {
            return None;
        }
        self.seen = stamp;
        let read = std::fs::read_to_string(&self.path)
            .map_err(anyhow::Error::from)
            .and_then(|t| parse_pods(&t));
        match read {
            Ok(pods) => Some(pods),
            Err(e) => {
                warn!(
                    "ignoring {}: {e:#}; still serving the previous pod list",
                    self.path.display()
                );
                None
            }
        }
    }
}

/// Where the desired pods come from.
pub enum PodSource {
    File(PodsFile),
    /// Control's stream: the node's workloads, as last received (kept while control is away).
    Control(watch::Receiver<Option<Vec<PodSpec>>>),
}

impl PodSource {
    /// Follows control for `node`: its workloads become the desired pods, their identities the
    /// certificates `svids` is kept holding, and the whole config the proxy's `state`.
    pub fn control(
        endpoint: ControlEndpoint,
        node: String,
        svids: watch::Sender<identity::Svids>,
        state: watch::Sender<Arc<MeshState>>,
    ) -> Self {
        let (pods_tx, pods_rx) = watch::channel(None);
        let (wanted_tx, wanted_rx) = watch::channel(BTreeSet::new());
        tokio::spawn(identity::manage(
            endpoint.clone(),
            node.clone(),
            wanted_rx,
            svids,
        ));
        tokio::spawn(config::follow(endpoint, node.clone(), move |cfg, _| {
            state.send_replace(Arc::new(MeshState::build(cfg, &node)));
            let pods = cfg
                .workloads()
                .map(|w| PodSpec {
                    uid: w.uid.clone(),
                    namespace: w.namespace.clone(),
                    name: w.name.clone(),
                    // NodeConfig::apply checked these parse.
                    ips: w.ips.iter().filter_map(|ip| ip.parse().ok()).collect(),
                    identity: Some(w.identity.clone()),
                })
                .collect();
            pods_tx.send_replace(Some(pods));
            let identities: BTreeSet<String> =
                cfg.workloads().map(|w| w.identity.clone()).collect();
            wanted_tx.send_if_modified(|w| {
                let changed = *w != identities;
                *w = identities;
                changed
            });
        }));
        Self::Control(pods_rx)
    }

    /// The new desired pods, if they changed.
    pub fn poll(&mut self) -> Option<Vec<PodSpec>> {
        match self {
            PodSource::File(f) => f.poll(),
            PodSource::Control(rx) => match rx.has_changed() {
                Ok(true) => rx.borrow_and_update().clone(),
                _ => None,
            },
        }
    }
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PodStatus {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    pub ips: Vec<IpAddr>,
    /// `enrolled` or `failed`.
    pub state: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Whether the kernel holds the pod to REGISTRY_ONLY.
    pub registry_only: bool,
    /// Connects and UDP sends REGISTRY_ONLY has refused it, as the kernel counts them.
    pub egress_refused: u64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct AgentStatus {
    /// True once the first desired pod list has been reconciled.
    pub ready: bool,
    pub pods: Vec<PodStatus>,
}

struct Enrolled {
    spec: PodSpec,
    cgroup: PathBuf,
    cgroup_id: u64,
    /// Whether the kernel has the pod marked STRICT (None: not yet synced; an earlier agent
    /// may have left a mark).
    strict: Option<bool>,
    /// The same for REGISTRY_ONLY.
    registry_only: Option<bool>,
    /// The kernel's count of its refused egress, as last read.
    egress_refused: u64,
    _proxy: PodProxy,
}

/// Sole owner of the redirect maps and the per-pod proxies.
pub struct Reconciler {
    redirect: Redirect,
    cgroup_root: PathBuf,
    home: Arc<Netns>,
    shared: Arc<Shared>,
    desired: Option<Vec<PodSpec>>,
    enrolled: BTreeMap<String, Enrolled>,
    failed: BTreeMap<String, String>,
    adopted: bool,
    /// The mesh state version whose registry the kernel holds.
    registry_version: Option<u64>,
    status: watch::Sender<AgentStatus>,
}

impl Reconciler {
    pub fn new(
        redirect: Redirect,
        cgroup_root: PathBuf,
        home: Arc<Netns>,
        shared: Arc<Shared>,
    ) -> Self {
        let (status, _) = watch::channel(AgentStatus::default());
        Self {
            redirect,
            cgroup_root,
            home,
            shared,
            desired: None,
            enrolled: BTreeMap::new(),
            failed: BTreeMap::new(),
            adopted: false,
            registry_version: None,
            status,
        }
    }

    pub fn status(&self) -> watch::Receiver<AgentStatus> {
        self.status.subscribe()
    }

    pub fn set_desired(&mut self, pods: Vec<PodSpec>) {
        self.desired = Some(pods);
    }

    /// One pass: tear down what is no longer wanted or has died, enroll what is missing.
    pub fn reconcile(&mut self) {
        let Some(desired) = self.desired.clone() else {
            return;
        };
        let wanted: BTreeMap<&str, &PodSpec> =
            desired.iter().map(|p| (p.uid.as_str(), p)).collect();
        let uids: Vec<String> = self.enrolled.keys().cloned().collect();
        for uid in uids {
            let pod = &self.enrolled[&uid];
            let gone = match wanted.get(uid.as_str()) {
                Some(spec) if **spec != pod.spec => {
                    Some("pod spec changed; re-enrolling".to_owned())
                }
                Some(_) => self.vanished(pod),
                None => Some("pod removed from the desired list".to_owned()),
            };
            if let Some(why) = gone {
                let pod = self.enrolled.remove(&uid).expect("listed above");
                info!(pod = %format!("{}/{}", pod.spec.namespace, pod.spec.name), uid, "unenrolling: {why}");
                if let Err(e) = self
                    .redirect
                    .unenroll(&uid, Some(pod.cgroup_id), &pod.spec.ips)
                {
                    warn!(uid, "unenrolling: {e:#}");
                }
            }
        }
        self.failed
            .retain(|uid, _| wanted.contains_key(uid.as_str()));
        let missing: Vec<&PodSpec> = desired
            .iter()
            .filter(|p| !self.enrolled.contains_key(&p.uid))
            .collect();
        for spec in missing {
            match self.enroll(spec) {
                Ok(pod) => {
                    info!(pod = %format!("{}/{}", spec.namespace, spec.name), uid = spec.uid, cgroup = %pod.cgroup.display(), "pod enrolled");
                    self.failed.remove(&spec.uid);
                    self.enrolled.insert(spec.uid.clone(), pod);
                }
                Err(e) => {
                    let msg = format!("{e:#}");
                    if self.failed.get(&spec.uid) != Some(&msg) {
                        warn!(pod = %format!("{}/{}", spec.namespace, spec.name), uid = spec.uid, "cannot enroll pod: {msg}");
                    }
                    self.failed.insert(spec.uid.clone(), msg);
                }
            }
        }
        if !self.adopted {
            self.adopted = true;
            self.forget_others();
        }
        self.sync_strict();
        self.sync_egress();
        self.publish(&desired);
    }

    /// Why an enrolled pod can no longer be served, if it cannot.
    fn vanished(&self, pod: &Enrolled) -> Option<String> {
        match cgroup::any_pid(&pod.cgroup) {
            Ok(Some(_)) => None,
            Ok(None) => Some(format!(
                "every process in {} exited; its network namespace is gone",
                pod.cgroup.display()
            )),
            Err(_) => Some(format!(
                "cgroup {} disappeared (pod deleted?)",
                pod.cgroup.display()
            )),
        }
    }

    fn enroll(&mut self, spec: &PodSpec) -> Result<Enrolled> {
        let cgroup = cgroup::find_pod_cgroup(&self.cgroup_root, &spec.uid)?;
        let cgroup_id = cgroup::cgroup_id(&cgroup)?;
        let pid = cgroup::any_pid(&cgroup)?.with_context(|| {
            format!(
                "cgroup {} has no processes: the pod's sandbox is not running",
                cgroup.display()
            )
        })?;
        let netns = Netns::of_pid(pid).with_context(|| {
            format!(
                "opening the network namespace of pid {pid} (from {}): the process is gone",
                cgroup.display()
            )
        })?;
        let listeners = PodListeners::bind(&netns, &self.home, spec.identity.is_some())?;
        let netns_cookie = netns::netns_cookie(std::os::fd::AsFd::as_fd(&listeners.inbound))?;
        if let Err(e) = self.redirect.enroll(
            &spec.uid,
            cgroup_id,
            &spec.ips,
            &netns,
            &listeners.inbound,
            listeners.dns_flags(),
        ) {
            let _ = self
                .redirect
                .unenroll(&spec.uid, Some(cgroup_id), &spec.ips);
            return Err(e);
        }
        let ctx = Arc::new(PodCtx {
            uid: spec.uid.clone(),
            name: format!("{}/{}", spec.namespace, spec.name),
            namespace: spec.namespace.clone(),
            ips: spec.ips.clone(),
            identity: spec.identity.clone(),
            netns,
            netns_cookie,
            home: self.home.clone(),
            budget: self.shared.limits.pod_budget(),
        });
        let proxy = proxy::spawn(ctx, listeners, self.shared.clone())?;
        Ok(Enrolled {
            spec: spec.clone(),
            cgroup,
            cgroup_id,
            strict: None,
            registry_only: None,
            egress_refused: 0,
            _proxy: proxy,
        })
    }

    /// Detaches and unpins everything (the uninstall): enrolled pods' traffic flows directly
    /// again once their proxies, dropped here, are gone.
    pub fn remove_capture(self) -> Result<()> {
        self.redirect.remove_all()
    }

    /// Tells the kernel which pods are STRICT, so it fails closed while no proxy listens.
    fn sync_strict(&mut self) {
        let state = self.shared.state.borrow().clone();
        for (uid, pod) in &mut self.enrolled {
            let strict = state.peer_auth(uid).strict();
            if Some(strict) != pod.strict {
                match self.redirect.set_strict(&pod.spec.ips, strict) {
                    Ok(()) => pod.strict = Some(strict),
                    Err(e) => warn!(uid, "{e:#}"),
                }
            }
        }
    }

    /// Gives the kernel the registry and each pod's REGISTRY_ONLY mark, once control has sent
    /// a config (until then an earlier agent's pinned ones stand), and reads its refusal counts.
    fn sync_egress(&mut self) {
        let state = self.shared.state.borrow().clone();
        if state.version == 0 {
            return;
        }
        if self.registry_version != Some(state.version) {
            match self.redirect.sync_registry(&state.registry) {
                Ok(()) => self.registry_version = Some(state.version),
                Err(e) => warn!("updating the egress registry: {e:#}"),
            }
        }
        for (uid, pod) in &mut self.enrolled {
            let on = state.registry_only.contains(uid);
            if Some(on) != pod.registry_only {
                match self.redirect.set_registry_only(pod.cgroup_id, on) {
                    Ok(()) => {
                        info!(pod = %format!("{}/{}", pod.spec.namespace, pod.spec.name), registry_only = on, "outbound traffic policy set");
                        pod.registry_only = Some(on);
                    }
                    Err(e) => warn!(uid, "{e:#}"),
                }
            }
            let refused = self.redirect.egress_refused(pod.cgroup_id);
            if refused > pod.egress_refused {
                let name = format!("{}/{}", pod.spec.namespace, pod.spec.name);
                let new = refused - pod.egress_refused;
                self.shared.metrics.egress_refused(&name, new);
                info!(pod = %name, new, total = refused, "egress refused in the kernel: not in the mesh registry (REGISTRY_ONLY)");
                pod.egress_refused = refused;
            }
        }
    }

    /// After the first pass, drop capture state an earlier agent left for pods not wanted now.
    fn forget_others(&mut self) {
        let cgroups = self.enrolled.values().map(|p| p.cgroup_id).collect();
        let uids = self.enrolled.keys().cloned().collect();
        let ips = self
            .enrolled
            .values()
            .flat_map(|p| p.spec.ips.iter().copied())
            .collect();
        match self.redirect.forget_others(&cgroups, &uids, &ips) {
            Ok(gone) if !gone.is_empty() => info!(
                ?gone,
                "removed capture state of pods no longer on this node"
            ),
            Ok(_) => {}
            Err(e) => warn!("removing stale capture state: {e:#}"),
        }
    }

    fn publish(&self, desired: &[PodSpec]) {
        let pods = desired
            .iter()
            .map(|p| PodStatus {
                uid: p.uid.clone(),
                namespace: p.namespace.clone(),
                name: p.name.clone(),
                ips: p.ips.clone(),
                state: if self.enrolled.contains_key(&p.uid) {
                    "enrolled"
                } else {
                    "failed"
                },
                error: self.failed.get(&p.uid).cloned(),
                registry_only: self
                    .enrolled
                    .get(&p.uid)
                    .is_some_and(|e| e.registry_only == Some(true)),
                egress_refused: self.enrolled.get(&p.uid).map_or(0, |e| e.egress_refused),
            })
            .collect();
        self.status.send_if_modified(|s| {
            let next = AgentStatus { ready: true, pods };
            let changed = s.ready != next.ready || s.pods != next.pods;
            *s = next;
            changed
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "0b6d1a4e-8c55-4d7e-9a37-2f1c9e6b3a10";

    #[test]
    fn parses_a_pods_file() {
        let pods = parse_pods(&format!(
            r#"{{"pods":[{{"uid":"{UID}","namespace":"shop","name":"web","ips":["10.244.1.2","fd00:244:1::2"]}}]}}"#
        ))
        .unwrap();
        assert_eq!(pods[0].name, "web");
        assert_eq!(pods[0].ips.len(), 2);
    }

    #[test]
    fn rejects_bad_pod_lists() {
        for (text, want) in [
            (
                format!(r#"{{"pods":[{{"uid":"{UID}","namespace":"a","name":"b","extra":1}}]}}"#),
                "unknown field",
            ),
            (
                r#"{"pods":[{"uid":"../x","namespace":"a","name":"b"}]}"#.to_owned(),
                "invalid pod UID",
            ),
            (
                format!(
                    r#"{{"pods":[{{"uid":"{UID}","namespace":"a","name":"b"}},{{"uid":"{UID}","namespace":"a","name":"c"}}]}}"#
                ),
                "twice",
            ),
            (
                format!(
                    r#"{{"pods":[{{"uid":"{UID}","namespace":"a","name":"b","ips":["10.0.0.1","10.0.0.2"]}}]}}"#
                ),
                "at most one",
            ),
            ("{not json".to_owned(), "key must be a string"),
        ] {
            let err = format!("{:#}", parse_pods(&text).unwrap_err());
            assert!(err.contains(want), "{text}: {err}");
        }
    }

    #[test]
    fn pods_file_keeps_last_good_list() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pods.json");
        let mut file = PodsFile::new(&path);
        assert!(file.poll().is_none(), "no file yet");
        std::fs::write(
            &path,
            format!(r#"{{"pods":[{{"uid":"{UID}","namespace":"a","name":"b"}}]}}"#),
        )
        .unwrap();
        assert_eq!(file.poll().unwrap().len(), 1);
        assert!(file.poll().is_none(), "unchanged");
        std::fs::write(&path, "{broken").unwrap();
        assert!(file.poll().is_none(), "bad edit must not replace the list");
        std::fs::write(&path, r#"{"pods":[]}"#).unwrap();
        assert_eq!(file.poll().unwrap().len(), 0);
    }
}

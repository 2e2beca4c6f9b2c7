//! `trellisctl check`: preflight and health, as `linkerd check`. Each check prints `✔ what` or
//! `✘ what: why — how to fix`; any ✘ makes the exit status 1. A check that cannot be made from
//! where trellisctl stands prints `- what: not checked (why)` and fails nothing.
use std::{
    collections::BTreeMap,
    path::Path,
    time::{Duration, SystemTime},
};

use anyhow::{Context as _, Result};
use aya::{
    maps::MapType,
    programs::ProgramType,
    sys::{is_map_supported, is_program_supported},
};
use serde::Deserialize;

use crate::{fetch::Endpoint, prom, targets::Agent};

/// The oldest kernel docs/install.md supports.
pub const MIN_KERNEL: (u32, u32) = (5, 10);
/// How far a server's clock may be from this host's.
const MAX_SKEW: Duration = Duration::from_secs(5);
/// A certificate with less than this share of its lifetime left is about to expire (the agent
/// renews at half life, so a healthy one never gets there).
const EXPIRY_MARGIN: f64 = 0.2;

/// One check's outcome.
#[derive(Debug)]
pub struct Outcome {
    pub what: String,
    pub result: Result<(), Failure>,
    /// Not checked, and why (`result` is then Ok).
    pub skipped: Option<String>,
}

/// Why a check failed, and what to do about it.
#[derive(Debug)]
pub struct Failure {
    pub why: String,
    pub fix: String,
}

impl Outcome {
    pub fn pass(what: impl Into<String>) -> Self {
        Self {
            what: what.into(),
            result: Ok(()),
            skipped: None,
        }
    }

    fn skip(what: impl Into<String>, why: impl Into<String>) -> Self {
        Self {
            skipped: Some(why.into()),
            ..Self::pass(what)
        }
    }

    pub fn fail(what: impl Into<String>, why: impl Into<String>, fix: impl Into<String>) -> Self {
        Self {
            what: what.into(),
            result: Err(Failure {
                why: why.into(),
                fix: fix.into(),
            }),
            skipped: None,
        }
    }

    pub fn line(&self) -> String {
        match &self.result {
            Ok(()) if let Some(why) = &self.skipped => {
                format!("- {}: not checked ({why})", self.what)
            }
            Ok(()) => format!("✔ {}", self.what),
            Err(f) => format!("✘ {}: {} — {}", self.what, f.why, f.fix),
        }
    }
}

/// What to check beyond this node's kernel.
pub struct Mesh<'a> {
    /// What the Kubernetes API said (`--kube`), reported after the node's checks.
    pub cluster: Vec<Outcome>,
    pub control: &'a Endpoint,
    pub agents: &'a [Agent],
}

/// Runs every check, in order; node checks only when `mesh` is None.
pub async fn run(mesh: Option<Mesh<'_>>) -> Vec<Outcome> {
    let mut out = node();
    if let Some(mesh) = mesh {
        out.extend(mesh.cluster);
        let versions = control(mesh.control, &mut out).await;
        for agent in mesh.agents {
            agent_checks(agent, versions.as_ref(), mesh.control, &mut out).await;
        }
    }
    out
}

/// The node's kernel: what the agent's programs need.
pub fn node() -> Vec<Outcome> {
    let mut out = vec![kernel_version(
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim(),
    )];
    let btf = "/sys/kernel/btf/vmlinux";
    out.push(if Path::new(btf).exists() {
        Outcome::pass(format!("BTF available ({btf})"))
    } else {
        Outcome::fail(
            "BTF available",
            format!("{btf} is missing"),
            "use a kernel built with CONFIG_DEBUG_INFO_BTF=y (Debian, Ubuntu, RHEL and Fedora kernels are)",
        )
    });
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    out.extend(mounted(&mounts));
    for (name, ty) in [
        (
            "cgroup connect programs (cgroup/sock_addr)",
            ProgramType::CgroupSockAddr,
        ),
        ("sock_ops programs", ProgramType::SockOps),
        ("sk_lookup programs", ProgramType::SkLookup),
    ] {
        out.push(feature(
            name,
            is_program_supported(ty).map_err(|e| e.to_string()),
        ));
    }
    for (name, ty) in [
        ("sockhash maps (sockmap)", MapType::SockHash),
        ("LRU hash maps", MapType::LruHash),
    ] {
        out.push(feature(
            name,
            is_map_supported(ty).map_err(|e| e.to_string()),
        ));
    }
    out
}

fn kernel_version(release: &str) -> Outcome {
    let what = format!("kernel ≥ {}.{}", MIN_KERNEL.0, MIN_KERNEL.1);
    let mut parts = release
        .split(|c: char| !c.is_ascii_digit())
        .map(|n| n.parse::<u32>().ok());
    match (parts.next().flatten(), parts.next().flatten()) {
        (Some(major), Some(minor)) if (major, minor) >= MIN_KERNEL => {
            Outcome::pass(format!("{what} (running {release})"))
        }
        (Some(_), Some(_)) => Outcome::fail(
            what,
            format!("running {release}"),
            "upgrade the node's kernel (sk_lookup and the cgroup hooks Trellis uses need 5.10)",
        ),
        _ => Outcome::fail(
            what,
            format!("cannot read the kernel release ({release:?} from /proc/sys/kernel/osrelease)"),
            "run trellisctl on the node itself, with /proc mounted",
        ),
    }
}

/// cgroup v2 mounted somewhere, bpffs at /sys/fs/bpf: from the lines of /proc/mounts.
fn mounted(mounts: &str) -> [Outcome; 2] {
    let entries: Vec<(&str, &str)> = mounts
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() > 2).then(|| (f[1], f[2]))
        })
        .collect();
    let cgroup2 = match entries.iter().find(|(_, ty)| *ty == "cgroup2") {
        Some((at, _)) => Outcome::pass(format!("cgroup v2 mounted (at {at})")),
        None => Outcome::fail(
            "cgroup v2 mounted",
            "no cgroup2 filesystem in /proc/mounts",
            "boot with systemd.unified_cgroup_hierarchy=1, or mount one: mount -t cgroup2 none /sys/fs/cgroup/unified",
        ),
    };
    let bpffs = if entries.contains(&("/sys/fs/bpf", "bpf")) {
        Outcome::pass("bpffs mounted at /sys/fs/bpf")
    } else {
        Outcome::fail(
            "bpffs mounted at /sys/fs/bpf",
            "no bpf filesystem there in /proc/mounts",
            "mount -t bpf bpf /sys/fs/bpf (the agent pins its programs and maps there)",
        )
    };
    [cgroup2, bpffs]
}

fn feature(name: &str, probed: Result<bool, String>) -> Outcome {
    let what = format!("kernel supports {name}");
    match probed {
        Ok(true) => Outcome::pass(what),
        Ok(false) => Outcome::fail(
            what,
            "the kernel refused a trivial one",
            "upgrade the kernel or enable it (CONFIG_BPF_SYSCALL, CONFIG_CGROUP_BPF, CONFIG_BPF_STREAM_PARSER, CONFIG_NET)",
        ),
        Err(e) => Outcome::fail(
            what,
            format!("probing failed: {e}"),
            "run trellisctl as root (it loads a trivial program to probe), on the node itself",
        ),
    }
}

/// Per node: the last config version control sent, and the last one the agent acknowledged.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct NodeVersions {
    pub sent: u64,
    pub accepted: Option<u64>,
    pub streams: u64,
}

/// Control's health, readiness, clock and objects; its view of every node's config versions.
async fn control(ep: &Endpoint, out: &mut Vec<Outcome>) -> Option<BTreeMap<String, NodeVersions>> {
    let what = format!("control reachable ({ep})");
    match ep.get("/healthz").await {
        Ok(r) if r.status == 200 => {
            out.push(Outcome::pass(what));
            out.push(clock("control's clock", r.date));
        }
        Ok(r) => {
            out.push(Outcome::fail(
                what,
                format!("/healthz answered HTTP {}", r.status),
                "see control's log",
            ));
            return None;
        }
        Err(e) => {
            out.push(Outcome::fail(
                what,
                format!("{e:#}"),
                "start trellis-control, or point --control-metrics (and --control-netns) at its --metrics-addr",
            ));
            return None;
        }
    }
    out.push(match ep.get("/readyz").await {
        Ok(r) if r.status == 200 => Outcome::pass("control ready"),
        Ok(r) => Outcome::fail(
            "control ready",
            r.body.trim().to_owned(),
            "wait for control to read its source; if it stays so, see control's log",
        ),
        Err(e) => Outcome::fail("control ready", format!("{e:#}"), "see control's log"),
    });
    let metrics = match ep.get("/metrics").await.and_then(|r| r.ok_body("/metrics")) {
        Ok(text) => text,
        Err(e) => {
            out.push(Outcome::fail(
                "control's metrics readable",
                format!("{e:#}"),
                "see control's log",
            ));
            return None;
        }
    };
    let samples = match prom::parse(&metrics) {
        Ok(s) => s,
        Err(e) => {
            out.push(Outcome::fail(
                "control's metrics readable",
                format!("{e:#}"),
                "report this: control's /metrics did not parse",
            ));
            return None;
        }
    };
    let rejected = samples
        .iter()
        .find(|s| s.name == "trellis_control_objects_rejected")
        .map_or(0.0, |s| s.value);
    out.push(if rejected == 0.0 {
        Outcome::pass("control accepted every object of its source")
    } else {
        Outcome::fail(
            "control accepted every object of its source",
            format!("{rejected} object(s) or file(s) rejected"),
            "run `trellisctl analyze` on the YAML (dir source) or see control's log for each error",
        )
    });
    Some(versions(&samples))
}

/// Each node's versions from control's `trellis_control_config_version_*` and stream gauges.
pub fn versions(samples: &[prom::Sample]) -> BTreeMap<String, NodeVersions> {
    let mut nodes: BTreeMap<String, NodeVersions> = BTreeMap::new();
    for s in samples {
        let v = nodes.entry(s.label("node").to_owned());
        match s.name.as_str() {
            "trellis_control_config_version_sent" => v.or_default().sent = s.value as u64,
            "trellis_control_config_version_accepted" => {
                v.or_default().accepted = Some(s.value as u64)
            }
            "trellis_control_agent_streams" => v.or_default().streams = s.value as u64,
            _ => {}
        }
    }
    nodes.remove("");
    nodes
}

fn clock(what: &str, date: Option<SystemTime>) -> Outcome {
    let Some(date) = date else {
        return Outcome::fail(
            what,
            "no Date header in its answer",
            "upgrade it: every Trellis endpoint sends one",
        );
    };
    // A Date header has whole seconds: allow for the one being cut off.
    let now = SystemTime::now();
    let skew = now
        .duration_since(date)
        .or_else(|e| Ok::<_, ()>(e.duration()))
        .unwrap_or_default()
        .saturating_sub(Duration::from_secs(1));
    if skew <= MAX_SKEW {
        Outcome::pass(format!(
            "{what} within {}s of this host's",
            MAX_SKEW.as_secs()
        ))
    } else {
        Outcome::fail(
            what,
            format!("{}s off this host's", skew.as_secs()),
            "synchronise the clocks (chrony or systemd-timesyncd): certificates are checked against them",
        )
    }
}

async fn agent_checks(
    agent: &Agent,
    versions: Option<&BTreeMap<String, NodeVersions>>,
    control: &Endpoint,
    out: &mut Vec<Outcome>,
) {
    let node = &agent.node;
    let ep = agent.metrics();
    let what = format!("agent {node} reachable ({ep})");
    match ep.get("/healthz").await {
        Ok(r) if r.status == 200 => {
            out.push(Outcome::pass(what));
            out.push(clock(&format!("agent {node}'s clock"), r.date));
        }
        Ok(r) => out.push(Outcome::fail(
            what,
            format!("/healthz answered HTTP {}", r.status),
            "see the agent's log",
        )),
        Err(e) => {
            out.push(Outcome::fail(
                what,
                format!("{e:#}"),
                format!(
                    "check the agent runs on {node} (kubectl -n trellis-system get pods -o wide), and that --agent {node}=… names its node's network namespace or metrics address"
                ),
            ));
            return;
        }
    }
    let what = format!("agent {node} ready");
    out.push(match ep.get("/readyz").await {
        Ok(r) if r.status == 200 => Outcome::pass(what),
        Ok(r) => Outcome::fail(
            what,
            r.body.trim().to_owned(),
            "wait a few seconds; if it stays so, see the agent's log",
        ),
        Err(e) => Outcome::fail(what, format!("{e:#}"), "see the agent's log"),
    });
    out.push(acked(node, versions, control).await);
    let what = format!("agent {node}'s certificates valid and not near expiry");
    out.push(match agent.admin() {
        Err(e) => Outcome::skip(what, format!("{e:#}")),
        Ok(admin) => certificates(&admin, &what)
            .await
            .unwrap_or_else(|e| Outcome::fail(&what, format!("{e:#}"), "see the agent's log")),
    });
}

/// Whether control sees the agent connected and acked at the last version it sent. An update
/// may be in flight: asked again a few times before failing.
async fn acked(
    node: &str,
    known: Option<&BTreeMap<String, NodeVersions>>,
    control: &Endpoint,
) -> Outcome {
    let what = format!("agent {node} connected to control and acked the latest config");
    let Some(first) = known else {
        return Outcome::fail(
            what,
            "control's metrics could not be read",
            "fix control first (above)",
        );
    };
    let mut now = first.get(node).copied();
    for _ in 0..5 {
        if let Some(v) = now
            && v.streams > 0
            && v.accepted == Some(v.sent)
        {
            return Outcome::pass(format!("{what} (version {})", v.sent));
        }
        tokio::time::sleep(Duration::from_millis(400)).await;
        now = match control
            .get("/metrics")
            .await
            .and_then(|r| r.ok_body("/metrics"))
            .and_then(|t| prom::parse(&t))
        {
            Ok(s) => versions(&s).get(node).copied(),
            Err(_) => now,
        };
    }
    match now {
        None => Outcome::fail(
            what,
            format!("control has never heard from node {node:?}"),
            "check the agent's --node-name is the node's name and its --control-url reaches control (agent's log)",
        ),
        Some(v) if v.streams == 0 => Outcome::fail(
            what,
            "no config stream open",
            "see the agent's log for why it cannot subscribe (address, CA, token)",
        ),
        Some(v) => Outcome::fail(
            what,
            format!(
                "control sent version {}, the agent acked {}",
                v.sent,
                v.accepted.map_or("none".into(), |a| a.to_string())
            ),
            "the agent rejected it or is stuck applying it: see control's and the agent's logs",
        ),
    }
}

#[derive(Deserialize)]
struct Certificate {
    identity: String,
    not_after: u64,
    renew_at: u64,
}

async fn certificates(admin: &Endpoint, what: &str) -> Result<Outcome> {
    let body = admin.get("/certificates").await?.ok_body("/certificates")?;
    let certs: Vec<Certificate> =
        serde_json::from_str(&body).context("the agent's /certificates")?;
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .context("the clock is before 1970")?
        .as_secs();
    Ok(certificates_at(what, &certs, now))
}

fn certificates_at(what: &str, certs: &[Certificate], now: u64) -> Outcome {
    let mut bad = Vec::new();
    for c in certs {
        // Renewal is at half life: the lifetime is twice what is left after it.
        let life = 2 * c.not_after.saturating_sub(c.renew_at);
        let left = c.not_after.saturating_sub(now);
        if c.not_after <= now {
            bad.push(format!("{} expired {}s ago", c.identity, now - c.not_after));
        } else if (left as f64) < EXPIRY_MARGIN * life as f64 {
            bad.push(format!("{} expires in {left}s (of {life}s)", c.identity));
        }
    }
    if bad.is_empty() {
        Outcome::pass(format!("{what} ({} held)", certs.len()))
    } else {
        Outcome::fail(
            what,
            bad.join("; "),
            "the agent renews at half life: see its log for why it cannot (control reachable? the pod still on the node?)",
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_releases_are_compared_by_major_and_minor() {
        assert!(kernel_version("6.1.0-18-amd64").result.is_ok());
        assert!(kernel_version("5.10.0").result.is_ok());
        let old = kernel_version("5.4.0-150-generic");
        assert_eq!(
            old.line(),
            "✘ kernel ≥ 5.10: running 5.4.0-150-generic — upgrade the node's kernel (sk_lookup and the cgroup hooks Trellis uses need 5.10)"
        );
        assert!(kernel_version("").result.is_err());
    }

    #[test]
    fn mounts_are_read_from_proc_mounts_lines() {
        let ok = "sysfs /sys sysfs rw 0 0\ncgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\nbpf /sys/fs/bpf bpf rw 0 0\n";
        let [cg, bpf] = mounted(ok);
        assert_eq!(cg.line(), "✔ cgroup v2 mounted (at /sys/fs/cgroup/unified)");
        assert!(bpf.result.is_ok());
        let [cg, bpf] = mounted("tmpfs /sys/fs/cgroup tmpfs rw 0 0\nbpf /mnt/bpf bpf rw 0 0\n");
        assert!(
            cg.line().starts_with("✘ cgroup v2 mounted: no cgroup2"),
            "{}",
            cg.line()
        );
        assert!(
            bpf.line().contains("mount -t bpf bpf /sys/fs/bpf"),
            "{}",
            bpf.line()
        );
    }

    #[test]
    fn certificates_near_expiry_or_expired_fail() {
        let cert = |id: &str, not_after: u64| Certificate {
            identity: id.into(),
            not_after,
            renew_at: not_after - 500, // a 1000 s lifetime
        };
        let now = 10_000;
        assert!(
            certificates_at("certs", &[cert("a", now + 600)], now)
                .result
                .is_ok()
        );
        let o = certificates_at(
            "n1",
            &[
                cert("a", now + 600),
                cert("b", now + 150),
                cert("c", now - 5),
            ],
            now,
        );
        let line = o.line();
        assert!(
            line.contains("b expires in 150s (of 1000s)")
                && line.contains("c expired 5s ago")
                && !line.contains("a "),
            "{line}"
        );
    }

    #[test]
    fn checks_out_of_reach_are_marked_and_fail_nothing() {
        let o = Outcome::skip("agent n2's certificates valid", "admin is node-local");
        assert!(o.result.is_ok());
        assert_eq!(
            o.line(),
            "- agent n2's certificates valid: not checked (admin is node-local)"
        );
    }

    #[test]
    fn clocks_off_by_more_than_the_margin_fail() {
        let now = SystemTime::now();
        assert!(clock("c", Some(now)).result.is_ok());
        assert!(
            clock("c", Some(now - Duration::from_secs(3)))
                .result
                .is_ok()
        );
        assert!(
            clock("c", Some(now + Duration::from_secs(60)))
                .line()
                .contains("off this host's")
        );
        assert!(clock("c", None).result.is_err());
    }

    #[test]
    fn versions_come_from_controls_gauges() {
        let s = prom::parse(
            "trellis_control_config_version_sent{node=\"n1\"} 4\n\
             trellis_control_config_version_accepted{node=\"n1\"} 4\n\
             trellis_control_agent_streams{node=\"n1\"} 1\n\
             trellis_control_config_version_sent{node=\"n2\"} 2\n\
             trellis_control_objects_rejected 0\n",
        )
        .unwrap();
        let v = versions(&s);
        assert_eq!(
            v["n1"],
            NodeVersions {
                sent: 4,
                accepted: Some(4),
                streams: 1
            }
        );
        assert_eq!(
            v["n2"],
            NodeVersions {
                sent: 2,
                accepted: None,
                streams: 0
            }
        );
        assert_eq!(v.len(), 2);
    }
}

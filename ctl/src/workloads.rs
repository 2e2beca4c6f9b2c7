//! `trellisctl workloads [-n NS]` and `trellisctl config-dump NODE`: what each agent holds, from
//! its admin endpoint's `/pods`, `/certificates` and `/config_dump`.
use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, Result};
use serde::Deserialize;
use serde_json::Value;

use crate::{table, targets::Agent};

/// The agent's config dump, pretty-printed.
pub async fn config_dump(agent: &Agent) -> Result<String> {
    let body = agent
        .admin()?
        .get("/config_dump")
        .await?
        .ok_body("/config_dump")?;
    let v: Value = serde_json::from_str(&body).context("the agent's /config_dump is not JSON")?;
    Ok(serde_json::to_string_pretty(&v)? + "\n")
}

#[derive(Deserialize)]
struct Pod {
    uid: String,
    namespace: String,
    name: String,
    ips: Vec<String>,
    state: String,
    #[serde(default)]
    error: Option<String>,
}

#[derive(Deserialize)]
struct Certificate {
    identity: String,
    not_after: u64,
}

/// What one agent serves about its pods.
pub struct NodeView {
    node: String,
    pods: Vec<Pod>,
    certificates: Vec<Certificate>,
    dump: Value,
}

pub async fn fetch(agent: &Agent) -> Result<NodeView> {
    let admin = agent.admin()?;
    let json = |body: String, what: &str| -> Result<Value> {
        serde_json::from_str(&body)
            .with_context(|| format!("node {}: the agent's {what} is not JSON", agent.node))
    };
    let pods = json(admin.get("/pods").await?.ok_body("/pods")?, "/pods")?;
    let certificates = json(
        admin.get("/certificates").await?.ok_body("/certificates")?,
        "/certificates",
    )?;
    let dump = json(
        admin.get("/config_dump").await?.ok_body("/config_dump")?,
        "/config_dump",
    )?;
    Ok(NodeView {
        node: agent.node.clone(),
        pods: serde_json::from_value(pods).context("reading the agent's /pods")?,
        certificates: serde_json::from_value(certificates)
            .context("reading the agent's /certificates")?,
        dump,
    })
}

pub const HEADER: [&str; 9] = [
    "NODE",
    "NAMESPACE",
    "POD",
    "STATE",
    "IDENTITY",
    "CERT EXPIRES",
    "PORTS",
    "MTLS",
    "POLICIES",
];

/// One row per pod the agent enrolled (or failed to), in `namespace` if given.
pub fn rows(view: &NodeView, namespace: Option<&str>, now: SystemTime) -> Vec<Vec<String>> {
    let d = &view.dump;
    let mut rows = Vec::new();
    for pod in &view.pods {
        if namespace.is_some_and(|ns| ns != pod.namespace) {
            continue;
        }
        let identity = pod
            .ips
            .iter()
            .find_map(|ip| d["workloads"][ip]["identity"].as_str())
            .unwrap_or("-");
        let expires = view
            .certificates
            .iter()
            .find(|c| c.identity == identity)
            .map_or("-".into(), |c| {
                until(UNIX_EPOCH + Duration::from_secs(c.not_after), now)
            });
        let state = match &pod.error {
            Some(e) => format!("{} ({e})", pod.state),
            None => pod.state.clone(),
        };
        rows.push(vec![
            view.node.clone(),
            pod.namespace.clone(),
            pod.name.clone(),
            state,
            identity.to_owned(),
            expires,
            ports(d, &pod.ips),
            mtls(&d["peer_auth"][&pod.uid]),
            policies(&d["authz"][&pod.uid]),
        ]);
    }
    rows
}

pub fn render(views: &[NodeView], namespace: Option<&str>) -> String {
    let now = SystemTime::now();
    let rows: Vec<_> = views.iter().flat_map(|v| rows(v, namespace, now)).collect();
    table::render(&HEADER, &rows)
}

/// The pod's ports that services send to, with the protocol the proxy speaks on them.
fn ports(dump: &Value, ips: &[String]) -> String {
    let mut ports = BTreeSet::new();
    for svc in dump["services"]
        .as_object()
        .into_iter()
        .flat_map(|s| s.values())
    {
        let proto = if svc["http2"] == true {
            "http2"
        } else if svc["http"] == true {
            "http"
        } else {
            "tcp"
        };
        for ep in svc["endpoints"].as_array().into_iter().flatten() {
            if ep["ip"]
                .as_str()
                .is_some_and(|ip| ips.iter().any(|i| i == ip))
                && let Some(port) = ep["port"].as_u64()
            {
                ports.insert((port, proto));
            }
        }
    }
    if ports.is_empty() {
        return "-".into();
    }
    ports
        .iter()
        .map(|(p, proto)| format!("{p}/{proto}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// PeerAuthentication's mode for the pod, with per-port exceptions.
fn mtls(peer_auth: &Value) -> String {
    let mode = peer_auth["mode"]
        .as_str()
        .filter(|m| *m != "UNSET")
        .unwrap_or("PERMISSIVE");
    let ports: BTreeMap<&String, &str> = peer_auth["ports"]
        .as_object()
        .into_iter()
        .flatten()
        .filter_map(|(p, m)| Some((p, m.as_str()?)))
        .collect();
    let mut out = mode.to_owned();
    for (p, m) in ports {
        out.push_str(&format!(",{p}:{m}"));
    }
    out
}

/// The AuthorizationPolicies that select the pod: `ACTION namespace/name`.
fn policies(authz: &Value) -> String {
    let list: Vec<String> = authz
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            format!(
                "{} {}",
                p["action"].as_str().unwrap_or("?"),
                p["name"].as_str().unwrap_or("?")
            )
        })
        .collect();
    if list.is_empty() {
        "-".into()
    } else {
        list.join(",")
    }
}

/// `in 23h59m` (or `expired 5m ago`).
fn until(t: SystemTime, now: SystemTime) -> String {
    let hm = |d: Duration| {
        let m = d.as_secs() / 60;
        if m >= 60 {
            format!("{}h{:02}m", m / 60, m % 60)
        } else {
            format!("{m}m{:02}s", d.as_secs() % 60)
        }
    };
    match t.duration_since(now) {
        Ok(left) => format!("in {}", hm(left)),
        Err(e) => format!("expired {} ago", hm(e.duration())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A dump shaped as the agent's `MeshState` serialises.
    fn view() -> NodeView {
        NodeView {
            node: "n2".into(),
            pods: serde_json::from_value(json!([
                {"uid": "u1", "namespace": "shop", "name": "server", "ips": ["10.244.2.10", "fd00:244:2::10"],
                 "state": "enrolled", "registry_only": false, "egress_refused": 0},
                {"uid": "u2", "namespace": "other", "name": "x", "ips": ["10.244.2.11"], "state": "failed",
                 "error": "no cgroup", "registry_only": false, "egress_refused": 0}
            ]))
            .unwrap(),
            certificates: vec![Certificate { identity: "spiffe://cluster.local/ns/shop/sa/server".into(), not_after: 1000 + 7200 + 120 }],
            dump: json!({
                "version": 3,
                "workloads": {"10.244.2.10": {"name": "server", "namespace": "shop", "identity": "spiffe://cluster.local/ns/shop/sa/server"}},
                "services": {
                    "10.96.0.10:80": {"http": false, "http2": false, "endpoints": [{"ip": "10.244.2.10", "port": 8080}]},
                    "10.96.0.10:8081": {"http": true, "http2": false, "endpoints": [{"ip": "10.244.2.10", "port": 9080}]},
                    "[fd00::10]:8081": {"http": true, "http2": false, "endpoints": [{"ip": "fd00:244:2::10", "port": 9080}]},
                    "10.96.0.11:90": {"http": true, "http2": true, "endpoints": [{"ip": "10.244.1.10", "port": 90}]}
                },
                "peer_auth": {"u1": {"mode": "STRICT", "ports": {"9080": "PERMISSIVE"}}},
                "authz": {"u1": [{"name": "shop/allow-client", "action": "ALLOW"}, {"name": "shop/deny-x", "action": "DENY"}]}
            }),
        }
    }

    #[test]
    fn a_row_per_pod_with_identity_expiry_ports_and_policies() {
        let now = UNIX_EPOCH + Duration::from_secs(1000);
        let rows = rows(&view(), None, now);
        assert_eq!(
            rows[0],
            [
                "n2",
                "shop",
                "server",
                "enrolled",
                "spiffe://cluster.local/ns/shop/sa/server",
                "in 2h02m",
                "8080/tcp,9080/http",
                "STRICT,9080:PERMISSIVE",
                "ALLOW shop/allow-client,DENY shop/deny-x"
            ]
        );
        assert_eq!(rows[1][3], "failed (no cgroup)");
        assert_eq!(&rows[1][4..], ["-", "-", "-", "PERMISSIVE", "-"]);
        let shop = super::rows(&view(), Some("shop"), now);
        assert_eq!(shop.len(), 1);
    }

    #[test]
    fn expiry_reads_in_hours_or_minutes() {
        let now = UNIX_EPOCH + Duration::from_secs(1_000_000);
        assert_eq!(until(now + Duration::from_secs(86_399), now), "in 23h59m");
        assert_eq!(until(now + Duration::from_secs(75), now), "in 1m15s");
        assert_eq!(
            until(now - Duration::from_secs(300), now),
            "expired 5m00s ago"
        );
    }
}

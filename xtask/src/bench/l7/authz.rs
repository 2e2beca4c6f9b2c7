//! The cost of authorization: the L7 Trellis path again with a 100-rule AuthorizationPolicy on
//! the server, each request evaluated against every rule (the one that lets the client in is
//! last), set against the same path without it.
use std::{
    net::{IpAddr, SocketAddr},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Result, bail};
use trellis_e2e::{
    Pod,
    serde_json::{Value, json},
};

use super::{MATCH, NAMESPACE, PROTOS, Path, SERVICE_PORT, VIP, f, loadgen, run_in};

pub const RULES: usize = 100;
/// The aim: the policy costs under 5% of requests per proxy core.
pub const TARGET_KEPT: f64 = 0.95;
/// A request with this header set to `yes` matches no rule: the check that the policy is in force.
const DENY_HEADER: &str = "x-bench-deny";

/// The policy, as control's file: 99 rules for other callers (principal, paths and methods),
/// then the client's, which lets in every request without DENY_HEADER: yes.
pub fn policy_file() -> (&'static str, String) {
    let mut rules: Vec<String> = (1..RULES)
        .map(|i| {
            format!(
                "{{from: [{{source: {{principals: [cluster.local/ns/team-{i}/sa/svc-{i}]}}}}], \
                 to: [{{operation: {{methods: [GET, POST], paths: [\"/api/v{i}/*\"]}}}}]}}"
            )
        })
        .collect();
    rules.push(format!(
        "{{from: [{{source: {{principals: [cluster.local/ns/{NAMESPACE}/sa/bench-client]}}}}], \
         when: [{{key: \"request.headers[{DENY_HEADER}]\", notValues: [\"yes\"]}}]}}"
    ));
    (
        "authz.yaml",
        format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
             metadata: {{name: bench-{RULES}-rules, namespace: {NAMESPACE}}}\n\
             spec: {{selector: {{matchLabels: {{app: bench-server}}}}, rules: [{}]}}\n",
            rules.join(", ")
        ),
    )
}

/// Polls (20 s at most) until the server's proxy denies a request carrying DENY_HEADER.
pub fn wait_in_force(client: &Pod) -> Result<()> {
    let target = SocketAddr::new(IpAddr::V4(VIP), SERVICE_PORT).to_string();
    let route = format!("{}:{}", MATCH.0, MATCH.1);
    let deny = format!("{DENY_HEADER}:yes");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let probe = run_in(
            client,
            &loadgen(),
            &["http-probe", &target, "--header", &route, "--header", &deny],
            Duration::from_secs(10),
        )?;
        if probe["status"] == 403 {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the {RULES}-rule AuthorizationPolicy not in force within 20 s: {probe}");
        }
        thread::sleep(Duration::from_millis(200));
    }
}

/// The path of the policy phase: Trellis's, named for it.
pub fn path(agents: Vec<(String, u32)>) -> Path {
    Path {
        name: "trellis + 100-rule AuthorizationPolicy",
        ..Path::trellis(agents)
    }
}

/// Per protocol: p99 and requests per proxy core with and without the policy, and whether the
/// policy kept at least TARGET_KEPT of the requests per core.
pub fn summary(without: &Value, with: &Value) -> Value {
    let mut out = json!({ "rules": RULES, "target_kept_min": TARGET_KEPT });
    for proto in PROTOS {
        let k = proto.key();
        let p99 = |p: &Value| f(&p[k]["latency"]["p99_ms"]);
        let per_core = |p: &Value| f(&p[k]["proxy"]["rps_per_core"]);
        let kept = per_core(with).zip(per_core(without)).map(|(w, o)| w / o);
        out[k] = json!({
            "p99_ms": { "without": p99(without), "with": p99(with) },
            "rps_per_core": { "without": per_core(without), "with": per_core(with) },
            "kept": kept,
            "met": kept.map(|k| k >= TARGET_KEPT),
        });
    }
    out
}

/// Table rows: metric, without, with, with against without, target.
pub fn rows(s: &Value) -> Vec<Vec<String>> {
    let num = |v: &Value, digits: usize| f(v).map_or("-".into(), |x| format!("{x:.digits$}"));
    let mut rows = vec![
        [
            "metric",
            "no policy",
            &format!("{RULES}-rule policy"),
            "with / without",
            "target",
        ]
        .map(String::from)
        .to_vec(),
    ];
    for proto in PROTOS {
        let (k, label) = (proto.key(), proto.label());
        let p = &s[k];
        rows.push(vec![
            format!("{label} p99 at {}/s (ms)", super::RATE),
            num(&p["p99_ms"]["without"], 3),
            num(&p["p99_ms"]["with"], 3),
            match (f(&p["p99_ms"]["with"]), f(&p["p99_ms"]["without"])) {
                (Some(w), Some(o)) => format!("{:+.3} ms", w - o),
                _ => "-".into(),
            },
            String::new(),
        ]);
        let target = format!("≥ {:.0}%", TARGET_KEPT * 100.0);
        rows.push(vec![
            format!("{label} req/s per proxy core"),
            num(&p["rps_per_core"]["without"], 0),
            num(&p["rps_per_core"]["with"], 0),
            f(&p["kept"]).map_or("-".into(), |k| format!("{:.1}%", k * 100.0)),
            match p["met"].as_bool() {
                Some(true) => format!("{target} (met)"),
                Some(false) => format!("{target} (MISSED)"),
                None => target,
            },
        ]);
    }
    rows
}

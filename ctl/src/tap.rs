//! `trellisctl tap deploy/NAME`: the requests through one workload, live. Every agent's admin
//! `/tap` streams the access-log records of the workload's requests as its node proxy sees them
//! (as the caller's side, `source`, or the server's, `destination`); they are printed as they
//! come, from all agents at once.
use std::time::Duration;

use anyhow::{Result, bail};
use http_body_util::BodyExt as _;
use serde_json::Value;
use tokio::sync::mpsc;

use crate::targets::Agent;

/// What to show.
pub struct Filter<'a> {
    pub namespace: &'a str,
    pub workload: &'a str,
    pub path_prefix: Option<&'a str>,
    pub method: Option<&'a str>,
}

impl Filter<'_> {
    /// The agent's `/tap` path and query.
    fn path(&self) -> String {
        let mut q = url::form_urlencoded::Serializer::new(String::new());
        q.append_pair("namespace", self.namespace)
            .append_pair("workload", self.workload);
        if let Some(p) = self.path_prefix {
            q.append_pair("path_prefix", p);
        }
        if let Some(m) = self.method {
            q.append_pair("method", m);
        }
        format!("/tap?{}", q.finish())
    }
}

/// When to stop.
pub struct Limits {
    /// After this many records.
    pub max: Option<u64>,
    /// After this long.
    pub duration: Option<Duration>,
}

/// Streams the records to stdout, one line each (the agent's JSON when `json`), until a limit
/// or every agent's stream ends. False when an agent could not be tapped.
pub async fn run(
    agents: &[Agent],
    filter: &Filter<'_>,
    json: bool,
    limits: Limits,
) -> Result<bool> {
    let path = filter.path();
    let (tx, mut rx) = mpsc::channel::<String>(256);
    let mut ok = true;
    let mut open = 0;
    for agent in agents {
        let body = match agent.admin() {
            Ok(admin) => admin.stream(&path).await,
            Err(e) => Err(e),
        };
        match body {
            Ok(body) => {
                open += 1;
                tokio::spawn(lines(body, tx.clone()));
            }
            Err(e) => {
                eprintln!("node {}: {e:#}", agent.node);
                ok = false;
            }
        }
    }
    drop(tx);
    if open == 0 {
        bail!("no agent could be tapped");
    }
    eprintln!(
        "tapping {}/{} on {open} node(s); one line per request as it completes",
        filter.namespace, filter.workload
    );
    let deadline = limits.duration.map(|d| tokio::time::Instant::now() + d);
    let mut seen = 0;
    while limits.max.is_none_or(|m| seen < m) {
        let line = match deadline {
            Some(at) => match tokio::time::timeout_at(at, rx.recv()).await {
                Ok(line) => line,
                Err(_) => break,
            },
            None => rx.recv().await,
        };
        let Some(line) = line else {
            eprintln!("every agent's tap ended");
            break;
        };
        if json {
            println!("{line}");
        } else {
            match serde_json::from_str(&line) {
                Ok(record) => println!("{}", render(&record)),
                Err(e) => eprintln!("an agent sent a record that is not JSON ({e}): {line}"),
            }
        }
        seen += 1;
    }
    Ok(ok)
}

/// Forwards a tap body's lines until it ends or nobody reads them.
async fn lines(mut body: hyper::body::Incoming, tx: mpsc::Sender<String>) {
    let mut pending = Vec::new();
    while let Some(Ok(frame)) = body.frame().await {
        let Ok(data) = frame.into_data() else {
            continue;
        };
        pending.extend_from_slice(&data);
        while let Some(end) = pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            let line = String::from_utf8_lossy(&line[..end]).into_owned();
            if tx.send(line).await.is_err() {
                return;
            }
        }
    }
}

/// One record as a line: when, which side saw it, who called whom, the request and its answer.
fn render(r: &Value) -> String {
    let s = |k: &str| r[k].as_str().unwrap_or("-");
    let party = |ns: &str, w: &str| match (r[ns].as_str(), r[w].as_str()) {
        (Some(ns), Some(w)) => format!("{ns}/{w}"),
        _ => "unknown".to_owned(),
    };
    // The peer's identity is known only from its certificate: present means mutual TLS.
    let peer = if s("reporter") == "source" {
        "destination_principal"
    } else {
        "source_principal"
    };
    let mtls = if r[peer].is_string() {
        "mtls"
    } else {
        "plaintext"
    };
    let flags = match s("response_flags") {
        "-" | "" => String::new(),
        f => format!(" flags={f}"),
    };
    format!(
        "{} {:<11} {} -> {} {} {}{} {} {} {}ms {mtls}{flags}",
        s("start_time"),
        s("reporter"),
        party("source_namespace", "source_workload"),
        party("destination_namespace", "destination_workload"),
        s("method"),
        r["authority"].as_str().unwrap_or(""),
        s("path"),
        s("protocol"),
        r["response_code"],
        r["duration"],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_become_the_agents_query() {
        let f = Filter {
            namespace: "shop",
            workload: "web",
            path_prefix: Some("/api v1"),
            method: Some("GET"),
        };
        assert_eq!(
            f.path(),
            "/tap?namespace=shop&workload=web&path_prefix=%2Fapi+v1&method=GET"
        );
    }

    #[test]
    fn a_record_renders_as_one_line() {
        let r = serde_json::json!({
            "reporter": "destination", "start_time": "2026-12-04T05:00:00.000Z",
            "method": "GET", "authority": "web:8080", "path": "/x", "protocol": "HTTP/1.1",
            "response_code": 200, "response_flags": "-", "duration": 3,
            "source_namespace": "shop", "source_workload": "user",
            "source_principal": "spiffe://cluster.local/ns/shop/sa/user",
            "destination_namespace": "shop", "destination_workload": "web",
        });
        assert_eq!(
            render(&r),
            "2026-12-04T05:00:00.000Z destination shop/user -> shop/web GET web:8080/x HTTP/1.1 200 3ms mtls"
        );
        let r = serde_json::json!({
            "reporter": "source", "method": "POST", "path": "/", "response_code": 503,
            "response_flags": "UF", "duration": 1, "destination_workload": "web",
        });
        assert_eq!(
            render(&r),
            "- source      unknown -> unknown POST / - 503 1ms plaintext flags=UF"
        );
    }
}

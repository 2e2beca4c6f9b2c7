//! AuthorizationPolicy evaluation (agent/src/authz.rs): policies as control might send them
//! (well-formed or not), requests as a client might send them. Nothing panics; a policy that
//! does not compile is refused, not half-applied; a catch-all DENY denies every request; and a
//! normalized path is absolute with no `.` or `..` segment left.
#![no_main]

use std::{net::IpAddr, sync::Arc};

use arbitrary::Arbitrary;
use hyper::{
    HeaderMap,
    header::{HeaderName, HeaderValue},
};
use libfuzzer_sys::fuzz_target;
use serde_json::{Value, json};
use trellis_agent::authz::{Conn, Http, PodPolicies, Policy, Verdict, normalize_path};

#[derive(Arbitrary, Debug)]
struct Source {
    principals: Vec<String>,
    not_principals: Vec<String>,
    namespaces: Vec<String>,
    ip_blocks: Vec<String>,
    not_ip_blocks: Vec<String>,
}

#[derive(Arbitrary, Debug)]
struct Operation {
    hosts: Vec<String>,
    ports: Vec<String>,
    not_ports: Vec<String>,
    methods: Vec<String>,
    paths: Vec<String>,
    not_paths: Vec<String>,
}

#[derive(Arbitrary, Debug)]
struct Rule {
    from: Vec<Source>,
    to: Vec<Operation>,
    /// (key selector, header name, values, notValues)
    when: Vec<(u8, String, Vec<String>, Vec<String>)>,
}

#[derive(Arbitrary, Debug)]
struct Spec {
    action: u8,
    selector: Option<Vec<(String, String)>>,
    rules: Option<Vec<Rule>>,
}

#[derive(Arbitrary, Debug)]
enum Doc {
    Shaped(Spec),
    Raw(String),
}

#[derive(Arbitrary, Debug)]
struct Input {
    policies: Vec<Doc>,
    identity: Option<String>,
    ip: ([u8; 16], bool),
    port: u16,
    http: Option<(String, String, String, Vec<(String, String)>)>,
}

fn shaped(s: Spec) -> String {
    const KEYS: [&str; 6] = [
        "source.ip",
        "source.namespace",
        "source.principal",
        "destination.port",
        "request.headers",
        "request.auth.claims[iss]",
    ];
    let rules: Vec<Value> = s
        .rules
        .unwrap_or_default()
        .into_iter()
        .map(|r| {
            let from: Vec<Value> = r
                .from
                .into_iter()
                .map(|f| json!({"source": {"principals": f.principals, "notPrincipals": f.not_principals,
                    "namespaces": f.namespaces, "ipBlocks": f.ip_blocks, "notIpBlocks": f.not_ip_blocks}}))
                .collect();
            let to: Vec<Value> = r
                .to
                .into_iter()
                .map(|o| json!({"operation": {"hosts": o.hosts, "ports": o.ports, "notPorts": o.not_ports,
                    "methods": o.methods, "paths": o.paths, "notPaths": o.not_paths}}))
                .collect();
            let when: Vec<Value> = r
                .when
                .into_iter()
                .map(|(k, header, values, not_values)| {
                    let key = match KEYS[usize::from(k) % KEYS.len()] {
                        "request.headers" => format!("request.headers[{header}]"),
                        other => other.to_owned(),
                    };
                    json!({"key": key, "values": values, "notValues": not_values})
                })
                .collect();
            json!({"from": from, "to": to, "when": when})
        })
        .collect();
    let action = ["ALLOW", "DENY", "AUDIT", "CUSTOM"][usize::from(s.action) % 4];
    let mut spec = json!({"action": action, "rules": rules});
    if let Some(sel) = s.selector {
        spec["selector"] =
            json!({"matchLabels": sel.into_iter().collect::<std::collections::BTreeMap<_, _>>()});
    }
    spec.to_string()
}

fuzz_target!(|input: Input| {
    let mut compiled: Vec<Arc<Policy>> = Vec::new();
    for (i, doc) in input.policies.into_iter().enumerate() {
        let json = match doc {
            Doc::Shaped(s) => shaped(s),
            Doc::Raw(r) => r,
        };
        if let Ok(p) = Policy::compile("shop", &format!("p{i}"), &json) {
            compiled.push(Arc::new(p));
        }
    }
    let ip = if input.ip.1 {
        IpAddr::from([input.ip.0[0], input.ip.0[1], input.ip.0[2], input.ip.0[3]])
    } else {
        IpAddr::from(input.ip.0)
    };
    let conn = Conn {
        identity: input.identity.as_deref(),
        ip,
        port: input.port,
    };
    let mut headers = HeaderMap::new();
    let (method, path, host) = match &input.http {
        Some((m, p, h, hs)) => {
            for (k, v) in hs {
                if let (Ok(k), Ok(v)) = (HeaderName::try_from(k.as_str()), HeaderValue::from_str(v))
                {
                    headers.append(k, v);
                }
            }
            (m.as_str(), normalize_path(p), h.as_str())
        }
        None => ("", "".into(), ""),
    };
    if input.http.is_some() {
        assert!(path.starts_with('/'), "{path:?}");
        assert!(
            !path.split('/').any(|seg| seg == "." || seg == ".."),
            "{path:?}"
        );
    }
    let http = input.http.as_ref().map(|_| Http {
        method,
        path: &path,
        host,
        headers: &headers,
    });
    let policies = PodPolicies(compiled.clone());
    let decision = policies.evaluate(&conn, http.as_ref());
    if compiled.is_empty() {
        assert_eq!(decision.verdict, Verdict::Allow);
    }
    // A DENY that matches everything denies whatever else applies.
    let catch_all = Policy::compile("shop", "deny-all", r#"{"action":"DENY","rules":[{}]}"#)
        .expect("a catch-all DENY compiles");
    compiled.push(Arc::new(catch_all));
    let denied = PodPolicies(compiled).evaluate(&conn, http.as_ref());
    assert!(
        matches!(denied.verdict, Verdict::Deny(Some(_))),
        "{denied:?}"
    );
});

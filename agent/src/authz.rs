//! AuthorizationPolicy, enforced by the destination's node proxy once the caller's identity is
//! verified: on every connection to a TCP port, on every request to an HTTP, HTTP/2 or gRPC
//! port. Istio's order: any matching DENY denies; then, if any ALLOW policy selects the pod,
//! the request must match one; AUDIT policies only mark what they match for the log.
//!
//! Control validated each policy (control/src/istio/security.rs); `Policy::compile` still
//! refuses what it cannot read, so an update carrying one is rejected whole.
use std::{
    borrow::Cow,
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    sync::Arc,
};

use anyhow::{Context as _, Result, bail};
use hyper::{HeaderMap, header::HeaderName};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Action {
    Allow,
    Deny,
    Audit,
}

/// One AuthorizationPolicy, ready to evaluate.
#[derive(Debug, Serialize)]
pub struct Policy {
    /// `namespace/name`, for logs.
    pub name: String,
    pub action: Action,
    #[serde(skip)]
    selector: Option<BTreeMap<String, String>>,
    #[serde(skip)]
    namespace: String,
    #[serde(skip)]
    rules: Vec<Rule>,
}

/// The caller and the port of one connection.
#[derive(Debug, Clone, Copy)]
pub struct Conn<'a> {
    /// The verified SPIFFE ID; None for plaintext (PERMISSIVE) callers.
    pub identity: Option<&'a str>,
    pub ip: IpAddr,
    /// The destination (pod) port.
    pub port: u16,
}

/// The caller as rules match it, worked out once per decision.
#[derive(Clone, Copy)]
struct Who<'a> {
    conn: &'a Conn<'a>,
    principal: Option<&'a str>,
    namespace: Option<&'a str>,
}

impl<'a> Who<'a> {
    fn of(conn: &'a Conn<'a>) -> Self {
        Self {
            conn,
            principal: conn.identity.map(principal),
            namespace: conn.identity.and_then(namespace),
        }
    }
}

/// What an HTTP request adds for L7 rules.
#[derive(Debug, Clone, Copy)]
pub struct Http<'a> {
    pub method: &'a str,
    pub path: &'a str,
    /// The authority (`:authority` or `Host`).
    pub host: &'a str,
    pub headers: &'a HeaderMap,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    /// Names the DENY policy that matched, or None when no ALLOW policy did.
    Deny(Option<String>),
}

/// The verdict, and the AUDIT policies that matched (to log).
#[derive(Debug)]
pub struct Decision {
    pub verdict: Verdict,
    pub audited: Vec<String>,
    /// When no ALLOW policy matched: the ALLOW policies that did not (comma-separated), so the
    /// log names what would have let the caller in.
    pub unmatched_allow: String,
}

impl Decision {
    pub fn denied_by(&self) -> Option<&str> {
        match &self.verdict {
            Verdict::Deny(p) => Some(p.as_deref().unwrap_or("no ALLOW policy matched")),
            Verdict::Allow => None,
        }
    }
}

/// The policies that select one pod, in no particular order (evaluation does not depend on it).
#[derive(Debug, Default, Serialize)]
pub struct PodPolicies(pub Vec<Arc<Policy>>);

impl PodPolicies {
    /// Those of `all` that select a pod in `namespace` with `labels`: its namespace's (with a
    /// matching selector or none) and the root namespace's (mesh-wide, or by selector).
    pub fn select(
        all: &[Arc<Policy>],
        root: &str,
        namespace: &str,
        labels: &HashMap<String, String>,
    ) -> Self {
        Self(
            all.iter()
                .filter(|p| p.namespace == namespace || p.namespace == root)
                .filter(|p| {
                    p.selector
                        .as_ref()
                        .is_none_or(|s| s.iter().all(|(k, v)| labels.get(k) == Some(v)))
                })
                .cloned()
                .collect(),
        )
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// `http` is None for a TCP port: there an ALLOW rule naming HTTP fields never matches and a
    /// DENY (or AUDIT) rule is applied with them ignored, as in Istio.
    pub fn evaluate(&self, conn: &Conn, http: Option<&Http>) -> Decision {
        let who = Who::of(conn);
        let matched = |action| {
            self.0
                .iter()
                .filter(move |p| p.action == action)
                .filter(move |p| p.matches(&who, http))
        };
        let audited = matched(Action::Audit).map(|p| p.name.clone()).collect();
        let mut unmatched_allow = String::new();
        let verdict = if let Some(p) = matched(Action::Deny).next() {
            Verdict::Deny(Some(p.name.clone()))
        } else if self.0.iter().any(|p| p.action == Action::Allow)
            && matched(Action::Allow).next().is_none()
        {
            unmatched_allow = self
                .0
                .iter()
                .filter(|p| p.action == Action::Allow)
                .map(|p| p.name.as_str())
                .collect::<Vec<_>>()
                .join(",");
            Verdict::Deny(None)
        } else {
            Verdict::Allow
        };
        Decision {
            verdict,
            audited,
            unmatched_allow,
        }
    }
}

impl Policy {
    /// Compiles a validated spec (JSON, as control sends it).
    pub fn compile(namespace: &str, name: &str, spec_json: &str) -> Result<Self> {
        let spec: Spec = serde_json::from_str(spec_json)
            .with_context(|| format!("AuthorizationPolicy {namespace}/{name}"))?;
        let rules = spec
            .rules
            .iter()
            .enumerate()
            .map(|(i, r)| Rule::compile(r).with_context(|| format!("rules[{i}]")))
            .collect::<Result<_>>()
            .with_context(|| format!("AuthorizationPolicy {namespace}/{name}"))?;
        Ok(Self {
            name: format!("{namespace}/{name}"),
            action: spec.action.unwrap_or(Action::Allow),
            selector: spec.selector.map(|s| s.match_labels),
            namespace: namespace.to_owned(),
            rules,
        })
    }

    /// Whether any rule matches; a policy without rules matches nothing (so an ALLOW policy
    /// with `spec: {}` lets nothing in).
    fn matches(&self, who: &Who, http: Option<&Http>) -> bool {
        // Which way an HTTP-only field goes on a TCP port.
        let tcp_default = self.action != Action::Allow;
        self.rules.iter().any(|r| r.matches(who, http, tcp_default))
    }
}

/// The policy as control sends it (only what the agent reads; control refused the rest).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Spec {
    #[serde(default)]
    selector: Option<Selector>,
    #[serde(default)]
    action: Option<Action>,
    #[serde(default)]
    rules: Vec<RuleSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Selector {
    #[serde(default)]
    match_labels: BTreeMap<String, String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RuleSpec {
    #[serde(default)]
    from: Vec<FromSpec>,
    #[serde(default)]
    to: Vec<ToSpec>,
    #[serde(default)]
    when: Vec<ConditionSpec>,
}

#[derive(Debug, Deserialize)]
struct FromSpec {
    source: SourceSpec,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct SourceSpec {
    #[serde(default)]
    principals: Vec<String>,
    #[serde(default)]
    not_principals: Vec<String>,
    #[serde(default)]
    namespaces: Vec<String>,
    #[serde(default)]
    not_namespaces: Vec<String>,
    #[serde(default)]
    ip_blocks: Vec<String>,
    #[serde(default)]
    not_ip_blocks: Vec<String>,
}

#[derive(Debug, Deserialize)]
struct ToSpec {
    operation: OperationSpec,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct OperationSpec {
    #[serde(default)]
    hosts: Vec<String>,
    #[serde(default)]
    not_hosts: Vec<String>,
    #[serde(default)]
    ports: Vec<String>,
    #[serde(default)]
    not_ports: Vec<String>,
    #[serde(default)]
    methods: Vec<String>,
    #[serde(default)]
    not_methods: Vec<String>,
    #[serde(default)]
    paths: Vec<String>,
    #[serde(default)]
    not_paths: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ConditionSpec {
    key: String,
    #[serde(default)]
    values: Vec<String>,
    #[serde(default)]
    not_values: Vec<String>,
}

/// Istio's string match: exact, `prefix*`, `*suffix`, or `*` (any value, even empty).
#[derive(Debug, Clone, PartialEq)]
enum Pattern {
    Any,
    Exact(String),
    Prefix(String),
    Suffix(String),
}

impl Pattern {
    fn parse(s: &str) -> Self {
        if s == "*" {
            Pattern::Any
        } else if let Some(p) = s.strip_suffix('*') {
            Pattern::Prefix(p.to_owned())
        } else if let Some(p) = s.strip_prefix('*') {
            Pattern::Suffix(p.to_owned())
        } else {
            Pattern::Exact(s.to_owned())
        }
    }

    /// Lower-cased, for host names (matched without regard to case).
    fn parse_host(s: &str) -> Self {
        Self::parse(&s.to_ascii_lowercase())
    }

    fn matches(&self, v: &str) -> bool {
        match self {
            Pattern::Any => true,
            Pattern::Exact(e) => v == e,
            Pattern::Prefix(p) => v.starts_with(p.as_str()),
            Pattern::Suffix(s) => v.ends_with(s.as_str()),
        }
    }
}

/// A field's allowed and refused values: matches when `yes` is empty or one of it matches, and
/// none of `no` does.
#[derive(Debug)]
struct Field<T> {
    yes: Vec<T>,
    no: Vec<T>,
}

impl<T> Field<T> {
    fn compile(yes: &[String], no: &[String], f: impl Fn(&str) -> Result<T>) -> Result<Self> {
        Ok(Self {
            yes: yes.iter().map(|s| f(s)).collect::<Result<_>>()?,
            no: no.iter().map(|s| f(s)).collect::<Result<_>>()?,
        })
    }

    fn is_set(&self) -> bool {
        !self.yes.is_empty() || !self.no.is_empty()
    }

    /// `value` None (the request has no such value, as a plaintext caller's principal) matches
    /// no `yes` entry and no `no` entry.
    fn matches<V: ?Sized>(&self, value: Option<&V>, hit: impl Fn(&T, &V) -> bool) -> bool {
        let any = |list: &[T]| value.is_some_and(|v| list.iter().any(|t| hit(t, v)));
        (self.yes.is_empty() || any(&self.yes)) && !any(&self.no)
    }
}

#[derive(Debug)]
enum Key {
    SourceIp,
    SourceNamespace,
    SourcePrincipal,
    DestinationPort,
    Header(HeaderName),
}

#[derive(Debug)]
enum Values {
    Ips(Field<IpNet>),
    Ports(Field<u16>),
    Strings(Field<Pattern>),
}

#[derive(Debug)]
struct Condition {
    key: Key,
    values: Values,
}

#[derive(Debug)]
struct Source {
    principals: Field<Pattern>,
    namespaces: Field<Pattern>,
    ip_blocks: Field<IpNet>,
}

#[derive(Debug)]
struct Operation {
    ports: Field<u16>,
    hosts: Field<Pattern>,
    methods: Field<Pattern>,
    paths: Field<Pattern>,
}

#[derive(Debug)]
struct Rule {
    from: Vec<Source>,
    to: Vec<Operation>,
    when: Vec<Condition>,
}

fn ip_block(s: &str) -> Result<IpNet> {
    s.parse::<IpNet>()
        .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
        .with_context(|| format!("{s:?} is not an IP or CIDR"))
}

fn port(s: &str) -> Result<u16> {
    s.parse().with_context(|| format!("{s:?} is not a port"))
}

fn pattern(s: &str) -> Result<Pattern> {
    Ok(Pattern::parse(s))
}

fn host(s: &str) -> Result<Pattern> {
    Ok(Pattern::parse_host(s))
}

impl Rule {
    fn compile(r: &RuleSpec) -> Result<Self> {
        let from = r
            .from
            .iter()
            .map(|f| {
                let s = &f.source;
                Ok(Source {
                    principals: Field::compile(&s.principals, &s.not_principals, pattern)?,
                    namespaces: Field::compile(&s.namespaces, &s.not_namespaces, pattern)?,
                    ip_blocks: Field::compile(&s.ip_blocks, &s.not_ip_blocks, ip_block)?,
                })
            })
            .collect::<Result<_>>()?;
        let to =
            r.to.iter()
                .map(|t| {
                    let o = &t.operation;
                    Ok(Operation {
                        ports: Field::compile(&o.ports, &o.not_ports, port)?,
                        hosts: Field::compile(&o.hosts, &o.not_hosts, host)?,
                        methods: Field::compile(&o.methods, &o.not_methods, pattern)?,
                        paths: Field::compile(&o.paths, &o.not_paths, pattern)?,
                    })
                })
                .collect::<Result<_>>()?;
        let when = r
            .when
            .iter()
            .map(|c| {
                let (yes, no) = (&c.values, &c.not_values);
                let (key, values) = match c.key.as_str() {
                    "source.ip" => (
                        Key::SourceIp,
                        Values::Ips(Field::compile(yes, no, ip_block)?),
                    ),
                    "destination.port" => (
                        Key::DestinationPort,
                        Values::Ports(Field::compile(yes, no, port)?),
                    ),
                    "source.namespace" => (Key::SourceNamespace, strings(yes, no)?),
                    "source.principal" => (Key::SourcePrincipal, strings(yes, no)?),
                    other => {
                        let name = other
                            .strip_prefix("request.headers[")
                            .and_then(|n| n.strip_suffix(']'))
                            .and_then(|n| HeaderName::try_from(n).ok());
                        match name {
                            Some(name) => (Key::Header(name), strings(yes, no)?),
                            None => bail!("when: key {other:?} is not supported"),
                        }
                    }
                };
                Ok(Condition { key, values })
            })
            .collect::<Result<_>>()?;
        Ok(Self { from, to, when })
    }

    /// `tcp_default` is what an HTTP-only field counts as when there is no HTTP request.
    fn matches(&self, who: &Who, http: Option<&Http>, tcp_default: bool) -> bool {
        let Who {
            conn,
            principal,
            namespace,
        } = *who;
        let from = self.from.is_empty()
            || self.from.iter().any(|s| {
                s.principals.matches(principal, Pattern::matches)
                    && s.namespaces.matches(namespace, Pattern::matches)
                    && s.ip_blocks.matches(Some(&conn.ip), in_net)
            });
        if !from {
            return false;
        }
        let to = self.to.is_empty()
            || self.to.iter().any(|o| {
                o.ports.matches(Some(&conn.port), u16::eq)
                    && l7(&o.methods, http, tcp_default, |h| {
                        o.methods.matches(Some(h.method), Pattern::matches)
                    })
                    && l7(&o.paths, http, tcp_default, |h| {
                        o.paths.matches(Some(h.path), Pattern::matches)
                    })
                    && l7(&o.hosts, http, tcp_default, |h| {
                        host_matches(&o.hosts, h.host)
                    })
            });
        to && self.when.iter().all(|c| match (&c.key, &c.values) {
            (Key::SourceIp, Values::Ips(f)) => f.matches(Some(&conn.ip), in_net),
            (Key::DestinationPort, Values::Ports(f)) => f.matches(Some(&conn.port), u16::eq),
            (Key::SourceNamespace, Values::Strings(f)) => f.matches(namespace, Pattern::matches),
            (Key::SourcePrincipal, Values::Strings(f)) => f.matches(principal, Pattern::matches),
            (Key::Header(name), Values::Strings(f)) => http.map_or(tcp_default, |h| {
                f.matches(
                    h.headers.get(name).and_then(|v| v.to_str().ok()),
                    Pattern::matches,
                )
            }),
            _ => false,
        })
    }
}

/// An HTTP-only field: decided by the request (`hit`), or by `tcp_default` without one.
fn l7<T>(
    field: &Field<T>,
    http: Option<&Http>,
    tcp_default: bool,
    hit: impl Fn(&Http) -> bool,
) -> bool {
    !field.is_set() || http.map_or(tcp_default, hit)
}

fn in_net(net: &IpNet, ip: &IpAddr) -> bool {
    net.contains(ip)
}

fn strings(yes: &[String], no: &[String]) -> Result<Values> {
    Ok(Values::Strings(Field::compile(yes, no, pattern)?))
}

/// The host with and without its port, lower-cased, as Istio matches `hosts`.
fn host_matches(field: &Field<Pattern>, authority: &str) -> bool {
    let full = authority.to_ascii_lowercase();
    let bare = match full.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) && !h.ends_with(':') => h,
        _ => &full,
    };
    field.matches(Some(&(full.as_str(), bare)), |p, (full, bare)| {
        p.matches(full) || p.matches(bare)
    })
}

/// Istio's principal form: the SPIFFE ID without `spiffe://`.
fn principal(identity: &str) -> &str {
    identity.strip_prefix("spiffe://").unwrap_or(identity)
}

/// The namespace a SPIFFE ID names (`.../ns/<ns>/sa/<sa>`).
fn namespace(identity: &str) -> Option<&str> {
    let (_, rest) = identity.split_once("/ns/")?;
    rest.split_once("/sa/").map(|(ns, _)| ns)
}

/// The path as policies see it: without the query, with `.` and `..` segments resolved and
/// unreserved characters percent-decoded (so `/public/../admin` and `/%61dmin` are `/admin`),
/// as Istio's default (BASE) normalization.
pub fn normalize_path(path: &str) -> Cow<'_, str> {
    // Already normal (the usual case): nothing to decode, resolve or drop.
    if path.starts_with('/') && !path.contains(['?', '#', '%']) && !path.contains("/.") {
        return Cow::Borrowed(path);
    }
    let raw = path.split(['?', '#']).next().unwrap_or("").as_bytes();
    let mut bytes = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        let hex = (raw[i] == b'%' && i + 2 < raw.len())
            .then(|| std::str::from_utf8(&raw[i + 1..i + 3]).ok())
            .flatten()
            .and_then(|h| u8::from_str_radix(h, 16).ok())
            .filter(|c| c.is_ascii_alphanumeric() || b"-._~".contains(c));
        match hex {
            Some(c) => {
                bytes.push(c);
                i += 3;
            }
            None => {
                bytes.push(raw[i]);
                i += 1;
            }
        }
    }
    let decoded = String::from_utf8_lossy(&bytes);
    let mut out: Vec<&str> = Vec::new();
    for seg in decoded.split('/').skip(1) {
        match seg {
            "." => {}
            ".." => {
                out.pop();
            }
            s => out.push(s),
        }
    }
    let mut joined = format!("/{}", out.join("/"));
    // `/a/..` names the directory `/`, `/a/.` the directory `/a/`.
    if matches!(decoded.rsplit('/').next(), Some("." | "..")) && !joined.ends_with('/') {
        joined.push('/');
    }
    Cow::Owned(joined)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    const ALICE: &str = "spiffe://cluster.local/ns/shop/sa/alice";
    const EVE: &str = "spiffe://cluster.local/ns/legacy/sa/eve";

    fn policies(specs: &[(&str, serde_json::Value)]) -> PodPolicies {
        PodPolicies(
            specs
                .iter()
                .enumerate()
                .map(|(i, (ns, spec))| {
                    Arc::new(Policy::compile(ns, &format!("p{i}"), &spec.to_string()).unwrap())
                })
                .collect(),
        )
    }

    fn conn(identity: Option<&str>) -> Conn<'_> {
        Conn {
            identity,
            ip: "10.244.1.5".parse().unwrap(),
            port: 8080,
        }
    }

    fn get<'a>(path: &'a str, headers: &'a HeaderMap) -> Http<'a> {
        Http {
            method: "GET",
            path,
            host: "web.shop.svc.cluster.local:80",
            headers,
        }
    }

    fn verdict(p: &PodPolicies, c: &Conn, http: Option<&Http>) -> Verdict {
        p.evaluate(c, http).verdict
    }

    #[test]
    fn deny_beats_allow_and_allow_nothing_denies_all() {
        let none = HeaderMap::new();
        let p = policies(&[
            (
                "shop",
                json!({"rules": [{"from": [{"source": {"namespaces": ["shop"]}}]}]}),
            ),
            (
                "shop",
                json!({"action": "DENY", "rules": [{"to": [{"operation": {"paths": ["/admin*"]}}]}]}),
            ),
        ]);
        assert_eq!(
            verdict(&p, &conn(Some(ALICE)), Some(&get("/", &none))),
            Verdict::Allow
        );
        assert_eq!(
            verdict(&p, &conn(Some(ALICE)), Some(&get("/admin/x", &none))),
            Verdict::Deny(Some("shop/p1".into()))
        );
        assert_eq!(
            verdict(&p, &conn(Some(EVE)), Some(&get("/", &none))),
            Verdict::Deny(None)
        );
        // Plaintext callers have no namespace.
        assert_eq!(
            verdict(&p, &conn(None), Some(&get("/", &none))),
            Verdict::Deny(None)
        );

        let nothing = policies(&[("shop", json!({}))]);
        assert_eq!(
            verdict(&nothing, &conn(Some(ALICE)), None),
            Verdict::Deny(None)
        );
        // No policy at all: allowed.
        assert_eq!(verdict(&policies(&[]), &conn(None), None), Verdict::Allow);
        // An empty rule matches everything.
        let everything = policies(&[("shop", json!({"action": "DENY", "rules": [{}]}))]);
        assert!(matches!(
            verdict(&everything, &conn(None), None),
            Verdict::Deny(Some(_))
        ));
    }

    #[test]
    fn http_only_fields_on_tcp_ports_follow_istio() {
        // ALLOW with a method: never matches on TCP, so the connection is denied.
        let allow = policies(&[(
            "shop",
            json!({"rules": [{"to": [{"operation": {"methods": ["GET"]}}]}]}),
        )]);
        assert_eq!(
            verdict(&allow, &conn(Some(ALICE)), None),
            Verdict::Deny(None)
        );
        // DENY with a method and a principal: applied on TCP with the method ignored.
        let deny = policies(&[(
            "shop",
            json!({"action": "DENY", "rules": [{
            "from": [{"source": {"principals": ["cluster.local/ns/legacy/*"]}}],
            "to": [{"operation": {"methods": ["POST"]}}],
            "when": [{"key": "request.headers[x-user]", "values": ["mallory"]}]}]}),
        )]);
        assert!(matches!(
            verdict(&deny, &conn(Some(EVE)), None),
            Verdict::Deny(_)
        ));
        assert_eq!(verdict(&deny, &conn(Some(ALICE)), None), Verdict::Allow);
        // On HTTP, every field counts.
        let mut h = HeaderMap::new();
        assert_eq!(
            verdict(&deny, &conn(Some(EVE)), Some(&get("/", &h))),
            Verdict::Allow
        );
        h.insert("x-user", "mallory".parse().unwrap());
        let post = Http {
            method: "POST",
            ..get("/", &h)
        };
        assert!(matches!(
            verdict(&deny, &conn(Some(EVE)), Some(&post)),
            Verdict::Deny(_)
        ));
    }

    #[test]
    fn sources_operations_and_conditions() {
        let none = HeaderMap::new();
        let p = policies(&[(
            "shop",
            json!({"rules": [{
            "from": [{"source": {"principals": ["*"], "notPrincipals": ["*/sa/bob"]}},
                     {"source": {"ipBlocks": ["10.244.1.0/24"], "notIpBlocks": ["10.244.1.9"]}}],
            "to": [{"operation": {"hosts": ["WEB.shop.svc.cluster.local"], "notPaths": ["*.secret"],
                                  "ports": ["8080"], "notMethods": ["DELETE"]}}],
            "when": [{"key": "destination.port", "values": ["8080"]}]}]}),
        )]);
        let ok = get("/a/b", &none);
        assert_eq!(verdict(&p, &conn(Some(ALICE)), Some(&ok)), Verdict::Allow);
        // Plaintext, but from an allowed block.
        assert_eq!(verdict(&p, &conn(None), Some(&ok)), Verdict::Allow);
        let blocked = Conn {
            ip: "10.244.1.9".parse().unwrap(),
            ..conn(None)
        };
        assert_eq!(verdict(&p, &blocked, Some(&ok)), Verdict::Deny(None));
        let bob = Conn {
            ip: "10.9.9.9".parse().unwrap(),
            ..conn(Some("spiffe://cluster.local/ns/shop/sa/bob"))
        };
        assert_eq!(verdict(&p, &bob, Some(&ok)), Verdict::Deny(None));
        for bad in [
            Http {
                path: "/x.secret",
                ..ok
            },
            Http {
                method: "DELETE",
                ..ok
            },
            Http {
                host: "other.example",
                ..ok
            },
        ] {
            assert_eq!(
                verdict(&p, &conn(Some(ALICE)), Some(&bad)),
                Verdict::Deny(None),
                "{bad:?}"
            );
        }
        let other_port = Conn {
            port: 9090,
            ..conn(Some(ALICE))
        };
        assert_eq!(verdict(&p, &other_port, Some(&ok)), Verdict::Deny(None));
    }

    #[test]
    fn audit_only_marks_and_selection_follows_scope() {
        let p = policies(&[("shop", json!({"action": "AUDIT", "rules": [{}]}))]);
        let d = p.evaluate(&conn(None), None);
        assert_eq!(
            (d.verdict, d.audited),
            (Verdict::Allow, vec!["shop/p0".to_owned()])
        );

        let all = policies(&[
            ("shop", json!({"selector": {"matchLabels": {"app": "web"}}})),
            ("shop", json!({"action": "AUDIT"})),
            ("trellis-system", json!({"action": "DENY"})),
            ("other", json!({})),
        ])
        .0;
        let labels = |app: &str| HashMap::from([("app".to_owned(), app.to_owned())]);
        let names = |ns, app| {
            PodPolicies::select(&all, "trellis-system", ns, &labels(app))
                .0
                .iter()
                .map(|p| p.name.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(
            names("shop", "web"),
            ["shop/p0", "shop/p1", "trellis-system/p2"]
        );
        assert_eq!(names("shop", "db"), ["shop/p1", "trellis-system/p2"]);
        assert_eq!(names("third", "web"), ["trellis-system/p2"]);
    }

    #[test]
    fn paths_are_matched_normalized() {
        for (raw, want) in [
            ("/admin", "/admin"),
            ("/public/../admin?x=1", "/admin"),
            ("/%61dmin/./x", "/admin/x"),
            ("/a/%2F/b", "/a/%2F/b"),
            ("/a/b/..", "/a/"),
            ("/../../etc", "/etc"),
            ("/caf%C3%A9", "/caf%C3%A9"),
            ("/%", "/%"),
            ("/a//b.c/.d", "/a//b.c/.d"),
            ("/a/.", "/a/"),
            ("", "/"),
        ] {
            assert_eq!(normalize_path(raw), want, "{raw}");
        }
    }
}

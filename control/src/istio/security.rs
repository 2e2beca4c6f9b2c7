//! `security.istio.io/v1`: AuthorizationPolicy and PeerAuthentication (subset).
use std::collections::BTreeMap;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{
    Validate,
    common::{WorkloadSelector, check_enum},
};

#[derive(CustomResource, Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "security.istio.io",
    version = "v1",
    kind = "AuthorizationPolicy",
    namespaced
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthorizationPolicySpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    /// ALLOW (default), DENY or AUDIT. CUSTOM (external authorization) is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
    /// Only with CUSTOM, which is refused: accepted in the schema so the error can say why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<Provider>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<Rule>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Provider {
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Rule {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from: Vec<RuleFrom>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to: Vec<RuleTo>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub when: Vec<Condition>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RuleFrom {
    pub source: Source,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Source {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub principals: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_principals: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_namespaces: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ip_blocks: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_ip_blocks: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RuleTo {
    pub operation: Operation,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Operation {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_hosts: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_ports: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_methods: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_paths: Vec<String>,
}

/// One `when` entry: the key's value must be one of `values` and none of `notValues`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Condition {
    pub key: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_values: Vec<String>,
}

/// The `when` keys the node proxy can evaluate; `request.headers[NAME]` besides these.
pub const CONDITION_KEYS: [&str; 4] = [
    "source.ip",
    "source.namespace",
    "source.principal",
    "destination.port",
];

/// Whether `key` is a supported condition key.
fn condition_key_supported(key: &str) -> bool {
    CONDITION_KEYS.contains(&key)
        || key
            .strip_prefix("request.headers[")
            .and_then(|k| k.strip_suffix(']'))
            .is_some_and(header_name)
}

fn header_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

fn ip_or_cidr(s: &str) -> bool {
    s.parse::<ipnet::IpNet>().is_ok() || s.parse::<std::net::IpAddr>().is_ok()
}

fn port(s: &str) -> bool {
    s.parse::<u16>().is_ok_and(|p| p != 0)
}

/// Istio's string forms: exact, `prefix*`, `*suffix` or `*`; a `*` anywhere else is refused
/// rather than read literally.
fn wildcard(s: &str) -> bool {
    if s == "*" {
        return true;
    }
    let inner = s.strip_prefix('*').or(s.strip_suffix('*')).unwrap_or(s);
    !inner.contains('*')
}

fn check_all(at: &str, values: &[String], ok: fn(&str) -> bool, what: &str) -> Result<(), String> {
    match values.iter().position(|v| !ok(v)) {
        Some(k) => Err(format!("{at}[{k}]: {:?} is not {what}", values[k])),
        None => Ok(()),
    }
}

impl Validate for AuthorizationPolicySpec {
    fn validate(&self) -> Result<(), String> {
        if self.action.as_deref() == Some("CUSTOM") || self.provider.is_some() {
            return Err("action: CUSTOM (an external authorizer) is not supported; use ALLOW, DENY or AUDIT".into());
        }
        check_enum("action", &self.action, &["ALLOW", "DENY", "AUDIT"])?;
        if let Some(s) = &self.selector {
            s.validate("selector")?;
        }
        const WILDCARD: &str = "exact, prefix*, *suffix or *";
        for (i, rule) in self.rules.iter().enumerate() {
            for (j, from) in rule.from.iter().enumerate() {
                let at = format!("rules[{i}].from[{j}].source");
                let s = &from.source;
                check_all(
                    &format!("{at}.ipBlocks"),
                    &s.ip_blocks,
                    ip_or_cidr,
                    "an IP or CIDR",
                )?;
                check_all(
                    &format!("{at}.notIpBlocks"),
                    &s.not_ip_blocks,
                    ip_or_cidr,
                    "an IP or CIDR",
                )?;
                for (field, values) in [
                    ("principals", &s.principals),
                    ("notPrincipals", &s.not_principals),
                    ("namespaces", &s.namespaces),
                    ("notNamespaces", &s.not_namespaces),
                ] {
                    check_all(&format!("{at}.{field}"), values, wildcard, WILDCARD)?;
                }
            }
            for (j, to) in rule.to.iter().enumerate() {
                let at = format!("rules[{i}].to[{j}].operation");
                let o = &to.operation;
                check_all(&format!("{at}.ports"), &o.ports, port, "a port")?;
                check_all(&format!("{at}.notPorts"), &o.not_ports, port, "a port")?;
                for (field, values) in [
                    ("hosts", &o.hosts),
                    ("notHosts", &o.not_hosts),
                    ("paths", &o.paths),
                    ("notPaths", &o.not_paths),
                    ("methods", &o.methods),
                    ("notMethods", &o.not_methods),
                ] {
                    check_all(&format!("{at}.{field}"), values, wildcard, WILDCARD)?;
                }
            }
            for (j, c) in rule.when.iter().enumerate() {
                let at = format!("rules[{i}].when[{j}]");
                if !condition_key_supported(&c.key) {
                    return Err(format!(
                        "{at}.key: {:?} is not supported (supported: {}, request.headers[NAME])",
                        c.key,
                        CONDITION_KEYS.join(", ")
                    ));
                }
                if c.values.is_empty() && c.not_values.is_empty() {
                    return Err(format!("{at}: needs values or notValues"));
                }
                let (ok, what): (fn(&str) -> bool, _) = match c.key.as_str() {
                    "source.ip" => (ip_or_cidr, "an IP or CIDR"),
                    "destination.port" => (port, "a port"),
                    _ => (wildcard, WILDCARD),
                };
                check_all(&format!("{at}.values"), &c.values, ok, what)?;
                check_all(&format!("{at}.notValues"), &c.not_values, ok, what)?;
            }
        }
        Ok(())
    }
}

#[derive(CustomResource, Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "security.istio.io",
    version = "v1",
    kind = "PeerAuthentication",
    namespaced
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PeerAuthenticationSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtls: Option<MutualTls>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    /// Keyed by port number (a string, as in JSON).
    pub port_level_mtls: BTreeMap<String, MutualTls>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MutualTls {
    /// UNSET, DISABLE, PERMISSIVE or STRICT.
    pub mode: String,
}

pub const MTLS_MODES: [&str; 4] = ["UNSET", "DISABLE", "PERMISSIVE", "STRICT"];

impl Validate for PeerAuthenticationSpec {
    fn validate(&self) -> Result<(), String> {
        if let Some(s) = &self.selector {
            s.validate("selector")?;
        }
        if let Some(m) = &self.mtls {
            check_enum("mtls.mode", &Some(m.mode.clone()), &MTLS_MODES)?;
        }
        for (port, m) in &self.port_level_mtls {
            if port.parse::<u16>().map_or(true, |p| p == 0) {
                return Err(format!("portLevelMtls.{port}: not a port number"));
            }
            check_enum(
                &format!("portLevelMtls.{port}.mode"),
                &Some(m.mode.clone()),
                &MTLS_MODES,
            )?;
        }
        if !self.port_level_mtls.is_empty() && self.selector.is_none() {
            return Err("portLevelMtls: needs a selector (as in Istio)".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    fn check(spec: serde_json::Value) -> Result<(), String> {
        super::super::parse_spec("AuthorizationPolicy", &spec)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    #[test]
    fn authorization_policies_in_the_supported_subset_pass() {
        check(json!({})).unwrap();
        check(json!({"action": "AUDIT", "rules": [{}]})).unwrap();
        check(json!({"action": "DENY", "selector": {"matchLabels": {"app": "web"}}, "rules": [{
            "from": [{"source": {"principals": ["cluster.local/ns/shop/sa/*"], "notNamespaces": ["legacy"],
                                 "ipBlocks": ["10.0.0.0/8", "::1"], "notIpBlocks": ["10.1.2.3"]}}],
            "to": [{"operation": {"methods": ["GET"], "notPaths": ["/admin/*", "*/secret"], "hosts": ["*.example"],
                                   "notHosts": ["x"], "ports": ["8080"], "notPorts": ["9090"], "notMethods": ["*"]}}],
            "when": [{"key": "request.headers[x-user]", "values": ["alice"]},
                     {"key": "source.ip", "notValues": ["10.0.0.0/24"]},
                     {"key": "destination.port", "values": ["80"]}]}]}))
        .unwrap();
    }

    #[test]
    fn what_cannot_be_enforced_is_refused_with_its_path() {
        for (spec, want) in [
            (
                json!({"action": "CUSTOM", "provider": {"name": "ext"}}),
                "spec.action: CUSTOM",
            ),
            (
                json!({"action": "allow"}),
                "spec.action: \"allow\" is not supported",
            ),
            (
                json!({"rules": [{"from": [{"source": {"requestPrincipals": ["*"]}}]}]}),
                "spec.rules[0].from[0].source.requestPrincipals: unknown field",
            ),
            (
                json!({"rules": [{"when": [{"key": "request.auth.claims[iss]", "values": ["x"]}]}]}),
                "spec.rules[0].when[0].key: \"request.auth.claims[iss]\" is not supported",
            ),
            (
                json!({"rules": [{"when": [{"key": "source.ip"}]}]}),
                "spec.rules[0].when[0]: needs values or notValues",
            ),
            (
                json!({"rules": [{}, {"to": [{"operation": {"notPorts": ["0"]}}]}]}),
                "spec.rules[1].to[0].operation.notPorts[0]: \"0\" is not a port",
            ),
            (
                json!({"rules": [{"to": [{"operation": {"paths": ["/a/*/b"]}}]}]}),
                "spec.rules[0].to[0].operation.paths[0]: \"/a/*/b\" is not exact, prefix*, *suffix or *",
            ),
            (
                json!({"rules": [{"from": [{"source": {"ipBlocks": ["10.0.0.0/33"]}}]}]}),
                "spec.rules[0].from[0].source.ipBlocks[0]: \"10.0.0.0/33\" is not an IP or CIDR",
            ),
            (
                json!({"targetRef": {"kind": "Service", "name": "web"}}),
                "unknown field `targetRef`",
            ),
        ] {
            let e = check(spec.clone()).unwrap_err();
            assert!(e.contains(want), "{spec}: {e}");
        }
    }
}

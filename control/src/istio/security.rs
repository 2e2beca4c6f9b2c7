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
    /// ALLOW (default) or DENY.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<Rule>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Rule {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from: Vec<RuleFrom>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to: Vec<RuleTo>,
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
    pub ports: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_paths: Vec<String>,
}

impl Validate for AuthorizationPolicySpec {
    fn validate(&self) -> Result<(), String> {
        check_enum("action", &self.action, &["ALLOW", "DENY"])?;
        if let Some(s) = &self.selector {
            s.validate("selector")?;
        }
        for (i, rule) in self.rules.iter().enumerate() {
            for (j, from) in rule.from.iter().enumerate() {
                for (k, block) in from
                    .source
                    .ip_blocks
                    .iter()
                    .chain(&from.source.not_ip_blocks)
                    .enumerate()
                {
                    if block.parse::<ipnet::IpNet>().is_err()
                        && block.parse::<std::net::IpAddr>().is_err()
                    {
                        return Err(format!(
                            "rules[{i}].from[{j}].source.ipBlocks[{k}]: {block:?} is not an IP or CIDR"
                        ));
                    }
                }
            }
            for (j, to) in rule.to.iter().enumerate() {
                for p in &to.operation.ports {
                    if p.parse::<u16>().map_or(true, |p| p == 0) {
                        return Err(format!(
                            "rules[{i}].to[{j}].operation.ports: {p:?} is not a port"
                        ));
                    }
                }
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

//! The Istio API subset Trellis accepts: `networking.istio.io/v1` VirtualService,
//! DestinationRule, ServiceEntry, Gateway and `security.istio.io/v1` AuthorizationPolicy,
//! PeerAuthentication. Every spec type denies unknown fields, so a field outside the subset is
//! rejected (with its path) instead of being silently ignored; `validate` checks what serde
//! cannot (durations, regexes, enums spelled as strings, ranges). docs/istio-api.md lists the
//! subset field by field.
mod common;
mod networking;
mod security;

use anyhow::{Result, anyhow, bail};
use kube::{CustomResourceExt, core::crd::merge_crds};
use serde::de::DeserializeOwned;
use serde_json::Value;

pub use common::*;
pub use networking::*;
pub use security::*;

/// A validated mesh policy object.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicyObject {
    pub kind: &'static str,
    pub namespace: String,
    pub name: String,
    /// The spec as accepted (normalised through the typed form).
    pub spec: Value,
}

/// The kinds, with the group each belongs to.
pub const KINDS: [(&str, &str); 6] = [
    ("networking.istio.io", "VirtualService"),
    ("networking.istio.io", "DestinationRule"),
    ("networking.istio.io", "ServiceEntry"),
    ("networking.istio.io", "Gateway"),
    ("security.istio.io", "AuthorizationPolicy"),
    ("security.istio.io", "PeerAuthentication"),
];

/// Parses and validates the spec of a mesh object of `kind`. Errors name the field path.
pub fn parse_spec(kind: &str, spec: &Value) -> Result<(&'static str, Value)> {
    match kind {
        "VirtualService" => typed::<VirtualServiceSpec>("VirtualService", spec),
        "DestinationRule" => typed::<DestinationRuleSpec>("DestinationRule", spec),
        "ServiceEntry" => typed::<ServiceEntrySpec>("ServiceEntry", spec),
        "Gateway" => typed::<GatewaySpec>("Gateway", spec),
        "AuthorizationPolicy" => typed::<AuthorizationPolicySpec>("AuthorizationPolicy", spec),
        "PeerAuthentication" => typed::<PeerAuthenticationSpec>("PeerAuthentication", spec),
        other => bail!("unsupported kind {other}"),
    }
}

fn typed<T: DeserializeOwned + serde::Serialize + Validate>(
    kind: &'static str,
    spec: &Value,
) -> Result<(&'static str, Value)> {
    let parsed: T = serde_path_to_error::deserialize(spec).map_err(|e| {
        let path = e.path().to_string();
        let at = if path == "." {
            "spec".to_owned()
        } else {
            format!("spec.{path}")
        };
        anyhow!("{at}: {}", e.into_inner())
    })?;
    parsed.validate().map_err(|e| anyhow!("spec.{e}"))?;
    Ok((kind, serde_json::to_value(&parsed)?))
}

/// Checks beyond the shape of the data. Errors start with the field path below `spec.`.
pub trait Validate {
    fn validate(&self) -> Result<(), String>;
}

/// The CustomResourceDefinitions for the accepted subset, for `cargo xtask manifests`.
pub fn crds()
-> Vec<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition>
{
    let crds = vec![
        VirtualService::crd(),
        DestinationRule::crd(),
        ServiceEntry::crd(),
        Gateway::crd(),
        AuthorizationPolicy::crd(),
        PeerAuthentication::crd(),
    ];
    // One version each; merge_crds would combine versions of one kind (kept for symmetry with
    // future v1beta1 support, and to check the CRDs are well formed).
    crds.into_iter()
        .map(|c| merge_crds(vec![c], "v1").expect("a single well-formed CRD"))
        .collect()
}

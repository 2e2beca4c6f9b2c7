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
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceDefinition, JSONSchemaProps, JSONSchemaPropsOrArray, JSONSchemaPropsOrBool,
};
use kube::{
    CustomResourceExt,
    api::{ApiResource, GroupVersionKind},
};
use serde::de::DeserializeOwned;
use serde_json::Value;

pub use common::*;
pub use networking::*;
pub use security::*;

/// A validated mesh policy object.
#[derive(Debug, Clone, PartialEq, Eq)]
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

/// Where `cargo xtask manifests` writes the CRDs, relative to the workspace root.
pub const CRDS_FILE: &str = "deploy/crds/istio-subset.yaml";

/// The CustomResourceDefinitions for the accepted subset, as one multi-document YAML file. Their
/// schemas come from the same types that validate objects, so the API server rejects what
/// control would: wrong types, missing required fields. Unknown fields it must keep: an API
/// server prunes what a schema does not name, so an AuthorizationPolicy with an unsupported
/// field (`requestPrincipals`) would be stored without it, and an ALLOW rule would widen.
/// Every object in the schemas preserves unknown fields instead, and control refuses them.
fn crds() -> [CustomResourceDefinition; 6] {
    let mut crds = [
        VirtualService::crd(),
        DestinationRule::crd(),
        ServiceEntry::crd(),
        Gateway::crd(),
        AuthorizationPolicy::crd(),
        PeerAuthentication::crd(),
    ];
    for crd in &mut crds {
        for version in &mut crd.spec.versions {
            if let Some(spec) = version
                .schema
                .as_mut()
                .and_then(|s| s.open_api_v3_schema.as_mut())
                .and_then(|root| root.properties.as_mut())
                .and_then(|p| p.get_mut("spec"))
            {
                preserve_unknown_fields(spec);
            }
        }
    }
    crds
}

/// Marks every object below and including `schema` to keep fields it does not name.
fn preserve_unknown_fields(schema: &mut JSONSchemaProps) {
    if let Some(props) = schema.properties.as_mut() {
        schema.x_kubernetes_preserve_unknown_fields = Some(true);
        props.values_mut().for_each(preserve_unknown_fields);
    }
    match schema.items.as_mut() {
        Some(JSONSchemaPropsOrArray::Schema(s)) => preserve_unknown_fields(s),
        Some(JSONSchemaPropsOrArray::Schemas(list)) => {
            list.iter_mut().for_each(preserve_unknown_fields)
        }
        None => {}
    }
    if let Some(JSONSchemaPropsOrBool::Schema(s)) = schema.additional_properties.as_mut() {
        preserve_unknown_fields(s);
    }
    for list in [&mut schema.any_of, &mut schema.one_of, &mut schema.all_of]
        .into_iter()
        .flatten()
    {
        list.iter_mut().for_each(preserve_unknown_fields);
    }
}

/// Each mesh kind's API resource as its CRD defines it (group, version, kind and plural: the
/// API server's plural of ServiceEntry is `serviceentries`, not kind + "s").
pub fn api_resources() -> Vec<ApiResource> {
    crds()
        .iter()
        .map(|crd| {
            let version = &crd.spec.versions[0].name;
            let gvk = GroupVersionKind::gvk(&crd.spec.group, version, &crd.spec.names.kind);
            ApiResource::from_gvk_with_plural(&gvk, &crd.spec.names.plural)
        })
        .collect()
}

/// The mesh's CRDs by name (`virtualservices.networking.istio.io`, …): what `trellisctl check`
/// looks for in a cluster.
pub fn crd_names() -> Vec<String> {
    crds()
        .into_iter()
        .filter_map(|crd| crd.metadata.name)
        .collect()
}

pub fn crds_yaml() -> Result<String> {
    let crds = crds();
    let mut out = String::from(
        "# Generated by `cargo xtask manifests` from control/src/istio; do not edit.\n",
    );
    for crd in crds {
        out.push_str("---\n");
        out.push_str(&serde_saphyr::to_string(&crd)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #[test]
    fn api_resources_use_the_crds_plurals() {
        let plurals: Vec<String> = super::api_resources()
            .into_iter()
            .map(|r| r.plural)
            .collect();
        assert!(
            plurals.contains(&"serviceentries".to_owned())
                && plurals.contains(&"authorizationpolicies".to_owned()),
            "{plurals:?}"
        );
        assert_eq!(plurals.len(), super::KINDS.len());
    }

    #[test]
    fn crds_keep_unknown_fields_for_control_to_refuse() {
        let yaml = super::crds_yaml().unwrap();
        let authz = yaml
            .split("---\n")
            .find(|d| d.contains("kind: AuthorizationPolicy"))
            .unwrap();
        // spec, rules[], from[], source, to[], operation, when[], selector, provider at least.
        let marked = authz
            .matches("x-kubernetes-preserve-unknown-fields: true")
            .count();
        assert!(marked >= 9, "{marked} objects marked:\n{authz}");
    }

    #[test]
    fn committed_crds_match_the_types() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join(super::CRDS_FILE);
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            committed == super::crds_yaml().unwrap(),
            "{} is out of date with control/src/istio: run `cargo xtask manifests` and commit the result",
            path.display()
        );
    }
}

//! `trellis-control install`: the manifests of deploy/ (what `kubectl apply -k deploy/` applies),
//! printed with the images and trust domain filled in, for `trellis-control install | kubectl
//! apply -f -`.
use anyhow::{Result, bail};

/// deploy/'s files in kustomization.yaml's order.
const FILES: [(&str, &str); 4] = [
    (
        "crds/istio-subset.yaml",
        include_str!("../../deploy/crds/istio-subset.yaml"),
    ),
    (
        "rbac/trellis.yaml",
        include_str!("../../deploy/rbac/trellis.yaml"),
    ),
    ("control.yaml", include_str!("../../deploy/control.yaml")),
    ("agent.yaml", include_str!("../../deploy/agent.yaml")),
];

const VERSION: &str = env!("CARGO_PKG_VERSION");

pub struct Values {
    pub agent_image: String,
    pub control_image: String,
    pub trust_domain: String,
}

impl Default for Values {
    fn default() -> Self {
        Self {
            agent_image: format!("localhost/trellis/agent:{VERSION}"),
            control_image: format!("localhost/trellis/control:{VERSION}"),
            trust_domain: "cluster.local".into(),
        }
    }
}

/// The manifests as one multi-document YAML stream.
pub fn render(values: &Values) -> Result<String> {
    let defaults = Values::default();
    for (what, value) in [
        ("--agent-image", &values.agent_image),
        ("--control-image", &values.control_image),
        ("--trust-domain", &values.trust_domain),
    ] {
        if value.is_empty() || value.chars().any(|c| c.is_whitespace() || c.is_control()) {
            bail!("{what} {value:?}: must be non-empty, without spaces");
        }
    }
    let swaps = [
        ("image: ", &defaults.agent_image, &values.agent_image),
        ("image: ", &defaults.control_image, &values.control_image),
        (
            "--trust-domain=",
            &defaults.trust_domain,
            &values.trust_domain,
        ),
    ]
    .map(|(key, from, to)| (format!("{key}{from}"), format!("{key}{to}")));
    let mut out = format!("# trellis-control install {VERSION}; apply with kubectl apply -f -\n");
    for (name, text) in FILES {
        let text = swaps
            .iter()
            .fold(text.to_owned(), |t, (from, to)| t.replace(from, to));
        out.push_str(&format!("---\n# deploy/{name}\n"));
        out.push_str(text.trim_start_matches("---\n"));
        if !out.ends_with('\n') {
            out.push('\n');
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifests_name_this_version_and_install_fills_in_values() {
        let plain = render(&Values::default()).unwrap();
        for want in [
            format!("image: localhost/trellis/agent:{VERSION}"),
            format!("image: localhost/trellis/control:{VERSION}"),
            "--trust-domain=cluster.local".to_owned(),
        ] {
            assert!(plain.contains(&want), "deploy/ no longer says {want}");
        }
        let custom = render(&Values {
            agent_image: "reg.example/agent:1".into(),
            control_image: "reg.example/control:1".into(),
            trust_domain: "prod.example".into(),
        })
        .unwrap();
        assert!(custom.contains("image: reg.example/agent:1"));
        assert!(custom.contains("image: reg.example/control:1"));
        assert!(custom.contains("--trust-domain=prod.example"));
        assert!(!custom.contains("localhost/trellis"));
        assert_eq!(
            plain.matches("\nkind: ").count(),
            custom.matches("\nkind: ").count()
        );
    }

    #[test]
    fn every_file_of_the_kustomization_is_installed() {
        let kustomization = include_str!("../../deploy/kustomization.yaml");
        let listed: Vec<&str> = kustomization
            .lines()
            .filter_map(|l| l.strip_prefix("- "))
            .collect();
        let files: Vec<&str> = FILES.iter().map(|f| f.0).collect();
        assert_eq!(listed, files);
    }

    #[test]
    fn bad_values_are_refused() {
        let values = Values {
            agent_image: "a b".into(),
            ..Values::default()
        };
        assert!(
            render(&values)
                .unwrap_err()
                .to_string()
                .contains("--agent-image")
        );
    }
}

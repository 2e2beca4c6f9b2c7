//! `trellisctl analyze FILE|DIR…`: validates Kubernetes and Istio YAML offline with control's
//! own reader (`trellis_control::source::dir`), so what it accepts control's dir source and
//! kube source accept, and what it refuses they refuse with the same message.
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};
use trellis_control::source::dir;

/// What was found in every file: each error as `FILE: KIND NAMESPACE/NAME: field.path: message`
/// (or `FILE: message` for a file refused whole), and the objects that are valid.
#[derive(Debug, Default)]
pub struct Report {
    pub errors: Vec<String>,
    pub valid: usize,
}

impl Report {
    /// The report's lines: errors, then the verdict.
    pub fn render(&self) -> String {
        let mut out: String = self.errors.iter().map(|e| format!("{e}\n")).collect();
        if self.errors.is_empty() {
            out.push_str(&format!("✔ {} objects valid\n", self.valid));
        } else {
            out.push_str(&format!(
                "✘ {} error(s); {} objects valid\n",
                self.errors.len(),
                self.valid
            ));
        }
        out
    }
}

/// Reads `paths`: files of any name, and directories as control reads them (their `*.yaml`,
/// `*.yml` and `*.json` files, not subdirectories).
pub fn analyze(paths: &[PathBuf]) -> Result<Report> {
    let mut report = Report::default();
    for path in paths {
        let meta = std::fs::metadata(path).with_context(|| format!("{}", path.display()))?;
        if meta.is_dir() {
            let files = dir::yaml_files(path)?;
            if files.is_empty() {
                report.errors.push(format!(
                    "{}: no *.yaml, *.yml or *.json files in it (control reads only those, and \
                     not in subdirectories)",
                    path.display()
                ));
            }
            for (file, (_, len)) in files {
                file_report(&file, len, &mut report);
            }
        } else {
            file_report(path, meta.len(), &mut report);
        }
    }
    Ok(report)
}

fn file_report(file: &Path, len: u64, report: &mut Report) {
    let name = file.display();
    match dir::read_file(file, len) {
        Err(e) => report.errors.push(format!("{name}: {e:#}")),
        Ok(docs) if docs.is_empty() => {
            report.errors.push(format!("{name}: no objects in it"));
        }
        Ok(docs) => {
            for doc in docs {
                match doc.object {
                    Ok(_) => report.valid += 1,
                    Err(e) => report.errors.push(format!("{name}: {}: {e}", doc.key)),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn errors_name_file_object_and_field() {
        let dir = tempfile::tempdir().unwrap();
        let f = write(
            dir.path(),
            "routes.yaml",
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: reviews, namespace: shop}\n\
             spec:\n  hosts: [reviews]\n  http:\n  - route:\n    - destination: {host: reviews, subset: v1}\n      weight: 80\n\
             \x20   - destination: {host: reviews, subset: v2}\n      weight: 30\n---\n\
             apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: shop}\n\
             spec: {mtls: {mode: STRICT}}\n",
        );
        let r = analyze(std::slice::from_ref(&f)).unwrap();
        assert_eq!(r.valid, 1);
        assert_eq!(
            r.errors,
            vec![format!(
                "{}: VirtualService shop/reviews: spec.http[0].route: weights add up to 110, not 100",
                f.display()
            )]
        );
        assert!(
            r.render().ends_with("✘ 1 error(s); 1 objects valid\n"),
            "{}",
            r.render()
        );
    }

    #[test]
    fn unknown_fields_and_kinds_are_refused_with_their_path() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "dr.yaml",
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: web, namespace: shop}\n\
             spec: {host: web, trafficPolicy: {loadBalancer: {simple: ROUND_ROBIN, warmupDurationSecs: 10s}}}\n",
        );
        write(
            dir.path(),
            "deploy.yml",
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\n",
        );
        write(
            dir.path(),
            "notes.txt",
            "not read: control reads only YAML and JSON files",
        );
        let r = analyze(&[dir.path().to_owned()]).unwrap();
        assert_eq!(r.valid, 0);
        assert_eq!(r.errors.len(), 2, "{:?}", r.errors);
        assert!(
            r.errors[0].ends_with("deploy.yml: Deployment web: unsupported kind Deployment (apiVersion apps/v1); \
                 Trellis reads v1 Namespace, Pod, Service, Secret (kubernetes.io/tls) and the Istio kinds \
                 VirtualService, DestinationRule, ServiceEntry, Gateway, AuthorizationPolicy, PeerAuthentication"),
            "{}",
            r.errors[0]
        );
        assert!(
            r.errors[1].contains("dr.yaml: DestinationRule shop/web: spec.trafficPolicy.loadBalancer.warmupDurationSecs: unknown field `warmupDurationSecs`"),
            "{}",
            r.errors[1]
        );
    }

    #[test]
    fn whole_file_problems_and_empty_inputs_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let bad = write(dir.path(), "bad.yaml", "kind: [unclosed");
        let r = analyze(&[bad]).unwrap();
        assert_eq!(r.errors.len(), 1);
        assert!(
            r.errors[0].contains("bad.yaml: not valid YAML"),
            "{:?}",
            r.errors
        );

        let empty = tempfile::tempdir().unwrap();
        let r = analyze(&[empty.path().to_owned()]).unwrap();
        assert!(
            r.errors[0].contains("no *.yaml, *.yml or *.json files"),
            "{:?}",
            r.errors
        );

        let e = analyze(&[dir.path().join("missing.yaml")]).unwrap_err();
        assert!(format!("{e:#}").contains("missing.yaml"), "{e:#}");
    }

    /// The documented examples are what users copy: every one must pass.
    #[test]
    fn the_documented_examples_are_valid() {
        let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/examples");
        let r = analyze(&[docs.join("shop"), docs.join("traffic")]).unwrap();
        assert_eq!(r.errors, Vec::<String>::new());
        assert!(r.valid >= 24, "{} objects", r.valid);
        assert!(r.render().starts_with("✔ "), "{}", r.render());
    }
}

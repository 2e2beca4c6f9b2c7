//! trellis-control: the mesh's control service. It is not built yet (the control-service issue):
//! this binary documents its interface and refuses to run, rather than pretending to serve.
use std::process::ExitCode;

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "trellis-control",
    version,
    about = "Trellis control service: watches the cluster, streams per-node config to agents, signs workload certificates.",
    long_about = "Trellis control service: watches the cluster, streams per-node config to agents, signs workload \
                  certificates.\n\nNOT IMPLEMENTED YET: this build only validates its arguments and exits with status 2. \
                  Until it lands, give each trellis-agent its pods with `trellis-agent run --pods FILE`."
)]
struct Cli {
    /// Where the cluster model comes from: `kube` (watch the Kubernetes API) or `dir:PATH`
    /// (a directory of Kubernetes YAML, re-read on change).
    #[arg(long, default_value = "kube", value_parser = parse_source)]
    source: String,
}

fn parse_source(s: &str) -> Result<String, String> {
    match s.split_once(':') {
        None if s == "kube" => Ok(s.to_owned()),
        Some(("dir", path)) if !path.is_empty() => Ok(s.to_owned()),
        _ => Err(format!("expected `kube` or `dir:PATH`, got {s:?}")),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    eprintln!(
        "trellis-control: --source {} accepted, but the control service is not implemented in this build; \
         run trellis-agent with --pods FILE instead",
        cli.source
    );
    ExitCode::from(2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_must_be_kube_or_dir() {
        assert!(parse_source("kube").is_ok());
        assert!(parse_source("dir:/etc/trellis").is_ok());
        for bad in ["", "dir:", "file:/x", "kubernetes"] {
            assert!(parse_source(bad).is_err(), "{bad:?} accepted");
        }
    }
}

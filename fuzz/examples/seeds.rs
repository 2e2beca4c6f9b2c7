//! Writes the `config_apply` seed inputs from docs/examples: for each example file, the update
//! stream control sends node-1 (a snapshot of the shop split over several messages, then the
//! update that adds the file's objects), made by control's own compiler and splitter.
//! `cargo run --example seeds` in fuzz/; docs/fuzzing.md.
use std::path::Path;

use prost::Message as _;
use trellis_api as api;
use trellis_control::{chunks, compile, model::Cluster, source::dir::parse_file};

fn main() -> anyhow::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let examples = root.join("docs/examples");
    let out = root.join("fuzz/corpus/config_apply");
    std::fs::create_dir_all(&out)?;
    let mut shop = Cluster::default();
    for f in ["namespace", "pods", "services"] {
        load(&mut shop, &examples.join(format!("shop/{f}.yaml")))?;
    }
    let mut files: Vec<_> = std::fs::read_dir(examples.join("traffic"))?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    files.extend(["security", "traffic"].map(|f| examples.join(format!("shop/{f}.yaml"))));
    for file in files {
        let mut cluster = shop.clone();
        load(&mut cluster, &file)?;
        let before = compile::node_config(&shop, "node-1", "cluster.local");
        let after = compile::node_config(&cluster, "node-1", "cluster.local");
        let header = |version, snapshot| api::ConfigUpdate {
            version,
            snapshot,
            trust_domain: "cluster.local".into(),
            ..Default::default()
        };
        // Small chunks, so the seed exercises the assembler too.
        let mut messages = chunks::split(
            &header(1, true),
            before.clone().into_values().collect(),
            Vec::new(),
            1024,
        );
        let (upserts, removals) = compile::diff(&before, &after);
        messages.extend(chunks::split(
            &header(2, false),
            upserts.into_iter().map(|(_, r)| r).collect(),
            removals,
            1024,
        ));
        let mut seed = Vec::new();
        for m in &messages {
            m.encode_length_delimited(&mut seed)?;
        }
        let name = file.file_stem().expect("a file name").to_string_lossy();
        std::fs::write(out.join(format!("{name}.bin")), seed)?;
        println!("{name}: {} messages", messages.len());
    }
    Ok(())
}

fn load(cluster: &mut Cluster, file: &Path) -> anyhow::Result<()> {
    for doc in parse_file(&std::fs::read_to_string(file)?)? {
        cluster.insert(doc.object.map_err(anyhow::Error::msg)?);
    }
    Ok(())
}

// Builds the kernel programs (nightly, build-std=core, bpf-linker) and puts the object in OUT_DIR,
// where src/redirect/loader.rs embeds it. `cargo xtask setup` installs what this needs.
fn main() -> anyhow::Result<()> {
    let package = aya_build::Package {
        name: "trellis-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../ebpf/trellis-ebpf"),
        ..Default::default()
    };
    aya_build::build_ebpf([package], aya_build::Toolchain::default())
}

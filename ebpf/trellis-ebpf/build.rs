// Rebuild the kernel programs when bpf-linker changes (it is not a cargo dependency).
fn main() {
    let linker = which::which("bpf-linker").expect(
        "bpf-linker not found on PATH: run `cargo xtask setup` to build it against nightly's LLVM",
    );
    println!("cargo:rerun-if-changed={}", linker.display());
}

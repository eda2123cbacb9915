//! Builds the kernel programs (`mesh-ebpf`, nightly + bpf-linker) and embeds them.
//!
//! `cargo xtask setup` installs what this needs; every xtask command runs it first.
fn main() -> anyhow::Result<()> {
    let ebpf = aya_build::Package {
        name: "mesh-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../mesh-ebpf"),
        ..Default::default()
    };
    println!("cargo:rerun-if-changed={}", concat!(env!("CARGO_MANIFEST_DIR"), "/../mesh-common/src"));
    aya_build::build_ebpf([ebpf], aya_build::Toolchain::default())
}

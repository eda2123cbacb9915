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
    println!("cargo:rerun-if-changed={}", concat!(env!("CARGO_MANIFEST_DIR"), "/../mesh-ebpf/rust-toolchain.toml"));
    aya_build::build_ebpf([ebpf], aya_build::Toolchain::Custom(ebpf_toolchain()))
}

/// The dated nightly pinned in mesh-ebpf/rust-toolchain.toml (see the comment there).
fn ebpf_toolchain() -> &'static str {
    include_str!("../mesh-ebpf/rust-toolchain.toml")
        .lines()
        .find_map(|l| l.strip_prefix("channel = \""))
        .and_then(|rest| rest.strip_suffix('"'))
        .expect("mesh-ebpf/rust-toolchain.toml names its channel")
}

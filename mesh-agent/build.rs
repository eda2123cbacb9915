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
    link_order();
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

/// Lays the agent's text out in the order of `link-order.txt` (release builds only).
///
/// The file lists the functions and read-only data the agent touches from start-up
/// through traffic (`cargo xtask link-order` measures them). Placed together at the
/// front of their sections, they fill a few megabytes of pages instead of touching a
/// page in every 64 KiB the kernel maps around a fault (fault-around), which is what
/// made most of the binary's text resident. Names the file lists that a build does not
/// have (a dependency updated, an item renamed) are skipped; the rest still pack.
/// The ordering flag is lld's, the linker rustc uses on this target.
fn link_order() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/link-order.txt");
    println!("cargo:rerun-if-changed={path}");
    let release = std::env::var("PROFILE").is_ok_and(|p| p == "release");
    let lld_target = std::env::var("TARGET").is_ok_and(|t| t == "x86_64-unknown-linux-gnu");
    let other_linker = std::env::var("CARGO_ENCODED_RUSTFLAGS").is_ok_and(|f| f.contains("linker"));
    if release && lld_target && !other_linker && std::path::Path::new(path).exists() {
        println!("cargo:rustc-link-arg-bin=mesh-agent=-Wl,--symbol-ordering-file={path}");
        println!("cargo:rustc-link-arg-bin=mesh-agent=-Wl,--no-warn-symbol-ordering");
    }
}

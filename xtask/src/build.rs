//! Builds: the kernel object alone, and the binaries the lab runs.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context as _, bail};

use crate::root;

/// Builds `mesh-ebpf` for the BPF target, as mesh-agent's build.rs does, and reports the
/// object's path.
pub fn ebpf() -> anyhow::Result<()> {
    let status = Command::new("cargo")
        .current_dir(root())
        .args([
            &format!("+{}", crate::setup::ebpf_toolchain()),
            "build",
            "--package",
            "mesh-ebpf",
            "--bins",
            "--release",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
        ])
        .env("CARGO_ENCODED_RUSTFLAGS", "--cfg=bpf_target_arch=\"x86_64\"\x1f-Cdebuginfo=2\x1f-Clink-arg=--btf")
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .status()
        .context("running cargo for the kernel toolchain")?;
    if !status.success() {
        bail!("building mesh-ebpf failed");
    }
    let obj = root().join("target/bpfel-unknown-none/release/mesh-ebpf");
    println!("kernel object: {}", obj.display());
    Ok(())
}

/// Paths of the built binaries.
pub struct Binaries {
    /// `mesh-agent`.
    pub agent: PathBuf,
    /// `mesh-echo`.
    pub echo: PathBuf,
}

/// Builds the agent and the test app.
pub fn binaries(release: bool) -> anyhow::Result<Binaries> {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(root()).args(["build", "--package", "mesh-agent", "--package", "mesh-tests", "--bins"]);
    if release {
        cmd.arg("--release");
    }
    let status = cmd.status().context("running cargo build")?;
    if !status.success() {
        bail!("build failed");
    }
    let dir = root().join("target").join(if release { "release" } else { "debug" });
    Ok(Binaries { agent: dir.join("mesh-agent"), echo: dir.join("mesh-echo") })
}

/// Writes deploy/ from the generator in mesh-agent (`meshctl manifest generate
/// --deploy-dir`), so the committed manifests, chart and overlays match the code.
pub fn manifests() -> anyhow::Result<()> {
    crate::setup::ensure()?;
    let status = Command::new("cargo")
        .current_dir(root())
        .args([
            "run",
            "--quiet",
            "--package",
            "mesh-agent",
            "--bin",
            "meshctl",
            "--",
            "manifest",
            "generate",
            "--deploy-dir",
        ])
        .arg(root().join("deploy"))
        .status()
        .context("running meshctl")?;
    if !status.success() {
        bail!("meshctl manifest generate failed");
    }
    Ok(())
}

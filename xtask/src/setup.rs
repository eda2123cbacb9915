//! `cargo xtask setup`: installs what the build, the lab and the tests need, and nothing
//! that is already there. Every other command calls [`ensure`] first.

use std::path::Path;
use std::process::Command;

use anyhow::{Context as _, bail};
use mesh_tests::sys::have;

/// Debian packages: LLVM for bpf-linker, and the lab's tools (Prometheus scrapes the
/// agents in a test; buildah builds the agent image and podman, with runc, runs it;
/// dnsmasq plays the cluster DNS behind the DNS proxy and dig asks it).
const APT_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    "iproute2",
    "iptables",
    "curl",
    "tcpdump",
    "openssl",
    "procps",
    "prometheus",
    "buildah",
    "podman",
    "runc",
    "python3-grpcio",
    "dnsmasq-base",
    "bind9-dnsutils",
    "chromium",
];
/// Python modules the tests import (a real gRPC client: grpcio).
const REQUIRED_PYTHON_MODULES: &[&str] = &["grpc"];
/// Commands whose absence means the apt step must run.
const REQUIRED_COMMANDS: &[&str] = &[
    "ip",
    "iptables",
    "curl",
    "tcpdump",
    "openssl",
    "sysctl",
    "prometheus",
    "promtool",
    "buildah",
    "podman",
    "runc",
    "dnsmasq",
    "dig",
    "chromium",
];
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";

/// The dated nightly that builds the kernel programs, pinned in
/// mesh-ebpf/rust-toolchain.toml so that its LLVM matches bpf-linker's.
pub fn ebpf_toolchain() -> &'static str {
    include_str!("../../mesh-ebpf/rust-toolchain.toml")
        .lines()
        .find_map(|l| l.strip_prefix("channel = \""))
        .and_then(|rest| rest.strip_suffix('"'))
        .expect("mesh-ebpf/rust-toolchain.toml names its channel")
}

fn step(n: usize, total: usize, what: &str) {
    println!("[setup {n}/{total}] {what}");
}

fn sh(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

fn apt_needed() -> bool {
    !Path::new(LLVM_PREFIX).join("bin/llvm-config").exists()
        || REQUIRED_COMMANDS.iter().any(|c| !have(c))
        || REQUIRED_PYTHON_MODULES.iter().any(|m| !python_has(m))
}

/// Whether Debian's Python (where apt puts python3-* modules, whatever `python3` is
/// first on PATH) imports `module`.
fn python_has(module: &str) -> bool {
    Command::new("/usr/bin/python3")
        .args(["-c", &format!("import {module}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn bpf_linker_installed() -> bool {
    have("bpf-linker") || home_cargo_bin("bpf-linker").is_some_and(|p| p.exists())
}

fn home_cargo_bin(name: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("CARGO_HOME")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo")))
        .map(|d| d.join("bin").join(name))
}

fn rust_src_installed() -> bool {
    Command::new("rustup")
        .args(["component", "list", "--installed", "--toolchain", ebpf_toolchain()])
        .output()
        .map(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).lines().any(|l| l.starts_with("rust-src")))
        .unwrap_or(false)
}

/// Helm's library as the `helm-python-sdk` wheel bundles it: the chart is linted and
/// rendered by real Helm in the tests, with no helm binary to download.
const HELM_SDK: &str = "helm-python-sdk==0.2.2";

/// The venv the Helm library is installed in (`MESH_HELM_PYTHON` points the tests at
/// another).
pub fn helm_venv() -> std::path::PathBuf {
    crate::root().join("target/tools/helm")
}

fn helm_installed() -> bool {
    Command::new(helm_venv().join("bin/python"))
        .args(["-c", "import helm_python"])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// True when nothing is missing (kubectl is asked for, not required: see [`run`]).
pub fn complete() -> bool {
    !apt_needed() && bpf_linker_installed() && rust_src_installed() && helm_installed()
}

/// Runs setup only if something is missing.
pub fn ensure() -> anyhow::Result<()> {
    if complete() { Ok(()) } else { run() }
}

/// Installs everything missing; idempotent.
pub fn run() -> anyhow::Result<()> {
    let total = 5;
    step(
        1,
        total,
        "system packages (LLVM 22 for bpf-linker, iproute2, iptables, curl, tcpdump, openssl, prometheus, buildah, podman, dnsmasq, dig, chromium)",
    );
    if apt_needed() {
        apt_install(APT_PACKAGES)?;
    } else {
        println!("  already installed");
    }
    step(2, total, &format!("{} with rust-src (for the kernel programs)", ebpf_toolchain()));
    if rust_src_installed() {
        println!("  already installed");
    } else {
        sh(Command::new("rustup").args([
            "toolchain",
            "install",
            ebpf_toolchain(),
            "--profile",
            "minimal",
            "--component",
            "rust-src",
        ]))?;
    }
    step(3, total, "bpf-linker (built against LLVM 22)");
    if bpf_linker_installed() {
        println!("  already installed");
    } else {
        sh(Command::new("cargo")
            .args(["install", "--locked", "bpf-linker", "--no-default-features", "--features", "llvm-22"])
            .env("LLVM_PREFIX", LLVM_PREFIX))?;
    }
    step(4, total, &format!("Helm's library ({HELM_SDK}) in {}", helm_venv().display()));
    if helm_installed() {
        println!("  already installed");
    } else {
        sh(Command::new("python3").arg("-m").arg("venv").arg(helm_venv()))?;
        sh(Command::new(helm_venv().join("bin/pip")).args(["install", "-q", HELM_SDK]))?;
    }
    // kubectl comes from the google-cloud-cli apt repository where one is configured;
    // without it the kustomize test says it skipped.
    step(5, total, "kubectl (for kubectl kustomize in the tests)");
    if have("kubectl") {
        println!("  already installed");
    } else if let Err(e) = apt_install(&["kubectl"]) {
        println!("  not installed ({e:#}); the kustomize test will skip and say so");
    }
    println!("[setup] done");
    Ok(())
}

fn apt_install(packages: &[&str]) -> anyhow::Result<()> {
    sh(Command::new("apt-get").arg("update").arg("-q"))?;
    sh(Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(packages)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

/// The benchmark's load generator: oha (fixed request rate with coordinated-omission
/// correction, JSON output), pinned so figures stay comparable between runs.
const OHA_VERSION: &str = "1.16.0";
/// Debian packages the benchmark needs: the throughput tool and the peer proxy.
const BENCH_APT_PACKAGES: &[&str] = &["iperf3", "haproxy"];

/// Path of a command, from PATH or cargo's bin directory.
pub fn command_path(name: &str) -> Option<std::path::PathBuf> {
    if let Some(paths) = std::env::var_os("PATH")
        && let Some(found) = std::env::split_paths(&paths).map(|d| d.join(name)).find(|p| p.is_file())
    {
        return Some(found);
    }
    home_cargo_bin(name).filter(|p| p.is_file())
}

/// Installs what `cargo xtask bench` needs beyond the build: iperf3, HAProxy, oha.
pub fn ensure_bench_tools() -> anyhow::Result<()> {
    ensure()?;
    if ["iperf3", "haproxy"].iter().any(|c| command_path(c).is_none()) {
        println!("[setup] benchmark tools: iperf3, haproxy");
        apt_install(BENCH_APT_PACKAGES)?;
    }
    if command_path("oha").is_none() {
        println!("[setup] benchmark load generator: oha {OHA_VERSION} (cargo install, a few minutes once)");
        sh(Command::new("cargo").args(["install", "--locked", "oha", "--version", OHA_VERSION]))?;
    }
    Ok(())
}

//! Running system commands with errors that say what failed.

use std::process::{Command, Output, Stdio};

use anyhow::{Context as _, bail};

/// Runs `args[0]` with the rest as arguments; fails with its stderr on a non-zero exit.
pub fn run(args: &[&str]) -> anyhow::Result<String> {
    let out = output(args)?;
    if !out.status.success() {
        bail!("`{}` failed ({}): {}", args.join(" "), out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs a command and returns its output whatever the exit status.
pub fn output(args: &[&str]) -> anyhow::Result<Output> {
    Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {}", args[0]))
}

/// Runs a command, ignoring failure (cleanup paths, where "already gone" is fine).
pub fn run_quiet(args: &[&str]) {
    let _ = output(args);
}

/// Where `name` is on PATH.
pub fn which(name: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(name)).find(|p| p.is_file())
}

/// True when `name` is on PATH.
pub fn have(name: &str) -> bool {
    which(name).is_some()
}

/// The cgroup v2 mount point from /proc/mounts.
pub fn cgroup2_root() -> anyhow::Result<std::path::PathBuf> {
    let mounts = std::fs::read_to_string("/proc/mounts")?;
    for line in mounts.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() > 2 && f[2] == "cgroup2" {
            return Ok(f[1].into());
        }
    }
    bail!("no cgroup2 mount in /proc/mounts: the lab needs cgroup v2")
}

/// Why this machine cannot run the lab, or None when it can.
pub fn lab_unsupported() -> Option<String> {
    if !nix_is_root() {
        return Some("not root".into());
    }
    if cgroup2_root().is_err() {
        return Some("cgroup v2 not mounted".into());
    }
    for tool in ["ip", "curl"] {
        if !have(tool) {
            return Some(format!("{tool} not installed (run cargo xtask setup)"));
        }
    }
    None
}

fn nix_is_root() -> bool {
    // /proc/self/status "Uid:" line: real, effective, ...
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("Uid:")).map(|l| l.split_whitespace().nth(2) == Some("0")))
        .unwrap_or(false)
}

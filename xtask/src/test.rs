//! `cargo xtask test`: unit tests, then the lab integration tests (root), cleaning up the
//! lab whatever the outcome.

use std::process::Command;

use anyhow::{Context as _, bail};
use mesh_tests::lab::{DEFAULT_STATE_DIR, Lab};

use crate::{build, root, setup};

pub fn run(extra: &[String]) -> anyhow::Result<()> {
    setup::ensure()?;
    if Lab::exists(DEFAULT_STATE_DIR.as_ref()) {
        println!("[test] a lab is up; the integration tests need its names, tearing it down first");
        crate::lab::down()?;
    }
    build::binaries(false)?;
    let mut cmd = Command::new("cargo");
    cmd.current_dir(root())
        .args(["test", "--workspace", "--exclude", "mesh-ebpf", "--"])
        .arg("--test-threads=1")
        .args(extra);
    // On a machine that can run the lab, a skipped lab test is a failure: a skip looks
    // like a pass otherwise.
    if mesh_tests::sys::lab_unsupported().is_none() {
        cmd.env("MESH_REQUIRE_LAB", "1");
    }
    let status = cmd.status().context("running cargo test");
    // Clean up even when tests failed or panicked half-way.
    if Lab::exists(DEFAULT_STATE_DIR.as_ref()) {
        println!("[test] removing the lab left by a failed test");
        let _ = crate::lab::down();
    }
    if !status?.success() {
        bail!("tests failed");
    }
    Ok(())
}

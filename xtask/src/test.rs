//! `cargo xtask test`: unit tests, then the lab integration tests (root), cleaning up the
//! lab whatever the outcome; then the agent image, a short fuzz run, one `bench --quick`
//! and a 30-s soak to prove those harnesses work end to end (on the debug build the
//! tests made: their figures are not judged).

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
    // The hostile-client suite's memory figures, for the log.
    if let Ok(report) = std::fs::read_to_string(root().join("target/hostile/peak-rss.txt")) {
        println!("[test] agent peak RSS per hostile case (target/hostile/peak-rss.txt):\n{report}");
    }
    if extra.is_empty() && mesh_tests::sys::lab_unsupported().is_none() {
        image_check()?;
        fuzz_smoke()?;
        bench_harness()?;
        soak_harness()?;
        churn_harness()?;
    }
    Ok(())
}

/// The agent image, built here (static binaries, `FROM scratch`) and run with podman:
/// the agent's `--version` and `meshctl check --pre` inside it. The test's image is
/// removed afterwards.
fn image_check() -> anyhow::Result<()> {
    const TAG: &str = "localhost/mesh-agent:xtask-test";
    if !mesh_tests::sys::have("podman") {
        bail!("podman is not installed (cargo xtask setup installs it): the image cannot be checked");
    }
    println!("[test] agent image: cargo xtask image --profile dev --check --tag {TAG}");
    let result = crate::image::run(Some(TAG.into()), "dev").and_then(|tag| crate::image::check(&tag));
    let _ = Command::new("podman").args(["rmi", "--force", TAG]).output();
    result
}

/// Every libFuzzer target for a few seconds from its seeds (`cargo xtask fuzz`): the
/// targets build and run, and nothing the seeds' neighbourhood holds crashes them. The
/// long runs are `cargo xtask fuzz --seconds N`.
fn fuzz_smoke() -> anyhow::Result<()> {
    println!("[test] fuzz targets: cargo xtask fuzz --seconds 10 --jobs 2");
    crate::fuzz::run(&crate::fuzz::FuzzArgs { seconds: 10, targets: Vec::new(), jobs: 2 })
}

/// `bench --quick` at 200 requests/s, into its own report file.
fn quick_bench_args() -> crate::bench::BenchArgs {
    crate::bench::BenchArgs {
        quick: true,
        rate: 200,
        duration: 2,
        rounds: 1,
        body: 1024,
        concurrency: 64,
        report: "target/bench/quick/report.json".into(),
        scale: false,
        soak: None,
        churn: None,
        render: false,
        // The tests built the debug binaries already; a release build would add
        // minutes to CI for figures nobody reads.
        dev_build: true,
    }
}

/// `bench --soak 30s` at 200 requests/s: the soak runs, samples and plots (its verdict
/// on RSS growth needs the long runs: `cargo xtask bench --soak 1h`).
fn soak_harness() -> anyhow::Result<()> {
    println!("[test] soak harness: cargo xtask bench --soak 30s --rate 200 --quick --dev-build");
    let args = quick_bench_args();
    let report = crate::bench::run_soak(&args, std::time::Duration::from_secs(30))?;
    println!(
        "soak: {} samples, {} requests, {} failed",
        report.samples.len(),
        report.ok + report.failed,
        report.failed
    );
    if report.samples.len() < 2 {
        bail!("the soak took {} samples in 30 s", report.samples.len());
    }
    Ok(())
}

/// `bench --churn 30s` at 200 new connections/s: the churn runs, samples and judges
/// (the figures that go into the docs need `cargo xtask bench --churn 10m`).
fn churn_harness() -> anyhow::Result<()> {
    println!("[test] churn harness: cargo xtask bench --churn 30s --rate 200 --quick --dev-build");
    let report = crate::bench::run_churn(&quick_bench_args(), std::time::Duration::from_secs(30))?;
    println!(
        "churn: {} windows, {} connections, {} failed",
        report.windows.len(),
        report.ok + report.failed,
        report.failed
    );
    Ok(())
}

/// `bench --quick` into its own report file (a full run's report.json stays), then
/// checks the report's shape: every scenario present, measured ones with figures.
fn bench_harness() -> anyhow::Result<()> {
    println!("[test] benchmark harness: cargo xtask bench --quick --dev-build");
    let args = quick_bench_args();
    let report = crate::bench::run(&args)?;
    let (passed, failed) = report.check_shape();
    println!("bench: {passed} passed, {} failed", failed.len());
    if !failed.is_empty() {
        bail!("benchmark report incomplete: {}", failed.join("; "));
    }
    Ok(())
}

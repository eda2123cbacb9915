//! `cargo xtask fuzz [--seconds N] [--target NAME]... [--jobs J]`: the libFuzzer targets
//! in `fuzz/` (cargo-fuzz, the pinned nightly), each for N seconds from its seed corpus,
//! with a summary in `target/fuzz/report.json`. Fails when any target finds a crash,
//! a panic, a hang or a leak past the memory limit; the input is kept under
//! `target/fuzz/artifacts/<target>/`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};

use crate::{root, setup};

/// The targets, in `fuzz/Cargo.toml` and `mesh_agent::fuzzing::TARGETS`.
pub const TARGETS: &[&str] =
    &["config_yaml", "http_request", "hbone_connect", "detection", "authz_path", "spiffe_uri", "http1_watch"];

/// The cargo-fuzz release this command installs when it is missing.
const CARGO_FUZZ: &str = "0.13.2";

/// `cargo xtask fuzz` arguments.
#[derive(clap::Args, Debug)]
pub struct FuzzArgs {
    /// Seconds of fuzzing per target.
    #[arg(long, default_value_t = 60)]
    pub seconds: u64,
    /// Only these targets (default: all).
    #[arg(long = "target")]
    pub targets: Vec<String>,
    /// Targets fuzzed at once (one core each).
    #[arg(long, default_value_t = 1)]
    pub jobs: usize,
}

fn fuzz_dir() -> PathBuf {
    root().join("target/fuzz")
}

/// What one target's run found.
struct Outcome {
    target: String,
    ok: bool,
    runs: u64,
    corpus: usize,
    coverage: Option<u64>,
    log: PathBuf,
}

pub fn run(args: &FuzzArgs) -> anyhow::Result<()> {
    let targets: Vec<&str> = if args.targets.is_empty() {
        TARGETS.to_vec()
    } else {
        for t in &args.targets {
            if !TARGETS.contains(&t.as_str()) {
                bail!("no fuzz target {t:?}; the targets are {}", TARGETS.join(", "));
            }
        }
        TARGETS.iter().copied().filter(|t| args.targets.iter().any(|a| a == t)).collect()
    };
    setup::ensure()?;
    ensure_cargo_fuzz()?;
    println!(
        "[fuzz] building {} target(s) with {} (cargo fuzz, no sanitizer, debug assertions)",
        targets.len(),
        setup::ebpf_toolchain()
    );
    let status = Command::new("cargo")
        .current_dir(root())
        .arg(format!("+{}", setup::ebpf_toolchain()))
        .args(["fuzz", "build", "--sanitizer", "none", "--debug-assertions"])
        .env("CARGO_TARGET_DIR", fuzz_dir())
        .status()
        .context("running cargo fuzz build")?;
    if !status.success() {
        bail!("cargo fuzz build failed: {status}");
    }
    let mut outcomes = Vec::new();
    for batch in targets.chunks(args.jobs.max(1)) {
        let running: Vec<_> = batch.iter().map(|t| start(t, args.seconds)).collect::<anyhow::Result<_>>()?;
        for (target, mut child, log) in running {
            let status = child.wait().with_context(|| format!("waiting for fuzz target {target}"))?;
            outcomes.push(outcome(target, status.success(), &log));
        }
    }
    report(&outcomes, args.seconds)?;
    let failed: Vec<&str> = outcomes.iter().filter(|o| !o.ok).map(|o| o.target.as_str()).collect();
    println!("fuzz: {} passed, {} failed", outcomes.len() - failed.len(), failed.len());
    if !failed.is_empty() {
        bail!("fuzzing found failures in {} (inputs under target/fuzz/artifacts/)", failed.join(", "));
    }
    Ok(())
}

fn ensure_cargo_fuzz() -> anyhow::Result<()> {
    let have = Command::new("cargo").args(["fuzz", "--version"]).output().is_ok_and(|o| o.status.success());
    if have {
        return Ok(());
    }
    println!("[fuzz] installing cargo-fuzz {CARGO_FUZZ} from crates.io");
    let status = Command::new("cargo")
        .args(["install", "cargo-fuzz", "--locked", "--version", CARGO_FUZZ])
        .status()
        .context("running cargo install cargo-fuzz")?;
    if !status.success() {
        bail!("cargo install cargo-fuzz failed: {status}");
    }
    Ok(())
}

/// The seeds of `target` copied into its working corpus (which keeps what earlier runs
/// found): `fuzz/seeds/<target>/`, and for the config target every mesh config in
/// examples/.
fn corpus(target: &str) -> anyhow::Result<PathBuf> {
    let dir = fuzz_dir().join("corpus").join(target);
    std::fs::create_dir_all(&dir)?;
    let mut sources = vec![root().join("fuzz/seeds").join(target)];
    if target == "config_yaml" {
        sources.extend(["seed", "lab", "gateway-api"].iter().map(|d| root().join("examples").join(d)));
    }
    for source in sources.iter().filter(|s| s.is_dir()) {
        for entry in std::fs::read_dir(source)? {
            let path = entry?.path();
            if path.is_file() {
                let name = format!("seed-{}", path.file_name().unwrap_or_default().to_string_lossy());
                std::fs::copy(&path, dir.join(name))?;
            }
        }
    }
    Ok(dir)
}

fn start(target: &str, seconds: u64) -> anyhow::Result<(&str, std::process::Child, PathBuf)> {
    let corpus = corpus(target)?;
    let artifacts = fuzz_dir().join("artifacts").join(target);
    std::fs::create_dir_all(&artifacts)?;
    let log = fuzz_dir().join(format!("{target}.log"));
    let binary = fuzz_dir().join("x86_64-unknown-linux-gnu/release").join(target);
    // Config files may be large; every other input is one request, stream or name.
    let max_len = if target == "config_yaml" { 64 * 1024 } else { 16 * 1024 };
    println!("[fuzz] {target}: {seconds} s from {} (log {})", corpus.display(), log.display());
    let out = std::fs::File::create(&log)?;
    let child = Command::new(&binary)
        .arg(&corpus)
        .arg(format!("-max_total_time={seconds}"))
        .arg(format!("-max_len={max_len}"))
        // One input past 10 s or 2 GiB is a finding (a hang, or allocation without bound).
        .arg("-timeout=10")
        .arg("-rss_limit_mb=2048")
        .arg("-print_final_stats=1")
        .arg(format!("-artifact_prefix={}/", artifacts.display()))
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    Ok((target, child, log))
}

fn outcome(target: &str, ok: bool, log: &Path) -> Outcome {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let stat = |name: &str| {
        text.lines()
            .rev()
            .find_map(|l| l.strip_prefix(&format!("stat::{name}:")).and_then(|v| v.trim().parse::<u64>().ok()))
    };
    let coverage = text
        .lines()
        .rev()
        .find_map(|l| l.split_once(" cov: ").and_then(|(_, rest)| rest.split_whitespace().next()?.parse().ok()));
    let corpus = std::fs::read_dir(fuzz_dir().join("corpus").join(target)).map(|d| d.count()).unwrap_or(0);
    if !ok {
        let tail: Vec<&str> = text.lines().rev().take(30).collect::<Vec<_>>().into_iter().rev().collect();
        eprintln!("[fuzz] {target} FAILED; the end of {}:\n{}", log.display(), tail.join("\n"));
    }
    Outcome {
        target: target.to_string(),
        ok,
        runs: stat("number_of_executed_units").unwrap_or(0),
        corpus,
        coverage,
        log: log.to_path_buf(),
    }
}

fn report(outcomes: &[Outcome], seconds: u64) -> anyhow::Result<()> {
    println!("[fuzz] target          result  runs        runs/s   coverage  corpus");
    let mut rows = Vec::new();
    for o in outcomes {
        let rate = o.runs / seconds.max(1);
        println!(
            "[fuzz] {:<15} {:<7} {:<11} {:<8} {:<9} {}",
            o.target,
            if o.ok { "ok" } else { "FAILED" },
            o.runs,
            rate,
            o.coverage.map_or("-".into(), |c| c.to_string()),
            o.corpus
        );
        rows.push(json!({
            "target": o.target,
            "ok": o.ok,
            "seconds": seconds,
            "runs": o.runs,
            "runs_per_second": rate,
            "coverage": o.coverage,
            "corpus": o.corpus,
            "log": o.log.display().to_string(),
        }));
    }
    let report: Value = json!({ "seconds_per_target": seconds, "targets": rows });
    std::fs::write(fuzz_dir().join("report.json"), serde_json::to_string_pretty(&report)?)?;
    println!("[fuzz] summary: target/fuzz/report.json");
    Ok(())
}

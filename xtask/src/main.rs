//! `cargo xtask`: every project task, one module per command.
#![deny(unsafe_code)]

mod bench;
mod build;
mod demo;
mod fuzz;
mod image;
mod kind;
mod lab;
mod setup;
mod test;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Project tasks for the mesh")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what a fresh machine lacks: apt packages, bpf-linker, the pinned nightly with rust-src.
    Setup,
    /// Build the kernel programs (mesh-ebpf) with the pinned nightly and bpf-linker.
    BuildEbpf,
    /// Build the agent, the CLI and the test app.
    Build {
        /// Optimised build.
        #[arg(long)]
        release: bool,
    },
    /// Unit tests, then the privileged lab integration tests; cleans up on failure too.
    Test {
        /// Extra arguments for the test binaries (e.g. a test name filter).
        args: Vec<String>,
    },
    /// The network-namespace lab.
    Lab {
        #[command(subcommand)]
        cmd: lab::LabCmd,
    },
    /// Set up, build, bring the lab up, send real traffic, show it is mTLS, leave it up.
    Demo {
        /// 2: the two-cluster part instead (examples/multicluster): cross-cluster calls
        /// through the east-west gateways, locality failover and back.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=2))]
        clusters: u8,
    },
    /// Regenerate deploy/ (profile manifests, Helm chart, kustomize) with meshctl.
    Manifests,
    /// Build the agent image here: static binaries built on the host, `FROM scratch`,
    /// with buildah, podman or docker (no registry needed).
    Image {
        /// Image reference (default: the one the manifests use).
        #[arg(long)]
        tag: Option<String>,
        /// Cargo profile of the binaries.
        #[arg(long, default_value = "release")]
        profile: String,
        /// Then run it with podman: `--version` and `meshctl check --pre`.
        #[arg(long)]
        check: bool,
    },
    /// The lab's scenarios on a kind cluster; says what is missing where it cannot run.
    KindE2e,
    /// Benchmark direct vs mesh vs a HAProxy sidecar peer in the lab; writes
    /// target/bench/report.json and (full runs) docs/benchmarks.md.
    Bench(bench::BenchArgs),
    /// Measure which functions the release agent touches (start-up and the bench's
    /// traffic, in the lab) and write mesh-agent/link-order.txt, the order the release
    /// link lays them out in.
    LinkOrder,
    /// The libFuzzer targets in fuzz/ (parsers of hostile input), each for a while from
    /// its seeds; writes target/fuzz/report.json, fails on any crash, hang or leak.
    Fuzz(fuzz::FuzzArgs),
}

/// The workspace root (xtask's parent directory).
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask is inside the workspace").to_path_buf()
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Manifests => build::manifests(),
        Cmd::Image { tag, profile, check } => {
            let tag = image::run(tag, &profile)?;
            if check { image::check(&tag) } else { Ok(()) }
        }
        Cmd::KindE2e => kind::e2e(),
        Cmd::LinkOrder => bench::link_order::run(),
        Cmd::Setup => setup::run(),
        Cmd::BuildEbpf => {
            setup::ensure()?;
            build::ebpf()
        }
        Cmd::Build { release } => {
            setup::ensure()?;
            build::binaries(release).map(|_| ())
        }
        Cmd::Test { args } => test::run(&args),
        Cmd::Lab { cmd } => lab::run(cmd),
        Cmd::Demo { clusters: 2 } => demo::run_two_clusters(),
        Cmd::Demo { .. } => demo::run(),
        Cmd::Bench(args) if args.render => bench::render(&args).map(|_| ()),
        Cmd::Bench(args) if args.scale => bench::run_scale(&args).map(|_| ()),
        Cmd::Bench(args) => match (args.soak, args.churn) {
            (Some(duration), _) => bench::run_soak(&args, duration).map(|_| ()),
            (None, Some(duration)) => bench::run_churn(&args, duration).map(|_| ()),
            (None, None) => bench::run(&args).map(|_| ()),
        },
        Cmd::Fuzz(args) => fuzz::run(&args),
    }
}

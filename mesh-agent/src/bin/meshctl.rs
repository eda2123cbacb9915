//! `meshctl`: install, check, analyze and inspect the mesh. Flags only; the work is in
//! `mesh_agent::cli`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory as _, Parser, Subcommand};
use mesh_agent::cli::analyze::{self, Level};
use mesh_agent::cli::{Style, check};
use mesh_agent::state::MeshScope;

/// Exit status when analysis finds errors (what `istioctl analyze` uses).
const EXIT_ANALYSIS_ERRORS: u8 = 79;

#[derive(Parser)]
#[command(name = "meshctl", version, about = "Install, check and inspect the eBPF sidecarless mesh")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Check that a node can run the mesh (--pre) or that an install is healthy.
    Check {
        /// Pre-flight checks of this node: kernel, BTF, cgroup v2, bpffs, capabilities,
        /// and loading the agent's programs through the verifier.
        #[arg(long)]
        pre: bool,
        /// Skip loading the programs (no root needed for the other checks).
        #[arg(long)]
        no_load: bool,
    },
    /// Analyze configuration the way the agent validates it, plus checks across objects.
    Analyze {
        /// Files or directories of YAML to analyze.
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<PathBuf>,
        /// Trust domain of the mesh.
        #[arg(long, default_value = "cluster.local")]
        trust_domain: String,
        /// Namespace whose policies apply mesh-wide.
        #[arg(long, default_value = "istio-system")]
        root_namespace: String,
    },
    /// Print this binary's version.
    Version,
    /// Print shell completions.
    Completion {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let style = Style::stdout();
    match cli.cmd {
        Cmd::Check { pre: true, no_load } => preflight(style, !no_load),
        Cmd::Check { pre: false, .. } => {
            eprintln!(
                "meshctl check without --pre checks an installed mesh in a cluster; use `meshctl check --pre` on a node"
            );
            ExitCode::from(2)
        }
        Cmd::Analyze { files, trust_domain, root_namespace } => {
            let mesh = MeshScope { trust_domain, aliases: Vec::new(), root_namespace };
            run_analyze(style, &files, &mesh)
        }
        Cmd::Version => {
            println!("meshctl version {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Cmd::Completion { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "meshctl", &mut std::io::stdout());
            ExitCode::SUCCESS
        }
    }
}

fn preflight(style: Style, load: bool) -> ExitCode {
    let findings = check::preflight(&check::Host::default(), load);
    for f in &findings {
        match &f.fix {
            None => println!("{} {}: {}", style.ok("\u{2714}"), f.what, f.detail),
            Some(fix) => println!("{} {}: {}\n    fix: {fix}", style.bad("\u{2718}"), f.what, f.detail),
        }
    }
    if findings.iter().all(check::Finding::ok) {
        println!("{}", style.ok("All pre-flight checks passed: this node can run the mesh agent."));
        ExitCode::SUCCESS
    } else {
        let failed = findings.iter().filter(|f| !f.ok()).count();
        println!("{}", style.bad(&format!("{failed} pre-flight check(s) failed.")));
        ExitCode::FAILURE
    }
}

fn run_analyze(style: Style, inputs: &[PathBuf], mesh: &MeshScope) -> ExitCode {
    let files = match analyze::expand(inputs) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("meshctl analyze: {e}");
            return ExitCode::from(2);
        }
    };
    let found = analyze::analyze(&files, mesh);
    if found.is_empty() {
        println!("{}", style.ok(&analyze::clean_message(&files)));
        return ExitCode::SUCCESS;
    }
    for d in &found {
        let line = d.to_string();
        println!(
            "{}",
            match d.level {
                Level::Error => style.bad(&line),
                Level::Warning => style.warn(&line),
                Level::Info => line,
            }
        );
    }
    if found.iter().any(|d| d.level == Level::Error) {
        println!("Error: Analyzers found issues when analyzing {} file(s).", files.len());
        ExitCode::from(EXIT_ANALYSIS_ERRORS)
    } else {
        ExitCode::SUCCESS
    }
}

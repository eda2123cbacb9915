//! `meshctl`: install, check, analyze and inspect the mesh. Flags only; the work is in
//! `mesh_agent::cli`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory as _, Parser, Subcommand};
use mesh_agent::cli::analyze::{self, Level};
use mesh_agent::cli::{Style, check, deploy, manifest};
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
    /// Manifests of an install.
    Manifest {
        #[command(subcommand)]
        cmd: ManifestCmd,
    },
    /// Install the mesh into the current cluster (`--dry-run`: print what would be applied).
    Install {
        /// `profile=minimal|default|demo` or a value, e.g.
        /// `values.global.proxy.resources.requests.cpu=100m`.
        #[arg(long = "set")]
        sets: Vec<String>,
        /// Do not ask for confirmation.
        #[arg(short = 'y', long = "skip-confirmation")]
        yes: bool,
        /// Print the objects instead of applying them.
        #[arg(long)]
        dry_run: bool,
    },
    /// Remove what `install` applied (`--dry-run`: list it).
    Uninstall {
        /// Do not ask for confirmation.
        #[arg(short = 'y', long = "skip-confirmation")]
        yes: bool,
        /// List the objects instead of deleting them.
        #[arg(long)]
        dry_run: bool,
    },
    /// Print this binary's version.
    Version,
    /// Print shell completions.
    Completion {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
}

#[derive(Subcommand)]
enum ManifestCmd {
    /// Print the manifests for a profile and values, as `install` would apply them.
    Generate {
        /// `profile=minimal|default|demo` or a value (see `meshctl install --help`).
        #[arg(long = "set")]
        sets: Vec<String>,
        /// Instead, write the whole deploy/ tree (profiles, Helm chart, kustomize) here.
        #[arg(long)]
        deploy_dir: Option<PathBuf>,
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
        Cmd::Manifest { cmd: ManifestCmd::Generate { sets, deploy_dir: None } } => match manifest_for(&sets) {
            Ok(yaml) => {
                print!("{yaml}");
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Cmd::Manifest { cmd: ManifestCmd::Generate { deploy_dir: Some(dir), .. } } => write_deploy(&dir),
        Cmd::Install { sets, yes: _, dry_run } => {
            let yaml = match manifest_for(&sets) {
                Ok(y) => y,
                Err(code) => return code,
            };
            if dry_run {
                print!("{yaml}");
                let n = yaml.matches("\n---\n").count() + usize::from(yaml.starts_with("---"));
                eprintln!("dry run: {n} objects would be applied");
                return ExitCode::SUCCESS;
            }
            no_cluster("install")
        }
        Cmd::Uninstall { yes: _, dry_run } => {
            if dry_run {
                // Deleted in reverse apply order: the DaemonSet before its RBAC, the
                // namespace last.
                let objects = manifest::objects(&manifest::Values::for_profile(manifest::Profile::Default));
                for o in objects.iter().rev() {
                    let kind = o["kind"].as_str().unwrap_or("?");
                    let name = o["metadata"]["name"].as_str().unwrap_or("?");
                    match o["metadata"]["namespace"].as_str() {
                        Some(ns) => println!("would delete {kind} {ns}/{name}"),
                        None => println!("would delete {kind} {name}"),
                    }
                }
                return ExitCode::SUCCESS;
            }
            no_cluster("uninstall")
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

fn manifest_for(sets: &[String]) -> Result<String, ExitCode> {
    let values = manifest::Values::from_sets(sets).map_err(|e| {
        eprintln!("meshctl: {e}");
        ExitCode::from(2)
    })?;
    manifest::render(&values).map_err(|e| {
        eprintln!("meshctl: rendering manifests: {e}");
        ExitCode::FAILURE
    })
}

fn write_deploy(dir: &std::path::Path) -> ExitCode {
    for (rel, text) in deploy::files() {
        let path = dir.join(rel);
        let written = path.parent().map_or(Ok(()), std::fs::create_dir_all).and_then(|()| std::fs::write(&path, text));
        if let Err(e) = written {
            eprintln!("meshctl: writing {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
        println!("wrote {}", path.display());
    }
    ExitCode::SUCCESS
}

/// Applying needs the Kubernetes API: say which cluster was looked for and how to get
/// the manifests without one.
fn no_cluster(what: &str) -> ExitCode {
    let kubeconfig = std::env::var("KUBECONFIG").unwrap_or_else(|_| "~/.kube/config".into());
    eprintln!(
        "meshctl {what}: no Kubernetes cluster configured ({kubeconfig}, or in-cluster service account); \
         use --dry-run to print the manifests, or `meshctl manifest generate | kubectl apply -f -`"
    );
    ExitCode::FAILURE
}

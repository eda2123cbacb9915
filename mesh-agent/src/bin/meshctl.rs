//! `meshctl`: install, check, analyze and inspect the mesh. Flags only; the work is in
//! `mesh_agent::cli`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory as _, Parser, Subcommand};
use mesh_agent::cli::analyze::{self, Level};
use mesh_agent::cli::cluster::{self, Action, SyncState};
use mesh_agent::cli::{Style, check, deploy, manifest, remote_secret};
use mesh_agent::state::MeshScope;

/// Exit status when analysis finds errors (what `istioctl analyze` uses).
const EXIT_ANALYSIS_ERRORS: u8 = 79;

#[derive(Parser)]
#[command(name = "meshctl", version, about = "Install, check and inspect the eBPF sidecarless mesh")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
    /// The kubeconfig context of the cluster the command acts on (default: the current
    /// one), as istioctl's and kubectl's `--context`.
    #[arg(long, global = true)]
    context: Option<String>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Check that an install is healthy (`verify-install`), or with --pre that a node
    /// (or, with --cluster, a cluster) can run the mesh.
    #[command(visible_alias = "verify-install")]
    Check {
        /// Pre-flight checks of this node: kernel, BTF, cgroup v2, bpffs, capabilities,
        /// and loading the agent's programs through the verifier.
        #[arg(long)]
        pre: bool,
        /// With --pre: check the cluster instead (API version, every node's kernel).
        #[arg(long, requires = "pre")]
        cluster: bool,
        /// Skip loading the programs (no root needed for the other checks).
        #[arg(long)]
        no_load: bool,
        /// Namespace of the install.
        #[arg(short = 'i', long = "istio-namespace")]
        namespace: Option<String>,
        /// The values it was installed with (`profile=minimal`: CRDs come from Istio).
        #[arg(long = "set")]
        sets: Vec<String>,
        /// IstioOperator files (`install.istio.io/v1alpha1`): `spec.profile`, `spec.values`,
        /// `spec.meshConfig`, ... as `--set` names them; `--set` overrides them.
        #[arg(short = 'f', long = "filename")]
        files: Vec<PathBuf>,
    },
    /// Analyze configuration the way the agent validates it, plus checks across objects.
    Analyze {
        /// Files or directories of YAML to analyze.
        #[arg(short = 'f', long = "filename", required_unless_present = "cluster")]
        files: Vec<PathBuf>,
        /// Analyze what is in the current cluster instead.
        #[arg(long, conflicts_with = "files")]
        cluster: bool,
        /// Trust domain of the mesh.
        #[arg(long, default_value = "cluster.local")]
        trust_domain: String,
        /// Namespace whose policies apply mesh-wide.
        #[arg(long, default_value = "istio-system")]
        root_namespace: String,
    },
    /// Enroll workloads: reads them (YAML or JSON, `-` for standard input) and writes
    /// them back with their pod templates annotated `linkerd.io/inject: enabled`, as
    /// `linkerd inject -` (no container is added: the node's agent captures the pods).
    Inject {
        /// Files of workloads, `-` for standard input.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// The mesh's other clusters each agent follows (from the remote secrets), and
    /// whether it is synced with them, as `istioctl remote-clusters`.
    RemoteClusters {
        /// Namespace of the install.
        #[arg(short = 'i', long = "istio-namespace", default_value = "istio-system")]
        namespace: String,
    },
    /// Experimental commands, as istioctl's `x`.
    X {
        #[command(subcommand)]
        cmd: XCmd,
    },
    /// Manifests of an install.
    Manifest {
        #[command(subcommand)]
        cmd: ManifestCmd,
    },
    /// Install the mesh into the current cluster (`--dry-run`: print what would be
    /// applied). Without `-y` and with standard output not a terminal, print the
    /// manifests instead, for `meshctl install | kubectl apply -f -` (Linkerd's way).
    Install {
        /// Only the mesh's CustomResourceDefinitions (`meshctl install --crds |
        /// kubectl apply -f -`, then `meshctl install`), as `linkerd install --crds`.
        #[arg(long)]
        crds: bool,
        /// `profile=minimal|default|demo` or a value, e.g.
        /// `values.global.proxy.resources.requests.cpu=100m`.
        #[arg(long = "set")]
        sets: Vec<String>,
        /// IstioOperator files (`install.istio.io/v1alpha1`): `spec.profile`, `spec.values`,
        /// `spec.meshConfig`, ... as `--set` names them; `--set` overrides them.
        #[arg(short = 'f', long = "filename")]
        files: Vec<PathBuf>,
        /// Do not ask for confirmation.
        #[arg(short = 'y', long = "skip-confirmation")]
        yes: bool,
        /// Print the objects instead of applying them.
        #[arg(long)]
        dry_run: bool,
    },
    /// Remove what `install` applied (`--dry-run`: list it).
    Uninstall {
        /// The values it was installed with.
        #[arg(long = "set")]
        sets: Vec<String>,
        /// IstioOperator files (`install.istio.io/v1alpha1`): `spec.profile`, `spec.values`,
        /// `spec.meshConfig`, ... as `--set` names them; `--set` overrides them.
        #[arg(short = 'f', long = "filename")]
        files: Vec<PathBuf>,
        /// Also remove the mesh's CRDs (and every resource of them) and its generated CA.
        #[arg(long)]
        purge: bool,
        /// Do not ask for confirmation.
        #[arg(short = 'y', long = "skip-confirmation")]
        yes: bool,
        /// List the objects instead of deleting them.
        #[arg(long)]
        dry_run: bool,
    },
    /// Each agent's config version and digest, and whether it matches the others.
    ProxyStatus {
        /// Namespace of the install.
        #[arg(short = 'i', long = "istio-namespace", default_value = "istio-system")]
        namespace: String,
    },
    /// What this node's agent holds: workloads, services (clusters), endpoints, routes,
    /// certificates (secrets), policies. Reads the agent's admin address, so run it on
    /// the node (or in the agent's pod), or give a saved `/config_dump` with --file.
    ProxyConfig {
        /// Which section.
        #[arg(value_enum, default_value = "all")]
        section: mesh_agent::cli::proxy_config::Section,
        /// The agent's admin address.
        #[arg(long, default_value = "127.0.0.1:15000")]
        admin: std::net::SocketAddr,
        /// A saved config dump instead of asking the agent.
        #[arg(long)]
        file: Option<PathBuf>,
        /// `table` or `json`.
        #[arg(short = 'o', long, default_value = "table")]
        output: String,
    },
    /// Open a dashboard on a local port, as `istioctl dashboard` does: the mesh's own
    /// page (default; reads the agents at --admin), or an addon's UI (kiali, jaeger,
    /// prometheus, grafana from deploy/addons) port-forwarded through the API server.
    Dashboard {
        /// Which dashboard.
        #[arg(value_enum, default_value = "mesh")]
        target: mesh_agent::cli::dashboard::Target,
        /// Agents' admin addresses whose data the mesh page merges; repeat for several
        /// (on a node, or after `kubectl port-forward` to each agent's 15000).
        #[arg(long = "admin", default_value = "127.0.0.1:15000")]
        admins: Vec<std::net::SocketAddr>,
        /// Local address to listen on.
        #[arg(long, default_value = "localhost")]
        address: String,
        /// Local port (default: the dashboard's own, as istioctl: kiali 20001, jaeger
        /// 16686, prometheus 9090, grafana 3000, mesh 15100).
        #[arg(short = 'p', long)]
        port: Option<u16>,
        /// Open a browser on it (`--browser=false` only prints the address).
        #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
        browser: bool,
        /// Namespace of the addons.
        #[arg(short = 'n', long = "namespace", default_value = "istio-system")]
        namespace: String,
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
enum XCmd {
    /// Print a Secret that lets another cluster's agents read this one (a kubeconfig
    /// for the install's read-only `mesh-reader` account), for
    /// `| kubectl apply -f - --context=OTHER`.
    CreateRemoteSecret {
        /// The cluster's name as the other clusters know it (its
        /// `values.global.multiCluster.clusterName`; default: the context's name).
        #[arg(long)]
        name: Option<String>,
        /// Namespace of the install.
        #[arg(short = 'i', long = "istio-namespace", default_value = "istio-system")]
        namespace: String,
    },
}

#[derive(Subcommand)]
enum ManifestCmd {
    /// Print the manifests for a profile and values, as `install` would apply them.
    Generate {
        /// `profile=minimal|default|demo` or a value (see `meshctl install --help`).
        #[arg(long = "set")]
        sets: Vec<String>,
        /// IstioOperator files (`install.istio.io/v1alpha1`): `spec.profile`, `spec.values`,
        /// `spec.meshConfig`, ... as `--set` names them; `--set` overrides them.
        #[arg(short = 'f', long = "filename")]
        files: Vec<PathBuf>,
        /// Instead, write the whole deploy/ tree (profiles, Helm chart, kustomize) here.
        #[arg(long)]
        deploy_dir: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let style = Style::stdout();
    let context = cli.context;
    match cli.cmd {
        Cmd::Check { pre: true, cluster: false, no_load, .. } => {
            report(style, &check::preflight(&check::Host::default(), !no_load), PREFLIGHT_OK)
        }
        Cmd::Check { pre: true, cluster: true, .. } => on_cluster(context.as_deref(), |c| async move {
            Ok(report(style, &cluster::preflight(&c).await, CLUSTER_PREFLIGHT_OK))
        }),
        Cmd::Check { pre: false, namespace, sets, files, .. } => {
            let values = match values_for(&sets, &files, namespace) {
                Ok(v) => v,
                Err(code) => return code,
            };
            on_cluster(context.as_deref(), |c| async move {
                Ok(report(style, &cluster::verify(&c, &values).await, VERIFY_OK))
            })
        }
        Cmd::Analyze { cluster: true, trust_domain, root_namespace, .. } => {
            let mesh = MeshScope { root_namespace, ..MeshScope::new(&trust_domain) };
            on_cluster(context.as_deref(), |c| async move {
                let found = cluster::analyze_cluster(&c, &mesh).await?;
                Ok(print_diagnostics(style, &found, "the cluster", || {
                    style.ok("\u{2714} No validation issues found when analyzing the cluster.")
                }))
            })
        }
        Cmd::Analyze { files, trust_domain, root_namespace, .. } => {
            let mesh = MeshScope { root_namespace, ..MeshScope::new(&trust_domain) };
            run_analyze(style, &files, &mesh)
        }
        Cmd::ProxyConfig { section, admin, file, output } => run_proxy_config(section, admin, file, &output),
        Cmd::Dashboard { target, admins, address, port, browser, namespace } => run_dashboard(
            target,
            admins,
            &address,
            port.unwrap_or_else(|| target.default_port()),
            browser,
            &namespace,
            context.as_deref(),
        ),
        Cmd::ProxyStatus { namespace } => on_cluster(context.as_deref(), |c| async move {
            let rows = cluster::proxy_status(&c, &namespace).await?;
            if rows.is_empty() {
                eprintln!(
                    "meshctl proxy-status: no agent pods (app=mesh-agent) in {namespace}; is the mesh installed?"
                );
                return Ok(ExitCode::FAILURE);
            }
            println!(
                "{:<28} {:<20} {:<10} {:<18} {:<12} {:>8} {:>8}",
                "NAME", "NODE", "VERSION", "CONFIG", "STATUS", "ENROLLED", "REJECTED"
            );
            for r in &rows {
                let (version, digest, enrolled, rejected) = match &r.report {
                    Ok(s) => (
                        s.agent_version.clone(),
                        s.config_digest.clone(),
                        s.enrolled_pods.to_string(),
                        s.rejected_config.to_string(),
                    ),
                    Err(_) => ("-".into(), "-".into(), "-".into(), "-".into()),
                };
                let state = r.state.to_string();
                let state = if r.state == SyncState::Synced { style.ok(&state) } else { style.bad(&state) };
                println!(
                    "{:<28} {:<20} {:<10} {:<18} {:<12} {:>8} {:>8}",
                    r.pod, r.node, version, digest, state, enrolled, rejected
                );
                match &r.report {
                    Err(e) => println!("    {}", style.bad(&format!("could not ask it: {e}"))),
                    Ok(s) => {
                        for f in &s.failed_pods {
                            let line = format!("pod {} (uid {}) not captured: {}", f.pod, f.uid, f.reason);
                            println!("    {}", style.bad(&line));
                        }
                    }
                }
            }
            Ok(if rows.iter().all(|r| r.state == SyncState::Synced) { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }),
        Cmd::RemoteClusters { namespace } => on_cluster(context.as_deref(), |c| async move {
            let rows = cluster::proxy_status(&c, &namespace).await?;
            if rows.is_empty() {
                eprintln!(
                    "meshctl remote-clusters: no agent pods (app=mesh-agent) in {namespace}; is the mesh installed?"
                );
                return Ok(ExitCode::FAILURE);
            }
            println!(
                "{:<28} {:<20} {:<20} {:<12} {:>8} {:>8}",
                "AGENT", "NODE", "CLUSTER", "STATUS", "SERVICES", "PODS"
            );
            let mut all_synced = true;
            for r in &rows {
                let clusters = match &r.report {
                    Err(e) => {
                        all_synced = false;
                        let state = style.bad("UNREACHABLE");
                        println!("{:<28} {:<20} {:<20} {:<12}", r.pod, r.node, "-", state);
                        println!("    {}", style.bad(&format!("could not ask it: {e}")));
                        continue;
                    }
                    Ok(s) => &s.remote_clusters,
                };
                if clusters.is_empty() {
                    println!("{:<28} {:<20} {:<20}", r.pod, r.node, "(none)");
                }
                for c in clusters {
                    let state = c.state();
                    all_synced &= state == "SYNCED";
                    let shown = if state == "SYNCED" { style.ok(state) } else { style.bad(state) };
                    println!(
                        "{:<28} {:<20} {:<20} {:<12} {:>8} {:>8}",
                        r.pod, r.node, c.cluster, shown, c.services, c.pods
                    );
                    if let Some(e) = &c.error {
                        println!("    {}", style.bad(e));
                    }
                }
            }
            Ok(if all_synced { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }),
        Cmd::Manifest { cmd: ManifestCmd::Generate { sets, files, deploy_dir: None } } => {
            match values_for(&sets, &files, None).and_then(|v| manifest_for(&v)) {
                Ok(yaml) => {
                    print!("{yaml}");
                    ExitCode::SUCCESS
                }
                Err(code) => code,
            }
        }
        Cmd::Manifest { cmd: ManifestCmd::Generate { deploy_dir: Some(dir), .. } } => write_deploy(&dir),
        Cmd::X { cmd: XCmd::CreateRemoteSecret { name, namespace } } => {
            let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("meshctl: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let made = rt.block_on(async {
                let context = remote_secret::Context::load(context.as_deref()).await?;
                let name = name.unwrap_or_else(|| context.name.clone());
                remote_secret::create(&context, &name, &namespace).await
            });
            match made {
                Ok(yaml) => {
                    print!("{yaml}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("meshctl: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Cmd::Inject { files } => inject(&files),
        Cmd::Install { crds, sets, files, yes, dry_run } => {
            use std::io::IsTerminal as _;
            let values = match values_for(&sets, &files, None) {
                Ok(v) => v,
                Err(code) => return code,
            };
            // `--crds`: the CRDs alone, installed first; the rest with `meshctl install`.
            let objects = if crds { manifest::crd_objects(&values) } else { manifest::objects(&values) };
            // Printed instead of applied: asked for, or (Linkerd's way, for
            // `| kubectl apply -f -`) no -y and no terminal to confirm at.
            let piped = !yes && !std::io::stdout().is_terminal();
            if dry_run || piped {
                let yaml = match manifest::render_objects(&objects) {
                    Ok(y) => y,
                    Err(e) => {
                        eprintln!("meshctl: rendering manifests: {e}");
                        return ExitCode::FAILURE;
                    }
                };
                print!("{yaml}");
                if dry_run {
                    eprintln!("dry run: {} objects would be applied", objects.len());
                } else {
                    eprintln!(
                        "meshctl: printed the manifests for `| kubectl apply -f -` (standard output is not a \
                         terminal); -y applies them itself"
                    );
                }
                return ExitCode::SUCCESS;
            }
            if !confirmed(yes, &format!("This will install the mesh ({:?} profile) into the cluster.", values.profile))
            {
                return ExitCode::FAILURE;
            }
            on_cluster(context.as_deref(), |c| async move {
                if crds {
                    print_steps(style, &cluster::install_crds(&c, &values).await?);
                    println!("{}", style.ok("\u{2714} CRDs installed. Run `meshctl install` for the rest."));
                    return Ok(ExitCode::SUCCESS);
                }
                let steps = cluster::install(&c, &values).await?;
                print_steps(style, &steps);
                println!(
                    "{}",
                    style.ok("\u{2714} Installation complete. Run `meshctl check` to see the agents come up.")
                );
                Ok(ExitCode::SUCCESS)
            })
        }
        Cmd::Uninstall { sets, files, purge, yes, dry_run } => {
            let values = match values_for(&sets, &files, None) {
                Ok(v) => v,
                Err(code) => return code,
            };
            if dry_run {
                // Deleted in reverse apply order: the DaemonSet before its RBAC, the
                // namespace last.
                for o in manifest::objects(&values).iter().rev() {
                    println!("would delete {}", cluster::describe(o));
                }
                return ExitCode::SUCCESS;
            }
            if !confirmed(yes, "This will remove the mesh from the cluster; pods are no longer captured.") {
                return ExitCode::FAILURE;
            }
            on_cluster(context.as_deref(), |c| async move {
                let steps = cluster::uninstall(&c, &values, purge).await?;
                print_steps(style, &steps);
                println!("{}", style.ok("\u{2714} Uninstall complete."));
                Ok(ExitCode::SUCCESS)
            })
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

const PREFLIGHT_OK: (&str, &str) =
    ("All pre-flight checks passed: this node can run the mesh agent.", "pre-flight check(s) failed.");
const CLUSTER_PREFLIGHT_OK: (&str, &str) =
    ("All pre-flight checks passed: the cluster can run the mesh.", "pre-flight check(s) failed.");
const VERIFY_OK: (&str, &str) = ("\u{2714} The mesh is installed and every agent is ready.", "check(s) failed.");

/// Prints findings; exit 0 only when all passed.
fn report(style: Style, findings: &[check::Finding], (ok, failed_msg): (&str, &str)) -> ExitCode {
    print!("{}", check::render(findings, style));
    if findings.iter().all(check::Finding::ok) {
        println!("{}", style.ok(ok));
        ExitCode::SUCCESS
    } else {
        let failed = findings.iter().filter(|f| !f.ok()).count();
        println!("{}", style.bad(&format!("{failed} {failed_msg}")));
        ExitCode::FAILURE
    }
}

/// Runs `f` with a client for the current cluster; errors end the command with their
/// message (which says how to fix them).
fn on_cluster<F, Fut>(context: Option<&str>, f: F) -> ExitCode
where
    F: FnOnce(kube::Client) -> Fut,
    Fut: std::future::Future<Output = Result<ExitCode, cluster::Error>>,
{
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("meshctl: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async {
        let client = match cluster::client(context).await {
            Ok(c) => c,
            Err(e) => {
                eprintln!("meshctl: {e}");
                return ExitCode::FAILURE;
            }
        };
        f(client).await.unwrap_or_else(|e| {
            eprintln!("meshctl: {e}");
            ExitCode::FAILURE
        })
    })
}

fn values_for(sets: &[String], files: &[PathBuf], namespace: Option<String>) -> Result<manifest::Values, ExitCode> {
    let mut operators = Vec::new();
    for f in files {
        // `-f -`: the IstioOperator on standard input, as istioctl reads it.
        let read =
            if f.as_os_str() == "-" { std::io::read_to_string(std::io::stdin()) } else { std::fs::read_to_string(f) };
        match read {
            Ok(text) => operators.push((f.display().to_string(), text)),
            Err(e) => {
                eprintln!("meshctl: {}: {e}", f.display());
                return Err(ExitCode::from(2));
            }
        }
    }
    let mut values = manifest::Values::from_sources(&operators, sets).map_err(|e| {
        eprintln!("meshctl: {e}");
        ExitCode::from(2)
    })?;
    if let Some(ns) = namespace {
        values.namespace = ns;
    }
    Ok(values)
}

/// `-y`, or a "y" typed at a terminal. Without a terminal to ask, nothing is changed.
fn confirmed(yes: bool, what: &str) -> bool {
    use std::io::{BufRead as _, IsTerminal as _, Write as _};
    if yes {
        return true;
    }
    if !std::io::stdin().is_terminal() {
        eprintln!("meshctl: {what} Add -y to proceed without a terminal to confirm at.");
        return false;
    }
    print!("{what} Proceed? (y/N) ");
    let _ = std::io::stdout().flush();
    let mut answer = String::new();
    let _ = std::io::stdin().lock().read_line(&mut answer);
    let yes = matches!(answer.trim(), "y" | "Y" | "yes");
    if !yes {
        eprintln!("meshctl: cancelled");
    }
    yes
}

fn print_steps(style: Style, steps: &[cluster::Step]) {
    for s in steps {
        let mark = match s.action {
            Action::Kept(_) | Action::Absent => style.warn("-"),
            _ => style.ok("\u{2714}"),
        };
        println!("{mark} {s}");
    }
}

fn run_dashboard(
    target: mesh_agent::cli::dashboard::Target,
    admins: Vec<std::net::SocketAddr>,
    address: &str,
    port: u16,
    browser: bool,
    namespace: &str,
    context: Option<&str>,
) -> ExitCode {
    use mesh_agent::cli::dashboard::{self, Backend};
    let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("meshctl: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async {
        let backend = match target.addon() {
            None => Backend::Mesh(std::sync::Arc::new(admins)),
            Some(_) => {
                let client = match cluster::client(context).await {
                    Ok(c) => c,
                    Err(e) => {
                        eprintln!("meshctl: {e}");
                        return ExitCode::FAILURE;
                    }
                };
                match dashboard::addon_pod(&client, namespace, target).await {
                    Ok((pod, pod_port)) => Backend::addon(client, namespace, &pod, pod_port),
                    Err(e) => {
                        eprintln!("meshctl: {e}");
                        return ExitCode::FAILURE;
                    }
                }
            }
        };
        let listener = match tokio::net::TcpListener::bind((address, port)).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("meshctl: cannot listen on {address}:{port}: {e} (pick another with --port)");
                return ExitCode::FAILURE;
            }
        };
        let local = listener.local_addr().map_or_else(|_| format!("{address}:{port}"), |a| a.to_string());
        let url = format!("http://{local}/");
        println!("{url}");
        if browser {
            // Best effort, as istioctl: a headless machine just prints the address.
            let _ = std::process::Command::new("xdg-open")
                .arg(&url)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn();
        }
        let stop = tokio_util::sync::CancellationToken::new();
        let on_signal = stop.clone();
        tokio::spawn(async move {
            let _ = tokio::signal::ctrl_c().await;
            on_signal.cancel();
        });
        dashboard::serve(listener, backend, stop).await;
        ExitCode::SUCCESS
    })
}

fn run_proxy_config(
    section: mesh_agent::cli::proxy_config::Section,
    admin: std::net::SocketAddr,
    file: Option<PathBuf>,
    output: &str,
) -> ExitCode {
    use mesh_agent::cli::proxy_config;
    if output != "table" && output != "json" {
        eprintln!("meshctl proxy-config: --output {output:?}: table or json");
        return ExitCode::from(2);
    }
    let dump = match file {
        Some(f) => std::fs::read_to_string(&f)
            .map_err(|e| format!("{}: {e}", f.display()))
            .and_then(|t| serde_json::from_str(&t).map_err(|e| format!("{}: not a config dump: {e}", f.display()))),
        None => match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(rt) => rt.block_on(proxy_config::fetch(admin)),
            Err(e) => Err(e.to_string()),
        },
    };
    match dump {
        Ok(dump) if output == "json" => {
            println!("{:#}", proxy_config::json(section, &dump));
            ExitCode::SUCCESS
        }
        Ok(dump) => {
            print!("{}", proxy_config::render(section, &dump));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("meshctl proxy-config: {e}");
            ExitCode::FAILURE
        }
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
    print_diagnostics(style, &found, &format!("{} file(s)", files.len()), || style.ok(&analyze::clean_message(&files)))
}

/// Prints analyzer findings as istioctl does; exit 79 when any is an error.
fn print_diagnostics(style: Style, found: &[analyze::Diagnostic], what: &str, clean: impl Fn() -> String) -> ExitCode {
    if found.is_empty() {
        println!("{}", clean());
        return ExitCode::SUCCESS;
    }
    for d in found {
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
        println!("Error: Analyzers found issues when analyzing {what}.");
        ExitCode::from(EXIT_ANALYSIS_ERRORS)
    } else {
        ExitCode::SUCCESS
    }
}

/// `meshctl inject`: each file's workloads, enrolled, on standard output; what was
/// done to each object on standard error, as `linkerd inject` reports it.
fn inject(files: &[PathBuf]) -> ExitCode {
    use std::io::Read as _;
    let mut out = String::new();
    for f in files {
        let name = f.display().to_string();
        let mut text = String::new();
        let read = if name == "-" {
            std::io::stdin().read_to_string(&mut text).map(|_| ())
        } else {
            std::fs::read_to_string(f).map(|t| text = t)
        };
        if let Err(e) = read {
            eprintln!("meshctl inject: {name}: {e}");
            return ExitCode::FAILURE;
        }
        match mesh_agent::cli::inject::inject(&name, &text) {
            Ok((yaml, outcomes)) => {
                out.push_str(&yaml);
                for o in outcomes {
                    match o.result {
                        Ok(mesh_agent::cli::inject::Injected::Added) => eprintln!("{} injected", o.object),
                        Ok(mesh_agent::cli::inject::Injected::Already) => eprintln!("{} already injected", o.object),
                        Err(why) => eprintln!("{} skipped: {why}", o.object),
                    }
                }
            }
            Err(e) => {
                eprintln!("meshctl inject: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    print!("{out}");
    ExitCode::SUCCESS
}

fn manifest_for(values: &manifest::Values) -> Result<String, ExitCode> {
    manifest::render(values).map_err(|e| {
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

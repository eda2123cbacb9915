//! `cargo xtask lab ...`: drive the network-namespace lab by hand.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use clap::Subcommand;
use mesh_tests::lab::{DEFAULT_STATE_DIR, Lab, Options};

use crate::{build, root, setup};

#[derive(Subcommand)]
pub enum LabCmd {
    /// Build the lab from the manifests in DIR (default examples/lab) and start it.
    Up {
        /// Manifests directory.
        dir: Option<PathBuf>,
        /// Run release builds of the agent and the test app (for profiling).
        #[arg(long)]
        release: bool,
        /// Also start a real Prometheus (Debian's `prometheus`) in pod `outside`,
        /// scraping both agents; query it with `lab exec outside -- curl
        /// http://127.0.0.1:19090/api/v1/query?query=...`.
        #[arg(long)]
        prometheus: bool,
    },
    /// Remove every namespace, veth, cgroup, pinned map and process of the lab.
    Down,
    /// Show nodes, pods and agents.
    Status,
    /// Run a command inside a pod's netns and cgroup: `lab exec POD -- CMD...`.
    Exec {
        /// Pod name.
        pod: String,
        /// Command and arguments.
        #[arg(last = true, required = true)]
        cmd: Vec<String>,
    },
    /// Restart a node's agent as a rolling update does: a new agent (the binary at
    /// --binary from now on, if given) starts beside the running one and takes its
    /// listening sockets over; the old one stops accepting once the new one is ready
    /// and serves its open connections until they end. Returns once the new agent
    /// answers ready. With --stop-first, the old one is stopped (SIGTERM, drain) before
    /// the new one starts: pods refuse connections in between.
    RestartAgent {
        /// Node name.
        node: String,
        /// Another agent binary (an upgrade or a downgrade).
        #[arg(long)]
        binary: Option<PathBuf>,
        /// Stop the running agent first instead of handing over.
        #[arg(long)]
        stop_first: bool,
    },
    /// Print a node agent's log.
    Logs {
        /// Node name.
        node: String,
    },
    /// Copy a manifest into the agents' config directory (same name replaces).
    Apply {
        /// The file.
        file: PathBuf,
    },
    /// Remove a manifest (by file name) from the config directory.
    Delete {
        /// The file.
        file: PathBuf,
    },
}

fn state_dir() -> PathBuf {
    std::env::var_os("MESH_LAB_STATE").map(PathBuf::from).unwrap_or_else(|| DEFAULT_STATE_DIR.into())
}

/// Brings the lab up with freshly built binaries.
pub fn up(dir: Option<PathBuf>, release: bool) -> anyhow::Result<Lab> {
    if let Some(why) = mesh_tests::sys::lab_unsupported() {
        bail!("the lab cannot run here: {why}");
    }
    setup::ensure()?;
    let bins = build::binaries(release)?;
    let opts = Options {
        manifests: dir.unwrap_or_else(|| root().join("examples/lab")),
        state_dir: state_dir(),
        agent_bin: bins.agent,
        echo_bin: bins.echo,
        agent_log: std::env::var("MESH_LOG").unwrap_or_else(|_| "info,mesh_ebpf=debug".into()),
        agent_env: Default::default(),
    };
    let lab = Lab::up(&opts)?;
    Ok(lab)
}

/// Tears the lab down if one is up.
pub fn down() -> anyhow::Result<()> {
    let dir = state_dir();
    if Lab::exists(&dir) {
        Lab::load(&dir)?.down()?;
        println!("lab removed");
    } else {
        println!("no lab is up");
    }
    Ok(())
}

pub fn run(cmd: LabCmd) -> anyhow::Result<()> {
    match cmd {
        LabCmd::Up { dir, release, prometheus } => {
            let mut lab = up(dir, release)?;
            print!("{}", lab.status());
            if prometheus {
                lab.start_prometheus()?;
                println!(
                    "prometheus   in pod outside at {} (scraping both agents): cargo xtask lab exec outside -- \\\n  \
                     curl -s 'http://{}/api/v1/query?query=sum(istio_requests_total)by(source_workload,destination_workload)'",
                    mesh_tests::lab::PROMETHEUS_ADDR,
                    mesh_tests::lab::PROMETHEUS_ADDR
                );
            }
        }
        LabCmd::Down => down()?,
        LabCmd::Status => print!("{}", Lab::load(&state_dir())?.status()),
        LabCmd::Exec { pod, cmd } => {
            let status = Lab::load(&state_dir())?.pod_command(&pod, &cmd)?.status()?;
            std::process::exit(status.code().unwrap_or(1));
        }
        LabCmd::RestartAgent { node, binary, stop_first } => {
            let mut lab = Lab::load(&state_dir())?;
            lab.node(&node)?;
            if let Some(binary) = binary {
                lab.agent_bin =
                    std::fs::canonicalize(&binary).with_context(|| format!("--binary {}", binary.display()))?;
            }
            let started = std::time::Instant::now();
            if stop_first {
                lab.stop_agent(&node, "TERM")?;
                lab.start_agent(&node)?;
            } else if let Some(old) = lab.upgrade_agent(&node)? {
                println!("agent of {node}: pid {old} handed over and serves its open connections until they end");
            }
            println!("agent of {node} restarted ({}), ready after {:?}", lab.agent_bin.display(), started.elapsed());
        }
        LabCmd::Logs { node } => {
            let lab = Lab::load(&state_dir())?;
            lab.node(&node)?;
            print!("{}", std::fs::read_to_string(lab.agent_log_path(&node))?);
        }
        LabCmd::Apply { file } => {
            let dest = Lab::load(&state_dir())?.apply(Path::new(&file))?;
            println!("applied {} -> {}", file.display(), dest.display());
        }
        LabCmd::Delete { file } => {
            Lab::load(&state_dir())?.delete(&file)?;
            println!("deleted {}", file.display());
        }
    }
    Ok(())
}

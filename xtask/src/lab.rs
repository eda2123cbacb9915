//! `cargo xtask lab ...`: drive the network-namespace lab by hand.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use clap::Subcommand;
use mesh_tests::lab::{DEFAULT_STATE_DIR, Lab, Options};
use mesh_tests::multicluster::{self, Clusters};

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
        /// How many clusters: 1 (the lab of DIR), or 2 (`examples/multicluster`: cluster1
        /// on network1 and cluster2 on network2, one root CA, each cluster's agents
        /// discovering the other's through a remote secret, joined only through their
        /// east-west gateways).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=2))]
        clusters: u8,
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
        /// The cluster whose config it goes to (a two-cluster lab).
        #[arg(long, default_value = "cluster1")]
        cluster: String,
    },
    /// Remove a manifest (by file name) from the config directory.
    Delete {
        /// The file.
        file: PathBuf,
        /// The cluster whose config it leaves (a two-cluster lab).
        #[arg(long, default_value = "cluster1")]
        cluster: String,
    },
}

fn state_dir() -> PathBuf {
    std::env::var_os("MESH_LAB_STATE").map(PathBuf::from).unwrap_or_else(|| DEFAULT_STATE_DIR.into())
}

/// Brings the lab up with freshly built binaries.
pub fn up(dir: Option<PathBuf>, release: bool) -> anyhow::Result<Lab> {
    Lab::up(&options(dir.unwrap_or_else(|| root().join("examples/lab")), state_dir(), release)?)
}

/// Brings the two-cluster lab up (`examples/multicluster`) with freshly built binaries.
pub fn up_two(release: bool) -> anyhow::Result<Clusters> {
    let (one, two) = multicluster::state_dirs(&state_dir());
    let dir = root().join("examples/multicluster");
    Clusters::up(options(dir.join("cluster1"), one, release)?, options(dir.join("cluster2"), two, release)?)
}

/// How `lab up` runs a cluster of the lab from `manifests`, after checking the machine
/// and building the binaries.
fn options(manifests: PathBuf, state_dir: PathBuf, release: bool) -> anyhow::Result<Options> {
    if let Some(why) = mesh_tests::sys::lab_unsupported() {
        bail!("the lab cannot run here: {why}");
    }
    setup::ensure()?;
    let bins = build::binaries(release)?;
    Ok(Options {
        manifests,
        state_dir,
        agent_bin: bins.agent,
        echo_bin: bins.echo,
        agent_log: std::env::var("MESH_LOG").unwrap_or_else(|_| "info,mesh_ebpf=debug".into()),
        agent_env: Default::default(),
        placement: Default::default(),
        plugin_ca: None,
    })
}

/// Tears the lab down if one is up (both clusters of a two-cluster lab).
pub fn down() -> anyhow::Result<()> {
    let dir = state_dir();
    if Clusters::exists() {
        let (_, two) = multicluster::state_dirs(&dir);
        Lab::load(&two)?.down()?;
        println!("cluster2 removed");
    }
    if Lab::exists(&dir) {
        Lab::load(&dir)?.down()?;
        println!("lab removed");
    } else {
        println!("no lab is up");
    }
    Ok(())
}

/// The running lab's clusters: one, or both of a two-cluster lab.
fn labs() -> anyhow::Result<Vec<Lab>> {
    let dir = state_dir();
    let mut labs = vec![Lab::load(&dir)?];
    if Clusters::exists() {
        labs.push(Lab::load(&multicluster::state_dirs(&dir).1)?);
    }
    Ok(labs)
}

/// The cluster that has pod `pod`.
fn lab_of_pod(pod: &str) -> anyhow::Result<Lab> {
    let labs = labs()?;
    let first_error = labs[0].pod(pod).err();
    labs.into_iter().find(|l| l.pod(pod).is_ok()).ok_or_else(|| first_error.expect("not found in the first"))
}

/// The cluster that has node `node`.
fn lab_of_node(node: &str) -> anyhow::Result<Lab> {
    let labs = labs()?;
    let first_error = labs[0].node(node).err();
    labs.into_iter().find(|l| l.node(node).is_ok()).ok_or_else(|| first_error.expect("not found in the first"))
}

/// The cluster named `cluster` (`cluster1` is the single lab too).
fn lab_named(cluster: &str) -> anyhow::Result<Lab> {
    let labs = labs()?;
    let n = labs.len();
    labs.into_iter()
        .enumerate()
        .find(|(i, l)| l.placement.cluster == cluster || (*i == 0 && cluster == "cluster1"))
        .map(|(_, l)| l)
        .with_context(|| format!("no cluster {cluster:?} in this lab ({n} cluster(s))"))
}

pub fn run(cmd: LabCmd) -> anyhow::Result<()> {
    match cmd {
        LabCmd::Up { dir, release, clusters: 2, prometheus } => {
            if dir.is_some() || prometheus {
                bail!("--clusters 2 runs examples/multicluster; DIR and --prometheus are for one cluster");
            }
            print!("{}", up_two(release)?.status());
        }
        LabCmd::Up { dir, release, prometheus, .. } => {
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
        LabCmd::Status => {
            for lab in labs()? {
                print!("{}", lab.status());
            }
        }
        LabCmd::Exec { pod, cmd } => {
            let status = lab_of_pod(&pod)?.pod_command(&pod, &cmd)?.status()?;
            std::process::exit(status.code().unwrap_or(1));
        }
        LabCmd::RestartAgent { node, binary, stop_first } => {
            let mut lab = lab_of_node(&node)?;
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
            let lab = lab_of_node(&node)?;
            print!("{}", std::fs::read_to_string(lab.agent_log_path(&node))?);
        }
        LabCmd::Apply { file, cluster } => {
            let dest = lab_named(&cluster)?.apply(Path::new(&file))?;
            println!("applied {} -> {}", file.display(), dest.display());
        }
        LabCmd::Delete { file, cluster } => {
            lab_named(&cluster)?.delete(&file)?;
            println!("deleted {}", file.display());
        }
    }
    Ok(())
}

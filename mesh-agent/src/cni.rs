//! Enrollment at pod start, as a CNI plugin does it: `mesh-cni`, chained after the
//! cluster's network plugin, hands the agent each new pod's network namespace (the fd,
//! never a path or a name) before any of the pod's containers runs, and fails the
//! pod's sandbox unless the agent answers that the pod is captured or not in the mesh.
//! So no pod in an enrolled namespace ever runs uncaptured, not even for the moment
//! between its start and the agent's next look at the node.
//!
//! `protocol` is what crosses the agent's unix socket; `server` is the agent's end;
//! `plugin` is the CNI side (environment, network configuration, results); `install`
//! chains the plugin into the node's CNI configuration.

pub(crate) mod fdpass;
mod install;
mod plugin;
mod protocol;
mod server;

pub use install::{install, uninstall};
pub use plugin::{CniError, error_json, run as run_plugin};
pub use protocol::{Reply, Request};
pub use server::{CniRequest, bind, serve};

use std::path::{Path, PathBuf};

/// Where the agent listens for the plugin unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/var/run/mesh/cni.sock";
/// The plugin's binary name, which is also its `type` in the CNI configuration.
pub const PLUGIN_TYPE: &str = "mesh-cni";

/// Errors of CNI enrollment.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file or socket operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or socket.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A message or configuration could not be read.
    #[error("{what}: {reason}")]
    Invalid {
        /// What was being read.
        what: String,
        /// What is wrong.
        reason: String,
    },
}

/// The hint file next to the agent's socket: the namespaces enrolled when the agent
/// last looked, one per line.
pub fn enrolled_namespaces_file(socket: &Path) -> PathBuf {
    socket.with_file_name("enrolled-namespaces")
}

/// Writes the hint file the plugin reads when the agent does not answer: pods of these
/// namespaces wait for the agent, others start (they would not be captured anyway).
pub fn write_enrolled_namespaces<'a>(
    socket: &Path,
    namespaces: impl IntoIterator<Item = &'a str>,
) -> Result<(), Error> {
    let path = enrolled_namespaces_file(socket);
    let mut text: Vec<&str> = namespaces.into_iter().collect();
    text.sort_unstable();
    text.dedup();
    let tmp = path.with_extension("tmp");
    let io = |source| Error::Io { path: path.clone(), source };
    std::fs::write(&tmp, text.join("\n") + "\n").map_err(io)?;
    std::fs::rename(&tmp, &path).map_err(io)
}

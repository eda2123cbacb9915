//! Users' configuration: the Kubernetes objects the mesh reads, parsed with errors that
//! name file, object and field, and the sources that produce them (a watched directory
//! of YAML in standalone mode, the Kubernetes API in cluster mode).
//!
//! Architecture invariant: only this module knows YAML. Everything downstream works on
//! the typed [`Object`]s and on the compiled `Snapshot`.

mod dir_watch;
pub mod duration;
mod file_keys;
mod file_stamp;
pub mod gateway;
pub mod gateway_api;
pub mod hosts;
pub mod istio;
pub mod kube_source;
pub mod linkerd;
mod object;
mod parse;
mod references;
pub mod resource;
pub mod resources;
pub mod schema;
pub mod secrets;
pub mod security;
pub mod service_entry;
mod source;
pub mod telemetry;

pub use kube_source::KubeSource;
pub use object::Object;
pub use parse::{fail_closed_standins, parse_documents};
pub use source::{DirSource, Reload, RemoteObjects};

use std::fmt;
use std::path::PathBuf;

/// Whether an Istio port protocol (a Gateway server's, a ServiceEntry port's; any
/// case) carries HTTP in the clear: HTTP, HTTP2, GRPC or GRPC-WEB.
pub fn is_plain_http_protocol(protocol: &str) -> bool {
    ["HTTP", "HTTP2", "GRPC", "GRPC-WEB"].iter().any(|p| p.eq_ignore_ascii_case(protocol))
}

/// A rejected configuration input, precise enough to fix without reading the agent's code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct Error {
    /// The file the input came from.
    pub file: PathBuf,
    /// `Kind namespace/name` of the object, when it got that far.
    pub object: Option<String>,
    /// Dotted path of the offending field, when known (`spec.ports[0].port`).
    pub field: Option<String>,
    /// What is wrong.
    pub reason: String,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(o) = &self.object {
            write!(f, ": {o}")?;
        }
        if let Some(field) = &self.field {
            write!(f, ": field {field}")?;
        }
        write!(f, ": {}", self.reason)
    }
}

//! The CA service (`mesh-ca`): the one place that holds the mesh's signing key. Node
//! agents send it certificate signing requests for the workloads of their node, each
//! authenticated by the agent's own token; it signs only identities of pods scheduled
//! on the requesting agent's node, as istiod does for ztunnel. A compromised node can
//! then mint identities of its own pods and nothing else.
//!
//! It also hands agents the kubeconfigs of the mesh's other clusters from the remote
//! secrets (`remote_secrets`): agents may read no Secret.
//!
//! `authn` tells which node a token belongs to (a static token file in the lab, the
//! Kubernetes TokenReview API and the token's bound pod in a cluster); `workloads` says
//! which identities run on a node; `server` speaks Istio's certificate service and the
//! trust bundle over TLS, and follows the CA files (a root rotation is a new `cacerts`).

mod authn;
mod remote_secrets;
mod server;
mod workloads;

pub use authn::{Authenticator, Caller};
pub use remote_secrets::{MULTI_CLUSTER_LABEL, RemoteSecrets};
pub use server::run;
pub use workloads::NodeWorkloads;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use crate::config::duration::parse_duration;

/// Errors that stop the CA service from starting.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The CA files or the Secret could not be used.
    #[error(transparent)]
    Identity(#[from] crate::identity::Error),
    /// A setting is missing or malformed.
    #[error("{0}")]
    Settings(String),
    /// The listener could not be bound.
    #[error("listening on {addr}: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// The error.
        source: std::io::Error,
    },
    /// The Kubernetes client could not be configured.
    #[error("Kubernetes client: {0}")]
    Kube(String),
}

/// The CA service's settings.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "mesh-ca",
    version,
    about = "The mesh's certificate authority: signs workload certificates for node agents"
)]
pub struct Settings {
    /// Where the service listens (Istio's CA port).
    #[arg(long, env = "MESH_CA_LISTEN", default_value = "0.0.0.0:15012")]
    pub listen: SocketAddr,

    /// Directory of the CA files (Istio's cacerts layout); a self-signed root is made
    /// there when it is empty. Re-read when it changes (root rotation).
    #[arg(long, env = "MESH_CA_DIR", default_value = "/var/lib/mesh-ca")]
    pub ca_dir: PathBuf,

    /// `namespace/name` of the `cacerts` Secret to read the CA from (cluster mode),
    /// written to --ca-dir (key 0600) and followed.
    #[arg(long, env = "MESH_CA_SECRET")]
    pub ca_secret: Option<String>,

    /// `namespace/name` of ConfigMaps to publish the root bundle in (`root-cert.pem`),
    /// which agents and gateways mount to trust the CA at start.
    #[arg(long, env = "MESH_CA_ROOT_CONFIGMAP", value_delimiter = ',')]
    pub root_configmap: Vec<String>,

    /// SPIFFE trust domain of the identities signed.
    #[arg(long, env = "MESH_TRUST_DOMAIN", default_value = "cluster.local", value_parser = crate::identity::parse_trust_domain)]
    pub trust_domain: String,

    /// DNS names in the service's own certificate (agents check one of them).
    #[arg(
        long = "server-name",
        env = "MESH_CA_SERVER_NAMES",
        value_delimiter = ',',
        default_value = "mesh-ca.istio-system.svc,mesh-ca.istio-system.svc.cluster.local"
    )]
    pub server_names: Vec<String>,

    /// IP addresses in the service's own certificate.
    #[arg(long = "server-ip", env = "MESH_CA_SERVER_IPS", value_delimiter = ',')]
    pub server_ips: Vec<IpAddr>,

    /// The longest validity granted, e.g. `24h`; longer requests are cut to it.
    #[arg(long, env = "MESH_CA_MAX_TTL", default_value = "24h", value_parser = parse_duration)]
    pub max_ttl: Duration,

    /// How often the CA files (or the Secret) are checked for a new CA.
    #[arg(long, env = "MESH_CA_RELOAD", default_value = "5s", value_parser = parse_duration)]
    pub reload_interval: Duration,

    /// Where pods and their nodes come from: the config directory (`files`, the lab) or
    /// the Kubernetes API (`kubernetes`).
    #[command(flatten)]
    pub source: crate::settings::SourceArgs,

    /// File of agent tokens, one `<token> <node>` per line (`--config-source files`).
    #[arg(long, env = "MESH_CA_TOKEN_FILE", required_if_eq("config_source", "files"))]
    pub token_file: Option<PathBuf>,

    /// Service accounts (`namespace/name`) of node agents: only they may ask for
    /// other workloads' certificates (cluster mode).
    #[arg(
        long = "trusted-agent",
        env = "MESH_CA_TRUSTED_AGENTS",
        value_delimiter = ',',
        default_value = "istio-system/mesh-agent"
    )]
    pub trusted_agents: Vec<String>,

    /// Service accounts (`namespace/name`) of gateways: each may ask for its own
    /// identity only, for a pod of its own on the token's node (cluster mode).
    #[arg(
        long = "gateway-account",
        env = "MESH_CA_GATEWAY_ACCOUNTS",
        value_delimiter = ',',
        default_value = "istio-ingress/istio-ingressgateway,istio-egress/istio-egressgateway"
    )]
    pub gateway_accounts: Vec<String>,

    /// Audience the agents' tokens are issued for (cluster mode).
    #[arg(long, env = "MESH_CA_AUDIENCE", default_value = "mesh-ca")]
    pub audience: String,

    /// Namespace whose remote secrets (`istio/multiCluster: "true"`) name the mesh's
    /// other clusters, handed to agents (cluster mode; default: --ca-secret's
    /// namespace, else `istio-system`). With files, Secrets so labelled in the config
    /// directory.
    #[arg(long, env = "MESH_CA_REMOTE_SECRETS_NAMESPACE")]
    pub remote_secrets_namespace: Option<String>,

    /// Log format: `text` or `json`.
    #[arg(long, env = "MESH_LOG_FORMAT", default_value = "text")]
    pub log_format: crate::settings::LogFormat,
}

//! Workload identities: SPIFFE names, the mesh CA, workload certificates and the rustls
//! configurations built from them.

mod ca;
mod ca_client;
pub mod ca_protocol;
mod certs;
mod spiffe;
mod verify;

pub use ca::{CaFiles, MeshCa, SECRET_REQUIRED_KEYS, SelfSignedRoot};
pub use ca_client::{Asked, CaClient, Issued, Pace, WATCH_WAIT};
pub use certs::{CertStore, Signer, WorkloadCert};
pub(crate) use certs::{cert_not_after, humantime_utc};
pub use spiffe::{Identity, parse_trust_domain};
pub use verify::{PeerVerifier, client_config, edge_server_config, peer_identity, server_config};

use std::path::PathBuf;

/// Errors of the identity module.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A CA file could not be read or written.
    #[error("CA file {path}: {source}")]
    CaFile {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A CA file has invalid contents.
    #[error("CA file {path}: {reason}")]
    CaInvalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Certificate generation or signing failed.
    #[error("certificate generation for {what}: {source}")]
    Generate {
        /// What was being generated.
        what: String,
        /// The rcgen error.
        source: rcgen::Error,
    },
    /// A SPIFFE identity could not be parsed.
    #[error("invalid SPIFFE identity {0:?}: expected spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>")]
    InvalidSpiffe(String),
    /// A certificate was asked for an identity no pod on this node has.
    #[error("refusing to issue a certificate for {0}: no pod on this node has that identity")]
    NotLocal(Identity),
    /// No certificate has been issued for this identity yet (the CA has not answered).
    #[error("no certificate for {0} yet: waiting for the CA")]
    NotIssued(Identity),
    /// The identity's certificate expired and no new one came (the CA unreachable or
    /// refusing past the certificate's lifetime): its connections fail closed.
    #[error("the certificate of {identity} expired at {at} and the CA has not issued another")]
    Expired {
        /// Whose certificate.
        identity: Identity,
        /// Its notAfter, UTC.
        at: String,
    },
    /// The CA service could not be reached, or refused.
    #[error("CA service: {0}")]
    Ca(String),
    /// A rustls configuration could not be built.
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
}

//! Workload certificates held in memory, issued on demand and re-issued before expiry.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::sign::CertifiedKey;

use super::{Error, Identity, MeshCa};

/// One identity's certificate and key, ready for rustls.
#[derive(Debug)]
pub struct WorkloadCert {
    /// Whose certificate this is.
    pub identity: Identity,
    /// Chain and signing key.
    pub certified_key: Arc<CertifiedKey>,
    /// Expiry.
    pub not_after: SystemTime,
    /// When to re-issue: at half-life, like Istio's default rotation.
    refresh_at: Instant,
}

/// Issues and caches workload certificates for the pods of this node.
///
/// Invariant: only identities of pods scheduled on this node are ever asked for (the
/// callers are the per-pod proxies), so a compromised node cannot mint another node's
/// identities through this store.
#[derive(Debug)]
pub struct CertStore {
    ca: Arc<MeshCa>,
    ttl: Duration,
    certs: Mutex<HashMap<Identity, Arc<WorkloadCert>>>,
}

impl CertStore {
    /// A store signing with `ca`, issuing certificates valid for `ttl`.
    pub fn new(ca: Arc<MeshCa>, ttl: Duration) -> Self {
        Self { ca, ttl, certs: Mutex::new(HashMap::new()) }
    }

    /// The CA behind this store.
    pub fn ca(&self) -> &Arc<MeshCa> {
        &self.ca
    }

    /// The current certificate for `identity`, issuing one if there is none or the
    /// current one is past its refresh time. Handshakes in flight keep the old one.
    pub fn get(&self, identity: &Identity) -> Result<Arc<WorkloadCert>, Error> {
        let mut certs = self.certs.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = certs.get(identity)
            && Instant::now() < c.refresh_at
        {
            return Ok(c.clone());
        }
        let (chain, key, not_after) = self.ca.issue(identity, self.ttl)?;
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key));
        let signer = rustls::crypto::ring::sign::any_supported_type(&key)?;
        let cert = Arc::new(WorkloadCert {
            identity: identity.clone(),
            certified_key: Arc::new(CertifiedKey::new(chain, signer)),
            not_after,
            refresh_at: Instant::now() + self.ttl / 2,
        });
        tracing::debug!(%identity, "issued workload certificate");
        certs.insert(identity.clone(), cert.clone());
        Ok(cert)
    }

    /// Drops certificates of identities no longer on this node.
    pub fn retain(&self, keep: impl Fn(&Identity) -> bool) {
        self.certs.lock().unwrap_or_else(|p| p.into_inner()).retain(|id, _| keep(id));
    }
}

//! Workload certificates held in memory, issued on demand and re-issued before expiry.

use std::collections::{HashMap, HashSet};
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
/// Invariant: certificates are issued only for identities of pods scheduled on this
/// node ([`CertStore::set_local`]); asking for any other is an error, so nothing running
/// on a node can mint another node's identities through its agent.
#[derive(Debug)]
pub struct CertStore {
    ca: Arc<MeshCa>,
    ttl: Duration,
    certs: Mutex<HashMap<Identity, Arc<WorkloadCert>>>,
    local: Mutex<HashSet<Identity>>,
}

impl CertStore {
    /// A store signing with `ca`, issuing certificates valid for `ttl`.
    pub fn new(ca: Arc<MeshCa>, ttl: Duration) -> Self {
        Self { ca, ttl, certs: Mutex::new(HashMap::new()), local: Mutex::new(HashSet::new()) }
    }

    /// The CA behind this store.
    pub fn ca(&self) -> &Arc<MeshCa> {
        &self.ca
    }

    /// The current certificate for `identity`, issuing one if there is none or the
    /// current one is past its refresh time. Handshakes in flight keep the old one.
    pub fn get(&self, identity: &Identity) -> Result<Arc<WorkloadCert>, Error> {
        if !self.local.lock().unwrap_or_else(|p| p.into_inner()).contains(identity) {
            return Err(Error::NotLocal(identity.clone()));
        }
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
        let expires = humantime_utc(not_after);
        tracing::info!(%identity, %expires, "workload certificate issued");
        certs.insert(identity.clone(), cert.clone());
        Ok(cert)
    }

    /// Renews every local identity's certificate that is missing or past half-life, so
    /// handshakes never wait for signing and a quiet identity is never left with an
    /// expiring certificate. Returns how many were issued.
    pub fn renew_due(&self) -> usize {
        let local: Vec<Identity> = self.local.lock().unwrap_or_else(|p| p.into_inner()).iter().cloned().collect();
        let due: Vec<Identity> = {
            let certs = self.certs.lock().unwrap_or_else(|p| p.into_inner());
            local.into_iter().filter(|id| certs.get(id).is_none_or(|c| Instant::now() >= c.refresh_at)).collect()
        };
        due.iter()
            .filter(|id| match self.get(id) {
                Ok(_) => true,
                Err(e) => {
                    tracing::error!(identity = %id, error = %e, "certificate renewal failed; retrying");
                    false
                }
            })
            .count()
    }

    /// How often [`CertStore::renew_due`] should run: often enough to renew well
    /// within the second half of a certificate's life.
    pub fn renewal_interval(&self) -> Duration {
        (self.ttl / 8).clamp(Duration::from_millis(500), Duration::from_secs(60))
    }

    /// Sets the identities of the pods on this node: the only ones issued from now on.
    /// Certificates of the others are dropped.
    pub fn set_local(&self, identities: impl IntoIterator<Item = Identity>) {
        let local: HashSet<Identity> = identities.into_iter().collect();
        self.certs.lock().unwrap_or_else(|p| p.into_inner()).retain(|id, _| local.contains(id));
        *self.local.lock().unwrap_or_else(|p| p.into_inner()) = local;
    }
}

/// `2026-12-02T10:00:00Z` for a log line.
fn humantime_utc(t: SystemTime) -> String {
    let secs = t.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since the epoch (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_identities_of_this_node_are_issued() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Arc::new(MeshCa::load_or_create(dir.path(), "cluster.local").unwrap());
        let store = CertStore::new(ca, Duration::from_secs(3600));
        let mine = Identity::new("cluster.local", "production", "frontend");
        let other = Identity::new("cluster.local", "production", "myapp");
        assert!(matches!(store.get(&mine), Err(Error::NotLocal(_))), "nothing is local before set_local");
        store.set_local([mine.clone()]);
        assert!(store.get(&mine).is_ok());
        assert!(matches!(store.get(&other), Err(Error::NotLocal(id)) if id == other));
        store.set_local([]);
        assert!(store.get(&mine).is_err(), "a pod that left the node gets no more certificates");
    }

    #[test]
    fn renewal_issues_missing_and_half_life_certificates_only() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Arc::new(MeshCa::load_or_create(dir.path(), "cluster.local").unwrap());
        let store = CertStore::new(ca, Duration::from_millis(400));
        let id = Identity::new("cluster.local", "production", "frontend");
        store.set_local([id.clone()]);
        assert_eq!(store.renew_due(), 1, "a new identity gets its certificate ahead of any handshake");
        assert_eq!(store.renew_due(), 0, "fresh: nothing to do");
        let first = store.get(&id).unwrap();
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(store.renew_due(), 1, "past half-life: renewed");
        assert!(!Arc::ptr_eq(&first, &store.get(&id).unwrap()));
        assert_eq!(store.renewal_interval(), Duration::from_millis(500));
    }

    #[test]
    fn expiry_is_printed_in_utc() {
        assert_eq!(humantime_utc(SystemTime::UNIX_EPOCH + Duration::from_secs(1_796_205_600)), "2026-12-02T10:00:00Z");
    }
}

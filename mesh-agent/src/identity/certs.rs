//! Workload certificates held in memory, issued by the CA service (or, in tests, a CA
//! in the process) and re-issued before expiry.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::sign::CertifiedKey;

use super::ca_protocol::{TrustBundle, Watch};
use super::{CaClient, Error, Identity, MeshCa, PeerVerifier};

/// How many certificates are asked for at once.
const CONCURRENT_ISSUES: usize = 8;

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

/// Who signs.
#[derive(Debug)]
pub enum Signer {
    /// The CA service (the signing key is not on this node).
    Remote(CaClient),
    /// A CA in this process: tests and benchmarks only; an agent never holds the key.
    Local(Arc<MeshCa>),
}

/// Issues and caches workload certificates for the pods of this node.
///
/// Invariants: certificates are asked for only for identities of pods scheduled on this
/// node ([`CertStore::set_local`]); asking for any other is an error (and the CA
/// refuses it too). A TLS handshake never waits for the CA: [`CertStore::get`] serves
/// what was issued ahead of time by [`CertStore::renew_due`], and an identity without a
/// certificate fails its handshakes (closed) until one arrives.
#[derive(Debug)]
pub struct CertStore {
    signer: Signer,
    ttl: Duration,
    certs: Mutex<HashMap<Identity, Arc<WorkloadCert>>>,
    local: Mutex<HashSet<Identity>>,
    /// The CA's signing certificate the current certificates were issued under, as the
    /// trust bundle names it: a new one means every certificate is re-issued.
    issuer: Mutex<Option<String>>,
    /// The last error from the CA, for pods waiting on it.
    last_error: Mutex<Option<String>>,
    /// Identities whose last issue failed: how many times in a row, and when the CA may
    /// be asked again for them.
    backoff: Mutex<HashMap<Identity, (u32, Instant)>>,
}

/// The first wait after a failed issue; it doubles with each failure in a row.
const RETRY_FIRST: Duration = Duration::from_secs(1);
/// The longest wait between two asks for one identity while the CA fails.
const RETRY_LONGEST: Duration = Duration::from_secs(60);

/// The wait after `failures` failed issues in a row.
fn retry_delay(failures: u32) -> Duration {
    RETRY_FIRST.saturating_mul(1 << failures.saturating_sub(1).min(16)).min(RETRY_LONGEST)
}

impl CertStore {
    /// A store signing with `ca` in this process (tests, benchmarks).
    pub fn new(ca: Arc<MeshCa>, ttl: Duration) -> Self {
        Self::with_signer(Signer::Local(ca), ttl)
    }

    /// A store whose certificates come from the CA service.
    pub fn remote(client: CaClient, ttl: Duration) -> Self {
        Self::with_signer(Signer::Remote(client), ttl)
    }

    fn with_signer(signer: Signer, ttl: Duration) -> Self {
        Self {
            signer,
            ttl,
            certs: Mutex::new(HashMap::new()),
            local: Mutex::new(HashSet::new()),
            issuer: Mutex::new(None),
            backoff: Mutex::new(HashMap::new()),
            last_error: Mutex::new(None),
        }
    }

    /// The current certificate for `identity`. With the CA service, only what was
    /// issued ahead of time (a handshake never waits for the network); with a local CA,
    /// one is issued on the spot if there is none or it is past its refresh time.
    pub fn get(&self, identity: &Identity) -> Result<Arc<WorkloadCert>, Error> {
        if !self.local.lock().unwrap_or_else(|p| p.into_inner()).contains(identity) {
            return Err(Error::NotLocal(identity.clone()));
        }
        let current = self.certs.lock().unwrap_or_else(|p| p.into_inner()).get(identity).cloned();
        match (&self.signer, current) {
            (_, Some(c)) if Instant::now() < c.refresh_at => Ok(c),
            (Signer::Local(ca), _) => {
                let (chain, key, not_after) = ca.issue(identity, self.ttl)?;
                self.store(identity, chain, key, not_after)
            }
            // Past half-life but not expired: still good while the renewal runs.
            (Signer::Remote(_), Some(c)) if SystemTime::now() < c.not_after => Ok(c),
            (Signer::Remote(_), Some(c)) => {
                Err(Error::Expired { identity: identity.clone(), at: humantime_utc(c.not_after) })
            }
            (Signer::Remote(_), None) => Err(Error::NotIssued(identity.clone())),
        }
    }

    /// Whether `identity` has a certificate to serve now.
    pub fn has(&self, identity: &Identity) -> bool {
        self.get(identity).is_ok()
    }

    /// The last error the CA gave, if the last call failed.
    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn store(
        &self,
        identity: &Identity,
        chain: Vec<CertificateDer<'static>>,
        key: Vec<u8>,
        not_after: SystemTime,
    ) -> Result<Arc<WorkloadCert>, Error> {
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key));
        let signer = rustls::crypto::ring::sign::any_supported_type(&key)?;
        let lifetime = not_after.duration_since(SystemTime::now()).unwrap_or_default();
        let cert = Arc::new(WorkloadCert {
            identity: identity.clone(),
            certified_key: Arc::new(CertifiedKey::new(chain, signer)),
            not_after,
            refresh_at: Instant::now() + lifetime / 2,
        });
        let expires = humantime_utc(not_after);
        tracing::info!(%identity, %expires, "workload certificate issued");
        self.certs.lock().unwrap_or_else(|p| p.into_inner()).insert(identity.clone(), cert.clone());
        Ok(cert)
    }

    /// Issues every local identity's certificate that is missing or past half-life, so
    /// handshakes never wait for signing and a quiet identity is never left with an
    /// expiring certificate. Returns how many were issued.
    pub async fn renew_due(&self) -> usize {
        let local: Vec<Identity> = self.local.lock().unwrap_or_else(|p| p.into_inner()).iter().cloned().collect();
        let now = Instant::now();
        let due: Vec<Identity> = {
            let certs = self.certs.lock().unwrap_or_else(|p| p.into_inner());
            let backoff = self.backoff.lock().unwrap_or_else(|p| p.into_inner());
            local
                .into_iter()
                .filter(|id| certs.get(id).is_none_or(|c| now >= c.refresh_at))
                // An identity the CA just failed waits its turn: an unreachable CA is
                // asked ever less often, not at every reconcile of every node.
                .filter(|id| backoff.get(id).is_none_or(|(_, not_before)| now >= *not_before))
                .collect()
        };
        let mut issued = 0;
        for batch in due.chunks(CONCURRENT_ISSUES) {
            let results = futures::future::join_all(batch.iter().map(|id| self.issue(id))).await;
            for (id, r) in batch.iter().zip(results) {
                let mut backoff = self.backoff.lock().unwrap_or_else(|p| p.into_inner());
                match r {
                    Ok(_) => {
                        issued += 1;
                        backoff.remove(id);
                    }
                    Err(e) => {
                        let failures = backoff.get(id).map_or(0, |(n, _)| *n) + 1;
                        let wait = retry_delay(failures);
                        backoff.insert(id.clone(), (failures, Instant::now() + wait));
                        tracing::error!(identity = %id, error = %e, failures, retry_in = ?wait, "certificate renewal failed");
                        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
                    }
                }
            }
        }
        issued
    }

    async fn issue(&self, identity: &Identity) -> Result<Arc<WorkloadCert>, Error> {
        match &self.signer {
            Signer::Local(ca) => {
                let (chain, key, not_after) = ca.issue(identity, self.ttl)?;
                self.store(identity, chain, key, not_after)
            }
            Signer::Remote(client) => {
                let issued = client.sign(identity, self.ttl).await?;
                let not_after = cert_not_after(&issued.chain[0]).unwrap_or_else(|| SystemTime::now() + self.ttl);
                *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = None;
                self.store(identity, issued.chain, issued.key, not_after)
            }
        }
    }

    /// Asks the CA service for its trust bundle and makes it `verifier`'s roots. A new
    /// signing certificate (a root rotation, a new plug-in CA) makes every certificate
    /// due, so the next [`CertStore::renew_due`] moves the node's workloads to it.
    /// Returns whether anything changed.
    pub async fn refresh_trust(&self, verifier: &PeerVerifier) -> Result<bool, Error> {
        Ok(self.refresh_trust_after(verifier, None).await?.0)
    }

    /// [`CertStore::refresh_trust`], as a long poll with `watch`: the CA may hold the
    /// ask until its bundle is no longer the one `watch` names. Returns whether anything
    /// changed, and the version of the bundle now held (None with a local signer: there
    /// is nothing to follow).
    pub async fn refresh_trust_after(
        &self,
        verifier: &PeerVerifier,
        watch: Option<&Watch>,
    ) -> Result<(bool, Option<String>), Error> {
        let Signer::Remote(client) = &self.signer else { return Ok((false, None)) };
        let (bundle, version) = client.trust_bundle(watch).await?;
        Ok((self.trust(verifier, &bundle)?, Some(version)))
    }

    /// Makes `bundle` the trusted roots and issuer; whether anything changed.
    fn trust(&self, verifier: &PeerVerifier, bundle: &TrustBundle) -> Result<bool, Error> {
        let mut roots = Vec::new();
        for pem in &bundle.roots {
            for der in rustls_pemfile::certs(&mut pem.as_bytes()) {
                roots.push(der.map_err(|e| Error::Ca(format!("root in the trust bundle: {e}")))?);
            }
        }
        if roots.is_empty() {
            return Err(Error::Ca("the CA's trust bundle has no root".into()));
        }
        let roots_changed = verifier.set_roots(&roots)?;
        let issuer_changed = {
            let mut issuer = self.issuer.lock().unwrap_or_else(|p| p.into_inner());
            let changed = issuer.as_ref().is_some_and(|i| *i != bundle.issuer);
            *issuer = Some(bundle.issuer.clone());
            changed
        };
        if roots_changed {
            tracing::info!(roots = roots.len(), "mesh trust bundle updated");
        }
        if issuer_changed {
            tracing::info!("the CA signs with a new certificate; re-issuing every workload certificate");
            let now = Instant::now();
            let mut certs = self.certs.lock().unwrap_or_else(|p| p.into_inner());
            for c in certs.values_mut() {
                if let Some(c) = Arc::get_mut(c) {
                    c.refresh_at = now;
                } else {
                    *c = Arc::new(WorkloadCert {
                        identity: c.identity.clone(),
                        certified_key: c.certified_key.clone(),
                        not_after: c.not_after,
                        refresh_at: now,
                    });
                }
            }
        }
        Ok(roots_changed || issuer_changed)
    }

    /// How long until the CA is asked again for `identity` after failures (None when
    /// its last issue did not fail).
    pub fn retry_in(&self, identity: &Identity) -> Option<Duration> {
        let backoff = self.backoff.lock().unwrap_or_else(|p| p.into_inner());
        backoff.get(identity).map(|(_, not_before)| not_before.saturating_duration_since(Instant::now()))
    }

    /// The workload certificates held, by identity, with when each expires.
    pub fn held(&self) -> Vec<(Identity, SystemTime)> {
        let certs = self.certs.lock().unwrap_or_else(|p| p.into_inner());
        let mut held: Vec<_> = certs.iter().map(|(id, c)| (id.clone(), c.not_after)).collect();
        held.sort_by_key(|(id, _)| id.to_string());
        held
    }

    /// How many workload certificates are held, and when the first of them expires.
    pub fn expiry(&self) -> (usize, Option<SystemTime>) {
        let certs = self.certs.lock().unwrap_or_else(|p| p.into_inner());
        (certs.len(), certs.values().map(|c| c.not_after).min())
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

/// The certificate's notAfter (None if it does not parse as X.509).
pub(crate) fn cert_not_after(cert: &CertificateDer<'_>) -> Option<SystemTime> {
    let (_, x) = x509_parser::parse_x509_certificate(cert).ok()?;
    let secs = u64::try_from(x.validity().not_after.timestamp()).ok()?;
    Some(SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
}

/// `2026-12-02T10:00:00Z` for a log line (whole seconds).
pub(crate) fn humantime_utc(t: SystemTime) -> String {
    jiff::Timestamp::try_from(t).map_or_else(|_| "-".into(), |ts| format!("{ts:.0}"))
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

    #[tokio::test]
    async fn renewal_issues_missing_and_half_life_certificates_only() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Arc::new(MeshCa::load_or_create(dir.path(), "cluster.local").unwrap());
        let store = CertStore::new(ca, Duration::from_millis(400));
        let id = Identity::new("cluster.local", "production", "frontend");
        store.set_local([id.clone()]);
        assert_eq!(store.renew_due().await, 1, "a new identity gets its certificate ahead of any handshake");
        assert_eq!(store.renew_due().await, 0, "fresh: nothing to do");
        let first = store.get(&id).unwrap();
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(store.renew_due().await, 1, "past half-life: renewed");
        assert!(!Arc::ptr_eq(&first, &store.get(&id).unwrap()));
        assert_eq!(store.renewal_interval(), Duration::from_millis(500));
    }

    #[test]
    fn a_failing_ca_is_asked_ever_less_often() {
        assert_eq!(
            [1, 2, 3, 6, 7, 40].map(retry_delay),
            [1, 2, 4, 32, 60, 60].map(Duration::from_secs),
            "1 s doubling to a minute"
        );
    }

    /// A client of a CA address nothing listens on: every ask is refused at once.
    fn unreachable(ca: &MeshCa) -> CaClient {
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = closed.local_addr().unwrap().to_string();
        drop(closed);
        CaClient {
            address,
            server_name: "mesh-ca.istio-system.svc".into(),
            token_file: None,
            root_file: None,
            verifier: crate::identity::PeerVerifier::new(ca.roots(), vec!["cluster.local".into()]).unwrap(),
        }
    }

    #[tokio::test]
    async fn a_certificate_past_its_expiry_is_not_served_and_the_error_says_since_when() {
        let dir = tempfile::tempdir().unwrap();
        let ca = MeshCa::load_or_create(dir.path(), "cluster.local").unwrap();
        let store = CertStore::remote(unreachable(&ca), Duration::from_secs(3600));
        let id = Identity::new("cluster.local", "production", "frontend");
        store.set_local([id.clone()]);
        let (chain, key, _) = ca.issue(&id, Duration::from_secs(60)).unwrap();
        let expired = SystemTime::UNIX_EPOCH + Duration::from_secs(1_796_205_600);
        store.store(&id, chain, key, expired).unwrap();
        assert_eq!(store.renew_due().await, 0, "due, but the CA is unreachable");
        let e = store.get(&id).unwrap_err();
        assert!(matches!(&e, Error::Expired { identity, .. } if *identity == id), "{e:?}");
        assert_eq!(
            e.to_string(),
            "the certificate of spiffe://cluster.local/ns/production/sa/frontend expired at 2026-12-02T10:00:00Z \
             and the CA has not issued another"
        );
        assert!(!store.has(&id), "an expired certificate is not served: its connections fail closed");
    }

    #[tokio::test]
    async fn an_unreachable_ca_backs_off_per_identity_and_fails_closed() {
        let dir = tempfile::tempdir().unwrap();
        let ca = MeshCa::load_or_create(dir.path(), "cluster.local").unwrap();
        let store = CertStore::remote(unreachable(&ca), Duration::from_secs(3600));
        let id = Identity::new("cluster.local", "production", "frontend");
        store.set_local([id.clone()]);
        assert_eq!(store.renew_due().await, 0);
        assert!(store.last_error().is_some());
        let wait = store.retry_in(&id).expect("backing off");
        assert!(wait > Duration::from_millis(800) && wait <= RETRY_FIRST, "{wait:?}");
        assert!(store.get(&id).is_err(), "no certificate: the pod's connections fail closed");
        // Asked again at once: not sent to the CA, the wait is not restarted.
        assert_eq!(store.renew_due().await, 0);
        assert!(store.retry_in(&id).unwrap() <= wait);
        tokio::time::sleep(RETRY_FIRST).await;
        assert_eq!(store.renew_due().await, 0);
        let second = store.retry_in(&id).unwrap();
        assert!(second > Duration::from_millis(1800), "doubled after the second failure: {second:?}");
    }

    #[test]
    fn expiry_is_printed_in_utc() {
        assert_eq!(humantime_utc(SystemTime::UNIX_EPOCH + Duration::from_secs(1_796_205_600)), "2026-12-02T10:00:00Z");
    }
}

//! Peer verification: the chain must lead to the mesh root, and the SPIFFE identity in
//! the URI SAN must be what the caller expects (client side) or belong to an accepted
//! trust domain (server side). rustls configurations for both ends of the tunnel.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};

use super::{CertStore, Error, Identity};

/// ALPN for the tunnel: HTTP/2.
const ALPN_H2: &[u8] = b"h2";

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The SPIFFE identity in a certificate's URI SAN, if there is exactly one.
pub fn peer_identity(cert: &CertificateDer<'_>) -> Option<Identity> {
    let (_, x509) = x509_parser::parse_x509_certificate(cert).ok()?;
    let san = x509.subject_alternative_name().ok()??;
    let mut uris = san.value.general_names.iter().filter_map(|n| match n {
        x509_parser::extensions::GeneralName::URI(u) => Some(*u),
        _ => None,
    });
    let first = uris.next()?;
    if uris.next().is_some() {
        // A certificate naming two workloads is ambiguous: refuse it.
        return None;
    }
    Identity::parse(first).ok()
}

/// Verifies peers against the mesh roots and a set of accepted trust domains. The roots
/// can be replaced while the agent runs (a root rotation): each handshake uses the roots
/// current when it starts, and connections already established are not touched.
#[derive(Debug, Clone)]
pub struct PeerVerifier {
    trust: Arc<arc_swap::ArcSwap<Trust>>,
    trust_domains: Arc<[String]>,
    algs: WebPkiSupportedAlgorithms,
}

/// One set of roots, and the client verifier built on it.
#[derive(Debug)]
struct Trust {
    roots: Vec<CertificateDer<'static>>,
    store: Arc<RootCertStore>,
    clients: Arc<dyn ClientCertVerifier>,
}

impl Trust {
    fn new(roots: &[CertificateDer<'static>]) -> Result<Self, Error> {
        let mut store = RootCertStore::empty();
        for r in roots {
            store.add(r.clone())?;
        }
        let store = Arc::new(store);
        let clients = WebPkiClientVerifier::builder_with_provider(store.clone(), provider())
            .build()
            .map_err(|e| Error::Tls(rustls::Error::General(e.to_string())))?;
        Ok(Self { roots: roots.to_vec(), store, clients })
    }
}

impl PeerVerifier {
    /// A verifier trusting `roots` and identities in `trust_domains` (the configured
    /// trust domain and its aliases).
    pub fn new(roots: &[CertificateDer<'static>], trust_domains: Vec<String>) -> Result<Self, Error> {
        Ok(Self {
            trust: Arc::new(arc_swap::ArcSwap::from_pointee(Trust::new(roots)?)),
            trust_domains: trust_domains.into(),
            algs: provider().signature_verification_algorithms,
        })
    }

    /// The roots trusted now.
    pub fn roots(&self) -> Vec<CertificateDer<'static>> {
        self.trust.load().roots.clone()
    }

    /// Trusts `roots` from the next handshake on; returns whether they differ from the
    /// current ones.
    pub fn set_roots(&self, roots: &[CertificateDer<'static>]) -> Result<bool, Error> {
        if self.trust.load().roots == roots {
            return Ok(false);
        }
        self.trust.store(Arc::new(Trust::new(roots)?));
        Ok(true)
    }

    fn check_trust_domain(&self, id: &Identity) -> Result<(), rustls::Error> {
        if self.trust_domains.iter().any(|td| **td == *id.trust_domain) {
            Ok(())
        } else {
            Err(cert_error(format!("identity {id} is outside the accepted trust domains")))
        }
    }
}

fn cert_error(reason: String) -> rustls::Error {
    rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(Arc::new(
        std::io::Error::new(std::io::ErrorKind::PermissionDenied, reason),
    ))))
}

/// The handshake-signature checks, the same on both ends of the tunnel: the provider's
/// algorithms, held by the [`PeerVerifier`] in `self.verifier`. Written once for the
/// two verifier traits, whose methods have the same signatures.
macro_rules! handshake_signatures_by_provider {
    () => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(message, cert, dss, &self.verifier.algs)
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(message, cert, dss, &self.verifier.algs)
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.verifier.algs.supported_schemes()
        }
    };
}

/// Client side: the server must present exactly the expected identity.
#[derive(Debug)]
struct ExpectIdentity {
    verifier: PeerVerifier,
    expected: Identity,
}

impl ServerCertVerifier for ExpectIdentity {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let parsed = rustls::server::ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.verifier.trust.load().store,
            intermediates,
            now,
            self.verifier.algs.all,
        )?;
        let got = peer_identity(end_entity).ok_or_else(|| cert_error("no SPIFFE identity in certificate".into()))?;
        if got != self.expected {
            return Err(cert_error(format!("server identity {got} is not the expected {}", self.expected)));
        }
        Ok(ServerCertVerified::assertion())
    }

    handshake_signatures_by_provider!();
}

/// Server side: the client must present a mesh certificate with a SPIFFE identity in an
/// accepted trust domain. Which identities may do what is authorization, not
/// authentication, and is decided after the handshake.
#[derive(Debug)]
struct MeshClientVerifier {
    verifier: PeerVerifier,
}

impl MeshClientVerifier {
    fn inner(&self) -> Arc<dyn ClientCertVerifier> {
        self.verifier.trust.load().clients.clone()
    }
}

impl ClientCertVerifier for MeshClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // Mesh clients have one certificate; hints would only name the roots.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner().verify_client_cert(end_entity, intermediates, now)?;
        let id =
            peer_identity(end_entity).ok_or_else(|| cert_error("no SPIFFE identity in client certificate".into()))?;
        self.verifier.check_trust_domain(&id)?;
        Ok(ClientCertVerified::assertion())
    }

    handshake_signatures_by_provider!();
}

/// Serves the current certificate of one identity; re-issued certificates are picked up
/// by the next handshake without touching established connections.
#[derive(Debug)]
struct CurrentCert {
    store: Arc<CertStore>,
    identity: Identity,
}

impl ResolvesServerCert for CurrentCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        match self.store.get(&self.identity) {
            Ok(c) => Some(c.certified_key.clone()),
            Err(e) => {
                tracing::error!(identity = %self.identity, error = %e, "no certificate to serve");
                None
            }
        }
    }
}

/// TLS 1.3 server configuration for the HBONE listener of the pod with `identity`.
pub fn server_config(
    store: Arc<CertStore>,
    identity: Identity,
    verifier: &PeerVerifier,
) -> Result<Arc<rustls::ServerConfig>, Error> {
    let provider = provider();
    let client_verifier = Arc::new(MeshClientVerifier { verifier: verifier.clone() });
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(client_verifier)
        .with_cert_resolver(Arc::new(CurrentCert { store, identity }));
    cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
    // No resumption: every tunnel presents and verifies a certificate in full (a
    // resumed session would skip a check against the current trust bundle), and the
    // agent's clients never resume, so storing and sending tickets is only memory and
    // work per handshake.
    cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    cfg.send_tls13_tickets = 0;
    Ok(Arc::new(cfg))
}

/// TLS 1.3 server configuration for a gateway server in ISTIO_MUTUAL mode: the
/// gateway's own mesh certificate, a mesh client certificate required, HTTP (`alpn`)
/// on top rather than HBONE.
pub fn edge_server_config(
    store: Arc<CertStore>,
    identity: Identity,
    verifier: &PeerVerifier,
    alpn: &[&[u8]],
) -> Result<Arc<rustls::ServerConfig>, Error> {
    let client_verifier = Arc::new(MeshClientVerifier { verifier: verifier.clone() });
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(client_verifier)
        .with_cert_resolver(Arc::new(CurrentCert { store, identity }));
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(cfg))
}

/// TLS 1.3 client configuration for a tunnel from `source` to a server that must be
/// `expected`.
pub fn client_config(
    store: Arc<CertStore>,
    source: Identity,
    expected: Identity,
    verifier: &PeerVerifier,
) -> Result<Arc<rustls::ClientConfig>, Error> {
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(ExpectIdentity { verifier: verifier.clone(), expected }))
        .with_client_cert_resolver(Arc::new(ClientCert { store, identity: source }));
    cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
    // Each tunnel has a configuration of its own, so a session cache would never be
    // read again: none (and no resumption, as the server side).
    cfg.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(cfg))
}

/// Client certificate of the source workload, current at each handshake.
#[derive(Debug)]
struct ClientCert {
    store: Arc<CertStore>,
    identity: Identity,
}

impl rustls::client::ResolvesClientCert for ClientCert {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        match self.store.get(&self.identity) {
            Ok(c) => Some(c.certified_key.clone()),
            Err(e) => {
                tracing::error!(identity = %self.identity, error = %e, "no client certificate");
                None
            }
        }
    }

    fn has_certs(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;
    use std::time::Duration;

    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, KeyUsagePurpose};

    use super::*;
    use crate::identity::{CaFiles, MeshCa};

    fn ca_params() -> CertificateParams {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
        p
    }

    /// A plug-in CA directory for one cluster: its intermediate, signed by `root`.
    fn cluster_ca(dir: &std::path::Path, root: &Issuer<'_, KeyPair>, root_pem: &str) -> MeshCa {
        let key = KeyPair::generate().unwrap();
        let cert = ca_params().signed_by(&key, root).unwrap();
        let files = CaFiles::in_dir(dir);
        std::fs::write(&files.ca_cert, cert.pem()).unwrap();
        std::fs::write(&files.ca_key, key.serialize_pem()).unwrap();
        std::fs::set_permissions(&files.ca_key, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(&files.root_cert, root_pem).unwrap();
        std::fs::write(&files.cert_chain, format!("{}{root_pem}", cert.pem())).unwrap();
        MeshCa::load(&files).unwrap()
    }

    fn root() -> (Issuer<'static, KeyPair>, String) {
        let key = KeyPair::generate().unwrap();
        let params = ca_params();
        let pem = params.self_signed(&key).unwrap().pem();
        (Issuer::new(params, key), pem)
    }

    /// Mutual TLS between `client` (as frontend) and `server` (as myapp) in memory.
    async fn handshake(client: Arc<MeshCa>, server: Arc<MeshCa>) -> Result<Identity, String> {
        let frontend = Identity::new("cluster.local", "production", "frontend");
        let myapp = Identity::new("cluster.local", "production", "myapp");
        let (cs, ss) = (
            Arc::new(CertStore::new(client.clone(), Duration::from_secs(3600))),
            Arc::new(CertStore::new(server.clone(), Duration::from_secs(3600))),
        );
        cs.set_local([frontend.clone()]);
        ss.set_local([myapp.clone()]);
        let cv = PeerVerifier::new(client.roots(), vec!["cluster.local".into()]).unwrap();
        let sv = PeerVerifier::new(server.roots(), vec!["cluster.local".into()]).unwrap();
        let ccfg = client_config(cs, frontend, myapp.clone(), &cv).unwrap();
        let scfg = server_config(ss, myapp, &sv).unwrap();
        let (a, b) = tokio::io::duplex(64 * 1024);
        let name = ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
        let (c, s) = tokio::join!(
            tokio_rustls::TlsConnector::from(ccfg).connect(name, a),
            tokio_rustls::TlsAcceptor::from(scfg).accept(b)
        );
        c.map_err(|e| format!("client: {e}"))?;
        let s = s.map_err(|e| format!("server: {e}"))?;
        s.get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(peer_identity)
            .ok_or_else(|| "no identity".into())
    }

    #[tokio::test]
    async fn clusters_with_intermediates_under_one_root_trust_each_other_and_no_one_else() {
        let (shared, shared_pem) = root();
        let (a, b, c) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let cluster_a = Arc::new(cluster_ca(a.path(), &shared, &shared_pem));
        let cluster_b = Arc::new(cluster_ca(b.path(), &shared, &shared_pem));
        let (other, other_pem) = root();
        let outsider = Arc::new(cluster_ca(c.path(), &other, &other_pem));

        let seen = handshake(cluster_a.clone(), cluster_b.clone()).await.unwrap();
        assert_eq!(
            seen.to_string(),
            "spiffe://cluster.local/ns/production/sa/frontend",
            "leaf chained through A's intermediate"
        );
        let refused = handshake(outsider.clone(), cluster_b.clone()).await.unwrap_err();
        assert!(refused.contains("invalid peer certificate"), "another root's workload is refused: {refused}");
        let refused = handshake(cluster_b, outsider).await.unwrap_err();
        assert!(refused.contains("invalid peer certificate"), "and it cannot serve mesh clients: {refused}");
    }
}

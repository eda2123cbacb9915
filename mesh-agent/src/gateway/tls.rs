//! The TLS a gateway server terminates: its certificate (from the Secret its
//! `credentialName` names, or files), the client verification of MUTUAL and
//! OPTIONAL_MUTUAL, and the protocol versions and cipher suites it allows.

use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{CipherSuite, RootCertStore, ServerConfig, SupportedCipherSuite};

use crate::config::gateway::{ServerTls, TlsMode, TlsVersion};
pub use crate::config::secrets::Secrets;

/// ALPN a gateway offers on TLS: HTTP/2, then HTTP/1.1.
const ALPN: &[&[u8]] = &[b"h2", b"http/1.1"];

/// OpenSSL names of the TLS 1.2 suites rustls offers (TLS 1.3 suites are not chosen by
/// `cipherSuites`, as in Envoy).
const TLS12_SUITES: &[(&str, CipherSuite)] = &[
    ("ECDHE-ECDSA-AES128-GCM-SHA256", CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256),
    ("ECDHE-ECDSA-AES256-GCM-SHA384", CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384),
    ("ECDHE-ECDSA-CHACHA20-POLY1305", CipherSuite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256),
    ("ECDHE-RSA-AES128-GCM-SHA256", CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256),
    ("ECDHE-RSA-AES256-GCM-SHA384", CipherSuite::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384),
    ("ECDHE-RSA-CHACHA20-POLY1305", CipherSuite::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256),
];

/// What a server's TLS settings make: the rustls configuration, and the client
/// certificate names MUTUAL requires (empty: any certificate the CA signed).
#[derive(Debug, Clone)]
pub struct Terminated {
    /// The configuration new handshakes use.
    pub config: Arc<ServerConfig>,
    /// `subjectAltNames`: one must be in the client certificate.
    pub client_names: Vec<String>,
    /// ISTIO_MUTUAL: the client is a mesh workload, known by its SPIFFE identity.
    pub mesh: bool,
}

/// ISTIO_MUTUAL: the gateway's own mesh identity, and clients with mesh certificates
/// (of an accepted trust domain) only; `subjectAltNames` narrows them to those SPIFFE
/// identities.
pub fn terminate_mesh(
    tls: &ServerTls,
    certs: Arc<crate::identity::CertStore>,
    own: crate::identity::Identity,
    verifier: &crate::identity::PeerVerifier,
) -> Result<Terminated, String> {
    let config = crate::identity::edge_server_config(certs, own, verifier, ALPN).map_err(|e| e.to_string())?;
    Ok(Terminated { config, client_names: tls.subject_alt_names.clone(), mesh: true })
}

/// Builds the TLS a server terminates; the error says what is missing or wrong,
/// without any secret material.
pub fn terminate(tls: &ServerTls, secrets: &Secrets) -> Result<Terminated, String> {
    if !tls.verify_certificate_hash.is_empty() || !tls.verify_certificate_spki.is_empty() {
        return Err("verifyCertificateHash and verifyCertificateSpki are not supported by this gateway yet".into());
    }
    let (chain, key, ca) = certificate(tls, secrets)?;
    let provider = provider(&tls.cipher_suites)?;
    let versions = versions(tls.min_protocol_version, tls.max_protocol_version)?;
    let builder = ServerConfig::builder_with_provider(Arc::new(provider.clone()))
        .with_protocol_versions(&versions)
        .map_err(|e| format!("protocol versions: {e}"))?;
    let builder = match tls.mode {
        TlsMode::Simple => builder.with_no_client_auth(),
        TlsMode::Mutual | TlsMode::OptionalMutual => {
            let ca = ca
                .ok_or("MUTUAL needs the client CA: ca.crt in the Secret, a <name>-cacert Secret, or caCertificates")?;
            let mut roots = RootCertStore::empty();
            for c in ca {
                roots.add(c).map_err(|e| format!("client CA: {e}"))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), Arc::new(provider));
            let verifier =
                if tls.mode == TlsMode::OptionalMutual { verifier.allow_unauthenticated() } else { verifier };
            builder.with_client_cert_verifier(verifier.build().map_err(|e| format!("client CA: {e}"))?)
        }
        other => return Err(format!("tls mode {other:?} is not terminated by this gateway yet")),
    };
    let mut config = builder.with_single_cert(chain, key).map_err(|e| format!("certificate and key: {e}"))?;
    config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
    Ok(Terminated { config: Arc::new(config), client_names: tls.subject_alt_names.clone(), mesh: false })
}

type Material = (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>, Option<Vec<CertificateDer<'static>>>);

/// The certificate chain, key and client CA of a server.
fn certificate(tls: &ServerTls, secrets: &Secrets) -> Result<Material, String> {
    let name = tls.credential_name.as_ref().or(tls.credential_names.first());
    let (cert_pem, key_pem, ca_pem) = match name {
        Some(name) => {
            let cert = secrets.field(name, &["tls.crt"])?.ok_or_else(|| format!("Secret {name} has no tls.crt"))?;
            let key = secrets.field(name, &["tls.key"])?.ok_or_else(|| format!("Secret {name} has no tls.key"))?;
            // Istio reads the client CA from the same Secret, or from `<name>-cacert`.
            (cert, key, secrets.ca(name, &["ca.crt"])?)
        }
        None => {
            let read = |what: &str, path: &Option<String>| -> Result<Option<Vec<u8>>, String> {
                path.as_ref().map(|p| std::fs::read(p).map_err(|e| format!("{what} {p}: {e}"))).transpose()
            };
            let cert =
                read("serverCertificate", &tls.server_certificate)?.ok_or("no credentialName or serverCertificate")?;
            let key = read("privateKey", &tls.private_key)?.ok_or("no privateKey")?;
            (cert, key, read("caCertificates", &tls.ca_certificates)?)
        }
    };
    let chain = rustls_pemfile::certs(&mut cert_pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| "the certificate is not PEM".to_string())?;
    if chain.is_empty() {
        return Err("no PEM certificate in tls.crt".into());
    }
    let key = rustls_pemfile::private_key(&mut key_pem.as_slice())
        .map_err(|_| "the key is not PEM".to_string())?
        .ok_or("no PEM private key in tls.key")?;
    let ca = match ca_pem {
        Some(pem) => Some(
            rustls_pemfile::certs(&mut pem.as_slice())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|_| "the client CA is not PEM".to_string())?,
        ),
        None => None,
    };
    Ok((chain, key, ca))
}

/// The crypto provider with the TLS 1.2 suites `names` allows (all when empty).
fn provider(names: &[String]) -> Result<CryptoProvider, String> {
    let mut provider = rustls::crypto::ring::default_provider();
    if names.is_empty() {
        return Ok(provider);
    }
    let mut wanted = Vec::new();
    for n in names {
        let Some((_, suite)) = TLS12_SUITES.iter().find(|(openssl, _)| openssl.eq_ignore_ascii_case(n)) else {
            let known: Vec<&str> = TLS12_SUITES.iter().map(|(o, _)| *o).collect();
            return Err(format!("cipherSuites: {n:?} is not offered (known: {})", known.join(", ")));
        };
        wanted.push(*suite);
    }
    let is_tls13 = |s: &SupportedCipherSuite| matches!(s, SupportedCipherSuite::Tls13(_));
    provider.cipher_suites.retain(|s| is_tls13(s) || wanted.contains(&s.suite()));
    Ok(provider)
}

/// The TLS versions between `min` and `max` that rustls speaks (1.2 and 1.3).
fn versions(min: TlsVersion, max: TlsVersion) -> Result<Vec<&'static rustls::SupportedProtocolVersion>, String> {
    let allows = |v: TlsVersion| (min == TlsVersion::Auto || min <= v) && (max == TlsVersion::Auto || v <= max);
    let mut out = Vec::new();
    if allows(TlsVersion::V1_3) {
        out.push(&rustls::version::TLS13);
    }
    if allows(TlsVersion::V1_2) {
        out.push(&rustls::version::TLS12);
    }
    if out.is_empty() {
        return Err("maxProtocolVersion below TLSV1_2: this gateway speaks TLS 1.2 and 1.3 only".into());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_follow_min_and_max() {
        let names =
            |min, max| versions(min, max).map(|v| v.iter().map(|v| format!("{:?}", v.version)).collect::<Vec<_>>());
        assert_eq!(names(TlsVersion::Auto, TlsVersion::Auto).unwrap(), ["TLSv1_3", "TLSv1_2"]);
        assert_eq!(names(TlsVersion::V1_3, TlsVersion::Auto).unwrap(), ["TLSv1_3"]);
        assert_eq!(names(TlsVersion::V1_0, TlsVersion::V1_2).unwrap(), ["TLSv1_2"]);
        assert!(names(TlsVersion::Auto, TlsVersion::V1_1).is_err());
    }

    #[test]
    fn cipher_suites_keep_tls13_and_the_named_tls12_suites() {
        let p = provider(&["ECDHE-RSA-AES128-GCM-SHA256".into()]).unwrap();
        let tls12: Vec<CipherSuite> =
            p.cipher_suites.iter().filter(|s| matches!(s, SupportedCipherSuite::Tls12(_))).map(|s| s.suite()).collect();
        assert_eq!(tls12, [CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256]);
        assert!(p.cipher_suites.iter().any(|s| matches!(s, SupportedCipherSuite::Tls13(_))));
        assert!(provider(&["AES128-SHA".into()]).unwrap_err().contains("AES128-SHA"));
    }
}

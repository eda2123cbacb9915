//! TLS the agent opens itself toward a destination outside the mesh, for a pod that
//! speaks plaintext (DestinationRule `tls.mode: SIMPLE` or `MUTUAL` on a ServiceEntry
//! host): the server's certificate is checked against `caCertificates` (or the system's
//! roots) for the SNI, and MUTUAL presents the client certificate. The certificates
//! come from files under `--egress-tls-dir`, or, at a gateway, from the Secret of its
//! own namespace that `credentialName` names.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use super::{Error, HANDSHAKE_TIMEOUT};
use crate::config::secrets::Secrets;
use crate::traffic::policy::TlsOrigination;

/// Where Debian-family systems keep their trusted roots.
const SYSTEM_ROOTS: &str = "/etc/ssl/certs/ca-certificates.crt";

/// Where the certificates of originated TLS may come from.
#[derive(Debug, Clone, Copy)]
pub struct Credentials<'a> {
    /// The only directory whose files a DestinationRule may name (`--egress-tls-dir`).
    pub allowed_dir: &'a Path,
    /// The Secrets of a gateway's own namespace, for `credentialName`; None for node
    /// agents, which read no Secrets.
    pub secrets: Option<&'a Secrets>,
}

/// Opens TLS on `tcp` (connected to `addr`) as `o` says, for `host` when `o` names no
/// SNI. The files (or the Secret) are read for each connection, so rotated ones apply
/// at once, and files only from `from.allowed_dir` (plus the system's roots).
pub async fn originate(
    tcp: TcpStream,
    addr: SocketAddr,
    o: &TlsOrigination,
    host: &str,
    from: &Credentials<'_>,
) -> Result<TlsStream<TcpStream>, Error> {
    let sni = o.sni.as_deref().unwrap_or(host);
    let name = ServerName::try_from(sni.to_string())
        .map_err(|_| Error::Origination { addr, reason: format!("{sni:?} is not a server name") })?;
    let config = client_config(o, from).map_err(|reason| Error::Origination { addr, reason })?;
    let connect = tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp);
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, connect).await {
        Ok(Ok(tls)) => Ok(tls),
        Ok(Err(source)) => Err(Error::Tls { addr, source }),
        Err(_) => Err(Error::Timeout { what: "TLS handshake with", addr, after: HANDSHAKE_TIMEOUT }),
    }
}

/// Whether `path` names a file under `dir`, read lexically: no `..` may climb out.
fn is_under(path: &Path, dir: &Path) -> bool {
    use std::path::Component;
    path.starts_with(dir) && !path.components().any(|c| matches!(c, Component::ParentDir))
}

/// PEM bytes of the roots (None: the system's), and of the client's chain and key.
struct Material {
    roots: Option<Vec<u8>>,
    client: Option<(Vec<u8>, Vec<u8>)>,
}

fn client_config(o: &TlsOrigination, from: &Credentials<'_>) -> Result<rustls::ClientConfig, String> {
    let material = match &o.credential_name {
        Some(name) => from_secret(name, o.mutual, from.secrets)?,
        None => from_files(o, from.allowed_dir)?,
    };
    let roots_pem = match material.roots {
        Some(pem) => pem,
        None => std::fs::read(SYSTEM_ROOTS).map_err(|e| format!("{SYSTEM_ROOTS}: {e}"))?,
    };
    let mut roots = rustls::RootCertStore::empty();
    for cert in pem_certs(&roots_pem, "the CA certificates")? {
        roots.add(cert).map_err(|e| format!("the CA certificates: {e}"))?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots);
    let Some((cert, key)) = material.client else { return Ok(builder.with_no_client_auth()) };
    let chain = pem_certs(&cert, "the client certificate")?;
    let key = rustls_pemfile::private_key(&mut key.as_slice())
        .map_err(|_| "the client key is not PEM".to_string())?
        .ok_or("no private key in the client key")?;
    builder.with_client_auth_cert(chain, key).map_err(|e| e.to_string())
}

/// The files a DestinationRule names, read only under `allowed_dir`.
fn from_files(o: &TlsOrigination, allowed_dir: &Path) -> Result<Material, String> {
    for f in [&o.ca_certificates, &o.client_certificate, &o.private_key].into_iter().flatten() {
        if !is_under(f, allowed_dir) {
            return Err(format!(
                "{} is outside {}, the only directory the agent reads TLS origination files from (--egress-tls-dir)",
                f.display(),
                allowed_dir.display()
            ));
        }
    }
    let read = |p: &Path| std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()));
    let roots = o.ca_certificates.as_deref().map(read).transpose()?;
    if !o.mutual {
        return Ok(Material { roots, client: None });
    }
    let (Some(cert), Some(key)) = (&o.client_certificate, &o.private_key) else {
        return Err("MUTUAL without clientCertificate and privateKey".into());
    };
    Ok(Material { roots, client: Some((read(cert)?, read(key)?)) })
}

/// The Secret `name` of the gateway's namespace, as Istio reads a DestinationRule's
/// `credentialName`: `tls.crt`/`tls.key` (or `cert`/`key`) for MUTUAL, the CA from
/// `ca.crt` (or `cacert`, or the Secret `<name>-cacert`), else the system's roots.
fn from_secret(name: &str, mutual: bool, secrets: Option<&Secrets>) -> Result<Material, String> {
    let Some(secrets) = secrets else {
        return Err(format!(
            "credentialName {name}: node agents read no Secrets; a gateway reads it from its own namespace, or name \
             files in caCertificates, clientCertificate and privateKey"
        ));
    };
    let roots = secrets.ca(name, &["ca.crt", "cacert"])?;
    if !mutual {
        return Ok(Material { roots, client: None });
    }
    let cert = secrets.field(name, &["tls.crt", "cert"])?.ok_or_else(|| format!("Secret {name} has no tls.crt"))?;
    let key = secrets.field(name, &["tls.key", "key"])?.ok_or_else(|| format!("Secret {name} has no tls.key"))?;
    Ok(Material { roots, client: Some((cert, key)) })
}

fn pem_certs(pem: &[u8], what: &str) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, String> {
    let certs =
        rustls_pemfile::certs(&mut &pem[..]).collect::<Result<Vec<_>, _>>().map_err(|_| format!("{what}: not PEM"))?;
    if certs.is_empty() {
        return Err(format!("{what}: no certificate"));
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_files_under_the_directory_are_read() {
        let dir = Path::new("/etc/mesh/egress-tls");
        assert!(is_under(Path::new("/etc/mesh/egress-tls/api/ca.pem"), dir));
        assert!(!is_under(Path::new("/etc/mesh/egress-tls/../../shadow"), dir));
        assert!(!is_under(Path::new("/etc/mesh/egress-tls-other/ca.pem"), dir));
        assert!(!is_under(Path::new("/var/run/secrets/token"), dir));
    }
}

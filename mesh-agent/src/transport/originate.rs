//! TLS the agent opens itself toward a destination outside the mesh, for a pod that
//! speaks plaintext (DestinationRule `tls.mode: SIMPLE` or `MUTUAL` on a ServiceEntry
//! host): the server's certificate is checked against `caCertificates` (or the system's
//! roots) for the SNI, and MUTUAL presents the client certificate.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use super::{Error, HANDSHAKE_TIMEOUT};
use crate::traffic::policy::TlsOrigination;

/// Where Debian-family systems keep their trusted roots.
const SYSTEM_ROOTS: &str = "/etc/ssl/certs/ca-certificates.crt";

/// Opens TLS on `tcp` (connected to `addr`) as `o` says, for `host` when `o` names no
/// SNI. The files are read for each connection, so rotated ones apply at once, and only
/// from `allowed_dir` (plus the system's roots).
pub async fn originate(
    tcp: TcpStream,
    addr: SocketAddr,
    o: &TlsOrigination,
    host: &str,
    allowed_dir: &Path,
) -> Result<TlsStream<TcpStream>, Error> {
    let sni = o.sni.as_deref().unwrap_or(host);
    let name = ServerName::try_from(sni.to_string())
        .map_err(|_| Error::Origination { addr, reason: format!("{sni:?} is not a server name") })?;
    let config = client_config(o, allowed_dir).map_err(|reason| Error::Origination { addr, reason })?;
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

fn client_config(o: &TlsOrigination, allowed_dir: &Path) -> Result<rustls::ClientConfig, String> {
    for f in [&o.ca_certificates, &o.client_certificate, &o.private_key].into_iter().flatten() {
        if !is_under(f, allowed_dir) {
            return Err(format!(
                "{} is outside {}, the only directory the agent reads TLS origination files from (--egress-tls-dir)",
                f.display(),
                allowed_dir.display()
            ));
        }
    }
    let roots_file = o.ca_certificates.as_deref().unwrap_or(Path::new(SYSTEM_ROOTS));
    let mut roots = rustls::RootCertStore::empty();
    for cert in pem_certs(roots_file)? {
        roots.add(cert).map_err(|e| format!("{}: {e}", roots_file.display()))?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots);
    if !o.mutual {
        return Ok(builder.with_no_client_auth());
    }
    let (Some(cert), Some(key)) = (&o.client_certificate, &o.private_key) else {
        return Err("MUTUAL without clientCertificate and privateKey".into());
    };
    let chain = pem_certs(cert)?;
    let key_pem = std::fs::read(key).map_err(|e| format!("{}: {e}", key.display()))?;
    let key = rustls_pemfile::private_key(&mut key_pem.as_slice())
        .map_err(|_| format!("{}: not PEM", key.display()))?
        .ok_or_else(|| format!("{}: no private key", key.display()))?;
    builder.with_client_auth_cert(chain, key).map_err(|e| e.to_string())
}

fn pem_certs(path: &Path) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let certs = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| format!("{}: not PEM", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no certificate", path.display()));
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

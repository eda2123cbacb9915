//! A mesh client driven by hand, for tests that play a hostile or misconfigured peer:
//! mutual TLS 1.3 to an agent's HBONE port with a certificate of the test's choosing,
//! an HTTP/2 CONNECT, then one HTTP/1.1 request through the tunnel. The outcome of each
//! step is reported, so a test can tell a TLS refusal from a CONNECT refusal from an
//! HTTP 403.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::{BodyExt as _, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use serde::Serialize;

/// What to send.
#[derive(Debug, Clone)]
pub struct Call {
    /// The agent's HBONE listener (`<pod ip>:15008`).
    pub addr: SocketAddr,
    /// The CONNECT target (`<pod ip>:<port>`).
    pub target: SocketAddr,
    /// PEM certificate chain to present; none: no client certificate.
    pub cert: Option<std::path::PathBuf>,
    /// PEM private key of `cert`.
    pub key: Option<std::path::PathBuf>,
    /// Request method and path sent through the tunnel.
    pub method: String,
    /// Request path.
    pub path: String,
    /// Host header.
    pub host: String,
}

/// How far the call got.
#[derive(Debug, Default, Serialize)]
pub struct Outcome {
    /// The TLS handshake error, if it failed (or the server refused the certificate).
    pub tls_error: Option<String>,
    /// Status the agent answered the CONNECT with.
    pub connect_status: Option<u16>,
    /// Status of the request through the tunnel.
    pub status: Option<u16>,
    /// Its body (first 2 KiB).
    pub body: Option<String>,
    /// Any later error.
    pub error: Option<String>,
}

/// Accepts any server certificate: the clients that use it test the server's checks,
/// not their own (here and in the hostile-client suite).
#[derive(Debug)]
pub struct AnyServer(pub Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn tls_config(call: &Call) -> anyhow::Result<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(provider)));
    let mut cfg = match (&call.cert, &call.key) {
        (Some(cert), Some(key)) => {
            let chain: Vec<CertificateDer<'static>> =
                rustls_pemfile::certs(&mut std::io::BufReader::new(std::fs::File::open(cert)?))
                    .collect::<Result<_, _>>()?;
            let key: PrivateKeyDer<'static> =
                rustls_pemfile::private_key(&mut std::io::BufReader::new(std::fs::File::open(key)?))?
                    .ok_or_else(|| anyhow::anyhow!("no private key in {}", key.display()))?;
            builder.with_client_auth_cert(chain, key)?
        }
        _ => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(cfg)
}

/// Runs `call`; every failure is reported in the outcome, not returned.
pub async fn run(call: &Call) -> Outcome {
    let mut out = Outcome::default();
    let cfg = match tls_config(call) {
        Ok(c) => c,
        Err(e) => {
            out.error = Some(format!("client setup: {e:#}"));
            return out;
        }
    };
    let tcp = match tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(call.addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            out.error = Some(format!("connect: {e}"));
            return out;
        }
        Err(_) => {
            out.error = Some("connect: timed out".into());
            return out;
        }
    };
    let name = ServerName::IpAddress(call.addr.ip().into());
    let tls = match tokio_rustls::TlsConnector::from(Arc::new(cfg)).connect(name, tcp).await {
        Ok(t) => t,
        Err(e) => {
            out.tls_error = Some(e.to_string());
            return out;
        }
    };
    // In TLS 1.3 the server judges the client certificate after the client is done: a
    // refusal arrives as an alert on the first read, which the HTTP/2 handshake makes.
    let (mut sender, conn) = match hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls)).await
    {
        Ok(pair) => pair,
        Err(e) => {
            out.tls_error = Some(error_chain(&e));
            return out;
        }
    };
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let connect = Request::builder().method(Method::CONNECT).uri(call.target.to_string()).body(Empty::<Bytes>::new());
    let res = match sender.send_request(connect.expect("valid CONNECT")).await {
        Ok(r) => r,
        Err(e) => {
            // The certificate refusal surfaces here when the handshake looked done.
            out.tls_error = Some(error_chain(&e));
            return out;
        }
    };
    out.connect_status = Some(res.status().as_u16());
    if !res.status().is_success() {
        return out;
    }
    let upgraded = match hyper::upgrade::on(res).await {
        Ok(u) => u,
        Err(e) => {
            out.error = Some(format!("upgrade: {e}"));
            return out;
        }
    };
    let (mut inner, conn) = match hyper::client::conn::http1::handshake(upgraded).await {
        Ok(pair) => pair,
        Err(e) => {
            out.error = Some(format!("HTTP/1.1 in the tunnel: {e}"));
            return out;
        }
    };
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let req = Request::builder()
        .method(call.method.as_str())
        .uri(call.path.as_str())
        .header(http::header::HOST, call.host.as_str())
        .body(Empty::<Bytes>::new());
    let req = match req {
        Ok(r) => r,
        Err(e) => {
            out.error = Some(format!("request: {e}"));
            return out;
        }
    };
    match tokio::time::timeout(Duration::from_secs(5), inner.send_request(req)).await {
        Ok(Ok(res)) => {
            out.status = Some(res.status().as_u16());
            let body = res.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
            out.body = Some(String::from_utf8_lossy(&body[..body.len().min(2048)]).into_owned());
        }
        Ok(Err(e)) => out.error = Some(format!("request through the tunnel: {e}")),
        Err(_) => out.error = Some("request through the tunnel: timed out".into()),
    }
    out
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

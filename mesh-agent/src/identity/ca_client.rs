//! The agent's side of the CA service: certificate signing requests for the workloads
//! of its node, authenticated by the agent's own token, and the trust bundle.
//!
//! The private key of a workload certificate is made here and never leaves the node;
//! the CA sees only the CSR. The CA's server certificate is checked against the mesh's
//! current roots and the CA's DNS name, so a rotated root also covers the CA itself.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};
use rustls::pki_types::{CertificateDer, ServerName};

use super::ca_protocol::{self, IstioCertificateRequest, IstioCertificateResponse, TrustBundle};
use super::{Error, Identity, PeerVerifier};

/// How long one call to the CA may take, connection and TLS included.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest certificate or trust-bundle answer read from the CA: a chain of a few
/// certificates.
const MAX_RESPONSE: usize = 256 * 1024;

/// Where the CA is and how the agent proves who it is.
#[derive(Debug, Clone)]
pub struct CaClient {
    /// `host:port` of the CA service.
    pub address: String,
    /// The DNS name in the CA's server certificate.
    pub server_name: String,
    /// The agent's token (a service-account token, or the lab's per-node token), read
    /// at each call: projected tokens rotate.
    pub token_file: Option<PathBuf>,
    /// The root file the agent started with, re-read at each call.
    pub root_file: Option<PathBuf>,
    /// The mesh's roots, which the CA's server certificate must chain to.
    pub verifier: PeerVerifier,
}

impl CaClient {
    /// The roots the CA's certificate may chain to: the current trust bundle, and the
    /// root file the agent started with, re-read at each call. An agent that missed a
    /// rotation's first step (the new root joining the bundle) gets back in once its
    /// root file (a ConfigMap the CA updates) has the new root.
    fn ca_roots(&self, root_file: Option<&std::path::Path>) -> Vec<CertificateDer<'static>> {
        let mut roots = self.verifier.roots();
        if let Some(path) = root_file
            && let Ok(pem) = std::fs::read(path)
        {
            for der in rustls_pemfile::certs(&mut pem.as_slice()).flatten() {
                if !roots.contains(&der) {
                    roots.push(der);
                }
            }
        }
        roots
    }
}

/// A certificate the CA issued: the workload's chain (leaf first, no root), its key,
/// and the roots the CA sent with it.
pub struct Issued {
    /// Leaf and intermediates.
    pub chain: Vec<CertificateDer<'static>>,
    /// The PKCS#8 key, made here.
    pub key: Vec<u8>,
    /// Self-signed certificates of the answer: the roots.
    pub roots: Vec<CertificateDer<'static>>,
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        f.debug_struct("Issued").field("chain", &self.chain.len()).field("roots", &self.roots.len()).finish()
    }
}

fn ca_error(reason: impl Into<String>) -> Error {
    Error::Ca(reason.into())
}

impl CaClient {
    /// Asks the CA for a certificate for `identity`, valid for `ttl`.
    pub async fn sign(&self, identity: &Identity, ttl: Duration) -> Result<Issued, Error> {
        let what = || identity.to_string();
        let key = KeyPair::generate().map_err(|source| Error::Generate { what: what(), source })?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        let uri = identity.to_string().try_into().map_err(|source| Error::Generate { what: what(), source })?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        let csr = params.serialize_request(&key).map_err(|source| Error::Generate { what: what(), source })?;
        let csr = csr.pem().map_err(|source| Error::Generate { what: what(), source })?;
        let request = IstioCertificateRequest::for_identity(
            csr,
            &identity.to_string(),
            ttl.as_secs().try_into().unwrap_or(i64::MAX),
        );
        let mut builder =
            http::Request::post(format!("https://{}{}", self.server_name, ca_protocol::CREATE_CERTIFICATE))
                .header(http::header::CONTENT_TYPE, "application/grpc")
                .header("te", "trailers");
        if let Some(token) = self.token()? {
            builder = builder.header(http::header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let req = builder.body(Full::new(ca_protocol::frame(&request))).map_err(|e| ca_error(e.to_string()))?;
        let (parts, body, trailers) = self.call(req, MAX_RESPONSE).await?;
        let status = trailers.as_ref().and_then(ca_protocol::read_status).or_else(|| ca_protocol::read_status(&parts));
        match status {
            Some(s) if s.code == ca_protocol::status::OK => {}
            Some(s) => return Err(ca_error(format!("the CA refused {identity}: {} (gRPC {})", s.message, s.code))),
            None => return Err(ca_error(format!("the CA answered {} without a gRPC status", parts_status(&parts)))),
        }
        let response: IstioCertificateResponse = ca_protocol::unframe(&body).map_err(ca_error)?;
        let mut chain = Vec::new();
        let mut roots = Vec::new();
        for pem in &response.cert_chain {
            for der in rustls_pemfile::certs(&mut pem.as_bytes()) {
                let der = der.map_err(|e| ca_error(format!("certificate in the CA's answer: {e}")))?;
                if is_self_signed(&der) { roots.push(der) } else { chain.push(der) }
            }
        }
        let leaf = chain.first().ok_or_else(|| ca_error("the CA's answer has no certificate"))?;
        if super::peer_identity(leaf).as_ref() != Some(identity) {
            return Err(ca_error(format!("the CA issued a certificate that does not name {identity}")));
        }
        Ok(Issued { chain, key: key.serialize_der(), roots })
    }

    /// The CA's trust bundle.
    pub async fn trust_bundle(&self) -> Result<TrustBundle, Error> {
        let req = http::Request::get(format!("https://{}{}", self.server_name, ca_protocol::TRUST_BUNDLE))
            .body(Full::new(Bytes::new()))
            .map_err(|e| ca_error(e.to_string()))?;
        let (parts, body, _) = self.call(req, MAX_RESPONSE).await?;
        if parts_status(&parts) != "200" {
            return Err(ca_error(format!("the CA answered HTTP {} for its trust bundle", parts_status(&parts))));
        }
        serde_json::from_slice(&body).map_err(|e| ca_error(format!("trust bundle: {e}")))
    }

    /// The mesh's other clusters, from the remote secrets the CA holds.
    pub async fn remote_clusters(&self) -> Result<Vec<ca_protocol::RemoteCluster>, Error> {
        let mut builder = http::Request::get(format!("https://{}{}", self.server_name, ca_protocol::REMOTE_CLUSTERS));
        if let Some(token) = self.token()? {
            builder = builder.header(http::header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let req = builder.body(Full::new(Bytes::new())).map_err(|e| ca_error(e.to_string()))?;
        let (parts, body, _) = self.call(req, ca_protocol::MAX_REMOTE_CLUSTERS_ANSWER).await?;
        if parts_status(&parts) != "200" {
            let why = String::from_utf8_lossy(&body[..body.len().min(200)]).trim().to_string();
            return Err(ca_error(format!(
                "the CA answered HTTP {} for the remote clusters: {why}",
                parts_status(&parts)
            )));
        }
        serde_json::from_slice(&body).map_err(|e| ca_error(format!("remote clusters: {e}")))
    }

    fn token(&self) -> Result<Option<String>, Error> {
        let Some(path) = &self.token_file else { return Ok(None) };
        let token = std::fs::read_to_string(path).map_err(|source| Error::CaFile { path: path.clone(), source })?;
        Ok(Some(token.trim().to_string()))
    }

    /// One HTTP/2 request over a fresh TLS connection: its headers (the status as
    /// `:status`-less map plus the response code folded in), body and trailers.
    async fn call(
        &self,
        req: http::Request<Full<Bytes>>,
        limit: usize,
    ) -> Result<(http::HeaderMap, Bytes, Option<http::HeaderMap>), Error> {
        tokio::time::timeout(CALL_TIMEOUT, self.call_inner(req, limit))
            .await
            .map_err(|_| ca_error(format!("no answer from the CA at {} within {CALL_TIMEOUT:?}", self.address)))?
    }

    async fn call_inner(
        &self,
        req: http::Request<Full<Bytes>>,
        limit: usize,
    ) -> Result<(http::HeaderMap, Bytes, Option<http::HeaderMap>), Error> {
        let unreachable = |e: &dyn std::fmt::Display| ca_error(format!("CA at {}: {e}", self.address));
        let tcp = tokio::net::TcpStream::connect(&self.address).await.map_err(|e| unreachable(&e))?;
        let mut roots = rustls::RootCertStore::empty();
        for r in self.ca_roots(self.root_file.as_deref()) {
            roots.add(r)?;
        }
        let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(roots)
            .with_no_client_auth();
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        let name = ServerName::try_from(self.server_name.clone()).map_err(|e| unreachable(&e))?;
        let tls =
            tokio_rustls::TlsConnector::from(Arc::new(cfg)).connect(name, tcp).await.map_err(|e| unreachable(&e))?;
        let (mut sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .handshake(TokioIo::new(tls))
            .await
            .map_err(|e| unreachable(&e))?;
        tokio::spawn(conn);
        let res = sender.send_request(req).await.map_err(|e| unreachable(&e))?;
        let (parts, body) = res.into_parts();
        let collected = Limited::new(body, limit).collect().await.map_err(|e| unreachable(&e))?;
        let trailers = collected.trailers().cloned();
        let mut headers = parts.headers;
        headers.insert("x-mesh-http-status", http::HeaderValue::from(parts.status.as_u16()));
        if !parts.status.is_success() && ca_protocol::read_status(&headers).is_none() && trailers.is_none() {
            return Err(ca_error(format!("the CA answered HTTP {}", parts.status)));
        }
        Ok((headers, collected.to_bytes(), trailers))
    }
}

fn parts_status(h: &http::HeaderMap) -> String {
    h.get("x-mesh-http-status").and_then(|v| v.to_str().ok()).unwrap_or("?").to_string()
}

fn is_self_signed(der: &CertificateDer<'_>) -> bool {
    x509_parser::parse_x509_certificate(der).is_ok_and(|(_, c)| c.subject() == c.issuer())
}

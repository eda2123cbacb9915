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

use super::ca_protocol::{self, IstioCertificateRequest, IstioCertificateResponse, TrustBundle, Watch};
use super::{Error, Identity, PeerVerifier};

/// How long one call to the CA may take, connection and TLS included.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest certificate or trust-bundle answer read from the CA: a chain of a few
/// certificates.
const MAX_RESPONSE: usize = 256 * 1024;

/// How long the agent lets the CA hold a watch: the longest the CA holds one.
pub const WATCH_WAIT: Duration = ca_protocol::MAX_WATCH_WAIT;
/// The least time between two asks of one watch, whatever the answers: a CA whose
/// answers never settle costs one ask a second, not a busy loop.
const MIN_ASK_GAP: Duration = Duration::from_secs(1);

/// Whether a `GET` carries the agent's token.
#[derive(Debug, Clone, Copy)]
enum Token {
    /// Not sent.
    None,
    /// Sent when it can be read.
    IfReadable,
    /// Sent, and the ask fails without it.
    Required,
}

/// What one ask of a watch came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Asked {
    /// An answer other than the one held.
    News,
    /// The answer held already: the wait ended, or the CA did not hold the ask.
    Nothing,
    /// No answer.
    Failed,
}

/// A watch of the CA as its follower keeps it: the version held, and when to ask
/// again: at once after news or a held ask (the next ask waits at the CA), `every`
/// after an ask that came back at once with nothing (a CA that does not hold) and after
/// a failure.
#[derive(Debug)]
pub struct Pace {
    every: Duration,
    asked_at: tokio::time::Instant,
    held: Option<Watch>,
}

impl Pace {
    /// Pacing at `every`, the first ask starting now, with nothing held yet.
    pub fn new(every: Duration) -> Self {
        Self { every, asked_at: tokio::time::Instant::now(), held: None }
    }

    /// The watch to ask with: None before the first answer.
    pub fn watch(&self) -> Option<&Watch> {
        self.held.as_ref()
    }

    /// An answer of `version` came: news unless it is the version held.
    pub fn answered(&mut self, version: String) -> Asked {
        let asked = if self.held.as_ref().is_some_and(|w| w.version == version) { Asked::Nothing } else { Asked::News };
        self.held = Some(Watch { version, wait: WATCH_WAIT });
        asked
    }

    /// Whether the ask that came to `asked` runs seldom: it brought news, or the CA held
    /// it for at least `every`. Against a CA that answers at once, the same ask runs
    /// every `every`: its code is best left mapped.
    pub fn seldom(&self, asked: Asked) -> bool {
        asked == Asked::News || (asked == Asked::Nothing && self.asked_at.elapsed() >= self.every)
    }

    /// Waits until the next ask, after one that came to `asked`; false if `stop` came
    /// first.
    pub async fn next(&mut self, asked: Asked, stop: &tokio_util::sync::CancellationToken) -> bool {
        let took = self.asked_at.elapsed();
        let gap = match asked {
            Asked::Failed => self.every,
            Asked::Nothing if took < self.every => self.every - took,
            Asked::News | Asked::Nothing => MIN_ASK_GAP.saturating_sub(took),
        };
        tokio::select! {
            () = stop.cancelled() => return false,
            () = tokio::time::sleep(gap) => {}
        }
        self.asked_at = tokio::time::Instant::now();
        true
    }
}

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
        let (parts, body, trailers) = self.call(req, MAX_RESPONSE, Duration::ZERO).await?;
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

    /// The CA's trust bundle and its version. With `watch`, the CA may hold the ask
    /// until its bundle differs from the one of that version (a long poll; see
    /// [`ca_protocol`]): the agent's token goes with it, as the CA holds only callers it
    /// knows.
    pub async fn trust_bundle(&self, watch: Option<&Watch>) -> Result<(TrustBundle, String), Error> {
        let token = if watch.is_some() { Token::IfReadable } else { Token::None };
        let body = self.get(ca_protocol::TRUST_BUNDLE, watch, token, MAX_RESPONSE).await?;
        let bundle = serde_json::from_slice(&body).map_err(|e| ca_error(format!("trust bundle: {e}")))?;
        Ok((bundle, ca_protocol::version_of(&body)))
    }

    /// The mesh's other clusters, from the remote secrets the CA holds, and the version
    /// of the answer; with `watch`, a long poll as for [`CaClient::trust_bundle`].
    pub async fn remote_clusters(
        &self,
        watch: Option<&Watch>,
    ) -> Result<(Vec<ca_protocol::RemoteCluster>, String), Error> {
        let body = self
            .get(ca_protocol::REMOTE_CLUSTERS, watch, Token::Required, ca_protocol::MAX_REMOTE_CLUSTERS_ANSWER)
            .await?;
        let clusters = serde_json::from_slice(&body).map_err(|e| ca_error(format!("remote clusters: {e}")))?;
        Ok((clusters, ca_protocol::version_of(&body)))
    }

    /// The body of a `GET` of `path` answered 200, sent with the agent's token as
    /// `token` says.
    async fn get(&self, path: &str, watch: Option<&Watch>, token: Token, limit: usize) -> Result<Bytes, Error> {
        let uri = match watch {
            Some(w) => format!("https://{}{path}?{}", self.server_name, w.query()),
            None => format!("https://{}{path}", self.server_name),
        };
        let token = match token {
            Token::None => None,
            // Without its token the ask is still answered, only not held.
            Token::IfReadable => self.token().ok().flatten(),
            Token::Required => self.token()?,
        };
        let mut builder = http::Request::get(uri);
        if let Some(token) = token {
            builder = builder.header(http::header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let req = builder.body(Full::new(Bytes::new())).map_err(|e| ca_error(e.to_string()))?;
        let held = watch.map_or(Duration::ZERO, |w| w.wait);
        let (parts, body, _) = self.call(req, limit, held).await?;
        if parts_status(&parts) != "200" {
            let why = String::from_utf8_lossy(&body[..body.len().min(200)]).trim().to_string();
            return Err(ca_error(format!("the CA answered HTTP {} for {path}: {why}", parts_status(&parts))));
        }
        Ok(body)
    }

    fn token(&self) -> Result<Option<String>, Error> {
        let Some(path) = &self.token_file else { return Ok(None) };
        let token = std::fs::read_to_string(path).map_err(|source| Error::CaFile { path: path.clone(), source })?;
        Ok(Some(token.trim().to_string()))
    }

    /// One HTTP/2 request over a fresh TLS connection: its headers (the status as
    /// `:status`-less map plus the response code folded in), body and trailers. The CA
    /// may take [`CALL_TIMEOUT`], plus `held` for a watch.
    async fn call(
        &self,
        req: http::Request<Full<Bytes>>,
        limit: usize,
        held: Duration,
    ) -> Result<(http::HeaderMap, Bytes, Option<http::HeaderMap>), Error> {
        let timeout = CALL_TIMEOUT + held;
        tokio::time::timeout(timeout, self.call_inner(req, limit))
            .await
            .map_err(|_| ca_error(format!("no answer from the CA at {} within {timeout:?}", self.address)))?
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

#[cfg(test)]
mod tests {
    use tokio::time::Instant;
    use tokio_util::sync::CancellationToken;

    use super::*;

    /// How long `Pace::next` waits after an ask that took `took` and came to `asked`.
    async fn gap(every: Duration, took: Duration, asked: Asked) -> Duration {
        let mut pace = Pace::new(every);
        tokio::time::sleep(took).await;
        let start = Instant::now();
        assert!(pace.next(asked, &CancellationToken::new()).await);
        start.elapsed()
    }

    #[tokio::test(start_paused = true)]
    async fn a_held_watch_is_asked_again_at_once_an_unheld_one_at_the_pace() {
        let every = Duration::from_secs(10);
        // The CA held the ask until its wait ended, or answered news: ask again now.
        assert_eq!(gap(every, WATCH_WAIT, Asked::Nothing).await, Duration::ZERO);
        assert_eq!(gap(every, Duration::from_secs(42), Asked::News).await, Duration::ZERO);
        // News at once, over and over: no faster than one ask a second.
        assert_eq!(gap(every, Duration::from_millis(10), Asked::News).await, Duration::from_millis(990));
        // A CA that answers at once with nothing new is asked every `every`.
        assert_eq!(gap(every, Duration::from_millis(10), Asked::Nothing).await, Duration::from_millis(9990));
        assert_eq!(gap(every, Duration::from_secs(3), Asked::Failed).await, every);
    }

    #[tokio::test(start_paused = true)]
    async fn an_answer_is_news_unless_its_version_is_held() {
        let mut pace = Pace::new(Duration::from_secs(10));
        assert_eq!(pace.watch(), None);
        assert_eq!(pace.answered("aa".into()), Asked::News, "the first answer");
        assert_eq!(pace.watch(), Some(&Watch { version: "aa".into(), wait: WATCH_WAIT }));
        assert_eq!(pace.answered("aa".into()), Asked::Nothing);
        assert_eq!(pace.answered("bb".into()), Asked::News);
        assert_eq!(pace.watch().map(|w| w.version.as_str()), Some("bb"));
    }

    #[tokio::test(start_paused = true)]
    async fn news_and_held_asks_are_seldom_unheld_ones_are_not() {
        let every = Duration::from_secs(10);
        let pace = Pace::new(every);
        assert!(pace.seldom(Asked::News));
        assert!(!pace.seldom(Asked::Nothing), "answered at once: asked again in `every`");
        assert!(!pace.seldom(Asked::Failed));
        tokio::time::sleep(WATCH_WAIT).await;
        assert!(pace.seldom(Asked::Nothing), "held by the CA");
    }

    #[tokio::test(start_paused = true)]
    async fn stopping_ends_the_wait() {
        let stop = CancellationToken::new();
        stop.cancel();
        assert!(!Pace::new(Duration::from_secs(10)).next(Asked::Failed, &stop).await);
    }
}

//! What agents and the CA service say to each other: Istio's certificate service
//! (`istio.v1.auth.IstioCertificateService/CreateCertificate`, gRPC over HTTP/2 and
//! TLS, as istiod serves it to ztunnel: a CSR, a validity and the identity the caller
//! asks for on a workload's behalf in `metadata.ImpersonatedIdentity`), plus the mesh's
//! trust bundle as a plain `GET`, which agents follow so a root rotation reaches them
//! without a restart.
//!
//! The trust bundle and the remote clusters are followed by long polls: an
//! authenticated `GET` that names the version the caller holds ([`Watch`]) is answered
//! when the answer differs from it, or after the wait it asks for (at most
//! [`MAX_WATCH_WAIT`]), whichever comes first. An idle agent then wakes once per wait
//! instead of once per poll, and a change reaches it at once. A CA that does not hold
//! (an older one, or one whose budget of held requests is spent) answers at once; the
//! caller then asks again at its own pace.
//!
//! Messages are written with prost's derive (the `.proto` is three fields); the gRPC
//! framing (a flag byte and a 32-bit length before each message; `grpc-status` in the
//! trailers) is written here.

use std::time::Duration;

use bytes::{BufMut as _, Bytes, BytesMut};
use serde::{Deserialize, Serialize};

/// The RPC's path.
pub const CREATE_CERTIFICATE: &str = "/istio.v1.auth.IstioCertificateService/CreateCertificate";
/// The trust bundle's path.
pub const TRUST_BUNDLE: &str = "/v1/trust-bundle";
/// The kubeconfigs of the mesh's other clusters (from the remote secrets), for agents.
pub const REMOTE_CLUSTERS: &str = "/v1/remote-clusters";
/// The most clusters the CA hands out; more is a misconfiguration, not a mesh.
pub const MAX_REMOTE_CLUSTERS: usize = 64;
/// The largest kubeconfig the CA hands out (a token and a CA are a few KiB).
pub const MAX_KUBECONFIG: usize = 64 * 1024;
/// The largest remote-clusters answer: every cluster at the largest kubeconfig, each
/// byte escaped at most to two in JSON, and the names and punctuation around it.
pub const MAX_REMOTE_CLUSTERS_ANSWER: usize = MAX_REMOTE_CLUSTERS * (2 * MAX_KUBECONFIG + 512);
/// The metadata key naming the identity asked for on a workload's behalf.
pub const IMPERSONATED_IDENTITY: &str = "ImpersonatedIdentity";
/// The port istiod serves its CA on, and the mesh's CA service too.
pub const CA_PORT: u16 = 15012;
/// The largest request body the CA reads: a CSR is well under 2 KiB.
pub const MAX_REQUEST: usize = 64 * 1024;

/// The longest a CA holds a watch before answering with what it has.
pub const MAX_WATCH_WAIT: Duration = Duration::from_secs(300);

/// A long poll: the version of the answer the caller holds, and how long it may wait
/// for a different one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Watch {
    /// [`version_of`] the answer held.
    pub version: String,
    /// How long the answer may be held while unchanged.
    pub wait: Duration,
}

impl Watch {
    /// The query string that asks for it.
    pub fn query(&self) -> String {
        format!("version={}&wait={}", self.version, self.wait.as_secs())
    }

    /// The watch a request's query asks for; None for a plain request or a query that
    /// is not one (the request is then answered at once).
    pub fn parse(query: Option<&str>) -> Option<Self> {
        let (mut version, mut wait) = (None, None);
        for pair in query?.split('&') {
            match pair.split_once('=')? {
                ("version", v) if (1..=64).contains(&v.len()) && v.bytes().all(|b| b.is_ascii_hexdigit()) => {
                    version = Some(v.to_string());
                }
                ("wait", w) => wait = Some(Duration::from_secs(w.parse().ok()?).min(MAX_WATCH_WAIT)),
                _ => return None,
            }
        }
        Some(Self { version: version?, wait: wait? })
    }
}

/// The version of an answer's body: what a [`Watch`] names. Computed alike on both
/// sides, so a CA that sends no version still lets its caller tell news from none.
pub fn version_of(body: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, body);
    digest.as_ref()[..16].iter().map(|b| format!("{b:02x}")).collect()
}

/// A cluster of the mesh other than the caller's, as a remote secret names it: what the
/// agents watch it with. The kubeconfig holds a token: never logged.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteCluster {
    /// The cluster's name (the remote secret's data key).
    pub name: String,
    /// A kubeconfig for its API server (YAML).
    pub kubeconfig: String,
}

impl std::fmt::Debug for RemoteCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteCluster").field("name", &self.name).finish_non_exhaustive()
    }
}

/// `istio.v1.auth.IstioCertificateRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct IstioCertificateRequest {
    /// PEM-encoded certificate signing request.
    #[prost(string, tag = "1")]
    pub csr: String,
    /// Requested validity, in seconds.
    #[prost(int64, tag = "3")]
    pub validity_duration: i64,
    /// `ImpersonatedIdentity` (a SPIFFE URI) and other fields.
    #[prost(message, optional, tag = "4")]
    pub metadata: Option<prost_types::Struct>,
}

/// `istio.v1.auth.IstioCertificateResponse`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct IstioCertificateResponse {
    /// PEM certificates: the workload's first, then intermediates, then the roots.
    #[prost(string, repeated, tag = "1")]
    pub cert_chain: Vec<String>,
}

impl IstioCertificateRequest {
    /// A request for `identity` (impersonated), with `csr` and `ttl_secs`.
    pub fn for_identity(csr: String, identity: &str, ttl_secs: i64) -> Self {
        let value = prost_types::Value { kind: Some(prost_types::value::Kind::StringValue(identity.to_string())) };
        let metadata = prost_types::Struct { fields: [(IMPERSONATED_IDENTITY.to_string(), value)].into() };
        Self { csr, validity_duration: ttl_secs, metadata: Some(metadata) }
    }

    /// The identity asked for on a workload's behalf, if any.
    pub fn impersonated_identity(&self) -> Option<&str> {
        match self.metadata.as_ref()?.fields.get(IMPERSONATED_IDENTITY)?.kind.as_ref()? {
            prost_types::value::Kind::StringValue(s) => Some(s),
            _ => None,
        }
    }
}

/// The mesh's trust bundle: every root a workload certificate may chain to (two during
/// a rotation), and which signing certificate issues now, so agents re-issue their
/// certificates when it changes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrustBundle {
    /// PEM roots.
    pub roots: Vec<String>,
    /// SHA-256 (hex) of the signing certificate (DER).
    pub issuer: String,
}

/// A gRPC status code and message, as sent in the trailers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrpcStatus {
    /// `grpc-status`.
    pub code: u32,
    /// `grpc-message`.
    pub message: String,
}

/// gRPC status codes the CA uses.
pub mod status {
    /// Success.
    pub const OK: u32 = 0;
    /// The request is malformed.
    pub const INVALID_ARGUMENT: u32 = 3;
    /// The caller may not have what it asked for.
    pub const PERMISSION_DENIED: u32 = 7;
    /// The CA cannot serve now.
    pub const UNAVAILABLE: u32 = 14;
    /// The caller is not known.
    pub const UNAUTHENTICATED: u32 = 16;
}

/// One message in gRPC's length-prefixed framing (uncompressed).
pub fn frame(message: &impl prost::Message) -> Bytes {
    let body = message.encode_to_vec();
    let mut out = BytesMut::with_capacity(5 + body.len());
    out.put_u8(0);
    out.put_u32(body.len() as u32);
    out.put_slice(&body);
    out.freeze()
}

/// The one message in a gRPC request or response body. Compressed or trailing data is
/// refused: neither side sends it.
pub fn unframe<M: prost::Message + Default>(body: &[u8]) -> Result<M, String> {
    let [flag, a, b, c, d, rest @ ..] = body else { return Err("gRPC body shorter than its frame header".into()) };
    if *flag != 0 {
        return Err("compressed gRPC messages are not accepted".into());
    }
    let len = u32::from_be_bytes([*a, *b, *c, *d]) as usize;
    if rest.len() != len {
        return Err(format!("gRPC frame says {len} bytes, the body has {}", rest.len()));
    }
    M::decode(rest).map_err(|e| format!("invalid message: {e}"))
}

/// The trailers of a gRPC response.
pub fn status_headers(s: &GrpcStatus) -> http::HeaderMap {
    let mut h = http::HeaderMap::new();
    h.insert("grpc-status", http::HeaderValue::from(s.code));
    // grpc-message is percent-encoded; the CA's messages are ASCII text.
    let msg: String = s.message.chars().map(|c| if c.is_ascii_graphic() || c == ' ' { c } else { '?' }).collect();
    if let Ok(v) = http::HeaderValue::from_str(&msg.replace('%', "%25")) {
        h.insert("grpc-message", v);
    }
    h
}

/// The status in `headers` (trailers, or the headers of a trailers-only response).
pub fn read_status(headers: &http::HeaderMap) -> Option<GrpcStatus> {
    let code = headers.get("grpc-status")?.to_str().ok()?.parse().ok()?;
    let message =
        headers.get("grpc-message").and_then(|v| v.to_str().ok()).map(|m| m.replace("%25", "%")).unwrap_or_default();
    Some(GrpcStatus { code, message })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_frame_and_unframe_as_istio_writes_them() {
        let req = IstioCertificateRequest::for_identity(
            "-----BEGIN CERTIFICATE REQUEST-----".into(),
            "spiffe://cluster.local/ns/production/sa/myapp",
            86_400,
        );
        let framed = frame(&req);
        assert_eq!(framed[0], 0);
        assert_eq!(u32::from_be_bytes([framed[1], framed[2], framed[3], framed[4]]) as usize, framed.len() - 5);
        let back: IstioCertificateRequest = unframe(&framed).unwrap();
        assert_eq!(back.impersonated_identity(), Some("spiffe://cluster.local/ns/production/sa/myapp"));
        assert_eq!(back.validity_duration, 86_400);
        // Field 1 (csr) is a length-delimited string, field 3 a varint: Istio's tags.
        let body = &framed[5..];
        assert_eq!(body[0], (1 << 3) | 2);
        assert!(body.windows(2).any(|w| w == [3 << 3, 0x80]), "validity_duration under tag 3");

        assert!(unframe::<IstioCertificateRequest>(&framed[..framed.len() - 1]).is_err());
        let mut compressed = framed.to_vec();
        compressed[0] = 1;
        assert!(unframe::<IstioCertificateRequest>(&compressed).unwrap_err().contains("compressed"));
    }

    #[test]
    fn statuses_survive_the_trailers() {
        let s = GrpcStatus { code: status::PERMISSION_DENIED, message: "pod not on node1: 100% sure".into() };
        assert_eq!(read_status(&status_headers(&s)), Some(s));
    }

    #[test]
    fn a_watch_is_its_query_and_nothing_else_is() {
        let w = Watch { version: version_of(b"roots"), wait: Duration::from_secs(300) };
        assert_eq!(w.version.len(), 32);
        assert_eq!(Watch::parse(Some(&w.query())), Some(w.clone()));
        assert_eq!(Watch::parse(Some("wait=300&version=ab")).map(|w| w.version), Some("ab".to_string()));
        // The wait is the CA's to cap.
        assert_eq!(Watch::parse(Some("version=ab&wait=86400")).map(|w| w.wait), Some(MAX_WATCH_WAIT));
        for plain in
            [None, Some(""), Some("version=ab"), Some("wait=3"), Some("version=zz&wait=3"), Some("version=ab&wait=-1")]
        {
            assert_eq!(Watch::parse(plain), None, "{plain:?}");
        }
        assert_eq!(Watch::parse(Some("version=ab&wait=3&other=1")), None);
        assert_ne!(version_of(b"roots"), version_of(b"roots2"));
    }
}

//! Who may read `/metrics` on the node-facing ports.
//!
//! The metrics name every workload and principal that talked to this node's pods, and
//! the metrics port is reachable from every pod: a scraper must prove it is one. In a
//! cluster, as kube-rbac-proxy and controller-runtime's secure metrics do: the bearer
//! token goes to TokenReview, then SubjectAccessReview asks whether its user may `get`
//! the non-resource URL (`/metrics`); Prometheus' service account has that through a
//! ClusterRole (`mesh-metrics-reader` in the manifests). In the lab, a file of tokens.
//! The admin address (loopback) is not checked: whoever reaches it is on the node.
//! Tokens are never logged; decisions are cached by the SHA-256 of the token and the
//! path asked for (SubjectAccessReview judges one path) for a minute.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::authorization::v1::{NonResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec};
use kube::api::{Api, PostParams};

/// How long a decision about a token holds.
const CACHE_TTL: Duration = Duration::from_secs(60);
/// Decisions kept at most; the cache starts over when full (a flood of made-up tokens
/// must not grow it).
const CACHE_MAX: usize = 1024;
/// Reviews in flight at once; more callers are told to come back (429).
const REVIEWS_IN_FLIGHT: usize = 8;

/// How `--metrics-auth` was given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScrapeAuthMode {
    /// `auto`: `kubernetes` when the config comes from the API server, else `none`.
    Auto,
    /// `none`: anyone who reaches the port.
    None,
    /// `kubernetes`: TokenReview and SubjectAccessReview.
    Kubernetes,
    /// `token-file:PATH`: one bearer token per line.
    TokenFile(PathBuf),
}

impl std::str::FromStr for ScrapeAuthMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "none" => Ok(Self::None),
            "kubernetes" => Ok(Self::Kubernetes),
            _ => match s.strip_prefix("token-file:") {
                Some(p) if !p.is_empty() => Ok(Self::TokenFile(p.into())),
                _ => Err(format!("{s:?}: expected auto, none, kubernetes or token-file:PATH")),
            },
        }
    }
}

/// Why a scrape was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// No or an unknown token (401).
    #[error("unauthenticated: {0}")]
    Unauthenticated(String),
    /// A known user without the permission (403).
    #[error("forbidden: {0}")]
    Forbidden(String),
    /// Too many reviews in flight (429).
    #[error("too many reviews in flight")]
    Busy,
}

/// Digest of (path, token) -> (decided at, decision).
type DecisionCache = HashMap<[u8; 32], (Instant, Result<(), Refusal>)>;

/// The check applied to `/metrics`.
pub enum ScrapeAuth {
    /// No check.
    Open,
    /// SHA-256 digests of the accepted tokens.
    Tokens(HashSet<[u8; 32]>),
    /// TokenReview + SubjectAccessReview.
    Kube {
        /// API client.
        client: kube::Client,
        /// Digest of (path, token) -> (decided at, decision).
        cache: Mutex<DecisionCache>,
        /// Reviews in flight.
        reviews: tokio::sync::Semaphore,
    },
}

impl std::fmt::Debug for ScrapeAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ScrapeAuth::Open => f.write_str("Open"),
            ScrapeAuth::Tokens(t) => f.debug_struct("Tokens").field("count", &t.len()).finish(),
            ScrapeAuth::Kube { .. } => f.write_str("Kube"),
        }
    }
}

fn digest(token: &str) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

impl ScrapeAuth {
    /// Builds the check for `mode`; `client` is the API client in cluster mode.
    pub fn new(mode: &ScrapeAuthMode, client: Option<&kube::Client>) -> Result<Self, String> {
        match (mode, client) {
            (ScrapeAuthMode::None, _) | (ScrapeAuthMode::Auto, None) => Ok(ScrapeAuth::Open),
            (ScrapeAuthMode::Kubernetes, None) => {
                Err("--metrics-auth kubernetes needs the Kubernetes config source".into())
            }
            (ScrapeAuthMode::Kubernetes | ScrapeAuthMode::Auto, Some(c)) => Ok(ScrapeAuth::Kube {
                client: c.clone(),
                cache: Mutex::default(),
                reviews: tokio::sync::Semaphore::new(REVIEWS_IN_FLIGHT),
            }),
            (ScrapeAuthMode::TokenFile(path), _) => Self::from_token_file(path),
        }
    }

    /// Reads one token per line (`#` comments and blank lines allowed).
    pub fn from_token_file(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("metrics token file {}: {e}", path.display()))?;
        let tokens: HashSet<_> =
            text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).map(digest).collect();
        if tokens.is_empty() {
            return Err(format!("metrics token file {}: no token in it", path.display()));
        }
        Ok(ScrapeAuth::Tokens(tokens))
    }

    /// Whether a request with `authorization` (the header's value) may read `path`.
    pub async fn check(&self, authorization: Option<&[u8]>, path: &str) -> Result<(), Refusal> {
        if matches!(self, ScrapeAuth::Open) {
            return Ok(());
        }
        let token = authorization
            .and_then(|v| std::str::from_utf8(v).ok())
            .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| Refusal::Unauthenticated("a bearer token is required".into()))?;
        match self {
            ScrapeAuth::Open => Ok(()),
            ScrapeAuth::Tokens(tokens) => {
                if tokens.contains(&digest(token)) {
                    Ok(())
                } else {
                    Err(Refusal::Unauthenticated("unknown token".into()))
                }
            }
            ScrapeAuth::Kube { client, cache, reviews } => {
                // The decision is for this path: a user allowed one is not allowed all.
                let key = digest(&format!("{path}\n{token}"));
                if let Some((at, decision)) = cache.lock().unwrap_or_else(|p| p.into_inner()).get(&key)
                    && at.elapsed() < CACHE_TTL
                {
                    return decision.clone();
                }
                let Ok(_in_flight) = reviews.try_acquire() else { return Err(Refusal::Busy) };
                let decision = review(client, token, path).await;
                let mut cache = cache.lock().unwrap_or_else(|p| p.into_inner());
                if cache.len() >= CACHE_MAX {
                    cache.clear();
                }
                cache.insert(key, (Instant::now(), decision.clone()));
                decision
            }
        }
    }
}

async fn review(client: &kube::Client, token: &str, path: &str) -> Result<(), Refusal> {
    let tr =
        TokenReview { spec: TokenReviewSpec { token: Some(token.to_string()), audiences: None }, ..Default::default() };
    let answer = Api::<TokenReview>::all(client.clone())
        .create(&PostParams::default(), &tr)
        .await
        .map_err(|e| Refusal::Unauthenticated(format!("TokenReview failed: {e}")))?;
    let status = answer.status.unwrap_or_default();
    if status.authenticated != Some(true) {
        return Err(Refusal::Unauthenticated("the API server did not authenticate the token".into()));
    }
    let user = status.user.unwrap_or_default();
    let name = user.username.clone().unwrap_or_default();
    let sar = SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: user.username,
            groups: user.groups,
            uid: user.uid,
            extra: user.extra,
            non_resource_attributes: Some(NonResourceAttributes {
                path: Some(path.to_string()),
                verb: Some("get".into()),
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    let answer = Api::<SubjectAccessReview>::all(client.clone())
        .create(&PostParams::default(), &sar)
        .await
        .map_err(|e| Refusal::Forbidden(format!("SubjectAccessReview failed: {e}")))?;
    match answer.status {
        Some(s) if s.allowed => Ok(()),
        _ => Err(Refusal::Forbidden(format!("{name} may not get {path}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_token_file_admits_its_tokens_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("tokens");
        std::fs::write(&file, "# prometheus\nscrape-secret\n").unwrap();
        let auth = ScrapeAuth::new(&ScrapeAuthMode::TokenFile(file.clone()), None).unwrap();
        assert_eq!(auth.check(Some(b"Bearer scrape-secret"), "/metrics").await, Ok(()));
        assert!(matches!(auth.check(Some(b"Bearer other"), "/metrics").await, Err(Refusal::Unauthenticated(_))));
        assert!(matches!(auth.check(None, "/metrics").await, Err(Refusal::Unauthenticated(_))));
        assert!(matches!(auth.check(Some(b"Basic c2NyYXBl"), "/metrics").await, Err(Refusal::Unauthenticated(_))));
        assert!(!format!("{auth:?}").contains("secret"), "tokens never printed");
        std::fs::write(&file, "# nothing\n").unwrap();
        assert!(ScrapeAuth::from_token_file(&file).unwrap_err().contains("no token"));
    }

    #[test]
    fn modes_parse_and_kubernetes_needs_the_api() {
        assert_eq!("token-file:/x".parse::<ScrapeAuthMode>(), Ok(ScrapeAuthMode::TokenFile("/x".into())));
        assert!("token-file:".parse::<ScrapeAuthMode>().is_err());
        assert!("open".parse::<ScrapeAuthMode>().unwrap_err().contains("expected"));
        assert!(matches!(ScrapeAuth::new(&ScrapeAuthMode::Auto, None), Ok(ScrapeAuth::Open)));
        assert!(ScrapeAuth::new(&ScrapeAuthMode::Kubernetes, None).is_err());
    }
}

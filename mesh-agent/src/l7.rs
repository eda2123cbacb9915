//! L7 traffic management on the client side: VirtualService routing (`route`),
//! DestinationRule policies (`policy`), endpoint choice, circuit breaking and outlier
//! ejection (`balance`), upstream connections (`upstream`), and the HTTP server that
//! ties them together for a captured connection (`server`).
//!
//! Architecture invariant: everything compiled from config lives in the immutable
//! snapshot; everything that counts (in-flight requests, ejections, idle connections)
//! lives in [`Runtime`], which outlives snapshots.

pub mod balance;
pub mod policy;
pub mod route;
pub mod server;
pub mod upstream;

use std::sync::Arc;

use route::{Action, Backend, RetryPolicy, Rule, WeightedBackend};

/// Counters and connections shared by every pod proxy of the agent.
#[derive(Debug, Default)]
pub struct Runtime {
    /// Per-cluster state.
    pub clusters: balance::Clusters,
    /// Idle upstream connections.
    pub upstreams: Arc<upstream::Upstreams>,
}

/// The rule used for a Service that has a DestinationRule but no VirtualService:
/// everything to the Service, with Istio's default retries.
pub fn default_rule(service_key: &str) -> Rule {
    Rule {
        name: "default".into(),
        matches: Vec::new(),
        profile_condition: None,
        action: Action::Route(vec![WeightedBackend {
            backend: Backend { service: service_key.to_string(), subset: None, port: None },
            weight: 0,
            request_headers: Default::default(),
            response_headers: Default::default(),
        }]),
        timeout: None,
        retries: RetryPolicy::istio_default(),
        fault: Default::default(),
        mirrors: Vec::new(),
        request_headers: Default::default(),
        response_headers: Default::default(),
        rewrite_uri: None,
        rewrite_regex: None,
        rewrite_authority: None,
        cors: None,
    }
}

/// Whether the first bytes of a connection are HTTP/1.x or an HTTP/2 preface.
pub fn looks_like_http(first: &[u8]) -> bool {
    const METHODS: &[&[u8]] =
        &[b"GET ", b"POST ", b"PUT ", b"DELETE ", b"HEAD ", b"OPTIONS ", b"PATCH ", b"TRACE ", b"PRI * HTTP/2"];
    METHODS.iter().any(|m| first.len() >= m.len() && first.starts_with(m))
}

#[cfg(test)]
mod tests {
    use super::looks_like_http;

    #[test]
    fn detects_http_methods_and_the_h2_preface_only() {
        assert!(looks_like_http(b"GET / HTTP/1.1\r\n"));
        assert!(looks_like_http(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"));
        assert!(!looks_like_http(b"\x16\x03\x01\x02\x00"), "TLS ClientHello is not HTTP");
        assert!(!looks_like_http(b"GE"), "too short to tell");
        assert!(!looks_like_http(b"SSH-2.0-OpenSSH"));
    }
}

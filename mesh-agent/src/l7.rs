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

use std::net::SocketAddr;
use std::sync::Arc;

use route::{Action, Backend, RetryPolicy, Rule, WeightedBackend};

use crate::state::{Snapshot, Workload};

/// Request-body bytes the agent holds at once, across every pod, to replay them for
/// retries and mirrors: 32 MiB is 32 requests at the 1 MiB retry buffer. Past it, bodies
/// stream through once (no retry, no mirror), so clients sending many slow bodies
/// cannot make the agent buffer without bound.
pub const BODY_BUDGET: usize = 32 << 20;
/// Mirror copies in flight at once; more are skipped (mirrors are fire and forget).
pub const MAX_MIRRORS: usize = 128;

/// Counters and connections shared by every pod proxy of the agent.
#[derive(Debug)]
pub struct Runtime {
    /// Per-cluster state.
    pub clusters: balance::Clusters,
    /// Idle upstream connections.
    pub upstreams: Arc<upstream::Upstreams>,
    /// Buffered request-body bytes, [`BODY_BUDGET`] in all.
    pub body_budget: Arc<tokio::sync::Semaphore>,
    /// Mirror copies in flight, [`MAX_MIRRORS`] at most.
    pub mirrors: Arc<tokio::sync::Semaphore>,
}

impl Default for Runtime {
    fn default() -> Self {
        Self {
            clusters: Default::default(),
            upstreams: Default::default(),
            body_budget: Arc::new(tokio::sync::Semaphore::new(BODY_BUDGET)),
            mirrors: Arc::new(tokio::sync::Semaphore::new(MAX_MIRRORS)),
        }
    }
}

/// A backend as one pod reaches it: the policy in force for the port, the endpoints,
/// and the pod's state for that destination (limits, ejections, load). Both the HTTP
/// path and VirtualService tcp rules choose endpoints through it.
#[derive(Debug)]
pub struct Target {
    /// DestinationRule policy for the backend's subset and port.
    pub policy: policy::TrafficPolicy,
    /// Endpoints with the address for the port.
    pub endpoints: Vec<(Arc<Workload>, SocketAddr)>,
    /// Runtime state of (pod, service, subset).
    pub cluster: Arc<balance::Cluster>,
}

impl Target {
    /// Resolves `backend` for `pod`; its port defaults to the port the pod dialed.
    pub fn resolve(runtime: &Runtime, snap: &Snapshot, pod: &Workload, backend: &Backend, dialed_port: u16) -> Self {
        let port = backend.port.unwrap_or(dialed_port);
        let subset = backend.subset.as_deref();
        Self {
            policy: snap.traffic_policy(&backend.service, subset, port),
            endpoints: snap.endpoints(&backend.service, subset, port),
            cluster: runtime.clusters.get(&pod.key(), &backend.service, subset),
        }
    }

    /// Chooses an endpoint under `lb` (the policy's, or an override such as cookie
    /// affinity), skipping ejected ones; the guard counts it as loaded until dropped.
    pub fn pick(
        &self,
        lb: &policy::LbPolicy,
        hash_key: Option<&[u8]>,
        dialed: SocketAddr,
    ) -> Option<(Arc<Workload>, SocketAddr, balance::EndpointGuard)> {
        let addrs: Vec<SocketAddr> = self.endpoints.iter().map(|(_, a)| *a).collect();
        let (addr, guard) = self.cluster.pick(&addrs, lb, self.policy.outlier.as_ref(), hash_key, dialed)?;
        let workload = self.endpoints.iter().find(|(_, a)| *a == addr).map(|(w, _)| w.clone())?;
        Some((workload, addr, guard))
    }
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

/// Whether `first` bytes of a connection are HTTP (`Some(true)`), certainly not
/// (`Some(false)`), or too few to tell (`None`).
pub fn detect_http(first: &[u8]) -> Option<bool> {
    if looks_like_http(first) {
        Some(true)
    } else if first.len() >= 14 || first.first().is_some_and(|b| !b.is_ascii_uppercase()) {
        // Longer than every method prefix, or a first byte no method starts with.
        Some(false)
    } else {
        None
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

//! L7 traffic management on the client side: VirtualService routing (`route`),
//! DestinationRule policies (`policy`), endpoint choice, circuit breaking and outlier
//! ejection (`balance`), upstream connections (`upstream`), and the HTTP server that
//! ties them together for a captured connection (`server`).
//!
//! Architecture invariant: everything compiled from config lives in the immutable
//! snapshot; everything that counts (in-flight requests, ejections, idle connections)
//! lives in [`Runtime`], which outlives snapshots.

pub mod balance;
pub mod edge;
pub(crate) mod grpc_messages;
pub mod server;
pub mod upstream;

use std::net::SocketAddr;
use std::sync::Arc;

use crate::traffic::external::ExternalTarget;
use crate::traffic::policy::LocalityPolicy;
use crate::traffic::route::{Action, Backend, RetryPolicy, Rule, WeightedBackend};

use crate::state::Workload;
use tokio_util::sync::CancellationToken;

use crate::snapshot::{RoundRobin, SharedSnapshot, Snapshot};
use crate::telemetry::Metrics;
use crate::transport::Dialer;

/// Request-body bytes the agent holds at once, across every pod, to replay them for
/// retries and mirrors: 32 MiB is 32 requests at the 1 MiB retry buffer. Past it, bodies
/// stream through once (no retry, no mirror), so clients sending many slow bodies
/// cannot make the agent buffer without bound.
pub const BODY_BUDGET: usize = 32 << 20;
/// Mirror copies in flight at once; more are skipped (mirrors are fire and forget).
pub const MAX_MIRRORS: usize = 128;

/// What the L7 proxy works with: the configuration, the way to reach endpoints, the
/// counters that outlive snapshots, metrics, and the drain signal. Not the whole proxy
/// context: L7 never sees listeners, the kernel tables or connection limits.
#[derive(Debug, Clone)]
pub struct Context {
    /// The current configuration.
    pub snapshot: SharedSnapshot,
    /// Reaches endpoints (tunnel or plaintext).
    pub dialer: Dialer,
    /// Counters and idle connections.
    pub runtime: Arc<Runtime>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Cancelled when the agent drains: connections finish what is in flight.
    pub shutdown: CancellationToken,
    /// The only directory whose files DestinationRules may name for TLS origination.
    pub egress_tls_dir: Arc<std::path::Path>,
    /// A gateway's: the Secrets of its namespace, for a DestinationRule's
    /// `credentialName`. None for node agents, which read no Secrets.
    pub secrets: Option<Arc<arc_swap::ArcSwap<crate::config::secrets::Secrets>>>,
}

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
    /// Round-robin cursors of Service VIPs reached at L4.
    pub round_robin: RoundRobin,
    /// Addresses of ServiceEntry hosts with `resolution: DNS` reached at L7.
    pub lookups: Lookups,
}

/// How long a looked-up address list of a `resolution: DNS` host is used (as the
/// DNS proxy's answers live).
const LOOKUP_TTL: std::time::Duration = std::time::Duration::from_secs(30);

/// One looked-up host: when, and what it resolved to.
type Lookup = (std::time::Instant, Arc<[SocketAddr]>);

/// The addresses of the `resolution: DNS` hosts HTTP routes send requests to, looked
/// up at most once per [`LOOKUP_TTL`] per host. Only names from the config are looked
/// up (a route's destination, an entry's endpoints), so the table is as large as the
/// config, and older results go whenever a new one is stored.
#[derive(Debug, Default)]
pub struct Lookups(std::sync::Mutex<std::collections::HashMap<(String, u16), Lookup>>);

impl Lookups {
    /// The addresses of `host` at `port`.
    pub async fn get(&self, host: &str, port: u16) -> Result<Arc<[SocketAddr]>, String> {
        let key = (host.to_string(), port);
        if let Some((at, addrs)) = self.0.lock().unwrap_or_else(|p| p.into_inner()).get(&key)
            && at.elapsed() < LOOKUP_TTL
        {
            return Ok(addrs.clone());
        }
        let found: Arc<[SocketAddr]> = crate::transport::lookup(host, port).await.map_err(|e| e.to_string())?.into();
        let mut table = self.0.lock().unwrap_or_else(|p| p.into_inner());
        table.retain(|_, (at, _)| at.elapsed() < LOOKUP_TTL);
        table.insert(key, (std::time::Instant::now(), found.clone()));
        Ok(found)
    }
}

impl Default for Runtime {
    fn default() -> Self {
        Self {
            clusters: Default::default(),
            upstreams: Default::default(),
            body_budget: Arc::new(tokio::sync::Semaphore::new(BODY_BUDGET)),
            mirrors: Arc::new(tokio::sync::Semaphore::new(MAX_MIRRORS)),
            round_robin: RoundRobin::default(),
            lookups: Lookups::default(),
        }
    }
}

/// A backend as one pod reaches it: the policy in force for the port, the endpoints,
/// and the pod's state for that destination (limits, ejections, load). Both the HTTP
/// path and VirtualService tcp rules choose endpoints through it.
#[derive(Debug)]
pub struct Target {
    /// DestinationRule policy for the backend's subset and port.
    pub policy: crate::traffic::policy::TrafficPolicy,
    /// Endpoints with the address for the port.
    pub endpoints: Vec<(Arc<Workload>, SocketAddr)>,
    /// Runtime state of (pod, service, subset).
    pub cluster: Arc<balance::Cluster>,
    /// How locality-aware load balancing splits the endpoints for the client (in the
    /// order of `endpoints`); None when it is off or makes no difference.
    pub localities: Option<balance::Localities>,
}

impl Target {
    /// Resolves `backend` for `pod`; its port defaults to the port the pod dialed.
    pub fn resolve(runtime: &Runtime, snap: &Snapshot, pod: &Workload, backend: &Backend, dialed_port: u16) -> Self {
        let port = backend.port.unwrap_or(dialed_port);
        let subset = backend.subset.as_deref();
        let policy = snap.traffic_policy(&backend.service, subset, port);
        let endpoints = snap.endpoints(&backend.service, subset, port);
        let localities =
            LocalityPolicy::applies(&policy).then(|| localities(&policy.locality, pod, &endpoints)).flatten();
        Self { policy, endpoints, cluster: runtime.clusters.get(&pod.key(), &backend.service, subset), localities }
    }

    /// [`Target::resolve`], where `backend` may be a ServiceEntry host rather than a
    /// Service: its endpoints are then where the entry says (STATIC addresses, the host
    /// looked up for DNS, the address the pod dialed for NONE), its policy the entry's
    /// DestinationRule. Err: why the entry gives no address to send the request to.
    pub async fn reach(
        runtime: &Runtime,
        snap: &Snapshot,
        pod: &Workload,
        backend: &Backend,
        dialed: SocketAddr,
    ) -> Result<Self, String> {
        let port = backend.port.unwrap_or(dialed.port());
        let entry = match snap.service(&backend.service) {
            Some(_) => None,
            None => snap.external.by_name(&backend.service, port, &pod.namespace),
        };
        let Some(entry) = entry else { return Ok(Self::resolve(runtime, snap, pod, backend, dialed.port())) };
        let addrs: Vec<SocketAddr> = match entry.target(SocketAddr::new(dialed.ip(), port), Some(&backend.service)) {
            // The pod's own address is where a gateway was reached, not the entry.
            ExternalTarget::Dialed(a) if pod.ips.contains(&a.ip()) => {
                return Err(format!("ServiceEntry {} resolves NONE: there is no address the client dialed", entry.key));
            }
            ExternalTarget::Dialed(a) => vec![a],
            ExternalTarget::Addresses(list) => list,
            ExternalTarget::Lookup(host, port) => runtime.lookups.get(&host, port).await?.to_vec(),
        };
        let endpoints = addrs
            .into_iter()
            .map(|a| {
                let w = snap.workload_by_ip(a.ip()).cloned();
                (
                    w.unwrap_or_else(|| {
                        Arc::new(Workload::outside(&entry.host, entry.namespace(), a.ip(), snap.trust_domain()))
                    }),
                    a,
                )
            })
            .collect();
        Ok(Self {
            policy: snap.external_policy(&entry.key, port),
            endpoints,
            cluster: runtime.clusters.get(&pod.key(), &entry.key, None),
            localities: None,
        })
    }

    /// Chooses an endpoint under `lb` (the policy's, or an override such as cookie
    /// affinity), skipping ejected ones; the guard counts it as loaded until dropped.
    pub fn pick(
        &self,
        lb: &crate::traffic::policy::LbPolicy,
        hash_key: Option<&[u8]>,
        dialed: SocketAddr,
    ) -> Option<(Arc<Workload>, SocketAddr, balance::EndpointGuard)> {
        let addrs: Vec<SocketAddr> = self.endpoints.iter().map(|(_, a)| *a).collect();
        let (addr, guard) =
            self.cluster.pick(&addrs, self.localities.as_ref(), lb, self.policy.outlier.as_ref(), hash_key, dialed)?;
        let workload = self.endpoints.iter().find(|(_, a)| *a == addr).map(|(w, _)| w.clone())?;
        Some((workload, addr, guard))
    }
}

/// How `locality` splits `endpoints` for `pod`: `distribute`'s shares when an entry
/// covers the pod, else the ranks; None when all rank alike.
fn localities(
    locality: &LocalityPolicy,
    pod: &Workload,
    endpoints: &[(Arc<Workload>, SocketAddr)],
) -> Option<balance::Localities> {
    if let Some(shares) = locality.shares(pod) {
        let covers =
            |w: &Workload| shares.iter().position(|(to, _)| crate::traffic::policy::locality_covers(to, &w.locality));
        let group = endpoints.iter().map(|(w, _)| covers(w).and_then(|i| u32::try_from(i).ok())).collect();
        return Some(balance::Localities::Weighted { group, weights: shares.iter().map(|(_, w)| *w).collect() });
    }
    let ranks: Vec<u32> = endpoints.iter().map(|(w, _)| locality.priority(pod, w)).collect();
    ranks.iter().any(|r| *r != ranks[0]).then_some(balance::Localities::Ranked(ranks))
}

/// The rule used for a Service (`namespace/name`) or ServiceEntry host that no
/// VirtualService routes: everything to it, with Istio's default retries.
pub fn default_rule(service_key: &str) -> Rule {
    Rule {
        name: "default".into(),
        matches: Vec::new(),
        profile_condition: None,
        action: Action::Route(vec![WeightedBackend::to(service_key.to_string())]),
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

//! Metrics, named as Istio names them so existing dashboards (Kiali, Grafana) work:
//! `istio_tcp_connections_opened_total`, `istio_tcp_connections_closed_total`,
//! `istio_tcp_sent_bytes_total`, `istio_tcp_received_bytes_total`.
//!
//! Series name workloads; a workload that left the config takes its series with it
//! ([`Metrics::forget_gone`]), so pod churn does not grow the agent or the scrape.

pub mod access_log;
pub mod graph;
pub mod health;
pub mod trace;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Mutex;

use std::sync::Arc;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelSetEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::identity::Identity;
use crate::snapshot::Snapshot;
use crate::state::{SERVICE_DOMAIN, TelemetryPolicy, Workload, WorkloadMeta};

/// Who reports a connection: the source side (outbound) or the destination (inbound).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
pub enum Direction {
    /// Reported by the source's agent.
    Outbound,
    /// Reported by the destination's agent.
    Inbound,
}

/// One side of a connection or request under Istio's label names: `source_*` when
/// `SOURCE`, else `destination_*`. It holds the workload's shared names, so building
/// labels per connection copies no string.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Side<const SOURCE: bool>(pub Arc<WorkloadMeta>);

const SOURCE_KEYS: [&str; 8] = [
    "source_workload",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_canonical_service",
    "source_canonical_revision",
    "source_cluster",
];

const DESTINATION_KEYS: [&str; 8] = [
    "destination_workload",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_canonical_service",
    "destination_canonical_revision",
    "destination_cluster",
];

impl<const SOURCE: bool> Side<SOURCE> {
    /// The side of `w`, or `unknown` in every label.
    pub fn of(w: Option<&Workload>) -> Self {
        Self(w.map_or_else(WorkloadMeta::unknown, |w| w.meta.clone()))
    }
}

impl<const SOURCE: bool> EncodeLabelSet for Side<SOURCE> {
    fn encode(&self, encoder: &mut LabelSetEncoder<'_>) -> Result<(), std::fmt::Error> {
        let m = &*self.0;
        let keys = if SOURCE { SOURCE_KEYS } else { DESTINATION_KEYS };
        // Istio's app and version are the canonical service and revision (as ztunnel
        // reports them), so the app graph and the workload graph agree.
        let values = [
            m.workload.as_str(),
            &m.namespace,
            &m.principal,
            &m.canonical_service,
            &m.canonical_revision,
            &m.canonical_service,
            &m.canonical_revision,
            &m.cluster,
        ];
        let pairs: [(&str, &str); 8] = std::array::from_fn(|i| (keys[i], values[i]));
        pairs.encode(encoder)
    }
}

/// The source side.
pub type Source = Side<true>;
/// The destination side.
pub type Destination = Side<false>;

/// The Service a connection or request went to: `destination_service` is its FQDN (a
/// ServiceEntry's host), with its name and namespace apart.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ServiceLabels {
    /// `<name>.<namespace>.svc.cluster.local`, or the ServiceEntry host.
    pub destination_service: String,
    /// The Service's name (the host, for a ServiceEntry).
    pub destination_service_name: String,
    /// Its namespace.
    pub destination_service_namespace: String,
}

impl ServiceLabels {
    /// No Service: `unknown`.
    pub fn unknown() -> Self {
        Self::host(UNKNOWN, UNKNOWN)
    }

    /// The Service `namespace/name` (a routing key), or `unknown` for None.
    pub fn service(key: Option<&str>) -> Self {
        match key.and_then(|k| k.split_once('/')) {
            Some((namespace, name)) => Self {
                destination_service: format!("{name}.{namespace}{SERVICE_DOMAIN}"),
                destination_service_name: name.to_string(),
                destination_service_namespace: namespace.to_string(),
            },
            None => Self::unknown(),
        }
    }

    /// A ServiceEntry host of `namespace`.
    pub fn host(host: &str, namespace: &str) -> Self {
        Self {
            destination_service: host.to_string(),
            destination_service_name: host.to_string(),
            destination_service_namespace: namespace.to_string(),
        }
    }
}

/// Who saw it, between whom, to which Service, how protected: the labels every
/// standard metric carries.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct PeerLabels {
    /// `source` (the client's agent) or `destination` (the server's).
    pub reporter: &'static str,
    /// The client.
    #[prometheus(flatten)]
    pub source: Source,
    /// The server.
    #[prometheus(flatten)]
    pub destination: Destination,
    /// The Service asked for.
    #[prometheus(flatten)]
    pub service: ServiceLabels,
    /// `mutual_tls` or `none`.
    pub connection_security_policy: &'static str,
}

impl PeerLabels {
    /// As the client's agent reports it.
    pub fn source(src: &Workload, dst: Option<&Workload>, service: ServiceLabels, mtls: bool) -> Self {
        Self {
            reporter: "source",
            source: Side::of(Some(src)),
            destination: Side::of(dst),
            service,
            connection_security_policy: security(mtls),
        }
    }

    /// As the server's agent reports it.
    pub fn destination(dst: &Workload, src: Option<&Workload>, service: ServiceLabels, mtls: bool) -> Self {
        Self {
            reporter: "destination",
            source: Side::of(src),
            destination: Side::of(Some(dst)),
            service,
            connection_security_policy: security(mtls),
        }
    }
}

/// Labels of the TCP metrics (Istio's standard label names).
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ConnLabels {
    /// Who, between whom, to what.
    #[prometheus(flatten)]
    pub peers: PeerLabels,
    /// Direction, for our own dashboards (the same as the reporter).
    pub direction: Direction,
    /// `tcp`.
    pub request_protocol: &'static str,
    /// Envoy's response flags; `-` for a connection that was made.
    pub response_flags: &'static str,
}

const UNKNOWN: &str = "unknown";

// Indexes of `config::telemetry::METRICS`, which Telemetry overrides name.
const REQUEST_COUNT: usize = 0;
const REQUEST_DURATION: usize = 1;
const REQUEST_SIZE: usize = 2;
const RESPONSE_SIZE: usize = 3;
const TCP_OPENED: usize = 4;
const TCP_CLOSED: usize = 5;
const TCP_SENT: usize = 6;
const TCP_RECEIVED: usize = 7;
const GRPC_REQUEST_MESSAGES: usize = 8;
const GRPC_RESPONSE_MESSAGES: usize = 9;

fn security(mtls: bool) -> &'static str {
    if mtls { "mutual_tls" } else { "none" }
}

impl ConnLabels {
    /// Labels of an outbound connection from `src` to `dst` (if a workload) for
    /// `service`.
    pub fn outbound(src: &Workload, dst: Option<&Workload>, service: ServiceLabels, mtls: bool) -> Self {
        Self::of(PeerLabels::source(src, dst, service, mtls), Direction::Outbound)
    }

    /// Labels of an inbound connection to `dst` from `src` (if known) at `port` of
    /// `dst`, which names the Service it serves there.
    pub fn inbound(snapshot: &Snapshot, dst: &Workload, port: u16, src: Option<&Workload>, mtls: bool) -> Self {
        let service = ServiceLabels::service(snapshot.service_at(dst, port).map(|(s, _)| s.key()).as_deref());
        Self::of(PeerLabels::destination(dst, src, service, mtls), Direction::Inbound)
    }

    /// Labels of an HBONE stream to `dst`'s `port` from an authenticated `client`: the
    /// workload at the peer's address only if it holds that identity; the principal is
    /// the client's certificate's either way.
    pub fn inbound_from_identity(
        snapshot: &Snapshot,
        dst: &Workload,
        port: u16,
        client: &Identity,
        peer: SocketAddr,
    ) -> Self {
        let src = snapshot.workload_by_ip(peer.ip()).filter(|w| w.identity == *client);
        let mut l = Self::inbound(snapshot, dst, port, src.map(|w| &**w), true);
        if src.is_none() {
            // From another network the peer is its gateway: the identity names the
            // source when one workload there runs as it.
            let meta = match snapshot.behind_gateway(client) {
                Some(meta) => meta.clone(),
                None => Arc::new(WorkloadMeta { principal: client.to_string(), ..(*WorkloadMeta::unknown()).clone() }),
            };
            l.peers.source = Side(meta);
        }
        l
    }

    fn of(peers: PeerLabels, direction: Direction) -> Self {
        Self { peers, direction, request_protocol: "tcp", response_flags: "-" }
    }
}

/// A connection counted as open; hand it back to [`Metrics::closed`]. It holds the
/// connection's byte counters, which advance as bytes pass.
#[derive(Debug)]
pub struct OpenConn {
    /// `istio_tcp_received_bytes_total`: client to server.
    pub received: Counter,
    /// `istio_tcp_sent_bytes_total`: server to client.
    pub sent: Counter,
    /// Whether its closing is counted.
    closed: bool,
}

/// [`PeerLabels`] shared by the requests of a connection: a clone is a reference
/// count, and hashing it (six series lookups per request) hashes one number computed
/// when it was made, where hashing the labels themselves was the largest cost of a
/// request's metrics. Two are equal when they are the same labels.
#[derive(Debug, Clone)]
pub struct SharedPeers {
    labels: Arc<PeerLabels>,
    hash: u64,
}

impl SharedPeers {
    /// Shares `labels`.
    pub fn new(labels: PeerLabels) -> Self {
        use std::hash::BuildHasher as _;
        // Keyed per process, as the series maps are: a tenant choosing label values
        // cannot choose collisions (which would cost a comparison, not a wrong series).
        static KEYS: std::sync::LazyLock<std::hash::RandomState> = std::sync::LazyLock::new(Default::default);
        let hash = KEYS.hash_one(&labels);
        Self { labels: Arc::new(labels), hash }
    }
}

impl std::ops::Deref for SharedPeers {
    type Target = PeerLabels;
    fn deref(&self) -> &PeerLabels {
        &self.labels
    }
}

impl PartialEq for SharedPeers {
    fn eq(&self, other: &Self) -> bool {
        self.hash == other.hash && (Arc::ptr_eq(&self.labels, &other.labels) || self.labels == other.labels)
    }
}

impl Eq for SharedPeers {}

impl std::hash::Hash for SharedPeers {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write_u64(self.hash);
    }
}

impl EncodeLabelSet for SharedPeers {
    fn encode(&self, encoder: &mut LabelSetEncoder<'_>) -> Result<(), std::fmt::Error> {
        self.labels.encode(encoder)
    }
}

/// Labels of the request metrics.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RequestLabels {
    /// Who, between whom, to what. Reporter `source`: the client's agent routed it;
    /// `destination`: the server's agent judged it.
    #[prometheus(flatten)]
    pub peers: SharedPeers,
    /// `http` or `grpc`.
    pub request_protocol: &'static str,
    /// HTTP status returned to the client (a number, not text: building a request's
    /// labels allocates nothing).
    pub response_code: u16,
    /// Envoy response flags: `-`, `UO` (overflow), `UF` (connect failure), `UT`
    /// (timeout), `NR` (no route), `FI` (fault abort), `DI` (fault delay), `URX`
    /// (retries exhausted), `UH` (no healthy endpoint).
    pub response_flags: &'static str,
    /// gRPC status from the answer's headers or trailers; empty (None) for plain HTTP.
    pub grpc_response_status: Option<u32>,
}

/// Why a connection or request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DenyReason {
    /// Plaintext to a port whose PeerAuthentication is STRICT.
    MtlsStrict,
    /// An AuthorizationPolicy, at connection accept.
    Policy,
    /// An AuthorizationPolicy, for one HTTP request.
    HttpPolicy,
}

/// Refusals kept for the dashboard: the newest [`RecentDenials::KEPT`].
#[derive(Debug, Clone, Default)]
pub struct RecentDenials(Arc<Mutex<std::collections::VecDeque<Denial>>>);

/// One refusal, as the dashboard lists it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Denial {
    /// When (UTC, RFC 3339).
    pub at: String,
    /// The protected workload, `namespace/workload`.
    pub workload: String,
    /// Who was refused: its principal or `plaintext`, and its address.
    pub source: String,
    /// Why.
    pub reason: DenyReason,
    /// The decision's own words (which policy, or which port is STRICT).
    pub detail: String,
}

impl RecentDenials {
    /// How many are kept: a peer that is refused over and over replaces the older
    /// ones, it does not grow the list.
    pub const KEPT: usize = 64;

    fn push(&self, denial: Denial) {
        let mut kept = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if kept.len() == Self::KEPT {
            kept.pop_front();
        }
        kept.push_back(denial);
    }

    /// Newest first.
    pub fn list(&self) -> Vec<Denial> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).iter().rev().cloned().collect()
    }
}

/// Labels of `istio_mesh_denied_total`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct DenyLabels {
    /// The workload that was protected.
    pub destination_workload: String,
    /// Its namespace.
    pub destination_workload_namespace: String,
    /// Why.
    pub reason: DenyReason,
}

/// Labels of `istio_mesh_outbound_blocked_total`: connections a pod made outside the
/// registry under REGISTRY_ONLY (not the destination: any pod can dial any address,
/// and that must not grow the label space).
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct BlockedLabels {
    /// The pod's workload.
    pub source_workload: String,
    /// Its namespace.
    pub source_workload_namespace: String,
}

/// Labels of `istio_mesh_connections_refused_total`: a cap or a resource the agent ran
/// out of, never a workload (a flood must not grow the label space).
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RefusedLabels {
    /// `per_source`, `per_node`, `accept_error` (file descriptors), `body_budget`,
    /// `mirror_budget`.
    pub reason: String,
    /// The listener: `outbound`, `inbound`, `hbone`, `hbone_stream`, `admin`, `l7`.
    pub listener: String,
}

/// Labels of `istio_mesh_dns_requests_total`: what the DNS proxies did with a query
/// (`answered`, `forwarded`, `upstream_failed`, `refused` for a datagram not from the
/// pod), never the name asked.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct DnsLabels {
    /// What happened.
    pub outcome: &'static str,
}

/// Labels of `istio_mesh_kernel_events_total`: one of a fixed set of events.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct KernelEventLabels {
    /// `outbound_redirected`, `dns_redirected`, `inbound_steered`, `plaintext_dropped`,
    /// `no_listener_dropped`, `unknown_pod_dropped`, `record_failed`.
    pub event: &'static str,
}

/// Labels of the BPF map gauges: one of the agent's maps.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct MapLabels {
    /// The map's name.
    pub map: &'static str,
}

/// Envoy's default histogram buckets, which Istio's request duration (milliseconds)
/// and size (bytes) histograms use, so dashboards' quantiles read the same.
pub const ENVOY_BUCKETS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0, 60000.0, 300000.0,
    600000.0, 1800000.0, 3600000.0,
];

/// One request series' metrics, as [`Metrics::request_series`] looked them up: those
/// the Telemetry policy turned off are absent.
#[derive(Debug, Clone)]
pub struct RequestSeries {
    generation: u64,
    count: Option<Counter>,
    duration: Option<Histogram>,
    request_size: Option<Histogram>,
    response_size: Option<Histogram>,
}

impl RequestSeries {
    /// Counts one request (`istio_requests_total`), as [`Metrics::request`] does.
    pub fn request(&self) {
        if let Some(c) = &self.count {
            c.inc();
        }
    }

    /// Records a request whose response has ended, as [`Metrics::request_done`] does.
    pub fn done(&self, duration: std::time::Duration, (request_bytes, response_bytes): (Option<u64>, u64)) {
        if let Some(h) = &self.duration {
            h.observe(duration.as_secs_f64() * 1000.0);
        }
        if let (Some(h), Some(n)) = (&self.request_size, request_bytes) {
            h.observe(n as f64);
        }
        if let Some(h) = &self.response_size {
            h.observe(response_bytes as f64);
        }
    }
}

/// The request series one connection's last answer went to, with the labels and the
/// Telemetry policy it was looked up under: most answers of one connection land in
/// the same series, and one recorded through the kept handle costs a comparison of
/// labels instead of six lookups (each a lock and a comparison).
#[derive(Debug, Default)]
pub struct SeriesMemo(Mutex<Option<Remembered>>);

#[derive(Debug)]
struct Remembered {
    policy: Arc<TelemetryPolicy>,
    labels: RequestLabels,
    series: RequestSeries,
}

impl SeriesMemo {
    /// The series of `labels` under `policy`: the kept one when both are the same as
    /// last time and it is still current, else looked up (and kept).
    pub fn series(&self, metrics: &Metrics, labels: &RequestLabels, policy: &Arc<TelemetryPolicy>) -> RequestSeries {
        let mut kept = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(r) = kept.as_ref()
            && Arc::ptr_eq(&r.policy, policy)
            && r.labels == *labels
            && metrics.still_current(&r.series)
        {
            return r.series.clone();
        }
        let series = metrics.request_series(labels, policy);
        *kept = Some(Remembered { policy: policy.clone(), labels: labels.clone(), series: series.clone() });
        series
    }
}

/// A histogram per request label set, with [`ENVOY_BUCKETS`].
#[derive(Debug, Clone)]
pub struct RequestHistograms(Family<RequestLabels, Histogram, fn() -> Histogram>);

impl Default for RequestHistograms {
    fn default() -> Self {
        Self(Family::new_with_constructor(|| Histogram::new(ENVOY_BUCKETS)))
    }
}

/// The label sets of every series that names a workload, to find those of workloads
/// that are gone (prometheus-client's families cannot be walked).
#[derive(Debug, Default)]
struct SeriesIndex {
    conns: HashSet<ConnLabels>,
    requests: HashSet<RequestLabels>,
    denied: HashSet<DenyLabels>,
    blocked: HashSet<BlockedLabels>,
}

/// The agent's metrics.
#[derive(Debug, Default)]
pub struct Metrics {
    requests: Family<RequestLabels, Counter>,
    opened: Family<ConnLabels, Counter>,
    closed: Family<ConnLabels, Counter>,
    sent: Family<ConnLabels, Counter>,
    received: Family<ConnLabels, Counter>,
    active: Gauge,
    /// Connections opened since start, whatever their labels, HTTP clients served
    /// request by request included: how the agent tells that traffic stopped
    /// (`code_pages`, the dashboard's sampler).
    opened_total: std::sync::atomic::AtomicU64,
    /// HTTP client connections served request by request now ([`Metrics::serving_http`]):
    /// open connections `active` does not count.
    http_open: std::sync::atomic::AtomicU64,
    /// Config reloads rejected.
    pub config_rejected: Counter,
    /// Config snapshots applied.
    pub config_applied: Counter,
    /// Pods enrolled on this node.
    pub enrolled_pods: Gauge,
    /// 1 while the config source answers, 0 while the last config read keeps serving.
    pub config_source_up: Gauge,
    /// Kubelet probe connections let through to applications (not mesh traffic).
    pub probe_connections: Counter,
    /// Connections whose bytes the kernel passed on once admitted, without the agent.
    pub kernel_spliced: Counter,
    /// Inbound HTTP/1.1 connections copied as they are, their exchanges followed for
    /// the request metrics alone (not served request by request).
    pub http_watched: Counter,
    denied: Family<DenyLabels, Counter>,
    refused: Family<RefusedLabels, Counter>,
    blocked: Family<BlockedLabels, Counter>,
    dns: Family<DnsLabels, Counter>,
    request_messages: Family<RequestLabels, Counter>,
    response_messages: Family<RequestLabels, Counter>,
    request_duration: RequestHistograms,
    request_bytes: RequestHistograms,
    response_bytes: RequestHistograms,
    series: Mutex<SeriesIndex>,
    /// Advanced whenever request series are dropped, so [`RequestSeries`] handles
    /// taken before know to look their series up again.
    request_generation: std::sync::atomic::AtomicU64,
    access_log: std::sync::OnceLock<access_log::AccessLog>,
    access_log_dropped: Counter,
    tracer: std::sync::OnceLock<trace::Tracer>,
    kernel_events: Family<KernelEventLabels, Counter>,
    map_entries: Family<MapLabels, Gauge>,
    map_capacity: Family<MapLabels, Gauge>,
    trace_counters: trace::TraceCounters,
    recent_denials: RecentDenials,
    shared_labels: Mutex<SharedLabels>,
}

/// An HTTP client connection counted as open ([`Metrics::serving_http`]) until dropped.
#[derive(Debug)]
pub struct ServingHttp(Arc<Metrics>);

impl Drop for ServingHttp {
    fn drop(&mut self) {
        self.0.http_open.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// The label sets of live connections, one copy each: the connections between the same
/// two workloads share it (its strings are most of what a label set costs, and a
/// connection holds its own for as long as it lives).
#[derive(Debug, Default)]
struct SharedLabels {
    set: HashSet<Arc<ConnLabels>>,
    /// When the set grows to this, sets no connection holds any more are let go.
    prune_at: usize,
}

impl Metrics {
    /// `labels` as a shared copy, for a connection to hold while it lives.
    pub fn shared(&self, labels: ConnLabels) -> Arc<ConnLabels> {
        let mut shared = self.shared_labels.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(known) = shared.set.get(&labels) {
            return known.clone();
        }
        if shared.set.len() >= shared.prune_at {
            shared.set.retain(|l| Arc::strong_count(l) > 1);
            shared.prune_at = (shared.set.len() * 2).max(64);
        }
        let labels = Arc::new(labels);
        shared.set.insert(labels.clone());
        labels
    }

    /// Registers every metric in `registry` (which carries the `istio` prefix).
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register("requests", "HTTP requests routed (reporter=source)", m.requests.clone());
        registry.register(
            "request_duration_milliseconds",
            "Time from the request's arrival to the end of its response (reporter=source)",
            m.request_duration.0.clone(),
        );
        registry.register(
            "request_bytes",
            "Size of request bodies read from the client (reporter=source)",
            m.request_bytes.0.clone(),
        );
        registry.register(
            "response_bytes",
            "Size of response bodies, counted as they pass (reporter=source)",
            m.response_bytes.0.clone(),
        );
        registry.register(
            "request_messages",
            "gRPC messages the client sent, counted as they passed",
            m.request_messages.clone(),
        );
        registry.register("response_messages", "gRPC messages the server sent", m.response_messages.clone());
        registry.register("tcp_connections_opened", "TCP connections opened", m.opened.clone());
        registry.register("tcp_connections_closed", "TCP connections closed", m.closed.clone());
        registry.register("tcp_sent_bytes", "Bytes sent in responses (server to client)", m.sent.clone());
        registry.register("tcp_received_bytes", "Bytes received in requests (client to server)", m.received.clone());
        registry.register("mesh_active_connections", "Connections open now", m.active.clone());
        registry.register("mesh_config_rejected", "Config inputs rejected", m.config_rejected.clone());
        registry.register("mesh_config_applied", "Config snapshots applied", m.config_applied.clone());
        registry.register("mesh_enrolled_pods", "Pods captured on this node", m.enrolled_pods.clone());
        registry.register(
            "mesh_config_source_up",
            "1 while the config source (directory or API server) answers; 0 while the last config read keeps serving",
            m.config_source_up.clone(),
        );
        registry.register("mesh_denied", "Connections and requests refused by policy", m.denied.clone());
        registry.register(
            "mesh_kernel_spliced_connections",
            "Admitted connections whose bytes the kernel passed on (sockmap), without waking the agent",
            m.kernel_spliced.clone(),
        );
        registry.register(
            "mesh_http_watched_connections",
            "Inbound HTTP/1.1 connections copied as they are, their requests counted from the framing (no proxy per request)",
            m.http_watched.clone(),
        );
        registry.register(
            "mesh_probe_connections",
            "Kubelet probe connections the kernel let through to pods' applications (not mesh traffic)",
            m.probe_connections.clone(),
        );
        registry.register(
            "mesh_connections_refused",
            "Connections closed or work shed at a resource cap (per source pod, per node, descriptors, buffers)",
            m.refused.clone(),
        );
        registry.register(
            "mesh_outbound_blocked",
            "Connections to destinations outside the registry refused under outboundTrafficPolicy REGISTRY_ONLY",
            m.blocked.clone(),
        );
        registry.register(
            "mesh_access_log_dropped",
            "Access log lines dropped because the writer fell behind (the data path never waits for it)",
            m.access_log_dropped.clone(),
        );
        registry.register(
            "mesh_kernel_events",
            "What the kernel programs did with pods' sockets, summed over CPUs: redirects, steering, and drops by reason",
            m.kernel_events.clone(),
        );
        registry.register("mesh_bpf_map_entries", "Entries in the agent's BPF maps", m.map_entries.clone());
        registry.register("mesh_bpf_map_capacity", "Capacity of the agent's BPF maps", m.map_capacity.clone());
        registry.register(
            "mesh_spans_exported",
            "Trace spans the collector accepted",
            m.trace_counters.exported.clone(),
        );
        registry.register(
            "mesh_spans_dropped",
            "Trace spans dropped because the exporter fell behind (the data path never waits for it)",
            m.trace_counters.dropped.clone(),
        );
        registry.register("mesh_trace_export_failures", "Trace exports that failed", m.trace_counters.failed.clone());
        registry.register(
            "mesh_dns_requests",
            "DNS queries of captured pods: answered by the mesh, forwarded upstream, failed upstream, refused",
            m.dns.clone(),
        );
        m
    }

    /// Writes access log lines to `out` from now on (once; later calls do nothing): in
    /// `format` for every workload, or, with `Off`, as text for the workloads a
    /// Telemetry turns access logging on for.
    pub fn start_access_log<W>(&self, format: access_log::Format, out: W)
    where
        W: tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let _ = self.access_log.set(access_log::AccessLog::start(format, out, self.access_log_dropped.clone()));
    }

    /// Traces requests from now on, exporting to `endpoint` (once; later calls do
    /// nothing).
    pub fn start_tracing(&self, endpoint: trace::Endpoint, sampling: f64, node: String, mesh_id: String) {
        let tracer = trace::Tracer::start(endpoint, sampling, node, mesh_id, self.trace_counters.clone());
        let _ = self.tracer.set(tracer);
    }

    /// The tracer, when requests are traced.
    pub fn tracer(&self) -> Option<&trace::Tracer> {
        self.tracer.get()
    }

    /// The access log, once started.
    pub fn access_log(&self) -> Option<&access_log::AccessLog> {
        self.access_log.get()
    }

    /// Counts a DNS query by what the proxy did with it.
    pub fn dns(&self, outcome: &'static str) {
        self.dns.get_or_create(&DnsLabels { outcome }).inc();
    }

    /// Counts a connection `src` made outside the registry, refused (REGISTRY_ONLY).
    pub fn outbound_blocked(&self, src: &Workload) {
        let labels = BlockedLabels {
            source_workload: src.meta.workload.clone(),
            source_workload_namespace: src.namespace.clone(),
        };
        if self.blocked.get(&labels).is_none() {
            self.index().blocked.insert(labels.clone());
        }
        self.blocked.get_or_create(&labels).inc();
    }

    /// Brings `istio_mesh_kernel_events_total{event}` up to the kernel's counts (by
    /// `mesh_common::events` index).
    pub fn kernel_events_seen(&self, totals: &[u64]) {
        self.events_seen(&mesh_common::events::NAMES, totals);
    }

    /// Brings `istio_mesh_kernel_events_total{event}` up to the direct path's counts
    /// (by `mesh_common::direct_stats` index).
    pub fn direct_events_seen(&self, totals: &[u64]) {
        self.events_seen(&mesh_common::direct_stats::NAMES, totals);
    }

    fn events_seen(&self, names: &[&'static str], totals: &[u64]) {
        for (event, total) in names.iter().zip(totals) {
            let counter = self.kernel_events.get_or_create(&KernelEventLabels { event });
            let counted = counter.get();
            if *total > counted {
                counter.inc_by(total - counted);
            }
        }
    }

    /// Sets the BPF maps' fill levels: `(map, entries, capacity)`.
    pub fn map_fill(&self, fill: &[(&'static str, usize, u32)]) {
        for (map, entries, capacity) in fill {
            let labels = MapLabels { map };
            self.map_entries.get_or_create(&labels).set(i64::try_from(*entries).unwrap_or(i64::MAX));
            self.map_capacity.get_or_create(&labels).set(i64::from(*capacity));
        }
    }

    /// Brings `istio_mesh_probe_connections_total` up to the kernel's count.
    pub fn probes_seen(&self, kernel_total: u64) {
        let counted = self.probe_connections.get();
        if kernel_total > counted {
            self.probe_connections.inc_by(kernel_total - counted);
        }
    }

    /// Counts a connection (or buffered body, or mirror) refused at a cap.
    pub fn refused(&self, listener: &str, reason: &str) {
        self.refused.get_or_create(&RefusedLabels { reason: reason.into(), listener: listener.into() }).inc();
    }

    fn index(&self) -> std::sync::MutexGuard<'_, SeriesIndex> {
        self.series.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts one HTTP request (`istio_requests_total`), unless `policy` turned it off.
    pub fn request(&self, labels: &RequestLabels, policy: &TelemetryPolicy) {
        if !policy.metric_on(REQUEST_COUNT, labels.peers.reporter == "source") {
            return;
        }
        if self.requests.get(labels).is_none() {
            self.index().requests.insert(labels.clone());
        }
        self.requests.get_or_create(labels).inc();
    }

    /// Records a request whose response has ended (or was dropped): how long it took
    /// from its arrival, and how many request (where the path counted them) and
    /// response body bytes passed. The request itself is counted by
    /// [`Metrics::request`].
    pub fn request_done(
        &self,
        labels: &RequestLabels,
        policy: &TelemetryPolicy,
        duration: std::time::Duration,
        (request_bytes, response_bytes): (Option<u64>, u64),
    ) {
        let on = |metric| policy.metric_on(metric, labels.peers.reporter == "source");
        let (timed, request_sized, response_sized) =
            (on(REQUEST_DURATION), on(REQUEST_SIZE) && request_bytes.is_some(), on(RESPONSE_SIZE));
        if !(timed || request_sized || response_sized) {
            return;
        }
        if self.requests.get(labels).is_none() {
            self.index().requests.insert(labels.clone());
        }
        if timed {
            self.request_duration.0.get_or_create(labels).observe(duration.as_secs_f64() * 1000.0);
        }
        if let Some(n) = request_bytes.filter(|_| request_sized) {
            self.request_bytes.0.get_or_create(labels).observe(n as f64);
        }
        if response_sized {
            self.response_bytes.0.get_or_create(labels).observe(response_bytes as f64);
        }
    }

    /// The request metrics of `labels`' series, looked up once, for a connection whose
    /// requests keep landing in it: recorded through the handle, a request costs no
    /// lookup (six otherwise). Valid while [`Metrics::still_current`] says so.
    pub fn request_series(&self, labels: &RequestLabels, policy: &TelemetryPolicy) -> RequestSeries {
        use std::sync::atomic::Ordering;
        // Read before the lookups: a drop that races them makes the handle stale.
        let generation = self.request_generation.load(Ordering::Acquire);
        let source = labels.peers.reporter == "source";
        let on = |metric| policy.metric_on(metric, source);
        let wanted = [REQUEST_COUNT, REQUEST_DURATION, REQUEST_SIZE, RESPONSE_SIZE].map(on);
        if wanted.iter().any(|w| *w) && self.requests.get(labels).is_none() {
            self.index().requests.insert(labels.clone());
        }
        let histogram = |family: &RequestHistograms, on: bool| on.then(|| family.0.get_or_create(labels).clone());
        RequestSeries {
            generation,
            count: wanted[0].then(|| self.requests.get_or_create(labels).clone()),
            duration: histogram(&self.request_duration, wanted[1]),
            request_size: histogram(&self.request_bytes, wanted[2]),
            response_size: histogram(&self.response_bytes, wanted[3]),
        }
    }

    /// Whether `series` still records into its exported series (none was dropped
    /// since it was looked up).
    pub fn still_current(&self, series: &RequestSeries) -> bool {
        series.generation == self.request_generation.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The newest refusals, for the dashboard.
    pub fn recent_denials(&self) -> RecentDenials {
        self.recent_denials.clone()
    }

    /// Counts a gRPC request's messages, each way (the request's where the path read
    /// them).
    pub fn grpc_messages(&self, labels: &RequestLabels, policy: &TelemetryPolicy, request: Option<u64>, response: u64) {
        let source = labels.peers.reporter == "source";
        if self.requests.get(labels).is_none() {
            self.index().requests.insert(labels.clone());
        }
        if let Some(n) = request.filter(|_| policy.metric_on(GRPC_REQUEST_MESSAGES, source)) {
            self.request_messages.get_or_create(labels).inc_by(n);
        }
        if policy.metric_on(GRPC_RESPONSE_MESSAGES, source) {
            self.response_messages.get_or_create(labels).inc_by(response);
        }
    }

    /// Counts a refusal protecting `dst`, and keeps it among the recent ones with who
    /// was refused (`source`) and the decision's words (`detail`).
    pub fn denied(&self, dst: &Workload, reason: DenyReason, source: String, detail: &str) {
        self.recent_denials.push(Denial {
            at: crate::identity::humantime_utc(std::time::SystemTime::now()),
            workload: format!("{}/{}", dst.namespace, dst.meta.workload),
            source,
            reason,
            detail: detail.to_string(),
        });
        let labels = DenyLabels {
            destination_workload: dst.meta.workload.clone(),
            destination_workload_namespace: dst.namespace.clone(),
            reason,
        };
        if self.denied.get(&labels).is_none() {
            self.index().denied.insert(labels.clone());
        }
        self.denied.get_or_create(&labels).inc();
    }

    /// Counts a connection as open (the metrics `policy` leaves on). The byte counters
    /// it hands back count into no series when their metric is off.
    pub fn opened(&self, labels: &ConnLabels, policy: &TelemetryPolicy) -> OpenConn {
        let source = labels.peers.reporter == "source";
        let on = |metric| policy.metric_on(metric, source);
        if [TCP_OPENED, TCP_CLOSED, TCP_SENT, TCP_RECEIVED].into_iter().any(on) && self.opened.get(labels).is_none() {
            self.index().conns.insert(labels.clone());
        }
        if on(TCP_OPENED) {
            self.opened.get_or_create(labels).inc();
        }
        self.active.inc();
        self.opened_total.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.conn_counters(labels, policy)
    }

    /// The byte counters of a connection with `labels` (detached ones for metrics
    /// `policy` turns off), and whether its closing is counted.
    fn conn_counters(&self, labels: &ConnLabels, policy: &TelemetryPolicy) -> OpenConn {
        let on = |metric| policy.metric_on(metric, labels.peers.reporter == "source");
        let counter = |family: &Family<ConnLabels, Counter>, metric| {
            if on(metric) { family.get_or_create(labels).clone() } else { Counter::default() }
        };
        OpenConn {
            received: counter(&self.received, TCP_RECEIVED),
            sent: counter(&self.sent, TCP_SENT),
            closed: on(TCP_CLOSED),
        }
    }

    /// How many connections opened since start, and how many are open.
    pub fn traffic(&self) -> crate::code_pages::Traffic {
        use std::sync::atomic::Ordering::Relaxed;
        crate::code_pages::Traffic {
            opened: self.opened_total.load(Relaxed),
            open: u64::try_from(self.active.get()).unwrap_or(0) + self.http_open.load(Relaxed),
        }
    }

    /// Counts an HTTP client connection served request by request (a pod's outbound
    /// routes, a gateway's listener) for [`Metrics::traffic`] while the handle lives:
    /// its requests are measured series by series, its connection in no TCP series.
    pub fn serving_http(self: &Arc<Self>) -> ServingHttp {
        use std::sync::atomic::Ordering::Relaxed;
        self.opened_total.fetch_add(1, Relaxed);
        self.http_open.fetch_add(1, Relaxed);
        ServingHttp(self.clone())
    }

    /// Counts a connection as closed. Its bytes were counted as they passed, on the
    /// counters [`OpenConn`] holds (`sent` is server to client, `received` client to
    /// server, as Istio defines them).
    pub fn closed(&self, labels: &ConnLabels, open: OpenConn) {
        if open.closed {
            if self.closed.get(labels).is_none() {
                self.index().conns.insert(labels.clone());
            }
            self.closed.get_or_create(labels).inc();
        }
        self.active.dec();
    }

    /// Counts a connection the agent did not pass itself (the kernel's direct path
    /// reported it) closed, with its bytes: `received` client to server, `sent` server
    /// to client. Its opening was counted by [`Metrics::opened`] when reported.
    pub fn closed_elsewhere(&self, labels: &ConnLabels, policy: &TelemetryPolicy, (received, sent): (u64, u64)) {
        let source = labels.peers.reporter == "source";
        let on = |metric| policy.metric_on(metric, source);
        if [TCP_CLOSED, TCP_SENT, TCP_RECEIVED].into_iter().any(on) && self.closed.get(labels).is_none() {
            self.index().conns.insert(labels.clone());
        }
        let open = self.conn_counters(labels, policy);
        open.received.inc_by(received);
        open.sent.inc_by(sent);
        self.closed(labels, open);
    }

    /// Drops every series that names a workload `snapshot` no longer has; returns how
    /// many. A connection still open re-creates its series when it closes.
    pub fn forget_gone(&self, snapshot: &Snapshot) -> usize {
        let known: HashSet<(&str, &str)> =
            snapshot.workloads.iter().map(|w| (w.meta.namespace.as_str(), w.meta.workload.as_str())).collect();
        let gone = |ns: &str, workload: &str| workload != UNKNOWN && !known.contains(&(ns, workload));
        let gone_side = |m: &WorkloadMeta| gone(&m.namespace, &m.workload);
        let peers_gone = |p: &PeerLabels| gone_side(&p.source.0) || gone_side(&p.destination.0);
        let mut index = self.index();
        let mut dropped = 0;
        index.conns.retain(|l| {
            let keep = !peers_gone(&l.peers);
            if !keep {
                for f in [&self.opened, &self.closed, &self.sent, &self.received] {
                    f.remove(l);
                }
                dropped += 1;
            }
            keep
        });
        index.requests.retain(|l| {
            let keep = !peers_gone(&l.peers);
            if !keep {
                self.request_generation.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
                self.requests.remove(l);
                self.request_messages.remove(l);
                self.response_messages.remove(l);
                self.request_duration.0.remove(l);
                self.request_bytes.0.remove(l);
                self.response_bytes.0.remove(l);
                dropped += 1;
            }
            keep
        });
        dropped += drop_series(&mut index.denied, &self.denied, |l| {
            gone(&l.destination_workload_namespace, &l.destination_workload)
        });
        dropped +=
            drop_series(&mut index.blocked, &self.blocked, |l| gone(&l.source_workload_namespace, &l.source_workload));
        dropped
    }
}

/// Removes from `family` (and from `index`) the series `is_gone` picks; returns how many.
fn drop_series<L>(index: &mut HashSet<L>, family: &Family<L, Counter>, is_gone: impl Fn(&L) -> bool) -> usize
where
    L: Clone + std::hash::Hash + Eq + EncodeLabelSet + std::fmt::Debug,
{
    let before = index.len();
    index.retain(|l| {
        let keep = !is_gone(l);
        if !keep {
            family.remove(l);
        }
        keep
    });
    before - index.len()
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::parse_documents;

    const PODS: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop, uid: 6f1e0c9a-0000-4000-8000-000000000001}
spec: {nodeName: node1}
status: {podIP: 10.10.1.2}
---
apiVersion: v1
kind: Pod
metadata: {name: batch, namespace: shop, uid: 6f1e0c9a-0000-4000-8000-000000000002}
spec: {nodeName: node1}
status: {podIP: 10.10.1.3}
"#;

    fn snapshot(yaml: &str) -> Snapshot {
        Snapshot::compile(&parse_documents(Path::new("pods.yaml"), yaml).unwrap(), "cluster.local", 1)
    }

    /// The `web` and `batch` workloads of [`PODS`].
    fn web_and_batch() -> (Arc<Workload>, Arc<Workload>) {
        let pods = snapshot(PODS);
        let find = |name: &str| pods.workloads.iter().find(|w| w.name == name).unwrap().clone();
        (find("web"), find("batch"))
    }

    /// [`PODS`] once `batch` has left: only `web`.
    fn batch_gone() -> Snapshot {
        snapshot(PODS.split("---").next().unwrap())
    }

    /// A 200 to plain HTTP from `batch` to `web`, as web's agent labels it.
    fn web_answers_batch() -> RequestLabels {
        let (web, batch) = web_and_batch();
        RequestLabels {
            peers: SharedPeers::new(PeerLabels::destination(
                &web,
                Some(&batch),
                ServiceLabels::service(Some("shop/web")),
                true,
            )),
            request_protocol: "http",
            response_code: 200,
            response_flags: "-",
            grpc_response_status: None,
        }
    }

    fn encoded(registry: &Registry) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, registry).unwrap();
        out
    }

    /// Connections between the same two workloads hold one copy of their labels, and
    /// copies no connection holds are let go as new ones come.
    #[test]
    fn live_connections_share_their_label_sets_and_departed_ones_are_let_go() {
        let m = Metrics::default();
        let (web, batch) = web_and_batch();
        let to_web = || ConnLabels::outbound(&batch, Some(&web), ServiceLabels::service(Some("shop/web")), true);
        let (a, b) = (m.shared(to_web()), m.shared(to_web()));
        assert!(Arc::ptr_eq(&a, &b), "one copy for both connections");
        let to_none = ConnLabels::outbound(&batch, None, ServiceLabels::unknown(), false);
        let other = m.shared(to_none);
        assert!(!Arc::ptr_eq(&a, &other));
        let old = Arc::downgrade(&other);
        drop(other);
        for port in 0..200u16 {
            let mut l = to_web();
            l.peers.service.destination_service = format!("svc-{port}");
            drop(m.shared(l));
        }
        assert_eq!(old.strong_count(), 0, "a label set no connection holds is let go");
        assert!(m.shared_labels.lock().unwrap().set.len() < 130, "the set stays near what connections hold");
        assert!(Arc::ptr_eq(&a, &m.shared(to_web())), "one still held stays shared");
    }

    /// Requests of two connections between the same workloads count into one series
    /// (their shared labels are separate copies), and different labels into another.
    #[test]
    fn shared_peer_labels_are_equal_by_value_and_encode_as_the_labels() {
        let mut registry = Registry::with_prefix("istio");
        let m = Metrics::new(&mut registry);
        let (web, batch) = web_and_batch();
        let peers = || PeerLabels::destination(&web, Some(&batch), ServiceLabels::service(Some("shop/web")), true);
        let (a, b) = (SharedPeers::new(peers()), SharedPeers::new(peers()));
        assert!(!Arc::ptr_eq(&a.labels, &b.labels));
        assert_eq!(a, b);
        let keys = std::hash::RandomState::new();
        assert_eq!(std::hash::BuildHasher::hash_one(&keys, &a), std::hash::BuildHasher::hash_one(&keys, &b));
        let other =
            SharedPeers::new(PeerLabels::destination(&web, None, ServiceLabels::service(Some("shop/web")), false));
        assert_ne!(a, other);
        let request = |peers: &SharedPeers, code: &str| RequestLabels {
            peers: peers.clone(),
            request_protocol: "http",
            response_code: code.parse().unwrap(),
            response_flags: "-",
            grpc_response_status: None,
        };
        let policy = TelemetryPolicy::default();
        for peers in [&a, &b, &a] {
            m.request(&request(peers, "200"), &policy);
        }
        m.request(&request(&other, "200"), &policy);
        m.request(&request(&a, "503"), &policy);
        let text = encoded(&registry);
        let counts: Vec<&str> = text.lines().filter(|l| l.starts_with("istio_requests_total{")).collect();
        assert_eq!(counts.len(), 3, "{text}");
        let line = counts
            .iter()
            .find(|l| l.contains("response_code=\"200\"") && l.contains("connection_security_policy=\"mutual_tls\""))
            .unwrap();
        assert!(line.contains("source_workload=\"batch\"") && line.contains("destination_workload=\"web\""), "{line}");
        assert!(line.ends_with(" 3"), "{line}");
    }

    #[test]
    fn http_clients_served_request_by_request_count_as_traffic() {
        let m = Arc::new(Metrics::default());
        let idle = m.traffic();
        let served = m.serving_http();
        let during = m.traffic();
        assert_eq!((during.opened, during.open), (idle.opened + 1, idle.open + 1));
        drop(served);
        let after = m.traffic();
        assert_eq!((after.opened, after.open), (idle.opened + 1, idle.open));
    }

    #[test]
    fn series_of_a_departed_workload_expire_and_the_others_stay() {
        let mut registry = Registry::with_prefix("istio");
        let m = Metrics::new(&mut registry);
        let both = snapshot(PODS);
        let (web, batch) = web_and_batch();
        let to_web = ConnLabels::outbound(&batch, Some(&web), ServiceLabels::service(Some("shop/web")), true);
        let open = m.opened(&to_web, &TelemetryPolicy::default());
        open.sent.inc_by(10);
        m.closed(&to_web, open);
        let from_web = ConnLabels::inbound(&both, &batch, 8080, Some(&web), true);
        let open = m.opened(&from_web, &TelemetryPolicy::default());
        m.closed(&from_web, open);
        m.denied(&batch, DenyReason::Policy, "plaintext 10.0.0.9".into(), "denied by default/deny-batch");
        m.denied(&web, DenyReason::Policy, "plaintext 10.0.0.9".into(), "denied by default/deny-web");
        assert_eq!(m.forget_gone(&both), 0, "nothing departed");
        assert!(encoded(&registry).contains("source_workload=\"batch\""));

        // batch leaves: every series naming it goes, web's own denial stays.
        let dropped = m.forget_gone(&batch_gone());
        assert_eq!(dropped, 3, "two connection label sets and one denial");
        let text = encoded(&registry);
        assert!(!text.contains("\"batch\""), "{text}");
        assert!(text.contains("istio_mesh_denied_total{destination_workload=\"web\""), "{text}");
    }

    /// A connection's handle on a request series records what the lookups record, and
    /// once its series is dropped (a workload left) says so, so the next request looks
    /// the series up again and counts into the exported one.
    #[test]
    fn a_request_series_handle_records_as_lookups_do_until_its_series_is_dropped() {
        let mut registry = Registry::with_prefix("istio");
        let m = Metrics::new(&mut registry);
        let labels = web_answers_batch();
        let policy = TelemetryPolicy::default();
        let series = m.request_series(&labels, &policy);
        series.request();
        series.done(std::time::Duration::from_millis(3), (Some(10), 20));
        m.request(&labels, &policy);
        m.request_done(&labels, &policy, std::time::Duration::from_millis(3), (Some(10), 20));
        let text = encoded(&registry);
        for metric in
            ["istio_requests_total{", "istio_request_duration_milliseconds_count{", "istio_request_bytes_count{"]
        {
            let line = text.lines().find(|l| l.starts_with(metric)).unwrap_or_else(|| panic!("{metric}: {text}"));
            assert!(line.ends_with(" 2"), "one series, both ways counted: {line}");
        }
        assert!(m.still_current(&series));
        assert_eq!(m.forget_gone(&batch_gone()), 1);
        assert!(!m.still_current(&series), "its series was dropped");
        let again = m.request_series(&labels, &policy);
        assert!(m.still_current(&again));
        again.request();
        let text = encoded(&registry);
        let line = text.lines().find(|l| l.starts_with("istio_requests_total{")).unwrap_or_else(|| panic!("{text}"));
        assert!(line.ends_with(" 1"), "counted anew in the exported series: {line}");
    }

    /// A connection's memo hands out its last series while the labels and the policy
    /// are the same and the series is current; otherwise it looks the series up, so an
    /// answer never lands in another answer's series or under a policy no longer in
    /// force.
    #[test]
    fn a_series_memo_keeps_the_last_series_only_while_it_is_the_answers_own() {
        let mut registry = Registry::with_prefix("istio");
        let m = Metrics::new(&mut registry);
        let ok = web_answers_batch();
        let answer = |code: u16| RequestLabels { response_code: code, ..ok.clone() };
        let memo = SeriesMemo::default();
        let policy = Arc::new(TelemetryPolicy::default());
        for code in [200, 200, 503, 200] {
            memo.series(&m, &answer(code), &policy).request();
        }
        let count = |code: u16| {
            let text = encoded(&registry);
            let wanted = format!("response_code=\"{code}\"");
            text.lines()
                .filter(|l| l.starts_with("istio_requests_total{") && l.contains(&wanted))
                .map(|l| l.rsplit(' ').next().unwrap().to_string())
                .collect::<Vec<_>>()
        };
        assert_eq!(count(200), ["3"]);
        assert_eq!(count(503), ["1"]);

        // REQUEST_COUNT off on the destination's side.
        let counting_off = TelemetryPolicy { disabled_metrics: 1 << (2 * REQUEST_COUNT + 1), ..Default::default() };
        memo.series(&m, &answer(200), &Arc::new(counting_off)).request();
        assert_eq!(count(200), ["3"], "a new policy is looked up under, not the kept handle's");

        assert_eq!(m.forget_gone(&batch_gone()), 2);
        memo.series(&m, &answer(200), &policy).request();
        assert_eq!(count(200), ["1"], "a dropped series is looked up again");
    }

    const DEPLOYED: &str = r#"
apiVersion: v1
kind: Pod
metadata:
  name: reviews-v2-7d9c5b6f4-x2k8q
  namespace: bookinfo
  labels: {app: reviews, version: v2, pod-template-hash: 7d9c5b6f4}
  ownerReferences: [{apiVersion: apps/v1, kind: ReplicaSet, name: reviews-v2-7d9c5b6f4, controller: true, uid: u1}]
spec: {nodeName: node1, serviceAccountName: bookinfo-reviews}
status: {podIP: 10.10.1.2}
---
apiVersion: v1
kind: Pod
metadata:
  name: report-28915200-abcde
  namespace: bookinfo
  labels: {service.istio.io/canonical-name: nightly, app: report}
  ownerReferences: [{apiVersion: batch/v1, kind: Job, name: report-28915200, controller: true, uid: u2}]
spec: {nodeName: node1}
status: {podIP: 10.10.1.3}
---
apiVersion: v1
kind: Pod
metadata: {name: db-0, namespace: bookinfo, ownerReferences: [{kind: StatefulSet, name: db, controller: true}]}
spec: {nodeName: node1}
status: {podIP: 10.10.1.4}
---
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: bookinfo}
spec: {selector: {app: reviews}, clusterIP: 10.96.0.20, ports: [{name: http, port: 9080}]}
"#;

    fn line<'a>(text: &'a str, prefix: &str) -> &'a str {
        text.lines().find(|l| l.starts_with(prefix)).unwrap_or_else(|| panic!("no {prefix} in {text}"))
    }

    #[test]
    fn metric_indexes_are_the_telemetry_apis() {
        use crate::config::telemetry::{METRICS, metric_index};
        for (i, name) in [
            (REQUEST_COUNT, "REQUEST_COUNT"),
            (REQUEST_DURATION, "REQUEST_DURATION"),
            (REQUEST_SIZE, "REQUEST_SIZE"),
            (RESPONSE_SIZE, "RESPONSE_SIZE"),
            (TCP_OPENED, "TCP_OPENED_CONNECTIONS"),
            (TCP_CLOSED, "TCP_CLOSED_CONNECTIONS"),
            (TCP_SENT, "TCP_SENT_BYTES"),
            (TCP_RECEIVED, "TCP_RECEIVED_BYTES"),
        ] {
            assert_eq!(METRICS[i], name);
            assert_eq!(metric_index(name), Some(i));
        }
    }

    /// Every label Kiali's graph, security view and workload pages query, named as
    /// Istio names them, with workloads by their controllers.
    #[test]
    fn connections_carry_istios_full_label_set_with_workloads_by_owner() {
        let mut registry = Registry::with_prefix("istio");
        let m = Metrics::new(&mut registry);
        let snap = snapshot(DEPLOYED);
        let find = |name: &str| snap.workloads.iter().find(|w| w.name == name).unwrap().clone();
        let (reviews, report, db) = (find("reviews-v2-7d9c5b6f4-x2k8q"), find("report-28915200-abcde"), find("db-0"));
        let l = ConnLabels::inbound(&snap, &reviews, 9080, Some(&report), true);
        let open = m.opened(&l, &TelemetryPolicy::default());
        open.received.inc_by(7);
        open.sent.inc_by(11);
        let text = encoded(&registry);
        // Counted while the connection is open, not only when it closes.
        let received = line(&text, "istio_tcp_received_bytes_total{");
        assert!(received.ends_with(" 7"), "{received}");
        for label in [
            "reporter=\"destination\"",
            "source_workload=\"report\"",
            "source_workload_namespace=\"bookinfo\"",
            "source_principal=\"spiffe://cluster.local/ns/bookinfo/sa/default\"",
            "source_app=\"nightly\"",
            "source_version=\"latest\"",
            "source_canonical_service=\"nightly\"",
            "source_canonical_revision=\"latest\"",
            "source_cluster=\"Kubernetes\"",
            "destination_workload=\"reviews-v2\"",
            "destination_workload_namespace=\"bookinfo\"",
            "destination_principal=\"spiffe://cluster.local/ns/bookinfo/sa/bookinfo-reviews\"",
            "destination_app=\"reviews\"",
            "destination_version=\"v2\"",
            "destination_canonical_service=\"reviews\"",
            "destination_canonical_revision=\"v2\"",
            "destination_cluster=\"Kubernetes\"",
            "destination_service=\"reviews.bookinfo.svc.cluster.local\"",
            "destination_service_name=\"reviews\"",
            "destination_service_namespace=\"bookinfo\"",
            "request_protocol=\"tcp\"",
            "response_flags=\"-\"",
            "connection_security_policy=\"mutual_tls\"",
        ] {
            assert!(received.contains(label), "{label} missing: {received}");
        }
        m.closed(&l, open);
        assert!(line(&encoded(&registry), "istio_tcp_sent_bytes_total{").ends_with(" 11"));

        // A StatefulSet's pod is the StatefulSet; no Service serves a port it was not
        // dialed at.
        let l = ConnLabels::outbound(&db, None, ServiceLabels::unknown(), false);
        assert_eq!(l.peers.source.0.workload, "db");
        assert_eq!(l.peers.destination.0.workload, "unknown");
        let elsewhere = ConnLabels::inbound(&snap, &reviews, 7000, None, false);
        assert_eq!(elsewhere.peers.service, ServiceLabels::unknown());
    }
}

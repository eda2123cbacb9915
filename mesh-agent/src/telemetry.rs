//! Metrics, named as Istio names them so existing dashboards (Kiali, Grafana) work:
//! `istio_tcp_connections_opened_total`, `istio_tcp_connections_closed_total`,
//! `istio_tcp_sent_bytes_total`, `istio_tcp_received_bytes_total`.
//!
//! Series name workloads; a workload that left the config takes its series with it
//! ([`Metrics::forget_gone`]), so pod churn does not grow the agent or the scrape.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Mutex;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::identity::Identity;
use crate::snapshot::Snapshot;
use crate::state::Workload;

/// Who reports a connection: the source side (outbound) or the destination (inbound).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
pub enum Direction {
    /// Reported by the source's agent.
    Outbound,
    /// Reported by the destination's agent.
    Inbound,
}

/// Labels of the TCP metrics (Istio's standard label names).
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ConnLabels {
    /// `source` or `destination`, as Istio reports it.
    pub reporter: String,
    /// Direction, for our own dashboards.
    pub direction: Direction,
    /// Source pod name.
    pub source_workload: String,
    /// Source namespace.
    pub source_workload_namespace: String,
    /// Source identity.
    pub source_principal: String,
    /// Destination pod name.
    pub destination_workload: String,
    /// Destination namespace.
    pub destination_workload_namespace: String,
    /// Destination service `namespace/name`, when a VIP was dialed.
    pub destination_service: String,
    /// `mutual_tls` or `none`.
    pub connection_security_policy: String,
}

const UNKNOWN: &str = "unknown";

fn security(mtls: bool) -> String {
    if mtls { "mutual_tls" } else { "none" }.into()
}

impl ConnLabels {
    /// Labels of an outbound connection from `src`.
    pub fn new(
        direction: Direction,
        src: &Workload,
        dst: Option<&Workload>,
        service: Option<&str>,
        mtls: bool,
    ) -> Self {
        Self {
            reporter: "source".into(),
            direction,
            source_workload: src.name.clone(),
            source_workload_namespace: src.namespace.clone(),
            source_principal: src.identity.to_string(),
            destination_workload: dst.map_or(UNKNOWN.into(), |w| w.name.clone()),
            destination_workload_namespace: dst.map_or(UNKNOWN.into(), |w| w.namespace.clone()),
            destination_service: service.unwrap_or(UNKNOWN).into(),
            connection_security_policy: security(mtls),
        }
    }

    /// Labels of an inbound connection to `dst` from `src` (if known).
    pub fn inbound(dst: &Workload, src: Option<&Workload>, mtls: bool) -> Self {
        Self {
            reporter: "destination".into(),
            direction: Direction::Inbound,
            source_workload: src.map_or(UNKNOWN.into(), |w| w.name.clone()),
            source_workload_namespace: src.map_or(UNKNOWN.into(), |w| w.namespace.clone()),
            source_principal: src.map_or(UNKNOWN.into(), |w| w.identity.to_string()),
            destination_workload: dst.name.clone(),
            destination_workload_namespace: dst.namespace.clone(),
            destination_service: UNKNOWN.into(),
            connection_security_policy: security(mtls),
        }
    }

    /// Labels of an HBONE stream to `dst` from an authenticated `client`.
    pub fn inbound_from_identity(dst: &Workload, client: &Identity, snapshot: &Snapshot, peer: SocketAddr) -> Self {
        let src = snapshot.workload_by_ip(peer.ip()).filter(|w| w.identity == *client);
        let mut l = Self::inbound(dst, src.map(|w| &**w), true);
        l.source_principal = client.to_string();
        l
    }
}

/// A connection counted as open; hand it back to [`Metrics::closed`].
#[derive(Debug)]
pub struct OpenConn(());

/// Labels of `istio_requests_total`, reported by the source's agent.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RequestLabels {
    /// `source` (the client's agent routed it) or `destination` (the server's agent
    /// judged it under an AuthorizationPolicy).
    pub reporter: String,
    /// Source pod name.
    pub source_workload: String,
    /// Source namespace.
    pub source_workload_namespace: String,
    /// Service routed to, `namespace/name`.
    pub destination_service: String,
    /// Subset of the DestinationRule, or `unknown`.
    pub destination_version: String,
    /// Pod that answered, or `unknown` when none did.
    pub destination_workload: String,
    /// HTTP status returned to the client.
    pub response_code: String,
    /// Envoy response flags: `-`, `UO` (overflow), `UF` (connect failure), `UT`
    /// (timeout), `NR` (no route), `FI` (fault abort), `DI` (fault delay), `URX`
    /// (retries exhausted), `UH` (no healthy endpoint).
    pub response_flags: String,
    /// gRPC status from the answer's headers or trailers; empty for plain HTTP.
    pub grpc_response_status: String,
}

/// Why a connection or request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
pub enum DenyReason {
    /// Plaintext to a port whose PeerAuthentication is STRICT.
    MtlsStrict,
    /// An AuthorizationPolicy, at connection accept.
    Policy,
    /// An AuthorizationPolicy, for one HTTP request.
    HttpPolicy,
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

/// Envoy's default histogram buckets, which Istio's request duration (milliseconds)
/// and size (bytes) histograms use, so dashboards' quantiles read the same.
pub const ENVOY_BUCKETS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0, 60000.0, 300000.0,
    600000.0, 1800000.0, 3600000.0,
];

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
    /// Config reloads rejected.
    pub config_rejected: Counter,
    /// Config snapshots applied.
    pub config_applied: Counter,
    /// Pods enrolled on this node.
    pub enrolled_pods: Gauge,
    /// Kubelet probe connections let through to applications (not mesh traffic).
    pub probe_connections: Counter,
    denied: Family<DenyLabels, Counter>,
    refused: Family<RefusedLabels, Counter>,
    blocked: Family<BlockedLabels, Counter>,
    dns: Family<DnsLabels, Counter>,
    request_duration: RequestHistograms,
    request_bytes: RequestHistograms,
    response_bytes: RequestHistograms,
    series: Mutex<SeriesIndex>,
}

impl Metrics {
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
        registry.register("tcp_connections_opened", "TCP connections opened", m.opened.clone());
        registry.register("tcp_connections_closed", "TCP connections closed", m.closed.clone());
        registry.register("tcp_sent_bytes", "Bytes sent in responses (server to client)", m.sent.clone());
        registry.register("tcp_received_bytes", "Bytes received in requests (client to server)", m.received.clone());
        registry.register("mesh_active_connections", "Connections open now", m.active.clone());
        registry.register("mesh_config_rejected", "Config inputs rejected", m.config_rejected.clone());
        registry.register("mesh_config_applied", "Config snapshots applied", m.config_applied.clone());
        registry.register("mesh_enrolled_pods", "Pods captured on this node", m.enrolled_pods.clone());
        registry.register("mesh_denied", "Connections and requests refused by policy", m.denied.clone());
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
            "mesh_dns_requests",
            "DNS queries of captured pods: answered by the mesh, forwarded upstream, failed upstream, refused",
            m.dns.clone(),
        );
        m
    }

    /// Counts a DNS query by what the proxy did with it.
    pub fn dns(&self, outcome: &'static str) {
        self.dns.get_or_create(&DnsLabels { outcome }).inc();
    }

    /// Counts a connection `src` made outside the registry, refused (REGISTRY_ONLY).
    pub fn outbound_blocked(&self, src: &Workload) {
        let labels =
            BlockedLabels { source_workload: src.name.clone(), source_workload_namespace: src.namespace.clone() };
        if self.blocked.get(&labels).is_none() {
            self.index().blocked.insert(labels.clone());
        }
        self.blocked.get_or_create(&labels).inc();
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

    /// Counts one HTTP request (`istio_requests_total`).
    pub fn request(&self, labels: &RequestLabels) {
        if self.requests.get(labels).is_none() {
            self.index().requests.insert(labels.clone());
        }
        self.requests.get_or_create(labels).inc();
    }

    /// Records a request whose response has ended (or was dropped): how long it took
    /// from its arrival, and how many request and response body bytes passed. The
    /// request itself is counted by [`Metrics::request`].
    pub fn request_done(
        &self,
        labels: &RequestLabels,
        duration: std::time::Duration,
        request_bytes: u64,
        response_bytes: u64,
    ) {
        if self.requests.get(labels).is_none() {
            self.index().requests.insert(labels.clone());
        }
        self.request_duration.0.get_or_create(labels).observe(duration.as_secs_f64() * 1000.0);
        self.request_bytes.0.get_or_create(labels).observe(request_bytes as f64);
        self.response_bytes.0.get_or_create(labels).observe(response_bytes as f64);
    }

    /// Counts a refusal protecting `dst`.
    pub fn denied(&self, dst: &Workload, reason: DenyReason) {
        let labels = DenyLabels {
            destination_workload: dst.name.clone(),
            destination_workload_namespace: dst.namespace.clone(),
            reason,
        };
        if self.denied.get(&labels).is_none() {
            self.index().denied.insert(labels.clone());
        }
        self.denied.get_or_create(&labels).inc();
    }

    /// Counts a connection as open.
    pub fn opened(&self, labels: &ConnLabels) -> OpenConn {
        if self.opened.get(labels).is_none() {
            self.index().conns.insert(labels.clone());
        }
        self.opened.get_or_create(labels).inc();
        self.active.inc();
        OpenConn(())
    }

    /// Counts a connection as closed with its byte counts: `sent` is response bytes
    /// (server to client), `received` request bytes, as Istio defines them.
    pub fn closed(&self, labels: &ConnLabels, _open: OpenConn, sent: u64, received: u64) {
        if self.closed.get(labels).is_none() {
            self.index().conns.insert(labels.clone());
        }
        self.closed.get_or_create(labels).inc();
        self.sent.get_or_create(labels).inc_by(sent);
        self.received.get_or_create(labels).inc_by(received);
        self.active.dec();
    }

    /// Drops every series that names a workload `snapshot` no longer has; returns how
    /// many. A connection still open re-creates its series when it closes.
    pub fn forget_gone(&self, snapshot: &Snapshot) -> usize {
        let known: HashSet<(&str, &str)> =
            snapshot.workloads.iter().map(|w| (w.namespace.as_str(), w.name.as_str())).collect();
        let names: HashSet<&str> = snapshot.workloads.iter().map(|w| w.name.as_str()).collect();
        let gone = |ns: &str, name: &str| name != UNKNOWN && !known.contains(&(ns, name));
        let mut index = self.index();
        let mut dropped = 0;
        index.conns.retain(|l| {
            let keep = !gone(&l.source_workload_namespace, &l.source_workload)
                && !gone(&l.destination_workload_namespace, &l.destination_workload);
            if !keep {
                for f in [&self.opened, &self.closed, &self.sent, &self.received] {
                    f.remove(l);
                }
                dropped += 1;
            }
            keep
        });
        index.requests.retain(|l| {
            // The request labels carry no destination namespace: a destination name no
            // namespace has any more is gone.
            let keep = !gone(&l.source_workload_namespace, &l.source_workload)
                && (l.destination_workload == UNKNOWN || names.contains(l.destination_workload.as_str()));
            if !keep {
                self.requests.remove(l);
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

    fn encoded(registry: &Registry) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, registry).unwrap();
        out
    }

    #[test]
    fn series_of_a_departed_workload_expire_and_the_others_stay() {
        let mut registry = Registry::with_prefix("istio");
        let m = Metrics::new(&mut registry);
        let both = snapshot(PODS);
        let web = both.workloads.iter().find(|w| w.name == "web").unwrap().clone();
        let batch = both.workloads.iter().find(|w| w.name == "batch").unwrap().clone();
        let to_web = ConnLabels::new(Direction::Outbound, &batch, Some(&web), Some("shop/web"), true);
        let open = m.opened(&to_web);
        m.closed(&to_web, open, 10, 20);
        let from_web = ConnLabels::inbound(&batch, Some(&web), true);
        let open = m.opened(&from_web);
        m.closed(&from_web, open, 1, 2);
        m.denied(&batch, DenyReason::Policy);
        m.denied(&web, DenyReason::Policy);
        assert_eq!(m.forget_gone(&both), 0, "nothing departed");
        assert!(encoded(&registry).contains("source_workload=\"batch\""));

        // batch leaves: every series naming it goes, web's own denial stays.
        let web_only: String = PODS.split("---").next().unwrap().to_string();
        let dropped = m.forget_gone(&snapshot(&web_only));
        assert_eq!(dropped, 3, "two connection label sets and one denial");
        let text = encoded(&registry);
        assert!(!text.contains("\"batch\""), "{text}");
        assert!(text.contains("istio_mesh_denied_total{destination_workload=\"web\""), "{text}");
    }
}

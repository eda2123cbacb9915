//! Admin, metrics and readiness endpoints (node-level, in the agent's own netns).
//!
//! `/healthz/ready` (200 once every local pod is served), `/metrics` (Prometheus text,
//! for authenticated scrapers only off the admin address: see [`scrape_auth`]),
//! `/sync_status` (version, config digest, counts: what `meshctl proxy-status` reads
//! through the API server's pod proxy), and, on the admin address only (loopback by
//! default, as Envoy's 15000), `/config_dump` (the snapshot and rejected config): the
//! mesh's topology is not for every pod that can reach the metrics port.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use prometheus_client::registry::Registry;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::snapshot::SharedSnapshot;
use crate::transport::limits;

pub mod dashboard;
mod scrape_auth;

pub use scrape_auth::{Refusal, ScrapeAuth, ScrapeAuthMode};

/// What the admin endpoints read.
#[derive(Clone)]
pub struct AdminState {
    /// Set once the agent serves every local pod.
    pub ready: Arc<AtomicBool>,
    /// Metrics registry.
    pub registry: Arc<Registry>,
    /// Current snapshot.
    pub snapshot: SharedSnapshot,
    /// Rejected config, rendered as text, shown in the dump.
    pub config_errors: Arc<std::sync::Mutex<Vec<String>>>,
    /// Every local pod that should be captured, with where it stands.
    pub pods: Arc<std::sync::Mutex<Vec<PodReport>>>,
    /// This node.
    pub node: String,
    /// Admin connections closed at the cap.
    pub refused: prometheus_client::metrics::counter::Counter,
    /// The workload certificates, listed (never their keys) in the config dump.
    pub certs: Option<Arc<crate::identity::CertStore>>,
    /// Who may read the metrics off the admin address.
    pub scrape_auth: Arc<ScrapeAuth>,
    /// The service graph, sampled from `registry` ([`sample_traffic`]).
    pub traffic: Arc<crate::telemetry::graph::Sampler>,
    /// Refusals the dashboard lists.
    pub denials: crate::telemetry::RecentDenials,
    /// The last config change applied, and how long it took.
    pub last_apply: Arc<std::sync::Mutex<Option<LastApply>>>,
    /// Why the config source cannot be read, and since when (None while it answers).
    pub source_unavailable: Arc<std::sync::Mutex<Option<(String, std::time::Instant)>>>,
    /// The mesh's other clusters this agent follows, as of the last reload.
    pub remote_clusters: Arc<std::sync::Mutex<Vec<RemoteClusterStatus>>>,
}

/// Where one remote cluster stands, as `/sync_status` and `meshctl remote-clusters`
/// report it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RemoteClusterStatus {
    /// The cluster's name.
    pub cluster: String,
    /// Every kind of it listed: its Services and pods are in the snapshot.
    pub synced: bool,
    /// Why it is not followed, or why its API server does not answer now.
    pub error: Option<String>,
    /// Its Services held.
    pub services: usize,
    /// Its pods held.
    pub pods: usize,
}

/// A config change applied: the snapshot compiled and swapped in, and the pods and
/// kernel tables brought in line with it.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct LastApply {
    /// The snapshot version it made.
    pub version: u64,
    /// From reading the config to reconciled, ms.
    pub took_ms: f64,
    /// Of that, reading the config (files read and parsed, objects in force), ms; the
    /// rest is the compile, the swap and the kernel tables and pods brought in line.
    pub read_ms: f64,
    /// When it was done, ms since the Unix epoch (to time a change end to end).
    pub at_unix_ms: f64,
}

impl AdminState {
    /// Not ready yet, with no errors and no pods to report.
    pub fn new(
        registry: Registry,
        snapshot: SharedSnapshot,
        node: String,
        refused: prometheus_client::metrics::counter::Counter,
        scrape_auth: Arc<ScrapeAuth>,
    ) -> Self {
        Self {
            ready: Arc::new(AtomicBool::new(false)),
            registry: Arc::new(registry),
            snapshot,
            config_errors: Default::default(),
            pods: Default::default(),
            node,
            refused,
            certs: None,
            scrape_auth,
            traffic: Arc::default(),
            denials: Default::default(),
            last_apply: Default::default(),
            source_unavailable: Default::default(),
            remote_clusters: Default::default(),
        }
    }

    /// Records whether the config source answered at the last reload, logging and
    /// counting the start and the end of an outage. What is in force meanwhile is
    /// the last config read: the mesh fails static, as Istio's proxies do when istiod
    /// is gone.
    pub fn note_source(&self, unavailable: Option<String>, up: &prometheus_client::metrics::gauge::Gauge) {
        let mut held = self.source_unavailable.lock().unwrap_or_else(|p| p.into_inner());
        match (unavailable, held.as_ref()) {
            (None, Some((reason, since))) => {
                tracing::info!(after = ?since.elapsed(), was = %reason, "config source answers again");
                *held = None;
            }
            (Some(reason), None) => {
                tracing::warn!(%reason, "config source unavailable; the last config read keeps serving");
                *held = Some((reason, std::time::Instant::now()));
            }
            (Some(reason), Some((_, since))) => *held = Some((reason, *since)),
            (None, None) => {}
        }
        up.set(i64::from(held.is_none()));
    }

    /// The outage readiness and `/sync_status` report: `<reason>` and its age.
    fn source_outage(&self) -> Option<String> {
        let held = self.source_unavailable.lock().unwrap_or_else(|p| p.into_inner());
        held.as_ref().map(|(reason, since)| format!("{reason} (for {}s)", since.elapsed().as_secs()))
    }
}

/// What `meshctl proxy-status` compares across agents, and the pods of this node the
/// agent should capture and cannot (with why): an operator must see them without the
/// config dump. Nothing about other workloads.
#[derive(Serialize)]
struct SyncStatus<'a> {
    node: &'a str,
    agent_version: &'static str,
    ready: bool,
    version: u64,
    config_digest: &'a str,
    enrolled_pods: usize,
    failed_pods: Vec<PodReport>,
    rejected_config: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    last_apply: Option<LastApply>,
    /// Why the config source cannot be read, and for how long (absent while it answers).
    #[serde(skip_serializing_if = "Option::is_none")]
    config_source_unavailable: Option<String>,
    /// The mesh's other clusters followed (absent when none).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    remote_clusters: Vec<RemoteClusterStatus>,
}

/// The config dump's own view type: compiled state is not `Serialize` on purpose.
#[derive(Serialize)]
struct ConfigDump<'a> {
    node: &'a str,
    agent_version: &'static str,
    version: u64,
    config_digest: &'a str,
    enrolled_pods: Vec<String>,
    local_pods: Vec<PodReport>,
    workloads: Vec<WorkloadView>,
    services: Vec<ServiceView>,
    routes: Vec<RouteView>,
    endpoints: Vec<EndpointView>,
    secrets: Vec<SecretView>,
    policies: Vec<PolicyView>,
    rejected_config: Vec<String>,
}

#[derive(Serialize)]
struct RouteView {
    service: String,
    virtual_service: String,
    http_rules: usize,
    tcp_rules: usize,
}

#[derive(Serialize)]
struct EndpointView {
    service: String,
    port: u16,
    address: String,
    workload: String,
    /// Reached over the mTLS tunnel.
    mtls: bool,
    /// The cluster the endpoint runs in.
    cluster: String,
    /// Its network (empty: none named).
    network: String,
}

/// A workload certificate held: never its key.
#[derive(Serialize)]
struct SecretView {
    identity: String,
    not_after: String,
    expires_in_seconds: u64,
}

#[derive(Serialize)]
struct PolicyView {
    workload: String,
    mtls: String,
    port_mtls: BTreeMap<u16, String>,
    peer_authentications: Vec<String>,
    authorization: BTreeMap<String, Vec<String>>,
}

#[derive(Serialize)]
struct WorkloadView {
    name: String,
    namespace: String,
    node: Option<String>,
    ips: Vec<String>,
    identity: String,
    enrolled: bool,
    cluster: String,
}

#[derive(Serialize)]
struct ServiceView {
    name: String,
    namespace: String,
    vips: Vec<String>,
    ports: Vec<u16>,
    endpoints: Vec<String>,
}

fn route_views(snap: &crate::snapshot::Snapshot) -> Vec<RouteView> {
    let mut v: Vec<RouteView> = snap
        .all_routes()
        .map(|(service, r)| RouteView {
            service: service.to_string(),
            virtual_service: r.virtual_service.clone(),
            http_rules: r.rules.len(),
            tcp_rules: r.tcp.len(),
        })
        .collect();
    v.sort_by(|a, b| a.service.cmp(&b.service));
    v
}

fn endpoint_views(snap: &crate::snapshot::Snapshot) -> Vec<EndpointView> {
    let mut v = Vec::new();
    for s in snap.services() {
        for sp in &s.ports {
            for e in &s.endpoints {
                let Some(addr) = e.addr(sp) else { continue };
                v.push(EndpointView {
                    service: s.key(),
                    port: sp.port,
                    address: addr.to_string(),
                    workload: format!("{}/{}", e.workload.namespace, e.name()),
                    mtls: snap.tunnels_to(&e.workload, addr.port()),
                    cluster: e.workload.meta.cluster.clone(),
                    network: e.workload.network.clone(),
                });
            }
        }
    }
    v
}

fn secret_views(certs: &crate::identity::CertStore) -> Vec<SecretView> {
    let now = std::time::SystemTime::now();
    certs
        .held()
        .into_iter()
        .map(|(identity, not_after)| SecretView {
            identity: identity.to_string(),
            not_after: crate::identity::humantime_utc(not_after),
            expires_in_seconds: not_after.duration_since(now).map_or(0, |d| d.as_secs()),
        })
        .collect()
}

/// The policies in force for this node's pods.
fn policy_views(snap: &crate::snapshot::Snapshot, node: &str) -> Vec<PolicyView> {
    let mode = |m: crate::authz::mtls::Mode| format!("{m:?}").to_uppercase();
    snap.workloads
        .iter()
        .filter(|w| w.enrolled && w.node.as_deref() == Some(node))
        .map(|w| {
            let security = snap.security(&w.key());
            PolicyView {
                workload: w.key(),
                mtls: mode(security.mtls.default),
                port_mtls: security.mtls.ports.iter().map(|(p, m)| (*p, mode(*m))).collect(),
                peer_authentications: security.mtls.from.clone(),
                authorization: security.authz.in_force(),
            }
        })
        .collect()
}

fn respond(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    if let Ok(v) = header::HeaderValue::from_str(content_type) {
        r.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    r
}

fn is_metrics(path: &str) -> bool {
    matches!(path, "/metrics" | "/stats/prometheus")
}

fn refused(refusal: &Refusal) -> Response<Full<Bytes>> {
    let status = match refusal {
        Refusal::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
        Refusal::Forbidden(_) => StatusCode::FORBIDDEN,
        Refusal::Busy => StatusCode::TOO_MANY_REQUESTS,
    };
    let mut r = respond(status, "text/plain", format!("{refusal}\n"));
    if status == StatusCode::UNAUTHORIZED {
        r.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
    }
    r
}

fn route(state: &AdminState, req: &Request<Incoming>, dump: bool) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    if dump && (path == "/config_dump" || path.starts_with("/dashboard")) && !dashboard::host_is_local(req.headers()) {
        return respond(StatusCode::FORBIDDEN, "text/plain", "the admin pages answer only to a loopback Host\n");
    }
    match path {
        "/dashboard" | "/dashboard/" if dump => {
            let mut r = respond(StatusCode::OK, "text/html; charset=utf-8", dashboard::PAGE);
            r.headers_mut().insert("content-security-policy", header::HeaderValue::from_static(dashboard::CSP));
            r
        }
        "/dashboard/data" if dump => {
            let snap = state.snapshot.load();
            let data = dashboard::DashboardData::of_agent(
                &state.node,
                state.ready.load(Ordering::Acquire),
                &snap,
                state.traffic.graph(),
                &state.denials,
            );
            match serde_json::to_string(&data) {
                Ok(j) => respond(StatusCode::OK, "application/json", j),
                Err(e) => respond(StatusCode::INTERNAL_SERVER_ERROR, "text/plain", e.to_string()),
            }
        }
        "/sync_status" => {
            let snap = state.snapshot.load();
            let pods = state.pods.lock().unwrap_or_else(|p| p.into_inner()).clone();
            let status = SyncStatus {
                node: &state.node,
                agent_version: env!("CARGO_PKG_VERSION"),
                ready: state.ready.load(Ordering::Acquire),
                version: snap.version,
                config_digest: snap.config_digest(),
                enrolled_pods: pods.iter().filter(|p| p.state == PodState::Enrolled).count(),
                failed_pods: pods
                    .iter()
                    .filter(|p| matches!(p.state, PodState::Failed(_) | PodState::Pending(_)))
                    .cloned()
                    .collect(),
                rejected_config: state.config_errors.lock().unwrap_or_else(|p| p.into_inner()).len(),
                last_apply: *state.last_apply.lock().unwrap_or_else(|p| p.into_inner()),
                config_source_unavailable: state.source_outage(),
                remote_clusters: state.remote_clusters.lock().unwrap_or_else(|p| p.into_inner()).clone(),
            };
            match serde_json::to_string(&status) {
                Ok(j) => respond(StatusCode::OK, "application/json", j),
                Err(e) => respond(StatusCode::INTERNAL_SERVER_ERROR, "text/plain", e.to_string()),
            }
        }
        "/healthz/ready" | "/ready" => {
            if state.ready.load(Ordering::Acquire) {
                // An outage of the config source is shown, not made an unreadiness:
                // a gateway taken out of its Service for an API server outage would
                // turn a control-plane outage into a data-plane one.
                let body = match state.source_outage() {
                    Some(outage) => {
                        format!("ready; config source unavailable: {outage}; serving the last config read\n")
                    }
                    None => "ready\n".to_string(),
                };
                respond(StatusCode::OK, "text/plain", body)
            } else {
                respond(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "not ready\n")
            }
        }
        p if is_metrics(p) => {
            let mut out = String::new();
            match prometheus_client::encoding::text::encode(&mut out, &state.registry) {
                Ok(()) => respond(StatusCode::OK, "application/openmetrics-text; version=1.0.0; charset=utf-8", out),
                Err(e) => respond(StatusCode::INTERNAL_SERVER_ERROR, "text/plain", e.to_string()),
            }
        }
        "/config_dump" if dump => {
            let snap = state.snapshot.load();
            let pods = state.pods.lock().unwrap_or_else(|p| p.into_inner()).clone();
            let dump = ConfigDump {
                node: &state.node,
                agent_version: env!("CARGO_PKG_VERSION"),
                version: snap.version,
                config_digest: snap.config_digest(),
                enrolled_pods: pods.iter().filter(|p| p.state == PodState::Enrolled).map(|p| p.pod.clone()).collect(),
                local_pods: pods,
                workloads: snap
                    .workloads
                    .iter()
                    .map(|w| WorkloadView {
                        name: w.name.clone(),
                        namespace: w.namespace.clone(),
                        node: w.node.clone(),
                        ips: w.ips.iter().map(ToString::to_string).collect(),
                        identity: w.identity.to_string(),
                        enrolled: w.enrolled,
                        cluster: w.meta.cluster.clone(),
                    })
                    .collect(),
                services: snap
                    .services()
                    .iter()
                    .map(|s| ServiceView {
                        name: s.name.clone(),
                        namespace: s.namespace.clone(),
                        vips: s.vips.iter().map(ToString::to_string).collect(),
                        ports: s.ports.iter().map(|p| p.port).collect(),
                        endpoints: s.endpoints.iter().map(crate::state::Endpoint::name).collect(),
                    })
                    .collect(),
                routes: route_views(&snap),
                endpoints: endpoint_views(&snap),
                secrets: state.certs.as_ref().map(|c| secret_views(c)).unwrap_or_default(),
                policies: policy_views(&snap, &state.node),
                rejected_config: state.config_errors.lock().unwrap_or_else(|p| p.into_inner()).clone(),
            };
            match serde_json::to_string_pretty(&dump) {
                Ok(j) => respond(StatusCode::OK, "application/json", j),
                Err(e) => respond(StatusCode::INTERNAL_SERVER_ERROR, "text/plain", e.to_string()),
            }
        }
        _ => respond(
            StatusCode::NOT_FOUND,
            "text/plain",
            "endpoints: /healthz/ready /metrics /sync_status (/config_dump and /dashboard on the admin address)\n",
        ),
    }
}

/// Samples the metrics into the service graph every
/// [`crate::telemetry::graph::SAMPLE_EVERY`] until `stop`: the dashboard's rates cover
/// the minute before it is opened. A tick with no connection open at it or at the one
/// before, and none opened in between (`traffic`), takes the last reading again.
pub async fn sample_traffic(
    state: AdminState,
    traffic: impl Fn() -> crate::code_pages::Traffic + Send + 'static,
    stop: CancellationToken,
) {
    let mut every = tokio::time::interval(crate::telemetry::graph::SAMPLE_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut before: Option<crate::code_pages::Traffic> = None;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = every.tick() => {}
        }
        let now = traffic();
        let quiet = before.is_some_and(|b| b.open == 0 && now.open == 0 && b.opened == now.opened);
        before = Some(now);
        if quiet && state.traffic.unchanged(std::time::Instant::now()) {
            continue;
        }
        let mut text = String::new();
        if prometheus_client::encoding::text::encode(&mut text, &state.registry).is_ok() {
            state.traffic.sample(std::time::Instant::now(), &text);
        }
    }
}

/// Serves the admin endpoints on `addr` until `stop`; `/config_dump` only if `dump`.
/// Anyone who can reach the port can open connections: they are capped
/// ([`limits::ADMIN_MAX_CONNECTIONS`], more are closed at once), and each is held by
/// the header read timeout and HTTP/2 limits of every agent server.
pub async fn serve(
    listener: std::net::TcpListener,
    state: AdminState,
    stop: CancellationToken,
    dump: bool,
) -> std::io::Result<()> {
    listener.set_nonblocking(true)?;
    let listener = TcpListener::from_std(listener)?;
    tracing::info!(addr = %listener.local_addr()?, "admin endpoint listening");
    let open = Arc::new(tokio::sync::Semaphore::new(limits::ADMIN_MAX_CONNECTIONS));
    loop {
        let (stream, _) = tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(_) => {
                    // Out of descriptors, say: back off instead of spinning.
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = open.clone().try_acquire_owned() else {
            state.refused.inc();
            drop(stream);
            continue;
        };
        let state = state.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let state = state.clone();
                async move {
                    let path = req.uri().path();
                    if !dump && is_metrics(path) {
                        let token = req.headers().get(header::AUTHORIZATION).map(|v| v.as_bytes());
                        if let Err(refusal) = state.scrape_auth.check(token, path).await {
                            tracing::debug!(%refusal, "metrics scrape refused");
                            return Ok::<_, std::convert::Infallible>(refused(&refusal));
                        }
                    }
                    Ok(route(&state, &req, dump))
                }
            });
            let _ = limits::http_server().serve_connection(TokioIo::new(stream), svc).await;
            drop(permit);
        });
    }
}
/// Where a pod that should be captured stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "state", content = "reason", rename_all = "snake_case")]
pub enum PodState {
    /// Captured.
    Enrolled,
    /// Should be captured and is not; kept from starting (CNI) or failing closed.
    Failed(String),
    /// Nothing of it runs on this node yet (no sandbox, no process).
    NotStarted(String),
    /// Waiting for its certificate from the CA service; kept closed until then.
    Pending(String),
}

/// One pod in the agent's report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PodReport {
    /// `namespace/name`.
    pub pod: String,
    /// `metadata.uid`.
    pub uid: String,
    /// Its state.
    #[serde(flatten)]
    pub state: PodState,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_config_source_outage_is_shown_counted_and_cleared() {
        let state = AdminState::new(
            Registry::default(),
            Arc::default(),
            "node1".into(),
            Default::default(),
            Arc::new(ScrapeAuth::Open),
        );
        let up = prometheus_client::metrics::gauge::Gauge::<i64>::default();
        state.note_source(None, &up);
        assert_eq!((up.get(), state.source_outage()), (1, None));
        state.note_source(Some("watching Pod: connection refused".into()), &up);
        state.note_source(Some("watching Pod: connection refused".into()), &up);
        assert_eq!(up.get(), 0);
        assert_eq!(state.source_outage().as_deref(), Some("watching Pod: connection refused (for 0s)"));
        state.note_source(None, &up);
        assert_eq!((up.get(), state.source_outage()), (1, None));
    }
}

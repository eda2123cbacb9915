//! Wiring: identity, kernel programs, config source, the CNI socket and per-pod
//! proxies, and the reconcile loop that keeps them in step. Shutdown drains
//! connections.

pub mod gateway;
mod gateway_status;
mod handoff;
mod pods;
mod remote_clusters;
mod trust;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use prometheus_client::registry::Registry;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use std::os::fd::OwnedFd;

use crate::admin::{self, AdminState};
use crate::cni::CniRequest;
use crate::code_pages;
use crate::config::{DirSource, KubeSource, Reload};
use crate::dataplane::{self, Dataplane, Netns, Paths};
use crate::identity::{CaClient, CertStore, PeerVerifier};
use crate::proxy::ProxyContext;
use crate::settings::Settings;
use crate::snapshot::Snapshot;
use crate::telemetry::Metrics;
use crate::transport::Dialer;
use crate::transport::inherited::{Inherited, SocketKey};
use pods::Pods;
use remote_clusters::RemoteClusters;

/// Pods whose netns or cgroup is not there yet are retried this often; also the
/// fallback re-read of the config directory should a file event be missed.
/// The metrics registry (Istio's under the `istio` prefix, the process's own under the
/// standard `process_*` names) and the agent's metrics, access log and tracer as the
/// settings ask.
pub(crate) fn observability(settings: &Settings, certs: &Arc<CertStore>) -> (Registry, Arc<Metrics>) {
    let mut registry = Registry::default();
    let metrics = Arc::new(Metrics::new(registry.sub_registry_with_prefix("istio")));
    registry.register_collector(Box::new(crate::telemetry::health::Health { certs: Some(certs.clone()) }));
    metrics.start_access_log(settings.access_log, tokio::io::stdout());
    if let Some(endpoint) = settings.trace_endpoint.clone() {
        metrics.start_tracing(endpoint, settings.trace_sampling, settings.node.clone(), settings.mesh_id());
    }
    (registry, metrics)
}

/// Resyncs between two counts of the BPF maps' entries (30 s).
const MAP_FILL_EVERY: u64 = 15;

pub(crate) const RESYNC_INTERVAL: Duration = Duration::from_secs(2);

/// How long after start readiness waits for the local pods' certificates: long
/// enough for a CA that is restarting too, short enough that one pod the CA refuses
/// does not stall a rolling update of every agent.
const CERTIFICATE_WAIT: Duration = Duration::from_secs(60);

/// Errors that stop the agent from starting.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Identity setup failed.
    #[error(transparent)]
    Identity(#[from] crate::identity::Error),
    /// Kernel programs could not be loaded or attached.
    #[error(transparent)]
    Dataplane(#[from] dataplane::Error),
    /// The config directory cannot be watched.
    #[error("watching {dir}: {source}")]
    Watch {
        /// The directory.
        dir: PathBuf,
        /// notify's error.
        source: notify::Error,
    },
    /// An admin endpoint could not be bound.
    #[error("admin endpoint: {0}")]
    Admin(std::io::Error),
    /// The Kubernetes client could not be configured.
    #[error("Kubernetes client: {0}")]
    Kube(String),
    /// A setting is missing or malformed.
    #[error("{0}")]
    Settings(String),
    /// The CNI socket could not be bound, or the plugin not installed.
    #[error(transparent)]
    Cni(#[from] crate::cni::Error),
    /// The running agent could not hand over, or its successors cannot reach this one.
    #[error(transparent)]
    Handoff(#[from] handoff::Error),
}

/// Where configuration comes from.
pub(crate) enum Source {
    Files(DirSource),
    Kube(KubeSource),
}

impl Source {
    pub(crate) fn reload(&mut self) -> Reload {
        match self {
            Source::Files(s) => s.reload(),
            Source::Kube(s) => s.reload(),
        }
    }

    pub(crate) fn standing_errors(&self) -> Vec<crate::config::Error> {
        match self {
            Source::Files(s) => s.standing_errors(),
            Source::Kube(s) => s.standing_errors(),
        }
    }
}

/// Runs the agent until SIGTERM/SIGINT, then drains.
pub async fn run(settings: Settings) -> Result<(), Error> {
    Netns::init_host()?;
    // Before anything is loaded or bound: an agent running on this node hands its
    // sockets over and stops changing the kernel tables (an upgrade or a restart).
    let handoff_path = settings.cni_socket.with_file_name(handoff::SOCKET_NAME);
    let inherited = Arc::new(Inherited::default());
    let predecessor = handoff::Predecessor::take_over(&handoff_path, &handoff::own_version(), &inherited)?;
    if let Some(p) = &predecessor {
        tracing::info!(predecessor = %p.version, sockets = inherited.len(), "took over the running agent's sockets");
    }
    // Every proxied connection takes two descriptors: take what the node allows, and cap
    // connections below it, so running out is a refusal the agent reports, not a crash.
    let nofile = crate::transport::limits::raise_nofile();
    let per_node = settings.max_connections.unwrap_or_else(|| crate::transport::limits::per_node_from_nofile(nofile));
    tracing::info!(nofile, per_node, per_source = settings.max_connections_per_source, "connection limits");
    let client = settings.source.kube_client().await.map_err(Error::Kube)?;
    let scrape_auth =
        Arc::new(crate::admin::ScrapeAuth::new(&settings.metrics_auth, client.as_ref()).map_err(Error::Settings)?);
    if matches!(*scrape_auth, crate::admin::ScrapeAuth::Open) && !settings.metrics_addr.ip().is_loopback() {
        tracing::warn!(addr = %settings.metrics_addr, "metrics are open to anyone who reaches the port (--metrics-auth)");
    }
    let (verifier, certs) = identity(&settings)?;

    let paths = resolve_paths(&settings)?;
    let dataplane = Arc::new(Dataplane::load(paths, settings.bypass_mark, &settings.exclude_ports)?);
    // Bound before anything waits, so a pod starting now waits for the agent instead of
    // finding no socket; its request is answered once the config is in.
    let cni_listener = crate::cni::bind(&settings.cni_socket)?;
    let successors = handoff::Listener::bind(&handoff_path)?;
    install_cni_plugin(&settings)?;

    let (mut registry, metrics) = observability(&settings, &certs);
    let admin_refused = prometheus_client::metrics::counter::Counter::default();
    registry.sub_registry_with_prefix("istio").register(
        "mesh_admin_connections_refused",
        "Admin, metrics and readiness connections closed at the cap",
        admin_refused.clone(),
    );
    let snapshot = Arc::new(ArcSwap::from_pointee(Snapshot::default()));
    let shutdown = CancellationToken::new();
    let mut admin_state =
        AdminState::new(registry, snapshot.clone(), settings.node.clone(), admin_refused, scrape_auth);
    admin_state.certs = Some(certs.clone());
    admin_state.denials = metrics.recent_denials();
    // Up before the config is: a waiting agent answers "not ready" and says why.
    let mut admin_servers = serve_admin(&settings, &admin_state, &metrics, &shutdown, &inherited)?;
    tokio::spawn(crate::heap::hand_back_after_bursts(shutdown.clone()));
    let one_off = code_pages::OneOffWork::start(settings.unmap_one_off_pages == crate::settings::Switch::On, &shutdown);
    let counted = metrics.clone();
    one_off.after_traffic(move || counted.traffic(), &shutdown);
    let (mut source, mut changes, _watcher) = open_source(&settings, client.as_ref(), &admin_state).await?;
    let (remotes, mut remote_changes) = RemoteClusters::start(
        ca_client(&settings, &verifier),
        settings.cluster_id.clone(),
        settings.remote_clusters_refresh,
        one_off.clone(),
        shutdown.clone(),
    );
    let ctx = ProxyContext {
        snapshot: snapshot.clone(),
        orig_dst: dataplane.clone(),
        dialer: Dialer::new(certs, verifier.clone(), settings.bypass_mark)
            .with_pool_idle_timeout(settings.pool_idle_timeout),
        l7: Arc::default(),
        metrics: metrics.clone(),
        shutdown: shutdown.clone(),
        tasks: TaskTracker::new(),
        inbound: Arc::default(),
        limits: Arc::new(crate::transport::limits::ConnLimits::new(settings.max_connections_per_source, per_node)),
        tcp_idle_timeout: settings.tcp_idle_timeout,
        egress_tls_dir: settings.egress_tls_dir.clone().into(),
        dns_upstream: Arc::new(dns_upstream(&settings)),
        l7_telemetry: settings.l7_telemetry == crate::settings::Switch::On,
        local_pods: Arc::default(),
        inherited,
        kernel_splice: dataplane.kernel_splice().filter(|_| settings.kernel_splice == crate::settings::Switch::On),
        direct: Some(dataplane.direct()),
        same_node_direct: settings.same_node_direct == crate::settings::Switch::On,
    };
    tokio::spawn(ctx.l7.upstreams.clone().reap_idle(shutdown.clone()));
    tokio::spawn(crate::proxy::direct::follow_reports(ctx.clone()));
    let (cni_tx, mut cni_rx) = mpsc::channel::<CniRequest>(64);
    tokio::spawn(crate::cni::serve(cni_listener, cni_tx, shutdown.clone()));
    let (issued_tx, mut issued_rx) = mpsc::channel::<()>(1);
    let renewal = Renewal { certs: ctx.dialer.certs.clone(), running: Arc::default(), issued: issued_tx };
    // The trust bundle first: the CA may already sign under a newer root than the file.
    if let Err(e) = ctx.dialer.certs.refresh_trust(&verifier).await {
        tracing::warn!(error = %e, "trust bundle not fetched yet; using {}", settings.ca_root_cert.display());
    }

    let mut agent = Agent {
        settings: settings.clone(),
        ctx: ctx.clone(),
        dataplane: dataplane.clone(),
        pods: Pods::new(settings.inbound_transparent == crate::settings::Switch::On),
        version: 0,
        admin: admin_state.clone(),
        hinted: None,
        renewal,
        started: None,
        predecessor,
        remotes,
        one_off,
        direct_unjudged: true,
    };
    agent.apply(&mut source);
    agent.finish_takeover();
    agent.started = Some(std::time::Instant::now());
    agent.publish_readiness();

    let mut successors = handoff::Successors::accept(successors);
    let mut handed_over = false;
    let mut resync = tokio::time::interval(RESYNC_INTERVAL);
    let mut ticks: u64 = 0;
    let mut renew = tokio::time::interval(ctx.dialer.certs.renewal_interval());
    let renewal = agent.renewal.clone();
    trust::follow(
        ctx.dialer.certs.clone(),
        verifier.clone(),
        settings.trust_refresh,
        agent.one_off.clone(),
        move || renewal.kick(),
        shutdown.clone(),
    );
    loop {
        tokio::select! {
            _ = shutdown_signal() => break,
            Some(successor) = successors.recv() => {
                if agent.hand_over(successor, &mut admin_servers).await == handoff::Outcome::Adopted {
                    handed_over = true;
                    break;
                }
            }
            Some(()) = changes.recv() => agent.apply(&mut source),
            Some(()) = remote_changes.recv() => agent.apply(&mut source),
            // Certificates arrived: pods waiting for theirs can start.
            Some(()) = issued_rx.recv() => {
                agent.reconcile();
                agent.one_off.done();
            }
            Some(r) = cni_rx.recv() => {
                agent.pods.cni(&dataplane, r.request, r.netns, r.reply);
                // The config may already show the pod: answer without waiting a tick.
                agent.apply(&mut source);
            }
            _ = resync.tick() => {
                agent.apply(&mut source);
                ctx.metrics.probes_seen(dataplane.probe_connections());
                ctx.metrics.kernel_events_seen(&dataplane.kernel_events());
                agent.count_direct();
                // Counting walks the maps' keys: seldom.
                ticks += 1;
                if ticks % MAP_FILL_EVERY == 1 {
                    ctx.metrics.map_fill(&dataplane.map_fill());
                }
                if dataplane.has_stale_links() {
                    agent.finish_takeover();
                }
            }
            _ = renew.tick() => agent.renewal.kick(),
        }
    }

    if handed_over {
        // The listeners are the successor's now and stay in the kernel's tables; this
        // agent's copies go, so its addresses are free should the successor fail and
        // another start afresh while this one drains.
        shutdown.cancel();
        agent.pods.close_listeners();
        drop(admin_servers);
        ctx.tasks.close();
        agent.serve_until_drained(&mut source, &mut changes).await;
        tracing::info!("agent stopped");
        return Ok(());
    }
    successors.close();
    tracing::info!(timeout = ?settings.drain_timeout, "draining");
    admin_state.ready.store(false, Ordering::Release);
    // In order: the kernel stops steering new connections to this agent, then
    // listeners stop and HTTP servers send GOAWAY, then what is in flight finishes.
    let released = dataplane.release_listeners();
    tracing::info!(pods = released, "inbound listeners out of the kernel's table");
    shutdown.cancel();
    // Closed, not left to queue: a pod's new connection is refused at once (fail
    // closed) rather than waiting in a backlog nobody accepts from during the drain.
    agent.pods.close_listeners();
    ctx.tasks.close();
    if tokio::time::timeout(settings.drain_timeout, ctx.tasks.wait()).await.is_err() {
        tracing::warn!(open = ctx.tasks.len(), "drain timeout reached; closing remaining connections");
    }
    // Pinned links and maps stay: enrolled pods fail closed until an agent is back.
    tracing::info!("agent stopped");
    Ok(())
}

/// The peer verifier on the roots the process starts with, and the store of the
/// certificates the CA service signs for it.
pub(crate) fn identity(settings: &Settings) -> Result<(PeerVerifier, Arc<CertStore>), Error> {
    let roots = read_roots(&settings.ca_root_cert)?;
    let verifier = PeerVerifier::new(&roots, settings.accepted_trust_domains())?;
    let ca_client = ca_client(settings, &verifier);
    Ok((verifier, Arc::new(CertStore::remote(ca_client, settings.cert_ttl))))
}

/// How the process reaches the CA service, trusting the mesh's roots.
fn ca_client(settings: &Settings, verifier: &PeerVerifier) -> CaClient {
    CaClient {
        address: settings.ca_address.clone(),
        server_name: settings.ca_server_name.clone(),
        token_file: settings.ca_token_file.clone(),
        root_file: Some(settings.ca_root_cert.clone()),
        verifier: verifier.clone(),
    }
}

/// Starts the admin, metrics and readiness endpoints (one server per distinct
/// address; the config dump only on the admin address) on the listeners a predecessor
/// handed over, else on new ones.
pub(crate) fn serve_admin(
    settings: &Settings,
    state: &AdminState,
    metrics: &Arc<Metrics>,
    shutdown: &CancellationToken,
    inherited: &Inherited,
) -> Result<AdminServers, Error> {
    let counted = metrics.clone();
    tokio::spawn(admin::sample_traffic(state.clone(), move || counted.traffic(), shutdown.clone()));
    let host = Netns::host_inode().unwrap_or(0);
    let mut listeners = Vec::new();
    for addr in dedup([settings.admin_addr, settings.metrics_addr, settings.readiness_addr]) {
        let listener = match inherited.tcp_listener(host, addr) {
            Some(l) => l,
            // Bound now so a port conflict stops start-up with a clear error.
            None => std::net::TcpListener::bind(addr).map_err(Error::Admin)?,
        };
        listeners.push((listener, addr == settings.admin_addr));
    }
    let mut servers = AdminServers { listeners, state: state.clone(), stop: shutdown.child_token() };
    servers.start(shutdown);
    Ok(servers)
}

/// The admin servers' listeners, kept to hand to a successor and to serve again should
/// it leave before it took over.
pub(crate) struct AdminServers {
    /// Each listener, and whether it serves the config dump.
    listeners: Vec<(std::net::TcpListener, bool)>,
    state: AdminState,
    stop: CancellationToken,
}

impl AdminServers {
    /// Serves every listener until `shutdown` or [`AdminServers::stop`].
    fn start(&mut self, shutdown: &CancellationToken) {
        self.stop = shutdown.child_token();
        for (listener, dump) in &self.listeners {
            let served = match listener.try_clone() {
                Ok(l) => l,
                Err(e) => {
                    tracing::error!(error = %e, "admin listener not served");
                    continue;
                }
            };
            let (state, stop, dump) = (self.state.clone(), self.stop.clone(), *dump);
            tokio::spawn(async move {
                if let Err(e) = admin::serve(served, state, stop, dump).await {
                    tracing::error!(error = %e, "admin endpoint failed");
                }
            });
        }
    }

    /// Stops serving; the listeners stay open.
    fn stop(&self) {
        self.stop.cancel();
    }

    /// A copy of each listener, named for a successor.
    fn sockets(&self) -> Vec<(SocketKey, OwnedFd)> {
        let host = Netns::host_inode().unwrap_or(0);
        self.listeners.iter().filter_map(|(l, _)| SocketKey::copy_of(l, host).ok()).collect()
    }
}

/// The config source the settings name, once it holds a whole config: in a cluster,
/// every kind listed (a partial config would unenroll pods the API has not listed
/// yet); with files, the directory watched. The watcher lives as long as the caller
/// keeps it.
pub(crate) async fn open_source(
    settings: &Settings,
    client: Option<&kube::Client>,
    admin: &AdminState,
) -> Result<(Source, mpsc::Receiver<()>, Option<notify::RecommendedWatcher>), Error> {
    match (client, &settings.source.config_dir) {
        (Some(client), _) => {
            let (source, changes) = KubeSource::start(client.clone());
            let mut waited = 0u32;
            while !source.synced() {
                if waited.is_multiple_of(50) {
                    tracing::info!("waiting for the API server to list every kind the mesh reads");
                    *admin.config_errors.lock().unwrap_or_else(|p| p.into_inner()) =
                        source.standing_errors().iter().map(ToString::to_string).collect();
                }
                waited += 1;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Ok((Source::Kube(source), changes, None))
        }
        (None, Some(dir)) => {
            let source = DirSource::new(dir);
            let (watcher, changes) = source.watch().map_err(|source| Error::Watch { dir: dir.clone(), source })?;
            Ok((Source::Files(source), changes, Some(watcher)))
        }
        (None, None) => Err(Error::Settings("--config-dir is required with --config-source files".into())),
    }
}

/// The PEM roots in `path`.
fn read_roots(path: &std::path::Path) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, Error> {
    let io = |source| crate::identity::Error::CaFile { path: path.to_owned(), source };
    let pem = std::fs::read(path).map_err(io)?;
    let roots = rustls_pemfile::certs(&mut pem.as_slice()).collect::<Result<Vec<_>, _>>().map_err(io)?;
    if roots.is_empty() {
        return Err(
            crate::identity::Error::CaInvalid { path: path.to_owned(), reason: "no PEM certificate".into() }.into()
        );
    }
    Ok(roots)
}

/// Runs certificate renewals in the background, one at a time, and tells the agent
/// loop when something was issued (pods waiting for a certificate can then start).
#[derive(Clone)]
struct Renewal {
    certs: Arc<CertStore>,
    running: Arc<AtomicBool>,
    issued: mpsc::Sender<()>,
}

impl Renewal {
    /// Starts a renewal unless one runs.
    fn kick(&self) {
        if self.running.swap(true, Ordering::AcqRel) {
            return;
        }
        let me = self.clone();
        tokio::spawn(async move {
            let issued = me.certs.renew_due().await;
            me.running.store(false, Ordering::Release);
            if issued > 0 {
                let _ = me.issued.try_send(());
            }
        });
    }
}

/// Where the DNS proxies forward: `--dns-upstream`, else the agent's own resolv.conf.
fn dns_upstream(settings: &Settings) -> crate::proxy::dns::Upstream {
    let servers = if settings.dns_upstream.is_empty() {
        let conf = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
        crate::proxy::dns::Upstream::from_resolv_conf(&conf)
    } else {
        settings.dns_upstream.clone()
    };
    if servers.is_empty() {
        tracing::warn!(
            "no DNS upstream (--dns-upstream, /etc/resolv.conf): captured pods' unknown names go unanswered"
        );
    } else {
        tracing::info!(?servers, capture = ?settings.dns_capture, "DNS proxy upstream");
    }
    crate::proxy::dns::Upstream::new(servers)
}

/// Chains `mesh-cni` into the node's CNI configuration when the agent is told where
/// it is (the DaemonSet does; the lab runs the plugin itself).
fn install_cni_plugin(settings: &Settings) -> Result<(), Error> {
    let (Some(conf_dir), Some(bin_dir)) = (&settings.cni_conf_dir, &settings.cni_bin_dir) else { return Ok(()) };
    let plugin = match &settings.cni_plugin {
        Some(p) => p.clone(),
        None => std::env::current_exe()
            .map_err(|source| crate::cni::Error::Io { path: "/proc/self/exe".into(), source })?
            .with_file_name(crate::cni::PLUGIN_TYPE),
    };
    let entry = serde_json::json!({
        "socket": settings.cni_socket,
        "excludeNamespaces": settings.cni_exclude_namespaces,
    });
    let written = crate::cni::install(&plugin, bin_dir, conf_dir, &entry)?;
    tracing::info!(conf = %written.display(), "mesh-cni chained into the node's CNI configuration");
    Ok(())
}

fn dedup<const N: usize>(addrs: [std::net::SocketAddr; N]) -> Vec<std::net::SocketAddr> {
    let mut out = Vec::new();
    for a in addrs {
        if !out.contains(&a) {
            out.push(a);
        }
    }
    out
}

fn resolve_paths(s: &Settings) -> Result<Paths, Error> {
    let cg_root = dataplane::cgroup2_root()?;
    let node_cgroup =
        s.node_cgroup.clone().ok_or_else(|| Error::Settings("--node-cgroup is required for the node agent".into()))?;
    let node_cgroup = if node_cgroup.is_absolute() { node_cgroup } else { cg_root.join(node_cgroup) };
    let pin_dir = s.bpf_pin_dir.clone().unwrap_or_else(|| PathBuf::from("/sys/fs/bpf/mesh").join(&s.node));
    let kubelet_cgroup = match &s.kubelet_cgroup {
        Some(p) if p.is_absolute() => Some(p.clone()),
        Some(p) => Some(cg_root.join(p)),
        None => Some(cg_root.join(dataplane::KUBELET_UNIT_CGROUP)).filter(|p| p.is_dir()),
    };
    Ok(Paths { node_cgroup, proc_dir: s.proc_dir.clone(), pin_dir, kubelet_cgroup })
}

pub(crate) async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
}

struct Agent {
    settings: Settings,
    ctx: ProxyContext,
    /// The kernel programs and tables: enrollment, verdicts, takeover.
    dataplane: Arc<Dataplane>,
    pods: Pods,
    version: u64,
    admin: AdminState,
    /// The enrolled namespaces last written for the CNI plugin.
    hinted: Option<BTreeSet<String>>,
    renewal: Renewal,
    /// When the first config was applied and the previous run's leftovers cleaned up.
    started: Option<std::time::Instant>,
    /// The agent that handed its sockets over, told once this one is ready.
    predecessor: Option<handoff::Predecessor>,
    /// The mesh's other clusters this agent follows.
    remotes: RemoteClusters,
    /// Told when a compile or starting up is done: its code's pages can go.
    one_off: code_pages::OneOffWork,
    /// The direct path is to be judged again under the config in force: at start (a
    /// predecessor's pairs and connections) and after every change, until every open
    /// direct connection could be judged.
    direct_unjudged: bool,
}

impl Agent {
    /// Re-judges the direct path's pairs and open connections, if they wait for it.
    fn judge_direct(&mut self) {
        if !self.direct_unjudged {
            return;
        }
        let snap = self.ctx.snapshot.load();
        let done = crate::proxy::direct::reassess(&self.ctx, &snap);
        if done.forgotten > 0 || done.closed > 0 || done.unresolved > 0 {
            tracing::info!(
                version = self.version,
                forgotten = done.forgotten,
                closed = done.closed,
                unresolved = done.unresolved,
                "direct path re-judged"
            );
        }
        // A pair taken out now may have let one last connect() through whose flow was
        // recorded after the walk (its SYN was in flight): judged on the next tick.
        self.direct_unjudged = done.unresolved > 0 || done.forgotten > 0;
    }

    /// Counts what the kernel reported of direct connections since the last call.
    fn count_direct(&self) {
        let Some(path) = self.ctx.direct.as_ref() else { return };
        let snap = self.ctx.snapshot.load();
        path.drain(|report| crate::proxy::direct::count(&self.ctx, &snap, report));
        self.ctx.metrics.direct_events_seen(&path.stats());
    }

    /// Re-reads config and brings the pods in line; a change is stamped for
    /// `/sync_status` with how long it took (what a scale test times).
    fn apply(&mut self, source: &mut Source) {
        let started = std::time::Instant::now();
        let before = self.version;
        let read_ms = self.reload(source);
        self.reconcile();
        self.direct_unjudged |= self.version != before;
        self.judge_direct();
        if self.version != before {
            let at_unix_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64() * 1000.0);
            let applied = crate::admin::LastApply {
                version: self.version,
                took_ms: started.elapsed().as_secs_f64() * 1000.0,
                read_ms,
                at_unix_ms,
            };
            *self.admin.last_apply.lock().unwrap_or_else(|p| p.into_inner()) = Some(applied);
            self.one_off.done();
        }
    }

    /// Re-reads config; a change compiles and swaps in a new snapshot. Returns how
    /// long reading took, ms.
    fn reload(&mut self, source: &mut Source) -> f64 {
        let started = std::time::Instant::now();
        let r = source.reload();
        let read_ms = started.elapsed().as_secs_f64() * 1000.0;
        self.admin.note_source(r.unavailable.clone(), &self.ctx.metrics.config_source_up);
        for e in &r.new_errors {
            // One line per rejected input, naming file, object and field.
            tracing::error!(error = %e, "config rejected; the last good version stays in force");
            self.ctx.metrics.config_rejected.inc();
        }
        *self.admin.config_errors.lock().unwrap_or_else(|p| p.into_inner()) =
            source.standing_errors().iter().map(ToString::to_string).collect();
        let remote = self.remotes.reload();
        *self.admin.remote_clusters.lock().unwrap_or_else(|p| p.into_inner()) = self.remotes.status();
        if r.changed || remote.changed || self.version == 0 {
            self.version += 1;
            let snap = self.ctx.snapshot.load().compile_next(
                &r.objects,
                &remote.objects,
                &self.settings.mesh_scope(),
                self.version,
            );
            tracing::info!(version = self.version, workloads = snap.workloads.len(), "config applied");
            for problem in &snap.problems {
                tracing::warn!(version = self.version, "{problem}");
            }
            let snap = Arc::new(snap);
            self.ctx.l7.round_robin.fit(&snap);
            retire(self.ctx.snapshot.swap(snap.clone()));
            // In force first; the digest `/sync_status` shows is worked out beside it.
            let digested = snap.clone();
            tokio::task::spawn_blocking(move || {
                digested.config_digest();
            });
            self.ctx.metrics.config_applied.inc();
            let expired = self.ctx.metrics.forget_gone(&snap);
            if expired > 0 {
                tracing::debug!(version = self.version, expired, "metric series of departed workloads dropped");
            }
            let closed = self.ctx.inbound.reassess(&snap);
            if closed > 0 {
                tracing::info!(version = self.version, closed, "connections closed under the new policies");
            }
        }
        read_ms
    }

    /// Answers ready once the agent has started and no local pod waits for its
    /// certificate: every pod it should capture is served (or reported failed). A
    /// restarted agent that answered ready before its pods' certificates came back
    /// refused the connections that arrived in between.
    fn publish_readiness(&mut self) {
        let Some(started) = self.started else { return };
        if self.admin.ready.load(Ordering::Acquire) {
            return;
        }
        if self.pods.waiting_for_certificates() {
            // A pod the CA never signs for must not hold the node's agent unready for
            // good (a rolling update would stall on it): past the wait it is served
            // closed, as reported, and the agent's other pods count.
            if started.elapsed() < CERTIFICATE_WAIT {
                return;
            }
            tracing::warn!(
                pods = ?self.pods.pending(), waited = ?CERTIFICATE_WAIT,
                "ready while these pods still wait for a certificate: their connections are refused until the CA signs"
            );
        }
        self.admin.ready.store(true, Ordering::Release);
        tracing::info!(node = %self.settings.node, pods = self.pods.enrolled_count(), "agent ready");
        // Serving from here: what only starting up ran need not stay mapped.
        self.one_off.done();
        if let Some(predecessor) = self.predecessor.take() {
            let unused = self.ctx.inherited.close_rest();
            tracing::info!(predecessor = %predecessor.version, unused, "serving; the previous agent stops accepting");
            tokio::task::spawn_blocking(move || {
                if let Err(e) = predecessor.adopted() {
                    tracing::warn!(error = %e, "telling the previous agent it was taken over");
                }
            });
        }
    }

    /// Brings the served pods in line with the snapshot, answers the CNI plugin, and
    /// publishes where every local pod stands.
    fn reconcile(&mut self) {
        let snap = self.ctx.snapshot.load_full();
        self.pods.reconcile(&self.ctx, &self.dataplane, &snap, &self.settings.node);
        if self.pods.waiting_for_certificates() {
            self.renewal.kick();
        }
        self.pods.answer_waiters(&snap, &self.settings.node);
        self.publish_readiness();
        self.ctx.metrics.enrolled_pods.set(self.pods.enrolled_count() as i64);
        *self.admin.pods.lock().unwrap_or_else(|p| p.into_inner()) = self.pods.report();
        let enrolled_namespaces = snap.enrolled_namespaces();
        if self.hinted.as_ref() != Some(&enrolled_namespaces) {
            match crate::cni::write_enrolled_namespaces(
                &self.settings.cni_socket,
                enrolled_namespaces.iter().map(String::as_str),
            ) {
                Ok(()) => self.hinted = Some(enrolled_namespaces),
                Err(e) => tracing::warn!(error = %e, "writing the enrolled namespaces for the CNI plugin"),
            }
        }
    }

    /// Hands this agent's sockets to `successor` and waits until it serves (this agent
    /// then stops accepting and drains) or leaves (this agent serves on, in control).
    /// Meanwhile nothing changes the kernel tables or the pods: the successor is
    /// starting on them.
    async fn hand_over(&mut self, successor: handoff::Successor, admin: &mut AdminServers) -> handoff::Outcome {
        tracing::info!(successor = %successor.version, "a new agent asks for this one's sockets; handing over");
        // Not ready from here: a 200 on the shared readiness port is the successor's.
        self.admin.ready.store(false, Ordering::Release);
        admin.stop();
        let mut sockets = self.pods.sockets();
        sockets.extend(admin.sockets());
        let count = sockets.len();
        let outcome = tokio::task::spawn_blocking(move || successor.hand_over(&handoff::own_version(), &sockets))
            .await
            .unwrap_or_else(|e| Err(handoff::Error::Protocol(format!("handoff task: {e}"))));
        match outcome {
            Ok(handoff::Outcome::Adopted) => {
                tracing::info!(sockets = count, "taken over; serving open connections until they end");
                handoff::Outcome::Adopted
            }
            Ok(handoff::Outcome::Abandoned) | Err(_) => {
                if let Err(e) = outcome {
                    tracing::error!(error = %e, "handing over failed");
                }
                tracing::warn!("the new agent left before it served; this one keeps control");
                admin.start(&self.ctx.shutdown);
                self.publish_readiness();
                self.reconcile();
                handoff::Outcome::Abandoned
            }
        }
    }

    /// After a handoff: serves the connections this agent has until they end, still
    /// judging them against config changes; after a SIGTERM, for `--drain-timeout` at
    /// most. Touches no kernel table and no pod: they are the successor's.
    async fn serve_until_drained(&mut self, source: &mut Source, changes: &mut mpsc::Receiver<()>) {
        let mut deadline: Option<tokio::time::Instant> = None;
        loop {
            let until_deadline = async {
                match deadline {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = self.ctx.tasks.wait() => {
                    tracing::info!("every connection ended");
                    return;
                }
                _ = shutdown_signal(), if deadline.is_none() => {
                    tracing::info!(timeout = ?self.settings.drain_timeout, open = self.ctx.tasks.len(), "draining");
                    deadline = Some(tokio::time::Instant::now() + self.settings.drain_timeout);
                }
                () = until_deadline => {
                    tracing::warn!(open = self.ctx.tasks.len(), "drain timeout reached; closing remaining connections");
                    return;
                }
                Some(()) = changes.recv() => {
                    self.reload(source);
                }
            }
        }
    }

    /// Removes what the previous run left for pods that are not wanted here any more.
    fn finish_takeover(&self) {
        let snap = self.ctx.snapshot.load_full();
        let wanted = Pods::wanted_uids(&snap, &self.settings.node);
        if let Err(e) = self.dataplane.finish_takeover(&wanted, &self.pods.enrollments()) {
            tracing::error!(error = %e, "cleaning up after the previous run");
        }
    }
}

/// Lets go of a replaced snapshot on a blocking thread, off the apply path: with
/// 10,000 Services freeing one took over a quarter as long as compiling its successor.
/// Connections still holding it keep it alive as before; whoever lets go last frees it.
fn retire(old: Arc<Snapshot>) {
    match tokio::runtime::Handle::try_current() {
        Ok(runtime) => drop(runtime.spawn_blocking(move || drop(old))),
        Err(_) => drop(old),
    }
}

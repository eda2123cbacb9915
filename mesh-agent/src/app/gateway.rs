//! Gateway mode: the same binary as the node agent, in a gateway pod. No kernel
//! programs and no other pod's traffic: it reads the configuration, holds its own
//! identity (signed by the CA for its own service account only), and serves the
//! Gateways that select its pod ([`crate::gateway`]).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use futures::StreamExt as _;
use kube::Api;
use kube::runtime::WatchStreamExt as _;
use kube::runtime::watcher::{self, Event};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{Error, RESYNC_INTERVAL, Source, identity, open_source, serve_admin, shutdown_signal};
use crate::admin::AdminState;
use crate::config::Object;
use crate::config::resources::{ObjectMeta, Secret};
use crate::dataplane::Netns;
use crate::gateway::tls::Secrets;
use crate::gateway::{Gateway, GatewayContext};
use crate::identity::CertStore;
use crate::settings::Settings;
use crate::snapshot::Snapshot;
use crate::telemetry::Metrics;
use crate::transport::Dialer;

/// Runs a gateway until SIGTERM/SIGINT, then drains.
pub async fn run(settings: Settings) -> Result<(), Error> {
    let pod = settings.pod.clone().ok_or_else(|| Error::Settings("--pod is required in gateway mode".into()))?;
    let Some((namespace, _)) = pod.split_once('/') else {
        return Err(Error::Settings(format!("--pod {pod:?}: expected namespace/name")));
    };
    let namespace = namespace.to_string();
    let nofile = crate::transport::limits::raise_nofile();
    let per_node = settings.max_connections.unwrap_or_else(|| crate::transport::limits::per_node_from_nofile(nofile));
    let client = settings.source.kube_client().await.map_err(Error::Kube)?;
    let scrape_auth =
        Arc::new(crate::admin::ScrapeAuth::new(&settings.metrics_auth, client.as_ref()).map_err(Error::Settings)?);
    let (verifier, certs) = identity(&settings)?;

    let (registry, metrics) = super::observability(&settings, &certs);
    let snapshot = Arc::new(ArcSwap::from_pointee(Snapshot::default()));
    let shutdown = CancellationToken::new();
    let mut admin_state =
        AdminState::new(registry, snapshot.clone(), settings.node.clone(), Default::default(), scrape_auth);
    admin_state.denials = metrics.recent_denials();
    let _admin = serve_admin(&settings, &admin_state, &metrics, &shutdown, &Default::default())?;
    tokio::spawn(crate::heap::hand_back_after_bursts(shutdown.clone()));
    let one_off =
        crate::code_pages::OneOffWork::start(settings.unmap_one_off_pages == crate::settings::Switch::On, &shutdown);
    let counted = metrics.clone();
    one_off.after_traffic(move || counted.traffic(), &shutdown);
    let (mut source, mut changes, _watcher) = open_source(&settings, client.as_ref(), &admin_state).await?;
    // In a cluster, credentialName Secrets come from the gateway's own namespace (its
    // Role reads Secrets there and nowhere else).
    let (secret_tx, mut secret_changes) = tokio::sync::mpsc::channel(1);
    let secret_watch = client.as_ref().map(|c| SecretWatch::start(c.clone(), &namespace, secret_tx));
    // In a cluster, the Gateway API status of what this namespace's gateways serve.
    let (status_tx, status_rx) = tokio::sync::watch::channel(Arc::default());
    if let Some(c) = &client {
        super::gateway_status::spawn(c.clone(), namespace.clone(), status_rx, RESYNC_INTERVAL);
    }
    let tasks = TaskTracker::new();
    // The same Secrets the servers read, for the TLS the gateway originates.
    let origination_secrets: Arc<ArcSwap<Secrets>> = Arc::default();
    let l7 = crate::l7::Context {
        snapshot: snapshot.clone(),
        // Not a captured pod: its own sockets need no bypass mark.
        dialer: Dialer::new(certs.clone(), verifier.clone(), 0),
        runtime: Arc::default(),
        metrics: metrics.clone(),
        shutdown: shutdown.clone(),
        egress_tls_dir: settings.egress_tls_dir.clone().into(),
        secrets: Some(origination_secrets.clone()),
    };
    tokio::spawn(l7.runtime.upstreams.clone().reap_idle(shutdown.clone()));
    let ctx = GatewayContext {
        l7,
        netns: Arc::new(Netns::host()?),
        limits: Arc::new(crate::transport::limits::ConnLimits::new(settings.max_connections_per_source, per_node)),
        tasks: tasks.clone(),
        tcp_idle_timeout: settings.tcp_idle_timeout,
    };
    if let Err(e) = certs.refresh_trust(&verifier).await {
        tracing::warn!(error = %e, "trust bundle not fetched yet; using {}", settings.ca_root_cert.display());
    }
    let mut edge = Edge {
        settings: settings.clone(),
        namespace,
        gateway: Gateway::new(ctx, pod.clone(), settings.gateway_bind),
        certs,
        version: 0,
        admin: admin_state.clone(),
        metrics,
        secret_watch,
        secrets_seen: 0,
        origination_secrets,
        status: status_tx,
        one_off,
    };
    edge.reload(&mut source).await;
    tracing::info!(%pod, ports = ?edge.gateway.ports(), "gateway ready");

    let mut resync = tokio::time::interval(RESYNC_INTERVAL);
    let mut renew = tokio::time::interval(edge.certs.renewal_interval());
    // A new signer makes the certificate due; the next renewal tick re-issues it.
    super::trust::follow(
        edge.certs.clone(),
        verifier.clone(),
        settings.trust_refresh,
        edge.one_off.clone(),
        || {},
        shutdown.clone(),
    );
    loop {
        tokio::select! {
            _ = shutdown_signal() => break,
            Some(()) = changes.recv() => edge.reload(&mut source).await,
            Some(()) = secret_changes.recv() => edge.reload(&mut source).await,
            _ = resync.tick() => edge.reload(&mut source).await,
            _ = renew.tick() => {
                edge.certs.renew_due().await;
                edge.publish_readiness();
            }
        }
    }
    tracing::info!(timeout = ?settings.drain_timeout, "draining");
    admin_state.ready.store(false, Ordering::Release);
    shutdown.cancel();
    tasks.close();
    if tokio::time::timeout(settings.drain_timeout, tasks.wait()).await.is_err() {
        tracing::warn!(open = tasks.len(), "drain timeout reached; closing remaining connections");
    }
    tracing::info!("gateway stopped");
    Ok(())
}

/// The gateway's state between configuration changes.
struct Edge {
    settings: Settings,
    /// The gateway pod's namespace: where its Secrets are read.
    namespace: String,
    gateway: Gateway,
    certs: Arc<CertStore>,
    version: u64,
    admin: AdminState,
    metrics: Arc<Metrics>,
    /// Secrets from the API server (cluster mode); files carry them in the lab.
    secret_watch: Option<SecretWatch>,
    /// The watch's version last applied.
    secrets_seen: u64,
    /// The Secrets the gateway's originated TLS reads (`credentialName`).
    origination_secrets: Arc<ArcSwap<Secrets>>,
    /// The Gateway API status of each snapshot, for the status writer (cluster mode).
    status: tokio::sync::watch::Sender<Arc<Vec<crate::config::gateway_api::translate::ObjectStatus>>>,
    /// Told when a compile is done: its code's pages can go.
    one_off: crate::code_pages::OneOffWork,
}

impl Edge {
    /// Re-reads config; a change compiles a snapshot, asks for the gateway's own
    /// certificate, and brings the listeners in line.
    async fn reload(&mut self, source: &mut Source) {
        let r = source.reload();
        self.admin.note_source(r.unavailable.clone(), &self.metrics.config_source_up);
        for e in &r.new_errors {
            tracing::error!(error = %e, "config rejected; the last good version stays in force");
            self.metrics.config_rejected.inc();
        }
        *self.admin.config_errors.lock().unwrap_or_else(|p| p.into_inner()) =
            source.standing_errors().iter().map(ToString::to_string).collect();
        let mut objects = r.objects;
        let secrets_version = self.secret_watch.as_ref().map_or(0, |w| w.version());
        if let Some(w) = &self.secret_watch {
            objects.extend(w.objects());
        }
        if !r.changed && self.version > 0 && secrets_version == self.secrets_seen {
            return;
        }
        self.secrets_seen = secrets_version;
        self.version += 1;
        let snap =
            Arc::new(self.admin.snapshot.load().compile_next(&objects, &[], &self.settings.mesh_scope(), self.version));
        self.admin.snapshot.store(snap.clone());
        self.status.send_replace(snap.gateway_api_status.clone());
        self.metrics.config_applied.inc();
        let own = snap.workloads.iter().find(|w| w.key() == self.gateway.pod()).map(|w| w.identity.clone());
        self.certs.set_local(own);
        self.certs.renew_due().await;
        let secrets = Secrets::of_namespace(&objects, &self.namespace);
        for problem in self.gateway.apply(&snap, &secrets).await {
            tracing::warn!(version = self.version, "{problem}");
        }
        self.origination_secrets.store(Arc::new(secrets));
        tracing::info!(version = self.version, ports = ?self.gateway.ports(), "gateway config applied");
        self.one_off.done();
        self.publish_readiness();
    }

    /// Ready once the gateway has its certificate: it can serve whatever Gateway
    /// selects it (none yet is a gateway at rest, as in Istio).
    fn publish_readiness(&self) {
        let snap = self.admin.snapshot.load();
        let own = snap.workloads.iter().find(|w| w.key() == self.gateway.pod());
        let ready = own.is_some_and(|w| self.certs.has(&w.identity));
        self.admin.ready.store(ready, Ordering::Release);
    }
}

/// The Secrets of one namespace, followed in the API server.
#[derive(Clone)]
struct SecretWatch {
    secrets: Arc<Mutex<BTreeMap<String, Object>>>,
    version: Arc<AtomicU64>,
}

impl SecretWatch {
    fn start(client: kube::Client, namespace: &str, changes: tokio::sync::mpsc::Sender<()>) -> Self {
        let me = Self { secrets: Arc::default(), version: Arc::default() };
        let api: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(client, namespace);
        let watch = me.clone();
        tokio::spawn(async move {
            let mut events = std::pin::pin!(watcher::watcher(api, watcher::Config::default()).default_backoff());
            let mut relisting: Option<BTreeMap<String, Object>> = None;
            while let Some(event) = events.next().await {
                {
                    let mut secrets = watch.secrets.lock().unwrap_or_else(|p| p.into_inner());
                    match event {
                        Ok(Event::Init) => relisting = Some(BTreeMap::new()),
                        Ok(Event::InitApply(s)) => {
                            if let (Some(list), Some((name, o))) = (relisting.as_mut(), converted(s)) {
                                list.insert(name, o);
                            }
                            continue;
                        }
                        Ok(Event::InitDone) => *secrets = relisting.take().unwrap_or_default(),
                        Ok(Event::Apply(s)) => {
                            if let Some((name, o)) = converted(s) {
                                secrets.insert(name, o);
                            }
                        }
                        Ok(Event::Delete(s)) => {
                            secrets.remove(&s.metadata.name.unwrap_or_default());
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "watching the gateway's Secrets; the last ones stay in use");
                            continue;
                        }
                    }
                }
                watch.version.fetch_add(1, Ordering::AcqRel);
                let _ = changes.try_send(());
            }
        });
        me
    }

    fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    fn objects(&self) -> Vec<Object> {
        self.secrets.lock().unwrap_or_else(|p| p.into_inner()).values().cloned().collect()
    }
}

/// An API Secret as a config object (values base64 again, as `data` is written).
fn converted(s: k8s_openapi::api::core::v1::Secret) -> Option<(String, Object)> {
    use base64::Engine as _;
    let name = s.metadata.name?;
    let metadata = ObjectMeta { name: name.clone(), namespace: s.metadata.namespace, ..Default::default() };
    let data = s
        .data
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k, base64::engine::general_purpose::STANDARD.encode(v.0)))
        .collect();
    let secret = Secret { metadata, secret_type: s.type_, data, string_data: Default::default() };
    Some((name, Object::Secret(std::sync::Arc::new(secret))))
}

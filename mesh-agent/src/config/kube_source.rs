//! Cluster config source: kube-rs watchers (list, then watch from the list's
//! resourceVersion, re-listing after `410 Gone`) for every kind the mesh reads, fed
//! through the same parser and validation as the file source.
//!
//! Invariants, as for files: an object is accepted or rejected whole; a rejected edit
//! keeps the object's last good version in force; a rejected AuthorizationPolicy that
//! never applied fails closed. The source publishes nothing until every kind has been
//! listed once (a restarted agent never applies a partial config), a re-list replaces
//! a kind's objects in one step at its end (no flapping), and while the API server is
//! unreachable the last state keeps serving and the watchers back off.
//!
//! Pods are watched cluster-wide: a client's agent needs the service account of every
//! endpoint it may dial to verify the server's identity, and EndpointSlices do not
//! carry it. Only pods whose `spec.nodeName` is this node are enrolled here.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use futures::StreamExt as _;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::WatchStreamExt as _;
use kube::runtime::watcher::{self, Event};
use tokio::sync::mpsc;

use super::parse::{fail_closed_standins, parse_documents};
use super::source::Reload;
use super::{Error, Object};

/// A kind the mesh watches.
#[derive(Debug, Clone, Copy)]
pub struct WatchedKind {
    /// API group (`""` for the core group).
    pub group: &'static str,
    /// Version read when the API server serves it.
    pub version: &'static str,
    /// Older versions read instead when `version` is not served (Istio before 1.22
    /// serves its security kinds as v1beta1 only). The API server converts between
    /// served versions, so one of them is read, never several.
    pub fallback_versions: &'static [&'static str],
    /// Kind.
    pub kind: &'static str,
    /// Resource (plural).
    pub plural: &'static str,
    /// Security policy: when no version of it is served the agent cannot know the
    /// policies, which is an error it reports (and it publishes nothing), never "no
    /// policies". Other kinds that are not served simply have no objects.
    pub required: bool,
}

impl WatchedKind {
    /// `group/version`, or `version` for the core group.
    pub fn api_version(&self) -> String {
        self.api_version_at(self.version)
    }

    fn api_version_at(&self, version: &str) -> String {
        if self.group.is_empty() { version.to_string() } else { format!("{}/{version}", self.group) }
    }

    /// Every version read, preferred first.
    pub fn versions(&self) -> impl Iterator<Item = &'static str> + '_ {
        std::iter::once(self.version).chain(self.fallback_versions.iter().copied())
    }

    /// Its objects in every namespace, at the preferred version.
    pub fn api(&self, client: kube::Client) -> Api<DynamicObject> {
        self.api_at(client, self.version)
    }

    /// Its objects in every namespace, at `version`.
    pub fn api_at(&self, client: kube::Client, version: &str) -> Api<DynamicObject> {
        let gvk = GroupVersionKind::gvk(self.group, version, self.kind);
        Api::all_with(client, &ApiResource::from_gvk_with_plural(&gvk, self.plural))
    }

    /// An object of this kind as JSON the parser reads: list items come without
    /// apiVersion and kind, so they are put back.
    pub fn to_json(&self, o: DynamicObject) -> String {
        self.to_json_at(o, self.version)
    }

    /// [`WatchedKind::to_json`] for an object read at `version`.
    pub fn to_json_at(&self, mut o: DynamicObject, version: &str) -> String {
        o.types = Some(kube::api::TypeMeta { api_version: self.api_version_at(version), kind: self.kind.into() });
        serde_json::to_string(&o).unwrap_or_default()
    }

    /// The error standing while no version of a required kind is served.
    fn unserved_error(&self) -> Error {
        let versions: Vec<&str> = self.versions().collect();
        Error {
            file: PathBuf::from(ORIGIN),
            object: Some(format!("CustomResourceDefinition {}.{}", self.plural, self.group)),
            field: Some("spec.versions".into()),
            reason: format!(
                "no served version the agent reads ({}): without {} objects the security policies are unknown, so \
                 the agent applies no configuration until the API server serves one; install the CRDs \
                 (meshctl install, or Istio's base chart)",
                versions.join(", "),
                self.kind
            ),
        }
    }
}

const fn kind(group: &'static str, version: &'static str, kind: &'static str, plural: &'static str) -> WatchedKind {
    WatchedKind { group, version, fallback_versions: &[], kind, plural, required: false }
}

const fn security_kind(kind: &'static str, plural: &'static str) -> WatchedKind {
    WatchedKind {
        group: "security.istio.io",
        version: "v1",
        fallback_versions: &["v1beta1"],
        kind,
        plural,
        required: true,
    }
}

/// Everything the agent reads from the API server, in the order objects are handed on.
pub const KINDS: &[WatchedKind] = &[
    kind("", "v1", "Namespace", "namespaces"),
    kind("", "v1", "ServiceAccount", "serviceaccounts"),
    kind("", "v1", "Pod", "pods"),
    kind("", "v1", "Service", "services"),
    kind("discovery.k8s.io", "v1", "EndpointSlice", "endpointslices"),
    WatchedKind {
        fallback_versions: &["v1beta1"],
        ..kind("networking.istio.io", "v1", "VirtualService", "virtualservices")
    },
    WatchedKind {
        fallback_versions: &["v1beta1"],
        ..kind("networking.istio.io", "v1", "DestinationRule", "destinationrules")
    },
    WatchedKind { fallback_versions: &["v1beta1"], ..kind("networking.istio.io", "v1", "Gateway", "gateways") },
    WatchedKind {
        fallback_versions: &["v1beta1"],
        ..kind("networking.istio.io", "v1", "ServiceEntry", "serviceentries")
    },
    security_kind("PeerAuthentication", "peerauthentications"),
    security_kind("AuthorizationPolicy", "authorizationpolicies"),
    kind("linkerd.io", "v1alpha2", "ServiceProfile", "serviceprofiles"),
    kind("split.smi-spec.io", "v1alpha2", "TrafficSplit", "trafficsplits"),
    WatchedKind { fallback_versions: &["v1beta1"], ..kind(GATEWAY_API, "v1", "GatewayClass", "gatewayclasses") },
    WatchedKind { fallback_versions: &["v1beta1"], ..kind(GATEWAY_API, "v1", "Gateway", "gateways") },
    WatchedKind { fallback_versions: &["v1beta1"], ..kind(GATEWAY_API, "v1", "HTTPRoute", "httproutes") },
    WatchedKind { fallback_versions: &["v1alpha2"], ..kind(GATEWAY_API, "v1", "GRPCRoute", "grpcroutes") },
    WatchedKind {
        fallback_versions: &["v1alpha2"],
        ..kind(GATEWAY_API, "v1beta1", "ReferenceGrant", "referencegrants")
    },
    WatchedKind { fallback_versions: &["v1alpha1"], ..kind("telemetry.istio.io", "v1", "Telemetry", "telemetries") },
];

/// What the agents read of another cluster of the mesh: where its pods are and what
/// its Services select, never its policies or routes.
pub const DISCOVERY_KINDS: &[WatchedKind] = &[
    kind("", "v1", "Namespace", "namespaces"),
    kind("", "v1", "Pod", "pods"),
    kind("", "v1", "Service", "services"),
    kind("discovery.k8s.io", "v1", "EndpointSlice", "endpointslices"),
];

/// The Gateway API's group.
const GATEWAY_API: &str = super::gateway_api::GROUP;

/// Where errors about API objects say they come from.
const ORIGIN: &str = "kubernetes";

/// One object as the API server last sent it.
#[derive(Debug, Clone)]
struct Entry {
    /// The JSON the server sent (what was parsed).
    raw: String,
    /// The last version that parsed and validated.
    good: Option<Object>,
    /// Allow-nothing stand-in of an AuthorizationPolicy rejected before it applied.
    fail_closed: Vec<Object>,
    /// The error of `raw`, when it was rejected.
    error: Option<Error>,
}

#[derive(Debug, Default)]
struct KindState {
    /// Listed at least once (or known to be absent: its CRD is not installed).
    synced: bool,
    /// Standing while a required kind has no served version.
    unserved: Option<Error>,
    objects: BTreeMap<String, Entry>,
    /// Objects of a re-list in progress.
    relisting: Option<BTreeMap<String, Entry>>,
    /// The watch's last error, until it answers again.
    failing: Option<String>,
}

#[derive(Debug, Default)]
struct Store {
    kinds: Vec<KindState>,
    new_errors: Vec<Error>,
    changed: bool,
}

impl Store {
    /// The entry for `raw`, keeping the previous good version when `raw` is rejected.
    fn entry(&mut self, previous: Option<&Entry>, raw: String) -> Entry {
        if let Some(p) = previous.filter(|p| p.raw == raw) {
            return p.clone();
        }
        match parse_documents(&PathBuf::from(ORIGIN), &raw) {
            Ok(mut objects) => Entry { raw, good: objects.pop(), fail_closed: Vec::new(), error: None },
            Err(mut e) => {
                let good = previous.and_then(|p| p.good.clone());
                let fail_closed = fail_closed_standins(&raw, good.as_slice(), &mut e);
                if previous.and_then(|p| p.error.as_ref()) != Some(&e) {
                    self.new_errors.push(e.clone());
                }
                Entry { raw, good, fail_closed, error: Some(e) }
            }
        }
    }

    fn apply(&mut self, kind: usize, key: String, raw: String) {
        let in_relist = self.kinds[kind].relisting.is_some();
        let previous = if in_relist {
            self.kinds[kind]
                .relisting
                .as_ref()
                .and_then(|m| m.get(&key))
                .or(self.kinds[kind].objects.get(&key))
                .cloned()
        } else {
            self.kinds[kind].objects.get(&key).cloned()
        };
        let entry = self.entry(previous.as_ref(), raw);
        let k = &mut self.kinds[kind];
        match &mut k.relisting {
            Some(buffer) => {
                buffer.insert(key, entry);
            }
            None => {
                k.objects.insert(key, entry);
                self.changed = true;
            }
        }
    }

    fn delete(&mut self, kind: usize, key: &str) {
        if self.kinds[kind].objects.remove(key).is_some() {
            self.changed = true;
        }
    }

    fn relist_done(&mut self, kind: usize) {
        let k = &mut self.kinds[kind];
        if let Some(buffer) = k.relisting.take() {
            let before: Vec<&String> = k.objects.keys().collect();
            let after: Vec<&String> = buffer.keys().collect();
            let same = before == after && k.objects.values().zip(buffer.values()).all(|(a, b)| a.raw == b.raw);
            k.objects = buffer;
            // A re-list that brings nothing new (after 410 or a restart of the watch)
            // changes nothing downstream.
            self.changed |= !same || !k.synced;
        }
        k.synced = true;
    }

    fn objects(&self) -> Vec<Object> {
        let mut out = Vec::new();
        for k in &self.kinds {
            for e in k.objects.values() {
                out.extend(e.good.iter().cloned());
                out.extend(e.fail_closed.iter().cloned());
            }
        }
        out
    }
}

/// The cluster config source.
#[derive(Debug, Clone)]
pub struct KubeSource {
    store: Arc<Mutex<Store>>,
    /// Its watchers: they stop when the last clone of the source goes.
    _watchers: Arc<Watchers>,
}

/// Tasks aborted on drop.
#[derive(Debug, Default)]
struct Watchers(Vec<tokio::task::AbortHandle>);

impl Drop for Watchers {
    fn drop(&mut self) {
        for w in &self.0 {
            w.abort();
        }
    }
}

fn key(o: &DynamicObject) -> String {
    format!("{}/{}", o.metadata.namespace.as_deref().unwrap_or(""), o.metadata.name.as_deref().unwrap_or(""))
}

impl KubeSource {
    /// Starts one watcher per kind; the receiver gets a message after each batch of
    /// changes.
    pub fn start(client: kube::Client) -> (Self, mpsc::Receiver<()>) {
        let (tx, rx) = mpsc::channel(1);
        (Self::start_kinds(client, KINDS, tx), rx)
    }

    /// Starts one watcher per kind of `kinds`; `changes` gets a message after each
    /// batch of changes.
    pub fn start_kinds(client: kube::Client, kinds: &'static [WatchedKind], changes: mpsc::Sender<()>) -> Self {
        let store = Arc::new(Mutex::new(Store {
            kinds: kinds.iter().map(|_| KindState::default()).collect(),
            ..Default::default()
        }));
        let mut watchers = Watchers::default();
        for (i, k) in kinds.iter().enumerate() {
            watchers
                .0
                .push(tokio::spawn(watch_kind(client.clone(), i, *k, store.clone(), changes.clone())).abort_handle());
        }
        watchers.0.push(tokio::spawn(clear_when_answering(client, store.clone(), changes)).abort_handle());
        Self { store, _watchers: Arc::new(watchers) }
    }

    /// Whether every kind has been listed once: before that nothing is published.
    pub fn synced(&self) -> bool {
        self.store.lock().unwrap_or_else(|p| p.into_inner()).kinds.iter().all(|k| k.synced)
    }

    /// What is in force now, errors since the last call, and whether anything changed.
    pub fn reload(&mut self) -> Reload {
        let mut s = self.store.lock().unwrap_or_else(|p| p.into_inner());
        if !s.kinds.iter().all(|k| k.synced) {
            return Reload::default();
        }
        let changed = std::mem::take(&mut s.changed);
        let unavailable = s.kinds.iter().find_map(|k| k.failing.clone());
        Reload { objects: s.objects(), new_errors: std::mem::take(&mut s.new_errors), changed, unavailable }
    }

    /// Objects currently rejected.
    pub fn standing_errors(&self) -> Vec<Error> {
        let s = self.store.lock().unwrap_or_else(|p| p.into_inner());
        s.kinds
            .iter()
            .flat_map(|k| k.unserved.iter().cloned().chain(k.objects.values().filter_map(|e| e.error.clone())))
            .collect()
    }
}

/// How often an unreachable API server is asked whether it answers again.
const OUTAGE_PROBE_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// Clears the kinds' outage marks once the API server answers again. A watch that
/// resumes sends nothing until something changes, so its own stream cannot say the
/// outage is over; a kind whose watch still fails marks itself again.
async fn clear_when_answering(client: kube::Client, store: Arc<Mutex<Store>>, changes: mpsc::Sender<()>) {
    loop {
        tokio::time::sleep(OUTAGE_PROBE_EVERY).await;
        let failing = store.lock().unwrap_or_else(|p| p.into_inner()).kinds.iter().any(|k| k.failing.is_some());
        if failing && client.apiserver_version().await.is_ok() {
            for k in &mut store.lock().unwrap_or_else(|p| p.into_inner()).kinds {
                k.failing = None;
            }
            tracing::info!("the API server answers again");
            let _ = changes.try_send(());
        }
    }
}

/// Whether a watch error means the API server could not be reached (rather than an
/// answer from it, such as a 403 or an expired resource version).
fn unreachable(e: &watcher::Error) -> bool {
    match e {
        watcher::Error::InitialListFailed(e) | watcher::Error::WatchStartFailed(e) | watcher::Error::WatchFailed(e) => {
            !matches!(e, kube::Error::Api(_))
        }
        watcher::Error::WatchError(_) | watcher::Error::NoResourceVersion => false,
    }
}

/// How long to wait before asking again for a kind no version of which is served.
const UNSERVED_RETRY_MAX: std::time::Duration = std::time::Duration::from_secs(30);

/// Follows one kind: its preferred version if served, else a fallback version; when
/// none is served, says so (an error for a required kind) and asks again with back-off,
/// since the CRD may be installed later.
async fn watch_kind(
    client: kube::Client,
    index: usize,
    kind: WatchedKind,
    store: Arc<Mutex<Store>>,
    changes: mpsc::Sender<()>,
) {
    let mut wait = std::time::Duration::from_millis(500);
    loop {
        for version in kind.versions() {
            follow(kind.api_at(client.clone(), version), index, kind, version, &store, &changes).await;
        }
        {
            let mut s = store.lock().unwrap_or_else(|p| p.into_inner());
            let k = &mut s.kinds[index];
            if kind.required {
                if k.unserved.is_none() {
                    let e = kind.unserved_error();
                    tracing::error!(error = %e, "security policy kind not served");
                    k.unserved = Some(e.clone());
                    s.new_errors.push(e);
                }
            } else if !k.synced {
                // The CRD is not installed (no Linkerd, say): nothing of this kind exists.
                tracing::info!(kind = kind.kind, group = kind.group, "not served by the API server; watching for it");
                k.synced = true;
                s.changed = true;
            }
        }
        let _ = changes.try_send(());
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(UNSERVED_RETRY_MAX);
    }
}

/// Runs the watcher of one version of a kind. Returns only when that version is not
/// served (404 on the first list); otherwise it follows the kind for good, backing
/// off through outages while the last state keeps serving.
async fn follow(
    api: Api<DynamicObject>,
    index: usize,
    kind: WatchedKind,
    version: &str,
    store: &Mutex<Store>,
    changes: &mpsc::Sender<()>,
) {
    let mut listed = false;
    let mut events = std::pin::pin!(watcher::watcher(api, watcher::Config::default()).default_backoff());
    while let Some(event) = events.next().await {
        {
            let mut s = store.lock().unwrap_or_else(|p| p.into_inner());
            if event.is_ok() {
                s.kinds[index].failing = None;
            }
            match event {
                Ok(Event::Init) => s.kinds[index].relisting = Some(BTreeMap::new()),
                Ok(Event::InitApply(o)) | Ok(Event::Apply(o)) => {
                    let key = key(&o);
                    s.apply(index, key, kind.to_json_at(o, version));
                }
                Ok(Event::Delete(o)) => s.delete(index, &key(&o)),
                Ok(Event::InitDone) => {
                    listed = true;
                    if s.kinds[index].unserved.take().is_some() {
                        tracing::info!(kind = kind.kind, version, "served now; reading it");
                    }
                    s.relist_done(index);
                }
                Err(watcher::Error::InitialListFailed(kube::Error::Api(status))) if status.code == 404 && !listed => {
                    // The API answered (this version is not served): no outage.
                    s.kinds[index].failing = None;
                    return;
                }
                Err(e) => {
                    // The last state keeps serving; the stream backs off and resumes.
                    tracing::warn!(kind = kind.kind, error = %e, "watch failed; keeping the last state");
                    if unreachable(&e) {
                        s.kinds[index].failing = Some(format!("watching {}: {e}", kind.kind));
                        drop(s);
                        let _ = changes.try_send(());
                    }
                    continue;
                }
            }
        }
        let _ = changes.try_send(());
    }
}

/// The data of Secret `namespace/name`, waiting (and saying so) while the API server
/// cannot be asked: the CA service does not start without its CA. When the API server
/// says there is no such Secret, `create` makes its data (a new self-signed root),
/// which is stored under that name, as istiod stores the root it makes itself; a
/// Secret created meanwhile by someone else wins.
pub async fn read_or_create_secret(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    create: impl Fn() -> Option<BTreeMap<String, Vec<u8>>>,
) -> BTreeMap<String, Vec<u8>> {
    use k8s_openapi::api::core::v1::Secret;
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let mut wait = std::time::Duration::from_millis(500);
    let data_of = |secret: Secret| secret.data.unwrap_or_default().into_iter().map(|(k, v)| (k, v.0)).collect();
    loop {
        match api.get_opt(name).await {
            Ok(Some(secret)) => return data_of(secret),
            Ok(None) => {
                if let Some(data) = create() {
                    let secret = Secret {
                        metadata: kube::api::ObjectMeta {
                            name: Some(name.into()),
                            namespace: Some(namespace.into()),
                            labels: Some([("app.kubernetes.io/part-of".to_string(), "mesh".to_string())].into()),
                            ..Default::default()
                        },
                        type_: Some("Opaque".into()),
                        data: Some(data.into_iter().map(|(k, v)| (k, k8s_openapi::ByteString(v))).collect()),
                        ..Default::default()
                    };
                    match api.create(&kube::api::PostParams::default(), &secret).await {
                        Ok(created) => {
                            tracing::info!(secret = %format!("{namespace}/{name}"), "no CA Secret: created one with a new self-signed root");
                            return data_of(created);
                        }
                        // Someone else's came first: read it.
                        Err(kube::Error::Api(s)) if s.code == 409 => continue,
                        Err(e) => {
                            tracing::warn!(secret = %format!("{namespace}/{name}"), error = %e, "creating the mesh CA Secret")
                        }
                    }
                } else {
                    tracing::warn!(secret = %format!("{namespace}/{name}"), "waiting for the mesh CA Secret");
                }
            }
            Err(e) => {
                tracing::warn!(secret = %format!("{namespace}/{name}"), error = %e, "waiting for the mesh CA Secret");
            }
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(std::time::Duration::from_secs(30));
    }
}

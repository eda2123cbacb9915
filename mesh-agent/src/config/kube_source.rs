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
    /// Version served.
    pub version: &'static str,
    /// Kind.
    pub kind: &'static str,
    /// Resource (plural).
    pub plural: &'static str,
}

impl WatchedKind {
    /// `group/version`, or `version` for the core group.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() { self.version.to_string() } else { format!("{}/{}", self.group, self.version) }
    }

    /// Its objects in every namespace.
    pub fn api(&self, client: kube::Client) -> Api<DynamicObject> {
        let gvk = GroupVersionKind::gvk(self.group, self.version, self.kind);
        Api::all_with(client, &ApiResource::from_gvk_with_plural(&gvk, self.plural))
    }

    /// An object of this kind as JSON the parser reads: list items come without
    /// apiVersion and kind, so they are put back.
    pub fn to_json(&self, mut o: DynamicObject) -> String {
        o.types = Some(kube::api::TypeMeta { api_version: self.api_version(), kind: self.kind.into() });
        serde_json::to_string(&o).unwrap_or_default()
    }
}

/// Everything the agent reads from the API server, in the order objects are handed on.
pub const KINDS: &[WatchedKind] = &[
    WatchedKind { group: "", version: "v1", kind: "Namespace", plural: "namespaces" },
    WatchedKind { group: "", version: "v1", kind: "ServiceAccount", plural: "serviceaccounts" },
    WatchedKind { group: "", version: "v1", kind: "Pod", plural: "pods" },
    WatchedKind { group: "", version: "v1", kind: "Service", plural: "services" },
    WatchedKind { group: "discovery.k8s.io", version: "v1", kind: "EndpointSlice", plural: "endpointslices" },
    WatchedKind { group: "networking.istio.io", version: "v1", kind: "VirtualService", plural: "virtualservices" },
    WatchedKind { group: "networking.istio.io", version: "v1", kind: "DestinationRule", plural: "destinationrules" },
    WatchedKind {
        group: "security.istio.io",
        version: "v1",
        kind: "PeerAuthentication",
        plural: "peerauthentications",
    },
    WatchedKind {
        group: "security.istio.io",
        version: "v1",
        kind: "AuthorizationPolicy",
        plural: "authorizationpolicies",
    },
    WatchedKind { group: "linkerd.io", version: "v1alpha2", kind: "ServiceProfile", plural: "serviceprofiles" },
    WatchedKind { group: "split.smi-spec.io", version: "v1alpha2", kind: "TrafficSplit", plural: "trafficsplits" },
];

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
    objects: BTreeMap<String, Entry>,
    /// Objects of a re-list in progress.
    relisting: Option<BTreeMap<String, Entry>>,
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
}

fn key(o: &DynamicObject) -> String {
    format!("{}/{}", o.metadata.namespace.as_deref().unwrap_or(""), o.metadata.name.as_deref().unwrap_or(""))
}

impl KubeSource {
    /// Starts one watcher per kind; the receiver gets a message after each batch of
    /// changes.
    pub fn start(client: kube::Client) -> (Self, mpsc::Receiver<()>) {
        let store = Arc::new(Mutex::new(Store {
            kinds: KINDS.iter().map(|_| KindState::default()).collect(),
            ..Default::default()
        }));
        let (tx, rx) = mpsc::channel(1);
        for (i, k) in KINDS.iter().enumerate() {
            tokio::spawn(watch_kind(k.api(client.clone()), i, *k, store.clone(), tx.clone()));
        }
        (Self { store }, rx)
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
        Reload { objects: s.objects(), new_errors: std::mem::take(&mut s.new_errors), changed }
    }

    /// Objects currently rejected.
    pub fn standing_errors(&self) -> Vec<Error> {
        let s = self.store.lock().unwrap_or_else(|p| p.into_inner());
        s.kinds.iter().flat_map(|k| k.objects.values().filter_map(|e| e.error.clone())).collect()
    }
}

async fn watch_kind(
    api: Api<DynamicObject>,
    index: usize,
    kind: WatchedKind,
    store: Arc<Mutex<Store>>,
    changes: mpsc::Sender<()>,
) {
    let mut events = std::pin::pin!(watcher::watcher(api, watcher::Config::default()).default_backoff());
    while let Some(event) = events.next().await {
        {
            let mut s = store.lock().unwrap_or_else(|p| p.into_inner());
            match event {
                Ok(Event::Init) => s.kinds[index].relisting = Some(BTreeMap::new()),
                Ok(Event::InitApply(o)) | Ok(Event::Apply(o)) => {
                    let key = key(&o);
                    s.apply(index, key, kind.to_json(o));
                }
                Ok(Event::Delete(o)) => s.delete(index, &key(&o)),
                Ok(Event::InitDone) => s.relist_done(index),
                Err(watcher::Error::InitialListFailed(kube::Error::Api(status))) if status.code == 404 => {
                    // The CRD is not installed (no Linkerd, say): nothing of this kind
                    // exists. Keep asking (with back-off); it may be installed later.
                    if !s.kinds[index].synced {
                        tracing::info!(
                            kind = kind.kind,
                            group = kind.group,
                            "not served by the API server; watching for it"
                        );
                        s.kinds[index].synced = true;
                        s.changed = true;
                    }
                }
                Err(e) => {
                    // The last state keeps serving; the stream backs off and resumes.
                    tracing::warn!(kind = kind.kind, error = %e, "watch failed; keeping the last state");
                    continue;
                }
            }
        }
        let _ = changes.try_send(());
    }
}

/// The data of Secret `namespace/name`, waiting (and saying so) until it exists: the
/// agent does not start without its CA.
pub async fn read_secret(client: &kube::Client, namespace: &str, name: &str) -> BTreeMap<String, Vec<u8>> {
    let api: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(client.clone(), namespace);
    let mut wait = std::time::Duration::from_millis(500);
    loop {
        match api.get(name).await {
            Ok(secret) => {
                return secret.data.unwrap_or_default().into_iter().map(|(k, v)| (k, v.0)).collect();
            }
            Err(e) => {
                tracing::warn!(secret = %format!("{namespace}/{name}"), error = %e, "waiting for the mesh CA Secret");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(std::time::Duration::from_secs(30));
            }
        }
    }
}

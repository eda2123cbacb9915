//! The mesh's other clusters, from Istio's remote secrets: Secrets labelled
//! `istio/multiCluster: "true"` in the install's namespace, each data key a cluster
//! name and its value a kubeconfig for that cluster's API server (what
//! `meshctl x create-remote-secret` prints).
//!
//! The CA service reads them, not the agents: node agents may read no Secret (the
//! install's namespace also holds the signing key's), so they ask the CA for these
//! kubeconfigs over the same authenticated channel as for certificates. What a
//! kubeconfig grants is the other cluster's read-only `mesh-reader` account.
//!
//! Invariants: a kubeconfig is never logged; a malformed entry is skipped with a line
//! naming the Secret and key, and the others stand; the list is bounded.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::Secret as ApiSecret;
use kube::api::Api;
use kube::runtime::WatchStreamExt as _;
use kube::runtime::watcher::{self, Event};

use crate::config::{DirSource, Object};
use crate::identity::ca_protocol::{MAX_KUBECONFIG, MAX_REMOTE_CLUSTERS, RemoteCluster};
use crate::state::is_cluster_name;

/// The label that makes a Secret a remote secret, and its value.
pub const MULTI_CLUSTER_LABEL: (&str, &str) = ("istio/multiCluster", "true");

/// Where remote secrets come from.
pub enum RemoteSecrets {
    /// Secrets among a directory's manifests (the lab).
    Files(Mutex<DirSource>),
    /// The API server: followed by a watch, held by Secret name.
    Kube(Arc<Mutex<BTreeMap<String, Vec<RemoteCluster>>>>),
}

impl std::fmt::Debug for RemoteSecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RemoteSecrets::Files(_) => "RemoteSecrets::Files",
            RemoteSecrets::Kube(_) => "RemoteSecrets::Kube",
        })
    }
}

impl RemoteSecrets {
    /// Follows the remote secrets of `namespace`.
    pub fn follow(client: kube::Client, namespace: &str) -> Self {
        let held = Arc::new(Mutex::new(BTreeMap::new()));
        let api: Api<ApiSecret> = Api::namespaced(client, namespace);
        tokio::spawn(watch(api, held.clone()));
        RemoteSecrets::Kube(held)
    }

    /// The remote clusters now, by name; where two Secrets name one cluster, the first
    /// Secret by name wins.
    pub fn clusters(&self) -> Vec<RemoteCluster> {
        let by_secret: Vec<(String, Vec<RemoteCluster>)> = match self {
            RemoteSecrets::Kube(held) => {
                held.lock().unwrap_or_else(|p| p.into_inner()).iter().map(|(k, v)| (k.clone(), v.clone())).collect()
            }
            RemoteSecrets::Files(source) => {
                let objects = source.lock().unwrap_or_else(|p| p.into_inner()).reload().objects;
                let mut found: Vec<(String, Vec<RemoteCluster>)> = objects
                    .iter()
                    .filter_map(|o| match o {
                        Object::Secret(s) if is_remote_secret(&s.metadata.labels) => {
                            let entries = s
                                .data
                                .keys()
                                .chain(s.string_data.keys())
                                .filter_map(|k| Some((k.clone(), s.value(k).ok().flatten()?)));
                            Some((s.metadata.name.clone(), clusters_in(&s.metadata.name, entries)))
                        }
                        _ => None,
                    })
                    .collect();
                found.sort_by(|a, b| a.0.cmp(&b.0));
                found
            }
        };
        let mut out: BTreeMap<String, RemoteCluster> = BTreeMap::new();
        for (_, clusters) in by_secret {
            for c in clusters {
                out.entry(c.name.clone()).or_insert(c);
            }
        }
        out.into_values().take(MAX_REMOTE_CLUSTERS).collect()
    }
}

fn is_remote_secret(labels: &BTreeMap<String, String>) -> bool {
    labels.get(MULTI_CLUSTER_LABEL.0).is_some_and(|v| v == MULTI_CLUSTER_LABEL.1)
}

/// The clusters of Secret `secret`'s entries; malformed ones are skipped and said.
fn clusters_in(secret: &str, entries: impl Iterator<Item = (String, Vec<u8>)>) -> Vec<RemoteCluster> {
    let mut out = Vec::new();
    for (name, value) in entries {
        let skip = |why: &str| tracing::warn!(secret, key = %name, why, "remote secret entry skipped");
        if !is_cluster_name(&name) {
            skip("the key must name a cluster: lowercase letters, digits, '-' and '.'");
            continue;
        }
        if value.len() > MAX_KUBECONFIG {
            skip("the kubeconfig is larger than 64 KiB");
            continue;
        }
        match String::from_utf8(value) {
            // YAML has no other control characters; without them JSON escapes a byte
            // to at most two, which the agents' answer bound counts on.
            Ok(k) if k.chars().any(|c| c.is_control() && !matches!(c, '\t' | '\n' | '\r')) => {
                skip("the kubeconfig holds control characters");
            }
            Ok(kubeconfig) => out.push(RemoteCluster { name, kubeconfig }),
            Err(_) => skip("the kubeconfig is not UTF-8"),
        }
    }
    out
}

/// Follows the labelled Secrets; a re-list replaces the set at its end.
async fn watch(api: Api<ApiSecret>, held: Arc<Mutex<BTreeMap<String, Vec<RemoteCluster>>>>) {
    let label = format!("{}={}", MULTI_CLUSTER_LABEL.0, MULTI_CLUSTER_LABEL.1);
    let mut events = std::pin::pin!(watcher::watcher(api, watcher::Config::default().labels(&label)).default_backoff());
    let mut relisting: Option<BTreeMap<String, Vec<RemoteCluster>>> = None;
    let of = |s: ApiSecret| {
        let name = s.metadata.name.clone().unwrap_or_default();
        let entries = s.data.unwrap_or_default().into_iter().map(|(k, v)| (k, v.0));
        let clusters = clusters_in(&name, entries);
        (name, clusters)
    };
    while let Some(event) = events.next().await {
        let mut held = held.lock().unwrap_or_else(|p| p.into_inner());
        match event {
            Ok(Event::Init) => relisting = Some(BTreeMap::new()),
            Ok(Event::InitApply(s)) => {
                let (name, clusters) = of(s);
                relisting.get_or_insert_with(BTreeMap::new).insert(name, clusters);
            }
            Ok(Event::InitDone) => {
                *held = relisting.take().unwrap_or_default();
                tracing::info!(secrets = held.len(), "remote secrets listed");
            }
            Ok(Event::Apply(s)) => {
                let (name, clusters) = of(s);
                tracing::info!(secret = %name, clusters = clusters.len(), "remote secret changed");
                held.insert(name, clusters);
            }
            Ok(Event::Delete(s)) => {
                let name = s.metadata.name.unwrap_or_default();
                tracing::info!(secret = %name, "remote secret removed");
                held.remove(&name);
            }
            // The last list keeps serving; the stream backs off and resumes.
            Err(e) => tracing::warn!(error = %e, "watching remote secrets failed; keeping the last list"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn malformed_entries_are_skipped_and_the_rest_stand() {
        let entries = vec![
            ("cluster2".to_string(), b"apiVersion: v1\nkind: Config\n".to_vec()),
            ("Cluster 3".to_string(), b"x".to_vec()),
            ("cluster4".to_string(), vec![0xff, 0xfe]),
            ("cluster5".to_string(), vec![b'a'; MAX_KUBECONFIG + 1]),
            ("cluster6".to_string(), b"apiVersion: v1\x01".to_vec()),
        ];
        let got = clusters_in("istio-remote-secret-x", entries.into_iter());
        assert_eq!(got.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(), ["cluster2"]);
        // A kubeconfig holds a token: it is not in the Debug output.
        assert!(!format!("{got:?}").contains("apiVersion"));
    }

    #[test]
    fn the_largest_answer_the_ca_can_give_fits_what_agents_read() {
        // Every cluster at the longest name and the largest kubeconfig, all of it the
        // characters JSON escapes.
        let entries = (0..MAX_REMOTE_CLUSTERS + 3).map(|i| {
            let name = format!("{i:02}{}", "c".repeat(61));
            (name, "\"\n".repeat(MAX_KUBECONFIG / 2).into_bytes())
        });
        let mut clusters = clusters_in("s", entries);
        clusters.truncate(MAX_REMOTE_CLUSTERS);
        let answer = serde_json::to_vec(&clusters).unwrap();
        assert!(answer.len() <= crate::identity::ca_protocol::MAX_REMOTE_CLUSTERS_ANSWER, "{}", answer.len());
    }
}

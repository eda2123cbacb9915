//! The mesh's other clusters, as this agent follows them: the CA service hands it a
//! kubeconfig per remote secret (agents read no Secret themselves), and for each
//! cluster the agent watches the discovery kinds of that cluster's API server. The
//! agent loop merges what they hold into the snapshot ([`Snapshot::compile_mesh`]).
//!
//! Invariants: a kubeconfig may name only an address and inline credentials: one that
//! would run a command or read a file on the node (exec, auth providers, file paths) is
//! refused, since whoever writes a remote secret must not gain the node. A remote
//! secret naming this cluster is ignored. While the CA cannot be asked, the clusters
//! followed stay; while a remote API server is down, its last state keeps serving. A
//! cluster appears in the snapshot only once every kind of it has been listed.
//!
//! [`Snapshot::compile_mesh`]: crate::snapshot::Snapshot::compile_mesh

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kube::config::{KubeConfigOptions, Kubeconfig};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::admin::RemoteClusterStatus;
use crate::code_pages::OneOffWork;
use crate::config::kube_source::DISCOVERY_KINDS;
use crate::config::{KubeSource, Object, RemoteObjects};
use crate::identity::ca_protocol::RemoteCluster;
use crate::identity::{Asked, CaClient, Pace};

/// One remote cluster followed.
struct Followed {
    kubeconfig: String,
    /// None when its kubeconfig was refused.
    source: Option<KubeSource>,
    status: RemoteClusterStatus,
}

#[derive(Default)]
struct Clusters {
    by_name: BTreeMap<String, Followed>,
    /// A cluster came or went since the last reload.
    changed: bool,
}

/// The remote clusters followed; clones share them.
#[derive(Clone, Default)]
pub(crate) struct RemoteClusters {
    clusters: Arc<Mutex<Clusters>>,
}

/// What the remote clusters hold now.
pub(crate) struct RemoteReload {
    /// Each synced cluster's objects, by name.
    pub objects: Vec<RemoteObjects>,
    /// Anything changed since the last reload.
    pub changed: bool,
}

impl RemoteClusters {
    /// Follows the clusters `ca` names until `stop`: a long poll the CA holds until the
    /// list changes, asked again every `every` where the CA does not hold it. `changes`
    /// gets a message when a cluster came, went or changed. An answer that comes seldom is
    /// one-off work ([`Pace::seldom`]).
    pub(crate) fn start(
        ca: CaClient,
        own_cluster: String,
        every: Duration,
        one_off: OneOffWork,
        stop: CancellationToken,
    ) -> (Self, mpsc::Receiver<()>) {
        let (tx, rx) = mpsc::channel(1);
        let me = Self::default();
        let follower = me.clone();
        tokio::spawn(async move {
            let mut failing: Option<String> = None;
            let mut pace = Pace::new(every);
            loop {
                let asked = match ca.remote_clusters(pace.watch()).await {
                    Ok((list, version)) => {
                        if failing.take().is_some() {
                            tracing::info!("the CA answers for the remote clusters again");
                        }
                        let asked = pace.answered(version);
                        if asked == Asked::News {
                            follower.follow(&list, &own_cluster, &tx).await;
                        }
                        if pace.seldom(asked) {
                            one_off.done();
                        }
                        asked
                    }
                    Err(e) => {
                        let e = e.to_string();
                        if failing.as_ref() != Some(&e) {
                            tracing::warn!(error = %e, "asking the CA for the remote clusters; following the last list");
                        }
                        failing = Some(e);
                        Asked::Failed
                    }
                };
                if !pace.next(asked, &stop).await {
                    break;
                }
            }
        });
        (me, rx)
    }

    /// Follows the clusters of `list` and no others.
    pub(crate) async fn follow(&self, list: &[RemoteCluster], own_cluster: &str, changes: &mpsc::Sender<()>) {
        let mut wanted: BTreeMap<&str, &RemoteCluster> = BTreeMap::new();
        for c in list {
            if c.name == own_cluster {
                tracing::debug!(cluster = %c.name, "a remote secret names this cluster; ignored");
                continue;
            }
            wanted.insert(&c.name, c);
        }
        // Clients are made outside the lock (reading a kubeconfig is async).
        let mut fresh = Vec::new();
        {
            let held = self.clusters.lock().unwrap_or_else(|p| p.into_inner());
            for (name, c) in &wanted {
                if held.by_name.get(*name).is_none_or(|f| f.kubeconfig != c.kubeconfig) {
                    fresh.push(*c);
                }
            }
        }
        let mut made = Vec::new();
        for c in fresh {
            let source = match client_for(&c.kubeconfig).await {
                Ok(client) => Ok(KubeSource::start_kinds(client, DISCOVERY_KINDS, changes.clone())),
                Err(why) => {
                    tracing::error!(cluster = %c.name, %why, "remote cluster not followed");
                    Err(why)
                }
            };
            made.push((c.name.clone(), c.kubeconfig.clone(), source));
        }
        let mut held = self.clusters.lock().unwrap_or_else(|p| p.into_inner());
        let before = held.by_name.len();
        held.by_name.retain(|name, _| {
            let keep = wanted.contains_key(name.as_str());
            if !keep {
                tracing::info!(cluster = %name, "remote secret gone: no longer following the cluster");
            }
            keep
        });
        let mut changed = held.by_name.len() != before;
        for (name, kubeconfig, source) in made {
            tracing::info!(cluster = %name, ok = source.is_ok(), "following a remote cluster");
            let status = RemoteClusterStatus {
                cluster: name.clone(),
                synced: false,
                error: source.as_ref().err().cloned(),
                services: 0,
                pods: 0,
            };
            // A replaced source stops its watchers as it drops.
            held.by_name.insert(name, Followed { kubeconfig, source: source.ok(), status });
            changed = true;
        }
        if changed {
            held.changed = true;
            let _ = changes.try_send(());
        }
    }

    /// The synced clusters' objects, and whether anything changed since the last call.
    pub(crate) fn reload(&self) -> RemoteReload {
        let mut held = self.clusters.lock().unwrap_or_else(|p| p.into_inner());
        let mut changed = std::mem::take(&mut held.changed);
        let mut objects = Vec::new();
        for (name, f) in &mut held.by_name {
            let Some(source) = f.source.as_mut() else { continue };
            let r = source.reload();
            for e in &r.new_errors {
                tracing::error!(cluster = %name, error = %e, "remote object refused");
            }
            f.status.error = r.unavailable.clone();
            if !source.synced() {
                continue;
            }
            changed |= r.changed || !f.status.synced;
            f.status.synced = true;
            f.status.services = r.objects.iter().filter(|o| matches!(o, Object::Service(_))).count();
            f.status.pods = r.objects.iter().filter(|o| matches!(o, Object::Pod(_))).count();
            objects.push(RemoteObjects { cluster: name.clone(), objects: r.objects });
        }
        RemoteReload { objects, changed }
    }

    /// Where each cluster stands.
    pub(crate) fn status(&self) -> Vec<RemoteClusterStatus> {
        self.clusters.lock().unwrap_or_else(|p| p.into_inner()).by_name.values().map(|f| f.status.clone()).collect()
    }
}

/// A client for the API server a remote secret's kubeconfig names, refusing what
/// would act on this node (commands, files): the error never quotes the kubeconfig.
async fn client_for(kubeconfig: &str) -> Result<kube::Client, String> {
    let config = Kubeconfig::from_yaml(kubeconfig).map_err(|e| format!("kubeconfig: {e}"))?;
    for user in &config.auth_infos {
        let Some(auth) = &user.auth_info else { continue };
        let refused = [
            (auth.exec.is_some(), "exec"),
            (auth.auth_provider.is_some(), "auth-provider"),
            (auth.token_file.is_some(), "tokenFile"),
            (auth.client_certificate.is_some(), "client-certificate"),
            (auth.client_key.is_some(), "client-key"),
        ];
        if let Some((_, field)) = refused.iter().find(|(set, _)| *set) {
            return Err(format!(
                "kubeconfig: users[{}].user.{field}: not allowed in a remote secret (it would run a command or \
                 read a file on the node); use inline credentials",
                user.name
            ));
        }
    }
    for cluster in &config.clusters {
        if cluster.cluster.as_ref().is_some_and(|c| c.certificate_authority.is_some()) {
            return Err(format!(
                "kubeconfig: clusters[{}].cluster.certificate-authority: a file on the node is not allowed in a \
                 remote secret; use certificate-authority-data",
                cluster.name
            ));
        }
    }
    let mut config = kube::Config::from_custom_kubeconfig(config, &KubeConfigOptions::default())
        .await
        .map_err(|e| format!("kubeconfig: {e}"))?;
    config.connect_timeout = Some(Duration::from_secs(10));
    config.read_timeout = Some(Duration::from_secs(330));
    kube::Client::try_from(config).map_err(|e| format!("client: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kubeconfig(user: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters: [{{name: c, cluster: {{server: 'https://127.0.0.1:1'}}}}]\n\
             users: [{{name: u, user: {user}}}]\ncontexts: [{{name: c, context: {{cluster: c, user: u}}}}]\n\
             current-context: c\n"
        )
    }

    #[tokio::test]
    async fn a_kubeconfig_that_would_run_a_command_or_read_a_file_is_refused() {
        assert!(client_for(&kubeconfig("{token: abc}")).await.is_ok());
        for (user, field) in [
            ("{exec: {command: /bin/sh, apiVersion: client.authentication.k8s.io/v1}}", "exec"),
            ("{tokenFile: /etc/shadow}", "tokenFile"),
            ("{client-certificate: /x, client-key: /y}", "client-certificate"),
        ] {
            let e = client_for(&kubeconfig(user)).await.err().unwrap_or_default();
            assert!(e.contains(&format!("users[u].user.{field}")), "{user}: {e}");
        }
        let ca_file = kubeconfig("{token: abc}").replace("server:", "certificate-authority: /etc/ca.pem, server:");
        assert!(client_for(&ca_file).await.err().unwrap_or_default().contains("certificate-authority"));
    }
}

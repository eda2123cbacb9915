//! Which identities run on a node: the service accounts of the pods scheduled there
//! (not finished, not hostNetwork), from the config directory (the lab) or the API
//! server (a cluster). Asked at each signing request, so a pod that left the node no
//! longer gets certificates there.

use std::collections::BTreeSet;
use std::sync::Mutex;

use k8s_openapi::api::core::v1::Pod as ApiPod;
use kube::api::{Api, ListParams};

use crate::config::{DirSource, Object};
use crate::identity::Identity;

/// Where pods and their nodes come from.
pub enum NodeWorkloads {
    /// A directory of manifests.
    Files(Mutex<DirSource>),
    /// The API server.
    Kube(kube::Client),
}

impl std::fmt::Debug for NodeWorkloads {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            NodeWorkloads::Files(_) => "NodeWorkloads::Files",
            NodeWorkloads::Kube(_) => "NodeWorkloads::Kube",
        })
    }
}

impl NodeWorkloads {
    /// The identities of the pods on `node`, in `trust_domain`.
    pub async fn identities_on(&self, node: &str, trust_domain: &str) -> Result<BTreeSet<Identity>, String> {
        match self {
            NodeWorkloads::Files(source) => {
                let objects = source.lock().unwrap_or_else(|p| p.into_inner()).reload().objects;
                Ok(objects
                    .iter()
                    .filter_map(|o| match o {
                        Object::Pod(p) => Some(p),
                        _ => None,
                    })
                    .filter(|p| p.spec.node_name.as_deref() == Some(node) && !p.spec.host_network && !p.is_finished())
                    .map(|p| {
                        let sa = p.spec.service_account_name.as_deref().unwrap_or("default");
                        Identity::new(trust_domain, &p.metadata.namespace_or_default(), sa)
                    })
                    .collect())
            }
            NodeWorkloads::Kube(client) => {
                let pods: Api<ApiPod> = Api::all(client.clone());
                let list = pods
                    .list(&ListParams::default().fields(&format!("spec.nodeName={node}")))
                    .await
                    .map_err(|e| format!("listing the pods of node {node}: {e}"))?;
                Ok(list
                    .items
                    .iter()
                    // The API server filters by node; the answer is checked all the same.
                    .filter(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node))
                    .filter(|p| !p.spec.as_ref().and_then(|s| s.host_network).unwrap_or(false))
                    .filter(|p| {
                        !matches!(p.status.as_ref().and_then(|s| s.phase.as_deref()), Some("Succeeded" | "Failed"))
                    })
                    .map(|p| {
                        let ns = p.metadata.namespace.as_deref().unwrap_or("default");
                        let sa = p.spec.as_ref().and_then(|s| s.service_account_name.as_deref()).unwrap_or("default");
                        Identity::new(trust_domain, ns, sa)
                    })
                    .collect())
            }
        }
    }
}

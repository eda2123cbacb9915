//! Network gateways: how a pod on another network than this cluster's is reached.
//!
//! Istio marks a network's east-west gateway by its Service: labelled
//! `topology.istio.io/network: <network>`, with the HBONE port (15008) and an address
//! the other networks reach (the load balancer's, or `spec.externalIPs`). A pod on that
//! network is then reached by double HBONE: an outer tunnel to the gateway, as the
//! gateway's identity, carrying an inner one to the pod, as the pod's identity, so the
//! gateway never sees the inner mutual TLS and identity holds end to end.
//!
//! Invariant: only a Service of the mesh's root namespace names a gateway (a tenant's
//! cannot draw other pods' traffic to itself); a gateway is used only with the one
//! identity its pods share, read from
//! the same cluster's pods; a Service that selects no pod, pods of several service
//! accounts, or has no outside address is no gateway (a problem says why), so the
//! network's pods stay unreachable rather than reached through an unverified hop.

use std::collections::HashMap;
use std::net::SocketAddr;

use mesh_common::ports;

use super::Snapshot;
use super::compile::{Origin, cluster_network, other_network, workload};
use super::labels::{NETWORK_LABEL, NamespaceModes, namespace_modes};
use crate::config::{Object, RemoteObjects};
use crate::identity::Identity;
use crate::state::{MeshScope, Problem};

/// A network's east-west gateway, as clients on other networks dial it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkGateway {
    /// The network it leads into.
    pub network: String,
    /// The cluster its Service is in.
    pub cluster: String,
    /// Its Service, `namespace/name`.
    pub service: String,
    /// Where its HBONE port is reached from other networks.
    pub addr: SocketAddr,
    /// The identity its pods present.
    pub identity: Identity,
}

/// How a workload's address is reached from this cluster's network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reach<'a> {
    /// Directly: the same network, or no networks named.
    Direct,
    /// Through its network's east-west gateway.
    Via(&'a NetworkGateway),
    /// Not at all: another network without a gateway.
    Unreachable,
}

impl Snapshot {
    /// The east-west gateways of the other networks, from this cluster's objects first,
    /// then the remote clusters' in order: the first one found for a network is its.
    pub(super) fn find_network_gateways(
        &mut self,
        objects: &[Object],
        namespaces: &HashMap<String, NamespaceModes>,
        remotes: &[RemoteObjects],
        mesh: &MeshScope,
    ) {
        let mut found = discover(objects, namespaces, mesh, &Origin::local(mesh));
        for remote in remotes {
            let namespaces = namespace_modes(&remote.objects);
            let network = cluster_network(&namespaces, mesh).to_string();
            let origin = Origin { cluster: &remote.cluster, network: &network };
            let (gateways, problems) = discover(&remote.objects, &namespaces, mesh, &origin);
            found.0.extend(gateways);
            found.1.extend(problems);
        }
        let (gateways, problems) = found;
        self.problems.extend(problems);
        for gw in gateways {
            if other_network(&gw.network, mesh).is_some() {
                self.network_gateways.entry(gw.network.clone()).or_insert(gw);
            }
        }
    }
}

/// The network gateways one cluster's objects declare, with a problem for each Service
/// that is marked as one but cannot serve.
pub(super) fn discover(
    objects: &[Object],
    namespaces: &HashMap<String, NamespaceModes>,
    mesh: &MeshScope,
    origin: &Origin<'_>,
) -> (Vec<NetworkGateway>, Vec<Problem>) {
    let mut found = Vec::new();
    let mut problems = Vec::new();
    for o in objects {
        let Object::Service(svc) = o else { continue };
        let Some(network) = svc.metadata.labels.get(NETWORK_LABEL).filter(|n| !n.is_empty()) else { continue };
        if !svc.spec.ports.iter().any(|p| p.port == ports::INBOUND_HBONE) {
            continue;
        }
        let ns = svc.metadata.namespace_or_default();
        let object = format!("Service {ns}/{} (cluster {})", svc.metadata.name, origin.cluster);
        // The gateway carries every pod's traffic to its network: only the mesh's own
        // namespace may name it, never a tenant's Service.
        if ns != mesh.root_namespace {
            problems.push(Problem::new(
                "MESH0113",
                object,
                format!(
                    "labelled as network {network}'s east-west gateway outside the mesh's root namespace {}; not used",
                    mesh.root_namespace
                ),
            ));
            continue;
        }
        let Some(ip) = svc.external_addresses().into_iter().next() else {
            problems.push(Problem::new(
                "MESH0113",
                object,
                format!(
                    "the east-west gateway of network {network} has no address other networks reach \
                     (status.loadBalancer.ingress or spec.externalIPs); it is not used"
                ),
            ));
            continue;
        };
        let mut identities: Vec<Identity> = objects
            .iter()
            .filter_map(|o| match o {
                Object::Pod(p) if p.metadata.namespace_or_default() == ns && !p.is_finished() => Some(p),
                _ => None,
            })
            .filter(|p| {
                !svc.spec.selector.is_empty()
                    && svc.spec.selector.iter().all(|(k, v)| p.metadata.labels.get(k) == Some(v))
            })
            .map(|p| workload(p, mesh, namespaces, origin).identity)
            .collect();
        identities.sort_by_key(ToString::to_string);
        identities.dedup();
        let identity = match identities.as_slice() {
            [one] => one.clone(),
            [] => {
                problems.push(Problem::new(
                    "MESH0113",
                    object,
                    format!(
                        "the east-west gateway of network {network} selects no pod, so no identity to verify it \
                         by; it is not used"
                    ),
                ));
                continue;
            }
            several => {
                let names: Vec<String> = several.iter().map(ToString::to_string).collect();
                problems.push(Problem::new(
                    "MESH0113",
                    object,
                    format!(
                        "the east-west gateway of network {network} selects pods of several identities ({}); a \
                         tunnel verifies one; it is not used",
                        names.join(", ")
                    ),
                ));
                continue;
            }
        };
        found.push(NetworkGateway {
            network: network.clone(),
            cluster: origin.cluster.to_string(),
            service: format!("{ns}/{}", svc.metadata.name),
            addr: SocketAddr::new(ip, ports::INBOUND_HBONE),
            identity,
        });
    }
    (found, problems)
}

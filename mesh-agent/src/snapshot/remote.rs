//! The mesh's other clusters in a snapshot: their pods become workloads this agent may
//! dial but never captures, and their Services' endpoints join this cluster's Service
//! of the same namespace and name (Istio's namespace sameness).
//!
//! Invariants: nothing read from another cluster enrolls, captures or names a pod of
//! this node (remote workloads have no node and no UID, whatever their `nodeName`);
//! this cluster's objects win every conflict (a pod address, a Service address); a
//! remote pod on another network than this cluster's is no endpoint until an east-west
//! gateway reaches it.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;

use super::Snapshot;
use super::compile::{
    Origin, ServiceDraft, ServiceDrafts, cluster_network, other_network, selected_endpoints, slice_endpoints, workload,
};
use super::labels::namespace_modes;
use super::slice_groups::SliceGroups;
use crate::config::{Object, RemoteObjects};
use crate::state::{MeshScope, Problem, Workload};

impl Snapshot {
    /// Adds `remote`'s pods as workloads and its Services' endpoints to `drafts`.
    pub(super) fn merge_remote(&mut self, remote: &RemoteObjects, mesh: &MeshScope, drafts: &mut ServiceDrafts) {
        let namespaces = namespace_modes(&remote.objects);
        let origin = Origin { cluster: &remote.cluster, network: cluster_network(&namespaces, mesh) };
        let mut by_ip: HashMap<IpAddr, Arc<Workload>> = HashMap::new();
        let mut workloads = Vec::new();
        // Addresses of pods on another network: no Service of this cluster's reaches
        // them, by selector or by EndpointSlice.
        let mut off_network: HashSet<IpAddr> = HashSet::new();
        let mut elsewhere: Vec<(String, String)> = Vec::new();
        for o in &remote.objects {
            let Object::Pod(pod) = o else { continue };
            // A hostNetwork pod's address is its node's; a finished pod has none.
            if pod.spec.host_network || pod.is_finished() {
                continue;
            }
            let mut w = workload(pod, mesh, &namespaces, &origin);
            if let Some(network) = other_network(&w.network, mesh).filter(|n| !self.network_gateways.contains_key(*n)) {
                off_network.extend(&w.ips);
                elsewhere.push((w.key(), network.to_string()));
                continue;
            }
            // Never this node's to capture, whatever node name that cluster gave it.
            w.node = None;
            w.uid = None;
            w.dns_capture = false;
            let w = Arc::new(w);
            for ip in &w.ips {
                by_ip.entry(*ip).or_insert_with(|| w.clone());
                // This cluster's pod keeps its address.
                self.by_ip.entry(*ip).or_insert_with(|| w.clone());
            }
            workloads.push(w);
        }
        if let Some((first, network)) = elsewhere.first() {
            self.problems.push(Problem::new(
                "MESH0112",
                format!("cluster {}", remote.cluster),
                format!(
                    "{} pod(s) on another network than this cluster's {} ({first} on {network}, ...): reached only \
                     through an east-west gateway, and none is configured; no Service sends them traffic",
                    elsewhere.len(),
                    mesh.network
                ),
            ));
        }
        let cluster_reachable =
            other_network(origin.network, mesh).is_none_or(|n| self.network_gateways.contains_key(n));
        let (slices, _) = SliceGroups::of(&remote.objects, None);
        for o in &remote.objects {
            let Object::Service(svc) = o else { continue };
            let ns = svc.metadata.namespace_or_default();
            let endpoints: Vec<_> = if svc.spec.selector.is_empty() {
                let of_service = slices.get(svc.metadata.namespace_str(), &svc.metadata.name);
                let known = |ip: &IpAddr| by_ip.get(ip).cloned();
                slice_endpoints(
                    known,
                    of_service.map_or(&[][..], |s| &s[..]),
                    (&ns, &svc.metadata.name),
                    &mesh.trust_domain,
                )
                .into_iter()
                // An address no pod explains is on the cluster's network.
                .filter(|e| by_ip.contains_key(&e.ip) || (cluster_reachable && !off_network.contains(&e.ip)))
                .collect()
            } else {
                selected_endpoints(&workloads, &ns, &svc.spec.selector).collect()
            };
            match drafts.get_mut(&ns, &svc.metadata.name) {
                Some(local) => {
                    let held: HashSet<IpAddr> = local.endpoints.iter().map(|e| e.ip).collect();
                    local.endpoints.extend(endpoints.into_iter().filter(|e| !held.contains(&e.ip)));
                }
                None => {
                    // A Service only that cluster has: reached under its own addresses
                    // where no Service here holds them.
                    let mut draft = ServiceDraft::of(svc, ns, endpoints);
                    draft.vips.retain(|vip| !drafts.holds_vip(vip));
                    drafts.push(draft);
                }
            }
        }
        self.workloads.extend(workloads);
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::path::Path;

    use super::*;
    use crate::config::parse_documents;
    use crate::snapshot::Reach;

    const LOCAL: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: production, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: myapp-v1, namespace: production, labels: {app: myapp}}
spec: {serviceAccountName: myapp, nodeName: node1}
status: {podIP: 10.10.1.2}
---
apiVersion: v1
kind: Service
metadata: {name: myapp, namespace: production}
spec: {selector: {app: myapp}, clusterIP: 10.96.0.20, ports: [{port: 80, targetPort: 8080}]}
"#;

    /// Cluster2: myapp too (same name and namespace), db only there, a pod that claims
    /// this cluster's node and another that claims a local pod's address.
    const REMOTE: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: production, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: myapp-far, namespace: production, uid: far-uid, labels: {app: myapp}}
spec: {serviceAccountName: myapp, nodeName: node1}
status: {podIP: 10.20.1.2}
---
apiVersion: v1
kind: Pod
metadata: {name: db-0, namespace: production, labels: {app: db}}
spec: {serviceAccountName: db, nodeName: node1}
status: {podIP: 10.20.1.3}
---
apiVersion: v1
kind: Pod
metadata: {name: impostor, namespace: production, labels: {app: impostor}}
spec: {serviceAccountName: admin, nodeName: node9}
status: {podIP: 10.10.1.2}
---
apiVersion: v1
kind: Service
metadata: {name: myapp, namespace: production}
spec: {selector: {app: myapp}, clusterIP: 10.96.0.77, ports: [{port: 80, targetPort: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: production}
spec: {selector: {app: db}, clusterIP: 10.96.0.30, ports: [{port: 5432}]}
---
apiVersion: v1
kind: Service
metadata: {name: shadow, namespace: production}
spec: {selector: {app: db}, clusterIP: 10.96.0.20, ports: [{port: 80}]}
"#;

    fn objects(yaml: &str) -> Vec<Object> {
        parse_documents(Path::new("t.yaml"), yaml).unwrap()
    }

    fn cluster2(extra: &str) -> RemoteObjects {
        RemoteObjects { cluster: "cluster2".into(), objects: objects(&format!("{REMOTE}{extra}")) }
    }

    fn compile(remotes: &[RemoteObjects], network: &str) -> Snapshot {
        let mut mesh = MeshScope::new("cluster.local");
        mesh.cluster_id = "cluster1".into();
        mesh.network = network.into();
        Snapshot::compile_mesh(&objects(LOCAL), remotes, &mesh, 1)
    }

    fn endpoint_clusters(s: &Snapshot, service: &str) -> Vec<(String, String)> {
        s.service(service)
            .map(|svc| svc.endpoints.iter().map(|e| (e.ip.to_string(), e.workload.meta.cluster.clone())).collect())
            .unwrap_or_default()
    }

    #[test]
    fn a_service_in_both_clusters_has_the_endpoints_of_both_each_naming_its_cluster() {
        let s = compile(&[cluster2("")], "");
        assert_eq!(
            endpoint_clusters(&s, "production/myapp"),
            [("10.10.1.2".to_string(), "cluster1".to_string()), ("10.20.1.2".into(), "cluster2".into())]
        );
        // This cluster's addresses stay the Service's; the other cluster's own VIP is
        // not taken over.
        let myapp = s.service("production/myapp").unwrap();
        assert_eq!(myapp.vips, ["10.96.0.20".parse::<IpAddr>().unwrap()]);
        assert!(s.service_by_vip("10.96.0.77".parse().unwrap()).is_none());
        // The same identity across clusters that share a trust domain.
        let far = s.workload_by_ip("10.20.1.2".parse().unwrap()).unwrap();
        assert_eq!(far.identity.to_string(), "spiffe://cluster.local/ns/production/sa/myapp");
        assert!(far.enrolled, "a remote pod in the mesh is dialled over HBONE");
    }

    #[test]
    fn a_service_only_the_other_cluster_has_is_reached_at_its_address_there() {
        let s = compile(&[cluster2("")], "");
        assert_eq!(endpoint_clusters(&s, "production/db"), [("10.20.1.3".to_string(), "cluster2".to_string())]);
        assert_eq!(s.service_by_vip("10.96.0.30".parse().unwrap()).unwrap().key(), "production/db");
        let dest: SocketAddr = "10.96.0.30:5432".parse().unwrap();
        assert!(s.endpoints("production/db", None, dest.port()).iter().any(|(w, _)| w.meta.cluster == "cluster2"));
        // Its address taken by a Service here: the local Service keeps it.
        assert_eq!(s.service_by_vip("10.96.0.20".parse().unwrap()).unwrap().key(), "production/myapp");
        assert!(s.service("production/shadow").unwrap().vips.is_empty());
    }

    #[test]
    fn nothing_from_another_cluster_is_captured_here_or_takes_a_local_address() {
        let s = compile(&[cluster2("")], "");
        // The remote pods say nodeName node1: still never this node's.
        let local: Vec<&str> = s.local_enrolled("node1").map(|w| w.name.as_str()).collect();
        assert_eq!(local, ["myapp-v1"]);
        assert!(s.workloads.iter().filter(|w| w.meta.cluster == "cluster2").all(|w| w.uid.is_none()));
        // A remote pod claiming a local pod's address does not become it.
        let at = s.workload_by_ip("10.10.1.2".parse().unwrap()).unwrap();
        assert_eq!((at.name.as_str(), at.meta.cluster.as_str()), ("myapp-v1", "cluster1"));
        assert!(s.enrolled_namespaces().contains("production"));
    }

    #[test]
    fn an_endpoint_slice_naming_a_pod_on_another_network_gives_no_endpoint() {
        // Cluster2 on this network, one pod of it labelled onto network2, and a Service
        // without a selector whose slice names that pod and an address no pod has.
        let extra = r#"
---
apiVersion: v1
kind: Namespace
metadata: {name: istio-system, labels: {topology.istio.io/network: network1}}
---
apiVersion: v1
kind: Pod
metadata: {name: far-away, namespace: production, labels: {app: far, topology.istio.io/network: network2}}
spec: {nodeName: node1}
status: {podIP: 10.20.1.9}
---
apiVersion: v1
kind: Service
metadata: {name: sliced, namespace: production}
spec: {clusterIP: 10.96.0.40, ports: [{port: 80}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: sliced-a, namespace: production, labels: {kubernetes.io/service-name: sliced}}
addressType: IPv4
ports: [{port: 80}]
endpoints:
- {addresses: [10.20.1.9], targetRef: {kind: Pod, name: far-away}}
- {addresses: [10.20.7.7]}
"#;
        let s = compile(&[cluster2(extra)], "network1");
        let sliced: Vec<String> =
            s.service("production/sliced").unwrap().endpoints.iter().map(|e| e.ip.to_string()).collect();
        assert_eq!(sliced, ["10.20.7.7"], "the pod on network2 is not reached directly, even through a slice");
    }

    #[test]
    fn another_networks_pods_are_no_endpoints_and_the_snapshot_says_why() {
        let network2 = "---\napiVersion: v1\nkind: Namespace\nmetadata: {name: istio-system, labels: {topology.istio.io/network: network2}}\n";
        let s = compile(&[cluster2(network2)], "network1");
        assert_eq!(endpoint_clusters(&s, "production/myapp"), [("10.10.1.2".to_string(), "cluster1".to_string())]);
        assert!(endpoint_clusters(&s, "production/db").is_empty());
        let problem = s.problems.iter().find(|p| p.code == "MESH0112").expect("the unreachable pods are reported");
        assert!(problem.to_string().contains("network2"), "{problem}");
        // The same cluster on this network: reached directly.
        let network1 = network2.replace("network2", "network1");
        let s = compile(&[cluster2(&network1)], "network1");
        assert_eq!(endpoint_clusters(&s, "production/db"), [("10.20.1.3".to_string(), "cluster2".to_string())]);
    }

    /// Cluster2 on network2, with its east-west gateway's Service as `gateway` says.
    fn behind_a_gateway(gateway: &str) -> RemoteObjects {
        cluster2(&format!(
            r#"
---
apiVersion: v1
kind: Namespace
metadata: {{name: istio-system, labels: {{topology.istio.io/network: network2}}}}
---
apiVersion: v1
kind: Pod
metadata: {{name: eastwest-1, namespace: istio-system, labels: {{istio: eastwestgateway}}}}
spec: {{serviceAccountName: istio-eastwestgateway, nodeName: node9}}
status: {{podIP: 10.20.9.9}}
---
apiVersion: v1
kind: Service
metadata: {{name: istio-eastwestgateway, namespace: istio-system, labels: {{topology.istio.io/network: network2}}}}
{gateway}
"#
        ))
    }

    #[test]
    fn another_networks_pods_are_reached_through_its_east_west_gateway() {
        let gateway = "spec: {selector: {istio: eastwestgateway}, ports: [{name: mesh, port: 15008}]}\n\
                       status: {loadBalancer: {ingress: [{ip: 192.0.2.8}]}}";
        let s = compile(&[behind_a_gateway(gateway)], "network1");
        let gw = &s.network_gateways["network2"];
        assert_eq!(gw.addr.to_string(), "192.0.2.8:15008");
        assert_eq!(gw.identity.to_string(), "spiffe://cluster.local/ns/istio-system/sa/istio-eastwestgateway");
        assert_eq!(gw.cluster, "cluster2");
        assert_eq!(endpoint_clusters(&s, "production/db"), [("10.20.1.3".to_string(), "cluster2".to_string())]);
        let db = s.workloads.iter().find(|w| w.ips.contains(&"10.20.1.3".parse().unwrap())).unwrap();
        assert_eq!(s.reach(db), Reach::Via(gw));
        assert!(s.problems.iter().all(|p| p.code != "MESH0112"), "{:?}", s.problems);
        // A connection from db arrives from the gateway's address: its identity names it.
        let source = s.behind_gateway(&db.identity).expect("one workload runs as db's identity there");
        assert_eq!((source.workload.as_str(), source.cluster.as_str()), ("db-0", "cluster2"));
        // This cluster's own pods are reached directly.
        let local = s.workloads.iter().find(|w| w.name == "myapp-v1").unwrap();
        assert_eq!(s.reach(local), Reach::Direct);
    }

    #[test]
    fn a_gateway_without_an_address_or_one_identity_is_not_used_and_the_snapshot_says_why() {
        for (gateway, why) in [
            ("spec: {selector: {istio: eastwestgateway}, ports: [{port: 15008}]}", "no address"),
            ("spec: {selector: {istio: nothing}, ports: [{port: 15008}], externalIPs: [192.0.2.8]}", "selects no pod"),
        ] {
            let s = compile(&[behind_a_gateway(gateway)], "network1");
            assert!(s.network_gateways.is_empty(), "{why}");
            assert!(endpoint_clusters(&s, "production/db").is_empty(), "{why}: network2's pods stay unreachable");
            let problem = s.problems.iter().find(|p| p.code == "MESH0113").unwrap_or_else(|| panic!("{why}"));
            assert!(problem.to_string().contains(why), "{problem}");
        }
    }

    #[test]
    fn a_tenants_service_labelled_as_a_gateway_draws_no_traffic() {
        let tenant = "---\napiVersion: v1\nkind: Namespace\nmetadata: {name: istio-system, labels: {topology.istio.io/network: network2}}\n\
                      ---\napiVersion: v1\nkind: Service\nmetadata: {name: fake, namespace: production, labels: {topology.istio.io/network: network2}}\n\
                      spec: {selector: {app: db}, ports: [{port: 15008}], externalIPs: [192.0.2.66]}\n";
        let s = compile(&[cluster2(tenant)], "network1");
        assert!(s.network_gateways.is_empty(), "{:?}", s.network_gateways);
        let problem = s.problems.iter().find(|p| p.code == "MESH0113").expect("said");
        assert!(problem.to_string().contains("root namespace"), "{problem}");
    }

    #[test]
    fn the_digest_names_what_other_clusters_hold_and_is_unchanged_without_them() {
        let mesh = MeshScope::new("cluster.local");
        let alone = Snapshot::compile_in(&objects(LOCAL), &mesh, 1);
        let none = compile(&[], "");
        assert_eq!(alone.config_digest(), none.config_digest());
        assert_ne!(compile(&[cluster2("")], "").config_digest(), none.config_digest());
    }
}

//! What a compile takes over from the snapshot it replaces: the workload of each pod
//! object and the Service compiled from each Service object whose inputs are all the
//! same objects as before. One Service changed among 10,000 then costs one Service's
//! compile, not 10,000 (the endpoints of every Service were two thirds of a compile).
//!
//! Inputs are compared by identity: an object is the same when it is the same parsed
//! object (sources hand on the objects of unchanged files and unchanged watch entries
//! as they are). The memo holds every object it keys by, so an address it looks up is
//! never another object's. Anything that could change a kept result and is not
//! compared object by object (the mesh's settings, the namespaces' modes, the pods
//! off this cluster's network, other clusters' objects) must be equal as a whole, or
//! nothing is taken over.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;

use super::Snapshot;
use super::held::Held;
use super::labels::{NamespaceModes, selects};
use super::service_index::ServiceIndex;
use super::shards::Shards;
use super::slice_groups::{SliceGroups, SliceList};
use crate::config::resources::{Pod, Service as ServiceObject};
use crate::state::{MeshScope, Service, Workload};

/// What one compile leaves for the next (empty for a compile with other clusters'
/// objects: their endpoints are merged into this cluster's Services).
#[derive(Default)]
pub(super) struct CompileMemo {
    /// The settings and namespace modes it was compiled under.
    under: Option<(MeshScope, HashMap<String, NamespaceModes>)>,
    /// The addresses of pods on networks no gateway leads to (none of them endpoints).
    off_network: HashSet<IpAddr>,
    /// Each pod's workload, by the pod object's address.
    workloads: HashMap<usize, (Arc<Pod>, Arc<Workload>)>,
    /// Each Service, by the Service object's address, with the EndpointSlices it read:
    /// the predecessor's entries, with those recompiled replaced and those of objects
    /// gone removed, so a compile writes only what it compiled.
    services: Shards<usize, ServiceMemo>,
    /// The Service objects `services` is keyed by.
    service_objects: Held<ServiceObject>,
    /// The EndpointSlices of each Service (kept with other clusters' objects too: they
    /// are this cluster's alone).
    pub(super) slice_groups: SliceGroups,
}

impl std::fmt::Debug for CompileMemo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CompileMemo")
            .field("workloads", &self.workloads.len())
            .field("services", &self.service_objects.len())
            .finish_non_exhaustive()
    }
}

/// A Service as compiled, with the EndpointSlices it was compiled from.
#[derive(Clone)]
struct ServiceMemo {
    slices: SliceList,
    service: Arc<Service>,
}

fn address<T>(object: &Arc<T>) -> usize {
    Arc::as_ptr(object) as usize
}

impl CompileMemo {
    /// Starts a memo of a compile under `mesh` and `namespaces`: from the Services of
    /// the compile `reuse` takes over from, when there is one.
    pub(super) fn under(
        mesh: &MeshScope,
        namespaces: &HashMap<String, NamespaceModes>,
        reuse: Option<&Reuse<'_>>,
    ) -> Self {
        let (services, service_objects) = match reuse {
            Some(r) => (r.previous.memo.services.clone(), r.previous.memo.service_objects.clone()),
            None => Default::default(),
        };
        Self { under: Some((mesh.clone(), namespaces.clone())), services, service_objects, ..Self::default() }
    }

    /// Records the workload compiled from `pod`.
    pub(super) fn workload(&mut self, pod: &Arc<Pod>, workload: &Arc<Workload>) {
        if self.under.is_some() {
            self.workloads.insert(address(pod), (pod.clone(), workload.clone()));
        }
    }

    /// Records the Service compiled (again) from `object` and `slices`; returns the
    /// Service it replaces, compiled from the same object before.
    pub(super) fn service(
        &mut self,
        object: &Arc<ServiceObject>,
        slices: &SliceList,
        service: &Arc<Service>,
    ) -> Option<Arc<Service>> {
        self.under.as_ref()?;
        let memo = ServiceMemo { slices: slices.clone(), service: service.clone() };
        let key = address(object);
        self.services.shard_mut(&key).insert(key, memo).map(|was| was.service)
    }

    /// Ends the record of Services: `objects` are this compile's Service objects; the
    /// entries of any other go. Returns their Services.
    pub(super) fn services_of(&mut self, objects: Held<ServiceObject>) -> Vec<Arc<Service>> {
        if self.under.is_none() {
            return Vec::new();
        }
        let mut gone = Vec::new();
        for object in self.service_objects.difference(&objects).gone {
            let key = address(object);
            if let Some(was) = self.services.shard_mut(&key).remove(&key) {
                gone.push(was.service);
            }
        }
        self.service_objects = objects;
        gone
    }

    /// Records which addresses were off this cluster's network.
    pub(super) fn off_network(&mut self, off_network: &HashSet<IpAddr>) {
        if self.under.is_some() {
            self.off_network = off_network.clone();
        }
    }
}

/// The workloads of pods that changed: as they were and as they are.
pub(super) struct PodChanges {
    changed: Vec<Arc<Workload>>,
}

impl PodChanges {
    /// More changed pods than this and every Service with a selector is compiled again
    /// (checking each against each would cost more).
    const MOST: usize = 64;

    /// Whether no pod changed.
    fn none(&self) -> bool {
        self.changed.is_empty()
    }

    /// Whether a Service in `namespace` with `selector` may select one of them.
    fn may_select(&self, namespace: &str, selector: &BTreeMap<String, String>) -> bool {
        self.changed.iter().any(|w| selects(w, namespace, selector))
    }
}

/// The snapshot being replaced, when its results can be taken over.
pub(super) struct Reuse<'a> {
    previous: &'a Snapshot,
}

impl<'a> Reuse<'a> {
    /// `previous`, when it was compiled under the same settings and namespace modes
    /// and without other clusters' objects, as the compile starting now is.
    pub(super) fn of(
        previous: Option<&'a Snapshot>,
        mesh: &MeshScope,
        namespaces: &HashMap<String, NamespaceModes>,
        with_remotes: bool,
    ) -> Option<Self> {
        let previous = previous?;
        let (was_mesh, was_namespaces) = previous.memo.under.as_ref()?;
        (!with_remotes && was_mesh == mesh && was_namespaces == namespaces).then_some(Self { previous })
    }

    /// The workload compiled from `pod` before.
    pub(super) fn workload(&self, pod: &Arc<Pod>) -> Option<Arc<Workload>> {
        self.previous.memo.workloads.get(&address(pod)).map(|(_, w)| w.clone())
    }

    /// Whether the addresses off this cluster's network are those of before.
    pub(super) fn same_off_network(&self, off_network: &HashSet<IpAddr>) -> bool {
        *off_network == self.previous.memo.off_network
    }

    /// The pods that changed since the previous compile, when few did and the others
    /// are in the same order: `now` (the compile's workloads) with `fresh` saying which
    /// were compiled anew. None otherwise (then every Service with a selector is
    /// compiled again). None changed: the workloads are the previous compile's, in the
    /// same order, and every lookup by address finds what it found before.
    pub(super) fn workload_changes(&self, now: &[Arc<Workload>], fresh: &[bool]) -> Option<PodChanges> {
        let was = &self.previous.workloads;
        let mut changed = Vec::new();
        let mut j = 0;
        for (w, &fresh) in now.iter().zip(fresh) {
            if fresh {
                changed.push(w.clone());
            } else {
                // Taken over: it is further on in the previous list, past the ones
                // gone; not found there, the order changed.
                while !Arc::ptr_eq(was.get(j)?, w) {
                    changed.push(was[j].clone());
                    j += 1;
                }
                j += 1;
            }
            if changed.len() > PodChanges::MOST {
                return None;
            }
        }
        changed.extend(was[j..].iter().cloned());
        (changed.len() <= PodChanges::MOST).then_some(PodChanges { changed })
    }

    /// The Service compiled before from the same `object` and the same slices, when
    /// what it was compiled from is unchanged: a selector's pods when no pod that
    /// changed (as it was or as it is) is in its namespace with its labels, and the
    /// others are in the same order; the pods at a slice's addresses when each lookup
    /// finds the workload it found before. (The addresses off the network were
    /// compared before.) `slices` is the Service's slices now, or None when its group
    /// of slices is the one the previous compile had; `pods` is what
    /// [`Reuse::workload_changes`] found.
    pub(super) fn service(
        &self,
        object: &Arc<ServiceObject>,
        slices: Option<&SliceList>,
        compile: &Snapshot,
        pods: Option<&PodChanges>,
    ) -> Option<Arc<Service>> {
        let ServiceMemo { slices: was_slices, service } = self.previous.memo.services.get(&address(object))?;
        if let Some(slices) = slices
            && !(was_slices.len() == slices.len()
                && was_slices.iter().zip(slices.iter()).all(|(a, b)| Arc::ptr_eq(a, b)))
        {
            return None;
        }
        let selector = &object.spec.selector;
        let unchanged = pods.is_some_and(PodChanges::none)
            || if selector.is_empty() {
                service.endpoints.iter().all(|e| match (compile.by_ip.get(&e.ip), self.previous.by_ip.get(&e.ip)) {
                    (Some(now), Some(before)) => Arc::ptr_eq(now, before),
                    (None, None) => true,
                    _ => false,
                })
            } else {
                pods.is_some_and(|c| !c.may_select(object.metadata.namespace_str(), selector))
            };
        unchanged.then(|| service.clone())
    }

    /// The slot the Service `key` had.
    pub(super) fn slot(&self, key: &str) -> Option<usize> {
        self.previous.index.by_key(key).map(|s| s.index)
    }

    /// The previous index, patched: the `removed` Services (the previous compile's
    /// that this one does not hold) out, the `added` ones in. None when a winner needs
    /// the config order, or when so much changed (a quarter of `services`) that
    /// indexing afresh costs less.
    pub(super) fn index(
        &self,
        removed: &[Arc<Service>],
        added: &[Arc<Service>],
        services: usize,
    ) -> Option<ServiceIndex> {
        if (removed.len() + added.len()) * 4 > services {
            return None;
        }
        let mut index = (*self.previous.index).clone();
        index.patch(removed, added).ok()?;
        Some(index)
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::{Object, parse_documents};

    /// A namespace, pods `p0..pods` and Services `s0..services`: even Services select
    /// pods by label, odd ones take addresses from an EndpointSlice (a pod's address,
    /// and one outside the mesh).
    fn config(pods: usize, services: usize) -> String {
        let mut text = String::from(
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: n, labels: {istio.io/dataplane-mode: ambient}}\n---\n",
        );
        for i in 0..pods {
            text += &format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: p{i}, namespace: n, uid: u{i}, labels: {{app: a{}}}}}\n\
                 spec: {{nodeName: node1, containers: [{{name: c, ports: [{{name: http, containerPort: 8080}}]}}]}}\n\
                 status: {{phase: Running, podIP: 10.1.0.{i}, conditions: [{{type: Ready, status: \"True\"}}]}}\n---\n",
                i % 3
            );
        }
        for i in 0..services {
            if i % 2 == 0 {
                text += &format!(
                    "apiVersion: v1\nkind: Service\nmetadata: {{name: s{i}, namespace: n}}\n\
                     spec: {{clusterIP: 10.96.0.{i}, selector: {{app: a{}}}, ports: [{{name: http, port: 80, targetPort: http}}]}}\n---\n",
                    i % 3
                );
            } else {
                text += &format!(
                    "apiVersion: v1\nkind: Service\nmetadata: {{name: s{i}, namespace: n}}\n\
                     spec: {{clusterIP: 10.96.0.{i}, ports: [{{name: http, port: 80, targetPort: 8080}}]}}\n---\n\
                     apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
                     metadata: {{name: s{i}-a, namespace: n, labels: {{kubernetes.io/service-name: s{i}}}}}\n\
                     addressType: IPv4\nports: [{{name: http, port: 8080}}]\n\
                     endpoints: [{{addresses: [10.1.0.{}]}}, {{addresses: [192.0.2.{i}]}}]\n---\n",
                    i % pods.max(1)
                );
            }
        }
        text
    }

    fn parse(text: &str) -> Vec<Object> {
        parse_documents(Path::new("reuse.yaml"), text).unwrap()
    }

    /// Everything a lookup can find, with the slots left out.
    fn view(s: &Snapshot) -> String {
        let mut out = format!("{:?}\n", s.workloads);
        for svc in s.services() {
            let text = format!("{svc:?}");
            let at = text.find("index:").expect("Service names its index");
            out += &text[..at];
            for vip in &svc.vips {
                out += &format!(" vip {vip} -> {}", s.service_by_vip(*vip).unwrap().key());
            }
            out += "\n";
        }
        // Addresses and names of Services gone too: an index entry left behind shows.
        for i in (0..20).chain([99]) {
            let vip = format!("10.96.0.{i}").parse().unwrap();
            out += &format!("vip {vip} -> {:?}\n", s.service_by_vip(vip).map(|svc| svc.key()));
            out += &format!("name s{i} -> {:?}\n", s.service(&format!("n/s{i}")).map(|svc| svc.key()));
        }
        for w in &s.workloads {
            for port in [80, 8080] {
                if let Some((svc, sp)) = s.service_at(w, port) {
                    out += &format!("{}:{port} -> {} {}\n", w.name, svc.key(), sp.port);
                }
            }
        }
        out
    }

    /// `objects`, edited: each object whose key is in `by_key` replaced (or added),
    /// each in `gone` left out; the rest are the same objects.
    fn edit(objects: &[Object], by_key: &[Object], gone: &[&str]) -> Vec<Object> {
        let mut out: Vec<Object> = objects
            .iter()
            .filter(|o| !gone.contains(&o.key().2.as_str()))
            .map(|o| by_key.iter().find(|n| n.key() == o.key()).unwrap_or(o).clone())
            .collect();
        out.extend(by_key.iter().filter(|n| !objects.iter().any(|o| o.key() == n.key())).cloned());
        out
    }

    /// The base config (6 pods, 12 Services), its objects and their snapshot.
    fn first() -> (MeshScope, Vec<Object>, Snapshot) {
        let mesh = MeshScope::new("cluster.local");
        let base = parse(&config(6, 12));
        let snap = Snapshot::compile_in(&base, &mesh, 1);
        (mesh, base, snap)
    }

    /// `base` with object `name` replaced by its version in the base config's text
    /// with `from` written as `to`.
    fn edited(base: &[Object], from: &str, to: &str, name: &str) -> Vec<Object> {
        let changed = parse(&config(6, 12).replace(from, to));
        edit(base, &changed.into_iter().filter(|o| o.key().2 == name).collect::<Vec<_>>(), &[])
    }

    /// A slice of s1 named before its first (endpoints in slice-name order).
    const SECOND_SLICE: &str = "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
        metadata: {name: s1-0, namespace: n, labels: {kubernetes.io/service-name: s1}}\n\
        addressType: IPv4\nports: [{name: http, port: 8080}]\nendpoints: [{addresses: [192.0.2.200]}]\n";

    #[test]
    fn a_compile_that_takes_over_gives_what_a_fresh_compile_gives() {
        let (mesh, base, first) = first();
        let steps: Vec<(&str, Vec<Object>)> = vec![
            ("unchanged", base.clone()),
            ("one Service changed", edited(&base, "10.96.0.3,", "10.96.0.99,", "s3")),
            ("a slice's address changed", edited(&base, "addresses: [192.0.2.7]", "addresses: [192.0.2.70]", "s7-a")),
            ("a slice moved to another Service", edited(&base, "service-name: s9}", "service-name: s11}", "s9-a")),
            ("a second slice for a Service", edit(&base, &parse(SECOND_SLICE), &[])),
            ("a slice gone, its Service stays", edit(&base, &[], &["s3-a"])),
            ("one pod moved", edited(&base, "podIP: 10.1.0.1,", "podIP: 10.1.0.77,", "p1")),
            (
                "one pod relabelled",
                edited(
                    &base,
                    "name: p1, namespace: n, uid: u1, labels: {app: a1}",
                    "name: p1, namespace: n, uid: u1, labels: {app: a2}",
                    "p1",
                ),
            ),
            ("one pod gone", edit(&base, &[], &["p2"])),
            ("one pod back", base.clone()),
            ("the pods in another order", {
                let mut reordered = base.clone();
                let first_pod = reordered.iter().position(|o| o.key().2 == "p0").unwrap();
                reordered[first_pod..first_pod + 6].reverse();
                reordered
            }),
            ("a Service and its slice gone", edit(&base, &[], &["s5", "s5-a"])),
            ("Services added", edit(&base, &parse(&config(6, 16))[..], &[])),
            ("namespace relabelled", edited(&base, "dataplane-mode: ambient", "dataplane-mode: none", "n")),
        ];
        let mut previous = first;
        for (what, objects) in steps {
            let fresh = Snapshot::compile_in(&objects, &mesh, 2);
            let next = previous.compile_next(&objects, &[], &mesh, 2);
            assert_eq!(view(&next), view(&fresh), "{what}");
            let mut slots: Vec<usize> = next.services().iter().map(|s| s.index).collect();
            slots.sort_unstable();
            slots.dedup();
            assert_eq!(slots.len(), next.services().len(), "{what}: one slot per Service");
            previous = next;
        }
    }

    #[test]
    fn one_service_changed_recompiles_that_service_alone_and_slots_stay() {
        let (mesh, base, first) = first();
        let objects = edited(&base, "10.96.0.3,", "10.96.0.99,", "s3");
        let next = first.compile_next(&objects, &[], &mesh, 2);
        for (before, now) in first.services().iter().zip(next.services()) {
            assert_eq!(before.index, now.index, "{} keeps its slot", now.key());
            assert_eq!(Arc::ptr_eq(before, now), now.name != "s3", "{}: only s3 is compiled again", now.key());
        }
        assert!(first.workloads.iter().zip(&next.workloads).all(|(a, b)| Arc::ptr_eq(a, b)), "pods unchanged");
        assert_eq!(next.service_by_vip("10.96.0.99".parse().unwrap()).unwrap().name, "s3");
        assert!(next.service_by_vip("10.96.0.3".parse().unwrap()).is_none());
    }

    #[test]
    fn a_pod_changed_recompiles_the_services_it_is_an_endpoint_of() {
        let (mesh, base, first) = first();
        let objects = edited(&base, "podIP: 10.1.0.1,", "podIP: 10.1.0.77,", "p1");
        let next = first.compile_next(&objects, &[], &mesh, 2);
        for (before, now) in first.services().iter().zip(next.services()) {
            // A selector's Service when it selects the moved pod (p1 has app: a1, the
            // selector of even Services i with i % 3 == 1); a slice's Service when one
            // of its addresses was (or now is) the moved pod's.
            let i = now.name.trim_start_matches('s').parse::<usize>().unwrap();
            let touched = (i % 2 == 0 && i % 3 == 1) || before.endpoints.iter().any(|e| e.ip.to_string() == "10.1.0.1");
            assert_eq!(!Arc::ptr_eq(before, now), touched, "{}", now.key());
        }
        let s7 = next.service("n/s7").unwrap();
        assert!(s7.endpoints.iter().all(|e| !e.workload.enrolled), "10.1.0.1 is no pod now: {s7:?}");
    }

    /// Past `PodChanges::MOST` changed pods no Service is checked against each of them
    /// (the work stays bounded whatever a tenant's churn): every Service with a
    /// selector is compiled again, even one that picks none of them, and the result is
    /// still a fresh compile's.
    #[test]
    fn many_pods_changed_recompile_every_selector_service() {
        let mesh = MeshScope::new("cluster.local");
        let base = parse(&config(100, 12));
        let first = Snapshot::compile_in(&base, &mesh, 1);
        // The pods labelled a0 and a1 (67 of 100) move; those labelled a2 stay.
        let moved_all = parse(&config(100, 12).replace("podIP: 10.1.0.", "podIP: 10.2.0."));
        let a2 = |o: &Object| matches!(o, Object::Pod(p) if p.metadata.labels.get("app").is_some_and(|a| a == "a2"));
        let movers: Vec<Object> = moved_all.into_iter().filter(|o| matches!(o, Object::Pod(_)) && !a2(o)).collect();
        assert!(movers.len() > PodChanges::MOST);
        let moved = edit(&base, &movers, &[]);
        let next = first.compile_next(&moved, &[], &mesh, 2);
        assert_eq!(view(&next), view(&Snapshot::compile_in(&moved, &mesh, 2)));
        let s2 = (first.service("n/s2").unwrap(), next.service("n/s2").unwrap());
        assert!(!Arc::ptr_eq(s2.0, s2.1), "s2 selects a2, no pod of which moved: compiled again all the same");
        assert_eq!(format!("{:?}", s2.0.endpoints), format!("{:?}", s2.1.endpoints));
    }

    #[test]
    fn a_removed_services_slot_goes_to_the_next_new_service() {
        let (mesh, base, first) = first();
        let slot = first.service("n/s5").unwrap().index;
        let without = edit(&base, &[], &["s5", "s5-a"]);
        let second = first.compile_next(&without, &[], &mesh, 2);
        assert!(second.service_by_vip("10.96.0.5".parse().unwrap()).is_none(), "its address is free");
        assert!(second.service("n/s5").is_none(), "its name is free");
        let added = parse(&config(6, 13));
        let with_new = edit(&without, &added.iter().filter(|o| o.key().2 == "s12").cloned().collect::<Vec<_>>(), &[]);
        let third = second.compile_next(&with_new, &[], &mesh, 3);
        assert_eq!(third.service("n/s12").unwrap().index, slot);
        assert_eq!(third.services().iter().map(|s| s.index).max(), Some(11), "slots stay below the Services held");
    }
}

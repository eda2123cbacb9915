//! [`ServiceIndex`]: the snapshot's Services by cluster IP, by `namespace/name` and by
//! endpoint address, with how many Services claim each entry, so the compile that
//! replaces a snapshot can patch a copy of its index (drop the Services that went,
//! add the new ones) instead of indexing every Service again: 100,000 endpoint
//! addresses at 10,000 Services took half of a compile in which one Service changed.
//!
//! Where several Services claim one entry the winner is decided as a full build in
//! config order decides it: the last by order for an address or a name (the config
//! is wrong then, and an analyzer says so), the first by `namespace/name` for an
//! endpoint address. A patch that cannot know the winner without the order (a claim
//! added beside another of the same rank, or the winner of a shared entry removed)
//! gives up, and the index is built whole.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use super::shards::Shards;
use crate::state::Service;

/// One index entry: the Service that wins it, and how many claim it.
#[derive(Debug, Clone)]
pub(super) struct Claimed<V> {
    winner: V,
    claims: u32,
}

/// A patch that needs the config order to decide a winner.
#[derive(Debug)]
pub(super) struct NeedsOrder;

/// The Services by address, name and endpoint.
#[derive(Debug, Default, Clone)]
pub(super) struct ServiceIndex {
    by_vip: HashMap<IpAddr, Claimed<Arc<Service>>>,
    by_key: HashMap<String, Claimed<Arc<Service>>>,
    /// With the index of the Service's port that the endpoint address serves.
    by_endpoint: Shards<SocketAddr, Claimed<(Arc<Service>, usize)>>,
}

/// Each endpoint address of `service` once, with the index of the first port it
/// serves (two Service ports may lead to one target port).
fn endpoint_addresses(service: &Service) -> impl Iterator<Item = (SocketAddr, usize)> + '_ {
    service.endpoints.iter().flat_map(move |e| {
        let mut seen: Vec<(SocketAddr, usize)> = Vec::with_capacity(service.ports.len());
        for (i, port) in service.ports.iter().enumerate() {
            if let Some(addr) = e.addr(port)
                && !seen.iter().any(|(a, _)| *a == addr)
            {
                seen.push((addr, i));
            }
        }
        seen
    })
}

fn rank(service: &Service) -> (&str, &str) {
    (&service.namespace, &service.name)
}

impl ServiceIndex {
    /// The index of `services`, in config order.
    pub(super) fn build(services: &[Arc<Service>]) -> Self {
        let mut index = Self::default();
        for s in services {
            // Never refused: in config order every winner is known.
            let _ = index.add(s, Order::Last);
        }
        index
    }

    /// Patches in `added` and out `removed` (Services of the index's snapshot that the
    /// next one does not hold); `NeedsOrder` when a winner depends on config order.
    pub(super) fn patch(&mut self, removed: &[Arc<Service>], added: &[Arc<Service>]) -> Result<(), NeedsOrder> {
        for s in removed {
            for vip in &s.vips {
                unclaim(&mut self.by_vip, vip, |w| Arc::ptr_eq(w, s))?;
            }
            unclaim(&mut self.by_key, &s.key(), |w| Arc::ptr_eq(w, s))?;
            for (addr, _) in endpoint_addresses(s) {
                unclaim(self.by_endpoint.shard_mut(&addr), &addr, |(w, _)| Arc::ptr_eq(w, s))?;
            }
        }
        for s in added {
            self.add(s, Order::Unknown)?;
        }
        Ok(())
    }

    /// Adds `service`'s claims. Where another Service claims an entry too, the winner
    /// is the later for an address or a name (known only with `Order::Last`), and the
    /// first by `namespace/name` for an endpoint address (of two of equal rank, the
    /// earlier: again known only with `Order::Last`).
    fn add(&mut self, service: &Arc<Service>, order: Order) -> Result<(), NeedsOrder> {
        for vip in &service.vips {
            claim_last(&mut self.by_vip, *vip, service, order)?;
        }
        claim_last(&mut self.by_key, service.key(), service, order)?;
        for (addr, port) in endpoint_addresses(service) {
            let shard = self.by_endpoint.shard_mut(&addr);
            match shard.get_mut(&addr) {
                None => {
                    shard.insert(addr, Claimed { winner: (service.clone(), port), claims: 1 });
                }
                Some(c) => {
                    match (rank(service).cmp(&rank(&c.winner.0)), order) {
                        (std::cmp::Ordering::Less, _) => c.winner = (service.clone(), port),
                        (std::cmp::Ordering::Greater, _) | (std::cmp::Ordering::Equal, Order::Last) => {}
                        (std::cmp::Ordering::Equal, Order::Unknown) => return Err(NeedsOrder),
                    }
                    c.claims += 1;
                }
            }
        }
        Ok(())
    }

    /// The Service at cluster IP `ip`.
    pub(super) fn by_vip(&self, ip: &IpAddr) -> Option<&Arc<Service>> {
        self.by_vip.get(ip).map(|c| &c.winner)
    }

    /// The Service `namespace/name`.
    pub(super) fn by_key(&self, key: &str) -> Option<&Arc<Service>> {
        self.by_key.get(key).map(|c| &c.winner)
    }

    /// The Services by `namespace/name` (what routes resolve host names against).
    pub(super) fn names(&self) -> &HashMap<String, Claimed<Arc<Service>>> {
        &self.by_key
    }

    /// The first Service (by `namespace/name`) with an endpoint at `addr`, and the
    /// index of its port there.
    pub(super) fn by_endpoint(&self, addr: &SocketAddr) -> Option<&(Arc<Service>, usize)> {
        self.by_endpoint.get(addr).map(|c| &c.winner)
    }
}

/// Where a Service being added stands in config order among those indexed.
#[derive(Debug, Clone, Copy)]
enum Order {
    /// After every one of them (a full build).
    Last,
    /// Not known (a patch).
    Unknown,
}

/// Claims `key` for `service`: it wins when it comes last; with the order unknown a
/// claim beside another's cannot tell the winner.
fn claim_last<K: std::hash::Hash + Eq>(
    map: &mut HashMap<K, Claimed<Arc<Service>>>,
    key: K,
    service: &Arc<Service>,
    order: Order,
) -> Result<(), NeedsOrder> {
    match (map.entry(key), order) {
        (std::collections::hash_map::Entry::Occupied(mut c), Order::Last) => {
            let c = c.get_mut();
            c.claims += 1;
            c.winner = service.clone();
        }
        (std::collections::hash_map::Entry::Occupied(_), Order::Unknown) => return Err(NeedsOrder),
        (std::collections::hash_map::Entry::Vacant(v), _) => {
            v.insert(Claimed { winner: service.clone(), claims: 1 });
        }
    }
    Ok(())
}

/// Takes one claim off `key`; the entry goes with its last claim. Removing the
/// winner of an entry others claim too leaves a winner only the order can tell.
fn unclaim<K: std::hash::Hash + Eq, V>(
    map: &mut HashMap<K, Claimed<V>>,
    key: &K,
    is_removed: impl Fn(&V) -> bool,
) -> Result<(), NeedsOrder> {
    let Some(c) = map.get_mut(key) else { return Err(NeedsOrder) };
    match (c.claims, is_removed(&c.winner)) {
        (1, true) => {
            map.remove(key);
        }
        (1, false) => return Err(NeedsOrder),
        (_, true) => return Err(NeedsOrder),
        (_, false) => c.claims -= 1,
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::parse_documents;
    use crate::snapshot::Snapshot;

    /// Services `names` in namespace n; each lists the endpoint addresses given (port
    /// 8080), and has cluster IP 10.96.0.<i>.
    fn services(specs: &[(&str, u8, &[u8])]) -> Vec<Arc<Service>> {
        let mut text = String::new();
        for (name, vip, endpoints) in specs {
            let addrs: Vec<String> = endpoints.iter().map(|e| format!("{{addresses: [10.1.0.{e}]}}")).collect();
            text += &format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: n}}\n\
                 spec: {{clusterIP: 10.96.0.{vip}, ports: [{{name: http, port: 80, targetPort: 8080}}, {{name: alt, port: 81, targetPort: 8080}}]}}\n---\n\
                 apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
                 metadata: {{name: {name}-a, namespace: n, labels: {{kubernetes.io/service-name: {name}}}}}\n\
                 addressType: IPv4\nports: [{{name: http, port: 8080}}, {{name: alt, port: 8080}}]\nendpoints: [{}]\n---\n",
                addrs.join(", ")
            );
        }
        let objects = parse_documents(Path::new("s.yaml"), &text).unwrap();
        Snapshot::compile_in(&objects, &crate::state::MeshScope::new("cluster.local"), 1).services().to_vec()
    }

    fn view(index: &ServiceIndex) -> Vec<String> {
        let mut out: Vec<String> = index
            .by_vip
            .iter()
            .map(|(k, c)| format!("vip {k} {} {}", c.winner.key(), c.claims))
            .chain(index.by_key.iter().map(|(k, c)| format!("key {k} {} {}", c.winner.key(), c.claims)))
            .chain(
                index
                    .by_endpoint
                    .iter()
                    .map(|(k, c)| format!("ep {k} {} {} {}", c.winner.0.key(), c.winner.1, c.claims)),
            )
            .collect();
        out.sort();
        out
    }

    #[test]
    fn a_patched_index_is_the_index_built_afresh_or_says_it_needs_the_order() {
        let before = services(&[("a", 1, &[1, 2]), ("b", 2, &[2, 3]), ("c", 3, &[3, 4]), ("d", 4, &[5])]);
        let index = ServiceIndex::build(&before);
        assert!(view(&index).contains(&"ep 10.1.0.2:8080 n/a 0 2".to_string()), "{:#?}", view(&index));
        // c loses an address, d goes, e comes (sharing b's address, ranked after b).
        let after_specs: &[(&str, u8, &[u8])] = &[("a", 1, &[1, 2]), ("b", 2, &[2, 3]), ("c", 3, &[4]), ("e", 5, &[3])];
        let after = services(after_specs);
        let kept: Vec<Arc<Service>> = vec![before[0].clone(), before[1].clone(), after[2].clone(), after[3].clone()];
        let mut patched = index.clone();
        patched.patch(&before[2..4], &kept[2..4]).unwrap();
        assert_eq!(view(&patched), view(&ServiceIndex::build(&kept)));
        // Removing a, the winner of 10.1.0.2 that b claims too: only the order can say
        // who wins now (a rank tells here, but a tie of names would not).
        let mut patched = index.clone();
        assert!(patched.patch(&before[..1], &[]).is_err());
        // A second Service at one cluster IP: the later in config order wins.
        let clash = services(&[("z", 1, &[9])]);
        let mut patched = index.clone();
        assert!(patched.patch(&[], &clash[..1]).is_err());
    }
}

//! [`SliceGroups`]: the IP EndpointSlices of each Service, `(namespace, service)`, kept
//! from one compile to the next and patched with the slices that came and went.
//!
//! Grouping 10,000 slices afresh (each one's namespace and service label read and
//! hashed) was the largest part of a compile in which one Service changed. The slices
//! a compile holds are compared with its predecessor's by address alone, which reads
//! only the config's list, not the slices; the groups of the slices that differ are
//! patched, and the compile learns which groups changed, so a Service whose group did
//! not change takes over its slice list without looking it up. The groups hold every
//! slice they compared by address: an address is never another slice's.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use super::held::Held;
use super::shards::Shards;
use crate::config::Object;
use crate::config::resources::EndpointSlice;

/// The EndpointSlices one Service reads, in slice-name order.
pub(super) type SliceList = Arc<[Arc<EndpointSlice>]>;

/// A Service's group: `(namespace, service name)`.
type GroupKey = (String, String);

/// The slices of every Service.
#[derive(Debug, Clone, Default)]
pub(super) struct SliceGroups {
    /// Every EndpointSlice of the config.
    held: Held<EndpointSlice>,
    groups: Shards<GroupKey, SliceList>,
}

/// Which groups differ from the predecessor's.
#[derive(Debug)]
pub(super) enum Changed {
    /// Any of them (grouped afresh).
    All,
    /// These only.
    Groups(HashSet<GroupKey>),
}

impl Changed {
    /// Whether the group of Service `name` in `namespace` may differ.
    pub(super) fn touches(&self, namespace: &str, name: &str) -> bool {
        match self {
            Changed::All => true,
            // Empty after a change to anything but slices: no key built.
            Changed::Groups(keys) => !keys.is_empty() && keys.contains(&(namespace.to_string(), name.to_string())),
        }
    }
}

/// The group a slice belongs to; None for a slice no Service reads (FQDN slices: the
/// agent resolves no names; a slice without the service label).
fn group_of(slice: &EndpointSlice) -> Option<GroupKey> {
    if slice.address_type == "FQDN" {
        return None;
    }
    Some((slice.metadata.namespace_str().to_string(), slice.service()?.to_string()))
}

/// Slice-name order; a tie (never in a config the sources accept) by address, so a
/// patched list and one built afresh agree.
fn sort(slices: &mut [Arc<EndpointSlice>]) {
    slices.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name).then(Arc::as_ptr(a).cmp(&Arc::as_ptr(b))));
}

impl SliceGroups {
    /// The groups of `objects`' EndpointSlices, patched from `previous` (the groups of
    /// the compile being replaced) where few slices changed.
    pub(super) fn of(objects: &[Object], previous: Option<&SliceGroups>) -> (Self, Changed) {
        let held = Held::of(objects.iter().filter_map(|o| match o {
            Object::EndpointSlice(s) => Some(s),
            _ => None,
        }));
        if let Some(previous) = previous
            && let Some((groups, changed)) = previous.patched(&held)
        {
            return (Self { held, groups }, Changed::Groups(changed));
        }
        let mut groups: HashMap<GroupKey, Vec<Arc<EndpointSlice>>> = HashMap::new();
        for slice in held.iter() {
            if let Some(key) = group_of(slice) {
                groups.entry(key).or_default().push(slice.clone());
            }
        }
        let groups = groups
            .into_iter()
            .map(|(key, mut slices)| {
                sort(&mut slices);
                (key, SliceList::from(slices))
            })
            .collect();
        (Self { held, groups }, Changed::All)
    }

    /// These groups, with the slices `held` does not hold out and the new ones in; None
    /// when so many changed (a quarter) that grouping afresh costs less.
    fn patched(&self, held: &Held<EndpointSlice>) -> Option<(Shards<GroupKey, SliceList>, HashSet<GroupKey>)> {
        let difference = self.held.difference(held);
        let (gone, came) = (difference.gone, difference.came);
        if (gone.len() + came.len()) * 4 > held.len().max(16) {
            return None;
        }
        let mut groups = self.groups.clone();
        let mut changed = HashSet::new();
        for slice in gone {
            let Some(key) = group_of(slice) else { continue };
            let shard = groups.shard_mut(&key);
            if let Some(list) = shard.get(&key) {
                let rest: Vec<Arc<EndpointSlice>> = list.iter().filter(|s| !Arc::ptr_eq(s, slice)).cloned().collect();
                if rest.is_empty() {
                    shard.remove(&key);
                } else {
                    shard.insert(key.clone(), rest.into());
                }
            }
            changed.insert(key);
        }
        for slice in came {
            let Some(key) = group_of(slice) else { continue };
            let shard = groups.shard_mut(&key);
            let mut list: Vec<Arc<EndpointSlice>> = shard.get(&key).map(|l| l.to_vec()).unwrap_or_default();
            list.push(slice.clone());
            sort(&mut list);
            shard.insert(key.clone(), list.into());
            changed.insert(key);
        }
        Some((groups, changed))
    }

    /// The slices of Service `name` in `namespace`.
    pub(super) fn get(&self, namespace: &str, name: &str) -> Option<&SliceList> {
        self.groups.get(&(namespace.to_string(), name.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::parse_documents;

    fn slice(name: &str, service: &str, address: &str) -> Object {
        let text = format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata: {{name: {name}, namespace: n, labels: {{kubernetes.io/service-name: {service}}}}}\n\
             addressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints: [{{addresses: [{address}]}}]\n"
        );
        parse_documents(Path::new("s.yaml"), &text).unwrap().remove(0)
    }

    fn view(groups: &SliceGroups) -> Vec<(GroupKey, Vec<usize>)> {
        let mut out: Vec<_> = groups
            .groups
            .iter()
            .map(|(k, l)| (k.clone(), l.iter().map(|s| Arc::as_ptr(s) as usize).collect()))
            .collect();
        out.sort();
        out
    }

    /// Slices coming, going and moving between Services: the patched groups are those
    /// grouped afresh, and only the groups that changed are named.
    #[test]
    fn patched_groups_are_those_grouped_afresh_and_name_what_changed() {
        let many: Vec<Object> = (0..40).map(|i| slice(&format!("s{i}"), &format!("svc{i}"), "10.0.0.1")).collect();
        let (first, changed) = SliceGroups::of(&many, None);
        assert!(matches!(changed, Changed::All));
        // s3 goes; svc5 gets a second slice (named before its first: order by name);
        // a slice of svc7 is replaced by a new version.
        let mut next: Vec<Object> = many.clone();
        next.remove(3);
        next.push(slice("a-svc5", "svc5", "10.0.0.2"));
        next[6] = slice("s7", "svc7", "10.0.0.3");
        let (patched, changed) = SliceGroups::of(&next, Some(&first));
        let Changed::Groups(keys) = &changed else { panic!("a few slices changed: patched") };
        let mut keys: Vec<_> = keys.iter().map(|(_, s)| s.clone()).collect();
        keys.sort();
        assert_eq!(keys, ["svc3", "svc5", "svc7"]);
        let (afresh, _) = SliceGroups::of(&next, None);
        assert_eq!(view(&patched), view(&afresh));
        let svc5: Vec<&str> = patched.get("n", "svc5").unwrap().iter().map(|s| s.metadata.name.as_str()).collect();
        assert_eq!(svc5, ["a-svc5", "s5"]);
        assert!(patched.get("n", "svc3").is_none());
        assert!(changed.touches("n", "svc5") && !changed.touches("n", "svc6"));
        // Nothing changed: nothing touched.
        let (same, changed) = SliceGroups::of(&next, Some(&patched));
        assert!(!changed.touches("n", "svc5"));
        assert_eq!(view(&same), view(&patched));
        // Most changed: grouped afresh.
        let others: Vec<Object> = (0..40).map(|i| slice(&format!("s{i}"), &format!("svc{i}"), "10.0.0.9")).collect();
        assert!(matches!(SliceGroups::of(&others, Some(&same)).1, Changed::All));
    }
}

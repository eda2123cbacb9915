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

/// Service names by namespace: the groups a patch changed.
type ChangedNames = HashMap<String, HashSet<String>>;

/// The slices of one group that went and that came.
type GroupEdit<'a> = (Vec<&'a Arc<EndpointSlice>>, Vec<&'a Arc<EndpointSlice>>);

/// Which groups differ from the predecessor's.
#[derive(Debug)]
pub(super) enum Changed {
    /// Any of them (grouped afresh).
    All,
    /// These only: Service names by namespace (looked up without building a key).
    Groups(ChangedNames),
}

impl Changed {
    /// Whether the group of Service `name` in `namespace` may differ.
    pub(super) fn touches(&self, namespace: &str, name: &str) -> bool {
        match self {
            Changed::All => true,
            Changed::Groups(names) => names.get(namespace).is_some_and(|n| n.contains(name)),
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
    fn patched(&self, held: &Held<EndpointSlice>) -> Option<(Shards<GroupKey, SliceList>, ChangedNames)> {
        let difference = self.held.difference(held);
        let (gone, came) = (difference.gone, difference.came);
        if (gone.len() + came.len()) * 4 > held.len().max(16) {
            return None;
        }
        // Each changed group rebuilt once, however many of its slices changed: one by
        // one, thousands of slices of one Service arriving together would copy its
        // list thousands of times.
        let mut edits: HashMap<GroupKey, GroupEdit<'_>> = HashMap::new();
        for slice in gone {
            if let Some(key) = group_of(slice) {
                edits.entry(key).or_default().0.push(slice);
            }
        }
        for slice in came {
            if let Some(key) = group_of(slice) {
                edits.entry(key).or_default().1.push(slice);
            }
        }
        let mut groups = self.groups.clone();
        let mut changed = ChangedNames::new();
        for (key, (gone, came)) in edits {
            let gone: HashSet<usize> = gone.iter().map(|s| Arc::as_ptr(s) as usize).collect();
            let shard = groups.shard_mut(&key);
            let mut list: Vec<Arc<EndpointSlice>> = shard
                .get(&key)
                .map(|l| l.iter().filter(|s| !gone.contains(&(Arc::as_ptr(s) as usize))).cloned().collect())
                .unwrap_or_default();
            list.extend(came.into_iter().cloned());
            if list.is_empty() {
                shard.remove(&key);
            } else {
                sort(&mut list);
                shard.insert(key.clone(), list.into());
            }
            let (namespace, name) = key;
            changed.entry(namespace).or_default().insert(name);
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
        let mut keys: Vec<_> = keys.values().flatten().cloned().collect();
        keys.sort();
        assert_eq!(keys, ["svc3", "svc5", "svc7"]);
        let (afresh, _) = SliceGroups::of(&next, None);
        assert_eq!(view(&patched), view(&afresh));
        let svc5: Vec<&str> = patched.get("n", "svc5").unwrap().iter().map(|s| s.metadata.name.as_str()).collect();
        assert_eq!(svc5, ["a-svc5", "s5"]);
        assert!(patched.get("n", "svc3").is_none());
        assert!(changed.touches("n", "svc5") && !changed.touches("n", "svc6"));
        // Several slices of one Service arriving together, one going: its list is
        // rebuilt once, in name order.
        let mut more = next.clone();
        more.retain(|o| o.key().2 != "s9");
        more.extend((0..5).rev().map(|i| slice(&format!("s9-{i}"), "svc9", "10.0.0.4")));
        let (grown, _) = SliceGroups::of(&more, Some(&patched));
        assert_eq!(view(&grown), view(&SliceGroups::of(&more, None).0));
        let svc9: Vec<&str> = grown.get("n", "svc9").unwrap().iter().map(|s| s.metadata.name.as_str()).collect();
        assert_eq!(svc9, ["s9-0", "s9-1", "s9-2", "s9-3", "s9-4"]);
        // Nothing changed: nothing touched.
        let (same, changed) = SliceGroups::of(&next, Some(&patched));
        assert!(!changed.touches("n", "svc5"));
        assert_eq!(view(&same), view(&patched));
        // Most changed: grouped afresh.
        let others: Vec<Object> = (0..40).map(|i| slice(&format!("s{i}"), &format!("svc{i}"), "10.0.0.9")).collect();
        assert!(matches!(SliceGroups::of(&others, Some(&same)).1, Changed::All));
    }
}

//! Checks across objects that each parse fine alone: a VirtualService route to a
//! DestinationRule subset that no rule defines for that host.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use super::hosts::{service_for_host, services_for_host};
use super::istio::{Destination, VirtualService};
use super::{Error, Object};

/// Routes (and mirrors) to subsets no DestinationRule defines, for hosts that name a
/// known Service. Each error names the VirtualService's file, the object and the field.
pub(super) fn undefined_subsets<'a>(objects: impl Iterator<Item = (&'a Path, &'a Object)> + Clone) -> Vec<Error> {
    // Most configs route to no subset at all: then there is nothing to look up, and no
    // index of every Service to build at each change.
    if !objects.clone().any(|(_, o)| matches!(o, Object::VirtualService(vs) if routes_to_a_subset(vs))) {
        return Vec::new();
    }
    let known: HashMap<String, ()> = objects
        .clone()
        .filter_map(|(_, o)| match o {
            Object::Service(s) => Some((s.metadata.key(), ())),
            _ => None,
        })
        .collect();
    let mut subsets: HashSet<(String, String)> = HashSet::new();
    for (_, o) in objects.clone() {
        if let Object::DestinationRule(dr) = o {
            let ns = dr.metadata.namespace_or_default();
            for svc in services_for_host(&dr.spec.host, &ns, &known) {
                subsets.extend(dr.spec.subsets.iter().map(|s| (svc.clone(), s.name.clone())));
            }
        }
    }
    let mut errors = Vec::new();
    for (file, o) in objects {
        let Object::VirtualService(vs) = o else { continue };
        let ns = vs.metadata.namespace_or_default();
        let mut check = |field: String, d: &Destination| {
            let Some(subset) = &d.subset else { return };
            let Some(svc) = service_for_host(&d.host, &ns, &known) else { return };
            if !subsets.contains(&(svc.clone(), subset.clone())) {
                errors.push(Error {
                    file: file.to_owned(),
                    object: Some(format!("VirtualService {ns}/{}", vs.metadata.name)),
                    field: Some(field),
                    reason: format!(
                        "subset {subset:?} is not defined by any DestinationRule for host {} ({svc})",
                        d.host
                    ),
                });
            }
        };
        for (i, r) in vs.spec.tcp.iter().enumerate() {
            for (k, d) in r.route.iter().enumerate() {
                check(format!("spec.tcp[{i}].route[{k}].destination.subset"), &d.destination);
            }
        }
        for (i, r) in vs.spec.http.iter().enumerate() {
            for (k, d) in r.route.iter().enumerate() {
                check(format!("spec.http[{i}].route[{k}].destination.subset"), &d.destination);
            }
            if let Some(m) = &r.mirror {
                check(format!("spec.http[{i}].mirror.subset"), m);
            }
            for (k, m) in r.mirrors.iter().enumerate() {
                check(format!("spec.http[{i}].mirrors[{k}].destination.subset"), &m.destination);
            }
        }
    }
    errors
}

/// Whether any route or mirror of `vs` names a subset.
fn routes_to_a_subset(vs: &VirtualService) -> bool {
    vs.spec.tcp.iter().flat_map(|r| &r.route).any(|d| d.destination.subset.is_some())
        || vs.spec.http.iter().any(|r| {
            r.route.iter().any(|d| d.destination.subset.is_some())
                || r.mirror.as_ref().is_some_and(|m| m.subset.is_some())
                || r.mirrors.iter().any(|m| m.destination.subset.is_some())
        })
}

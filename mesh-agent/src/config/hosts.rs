//! Host names in Istio objects resolved to Services, as Istio does for mesh traffic.

use std::collections::HashMap;

/// Resolves a host as Istio does for mesh traffic: a short name is a Service in
/// `namespace`; `name.ns`, `name.ns.svc` and `name.ns.svc.<domain>` name a Service in
/// `ns`. Returns `namespace/name` when it names a known Service (a key of `known`).
pub fn service_for_host<V>(host: &str, namespace: &str, known: &HashMap<String, V>) -> Option<String> {
    let parts: Vec<&str> = host.split('.').collect();
    let key = match parts.as_slice() {
        [name] => format!("{namespace}/{name}"),
        [name, ns] | [name, ns, "svc"] => format!("{ns}/{name}"),
        [name, ns, "svc", ..] => format!("{ns}/{name}"),
        _ => return None,
    };
    known.contains_key(&key).then_some(key)
}

/// Services a (possibly wildcard) VirtualService host covers.
pub fn services_for_host<V>(host: &str, namespace: &str, known: &HashMap<String, V>) -> Vec<String> {
    if let Some(suffix) = host.strip_prefix('*') {
        // `*` alone, or `*.ns.svc.cluster.local`: every Service whose FQDN ends so.
        let mut out: Vec<String> = known
            .keys()
            .filter(|k| {
                let (ns, name) = k.split_once('/').unwrap_or(("", k));
                format!("{name}.{ns}.svc.cluster.local").ends_with(suffix)
            })
            .cloned()
            .collect();
        out.sort();
        return out;
    }
    service_for_host(host, namespace, known).into_iter().collect()
}

//! What `istioctl analyze` says of Gateways and the VirtualServices bound to them:
//! references to gateways that do not exist (IST0101), bindings whose hosts no server
//! of the gateway serves (IST0132), two gateways claiming one host on one port of the
//! same workloads (IST0145), and gateways no workload serves.

use std::collections::BTreeMap;

use super::{Diagnostic, Level};
use crate::config::Object;
use crate::config::gateway::{Gateway, MESH, gateway_key};
use crate::config::istio::VirtualService;
use crate::snapshot::Snapshot;

/// Every finding about gateways in `objects`.
pub(super) fn analyze(objects: &[Object], snap: &Snapshot) -> Vec<Diagnostic> {
    let gateways: BTreeMap<String, &Gateway> = objects
        .iter()
        .filter_map(|o| match o {
            Object::Gateway(g) => Some((g.metadata.key(), &**g)),
            _ => None,
        })
        .collect();
    let mut out = Vec::new();
    for o in objects {
        if let Object::VirtualService(vs) = o {
            out.extend(bindings(vs, &gateways));
            out.extend(ports_to_name(vs, snap));
        }
    }
    out.extend(conflicting_servers(&gateways));
    if !snap.workloads.is_empty() {
        out.extend(gateways.iter().filter_map(|(key, gw)| served_by_nothing(key, gw, snap)));
    }
    // Secrets are checked where the input has some (a cluster, or the lab's files).
    if objects.iter().any(|o| matches!(o, Object::Secret(_))) {
        out.extend(gateways.iter().flat_map(|(key, gw)| missing_credentials(key, gw, objects, snap)));
    }
    out
}

/// A server's `credentialName` must name a Secret in the namespace of each gateway
/// workload that serves it (where Istio, and the mesh's gateways, read it).
fn missing_credentials(key: &str, gw: &Gateway, objects: &[Object], snap: &Snapshot) -> Vec<Diagnostic> {
    let exists = |ns: &str, name: &str| {
        objects.iter().any(
            |o| matches!(o, Object::Secret(s) if s.metadata.namespace_or_default() == ns && s.metadata.name == name),
        )
    };
    let mut namespaces: Vec<&str> = snap
        .workloads
        .iter()
        .filter(|w| gw.spec.selector.iter().all(|(k, v)| w.labels.get(k) == Some(v)))
        .map(|w| w.namespace.as_str())
        .collect();
    namespaces.sort();
    namespaces.dedup();
    let mut out = Vec::new();
    for (i, server) in gw.spec.servers.iter().enumerate() {
        let Some(tls) = &server.tls else { continue };
        for name in tls.credential_name.iter().chain(&tls.credential_names) {
            for ns in namespaces.iter().filter(|ns| !exists(ns, name)) {
                out.push(Diagnostic {
                    level: Level::Error,
                    code: "IST0101",
                    object: format!("Gateway {key}"),
                    message: format!(
                        "referenced credentialName not found: Secret {ns}/{name} (spec.servers[{i}].tls); the \
                         gateway in {ns} cannot serve this server until it exists"
                    ),
                });
            }
        }
    }
    out
}

/// Every `gateways:` entry of a VirtualService, with the field it is written in.
fn references(vs: &VirtualService) -> Vec<(String, &str)> {
    let top = vs.spec.gateways.iter().enumerate().map(|(i, g)| (format!("spec.gateways[{i}]"), g.as_str()));
    let http = vs.spec.http.iter().map(|r| r.matches.iter().map(|m| m.gateways.as_slice()).collect());
    let tcp = vs.spec.tcp.iter().map(|r| r.matches.iter().map(|m| m.gateways.as_slice()).collect());
    top.chain(match_references("http", http.collect())).chain(match_references("tcp", tcp.collect())).collect()
}

/// The match-level `gateways:` of one section's rules (per rule, per match).
fn match_references<'a>(
    section: &'static str,
    rules: Vec<Vec<&'a [String]>>,
) -> impl Iterator<Item = (String, &'a str)> {
    rules.into_iter().enumerate().flat_map(move |(i, matches)| {
        matches.into_iter().enumerate().flat_map(move |(j, gateways)| {
            let at = format!("spec.{section}[{i}].match[{j}].gateways");
            gateways.iter().enumerate().map(move |(k, g)| (format!("{at}[{k}]"), g.as_str()))
        })
    })
}

fn bindings(vs: &VirtualService, gateways: &BTreeMap<String, &Gateway>) -> Vec<Diagnostic> {
    let ns = vs.metadata.namespace_or_default();
    let object = format!("VirtualService {}", vs.metadata.key());
    let mut out = Vec::new();
    let mut seen = Vec::new();
    for (field, reference) in references(vs) {
        let key = gateway_key(reference, &ns);
        if key == MESH || seen.contains(&key) {
            continue;
        }
        seen.push(key.clone());
        let Some(gw) = gateways.get(&key) else {
            out.push(Diagnostic {
                level: Level::Error,
                code: "IST0101",
                object: object.clone(),
                message: format!("referenced gateway not found: {key} ({field}); rules bound to it serve nowhere"),
            });
            continue;
        };
        let gw_ns = gw.metadata.namespace_or_default();
        let served = gw.spec.servers.iter().flat_map(|s| &s.hosts).any(|h| {
            let (host_ns, host) = h.split_once('/').unwrap_or(("*", h));
            let visible = host_ns == "*" || host_ns == ns || (host_ns == "." && gw_ns == ns);
            visible && vs.spec.hosts.iter().any(|v| hosts_overlap(host, v))
        });
        if !served {
            out.push(Diagnostic {
                level: Level::Warning,
                code: "IST0132",
                object: object.clone(),
                message: format!(
                    "one or more host [{}] defined in VirtualService {} not found in Gateway {key}; add the host \
                     to a server of the gateway or drop the binding",
                    vs.spec.hosts.join(", "),
                    vs.metadata.key()
                ),
            });
        }
    }
    out
}

/// IST0112: at a gateway a destination needs a port when its Service has several and
/// not exactly one of them is HTTP (the gateway cannot tell which is meant).
fn ports_to_name(vs: &VirtualService, snap: &Snapshot) -> Vec<Diagnostic> {
    let ns = vs.metadata.namespace_or_default();
    let gateway_only = !vs.spec.gateways.is_empty() && !vs.spec.gateways.iter().any(|g| g == MESH);
    if !gateway_only {
        return Vec::new();
    }
    let known: std::collections::HashMap<String, ()> = snap.services().iter().map(|s| (s.key(), ())).collect();
    let mut out = Vec::new();
    for (i, r) in vs.spec.http.iter().enumerate() {
        for (k, d) in r.route.iter().enumerate().filter(|(_, d)| d.destination.port.is_none()) {
            let Some(key) = crate::config::hosts::service_for_host(&d.destination.host, &ns, &known) else { continue };
            let Some(svc) = snap.services().iter().find(|s| s.key() == key) else { continue };
            let http = svc
                .ports
                .iter()
                .filter(|p| {
                    p.name.as_deref().is_some_and(|n| matches!(n.split('-').next(), Some("http" | "http2" | "grpc")))
                })
                .count();
            if svc.ports.len() > 1 && http != 1 {
                out.push(Diagnostic {
                    level: Level::Warning,
                    code: "IST0112",
                    object: format!("VirtualService {}", vs.metadata.key()),
                    message: format!(
                        "spec.http[{i}].route[{k}].destination: {key} has {} ports; name one with port.number",
                        svc.ports.len()
                    ),
                });
            }
        }
    }
    out
}

/// Whether two host patterns (`*`, `*.suffix`, or a name) can name the same host.
fn hosts_overlap(a: &str, b: &str) -> bool {
    let (a, b) = (a.to_ascii_lowercase(), b.to_ascii_lowercase());
    let covers = |wild: &str, other: &str| match wild.strip_prefix('*') {
        Some("") => true,
        Some(suffix) => other.ends_with(suffix),
        None => false,
    };
    a == b || covers(&a, &b) || covers(&b, &a)
}

/// IST0145: two gateways for the same workloads serving one host on one port.
fn conflicting_servers(gateways: &BTreeMap<String, &Gateway>) -> Vec<Diagnostic> {
    let mut out = Vec::new();
    let list: Vec<(&String, &&Gateway)> = gateways.iter().collect();
    for (i, (a_key, a)) in list.iter().enumerate() {
        for (b_key, b) in &list[i + 1..] {
            if a.spec.selector != b.spec.selector {
                continue;
            }
            for sa in &a.spec.servers {
                for sb in &b.spec.servers {
                    let (Some(pa), Some(pb)) = (&sa.port, &sb.port) else { continue };
                    if pa.number != pb.number {
                        continue;
                    }
                    let bare = |h: &String| h.split_once('/').map_or(h.clone(), |(_, h)| h.to_string());
                    let Some(host) = sa.hosts.iter().map(bare).find(|h| sb.hosts.iter().map(bare).any(|o| o == *h))
                    else {
                        continue;
                    };
                    out.push(Diagnostic {
                        level: Level::Error,
                        code: "IST0145",
                        object: format!("Gateway {a_key}"),
                        message: format!(
                            "conflict with gateway {b_key}: both serve host {host} on port {} of the same workloads; \
                             merge the servers or give one a different port",
                            pa.number
                        ),
                    });
                }
            }
        }
    }
    out
}

/// A Gateway whose selector picks no workload serves nothing.
fn served_by_nothing(key: &str, gw: &Gateway, snap: &Snapshot) -> Option<Diagnostic> {
    let selected = snap.workloads.iter().any(|w| gw.spec.selector.iter().all(|(k, v)| w.labels.get(k) == Some(v)));
    if selected {
        return None;
    }
    let labels: Vec<String> = gw.spec.selector.iter().map(|(k, v)| format!("{k}={v}")).collect();
    Some(Diagnostic {
        level: Level::Warning,
        code: "IST0101",
        object: format!("Gateway {key}"),
        message: format!(
            "referenced selector not found: {}; no gateway workload serves this Gateway yet (install a gateway \
             with those labels)",
            labels.join(",")
        ),
    })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::parse_documents;
    use crate::state::MeshScope;

    const GW: &str = "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: edge, namespace: production}\n\
        spec:\n  selector: {istio: ingressgateway}\n  servers:\n  - port: {number: 443, name: https, protocol: HTTPS}\n    \
        hosts: [\"*.example.com\"]\n    tls: {mode: SIMPLE, credentialName: edge-cert}\n";

    fn findings(extra: &str) -> Vec<Diagnostic> {
        let objects = parse_documents(Path::new("gw.yaml"), &format!("{GW}---\n{extra}")).unwrap();
        let snap = Snapshot::compile_in(&objects, &MeshScope::new("cluster.local"), 1);
        analyze(&objects, &snap)
    }

    fn vs(hosts: &str, gateways: &str) -> String {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: web, namespace: production}}\n\
             spec:\n  hosts: {hosts}\n  gateways: {gateways}\n  http: [{{route: [{{destination: {{host: web}}}}]}}]\n"
        )
    }

    #[test]
    fn a_binding_to_a_gateway_that_serves_the_host_is_quiet() {
        assert_eq!(findings(&vs("[shop.example.com]", "[mesh, edge]")), vec![]);
        assert_eq!(findings(&vs("[shop.example.com]", "[production/edge]")), vec![]);
    }

    #[test]
    fn a_missing_gateway_and_a_host_the_gateway_does_not_serve_are_reported() {
        let found = findings(&vs("[shop.example.com]", "[edgee]"));
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!((found[0].code, found[0].level), ("IST0101", Level::Error));
        assert!(found[0].message.contains("production/edgee (spec.gateways[0])"), "{}", found[0].message);
        let found = findings(&vs("[shop.example.org]", "[edge]"));
        assert_eq!(found.iter().map(|d| d.code).collect::<Vec<_>>(), ["IST0132"], "{found:?}");
    }

    #[test]
    fn a_gateway_route_to_a_service_with_several_ports_needs_one_named() {
        let svc = |ports: &str| {
            format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: production}}\n\
                 spec: {{selector: {{app: web}}, clusterIP: 10.96.0.9, ports: {ports}}}\n---\n"
            )
        };
        let vs = vs("[shop.example.com]", "[edge]");
        let two_tcp = svc("[{name: tcp-a, port: 1}, {name: tcp-b, port: 2}]");
        let found = findings(&format!("{two_tcp}{vs}"));
        assert_eq!(found.iter().map(|d| d.code).collect::<Vec<_>>(), ["IST0112"], "{found:?}");
        let one_http = svc("[{name: http, port: 80}, {name: tcp-echo, port: 9000}]");
        assert_eq!(findings(&format!("{one_http}{vs}")), vec![], "the only HTTP port is the one");
    }

    #[test]
    fn two_gateways_claiming_one_host_and_port_conflict() {
        let other = GW.replace("name: edge,", "name: edge-2,").replace("*.example.com", "production/*.example.com");
        let found = findings(&other);
        assert_eq!(found.iter().map(|d| d.code).collect::<Vec<_>>(), ["IST0145"], "{found:?}");
    }

    #[test]
    fn a_credential_name_without_its_secret_is_reported_where_secrets_are_known() {
        let pod = "apiVersion: v1\nkind: Pod\nmetadata: {name: gw, namespace: istio-ingress, labels: {istio: ingressgateway}}\n\
            spec: {nodeName: node1}\nstatus: {podIP: 10.10.1.100}\n";
        let other = "---\napiVersion: v1\nkind: Secret\nmetadata: {name: unrelated, namespace: istio-ingress}\n\
            stringData: {a: b}\n";
        let found = findings(&format!("{pod}{other}"));
        assert_eq!(found.iter().map(|d| d.code).collect::<Vec<_>>(), ["IST0101"], "{found:?}");
        assert!(found[0].message.contains("Secret istio-ingress/edge-cert"), "{}", found[0].message);
        let right = other.replace("unrelated", "edge-cert");
        assert_eq!(findings(&format!("{pod}{right}")), vec![]);
    }

    #[test]
    fn a_gateway_no_workload_serves_is_reported_when_workloads_are_known() {
        let pod = "apiVersion: v1\nkind: Pod\nmetadata: {name: web, namespace: production, labels: {app: web}}\n\
            spec: {nodeName: node1}\nstatus: {podIP: 10.10.1.2}\n";
        let found = findings(pod);
        assert_eq!(found.iter().map(|d| (d.code, d.level)).collect::<Vec<_>>(), [("IST0101", Level::Warning)]);
        assert!(found[0].message.contains("istio=ingressgateway"), "{}", found[0].message);
        let gateway_pod = pod.replace("app: web", "istio: ingressgateway");
        assert_eq!(findings(&gateway_pod), vec![]);
    }
}

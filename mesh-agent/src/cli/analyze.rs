//! `meshctl analyze -f FILES` (or `--cluster`): the validation the agent runs on each file, then the
//! checks across objects that no single file shows (routes to subsets nobody defines,
//! conflicting VirtualServices, policies selecting no workload), reported the way
//! `istioctl analyze` reports them: a level, a code, the object, and what to do.

use std::fmt;
use std::path::{Path, PathBuf};

use crate::config::{Object, parse_documents};

mod gateways;
use crate::snapshot::Snapshot;
use crate::state::MeshScope;

/// How serious a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// The config does not do what it says (or is refused).
    Error,
    /// It works, but probably not as meant.
    Warning,
    /// Worth knowing.
    Info,
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Level::Error => "Error",
            Level::Warning => "Warning",
            Level::Info => "Info",
        })
    }
}

/// One finding.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Diagnostic {
    /// Severity.
    pub level: Level,
    /// `IST0101`-style code.
    pub code: &'static str,
    /// `Kind namespace/name`, or the file when the object could not be read.
    pub object: String,
    /// What is wrong, and the fix.
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} [{}] ({}) {}", self.level, self.code, self.object, self.message)
    }
}

/// Files named by `-f`: files as given, directories by their `.yaml`/`.yml`/`.json`
/// files (sorted).
pub fn expand(inputs: &[PathBuf]) -> Result<Vec<PathBuf>, String> {
    let mut files = Vec::new();
    for input in inputs {
        if input.is_dir() {
            let mut found: Vec<PathBuf> = std::fs::read_dir(input)
                .map_err(|e| format!("{}: {e}", input.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| is_config_file(p))
                .collect();
            found.sort();
            files.extend(found);
        } else if input.exists() {
            files.push(input.clone());
        } else {
            return Err(format!("{}: no such file or directory", input.display()));
        }
    }
    Ok(files)
}

fn level_of(code: &str) -> Level {
    match code {
        "IST0101" | "IST0109" | "MESH0103" => Level::Error,
        _ => Level::Warning,
    }
}

/// IST0106 for an object the agent refuses (and what it does instead).
pub fn refused(e: &crate::config::Error, origin: &str) -> Diagnostic {
    Diagnostic {
        level: Level::Error,
        code: "IST0106",
        object: e.object.clone().unwrap_or_else(|| origin.to_string()),
        message: format!("{e} (the agent refuses this object and keeps its last good version)"),
    }
}

/// Analyzes `files` as one configuration.
pub fn analyze(files: &[PathBuf], mesh: &MeshScope) -> Vec<Diagnostic> {
    let mut out = Vec::new();
    let mut objects = Vec::new();
    for file in files {
        match std::fs::read_to_string(file) {
            Err(e) => out.push(Diagnostic {
                level: Level::Error,
                code: "MESH0001",
                object: file.display().to_string(),
                message: format!("cannot read the file: {e}"),
            }),
            Ok(text) => match parse_documents(file, &text) {
                Ok(o) => objects.extend(o),
                Err(e) => out.push(refused(&e, &file.display().to_string())),
            },
        }
    }
    analyze_objects(&objects, mesh, out)
}

/// Analyzes objects already read (`found`: what reading them reported).
pub fn analyze_objects(objects: &[Object], mesh: &MeshScope, found: Vec<Diagnostic>) -> Vec<Diagnostic> {
    let mut out = found;
    let snap = Snapshot::compile_in(objects, mesh, 1);
    // Config files without the cluster they apply to name Services that live there:
    // references to Services are checked only when the input has Services (as
    // selectors are checked only when it has workloads).
    let has_services = objects.iter().any(|o| matches!(o, Object::Service(_)));
    for p in snap.problems.iter().filter(|p| has_services || !p.unknown_service) {
        out.push(Diagnostic {
            level: level_of(p.code),
            code: p.code,
            object: p.object.clone(),
            message: p.detail.clone(),
        });
    }
    out.extend(selectors_matching_nothing(objects, &snap, &mesh.root_namespace));
    out.extend(namespaces_outside_the_mesh(objects, &snap));
    out.extend(network_policies_closing_the_tunnel(objects, &snap));
    out.extend(gateways::analyze(objects, &snap));
    out.sort();
    out.dedup();
    out
}

/// IST0127: a policy whose selector matches no workload (checked only when the input
/// has workloads to match).
fn selectors_matching_nothing(objects: &[Object], snap: &Snapshot, root: &str) -> Vec<Diagnostic> {
    if snap.workloads.is_empty() {
        return Vec::new();
    }
    let mut out = Vec::new();
    for o in objects {
        let (kind, meta, selector) = match o {
            Object::AuthorizationPolicy(a) => ("AuthorizationPolicy", &a.metadata, a.spec.selector.as_ref()),
            Object::PeerAuthentication(p) => ("PeerAuthentication", &p.metadata, p.spec.selector.as_ref()),
            _ => continue,
        };
        let Some(selector) = selector else { continue };
        if a_placeholder(o) {
            continue;
        }
        let ns = meta.namespace_or_default();
        let matches = snap.workloads.iter().any(|w| (w.namespace == ns || ns == root) && selector.selects(&w.labels));
        if !matches {
            let labels: Vec<String> = selector.match_labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            out.push(Diagnostic {
                level: Level::Warning,
                code: "IST0127",
                object: format!("{kind} {}", meta.key()),
                message: format!(
                    "no matching workloads for this resource with the following labels: {}; check spec.selector",
                    labels.join(",")
                ),
            });
        }
    }
    out
}

fn a_placeholder(o: &Object) -> bool {
    match o {
        Object::AuthorizationPolicy(a) => a.is_fail_closed_placeholder(),
        Object::PeerAuthentication(p) => p.is_fail_closed_placeholder(),
        _ => false,
    }
}

/// IST0102: a namespace with pods that the mesh does not capture (gateway workloads,
/// which hold their own identity, do not count).
fn namespaces_outside_the_mesh(objects: &[Object], snap: &Snapshot) -> Vec<Diagnostic> {
    objects
        .iter()
        .filter_map(|o| match o {
            Object::Namespace(n) => Some(n.metadata.name.clone()),
            _ => None,
        })
        .filter(|ns| {
            let is_gateway = |w: &crate::state::Workload| snap.gateways_selecting(w).next().is_some();
            let pods: Vec<_> = snap.workloads.iter().filter(|w| w.namespace == *ns && !is_gateway(w)).collect();
            !pods.is_empty() && pods.iter().all(|w| !w.enrolled)
        })
        .map(|ns| Diagnostic {
            level: Level::Info,
            code: "IST0102",
            object: format!("Namespace {ns}"),
            message: "the namespace is not in the mesh; label it istio-injection=enabled or \
                      istio.io/dataplane-mode=ambient to capture its pods"
                .into(),
        })
        .collect()
}

/// MESH0106: a NetworkPolicy that selects enrolled pods and lets no one in on the
/// tunnel port (15008), where every mesh connection to them arrives (from the client's
/// pod). Probe ports need nothing: kubelet probes keep the node's address, and traffic
/// from a pod's own node is always allowed by NetworkPolicy.
fn network_policies_closing_the_tunnel(objects: &[Object], snap: &Snapshot) -> Vec<Diagnostic> {
    let tunnel = mesh_common::ports::INBOUND_HBONE;
    let mut out = Vec::new();
    for o in objects {
        let Object::NetworkPolicy(np) = o else { continue };
        if !np.restricts_ingress() {
            continue;
        }
        let ns = np.metadata.namespace_or_default();
        let closed: Vec<String> = objects
            .iter()
            .filter_map(|o| match o {
                Object::Pod(p) if p.metadata.namespace_or_default() == ns => Some(p),
                _ => None,
            })
            .filter(|p| np.spec.pod_selector.selects(&p.metadata.labels))
            .filter(|p| snap.workloads.iter().any(|w| w.namespace == ns && w.name == p.metadata.name && w.enrolled))
            .filter(|p| {
                let named = |name: &str| {
                    p.spec
                        .containers
                        .iter()
                        .flat_map(|c| &c.ports)
                        .find(|cp| cp.name.as_deref() == Some(name))
                        .map(|cp| cp.container_port)
                };
                !np.allows_tcp(tunnel, &named)
            })
            .map(|p| p.metadata.name.clone())
            .collect();
        if closed.is_empty() {
            continue;
        }
        out.push(Diagnostic {
            level: Level::Warning,
            code: "MESH0106",
            object: format!("NetworkPolicy {ns}/{}", np.metadata.name),
            message: format!(
                "selects enrolled pods ({}) but lets no one in on TCP {tunnel}, where all mesh traffic to them \
                 arrives: add an ingress rule with `ports: [{{port: {tunnel}, protocol: TCP}}]` and the same `from` \
                 as the application's ports",
                closed.join(", ")
            ),
        });
    }
    out
}

/// The summary line `istioctl analyze` prints when nothing is wrong.
pub fn clean_message(files: &[PathBuf]) -> String {
    let shown: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
    format!("\u{2714} No validation issues found when analyzing {}.", shown.join(", "))
}

/// Whether a file name is one the analyzer reads from a directory.
pub fn is_config_file(p: &Path) -> bool {
    p.extension().and_then(|e| e.to_str()).is_some_and(|e| matches!(e, "yaml" | "yml" | "json"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const PODS: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: production, labels: {istio.io/dataplane-mode: ambient}}\n---\n\
        apiVersion: v1\nkind: Pod\nmetadata: {name: api, namespace: production, labels: {app: api}}\n\
        spec: {nodeName: node1, containers: [{name: app, ports: [{name: http, containerPort: 8080}]}]}\n\
        status: {podIP: 10.10.1.2}\n";

    fn codes_for(policy: &str) -> Vec<Diagnostic> {
        let text = format!("{PODS}---\n{policy}");
        let objects = parse_documents(Path::new("netpol.yaml"), &text).unwrap();
        let mesh = MeshScope::new("cluster.local");
        analyze_objects(&objects, &mesh, Vec::new()).into_iter().filter(|d| d.code == "MESH0106").collect()
    }

    #[test]
    fn a_network_policy_closing_the_tunnel_port_to_enrolled_pods_is_reported_with_the_fix() {
        let app_only = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: api-in, namespace: production}\n\
            spec:\n  podSelector: {matchLabels: {app: api}}\n  ingress: [{ports: [{port: 8080}]}]\n";
        let found = codes_for(app_only);
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].object, "NetworkPolicy production/api-in");
        assert!(found[0].message.contains("(api)") && found[0].message.contains("port: 15008"), "{}", found[0].message);
        // Deny-all ingress closes it too.
        let deny_all = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny, namespace: production}\n\
            spec: {podSelector: {}, policyTypes: [Ingress]}\n";
        assert_eq!(codes_for(deny_all).len(), 1);
    }

    #[test]
    fn network_policies_that_let_the_tunnel_in_or_do_not_apply_are_quiet() {
        for policy in [
            // 15008 listed, or a range holding it, or a rule without ports.
            "spec:\n  podSelector: {matchLabels: {app: api}}\n  ingress: [{ports: [{port: 8080}, {port: 15008, protocol: TCP}]}]\n",
            "spec:\n  podSelector: {}\n  ingress: [{ports: [{port: 15000, endPort: 15010}]}]\n",
            "spec:\n  podSelector: {}\n  ingress: [{from: [{podSelector: {}}]}]\n",
            // Egress only, or selecting no enrolled pod.
            "spec:\n  podSelector: {}\n  policyTypes: [Egress]\n",
            "spec:\n  podSelector: {matchExpressions: [{key: app, operator: In, values: [web]}]}\n  ingress: []\n",
        ] {
            let np = format!(
                "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: p, namespace: production}}\n{policy}"
            );
            assert!(codes_for(&np).is_empty(), "{policy}");
        }
    }
}

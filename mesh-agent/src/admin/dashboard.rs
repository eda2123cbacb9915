//! The mesh's own dashboard: one page ([`PAGE`]) and the data it polls
//! ([`DashboardData`]), served on the admin address only (the page shows the mesh's
//! topology and who was refused). `meshctl dashboard` serves the same page with the data
//! of several agents merged ([`DashboardData::merge`]).
//!
//! The page builds its DOM with `textContent` and attributes only, never markup from
//! the data: pod names, labels and principals are chosen by tenants.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::snapshot::Snapshot;
use crate::telemetry::graph::Graph;
use crate::telemetry::{Denial, RecentDenials};

/// The page: HTML, CSS and script in one file, with nothing fetched from elsewhere.
pub const PAGE: &str = include_str!("dashboard.html");

/// The page's Content-Security-Policy: its own inline script and style, data from its
/// own origin, nothing else (so a name that slipped into markup could not load or send
/// anything).
pub const CSP: &str =
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src data:";

/// What one agent holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentView {
    /// Its node.
    pub node: String,
    /// Whether it serves every local pod.
    pub ready: bool,
    /// Snapshot version.
    pub version: u64,
    /// Digest of the config in force.
    pub config_digest: String,
    /// Objects of each kind it compiled.
    pub kinds: BTreeMap<String, usize>,
    /// Its mesh config objects, `Kind namespace/name`.
    pub config: Vec<String>,
    /// Set when the agent could not be asked (meshctl only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A workload with pods on the agent's node: who it is and what protects it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkloadDetail {
    /// `namespace/workload`, as the graph names it.
    pub id: String,
    /// Its pods on the reporting nodes.
    pub pods: Vec<String>,
    /// Nodes they run on.
    pub nodes: Vec<String>,
    /// SPIFFE identity.
    pub identity: String,
    /// Canonical service and revision.
    pub app: String,
    /// The pods' mTLS mode (PeerAuthentication), with per-port exceptions.
    pub mtls: String,
    /// PeerAuthentications in force.
    pub peer_authentications: Vec<String>,
    /// AuthorizationPolicies in force by action.
    pub authorization: BTreeMap<String, Vec<String>>,
    /// Recent refusals protecting it, newest first.
    pub denials: Vec<Denial>,
}

/// Everything the page shows.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DashboardData {
    /// The agents the data comes from.
    pub agents: Vec<AgentView>,
    /// Traffic over the last minute.
    pub graph: Graph,
    /// Workloads with pods on those agents' nodes.
    pub workloads: Vec<WorkloadDetail>,
}

impl DashboardData {
    /// One agent's data: its graph, its node's workloads, its config.
    pub fn of_agent(node: &str, ready: bool, snap: &Snapshot, graph: Graph, denials: &RecentDenials) -> Self {
        let denials = denials.list();
        let mut workloads: BTreeMap<String, WorkloadDetail> = BTreeMap::new();
        for w in snap.workloads.iter().filter(|w| w.enrolled && w.node.as_deref() == Some(node)) {
            let id = format!("{}/{}", w.namespace, w.meta.workload);
            let security = snap.security(&w.key());
            let detail = workloads.entry(id.clone()).or_insert_with(|| {
                let mode = |m: crate::authz::mtls::Mode| format!("{m:?}").to_uppercase();
                let mut mtls = mode(security.mtls.default);
                for (port, m) in &security.mtls.ports {
                    mtls.push_str(&format!(", port {port}: {}", mode(*m)));
                }
                WorkloadDetail {
                    id: id.clone(),
                    pods: Vec::new(),
                    nodes: vec![node.to_string()],
                    identity: w.identity.to_string(),
                    app: format!("{} {}", w.meta.canonical_service, w.meta.canonical_revision),
                    mtls,
                    peer_authentications: security.mtls.from.clone(),
                    authorization: security.authz.in_force(),
                    denials: denials.iter().filter(|d| d.workload == id).cloned().collect(),
                }
            });
            detail.pods.push(w.name.clone());
        }
        let agent = AgentView {
            node: node.to_string(),
            ready,
            version: snap.version,
            config_digest: snap.config_digest().to_string(),
            kinds: snap.kinds_held.iter().map(|(k, n)| (k.to_string(), *n)).collect(),
            config: snap.config_held.iter().map(|(kind, ns, name)| held_name(kind, ns, name)).collect(),
            error: None,
        };
        Self { agents: vec![agent], graph, workloads: workloads.into_values().collect() }
    }

    /// Several agents' data as one: graphs merged (see [`Graph::merge`]), a workload
    /// with pods on several nodes listed once.
    pub fn merge(parts: impl IntoIterator<Item = DashboardData>) -> Self {
        let mut agents = Vec::new();
        let mut graphs = Vec::new();
        let mut workloads: BTreeMap<String, WorkloadDetail> = BTreeMap::new();
        for part in parts {
            agents.extend(part.agents);
            graphs.push(part.graph);
            for w in part.workloads {
                match workloads.get_mut(&w.id) {
                    Some(known) => {
                        known.pods.extend(w.pods);
                        known.nodes.extend(w.nodes);
                        known.denials.extend(w.denials);
                        known.denials.sort_by(|a, b| b.at.cmp(&a.at));
                        known.denials.truncate(RecentDenials::KEPT);
                    }
                    None => {
                        workloads.insert(w.id.clone(), w);
                    }
                }
            }
        }
        agents.sort_by(|a, b| a.node.cmp(&b.node));
        Self { agents, graph: Graph::merge(graphs), workloads: workloads.into_values().collect() }
    }
}

/// Whether a request names its server by a loopback address or `localhost`: a web page
/// the operator's browser opened elsewhere and pointed at a loopback port by DNS
/// rebinding names its own host, and is refused. No `Host` (HTTP/1.0 clients) passes.
pub fn host_is_local(headers: &http::HeaderMap) -> bool {
    let Some(host) = headers.get(http::header::HOST).and_then(|h| h.to_str().ok()) else { return true };
    let host = host
        .rsplit_once(':')
        .filter(|(h, p)| !h.is_empty() && !h.ends_with(':') && p.bytes().all(|b| b.is_ascii_digit()))
        .map_or(host, |(h, _)| h);
    let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    host.eq_ignore_ascii_case("localhost") || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

fn held_name(kind: &str, namespace: &str, name: &str) -> String {
    if namespace.is_empty() { format!("{kind} {name}") } else { format!("{kind} {namespace}/{name}") }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_documents;

    const CONFIG: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: default, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata:
  name: web-7d4b9c8f6d-abcde
  namespace: default
  labels: {app: web, pod-template-hash: 7d4b9c8f6d}
  ownerReferences: [{apiVersion: apps/v1, kind: ReplicaSet, name: web-7d4b9c8f6d, uid: u1, controller: true}]
spec: {nodeName: node1, serviceAccountName: web, containers: [{name: c, image: x}]}
status: {podIP: 10.0.1.5}
---
apiVersion: v1
kind: Pod
metadata: {name: db, namespace: default, labels: {app: db}}
spec: {nodeName: node2, containers: [{name: c, image: x}]}
status: {podIP: 10.0.2.5}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: strict, namespace: default}
spec: {mtls: {mode: STRICT}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-batch, namespace: default}
spec:
  action: DENY
  rules: [{from: [{source: {namespaces: [batch]}}]}]
"#;

    #[test]
    fn an_agent_reports_its_own_nodes_workloads_with_their_policies_and_denials() {
        let objs = parse_documents(std::path::Path::new("dashboard.yaml"), CONFIG).unwrap();
        let snap = Snapshot::compile(&objs, "cluster.local", 3);
        let metrics = crate::telemetry::Metrics::default();
        let web = snap.workloads.iter().find(|w| w.name.starts_with("web-")).unwrap().clone();
        metrics.denied(
            &web,
            crate::telemetry::DenyReason::Policy,
            "plaintext 10.0.9.9".into(),
            "denied by DENY policy default/deny-batch",
        );
        let data = DashboardData::of_agent("node1", true, &snap, Graph::default(), &metrics.recent_denials());
        let [w] = &data.workloads[..] else { panic!("only node1's workload: {:?}", data.workloads) };
        assert_eq!(w.id, "default/web", "named by its Deployment");
        assert_eq!(w.pods, ["web-7d4b9c8f6d-abcde"]);
        assert_eq!(w.identity, "spiffe://cluster.local/ns/default/sa/web");
        assert_eq!(w.mtls, "STRICT");
        assert_eq!(w.peer_authentications, ["PeerAuthentication default/strict"]);
        assert_eq!(w.authorization["DENY"], ["default/deny-batch"]);
        assert_eq!(w.denials.len(), 1);
        assert_eq!(w.denials[0].source, "plaintext 10.0.9.9");
        let agent = &data.agents[0];
        assert_eq!(agent.kinds["Pod"], 2);
        assert_eq!(agent.config, ["AuthorizationPolicy default/deny-batch", "PeerAuthentication default/strict"]);

        let other = DashboardData::of_agent("node2", false, &snap, Graph::default(), &RecentDenials::default());
        let merged = DashboardData::merge([data, other]);
        assert_eq!(merged.agents.iter().map(|a| a.node.as_str()).collect::<Vec<_>>(), ["node1", "node2"]);
        assert_eq!(merged.workloads.iter().map(|w| w.id.as_str()).collect::<Vec<_>>(), ["default/db", "default/web"]);
        let json = serde_json::to_string(&merged).unwrap();
        let back: DashboardData = serde_json::from_str(&json).unwrap();
        assert_eq!(back.workloads.len(), 2, "meshctl reads what agents write");
    }

    #[test]
    fn only_loopback_hosts_reach_the_admin_pages() {
        let with = |host: &str| {
            let mut h = http::HeaderMap::new();
            h.insert(http::header::HOST, host.parse().unwrap());
            host_is_local(&h)
        };
        for ok in ["127.0.0.1:15000", "localhost", "LOCALHOST:15100", "[::1]:15000", "::1", "127.9.9.9"] {
            assert!(with(ok), "{ok}");
        }
        for bad in
            ["evil.example", "evil.example:15000", "10.0.0.1:15000", "[2001:db8::1]:15000", "localhost.evil.example"]
        {
            assert!(!with(bad), "{bad}");
        }
        assert!(host_is_local(&http::HeaderMap::new()));
    }

    #[test]
    fn denials_are_bounded_newest_first() {
        let objs = parse_documents(std::path::Path::new("dashboard.yaml"), CONFIG).unwrap();
        let snap = Snapshot::compile(&objs, "cluster.local", 1);
        let metrics = crate::telemetry::Metrics::default();
        let web = snap.workloads.iter().find(|w| w.name.starts_with("web-")).unwrap().clone();
        for i in 0..(RecentDenials::KEPT + 10) {
            metrics.denied(&web, crate::telemetry::DenyReason::MtlsStrict, format!("plaintext 10.0.9.{i}"), "STRICT");
        }
        let list = metrics.recent_denials().list();
        assert_eq!(list.len(), RecentDenials::KEPT);
        assert_eq!(list[0].source, format!("plaintext 10.0.9.{}", RecentDenials::KEPT + 9));
    }
}

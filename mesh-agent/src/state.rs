//! The mesh's plain types: workloads, services, where a connection goes, problems
//! found in config, and the mesh-wide scope. They import nothing above `config` and
//! `identity`; the compiled `Snapshot` is built from them.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use crate::identity::Identity;

/// The DNS suffix of Services' names (`<name>.<namespace>` before it).
pub const SERVICE_DOMAIN: &str = ".svc.cluster.local";

/// Istio's default cluster id, which metrics report as `source_cluster` and
/// `destination_cluster`.
pub const DEFAULT_CLUSTER_ID: &str = "Kubernetes";

/// A pod as the mesh sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Workload {
    /// Pod name.
    pub name: String,
    /// Namespace.
    pub namespace: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Node it runs on.
    pub node: Option<String>,
    /// Addresses (first is primary).
    pub ips: Vec<IpAddr>,
    /// SPIFFE identity from the service account.
    pub identity: Identity,
    /// Whether its traffic is captured and carried over mTLS.
    pub enrolled: bool,
    /// Whether its DNS queries go to the agent's DNS proxy (an enrolled pod only): the
    /// pod's `ambient.istio.io/dns-capture` annotation, else its namespace's label of
    /// that name, else the mesh's setting.
    pub dns_capture: bool,
    /// Container ports by name (for named `targetPort`s).
    pub named_ports: HashMap<String, u16>,
    /// `metadata.uid` (cluster mode): how the node's cgroups name the pod.
    pub uid: Option<String>,
    /// Takes new connections as a Service endpoint ([`Pod::is_serving`]).
    pub serving: bool,
    /// The network its addresses are on (Istio's `topology.istio.io/network`); empty
    /// when none is named.
    pub network: String,
    /// Where it runs, for locality-aware load balancing.
    pub locality: Locality,
    /// How metrics, access logs and traces name it; shared, so a connection's labels
    /// cost a reference count rather than copies of every name.
    pub meta: Arc<WorkloadMeta>,
}

/// A name of a cluster of the mesh, as a remote secret's data key, a Secret's name and
/// a metric label value carry it: lowercase letters, digits, '-' and '.', starting and
/// ending with a letter or digit, at most 63 characters. `meshctl x
/// create-remote-secret` and the CA service that reads remote secrets hold to this one
/// rule, so a secret meshctl prints is never skipped.
pub fn is_cluster_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '.'))
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric())
}

/// A workload's locality (Istio's `region/zone/subzone`): the pod's `istio-locality`
/// label (`region.zone.subzone`), else its `topology.kubernetes.io/region` and
/// `topology.kubernetes.io/zone` labels and `topology.istio.io/subzone`. Empty parts
/// are unknown.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Locality {
    /// Region.
    pub region: String,
    /// Zone.
    pub zone: String,
    /// Subzone.
    pub subzone: String,
}

impl Locality {
    /// The locality a pod's labels give it.
    pub fn of_labels(labels: &BTreeMap<String, String>) -> Self {
        if let Some(l) = labels.get("istio-locality") {
            let mut parts = l.splitn(3, '.').map(str::to_string);
            return Self {
                region: parts.next().unwrap_or_default(),
                zone: parts.next().unwrap_or_default(),
                subzone: parts.next().unwrap_or_default(),
            };
        }
        let label = |k: &str| labels.get(k).cloned().unwrap_or_default();
        Self {
            region: label("topology.kubernetes.io/region"),
            zone: label("topology.kubernetes.io/zone"),
            subzone: label("topology.istio.io/subzone"),
        }
    }
}

/// A workload as Istio's telemetry names it, derived once when the snapshot is
/// compiled. The names come from the pod's own metadata (owner references, labels),
/// which its author chooses: they label what is observed and never decide capture,
/// identity or policy. The namespace and principal are the mesh's, not the pod's say.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct WorkloadMeta {
    /// The owning workload: the Deployment behind a ReplicaSet, the CronJob behind a
    /// Job, another controller by its name; a pod without one by its own name.
    pub workload: String,
    /// Namespace.
    pub namespace: String,
    /// SPIFFE identity, `spiffe://…`.
    pub principal: String,
    /// Canonical service: `service.istio.io/canonical-name`, else
    /// `app.kubernetes.io/name`, else `app`, else the workload.
    pub canonical_service: String,
    /// Canonical revision: `service.istio.io/canonical-revision`, else
    /// `app.kubernetes.io/version`, else `version`, else `latest`.
    pub canonical_revision: String,
    /// The cluster it runs in (Istio's cluster id).
    pub cluster: String,
}

impl WorkloadMeta {
    /// What stands for a side the agent cannot name (an address outside the mesh, a
    /// plaintext client it does not know).
    pub fn unknown() -> Arc<Self> {
        static UNKNOWN: std::sync::OnceLock<Arc<WorkloadMeta>> = std::sync::OnceLock::new();
        UNKNOWN
            .get_or_init(|| {
                let u = || "unknown".to_string();
                Arc::new(WorkloadMeta {
                    workload: u(),
                    namespace: u(),
                    principal: u(),
                    canonical_service: u(),
                    canonical_revision: u(),
                    cluster: u(),
                })
            })
            .clone()
    }

    /// Names a pod without telemetry labels: workload and canonical service are its
    /// name, revision `latest`.
    pub fn plain(name: &str, namespace: &str, identity: &Identity, cluster: &str) -> Self {
        Self {
            workload: name.to_string(),
            namespace: namespace.to_string(),
            principal: identity.to_string(),
            canonical_service: name.to_string(),
            canonical_revision: "latest".into(),
            cluster: cluster.to_string(),
        }
    }
}

impl Workload {
    /// What stands for an endpoint outside the mesh (a ServiceEntry's address, an
    /// EndpointSlice address that is no pod): named `name` in `namespace`, never
    /// enrolled, so it is reached in plaintext.
    pub fn outside(name: &str, namespace: &str, ip: IpAddr, trust_domain: &str) -> Self {
        Self::outside_at(name, namespace, vec![ip], trust_domain)
    }

    /// What stands for every EndpointSlice address of Service `service` that is no
    /// pod: one workload for all of them (a Service with 100,000 such addresses would
    /// otherwise hold 100,000 copies of the same names), without addresses of its own:
    /// each [`Endpoint`] carries its address.
    pub fn outside_service(service: &str, namespace: &str, trust_domain: &str) -> Self {
        Self::outside_at(service, namespace, Vec::new(), trust_domain)
    }

    fn outside_at(name: &str, namespace: &str, ips: Vec<IpAddr>, trust_domain: &str) -> Self {
        let identity = Identity::new(trust_domain, namespace, "default");
        Self {
            name: name.to_string(),
            namespace: namespace.to_string(),
            labels: BTreeMap::new(),
            node: None,
            ips,
            // Istio names no workload outside the mesh, only the Service.
            meta: WorkloadMeta::unknown(),
            identity,
            enrolled: false,
            dns_capture: false,
            named_ports: HashMap::new(),
            uid: None,
            serving: true,
            network: String::new(),
            locality: Locality::default(),
        }
    }

    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// A Service with its endpoints resolved.
#[derive(Debug)]
pub struct Service {
    /// Name.
    pub name: String,
    /// Namespace.
    pub namespace: String,
    /// Virtual IPs.
    pub vips: Vec<IpAddr>,
    /// Ports.
    pub ports: Vec<ServicePort>,
    /// Ready endpoints, in a stable order.
    pub endpoints: Vec<Endpoint>,
    /// Its slot among the snapshot's Services, which runtime tables index by: unique in
    /// a snapshot, and kept by a Service from the snapshot it was in before; a new
    /// Service takes the lowest free slot, so slots stay below the most Services any
    /// snapshot held.
    pub index: usize,
}

impl Service {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// One endpoint of a Service: a pod it selects, or an address from its EndpointSlices.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// The pod at the address, or a stand-in (not enrolled) for an address that is no
    /// pod the mesh knows.
    pub workload: Arc<Workload>,
    /// Where it is reached.
    pub ip: IpAddr,
    /// Ports by Service port name, from the EndpointSlice; `None` for a selected pod,
    /// whose target port resolves on the pod.
    pub slice_ports: Option<Arc<BTreeMap<String, u16>>>,
}

impl Endpoint {
    /// How the endpoint is named: its pod, or its address when it is no pod.
    pub fn name(&self) -> String {
        if self.workload.ips.is_empty() { self.ip.to_string() } else { self.workload.name.clone() }
    }

    /// Its addresses: the endpoint's, then its pod's others (a dual-stack pod's).
    pub fn addresses(&self) -> impl Iterator<Item = IpAddr> + '_ {
        std::iter::once(self.ip).chain(self.workload.ips.iter().copied().filter(|ip| *ip != self.ip))
    }

    /// The address for service port `sp`, if this endpoint serves it.
    pub fn addr(&self, sp: &ServicePort) -> Option<SocketAddr> {
        let port = match &self.slice_ports {
            Some(ports) => *ports.get(sp.name.as_deref().unwrap_or(""))?,
            None => match &sp.target {
                TargetPort::Number(p) => *p,
                TargetPort::Named(n) => *self.workload.named_ports.get(n)?,
            },
        };
        Some(SocketAddr::new(self.ip, port))
    }
}

/// One port of a Service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePort {
    /// Port name: `tcp-*` / `tls-*` names (Istio's protocol selection) keep a port L4.
    pub name: Option<String>,
    /// `appProtocol`, which Istio's protocol selection reads before the name.
    pub app_protocol: Option<String>,
    /// What clients dial.
    pub port: u16,
    /// Where the pod listens.
    pub target: TargetPort,
}

/// What a port speaks by declaration (Istio's protocol selection).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Declared {
    /// HTTP/1.1, HTTP/2 or gRPC.
    Http,
    /// TCP, TLS, or a database protocol: never read as HTTP.
    Opaque,
    /// Nothing said: the first bytes tell.
    Undeclared,
}

impl ServicePort {
    /// What the port declares it speaks: `appProtocol` first, then the name's prefix
    /// before `-` (`http-web`, `grpc`, `tcp-db`...).
    pub fn declared(&self) -> Declared {
        const HTTP: &[&str] = &["http", "http2", "grpc", "grpc-web", "h2c", "kubernetes.io/h2c"];
        const OPAQUE: &[&str] =
            &["tcp", "tls", "https", "mongo", "mysql", "redis", "kubernetes.io/ws", "kubernetes.io/wss"];
        let by = |p: &str| {
            let p = p.to_ascii_lowercase();
            if HTTP.contains(&p.as_str()) {
                Declared::Http
            } else if OPAQUE.contains(&p.as_str()) {
                Declared::Opaque
            } else {
                Declared::Undeclared
            }
        };
        match self.app_protocol.as_deref().map(by) {
            Some(d) if d != Declared::Undeclared => d,
            _ => self.name.as_deref().map_or(Declared::Undeclared, |n| by(n.split('-').next().unwrap_or(n))),
        }
    }
}

/// A Service `targetPort`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetPort {
    /// A number.
    Number(u16),
    /// A container port name, resolved per pod.
    Named(String),
}

/// Where an outbound connection goes, decided from its original destination.
#[derive(Debug, Clone)]
pub enum Destination {
    /// A pod of the mesh: carried over HBONE to its node's agent.
    Mesh {
        /// The pod.
        workload: Arc<Workload>,
        /// `podIP:port`.
        addr: SocketAddr,
        /// The Service dialed, when the client dialed a VIP.
        service: Option<String>,
    },
    /// A known pod outside the mesh, or an address the mesh knows nothing about:
    /// connected to directly, in plaintext, as the client asked.
    Passthrough {
        /// Where to connect.
        addr: SocketAddr,
        /// The pod, if it is one we know.
        workload: Option<Arc<Workload>>,
        /// The Service dialed, when the client dialed a VIP.
        service: Option<String>,
    },
    /// A Service VIP with no ready endpoint: refuse the connection.
    NoEndpoints {
        /// `namespace/name` of the service.
        service: String,
    },
}

/// An inconsistency between valid objects, with the analyzer code that names its kind
/// (Istio's `IST*` where Istio has one, `MESH*` for the mesh's own).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Problem {
    /// `IST0101`, `IST0109`, ... or `MESH*`.
    pub code: &'static str,
    /// `Kind namespace/name` of the object it is about.
    pub object: String,
    /// What is wrong and what the mesh does about it.
    pub detail: String,
    /// The object names a Service that is not known: only meaningful where the
    /// Services are part of what was compiled (a cluster, not a folder of config).
    pub unknown_service: bool,
}

impl Problem {
    /// A problem of `object`.
    pub fn new(code: &'static str, object: impl Into<String>, detail: impl Into<String>) -> Self {
        Self { code, object: object.into(), detail: detail.into(), unknown_service: false }
    }

    /// `object` refers to a Service there is none of (Istio's IST0101).
    pub fn unknown_service(object: impl Into<String>, detail: impl Into<String>) -> Self {
        Self { unknown_service: true, ..Self::new("IST0101", object, detail) }
    }
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.object, self.detail)
    }
}

/// Mesh-wide settings the compilation needs.
#[derive(Debug, Clone, PartialEq)]
pub struct MeshScope {
    /// This mesh's trust domain.
    pub trust_domain: String,
    /// Trust domains accepted as the same mesh (aliases).
    pub aliases: Vec<String>,
    /// Namespace whose policies apply mesh-wide (Istio's root namespace).
    pub root_namespace: String,
    /// What pods may reach outside the registry (Istio's
    /// `meshConfig.outboundTrafficPolicy.mode`).
    pub outbound: OutboundPolicy,
    /// Whether enrolled pods' DNS is captured where neither the pod nor its namespace
    /// says.
    pub dns_capture: bool,
    /// This cluster's id (Istio's `CLUSTER_ID`), as telemetry names it.
    pub cluster_id: String,
    /// The network this cluster's pods are on (Istio's `values.global.network`); empty:
    /// none named, every pod is reached directly.
    pub network: String,
}

/// Istio's `outboundTrafficPolicy.mode`: where an enrolled pod may connect that is
/// neither a Service, a pod nor a ServiceEntry.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum OutboundPolicy {
    /// Anywhere: unknown destinations are connected to as the pod asked.
    #[default]
    #[value(name = "ALLOW_ANY")]
    AllowAny,
    /// Only destinations the registry knows; the rest are refused, logged and counted.
    #[value(name = "REGISTRY_ONLY")]
    RegistryOnly,
}

impl MeshScope {
    /// The defaults: trust domain `cluster.local`, no aliases, root `istio-system`.
    pub fn new(trust_domain: &str) -> Self {
        Self {
            trust_domain: trust_domain.into(),
            aliases: Vec::new(),
            root_namespace: "istio-system".into(),
            outbound: OutboundPolicy::AllowAny,
            dns_capture: false,
            cluster_id: DEFAULT_CLUSTER_ID.into(),
            network: String::new(),
        }
    }

    /// Trust domains naming this mesh in policies: its own, its aliases, and
    /// `cluster.local` (which Istio policies use for "this mesh").
    pub fn equivalent_domains(&self) -> Vec<String> {
        let mut v = vec![self.trust_domain.clone()];
        for d in self.aliases.iter().map(String::as_str).chain(["cluster.local"]) {
            if !v.iter().any(|x| x == d) {
                v.push(d.to_string());
            }
        }
        v
    }
}

/// Over the tunnel to an enrolled pod, in plaintext to any other.
pub fn destination_for(workload: Arc<Workload>, addr: SocketAddr, service: Option<String>) -> Destination {
    if workload.enrolled {
        Destination::Mesh { workload, addr, service }
    } else {
        Destination::Passthrough { addr, workload: Some(workload), service }
    }
}

/// What the Telemetry API says for one workload's traffic: metrics turned off, access
/// logs on or off and which, tracing settings. The default says nothing (the agent's
/// flags decide).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TelemetryPolicy {
    /// Metrics turned off: bit `2 * metric + side` (side 0: the source's agent, 1: the
    /// destination's), metrics in the order of `config::telemetry::METRICS`.
    pub disabled_metrics: u32,
    /// Access logging, when a Telemetry says.
    pub access_log: Option<AccessLogPolicy>,
    /// Tracing, when a Telemetry says.
    pub tracing: Option<TracingPolicy>,
}

/// Which sides a setting applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sides {
    /// The source's agent (Istio's CLIENT).
    pub client: bool,
    /// The destination's agent (Istio's SERVER).
    pub server: bool,
}

impl Sides {
    /// Whether the reporter `source` (client) or `destination` (server) is in.
    pub fn has(&self, source: bool) -> bool {
        if source { self.client } else { self.server }
    }
}

/// `accessLogging` for a workload.
#[derive(Debug, Clone, PartialEq)]
pub struct AccessLogPolicy {
    /// Lines are written.
    pub enabled: bool,
    /// For which sides' traffic.
    pub sides: Sides,
    /// Only entries whose response code passes.
    pub filter: Option<crate::config::telemetry::CodeFilter>,
}

impl AccessLogPolicy {
    /// Whether an entry with this response code (0 for TCP), written by the source's
    /// agent or not, is logged.
    pub fn logs(&self, source: bool, code: u16) -> bool {
        self.enabled
            && self.sides.has(source)
            && self.filter.as_ref().is_none_or(|f| f.iter().any(|all| all.iter().all(|(op, n)| op.holds(code, *n))))
    }
}

/// A span tag's value.
#[derive(Debug, Clone, PartialEq)]
pub enum TagValue {
    /// Fixed.
    Literal(String),
    /// From a request header, with a default.
    Header {
        /// The header.
        name: String,
        /// When the request has none.
        default: Option<String>,
    },
}

/// `tracing` for a workload.
#[derive(Debug, Clone, PartialEq)]
pub struct TracingPolicy {
    /// Percent of new traces sampled, overriding `--trace-sampling`.
    pub sampling: Option<f64>,
    /// Spans are reported (context propagates either way).
    pub report: bool,
    /// For which sides' spans.
    pub sides: Sides,
    /// Tags added to the spans.
    pub tags: Vec<(String, TagValue)>,
}

impl TelemetryPolicy {
    /// Whether `metric` (an index of `config::telemetry::METRICS`) is reported by the
    /// source's agent (`source`) or the destination's.
    pub fn metric_on(&self, metric: usize, source: bool) -> bool {
        self.disabled_metrics & (1 << (2 * metric + usize::from(!source))) == 0
    }
}

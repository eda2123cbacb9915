//! The compiled view of the configuration: workloads, services and who is enrolled,
//! built once per config change ([`compile`]) into lookup tables and swapped whole.
//!
//! Architecture invariant: a [`Snapshot`] is never mutated after [`Snapshot::compile`];
//! readers hold an `Arc` to the one they started with, so a request never sees half of
//! an update. What counts per connection (the round-robin cursors) lives in
//! [`RoundRobin`], beside it.

mod compile;
mod labels;
pub use labels::LINKERD_INJECT;
mod digest;
mod held;
mod network_gateway;
mod reuse;
mod service_index;
mod shards;
mod slice_groups;
pub use network_gateway::{NetworkGateway, Reach};
mod remote;

// Policy semantics judged on compiled snapshots (the seed policies, evaluation order,
// properties): they build whole snapshots, so they live here, above authz.
#[cfg(test)]
mod authz_props;
#[cfg(test)]
mod authz_tests;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use arc_swap::ArcSwap;

use crate::authz::{self, WorkloadSecurity};
use crate::state::{Destination, Problem, Service, ServicePort, Workload, destination_for};
use crate::traffic::gateway::CompiledGateway;
use crate::traffic::policy::{DestinationPolicy, TrafficPolicy};
use crate::traffic::route::ServiceRoutes;

/// An immutable, compiled configuration.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Every known workload.
    pub workloads: Vec<Arc<Workload>>,
    by_ip: HashMap<IpAddr, Arc<Workload>>,
    services: Vec<Arc<Service>>,
    /// The Services by cluster IP, by `namespace/name`, and by endpoint address (the
    /// first by `namespace/name` there, which names the Service of inbound traffic
    /// and says what the port speaks).
    index: Arc<service_index::ServiceIndex>,
    routes: HashMap<String, Arc<ServiceRoutes>>,
    /// Every Gateway with the routes bound to it, by `namespace/name`.
    gateways: std::collections::BTreeMap<String, Arc<CompiledGateway>>,
    policies: HashMap<String, Arc<DestinationPolicy>>,
    /// `tls:` routes of mesh-bound VirtualServices for ServiceEntry hosts, by the
    /// entry's `namespace/name` (the egress-gateway pattern).
    external_tls: HashMap<String, Arc<Vec<crate::traffic::route::TlsRule>>>,
    /// `http:` routes of mesh-bound VirtualServices for ServiceEntry hosts, by the
    /// entry's `namespace/name` (the plain-HTTP egress-gateway pattern).
    external_http: HashMap<String, Arc<ServiceRoutes>>,
    /// DestinationRules of ServiceEntries, by the entry's `namespace/name`.
    external_policies: HashMap<String, Arc<DestinationPolicy>>,
    /// PeerAuthentication and AuthorizationPolicy per workload (`namespace/name`).
    security: HashMap<String, Arc<WorkloadSecurity>>,
    /// For workloads no policy selects.
    no_security: Arc<WorkloadSecurity>,
    /// Telemetry API settings per workload (`namespace/name`).
    telemetry: HashMap<String, Arc<crate::state::TelemetryPolicy>>,
    /// For workloads no Telemetry covers.
    no_telemetry: Arc<crate::state::TelemetryPolicy>,
    /// Trust domains under which a policy's principal names the same identity.
    pub equivalent_domains: Vec<String>,
    /// Inconsistencies between objects that are each valid (conflicting
    /// VirtualServices, routes to undefined subsets), logged when the snapshot applies
    /// and reported by `meshctl analyze`.
    pub problems: Vec<Problem>,
    /// Namespaces whose pods are in the mesh.
    enrolled_ns: std::collections::BTreeSet<String>,
    /// ServiceEntries: destinations outside the Services.
    pub external: crate::traffic::external::ExternalServices,
    /// Where pods may connect outside the registry.
    pub outbound: crate::state::OutboundPolicy,
    /// The status each Gateway API object the mesh controls should carry (written back
    /// by the gateways in cluster mode).
    pub gateway_api_status: Arc<Vec<crate::config::gateway_api::translate::ObjectStatus>>,
    /// The network this cluster's pods are on (empty: none named).
    pub network: String,
    /// The east-west gateway of each other network, by network name.
    pub network_gateways: std::collections::BTreeMap<String, NetworkGateway>,
    /// Who runs as each identity on another network, where that is one workload: a
    /// connection from there arrives from its gateway's address, so the server names
    /// its source by the identity it authenticated (None: several workloads share it).
    behind_gateways: HashMap<crate::identity::Identity, Option<Arc<crate::state::WorkloadMeta>>>,
    /// Monotonic version, for logs and the config dump.
    pub version: u64,
    /// What the config digest is computed from, and the digest once it is.
    digest: digest::ConfigDigest,
    /// What the compile of the next snapshot may take over from this one.
    memo: reuse::CompileMemo,
    /// How many objects of each kind the snapshot was compiled from.
    pub kinds_held: std::collections::BTreeMap<&'static str, usize>,
    /// The mesh's own config objects among them (routing, security, telemetry, gateways:
    /// not pods, Services and the like), as `(kind, namespace, name)`, sorted.
    pub config_held: Vec<(&'static str, String, String)>,
}

impl Snapshot {
    /// A hash (hex, 16 digits) of the objects in force: agents that read the same
    /// config show the same digest, whatever order it arrived in (`meshctl
    /// proxy-status` compares them). Worked out at the first call, not in the compile,
    /// and from the hashes of the snapshot this one replaced for the objects both hold:
    /// the data path need not wait for it (the agent asks on a blocking thread right
    /// after the new snapshot is in force).
    pub fn config_digest(&self) -> &str {
        self.digest.get()
    }

    /// This mesh's own trust domain (the first of the equivalent ones).
    pub fn trust_domain(&self) -> &str {
        self.equivalent_domains.first().map_or("cluster.local", String::as_str)
    }

    /// Whether a connection to `w` at its port `port` rides the mTLS tunnel: `w` is in
    /// the mesh and its PeerAuthentication does not DISABLE the port (clients then send
    /// plaintext, as Istio's auto-mTLS does).
    pub fn tunnels_to(&self, w: &Workload, port: u16) -> bool {
        w.enrolled && self.security(&w.key()).mtls.mode(port) != authz::mtls::Mode::Disable
    }

    /// How `w`'s addresses are reached from this cluster's network.
    pub fn reach(&self, w: &Workload) -> Reach<'_> {
        if self.network.is_empty() || w.network.is_empty() || w.network == self.network {
            return Reach::Direct;
        }
        self.network_gateways.get(&w.network).map_or(Reach::Unreachable, Reach::Via)
    }

    /// The security settings of workload `key` (`namespace/name`).
    pub fn security(&self, key: &str) -> &Arc<WorkloadSecurity> {
        self.security.get(key).unwrap_or(&self.no_security)
    }

    /// Every Service's compiled routes, by `namespace/name`.
    pub fn all_routes(&self) -> impl Iterator<Item = (&str, &Arc<ServiceRoutes>)> {
        self.routes.iter().map(|(k, r)| (k.as_str(), r))
    }

    /// The Telemetry API settings of workload `key` (`namespace/name`).
    pub fn telemetry(&self, key: &str) -> &Arc<crate::state::TelemetryPolicy> {
        self.telemetry.get(key).unwrap_or(&self.no_telemetry)
    }

    /// The Service whose endpoint `w` is at its port `port`, and that Service's port.
    pub fn service_at(&self, w: &Workload, port: u16) -> Option<(&Arc<Service>, &ServicePort)> {
        let (service, i) = w.ips.iter().find_map(|ip| self.index.by_endpoint(&SocketAddr::new(*ip, port)))?;
        Some((service, service.ports.get(*i)?))
    }

    /// The Service at this cluster IP.
    pub fn service_by_vip(&self, ip: IpAddr) -> Option<&Arc<Service>> {
        self.index.by_vip(&ip)
    }

    /// VirtualService rules for a Service (`namespace/name`).
    pub fn routes(&self, service: &str) -> Option<&Arc<ServiceRoutes>> {
        self.routes.get(service)
    }

    /// The Gateway `namespace/name`, compiled.
    pub fn gateway(&self, key: &str) -> Option<&Arc<CompiledGateway>> {
        self.gateways.get(key)
    }

    /// The Gateways `workload` serves.
    pub fn gateways_selecting<'a>(
        &'a self,
        workload: &'a Workload,
    ) -> impl Iterator<Item = &'a Arc<CompiledGateway>> + 'a {
        self.gateways.values().filter(move |g| g.selects(workload))
    }

    /// Whether HTTP to this Service is handled at L7 (HTTP rules or a DestinationRule).
    pub fn has_traffic_rules(&self, service: &str) -> bool {
        self.routes.get(service).is_some_and(|r| !r.rules.is_empty()) || self.policies.contains_key(service)
    }

    /// The traffic policy for a Service, optional subset and service port (defaults
    /// without a rule).
    pub fn traffic_policy(&self, service: &str, subset: Option<&str>, port: u16) -> TrafficPolicy {
        self.policies.get(service).map_or_else(TrafficPolicy::default, |p| p.effective(subset, port))
    }

    /// The first mesh `tls:` rule for ServiceEntry `entry` that takes `sni` on `port`.
    pub fn external_tls_route(&self, entry: &str, sni: &str, port: u16) -> Option<&crate::traffic::route::TlsRule> {
        self.external_tls.get(entry)?.iter().find(|r| r.takes(sni, port))
    }

    /// Whether mesh `tls:` rules exist for ServiceEntry `entry`.
    pub fn has_external_tls_routes(&self, entry: &str) -> bool {
        self.external_tls.contains_key(entry)
    }

    /// The DestinationRule policy for ServiceEntry `entry` (`namespace/name`) on `port`.
    pub fn external_policy(&self, entry: &str, port: u16) -> TrafficPolicy {
        self.external_policies.get(entry).map_or_else(TrafficPolicy::default, |p| p.effective(None, port))
    }

    /// Endpoints of a Service (restricted to a subset's labels) with the address for
    /// service port `port`. An unknown subset has no endpoints.
    pub fn endpoints(&self, service: &str, subset: Option<&str>, port: u16) -> Vec<(Arc<Workload>, SocketAddr)> {
        let Some(svc) = self.index.by_key(service) else { return Vec::new() };
        let labels = match subset {
            None => None,
            Some(s) => match self.policies.get(service).and_then(|p| p.subsets.get(s)) {
                Some(sub) => Some(&sub.labels),
                None => return Vec::new(),
            },
        };
        let Some(sp) = svc.ports.iter().find(|p| p.port == port) else { return Vec::new() };
        svc.endpoints
            .iter()
            .filter(|e| labels.is_none_or(|l| l.iter().all(|(k, v)| e.workload.labels.get(k) == Some(v))))
            .filter_map(|e| Some((e.workload.clone(), e.addr(sp)?)))
            .collect()
    }

    /// The Service `namespace/name`.
    pub fn service(&self, key: &str) -> Option<&Arc<Service>> {
        self.index.by_key(key)
    }

    /// The workload with this address.
    pub fn workload_by_ip(&self, ip: IpAddr) -> Option<&Arc<Workload>> {
        self.by_ip.get(&ip)
    }

    /// The workload that runs as `identity` on another network, when exactly one does.
    pub fn behind_gateway(&self, identity: &crate::identity::Identity) -> Option<&Arc<crate::state::WorkloadMeta>> {
        self.behind_gateways.get(identity)?.as_ref()
    }

    /// Notes the workloads reached through a gateway, by identity ([`Self::behind_gateway`]).
    fn index_behind_gateways(&mut self) {
        let mut index: HashMap<crate::identity::Identity, Option<Arc<crate::state::WorkloadMeta>>> = HashMap::new();
        for w in self.workloads.iter().filter(|w| matches!(self.reach(w), Reach::Via(_))) {
            index
                .entry(w.identity.clone())
                .and_modify(|held| {
                    if held.as_ref().is_some_and(|m| **m != *w.meta) {
                        *held = None;
                    }
                })
                .or_insert_with(|| Some(w.meta.clone()));
        }
        self.behind_gateways = index;
    }

    /// Enrolled workloads scheduled on `node`.
    pub fn local_enrolled<'a>(&'a self, node: &'a str) -> impl Iterator<Item = &'a Arc<Workload>> + 'a {
        self.workloads.iter().filter(move |w| w.enrolled && w.node.as_deref() == Some(node) && !w.ips.is_empty())
    }

    /// Namespaces whose pods are in the mesh (by label or annotation).
    pub fn enrolled_namespaces(&self) -> std::collections::BTreeSet<String> {
        self.enrolled_ns.clone()
    }

    /// The addresses the DNS proxy answers for `name` (lower case, no trailing dot) to
    /// a pod of `namespace`: a Service's (`<svc>.<ns>.svc.cluster.local`: its cluster
    /// IPs, or for a headless one the addresses of its ready endpoints), else a
    /// ServiceEntry host's. None: the mesh does not know the name, and the query goes
    /// upstream as it came.
    pub fn dns_addresses(&self, name: &str, namespace: &str) -> Option<Vec<IpAddr>> {
        if let Some(s) = self.service_by_hostname(name) {
            let mut addresses = s.vips.clone();
            if addresses.is_empty() {
                for e in &s.endpoints {
                    for ip in e.addresses() {
                        if !addresses.contains(&ip) {
                            addresses.push(ip);
                        }
                    }
                }
            }
            if !addresses.is_empty() {
                return Some(addresses);
            }
        }
        self.external.dns_addresses(name, namespace)
    }

    /// The Service a fully qualified name (`<svc>.<ns>.svc.cluster.local`, lower case)
    /// names.
    pub fn service_by_hostname(&self, name: &str) -> Option<&Arc<Service>> {
        name.strip_suffix(crate::state::SERVICE_DOMAIN)
            .and_then(|rest| rest.split_once('.'))
            .filter(|(_, ns)| !ns.contains('.'))
            .and_then(|(svc, ns)| self.index.by_key(&format!("{ns}/{svc}")))
    }

    /// The `http:` routes mesh traffic to ServiceEntry `entry` (`namespace/name`) takes.
    pub fn external_routes(&self, entry: &str) -> Option<&Arc<ServiceRoutes>> {
        self.external_http.get(entry)
    }

    /// Services, for the config dump.
    pub fn services(&self) -> &[Arc<Service>] {
        &self.services
    }

    /// Decides where a connection to `orig` goes. Service VIPs pick an endpoint round
    /// robin (the cursor is in `turns`, kept outside the immutable snapshot); pod
    /// addresses go to that pod.
    pub fn resolve(&self, orig: SocketAddr, turns: &RoundRobin) -> Destination {
        if let Some(svc) = self.index.by_vip(&orig.ip()) {
            let name = svc.key();
            let Some(port) = svc.ports.iter().find(|p| p.port == orig.port()) else {
                return Destination::NoEndpoints { service: name };
            };
            let n = svc.endpoints.len();
            if n == 0 {
                return Destination::NoEndpoints { service: name };
            }
            let start = turns.next(svc);
            // Skip endpoints that do not serve this port (a named target port the pod
            // lacks, a port its EndpointSlice does not list).
            for i in 0..n {
                let e = &svc.endpoints[(start + i) % n];
                if let Some(addr) = e.addr(port) {
                    return destination_for(e.workload.clone(), addr, Some(name));
                }
            }
            return Destination::NoEndpoints { service: name };
        }
        match self.by_ip.get(&orig.ip()) {
            Some(w) => destination_for(w.clone(), orig, None),
            None => Destination::Passthrough { addr: orig, workload: None, service: None },
        }
    }
}

/// The current snapshot, swapped atomically on each accepted config change.
pub type SharedSnapshot = Arc<ArcSwap<Snapshot>>;

/// Round-robin cursors of Service VIPs, one per Service of the snapshot in force (by
/// [`Service::index`]): runtime state kept beside the snapshot, so the snapshot itself
/// is never written to. Reading one is an atomic load and an index, as cheap as the
/// counter inside the snapshot was.
#[derive(Debug, Default)]
pub struct RoundRobin {
    cursors: ArcSwap<Box<[AtomicUsize]>>,
    /// For a Service the cursors do not cover yet (a snapshot newer than the last
    /// [`RoundRobin::fit`]).
    spare: AtomicUsize,
}

impl RoundRobin {
    /// The next turn for `service`.
    pub fn next(&self, service: &Service) -> usize {
        match self.cursors.load().get(service.index) {
            Some(c) => c.fetch_add(1, Ordering::Relaxed),
            None => self.spare.fetch_add(1, Ordering::Relaxed),
        }
    }

    /// Sizes the cursors for `snapshot`'s Services' slots (fresh cursors when their
    /// number changed).
    pub fn fit(&self, snapshot: &Snapshot) {
        let slots = snapshot.services.iter().map(|s| s.index + 1).max().unwrap_or(0);
        if self.cursors.load().len() != slots {
            let fresh: Box<[AtomicUsize]> = (0..slots).map(|_| AtomicUsize::new(0)).collect();
            self.cursors.store(Arc::new(fresh));
        }
    }
}

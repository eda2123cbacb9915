//! [`Snapshot::compile`]: users' objects to lookup tables, with the problems found on
//! the way.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;

use super::Snapshot;
use super::digest::ConfigDigest;
use super::held::Held;
use super::labels::{
    DNS_CAPTURE, LINKERD_INJECT, NETWORK_LABEL, NamespaceModes, OPT_IN_LABELS, OPT_OUT_LABELS, namespace_modes,
    selects, switch,
};
use super::reuse::{CompileMemo, Reuse};
use super::service_index::ServiceIndex;
use super::slice_groups::{SliceGroups, SliceList};
use crate::authz::{self, WorkloadAuthz, WorkloadSecurity};
use crate::config::gateway::Gateway;
use crate::config::gateway_api::translate::translate;
use crate::config::istio::VirtualService;
use crate::config::resource::Resource;
use crate::config::resources::{EndpointSlice, IntOrString, Pod};
use crate::config::telemetry::TelemetrySpec;
use crate::config::{Object, RemoteObjects};
use crate::identity::Identity;
use crate::state::{
    AccessLogPolicy, Endpoint, MeshScope, Problem, Service, ServicePort, Sides, TagValue, TargetPort, TelemetryPolicy,
    TracingPolicy, Workload, WorkloadMeta,
};
use crate::traffic::external::ExternalServices;
use crate::traffic::gateway::{CompiledGateway, PortRoutes, serve_domains};
use crate::traffic::policy::DestinationPolicy;
use crate::traffic::route::{self, Attachment, ServiceRoutes};

impl Snapshot {
    /// Compiles objects into lookup tables with the default [`MeshScope`].
    pub fn compile(objects: &[Object], trust_domain: &str, version: u64) -> Self {
        Self::compile_in(objects, &MeshScope::new(trust_domain), version)
    }

    /// Compiles objects into lookup tables.
    pub fn compile_in(objects: &[Object], mesh: &MeshScope, version: u64) -> Self {
        Self::compile_mesh(objects, &[], mesh, version)
    }

    /// Compiles this cluster's objects, with what the agent reads of the mesh's other
    /// clusters: their pods as workloads (never captured here) and their Services'
    /// endpoints, merged into this cluster's Service of the same namespace and name
    /// (Istio's namespace sameness) or, for a Service this cluster does not have, under
    /// the remote cluster's addresses where no local Service holds them.
    pub fn compile_mesh(objects: &[Object], remotes: &[RemoteObjects], mesh: &MeshScope, version: u64) -> Self {
        Self::compile_after(None, objects, remotes, mesh, version)
    }

    /// Compiles the snapshot that replaces this one, as [`Snapshot::compile_mesh`]
    /// does, taking over what of this one still holds: the workloads, Services and
    /// Service index compiled from the same objects ([`super::reuse`]) and the hashes
    /// of the objects both are compiled from, for the config digest.
    pub fn compile_next(&self, objects: &[Object], remotes: &[RemoteObjects], mesh: &MeshScope, version: u64) -> Self {
        Self::compile_after(Some(self), objects, remotes, mesh, version)
    }

    fn compile_after(
        previous: Option<&Snapshot>,
        objects: &[Object],
        remotes: &[RemoteObjects],
        mesh: &MeshScope,
        version: u64,
    ) -> Self {
        let trust_domain = mesh.trust_domain.as_str();
        let namespaces = namespace_modes(objects);
        let reuse = Reuse::of(previous, mesh, &namespaces, !remotes.is_empty());
        let mut memo = if remotes.is_empty() {
            CompileMemo::under(mesh, &namespaces, reuse.as_ref())
        } else {
            CompileMemo::default()
        };
        let mut snap = Snapshot {
            version,
            digest: ConfigDigest::of(objects, remotes, previous.map(|p| &p.digest)),
            kinds_held: objects.iter().fold(Default::default(), |mut counts, o| {
                *counts.entry(o.kind()).or_default() += 1;
                counts
            }),
            config_held: config_held(objects),
            enrolled_ns: namespaces.iter().filter(|(_, m)| m.enrolled).map(|(n, _)| n.clone()).collect(),
            ..Default::default()
        };
        snap.network = mesh.network.clone();
        snap.find_network_gateways(objects, &namespaces, remotes, mesh);
        // Pods whose addresses this cluster's network does not reach, and no east-west
        // gateway leads to: no Service sends them traffic.
        let mut off_network: HashSet<IpAddr> = HashSet::new();
        // Whether each workload was compiled anew (not taken over), in order.
        let mut fresh = Vec::new();
        for o in objects {
            if let Object::Pod(pod) = o {
                let w = match reuse.as_ref().and_then(|r| r.workload(pod)) {
                    Some(w) => {
                        fresh.push(false);
                        w
                    }
                    None => {
                        fresh.push(true);
                        Arc::new(workload(pod, mesh, &namespaces, &Origin::local(mesh)))
                    }
                };
                memo.workload(pod, &w);
                if let Some(network) =
                    other_network(&w.network, mesh).filter(|n| !snap.network_gateways.contains_key(*n))
                {
                    off_network.extend(&w.ips);
                    snap.problems.push(Problem::new(
                        "MESH0111",
                        format!("Pod {}/{}", w.namespace, w.name),
                        format!(
                            "on network {network}, not this cluster's {}: it is reached only through an east-west \
                             gateway, and none is configured; no Service sends it traffic",
                            mesh.network
                        ),
                    ));
                }
                // A hostNetwork pod's address is its node's, shared by every such pod
                // and the node itself; a finished pod's address may be a new pod's.
                if !pod.spec.host_network && !pod.is_finished() {
                    for ip in &w.ips {
                        snap.by_ip.insert(*ip, w.clone());
                    }
                }
                snap.workloads.push(w);
            }
        }
        memo.off_network(&off_network);
        // Nothing is kept unless the pods off the network are as before.
        let reuse = reuse.filter(|r| r.same_off_network(&off_network));
        let pod_changes = reuse.as_ref().and_then(|r| r.workload_changes(&snap.workloads, &fresh));
        let mut drafts = ServiceDrafts::default();
        let (slice_groups, changed_groups) = SliceGroups::of(objects, previous.map(|p| &p.memo.slice_groups));
        let no_slices = SliceList::from(Vec::new());
        // What each Service of this cluster compiled again was compiled from, in
        // order, for the memo (None for a Service taken over: the memo has it).
        let mut compiled_from = Vec::new();
        for o in objects {
            if let Object::Service(svc) = o {
                let (namespace, name) = (svc.metadata.namespace_str(), svc.metadata.name.as_str());
                let read = || slice_groups.get(namespace, name).cloned().unwrap_or_else(|| no_slices.clone());
                // Looked up only where the group changed: a kept Service's slices are
                // its memo's.
                let changed = changed_groups.touches(namespace, name).then(read);
                if let Some(kept) =
                    reuse.as_ref().and_then(|r| r.service(svc, changed.as_ref(), &snap, pod_changes.as_ref()))
                {
                    compiled_from.push(None);
                    drafts.keep(kept);
                    continue;
                }
                let of_service = changed.unwrap_or_else(read);
                compiled_from.push(Some((svc, of_service.clone())));
                let ns = svc.metadata.namespace_or_default();
                let endpoints = if svc.spec.selector.is_empty() {
                    let local = |ip: &IpAddr| snap.by_ip.get(ip).cloned();
                    let mut endpoints = slice_endpoints(local, &of_service, (&ns, &svc.metadata.name), trust_domain);
                    endpoints.retain(|e| !off_network.contains(&e.ip));
                    endpoints
                } else {
                    selected_endpoints(&snap.workloads, &ns, &svc.spec.selector)
                        .filter(|e| !off_network.contains(&e.ip))
                        .collect()
                };
                drafts.push(ServiceDraft::of(svc, ns, endpoints));
            }
        }
        for remote in remotes {
            snap.merge_remote(remote, mesh, &mut drafts);
        }
        let mut slots = Slots::new(&drafts.list);
        // The previous compile's Services this one does not hold, and its new ones.
        let (mut removed, mut added) = (Vec::new(), Vec::new());
        for (i, planned) in drafts.list.into_iter().enumerate() {
            let service = match planned {
                Planned::Kept(service) => service,
                Planned::Draft(draft) => {
                    let had = reuse.as_ref().and_then(|r| r.slot(&format!("{}/{}", draft.namespace, draft.name)));
                    let service = Arc::new(draft.freeze(slots.take(had)));
                    if let Some(Some((object, slices))) = compiled_from.get(i) {
                        removed.extend(memo.service(object, slices, &service));
                    }
                    added.push(service.clone());
                    service
                }
            };
            snap.services.push(service);
        }
        removed.extend(memo.services_of(Held::of(objects.iter().filter_map(|o| match o {
            Object::Service(svc) => Some(svc),
            _ => None,
        }))));
        snap.index = reuse
            .as_ref()
            .and_then(|r| r.index(&removed, &added, snap.services.len()))
            .unwrap_or_else(|| ServiceIndex::build(&snap.services))
            .into();
        if !snap.network_gateways.is_empty() {
            snap.index_behind_gateways();
        }
        snap.external = ExternalServices::new(objects.iter().filter_map(|o| match o {
            Object::ServiceEntry(e) => Some(&**e),
            _ => None,
        }));
        snap.outbound = mesh.outbound;
        snap.compile_traffic(objects);
        snap.compile_security(objects, mesh);
        snap.compile_telemetry(objects, &mesh.root_namespace);
        memo.slice_groups = slice_groups;
        snap.memo = memo;
        snap
    }

    /// Telemetry objects, per workload: for each of metrics, access logging and tracing,
    /// the most specific Telemetry that says anything decides (the workload's own by
    /// selector, else its namespace's, else the root namespace's); of several at one
    /// level, the first by name.
    fn compile_telemetry(&mut self, objects: &[Object], root: &str) {
        let all = sorted(objects, |o| if let Object::Telemetry(t) = o { Some(&**t) } else { None });
        if all.is_empty() {
            return;
        }
        let mut cache: HashMap<Vec<usize>, Arc<crate::state::TelemetryPolicy>> = HashMap::new();
        for w in &self.workloads {
            // Most specific first.
            let level = |t: &&crate::config::telemetry::Telemetry| {
                let ns = t.metadata.namespace_or_default();
                match &t.spec.selector {
                    Some(s) if ns == w.namespace && s.selects(&w.labels) => Some(0),
                    None if ns == w.namespace && ns != root => Some(1),
                    None if ns == root => Some(2),
                    _ => None,
                }
            };
            let mut applying: Vec<(usize, usize)> =
                all.iter().enumerate().filter_map(|(i, t)| Some((level(t)?, i))).collect();
            applying.sort();
            let key: Vec<usize> = applying.iter().map(|(_, i)| *i).collect();
            if key.is_empty() {
                continue;
            }
            let policy = cache
                .entry(key.clone())
                .or_insert_with(|| Arc::new(telemetry_policy(key.iter().map(|i| &all[*i].spec))))
                .clone();
            self.telemetry.insert(w.key(), policy);
        }
    }

    /// PeerAuthentication modes and AuthorizationPolicies, per workload. A policy that
    /// does not compile becomes allow-nothing for the workloads it selects.
    fn compile_security(&mut self, objects: &[Object], mesh: &MeshScope) {
        self.equivalent_domains = mesh.equivalent_domains();
        let root = mesh.root_namespace.as_str();
        let peer_auths = sorted(objects, |o| if let Object::PeerAuthentication(p) = o { Some(&**p) } else { None });
        for p in &peer_auths {
            if p.metadata.namespace_or_default() == root && p.spec.selector.is_some() {
                self.problems.push(Problem::new(
                    "MESH0102",
                    format!("PeerAuthentication {}", p.metadata.key()),
                    format!("a workload selector in the root namespace {root} is ignored, as Istio does"),
                ));
            }
        }
        let mut authz_policies = Vec::new();
        for ap in sorted(objects, |o| if let Object::AuthorizationPolicy(a) = o { Some(&**a) } else { None }) {
            let compiled = authz::Policy::compile(ap).unwrap_or_else(|e| {
                self.problems.push(Problem::new(
                    "MESH0103",
                    format!("AuthorizationPolicy {}", ap.metadata.key()),
                    format!("{e}; failing closed: the workloads it selects allow nothing"),
                ));
                authz::Policy::fail_closed(ap.metadata.key())
            });
            authz_policies.push((ap.metadata.namespace_or_default(), ap.spec.selector.clone(), Arc::new(compiled)));
        }
        let mut problems = Vec::new();
        for w in &self.workloads {
            let mtls = authz::mtls::resolve(w, &peer_auths, root, &mut problems);
            let selected = authz_policies.iter().filter(|(ns, selector, _)| {
                (*ns == w.namespace || ns == root) && selector.as_ref().is_none_or(|s| s.selects(&w.labels))
            });
            let authz = WorkloadAuthz::new(selected.map(|(_, _, p)| p.clone()));
            self.security.insert(w.key(), Arc::new(WorkloadSecurity { mtls, authz }));
        }
        problems.sort();
        problems.dedup();
        self.problems.extend(problems);
    }

    /// VirtualServices and DestinationRules, resolved to the Services their hosts name.
    /// Objects are taken in `namespace/name` order, so which of two conflicting
    /// VirtualServices wins does not depend on file order.
    fn compile_traffic(&mut self, objects: &[Object]) {
        // The Services' names, borrowed from the index (shared, so `self` stays free to
        // write the routes to).
        let index = self.index.clone();
        let known = index.names();
        for vs in sorted(objects, |o| if let Object::VirtualService(v) = o { Some(&**v) } else { None }) {
            let ns = vs.metadata.namespace_or_default();
            if !Attachment::Mesh.bound_by(&vs.spec.gateways, &ns) {
                continue; // bound to gateways only: not for mesh traffic
            }
            let name = vs.metadata.key();
            let rules = route::compile_rules(vs, &ns, known, Attachment::Mesh);
            let tcp = route::compile_tcp_rules(vs, &ns, known, Attachment::Mesh);
            let tls = route::compile_tls_rules(vs, &ns, known, Attachment::Mesh);
            for host in &vs.spec.hosts {
                let services = route::services_for_host(host, &ns, known);
                if !tls.is_empty() && !services.is_empty() {
                    self.problems.push(Problem::new(
                        "MESH0108",
                        format!("VirtualService {name}"),
                        format!(
                            "tls routes for mesh traffic apply to ServiceEntry hosts; {host} is a Service, whose \
                             connections keep the mesh's own routing"
                        ),
                    ));
                }
                for svc in services.iter().cloned() {
                    let what = format!("VirtualService {name}");
                    self.claim_routes(&what, svc, &name, || (rules.clone(), tcp.clone()));
                }
                if !rules.is_empty() && services.is_empty() {
                    for entry in self.external.keys_naming(host) {
                        let routes =
                            ServiceRoutes { virtual_service: name.clone(), rules: rules.clone(), tcp: Vec::new() };
                        self.external_http.entry(entry).or_insert_with(|| Arc::new(routes));
                    }
                }
                if !tls.is_empty() {
                    let entries = self.external.keys_naming(host);
                    if entries.is_empty() && services.is_empty() {
                        self.problems.push(Problem::new(
                            "MESH0109",
                            format!("VirtualService {name}"),
                            format!(
                                "tls routes for mesh traffic to {host}: no ServiceEntry declares that host, so no \
                                 connection takes them"
                            ),
                        ));
                    }
                    for entry in entries {
                        self.external_tls.entry(entry).or_insert_with(|| Arc::new(tls.clone()));
                    }
                }
            }
        }
        let istio_gateways: Vec<(&Gateway, Option<&str>)> =
            sorted(objects, |o| if let Object::Gateway(g) = o { Some(&**g) } else { None })
                .into_iter()
                .map(|g| (g, None))
                .collect();
        let services: Vec<&VirtualService> =
            sorted(objects, |o| if let Object::VirtualService(v) = o { Some(&**v) } else { None });
        self.compile_gateways(&istio_gateways, &services, known);
        // Gateway API objects, as the Istio Gateways and VirtualServices they amount to.
        let api = translate(objects);
        let api_gateways: Vec<(&Gateway, Option<&str>)> =
            api.gateways.iter().map(|(g, ns)| (g, Some(ns.as_str()))).collect();
        let api_services: Vec<&VirtualService> = api.virtual_services.iter().collect();
        self.compile_gateways(&api_gateways, &api_services, known);
        for (object, why) in &api.problems {
            self.problems.push(Problem::new("MESH0110", object.clone(), why.clone()));
        }
        self.gateway_api_status = Arc::new(api.statuses);
        // Linkerd and SMI route the hosts no VirtualService routes.
        for ts in sorted(objects, |o| if let Object::TrafficSplit(t) = o { Some(&**t) } else { None }) {
            let ns = ts.metadata.namespace_or_default();
            let name = format!("TrafficSplit {ns}/{}", ts.metadata.name);
            match route::service_for_host(&ts.spec.service, &ns, known) {
                Some(svc) => self.claim_routes(&name, svc, &name, || (vec![route::compile_split(ts, &ns)], Vec::new())),
                None => self.problems.push(Problem::unknown_service(
                    name.clone(),
                    format!("root service {} is not a known Service; ignored", ts.spec.service),
                )),
            }
        }
        for sp in sorted(objects, |o| if let Object::ServiceProfile(p) = o { Some(&**p) } else { None }) {
            let ns = sp.metadata.namespace_or_default();
            let name = format!("ServiceProfile {ns}/{}", sp.metadata.name);
            match route::service_for_host(&sp.metadata.name, &ns, known) {
                Some(svc) => {
                    let key = svc.clone();
                    self.claim_routes(&name, svc, &name, || (route::compile_profile(sp, &key), Vec::new()));
                }
                None => self.problems.push(Problem::unknown_service(name.clone(), "names no known Service; ignored")),
            }
        }
        for dr in sorted(objects, |o| if let Object::DestinationRule(d) = o { Some(&**d) } else { None }) {
            let ns = dr.metadata.namespace_or_default();
            let compiled = DestinationPolicy::compile(dr);
            for entry in self.external.keys_naming(&dr.spec.host) {
                self.external_policies.entry(entry).or_insert_with(|| Arc::new(compiled.clone()));
            }
            let services = route::services_for_host(&dr.spec.host, &ns, known);
            if !services.is_empty() && compiled.originates_tls() {
                self.problems.push(Problem::new(
                    "MESH0107",
                    format!("DestinationRule {}", compiled.rule),
                    format!(
                        "tls.mode SIMPLE/MUTUAL is originated toward ServiceEntry hosts only; traffic to {} keeps \
                         the mesh's mutual TLS",
                        services.join(", ")
                    ),
                ));
            }
            for svc in services {
                match self.policies.get_mut(&svc) {
                    Some(existing) => {
                        self.problems.push(Problem::new(
                            "MESH0104",
                            format!("DestinationRule {}", compiled.rule),
                            format!(
                                "host {} is also configured by DestinationRule {}; subsets are merged, the traffic \
                                 policy of {} applies",
                                dr.spec.host, existing.rule, existing.rule
                            ),
                        ));
                        Arc::make_mut(existing).merge_from(&compiled);
                    }
                    None => {
                        self.policies.insert(svc, Arc::new(compiled.clone()));
                    }
                }
            }
        }
        let mut missing = Vec::new();
        for (svc, routes) in &self.routes {
            let http = routes.rules.iter().flat_map(|rule| {
                let routed: Vec<&route::Backend> = match &rule.action {
                    route::Action::Route(b) => b.iter().map(|w| &w.backend).collect(),
                    _ => Vec::new(),
                };
                routed.into_iter().chain(rule.mirrors.iter().map(|(b, _)| b)).map(move |b| (rule.name.as_str(), b))
            });
            let tcp = routes.tcp.iter().flat_map(|t| t.backends.iter().map(|w| ("tcp", &w.backend)));
            for (rule, b) in http.chain(tcp) {
                if self.index.by_key(&b.service).is_none() {
                    missing.push(Problem::unknown_service(
                        format!("VirtualService {}", routes.virtual_service),
                        format!(
                            "rule {rule} routes {svc} to host {}, which is not a known Service; those requests \
                             answer 503",
                            b.service
                        ),
                    ));
                    continue;
                }
                if let Some(subset) = &b.subset
                    && !self.policies.get(&b.service).is_some_and(|p| p.subsets.contains_key(subset))
                {
                    missing.push(Problem::new(
                        "IST0101",
                        format!("VirtualService {}", routes.virtual_service),
                        format!(
                            "rule {rule} routes {svc} to subset {subset} of {}, which no DestinationRule defines; \
                             those requests answer 503",
                            b.service
                        ),
                    ));
                }
            }
        }
        missing.sort();
        missing.dedup();
        self.problems.extend(missing);
    }

    /// Each Gateway (with the namespace its pods must be in, for a Gateway API one) with,
    /// per server port, the hosts of the VirtualServices among `services` bound to it.
    fn compile_gateways<V>(
        &mut self,
        gateways: &[(&Gateway, Option<&str>)],
        services: &[&VirtualService],
        known: &HashMap<String, V>,
    ) {
        for &(gw, pods_namespace) in gateways {
            let key = gw.metadata.key();
            let gw_ns = gw.metadata.namespace_or_default();
            let at = Attachment::Gateway(&key);
            let mut routes: BTreeMap<u16, PortRoutes> = BTreeMap::new();
            for server in gw.spec.servers.iter().filter(|s| s.tls.as_ref().is_some_and(|t| t.https_redirect)) {
                let Some(port) = server.port.as_ref().and_then(|p| u16::try_from(p.number).ok()) else { continue };
                let hosts = server.hosts.iter().map(|h| h.split_once('/').map_or(h.as_str(), |(_, h)| h).to_string());
                routes.entry(port).or_default().https_redirect.extend(hosts);
            }
            for vs in services {
                let ns = vs.metadata.namespace_or_default();
                if !at.bound_by(&vs.spec.gateways, &ns) {
                    continue;
                }
                let mut rules = route::compile_rules(vs, &ns, known, at);
                for rule in &mut rules {
                    self.default_backend_ports(rule);
                }
                let tls = route::compile_tls_rules(vs, &ns, known, at);
                self.add_sni_routes(&mut routes, gw, &gw_ns, vs, &ns, tls);
                let mut tcp = route::compile_tcp_rules(vs, &ns, known, at);
                for b in tcp.iter_mut().flat_map(|r| r.backends.iter_mut()).filter(|b| b.backend.port.is_none()) {
                    b.backend.port = self.sole_port(&b.backend.service);
                }
                for server in gw.spec.servers.iter().filter(|s| s.port.as_ref().is_some_and(|p| p.is_opaque())) {
                    let Some(port) = server.port.as_ref().and_then(|p| u16::try_from(p.number).ok()) else { continue };
                    if !serve_domains(&server.hosts, &gw_ns, &vs.spec.hosts, &ns).is_empty() {
                        routes.entry(port).or_default().tcp.extend(tcp.iter().cloned());
                    }
                }
                let compiled = Arc::new(ServiceRoutes { virtual_service: vs.metadata.key(), rules, tcp: Vec::new() });
                for server in &gw.spec.servers {
                    let Some(port) = server.port.as_ref().and_then(|p| u16::try_from(p.number).ok()) else { continue };
                    for domain in serve_domains(&server.hosts, &gw_ns, &vs.spec.hosts, &ns) {
                        if let Some(owner) = routes.entry(port).or_default().add(domain.clone(), compiled.clone()) {
                            self.problems.push(Problem::new(
                                "IST0109",
                                format!("VirtualService {}", vs.metadata.key()),
                                format!(
                                    "host {domain} on port {port} of gateway {key} is already routed by \
                                     VirtualService {owner}; this one is ignored there"
                                ),
                            ));
                        }
                    }
                }
            }
            let compiled = CompiledGateway {
                key: key.clone(),
                selector: gw.spec.selector.clone(),
                namespace: pods_namespace.map(str::to_owned),
                servers: gw.spec.servers.clone(),
                routes,
            };
            self.gateways.insert(key, Arc::new(compiled));
        }
    }

    /// The TLS routes of `vs` on the PASSTHROUGH servers of `gw`: each SNI host a server
    /// host covers, on the server's port (or the match's).
    fn add_sni_routes(
        &self,
        routes: &mut BTreeMap<u16, PortRoutes>,
        gw: &Gateway,
        gw_ns: &str,
        vs: &VirtualService,
        ns: &str,
        tls: Vec<route::TlsRule>,
    ) {
        use crate::config::gateway::TlsMode;
        for mut rule in tls {
            for b in rule.backends.iter_mut().filter(|b| b.backend.port.is_none()) {
                b.backend.port = self.sole_port(&b.backend.service);
            }
            for server in &gw.spec.servers {
                let passthrough =
                    server.tls.as_ref().is_some_and(|t| t.mode == TlsMode::Passthrough && !t.https_redirect);
                let Some(port) = server.port.as_ref().and_then(|p| u16::try_from(p.number).ok()) else { continue };
                if !passthrough || !server.port.as_ref().is_some_and(|p| p.is_tls()) {
                    continue;
                }
                for (hosts, match_port) in &rule.matches {
                    if match_port.is_some_and(|p| p != port) {
                        continue;
                    }
                    for domain in serve_domains(&server.hosts, gw_ns, hosts, ns) {
                        let entry = routes.entry(port).or_default();
                        if !entry.sni.iter().any(|(d, _, _)| d.eq_ignore_ascii_case(&domain)) {
                            entry.sni.push((domain, vs.metadata.key(), rule.backends.clone()));
                        }
                    }
                }
            }
        }
    }

    /// A gateway is not dialed on a Service's port, so a destination without a port
    /// takes the Service's only port, or else its only HTTP port (by Istio's port-name
    /// protocol selection: `http`, `http-*`, `http2*`, `grpc*`). Istio asks for the
    /// port in that case (IST0112); HTTP routes can only mean an HTTP port.
    fn default_backend_ports(&self, rule: &mut route::Rule) {
        let sole_port = |service: &str| {
            let ports = self.index.by_key(service).map(|s| s.ports.as_slice()).unwrap_or_default();
            if let Some(only) = self.sole_port(service) {
                return Some(only);
            }
            let http = |p: &&ServicePort| {
                p.name.as_deref().is_some_and(|n| {
                    let protocol = n.split('-').next().unwrap_or(n);
                    matches!(protocol, "http" | "http2" | "grpc" | "grpc-web")
                })
            };
            let mut named_http = ports.iter().filter(http);
            match (named_http.next(), named_http.next()) {
                (Some(only), None) => Some(only.port),
                _ => None,
            }
        };
        if let route::Action::Route(backends) = &mut rule.action {
            for b in backends.iter_mut().filter(|b| b.backend.port.is_none()) {
                b.backend.port = sole_port(&b.backend.service);
            }
        }
        for (m, _) in rule.mirrors.iter_mut().filter(|(m, _)| m.port.is_none()) {
            m.port = sole_port(&m.service);
        }
    }

    /// The port of a Service that has one.
    fn sole_port(&self, service: &str) -> Option<u16> {
        match self.index.by_key(service).map(|s| s.ports.as_slice()) {
            Some([only]) => Some(only.port),
            _ => None,
        }
    }

    /// Routes `svc` with `rules` from `owner`, unless another owner routes it already:
    /// then the clash is reported (`what` names the loser) and the first owner stays.
    fn claim_routes(
        &mut self,
        what: &str,
        svc: String,
        owner: &str,
        rules: impl FnOnce() -> (Vec<route::Rule>, Vec<route::TcpRule>),
    ) {
        if let Some(existing) = self.routes.get(&svc) {
            if existing.virtual_service != owner {
                // Owners are `namespace/name` for VirtualServices, `Kind namespace/name`
                // for the Linkerd and SMI kinds, which route only what no VirtualService does.
                let both_virtual_services =
                    what.starts_with("VirtualService ") && !existing.virtual_service.contains(' ');
                let problem = if both_virtual_services {
                    Problem::new(
                        "IST0109",
                        what,
                        format!(
                            "host {svc} is already routed by VirtualService {}; this one is ignored for it (as \
                             Istio's IST0109 for conflicting VirtualServices)",
                            existing.virtual_service
                        ),
                    )
                } else {
                    let by = if existing.virtual_service.contains(' ') {
                        existing.virtual_service.clone()
                    } else {
                        format!("VirtualService {}", existing.virtual_service)
                    };
                    Problem::new(
                        "MESH0105",
                        what,
                        format!(
                            "host {svc} is routed by {by}, which takes precedence; these routes are not used for it"
                        ),
                    )
                };
                self.problems.push(problem);
            }
            return;
        }
        let (rules, tcp) = rules();
        self.routes.insert(svc, Arc::new(ServiceRoutes { virtual_service: owner.to_string(), rules, tcp }));
    }
}

/// A Service whose endpoints are being gathered, from this cluster and then the
/// others, before it is frozen into the snapshot.
pub(super) struct ServiceDraft {
    pub(super) name: String,
    pub(super) namespace: String,
    pub(super) vips: Vec<IpAddr>,
    pub(super) ports: Vec<ServicePort>,
    pub(super) endpoints: Vec<Endpoint>,
}

/// A Service of the snapshot being compiled: taken over whole from the snapshot it
/// replaces, or being gathered.
pub(super) enum Planned {
    Kept(Arc<Service>),
    Draft(ServiceDraft),
}

/// The Services being gathered, in order, found by namespace and name, with the
/// addresses they hold: each remote Service is merged or placed in constant time.
#[derive(Default)]
pub(super) struct ServiceDrafts {
    pub(super) list: Vec<Planned>,
    by_name: HashMap<(String, String), usize>,
    vips: HashSet<IpAddr>,
}

impl ServiceDrafts {
    /// Adds `draft`, which names a Service not held yet.
    pub(super) fn push(&mut self, draft: ServiceDraft) {
        self.by_name.insert((draft.namespace.clone(), draft.name.clone()), self.list.len());
        self.vips.extend(&draft.vips);
        self.list.push(Planned::Draft(draft));
    }

    /// Adds `service`, taken over whole. Not looked up by name or address: that is
    /// for merging other clusters' Services, and nothing is taken over then.
    pub(super) fn keep(&mut self, service: Arc<Service>) {
        self.list.push(Planned::Kept(service));
    }

    /// The Service `namespace/name`, when held and still being gathered (no Service
    /// is taken over when other clusters' objects are merged).
    pub(super) fn get_mut(&mut self, namespace: &str, name: &str) -> Option<&mut ServiceDraft> {
        let i = *self.by_name.get(&(namespace.to_string(), name.to_string()))?;
        match self.list.get_mut(i)? {
            Planned::Draft(draft) => Some(draft),
            Planned::Kept(_) => None,
        }
    }

    /// Whether a Service held has address `vip`.
    pub(super) fn holds_vip(&self, vip: &IpAddr) -> bool {
        self.vips.contains(vip)
    }
}

impl ServiceDraft {
    /// `svc` (in namespace `ns`) with `endpoints`.
    pub(super) fn of(svc: &crate::config::resources::Service, namespace: String, endpoints: Vec<Endpoint>) -> Self {
        let mut vips: Vec<IpAddr> = svc.spec.cluster_ips.iter().filter_map(|s| s.parse().ok()).collect();
        if let Some(ip) = svc.spec.cluster_ip.as_deref().and_then(|s| s.parse().ok())
            && !vips.contains(&ip)
        {
            vips.insert(0, ip);
        }
        let ports = svc
            .spec
            .ports
            .iter()
            .map(|p| ServicePort {
                name: p.name.clone(),
                app_protocol: p.app_protocol.clone(),
                port: p.port,
                target: match &p.target_port {
                    None => TargetPort::Number(p.port),
                    Some(IntOrString::Int(n)) => TargetPort::Number(*n),
                    Some(IntOrString::String(s)) => match s.parse() {
                        Ok(n) => TargetPort::Number(n),
                        Err(_) => TargetPort::Named(s.clone()),
                    },
                },
            })
            .collect();
        Self { name: svc.metadata.name.clone(), namespace, vips, ports, endpoints }
    }
}

/// The serving workloads in `namespace` that `selector` selects, as endpoints.
pub(super) fn selected_endpoints<'a>(
    workloads: &'a [Arc<Workload>],
    namespace: &'a str,
    selector: &'a BTreeMap<String, String>,
) -> impl Iterator<Item = Endpoint> + 'a {
    workloads
        .iter()
        .filter(move |w| selects(w, namespace, selector))
        .filter(|w| w.serving)
        .filter_map(|w| Some(Endpoint { workload: w.clone(), ip: *w.ips.first()?, slice_ports: None }))
}

impl ServiceDraft {
    /// The Service, in runtime slot `index`.
    fn freeze(self, index: usize) -> Service {
        let ServiceDraft { name, namespace, vips, ports, endpoints } = self;
        Service { name, namespace, vips, ports, endpoints, index }
    }
}

/// The runtime slots of a compile's Services ([`Service::index`]): a Service keeps the
/// slot it had in the snapshot replaced; a new one takes the lowest free slot. Without
/// a snapshot to take over from, the slots are the Services' positions.
struct Slots {
    taken: Vec<bool>,
    lowest_free: usize,
}

impl Slots {
    /// The slots with those of the Services taken over marked taken.
    fn new(planned: &[Planned]) -> Self {
        let mut taken = vec![false; planned.len()];
        for p in planned {
            if let Planned::Kept(s) = p {
                if s.index >= taken.len() {
                    taken.resize(s.index + 1, false);
                }
                taken[s.index] = true;
            }
        }
        Self { taken, lowest_free: 0 }
    }

    /// `had`, when free, else the lowest free slot.
    fn take(&mut self, had: Option<usize>) -> usize {
        let slot = match had {
            Some(slot) if !self.taken.get(slot).copied().unwrap_or(false) => slot,
            _ => {
                while self.taken.get(self.lowest_free).copied().unwrap_or(false) {
                    self.lowest_free += 1;
                }
                self.lowest_free
            }
        };
        if slot >= self.taken.len() {
            self.taken.resize(slot + 1, false);
        }
        self.taken[slot] = true;
        slot
    }
}

/// Where a pod's workload is read from: its cluster, and the network its pods are on
/// when neither the pod nor its namespace names one (empty: none named).
pub(super) struct Origin<'a> {
    pub(super) cluster: &'a str,
    pub(super) network: &'a str,
}

impl<'a> Origin<'a> {
    /// This cluster, on the network `values.global.network` names.
    pub(super) fn local(mesh: &'a MeshScope) -> Self {
        Self { cluster: &mesh.cluster_id, network: &mesh.network }
    }
}

/// Istio's convention: the network of a cluster is the label on its system namespace
/// (a namespace's or a pod's own label says otherwise); empty when it names none.
pub(super) fn cluster_network<'a>(namespaces: &'a HashMap<String, NamespaceModes>, mesh: &MeshScope) -> &'a str {
    namespaces.get(&mesh.root_namespace).and_then(|ns| ns.network.as_deref()).unwrap_or("")
}

/// The network `network` when it is not this cluster's (both named). Without a
/// network of its own the mesh makes no such distinction, as Istio with
/// `values.global.network` unset.
pub(super) fn other_network<'a>(network: &'a str, mesh: &MeshScope) -> Option<&'a str> {
    (!mesh.network.is_empty() && !network.is_empty() && network != mesh.network).then_some(network)
}

pub(super) fn workload(
    pod: &Pod,
    mesh: &MeshScope,
    namespaces: &HashMap<String, NamespaceModes>,
    origin: &Origin<'_>,
) -> Workload {
    let namespace = pod.metadata.namespace_or_default();
    let ns = namespaces.get(&namespace).cloned().unwrap_or_default();
    let sa = pod.spec.service_account_name.clone().unwrap_or_else(|| "default".into());
    let opted_out = OPT_OUT_LABELS.iter().any(|(k, v)| pod.metadata.labels.get(*k).is_some_and(|x| x == v));
    let mut ips: Vec<IpAddr> = Vec::new();
    if let Some(ip) = pod.status.pod_ip {
        ips.push(ip);
    }
    for p in &pod.status.pod_ips {
        if !ips.contains(&p.ip) {
            ips.push(p.ip);
        }
    }
    let named_ports = pod
        .spec
        .containers
        .iter()
        .flat_map(|c| &c.ports)
        .filter_map(|p| p.name.clone().map(|n| (n, p.container_port)))
        .collect();
    // A hostNetwork pod is the node as far as the network goes (enrolling it would
    // put STRICT in front of the kubelet); a finished pod has nothing left to capture.
    let capturable = !pod.spec.host_network && !pod.is_finished();
    // A pod's own labels and annotations decide only about its own traffic.
    let opted_in = OPT_IN_LABELS.iter().any(|(k, v)| pod.metadata.labels.get(*k).is_some_and(|x| x == v))
        || pod.metadata.annotations.get(LINKERD_INJECT.0).is_some_and(|v| v == LINKERD_INJECT.1);
    let enrolled = (ns.enrolled || opted_in) && !opted_out && capturable;
    // The pod's own say first: it decides only where its own queries go.
    let pod_dns =
        switch(pod.metadata.annotations.get(DNS_CAPTURE)).or_else(|| switch(pod.metadata.labels.get(DNS_CAPTURE)));
    let identity = Identity::new(&mesh.trust_domain, &namespace, &sa);
    Workload {
        name: pod.metadata.name.clone(),
        enrolled,
        dns_capture: enrolled && pod_dns.or(ns.dns_capture).unwrap_or(mesh.dns_capture),
        meta: Arc::new(workload_meta(pod, &namespace, &identity, origin.cluster)),
        identity,
        namespace,
        labels: pod.metadata.labels.clone(),
        node: pod.spec.node_name.clone(),
        ips,
        named_ports,
        uid: pod.metadata.uid.clone(),
        serving: pod.is_serving(),
        network: pod
            .metadata
            .labels
            .get(NETWORK_LABEL)
            .or(ns.network.as_ref())
            .map_or_else(|| origin.network.to_string(), Clone::clone),
        locality: crate::state::Locality::of_labels(&pod.metadata.labels),
    }
}

/// The settings of Telemetry specs, most specific first: each section from the first
/// spec that has it. Specs are validated: what does not parse here was refused then.
fn telemetry_policy<'a>(specs: impl Iterator<Item = &'a TelemetrySpec> + Clone) -> TelemetryPolicy {
    use crate::config::telemetry as t;
    let sides = |mode: Option<&str>| {
        let (client, server) = t::sides(mode).unwrap_or((true, true));
        Sides { client, server }
    };
    let mut policy = TelemetryPolicy::default();
    if let Some(metrics) = specs.clone().find(|s| !s.metrics.is_empty()) {
        for o in metrics.metrics.iter().flat_map(|m| &m.overrides) {
            let sel = o.match_.clone().unwrap_or_default();
            let which: Vec<usize> = match sel.metric.as_deref() {
                None | Some("ALL_METRICS") => (0..t::METRICS.len()).collect(),
                Some(m) => t::metric_index(m).into_iter().collect(),
            };
            let s = sides(sel.mode.as_deref());
            for m in which {
                for (side, on) in [(0, s.client), (1, s.server)] {
                    let bit = 1u32 << (2 * m + side);
                    match o.disabled {
                        Some(true) if on => policy.disabled_metrics |= bit,
                        Some(false) if on => policy.disabled_metrics &= !bit,
                        _ => {}
                    }
                }
            }
        }
    }
    if let Some(spec) = specs.clone().find(|s| !s.access_logging.is_empty()) {
        let a = &spec.access_logging[0];
        policy.access_log = Some(AccessLogPolicy {
            enabled: a.disabled != Some(true),
            sides: sides(a.match_.as_ref().and_then(|m| m.mode.as_deref())),
            filter: a.filter.as_ref().and_then(|f| t::parse_filter(&f.expression).ok()),
        });
    }
    if let Some(spec) = specs.clone().find(|s| !s.tracing.is_empty()) {
        let tr = &spec.tracing[0];
        let tags = tr
            .custom_tags
            .iter()
            .filter_map(|(name, tag)| {
                let value = match (&tag.literal, &tag.header) {
                    (Some(l), _) => TagValue::Literal(l.value.clone()),
                    (None, Some(h)) => {
                        TagValue::Header { name: h.name.to_ascii_lowercase(), default: h.default_value.clone() }
                    }
                    (None, None) => return None,
                };
                Some((name.clone(), value))
            })
            .collect();
        policy.tracing = Some(TracingPolicy {
            sampling: tr.random_sampling_percentage,
            report: tr.disable_span_reporting != Some(true),
            sides: sides(tr.match_.as_ref().and_then(|m| m.mode.as_deref())),
            tags,
        });
    }
    policy
}

/// How telemetry names `pod`, as Istio does: the workload is its controller (the
/// Deployment behind a ReplicaSet named `<deployment>-<pod-template-hash>`, the
/// CronJob behind a Job named `<cronjob>-<8 to 11 digits>`), else the pod itself;
/// canonical service and revision from Istio's labels with their fallbacks.
fn workload_meta(pod: &Pod, namespace: &str, identity: &Identity, cluster: &str) -> WorkloadMeta {
    let labels = &pod.metadata.labels;
    let controller = pod.metadata.owner_references.iter().find(|o| o.controller == Some(true));
    let workload = match controller {
        Some(owner) if owner.kind == "ReplicaSet" => labels
            .get("pod-template-hash")
            .filter(|h| !h.is_empty())
            .and_then(|hash| owner.name.strip_suffix(hash.as_str())?.strip_suffix('-'))
            .filter(|d| !d.is_empty())
            .unwrap_or(&owner.name)
            .to_string(),
        Some(owner) if owner.kind == "Job" => owner
            .name
            .rsplit_once('-')
            .filter(|(cron, stamp)| {
                !cron.is_empty() && (8..=11).contains(&stamp.len()) && stamp.bytes().all(|b| b.is_ascii_digit())
            })
            .map_or(owner.name.as_str(), |(cron, _)| cron)
            .to_string(),
        Some(owner) => owner.name.clone(),
        None => pod.metadata.name.clone(),
    };
    let first = |keys: &[&str]| keys.iter().find_map(|k| labels.get(*k)).filter(|v| !v.is_empty()).cloned();
    WorkloadMeta {
        canonical_service: first(&["service.istio.io/canonical-name", "app.kubernetes.io/name", "app"])
            .unwrap_or_else(|| workload.clone()),
        canonical_revision: first(&["service.istio.io/canonical-revision", "app.kubernetes.io/version", "version"])
            .unwrap_or_else(|| "latest".into()),
        ..WorkloadMeta::plain(&workload, namespace, identity, cluster)
    }
}

/// The mesh config objects among `objects`, sorted.
fn config_held(objects: &[Object]) -> Vec<(&'static str, String, String)> {
    let mut held: Vec<_> = objects
        .iter()
        .filter(|o| {
            !matches!(
                o,
                Object::Namespace(_)
                    | Object::Pod(_)
                    | Object::Service(_)
                    | Object::EndpointSlice(_)
                    | Object::ServiceAccount(_)
                    | Object::Secret(_)
                    | Object::NetworkPolicy(_)
            )
        })
        .map(Object::key)
        .collect();
    held.sort();
    held
}

/// Endpoints of a Service without a selector in `namespace`, from its EndpointSlices
/// (in order): ready endpoints only, each address once. An address of a known pod is
/// that pod (and enrolled if it is); any other address is a plaintext destination.
pub(super) fn slice_endpoints(
    known: impl Fn(&IpAddr) -> Option<Arc<Workload>>,
    slices: &[Arc<EndpointSlice>],
    (namespace, service): (&str, &str),
    trust_domain: &str,
) -> Vec<Endpoint> {
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    let mut outside: Option<Arc<Workload>> = None;
    for slice in slices {
        let ports: BTreeMap<String, u16> =
            slice.ports.iter().filter_map(|p| Some((p.name.clone().unwrap_or_default(), p.port?))).collect();
        let ports = Arc::new(ports);
        for e in &slice.endpoints {
            if e.conditions.ready == Some(false) || e.conditions.terminating == Some(true) {
                continue;
            }
            let Some(ip) = e.addresses.first().and_then(|a| a.parse::<IpAddr>().ok()) else { continue };
            if !seen.insert(ip) {
                continue;
            }
            let workload = known(&ip).unwrap_or_else(|| {
                outside
                    .get_or_insert_with(|| Arc::new(Workload::outside_service(service, namespace, trust_domain)))
                    .clone()
            });
            out.push(Endpoint { workload, ip, slice_ports: Some(ports.clone()) });
        }
    }
    out.shrink_to_fit();
    out
}

/// The objects `pick` selects, in `namespace/name` order.
fn sorted<'a, S: Default>(
    objects: &'a [Object],
    pick: impl Fn(&'a Object) -> Option<&'a Resource<S>>,
) -> Vec<&'a Resource<S>> {
    let mut found: Vec<_> = objects.iter().filter_map(pick).collect();
    found.sort_by_key(|r| (r.metadata.namespace_or_default(), r.metadata.name.clone()));
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_documents;
    use crate::snapshot::RoundRobin;
    use crate::state::Destination;
    use std::net::SocketAddr;
    use std::path::Path;

    const LAB: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: production, labels: {istio-injection: enabled}}
---
apiVersion: v1
kind: Namespace
metadata: {name: default}
---
apiVersion: v1
kind: Pod
metadata: {name: myapp-v1, namespace: production, labels: {app: myapp, version: v1}}
spec: {serviceAccountName: myapp, nodeName: node2, containers: [{name: app, ports: [{containerPort: 8080, name: http}]}]}
status: {podIP: 10.10.2.2}
---
apiVersion: v1
kind: Pod
metadata: {name: myapp-v2, namespace: production, labels: {app: myapp, version: v2}}
spec: {serviceAccountName: myapp, nodeName: node1}
status: {podIP: 10.10.1.3}
---
apiVersion: v1
kind: Pod
metadata: {name: optout, namespace: production, labels: {app: other, istio.io/dataplane-mode: none}}
spec: {nodeName: node1}
status: {podIP: 10.10.1.9}
---
apiVersion: v1
kind: Pod
metadata: {name: outside, namespace: default}
spec: {nodeName: node1}
status: {podIP: 10.10.1.4}
---
apiVersion: v1
kind: Service
metadata: {name: myapp, namespace: production}
spec: {selector: {app: myapp}, clusterIP: 10.96.0.20, ports: [{port: 80, targetPort: 8080}]}
"#;

    fn lab() -> Snapshot {
        let objs = parse_documents(Path::new("lab.yaml"), LAB).unwrap();
        Snapshot::compile(&objs, "cluster.local", 1)
    }

    #[test]
    fn pods_on_another_network_are_no_endpoints_once_the_cluster_names_its_own() {
        let extra = r#"
---
apiVersion: v1
kind: Namespace
metadata: {name: elsewhere, labels: {istio.io/dataplane-mode: ambient, topology.istio.io/network: network2}}
---
apiVersion: v1
kind: Pod
metadata: {name: myapp-far, namespace: production, labels: {app: myapp, topology.istio.io/network: network2}}
spec: {serviceAccountName: myapp, nodeName: node2}
status: {podIP: 10.20.1.5}
---
apiVersion: v1
kind: Pod
metadata: {name: db-far, namespace: elsewhere, labels: {app: db}}
spec: {nodeName: node2}
status: {podIP: 10.20.1.6}
---
apiVersion: v1
kind: Pod
metadata: {name: db-near, namespace: elsewhere, labels: {app: db, topology.istio.io/network: network1}}
spec: {nodeName: node1}
status: {podIP: 10.10.1.7}
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: elsewhere}
spec: {selector: {app: db}, clusterIP: 10.96.0.30, ports: [{port: 5432}]}
"#;
        let objs = parse_documents(Path::new("lab.yaml"), &format!("{LAB}{extra}")).unwrap();
        let names = |s: &Snapshot, svc: &str, port: u16| -> Vec<String> {
            let mut n: Vec<String> = s.endpoints(svc, None, port).into_iter().map(|(w, _)| w.name.clone()).collect();
            n.sort();
            n
        };
        // No network named: every pod is reached directly, whatever its labels.
        let flat = Snapshot::compile(&objs, "cluster.local", 1);
        assert_eq!(names(&flat, "production/myapp", 80), ["myapp-far", "myapp-v1", "myapp-v2"]);
        assert!(flat.problems.iter().all(|p| p.code != "MESH0111"));

        let mut mesh = MeshScope::new("cluster.local");
        mesh.network = "network1".into();
        let s = Snapshot::compile_in(&objs, &mesh, 1);
        assert_eq!(names(&s, "production/myapp", 80), ["myapp-v1", "myapp-v2"], "the pod's own label");
        assert_eq!(names(&s, "elsewhere/db", 5432), ["db-near"], "its namespace's label, unless the pod says");
        let reported: Vec<&str> =
            s.problems.iter().filter(|p| p.code == "MESH0111").map(|p| p.object.as_str()).collect();
        assert_eq!(reported, ["Pod production/myapp-far", "Pod elsewhere/db-far"]);
        assert!(s.workload_by_ip("10.20.1.5".parse().unwrap()).is_some(), "still a known workload, as a peer");
    }

    #[test]
    fn egress_rules_that_no_connection_takes_are_reported() {
        let extra = r#"
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: api, namespace: production}
spec:
  hosts: [api.example.com]
  ports: [{number: 443, name: tls}]
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: tls-everywhere, namespace: production}
spec:
  hosts: [api.example.com, myapp, nowhere.example.com]
  tls:
  - match: [{port: 443, sniHosts: [api.example.com, myapp, nowhere.example.com]}]
    route: [{destination: {host: api.example.com, port: {number: 443}}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: myapp-tls, namespace: production}
spec: {host: myapp, trafficPolicy: {tls: {mode: SIMPLE}}}
"#;
        let objs = parse_documents(Path::new("lab.yaml"), &format!("{LAB}{extra}")).unwrap();
        let s = Snapshot::compile(&objs, "cluster.local", 1);
        let codes: Vec<(&str, &str)> = s.problems.iter().map(|p| (p.code, p.object.as_str())).collect();
        assert!(codes.contains(&("MESH0107", "DestinationRule production/myapp-tls")), "{codes:?}");
        assert!(codes.contains(&("MESH0108", "VirtualService production/tls-everywhere")), "{codes:?}");
        assert!(codes.contains(&("MESH0109", "VirtualService production/tls-everywhere")), "{codes:?}");
        assert!(s.has_external_tls_routes("production/api"));
    }

    #[test]
    fn enrollment_follows_namespace_label_and_pod_opt_out() {
        let s = lab();
        let enrolled: Vec<_> = s.workloads.iter().filter(|w| w.enrolled).map(|w| w.name.as_str()).collect();
        assert_eq!(enrolled, ["myapp-v1", "myapp-v2"]);
        let local: Vec<_> = s.local_enrolled("node1").map(|w| w.name.as_str()).collect();
        assert_eq!(local, ["myapp-v2"]);
        assert_eq!(s.workloads[0].identity.to_string(), "spiffe://cluster.local/ns/production/sa/myapp");
    }

    #[test]
    fn a_pod_enrolls_itself_in_a_namespace_that_is_not_and_opting_out_wins() {
        let yaml = r#"
apiVersion: v1
kind: Namespace
metadata: {name: plain}
---
apiVersion: v1
kind: Pod
metadata: {name: injected, namespace: plain, annotations: {linkerd.io/inject: enabled}}
spec: {nodeName: node1}
status: {podIP: 10.10.1.21}
---
apiVersion: v1
kind: Pod
metadata: {name: ambient, namespace: plain, labels: {istio.io/dataplane-mode: ambient}}
spec: {nodeName: node1}
status: {podIP: 10.10.1.22}
---
apiVersion: v1
kind: Pod
metadata: {name: both, namespace: plain, labels: {istio.io/dataplane-mode: none, sidecar.istio.io/inject: "true"}}
spec: {nodeName: node1}
status: {podIP: 10.10.1.23}
---
apiVersion: v1
kind: Pod
metadata: {name: neighbour, namespace: plain}
spec: {nodeName: node1}
status: {podIP: 10.10.1.24}
"#;
        let s = Snapshot::compile(&parse_documents(Path::new("p.yaml"), yaml).unwrap(), "cluster.local", 1);
        let local: Vec<_> = s.local_enrolled("node1").map(|w| w.name.as_str()).collect();
        assert_eq!(local, ["injected", "ambient"]);
        // The namespace itself is not enrolled: its other pods are not.
        assert!(!s.enrolled_namespaces().contains("plain"));
    }

    #[test]
    fn dns_capture_follows_the_pod_then_its_namespace_then_the_mesh() {
        let yaml = r#"
apiVersion: v1
kind: Namespace
metadata: {name: on, labels: {istio-injection: enabled, ambient.istio.io/dns-capture: "true"}}
---
apiVersion: v1
kind: Namespace
metadata: {name: off, labels: {istio-injection: enabled, ambient.istio.io/dns-capture: "False"}}
---
apiVersion: v1
kind: Namespace
metadata: {name: silent, labels: {istio-injection: enabled}}
---
apiVersion: v1
kind: Namespace
metadata: {name: outside, labels: {ambient.istio.io/dns-capture: "true"}}
---
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: on}
spec: {nodeName: node1}
---
apiVersion: v1
kind: Pod
metadata: {name: b, namespace: on, annotations: {ambient.istio.io/dns-capture: "false"}}
spec: {nodeName: node1}
---
apiVersion: v1
kind: Pod
metadata: {name: c, namespace: off}
spec: {nodeName: node1}
---
apiVersion: v1
kind: Pod
metadata: {name: d, namespace: off, annotations: {ambient.istio.io/dns-capture: "true"}}
spec: {nodeName: node1}
---
apiVersion: v1
kind: Pod
metadata: {name: e, namespace: silent}
spec: {nodeName: node1}
---
apiVersion: v1
kind: Pod
metadata: {name: f, namespace: outside, annotations: {ambient.istio.io/dns-capture: "true"}}
spec: {nodeName: node1}
"#;
        let objects = parse_documents(Path::new("dns.yaml"), yaml).unwrap();
        let captured = |mesh_default: bool| -> Vec<String> {
            let mesh = MeshScope { dns_capture: mesh_default, ..MeshScope::new("cluster.local") };
            let s = Snapshot::compile_in(&objects, &mesh, 1);
            s.workloads.iter().filter(|w| w.dns_capture).map(|w| w.name.clone()).collect()
        };
        // A pod outside the mesh is never captured, whatever it says.
        assert_eq!(captured(false), ["a", "d"]);
        assert_eq!(captured(true), ["a", "d", "e"]);
    }

    #[test]
    fn host_network_and_finished_pods_are_never_enrolled_nor_found_by_address() {
        let turns = RoundRobin::default();
        let yaml = r#"
apiVersion: v1
kind: Namespace
metadata: {name: production, labels: {istio-injection: enabled}}
---
apiVersion: v1
kind: Pod
metadata: {name: node-exporter, namespace: production, uid: 6f1e0c9a-0000-4000-8000-000000000001}
spec: {nodeName: node1, hostNetwork: true}
status: {podIP: 10.0.0.5, phase: Running}
---
apiVersion: v1
kind: Pod
metadata: {name: batch-job, namespace: production, uid: 6f1e0c9a-0000-4000-8000-000000000002}
spec: {nodeName: node1}
status: {podIP: 10.10.1.9, phase: Succeeded}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: production, uid: 6f1e0c9a-0000-4000-8000-000000000003}
spec: {nodeName: node1}
status: {podIP: 10.10.1.10, phase: Running}
"#;
        let s = Snapshot::compile(&parse_documents(Path::new("p.yaml"), yaml).unwrap(), "cluster.local", 1);
        let local: Vec<_> = s.local_enrolled("node1").map(|w| w.name.as_str()).collect();
        assert_eq!(local, ["web"], "STRICT in front of the node's own address would cut off the kubelet");
        // The node's address belongs to no pod; a finished pod's address is free for reuse.
        assert!(s.workload_by_ip("10.0.0.5".parse().unwrap()).is_none());
        assert!(s.workload_by_ip("10.10.1.9".parse().unwrap()).is_none());
        assert!(matches!(
            s.resolve("10.0.0.5:9100".parse().unwrap(), &turns),
            Destination::Passthrough { workload: None, .. }
        ));
        assert_eq!(s.workload_by_ip("10.10.1.10".parse().unwrap()).map(|w| w.name.as_str()), Some("web"));
    }

    #[test]
    fn vip_resolves_round_robin_to_target_port() {
        let turns = RoundRobin::default();
        let s = lab();
        let vip: SocketAddr = "10.96.0.20:80".parse().unwrap();
        let mut seen = Vec::new();
        for _ in 0..4 {
            match s.resolve(vip, &turns) {
                Destination::Mesh { addr, service, .. } => {
                    assert_eq!(service.as_deref(), Some("production/myapp"));
                    seen.push(addr.to_string());
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(seen, ["10.10.2.2:8080", "10.10.1.3:8080", "10.10.2.2:8080", "10.10.1.3:8080"]);
    }

    #[test]
    fn unknown_port_of_vip_and_plain_addresses() {
        let turns = RoundRobin::default();
        let s = lab();
        assert!(matches!(s.resolve("10.96.0.20:81".parse().unwrap(), &turns), Destination::NoEndpoints { .. }));
        assert!(matches!(
            s.resolve("10.10.1.4:8080".parse().unwrap(), &turns),
            Destination::Passthrough { workload: Some(_), .. }
        ));
        assert!(matches!(
            s.resolve("192.0.2.1:443".parse().unwrap(), &turns),
            Destination::Passthrough { workload: None, .. }
        ));
    }

    const ROUTES: &str = r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: myapp, namespace: production}
spec: {host: myapp, subsets: [{name: v1, labels: {version: v1}}]}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: b-second, namespace: production}
spec: {hosts: [myapp.production.svc.cluster.local], http: [{route: [{destination: {host: myapp}}]}]}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: a-first, namespace: production}
spec: {hosts: [myapp], http: [{route: [{destination: {host: myapp, subset: v1}}]}]}
"#;

    #[test]
    fn conflicting_virtualservices_first_by_name_wins_and_the_clash_is_reported() {
        let mut objs = parse_documents(Path::new("lab.yaml"), LAB).unwrap();
        objs.extend(parse_documents(Path::new("routes.yaml"), ROUTES).unwrap());
        let s = Snapshot::compile(&objs, "cluster.local", 1);
        let routes = s.routes("production/myapp").expect("routed");
        assert_eq!(routes.virtual_service, "production/a-first");
        assert!(s.problems.iter().any(|p| p.object.contains("b-second") && p.code == "IST0109"), "{:?}", s.problems);
        let v1: Vec<_> =
            s.endpoints("production/myapp", Some("v1"), 80).into_iter().map(|(w, a)| (w.name.clone(), a)).collect();
        assert_eq!(v1, vec![("myapp-v1".to_string(), "10.10.2.2:8080".parse().unwrap())]);
        assert!(s.endpoints("production/myapp", Some("v9"), 80).is_empty(), "unknown subset has no endpoints");
    }

    const ENDPOINTS: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: myapp-v3, namespace: production, labels: {app: myapp, version: v3}}
spec: {serviceAccountName: myapp, nodeName: node1}
status: {podIP: 10.10.1.7, phase: Running, conditions: [{type: Ready, status: "False"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: myapp-old, namespace: production, labels: {app: myapp}, deletionTimestamp: "2026-12-02T10:00:00Z"}
spec: {serviceAccountName: myapp, nodeName: node1}
status: {podIP: 10.10.1.8, phase: Running, conditions: [{type: Ready, status: "True"}]}
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: production}
spec: {clusterIP: 10.96.0.30, ports: [{name: sql, port: 5432}, {name: admin, port: 9000}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: db-b, namespace: production, labels: {kubernetes.io/service-name: db}}
addressType: IPv4
ports: [{name: sql, port: 15432}]
endpoints:
- {addresses: [192.0.2.10], conditions: {ready: true}}
- {addresses: [192.0.2.11], conditions: {ready: false}}
- {addresses: [10.10.2.2], targetRef: {kind: Pod, name: myapp-v1}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: db-a, namespace: production, labels: {kubernetes.io/service-name: db}}
addressType: IPv4
ports: [{name: sql, port: 15432}, {name: admin, port: 9001}]
endpoints:
- {addresses: [192.0.2.12], conditions: {terminating: true}}
- {addresses: [192.0.2.10]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: db-names, namespace: production, labels: {kubernetes.io/service-name: db}}
addressType: FQDN
ports: [{name: sql, port: 5432}]
endpoints: [{addresses: [db.example.com]}]
"#;

    fn with_endpoints() -> Snapshot {
        let mut objs = parse_documents(Path::new("lab.yaml"), LAB).unwrap();
        objs.extend(parse_documents(Path::new("endpoints.yaml"), ENDPOINTS).unwrap());
        Snapshot::compile(&objs, "cluster.local", 1)
    }

    #[test]
    fn selected_pods_that_are_not_ready_or_terminating_are_not_endpoints() {
        let s = with_endpoints();
        let names: Vec<_> =
            s.endpoints("production/myapp", None, 80).into_iter().map(|(w, _)| w.name.clone()).collect();
        assert_eq!(names, ["myapp-v1", "myapp-v2"]);
        assert!(s.workload_by_ip("10.10.1.7".parse().unwrap()).is_some(), "still a workload: its traffic is captured");
    }

    #[test]
    fn a_service_without_selector_takes_ready_endpoints_from_its_slices() {
        let turns = RoundRobin::default();
        let s = with_endpoints();
        let sql: Vec<_> = s
            .endpoints("production/db", None, 5432)
            .into_iter()
            .map(|(w, a)| (w.name.clone(), w.enrolled, a.to_string()))
            .collect();
        // Slice order by name (db-a first), each address once, not-ready and
        // terminating ones left out, FQDN skipped; a pod's address is that pod, any
        // other stands as the Service (one stand-in for all of them).
        assert_eq!(
            sql,
            [
                ("db".to_string(), false, "192.0.2.10:15432".to_string()),
                ("myapp-v1".to_string(), true, "10.10.2.2:15432".to_string()),
            ]
        );
        // A port is served only where the endpoint's slice lists it.
        let admin: Vec<_> = s.endpoints("production/db", None, 9000).into_iter().map(|(_, a)| a.to_string()).collect();
        assert_eq!(admin, ["192.0.2.10:9001"]);
        match s.resolve("10.96.0.30:9000".parse().unwrap(), &turns) {
            Destination::Passthrough { addr, workload: Some(_), .. } => assert_eq!(addr.to_string(), "192.0.2.10:9001"),
            other => panic!("unexpected {other:?}"),
        }
        // Round robin over both: the external address in plaintext, the pod over mTLS.
        let mut kinds: Vec<&str> = (0..2)
            .map(|_| match s.resolve("10.96.0.30:5432".parse().unwrap(), &turns) {
                Destination::Mesh { .. } => "mesh",
                Destination::Passthrough { .. } => "plaintext",
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        kinds.sort();
        assert_eq!(kinds, ["mesh", "plaintext"]);
    }

    /// A Service with many addresses outside the mesh holds one stand-in for all of
    /// them (at 100,000 endpoints, copies cost 55 MB), and each endpoint is still
    /// named, dialled and answered in DNS by its own address.
    #[test]
    fn addresses_outside_the_mesh_share_one_stand_in() {
        let yaml = "apiVersion: v1\nkind: Service\nmetadata: {name: ext, namespace: default}\n\
                    spec: {clusterIP: None, ports: [{name: http, port: 80}]}\n---\n\
                    apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
                    metadata: {name: ext-a, namespace: default, labels: {kubernetes.io/service-name: ext}}\n\
                    addressType: IPv4\nports: [{name: http, port: 8080}]\n\
                    endpoints: [{addresses: [192.0.2.1]}, {addresses: [192.0.2.2]}, {addresses: [192.0.2.3]}]\n";
        let s = Snapshot::compile(&parse_documents(Path::new("ext.yaml"), yaml).unwrap(), "cluster.local", 1);
        let service = s.service("default/ext").expect("compiled");
        let [a, b, c] = &service.endpoints[..] else { panic!("{:?}", service.endpoints) };
        assert!(Arc::ptr_eq(&a.workload, &b.workload) && Arc::ptr_eq(&b.workload, &c.workload));
        assert!(!a.workload.enrolled);
        let names: Vec<_> = service.endpoints.iter().map(Endpoint::name).collect();
        assert_eq!(names, ["192.0.2.1", "192.0.2.2", "192.0.2.3"]);
        let addrs: Vec<_> = s.endpoints("default/ext", None, 80).into_iter().map(|(_, a)| a.to_string()).collect();
        assert_eq!(addrs, ["192.0.2.1:8080", "192.0.2.2:8080", "192.0.2.3:8080"]);
        let dns = s.dns_addresses("ext.default.svc.cluster.local", "default").expect("headless answers");
        assert_eq!(dns.len(), 3, "{dns:?}");
    }

    #[test]
    fn endpoint_slices_are_validated_by_field() {
        let bad = "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: db-x, namespace: production}\naddressType: IPv4\nendpoints: [{addresses: [\"fe80::1\"]}]\n";
        let e = parse_documents(Path::new("bad.yaml"), bad).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("endpoints[0].addresses[0]"));
        assert!(e.reason.contains("not an IPv4 address"), "{e}");
        let bad_type = bad.replace("IPv4", "IPX");
        let e = parse_documents(Path::new("bad.yaml"), &bad_type).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("addressType"));
    }

    #[test]
    fn the_config_digest_follows_content_not_arrival_order() {
        let objs = parse_documents(Path::new("lab.yaml"), LAB).unwrap();
        let mut reversed = objs.clone();
        reversed.reverse();
        let a = Snapshot::compile(&objs, "cluster.local", 1).config_digest().to_string();
        assert_eq!(a.len(), 16);
        assert_eq!(a, Snapshot::compile(&reversed, "cluster.local", 7).config_digest());
        let edited = parse_documents(Path::new("lab.yaml"), &LAB.replace("10.10.1.4", "10.10.1.5")).unwrap();
        assert_ne!(a, Snapshot::compile(&edited, "cluster.local", 1).config_digest());
        assert_eq!(Snapshot::default().config_digest(), "", "no config yet: no digest");
    }
}

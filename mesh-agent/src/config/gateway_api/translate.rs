//! Gateway API objects as the Istio objects the gateway engine serves, and the status a
//! controller writes back, the way Istio's own conversion does it:
//! - each listener of a Gateway the mesh controls becomes one Istio `Gateway` named
//!   `<gateway>~<listener>` with one server, selecting the Gateway's own pods (in its
//!   namespace);
//! - the routes attached to a listener become one `VirtualService` per host it serves,
//!   bound to that listener only, with every route's matches in Gateway API precedence
//!   (exact path, longest prefix, method, most headers, most query parameters, oldest
//!   route), since a VirtualService takes its first match;
//! - a `PathPrefix` match (`/a` matches `/a` and `/a/b`, never `/ab`) is an exact match
//!   and a prefix match on `/a/`;
//! - backends a route may not use (unknown Service, another namespace without a
//!   ReferenceGrant, another kind) keep their share of requests, answered 500, as the
//!   API says.

use std::collections::{BTreeMap, HashMap};

use serde_json::{Value, json};

use super::super::Object;
use super::super::gateway::{Gateway, GatewaySpec, Server, ServerPort, ServerTls, TlsMode};
use super::super::istio::{
    self, Destination, FaultAbort, HeaderOperations, Headers, HttpDirectResponse, HttpFault, HttpMatchRequest,
    HttpMirrorPolicy, HttpRedirect, HttpRetry, HttpRewrite, Percent, PortSelector, RegexRewrite, StringMatch,
    VirtualService, VirtualServiceSpec,
};
use super::super::resources::{ObjectMeta, Service};
use super::{
    BackendRef, CONTROLLER_NAME, DEFAULT_CLASS, EAST_WEST_CLASS, GATEWAY_NAME_LABEL, GROUP, GatewayClass, GrpcRoute,
    HBONE_PROTOCOL, HeaderModifier, HttpRoute, HttpRouteFilter, KubeGateway, Listener, ParentReference, ReferenceGrant,
    ValueMatch,
};

/// What the Gateway API objects among a config amount to.
#[derive(Debug, Default)]
pub struct Translation {
    /// Istio Gateways, one per listener served, each with the namespace its pods must be
    /// in.
    pub gateways: Vec<(Gateway, String)>,
    /// VirtualServices bound to them.
    pub virtual_services: Vec<VirtualService>,
    /// The status of each object the mesh controls.
    pub statuses: Vec<ObjectStatus>,
    /// What does not work as written, `(object, why)`.
    pub problems: Vec<(String, String)>,
}

/// The status one object should carry.
#[derive(Debug, Clone, PartialEq)]
pub struct ObjectStatus {
    /// `GatewayClass`, `Gateway`, `HTTPRoute` or `GRPCRoute`.
    pub kind: &'static str,
    /// Namespace (empty for a GatewayClass).
    pub namespace: String,
    /// Name.
    pub name: String,
    /// The `status` object, conditions without their transition times.
    pub status: Value,
}

/// One condition.
fn condition(kind: &str, ok: bool, reason: &str, message: impl Into<String>, generation: Option<i64>) -> Value {
    let mut c = json!({
        "type": kind,
        "status": if ok { "True" } else { "False" },
        "reason": reason,
        "message": message.into(),
    });
    if let Some(g) = generation {
        c["observedGeneration"] = json!(g);
    }
    c
}

/// A route of either kind, as the translation reads it.
struct Route<'a> {
    kind: &'static str,
    meta: &'a ObjectMeta,
    parents: &'a [ParentReference],
    hostnames: &'a [String],
    /// Per rule: its entries (one per Istio match), before a gateway binds them.
    rules: Vec<Vec<Entry>>,
    /// Why some backend cannot be used, if one cannot.
    unresolved: Option<(&'static str, String)>,
}

impl<'a> Route<'a> {
    fn of<R>(
        kind: &'static str,
        r: &'a super::super::resource::Resource<super::RouteSpec<R>>,
        rules: Vec<Vec<Entry>>,
        unresolved: Option<(&'static str, String)>,
    ) -> Self {
        Route { kind, meta: &r.metadata, parents: &r.spec.parent_refs, hostnames: &r.spec.hostnames, rules, unresolved }
    }
}

/// One Istio rule with the precedence of its match.
#[derive(Clone)]
struct Entry {
    rank: Rank,
    rule: istio::HttpRoute,
}

/// Gateway API match precedence, smallest first.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Rank {
    /// 0 exact, 1 regular expression, 2 prefix.
    path_kind: u8,
    /// Longer paths first.
    path_len: std::cmp::Reverse<usize>,
    /// A method match first.
    no_method: bool,
    headers: std::cmp::Reverse<usize>,
    query: std::cmp::Reverse<usize>,
    /// Oldest route first, then by namespace/name, then rule and match order.
    created: String,
    key: String,
    rule: usize,
    index: usize,
}

/// Per route and parent index: on how many listeners the route attached, and why not
/// where it did not.
type Attachments = HashMap<(usize, usize), (usize, Option<(&'static str, String)>)>;

/// What backends may be: the Services, and who may refer to whom across namespaces.
struct Refs<'a> {
    services: HashMap<(String, String), &'a Service>,
    grants: Grants<'a>,
}

/// Who may refer to whom across namespaces.
struct Grants<'a>(Vec<&'a ReferenceGrant>);

impl Grants<'_> {
    fn allow(&self, from_kind: &str, from_ns: &str, to_kind: &str, to_ns: &str, to_name: &str) -> bool {
        from_ns == to_ns
            || self.0.iter().any(|g| {
                g.metadata.namespace_or_default() == to_ns
                    && g.spec.from.iter().any(|f| f.group == GROUP && f.kind == from_kind && f.namespace == from_ns)
                    && g.spec.to.iter().any(|t| {
                        t.group.is_empty() && t.kind == to_kind && t.name.as_deref().is_none_or(|n| n == to_name)
                    })
            })
    }
}

/// The Gateway API objects in `objects`, as Istio objects and statuses.
pub fn translate(objects: &[Object]) -> Translation {
    let mut out = Translation::default();
    let mut classes: HashMap<&str, &GatewayClass> = HashMap::new();
    let mut gateways: Vec<&KubeGateway> = Vec::new();
    let mut routes: Vec<Route<'_>> = Vec::new();
    let mut grants = Vec::new();
    let mut all_services: Vec<&Service> = Vec::new();
    let mut namespaces: HashMap<&str, &BTreeMap<String, String>> = HashMap::new();
    for o in objects {
        match o {
            Object::GatewayClass(c) => {
                classes.insert(&c.metadata.name, c);
            }
            Object::KubeGateway(g) => gateways.push(g),
            Object::ReferenceGrant(g) => grants.push(&**g),
            Object::Service(s) => all_services.push(s),
            Object::Namespace(n) => {
                namespaces.insert(&n.metadata.name, &n.metadata.labels);
            }
            _ => {}
        }
    }
    let any_route = objects.iter().any(|o| matches!(o, Object::HttpRoute(_) | Object::GrpcRoute(_)));
    if gateways.is_empty() && classes.is_empty() && !any_route {
        return out; // no Gateway API objects: the common case costs one pass
    }
    let services: HashMap<(String, String), &Service> =
        all_services.into_iter().map(|s| ((s.metadata.namespace_or_default(), s.metadata.name.clone()), s)).collect();
    let refs = Refs { services, grants: Grants(grants) };
    for o in objects {
        match o {
            Object::HttpRoute(r) => routes.push(http_route(r, &refs)),
            Object::GrpcRoute(r) => routes.push(grpc_route(r, &refs)),
            _ => {}
        }
    }
    let ours = |class: &str| match classes.get(class) {
        Some(c) => c.spec.controller_name == CONTROLLER_NAME,
        None => class == DEFAULT_CLASS || class == EAST_WEST_CLASS,
    };
    let mut class_names: Vec<&&str> = classes.keys().collect();
    class_names.sort();
    for name in class_names {
        let c = classes[*name];
        if c.spec.controller_name == CONTROLLER_NAME {
            out.statuses.push(ObjectStatus {
                kind: "GatewayClass",
                namespace: String::new(),
                name: c.metadata.name.clone(),
                status: json!({"conditions": [condition("Accepted", true, "Accepted", "Handled by the mesh", c.metadata.generation)]}),
            });
        }
    }
    gateways.sort_by_key(|g| g.metadata.key());
    routes.sort_by(|a, b| (a.meta.key(), a.kind).cmp(&(b.meta.key(), b.kind)));
    let by_key: HashMap<(String, &str), &KubeGateway> =
        gateways.iter().map(|g| ((g.metadata.namespace_or_default(), g.metadata.name.as_str()), *g)).collect();
    // The (route, parent) pairs naming each Gateway, found once rather than per listener.
    let mut naming: HashMap<(String, &str), Vec<(usize, usize)>> = HashMap::new();
    for (ri, route) in routes.iter().enumerate() {
        for (pi, parent) in route.parents.iter().enumerate().filter(|(_, p)| parent_is_gateway(p)) {
            let gw_ns = parent.namespace.clone().unwrap_or_else(|| route.meta.namespace_or_default());
            naming.entry((gw_ns, parent.name.as_str())).or_default().push((ri, pi));
        }
    }
    // Per route and parent index: (listeners accepted on, why not where refused).
    let mut attachments: Attachments = HashMap::new();
    for gw in gateways.iter().filter(|g| ours(&g.spec.gateway_class_name)) {
        let key = (gw.metadata.namespace_or_default(), gw.metadata.name.as_str());
        let naming = naming.get(&key).map_or(&[][..], Vec::as_slice);
        translate_gateway(gw, objects, &refs.services, &namespaces, (&routes, naming), &mut attachments, &mut out);
    }
    for (ri, route) in routes.iter().enumerate() {
        let ns = route.meta.namespace_or_default();
        let mut parents = Vec::new();
        for (pi, parent) in route.parents.iter().enumerate() {
            let object = format!("{} {}", route.kind, route.meta.key());
            if !parent_is_gateway(parent) {
                out.problems.push((
                    object,
                    format!(
                        "parentRefs[{pi}] is a {}: only Gateways are served by this version (mesh routing with \
                         Service parents is not supported yet)",
                        parent.kind.as_deref().unwrap_or("Gateway")
                    ),
                ));
                continue;
            }
            let gw_ns = parent.namespace.clone().unwrap_or_else(|| ns.clone());
            let Some(gw) = by_key.get(&(gw_ns.clone(), parent.name.as_str())) else {
                // No controller owns a missing Gateway's status: say it here.
                out.problems.push((
                    object,
                    format!("parentRefs[{pi}] names Gateway {gw_ns}/{}, which does not exist", parent.name),
                ));
                continue;
            };
            if !ours(&gw.spec.gateway_class_name) {
                continue;
            }
            let (attached, why) = attachments.get(&(ri, pi)).cloned().unwrap_or((0, None));
            let accepted = if attached > 0 {
                condition("Accepted", true, "Accepted", "Attached", route.meta.generation)
            } else {
                let (reason, message) = why.unwrap_or(("NoMatchingParent", "no listener matches the parentRef".into()));
                out.problems
                    .push((object.clone(), format!("not attached to Gateway {gw_ns}/{}: {message}", parent.name)));
                condition("Accepted", false, reason, message, route.meta.generation)
            };
            let resolved = match &route.unresolved {
                None => {
                    condition("ResolvedRefs", true, "ResolvedRefs", "All references resolved", route.meta.generation)
                }
                Some((reason, message)) => {
                    out.problems.push((object.clone(), format!("{message}; its share of requests is answered 500")));
                    condition("ResolvedRefs", false, reason, message.clone(), route.meta.generation)
                }
            };
            parents.push(json!({
                "parentRef": parent_ref_json(parent),
                "controllerName": CONTROLLER_NAME,
                "conditions": [accepted, resolved],
            }));
        }
        if !parents.is_empty() {
            out.statuses.push(ObjectStatus {
                kind: route.kind,
                namespace: ns,
                name: route.meta.name.clone(),
                status: json!({ "parents": parents }),
            });
        }
    }
    out.problems.sort();
    out.problems.dedup();
    out
}

fn parent_is_gateway(p: &ParentReference) -> bool {
    p.group.as_deref().unwrap_or(GROUP) == GROUP && p.kind.as_deref().unwrap_or("Gateway") == "Gateway"
}

fn parent_ref_json(p: &ParentReference) -> Value {
    let mut v = json!({"group": p.group.as_deref().unwrap_or(GROUP), "kind": p.kind.as_deref().unwrap_or("Gateway"), "name": p.name});
    if let Some(ns) = &p.namespace {
        v["namespace"] = json!(ns);
    }
    if let Some(s) = &p.section_name {
        v["sectionName"] = json!(s);
    }
    if let Some(port) = p.port {
        v["port"] = json!(port);
    }
    v
}

/// One Gateway: its listeners as Istio Gateways, the routes attached to each as
/// VirtualServices, and its status.
fn translate_gateway<'a>(
    gw: &KubeGateway,
    objects: &[Object],
    services: &HashMap<(String, String), &Service>,
    namespaces: &HashMap<&str, &BTreeMap<String, String>>,
    (routes, naming): (&[Route<'a>], &[(usize, usize)]),
    attachments: &mut Attachments,
    out: &mut Translation,
) {
    let ns = gw.metadata.namespace_or_default();
    let name = &gw.metadata.name;
    let generation = gw.metadata.generation;
    let object = format!("Gateway.gateway.networking.k8s.io {ns}/{name}");
    // Who serves it: the Service an address names (manual deployment), or the pods
    // labelled with the Gateway's name.
    let mut selector: Option<BTreeMap<String, String>> =
        Some([(GATEWAY_NAME_LABEL.to_string(), name.clone())].into_iter().collect());
    let mut addresses = Vec::new();
    let mut refused_address = None;
    for a in &gw.spec.addresses {
        match a.address_type.as_deref().unwrap_or("IPAddress") {
            "Hostname" => {
                let svc = a
                    .value
                    .strip_suffix(".svc.cluster.local")
                    .or_else(|| a.value.strip_suffix(".svc"))
                    .and_then(|s| s.split_once('.'))
                    .filter(|(_, svc_ns)| *svc_ns == ns)
                    .and_then(|(svc, _)| services.get(&(ns.clone(), svc.to_string())));
                match svc {
                    Some(s) if !s.spec.selector.is_empty() => {
                        selector = Some(s.spec.selector.clone());
                        addresses.push(json!({"type": "Hostname", "value": a.value}));
                    }
                    _ => {
                        refused_address = Some(format!(
                            "address {}: not a Service with a selector in namespace {ns} (<name>.{ns}.svc.cluster.local)",
                            a.value
                        ));
                    }
                }
            }
            _ => {
                refused_address = Some(format!(
                    "address {}: IP addresses are assigned by the gateway's Service, not requested here",
                    a.value
                ));
            }
        }
    }
    if let Some(why) = &refused_address {
        selector = None;
        out.problems.push((object.clone(), format!("{why}; the Gateway is not served")));
    }
    let pods: Vec<String> = selector
        .as_ref()
        .map(|sel| {
            objects
                .iter()
                .filter_map(|o| match o {
                    Object::Pod(p) if p.metadata.namespace_or_default() == ns && !p.is_finished() => Some(p),
                    _ => None,
                })
                .filter(|p| sel.iter().all(|(k, v)| p.metadata.labels.get(k) == Some(v)))
                .filter_map(|p| p.status.pod_ip.map(|ip| ip.to_string()))
                .collect()
        })
        .unwrap_or_default();
    if addresses.is_empty() {
        addresses = pods.iter().map(|ip| json!({"type": "IPAddress", "value": ip})).collect();
    }
    let mut listener_statuses = Vec::new();
    for listener in &gw.spec.listeners {
        let mut conditions = Vec::new();
        let east_west = listener.protocol == HBONE_PROTOCOL;
        let supported = listener.protocol == "HTTP" || listener.protocol == "HTTPS" || east_west;
        let allowed_kinds: Vec<&str> = match listener.allowed_routes.as_ref().map(|a| a.kinds.as_slice()) {
            // No route attaches to an HBONE listener: its streams name their pods.
            _ if east_west => Vec::new(),
            Some(kinds) if !kinds.is_empty() => kinds
                .iter()
                .filter(|k| k.group.as_deref().unwrap_or(GROUP) == GROUP)
                .filter_map(|k| ["HTTPRoute", "GRPCRoute"].into_iter().find(|s| *s == k.kind))
                .collect(),
            _ => vec!["HTTPRoute", "GRPCRoute"],
        };
        let certificate = match (&listener.tls, supported) {
            (Some(tls), true) if !east_west => Some(certificate_ref(tls.certificate_refs.first(), &ns, objects)),
            _ => None,
        };
        let mut attached = 0usize;
        let server_key = format!("{ns}/{name}~{}", listener.name);
        if !supported {
            let message = format!(
                "protocol {} is not served by this version (HTTP, HTTPS and HBONE are; TLSRoute and TCPRoute are not)",
                listener.protocol
            );
            out.problems.push((object.clone(), format!("listener {}: {message}", listener.name)));
            conditions.push(condition("Accepted", false, "UnsupportedProtocol", message, generation));
        } else {
            conditions.push(condition("Accepted", true, "Accepted", "Accepted", generation));
        }
        let mut by_domain: BTreeMap<String, Vec<Entry>> = BTreeMap::new();
        for &(ri, pi) in naming {
            let (route, parent) = (&routes[ri], &routes[ri].parents[pi]);
            let route_ns = route.meta.namespace_or_default();
            if parent.section_name.as_ref().is_some_and(|s| *s != listener.name)
                || parent.port.is_some_and(|p| p != listener.port)
            {
                continue;
            }
            let slot = attachments.entry((ri, pi)).or_insert((0, None));
            if !supported {
                slot.1.get_or_insert(("NotAllowedByListeners", format!("listener {} is not served", listener.name)));
                continue;
            }
            if !allowed_kinds.contains(&route.kind) || !namespace_allowed(listener, &ns, &route_ns, namespaces) {
                slot.1.get_or_insert((
                    "NotAllowedByListeners",
                    format!("listener {} does not allow {}s from namespace {route_ns}", listener.name, route.kind),
                ));
                continue;
            }
            let domains = intersect(listener.hostname.as_deref(), route.hostnames);
            if domains.is_empty() {
                slot.1.get_or_insert((
                    "NoMatchingListenerHostname",
                    format!("no hostname of the route is served by listener {}", listener.name),
                ));
                continue;
            }
            slot.0 += 1;
            attached += 1;
            for domain in domains {
                by_domain.entry(domain).or_default().extend(route.rules.iter().flatten().cloned());
            }
        }
        let resolved = match &certificate {
            Some(Err((reason, message))) => {
                out.problems.push((object.clone(), format!("listener {}: {message}", listener.name)));
                condition("ResolvedRefs", false, reason, message.clone(), generation)
            }
            _ => condition("ResolvedRefs", true, "ResolvedRefs", "All references resolved", generation),
        };
        conditions.push(resolved);
        let serves = supported && !matches!(certificate, Some(Err(_))) && selector.is_some();
        conditions.push(condition(
            "Programmed",
            serves,
            if serves { "Programmed" } else { "Invalid" },
            if serves { "Programmed" } else { "Not served" },
            generation,
        ));
        conditions.push(condition("Conflicted", false, "NoConflicts", "No conflicts", generation));
        listener_statuses.push(json!({
            "name": listener.name,
            "attachedRoutes": attached,
            "supportedKinds": allowed_kinds.iter().map(|k| json!({"group": GROUP, "kind": k})).collect::<Vec<_>>(),
            "conditions": conditions,
        }));
        let (Some(selector), true) = (&selector, serves) else { continue };
        let tls = match certificate {
            Some(Ok(secret)) => {
                Some(ServerTls { mode: TlsMode::Simple, credential_name: Some(secret), ..ServerTls::default() })
            }
            _ if east_west => Some(ServerTls { mode: TlsMode::IstioMutual, ..ServerTls::default() }),
            _ => None,
        };
        let server = Server {
            port: Some(ServerPort {
                number: listener.port,
                protocol: listener.protocol.clone(),
                name: listener.name.clone(),
                target_port: None,
            }),
            hosts: vec![format!("*/{}", listener.hostname.as_deref().unwrap_or("*"))],
            tls,
            name: Some(listener.name.clone()),
            ..Server::default()
        };
        let synthetic_name = format!("{name}~{}", listener.name);
        let meta = |n: String| ObjectMeta { name: n, namespace: Some(ns.clone()), ..ObjectMeta::default() };
        out.gateways.push((
            Gateway::new(
                meta(synthetic_name.clone()),
                GatewaySpec { selector: selector.clone(), servers: vec![server] },
            ),
            ns.clone(),
        ));
        for (domain, mut entries) in by_domain {
            entries.sort_by(|a, b| a.rank.cmp(&b.rank));
            out.virtual_services.push(VirtualService::new(
                meta(format!("{synthetic_name}~{domain}")),
                VirtualServiceSpec {
                    hosts: vec![domain],
                    gateways: vec![server_key.clone()],
                    http: entries.into_iter().map(|e| e.rule).collect(),
                    ..VirtualServiceSpec::default()
                },
            ));
        }
    }
    let (accepted, programmed) = match &refused_address {
        Some(why) => (
            condition("Accepted", false, "UnsupportedAddress", why.clone(), generation),
            condition("Programmed", false, "AddressNotUsable", why.clone(), generation),
        ),
        None if pods.is_empty() => (
            condition("Accepted", true, "Accepted", "Accepted", generation),
            condition(
                "Programmed",
                false,
                "NoResources",
                format!("no running gateway pod in namespace {ns} serves it"),
                generation,
            ),
        ),
        None => (
            condition("Accepted", true, "Accepted", "Accepted", generation),
            condition("Programmed", true, "Programmed", "Programmed", generation),
        ),
    };
    out.statuses.push(ObjectStatus {
        kind: "Gateway",
        namespace: ns,
        name: name.clone(),
        status: json!({"addresses": addresses, "conditions": [accepted, programmed], "listeners": listener_statuses}),
    });
}

/// The Secret a terminating listener serves: core `Secret` in the Gateway's own
/// namespace (the gateway reads no other namespace's Secrets), and present.
fn certificate_ref(
    r: Option<&super::ObjectReference>,
    ns: &str,
    objects: &[Object],
) -> Result<String, (&'static str, String)> {
    let Some(r) = r else { return Err(("InvalidCertificateRef", "no certificateRefs".into())) };
    if !r.group.as_deref().unwrap_or("").is_empty() || r.kind.as_deref().unwrap_or("Secret") != "Secret" {
        return Err(("InvalidCertificateRef", format!("certificateRef {}: only core Secrets are supported", r.name)));
    }
    if r.namespace.as_deref().is_some_and(|n| n != ns) {
        return Err((
            "RefNotPermitted",
            format!("certificateRef {}: the gateway reads the Secrets of its own namespace ({ns}) only", r.name),
        ));
    }
    let present = objects.iter().any(
        |o| matches!(o, Object::Secret(s) if s.metadata.name == r.name && s.metadata.namespace_or_default() == ns),
    );
    if !present {
        return Err(("InvalidCertificateRef", format!("certificateRef {}: no such Secret in {ns}", r.name)));
    }
    Ok(r.name.clone())
}

/// Whether a listener takes routes from `route_ns`.
fn namespace_allowed(
    listener: &Listener,
    gw_ns: &str,
    route_ns: &str,
    namespaces: &HashMap<&str, &BTreeMap<String, String>>,
) -> bool {
    let from = listener.allowed_routes.as_ref().and_then(|a| a.namespaces.as_ref());
    match from.and_then(|n| n.from.as_deref()).unwrap_or("Same") {
        "All" => true,
        "Selector" => {
            let selector = from.and_then(|n| n.selector.as_ref());
            let labels = namespaces.get(route_ns).copied();
            selector.is_some_and(|s| labels.is_some_and(|l| s.selects(l)))
        }
        _ => gw_ns == route_ns,
    }
}

/// The hosts a route serves on a listener: each route hostname the listener's covers,
/// or the listener's where the route's is the wider; all of either where the other has
/// none.
fn intersect(listener: Option<&str>, route: &[String]) -> Vec<String> {
    let covers = |wide: &str, narrow: &str| match wide.strip_prefix('*') {
        Some(suffix) => {
            narrow.len() > suffix.len() && narrow.to_ascii_lowercase().ends_with(&suffix.to_ascii_lowercase())
        }
        None => wide.eq_ignore_ascii_case(narrow),
    };
    match (listener, route) {
        (None, []) => vec!["*".into()],
        (Some(l), []) => vec![l.to_ascii_lowercase()],
        (None, hosts) => hosts.iter().map(|h| h.to_ascii_lowercase()).collect(),
        (Some(l), hosts) => {
            let mut out: Vec<String> = Vec::new();
            for h in hosts {
                let d = if covers(l, h) {
                    h.clone()
                } else if covers(h, l) {
                    l.to_string()
                } else {
                    continue;
                };
                let d = d.to_ascii_lowercase();
                if !out.contains(&d) {
                    out.push(d);
                }
            }
            out
        }
    }
}

/// What a route's backends resolve to: Istio destinations with weights, and the share
/// (of the total weight) that no backend can take.
struct Backends {
    routed: Vec<istio::HttpRouteDestination>,
    unusable: u64,
    total: u64,
}

fn resolve_backends(
    kind: &str,
    route_ns: &str,
    backend_refs: &[BackendRef],
    refs: &Refs<'_>,
    unresolved: &mut Option<(&'static str, String)>,
) -> Backends {
    let mut out = Backends { routed: Vec::new(), unusable: 0, total: 0 };
    for b in backend_refs {
        let weight = u64::from(b.weight.unwrap_or(1));
        out.total += weight;
        match destination(kind, route_ns, b, refs) {
            Ok(destination) if weight > 0 => {
                out.routed.push(istio::HttpRouteDestination { destination, weight: Some(weight as i64), headers: None })
            }
            Ok(_) => {}
            Err(why) => {
                out.unusable += weight;
                unresolved.get_or_insert(why);
            }
        }
    }
    out
}

/// The Istio destination of a backend the route may use.
fn destination(
    kind: &str,
    route_ns: &str,
    b: &BackendRef,
    refs: &Refs<'_>,
) -> Result<Destination, (&'static str, String)> {
    if !b.is_service() {
        return Err((
            "InvalidKind",
            format!("backend {}: {} is not a kind this version routes to", b.name, b.kind.as_deref().unwrap_or("")),
        ));
    }
    let ns = b.namespace.clone().unwrap_or_else(|| route_ns.to_string());
    if !refs.grants.allow(kind, route_ns, "Service", &ns, &b.name) {
        return Err((
            "RefNotPermitted",
            format!("backend {ns}/{}: no ReferenceGrant in {ns} lets {kind}s of {route_ns} refer to it", b.name),
        ));
    }
    let Some(svc) = refs.services.get(&(ns.clone(), b.name.clone())) else {
        return Err(("BackendNotFound", format!("backend {ns}/{}: no such Service", b.name)));
    };
    let port = b.port.unwrap_or(0);
    if !svc.spec.ports.iter().any(|p| u32::from(p.port) == port) {
        return Err(("BackendNotFound", format!("backend {ns}/{}: the Service has no port {port}", b.name)));
    }
    Ok(Destination {
        host: format!("{}.{ns}.svc.cluster.local", b.name),
        subset: None,
        port: Some(PortSelector { number: port }),
    })
}

/// The filters and backends of a rule as one Istio rule without matches.
fn rule_action(
    kind: &'static str,
    meta: &ObjectMeta,
    index: usize,
    (filters, backend_refs): (&[HttpRouteFilter], &[BackendRef]),
    refs: &Refs<'_>,
    unresolved: &mut Option<(&'static str, String)>,
) -> istio::HttpRoute {
    let ns = meta.namespace_or_default();
    let mut rule = istio::HttpRoute {
        name: Some(format!("{} {}/{} rule {index}", kind, ns, meta.name)),
        ..istio::HttpRoute::default()
    };
    let mut headers = Headers::default();
    for f in filters {
        if let Some(m) = &f.request_header_modifier {
            headers.request = Some(header_operations(m));
        }
        if let Some(m) = &f.response_header_modifier {
            headers.response = Some(header_operations(m));
        }
        if let Some(r) = &f.request_redirect {
            rule.redirect = Some(HttpRedirect {
                uri: r.path.as_ref().and_then(|p| p.replace_full_path.clone()),
                authority: r.hostname.clone(),
                port: r.port,
                scheme: r.scheme.clone(),
                redirect_code: Some(r.status_code.unwrap_or(302)),
                derive_port: r.port.is_none().then(|| {
                    if r.scheme.is_some() { "FROM_PROTOCOL_DEFAULT" } else { "FROM_REQUEST_PORT" }.to_string()
                }),
            });
        }
        if let Some(m) = &f.request_mirror {
            match destination(kind, &ns, &m.backend_ref, refs) {
                Ok(destination) => rule.mirrors.push(HttpMirrorPolicy {
                    destination,
                    percentage: m.percent.map(|p| Percent { value: f64::from(p) }),
                }),
                Err(why) => {
                    unresolved.get_or_insert(why);
                }
            }
        }
    }
    if headers != Headers::default() {
        rule.headers = Some(headers);
    }
    if rule.redirect.is_some() {
        return rule;
    }
    let backends = resolve_backends(kind, &ns, backend_refs, refs, unresolved);
    if backends.routed.is_empty() {
        rule.direct_response = Some(HttpDirectResponse { status: 500, body: None });
        return rule;
    }
    if backends.unusable > 0 {
        let share = backends.unusable as f64 * 100.0 / backends.total as f64;
        rule.fault = Some(HttpFault {
            delay: None,
            abort: Some(FaultAbort {
                http_status: Some(500),
                percentage: Some(Percent { value: share }),
                ..FaultAbort::default()
            }),
        });
    }
    rule.route = backends.routed;
    rule
}

fn header_operations(m: &HeaderModifier) -> HeaderOperations {
    let pairs = |v: &[super::HeaderValue]| v.iter().map(|h| (h.name.to_ascii_lowercase(), h.value.clone())).collect();
    HeaderOperations {
        set: pairs(&m.set),
        add: pairs(&m.add),
        remove: m.remove.iter().map(|h| h.to_ascii_lowercase()).collect(),
    }
}

fn exact(v: impl Into<String>) -> StringMatch {
    StringMatch { exact: Some(v.into()), ..StringMatch::default() }
}
fn prefix(v: impl Into<String>) -> StringMatch {
    StringMatch { prefix: Some(v.into()), ..StringMatch::default() }
}
fn regex(v: impl Into<String>) -> StringMatch {
    StringMatch { regex: Some(v.into()), ..StringMatch::default() }
}

fn value_match(m: &ValueMatch) -> StringMatch {
    match m.match_type.as_deref() {
        Some("RegularExpression") => regex(&m.value),
        _ => exact(&m.value),
    }
}

/// The base rank of a route's entries (everything but the match's own keys).
fn base_rank(meta: &ObjectMeta, rule: usize) -> Rank {
    Rank {
        path_kind: 2,
        path_len: std::cmp::Reverse(0),
        no_method: true,
        headers: std::cmp::Reverse(0),
        query: std::cmp::Reverse(0),
        created: meta.creation_timestamp.clone().unwrap_or_default(),
        key: meta.key(),
        rule,
        index: 0,
    }
}

fn http_route<'a>(r: &'a HttpRoute, refs: &Refs<'_>) -> Route<'a> {
    let mut unresolved = None;
    let mut rules = Vec::new();
    for (i, rule) in r.spec.rules.iter().enumerate() {
        let mut action =
            rule_action("HTTPRoute", &r.metadata, i, (&rule.filters, &rule.backend_refs), refs, &mut unresolved);
        if let Some(t) = &rule.timeouts {
            action.timeout = t.request.clone();
            if let Some(per_try) = &t.backend_request {
                action.retries = Some(HttpRetry {
                    attempts: Some(2),
                    per_try_timeout: Some(per_try.clone()),
                    ..HttpRetry::default()
                });
            }
        }
        let rewrite = rule.filters.iter().find_map(|f| f.url_rewrite.as_ref());
        let default = [super::HttpRouteMatch::default()];
        let matches = if rule.matches.is_empty() { &default[..] } else { &rule.matches[..] };
        let mut entries = Vec::new();
        for m in matches {
            let path = m.path.clone().unwrap_or_default();
            let value = path.value.clone().unwrap_or_else(|| "/".into());
            let mut base = HttpMatchRequest {
                method: m.method.as_deref().map(exact),
                headers: m.headers.iter().map(|h| (h.name.to_ascii_lowercase(), value_match(h))).collect(),
                query_params: m.query_params.iter().map(|q| (q.name.clone(), value_match(q))).collect(),
                ..HttpMatchRequest::default()
            };
            let mut rank = base_rank(&r.metadata, i);
            rank.no_method = m.method.is_none();
            rank.headers = std::cmp::Reverse(m.headers.len());
            rank.query = std::cmp::Reverse(m.query_params.len());
            // A prefix's trailing `/` means nothing, so it does not make it longer.
            let significant = if path.is_prefix() { value.trim_end_matches('/') } else { value.as_str() };
            rank.path_len = std::cmp::Reverse(significant.len());
            // (uri condition, what ReplacePrefixMatch makes of the path there)
            let branches: Vec<(Option<StringMatch>, PathBranch)> = match path.match_type.as_deref() {
                Some("Exact") => {
                    rank.path_kind = 0;
                    vec![(Some(exact(&value)), PathBranch::Whole)]
                }
                Some("RegularExpression") => {
                    rank.path_kind = 1;
                    vec![(Some(regex(&value)), PathBranch::Whole)]
                }
                _ => {
                    let trimmed = value.trim_end_matches('/');
                    if trimmed.is_empty() {
                        vec![(Some(prefix("/")), PathBranch::Prefix)]
                    } else {
                        vec![
                            (Some(exact(trimmed)), PathBranch::Whole),
                            (Some(prefix(format!("{trimmed}/"))), PathBranch::Prefix),
                        ]
                    }
                }
            };
            for (uri, branch) in branches {
                base.uri = uri;
                let mut istio_rule = action.clone();
                istio_rule.matches = vec![base.clone()];
                if let Some(rw) = rewrite {
                    istio_rule.rewrite = Some(rewrite_for(rw, branch));
                }
                rank.index = entries.len();
                entries.push(Entry { rank: rank.clone(), rule: istio_rule });
            }
        }
        rules.push(entries);
    }
    Route::of("HTTPRoute", r, rules, unresolved)
}

/// Which part of the path a match took: all of it, or a prefix ending in `/`.
#[derive(Clone, Copy)]
enum PathBranch {
    Whole,
    Prefix,
}

fn rewrite_for(rw: &super::UrlRewrite, branch: PathBranch) -> HttpRewrite {
    let mut out = HttpRewrite { authority: rw.hostname.clone(), ..HttpRewrite::default() };
    let Some(path) = &rw.path else { return out };
    match (path.replace_full_path.as_ref(), path.replace_prefix_match.as_ref(), branch) {
        (Some(full), _, _) => {
            out.uri_regex_rewrite = Some(RegexRewrite { pattern: ".*".into(), rewrite: full.clone() });
        }
        (None, Some(p), PathBranch::Whole) => out.uri = Some(p.clone()),
        (None, Some(p), PathBranch::Prefix) => out.uri = Some(format!("{}/", p.trim_end_matches('/'))),
        (None, None, _) => {}
    }
    out
}

fn grpc_route<'a>(r: &'a GrpcRoute, refs: &Refs<'_>) -> Route<'a> {
    let mut unresolved = None;
    let mut rules = Vec::new();
    for (i, rule) in r.spec.rules.iter().enumerate() {
        let action =
            rule_action("GRPCRoute", &r.metadata, i, (&rule.filters, &rule.backend_refs), refs, &mut unresolved);
        let default = [super::GrpcRouteMatch::default()];
        let matches = if rule.matches.is_empty() { &default[..] } else { &rule.matches[..] };
        let mut entries = Vec::new();
        for (j, m) in matches.iter().enumerate() {
            let mut rank = base_rank(&r.metadata, i);
            rank.index = j;
            rank.headers = std::cmp::Reverse(m.headers.len());
            let uri = m.method.as_ref().map(|method| {
                let is_regex = method.match_type.as_deref() == Some("RegularExpression");
                let part = |v: &Option<String>| match (v, is_regex) {
                    (Some(v), true) => format!("({v})"),
                    (Some(v), false) => regex::escape(v),
                    (None, _) => "[^/]+".to_string(),
                };
                rank.path_len = std::cmp::Reverse(
                    method.service.as_deref().map_or(0, str::len) + method.method.as_deref().map_or(0, str::len),
                );
                match (&method.service, &method.method, is_regex) {
                    (Some(s), Some(m), false) => {
                        rank.path_kind = 0;
                        exact(format!("/{s}/{m}"))
                    }
                    (Some(s), None, false) => prefix(format!("/{s}/")),
                    _ => {
                        rank.path_kind = 1;
                        regex(format!("/{}/{}", part(&method.service), part(&method.method)))
                    }
                }
            });
            let mut istio_rule = action.clone();
            istio_rule.matches = vec![HttpMatchRequest {
                uri,
                headers: m.headers.iter().map(|h| (h.name.to_ascii_lowercase(), value_match(h))).collect(),
                ..HttpMatchRequest::default()
            }];
            entries.push(Entry { rank, rule: istio_rule });
        }
        rules.push(entries);
    }
    Route::of("GRPCRoute", r, rules, unresolved)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::parse_documents;

    const BASE: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: a, namespace: shop}
spec: {ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: b, namespace: shop}
spec: {ports: [{port: 80}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: web, namespace: shop}
spec:
  gatewayClassName: istio
  listeners: [{name: http, port: 80, protocol: HTTP, hostname: "*.example.com"}]
"#;

    fn translated(routes: &str) -> Translation {
        translate(&parse_documents(Path::new("t.yaml"), &format!("{BASE}{routes}")).unwrap())
    }

    fn uris(vs: &VirtualService) -> Vec<String> {
        vs.spec
            .http
            .iter()
            .map(|r| {
                let u = r.matches[0].uri.clone().unwrap_or_default();
                match (u.exact, u.prefix, u.regex) {
                    (Some(e), _, _) => format!("={e}"),
                    (_, Some(p), _) => format!("^{p}"),
                    (_, _, Some(r)) => format!("~{r}"),
                    _ => "*".into(),
                }
            })
            .collect()
    }

    #[test]
    fn matches_of_every_route_for_a_host_are_ordered_by_the_apis_precedence() {
        let t = translated(
            r#"
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: broad, namespace: shop, creationTimestamp: "2026-01-01T00:00:00Z"}
spec:
  parentRefs: [{name: web}]
  hostnames: [shop.example.com]
  rules: [{backendRefs: [{name: a, port: 80}]}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: narrow, namespace: shop, creationTimestamp: "2026-02-01T00:00:00Z"}
spec:
  parentRefs: [{name: web}]
  hostnames: [shop.example.com, other.org]
  rules:
  - matches: [{path: {type: PathPrefix, value: /api/}}, {path: {type: Exact, value: /login}}, {path: {value: /api}, method: POST}]
    backendRefs: [{name: b, port: 80}]
"#,
        );
        assert_eq!(t.gateways.len(), 1);
        assert_eq!((t.gateways[0].0.metadata.name.as_str(), t.gateways[0].1.as_str()), ("web~http", "shop"));
        let [vs] = &t.virtual_services[..] else { panic!("{:?}", t.virtual_services) };
        assert_eq!(vs.spec.hosts, ["shop.example.com"], "other.org is not on the listener");
        assert_eq!(vs.spec.gateways, ["shop/web~http"]);
        // Exact first; then the longer prefix, the one with a method first; `/` last.
        assert_eq!(uris(vs), ["=/login", "=/api", "^/api/", "=/api", "^/api/", "^/"]);
        assert!(vs.spec.http[1].matches[0].method.is_some(), "the method match wins the tie");
        assert!(t.problems.is_empty(), "{:?}", t.problems);
    }

    #[test]
    fn routes_the_listener_does_not_allow_are_told_why() {
        let t = translated(
            r#"
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: foreign, namespace: other}
spec:
  parentRefs: [{name: web, namespace: shop}]
  rules: [{backendRefs: [{name: a, namespace: shop, port: 80}]}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: elsewhere, namespace: shop}
spec:
  parentRefs: [{name: web}]
  hostnames: [example.org]
  rules: [{backendRefs: [{name: a, port: 80}]}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: lost, namespace: shop}
spec:
  parentRefs: [{name: nowhere}]
  rules: [{backendRefs: [{name: a, port: 80}]}]
"#,
        );
        assert!(t.virtual_services.is_empty(), "{:?}", t.virtual_services);
        let reason = |name: &str| {
            let s = t.statuses.iter().find(|s| s.name == name).unwrap();
            let c = s.status["parents"][0]["conditions"].as_array().unwrap();
            (c[0]["reason"].clone(), c[1]["reason"].clone())
        };
        assert_eq!(reason("foreign"), (json!("NotAllowedByListeners"), json!("RefNotPermitted")));
        assert_eq!(reason("elsewhere").0, json!("NoMatchingListenerHostname"));
        assert!(t.problems.iter().any(|(o, why)| o == "HTTPRoute shop/lost" && why.contains("does not exist")));
        let gw = t.statuses.iter().find(|s| s.kind == "Gateway").unwrap();
        assert_eq!(gw.status["listeners"][0]["attachedRoutes"], 0);
    }

    #[test]
    fn a_route_alone_still_says_its_gateway_is_missing() {
        let yaml = "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: lost, namespace: shop}\nspec:\n  parentRefs: [{name: web}]\n";
        let t = translate(&parse_documents(Path::new("t.yaml"), yaml).unwrap());
        assert_eq!(t.problems.len(), 1, "{:?}", t.problems);
        assert!(t.problems[0].1.contains("Gateway shop/web, which does not exist"), "{:?}", t.problems);
        assert!(translate(&[]).problems.is_empty());
    }

    #[test]
    fn listener_and_route_hostnames_intersect() {
        let hosts = |l: Option<&str>, r: &[&str]| intersect(l, &r.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(hosts(None, &[]), ["*"]);
        assert_eq!(hosts(Some("*.example.com"), &[]), ["*.example.com"]);
        assert_eq!(hosts(Some("*.example.com"), &["a.example.com", "example.com", "b.org"]), ["a.example.com"]);
        assert_eq!(hosts(Some("a.example.com"), &["*.example.com"]), ["a.example.com"]);
        assert_eq!(hosts(Some("*.a.example.com"), &["*.example.com"]), ["*.a.example.com"]);
    }
}

//! Kubernetes Gateway API (`gateway.networking.k8s.io`): GatewayClass, Gateway,
//! HTTPRoute, GRPCRoute and ReferenceGrant, typed with the checks the API's CRD rules
//! make. The mesh serves them on the same engine as Istio's Gateway: `translate.rs`
//! turns them into the Istio Gateway and VirtualService objects Istio itself derives
//! from them, with the status conditions a controller writes back.
//!
//! Which Gateways are the mesh's: those of a GatewayClass whose `controllerName` is
//! [`CONTROLLER_NAME`], and those of class [`DEFAULT_CLASS`], which Istio installs.

pub mod translate;

use std::collections::HashSet;

use serde::Deserialize;

use super::resource::Resource;
use super::resources::LabelSelector;
use super::schema::Invalid;

/// The versions of Gateway, GatewayClass and HTTPRoute the mesh reads.
pub const GATEWAY_API_VERSIONS: &[&str] = &["gateway.networking.k8s.io/v1", "gateway.networking.k8s.io/v1beta1"];
/// The versions of GRPCRoute (v1 since Gateway API 1.1).
pub const GRPC_ROUTE_VERSIONS: &[&str] = &["gateway.networking.k8s.io/v1", "gateway.networking.k8s.io/v1alpha2"];
/// The versions of ReferenceGrant.
pub const REFERENCE_GRANT_VERSIONS: &[&str] =
    &["gateway.networking.k8s.io/v1beta1", "gateway.networking.k8s.io/v1alpha2"];
/// The API group.
pub const GROUP: &str = "gateway.networking.k8s.io";
/// The controller the mesh is, as Istio names itself (so GatewayClasses written for
/// Istio are the mesh's).
pub const CONTROLLER_NAME: &str = "istio.io/gateway-controller";
/// The class Istio installs, served even when no GatewayClass object names it.
pub const DEFAULT_CLASS: &str = "istio";
/// The class of Istio ambient's east-west gateways (an `HBONE` listener ending the
/// outer tunnel of double HBONE), served as Istio installs it.
pub const EAST_WEST_CLASS: &str = "istio-east-west";
/// The listener protocol of an east-west gateway's port.
pub const HBONE_PROTOCOL: &str = "HBONE";
/// The label a Gateway's own deployment carries (Istio's automated deployment).
pub const GATEWAY_NAME_LABEL: &str = "gateway.networking.k8s.io/gateway-name";

/// `GatewayClass` (cluster-scoped).
pub type GatewayClass = Resource<GatewayClassSpec>;
/// `Gateway` of the Gateway API (not Istio's [`super::gateway::Gateway`]).
pub type KubeGateway = Resource<KubeGatewaySpec>;
/// `HTTPRoute`.
pub type HttpRoute = Resource<HttpRouteSpec>;
/// `GRPCRoute`.
pub type GrpcRoute = Resource<GrpcRouteSpec>;
/// `ReferenceGrant`.
pub type ReferenceGrant = Resource<ReferenceGrantSpec>;

/// `GatewayClass.spec`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GatewayClassSpec {
    /// The controller that serves the class's Gateways.
    pub controller_name: String,
    /// Free text.
    #[serde(default)]
    pub description: Option<String>,
}

/// `Gateway.spec`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KubeGatewaySpec {
    /// The GatewayClass.
    pub gateway_class_name: String,
    /// Where clients connect.
    pub listeners: Vec<Listener>,
    /// The gateway deployment to use: a `Hostname` naming a Service in the Gateway's
    /// namespace (Istio's manual deployment). Without one, the pods labelled
    /// [`GATEWAY_NAME_LABEL`]`: <name>` in the Gateway's namespace serve it.
    #[serde(default)]
    pub addresses: Vec<GatewayAddress>,
}

/// `spec.addresses[]`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GatewayAddress {
    /// `IPAddress` (default) or `Hostname`.
    #[serde(default, rename = "type")]
    pub address_type: Option<String>,
    /// The address.
    pub value: String,
}

/// One listener.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Listener {
    /// Unique within the Gateway; what routes' `sectionName` names.
    pub name: String,
    /// Host the listener serves (`*.` may lead it); all when unset.
    #[serde(default)]
    pub hostname: Option<String>,
    /// Port.
    pub port: u32,
    /// `HTTP`, `HTTPS`, `TLS`, `TCP` or `UDP`.
    pub protocol: String,
    /// TLS of `HTTPS` and `TLS` listeners.
    #[serde(default)]
    pub tls: Option<ListenerTls>,
    /// Which routes may attach.
    #[serde(default)]
    pub allowed_routes: Option<AllowedRoutes>,
}

/// `listeners[].tls`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ListenerTls {
    /// `Terminate` (default) or `Passthrough`.
    #[serde(default)]
    pub mode: Option<String>,
    /// The certificate: a `kubernetes.io/tls` Secret.
    #[serde(default)]
    pub certificate_refs: Vec<ObjectReference>,
    /// Implementation options (`gateway.istio.io/tls-terminate-mode: ISTIO_MUTUAL` on
    /// an HBONE listener, which is what it does whatever is said).
    #[serde(default)]
    pub options: std::collections::BTreeMap<String, String>,
}

/// A reference to another object.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ObjectReference {
    /// API group; the core group when empty.
    #[serde(default)]
    pub group: Option<String>,
    /// Kind.
    #[serde(default)]
    pub kind: Option<String>,
    /// Name.
    pub name: String,
    /// Namespace; the referring object's when unset.
    #[serde(default)]
    pub namespace: Option<String>,
}

/// `listeners[].allowedRoutes`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AllowedRoutes {
    /// Namespaces routes may come from.
    #[serde(default)]
    pub namespaces: Option<RouteNamespaces>,
    /// Route kinds; by protocol when empty.
    #[serde(default)]
    pub kinds: Vec<RouteGroupKind>,
}

/// `allowedRoutes.namespaces`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RouteNamespaces {
    /// `Same` (default), `All` or `Selector`.
    #[serde(default)]
    pub from: Option<String>,
    /// Namespace labels, for `Selector`.
    #[serde(default)]
    pub selector: Option<LabelSelector>,
}

/// A route kind.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RouteGroupKind {
    /// API group; `gateway.networking.k8s.io` when unset.
    #[serde(default)]
    pub group: Option<String>,
    /// `HTTPRoute` or `GRPCRoute`.
    pub kind: String,
}

/// A route's parent: a Gateway (optionally one listener of it).
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ParentReference {
    /// API group; `gateway.networking.k8s.io` when unset.
    #[serde(default)]
    pub group: Option<String>,
    /// `Gateway` when unset.
    #[serde(default)]
    pub kind: Option<String>,
    /// Namespace; the route's when unset.
    #[serde(default)]
    pub namespace: Option<String>,
    /// Name.
    pub name: String,
    /// The listener's name.
    #[serde(default)]
    pub section_name: Option<String>,
    /// The listener's port.
    #[serde(default)]
    pub port: Option<u32>,
}

/// The spec of a route of either kind: where it attaches, for which hosts, and its
/// rules (across routes of one host the most specific match wins).
#[derive(Debug, Clone, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouteSpec<R> {
    /// Gateways (and listeners) the route attaches to.
    #[serde(default)]
    pub parent_refs: Vec<ParentReference>,
    /// Hosts the route serves; the listener's when empty.
    #[serde(default)]
    pub hostnames: Vec<String>,
    /// Rules.
    #[serde(default)]
    pub rules: Vec<R>,
}

impl<R> Default for RouteSpec<R> {
    fn default() -> Self {
        Self { parent_refs: Vec::new(), hostnames: Vec::new(), rules: Vec::new() }
    }
}

/// `HTTPRoute.spec`.
pub type HttpRouteSpec = RouteSpec<HttpRouteRule>;

/// One HTTPRoute rule.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRouteRule {
    /// Name, for status and logs.
    #[serde(default)]
    pub name: Option<String>,
    /// Any one selects the rule; a path prefix `/` when empty.
    #[serde(default)]
    pub matches: Vec<HttpRouteMatch>,
    /// Applied in order.
    #[serde(default)]
    pub filters: Vec<HttpRouteFilter>,
    /// Weighted backends.
    #[serde(default)]
    pub backend_refs: Vec<BackendRef>,
    /// Timeouts.
    #[serde(default)]
    pub timeouts: Option<HttpRouteTimeouts>,
}

/// `rules[].timeouts`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRouteTimeouts {
    /// The whole request, retries included.
    #[serde(default)]
    pub request: Option<String>,
    /// One try to the backend.
    #[serde(default)]
    pub backend_request: Option<String>,
}

/// One HTTPRoute match: every condition holds.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRouteMatch {
    /// Path condition.
    #[serde(default)]
    pub path: Option<PathMatch>,
    /// Header conditions.
    #[serde(default)]
    pub headers: Vec<ValueMatch>,
    /// Query parameter conditions.
    #[serde(default)]
    pub query_params: Vec<ValueMatch>,
    /// Method.
    #[serde(default)]
    pub method: Option<String>,
}

/// `matches[].path`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PathMatch {
    /// `Exact`, `PathPrefix` (default) or `RegularExpression`.
    #[serde(default, rename = "type")]
    pub match_type: Option<String>,
    /// The path, `/` by default.
    #[serde(default)]
    pub value: Option<String>,
}

/// A header or query parameter condition.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ValueMatch {
    /// `Exact` (default) or `RegularExpression`.
    #[serde(default, rename = "type")]
    pub match_type: Option<String>,
    /// Name.
    pub name: String,
    /// Value.
    pub value: String,
}

/// One filter: `type` says which of the other fields is set.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRouteFilter {
    /// `RequestHeaderModifier`, `ResponseHeaderModifier`, `RequestRedirect`,
    /// `URLRewrite` or `RequestMirror`.
    #[serde(rename = "type")]
    pub filter_type: String,
    /// Request headers.
    #[serde(default)]
    pub request_header_modifier: Option<HeaderModifier>,
    /// Response headers.
    #[serde(default)]
    pub response_header_modifier: Option<HeaderModifier>,
    /// Answer with a redirect.
    #[serde(default)]
    pub request_redirect: Option<RequestRedirect>,
    /// Rewrite host and path.
    #[serde(default, rename = "urlRewrite")]
    pub url_rewrite: Option<UrlRewrite>,
    /// Copy requests to another backend.
    #[serde(default)]
    pub request_mirror: Option<RequestMirror>,
}

/// `requestHeaderModifier` / `responseHeaderModifier`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HeaderModifier {
    /// Overwrite.
    #[serde(default)]
    pub set: Vec<HeaderValue>,
    /// Append.
    #[serde(default)]
    pub add: Vec<HeaderValue>,
    /// Remove.
    #[serde(default)]
    pub remove: Vec<String>,
}

/// A header name and value.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HeaderValue {
    /// Name.
    pub name: String,
    /// Value.
    pub value: String,
}

/// `requestRedirect`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RequestRedirect {
    /// `http` or `https`.
    #[serde(default)]
    pub scheme: Option<String>,
    /// New host.
    #[serde(default)]
    pub hostname: Option<String>,
    /// New path.
    #[serde(default)]
    pub path: Option<PathModifier>,
    /// New port.
    #[serde(default)]
    pub port: Option<u32>,
    /// 301 (default) or 302.
    #[serde(default)]
    pub status_code: Option<u32>,
}

/// `urlRewrite`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UrlRewrite {
    /// New Host header.
    #[serde(default)]
    pub hostname: Option<String>,
    /// New path.
    #[serde(default)]
    pub path: Option<PathModifier>,
}

/// A path change.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PathModifier {
    /// `ReplaceFullPath` or `ReplacePrefixMatch`.
    #[serde(rename = "type")]
    pub modifier_type: String,
    /// For `ReplaceFullPath`.
    #[serde(default)]
    pub replace_full_path: Option<String>,
    /// For `ReplacePrefixMatch`.
    #[serde(default)]
    pub replace_prefix_match: Option<String>,
}

/// `requestMirror`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RequestMirror {
    /// Where copies go.
    #[serde(rename = "backendRef")]
    pub backend_ref: BackendRef,
    /// Share copied, 0 to 100 (all when unset).
    #[serde(default)]
    pub percent: Option<u32>,
}

/// A backend: a Service and its port.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BackendRef {
    /// API group; the core group when empty.
    #[serde(default)]
    pub group: Option<String>,
    /// `Service` when unset.
    #[serde(default)]
    pub kind: Option<String>,
    /// Name.
    pub name: String,
    /// Namespace; the route's when unset (another needs a ReferenceGrant there).
    #[serde(default)]
    pub namespace: Option<String>,
    /// Service port (required for a Service).
    #[serde(default)]
    pub port: Option<u32>,
    /// Share of requests, 0 to 1000000 (1 when unset).
    #[serde(default)]
    pub weight: Option<u32>,
}

/// `GRPCRoute.spec`.
pub type GrpcRouteSpec = RouteSpec<GrpcRouteRule>;

/// One GRPCRoute rule.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GrpcRouteRule {
    /// Name, for status and logs.
    #[serde(default)]
    pub name: Option<String>,
    /// Any one selects the rule; every call when empty.
    #[serde(default)]
    pub matches: Vec<GrpcRouteMatch>,
    /// Applied in order (header modifiers and mirrors).
    #[serde(default)]
    pub filters: Vec<HttpRouteFilter>,
    /// Weighted backends.
    #[serde(default)]
    pub backend_refs: Vec<BackendRef>,
}

/// One GRPCRoute match.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GrpcRouteMatch {
    /// The gRPC service and method.
    #[serde(default)]
    pub method: Option<GrpcMethodMatch>,
    /// Header conditions.
    #[serde(default)]
    pub headers: Vec<ValueMatch>,
}

/// `matches[].method`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GrpcMethodMatch {
    /// `Exact` (default) or `RegularExpression`.
    #[serde(default, rename = "type")]
    pub match_type: Option<String>,
    /// Fully qualified service (`package.Service`); any when unset.
    #[serde(default)]
    pub service: Option<String>,
    /// Method; any when unset.
    #[serde(default)]
    pub method: Option<String>,
}

/// `ReferenceGrant.spec`: who (`from`) may refer to what (`to`) in this namespace.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ReferenceGrantSpec {
    /// Referring kinds and their namespaces.
    pub from: Vec<GrantFrom>,
    /// Kinds (and optionally names) that may be referred to.
    pub to: Vec<GrantTo>,
}

/// `from[]`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GrantFrom {
    /// API group.
    pub group: String,
    /// Kind.
    pub kind: String,
    /// Namespace.
    pub namespace: String,
}

/// `to[]`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GrantTo {
    /// API group (`""` for Services and Secrets).
    pub group: String,
    /// Kind.
    pub kind: String,
    /// One object; all of the kind when unset.
    #[serde(default)]
    pub name: Option<String>,
}

/// The most of each list the API's CRDs allow.
const MAX_LISTENERS: usize = 64;
const MAX_PARENTS: usize = 32;
const MAX_HOSTNAMES: usize = 16;
const MAX_RULES: usize = 16;
const MAX_MATCHES: usize = 64;
const MAX_FILTERS: usize = 16;
const MAX_BACKENDS: usize = 16;
const MAX_CONDITIONS: usize = 16;
const MAX_WEIGHT: u32 = 1_000_000;

fn at_most<T>(list: &[T], max: usize, field: &str) -> Result<(), Invalid> {
    if list.len() > max {
        return Err((field.into(), format!("at most {max} entries, got {}", list.len())));
    }
    Ok(())
}

/// One to `max` entries.
fn between<T>(list: &[T], max: usize, field: &str) -> Result<(), Invalid> {
    if list.is_empty() {
        return Err((field.into(), "at least one entry is required".into()));
    }
    at_most(list, max, field)
}

impl GatewayClass {
    /// The CRD's checks.
    pub(super) fn validate(&self) -> Result<(), Invalid> {
        let c = &self.spec.controller_name;
        if c.is_empty() || !c.contains('/') {
            return Err(("spec.controllerName".into(), format!("{c:?} is not a domain-prefixed path")));
        }
        Ok(())
    }
}

impl KubeGateway {
    /// The CRD's checks.
    pub(super) fn validate(&self) -> Result<(), Invalid> {
        if self.spec.gateway_class_name.is_empty() {
            return Err(("spec.gatewayClassName".into(), "required".into()));
        }
        between(&self.spec.listeners, MAX_LISTENERS, "spec.listeners")?;
        let mut names = HashSet::new();
        let mut bound = HashSet::new();
        for (i, l) in self.spec.listeners.iter().enumerate() {
            let at = format!("spec.listeners[{i}]");
            if !names.insert(l.name.as_str()) {
                return Err((format!("{at}.name"), format!("{:?} is the name of another listener", l.name)));
            }
            if !bound.insert((l.port, l.hostname.clone().unwrap_or_default())) {
                return Err((format!("{at}.hostname"), "another listener has this port and hostname".into()));
            }
            l.validate(&at)?;
        }
        for (i, a) in self.spec.addresses.iter().enumerate() {
            match a.address_type.as_deref() {
                None | Some("IPAddress" | "Hostname") => {}
                Some(other) => {
                    return Err((
                        format!("spec.addresses[{i}].type"),
                        format!("{other:?} is not IPAddress or Hostname"),
                    ));
                }
            }
        }
        Ok(())
    }
}

impl Listener {
    fn validate(&self, at: &str) -> Result<(), Invalid> {
        if !is_section_name(&self.name) {
            return Err((format!("{at}.name"), format!("{:?} is not a DNS-1123 label", self.name)));
        }
        if !(1..=65535).contains(&self.port) {
            return Err((format!("{at}.port"), format!("{} is not a port number", self.port)));
        }
        if let Some(h) = &self.hostname
            && !valid_hostname(h)
        {
            return Err((format!("{at}.hostname"), format!("{h:?} is not a host name (`*.` may lead it)")));
        }
        match (self.protocol.as_str(), &self.tls) {
            ("HTTP" | "TCP" | "UDP", Some(_)) => {
                Err((format!("{at}.tls"), format!("a {} listener has no TLS", self.protocol)))
            }
            ("HTTPS" | "TLS", None) => {
                Err((format!("{at}.tls"), format!("a {} listener needs its tls settings", self.protocol)))
            }
            ("HTTP" | "TCP" | "UDP" | HBONE_PROTOCOL, None) => Ok(()),
            (HBONE_PROTOCOL, Some(tls)) => match tls.mode.as_deref().unwrap_or("Terminate") {
                "Terminate" => match tls.options.get("gateway.istio.io/tls-terminate-mode").map(String::as_str) {
                    None | Some("ISTIO_MUTUAL") => Ok(()),
                    Some(other) => Err((
                        format!("{at}.tls.options"),
                        format!(
                            "an HBONE listener ends the mesh's mutual TLS: tls-terminate-mode {other:?} is not ISTIO_MUTUAL"
                        ),
                    )),
                },
                other => {
                    Err((format!("{at}.tls.mode"), format!("an HBONE listener terminates; {other:?} is not Terminate")))
                }
            },
            ("HTTPS" | "TLS", Some(tls)) => {
                let mode = tls.mode.as_deref().unwrap_or("Terminate");
                match mode {
                    "Terminate" if tls.certificate_refs.is_empty() => {
                        Err((format!("{at}.tls.certificateRefs"), "a terminating listener needs a certificate".into()))
                    }
                    "Passthrough" if self.protocol == "HTTPS" => {
                        Err((format!("{at}.tls.mode"), "an HTTPS listener terminates TLS".into()))
                    }
                    "Terminate" | "Passthrough" => Ok(()),
                    other => Err((format!("{at}.tls.mode"), format!("{other:?} is not Terminate or Passthrough"))),
                }
            }
            (other, _) => {
                Err((format!("{at}.protocol"), format!("{other:?} is not HTTP, HTTPS, TLS, TCP, UDP or HBONE")))
            }
        }?;
        if let Some(ns) = self.allowed_routes.as_ref().and_then(|a| a.namespaces.as_ref()) {
            match (ns.from.as_deref().unwrap_or("Same"), &ns.selector) {
                ("Selector", None) => {
                    return Err((
                        format!("{at}.allowedRoutes.namespaces.selector"),
                        "required when from is Selector".into(),
                    ));
                }
                ("Same" | "All" | "Selector", _) => {}
                (other, _) => {
                    return Err((
                        format!("{at}.allowedRoutes.namespaces.from"),
                        format!("{other:?} is not Same, All or Selector"),
                    ));
                }
            }
        }
        Ok(())
    }
}

impl HttpRoute {
    /// The CRD's checks.
    pub(super) fn validate(&self) -> Result<(), Invalid> {
        validate_common(&self.spec.parent_refs, &self.spec.hostnames)?;
        at_most(&self.spec.rules, MAX_RULES, "spec.rules")?;
        for (i, rule) in self.spec.rules.iter().enumerate() {
            let at = format!("spec.rules[{i}]");
            at_most(&rule.matches, MAX_MATCHES, &format!("{at}.matches"))?;
            for (j, m) in rule.matches.iter().enumerate() {
                m.validate(&format!("{at}.matches[{j}]"))?;
            }
            validate_filters(&rule.filters, &at, true)?;
            let redirects = rule.filters.iter().any(|f| f.filter_type == "RequestRedirect");
            if redirects && rule.filters.iter().any(|f| f.filter_type == "URLRewrite") {
                return Err((format!("{at}.filters"), "RequestRedirect and URLRewrite cannot both be used".into()));
            }
            if redirects && !rule.backend_refs.is_empty() {
                return Err((format!("{at}.backendRefs"), "a rule that redirects has no backends".into()));
            }
            let rewrites_prefix = rule.filters.iter().any(|f| {
                f.url_rewrite
                    .as_ref()
                    .and_then(|r| r.path.as_ref())
                    .is_some_and(|p| p.modifier_type == "ReplacePrefixMatch")
            });
            let prefix_only =
                !rule.matches.is_empty() && rule.matches.iter().all(|m| m.path.as_ref().is_some_and(|p| p.is_prefix()));
            if rewrites_prefix && !prefix_only {
                return Err((
                    format!("{at}.matches"),
                    "ReplacePrefixMatch needs every match to be a PathPrefix".into(),
                ));
            }
            validate_backends(&rule.backend_refs, &at)?;
            if let Some(t) = &rule.timeouts {
                for (name, value) in [("request", &t.request), ("backendRequest", &t.backend_request)] {
                    if let Some(v) = value {
                        super::duration::parse_duration(v).map_err(|e| (format!("{at}.timeouts.{name}"), e))?;
                    }
                }
            }
        }
        Ok(())
    }
}

impl PathMatch {
    /// Whether this is a `PathPrefix` match (the default).
    pub fn is_prefix(&self) -> bool {
        self.match_type.as_deref().is_none_or(|t| t == "PathPrefix")
    }
}

impl HttpRouteMatch {
    fn validate(&self, at: &str) -> Result<(), Invalid> {
        if let Some(p) = &self.path {
            let value = p.value.as_deref().unwrap_or("/");
            match p.match_type.as_deref().unwrap_or("PathPrefix") {
                "Exact" | "PathPrefix" => {
                    if !value.starts_with('/') {
                        return Err((format!("{at}.path.value"), format!("{value:?} must start with /")));
                    }
                    if value.contains("//") || value.contains("/./") || value.contains("/../") || value.contains('#') {
                        return Err((format!("{at}.path.value"), format!("{value:?} is not a normalized path")));
                    }
                }
                "RegularExpression" => check_regex(value, &format!("{at}.path.value"))?,
                other => {
                    return Err((
                        format!("{at}.path.type"),
                        format!("{other:?} is not Exact, PathPrefix or RegularExpression"),
                    ));
                }
            }
        }
        validate_value_matches(&self.headers, &format!("{at}.headers"), true)?;
        validate_value_matches(&self.query_params, &format!("{at}.queryParams"), false)?;
        if let Some(m) = &self.method {
            const METHODS: &[&str] = &["GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"];
            if !METHODS.contains(&m.as_str()) {
                return Err((format!("{at}.method"), format!("{m:?} is not an HTTP method")));
            }
        }
        Ok(())
    }
}

impl GrpcRoute {
    /// The CRD's checks.
    pub(super) fn validate(&self) -> Result<(), Invalid> {
        validate_common(&self.spec.parent_refs, &self.spec.hostnames)?;
        at_most(&self.spec.rules, MAX_RULES, "spec.rules")?;
        for (i, rule) in self.spec.rules.iter().enumerate() {
            let at = format!("spec.rules[{i}]");
            at_most(&rule.matches, MAX_MATCHES, &format!("{at}.matches"))?;
            for (j, m) in rule.matches.iter().enumerate() {
                let at = format!("{at}.matches[{j}]");
                if let Some(method) = &m.method {
                    let regex = match method.match_type.as_deref().unwrap_or("Exact") {
                        "Exact" => false,
                        "RegularExpression" => true,
                        other => {
                            return Err((
                                format!("{at}.method.type"),
                                format!("{other:?} is not Exact or RegularExpression"),
                            ));
                        }
                    };
                    if method.service.is_none() && method.method.is_none() {
                        return Err((format!("{at}.method"), "name a service, a method or both".into()));
                    }
                    for (name, value) in [("service", &method.service), ("method", &method.method)] {
                        let Some(v) = value else { continue };
                        let field = format!("{at}.method.{name}");
                        if regex {
                            check_regex(v, &field)?;
                        } else if v.is_empty() || v.contains('/') {
                            return Err((field, format!("{v:?} is not a gRPC {name} name")));
                        }
                    }
                }
                validate_value_matches(&m.headers, &format!("{at}.headers"), true)?;
            }
            validate_filters(&rule.filters, &at, false)?;
            validate_backends(&rule.backend_refs, &at)?;
        }
        Ok(())
    }
}

impl ReferenceGrant {
    /// The CRD's checks.
    pub(super) fn validate(&self) -> Result<(), Invalid> {
        between(&self.spec.from, MAX_HOSTNAMES, "spec.from")?;
        between(&self.spec.to, MAX_HOSTNAMES, "spec.to")
    }
}

fn validate_common(parents: &[ParentReference], hostnames: &[String]) -> Result<(), Invalid> {
    at_most(parents, MAX_PARENTS, "spec.parentRefs")?;
    at_most(hostnames, MAX_HOSTNAMES, "spec.hostnames")?;
    for (i, h) in hostnames.iter().enumerate() {
        if !valid_hostname(h) {
            return Err((format!("spec.hostnames[{i}]"), format!("{h:?} is not a host name (`*.` may lead it)")));
        }
    }
    for (i, p) in parents.iter().enumerate() {
        if let Some(s) = &p.section_name
            && !is_section_name(s)
        {
            return Err((format!("spec.parentRefs[{i}].sectionName"), format!("{s:?} is not a DNS-1123 label")));
        }
        if let Some(port) = p.port
            && !(1..=65535).contains(&port)
        {
            return Err((format!("spec.parentRefs[{i}].port"), format!("{port} is not a port number")));
        }
    }
    Ok(())
}

fn validate_value_matches(list: &[ValueMatch], at: &str, header: bool) -> Result<(), Invalid> {
    at_most(list, MAX_CONDITIONS, at)?;
    let mut names = HashSet::new();
    for (i, m) in list.iter().enumerate() {
        // Header names compare without case, query parameters with.
        let name = if header { m.name.to_ascii_lowercase() } else { m.name.clone() };
        if !names.insert(name) {
            return Err((format!("{at}[{i}].name"), format!("{:?} is matched twice", m.name)));
        }
        if header && http::HeaderName::from_bytes(m.name.as_bytes()).is_err() {
            return Err((format!("{at}[{i}].name"), format!("{:?} is not a header name", m.name)));
        }
        match m.match_type.as_deref().unwrap_or("Exact") {
            "Exact" => {}
            "RegularExpression" => check_regex(&m.value, &format!("{at}[{i}].value"))?,
            other => {
                return Err((format!("{at}[{i}].type"), format!("{other:?} is not Exact or RegularExpression")));
            }
        }
    }
    Ok(())
}

/// The filters of a rule: each `type` with its own field and no other. GRPCRoute takes
/// no redirects or rewrites.
fn validate_filters(filters: &[HttpRouteFilter], at: &str, http_route: bool) -> Result<(), Invalid> {
    at_most(filters, MAX_FILTERS, &format!("{at}.filters"))?;
    let mut seen = HashSet::new();
    for (i, f) in filters.iter().enumerate() {
        let at = format!("{at}.filters[{i}]");
        let set = [
            ("RequestHeaderModifier", f.request_header_modifier.is_some()),
            ("ResponseHeaderModifier", f.response_header_modifier.is_some()),
            ("RequestRedirect", f.request_redirect.is_some()),
            ("URLRewrite", f.url_rewrite.is_some()),
            ("RequestMirror", f.request_mirror.is_some()),
        ];
        let allowed: &[&str] = if http_route {
            &["RequestHeaderModifier", "ResponseHeaderModifier", "RequestRedirect", "URLRewrite", "RequestMirror"]
        } else {
            &["RequestHeaderModifier", "ResponseHeaderModifier", "RequestMirror"]
        };
        if !allowed.contains(&f.filter_type.as_str()) {
            return Err((
                format!("{at}.type"),
                format!("{:?} is not supported here; use one of {}", f.filter_type, allowed.join(", ")),
            ));
        }
        for (name, present) in set {
            if present != (name == f.filter_type) {
                let field = lower_first(name);
                return Err((
                    format!("{at}.{field}"),
                    if present {
                        format!("set, but the filter's type is {}", f.filter_type)
                    } else {
                        format!("required by type {name}")
                    },
                ));
            }
        }
        // Header modifiers and rewrites appear once per rule; mirrors may repeat.
        if f.filter_type != "RequestMirror" && !seen.insert(f.filter_type.as_str()) {
            return Err((format!("{at}.type"), format!("{} appears twice in the rule", f.filter_type)));
        }
        for m in [&f.request_header_modifier, &f.response_header_modifier].into_iter().flatten() {
            for (j, h) in m.set.iter().chain(&m.add).enumerate() {
                if http::HeaderName::from_bytes(h.name.as_bytes()).is_err()
                    || http::HeaderValue::from_str(&h.value).is_err()
                {
                    return Err((format!("{at}.headers[{j}]"), format!("{:?}: {:?} is not a header", h.name, h.value)));
                }
            }
        }
        let paths = [
            f.request_redirect.as_ref().and_then(|r| r.path.as_ref()).map(|p| (p, "requestRedirect.path")),
            f.url_rewrite.as_ref().and_then(|r| r.path.as_ref()).map(|p| (p, "urlRewrite.path")),
        ];
        for (p, field) in paths.into_iter().flatten() {
            let value = match p.modifier_type.as_str() {
                "ReplaceFullPath" => &p.replace_full_path,
                "ReplacePrefixMatch" => &p.replace_prefix_match,
                other => {
                    return Err((
                        format!("{at}.{field}.type"),
                        format!("{other:?} is not ReplaceFullPath or ReplacePrefixMatch"),
                    ));
                }
            };
            match value {
                Some(v) if v.starts_with('/') => {}
                Some(v) => return Err((format!("{at}.{field}"), format!("{v:?} must start with /"))),
                None => return Err((format!("{at}.{field}"), format!("{} needs its value", p.modifier_type))),
            }
        }
        if let Some(r) = &f.request_redirect {
            if r.path.as_ref().is_some_and(|p| p.modifier_type == "ReplacePrefixMatch") {
                return Err((
                    format!("{at}.requestRedirect.path.type"),
                    "ReplacePrefixMatch in a redirect is not supported by this agent version yet; use ReplaceFullPath"
                        .into(),
                ));
            }
            if r.scheme.as_deref().is_some_and(|s| s != "http" && s != "https") {
                return Err((format!("{at}.requestRedirect.scheme"), "http or https".into()));
            }
            if r.status_code.is_some_and(|c| c != 301 && c != 302) {
                return Err((format!("{at}.requestRedirect.statusCode"), "301 or 302".into()));
            }
            if r.port.is_some_and(|p| !(1..=65535).contains(&p)) {
                return Err((format!("{at}.requestRedirect.port"), "not a port number".into()));
            }
        }
        if let Some(m) = &f.request_mirror {
            validate_backends(std::slice::from_ref(&m.backend_ref), &format!("{at}.requestMirror"))?;
            if m.percent.is_some_and(|p| p > 100) {
                return Err((format!("{at}.requestMirror.percent"), "0 to 100".into()));
            }
        }
    }
    Ok(())
}

fn validate_backends(backends: &[BackendRef], at: &str) -> Result<(), Invalid> {
    at_most(backends, MAX_BACKENDS, &format!("{at}.backendRefs"))?;
    for (i, b) in backends.iter().enumerate() {
        if b.weight.is_some_and(|w| w > MAX_WEIGHT) {
            return Err((format!("{at}.backendRefs[{i}].weight"), format!("0 to {MAX_WEIGHT}")));
        }
        if b.is_service() && b.port.is_none() {
            return Err((format!("{at}.backendRefs[{i}].port"), "required for a Service".into()));
        }
        if b.port.is_some_and(|p| !(1..=65535).contains(&p)) {
            return Err((format!("{at}.backendRefs[{i}].port"), "not a port number".into()));
        }
    }
    Ok(())
}

impl BackendRef {
    /// Whether the backend is a core `Service` (the default).
    pub fn is_service(&self) -> bool {
        self.group.as_deref().unwrap_or("").is_empty() && self.kind.as_deref().unwrap_or("Service") == "Service"
    }
}

fn check_regex(value: &str, field: &str) -> Result<(), Invalid> {
    super::istio::anchored_regex(value).map(|_| ()).map_err(|e| (field.into(), format!("not a valid RE2 regex: {e}")))
}

fn lower_first(s: &str) -> String {
    match s {
        "URLRewrite" => "urlRewrite".into(),
        _ => {
            let mut c = s.chars();
            c.next().map(|f| f.to_ascii_lowercase().to_string() + c.as_str()).unwrap_or_default()
        }
    }
}

/// A section name: a DNS-1123 label.
fn is_section_name(s: &str) -> bool {
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    (1..=63).contains(&s.len())
        && s.bytes().all(|b| alnum(b) || b == b'-')
        && s.bytes().next().is_some_and(alnum)
        && s.bytes().last().is_some_and(alnum)
}

/// A host name, `*.` allowed in front; no IP addresses, no port.
pub fn valid_hostname(h: &str) -> bool {
    let name = h.strip_prefix("*.").unwrap_or(h);
    h.len() <= 253
        && name.parse::<std::net::IpAddr>().is_err()
        && !name.is_empty()
        && name.split('.').all(|l| is_section_name(&l.to_ascii_lowercase()))
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::config::{Object, parse_documents};

    const GATEWAY: &str = "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: web, namespace: edge}\nspec:\n  gatewayClassName: istio\n  listeners:\n";
    const ROUTE: &str = "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r, namespace: shop}\nspec:\n  parentRefs: [{name: web, namespace: edge}]\n  rules:\n";

    fn field_of(yaml: &str) -> Result<Vec<Object>, String> {
        parse_documents(Path::new("t.yaml"), yaml).map_err(|e| e.field.unwrap_or_default())
    }

    #[test]
    fn what_the_crds_accept_parses_and_istios_gateway_keeps_its_kind() {
        let yaml = format!(
            "{GATEWAY}  - {{name: http, port: 80, protocol: HTTP}}\n  - {{name: https, port: 443, protocol: HTTPS, hostname: \"*.example.com\", tls: {{certificateRefs: [{{name: cert}}]}}}}\n---\n{ROUTE}  - matches: [{{path: {{type: PathPrefix, value: /a}}, headers: [{{name: x-v, value: \"2\"}}], method: GET}}]\n    filters:\n    - {{type: URLRewrite, urlRewrite: {{path: {{type: ReplacePrefixMatch, replacePrefixMatch: /b}}}}}}\n    - {{type: RequestHeaderModifier, requestHeaderModifier: {{add: [{{name: x-a, value: b}}], remove: [x-c]}}}}\n    backendRefs: [{{name: svc, port: 80, weight: 3}}]\n    timeouts: {{request: 10s}}\n---\napiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {{name: web, namespace: edge}}\nspec: {{servers: [{{port: {{number: 80, name: http, protocol: HTTP}}, hosts: [\"*\"]}}]}}\n"
        );
        let objects = field_of(&yaml).unwrap();
        let kinds: Vec<&str> = objects.iter().map(Object::kind).collect();
        assert_eq!(kinds, ["Gateway.gateway.networking.k8s.io", "HTTPRoute", "Gateway"]);
    }

    #[test]
    fn an_east_west_gateways_hbone_listener_is_read_as_istio_writes_it() {
        let yaml = "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\n\
                    metadata: {name: istio-eastwestgateway, namespace: istio-system}\n\
                    spec:\n  gatewayClassName: istio-east-west\n  listeners:\n  \
                    - {name: mesh, port: 15008, protocol: HBONE, tls: {mode: Terminate, \
                    options: {gateway.istio.io/tls-terminate-mode: ISTIO_MUTUAL}}}\n";
        let objects = field_of(yaml).unwrap();
        let t = super::translate::translate(&objects);
        let [(gw, ns)] = t.gateways.as_slice() else { panic!("one Istio Gateway: {:?}", t.problems) };
        assert_eq!(ns, "istio-system");
        let server = &gw.spec.servers[0];
        assert_eq!(server.port.as_ref().map(|p| (p.number, p.protocol.as_str())), Some((15008, "HBONE")));
        assert_eq!(server.tls.as_ref().map(|t| t.mode), Some(crate::config::gateway::TlsMode::IstioMutual));
        assert_eq!(
            gw.spec.selector.get("gateway.networking.k8s.io/gateway-name").map(String::as_str),
            Some("istio-eastwestgateway")
        );
        assert!(t.problems.is_empty(), "{:?}", t.problems);
    }

    #[test]
    fn what_the_crds_refuse_is_refused_with_the_field() {
        let listeners = [
            ("  - {name: https, port: 443, protocol: HTTPS}\n", "spec.listeners[0].tls"),
            (
                "  - {name: http, port: 80, protocol: HTTP, tls: {certificateRefs: [{name: c}]}}\n",
                "spec.listeners[0].tls",
            ),
            (
                "  - {name: h, port: 80, protocol: HTTP}\n  - {name: h, port: 81, protocol: HTTP}\n",
                "spec.listeners[1].name",
            ),
            ("  - {name: h, port: 0, protocol: HTTP}\n", "spec.listeners[0].port"),
            ("  - {name: h, port: 80, protocol: QUIC}\n", "spec.listeners[0].protocol"),
            (
                "  - {name: mesh, port: 15008, protocol: HBONE, tls: {mode: Passthrough}}\n",
                "spec.listeners[0].tls.mode",
            ),
            (
                "  - {name: mesh, port: 15008, protocol: HBONE, tls: {options: {gateway.istio.io/tls-terminate-mode: SIMPLE}}}\n",
                "spec.listeners[0].tls.options",
            ),
            ("  - {name: h, port: 80, protocol: HTTP, hostname: \"a.*.com\"}\n", "spec.listeners[0].hostname"),
            (
                "  - {name: h, port: 80, protocol: HTTP, allowedRoutes: {namespaces: {from: Selector}}}\n",
                "spec.listeners[0].allowedRoutes.namespaces.selector",
            ),
        ];
        for (l, field) in listeners {
            assert_eq!(field_of(&format!("{GATEWAY}{l}")).err().as_deref(), Some(field), "{l}");
        }
        let rules = [
            ("  - matches: [{path: {value: a}}]\n", "spec.rules[0].matches[0].path.value"),
            ("  - matches: [{path: {type: RegularExpression, value: \"(\"}}]\n", "spec.rules[0].matches[0].path.value"),
            ("  - matches: [{method: FETCH}]\n", "spec.rules[0].matches[0].method"),
            ("  - backendRefs: [{name: s}]\n", "spec.rules[0].backendRefs[0].port"),
            ("  - backendRefs: [{name: s, port: 80, weight: 1000001}]\n", "spec.rules[0].backendRefs[0].weight"),
            ("  - filters: [{type: RequestHeaderModifier}]\n", "spec.rules[0].filters[0].requestHeaderModifier"),
            (
                "  - filters: [{type: RequestRedirect, requestRedirect: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /}}}]\n",
                "spec.rules[0].filters[0].requestRedirect.path.type",
            ),
            (
                "  - matches: [{path: {type: Exact, value: /a}}]\n    filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /}}}]\n",
                "spec.rules[0].matches",
            ),
            (
                "  - filters: [{type: RequestRedirect, requestRedirect: {statusCode: 307}}]\n",
                "spec.rules[0].filters[0].requestRedirect.statusCode",
            ),
            ("  - filters: [{type: ExtensionRef}]\n", "spec.rules[0].filters[0].type"),
            ("  - timeouts: {request: soon}\n", "spec.rules[0].timeouts.request"),
        ];
        for (r, field) in rules {
            assert_eq!(field_of(&format!("{ROUTE}{r}")).err().as_deref(), Some(field), "{r}");
        }
    }
}

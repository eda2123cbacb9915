//! Istio traffic management: `networking.istio.io` VirtualService and DestinationRule
//! (v1, v1beta1, v1alpha3 share one schema), typed as the API reference spells them.
//!
//! Fields the agent does not enforce yet are still typed (as raw YAML), so validation
//! can refuse them by name instead of letting serde call them unknown.

use super::resource::Resource;
use super::schema::AnyValue;
use std::collections::BTreeMap;

use serde::Deserialize;

/// API versions accepted for Istio networking kinds.
pub const NETWORKING_VERSIONS: &[&str] =
    &["networking.istio.io/v1", "networking.istio.io/v1beta1", "networking.istio.io/v1alpha3"];

/// `VirtualService`.
pub type VirtualService = Resource<VirtualServiceSpec>;

/// `VirtualService.spec`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VirtualServiceSpec {
    /// Hosts the rules apply to: short names, FQDNs, `*.suffix` wildcards.
    #[serde(default)]
    pub hosts: Vec<String>,
    /// Gateways (`name`, `namespace/name`) and/or `mesh`; empty means `mesh`.
    #[serde(default)]
    pub gateways: Vec<String>,
    /// HTTP rules, first match wins.
    #[serde(default)]
    pub http: Vec<HttpRoute>,
    /// TCP rules, first match wins, for connections that are not routed as HTTP.
    #[serde(default)]
    pub tcp: Vec<TcpRoute>,
    /// TLS rules: connections routed by SNI without terminating TLS. Served at
    /// gateways (PASSTHROUGH servers); refused for mesh traffic, where they are not
    /// enforced yet.
    #[serde(default)]
    pub tls: Vec<TlsRoute>,
    /// Visibility (the agent serves one cluster view; accepted as is).
    #[serde(default)]
    pub export_to: Vec<String>,
}

/// One TLS rule.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TlsRoute {
    /// Conditions: any one matching selects the rule (at least one is required).
    #[serde(rename = "match")]
    pub matches: Vec<TlsMatch>,
    /// Weighted destinations.
    #[serde(default)]
    pub route: Vec<HttpRouteDestination>,
}

/// `TLSMatchAttributes`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TlsMatch {
    /// SNI values (`*.suffix` wildcards allowed); required.
    pub sni_hosts: Vec<String>,
    /// Destination port.
    #[serde(default)]
    pub port: Option<u32>,
    /// Gateways this match applies to, in place of the top-level list.
    #[serde(default)]
    pub gateways: Vec<String>,
    /// Destination subnets (not enforced yet).
    #[serde(default)]
    pub destination_subnets: Option<AnyValue>,
    /// Labels of the calling workload (not enforced at gateways: no calling pod).
    #[serde(default)]
    pub source_labels: BTreeMap<String, String>,
    /// Namespace of the calling workload (likewise).
    #[serde(default)]
    pub source_namespace: Option<String>,
}

/// One TCP rule.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TcpRoute {
    /// Conditions: any one matching selects the rule; none means always.
    #[serde(default, rename = "match")]
    pub matches: Vec<L4Match>,
    /// Weighted destinations.
    #[serde(default)]
    pub route: Vec<HttpRouteDestination>,
}

/// A TCP match condition.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct L4Match {
    /// Destination port.
    #[serde(default)]
    pub port: Option<u32>,
    /// Labels the calling pod must have.
    #[serde(default)]
    pub source_labels: BTreeMap<String, String>,
    /// Namespace of the calling pod.
    #[serde(default)]
    pub source_namespace: Option<String>,
    /// Gateways (and/or `mesh`) this match applies to, in place of the top-level list.
    #[serde(default)]
    pub gateways: Vec<String>,
    /// Destination subnets (not enforced yet).
    #[serde(default)]
    pub destination_subnets: Option<AnyValue>,
}

/// One HTTP rule.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRoute {
    /// Rule name, for logs.
    #[serde(default)]
    pub name: Option<String>,
    /// Conditions: any one matching selects the rule; none means always.
    #[serde(default, rename = "match")]
    pub matches: Vec<HttpMatchRequest>,
    /// Weighted destinations.
    #[serde(default)]
    pub route: Vec<HttpRouteDestination>,
    /// Answer with a redirect instead of routing.
    #[serde(default)]
    pub redirect: Option<HttpRedirect>,
    /// Answer directly instead of routing.
    #[serde(default)]
    pub direct_response: Option<HttpDirectResponse>,
    /// Rewrite before forwarding.
    #[serde(default)]
    pub rewrite: Option<HttpRewrite>,
    /// Overall timeout, e.g. `30s`.
    #[serde(default)]
    pub timeout: Option<String>,
    /// Retry policy.
    #[serde(default)]
    pub retries: Option<HttpRetry>,
    /// Fault injection.
    #[serde(default)]
    pub fault: Option<HttpFault>,
    /// Shadow destination.
    #[serde(default)]
    pub mirror: Option<Destination>,
    /// Share of requests mirrored (default 100).
    #[serde(default)]
    pub mirror_percentage: Option<Percent>,
    /// Legacy integer mirror percentage.
    #[serde(default)]
    pub mirror_percent: Option<u32>,
    /// Header manipulation.
    #[serde(default)]
    pub headers: Option<Headers>,
    /// CORS.
    #[serde(default)]
    pub cors_policy: Option<CorsPolicy>,
    /// Delegation (not enforced yet).
    #[serde(default)]
    pub delegate: Option<AnyValue>,
    /// Several shadow destinations, each with its own share.
    #[serde(default)]
    pub mirrors: Vec<HttpMirrorPolicy>,
}

/// `corsPolicy`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CorsPolicy {
    /// Origins allowed, as string matches.
    #[serde(default)]
    pub allow_origins: Vec<StringMatch>,
    /// Deprecated exact origins.
    #[serde(default)]
    pub allow_origin: Vec<String>,
    /// `Access-Control-Allow-Methods`.
    #[serde(default)]
    pub allow_methods: Vec<String>,
    /// `Access-Control-Allow-Headers`.
    #[serde(default)]
    pub allow_headers: Vec<String>,
    /// `Access-Control-Expose-Headers`.
    #[serde(default)]
    pub expose_headers: Vec<String>,
    /// `Access-Control-Max-Age`.
    #[serde(default)]
    pub max_age: Option<String>,
    /// `Access-Control-Allow-Credentials`.
    #[serde(default)]
    pub allow_credentials: Option<bool>,
    /// FORWARD (default) or IGNORE preflights from origins that do not match.
    #[serde(default)]
    pub unmatched_preflights: Option<String>,
}

/// One entry of `mirrors`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HttpMirrorPolicy {
    /// Where copies go.
    pub destination: Destination,
    /// Share copied (default 100).
    #[serde(default)]
    pub percentage: Option<Percent>,
}

/// `rewrite.uriRegexRewrite`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RegexRewrite {
    /// RE2 pattern.
    #[serde(rename = "match")]
    pub pattern: String,
    /// Replacement, `\\1` style groups.
    pub rewrite: String,
}

/// `trafficPolicy.tls`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClientTls {
    /// DISABLE, SIMPLE, MUTUAL or ISTIO_MUTUAL.
    #[serde(default)]
    pub mode: Option<String>,
    /// SNI (accepted with ISTIO_MUTUAL: the tunnel verifies SPIFFE identities).
    #[serde(default)]
    pub sni: Option<String>,
    /// Subject alt names to verify (refused for SIMPLE/MUTUAL: `sni` is checked).
    #[serde(default)]
    pub subject_alt_names: Vec<String>,
    /// Refused when true: the agent always verifies.
    #[serde(default)]
    pub insecure_skip_verify: Option<bool>,
    /// A Secret with the certificates (`tls.crt`, `tls.key`, `ca.crt`), in the
    /// namespace of the proxy that originates: read by gateways; node agents read no
    /// Secrets, and refuse such connections.
    #[serde(default)]
    pub credential_name: Option<String>,
    /// Client certificate chain file (MUTUAL).
    #[serde(default)]
    pub client_certificate: Option<String>,
    /// Client key file (MUTUAL).
    #[serde(default)]
    pub private_key: Option<String>,
    /// Roots file the server's certificate must chain to (SIMPLE, MUTUAL); the
    /// system's roots when unset.
    #[serde(default)]
    pub ca_certificates: Option<String>,
}

/// A string condition: exactly one of the three.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StringMatch {
    /// Equal.
    #[serde(default)]
    pub exact: Option<String>,
    /// Starts with.
    #[serde(default)]
    pub prefix: Option<String>,
    /// RE2 regex, matched against the whole value.
    #[serde(default)]
    pub regex: Option<String>,
}

/// One match condition; all its fields must hold.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpMatchRequest {
    /// Name, for logs.
    #[serde(default)]
    pub name: Option<String>,
    /// Path (without the query).
    #[serde(default)]
    pub uri: Option<StringMatch>,
    /// `http` or `https`.
    #[serde(default)]
    pub scheme: Option<StringMatch>,
    /// Method.
    #[serde(default)]
    pub method: Option<StringMatch>,
    /// Host header / `:authority`.
    #[serde(default)]
    pub authority: Option<StringMatch>,
    /// Headers that must be present and match (keys lowercase).
    #[serde(default)]
    pub headers: BTreeMap<String, StringMatch>,
    /// Headers that must not match.
    #[serde(default)]
    pub without_headers: BTreeMap<String, StringMatch>,
    /// Query parameters.
    #[serde(default)]
    pub query_params: BTreeMap<String, StringMatch>,
    /// Destination port.
    #[serde(default)]
    pub port: Option<u32>,
    /// Labels the calling pod must have.
    #[serde(default)]
    pub source_labels: BTreeMap<String, String>,
    /// Namespace of the calling pod.
    #[serde(default)]
    pub source_namespace: Option<String>,
    /// Gateways (and/or `mesh`) this match applies to, in place of the top-level list.
    #[serde(default)]
    pub gateways: Vec<String>,
    /// Case-insensitive uri match.
    #[serde(default)]
    pub ignore_uri_case: bool,
}

/// A weighted destination.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRouteDestination {
    /// Where.
    pub destination: Destination,
    /// Share of traffic (all weights of a rule sum to 100).
    #[serde(default)]
    pub weight: Option<i64>,
    /// Header manipulation for this destination.
    #[serde(default)]
    pub headers: Option<Headers>,
}

/// A service (and optional subset and port).
#[derive(Debug, Clone, Default, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Destination {
    /// Service name: short (in the VirtualService's namespace) or FQDN.
    pub host: String,
    /// DestinationRule subset.
    #[serde(default)]
    pub subset: Option<String>,
    /// Service port.
    #[serde(default)]
    pub port: Option<PortSelector>,
}

/// `port: {number: N}`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PortSelector {
    /// Port number.
    pub number: u32,
}

/// A redirect answer.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRedirect {
    /// New path.
    #[serde(default)]
    pub uri: Option<String>,
    /// New host.
    #[serde(default)]
    pub authority: Option<String>,
    /// New port.
    #[serde(default)]
    pub port: Option<u32>,
    /// New scheme.
    #[serde(default)]
    pub scheme: Option<String>,
    /// Status code, 301 by default.
    #[serde(default)]
    pub redirect_code: Option<u32>,
    /// FROM_PROTOCOL_DEFAULT or FROM_REQUEST_PORT, when `port` is unset.
    #[serde(default)]
    pub derive_port: Option<String>,
}

/// A direct answer.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpDirectResponse {
    /// Status code.
    pub status: u32,
    /// Body.
    #[serde(default)]
    pub body: Option<HttpBody>,
}

/// `string` or base64 `bytes`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HttpBody {
    /// Text body.
    #[serde(default)]
    pub string: Option<String>,
    /// Base64 body.
    #[serde(default)]
    pub bytes: Option<String>,
}

/// Rewrites applied before forwarding.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRewrite {
    /// Replaces the matched uri prefix (or the whole path for exact/regex matches).
    #[serde(default)]
    pub uri: Option<String>,
    /// Replaces the Host header.
    #[serde(default)]
    pub authority: Option<String>,
    /// Regex rewrite of the path.
    #[serde(default)]
    pub uri_regex_rewrite: Option<RegexRewrite>,
}

/// Retry policy.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRetry {
    /// Retries (not counting the first try).
    #[serde(default)]
    pub attempts: Option<i64>,
    /// Timeout per try.
    #[serde(default)]
    pub per_try_timeout: Option<String>,
    /// Comma-separated conditions.
    #[serde(default)]
    pub retry_on: Option<String>,
    /// Accepted, meaningless on one node set.
    #[serde(default)]
    pub retry_remote_localities: Option<bool>,
}

/// Fault injection.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HttpFault {
    /// Delay before forwarding.
    #[serde(default)]
    pub delay: Option<FaultDelay>,
    /// Answer with an error instead of forwarding.
    #[serde(default)]
    pub abort: Option<FaultAbort>,
}

/// `fault.delay`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FaultDelay {
    /// How long.
    #[serde(default)]
    pub fixed_delay: Option<String>,
    /// Share of requests (default 100).
    #[serde(default)]
    pub percentage: Option<Percent>,
    /// Legacy integer share.
    #[serde(default)]
    pub percent: Option<u32>,
}

/// `fault.abort`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FaultAbort {
    /// Status to answer.
    #[serde(default)]
    pub http_status: Option<i64>,
    /// gRPC status name or number, answered trailers-only.
    #[serde(default)]
    pub grpc_status: Option<String>,
    /// Share of requests (default 100).
    #[serde(default)]
    pub percentage: Option<Percent>,
}

/// `{value: 0.0 - 100.0}`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Percent {
    /// Percent.
    pub value: f64,
}

/// Request and response header operations.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Headers {
    /// On the request.
    #[serde(default)]
    pub request: Option<HeaderOperations>,
    /// On the response.
    #[serde(default)]
    pub response: Option<HeaderOperations>,
}

/// set / add / remove.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HeaderOperations {
    /// Overwrite.
    #[serde(default)]
    pub set: BTreeMap<String, String>,
    /// Append.
    #[serde(default)]
    pub add: BTreeMap<String, String>,
    /// Remove.
    #[serde(default)]
    pub remove: Vec<String>,
}

/// `DestinationRule`.
pub type DestinationRule = Resource<DestinationRuleSpec>;

/// `DestinationRule.spec`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DestinationRuleSpec {
    /// The service.
    pub host: String,
    /// Policy for every subset unless overridden.
    #[serde(default)]
    pub traffic_policy: Option<TrafficPolicy>,
    /// Named subsets by labels.
    #[serde(default)]
    pub subsets: Vec<Subset>,
    /// Visibility (accepted as is).
    #[serde(default)]
    pub export_to: Vec<String>,
    /// Workload selector (not enforced yet).
    #[serde(default)]
    pub workload_selector: Option<AnyValue>,
}

/// A subset.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Subset {
    /// Name referenced by routes.
    pub name: String,
    /// Endpoints with all these labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Overrides the top-level policy, field by field group.
    #[serde(default)]
    pub traffic_policy: Option<TrafficPolicy>,
}

/// Traffic policy.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TrafficPolicy {
    /// Load balancing.
    #[serde(default)]
    pub load_balancer: Option<LoadBalancer>,
    /// Connection pool limits (circuit breaking).
    #[serde(default)]
    pub connection_pool: Option<ConnectionPool>,
    /// Ejection of failing endpoints.
    #[serde(default)]
    pub outlier_detection: Option<OutlierDetection>,
    /// Client TLS: ISTIO_MUTUAL is what the mesh does for mesh endpoints.
    #[serde(default)]
    pub tls: Option<ClientTls>,
    /// Per-port overrides of the groups above.
    #[serde(default)]
    pub port_level_settings: Vec<PortTrafficPolicy>,
}

/// One entry of `portLevelSettings`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PortTrafficPolicy {
    /// The Service port it applies to.
    pub port: PortSelector,
    /// Load balancing.
    #[serde(default)]
    pub load_balancer: Option<LoadBalancer>,
    /// Connection pool limits.
    #[serde(default)]
    pub connection_pool: Option<ConnectionPool>,
    /// Ejection.
    #[serde(default)]
    pub outlier_detection: Option<OutlierDetection>,
    /// Client TLS.
    #[serde(default)]
    pub tls: Option<ClientTls>,
}

impl PortTrafficPolicy {
    /// The same groups as a traffic policy without port settings.
    pub fn as_policy(&self) -> TrafficPolicy {
        TrafficPolicy {
            load_balancer: self.load_balancer.clone(),
            connection_pool: self.connection_pool.clone(),
            outlier_detection: self.outlier_detection.clone(),
            tls: self.tls.clone(),
            port_level_settings: Vec::new(),
        }
    }
}

/// `loadBalancer`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LoadBalancer {
    /// ROUND_ROBIN, LEAST_REQUEST, RANDOM, PASSTHROUGH (LEAST_CONN is LEAST_REQUEST).
    #[serde(default)]
    pub simple: Option<String>,
    /// Session affinity.
    #[serde(default)]
    pub consistent_hash: Option<ConsistentHash>,
    /// Locality-aware load balancing: which endpoints serve first, and where traffic
    /// fails over to (applied with `outlierDetection`, as Istio does).
    #[serde(default)]
    pub locality_lb_setting: Option<LocalityLbSetting>,
    /// Warm-up (not enforced yet).
    #[serde(default)]
    pub warmup_duration_secs: Option<AnyValue>,
}

/// A locality as `distribute` names it: `region`, `region/zone` or
/// `region/zone/subzone`, where a part may be `*` (then the last one).
fn validate_locality_pattern(at: &str, pattern: &str) -> Result<(), Invalid> {
    let parts: Vec<&str> = pattern.split('/').collect();
    let bad = parts.len() > 3
        || parts.iter().any(|p| p.is_empty() || (p.contains('*') && *p != "*"))
        || parts.iter().position(|p| *p == "*").is_some_and(|i| i + 1 != parts.len());
    if bad {
        return Err((at.into(), format!("{pattern:?} is not region/zone/subzone (a part may be *, last)")));
    }
    Ok(())
}

/// `localityLbSetting`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalityLbSetting {
    /// Off with `false`; on by default, as Istio's mesh-wide default is.
    #[serde(default)]
    pub enabled: Option<bool>,
    /// Weights per locality, for clients of the `from` locality.
    #[serde(default)]
    pub distribute: Vec<LocalityDistribute>,
    /// Where traffic goes when the client's region has no healthy endpoint.
    #[serde(default)]
    pub failover: Vec<LocalityFailover>,
    /// Labels, in order, whose match with the client's ranks endpoints
    /// (`topology.istio.io/cluster`, `topology.istio.io/network`,
    /// `topology.kubernetes.io/region`, `topology.kubernetes.io/zone` or pod labels).
    #[serde(default)]
    pub failover_priority: Vec<String>,
}

/// `localityLbSetting.distribute[]`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LocalityDistribute {
    /// The clients' locality, `region/zone/subzone` (`*` for any part that follows).
    pub from: String,
    /// Localities (same form) and the share of the traffic each gets, summing to 100.
    #[serde(default)]
    pub to: std::collections::BTreeMap<String, u32>,
}

/// `localityLbSetting.failover[]`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LocalityFailover {
    /// The client's region.
    pub from: String,
    /// The region its traffic fails over to.
    pub to: String,
}

/// `consistentHash`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConsistentHash {
    /// Hash a header.
    #[serde(default)]
    pub http_header_name: Option<String>,
    /// Hash a cookie.
    #[serde(default)]
    pub http_cookie: Option<HttpCookie>,
    /// Hash the client address.
    #[serde(default)]
    pub use_source_ip: Option<bool>,
    /// Hash a query parameter.
    #[serde(default)]
    pub http_query_parameter_name: Option<String>,
    /// Ring size (accepted; the agent's ring is fixed).
    #[serde(default)]
    pub minimum_ring_size: Option<u64>,
}

/// `httpCookie`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HttpCookie {
    /// Cookie name.
    pub name: String,
    /// Path of a generated cookie.
    #[serde(default)]
    pub path: Option<String>,
    /// With a ttl, a missing cookie is generated (0s: a session cookie).
    #[serde(default)]
    pub ttl: Option<String>,
}

/// `connectionPool`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ConnectionPool {
    /// TCP limits.
    #[serde(default)]
    pub tcp: Option<TcpPool>,
    /// HTTP limits.
    #[serde(default)]
    pub http: Option<HttpPool>,
}

/// `connectionPool.tcp`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TcpPool {
    /// Connections to the destination at once.
    #[serde(default)]
    pub max_connections: Option<i64>,
    /// Connect timeout.
    #[serde(default)]
    pub connect_timeout: Option<String>,
    /// Keepalive (not enforced yet).
    #[serde(default)]
    pub tcp_keepalive: Option<AnyValue>,
    /// Max connection duration (not enforced yet).
    #[serde(default)]
    pub max_connection_duration: Option<AnyValue>,
}

/// `connectionPool.http`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpPool {
    /// Requests waiting for a connection.
    #[serde(default)]
    pub http1_max_pending_requests: Option<i64>,
    /// Requests in flight.
    #[serde(default)]
    pub http2_max_requests: Option<i64>,
    /// Requests per upstream connection before it is closed.
    #[serde(default)]
    pub max_requests_per_connection: Option<i64>,
    /// Retries in flight to the destination at once.
    #[serde(default)]
    pub max_retries: Option<i64>,
    /// Idle upstream connections close after this.
    #[serde(default)]
    pub idle_timeout: Option<String>,
    /// DEFAULT, DO_NOT_UPGRADE or UPGRADE.
    #[serde(default)]
    pub h2_upgrade_policy: Option<String>,
    /// Accepted as is.
    #[serde(default)]
    pub use_client_protocol: Option<bool>,
}

/// `outlierDetection`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OutlierDetection {
    /// 5xx answers in a row that eject an endpoint.
    #[serde(default, rename = "consecutive5xxErrors")]
    pub consecutive_5xx_errors: Option<i64>,
    /// 502/503/504 in a row that eject an endpoint.
    #[serde(default)]
    pub consecutive_gateway_errors: Option<i64>,
    /// Deprecated spelling of consecutiveGatewayErrors.
    #[serde(default)]
    pub consecutive_errors: Option<i64>,
    /// Sweep interval.
    #[serde(default)]
    pub interval: Option<String>,
    /// Ejection time, times the number of ejections so far.
    #[serde(default)]
    pub base_ejection_time: Option<String>,
    /// At most this share of endpoints ejected.
    #[serde(default)]
    pub max_ejection_percent: Option<i64>,
    /// Below this share of healthy endpoints, ejection is off.
    #[serde(default)]
    pub min_health_percent: Option<i64>,
    /// Connect failures and timeouts stop counting as 5xx/gateway errors.
    #[serde(default)]
    pub split_external_local_origin_errors: Option<bool>,
    /// Local-origin failures in a row (not enforced yet).
    #[serde(default)]
    pub consecutive_local_origin_failures: Option<AnyValue>,
}

pub(super) use super::schema::Invalid;

/// `retryOn` conditions Istio (Envoy) accepts, besides numeric status codes.
pub const RETRY_ON: &[&str] = &[
    "5xx",
    "gateway-error",
    "reset",
    "connect-failure",
    "envoy-ratelimited",
    "retriable-4xx",
    "refused-stream",
    "retriable-status-codes",
    "retriable-headers",
    "cancelled",
    "deadline-exceeded",
    "internal",
    "resource-exhausted",
    "unavailable",
];

/// Load balancer names Istio accepts.
const LB_SIMPLE: &[&str] = &["UNSPECIFIED", "ROUND_ROBIN", "LEAST_REQUEST", "LEAST_CONN", "RANDOM", "PASSTHROUGH"];

/// A gRPC status by name (`UNAVAILABLE`) or number (`14`).
pub fn grpc_code(s: &str) -> Option<u32> {
    const NAMES: [&str; 17] = [
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    ];
    s.parse::<u32>().ok().filter(|n| *n <= 16).or_else(|| NAMES.iter().position(|n| *n == s).map(|i| i as u32))
}

/// Parses an Istio duration (`30s`, `1.5s`, `100ms`, `1m`, `1h`), refusing negatives.
pub fn duration(field: &str, s: &str) -> Result<std::time::Duration, Invalid> {
    if s.trim_start().starts_with('-') {
        return Err((field.into(), format!("duration {s:?} must not be negative")));
    }
    crate::config::duration::parse_duration(s.trim()).map_err(|e| (field.into(), e))
}

fn not_supported(field: String, present: bool) -> Result<(), Invalid> {
    if present { Err((field, "is not supported by this agent version yet".into())) } else { Ok(()) }
}

fn percent(field: String, p: &Option<Percent>) -> Result<(), Invalid> {
    match p {
        Some(p) if !(0.0..=100.0).contains(&p.value) || p.value.is_nan() => {
            Err((field, format!("{} is not a percentage between 0 and 100", p.value)))
        }
        _ => Ok(()),
    }
}

impl StringMatch {
    /// Exactly one of exact/prefix/regex, and a regex that compiles.
    pub(super) fn validate(&self, field: &str) -> Result<(), Invalid> {
        let set = [self.exact.is_some(), self.prefix.is_some(), self.regex.is_some()].iter().filter(|b| **b).count();
        if set != 1 {
            return Err((field.into(), "exactly one of exact, prefix or regex must be set".into()));
        }
        if let Some(r) = &self.regex {
            valid_regex(format!("{field}.regex"), r)?;
        }
        Ok(())
    }
}

/// A regex as Istio and Linkerd match it: RE2 syntax against the whole value.
pub fn anchored_regex(r: &str) -> Result<regex::Regex, regex::Error> {
    regex::Regex::new(&format!("^(?:{r})$"))
}

/// Refuses a pattern [`anchored_regex`] cannot compile, naming `field`.
pub(super) fn valid_regex(field: String, r: &str) -> Result<(), Invalid> {
    anchored_regex(r).map(|_| ()).map_err(|e| (field, format!("invalid regex {r:?}: {e}")))
}

impl VirtualService {
    /// The checks Istio's validation webhook makes, and refusals of fields the agent
    /// does not enforce.
    pub(super) fn validate(&self) -> Result<(), Invalid> {
        let s = &self.spec;
        if s.hosts.is_empty() {
            return Err(("spec.hosts".into(), "at least one host is required".into()));
        }
        for (i, h) in s.hosts.iter().enumerate() {
            if h.is_empty() || h.contains('/') || (h.contains('*') && !h.starts_with("*")) {
                return Err((format!("spec.hosts[{i}]"), format!("{h:?} is not a host name or *.suffix wildcard")));
            }
        }
        gateway_references("spec.gateways", &s.gateways)?;
        for (i, r) in s.tcp.iter().enumerate() {
            let at = format!("spec.tcp[{i}]");
            if r.route.is_empty() {
                return Err((format!("{at}.route"), "at least one destination is required".into()));
            }
            for (j, m) in r.matches.iter().enumerate() {
                not_supported(format!("{at}.match[{j}].destinationSubnets"), m.destination_subnets.is_some())?;
                gateway_references(&format!("{at}.match[{j}].gateways"), &m.gateways)?;
                if let Some(p) = m.port
                    && !(1..=65535).contains(&p)
                {
                    return Err((format!("{at}.match[{j}].port"), format!("{p} is not a port number")));
                }
            }
            validate_weighted(&at, &r.route)?;
        }
        for (i, r) in s.tls.iter().enumerate() {
            let at = format!("spec.tls[{i}]");
            if r.matches.is_empty() {
                return Err((format!("{at}.match"), "at least one match with sniHosts is required".into()));
            }
            for (j, m) in r.matches.iter().enumerate() {
                let mf = format!("{at}.match[{j}]");
                if m.sni_hosts.is_empty() {
                    return Err((format!("{mf}.sniHosts"), "at least one SNI host is required".into()));
                }
                not_supported(format!("{mf}.destinationSubnets"), m.destination_subnets.is_some())?;
                not_supported(format!("{mf}.sourceLabels"), !m.source_labels.is_empty())?;
                not_supported(format!("{mf}.sourceNamespace"), m.source_namespace.is_some())?;
                gateway_references(&format!("{mf}.gateways"), &m.gateways)?;
                if let Some(p) = m.port
                    && !(1..=65535).contains(&p)
                {
                    return Err((format!("{mf}.port"), format!("{p} is not a port number")));
                }
            }
            if r.route.is_empty() {
                return Err((format!("{at}.route"), "at least one destination is required".into()));
            }
            validate_weighted(&at, &r.route)?;
        }
        for (i, r) in s.http.iter().enumerate() {
            validate_http_route(&format!("spec.http[{i}]"), r)?;
        }
        Ok(())
    }
}

fn gateway_references(at: &str, gateways: &[String]) -> Result<(), Invalid> {
    for (i, g) in gateways.iter().enumerate() {
        super::gateway::validate_gateway_reference(format!("{at}[{i}]"), g)?;
    }
    Ok(())
}

fn validate_http_route(at: &str, r: &HttpRoute) -> Result<(), Invalid> {
    if let Some(c) = &r.cors_policy {
        for (i, o) in c.allow_origins.iter().enumerate() {
            o.validate(&format!("{at}.corsPolicy.allowOrigins[{i}]"))?;
        }
        if let Some(d) = &c.max_age {
            duration(&format!("{at}.corsPolicy.maxAge"), d)?;
        }
        if let Some(u) = &c.unmatched_preflights
            && !["UNSPECIFIED", "FORWARD", "IGNORE"].contains(&u.as_str())
        {
            return Err((format!("{at}.corsPolicy.unmatchedPreflights"), format!("unknown value {u:?}")));
        }
    }
    not_supported(format!("{at}.delegate"), r.delegate.is_some())?;
    for (i, m) in r.mirrors.iter().enumerate() {
        validate_destination(&format!("{at}.mirrors[{i}].destination"), &m.destination)?;
        percent(format!("{at}.mirrors[{i}].percentage.value"), &m.percentage)?;
    }
    if r.mirror.is_some() && !r.mirrors.is_empty() {
        return Err((format!("{at}.mirrors"), "mirror and mirrors are mutually exclusive".into()));
    }
    let actions = [!r.route.is_empty(), r.redirect.is_some(), r.direct_response.is_some()];
    match actions.iter().filter(|a| **a).count() {
        0 => return Err((at.into(), "one of route, redirect or directResponse is required".into())),
        1 => {}
        _ => return Err((at.into(), "route, redirect and directResponse are mutually exclusive".into())),
    }
    for (j, m) in r.matches.iter().enumerate() {
        let mf = format!("{at}.match[{j}]");
        gateway_references(&format!("{mf}.gateways"), &m.gateways)?;
        for (name, sm) in [("uri", &m.uri), ("scheme", &m.scheme), ("method", &m.method), ("authority", &m.authority)] {
            if let Some(sm) = sm {
                sm.validate(&format!("{mf}.{name}"))?;
            }
        }
        for (group, map) in
            [("headers", &m.headers), ("withoutHeaders", &m.without_headers), ("queryParams", &m.query_params)]
        {
            for (k, sm) in map {
                if group != "queryParams" && k.chars().any(|c| c.is_ascii_uppercase()) {
                    return Err((format!("{mf}.{group}.{k}"), "header names must be lowercase".into()));
                }
                // An empty match (`{}`) on withoutHeaders/headers means presence only.
                if *sm != StringMatch::default() {
                    sm.validate(&format!("{mf}.{group}.{k}"))?;
                }
            }
        }
        if let Some(p) = m.port
            && !(1..=65535).contains(&p)
        {
            return Err((format!("{mf}.port"), format!("{p} is not a port number")));
        }
    }
    validate_weighted(at, &r.route)?;
    if let Some(t) = &r.timeout {
        duration(&format!("{at}.timeout"), t)?;
    }
    if let Some(retry) = &r.retries {
        if retry.attempts.is_some_and(|a| a < 0) {
            return Err((format!("{at}.retries.attempts"), "must not be negative".into()));
        }
        if let Some(t) = &retry.per_try_timeout {
            duration(&format!("{at}.retries.perTryTimeout"), t)?;
        }
        if let Some(on) = &retry.retry_on {
            for cond in on.split(',').map(str::trim).filter(|c| !c.is_empty()) {
                let status = cond.parse::<u16>().is_ok_and(|c| (100..=599).contains(&c));
                if !status && !RETRY_ON.contains(&cond) {
                    return Err((format!("{at}.retries.retryOn"), format!("unknown retry condition {cond:?}")));
                }
            }
        }
    }
    if let Some(f) = &r.fault {
        if let Some(d) = &f.delay {
            let t = d.fixed_delay.as_deref().ok_or((format!("{at}.fault.delay.fixedDelay"), "is required".into()))?;
            duration(&format!("{at}.fault.delay.fixedDelay"), t)?;
            percent(format!("{at}.fault.delay.percentage.value"), &d.percentage)?;
            if d.percent.is_some_and(|p| p > 100) {
                return Err((format!("{at}.fault.delay.percent"), "must be at most 100".into()));
            }
        }
        if let Some(a) = &f.abort {
            match (a.http_status, &a.grpc_status) {
                (Some(s), None) if (200..=599).contains(&s) => {}
                (Some(s), None) => {
                    return Err((format!("{at}.fault.abort.httpStatus"), format!("{s} is not an HTTP status")));
                }
                (None, Some(g)) if grpc_code(g).is_some() => {}
                (None, Some(g)) => {
                    return Err((format!("{at}.fault.abort.grpcStatus"), format!("{g:?} is not a gRPC status")));
                }
                (Some(_), Some(_)) => {
                    return Err((
                        format!("{at}.fault.abort"),
                        "httpStatus and grpcStatus are mutually exclusive".into(),
                    ));
                }
                (None, None) => return Err((format!("{at}.fault.abort.httpStatus"), "is required".into())),
            }
            percent(format!("{at}.fault.abort.percentage.value"), &a.percentage)?;
        }
    }
    if let Some(m) = &r.mirror {
        validate_destination(&format!("{at}.mirror"), m)?;
    }
    percent(format!("{at}.mirrorPercentage.value"), &r.mirror_percentage)?;
    if let Some(rd) = &r.redirect {
        match rd.derive_port.as_deref() {
            None | Some("FROM_PROTOCOL_DEFAULT") | Some("FROM_REQUEST_PORT") => {}
            Some(other) => return Err((format!("{at}.redirect.derivePort"), format!("unknown value {other:?}"))),
        }
        if rd.port.is_some() && rd.derive_port.is_some() {
            return Err((format!("{at}.redirect"), "port and derivePort are mutually exclusive".into()));
        }
        if let Some(c) = rd.redirect_code
            && ![301, 302, 303, 307, 308].contains(&c)
        {
            return Err((format!("{at}.redirect.redirectCode"), format!("{c} is not a redirect status")));
        }
    }
    if let Some(d) = &r.direct_response
        && !(200..=599).contains(&d.status)
    {
        return Err((format!("{at}.directResponse.status"), format!("{} is not an HTTP status", d.status)));
    }
    if let Some(rw) = &r.rewrite
        && let Some(rr) = &rw.uri_regex_rewrite
    {
        regex::Regex::new(&rr.pattern).map_err(|e| {
            (format!("{at}.rewrite.uriRegexRewrite.match"), format!("invalid regex {:?}: {e}", rr.pattern))
        })?;
        if rw.uri.is_some() {
            return Err((format!("{at}.rewrite"), "uri and uriRegexRewrite are mutually exclusive".into()));
        }
    }
    Ok(())
}

/// Destinations of a rule, and weights that add up to 100 when there are several.
fn validate_weighted(at: &str, route: &[HttpRouteDestination]) -> Result<(), Invalid> {
    for (k, d) in route.iter().enumerate() {
        let df = format!("{at}.route[{k}]");
        if d.weight.is_some_and(|w| w < 0) {
            return Err((format!("{df}.weight"), "weight must not be negative".into()));
        }
        validate_destination(&format!("{df}.destination"), &d.destination)?;
    }
    let total: i64 = route.iter().map(|d| d.weight.unwrap_or(0)).sum();
    if route.len() > 1 && total != 100 && total != 0 {
        return Err((format!("{at}.route"), format!("weights add up to {total}, they must add up to 100")));
    }
    Ok(())
}

fn validate_destination(at: &str, d: &Destination) -> Result<(), Invalid> {
    if d.host.is_empty() {
        return Err((format!("{at}.host"), "is required".into()));
    }
    if let Some(p) = &d.port
        && !(1..=65535).contains(&p.number)
    {
        return Err((format!("{at}.port.number"), format!("{} is not a port number", p.number)));
    }
    Ok(())
}

impl DestinationRule {
    /// Istio's checks on a DestinationRule, and refusals of fields not enforced.
    pub(super) fn validate(&self) -> Result<(), Invalid> {
        let s = &self.spec;
        if s.host.is_empty() {
            return Err(("spec.host".into(), "is required".into()));
        }
        not_supported("spec.workloadSelector".into(), s.workload_selector.is_some())?;
        if let Some(p) = &s.traffic_policy {
            validate_policy("spec.trafficPolicy", p)?;
        }
        let mut names = std::collections::HashSet::new();
        for (i, sub) in s.subsets.iter().enumerate() {
            let at = format!("spec.subsets[{i}]");
            if sub.name.is_empty() {
                return Err((format!("{at}.name"), "is required".into()));
            }
            if !names.insert(sub.name.as_str()) {
                return Err((format!("{at}.name"), format!("subset {:?} is defined twice", sub.name)));
            }
            if let Some(p) = &sub.traffic_policy {
                validate_policy(&format!("{at}.trafficPolicy"), p)?;
            }
        }
        Ok(())
    }
}

fn non_negative(field: String, v: Option<i64>) -> Result<(), Invalid> {
    match v {
        Some(n) if n < 0 => Err((field, format!("{n} must not be negative"))),
        _ => Ok(()),
    }
}

/// `trafficPolicy.tls`: the mesh's own mTLS (ISTIO_MUTUAL), or TLS the agent
/// originates (SIMPLE, MUTUAL) from files it can read. Plaintext to a mesh endpoint
/// would bypass identity, and what the agent cannot check it refuses.
fn validate_client_tls(at: &str, t: &ClientTls) -> Result<(), Invalid> {
    let mutual = match t.mode.as_deref() {
        Some("ISTIO_MUTUAL") => return Ok(()),
        Some("SIMPLE") => false,
        Some("MUTUAL") => true,
        other => {
            return Err((
                format!("{at}.mode"),
                format!("{other:?} is not supported by this agent version (ISTIO_MUTUAL, SIMPLE or MUTUAL)"),
            ));
        }
    };
    if t.credential_name.is_some() {
        // As Istio's validation: the Secret holds every certificate, or none.
        for (field, path) in [
            ("caCertificates", &t.ca_certificates),
            ("clientCertificate", &t.client_certificate),
            ("privateKey", &t.private_key),
        ] {
            if path.is_some() {
                return Err((format!("{at}.{field}"), "cannot be set together with credentialName".into()));
            }
        }
    }
    if t.insecure_skip_verify == Some(true) {
        return Err((format!("{at}.insecureSkipVerify"), "the agent always verifies the server's certificate".into()));
    }
    if !t.subject_alt_names.is_empty() {
        return Err((
            format!("{at}.subjectAltNames"),
            "not supported by this agent version yet: the certificate is checked for `sni` (or the host)".into(),
        ));
    }
    for (field, path) in [
        ("caCertificates", &t.ca_certificates),
        ("clientCertificate", &t.client_certificate),
        ("privateKey", &t.private_key),
    ] {
        if let Some(p) = path
            && !p.starts_with('/')
        {
            return Err((format!("{at}.{field}"), format!("{p:?} must be an absolute path")));
        }
    }
    if mutual && t.credential_name.is_none() {
        for (field, path) in [("clientCertificate", &t.client_certificate), ("privateKey", &t.private_key)] {
            if path.is_none() {
                return Err((format!("{at}.{field}"), "required with mode MUTUAL".into()));
            }
        }
    }
    Ok(())
}

fn validate_policy(at: &str, p: &TrafficPolicy) -> Result<(), Invalid> {
    if let Some(t) = &p.tls {
        validate_client_tls(&format!("{at}.tls"), t)?;
    }
    let mut ports = std::collections::HashSet::new();
    for (i, pl) in p.port_level_settings.iter().enumerate() {
        let pf = format!("{at}.portLevelSettings[{i}]");
        if !(1..=65535).contains(&pl.port.number) {
            return Err((format!("{pf}.port.number"), format!("{} is not a port number", pl.port.number)));
        }
        if !ports.insert(pl.port.number) {
            return Err((format!("{pf}.port.number"), format!("port {} is listed twice", pl.port.number)));
        }
        validate_policy(&pf, &pl.as_policy())?;
    }
    if let Some(lb) = &p.load_balancer {
        if let Some(l) = &lb.locality_lb_setting {
            let lf = format!("{at}.loadBalancer.localityLbSetting");
            if !l.distribute.is_empty() && (!l.failover.is_empty() || !l.failover_priority.is_empty()) {
                return Err((
                    format!("{lf}.distribute"),
                    "only one of distribute, failover and failoverPriority may be set".into(),
                ));
            }
            let mut froms = std::collections::HashSet::new();
            for (i, d) in l.distribute.iter().enumerate() {
                let df = format!("{lf}.distribute[{i}]");
                validate_locality_pattern(&format!("{df}.from"), &d.from)?;
                if !froms.insert(d.from.as_str()) {
                    return Err((format!("{df}.from"), format!("{:?} is named by another entry", d.from)));
                }
                if d.to.is_empty() {
                    return Err((format!("{df}.to"), "names no locality".into()));
                }
                for (locality, weight) in &d.to {
                    validate_locality_pattern(&format!("{df}.to[{locality}]"), locality)?;
                    if !(1..=100).contains(weight) {
                        return Err((format!("{df}.to[{locality}]"), format!("weight {weight} is not in 1..=100")));
                    }
                }
                let total: u32 = d.to.values().sum();
                if total != 100 {
                    return Err((format!("{df}.to"), format!("the weights sum to {total}, not 100")));
                }
            }
            for (i, f) in l.failover.iter().enumerate() {
                for (name, region) in [("from", &f.from), ("to", &f.to)] {
                    if region.is_empty() || region.contains('/') {
                        return Err((
                            format!("{lf}.failover[{i}].{name}"),
                            format!("{region:?} is not a region (a non-empty name without '/')"),
                        ));
                    }
                }
                if f.from == f.to {
                    return Err((format!("{lf}.failover[{i}]"), format!("fails {:?} over to itself", f.from)));
                }
            }
            if l.failover_priority.len() > 8 {
                return Err((format!("{lf}.failoverPriority"), "more than 8 labels".into()));
            }
            for (i, label) in l.failover_priority.iter().enumerate() {
                // `label=value` pins a value (Istio's form); the name is what is matched.
                let name = label.split_once('=').map_or(label.as_str(), |(n, _)| n);
                if name.is_empty() || name.len() > 317 || name.chars().any(char::is_whitespace) {
                    return Err((format!("{lf}.failoverPriority[{i}]"), format!("{label:?} is not a label name")));
                }
            }
        }
        not_supported(format!("{at}.loadBalancer.warmupDurationSecs"), lb.warmup_duration_secs.is_some())?;
        match (&lb.simple, &lb.consistent_hash) {
            (Some(_), Some(_)) => {
                return Err((format!("{at}.loadBalancer"), "simple and consistentHash are mutually exclusive".into()));
            }
            (Some(s), None) if !LB_SIMPLE.contains(&s.as_str()) => {
                return Err((format!("{at}.loadBalancer.simple"), format!("unknown load balancer {s:?}")));
            }
            (None, Some(h)) => {
                let keys = [
                    h.http_header_name.is_some(),
                    h.http_cookie.is_some(),
                    h.use_source_ip.unwrap_or(false),
                    h.http_query_parameter_name.is_some(),
                ];
                if keys.iter().filter(|k| **k).count() != 1 {
                    return Err((
                        format!("{at}.loadBalancer.consistentHash"),
                        "exactly one of httpHeaderName, httpCookie, useSourceIp, httpQueryParameterName".into(),
                    ));
                }
            }
            _ => {}
        }
    }
    if let Some(cp) = &p.connection_pool {
        if let Some(t) = &cp.tcp {
            not_supported(format!("{at}.connectionPool.tcp.tcpKeepalive"), t.tcp_keepalive.is_some())?;
            not_supported(
                format!("{at}.connectionPool.tcp.maxConnectionDuration"),
                t.max_connection_duration.is_some(),
            )?;
            non_negative(format!("{at}.connectionPool.tcp.maxConnections"), t.max_connections)?;
            if let Some(d) = &t.connect_timeout {
                duration(&format!("{at}.connectionPool.tcp.connectTimeout"), d)?;
            }
        }
        if let Some(h) = &cp.http {
            let hf = format!("{at}.connectionPool.http");
            non_negative(format!("{hf}.http1MaxPendingRequests"), h.http1_max_pending_requests)?;
            non_negative(format!("{hf}.http2MaxRequests"), h.http2_max_requests)?;
            non_negative(format!("{hf}.maxRequestsPerConnection"), h.max_requests_per_connection)?;
            non_negative(format!("{hf}.maxRetries"), h.max_retries)?;
            if let Some(d) = &h.idle_timeout {
                duration(&format!("{hf}.idleTimeout"), d)?;
            }
            if let Some(u) = &h.h2_upgrade_policy
                && !["DEFAULT", "DO_NOT_UPGRADE", "UPGRADE"].contains(&u.as_str())
            {
                return Err((format!("{hf}.h2UpgradePolicy"), format!("unknown policy {u:?}")));
            }
        }
    }
    if let Some(o) = &p.outlier_detection {
        let of = format!("{at}.outlierDetection");
        not_supported(format!("{of}.consecutiveLocalOriginFailures"), o.consecutive_local_origin_failures.is_some())?;
        non_negative(format!("{of}.consecutive5xxErrors"), o.consecutive_5xx_errors)?;
        non_negative(format!("{of}.consecutiveGatewayErrors"), o.consecutive_gateway_errors)?;
        non_negative(format!("{of}.consecutiveErrors"), o.consecutive_errors)?;
        for (name, v) in [("interval", &o.interval), ("baseEjectionTime", &o.base_ejection_time)] {
            if let Some(d) = v {
                duration(&format!("{of}.{name}"), d)?;
            }
        }
        for (name, v) in [("maxEjectionPercent", o.max_ejection_percent), ("minHealthPercent", o.min_health_percent)] {
            if let Some(n) = v
                && !(0..=100).contains(&n)
            {
                return Err((format!("{of}.{name}"), format!("{n} is not a percentage between 0 and 100")));
            }
        }
    }
    Ok(())
}

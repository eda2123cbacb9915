//! Istio security: `security.istio.io` PeerAuthentication and AuthorizationPolicy (v1 and
//! v1beta1 share one schema), typed as the API reference spells them, with the checks
//! Istio's validation webhook makes.
//!
//! What the agent cannot enforce (CUSTOM providers, JWT attributes, `targetRefs`, path
//! templates) is refused by name: an authorization rule that is accepted and ignored
//! would allow what its author meant to deny.

use super::resource::Resource;
use super::schema::AnyValue;
use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::{Deserialize, Deserializer};
use serde_yaml::Value;

use super::istio::Invalid;
use super::resources::ObjectMeta;

/// API versions accepted for Istio security kinds.
pub const SECURITY_VERSIONS: &[&str] = &["security.istio.io/v1", "security.istio.io/v1beta1"];

/// `spec.selector` of a security policy: the workloads it applies to.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadSelector {
    /// Labels a pod must all carry.
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

impl WorkloadSelector {
    /// Whether a pod with `labels` is selected.
    pub fn selects(&self, labels: &BTreeMap<String, String>) -> bool {
        self.match_labels.iter().all(|(k, v)| labels.get(k) == Some(v))
    }
}

/// `PeerAuthentication`.
pub type PeerAuthentication = Resource<PeerAuthenticationSpec>;

impl PeerAuthentication {
    /// A STRICT policy over `namespace` and `selector`: what stands in for a
    /// PeerAuthentication that was rejected before it ever applied. Its author may have
    /// meant STRICT, and a typo must not leave the workloads PERMISSIVE; plaintext is
    /// refused until the policy is fixed.
    pub fn strict_standin(namespace: &str, name: &str, selector: Option<WorkloadSelector>) -> Self {
        Resource::new(
            standin_meta(namespace, name),
            PeerAuthenticationSpec {
                selector,
                mtls: Some(MutualTls { mode: MtlsMode::Strict }),
                port_level_mtls: BTreeMap::new(),
            },
        )
    }

    /// True for the stand-in of a rejected policy ([`PeerAuthentication::strict_standin`]).
    pub fn is_fail_closed_placeholder(&self) -> bool {
        self.metadata.annotations.contains_key(FAIL_CLOSED_ANNOTATION)
    }
}

/// `PeerAuthentication.spec`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PeerAuthenticationSpec {
    /// Workloads in the policy's namespace it applies to; all of them when unset.
    #[serde(default)]
    pub selector: Option<WorkloadSelector>,
    /// The workload's mode.
    #[serde(default)]
    pub mtls: Option<MutualTls>,
    /// Modes for single workload ports (the pod's port, not the Service's).
    #[serde(default)]
    pub port_level_mtls: BTreeMap<PortNumber, MutualTls>,
}

/// `MutualTLS`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MutualTls {
    /// The mode; UNSET when absent.
    #[serde(default)]
    pub mode: MtlsMode,
}

/// `MutualTLS.Mode`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "UPPERCASE")]
pub enum MtlsMode {
    /// Inherit from the namespace, then the mesh; PERMISSIVE at the top.
    #[default]
    Unset,
    /// Not tunnelled: clients send plaintext, plaintext is accepted.
    Disable,
    /// mTLS and plaintext both accepted.
    Permissive,
    /// Only mTLS: plaintext is refused (in the kernel where possible).
    Strict,
}

/// A port number written as a YAML integer or a string of digits (map keys of
/// `portLevelMtls` come both ways).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortNumber(pub u16);

impl schemars::JsonSchema for PortNumber {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "PortNumber".into()
    }
    fn json_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
        crate::config::schema::int_or_string(generator)
    }
}

impl<'de> Deserialize<'de> for PortNumber {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = Value::deserialize(d)?;
        let n = match &v {
            Value::Number(n) => n.as_u64(),
            Value::String(s) => s.parse::<u64>().ok(),
            _ => None,
        };
        match n {
            Some(n @ 1..=65535) => Ok(PortNumber(n as u16)),
            _ => Err(serde::de::Error::custom(format!("{v:?} is not a port number between 1 and 65535"))),
        }
    }
}

/// `AuthorizationPolicy`.
pub type AuthorizationPolicy = Resource<AuthorizationPolicySpec>;

impl AuthorizationPolicy {
    /// An ALLOW policy without rules (allow nothing) over `namespace` and `selector`:
    /// what stands in for a policy that was rejected before it ever applied, so a
    /// broken policy fails closed instead of leaving its workloads open.
    pub fn allow_nothing(namespace: &str, name: &str, selector: Option<WorkloadSelector>) -> Self {
        Resource::new(standin_meta(namespace, name), AuthorizationPolicySpec { selector, ..Default::default() })
    }

    /// True for the stand-in of a rejected policy ([`AuthorizationPolicy::allow_nothing`]).
    pub fn is_fail_closed_placeholder(&self) -> bool {
        self.metadata.annotations.contains_key(FAIL_CLOSED_ANNOTATION)
    }

    /// Whether the `istio.io/dry-run` annotation asks for evaluation without effect.
    pub fn dry_run(&self) -> bool {
        self.metadata.annotations.get("istio.io/dry-run").is_some_and(|v| v == "true")
    }
}

/// The metadata of a stand-in for the rejected policy `namespace/name`, marked as one.
fn standin_meta(namespace: &str, name: &str) -> ObjectMeta {
    ObjectMeta {
        name: name.to_string(),
        namespace: Some(namespace.to_string()),
        annotations: BTreeMap::from([(FAIL_CLOSED_ANNOTATION.to_string(), "true".to_string())]),
        ..Default::default()
    }
}

/// Marks the allow-nothing stand-in of a rejected policy. Not a user-facing annotation.
const FAIL_CLOSED_ANNOTATION: &str = "mesh.internal/fail-closed";

/// `AuthorizationPolicy.spec`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthorizationPolicySpec {
    /// Workloads it applies to; every workload in scope when unset.
    #[serde(default)]
    pub selector: Option<WorkloadSelector>,
    /// Gateway/waypoint attachment (refused: no waypoints here).
    #[serde(default)]
    pub target_ref: Option<AnyValue>,
    /// Gateway/waypoint attachment (refused: no waypoints here).
    #[serde(default)]
    pub target_refs: Option<AnyValue>,
    /// Rules; a match occurs when one rule matches. None: never matches.
    #[serde(default)]
    pub rules: Vec<Rule>,
    /// ALLOW when unset.
    #[serde(default)]
    pub action: Action,
    /// Extension provider of a CUSTOM policy.
    #[serde(default)]
    pub provider: Option<AnyValue>,
}

/// `AuthorizationPolicy.Action`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "UPPERCASE")]
pub enum Action {
    /// Allow a request only if it matches.
    #[default]
    Allow,
    /// Deny a request if it matches.
    Deny,
    /// Log a request if it matches; no effect on the decision.
    Audit,
    /// Delegate to an external authorizer (refused).
    Custom,
}

/// `Rule`: at least one source, one operation and every condition must match; an
/// empty rule matches everything.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Rule {
    /// Sources; any source when empty.
    #[serde(default)]
    pub from: Vec<RuleFrom>,
    /// Operations; any operation when empty.
    #[serde(default)]
    pub to: Vec<RuleTo>,
    /// Extra conditions, all of which must hold.
    #[serde(default)]
    pub when: Vec<Condition>,
}

/// `Rule.From`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RuleFrom {
    /// The source.
    #[serde(default)]
    pub source: Option<Source>,
}

/// `Rule.To`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RuleTo {
    /// The operation.
    #[serde(default)]
    pub operation: Option<Operation>,
}

/// `Source`: fields are ANDed, values within a field ORed.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Source {
    /// Peer identities `<trust-domain>/ns/<ns>/sa/<sa>` (mTLS only).
    #[serde(default)]
    pub principals: Vec<String>,
    /// Negative principals.
    #[serde(default)]
    pub not_principals: Vec<String>,
    /// JWT identities (refused: no RequestAuthentication).
    #[serde(default)]
    pub request_principals: Vec<String>,
    /// Negative JWT identities (refused).
    #[serde(default)]
    pub not_request_principals: Vec<String>,
    /// Namespaces of the peer identity (mTLS only).
    #[serde(default)]
    pub namespaces: Vec<String>,
    /// Negative namespaces.
    #[serde(default)]
    pub not_namespaces: Vec<String>,
    /// Service accounts `<ns>/<sa>` or `<sa>` (the policy's namespace) of the peer.
    #[serde(default)]
    pub service_accounts: Vec<String>,
    /// Negative service accounts.
    #[serde(default)]
    pub not_service_accounts: Vec<String>,
    /// Source IPs or CIDRs of the connection.
    #[serde(default)]
    pub ip_blocks: Vec<String>,
    /// Negative source IPs.
    #[serde(default)]
    pub not_ip_blocks: Vec<String>,
    /// Original client IPs (the connection's source: no trusted proxies in front).
    #[serde(default)]
    pub remote_ip_blocks: Vec<String>,
    /// Negative original client IPs.
    #[serde(default)]
    pub not_remote_ip_blocks: Vec<String>,
    /// Trust domains of the peer identity.
    #[serde(default)]
    pub trust_domains: Vec<String>,
    /// Negative trust domains.
    #[serde(default)]
    pub not_trust_domains: Vec<String>,
}

/// `Operation`: fields are ANDed, values within a field ORed.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Operation {
    /// HTTP Host (case-insensitive).
    #[serde(default)]
    pub hosts: Vec<String>,
    /// Negative hosts.
    #[serde(default)]
    pub not_hosts: Vec<String>,
    /// Destination ports of the connection.
    #[serde(default)]
    pub ports: Vec<String>,
    /// Negative ports.
    #[serde(default)]
    pub not_ports: Vec<String>,
    /// HTTP methods.
    #[serde(default)]
    pub methods: Vec<String>,
    /// Negative methods.
    #[serde(default)]
    pub not_methods: Vec<String>,
    /// HTTP paths (normalized, without the query).
    #[serde(default)]
    pub paths: Vec<String>,
    /// Negative paths.
    #[serde(default)]
    pub not_paths: Vec<String>,
}

/// `Condition`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Condition {
    /// An Istio attribute name.
    pub key: String,
    /// Values that match.
    #[serde(default)]
    pub values: Vec<String>,
    /// Values that must not match.
    #[serde(default)]
    pub not_values: Vec<String>,
}

/// A `when` key, as Istio's attribute list names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConditionKey {
    /// `request.headers[<name>]` (HTTP only), name lowercased.
    RequestHeader(String),
    /// `source.ip`.
    SourceIp,
    /// `remote.ip`.
    RemoteIp,
    /// `source.namespace` (mTLS only).
    SourceNamespace,
    /// `source.principal` (mTLS only).
    SourcePrincipal,
    /// `source.serviceAccount` (mTLS only), `<ns>/<sa>`.
    SourceServiceAccount,
    /// `destination.ip`.
    DestinationIp,
    /// `destination.port`.
    DestinationPort,
}

impl ConditionKey {
    /// Parses a `when.key`; the error says why a key Istio knows is not usable here.
    pub fn parse(key: &str) -> Result<Self, String> {
        if let Some(rest) = key.strip_prefix("request.headers[") {
            let name = rest.strip_suffix(']').unwrap_or_default();
            if name.is_empty() || http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                return Err(format!("{key:?}: expected request.headers[<header name>]"));
            }
            return Ok(Self::RequestHeader(name.to_ascii_lowercase()));
        }
        Ok(match key {
            "source.ip" => Self::SourceIp,
            "remote.ip" => Self::RemoteIp,
            "source.namespace" => Self::SourceNamespace,
            "source.principal" => Self::SourcePrincipal,
            "source.serviceAccount" => Self::SourceServiceAccount,
            "destination.ip" => Self::DestinationIp,
            "destination.port" => Self::DestinationPort,
            k if k.starts_with("request.auth.") => {
                return Err(format!(
                    "{k:?} needs RequestAuthentication (JWT), which this agent version does not support yet"
                ));
            }
            "connection.sni" => {
                return Err("\"connection.sni\" is not available: the mesh tunnel carries no SNI".into());
            }
            k if k.starts_with("experimental.") => {
                return Err(format!("{k:?} (an Envoy filter attribute) is not supported"));
            }
            k => return Err(format!("unknown attribute {k:?}")),
        })
    }

    /// Keys only an HTTP request has.
    pub fn is_http_only(&self) -> bool {
        matches!(self, Self::RequestHeader(_))
    }
}

/// A single IP (`10.0.0.1`) or CIDR (`10.0.0.0/8`), as `ipBlocks` and IP conditions take.
pub fn parse_ip_block(s: &str) -> Result<ipnet::IpNet, String> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok(ipnet::IpNet::from(ip));
    }
    s.parse::<ipnet::IpNet>().map(|n| n.trunc()).map_err(|_| format!("{s:?} is neither an IP address nor a CIDR block"))
}

/// A port string of `ports`/`notPorts` or a `destination.port` value.
pub fn parse_port(s: &str) -> Result<u16, String> {
    match s.parse::<u32>() {
        Ok(n @ 1..=65535) => Ok(n as u16),
        _ => Err(format!("{s:?} is not a port number between 1 and 65535")),
    }
}

/// Istio string matching allows `*` only as the whole value, a prefix or a suffix.
fn wildcard(field: String, v: &str) -> Result<(), Invalid> {
    let inner = v.strip_prefix('*').unwrap_or(v);
    let inner = inner.strip_suffix('*').unwrap_or(inner);
    if inner.contains('*') {
        return Err((field, format!("{v:?}: '*' is only allowed at the start or the end of a value")));
    }
    if v.is_empty() {
        return Err((field, "empty value".into()));
    }
    Ok(())
}

fn each(
    at: &str,
    name: &str,
    values: &[String],
    check: impl Fn(String, &str) -> Result<(), Invalid>,
) -> Result<(), Invalid> {
    values.iter().enumerate().try_for_each(|(i, v)| check(format!("{at}.{name}[{i}]"), v))
}

fn ip_block(field: String, v: &str) -> Result<(), Invalid> {
    parse_ip_block(v).map(|_| ()).map_err(|e| (field, e))
}

fn port(field: String, v: &str) -> Result<(), Invalid> {
    parse_port(v).map(|_| ()).map_err(|e| (field, e))
}

fn service_account(field: String, v: &str) -> Result<(), Invalid> {
    let parts: Vec<&str> = v.split('/').collect();
    if v.contains('*') || parts.len() > 2 || parts.iter().any(|p| p.is_empty()) {
        return Err((field, format!("{v:?}: expected <namespace>/<serviceaccount> or <serviceaccount>, no wildcards")));
    }
    Ok(())
}

fn path(field: String, v: &str) -> Result<(), Invalid> {
    if v.contains('{') || v.contains('}') {
        return Err((
            field,
            format!("{v:?}: path templates ({{*}}, {{**}}) are not supported by this agent version yet"),
        ));
    }
    wildcard(field, v)
}

fn jwt(field: String, present: bool) -> Result<(), Invalid> {
    if present {
        Err((field, "needs RequestAuthentication (JWT), which this agent version does not support yet".into()))
    } else {
        Ok(())
    }
}

impl PeerAuthentication {
    /// Istio's checks: `portLevelMtls` only with a non-empty selector.
    pub(super) fn validate(&self) -> Result<(), Invalid> {
        let s = &self.spec;
        let has_selector = s.selector.as_ref().is_some_and(|sel| !sel.match_labels.is_empty());
        if !s.port_level_mtls.is_empty() && !has_selector {
            return Err((
                "spec.portLevelMtls".into(),
                "requires a workload selector (spec.selector.matchLabels)".into(),
            ));
        }
        Ok(())
    }
}

impl AuthorizationPolicy {
    /// Istio's validation webhook checks, and refusals of what the agent cannot enforce.
    pub(super) fn validate(&self) -> Result<(), Invalid> {
        let s = &self.spec;
        if s.target_ref.is_some() || s.target_refs.is_some() {
            let field = if s.target_ref.is_some() { "spec.targetRef" } else { "spec.targetRefs" };
            if s.selector.is_some() {
                return Err((field.into(), "only one of targetRefs or selector can be set".into()));
            }
            return Err((
                field.into(),
                "attaches the policy to a gateway or waypoint, which this mesh does not run; use spec.selector".into(),
            ));
        }
        match s.action {
            Action::Custom => {
                return Err((
                    "spec.action".into(),
                    "CUSTOM (external authorization through an extension provider) is not supported: no extension providers are configured".into(),
                ));
            }
            _ if s.provider.is_some() => {
                return Err(("spec.provider".into(), "only allowed with action CUSTOM".into()));
            }
            _ => {}
        }
        for (i, rule) in s.rules.iter().enumerate() {
            let at = format!("spec.rules[{i}]");
            for (j, from) in rule.from.iter().enumerate() {
                let at = format!("{at}.from[{j}].source");
                let Some(src) = &from.source else {
                    return Err((at, "must not be empty".into()));
                };
                validate_source(&at, src)?;
            }
            for (j, to) in rule.to.iter().enumerate() {
                let at = format!("{at}.to[{j}].operation");
                let Some(op) = &to.operation else {
                    return Err((at, "must not be empty".into()));
                };
                validate_operation(&at, op)?;
            }
            for (j, c) in rule.when.iter().enumerate() {
                validate_condition(&format!("{at}.when[{j}]"), c)?;
            }
        }
        Ok(())
    }
}

fn validate_source(at: &str, s: &Source) -> Result<(), Invalid> {
    if *s == Source::default() {
        return Err((at.into(), "must not be empty".into()));
    }
    jwt(format!("{at}.requestPrincipals"), !s.request_principals.is_empty())?;
    jwt(format!("{at}.notRequestPrincipals"), !s.not_request_principals.is_empty())?;
    let has_sa = !s.service_accounts.is_empty() || !s.not_service_accounts.is_empty();
    let has_identity_strings = !s.principals.is_empty()
        || !s.not_principals.is_empty()
        || !s.namespaces.is_empty()
        || !s.not_namespaces.is_empty();
    if has_sa && has_identity_strings {
        return Err((format!("{at}.serviceAccounts"), "cannot be set with namespaces or principals".into()));
    }
    for (name, values) in [
        ("principals", &s.principals),
        ("notPrincipals", &s.not_principals),
        ("namespaces", &s.namespaces),
        ("notNamespaces", &s.not_namespaces),
        ("trustDomains", &s.trust_domains),
        ("notTrustDomains", &s.not_trust_domains),
    ] {
        each(at, name, values, wildcard)?;
    }
    each(at, "serviceAccounts", &s.service_accounts, service_account)?;
    each(at, "notServiceAccounts", &s.not_service_accounts, service_account)?;
    for (name, values) in [
        ("ipBlocks", &s.ip_blocks),
        ("notIpBlocks", &s.not_ip_blocks),
        ("remoteIpBlocks", &s.remote_ip_blocks),
        ("notRemoteIpBlocks", &s.not_remote_ip_blocks),
    ] {
        each(at, name, values, ip_block)?;
    }
    Ok(())
}

fn validate_operation(at: &str, o: &Operation) -> Result<(), Invalid> {
    if *o == Operation::default() {
        return Err((at.into(), "must not be empty".into()));
    }
    for (name, values) in
        [("hosts", &o.hosts), ("notHosts", &o.not_hosts), ("methods", &o.methods), ("notMethods", &o.not_methods)]
    {
        each(at, name, values, wildcard)?;
    }
    each(at, "ports", &o.ports, port)?;
    each(at, "notPorts", &o.not_ports, port)?;
    each(at, "paths", &o.paths, path)?;
    each(at, "notPaths", &o.not_paths, path)?;
    Ok(())
}

fn validate_condition(at: &str, c: &Condition) -> Result<(), Invalid> {
    if c.key.is_empty() {
        return Err((format!("{at}.key"), "required field is missing".into()));
    }
    let key = ConditionKey::parse(&c.key).map_err(|e| (format!("{at}.key"), e))?;
    if c.values.is_empty() && c.not_values.is_empty() {
        return Err((at.into(), "at least one of values or notValues must be set".into()));
    }
    let check: fn(String, &str) -> Result<(), Invalid> = match key {
        ConditionKey::SourceIp | ConditionKey::RemoteIp | ConditionKey::DestinationIp => ip_block,
        ConditionKey::DestinationPort => port,
        ConditionKey::SourceServiceAccount => service_account,
        _ => wildcard,
    };
    each(at, "values", &c.values, check)?;
    each(at, "notValues", &c.not_values, check)
}

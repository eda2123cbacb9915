//! AuthorizationPolicy rules compiled for matching: string matches parsed, IP blocks
//! and ports typed, HTTP-only parts flagged.
//!
//! A request matches a rule when one source, one operation and every condition match;
//! a policy matches when one rule does. Without an HTTP request (opaque TCP) the HTTP
//! attributes cannot be read: an ALLOW (or AUDIT) rule that needs one never matches,
//! and in a DENY rule they count as matched (Istio's documented behaviour). Either way
//! TCP is never allowed more than HTTP would be, so reading a request as TCP fails safe.

use std::net::IpAddr;

use http::HeaderMap;
use ipnet::IpNet;

use super::{ConnAttrs, Error, Peer, RequestAttrs};
use crate::config::security::{self, Action, ConditionKey};

/// Istio's string match: exact, `prefix*`, `*suffix` or `*` (present, not empty).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StrMatch {
    /// Equal.
    Exact(String),
    /// Starts with.
    Prefix(String),
    /// Ends with.
    Suffix(String),
    /// Any non-empty value.
    Presence,
}

impl StrMatch {
    /// Parses a policy value.
    pub fn parse(v: &str) -> Self {
        if v == "*" {
            Self::Presence
        } else if let Some(s) = v.strip_prefix('*') {
            Self::Suffix(s.to_string())
        } else if let Some(p) = v.strip_suffix('*') {
            Self::Prefix(p.to_string())
        } else {
            Self::Exact(v.to_string())
        }
    }

    /// Lower-cased copy, for case-insensitive fields (hosts).
    fn lowercase(self) -> Self {
        match self {
            Self::Exact(s) => Self::Exact(s.to_ascii_lowercase()),
            Self::Prefix(s) => Self::Prefix(s.to_ascii_lowercase()),
            Self::Suffix(s) => Self::Suffix(s.to_ascii_lowercase()),
            Self::Presence => Self::Presence,
        }
    }

    /// Whether `v` matches.
    pub fn matches(&self, v: &str) -> bool {
        match self {
            Self::Exact(e) => v == e,
            Self::Prefix(p) => v.starts_with(p.as_str()),
            Self::Suffix(s) => v.ends_with(s.as_str()),
            Self::Presence => !v.is_empty(),
        }
    }
}

/// A positive and a negative list of one attribute: the positive list (if any) must
/// have a match, the negative list none.
#[derive(Debug, Clone)]
struct Field<T> {
    any: Vec<T>,
    none: Vec<T>,
}

impl<T> Field<T> {
    fn new(any: Vec<T>, none: Vec<T>) -> Self {
        Self { any, none }
    }

    fn is_set(&self) -> bool {
        !self.any.is_empty() || !self.none.is_empty()
    }

    fn holds(&self, mut pred: impl FnMut(&T) -> bool) -> bool {
        (self.any.is_empty() || self.any.iter().any(&mut pred)) && !self.none.iter().any(pred)
    }
}

fn strs(v: &[String]) -> Vec<StrMatch> {
    v.iter().map(|s| StrMatch::parse(s)).collect()
}

fn blocks(v: &[String]) -> Result<Vec<IpNet>, String> {
    v.iter().map(|s| security::parse_ip_block(s)).collect()
}

fn ports(v: &[String]) -> Result<Vec<u16>, String> {
    v.iter().map(|s| security::parse_port(s)).collect()
}

/// A `from.source`.
#[derive(Debug, Clone)]
struct SourceMatch {
    principals: Field<StrMatch>,
    namespaces: Field<StrMatch>,
    service_accounts: Field<(String, String)>,
    trust_domains: Field<StrMatch>,
    ip_blocks: Field<IpNet>,
    remote_ip_blocks: Field<IpNet>,
}

fn service_accounts(v: &[String], policy_ns: &str) -> Vec<(String, String)> {
    v.iter()
        .map(|s| match s.split_once('/') {
            Some((ns, sa)) => (ns.to_string(), sa.to_string()),
            None => (policy_ns.to_string(), s.clone()),
        })
        .collect()
}

impl SourceMatch {
    fn compile(s: &security::Source, policy_ns: &str) -> Result<Self, String> {
        Ok(Self {
            principals: Field::new(strs(&s.principals), strs(&s.not_principals)),
            namespaces: Field::new(strs(&s.namespaces), strs(&s.not_namespaces)),
            service_accounts: Field::new(
                service_accounts(&s.service_accounts, policy_ns),
                service_accounts(&s.not_service_accounts, policy_ns),
            ),
            trust_domains: Field::new(strs(&s.trust_domains), strs(&s.not_trust_domains)),
            ip_blocks: Field::new(blocks(&s.ip_blocks)?, blocks(&s.not_ip_blocks)?),
            remote_ip_blocks: Field::new(blocks(&s.remote_ip_blocks)?, blocks(&s.not_remote_ip_blocks)?),
        })
    }

    fn matches(&self, c: &ConnAttrs<'_>) -> bool {
        let peer = c.peer;
        self.principals.holds(|m| peer.is_some_and(|p| p.principals.iter().any(|id| m.matches(id))))
            && self.namespaces.holds(|m| m.matches(peer.map_or("", |p| p.namespace.as_str())))
            && self.service_accounts.holds(|(ns, sa)| peer.is_some_and(|p| p.namespace == *ns && p.service_account == *sa))
            && self.trust_domains.holds(|m| m.matches(peer.map_or("", |p| p.trust_domain.as_str())))
            && self.ip_blocks.holds(|n| n.contains(&c.src.ip()))
            // No trusted proxy sits in front of a workload: the original client is the peer.
            && self.remote_ip_blocks.holds(|n| n.contains(&c.src.ip()))
    }

    /// Whether some connection without a peer identity could match.
    fn could_match_without_identity(&self) -> bool {
        self.principals.any.is_empty()
            && self.namespaces.any.is_empty()
            && self.service_accounts.any.is_empty()
            && self.trust_domains.any.is_empty()
    }
}

/// A `to.operation`.
#[derive(Debug, Clone)]
struct OperationMatch {
    hosts: Field<StrMatch>,
    ports: Field<u16>,
    methods: Field<StrMatch>,
    paths: Field<StrMatch>,
}

impl OperationMatch {
    fn compile(o: &security::Operation) -> Result<Self, String> {
        let lower = |v: &[String]| strs(v).into_iter().map(StrMatch::lowercase).collect();
        Ok(Self {
            hosts: Field::new(lower(&o.hosts), lower(&o.not_hosts)),
            ports: Field::new(ports(&o.ports)?, ports(&o.not_ports)?),
            methods: Field::new(strs(&o.methods), strs(&o.not_methods)),
            paths: Field::new(strs(&o.paths), strs(&o.not_paths)),
        })
    }

    fn has_http(&self) -> bool {
        self.hosts.is_set() || self.methods.is_set() || self.paths.is_set()
    }

    /// With `req` None, the HTTP fields count as matched (the caller decides whether a
    /// rule with HTTP fields may be evaluated without a request at all).
    fn matches(&self, c: &ConnAttrs<'_>, req: Option<&RequestAttrs<'_>>) -> bool {
        if !self.ports.holds(|p| *p == c.dst.port()) {
            return false;
        }
        let Some(r) = req else { return true };
        self.hosts.holds(|m| m.matches(r.host_lowercase))
            && self.methods.holds(|m| m.matches(r.method))
            && self.paths.holds(|m| m.matches(r.path))
    }
}

/// A `when` value.
#[derive(Debug, Clone)]
enum CondValue {
    Str(StrMatch),
    Ip(IpNet),
    Port(u16),
}

/// A `when` condition.
#[derive(Debug, Clone)]
struct ConditionMatch {
    key: ConditionKey,
    values: Field<CondValue>,
}

impl ConditionMatch {
    fn compile(c: &security::Condition, policy_ns: &str) -> Result<Self, String> {
        let key = ConditionKey::parse(&c.key)?;
        let value = |v: &String| -> Result<CondValue, String> {
            Ok(match key {
                ConditionKey::SourceIp | ConditionKey::RemoteIp | ConditionKey::DestinationIp => {
                    CondValue::Ip(security::parse_ip_block(v)?)
                }
                ConditionKey::DestinationPort => CondValue::Port(security::parse_port(v)?),
                ConditionKey::SourceServiceAccount if !v.contains('/') => {
                    CondValue::Str(StrMatch::Exact(format!("{policy_ns}/{v}")))
                }
                _ => CondValue::Str(StrMatch::parse(v)),
            })
        };
        let values = c.values.iter().map(value).collect::<Result<_, _>>()?;
        let not_values = c.not_values.iter().map(value).collect::<Result<_, _>>()?;
        Ok(Self { key, values: Field::new(values, not_values) })
    }

    fn matches(&self, c: &ConnAttrs<'_>, req: Option<&RequestAttrs<'_>>) -> bool {
        let ip = |ip: IpAddr| self.values.holds(|v| matches!(v, CondValue::Ip(n) if n.contains(&ip)));
        let text = |s: &str| self.values.holds(|v| matches!(v, CondValue::Str(m) if m.matches(s)));
        match &self.key {
            ConditionKey::SourceIp | ConditionKey::RemoteIp => ip(c.src.ip()),
            ConditionKey::DestinationIp => ip(c.dst.ip()),
            ConditionKey::DestinationPort => {
                self.values.holds(|v| matches!(v, CondValue::Port(p) if *p == c.dst.port()))
            }
            ConditionKey::SourceNamespace => text(c.peer.map_or("", |p| p.namespace.as_str())),
            ConditionKey::SourceServiceAccount => {
                let sa = c.peer.map(|p| format!("{}/{}", p.namespace, p.service_account)).unwrap_or_default();
                text(&sa)
            }
            ConditionKey::SourcePrincipal => match c.peer {
                Some(p) => {
                    self.values.holds(|v| matches!(v, CondValue::Str(m) if p.principals.iter().any(|id| m.matches(id))))
                }
                None => text(""),
            },
            ConditionKey::RequestHeader(name) => match req {
                // Without a request the condition counts as matched; see the module doc.
                None => true,
                Some(r) => text(&merged_header(r.headers, name)),
            },
        }
    }

    /// Whether a connection without a peer identity could satisfy the condition.
    fn could_match_without_identity(&self, port: u16) -> bool {
        match &self.key {
            ConditionKey::SourceNamespace | ConditionKey::SourcePrincipal | ConditionKey::SourceServiceAccount => {
                self.values.any.is_empty()
            }
            ConditionKey::DestinationPort => self.values.holds(|v| matches!(v, CondValue::Port(p) if *p == port)),
            _ => true,
        }
    }
}

/// Duplicate headers are judged as one value joined by commas, as Istio does.
fn merged_header(headers: &HeaderMap, name: &str) -> String {
    let mut out = String::new();
    for v in headers.get_all(name) {
        if !out.is_empty() {
            out.push(',');
        }
        out.push_str(&String::from_utf8_lossy(v.as_bytes()));
    }
    out
}

/// One compiled rule.
#[derive(Debug, Clone)]
struct RuleMatch {
    from: Vec<SourceMatch>,
    to: Vec<OperationMatch>,
    when: Vec<ConditionMatch>,
    /// Reads an HTTP-only attribute.
    has_http: bool,
}

impl RuleMatch {
    fn compile(r: &security::Rule, policy_ns: &str) -> Result<Self, String> {
        let from = r
            .from
            .iter()
            .filter_map(|f| f.source.as_ref())
            .map(|s| SourceMatch::compile(s, policy_ns))
            .collect::<Result<_, _>>()?;
        let to: Vec<OperationMatch> =
            r.to.iter().filter_map(|t| t.operation.as_ref()).map(OperationMatch::compile).collect::<Result<_, _>>()?;
        let when: Vec<ConditionMatch> =
            r.when.iter().map(|c| ConditionMatch::compile(c, policy_ns)).collect::<Result<_, _>>()?;
        let has_http = to.iter().any(OperationMatch::has_http) || when.iter().any(|c| c.key.is_http_only());
        Ok(Self { from, to, when, has_http })
    }

    fn matches(&self, c: &ConnAttrs<'_>, req: Option<&RequestAttrs<'_>>) -> bool {
        (self.from.is_empty() || self.from.iter().any(|s| s.matches(c)))
            && (self.to.is_empty() || self.to.iter().any(|o| o.matches(c, req)))
            && self.when.iter().all(|w| w.matches(c, req))
    }

    /// Whether some plaintext connection (no peer identity) to `port` could match, for
    /// some source address and some request.
    fn could_match_without_identity(&self, port: u16) -> bool {
        (self.from.is_empty() || self.from.iter().any(SourceMatch::could_match_without_identity))
            && (self.to.is_empty() || self.to.iter().any(|o| o.ports.holds(|p| *p == port)))
            && self.when.iter().all(|w| w.could_match_without_identity(port))
    }

    /// Whether the rule matches every connection to `port`, whoever sends what.
    fn matches_everything_on(&self, port: u16) -> bool {
        self.from.is_empty()
            && self.when.is_empty()
            && (self.to.is_empty() || self.to.iter().any(|o| !o.has_http() && o.ports.holds(|p| *p == port)))
    }
}

/// One compiled AuthorizationPolicy.
#[derive(Debug, Clone)]
pub struct Policy {
    /// `namespace/name`, for logs and denials.
    pub name: String,
    /// What a match does.
    pub action: Action,
    /// Evaluated and logged, never enforced (`istio.io/dry-run`).
    pub dry_run: bool,
    rules: Vec<RuleMatch>,
}

impl Policy {
    /// Compiles a validated policy. A part that does not compile (impossible after
    /// validation) fails the whole policy, which the caller turns into fail-closed.
    pub fn compile(p: &security::AuthorizationPolicy) -> Result<Self, Error> {
        let ns = p.metadata.namespace_or_default();
        let name = p.metadata.key();
        let rules = p
            .spec
            .rules
            .iter()
            .map(|r| RuleMatch::compile(r, &ns))
            .collect::<Result<_, _>>()
            .map_err(|reason| Error::Compile { policy: name.clone(), reason })?;
        Ok(Self { name, action: p.spec.action, dry_run: p.dry_run(), rules })
    }

    /// The stand-in for a policy that cannot be compiled: for ALLOW nothing matches
    /// (allow nothing), for DENY everything does; either way nothing gets through.
    pub fn fail_closed(name: String) -> Self {
        Self { name, action: Action::Allow, dry_run: false, rules: Vec::new() }
    }

    /// Whether a rule reads an HTTP-only attribute.
    pub fn has_http(&self) -> bool {
        self.rules.iter().any(|r| r.has_http)
    }

    /// Whether the policy matches. `req` None means the connection is not HTTP.
    pub fn matches(&self, c: &ConnAttrs<'_>, req: Option<&RequestAttrs<'_>>) -> bool {
        self.rules.iter().any(|r| match (req, self.action) {
            (None, Action::Allow | Action::Audit) if r.has_http => false,
            _ => r.matches(c, req),
        })
    }

    /// Whether the policy, as an ALLOW policy, could allow a plaintext connection to
    /// `port` (port 0: any port no rule names).
    pub fn could_allow_plaintext(&self, port: u16) -> bool {
        self.rules.iter().any(|r| r.could_match_without_identity(port))
    }

    /// Whether the policy, as a DENY policy, denies every connection to `port`.
    pub fn denies_everything_on(&self, port: u16) -> bool {
        self.rules.iter().any(|r| r.matches_everything_on(port))
    }

    /// Ports the rules name, so the kernel can be given a verdict per named port.
    pub fn named_ports(&self, out: &mut std::collections::BTreeSet<u16>) {
        for r in &self.rules {
            for o in &r.to {
                out.extend(o.ports.any.iter().chain(&o.ports.none));
            }
            for w in &r.when {
                if w.key == ConditionKey::DestinationPort {
                    for v in w.values.any.iter().chain(&w.values.none) {
                        if let CondValue::Port(p) = v {
                            out.insert(*p);
                        }
                    }
                }
            }
        }
    }
}

/// The peer's principals under every name its trust domain goes by: the mesh's own,
/// its aliases, and `cluster.local` (which policies use for "this mesh").
fn principals_of(td: &str, ns: &str, sa: &str, equivalent_domains: &[String]) -> Vec<String> {
    let suffix = format!("/ns/{ns}/sa/{sa}");
    let mut out = vec![format!("{td}{suffix}")];
    if equivalent_domains.iter().any(|d| d == td) {
        for d in equivalent_domains.iter().filter(|d| *d != td) {
            out.push(format!("{d}{suffix}"));
        }
    }
    out
}

impl Peer {
    /// A peer from its SPIFFE identity, with principals under equivalent trust domains.
    pub fn from_identity(id: &crate::identity::Identity, equivalent_domains: &[String]) -> Self {
        Peer {
            principals: principals_of(&id.trust_domain, &id.namespace, &id.service_account, equivalent_domains),
            namespace: id.namespace.to_string(),
            service_account: id.service_account.to_string(),
            trust_domain: id.trust_domain.to_string(),
        }
    }
}

//! VirtualService rules compiled for matching: regexes built once, durations parsed,
//! hosts resolved to the Services they name. First matching rule wins; within a match
//! every condition must hold (AND), across matches any one suffices (OR).

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue};
use regex::Regex;
use tower::retry::budget::Budget as _;

use crate::config::gateway::{self, gateway_key};
use crate::config::istio::{self, HttpMatchRequest, HttpRoute, StringMatch, VirtualService};
use crate::config::linkerd;
use crate::state::Workload;

/// A compiled string condition.
#[derive(Debug, Clone)]
pub enum Matcher {
    /// Equal.
    Exact(String),
    /// Starts with.
    Prefix(String),
    /// Whole-value RE2 match (anchored at compile time).
    Regex(Regex),
}

impl Matcher {
    fn compile(m: &StringMatch) -> Option<Self> {
        if let Some(e) = &m.exact {
            Some(Self::Exact(e.clone()))
        } else if let Some(p) = &m.prefix {
            Some(Self::Prefix(p.clone()))
        } else {
            // Validated at parse time; an invalid regex never reaches here.
            m.regex.as_deref().and_then(|r| istio::anchored_regex(r).ok()).map(Self::Regex)
        }
    }

    /// Whether `v` satisfies the condition.
    pub fn matches(&self, v: &str) -> bool {
        match self {
            Self::Exact(e) => v == e,
            Self::Prefix(p) => v.starts_with(p.as_str()),
            Self::Regex(r) => r.is_match(v),
        }
    }

    fn matches_ignore_case(&self, v: &str) -> bool {
        match self {
            Self::Exact(e) => v.eq_ignore_ascii_case(e),
            Self::Prefix(p) => {
                v.len() >= p.len() && v.is_char_boundary(p.len()) && v[..p.len()].eq_ignore_ascii_case(p)
            }
            Self::Regex(r) => r.is_match(v) || r.is_match(&v.to_ascii_lowercase()),
        }
    }
}

/// A compiled `match` entry.
#[derive(Debug, Clone, Default)]
pub struct RequestMatch {
    uri: Option<Matcher>,
    ignore_uri_case: bool,
    scheme: Option<Matcher>,
    method: Option<Matcher>,
    authority: Option<Matcher>,
    /// `None` matcher: the header must merely be present.
    headers: Vec<(HeaderName, Option<Matcher>)>,
    without_headers: Vec<(HeaderName, Option<Matcher>)>,
    query_params: Vec<(String, Option<Matcher>)>,
    port: Option<u16>,
    source_labels: BTreeMap<String, String>,
    source_namespace: Option<String>,
}

/// What a rule sees of a request.
#[derive(Debug)]
pub struct RequestView<'a> {
    /// Method.
    pub method: &'a str,
    /// Path without the query.
    pub path: &'a str,
    /// Raw query string.
    pub query: Option<&'a str>,
    /// Host header or `:authority`.
    pub authority: &'a str,
    /// `http` (the mesh sees plaintext from the app).
    pub scheme: &'a str,
    /// Headers.
    pub headers: &'a HeaderMap,
    /// Service port dialed.
    pub port: u16,
    /// The calling pod.
    pub source: &'a Workload,
}

fn header_condition<'a>(m: &Option<Matcher>, mut values: impl Iterator<Item = &'a HeaderValue>) -> bool {
    values.any(|v| match (m, v.to_str()) {
        (None, _) => true,
        (Some(m), Ok(s)) => m.matches(s),
        (Some(_), Err(_)) => false,
    })
}

impl RequestMatch {
    fn compile(m: &istio::HttpMatchRequest) -> Self {
        let opt = |s: &StringMatch| (*s != StringMatch::default()).then(|| Matcher::compile(s)).flatten();
        let headers = |map: &BTreeMap<String, StringMatch>| {
            map.iter().filter_map(|(k, v)| Some((HeaderName::from_bytes(k.as_bytes()).ok()?, opt(v)))).collect()
        };
        Self {
            uri: m.uri.as_ref().and_then(Matcher::compile),
            ignore_uri_case: m.ignore_uri_case,
            scheme: m.scheme.as_ref().and_then(Matcher::compile),
            method: m.method.as_ref().and_then(Matcher::compile),
            authority: m.authority.as_ref().and_then(Matcher::compile),
            headers: headers(&m.headers),
            without_headers: headers(&m.without_headers),
            query_params: m.query_params.iter().map(|(k, v)| (k.clone(), opt(v))).collect(),
            port: m.port.and_then(|p| u16::try_from(p).ok()),
            source_labels: m.source_labels.clone(),
            source_namespace: m.source_namespace.clone(),
        }
    }

    /// Every condition holds.
    pub fn matches(&self, r: &RequestView<'_>) -> bool {
        let uri_ok = match &self.uri {
            None => true,
            Some(m) if self.ignore_uri_case => m.matches_ignore_case(r.path),
            Some(m) => m.matches(r.path),
        };
        uri_ok
            && self.scheme.as_ref().is_none_or(|m| m.matches(r.scheme))
            && self.method.as_ref().is_none_or(|m| m.matches(r.method))
            && self.authority.as_ref().is_none_or(|m| m.matches(r.authority))
            && self.port.is_none_or(|p| p == r.port)
            && self.source_namespace.as_ref().is_none_or(|ns| *ns == r.source.namespace)
            && self.source_labels.iter().all(|(k, v)| r.source.labels.get(k) == Some(v))
            && self.headers.iter().all(|(name, m)| header_condition(m, r.headers.get_all(name).iter()))
            && !self.without_headers.iter().any(|(name, m)| header_condition(m, r.headers.get_all(name).iter()))
            && self
                .query_params
                .iter()
                .all(|(k, m)| query_pairs(r.query).any(|(qk, qv)| qk == k && m.as_ref().is_none_or(|m| m.matches(qv))))
    }
}

fn query_pairs(q: Option<&str>) -> impl Iterator<Item = (&str, &str)> {
    q.unwrap_or("").split('&').filter(|p| !p.is_empty()).map(|p| p.split_once('=').unwrap_or((p, "")))
}

/// A destination as routes name it: a Service (`namespace/name`), subset and port.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Backend {
    /// `namespace/name` of the Service.
    pub service: String,
    /// Subset of its DestinationRule.
    pub subset: Option<String>,
    /// Service port; the dialed port when unset.
    pub port: Option<u16>,
}

/// Header operations, compiled.
#[derive(Debug, Clone, Default)]
pub struct HeaderOps {
    set: Vec<(HeaderName, HeaderValue)>,
    add: Vec<(HeaderName, HeaderValue)>,
    remove: Vec<HeaderName>,
}

impl HeaderOps {
    fn compile(ops: Option<&istio::HeaderOperations>) -> Self {
        let Some(ops) = ops else { return Self::default() };
        let pairs = |m: &BTreeMap<String, String>| {
            m.iter()
                .filter_map(|(k, v)| Some((HeaderName::from_bytes(k.as_bytes()).ok()?, HeaderValue::from_str(v).ok()?)))
                .collect()
        };
        Self {
            set: pairs(&ops.set),
            add: pairs(&ops.add),
            remove: ops.remove.iter().filter_map(|k| HeaderName::from_bytes(k.as_bytes()).ok()).collect(),
        }
    }

    /// Applies remove, then set, then add (Envoy's order of effect).
    pub fn apply(&self, headers: &mut HeaderMap) {
        for k in &self.remove {
            headers.remove(k);
        }
        for (k, v) in &self.set {
            headers.insert(k.clone(), v.clone());
        }
        for (k, v) in &self.add {
            headers.append(k.clone(), v.clone());
        }
    }
}

/// A compiled `corsPolicy`.
#[derive(Debug, Clone)]
pub struct Cors {
    origins: Vec<Matcher>,
    allow_methods: Option<HeaderValue>,
    allow_headers: Option<HeaderValue>,
    expose_headers: Option<HeaderValue>,
    max_age: Option<HeaderValue>,
    allow_credentials: bool,
    /// Preflights from other origins are answered (not forwarded) when IGNORE.
    ignore_unmatched_preflights: bool,
}

/// What CORS does with a request.
#[derive(Debug)]
pub enum CorsVerdict {
    /// Not a cross-origin request, or an origin not allowed: forward untouched.
    Forward,
    /// An allowed preflight: answer it here with these headers.
    Preflight(HeaderMap),
    /// A preflight from an origin not allowed, with IGNORE: answer without CORS headers.
    RefusePreflight,
    /// An allowed actual request: forward, then add these headers to the response.
    Decorate(HeaderMap),
}

impl Cors {
    fn compile(c: &istio::CorsPolicy) -> Self {
        let join = |v: &[String]| (!v.is_empty()).then(|| HeaderValue::from_str(&v.join(",")).ok()).flatten();
        let mut origins: Vec<Matcher> = c.allow_origins.iter().filter_map(Matcher::compile).collect();
        origins.extend(c.allow_origin.iter().map(|o| Matcher::Exact(o.clone())));
        Self {
            origins,
            allow_methods: join(&c.allow_methods),
            allow_headers: join(&c.allow_headers),
            expose_headers: join(&c.expose_headers),
            max_age: c
                .max_age
                .as_deref()
                .and_then(|d| istio::duration("", d).ok())
                .and_then(|d| HeaderValue::from_str(&d.as_secs().to_string()).ok()),
            allow_credentials: c.allow_credentials.unwrap_or(false),
            ignore_unmatched_preflights: c.unmatched_preflights.as_deref() == Some("IGNORE"),
        }
    }

    /// Decides on a request with these method and headers.
    pub fn verdict(&self, method: &http::Method, headers: &HeaderMap) -> CorsVerdict {
        let Some(origin) = headers.get(http::header::ORIGIN).and_then(|o| o.to_str().ok()) else {
            return CorsVerdict::Forward;
        };
        let preflight =
            method == http::Method::OPTIONS && headers.contains_key(http::header::ACCESS_CONTROL_REQUEST_METHOD);
        let allowed = self.origins.iter().any(|m| m.matches(origin) || matches!(m, Matcher::Exact(e) if e == "*"));
        if !allowed {
            return if preflight && self.ignore_unmatched_preflights {
                CorsVerdict::RefusePreflight
            } else {
                CorsVerdict::Forward
            };
        }
        let mut h = HeaderMap::new();
        if let Ok(v) = HeaderValue::from_str(origin) {
            h.insert(http::header::ACCESS_CONTROL_ALLOW_ORIGIN, v);
        }
        if self.allow_credentials {
            h.insert(http::header::ACCESS_CONTROL_ALLOW_CREDENTIALS, HeaderValue::from_static("true"));
        }
        if preflight {
            for (name, v) in [
                (http::header::ACCESS_CONTROL_ALLOW_METHODS, &self.allow_methods),
                (http::header::ACCESS_CONTROL_ALLOW_HEADERS, &self.allow_headers),
                (http::header::ACCESS_CONTROL_MAX_AGE, &self.max_age),
            ] {
                if let Some(v) = v {
                    h.insert(name, v.clone());
                }
            }
            CorsVerdict::Preflight(h)
        } else {
            if let Some(v) = &self.expose_headers {
                h.insert(http::header::ACCESS_CONTROL_EXPOSE_HEADERS, v.clone());
            }
            CorsVerdict::Decorate(h)
        }
    }
}

/// A weighted destination of a rule.
#[derive(Debug, Clone)]
pub struct WeightedBackend {
    /// Where.
    pub backend: Backend,
    /// Share (all of a rule's add up to 100, or all are 0 = equal split).
    pub weight: u32,
    /// Request header operations for this destination.
    pub request_headers: HeaderOps,
    /// Response header operations for this destination.
    pub response_headers: HeaderOps,
}

impl WeightedBackend {
    /// All of `service` (`namespace/name`), nothing rewritten.
    pub fn to(service: String) -> Self {
        Self {
            backend: Backend { service, subset: None, port: None },
            weight: 0,
            request_headers: Default::default(),
            response_headers: Default::default(),
        }
    }
}

/// The port of a redirect's Location.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RedirectPort {
    /// Whatever the request's authority carried.
    Keep,
    /// This port.
    Fixed(u16),
    /// None: the scheme's default.
    ProtocolDefault,
    /// The port the request was sent to.
    Request,
}

/// What a matched rule does.
#[derive(Debug, Clone)]
pub enum Action {
    /// Forward to one of these.
    Route(Vec<WeightedBackend>),
    /// Answer with a redirect.
    Redirect {
        /// New path.
        uri: Option<String>,
        /// New host.
        authority: Option<String>,
        /// New port.
        port: RedirectPort,
        /// New scheme.
        scheme: Option<String>,
        /// Status.
        code: u16,
    },
    /// Answer directly.
    Direct {
        /// Status.
        status: u16,
        /// Body.
        body: bytes::Bytes,
    },
}

/// Retry policy of a rule.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Linkerd: retry answers the route classifies as failures, while the budget lasts.
    pub linkerd: Option<LinkerdRetry>,
    /// Retries after the first try.
    pub attempts: u32,
    /// Timeout of each try.
    pub per_try_timeout: Option<Duration>,
    /// Conditions (Envoy names).
    pub on: Vec<String>,
    /// Status codes that are retried (from numeric `retryOn` entries).
    pub status_codes: Vec<u16>,
}

impl RetryPolicy {
    /// Istio's default when a rule sets no `retries`: 2 retries on connection
    /// failures, refused streams, and 503 answers.
    pub fn istio_default() -> Self {
        Self {
            linkerd: None,
            attempts: 2,
            per_try_timeout: None,
            on: ["connect-failure", "refused-stream", "unavailable", "cancelled", "retriable-status-codes"]
                .map(String::from)
                .to_vec(),
            status_codes: vec![503],
        }
    }

    fn compile(r: &istio::HttpRetry) -> Self {
        let mut on = Vec::new();
        let mut status_codes = Vec::new();
        for cond in r.retry_on.as_deref().unwrap_or("").split(',').map(str::trim).filter(|c| !c.is_empty()) {
            match cond.parse::<u16>() {
                Ok(code) => status_codes.push(code),
                Err(_) => on.push(cond.to_string()),
            }
        }
        if !status_codes.is_empty() && !on.iter().any(|c| c == "retriable-status-codes") {
            on.push("retriable-status-codes".into());
        }
        if r.retry_on.is_none() {
            // Istio fills retryOn with its default conditions when only attempts are given.
            let d = Self::istio_default();
            on = d.on;
            status_codes = d.status_codes;
        }
        Self {
            linkerd: None,
            attempts: r.attempts.unwrap_or(0).max(0) as u32,
            per_try_timeout: r.per_try_timeout.as_deref().and_then(|d| istio::duration("", d).ok()),
            on,
            status_codes,
        }
    }

    /// Counts an original request towards the retry budget (Linkerd routes).
    pub fn on_request(&self) {
        if let Some(l) = &self.linkerd {
            l.budget.deposit();
        }
    }

    /// No retries (Linkerd's default, and TrafficSplit routes).
    pub fn none() -> Self {
        Self { linkerd: None, attempts: 0, per_try_timeout: None, on: Vec::new(), status_codes: Vec::new() }
    }

    /// Whether an answer with `status` is retried.
    pub fn retries_status(&self, status: u16) -> bool {
        if let Some(l) = &self.linkerd {
            return l.classes.is_failure(status) && l.budget.withdraw();
        }
        let has = |c: &str| self.on.iter().any(|x| x == c);
        (has("5xx") && (500..=599).contains(&status))
            || (has("gateway-error") && matches!(status, 502..=504))
            || (has("retriable-4xx") && status == 409)
            || (has("retriable-status-codes") && self.status_codes.contains(&status))
    }

    /// Whether a gRPC answer with this non-zero `grpc-status` (trailers-only, as Envoy
    /// judges it) is retried: Envoy's gRPC conditions name the codes.
    pub fn retries_grpc(&self, code: u32) -> bool {
        if let Some(l) = &self.linkerd {
            return l.budget.withdraw();
        }
        let cond = match code {
            1 => "cancelled",
            4 => "deadline-exceeded",
            8 => "resource-exhausted",
            13 => "internal",
            14 => "unavailable",
            _ => return false,
        };
        self.on.iter().any(|c| c == cond)
    }

    /// Whether a failure to connect or a reset is retried.
    pub fn retries_failure(&self, failure: Failure) -> bool {
        if let Some(l) = &self.linkerd {
            return l.budget.withdraw();
        }
        let has = |c: &str| self.on.iter().any(|x| x == c);
        match failure {
            Failure::Connect => has("connect-failure") || has("5xx") || has("gateway-error"),
            Failure::Reset => has("reset") || has("5xx"),
            Failure::RefusedStream => has("refused-stream") || has("5xx"),
            Failure::Timeout => has("5xx") || has("gateway-error"),
        }
    }
}

/// Linkerd retry state of a route: its response classes and the profile's budget.
#[derive(Clone)]
pub struct LinkerdRetry {
    /// Which answers are failures.
    pub classes: ResponseClasses,
    /// Shared by every route of the ServiceProfile.
    pub budget: std::sync::Arc<tower::retry::budget::TpsBudget>,
}

impl std::fmt::Debug for LinkerdRetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkerdRetry").field("classes", &self.classes).finish_non_exhaustive()
    }
}

/// A compiled `responseClasses` list: the first class whose condition matches decides;
/// with none matching, 5xx is a failure (Linkerd's default).
#[derive(Debug, Clone, Default)]
pub struct ResponseClasses(pub Vec<(StatusCondition, bool)>);

impl ResponseClasses {
    /// Whether `status` is a failure.
    pub fn is_failure(&self, status: u16) -> bool {
        self.0.iter().find(|(c, _)| c.matches(status)).map_or((500..=599).contains(&status), |(_, f)| *f)
    }
}

/// A response condition.
#[derive(Debug, Clone)]
pub enum StatusCondition {
    /// Inclusive range.
    Range(u16, u16),
    /// All hold.
    All(Vec<StatusCondition>),
    /// Any holds.
    Any(Vec<StatusCondition>),
    /// Does not hold.
    Not(Box<StatusCondition>),
}

impl StatusCondition {
    fn matches(&self, status: u16) -> bool {
        match self {
            Self::Range(lo, hi) => (*lo..=*hi).contains(&status),
            Self::All(v) => v.iter().all(|c| c.matches(status)),
            Self::Any(v) => v.iter().any(|c| c.matches(status)),
            Self::Not(c) => !c.matches(status),
        }
    }
}

/// A ServiceProfile request condition.
#[derive(Debug, Clone)]
pub enum ProfileCondition {
    /// Method equals.
    Method(String),
    /// Whole-path regex.
    Path(Regex),
    /// All hold.
    All(Vec<ProfileCondition>),
    /// Any holds.
    Any(Vec<ProfileCondition>),
    /// Does not hold.
    Not(Box<ProfileCondition>),
}

impl ProfileCondition {
    fn matches(&self, r: &RequestView<'_>) -> bool {
        match self {
            Self::Method(m) => r.method.eq_ignore_ascii_case(m),
            Self::Path(re) => re.is_match(r.path),
            Self::All(v) => v.iter().all(|c| c.matches(r)),
            Self::Any(v) => v.iter().any(|c| c.matches(r)),
            Self::Not(c) => !c.matches(r),
        }
    }
}

/// How a try failed without an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// No connection to the endpoint.
    Connect,
    /// The connection broke mid-request.
    Reset,
    /// The peer refused the stream (HTTP/2 REFUSED_STREAM).
    RefusedStream,
    /// The per-try timeout fired.
    Timeout,
}

/// Fault injection of a rule.
#[derive(Debug, Clone, Default)]
pub struct Fault {
    /// (delay, share 0-100).
    pub delay: Option<(Duration, f64)>,
    /// (answer, share 0-100).
    pub abort: Option<(Abort, f64)>,
}

/// What an injected abort answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Abort {
    /// An HTTP status.
    Http(u16),
    /// A trailers-only gRPC status.
    Grpc(u32),
}

/// A compiled rule.
#[derive(Debug, Clone)]
pub struct Rule {
    /// Name (or `http[i]`), for logs.
    pub name: String,
    /// Any of these (empty: always).
    pub matches: Vec<RequestMatch>,
    /// A ServiceProfile condition, instead of `matches`.
    pub profile_condition: Option<ProfileCondition>,
    /// What to do.
    pub action: Action,
    /// Overall request timeout.
    pub timeout: Option<Duration>,
    /// Retries.
    pub retries: RetryPolicy,
    /// Faults.
    pub fault: Fault,
    /// Shadow copies (destination, share 0-100).
    pub mirrors: Vec<(Backend, f64)>,
    /// Request header operations.
    pub request_headers: HeaderOps,
    /// Response header operations.
    pub response_headers: HeaderOps,
    /// Path rewrite (replaces the matched prefix).
    pub rewrite_uri: Option<String>,
    /// Regex path rewrite (pattern, replacement in `regex` syntax).
    pub rewrite_regex: Option<(Regex, String)>,
    /// Host rewrite.
    pub rewrite_authority: Option<String>,
    /// CORS.
    pub cors: Option<Cors>,
}

impl Rule {
    /// Whether the rule applies to the request.
    pub fn matches(&self, r: &RequestView<'_>) -> bool {
        if let Some(c) = &self.profile_condition {
            return c.matches(r);
        }
        self.matches.is_empty() || self.matches.iter().any(|m| m.matches(r))
    }

    /// The path after `rewrite.uri`: replaces the prefix a prefix match matched, else the
    /// whole path (as Envoy does).
    pub fn rewritten_path(&self, r: &RequestView<'_>) -> Option<String> {
        if let Some((re, replacement)) = &self.rewrite_regex {
            return Some(re.replace_all(r.path, replacement.as_str()).into_owned());
        }
        let new = self.rewrite_uri.as_ref()?;
        let matched_prefix = self.matches.iter().find(|m| m.matches(r)).and_then(|m| match &m.uri {
            Some(Matcher::Prefix(p)) => Some(p.clone()),
            _ => None,
        });
        Some(match matched_prefix {
            Some(p) => format!("{new}{}", &r.path[p.len().min(r.path.len())..]),
            None => new.clone(),
        })
    }
}

/// The compiled rules of one VirtualService for one Service.
#[derive(Debug, Clone)]
pub struct ServiceRoutes {
    /// `namespace/name` of the VirtualService.
    pub virtual_service: String,
    /// Rules in order.
    pub rules: Vec<Rule>,
    /// TCP rules in order, for connections not routed as HTTP.
    pub tcp: Vec<TcpRule>,
}

/// A compiled TCP match: port, source labels, source namespace.
#[derive(Debug, Clone)]
struct L4Match {
    port: Option<u16>,
    source_labels: BTreeMap<String, String>,
    source_namespace: Option<String>,
}

/// A compiled TCP rule.
#[derive(Debug, Clone)]
pub struct TcpRule {
    /// Any of these; empty: always.
    matches: Vec<L4Match>,
    /// Weighted destinations.
    pub backends: Vec<WeightedBackend>,
}

impl TcpRule {
    /// Whether a connection from `source` to `port` takes this rule.
    pub fn matches(&self, port: u16, source: &Workload) -> bool {
        self.matches.is_empty()
            || self.matches.iter().any(|m| {
                m.port.is_none_or(|p| p == port)
                    && m.source_namespace.as_ref().is_none_or(|ns| *ns == source.namespace)
                    && m.source_labels.iter().all(|(k, v)| source.labels.get(k) == Some(v))
            })
    }
}

/// Where rules are compiled for: mesh traffic, or the servers of one gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attachment<'a> {
    /// Sidecarless traffic between workloads: the `mesh` of `gateways:` lists.
    Mesh,
    /// The servers of one Gateway, `namespace/name`.
    Gateway(&'a str),
}

impl Attachment<'_> {
    /// Whether a VirtualService's top-level `gateways:` (written in namespace `ns`)
    /// binds it here; an empty list means `mesh` only.
    pub fn bound_by(&self, gateways: &[String], ns: &str) -> bool {
        if gateways.is_empty() {
            return *self == Attachment::Mesh;
        }
        gateways.iter().any(|g| self.is(&gateway_key(g, ns)))
    }

    /// Whether a match applies here: its own `gateways:` replace the top-level list
    /// (which already bound the VirtualService here) when set.
    fn takes_match(&self, gateways: &[String], ns: &str) -> bool {
        gateways.is_empty() || gateways.iter().any(|g| self.is(&gateway_key(g, ns)))
    }

    fn is(&self, key: &str) -> bool {
        match self {
            Attachment::Mesh => key == gateway::MESH,
            Attachment::Gateway(k) => key == *k,
        }
    }
}

/// The matches of a rule that apply at `at`, or None when the rule had matches and
/// none of them apply here: the rule is for somewhere else, not a catch-all here.
fn matches_at<'m, M>(
    matches: &'m [M],
    gateways: impl Fn(&M) -> &[String],
    at: Attachment<'_>,
    ns: &str,
) -> Option<Vec<&'m M>> {
    let kept: Vec<&M> = matches.iter().filter(|m| at.takes_match(gateways(m), ns)).collect();
    (matches.is_empty() || !kept.is_empty()).then_some(kept)
}

/// Compiles the TCP rules of `vs` (namespace `ns`) that apply at `at`.
pub fn compile_tcp_rules<V>(
    vs: &VirtualService,
    ns: &str,
    known: &HashMap<String, V>,
    at: Attachment<'_>,
) -> Vec<TcpRule> {
    let tcp = vs.spec.tcp.iter().map(|r| (r.matches.as_slice(), r.route.as_slice()));
    compile_opaque(
        tcp,
        |m| &m.gateways,
        at,
        ns,
        known,
        |m| L4Match {
            port: m.port.and_then(|p| u16::try_from(p).ok()),
            source_labels: m.source_labels.clone(),
            source_namespace: m.source_namespace.clone(),
        },
    )
    .map(|(matches, backends)| TcpRule { matches, backends })
    .collect()
}

/// The `tcp:` or `tls:` rules (each its matches and destinations) that apply at `at`:
/// the matches kept here, each turned into `T` by `compile_match`, and the
/// destinations, which carry no headers (bytes have none to change).
fn compile_opaque<'v, M: 'v, T, V>(
    rules: impl Iterator<Item = (&'v [M], &'v [istio::HttpRouteDestination])>,
    gateways: impl Fn(&M) -> &[String],
    at: Attachment<'_>,
    ns: &str,
    known: &HashMap<String, V>,
    compile_match: impl Fn(&M) -> T,
) -> impl Iterator<Item = (Vec<T>, Vec<WeightedBackend>)> {
    rules.filter_map(move |(matches, route)| {
        let kept = matches_at(matches, &gateways, at, ns)?;
        Some((kept.into_iter().map(&compile_match).collect(), opaque_backends(route, ns, known)))
    })
}

impl ServiceRoutes {
    /// The first TCP rule for a connection from `source` to `port`.
    pub fn first_tcp_match(&self, port: u16, source: &Workload) -> Option<&TcpRule> {
        self.tcp.iter().find(|r| r.matches(port, source))
    }

    /// The first rule that matches.
    pub fn first_match(&self, r: &RequestView<'_>) -> Option<&Rule> {
        self.rules.iter().find(|rule| rule.matches(r))
    }
}

pub use crate::config::hosts::{service_for_host, services_for_host};

/// A TLS rule as a gateway serves it: the SNI hosts (and port) it matches, and where it
/// sends the connection.
#[derive(Debug, Clone)]
pub struct TlsRule {
    /// `(SNI hosts, port)` of each match that applies here.
    pub matches: Vec<(Vec<String>, Option<u16>)>,
    /// Weighted destinations.
    pub backends: Vec<WeightedBackend>,
}

impl TlsRule {
    /// Whether a connection with `sni` to `port` takes this rule: a match names the SNI
    /// (exactly, or under `*.`) and, when it names a port, that port.
    pub fn takes(&self, sni: &str, port: u16) -> bool {
        self.matches.iter().any(|(hosts, p)| {
            p.is_none_or(|p| p == port)
                && hosts.iter().any(|h| match h.strip_prefix('*') {
                    Some(suffix) => suffix.is_empty() || (sni.len() > suffix.len() && sni.ends_with(suffix)),
                    None => h.eq_ignore_ascii_case(sni),
                })
        })
    }
}

/// Compiles the TLS rules of `vs` (namespace `ns`) that apply at `at`.
pub fn compile_tls_rules<V>(
    vs: &VirtualService,
    ns: &str,
    known: &HashMap<String, V>,
    at: Attachment<'_>,
) -> Vec<TlsRule> {
    let tls = vs.spec.tls.iter().map(|r| (r.matches.as_slice(), r.route.as_slice()));
    compile_opaque(
        tls,
        |m| &m.gateways,
        at,
        ns,
        known,
        |m| (m.sni_hosts.clone(), m.port.and_then(|p| u16::try_from(p).ok())),
    )
    .map(|(matches, backends)| TlsRule { matches, backends })
    .collect()
}

/// Compiles the HTTP rules of `vs` (namespace `ns`) that apply at `at`; hosts are
/// resolved by the caller.
pub fn compile_rules<V>(vs: &VirtualService, ns: &str, known: &HashMap<String, V>, at: Attachment<'_>) -> Vec<Rule> {
    let rules = vs.spec.http.iter().enumerate();
    rules
        .filter_map(|(i, r)| Some(compile_rule(i, r, &matches_at(&r.matches, |m| &m.gateways, at, ns)?, ns, known)))
        .collect()
}

/// The destinations of a `tcp:` or `tls:` rule: no headers to change on bytes.
fn opaque_backends<V>(
    route: &[istio::HttpRouteDestination],
    ns: &str,
    known: &HashMap<String, V>,
) -> Vec<WeightedBackend> {
    route
        .iter()
        .map(|d| WeightedBackend {
            backend: backend(&d.destination, ns, known),
            weight: d.weight.unwrap_or(0).max(0) as u32,
            request_headers: HeaderOps::default(),
            response_headers: HeaderOps::default(),
        })
        .collect()
}

fn backend<V>(d: &istio::Destination, ns: &str, known: &HashMap<String, V>) -> Backend {
    Backend {
        // An unknown host stays as written: requests routed there answer 503 (no route
        // to any endpoint), as Envoy does for a cluster with no members.
        service: service_for_host(&d.host, ns, known).unwrap_or_else(|| d.host.clone()),
        subset: d.subset.clone(),
        port: d.port.as_ref().and_then(|p| u16::try_from(p.number).ok()),
    }
}

fn percentage(p: &Option<istio::Percent>, legacy: Option<u32>) -> f64 {
    p.as_ref().map(|p| p.value).or(legacy.map(f64::from)).unwrap_or(100.0)
}

fn compile_rule<V>(
    i: usize,
    r: &HttpRoute,
    matches: &[&HttpMatchRequest],
    ns: &str,
    known: &HashMap<String, V>,
) -> Rule {
    let action = if let Some(rd) = &r.redirect {
        Action::Redirect {
            uri: rd.uri.clone(),
            authority: rd.authority.clone(),
            port: match (rd.port.and_then(|p| u16::try_from(p).ok()), rd.derive_port.as_deref()) {
                (Some(p), _) => RedirectPort::Fixed(p),
                (None, Some("FROM_PROTOCOL_DEFAULT")) => RedirectPort::ProtocolDefault,
                (None, Some("FROM_REQUEST_PORT")) => RedirectPort::Request,
                (None, _) => RedirectPort::Keep,
            },
            scheme: rd.scheme.clone(),
            code: rd.redirect_code.and_then(|c| u16::try_from(c).ok()).unwrap_or(301),
        }
    } else if let Some(d) = &r.direct_response {
        let body = d.body.as_ref().and_then(|b| b.string.clone()).unwrap_or_default();
        Action::Direct { status: d.status as u16, body: body.into() }
    } else {
        Action::Route(
            r.route
                .iter()
                .map(|d| WeightedBackend {
                    backend: backend(&d.destination, ns, known),
                    weight: d.weight.unwrap_or(0).max(0) as u32,
                    request_headers: HeaderOps::compile(d.headers.as_ref().and_then(|h| h.request.as_ref())),
                    response_headers: HeaderOps::compile(d.headers.as_ref().and_then(|h| h.response.as_ref())),
                })
                .collect(),
        )
    };
    let fault = r.fault.as_ref().map_or_else(Fault::default, |f| Fault {
        delay: f.delay.as_ref().and_then(|d| {
            let t = istio::duration("", d.fixed_delay.as_deref()?).ok()?;
            Some((t, percentage(&d.percentage, d.percent)))
        }),
        abort: f.abort.as_ref().and_then(|a| {
            let answer = match (&a.grpc_status, a.http_status) {
                (Some(g), _) => Abort::Grpc(istio::grpc_code(g)?),
                (None, Some(h)) => Abort::Http(u16::try_from(h).ok()?),
                (None, None) => return None,
            };
            Some((answer, percentage(&a.percentage, None)))
        }),
    });
    Rule {
        name: r.name.clone().unwrap_or_else(|| format!("http[{i}]")),
        matches: matches.iter().map(|m| RequestMatch::compile(m)).collect(),
        profile_condition: None,
        action,
        timeout: r.timeout.as_deref().and_then(|t| istio::duration("", t).ok()).filter(|t| !t.is_zero()),
        retries: r.retries.as_ref().map_or_else(RetryPolicy::istio_default, RetryPolicy::compile),
        fault,
        mirrors: r
            .mirror
            .as_ref()
            .map(|m| (backend(m, ns, known), percentage(&r.mirror_percentage, r.mirror_percent)))
            .into_iter()
            .chain(r.mirrors.iter().map(|m| (backend(&m.destination, ns, known), percentage(&m.percentage, None))))
            .collect(),
        request_headers: HeaderOps::compile(r.headers.as_ref().and_then(|h| h.request.as_ref())),
        response_headers: HeaderOps::compile(r.headers.as_ref().and_then(|h| h.response.as_ref())),
        rewrite_uri: r.rewrite.as_ref().and_then(|w| w.uri.clone()),
        rewrite_regex: r.rewrite.as_ref().and_then(|w| w.uri_regex_rewrite.as_ref()).and_then(|rr| {
            // Istio (RE2) writes groups as \1; the regex crate as ${1}.
            let replacement = Regex::new(r"\\(\d+)").ok()?.replace_all(&rr.rewrite, "$${$1}").into_owned();
            Some((Regex::new(&rr.pattern).ok()?, replacement))
        }),
        rewrite_authority: r.rewrite.as_ref().and_then(|w| w.authority.clone()),
        cors: r.cors_policy.as_ref().map(Cors::compile),
    }
}

fn profile_condition(m: &linkerd::RequestMatch) -> ProfileCondition {
    let mut all = Vec::new();
    if let Some(method) = &m.method {
        all.push(ProfileCondition::Method(method.clone()));
    }
    if let Some(re) = m.path_regex.as_deref().and_then(|r| istio::anchored_regex(r).ok()) {
        all.push(ProfileCondition::Path(re));
    }
    all.extend(m.all.iter().map(profile_condition));
    if !m.any.is_empty() {
        all.push(ProfileCondition::Any(m.any.iter().map(profile_condition).collect()));
    }
    if let Some(n) = &m.not {
        all.push(ProfileCondition::Not(Box::new(profile_condition(n))));
    }
    ProfileCondition::All(all)
}

fn status_condition(m: &linkerd::ResponseMatch) -> StatusCondition {
    let mut all = Vec::new();
    if let Some(s) = &m.status {
        all.push(StatusCondition::Range(s.min.unwrap_or(100), s.max.unwrap_or(599)));
    }
    all.extend(m.all.iter().map(status_condition));
    if !m.any.is_empty() {
        all.push(StatusCondition::Any(m.any.iter().map(status_condition).collect()));
    }
    if let Some(n) = &m.not {
        all.push(StatusCondition::Not(Box::new(status_condition(n))));
    }
    StatusCondition::All(all)
}

/// Linkerd's default budget when a profile sets none: 20% extra load, 10 retries/s, 10 s.
const DEFAULT_BUDGET: (f32, u32, std::time::Duration) = (0.2, 10, std::time::Duration::from_secs(10));
/// Upper bound of tries per request under a budget (the budget is the real limit).
const PROFILE_MAX_RETRIES: u32 = 10;

/// Rules of a ServiceProfile for `service` (`namespace/name`): its routes in order, then
/// a catch-all that forwards without timeout or retries.
pub fn compile_profile(sp: &linkerd::ServiceProfile, service: &str) -> Vec<Rule> {
    let (ratio, min_per_sec, ttl) = sp.spec.retry_budget.as_ref().map_or(DEFAULT_BUDGET, |b| {
        let ttl = istio::duration("", &b.ttl).unwrap_or(DEFAULT_BUDGET.2);
        (b.retry_ratio as f32, b.min_retries_per_second, ttl)
    });
    // tower's budget needs a window of 1 to 60 s.
    let ttl = ttl.clamp(std::time::Duration::from_secs(1), std::time::Duration::from_secs(60));
    let budget = std::sync::Arc::new(tower::retry::budget::TpsBudget::new(ttl, min_per_sec, ratio));
    let to_service = || {
        Action::Route(vec![WeightedBackend {
            backend: Backend { service: service.to_string(), subset: None, port: None },
            weight: 0,
            request_headers: HeaderOps::default(),
            response_headers: HeaderOps::default(),
        }])
    };
    let plain = |name: String, condition: Option<ProfileCondition>, timeout, retries| Rule {
        name,
        matches: Vec::new(),
        profile_condition: condition,
        action: to_service(),
        timeout,
        retries,
        fault: Fault::default(),
        mirrors: Vec::new(),
        request_headers: HeaderOps::default(),
        response_headers: HeaderOps::default(),
        rewrite_uri: None,
        rewrite_regex: None,
        rewrite_authority: None,
        cors: None,
    };
    let mut rules: Vec<Rule> = sp
        .spec
        .routes
        .iter()
        .map(|r| {
            let classes = ResponseClasses(
                r.response_classes.iter().map(|c| (status_condition(&c.condition), c.is_failure)).collect(),
            );
            let retries = if r.is_retryable {
                RetryPolicy {
                    linkerd: Some(LinkerdRetry { classes, budget: budget.clone() }),
                    attempts: PROFILE_MAX_RETRIES,
                    ..RetryPolicy::none()
                }
            } else {
                RetryPolicy::none()
            };
            let timeout = r.timeout.as_deref().and_then(|t| istio::duration("", t).ok()).filter(|t| !t.is_zero());
            plain(r.name.clone(), Some(profile_condition(&r.condition)), timeout, retries)
        })
        .collect();
    rules.push(plain("default".into(), None, None, RetryPolicy::none()));
    rules
}

/// The rule of a TrafficSplit: the root Service's traffic shared among backend
/// Services by weight (thousandths of the quantities given).
pub fn compile_split(ts: &linkerd::TrafficSplit, ns: &str) -> Rule {
    let backends = ts
        .spec
        .backends
        .iter()
        .map(|b| WeightedBackend {
            backend: Backend { service: format!("{ns}/{}", b.service), subset: None, port: None },
            weight: linkerd::quantity_milli(&b.weight).unwrap_or(0).min(u64::from(u32::MAX)) as u32,
            request_headers: HeaderOps::default(),
            response_headers: HeaderOps::default(),
        })
        .collect();
    Rule {
        name: format!("trafficsplit {ns}/{}", ts.metadata.name),
        matches: Vec::new(),
        profile_condition: None,
        action: Action::Route(backends),
        timeout: None,
        retries: RetryPolicy::none(),
        fault: Fault::default(),
        mirrors: Vec::new(),
        request_headers: HeaderOps::default(),
        response_headers: HeaderOps::default(),
        rewrite_uri: None,
        rewrite_regex: None,
        rewrite_authority: None,
        cors: None,
    }
}

/// One of `backends` at random by weight (equal shares when no weights are set).
pub fn pick_weighted(backends: &[WeightedBackend]) -> Option<&WeightedBackend> {
    // Summed wide: no set of u32 weights overflows it.
    let total: u64 = backends.iter().map(|b| u64::from(b.weight)).sum();
    if total == 0 {
        return backends
            .get(rand::Rng::random_range(&mut rand::rng(), 0..backends.len().max(1)))
            .filter(|_| !backends.is_empty());
    }
    let mut x = rand::Rng::random_range(&mut rand::rng(), 0..total);
    for b in backends {
        if x < u64::from(b.weight) {
            return Some(b);
        }
        x -= u64::from(b.weight);
    }
    backends.last()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_documents;

    fn rules(http: &str) -> Vec<Rule> {
        let yaml = format!(
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: v, namespace: production}}\nspec:\n  hosts: [myapp]\n  http:\n{http}"
        );
        let objs = parse_documents(std::path::Path::new("t.yaml"), &yaml).unwrap();
        let crate::config::Object::VirtualService(vs) = &objs[0] else { panic!() };
        let known: HashMap<String, ()> = [("production/myapp".to_string(), ())].into();
        compile_rules(vs, "production", &known, Attachment::Mesh)
    }

    fn view<'a>(path: &'a str, headers: &'a HeaderMap, source: &'a Workload) -> RequestView<'a> {
        RequestView { method: "GET", path, query: None, authority: "myapp", scheme: "http", headers, port: 80, source }
    }

    fn workload() -> Workload {
        Workload {
            name: "frontend".into(),
            namespace: "production".into(),
            labels: Default::default(),
            node: None,
            ips: vec![],
            identity: crate::identity::Identity::new("cluster.local", "production", "frontend"),
            enrolled: true,
            dns_capture: false,
            named_ports: Default::default(),
            uid: None,
            serving: true,
            meta: crate::state::WorkloadMeta::unknown(),
            network: String::new(),
            locality: Default::default(),
        }
    }

    #[test]
    fn regex_rewrite_uses_istio_group_syntax() {
        let r = rules(
            "  - match: [{uri: {prefix: /v1}}]\n    rewrite: {uriRegexRewrite: {match: \"^/v1/(.*)$\", rewrite: \"/api/\\\\1\"}}\n    route: [{destination: {host: myapp}}]\n",
        );
        let (h, w) = (HeaderMap::new(), workload());
        assert_eq!(r[0].rewritten_path(&view("/v1/users/7", &h, &w)).as_deref(), Some("/api/users/7"));
    }

    #[test]
    fn prefix_rewrite_replaces_only_the_matched_prefix() {
        let r = rules(
            "  - match: [{uri: {prefix: /old}}]\n    rewrite: {uri: /new}\n    route: [{destination: {host: myapp}}]\n",
        );
        let (h, w) = (HeaderMap::new(), workload());
        assert_eq!(r[0].rewritten_path(&view("/old/page", &h, &w)).as_deref(), Some("/new/page"));
    }

    #[test]
    fn grpc_abort_and_several_mirrors_compile() {
        let r = rules(
            "  - fault: {abort: {grpcStatus: UNAVAILABLE, percentage: {value: 50}}}\n    mirrors: [{destination: {host: myapp}, percentage: {value: 25}}, {destination: {host: myapp}}]\n    route: [{destination: {host: myapp}}]\n",
        );
        assert_eq!(r[0].fault.abort, Some((Abort::Grpc(14), 50.0)));
        let shares: Vec<f64> = r[0].mirrors.iter().map(|(_, p)| *p).collect();
        assert_eq!(shares, vec![25.0, 100.0]);
    }

    #[test]
    fn header_presence_absence_and_query_conditions() {
        let r = rules(
            "  - match: [{headers: {x-user: {prefix: beta-}}, withoutHeaders: {x-debug: {}}, queryParams: {v: {exact: \"2\"}}}]\n    route: [{destination: {host: myapp}}]\n",
        );
        let w = workload();
        let mut h = HeaderMap::new();
        h.insert("x-user", HeaderValue::from_static("beta-7"));
        let mut v = view("/", &h, &w);
        v.query = Some("a=1&v=2");
        assert!(r[0].matches(&v));
        v.query = Some("v=3");
        assert!(!r[0].matches(&v), "query must match");
        let mut h2 = h.clone();
        h2.insert("x-debug", HeaderValue::from_static("1"));
        let mut v2 = view("/", &h2, &w);
        v2.query = Some("v=2");
        assert!(!r[0].matches(&v2), "withoutHeaders excludes a present header");
    }

    #[test]
    fn retry_conditions_follow_envoy_names() {
        let p = RetryPolicy::compile(&istio::HttpRetry {
            attempts: Some(3),
            per_try_timeout: None,
            retry_on: Some("gateway-error,retriable-4xx,429,unavailable".into()),
            retry_remote_localities: None,
        });
        assert!(p.retries_status(502) && p.retries_status(504) && p.retries_status(409) && p.retries_status(429));
        assert!(!p.retries_status(500), "500 is not a gateway error");
        assert!(p.retries_grpc(14) && !p.retries_grpc(13));
        assert!(p.retries_failure(Failure::Connect), "gateway-error covers connect failures");
        assert!(!p.retries_failure(Failure::Reset));
    }
}

//! Authorization on the server side of every connection: PeerAuthentication modes and
//! AuthorizationPolicy decisions for the workloads of this node.
//!
//! Evaluation order is Istio's: CUSTOM (refused at parse time), then DENY, then ALLOW
//! (a workload with any ALLOW policy denies what none allows); AUDIT and dry-run
//! policies are evaluated and logged without effect. Decisions are made where the
//! traffic arrives: at connection accept for policies on L4 attributes only, per request
//! for policies that read HTTP attributes, and in the kernel (`sk_lookup`) for plaintext
//! the agent would refuse whatever it carried.
//!
//! Invariants: a policy that cannot be compiled denies (fail closed); TCP is never
//! allowed more than an HTTP request would be (see `rules`).

pub mod head;
pub mod mtls;
pub mod path;
mod rules;

pub use rules::{Policy, StrMatch};

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;

use http::HeaderMap;

use crate::config::security::Action;

/// Errors of authorization.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// A validated policy still failed to compile; it is replaced by a fail-closed one.
    #[error("AuthorizationPolicy {policy}: {reason}")]
    Compile {
        /// `namespace/name`.
        policy: String,
        /// What failed.
        reason: String,
    },
}

/// The body of a request an AuthorizationPolicy refused, as Envoy words it.
pub const RBAC_DENIED: &str = "RBAC: access denied";

/// The authenticated peer of an mTLS connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// `<td>/ns/<ns>/sa/<sa>` under each equivalent trust domain.
    pub principals: Vec<String>,
    /// Namespace of the identity.
    pub namespace: String,
    /// Service account of the identity.
    pub service_account: String,
    /// Trust domain of the identity.
    pub trust_domain: String,
}

/// What is known of a connection when it is judged.
#[derive(Debug, Clone, Copy)]
pub struct ConnAttrs<'a> {
    /// The peer's address (the client pod for HBONE, the sender for plaintext).
    pub src: SocketAddr,
    /// The workload address and port connected to.
    pub dst: SocketAddr,
    /// The mTLS peer; None for plaintext.
    pub peer: Option<&'a Peer>,
}

impl ConnAttrs<'_> {
    /// Who the client is, for logs: its verified principal, or `plaintext`.
    pub fn who(&self) -> String {
        self.peer
            .and_then(|p| p.principals.first())
            .map_or_else(|| "plaintext".to_string(), |p| format!("spiffe://{p}"))
    }

    /// Who the client is and where it came from: what the dashboard lists of a denial.
    pub fn client(&self) -> String {
        format!("{} {}", self.who(), self.src.ip())
    }
}

/// What is known of one HTTP request.
#[derive(Debug, Clone, Copy)]
pub struct RequestAttrs<'a> {
    /// Method, as sent.
    pub method: &'a str,
    /// Normalized path without the query ([`path::normalize`]).
    pub path: &'a str,
    /// Host or `:authority`, lower-cased.
    pub host_lowercase: &'a str,
    /// Request headers.
    pub headers: &'a HeaderMap,
}

/// The outcome for a connection or a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Let it through.
    Allow,
    /// Refuse it, and why (names the policy, never a secret).
    Deny(String),
}

/// How a denial by a DENY policy begins; the policy's `namespace/name` follows.
const DENIED_BY: &str = "denied by DENY policy ";

/// Envoy's `rbac_access_denied_matched_policy[...]` response details for a denial
/// `reason`: the DENY policy that matched as `ns[<namespace>]-policy[<name>]`, or
/// `none` when no ALLOW policy matched (as Envoy reports it). No spaces: the text
/// access log splits on them.
pub fn denial_details(reason: &str) -> String {
    let policy = reason
        .strip_prefix(DENIED_BY)
        .and_then(|p| p.split_once('/'))
        .map_or_else(|| "none".to_string(), |(ns, name)| format!("ns[{ns}]-policy[{name}]"));
    format!("rbac_access_denied_matched_policy[{policy}]")
}

/// What to do with a new connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnVerdict {
    /// Decided for the whole connection.
    Decided(Decision),
    /// HTTP attributes decide: judge each request if the bytes are HTTP, else judge
    /// the connection as TCP.
    PerRequest,
}

/// The policies that select one workload, by action.
#[derive(Debug, Default)]
pub struct WorkloadAuthz {
    deny: Vec<Arc<Policy>>,
    allow: Vec<Arc<Policy>>,
    audit: Vec<Arc<Policy>>,
    dry_run: Vec<Arc<Policy>>,
    has_http: bool,
}

impl WorkloadAuthz {
    /// The policies in force, `namespace/name`, by what they do: `DENY`, `ALLOW`,
    /// `AUDIT`, and `DRY_RUN` (evaluated and logged only).
    pub fn policy_names(&self) -> [(&'static str, Vec<&str>); 4] {
        fn names(list: &[Arc<Policy>]) -> Vec<&str> {
            list.iter().map(|p| p.name.as_str()).collect()
        }
        [
            ("DENY", names(&self.deny)),
            ("ALLOW", names(&self.allow)),
            ("AUDIT", names(&self.audit)),
            ("DRY_RUN", names(&self.dry_run)),
        ]
    }

    /// The policies in force by action (`DENY`, `ALLOW`, ...), actions without any left
    /// out: what the config dump and the dashboard show.
    pub fn in_force(&self) -> std::collections::BTreeMap<String, Vec<String>> {
        self.policy_names()
            .into_iter()
            .filter(|(_, names)| !names.is_empty())
            .map(|(action, names)| (action.to_string(), names.into_iter().map(str::to_string).collect()))
            .collect()
    }

    /// Groups `policies` (in name order) by action.
    pub fn new(policies: impl IntoIterator<Item = Arc<Policy>>) -> Self {
        let mut out = WorkloadAuthz::default();
        for p in policies {
            out.has_http |= p.has_http();
            let list = match (p.dry_run, p.action) {
                (true, _) => &mut out.dry_run,
                (false, Action::Deny) => &mut out.deny,
                (false, Action::Audit) => &mut out.audit,
                // CUSTOM never gets here (refused when parsed); were it to, it must not
                // be skipped: treat it as an ALLOW that matches nothing it was not told.
                (false, Action::Allow | Action::Custom) => &mut out.allow,
            };
            list.push(p);
        }
        out
    }

    /// No policy selects the workload: everything is allowed without looking.
    pub fn is_empty(&self) -> bool {
        self.deny.is_empty() && self.allow.is_empty() && self.audit.is_empty() && self.dry_run.is_empty()
    }

    /// Judges a connection (`req` None: not HTTP) or one request on it, logging what
    /// AUDIT and dry-run policies make of it.
    pub fn check(&self, c: &ConnAttrs<'_>, req: Option<&RequestAttrs<'_>>) -> Decision {
        for p in &self.dry_run {
            let matched = p.matches(c, req);
            tracing::info!(target: "mesh_agent::audit", policy = %p.name, action = ?p.action, matched, src = %c.src, dst = %c.dst, method = req.map(|r| r.method), path = req.map(|r| r.path), "dry-run policy evaluated (not enforced)");
        }
        for p in self.audit.iter().filter(|p| p.matches(c, req)) {
            tracing::info!(target: "mesh_agent::audit", policy = %p.name, src = %c.src, principal = c.peer.and_then(|p| p.principals.first()).map(String::as_str), dst = %c.dst, method = req.map(|r| r.method), path = req.map(|r| r.path), "audited");
        }
        self.decide(c, req)
    }

    /// [`WorkloadAuthz::check`] without the audit log: for re-judging live connections
    /// when policies change.
    pub fn decide(&self, c: &ConnAttrs<'_>, req: Option<&RequestAttrs<'_>>) -> Decision {
        if let Some(p) = self.deny.iter().find(|p| p.matches(c, req)) {
            return Decision::Deny(format!("{DENIED_BY}{}", p.name));
        }
        if self.allow.is_empty() || self.allow.iter().any(|p| p.matches(c, req)) {
            return Decision::Allow;
        }
        let names: Vec<&str> = self.allow.iter().map(|p| p.name.as_str()).collect();
        Decision::Deny(format!("no ALLOW policy matched ({})", names.join(", ")))
    }

    /// The verdict at connection accept, before any byte is read.
    pub fn check_connection(&self, c: &ConnAttrs<'_>) -> ConnVerdict {
        if self.is_empty() {
            return ConnVerdict::Decided(Decision::Allow);
        }
        if !self.has_http {
            return ConnVerdict::Decided(self.check(c, None));
        }
        ConnVerdict::PerRequest
    }

    /// Whether every plaintext connection to workload port `port` (0: any port the
    /// policies do not name) would be refused, whatever it carries: such connections
    /// can be dropped in the kernel before they reach user space.
    pub fn refuses_all_plaintext(&self, port: u16) -> bool {
        let denied_by_deny = self.deny.iter().any(|p| p.denies_everything_on(port));
        let nothing_allows = !self.allow.is_empty() && !self.allow.iter().any(|p| p.could_allow_plaintext(port));
        denied_by_deny || nothing_allows
    }

    /// Ports the enforcing policies name.
    pub fn named_ports(&self) -> BTreeSet<u16> {
        let mut out = BTreeSet::new();
        for p in self.deny.iter().chain(&self.allow) {
            p.named_ports(&mut out);
        }
        out
    }
}

/// A workload's security: its mTLS modes and its authorization policies.
#[derive(Debug, Default)]
pub struct WorkloadSecurity {
    /// PeerAuthentication, resolved.
    pub mtls: mtls::PortModes,
    /// AuthorizationPolicies selecting it.
    pub authz: WorkloadAuthz,
}

impl WorkloadSecurity {
    /// Whether plaintext to workload port `port` (0: ports nothing names) is always
    /// refused: STRICT, or no policy could allow a peer without an identity.
    pub fn refuses_all_plaintext(&self, port: u16) -> bool {
        let mode = if port == 0 { self.mtls.default } else { self.mtls.mode(port) };
        !mode.accepts_plaintext() || self.authz.refuses_all_plaintext(port)
    }

    /// The kernel's plaintext verdicts: `(default, per-port overrides)`, where `true`
    /// drops. Ports are listed where their verdict differs from the default.
    pub fn plaintext_verdicts(&self) -> (bool, Vec<(u16, bool)>) {
        let default = self.refuses_all_plaintext(0);
        let mut ports: BTreeSet<u16> = self.authz.named_ports();
        ports.extend(self.mtls.ports.keys());
        let overrides = ports
            .into_iter()
            .map(|p| (p, self.refuses_all_plaintext(p)))
            .filter(|(_, drop)| *drop != default)
            .collect();
        (default, overrides)
    }
}

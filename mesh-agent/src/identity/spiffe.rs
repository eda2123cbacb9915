//! SPIFFE identities: `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.

use std::fmt;
use std::sync::Arc;

use super::Error;

/// A workload identity as carried in a certificate's URI SAN.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    /// Trust domain, e.g. `cluster.local`.
    pub trust_domain: Arc<str>,
    /// Kubernetes namespace.
    pub namespace: Arc<str>,
    /// Kubernetes service account.
    pub service_account: Arc<str>,
}

impl Identity {
    /// A new identity.
    pub fn new(trust_domain: &str, namespace: &str, service_account: &str) -> Self {
        Self { trust_domain: trust_domain.into(), namespace: namespace.into(), service_account: service_account.into() }
    }

    /// Parses `spiffe://td/ns/x/sa/y`.
    pub fn parse(uri: &str) -> Result<Self, Error> {
        let bad = || Error::InvalidSpiffe(uri.to_string());
        let rest = uri.strip_prefix("spiffe://").ok_or_else(bad)?;
        let parts: Vec<&str> = rest.split('/').collect();
        match parts.as_slice() {
            [td, "ns", ns, "sa", sa] if trust_domain_ok(td) && segment_ok(ns) && segment_ok(sa) => {
                Ok(Self::new(td, ns, sa))
            }
            _ => Err(bad()),
        }
    }

    /// The principal form AuthorizationPolicy uses: the URI without `spiffe://`.
    pub fn principal(&self) -> String {
        format!("{}/ns/{}/sa/{}", self.trust_domain, self.namespace, self.service_account)
    }
}

/// Checks a trust domain given on the command line: the same rule a peer's identity
/// is read with, so the mesh never issues identities it would refuse.
pub fn parse_trust_domain(td: &str) -> Result<String, String> {
    if trust_domain_ok(td) {
        Ok(td.to_string())
    } else {
        Err(format!("trust domain {td:?} must be non-empty lower-case letters, digits, '.', '-' or '_' (SPIFFE)"))
    }
}

/// The SPIFFE ID spec's trust domain characters: lower-case letters, digits, `.`, `-`
/// and `_`. Nothing a peer's certificate carries reaches logs, metric labels or policy
/// matching with any other byte.
fn trust_domain_ok(td: &str) -> bool {
    !td.is_empty()
        && td.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_'))
}

/// The SPIFFE ID spec's path segment characters (letters, digits, `.`, `-`, `_`), and
/// not a dot segment.
fn segment_ok(segment: &str) -> bool {
    !matches!(segment, "" | "." | "..")
        && segment.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "spiffe://{}/ns/{}/sa/{}", self.trust_domain, self.namespace, self.service_account)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_spiffe_uri() {
        let id = Identity::parse("spiffe://cluster.local/ns/production/sa/frontend").unwrap();
        assert_eq!(&*id.namespace, "production");
        assert_eq!(id.principal(), "cluster.local/ns/production/sa/frontend");
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/production/sa/frontend");
    }

    #[test]
    fn rejects_malformed_uris() {
        for bad in [
            "cluster.local/ns/a/sa/b",
            "spiffe://cluster.local/ns/a",
            "spiffe:///ns/a/sa/b",
            "spiffe://td/ns/a/sa/b/extra",
            "spiffe://td/sa/a/ns/b",
            "spiffe://Cluster.local/ns/a/sa/b",
            "spiffe://td/ns/a b/sa/c",
            "spiffe://td/ns/a/sa/b\nforged=1",
            "spiffe://td/ns/../sa/b",
            "spiffe://td:8080/ns/a/sa/b",
            "spiffe://td/ns/a%2F/sa/b",
        ] {
            assert!(Identity::parse(bad).is_err(), "{bad} accepted");
        }
    }
}

//! What a gateway serves, compiled: per Gateway, its servers as written, and per server
//! port the virtual hosts that the VirtualServices bound to it route (each VirtualService
//! host that a server host covers, as Istio builds a gateway's routes).

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::config::gateway::Server;
use crate::state::Workload;

use super::route::{ServiceRoutes, TcpRule, WeightedBackend};

/// One Gateway as a gateway workload serves it.
#[derive(Debug, Clone)]
pub struct CompiledGateway {
    /// `namespace/name` of the Gateway.
    pub key: String,
    /// Labels of the workloads that serve it.
    pub selector: BTreeMap<String, String>,
    /// The namespace those workloads must be in (a Gateway API Gateway's own); any when
    /// unset, as Istio's Gateway selector.
    pub namespace: Option<String>,
    /// The servers as written (ports, hosts, TLS).
    pub servers: Vec<Server>,
    /// Per server port, the virtual hosts bound VirtualServices route there.
    pub routes: BTreeMap<u16, PortRoutes>,
}

impl CompiledGateway {
    /// Whether `workload` serves this Gateway.
    pub fn selects(&self, workload: &Workload) -> bool {
        self.namespace.as_ref().is_none_or(|ns| *ns == workload.namespace)
            && self.selector.iter().all(|(k, v)| workload.labels.get(k) == Some(v))
    }
}

/// The virtual hosts of one gateway port.
#[derive(Debug, Clone, Default)]
pub struct PortRoutes {
    /// `(domain, routes)`: an exact name, `*.suffix` or `*`, in the order added (the
    /// first VirtualService for a domain, by namespace/name, keeps it).
    pub hosts: Vec<(String, Arc<ServiceRoutes>)>,
    /// Host patterns of plaintext servers with `httpsRedirect`: answered with a 301 to
    /// https before any route.
    pub https_redirect: Vec<String>,
    /// `(SNI pattern, owner, destinations)` of the TLS routes of PASSTHROUGH servers, in
    /// the order added.
    pub sni: Vec<(String, String, Vec<WeightedBackend>)>,
    /// The `tcp:` rules of the VirtualServices bound to a TCP server of this port, in
    /// order (VirtualServices by namespace/name): the first that matches takes it.
    pub tcp: Vec<TcpRule>,
}

impl PortRoutes {
    /// Where a passed-through TLS connection for `sni` goes: an exact name first, then
    /// the longest `*.suffix`, then `*`.
    pub fn for_sni(&self, sni: &str) -> Option<&[WeightedBackend]> {
        let exact = self.sni.iter().find(|(d, _, _)| d.eq_ignore_ascii_case(sni));
        let wildcard = || {
            self.sni
                .iter()
                .filter(|(d, _, _)| d.strip_prefix('*').is_some_and(|s| s.is_empty() || covers(d, sni)))
                .max_by_key(|(d, _, _)| d.len())
        };
        exact.or_else(wildcard).map(|(_, _, b)| b.as_slice())
    }

    /// Whether plain HTTP for `host` is sent to https.
    pub fn redirects(&self, host: &str) -> bool {
        self.https_redirect.iter().any(|p| covers(p, host))
    }

    /// Adds `routes` for `domain` unless a VirtualService already serves it; returns
    /// the owner that keeps it when there is a clash.
    pub fn add(&mut self, domain: String, routes: Arc<ServiceRoutes>) -> Option<&str> {
        match self.hosts.iter().position(|(d, _)| d.eq_ignore_ascii_case(&domain)) {
            Some(i) => {
                let existing = &self.hosts[i].1.virtual_service;
                (*existing != routes.virtual_service).then_some(existing.as_str())
            }
            None => {
                self.hosts.push((domain, routes));
                None
            }
        }
    }

    /// The routes for a request's host (port stripped, any case): an exact domain first,
    /// then the longest `*.suffix`, then `*`, as Envoy picks a virtual host.
    pub fn for_host(&self, host: &str) -> Option<&Arc<ServiceRoutes>> {
        let host = host.to_ascii_lowercase();
        let exact = self.hosts.iter().find(|(d, _)| d.eq_ignore_ascii_case(&host));
        let wildcard = || {
            self.hosts
                .iter()
                .filter(|(d, _)| {
                    d.strip_prefix('*').is_some_and(|s| !s.is_empty() && host.ends_with(&s.to_ascii_lowercase()))
                })
                .max_by_key(|(d, _)| d.len())
        };
        let any = || self.hosts.iter().find(|(d, _)| d == "*");
        exact.or_else(wildcard).or_else(any).map(|(_, r)| r)
    }
}

/// The domains a VirtualService in `vs_namespace` with `vs_hosts` serves on a server
/// with `server_hosts` of a Gateway in `gateway_namespace`: each VirtualService host a
/// server host covers (or the server host, where the VirtualService's is the wider).
/// A server host's `namespace/` part limits which namespaces' VirtualServices it takes.
pub fn serve_domains(
    server_hosts: &[String],
    gateway_namespace: &str,
    vs_hosts: &[String],
    vs_namespace: &str,
) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for h in server_hosts {
        let (ns, server_host) = h.split_once('/').unwrap_or(("*", h));
        let visible = ns == "*" || (ns == "." && gateway_namespace == vs_namespace) || ns == vs_namespace;
        if !visible {
            continue;
        }
        for v in vs_hosts {
            let domain = if covers(server_host, v) {
                v.clone()
            } else if covers(v, server_host) {
                server_host.to_string()
            } else {
                continue;
            };
            if !out.iter().any(|d| d.eq_ignore_ascii_case(&domain)) {
                out.push(domain);
            }
        }
    }
    out
}

/// Whether host pattern `wide` covers every name `narrow` can be.
fn covers(wide: &str, narrow: &str) -> bool {
    let (wide, narrow) = (wide.to_ascii_lowercase(), narrow.to_ascii_lowercase());
    match wide.strip_prefix('*') {
        Some("") => true,
        Some(suffix) => narrow.ends_with(suffix),
        None => wide == narrow,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routes(owner: &str) -> Arc<ServiceRoutes> {
        Arc::new(ServiceRoutes { virtual_service: owner.into(), rules: Vec::new(), tcp: Vec::new() })
    }

    #[test]
    fn domains_are_the_virtual_service_hosts_the_server_serves() {
        let server = ["myapp.example.com".to_string()];
        let vs = ["myapp".to_string(), "myapp.example.com".to_string()];
        assert_eq!(serve_domains(&server, "production", &vs, "production"), ["myapp.example.com"]);
        let wildcard = ["production/*.example.com".to_string()];
        assert_eq!(serve_domains(&wildcard, "istio-ingress", &vs, "production"), ["myapp.example.com"]);
        assert!(serve_domains(&wildcard, "istio-ingress", &vs, "other").is_empty(), "another namespace's");
        let here = ["./*".to_string()];
        assert!(serve_domains(&here, "istio-ingress", &vs, "production").is_empty());
        assert_eq!(serve_domains(&["*".into()], "a", &["*".into()], "b"), ["*"]);
        assert_eq!(
            serve_domains(&["shop.example.com".into()], "a", &["*.example.com".into()], "a"),
            ["shop.example.com"]
        );
    }

    #[test]
    fn a_request_host_finds_the_most_specific_domain() {
        let mut port = PortRoutes::default();
        assert_eq!(port.add("*".into(), routes("ns/any")), None);
        assert_eq!(port.add("*.example.com".into(), routes("ns/wild")), None);
        assert_eq!(port.add("shop.example.com".into(), routes("ns/shop")), None);
        assert_eq!(port.add("SHOP.example.com".into(), routes("ns/late")), Some("ns/shop"), "first owner keeps it");
        let owner = |h: &str| port.for_host(h).map(|r| r.virtual_service.clone());
        assert_eq!(owner("Shop.Example.com").as_deref(), Some("ns/shop"));
        assert_eq!(owner("cart.example.com").as_deref(), Some("ns/wild"));
        assert_eq!(owner("example.org").as_deref(), Some("ns/any"));
    }
}

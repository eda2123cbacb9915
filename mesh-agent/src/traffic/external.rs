//! ServiceEntries compiled for the outbound path: which entry an address or a host name
//! (with a port) belongs to, for a pod in a given namespace, and where a connection to
//! it goes.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;

use crate::config::service_entry::{Resolution, ServiceEntry};

/// One ServiceEntry, ready for lookups.
#[derive(Debug, Clone, PartialEq)]
pub struct ExternalService {
    /// `namespace/name` of the entry.
    pub key: String,
    /// The first host: what metrics call the destination.
    pub host: String,
    hosts: Vec<String>,
    addresses: Vec<IpNet>,
    ports: Vec<ExternalPort>,
    /// Where the destinations are found.
    pub resolution: Resolution,
    endpoints: Vec<ExternalEndpoint>,
    namespace: String,
    /// Namespaces that see it; None: all.
    export_to: Option<Vec<String>>,
}

/// A port an entry serves.
#[derive(Debug, Clone, PartialEq)]
struct ExternalPort {
    number: u16,
    name: Option<String>,
    target: Option<u16>,
}

/// An endpoint of an entry: an IP (STATIC) or a name (DNS), and its own port numbers.
#[derive(Debug, Clone, PartialEq)]
struct ExternalEndpoint {
    address: String,
    ports: BTreeMap<String, u16>,
}

/// Where a connection to an entry goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExternalTarget {
    /// The address the pod dialed (resolution NONE).
    Dialed(SocketAddr),
    /// These addresses, tried in turn (STATIC).
    Addresses(Vec<SocketAddr>),
    /// `host:port`, looked up when the connection is made (DNS).
    Lookup(String, u16),
}

impl ExternalService {
    /// Compiles a validated entry.
    pub fn compile(e: &ServiceEntry) -> Self {
        let namespace = e.metadata.namespace_or_default();
        let export_to = (!e.spec.export_to.is_empty() && !e.spec.export_to.iter().any(|x| x == "*"))
            .then(|| e.spec.export_to.iter().map(|x| if x == "." { namespace.clone() } else { x.clone() }).collect());
        Self {
            key: e.metadata.key(),
            host: e.spec.hosts.first().cloned().unwrap_or_default(),
            hosts: e.spec.hosts.iter().map(|h| h.to_ascii_lowercase()).collect(),
            addresses: e
                .spec
                .addresses
                .iter()
                .filter_map(|a| a.parse::<IpNet>().ok().or_else(|| a.parse::<IpAddr>().ok().map(IpNet::from)))
                .collect(),
            ports: e
                .spec
                .ports
                .iter()
                .filter_map(|p| {
                    Some(ExternalPort {
                        number: u16::try_from(p.number).ok()?,
                        name: p.name.clone(),
                        target: p.target_port.and_then(|t| u16::try_from(t).ok()),
                    })
                })
                .collect(),
            resolution: e.spec.resolution(),
            endpoints: e
                .spec
                .endpoints
                .iter()
                .filter_map(|ep| {
                    Some(ExternalEndpoint {
                        address: ep.address.clone()?,
                        ports: ep
                            .ports
                            .iter()
                            .filter_map(|(n, p)| Some((n.clone(), u16::try_from(*p).ok()?)))
                            .collect(),
                    })
                })
                .collect(),
            namespace,
            export_to,
        }
    }

    /// Whether pods of `namespace` see the entry (`exportTo`).
    fn visible_to(&self, namespace: &str) -> bool {
        self.export_to.as_ref().is_none_or(|to| to.iter().any(|n| n == namespace))
    }

    fn port(&self, number: u16) -> Option<&ExternalPort> {
        self.ports.iter().find(|p| p.number == number)
    }

    /// Whether the entry names `host` (exactly, or under a `*.` wildcard).
    fn names(&self, host: &str) -> bool {
        self.hosts.iter().any(|h| match h.strip_prefix("*.") {
            Some(suffix) => {
                host.len() > suffix.len() + 1
                    && host.ends_with(suffix)
                    && host.as_bytes()[host.len() - suffix.len() - 1] == b'.'
            }
            None => h == host,
        })
    }

    /// Where a connection the pod made to `dialed` (port served by the entry) goes;
    /// `host` is the name it asked for (Host header or SNI), when known.
    pub fn target(&self, dialed: SocketAddr, host: Option<&str>) -> ExternalTarget {
        let Some(port) = self.port(dialed.port()) else { return ExternalTarget::Dialed(dialed) };
        let endpoint_port = |e: &ExternalEndpoint| {
            port.name.as_ref().and_then(|n| e.ports.get(n)).copied().or(port.target).unwrap_or(port.number)
        };
        match self.resolution {
            Resolution::None => ExternalTarget::Dialed(dialed),
            Resolution::Static => ExternalTarget::Addresses(
                self.endpoints
                    .iter()
                    .filter_map(|e| Some(SocketAddr::new(e.address.parse().ok()?, endpoint_port(e))))
                    .collect(),
            ),
            Resolution::Dns => match self.endpoints.first() {
                Some(e) => ExternalTarget::Lookup(e.address.clone(), endpoint_port(e)),
                // No endpoints: the host itself, the one asked for when it is a wildcard's.
                None => {
                    let name = host.filter(|_| self.host.starts_with("*.")).unwrap_or(&self.host);
                    ExternalTarget::Lookup(name.to_string(), port.target.unwrap_or(port.number))
                }
            },
        }
    }
}

/// Every ServiceEntry, in `namespace/name` order (the first that matches wins, so the
/// answer does not depend on the order objects arrived in).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ExternalServices {
    entries: Vec<ExternalService>,
}

impl ExternalServices {
    /// The registry of `entries` (validated).
    pub fn new<'a>(entries: impl IntoIterator<Item = &'a ServiceEntry>) -> Self {
        let mut entries: Vec<ExternalService> = entries.into_iter().map(ExternalService::compile).collect();
        entries.sort_by(|a, b| a.key.cmp(&b.key));
        Self { entries }
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The entry whose `addresses` hold `dst` and that serves its port, as pods of
    /// `namespace` see them.
    pub fn by_address(&self, dst: SocketAddr, namespace: &str) -> Option<&ExternalService> {
        let ip = dst.ip().to_canonical();
        self.entries.iter().find(|e| {
            e.visible_to(namespace) && e.port(dst.port()).is_some() && e.addresses.iter().any(|n| n.contains(&ip))
        })
    }

    /// The entry without `addresses` that names `host` on `port`: such entries are
    /// matched by the name a connection carries (HTTP Host, TLS SNI).
    pub fn by_host(&self, host: &str, port: u16, namespace: &str) -> Option<&ExternalService> {
        let host = host.to_ascii_lowercase();
        self.entries
            .iter()
            .find(|e| e.visible_to(namespace) && e.addresses.is_empty() && e.port(port).is_some() && e.names(&host))
    }

    /// The entries (`namespace/name`) that list `host` as written: what a
    /// DestinationRule for `host` configures.
    pub fn keys_naming(&self, host: &str) -> Vec<String> {
        let host = host.to_ascii_lowercase();
        self.entries.iter().filter(|e| e.hosts.contains(&host)).map(|e| e.key.clone()).collect()
    }

    /// The entry that declares `host` on `port`, addresses or not: where a route whose
    /// destination is `host` goes.
    pub fn by_name(&self, host: &str, port: u16, namespace: &str) -> Option<&ExternalService> {
        let host = host.to_ascii_lowercase();
        self.entries.iter().find(|e| e.visible_to(namespace) && e.port(port).is_some() && e.names(&host))
    }

    /// Whether a name on `port` could match an entry: only then is a connection to an
    /// unknown address worth reading for its Host or SNI.
    pub fn has_named_port(&self, port: u16, namespace: &str) -> bool {
        self.entries.iter().any(|e| e.visible_to(namespace) && e.addresses.is_empty() && e.port(port).is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Object, parse_documents};

    fn registry(yaml: &str) -> ExternalServices {
        let objects = parse_documents(std::path::Path::new("se.yaml"), yaml).unwrap();
        ExternalServices::new(objects.iter().filter_map(|o| match o {
            Object::ServiceEntry(e) => Some(&**e),
            _ => None,
        }))
    }

    const ENTRIES: &str = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: api, namespace: shop}
spec:
  hosts: [api.example.com]
  ports: [{number: 443, name: tls, protocol: TLS}]
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: wild, namespace: shop}
spec:
  hosts: ["*.partner.example"]
  ports: [{number: 80, name: http, protocol: HTTP}]
  exportTo: ["."]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: db, namespace: data}
spec:
  hosts: [db.internal]
  addresses: [192.0.2.0/28]
  ports: [{number: 5432, name: tcp, targetPort: 6432}]
  resolution: STATIC
  endpoints: [{address: 10.1.0.5, ports: {tcp: 15432}}, {address: 10.1.0.6}]
"#;

    #[test]
    fn addresses_names_ports_and_export_decide_which_entry_applies() {
        let r = registry(ENTRIES);
        let db = r.by_address("192.0.2.9:5432".parse().unwrap(), "shop").unwrap();
        assert_eq!(db.key, "data/db");
        assert_eq!(r.by_address("192.0.2.9:5433".parse().unwrap(), "shop"), None, "a port it does not serve");
        assert_eq!(r.by_address("192.0.2.99:5432".parse().unwrap(), "shop"), None, "outside the block");
        assert_eq!(r.by_host("API.example.com", 443, "any").unwrap().key, "shop/api");
        assert_eq!(r.by_host("api.example.com", 80, "any"), None);
        assert_eq!(r.by_host("a.partner.example", 80, "shop").unwrap().key, "shop/wild");
        assert_eq!(r.by_host("a.partner.example", 80, "other"), None, "exportTo: [.]");
        assert_eq!(r.by_host("partner.example", 80, "shop"), None, "a wildcard needs a label before it");
        assert_eq!(r.by_host("db.internal", 5432, "shop"), None, "entries with addresses match by address");
        assert!(r.has_named_port(80, "shop") && !r.has_named_port(80, "other") && !r.has_named_port(5432, "shop"));
    }

    #[test]
    fn resolution_says_where_the_connection_goes() {
        let r = registry(ENTRIES);
        let dialed: SocketAddr = "192.0.2.9:5432".parse().unwrap();
        let db = r.by_address(dialed, "shop").unwrap();
        let expected = vec!["10.1.0.5:15432".parse().unwrap(), "10.1.0.6:6432".parse().unwrap()];
        assert_eq!(db.target(dialed, None), ExternalTarget::Addresses(expected));
        let api = r.by_host("api.example.com", 443, "shop").unwrap();
        let dialed: SocketAddr = "203.0.113.5:443".parse().unwrap();
        assert_eq!(api.target(dialed, Some("api.example.com")), ExternalTarget::Lookup("api.example.com".into(), 443));
        let wild = r.by_host("a.partner.example", 80, "shop").unwrap();
        let dialed: SocketAddr = "203.0.113.6:80".parse().unwrap();
        assert_eq!(wild.target(dialed, Some("a.partner.example")), ExternalTarget::Dialed(dialed));
    }
}

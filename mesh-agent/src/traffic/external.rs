//! ServiceEntries compiled for the outbound path: which entry an address or a host name
//! (with a port) belongs to, for a pod in a given namespace, and where a connection to
//! it goes; and the addresses the DNS proxy gives their hosts.
//!
//! Hosts of entries without `addresses` (resolution STATIC or DNS, not wildcards) get
//! an address of their own from 240.240.0.0/16 (class E, never routed), as Istio's DNS
//! auto-allocation does: a pod that looks such a host up through the DNS proxy
//! connects to that address, and the connection is known to be for the entry by its
//! address alone, TCP included.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

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
    /// Addresses given to its hosts (auto-allocation), by host.
    allocated: Vec<(String, IpAddr)>,
    /// `metadata.creationTimestamp`: older entries keep their allocated addresses.
    created: Option<String>,
}

/// A port an entry serves.
#[derive(Debug, Clone, PartialEq)]
struct ExternalPort {
    number: u16,
    name: Option<String>,
    target: Option<u16>,
    /// Declared HTTP, HTTP2, gRPC or gRPC-Web: requests can be read one by one.
    http: bool,
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
                        http: p.protocol.as_deref().is_some_and(crate::config::is_plain_http_protocol),
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
            allocated: Vec::new(),
            created: e.metadata.creation_timestamp.clone(),
        }
    }

    /// Whether its hosts get allocated addresses: no `addresses` of its own, and
    /// somewhere to send the connections (not NONE, which goes where the pod dialed).
    fn wants_allocation(&self) -> bool {
        self.addresses.is_empty() && self.resolution != Resolution::None
    }

    /// The addresses the DNS proxy answers for `host` (a host it names): its own
    /// `addresses` that are single IPs, else the one allocated to the host.
    fn dns_addresses(&self, host: &str) -> Vec<IpAddr> {
        if !self.addresses.is_empty() {
            return self.addresses.iter().filter(|n| n.prefix_len() == n.max_prefix_len()).map(IpNet::addr).collect();
        }
        self.allocated.iter().filter(|(h, _)| h == host).map(|(_, ip)| *ip).collect()
    }

    /// Whether `ip` is one of its addresses, given or allocated.
    fn holds(&self, ip: &IpAddr) -> bool {
        self.addresses.iter().any(|n| n.contains(ip)) || self.allocated.iter().any(|(_, a)| a == ip)
    }

    /// The entry's namespace.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// Whether pods of `namespace` see the entry (`exportTo`).
    fn visible_to(&self, namespace: &str) -> bool {
        self.export_to.as_ref().is_none_or(|to| to.iter().any(|n| n == namespace))
    }

    /// Whether connections to `port` are read request by request at the source: the
    /// port declares an HTTP protocol, and the entry's name is a plain host (a
    /// wildcard's requests would be named by whatever Host a client sends, which must
    /// not become a metric label).
    pub fn serves_http(&self, port: u16) -> bool {
        !self.host.starts_with('*') && self.port(port).is_some_and(|p| p.http)
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
                // No endpoints: the host itself: the one its allocated address stands
                // for, or the one asked for when it is a wildcard's.
                None => {
                    let dialed_ip = dialed.ip().to_canonical();
                    let name = match self.allocated.iter().find(|(_, ip)| *ip == dialed_ip) {
                        Some((allocated_for, _)) => allocated_for.as_str(),
                        None => host.filter(|_| self.host.starts_with("*.")).unwrap_or(&self.host),
                    };
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
        allocate_addresses(&mut entries);
        entries.sort_by(|a, b| a.key.cmp(&b.key));
        Self { entries }
    }

    /// The addresses the DNS proxy answers for `host` to a pod of `namespace`: those of
    /// the first entry it sees that names the host and has any; None when no entry
    /// knows (the query goes upstream).
    pub fn dns_addresses(&self, host: &str, namespace: &str) -> Option<Vec<IpAddr>> {
        self.entries
            .iter()
            .filter(|e| e.visible_to(namespace) && e.names(host))
            .map(|e| e.dns_addresses(host))
            .find(|a| !a.is_empty())
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The entry whose `addresses` hold `dst` and that serves its port, as pods of
    /// `namespace` see them.
    pub fn by_address(&self, dst: SocketAddr, namespace: &str) -> Option<&ExternalService> {
        let ip = dst.ip().to_canonical();
        self.entries.iter().find(|e| e.visible_to(namespace) && e.port(dst.port()).is_some() && e.holds(&ip))
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

/// Addresses 240.240.0.1 to 240.240.255.254: one per host.
const ALLOCATION_SLOTS: u32 = 65534;

/// Gives every host of the entries that want it ([`ExternalService::wants_allocation`])
/// an address in 240.240.0.0/16: at a slot its name hashes to, or the next free one.
/// The same host in two entries gets the same address. Entries are served oldest
/// first, so one created later can never move an address an older entry's host had
/// (which pods may still hold from an earlier answer) onto a host of its own.
fn allocate_addresses(entries: &mut [ExternalService]) {
    let mut order: Vec<usize> = (0..entries.len()).filter(|i| entries[*i].wants_allocation()).collect();
    order.sort_by(|a, b| {
        let (a, b) = (&entries[*a], &entries[*b]);
        // An entry without a timestamp (read from files) sorts by its key alone.
        (a.created.is_none(), &a.created, &a.key).cmp(&(b.created.is_none(), &b.created, &b.key))
    });
    let mut by_host: HashMap<String, IpAddr> = HashMap::new();
    let mut taken: std::collections::HashSet<u32> = std::collections::HashSet::new();
    for i in order {
        let hosts: Vec<String> = entries[i].hosts.iter().filter(|h| !h.starts_with('*')).cloned().collect();
        for host in hosts {
            let ip = match by_host.get(&host) {
                Some(ip) => *ip,
                None if taken.len() >= ALLOCATION_SLOTS as usize => continue,
                None => {
                    let mut slot = fnv1a(host.as_bytes()) % ALLOCATION_SLOTS;
                    while !taken.insert(slot) {
                        slot = (slot + 1) % ALLOCATION_SLOTS;
                    }
                    let n = slot + 1;
                    let ip = IpAddr::V4(Ipv4Addr::new(240, 240, (n >> 8) as u8, n as u8));
                    by_host.insert(host.clone(), ip);
                    ip
                }
            };
            entries[i].allocated.push((host, ip));
        }
    }
}

/// FNV-1a: a stable hash, the same in every agent and every run.
fn fnv1a(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c_9dc5_u32, |h, b| (h ^ u32::from(*b)).wrapping_mul(0x0100_0193))
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

    fn entry(name: &str, host: &str, created: &str) -> String {
        format!(
            "---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\n\
             metadata: {{name: {name}, namespace: shop, creationTimestamp: \"{created}\"}}\n\
             spec: {{hosts: [{host}], ports: [{{number: 443, name: tls, protocol: TLS}}], resolution: DNS}}\n"
        )
    }

    #[test]
    fn allocated_addresses_are_stable_and_never_move_to_a_newer_entry() {
        let r = registry(&entry("a", "one.example", "2026-01-01T00:00:00Z"));
        let one = r.dns_addresses("one.example", "shop").unwrap();
        assert_eq!(one.len(), 1);
        // Every host hashes somewhere; find one that lands on one.example's slot.
        let rival = (0..200_000)
            .map(|i| format!("h{i}.example"))
            .find(|h| fnv1a(h.as_bytes()) % ALLOCATION_SLOTS == fnv1a(b"one.example") % ALLOCATION_SLOTS)
            .expect("a colliding host");
        // Newer, and sorting first by name: it still takes the next slot, not one's.
        let both = registry(&format!(
            "{}{}",
            entry("a", "one.example", "2026-01-01T00:00:00Z"),
            entry("0-rival", &rival, "2026-06-01T00:00:00Z")
        ));
        assert_eq!(both.dns_addresses("one.example", "shop").unwrap(), one);
        let theirs = both.dns_addresses(&rival, "shop").unwrap();
        assert_ne!(theirs, one);
        // The same host in two entries has one address.
        let twice = registry(&format!(
            "{}{}",
            entry("a", "one.example", "2026-01-01T00:00:00Z"),
            entry("b", "one.example", "2026-02-01T00:00:00Z")
        ));
        assert_eq!(twice.dns_addresses("one.example", "shop").unwrap(), one);
        let dialed = SocketAddr::new(one[0], 443);
        assert_eq!(twice.by_address(dialed, "shop").unwrap().key, "shop/a");
        assert_eq!(twice.by_address(SocketAddr::new(one[0], 80), "shop"), None, "a port it does not serve");
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

//! Istio `ServiceEntry` (`networking.istio.io` v1, v1beta1, v1alpha3): hosts outside
//! the mesh's Services that pods may reach, where they are (`addresses`, `endpoints`)
//! and how they are found (`resolution`).
//!
//! What the agents do with it: an enrolled pod's connection to an address or host a
//! ServiceEntry declares goes where the entry says; under `outboundTrafficPolicy`
//! REGISTRY_ONLY, it is what makes a destination outside the cluster reachable at all.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::resource::Resource;
use super::schema::Invalid;

/// `ServiceEntry`.
pub type ServiceEntry = Resource<ServiceEntrySpec>;

/// `ServiceEntry.spec`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceEntrySpec {
    /// Host names (`api.example.com`, `*.example.com`), matched against the HTTP Host
    /// header or the TLS SNI when `addresses` is empty.
    #[serde(default)]
    pub hosts: Vec<String>,
    /// IPs or CIDR blocks the hosts are reached at.
    #[serde(default)]
    pub addresses: Vec<String>,
    /// The ports served.
    #[serde(default)]
    pub ports: Vec<EntryPort>,
    /// `MESH_EXTERNAL` (default) or `MESH_INTERNAL`.
    #[serde(default)]
    pub location: Option<String>,
    /// `NONE` (default: the address the pod dialed), `STATIC` (the endpoints), `DNS` or
    /// `DNS_ROUND_ROBIN` (the endpoints' names, or the host, looked up on connect).
    #[serde(default)]
    pub resolution: Option<String>,
    /// Where the hosts are served.
    #[serde(default)]
    pub endpoints: Vec<EntryEndpoint>,
    /// Namespaces whose pods see the entry: `*` (default), `.` (its own), or names.
    #[serde(default)]
    pub export_to: Vec<String>,
    /// Pods as endpoints: not supported yet, refused.
    #[serde(default)]
    pub workload_selector: Option<super::schema::AnyValue>,
    /// Identities the endpoints must present over mTLS: not supported yet, refused.
    #[serde(default)]
    pub subject_alt_names: Vec<String>,
}

/// `ServicePort` of a ServiceEntry.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EntryPort {
    /// The port pods dial.
    pub number: u32,
    /// `HTTP`, `HTTPS`, `HTTP2`, `GRPC`, `TLS`, `TCP`, `MONGO`, `MYSQL`, `REDIS`.
    #[serde(default)]
    pub protocol: Option<String>,
    /// Name, unique in the entry; endpoints map it to their own port.
    #[serde(default)]
    pub name: Option<String>,
    /// The endpoints' port when they do not name one.
    #[serde(default)]
    pub target_port: Option<u32>,
}

/// `WorkloadEntry` inline: one endpoint of a ServiceEntry.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EntryEndpoint {
    /// An IP (STATIC) or a host name (DNS).
    #[serde(default)]
    pub address: Option<String>,
    /// Port name to the endpoint's port.
    #[serde(default)]
    pub ports: BTreeMap<String, u32>,
    /// Labels, for DestinationRule subsets: not supported yet, refused.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Network (multi-network meshes): not supported yet, refused.
    #[serde(default)]
    pub network: Option<String>,
    /// Locality: not supported yet, refused.
    #[serde(default)]
    pub locality: Option<String>,
    /// Load-balancing weight.
    #[serde(default)]
    pub weight: Option<u32>,
    /// Service account (mTLS to the endpoint): not supported yet, refused.
    #[serde(default)]
    pub service_account: Option<String>,
}

/// How an entry's destinations are found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolution {
    /// The address the pod dialed.
    None,
    /// The endpoints' IPs.
    Static,
    /// The endpoints' names (or the host) looked up when a connection is made.
    Dns,
}

/// A host name as entries and VirtualServices write it: DNS labels, optionally led by
/// `*.`.
fn valid_host(h: &str) -> bool {
    let name = h.strip_prefix("*.").unwrap_or(h);
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

impl ServiceEntrySpec {
    /// `resolution` (of a validated entry).
    pub fn resolution(&self) -> Resolution {
        self.parse_resolution().unwrap_or(Resolution::None)
    }

    fn parse_resolution(&self) -> Result<Resolution, Invalid> {
        match self.resolution.as_deref().unwrap_or("NONE") {
            "NONE" => Ok(Resolution::None),
            "STATIC" => Ok(Resolution::Static),
            "DNS" | "DNS_ROUND_ROBIN" => Ok(Resolution::Dns),
            other => Err(("spec.resolution".into(), format!("{other:?} is not NONE, STATIC, DNS or DNS_ROUND_ROBIN"))),
        }
    }

    /// Whether the entry is inside the mesh (`MESH_INTERNAL`).
    pub fn is_internal(&self) -> bool {
        self.location.as_deref() == Some("MESH_INTERNAL")
    }

    /// Istio's checks of a ServiceEntry, and refusals of what the agent does not do yet.
    pub(super) fn validate(&self) -> Result<(), Invalid> {
        let resolution = self.parse_resolution()?;
        if self.hosts.is_empty() {
            return Err(("spec.hosts".into(), "at least one host is required".into()));
        }
        for (i, h) in self.hosts.iter().enumerate() {
            if !valid_host(h) {
                return Err((format!("spec.hosts[{i}]"), format!("{h:?} is not a host name (`*.` may lead it)")));
            }
            if h.starts_with("*.") && resolution == Resolution::Dns && self.endpoints.is_empty() {
                return Err((
                    format!("spec.hosts[{i}]"),
                    "a wildcard host cannot be looked up: DNS resolution needs endpoints".into(),
                ));
            }
        }
        for (i, a) in self.addresses.iter().enumerate() {
            if a.parse::<std::net::IpAddr>().is_err() && a.parse::<ipnet::IpNet>().is_err() {
                return Err((format!("spec.addresses[{i}]"), format!("{a:?} is not an IP address or CIDR block")));
            }
        }
        match self.location.as_deref() {
            None | Some("MESH_EXTERNAL" | "MESH_INTERNAL") => {}
            Some(other) => {
                return Err(("spec.location".into(), format!("{other:?} is not MESH_EXTERNAL or MESH_INTERNAL")));
            }
        }
        if self.ports.is_empty() {
            return Err(("spec.ports".into(), "at least one port is required".into()));
        }
        let mut numbers = std::collections::HashSet::new();
        let mut names = std::collections::HashSet::new();
        for (i, p) in self.ports.iter().enumerate() {
            if !(1..=65535).contains(&p.number) {
                return Err((format!("spec.ports[{i}].number"), "must be between 1 and 65535".into()));
            }
            if !numbers.insert(p.number) {
                return Err((format!("spec.ports[{i}].number"), format!("port {} is listed twice", p.number)));
            }
            if let Some(t) = p.target_port
                && !(1..=65535).contains(&t)
            {
                return Err((format!("spec.ports[{i}].targetPort"), "must be between 1 and 65535".into()));
            }
            if let Some(n) = &p.name
                && !names.insert(n.as_str())
            {
                return Err((format!("spec.ports[{i}].name"), format!("port name {n:?} is used twice")));
            }
            const PROTOCOLS: &[&str] =
                &["HTTP", "HTTPS", "HTTP2", "GRPC", "GRPC-WEB", "TLS", "TCP", "MONGO", "MYSQL", "REDIS"];
            if let Some(proto) = &p.protocol
                && !PROTOCOLS.contains(&proto.to_ascii_uppercase().as_str())
            {
                return Err((
                    format!("spec.ports[{i}].protocol"),
                    format!("{proto:?} is not one of {}", PROTOCOLS.join(", ")),
                ));
            }
        }
        match resolution {
            Resolution::None if !self.endpoints.is_empty() => {
                return Err((
                    "spec.endpoints".into(),
                    "resolution NONE uses the address the pod dialed: endpoints are not allowed".into(),
                ));
            }
            Resolution::Static if self.endpoints.is_empty() => {
                return Err(("spec.endpoints".into(), "resolution STATIC needs at least one endpoint".into()));
            }
            _ => {}
        }
        for (i, e) in self.endpoints.iter().enumerate() {
            let at = |f: &str| format!("spec.endpoints[{i}].{f}");
            let Some(address) = e.address.as_deref().filter(|a| !a.is_empty()) else {
                return Err((at("address"), "required field is missing".into()));
            };
            match resolution {
                Resolution::Static if address.parse::<std::net::IpAddr>().is_err() => {
                    return Err((at("address"), format!("{address:?}: resolution STATIC needs IP addresses")));
                }
                Resolution::Dns if address.parse::<std::net::IpAddr>().is_err() && !valid_host(address) => {
                    return Err((at("address"), format!("{address:?} is not an IP address or host name")));
                }
                _ => {}
            }
            for (name, port) in &e.ports {
                if !(1..=65535).contains(port) {
                    return Err((at(&format!("ports.{name}")), "must be between 1 and 65535".into()));
                }
            }
            let unsupported = [
                ("labels", !e.labels.is_empty()),
                ("network", e.network.is_some()),
                ("locality", e.locality.is_some()),
                ("serviceAccount", e.service_account.is_some()),
            ];
            if let Some((field, _)) = unsupported.iter().find(|(_, set)| *set) {
                return Err((at(field), "not supported by this agent version yet".into()));
            }
        }
        if self.workload_selector.is_some() {
            return Err((
                "spec.workloadSelector".into(),
                "pods as ServiceEntry endpoints are not supported by this agent version yet".into(),
            ));
        }
        if !self.subject_alt_names.is_empty() {
            return Err(("spec.subjectAltNames".into(), "not supported by this agent version yet".into()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(yaml: &str) -> ServiceEntrySpec {
        serde_yaml::from_str(yaml).unwrap()
    }

    #[test]
    fn what_istio_refuses_is_refused_with_the_field() {
        let refused = [
            ("ports: [{number: 443}]", "spec.hosts"),
            ("hosts: [api.example.com]", "spec.ports"),
            ("hosts: [api.example.com]\nports: [{number: 443}, {number: 443}]", "spec.ports[1].number"),
            ("hosts: [api..example.com]\nports: [{number: 443}]", "spec.hosts[0]"),
            ("hosts: [a.com]\naddresses: [10.0.0.300]\nports: [{number: 80}]", "spec.addresses[0]"),
            ("hosts: [a.com]\nresolution: STATIC\nports: [{number: 80}]", "spec.endpoints"),
            (
                "hosts: [a.com]\nresolution: STATIC\nendpoints: [{address: a.com}]\nports: [{number: 80}]",
                "spec.endpoints[0].address",
            ),
            ("hosts: [a.com]\nendpoints: [{address: 1.2.3.4}]\nports: [{number: 80}]", "spec.endpoints"),
            ("hosts: ['*.a.com']\nresolution: DNS\nports: [{number: 80}]", "spec.hosts[0]"),
            ("hosts: [a.com]\nresolution: MAGIC\nports: [{number: 80}]", "spec.resolution"),
            ("hosts: [a.com]\nlocation: NEARBY\nports: [{number: 80}]", "spec.location"),
            ("hosts: [a.com]\nports: [{number: 80, protocol: QUIC}]", "spec.ports[0].protocol"),
            (
                "hosts: [a.com]\nresolution: DNS\nendpoints: [{address: a.com, labels: {v: '1'}}]\nports: [{number: 80}]",
                "spec.endpoints[0].labels",
            ),
            ("hosts: [a.com]\nworkloadSelector: {labels: {app: a}}\nports: [{number: 80}]", "spec.workloadSelector"),
        ];
        for (yaml, field) in refused {
            let err = entry(yaml).validate().expect_err(yaml);
            assert_eq!(err.0, field, "{yaml}: {err:?}");
        }
        let accepted = [
            "hosts: [api.example.com]\nports: [{number: 443, name: https, protocol: TLS}]\nlocation: MESH_EXTERNAL",
            "hosts: ['*.example.com']\naddresses: [192.0.2.0/24]\nports: [{number: 80}]",
            "hosts: [db.internal]\nresolution: STATIC\nendpoints: [{address: 10.1.0.5, ports: {tcp: 5432}}]\nports: [{number: 5432, name: tcp}]",
            "hosts: [api.example.com]\nresolution: DNS\nports: [{number: 80, name: http, targetPort: 8080}]",
        ];
        for yaml in accepted {
            entry(yaml).validate().expect(yaml);
        }
    }
}

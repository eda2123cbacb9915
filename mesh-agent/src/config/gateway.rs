//! Istio `Gateway` (`networking.istio.io` v1, v1beta1, v1alpha3): the servers an edge
//! proxy selected by labels exposes, and the name VirtualServices bind to.
//!
//! The node agents never serve a Gateway: a Gateway applies to the gateway workloads
//! its selector picks (as in Istio), and a Gateway that selects none is inert, which
//! `meshctl analyze` says. What the agents do with it is resolve the `gateways:` of
//! VirtualServices, so rules bound to a gateway only are kept off mesh traffic.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::resource::Resource;
use super::schema::Invalid;

/// `Gateway`.
pub type Gateway = Resource<GatewaySpec>;

/// The reserved name that binds a VirtualService to sidecarless mesh traffic.
pub const MESH: &str = "mesh";

/// `Gateway.spec`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GatewaySpec {
    /// Labels of the gateway workloads (in any namespace) that serve it.
    #[serde(default)]
    pub selector: BTreeMap<String, String>,
    /// The servers, one per port and host set.
    #[serde(default)]
    pub servers: Vec<Server>,
}

/// `Server`: a port the gateway listens on and the hosts it serves there.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Server {
    /// The port and its protocol.
    #[serde(default)]
    pub port: Option<ServerPort>,
    /// Address (or `unix://` socket) to bind; every address when unset.
    #[serde(default)]
    pub bind: Option<String>,
    /// Hosts served, each `[namespace/]host`, with `*` wildcards.
    #[serde(default)]
    pub hosts: Vec<String>,
    /// TLS of the port.
    #[serde(default)]
    pub tls: Option<ServerTls>,
    /// Name, unique across the gateway's servers.
    #[serde(default)]
    pub name: Option<String>,
    /// Where traffic matching no host goes (`ip:port` or `unix://`).
    #[serde(default)]
    pub default_endpoint: Option<String>,
}

/// `Port` of a server.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServerPort {
    /// Port number.
    pub number: u32,
    /// HTTP, HTTPS, GRPC, GRPC-WEB, HTTP2, MONGO, REDIS, MYSQL, TCP or TLS.
    pub protocol: String,
    /// Label of the port.
    #[serde(default)]
    pub name: String,
    /// Port on the gateway workload when it differs from `number`.
    #[serde(default)]
    pub target_port: Option<u32>,
}

/// `ServerTLSSettings`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServerTls {
    /// Answer plain HTTP with a 301 to https.
    #[serde(default)]
    pub https_redirect: bool,
    /// How TLS is handled; PASSTHROUGH when unset.
    #[serde(default)]
    pub mode: TlsMode,
    /// Certificate file (instead of `credentialName`).
    #[serde(default)]
    pub server_certificate: Option<String>,
    /// Key file (instead of `credentialName`).
    #[serde(default)]
    pub private_key: Option<String>,
    /// Client CA file, for MUTUAL.
    #[serde(default)]
    pub ca_certificates: Option<String>,
    /// Revocation list file, for MUTUAL.
    #[serde(default)]
    pub ca_crl: Option<String>,
    /// A TLS Secret (`tls.crt`, `tls.key`, and `ca.crt` for MUTUAL) in the gateway's
    /// namespace.
    #[serde(default)]
    pub credential_name: Option<String>,
    /// Several Secrets (an RSA and an ECDSA certificate).
    #[serde(default)]
    pub credential_names: Vec<String>,
    /// Client certificate SANs accepted, for MUTUAL.
    #[serde(default)]
    pub subject_alt_names: Vec<String>,
    /// Client certificate SPKI hashes accepted, for MUTUAL.
    #[serde(default)]
    pub verify_certificate_spki: Vec<String>,
    /// Client certificate hashes accepted, for MUTUAL.
    #[serde(default)]
    pub verify_certificate_hash: Vec<String>,
    /// Lowest TLS version.
    #[serde(default)]
    pub min_protocol_version: TlsVersion,
    /// Highest TLS version.
    #[serde(default)]
    pub max_protocol_version: TlsVersion,
    /// Cipher suites, by OpenSSL name.
    #[serde(default)]
    pub cipher_suites: Vec<String>,
}

/// `ServerTLSSettings.TLSmode`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum TlsMode {
    /// Route on SNI without terminating TLS.
    #[default]
    Passthrough,
    /// Terminate TLS with the server certificate.
    Simple,
    /// Terminate TLS and require a client certificate.
    Mutual,
    /// SNI carries the destination (east-west gateways); no VirtualService needed.
    AutoPassthrough,
    /// Terminate with the mesh's own certificates (mesh mTLS at the gateway).
    IstioMutual,
    /// As MUTUAL, but a client without a certificate is let through.
    OptionalMutual,
}

/// `ServerTLSSettings.TLSProtocol`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Deserialize, schemars::JsonSchema)]
pub enum TlsVersion {
    /// The proxy's default.
    #[default]
    #[serde(rename = "TLS_AUTO")]
    Auto,
    /// TLS 1.0.
    #[serde(rename = "TLSV1_0")]
    V1_0,
    /// TLS 1.1.
    #[serde(rename = "TLSV1_1")]
    V1_1,
    /// TLS 1.2.
    #[serde(rename = "TLSV1_2")]
    V1_2,
    /// TLS 1.3.
    #[serde(rename = "TLSV1_3")]
    V1_3,
}

/// The protocols a server port may name (Istio's list, case-insensitive).
const PROTOCOLS: &[&str] = &["HTTP", "HTTPS", "GRPC", "GRPC-WEB", "HTTP2", "MONGO", "REDIS", "MYSQL", "TCP", "TLS"];

impl ServerPort {
    /// Whether the port carries TLS the gateway sees (HTTPS or TLS).
    pub fn is_tls(&self) -> bool {
        ["HTTPS", "TLS"].iter().any(|p| p.eq_ignore_ascii_case(&self.protocol))
    }

    /// Whether the port carries bytes the gateway does not read (TCP and the database
    /// protocols Istio names), routed by VirtualService `tcp:` rules.
    pub fn is_opaque(&self) -> bool {
        ["TCP", "MONGO", "REDIS", "MYSQL"].iter().any(|p| p.eq_ignore_ascii_case(&self.protocol))
    }

    /// Whether the port carries HTTP in the clear (HTTP, HTTP2, GRPC, GRPC-WEB).
    pub fn is_plain_http(&self) -> bool {
        super::is_plain_http_protocol(&self.protocol)
    }
}

impl Gateway {
    /// The checks Istio's validation webhook makes.
    pub(super) fn validate(&self) -> Result<(), Invalid> {
        if self.spec.servers.is_empty() {
            return Err(("spec.servers".into(), "a gateway must have at least one server".into()));
        }
        let mut names = std::collections::HashSet::new();
        for (i, server) in self.spec.servers.iter().enumerate() {
            let at = format!("spec.servers[{i}]");
            server.validate(&at)?;
            if let Some(name) = &server.name
                && !names.insert(name.as_str())
            {
                return Err((format!("{at}.name"), format!("{name:?} is the name of another server")));
            }
        }
        Ok(())
    }
}

impl Server {
    fn validate(&self, at: &str) -> Result<(), Invalid> {
        if self.hosts.is_empty() {
            return Err((format!("{at}.hosts"), "a server must have at least one host".into()));
        }
        for (i, host) in self.hosts.iter().enumerate() {
            validate_server_host(host).map_err(|reason| (format!("{at}.hosts[{i}]"), reason))?;
        }
        let port = self.port.as_ref().ok_or_else(|| (format!("{at}.port"), "required field is missing".into()))?;
        if !PROTOCOLS.iter().any(|p| p.eq_ignore_ascii_case(&port.protocol)) {
            return Err((
                format!("{at}.port.protocol"),
                format!("{:?} is not one of {}", port.protocol, PROTOCOLS.join(", ")),
            ));
        }
        // Port 0 only names a unix socket listener.
        let unix_socket = port.number == 0 && self.bind.as_deref().is_some_and(|b| b.starts_with("unix://"));
        if !((1..=65535).contains(&port.number) || unix_socket) {
            return Err((format!("{at}.port.number"), format!("{} is not a port number", port.number)));
        }
        if port.name.is_empty() {
            return Err((format!("{at}.port.name"), "a server port must be named".into()));
        }
        if let Some(t) = port.target_port
            && !(1..=65535).contains(&t)
        {
            return Err((format!("{at}.port.targetPort"), format!("{t} is not a port number")));
        }
        match (&self.tls, port.is_tls()) {
            (None, true) => Err((format!("{at}.tls"), format!("a {} server must have TLS settings", port.protocol))),
            (Some(tls), false) if !tls.is_redirect_only() => Err((
                format!("{at}.tls"),
                format!("a {} server may only set httpsRedirect; TLS is for HTTPS and TLS ports", port.protocol),
            )),
            (Some(tls), _) => tls.validate(&format!("{at}.tls")),
            (None, false) => Ok(()),
        }
    }
}

impl ServerTls {
    /// Only `httpsRedirect` is set: the one TLS setting a plaintext port may carry.
    fn is_redirect_only(&self) -> bool {
        *self == ServerTls { https_redirect: self.https_redirect, ..ServerTls::default() }
    }

    fn has_certificate(&self) -> bool {
        self.credential_name.is_some()
            || !self.credential_names.is_empty()
            || self.server_certificate.is_some()
            || self.private_key.is_some()
    }

    fn validate(&self, at: &str) -> Result<(), Invalid> {
        let by_secret = self.credential_name.is_some() || !self.credential_names.is_empty();
        match self.mode {
            TlsMode::IstioMutual if self.has_certificate() || self.ca_certificates.is_some() => {
                return Err((
                    format!("{at}.mode"),
                    "ISTIO_MUTUAL uses the mesh's certificates: set no credentialName, certificate or key".into(),
                ));
            }
            TlsMode::Simple | TlsMode::Mutual | TlsMode::OptionalMutual if !by_secret => {
                if self.server_certificate.is_none() {
                    return Err((
                        format!("{at}.credentialName"),
                        format!("{:?} needs a credentialName or a serverCertificate and privateKey", self.mode),
                    ));
                }
                if self.private_key.is_none() {
                    return Err((format!("{at}.privateKey"), "a serverCertificate needs its privateKey".into()));
                }
                if self.mode != TlsMode::Simple && self.ca_certificates.is_none() {
                    return Err((format!("{at}.caCertificates"), "MUTUAL needs the client CA (caCertificates)".into()));
                }
            }
            _ => {}
        }
        if self.credential_name.is_some() && !self.credential_names.is_empty() {
            return Err((format!("{at}.credentialNames"), "set credentialName or credentialNames, not both".into()));
        }
        if self.min_protocol_version != TlsVersion::Auto
            && self.max_protocol_version != TlsVersion::Auto
            && self.min_protocol_version > self.max_protocol_version
        {
            return Err((format!("{at}.minProtocolVersion"), "is above maxProtocolVersion".into()));
        }
        Ok(())
    }
}

/// `[namespace/]host`: the namespace is `*`, `.` or a namespace name; the host is `*`,
/// `*.suffix` or a DNS name.
fn validate_server_host(host: &str) -> Result<(), String> {
    let (namespace, name) = host.split_once('/').unwrap_or(("*", host));
    if namespace != "*" && namespace != "." && !is_dns1123_label(namespace) {
        return Err(format!("{host:?}: {namespace:?} is not a namespace, * or ."));
    }
    let dns = name.strip_prefix("*.").unwrap_or(name);
    if name == "*" || (!dns.is_empty() && dns.split('.').all(is_dns_label_loose)) {
        Ok(())
    } else {
        Err(format!("{host:?}: {name:?} is not a host name, * or *.suffix"))
    }
}

fn is_dns1123_label(s: &str) -> bool {
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    (1..=63).contains(&s.len())
        && s.bytes().all(|b| alnum(b) || b == b'-')
        && s.bytes().next().is_some_and(alnum)
        && s.bytes().last().is_some_and(alnum)
}

/// A DNS label as hosts are written (case-insensitive).
fn is_dns_label_loose(s: &str) -> bool {
    is_dns1123_label(&s.to_ascii_lowercase())
}

/// The `namespace/name` a VirtualService in `namespace` means by a `gateways:` entry:
/// `name` is in the VirtualService's namespace, `ns/name` is explicit, and the legacy
/// `name.ns[.svc.cluster.local]` form names `ns/name`. `mesh` stays `mesh`.
pub fn gateway_key(reference: &str, namespace: &str) -> String {
    if reference == MESH || reference.contains('/') {
        return reference.to_string();
    }
    match reference.split_once('.') {
        Some((name, rest)) => format!("{}/{name}", rest.split('.').next().unwrap_or(rest)),
        None => format!("{namespace}/{reference}"),
    }
}

/// Refuses a `gateways:` entry that is neither `mesh` nor a gateway reference.
pub(super) fn validate_gateway_reference(field: String, reference: &str) -> Result<(), Invalid> {
    if reference == MESH {
        return Ok(());
    }
    let valid = match reference.split_once('/') {
        Some((ns, name)) => is_dns1123_label(ns) && is_dns1123_label(name),
        None => reference.split('.').all(is_dns1123_label),
    };
    if valid { Ok(()) } else { Err((field, format!("{reference:?} is not mesh, a gateway name or namespace/name"))) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gateway(servers: &str) -> Result<(), Invalid> {
        let yaml = format!(
            "metadata: {{name: gw, namespace: production}}\nspec:\n  selector: {{istio: ingressgateway}}\n  servers:\n{servers}"
        );
        serde_yaml::from_str::<Gateway>(&yaml).unwrap().validate()
    }

    #[test]
    fn the_reference_servers_are_valid() {
        let servers = "  - port: {number: 80, name: http, protocol: HTTP}\n    hosts: [myapp.example.com]\n    tls: {httpsRedirect: true}\n  - port: {number: 443, name: https, protocol: HTTPS}\n    hosts: [\"production/*.example.com\"]\n    tls: {mode: SIMPLE, credentialName: myapp-tls-secret, minProtocolVersion: TLSV1_2}\n";
        assert_eq!(gateway(servers), Ok(()));
    }

    #[test]
    fn what_istio_refuses_is_refused_with_the_field() {
        let cases = [
            (
                "  - port: {number: 443, name: https, protocol: HTTPS}\n    hosts: [a.example.com]\n",
                "spec.servers[0].tls",
            ),
            (
                "  - port: {number: 80, name: http, protocol: HTTP}\n    hosts: [a.example.com]\n    tls: {mode: SIMPLE, credentialName: s}\n",
                "spec.servers[0].tls",
            ),
            (
                "  - port: {number: 443, name: https, protocol: HTTPS}\n    hosts: [a.example.com]\n    tls: {mode: SIMPLE}\n",
                "spec.servers[0].tls.credentialName",
            ),
            (
                "  - port: {number: 443, name: https, protocol: HTTPS}\n    hosts: [a.example.com]\n    tls: {mode: MUTUAL, serverCertificate: c, privateKey: k}\n",
                "spec.servers[0].tls.caCertificates",
            ),
            (
                "  - port: {number: 443, name: https, protocol: HTTPS}\n    hosts: [a.example.com]\n    tls: {mode: ISTIO_MUTUAL, credentialName: s}\n",
                "spec.servers[0].tls.mode",
            ),
            (
                "  - port: {number: 443, name: https, protocol: HTTPS}\n    hosts: [a.example.com]\n    tls: {mode: SIMPLE, credentialName: s, minProtocolVersion: TLSV1_3, maxProtocolVersion: TLSV1_2}\n",
                "spec.servers[0].tls.minProtocolVersion",
            ),
            (
                "  - port: {number: 80, name: http, protocol: HTTPX}\n    hosts: [a.example.com]\n",
                "spec.servers[0].port.protocol",
            ),
            (
                "  - port: {number: 70000, name: http, protocol: HTTP}\n    hosts: [a.example.com]\n",
                "spec.servers[0].port.number",
            ),
            ("  - port: {number: 80, protocol: HTTP}\n    hosts: [a.example.com]\n", "spec.servers[0].port.name"),
            ("  - port: {number: 80, name: http, protocol: HTTP}\n    hosts: []\n", "spec.servers[0].hosts"),
            (
                "  - port: {number: 80, name: http, protocol: HTTP}\n    hosts: [\"Bad_NS/a.example.com\"]\n",
                "spec.servers[0].hosts[0]",
            ),
            (
                "  - port: {number: 80, name: http, protocol: HTTP}\n    hosts: [\"a.*.com\"]\n",
                "spec.servers[0].hosts[0]",
            ),
        ];
        for (servers, field) in cases {
            let got = gateway(servers);
            assert_eq!(got.as_ref().map_err(|(f, _)| f.as_str()), Err(field), "{servers}: {got:?}");
        }
        assert_eq!(gateway("").map_err(|(f, _)| f), Err("spec.servers".to_string()));
    }

    #[test]
    fn gateway_references_resolve_as_istio_reads_them() {
        assert_eq!(gateway_key("mesh", "production"), "mesh");
        assert_eq!(gateway_key("myapp-gateway", "production"), "production/myapp-gateway");
        assert_eq!(gateway_key("istio-system/edge", "production"), "istio-system/edge");
        assert_eq!(gateway_key("edge.istio-system.svc.cluster.local", "production"), "istio-system/edge");
        assert!(validate_gateway_reference("g".into(), "istio-system/edge").is_ok());
        assert!(validate_gateway_reference("g".into(), "a/b/c").is_err());
        assert!(validate_gateway_reference("g".into(), "Edge").is_err());
    }
}

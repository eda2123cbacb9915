//! `meshctl proxy-config`: what one node's agent holds — workloads, services
//! (Envoy's "clusters"), endpoints, routes, certificates, policies — read from its config
//! dump on the admin address (on the node, as `istioctl ztunnel-config` reads ztunnel's)
//! or from a saved dump.

use std::fmt::Write as _;
use std::net::SocketAddr;

use http_body_util::{BodyExt as _, Empty};
use hyper_util::rt::TokioIo;
use serde_json::Value;

/// What to show.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Section {
    /// Every section.
    All,
    /// Pods the agent knows: addresses, identity, whether in the mesh.
    Workloads,
    /// Services: addresses, ports, endpoint counts (Envoy's clusters).
    #[value(alias = "clusters")]
    Services,
    /// Each Service port's endpoints, and whether they are reached over mTLS.
    Endpoints,
    /// Compiled VirtualService routes, by Service.
    Routes,
    /// Workload certificates held (identity, expiry; never keys).
    #[value(alias = "certificates")]
    Secrets,
    /// PeerAuthentication and AuthorizationPolicies in force for this node's pods.
    Policies,
}

/// Reads the agent's config dump from its admin address.
pub async fn fetch(admin: SocketAddr) -> Result<Value, String> {
    get_json(admin, "/config_dump").await
}

/// GETs `path` from the agent's admin address as JSON. The admin pages answer to a
/// loopback `Host` only, which is what this names, whatever address it dials.
pub async fn get_json(admin: SocketAddr, path: &str) -> Result<Value, String> {
    let tcp = tokio::net::TcpStream::connect(admin).await.map_err(|e| {
        format!("cannot reach the agent's admin address {admin}: {e} (run on the node, or pass --file)")
    })?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await.map_err(|e| format!("{admin}: {e}"))?;
    tokio::spawn(conn);
    let req = http::Request::get(path)
        .header(http::header::HOST, format!("localhost:{}", admin.port()))
        .body(Empty::<bytes::Bytes>::new())
        .map_err(|e| e.to_string())?;
    let res = sender.send_request(req).await.map_err(|e| format!("{admin}: {e}"))?;
    let status = res.status();
    let body = res.into_body().collect().await.map_err(|e| format!("{admin}: {e}"))?.to_bytes();
    if !status.is_success() {
        return Err(format!("{admin} answered {status}: {}", String::from_utf8_lossy(&body).trim()));
    }
    serde_json::from_slice(&body).map_err(|e| format!("{admin}{path}: {e}"))
}

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        Value::Array(a) if a.is_empty() => "-".into(),
        Value::Array(a) => a.iter().map(s).collect::<Vec<_>>().join(","),
        other => other.to_string(),
    }
}

/// Columns padded to their widest cell.
fn table(header: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &[String]| {
        let padded: Vec<String> = cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        let _ = writeln!(out, "{}", padded.join("  ").trim_end());
    };
    line(&header.iter().map(|h| h.to_string()).collect::<Vec<_>>());
    for r in &rows {
        line(r);
    }
    out
}

fn rows(dump: &Value, key: &str) -> Vec<Value> {
    dump[key].as_array().cloned().unwrap_or_default()
}

/// One section of `dump` as a table.
pub fn render(section: Section, dump: &Value) -> String {
    let one = |section| render(section, dump);
    match section {
        Section::All => [
            Section::Workloads,
            Section::Services,
            Section::Endpoints,
            Section::Routes,
            Section::Secrets,
            Section::Policies,
        ]
        .into_iter()
        .map(|sec| format!("{}:\n{}", format!("{sec:?}").to_uppercase(), one(sec)))
        .collect::<Vec<_>>()
        .join("\n"),
        Section::Workloads => table(
            &["NAMESPACE", "NAME", "NODE", "IPS", "IDENTITY", "MESH"],
            rows(dump, "workloads")
                .iter()
                .map(|w| {
                    let mesh = if w["enrolled"] == true { "yes" } else { "no" };
                    vec![s(&w["namespace"]), s(&w["name"]), s(&w["node"]), s(&w["ips"]), s(&w["identity"]), mesh.into()]
                })
                .collect(),
        ),
        Section::Services => table(
            &["NAMESPACE", "NAME", "VIPS", "PORTS", "ENDPOINTS"],
            rows(dump, "services")
                .iter()
                .map(|v| {
                    let n = v["endpoints"].as_array().map_or(0, Vec::len);
                    vec![s(&v["namespace"]), s(&v["name"]), s(&v["vips"]), s(&v["ports"]), n.to_string()]
                })
                .collect(),
        ),
        Section::Endpoints => table(
            &["SERVICE", "PORT", "ENDPOINT", "WORKLOAD", "PROTOCOL"],
            rows(dump, "endpoints")
                .iter()
                .map(|e| {
                    let protocol = if e["mtls"] == true { "HBONE" } else { "TCP" };
                    vec![s(&e["service"]), s(&e["port"]), s(&e["address"]), s(&e["workload"]), protocol.into()]
                })
                .collect(),
        ),
        Section::Routes => table(
            &["SERVICE", "VIRTUALSERVICE", "HTTP RULES", "TCP RULES"],
            rows(dump, "routes")
                .iter()
                .map(|r| vec![s(&r["service"]), s(&r["virtual_service"]), s(&r["http_rules"]), s(&r["tcp_rules"])])
                .collect(),
        ),
        Section::Secrets => table(
            &["IDENTITY", "NOT AFTER", "EXPIRES IN"],
            rows(dump, "secrets")
                .iter()
                .map(|c| {
                    let left = c["expires_in_seconds"].as_u64().unwrap_or(0);
                    vec![s(&c["identity"]), s(&c["not_after"]), format!("{}h{:02}m", left / 3600, left % 3600 / 60)]
                })
                .collect(),
        ),
        Section::Policies => table(
            &["WORKLOAD", "MTLS", "PORT MTLS", "PEERAUTHENTICATIONS", "AUTHORIZATION"],
            rows(dump, "policies")
                .iter()
                .map(|p| {
                    let ports = p["port_mtls"]
                        .as_object()
                        .map(|m| m.iter().map(|(k, v)| format!("{k}={}", s(v))).collect::<Vec<_>>().join(","))
                        .filter(|x| !x.is_empty())
                        .unwrap_or_else(|| "-".into());
                    let authz = p["authorization"]
                        .as_object()
                        .map(|m| m.iter().map(|(k, v)| format!("{k}:{}", s(v))).collect::<Vec<_>>().join(" "))
                        .filter(|x| !x.is_empty())
                        .unwrap_or_else(|| "-".into());
                    vec![s(&p["workload"]), s(&p["mtls"]), ports, s(&p["peer_authentications"]), authz]
                })
                .collect(),
        ),
    }
}

/// One section of `dump` as JSON.
pub fn json(section: Section, dump: &Value) -> Value {
    let key = match section {
        Section::All => return dump.clone(),
        Section::Workloads => "workloads",
        Section::Services => "services",
        Section::Endpoints => "endpoints",
        Section::Routes => "routes",
        Section::Secrets => "secrets",
        Section::Policies => "policies",
    };
    dump[key].clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sections_print_as_aligned_tables() {
        let dump = serde_json::json!({
            "endpoints": [
                {"service": "production/myapp", "port": 80, "address": "10.10.2.2:8080", "workload": "production/myapp-v1", "mtls": true},
                {"service": "default/outside", "port": 80, "address": "10.10.1.4:8080", "workload": "default/outside", "mtls": false},
            ],
            "secrets": [{"identity": "spiffe://cluster.local/ns/production/sa/frontend", "not_after": "2026-12-04T21:00:00Z", "expires_in_seconds": 86399}],
            "policies": [{"workload": "production/legacy-service", "mtls": "STRICT", "port_mtls": {"9000": "PERMISSIVE"},
                          "peer_authentications": ["PeerAuthentication production/strict"],
                          "authorization": {"DENY": ["production/deny-admin"]}}],
        });
        let endpoints = render(Section::Endpoints, &dump);
        let lines: Vec<&str> = endpoints.lines().collect();
        assert_eq!(lines[0], "SERVICE           PORT  ENDPOINT        WORKLOAD             PROTOCOL");
        assert_eq!(lines[1], "production/myapp  80    10.10.2.2:8080  production/myapp-v1  HBONE");
        assert_eq!(lines[2], "default/outside   80    10.10.1.4:8080  default/outside      TCP");
        assert!(render(Section::Secrets, &dump).contains("23h59m"));
        let policies = render(Section::Policies, &dump);
        assert!(policies.contains("STRICT") && policies.contains("9000=PERMISSIVE"), "{policies}");
        assert!(policies.contains("DENY:production/deny-admin"), "{policies}");
        assert!(render(Section::All, &dump).contains("ROUTES:\nSERVICE"));
        assert_eq!(json(Section::Secrets, &dump)[0]["expires_in_seconds"], 86399);
    }
}

//! Test doubles for the agent's integration tests.
#![allow(dead_code, unused_imports, reason = "each test file uses the part it needs")]

pub use mesh_tests::{api_server, kinds};

/// The mesh CA as a cluster has it: a `cacerts` Secret (JSON for the double), made from
/// a new self-signed root in `dir/ca-source` (whose `root-cert.pem` agents can trust).
pub fn ca_secret(dir: &std::path::Path) -> serde_json::Value {
    use k8s_openapi::ByteString;
    let ca_source = dir.join("ca-source");
    mesh_agent::identity::MeshCa::load_or_create(&ca_source, "cluster.local").unwrap();
    let data = ["ca-cert.pem", "ca-key.pem", "root-cert.pem"]
        .iter()
        .map(|n| (n.to_string(), ByteString(std::fs::read(ca_source.join(n)).unwrap())))
        .collect();
    let secret = k8s_openapi::api::core::v1::Secret {
        metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
            name: Some("cacerts".into()),
            namespace: Some("istio-system".into()),
            ..Default::default()
        },
        data: Some(data),
        ..Default::default()
    };
    let mut v = serde_json::to_value(&secret).unwrap();
    v["apiVersion"] = serde_json::json!("v1");
    v["kind"] = serde_json::json!("Secret");
    v
}

//! Egress in the lab: `outboundTrafficPolicy` REGISTRY_ONLY on the agents, a plain
//! server in the outside client's netns playing "the internet", and ServiceEntries
//! that open it by name (HTTP Host) and by address (STATIC endpoints).
#![forbid(unsafe_code)]

use mesh_tests::harness::{apply_yaml, eventually, lab_with_env, metrics, reply_pod};
use mesh_tests::lab::{CLIENT_ADDR, CLIENT_NETNS, Lab};
use mesh_tests::sys::output;

/// curl from pod `frontend` to `url` with `Host: host`: the pod that answered, or None
/// when the connection was refused.
fn fetch(lab: &Lab, url: &str, host: &str) -> Option<String> {
    let header = format!("Host: {host}");
    let out = lab.exec("frontend", &["curl", "-s", "-m", "5", "-H", &header, url]).unwrap();
    reply_pod(&String::from_utf8_lossy(&out.stdout))
}

#[test]
fn registry_only_refuses_the_unknown_and_service_entries_open_what_they_declare() {
    let test = "registry_only_refuses_the_unknown_and_service_entries_open_what_they_declare";
    let Some(mut lab) = lab_with_env(test, &[("MESH_OUTBOUND_TRAFFIC_POLICY", "REGISTRY_ONLY")]) else { return };
    let echo = lab.echo_bin.display().to_string();
    let argv: Vec<String> =
        [echo.as_str(), "serve", "--pod", "internet", "--port", "8080", "--tcp-port", "9100"].map(String::from).into();
    lab.start_helper("internet", CLIENT_NETNS, &argv).unwrap();
    let internet = format!("http://{CLIENT_ADDR}:8080/");
    eventually("the internet server answers in its own netns", || {
        let out = output(&["ip", "netns", "exec", CLIENT_NETNS, "curl", "-s", "-m", "2", &internet]).unwrap();
        (reply_pod(&String::from_utf8_lossy(&out.stdout)).as_deref() == Some("internet")).then_some(())
    });

    // Nothing declares it: refused at the agent, logged and counted.
    assert_eq!(fetch(&lab, &internet, "api.example.com"), None, "REGISTRY_ONLY without a ServiceEntry");
    let m = metrics(&lab, "node1");
    assert!(
        m.lines()
            .any(|l| l.starts_with("istio_mesh_outbound_blocked_total") && l.contains("source_workload=\"frontend\"")),
        "{m}"
    );
    // The mesh's own Services are in the registry.
    assert!(fetch(&lab, "http://myapp/", "myapp").is_some_and(|p| p.starts_with("myapp-")));

    apply_yaml(
        &lab,
        "egress-entries.yaml",
        &format!(
            r#"apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: api, namespace: production}}
spec:
  hosts: [api.example.com]
  ports: [{{number: 8080, name: http, protocol: HTTP}}]
  location: MESH_EXTERNAL
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: legacy-api, namespace: production}}
spec:
  hosts: [legacy-api.example.com]
  addresses: [192.0.2.10]
  ports: [{{number: 80, name: http, targetPort: 8080}}]
  resolution: STATIC
  endpoints: [{{address: {CLIENT_ADDR}}}]
"#
        ),
    );
    // By name: the Host the request carries, on the entry's port.
    let pod = eventually("the ServiceEntry's host is reachable", || fetch(&lab, &internet, "api.example.com"));
    assert_eq!(pod, "internet");
    assert_eq!(fetch(&lab, &internet, "evil.example.com"), None, "a name no entry declares");
    // By address: 192.0.2.10 exists nowhere; the entry sends it to its endpoint.
    assert_eq!(fetch(&lab, "http://192.0.2.10/", "legacy-api.example.com").as_deref(), Some("internet"));
    let m = metrics(&lab, "node1");
    assert!(
        m.lines().any(|l| l.starts_with("istio_tcp_connections_opened_total")
            && l.contains("reporter=\"source\"")
            && l.contains("destination_service=\"legacy-api.example.com\"")),
        "{m}"
    );
}

/// A certificate for `name` from a fresh CA, written to the lab's scratch directory:
/// (CA file, certificate file, key file).
fn write_cert(lab: &Lab, prefix: &str, name: &str) -> (String, String, String) {
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    // Distinct names: openssl takes a leaf named as its issuer for self-signed.
    ca.distinguished_name.push(rcgen::DnType::CommonName, "internet test CA");
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let ca_pem = ca.self_signed(&ca_key).unwrap().pem();
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec![name.to_string()]).unwrap();
    params.distinguished_name.push(rcgen::DnType::CommonName, name);
    let cert = params.signed_by(&key, &issuer).unwrap().pem();
    let dir = lab.state_dir.join("scratch");
    std::fs::create_dir_all(&dir).unwrap();
    let mut paths = Vec::new();
    for (suffix, pem) in [("ca", ca_pem), ("cert", cert), ("key", key.serialize_pem())] {
        let p = dir.join(format!("{prefix}-{suffix}.pem"));
        std::fs::write(&p, pem).unwrap();
        paths.push(p.display().to_string());
    }
    (paths[0].clone(), paths[1].clone(), paths[2].clone())
}

#[test]
fn tls_is_originated_by_the_agent_toward_a_service_entry_host() {
    let Some(mut lab) = lab_with_env("tls_is_originated_by_the_agent_toward_a_service_entry_host", &[]) else { return };
    let (ca, cert, key) = write_cert(&lab, "api-tls", "api-tls.example.com");
    let argv: Vec<String> = ["openssl", "s_server", "-accept", "8443", "-www", "-quiet", "-cert", &cert, "-key", &key]
        .map(String::from)
        .into();
    lab.start_helper("internet-tls", CLIENT_NETNS, &argv).unwrap();
    apply_yaml(
        &lab,
        "egress-tls.yaml",
        &format!(
            r#"apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: api-tls, namespace: production}}
spec:
  hosts: [api-tls.example.com]
  addresses: [192.0.2.11]
  ports: [{{number: 80, name: http, targetPort: 8443}}]
  resolution: STATIC
  endpoints: [{{address: {CLIENT_ADDR}}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: api-tls, namespace: production}}
spec:
  host: api-tls.example.com
  trafficPolicy:
    tls: {{mode: SIMPLE, caCertificates: {ca}}}
"#
        ),
    );
    // frontend speaks plain HTTP to port 80; what answers is openssl's TLS server.
    let said = eventually("the agent's TLS reaches the server", || {
        let out = lab.exec("frontend", &["curl", "-s", "-m", "5", "http://192.0.2.11/"]).unwrap();
        let body = String::from_utf8_lossy(&out.stdout).into_owned();
        body.contains("s_server").then_some(body)
    });
    assert!(said.contains("TLSv1.3"), "the server saw a TLS 1.3 session: {said}");
}

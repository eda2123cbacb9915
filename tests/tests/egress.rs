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

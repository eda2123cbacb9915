//! Access logs in the lab: the agents write one JSON line per request and per TCP
//! connection (`MESH_ACCESS_LOG=json`), parsed here field by field for an allowed
//! request, a request a DENY policy refuses, and a raw TCP connection.
#![forbid(unsafe_code)]

use mesh_tests::harness::{DENY_ADMIN, apply_yaml, eventually, lab_with_env, root};
use mesh_tests::lab::Lab;

/// The JSON access log lines in `node`'s agent log.
fn access_lines(lab: &Lab, node: &str) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(lab.agent_log_path(node)).unwrap_or_default();
    text.lines()
        .filter(|l| l.starts_with('{') && l.contains("\"start_time\""))
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn curl(lab: &Lab, url: &str, request_id: &str) -> String {
    let header = format!("x-request-id: {request_id}");
    let out =
        lab.exec("frontend", &["curl", "-s", "-m", "5", "-o", "/dev/null", "-w", "%{http_code}", "-H", &header, url]);
    String::from_utf8_lossy(&out.unwrap().stdout).into_owned()
}

#[test]
fn access_log_lines_name_requests_denials_and_connections() {
    let Some(lab) =
        lab_with_env("access_log_lines_name_requests_denials_and_connections", &[("MESH_ACCESS_LOG", "json")])
    else {
        return;
    };
    apply_yaml(&lab, "deny-admin.yaml", DENY_ADMIN);
    eventually("the DENY policy is in force", || {
        (curl(&lab, "http://legacy-service/admin", "probe") == "403").then_some(())
    });
    assert_eq!(curl(&lab, "http://legacy-service/ok", "req-allowed"), "200");
    assert_eq!(curl(&lab, "http://legacy-service/admin", "req-denied"), "403");
    let echo = root().join("target/debug/mesh-echo").display().to_string();
    let out = lab.exec("frontend", &[&echo, "load", "10.96.0.20:9000", "--conns", "1", "--bytes", "4096"]).unwrap();
    assert!(out.status.success(), "load: {}", String::from_utf8_lossy(&out.stderr));

    // legacy-service runs on node2: its agent is the destination.
    let line = |id: &str| {
        eventually(&format!("node2 logged {id}"), || {
            access_lines(&lab, "node2").into_iter().find(|e| e["request_id"] == id && e["reporter"] == "destination")
        })
    };
    let allowed = line("req-allowed");
    assert_eq!(allowed["method"], "GET");
    assert_eq!(allowed["path"], "/ok");
    assert_eq!(allowed["protocol"], "HTTP/1.1");
    assert_eq!(allowed["response_code"], 200);
    assert_eq!(allowed["response_flags"], "-");
    assert_eq!(allowed["response_code_details"], "via_upstream");
    assert_eq!(allowed["authority"], "legacy-service");
    assert!(allowed["user_agent"].as_str().unwrap().starts_with("curl/"), "{allowed}");
    assert_eq!(allowed["upstream_host"], "10.10.2.3:8080");
    assert_eq!(allowed["upstream_cluster"], "inbound|8080||");
    assert_eq!(allowed["downstream_local_address"], "10.10.2.3:8080");
    assert!(allowed["downstream_remote_address"].as_str().unwrap().starts_with("10.10.1.2:"), "{allowed}");
    assert_eq!(allowed["source_principal"], "spiffe://cluster.local/ns/production/sa/frontend");
    assert_eq!(allowed["upstream_peer_principal"], "spiffe://cluster.local/ns/production/sa/legacy-service");
    assert!(allowed["bytes_sent"].as_u64().unwrap() > 0, "{allowed}");
    assert!(allowed["start_time"].as_str().unwrap().ends_with('Z'), "{allowed}");

    let denied = line("req-denied");
    assert_eq!(denied["response_code"], 403);
    assert_eq!(denied["response_code_details"], "rbac_access_denied_matched_policy[ns[production]-policy[deny-admin]]");
    assert_eq!(denied["upstream_host"], serde_json::Value::Null, "never reached the application");
    assert_eq!(denied["source_principal"], "spiffe://cluster.local/ns/production/sa/frontend");

    // The TCP connection (to myapp, not legacy-service: the DENY policy's HTTP-only
    // rule refuses all TCP to it, as Istio's does): at the source (node1) and at the
    // destination (either node: myapp has a pod on each), with its bytes, once closed.
    let tcp = |nodes: &[&str], reporter: &str| {
        eventually(&format!("{nodes:?} logged the TCP connection"), || {
            nodes.iter().flat_map(|n| access_lines(&lab, n)).find(|e| {
                e["protocol"] == "TCP"
                    && e["reporter"] == reporter
                    && e["upstream_cluster"].as_str().is_some_and(|c| c.contains("|9000|"))
            })
        })
    };
    let source = tcp(&["node1"], "source");
    assert_eq!(source["upstream_cluster"], "outbound|9000||myapp.production.svc.cluster.local");
    assert_eq!(source["downstream_local_address"], "10.96.0.20:9000");
    assert_eq!(source["response_code"], 0);
    assert!(source["bytes_received"].as_u64().unwrap() >= 4096, "{source}");
    assert!(source["bytes_sent"].as_u64().unwrap() >= 4096, "{source}");
    assert_eq!(source["source_principal"], "spiffe://cluster.local/ns/production/sa/frontend");
    let destination = tcp(&["node1", "node2"], "destination");
    assert_eq!(destination["upstream_cluster"], "inbound|9000||");
    assert!(destination["bytes_received"].as_u64().unwrap() >= 4096, "{destination}");
}

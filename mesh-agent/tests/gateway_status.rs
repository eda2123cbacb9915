//! The gateway binary in cluster mode against the API server double, as a Gateway API
//! controller: it serves a Gateway of class `istio` and writes back the status of the
//! GatewayClass, the Gateway (listeners, attached routes, addresses) and the HTTPRoute's
//! entry for it, keeping another controller's entry, and moves a condition's
//! transition time only when the condition changes. No root needed: a gateway loads no
//! kernel programs.

mod support;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mesh_agent::config::kube_source::KINDS;
use serde_json::{Value, json};
use support::api_server::{ApiServer, collection_path};
use support::ca_secret;

const GATEWAY_API: &str = "/apis/gateway.networking.k8s.io/v1";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Kills the gateway when the test ends, however it ends.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn condition<'a>(conditions: &'a Value, kind: &str) -> &'a Value {
    conditions.as_array().and_then(|c| c.iter().find(|c| c["type"] == kind)).unwrap_or(&Value::Null)
}

/// Waits until `f` holds of the object, or fails with it and the gateway's log.
async fn until(
    api: &ApiServer,
    log: &std::path::Path,
    what: &str,
    path: (&str, &str, &str),
    f: impl Fn(&Value) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let object = api.get(path.0, path.1, path.2).unwrap_or(Value::Null);
        if f(&object) {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: {object:#}\n{}", std::fs::read_to_string(log).unwrap_or_default());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn http_route(backends: Value, status: Value) -> Value {
    json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
        "metadata": {"name": "web", "namespace": "production", "generation": 1},
        "spec": {"parentRefs": [{"name": "web", "namespace": "istio-ingress"}], "hostnames": ["web.example.com"],
                 "rules": [{"backendRefs": backends}]},
        "status": status})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_writes_gateway_api_status_back() {
    let dir = tempfile::tempdir().unwrap();
    let mut collections: Vec<String> = KINDS.iter().map(|k| collection_path(k.group, k.version, k.plural)).collect();
    collections.extend(["/api/v1/secrets".to_string(), "/api/v1/configmaps".to_string()]);
    let api = ApiServer::new(&collections).await;
    api.apply("/api/v1/secrets", ca_secret(dir.path()));
    for ns in ["istio-ingress", "production"] {
        api.apply("/api/v1/namespaces", json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}));
    }
    api.apply(
        "/api/v1/pods",
        json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "web-gw", "namespace": "istio-ingress", "uid": "6b6b6b6b-0000-4000-8000-000000000001",
                         "labels": {"gateway.networking.k8s.io/gateway-name": "web"}},
            "spec": {"nodeName": "node1", "serviceAccountName": "web-gw", "containers": [{"name": "istio-proxy", "image": "mesh"}]},
            "status": {"phase": "Running", "podIP": "127.0.0.1"}}),
    );
    api.apply(
        "/api/v1/services",
        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "myapp", "namespace": "production"},
            "spec": {"selector": {"app": "myapp"}, "ports": [{"name": "http", "port": 80}]}}),
    );
    api.apply(
        &format!("{GATEWAY_API}/gatewayclasses"),
        json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "GatewayClass", "metadata": {"name": "istio", "generation": 1},
            "spec": {"controllerName": "istio.io/gateway-controller"}}),
    );
    let port = free_port();
    api.apply(
        &format!("{GATEWAY_API}/gateways"),
        json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
            "metadata": {"name": "web", "namespace": "istio-ingress", "generation": 3},
            "spec": {"gatewayClassName": "istio",
                     "listeners": [{"name": "http", "port": port, "protocol": "HTTP", "allowedRoutes": {"namespaces": {"from": "All"}}}]}}),
    );
    // Another controller's entry, which the mesh must leave alone.
    let theirs = json!({"parentRef": {"name": "edge", "namespace": "elsewhere"}, "controllerName": "example.com/other",
        "conditions": [{"type": "Accepted", "status": "True", "reason": "Accepted", "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z"}]});
    let routes = format!("{GATEWAY_API}/httproutes");
    api.apply(
        &routes,
        http_route(
            json!([{"name": "myapp", "port": 80}, {"name": "missing", "port": 80}]),
            json!({"parents": [theirs]}),
        ),
    );

    let token = dir.path().join("token");
    std::fs::write(&token, "gateway-token").unwrap();
    let log = dir.path().join("gateway.log");
    let child = Command::new(env!("CARGO_BIN_EXE_mesh-agent"))
        .args(["--mode", "gateway", "--pod", "istio-ingress/web-gw", "--node", "node1"])
        .args(["--config-source", "kubernetes", "--kube-api-url", &api.url(), "--gateway-bind", "127.0.0.1"])
        .args(["--ca-address", &format!("127.0.0.1:{}", free_port()), "--ca-server-name", "mesh-ca.test"])
        .arg("--ca-root-cert")
        .arg(dir.path().join("ca-source/root-cert.pem"))
        .arg("--ca-token-file")
        .arg(&token)
        .args(["--admin-addr", &format!("127.0.0.1:{}", free_port())])
        .args(["--metrics-addr", &format!("127.0.0.1:{}", free_port())])
        .args(["--readiness-addr", &format!("127.0.0.1:{}", free_port())])
        .env("MESH_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let _gateway = Process(child);

    until(&api, &log, "GatewayClass accepted", (&format!("{GATEWAY_API}/gatewayclasses"), "", "istio"), |o| {
        condition(&o["status"]["conditions"], "Accepted")["status"] == "True"
    })
    .await;
    until(&api, &log, "Gateway programmed", (&format!("{GATEWAY_API}/gateways"), "istio-ingress", "web"), |o| {
        let s = &o["status"];
        condition(&s["conditions"], "Programmed")["status"] == "True"
            && condition(&s["conditions"], "Accepted")["observedGeneration"] == 3
            && s["listeners"][0]["attachedRoutes"] == 1
            && s["addresses"][0]["value"] == "127.0.0.1"
    })
    .await;
    let ours = |o: &Value| -> Value {
        o["status"]["parents"]
            .as_array()
            .and_then(|p| p.iter().find(|p| p["controllerName"] == "istio.io/gateway-controller").cloned())
            .unwrap_or(Value::Null)
    };
    until(&api, &log, "the route's entry: accepted, a backend missing", (&routes, "production", "web"), |o| {
        let p = ours(o);
        condition(&p["conditions"], "Accepted")["status"] == "True"
            && condition(&p["conditions"], "ResolvedRefs")["reason"] == "BackendNotFound"
    })
    .await;
    let route = api.get(&routes, "production", "web").unwrap();
    assert_eq!(route["status"]["parents"][0]["controllerName"], "example.com/other", "{route:#}");
    let accepted_at = condition(&ours(&route)["conditions"], "Accepted")["lastTransitionTime"].clone();
    let resolved_at = condition(&ours(&route)["conditions"], "ResolvedRefs")["lastTransitionTime"].clone();
    assert!(accepted_at.is_string(), "{route:#}");

    // The missing backend goes: ResolvedRefs turns True and only its time moves.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    api.apply(&routes, http_route(json!([{"name": "myapp", "port": 80}]), route["status"].clone()));
    until(&api, &log, "the route's references resolved", (&routes, "production", "web"), |o| {
        condition(&ours(o)["conditions"], "ResolvedRefs")["status"] == "True"
    })
    .await;
    let route = api.get(&routes, "production", "web").unwrap();
    let conditions = &ours(&route)["conditions"];
    assert_eq!(condition(conditions, "Accepted")["lastTransitionTime"], accepted_at, "{route:#}");
    assert_ne!(condition(conditions, "ResolvedRefs")["lastTransitionTime"], resolved_at, "{route:#}");
    assert_eq!(route["status"]["parents"].as_array().map(Vec::len), Some(2), "{route:#}");
}

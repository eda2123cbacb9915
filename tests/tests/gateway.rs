//! Ingress in the lab: the reference Gateway and VirtualService as written
//! (`examples/seed`), served by the lab's gateway pod (the mesh's binary in gateway
//! mode), driven by real clients (curl, openssl s_client) from the `meshlab-client`
//! netns outside the cluster.
#![forbid(unsafe_code)]

use mesh_tests::harness::{
    apply_seed, apply_yaml, cert_from_fresh_ca, eventually, lab, metrics, reply_pod, root, write_cert_from_fresh_ca,
};
use mesh_tests::lab::{CLIENT_ADDR, CLIENT_NETNS, Lab};
use mesh_tests::sys::output;

/// The gateway pod's address (examples/lab/pods.yaml), as a load balancer would give it.
const GATEWAY: &str = "10.10.1.100";
const HOST: &str = "myapp.example.com";

/// curl from outside the cluster: (status, redirect target, body).
fn client_curl(lab: &Lab, args: &[&str]) -> (String, String, String) {
    let ca = lab.edge_ca_path().display().to_string();
    let mut argv = vec!["ip", "netns", "exec", CLIENT_NETNS, "curl", "-s", "-m", "5", "--cacert", &ca];
    argv.extend(["-w", "\n@@ %{http_code} %{redirect_url}"]);
    argv.extend(args);
    let out = output(&argv).unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, tail) = text.rsplit_once("\n@@ ").unwrap_or((&text, ""));
    let mut f = tail.splitn(2, ' ');
    let status = f.next().unwrap_or("").to_string();
    (status, f.next().unwrap_or("").trim().to_string(), body.to_string())
}

fn resolve(port: u16) -> String {
    format!("{HOST}:{port}:{GATEWAY}")
}

#[test]
fn the_reference_gateway_serves_myapp_to_clients_outside_the_mesh() {
    let Some(lab) = lab("the_reference_gateway_serves_myapp_to_clients_outside_the_mesh") else { return };
    for f in ["destinationrule-myapp.yaml", "virtualservice-myapp.yaml", "gateway-myapp.yaml"] {
        apply_seed(&lab, f);
    }
    // Port 80: the server's httpsRedirect.
    let http = resolve(80);
    let (status, location, _) = eventually("the gateway redirects http to https", || {
        let r = client_curl(&lab, &["--resolve", &http, &format!("http://{HOST}/api/items")]);
        (r.0 == "301").then_some(r)
    });
    assert_eq!((status.as_str(), location.as_str()), ("301", "https://myapp.example.com/api/items"));

    // Port 443: TLS with the credentialName Secret's certificate, checked against the
    // lab's edge CA, then the reference VirtualService's routes.
    let https = resolve(443);
    let url = format!("https://{HOST}/");
    let (status, _, body) = client_curl(&lab, &["--resolve", &https, "-H", "x-version: v2", &url]);
    assert_eq!(status, "200", "{body}");
    assert_eq!(reply_pod(&body).as_deref(), Some("myapp-v2"), "the x-version: v2 rule");
    for _ in 0..3 {
        let (status, _, body) = client_curl(&lab, &["--resolve", &https, &url]);
        assert_eq!((status.as_str(), reply_pod(&body).as_deref()), ("200", Some("myapp-v1")), "the default route");
    }
    let (status, _, _) = client_curl(&lab, &["--resolve", &https, "-H", "host: myapp", &url]);
    assert_eq!(status, "404", "myapp is a mesh host, not one the gateway serves");

    // What the application reads of who called: the forwarding headers Istio's gateway
    // sets, extended or replaced, never as the client wrote them.
    let forged =
        ["-H", "x-forwarded-for: 203.0.113.9", "-H", "x-request-id: forged", "-H", "x-envoy-external-address: 1.2.3.4"];
    let (status, _, body) = client_curl(&lab, &[&["--resolve", &https, &url][..], &forged[..]].concat());
    assert_eq!(status, "200", "{body}");
    let seen: serde_json::Value = serde_json::from_str(&body).unwrap();
    let header = |n: &str| seen["headers"][n].as_str().unwrap_or_default().to_string();
    assert_eq!(header("x-forwarded-for"), format!("203.0.113.9,{CLIENT_ADDR}"), "{body}");
    assert_eq!(header("x-envoy-external-address"), CLIENT_ADDR, "{body}");
    assert_eq!(header("x-forwarded-proto"), "https", "{body}");
    assert!(header("x-request-id").len() == 36 && header("x-request-id") != "forged", "{body}");

    // openssl checks the certificate the gateway shows for the host.
    let ca = lab.edge_ca_path().display().to_string();
    let connect = format!("{GATEWAY}:443");
    let out = output(&[
        "ip",
        "netns",
        "exec",
        CLIENT_NETNS,
        "openssl",
        "s_client",
        "-connect",
        &connect,
        "-servername",
        HOST,
        "-CAfile",
        &ca,
        "-verify_return_error",
        "-brief",
    ])
    .unwrap();
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(said.contains("Verification: OK") && said.contains(HOST), "{said}");

    // The pods saw the gateway's own identity over the mesh's mutual TLS (myapp-v1 is
    // on node2: the tunnel crossed the wire).
    let seen = eventually("node2 counts the gateway's connection", || {
        let m = metrics(&lab, "node2");
        m.lines()
            .any(|l| {
                l.starts_with("istio_tcp_connections_opened_total")
                    && l.contains("reporter=\"destination\"")
                    && l.contains("connection_security_policy=\"mutual_tls\"")
                    && l.contains(
                        "source_principal=\"spiffe://cluster.local/ns/istio-ingress/sa/istio-ingressgateway\"",
                    )
            })
            .then_some(m)
    });
    assert!(seen.contains("myapp-v1"), "{seen}");
}

#[test]
fn passthrough_routes_by_sni_to_a_pod_that_terminates_its_own_tls() {
    let Some(mut lab) = lab("passthrough_routes_by_sni_to_a_pod_that_terminates_its_own_tls") else { return };
    // myapp-v1 (node2) runs its own TLS server, openssl's, with a certificate from a CA
    // the gateway has never seen.
    let dir = lab.state_dir.join("scratch");
    std::fs::create_dir_all(&dir).unwrap();
    let (ca, cert, key) = cert_from_fresh_ca("secure.example.com");
    for (f, pem) in [("pod-ca.pem", &ca), ("pod-cert.pem", &cert), ("pod-key.pem", &key)] {
        std::fs::write(dir.join(f), pem).unwrap();
    }
    let path = |f: &str| dir.join(f).display().to_string();
    let argv: Vec<String> = ["openssl", "s_server", "-accept", "8443", "-www", "-quiet", "-cert"]
        .into_iter()
        .map(String::from)
        .chain([path("pod-cert.pem"), "-key".into(), path("pod-key.pem")])
        .collect();
    lab.start_helper("secure-tls", "myapp-v1", &argv).unwrap();
    apply_yaml(
        &lab,
        "secure.yaml",
        r#"apiVersion: v1
kind: Service
metadata: {name: secure, namespace: production}
spec: {selector: {app: myapp, version: v1}, clusterIP: 10.96.0.40, ports: [{name: tls, port: 443, targetPort: 8443}]}
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: secure-gateway, namespace: production}
spec:
  selector: {istio: ingressgateway}
  servers:
  - port: {number: 9443, name: tls-secure, protocol: TLS}
    hosts: [secure.example.com]
    tls: {mode: PASSTHROUGH}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: secure, namespace: production}
spec:
  hosts: [secure.example.com]
  gateways: [secure-gateway]
  tls:
  - match: [{sniHosts: [secure.example.com]}]
    route: [{destination: {host: secure, port: {number: 443}}}]
"#,
    );
    let resolve = format!("secure.example.com:9443:{GATEWAY}");
    let ca_file = path("pod-ca.pem");
    let fetch = || {
        let out = output(&[
            "ip",
            "netns",
            "exec",
            CLIENT_NETNS,
            "curl",
            "-sS",
            "-m",
            "5",
            "--cacert",
            &ca_file,
            "--resolve",
            &resolve,
            "https://secure.example.com:9443/",
        ])
        .unwrap();
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    let mut said = fetch();
    while !said.contains("s_server") && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(200));
        said = fetch();
    }
    let log = |f: &str| std::fs::read_to_string(lab.state_dir.join("logs").join(f)).unwrap_or_default();
    assert!(
        said.contains("s_server"),
        "curl said: {said}\nhelper: {}\ngateway: {}",
        log("helper-secure-tls.log"),
        log("app-istio-ingressgateway.log")
    );
    // The bytes crossed the wire in the mesh's tunnel, as the gateway's identity.
    let m = metrics(&lab, "node2");
    let tunneled = m.lines().any(|l| {
        l.starts_with("istio_tcp_connections_opened_total")
            && l.contains("reporter=\"destination\"")
            && l.contains("destination_workload=\"myapp-v1\"")
            && l.contains("source_principal=\"spiffe://cluster.local/ns/istio-ingress/sa/istio-ingressgateway\"")
    });
    assert!(tunneled, "{m}");
}

#[test]
fn a_tcp_server_splices_to_the_route_of_its_bound_virtual_service() {
    let Some(lab) = lab("a_tcp_server_splices_to_the_route_of_its_bound_virtual_service") else { return };
    apply_yaml(
        &lab,
        "tcp-gateway.yaml",
        r#"apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: tcp-gateway, namespace: production}
spec:
  selector: {istio: ingressgateway}
  servers:
  - port: {number: 9000, name: tcp-legacy, protocol: TCP}
    hosts: ["*"]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: legacy-tcp, namespace: production}
spec:
  hosts: ["*"]
  gateways: [tcp-gateway]
  tcp:
  - route: [{destination: {host: legacy-service, port: {number: 80}}}]
"#,
    );
    // HTTP bytes the gateway does not read: legacy-service (node2) answers them.
    let url = format!("http://{GATEWAY}:9000/");
    let body = eventually("the TCP server splices to legacy-service", || {
        let out = output(&["ip", "netns", "exec", CLIENT_NETNS, "curl", "-s", "-m", "5", &url]).unwrap();
        let body = String::from_utf8_lossy(&out.stdout).into_owned();
        (reply_pod(&body).as_deref() == Some("legacy-service")).then_some(body)
    });
    assert!(body.contains("legacy-service"), "{body}");
    let m = metrics(&lab, "node2");
    let tunneled = m.lines().any(|l| {
        l.starts_with("istio_tcp_connections_opened_total")
            && l.contains("reporter=\"destination\"")
            && l.contains("destination_workload=\"legacy-service\"")
            && l.contains("source_principal=\"spiffe://cluster.local/ns/istio-ingress/sa/istio-ingressgateway\"")
    });
    assert!(tunneled, "{m}");
}

fn indent(pem: &str) -> String {
    pem.lines().map(|l| format!("    {l}\n")).collect()
}

#[test]
fn mutual_tls_and_policies_on_the_gateway_judge_clients_from_outside() {
    let Some(lab) = lab("mutual_tls_and_policies_on_the_gateway_judge_clients_from_outside") else { return };
    let (_, server_cert, server_key) = write_cert_from_fresh_ca(&lab, "partner-server", HOST);
    let (client_ca, _, _) = write_cert_from_fresh_ca(&lab, "partner-client", "partner.example.org");
    let pem = |path: &str| std::fs::read_to_string(path).unwrap();
    apply_yaml(
        &lab,
        "partner-gateway.yaml",
        &format!(
            r#"apiVersion: v1
kind: Secret
metadata: {{name: partner-tls, namespace: istio-ingress}}
type: kubernetes.io/tls
stringData:
  tls.crt: |
{}  tls.key: |
{}  ca.crt: |
{}---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: partner-gateway, namespace: production}}
spec:
  selector: {{istio: ingressgateway}}
  servers:
  - port: {{number: 9447, name: https-partner, protocol: HTTPS}}
    hosts: [{HOST}]
    tls: {{mode: MUTUAL, credentialName: partner-tls}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: myapp-partner, namespace: production}}
spec:
  hosts: [{HOST}]
  gateways: [partner-gateway]
  http:
  - route: [{{destination: {{host: myapp, port: {{number: 80}}}}}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: no-admin-from-outside, namespace: istio-ingress}}
spec:
  selector: {{matchLabels: {{istio: ingressgateway}}}}
  action: DENY
  rules:
  - from: [{{source: {{remoteIpBlocks: [{CLIENT_ADDR}/32]}}}}]
    to: [{{operation: {{paths: ["/admin*"]}}}}]
"#,
            indent(&pem(&server_cert)),
            indent(&pem(&server_key)),
            indent(&pem(&client_ca)),
        ),
    );
    let scratch = |f: &str| lab.state_dir.join("scratch").join(f).display().to_string();
    let (ca, cert, key) =
        (scratch("partner-server-ca.pem"), scratch("partner-client-cert.pem"), scratch("partner-client-key.pem"));
    let resolve = format!("{HOST}:9447:{GATEWAY}");
    let curl = |extra: &[&str], path: &str| {
        let url = format!("https://{HOST}:9447{path}");
        let mut argv = vec!["ip", "netns", "exec", CLIENT_NETNS, "curl", "-sS", "-m", "5", "--cacert", &ca];
        argv.extend(["--resolve", &resolve, "-w", "\n@@ %{http_code}"]);
        argv.extend(extra);
        argv.push(&url);
        let out = output(&argv).unwrap();
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
    };
    let with_cert = ["--cert", cert.as_str(), "--key", key.as_str()];
    let said = eventually("the MUTUAL server admits a client with a certificate from its CA", || {
        let said = curl(&with_cert, "/");
        said.contains("@@ 200").then_some(said)
    });
    assert_eq!(reply_pod(said.split("\n@@").next().unwrap()).map(|p| p.starts_with("myapp-")), Some(true), "{said}");
    let without = curl(&[], "/");
    assert!(!without.contains("@@ 200") && !without.contains("\"pod\""), "no client certificate: {without}");
    // The policy on the gateway's pod: this client's address may not reach /admin.
    let denied = curl(&with_cert, "/admin/users");
    assert!(denied.contains("RBAC: access denied") && denied.contains("@@ 403"), "{denied}");
    let denied = curl(&[&with_cert[..], &["--path-as-is"]].concat(), "/api/../admin");
    assert!(denied.contains("@@ 403"), "judged on the normalized path: {denied}");
}

/// One unary gRPC call with grpcio from the client netns: the reply, the pod that
/// answered, or the status code of a failed call.
const GRPC_CALL: &str = r#"
import grpc, json, sys
target, authority, method, message = sys.argv[1:5]
channel = grpc.insecure_channel(target, options=[("grpc.default_authority", authority)])
call = channel.unary_unary(method, request_serializer=lambda b: b, response_deserializer=lambda b: b)
try:
    reply, info = call.with_call(message.encode(), timeout=5)
    pod = dict(info.initial_metadata()).get("x-served-by")
    print(json.dumps({"code": "OK", "message": reply.decode(), "pod": pod}))
except grpc.RpcError as e:
    print(json.dumps({"code": e.code().name}))
"#;

/// Debian's Python, which has grpcio from `cargo xtask setup` (python3-grpcio).
const PYTHON: &str = "/usr/bin/python3";

fn grpc_call(method: &str, message: &str) -> serde_json::Value {
    let target = format!("{GATEWAY}:8080");
    let out = output(&[
        "ip",
        "netns",
        "exec",
        CLIENT_NETNS,
        PYTHON,
        "-c",
        GRPC_CALL,
        &target,
        "grpc.example.com",
        method,
        message,
    ])
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim())
        .unwrap_or_else(|e| panic!("grpc client: {e}: {text} {}", String::from_utf8_lossy(&out.stderr)))
}

#[test]
fn gateway_api_routes_split_by_weight_and_route_grpc_calls() {
    let Some(lab) = lab("gateway_api_routes_split_by_weight_and_route_grpc_calls") else { return };
    // The example as users read it: a Gateway of class istio bound to the gateway
    // pod's Service, an HTTPRoute split 3:1 and a GRPCRoute.
    let example = std::fs::read_to_string(root().join("examples/gateway-api/web.yaml")).unwrap();
    apply_yaml(&lab, "gateway-api.yaml", &example);
    let url = format!("http://{GATEWAY}:8080/");
    let get = |path: &str| {
        let r = client_curl(&lab, &["-H", "host: web.example.com", &format!("{url}{path}")]);
        (r.0, reply_pod(&r.2))
    };
    eventually("the HTTPRoute is served", || {
        (get("only-v2/x") == ("200".into(), Some("myapp-v2".into()))).then_some(())
    });
    let (mut v1, mut v2) = (0, 0);
    for _ in 0..40 {
        match get("items") {
            (s, Some(p)) if s == "200" && p == "myapp-v1" => v1 += 1,
            (s, Some(p)) if s == "200" && p == "myapp-v2" => v2 += 1,
            other => panic!("{other:?}"),
        }
    }
    assert!(v1 > v2 && v2 > 0, "weights 3:1 gave v1={v1} v2={v2}");
    let (status, _, _) = client_curl(&lab, &["-H", "host: other.example.com", &url]);
    assert_eq!(status, "404", "a host no route names");

    // A real gRPC client: the matching method reaches myapp-v2 and its message comes back.
    let reply = eventually("the GRPCRoute is served", || {
        let r = grpc_call("/mesh.Echo/Say", "over the gateway");
        (r["code"] == "OK").then_some(r)
    });
    assert_eq!((reply["message"].as_str(), reply["pod"].as_str()), (Some("over the gateway"), Some("myapp-v2")));
    // A method no rule matches: the gateway answers 404, which gRPC reads as UNIMPLEMENTED.
    assert_eq!(grpc_call("/mesh.Echo/Other", "x")["code"], "UNIMPLEMENTED");
}

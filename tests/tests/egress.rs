//! Egress in the lab: `outboundTrafficPolicy` REGISTRY_ONLY on the agents, a plain
//! server in the outside client's netns playing "the internet", and ServiceEntries
//! that open it by name (HTTP Host) and by address (STATIC endpoints).
#![forbid(unsafe_code)]

use mesh_tests::harness::{apply_yaml, eventually, lab_with_env, metrics, reply_pod, write_cert_from_fresh_ca};
use mesh_tests::lab::{CLIENT_ADDR, CLIENT_NETNS, DEFAULT_STATE_DIR, Lab};
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
    // No agent reads the entries' traffic at the destination: the port declared HTTP
    // is read at the source, request by request (the undeclared one stays TCP).
    assert!(
        m.lines().any(|l| l.starts_with("istio_requests_total{reporter=\"source\"")
            && l.contains("source_workload=\"frontend\"")
            && l.contains("destination_service=\"api.example.com\"")
            && l.contains("response_code=\"200\"")),
        "{m}"
    );
}

/// openssl's TLS server on port 8443 of the outside netns ("the internet"), as helper
/// `name`, with a certificate for `host` from a fresh CA; returns the CA file.
fn start_internet_tls(lab: &mut Lab, name: &str, host: &str) -> String {
    let (ca, cert, key) = write_cert_from_fresh_ca(lab, name, host);
    let argv: Vec<String> = ["openssl", "s_server", "-accept", "8443", "-www", "-quiet", "-cert", &cert, "-key", &key]
        .map(String::from)
        .into();
    lab.start_helper(name, CLIENT_NETNS, &argv).unwrap();
    ca
}

#[test]
fn tls_is_originated_by_the_agent_toward_a_service_entry_host() {
    // The agents read origination files from the lab's scratch directory only.
    let scratch = format!("{DEFAULT_STATE_DIR}/scratch");
    let env = [("MESH_EGRESS_TLS_DIR", scratch.as_str())];
    let Some(mut lab) = lab_with_env("tls_is_originated_by_the_agent_toward_a_service_entry_host", &env) else {
        return;
    };
    let ca = start_internet_tls(&mut lab, "internet-tls", "api-tls.example.com");
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

#[test]
fn https_to_an_outside_host_leaves_through_the_egress_gateway() {
    let Some(mut lab) = lab_with_env("https_to_an_outside_host_leaves_through_the_egress_gateway", &[]) else { return };
    let ca = start_internet_tls(&mut lab, "internet-egress", "api.example.com");
    // The lab's gateway pod plays the egress gateway: a Service in front of it, a
    // PASSTHROUGH server, and Istio's egress-gateway VirtualService.
    apply_yaml(
        &lab,
        "egress-gateway.yaml",
        &format!(
            r#"apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: api, namespace: production}}
spec:
  hosts: [api.example.com]
  ports: [{{number: 443, name: tls, protocol: TLS}}]
  resolution: STATIC
  endpoints: [{{address: {CLIENT_ADDR}, ports: {{tls: 8443}}}}]
---
apiVersion: v1
kind: Service
metadata: {{name: istio-egressgateway, namespace: istio-ingress}}
spec: {{selector: {{istio: ingressgateway}}, clusterIP: 10.96.0.60, ports: [{{name: tls, port: 443, targetPort: 9448}}]}}
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: egress, namespace: istio-ingress}}
spec:
  selector: {{istio: ingressgateway}}
  servers:
  - port: {{number: 9448, name: tls-egress, protocol: TLS}}
    hosts: [api.example.com]
    tls: {{mode: PASSTHROUGH}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: api-through-egress, namespace: production}}
spec:
  hosts: [api.example.com]
  gateways: [mesh, istio-ingress/egress]
  tls:
  - match: [{{gateways: [mesh], port: 443, sniHosts: [api.example.com]}}]
    route: [{{destination: {{host: istio-egressgateway.istio-ingress.svc.cluster.local, port: {{number: 443}}}}}}]
  - match: [{{gateways: [istio-ingress/egress], port: 9448, sniHosts: [api.example.com]}}]
    route: [{{destination: {{host: api.example.com, port: {{number: 443}}}}}}]
"#
        ),
    );
    // frontend's own TLS to api.example.com, at whatever address its resolver gave.
    let said = eventually("frontend reaches api.example.com through the egress gateway", || {
        let out = lab
            .exec(
                "frontend",
                &[
                    "curl",
                    "-s",
                    "-m",
                    "5",
                    "--cacert",
                    &ca,
                    "--resolve",
                    "api.example.com:443:192.0.2.50",
                    "https://api.example.com/",
                ],
            )
            .unwrap();
        let body = String::from_utf8_lossy(&out.stdout).into_owned();
        body.contains("s_server").then_some(body)
    });
    assert!(said.contains("TLSv1.3"), "{said}");
    // The gateway opened the connection to the entry; node1's agent sent frontend's
    // connection to the gateway.
    let m = metrics(&lab, "node1");
    assert!(
        m.lines().any(|l| l.starts_with("istio_tcp_connections_opened_total")
            && l.contains("reporter=\"source\"")
            && l.contains("source_workload=\"frontend\"")
            && l.contains("destination_service=\"istio-egressgateway.istio-ingress.svc.cluster.local\"")),
        "{m}"
    );
}

#[test]
fn plain_http_leaves_through_the_egress_gateway_which_originates_tls() {
    // The gateway reads origination files from the lab's scratch directory only.
    let scratch = format!("{DEFAULT_STATE_DIR}/scratch");
    let env = [("MESH_EGRESS_TLS_DIR", scratch.as_str())];
    let Some(mut lab) = lab_with_env("plain_http_leaves_through_the_egress_gateway_which_originates_tls", &env) else {
        return;
    };
    let ca = start_internet_tls(&mut lab, "internet-http-egress", "edition.example.com");
    // Istio's "egress gateway with TLS origination": the lab's gateway pod plays the
    // egress gateway, a mesh rule sends the pods' HTTP to it, its rule sends it on to
    // the entry's port 443, where the DestinationRule makes it open TLS.
    apply_yaml(
        &lab,
        "egress-gateway-http.yaml",
        &format!(
            r#"apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: cnn, namespace: production}}
spec:
  hosts: [edition.example.com]
  ports:
  - {{number: 80, name: http-port, protocol: HTTP}}
  - {{number: 443, name: https-port, protocol: HTTPS}}
  resolution: STATIC
  endpoints: [{{address: {CLIENT_ADDR}, ports: {{https-port: 8443}}}}]
---
apiVersion: v1
kind: Service
metadata: {{name: istio-egressgateway, namespace: istio-ingress}}
spec: {{selector: {{istio: ingressgateway}}, clusterIP: 10.96.0.61, ports: [{{name: http, port: 80, targetPort: 9449}}]}}
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: egress-http, namespace: istio-ingress}}
spec:
  selector: {{istio: ingressgateway}}
  servers:
  - port: {{number: 9449, name: http, protocol: HTTP}}
    hosts: [edition.example.com]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: cnn-through-egress, namespace: production}}
spec:
  hosts: [edition.example.com]
  gateways: [mesh, istio-ingress/egress-http]
  http:
  - match: [{{gateways: [mesh], port: 80}}]
    route: [{{destination: {{host: istio-egressgateway.istio-ingress.svc.cluster.local, port: {{number: 80}}}}}}]
  - match: [{{gateways: [istio-ingress/egress-http], port: 9449}}]
    route: [{{destination: {{host: edition.example.com, port: {{number: 443}}}}}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: originate-tls-for-cnn, namespace: production}}
spec:
  host: edition.example.com
  trafficPolicy:
    portLevelSettings:
    - port: {{number: 443}}
      tls: {{mode: SIMPLE, caCertificates: {ca}}}
"#
        ),
    );
    // frontend speaks plain HTTP to whatever address its resolver gave.
    let said = eventually("frontend's HTTP reaches the server through the egress gateway", || {
        let out = lab
            .exec(
                "frontend",
                &[
                    "curl",
                    "-s",
                    "-m",
                    "5",
                    "--resolve",
                    "edition.example.com:80:192.0.2.51",
                    "http://edition.example.com/",
                ],
            )
            .unwrap();
        let body = String::from_utf8_lossy(&out.stdout).into_owned();
        body.contains("s_server").then_some(body)
    });
    assert!(said.contains("TLSv1.3"), "the gateway's TLS 1.3 session: {said}");
    // node1's agent routed frontend's request to the gateway's Service at L7.
    let m = metrics(&lab, "node1");
    assert!(
        m.lines().any(|l| l.starts_with("istio_requests_total")
            && l.contains("source_workload=\"frontend\"")
            && l.contains("destination_service=\"istio-egressgateway.istio-ingress.svc.cluster.local\"")
            && l.contains("response_code=\"200\"")),
        "{m}"
    );
}

//! Ingress in the lab: the reference Gateway and VirtualService as written
//! (`examples/seed`), served by the lab's gateway pod (the mesh's binary in gateway
//! mode), driven by real clients (curl, openssl s_client) from the `meshlab-client`
//! netns outside the cluster.
#![forbid(unsafe_code)]

use mesh_tests::harness::{apply_seed, eventually, lab, metrics, reply_pod};
use mesh_tests::lab::{CLIENT_NETNS, Lab};
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

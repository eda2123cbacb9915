//! The gateway in-process, on loopback, without root: the agents' in-process mesh
//! (`proxy::tests`) serves the pods, a gateway pod at `127.<net>.0.50` serves the
//! Gateway, and a real TLS client (rustls) talks to it.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt as _, Empty};
use hyper_util::rt::TokioIo;
use rustls::RootCertStore;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::tls::Secrets;
use super::{Gateway, GatewayContext};
use crate::config::parse_documents;
use crate::proxy::tests::{APPS, Mesh, SUBSETS, TestCa, config, served_by, tls_app};
use crate::snapshot::Snapshot;
use crate::state::MeshScope;
use crate::transport::limits::ConnLimits;

const HTTP: u16 = 8080;
const HTTPS: u16 = 8443;
const MUTUAL: u16 = 9443;
const PASSTHROUGH: u16 = 9445;
const TCP: u16 = 9446;

fn indent(pem: &str) -> String {
    pem.lines().map(|l| format!("    {l}\n")).collect()
}

/// The gateway's pod, the Gateway (HTTP with httpsRedirect, SIMPLE and MUTUAL HTTPS),
/// its Secrets, and the reference VirtualService bound to it and the mesh.
fn edge_yaml(net: u8, server: &(String, String), client_ca: &str) -> String {
    let (cert, key) = server;
    format!(
        r#"
---
apiVersion: v1
kind: Pod
metadata: {{name: istio-ingressgateway, namespace: istio-ingress, labels: {{istio: ingressgateway}}}}
spec: {{serviceAccountName: istio-ingressgateway, nodeName: node1}}
status: {{podIP: 127.{net}.0.50}}
---
apiVersion: v1
kind: Secret
metadata: {{name: myapp-tls-secret, namespace: istio-ingress}}
type: kubernetes.io/tls
stringData:
  tls.crt: |
{}  tls.key: |
{}---
apiVersion: v1
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
metadata: {{name: myapp-gateway, namespace: shop}}
spec:
  selector: {{istio: ingressgateway}}
  servers:
  - port: {{number: {HTTP}, name: http, protocol: HTTP}}
    hosts: [myapp.example.com]
    tls: {{httpsRedirect: true}}
  - port: {{number: {HTTPS}, name: https, protocol: HTTPS}}
    hosts: [myapp.example.com]
    tls: {{mode: SIMPLE, credentialName: myapp-tls-secret}}
  - port: {{number: {MUTUAL}, name: https-partner, protocol: HTTPS}}
    hosts: [myapp.example.com]
    tls: {{mode: MUTUAL, credentialName: partner-tls}}
  - port: {{number: {PASSTHROUGH}, name: tls-secure, protocol: TLS}}
    hosts: [secure.example.com]
    tls: {{mode: PASSTHROUGH}}
  - port: {{number: {TCP}, name: tcp-myapp, protocol: TCP}}
    hosts: ["*"]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: myapp-tcp, namespace: shop}}
spec:
  hosts: ["*"]
  gateways: [myapp-gateway]
  tcp:
  - match: [{{port: {TCP}}}]
    route: [{{destination: {{host: myapp, subset: v2, port: {{number: 80}}}}}}]
---
apiVersion: v1
kind: Service
metadata: {{name: secure, namespace: shop}}
spec: {{selector: {{app: myapp, version: v1}}, clusterIP: 10.96.{net}.30, ports: [{{name: tls, port: 443, targetPort: 8443}}]}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: secure, namespace: shop}}
spec:
  hosts: [secure.example.com]
  gateways: [myapp-gateway]
  tls:
  - match: [{{sniHosts: [secure.example.com]}}]
    route: [{{destination: {{host: secure, port: {{number: 443}}}}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: myapp, namespace: shop}}
spec:
  hosts: [myapp, myapp.example.com]
  gateways: [mesh, myapp-gateway]
  http:
  - match: [{{headers: {{x-version: {{exact: v2}}}}}}]
    route: [{{destination: {{host: myapp, subset: v2}}}}]
  - route: [{{destination: {{host: myapp, subset: v1}}}}]
"#,
        indent(cert),
        indent(key),
        indent(cert),
        indent(key),
        indent(client_ca),
    )
}

/// The in-process mesh plus a gateway serving it.
struct Edge {
    mesh: Mesh,
    gateway: Gateway,
    ip: IpAddr,
}

impl Edge {
    async fn start(net: u8, server_ca: &TestCa, client_ca: &TestCa) -> Self {
        Self::start_with(net, server_ca, client_ca, "").await
    }

    /// [`Edge::start`] with `extra` objects in the config.
    async fn start_with(net: u8, server_ca: &TestCa, client_ca: &TestCa, extra: &str) -> Self {
        Self::start_in(net, server_ca, client_ca, extra, None).await
    }

    /// [`Edge::start_with`], the agents and the gateway reading TLS origination files
    /// from `egress_tls_dir`.
    async fn start_in(
        net: u8,
        server_ca: &TestCa,
        client_ca: &TestCa,
        extra: &str,
        egress_tls_dir: Option<&Path>,
    ) -> Self {
        let yaml = format!(
            "{}{}{extra}",
            config(net, SUBSETS),
            edge_yaml(net, &server_ca.issue(&["myapp.example.com"]), &client_ca.pem())
        );
        let mut mesh = Mesh::start(&yaml, APPS).await;
        if let Some(dir) = egress_tls_dir {
            mesh.ctx.egress_tls_dir = dir.into();
        }
        let snap = mesh.ctx.snapshot.load_full();
        // The gateway holds its own identity, as the agents hold their pods'.
        mesh.ctx.dialer.certs.set_local(snap.workloads.iter().map(|w| w.identity.clone()));
        let objects = parse_documents(Path::new("edge.yaml"), &yaml).unwrap();
        let secrets = Secrets::of_namespace(&objects, "istio-ingress");
        let mut l7 = mesh.ctx.l7_context();
        // A gateway reads its namespace's Secrets for the TLS it originates too.
        l7.secrets = Some(Arc::new(arc_swap::ArcSwap::from_pointee(secrets.clone())));
        let ctx = GatewayContext {
            l7,
            netns: mesh.netns.clone(),
            limits: Arc::new(ConnLimits::new(64, 256)),
            tasks: Default::default(),
            tcp_idle_timeout: std::time::Duration::from_secs(60),
        };
        let ip = IpAddr::from([127, net, 0, 50]);
        let mut gateway = Gateway::new(ctx, "istio-ingress/istio-ingressgateway".into(), ip);
        let problems = gateway.apply(&snap, &secrets).await;
        assert_eq!(problems, Vec::<String>::new());
        assert!(gateway.ports().starts_with(&[HTTP, HTTPS, MUTUAL, PASSTHROUGH, TCP]), "{:?}", gateway.ports());
        Self { mesh, gateway, ip }
    }

    fn addr(&self, port: u16) -> SocketAddr {
        SocketAddr::new(self.ip, port)
    }
}

fn get(path: &str, host: &str) -> Request<Empty<Bytes>> {
    Request::get(path).header("host", host).body(Empty::new()).unwrap()
}

type ClientCert = (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>);

/// A TLS connection to `addr` with SNI `sni`, trusting `roots`.
async fn connect(
    addr: SocketAddr,
    sni: &str,
    roots: RootCertStore,
    client: Option<ClientCert>,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let mut config = match client {
        Some((chain, key)) => builder.with_client_auth_cert(chain, key).unwrap(),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = TcpStream::connect(addr).await?;
    let mut tls =
        TlsConnector::from(Arc::new(config)).connect(ServerName::try_from(sni.to_string()).unwrap(), tcp).await?;
    // TLS 1.3 reports a refused client certificate after the handshake: read once.
    let _ = tokio::time::timeout(Duration::from_millis(100), tokio::io::AsyncReadExt::read(&mut tls, &mut [])).await;
    Ok(tls)
}

async fn send<S>(stream: S, req: Request<Empty<Bytes>>) -> Result<Response<Bytes>, hyper::Error>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let res = sender.send_request(req).await?;
    let (parts, body) = res.into_parts();
    Ok(Response::from_parts(parts, body.collect().await?.to_bytes()))
}

fn client_cert(ca: &TestCa, name: &str) -> ClientCert {
    let (cert, key) = ca.issue(&[name]);
    let chain = rustls_pemfile::certs(&mut cert.as_bytes()).collect::<Result<Vec<_>, _>>().unwrap();
    let key = rustls_pemfile::private_key(&mut key.as_bytes()).unwrap().unwrap();
    (chain, key)
}

#[tokio::test]
async fn plain_http_is_sent_to_https() {
    let (server_ca, client_ca) = (TestCa::new(), TestCa::new());
    let edge = Edge::start(41, &server_ca, &client_ca).await;
    let tcp = TcpStream::connect(edge.addr(HTTP)).await.unwrap();
    let res = send(tcp, get("/api/items?x=1", "myapp.example.com")).await.unwrap();
    assert_eq!(res.status(), 301);
    assert_eq!(res.headers()["location"], "https://myapp.example.com/api/items?x=1");
}

#[tokio::test]
async fn https_is_routed_by_the_bound_virtual_service_into_the_mesh_over_mutual_tls() {
    let (server_ca, client_ca) = (TestCa::new(), TestCa::new());
    let edge = Edge::start(42, &server_ca, &client_ca).await;
    for _ in 0..2 {
        let tls = connect(edge.addr(HTTPS), "myapp.example.com", server_ca.roots(), None).await.unwrap();
        let mut v2 = get("/", "myapp.example.com");
        v2.headers_mut().insert("x-version", "v2".parse().unwrap());
        assert_eq!(served_by(&send(tls, v2).await.unwrap()), "myapp-v2");
        let tls = connect(edge.addr(HTTPS), "myapp.example.com", server_ca.roots(), None).await.unwrap();
        assert_eq!(served_by(&send(tls, get("/", "myapp.example.com")).await.unwrap()), "myapp-v1");
    }
    // `myapp` is a mesh host of the VirtualService, not one the gateway's server serves.
    let tls = connect(edge.addr(HTTPS), "myapp.example.com", server_ca.roots(), None).await.unwrap();
    assert_eq!(send(tls, get("/", "myapp")).await.unwrap().status(), 404);
    // The pods saw the gateway's own identity, over the mesh's mutual TLS.
    let metrics = edge.mesh.metrics();
    let from_gateway = metrics.lines().any(|l| {
        l.starts_with("tcp_connections_opened_total")
            && l.contains("reporter=\"destination\"")
            && l.contains("connection_security_policy=\"mutual_tls\"")
            && l.contains("source_principal=\"spiffe://cluster.local/ns/istio-ingress/sa/istio-ingressgateway\"")
    });
    assert!(from_gateway, "{metrics}");
}

#[tokio::test]
async fn a_client_of_the_wrong_name_or_without_the_servers_ca_gets_nothing() {
    let (server_ca, client_ca) = (TestCa::new(), TestCa::new());
    let edge = Edge::start(43, &server_ca, &client_ca).await;
    // No server for this SNI: closed before any certificate is shown.
    assert!(connect(edge.addr(HTTPS), "other.example.com", server_ca.roots(), None).await.is_err());
    // A client that does not trust the server's CA refuses it.
    assert!(connect(edge.addr(HTTPS), "myapp.example.com", TestCa::new().roots(), None).await.is_err());
}

#[tokio::test]
async fn mutual_tls_refuses_clients_without_a_certificate_from_the_client_ca() {
    let (server_ca, client_ca) = (TestCa::new(), TestCa::new());
    let edge = Edge::start(44, &server_ca, &client_ca).await;
    let refused = match connect(edge.addr(MUTUAL), "myapp.example.com", server_ca.roots(), None).await {
        Err(_) => true,
        Ok(tls) => send(tls, get("/", "myapp.example.com")).await.is_err(),
    };
    assert!(refused, "no client certificate");
    let stranger = client_cert(&TestCa::new(), "partner.example.org");
    let refused = match connect(edge.addr(MUTUAL), "myapp.example.com", server_ca.roots(), Some(stranger)).await {
        Err(_) => true,
        Ok(tls) => send(tls, get("/", "myapp.example.com")).await.is_err(),
    };
    assert!(refused, "a certificate from another CA");
    let partner = client_cert(&client_ca, "partner.example.org");
    let tls = connect(edge.addr(MUTUAL), "myapp.example.com", server_ca.roots(), Some(partner)).await.unwrap();
    assert_eq!(served_by(&send(tls, get("/", "myapp.example.com")).await.unwrap()), "myapp-v1");
}

#[tokio::test]
async fn a_new_certificate_is_served_without_a_restart_and_open_connections_stay() {
    let (server_ca, client_ca) = (TestCa::new(), TestCa::new());
    let mut edge = Edge::start(45, &server_ca, &client_ca).await;
    let old = connect(edge.addr(HTTPS), "myapp.example.com", server_ca.roots(), None).await.unwrap();
    let (mut open, conn) = hyper::client::conn::http1::handshake(TokioIo::new(old)).await.unwrap();
    tokio::spawn(conn);
    assert_eq!(open.send_request(get("/", "myapp.example.com")).await.unwrap().status(), 200);

    // The Secret now holds a certificate from another CA.
    let rotated_ca = TestCa::new();
    let yaml = format!(
        "{}{}",
        config(45, SUBSETS),
        edge_yaml(45, &rotated_ca.issue(&["myapp.example.com"]), &client_ca.pem())
    );
    let objects = parse_documents(Path::new("edge.yaml"), &yaml).unwrap();
    let snap = Arc::new(Snapshot::compile(&objects, "cluster.local", 2));
    edge.mesh.ctx.snapshot.store(snap.clone());
    let problems = edge.gateway.apply(&snap, &Secrets::of_namespace(&objects, "istio-ingress")).await;
    assert_eq!(problems, Vec::<String>::new());

    let fresh = connect(edge.addr(HTTPS), "myapp.example.com", rotated_ca.roots(), None).await.unwrap();
    assert_eq!(served_by(&send(fresh, get("/", "myapp.example.com")).await.unwrap()), "myapp-v1");
    assert!(connect(edge.addr(HTTPS), "myapp.example.com", server_ca.roots(), None).await.is_err(), "old cert gone");
    let again = open.send_request(get("/", "myapp.example.com")).await.unwrap();
    assert_eq!(again.status(), 200, "the connection opened before the change still serves");

    // A broken certificate is refused and the last good one stays.
    let broken = yaml.replace("BEGIN CERTIFICATE", "BEGIN NONSENSE");
    let objects = parse_documents(Path::new("edge.yaml"), &broken).unwrap();
    let problems = edge.gateway.apply(&snap, &Secrets::of_namespace(&objects, "istio-ingress")).await;
    assert_eq!(problems, Vec::<String>::new(), "served with the last good certificate");
    let still = connect(edge.addr(HTTPS), "myapp.example.com", rotated_ca.roots(), None).await.unwrap();
    assert_eq!(send(still, get("/", "myapp.example.com")).await.unwrap().status(), 200);
}

#[tokio::test]
async fn passthrough_routes_by_sni_to_a_pod_that_terminates_its_own_tls() {
    let (server_ca, client_ca) = (TestCa::new(), TestCa::new());
    let edge = Edge::start(46, &server_ca, &client_ca).await;
    // myapp-v1 serves its own certificate, from a CA the gateway knows nothing of.
    let pod_ca = TestCa::new();
    tls_app("secure-v1", SocketAddr::from(([127, 46, 0, 2], 8443)), pod_ca.issue(&["secure.example.com"]), None).await;
    let tls = connect(edge.addr(PASSTHROUGH), "secure.example.com", pod_ca.roots(), None).await.unwrap();
    let res = send(tls, get("/", "secure.example.com")).await.unwrap();
    assert_eq!(served_by(&res), "secure-v1", "the pod's own TLS, through the gateway and the mesh");
    // Another name: no server, closed before any certificate.
    assert!(connect(edge.addr(PASSTHROUGH), "other.example.com", pod_ca.roots(), None).await.is_err());
    // The gateway did not terminate it: its own certificate's CA is not the one seen.
    assert!(connect(edge.addr(PASSTHROUGH), "secure.example.com", server_ca.roots(), None).await.is_err());
}

#[tokio::test]
async fn a_tcp_server_splices_by_the_bound_tcp_route() {
    let (server_ca, client_ca) = (TestCa::new(), TestCa::new());
    let edge = Edge::start(47, &server_ca, &client_ca).await;
    for _ in 0..3 {
        // HTTP bytes, which the TCP server does not read: the tcp route's subset answers.
        let tcp = TcpStream::connect(edge.addr(TCP)).await.unwrap();
        let res = send(tcp, get("/", "anything")).await.unwrap();
        assert_eq!(served_by(&res), "myapp-v2");
    }
}

#[tokio::test]
async fn requests_enter_the_mesh_with_forwarding_headers_the_client_cannot_forge() {
    let (server_ca, client_ca) = (TestCa::new(), TestCa::new());
    let edge = Edge::start(48, &server_ca, &client_ca).await;
    let tls = connect(edge.addr(HTTPS), "myapp.example.com", server_ca.roots(), None).await.unwrap();
    let client = tls.get_ref().0.local_addr().unwrap().ip();
    let mut req = get("/", "myapp.example.com");
    let h = req.headers_mut();
    h.insert("x-forwarded-for", "203.0.113.9".parse().unwrap());
    h.insert("x-request-id", "chosen-by-client".parse().unwrap());
    h.insert("x-envoy-external-address", "10.0.0.1".parse().unwrap());
    h.insert("x-envoy-upstream-rq-timeout-ms", "1".parse().unwrap());
    h.insert("x-forwarded-client-cert", "By=spiffe://cluster.local/ns/shop/sa/admin".parse().unwrap());
    let res = send(tls, req).await.unwrap();
    assert_eq!(served_by(&res), "myapp-v1");
    let seen = |n: &str| res.headers().get(format!("x-echo-{n}")).map(|v| v.to_str().unwrap().to_string());
    assert_eq!(seen("x-forwarded-for").unwrap(), format!("203.0.113.9,{client}"));
    assert_eq!(seen("x-forwarded-proto").unwrap(), "https");
    assert_eq!(seen("x-envoy-external-address").unwrap(), client.to_string());
    let id = seen("x-request-id").unwrap();
    assert!(id != "chosen-by-client" && id.len() == 36, "a request id of the gateway's own: {id}");
    assert_eq!(seen("x-envoy-upstream-rq-timeout-ms"), None);
    assert_eq!(seen("x-forwarded-client-cert"), None);

    // Plain HTTP says so.
    let tcp = TcpStream::connect(edge.addr(TCP)).await.unwrap();
    let res = send(tcp, get("/", "anything")).await.unwrap();
    assert_eq!(seen_on(&res, "x-forwarded-proto"), None, "a TCP route carries bytes, not headers");
}

fn seen_on(res: &Response<Bytes>, name: &str) -> Option<String> {
    res.headers().get(format!("x-echo-{name}")).map(|v| v.to_str().unwrap().to_string())
}

/// Policies on the gateway's own pod: by the client's address, for a path (DENY), and
/// for the TCP server's port (an ALLOW the loopback client is not in).
const EDGE_POLICIES: &str = r#"
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-admin-from-outside, namespace: istio-ingress}
spec:
  selector: {matchLabels: {istio: ingressgateway}}
  action: DENY
  rules:
  - from: [{source: {remoteIpBlocks: [127.0.0.0/8]}}]
    to: [{operation: {paths: ["/admin*"]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: tcp-from-partners-only, namespace: istio-ingress}
spec:
  selector: {matchLabels: {istio: ingressgateway}}
  action: DENY
  rules:
  - from: [{source: {notRemoteIpBlocks: [192.0.2.0/24]}}]
    to: [{operation: {ports: ["9446"]}}]
"#;

#[tokio::test]
async fn authorization_policies_selecting_the_gateway_apply_to_what_arrives_from_outside() {
    let (server_ca, client_ca) = (TestCa::new(), TestCa::new());
    let edge = Edge::start_with(49, &server_ca, &client_ca, EDGE_POLICIES).await;
    let ask = |path: &'static str| {
        let roots = server_ca.roots();
        let addr = edge.addr(HTTPS);
        async move {
            let tls = connect(addr, "myapp.example.com", roots, None).await.unwrap();
            send(tls, get(path, "myapp.example.com")).await.unwrap()
        }
    };
    let denied = ask("/admin/users").await;
    assert_eq!(denied.status(), 403);
    assert_eq!(denied.body(), "RBAC: access denied");
    // Judged on the path the application would read.
    assert_eq!(ask("/api/../admin/users").await.status(), 403);
    assert_eq!(ask("/%61dmin").await.status(), 403);
    let allowed = ask("/api/items").await;
    assert_eq!(served_by(&allowed), "myapp-v1");
    // The plain HTTP server judges before redirecting.
    let tcp = TcpStream::connect(edge.addr(HTTP)).await.unwrap();
    assert_eq!(send(tcp, get("/admin", "myapp.example.com")).await.unwrap().status(), 403);
    // The TCP server: the connection is closed without reaching the mesh.
    let tcp = TcpStream::connect(edge.addr(TCP)).await.unwrap();
    assert!(send(tcp, get("/", "anything")).await.is_err(), "the TCP port refuses this client");
    let metrics = edge.mesh.metrics();
    assert!(
        metrics.lines().any(|l| l.starts_with("mesh_denied_total")
            && l.contains("destination_workload=\"istio-ingressgateway\"")
            && l.contains("reason=\"HttpPolicy\"")),
        "{metrics}"
    );
}

/// The egress-gateway pattern for HTTPS, as Istio's documentation writes it: a
/// ServiceEntry for the outside host, a PASSTHROUGH server on the gateway, and one
/// VirtualService whose mesh `tls:` rule sends the pods' connections to the gateway's
/// Service and whose gateway rule sends them on to the entry.
fn egress_yaml(net: u8) -> String {
    format!(
        r#"
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: api, namespace: shop}}
spec:
  hosts: [api.example.com]
  ports: [{{number: 443, name: tls, protocol: TLS}}]
  resolution: STATIC
  endpoints: [{{address: 127.{net}.0.201, ports: {{tls: 8443}}}}]
---
apiVersion: v1
kind: Service
metadata: {{name: istio-egressgateway, namespace: istio-ingress}}
spec: {{selector: {{istio: ingressgateway}}, clusterIP: 10.96.{net}.60, ports: [{{name: tls, port: 443, targetPort: {EGRESS}}}]}}
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: egress, namespace: istio-ingress}}
spec:
  selector: {{istio: ingressgateway}}
  servers:
  - port: {{number: {EGRESS}, name: tls-egress, protocol: TLS}}
    hosts: [api.example.com]
    tls: {{mode: PASSTHROUGH}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: api-through-egress, namespace: shop}}
spec:
  hosts: [api.example.com]
  gateways: [mesh, istio-ingress/egress]
  tls:
  - match: [{{gateways: [mesh], port: 443, sniHosts: [api.example.com]}}]
    route: [{{destination: {{host: istio-egressgateway.istio-ingress.svc.cluster.local, port: {{number: 443}}}}}}]
  - match: [{{gateways: [istio-ingress/egress], port: {EGRESS}, sniHosts: [api.example.com]}}]
    route: [{{destination: {{host: api.example.com, port: {{number: 443}}}}}}]
"#
    )
}

/// The egress gateway's PASSTHROUGH port in the tests.
const EGRESS: u16 = 9448;

#[tokio::test]
async fn https_to_an_outside_host_leaves_through_the_egress_gateway() {
    let net = 50;
    let (server_ca, client_ca) = (TestCa::new(), TestCa::new());
    let edge = Edge::start_with(net, &server_ca, &client_ca, &egress_yaml(net)).await;
    assert_eq!(edge.gateway.ports().last(), Some(&EGRESS));
    let internet_ca = TestCa::new();
    tls_app(
        "internet-tls",
        SocketAddr::from(([127, net, 0, 201], 8443)),
        internet_ca.issue(&["api.example.com"]),
        None,
    )
    .await;
    // The pod dials whatever address DNS gave it for api.example.com, on 443.
    let somewhere = SocketAddr::from(([203, 0, 113, 7], 443));
    let tcp = edge.mesh.dial("client", somewhere).await;
    let tls = tls_over(tcp, "api.example.com", internet_ca.roots()).await;
    let res = send(tls, get("/", "api.example.com")).await.unwrap();
    assert_eq!(served_by(&res), "internet-tls", "the pod's own TLS, end to end through the gateway");
    // It went through the gateway: the gateway opened the connection to the entry.
    let metrics = edge.mesh.metrics();
    let via_gateway = metrics.lines().any(|l| {
        l.starts_with("tcp_connections_opened_total")
            && l.contains("reporter=\"source\"")
            && l.contains("source_workload=\"istio-ingressgateway\"")
            && l.contains("destination_service=\"api.example.com\"")
    });
    assert!(via_gateway, "{metrics}");
}

/// Istio's egress gateway for plain HTTP with TLS origination at the gateway: the
/// pods speak HTTP to the outside host, a mesh VirtualService's `http:` rule sends them
/// to the egress gateway's Service, the gateway's rule on to the entry's port 443, and
/// the entry's DestinationRule makes the gateway open TLS there.
fn http_egress_yaml(net: u8, tls: &str) -> String {
    format!(
        r#"
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: cnn, namespace: shop}}
spec:
  hosts: [edition.example.com]
  ports:
  - {{number: 80, name: http-port, protocol: HTTP}}
  - {{number: 443, name: https-port, protocol: HTTPS}}
  resolution: STATIC
  endpoints: [{{address: 127.{net}.0.202, ports: {{https-port: 8443}}}}]
---
apiVersion: v1
kind: Service
metadata: {{name: istio-egressgateway, namespace: istio-ingress}}
spec: {{selector: {{istio: ingressgateway}}, clusterIP: 10.96.{net}.61, ports: [{{name: http, port: 80, targetPort: {EGRESS_HTTP}}}]}}
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: egress-http, namespace: istio-ingress}}
spec:
  selector: {{istio: ingressgateway}}
  servers:
  - port: {{number: {EGRESS_HTTP}, name: http, protocol: HTTP}}
    hosts: [edition.example.com]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: cnn-through-egress, namespace: shop}}
spec:
  hosts: [edition.example.com]
  gateways: [mesh, istio-ingress/egress-http]
  http:
  - match: [{{gateways: [mesh], port: 80}}]
    route: [{{destination: {{host: istio-egressgateway.istio-ingress.svc.cluster.local, port: {{number: 80}}}}}}]
  - match: [{{gateways: [istio-ingress/egress-http], port: {EGRESS_HTTP}}}]
    route: [{{destination: {{host: edition.example.com, port: {{number: 443}}}}}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: originate-tls-for-cnn, namespace: shop}}
spec:
  host: edition.example.com
  trafficPolicy:
    portLevelSettings:
    - port: {{number: 443}}
      tls: {tls}
"#
    )
}

/// The egress gateway's plain HTTP port in the tests.
const EGRESS_HTTP: u16 = 9449;

#[tokio::test]
async fn plain_http_leaves_through_the_egress_gateway_which_originates_tls() {
    let net = 51;
    let (server_ca, client_ca, internet_ca) = (TestCa::new(), TestCa::new(), TestCa::new());
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("internet-ca.pem");
    std::fs::write(&ca, internet_ca.pem()).unwrap();
    let yaml = http_egress_yaml(net, &format!("{{mode: SIMPLE, caCertificates: {}}}", ca.display()));
    let edge = Edge::start_in(net, &server_ca, &client_ca, &yaml, Some(dir.path())).await;
    assert!(edge.gateway.ports().contains(&EGRESS_HTTP), "{:?}", edge.gateway.ports());
    let internet = SocketAddr::from(([127, net, 0, 202], 8443));
    tls_app("internet-tls", internet, internet_ca.issue(&["edition.example.com"]), None).await;
    // The pod dials whatever address DNS gave it, on 80, in plaintext.
    let somewhere = SocketAddr::from(([203, 0, 113, 9], 80));
    let res = send(edge.mesh.dial("client", somewhere).await, get("/politics", "edition.example.com")).await.unwrap();
    assert_eq!(served_by(&res), "internet-tls", "HTTP from the pod, TLS from the gateway");
    // Through the gateway: the gateway sent the request to the entry.
    let metrics = edge.mesh.metrics();
    let hop = |source: &str, dest: &str| {
        metrics.lines().any(|l| {
            l.starts_with("requests_total")
                && l.contains(&format!("source_workload=\"{source}\""))
                && l.contains(&format!("destination_service=\"{dest}\""))
                && l.contains("response_code=\"200\"")
        })
    };
    assert!(hop("client", "istio-egressgateway.istio-ingress.svc.cluster.local"), "{metrics}");
    assert!(hop("istio-ingressgateway", "edition.example.com"), "{metrics}");
}

#[tokio::test]
async fn the_egress_gateway_originates_mutual_tls_with_a_secret_of_its_namespace() {
    let net = 52;
    let (server_ca, client_ca, internet_ca, internet_clients) =
        (TestCa::new(), TestCa::new(), TestCa::new(), TestCa::new());
    let (cert, key) = internet_clients.issue(&["egress.example.com"]);
    // Istio's "mutual TLS origination with an egress gateway": the client credential
    // and the server's CA in one Secret of the gateway's namespace.
    let secret = format!(
        "---\napiVersion: v1\nkind: Secret\nmetadata: {{name: client-credential, namespace: istio-ingress}}\n\
         type: Opaque\nstringData:\n  tls.crt: |\n{}  tls.key: |\n{}  ca.crt: |\n{}",
        indent(&cert),
        indent(&key),
        indent(&internet_ca.pem())
    );
    let tls = "{mode: MUTUAL, credentialName: client-credential, sni: edition.example.com}";
    let yaml = format!("{}{secret}", http_egress_yaml(net, tls));
    let edge = Edge::start_with(net, &server_ca, &client_ca, &yaml).await;
    let internet = SocketAddr::from(([127, net, 0, 202], 8443));
    tls_app("internet-mtls", internet, internet_ca.issue(&["edition.example.com"]), Some(&internet_clients)).await;
    let somewhere = SocketAddr::from(([203, 0, 113, 9], 80));
    let res = send(edge.mesh.dial("client", somewhere).await, get("/", "edition.example.com")).await.unwrap();
    assert_eq!(served_by(&res), "internet-mtls", "the gateway presented the Secret's client certificate");
}

/// A TLS client on an open connection.
async fn tls_over(tcp: TcpStream, sni: &str, roots: RootCertStore) -> tokio_rustls::client::TlsStream<TcpStream> {
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    TlsConnector::from(Arc::new(config)).connect(ServerName::try_from(sni.to_string()).unwrap(), tcp).await.unwrap()
}

/// The Gateway API on the same gateway pod: a Gateway of class `istio` bound to the
/// pod's Service (Istio's manual deployment), an HTTPRoute splitting by weight with a
/// prefix rewrite and a header filter, a GRPCRoute by service name, and a route whose
/// backend is in a namespace that granted nothing.
fn gateway_api_yaml(net: u8) -> String {
    format!(
        r#"
---
apiVersion: v1
kind: Service
metadata: {{name: istio-ingressgateway, namespace: istio-ingress}}
spec: {{selector: {{istio: ingressgateway}}, clusterIP: 10.96.{net}.61, ports: [{{name: http, port: 80, targetPort: {API_HTTP}}}]}}
---
apiVersion: v1
kind: Service
metadata: {{name: myapp-v1, namespace: shop}}
spec: {{selector: {{app: myapp, version: v1}}, clusterIP: 10.96.{net}.21, ports: [{{port: 80, targetPort: 8080, name: http}}]}}
---
apiVersion: v1
kind: Service
metadata: {{name: myapp-v2, namespace: shop}}
spec: {{selector: {{app: myapp, version: v2}}, clusterIP: 10.96.{net}.22, ports: [{{port: 80, targetPort: 8080, name: http}}]}}
---
apiVersion: v1
kind: Service
metadata: {{name: myapp, namespace: istio-ingress}}
spec: {{selector: {{app: myapp}}, clusterIP: 10.96.{net}.23, ports: [{{port: 80, targetPort: 8080, name: http}}]}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: GatewayClass
metadata: {{name: istio}}
spec: {{controllerName: istio.io/gateway-controller}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: web, namespace: istio-ingress}}
spec:
  gatewayClassName: istio
  addresses: [{{type: Hostname, value: istio-ingressgateway.istio-ingress.svc.cluster.local}}]
  listeners:
  - name: http
    port: {API_HTTP}
    protocol: HTTP
    allowedRoutes: {{namespaces: {{from: All}}}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: web, namespace: shop}}
spec:
  parentRefs: [{{name: web, namespace: istio-ingress}}]
  hostnames: [web.example.com]
  rules:
  - matches: [{{path: {{type: PathPrefix, value: /v2}}}}]
    filters:
    - type: URLRewrite
      urlRewrite: {{path: {{type: ReplacePrefixMatch, replacePrefixMatch: /}}}}
    - type: RequestHeaderModifier
      requestHeaderModifier: {{set: [{{name: x-route, value: v2-only}}]}}
    backendRefs: [{{name: myapp-v2, port: 80}}]
  - backendRefs:
    - {{name: myapp-v1, port: 80, weight: 3}}
    - {{name: myapp-v2, port: 80, weight: 1}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {{name: grpc, namespace: shop}}
spec:
  parentRefs: [{{name: web, namespace: istio-ingress, sectionName: http}}]
  hostnames: [grpc.example.com]
  rules:
  - matches: [{{method: {{service: mesh.Echo}}}}]
    backendRefs: [{{name: myapp-v2, port: 80}}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: elsewhere, namespace: istio-ingress}}
spec:
  parentRefs: [{{name: web}}]
  hostnames: [elsewhere.example.com]
  rules:
  - backendRefs: [{{name: myapp-v1, namespace: shop, port: 80}}]
"#
    )
}

/// The Gateway API listener's port in the tests.
const API_HTTP: u16 = 9450;

#[tokio::test]
async fn gateway_api_routes_split_by_weight_rewrite_and_route_grpc_by_service() {
    let net = 53;
    let (server_ca, client_ca) = (TestCa::new(), TestCa::new());
    let edge = Edge::start_with(net, &server_ca, &client_ca, &gateway_api_yaml(net)).await;
    assert!(edge.gateway.ports().contains(&API_HTTP), "{:?}", edge.gateway.ports());
    let request = |path: &str, host: &str| {
        let (addr, req) = (edge.addr(API_HTTP), get(path, host));
        async move { send(TcpStream::connect(addr).await.unwrap(), req).await.unwrap() }
    };
    // `/v2` and below: v2 only, the prefix rewritten to `/`, the header set.
    let res = request("/v2/items", "web.example.com").await;
    assert_eq!((res.status().as_u16(), served_by(&res)), (200, "myapp-v2"));
    assert_eq!(res.headers()["x-path"], "/items");
    assert_eq!(seen_on(&res, "x-route").as_deref(), Some("v2-only"));
    let res = request("/v2", "web.example.com").await;
    assert_eq!((served_by(&res), &res.headers()["x-path"]), ("myapp-v2", &"/".parse::<http::HeaderValue>().unwrap()));
    // `/v2x` is not under the prefix `/v2`: the weighted rule, path untouched.
    let (mut v1, mut v2) = (0, 0);
    for _ in 0..40 {
        let res = request("/v2x", "web.example.com").await;
        assert_eq!(res.headers()["x-path"], "/v2x");
        match served_by(&res) {
            "myapp-v1" => v1 += 1,
            "myapp-v2" => v2 += 1,
            other => panic!("served by {other}"),
        }
    }
    assert!(v1 > v2 && v2 > 0, "weights 3:1 gave v1={v1} v2={v2}");
    // A host no route names.
    assert_eq!(request("/", "other.example.com").await.status(), 404);
    // A backend in a namespace that granted nothing: answered 500, never reached.
    let res = request("/", "elsewhere.example.com").await;
    assert_eq!((res.status().as_u16(), served_by(&res)), (500, "-"));
    // gRPC by service name, over HTTP/2 without TLS.
    let tcp = TcpStream::connect(edge.addr(API_HTTP)).await.unwrap();
    let (mut h2, conn) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), TokioIo::new(tcp)).await.unwrap();
    tokio::spawn(conn);
    let call = |path: &str| {
        Request::post(format!("http://grpc.example.com{path}"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(Empty::<Bytes>::new())
            .unwrap()
    };
    let res = h2.send_request(call("/mesh.Echo/Say")).await.unwrap();
    assert_eq!((res.status().as_u16(), served_by_parts(res.headers())), (200, "myapp-v2".to_string()));
    assert_eq!(res.headers()["x-path"], "/mesh.Echo/Say");
    let res = h2.send_request(call("/other.Service/Say")).await.unwrap();
    assert_eq!(res.status(), 404, "a service no rule matches");
    // The status a controller writes back.
    let snap = edge.mesh.ctx.snapshot.load_full();
    let status = |kind: &str, name: &str| {
        snap.gateway_api_status.iter().find(|s| s.kind == kind && s.name == name).map(|s| s.status.clone()).unwrap()
    };
    let cond = |v: &serde_json::Value, t: &str| {
        v["conditions"].as_array().unwrap().iter().find(|c| c["type"] == t).map(|c| c["status"].clone()).unwrap()
    };
    let gw = status("Gateway", "web");
    assert_eq!((cond(&gw, "Accepted"), cond(&gw, "Programmed")), ("True".into(), "True".into()), "{gw}");
    assert_eq!(gw["listeners"][0]["attachedRoutes"], 3, "{gw}");
    let web = status("HTTPRoute", "web");
    assert_eq!(cond(&web["parents"][0], "ResolvedRefs"), "True", "{web}");
    let elsewhere = status("HTTPRoute", "elsewhere");
    assert_eq!(cond(&elsewhere["parents"][0], "Accepted"), "True", "{elsewhere}");
    assert_eq!(cond(&elsewhere["parents"][0], "ResolvedRefs"), "False", "{elsewhere}");
    assert!(snap.problems.iter().any(|p| p.to_string().contains("no ReferenceGrant")), "{:?}", snap.problems);
}

fn served_by_parts(headers: &http::HeaderMap) -> String {
    headers.get("x-served-by").and_then(|v| v.to_str().ok()).unwrap_or("-").to_string()
}

/// An ISTIO_MUTUAL server (a gateway other mesh workloads call, as an east-west or
/// internal gateway): the gateway's own mesh certificate, mesh clients only, and an
/// AuthorizationPolicy on the gateway naming the client by its principal.
fn istio_mutual_yaml() -> String {
    format!(
        r#"
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: internal, namespace: istio-ingress}}
spec:
  selector: {{istio: ingressgateway}}
  servers:
  - port: {{number: {ISTIO_MUTUAL}, name: https-mesh, protocol: HTTPS}}
    hosts: ["*"]
    tls: {{mode: ISTIO_MUTUAL}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: internal, namespace: shop}}
spec:
  hosts: [myapp.internal.example]
  gateways: [istio-ingress/internal]
  http: [{{route: [{{destination: {{host: myapp, subset: v1}}}}]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: internal-callers, namespace: istio-ingress}}
spec:
  selector: {{matchLabels: {{istio: ingressgateway}}}}
  action: ALLOW
  rules:
  - from: [{{source: {{principals: [cluster.local/ns/shop/sa/client]}}}}]
    to: [{{operation: {{ports: ["{ISTIO_MUTUAL}"]}}}}]
"#
    )
}

/// The ISTIO_MUTUAL server's port in the tests.
const ISTIO_MUTUAL: u16 = 9452;

#[tokio::test]
async fn istio_mutual_serves_mesh_clients_by_identity_and_refuses_others() {
    let net = 54;
    let (server_ca, client_ca) = (TestCa::new(), TestCa::new());
    let edge = Edge::start_with(net, &server_ca, &client_ca, &istio_mutual_yaml()).await;
    assert!(edge.gateway.ports().contains(&ISTIO_MUTUAL), "{:?}", edge.gateway.ports());
    let snap = edge.mesh.ctx.snapshot.load_full();
    let identity = |name: &str| snap.workloads.iter().find(|w| w.name == name).unwrap().identity.clone();
    let dialer = &edge.mesh.ctx.dialer;
    // A mesh workload's client: its own certificate, the gateway's identity expected.
    let call = |source: crate::identity::Identity| {
        let config = crate::identity::client_config(
            dialer.certs.clone(),
            source,
            identity("istio-ingressgateway"),
            &dialer.verifier,
        )
        .unwrap();
        let addr = edge.addr(ISTIO_MUTUAL);
        async move {
            let tcp = TcpStream::connect(addr).await.unwrap();
            let name = ServerName::try_from("istio-ingressgateway").unwrap();
            let tls = TlsConnector::from(config).connect(name, tcp).await?;
            let (mut h2, conn) =
                hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), TokioIo::new(tls))
                    .await
                    .map_err(std::io::Error::other)?;
            tokio::spawn(conn);
            let req = Request::get("https://myapp.internal.example/").body(Empty::<Bytes>::new()).unwrap();
            let res = h2.send_request(req).await.map_err(std::io::Error::other)?;
            Ok::<_, std::io::Error>((res.status().as_u16(), served_by_parts(res.headers())))
        }
    };
    assert_eq!(call(identity("client")).await.unwrap(), (200, "myapp-v1".to_string()));
    // Another mesh workload: a valid certificate, but not the principal the policy names.
    assert_eq!(call(identity("intruder")).await.unwrap(), (403, "-".to_string()));
    // No mesh certificate (an identity the store has none for): no connection at all.
    let nobody = crate::identity::Identity::parse("spiffe://cluster.local/ns/shop/sa/nobody").unwrap();
    assert!(call(nobody).await.is_err(), "a client without a mesh certificate is served");
}

/// A gateway's requests are served under a client certificate while it is valid, not
/// for the life of the connection it was presented on (as the mesh's tunnel takes no
/// new stream once it expired): past its notAfter, the same connection gets 401.
#[tokio::test]
async fn istio_mutual_serves_no_request_past_the_clients_certificate() {
    let net = 57;
    let (server_ca, client_ca) = (TestCa::new(), TestCa::new());
    let edge = Edge::start_with(net, &server_ca, &client_ca, &istio_mutual_yaml()).await;
    let snap = edge.mesh.ctx.snapshot.load_full();
    let identity = |name: &str| snap.workloads.iter().find(|w| w.name == name).unwrap().identity.clone();
    let short_lived = Arc::new(crate::identity::CertStore::new(edge.mesh.ca.clone(), Duration::from_secs(2)));
    short_lived.set_local([identity("client")]);
    let config = crate::identity::client_config(
        short_lived.clone(),
        identity("client"),
        identity("istio-ingressgateway"),
        &edge.mesh.ctx.dialer.verifier,
    )
    .unwrap();
    let tcp = TcpStream::connect(edge.addr(ISTIO_MUTUAL)).await.unwrap();
    let name = ServerName::try_from("istio-ingressgateway").unwrap();
    let tls = TlsConnector::from(config).connect(name, tcp).await.unwrap();
    let (_, not_after) = short_lived.held()[0].clone();
    let (mut h2, conn) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), TokioIo::new(tls)).await.unwrap();
    tokio::spawn(conn);
    let get = || Request::get("https://myapp.internal.example/").body(Empty::<Bytes>::new()).unwrap();
    assert_eq!(h2.send_request(get()).await.unwrap().status(), 200, "valid: served");
    let left = not_after.duration_since(std::time::SystemTime::now()).unwrap_or_default();
    tokio::time::sleep(left + Duration::from_millis(100)).await;
    assert_eq!(h2.send_request(get()).await.unwrap().status(), 401, "expired: refused on the same connection");
}

/// Two networks on loopback: `client` and `other` on network1, `web` on network2 behind
/// network2's east-west gateway (Istio ambient's `istio-east-west` Gateway and its
/// Service), which only lets `sleep` reach it.
fn two_networks(net: u8) -> String {
    format!(
        r#"
apiVersion: v1
kind: Namespace
metadata: {{name: shop, labels: {{istio.io/dataplane-mode: ambient}}}}
---
apiVersion: v1
kind: Pod
metadata: {{name: client, namespace: shop, labels: {{app: client, topology.istio.io/network: network1}}}}
spec: {{serviceAccountName: sleep, nodeName: node1}}
status: {{podIP: 127.{net}.0.10}}
---
apiVersion: v1
kind: Pod
metadata: {{name: other, namespace: shop, labels: {{app: other, topology.istio.io/network: network1}}}}
spec: {{serviceAccountName: other, nodeName: node1}}
status: {{podIP: 127.{net}.0.11}}
---
apiVersion: v1
kind: Pod
metadata: {{name: web, namespace: shop, labels: {{app: web, topology.istio.io/network: network2}}}}
spec: {{serviceAccountName: web, nodeName: node2}}
status: {{podIP: 127.{net}.0.20}}
---
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: shop}}
spec: {{selector: {{app: web}}, clusterIP: 10.96.{net}.10, ports: [{{name: http, port: 80, targetPort: 8080}}]}}
---
apiVersion: v1
kind: Service
metadata: {{name: client, namespace: shop}}
spec: {{selector: {{app: client}}, clusterIP: 10.96.{net}.11, ports: [{{name: http, port: 80, targetPort: 8080}}]}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: web-from-sleep, namespace: shop}}
spec:
  selector: {{matchLabels: {{app: web}}}}
  action: ALLOW
  rules: [{{from: [{{source: {{principals: [cluster.local/ns/shop/sa/sleep]}}}}]}}]
---
apiVersion: v1
kind: Pod
metadata:
  name: eastwest
  namespace: istio-system
  labels: {{gateway.networking.k8s.io/gateway-name: istio-eastwestgateway, topology.istio.io/network: network2}}
spec: {{serviceAccountName: istio-eastwestgateway, nodeName: node2}}
status: {{podIP: 127.{net}.0.50}}
---
apiVersion: v1
kind: Service
metadata: {{name: istio-eastwestgateway, namespace: istio-system, labels: {{topology.istio.io/network: network2}}}}
spec:
  selector: {{gateway.networking.k8s.io/gateway-name: istio-eastwestgateway}}
  ports: [{{name: mesh, port: 15008}}]
  externalIPs: [127.{net}.0.50]
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: istio-eastwestgateway, namespace: istio-system, labels: {{topology.istio.io/network: network2}}}}
spec:
  gatewayClassName: istio-east-west
  listeners:
  - name: mesh
    port: 15008
    protocol: HBONE
    tls:
      mode: Terminate
      options: {{gateway.istio.io/tls-terminate-mode: ISTIO_MUTUAL}}
"#
    )
}

/// The mesh of [`two_networks`] as seen from network1, and network2's east-west
/// gateway serving from its own view of it.
async fn across_networks(net: u8) -> (Mesh, Gateway) {
    let yaml = two_networks(net);
    let mesh = Mesh::start(&yaml, &[("web", 8080)]).await;
    let scope = |network: &str| MeshScope { network: network.into(), ..MeshScope::new("cluster.local") };
    mesh.reconfigure(&yaml, &scope("network1"));
    let objects = parse_documents(Path::new("east-west.yaml"), &yaml).unwrap();
    let seen_from_network2 = Snapshot::compile_in(&objects, &scope("network2"), 1);
    mesh.ctx.dialer.certs.set_local(seen_from_network2.workloads.iter().map(|w| w.identity.clone()));
    let mut l7 = mesh.ctx.l7_context();
    l7.snapshot = Arc::new(arc_swap::ArcSwap::from_pointee(seen_from_network2));
    let ctx = GatewayContext {
        l7,
        netns: mesh.netns.clone(),
        limits: Arc::new(ConnLimits::new(64, 256)),
        tasks: Default::default(),
        tcp_idle_timeout: Duration::from_secs(60),
    };
    let mut gateway = Gateway::new(ctx, "istio-system/eastwest".into(), IpAddr::from([127, net, 0, 50]));
    let snap = gateway.ctx.l7.snapshot.load_full();
    assert_eq!(gateway.apply(&snap, &Secrets::default()).await, Vec::<String>::new());
    assert_eq!(gateway.ports(), vec![15008]);
    (mesh, gateway)
}

#[tokio::test]
async fn a_pod_on_another_network_is_reached_through_its_east_west_gateway_as_the_client() {
    let (mesh, _gateway) = across_networks(60).await;
    let snap = mesh.ctx.snapshot.load_full();
    let web = snap.workloads.iter().find(|w| w.name == "web").unwrap();
    assert!(
        matches!(snap.reach(web), crate::snapshot::Reach::Via(gw) if gw.addr.to_string() == "127.60.0.50:15008"),
        "network2's pod is reached through its gateway: {:?}",
        snap.reach(web)
    );
    let vip = SocketAddr::from(([10, 96, 60, 10], 80));
    for _ in 0..3 {
        let res = send(mesh.dial("client", vip).await, get("/", "web")).await.unwrap();
        assert_eq!(served_by(&res), "web");
    }
    let metrics = mesh.metrics();
    let through_gateway = metrics
        .lines()
        .find(|l| {
            l.starts_with("tcp_connections_opened_total")
                && l.contains(r#"source_workload="eastwest""#)
                && l.contains(r#"destination_workload="web""#)
        })
        .unwrap_or_else(|| panic!("the gateway carried the streams:\n{metrics}"));
    assert!(through_gateway.ends_with(" 3"), "{through_gateway}");
    // The pod's agent judged the client's own identity through both tunnels: sleep
    // is allowed, other is not (the gateway's identity would be neither).
    let refused = send(mesh.dial("other", vip).await, get("/", "web")).await;
    assert!(refused.is_err(), "other's connection is refused at web: {refused:?}");
}

#[tokio::test]
async fn the_east_west_gateway_reaches_only_the_hbone_port_of_its_own_networks_mesh_pods() {
    let (mesh, gateway) = across_networks(61).await;
    let snap = mesh.ctx.snapshot.load_full();
    let client = snap.workloads.iter().find(|w| w.name == "client").unwrap().clone();
    let gw = snap.network_gateways["network2"].clone();
    let dialer = &mesh.ctx.dialer;
    let through = |target: &str| {
        let (client, gw, target) = (client.clone(), gw.clone(), target.parse::<SocketAddr>().unwrap());
        let netns = mesh.netns.clone();
        async move { dialer.pool.connect_through(dialer, &client, &netns, (&gw.identity, gw.addr), target).await }
    };
    assert!(through("127.61.0.20:8080").await.is_ok(), "web, on network2: carried");
    for (target, why) in [
        ("127.61.0.11:8080", "other is on network1, not the gateway's"),
        ("127.61.0.99:8080", "no pod has this address"),
        ("127.61.0.20:15008", "a port of the mesh's own"),
        ("127.61.0.50:8080", "the gateway itself is no mesh pod"),
    ] {
        match through(target).await {
            Err(crate::transport::Error::Refused { status, .. }) => assert_eq!(status, 403, "{target}: {why}"),
            other => panic!("{target} ({why}) is refused with 403: {other:?}"),
        }
    }
    // A client without a mesh certificate gets no stream at all.
    let tls = connect(SocketAddr::new(gateway_ip(&gateway), 15008), "gw", TestCa::new().roots(), None).await;
    let refused = match tls {
        Ok(tls) => send(tls, get("/", "gw")).await.is_err(),
        Err(_) => true,
    };
    assert!(refused, "no TLS session without a client certificate");
}

fn gateway_ip(gateway: &Gateway) -> IpAddr {
    gateway.bind
}

#[tokio::test]
async fn a_ztunnel_style_double_hbone_by_service_hostname_reaches_the_pod_as_the_client() {
    // ztunnel names the Service, not the pod, in both CONNECTs: the gateway draws an
    // endpoint of its network, and the pod's agent maps the Service's port to its own.
    let (mesh, _gateway) = across_networks(62).await;
    let snap = mesh.ctx.snapshot.load_full();
    let client = snap.workloads.iter().find(|w| w.name == "client").unwrap().clone();
    let web = snap.workloads.iter().find(|w| w.name == "web").unwrap().clone();
    let gw = snap.network_gateways["network2"].clone();
    let dialer = &mesh.ctx.dialer;
    let host = "web.shop.svc.cluster.local:80";
    let tcp = TcpStream::connect(gw.addr).await.unwrap();
    let (outer, conn, _) =
        crate::transport::handshake(dialer, &client.identity, &gw.identity, gw.addr, tcp).await.unwrap();
    tokio::spawn(conn);
    let (status, stream) = h2_connect(&outer, host).await;
    assert_eq!(status, 200, "the gateway takes a Service's host:port");
    let (inner, conn, _) =
        crate::transport::handshake(dialer, &client.identity, &web.identity, gw.addr, stream).await.unwrap();
    tokio::spawn(conn);
    let (status, app) = h2_connect(&inner, host).await;
    assert_eq!(status, 200, "web's agent maps the Service's port to web's 8080");
    assert_eq!(served_by(&send(app, get("/", "web")).await.unwrap()), "web");
    // A Service's host:port with no endpoint on the gateway's network, or unknown, is refused.
    for authority in ["client.shop.svc.cluster.local:80", "nothing.shop.svc.cluster.local:80"] {
        assert_eq!(h2_connect(&outer, authority).await.0, 403, "{authority}");
    }
}

/// A CONNECT for `authority` on `sender`: the answer's status and the stream.
async fn h2_connect(
    sender: &h2::client::SendRequest<Bytes>,
    authority: &str,
) -> (http::StatusCode, crate::transport::hbone::H2Stream) {
    crate::transport::hbone::connect_for_test(sender, authority).await.expect("a CONNECT answered")
}

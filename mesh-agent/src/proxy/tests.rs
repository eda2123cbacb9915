//! The data path in-process, on loopback, without root: each test runs pods as
//! addresses of 127.0.0.0/8 in the test's own network namespace, a table standing in
//! for the kernel's original-destination map, real mutual TLS between the pods' HBONE
//! listeners, and small HTTP applications. What needs the kernel (capture, sk_lookup,
//! the SOCKMAP) stays in the lab tests of `tests/`.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Empty, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use mesh_common::ports;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpSocket};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::inpod::{Plain, serve_plain};
use super::{OrigDst, ProxyContext, hbone};
use crate::config::parse_documents;
use crate::dataplane::Netns;
use crate::identity::{CertStore, MeshCa, PeerVerifier};
use crate::snapshot::Snapshot;
use crate::state::{MeshScope, OutboundPolicy, Workload};
use crate::telemetry::Metrics;
use crate::transport::Dialer;
use crate::transport::limits::ConnLimits;

/// The kernel's original-destination table, written by the test before it connects.
#[derive(Debug, Default)]
struct Captured(Mutex<HashMap<SocketAddr, SocketAddr>>);

impl OrigDst for Captured {
    fn orig_dst(&self, client: SocketAddr) -> Option<SocketAddr> {
        self.0.lock().unwrap().get(&client).copied()
    }
}

/// What the test's agent serves of its pods.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Serving {
    /// Their HBONE servers (the tunnel's far end).
    pub hbone: bool,
    /// The pods as the agent's own, so connections between them need no tunnel.
    pub local: bool,
}

/// One agent serving every pod of the test, with the pods' listeners bound at their
/// loopback addresses.
pub(crate) struct Mesh {
    pub(crate) ctx: ProxyContext,
    captured: Arc<Captured>,
    registry: Registry,
    pub(crate) netns: Arc<Netns>,
    pub(crate) stop: CancellationToken,
    /// The mesh's CA, for certificates a test presents itself.
    pub(crate) ca: Arc<MeshCa>,
    _ca_dir: tempfile::TempDir,
}

impl Drop for Mesh {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Mesh {
    /// Compiles `yaml`, then starts the HBONE and plaintext inbound listeners of every
    /// enrolled pod and an application on each pod port listed in `apps`.
    pub(crate) async fn start(yaml: &str, apps: &[(&str, u16)]) -> Self {
        Self::start_with(yaml, apps, Serving { hbone: true, local: false }).await
    }

    /// [`Mesh::start`], saying whether the pods' HBONE servers run and whether the
    /// agent serves the pods as its own (connections between them admitted without a
    /// tunnel, as on one node).
    pub(crate) async fn start_with(yaml: &str, apps: &[(&str, u16)], serving: Serving) -> Self {
        let objects = parse_documents(Path::new("test.yaml"), yaml).expect("test config parses");
        let snapshot = Arc::new(Snapshot::compile(&objects, "cluster.local", 1));
        let ca_dir = tempfile::tempdir().unwrap();
        let ca = Arc::new(MeshCa::load_or_create(ca_dir.path(), "cluster.local").unwrap());
        let verifier = PeerVerifier::new(ca.roots(), vec!["cluster.local".into()]).unwrap();
        let certs = Arc::new(CertStore::new(ca.clone(), Duration::from_secs(3600)));
        let mut registry = Registry::default();
        let metrics = Arc::new(Metrics::new(&mut registry));
        let captured = Arc::new(Captured::default());
        let stop = CancellationToken::new();
        let ctx = ProxyContext {
            snapshot: Arc::new(ArcSwap::from(snapshot.clone())),
            orig_dst: captured.clone(),
            dialer: Dialer::new(certs.clone(), verifier.clone(), 0),
            l7: Arc::default(),
            metrics,
            shutdown: stop.clone(),
            tasks: TaskTracker::new(),
            inbound: Arc::default(),
            limits: Arc::new(ConnLimits::new(1024, 4096)),
            tcp_idle_timeout: Duration::from_secs(60),
            egress_tls_dir: std::path::Path::new("/nonexistent").into(),
            dns_upstream: Arc::default(),
            l7_telemetry: true,
            kernel_splice: None,
            direct: None,
            same_node_direct: false,
            local_pods: Arc::default(),
            inherited: Arc::default(),
        };
        ctx.l7.round_robin.fit(&snapshot);
        let netns = Arc::new(Netns::host().expect("the test's own network namespace"));
        certs.set_local(snapshot.workloads.iter().filter(|w| w.enrolled).map(|w| w.identity.clone()));
        for w in snapshot.workloads.iter().filter(|w| w.enrolled) {
            let ip = w.ips[0];
            if serving.hbone {
                let tls = crate::identity::server_config(certs.clone(), w.identity.clone(), &verifier).unwrap();
                let hbone_listener = TcpListener::bind((ip, ports::INBOUND_HBONE)).await.unwrap();
                tokio::spawn(hbone::serve(
                    ctx.clone(),
                    (w.clone(), netns.clone()),
                    hbone_listener.into(),
                    tls,
                    stop.clone(),
                ));
            }
            if serving.local {
                ctx.local_pods.insert(w.key(), netns.clone());
            }
            let plain = Arc::new(TcpListener::bind((ip, ports::INBOUND_PLAINTEXT)).await.unwrap());
            tokio::spawn(serve_plain(ctx.clone(), (w.clone(), netns.clone()), plain, Plain::Inbound, stop.clone()));
        }
        for (pod, port) in apps {
            let w = workload(&snapshot, pod);
            tokio::spawn(app(w.name.clone(), SocketAddr::new(w.ips[0], *port), stop.clone()));
        }
        Self { ctx, captured, registry, netns, stop, ca, _ca_dir: ca_dir }
    }

    fn workload(&self, name: &str) -> Arc<Workload> {
        workload(&self.ctx.snapshot.load(), name)
    }

    /// Sends `req` from pod `from` to `orig` as a captured connection would arrive:
    /// the table learns the client's address and where it was going, then the client
    /// reaches the pod's outbound listener.
    async fn send(&self, from: &str, orig: SocketAddr, req: Request<Empty<Bytes>>) -> Response<Bytes> {
        self.try_send(from, orig, req).await.expect("an answer")
    }

    /// [`Mesh::send`], saying what went wrong instead of panicking: a refused
    /// connection is an error here.
    async fn try_send(
        &self,
        from: &str,
        orig: SocketAddr,
        req: Request<Empty<Bytes>>,
    ) -> Result<Response<Bytes>, hyper::Error> {
        let stream = self.dial(from, orig).await;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        let res = tokio::time::timeout(Duration::from_secs(10), sender.send_request(req)).await.unwrap()?;
        let (parts, body) = res.into_parts();
        Ok(Response::from_parts(parts, body.collect().await?.to_bytes()))
    }

    /// A connection from pod `from` to `orig` as a captured one arrives: the table
    /// learns the client's address and where it was going, then the client reaches the
    /// pod's outbound listener.
    pub(crate) async fn dial(&self, from: &str, orig: SocketAddr) -> tokio::net::TcpStream {
        let pod = self.workload(from);
        let listener = TcpListener::bind((pod.ips[0], 0)).await.unwrap();
        let outbound_addr = listener.local_addr().unwrap();
        let scope = (pod.clone(), self.netns.clone());
        tokio::spawn(serve_plain(self.ctx.clone(), scope, listener, Plain::Outbound, self.stop.clone()));
        let socket = TcpSocket::new_v4().unwrap();
        socket.bind(SocketAddr::new(pod.ips[0], 0)).unwrap();
        self.captured.0.lock().unwrap().insert(socket.local_addr().unwrap(), orig);
        socket.connect(outbound_addr).await.unwrap()
    }

    /// Compiles `yaml` again under `mesh`, as a config change does.
    pub(crate) fn reconfigure(&self, yaml: &str, mesh: &MeshScope) {
        let objects = parse_documents(Path::new("test.yaml"), yaml).expect("test config parses");
        let snapshot = Arc::new(Snapshot::compile_in(&objects, mesh, 2));
        self.ctx.l7.round_robin.fit(&snapshot);
        self.ctx.snapshot.store(snapshot);
    }

    pub(crate) fn metrics(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).unwrap();
        out
    }
}

pub(crate) fn workload(snapshot: &Snapshot, name: &str) -> Arc<Workload> {
    snapshot.workloads.iter().find(|w| w.name == name).unwrap_or_else(|| panic!("no pod {name}")).clone()
}

fn get(path: &str) -> Request<Empty<Bytes>> {
    Request::get(path).header("host", "myapp").body(Empty::new()).unwrap()
}

/// A pod's application: answers with its pod name in `x-served-by`. `/fail-first/<n>`
/// answers 503 to the first n requests it sees on that path; `/slow` answers after 2 s.
async fn app(name: String, addr: SocketAddr, stop: CancellationToken) {
    let listener = TcpListener::bind(addr).await.unwrap();
    let seen: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    loop {
        let stream = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => r.unwrap().0,
        };
        let (name, seen) = (name.clone(), seen.clone());
        let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
            let (name, seen) = (name.clone(), seen.clone());
            async move {
                // Read the whole body, as an application does, so large ones flow.
                let (parts, body) = req.into_parts();
                let _ = body.collect().await;
                let req = Request::from_parts(parts, ());
                let path = req.uri().path().to_string();
                let count = {
                    let mut seen = seen.lock().unwrap();
                    let n = seen.entry(path.clone()).or_default();
                    *n += 1;
                    *n
                };
                let mut status = StatusCode::OK;
                if let Some(n) = path.strip_prefix("/fail-first/").and_then(|n| n.parse::<usize>().ok())
                    && count <= n
                {
                    status = StatusCode::SERVICE_UNAVAILABLE;
                }
                if path == "/slow" {
                    tokio::time::sleep(Duration::from_secs(2)).await;
                }
                let mut res = Response::builder()
                    .status(status)
                    .header("x-served-by", name.as_str())
                    .header("x-seen", count.to_string())
                    .header("x-path", path.as_str())
                    .body(Full::new(Bytes::from(name)))
                    .unwrap();
                // What the proxies said of the request, for tests to read back.
                for (n, v) in req.headers() {
                    let n = n.as_str();
                    if n.starts_with("x-forwarded-")
                        || n.starts_with("x-envoy-")
                        || n == "x-request-id"
                        || n == "x-route"
                        || n == "traceparent"
                    {
                        let echoed = http::HeaderName::try_from(format!("x-echo-{n}")).unwrap();
                        res.headers_mut().append(echoed, v.clone());
                    }
                }
                Ok::<_, Infallible>(res)
            }
        });
        tokio::spawn(async move {
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

pub(crate) fn served_by(res: &Response<Bytes>) -> &str {
    res.headers().get("x-served-by").and_then(|v| v.to_str().ok()).unwrap_or("-")
}

/// Pods at `127.<net>.0.x`, so tests running at once never share an address.
pub(crate) fn config(net: u8, extra: &str) -> String {
    format!(
        r#"
apiVersion: v1
kind: Namespace
metadata: {{name: shop, labels: {{istio.io/dataplane-mode: ambient}}}}
---
apiVersion: v1
kind: Pod
metadata: {{name: client, namespace: shop, labels: {{app: client}}}}
spec: {{serviceAccountName: client, nodeName: node1}}
status: {{podIP: 127.{net}.0.1}}
---
apiVersion: v1
kind: Pod
metadata: {{name: intruder, namespace: shop, labels: {{app: intruder}}}}
spec: {{serviceAccountName: intruder, nodeName: node1}}
status: {{podIP: 127.{net}.0.9}}
---
apiVersion: v1
kind: Pod
metadata: {{name: myapp-v1, namespace: shop, labels: {{app: myapp, version: v1}}}}
spec: {{serviceAccountName: myapp, nodeName: node1, containers: [{{name: app, ports: [{{containerPort: 8080}}]}}]}}
status: {{podIP: 127.{net}.0.2}}
---
apiVersion: v1
kind: Pod
metadata: {{name: myapp-v2, namespace: shop, labels: {{app: myapp, version: v2}}}}
spec: {{serviceAccountName: myapp, nodeName: node1, containers: [{{name: app, ports: [{{containerPort: 8080}}]}}]}}
status: {{podIP: 127.{net}.0.3}}
---
apiVersion: v1
kind: Service
metadata: {{name: myapp, namespace: shop}}
spec: {{selector: {{app: myapp}}, clusterIP: 10.96.{net}.20, ports: [{{port: 80, targetPort: 8080, name: http}}]}}
{extra}"#
    )
}

pub(crate) const APPS: &[(&str, u16)] = &[("myapp-v1", 8080), ("myapp-v2", 8080)];

pub(crate) const SUBSETS: &str = r#"
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: myapp, namespace: shop}
spec:
  host: myapp
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
"#;

/// A VirtualService for `myapp` with these `http` rules (YAML list items).
fn virtual_service(http: &str) -> String {
    format!(
        "---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: myapp, namespace: shop}}\nspec:\n  hosts: [myapp]\n  http:\n{http}"
    )
}

fn vip(net: u8) -> SocketAddr {
    SocketAddr::new(IpAddr::from([10, 96, net, 20]), 80)
}

#[tokio::test]
async fn l4_to_a_service_alternates_endpoints_over_mutual_tls() {
    let mesh = Mesh::start(&config(31, ""), APPS).await;
    let mut seen = Vec::new();
    for _ in 0..4 {
        let res = mesh.send("client", vip(31), get("/")).await;
        assert_eq!(res.status(), 200);
        seen.push(served_by(&res).to_string());
    }
    assert_eq!(seen, ["myapp-v1", "myapp-v2", "myapp-v1", "myapp-v2"], "round robin over the Service's endpoints");
    let metrics = mesh.metrics();
    let inbound_mtls = metrics.lines().any(|l| {
        l.starts_with("tcp_connections_opened_total")
            && l.contains("reporter=\"destination\"")
            && l.contains("connection_security_policy=\"mutual_tls\"")
            && l.contains("source_principal=\"spiffe://cluster.local/ns/shop/sa/client\"")
    });
    assert!(inbound_mtls, "the destination saw the client's verified identity over mTLS:\n{metrics}");
}

#[tokio::test]
async fn l7_routes_by_header_to_a_subset() {
    let vs = virtual_service(
        r#"
  - match: [{headers: {x-version: {exact: v2}}}]
    route: [{destination: {host: myapp, subset: v2}}]
  - route: [{destination: {host: myapp, subset: v1}}]
"#,
    );
    let mesh = Mesh::start(&config(32, &format!("{SUBSETS}{vs}")), APPS).await;
    for _ in 0..3 {
        let plain = mesh.send("client", vip(32), get("/")).await;
        assert_eq!(served_by(&plain), "myapp-v1");
        let mut v2 = get("/");
        v2.headers_mut().insert("x-version", "v2".parse().unwrap());
        assert_eq!(served_by(&mesh.send("client", vip(32), v2).await), "myapp-v2");
    }
}

#[tokio::test]
async fn request_duration_and_body_sizes_are_recorded_when_the_response_ends() {
    let vs = virtual_service("  - route: [{destination: {host: myapp, subset: v1}}]\n");
    let mesh = Mesh::start(&config(33, &format!("{SUBSETS}{vs}")), APPS).await;
    let mut sizes = 0;
    for _ in 0..3 {
        let res = mesh.send("client", vip(33), get("/")).await;
        assert_eq!(served_by(&res), "myapp-v1");
        sizes += res.body().len();
    }
    assert!(sizes > 0);
    // Two bodies: one buffered (and so replayable), one too large for that, streamed.
    for len in [1000usize, 1536 * 1024] {
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(mesh.dial("client", vip(33)).await)).await.unwrap();
        tokio::spawn(conn);
        let req =
            Request::post("/upload").header("host", "myapp").body(Full::new(Bytes::from(vec![7u8; len]))).unwrap();
        let res = sender.send_request(req).await.unwrap();
        assert_eq!(res.status(), 200);
        sizes += res.into_body().collect().await.unwrap().to_bytes().len();
    }
    // The series of one label set: the histogram's sum, count and a bucket.
    let series = |name: &str, text: &str| -> Option<f64> {
        text.lines()
            .find(|l| {
                l.starts_with(name)
                    && l.contains("destination_workload=\"myapp-v1\"")
                    && l.contains("response_code=\"200\"")
            })
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
    };
    // Recorded as each response body ends, which may be just after the client has read it.
    let mut text = String::new();
    for _ in 0..50 {
        text = mesh.metrics();
        if series("request_duration_milliseconds_count", &text) == Some(5.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(series("request_duration_milliseconds_count", &text), Some(5.0), "{text}");
    assert_eq!(series("response_bytes_count", &text), Some(5.0), "{text}");
    assert_eq!(series("response_bytes_sum", &text), Some(sizes as f64), "the bytes that passed: {text}");
    let sent = (1000 + 1536 * 1024) as f64;
    assert_eq!(series("request_bytes_sum", &text), Some(sent), "buffered and streamed bodies: {text}");
    let in_a_second = text.lines().any(|l| {
        l.starts_with("request_duration_milliseconds_bucket")
            && l.contains("destination_workload=\"myapp-v1\"")
            && l.contains("le=\"1000.0\"")
            && l.ends_with(" 5")
    });
    assert!(in_a_second, "five requests under a second, in Envoy's buckets: {text}");
    // Istio's dashboards read exactly these bucket bounds.
    assert!(text.contains("le=\"3600000.0\""), "{text}");
}

/// A VirtualService bound to the mesh and a gateway: a match written for the gateway
/// (match-level `gateways`) must not route mesh traffic, and a rule whose only match is
/// for the gateway must not become a catch-all for the mesh.
#[tokio::test]
async fn matches_bound_to_a_gateway_leave_mesh_traffic_alone() {
    let vs = format!(
        "---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: myapp, namespace: shop}}\n\
         spec:\n  hosts: [myapp, myapp.example.com]\n  gateways: [mesh, edge]\n  http:\n{}",
        r#"
  - match: [{headers: {x-version: {exact: v2}}, gateways: [edge]}]
    route: [{destination: {host: myapp, subset: v2}}]
  - match: [{uri: {prefix: /edge-only}, gateways: [shop/edge]}, {uri: {prefix: /both}}]
    route: [{destination: {host: myapp, subset: v2}}]
  - route: [{destination: {host: myapp, subset: v1}}]
"#
    );
    let mesh = Mesh::start(&config(38, &format!("{SUBSETS}{vs}")), APPS).await;
    let mut v2 = get("/");
    v2.headers_mut().insert("x-version", "v2".parse().unwrap());
    assert_eq!(served_by(&mesh.send("client", vip(38), v2).await), "myapp-v1", "the header match is the gateway's");
    assert_eq!(served_by(&mesh.send("client", vip(38), get("/edge-only")).await), "myapp-v1");
    assert_eq!(served_by(&mesh.send("client", vip(38), get("/both")).await), "myapp-v2", "the match without gateways");
}

/// The pod's HTTP/1.1 connections to an endpoint are kept and reused, whichever client
/// connection's request comes next: the upstream connection goes back to the pool after
/// an answer with a body and after one without (HEAD).
#[tokio::test]
async fn l7_requests_from_separate_client_connections_share_one_upstream_connection() {
    let vs = virtual_service("  - route: [{destination: {host: myapp, subset: v1}}]\n");
    let mesh = Mesh::start(&config(39, &format!("{SUBSETS}{vs}")), APPS).await;
    for method in ["GET", "HEAD", "GET", "POST", "GET"] {
        let req = Request::builder().method(method).uri("/").header("host", "myapp").body(Empty::new()).unwrap();
        let res = mesh.send("client", vip(39), req).await;
        assert_eq!(res.status(), 200, "{method}");
        assert_eq!(served_by(&res), "myapp-v1");
        let expected: &[u8] = if method == "HEAD" { b"" } else { b"myapp-v1" };
        assert_eq!(res.body().as_ref(), expected, "{method}: the whole body");
    }
    let metrics = mesh.metrics();
    let opened: u64 = metrics
        .lines()
        .filter(|l| {
            l.starts_with("tcp_connections_opened_total{")
                && l.contains("reporter=\"destination\"")
                && l.contains("destination_workload=\"myapp-v1\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    assert_eq!(opened, 1, "five requests, one connection to the endpoint:\n{metrics}");
}

#[tokio::test]
async fn l7_retries_a_failed_attempt_on_5xx() {
    let vs = virtual_service(
        r#"
  - route: [{destination: {host: myapp, subset: v1}}]
    retries: {attempts: 3, retryOn: 5xx}
"#,
    );
    let mesh = Mesh::start(&config(33, &format!("{SUBSETS}{vs}")), APPS).await;
    let res = mesh.send("client", vip(33), get("/fail-first/2")).await;
    assert_eq!(res.status(), 200, "two 503s, then the third attempt answers");
    assert_eq!(res.headers()["x-seen"], "3");

    let no_retries = virtual_service(
        r#"
  - route: [{destination: {host: myapp, subset: v1}}]
    retries: {attempts: 0}
"#,
    );
    let mesh = Mesh::start(&config(34, &format!("{SUBSETS}{no_retries}")), APPS).await;
    let res = mesh.send("client", vip(34), get("/fail-first/1")).await;
    assert_eq!(res.status(), 503, "without retries the first answer stands");
}

#[tokio::test]
async fn l7_times_out_a_slow_route() {
    let vs = virtual_service(
        r#"
  - route: [{destination: {host: myapp, subset: v1}}]
    timeout: 200ms
"#,
    );
    let mesh = Mesh::start(&config(35, &format!("{SUBSETS}{vs}")), APPS).await;
    let started = Instant::now();
    let res = mesh.send("client", vip(35), get("/slow")).await;
    assert_eq!(res.status(), 504);
    assert!(started.elapsed() < Duration::from_millis(1500), "answered at the timeout, not the app's 2 s");
}

#[tokio::test]
async fn l7_injects_aborts_and_delays() {
    let vs = virtual_service(
        r#"
  - match: [{uri: {prefix: /abort}}]
    fault: {abort: {httpStatus: 418, percentage: {value: 100}}}
    route: [{destination: {host: myapp, subset: v1}}]
  - match: [{uri: {prefix: /delay}}]
    fault: {delay: {fixedDelay: 300ms, percentage: {value: 100}}}
    route: [{destination: {host: myapp, subset: v1}}]
"#,
    );
    let mesh = Mesh::start(&config(36, &format!("{SUBSETS}{vs}")), APPS).await;
    let aborted = mesh.send("client", vip(36), get("/abort")).await;
    assert_eq!(aborted.status(), 418);
    assert_eq!(served_by(&aborted), "-", "an injected abort never reaches the app");
    let started = Instant::now();
    let delayed = mesh.send("client", vip(36), get("/delay")).await;
    assert_eq!(delayed.status(), 200);
    assert!(started.elapsed() >= Duration::from_millis(300), "the delay was injected");
}

#[tokio::test]
async fn inbound_authorization_judges_the_verified_identity_and_each_request() {
    let policy = r#"
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: myapp, namespace: shop}
spec:
  selector: {matchLabels: {app: myapp}}
  action: ALLOW
  rules:
  - from: [{source: {principals: [cluster.local/ns/shop/sa/client]}}]
    to: [{operation: {paths: [/public/*]}}]
"#;
    let mesh = Mesh::start(&config(37, policy), APPS).await;
    let allowed = mesh.send("client", vip(37), get("/public/x")).await;
    assert_eq!(allowed.status(), 200);
    let other_path = mesh.send("client", vip(37), get("/private")).await;
    assert_eq!(other_path.status(), 403, "a path the rule does not list is denied per request");
    assert_eq!(served_by(&other_path), "-");
    let intruder = mesh.send("intruder", vip(37), get("/public/x")).await;
    assert_eq!(intruder.status(), 403, "another identity is denied");
    let metrics = mesh.metrics();
    let denied_counted = metrics.lines().any(|l| l.contains("denied_total{") && !l.ends_with(" 0"));
    assert!(denied_counted, "refusals are counted:\n{metrics}");
}

#[tokio::test]
async fn a_connection_without_an_original_destination_is_refused() {
    let mesh = Mesh::start(&config(40, ""), APPS).await;
    let pod = mesh.workload("client");
    let listener = TcpListener::bind((pod.ips[0], 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let scope = (pod.clone(), mesh.netns.clone());
    tokio::spawn(serve_plain(mesh.ctx.clone(), scope, listener, Plain::Outbound, mesh.stop.clone()));
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(pod.ips[0], 0)).unwrap();
    let mut stream = socket.connect(addr).await.unwrap();
    let _ = stream.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").await;
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await.unwrap();
    assert!(matches!(read, Ok(0) | Err(_)), "closed without an answer: {read:?}");
}

/// Three "internet" servers: by address only, by a name, and one found by DNS
/// (`localhost`).
fn egress_entries(net: u8, dns_port: u16) -> String {
    format!(
        r#"
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: by-name, namespace: shop}}
spec:
  hosts: [api.example.com]
  ports: [{{number: 8080, name: http, protocol: HTTP}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: by-address, namespace: shop}}
spec:
  hosts: [legacy.example.com]
  addresses: [192.0.2.10/32]
  ports: [{{number: 8080, name: http}}]
  resolution: STATIC
  endpoints: [{{address: 127.{net}.0.201}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: by-dns, namespace: shop}}
spec:
  hosts: [dns.example.com]
  addresses: [192.0.2.20/32]
  ports: [{{number: 80, name: http}}]
  resolution: DNS
  endpoints: [{{address: localhost, ports: {{http: {dns_port}}}}}]
"#
    )
}

#[tokio::test]
async fn outbound_traffic_policy_and_service_entries_decide_what_leaves_the_mesh() {
    let net = 61;
    let internet = SocketAddr::from(([127, net, 0, 200], 8080));
    let dns_port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap().port()
    };
    let mesh = Mesh::start(&config(net, ""), APPS).await;
    tokio::spawn(app("internet".into(), internet, mesh.stop.clone()));
    tokio::spawn(app("internet-static".into(), SocketAddr::from(([127, net, 0, 201], 8080)), mesh.stop.clone()));
    tokio::spawn(app("internet-dns".into(), SocketAddr::from(([127, 0, 0, 1], dns_port)), mesh.stop.clone()));
    tokio::time::sleep(Duration::from_millis(50)).await;
    let host = |h: &str| Request::get("/").header("host", h).body(Empty::new()).unwrap();

    // ALLOW_ANY (Istio's default): an address nobody declared is reached as dialed.
    assert_eq!(served_by(&mesh.send("client", internet, host("anything.example")).await), "internet");

    // REGISTRY_ONLY without entries: refused, logged and counted.
    let registry_only = MeshScope { outbound: OutboundPolicy::RegistryOnly, ..MeshScope::new("cluster.local") };
    mesh.reconfigure(&config(net, ""), &registry_only);
    assert!(mesh.try_send("client", internet, host("api.example.com")).await.is_err());
    let blocked = mesh.metrics();
    assert!(
        blocked.lines().any(|l| l.starts_with("mesh_outbound_blocked_total")
            && l.contains("source_workload=\"client\"")
            && l.ends_with(" 1")),
        "{blocked}"
    );
    // Mesh destinations stay reachable.
    assert_eq!(mesh.send("client", vip(net), get("/")).await.status(), 200);

    // With entries: a declared name on the entry's port, wherever it was dialed; a
    // declared address, sent to the entry's endpoint; a name looked up in DNS.
    mesh.reconfigure(&config(net, &egress_entries(net, dns_port)), &registry_only);
    assert_eq!(served_by(&mesh.send("client", internet, host("api.example.com")).await), "internet");
    assert!(mesh.try_send("client", internet, host("other.example.com")).await.is_err(), "an undeclared name");
    let elsewhere = SocketAddr::from(([127, net, 0, 200], 8081));
    assert!(mesh.try_send("client", elsewhere, host("api.example.com")).await.is_err(), "a port the entry lacks");
    let legacy = SocketAddr::from(([192, 0, 2, 10], 8080));
    assert_eq!(served_by(&mesh.send("client", legacy, host("x")).await), "internet-static");
    let by_dns = SocketAddr::from(([192, 0, 2, 20], 80));
    assert_eq!(served_by(&mesh.send("client", by_dns, host("dns.example.com")).await), "internet-dns");
    let metrics = mesh.metrics();
    assert!(
        metrics.lines().any(|l| l.starts_with("tcp_connections_opened_total")
            && l.contains("reporter=\"source\"")
            && l.contains("destination_service=\"legacy.example.com\"")),
        "{metrics}"
    );
    // No agent reads an entry's traffic at its destination: a port it declares HTTP
    // is read at the source, request by request; an undeclared one stays TCP.
    let requests = |service: &str| {
        metrics
            .lines()
            .filter(|l| {
                l.starts_with("requests_total{")
                    && l.contains("reporter=\"source\"")
                    && l.contains(&format!("destination_service=\"{service}\""))
                    && l.contains("response_code=\"200\"")
            })
            .map(|l| l.rsplit(' ').next().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(requests("api.example.com"), ["1"], "{metrics}");
    assert!(requests("legacy.example.com").is_empty(), "{metrics}");
}

#[tokio::test]
async fn tls_is_originated_toward_service_entry_hosts_as_the_destination_rule_says() {
    let net = 62;
    let (server_ca, client_ca, stranger_ca) = (TestCa::new(), TestCa::new(), TestCa::new());
    let dir = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    let file = |name: &str, pem: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, pem).unwrap();
        p.display().to_string()
    };
    let ca = file("ca.pem", &server_ca.pem());
    let stranger = file("stranger.pem", &stranger_ca.pem());
    let (cert, key) = client_ca.issue(&["client.shop.example"]);
    let (cert, key) = (file("client.pem", &cert), file("client-key.pem", &key));
    let mut mesh = Mesh::start(&config(net, ""), APPS).await;
    mesh.ctx.egress_tls_dir = dir.path().into();
    let simple = SocketAddr::from(([127, net, 0, 201], 8443));
    let mutual = SocketAddr::from(([127, net, 0, 200], 8443));
    tls_app("internet-tls", simple, server_ca.issue(&["api.example.com"]), None).await;
    tls_app("internet-mtls", mutual, server_ca.issue(&["partner.example.com"]), Some(&client_ca)).await;
    let entries = |api_ca: &str| {
        format!(
            r#"
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: api, namespace: shop}}
spec:
  hosts: [api.example.com]
  addresses: [192.0.2.30]
  ports: [{{number: 80, name: http}}]
  resolution: STATIC
  endpoints: [{{address: 127.{net}.0.201, ports: {{http: 8443}}}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: api, namespace: shop}}
spec:
  host: api.example.com
  trafficPolicy:
    portLevelSettings:
    - port: {{number: 80}}
      tls: {{mode: SIMPLE, caCertificates: {api_ca}}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: partner, namespace: shop}}
spec:
  hosts: [partner.example.com]
  addresses: [192.0.2.31]
  ports: [{{number: 80, name: http, targetPort: 8443}}]
  resolution: STATIC
  endpoints: [{{address: 127.{net}.0.200}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: partner, namespace: shop}}
spec:
  host: partner.example.com
  trafficPolicy:
    tls: {{mode: MUTUAL, caCertificates: {ca}, clientCertificate: {cert}, privateKey: {key}, sni: partner.example.com}}
"#
        )
    };
    let scope = MeshScope::new("cluster.local");
    mesh.reconfigure(&config(net, &entries(&ca)), &scope);
    let host = |h: &str| Request::get("/").header("host", h).body(Empty::new()).unwrap();
    // The pod speaks plaintext HTTP; the agent's TLS reaches the servers.
    let api = SocketAddr::from(([192, 0, 2, 30], 80));
    assert_eq!(served_by(&mesh.send("client", api, host("api.example.com")).await), "internet-tls");
    let partner = SocketAddr::from(([192, 0, 2, 31], 80));
    assert_eq!(served_by(&mesh.send("client", partner, host("partner.example.com")).await), "internet-mtls");
    // A server whose certificate does not chain to caCertificates is not talked to.
    mesh.reconfigure(&config(net, &entries(&stranger)), &scope);
    assert!(mesh.try_send("client", api, host("api.example.com")).await.is_err());
    // Files outside the agent's egress TLS directory are never read, whoever names them.
    let elsewhere = outside.path().join("ca.pem");
    std::fs::write(&elsewhere, server_ca.pem()).unwrap();
    mesh.reconfigure(&config(net, &entries(&elsewhere.display().to_string())), &scope);
    assert!(mesh.try_send("client", api, host("api.example.com")).await.is_err());
    let traversal =
        format!("{}/../{}/ca.pem", dir.path().display(), outside.path().file_name().unwrap().to_string_lossy());
    mesh.reconfigure(&config(net, &entries(&traversal)), &scope);
    assert!(mesh.try_send("client", api, host("api.example.com")).await.is_err(), "no way out with ..");
}

#[tokio::test]
async fn http_routes_of_a_mesh_virtual_service_apply_to_service_entry_hosts() {
    let net = 64;
    let server_ca = TestCa::new();
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, server_ca.pem()).unwrap();
    let mut mesh = Mesh::start(&config(net, ""), APPS).await;
    mesh.ctx.egress_tls_dir = dir.path().into();
    tokio::spawn(app("internet".into(), SocketAddr::from(([127, net, 0, 201], 8080)), mesh.stop.clone()));
    tls_app(
        "internet-tls",
        SocketAddr::from(([127, net, 0, 202], 8443)),
        server_ca.issue(&["secure.example.com"]),
        None,
    )
    .await;
    let entries = format!(
        r#"
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: ext, namespace: shop}}
spec:
  hosts: [ext.example.com]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints: [{{address: 127.{net}.0.201, ports: {{http: 8080}}}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: secure, namespace: shop}}
spec:
  hosts: [secure.example.com]
  ports: [{{number: 443, name: https, protocol: HTTPS}}]
  resolution: STATIC
  endpoints: [{{address: 127.{net}.0.202, ports: {{https: 8443}}}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: secure, namespace: shop}}
spec:
  host: secure.example.com
  trafficPolicy: {{tls: {{mode: SIMPLE, caCertificates: {ca}}}}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: vault, namespace: shop}}
spec:
  host: vault.example.com
  trafficPolicy: {{tls: {{mode: SIMPLE, credentialName: vault-ca}}}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: vault, namespace: shop}}
spec:
  hosts: [vault.example.com]
  ports: [{{number: 443, name: https, protocol: HTTPS}}]
  resolution: STATIC
  endpoints: [{{address: 127.{net}.0.202, ports: {{https: 8443}}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: ext, namespace: shop}}
spec:
  hosts: [ext.example.com]
  http:
  - match: [{{headers: {{x-to: {{exact: vault}}}}}}]
    route: [{{destination: {{host: vault.example.com, port: {{number: 443}}}}}}]
  - match: [{{headers: {{x-to: {{exact: secure}}}}}}]
    route: [{{destination: {{host: secure.example.com, port: {{number: 443}}}}}}]
  - match: [{{headers: {{x-to: {{exact: mesh}}}}}}]
    route: [{{destination: {{host: myapp}}}}]
  - match: [{{uri: {{prefix: /gone}}}}]
    fault: {{abort: {{httpStatus: 418, percentage: {{value: 100}}}}}}
    route: [{{destination: {{host: ext.example.com}}}}]
  - route: [{{destination: {{host: ext.example.com}}}}]
"#,
        ca = ca.display()
    );
    mesh.reconfigure(&config(net, &entries), &MeshScope::new("cluster.local"));
    // Wherever DNS said ext.example.com is: the entry has no addresses, its Host names it.
    let dialed = SocketAddr::from(([198, 51, 100, 9], 80));
    let to = |header: Option<&str>, path: &str| {
        let mut req = Request::get(path).header("host", "ext.example.com");
        if let Some(h) = header {
            req = req.header("x-to", h);
        }
        req.body(Empty::new()).unwrap()
    };
    assert_eq!(served_by(&mesh.send("client", dialed, to(None, "/")).await), "internet", "the entry's endpoint");
    assert!(served_by(&mesh.send("client", dialed, to(Some("mesh"), "/")).await).starts_with("myapp-"));
    assert_eq!(mesh.send("client", dialed, to(None, "/gone")).await.status(), 418, "the rule's fault applies");
    // Another entry's host, with TLS the agent opens for the plaintext request.
    assert_eq!(served_by(&mesh.send("client", dialed, to(Some("secure"), "/")).await), "internet-tls");
    // A credentialName is a gateway's to read: a node agent reads no Secrets, and never
    // sends the request without the TLS the rule asks for.
    assert_eq!(mesh.send("client", dialed, to(Some("vault"), "/")).await.status(), 503);
    let metrics = mesh.metrics();
    assert!(
        metrics.lines().any(|l| l.starts_with("requests_total")
            && l.contains("destination_service=\"secure.example.com\"")
            && l.contains("response_code=\"200\"")),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_service_whose_pods_are_outside_the_mesh_is_still_named_in_the_metrics() {
    let net = 63;
    let outside = format!(
        r#"
---
apiVersion: v1
kind: Pod
metadata: {{name: legacy, namespace: plain, labels: {{app: legacy}}}}
spec: {{serviceAccountName: legacy, nodeName: node1, containers: [{{name: app, ports: [{{containerPort: 8080}}]}}]}}
status: {{podIP: 127.{net}.0.40}}
---
apiVersion: v1
kind: Service
metadata: {{name: legacy, namespace: plain}}
spec: {{selector: {{app: legacy}}, clusterIP: 10.96.{net}.40, ports: [{{port: 80, targetPort: 8080, name: http}}]}}
"#
    );
    let mesh = Mesh::start(&config(net, &outside), &[("legacy", 8080)]).await;
    let vip = SocketAddr::from(([10, 96, net, 40], 80));
    assert_eq!(served_by(&mesh.send("client", vip, get("/")).await), "legacy");
    let metrics = mesh.metrics();
    // Its port is declared HTTP and no agent reads it at the destination: the source
    // reads its requests, and names the pod and the Service.
    let named = metrics.lines().any(|l| {
        l.starts_with("requests_total{")
            && l.contains("reporter=\"source\"")
            && l.contains("destination_workload=\"legacy\"")
            && l.contains("destination_service=\"legacy.plain.svc.cluster.local\"")
            && l.contains("connection_security_policy=\"none\"")
            && l.contains("response_code=\"200\"")
            && l.ends_with(" 1")
    });
    assert!(named, "{metrics}");
}

/// A CA and the PEM of a certificate it signed for `names`.
pub(crate) struct TestCa {
    cert: rustls::pki_types::CertificateDer<'static>,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl TestCa {
    pub(crate) fn new() -> Self {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap().der().clone();
        Self { cert, issuer: rcgen::Issuer::new(params, key) }
    }

    /// (certificate PEM, key PEM) for `names`.
    pub(crate) fn issue(&self, names: &[&str]) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
        (params.signed_by(&key, &self.issuer).unwrap().pem(), key.serialize_pem())
    }

    pub(crate) fn pem(&self) -> String {
        pem::encode(&pem::Pem::new("CERTIFICATE", self.cert.to_vec()))
    }

    pub(crate) fn roots(&self) -> rustls::RootCertStore {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.cert.clone()).unwrap();
        roots
    }
}

/// A pod's own TLS server: terminates with `cert` and answers `name`; with
/// `client_ca`, only clients with a certificate it signed.
pub(crate) async fn tls_app(name: &'static str, addr: SocketAddr, cert: (String, String), client_ca: Option<&TestCa>) {
    let chain = rustls_pemfile::certs(&mut cert.0.as_bytes()).collect::<Result<Vec<_>, _>>().unwrap();
    let key = rustls_pemfile::private_key(&mut cert.1.as_bytes()).unwrap().unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder =
        rustls::ServerConfig::builder_with_provider(provider.clone()).with_safe_default_protocol_versions().unwrap();
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => builder.with_client_cert_verifier(
            rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(ca.roots()), provider)
                .build()
                .unwrap(),
        ),
    };
    let config = builder.with_single_cert(chain, key).unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else { return };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else { return };
                let svc = hyper::service::service_fn(move |_req| async move {
                    Ok::<_, std::convert::Infallible>(
                        Response::builder()
                            .header("x-served-by", name)
                            .body(http_body_util::Full::new(Bytes::from_static(name.as_bytes())))
                            .unwrap(),
                    )
                });
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tls), svc).await;
            });
        }
    });
}

/// Istio's protocol selection at the destination: HTTP to a port that declares nothing
/// (or HTTP) is read per request and reported by the destination's agent, with no
/// route or L7 policy asking for it; a port declared `tcp-*` is spliced untouched.
#[tokio::test]
async fn the_destination_reports_each_http_request_and_splices_declared_tcp_ports() {
    let raw = r#"
---
apiVersion: v1
kind: Service
metadata: {name: myapp-raw, namespace: shop}
spec: {selector: {app: myapp}, clusterIP: 10.96.71.21, ports: [{port: 9000, targetPort: 9000, name: tcp-raw}]}
"#;
    let apps = [("myapp-v1", 8080), ("myapp-v2", 8080), ("myapp-v1", 9000), ("myapp-v2", 9000)];
    let mesh = Mesh::start(&config(71, raw), &apps).await;
    for path in ["/", "/", "/fail-first/1"] {
        mesh.send("client", vip(71), get(path)).await;
    }
    let raw_vip = SocketAddr::from(([10, 96, 71, 21], 9000));
    assert_eq!(mesh.send("client", raw_vip, get("/")).await.status(), 200);
    let metrics = mesh.metrics();
    let reported = |code: &str| -> u64 {
        metrics
            .lines()
            .filter(|l| {
                l.starts_with("requests_total{")
                    && l.contains("reporter=\"destination\"")
                    // The workload at the tunnel's source address only if it holds the
                    // verified identity (here the tunnel comes from loopback).
                    && l.contains("source_principal=\"spiffe://cluster.local/ns/shop/sa/client\"")
                    && l.contains("destination_service=\"myapp.shop.svc.cluster.local\"")
                    && l.contains("destination_canonical_service=\"myapp\"")
                    && l.contains("request_protocol=\"http\"")
                    && l.contains("connection_security_policy=\"mutual_tls\"")
                    && l.contains(&format!("response_code=\"{code}\""))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    };
    assert_eq!(reported("200"), 2, "{metrics}");
    assert_eq!(reported("503"), 1, "{metrics}");
    let timed: u64 = metrics
        .lines()
        .filter(|l| l.starts_with("request_duration_milliseconds_count{reporter=\"destination\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    assert_eq!(timed, 3, "each request timed at the destination:\n{metrics}");
    let sized: u64 = metrics
        .lines()
        .filter(|l| l.starts_with("request_bytes_count{reporter=\"destination\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    assert_eq!(sized, 3, "each request's body sized at the destination too:\n{metrics}");
    assert!(!metrics.contains("myapp-raw.shop.svc.cluster.local\",request_protocol=\"http"), "{metrics}");
    let spliced = metrics.lines().any(|l| {
        l.starts_with("tcp_connections_opened_total{")
            && l.contains("reporter=\"destination\"")
            && l.contains("destination_service=\"myapp-raw.shop.svc.cluster.local\"")
    });
    assert!(spliced, "the tcp-declared port is counted as TCP:\n{metrics}");
    // The connections the destination reads as HTTP count their bytes too, both ways,
    // while they are open.
    let bytes = |metric: &str| -> u64 {
        metrics
            .lines()
            .filter(|l| {
                l.starts_with(&format!("{metric}{{"))
                    && l.contains("reporter=\"destination\"")
                    && l.contains("destination_service=\"myapp.shop.svc.cluster.local\"")
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    };
    assert!(bytes("tcp_received_bytes_total") > 3 * 30, "the requests' bytes:\n{metrics}");
    assert!(bytes("tcp_sent_bytes_total") > 3 * 30, "the responses' bytes:\n{metrics}");
    // Allowed as a whole, no span and no log line wanted: copied as they were, their
    // requests counted from the framing (`admission::watched`), not served.
    let watched = metrics.lines().find_map(|l| l.strip_prefix("mesh_http_watched_connections_total "));
    assert!(watched.and_then(|v| v.parse::<u64>().ok()).is_some_and(|n| n >= 1), "{metrics}");
}

/// Access log lines, as JSON, for an allowed request, a denied one (403, the DENY
/// policy named) and a TCP connection, from both agents' sides.
#[tokio::test]
async fn access_logs_name_each_request_and_connection_field_by_field() {
    let extra = r#"
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-admin, namespace: shop}
spec:
  selector: {matchLabels: {app: myapp}}
  action: DENY
  rules: [{to: [{operation: {paths: [/admin]}}]}]
---
apiVersion: v1
kind: Service
metadata: {name: myapp-raw, namespace: shop}
spec: {selector: {app: myapp}, clusterIP: 10.96.72.21, ports: [{port: 9000, targetPort: 9000, name: tcp-raw}]}
"#;
    let vs = virtual_service("  - route: [{destination: {host: myapp, subset: v1}}]\n");
    let apps = [("myapp-v1", 8080), ("myapp-v2", 8080), ("myapp-v1", 9000), ("myapp-v2", 9000)];
    let mesh = Mesh::start(&config(72, &format!("{SUBSETS}{vs}{extra}")), &apps).await;
    let (out, far) = tokio::io::duplex(1 << 16);
    mesh.ctx.metrics.start_access_log(crate::telemetry::access_log::Format::Json, out);

    let mut ok = get("/ok?x=1");
    ok.headers_mut().insert("x-request-id", "req-ok".parse().unwrap());
    assert_eq!(mesh.send("client", vip(72), ok).await.status(), 200);
    let mut admin = get("/admin");
    admin.headers_mut().insert("x-request-id", "req-admin".parse().unwrap());
    assert_eq!(mesh.send("client", vip(72), admin).await.status(), 403);
    let raw = SocketAddr::from(([10, 96, 72, 21], 9000));
    assert_eq!(mesh.send("client", raw, get("/raw")).await.status(), 200);

    // Five HTTP lines (two per request, one per side; the source's line for /admin
    // too) and two TCP lines, in whatever order the sides finished.
    let mut lines = tokio::io::BufReader::new(far).lines();
    let mut entries: Vec<serde_json::Value> = Vec::new();
    while entries.len() < 6 {
        let line = tokio::time::timeout(Duration::from_secs(5), lines.next_line()).await;
        let line = line.expect("access log lines in time").unwrap().unwrap();
        entries.push(serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}")));
    }
    let find = |reporter: &str, id: &str| {
        entries
            .iter()
            .find(|e| e["reporter"] == reporter && e["request_id"] == id)
            .unwrap_or_else(|| panic!("no {reporter} line for {id} in {entries:#?}"))
    };
    let src_ok = find("source", "req-ok");
    assert_eq!(src_ok["method"], "GET");
    assert_eq!(src_ok["path"], "/ok?x=1");
    assert_eq!(src_ok["protocol"], "HTTP/1.1");
    assert_eq!(src_ok["response_code"], 200);
    assert_eq!(src_ok["response_flags"], "-");
    assert_eq!(src_ok["response_code_details"], "via_upstream");
    assert_eq!(src_ok["authority"], "myapp");
    assert_eq!(src_ok["upstream_host"], "127.72.0.2:8080", "subset v1's pod");
    assert_eq!(src_ok["upstream_cluster"], "outbound|80|v1|myapp.shop.svc.cluster.local");
    assert_eq!(src_ok["downstream_local_address"], "10.96.72.20:80");
    assert_eq!(src_ok["source_principal"], "spiffe://cluster.local/ns/shop/sa/client");
    assert_eq!(src_ok["upstream_peer_principal"], "spiffe://cluster.local/ns/shop/sa/myapp");
    assert!(src_ok["bytes_sent"].as_u64().unwrap() > 0, "{src_ok}");
    assert!(src_ok["start_time"].as_str().unwrap().ends_with('Z'), "{src_ok}");

    let dst_ok = find("destination", "req-ok");
    assert_eq!(dst_ok["response_code"], 200);
    assert_eq!(dst_ok["upstream_cluster"], "inbound|8080||");
    assert_eq!(dst_ok["source_principal"], "spiffe://cluster.local/ns/shop/sa/client");

    let denied = find("destination", "req-admin");
    assert_eq!(denied["response_code"], 403);
    assert_eq!(denied["response_code_details"], "rbac_access_denied_matched_policy[ns[shop]-policy[deny-admin]]");
    assert_eq!(denied["upstream_host"], serde_json::Value::Null, "never sent to the application");
    assert_eq!(find("source", "req-admin")["response_code"], 403);

    let tcp: Vec<_> = entries.iter().filter(|e| e["protocol"] == "TCP").collect();
    assert!(!tcp.is_empty(), "{entries:#?}");
    for e in tcp {
        assert_eq!(e["response_code"], 0);
        assert!(e["bytes_received"].as_u64().unwrap() > 0 && e["bytes_sent"].as_u64().unwrap() > 0, "{e}");
        assert!(e["upstream_cluster"].as_str().unwrap().contains("|9000|"), "{e}");
    }
}

/// A collector for the test: takes OTLP trace exports over HTTP (`/v1/traces`) and
/// gRPC (`TraceService/Export`) on one port, and keeps every span with its service.
pub(crate) struct OtlpReceiver {
    pub addr: SocketAddr,
    spans: Arc<Mutex<Vec<(String, opentelemetry_proto::tonic::trace::v1::Span)>>>,
}

impl OtlpReceiver {
    pub(crate) async fn start(ip: [u8; 4]) -> Self {
        use prost::Message as _;
        let listener = TcpListener::bind(SocketAddr::from((ip, 0))).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let spans: Arc<Mutex<Vec<_>>> = Arc::default();
        let kept = spans.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { return };
                let kept = kept.clone();
                let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    let kept = kept.clone();
                    async move {
                        let grpc = req.uri().path() == "/opentelemetry.proto.collector.trace.v1.TraceService/Export";
                        assert!(grpc || req.uri().path() == "/v1/traces", "{}", req.uri());
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        let message = if grpc { body.slice(5..) } else { body };
                        let export =
                            opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest::decode(
                                message,
                            )
                            .unwrap();
                        for rs in export.resource_spans {
                            let service = rs
                                .resource
                                .iter()
                                .flat_map(|r| &r.attributes)
                                .find(|kv| kv.key == "service.name")
                                .map(|kv| format!("{:?}", kv.value))
                                .unwrap_or_default();
                            for span in rs.scope_spans.into_iter().flat_map(|s| s.spans) {
                                kept.lock().unwrap().push((service.clone(), span));
                            }
                        }
                        let mut res = Response::new(Full::new(Bytes::new()));
                        if grpc {
                            res.headers_mut().insert("content-type", "application/grpc".parse().unwrap());
                            res.headers_mut().insert("grpc-status", "0".parse().unwrap());
                        }
                        Ok::<_, Infallible>(res)
                    }
                });
                tokio::spawn(async move {
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Self { addr, spans }
    }

    /// The spans received once there are `n`, within five seconds.
    pub(crate) async fn spans(&self, n: usize) -> Vec<(String, opentelemetry_proto::tonic::trace::v1::Span)> {
        for _ in 0..100 {
            if self.spans.lock().unwrap().len() >= n {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.spans.lock().unwrap().clone()
    }
}

fn attribute(span: &opentelemetry_proto::tonic::trace::v1::Span, key: &str) -> String {
    use opentelemetry_proto::tonic::common::v1::any_value::Value;
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
            Value::StringValue(s) => Some(s.clone()),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no attribute {key} in {span:?}"))
}

/// A request from client through its agent (a routed Service: the client span) to
/// myapp's agent (the server span): both exported over OTLP, HTTP and gRPC, in one
/// trace under the caller's context, parent to child, with Istio's attributes; the
/// application gets the server span as its parent.
#[tokio::test]
async fn spans_of_both_hops_reach_an_otlp_collector_linked_parent_to_child() {
    use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
    for (net, scheme) in [(73u8, "http"), (74, "grpc")] {
        let vs = virtual_service("  - route: [{destination: {host: myapp, subset: v1}}]\n");
        let mesh = Mesh::start(&config(net, &format!("{SUBSETS}{vs}")), APPS).await;
        let collector = OtlpReceiver::start([127, net, 0, 100]).await;
        let endpoint = format!("{scheme}://{}", collector.addr).parse().unwrap();
        mesh.ctx.metrics.start_tracing(endpoint, 100.0, "node1".into(), "cluster.local".into());

        // The caller's own span, as its application would propagate it.
        let caller = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let mut req = get("/traced");
        req.headers_mut().insert("traceparent", caller.parse().unwrap());
        let res = mesh.send("client", vip(net), req).await;
        assert_eq!(res.status(), 200);

        let spans = collector.spans(2).await;
        assert_eq!(spans.len(), 2, "{scheme}: {spans:#?}");
        let of = |kind: SpanKind| spans.iter().find(|(_, s)| s.kind == kind as i32).unwrap().clone();
        let (client_service, client) = of(SpanKind::Client);
        let (server_service, server) = of(SpanKind::Server);
        let trace = crate::telemetry::trace::SpanContext::extract(&{
            let mut h = http::HeaderMap::new();
            h.insert("traceparent", caller.parse().unwrap());
            h
        })
        .unwrap();
        assert_eq!(client.trace_id, trace.trace_id.to_vec(), "the caller's trace");
        assert_eq!(server.trace_id, client.trace_id);
        assert_eq!(client.parent_span_id, trace.span_id.to_vec(), "the client span is the caller's child");
        assert_eq!(server.parent_span_id, client.span_id, "the server span is the client span's child");
        assert!(client_service.contains("client.shop"), "{client_service}");
        assert!(server_service.contains("myapp.shop"), "{server_service}");
        // (The server names the client's workload only when the tunnel comes from its
        // address; here it comes from loopback: the principal says who it is.)
        assert_eq!(attribute(&client, "istio.source_workload"), "client");
        for span in [&client, &server] {
            assert_eq!(attribute(span, "istio.destination_workload"), "myapp-v1");
            assert_eq!(attribute(span, "istio.destination_service"), "myapp.shop.svc.cluster.local");
            assert_eq!(attribute(span, "http.method"), "GET");
            assert_eq!(attribute(span, "http.status_code"), "200");
            assert_eq!(attribute(span, "istio.mesh_id"), "cluster.local");
            assert!(!attribute(span, "guid:x-request-id").is_empty());
            assert!(span.end_time_unix_nano >= span.start_time_unix_nano);
        }
        assert_eq!(attribute(&client, "istio.reporter"), "source");
        assert_eq!(attribute(&client, "upstream_cluster"), "outbound|80|v1|myapp.shop.svc.cluster.local");
        assert_eq!(attribute(&server, "istio.canonical_service"), "myapp");
        assert_eq!(attribute(&server, "istio.source_principal"), "spiffe://cluster.local/ns/shop/sa/client");
        // The application's parent is the server span.
        let seen = res.headers()["x-echo-traceparent"].to_str().unwrap().to_string();
        let server_hex: String = server.span_id.iter().map(|b| format!("{b:02x}")).collect();
        assert!(seen.contains(&server_hex), "{seen} names {server_hex}");
    }
}

/// The Telemetry API at work: a workload-level Telemetry turns the destination's
/// request count off for myapp, and turns access logging on (with the agent's flag
/// off) for 5xx answers only; a namespace-level one traces every request of the
/// namespace (the agent samples 0%) with custom tags, client side only.
#[tokio::test]
async fn telemetry_objects_turn_metrics_logs_and_spans_on_and_off_by_scope() {
    let telemetry = r#"
---
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: myapp, namespace: shop}
spec:
  selector: {matchLabels: {app: myapp}}
  metrics:
  - providers: [{name: prometheus}]
    overrides: [{match: {metric: REQUEST_COUNT, mode: SERVER}, disabled: true}]
  accessLogging:
  - providers: [{name: envoy}]
    filter: {expression: "response.code >= 500"}
---
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: namespace-wide, namespace: shop}
spec:
  tracing:
  - randomSamplingPercentage: 100
    match: {mode: CLIENT}
    customTags:
      team: {literal: {value: payments}}
      tenant: {header: {name: x-tenant, defaultValue: none}}
"#;
    let vs = virtual_service("  - route: [{destination: {host: myapp, subset: v1}}]\n");
    let mesh = Mesh::start(&config(75, &format!("{SUBSETS}{vs}{telemetry}")), APPS).await;
    let collector = OtlpReceiver::start([127, 75, 0, 100]).await;
    let endpoint = format!("http://{}", collector.addr).parse().unwrap();
    mesh.ctx.metrics.start_tracing(endpoint, 0.0, "node1".into(), "cluster.local".into());
    let (out, far) = tokio::io::duplex(1 << 16);
    mesh.ctx.metrics.start_access_log(crate::telemetry::access_log::Format::Off, out);

    let mut tenant = get("/ok");
    tenant.headers_mut().insert("x-tenant", "acme".parse().unwrap());
    assert_eq!(mesh.send("client", vip(75), tenant).await.status(), 200);
    // Retried by the default route's policy, failing every time.
    assert_eq!(mesh.send("client", vip(75), get("/fail-first/9")).await.status(), 503);

    // Metrics: the source still counts both; myapp's agent counts none of the
    // attempts, but still measures their duration (only REQUEST_COUNT was turned off).
    let metrics = mesh.metrics();
    let count = |prefix: &str| -> u64 {
        metrics
            .lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    };
    assert_eq!(count("requests_total{reporter=\"source\""), 2, "{metrics}");
    assert_eq!(count("requests_total{reporter=\"destination\""), 0, "{metrics}");
    assert!(count("request_duration_milliseconds_count{reporter=\"destination\"") >= 2, "{metrics}");

    // Access log: only myapp's 503s, from its own agent (client has no Telemetry that
    // logs, and the flag is off), as text.
    let mut lines = tokio::io::BufReader::new(far).lines();
    let mut logged = Vec::new();
    while let Ok(Ok(Some(line))) = tokio::time::timeout(Duration::from_millis(1500), lines.next_line()).await {
        logged.push(line);
    }
    assert!(!logged.is_empty(), "the 5xx answers are logged");
    for line in &logged {
        assert!(line.contains("\"GET /fail-first/9 HTTP/1.1\" 503 - via_upstream"), "5xx only: {line}");
        assert!(line.contains(" inbound|8080|| "), "from the destination's agent: {line}");
    }

    // Tracing: the namespace's Telemetry samples every trace, client spans only.
    let spans = collector.spans(2).await;
    assert_eq!(spans.len(), 2, "two requests, one client span each: {spans:#?}");
    for (_, span) in &spans {
        assert_eq!(span.kind, opentelemetry_proto::tonic::trace::v1::span::SpanKind::Client as i32);
        assert_eq!(attribute(span, "team"), "payments");
    }
    let tenants: Vec<String> = spans.iter().map(|(_, s)| attribute(s, "tenant")).collect();
    assert!(tenants.contains(&"acme".to_string()) && tenants.contains(&"none".to_string()), "{tenants:?}");
}

/// A TCP Service on the pods' port 9000 and a DENY of `intruder` for myapp.
fn same_node_config(net: u8) -> String {
    let extra = format!(
        r#"
---
apiVersion: v1
kind: Service
metadata: {{name: myapp-raw, namespace: shop}}
spec: {{selector: {{app: myapp}}, clusterIP: 10.96.{net}.21, ports: [{{port: 9000, targetPort: 9000, name: tcp-raw}}]}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: no-intruder, namespace: shop}}
spec:
  selector: {{matchLabels: {{app: myapp}}}}
  action: DENY
  rules: [{{from: [{{source: {{principals: [cluster.local/ns/shop/sa/intruder]}}}}]}}]
"#
    );
    config(net, &extra)
}

/// One HTTP/1.1 request written on a raw connection; the answer's head.
async fn raw_get(stream: &mut tokio::net::TcpStream) -> std::io::Result<String> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    stream.write_all(b"GET / HTTP/1.1\r\nhost: myapp-raw\r\n\r\n").await?;
    let mut buf = vec![0u8; 4096];
    let n =
        tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await.map_err(std::io::Error::other)??;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// Between two pods the agent serves, a TCP connection is admitted by the agent itself
/// (no HBONE server runs here at all), under the destination's policy: the source's
/// identity allowed or denied as the tunnel would have it, both reporters counted, and
/// a live connection closed once a new policy refuses it.
#[tokio::test]
async fn same_node_tcp_is_admitted_without_a_tunnel_under_the_destinations_policy() {
    let net = 76;
    let apps = [("myapp-v1", 9000), ("myapp-v2", 9000)];
    let mesh = Mesh::start_with(&same_node_config(net), &apps, Serving { hbone: false, local: true }).await;
    let raw_vip = SocketAddr::from(([10, 96, net, 21], 9000));
    let mut held = mesh.dial("client", raw_vip).await;
    let head = raw_get(&mut held).await.unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "delivered without a tunnel: {head}");
    let refused = raw_get(&mut mesh.dial("intruder", raw_vip).await).await;
    assert!(refused.as_deref().map_or(true, str::is_empty), "intruder denied by myapp's policy: {refused:?}");
    let metrics = mesh.metrics();
    let opened = |reporter: &str| {
        metrics.lines().any(|l| {
            l.starts_with("tcp_connections_opened_total{")
                && l.contains(&format!("reporter=\"{reporter}\""))
                && l.contains("destination_service=\"myapp-raw.shop.svc.cluster.local\"")
                && l.contains("source_principal=\"spiffe://cluster.local/ns/shop/sa/client\"")
                && l.contains("connection_security_policy=\"mutual_tls\"")
        })
    };
    assert!(opened("source") && opened("destination"), "reported by both sides:\n{metrics}");
    let denied = metrics.lines().any(|l| l.starts_with("mesh_denied_total{") && l.contains("reason=\"Policy\""));
    assert!(denied, "the denial counted:\n{metrics}");
    // A policy that now refuses the client closes its live connection.
    let deny_client = same_node_config(net).replace("sa/intruder", "sa/client");
    mesh.reconfigure(&deny_client, &MeshScope::new("cluster.local"));
    assert_eq!(mesh.ctx.inbound.reassess(&mesh.ctx.snapshot.load()), 1, "the held connection re-judged");
    let after = raw_get(&mut held).await;
    assert!(after.as_deref().map_or(true, str::is_empty), "closed once refused: {after:?}");
}

/// A pair of the agent's pods goes direct only when nothing but the pair decides its
/// connections: the destination's policy allows the source at L4, the port is one the
/// destination does not read HTTP on (declared `tcp-` here), the address is the pod's
/// own, not a Service's, and the switch is on. Any other case is refused, with why.
#[tokio::test]
async fn a_pair_goes_direct_only_when_nothing_but_the_pair_decides() {
    let net = 77;
    let mesh = Mesh::start_with(&same_node_config(net), &[], Serving { hbone: false, local: true }).await;
    let on = ProxyContext { same_node_direct: true, ..mesh.ctx.clone() };
    let v1 = mesh.workload("myapp-v1");
    let judge = |ctx: &ProxyContext, from: &str, client: Option<SocketAddr>, server: SocketAddr| {
        let src = mesh.workload(from);
        let client = client.unwrap_or(SocketAddr::new(src.ips[0], 40000));
        super::direct::refusal(ctx, &ctx.snapshot.load(), &src, &v1, client, server)
    };
    let pod = |port| SocketAddr::new(v1.ips[0], port);
    assert_eq!(judge(&on, "client", None, pod(9000)), None, "allowed, TCP-declared, the pod's own address");
    assert_eq!(judge(&mesh.ctx, "client", None, pod(9000)), Some("the direct path is off"));
    assert_eq!(judge(&on, "intruder", None, pod(9000)), Some("denied by policy"));
    assert_eq!(judge(&on, "client", None, pod(8080)), Some("the destination reads HTTP for its request metrics"));
    assert_eq!(judge(&on, "client", None, pod(ports::INBOUND_HBONE)), Some("a port the mesh does not pass through"));
    let vip = SocketAddr::from(([10, 96, net, 21], 9000));
    assert_eq!(judge(&on, "client", None, vip), Some("an address not the pod's own"));
    let foreign = SocketAddr::from(([127, 0, 0, 9], 40000));
    assert_eq!(judge(&on, "client", Some(foreign), pod(9000)), Some("an address not the pod's own"));
    // A rule on paths: every connection is judged per request, never direct.
    let per_request = format!(
        "{}---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: paths, namespace: shop}}\nspec:\n  selector: {{matchLabels: {{app: myapp}}}}\n  action: ALLOW\n  rules: [{{to: [{{operation: {{paths: [/ok]}}}}]}}]\n",
        same_node_config(net)
    );
    mesh.reconfigure(&per_request, &MeshScope::new("cluster.local"));
    assert_eq!(judge(&on, "client", None, pod(9000)), Some("policies read HTTP"));
}

/// A certificate holds for the streams opened while it is valid, not for the life of
/// the connection it was presented on: once the client's has expired, its HBONE
/// connection takes no more CONNECTs (a CA outage past a certificate's lifetime fails
/// closed for tunnels opened before it too), while the stream opened before goes on.
#[tokio::test]
async fn a_tunnel_takes_no_new_stream_once_the_clients_certificate_expired() {
    let mesh = Mesh::start(&config(81, ""), &[("myapp-v1", 9000)]).await;
    let (client, v1) = (mesh.workload("client"), mesh.workload("myapp-v1"));
    let short_lived = Arc::new(CertStore::new(mesh.ca.clone(), Duration::from_secs(2)));
    short_lived.set_local([client.identity.clone()]);
    let verifier = &mesh.ctx.dialer.verifier;
    let tls =
        crate::identity::client_config(short_lived.clone(), client.identity.clone(), v1.identity.clone(), verifier)
            .unwrap();
    let tcp = tokio::net::TcpStream::connect((v1.ips[0], ports::INBOUND_HBONE)).await.unwrap();
    let name = rustls::pki_types::ServerName::IpAddress(v1.ips[0].into());
    let tls = tokio_rustls::TlsConnector::from(tls).connect(name, tcp).await.unwrap();
    let (_, not_after) = short_lived.held()[0].clone();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls)).await.unwrap();
    tokio::spawn(conn);
    let connect = || {
        let target = SocketAddr::new(v1.ips[0], 9000);
        Request::builder().method(http::Method::CONNECT).uri(target.to_string()).body(Empty::<Bytes>::new()).unwrap()
    };
    let res = sender.send_request(connect()).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK, "valid: the stream opens");
    let mut open = TokioIo::new(hyper::upgrade::on(res).await.unwrap());

    let left = not_after.duration_since(std::time::SystemTime::now()).unwrap_or_default();
    tokio::time::sleep(left + Duration::from_millis(100)).await;
    let res = sender.send_request(connect()).await.unwrap();
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED, "expired: no new stream on the old connection");
    // The stream opened under the valid certificate is left to finish.
    open.write_all(b"GET / HTTP/1.1\r\nhost: myapp\r\n\r\n").await.unwrap();
    let mut head = [0u8; 12];
    open.read_exact(&mut head).await.unwrap();
    assert_eq!(&head, b"HTTP/1.1 200");
}

/// HTTP that the destination reads for its request metrics still goes through the
/// destination's HBONE server between two pods of one agent.
#[tokio::test]
async fn same_node_http_the_destination_reads_still_takes_the_tunnel() {
    let net = 77;
    let mesh = Mesh::start_with(&same_node_config(net), APPS, Serving { hbone: true, local: true }).await;
    assert_eq!(mesh.send("client", vip(net), get("/")).await.status(), 200);
    let metrics = mesh.metrics();
    let read = metrics.lines().any(|l| {
        l.starts_with("requests_total{")
            && l.contains("reporter=\"destination\"")
            && l.contains("destination_service=\"myapp.shop.svc.cluster.local\"")
    });
    assert!(read, "the destination read the request:\n{metrics}");
}

/// Waits (up to 2 s) until nothing holds the snapshot `old` any more.
async fn released(old: &std::sync::Weak<Snapshot>) -> bool {
    for _ in 0..100 {
        if old.strong_count() == 0 {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

/// A live connection keeps no replaced config alive, through a tunnel or between two
/// pods of one agent: each let go of the snapshot it was decided under. Otherwise the
/// agent would hold one config per change for as long as any connection from before it
/// lasts.
#[tokio::test]
async fn live_connections_keep_no_replaced_config_alive() {
    // Through a tunnel: outbound, HBONE, inbound, to the application's port.
    let net = 78;
    let mesh = Mesh::start(&config(net, ""), &[]).await;
    let sink_addr = SocketAddr::from(([127, net, 0, 2], 9000));
    let sink = TcpListener::bind(sink_addr).await.unwrap();
    let mut client = mesh.dial("client", sink_addr).await;
    client.write_all(b"ping").await.unwrap();
    let (mut app, _) = tokio::time::timeout(Duration::from_secs(10), sink.accept()).await.unwrap().unwrap();
    let old = Arc::downgrade(&mesh.ctx.snapshot.load_full());
    mesh.reconfigure(&config(net, ""), &MeshScope::new("cluster.local"));
    assert!(released(&old).await, "a tunnelled connection still holds the config it began under");
    let mut got = [0u8; 4];
    app.read_exact(&mut got).await.unwrap();
    app.write_all(b"pong").await.unwrap();
    client.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"pong", "the connection still serves");

    // Between two pods of this agent, admitted without a tunnel.
    let net = 79;
    let apps = [("myapp-v1", 9000), ("myapp-v2", 9000)];
    let mesh = Mesh::start_with(&same_node_config(net), &apps, Serving { hbone: false, local: true }).await;
    let mut held = mesh.dial("client", SocketAddr::from(([10, 96, net, 21], 9000))).await;
    assert!(raw_get(&mut held).await.unwrap().starts_with("HTTP/1.1 200"));
    let old = Arc::downgrade(&mesh.ctx.snapshot.load_full());
    mesh.reconfigure(&same_node_config(net), &MeshScope::new("cluster.local"));
    assert!(released(&old).await, "a same-node connection still holds the config it began under");
    assert!(raw_get(&mut held).await.unwrap().starts_with("HTTP/1.1 200"), "the connection still serves");
}

/// What an idle proxied connection costs the agent's heap, both halves (the source
/// agent's outbound and the destination's inbound over HBONE, in this one process):
/// the number issue 18 bounds. Measured by the ignored test below in a process of its
/// own, since other tests allocate alongside. Measured 7.4 KiB for the pair (2026-12-05,
/// after the decision/splice split and shared labels); 11.7 before that, and 33 before
/// the tasks stopped holding futures twice and boxed their rare branches.
#[test]
fn an_idle_proxied_connection_costs_the_agent_little_heap() {
    /// Heap bytes for both halves of one idle connection, at most.
    const BOUND: f64 = 9.0 * 1024.0;
    let Some(per_conn) = measured_alone("idle_connection_heap", &[], "heap per idle connection: ") else { return };
    eprintln!("heap per idle connection (both agent halves): {per_conn:.0} B");
    assert!(per_conn <= BOUND, "an idle connection costs the agent {per_conn:.0} B of heap (bound {BOUND})");
}

/// Runs the ignored test `measurement` alone in a process of its own (with `env`) and
/// reads the number after `prefix` in what it printed; None where the heap's bytes in
/// use cannot be read (not glibc's allocator).
fn measured_alone(measurement: &str, env: &[(&str, &str)], prefix: &str) -> Option<f64> {
    if crate::heap::bytes_in_use().is_none() {
        eprintln!("skipping: the heap's bytes in use are read from glibc's allocator, not this one");
        return None;
    }
    let exe = std::env::current_exe().unwrap();
    let name = format!("proxy::tests::{measurement}");
    let out = std::process::Command::new(exe)
        .args(["--exact", name.as_str(), "--ignored", "--nocapture", "--test-threads=1"])
        .envs(env.iter().copied())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "the measurement failed:\n{text}");
    let value = text
        .lines()
        .find_map(|l| l.strip_prefix(prefix))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no measurement in:\n{text}"));
    Some(value)
}

/// The measurement: `N` connections from a pod through the agent (outbound, HBONE,
/// inbound) to a sink that holds them, against the same number straight to the sink.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run alone, in a process of its own, by an_idle_proxied_connection_costs_the_agent_little_heap"]
async fn idle_connection_heap() {
    use crate::heap::bytes_in_use;
    /// Under the per-source cap of the test's limits.
    const N: usize = 900;
    let mesh = Mesh::start(&config(97, ""), &[]).await;
    let sink_addr: SocketAddr = "127.97.0.2:9000".parse().unwrap();
    let sink = TcpListener::bind(sink_addr).await.unwrap();
    let held: Arc<Mutex<Vec<tokio::net::TcpStream>>> = Arc::default();
    let holder = held.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = sink.accept().await {
            holder.lock().unwrap().push(s);
        }
    });
    // The table standing in for the kernel's is the test's own: room made up front.
    mesh.captured.0.lock().unwrap().reserve(2 * N);
    held.lock().unwrap().reserve(2 * N);
    let settled = || async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        bytes_in_use().unwrap()
    };
    let before = settled().await;
    let mut direct = Vec::with_capacity(N);
    for _ in 0..N {
        direct.push(tokio::net::TcpStream::connect(sink_addr).await.unwrap());
    }
    let direct_each = (settled().await - before) as f64 / N as f64;
    drop(direct);
    held.lock().unwrap().clear();

    let pod = mesh.workload("client");
    let listener = TcpListener::bind((pod.ips[0], 0)).await.unwrap();
    let outbound = listener.local_addr().unwrap();
    let scope = (pod.clone(), mesh.netns.clone());
    tokio::spawn(serve_plain(mesh.ctx.clone(), scope, listener, Plain::Outbound, mesh.stop.clone()));
    let dial = || async {
        let socket = TcpSocket::new_v4().unwrap();
        socket.bind(SocketAddr::new(pod.ips[0], 0)).unwrap();
        mesh.captured.0.lock().unwrap().insert(socket.local_addr().unwrap(), sink_addr);
        let mut s = socket.connect(outbound).await.unwrap();
        s.write_all(b"x").await.unwrap();
        s
    };
    // The first connection opens the tunnel and fills the caches: not counted.
    let _warm = dial().await;
    while held.lock().unwrap().is_empty() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let base = settled().await;
    let mut meshed = Vec::with_capacity(N);
    for _ in 0..N {
        meshed.push(dial().await);
    }
    while held.lock().unwrap().len() < N + 1 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let meshed_each = (settled().await - base) as f64 / N as f64;
    eprintln!(
        "heap per idle connection: {:.0} B (direct {direct_each:.0}, meshed {meshed_each:.0})",
        meshed_each - direct_each
    );
}

/// Connections that come and go leave nothing behind in the agent: after a first round
/// (which fills the caches), rounds of new connections through both halves of the
/// agent grow the heap's bytes in use by next to nothing. Measured in a process of its
/// own with glibc's per-thread cache off (`glibc.malloc.tcache_count=0`): otherwise the
/// cache filling, up to a few hundred KiB per thread and bounded, would show as growth.
#[test]
fn churned_connections_leave_no_heap_behind() {
    /// Heap bytes in use per churned connection, at most (a leak of one small map entry
    /// per connection is 50 and more).
    const BOUND: f64 = 4.0;
    let tunables = [("GLIBC_TUNABLES", "glibc.malloc.tcache_count=0")];
    let Some(per_conn) = measured_alone("churn_heap", &tunables, "heap growth per churned connection: ") else {
        return;
    };
    assert!(per_conn <= BOUND, "each churned connection leaves {per_conn:.1} B of heap behind (bound {BOUND})");
}

/// The measurement: rounds of `N` connections, one HTTP request each with
/// `connection: close`, from a pod through the agent (outbound, HBONE, the
/// destination's HTTP reading) to myapp-v1; the heap's bytes in use after each round.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run alone, in a process of its own, by churned_connections_leave_no_heap_behind"]
async fn churn_heap() {
    use crate::heap::bytes_in_use;
    const N: usize = 1500;
    const ROUNDS: usize = 4;
    const CONCURRENT: usize = 16;
    let mesh = Arc::new(Mesh::start(&config(98, ""), APPS).await);
    let pod = mesh.workload("client");
    let listener = TcpListener::bind((pod.ips[0], 0)).await.unwrap();
    let outbound = listener.local_addr().unwrap();
    let scope = (pod.clone(), mesh.netns.clone());
    tokio::spawn(serve_plain(mesh.ctx.clone(), scope, listener, Plain::Outbound, mesh.stop.clone()));
    let target: SocketAddr = "127.98.0.2:8080".parse().unwrap();
    // The table standing in for the kernel's is the test's own: room made up front.
    mesh.captured.0.lock().unwrap().reserve(4 * CONCURRENT);
    let one = |mesh: Arc<Mesh>, ip: IpAddr| async move {
        let socket = TcpSocket::new_v4().unwrap();
        socket.bind(SocketAddr::new(ip, 0)).unwrap();
        let local = socket.local_addr().unwrap();
        mesh.captured.0.lock().unwrap().insert(local, target);
        let mut s = socket.connect(outbound).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nhost: myapp\r\nconnection: close\r\n\r\n").await.unwrap();
        let mut reply = Vec::new();
        s.read_to_end(&mut reply).await.unwrap();
        assert!(reply.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&reply));
        mesh.captured.0.lock().unwrap().remove(&local);
    };
    let settled = || async {
        tokio::time::sleep(Duration::from_millis(1000)).await;
        bytes_in_use().unwrap()
    };
    let mut after_first = 0;
    for round in 0..ROUNDS {
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..N {
            if i >= CONCURRENT {
                tasks.join_next().await.unwrap().unwrap();
            }
            tasks.spawn(one(mesh.clone(), pod.ips[0]));
        }
        while let Some(r) = tasks.join_next().await {
            r.unwrap();
        }
        let now = settled().await;
        eprintln!("round {round}: heap in use {now} B");
        if round == 0 {
            after_first = now;
        }
    }
    let grown = settled().await as f64 - after_first as f64;
    eprintln!("heap growth per churned connection: {:.1} B", grown / ((ROUNDS - 1) * N) as f64);
}

/// `config(net, ...)` with a DestinationRule for myapp ejecting after `errors`
/// consecutive failures (`ejection` long), the client and myapp-v1 in us-east zone a,
/// myapp-v2 in us-west (`extra` appended).
fn near_and_far(net: u8, errors: u32, ejection: &str, extra: &str) -> String {
    let dr = format!(
        r#"
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: myapp, namespace: shop}}
spec:
  host: myapp
  trafficPolicy:
    outlierDetection: {{consecutive5xxErrors: {errors}, interval: 50ms, baseEjectionTime: {ejection}, maxEjectionPercent: 100}}
{extra}"#
    );
    config(net, &dr)
        .replace("labels: {app: client}", "labels: {app: client, istio-locality: us-east.a}")
        .replace("labels: {app: myapp, version: v1}", "labels: {app: myapp, version: v1, istio-locality: us-east.a}")
        .replace("labels: {app: myapp, version: v2}", "labels: {app: myapp, version: v2, istio-locality: us-west.b}")
}

#[tokio::test]
async fn l7_prefers_the_clients_locality_fails_over_when_it_is_ejected_and_comes_back() {
    let no_retries = r#"---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: myapp, namespace: shop}
spec:
  hosts: [myapp]
  http:
  - route: [{destination: {host: myapp}}]
    retries: {attempts: 0}
"#;
    let mesh = Mesh::start(&near_and_far(99, 2, "1s", no_retries), APPS).await;
    let served = |path: &'static str| {
        let mesh = &mesh;
        async move {
            let res = mesh.send("client", vip(99), get(path)).await;
            (res.status(), served_by(&res).to_string())
        }
    };
    for _ in 0..6 {
        assert_eq!(served("/").await, (StatusCode::OK, "myapp-v1".to_string()), "the client's own locality serves");
    }
    // myapp-v1 fails twice: ejected, and us-west takes the traffic at once.
    for _ in 0..2 {
        assert_eq!(served("/fail-first/2").await, (StatusCode::SERVICE_UNAVAILABLE, "myapp-v1".to_string()));
    }
    for _ in 0..4 {
        assert_eq!(served("/").await, (StatusCode::OK, "myapp-v2".to_string()), "failed over to the next locality");
    }
    // After baseEjectionTime (at the next sweep), the near endpoint takes it back.
    let deadline = Instant::now() + Duration::from_secs(5);
    while served("/").await.1 != "myapp-v1" {
        assert!(Instant::now() < deadline, "never came back to the client's locality");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Without outlier detection nothing says an endpoint is unhealthy: no preference,
    // as Istio does.
    let spread = config(100, "")
        .replace("labels: {app: client}", "labels: {app: client, istio-locality: us-east.a}")
        .replace("labels: {app: myapp, version: v1}", "labels: {app: myapp, version: v1, istio-locality: us-east.a}");
    let mesh = Mesh::start(&spread, APPS).await;
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..20 {
        let res = mesh.send("client", vip(100), get("/")).await;
        seen.insert(served_by(&res).to_string());
    }
    assert_eq!(seen.len(), 2, "{seen:?}");
}

#[tokio::test]
async fn l4_fails_over_to_the_next_locality_when_connects_to_the_near_endpoint_fail() {
    // An opaque port: the agent copies bytes and reads no answer. myapp-v1, near the
    // client, has no application listening: connecting to it fails.
    let yaml = near_and_far(101, 1, "30s", "").replace("name: http}", "name: tcp}");
    let mesh = Mesh::start(&yaml, &[("myapp-v2", 8080)]).await;
    let first = mesh.try_send("client", vip(101), get("/")).await;
    assert!(first.is_err(), "the near endpoint is tried first, and fails: {first:?}");
    for _ in 0..4 {
        let res = mesh.send("client", vip(101), get("/")).await;
        assert_eq!(served_by(&res), "myapp-v2", "ejected after the failed connect: the far locality serves");
    }
}

#[tokio::test]
async fn distribute_sends_each_locality_its_share_of_the_clients_requests() {
    // The client is in us-east.a: a fifth of its requests stay there, the rest go west.
    let yaml = near_and_far(102, 5, "30s", "").replace(
        "maxEjectionPercent: 100}",
        "maxEjectionPercent: 100}\n    loadBalancer:\n      localityLbSetting:\n        \
         distribute: [{from: us-east/*, to: {us-east/*: 20, us-west/*: 80}}]",
    );
    let mesh = Mesh::start(&yaml, APPS).await;
    let mut west = 0;
    for _ in 0..100 {
        let res = mesh.send("client", vip(102), get("/")).await;
        assert_eq!(res.status(), StatusCode::OK);
        west += usize::from(served_by(&res) == "myapp-v2");
    }
    assert!((65..=93).contains(&west), "about 80 of 100 to us-west: {west}");
}

//! `meshctl dashboard` over real sockets, no root: the mesh page merges two agents'
//! admin data (each agent sees only its node), and the addon dashboards are
//! port-forwarded through the API server (the API-server double's WebSocket
//! port-forward here, with a real Prometheus behind it when one is installed, and a
//! WebSocket server for the upgrades istioctl's port-forward carries).

mod support;

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mesh_agent::admin::{self, AdminState, ScrapeAuth, ScrapeAuthMode};
use mesh_agent::snapshot::Snapshot;
use serde_json::{Value, json};
use support::api_server::ApiServer;
use tokio_util::sync::CancellationToken;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// One HTTP/1.0 request; the status line's code, the headers and the body.
fn http(addr: SocketAddr, method: &str, target: &str, host: &str, body: &str) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let extra = if body.is_empty() {
        String::new()
    } else {
        format!("Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n", body.len())
    };
    write!(s, "{method} {target} HTTP/1.0\r\nHost: {host}\r\n{extra}\r\n{body}").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    let code = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (code, head.to_ascii_lowercase(), body.to_string())
}

fn series(reporter: &str, requests: f64) -> String {
    format!(
        "istio_requests_total{{reporter=\"{reporter}\",source_workload=\"frontend\",source_workload_namespace=\"shop\",\
         source_principal=\"spiffe://cluster.local/ns/shop/sa/frontend\",destination_workload=\"cart\",\
         destination_workload_namespace=\"shop\",destination_service=\"cart.shop.svc.cluster.local\",\
         connection_security_policy=\"mutual_tls\",response_code=\"200\"}} {requests}\n"
    )
}

/// An agent's admin server on loopback whose graph saw `requests` in 10 s, reported by
/// `reporter`.
async fn agent(node: &str, reporter: &str, requests: f64, stop: &CancellationToken) -> SocketAddr {
    let auth = Arc::new(ScrapeAuth::new(&ScrapeAuthMode::None, None).unwrap());
    let snapshot = Arc::new(arc_swap::ArcSwap::from_pointee(Snapshot::default()));
    let state = AdminState::new(Default::default(), snapshot, node.into(), Default::default(), auth);
    let t0 = Instant::now();
    state.traffic.sample(t0, &series(reporter, 0.0));
    state.traffic.sample(t0 + Duration::from_secs(10), &series(reporter, requests));
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(admin::serve(listener, state, stop.clone(), true));
    wait_listening(addr).await;
    addr
}

async fn wait_listening(addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        assert!(Instant::now() < deadline, "{addr} never listened");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `meshctl dashboard ARGS`, up once it printed its address.
struct Meshctl(Child);

impl Meshctl {
    fn start(args: Vec<String>, kubeconfig: Option<&std::path::Path>) -> (Self, SocketAddr) {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_meshctl"));
        cmd.arg("dashboard").args(args).args(["--browser=false", "--address", "127.0.0.1"]);
        if let Some(k) = kubeconfig {
            cmd.env("KUBECONFIG", k);
        }
        let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        if line.is_empty() {
            let mut err = String::new();
            child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
            panic!("meshctl dashboard did not start: {err}");
        }
        let addr = line.trim().trim_start_matches("http://").trim_end_matches('/').parse().unwrap();
        (Meshctl(child), addr)
    }
}

impl Drop for Meshctl {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A helper process, stopped however the test ends.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mesh_page_merges_every_agent_and_answers_only_to_loopback() {
    let stop = CancellationToken::new();
    let node1 = agent("node1", "source", 100.0, &stop).await;
    let node2 = agent("node2", "destination", 80.0, &stop).await;
    let port = free_port().to_string();
    let unreachable = format!("127.0.0.1:{}", free_port());
    let args = ["--admin", &node1.to_string(), "--admin", &node2.to_string(), "--admin", &unreachable, "--port", &port]
        .map(str::to_string)
        .to_vec();
    let (_meshctl, addr) = tokio::task::spawn_blocking(move || Meshctl::start(args, None)).await.unwrap();

    let (code, head, body) =
        tokio::task::spawn_blocking(move || http(addr, "GET", "/dashboard/data", "localhost", "")).await.unwrap();
    assert_eq!(code, 200, "{body}");
    assert!(head.contains("application/json"));
    let data: Value = serde_json::from_str(&body).unwrap();
    let agents: Vec<&str> = data["agents"].as_array().unwrap().iter().map(|a| a["node"].as_str().unwrap()).collect();
    assert_eq!(agents, [unreachable.as_str(), "node1", "node2"]);
    assert!(data["agents"][0]["error"].as_str().unwrap().contains("cannot reach"), "{data}");
    let edges = data["graph"]["edges"].as_array().unwrap();
    assert_eq!(edges.len(), 1, "one edge, seen from both ends: {data}");
    assert_eq!(edges[0]["source"], "shop/frontend");
    assert_eq!(edges[0]["destination"], "shop/cart");
    assert_eq!(edges[0]["reporter"], "destination", "the destination's report wins, as in Kiali");
    assert_eq!(edges[0]["rate"], 8.0);
    assert_eq!(edges[0]["mtls"], 1.0);

    let (code, head, body) =
        tokio::task::spawn_blocking(move || http(addr, "GET", "/", "127.0.0.1", "")).await.unwrap();
    assert_eq!(code, 200);
    assert!(body.contains("<title>Mesh dashboard</title>"));
    assert!(head.contains("content-security-policy: default-src 'none'"), "{head}");

    for host in ["evil.example", "evil.example:15100", "10.1.2.3"] {
        let (code, _, _) =
            tokio::task::spawn_blocking(move || http(addr, "GET", "/dashboard/data", host, "")).await.unwrap();
        assert_eq!(code, 403, "Host {host} (DNS rebinding) is refused");
    }
    // The agents' own admin pages refuse such a Host too.
    let (code, _, _) =
        tokio::task::spawn_blocking(move || http(node1, "GET", "/dashboard/data", "evil.example", "")).await.unwrap();
    assert_eq!(code, 403);
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_addon_dashboard_is_port_forwarded_through_the_api_server() {
    let Some(prometheus) =
        ["/usr/bin/prometheus", "/usr/local/bin/prometheus"].into_iter().find(|p| std::path::Path::new(p).exists())
    else {
        assert!(std::env::var_os("MESH_REQUIRE_LAB").is_none(), "prometheus is not installed (cargo xtask setup)");
        eprintln!("skipping: prometheus is not installed (cargo xtask setup installs it)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let prom_port = free_port();
    std::fs::write(dir.path().join("prometheus.yml"), "global: {scrape_interval: 15s}\n").unwrap();
    let _prometheus = KillOnDrop(
        Command::new(prometheus)
            .arg(format!("--config.file={}", dir.path().join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let api = ApiServer::new(&["/api/v1/pods".to_string(), "/api/v1/namespaces".to_string()]).await;
    let kubeconfig = api.kubeconfig(dir.path());
    // Not running yet: meshctl says what is missing.
    let (ok, out) = {
        let k = kubeconfig.clone();
        tokio::task::spawn_blocking(move || {
            let out = Command::new(env!("CARGO_BIN_EXE_meshctl"))
                .args(["dashboard", "prometheus", "--browser=false", "--port", "0"])
                .env("KUBECONFIG", &k)
                .output()
                .unwrap();
            (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
        })
        .await
        .unwrap()
    };
    assert!(!ok);
    assert!(out.contains("no running pod with label app=prometheus in namespace istio-system"), "{out}");

    api.apply(
        "/api/v1/pods",
        json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "prometheus-7f9c-x2x", "namespace": "istio-system", "labels": {"app.kubernetes.io/name": "prometheus"}},
            "spec": {"containers": [{"name": "prometheus-server", "image": "prom/prometheus", "ports": [{"containerPort": prom_port}]}]},
            "status": {"phase": "Running", "podIP": "127.0.0.1"}}),
    );
    let port = free_port().to_string();
    let k = kubeconfig.clone();
    let (_meshctl, addr) =
        tokio::task::spawn_blocking(move || Meshctl::start(vec!["prometheus".into(), "--port".into(), port], Some(&k)))
            .await
            .unwrap();

    // Prometheus answers through the port-forward once it is up: the query string and
    // a POST body are carried.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (code, _, body) =
            tokio::task::spawn_blocking(move || http(addr, "GET", "/api/v1/query?query=vector(42)", "localhost", ""))
                .await
                .unwrap();
        if code == 200 {
            let v: Value = serde_json::from_str(&body).unwrap();
            assert_eq!(v["data"]["result"][0]["value"][1], "42", "{v}");
            break;
        }
        assert!(Instant::now() < deadline, "Prometheus never answered through the port-forward: {code} {body}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let (code, _, body) =
        tokio::task::spawn_blocking(move || http(addr, "POST", "/api/v1/query", "localhost", "query=6*7"))
            .await
            .unwrap();
    assert_eq!(code, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["data"]["result"][1], "42", "{v}");
    let (code, _, _) =
        tokio::task::spawn_blocking(move || http(addr, "GET", "/graph", "evil.example", "")).await.unwrap();
    assert_eq!(code, 403);
    api.stop().await;
}

/// A WebSocket server that echoes each text message, on a free loopback port.
async fn websocket_echo() -> u16 {
    use futures::{SinkExt as _, StreamExt as _};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(tcp).await else { return };
                while let Some(Ok(msg)) = ws.next().await {
                    if msg.is_text() && ws.send(msg).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_upgrades_reach_an_addon_through_the_port_forward() {
    use futures::{SinkExt as _, StreamExt as _};
    use tokio_tungstenite::tungstenite::Message;
    let live = websocket_echo().await;
    let dir = tempfile::tempdir().unwrap();
    let api = ApiServer::new(&["/api/v1/pods".to_string(), "/api/v1/namespaces".to_string()]).await;
    api.apply(
        "/api/v1/pods",
        json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "grafana-5d8f-abc", "namespace": "istio-system", "labels": {"app": "grafana"}},
            "spec": {"containers": [{"name": "grafana", "ports": [{"containerPort": live}]}]},
            "status": {"phase": "Running", "podIP": "127.0.0.1"}}),
    );
    let kubeconfig = api.kubeconfig(dir.path());
    let port = free_port().to_string();
    let (_meshctl, addr) = tokio::task::spawn_blocking(move || {
        Meshctl::start(vec!["grafana".into(), "--port".into(), port], Some(&kubeconfig))
    })
    .await
    .unwrap();
    // Grafana Live's way: an upgrade to a WebSocket, then messages both ways.
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut ws, answer) = tokio_tungstenite::client_async(format!("ws://localhost:{}/api/live/ws", addr.port()), tcp)
        .await
        .expect("the upgrade is carried to the pod");
    assert_eq!(answer.status(), 101);
    for text in ["ping", "a second message on the same stream"] {
        ws.send(Message::text(text)).await.unwrap();
        let echoed = tokio::time::timeout(Duration::from_secs(10), ws.next()).await.unwrap().unwrap().unwrap();
        assert_eq!(echoed.into_text().unwrap().as_str(), text);
    }
    // A page elsewhere cannot open one (DNS rebinding): refused before any forwarding.
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let refused = tokio_tungstenite::client_async(format!("ws://evil.example:{}/api/live/ws", addr.port()), tcp).await;
    match refused {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => assert_eq!(r.status(), 403),
        other => panic!("expected a 403, got {other:?}"),
    }
    api.stop().await;
}

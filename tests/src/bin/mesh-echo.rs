//! `mesh-echo`: the lab's test application and its small clients.
//!
//! `serve` answers HTTP (HTTP/1.1 and h2c) with JSON naming the pod and the request it
//! saw, plus `/status/CODE`, `/delay/MS`, `/bytes/N`, `POST /echo`, `/_stats` (requests
//! seen per path), `/healthz` and gRPC `grpc.health.v1.Health/Check` (503 / NOT_SERVING
//! between `POST /_health/fail` and `POST /_health/ok`),
//! `x-fail-on`/`x-slow-on: <pod or *>` headers, and an optional share of failing
//! requests; it also echoes raw TCP on a second port. `dial` opens one TCP connection and
//! reports both ends (and, held, whether the peer closed it); `load` runs concurrent TCP echo connections and checks every byte; `steady` holds
//! traffic of every kind across an event.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context as _, bail};
use bytes::Bytes;
use clap::{Parser, Subcommand};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

#[derive(Parser)]
#[command(name = "mesh-echo", about = "Lab test application and clients")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve HTTP on --port and raw TCP echo on --tcp-port.
    Serve {
        /// Pod name to report.
        #[arg(long)]
        pod: String,
        /// Namespace to report.
        #[arg(long, default_value = "default")]
        namespace: String,
        /// Labels to report, `k=v,k=v`.
        #[arg(long, default_value = "")]
        labels: String,
        /// HTTP port.
        #[arg(long, default_value_t = 8080)]
        port: u16,
        /// Raw TCP echo port.
        #[arg(long, default_value_t = 9000)]
        tcp_port: u16,
        /// Share of requests answered 503 (0.0 - 1.0), for retry and ejection tests.
        #[arg(long, default_value_t = 0.0)]
        fail_rate: f64,
    },
    /// Connect to ADDR, print local and peer address as JSON, hold for --hold-ms.
    Dial {
        /// Where to connect.
        addr: SocketAddr,
        /// How long to keep the connection open.
        #[arg(long, default_value_t = 0)]
        hold_ms: u64,
    },
    /// Ask ADDR (host:port) to switch to the `echo` protocol on PATH, send MESSAGE over
    /// the upgraded connection and print what came back, as JSON.
    Upgrade {
        /// Server address, `host:port` (names resolve through /etc/hosts).
        addr: String,
        /// Request path.
        #[arg(long, default_value = "/upgrade")]
        path: String,
        /// Bytes to send after the switch.
        #[arg(long, default_value = "hello through the upgrade")]
        message: String,
    },
    /// Call ADDR (host:port) over HTTP/2 as a gRPC client would: one length-prefixed
    /// message, `te: trailers`; print HTTP status, grpc-status and the echoed message.
    Grpc {
        /// Server address, `host:port`.
        addr: String,
        /// Message to send.
        #[arg(long, default_value = "hello grpc")]
        message: String,
        /// Extra `name: value` request headers.
        #[arg(long = "header")]
        headers: Vec<String>,
    },
    /// Play a mesh client by hand: mutual TLS 1.3 to ADDR (an agent's :15008) with
    /// --cert/--key (or none), CONNECT to --target, then one HTTP/1.1 request through
    /// the tunnel. Prints how far it got as JSON.
    Hbone {
        /// The agent's HBONE address.
        addr: SocketAddr,
        /// CONNECT target, `<pod ip>:<port>`.
        #[arg(long)]
        target: SocketAddr,
        /// PEM certificate chain to present.
        #[arg(long)]
        cert: Option<std::path::PathBuf>,
        /// PEM private key.
        #[arg(long)]
        key: Option<std::path::PathBuf>,
        /// Request method.
        #[arg(long, default_value = "GET")]
        method: String,
        /// Request path.
        #[arg(long, default_value = "/")]
        path: String,
        /// Host header.
        #[arg(long, default_value = "myapp")]
        host: String,
    },
    /// Knock on ADDR with a plaintext `GET /` every --every-ms for --for-ms, each
    /// attempt on its own (a slow one does not hold back the next), each given
    /// --timeout-ms; print how many attempts got an HTTP answer, and why the others
    /// did not, as JSON. Samples a window in which a server answers far more finely
    /// than a loop of curl can.
    Knock {
        /// Server address.
        addr: SocketAddr,
        /// How long to keep knocking.
        #[arg(long, default_value_t = 5000)]
        for_ms: u64,
        /// Interval between attempts.
        #[arg(long, default_value_t = 5)]
        every_ms: u64,
        /// How long one attempt may take before it counts as unanswered.
        #[arg(long, default_value_t = 500)]
        timeout_ms: u64,
    },
    /// Open --conns HTTP/1.1 requests to ADDR at once, each announcing a --body byte
    /// body and sending --send of it, hold them --hold-ms, then close: how a client
    /// makes a proxy buffer unfinished bodies. Prints how many were written, as JSON.
    Stall {
        /// Server address.
        addr: SocketAddr,
        /// Concurrent requests.
        #[arg(long, default_value_t = 200)]
        conns: usize,
        /// Announced body size.
        #[arg(long, default_value_t = 1 << 20)]
        body: usize,
        /// Bytes of it actually sent.
        #[arg(long, default_value_t = 1 << 19)]
        send: usize,
        /// How long to hold before closing.
        #[arg(long, default_value_t = 3000)]
        hold_ms: u64,
        /// Host header.
        #[arg(long, default_value = "myapp")]
        host: String,
    },
    /// Hold steady traffic for --seconds (`mesh_tests::steady`): --rps HTTP/1.1
    /// requests to --http, --new-per-second new TCP connections and --conns long-lived
    /// ones (idle, streaming, HTTP/2 with a stream open) to the --tcp echo servers,
    /// every one checked end to end; prints what happened as JSON.
    Steady {
        /// Raw TCP echo servers.
        #[arg(long, required = true)]
        tcp: Vec<SocketAddr>,
        /// HTTP server.
        #[arg(long)]
        http: SocketAddr,
        /// Long-lived connections.
        #[arg(long, default_value_t = 99)]
        conns: usize,
        /// HTTP requests per second.
        #[arg(long, default_value_t = 1000)]
        rps: u64,
        /// New TCP connections per second.
        #[arg(long, default_value_t = 20)]
        new_per_second: u64,
        /// How long.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
    },
    /// Open --conns TCP connections to the echo server ADDR and hold them idle until
    /// stdin closes or --seconds pass, then echo on each once more and close
    /// (`mesh_tests::steady::hold`); one JSON line when all are open, one at the end.
    Hold {
        /// Echo server address.
        addr: SocketAddr,
        /// Connections.
        #[arg(long, default_value_t = 1000)]
        conns: usize,
        /// Longest hold.
        #[arg(long, default_value_t = 300)]
        seconds: u64,
        /// Keep every connection busy (16 KiB echoes, one after another) while held.
        #[arg(long)]
        active: bool,
    },
    /// Hold the packets netfilter queue --queue receives for --ms, then let them
    /// through (latency where `tc netem` is missing; `mesh_tests::delay`).
    Delay {
        /// The NFQUEUE number.
        #[arg(long, default_value_t = 0)]
        queue: u16,
        /// Added delay, ms.
        #[arg(long)]
        ms: u64,
    },
    /// Run --conns concurrent TCP echo exchanges of --bytes each against ADDR and
    /// verify every byte came back.
    Load {
        /// Echo server address.
        addr: SocketAddr,
        /// Concurrent connections.
        #[arg(long, default_value_t = 200)]
        conns: usize,
        /// Bytes per connection.
        #[arg(long, default_value_t = 65536)]
        bytes: usize,
    },
}

struct App {
    pod: String,
    namespace: String,
    labels: BTreeMap<String, String>,
    fail_rate: f64,
    /// `/healthz` answers 503 while set (`POST /_health/fail`, `POST /_health/ok`), so
    /// tests can make a pod fail its probes and recover.
    unhealthy: std::sync::atomic::AtomicBool,
    counter: AtomicU64,
    /// Requests seen per path, with the Host headers they carried (for retry and
    /// mirror tests: what reached this pod, not what the client saw).
    seen: std::sync::Mutex<BTreeMap<String, PathStats>>,
}

#[derive(Default, serde::Serialize)]
struct PathStats {
    count: u64,
    hosts: std::collections::BTreeSet<String>,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Serve { pod, namespace, labels, port, tcp_port, fail_rate } => {
            let labels = labels
                .split(',')
                .filter(|s| !s.is_empty())
                .filter_map(|kv| kv.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())))
                .collect();
            let app = Arc::new(App {
                pod,
                namespace,
                labels,
                fail_rate,
                unhealthy: Default::default(),
                counter: AtomicU64::new(0),
                seen: Default::default(),
            });
            tokio::spawn(tcp_echo(tcp_port));
            serve_http(app, port).await
        }
        Cmd::Dial { addr, hold_ms } => {
            let mut s = TcpStream::connect(addr).await.with_context(|| format!("connect {addr}"))?;
            let out = serde_json::json!({"local": s.local_addr()?.to_string(), "peer": s.peer_addr()?.to_string()});
            println!("{out}");
            if hold_ms > 0 {
                // Held open, and watched: a peer (or a proxy) closing it ends the hold.
                let started = std::time::Instant::now();
                let mut buf = [0u8; 512];
                let closed = tokio::time::timeout(Duration::from_millis(hold_ms), async {
                    loop {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(_) => {}
                        }
                    }
                })
                .await
                .is_ok();
                let held =
                    serde_json::json!({"held_ms": started.elapsed().as_millis() as u64, "closed_by_peer": closed});
                println!("{held}");
            }
            Ok(())
        }
        Cmd::Load { addr, conns, bytes } => load(addr, conns, bytes).await,
        Cmd::Delay { queue, ms } => {
            tokio::task::spawn_blocking(move || mesh_tests::delay::run(queue, Duration::from_millis(ms))).await?
        }
        Cmd::Hold { addr, conns, seconds, active } => {
            let (opened, closed) = mesh_tests::steady::hold(addr, conns, seconds, active).await;
            if opened.failed + closed.failed > 0 {
                bail!("{} connections failed", opened.failed + closed.failed);
            }
            Ok(())
        }
        Cmd::Steady { tcp, http, conns, rps, new_per_second, seconds } => {
            let plan = mesh_tests::steady::Plan { tcp, http, conns, rps, new_per_second, seconds };
            println!("{}", serde_json::to_string(&mesh_tests::steady::run(plan).await)?);
            Ok(())
        }
        Cmd::Knock { addr, for_ms, every_ms, timeout_ms } => knock(addr, for_ms, every_ms, timeout_ms).await,
        Cmd::Stall { addr, conns, body, send, hold_ms, host } => stall(addr, conns, body, send, hold_ms, &host).await,
        Cmd::Upgrade { addr, path, message } => upgrade_client(&addr, &path, &message).await,
        Cmd::Grpc { addr, message, headers } => grpc_client(&addr, &message, &headers).await,
        Cmd::Hbone { addr, target, cert, key, method, path, host } => {
            let call = mesh_tests::hbone_client::Call { addr, target, cert, key, method, path, host };
            println!("{}", serde_json::to_string(&mesh_tests::hbone_client::run(&call).await)?);
            Ok(())
        }
    }
}

/// Listens on every address of `port`, IPv4 and IPv6, as most servers do (`[::]`
/// without IPV6_V6ONLY); IPv4 alone where the namespace has no IPv6.
async fn listen_any(port: u16) -> anyhow::Result<TcpListener> {
    match TcpListener::bind(("::", port)).await {
        Ok(l) => Ok(l),
        Err(_) => Ok(TcpListener::bind(("0.0.0.0", port)).await?),
    }
}

/// An IPv4 peer of a dual-stack listener as IPv4.
fn canonical(peer: SocketAddr) -> SocketAddr {
    SocketAddr::new(peer.ip().to_canonical(), peer.port())
}

async fn serve_http(app: Arc<App>, port: u16) -> anyhow::Result<()> {
    let listener = listen_any(port).await?;
    loop {
        let (stream, peer) = listener.accept().await?;
        let peer = canonical(peer);
        let app = app.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let app = app.clone();
                async move {
                    let res = if is_grpc(&req) {
                        grpc(&app, req).await
                    } else {
                        handle(&app, peer, req).await.map(|b| b.boxed())
                    };
                    Ok::<_, Infallible>(res)
                }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// Source of `/bytes/N` bodies (at most this long), sliced without copying.
static BYTES_BODY: std::sync::LazyLock<Bytes> = std::sync::LazyLock::new(|| Bytes::from(vec![b'x'; 1 << 20]));

type AnyBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

fn is_grpc<B>(req: &Request<B>) -> bool {
    req.headers().get(http::header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// A gRPC echo: the request's message comes back, with `grpc-status: 0` in trailers;
/// `x-fail-on: <pod or *>` answers trailers-only `grpc-status: 14` (UNAVAILABLE).
async fn grpc(app: &App, req: Request<Incoming>) -> Response<AnyBody> {
    let fail = req.headers().get("x-fail-on").and_then(|v| v.to_str().ok()).is_some_and(|v| v == app.pod || v == "*");
    {
        let mut seen = app.seen.lock().unwrap_or_else(|p| p.into_inner());
        seen.entry(req.uri().path().to_string()).or_default().count += 1;
    }
    let pod = http::HeaderValue::from_str(&app.pod).ok();
    let grpc_headers = |r: &mut Response<AnyBody>| {
        r.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/grpc"));
        // Which pod answered, as initial metadata a gRPC client can read.
        if let Some(pod) = pod.clone() {
            r.headers_mut().insert("x-served-by", pod);
        }
    };
    if req.uri().path() == "/grpc.health.v1.Health/Check" {
        // HealthCheckResponse { status: SERVING (1) | NOT_SERVING (2) }, as the
        // /healthz switch says.
        let status = if app.unhealthy.load(Ordering::Relaxed) { 2 } else { 1 };
        let message = Bytes::from(vec![0, 0, 0, 0, 2, 0x08, status]);
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
        let mut r = Response::new(DataThenTrailers { data: Some(message), trailers: Some(trailers) }.boxed());
        grpc_headers(&mut r);
        return r;
    }
    if fail {
        let mut r = Response::new(Full::new(Bytes::new()).boxed());
        grpc_headers(&mut r);
        r.headers_mut().insert("grpc-status", http::HeaderValue::from_static("14"));
        r.headers_mut().insert("grpc-message", http::HeaderValue::from_static("unavailable"));
        return r;
    }
    let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
    let mut r = Response::new(DataThenTrailers { data: Some(body), trailers: Some(trailers) }.boxed());
    grpc_headers(&mut r);
    r
}

/// One data frame, then trailers.
struct DataThenTrailers {
    data: Option<Bytes>,
    trailers: Option<http::HeaderMap>,
}

impl http_body::Body for DataThenTrailers {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Infallible>>> {
        let frame = match self.data.take() {
            Some(d) => Some(http_body::Frame::data(d)),
            None => self.trailers.take().map(http_body::Frame::trailers),
        };
        std::task::Poll::Ready(frame.map(Ok))
    }
}

async fn grpc_client(addr: &str, message: &str, headers: &[String]) -> anyhow::Result<()> {
    let mut extra = Vec::new();
    for h in headers {
        let (k, v) = h.split_once(':').context("--header wants name: value")?;
        extra.push((http::HeaderName::from_bytes(k.trim().as_bytes())?, v.trim().parse()?));
    }
    let reply = mesh_tests::grpc::unary(addr, "/echo.Echo/Say", message.as_bytes(), &extra).await?;
    let echoed = String::from_utf8_lossy(&reply.message).into_owned();
    println!(
        "{}",
        serde_json::json!({"http_status": reply.http_status, "grpc_status": reply.grpc_status, "message": echoed})
    );
    Ok(())
}

/// Answers `Upgrade: echo` with 101 and echoes the upgraded connection's bytes.
fn upgrade_echo(req: &mut Request<Incoming>) -> Response<Full<Bytes>> {
    let on_upgrade = hyper::upgrade::on(req);
    tokio::spawn(async move {
        if let Ok(upgraded) = on_upgrade.await {
            let mut io = TokioIo::new(upgraded);
            let mut buf = vec![0u8; 4096];
            while let Ok(n) = io.read(&mut buf).await {
                if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        }
    });
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    r.headers_mut().insert(http::header::UPGRADE, http::HeaderValue::from_static("echo"));
    r.headers_mut().insert(http::header::CONNECTION, http::HeaderValue::from_static("upgrade"));
    r
}

async fn upgrade_client(addr: &str, path: &str, message: &str) -> anyhow::Result<()> {
    let mut s = TcpStream::connect(addr).await.with_context(|| format!("connect {addr}"))?;
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: upgrade\r\nUpgrade: echo\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut byte).await? == 0 {
            bail!("connection closed before the response head: {}", String::from_utf8_lossy(&head));
        }
        head.push(byte[0]);
    }
    let status_line = String::from_utf8_lossy(&head).lines().next().unwrap_or("").to_string();
    let mut echoed = vec![0u8; message.len()];
    if status_line.contains(" 101 ") {
        s.write_all(message.as_bytes()).await?;
        s.read_exact(&mut echoed).await?;
    }
    let out = serde_json::json!({"status": status_line, "echoed": String::from_utf8_lossy(&echoed)});
    println!("{out}");
    Ok(())
}

async fn handle(app: &App, peer: SocketAddr, mut req: Request<Incoming>) -> Response<Full<Bytes>> {
    if req.headers().get(http::header::UPGRADE).is_some_and(|v| v == "echo") {
        return upgrade_echo(&mut req);
    }
    // Fixed-size bodies for benchmarks: no JSON work on the measured path.
    if let Some(n) = req.uri().path().strip_prefix("/bytes/").and_then(|n| n.parse::<usize>().ok()) {
        return Response::new(Full::new(BYTES_BODY.slice(..n.min(BYTES_BODY.len()))));
    }
    match (req.method(), req.uri().path()) {
        (&http::Method::GET, "/healthz") => {
            let mut r = Response::new(Full::new(Bytes::from_static(b"ok\n")));
            if app.unhealthy.load(Ordering::Relaxed) {
                *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
            }
            return r;
        }
        (&http::Method::POST, "/_health/fail" | "/_health/ok") => {
            app.unhealthy.store(req.uri().path() == "/_health/fail", Ordering::Relaxed);
            return Response::new(Full::new(Bytes::new()));
        }
        _ => {}
    }
    if req.uri().path() == "/_stats" {
        let body = serde_json::to_string(&*app.seen.lock().unwrap_or_else(|p| p.into_inner())).unwrap_or_default();
        return Response::new(Full::new(Bytes::from(body)));
    }
    let n = app.counter.fetch_add(1, Ordering::Relaxed);
    let path = req.uri().path().to_string();
    {
        // HTTP/1.1 carries the host in Host, HTTP/2 in :authority.
        let host = req
            .headers()
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok())
            .map(str::to_owned)
            .or_else(|| req.uri().authority().map(|a| a.to_string()))
            .unwrap_or_default();
        let mut seen = app.seen.lock().unwrap_or_else(|p| p.into_inner());
        let s = seen.entry(path.clone()).or_default();
        s.count += 1;
        s.hosts.insert(host);
    }
    // Per-pod misbehaviour on request: `x-fail-on: <pod>` answers 503 and
    // `x-slow-on: <pod>` waits 500 ms here only, so tests can single out one endpoint.
    let targets_me =
        |h: &str| req.headers().get(h).and_then(|v| v.to_str().ok()).is_some_and(|v| v == app.pod || v == "*");
    let fail_here = targets_me("x-fail-on");
    if targets_me("x-slow-on") {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let method = req.method().to_string();
    let headers: BTreeMap<String, String> = req
        .headers()
        .iter()
        .map(|(k, v)| (k.to_string(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
        .collect();
    if path == "/echo" {
        let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        return Response::new(Full::new(body));
    }
    let mut status = if fail_here { StatusCode::SERVICE_UNAVAILABLE } else { StatusCode::OK };
    if let Some(code) = path.strip_prefix("/status/") {
        status = code.parse::<u16>().ok().and_then(|c| StatusCode::from_u16(c).ok()).unwrap_or(StatusCode::BAD_REQUEST);
    }
    if let Some(ms) = path.strip_prefix("/delay/").and_then(|m| m.parse::<u64>().ok()) {
        tokio::time::sleep(Duration::from_millis(ms.min(120_000))).await;
    }
    // Deterministic failure share: every k-th request fails, so tests get exact counts.
    if app.fail_rate > 0.0 {
        let every = (1.0 / app.fail_rate).round().max(1.0) as u64;
        if n.is_multiple_of(every) {
            status = StatusCode::SERVICE_UNAVAILABLE;
        }
    }
    let body = serde_json::json!({
        "http_version": format!("{:?}", req.version()),
        "pod": app.pod,
        "namespace": app.namespace,
        "labels": app.labels,
        "method": method,
        "path": path,
        "headers": headers,
        "peer": peer.to_string(),
    });
    let mut resp = Response::new(Full::new(Bytes::from(format!("{body}\n"))));
    *resp.status_mut() = status;
    resp.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
    resp
}

async fn stall(
    addr: SocketAddr,
    conns: usize,
    body: usize,
    send: usize,
    hold_ms: u64,
    host: &str,
) -> anyhow::Result<()> {
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..conns {
        let head = format!("POST /upload HTTP/1.1\r\nHost: {host}\r\nContent-Length: {body}\r\n\r\n");
        tasks.spawn(async move {
            let mut s = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr)).await.ok()?.ok()?;
            let chunk = vec![b'x'; 16 * 1024];
            let written = tokio::time::timeout(Duration::from_secs(10), async {
                s.write_all(head.as_bytes()).await?;
                let mut left = send;
                while left > 0 {
                    let n = left.min(chunk.len());
                    s.write_all(&chunk[..n]).await?;
                    left -= n;
                }
                std::io::Result::Ok(())
            })
            .await;
            let ok = matches!(written, Ok(Ok(())));
            tokio::time::sleep(Duration::from_millis(hold_ms)).await;
            Some(ok)
        });
    }
    let (mut connected, mut sent) = (0u64, 0u64);
    while let Some(r) = tasks.join_next().await {
        if let Ok(Some(ok)) = r {
            connected += 1;
            sent += u64::from(ok);
        }
    }
    println!("{}", serde_json::json!({"connected": connected, "sent_all": sent}));
    Ok(())
}

async fn knock(addr: SocketAddr, for_ms: u64, every_ms: u64, timeout_ms: u64) -> anyhow::Result<()> {
    /// One request on a new connection: its status code, or why there was none.
    async fn once(addr: SocketAddr, timeout: Duration) -> Result<String, &'static str> {
        let attempt = async {
            let mut s = TcpStream::connect(addr).await.map_err(|_| "connect")?;
            s.write_all(b"GET / HTTP/1.0\r\nHost: knock\r\n\r\n").await.map_err(|_| "write")?;
            let mut buf = [0u8; 16];
            let n = s.read(&mut buf).await.map_err(|_| "read")?;
            let line = String::from_utf8_lossy(&buf[..n]).into_owned();
            line.split_whitespace().nth(1).map(str::to_owned).ok_or(if n == 0 { "closed" } else { "not http" })
        };
        tokio::time::timeout(timeout, attempt).await.unwrap_or(Err("timeout"))
    }
    let deadline = tokio::time::Instant::now() + Duration::from_millis(for_ms);
    let mut tick = tokio::time::interval(Duration::from_millis(every_ms.max(1)));
    let mut attempts = tokio::task::JoinSet::new();
    while tokio::time::Instant::now() < deadline {
        tick.tick().await;
        attempts.spawn(once(addr, Duration::from_millis(timeout_ms)));
    }
    let (mut tries, mut answered, mut first) = (0u64, 0u64, None);
    let mut failures: std::collections::BTreeMap<&str, u64> = std::collections::BTreeMap::new();
    while let Some(r) = attempts.join_next().await {
        tries += 1;
        match r {
            Ok(Ok(code)) => {
                answered += 1;
                first.get_or_insert(code);
            }
            Ok(Err(why)) => *failures.entry(why).or_default() += 1,
            Err(_) => *failures.entry("panicked").or_default() += 1,
        }
    }
    println!(
        "{}",
        serde_json::json!({"tries": tries, "answered": answered, "first_status": first, "failures": failures})
    );
    Ok(())
}

async fn tcp_echo(port: u16) -> anyhow::Result<()> {
    let listener = listen_any(port).await?;
    loop {
        let (mut s, _) = listener.accept().await?;
        tokio::spawn(async move {
            let (mut r, mut w) = s.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
        });
    }
}

/// FNV-1a, enough to compare payloads without pulling in a hash crate.
fn checksum(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf29ce484222325u64, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x100000001b3))
}

async fn load(addr: SocketAddr, conns: usize, bytes: usize) -> anyhow::Result<()> {
    let mut tasks = Vec::new();
    for i in 0..conns {
        tasks.push(tokio::spawn(async move {
            let payload: Vec<u8> = (0..bytes).map(|j| ((i * 31 + j * 7) % 251) as u8).collect();
            let want = checksum(&payload);
            let mut s = TcpStream::connect(addr).await.with_context(|| format!("conn {i}: connect"))?;
            let (mut r, mut w) = s.split();
            let write = async {
                w.write_all(&payload).await?;
                w.shutdown().await
            };
            let mut got = Vec::with_capacity(bytes);
            let read = r.read_to_end(&mut got);
            let (wr, rd) = tokio::join!(write, read);
            wr.with_context(|| format!("conn {i}: write"))?;
            rd.with_context(|| format!("conn {i}: read"))?;
            if got.len() != bytes || checksum(&got) != want {
                bail!("conn {i}: got {} bytes, checksum mismatch", got.len());
            }
            Ok(())
        }));
    }
    let mut failed = 0;
    for t in tasks {
        if let Err(e) = t.await? {
            eprintln!("{e:#}");
            failed += 1;
        }
    }
    println!("{{\"conns\": {conns}, \"bytes\": {bytes}, \"failed\": {failed}}}");
    if failed > 0 {
        bail!("{failed} of {conns} connections failed");
    }
    Ok(())
}

//! Micro-benchmarks of the agent's per-connection hot paths, each beside a baseline
//! measured in the same run:
//! - BPF map keys: encoding a socket address the way the kernel keys ORIG_DST, and
//!   decoding the recorded destination (baseline: copying the address);
//! - destination resolution: a dialed VIP or pod IP to a mesh endpoint on a snapshot
//!   compiled from the lab's manifests (baseline: one hash lookup);
//! - route match: the reference VirtualService's first-match rules for a request that
//!   falls through to the last rule (baseline: comparing the path with one string);
//! - config parse: the lab manifests to typed objects (the reload path);
//! - config compile: a snapshot of the lab's objects and 1,000 Services without a
//!   selector, 10 EndpointSlice addresses each, the scale bench's shape (baseline:
//!   taking a copy of the objects in force, as every reload hands them on);
//! - copy loop: the agent's bidirectional splice over in-memory streams (baseline:
//!   tokio's plain `copy` one way);
//! - authz: the reference AuthorizationPolicy judging a request (allowed and denied),
//!   an L4-only policy judging a connection, and path normalization (baseline: one
//!   string comparison);
//! - socket splice: a 1 KiB round trip and a 4 MiB transfer through an admitted
//!   connection on loopback TCP, copied by the agent or spliced in the kernel
//!   (baseline: the same client and server connected directly). The kernel variant
//!   needs root and bpffs and is left out, with a message, without them;
//! - request metrics: what the destination records per HTTP request (the count, the
//!   duration and both sizes) for a connection's labels (baseline: one counter
//!   increment);
//! - tunnel writes: 64 streams of one HTTP/2 connection on loopback TCP each making 16
//!   small requests, as the HBONE tunnel carries a c64 load, with the connection's
//!   writes gathered per scheduler round (`Coalesced`) or not (baseline: plain h2);
//! - inbound HTTP: 64 keep-alive HTTP/1.1 exchanges (1 KiB answers) through what the
//!   destination's agent puts between a client and its application, over in-memory
//!   streams: served (a hyper server handing each request to a hyper client, as
//!   `admission/http.rs` does for a request judged per request), or copied with its
//!   exchanges followed and counted (`WatchedHttp1`), against a plain copy (baseline);
//! - HBONE stream: a 1 KiB round trip on one CONNECT stream of an HTTP/2 connection on
//!   loopback TCP, echoed by the server, both ends the agent's (`H2Stream`,
//!   `hbone::serve`) against hyper's upgraded CONNECT stream at both ends (baseline,
//!   what the agent spoke before 2026-12-07).

use std::collections::HashMap;
use std::hint::black_box;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use mesh_agent::config::parse_documents;
use mesh_agent::dataplane::splice::KernelSplice;
use mesh_agent::snapshot::{RoundRobin, Snapshot};
use mesh_agent::state::Workload;
use mesh_agent::telemetry::{ConnLabels, Metrics, ServiceLabels};
use mesh_agent::traffic::route::RequestView;
use mesh_agent::transport::coalesce::Coalesced;
use mesh_agent::transport::copy;
use mesh_common::{OrigDst, SockAddrKey};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

fn lab_manifests() -> Vec<(String, String)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/lab");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("examples/lab exists")
        .map(|e| e.expect("readable entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files.into_iter().map(|p| (p.display().to_string(), std::fs::read_to_string(&p).expect("readable"))).collect()
}

fn map_keys(c: &mut Criterion) {
    let mut g = c.benchmark_group("map_keys");
    let addrs: [SocketAddr; 2] = ["10.96.0.20:80".parse().unwrap(), "[fd00::20]:8080".parse().unwrap()];
    for addr in addrs {
        let label = if addr.is_ipv4() { "v4" } else { "v6" };
        g.bench_with_input(BenchmarkId::new("baseline_copy", label), &addr, |b, a| b.iter(|| black_box(*black_box(a))));
        g.bench_with_input(BenchmarkId::new("encode_sockaddr_key", label), &addr, |b, a| {
            b.iter(|| SockAddrKey::from_socket_addr(black_box(*a)))
        });
        let key = SockAddrKey::from_socket_addr(addr);
        let recorded =
            OrigDst { ip: key.ip, port: key.port as u16, family: if addr.is_ipv4() { 4 } else { 6 }, _pad: 0 };
        g.bench_with_input(BenchmarkId::new("decode_orig_dst", label), &recorded, |b, o| {
            b.iter(|| black_box(o).socket_addr())
        });
    }
    g.finish();
}

fn resolve(c: &mut Criterion) {
    let mut objects = Vec::new();
    for (file, text) in lab_manifests() {
        objects.extend(parse_documents(Path::new(&file), &text).expect("lab manifests are valid"));
    }
    let snap = Snapshot::compile(&objects, "cluster.local", 1);
    let turns = RoundRobin::default();
    turns.fit(&snap);
    let vip: SocketAddr = "10.96.0.20:80".parse().unwrap();
    let pod: SocketAddr = "10.10.2.2:8080".parse().unwrap();
    let baseline: HashMap<IpAddr, u16> = [(vip.ip(), 8080)].into();
    let mut g = c.benchmark_group("resolve");
    g.bench_function("baseline_hash_lookup", |b| b.iter(|| baseline.get(&black_box(vip).ip()).copied()));
    g.bench_function("service_vip", |b| b.iter(|| snap.resolve(black_box(vip), &turns)));
    g.bench_function("pod_ip", |b| b.iter(|| snap.resolve(black_box(pod), &turns)));
    g.finish();
}

fn route_match(c: &mut Criterion) {
    let mut objects = Vec::new();
    for (file, text) in lab_manifests() {
        objects.extend(parse_documents(Path::new(&file), &text).expect("lab manifests are valid"));
    }
    let seed = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/seed");
    for f in ["destinationrule-myapp.yaml", "virtualservice-myapp.yaml"] {
        let text = std::fs::read_to_string(seed.join(f)).expect("seed file");
        objects.extend(parse_documents(Path::new(f), &text).expect("seed configs are valid"));
    }
    let snap = Snapshot::compile(&objects, "cluster.local", 1);
    let routes = snap.routes("production/myapp").expect("seed VirtualService routes myapp").clone();
    let source = snap.workloads.iter().find(|w| w.name == "frontend").expect("frontend pod").clone();
    let mut headers = http::HeaderMap::new();
    headers.insert("user-agent", http::HeaderValue::from_static("curl/8"));
    headers.insert("accept", http::HeaderValue::from_static("*/*"));
    let view = |path: &'static str| RequestView {
        method: "GET",
        path,
        query: Some("page=2"),
        authority: "myapp",
        scheme: "http",
        headers: &headers,
        port: 80,
        source: &source,
    };
    let mut g = c.benchmark_group("route_match");
    g.bench_function("baseline_path_compare", |b| {
        b.iter(|| black_box("/home/index.html").starts_with(black_box("/api")))
    });
    g.bench_function("seed_rules_default_route", |b| {
        let v = view("/home/index.html");
        b.iter(|| routes.first_match(black_box(&v)).map(|r| r.name.len()))
    });
    g.bench_function("seed_rules_api_prefix", |b| {
        let v = view("/api/users/42");
        b.iter(|| routes.first_match(black_box(&v)).map(|r| r.name.len()))
    });
    g.finish();
}

fn config_parse(c: &mut Criterion) {
    let files = lab_manifests();
    let bytes: usize = files.iter().map(|(_, t)| t.len()).sum();
    let mut g = c.benchmark_group("config_parse");
    g.throughput(Throughput::Bytes(bytes as u64));
    g.bench_function("lab_manifests", |b| {
        b.iter(|| {
            files
                .iter()
                .map(|(f, t)| parse_documents(Path::new(f), black_box(t)).map(|o| o.len()).unwrap_or(0))
                .sum::<usize>()
        })
    });
    g.finish();
}

fn config_compile(c: &mut Criterion) {
    use std::fmt::Write as _;
    let mut yaml = String::new();
    for i in 0..1000usize {
        let _ = write!(
            yaml,
            "apiVersion: v1\nkind: Service\nmetadata: {{name: svc-{i}, namespace: scale}}\n\
             spec: {{clusterIP: 10.100.{}.{}, ports: [{{name: http, port: 80, targetPort: 8080}}]}}\n---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata: {{name: svc-{i}-a, namespace: scale, labels: {{kubernetes.io/service-name: svc-{i}}}}}\n\
             addressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints:\n",
            i >> 8,
            i & 0xff
        );
        for e in 0..10 {
            let n = i * 10 + e;
            let _ = writeln!(yaml, "- {{addresses: [172.16.{}.{}], conditions: {{ready: true}}}}", n >> 8, n & 0xff);
        }
        yaml.push_str("---\n");
    }
    let mut objects = parse_documents(Path::new("scale.yaml"), &yaml).expect("generated objects parse");
    for (f, t) in lab_manifests() {
        objects.extend(parse_documents(Path::new(&f), &t).expect("lab manifests parse"));
    }
    let mut g = c.benchmark_group("config_compile");
    g.sample_size(20);
    g.bench_function("baseline_objects_copy", |b| b.iter(|| black_box(&objects).clone()));
    g.bench_function("services_1000_endpoints_10000", |b| {
        b.iter(|| Snapshot::compile(black_box(&objects), "cluster.local", 1))
    });
    // One Service changed: the compile takes over every other Service, the index and
    // the digest's hashes from the snapshot it replaces.
    let previous = Snapshot::compile(&objects, "cluster.local", 1);
    previous.config_digest();
    let changed = parse_documents(
        Path::new("change.yaml"),
        "apiVersion: v1\nkind: Service\nmetadata: {name: svc-7, namespace: scale}\n\
         spec: {clusterIP: 10.100.0.7, ports: [{name: http, port: 81, targetPort: 8080}]}\n",
    )
    .expect("changed Service parses");
    let mut one_change = objects.clone();
    let at = one_change.iter().position(|o| o.key() == changed[0].key()).expect("svc-7 is there");
    one_change[at] = changed[0].clone();
    let mesh = mesh_agent::state::MeshScope::new("cluster.local");
    g.bench_function("one_change_of_1000_taken_over", |b| {
        b.iter(|| {
            let next = previous.compile_next(black_box(&one_change), &[], &mesh, 2);
            next.config_digest();
            next
        })
    });
    // One EndpointSlice changed (an endpoint gone): its group is patched, the other
    // Services keep their slices without a lookup.
    let slice = parse_documents(
        Path::new("slice.yaml"),
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {name: svc-7-a, namespace: scale, labels: {kubernetes.io/service-name: svc-7}}\n\
         addressType: IPv4\nports: [{name: http, port: 8080}]\n\
         endpoints: [{addresses: [172.16.0.70], conditions: {ready: true}}]\n",
    )
    .expect("changed EndpointSlice parses");
    let mut slice_change = objects.clone();
    let at = slice_change.iter().position(|o| o.key() == slice[0].key()).expect("svc-7-a is there");
    slice_change[at] = slice[0].clone();
    g.bench_function("one_slice_change_of_1000_taken_over", |b| {
        b.iter(|| {
            let next = previous.compile_next(black_box(&slice_change), &[], &mesh, 2);
            next.config_digest();
            next
        })
    });
    g.finish();
}

/// Sends `total` bytes from a writer task through `relay` to a reader task.
async fn through_relay(total: usize, relay_kind: u8) {
    let (mut client, mut client_side) = tokio::io::duplex(64 * 1024);
    let (mut server_side, mut server) = tokio::io::duplex(64 * 1024);
    let relay = tokio::spawn(async move {
        match relay_kind {
            0 => tokio::io::copy(&mut client_side, &mut server_side).await,
            1 => tokio::io::copy_bidirectional(&mut client_side, &mut server_side).await.map(|(a, _)| a),
            _ => copy::bidirectional(&mut client_side, &mut server_side).await.map(|(a, _)| a),
        }
    });
    let writer = tokio::spawn(async move {
        let chunk = vec![7u8; 16 * 1024];
        let mut left = total;
        while left > 0 {
            let n = left.min(chunk.len());
            client.write_all(&chunk[..n]).await.expect("relay accepts");
            left -= n;
        }
        client.shutdown().await.expect("shutdown");
        client
    });
    let mut sink = vec![0u8; 16 * 1024];
    let mut got = 0;
    while got < total {
        let n = server.read(&mut sink).await.expect("relay delivers");
        assert!(n > 0, "relay closed early");
        got += n;
    }
    let client = writer.await.expect("writer");
    drop(client);
    drop(server);
    let _ = relay.await;
}

fn copy_loop(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let total = 4 << 20;
    let mut g = c.benchmark_group("copy_loop");
    g.throughput(Throughput::Bytes(total as u64));
    g.bench_function("baseline_tokio_copy_one_way", |b| b.iter(|| rt.block_on(through_relay(total, 0))));
    g.bench_function("tokio_bidirectional_8k", |b| b.iter(|| rt.block_on(through_relay(total, 1))));
    g.bench_function("agent_bidirectional", |b| b.iter(|| rt.block_on(through_relay(total, 2))));
    g.finish();
}

fn authz(c: &mut Criterion) {
    use mesh_agent::authz::{ConnAttrs, Peer, RequestAttrs, path};
    let mut objects = Vec::new();
    for (file, text) in lab_manifests() {
        objects.extend(parse_documents(Path::new(&file), &text).expect("lab manifests are valid"));
    }
    let seed = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/seed/authorizationpolicy-myapp.yaml");
    let text = std::fs::read_to_string(&seed).expect("seed policy");
    objects.extend(parse_documents(&seed, &text).expect("seed policy is valid"));
    let l4 = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: l4, namespace: production}\nspec:\n  selector: {matchLabels: {app: legacy-service}}\n  rules:\n  - from: [{source: {principals: [\"cluster.local/ns/production/sa/frontend\"], ipBlocks: [\"10.10.0.0/16\"]}}]\n    to: [{operation: {ports: [\"8080\"]}}]\n";
    objects.extend(parse_documents(Path::new("l4.yaml"), l4).expect("valid"));
    let snap = Snapshot::compile(&objects, "cluster.local", 1);
    let myapp = snap.security("production/myapp-v1").clone();
    let legacy = snap.security("production/legacy-service").clone();
    let frontend = Peer::from_identity(
        &mesh_agent::identity::Identity::new("cluster.local", "production", "frontend"),
        &snap.equivalent_domains,
    );
    let conn = ConnAttrs {
        src: "10.10.1.2:40000".parse().unwrap(),
        dst: "10.10.2.2:8080".parse().unwrap(),
        peer: Some(&frontend),
    };
    let headers = http::HeaderMap::new();
    let request = |method, path| RequestAttrs { method, path, host_lowercase: "myapp", headers: &headers };
    let mut g = c.benchmark_group("authz");
    g.bench_function("baseline_path_compare", |b| b.iter(|| black_box("/api/users") == black_box("/api/users")));
    g.bench_function("seed_policy_allowed_request", |b| {
        let r = request("GET", "/api/users");
        b.iter(|| myapp.authz.check(black_box(&conn), Some(black_box(&r))))
    });
    g.bench_function("seed_policy_denied_request", |b| {
        let r = request("DELETE", "/api/x");
        b.iter(|| myapp.authz.check(black_box(&conn), Some(black_box(&r))))
    });
    g.bench_function("l4_policy_connection", |b| b.iter(|| legacy.authz.check_connection(black_box(&conn))));
    g.bench_function("normalize_path", |b| b.iter(|| path::normalize(black_box("/api/./users/../users/42"))));
    g.finish();
}

/// A server on loopback: echoes what it reads (`echo`), or reads everything and answers
/// one byte at the end of the stream (`sink`).
async fn loopback_server(echo: bool) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) if echo => {
                            if s.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                        Ok(_) => {}
                    }
                }
                if !echo {
                    let _ = s.write_all(b"k").await;
                }
            });
        }
    });
    addr
}

/// A relay on loopback as the agent runs one for an admitted connection: each client
/// it accepts is connected to `server` and spliced (in the kernel with `kernel`).
async fn loopback_relay(server: SocketAddr, kernel: Option<Arc<KernelSplice>>) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut client, peer)) = listener.accept().await {
            let kernel = kernel.clone();
            tokio::spawn(async move {
                let mut upstream = tokio::net::TcpStream::connect(server).await.expect("server");
                let _ = (client.set_nodelay(true), upstream.set_nodelay(true));
                let metrics = Metrics::default();
                let w = Workload::outside("bench", "bench", peer.ip(), "cluster.local");
                let labels = ConnLabels::outbound(&w, None, ServiceLabels::unknown(), false);
                let ends = copy::Ends { policy: Arc::default(), client: peer, dialed: server, upstream: Some(server) };
                let sockets = (&mut client, &mut upstream);
                let idle = Duration::from_secs(60);
                let _ = copy::counted_sockets(&metrics, &[(&labels, ends)], sockets, idle, None, kernel.as_ref()).await;
            });
        }
    });
    addr
}

/// One 1 KiB request and its echo on an open connection.
async fn round_trip(stream: &mut tokio::net::TcpStream, buf: &mut [u8]) {
    stream.write_all(&buf[..1024]).await.expect("write");
    stream.read_exact(&mut buf[..1024]).await.expect("echo");
}

/// `total` bytes to a sink server on a new connection, until its one-byte answer.
async fn transfer(to: SocketAddr, total: usize) {
    let mut s = tokio::net::TcpStream::connect(to).await.expect("connect");
    let chunk = vec![7u8; 64 * 1024];
    let mut left = total;
    while left > 0 {
        let n = left.min(chunk.len());
        s.write_all(&chunk[..n]).await.expect("write");
        left -= n;
    }
    s.shutdown().await.expect("shutdown");
    let mut k = [0u8; 1];
    s.read_exact(&mut k).await.expect("answer");
}

fn socket_splice(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let pins = Path::new("/sys/fs/bpf").join(format!("mesh-bench-splice-{}", std::process::id()));
    let kernel = std::fs::create_dir(&pins).ok().and_then(|()| {
        mesh_agent::dataplane::standalone_kernel_splice(&pins)
            .map_err(|e| eprintln!("socket_splice: the kernel variant is left out: {e}"))
            .ok()
    });
    if kernel.is_none() {
        eprintln!("socket_splice: the kernel variant needs root and bpffs at /sys/fs/bpf; left out");
    }
    let (echo, sink) = rt.block_on(async { (loopback_server(true).await, loopback_server(false).await) });
    let mut paths = vec![("baseline_direct", echo, sink), ("agent_copy", echo, sink)];
    let agent = rt.block_on(async { (loopback_relay(echo, None).await, loopback_relay(sink, None).await) });
    paths[1] = ("agent_copy", agent.0, agent.1);
    if let Some((splice, _)) = &kernel {
        let k = rt.block_on(async {
            (loopback_relay(echo, Some(splice.clone())).await, loopback_relay(sink, Some(splice.clone())).await)
        });
        paths.push(("kernel_splice", k.0, k.1));
    }
    let mut g = c.benchmark_group("socket_splice_round_trip_1k");
    for (name, echo_at, _) in &paths {
        let mut stream = rt.block_on(async {
            let s = tokio::net::TcpStream::connect(echo_at).await.expect("connect");
            s.set_nodelay(true).expect("nodelay");
            s
        });
        let mut buf = vec![7u8; 1024];
        g.bench_function(*name, |b| b.iter(|| rt.block_on(round_trip(&mut stream, &mut buf))));
    }
    g.finish();
    let total = 4 << 20;
    let mut g = c.benchmark_group("socket_splice_transfer_4m");
    g.throughput(Throughput::Bytes(total as u64));
    for (name, _, sink_at) in &paths {
        g.bench_function(*name, |b| b.iter(|| rt.block_on(transfer(*sink_at, total))));
    }
    g.finish();
    drop(kernel);
    let _ = std::fs::remove_dir_all(&pins);
}

/// An HTTP/2 server on loopback TCP that answers each request with `ANSWER` bytes once
/// the request's body has ended; both ends of each connection coalesced or not.
async fn h2_loopback_server(coalesced: bool) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let _ = tcp.set_nodelay(true);
            tokio::spawn(async move {
                let io: Box<dyn Io> = if coalesced { Box::new(Coalesced::new(tcp)) } else { Box::new(tcp) };
                let mut conn = h2::server::handshake(io).await.expect("h2 server");
                while let Some(Ok((req, mut respond))) = conn.accept().await {
                    tokio::spawn(async move {
                        let mut body = req.into_body();
                        while let Some(Ok(chunk)) = body.data().await {
                            let _ = body.flow_control().release_capacity(chunk.len());
                        }
                        let Ok(mut send) = respond.send_response(http::Response::new(()), false) else { return };
                        let _ = send.send_data(bytes::Bytes::from_static(&[b'a'; ANSWER]), true);
                    });
                }
            });
        }
    });
    addr
}

/// Bytes of each request and answer of the tunnel bench: a small HTTP exchange.
const ANSWER: usize = 128;

trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

/// `streams` concurrent streams each making `each` requests on `client`.
async fn h2_exchanges(client: &h2::client::SendRequest<bytes::Bytes>, streams: usize, each: usize) {
    let tasks: Vec<_> = (0..streams)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move {
                for _ in 0..each {
                    let mut ready = client.clone().ready().await.expect("ready");
                    let req = http::Request::post("http://bench/").body(()).expect("request");
                    let (resp, mut send) = ready.send_request(req, false).expect("send");
                    send.send_data(bytes::Bytes::from_static(&[b'q'; ANSWER]), true).expect("data");
                    let mut body = resp.await.expect("answer").into_body();
                    while let Some(chunk) = body.data().await {
                        let _ = body.flow_control().release_capacity(chunk.expect("chunk").len());
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("stream task");
    }
}

fn tunnel_writes(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let (streams, each) = (64, 16);
    let mut g = c.benchmark_group("tunnel_writes");
    g.throughput(Throughput::Elements((streams * each) as u64));
    for (name, coalesced) in [("baseline_h2_plain", false), ("h2_coalesced", true)] {
        let client = rt.block_on(async {
            let addr = h2_loopback_server(coalesced).await;
            let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
            let _ = tcp.set_nodelay(true);
            let io: Box<dyn Io> = if coalesced { Box::new(Coalesced::new(tcp)) } else { Box::new(tcp) };
            let (client, conn) = h2::client::handshake(io).await.expect("h2 client");
            tokio::spawn(conn);
            client
        });
        g.bench_function(name, |b| b.iter(|| rt.block_on(h2_exchanges(&client, streams, each))));
    }
    g.finish();
}

fn request_metrics(c: &mut Criterion) {
    use mesh_agent::state::TelemetryPolicy;
    use mesh_agent::telemetry::{PeerLabels, RequestLabels, SharedPeers};
    let mut objects = Vec::new();
    for (file, text) in lab_manifests() {
        objects.extend(parse_documents(Path::new(&file), &text).expect("lab manifests are valid"));
    }
    let snap = Snapshot::compile(&objects, "cluster.local", 1);
    let pod = |name: &str| snap.workloads.iter().find(|w| w.name == name).expect("lab pod").clone();
    let (server, client) = (pod("myapp-v1"), pod("frontend"));
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = Metrics::new(&mut registry);
    let policy = TelemetryPolicy::default();
    let peers = SharedPeers::new(PeerLabels::destination(
        &server,
        Some(&client),
        ServiceLabels::service(Some("production/myapp")),
        true,
    ));
    let baseline = prometheus_client::metrics::counter::Counter::<u64>::default();
    let mut g = c.benchmark_group("request_metrics");
    g.bench_function("baseline_counter_inc", |b| b.iter(|| black_box(&baseline).inc()));
    // An answer's labels, as the paths make them: a 200 to a plain HTTP request.
    let ok = |peers: SharedPeers| RequestLabels {
        peers,
        request_protocol: "http",
        response_code: 200,
        response_flags: "-",
        grpc_response_status: None,
    };
    g.bench_function("destination_request", |b| {
        b.iter(|| {
            let labels = ok(peers.clone());
            metrics.request(&labels, &policy);
            metrics.request_done(&labels, &policy, Duration::from_micros(300), (Some(128), 1024));
        })
    });
    // What the source side did per request before its connections kept their last
    // answer's labels: the peer labels made (and hashed) again, then the six lookups,
    // each comparing every label of a fresh copy.
    g.bench_function("source_request_labels_made", |b| {
        b.iter(|| {
            let labels = ok(SharedPeers::new(PeerLabels::source(
                &client,
                Some(&server),
                ServiceLabels::service(Some("production/myapp")),
                true,
            )));
            metrics.request(&labels, &policy);
            metrics.request_done(&labels, &policy, Duration::from_micros(300), (Some(128), 1024));
        })
    });
    // Both sides now: the connection's kept peer labels, its last series' handle.
    let memo = mesh_agent::telemetry::SeriesMemo::default();
    let shared_policy = Arc::new(TelemetryPolicy::default());
    g.bench_function("request_through_the_connections_memo", |b| {
        b.iter(|| {
            let labels = ok(peers.clone());
            let series = memo.series(&metrics, &labels, &shared_policy);
            series.request();
            series.done(Duration::from_micros(300), (Some(128), 1024));
        })
    });
    g.finish();
}

/// An application on `io` answering each HTTP/1.1 request (no body) with `answer`.
async fn canned_http_app(mut io: tokio::io::DuplexStream, answer: &'static [u8]) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut buf = vec![0u8; 4096];
    let mut held = 0;
    loop {
        match io.read(&mut buf[held..]).await {
            Ok(0) | Err(_) => return,
            Ok(n) => held += n,
        }
        while let Some(end) = buf[..held].windows(4).position(|w| w == b"\r\n\r\n") {
            buf.copy_within(end + 4..held, 0);
            held -= end + 4;
            if io.write_all(answer).await.is_err() {
                return;
            }
        }
    }
}

/// `count` exchanges on `client`: a request, then an answer of `answer_len` bytes.
async fn http_exchanges(client: &mut tokio::io::DuplexStream, count: usize, answer_len: usize) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    const REQUEST: &[u8] =
        b"GET /bytes/1024 HTTP/1.1\r\nhost: myapp:8080\r\nuser-agent: oha/1.16.0\r\naccept: */*\r\n\r\n";
    let mut buf = vec![0u8; answer_len];
    for _ in 0..count {
        client.write_all(REQUEST).await.expect("request");
        client.read_exact(&mut buf).await.expect("answer");
    }
}

fn inbound_http(c: &mut Criterion) {
    use http_body_util::BodyExt as _;
    use hyper_util::rt::TokioIo;
    use mesh_agent::proxy::WatchedHttp1;
    use mesh_agent::state::TelemetryPolicy;
    use mesh_agent::telemetry::{PeerLabels, SharedPeers, Side};

    static ANSWER: std::sync::LazyLock<Vec<u8>> = std::sync::LazyLock::new(|| {
        let mut a =
            b"HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\ncontent-length: 1024\r\n\r\n".to_vec();
        a.resize(a.len() + 1024, b'x');
        a
    });
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = Arc::new(Metrics::new(&mut registry));
    let peers = SharedPeers::new(PeerLabels {
        reporter: "destination",
        source: Side::of(None),
        destination: Side::of(None),
        service: ServiceLabels::unknown(),
        connection_security_policy: "mutual_tls",
    });
    let policy = Arc::new(TelemetryPolicy::default());
    let exchanges = 64;
    let mut g = c.benchmark_group("inbound_http");
    g.throughput(Throughput::Elements(exchanges as u64));
    for name in ["baseline_plain_copy", "watched_copy", "served_by_hyper"] {
        g.bench_function(name, |b| {
            b.iter(|| {
                rt.block_on(async {
                    let (mut client, mut agent_client) = tokio::io::duplex(64 * 1024);
                    let (mut agent_app, app) = tokio::io::duplex(64 * 1024);
                    let app = tokio::spawn(canned_http_app(app, &ANSWER));
                    let middle = match name {
                        "baseline_plain_copy" => tokio::spawn(async move {
                            let _ = copy::bidirectional(&mut agent_client, &mut agent_app).await;
                        }),
                        "watched_copy" => {
                            let report = (metrics.clone(), policy.clone(), peers.clone());
                            let mut watched = WatchedHttp1::new(agent_client, report, Default::default());
                            tokio::spawn(async move {
                                let _ = copy::bidirectional(&mut watched, &mut agent_app).await;
                            })
                        }
                        _ => tokio::spawn(async move {
                            let (sender, conn) =
                                hyper::client::conn::http1::handshake(TokioIo::new(agent_app)).await.expect("client");
                            tokio::spawn(conn);
                            let sender = Arc::new(tokio::sync::Mutex::new(sender));
                            let svc = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                                let sender = sender.clone();
                                async move {
                                    let res = sender.lock().await.send_request(req).await?;
                                    Ok::<_, hyper::Error>(res.map(|b| b.boxed()))
                                }
                            });
                            let server = hyper::server::conn::http1::Builder::new();
                            let _ = server.serve_connection(TokioIo::new(agent_client), svc).await;
                        }),
                    };
                    http_exchanges(&mut client, exchanges, ANSWER.len()).await;
                    drop(client);
                    let _ = middle.await;
                    app.abort();
                })
            })
        });
    }
    g.finish();
}

/// Bytes of each way of the HBONE stream bench's round trip.
const ROUND_TRIP: usize = 1024;

/// Echoes an accepted CONNECT stream.
struct EchoStream;

impl mesh_agent::transport::hbone::ServeStream for EchoStream {
    async fn serve(self, stream: mesh_agent::transport::hbone::H2Stream) {
        let (mut read, mut write) = tokio::io::split(stream);
        let _ = tokio::io::copy(&mut read, &mut write).await;
    }
}

/// A CONNECT stream to an echo on loopback TCP: the agent's at both ends, or hyper's.
async fn hbone_echo_stream(agents: bool) -> Box<dyn Io> {
    use mesh_agent::transport::hbone::{self, Answer, H2Stream};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.expect("accept");
        let _ = tcp.set_nodelay(true);
        if agents {
            let (shutdown, tasks) = (tokio_util::sync::CancellationToken::new(), tokio_util::task::TaskTracker::new());
            let decide = |_| std::future::ready(Answer::Accept(EchoStream));
            let _ = hbone::serve(Coalesced::new(tcp), &shutdown, &tasks, decide).await;
            return;
        }
        let service = hyper::service::service_fn(|mut req: http::Request<hyper::body::Incoming>| async move {
            let upgrade = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                let Ok(upgraded) = upgrade.await else { return };
                let (mut read, mut write) = tokio::io::split(hyper_util::rt::TokioIo::new(upgraded));
                let _ = tokio::io::copy(&mut read, &mut write).await;
            });
            Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Empty::<bytes::Bytes>::new()))
        });
        let io = hyper_util::rt::TokioIo::new(Coalesced::new(tcp));
        let builder = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new());
        let _ = builder.serve_connection(io, service).await;
    });
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let _ = tcp.set_nodelay(true);
    let target = "10.0.0.1:8080";
    if agents {
        let client = mesh_agent::transport::limits::hbone_client();
        let (sender, conn) = client.handshake(Coalesced::new(tcp)).await.expect("h2 client");
        tokio::spawn(conn);
        let mut ready = sender.ready().await.expect("ready");
        let (answer, send) =
            ready.send_request(http::Request::connect(target).body(()).expect("request"), false).expect("CONNECT");
        let answer = answer.await.expect("answer");
        return Box::new(H2Stream::new(send, answer.into_body()));
    }
    let io = hyper_util::rt::TokioIo::new(Coalesced::new(tcp));
    let builder = hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new());
    let (mut sender, conn) = builder.handshake(io).await.expect("h2 client");
    tokio::spawn(conn);
    let req = http::Request::connect(target).body(http_body_util::Empty::<bytes::Bytes>::new()).expect("request");
    let answer = sender.send_request(req).await.expect("answer");
    Box::new(hyper_util::rt::TokioIo::new(hyper::upgrade::on(answer).await.expect("upgraded")))
}

fn hbone_stream(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let mut g = c.benchmark_group("hbone_stream_round_trip_1k");
    for (name, agents) in [("baseline_hyper_upgraded", false), ("agent_h2_stream", true)] {
        let mut stream = rt.block_on(hbone_echo_stream(agents));
        let (sent, mut back) = ([b'x'; ROUND_TRIP], [0u8; ROUND_TRIP]);
        g.bench_function(name, |b| {
            b.iter(|| {
                rt.block_on(async {
                    stream.write_all(&sent).await.expect("write");
                    stream.read_exact(&mut back).await.expect("read");
                })
            })
        });
    }
    g.finish();
}

criterion_group!(
    benches,
    inbound_http,
    map_keys,
    resolve,
    route_match,
    config_parse,
    config_compile,
    copy_loop,
    authz,
    socket_splice,
    request_metrics,
    tunnel_writes,
    hbone_stream
);
criterion_main!(benches);

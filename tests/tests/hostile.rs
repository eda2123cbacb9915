//! Hostile clients against the node agent, in the lab. Each case ends with the agent
//! alive, the other pods still served, and its memory bounded; the peak RSS of each
//! case (VmHWM, reset before it) is printed and written to
//! `target/hostile/peak-rss.txt`.
//!
//! The target is node2's agent (myapp-v1 and legacy-service); the attacks come from
//! the `outside` pod (not in the mesh) on node1, or from `frontend` where they must go
//! through the client's agent.
#![forbid(unsafe_code)]

use std::io::Write as _;
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use mesh_tests::harness::{apply_seed, curl, eventually, lab, lab_with_env, metrics, reply_pod, root};
use mesh_tests::hbone_client::AnyServer;
use mesh_tests::lab::Lab;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use support::{alive, fds, in_netns, reset_peak, status_kib};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

mod support;

/// How much a single case may grow the agent's peak RSS over its RSS before the case.
const MAX_GROWTH_MIB: f64 = 96.0;

/// Runs `attack` from inside `netns` on a current-thread runtime.
fn from<T: Send + 'static, F: std::future::Future<Output = T>>(
    netns: &str,
    attack: impl FnOnce() -> F + Send + 'static,
) -> T {
    in_netns(netns, move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(attack())
    })
}

/// One case against node2's agent: see [`case_on`].
fn case(lab: &Lab, report: &mut Vec<String>, name: &str, f: impl FnOnce()) {
    case_on(lab, "node2", report, name, f);
}

/// One case: measures the peak RSS of `node`'s agent while `f` runs, then checks the
/// agent is alive, still serves other pods, and stayed within [`MAX_GROWTH_MIB`].
fn case_on(lab: &Lab, node: &str, report: &mut Vec<String>, name: &str, f: impl FnOnce()) {
    let pid = lab.node(node).unwrap().agent_pid.unwrap();
    let before = status_kib(pid, "VmRSS") as f64 / 1024.0;
    reset_peak(pid);
    let started = Instant::now();
    f();
    let peak = status_kib(pid, "VmHWM") as f64 / 1024.0;
    let line = format!(
        "{name:<52} {node} agent peak RSS {peak:6.1} MiB (before {before:5.1} MiB), fds {:5}, {:5.1} s",
        fds(pid),
        started.elapsed().as_secs_f64()
    );
    println!("hostile case {line}");
    report.push(line);
    assert!(alive(pid), "{name}: the agent died");
    assert!(peak - before < MAX_GROWTH_MIB, "{name}: peak RSS {peak:.1} MiB from {before:.1} MiB");
    // The other pods are still served, across nodes and on node2 itself.
    for url in ["http://myapp/", "http://legacy-service/"] {
        eventually(&format!("{name}: frontend still reaches {url}"), || curl(lab, "frontend", url).0.then_some(()));
    }
}

fn write_report(report: &[String]) {
    let dir = root().join("target/hostile");
    std::fs::create_dir_all(&dir).unwrap();
    let mut f = std::fs::File::create(dir.join("peak-rss.txt")).unwrap();
    for l in report {
        writeln!(f, "{l}").unwrap();
    }
}

/// A TLS client with a mesh certificate (a tenant whose identity is valid: the worst
/// case) and `alpn`.
fn tls_client(lab: &Lab, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    let dir = lab.state_dir.join("hostile-certs");
    std::fs::create_dir_all(&dir).unwrap();
    if !dir.join("tenant.pem").exists() {
        support::write_leaf(
            &dir,
            "tenant",
            "spiffe://cluster.local/ns/production/sa/frontend",
            &support::mesh_issuer(lab),
        );
    }
    let chain: Vec<CertificateDer<'static>> =
        rustls_pemfile::certs(&mut std::fs::read(dir.join("tenant.pem")).unwrap().as_slice())
            .map(Result::unwrap)
            .collect();
    let key: PrivateKeyDer<'static> =
        rustls_pemfile::private_key(&mut std::fs::read(dir.join("tenant.key")).unwrap().as_slice()).unwrap().unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(provider)))
        .with_client_auth_cert(chain, key)
        .unwrap();
    cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    Arc::new(cfg)
}

async fn tls_connect(
    cfg: Arc<rustls::ClientConfig>,
    addr: SocketAddr,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    tokio_rustls::TlsConnector::from(cfg).connect(ServerName::IpAddress(addr.ip().into()), tcp).await
}

/// Whether the server closes `s` within `within` (end of stream, reset, or TLS alert).
async fn closed_within<S: tokio::io::AsyncRead + Unpin>(s: &mut S, within: Duration) -> bool {
    let mut buf = [0u8; 4096];
    tokio::time::timeout(within, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

/// An HTTP/2 client over a mesh-certified TLS connection to `addr` (an agent's 15008).
async fn h2_client(
    cfg: Arc<rustls::ClientConfig>,
    addr: SocketAddr,
) -> (h2::client::SendRequest<Bytes>, tokio::task::JoinHandle<Result<(), h2::Error>>) {
    let tls = tls_connect(cfg, addr).await.unwrap();
    let (send, conn) = h2::client::Builder::new().handshake(tls).await.unwrap();
    (send, tokio::spawn(conn))
}

fn connect_request(authority: &str) -> http::Request<()> {
    http::Request::builder().method(http::Method::CONNECT).uri(authority).body(()).unwrap()
}

#[test]
fn hostile_clients_leave_the_agent_alive_serving_and_bounded() {
    let Some(lab) = lab("hostile_clients_leave_the_agent_alive_serving_and_bounded") else { return };
    let mut report = Vec::new();
    let v1 = lab.pod("myapp-v1").unwrap().ip;
    let hbone: SocketAddr = format!("{v1}:15008").parse().unwrap();
    let outside = lab.pod("outside").unwrap().netns.clone();

    case(&lab, &mut report, "garbage and a dribbled ClientHello on 15008", || {
        let (garbage_closed, dribble_closed) = from(&outside, move || async move {
            let garbage = (0..50).map(|i| async move {
                let mut s = TcpStream::connect(hbone).await.unwrap();
                let junk: Vec<u8> = (0..16 * 1024).map(|j| ((i * 31 + j) % 251) as u8).collect();
                let _ = s.write_all(&junk).await;
                closed_within(&mut s, Duration::from_secs(5)).await
            });
            // A real ClientHello, one byte every 200 ms: the handshake timeout ends it.
            let hello = {
                let cfg = Arc::new(
                    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                        .with_protocol_versions(&[&rustls::version::TLS13])
                        .unwrap()
                        .dangerous()
                        .with_custom_certificate_verifier(Arc::new(AnyServer(Arc::new(
                            rustls::crypto::ring::default_provider(),
                        ))))
                        .with_no_client_auth(),
                );
                let mut conn = rustls::ClientConnection::new(cfg, ServerName::IpAddress(hbone.ip().into())).unwrap();
                let mut out = Vec::new();
                conn.write_tls(&mut out).unwrap();
                out
            };
            let dribble = (0..50).map(|_| {
                let hello = hello.clone();
                async move {
                    let mut s = TcpStream::connect(hbone).await.unwrap();
                    let started = Instant::now();
                    for b in &hello {
                        if s.write_all(&[*b]).await.is_err() {
                            break;
                        }
                        let mut probe = [0u8; 1];
                        if let Ok(Ok(0) | Err(_)) =
                            tokio::time::timeout(Duration::from_millis(200), s.read(&mut probe)).await
                        {
                            break;
                        }
                        if started.elapsed() > Duration::from_secs(20) {
                            return false;
                        }
                    }
                    started.elapsed() < Duration::from_secs(15)
                }
            });
            let g = futures::future::join_all(garbage).await;
            let d = futures::future::join_all(dribble).await;
            (g.iter().filter(|c| **c).count(), d.iter().filter(|c| **c).count())
        });
        assert_eq!(garbage_closed, 50, "garbage connections are closed");
        assert_eq!(dribble_closed, 50, "dribbled handshakes are cut by the handshake timeout");
    });

    case(&lab, &mut report, "no or wrong ALPN", || {
        let (wrong, none) = (tls_client(&lab, &[b"http/1.1"]), tls_client(&lab, &[]));
        let (wrong_refused, none_closed) = from(&outside, move || async move {
            let wrong_refused = tls_connect(wrong, hbone).await.is_err();
            let none_closed = match tls_connect(none, hbone).await {
                Err(_) => true,
                Ok(mut tls) => {
                    let _ = tls.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
                    closed_within(&mut tls, Duration::from_secs(5)).await
                }
            };
            (wrong_refused, none_closed)
        });
        assert!(wrong_refused, "ALPN http/1.1 alone is refused");
        assert!(none_closed, "HTTP/1 over the tunnel port is closed");
    });

    case(&lab, &mut report, "HTTP/2 rapid reset (5000 streams)", || {
        let cfg = tls_client(&lab, &[b"h2"]);
        let target = format!("{v1}:8080");
        let (sent, conn_ended) = from(&outside, move || async move {
            let (send, conn) = h2_client(cfg, hbone).await;
            let mut sent = 0;
            for _ in 0..5000 {
                let Ok(ready) = tokio::time::timeout(Duration::from_secs(2), send.clone().ready()).await else { break };
                let Ok(mut ready) = ready else { break };
                let Ok((_, mut stream)) = ready.send_request(connect_request(&target), false) else { break };
                stream.send_reset(h2::Reason::CANCEL);
                sent += 1;
            }
            let ended = tokio::time::timeout(Duration::from_secs(5), conn).await.is_ok();
            (sent, ended)
        });
        println!("rapid reset: {sent} streams sent and reset, connection closed by the agent: {conn_ended}");
        assert!(sent > 0);
    });

    case(&lab, &mut report, "more than 1000 streams on one connection", || {
        let cfg = tls_client(&lab, &[b"h2"]);
        let target = format!("{v1}:8080");
        let (advertised, opened) = from(&outside, move || async move {
            let tls = tls_connect(cfg, hbone).await.unwrap();
            let (send, mut conn) = h2::client::Builder::new().handshake::<_, Bytes>(tls).await.unwrap();
            // Read the server's SETTINGS.
            let _ = tokio::time::timeout(Duration::from_millis(500), &mut conn).await;
            let advertised = conn.max_concurrent_send_streams();
            tokio::spawn(conn);
            // The client queues streams past the server's limit itself; what counts is
            // how many the agent answers while every one of them stays open.
            let mut pending = Vec::new();
            let mut streams = Vec::new();
            for _ in 0..1200 {
                let Ok(mut s) = send.clone().ready().await else { break };
                match s.send_request(connect_request(&target), false) {
                    Ok((r, stream)) => {
                        pending.push(tokio::time::timeout(Duration::from_secs(2), r));
                        streams.push(stream);
                    }
                    Err(_) => break,
                }
            }
            let answered = futures::future::join_all(pending)
                .await
                .into_iter()
                .filter(|r| matches!(r, Ok(Ok(resp)) if resp.status() == 200))
                .count();
            drop(streams);
            (advertised, answered)
        });
        assert!(advertised <= 100, "the agent advertises at most 100 streams, not {advertised}");
        assert!(opened > 0 && opened <= 100, "{opened} streams served at once");
    });

    case(&lab, &mut report, "oversize headers and CONNECT authority", || {
        let cfg = tls_client(&lab, &[b"h2"]);
        let (big_header, big_authority, other_pod, mesh_port) = from(&outside, move || async move {
            // A connection per request: an oversize one may end its connection.
            let status_of = |req: http::Request<()>| {
                let cfg = cfg.clone();
                async move {
                    let (send, _conn) = h2_client(cfg, hbone).await;
                    let Ok(mut s) = send.ready().await else { return 0 };
                    let Ok((resp, _stream)) = s.send_request(req, false) else { return 0 };
                    match tokio::time::timeout(Duration::from_secs(5), resp).await {
                        Ok(Ok(r)) => r.status().as_u16(),
                        _ => 0,
                    }
                }
            };
            let mut big = connect_request(&format!("{v1}:8080"));
            big.headers_mut().insert("x-big", http::HeaderValue::from_str(&"a".repeat(1 << 20)).unwrap());
            let huge_authority = format!("{}.example:8080", "a".repeat(60_000));
            let big_authority = match http::Uri::try_from(huge_authority.as_str()) {
                Ok(_) => status_of(connect_request(&huge_authority)).await,
                Err(_) => 0,
            };
            (
                status_of(big).await,
                big_authority,
                status_of(connect_request(&format!("{}:8080", "10.10.2.3"))).await,
                status_of(connect_request(&format!("{v1}:15008"))).await,
            )
        });
        assert_ne!(big_header, 200, "a 1 MiB header is refused");
        assert_ne!(big_authority, 200, "a 60 KB authority is refused");
        assert_eq!(other_pod, 403, "CONNECT to another pod's address");
        assert_eq!(mesh_port, 403, "CONNECT to a mesh port");
    });

    case(&lab, &mut report, "direct dials to 15001 and 15006", || {
        let closed = from(&outside, move || async move {
            let mut closed = 0;
            for port in [15001, 15006] {
                // Refused or reset at once counts as closed too.
                let Ok(mut s) = TcpStream::connect(SocketAddr::new(v1.into(), port)).await else {
                    closed += 1;
                    continue;
                };
                let _ = s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
                let mut buf = [0u8; 64];
                let answered =
                    matches!(tokio::time::timeout(Duration::from_secs(3), s.read(&mut buf)).await, Ok(Ok(n)) if n > 0);
                closed += usize::from(!answered);
            }
            closed
        });
        assert_eq!(closed, 2, "nothing answers a direct dial to the agent's pod ports");
    });

    case(&lab, &mut report, "slowloris on the readiness port", || {
        let node2 = SocketAddr::new(lab.node("node2").unwrap().gateway.into(), 15021);
        let cut = from(&outside, move || async move {
            let lorises = (0..50).map(|_| async move {
                let mut s = TcpStream::connect(node2).await.ok()?;
                s.write_all(b"GET /healthz/ready HTTP/1.1\r\nHost: x\r\n").await.ok()?;
                let started = Instant::now();
                for _ in 0..30 {
                    if s.write_all(b"X").await.is_err() {
                        break;
                    }
                    let mut b = [0u8; 256];
                    match tokio::time::timeout(Duration::from_secs(1), s.read(&mut b)).await {
                        Ok(Ok(0) | Err(_)) => break,
                        Ok(Ok(_)) => break,
                        Err(_) => {}
                    }
                }
                Some(started.elapsed() < Duration::from_secs(15))
            });
            futures::future::join_all(lorises).await.into_iter().filter(|c| *c == Some(true)).count()
        });
        assert_eq!(cut, 50, "slow headers are cut by the header read timeout");
    });

    case(&lab, &mut report, "20k idle connections to 15021", || {
        let node2 = SocketAddr::new(lab.node("node2").unwrap().gateway.into(), 15021);
        let opened = from(&outside, move || async move {
            // The client needs the descriptors too.
            use nix::sys::resource::{Resource, getrlimit, setrlimit};
            let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
            let _ = setrlimit(Resource::RLIMIT_NOFILE, hard.min(65536), hard);
            let mut held = Vec::new();
            for _ in 0..20 {
                let batch = (0..1000).map(|_| async move {
                    tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(node2)).await.ok()?.ok()
                });
                held.extend(futures::future::join_all(batch).await.into_iter().flatten());
            }
            tokio::time::sleep(Duration::from_secs(3)).await;
            held.len()
        });
        println!("idle connections opened to 15021: {opened}");
    });

    apply_seed(&lab, "virtualservice-myapp.yaml");
    apply_seed(&lab, "destinationrule-myapp.yaml");
    // Six in a row: one could reach v2 by the L4 balancer's chance.
    eventually("routes applied", || {
        (0..6)
            .all(|_| {
                let out = lab.exec("frontend", &["curl", "-s", "-H", "x-version: v2", "http://myapp/"]).unwrap();
                reply_pod(&String::from_utf8_lossy(&out.stdout)).as_deref() == Some("myapp-v2")
            })
            .then_some(())
    });
    // Where the client's agent parses HTTP (a Service with routes): its header caps.
    case_on(&lab, "node1", &mut report, "oversize and slow HTTP/1 headers on the L7 path", || {
        let header = lab.state_dir.join("hostile-big-header");
        std::fs::write(&header, format!("x-big: {}\n", "a".repeat(256 * 1024))).unwrap();
        let at = format!("@{}", header.display());
        let out = lab
            .exec(
                "frontend",
                &["curl", "-sv", "-o", "/dev/null", "-w", "%{http_code}", "-m", "5", "-H", &at, "http://myapp/"],
            )
            .unwrap();
        let trace: String =
            String::from_utf8_lossy(&out.stderr).lines().filter(|l| l.len() < 200).collect::<Vec<_>>().join("\n");
        assert_ne!(String::from_utf8_lossy(&out.stdout), "200", "a 256 KiB header went through:\n{trace}");
        let script = "exec 3<>/dev/tcp/10.96.0.20/80 || exit 2; printf 'GET / HTTP/1.1\\r\\nHost: myapp\\r\\n' >&3; \
                      start=$SECONDS; for i in $(seq 1 30); do printf 'X' >&3 2>/dev/null || break; \
                      if ! timeout 1 cat <&3 >/dev/null; then :; else break; fi; done; echo $((SECONDS-start))";
        let out = lab.exec("frontend", &["bash", "-c", script]).unwrap();
        let held: u64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap_or(99);
        assert!(held < 15, "the L7 path held a slow client for {held} s");
    });
    // Buffered, if at all, by the client's agent.
    case_on(&lab, "node1", &mut report, "200 x 1 MiB unfinished bodies via a VirtualService", || {
        let echo = root().join("target/debug/mesh-echo").display().to_string();
        let out = lab
            .exec(
                "frontend",
                &[
                    &echo,
                    "stall",
                    "10.96.0.20:80",
                    "--conns",
                    "200",
                    "--body",
                    "1048576",
                    "--send",
                    "786432",
                    "--hold-ms",
                    "4000",
                ],
            )
            .unwrap();
        let stalled: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        println!("stalled bodies: {stalled}");
        assert!(stalled["connected"].as_u64().unwrap_or(0) >= 150, "{stalled}");
    });
    write_report(&report);
}

#[test]
fn a_source_pod_over_its_connection_cap_is_refused_logged_and_counted() {
    let Some(lab) = lab_with_env(
        "a_source_pod_over_its_connection_cap_is_refused_logged_and_counted",
        &[("MESH_MAX_CONNECTIONS_PER_SOURCE", "100")],
    ) else {
        return;
    };
    let legacy = SocketAddr::new(lab.pod("legacy-service").unwrap().ip.into(), 9000);
    let outside = lab.pod("outside").unwrap().netns.clone();
    // 150 plaintext echo connections held open at once from one pod.
    let echoed = from(&outside, move || async move {
        let conns = (0..150).map(|_| async move {
            let mut s = TcpStream::connect(legacy).await.ok()?;
            s.write_all(b"ping").await.ok()?;
            let mut b = [0u8; 4];
            let r = tokio::time::timeout(Duration::from_secs(3), s.read_exact(&mut b)).await;
            matches!(r, Ok(Ok(_))).then_some(s)
        });
        let held: Vec<TcpStream> = futures::future::join_all(conns).await.into_iter().flatten().collect();
        held.len()
    });
    assert_eq!(echoed, 100, "the cap admits 100 and refuses the rest");
    let m = metrics(&lab, "node2");
    let refused: u64 = m
        .lines()
        .filter(|l| l.starts_with("istio_mesh_connections_refused_total") && l.contains("reason=\"per_source\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    assert!(refused >= 50, "refusals counted: {refused}\n{m}");
    let log = std::fs::read_to_string(lab.agent_log_path("node2")).unwrap();
    assert!(log.contains("connection refused: limit reached") && log.contains("per_source"), "logged");
    // Once the connections are gone, the pod gets its places back.
    eventually("places freed", || {
        from(&outside, move || async move {
            let mut s = TcpStream::connect(legacy).await.ok()?;
            s.write_all(b"pong").await.ok()?;
            let mut b = [0u8; 4];
            tokio::time::timeout(Duration::from_secs(2), s.read_exact(&mut b)).await.ok()?.ok()
        })
    });
    let (ok, _) = curl(&lab, "frontend", "http://legacy-service/");
    assert!(ok);
    let _ = Stdio::null();
}

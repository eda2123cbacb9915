//! The fuzz targets (`mesh_agent::fuzzing`) under plain `cargo test`: every seed of
//! every corpus, what the seeds must reach past the parsers, and a bounded, repeatable
//! run of mutations of them (a few thousand inputs, no instrumentation: the coverage
//! guided runs are `cargo xtask fuzz`).
//!
//! The binary seeds (HTTP/2 and TLS bytes a real client writes, a certificate) are made
//! here by hyper, rustls and rcgen; `MESH_WRITE_SEEDS=1 cargo test --test fuzz_seeds`
//! writes them into `fuzz/seeds/` for libFuzzer.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use mesh_agent::fuzzing::{self, TARGETS};
use mesh_agent::proxy::detect::{HeadScan, Protocol};
use tokio::io::AsyncReadExt as _;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The checked-in seeds of `target`, by file name.
fn seeds(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = root().join("fuzz/seeds").join(target);
    let mut out: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read(&p).unwrap()))
        .collect();
    out.sort();
    out
}

/// The config corpus: the mesh config under examples/ (what users are shown; `kind/`
/// holds the cluster's own workloads, which the agent does not read as config).
fn config_seeds() -> Vec<(String, Vec<u8>)> {
    fn walk(dir: &Path, out: &mut Vec<(String, Vec<u8>)>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "yaml" || x == "yml") {
                out.push((p.display().to_string(), std::fs::read(&p).unwrap()));
            }
        }
    }
    let mut out = Vec::new();
    for dir in ["seed", "lab", "gateway-api"] {
        walk(&root().join("examples").join(dir), &mut out);
    }
    out.sort();
    out
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(f)
}

/// What a hyper HTTP/2 client writes for one request before any answer.
fn h2_client_bytes(method: http::Method, uri: &str) -> Vec<u8> {
    let uri = uri.to_string();
    block_on(async move {
        let (client, mut server) = tokio::io::duplex(64 * 1024);
        let (mut sender, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(client),
        )
        .await
        .unwrap();
        tokio::spawn(conn);
        let req = http::Request::builder()
            .method(method)
            .uri(uri)
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap();
        tokio::spawn(async move { sender.send_request(req).await });
        let mut bytes = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(Ok(n)) = tokio::time::timeout(Duration::from_millis(200), server.read(&mut buf)).await {
            if n == 0 {
                break;
            }
            bytes.extend_from_slice(&buf[..n]);
        }
        bytes
    })
}

/// A rustls client's first flight for `name`: a TLS client hello with that SNI.
fn client_hello(name: &str) -> Vec<u8> {
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let mut conn = rustls::ClientConnection::new(Arc::new(config), name.to_string().try_into().unwrap()).unwrap();
    let mut out = Vec::new();
    conn.write_tls(&mut out).unwrap();
    out
}

/// A certificate with a workload's SPIFFE URI SAN, as a peer presents it.
fn workload_cert(uri: &str) -> Vec<u8> {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.subject_alt_names = vec![rcgen::SanType::URI(uri.try_into().unwrap())];
    let key = rcgen::KeyPair::generate().unwrap();
    params.self_signed(&key).unwrap().der().to_vec()
}

/// The binary seeds, by target and file name.
fn made_seeds() -> Vec<(&'static str, &'static str, Vec<u8>)> {
    vec![
        ("hbone_connect", "connect-myapp-v1", h2_client_bytes(http::Method::CONNECT, "10.10.2.2:8080")),
        ("hbone_connect", "connect-other-pod", h2_client_bytes(http::Method::CONNECT, "10.10.2.3:8080")),
        ("http_request", "h2-get-api", h2_client_bytes(http::Method::GET, "http://myapp/api/users")),
        ("detection", "tls-client-hello", client_hello("myapp.example.com")),
        ("spiffe_uri", "peer-certificate", workload_cert("spiffe://cluster.local/ns/production/sa/frontend")),
    ]
}

#[test]
fn write_binary_seeds_when_asked() {
    if std::env::var_os("MESH_WRITE_SEEDS").is_none() {
        eprintln!("MESH_WRITE_SEEDS not set: the checked-in binary seeds are left as they are");
        return;
    }
    for (target, name, bytes) in made_seeds() {
        let dir = root().join("fuzz/seeds").join(target);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(name), bytes).unwrap();
    }
}

fn seed<'a>(all: &'a [(String, Vec<u8>)], name: &str) -> &'a [u8] {
    &all.iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("seed {name} is missing")).1
}

#[test]
fn every_config_in_examples_parses_and_compiles() {
    let seeds = config_seeds();
    assert!(seeds.len() >= 10, "examples/ has the user's configs");
    for (name, bytes) in &seeds {
        let count = fuzzing::config_yaml(bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(count > 0, "{name}: no object");
    }
    let broken = fuzzing::config_yaml(b"apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: x, namespace: production}\nspec: {action: ALLOW, rules: [{from: 7}]}\n");
    let e = broken.expect_err("a malformed policy is refused");
    assert_eq!(
        (e.object.as_deref(), e.field.as_deref()),
        (Some("AuthorizationPolicy production/x"), Some("spec.rules[0].from")),
        "{e}"
    );
}

#[test]
fn http_seeds_are_judged_and_routed() {
    let s = seeds("http_request");
    assert_eq!(fuzzing::http_request(seed(&s, "get-api-users")), [StatusCode::OK]);
    assert_eq!(fuzzing::http_request(seed(&s, "dot-segments-to-admin")), [StatusCode::FORBIDDEN]);
    assert_eq!(fuzzing::http_request(seed(&s, "lower-case-method")), [StatusCode::BAD_REQUEST]);
    assert_eq!(fuzzing::http_request(seed(&s, "pipelined")), [StatusCode::OK, StatusCode::FORBIDDEN]);
    assert_eq!(fuzzing::http_request(seed(&s, "h2-get-api")), [StatusCode::OK], "HTTP/2 prior knowledge");
    assert_eq!(
        fuzzing::http_request(&made_seeds()[2].2),
        [StatusCode::OK],
        "the checked-in seed is still what hyper writes"
    );
    assert!(
        fuzzing::http_request(b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n")
            .is_empty()
    );
}

#[test]
fn hbone_seeds_reach_the_connect_handler() {
    let s = seeds("hbone_connect");
    assert_eq!(fuzzing::hbone_connect(seed(&s, "connect-myapp-v1")), [StatusCode::OK]);
    assert_eq!(fuzzing::hbone_connect(seed(&s, "connect-other-pod")), [StatusCode::FORBIDDEN], "no open relay");
    assert_eq!(fuzzing::hbone_connect(&made_seeds()[0].2), [StatusCode::OK]);
    assert!(fuzzing::hbone_connect(b"GET / HTTP/1.1\r\n\r\n").is_empty(), "not HTTP/2: no stream");
}

#[test]
fn detection_seeds_are_told_apart() {
    let s = seeds("detection");
    let (p, host, _) = fuzzing::detection(seed(&s, "http1-host"));
    assert_eq!((p, host), (Some(Protocol::Http), HeadScan::Found("example.com".into())));
    let (p, _, sni) = fuzzing::detection(seed(&s, "tls-client-hello"));
    assert_eq!((p, sni), (Some(Protocol::Opaque), Ok(Some("myapp.example.com".into()))));
    assert_eq!(fuzzing::detection(seed(&s, "h2-preface")).0, Some(Protocol::Http));
    assert_eq!(fuzzing::detection(seed(&s, "ssh-banner")).0, Some(Protocol::Opaque));
}

#[test]
fn http1_watch_seeds_count_what_the_served_path_would() {
    let s = seeds("http1_watch");
    assert_eq!(fuzzing::http1_watch(seed(&s, "get-sized")), [200]);
    assert_eq!(fuzzing::http1_watch(seed(&s, "chunked-grpc-trailers")), [200]);
    assert_eq!(fuzzing::http1_watch(seed(&s, "pipelined-bodiless")), [204, 200, 503], "100 Continue is not an answer");
    assert_eq!(fuzzing::http1_watch(seed(&s, "upgrade")), [101]);
    assert_eq!(fuzzing::http1_watch(seed(&s, "until-close")), [200]);
    assert!(
        fuzzing::http1_watch(b"\0HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").is_empty(),
        "no request: not counted"
    );
}

#[test]
fn path_and_identity_seeds() {
    let s = seeds("authz_path");
    assert_eq!(fuzzing::authz_path(seed(&s, "dot-segments")).unwrap(), "/admin");
    assert_eq!(fuzzing::authz_path(seed(&s, "encoded-slash")).unwrap(), "/admin/x");
    let s = seeds("spiffe_uri");
    let uri = fuzzing::spiffe_uri(seed(&s, "frontend")).expect("a SPIFFE URI");
    assert_eq!(uri.to_string(), "spiffe://cluster.local/ns/production/sa/frontend");
    let cert = workload_cert("spiffe://cluster.local/ns/production/sa/frontend");
    let from_cert = mesh_agent::identity::peer_identity(&rustls::pki_types::CertificateDer::from(cert.as_slice()));
    assert_eq!(from_cert, Some(uri));
    assert!(fuzzing::spiffe_uri(seed(&s, "newline-in-account")).is_none(), "a forged label is refused");
}

/// A small, repeatable pseudo-random source (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// One mutation of `input` in the ways libFuzzer's simplest mutators make them: a
/// flipped bit, a byte set to an edge value, a cut, a repeat, a splice from another seed.
fn mutate(rng: &mut Rng, input: &[u8], other: &[u8]) -> Vec<u8> {
    let mut out = input.to_vec();
    for _ in 0..=rng.below(3) {
        let at = rng.below(out.len());
        match rng.below(6) {
            0 if !out.is_empty() => out[at] ^= 1 << rng.below(8),
            1 if !out.is_empty() => out[at] = [0, 0xff, b'%', b'/', b'.', b'\n', b':', 0x7f][rng.below(8)],
            2 => out.truncate(at),
            3 if !out.is_empty() => {
                let end = (at + rng.below(16)).min(out.len());
                let piece = out[at..end].to_vec();
                out.splice(at..at, piece);
            }
            4 if !other.is_empty() => {
                let from = rng.below(other.len());
                let end = (from + rng.below(64)).min(other.len());
                out.splice(at..at, other[from..end].iter().copied());
            }
            _ => out.insert(at.min(out.len()), rng.next() as u8),
        }
    }
    out
}

#[test]
fn mutations_of_every_seed_keep_every_invariant() {
    let mut rng = Rng(0x6d65_7368_2d66_757a);
    for (target, run) in TARGETS {
        let mut corpus: Vec<Vec<u8>> = if *target == "config_yaml" {
            config_seeds().into_iter().map(|(_, b)| b).collect()
        } else {
            seeds(target).into_iter().map(|(_, b)| b).collect()
        };
        corpus.extend(made_seeds().into_iter().filter(|(t, _, _)| t == target).map(|(_, _, b)| b));
        assert!(!corpus.is_empty(), "{target} has seeds");
        // The config target compiles a snapshot per input: fewer of those.
        let rounds = if *target == "config_yaml" { 300 } else { 1500 };
        for _ in 0..rounds {
            let input = &corpus[rng.below(corpus.len())];
            let other = &corpus[rng.below(corpus.len())];
            let mutated = mutate(&mut rng, input, other);
            run(&mutated);
        }
    }
}

//! The fuzz targets' entry points. Each takes arbitrary bytes through one parser of
//! input a hostile tenant or peer controls, the way the agent runs it, and asserts what
//! must hold whatever the bytes: no panic, and the invariants named at each function.
//!
//! `fuzz/` wraps each in a libFuzzer target (`cargo xtask fuzz`); `tests/fuzz_seeds.rs`
//! runs them on the seed corpora and on bounded mutations of them under plain
//! `cargo test`. Each returns what it saw, so the seed tests can show a seed reaches
//! the code past the parser.

use std::convert::Infallible;
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::authz::head::{self, BadHead};
use crate::authz::path::{self, PathError};
use crate::authz::{ConnAttrs, Decision, Peer, RequestAttrs};
use crate::config::{Error as ConfigError, fail_closed_standins, parse_documents};
use crate::identity::{Identity, peer_identity};
use crate::proxy::detect::{self, HeadScan, Protocol};
use crate::proxy::hbone::connect_target;
use crate::snapshot::Snapshot;
use crate::state::Workload;
use crate::traffic::route::RequestView;
use crate::transport::hbone::{Answer, H2Stream, ServeStream};
use crate::transport::limits;

/// A target run on one input, its findings dropped (libFuzzer watches for panics).
pub type Target = fn(&[u8]);

/// Each named function as a [`Target`], under its own name: the name cannot drift
/// from the function it stands for.
macro_rules! targets {
    ($($name:ident),* $(,)?) => {
        &[$((stringify!($name), |data| {
            let _ = $name(data);
        })),*]
    };
}

/// Every target, by the name its libFuzzer binary and seed folder carry.
pub const TARGETS: &[(&str, Target)] =
    targets!(config_yaml, http_request, hbone_connect, detection, authz_path, spiffe_uri, http1_watch);

/// The lab's namespaces, pods and Services with the user's reference policies and
/// routes: what the HTTP and HBONE targets judge against.
const REFERENCE: &[(&str, &str)] = &[
    ("namespaces.yaml", include_str!("../../examples/lab/namespaces.yaml")),
    ("pods.yaml", include_str!("../../examples/lab/pods.yaml")),
    ("services.yaml", include_str!("../../examples/lab/services.yaml")),
    ("authorizationpolicy-myapp.yaml", include_str!("../../examples/seed/authorizationpolicy-myapp.yaml")),
    ("virtualservice-myapp.yaml", include_str!("../../examples/seed/virtualservice-myapp.yaml")),
    ("destinationrule-myapp.yaml", include_str!("../../examples/seed/destinationrule-myapp.yaml")),
];

struct Reference {
    snapshot: Snapshot,
    /// The pod requests arrive at (`production/myapp-v1`).
    server: Arc<Workload>,
    /// The pod they come from (`production/frontend`), as an mTLS peer.
    client: Arc<Workload>,
    peer: Peer,
}

fn reference() -> &'static Reference {
    static REFERENCE_SNAPSHOT: OnceLock<Reference> = OnceLock::new();
    REFERENCE_SNAPSHOT.get_or_init(|| {
        let mut objects = Vec::new();
        for (file, text) in REFERENCE {
            objects.extend(parse_documents(Path::new(file), text).expect("the reference config parses"));
        }
        let snapshot = Snapshot::compile(&objects, "cluster.local", 1);
        let pod = |ip: &str| snapshot.workload_by_ip(ip.parse().unwrap()).expect("a lab pod").clone();
        let (server, client) = (pod("10.10.2.2"), pod("10.10.1.2"));
        let peer = Peer::from_identity(&client.identity, &snapshot.equivalent_domains);
        Reference { snapshot, server, client, peer }
    })
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime"))
}

/// How long one input may keep a connection target busy: past it the input counts as
/// a hang (the targets' own bytes are all written at once, then the stream ends).
const ONE_INPUT: Duration = Duration::from_secs(5);

/// Config YAML through parse and compile, as every config source runs it, together with
/// the lab's objects. A file is accepted or refused whole; a refusal names a reason,
/// and its fail-closed stand-ins compile.
pub fn config_yaml(data: &[u8]) -> Result<usize, ConfigError> {
    let Ok(text) = std::str::from_utf8(data) else {
        return Ok(0);
    };
    match parse_documents(Path::new("fuzz.yaml"), text) {
        Ok(objects) => {
            let count = objects.len();
            let mut all = objects;
            for (file, text) in &REFERENCE[..3] {
                all.extend(parse_documents(Path::new(file), text).expect("the lab parses"));
            }
            let snapshot = Snapshot::compile(&all, "cluster.local", 1);
            for problem in &snapshot.problems {
                assert!(!problem.to_string().is_empty(), "a problem says what is wrong");
            }
            Ok(count)
        }
        Err(mut e) => {
            assert!(!e.reason.is_empty(), "a refusal says why");
            let standins = fail_closed_standins(text, &[], &mut e);
            let _ = Snapshot::compile(&standins, "cluster.local", 1);
            Err(e)
        }
    }
}

/// Bytes from a client to the HTTP server the agent runs for inbound requests (HTTP/1
/// or HTTP/2 prior knowledge, with the agent's limits), each request judged as the
/// destination judges it and routed by the reference VirtualService. The path judged is
/// normalized (normalizing it again changes nothing) and is the path forwarded.
/// Returns the statuses answered.
pub fn http_request(data: &[u8]) -> Vec<StatusCode> {
    serve(data, |io, answered| async move {
        let service = hyper::service::service_fn(move |req| {
            let status = judge_and_route(&req);
            answered.lock().expect("answers").push(status);
            async move { Ok::<_, Infallible>(status_only(status)) }
        });
        let _ = limits::http_server().serve_connection(io, service).await;
    })
}

fn judge_and_route<B>(req: &Request<B>) -> StatusCode {
    let r = reference();
    let judged = match head::judge(req.method(), req.uri(), req.headers()) {
        Ok(j) => j,
        Err(BadHead::LowerCaseMethod | BadHead::Path(_) | BadHead::Target) => return StatusCode::BAD_REQUEST,
    };
    assert_eq!(path::normalize(&judged.path).as_deref(), Ok(judged.path.as_str()), "normalizing is idempotent");
    assert_eq!(judged.target.path(), judged.path, "the application gets the path judged");
    let conn = ConnAttrs {
        src: "10.10.1.2:40000".parse().unwrap(),
        dst: "10.10.2.2:8080".parse().unwrap(),
        peer: Some(&r.peer),
    };
    let request = RequestAttrs {
        method: req.method().as_str(),
        path: &judged.path,
        host_lowercase: &judged.host_lowercase,
        headers: req.headers(),
    };
    let decision = r.snapshot.security(&r.server.key()).authz.check(&conn, Some(&request));
    let view = RequestView {
        method: req.method().as_str(),
        path: &judged.path,
        query: judged.target.query(),
        authority: &judged.host_lowercase,
        scheme: "http",
        headers: req.headers(),
        port: 80,
        source: &r.client,
    };
    if let Some(rule) = r.snapshot.routes("production/myapp").and_then(|routes| routes.first_match(&view)) {
        let _ = rule.rewritten_path(&view);
    }
    match decision {
        Decision::Allow => StatusCode::OK,
        Decision::Deny(_) => StatusCode::FORBIDDEN,
    }
}

/// Bytes from a peer inside the TLS of an HBONE connection: HTTP/2 with the agent's
/// limits, each stream's CONNECT judged as the HBONE server judges it (only the pod's
/// own application ports). Returns the statuses answered.
pub fn hbone_connect(data: &[u8]) -> Vec<StatusCode> {
    serve(data, |io, answered| async move {
        let pod = reference().server.clone();
        // Judged as the stream arrives, so every answer is counted before the
        // connection's end drops the streams' tasks.
        let decide = move |req: http::Request<()>| {
            let answer = match connect_target(&req, &pod, &reference().snapshot) {
                Ok(target) => {
                    assert!(pod.ips.contains(&target.ip()), "a tunnel reaches its own pod only");
                    answered.lock().expect("answers").push(StatusCode::OK);
                    Answer::Accept(Dropped)
                }
                Err(refused) => {
                    answered.lock().expect("answers").push(refused.status());
                    Answer::Refuse(refused.status())
                }
            };
            std::future::ready(answer)
        };
        let (shutdown, tasks) = (tokio_util::sync::CancellationToken::new(), tokio_util::task::TaskTracker::new());
        let _ = crate::transport::hbone::serve(io.into_inner(), &shutdown, &tasks, decide).await;
        tasks.close();
        tasks.wait().await;
    })
}

/// An accepted stream, closed at once.
struct Dropped;

impl ServeStream for Dropped {
    async fn serve(self, _stream: H2Stream) {}
}

type Answers = Arc<std::sync::Mutex<Vec<StatusCode>>>;

/// Runs `server` on one end of an in-memory stream while `data` is written to the
/// other (then its end), reading whatever comes back.
fn serve<F, Fut>(data: &[u8], server: F) -> Vec<StatusCode>
where
    F: FnOnce(TokioIo<tokio::io::DuplexStream>, Answers) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let answered = Answers::default();
    runtime().block_on(async {
        let (client, server_end) = tokio::io::duplex(64 * 1024);
        let (mut from_server, mut to_server) = tokio::io::split(client);
        let write = async {
            let _ = to_server.write_all(data).await;
            // The end of the stream only once the server has taken in what it was sent:
            // HTTP/2 drops streams it has not accepted when the connection ends.
            for _ in 0..32 {
                tokio::task::yield_now().await;
            }
            let _ = to_server.shutdown().await;
        };
        let read = async {
            let mut sink = [0u8; 8 * 1024];
            while matches!(from_server.read(&mut sink).await, Ok(n) if n > 0) {}
        };
        let all = async { tokio::join!(server(TokioIo::new(server_end), answered.clone()), write, read) };
        let _ = tokio::time::timeout(ONE_INPUT, all).await;
    });
    answered.lock().expect("answers").clone()
}

fn status_only(status: StatusCode) -> Response<Empty<Bytes>> {
    let mut r = Response::new(Empty::new());
    *r.status_mut() = status;
    r
}

/// What one connection's first bytes tell every listener: the protocol (decided on a
/// prefix, never changed by more bytes), the Host of an HTTP/1 head, the SNI of a TLS
/// client hello.
pub fn detection(data: &[u8]) -> (Option<Protocol>, HeadScan, Result<Option<String>, String>) {
    let protocol = detect::classify(data);
    for end in 0..data.len().min(32) {
        if let Some(early) = detect::classify(&data[..end]) {
            assert_eq!(protocol, Some(early), "more bytes changed a decision made on {end}");
        }
    }
    let host = detect::host_in_head(data);
    if let HeadScan::Found(h) = &host {
        assert_eq!(*h, h.to_ascii_lowercase(), "hosts are lower-cased");
    }
    (protocol, host, detect::sni_in_hello(data))
}

/// A request path through the normalization authorization judges: a normalized path
/// starts with `/`, has no empty, `.` or `..` segment, no backslash and no control
/// byte, and normalizes to itself.
pub fn authz_path(data: &[u8]) -> Result<String, PathError> {
    let Ok(raw) = std::str::from_utf8(data) else {
        return Err(PathError::NotAbsolute);
    };
    let normalized = path::normalize(raw)?;
    assert!(normalized.starts_with('/'));
    assert!(!normalized.contains('\\') && !normalized.bytes().any(|b| b < 0x20 || b == 0x7f));
    let inner = normalized.strip_prefix('/').unwrap_or_default();
    let inner = inner.strip_suffix('/').unwrap_or(inner);
    if !inner.is_empty() {
        assert!(inner.split('/').all(|s| !matches!(s, "" | "." | "..")), "{normalized:?} from {raw:?}");
    }
    assert_eq!(path::normalize(&normalized).as_ref(), Ok(&normalized), "normalizing is idempotent");
    Ok(normalized)
}

/// A SPIFFE URI, as a peer's certificate or a CSR names it, and the same bytes as a
/// peer's certificate: an identity parsed prints back as the same URI, and carries only
/// the characters the SPIFFE spec allows.
pub fn spiffe_uri(data: &[u8]) -> Option<Identity> {
    let from_cert = peer_identity(&rustls::pki_types::CertificateDer::from(data));
    if let Some(id) = &from_cert {
        assert_eq!(Identity::parse(&id.to_string()).as_ref().ok(), Some(id));
    }
    let uri = std::str::from_utf8(data).ok()?;
    let id = Identity::parse(uri).ok()?;
    assert_eq!(id.to_string(), uri, "an identity prints as the URI it was read from");
    let all = [&*id.trust_domain, &*id.namespace, &*id.service_account].concat();
    assert!(all.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_')));
    Some(id)
}

/// One HTTP/1.1 connection as a watched inbound connection's follower sees it
/// (`proxy::admission::watched`): `data` is the two directions' bytes in turns,
/// requests first, a NUL byte passing the turn. Whatever the bytes: what it holds
/// stays within its bounds, every end of a response follows its head, no response is
/// counted that no request preceded, and the same bytes in pieces of one byte report
/// the same as in whole turns. Returns the statuses counted.
pub fn http1_watch(data: &[u8]) -> Vec<u16> {
    use crate::proxy::admission::watched::{Dir, Event, Follow, MAX_PENDING};

    let turns: Vec<(Dir, &[u8])> = data
        .split(|&b| b == 0)
        .enumerate()
        .map(|(i, t)| (if i % 2 == 0 { Dir::Requests } else { Dir::Responses }, t))
        .collect();
    let follow = |piece: usize| {
        let mut f = Follow::default();
        let mut seen = Vec::new();
        let mut answered = false;
        let mut record = |e: Event| {
            match &e {
                Event::Answered { .. } => assert!(!answered, "two heads without an end between: {e:?}"),
                Event::Done { .. } => assert!(answered, "an end without a head: {e:?}"),
            }
            answered = matches!(e, Event::Answered { .. });
            seen.push(match e {
                Event::Answered { status, grpc, grpc_status } => (status, grpc, grpc_status, None),
                Event::Done { request_bytes, response_bytes, trailer_grpc_status, .. } => {
                    (0, false, trailer_grpc_status, Some((request_bytes, response_bytes)))
                }
            });
        };
        for (dir, bytes) in &turns {
            for p in bytes.chunks(piece) {
                f.feed(*dir, p, &mut record);
                assert!(f.pending() <= MAX_PENDING, "{} requests held", f.pending());
                assert!(f.held() <= 2 * (limits::H1_MAX_BUF + 1), "{} bytes held", f.held());
            }
        }
        f.abandon(&mut record);
        assert_eq!(f.pending(), 0);
        seen
    };
    let whole = follow(usize::MAX);
    assert_eq!(follow(1), whole, "a byte at a time reports what whole turns do");
    let requests = turns.iter().filter(|(d, _)| *d == Dir::Requests).map(|(_, t)| t.len()).sum::<usize>();
    let answered: Vec<u16> = whole.iter().filter(|s| s.3.is_none()).map(|s| s.0).collect();
    assert!(answered.is_empty() || requests > 0, "answers counted with no request read");
    answered
}

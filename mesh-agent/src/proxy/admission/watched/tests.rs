use super::*;

/// What the follower reported, without the durations.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seen {
    Answered(u16, bool, Option<u32>),
    Done { request: u64, response: u64, trailer: Option<u32> },
}

fn seen(e: Event) -> Seen {
    match e {
        Event::Answered { status, grpc, grpc_status } => Seen::Answered(status, grpc, grpc_status),
        Event::Done { request_bytes, response_bytes, trailer_grpc_status, .. } => {
            Seen::Done { request: request_bytes, response: response_bytes, trailer: trailer_grpc_status }
        }
    }
}

/// Feeds `steps` in order, each split into pieces of `piece` bytes.
fn follow(steps: &[(Dir, &[u8])], piece: usize) -> (Vec<Seen>, Follow) {
    let mut f = Follow::default();
    let mut out = Vec::new();
    for (dir, bytes) in steps {
        for p in bytes.chunks(piece) {
            f.feed(*dir, p, &mut |e| out.push(seen(e)));
        }
    }
    (out, f)
}

/// The same exchanges, whole and a byte at a time, report the same.
fn follow_any_split(steps: &[(Dir, &[u8])]) -> (Vec<Seen>, Follow) {
    let (whole, f) = follow(steps, usize::MAX);
    for piece in [1, 2, 3, 7, 64] {
        assert_eq!(follow(steps, piece).0, whole, "split into {piece}-byte pieces");
    }
    (whole, f)
}

fn done(request: u64, response: u64) -> Seen {
    Seen::Done { request, response, trailer: None }
}

/// Bytes going one way, then another.
type Steps<'a> = &'a [(Dir, &'a [u8])];

const REQ: Dir = Dir::Requests;
const RES: Dir = Dir::Responses;

#[test]
fn a_sized_exchange_is_counted_at_its_head_and_sized_at_its_end() {
    let (seen, f) = follow_any_split(&[
        (REQ, b"POST /orders HTTP/1.1\r\nhost: myapp\r\ncontent-length: 5\r\n\r\nhello"),
        (RES, b"HTTP/1.1 201 Created\r\nContent-Length: 12\r\n\r\nhello, world"),
    ]);
    assert_eq!(seen, [Seen::Answered(201, false, None), done(5, 12)]);
    assert!(!f.lost && f.pending.is_empty());
}

#[test]
fn chunked_bodies_both_ways_with_extensions_and_trailers() {
    let (seen, f) = follow_any_split(&[
        (REQ, b"PUT /x HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n4;ext=1\r\nabcd\r\n2\r\nef\r\n0\r\nx-sum: 1\r\n\r\n"),
        (
            RES,
            b"HTTP/1.1 200 OK\r\ncontent-type: application/grpc\r\ntransfer-encoding: chunked\r\n\r\nA\r\n0123456789\r\n0\r\ngrpc-status: 5\r\n\r\n",
        ),
        (REQ, b"GET /next HTTP/1.1\r\n\r\n"),
        (RES, b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n"),
    ]);
    assert_eq!(
        seen,
        [
            Seen::Answered(200, true, None),
            Seen::Done { request: 6, response: 10, trailer: Some(5) },
            Seen::Answered(404, false, None),
            done(0, 0),
        ]
    );
    assert!(!f.lost);
}

#[test]
fn pipelined_requests_are_answered_in_order() {
    let (seen, f) = follow_any_split(&[
        (REQ, b"GET /a HTTP/1.1\r\n\r\nPOST /b HTTP/1.1\r\ncontent-length: 3\r\n\r\nabcGET /c HTTP/1.1\r\n\r\n"),
        (
            RES,
            b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\naHTTP/1.1 503 Service Unavailable\r\ncontent-length: 2\r\n\r\nbbHTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
        ),
    ]);
    assert_eq!(
        seen,
        [
            Seen::Answered(200, false, None),
            done(0, 1),
            Seen::Answered(503, false, None),
            done(3, 2),
            Seen::Answered(200, false, None),
            done(0, 0),
        ]
    );
    assert!(f.pending.is_empty() && !f.lost);
}

#[test]
fn bodiless_answers_informational_heads_and_leading_empty_lines() {
    let (seen, f) = follow_any_split(&[
        (REQ, b"HEAD / HTTP/1.1\r\n\r\n"),
        // A HEAD answer announces a length it does not send.
        (RES, b"HTTP/1.1 200 OK\r\ncontent-length: 1024\r\n\r\n"),
        (REQ, b"\r\nPOST /up HTTP/1.1\r\nexpect: 100-continue\r\ncontent-length: 2\r\n\r\n"),
        (RES, b"HTTP/1.1 100 Continue\r\n\r\n"),
        (REQ, b"ok"),
        (RES, b"HTTP/1.1 204 No Content\r\n\r\n"),
        (REQ, b"GET /cached HTTP/1.1\r\n\r\n"),
        (RES, b"HTTP/1.1 304 Not Modified\r\ncontent-length: 99\r\n\r\n"),
    ]);
    assert_eq!(
        seen,
        [
            Seen::Answered(200, false, None),
            done(0, 0),
            Seen::Answered(204, false, None),
            done(2, 0),
            Seen::Answered(304, false, None),
            done(0, 0),
        ]
    );
    assert!(!f.lost);
}

#[test]
fn a_response_the_connection_end_delimits_ends_with_it() {
    let mut f = Follow::default();
    let mut out = Vec::new();
    f.feed(REQ, b"GET / HTTP/1.0\r\n\r\n", &mut |e| out.push(seen(e)));
    f.feed(RES, b"HTTP/1.0 200 OK\r\n\r\nsome bytes", &mut |e| out.push(seen(e)));
    f.feed(RES, b" and more", &mut |e| out.push(seen(e)));
    assert_eq!(out, [Seen::Answered(200, false, None)], "not done before the end");
    f.responses_end(&mut |e| out.push(seen(e)));
    f.responses_end(&mut |e| out.push(seen(e)));
    assert_eq!(out, [Seen::Answered(200, false, None), done(0, 19)], "done once, at the end");
}

#[test]
fn an_early_answer_counts_the_request_body_read_by_then() {
    let (seen, f) = follow_any_split(&[
        (REQ, b"POST /big HTTP/1.1\r\ncontent-length: 10\r\n\r\n0123"),
        (RES, b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 0\r\n\r\n"),
        (REQ, b"456789GET / HTTP/1.1\r\n\r\n"),
        (RES, b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"),
    ]);
    assert_eq!(seen, [Seen::Answered(413, false, None), done(4, 0), Seen::Answered(200, false, None), done(0, 0)]);
    assert!(!f.lost);
}

#[test]
fn a_switch_of_protocols_is_counted_then_no_longer_followed() {
    let (seen, f) = follow_any_split(&[
        (REQ, b"GET /ws HTTP/1.1\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n\x81\x05hello"),
        (RES, b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n\r\n\x81\x02hi"),
        (REQ, b"GET /not-http-any-more HTTP/1.1\r\n\r\n"),
        (RES, b"HTTP/1.1 200 OK\r\n\r\n"),
    ]);
    assert_eq!(seen, [Seen::Answered(101, false, None), done(0, 0)]);
    assert!(f.lost);
    let (seen, f) = follow_any_split(&[
        (REQ, b"CONNECT db:5432 HTTP/1.1\r\n\r\n"),
        (RES, b"HTTP/1.1 200 OK\r\n\r\n\x00\x01binary"),
    ]);
    assert_eq!(seen, [Seen::Answered(200, false, None), done(0, 0)]);
    assert!(f.lost);
    // Refused: that answer is counted, and nothing after it can be followed.
    let (seen, f) = follow_any_split(&[
        (REQ, b"GET /ws HTTP/1.1\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n"),
        (RES, b"HTTP/1.1 400 Bad Request\r\ncontent-length: 3\r\n\r\nno!"),
    ]);
    assert_eq!(seen, [Seen::Answered(400, false, None), done(0, 3)]);
    assert!(f.lost);
}

#[test]
fn a_trailers_only_grpc_answer_carries_its_status_in_the_head() {
    let (seen, _) = follow_any_split(&[
        (REQ, b"POST /pkg.Svc/Call HTTP/1.1\r\ncontent-type: application/grpc\r\ncontent-length: 0\r\n\r\n"),
        (RES, b"HTTP/1.1 200 OK\r\ncontent-type: application/grpc\r\ngrpc-status: 99\r\ncontent-length: 0\r\n\r\n"),
    ]);
    assert_eq!(seen, [Seen::Answered(200, true, Some(2)), done(0, 0)], "99 is not gRPC's: UNKNOWN");
}

#[test]
fn what_cannot_be_followed_is_given_up_not_guessed() {
    let cases: &[(&str, Steps<'_>)] = &[
        ("a malformed request line", &[(REQ, b"GET /\x00 HTTP/1.1\r\n\r\n")]),
        ("a request body the close would delimit", &[(REQ, b"POST / HTTP/1.1\r\ntransfer-encoding: gzip\r\n\r\n")]),
        ("conflicting lengths", &[(REQ, b"POST / HTTP/1.1\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n")]),
        ("a signed length", &[(REQ, b"POST / HTTP/1.1\r\ncontent-length: +1\r\n\r\n")]),
        ("a chunk size that is not hex", &[(REQ, b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n")]),
        (
            "a chunk size beyond u64",
            &[(REQ, b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n1ffffffffffffffff\r\n")],
        ),
        ("a chunk without its line end", &[(REQ, b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n1\r\naX")]),
        ("a response to nothing", &[(RES, b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")]),
        ("not HTTP", &[(REQ, b"GET / HTTP/1.1\r\n\r\n"), (RES, b"SSH-2.0-OpenSSH\r\n\r\n")]),
    ];
    for (what, steps) in cases {
        let (seen, f) = follow(steps, usize::MAX);
        assert!(f.lost, "{what}: given up");
        assert!(seen.is_empty(), "{what}: nothing counted: {seen:?}");
        assert!(f.pending.is_empty() && f.requests.held.capacity() == 0, "{what}: nothing held");
    }
}

#[test]
fn an_answer_cut_short_ends_with_what_passed() {
    let mut f = Follow::default();
    let mut out = Vec::new();
    f.feed(REQ, b"GET / HTTP/1.1\r\n\r\nGET /second HTTP/1.1\r\n\r\n", &mut |e| out.push(seen(e)));
    f.feed(RES, b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n0123456789", &mut |e| out.push(seen(e)));
    f.abandon(&mut |e| out.push(seen(e)));
    f.abandon(&mut |e| out.push(seen(e)));
    // The second request was never answered: not counted, as the served path does not.
    assert_eq!(out, [Seen::Answered(200, false, None), done(0, 10)]);
}

#[test]
fn what_a_client_makes_it_hold_is_bounded() {
    // A head that never ends.
    let mut f = Follow::default();
    f.feed(REQ, b"GET / HTTP/1.1\r\n", &mut |_| unreachable!());
    let line = b"x-filler: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n";
    for _ in 0..2 * H1_MAX_BUF / line.len() {
        f.feed(REQ, line, &mut |_| unreachable!());
        assert!(f.requests.held.len() <= H1_MAX_BUF + 1);
    }
    assert!(f.lost && f.requests.held.capacity() == 0);
    // Requests pipelined far ahead of their answers.
    let mut f = Follow::default();
    for _ in 0..MAX_PENDING {
        f.feed(REQ, b"GET / HTTP/1.1\r\n\r\n", &mut |_| unreachable!());
    }
    assert!(!f.lost && f.pending.len() == MAX_PENDING);
    f.feed(REQ, b"GET / HTTP/1.1\r\n\r\n", &mut |_| unreachable!());
    assert!(f.lost && f.pending.is_empty());
    // Empty lines forever between requests: ignored, not held.
    let mut f = Follow::default();
    for _ in 0..H1_MAX_BUF {
        f.feed(REQ, b"\r\n", &mut |_| unreachable!());
    }
    assert!(!f.lost && f.requests.held.is_empty());
    f.feed(REQ, b"GET / HTTP/1.1\r\n\r\n", &mut |_| unreachable!());
    assert_eq!(f.pending.len(), 1);
}

#[test]
fn arbitrary_bytes_never_panic_nor_grow_it() {
    // A fixed-seed xorshift: the same bytes on every run.
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let pieces: &[&[u8]] = &[
        b"GET / HTTP/1.1\r\n",
        b"HTTP/1.1 200 OK\r\n",
        b"content-length: 3\r\n",
        b"transfer-encoding: chunked\r\n",
        b"\r\n",
        b"3\r\nabc\r\n",
        b"0\r\n\r\n",
        b"abc",
        b"\xff\x00",
        b"HTTP/1.1 100 Continue\r\n\r\n",
    ];
    for _ in 0..2000 {
        let mut f = Follow::default();
        for _ in 0..40 {
            let dir = if next() % 2 == 0 { REQ } else { RES };
            let piece = pieces[(next() % pieces.len() as u64) as usize];
            f.feed(dir, piece, &mut |_| {});
            assert!(f.pending.len() <= MAX_PENDING);
            assert!(f.requests.held.len() <= H1_MAX_BUF + 1 && f.responses.held.len() <= H1_MAX_BUF + 1);
        }
        f.abandon(&mut |_| {});
    }
}

#[test]
fn only_http_1_without_spans_or_log_lines_is_watched() {
    let metrics = Metrics::default();
    let policy = TelemetryPolicy::default();
    assert!(suffices(&metrics, &policy, b"GET / HTTP/1.1\r\n"));
    assert!(!suffices(&metrics, &policy, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"), "HTTP/2 is served");
}

/// A watched connection as admission copies it, from a client to an application.
struct Copied {
    client: tokio::io::DuplexStream,
    app: tokio::io::DuplexStream,
    registry: prometheus_client::registry::Registry,
    shutdown: CancellationToken,
    copy: tokio::task::JoinHandle<io::Result<(u64, u64)>>,
}

impl Copied {
    fn start() -> Self {
        use crate::telemetry::{PeerLabels, ServiceLabels, Side as Peer};
        let mut registry = prometheus_client::registry::Registry::default();
        let metrics = Arc::new(Metrics::new(&mut registry));
        let peers = SharedPeers::new(PeerLabels {
            reporter: "destination",
            source: Peer::of(None),
            destination: Peer::of(None),
            service: ServiceLabels::unknown(),
            connection_security_policy: "mutual_tls",
        });
        let shutdown = CancellationToken::new();
        let (client, agent_client) = tokio::io::duplex(4096);
        let (mut agent_app, app) = tokio::io::duplex(4096);
        let mut watched = Watched::new(agent_client, (metrics, Arc::default(), peers), shutdown.clone());
        let copy =
            tokio::spawn(async move { crate::transport::copy::bidirectional(&mut watched, &mut agent_app).await });
        Self { client, app, registry, shutdown, copy }
    }

    /// One exchange; returns what the client received.
    async fn exchange(&mut self, request: &[u8], response: &[u8]) -> Vec<u8> {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        self.client.write_all(request).await.unwrap();
        let mut got = vec![0; request.len()];
        self.app.read_exact(&mut got).await.unwrap();
        assert_eq!(got, request, "the request as it was sent");
        self.app.write_all(response).await.unwrap();
        let mut got = Vec::new();
        while !got.ends_with(b"nope") {
            let mut piece = [0; 256];
            let n = self.client.read(&mut piece).await.unwrap();
            assert!(n > 0, "the response before the end");
            got.extend_from_slice(&piece[..n]);
        }
        got
    }

    fn metrics(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).unwrap();
        out
    }

    /// The application sees the client's side end, closes, and the client sees the end.
    async fn closes(mut self) {
        use tokio::io::AsyncReadExt as _;
        let mut rest = Vec::new();
        self.app.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
        drop(self.app);
        self.client.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
        self.copy.await.unwrap().unwrap();
    }
}

const REQUEST: &[u8] = b"POST /a HTTP/1.1\r\nHost: x\r\nX-Odd:  spacing kept \r\nContent-Length: 3\r\n\r\nabc";
const RESPONSE: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 4\r\n\r\nnope";

/// Each exchange counted once with its status and every byte delivered as it was
/// sent; once the agent drains, a client that asks nothing more is closed after the
/// grace.
#[tokio::test(start_paused = true)]
async fn a_watched_connection_is_counted_unchanged_and_a_silent_one_closed_after_the_drain_grace() {
    let mut c = Copied::start();
    assert_eq!(c.exchange(REQUEST, RESPONSE).await, RESPONSE);
    assert_eq!(c.exchange(REQUEST, RESPONSE).await, RESPONSE);
    let counted = c.metrics();
    let line = counted.lines().find(|l| l.starts_with("requests_total{")).unwrap_or_else(|| panic!("{counted}"));
    assert!(line.contains("response_code=\"503\"") && line.ends_with(" 2"), "{line}");
    assert!(counted.contains("request_bytes_sum{reporter=\"destination\""), "{counted}");
    c.shutdown.cancel();
    let started = tokio::time::Instant::now();
    c.closes().await;
    assert!(started.elapsed() >= CLIENT_DRAIN_GRACE, "closed after the grace, not before");
}

/// Once the agent drains, the next response tells the client to close (the one header
/// the agent adds), and the connection closes after it.
#[tokio::test(start_paused = true)]
async fn a_drain_tells_the_next_response_to_close_the_connection() {
    let mut c = Copied::start();
    assert_eq!(c.exchange(REQUEST, RESPONSE).await, RESPONSE);
    c.shutdown.cancel();
    let told = c.exchange(REQUEST, RESPONSE).await;
    let expected = b"HTTP/1.1 503 Service Unavailable\r\nconnection: close\r\ncontent-length: 4\r\n\r\nnope";
    assert_eq!(String::from_utf8_lossy(&told), String::from_utf8_lossy(expected));
    let started = tokio::time::Instant::now();
    let counted = c.metrics();
    c.closes().await;
    assert!(started.elapsed() < CLIENT_DRAIN_GRACE, "closed as soon as the response passed");
    let line = counted.lines().find(|l| l.starts_with("requests_total{")).unwrap_or_else(|| panic!("{counted}"));
    assert!(line.ends_with(" 2"), "{line}");
}

#[test]
fn only_final_status_lines_are_told_to_close() {
    assert!(is_final_status_line(b"HTTP/1.1 200 OK\r\n"));
    assert!(is_final_status_line(b"HTTP/1.0 404 Not Found\n"));
    assert!(!is_final_status_line(b"HTTP/1.1 101 Switching Protocols\r\n"));
    assert!(!is_final_status_line(b"HTTP/1.1 100 Continue\r\n"));
    assert!(!is_final_status_line(b"HTTP/2 200\r\n"));
    assert!(!is_final_status_line(b"\r\n"));
}

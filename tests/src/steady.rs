//! Steady traffic held across an event (an agent upgrade): a request rate, new TCP
//! connections arriving all along, and long-lived connections of three kinds (idle,
//! streaming both ways, HTTP/2 with a stream open), each checked end to end. What
//! `mesh-echo steady` runs inside a pod; it prints a [`Report`] as JSON.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::channel::Channel;
use http_body_util::{BodyExt as _, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

/// What to run.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Raw TCP echo servers for the long-lived and the new connections.
    pub tcp: Vec<SocketAddr>,
    /// HTTP server (`GET /` at the rate, `POST /echo` for the HTTP/2 streams).
    pub http: SocketAddr,
    /// Long-lived connections in all: a third idle, a third streaming, a third HTTP/2.
    pub conns: usize,
    /// HTTP/1.1 requests per second, over keep-alive connections.
    pub rps: u64,
    /// New TCP connections per second (each one echo, then closed).
    pub new_per_second: u64,
    /// How long it runs.
    pub seconds: u64,
}

/// What happened, counted per kind. Every failure is also in `errors` (the first 20).
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Report {
    /// Requests answered 200.
    pub requests_ok: u64,
    /// Requests that failed (error or another status).
    pub requests_failed: u64,
    /// The slowest answered request, ms: a stall shows here.
    #[serde(default)]
    pub request_max_ms: u64,
    /// New connections that echoed.
    pub new_conns_ok: u64,
    /// New connections refused, reset or timed out.
    pub new_conns_failed: u64,
    /// The slowest connect of a new connection, ms.
    pub new_conn_max_connect_ms: u64,
    /// Idle connections that still echoed at the end and closed cleanly.
    pub idle_ok: u64,
    /// Streaming connections whose every byte came back, closed cleanly.
    pub streaming_ok: u64,
    /// Bytes echoed by the streaming connections.
    pub streamed_bytes: u64,
    /// HTTP/2 streams held open for the whole run and answered in full.
    pub h2_streams_ok: u64,
    /// Long-lived connections that failed (reset, closed early, bytes wrong).
    pub long_lived_failed: u64,
    /// The first failures, with what they were.
    pub errors: Vec<String>,
}

#[derive(Default)]
struct Tally {
    requests_ok: AtomicU64,
    requests_failed: AtomicU64,
    max_request_ms: AtomicU64,
    new_ok: AtomicU64,
    new_failed: AtomicU64,
    max_connect_ms: AtomicU64,
    idle_ok: AtomicU64,
    streaming_ok: AtomicU64,
    streamed: AtomicU64,
    h2_ok: AtomicU64,
    long_failed: AtomicU64,
    errors: std::sync::Mutex<Vec<String>>,
}

impl Tally {
    fn error(&self, counter: &AtomicU64, what: String) {
        counter.fetch_add(1, Ordering::Relaxed);
        let mut errors = self.errors.lock().unwrap_or_else(|p| p.into_inner());
        if errors.len() < 20 {
            errors.push(what);
        }
    }
}

/// Runs `plan` and reports.
pub async fn run(plan: Plan) -> Report {
    let tally = Arc::new(Tally::default());
    let until = Instant::now() + Duration::from_secs(plan.seconds);
    let mut tasks = tokio::task::JoinSet::new();
    let per_kind = plan.conns / 3;
    for i in 0..per_kind {
        let addr = plan.tcp[i % plan.tcp.len()];
        let t = tally.clone();
        tasks.spawn(async move {
            if let Err(e) = idle(addr, until).await {
                t.error(&t.long_failed, format!("idle {i} to {addr}: {e}"));
            } else {
                t.idle_ok.fetch_add(1, Ordering::Relaxed);
            }
        });
        let t = tally.clone();
        tasks.spawn(async move {
            match streaming(addr, until, i).await {
                Ok(bytes) => {
                    t.streaming_ok.fetch_add(1, Ordering::Relaxed);
                    t.streamed.fetch_add(bytes, Ordering::Relaxed);
                }
                Err(e) => t.error(&t.long_failed, format!("streaming {i} to {addr}: {e}")),
            }
        });
    }
    for i in 0..plan.conns - 2 * per_kind {
        let (t, addr) = (tally.clone(), plan.http);
        tasks.spawn(async move {
            match h2_stream(addr, until).await {
                Ok(()) => drop(t.h2_ok.fetch_add(1, Ordering::Relaxed)),
                Err(e) => t.error(&t.long_failed, format!("h2 stream {i} to {addr}: {e}")),
            }
        });
    }
    // The request rate over sixteen keep-alive connections, each at its share.
    const CLIENTS: u64 = 16;
    for c in 0..CLIENTS {
        let (t, addr) = (tally.clone(), plan.http);
        let every = Duration::from_micros(1_000_000 * CLIENTS / plan.rps.max(1));
        tasks.spawn(requests(addr, every, until, t, c));
    }
    if let Some(micros) = 1_000_000u64.checked_div(plan.new_per_second) {
        let (t, targets) = (tally.clone(), plan.tcp.clone());
        tasks.spawn(new_connections(targets, Duration::from_micros(micros), until, t));
    }
    while tasks.join_next().await.is_some() {}
    let t = &*tally;
    let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
    Report {
        requests_ok: load(&t.requests_ok),
        requests_failed: load(&t.requests_failed),
        request_max_ms: load(&t.max_request_ms),
        new_conns_ok: load(&t.new_ok),
        new_conns_failed: load(&t.new_failed),
        new_conn_max_connect_ms: load(&t.max_connect_ms),
        idle_ok: load(&t.idle_ok),
        streaming_ok: load(&t.streaming_ok),
        streamed_bytes: load(&t.streamed),
        h2_streams_ok: load(&t.h2_ok),
        long_lived_failed: load(&t.long_failed),
        errors: t.errors.lock().unwrap_or_else(|p| p.into_inner()).clone(),
    }
}

/// One echo of `msg` on `s`.
async fn echo(s: &mut TcpStream, msg: &[u8]) -> std::io::Result<()> {
    s.write_all(msg).await?;
    let mut got = vec![0u8; msg.len()];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut got))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "echo timed out"))??;
    if got != msg {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "echo differs"));
    }
    Ok(())
}

/// Half-closes and waits for the server's own close: a reset here is a failure.
async fn close_cleanly(mut s: TcpStream) -> std::io::Result<()> {
    s.shutdown().await?;
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut rest))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "close timed out"))??;
    Ok(())
}

/// Opens, echoes once, stays silent until `until`, echoes again, closes.
async fn idle(addr: SocketAddr, until: Instant) -> std::io::Result<()> {
    let mut s = TcpStream::connect(addr).await?;
    echo(&mut s, b"hello before\n").await?;
    tokio::time::sleep_until(until.into()).await;
    echo(&mut s, b"hello after\n").await?;
    close_cleanly(s).await
}

/// Echoes a 1 KiB chunk every 20 ms until `until`; returns the bytes that came back.
async fn streaming(addr: SocketAddr, until: Instant, seed: usize) -> std::io::Result<u64> {
    let mut s = TcpStream::connect(addr).await?;
    let mut sent = 0u64;
    let mut n = 0usize;
    while Instant::now() < until {
        let chunk: Vec<u8> = (0..1024).map(|j| ((seed * 131 + n * 17 + j) % 251) as u8).collect();
        echo(&mut s, &chunk).await?;
        sent += chunk.len() as u64;
        n += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    close_cleanly(s).await?;
    Ok(sent)
}

/// One HTTP/2 (prior knowledge) connection with one `POST /echo` whose body is sent a
/// chunk every 200 ms until `until`: the stream stays open the whole time, and the
/// answer must carry every byte.
async fn h2_stream(addr: SocketAddr, until: Instant) -> anyhow::Result<()> {
    let stream = TcpStream::connect(addr).await?;
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake::<_, _, Channel<Bytes>>(TokioExecutor::new(), TokioIo::new(stream))
            .await?;
    tokio::spawn(conn);
    let (mut tx, body) = Channel::<Bytes>::new(4);
    let req = http::Request::post(format!("http://{addr}/echo")).body(body)?;
    let response = tokio::spawn(sender.send_request(req));
    let mut sent = 0usize;
    while Instant::now() < until {
        let chunk = Bytes::from(vec![b'x'; 512]);
        sent += chunk.len();
        if tx.send_data(chunk).await.is_err() {
            let why = match response.await {
                Ok(Ok(r)) => format!("answered {} before the body ended", r.status()),
                Ok(Err(e)) => format!("{e:#}"),
                Err(e) => e.to_string(),
            };
            anyhow::bail!("stream closed early: {why}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(tx);
    let response = tokio::time::timeout(Duration::from_secs(10), response).await??.map_err(anyhow::Error::from)?;
    let status = response.status();
    let got = response.into_body().collect().await?.to_bytes();
    anyhow::ensure!(status == 200 && got.len() == sent, "status {status}, {} of {sent} bytes back", got.len());
    Ok(())
}

/// `GET /` every `every` on one keep-alive HTTP/1.1 connection (a new one after a
/// failure) until `until`.
async fn requests(addr: SocketAddr, every: Duration, until: Instant, t: Arc<Tally>, client: u64) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut conn: Option<hyper::client::conn::http1::SendRequest<Empty<Bytes>>> = None;
    while Instant::now() < until {
        tick.tick().await;
        let started = Instant::now();
        let result: anyhow::Result<()> = async {
            if conn.as_ref().is_none_or(|c| c.is_closed()) {
                let stream = TcpStream::connect(addr).await?;
                let (sender, c) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
                tokio::spawn(c);
                conn = Some(sender);
            }
            let sender = conn.as_mut().expect("connected above");
            sender.ready().await?;
            let req = http::Request::get("/").header("host", "myapp").body(Empty::new())?;
            let response = tokio::time::timeout(Duration::from_secs(10), sender.send_request(req)).await??;
            let status = response.status();
            response.into_body().collect().await?;
            anyhow::ensure!(status == 200, "status {status}");
            Ok(())
        }
        .await;
        match result {
            Ok(()) => {
                t.requests_ok.fetch_add(1, Ordering::Relaxed);
                let ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
                t.max_request_ms.fetch_max(ms, Ordering::Relaxed);
            }
            Err(e) => {
                conn = None;
                t.error(&t.requests_failed, format!("request client {client}: {e:#}"));
            }
        }
    }
}

/// A new connection every `every` to each target in turn: connect, one echo, close.
async fn new_connections(targets: Vec<SocketAddr>, every: Duration, until: Instant, t: Arc<Tally>) {
    let mut tick = tokio::time::interval(every);
    let mut n = 0usize;
    let mut running = tokio::task::JoinSet::new();
    while Instant::now() < until {
        tick.tick().await;
        let addr = targets[n % targets.len()];
        n += 1;
        let t = t.clone();
        running.spawn(async move {
            let started = Instant::now();
            let result = async {
                let mut s = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(addr))
                    .await
                    .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
                t.max_connect_ms.fetch_max(started.elapsed().as_millis() as u64, Ordering::Relaxed);
                echo(&mut s, b"new\n").await?;
                close_cleanly(s).await
            }
            .await;
            match result {
                Ok(()) => drop(t.new_ok.fetch_add(1, Ordering::Relaxed)),
                Err(e) => t.error(&t.new_failed, format!("new connection to {addr}: {e}")),
            }
        });
    }
    while running.join_next().await.is_some() {}
}

/// What [`hold`] prints once every connection is open, then once they are closed.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Held {
    /// Connections that echoed (on opening; at the end: echoed again and closed cleanly).
    pub ok: u64,
    /// Connections that failed, with the first few reasons.
    pub failed: u64,
    /// The first failures.
    pub errors: Vec<String>,
}

/// Opens `conns` connections to `addr` (at most 100 connecting at once), each echoing
/// once, and prints a [`Held`] line; holds them until stdin closes (or `seconds` pass),
/// idle, or when `active` each echoing 16 KiB after 16 KiB all along; then echoes once
/// more on each, closes them cleanly and prints another.
pub async fn hold(addr: SocketAddr, conns: usize, seconds: u64, active: bool) -> (Held, Held) {
    let gate = Arc::new(tokio::sync::Semaphore::new(100));
    let mut opening = tokio::task::JoinSet::new();
    for i in 0..conns {
        let gate = gate.clone();
        opening.spawn(async move {
            let _permit = gate.acquire_owned().await.map_err(|e| format!("conn {i}: {e}"))?;
            let mut s = TcpStream::connect(addr).await.map_err(|e| format!("conn {i}: connect: {e}"))?;
            echo(&mut s, b"hi\n").await.map_err(|e| format!("conn {i}: echo: {e}"))?;
            Ok::<_, String>(s)
        });
    }
    let mut open = Vec::with_capacity(conns);
    let mut opened = Held::default();
    while let Some(r) = opening.join_next().await {
        match r {
            Ok(Ok(s)) => {
                open.push(s);
                opened.ok += 1;
            }
            Ok(Err(e)) => note(&mut opened, e),
            Err(e) => note(&mut opened, e.to_string()),
        }
    }
    println!("{}", serde_json::to_string(&opened).unwrap_or_default());
    let stdin_closed = async {
        let mut sink = Vec::new();
        let _ = tokio::io::stdin().read_to_end(&mut sink).await;
    };
    let mut closed = Held::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut busy = tokio::task::JoinSet::new();
    if active {
        for (i, mut s) in std::mem::take(&mut open).into_iter().enumerate() {
            let stop = stop.clone();
            busy.spawn(async move {
                let chunk: Vec<u8> = (0..16 * 1024u32).map(|b| (b % 251) as u8).collect();
                while !stop.load(Ordering::Relaxed) {
                    echo(&mut s, &chunk).await.map_err(|e| format!("conn {i}: echo while active: {e}"))?;
                }
                Ok::<_, String>(s)
            });
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(seconds), stdin_closed).await;
    stop.store(true, Ordering::Relaxed);
    while let Some(r) = busy.join_next().await {
        match r {
            Ok(Ok(s)) => open.push(s),
            Ok(Err(e)) => note(&mut closed, e),
            Err(e) => note(&mut closed, e.to_string()),
        }
    }
    let mut closing = tokio::task::JoinSet::new();
    for (i, mut s) in open.into_iter().enumerate() {
        let gate = gate.clone();
        closing.spawn(async move {
            let _permit = gate.acquire_owned().await.map_err(|e| format!("conn {i}: {e}"))?;
            echo(&mut s, b"bye\n").await.map_err(|e| format!("conn {i}: echo after holding: {e}"))?;
            close_cleanly(s).await.map_err(|e| format!("conn {i}: close: {e}"))
        });
    }
    while let Some(r) = closing.join_next().await {
        match r {
            Ok(Ok(())) => closed.ok += 1,
            Ok(Err(e)) => note(&mut closed, e),
            Err(e) => note(&mut closed, e.to_string()),
        }
    }
    println!("{}", serde_json::to_string(&closed).unwrap_or_default());
    (opened, closed)
}

fn note(held: &mut Held, error: String) {
    held.failed += 1;
    if held.errors.len() < 10 {
        held.errors.push(error);
    }
}

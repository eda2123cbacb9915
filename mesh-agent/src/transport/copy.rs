//! Bidirectional byte copy between two streams, closed when idle.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::dataplane::splice::{self, KernelSplice};
use crate::state::TelemetryPolicy;
use crate::telemetry::access_log::Entry;
use crate::telemetry::{ConnLabels, Direction, Metrics, OpenConn};

mod both_ways;
mod kernel;

pub use kernel::KERNEL_PROGRESS_EVERY;

/// Buffer per direction: one TLS record carries at most 16 KiB of plaintext and an
/// HTTP/2 DATA frame is 16 KiB by default, so a larger buffer only adds memory per
/// connection without fewer syscalls. A direction holds one only while it has bytes to
/// move (`both_ways`), taken from and given back to a few spares per worker thread.
const BUFFER_SIZE: usize = 16 * 1024;

/// Copies both ways until both sides are done; returns bytes `a -> b` and `b -> a`.
/// A side whose writes fail still has what it sent delivered to the other before the
/// copy ends (`both_ways`).
pub async fn bidirectional<A, B>(a: &mut A, b: &mut B) -> std::io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    both_ways::copy_both_ways(a, b, BUFFER_SIZE).await
}

/// Where a spliced connection came from and went, for its access log line, and what
/// the Telemetry API says for the reporting workload.
#[derive(Debug, Clone)]
pub struct Ends {
    /// The reporting workload's Telemetry settings.
    pub policy: Arc<TelemetryPolicy>,
    /// The client's address.
    pub client: SocketAddr,
    /// The address the client dialed.
    pub dialed: SocketAddr,
    /// Where the agent connected it.
    pub upstream: Option<SocketAddr>,
}

/// Splices `client` and `server` and counts the connection in `metrics`: open while the
/// copy runs, bytes as they pass, then closed (and its access log line written). A
/// connection with no byte either way for `idle` is closed. Returns `(request bytes,
/// response bytes)`, i.e. client -> server and server -> client, which Istio reports
/// as received and sent.
///
/// Not an `async fn` (nor is [`counted_until`]): the copy's future is held for as long
/// as the connection lives, and a wrapping `async fn` would add its arguments to it.
pub fn counted<'a, C, S>(
    metrics: &'a Metrics,
    (labels, ends): (&'a ConnLabels, Ends),
    client: &'a mut C,
    server: &'a mut S,
    idle: Duration,
) -> impl Future<Output = std::io::Result<(u64, u64)>> + 'a
where
    C: AsyncRead + AsyncWrite + Unpin + ?Sized,
    S: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    splice_counted(metrics, [(labels, ends)], client, server, idle, None)
}

/// [`counted`], cut short when `stop` is cancelled (the connection is no longer
/// allowed): the copy stops and the caller drops both streams, which closes them. A
/// cut connection is counted closed without byte counts, which the copy does not
/// report half-way.
pub fn counted_until<'a, C, S>(
    metrics: &'a Metrics,
    (labels, ends): (&'a ConnLabels, Ends),
    client: &'a mut C,
    server: &'a mut S,
    idle: Duration,
    stop: &'a CancellationToken,
) -> impl Future<Output = std::io::Result<(u64, u64)>> + 'a
where
    C: AsyncRead + AsyncWrite + Unpin + ?Sized,
    S: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    splice_counted(metrics, [(labels, ends)], client, server, idle, Some(stop))
}

/// [`counted_until`] for two TCP sockets, which the kernel splices when `kernel` is
/// there (and has room): the agent then only watches the connection's ends, passes on
/// each half-close once every byte before it has been handed on, and counts the bytes
/// from the kernel's table every [`KERNEL_PROGRESS_EVERY`]. Otherwise the agent copies.
/// The connection is counted once for each of `observed` (the agent reports a
/// connection between two of its own pods as source and as destination).
///
/// Not an `async fn`, which would keep its arguments twice for the connection's life.
#[expect(clippy::manual_async_fn, reason = "an async fn would hold its arguments twice, as said above")]
pub fn counted_sockets<'a>(
    metrics: &'a Metrics,
    observed: &'a [(&'a ConnLabels, Ends)],
    (client, server): (&'a mut TcpStream, &'a mut TcpStream),
    idle: Duration,
    stop: Option<&'a CancellationToken>,
    kernel: Option<&'a Arc<KernelSplice>>,
) -> impl Future<Output = std::io::Result<(u64, u64)>> + 'a {
    async move {
        // Decided before anything is awaited, so the join's result is not kept beside
        // the copy.
        let joined = match kernel.map(|k| k.join(&*client, &*server)) {
            Some(Ok(joined)) => Some(joined),
            Some(Err(e @ splice::Error::Broken(_))) => return Err(std::io::Error::other(e)),
            Some(Err(e)) => {
                tracing::debug!(error = %e, "copied by the agent");
                None
            }
            None => None,
        };
        let Some(joined) = joined else {
            return splice_counted(metrics, observed, client, server, idle, stop).await;
        };
        metrics.kernel_spliced.inc();
        let open: Vec<OpenConn> = observed.iter().map(|(labels, ends)| metrics.opened(labels, &ends.policy)).collect();
        let (start, started) = (std::time::SystemTime::now(), Instant::now());
        let progress = |[received, sent]: [u64; 2]| {
            for o in &open {
                o.received.inc_by(received);
                o.sent.inc_by(sent);
            }
        };
        let result = kernel::watch_kernel_splice(&joined, [&*client, &*server], idle, stop, progress).await;
        let totals = joined.moved();
        drop(joined);
        close_observed(metrics, observed, open, (start, started.elapsed()), (totals[0], totals[1]));
        result.map(|()| (totals[0], totals[1]))
    }
}

/// Counts a spliced connection closed for each of `observed` and writes its access
/// log lines.
fn close_observed(
    metrics: &Metrics,
    observed: &[(&ConnLabels, Ends)],
    open: Vec<OpenConn>,
    (start, duration): (std::time::SystemTime, Duration),
    bytes: (u64, u64),
) {
    for ((labels, ends), open) in observed.iter().zip(open) {
        metrics.closed(labels, open);
        let source = labels.peers.reporter == "source";
        if let Some(log) = metrics.access_log().filter(|l| l.logs(&ends.policy, source, 0)) {
            log.record(tcp_entry(labels, ends, start, duration, bytes));
        }
    }
}

/// The copy of [`counted`] and [`counted_until`]: one `poll_fn` over the copy's state,
/// the idle timer and the stop signal, not a `select!` of three futures each holding
/// its own references. This is what an idle spliced connection keeps for its life.
///
/// Not an `async fn`, which would keep its arguments twice for the connection's life.
#[expect(clippy::manual_async_fn, reason = "an async fn would hold its arguments twice, as said above")]
fn splice_counted<'a, C, S>(
    metrics: &'a Metrics,
    observed: impl AsRef<[(&'a ConnLabels, Ends)]> + 'a,
    client: &'a mut C,
    server: &'a mut S,
    idle: Duration,
    stop: Option<&'a CancellationToken>,
) -> impl Future<Output = std::io::Result<(u64, u64)>> + 'a
where
    C: AsyncRead + AsyncWrite + Unpin + ?Sized,
    S: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    async move {
        let observed = observed.as_ref();
        let open: Vec<OpenConn> = observed.iter().map(|(labels, ends)| metrics.opened(labels, &ends.policy)).collect();
        let (start, started) = (std::time::SystemTime::now(), Instant::now());
        let mut copy = both_ways::BothWays::new(BUFFER_SIZE);
        // Bytes already added to the series (client -> server, server -> client), and the
        // copy's progress when it last moved.
        let mut counted = [0u64; 2];
        let (mut moved, mut last_active) = (0, started);
        // Re-armed only when it fires: moving bytes costs no timer update.
        let mut idle_timer = std::pin::pin!(tokio::time::sleep(idle));
        let mut stopped = std::pin::pin!(stop.map(CancellationToken::cancelled));
        let result = std::future::poll_fn(|cx| {
            if poll_stopped(stopped.as_mut(), cx).is_ready() {
                return Poll::Ready(Ok((0, 0)));
            }
            let copied = copy.poll(cx, &mut *client, &mut *server);
            let read = copy.read();
            if read != counted {
                for o in &open {
                    o.received.inc_by(read[0] - counted[0]);
                    o.sent.inc_by(read[1] - counted[1]);
                }
                counted = read;
            }
            if copy.moved() != moved {
                (moved, last_active) = (copy.moved(), Instant::now());
            }
            if copied.is_ready() {
                return copied;
            }
            while idle_timer.as_mut().poll(cx).is_ready() {
                let deadline = last_active + idle;
                if Instant::now() >= deadline {
                    let timed_out = std::io::Error::new(std::io::ErrorKind::TimedOut, format!("idle for {idle:?}"));
                    return Poll::Ready(Err(timed_out));
                }
                idle_timer.as_mut().reset(deadline);
            }
            Poll::Pending
        })
        .await;
        close_observed(metrics, observed, open, (start, started.elapsed()), (counted[0], counted[1]));
        result
    }
}

/// Polls a connection's stop signal, pinned where the copy holds it: ready once it is
/// cancelled; a connection without one (None) is never stopped.
fn poll_stopped<F: Future<Output = ()>>(stopped: Pin<&mut Option<F>>, cx: &mut Context<'_>) -> Poll<()> {
    match stopped.as_pin_mut() {
        Some(stop) => stop.poll(cx),
        None => Poll::Pending,
    }
}

/// The access log line of a spliced connection.
fn tcp_entry(
    labels: &ConnLabels,
    ends: &Ends,
    start: std::time::SystemTime,
    duration: Duration,
    (received, sent): (u64, u64),
) -> Entry {
    let peers = &labels.peers;
    let port = ends.dialed.port();
    let upstream_cluster = match labels.direction {
        Direction::Outbound => format!("outbound|{port}||{}", peers.service.destination_service),
        Direction::Inbound => format!("inbound|{port}||"),
    };
    let principal = |p: &str| (p != "unknown").then(|| p.to_string());
    Entry {
        start,
        reporter: peers.reporter,
        request: None,
        response_code: 0,
        response_flags: labels.response_flags.into(),
        response_code_details: String::new(),
        bytes_received: Some(received),
        bytes_sent: sent,
        duration,
        upstream_host: ends.upstream,
        upstream_cluster,
        downstream_local: ends.dialed,
        downstream_remote: ends.client,
        source_principal: principal(&peers.source.0.principal),
        destination_principal: principal(&peers.destination.0.principal),
    }
}

/// A client stream whose bytes count into a connection's TCP series as they pass: read
/// from the client is `received`, written to it is `sent` (Istio's directions). For
/// connections the agent serves itself (HTTP read request by request) rather than
/// splices.
pub struct Counted<S> {
    inner: S,
    received: Counter,
    sent: Counter,
}

impl<S> Counted<S> {
    /// Counts `inner`'s traffic into `open`'s series.
    pub fn new(inner: S, open: &crate::telemetry::OpenConn) -> Self {
        Self { inner, received: open.received.clone(), sent: open.sent.clone() }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            self.received.inc_by(n as u64);
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            self.sent.inc_by(n as u64);
        }
        r
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = r {
            self.sent.inc_by(n as u64);
        }
        r
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    fn labels() -> ConnLabels {
        let w = crate::state::Workload::outside("a", "n", "10.0.0.1".parse().unwrap(), "cluster.local");
        ConnLabels::outbound(&w, None, crate::telemetry::ServiceLabels::unknown(), false)
    }

    /// A connection on loopback as the agent holds one: the client's socket accepted
    /// (`agent_side` of `client`) and the agent's own to the server (`server`'s
    /// accepted end is `app`).
    async fn proxied_pair() -> [TcpStream; 4] {
        let front = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let back = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(front.local_addr().unwrap()).await.unwrap();
        let (agent_side, _) = front.accept().await.unwrap();
        let server = TcpStream::connect(back.local_addr().unwrap()).await.unwrap();
        let (app, _) = back.accept().await.unwrap();
        [client, agent_side, server, app]
    }

    /// Splices the agent's two sockets of a test connection through `kernel`.
    async fn kernel_spliced(
        metrics: &Metrics,
        kernel: &Arc<KernelSplice>,
        sockets: (&mut TcpStream, &mut TcpStream),
    ) -> std::io::Result<(u64, u64)> {
        let a = SocketAddr::from(([127, 0, 0, 1], 1));
        let ends = Ends { policy: Arc::default(), client: a, dialed: a, upstream: None };
        counted_sockets(metrics, &[(&labels(), ends)], sockets, Duration::from_secs(30), None, Some(kernel)).await
    }

    #[tokio::test]
    async fn the_kernel_passes_bytes_on_in_order_and_each_half_close_after_them() {
        let Some((kernel, _pins)) = crate::dataplane::test_kernel_splice() else { return };
        let metrics = Arc::new(Metrics::default());
        let [mut client, mut agent_side, mut server, mut app] = proxied_pair().await;
        // Sent before the splice starts: waits in the agent's socket, handed on at join.
        client.write_all(b"hello").await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        let (m, k) = (metrics.clone(), kernel.clone());
        let splice = tokio::spawn(async move { kernel_spliced(&m, &k, (&mut agent_side, &mut server)).await });
        let mut hello = [0u8; 5];
        app.read_exact(&mut hello).await.unwrap();
        assert_eq!(&hello, b"hello", "bytes queued before the splice are passed on");
        assert_eq!(metrics.kernel_spliced.get(), 1, "spliced in the kernel, not copied");
        // Bulk, in order (well past the kernel's window: held back and written on by
        // the agent, then handed to the kernel again, many times), then the client's
        // half-close after its last byte.
        let bulk: Vec<u8> = (0..16 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
        let sent = bulk.clone();
        let writer = tokio::spawn(async move {
            client.write_all(&sent).await.unwrap();
            client.shutdown().await.unwrap();
            client
        });
        let mut got = Vec::new();
        app.read_to_end(&mut got).await.unwrap();
        assert!(got == bulk, "16 MiB arrive whole and in order, then the end of the stream");
        let mut client = writer.await.unwrap();
        // The answer after the half-close, then the server's own.
        app.write_all(b"bye").await.unwrap();
        app.shutdown().await.unwrap();
        let mut answer = Vec::new();
        client.read_to_end(&mut answer).await.unwrap();
        assert_eq!(answer, b"bye");
        let (request, response) = splice.await.unwrap().unwrap();
        assert_eq!((request, response), (5 + bulk.len() as u64, 3), "bytes counted by the kernel");
        let tables_empty = crate::dataplane::test_splice_is_empty(&kernel);
        assert!(tables_empty, "both sockets and their entries left the tables");
    }

    /// The kernel charges bytes it has taken but not yet written into the peer to
    /// the receiving socket and sends no window update when it lets go of them: a
    /// spliced socket's window must stay open past the allowance, or a one-shot
    /// transfer stalls on its sender's zero-window probe (200 ms or more; criterion
    /// `socket_splice_transfer_4m` showed 98 ms on average).
    #[tokio::test]
    async fn a_spliced_socket_receives_past_the_kernels_allowance() {
        let Some((kernel, _pins)) = crate::dataplane::test_kernel_splice() else { return };
        let [_client, agent_side, server, _app] = proxied_pair().await;
        let joined = kernel.join(&agent_side, &server).unwrap();
        for socket in [&agent_side, &server] {
            let buffer = socket2::SockRef::from(socket).recv_buffer_size().unwrap() as u64;
            assert!(buffer > splice::WINDOW, "receive buffer {buffer} not past the allowance");
        }
        drop(joined);
    }

    /// A server that stops reading pushes back on its client through the kernel
    /// splice as through the agent's copy: what is in flight stays bounded by the
    /// sockets' buffers, so no client makes the node hold its bytes without bound.
    #[tokio::test]
    async fn a_server_that_stops_reading_holds_its_client_back() {
        let Some((kernel, _pins)) = crate::dataplane::test_kernel_splice() else { return };
        let metrics = Metrics::default();
        let [mut client, mut agent_side, mut server, app] = proxied_pair().await;
        let splice = async { kernel_spliced(&metrics, &kernel, (&mut agent_side, &mut server)).await };
        let flood = async {
            let chunk = vec![7u8; 64 * 1024];
            let mut written = 0usize;
            let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
            while written < 512 * 1024 * 1024 {
                match tokio::time::timeout_at(deadline, client.write(&chunk)).await {
                    Ok(Ok(n)) => written += n,
                    Ok(Err(e)) => panic!("write failed: {e}"),
                    Err(_) => break,
                }
            }
            written
        };
        let written = tokio::select! {
            r = splice => panic!("the splice ended: {r:?}"),
            w = flood => w,
        };
        eprintln!("written before the client was held back: {written} bytes");
        assert!(written < 64 * 1024 * 1024, "{written} bytes taken from a client whose server reads nothing");
        drop(app);
    }

    /// A client that has sent everything and half-closed before the agent joins its
    /// connection (the kernel refuses a closing socket): the agent copies it, every
    /// byte and the half-close through, and the answer back.
    #[tokio::test]
    async fn a_client_done_before_the_splice_is_copied_by_the_agent() {
        let Some((kernel, _pins)) = crate::dataplane::test_kernel_splice() else { return };
        let metrics = Metrics::default();
        let [mut client, mut agent_side, mut server, mut app] = proxied_pair().await;
        client.write_all(&[5u8; 4096]).await.unwrap();
        client.shutdown().await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        let splice = async { kernel_spliced(&metrics, &kernel, (&mut agent_side, &mut server)).await };
        let echo = async {
            let mut got = Vec::new();
            app.read_to_end(&mut got).await.unwrap();
            app.write_all(&got).await.unwrap();
            app.shutdown().await.unwrap();
            let mut back = Vec::new();
            client.read_to_end(&mut back).await.unwrap();
            (got.len(), back.len())
        };
        let (spliced, echoed) =
            tokio::time::timeout(Duration::from_secs(10), async { tokio::join!(splice, echo) }).await.expect("no hang");
        assert_eq!(echoed, (4096, 4096));
        assert_eq!(spliced.unwrap(), (4096, 4096));
        assert_eq!(metrics.kernel_spliced.get(), 0, "copied by the agent");
    }

    /// Short exchanges whose clients half-close while the agent joins them (before,
    /// during or after): every one completes, spliced or copied.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn short_connections_racing_their_close_all_complete() {
        let Some((kernel, _pins)) = crate::dataplane::test_kernel_splice() else { return };
        let metrics = Arc::new(Metrics::default());
        let mut runs = Vec::new();
        for i in 0..200u64 {
            let (metrics, kernel) = (metrics.clone(), kernel.clone());
            runs.push(tokio::spawn(async move {
                let [mut client, mut agent_side, mut server, mut app] = proxied_pair().await;
                let sending = tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_micros((200 - i) * 10)).await;
                    client.write_all(&[3u8; 4096]).await.unwrap();
                    client.shutdown().await.unwrap();
                    let mut back = Vec::new();
                    let read = tokio::time::timeout(Duration::from_secs(20), client.read_to_end(&mut back)).await;
                    read.map(|_| back.len()).unwrap_or(0)
                });
                tokio::time::sleep(Duration::from_micros(i * 10)).await;
                let echoing = tokio::spawn(async move {
                    let mut got = Vec::new();
                    let read = tokio::time::timeout(Duration::from_secs(20), app.read_to_end(&mut got)).await;
                    app.write_all(&got).await.unwrap();
                    app.shutdown().await.unwrap();
                    read.map(|_| got.len()).unwrap_or(0)
                });
                let spliced = kernel_spliced(&metrics, &kernel, (&mut agent_side, &mut server));
                let spliced = tokio::time::timeout(Duration::from_secs(10), spliced).await;
                drop((agent_side, server));
                (i, spliced.map(|r| r.map_err(|e| e.to_string())), echoing.await.unwrap(), sending.await.unwrap())
            }));
        }
        for run in runs {
            let (i, spliced, echoed, back) = run.await.unwrap();
            assert_eq!(spliced, Ok(Ok((4096, 4096))), "connection {i}");
            assert_eq!((echoed, back), (4096, 4096), "connection {i}");
        }
        eprintln!("spliced in the kernel: {} of 200", metrics.kernel_spliced.get());
    }

    #[tokio::test]
    async fn a_reset_ends_a_kernel_splice() {
        let Some((kernel, _pins)) = crate::dataplane::test_kernel_splice() else { return };
        let metrics = Metrics::default();
        let [client, mut agent_side, mut server, mut app] = proxied_pair().await;
        let splice = async { kernel_spliced(&metrics, &kernel, (&mut agent_side, &mut server)).await };
        let reset = async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            client.set_linger(Some(Duration::ZERO)).unwrap();
            drop(client);
        };
        let (result, ()) = tokio::time::timeout(Duration::from_secs(10), async { tokio::join!(splice, reset) })
            .await
            .expect("a reset ends the splice");
        assert!(result.is_err(), "ended by the reset: {result:?}");
        drop((agent_side, server));
        let mut rest = Vec::new();
        let _ = app.read_to_end(&mut rest).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_quiet_connection_is_closed_and_a_busy_one_is_not() {
        let metrics = Metrics::default();
        let (mut client, mut client_far) = tokio::io::duplex(1024);
        let (mut server, mut server_far) = tokio::io::duplex(1024);
        let idle = Duration::from_secs(60);
        let splice = tokio::spawn(async move {
            let m = metrics;
            let a = SocketAddr::from(([127, 0, 0, 1], 1));
            let ends = Ends { policy: Arc::default(), client: a, dialed: a, upstream: None };
            counted(&m, (&labels(), ends), &mut client, &mut server, idle).await
        });
        // Busy for three minutes, a byte every 30 s: still open.
        for _ in 0..6 {
            tokio::time::sleep(Duration::from_secs(30)).await;
            client_far.write_all(b"x").await.unwrap();
            let mut b = [0u8; 1];
            server_far.read_exact(&mut b).await.unwrap();
        }
        assert!(!splice.is_finished(), "a connection that moves bytes stays open");
        // Then quiet: closed after the idle timeout.
        tokio::time::sleep(Duration::from_secs(61)).await;
        let r = splice.await.unwrap();
        assert_eq!(r.unwrap_err().kind(), std::io::ErrorKind::TimedOut);
    }
}

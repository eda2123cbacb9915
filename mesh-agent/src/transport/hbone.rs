//! The HBONE wire at both ends: HTTP/2 CONNECT streams spoken with `h2` directly.
//!
//! hyper hands the bytes of an upgraded CONNECT stream to a task of its own: each
//! write is copied into a channel, and that task moves it into h2, which wakes the
//! connection's task. So every request through a tunnel woke three tasks at the end
//! that wrote it, and allocated once per write. [`H2Stream`] writes into h2's send
//! stream from the task that copies (and reads from its receive stream there too):
//! the connection's own task is the only other one a byte wakes. At the server end
//! [`serve`] decides each CONNECT and then serves the stream it accepted in one task,
//! where hyper ran the decision and the stream in two. ztunnel speaks h2 directly for
//! the same reason; the wire is the same (RFC 9113 §8.5 CONNECT: `:method` and
//! `:authority` only).
//!
//! Liveness is the kernel's (TCP keepalive and `TCP_USER_TIMEOUT` on the socket,
//! [`super::sockets::watch_liveness`]): neither end sends HTTP/2 pings.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use h2::{Reason, RecvStream, SendStream};
use http::{Request, Response, StatusCode};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::HANDSHAKE_TIMEOUT;

/// Most bytes one write hands to h2 (four TLS records' worth of DATA frames): what a
/// stream may queue beyond its send buffer. A larger write is taken in parts.
const MOST_PER_WRITE: usize = 64 * 1024;

/// One CONNECT stream as a byte stream: what the peer sends is read, what is written
/// goes out as DATA frames, shutdown ends the stream (END_STREAM). Dropped before
/// that, the stream is reset (CANCEL).
#[derive(Debug)]
pub struct H2Stream {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// A frame's bytes not read yet.
    unread: Bytes,
    /// Whether END_STREAM went out.
    ended: bool,
}

impl H2Stream {
    /// The stream whose halves are `send` and `recv`.
    pub fn new(send: SendStream<Bytes>, recv: RecvStream) -> Self {
        Self { send, recv, unread: Bytes::new(), ended: false }
    }
}

/// An h2 error as the I/O error a copy reports: a peer's reset or GOAWAY meaning "done"
/// (NO_ERROR, CANCEL) is an end, anything else a broken connection.
fn io_error(e: h2::Error) -> io::Error {
    if e.is_io() {
        return e.into_io().unwrap_or_else(|| io::ErrorKind::BrokenPipe.into());
    }
    match e.reason() {
        Some(Reason::STREAM_CLOSED) => io::Error::new(io::ErrorKind::BrokenPipe, e),
        Some(Reason::REFUSED_STREAM | Reason::CANCEL) => io::Error::new(io::ErrorKind::ConnectionReset, e),
        _ => io::Error::other(e),
    }
}

impl AsyncRead for H2Stream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        while self.unread.is_empty() {
            match ready!(self.recv.poll_data(cx)) {
                None => return Poll::Ready(Ok(())),
                Some(Ok(data)) => self.unread = data,
                Some(Err(e)) => {
                    return Poll::Ready(match e.reason() {
                        Some(Reason::NO_ERROR | Reason::CANCEL) => Ok(()),
                        _ => Err(io_error(e)),
                    });
                }
            }
        }
        let n = self.unread.len().min(buf.remaining());
        buf.put_slice(&self.unread[..n]);
        self.unread.advance(n);
        if self.unread.is_empty() {
            // A frame's bytes share the connection's read buffer: an idle stream that
            // kept an empty slice of it would keep the whole buffer.
            self.unread = Bytes::new();
        }
        // The window opens as the bytes leave, so the peer can send no more than the
        // stream's window ahead of what this end has passed on.
        let _ = self.recv.flow_control().release_capacity(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for H2Stream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[io::IoSlice::new(buf)])
    }

    /// All the slices in one DATA frame as far as the stream's window takes them (an
    /// HTTP/1 client's head and body chunk, not a frame each).
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        if total == 0 {
            return Poll::Ready(Ok(0));
        }
        let n = total.min(MOST_PER_WRITE);
        self.send.reserve_capacity(n);
        // `poll_capacity` is ready only when capacity was added since it last was, so
        // capacity left over from an earlier write is taken as it is.
        while self.send.capacity() == 0 {
            match ready!(self.send.poll_capacity(cx)) {
                Some(Ok(_)) => {}
                Some(Err(e)) => return Poll::Ready(Err(io_error(e))),
                None => return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
            }
        }
        // The whole write goes on once there is any room, as hyper's stream task sent
        // it: h2 sends it as the windows open, and the stream holds at most its send
        // buffer plus this one write. Cut to the room there is, a bulk transfer's
        // writes would go in pieces, each waiting for the connection's task to drain
        // the one before.
        let mut data = BytesMut::with_capacity(n);
        for b in bufs {
            let room = n - data.len();
            if room == 0 {
                break;
            }
            data.extend_from_slice(&b[..b.len().min(room)]);
        }
        self.send.send_data(data.freeze(), false).map_err(io_error)?;
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // The connection's task writes what the stream queued as soon as it runs.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.ended {
            self.ended = true;
            // Already closed by the peer's reset: nothing left to end.
            if let Err(e) = self.send.send_data(Bytes::new(), true)
                && e.reason() != Some(Reason::NO_ERROR)
                && !e.is_reset()
            {
                return Poll::Ready(Err(io_error(e)));
            }
        }
        Poll::Ready(Ok(()))
    }
}

/// An answer to a CONNECT with `code` and no body.
pub fn status(code: StatusCode) -> Response<()> {
    let mut r = Response::new(());
    *r.status_mut() = code;
    r
}

/// What serves a CONNECT stream once it is accepted: what the decision found (the
/// application's socket, the verdict, the permit), and nothing of the decision's steps.
pub trait ServeStream: Send + 'static {
    /// Serves `stream` until it ends.
    fn serve(self, stream: H2Stream) -> impl Future<Output = ()> + Send + 'static;
}

/// How a CONNECT is answered: accepted and served by `S` (given the stream once the
/// 200 is sent), or refused with a status.
pub enum Answer<S> {
    /// 200, then `S` serves the stream.
    Accept(S),
    /// This status; the stream ends with it.
    Refuse(StatusCode),
}

/// Why an HBONE connection ended.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The client did not finish the HTTP/2 preface in time.
    #[error("no HTTP/2 preface within {0:?}")]
    Preface(std::time::Duration),
    /// HTTP/2 failed (a protocol error, the connection's I/O).
    #[error(transparent)]
    H2(#[from] h2::Error),
}

impl ServeError {
    /// The proxy's error for a connection from `peer` that ended so.
    pub fn at(self, peer: std::net::SocketAddr) -> super::Error {
        match self {
            ServeError::Preface(after) => super::Error::Timeout { what: "HTTP/2 preface from", addr: peer, after },
            ServeError::H2(source) => super::Error::Http { addr: peer, source },
        }
    }
}

/// Serves the CONNECT streams of one HBONE connection over `io` (TLS already done)
/// until the client closes it, or, once `shutdown` is cancelled, until the streams in
/// flight are done (GOAWAY: the client opens new ones elsewhere). `decide` sees each
/// stream's request head; each stream, decided and served, is one task on `tasks`.
/// A stream the client resets while it is being decided is dropped there.
pub async fn serve<Io, D, Fut, S>(
    io: Io,
    shutdown: &CancellationToken,
    tasks: &TaskTracker,
    decide: D,
) -> Result<(), ServeError>
where
    Io: AsyncRead + AsyncWrite + Unpin,
    D: Fn(Request<()>) -> Fut,
    Fut: Future<Output = Answer<S>> + Send + 'static,
    S: ServeStream,
{
    let handshake = super::limits::hbone_server().handshake::<_, Bytes>(io);
    let mut conn = match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
        Ok(conn) => conn?,
        Err(_) => return Err(ServeError::Preface(HANDSHAKE_TIMEOUT)),
    };
    let mut draining = false;
    loop {
        let accepted = tokio::select! {
            accepted = conn.accept() => accepted,
            () = shutdown.cancelled(), if !draining => {
                draining = true;
                conn.graceful_shutdown();
                continue;
            }
        };
        let Some(accepted) = accepted else { return Ok(()) };
        let (request, mut respond) = accepted?;
        let (head, recv) = request.into_parts();
        // Boxed: the stream's task, held while the stream lives, is sized for serving
        // it, not for the decision's steps.
        let deciding = Box::pin(decide(Request::from_parts(head, ())));
        tasks.spawn(async move {
            let reset = std::future::poll_fn(|cx| respond.poll_reset(cx));
            let answer = tokio::select! {
                answer = deciding => answer,
                _ = reset => return,
            };
            let serving = match answer {
                Answer::Refuse(code) => {
                    let _ = respond.send_response(status(code), true);
                    return;
                }
                Answer::Accept(serving) => serving,
            };
            let sent = respond.send_response(status(StatusCode::OK), false);
            // Not held while the stream is served: its halves keep it open.
            drop(respond);
            match sent {
                Ok(send) => serving.serve(H2Stream::new(send, recv)).await,
                Err(e) => tracing::debug!(error = %e, "CONNECT stream gone before its answer"),
            }
        });
    }
}

/// A CONNECT for `authority` on `sender`: the answer's status and the stream (tests
/// that speak to an HBONE server as a client other than the pool, with any authority).
#[cfg(test)]
pub(crate) async fn connect_for_test(
    sender: &h2::client::SendRequest<Bytes>,
    authority: &str,
) -> Result<(StatusCode, H2Stream), h2::Error> {
    let mut ready = sender.clone().ready().await?;
    let req = Request::builder().method(http::Method::CONNECT).uri(authority).body(()).expect("a CONNECT request");
    let (answer, send) = ready.send_request(req, false)?;
    let res = answer.await?;
    Ok((res.status(), H2Stream::new(send, res.into_body())))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use bytes::Bytes;
    use http::{Request, StatusCode};
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _, DuplexStream};
    use tokio_util::sync::CancellationToken;
    use tokio_util::task::TaskTracker;

    use super::{Answer, H2Stream, ServeStream, connect_for_test as connect, serve};

    /// Sends back what it reads, then ends its side.
    struct Echo;

    impl ServeStream for Echo {
        async fn serve(self, stream: H2Stream) {
            let (mut read, mut write) = tokio::io::split(stream);
            tokio::io::copy(&mut read, &mut write).await.expect("echo");
            write.shutdown().await.expect("end of stream");
        }
    }

    /// A server on one end of an in-memory connection that echoes CONNECTs to port 80
    /// and refuses the rest with 403, and an HBONE client on the other end.
    async fn connection(shutdown: &CancellationToken) -> (h2::client::SendRequest<Bytes>, tokio::task::JoinHandle<()>) {
        let (client_end, server_end): (DuplexStream, DuplexStream) = tokio::io::duplex(64 * 1024);
        let shutdown = shutdown.clone();
        let server = tokio::spawn(async move {
            let decide = |req: Request<()>| {
                let port = req.uri().authority().and_then(|a| a.port_u16());
                std::future::ready(if port == Some(80) {
                    Answer::Accept(Echo)
                } else {
                    Answer::Refuse(StatusCode::FORBIDDEN)
                })
            };
            let tasks = TaskTracker::new();
            serve(server_end, &shutdown, &tasks, decide).await.expect("served to its end");
        });
        let (sender, conn) = crate::transport::limits::hbone_client().handshake(client_end).await.unwrap();
        tokio::spawn(conn);
        (sender, server)
    }

    #[tokio::test]
    async fn a_stream_carries_bytes_both_ways_past_its_windows_and_ends_with_the_writer() {
        let shutdown = CancellationToken::new();
        let (sender, _server) = connection(&shutdown).await;
        let (status, stream) = connect(&sender, "10.0.0.1:80").await.unwrap();
        assert_eq!(status, 200);
        // Four times the connection's window, so both ends wait on flow control.
        let sent: Vec<u8> = (0..8 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
        let (mut read, mut write) = tokio::io::split(stream);
        let writer = {
            let sent = sent.clone();
            tokio::spawn(async move {
                write.write_all(&sent).await.unwrap();
                write.shutdown().await.unwrap();
            })
        };
        let mut echoed = Vec::new();
        tokio::time::timeout(Duration::from_secs(20), read.read_to_end(&mut echoed)).await.unwrap().unwrap();
        writer.await.unwrap();
        assert!(echoed == sent, "every byte back, in order ({} of {})", echoed.len(), sent.len());
    }

    #[tokio::test]
    async fn a_refused_connect_is_answered_with_its_status_and_the_connection_serves_on() {
        let shutdown = CancellationToken::new();
        let (sender, _server) = connection(&shutdown).await;
        assert_eq!(connect(&sender, "10.0.0.1:22").await.unwrap().0, 403);
        let (status, mut stream) = connect(&sender, "10.0.0.1:80").await.unwrap();
        assert_eq!(status, 200, "a refused stream leaves the connection to the next");
        stream.write_all(b"ping").await.unwrap();
        let mut back = [0u8; 4];
        stream.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"ping");
    }

    #[tokio::test]
    async fn a_draining_server_says_goaway_finishes_the_streams_in_flight_then_ends() {
        let shutdown = CancellationToken::new();
        let (sender, server) = connection(&shutdown).await;
        let (_, mut open) = connect(&sender, "10.0.0.1:80").await.unwrap();
        shutdown.cancel();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let refused = connect(&sender, "10.0.0.1:80").await;
        assert!(refused.is_err_and(|e| e.is_go_away() && e.is_remote()), "no new stream past the GOAWAY");
        open.write_all(b"still here").await.unwrap();
        let mut back = [0u8; 10];
        open.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"still here", "the stream in flight is served on");
        assert!(!server.is_finished(), "the connection stays while a stream is open");
        open.shutdown().await.unwrap();
        let mut rest = Vec::new();
        open.read_to_end(&mut rest).await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), server).await.expect("ends once its streams are done").unwrap();
    }
}

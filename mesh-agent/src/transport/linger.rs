//! A stream closed as a TCP connection is: when its user lets go of it before the peer
//! has ended its side, the stream's end is sent and the peer's awaited, for a bounded
//! time, by a task of its own.
//!
//! Why: hyper drops a connection's stream as soon as its last response is written. On an
//! HBONE stream whose peer has not sent its end yet (the client's half-close is on its
//! way), dropping it resets the stream, and the peer's end of stream then arrives for a
//! stream HTTP/2 has forgotten: another reset, which h2 counts against the connection's
//! limit of resets caused by the peer. At 1,000 new connections a second that limit
//! closed the whole tunnel (GOAWAY `ENHANCE_YOUR_CALM`) every ten seconds, and the
//! streams open on it failed.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, ReadBuf};

/// How long a let-go stream waits for the peer's end before it is dropped anyway.
pub const LINGER: Duration = Duration::from_secs(2);

/// `S`, lingering at drop until the peer has ended its side (at most [`LINGER`]).
#[derive(Debug)]
pub struct Lingering<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    inner: Option<S>,
    /// The peer's end was read, or the stream is not to linger: dropped at once.
    ended: bool,
}

impl<S> Lingering<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    /// Wraps `inner`, which lingers when `linger` (else it is dropped as it would be).
    ///
    /// Only streams whose count the caller's limits keep should linger: a lingering
    /// stream has left the connection caps (its task is over), so a client able to
    /// end connections faster than they linger would otherwise hold without bound. An
    /// HBONE stream stays counted by its HTTP/2 connection's stream limit, and the
    /// connection by the per-source cap; a plain TCP socket would not.
    pub fn new(inner: S, linger: bool) -> Self {
        Self { inner: Some(inner), ended: !linger }
    }

    fn inner(&mut self) -> &mut S {
        self.inner.as_mut().expect("only taken at drop")
    }
}

impl<S> AsyncRead for Lingering<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(self.inner()).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled
            && buf.filled().len() == before
            && buf.remaining() > 0
        {
            self.ended = true;
        }
        polled
    }
}

impl<S> AsyncWrite for Lingering<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(self.inner()).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(self.inner()).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.as_ref().is_some_and(|s| s.is_write_vectored())
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(self.inner()).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(self.inner()).poll_shutdown(cx)
    }
}

impl<S> Drop for Lingering<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    fn drop(&mut self) {
        let Some(mut inner) = self.inner.take() else { return };
        if self.ended {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        // Bounded in time and in memory (one small buffer, what is read is discarded):
        // a peer that keeps sending is cut off at LINGER as before.
        runtime.spawn(async move {
            let _ = tokio::time::timeout(LINGER, async {
                let _ = inner.shutdown().await;
                let mut discard = [0u8; 512];
                while let Ok(n) = inner.read(&mut discard).await
                    && n > 0
                {}
            })
            .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    #[tokio::test]
    async fn a_stream_let_go_early_sends_its_end_and_waits_for_the_peers() {
        let (ours, mut peer) = tokio::io::duplex(1024);
        drop(Lingering::new(ours, true));
        // Our end arrives although the stream was dropped, not shut down, by its user.
        let mut got = Vec::new();
        peer.read_to_end(&mut got).await.unwrap();
        assert!(got.is_empty());
        // The lingering side still reads: the peer's late bytes and end are taken.
        peer.write_all(b"late").await.unwrap();
        peer.shutdown().await.unwrap();
    }

    #[tokio::test]
    async fn a_peer_that_never_ends_is_let_go_after_the_linger() {
        let (ours, peer) = tokio::io::duplex(1024);
        let started = Instant::now();
        drop(Lingering::new(ours, true));
        // The lingering task holds our end; once it gives up, the peer sees it closed.
        let mut peer = peer;
        let mut buf = [0u8; 8];
        assert_eq!(peer.read(&mut buf).await.unwrap(), 0, "our end of stream");
        let closed = tokio::time::timeout(LINGER * 3, async {
            while peer.write_all(b"x").await.is_ok() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        assert!(closed.is_ok(), "dropped once the linger is over");
        assert!(started.elapsed() >= LINGER);
    }

    #[tokio::test]
    async fn a_stream_not_to_linger_is_dropped_at_once() {
        let (ours, mut peer) = tokio::io::duplex(1024);
        drop(Lingering::new(ours, false));
        assert!(peer.write_all(b"x").await.is_err(), "closed, not lingering");
    }

    #[tokio::test]
    async fn a_stream_whose_peer_ended_is_dropped_at_once() {
        let (ours, mut peer) = tokio::io::duplex(1024);
        let mut ours = Lingering::new(ours, true);
        peer.shutdown().await.unwrap();
        let mut buf = [0u8; 8];
        assert_eq!(ours.read(&mut buf).await.unwrap(), 0);
        drop(ours);
        assert!(peer.write_all(b"x").await.is_err(), "closed, not lingering");
    }
}

//! A stream whose first bytes were read to detect its protocol and are replayed before
//! the rest, for streams that cannot be peeked (an HBONE tunnel).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, ReadBuf};

/// `inner` with `prefix` in front of its bytes.
#[derive(Debug)]
pub struct Prefixed<S> {
    prefix: Vec<u8>,
    pos: usize,
    inner: S,
}

impl<S> Prefixed<S> {
    /// Replays `prefix`, then reads `inner`.
    pub fn new(prefix: Vec<u8>, inner: S) -> Self {
        Self { prefix, pos: 0, inner }
    }

    /// The bytes read ahead.
    pub fn prefix(&self) -> &[u8] {
        &self.prefix
    }
}

/// Reads the first bytes of `s` until they tell HTTP from anything else
/// ([`crate::l7::detect_http`]), `timeout` passes (a server-first protocol says nothing
/// until the server speaks) or the peer stops sending.
pub async fn read_first<S: AsyncRead + Unpin>(s: &mut S, timeout: Duration) -> io::Result<Vec<u8>> {
    let mut first = Vec::with_capacity(64);
    let mut buf = [0u8; 64];
    let deadline = tokio::time::Instant::now() + timeout;
    while crate::l7::detect_http(&first).is_none() {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(0)) | Err(_) => break,
            Ok(Ok(n)) => first.extend_from_slice(&buf[..n]),
            Ok(Err(e)) => return Err(e),
        }
    }
    Ok(first)
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if self.pos < self.prefix.len() {
            let n = buf.remaining().min(self.prefix.len() - self.pos);
            let start = self.pos;
            buf.put_slice(&self.prefix[start..start + n]);
            self.pos += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    #[tokio::test]
    async fn read_ahead_bytes_come_back_first_and_silence_ends_detection() {
        let (mut a, mut b) = tokio::io::duplex(1024);
        a.write_all(b"GET /x HTTP/1.1\r\n\r\n").await.unwrap();
        let first = read_first(&mut b, Duration::from_secs(5)).await.unwrap();
        assert!(crate::l7::looks_like_http(&first));
        let mut p = Prefixed::new(first, b);
        let mut all = vec![0u8; 19];
        p.read_exact(&mut all).await.unwrap();
        assert_eq!(&all, b"GET /x HTTP/1.1\r\n\r\n");

        let (_quiet, mut server_first) = tokio::io::duplex(64);
        let started = std::time::Instant::now();
        assert!(read_first(&mut server_first, Duration::from_millis(100)).await.unwrap().is_empty());
        assert!(started.elapsed() < Duration::from_secs(2));
    }
}

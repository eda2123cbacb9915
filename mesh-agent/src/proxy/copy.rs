//! Bidirectional byte copy between two streams.

use tokio::io::{AsyncRead, AsyncWrite};

/// Buffer per direction: one TLS record carries at most 16 KiB of plaintext and an
/// HTTP/2 DATA frame is 16 KiB by default, so a larger buffer only adds memory per
/// connection without fewer syscalls. The buffers are allocated once per connection,
/// never per chunk.
const BUFFER_SIZE: usize = 16 * 1024;

/// Copies both ways until both sides are done; returns bytes `a -> b` and `b -> a`.
pub async fn bidirectional<A, B>(a: &mut A, b: &mut B) -> std::io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    tokio::io::copy_bidirectional_with_sizes(a, b, BUFFER_SIZE, BUFFER_SIZE).await
}

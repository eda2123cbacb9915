//! Bidirectional byte copy between two streams.

use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;

use crate::telemetry::{ConnLabels, Metrics};

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

/// Splices `client` and `server` and counts the connection in `metrics`: open while the
/// copy runs, then closed with its bytes. Returns `(request bytes, response bytes)`,
/// i.e. client -> server and server -> client, which Istio reports as received and sent.
pub async fn counted<C, S>(
    metrics: &Metrics,
    labels: &ConnLabels,
    client: &mut C,
    server: &mut S,
) -> std::io::Result<(u64, u64)>
where
    C: AsyncRead + AsyncWrite + Unpin + ?Sized,
    S: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    splice_counted(metrics, labels, client, server, None).await
}

/// [`counted`], cut short when `stop` is cancelled (the connection is no longer
/// allowed): the copy stops and the caller drops both streams, which closes them. A
/// cut connection is counted closed without byte counts, which the copy does not
/// report half-way.
pub async fn counted_until<C, S>(
    metrics: &Metrics,
    labels: &ConnLabels,
    client: &mut C,
    server: &mut S,
    stop: &CancellationToken,
) -> std::io::Result<(u64, u64)>
where
    C: AsyncRead + AsyncWrite + Unpin + ?Sized,
    S: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    splice_counted(metrics, labels, client, server, Some(stop)).await
}

async fn splice_counted<C, S>(
    metrics: &Metrics,
    labels: &ConnLabels,
    client: &mut C,
    server: &mut S,
    stop: Option<&CancellationToken>,
) -> std::io::Result<(u64, u64)>
where
    C: AsyncRead + AsyncWrite + Unpin + ?Sized,
    S: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let open = metrics.opened(labels);
    let copy = bidirectional(client, server);
    let result = match stop {
        None => copy.await,
        Some(stop) => tokio::select! {
            r = copy => r,
            () = stop.cancelled() => Ok((0, 0)),
        },
    };
    match result {
        Ok((request, response)) => {
            metrics.closed(labels, open, response, request);
            Ok((request, response))
        }
        Err(e) => {
            metrics.closed(labels, open, 0, 0);
            Err(e)
        }
    }
}

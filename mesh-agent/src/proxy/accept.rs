//! The accept loop every per-pod listener runs: connection caps per source and per
//! node, `TCP_NODELAY`, one tracked task per connection (drained on shutdown).

use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use super::ProxyContext;
use crate::transport::{limits, sockets};

/// Where a listener learns what an accepted connection was meant for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum OrigFrom {
    /// The kernel's table: connect4/6 rewrote the destination of a captured connect().
    Kernel,
    /// The accepted socket's own address: sk_lookup steering keeps the destination the
    /// client dialed, and a client dialing the listener names it.
    LocalAddr,
}

/// Accept loop shared by the listeners: runs `handle(stream, peer, original
/// destination)` per connection until `stop`. A connection whose original destination
/// cannot be found is refused here.
pub(super) async fn accept_loop<F, Fut>(
    listener: &TcpListener,
    ctx: &ProxyContext,
    stop: CancellationToken,
    what: &'static str,
    orig_from: OrigFrom,
    mut handle: F,
) where
    F: FnMut(TcpStream, SocketAddr, SocketAddr) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            r = listener.accept() => match r {
                Ok((stream, peer)) => {
                    let peer = sockets::canonical(peer);
                    let permit = match ctx.limits.admit(peer.ip()) {
                        Ok(p) => p,
                        Err(hit) => {
                            refuse(ctx, what, peer, hit);
                            sockets::reset(stream);
                            continue;
                        }
                    };
                    let orig = match orig_from {
                        OrigFrom::Kernel => ctx.orig_dst.orig_dst(peer),
                        OrigFrom::LocalAddr => stream.local_addr().ok().map(sockets::canonical),
                    };
                    let Some(orig) = orig else {
                        tracing::warn!(listener = what, %peer, "no original destination recorded; refused");
                        sockets::reset(stream);
                        continue;
                    };
                    let _ = stream.set_nodelay(true);
                    let conn = handle(stream, peer, orig);
                    ctx.tasks.spawn(async move {
                        conn.await;
                        drop(permit);
                    });
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning, and say so.
                    ctx.metrics.refused(what, "accept_error");
                    tracing::warn!(listener = what, error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        }
    }
}

/// Logs (at most once a second per source) and counts a connection over a cap.
pub(super) fn refuse(ctx: &ProxyContext, listener: &str, peer: SocketAddr, hit: limits::LimitHit) {
    ctx.metrics.refused(listener, hit.as_str());
    if ctx.limits.should_log(peer.ip()) {
        let cap = match hit {
            limits::LimitHit::PerSource => ctx.limits.per_source,
            limits::LimitHit::PerNode => ctx.limits.per_node,
        };
        tracing::warn!(listener, %peer, limit = hit.as_str(), cap, held = ctx.limits.held(), "connection refused: limit reached");
    }
}

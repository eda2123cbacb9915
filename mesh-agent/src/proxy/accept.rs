//! The per-pod listeners' accept loop: the shared one ([`accept::accept_loop`]) plus the
//! original destination of each connection.

use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use super::ProxyContext;
use crate::state::Workload;
use crate::transport::{Error, accept, sockets};

/// Where a listener learns what an accepted connection was meant for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum OrigFrom {
    /// The kernel's table: connect4/6 rewrote the destination of a captured connect().
    Kernel,
    /// The accepted socket's own address: sk_lookup steering keeps the destination the
    /// client dialed, and a client dialing the listener names it.
    LocalAddr,
}

/// Accept loop of the per-pod listeners: runs `handle(stream, peer, original
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
    accept::accept_loop(listener, ctx.caps(), stop, what, |stream, peer| {
        let orig = match orig_from {
            OrigFrom::Kernel => ctx.orig_dst.orig_dst(peer),
            OrigFrom::LocalAddr => stream.local_addr().ok().map(sockets::canonical),
        };
        let Some(orig) = orig else {
            tracing::warn!(listener = what, %peer, "no original destination recorded; refused");
            sockets::reset(stream);
            return None;
        };
        Some(handle(stream, peer, orig))
    })
    .await
}

/// Logs how a connection on one of the pod's listeners (`what`) ended, when it failed.
pub(super) fn log_served(what: &str, pod: &Workload, peer: SocketAddr, served: Result<(), Error>) {
    match served {
        Err(e) if e.is_reset_mid_copy() => {
            tracing::debug!(listener = what, pod = %pod.name, %peer, error = %e, "connection reset by a peer");
        }
        Err(e) => tracing::warn!(listener = what, pod = %pod.name, %peer, error = %e, "connection failed"),
        Ok(()) => {}
    }
}

//! The accept loop every listener of the agent and the gateway runs: connection caps
//! per source and per node, `TCP_NODELAY`, one tracked task per connection (drained on
//! shutdown), and a back-off when `accept()` itself fails.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt as _;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::limits::{ConnLimits, LimitHit};
use super::sockets;
use crate::telemetry::Metrics;

/// What bounds a listener: the caps it admits under, where refusals are counted, and
/// the task set its connections run in.
#[derive(Debug, Clone, Copy)]
pub struct Caps<'a> {
    /// Per-source and per-node connection caps.
    pub limits: &'a Arc<ConnLimits>,
    /// Counts refusals.
    pub metrics: &'a Metrics,
    /// Connections run here; shutdown waits for them.
    pub tasks: &'a TaskTracker,
}

impl Caps<'_> {
    /// Logs (at most once a second per source) and counts a connection over a cap.
    pub fn refuse(&self, listener: &str, peer: SocketAddr, hit: LimitHit) {
        self.metrics.refused(listener, hit.as_str());
        if self.limits.should_log(peer.ip()) {
            let cap = match hit {
                LimitHit::PerSource => self.limits.per_source,
                LimitHit::PerNode => self.limits.per_node,
            };
            tracing::warn!(listener, %peer, limit = hit.as_str(), cap, held = self.limits.held(), "connection refused: limit reached");
        }
    }
}

/// Accepts on `listener` until `stop`. Each connection within the caps goes to
/// `handle(stream, peer)`, whose future runs as its own task holding the connection's
/// permit; `handle` answers `None` for a connection it refused (and closed) itself.
pub async fn accept_loop<F, Fut>(
    listener: &TcpListener,
    caps: Caps<'_>,
    stop: CancellationToken,
    what: &'static str,
    mut handle: F,
) where
    F: FnMut(TcpStream, SocketAddr) -> Option<Fut>,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            r = listener.accept() => match r {
                Ok((stream, peer)) => {
                    let peer = sockets::canonical(peer);
                    let permit = match caps.limits.admit(peer.ip()) {
                        Ok(p) => p,
                        Err(hit) => {
                            caps.refuse(what, peer, hit);
                            sockets::reset(stream);
                            continue;
                        }
                    };
                    let _ = stream.set_nodelay(true);
                    let Some(conn) = handle(stream, peer) else { continue };
                    // `map`, not an async block awaiting `conn`: that block would hold
                    // the connection's future twice over (captured, then awaited), and
                    // it is most of what an idle connection costs.
                    caps.tasks.spawn(conn.map(move |()| drop(permit)));
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning, and say so.
                    caps.metrics.refused(what, "accept_error");
                    tracing::warn!(listener = what, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}

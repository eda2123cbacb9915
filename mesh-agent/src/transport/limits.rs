//! What an untrusted peer can make the shared node agent hold: the timeouts, windows,
//! sizes and connection caps every listener applies, in one place.
//!
//! Invariants: every HTTP server the agent runs (inbound per-request policy, outbound
//! L7, admin, HBONE) has a header read timeout and a header size cap; every HTTP/2
//! connection has bounded windows and streams, and a way to find a dead peer (pings;
//! on HBONE connections, whose sockets the kernel watches with TCP keepalive and
//! `TCP_USER_TIMEOUT`, none, so an idle pooled connection never wakes either agent); a
//! source pod holds at
//! most [`ConnLimits::per_source`] proxied connections and the node at most
//! [`ConnLimits::per_node`]; a connection over a cap is closed at once, logged (at most
//! once a second per source) and counted, never queued.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hyper_util::rt::{TokioExecutor, TokioTimer};

/// How long a client may take to send a request's headers (slowloris): real clients
/// send them in one packet.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest HTTP/1 read buffer, and so the largest request head: 64 KiB holds the
/// headers of real traffic (Envoy's default cap is 60 KiB).
pub const H1_MAX_BUF: usize = 64 * 1024;
/// The largest HTTP/2 header list accepted (same reasoning as [`H1_MAX_BUF`]).
pub const H2_MAX_HEADER_LIST: u32 = 64 * 1024;
/// Streams one HTTP/2 connection may have open (ztunnel's and Envoy's default is 100):
/// a client with more opens another connection, which the per-source cap bounds.
pub const H2_MAX_STREAMS: u32 = 100;
/// HTTP/2 stream window: what a peer may send on one stream before the agent reads it.
/// 512 KiB keeps a lab or datacenter path (well under 1 ms) full at several Gbit/s per
/// stream; a peer that never lets the agent read costs it at most this per stream.
pub const H2_STREAM_WINDOW: u32 = 512 * 1024;
/// HTTP/2 connection window: what all streams of a connection may have in flight, the
/// memory one connection can pin (four streams at full speed).
pub const H2_CONNECTION_WINDOW: u32 = 2 * 1024 * 1024;
/// Bytes an HTTP/2 stream may hold queued for sending beyond what the peer's window
/// takes. hyper's default (400 KiB) times every open stream was most of the agent's
/// memory under a few hundred slow uploads; the window, not this queue, keeps the
/// link busy.
pub const H2_MAX_SEND_BUF: usize = 64 * 1024;
/// Pings on quiet HTTP/2 connections, to find dead peers instead of holding them.
pub const H2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// How long a ping may go unanswered before the connection is closed.
pub const H2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// An HBONE socket with nothing received for this long is probed by the kernel (TCP
/// keepalive): a dead peer of an idle connection is found without waking the agent.
pub const TCP_KEEPALIVE_IDLE: Duration = H2_KEEPALIVE_INTERVAL;
/// Between unanswered keepalive probes.
pub const TCP_KEEPALIVE_INTERVAL: Duration = H2_KEEPALIVE_TIMEOUT;
/// Unanswered keepalive probes before the kernel closes the connection.
pub const TCP_KEEPALIVE_PROBES: u32 = 3;
/// How long bytes an HBONE socket sent may go unacknowledged before the kernel closes
/// it: a peer that vanished while bytes were in flight, which keepalive (idle sockets
/// only) would not see for the 15 minutes of TCP's retransmissions.
pub const TCP_USER_TIMEOUT: Duration = Duration::from_secs(60);
/// Streams a client may reset before the server answers them (HTTP/2 rapid reset,
/// CVE-2023-44487): past this the connection is closed.
pub const H2_MAX_PENDING_RESETS: usize = 20;
/// Streams the agent resets because a peer misbehaved, before it closes the connection.
pub const H2_MAX_LOCAL_RESETS: usize = 256;
/// How long the peer agent may take to answer a CONNECT.
pub const CONNECT_RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);
/// An HBONE connection of the pool with no stream for this long is closed (the default
/// of `--pool-idle-timeout`).
pub const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// A spliced connection with no byte either way for this long is closed (Istio's TCP
/// idle timeout default).
pub const DEFAULT_TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);
/// Proxied connections one source pod may hold on this node.
pub const DEFAULT_PER_SOURCE: usize = 4096;
/// Connections the admin servers (readiness, metrics) hold at once; more are closed.
pub const ADMIN_MAX_CONNECTIONS: usize = 512;

/// The HTTP/2 server limits, on either of hyper's server builders (hyper-util's
/// `auto` one has the same methods on another type): one list, so the HBONE listener
/// and the HTTP servers cannot drift apart.
macro_rules! h2_server_limits {
    ($builder:expr) => {
        $builder
            .timer(TokioTimer::new())
            .max_concurrent_streams(H2_MAX_STREAMS)
            .max_header_list_size(H2_MAX_HEADER_LIST)
            .initial_stream_window_size(H2_STREAM_WINDOW)
            .initial_connection_window_size(H2_CONNECTION_WINDOW)
            .max_send_buf_size(H2_MAX_SEND_BUF)
            .max_pending_accept_reset_streams(H2_MAX_PENDING_RESETS)
            .max_local_error_reset_streams(H2_MAX_LOCAL_RESETS)
    };
}

/// An HTTP/1 + HTTP/2 server builder with every limit above.
pub fn http_server() -> hyper_util::server::conn::auto::Builder<TokioExecutor> {
    let mut b = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    b.http1().timer(TokioTimer::new()).header_read_timeout(HEADER_READ_TIMEOUT).max_buf_size(H1_MAX_BUF);
    h2_server_limits!(b.http2()).keep_alive_interval(H2_KEEPALIVE_INTERVAL).keep_alive_timeout(H2_KEEPALIVE_TIMEOUT);
    b
}

/// An HTTP/2-only server builder with every limit above (the CA's listener), without
/// pings (hyper's server would ping idle connections too): its callers set pings of
/// their own or have the kernel watch the socket ([`super::sockets::watch_liveness`]).
pub fn h2_server() -> hyper::server::conn::http2::Builder<TokioExecutor> {
    let mut b = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    h2_server_limits!(b);
    b
}

/// An HTTP/2 client builder with the same windows (HTTP/2 upstreams at L7), pinging
/// only while streams are open: an idle connection is dropped at its pool's idle
/// timeout, and wakes nobody before.
pub fn h2_client() -> hyper::client::conn::http2::Builder<TokioExecutor> {
    let mut b = hyper::client::conn::http2::Builder::new(TokioExecutor::new());
    b.timer(TokioTimer::new())
        .initial_stream_window_size(H2_STREAM_WINDOW)
        .initial_connection_window_size(H2_CONNECTION_WINDOW)
        .max_send_buf_size(H2_MAX_SEND_BUF)
        .max_header_list_size(H2_MAX_HEADER_LIST)
        .keep_alive_interval(H2_KEEPALIVE_INTERVAL)
        .keep_alive_timeout(H2_KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(false);
    b
}

/// The HBONE server's HTTP/2 (`h2` directly, [`super::hbone`]) with the limits of
/// [`h2_server`]: the same streams, header list, windows, send queue and reset caps.
pub fn hbone_server() -> h2::server::Builder {
    let mut b = h2::server::Builder::new();
    b.max_concurrent_streams(H2_MAX_STREAMS)
        .max_header_list_size(H2_MAX_HEADER_LIST)
        .initial_window_size(H2_STREAM_WINDOW)
        .initial_connection_window_size(H2_CONNECTION_WINDOW)
        .max_send_buffer_size(H2_MAX_SEND_BUF)
        .max_pending_accept_reset_streams(H2_MAX_PENDING_RESETS)
        .max_local_error_reset_streams(Some(H2_MAX_LOCAL_RESETS));
    b
}

/// The HBONE pool's HTTP/2 (`h2` directly) with the windows and limits of
/// [`h2_client`]. No pings: the kernel watches the socket
/// ([`super::sockets::watch_liveness`]), streams open or not.
pub fn hbone_client() -> h2::client::Builder {
    let mut b = h2::client::Builder::new();
    b.enable_push(false)
        .initial_window_size(H2_STREAM_WINDOW)
        .initial_connection_window_size(H2_CONNECTION_WINDOW)
        .max_send_buffer_size(H2_MAX_SEND_BUF)
        .max_header_list_size(H2_MAX_HEADER_LIST)
        .max_local_error_reset_streams(Some(H2_MAX_LOCAL_RESETS));
    b
}

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitHit {
    /// The source pod holds its share.
    PerSource,
    /// The node holds all it may.
    PerNode,
}

impl LimitHit {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            LimitHit::PerSource => "per_source",
            LimitHit::PerNode => "per_node",
        }
    }
}

/// Counts proxied connections per source address and for the node.
#[derive(Debug)]
pub struct ConnLimits {
    /// Connections one source may hold.
    pub per_source: usize,
    /// Connections the node may hold.
    pub per_node: usize,
    total: AtomicUsize,
    by_source: Mutex<HashMap<IpAddr, usize>>,
    /// When each source's refusal was last logged.
    logged: Mutex<HashMap<IpAddr, Instant>>,
}

/// One admitted connection; dropping it frees its place.
#[derive(Debug)]
pub struct ConnPermit {
    limits: Arc<ConnLimits>,
    source: IpAddr,
}

impl Drop for ConnPermit {
    fn drop(&mut self) {
        self.limits.total.fetch_sub(1, Ordering::AcqRel);
        let mut by = self.limits.by_source.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = by.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                by.remove(&self.source);
            }
        }
    }
}

impl ConnLimits {
    /// Caps of `per_source` connections per source and `per_node` for the node.
    pub fn new(per_source: usize, per_node: usize) -> Self {
        Self { per_source, per_node, total: AtomicUsize::new(0), by_source: Mutex::default(), logged: Mutex::default() }
    }

    /// Admits a connection from `source`, or says which cap it hit.
    pub fn admit(self: &Arc<Self>, source: IpAddr) -> Result<ConnPermit, LimitHit> {
        if self.total.fetch_add(1, Ordering::AcqRel) >= self.per_node {
            self.total.fetch_sub(1, Ordering::AcqRel);
            return Err(LimitHit::PerNode);
        }
        let mut by = self.by_source.lock().unwrap_or_else(|p| p.into_inner());
        let n = by.entry(source).or_default();
        if *n >= self.per_source {
            drop(by);
            self.total.fetch_sub(1, Ordering::AcqRel);
            return Err(LimitHit::PerSource);
        }
        *n += 1;
        Ok(ConnPermit { limits: self.clone(), source })
    }

    /// Whether a refusal of `source` should be logged now (once a second per source,
    /// so a flood does not flood the log).
    pub fn should_log(&self, source: IpAddr) -> bool {
        let mut logged = self.logged.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if logged.get(&source).is_some_and(|t| now.duration_since(*t) < Duration::from_secs(1)) {
            return false;
        }
        // Bounded: old entries go when the map grows.
        if logged.len() > 4096 {
            logged.retain(|_, t| now.duration_since(*t) < Duration::from_secs(1));
        }
        logged.insert(source, now);
        true
    }

    /// Connections held now.
    pub fn held(&self) -> usize {
        self.total.load(Ordering::Acquire)
    }
}

/// The node-wide connection cap from the file descriptors the agent may hold: each
/// proxied connection takes two (client and upstream), and some are kept back for the
/// agent's own use (listeners, maps, admin).
pub fn per_node_from_nofile(nofile: u64) -> usize {
    usize::try_from(nofile.saturating_sub(1024) / 2).unwrap_or(usize::MAX).max(64)
}

/// The most descriptors the agent asks for: two per proxied connection for half a
/// million connections, as ztunnel's and Envoy's deployments allow.
const NOFILE_WANTED: u64 = 1 << 20;

/// Raises the file-descriptor limit: to [`NOFILE_WANTED`] (at most the kernel's
/// `fs.nr_open`) where the agent may (`CAP_SYS_RESOURCE`, which the DaemonSet grants),
/// else the soft limit to the hard one. Returns the limit in force.
pub fn raise_nofile() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else { return 1024 };
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open").ok().and_then(|s| s.trim().parse::<u64>().ok());
    let wanted = nr_open.unwrap_or(hard).min(NOFILE_WANTED);
    if wanted > hard && setrlimit(Resource::RLIMIT_NOFILE, wanted, wanted).is_ok() {
        return wanted;
    }
    if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        return hard;
    }
    soft
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_source_and_the_node_each_have_their_cap_and_get_their_places_back() {
        let limits = Arc::new(ConnLimits::new(2, 3));
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let p1 = limits.admit(a).unwrap();
        let _p2 = limits.admit(a).unwrap();
        assert_eq!(limits.admit(a).unwrap_err(), LimitHit::PerSource);
        let _p3 = limits.admit(b).unwrap();
        assert_eq!(limits.admit(b).unwrap_err(), LimitHit::PerNode, "the node's cap is shared");
        drop(p1);
        let _p4 = limits.admit(b).expect("a closed connection frees its place");
        assert_eq!(limits.held(), 3);
        assert!(limits.should_log(a) && !limits.should_log(a), "refusals are logged once a second");
    }

    #[test]
    fn the_node_cap_leaves_room_for_the_agent() {
        assert_eq!(per_node_from_nofile(1_048_576), 523_776);
        assert_eq!(per_node_from_nofile(1024), 64);
    }
}

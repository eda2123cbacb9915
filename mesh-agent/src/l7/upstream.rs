//! Upstream HTTP/1.1 connections from a pod to an endpoint: through the HBONE tunnel for
//! mesh endpoints, plaintext for the rest. Kept idle between requests and reused, up to
//! `maxRequestsPerConnection` requests each.
//!
//! Invariant: a connection goes back to the idle list only after its response body was
//! read to the end, so the next request never waits behind another one's body.
//!
//! Invariant: nothing idle is kept past its idle timeout, whether or not the pod sends
//! again. [`Upstreams::reap_idle`] closes idle connections that outlived it (and
//! HTTP/2 connections unused as long) and forgets (pod, endpoint) keys with nothing
//! left, so a burst's connections, and every endpoint a pod ever reached, do not stay
//! in the shared agent.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::{http1::SendRequest, http2};
use hyper_util::rt::TokioIo;

use crate::dataplane::Netns;
use crate::snapshot::Snapshot;
use crate::state::Workload;
use crate::transport::{Dialer, Upstream};

/// Idle connections unused this long are closed (a DestinationRule's
/// `connectionPool.http.idleTimeout` says otherwise). Short, because a new connection
/// to a mesh endpoint is one more stream on the pooled tunnel, while an idle one holds
/// buffers here and a connection to the application at the destination.
const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(20);
/// How often idle connections are looked over.
const REAP_EVERY: Duration = Duration::from_secs(5);

/// A request body on its way upstream: buffered bytes or the client's stream.
pub type UpBody = http_body_util::combinators::BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

/// Why a request got no answer.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// No connection could be opened.
    #[error("connect to {addr}: {reason}")]
    Connect {
        /// The endpoint.
        addr: SocketAddr,
        /// Why.
        reason: String,
    },
    /// The connection failed while the request was in flight.
    #[error("upstream {addr} reset: {source}")]
    Reset {
        /// The endpoint.
        addr: SocketAddr,
        /// hyper's error.
        source: hyper::Error,
    },
}

struct IdleConn {
    sender: SendRequest<UpBody>,
    served: u32,
    since: Instant,
    idle_timeout: Duration,
}

impl IdleConn {
    fn reusable(&self, now: Instant) -> bool {
        self.sender.is_ready() && now.saturating_duration_since(self.since) < self.idle_timeout
    }
}

type Key = (String, SocketAddr);

/// Idle upstream connections of every pod on this node.
#[derive(Default)]
pub struct Upstreams {
    idle: Mutex<HashMap<Key, Vec<IdleConn>>>,
    /// One multiplexed HTTP/2 connection per (pod, endpoint), for HTTP/2 clients (gRPC)
    /// and `h2UpgradePolicy: UPGRADE`.
    h2: Mutex<HashMap<Key, Arc<tokio::sync::Mutex<H2Slot>>>>,
}

/// The HTTP/2 connection of one (pod, endpoint). Its lock is held while dialing, so a
/// burst of requests opens one connection, not one each.
#[derive(Default)]
struct H2Slot {
    sender: Option<http2::SendRequest<UpBody>>,
    /// When a request last took the connection, and the idle timeout it asked for.
    used: Option<(Instant, Duration)>,
    /// The last dial that failed: requests that waited for it fail with it rather
    /// than dial again one after another.
    failed: Option<(Instant, String)>,
}

impl std::fmt::Debug for Upstreams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n: usize = self.idle.lock().map(|m| m.values().map(Vec::len).sum()).unwrap_or(0);
        f.debug_struct("Upstreams").field("idle", &n).finish()
    }
}

/// Per-request connection settings from the DestinationRule.
#[derive(Debug, Clone, Copy, Default)]
pub struct ConnSettings {
    /// Connect timeout.
    pub connect_timeout: Option<Duration>,
    /// Requests per connection.
    pub max_requests_per_connection: Option<u32>,
    /// Idle timeout.
    pub idle_timeout: Option<Duration>,
    /// Speak HTTP/2 (prior knowledge) to the endpoint.
    pub http2: bool,
}

/// The pod a request leaves from.
#[derive(Debug, Clone, Copy)]
pub struct From<'a> {
    /// Reaches the endpoint.
    pub dialer: &'a Dialer,
    /// The configuration the request is routed under.
    pub snapshot: &'a Snapshot,
    /// The calling pod.
    pub pod: &'a Workload,
    /// Its network namespace.
    pub netns: &'a Netns,
    /// TLS the agent opens itself to the endpoint (a ServiceEntry host's
    /// DestinationRule), over a plain connection.
    pub tls: Option<Originate<'a>>,
}

/// TLS origination toward an endpoint outside the mesh.
#[derive(Debug, Clone, Copy)]
pub struct Originate<'a> {
    /// The DestinationRule's settings.
    pub settings: &'a crate::traffic::policy::TlsOrigination,
    /// The host asked for: the SNI and the name checked, unless `sni` says.
    pub host: &'a str,
    /// Where the certificates may come from.
    pub credentials: crate::transport::originate::Credentials<'a>,
}

impl From<'_> {
    /// The pool key: the pod, and the TLS it asks of the endpoint (a plain and an
    /// originated connection to one address are never shared).
    fn key(&self, addr: SocketAddr) -> Key {
        match &self.tls {
            None => (self.pod.key(), addr),
            Some(t) => (format!("{}|tls:{}", self.pod.key(), t.settings.sni.as_deref().unwrap_or(t.host)), addr),
        }
    }
}

impl Upstreams {
    /// Sends `req` from `from.pod` to `endpoint` at `addr`.
    pub async fn send(
        self: &Arc<Self>,
        from: From<'_>,
        endpoint: &Workload,
        addr: SocketAddr,
        req: Request<UpBody>,
        settings: ConnSettings,
    ) -> Result<Response<PooledBody>, SendError> {
        let key: Key = from.key(addr);
        if settings.http2 {
            return self.send_h2(from, endpoint, addr, key, req, settings).await;
        }
        let idle_timeout = settings.idle_timeout.unwrap_or(DEFAULT_IDLE_TIMEOUT);
        let reused = {
            let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
            let list = idle.entry(key.clone()).or_default();
            let mut found = None;
            let now = Instant::now();
            while let Some(c) = list.pop() {
                if c.reusable(now) {
                    found = Some(c);
                    break;
                }
            }
            found
        };
        let mut conn = match reused {
            Some(c) => c,
            None => {
                let sender = self.dial(from, endpoint, addr, settings).await?;
                IdleConn { sender, served: 0, since: Instant::now(), idle_timeout }
            }
        };
        let mut req = req;
        conn.served += 1;
        let last = settings.max_requests_per_connection.is_some_and(|max| conn.served >= max);
        if last {
            // Tell the application too, so it does not keep a connection we will drop.
            req.headers_mut().insert(http::header::CONNECTION, http::HeaderValue::from_static("close"));
        }
        let res = conn.sender.send_request(req).await.map_err(|source| SendError::Reset { addr, source })?;
        // A switched protocol owns the connection from now on.
        let keep = res.status() != http::StatusCode::SWITCHING_PROTOCOLS
            && !last
            && !res
                .headers()
                .get(http::header::CONNECTION)
                .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
        if keep && res.body().is_end_stream() {
            // Nothing left to read: the connection is free now.
            self.put_back(key, conn);
            return Ok(res.map(|inner| PooledBody { inner, back: None }));
        }
        let back = keep.then(|| (Arc::clone(self), key, conn));
        Ok(res.map(|inner| PooledBody { inner, back }))
    }

    async fn send_h2(
        &self,
        from: From<'_>,
        endpoint: &Workload,
        addr: SocketAddr,
        key: Key,
        mut req: Request<UpBody>,
        settings: ConnSettings,
    ) -> Result<Response<PooledBody>, SendError> {
        let mut sender = self.h2_sender(from, endpoint, addr, key, settings).await?;
        *req.version_mut() = http::Version::HTTP_2;
        // HTTP/2 carries the authority in :authority, not in Host.
        if let Some(host) = req.headers_mut().remove(http::header::HOST)
            && let Ok(uri) = format!(
                "http://{}{}",
                host.to_str().unwrap_or(""),
                req.uri().path_and_query().map_or("/", |p| p.as_str())
            )
            .parse()
        {
            *req.uri_mut() = uri;
        }
        req.headers_mut().remove(http::header::CONNECTION);
        sender.ready().await.map_err(|source| SendError::Reset { addr, source })?;
        let res = sender.send_request(req).await.map_err(|source| SendError::Reset { addr, source })?;
        Ok(res.map(|inner| PooledBody { inner, back: None }))
    }

    /// The open HTTP/2 connection for `key`, dialed if there is none.
    async fn h2_sender(
        &self,
        from: From<'_>,
        endpoint: &Workload,
        addr: SocketAddr,
        key: Key,
        settings: ConnSettings,
    ) -> Result<http2::SendRequest<UpBody>, SendError> {
        let waited_since = Instant::now();
        let slot = Arc::clone(self.h2.lock().unwrap_or_else(|p| p.into_inner()).entry(key).or_default());
        let mut slot = slot.lock().await;
        slot.used = Some((Instant::now(), settings.idle_timeout.unwrap_or(DEFAULT_IDLE_TIMEOUT)));
        if let Some(open) = slot.sender.as_ref().filter(|s| !s.is_closed()) {
            return Ok(open.clone());
        }
        if let Some((at, reason)) = &slot.failed
            && *at >= waited_since
        {
            return Err(SendError::Connect { addr, reason: reason.clone() });
        }
        slot.sender = None;
        let dialed = async {
            let io = self.connect_io(from, endpoint, addr, settings).await?;
            crate::transport::limits::h2_client()
                .handshake(TokioIo::new(io))
                .await
                .map_err(|e| SendError::Connect { addr, reason: e.to_string() })
        };
        match dialed.await {
            Ok((sender, conn)) => {
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(%addr, error = %e, "upstream HTTP/2 connection ended");
                    }
                });
                slot.sender = Some(sender.clone());
                slot.failed = None;
                Ok(sender)
            }
            Err(e) => {
                let reason = match &e {
                    SendError::Connect { reason, .. } => reason.clone(),
                    other => other.to_string(),
                };
                slot.failed = Some((Instant::now(), reason));
                Err(e)
            }
        }
    }

    async fn connect_io(
        &self,
        from: From<'_>,
        endpoint: &Workload,
        addr: SocketAddr,
        settings: ConnSettings,
    ) -> Result<Upstream, SendError> {
        let From { dialer, snapshot, pod, netns, tls } = from;
        let timeout = settings.connect_timeout.unwrap_or(crate::transport::CONNECT_TIMEOUT);
        let connect = dialer.connect(snapshot, pod, netns, Some(endpoint), addr, timeout);
        let io = match tokio::time::timeout(timeout, connect).await {
            Ok(Ok(io)) => io,
            Ok(Err(e)) => return Err(SendError::Connect { addr, reason: e.to_string() }),
            Err(_) => return Err(SendError::Connect { addr, reason: format!("timed out after {timeout:?}") }),
        };
        match (io, tls) {
            // Through the tunnel the mesh's own mutual TLS carries it, as at L4.
            (Upstream::Plain(tcp), Some(t)) => {
                crate::transport::originate::originate(tcp, addr, t.settings, t.host, &t.credentials)
                    .await
                    .map(|s| Upstream::Originated(Box::new(s)))
                    .map_err(|e| SendError::Connect { addr, reason: e.to_string() })
            }
            (io, _) => Ok(io),
        }
    }

    async fn dial(
        &self,
        from: From<'_>,
        endpoint: &Workload,
        addr: SocketAddr,
        settings: ConnSettings,
    ) -> Result<SendRequest<UpBody>, SendError> {
        let io = self.connect_io(from, endpoint, addr, settings).await?;
        let (sender, conn) = hyper::client::conn::http1::Builder::new()
            .max_buf_size(crate::transport::limits::H1_MAX_BUF)
            .handshake(TokioIo::new(io))
            .await
            .map_err(|e| SendError::Connect { addr, reason: e.to_string() })?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(%addr, error = %e, "upstream connection ended");
            }
        });
        Ok(sender)
    }

    /// Every [`REAP_EVERY`], [`Upstreams::reap`] until `shutdown`; ends with the pool.
    pub async fn reap_idle(self: Arc<Self>, shutdown: tokio_util::sync::CancellationToken) {
        let pool = Arc::downgrade(&self);
        drop(self);
        loop {
            tokio::select! {
                () = tokio::time::sleep(REAP_EVERY) => {}
                () = shutdown.cancelled() => return,
            }
            let Some(pool) = pool.upgrade() else { return };
            pool.reap(Instant::now());
        }
    }

    /// Closes the idle connections no request may reuse at `now` (timed out, or closed
    /// by the other end), drops HTTP/2 connections unused for their idle timeout that
    /// no request is waiting on, and forgets keys left with nothing. Returns how many
    /// connections it let go.
    pub fn reap(&self, now: Instant) -> usize {
        let mut closed = 0;
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).retain(|_, list| {
            let before = list.len();
            list.retain(|c| c.reusable(now));
            closed += before - list.len();
            !list.is_empty()
        });
        self.h2.lock().unwrap_or_else(|p| p.into_inner()).retain(|_, slot| {
            // A request taking the sender or dialing holds the slot: keep it.
            if Arc::strong_count(slot) > 1 {
                return true;
            }
            let Ok(mut slot) = slot.try_lock() else { return true };
            let idle = slot.used.is_none_or(|(at, timeout)| now.saturating_duration_since(at) >= timeout);
            let open = slot.sender.as_ref().is_some_and(|s| !s.is_closed());
            if open && !idle {
                return true;
            }
            // A request already sent keeps the connection until it ends: hyper closes
            // it once the last sender is gone and its streams are done.
            closed += usize::from(slot.sender.take().is_some());
            false
        });
        closed
    }

    fn put_back(&self, key: Key, mut conn: IdleConn) {
        conn.since = Instant::now();
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).entry(key).or_default().push(conn);
    }
}

/// A response body that returns its connection to the pool when read to the end.
pub struct PooledBody {
    inner: Incoming,
    back: Option<(Arc<Upstreams>, Key, IdleConn)>,
}

impl std::fmt::Debug for PooledBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PooledBody").finish_non_exhaustive()
    }
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        // The reader may stop at the last frame without polling for the end (hyper
        // does, once Content-Length is reached): the body is done when either says so.
        let done = matches!(polled, Poll::Ready(None)) || self.inner.is_end_stream();
        if done && let Some((pool, key, conn)) = self.back.take() {
            pool.put_back(key, conn);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An HTTP/1.1 sender over an in-memory pipe, and the pipe's other end.
    async fn h1_sender() -> (SendRequest<UpBody>, tokio::io::DuplexStream) {
        let (ours, theirs) = tokio::io::duplex(1024);
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(ours)).await.expect("handshake");
        tokio::spawn(conn);
        sender.ready().await.expect("ready");
        (sender, theirs)
    }

    /// An open HTTP/2 sender over an in-memory pipe, and the pipe's other end.
    async fn h2_sender() -> (http2::SendRequest<UpBody>, tokio::io::DuplexStream) {
        let (ours, theirs) = tokio::io::duplex(64 * 1024);
        let (sender, conn) =
            http2::handshake(hyper_util::rt::TokioExecutor::new(), TokioIo::new(ours)).await.expect("handshake");
        tokio::spawn(conn);
        (sender, theirs)
    }

    fn key(port: u16) -> Key {
        ("default/frontend".into(), SocketAddr::from(([10, 10, 2, 2], port)))
    }

    fn idle(pool: &Upstreams) -> usize {
        pool.idle.lock().unwrap().values().map(Vec::len).sum()
    }

    #[tokio::test]
    async fn idle_connections_are_closed_after_their_timeout_without_another_request() {
        let pool = Upstreams::default();
        let (short, _short_peer) = h1_sender().await;
        let (long, long_peer) = h1_sender().await;
        let now = Instant::now();
        pool.put_back(key(1), IdleConn { sender: short, served: 1, since: now, idle_timeout: Duration::from_secs(20) });
        pool.put_back(key(2), IdleConn { sender: long, served: 1, since: now, idle_timeout: Duration::from_secs(60) });
        assert_eq!(pool.reap(now + Duration::from_secs(10)), 0, "both still within their timeouts");
        assert_eq!(pool.reap(now + Duration::from_secs(25)), 1, "the 20 s one is closed");
        assert_eq!(idle(&pool), 1);
        assert!(!pool.idle.lock().unwrap().contains_key(&key(1)), "a key with nothing left is forgotten");
        // Closed by the other end: not reusable, whatever its timeout says.
        drop(long_peer);
        let deadline = Instant::now() + Duration::from_secs(5);
        while pool.idle.lock().unwrap()[&key(2)][0].sender.is_ready() {
            assert!(Instant::now() < deadline, "the sender never saw its connection close");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(pool.reap(now + Duration::from_secs(26)), 1);
        assert!(pool.idle.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn http2_connections_go_when_unused_for_their_timeout_and_stay_while_a_request_holds_them() {
        let pool = Upstreams::default();
        let now = Instant::now();
        let (sender, _peer) = h2_sender().await;
        let open: Arc<tokio::sync::Mutex<H2Slot>> = Arc::default();
        *open.lock().await = H2Slot { sender: Some(sender), used: Some((now, Duration::from_secs(20))), failed: None };
        let dialing: Arc<tokio::sync::Mutex<H2Slot>> = Arc::default();
        let _request = Arc::clone(&dialing);
        let nothing: Arc<tokio::sync::Mutex<H2Slot>> = Arc::default();
        for (port, slot) in [(1, open), (2, dialing), (3, nothing)] {
            pool.h2.lock().unwrap().insert(key(port), slot);
        }
        assert_eq!(pool.reap(now + Duration::from_secs(5)), 0);
        let mut left: Vec<Key> = pool.h2.lock().unwrap().keys().cloned().collect();
        left.sort();
        assert_eq!(left, [key(1), key(2)], "open and used 5 s ago, or being dialed: kept; an empty slot: forgotten");
        assert_eq!(pool.reap(now + Duration::from_secs(21)), 1, "unused for its 20 s: closed");
        let left: Vec<Key> = pool.h2.lock().unwrap().keys().cloned().collect();
        assert_eq!(left, [key(2)]);
    }
}

//! HBONE client: pooled HTTP/2 connections to peer agents, one CONNECT stream per
//! proxied TCP connection.
//!
//! Invariants: a pooled connection is keyed by (source pod, destination identity,
//! destination address), so a stream never rides a connection authenticated as another
//! workload; a connection that failed or closed is never handed out again; no connection
//! carries more than [`MAX_STREAMS_PER_CONNECTION`] open streams (a busy key fans out to
//! more connections, so one TLS session is not the bottleneck for a hot pair of pods);
//! no stream opens under an expired certificate: not the source's (checked at each
//! connection, and a pooled connection is not used past the notAfter of the source
//! certificate it was made with, which the peer would refuse), not the peer's (nor
//! past the notAfter of the certificate the peer presented), so a CA outage past a
//! certificate's lifetime fails closed for tunnels opened before it too, and a
//! rotation moves new streams to connections made with the renewed certificates.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use h2::client::SendRequest;
use http::{Method, Request, StatusCode};
use mesh_common::ports;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_rustls::TlsConnector;

use super::coalesce::Coalesced;
use super::hbone::H2Stream;
use super::{CONNECT_TIMEOUT, Dialer, Error, HANDSHAKE_TIMEOUT, limits, sockets};
use crate::dataplane::Netns;
use crate::identity::Identity;
use crate::state::Workload;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    /// `namespace/name` of the source pod: connections leave from its netns.
    source_pod: String,
    destination: Identity,
    addr: SocketAddr,
}

/// How long before either side's certificate expires a pooled connection stops taking
/// streams (new ones go on a connection made with the renewed certificates, which a
/// workload holds from half its certificate's life on).
const EXPIRY_MARGIN: Duration = Duration::from_secs(1);

/// Streams one pooled connection carries before another is opened for the same key
/// (ztunnel's default too).
pub const MAX_STREAMS_PER_CONNECTION: usize = 100;

#[derive(Debug, Clone)]
struct Pooled {
    sender: SendRequest<Bytes>,
    streams: StreamCount,
    /// The notAfter of the certificate the peer presented.
    peer_not_after: SystemTime,
    /// The notAfter of the source's certificate when the connection was made (the one
    /// it presented, or an older one): the peer refuses streams past it.
    own_not_after: SystemTime,
}

impl Pooled {
    /// Reserves a stream slot if the connection is open, its peer's certificate has
    /// not expired, and it has room.
    fn try_reserve(&self, now: SystemTime) -> Option<StreamSlot> {
        if !self.usable(now) {
            return None;
        }
        self.streams.try_reserve(MAX_STREAMS_PER_CONNECTION)
    }

    /// Open, and authenticated both ways by certificates still valid `now`, with
    /// [`EXPIRY_MARGIN`] to spare: a stream taken just before either expires would be
    /// refused by the peer (or by this side's own check) a moment later.
    fn usable(&self, now: SystemTime) -> bool {
        let soon = now + EXPIRY_MARGIN;
        !self.streams.is_closed() && soon < self.peer_not_after && soon < self.own_not_after
    }

    /// Whether the connection has had no stream for `idle_timeout`.
    fn idle_too_long(&self, idle_timeout: Duration) -> bool {
        self.streams.idle_for().is_some_and(|d| d >= idle_timeout)
    }
}

/// What a pooled connection's users and its driver share: its open streams (each
/// [`StreamSlot`] counts one until dropped; the last one out records when the
/// connection went idle), and whether the driver has ended.
#[derive(Debug, Default)]
struct Shared {
    open: AtomicUsize,
    idle_since: Mutex<Option<std::time::Instant>>,
    closed: AtomicBool,
}

/// One pooled connection's [`Shared`] state.
#[derive(Debug, Clone, Default)]
struct StreamCount(Arc<Shared>);

impl StreamCount {
    fn try_reserve(&self, max: usize) -> Option<StreamSlot> {
        self.0
            .open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1))
            .ok()
            .map(|_| StreamSlot(self.0.clone()))
    }

    /// How long the connection has had no stream, if it has none now.
    fn idle_for(&self) -> Option<std::time::Duration> {
        if self.0.open.load(Ordering::Acquire) > 0 {
            return None;
        }
        self.0.idle_since.lock().unwrap_or_else(|p| p.into_inner()).map(|t| t.elapsed())
    }

    /// Whether the connection's driver has ended (closed, failed or idle too long).
    fn is_closed(&self) -> bool {
        self.0.closed.load(Ordering::Acquire)
    }

    /// Marks the connection's driver ended: no stream is taken on it from now on.
    fn close(&self) {
        self.0.closed.store(true, Ordering::Release);
    }

    /// Returns once the connection has had no stream for `timeout`: its driver then
    /// ends, which closes it. Without this an idle connection would stay open (a
    /// descriptor, its TLS and HTTP/2 state) until the next dial to anywhere swept it.
    async fn idle_past(&self, timeout: Duration) {
        let mut wait = timeout;
        loop {
            tokio::time::sleep(wait).await;
            match self.idle_for() {
                Some(idle) if idle >= timeout => return,
                Some(idle) => wait = timeout - idle,
                None => wait = timeout,
            }
        }
    }
}

/// One reserved stream on a pooled connection, released on drop.
#[derive(Debug)]
struct StreamSlot(Arc<Shared>);

impl Drop for StreamSlot {
    fn drop(&mut self) {
        if self.0.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            *self.0.idle_since.lock().unwrap_or_else(|p| p.into_inner()) = Some(std::time::Instant::now());
        }
    }
}

/// A tunnelled connection: one CONNECT stream, holding its slot on the pooled
/// connection until dropped.
#[derive(Debug)]
pub struct Tunnel {
    stream: H2Stream,
    /// The pooled connection's slot; none for a stream on a connection of its own
    /// (which lives as long as its one stream).
    _slot: Option<StreamSlot>,
    /// The workload address the CONNECT asked for.
    pub target: SocketAddr,
}

impl Tunnel {
    /// The one stream of a connection opened for it alone.
    pub(super) fn on_own_connection(stream: H2Stream, target: SocketAddr) -> Self {
        Self { stream, _slot: None, target }
    }
}

impl AsyncRead for Tunnel {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Tunnel {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// The pool.
#[derive(Debug)]
pub struct Pool {
    /// Shared with each connection's driver, which takes its connection out when it
    /// ends: h2's sender holds the connection's whole state (its streams' store and
    /// buffers), which would otherwise stay until the next dial swept it.
    conns: Arc<Mutex<HashMap<Key, Vec<Pooled>>>>,
    /// A connection with no stream for this long is closed.
    idle_timeout: Duration,
    /// One dial at a time per key: a connection that finds no room waits for the dial
    /// in flight and takes a stream on it, instead of opening a tunnel of its own (a
    /// burst of a hundred new connections opened a hundred tunnels). Each gate holds
    /// when its last dial failed and why, so those waiting give up with it at once
    /// rather than each waiting out a connect timeout in turn.
    dialing: Mutex<HashMap<Key, Arc<DialGate>>>,
}

impl Default for Pool {
    fn default() -> Self {
        Self::new(limits::POOL_IDLE_TIMEOUT)
    }
}

/// The turn to dial for one key, and the last failure.
type DialGate = tokio::sync::Mutex<Option<(std::time::Instant, String)>>;

impl Pool {
    /// An empty pool whose connections close after `idle_timeout` without a stream.
    pub fn new(idle_timeout: Duration) -> Self {
        Self { conns: Arc::default(), idle_timeout, dialing: Mutex::default() }
    }

    /// Opens a tunnelled connection from `source` to `target` (a port of `dest`),
    /// reusing a pooled HTTP/2 connection when one is open.
    pub async fn connect(
        &self,
        dialer: &Dialer,
        source: &Workload,
        netns: &Netns,
        dest: &Workload,
        target: SocketAddr,
    ) -> Result<Tunnel, Error> {
        let hbone = SocketAddr::new(target.ip(), ports::INBOUND_HBONE);
        self.connect_through(dialer, source, netns, (&dest.identity, hbone), target).await
    }

    /// Opens a CONNECT stream to `target` on a pooled HTTP/2 connection to the HBONE
    /// server at `hbone`, authenticated as `identity`: the target's own agent, or a
    /// network's east-west gateway that carries the stream on to it.
    pub async fn connect_through(
        &self,
        dialer: &Dialer,
        source: &Workload,
        netns: &Netns,
        (identity, hbone): (&Identity, SocketAddr),
        target: SocketAddr,
    ) -> Result<Tunnel, Error> {
        // The stream goes out under the source's certificate: without a valid one (never
        // issued, or expired while the CA was unreachable) no stream opens, not even on a
        // connection made while it was valid.
        dialer.certs.get(&source.identity)?;
        let key = Key { source_pod: source.key(), destination: identity.clone(), addr: hbone };
        if let Some((pooled, slot)) = self.reserve(&key) {
            match self.open(&pooled, slot, &key, target).await {
                // The peer agent is going away (a handoff to its successor sends GOAWAY)
                // or the connection had ended: this CONNECT was not taken, so it is safe
                // to send again on a new connection, which the successor answers.
                Err(e) if never_reached_the_peer(&e) => {
                    self.retire(&key, &pooled);
                    tracing::debug!(addr = %key.addr, error = %e, "pooled HBONE connection going away or closed; CONNECT sent on a new one");
                }
                other => return other,
            }
        }
        let (pooled, slot) = self.reserve_or_dial(dialer, source, netns, &key).await?;
        self.open(&pooled, slot, &key, target).await
    }

    /// A stream slot on a pooled connection for `key`: on one opened while this call
    /// waited its turn, else on a connection it dials.
    async fn reserve_or_dial(
        &self,
        dialer: &Dialer,
        source: &Workload,
        netns: &Netns,
        key: &Key,
    ) -> Result<(Pooled, StreamSlot), Error> {
        let waited_from = std::time::Instant::now();
        let gate = self.dialing.lock().unwrap_or_else(|p| p.into_inner()).entry(key.clone()).or_default().clone();
        let mut turn = gate.lock().await;
        let result = match (self.reserve(key), &*turn) {
            (Some(found), _) => Ok(found),
            (None, Some((at, why))) if *at >= waited_from => {
                Err(Error::Io { what: "HBONE dial (shared) to", addr: key.addr, source: io::Error::other(why.clone()) })
            }
            (None, _) => match self.dial(dialer, source, netns, key).await {
                Ok(pooled) => {
                    *turn = None;
                    self.conns
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .entry(key.clone())
                        .or_default()
                        .push(pooled.clone());
                    // No `?` here: the gate is let go of below whatever happens.
                    let slot = pooled.try_reserve(SystemTime::now());
                    slot.map(|slot| (pooled, slot)).ok_or(Error::Closed { addr: key.addr })
                }
                Err(e) => {
                    *turn = Some((std::time::Instant::now(), e.to_string()));
                    Err(e)
                }
            },
        };
        drop(turn);
        let mut dialing = self.dialing.lock().unwrap_or_else(|p| p.into_inner());
        // The map's and this call's: nobody else waits on this gate.
        if Arc::strong_count(&gate) <= 2 {
            dialing.remove(key);
        }
        result
    }

    /// One CONNECT stream to `target` on `pooled`.
    async fn open(&self, pooled: &Pooled, slot: StreamSlot, key: &Key, target: SocketAddr) -> Result<Tunnel, Error> {
        let stream = request_stream(pooled.sender.clone(), key.addr, target).await.inspect_err(|e| {
            if matches!(e, Error::Http { .. } | Error::Closed { .. }) {
                self.forget_closed(key);
            }
        })?;
        Ok(Tunnel { stream, _slot: Some(slot), target })
    }

    /// Takes every connection to `ips` out of the pool (new streams open new ones): a
    /// local pod stopped or its sandbox was recreated, so a pooled connection to its
    /// old listener leads nowhere, and would only be found dead by the next CONNECT.
    pub fn forget_addresses(&self, ips: &[std::net::IpAddr]) {
        let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        conns.retain(|key, _| !ips.contains(&key.addr.ip()));
    }

    /// Takes `pooled` out of the pool: no new stream goes on it (those open finish).
    fn retire(&self, key: &Key, pooled: &Pooled) {
        drop_where(&self.conns, key, |c| Arc::ptr_eq(&c.streams.0, &pooled.streams.0));
    }

    /// A pooled connection for `key` with room for one more stream, with the slot taken.
    /// Closed connections met on the way are dropped from the pool.
    fn reserve(&self, key: &Key) -> Option<(Pooled, StreamSlot)> {
        let now = SystemTime::now();
        let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        // Idle and expired connections anywhere in the pool go now (dropping the sender
        // closes the connection once its task sees no user left and no stream open).
        conns.retain(|_, list| {
            list.retain(|c| c.usable(now) && !c.idle_too_long(self.idle_timeout));
            !list.is_empty()
        });
        let list = conns.get_mut(key)?;
        let found = list.iter().find_map(|c| c.try_reserve(now).map(|slot| (c.clone(), slot)));
        if list.is_empty() {
            conns.remove(key);
        }
        found
    }

    fn forget_closed(&self, key: &Key) {
        drop_where(&self.conns, key, |c| c.streams.is_closed());
    }

    async fn dial(&self, dialer: &Dialer, source: &Workload, netns: &Netns, key: &Key) -> Result<Pooled, Error> {
        // The certificate the handshake presents is this one or a newer one.
        let own_not_after = dialer.certs.get(&source.identity)?.not_after;
        let tcp = sockets::connect_in(netns, key.addr, dialer.bypass_mark, CONNECT_TIMEOUT).await?;
        sockets::watch_liveness(&tcp);
        let (sender, conn, peer_not_after) =
            handshake(dialer, &source.identity, &key.destination, key.addr, tcp).await?;
        let (addr, streams, idle_timeout) = (key.addr, StreamCount::default(), self.idle_timeout);
        let (driven, conns, pooled_as) = (streams.clone(), self.conns.clone(), key.clone());
        tokio::spawn(async move {
            tokio::select! {
                result = conn => if let Err(e) = result {
                    tracing::debug!(%addr, error = %e, "HBONE connection closed");
                },
                () = driven.idle_past(idle_timeout) => {
                    tracing::debug!(%addr, ?idle_timeout, "HBONE connection idle; closed");
                }
            }
            driven.close();
            drop_where(&conns, &pooled_as, |c| Arc::ptr_eq(&c.streams.0, &driven.0));
        });
        tracing::debug!(source = %key.source_pod, destination = %key.destination, %addr, "HBONE connection opened");
        Ok(Pooled { sender, streams, peer_not_after, own_not_after })
    }
}

/// Drops `key`'s connections in `conns` that `gone` picks, and the key once it has none.
fn drop_where(conns: &Mutex<HashMap<Key, Vec<Pooled>>>, key: &Key, gone: impl Fn(&Pooled) -> bool) {
    let mut conns = conns.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(list) = conns.get_mut(key) {
        list.retain(|c| !gone(c));
        if list.is_empty() {
            conns.remove(key);
        }
    }
}

/// A driver of one HTTP/2 client connection over `Io`.
pub(crate) type Driver<Io> = h2::client::Connection<Coalesced<tokio_rustls::client::TlsStream<Io>>, Bytes>;

/// Mutual TLS as `source` with the HBONE server at `addr` over `io`, which must present
/// `destination`, then HTTP/2: the sender, the connection's driver (to be spawned), and
/// the notAfter of the certificate the server presented.
pub(crate) async fn handshake<Io>(
    dialer: &Dialer,
    source: &Identity,
    destination: &Identity,
    addr: SocketAddr,
    io: Io,
) -> Result<(SendRequest<Bytes>, Driver<Io>, SystemTime), Error>
where
    Io: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let tls =
        crate::identity::client_config(dialer.certs.clone(), source.clone(), destination.clone(), &dialer.verifier)?;
    // The server name is not used for verification (the SPIFFE identity is); it only
    // fills SNI, so an IP address (which rustls does not send as SNI) is enough.
    let name = ServerName::IpAddress(addr.ip().into());
    let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, TlsConnector::from(tls).connect(name, io)).await {
        Ok(Ok(s)) => s,
        Ok(Err(source)) => return Err(Error::Tls { addr, source }),
        Err(_) => return Err(Error::Timeout { what: "TLS handshake with", addr, after: HANDSHAKE_TIMEOUT }),
    };
    let peer_not_after = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .and_then(crate::identity::cert_not_after)
        // Verified, so it parses; were it not, the connection would take no stream.
        .unwrap_or(SystemTime::UNIX_EPOCH);
    let (sender, conn) = limits::hbone_client()
        .handshake(Coalesced::new(stream))
        .await
        .map_err(|source| Error::Http { addr, source })?;
    Ok((sender, conn, peer_not_after))
}

/// Sends a CONNECT for `target` on `sender` (a connection to the HBONE server at
/// `addr`) and returns the stream once the server answered 200. [`Error::Closed`] when
/// the connection was gone before the CONNECT left (so it is safe to send elsewhere).
pub(super) async fn request_stream(
    sender: SendRequest<Bytes>,
    addr: SocketAddr,
    target: SocketAddr,
) -> Result<H2Stream, Error> {
    // Before the request is queued, a failure means it never left: an ended connection
    // (its driver gone, the socket closed) is `Closed`; the peer's GOAWAY or refusal
    // stays an HTTP error, which the caller reads as such.
    let unsent = |source: h2::Error| {
        if source.is_io() || source.is_library() { Error::Closed { addr } } else { Error::Http { addr, source } }
    };
    let mut sender = sender.ready().await.map_err(unsent)?;
    let req = Request::builder()
        .method(Method::CONNECT)
        .uri(target.to_string())
        .body(())
        .expect("CONNECT request from a socket address is always valid");
    let (answer, send) = sender.send_request(req, false).map_err(unsent)?;
    let res = match tokio::time::timeout(limits::CONNECT_RESPONSE_TIMEOUT, answer).await {
        Ok(r) => r.map_err(|source| Error::Http { addr, source })?,
        Err(_) => {
            return Err(Error::Timeout { what: "CONNECT answer from", addr, after: limits::CONNECT_RESPONSE_TIMEOUT });
        }
    };
    if res.status() != StatusCode::OK {
        return Err(Error::Refused { addr, target, status: res.status() });
    }
    Ok(H2Stream::new(send, res.into_body()))
}

/// Whether a failed CONNECT never reached the peer's application: it never left an
/// ended connection ([`Error::Closed`]), the peer refused the stream unprocessed
/// (`REFUSED_STREAM`), or its GOAWAY named a last stream before it (RFC 9113 §6.8: such
/// streams were not processed; h2 fails every later stream, and every new one, with
/// the GOAWAY).
fn never_reached_the_peer(e: &Error) -> bool {
    match e {
        Error::Closed { .. } => true,
        Error::Http { source, .. } => {
            source.reason() == Some(h2::Reason::REFUSED_STREAM) || (source.is_go_away() && source.is_remote())
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{Pooled, StreamCount};

    #[test]
    fn stream_slots_are_capped_and_released_on_drop() {
        let count = StreamCount::default();
        let slots: Vec<_> = (0..3).map_while(|_| count.try_reserve(3)).collect();
        assert_eq!(slots.len(), 3);
        assert!(count.try_reserve(3).is_none(), "a full connection takes no more streams");
        drop(slots);
        assert!(count.try_reserve(3).is_some(), "dropped tunnels free their slots");
    }

    #[tokio::test]
    async fn a_connection_takes_no_stream_once_either_sides_certificate_expires() {
        let (io, _peer) = tokio::io::duplex(64 * 1024);
        let (sender, conn) = super::limits::hbone_client().handshake::<_, bytes::Bytes>(io).await.unwrap();
        tokio::spawn(conn);
        let pooled = |peer_not_after, own_not_after| Pooled {
            sender: sender.clone(),
            streams: StreamCount::default(),
            peer_not_after,
            own_not_after,
        };
        let now = std::time::SystemTime::now();
        let (valid, expired) = (now + Duration::from_secs(60), now - Duration::from_secs(1));
        assert!(pooled(valid, valid).try_reserve(now).is_some(), "valid: takes a stream");
        assert!(pooled(expired, valid).try_reserve(now).is_none(), "the peer's expired: takes none");
        assert!(pooled(valid, expired).try_reserve(now).is_none(), "its own expired: the peer would refuse it");
        let expiring = now + Duration::from_millis(500);
        assert!(pooled(valid, expiring).try_reserve(now).is_none(), "about to expire: a fresh connection instead");
        let ended = pooled(valid, valid);
        ended.streams.close();
        assert!(ended.try_reserve(now).is_none(), "its driver ended: takes none");
    }

    #[tokio::test]
    async fn a_connect_on_a_connection_whose_peer_is_gone_never_left_and_says_so() {
        let (io, peer) = tokio::io::duplex(64 * 1024);
        let client = super::limits::hbone_client();
        let handshake = tokio::spawn(async move { client.handshake::<_, bytes::Bytes>(io).await });
        // The peer answers the preface, then goes away.
        let mut server = super::limits::hbone_server().handshake::<_, bytes::Bytes>(peer).await.unwrap();
        let (sender, conn) = handshake.await.unwrap().unwrap();
        let driver = tokio::spawn(conn);
        let _ = tokio::time::timeout(Duration::from_millis(200), server.accept()).await;
        drop(server);
        let _ = tokio::time::timeout(Duration::from_secs(5), driver).await.expect("the driver ends with its peer");
        let addr = "10.0.0.2:15008".parse().unwrap();
        let sent = super::request_stream(sender, addr, "10.0.0.2:80".parse().unwrap()).await;
        assert!(matches!(sent, Err(super::Error::Closed { .. })), "safe to send again elsewhere: {sent:?}");
    }

    #[tokio::test]
    async fn a_connection_is_let_go_once_idle_past_its_timeout_and_not_before() {
        let count = StreamCount::default();
        let slot = count.try_reserve(1).unwrap();
        let timeout = Duration::from_millis(100);
        let open = tokio::time::timeout(Duration::from_millis(400), count.idle_past(timeout)).await;
        assert!(open.is_err(), "a connection with a stream open is not idle");
        drop(slot);
        let since = std::time::Instant::now();
        tokio::time::timeout(Duration::from_secs(10), count.idle_past(timeout)).await.expect("let go once idle");
        assert!(since.elapsed() >= timeout, "not before the timeout");
    }
}

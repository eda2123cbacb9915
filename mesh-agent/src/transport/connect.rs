//! [`Dialer`]: the one place that decides how a pod's connection reaches a destination.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::pool::{Pool, Tunnel};
use super::{Error, sockets};
use crate::dataplane::Netns;
use crate::identity::{CertStore, PeerVerifier};
use crate::snapshot::{Reach, Snapshot};
use crate::state::Workload;
use crate::traffic::external::ExternalTarget;

/// Reaches destinations for the pods of this node: over the HBONE tunnel (mutual TLS
/// as the source pod, to the destination's identity) when the destination is in the
/// mesh and its PeerAuthentication does not DISABLE the port, in plaintext from the
/// pod's network namespace otherwise.
#[derive(Debug, Clone)]
pub struct Dialer {
    /// Workload certificates of this node's pods.
    pub certs: Arc<CertStore>,
    /// Peer verification.
    pub verifier: PeerVerifier,
    /// Pooled HBONE connections.
    pub pool: Arc<Pool>,
    /// `SO_MARK` of the agent's own sockets, which the kernel programs let through.
    pub bypass_mark: u32,
}

impl Dialer {
    /// A dialer with an empty pool.
    pub fn new(certs: Arc<CertStore>, verifier: PeerVerifier, bypass_mark: u32) -> Self {
        Self { certs, verifier, pool: Arc::default(), bypass_mark }
    }

    /// This dialer with an empty pool whose tunnels close after `idle` without a stream.
    pub fn with_pool_idle_timeout(self, idle: Duration) -> Self {
        Self { pool: Arc::new(Pool::new(idle)), ..self }
    }

    /// Connects `source` (in `netns`) to `addr`, the address of `dest` when it is a
    /// workload the mesh knows; a plaintext connect gives up after `timeout`.
    pub async fn connect(
        &self,
        snapshot: &Snapshot,
        source: &Workload,
        netns: &Netns,
        dest: Option<&Workload>,
        addr: SocketAddr,
        timeout: Duration,
    ) -> Result<Upstream, Error> {
        match dest {
            Some(dest) if snapshot.tunnels_to(dest, addr.port()) => match snapshot.reach(dest) {
                Reach::Direct => Ok(Upstream::Tunnel(self.pool.connect(self, source, netns, dest, addr).await?)),
                Reach::Via(gateway) => {
                    Ok(Upstream::Tunnel(super::double::connect(self, source, netns, gateway, dest, addr).await?))
                }
                Reach::Unreachable => Err(Error::NoRoute { target: addr, network: dest.network.clone() }),
            },
            _ => Ok(Upstream::Plain(sockets::connect_in(netns, addr, self.bypass_mark, timeout).await?)),
        }
    }
}

impl Dialer {
    /// Connects `source` to a ServiceEntry's destination: over the tunnel when an
    /// address is a mesh pod (a MESH_INTERNAL entry's endpoints), in plaintext
    /// otherwise. Addresses are tried in turn until one answers; returns the one that
    /// did.
    pub async fn connect_external(
        &self,
        snapshot: &Snapshot,
        source: &Workload,
        netns: &Netns,
        target: &ExternalTarget,
    ) -> Result<(Upstream, SocketAddr), Error> {
        let addrs = match target {
            ExternalTarget::Dialed(a) => vec![*a],
            ExternalTarget::Addresses(list) => list.clone(),
            ExternalTarget::Lookup(host, port) => lookup(host, *port).await?,
        };
        let mut last = None;
        for addr in addrs {
            let dest = snapshot.workload_by_ip(addr.ip()).map(|w| &**w);
            match self.connect(snapshot, source, netns, dest, addr, super::CONNECT_TIMEOUT).await {
                Ok(up) => return Ok((up, addr)),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| Error::Lookup(format!("{target:?}: no address to connect to"))))
    }
}

/// How long a DNS lookup for a `resolution: DNS` entry may take.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);

/// The addresses of `host` (the agent's resolver), at `port`, within [`LOOKUP_TIMEOUT`].
pub async fn lookup(host: &str, port: u16) -> Result<Vec<SocketAddr>, Error> {
    let found = tokio::time::timeout(LOOKUP_TIMEOUT, tokio::net::lookup_host((host, port)))
        .await
        .map_err(|_| Error::Lookup(format!("DNS lookup of {host} timed out")))?
        .map_err(|e| Error::Lookup(format!("DNS lookup of {host}: {e}")))?;
    Ok(found.collect())
}

/// A connection [`Dialer::connect`] opened.
#[derive(Debug)]
pub enum Upstream {
    /// One CONNECT stream of a pooled HBONE connection.
    Tunnel(Tunnel),
    /// A plain TCP connection.
    Plain(TcpStream),
    /// TLS the agent opened itself toward a ServiceEntry's host (a DestinationRule's
    /// `tls.mode: SIMPLE`/`MUTUAL`, for a client speaking plaintext).
    Originated(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl Upstream {
    /// Whether it rides the mutual-TLS tunnel (the `mtls` label of connection metrics).
    pub fn is_tunnel(&self) -> bool {
        matches!(self, Upstream::Tunnel(_))
    }

    /// The address it reaches: the workload a tunnel carries to, or the TCP peer.
    pub fn peer(&self) -> Option<SocketAddr> {
        match self {
            Upstream::Tunnel(t) => Some(t.target),
            Upstream::Plain(tcp) => tcp.peer_addr().ok(),
            Upstream::Originated(tls) => tls.get_ref().0.peer_addr().ok(),
        }
    }
}

impl AsyncRead for Upstream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Upstream::Tunnel(t) => Pin::new(t).poll_read(cx, buf),
            Upstream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Upstream::Originated(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Upstream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Upstream::Tunnel(t) => Pin::new(t).poll_write(cx, buf),
            Upstream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Upstream::Originated(s) => Pin::new(s).poll_write(cx, buf),
        }
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Upstream::Tunnel(t) => Pin::new(t).poll_write_vectored(cx, bufs),
            Upstream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Upstream::Originated(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }
    fn is_write_vectored(&self) -> bool {
        match self {
            Upstream::Tunnel(t) => t.is_write_vectored(),
            Upstream::Plain(s) => s.is_write_vectored(),
            Upstream::Originated(s) => s.is_write_vectored(),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Upstream::Tunnel(t) => Pin::new(t).poll_flush(cx),
            Upstream::Plain(s) => Pin::new(s).poll_flush(cx),
            Upstream::Originated(s) => Pin::new(s).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Upstream::Tunnel(t) => Pin::new(t).poll_shutdown(cx),
            Upstream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Upstream::Originated(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

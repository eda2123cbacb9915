//! Sockets created inside a pod's network namespace.

use std::net::SocketAddr;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

use super::Error;
use crate::dataplane::Netns;

/// Backlog of the per-pod listeners.
const BACKLOG: i32 = 1024;

/// Binds a listener at `addr` inside `netns`.
pub fn listen_in(netns: &Netns, addr: SocketAddr) -> Result<TcpListener, Error> {
    listen(netns, addr, false)
}

/// Binds a listener on every address of `port` inside `netns`, IPv4 and IPv6 in one
/// socket (`[::]` with IPV6_V6ONLY off), so the kernel can steer connections of either
/// family to it; `0.0.0.0` where the namespace has no IPv6.
pub fn listen_dual_stack_in(netns: &Netns, port: u16) -> Result<TcpListener, Error> {
    match listen(netns, SocketAddr::new(std::net::Ipv6Addr::UNSPECIFIED.into(), port), true) {
        Ok(l) => Ok(l),
        Err(Error::Io { source, .. }) if source.raw_os_error() == Some(libc::EAFNOSUPPORT) => {
            listen(netns, SocketAddr::new(std::net::Ipv4Addr::UNSPECIFIED.into(), port), false)
        }
        Err(e) => Err(e),
    }
}

fn listen(netns: &Netns, addr: SocketAddr, dual_stack: bool) -> Result<TcpListener, Error> {
    let io = |source| Error::Io { what: "listen", addr, source };
    let std_listener = netns.run(|| -> std::io::Result<std::net::TcpListener> {
        let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        if dual_stack {
            s.set_only_v6(false)?;
        }
        s.set_reuse_address(true)?;
        // The outbound listener binds the pod's own address before the pod may have it
        // fully configured; freebind avoids a start-up race with the CNI.
        s.set_freebind_v4(true)?;
        s.set_nonblocking(true)?;
        s.bind(&addr.into())?;
        s.listen(BACKLOG)?;
        Ok(s.into())
    })?;
    TcpListener::from_std(std_listener.map_err(io)?).map_err(io)
}

/// Binds a UDP socket at `addr` inside `netns` (the pod's DNS proxy).
pub fn bind_udp_in(netns: &Netns, addr: SocketAddr) -> Result<UdpSocket, Error> {
    let io = |source| Error::Io { what: "bind", addr, source };
    let std_socket = netns.run(|| -> std::io::Result<std::net::UdpSocket> {
        let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
        if addr.is_ipv6() {
            s.set_only_v6(true)?;
        }
        // As for the listeners: the pod's address may not be configured yet.
        s.set_freebind_v4(true)?;
        s.set_nonblocking(true)?;
        s.bind(&addr.into())?;
        Ok(s.into())
    })?;
    UdpSocket::from_std(std_socket.map_err(io)?).map_err(io)
}

/// Connects to `addr` from inside `netns`, with the bypass mark set.
pub async fn connect_in(netns: &Netns, addr: SocketAddr, mark: u32, timeout: Duration) -> Result<TcpStream, Error> {
    connect(netns, addr, mark, timeout, false).await
}

/// Connects to the pod's own application at `addr` (an address of the pod) from inside
/// its `netns`, from that same address: the kernel's sk_lookup passes a connection whose
/// source is its destination, so the agent's delivery is never steered back to the
/// agent. Left to the kernel, a secondary address would be reached from the primary
/// one, and the delivery would loop through the agent for ever.
pub async fn deliver_in(netns: &Netns, addr: SocketAddr, mark: u32, timeout: Duration) -> Result<TcpStream, Error> {
    connect(netns, addr, mark, timeout, true).await
}

async fn connect(
    netns: &Netns,
    addr: SocketAddr,
    mark: u32,
    timeout: Duration,
    from_destination: bool,
) -> Result<TcpStream, Error> {
    let io = |source| Error::Io { what: "connect", addr, source };
    let socket = netns.run(|| -> std::io::Result<Socket> {
        let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        if mark != 0 {
            s.set_mark(mark)?;
        }
        if from_destination {
            // Port 0: any free port; the address (and an IPv6 link-local scope) is addr's.
            let mut source = addr;
            source.set_port(0);
            s.bind(&source.into())?;
        }
        s.set_tcp_nodelay(true)?;
        s.set_nonblocking(true)?;
        Ok(s)
    })?;
    let socket = tokio::net::TcpSocket::from_std_stream(socket.map_err(io)?.into());
    match tokio::time::timeout(timeout, socket.connect(addr)).await {
        Ok(r) => r.map_err(io),
        Err(_) => Err(Error::Timeout { what: "connect", addr, after: timeout }),
    }
}

/// `addr` with an IPv4-mapped IPv6 address written as IPv4 (what a dual-stack listener
/// reports for IPv4 peers); a native IPv6 address keeps its scope (link-local).
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), v6.port()),
            None => addr,
        },
        v4 => v4,
    }
}

/// Closes `stream` with a RST, so the client sees "connection reset" at once rather
/// than a clean end of stream it might mistake for an empty reply.
pub fn reset(stream: TcpStream) {
    if let Ok(std) = stream.into_std() {
        let s = Socket::from(std);
        let _ = s.set_linger(Some(Duration::ZERO));
    }
}

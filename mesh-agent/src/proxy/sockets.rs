//! Sockets created inside a pod's network namespace.

use std::net::SocketAddr;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpListener, TcpStream};

use super::Error;
use crate::dataplane::Netns;

/// Backlog of the per-pod listeners.
const BACKLOG: i32 = 1024;

/// Binds a listener at `addr` inside `netns`.
pub fn listen_in(netns: &Netns, addr: SocketAddr) -> Result<TcpListener, Error> {
    let io = |source| Error::Io { what: "listen", addr, source };
    let std_listener = netns.run(|| -> std::io::Result<std::net::TcpListener> {
        let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
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

/// Connects to `addr` from inside `netns`, with the bypass mark set.
pub async fn connect_in(netns: &Netns, addr: SocketAddr, mark: u32, timeout: Duration) -> Result<TcpStream, Error> {
    let io = |source| Error::Io { what: "connect", addr, source };
    let socket = netns.run(|| -> std::io::Result<Socket> {
        let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        if mark != 0 {
            s.set_mark(mark)?;
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

/// Closes `stream` with a RST, so the client sees "connection reset" at once rather
/// than a clean end of stream it might mistake for an empty reply.
pub fn reset(stream: TcpStream) {
    if let Ok(std) = stream.into_std() {
        let s = Socket::from(std);
        let _ = s.set_linger(Some(Duration::ZERO));
    }
}

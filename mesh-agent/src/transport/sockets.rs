//! Sockets created inside a pod's network namespace.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

use super::{Error, limits};
use mesh_common::{FlowKey, IpKey};

use crate::dataplane::Netns;
use crate::dataplane::transparent::{self, DeliveryRecord};

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
    connect(netns, addr, Source::Any, mark, timeout).await
}

/// Where a connection the agent makes in a pod's namespace comes from.
#[derive(Debug, Clone, Copy)]
enum Source<'r> {
    /// Wherever the kernel routes it from.
    Any,
    /// The address it goes to (the pod's own).
    Destination,
    /// The client's address, on a transparent socket with the delivery mark, recorded
    /// for the kernel while it connects.
    Client(IpAddr, &'r dyn DeliveryRecord),
}

/// Connects to the pod's own application at `addr` (an address of the pod) from inside
/// its `netns`, for `client`.
///
/// Where the namespace is set up for it ([`crate::dataplane::transparent`]), the
/// connection comes from the client's address, so the application sees who called
/// (as without a mesh). Otherwise, and for a client the pod cannot be shown (its own,
/// loopback, another family), it comes from `addr` itself: the kernel's sk_lookup
/// passes a connection whose source is its destination, so the agent's delivery is
/// never steered back to the agent (left to the kernel, a secondary address would be
/// reached from the primary one, and the delivery would loop through the agent).
pub async fn deliver_in(
    netns: &Netns,
    addr: SocketAddr,
    client: IpAddr,
    mark: u32,
    timeout: Duration,
) -> Result<TcpStream, Error> {
    if let Some((client, record)) = shown_client(netns, addr, client) {
        match connect(netns, addr, Source::Client(client, &*record), transparent::DELIVERY_MARK, timeout).await {
            // The client's address and a free port cannot pair with the destination
            // (a connection of the real client holds the 4-tuple), or the kernel's
            // table took no record: from the pod's own address.
            Err(Error::Io { source, .. })
                if matches!(source.raw_os_error(), Some(libc::EADDRNOTAVAIL | libc::EADDRINUSE | libc::ENOSPC)) => {}
            other => return other,
        }
    }
    connect(netns, addr, Source::Destination, mark, timeout).await
}

/// The client address a delivery to `addr` can come from, and where to record it, if
/// the namespace delivers transparently and the client is a remote unicast address of
/// `addr`'s family.
pub(crate) fn shown_client(
    netns: &Netns,
    addr: SocketAddr,
    client: IpAddr,
) -> Option<(IpAddr, std::sync::Arc<dyn DeliveryRecord>)> {
    let client = client.to_canonical();
    let remote_unicast = match client {
        IpAddr::V4(v4) => !(v4.is_loopback() || v4.is_unspecified() || v4.is_multicast() || v4.is_broadcast()),
        IpAddr::V6(v6) => !(v6.is_loopback() || v6.is_unspecified() || v6.is_multicast() || v6.is_unicast_link_local()),
    };
    if !remote_unicast || client.is_ipv4() != addr.is_ipv4() || client == addr.ip() {
        return None;
    }
    netns.transparent().map(|record| (client, record))
}

async fn connect(
    netns: &Netns,
    addr: SocketAddr,
    from: Source<'_>,
    mark: u32,
    timeout: Duration,
) -> Result<TcpStream, Error> {
    let io = |source| Error::Io { what: "connect", addr, source };
    let socket = netns.run(|| -> std::io::Result<Socket> {
        let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        if mark != 0 {
            s.set_mark(mark)?;
        }
        match from {
            Source::Any => {}
            Source::Destination => {
                // Port 0: any free port; the address (and an IPv6 link-local scope) is
                // addr's.
                let mut source = addr;
                source.set_port(0);
                s.bind(&source.into())?;
            }
            Source::Client(ip, _) => {
                if ip.is_ipv4() {
                    s.set_ip_transparent_v4(true)?;
                } else {
                    s.set_ip_transparent_v6(true)?;
                }
                s.bind(&SocketAddr::new(ip, 0).into())?;
            }
        }
        s.set_tcp_nodelay(true)?;
        s.set_nonblocking(true)?;
        Ok(s)
    })?;
    let socket = socket.map_err(io)?;
    // The delivery's 4-tuple, recorded until the connection is made (its SYN has then
    // been through the kernel's lookup), or the attempt ends any other way: fails,
    // times out, or is dropped because whoever asked went away. A record left behind
    // would let that 4-tuple past the kernel's steering later.
    let _recorded = match from {
        Source::Client(ip, record) => {
            let local = socket.local_addr().map_err(io)?.as_socket().map_or(0, |a| a.port());
            let flow = FlowKey {
                src: IpKey::from_ip(ip),
                dst: IpKey::from_ip(addr.ip()),
                src_port: u32::from(local),
                dst_port: u32::from(addr.port()),
            };
            if !record.begin(flow) {
                return Err(io(std::io::Error::from_raw_os_error(libc::ENOSPC)));
            }
            Some(Recorded { record, flow })
        }
        _ => None,
    };
    let socket = tokio::net::TcpSocket::from_std_stream(socket.into());
    match tokio::time::timeout(timeout, socket.connect(addr)).await {
        Ok(r) => r.map_err(io),
        Err(_) => Err(Error::Timeout { what: "connect", addr, after: timeout }),
    }
}

/// A delivery recorded for the kernel, forgotten when dropped.
struct Recorded<'r> {
    record: &'r dyn DeliveryRecord,
    flow: FlowKey,
}

impl Drop for Recorded<'_> {
    fn drop(&mut self) {
        self.record.end(&self.flow);
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

/// The socket mark of `stream`, when it can be read.
pub fn mark(stream: &TcpStream) -> Option<u32> {
    socket2::SockRef::from(stream).mark().ok()
}

/// Has the kernel find a dead peer of `stream`: keepalive probes once nothing was
/// received for [`limits::TCP_KEEPALIVE_IDLE`], and a bound on how long sent bytes may
/// go unacknowledged ([`limits::TCP_USER_TIMEOUT`]). Either closes the connection, and
/// the agent learns of it as of any close; until then an idle connection costs it no
/// wake-up (HTTP/2 pings would, each a TLS record to seal and open at both ends).
pub fn watch_liveness(stream: &TcpStream) {
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(limits::TCP_KEEPALIVE_IDLE)
        .with_interval(limits::TCP_KEEPALIVE_INTERVAL)
        .with_retries(limits::TCP_KEEPALIVE_PROBES);
    let socket = socket2::SockRef::from(stream);
    if let Err(e) =
        socket.set_tcp_keepalive(&keepalive).and_then(|()| socket.set_tcp_user_timeout(Some(limits::TCP_USER_TIMEOUT)))
    {
        tracing::debug!(error = %e, "TCP keepalive not set; the connection's pings while streams are open remain");
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_watched_socket_is_probed_by_the_kernel_once_idle() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        watch_liveness(&client);
        let socket = socket2::SockRef::from(&client);
        assert!(socket.keepalive().unwrap());
        assert_eq!(socket.tcp_keepalive_time().unwrap(), limits::TCP_KEEPALIVE_IDLE);
        assert_eq!(socket.tcp_keepalive_interval().unwrap(), limits::TCP_KEEPALIVE_INTERVAL);
        assert_eq!(socket.tcp_keepalive_retries().unwrap(), limits::TCP_KEEPALIVE_PROBES);
        assert_eq!(socket.tcp_user_timeout().unwrap(), Some(limits::TCP_USER_TIMEOUT));
    }
}

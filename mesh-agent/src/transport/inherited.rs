//! Sockets a predecessor agent handed over (`app::handoff`), taken in place of binding
//! new ones: the same listening socket stays in the kernel's tables across an upgrade,
//! and connections that arrive meanwhile wait in its backlog instead of being refused.
//!
//! A socket is found by what it is (TCP listener or UDP), the network namespace it lives
//! in (by inode) and the address it is bound to; each is checked against what the
//! kernel says of it before use, so a socket that is not what it was announced as is
//! closed, not served.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use socket2::{SockRef, Socket, Type};

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::Error;
use super::sockets::{self, canonical};
use crate::dataplane::Netns;

/// What a socket is, for matching one handed over with one about to be bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// A listening TCP socket.
    TcpListener,
    /// A bound UDP socket.
    Udp,
}

/// Names one handed-over socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SocketKey {
    /// TCP listener or UDP.
    pub kind: Kind,
    /// Inode of the network namespace it lives in.
    pub netns: u64,
    /// The address it is bound to (`getsockname`).
    pub addr: SocketAddr,
}

impl SocketKey {
    /// The key of `socket` in the namespace with inode `netns`, from the kernel's own
    /// account of its type and address.
    pub fn of(socket: &impl AsFd, netns: u64) -> std::io::Result<Self> {
        let s = SockRef::from(socket);
        let kind = match s.r#type()? {
            Type::STREAM => Kind::TcpListener,
            Type::DGRAM => Kind::Udp,
            _ => return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "neither TCP nor UDP")),
        };
        let addr = s
            .local_addr()?
            .as_socket()
            .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "not an IP socket"))?;
        Ok(Self { kind, netns, addr: canonical(addr) })
    }

    /// A descriptor of its own for `socket` (in the namespace with inode `netns`), with
    /// its key: what is handed to a successor while this agent keeps serving `socket`.
    pub fn copy_of(socket: &impl AsFd, netns: u64) -> std::io::Result<(Self, OwnedFd)> {
        Ok((Self::of(socket, netns)?, socket.as_fd().try_clone_to_owned()?))
    }
}

/// The sockets handed over and not taken yet.
#[derive(Debug, Default)]
pub struct Inherited {
    sockets: Mutex<HashMap<SocketKey, OwnedFd>>,
}

impl Inherited {
    /// Adds `socket`, announced as `key`. The type and address are checked here (the
    /// namespace cannot be read back from a socket without another ioctl; the
    /// predecessor is the same user, checked on its unix socket).
    pub fn insert(&self, key: SocketKey, socket: OwnedFd) -> std::io::Result<()> {
        let actual = SocketKey::of(&socket, key.netns)?;
        if actual != key {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("announced as {key:?}, the kernel says {actual:?}"),
            ));
        }
        if key.kind == Kind::TcpListener && !SockRef::from(&socket).is_listener()? {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{key:?} is not listening")));
        }
        self.lock().insert(key, socket);
        Ok(())
    }

    /// Takes the TCP listener bound to `addr` in namespace `netns`, if one was handed
    /// over, ready for tokio (non-blocking).
    pub fn tcp_listener(&self, netns: u64, addr: SocketAddr) -> Option<std::net::TcpListener> {
        self.take(Kind::TcpListener, netns, addr).map(Into::into)
    }

    /// Takes the UDP socket bound to `addr` in namespace `netns`, if one was handed over.
    pub fn udp(&self, netns: u64, addr: SocketAddr) -> Option<std::net::UdpSocket> {
        self.take(Kind::Udp, netns, addr).map(Into::into)
    }

    /// Takes the socket of `kind` bound to `addr` in namespace `netns`, non-blocking.
    fn take(&self, kind: Kind, netns: u64, addr: SocketAddr) -> Option<Socket> {
        let socket = Socket::from(self.lock().remove(&SocketKey { kind, netns, addr: canonical(addr) })?);
        socket.set_nonblocking(true).ok()?;
        Some(socket)
    }

    /// The listener on `addr` in `netns`: the one handed over, else a new one.
    pub fn listen_in(&self, netns: &Netns, addr: SocketAddr) -> Result<tokio::net::TcpListener, Error> {
        match self.tcp_listener(netns.inode(), addr) {
            Some(l) => tokio::net::TcpListener::from_std(l).map_err(|source| Error::Io { what: "adopt", addr, source }),
            None => sockets::listen_in(netns, addr),
        }
    }

    /// The dual-stack listener on `port` in `netns` ([`sockets::listen_dual_stack_in`]):
    /// the one handed over, else a new one.
    pub fn listen_dual_stack_in(&self, netns: &Netns, port: u16) -> Result<tokio::net::TcpListener, Error> {
        let any =
            [IpAddr::V6(Ipv6Addr::UNSPECIFIED), IpAddr::V4(Ipv4Addr::UNSPECIFIED)].map(|ip| SocketAddr::new(ip, port));
        for addr in any {
            if let Some(l) = self.tcp_listener(netns.inode(), addr) {
                return tokio::net::TcpListener::from_std(l).map_err(|source| Error::Io {
                    what: "adopt",
                    addr,
                    source,
                });
            }
        }
        sockets::listen_dual_stack_in(netns, port)
    }

    /// The UDP socket on `addr` in `netns`: the one handed over, else a new one.
    pub fn bind_udp_in(&self, netns: &Netns, addr: SocketAddr) -> Result<tokio::net::UdpSocket, Error> {
        match self.udp(netns.inode(), addr) {
            Some(s) => tokio::net::UdpSocket::from_std(s).map_err(|source| Error::Io { what: "adopt", addr, source }),
            None => sockets::bind_udp_in(netns, addr),
        }
    }

    /// How many are left.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether none is left.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Closes what was not taken (pods gone meanwhile, addresses changed) and says how
    /// many that was.
    pub fn close_rest(&self) -> usize {
        let mut sockets = self.lock();
        let n = sockets.len();
        sockets.clear();
        n
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SocketKey, OwnedFd>> {
        self.sockets.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listener_is_taken_once_by_namespace_and_address() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let inherited = Inherited::default();
        let fd = OwnedFd::from(listener);
        let key = SocketKey::of(&fd, 7).unwrap();
        assert_eq!(key, SocketKey { kind: Kind::TcpListener, netns: 7, addr });
        inherited.insert(key, fd).unwrap();
        assert!(inherited.tcp_listener(8, addr).is_none(), "another namespace");
        assert!(inherited.udp(7, addr).is_none(), "another kind");
        let taken = inherited.tcp_listener(7, addr).expect("handed over");
        assert_eq!(taken.local_addr().unwrap(), addr);
        assert!(inherited.tcp_listener(7, addr).is_none(), "taken once");
        // The same socket: a connection queued before the take is accepted after it.
        let _client = std::net::TcpStream::connect(addr).unwrap();
        taken.set_nonblocking(false).unwrap();
        assert!(taken.accept().is_ok());
    }

    #[test]
    fn a_socket_that_is_not_what_it_was_announced_as_is_refused() {
        let inherited = Inherited::default();
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = udp.local_addr().unwrap();
        let lie = SocketKey { kind: Kind::TcpListener, netns: 1, addr };
        assert!(inherited.insert(lie, OwnedFd::from(udp)).is_err());

        let bound = socket2::Socket::new(socket2::Domain::IPV4, Type::STREAM, None).unwrap();
        bound.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into()).unwrap();
        let addr = bound.local_addr().unwrap().as_socket().unwrap();
        let not_listening = SocketKey { kind: Kind::TcpListener, netns: 1, addr };
        assert!(inherited.insert(not_listening, OwnedFd::from(bound)).is_err());
        assert!(inherited.is_empty());
    }
}

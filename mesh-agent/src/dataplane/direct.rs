//! The direct path between two pods of this node. The agent admits the first
//! connection of a pair (client pod, peer pod's address and port) itself; when the
//! verdict depends on nothing but the pair, it writes the pair to `DIRECT_PAIRS`, and
//! the pair's next connections go from the client's socket straight to the peer's
//! application, one TCP connection through the node's bridge, without the agent
//! (see `mesh-ebpf`, `goes_direct`).
//!
//! Invariants:
//! - a pair is in `DIRECT_PAIRS` only while the config in force would admit it and
//!   would do nothing with it but pass its bytes: the agent re-judges every pair (and
//!   every open direct connection) on each config change, and at start;
//! - a direct connection reaches the peer's application only if the client's own
//!   socket recorded its flow, bound to the client pod's own address, for the peer
//!   pod's netns (`DIRECT_FLOWS`, checked by the peer's `sk_lookup`);
//! - nothing goes direct while the agent does not serve the peer pod (its inbound
//!   listener, which a dead agent's exit removes, must be in the kernel's table);
//! - the agent keeps no state per direct connection: the tables are the kernel's, the
//!   metrics come from `DIRECT_EVENTS`, and a connection a new config refuses is
//!   closed by `SOCK_DESTROY` in the client's network namespace.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd as _, OwnedFd};
use std::sync::Mutex;

use aya::maps::{HashMap as BpfHashMap, MapData, PerCpuArray, RingBuf};
use mesh_common::{DirectEvent, DirectFlow, DirectPair, DirectPairKey, FlowKey, IpKey, direct_stats};
use nix::sys::socket::{self, AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType};

use super::Netns;

/// The direct path's tables, each behind its own lock (none is taken with another).
pub struct DirectPath {
    pairs: Mutex<BpfHashMap<MapData, DirectPairKey, DirectPair>>,
    flows: Mutex<BpfHashMap<MapData, FlowKey, DirectFlow>>,
    events: Mutex<RingBuf<MapData>>,
    stats: PerCpuArray<MapData, u64>,
}

impl std::fmt::Debug for DirectPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirectPath").finish_non_exhaustive()
    }
}

/// A direct connection, as its client sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirectFlowAddrs {
    /// The client's address (its pod's own).
    pub client: SocketAddr,
    /// The peer pod's address and port.
    pub server: SocketAddr,
}

/// What `DIRECT_EVENTS` reported of one direct connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DirectReport {
    /// Established.
    Opened(DirectFlowAddrs),
    /// Closed, with its bytes: client to server (`sent`), server to client
    /// (`received`).
    Closed {
        /// The connection.
        flow: DirectFlowAddrs,
        /// Bytes the client sent (acknowledged by the server).
        sent: u64,
        /// Bytes the client received.
        received: u64,
    },
}

/// A port as the tables hold it (host order, in a u32).
fn port(p: u32) -> u16 {
    u16::try_from(p).unwrap_or(0)
}

fn addrs(flow: &FlowKey) -> DirectFlowAddrs {
    DirectFlowAddrs {
        client: SocketAddr::new(flow.src.to_ip(), port(flow.src_port)),
        server: SocketAddr::new(flow.dst.to_ip(), port(flow.dst_port)),
    }
}

impl DirectPath {
    pub(super) fn new(
        pairs: BpfHashMap<MapData, DirectPairKey, DirectPair>,
        flows: BpfHashMap<MapData, FlowKey, DirectFlow>,
        events: RingBuf<MapData>,
        stats: PerCpuArray<MapData, u64>,
    ) -> Self {
        Self { pairs: Mutex::new(pairs), flows: Mutex::new(flows), events: Mutex::new(events), stats }
    }

    /// Lets `client`'s next connections to `server` go direct, to the application in
    /// the netns of inode `netns`.
    pub fn admit(&self, client: IpAddr, server: SocketAddr, netns: u64) -> Result<(), super::Error> {
        let key = pair_key(client, server);
        let mut pairs = self.pairs.lock().unwrap_or_else(|p| p.into_inner());
        pairs.insert(key, DirectPair { netns }, 0).map_err(super::map_err(mesh_common::maps::DIRECT_PAIRS))
    }

    /// The pairs admitted now: `(client pod address, server address)`.
    pub fn pairs(&self) -> Vec<(IpAddr, SocketAddr)> {
        let pairs = self.pairs.lock().unwrap_or_else(|p| p.into_inner());
        pairs
            .keys()
            .filter_map(Result::ok)
            .map(|k| (k.src.to_ip(), SocketAddr::new(k.dst.to_ip(), port(k.dst_port))))
            .collect()
    }

    /// Takes the pair out: its next connection goes to the agent again.
    pub fn forget(&self, client: IpAddr, server: SocketAddr) {
        let mut pairs = self.pairs.lock().unwrap_or_else(|p| p.into_inner());
        let _ = pairs.remove(&pair_key(client, server));
    }

    /// The direct connections open now.
    pub fn flows(&self) -> Vec<DirectFlowAddrs> {
        let flows = self.flows.lock().unwrap_or_else(|p| p.into_inner());
        flows.keys().filter_map(Result::ok).map(|k| addrs(&k)).collect()
    }

    /// Hands every report queued in `DIRECT_EVENTS` to `each`, oldest first.
    pub fn drain(&self, mut each: impl FnMut(DirectReport)) {
        let mut events = self.events.lock().unwrap_or_else(|p| p.into_inner());
        while let Some(item) = events.next() {
            let Some(event) = read_event(&item) else { continue };
            let flow = addrs(&event.flow);
            match event.kind {
                mesh_common::DIRECT_OPENED => each(DirectReport::Opened(flow)),
                mesh_common::DIRECT_CLOSED => {
                    each(DirectReport::Closed { flow, sent: event.sent, received: event.received })
                }
                _ => {}
            }
        }
    }

    /// A descriptor of `DIRECT_EVENTS` that turns readable when the kernel wakes its
    /// reader (once a quarter of the buffer is filled), for an event loop to wait on.
    pub fn wake_fd(&self) -> io::Result<OwnedFd> {
        use std::os::fd::AsFd as _;
        self.events.lock().unwrap_or_else(|p| p.into_inner()).as_fd().try_clone_to_owned()
    }

    /// What the direct path did so far, summed over the CPUs, by
    /// `mesh_common::direct_stats` index.
    pub fn stats(&self) -> [u64; direct_stats::COUNT as usize] {
        super::summed_per_cpu(&self.stats)
    }
}

fn pair_key(client: IpAddr, server: SocketAddr) -> DirectPairKey {
    DirectPairKey {
        src: IpKey::from_ip(client),
        dst: IpKey::from_ip(server.ip()),
        dst_port: u32::from(server.port()),
        _pad: 0,
    }
}

fn read_event(bytes: &[u8]) -> Option<DirectEvent> {
    if bytes.len() < size_of::<DirectEvent>() {
        return None;
    }
    // SAFETY: at least size_of::<DirectEvent>() bytes; DirectEvent is plain old data
    // (aya::Pod) and read unaligned.
    #[expect(unsafe_code, reason = "a ring buffer record is bytes; DirectEvent is aya::Pod")]
    let event = unsafe { bytes.as_ptr().cast::<DirectEvent>().read_unaligned() };
    Some(event)
}

/// `SOCK_DESTROY` from `linux/sock_diag.h`.
const SOCK_DESTROY: u16 = 21;
/// `INET_DIAG_NOCOOKIE`: match by address, not by cookie.
const NO_COOKIE: u32 = u32::MAX;
/// Every TCP state (`idiag_states`).
const ALL_STATES: u32 = u32::MAX;

/// Closes the TCP connection `local -> remote` in `netns` (the kernel aborts it: the
/// peer gets a reset). Returns false when no such socket exists (closed already).
pub fn destroy(netns: &Netns, local: SocketAddr, remote: SocketAddr) -> io::Result<bool> {
    let fd: OwnedFd = netns
        .run(|| {
            socket::socket(AddressFamily::Netlink, SockType::Raw, SockFlag::SOCK_CLOEXEC, SockProtocol::NetlinkSockDiag)
        })
        .map_err(io::Error::other)?
        .map_err(io::Error::from)?;
    let request = destroy_request(local, remote);
    socket::sendto(fd.as_raw_fd(), &request, &NetlinkAddr::new(0, 0), MsgFlags::empty()).map_err(io::Error::from)?;
    let mut answer = [0u8; 512];
    let n = socket::recv(fd.as_raw_fd(), &mut answer, MsgFlags::empty()).map_err(io::Error::from)?;
    // An NLMSG_ERROR: the header, then the errno (0: done).
    let errno = answer.get(16..20).filter(|_| n >= 20).map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
    match errno {
        Some(0) => Ok(true),
        Some(e) if -e == libc::ENOENT => Ok(false),
        Some(e) => Err(io::Error::from_raw_os_error(-e)),
        None => Err(io::Error::other("short answer to SOCK_DESTROY")),
    }
}

/// A `SOCK_DESTROY` request (`nlmsghdr` + `inet_diag_req_v2`) for one TCP socket.
fn destroy_request(local: SocketAddr, remote: SocketAddr) -> Vec<u8> {
    let (family, words) = match (local.ip(), remote.ip()) {
        (IpAddr::V4(l), IpAddr::V4(r)) => (libc::AF_INET as u8, [v4_words(l.octets()), v4_words(r.octets())]),
        (l, r) => (libc::AF_INET6 as u8, [v6_words(l), v6_words(r)]),
    };
    let mut m = Vec::with_capacity(72);
    m.extend_from_slice(&72u32.to_ne_bytes());
    m.extend_from_slice(&SOCK_DESTROY.to_ne_bytes());
    m.extend_from_slice(&((libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16).to_ne_bytes());
    m.extend_from_slice(&1u32.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.extend_from_slice(&[family, libc::IPPROTO_TCP as u8, 0, 0]);
    m.extend_from_slice(&ALL_STATES.to_ne_bytes());
    m.extend_from_slice(&local.port().to_be_bytes());
    m.extend_from_slice(&remote.port().to_be_bytes());
    for word in words.iter().flatten() {
        m.extend_from_slice(word);
    }
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.extend_from_slice(&NO_COOKIE.to_ne_bytes());
    m.extend_from_slice(&NO_COOKIE.to_ne_bytes());
    debug_assert_eq!(m.len(), 72);
    m
}

fn v4_words(octets: [u8; 4]) -> [[u8; 4]; 4] {
    [octets, [0; 4], [0; 4], [0; 4]]
}

fn v6_words(ip: IpAddr) -> [[u8; 4]; 4] {
    let o = match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    };
    std::array::from_fn(|i| [o[i * 4], o[i * 4 + 1], o[i * 4 + 2], o[i * 4 + 3]])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destroy_request_is_an_inet_diag_request_for_the_four_tuple() {
        let local: SocketAddr = "10.10.1.2:40000".parse().unwrap();
        let remote: SocketAddr = "10.10.1.3:9000".parse().unwrap();
        let m = destroy_request(local, remote);
        assert_eq!(m.len(), 72);
        assert_eq!(u16::from_ne_bytes([m[4], m[5]]), SOCK_DESTROY);
        assert_eq!(m[16], libc::AF_INET as u8);
        assert_eq!(m[17], libc::IPPROTO_TCP as u8);
        assert_eq!(&m[24..26], &40000u16.to_be_bytes());
        assert_eq!(&m[26..28], &9000u16.to_be_bytes());
        assert_eq!(&m[28..32], &[10, 10, 1, 2]);
        assert_eq!(&m[44..48], &[10, 10, 1, 3]);
    }

    /// A real connection on loopback, closed from outside by its addresses: the
    /// peer sees a reset. Needs CAP_NET_ADMIN (SOCK_DESTROY); skipped without it.
    #[test]
    fn destroy_closes_a_live_connection_by_its_addresses() {
        use std::io::Read as _;
        if !nix::unistd::Uid::effective().is_root() {
            eprintln!("skipping: SOCK_DESTROY needs CAP_NET_ADMIN");
            return;
        }
        let netns = Netns::host().unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut server, _) = listener.accept().unwrap();
        let (local, remote) = (client.local_addr().unwrap(), client.peer_addr().unwrap());
        assert!(destroy(&netns, local, remote).unwrap(), "the socket was found");
        server.set_read_timeout(Some(std::time::Duration::from_secs(5))).unwrap();
        let mut byte = [0u8; 1];
        let read = server.read(&mut byte);
        assert!(
            matches!(&read, Err(e) if e.kind() == io::ErrorKind::ConnectionReset) || matches!(read, Ok(0)),
            "the peer saw {read:?}"
        );
        assert!(!destroy(&netns, local, remote).unwrap(), "gone the second time");
    }
}

//! Delivery that shows the application its client's address, as ztunnel's in-pod mode
//! does: the agent connects to the application from the client's IP (a transparent
//! socket), and the pod's namespace routes the application's answers back to that
//! socket instead of out of the pod.
//!
//! How, in the pod's namespace only:
//! - the agent's delivery socket carries [`DELIVERY_MARK`]; with
//!   `net.ipv4.tcp_fwmark_accept` on, the application's accepted socket inherits the
//!   mark of the SYN that opened it (both address families);
//! - a rule sends packets with that mark to [`ROUTE_TABLE`], whose only route makes
//!   every destination local: the answers reach the agent's socket, never the wire;
//! - with `fwmark_reflect` on, so do the kernel's own answers to the delivery (the RST
//!   of a port nothing listens on), so a dead application is refused at once.
//!
//! Nothing else in the namespace carries the mark (the agent's other sockets carry the
//! bypass mark, and connections arriving from outside have their mark cleared when
//! they cross into the namespace), so the pod's own traffic routes as before.
//!
//! The kernel's sk_lookup would steer the delivery's SYN (from the client's address, to
//! the application's port) back to the agent, as it does the client's own: the agent
//! records each delivery's 4-tuple in `DELIVERIES` for the length of its `connect()`
//! ([`DeliveryRecord`]), and sk_lookup passes what it finds there.

use std::io;
use std::sync::Mutex;

use aya::maps::{HashMap as BpfHashMap, MapData};
use mesh_common::FlowKey;
use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE, NLM_F_REQUEST, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::route::{RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType};
use netlink_packet_route::rule::{RuleAction, RuleAttribute, RuleMessage};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{Socket, SocketAddr as NetlinkAddr, protocols::NETLINK_ROUTE};

use super::{Error, Netns};

/// The socket mark of the agent's delivery connections, and so of the application's
/// side of them (distinct from the bypass mark, which the agent's outbound sockets
/// carry and which must keep routing normally).
pub const DELIVERY_MARK: u32 = 1338;
/// The routing table with the one local route.
pub const ROUTE_TABLE: u32 = 1338;
/// The rule's priority: before the main table (32766).
const RULE_PRIORITY: u32 = 32764;
/// `lo` is interface 1 in every namespace.
const LOOPBACK_IFINDEX: u32 = 1;

/// Where the agent records a transparent delivery while it connects, so the kernel
/// lets that connection through to the application.
pub trait DeliveryRecord: Send + Sync + std::fmt::Debug {
    /// Records `flow` (client -> application); false if it could not be recorded.
    fn begin(&self, flow: FlowKey) -> bool;
    /// Forgets `flow`.
    fn end(&self, flow: &FlowKey);
}

/// The kernel's `DELIVERIES` table.
#[derive(Debug)]
pub struct Deliveries(Mutex<BpfHashMap<MapData, FlowKey, u8>>);

impl Deliveries {
    /// The table, taken from the loaded object.
    pub(super) fn new(map: BpfHashMap<MapData, FlowKey, u8>) -> Self {
        Self(Mutex::new(map))
    }
}

impl DeliveryRecord for Deliveries {
    fn begin(&self, flow: FlowKey) -> bool {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).insert(flow, 1, 0).is_ok()
    }

    fn end(&self, flow: &FlowKey) {
        let _ = self.0.lock().unwrap_or_else(|p| p.into_inner()).remove(flow);
    }
}

/// Sets the pod's namespace up for transparent delivery (idempotent: a restarted
/// agent finds its rule and route in place). Never touches the agent's own namespace.
pub fn prepare(netns: &Netns) -> Result<(), Error> {
    enable_mark_inheritance(netns)?;
    let fail = |what: &str, source: io::Error| Error::Io {
        path: format!("{} ({what})", netns.path().display()).into(),
        source,
    };
    netns.run(|| -> Result<(), Error> {
        let mut socket = Socket::new(NETLINK_ROUTE).map_err(|e| fail("netlink socket", e))?;
        socket.bind_auto().map_err(|e| fail("netlink bind", e))?;
        socket.connect(&NetlinkAddr::new(0, 0)).map_err(|e| fail("netlink connect", e))?;
        for family in [AddressFamily::Inet, AddressFamily::Inet6] {
            let added = add_rule(&socket, family).and_then(|()| add_local_route(&socket, family));
            match added {
                Ok(()) => {}
                // A namespace without IPv6 (disabled in the kernel or for the pod).
                Err(e) if family == AddressFamily::Inet6 && e.raw_os_error() == Some(libc::EAFNOSUPPORT) => {}
                Err(e) => return Err(fail(&format!("{family:?} rule and route"), e)),
            }
        }
        Ok(())
    })?
}

/// The sysctl that makes accepted sockets inherit their SYN's mark.
const FWMARK_ACCEPT: &str = "/proc/sys/net/ipv4/tcp_fwmark_accept";
/// The sysctls that give the kernel's own answers (a RST from a closed port, an ICMP
/// error) the mark of the packet they answer, per address family: a delivery to a port
/// nothing listens on is then refused at once, as the RST reaches the agent's socket
/// instead of leaving for the client's address, where it would be lost and the
/// connect would wait out its timeout.
const FWMARK_REFLECT: [&str; 2] = ["/proc/sys/net/ipv4/fwmark_reflect", "/proc/sys/net/ipv6/fwmark_reflect"];

/// Turns `net.ipv4.tcp_fwmark_accept` and `fwmark_reflect` on in the calling thread's
/// namespace, unless they are already: a container's `/proc/sys` is read-only, so in a
/// cluster the CNI plugin (which runs on the node) turns them on as the pod's sandbox
/// starts, and the agent only reads them.
fn inherit_marks() -> io::Result<()> {
    for path in std::iter::once(FWMARK_ACCEPT).chain(FWMARK_REFLECT) {
        // A kernel without IPv6 has no IPv6 sysctls, and no IPv6 delivery to refuse.
        if path.contains("ipv6") && !std::path::Path::new(path).exists() {
            continue;
        }
        if std::fs::read_to_string(path)?.trim() != "1" {
            std::fs::write(path, b"1")?;
        }
    }
    Ok(())
}

/// [`inherit_marks`] in `netns` (never the agent's own): what the CNI plugin does for
/// each pod sandbox it hands the agent, and the first step of [`prepare`]. Harmless for
/// a pod the mesh never captures: connections arriving from outside the namespace have
/// no mark to inherit.
pub fn enable_mark_inheritance(netns: &Netns) -> Result<(), Error> {
    if netns.is_host() {
        return Err(Error::Sys { call: "tcp_fwmark_accept".into(), source: nix::errno::Errno::EPERM });
    }
    let path = format!("{} ({FWMARK_ACCEPT})", netns.path().display());
    netns.run(inherit_marks)?.map_err(|source| Error::Io { path: path.into(), source })
}

/// `ip rule add fwmark DELIVERY_MARK lookup ROUTE_TABLE pref RULE_PRIORITY`; an
/// existing one is kept.
fn add_rule(socket: &Socket, family: AddressFamily) -> io::Result<()> {
    let mut rule = RuleMessage::default();
    rule.header.family = family;
    rule.header.table = RouteHeader::RT_TABLE_UNSPEC;
    rule.header.action = RuleAction::ToTable;
    rule.attributes = vec![
        RuleAttribute::FwMark(DELIVERY_MARK),
        RuleAttribute::FwMask(u32::MAX),
        RuleAttribute::Table(ROUTE_TABLE),
        RuleAttribute::Priority(RULE_PRIORITY),
    ];
    match request(socket, RouteNetlinkMessage::NewRule(rule), NLM_F_CREATE | NLM_F_EXCL) {
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
        other => other,
    }
}

/// `ip route replace local default dev lo table ROUTE_TABLE`.
fn add_local_route(socket: &Socket, family: AddressFamily) -> io::Result<()> {
    let mut route = RouteMessage::default();
    route.header.address_family = family;
    route.header.destination_prefix_length = 0;
    route.header.table = RouteHeader::RT_TABLE_UNSPEC;
    route.header.protocol = RouteProtocol::Static;
    route.header.scope = RouteScope::Host;
    route.header.kind = RouteType::Local;
    route.attributes = vec![RouteAttribute::Table(ROUTE_TABLE), RouteAttribute::Oif(LOOPBACK_IFINDEX)];
    request(socket, RouteNetlinkMessage::NewRoute(route), NLM_F_CREATE | NLM_F_REPLACE)
}

/// Sends one request and reads the kernel's acknowledgement.
fn request(socket: &Socket, message: RouteNetlinkMessage, flags: u16) -> io::Result<()> {
    let mut req = NetlinkMessage::from(message);
    req.header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
    req.finalize();
    let mut out = vec![0u8; req.buffer_len()];
    req.serialize(&mut out);
    socket.send(&out, 0)?;
    let mut answer = Vec::with_capacity(8192);
    socket.recv(&mut answer, 0)?;
    let reply = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&answer).map_err(io::Error::other)?;
    match reply.payload {
        NetlinkPayload::Error(e) => match e.code {
            None => Ok(()),
            Some(code) => Err(io::Error::from_raw_os_error(-code.get())),
        },
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, SocketAddr};
    use std::process::Command;
    use std::sync::Arc;

    use mesh_common::IpKey;
    use std::time::Duration;

    use super::*;
    use crate::transport::sockets;

    /// A network namespace of the test's own, with an address on one end of a veth pair;
    /// removed however the test ends.
    struct TestNetns(String);

    impl TestNetns {
        fn create(name: &str, cidr: &str) -> Option<Self> {
            let ip = |args: &[&str]| Command::new("ip").args(args).status().is_ok_and(|s| s.success());
            if !ip(&["netns", "add", name]) {
                return None;
            }
            let ns = Self(name.to_string());
            let ok = ip(&["-n", name, "link", "set", "lo", "up"])
                && ip(&["-n", name, "link", "add", "pod0", "type", "veth", "peer", "name", "pod1"])
                && ip(&["-n", name, "addr", "add", cidr, "dev", "pod0"])
                && ip(&["-n", name, "link", "set", "pod0", "up"])
                && ip(&["-n", name, "link", "set", "pod1", "up"]);
            ok.then_some(ns)
        }
    }

    impl Drop for TestNetns {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
        }
    }

    /// The deliveries a test saw recorded (no kernel table: nothing is attached to the
    /// test's namespace).
    #[derive(Debug, Default)]
    struct Recorded(Mutex<Vec<(FlowKey, bool)>>);

    impl DeliveryRecord for Recorded {
        fn begin(&self, flow: FlowKey) -> bool {
            self.0.lock().unwrap().push((flow, true));
            true
        }

        fn end(&self, flow: &FlowKey) {
            self.0.lock().unwrap().push((*flow, false));
        }
    }

    #[test]
    fn only_a_remote_client_of_the_same_family_is_shown() {
        let netns = Netns::host().unwrap();
        let pod: SocketAddr = "10.0.0.2:8080".parse().unwrap();
        let shown = |pod: SocketAddr, client: &str| {
            sockets::shown_client(&netns, pod, client.parse().unwrap()).map(|(ip, _)| ip.to_string())
        };
        assert_eq!(shown(pod, "10.0.1.7"), None, "not set up: from the pod's own address");
        netns.set_transparent(Some(Arc::new(Recorded::default())));
        assert_eq!(shown(pod, "10.0.1.7").as_deref(), Some("10.0.1.7"));
        assert_eq!(shown(pod, "::ffff:10.0.1.7").as_deref(), Some("10.0.1.7"), "a dual-stack listener's IPv4 peer");
        for other in ["10.0.0.2", "127.0.0.1", "0.0.0.0", "224.0.0.1", "fd00::7", "::1"] {
            assert_eq!(shown(pod, other), None, "{other}");
        }
        let pod6: SocketAddr = "[fd00::2]:8080".parse().unwrap();
        assert_eq!(shown(pod6, "fd00::7").as_deref(), Some("fd00::7"));
        assert_eq!(shown(pod6, "fe80::7"), None, "link-local: no scope");
    }

    #[tokio::test]
    async fn the_application_sees_the_client_address_and_answers_it() {
        let name = format!("mesh-transparent-{}", std::process::id());
        let Some(_ns) = TestNetns::create(&name, "10.123.0.2/24") else {
            // Not root, or no iproute2: nothing of the kernel side can be tried.
            assert!(std::env::var_os("MESH_REQUIRE_LAB").is_none(), "cannot create a network namespace here");
            eprintln!("skipping: `ip netns add` failed here (needs root and iproute2)");
            return;
        };
        Netns::init_host().unwrap();
        let netns = Netns::open(std::path::Path::new(&format!("/run/netns/{name}"))).unwrap();
        prepare(&netns).unwrap();
        prepare(&netns).expect("a second run finds its rule and route in place");
        let recorded = Arc::new(Recorded::default());
        netns.set_transparent(Some(recorded.clone()));
        let rules = Command::new("ip").args(["-n", &name, "rule"]).output().unwrap();
        let rules = String::from_utf8_lossy(&rules.stdout);
        assert_eq!(rules.matches("fwmark 0x53a lookup 1338").count(), 1, "{rules}");
        let app = netns.run(|| std::net::TcpListener::bind("10.123.0.2:0")).unwrap().unwrap();
        app.set_nonblocking(true).unwrap();
        let app = tokio::net::TcpListener::from_std(app).unwrap();
        let at = app.local_addr().unwrap();

        let client: IpAddr = "10.77.0.5".parse().unwrap();
        let delivered = sockets::deliver_in(&netns, at, client, 0, Duration::from_secs(5));
        let (delivered, accepted) = tokio::join!(delivered, app.accept());
        let (mut delivered, (mut served, peer)) = (delivered.unwrap(), accepted.unwrap());
        assert_eq!(peer.ip(), client, "the application sees the client's address");
        let flow = FlowKey {
            src: IpKey::from_ip(client),
            dst: IpKey::from_ip(at.ip()),
            src_port: u32::from(peer.port()),
            dst_port: u32::from(at.port()),
        };
        assert_eq!(*recorded.0.lock().unwrap(), [(flow, true), (flow, false)], "recorded while it connected");
        // The application's answers come back to the agent's socket, not out of the pod.
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        served.write_all(b"hello").await.unwrap();
        let mut buf = [0u8; 5];
        tokio::time::timeout(Duration::from_secs(5), delivered.read_exact(&mut buf)).await.unwrap().unwrap();
        assert_eq!(&buf, b"hello");

        // An attempt abandoned half-way (whoever asked went away while the SYN waited:
        // here, an application whose accept queue is full) forgets its record too.
        let full = netns
            .run(|| {
                let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
                s.bind(&SocketAddr::from(([10, 123, 0, 2], 0)).into())?;
                s.listen(0)?;
                Ok::<_, io::Error>(s)
            })
            .unwrap()
            .unwrap();
        let full_at = full.local_addr().unwrap().as_socket().unwrap();
        // Backlog 0: one connection waiting to be accepted fills the queue.
        let _queued = netns.run(|| std::net::TcpStream::connect(full_at)).unwrap().unwrap();
        recorded.0.lock().unwrap().clear();
        let abandoned = sockets::deliver_in(&netns, full_at, client, 0, Duration::from_secs(5));
        assert!(tokio::time::timeout(Duration::from_millis(300), abandoned).await.is_err(), "the SYN waits");
        let seen = recorded.0.lock().unwrap().clone();
        assert_eq!(seen.len(), 2, "{seen:?}");
        assert_eq!((seen[0].0, seen[0].1, seen[1].1), (seen[1].0, true, false), "begun, then forgotten on drop");

        // Not set up: from the pod's own address, as before.
        netns.set_transparent(None);
        let delivered = sockets::deliver_in(&netns, at, client, 0, Duration::from_secs(5));
        let (_, accepted) = tokio::join!(delivered, app.accept());
        assert_eq!(accepted.unwrap().1.ip(), at.ip());
    }

    #[test]
    fn the_agents_own_namespace_is_never_changed() {
        let host = Netns::host().unwrap();
        assert!(prepare(&host).is_err());
    }
}

//! The kernel ABI shared by `mesh-ebpf` and the agent: map names, map keys and values.
//!
//! **API boundary.** Every type here is read by kernel programs and by user space, so its
//! layout is defined once, here: `#[repr(C)]`, explicit padding, `u32` where a `bool` would
//! leave implicit padding. Changing a layout means the agent and the kernel object must be
//! rebuilt together; pinned maps from an older layout are rejected by the loader (size
//! mismatch) rather than misread.
//!
//! Addresses are kept as four `u32` words in network byte order, exactly as the kernel
//! exposes them in `bpf_sock_addr.user_ip6` / `bpf_sock_ops.local_ip6`; IPv4 addresses are
//! stored in their IPv4-mapped IPv6 form (`::ffff:a.b.c.d`) so one key type serves both
//! families. Ports are kept in host byte order.
#![no_std]

#[cfg(feature = "user")]
mod user;
#[cfg(feature = "user")]
pub use user::ip4_word;

/// Agent listener ports inside every enrolled pod's network namespace.
pub mod ports {
    /// Outbound capture: `connect()` of enrolled pods is redirected here.
    pub const OUTBOUND: u16 = 15001;
    /// Inbound plaintext: `sk_lookup` steers connections for the pod's ports here.
    pub const INBOUND_PLAINTEXT: u16 = 15006;
    /// Inbound HBONE (HTTP/2 CONNECT over mTLS).
    pub const INBOUND_HBONE: u16 = 15008;
    /// Node-level admin server (config dump, health).
    pub const ADMIN: u16 = 15000;
    /// Node-level Prometheus metrics.
    pub const METRICS: u16 = 15020;
    /// Node-level readiness probe.
    pub const READINESS: u16 = 15021;
    /// DNS proxy (UDP): a pod's queries to port 53 are sent here when its DNS is
    /// captured.
    pub const DNS: u16 = 15053;
    /// The port DNS queries are sent to, and the only one whose UDP is captured.
    pub const DNS_SERVER: u16 = 53;

    /// Ports the mesh owns; the kernel never steers or redirects connections to them.
    pub const MESH_OWNED: [u16; 7] = [OUTBOUND, INBOUND_PLAINTEXT, INBOUND_HBONE, ADMIN, METRICS, READINESS, DNS];

    /// True for the ports of the agent's own listeners inside a pod's network namespace
    /// (15001, 15006, 15008): `sk_lookup` leaves them to the agent. The node-level
    /// ports (15000, 15020, 15021) are not among them: inside a pod they belong to the
    /// application, whose connections are judged like any other.
    #[inline(always)]
    pub fn is_agent_in_pod(port: u16) -> bool {
        port == OUTBOUND || port == INBOUND_PLAINTEXT || port == INBOUND_HBONE
    }

    /// True when `port` is one of [`MESH_OWNED`].
    #[inline(always)]
    pub fn is_mesh_owned(port: u16) -> bool {
        // Written as a chain, not a loop: the verifier of older kernels rejects the
        // bounded loop the iterator compiles to in some optimisation levels.
        port == OUTBOUND
            || port == INBOUND_PLAINTEXT
            || port == INBOUND_HBONE
            || port == ADMIN
            || port == METRICS
            || port == READINESS
            || port == DNS
    }
}

/// Names of the maps, shared so that a rename cannot split kernel and agent.
pub mod maps {
    /// `Array<MeshConfig>` with one entry.
    pub const MESH_CONFIG: &str = "MESH_CONFIG";
    /// `HashMap<u64 cgroup id, PodInfo>`: enrolled pods, keyed by their cgroup v2 id.
    pub const ENROLLED_PODS: &str = "ENROLLED_PODS";
    /// `LruHashMap<u64 socket cookie, OrigDst>`: written by connect4/6.
    pub const COOKIE_ORIG_DST: &str = "COOKIE_ORIG_DST";
    /// `LruHashMap<SockAddrKey, OrigDst>`: client address -> original destination,
    /// written by sockops once the redirected connection is established.
    pub const ORIG_DST: &str = "ORIG_DST";
    /// `HashMap<u32 port, u32>`: outbound destination ports never redirected.
    pub const EXCLUDED_PORTS: &str = "EXCLUDED_PORTS";
    /// `HashMap<u64 netns inode, NetnsPod>`: the enrolled pod whose network namespace
    /// this is. Each pod's `sk_lookup` instance knows its netns (a load-time constant,
    /// [`crate::globals::NETNS_INO`]), so every address of the pod, whatever a tenant
    /// adds, is judged as the pod's, and no address decides which pod a connection is
    /// for.
    pub const NETNS_PODS: &str = "NETNS_PODS";
    /// `SockMap`: the agent's inbound plaintext listener of each pod, at its slot.
    pub const INBOUND_LISTENERS: &str = "INBOUND_LISTENERS";
    /// `HashMap<NetnsPortKey, u32>`: plaintext verdicts (`PLAINTEXT_*`) for enrolled
    /// pods' ports; port 0 holds the pod's verdict for every port without an entry.
    pub const PLAINTEXT_POLICY: &str = "PLAINTEXT_POLICY";
    /// `LruHashMap<FlowKey, u32>`: the open connections of the node's kubelet (written
    /// by `mesh_probe_sockops`, attached to the kubelet's cgroup only). Plaintext on
    /// one of these reaches a pod's application whatever its policy: a probe.
    pub const PROBE_FLOWS: &str = "PROBE_FLOWS";
    /// `PerCpuArray<u64>` with one entry: probe connections let through.
    pub const PROBE_STATS: &str = "PROBE_STATS";
    /// `LruHashMap<FlowKey, u8>`: the agent's transparent deliveries being connected
    /// (client address -> pod address), written by the agent around its `connect()`;
    /// `mesh_sk_lookup` passes them to the application instead of steering them back
    /// to the agent.
    pub const DELIVERIES: &str = "DELIVERIES";
    /// `PerCpuArray<u64>` with [`crate::events::COUNT`] entries: what the kernel side
    /// did, by [`crate::events`] index.
    pub const KERNEL_EVENTS: &str = "KERNEL_EVENTS";
    /// `SockHash<u64 socket cookie>`: both sockets of each connection the kernel
    /// splices (a client's and the agent's delivery, once admitted). Not pinned: the
    /// sockets are the running agent's own, and go with it.
    pub const SPLICE_SOCKETS: &str = "SPLICE_SOCKETS";
    /// `HashMap<u64 socket cookie, SpliceEnd>`: for each socket in `SPLICE_SOCKETS`,
    /// the socket its bytes go to and how many have gone. Not pinned.
    pub const SPLICE_ENDS: &str = "SPLICE_ENDS";
    /// `HashMap<u64 socket cookie, SpliceLimit>`: the agent's flow control of each
    /// socket in `SPLICE_SOCKETS`. Not pinned.
    pub const SPLICE_LIMITS: &str = "SPLICE_LIMITS";
    /// `LruHashMap<DirectPairKey, DirectPair>`: the agent's admission cache for
    /// connections between two pods of this node: a pod's `connect()` to a peer pod's
    /// address and port found here goes straight to the peer, not to the agent. The
    /// agent writes an entry only for a verdict that depends on nothing but the key,
    /// and re-judges the table on every config change and at start.
    pub const DIRECT_PAIRS: &str = "DIRECT_PAIRS";
    /// `LruHashMap<u64 socket cookie, DirectPending>`: a direct `connect()` between
    /// the connect hook and the socket's SYN, where its flow is recorded.
    pub const DIRECT_PENDING: &str = "DIRECT_PENDING";
    /// `HashMap<FlowKey, DirectFlow>`: the open direct connections (client's view),
    /// from the SYN to the client socket's close. `mesh_sk_lookup` passes these to the
    /// application; the agent re-judges them when the config changes.
    pub const DIRECT_FLOWS: &str = "DIRECT_FLOWS";
    /// `HashMap<IpKey, u32>`: open direct connections per client pod address, so
    /// one pod cannot fill `DIRECT_FLOWS` for the others.
    pub const DIRECT_PER_POD: &str = "DIRECT_PER_POD";
    /// `RingBuf` of [`crate::DirectEvent`]: direct connections opened and closed, with
    /// their bytes, for the agent's metrics.
    pub const DIRECT_EVENTS: &str = "DIRECT_EVENTS";
    /// `PerCpuArray<u64>` with [`crate::direct_stats::COUNT`] entries.
    pub const DIRECT_STATS: &str = "DIRECT_STATS";
    /// Socket cookie -> the DNS server a pod's UDP socket last asked (LRU).
    pub const DNS_ORIG_DST: &str = "DNS_ORIG_DST";
    /// aya-log's ring buffer. Pinned so that every per-pod `sk_lookup` instance writes
    /// to the one buffer the agent reads, instead of each load creating its own.
    pub const AYA_LOGS: &str = "AYA_LOGS";
}

/// Globals set at load time (`EbpfLoader::override_global`).
pub mod globals {
    /// `u64`: the inode of the network namespace an `sk_lookup` instance is attached to.
    /// One instance is loaded per enrolled pod; an `sk_lookup` program has no helper
    /// that names its netns on every kernel the mesh supports.
    pub const NETNS_INO: &str = "NETNS_INO";
}

/// Program names (the Rust function names in `mesh-ebpf`).
pub mod programs {
    /// `cgroup/connect4`.
    pub const CONNECT4: &str = "mesh_connect4";
    /// `cgroup/connect6`.
    pub const CONNECT6: &str = "mesh_connect6";
    /// `sockops`.
    pub const SOCKOPS: &str = "mesh_sockops";
    /// `cgroup/getpeername4`.
    pub const GETPEERNAME4: &str = "mesh_getpeername4";
    /// `cgroup/getpeername6`.
    pub const GETPEERNAME6: &str = "mesh_getpeername6";
    /// `sk_lookup`.
    pub const SK_LOOKUP: &str = "mesh_sk_lookup";
    /// `sockops` on the kubelet's cgroup: records its connections in `PROBE_FLOWS`.
    pub const PROBE_SOCKOPS: &str = "mesh_probe_sockops";
    /// `cgroup/sendmsg4`: DNS queries sent with an address (unconnected UDP).
    pub const SENDMSG4: &str = "mesh_sendmsg4";
    /// `cgroup/sendmsg6`.
    pub const SENDMSG6: &str = "mesh_sendmsg6";
    /// `cgroup/recvmsg4`: DNS answers shown as coming from the server the pod asked.
    pub const RECVMSG4: &str = "mesh_recvmsg4";
    /// `cgroup/recvmsg6`.
    pub const RECVMSG6: &str = "mesh_recvmsg6";
    /// `sk_skb/stream_verdict` on `SPLICE_SOCKETS`: sends what a spliced socket
    /// receives out of its peer socket.
    pub const SPLICE: &str = "mesh_splice";
    /// Every `cgroup_sock_addr` program, all attached to the node's cgroup.
    pub const CGROUP_SOCK_ADDR: [&str; 8] =
        [CONNECT4, CONNECT6, GETPEERNAME4, GETPEERNAME6, SENDMSG4, SENDMSG6, RECVMSG4, RECVMSG6];
}

/// Indexes of `KERNEL_EVENTS`: what the kernel programs did with a socket.
pub mod events {
    /// A pod's TCP `connect()` sent to the agent's outbound listener.
    pub const OUTBOUND_REDIRECTED: u32 = 0;
    /// A pod's DNS query sent to the agent's DNS proxy.
    pub const DNS_REDIRECTED: u32 = 1;
    /// A connection to a pod steered to the agent's inbound listener.
    pub const INBOUND_STEERED: u32 = 2;
    /// Plaintext to a pod dropped by its policy (STRICT, or no plaintext peer allowed).
    pub const PLAINTEXT_DROPPED: u32 = 3;
    /// A connection to an enrolled pod dropped: its agent listener is gone.
    pub const NO_LISTENER_DROPPED: u32 = 4;
    /// A connection dropped in a netns whose pod entry is gone (being replaced).
    pub const UNKNOWN_POD_DROPPED: u32 = 5;
    /// A connect or DNS query refused: its original destination could not be recorded.
    pub const RECORD_FAILED: u32 = 6;
    /// Entries.
    pub const COUNT: u32 = 7;
    /// Their names, as the agent's metrics label them.
    pub const NAMES: [&str; COUNT as usize] = [
        "outbound_redirected",
        "dns_redirected",
        "inbound_steered",
        "plaintext_dropped",
        "no_listener_dropped",
        "unknown_pod_dropped",
        "record_failed",
    ];
}

/// Indexes of `DIRECT_STATS`: what the direct path between pods of one node did.
pub mod direct_stats {
    /// A `connect()` sent straight to a peer pod (the admission cache had its pair).
    pub const CONNECTED: u32 = 0;
    /// A direct connection's SYN passed to the application by the peer pod's
    /// `sk_lookup` (a SYN sent again, as when the application's backlog is full,
    /// counts again).
    pub const DELIVERED: u32 = 1;
    /// A direct connection's flow could not be recorded: the peer pod's `sk_lookup`
    /// steers it to the agent, which judges it as plaintext (fail closed).
    pub const RECORD_FAILED: u32 = 2;
    /// Close events lost because the ring buffer was full (their bytes are not counted).
    pub const EVENTS_LOST: u32 = 3;
    /// Entries.
    pub const COUNT: u32 = 4;
    /// Their names, as the agent's metrics label them.
    pub const NAMES: [&str; COUNT as usize] =
        ["direct_connected", "direct_delivered", "direct_record_failed", "direct_events_lost"];
}

/// Capacity of the maps; sizes are per node.
pub mod capacity {
    /// Enrolled pods per node (Kubernetes' default is 110 pods per node).
    pub const PODS: u32 = 4096;
    /// Connections whose original destination is remembered. An LRU map: an entry is
    /// needed only between `connect()` and the agent's `accept()`, so the oldest going
    /// first under pressure is the right eviction.
    pub const CONNECTIONS: u32 = 65536;
    /// UDP sockets whose DNS queries were sent to the agent, remembered so answers
    /// show the server the pod asked (an LRU map: a resolver's socket lives for one
    /// lookup, and nothing tells the kernel side when it closes).
    pub const DNS_SOCKETS: u32 = 16384;
    /// Excluded ports.
    pub const EXCLUDED_PORTS: u32 = 256;
    /// Plaintext verdict entries one pod may hold: its default and up to 15 ports. A
    /// pod whose policies would need more gets no kernel verdicts at all (the agent,
    /// which judges everything the kernel passes, still refuses what they refuse), so
    /// one pod's policy can never use up the table for the others.
    pub const PLAINTEXT_PER_POD: u32 = 16;
    /// Open connections of the kubelet remembered at once (an LRU map: the kubelet
    /// runs a few probes per pod at a time).
    pub const PROBE_FLOWS: u32 = 16384;
    /// Deliveries being connected at once (an LRU map: each entry lives for one
    /// `connect()`).
    pub const DELIVERIES: u32 = 16384;
    /// Sockets spliced in the kernel at once (two a connection); a connection that
    /// finds the table full is copied by the agent instead.
    pub const SPLICED_SOCKETS: u32 = 65536;
    /// Pairs in the direct path's admission cache (an LRU map: an evicted pair only
    /// sends its next connection through the agent again).
    pub const DIRECT_PAIRS: u32 = 16384;
    /// Direct connections open at once on the node.
    pub const DIRECT_FLOWS: u32 = 131_072;
    /// Direct connections one client pod may hold open; past it, its connections go
    /// through the agent (and its caps) as before.
    pub const DIRECT_PER_POD: u32 = 2048;
    /// Bytes of the direct path's event ring buffer (a power of two, pages): about 1600
    /// reports (80 bytes each). The agent maps it (twice over, as the kernel does for a
    /// ring), so its size is resident in the agent; the kernel wakes the agent once a
    /// quarter of it is filled, so a burst of connections is read in time rather than
    /// lost.
    pub const DIRECT_EVENTS_BYTES: u32 = 128 * 1024;
    /// Plaintext verdicts: [`PLAINTEXT_PER_POD`] for every pod.
    pub const PLAINTEXT_POLICY: u32 = PODS * PLAINTEXT_PER_POD;
}

/// `PodInfo.flags`: the pod's traffic is captured.
pub const POD_FLAG_ENROLLED: u32 = 1;
/// `PodInfo.flags`: the pod has an IPv6 address in `ip6`.
pub const POD_FLAG_HAS_IP6: u32 = 2;
/// `PodInfo.flags`: the pod's DNS queries (UDP to port 53) go to the agent's DNS proxy
/// at `<pod ip>:15053`.
pub const POD_FLAG_DNS: u32 = 4;

/// `MeshConfig.flags`: the agent is up and configured. When zero, capture still
/// redirects (fail closed) but nothing else is assumed.
pub const CONFIG_FLAG_READY: u32 = 1;

/// An address in network byte order; IPv4 as `::ffff:a.b.c.d`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct IpKey {
    /// The 16 address bytes as four words, network byte order, as the kernel stores them.
    pub words: [u32; 4],
}

impl IpKey {
    /// `::ffff:0:0/96` prefix word, network order on the wire, as read on a little- or
    /// big-endian host by a plain `u32` load of bytes `00 00 ff ff`.
    pub const V4_MAPPED_WORD: u32 = u32::from_be(0x0000_ffff);

    /// Maps an IPv4 address (network-order word, as in `bpf_sock_addr.user_ip4`).
    #[inline(always)]
    pub const fn from_v4(ip4_be: u32) -> Self {
        Self { words: [0, 0, Self::V4_MAPPED_WORD, ip4_be] }
    }

    /// True for `::ffff:a.b.c.d`.
    #[inline(always)]
    pub const fn is_v4_mapped(&self) -> bool {
        self.words[0] == 0 && self.words[1] == 0 && self.words[2] == Self::V4_MAPPED_WORD
    }
}

/// A pod's `metadata.uid`, as its 16 UUID bytes. The kernel never reads it: it makes
/// the pinned tables the agent's durable record of which pod an entry is for, so a
/// restarted agent keeps the capture of a pod it cannot serve yet (fail closed) and
/// removes only the entries of pods that are gone.
pub type PodUidBytes = [u8; 16];

/// Value of `ENROLLED_PODS` (key: the pod's cgroup v2 id).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PodInfo {
    /// The pod's IPv4 address, network order; outbound connections are redirected to
    /// `ip4:15001` so the client's source address is unique on the node.
    pub ip4: u32,
    /// `POD_FLAG_*`.
    pub flags: u32,
    /// The pod's IPv6 address if `POD_FLAG_HAS_IP6`.
    pub ip6: IpKey,
    /// The pod's UID (agent's record).
    pub uid: PodUidBytes,
}

/// Original destination of a redirected connection.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct OrigDst {
    /// Destination address (IPv4-mapped for IPv4).
    pub ip: IpKey,
    /// Destination port, host order.
    pub port: u16,
    /// 4 or 6: the family the client used in `connect()`.
    pub family: u16,
    /// Explicit padding.
    pub _pad: u32,
}

/// Key of `ORIG_DST`: the client end of a redirected connection as the agent sees its
/// peer on `accept()`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct SockAddrKey {
    /// Client address (IPv4-mapped for IPv4).
    pub ip: IpKey,
    /// Client port, host order (u32 so there is no implicit padding).
    pub port: u32,
}

/// Value of `NETNS_PODS` (key: the inode of the pod's network namespace).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct NetnsPod {
    /// Index of this pod's plaintext listener in `INBOUND_LISTENERS`.
    pub slot: u32,
    /// Reserved; plaintext verdicts live in `PLAINTEXT_POLICY`, per port.
    pub flags: u32,
    /// The pod's UID (agent's record).
    pub uid: PodUidBytes,
}

/// Key of `PLAINTEXT_POLICY`: an enrolled pod's network namespace and one of its ports
/// (0: the pod's default for ports without an entry).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct NetnsPortKey {
    /// Inode of the pod's network namespace.
    pub netns: u64,
    /// Port, host order (u32 so there is no implicit padding).
    pub port: u32,
    /// Explicit padding.
    pub _pad: u32,
}

/// Key of `PROBE_FLOWS` and `DELIVERIES`: a TCP connection as its client sees it (the
/// pod sees the same four values from the other end, no address translation in
/// between).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FlowKey {
    /// Client address (the kubelet's, or the client the agent delivers for).
    pub src: IpKey,
    /// Server (pod) address.
    pub dst: IpKey,
    /// Client port, host order.
    pub src_port: u32,
    /// Server port, host order.
    pub dst_port: u32,
}

/// Value of `SPLICE_ENDS`: one socket of a connection spliced in the kernel, written
/// by the verdict program only.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SpliceEnd {
    /// Cookie of the socket that sends what this one receives.
    pub peer: u64,
    /// Bytes this socket received that the kernel handed to its peer.
    pub taken: u64,
    /// Bytes this socket received that the kernel held back for the agent (queued
    /// on this socket itself, charged to it, so TCP closes its window as they pile up).
    pub passed: u64,
    /// 1 while the kernel holds this socket's bytes back for the agent.
    pub held: u32,
    /// Padding.
    pub _pad: u32,
}

/// Value of `SPLICE_LIMITS`: the agent's side of a spliced socket's flow control,
/// written by the agent only.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SpliceLimit {
    /// The kernel may hand on bytes while `taken` stays within this; past it, it holds
    /// them back (so what waits in the kernel for a slow peer is bounded). The agent
    /// raises it as the peer socket takes what the kernel handed on.
    pub allowance: u64,
    /// Bytes the agent has read of what was held back and written to the peer: once it
    /// equals `passed`, the kernel may hand on again without overtaking them.
    pub copied: u64,
}

/// Key of `DIRECT_PAIRS`: a client pod (by its own address, which the kernel knows
/// from its cgroup, never from anything the pod chose) and the peer pod's address and
/// port it dialed.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct DirectPairKey {
    /// The client pod's address (IPv4-mapped for IPv4).
    pub src: IpKey,
    /// The peer pod's address, as dialed.
    pub dst: IpKey,
    /// The port dialed, host order.
    pub dst_port: u32,
    /// Padding.
    pub _pad: u32,
}

/// Value of `DIRECT_PAIRS` and `DIRECT_FLOWS`: where a direct connection may be
/// delivered.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct DirectPair {
    /// Inode of the peer pod's network namespace: its `sk_lookup` passes the
    /// connection only there, whatever claims the address on the node's bridge.
    pub netns: u64,
}

/// Value of `DIRECT_PENDING`: a direct `connect()` waiting for its SYN.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct DirectPending {
    /// The client pod's own address: a socket bound to any other is not recorded (its
    /// SYN then reaches the agent as plaintext).
    pub src: IpKey,
    /// As in [`DirectPair`].
    pub netns: u64,
}

/// Value of `DIRECT_FLOWS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct DirectFlow {
    /// As in [`DirectPair`].
    pub netns: u64,
    /// 1 once the client saw the connection established (its close is reported then).
    pub established: u32,
    /// Padding.
    pub _pad: u32,
}

/// [`DirectEvent::kind`]: the client saw the connection established.
pub const DIRECT_OPENED: u32 = 1;
/// [`DirectEvent::kind`]: the client's socket closed; its bytes are final.
pub const DIRECT_CLOSED: u32 = 2;

/// A record of `DIRECT_EVENTS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct DirectEvent {
    /// The connection, as its client sees it.
    pub flow: FlowKey,
    /// `DIRECT_OPENED` or `DIRECT_CLOSED`.
    pub kind: u32,
    /// Padding.
    pub _pad: u32,
    /// Bytes the client sent that the server acknowledged.
    pub sent: u64,
    /// Bytes the client received.
    pub received: u64,
}

/// `PLAINTEXT_POLICY` value: plaintext goes to the agent, which judges it.
pub const PLAINTEXT_ALLOW: u32 = 0;
/// `PLAINTEXT_POLICY` value: plaintext is dropped in the kernel (STRICT mTLS, or no
/// policy could allow a connection without a peer identity).
pub const PLAINTEXT_DROP: u32 = 1;

/// Value of `MESH_CONFIG[0]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct MeshConfig {
    /// `SO_MARK` value that exempts a socket from capture (0: none).
    pub bypass_mark: u32,
    /// `CONFIG_FLAG_*`.
    pub flags: u32,
}

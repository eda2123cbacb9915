//! Kernel side of the mesh: capture of enrolled pods' TCP connections.
//!
//! * `cgroup/connect4` / `cgroup/connect6` (attached to the node's cgroup subtree):
//!   redirect TCP `connect()` of enrolled pods to the agent's outbound listener at
//!   `<pod ip>:15001`, remembering the original destination by socket cookie.
//! * `sockops` (same cgroup): once the redirected connection is established, re-key the
//!   original destination by the client's address, which is what the agent sees on
//!   `accept()`.
//! * `cgroup/getpeername4` / `getpeername6`: show the application its original peer.
//! * DNS capture, for pods whose `PodInfo` has `POD_FLAG_DNS`: UDP to port 53 is sent
//!   to the agent's DNS proxy at `<pod ip>:15053`, by `connect4`/`connect6` for a
//!   connected socket and `cgroup/sendmsg4`/`sendmsg6` for a datagram sent with an
//!   address; `cgroup/recvmsg4`/`recvmsg6` (and `getpeername`) show the answers as
//!   coming from the server the pod asked, so resolvers that check the source accept
//!   them.
//! * `sk_lookup` (one instance per enrolled pod, attached to its netns, which it knows
//!   by a load-time constant): steer inbound connections to any address of the pod to
//!   the agent's plaintext inbound listener in that netns (not the agent's own
//!   deliveries to the application, which `DELIVERIES` records while they connect);
//!   drop them when the agent is
//!   not there (fail closed) or when the pod's plaintext verdict for the port is to
//!   drop (PeerAuthentication STRICT, or authorization no plaintext peer could pass).
//!
//! * The direct path between two pods of this node: once the agent has admitted a
//!   pair (client pod, peer pod address, port) whose verdict depends on nothing else,
//!   it writes the pair to `DIRECT_PAIRS`; `connect4`/`connect6` then leave that
//!   pair's next connections unredirected (while the agent serves the peer pod),
//!   `sockops` records each one's flow in `DIRECT_FLOWS` just before its SYN and
//!   reports it opened and closed (with its bytes) in `DIRECT_EVENTS`, and the peer
//!   pod's `sk_lookup` passes exactly those flows, in exactly that netns, to the
//!   application. The agent re-judges what `DIRECT_PAIRS` and `DIRECT_FLOWS` hold on
//!   every config change, and takes out (closes) what it would not send direct.
//! * `sk_skb/stream_verdict` on `SPLICE_SOCKETS`: a connection the agent has admitted
//!   and only copies from then on (its client's socket and the agent's delivery to the
//!   application, both the agent's) is spliced here: what one socket receives is sent
//!   out of the other, counted in `SPLICE_ENDS`, without waking user space. The agent
//!   keeps both sockets, so it still sees the ends, closes what a policy change
//!   refuses, and takes the connections with it when it dies.
//!
//! Every program is a thin wrapper around a `try_*` function so the body can use `?`;
//! nothing here waits on user space, and an unknown pod passes through untouched.
#![no_std]
#![no_main]

use core::ffi::c_void;

use aya_ebpf::{
    Global,
    bindings::{
        BPF_F_NO_PREALLOC, BPF_NOEXIST, BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP,
        BPF_SK_LOOKUP_F_REPLACE, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_TCP_CLOSE, bpf_sock_addr,
    },
    helpers::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_socket_cookie,
        generated::{bpf_map_lookup_elem, bpf_map_lookup_percpu_elem, bpf_sk_release},
    },
    macros::{cgroup_sock_addr, map, sk_lookup, sock_ops, stream_verdict},
    maps::{Array, HashMap, LruHashMap, LruPerCpuHashMap, PerCpuArray, RingBuf, SockHash, SockMap},
    programs::{SkBuffContext, SkLookupContext, SockAddrContext, SockOpsContext},
};
use aya_log_ebpf::{debug, warn};
use mesh_common::{
    CONFIG_FLAG_READY, DIRECT_CLOSED, DIRECT_OPENED, DirectEvent, DirectFlow, DirectPair, DirectPairKey, DirectPending,
    FlowKey, IpKey, MeshConfig, NetnsPod, NetnsPortKey, OrigDst, PLAINTEXT_DROP, POD_FLAG_DNS, POD_FLAG_ENROLLED,
    POD_FLAG_HAS_IP6, PodInfo, SockAddrKey, SpliceEnd, SpliceLimit, capacity, direct_stats, events, ports,
};

/// `cgroup_sock_addr` verdicts.
const ALLOW: i32 = 1;
const REJECT: i32 = 0;
/// `sk_lookup` verdicts.
const SK_PASS: u32 = 1;
const SK_DROP: u32 = 0;

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
const IPPROTO_TCP: u32 = 6;
const IPPROTO_UDP: u32 = 17;
/// 127.0.0.0/8 in network order, as the first byte of `user_ip4`.
const LOOPBACK_FIRST_OCTET: u32 = 127;

// Maps are pinned by name under the agent's per-node bpffs directory, so a restarted
// agent (and the links it left pinned) keep using the same tables.
#[map(name = "MESH_CONFIG")]
static MESH_CONFIG: Array<MeshConfig> = Array::pinned(1, 0);

#[map(name = "ENROLLED_PODS")]
static ENROLLED_PODS: HashMap<u64, PodInfo> = HashMap::pinned(capacity::PODS, 0);

#[map(name = "COOKIE_ORIG_DST")]
static COOKIE_ORIG_DST: LruHashMap<u64, OrigDst> = LruHashMap::pinned(capacity::CONNECTIONS, 0);

#[map(name = "ORIG_DST")]
static ORIG_DST: LruHashMap<SockAddrKey, OrigDst> = LruHashMap::pinned(capacity::CONNECTIONS, 0);

#[map(name = "EXCLUDED_PORTS")]
static EXCLUDED_PORTS: HashMap<u32, u32> = HashMap::pinned(capacity::EXCLUDED_PORTS, 0);

#[map(name = "NETNS_PODS")]
static NETNS_PODS: HashMap<u64, NetnsPod> = HashMap::pinned(capacity::PODS, 0);

#[map(name = "INBOUND_LISTENERS")]
static INBOUND_LISTENERS: SockMap = SockMap::pinned(capacity::PODS, 0);

#[map(name = "PLAINTEXT_POLICY")]
static PLAINTEXT_POLICY: HashMap<NetnsPortKey, u32> = HashMap::pinned(capacity::PLAINTEXT_POLICY, 0);

#[map(name = "PROBE_FLOWS")]
static PROBE_FLOWS: LruHashMap<FlowKey, u32> = LruHashMap::pinned(capacity::PROBE_FLOWS, 0);

#[map(name = "DELIVERIES")]
static DELIVERIES: LruHashMap<FlowKey, u8> = LruHashMap::pinned(capacity::DELIVERIES, 0);

#[map(name = "PROBE_STATS")]
static PROBE_STATS: PerCpuArray<u64> = PerCpuArray::pinned(1, 0);

#[map(name = "KERNEL_EVENTS")]
static KERNEL_EVENTS: PerCpuArray<u64> = PerCpuArray::pinned(events::COUNT, 0);

/// Counts one kernel event (an `events` index) on this CPU.
#[inline(always)]
fn count(event: u32) {
    bump(&KERNEL_EVENTS, event);
}

/// Adds one to slot `index` of a per-CPU counter array, on this CPU.
#[inline(always)]
fn bump(counters: &PerCpuArray<u64>, index: u32) {
    if let Some(n) = counters.get_ptr_mut(index) {
        // SAFETY: a per-CPU slot, written only by this CPU while this program runs.
        unsafe { *n += 1 };
    }
}

// The direct path's tables are pinned: a restarted agent finds the connections its
// predecessor let through and judges them under the config it serves.
#[map(name = "DIRECT_PAIRS")]
static DIRECT_PAIRS: LruHashMap<DirectPairKey, DirectPair> = LruHashMap::pinned(capacity::DIRECT_PAIRS, 0);

#[map(name = "DIRECT_PENDING")]
static DIRECT_PENDING: LruHashMap<u64, DirectPending> = LruHashMap::pinned(capacity::DIRECT_PAIRS, 0);

#[map(name = "DIRECT_FLOWS")]
static DIRECT_FLOWS: HashMap<FlowKey, DirectFlow> = HashMap::pinned(capacity::DIRECT_FLOWS, BPF_F_NO_PREALLOC);

// Per CPU, so no two CPUs write one counter (this target has no atomics): a
// connection is counted up on the CPU that opened it and down on the one that closed
// it, and the pod's total is the wrapping sum over the CPUs.
#[map(name = "DIRECT_PER_POD")]
static DIRECT_PER_POD: LruPerCpuHashMap<IpKey, u32> = LruPerCpuHashMap::pinned(capacity::PODS, 0);

/// Upper bound of the CPUs [`direct_open`] sums over (the helper finds no more past
/// the machine's last CPU).
const MAX_CPUS: u32 = 256;

/// Direct connections `src` holds open: the sum of the per-CPU counts.
#[inline(always)]
fn direct_open(src: &IpKey) -> u32 {
    let map = (&raw const DIRECT_PER_POD).cast_mut().cast::<c_void>();
    let mut open = 0u32;
    for cpu in 0..MAX_CPUS {
        // SAFETY: the static is `repr(transparent)` over its map definition; the value,
        // if any, is a live u32 read at once.
        let value = unsafe { bpf_map_lookup_percpu_elem(map, (src as *const IpKey).cast(), cpu) };
        if value.is_null() {
            break;
        }
        // SAFETY: as above.
        open = open.wrapping_add(unsafe { *value.cast::<u32>() });
    }
    open
}

/// Adds `delta` (wrapping) to `src`'s count on this CPU.
#[inline(always)]
fn count_open(src: &IpKey, delta: u32) {
    if let Some(open) = DIRECT_PER_POD.get_ptr_mut(src) {
        // SAFETY: this CPU's slot, written only by this CPU while this program runs.
        unsafe { *open = (*open).wrapping_add(delta) };
    } else if delta == 1 {
        // A new entry: this CPU's slot holds the value, the others start at zero. Lost
        // (the table is an LRU) it only forgets what the pod holds.
        let _ = DIRECT_PER_POD.insert(src, &1, 0);
    }
}

#[map(name = "DIRECT_EVENTS")]
static DIRECT_EVENTS: RingBuf = RingBuf::pinned(capacity::DIRECT_EVENTS_BYTES, 0);

#[map(name = "DIRECT_STATS")]
static DIRECT_STATS: PerCpuArray<u64> = PerCpuArray::pinned(direct_stats::COUNT, 0);

/// Counts one direct-path event (a `direct_stats` index) on this CPU.
#[inline(always)]
fn count_direct(stat: u32) {
    bump(&DIRECT_STATS, stat);
}

// Kept apart from COOKIE_ORIG_DST: UDP sockets never tell the kernel side they closed,
// so their entries leave only by eviction, which must not push out TCP connections'.
#[map(name = "DNS_ORIG_DST")]
static DNS_ORIG_DST: LruHashMap<u64, OrigDst> = LruHashMap::pinned(capacity::DNS_SOCKETS, 0);

// The agent's own sockets: not pinned, a new agent starts with empty tables.
#[map(name = "SPLICE_SOCKETS")]
static SPLICE_SOCKETS: SockHash<u64> = SockHash::with_max_entries(capacity::SPLICED_SOCKETS, 0);

#[map(name = "SPLICE_ENDS")]
static SPLICE_ENDS: HashMap<u64, SpliceEnd> = HashMap::with_max_entries(capacity::SPLICED_SOCKETS, 0);

#[map(name = "SPLICE_LIMITS")]
static SPLICE_LIMITS: HashMap<u64, SpliceLimit> = HashMap::with_max_entries(capacity::SPLICED_SOCKETS, 0);

/// The inode of the network namespace this `sk_lookup` instance is attached to, set
/// by the agent when it loads the instance for a pod ([`mesh_common::globals::NETNS_INO`]).
#[unsafe(no_mangle)]
static NETNS_INO: Global<u64> = Global::new(0);

// === connect4 / connect6 ===

#[cgroup_sock_addr(connect4)]
pub fn mesh_connect4(ctx: SockAddrContext) -> i32 {
    try_connect(&ctx, false).unwrap_or(REJECT)
}

#[cgroup_sock_addr(connect6)]
pub fn mesh_connect6(ctx: SockAddrContext) -> i32 {
    try_connect(&ctx, true).unwrap_or(REJECT)
}

/// Deepest cgroup level at which a pod's cgroup is looked for. Kubernetes puts a pod at
/// level 2 (`kubepods/pod<uid>`, Guaranteed) or 3 (`kubepods/<qos>/pod<uid>`) and its
/// containers one level below; the lab puts pods at level 3.
const MAX_POD_LEVEL: i32 = 6;

#[inline(always)]
fn enrolled(cgroup_id: u64) -> Option<PodInfo> {
    // SAFETY: the value is copied out at once; a concurrent update can at worst give a
    // torn read of a pod that is being re-enrolled, which the agent serialises.
    let pod = unsafe { ENROLLED_PODS.get(&cgroup_id) }.copied()?;
    (pod.flags & POD_FLAG_ENROLLED != 0).then_some(pod)
}

/// The pod making this call, if it is enrolled: the caller's own cgroup (the lab, a
/// pod without per-container cgroups) or one of its ancestors (Kubernetes runs each
/// container in a cgroup below its pod's).
#[inline(always)]
fn enrolled_pod() -> Option<PodInfo> {
    // SAFETY: the helper has no preconditions in cgroup programs.
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    if let Some(pod) = enrolled(cgroup_id) {
        return Some(pod);
    }
    for level in 1..=MAX_POD_LEVEL {
        // SAFETY: the helper has no preconditions; it returns 0 past the caller's depth.
        let ancestor = unsafe { bpf_get_current_ancestor_cgroup_id(level) };
        if ancestor == 0 || ancestor == cgroup_id {
            break;
        }
        if let Some(pod) = enrolled(ancestor) {
            return Some(pod);
        }
    }
    None
}

/// True when the socket carries the agent's bypass mark.
#[inline(always)]
fn has_bypass_mark(sa: &bpf_sock_addr) -> bool {
    let Some(cfg) = MESH_CONFIG.get(0) else { return false };
    if cfg.bypass_mark == 0 {
        return false;
    }
    // SAFETY: `sk` in a cgroup sock_addr context is a non-null PTR_TO_SOCKET whose
    // `mark` field the verifier allows reading (kernel >= 5.1).
    let mark = unsafe { (*sa.__bindgen_anon_1.sk).mark };
    mark == cfg.bypass_mark
}

/// `Ok(ALLOW)` after redirecting or passing the connection; `Err` only on a map failure
/// for a connection that must be captured, which rejects it (fail closed).
#[inline(always)]
fn try_connect(ctx: &SockAddrContext, v6_hook: bool) -> Result<i32, i32> {
    // SAFETY: the context pointer is valid for the whole program run.
    let sa = unsafe { &mut *ctx.sock_addr };
    if sa.protocol == IPPROTO_UDP {
        return redirect_dns(ctx, v6_hook);
    }
    if sa.protocol != IPPROTO_TCP {
        return Ok(ALLOW);
    }
    let Some(pod) = enrolled_pod() else { return Ok(ALLOW) };
    if has_bypass_mark(sa) {
        return Ok(ALLOW);
    }

    let dst = if v6_hook { IpKey { words: read_ip6(&sa.user_ip6) } } else { IpKey::from_v4(sa.user_ip4) };
    let port = u16::from_be(sa.user_port as u16);
    if port == 0 || is_excluded_port(port) {
        return Ok(ALLOW);
    }
    // Where the redirected connection must go; None leaves the connection alone.
    let redirect_v4 = dst.is_v4_mapped();
    if redirect_v4 {
        let ip4 = dst.words[3];
        // Loopback and the pod's own address never leave the pod: not mesh traffic.
        if u32::from_be(ip4) >> 24 == LOOPBACK_FIRST_OCTET || ip4 == pod.ip4 {
            return Ok(ALLOW);
        }
    } else {
        if is_v6_loopback(&dst) || (pod.flags & POD_FLAG_HAS_IP6 != 0 && dst == pod.ip6) {
            return Ok(ALLOW);
        }
        // A native IPv6 destination from a pod without IPv6: the kernel would fail the
        // connect anyway, there is nothing to capture.
        if pod.flags & POD_FLAG_HAS_IP6 == 0 {
            return Ok(ALLOW);
        }
    }

    // SAFETY: valid in cgroup sock_addr programs since 5.7 (a unique, non-zero id).
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    if goes_direct(cookie, pod_address(&pod, redirect_v4), dst, port) {
        count_direct(direct_stats::CONNECTED);
        debug!(ctx, "mesh: direct connect cookie={} dport={}", cookie, port);
        return Ok(ALLOW);
    }
    let orig = OrigDst { ip: dst, port, family: if v6_hook { 6 } else { 4 }, _pad: 0 };
    if COOKIE_ORIG_DST.insert(&cookie, &orig, 0).is_err() {
        warn!(ctx, "mesh: cannot record original destination, rejecting connect");
        count(events::RECORD_FAILED);
        return Err(REJECT);
    }

    set_address(sa, v6_hook, pod_address(&pod, redirect_v4), ports::OUTBOUND);
    count(events::OUTBOUND_REDIRECTED);
    debug!(ctx, "mesh: redirected connect cookie={} dport={}", cookie, port);
    Ok(ALLOW)
}

/// Whether the connection from `src` (the pod's own address) to `dst:port` goes
/// straight to the peer pod, and if so records it for its SYN: the agent admitted the
/// pair, the agent still serves the peer pod (its inbound listener is in the table:
/// a dead agent's sockets leave it, so nothing passes unjudged while it is down), and
/// the pod holds fewer than its share of direct connections. Anything else goes to the
/// agent as before.
#[inline(always)]
fn goes_direct(cookie: u64, src: IpKey, dst: IpKey, port: u16) -> bool {
    let key = DirectPairKey { src, dst, dst_port: u32::from(port), _pad: 0 };
    // SAFETY: copied out at once.
    let Some(pair) = (unsafe { DIRECT_PAIRS.get(&key) }).copied() else { return false };
    // SAFETY: copied out at once.
    let Some(peer) = (unsafe { NETNS_PODS.get(&pair.netns) }).copied() else { return false };
    if !listener_present(peer.slot) {
        return false;
    }
    if direct_open(&src) >= capacity::DIRECT_PER_POD {
        return false;
    }
    DIRECT_PENDING.insert(&cookie, &DirectPending { src, netns: pair.netns }, 0).is_ok()
}

/// Whether the agent's inbound listener of the pod at `slot` is in `INBOUND_LISTENERS`.
#[inline(always)]
fn listener_present(slot: u32) -> bool {
    // SAFETY: `SockMap` is `repr(transparent)` over its map definition, so a pointer to
    // the static is the map pointer the helper takes; a socket found is a counted
    // reference, released at once.
    unsafe {
        let map = (&raw const INBOUND_LISTENERS).cast_mut().cast::<c_void>();
        let sk = bpf_map_lookup_elem(map, (&raw const slot).cast());
        if sk.is_null() {
            return false;
        }
        bpf_sk_release(sk);
    }
    true
}

/// The pod's own address to send a redirected socket to: IPv4 (as an IPv4-mapped
/// address in a v6 hook) when the socket was going to an IPv4 address, else its IPv6.
#[inline(always)]
fn pod_address(pod: &PodInfo, to_v4: bool) -> IpKey {
    if to_v4 { IpKey::from_v4(pod.ip4) } else { pod.ip6 }
}

/// Writes `ip:port` (port in host order) into a `cgroup_sock_addr` context: the whole
/// address in a v6 hook, its last word in a v4 hook.
#[inline(always)]
fn set_address(sa: &mut bpf_sock_addr, v6_hook: bool, ip: IpKey, port: u16) {
    if v6_hook {
        write_ip6(&mut sa.user_ip6, ip.words);
    } else {
        sa.user_ip4 = ip.words[3];
    }
    sa.user_port = u32::from(port.to_be());
}

/// Reads an IPv6 address from a context field one 32-bit word at a time: the verifier
/// only allows aligned word-sized context accesses, and a plain array copy may compile
/// to byte loads.
#[inline(always)]
fn read_ip6(field: &[u32; 4]) -> [u32; 4] {
    let p = field.as_ptr();
    // SAFETY: `p` points at four initialised, aligned u32 words of the context.
    unsafe {
        [
            core::ptr::read_volatile(p),
            core::ptr::read_volatile(p.add(1)),
            core::ptr::read_volatile(p.add(2)),
            core::ptr::read_volatile(p.add(3)),
        ]
    }
}

/// Writes an IPv6 address into a context field one 32-bit word at a time (see
/// [`read_ip6`]).
#[inline(always)]
fn write_ip6(field: &mut [u32; 4], words: [u32; 4]) {
    let p = field.as_mut_ptr();
    // SAFETY: `p` points at four aligned, writable u32 words of the context.
    unsafe {
        core::ptr::write_volatile(p, words[0]);
        core::ptr::write_volatile(p.add(1), words[1]);
        core::ptr::write_volatile(p.add(2), words[2]);
        core::ptr::write_volatile(p.add(3), words[3]);
    }
}

#[inline(always)]
fn is_excluded_port(port: u16) -> bool {
    // SAFETY: only presence is read.
    unsafe { EXCLUDED_PORTS.get(&u32::from(port)) }.is_some()
}

#[inline(always)]
fn is_v6_loopback(ip: &IpKey) -> bool {
    ip.words[0] == 0 && ip.words[1] == 0 && ip.words[2] == 0 && ip.words[3] == u32::from_be(1)
}

// === DNS capture: sendmsg4 / sendmsg6 / recvmsg4 / recvmsg6 ===

#[cgroup_sock_addr(sendmsg4)]
pub fn mesh_sendmsg4(ctx: SockAddrContext) -> i32 {
    redirect_dns(&ctx, false).unwrap_or(REJECT)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn mesh_sendmsg6(ctx: SockAddrContext) -> i32 {
    redirect_dns(&ctx, true).unwrap_or(REJECT)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn mesh_recvmsg4(ctx: SockAddrContext) -> i32 {
    restore_dns_server(&ctx, false);
    ALLOW
}

#[cgroup_sock_addr(recvmsg6)]
pub fn mesh_recvmsg6(ctx: SockAddrContext) -> i32 {
    restore_dns_server(&ctx, true);
    ALLOW
}

/// Sends a DNS query (UDP to port 53, `connect()` or `sendmsg()` with an address) of a
/// pod whose DNS is captured to the agent's DNS proxy at `<pod ip>:15053`, and records
/// the server it was meant for under the socket's cookie. Loopback (a resolver inside
/// the pod) and the pod's own address are left alone. `Err` only when the server cannot
/// be recorded, which refuses the send: an answer the resolver would discard as coming
/// from the wrong server is worse than a clear error.
#[inline(always)]
fn redirect_dns(ctx: &SockAddrContext, v6_hook: bool) -> Result<i32, i32> {
    // SAFETY: the context pointer is valid for the whole program run.
    let sa = unsafe { &mut *ctx.sock_addr };
    if sa.protocol != IPPROTO_UDP || u16::from_be(sa.user_port as u16) != ports::DNS_SERVER {
        return Ok(ALLOW);
    }
    let Some(pod) = enrolled_pod() else { return Ok(ALLOW) };
    if pod.flags & POD_FLAG_DNS == 0 || has_bypass_mark(sa) {
        return Ok(ALLOW);
    }
    let dst = if v6_hook { IpKey { words: read_ip6(&sa.user_ip6) } } else { IpKey::from_v4(sa.user_ip4) };
    let to_v4 = dst.is_v4_mapped();
    if to_v4 {
        let ip4 = dst.words[3];
        if u32::from_be(ip4) >> 24 == LOOPBACK_FIRST_OCTET || ip4 == pod.ip4 {
            return Ok(ALLOW);
        }
    } else if is_v6_loopback(&dst) || pod.flags & POD_FLAG_HAS_IP6 == 0 || dst == pod.ip6 {
        return Ok(ALLOW);
    }
    // SAFETY: valid in cgroup sock_addr programs since 5.7.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    let orig = OrigDst { ip: dst, port: ports::DNS_SERVER, family: if v6_hook { 6 } else { 4 }, _pad: 0 };
    if DNS_ORIG_DST.insert(&cookie, &orig, 0).is_err() {
        warn!(ctx, "mesh: cannot record the DNS server asked, refusing the query");
        count(events::RECORD_FAILED);
        return Err(REJECT);
    }
    set_address(sa, v6_hook, pod_address(&pod, to_v4), ports::DNS);
    count(events::DNS_REDIRECTED);
    Ok(ALLOW)
}

/// Shows an answer from the agent's DNS proxy (`<pod ip>:15053`, received by a socket
/// whose query was redirected) as coming from the server the pod asked.
#[inline(always)]
fn restore_dns_server(ctx: &SockAddrContext, v6_hook: bool) {
    // SAFETY: the context pointer is valid for the whole program run.
    let sa = unsafe { &mut *ctx.sock_addr };
    if u16::from_be(sa.user_port as u16) != ports::DNS {
        return;
    }
    // SAFETY: valid in cgroup sock_addr programs since 5.7.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    // SAFETY: copied out at once.
    let Some(orig) = (unsafe { DNS_ORIG_DST.get(&cookie) }).copied() else { return };
    let Some(pod) = enrolled_pod() else { return };
    // Only the proxy's own address is rewritten: a datagram from port 15053 of any
    // other host stays what it is.
    let from = if v6_hook { IpKey { words: read_ip6(&sa.user_ip6) } } else { IpKey::from_v4(sa.user_ip4) };
    let from_proxy = if from.is_v4_mapped() {
        from.words[3] == pod.ip4
    } else {
        pod.flags & POD_FLAG_HAS_IP6 != 0 && from == pod.ip6
    };
    if !from_proxy {
        return;
    }
    set_address(sa, v6_hook, orig.ip, orig.port);
}

// === sockops ===

#[sock_ops]
pub fn mesh_sockops(ctx: SockOpsContext) -> u32 {
    try_sockops(&ctx);
    // sockops return values are ignored for the callbacks used here.
    1
}

/// Follows a redirected socket through its life. Its original destination is kept
/// under its cookie from `connect()` (for `getpeername`) and, from `ACTIVE_ESTABLISHED`,
/// under the client's address (for the agent's `accept()`); both entries go when the
/// socket reaches `TCP_CLOSE`, so the maps hold the connections that exist, not the
/// last 64k that ever did.
#[inline(always)]
fn try_sockops(ctx: &SockOpsContext) {
    match ctx.op() {
        BPF_SOCK_OPS_TCP_CONNECT_CB => {
            ask_for_state_changes(ctx);
            record_direct_flow(ctx);
        }
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => {
            record_client(ctx);
            direct_established(ctx);
        }
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == BPF_TCP_CLOSE => {
            forget_connection(ctx);
            direct_closed(ctx);
        }
        _ => {}
    }
}

/// Just before the SYN of a direct connection: records its flow for the peer pod's
/// `sk_lookup`, if the socket is bound to its pod's own address (a socket bound to
/// another address, which a tenant may add, is not recorded: its SYN reaches the
/// agent as plaintext and is judged as such).
#[inline(always)]
fn record_direct_flow(ctx: &SockOpsContext) {
    // SAFETY: valid in sockops programs since 4.20.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
    // SAFETY: copied out at once.
    let Some(pending) = (unsafe { DIRECT_PENDING.get(&cookie) }).copied() else { return };
    let _ = DIRECT_PENDING.remove(&cookie);
    let Some(flow) = flow_of(ctx) else { return };
    if flow.src != pending.src {
        count_direct(direct_stats::RECORD_FAILED);
        return;
    }
    let value = DirectFlow { netns: pending.netns, established: 0, _pad: 0 };
    if DIRECT_FLOWS.insert(&flow, &value, u64::from(BPF_NOEXIST)).is_err() {
        count_direct(direct_stats::RECORD_FAILED);
        warn!(ctx, "mesh: cannot record direct flow for cookie {}", cookie);
        return;
    }
    count_open(&flow.src, 1);
    if ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32).is_err() {
        warn!(ctx, "mesh: cannot follow direct socket {} to its close", cookie);
    }
}

/// A direct connection established (client side): reported opened.
#[inline(always)]
fn direct_established(ctx: &SockOpsContext) {
    let Some(flow) = flow_of(ctx) else { return };
    let Some(value) = DIRECT_FLOWS.get_ptr_mut(&flow) else { return };
    // SAFETY: a live map value; only this socket's callbacks write it, under its lock.
    unsafe { (*value).established = 1 };
    report_direct(&DirectEvent { flow, kind: DIRECT_OPENED, ..DirectEvent::default() });
}

/// A direct connection's client socket closed: reported with its bytes, and forgotten.
#[inline(always)]
fn direct_closed(ctx: &SockOpsContext) {
    let Some(flow) = flow_of(ctx) else { return };
    // SAFETY: copied out at once.
    let Some(value) = (unsafe { DIRECT_FLOWS.get(&flow) }).copied() else { return };
    let _ = DIRECT_FLOWS.remove(&flow);
    count_open(&flow.src, u32::MAX);
    if value.established == 0 {
        return;
    }
    // SAFETY: the context pointer is valid for the whole program run; both counters
    // are readable in sockops programs (kernel >= 4.16).
    let (sent, received) = unsafe { ((*ctx.ops).bytes_acked, (*ctx.ops).bytes_received) };
    report_direct(&DirectEvent { flow, kind: DIRECT_CLOSED, _pad: 0, sent, received });
}

/// Queues `event` for the agent, which reads the ring buffer on its own schedule (no
/// wake-up per connection), and wakes it once a quarter of the buffer is filled.
#[inline(always)]
fn report_direct(event: &DirectEvent) {
    let filling = DIRECT_EVENTS.query(u64::from(BPF_RB_AVAIL_DATA)) > u64::from(capacity::DIRECT_EVENTS_BYTES / 4);
    let wake = if filling { BPF_RB_FORCE_WAKEUP } else { BPF_RB_NO_WAKEUP };
    if DIRECT_EVENTS.output::<DirectEvent>(event, u64::from(wake)).is_err() {
        count_direct(direct_stats::EVENTS_LOST);
    }
}

/// Just before the SYN of a redirected socket: asks for its state changes, so its
/// entries can go when it closes, whether it ever connected or not.
#[inline(always)]
fn ask_for_state_changes(ctx: &SockOpsContext) {
    // SAFETY: valid in sockops programs since 4.20.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
    // SAFETY: only presence is read.
    if unsafe { COOKIE_ORIG_DST.get(&cookie) }.is_none() {
        return;
    }
    if ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32).is_err() {
        // Without the callback the LRU still evicts the oldest entries.
        warn!(ctx, "mesh: cannot follow socket {} to its close", cookie);
    }
}

/// On `ACTIVE_ESTABLISHED` of a redirected socket, record its original destination under
/// the client's address. This runs while the kernel processes the SYN-ACK, before the
/// final ACK is sent, so the entry exists before the agent can `accept()`.
#[inline(always)]
fn record_client(ctx: &SockOpsContext) {
    // SAFETY: valid in sockops programs since 4.20.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
    // SAFETY: copied out at once.
    let Some(orig) = (unsafe { COOKIE_ORIG_DST.get(&cookie) }).copied() else { return };
    let Some(key) = client_key(ctx) else { return };
    if ORIG_DST.insert(&key, &orig, 0).is_err() {
        // The agent will not find the destination and closes the connection: fail closed.
        warn!(ctx, "mesh: cannot record client address for cookie {}", cookie);
    }
}

/// A redirected socket closed: its entries go.
#[inline(always)]
fn forget_connection(ctx: &SockOpsContext) {
    // SAFETY: valid in sockops programs since 4.20.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
    // SAFETY: only presence is read.
    if unsafe { COOKIE_ORIG_DST.get(&cookie) }.is_none() {
        return;
    }
    let _ = COOKIE_ORIG_DST.remove(&cookie);
    if let Some(key) = client_key(ctx) {
        let _ = ORIG_DST.remove(&key);
    }
}

/// The socket's local address, as `ORIG_DST` is keyed.
#[inline(always)]
fn client_key(ctx: &SockOpsContext) -> Option<SockAddrKey> {
    let ip = match ctx.family() {
        AF_INET => IpKey::from_v4(ctx.local_ip4()),
        // SAFETY: the context pointer is valid for the whole program run.
        AF_INET6 => IpKey { words: read_ip6(unsafe { &(*ctx.ops).local_ip6 }) },
        _ => return None,
    };
    Some(SockAddrKey { ip, port: ctx.local_port() })
}

// === getpeername4 / getpeername6 ===

#[cgroup_sock_addr(getpeername4)]
pub fn mesh_getpeername4(ctx: SockAddrContext) -> i32 {
    restore_peer(&ctx, false);
    ALLOW
}

#[cgroup_sock_addr(getpeername6)]
pub fn mesh_getpeername6(ctx: SockAddrContext) -> i32 {
    restore_peer(&ctx, true);
    ALLOW
}

/// Rewrites the peer address of a redirected socket back to what the application dialed.
#[inline(always)]
fn restore_peer(ctx: &SockAddrContext, v6_hook: bool) {
    // SAFETY: valid in cgroup sock_addr programs since 5.7.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    // SAFETY: the context pointer is valid for the whole program run.
    let sa = unsafe { &mut *ctx.sock_addr };
    let table = if sa.protocol == IPPROTO_UDP { &DNS_ORIG_DST } else { &COOKIE_ORIG_DST };
    // SAFETY: copied out at once.
    let Some(orig) = (unsafe { table.get(&cookie) }).copied() else { return };
    set_address(sa, v6_hook, orig.ip, orig.port);
}

// === sk_lookup ===

#[sk_lookup]
pub fn mesh_sk_lookup(ctx: SkLookupContext) -> u32 {
    try_sk_lookup(&ctx)
}

/// Steers a connection to any address of this instance's pod to the agent's inbound
/// listener of that pod. The agent's own listeners in the pod (15001, 15006, 15008),
/// loopback, the pod calling itself, and the agent delivering to the application (from
/// the pod's own address, or from the client's as `DELIVERIES` records) pass through.
/// The pod is known by the netns
/// the instance was loaded for, never by the address dialed: an address a tenant adds
/// (a secondary IP, an IPv6 link-local address) is judged as the pod's.
#[inline(always)]
fn try_sk_lookup(ctx: &SkLookupContext) -> u32 {
    // SAFETY: the context pointer is valid for the whole program run.
    let lk = unsafe { &*ctx.lookup };
    if lk.protocol != IPPROTO_TCP {
        return SK_PASS;
    }
    let (local, remote) = match lk.family {
        AF_INET => (IpKey::from_v4(lk.local_ip4), IpKey::from_v4(lk.remote_ip4)),
        AF_INET6 => (IpKey { words: read_ip6(&lk.local_ip6) }, IpKey { words: read_ip6(&lk.remote_ip6) }),
        _ => return SK_PASS,
    };
    let port = lk.local_port as u16;
    if ports::is_agent_in_pod(port) || local == remote || is_loopback(&local) {
        return SK_PASS;
    }
    let remote_port = u32::from(u16::from_be(lk.remote_port));
    let flow = FlowKey { src: remote, dst: local, src_port: remote_port, dst_port: u32::from(port) };
    // SAFETY: only presence is read.
    if unsafe { DELIVERIES.get(&flow) }.is_some() {
        // The agent's own delivery from the client's address (it recorded the
        // connection just before connecting): for the application.
        return SK_PASS;
    }
    let netns = NETNS_INO.load();
    // SAFETY: copied out at once.
    if unsafe { DIRECT_FLOWS.get(&flow) }.is_some_and(|f| f.netns == netns) {
        // A direct connection of a pair the agent admitted, recorded by the client's
        // own socket just before this SYN, for this pod's namespace.
        count_direct(direct_stats::DELIVERED);
        return SK_PASS;
    }
    // SAFETY: copied out at once.
    let Some(pod) = (unsafe { NETNS_PODS.get(&netns) }).copied() else {
        // Attached only to enrolled pods' namespaces: an instance without its entry is
        // one the agent is replacing or removing. Refuse rather than pass unjudged.
        debug!(ctx, "mesh: no pod entry for this netns, dropping port {}", port);
        count(events::UNKNOWN_POD_DROPPED);
        return SK_DROP;
    };
    if is_probe(&flow) {
        // The kubelet's own connection (its cgroup's sockops recorded it): a probe,
        // answered by the application itself whatever the pod's policy.
        debug!(ctx, "mesh: kubelet probe to port {} passed", port);
        return SK_PASS;
    }
    if plaintext_dropped(netns, port) {
        // STRICT mTLS, or no policy could admit a peer without an identity: the SYN
        // never reaches user space. Mesh clients use 15008, which is not steered here.
        debug!(ctx, "mesh: plaintext to port {} refused by policy", port);
        count(events::PLAINTEXT_DROPPED);
        return SK_DROP;
    }
    let ready = MESH_CONFIG.get(0).is_some_and(|c| c.flags & CONFIG_FLAG_READY != 0);
    // REPLACE: while a restarted agent takes over, the previous run's instance for the
    // same netns runs first and may already have picked the (same) listener.
    if ready && INBOUND_LISTENERS.redirect_sk_lookup(ctx, pod.slot, u64::from(BPF_SK_LOOKUP_F_REPLACE)).is_ok() {
        count(events::INBOUND_STEERED);
        return SK_PASS;
    }
    // The pod is enrolled but its agent listener is gone (agent down or restarting):
    // refuse rather than let plaintext reach the application unchecked.
    debug!(ctx, "mesh: no inbound listener for enrolled pod, dropping port {}", port);
    count(events::NO_LISTENER_DROPPED);
    SK_DROP
}

/// 127.0.0.0/8 (IPv4-mapped) or ::1: reachable only from inside the pod.
#[inline(always)]
fn is_loopback(ip: &IpKey) -> bool {
    (ip.is_v4_mapped() && u32::from_be(ip.words[3]) >> 24 == LOOPBACK_FIRST_OCTET) || is_v6_loopback(ip)
}

/// Whether `flow` is an open connection of the node's kubelet, and if so counts it.
#[inline(always)]
fn is_probe(flow: &FlowKey) -> bool {
    // SAFETY: only presence is read.
    if unsafe { PROBE_FLOWS.get(flow) }.is_none() {
        return false;
    }
    bump(&PROBE_STATS, 0);
    true
}

// === splice (sk_skb stream verdict on SPLICE_SOCKETS) ===

#[stream_verdict]
pub fn mesh_splice(ctx: SkBuffContext) -> u32 {
    try_splice(&ctx)
}

/// Sends what a spliced socket received out of its peer socket, within the agent's
/// allowance. The kernel queues what it hands on without limit, so past the allowance
/// (which the agent raises as the peer socket takes the bytes: a peer that reads slower
/// than this socket receives does not raise it) the bytes are held back on this socket
/// itself instead (`SK_PASS`): charged to it, so TCP closes its window, and read by the
/// agent, which writes them on. Handing on resumes only once the agent has written
/// every held byte, so nothing overtakes. A socket without an entry (never the case
/// while the agent keeps its sockets in the map: it writes the entries first and
/// removes them last) loses the bytes rather than passing them on to a socket nobody
/// reads.
#[inline(always)]
fn try_splice(ctx: &SkBuffContext) -> u32 {
    // A FIN on its own: TCP has taken note of it already, and the agent passes it on
    // as a shutdown once the bytes before it are through. Sent on, an empty buffer
    // would fail the peer's transmit queue (the kernel reads a zero-byte send as a
    // broken pipe).
    if ctx.len() == 0 {
        return SK_DROP;
    }
    // SAFETY: bpf_get_socket_cookie takes the program's own sk_buff (sk_skb programs
    // may call it); the cookie is of the socket that received it.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.skb.skb.cast()) };
    let Some(end) = SPLICE_ENDS.get_ptr_mut(&cookie) else { return SK_DROP };
    // SAFETY: copied out at once. Missing: no allowance, every byte held back.
    let limit = unsafe { SPLICE_LIMITS.get(&cookie) }.copied().unwrap_or_default();
    let len = u64::from(ctx.len());
    // SAFETY: a live map value. One socket's bytes are handed on under its socket lock,
    // so this entry is never written by two programs at once; the agent only reads it.
    let peer = unsafe {
        let within = (*end).taken + len <= limit.allowance;
        if (*end).held != 0 && (*end).passed == limit.copied && within {
            (*end).held = 0;
        }
        if (*end).held != 0 || !within {
            (*end).held = 1;
            (*end).passed += len;
            return SK_PASS;
        }
        (*end).taken += len;
        (*end).peer
    };
    SPLICE_SOCKETS.redirect_skb(ctx, peer, 0) as u32
}

// === probe sockops (attached to the kubelet's cgroup only) ===

#[sock_ops]
pub fn mesh_probe_sockops(ctx: SockOpsContext) -> u32 {
    try_probe_sockops(&ctx);
    1
}

/// Records each connection of the kubelet while it is open: who sent a connection is
/// known here, by the cgroup this program is attached to, and nowhere else on its way
/// to the pod (marks do not cross network namespaces; source addresses are shared by
/// every host process).
#[inline(always)]
fn try_probe_sockops(ctx: &SockOpsContext) {
    match ctx.op() {
        BPF_SOCK_OPS_TCP_CONNECT_CB => {
            let Some(flow) = flow_of(ctx) else { return };
            if PROBE_FLOWS.insert(&flow, &1, 0).is_err() {
                // Not recorded: the probe is judged as any plaintext (fail closed).
                return;
            }
            let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
        }
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == BPF_TCP_CLOSE => {
            if let Some(flow) = flow_of(ctx) {
                let _ = PROBE_FLOWS.remove(&flow);
            }
        }
        _ => {}
    }
}

/// The socket's connection as its client sees it.
#[inline(always)]
fn flow_of(ctx: &SockOpsContext) -> Option<FlowKey> {
    let (src, dst) = match ctx.family() {
        AF_INET => (IpKey::from_v4(ctx.local_ip4()), IpKey::from_v4(ctx.remote_ip4())),
        // SAFETY: the context pointer is valid for the whole program run.
        AF_INET6 => unsafe {
            (IpKey { words: read_ip6(&(*ctx.ops).local_ip6) }, IpKey { words: read_ip6(&(*ctx.ops).remote_ip6) })
        },
        _ => return None,
    };
    // local_port is in host order; remote_port holds the network-order port in its
    // upper half on little-endian machines.
    Some(FlowKey { src, dst, src_port: ctx.local_port(), dst_port: u32::from_be(ctx.remote_port()) })
}

/// The pod's verdict for plaintext to `port`: its own entry, else the pod's default.
#[inline(always)]
fn plaintext_dropped(netns: u64, port: u16) -> bool {
    let verdict = |port: u32| {
        // SAFETY: copied out at once.
        unsafe { PLAINTEXT_POLICY.get(&NetnsPortKey { netns, port, _pad: 0 }) }.copied()
    };
    verdict(u32::from(port)).or_else(|| verdict(0)) == Some(PLAINTEXT_DROP)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

//! The DNS proxy of each enrolled pod whose DNS is captured (ambient's DNS capture).
//!
//! The kernel sends the pod's queries (UDP to port 53) to `<pod ip>:15053`, and its
//! TCP connections to port 53 to the outbound listener like every connection, which
//! hands them here ([`serve_tcp`]). The agent answers A and AAAA questions for the
//! names the mesh knows: Services
//! (`<name>.<namespace>.svc.cluster.local`) and ServiceEntry hosts, with the addresses
//! allocated to entries that have none. Every other query is forwarded upstream as it
//! came and its answer relayed as it came back: SRV, TXT, PTR and the names the mesh
//! does not know are never touched.
//!
//! A pod is a tenant: only datagrams from the pod's own addresses are served, queries
//! waiting upstream are capped per pod and per node (the excess is dropped, and the
//! pod's resolver retries), and nothing a query says is logged.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA};
use hickory_proto::rr::{DNSClass, RData, Record, RecordType};
use tokio::net::UdpSocket;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::snapshot::Snapshot;
use crate::state::Workload;

/// TTL of the answers the proxy gives (ztunnel's).
pub const ANSWER_TTL: u32 = 30;
/// How long one upstream server has to answer a forwarded query.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(2);
/// Forwarded queries one pod may have waiting upstream.
const PENDING_PER_POD: usize = 32;
/// Forwarded queries the node may have waiting upstream.
const PENDING_PER_NODE: usize = 256;
/// The largest datagram: an upstream answer is relayed whole, never cut.
const MAX_DATAGRAM: usize = 65_535;
/// A query larger than this is no question a resolver asks: over UDP it is dropped
/// (each pod's socket keeps a buffer of this size, not of a whole datagram), over
/// TCP forwarded as it is.
const MAX_QUERY: usize = 4096;
/// The size of an answer without EDNS (RFC 1035).
const CLASSIC_UDP_SIZE: usize = 512;

/// Where the queries the mesh does not answer go, shared by every pod of the node.
#[derive(Debug)]
pub struct Upstream {
    servers: Vec<SocketAddr>,
    pending: Arc<Semaphore>,
}

impl Upstream {
    /// Forwards to `servers`, tried in order.
    pub fn new(servers: Vec<SocketAddr>) -> Self {
        Self { servers, pending: Arc::new(Semaphore::new(PENDING_PER_NODE)) }
    }

    /// The `nameserver` lines of a resolv.conf, at port 53.
    pub fn from_resolv_conf(text: &str) -> Vec<SocketAddr> {
        text.lines()
            .filter_map(|l| l.split('#').next()?.trim().strip_prefix("nameserver"))
            .filter_map(|rest| rest.trim().split('%').next()?.parse::<IpAddr>().ok())
            .map(|ip| SocketAddr::new(ip, 53))
            .collect()
    }

    /// The servers queries are forwarded to.
    pub fn servers(&self) -> &[SocketAddr] {
        &self.servers
    }
}

impl Default for Upstream {
    /// Nowhere to forward: unknown names go unanswered (and the pod's resolver times out).
    fn default() -> Self {
        Self::new(Vec::new())
    }
}

/// What the proxy does with a query.
#[derive(Debug, PartialEq, Eq)]
pub enum Reply {
    /// Answered by the mesh: these bytes go back.
    Answered(Vec<u8>),
    /// Not the mesh's to answer: forwarded upstream unchanged.
    Forward,
}

/// The mesh's answer to `query` from a pod of `namespace`, or [`Reply::Forward`].
/// Only a standard query with one IN A or AAAA question for a name the mesh knows is
/// answered; a name it knows with no address of the asked family gets an empty answer
/// (NODATA), as the cluster DNS gives it.
pub fn answer(snapshot: &Snapshot, namespace: &str, query: &[u8]) -> Reply {
    answer_within(snapshot, namespace, query, None)
}

/// [`answer`] for a query over TCP, where an answer is never truncated.
pub fn answer_tcp(snapshot: &Snapshot, namespace: &str, query: &[u8]) -> Reply {
    answer_within(snapshot, namespace, query, Some(usize::from(u16::MAX)))
}

/// [`answer`], with the largest answer the transport takes (None: UDP's, from the
/// query's EDNS size or 512 bytes).
fn answer_within(snapshot: &Snapshot, namespace: &str, query: &[u8], size: Option<usize>) -> Reply {
    if query.len() > MAX_QUERY {
        return Reply::Forward;
    }
    let Ok(request) = Message::from_vec(query) else { return Reply::Forward };
    let header = &request.metadata;
    if header.message_type != MessageType::Query || header.op_code != OpCode::Query || request.queries.len() != 1 {
        return Reply::Forward;
    }
    let question = &request.queries[0];
    let family_v4 = match question.query_type() {
        RecordType::A => true,
        RecordType::AAAA => false,
        _ => return Reply::Forward,
    };
    if question.query_class() != DNSClass::IN {
        return Reply::Forward;
    }
    let name = question.name().to_lowercase().to_ascii();
    let Some(addresses) = snapshot.dns_addresses(name.trim_end_matches('.'), namespace) else {
        return Reply::Forward;
    };

    let mut response = Message::response(header.id, OpCode::Query);
    response.metadata.recursion_desired = header.recursion_desired;
    response.metadata.checking_disabled = header.checking_disabled;
    response.metadata.recursion_available = true;
    response.metadata.authoritative = true;
    response.metadata.response_code = ResponseCode::NoError;
    response.add_query(question.clone());
    for ip in addresses {
        let rdata = match ip.to_canonical() {
            IpAddr::V4(v4) if family_v4 => RData::A(A(v4)),
            IpAddr::V6(v6) if !family_v4 => RData::AAAA(AAAA(v6)),
            _ => continue,
        };
        response.add_answer(Record::from_rdata(question.name().clone(), ANSWER_TTL, rdata));
    }
    let udp_limit = match &request.edns {
        Some(edns) => {
            let mut ours = Edns::new();
            ours.set_max_payload(edns.max_payload().max(CLASSIC_UDP_SIZE as u16));
            response.set_edns(ours);
            usize::from(edns.max_payload()).max(CLASSIC_UDP_SIZE)
        }
        None => CLASSIC_UDP_SIZE,
    };
    let limit = size.unwrap_or(udp_limit);
    match response.to_vec() {
        Ok(bytes) if bytes.len() <= limit => Reply::Answered(bytes),
        // Too many addresses for UDP: the truncated answer sends the resolver to TCP.
        Ok(_) => response.truncate().to_vec().map_or(Reply::Forward, Reply::Answered),
        Err(_) => Reply::Forward,
    }
}

/// What one pod's DNS proxy needs.
#[derive(Clone)]
pub struct DnsContext {
    /// The pod served.
    pub workload: Arc<Workload>,
    /// The current configuration.
    pub snapshot: crate::snapshot::SharedSnapshot,
    /// Where unknown names go.
    pub upstream: Arc<Upstream>,
    /// Counters.
    pub metrics: Arc<crate::telemetry::Metrics>,
}

/// Serves the pod's queries arriving on `socket` until `stop`.
pub async fn serve(ctx: DnsContext, socket: Arc<UdpSocket>, stop: CancellationToken) {
    let pending = Arc::new(Semaphore::new(PENDING_PER_POD));
    // One byte more than a query may have: a longer datagram fills it and is dropped.
    let mut buf = vec![0u8; MAX_QUERY + 1];
    loop {
        let (len, from) = tokio::select! {
            _ = stop.cancelled() => return,
            received = socket.recv_from(&mut buf) => match received {
                Ok(r) => r,
                Err(e) => {
                    tracing::debug!(pod = %ctx.workload.key(), error = %e, "DNS proxy receive failed");
                    continue;
                }
            },
        };
        // Only the pod itself: its address is reachable by others, its proxy is not
        // theirs (nor a reflector for spoofed sources).
        if !ctx.workload.ips.contains(&from.ip().to_canonical()) || len > MAX_QUERY {
            ctx.metrics.dns("refused");
            continue;
        }
        let query = &buf[..len];
        let snapshot = ctx.snapshot.load();
        match answer(&snapshot, &ctx.workload.namespace, query) {
            Reply::Answered(bytes) => {
                ctx.metrics.dns("answered");
                let _ = socket.send_to(&bytes, from).await;
            }
            Reply::Forward => {
                let permits =
                    pending.clone().try_acquire_owned().map_err(|_| "per_source").and_then(|p| {
                        Ok((p, ctx.upstream.pending.clone().try_acquire_owned().map_err(|_| "per_node")?))
                    });
                let permits = match permits {
                    Ok(p) => p,
                    Err(cap) => {
                        ctx.metrics.refused("dns", cap);
                        continue;
                    }
                };
                let (query, socket, ctx) = (query.to_vec(), socket.clone(), ctx.clone());
                tokio::spawn(async move {
                    let _permits = permits;
                    match forward(ctx.upstream.servers(), &query).await {
                        Some(reply) => {
                            ctx.metrics.dns("forwarded");
                            let _ = socket.send_to(&reply, from).await;
                        }
                        None => ctx.metrics.dns("upstream_failed"),
                    }
                });
            }
        }
    }
}

/// How long a DNS-over-TCP connection may wait for its next query.
const TCP_IDLE: Duration = Duration::from_secs(10);

/// Serves DNS over TCP (RFC 7766: two-byte length, then the message) on a pod's
/// connection to port 53: the mesh's names answered, the rest forwarded upstream over
/// TCP and relayed unchanged, one query at a time.
pub async fn serve_tcp<S>(ctx: DnsContext, mut stream: S)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut query = Vec::new();
    loop {
        let mut len = [0u8; 2];
        match tokio::time::timeout(TCP_IDLE, stream.read_exact(&mut len)).await {
            Ok(Ok(_)) => {}
            _ => return,
        }
        let len = usize::from(u16::from_be_bytes(len));
        if len == 0 {
            return;
        }
        query.resize(len, 0);
        if tokio::time::timeout(TCP_IDLE, stream.read_exact(&mut query)).await.map_or(true, |r| r.is_err()) {
            return;
        }
        let snapshot = ctx.snapshot.load();
        let reply = match answer_tcp(&snapshot, &ctx.workload.namespace, &query) {
            Reply::Answered(bytes) => {
                ctx.metrics.dns("answered");
                bytes
            }
            Reply::Forward => {
                let Ok(_permit) = ctx.upstream.pending.clone().try_acquire_owned() else {
                    ctx.metrics.refused("dns", "per_node");
                    return;
                };
                match forward_tcp(ctx.upstream.servers(), &query).await {
                    Some(bytes) => {
                        ctx.metrics.dns("forwarded");
                        bytes
                    }
                    None => {
                        ctx.metrics.dns("upstream_failed");
                        return;
                    }
                }
            }
        };
        let Ok(len) = u16::try_from(reply.len()) else { return };
        if stream.write_all(&len.to_be_bytes()).await.is_err() || stream.write_all(&reply).await.is_err() {
            return;
        }
    }
}

/// [`forward`] over TCP: each server in turn, a connection per query.
async fn forward_tcp(servers: &[SocketAddr], query: &[u8]) -> Option<Vec<u8>> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let len = u16::try_from(query.len()).ok()?.to_be_bytes();
    for server in servers {
        let exchange = async {
            let mut tcp = tokio::net::TcpStream::connect(server).await.ok()?;
            tcp.write_all(&len).await.ok()?;
            tcp.write_all(query).await.ok()?;
            let mut reply_len = [0u8; 2];
            tcp.read_exact(&mut reply_len).await.ok()?;
            let mut reply = vec![0u8; usize::from(u16::from_be_bytes(reply_len))];
            tcp.read_exact(&mut reply).await.ok()?;
            Some(reply)
        };
        if let Ok(Some(reply)) = tokio::time::timeout(FORWARD_TIMEOUT, exchange).await {
            return Some(reply);
        }
    }
    None
}

/// Sends `query` to each server in turn until one answers it (same message ID):
/// the answer's bytes, unchanged.
pub async fn forward(servers: &[SocketAddr], query: &[u8]) -> Option<Vec<u8>> {
    let id = query.get(..2)?;
    for server in servers {
        let local: SocketAddr = if server.is_ipv4() { ([0, 0, 0, 0], 0).into() } else { ([0u16; 8], 0).into() };
        let Ok(socket) = UdpSocket::bind(local).await else { continue };
        if socket.connect(server).await.is_err() || socket.send(query).await.is_err() {
            continue;
        }
        let mut buf = vec![0u8; MAX_DATAGRAM];
        let deadline = tokio::time::Instant::now() + FORWARD_TIMEOUT;
        // A connected socket hears only the server; a reply to another query is skipped.
        while let Ok(Ok(n)) = tokio::time::timeout_at(deadline, socket.recv(&mut buf)).await {
            if buf.get(..2) == Some(id) {
                buf.truncate(n);
                return Some(buf);
            }
        }
    }
    None
}

#[cfg(test)]
mod tests;

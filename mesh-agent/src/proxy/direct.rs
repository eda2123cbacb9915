//! Which pairs of this node's pods connect directly, judged by the agent
//! ([`crate::dataplane::direct`] holds the kernel side): a pair goes direct once the
//! agent has admitted one of its connections and only while the config in force would
//! admit every connection of the pair and do nothing with it but pass its bytes. Open
//! direct connections are re-judged on each config change and closed once refused;
//! their metrics come from the kernel's reports.
//!
//! A pair's verdict must depend on nothing but the pair: the client pod (known to the
//! kernel by its cgroup, and bound to its own address), the peer pod's address as
//! dialed, and the port. So a pair never goes direct when the destination was chosen
//! (a Service VIP, a route), when policies read HTTP or the destination reads it for
//! its request metrics, when either end writes an access log, or for DNS.

use std::net::SocketAddr;

use mesh_common::ports;

use super::ProxyContext;
use super::admission::{self, Arrival};
use crate::authz::{ConnVerdict, Decision, Peer};
use crate::dataplane::direct::{self, DirectFlowAddrs, DirectReport};
use crate::snapshot::Snapshot;
use crate::state::Workload;
use crate::telemetry::{ConnLabels, ServiceLabels};

/// Why connections of `src` (from `client`) to `dest` at `server` may not go direct
/// under `snapshot`; None when they may.
pub(super) fn refusal(
    ctx: &ProxyContext,
    snapshot: &Snapshot,
    src: &Workload,
    dest: &Workload,
    client: SocketAddr,
    server: SocketAddr,
) -> Option<&'static str> {
    let port = server.port();
    if !ctx.same_node_direct {
        return Some("the direct path is off");
    }
    if ctx.local_pods.netns(&src.key()).is_none() || ctx.local_pods.netns(&dest.key()).is_none() {
        return Some("a pod this agent does not serve");
    }
    if !src.ips.contains(&client.ip()) || !dest.ips.contains(&server.ip()) {
        return Some("an address not the pod's own");
    }
    if ports::is_mesh_owned(port) || port == ports::DNS_SERVER || !snapshot.tunnels_to(dest, port) {
        return Some("a port the mesh does not pass through");
    }
    if snapshot.service_by_vip(server.ip()).is_some() {
        return Some("a Service address: the destination is chosen per connection");
    }
    if ctx.dialer.certs.get(&src.identity).is_err() {
        return Some("the source has no certificate");
    }
    let arrival = Arrival {
        src: client,
        dst: server,
        peer: Some(std::sync::Arc::new(Peer::from_identity(&src.identity, &snapshot.equivalent_domains))),
    };
    match snapshot.security(&dest.key()).authz.check_connection(&arrival.attrs()) {
        ConnVerdict::Decided(Decision::Allow) => {}
        ConnVerdict::Decided(Decision::Deny(_)) => return Some("denied by policy"),
        ConnVerdict::PerRequest => return Some("policies read HTTP"),
    }
    if admission::reads_http(ctx, snapshot, dest, port) {
        return Some("the destination reads HTTP for its request metrics");
    }
    let logs = |w: &Workload, source| {
        ctx.metrics.access_log().is_some_and(|log| log.logs(snapshot.telemetry(&w.key()), source, 0))
    };
    if logs(src, true) || logs(dest, false) {
        return Some("an access log is written");
    }
    None
}

/// After the agent admitted `src`'s connection (from `client`, to `orig`) to `dest`
/// at `server`: lets the pair's next connections go direct if nothing but the pair
/// decides them.
pub(super) fn admitted(
    ctx: &ProxyContext,
    snapshot: &Snapshot,
    (src, dest): (&Workload, &Workload),
    client: SocketAddr,
    (orig, server): (SocketAddr, SocketAddr),
) {
    let Some(path) = ctx.direct.as_ref().filter(|_| ctx.same_node_direct) else { return };
    if orig != server {
        return;
    }
    if let Some(reason) = refusal(ctx, snapshot, src, dest, client, server) {
        tracing::trace!(pod = %src.name, %server, reason, "not direct");
        return;
    }
    let Some(netns) = ctx.local_pods.netns(&dest.key()) else { return };
    match path.admit(client.ip(), server, netns.inode()) {
        Ok(()) => tracing::debug!(pod = %src.name, %server, dest = %dest.name, "pair connects directly from now on"),
        Err(e) => tracing::warn!(pod = %src.name, %server, error = %e, "pair not admitted to the direct path"),
    }
}

/// What re-judging the direct path did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Reassessed {
    /// Pairs taken out (their next connection goes to the agent).
    pub forgotten: usize,
    /// Open direct connections closed.
    pub closed: usize,
    /// Open direct connections that could not be judged or closed yet (a pod whose
    /// namespace this agent does not hold now): judge again later.
    pub unresolved: usize,
}

/// The pods of a direct pair or connection, as `snapshot` knows them.
fn pods(snapshot: &Snapshot, client: SocketAddr, server: SocketAddr) -> Option<(&Workload, &Workload)> {
    Some((snapshot.workload_by_ip(client.ip())?, snapshot.workload_by_ip(server.ip())?))
}

/// [`refusal`] for a pair known by its addresses alone (a table entry).
fn pair_refusal(
    ctx: &ProxyContext,
    snapshot: &Snapshot,
    client: SocketAddr,
    server: SocketAddr,
) -> Option<&'static str> {
    match pods(snapshot, client, server) {
        Some((src, dest)) => refusal(ctx, snapshot, src, dest, client, server),
        None => Some("a pod the config no longer has"),
    }
}

/// Re-judges every pair and open direct connection under `snapshot`: pairs it would
/// not send direct are taken out, connections it would not send direct are closed
/// (they reconnect through the agent and are judged afresh).
pub fn reassess(ctx: &ProxyContext, snapshot: &Snapshot) -> Reassessed {
    let Some(path) = ctx.direct.as_ref() else { return Reassessed::default() };
    let mut done = Reassessed::default();
    for (client_ip, server) in path.pairs() {
        if let Some(reason) = pair_refusal(ctx, snapshot, SocketAddr::new(client_ip, 0), server) {
            tracing::debug!(%client_ip, %server, reason, "pair no longer direct");
            path.forget(client_ip, server);
            done.forgotten += 1;
        }
    }
    // Connections of one pair share its verdict (the client's port decides nothing).
    let mut verdicts = std::collections::HashMap::new();
    for flow in path.flows() {
        let refused = verdicts.entry((flow.client.ip(), flow.server));
        let refused = *refused.or_insert_with(|| pair_refusal(ctx, snapshot, flow.client, flow.server));
        let Some(reason) = refused else { continue };
        match close(ctx, pods(snapshot, flow.client, flow.server), &flow) {
            Some(true) => {
                tracing::info!(client = %flow.client, server = %flow.server, reason, "closing a direct connection the current config no longer allows");
                done.closed += 1;
            }
            Some(false) => {}
            None => done.unresolved += 1,
        }
    }
    done
}

/// Closes `flow` from the client's namespace, else from the server's; None when this
/// agent holds neither.
fn close(ctx: &ProxyContext, pair: Option<(&Workload, &Workload)>, flow: &DirectFlowAddrs) -> Option<bool> {
    let (src, dest) = pair?;
    let ends = [(src.key(), flow.client, flow.server), (dest.key(), flow.server, flow.client)];
    for (pod, local, remote) in ends {
        let Some(netns) = ctx.local_pods.netns(&pod) else { continue };
        match direct::destroy(&netns, local, remote) {
            Ok(found) => return Some(found),
            Err(e) => tracing::warn!(%pod, %local, %remote, error = %e, "cannot close a direct connection here"),
        }
    }
    None
}

/// Reads the kernel's reports whenever it says their buffer is filling (a burst of
/// direct connections between the agent's 2 s reads), until shutdown.
pub async fn follow_reports(ctx: ProxyContext) {
    let Some(path) = ctx.direct.clone() else { return };
    let fd = path.wake_fd().and_then(|fd| tokio::io::unix::AsyncFd::with_interest(fd, tokio::io::Interest::READABLE));
    let fd = match fd {
        Ok(fd) => fd,
        Err(e) => {
            tracing::warn!(error = %e, "direct connections' reports read every 2 s only");
            return;
        }
    };
    loop {
        tokio::select! {
            () = ctx.shutdown.cancelled() => return,
            ready = fd.readable() => {
                let Ok(mut ready) = ready else { return };
                // Cleared first: a wake-up during the read is not lost.
                ready.clear_ready();
                let snapshot = ctx.snapshot.load();
                path.drain(|report| count(&ctx, &snapshot, report));
            }
        }
    }
}

/// Counts what the kernel reported of direct connections, as the agent counts the
/// connections it passes itself: once as the source, once as the destination.
pub fn count(ctx: &ProxyContext, snapshot: &Snapshot, report: DirectReport) {
    let flow = match report {
        DirectReport::Opened(flow) | DirectReport::Closed { flow, .. } => flow,
    };
    let Some((src, dest)) = pods(snapshot, flow.client, flow.server) else { return };
    let reporters = [
        (ConnLabels::outbound(src, Some(dest), ServiceLabels::service(None), true), src),
        (ConnLabels::inbound_from_identity(snapshot, dest, flow.server.port(), &src.identity, flow.client), dest),
    ];
    for (labels, pod) in reporters {
        let policy = snapshot.telemetry(&pod.key());
        match report {
            DirectReport::Opened(_) => drop(ctx.metrics.opened(&labels, policy)),
            // Istio's received is what the client sent; its sent, what the server did.
            DirectReport::Closed { sent, received, .. } => {
                ctx.metrics.closed_elsewhere(&labels, policy, (sent, received));
            }
        }
    }
}

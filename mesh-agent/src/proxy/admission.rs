//! What happens to a connection once it has reached a workload's agent (over HBONE or
//! in plaintext): the authorization verdict at accept, then either a splice to the
//! application, or, when the policies read HTTP attributes, a judgement per request
//! (HTTP) or of the whole connection as TCP (anything else).

mod http;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::ProxyContext;
use super::detect::{self, DETECT_TIMEOUT, read_first};
use super::prefixed::Prefixed;
use crate::authz::{ConnAttrs, ConnVerdict, Decision, Peer, WorkloadSecurity};
use crate::dataplane::Netns;
use crate::snapshot::Snapshot;
use crate::state::{Declared, Workload};
use crate::telemetry::{ConnLabels, DenyReason};
use crate::transport::copy;

/// A connection as the workload's policies see it.
#[derive(Debug, Clone)]
pub(super) struct Arrival {
    /// The peer's address.
    pub src: SocketAddr,
    /// The workload address and port.
    pub dst: SocketAddr,
    /// The authenticated peer (HBONE), None for plaintext.
    pub peer: Option<Peer>,
}

impl Arrival {
    pub fn attrs(&self) -> ConnAttrs<'_> {
        ConnAttrs { src: self.src, dst: self.dst, peer: self.peer.as_ref() }
    }
}

/// Spliced inbound connections, re-judged whenever the policies change: a connection
/// admitted under an older policy is closed once the current one would refuse it
/// (the client reconnects and is judged afresh). Re-judged as TCP: what TCP is
/// allowed, every HTTP request on it is too, so a kept connection carries nothing the
/// current policy denies. Connections served per request need no tracking: each
/// request is judged against the current snapshot.
#[derive(Debug, Default)]
pub struct InboundConns {
    next: AtomicU64,
    live: Mutex<HashMap<u64, Tracked>>,
}

#[derive(Debug)]
struct Tracked {
    workload: String,
    arrival: Arrival,
    stop: CancellationToken,
}

/// A tracked connection; dropping it stops the tracking.
pub(super) struct TrackedConn {
    id: u64,
    conns: Arc<InboundConns>,
    /// Cancelled when the current policy no longer allows the connection.
    pub stop: CancellationToken,
}

impl Drop for TrackedConn {
    fn drop(&mut self) {
        self.conns.live.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.id);
    }
}

impl InboundConns {
    pub(super) fn track(self: &Arc<Self>, workload: &Workload, arrival: &Arrival) -> TrackedConn {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let stop = CancellationToken::new();
        let t = Tracked { workload: workload.key(), arrival: arrival.clone(), stop: stop.clone() };
        self.live.lock().unwrap_or_else(|p| p.into_inner()).insert(id, t);
        TrackedConn { id, conns: self.clone(), stop }
    }

    /// Closes every live connection `snap` no longer allows; returns how many.
    pub fn reassess(&self, snap: &Snapshot) -> usize {
        let live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        let mut closed = 0;
        for t in live.values().filter(|t| !t.stop.is_cancelled()) {
            let security = snap.security(&t.workload);
            let attrs = t.arrival.attrs();
            let plaintext_ok = t.arrival.peer.is_some() || security.mtls.mode(attrs.dst.port()).accepts_plaintext();
            let verdict = if plaintext_ok {
                security.authz.decide(&attrs, None)
            } else {
                Decision::Deny("plaintext, and the port is now STRICT".into())
            };
            if let Decision::Deny(reason) = verdict {
                tracing::info!(workload = %t.workload, src = %attrs.src, source = %attrs.who(), dst = %attrs.dst, %reason, "closing a connection the current policy no longer allows");
                t.stop.cancel();
                closed += 1;
            }
        }
        closed
    }
}

/// Logs and counts a refusal by an authorization policy.
pub(super) fn denied(
    ctx: &ProxyContext,
    pod: &Workload,
    attrs: &ConnAttrs<'_>,
    reason: &str,
    request: Option<(&str, &str)>,
) {
    let (method, path) = request.unzip();
    tracing::info!(
        pod = %pod.name, src = %attrs.src, source = %attrs.who(), dst = %attrs.dst, method, path, %reason,
        "denied by authorization policy"
    );
    let kind = if request.is_some() { DenyReason::HttpPolicy } else { DenyReason::Policy };
    ctx.metrics.denied(pod, kind, attrs.client(), reason);
}

/// Logs and counts plaintext refused because the port is STRICT.
pub(super) fn denied_plaintext(
    ctx: &ProxyContext,
    pod: &Workload,
    src: SocketAddr,
    dst: SocketAddr,
    policies: &[String],
) {
    tracing::info!(
        pod = %pod.name, %src, %dst, decided_by = %policies.join(", "),
        "plaintext refused: mTLS is STRICT for this port"
    );
    let detail = format!("plaintext to STRICT port {} ({})", dst.port(), policies.join(", "));
    ctx.metrics.denied(pod, DenyReason::MtlsStrict, format!("plaintext {}", src.ip()), &detail);
}

/// Whether an allowed connection to `pod`'s `port` is read as HTTP for its request
/// metrics, access log lines and spans: when L7 telemetry is on, something is wanted
/// of the requests (a Telemetry may turn every request metric, the access log and
/// tracing off for the workload), and the port is not declared opaque (Istio's
/// protocol selection: `appProtocol`, then the Service port's name). An undeclared
/// port is detected from the first bytes.
pub(super) fn reads_http(ctx: &ProxyContext, snapshot: &Snapshot, pod: &Workload, port: u16) -> bool {
    ctx.wants_requests(snapshot, pod, false)
        && snapshot.service_at(pod, port).is_none_or(|(_, sp)| sp.declared() != Declared::Opaque)
}

/// Serves a connection whose accept-time verdict was not a denial.
///
/// Not an `async fn`: one keeps its arguments twice (as passed, and moved into the
/// body) for as long as the connection lives; an `async move` block keeps them once.
#[allow(clippy::too_many_arguments)]
#[expect(clippy::manual_async_fn, reason = "an async fn would hold its arguments twice, as said above")]
pub(super) fn serve<S>(
    ctx: Arc<ProxyContext>,
    pod: Arc<Workload>,
    netns: Arc<Netns>,
    security: Arc<WorkloadSecurity>,
    arrival: Arrival,
    verdict: ConnVerdict,
    mut client: S,
    app: TcpStream,
    labels: ConnLabels,
) -> impl Future<Output = ()> + Send
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    async move {
        let dst = arrival.dst;
        let snapshot = ctx.snapshot.load();
        let policy = snapshot.telemetry(&pod.key()).clone();
        let ends = copy::Ends { policy, client: arrival.src, dialed: dst, upstream: Some(dst) };
        let per_request = match verdict {
            ConnVerdict::Decided(Decision::Deny(_)) => return,
            ConnVerdict::Decided(Decision::Allow) => false,
            ConnVerdict::PerRequest => true,
        };
        let spliced = !per_request && !reads_http(&ctx, &snapshot, &pod, dst.port());
        // Not held while the connection lives: each request loads the snapshot in force.
        drop(snapshot);
        if spliced {
            return splice_tracked(&ctx, &pod, &arrival, (&labels, ends), client, app).await;
        }
        let first = match read_first(&mut client, DETECT_TIMEOUT).await {
            Ok(first) => first,
            Err(e) => {
                tracing::debug!(%dst, error = %e, "connection ended before its first bytes");
                return;
            }
        };
        let client = Prefixed::new(first, client);
        if detect::is_http(client.prefix()) {
            // Each request judged (an allowed connection's requests are allowed alike)
            // and measured, reporter=destination.
            let open = ctx.metrics.opened(&labels, &ends.policy);
            let metrics = ctx.metrics.clone();
            // Its bytes count as they pass, as a spliced connection's do.
            let client = copy::Counted::new(client, &open);
            // Boxed: HTTP serving is large, and a spliced connection should not carry it.
            Box::pin(http::serve(ProxyContext::clone(&ctx), pod, netns, arrival, &labels, client, app)).await;
            metrics.closed(&labels, open);
            return;
        }
        // Not HTTP: judged once (with the HTTP attributes unreadable) when the policies
        // read HTTP, then spliced.
        let attrs = arrival.attrs();
        if per_request && let Decision::Deny(reason) = security.authz.check(&attrs, None) {
            denied(&ctx, &pod, &attrs, &reason, None);
            return;
        }
        splice_tracked(&ctx, &pod, &arrival, (&labels, ends), client, app).await;
    }
}

/// Splices an allowed connection to the application, tracked so a policy change that
/// would refuse it closes it. A plain TCP client (nothing read of it yet) is spliced in
/// the kernel where it can be.
async fn splice_tracked<S>(
    ctx: &ProxyContext,
    pod: &Workload,
    arrival: &Arrival,
    observed: (&ConnLabels, copy::Ends),
    mut client: S,
    mut app: TcpStream,
) where
    S: AsyncRead + AsyncWrite + Unpin + 'static,
{
    let tracked = ctx.inbound.track(pod, arrival);
    let idle = ctx.tcp_idle_timeout;
    let result = match (&mut client as &mut dyn std::any::Any).downcast_mut::<TcpStream>() {
        Some(tcp) => {
            let sockets = (tcp, &mut app);
            copy::counted_sockets(
                &ctx.metrics,
                std::slice::from_ref(&observed),
                sockets,
                idle,
                Some(&tracked.stop),
                ctx.kernel_splice.as_ref(),
            )
            .await
        }
        None => copy::counted_until(&ctx.metrics, observed, &mut client, &mut app, idle, &tracked.stop).await,
    };
    if let Err(e) = result {
        tracing::debug!(dst = %arrival.dst, error = %e, "inbound connection ended with an error");
    }
}

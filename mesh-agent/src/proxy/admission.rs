//! What happens to a connection once it has reached a workload's agent (over HBONE or
//! in plaintext): the authorization verdict at accept, then either a splice to the
//! application, or, when the policies read HTTP attributes, a judgement per request
//! (HTTP) or of the whole connection as TCP (anything else).

mod http;
pub(crate) mod watched;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use futures::FutureExt as _;
use futures::future::Either;
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
use crate::telemetry::{ConnLabels, DenyReason, SharedPeers};
use crate::transport::copy;

/// A connection as the workload's policies see it.
#[derive(Debug, Clone)]
pub(super) struct Arrival {
    /// The peer's address.
    pub src: SocketAddr,
    /// The workload address and port.
    pub dst: SocketAddr,
    /// The authenticated peer (HBONE), None for plaintext: shared by the streams of
    /// one tunnel and by the connection's re-judging entry.
    pub peer: Option<Arc<Peer>>,
}

impl Arrival {
    pub fn attrs(&self) -> ConnAttrs<'_> {
        ConnAttrs { src: self.src, dst: self.dst, peer: self.peer.as_deref() }
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
    workload: Arc<Workload>,
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
    pub(super) fn track(self: &Arc<Self>, workload: &Arc<Workload>, arrival: &Arrival) -> TrackedConn {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let stop = CancellationToken::new();
        let t = Tracked { workload: workload.clone(), arrival: arrival.clone(), stop: stop.clone() };
        self.live.lock().unwrap_or_else(|p| p.into_inner()).insert(id, t);
        TrackedConn { id, conns: self.clone(), stop }
    }

    /// Closes every live connection `snap` no longer allows; returns how many.
    pub fn reassess(&self, snap: &Snapshot) -> usize {
        let live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        let mut closed = 0;
        for t in live.values().filter(|t| !t.stop.is_cancelled()) {
            let workload = t.workload.key();
            let security = snap.security(&workload);
            let attrs = t.arrival.attrs();
            let plaintext_ok = t.arrival.peer.is_some() || security.mtls.mode(attrs.dst.port()).accepts_plaintext();
            let verdict = if plaintext_ok {
                security.authz.decide(&attrs, None)
            } else {
                Decision::Deny("plaintext, and the port is now STRICT".into())
            };
            if let Decision::Deny(reason) = verdict {
                tracing::info!(%workload, src = %attrs.src, source = %attrs.who(), dst = %attrs.dst, %reason, "closing a connection the current policy no longer allows");
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

/// Serves a connection whose accept-time verdict was not a denial: decided boxed
/// (detection, HTTP serving and their state are freed once done), then, when it is to
/// be spliced, spliced. A combinator rather than an `async` block, which would keep the
/// arguments and the decision's state beside the splice: the task holds the splice
/// alone for as long as the connection lives.
#[allow(clippy::too_many_arguments)]
pub(super) fn serve<S>(
    ctx: Arc<ProxyContext>,
    pod: Arc<Workload>,
    netns: Arc<Netns>,
    security: Arc<WorkloadSecurity>,
    arrival: Arrival,
    verdict: ConnVerdict,
    client: S,
    app: TcpStream,
    labels: Arc<ConnLabels>,
) -> impl Future<Output = ()> + Send
where
    S: Spliceable,
    Prefixed<S>: Spliceable,
{
    let deciding = Box::pin(admit(ctx, pod, netns, security, arrival, verdict, client, app, labels));
    deciding.then(|admitted| match admitted {
        Admitted::Spliced(spliced) => Either::Left(Either::Left(spliced.run())),
        Admitted::Peeked(spliced) => Either::Left(Either::Right(spliced.run())),
        // Boxed: the spliced connections' tasks (the most numerous) are not sized for it.
        Admitted::Watched(watched) => Either::Right(Either::Left(Box::pin((*watched).run()))),
        Admitted::Served => Either::Right(Either::Right(std::future::ready(()))),
    })
}

/// What [`admit`] made of a connection.
enum Admitted<S> {
    /// To be spliced, nothing read of it.
    Spliced(Spliced<S>),
    /// To be spliced, its first bytes read (and found not to be HTTP).
    Peeked(Spliced<Prefixed<S>>),
    /// HTTP/1.1 to be copied as it is, its exchanges counted as they pass.
    Watched(Box<Spliced<watched::Watched<Prefixed<S>>>>),
    /// Served, or refused, already.
    Served,
}

/// A connection admitted to be spliced to its application: all it holds while it
/// lives, and nothing of the decision.
struct Spliced<C> {
    ctx: Arc<ProxyContext>,
    client: C,
    app: TcpStream,
    labels: Arc<ConnLabels>,
    ends: copy::Ends,
    /// Tracked so a policy change that would refuse it closes it.
    tracked: TrackedConn,
}

impl<C: Spliceable> Spliced<C> {
    #[expect(clippy::manual_async_fn, reason = "an async fn would hold `self` twice for the connection's life")]
    fn run(mut self) -> impl Future<Output = ()> + Send {
        async move {
            let dst = self.ends.dialed;
            let observed = (&*self.labels, self.ends);
            let copied = self.client.splice_to(&mut self.app, &self.ctx, observed, &self.tracked.stop).await;
            if let Err(e) = copied {
                tracing::debug!(%dst, error = %e, "inbound connection ended with an error");
            }
        }
    }
}

/// Decides how an admitted connection is served: spliced (returned to be), or read
/// as HTTP and judged request by request (served here).
#[allow(clippy::too_many_arguments)]
async fn admit<S>(
    ctx: Arc<ProxyContext>,
    pod: Arc<Workload>,
    netns: Arc<Netns>,
    security: Arc<WorkloadSecurity>,
    arrival: Arrival,
    verdict: ConnVerdict,
    mut client: S,
    app: TcpStream,
    labels: Arc<ConnLabels>,
) -> Admitted<S>
where
    S: Spliceable,
{
    let dst = arrival.dst;
    let snapshot = ctx.snapshot.load();
    let policy = snapshot.telemetry(&pod.key()).clone();
    let ends = copy::Ends { policy, client: arrival.src, dialed: dst, upstream: Some(dst) };
    let per_request = match verdict {
        ConnVerdict::Decided(Decision::Deny(_)) => return Admitted::Served,
        ConnVerdict::Decided(Decision::Allow) => false,
        ConnVerdict::PerRequest => true,
    };
    let spliced = !per_request && !reads_http(&ctx, &snapshot, &pod, dst.port());
    // Not held while the connection lives: each request loads the snapshot in force.
    drop(snapshot);
    if spliced {
        let tracked = ctx.inbound.track(&pod, &arrival);
        return Admitted::Spliced(Spliced { ctx, client, app, labels, ends, tracked });
    }
    let first = match read_first(&mut client, DETECT_TIMEOUT).await {
        Ok(first) => first,
        Err(e) => {
            tracing::debug!(%dst, error = %e, "connection ended before its first bytes");
            return Admitted::Served;
        }
    };
    let client = Prefixed::new(first, client);
    if detect::is_http(client.prefix()) {
        // Allowed as a whole and read for its request metrics alone: copied as it is,
        // its exchanges followed beside the copy, reporter=destination.
        if !per_request && watched::suffices(&ctx.metrics, &ends.policy, client.prefix()) {
            ctx.metrics.http_watched.inc();
            let tracked = ctx.inbound.track(&pod, &arrival);
            let peers = SharedPeers::new(labels.peers.clone());
            let report = (ctx.metrics.clone(), ends.policy.clone(), peers);
            let client = watched::Watched::new(client, report, ctx.shutdown.clone());
            return Admitted::Watched(Box::new(Spliced { ctx, client, app, labels, ends, tracked }));
        }
        // Each request judged (an allowed connection's requests are allowed alike)
        // and measured, reporter=destination.
        let open = ctx.metrics.opened(&labels, &ends.policy);
        let metrics = ctx.metrics.clone();
        // Its bytes count as they pass, as a spliced connection's do.
        let client = copy::Counted::new(client, &open);
        http::serve(ProxyContext::clone(&ctx), pod, netns, arrival, &labels, client, app).await;
        metrics.closed(&labels, open);
        return Admitted::Served;
    }
    // Not HTTP: judged once (with the HTTP attributes unreadable) when the policies
    // read HTTP, then spliced.
    let attrs = arrival.attrs();
    if per_request && let Decision::Deny(reason) = security.authz.check(&attrs, None) {
        denied(&ctx, &pod, &attrs, &reason, None);
        return Admitted::Served;
    }
    let tracked = ctx.inbound.track(&pod, &arrival);
    Admitted::Peeked(Spliced { ctx, client, app, labels, ends, tracked })
}

/// A client stream as admission splices it to the application: a plain TCP socket (of
/// which nothing was read yet) in the kernel where it can be, anything else by the
/// agent. A trait rather than a run-time check, so a tunnel's task is not sized for the
/// kernel's path it never takes.
pub(super) trait Spliceable: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// Copies both ways between `self` and `app` until either ends, the connection is
    /// idle for the context's timeout, or `stop` is cancelled; counted as `observed`.
    /// By the agent, unless the stream's type says otherwise.
    fn splice_to<'a>(
        &'a mut self,
        app: &'a mut TcpStream,
        ctx: &'a ProxyContext,
        observed: (&'a ConnLabels, copy::Ends),
        stop: &'a CancellationToken,
    ) -> impl Future<Output = std::io::Result<(u64, u64)>> + Send + 'a {
        copy::counted_until(&ctx.metrics, observed, self, app, ctx.tcp_idle_timeout, stop)
    }
}

/// Spliced in the kernel where it can be.
impl Spliceable for TcpStream {
    #[expect(clippy::manual_async_fn, reason = "the trait's signature, which its default meets without a block")]
    fn splice_to<'a>(
        &'a mut self,
        app: &'a mut TcpStream,
        ctx: &'a ProxyContext,
        observed: (&'a ConnLabels, copy::Ends),
        stop: &'a CancellationToken,
    ) -> impl Future<Output = std::io::Result<(u64, u64)>> + Send + 'a {
        async move {
            let (metrics, idle, kernel) = (&ctx.metrics, ctx.tcp_idle_timeout, ctx.kernel_splice.as_ref());
            copy::counted_sockets(metrics, std::slice::from_ref(&observed), (self, app), idle, Some(stop), kernel).await
        }
    }
}

impl Spliceable for crate::transport::hbone::H2Stream {}

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> Spliceable for Prefixed<S> {}

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> Spliceable for watched::Watched<S> {}

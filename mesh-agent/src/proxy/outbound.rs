//! Outbound: connections an enrolled pod makes, redirected by connect4/6 to its
//! `<pod ip>:15001` listener. The original destination comes from the kernel map.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpStream;

use super::ProxyContext;
use super::detect::{self, Protocol};
use super::egress::{self, Egress};
use super::local::{self, Local};
use crate::dataplane::Netns;
use crate::state::{Declared, Destination, Workload};
use crate::telemetry::{ConnLabels, ServiceLabels};
use crate::transport::{CONNECT_TIMEOUT, Error, Upstream, copy, sockets};

/// A connection decided, to be spliced for the rest of its life.
pub(super) enum Decided {
    /// Connected to its upstream (a tunnel, a plain or an originated TLS connection).
    Upstream(Box<Connected>),
    /// Admitted to a pod of this node and delivered.
    SameNode(Box<super::local::Delivery>),
}

/// A connection decided and connected, spliced for the rest of its life by
/// [`Connected::splice`]: what it holds while it lives, and nothing more (no snapshot,
/// no state of the decision).
pub(super) struct Connected {
    stream: TcpStream,
    upstream: Upstream,
    labels: Arc<ConnLabels>,
    /// The address the pod dialed.
    orig: SocketAddr,
    /// The endpoint's load-balancing slot, when a rule picked it.
    _endpoint_guard: Option<crate::l7::balance::EndpointGuard>,
}

impl Connected {
    /// Splices the pod's connection to where the agent connected it: a plain TCP
    /// upstream in the kernel where it can be, anything else (a tunnel stream, TLS the
    /// agent originated) by the agent.
    ///
    /// Not an `async fn`, which would keep `self` twice for the connection's life.
    #[expect(clippy::manual_async_fn, reason = "an async fn would hold `self` twice, as said above")]
    pub(super) fn splice(
        mut self,
        ctx: Arc<ProxyContext>,
        pod: Arc<Workload>,
        peer: SocketAddr,
    ) -> impl Future<Output = ()> + Send {
        async move {
            let client = self.stream.peer_addr().unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0)));
            let policy = ctx.snapshot.load().telemetry(&pod.key()).clone();
            let ends = copy::Ends { policy, client, dialed: self.orig, upstream: self.upstream.peer() };
            let (metrics, idle) = (&ctx.metrics, ctx.tcp_idle_timeout);
            let copied = match &mut self.upstream {
                Upstream::Plain(tcp) => {
                    let sockets = (&mut self.stream, tcp);
                    let observed = [(&*self.labels, ends)];
                    copy::counted_sockets(metrics, &observed, sockets, idle, None, ctx.kernel_splice.as_ref()).await
                }
                other => copy::counted(metrics, (&*self.labels, ends), &mut self.stream, other, idle).await,
            };
            let orig = self.orig;
            let served = copied.map(|(request, response)| {
                tracing::debug!(pod = %pod.name, %orig, request, response, "outbound closed");
            });
            let served = served.map_err(|source| Error::Io { what: "copy to", addr: orig, source });
            super::accept::log_served("outbound", &pod, peer, served);
        }
    }
}

/// One connection the pod made to `orig`, decided: served here when its way is not a
/// plain splice (L7, DNS, same-node delivery, egress, refusals), else connected and
/// handed back to be spliced.
///
/// The caller runs this boxed and splices what it returns: the connection's task, held
/// for as long as the connection lives, is then sized for the splice alone, not for
/// the decision's steps (TLS and HTTP/2 handshakes, peeking, lookups).
pub(super) async fn handle(
    ctx: &ProxyContext,
    pod: &Arc<Workload>,
    netns: &Arc<Netns>,
    mut stream: TcpStream,
    peer: SocketAddr,
    orig: SocketAddr,
) -> Result<Option<Decided>, Error> {
    // Only the pod itself reaches this listener through capture; anything else dialing
    // <pod ip>:15001 directly is refused.
    if !pod.ips.contains(&peer.ip()) {
        tracing::warn!(pod = %pod.name, %peer, "outbound listener reached by a foreign address; refused");
        sockets::reset(stream);
        return Ok(None);
    }
    let snapshot = ctx.snapshot.load_full();
    // DNS over TCP of a pod whose DNS is captured (as it is now, not when its proxy
    // started): the pod's DNS proxy answers, whatever server it dialed.
    if orig.port() == mesh_common::ports::DNS_SERVER
        && snapshot
            .workload_by_ip(peer.ip())
            .is_some_and(|w| w.namespace == pod.namespace && w.name == pod.name && w.dns_capture)
    {
        drop(snapshot);
        super::dns::serve_tcp(ctx.dns_context(pod.clone()), stream).await;
        return Ok(None);
    }
    let dialed_service = snapshot.service_by_vip(orig.ip());
    let routed = dialed_service.is_some_and(|s| snapshot.has_traffic_rules(&s.key()));
    if let Some(service) = dialed_service
        && routed
        && !is_declared_opaque(service, orig.port())
        && detect::peek(&stream).await == Protocol::Http
    {
        tracing::debug!(pod = %pod.name, %peer, %orig, service = %service.key(), "outbound HTTP, routed at L7");
        let table = crate::l7::server::RouteTable::service(service);
        drop(snapshot);
        crate::l7::server::serve(ctx.l7_context(), pod.clone(), netns.clone(), stream, (peer, orig), table).await;
        return Ok(None);
    }
    // A VirtualService's tcp rules decide first; otherwise the Service's endpoints.
    let (dest, _endpoint_guard, judged) = match tcp_route(ctx, &snapshot, pod, orig) {
        Some(Ok(routed)) => routed,
        Some(Err(reason)) => {
            tracing::warn!(pod = %pod.name, %orig, %reason, "tcp route has no endpoint; refused");
            sockets::reset(stream);
            return Ok(None);
        }
        // A DestinationRule ranking the endpoints by locality (with outlier
        // detection) chooses under its policy, as for HTTP; otherwise round robin.
        // Only a Service with rules is asked: the rest pay nothing per connection.
        None => match dialed_service.filter(|s| {
            use crate::traffic::policy::LocalityPolicy;
            routed && LocalityPolicy::applies(&snapshot.traffic_policy(&s.key(), None, orig.port()))
        }) {
            Some(service) => {
                let whole = [crate::traffic::route::WeightedBackend::to(service.key())];
                match to_backend(ctx, &snapshot, pod, &whole, orig) {
                    Ok(chosen) => chosen,
                    Err(reason) => {
                        tracing::warn!(pod = %pod.name, %orig, %reason, "service has no endpoint; refused");
                        sockets::reset(stream);
                        return Ok(None);
                    }
                }
            }
            None => (snapshot.resolve(orig, &ctx.l7.round_robin), None, None),
        },
    };
    tracing::debug!(pod = %pod.name, %peer, %orig, ?dest, "outbound");
    let (workload, addr, service) = match dest {
        Destination::Mesh { workload, addr, service } => (Some(workload), addr, service),
        Destination::Passthrough { addr, workload: None, .. } => {
            return leave_the_registry(ctx, snapshot, pod, netns, stream, orig, addr).await;
        }
        Destination::Passthrough { addr, workload, service } => (workload, addr, service),
        Destination::NoEndpoints { service } => {
            tracing::warn!(pod = %pod.name, %orig, %service, "service has no endpoint for this port; refused");
            sockets::reset(stream);
            return Ok(None);
        }
    };
    // A port declared HTTP whose endpoint no agent reads (outside the mesh, reached in
    // plaintext) is read here, so its requests are measured at least at the source. A
    // routed Service's connection was looked at above already: not peeked again.
    if let Some(service) = dialed_service
        && !routed
        && !workload.as_deref().is_some_and(|w| snapshot.tunnels_to(w, addr.port()))
        && service.ports.iter().any(|p| p.port == orig.port() && p.declared() == Declared::Http)
        && ctx.wants_requests(&snapshot, pod, true)
        && detect::peek(&stream).await == Protocol::Http
    {
        tracing::debug!(pod = %pod.name, %orig, service = %service.key(), "outbound HTTP outside the mesh, read at L7");
        let table = crate::l7::server::RouteTable::service(service);
        drop(snapshot);
        crate::l7::server::serve(ctx.l7_context(), pod.clone(), netns.clone(), stream, (peer, orig), table).await;
        return Ok(None);
    }
    // A pod of this node: admitted here, without a tunnel from the agent to itself.
    if let Some(dest) = workload.as_ref().filter(|w| snapshot.tunnels_to(w, addr.port())) {
        match local::deliver(ctx, &snapshot, pod, dest, stream, (peer, orig, addr), service.as_deref()).await {
            Local::Served(result) => return result.map(|()| None),
            Local::Admitted(delivery) => return Ok(Some(Decided::SameNode(delivery))),
            Local::Tunnel(s) => stream = s,
        }
    }
    let connected = ctx.dialer.connect(&snapshot, pod, netns, workload.as_deref(), addr, CONNECT_TIMEOUT).await;
    if connected.is_err()
        && let (Some(guard), Some(judged)) = (&_endpoint_guard, &judged)
        && guard.connect_failed(judged.outlier.as_ref(), judged.endpoints)
    {
        tracing::info!(pod = %pod.name, %addr, "endpoint ejected after failed connects (outlierDetection)");
    }
    let upstream = connected?;
    let service = ServiceLabels::service(service.as_deref());
    let labels = ctx.metrics.shared(ConnLabels::outbound(pod, workload.as_deref(), service, upstream.is_tunnel()));
    // What is spliced holds no snapshot: a connection that held the one it began
    // under would keep every config since alive for as long as it lasts.
    Ok(Some(Decided::Upstream(Box::new(Connected { stream, upstream, labels, orig, _endpoint_guard }))))
}

/// A connection to an address that is no Service and no pod: where a ServiceEntry
/// says, the address dialed (ALLOW_ANY), or nowhere (REGISTRY_ONLY).
async fn leave_the_registry(
    ctx: &ProxyContext,
    held: Arc<crate::snapshot::Snapshot>,
    pod: &Arc<Workload>,
    netns: &Arc<Netns>,
    stream: TcpStream,
    orig: SocketAddr,
    dialed: SocketAddr,
) -> Result<Option<Decided>, Error> {
    let snapshot = &*held;
    let decision = egress::decide(snapshot, pod, &stream, orig).await;
    // A mesh VirtualService's `http:` routes for the entry's host decide first, at L7;
    // a port the entry declares HTTP is read at L7 for its request metrics.
    if let Egress::Entry(entry, _, _) = &decision
        && (snapshot.external_routes(&entry.key).is_some()
            || (entry.serves_http(orig.port()) && ctx.wants_requests(snapshot, pod, true)))
        && detect::peek(&stream).await == Protocol::Http
    {
        tracing::debug!(pod = %pod.name, %orig, entry = %entry.key, "outbound HTTP to a ServiceEntry, read at L7");
        let table =
            crate::l7::server::RouteTable::Entry { key: entry.key.as_str().into(), host: entry.host.as_str().into() };
        let client = stream.peer_addr().unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0)));
        drop(held);
        crate::l7::server::serve(ctx.l7_context(), pod.clone(), netns.clone(), stream, (client, orig), table).await;
        return Ok(None);
    }
    let (upstream, service, reached, origination) = match decision {
        Egress::Anywhere => {
            let up = ctx.dialer.connect(snapshot, pod, netns, None, dialed, CONNECT_TIMEOUT).await?;
            (up, ServiceLabels::unknown(), None, None)
        }
        Egress::Blocked => {
            tracing::info!(pod = %pod.name, namespace = %pod.namespace, dst = %orig, "outbound connection outside the registry refused (outboundTrafficPolicy REGISTRY_ONLY)");
            ctx.metrics.outbound_blocked(pod);
            sockets::reset(stream);
            return Ok(None);
        }
        Egress::Entry(entry, _, _) if snapshot.has_external_tls_routes(&entry.key) => {
            if let Some(routed) = route_tls_to_entry(ctx, snapshot, pod, netns, &stream, orig, &entry.key).await? {
                let (upstream, labels, _endpoint_guard) = routed;
                let labels = ctx.metrics.shared(labels);
                return Ok(Some(Decided::Upstream(Box::new(Connected {
                    stream,
                    upstream,
                    labels,
                    orig,
                    _endpoint_guard,
                }))));
            }
            let target = entry.target(orig, None);
            let (up, addr) = ctx.dialer.connect_external(snapshot, pod, netns, &target).await?;
            (up, ServiceLabels::host(&entry.host, entry.namespace()), snapshot.workload_by_ip(addr.ip()), None)
        }
        Egress::Entry(entry, target, asked) => {
            let (up, addr) = ctx.dialer.connect_external(snapshot, pod, netns, &target).await?;
            tracing::debug!(pod = %pod.name, %orig, entry = %entry.key, %addr, "outbound to a ServiceEntry");
            let tls = snapshot.external_policy(&entry.key, orig.port()).origination;
            let origination = tls.map(|o| (o, addr, asked.unwrap_or_else(|| entry.host.clone())));
            let service = ServiceLabels::host(&entry.host, entry.namespace());
            (up, service, snapshot.workload_by_ip(addr.ip()), origination)
        }
    };
    let labels = ctx.metrics.shared(ConnLabels::outbound(pod, reached.map(|w| &**w), service, upstream.is_tunnel()));
    let upstream = match (upstream, origination) {
        (Upstream::Plain(tcp), Some((o, addr, host))) => {
            let from = crate::transport::originate::Credentials { allowed_dir: &ctx.egress_tls_dir, secrets: None };
            let tls = crate::transport::originate::originate(tcp, addr, &o, &host, &from).await?;
            Upstream::Originated(Box::new(tls))
        }
        (upstream, _) => upstream,
    };
    Ok(Some(Decided::Upstream(Box::new(Connected { stream, upstream, labels, orig, _endpoint_guard: None }))))
}

/// A TLS connection to a ServiceEntry's host that a mesh VirtualService's `tls:` rule
/// takes (by SNI and port): connected where the rule sends it, a Service (an egress
/// gateway) or the entry itself, with the endpoint's load-balancing slot (held while
/// the connection lives). None when no rule takes it.
async fn route_tls_to_entry(
    ctx: &ProxyContext,
    snapshot: &crate::snapshot::Snapshot,
    pod: &Arc<Workload>,
    netns: &Arc<Netns>,
    stream: &TcpStream,
    orig: SocketAddr,
    entry: &str,
) -> Result<Option<(Upstream, ConnLabels, Option<crate::l7::balance::EndpointGuard>)>, Error> {
    let Ok(Ok(sni)) = tokio::time::timeout(detect::DETECT_TIMEOUT * 4, detect::peek_sni(stream)).await else {
        return Ok(None);
    };
    let Some(rule) = snapshot.external_tls_route(entry, &sni, orig.port()) else { return Ok(None) };
    let Some(chosen) = crate::traffic::route::pick_weighted(&rule.backends) else { return Ok(None) };
    let port = chosen.backend.port.unwrap_or(orig.port());
    let external = snapshot.external.by_name(&chosen.backend.service, port, &pod.namespace).map(|e| (e, port));
    if let Some((e, port)) = external {
        let target = e.target(SocketAddr::new(orig.ip(), port), Some(&sni));
        let (up, addr) = ctx.dialer.connect_external(snapshot, pod, netns, &target).await?;
        let reached = snapshot.workload_by_ip(addr.ip()).cloned();
        let service = ServiceLabels::host(&e.host, e.namespace());
        let labels = ConnLabels::outbound(pod, reached.as_deref(), service, up.is_tunnel());
        return Ok(Some((up, labels, None)));
    }
    let (dest, guard, _) = match to_backend(ctx, snapshot, pod, std::slice::from_ref(chosen), orig) {
        Ok(d) => d,
        Err(reason) => {
            tracing::warn!(pod = %pod.name, %orig, %sni, %reason, "tls route has no endpoint; refused");
            return Ok(None);
        }
    };
    let (workload, addr) = match dest {
        Destination::Mesh { workload, addr, .. } => (Some(workload), addr),
        Destination::Passthrough { addr, workload, .. } => (workload, addr),
        Destination::NoEndpoints { .. } => return Ok(None),
    };
    let up = ctx.dialer.connect(snapshot, pod, netns, workload.as_deref(), addr, CONNECT_TIMEOUT).await?;
    let service = ServiceLabels::service(Some(&chosen.backend.service));
    let labels = ConnLabels::outbound(pod, workload.as_deref(), service, up.is_tunnel());
    tracing::debug!(pod = %pod.name, %orig, %sni, %addr, "TLS to a ServiceEntry host routed by a mesh tls rule");
    Ok(Some((up, labels, guard)))
}

/// The destination a VirtualService `tcp` rule picks for a connection to `orig`, with
/// the endpoint's load-balancing slot (held while the connection lives); None when no
/// tcp rule applies.
fn tcp_route(
    ctx: &ProxyContext,
    snapshot: &crate::snapshot::Snapshot,
    pod: &Workload,
    orig: SocketAddr,
) -> Option<Result<Chosen, String>> {
    let service = snapshot.service_by_vip(orig.ip())?;
    let rule = snapshot.routes(&service.key())?.first_tcp_match(orig.port(), pod)?;
    Some(to_backend(ctx, snapshot, pod, &rule.backends, orig))
}

/// What judges a failed connect to a chosen endpoint: the DestinationRule's ejection
/// rules, among how many endpoints. Held only until the connect is done.
struct Judged {
    outlier: Option<crate::traffic::policy::Outlier>,
    endpoints: usize,
}

/// A destination chosen under a DestinationRule: where, the endpoint's load-balancing
/// slot (held while the connection lives), and what judges a failed connect to it.
type Chosen = (Destination, Option<crate::l7::balance::EndpointGuard>, Option<Judged>);

/// An endpoint of one of `backends` (by weight, then under its DestinationRule) for a
/// connection to `orig`, with its load-balancing slot.
fn to_backend(
    ctx: &ProxyContext,
    snapshot: &crate::snapshot::Snapshot,
    pod: &Workload,
    backends: &[crate::traffic::route::WeightedBackend],
    orig: SocketAddr,
) -> Result<Chosen, String> {
    let Some(chosen) = crate::traffic::route::pick_weighted(backends) else {
        return Err("the rule has no destination".into());
    };
    let b = &chosen.backend;
    let target = crate::l7::Target::resolve(&ctx.l7, snapshot, pod, b, orig.port());
    let key = pod.ips.first().map(|ip| ip.to_string().into_bytes());
    let Some((workload, addr, guard)) = target.pick(&target.policy.lb, key.as_deref(), orig) else {
        return Err(format!(
            "no endpoint for {} subset {:?} port {}",
            b.service,
            b.subset,
            b.port.unwrap_or(orig.port())
        ));
    };
    let judged = Judged { endpoints: target.endpoints.len(), outlier: target.policy.outlier };
    Ok((crate::state::destination_for(workload, addr, Some(b.service.clone())), Some(guard), Some(judged)))
}

/// Ports declared TCP, TLS or a database protocol (by `appProtocol` or a name such as
/// `tcp-*`) are L4, as Istio's protocol selection reads them.
fn is_declared_opaque(service: &crate::state::Service, port: u16) -> bool {
    service.ports.iter().find(|p| p.port == port).is_some_and(|p| p.declared() == crate::state::Declared::Opaque)
}

//! One gateway port: accept under the caps, terminate TLS for the server the SNI names
//! (or serve plaintext HTTP), then hand the requests to the L7 engine with the
//! Gateways' routes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::LazyConfigAcceptor;
use tokio_util::sync::CancellationToken;
use x509_parser::extensions::GeneralName;

use super::{GatewayContext, PortPlan};
use crate::authz::{ConnAttrs, Decision};
use crate::l7::server::RouteTable;
use crate::telemetry::{ConnLabels, DenyReason, ServiceLabels};
use crate::transport::accept::{Caps, accept_loop};

/// A client has this long to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The metrics' name for gateway listeners.
const LISTENER: &str = "gateway";

/// Accepts on `listener` until `stop`; each connection reads the plan current when it
/// arrives.
pub(super) async fn serve(
    ctx: GatewayContext,
    listener: TcpListener,
    plan: Arc<ArcSwap<PortPlan>>,
    stop: CancellationToken,
) {
    let caps = Caps { limits: &ctx.limits, metrics: &ctx.l7.metrics, tasks: &ctx.tasks };
    accept_loop(&listener, caps, stop, LISTENER, |stream, peer| {
        Some(handle(ctx.clone(), stream, peer, plan.load_full()))
    })
    .await
}

/// Judges a connection the gateway carries as bytes (TCP, TLS passthrough) under the
/// AuthorizationPolicies that select the gateway's pod, as TCP: rules that need HTTP
/// attributes cannot admit it. Requests the gateway reads are judged one by one in L7.
fn admits_bytes(ctx: &GatewayContext, plan: &PortPlan, peer: SocketAddr, local: SocketAddr) -> bool {
    let snap = ctx.l7.snapshot.load();
    let attrs = ConnAttrs { src: peer, dst: local, peer: None };
    match snap.security(&plan.workload.key()).authz.check(&attrs, None) {
        Decision::Allow => true,
        Decision::Deny(reason) => {
            tracing::info!(gateway = %plan.workload.name, client = %peer, port = plan.port, %reason, "denied by authorization policy");
            ctx.l7.metrics.denied(&plan.workload, DenyReason::Policy, attrs.client(), &reason);
            false
        }
    }
}

async fn handle(ctx: GatewayContext, stream: TcpStream, peer: SocketAddr, plan: Arc<PortPlan>) {
    if plan.servers.iter().any(|s| s.east_west) {
        return super::east_west::serve(ctx, stream, peer, plan).await;
    }
    let Ok(local) = stream.local_addr() else { return };
    if plan.servers.iter().any(|s| s.opaque) {
        let snap = ctx.l7.snapshot.load_full();
        let rule = plan
            .gateways
            .iter()
            .filter_map(|g| snap.gateway(g)?.routes.get(&plan.port))
            .find_map(|p| p.tcp.iter().find(|r| r.matches(plan.port, &plan.workload)).cloned());
        let Some(rule) = rule else {
            return tracing::debug!(%peer, port = plan.port, "no tcp route; closed");
        };
        if !admits_bytes(&ctx, &plan, peer, local) {
            return;
        }
        if let Err(why) = splice_to(&ctx, stream, peer, &plan, &rule.backends).await {
            tracing::debug!(%peer, port = plan.port, %why, "TCP connection closed");
        }
        return;
    }
    // PASSTHROUGH and terminated servers may share a port: the SNI decides.
    if plan.servers.iter().any(|s| s.passthrough) {
        let sni = match tokio::time::timeout(HANDSHAKE_TIMEOUT, crate::proxy::detect::peek_sni(&stream)).await {
            Ok(Ok(sni)) => sni,
            Ok(Err(why)) => return tracing::debug!(%peer, port = plan.port, %why, "closed"),
            Err(_) => return tracing::debug!(%peer, port = plan.port, "no TLS client hello in time"),
        };
        if plan.passes_through(&sni) {
            if !admits_bytes(&ctx, &plan, peer, local) {
                return;
            }
            if let Err(why) = pass_through(&ctx, stream, peer, &plan, &sni).await {
                tracing::debug!(%peer, port = plan.port, %sni, %why, "TLS passthrough connection closed");
            }
            return;
        }
        if !plan.terminates_tls() {
            return tracing::debug!(%peer, port = plan.port, %sni, "no server for this SNI; closed");
        }
    }
    let (workload, netns) = (plan.workload.clone(), ctx.netns.clone());
    if !plan.terminates_tls() {
        let table = RouteTable::Gateway {
            gateways: plan.gateways.clone(),
            port: plan.port,
            tls: false,
            client: peer,
            peer: None,
            client_not_after: None,
        };
        crate::l7::server::serve(ctx.l7, workload, netns, stream, (peer, local), table).await;
        return;
    }
    let acceptor = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), stream);
    let start = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor).await {
        Ok(Ok(start)) => start,
        Ok(Err(e)) => return tracing::debug!(%peer, error = %e, "not a TLS client hello"),
        Err(_) => return tracing::debug!(%peer, "no TLS client hello in time"),
    };
    let sni = start.client_hello().server_name().map(str::to_owned);
    let Some(server) = plan.server_for_sni(sni.as_deref()) else {
        return tracing::debug!(%peer, ?sni, port = plan.port, "no server for this SNI; closed");
    };
    let Some(terminated) = &server.tls else { return };
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, start.into_stream(terminated.config.clone())).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => return tracing::debug!(%peer, ?sni, error = %e, "TLS handshake failed"),
        Err(_) => return tracing::debug!(%peer, ?sni, "TLS handshake timed out"),
    };
    if !terminated.client_names.is_empty() {
        let presented = tls.get_ref().1.peer_certificates().and_then(|c| c.first()).map(|c| names_in(c.as_ref()));
        if !presented.unwrap_or_default().iter().any(|n| terminated.client_names.contains(n)) {
            return tracing::info!(%peer, ?sni, "client certificate names none of the server's subjectAltNames; closed");
        }
    }
    // An ISTIO_MUTUAL client is a mesh workload: its identity is what policies name.
    let mesh_peer = if server.tls.as_ref().is_some_and(|t| t.mesh) {
        let id = tls.get_ref().1.peer_certificates().and_then(|c| c.first()).and_then(crate::identity::peer_identity);
        id.map(|id| crate::authz::Peer::from_identity(&id, &ctx.l7.snapshot.load().equivalent_domains))
    } else {
        None
    };
    // A verified client certificate ends: the connection's requests are refused from
    // then on (fail closed), as the mesh's tunnel refuses new streams.
    let client_not_after =
        tls.get_ref().1.peer_certificates().and_then(|c| c.first()).and_then(crate::identity::cert_not_after);
    let table = RouteTable::Gateway {
        gateways: Arc::new([server.gateway.clone()]),
        port: plan.port,
        tls: true,
        client: peer,
        peer: mesh_peer,
        client_not_after,
    };
    crate::l7::server::serve(ctx.l7, workload, netns, tls, (peer, local), table).await;
}

/// A PASSTHROUGH server: the SNI of the client hello, read without consuming it,
/// picks the TLS route; the connection is spliced, still encrypted, to an endpoint of
/// its destination (through the mesh's tunnel when the endpoint is in the mesh).
async fn pass_through(
    ctx: &GatewayContext,
    stream: TcpStream,
    peer: SocketAddr,
    plan: &PortPlan,
    sni: &str,
) -> Result<(), String> {
    let snap = ctx.l7.snapshot.load_full();
    let backends = plan
        .gateways
        .iter()
        .find_map(|g| snap.gateway(g)?.routes.get(&plan.port)?.for_sni(sni).map(<[_]>::to_vec))
        .ok_or_else(|| format!("no TLS route for SNI {sni}"))?;
    splice_to(ctx, stream, peer, plan, &backends).await
}

/// Splices the client's bytes, as they are, to an endpoint of one of `backends` (by
/// weight, then under the DestinationRule), through the mesh's tunnel when the endpoint
/// is in the mesh.
async fn splice_to(
    ctx: &GatewayContext,
    mut stream: TcpStream,
    peer: SocketAddr,
    plan: &PortPlan,
    backends: &[crate::traffic::route::WeightedBackend],
) -> Result<(), String> {
    let snap = ctx.l7.snapshot.load_full();
    let chosen = crate::traffic::route::pick_weighted(backends).ok_or("the route has no destination")?;
    let pod = &plan.workload;
    let dialed = stream.local_addr().unwrap_or(peer);
    // A ServiceEntry host (an egress gateway's destination): where the entry says.
    let port = chosen.backend.port.unwrap_or(plan.port);
    if let Some(entry) = snap.external.by_name(&chosen.backend.service, port, &pod.namespace) {
        if entry.resolution == crate::config::service_entry::Resolution::None {
            return Err(format!(
                "ServiceEntry {} resolves NONE: a gateway has no address the client dialed to send it to",
                entry.key
            ));
        }
        // STATIC and DNS targets do not depend on the address dialed.
        let unspecified = SocketAddr::new(std::net::Ipv4Addr::UNSPECIFIED.into(), port);
        let target = entry.target(unspecified, Some(&chosen.backend.service));
        let (mut upstream, _) =
            ctx.l7.dialer.connect_external(&snap, pod, &ctx.netns, &target).await.map_err(|e| e.to_string())?;
        let service = ServiceLabels::host(&entry.host, entry.namespace());
        let labels = ConnLabels::outbound(pod, None, service, upstream.is_tunnel());
        let policy = snap.telemetry(&pod.key()).clone();
        let ends = crate::transport::copy::Ends { policy, client: peer, dialed, upstream: upstream.peer() };
        return crate::transport::copy::counted(
            &ctx.l7.metrics,
            (&labels, ends),
            &mut stream,
            &mut upstream,
            ctx.tcp_idle_timeout,
        )
        .await
        .map(|_| ())
        .map_err(|e| e.to_string());
    }
    let target = crate::l7::Target::resolve(&ctx.l7.runtime, &snap, pod, &chosen.backend, plan.port);
    let (endpoint, addr, _load) = target
        .pick(&target.policy.lb, None, peer)
        .ok_or_else(|| format!("no endpoint for {}", chosen.backend.service))?;
    let mut upstream = ctx
        .l7
        .dialer
        .connect(&snap, pod, &ctx.netns, Some(&endpoint), addr, crate::transport::CONNECT_TIMEOUT)
        .await
        .map_err(|e| e.to_string())?;
    let service = ServiceLabels::service(Some(&chosen.backend.service));
    let labels = ConnLabels::outbound(pod, Some(&endpoint), service, upstream.is_tunnel());
    let policy = snap.telemetry(&pod.key()).clone();
    let ends = crate::transport::copy::Ends { policy, client: peer, dialed, upstream: Some(addr) };
    crate::transport::copy::counted(&ctx.l7.metrics, (&labels, ends), &mut stream, &mut upstream, ctx.tcp_idle_timeout)
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// The DNS and URI names of a certificate.
fn names_in(der: &[u8]) -> Vec<String> {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else { return Vec::new() };
    let Ok(Some(san)) = cert.subject_alternative_name() else { return Vec::new() };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::DNSName(d) => Some(d.to_string()),
            GeneralName::URI(u) => Some(u.to_string()),
            _ => None,
        })
        .collect()
}

//! The east-west gateway's HBONE port (Istio ambient's `istio-east-west` Gateway:
//! listener `protocol: HBONE`, port 15008): the outer tunnel of double HBONE ends
//! here. A mesh client (mutual TLS, any identity of the mesh's trust domains) asks with
//! CONNECT for a pod address of this network (as this mesh's agents ask) or a
//! Service's `host:port` (as ztunnel asks; a serving endpoint of this network is
//! drawn); the stream is spliced, as it is, to that pod's HBONE port, where the
//! client's inner tunnel to the pod ends. The gateway reads
//! none of it: the pod's agent authenticates and judges the client itself.
//!
//! Invariants: the gateway reaches only the HBONE port of enrolled pods of its own
//! network (never another port, address or network: no open relay); a stream is taken
//! only while the client's certificate and the gateway's own are valid, under the
//! gateway's AuthorizationPolicies (at L4, with the client's identity); each stream
//! counts against the client address's connection cap.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

use http::uri::Authority;
use http::{Method, Request, StatusCode};
use mesh_common::ports;
use rand::Rng as _;
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;

use super::{GatewayContext, PortPlan};
use crate::authz::{ConnAttrs, Decision, Peer};
use crate::identity::Identity;
use crate::proxy::hbone::accept_mesh_client;
use crate::snapshot::{Reach, Snapshot};
use crate::state::Workload;
use crate::telemetry::{ConnLabels, DenyReason, ServiceLabels};
use crate::transport::coalesce::Coalesced;
use crate::transport::hbone::{Answer, H2Stream, ServeStream};
use crate::transport::limits::ConnPermit;
use crate::transport::{CONNECT_TIMEOUT, sockets};

/// The client of one outer tunnel.
struct Client {
    identity: Identity,
    /// The notAfter of its certificate: no stream is taken after it.
    not_after: SystemTime,
    addr: SocketAddr,
}

/// Serves one connection to the HBONE port: mutual TLS, then HTTP/2 CONNECT streams.
pub(super) async fn serve(ctx: GatewayContext, stream: TcpStream, peer: SocketAddr, plan: Arc<PortPlan>) {
    let Some(config) = plan.servers.iter().find(|s| s.east_west).and_then(|s| s.tls.as_ref()).map(|t| t.config.clone())
    else {
        return;
    };
    let Ok(local) = stream.local_addr() else { return };
    sockets::watch_liveness(&stream);
    let (tls, identity, not_after) = match accept_mesh_client(&TlsAcceptor::from(config), stream, peer).await {
        Ok(accepted) => accepted,
        Err(e) => return tracing::info!(%peer, error = %e, "east-west: connection refused"),
    };
    let client = Arc::new(Client { identity, not_after, addr: peer });
    let (shutdown, tasks) = (ctx.l7.shutdown.clone(), ctx.tasks.clone());
    let decide = move |req| stream_request(ctx.clone(), plan.clone(), client.clone(), local, req);
    if let Err(e) = crate::transport::hbone::serve(Coalesced::new(tls), &shutdown, &tasks, decide).await {
        tracing::debug!(%peer, error = %e, "east-west: connection ended");
    }
}

/// The pod a CONNECT's authority asks for, and the address it names: `ip:port` of a
/// pod, or a Service's `host:port` (as ztunnel asks), whose serving endpoints of this
/// network are drawn at random. Only enrolled pods of the gateway's own network, at a
/// port that is not the mesh's own.
fn destination(snap: &Snapshot, authority: &Authority) -> Option<(Arc<Workload>, SocketAddr)> {
    let of_this_network =
        |w: &Workload, at: SocketAddr| w.enrolled && snap.reach(w) == Reach::Direct && !ports::is_mesh_owned(at.port());
    if let Ok(target) = authority.as_str().parse::<SocketAddr>() {
        let dest = snap.workload_by_ip(target.ip()).filter(|w| of_this_network(w, target))?;
        return Some((dest.clone(), target));
    }
    let service = snap.service_by_hostname(&authority.host().to_ascii_lowercase())?;
    let mut serving: Vec<(Arc<Workload>, SocketAddr)> = snap
        .endpoints(&service.key(), None, authority.port_u16()?)
        .into_iter()
        .filter(|(w, at)| w.serving && of_this_network(w, *at))
        .collect();
    if serving.is_empty() {
        return None;
    }
    Some(serving.swap_remove(rand::rng().random_range(0..serving.len())))
}

/// One CONNECT stream: check the target, the client and the policies, dial the pod's
/// HBONE port and splice.
async fn stream_request(
    ctx: GatewayContext,
    plan: Arc<PortPlan>,
    client: Arc<Client>,
    local: SocketAddr,
    req: Request<()>,
) -> Answer<Spliced> {
    if req.method() != Method::CONNECT {
        return Answer::Refuse(StatusCode::METHOD_NOT_ALLOWED);
    }
    let Some(authority) = req.uri().authority().cloned() else {
        return Answer::Refuse(StatusCode::BAD_REQUEST);
    };
    if SystemTime::now() >= client.not_after {
        tracing::info!(client = %client.identity, %authority, "east-west: the client's certificate has expired; refused");
        return Answer::Refuse(StatusCode::UNAUTHORIZED);
    }
    let gateway = &plan.workload;
    // A connection outlives the certificate the gateway presented: a new stream
    // takes a valid one (fail closed at expiry, as the pods' HBONE servers do).
    if let Err(e) = ctx.l7.dialer.certs.get(&gateway.identity) {
        tracing::warn!(client = %client.identity, %authority, error = %e, "east-west: no valid certificate of its own; refused");
        return Answer::Refuse(StatusCode::SERVICE_UNAVAILABLE);
    }
    let snap = ctx.l7.snapshot.load_full();
    let Some((dest, target)) = destination(&snap, &authority) else {
        tracing::warn!(client = %client.identity, %authority, "east-west: not a mesh pod of this network; refused");
        return Answer::Refuse(StatusCode::FORBIDDEN);
    };
    let peer = Peer::from_identity(&client.identity, &snap.equivalent_domains);
    let attrs = ConnAttrs { src: client.addr, dst: local, peer: Some(&peer) };
    if let Decision::Deny(reason) = snap.security(&gateway.key()).authz.check(&attrs, None) {
        tracing::info!(gateway = %gateway.name, client = %client.identity, %target, %reason, "east-west: denied by authorization policy");
        ctx.l7.metrics.denied(gateway, DenyReason::Policy, attrs.client(), &reason);
        return Answer::Refuse(StatusCode::FORBIDDEN);
    }
    let Ok(permit) = ctx.limits.admit(client.addr.ip()) else {
        tracing::info!(client = %client.identity, "east-west: connection cap reached; refused");
        return Answer::Refuse(StatusCode::SERVICE_UNAVAILABLE);
    };
    let hbone = SocketAddr::new(target.ip(), ports::INBOUND_HBONE);
    let upstream = match sockets::connect_in(&ctx.netns, hbone, ctx.l7.dialer.bypass_mark, CONNECT_TIMEOUT).await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(client = %client.identity, %target, error = %e, "east-west: the pod's HBONE port is unreachable");
            return Answer::Refuse(StatusCode::SERVICE_UNAVAILABLE);
        }
    };
    let labels = ConnLabels::outbound(gateway, Some(&dest), ServiceLabels::unknown(), true);
    let policy = snap.telemetry(&gateway.key()).clone();
    let ends = crate::transport::copy::Ends { policy, client: client.addr, dialed: target, upstream: Some(hbone) };
    drop(snap);
    tracing::debug!(client = %client.identity, %target, "east-west: stream spliced to the pod's HBONE port");
    Answer::Accept(Spliced { ctx, labels, ends, target, upstream, permit })
}

/// A stream accepted: the pod's HBONE port connected, and the stream's place under the
/// client's cap.
struct Spliced {
    ctx: GatewayContext,
    labels: ConnLabels,
    ends: crate::transport::copy::Ends,
    target: SocketAddr,
    upstream: TcpStream,
    permit: ConnPermit,
}

impl ServeStream for Spliced {
    async fn serve(self, mut tunnel: H2Stream) {
        let Spliced { ctx, labels, ends, target, mut upstream, permit } = self;
        let metrics = &ctx.l7.metrics;
        let copied =
            crate::transport::copy::counted(metrics, (&labels, ends), &mut tunnel, &mut upstream, ctx.tcp_idle_timeout)
                .await;
        if let Err(e) = copied {
            tracing::debug!(%target, error = %e, "east-west: stream ended");
        }
        drop(permit);
    }
}

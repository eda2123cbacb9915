//! HBONE server: mutual TLS 1.3 and HTTP/2 on `:15008` in each pod's netns. Each
//! CONNECT stream is one tunnelled TCP connection to the pod.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use futures::FutureExt as _;
use http::{Method, Request, StatusCode};
use mesh_common::ports;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use super::ProxyContext;
use super::accept::{OrigFrom, accept_loop};
use super::admission::{self, Arrival};
use crate::authz::{ConnVerdict, Decision, Peer};
use crate::dataplane::Netns;
use crate::identity::{Identity, cert_not_after, humantime_utc, peer_identity};
use crate::snapshot::Snapshot;
use crate::state::Workload;
use crate::telemetry::ConnLabels;
use crate::transport::coalesce::Coalesced;
use crate::transport::hbone::{Answer, H2Stream, ServeStream};
use crate::transport::{CONNECT_TIMEOUT, Error, HANDSHAKE_TIMEOUT, sockets};

pub(super) async fn serve(
    ctx: ProxyContext,
    (pod, netns): (Arc<Workload>, Arc<Netns>),
    listener: Arc<TcpListener>,
    tls: Arc<rustls::ServerConfig>,
    stop: CancellationToken,
) {
    let acceptor = TlsAcceptor::from(tls);
    // Shared by the connections and their streams: each holds a pointer, not a copy.
    let ctx = Arc::new(ctx);
    accept_loop(&listener, &ctx, stop, "hbone", OrigFrom::LocalAddr, |stream, peer, _| {
        let (ctx, pod, netns, acceptor) = (ctx.clone(), pod.clone(), netns.clone(), acceptor.clone());
        async move {
            if let Err(e) = connection(ctx, pod.clone(), netns, acceptor, stream, peer).await {
                tracing::warn!(pod = %pod.name, %peer, error = %e, "HBONE connection refused");
            }
        }
    })
    .await;
}

async fn connection(
    ctx: Arc<ProxyContext>,
    pod: Arc<Workload>,
    netns: Arc<Netns>,
    acceptor: TlsAcceptor,
    stream: TcpStream,
    peer: SocketAddr,
) -> Result<(), Error> {
    sockets::watch_liveness(&stream);
    let (tls, client, not_after) = accept_mesh_client(&acceptor, stream, peer).await?;
    tracing::debug!(pod = %pod.name, %peer, %client, "HBONE connection accepted");
    let (shutdown, tasks) = (ctx.shutdown.clone(), ctx.tasks.clone());
    let client = Arc::new(Client { identity: client, not_after, as_peer: Mutex::default() });
    let decide = move |req| stream_request(ctx.clone(), pod.clone(), netns.clone(), client.clone(), peer, req);
    crate::transport::hbone::serve(Coalesced::new(tls), &shutdown, &tasks, decide).await.map_err(|e| e.at(peer))
}

/// Mutual TLS with a mesh client on an HBONE port (a pod's, or an east-west
/// gateway's): the session, the SPIFFE identity the client proved, and the notAfter
/// of the certificate it proved it with.
pub(crate) async fn accept_mesh_client(
    acceptor: &TlsAcceptor,
    stream: TcpStream,
    peer: SocketAddr,
) -> Result<(tokio_rustls::server::TlsStream<TcpStream>, Identity, SystemTime), Error> {
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(source)) => return Err(Error::Tls { addr: peer, source }),
        Err(_) => return Err(Error::Timeout { what: "TLS handshake with", addr: peer, after: HANDSHAKE_TIMEOUT }),
    };
    let leaf = tls.get_ref().1.peer_certificates().and_then(|c| c.first());
    // The verifier already refused certificates without an identity or that do not
    // parse; this is belt and braces.
    let (Some(client), Some(not_after)) = (leaf.and_then(peer_identity), leaf.and_then(cert_not_after)) else {
        return Err(Error::Tls { addr: peer, source: std::io::Error::other("client presented no SPIFFE identity") });
    };
    Ok((tls, client, not_after))
}

/// The authenticated client of one HBONE connection, and the peer its policies read,
/// made once for all the connection's streams (each live stream's re-judging entry
/// shares it) and again only when the mesh's equivalent trust domains change.
struct Client {
    identity: Identity,
    /// The notAfter of the certificate it presented: no stream is taken after it.
    not_after: SystemTime,
    as_peer: Mutex<Option<(Vec<String>, Arc<Peer>)>>,
}

impl Client {
    fn peer(&self, equivalent_domains: &[String]) -> Arc<Peer> {
        let mut cached = self.as_peer.lock().unwrap_or_else(|p| p.into_inner());
        match &*cached {
            Some((domains, peer)) if domains == equivalent_domains => peer.clone(),
            _ => {
                let peer = Arc::new(Peer::from_identity(&self.identity, equivalent_domains));
                *cached = Some((equivalent_domains.to_vec(), peer.clone()));
                peer
            }
        }
    }
}

/// Why a CONNECT stream's request names no target the pod's tunnel may reach.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// Not a CONNECT.
    NotConnect,
    /// The authority is neither `ip:port` nor a Service's `host:port`.
    BadTarget,
    /// An address of another pod, or a port of the mesh's own.
    Outside(SocketAddr),
}

impl Refused {
    /// The status the stream is answered with.
    pub(crate) fn status(self) -> StatusCode {
        match self {
            Refused::NotConnect => StatusCode::METHOD_NOT_ALLOWED,
            Refused::BadTarget => StatusCode::BAD_REQUEST,
            Refused::Outside(_) => StatusCode::FORBIDDEN,
        }
    }
}

/// The address a CONNECT stream to `pod`'s tunnel asks for: `ip:port`, or a Service's
/// `host:port` (`<svc>.<ns>.svc.cluster.local`, as ztunnel names the target of double
/// HBONE) that `pod` is an endpoint of, at the pod's port for it. The tunnel terminates
/// in this pod's netns: only this pod's application ports are reachable through it,
/// never another address (no open relay).
pub(crate) fn connect_target<B>(req: &Request<B>, pod: &Workload, snap: &Snapshot) -> Result<SocketAddr, Refused> {
    if req.method() != Method::CONNECT {
        return Err(Refused::NotConnect);
    }
    let authority = req.uri().authority().ok_or(Refused::BadTarget)?;
    let target = match authority.as_str().parse::<SocketAddr>() {
        Ok(target) => target,
        Err(_) => {
            let (host, port) = (authority.host().to_ascii_lowercase(), authority.port_u16().ok_or(Refused::BadTarget)?);
            let service = snap.service_by_hostname(&host).ok_or(Refused::BadTarget)?;
            let sp = service.ports.iter().find(|p| p.port == port).ok_or(Refused::BadTarget)?;
            let endpoint = service.endpoints.iter().find(|e| e.workload.key() == pod.key() && pod.ips.contains(&e.ip));
            let unspecified = SocketAddr::new(std::net::Ipv4Addr::UNSPECIFIED.into(), port);
            endpoint.and_then(|e| e.addr(sp)).ok_or(Refused::Outside(unspecified))?
        }
    };
    if !pod.ips.contains(&target.ip()) || ports::is_mesh_owned(target.port()) {
        return Err(Refused::Outside(target));
    }
    Ok(target)
}

/// Why a stream may not be taken on a connection whose certificates no longer hold.
struct Expired {
    status: StatusCode,
    reason: String,
}

/// Whether the pod can still vouch for itself (its certificate valid now) and the
/// client's certificate has not expired since the handshake.
fn credentials_valid(ctx: &ProxyContext, pod: &Workload, client: &Client) -> Result<(), Expired> {
    if SystemTime::now() >= client.not_after {
        let reason = format!("the client's certificate expired at {}", humantime_utc(client.not_after));
        return Err(Expired { status: StatusCode::UNAUTHORIZED, reason });
    }
    ctx.dialer
        .certs
        .get(&pod.identity)
        .map(drop)
        .map_err(|e| Expired { status: StatusCode::SERVICE_UNAVAILABLE, reason: e.to_string() })
}

/// One CONNECT stream: dial the pod, then splice.
async fn stream_request(
    ctx: Arc<ProxyContext>,
    pod: Arc<Workload>,
    netns: Arc<Netns>,
    client: Arc<Client>,
    peer: SocketAddr,
    req: Request<()>,
) -> Answer<Accepted> {
    let snap = ctx.snapshot.load_full();
    let target = match connect_target(&req, &pod, &snap) {
        Ok(target) => target,
        Err(refused) => {
            if let Refused::Outside(target) = refused {
                tracing::warn!(pod = %pod.name, client = %client.identity, %target, "CONNECT to a target outside this pod; refused");
            }
            return Answer::Refuse(refused.status());
        }
    };
    // A connection outlives the certificates it was opened with; a new stream is a new
    // proxied connection, and takes valid ones on both ends (fail closed at expiry).
    if let Err(refusal) = credentials_valid(&ctx, &pod, &client) {
        tracing::warn!(pod = %pod.name, client = %client.identity, %target, reason = %refusal.reason, "CONNECT refused");
        return Answer::Refuse(refusal.status);
    }
    // Each stream is a proxied connection of the source pod: its cap counts streams too,
    // so a peer cannot multiply its share by multiplexing.
    let permit = match ctx.limits.admit(peer.ip()) {
        Ok(p) => p,
        Err(hit) => {
            ctx.caps().refuse("hbone_stream", peer, hit);
            return Answer::Refuse(StatusCode::SERVICE_UNAVAILABLE);
        }
    };
    let security = snap.security(&pod.key()).clone();
    let arrival = Arrival { src: peer, dst: target, peer: Some(client.peer(&snap.equivalent_domains)) };
    let verdict = security.authz.check_connection(&arrival.attrs());
    if let ConnVerdict::Decided(Decision::Deny(reason)) = &verdict {
        admission::denied(&ctx, &pod, &arrival.attrs(), reason, None);
        return Answer::Refuse(StatusCode::FORBIDDEN);
    }
    let app = match sockets::deliver_in(&netns, target, peer.ip(), ctx.dialer.bypass_mark, CONNECT_TIMEOUT).await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(pod = %pod.name, client = %client.identity, %target, error = %e, "application unreachable");
            return Answer::Refuse(StatusCode::SERVICE_UNAVAILABLE);
        }
    };
    let labels =
        ctx.metrics.shared(ConnLabels::inbound_from_identity(&snap, &pod, target.port(), &client.identity, peer));
    Answer::Accept(Accepted { ctx, pod, netns, security, arrival, verdict, app, labels, permit })
}

/// A CONNECT stream accepted: the pod's connection delivered, judged at connect, and
/// the stream's place under the source's cap.
struct Accepted {
    ctx: Arc<ProxyContext>,
    pod: Arc<Workload>,
    netns: Arc<Netns>,
    security: Arc<crate::authz::WorkloadSecurity>,
    arrival: Arrival,
    verdict: ConnVerdict,
    app: tokio::net::TcpStream,
    labels: Arc<ConnLabels>,
    permit: crate::transport::limits::ConnPermit,
}

impl ServeStream for Accepted {
    fn serve(self, tunnel: H2Stream) -> impl Future<Output = ()> + Send + 'static {
        let Accepted { ctx, pod, netns, security, arrival, verdict, app, labels, permit } = self;
        admission::serve(ctx, pod, netns, security, arrival, verdict, tunnel, app, labels).map(move |()| drop(permit))
    }
}

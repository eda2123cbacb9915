//! Connections between two pods of this node. The agent holds both pods' certificates,
//! so a tunnel from itself to itself would prove nothing it does not know: it admits
//! the connection as the destination's HBONE server would (the source's identity as the
//! authenticated peer, the destination's PeerAuthentication and AuthorizationPolicy, the
//! same caps, tracking for re-judgement), delivers it to the application, and splices
//! the two sockets, in the kernel where it can. Reported twice, as the source and as the
//! destination, as the tunnelled connection is.
//!
//! Left to the tunnel (the destination's HBONE server decides there): policies that read
//! HTTP, HTTP the destination reads for its request metrics, a source without a
//! certificate, and any destination this agent does not serve right now.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use mesh_common::ports;
use tokio::net::TcpStream;

use super::ProxyContext;
use super::admission::{self, Arrival, TrackedConn};
use super::detect::{self, Protocol};
use crate::authz::{ConnVerdict, Decision, Peer};
use crate::dataplane::Netns;
use crate::snapshot::Snapshot;
use crate::state::Workload;
use crate::telemetry::{ConnLabels, ServiceLabels};
use crate::transport::limits::ConnPermit;
use crate::transport::{CONNECT_TIMEOUT, Error, copy, sockets};

/// The pods whose proxies run on this agent now, by workload key, with the namespace
/// their deliveries are made in.
#[derive(Debug, Default)]
pub struct LocalPods {
    next: AtomicU64,
    pods: Mutex<HashMap<String, (u64, Arc<Netns>)>>,
}

impl LocalPods {
    /// Records the proxy of `key` in `netns`; returns the entry's id, for
    /// [`LocalPods::remove`].
    pub(super) fn insert(&self, key: String, netns: Arc<Netns>) -> u64 {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.pods.lock().unwrap_or_else(|p| p.into_inner()).insert(key, (id, netns));
        id
    }

    /// Forgets `key`, unless a newer proxy of the same pod replaced entry `id`.
    pub(super) fn remove(&self, key: &str, id: u64) {
        let mut pods = self.pods.lock().unwrap_or_else(|p| p.into_inner());
        if pods.get(key).is_some_and(|(current, _)| *current == id) {
            pods.remove(key);
        }
    }

    /// The namespace of `key`'s pod, while this agent serves it.
    pub(super) fn netns(&self, key: &str) -> Option<Arc<Netns>> {
        self.pods.lock().unwrap_or_else(|p| p.into_inner()).get(key).map(|(_, n)| n.clone())
    }
}

/// What became of a connection offered to [`deliver`].
pub(super) enum Local {
    /// Served here: refused as the destination's policy says, or its application
    /// unreachable.
    Served(Result<(), Error>),
    /// Admitted and connected to the application: [`Delivery::splice`] moves its bytes,
    /// once the caller has let go of the snapshot it was decided under.
    Admitted(Box<Delivery>),
    /// Not for this path: the stream comes back, untouched but perhaps peeked, for the
    /// tunnel.
    Tunnel(TcpStream),
}

/// A same-node connection admitted and delivered, with what it is counted as and what
/// it holds while it lives (its cap permit, its re-judging entry). Owns everything it
/// needs: no snapshot is kept alive by a connection, however long it lasts.
pub(super) struct Delivery {
    stream: TcpStream,
    app: TcpStream,
    addr: SocketAddr,
    /// Reported as the source, then as the destination.
    source: (Arc<ConnLabels>, copy::Ends),
    destination: (Arc<ConnLabels>, copy::Ends),
    tracked: TrackedConn,
    _permit: ConnPermit,
}

impl Delivery {
    /// Splices the pod's socket and the application's, in the kernel where it can,
    /// until either ends or the current policy no longer allows the connection.
    ///
    /// Not an `async fn`, which would keep `self` twice for the connection's life.
    #[expect(clippy::manual_async_fn, reason = "an async fn would hold `self` twice, as said above")]
    pub(super) fn splice(mut self, ctx: Arc<ProxyContext>) -> impl Future<Output = Result<(), Error>> + Send {
        async move {
            let observed = [(&*self.source.0, self.source.1), (&*self.destination.0, self.destination.1)];
            let sockets = (&mut self.stream, &mut self.app);
            let (idle, stop) = (ctx.tcp_idle_timeout, Some(&self.tracked.stop));
            let result =
                copy::counted_sockets(&ctx.metrics, &observed, sockets, idle, stop, ctx.kernel_splice.as_ref()).await;
            let addr = self.addr;
            result.map(drop).map_err(|source| Error::Io { what: "copy to", addr, source })
        }
    }
}

/// Where `src`'s connection `stream` (from `peer`, to `orig`) goes when its chosen
/// endpoint `addr` is `dest`, a pod the mesh tunnels to.
#[allow(clippy::too_many_arguments)]
pub(super) async fn deliver(
    ctx: &ProxyContext,
    snapshot: &Snapshot,
    src: &Workload,
    dest: &Arc<Workload>,
    stream: TcpStream,
    (peer, orig, addr): (SocketAddr, SocketAddr, SocketAddr),
    service: Option<&str>,
) -> Local {
    let dest_key = dest.key();
    let Some(netns) = ctx.local_pods.netns(&dest_key) else { return Local::Tunnel(stream) };
    // The checks the destination's HBONE server makes of a CONNECT target.
    if !dest.ips.contains(&addr.ip()) || ports::is_mesh_owned(addr.port()) {
        return Local::Tunnel(stream);
    }
    // The tunnel would present the source's certificate: without one, neither path
    // may vouch for it.
    if ctx.dialer.certs.get(&src.identity).is_err() {
        return Local::Tunnel(stream);
    }
    let security = snapshot.security(&dest_key).clone();
    let arrival = Arrival {
        src: peer,
        dst: addr,
        peer: Some(Arc::new(Peer::from_identity(&src.identity, &snapshot.equivalent_domains))),
    };
    match security.authz.check_connection(&arrival.attrs()) {
        ConnVerdict::Decided(Decision::Allow) => {}
        ConnVerdict::Decided(Decision::Deny(reason)) => {
            admission::denied(ctx, dest, &arrival.attrs(), &reason, None);
            sockets::reset(stream);
            return Local::Served(Ok(()));
        }
        ConnVerdict::PerRequest => return Local::Tunnel(stream),
    }
    if admission::reads_http(ctx, snapshot, dest, addr.port()) && detect::peek(&stream).await == Protocol::Http {
        return Local::Tunnel(stream);
    }
    // The tunnel's stream would count against the source pod's cap: so does this.
    let permit = match ctx.limits.admit(peer.ip()) {
        Ok(p) => p,
        Err(hit) => {
            ctx.caps().refuse("local", peer, hit);
            sockets::reset(stream);
            return Local::Served(Ok(()));
        }
    };
    let app = match sockets::deliver_in(&netns, addr, peer.ip(), ctx.dialer.bypass_mark, CONNECT_TIMEOUT).await {
        Ok(app) => app,
        Err(e) => {
            tracing::warn!(pod = %dest.name, source = %src.identity, %addr, error = %e, "application unreachable");
            sockets::reset(stream);
            return Local::Served(Err(e));
        }
    };
    tracing::debug!(pod = %src.name, %peer, %orig, dest = %dest.name, %addr, "same-node connection admitted by the agent");
    let source = ctx.metrics.shared(ConnLabels::outbound(src, Some(dest), ServiceLabels::service(service), true));
    let destination =
        ctx.metrics.shared(ConnLabels::inbound_from_identity(snapshot, dest, addr.port(), &src.identity, peer));
    super::direct::admitted(ctx, snapshot, (src, dest), peer, (orig, addr));
    let ends = |pod: &Workload, dialed| copy::Ends {
        policy: snapshot.telemetry(&pod.key()).clone(),
        client: peer,
        dialed,
        upstream: Some(addr),
    };
    Local::Admitted(Box::new(Delivery {
        stream,
        app,
        addr,
        source: (source, ends(src, orig)),
        destination: (destination, ends(dest, addr)),
        tracked: ctx.inbound.track(dest, &arrival),
        _permit: permit,
    }))
}

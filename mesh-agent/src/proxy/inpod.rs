//! The listeners the agent keeps inside each enrolled pod's network namespace.

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::Arc;

use mesh_common::ports;
use std::borrow::Borrow;

use futures::FutureExt as _;
use futures::future::Either;
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio_util::sync::CancellationToken;

use super::accept::{OrigFrom, accept_loop, log_served};
use super::outbound::Decided;
use super::{ProxyContext, dns, hbone, inbound, outbound};
use crate::dataplane::Netns;
use crate::state::Workload;
use crate::transport::Error;
use crate::transport::inherited::SocketKey;

/// A running proxy for one pod: its listeners and accept loops.
///
/// Outbound: one listener per address family the pod has (`<pod ip>:15001`, where
/// connect4/connect6 send its connections). Inbound plaintext (15006) and HBONE
/// (15008): one dual-stack listener each, since the kernel steers connections to any
/// address of the pod, IPv4 or IPv6, to them. DNS (UDP 15053): one socket per family,
/// at the address the kernel sends the pod's queries to when its DNS is captured
/// (bound whether or not it is, so capture can be turned on without a restart).
#[derive(Debug)]
pub struct PodProxy {
    /// The pod served.
    pub workload: Arc<Workload>,
    /// Raw fd of the plaintext inbound listener, for the kernel's SOCKMAP.
    inbound_fd: RawFd,
    /// Every socket of the pod's proxy, kept open while the loops run and handed to a
    /// successor agent from here ([`PodProxy::sockets`]).
    listeners: Vec<Arc<TcpListener>>,
    dns: Vec<Arc<UdpSocket>>,
    /// The namespace's inode, which names the sockets to a successor.
    netns: u64,
    stop: CancellationToken,
    /// This proxy's entry among the agent's local pods.
    local: (Arc<super::LocalPods>, u64),
    /// The agent's HBONE pool, whose connections to this pod end with it.
    pool: Arc<crate::transport::Pool>,
}

impl PodProxy {
    /// Binds the pod's listeners in `netns` and starts serving.
    pub fn start(ctx: &ProxyContext, workload: Arc<Workload>, netns: Arc<Netns>) -> Result<Self, Error> {
        let stop = ctx.shutdown.child_token();
        let first_v4 = workload.ips.iter().find(|ip| ip.is_ipv4());
        let first_v6 = workload.ips.iter().find(|ip| ip.is_ipv6());
        let inherited = &ctx.inherited;
        let outbound: Vec<Arc<TcpListener>> = first_v4
            .into_iter()
            .chain(first_v6)
            .map(|ip| inherited.listen_in(&netns, SocketAddr::new(*ip, ports::OUTBOUND)).map(Arc::new))
            .collect::<Result<_, _>>()?;
        let inbound = Arc::new(inherited.listen_dual_stack_in(&netns, ports::INBOUND_PLAINTEXT)?);
        let hbone = Arc::new(inherited.listen_dual_stack_in(&netns, ports::INBOUND_HBONE)?);
        let dns: Vec<Arc<UdpSocket>> = first_v4
            .into_iter()
            .chain(first_v6)
            .map(|ip| inherited.bind_udp_in(&netns, SocketAddr::new(*ip, ports::DNS)).map(Arc::new))
            .collect::<Result<_, _>>()?;

        let server_tls =
            crate::identity::server_config(ctx.dialer.certs.clone(), workload.identity.clone(), &ctx.dialer.verifier)?;
        for listener in &outbound {
            let pod = (workload.clone(), netns.clone());
            tokio::spawn(serve_plain(ctx.clone(), pod, listener.clone(), Plain::Outbound, stop.clone()));
        }
        let pod = (workload.clone(), netns.clone());
        tokio::spawn(serve_plain(ctx.clone(), pod, inbound.clone(), Plain::Inbound, stop.clone()));
        let pod = (workload.clone(), netns.clone());
        tokio::spawn(hbone::serve(ctx.clone(), pod, hbone.clone(), server_tls, stop.clone()));
        for socket in &dns {
            tokio::spawn(dns::serve(ctx.dns_context(workload.clone()), socket.clone(), stop.clone()));
        }
        let local = (ctx.local_pods.clone(), ctx.local_pods.insert(workload.key(), netns.clone()));
        tracing::info!(pod = %workload.name, namespace = %workload.namespace, identity = %workload.identity, "pod proxy started");
        let listeners = outbound.into_iter().chain([inbound.clone(), hbone]).collect();
        let pool = ctx.dialer.pool.clone();
        Ok(Self { inbound_fd: inbound.as_raw_fd(), listeners, dns, netns: netns.inode(), workload, stop, local, pool })
    }

    /// Lets go of the pod's listening and DNS sockets (the accept loops hold theirs
    /// until they stop): once every holder has, they close.
    pub fn close_listeners(&mut self) {
        self.listeners.clear();
        self.dns.clear();
    }

    /// A copy of each of the pod's sockets, named for a successor agent.
    pub fn sockets(&self) -> Vec<(SocketKey, OwnedFd)> {
        let tcp = self.listeners.iter().map(|l| SocketKey::copy_of(&**l, self.netns));
        let udp = self.dns.iter().map(|s| SocketKey::copy_of(&**s, self.netns));
        tcp.chain(udp)
            .filter_map(|copy| {
                copy.map_err(|e| tracing::warn!(pod = %self.workload.name, error = %e, "socket not copied")).ok()
            })
            .collect()
    }

    /// Stops accepting; connections in flight finish on their own, and new ones to the
    /// pod's addresses open new tunnels.
    pub fn stop(&self) {
        self.stop.cancel();
        self.local.0.remove(&self.workload.key(), self.local.1);
        self.pool.forget_addresses(&self.workload.ips);
    }
}

impl AsRawFd for PodProxy {
    /// The plaintext inbound listener, which the kernel's sk_lookup steers to.
    fn as_raw_fd(&self) -> RawFd {
        self.inbound_fd
    }
}

impl Drop for PodProxy {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The pod's plaintext listeners (the HBONE one terminates TLS first: [`hbone::serve`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Plain {
    /// `:15001`, the pod's own connections redirected by connect4/6.
    Outbound,
    /// `:15006`, connections to the pod's ports steered by sk_lookup.
    Inbound,
}

/// Accepts on one of the pod's plaintext listeners until `stop`, each connection in its
/// own task; a connection that fails is logged with the listener it came in on.
pub(super) async fn serve_plain(
    ctx: ProxyContext,
    (pod, netns): (Arc<Workload>, Arc<Netns>),
    listener: impl Borrow<TcpListener>,
    which: Plain,
    stop: CancellationToken,
) {
    let (what, orig_from) = match which {
        Plain::Outbound => ("outbound", OrigFrom::Kernel),
        Plain::Inbound => ("inbound", OrigFrom::LocalAddr),
    };
    // Shared by the connections' tasks: each holds a pointer, not a copy.
    let ctx = Arc::new(ctx);
    accept_loop(listener.borrow(), &ctx, stop, what, orig_from, |stream, peer, orig| {
        let (ctx, pod, netns) = (ctx.clone(), pod.clone(), netns.clone());
        match which {
            Plain::Outbound => Either::Left(outbound_connection(ctx, pod, netns, stream, peer, orig)),
            // Boxed whole: inbound plaintext is the rarer kind, and each task is sized
            // for the larger of the two.
            Plain::Inbound => Either::Right(Box::pin(async move {
                let served = inbound::handle(&ctx, &pod, &netns, stream, peer, orig).await;
                log_served("inbound", &pod, peer, served);
            })),
        }
    })
    .await;
}

/// One outbound connection's task: decided boxed (its steps, handshakes included, are
/// freed once done), then spliced. A combinator rather than an `async` block, which
/// would keep the decision's result and the task's arguments beside the splice: the
/// task holds the splice alone for as long as the connection lives.
fn outbound_connection(
    ctx: Arc<ProxyContext>,
    pod: Arc<Workload>,
    netns: Arc<Netns>,
    stream: TcpStream,
    peer: SocketAddr,
    orig: SocketAddr,
) -> impl Future<Output = ()> + Send {
    let deciding = Box::pin(async move {
        let decided = outbound::handle(&ctx, &pod, &netns, stream, peer, orig).await;
        (decided, ctx, pod)
    });
    deciding.then(move |(decided, ctx, pod)| match decided {
        Ok(Some(Decided::Upstream(connected))) => Either::Left(Either::Left((*connected).splice(ctx, pod, peer))),
        Ok(Some(Decided::SameNode(delivery))) => Either::Left(Either::Right(
            delivery.splice(ctx).map(move |served| log_served("outbound", &pod, peer, served)),
        )),
        Ok(None) => Either::Right(std::future::ready(())),
        Err(e) => {
            log_served("outbound", &pod, peer, Err(e));
            Either::Right(std::future::ready(()))
        }
    })
}

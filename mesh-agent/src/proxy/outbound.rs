//! Outbound: connections an enrolled pod makes, redirected by connect4/6 to its
//! `<pod ip>:15001` listener. The original destination comes from the kernel map.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use super::inpod::accept_loop;
use super::{CONNECT_TIMEOUT, Error, ProxyContext, copy, sockets};
use crate::dataplane::Netns;
use crate::state::{Destination, Workload};
use crate::telemetry::{ConnLabels, Direction};

pub(super) async fn serve(
    ctx: ProxyContext,
    pod: Arc<Workload>,
    netns: Arc<Netns>,
    listener: TcpListener,
    stop: CancellationToken,
) {
    let c = ctx.clone();
    accept_loop(&listener, &c, stop, "outbound", |stream, peer| {
        let (ctx, pod, netns) = (ctx.clone(), pod.clone(), netns.clone());
        async move {
            if let Err(e) = handle(&ctx, &pod, &netns, stream, peer).await {
                tracing::warn!(pod = %pod.name, %peer, error = %e, "outbound connection failed");
            }
        }
    })
    .await;
}

async fn handle(
    ctx: &ProxyContext,
    pod: &Workload,
    netns: &Netns,
    mut stream: TcpStream,
    peer: SocketAddr,
) -> Result<(), Error> {
    // Only the pod itself reaches this listener through capture; anything else dialing
    // <pod ip>:15001 directly is refused.
    if !pod.ips.contains(&peer.ip()) {
        tracing::warn!(pod = %pod.name, %peer, "outbound listener reached by a foreign address; refused");
        sockets::reset(stream);
        return Ok(());
    }
    let Some(orig) = ctx.dataplane.orig_dst(peer) else {
        tracing::warn!(pod = %pod.name, %peer, "no original destination recorded; refused");
        sockets::reset(stream);
        return Ok(());
    };
    let snapshot = ctx.snapshot.load_full();
    let dest = snapshot.resolve(orig);
    tracing::debug!(pod = %pod.name, %peer, %orig, ?dest, "outbound");
    match dest {
        Destination::Mesh { workload, addr, service } => {
            let labels = ConnLabels::new(Direction::Outbound, pod, Some(&workload), service.as_deref(), true);
            let mut tunnel = ctx.pool.connect(ctx, pod, netns, &workload, addr).await?;
            splice(ctx, &labels, &mut stream, &mut tunnel, pod, orig).await
        }
        Destination::Passthrough { addr, workload } => {
            let labels = ConnLabels::new(Direction::Outbound, pod, workload.as_deref(), None, false);
            let mut upstream = sockets::connect_in(netns, addr, ctx.bypass_mark, CONNECT_TIMEOUT).await?;
            splice(ctx, &labels, &mut stream, &mut upstream, pod, orig).await
        }
        Destination::NoEndpoints { service } => {
            tracing::warn!(pod = %pod.name, %orig, %service, "service has no endpoint for this port; refused");
            sockets::reset(stream);
            Ok(())
        }
    }
}

async fn splice<S>(
    ctx: &ProxyContext,
    labels: &ConnLabels,
    client: &mut TcpStream,
    server: &mut S,
    pod: &Workload,
    orig: SocketAddr,
) -> Result<(), Error>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let (request, response) = copy::counted(&ctx.metrics, labels, client, server)
        .await
        .map_err(|source| Error::Io { what: "copy to", addr: orig, source })?;
    tracing::debug!(pod = %pod.name, %orig, request, response, "outbound closed");
    Ok(())
}

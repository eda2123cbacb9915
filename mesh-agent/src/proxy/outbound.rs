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
            let guard = ctx.metrics.opened(&labels);
            let r = copy::bidirectional(&mut stream, &mut tunnel).await;
            finish(ctx, &labels, guard, r, pod, orig)
        }
        Destination::Passthrough { addr, workload } => {
            let labels = ConnLabels::new(Direction::Outbound, pod, workload.as_deref(), None, false);
            let mut upstream = sockets::connect_in(netns, addr, ctx.bypass_mark, CONNECT_TIMEOUT).await?;
            let guard = ctx.metrics.opened(&labels);
            let r = copy::bidirectional(&mut stream, &mut upstream).await;
            finish(ctx, &labels, guard, r, pod, orig)
        }
        Destination::NoEndpoints { service } => {
            tracing::warn!(pod = %pod.name, %orig, %service, "service has no endpoint for this port; refused");
            sockets::reset(stream);
            Ok(())
        }
    }
}

fn finish(
    ctx: &ProxyContext,
    labels: &ConnLabels,
    guard: crate::telemetry::OpenConn,
    r: std::io::Result<(u64, u64)>,
    pod: &Workload,
    orig: SocketAddr,
) -> Result<(), Error> {
    match r {
        Ok((sent, received)) => {
            ctx.metrics.closed(labels, guard, sent, received);
            tracing::debug!(pod = %pod.name, %orig, sent, received, "outbound closed");
            Ok(())
        }
        Err(source) => {
            ctx.metrics.closed(labels, guard, 0, 0);
            Err(Error::Io { what: "copy to", addr: orig, source })
        }
    }
}

//! Outbound: connections an enrolled pod makes, redirected by connect4/6 to its
//! `<pod ip>:15001` listener. The original destination comes from the kernel map.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

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
    pod: &Arc<Workload>,
    netns: &Arc<Netns>,
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
    if let Some(service) = snapshot.service_by_vip(orig.ip())
        && snapshot.has_traffic_rules(&service.key())
        && !is_declared_opaque(service, orig.port())
        && sniff_http(&stream).await
    {
        tracing::debug!(pod = %pod.name, %peer, %orig, service = %service.key(), "outbound HTTP, routed at L7");
        crate::l7::server::serve(ctx.clone(), pod.clone(), netns.clone(), stream, orig, service.clone()).await;
        return Ok(());
    }
    // A VirtualService's tcp rules decide first; otherwise the Service's endpoints.
    let (dest, _endpoint_guard) = match tcp_route(ctx, &snapshot, pod, orig) {
        Some(Ok(routed)) => routed,
        Some(Err(reason)) => {
            tracing::warn!(pod = %pod.name, %orig, %reason, "tcp route has no endpoint; refused");
            sockets::reset(stream);
            return Ok(());
        }
        None => (snapshot.resolve(orig), None),
    };
    tracing::debug!(pod = %pod.name, %peer, %orig, ?dest, "outbound");
    match dest {
        Destination::Mesh { workload, addr, service } if !snapshot.tunnels_to(&workload, addr.port()) => {
            let labels = ConnLabels::new(Direction::Outbound, pod, Some(&workload), service.as_deref(), false);
            let mut upstream = sockets::connect_in(netns, addr, ctx.bypass_mark, CONNECT_TIMEOUT).await?;
            splice(ctx, &labels, &mut stream, &mut upstream, pod, orig).await
        }
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

/// The destination a VirtualService `tcp` rule picks for a connection to `orig`, with
/// the endpoint's load-balancing slot (held while the connection lives); None when no
/// tcp rule applies.
fn tcp_route(
    ctx: &ProxyContext,
    snapshot: &crate::state::Snapshot,
    pod: &Workload,
    orig: SocketAddr,
) -> Option<Result<(Destination, Option<crate::l7::balance::EndpointGuard>), String>> {
    let service = snapshot.service_by_vip(orig.ip())?;
    let rule = snapshot.routes(&service.key())?.first_tcp_match(orig.port(), pod)?;
    let Some(chosen) = crate::l7::server::pick_weighted(&rule.backends) else {
        return Some(Err("the rule has no destination".into()));
    };
    let b = &chosen.backend;
    let target = crate::l7::Target::resolve(&ctx.l7, snapshot, pod, b, orig.port());
    let key = pod.ips.first().map(|ip| ip.to_string().into_bytes());
    let Some((workload, addr, guard)) = target.pick(&target.policy.lb, key.as_deref(), orig) else {
        return Some(Err(format!(
            "no endpoint for {} subset {:?} port {}",
            b.service,
            b.subset,
            b.port.unwrap_or(orig.port())
        )));
    };
    Some(Ok((crate::state::destination_for(workload, addr, Some(b.service.clone())), Some(guard))))
}

/// How long the first bytes may take before a connection is treated as opaque TCP:
/// server-first protocols (databases, SMTP) send nothing until the server speaks, so
/// detection must give up quickly rather than stall them.
pub(super) const DETECT_TIMEOUT: Duration = Duration::from_millis(300);

/// Ports named `tcp`/`tls`/`mongo`/`mysql`/`redis` (or `tcp-*` ...) are L4 by
/// declaration, as Istio's protocol selection reads port names.
fn is_declared_opaque(service: &crate::state::Service, port: u16) -> bool {
    const OPAQUE: &[&str] = &["tcp", "tls", "mongo", "mysql", "redis"];
    service.ports.iter().find(|p| p.port == port).and_then(|p| p.name.as_deref()).is_some_and(|n| {
        let proto = n.split('-').next().unwrap_or(n);
        OPAQUE.contains(&proto)
    })
}

/// Peeks at the client's first bytes: HTTP or not, within [`DETECT_TIMEOUT`].
async fn sniff_http(stream: &TcpStream) -> bool {
    let mut buf = [0u8; 16];
    let deadline = tokio::time::Instant::now() + DETECT_TIMEOUT;
    loop {
        let n = match tokio::time::timeout_at(deadline, stream.peek(&mut buf)).await {
            Ok(Ok(n)) => n,
            _ => return false,
        };
        if n == 0 {
            return false;
        }
        if let Some(http) = crate::l7::detect_http(&buf[..n]) {
            return http;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
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
    let (request, response) = copy::counted(&ctx.metrics, labels, client, server, ctx.tcp_idle_timeout)
        .await
        .map_err(|source| Error::Io { what: "copy to", addr: orig, source })?;
    tracing::debug!(pod = %pod.name, %orig, request, response, "outbound closed");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn pair() -> (TcpStream, TcpStream) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (server, _) = l.accept().await.unwrap();
        (client, server)
    }

    #[tokio::test]
    async fn http_is_detected_and_left_unread() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let (mut client, mut accepted) = pair().await;
        client.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        assert!(sniff_http(&accepted).await);
        let mut first = [0u8; 3];
        accepted.read_exact(&mut first).await.unwrap();
        assert_eq!(&first, b"GET", "peeked bytes are still there for the HTTP server");
    }

    #[tokio::test]
    async fn a_silent_client_is_not_stalled_past_the_detection_timeout() {
        // A server-first protocol: the client waits for the server's greeting.
        let (_client, accepted) = pair().await;
        let started = std::time::Instant::now();
        assert!(!sniff_http(&accepted).await);
        assert!(started.elapsed() < DETECT_TIMEOUT + Duration::from_millis(200));
    }

    #[tokio::test]
    async fn tls_and_binary_protocols_are_not_http() {
        use tokio::io::AsyncWriteExt as _;
        let (mut client, accepted) = pair().await;
        client.write_all(&[0x16, 0x03, 0x01, 0x00, 0xa5, 0x01]).await.unwrap();
        let started = std::time::Instant::now();
        assert!(!sniff_http(&accepted).await);
        assert!(started.elapsed() < Duration::from_millis(100), "decided on the first byte");
    }
}

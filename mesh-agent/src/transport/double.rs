//! Double HBONE: a pod on another network, reached through that network's east-west
//! gateway. The outer tunnel goes to the gateway (mutual TLS as the source pod, to the
//! gateway's identity; pooled like any tunnel), its CONNECT naming the pod's address;
//! the gateway splices the stream to the pod's HBONE port. Inside it the source opens a
//! tunnel of its own to the pod (mutual TLS to the pod's identity, HTTP/2, one CONNECT)
//! that the gateway cannot read, so the server's agent sees and judges the source's
//! identity, as Istio ambient's ztunnel does across networks.

use std::net::SocketAddr;

use mesh_common::ports;

use super::pool::{self, Tunnel};
use super::{Dialer, Error};
use crate::dataplane::Netns;
use crate::snapshot::NetworkGateway;
use crate::state::Workload;

/// A tunnelled connection from `source` to `target` (a port of `dest`, on the network
/// `gateway` leads into).
pub(super) async fn connect(
    dialer: &Dialer,
    source: &Workload,
    netns: &Netns,
    gateway: &NetworkGateway,
    dest: &Workload,
    target: SocketAddr,
) -> Result<Tunnel, Error> {
    let outer = dialer.pool.connect_through(dialer, source, netns, (&gateway.identity, gateway.addr), target).await?;
    let hbone = SocketAddr::new(target.ip(), ports::INBOUND_HBONE);
    let (sender, conn, _) = pool::handshake(dialer, &source.identity, &dest.identity, hbone, outer).await?;
    let via = gateway.addr;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(%hbone, %via, error = %e, "HBONE connection through the east-west gateway closed");
        }
    });
    // The connection ends with its one stream, once this sender is gone too.
    let stream = pool::request_stream(sender, hbone, target).await?;
    Ok(Tunnel::on_own_connection(stream, target))
}

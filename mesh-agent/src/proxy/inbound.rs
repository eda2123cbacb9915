//! Inbound plaintext: connections to a pod's ports that sk_lookup steered to the
//! agent's `:15006` listener in the pod's netns. The original destination is the
//! accepted socket's local address.

use std::net::SocketAddr;
use std::sync::Arc;

use mesh_common::ports;
use tokio::net::TcpStream;

use super::ProxyContext;
use super::admission::{self, Arrival};
use crate::authz::{ConnVerdict, Decision};
use crate::dataplane::Netns;
use crate::state::Workload;
use crate::telemetry::ConnLabels;
use crate::transport::{CONNECT_TIMEOUT, Error, sockets};

/// One plaintext connection to a pod's port, `dst`.
pub(super) async fn handle(
    ctx: &Arc<ProxyContext>,
    pod: &Arc<Workload>,
    netns: &Arc<Netns>,
    stream: TcpStream,
    peer: SocketAddr,
    dst: SocketAddr,
) -> Result<(), Error> {
    // A connection made straight to :15006 (not steered) has no application port. Any
    // other destination is an address of this pod: the listener is in the pod's own
    // netns, and only the pod's own sk_lookup instance steers to it.
    if ports::is_agent_in_pod(dst.port()) {
        sockets::reset(stream);
        return Ok(());
    }
    // The agent's own delivery, steered back to it (the accepted socket inherits the
    // delivery's mark): only kernel programs of an older agent, still attached while
    // this one takes over, do that. Refused, or it would be delivered again, forever.
    if netns.transparent().is_some() && sockets::mark(&stream) == Some(crate::dataplane::transparent::DELIVERY_MARK) {
        tracing::warn!(pod = %pod.name, %peer, %dst, "a delivery came back to the agent; refused");
        sockets::reset(stream);
        return Ok(());
    }
    let snapshot = ctx.snapshot.load_full();
    let security = snapshot.security(&pod.key()).clone();
    // The kernel drops plaintext to STRICT ports before it gets here; this holds the
    // line should a verdict not be in the kernel yet.
    if !security.mtls.mode(dst.port()).accepts_plaintext() {
        admission::denied_plaintext(ctx, pod, peer, dst, &security.mtls.from);
        sockets::reset(stream);
        return Ok(());
    }
    let arrival = Arrival { src: peer, dst, peer: None };
    let verdict = security.authz.check_connection(&arrival.attrs());
    if let ConnVerdict::Decided(Decision::Deny(reason)) = &verdict {
        admission::denied(ctx, pod, &arrival.attrs(), reason, None);
        sockets::reset(stream);
        return Ok(());
    }
    let source = snapshot.workload_by_ip(peer.ip()).cloned();
    let labels = ctx.metrics.shared(ConnLabels::inbound(&snapshot, pod, dst.port(), source.as_deref(), false));
    let app = sockets::deliver_in(netns, dst, peer.ip(), ctx.dialer.bypass_mark, CONNECT_TIMEOUT).await?;
    tracing::debug!(pod = %pod.name, %peer, %dst, "inbound plaintext");
    // Not held while the connection lives: each request loads the snapshot in force.
    drop(snapshot);
    admission::serve(ctx.clone(), pod.clone(), netns.clone(), security, arrival, verdict, stream, app, labels).await;
    Ok(())
}

//! Connections an enrolled pod makes to addresses that are neither a Service nor a pod.
//! A ServiceEntry decides where they go, found by the address dialed or by the name
//! the connection carries (HTTP Host, TLS SNI); under `outboundTrafficPolicy`
//! REGISTRY_ONLY nothing else is reached, and each refusal is logged and counted.

use std::net::SocketAddr;

use tokio::net::TcpStream;

use super::detect;
use crate::snapshot::Snapshot;
use crate::state::{OutboundPolicy, Workload};
use crate::traffic::external::{ExternalService, ExternalTarget};

/// What becomes of a connection to an address the registry does not hold.
#[derive(Debug)]
pub(super) enum Egress<'s> {
    /// A ServiceEntry's destination, and the name the connection asked for, when it
    /// was read.
    Entry(&'s ExternalService, ExternalTarget, Option<String>),
    /// Nothing in the registry, and ALLOW_ANY: the address the pod dialed.
    Anywhere,
    /// Nothing in the registry, and REGISTRY_ONLY: refused.
    Blocked,
}

/// Decides for a connection `pod` made to `orig`, which is no Service VIP and no pod.
/// The connection's first bytes are peeked at (never consumed) only when a name could
/// matter: entries without addresses serve the port, or REGISTRY_ONLY is in force.
pub(super) async fn decide<'s>(
    snapshot: &'s Snapshot,
    pod: &Workload,
    stream: &TcpStream,
    orig: SocketAddr,
) -> Egress<'s> {
    let registry = &snapshot.external;
    if let Some(entry) = registry.by_address(orig, &pod.namespace) {
        return Egress::Entry(entry, entry.target(orig, None), None);
    }
    let registry_only = snapshot.outbound == OutboundPolicy::RegistryOnly;
    if !registry_only && !registry.has_named_port(orig.port(), &pod.namespace) {
        return Egress::Anywhere;
    }
    if let Some(host) = detect::peek_name(stream).await
        && let Some(entry) = registry.by_host(&host, orig.port(), &pod.namespace)
    {
        let target = entry.target(orig, Some(&host));
        return Egress::Entry(entry, target, Some(host));
    }
    if registry_only { Egress::Blocked } else { Egress::Anywhere }
}

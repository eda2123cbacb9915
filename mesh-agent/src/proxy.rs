//! The per-pod proxies: outbound capture, inbound plaintext, and the HBONE tunnel
//! (HTTP/2 CONNECT over mutual TLS 1.3) between node agents.

mod accept;
pub(crate) mod admission;
pub mod detect;
pub mod direct;
pub mod dns;
mod egress;
pub(crate) mod hbone;
mod inbound;
mod inpod;
mod local;
mod outbound;
mod prefixed;
#[cfg(test)]
pub(crate) mod tests;

pub use admission::InboundConns;
pub use admission::watched::Watched as WatchedHttp1;
pub use inpod::PodProxy;
pub use local::LocalPods;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::dataplane::Dataplane;
use crate::snapshot::SharedSnapshot;
use crate::telemetry::Metrics;
use crate::transport::Dialer;
use crate::transport::limits::ConnLimits;

pub use crate::transport::Error;

/// The one thing the proxy asks of the kernel programs: where a captured outbound
/// connection from `client` was going. The agent's [`Dataplane`] answers from the BPF
/// map connect4/6 fill; in-process tests answer from a table of their own, so the
/// proxy paths run on loopback without root.
pub trait OrigDst: Send + Sync + std::fmt::Debug {
    /// The original destination of `client`'s connection, if the kernel recorded one.
    fn orig_dst(&self, client: SocketAddr) -> Option<SocketAddr>;
}

impl OrigDst for Dataplane {
    fn orig_dst(&self, client: SocketAddr) -> Option<SocketAddr> {
        Dataplane::orig_dst(self, client)
    }
}

/// What every proxy task shares.
#[derive(Debug, Clone)]
pub struct ProxyContext {
    /// The current configuration.
    pub snapshot: SharedSnapshot,
    /// Where captured outbound connections were going (the kernel's table).
    pub orig_dst: Arc<dyn OrigDst>,
    /// Reaches destinations (tunnel or plaintext), with the pods' certificates.
    pub dialer: Dialer,
    /// L7 counters and upstream connections.
    pub l7: Arc<crate::l7::Runtime>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Cancelled on shutdown: listeners stop accepting.
    pub shutdown: CancellationToken,
    /// Tracks every connection task, for draining.
    pub tasks: TaskTracker,
    /// Spliced inbound connections, re-judged when the policies change.
    pub inbound: Arc<InboundConns>,
    /// Connections per source pod and for the node.
    pub limits: Arc<ConnLimits>,
    /// A spliced connection idle this long is closed.
    pub tcp_idle_timeout: Duration,
    /// The only directory whose files DestinationRules may name for TLS origination.
    pub egress_tls_dir: Arc<std::path::Path>,
    /// Where the pods' DNS proxies forward what the mesh does not answer.
    pub dns_upstream: Arc<dns::Upstream>,
    /// Whether allowed inbound HTTP is served per request, for request metrics
    /// reported by the destination (`--l7-telemetry`).
    pub l7_telemetry: bool,
    /// Splices admitted TCP connections in the kernel; None: the agent copies them
    /// (no verdict program, `--kernel-splice off`, in-process tests).
    pub kernel_splice: Option<Arc<crate::dataplane::splice::KernelSplice>>,
    /// The pods this agent serves now, for connections between two of them.
    pub local_pods: Arc<LocalPods>,
    /// The kernel's tables of the direct path between this node's pods; None where
    /// there is no kernel side (in-process tests).
    pub direct: Option<Arc<crate::dataplane::direct::DirectPath>>,
    /// Whether admitted pairs of this node's pods may connect directly
    /// (`--same-node-direct`); when off, the tables are emptied.
    pub same_node_direct: bool,
    /// Sockets the agent before this one handed over, taken in place of binding anew.
    pub inherited: Arc<crate::transport::inherited::Inherited>,
}

impl ProxyContext {
    /// What bounds every listener of the pods' proxies.
    pub fn caps(&self) -> crate::transport::accept::Caps<'_> {
        crate::transport::accept::Caps { limits: &self.limits, metrics: &self.metrics, tasks: &self.tasks }
    }

    /// What the DNS proxy of `workload` takes of this context.
    pub fn dns_context(&self, workload: Arc<crate::state::Workload>) -> dns::DnsContext {
        dns::DnsContext {
            workload,
            snapshot: self.snapshot.clone(),
            upstream: self.dns_upstream.clone(),
            metrics: self.metrics.clone(),
        }
    }

    /// Whether the requests of `pod`'s connections are wanted, as the source's agent
    /// (`source`) or the destination's sees them: L7 telemetry is on, and a Telemetry
    /// leaves some request metric, the access log or tracing on for the workload.
    pub fn wants_requests(
        &self,
        snapshot: &crate::snapshot::Snapshot,
        pod: &crate::state::Workload,
        source: bool,
    ) -> bool {
        if !self.l7_telemetry {
            return false;
        }
        let policy = snapshot.telemetry(&pod.key());
        let request_metrics = (0..4).any(|metric| policy.metric_on(metric, source));
        let logged = self.metrics.access_log().is_some_and(|l| l.may_log(policy, source));
        request_metrics || logged || self.metrics.tracer().is_some()
    }

    /// What the L7 proxy gets of it.
    pub fn l7_context(&self) -> crate::l7::Context {
        crate::l7::Context {
            snapshot: self.snapshot.clone(),
            dialer: self.dialer.clone(),
            runtime: self.l7.clone(),
            metrics: self.metrics.clone(),
            shutdown: self.shutdown.clone(),
            egress_tls_dir: self.egress_tls_dir.clone(),
            secrets: None,
        }
    }
}

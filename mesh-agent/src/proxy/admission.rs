//! What happens to a connection once it has reached a workload's agent (over HBONE or
//! in plaintext): the authorization verdict at accept, then either a splice to the
//! application, or, when the policies read HTTP attributes, a judgement per request
//! (HTTP) or of the whole connection as TCP (anything else).

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use super::outbound::DETECT_TIMEOUT;
use super::prefixed::{Prefixed, read_first};
use super::{ProxyContext, copy, inbound_http};
use crate::authz::{ConnAttrs, ConnVerdict, Decision, Peer, WorkloadSecurity};
use crate::dataplane::Netns;
use crate::state::Workload;
use crate::telemetry::{ConnLabels, DenyReason};

/// A connection as the workload's policies see it.
#[derive(Debug, Clone)]
pub(super) struct Arrival {
    /// The peer's address.
    pub src: SocketAddr,
    /// The workload address and port.
    pub dst: SocketAddr,
    /// The authenticated peer (HBONE), None for plaintext.
    pub peer: Option<Peer>,
}

impl Arrival {
    pub fn attrs(&self) -> ConnAttrs<'_> {
        ConnAttrs { src: self.src, dst: self.dst, peer: self.peer.as_ref() }
    }
}

fn who(attrs: &ConnAttrs<'_>) -> String {
    attrs.peer.and_then(|p| p.principals.first()).map_or_else(|| "plaintext".to_string(), |p| format!("spiffe://{p}"))
}

/// Logs and counts a refusal by an authorization policy.
pub(super) fn denied(
    ctx: &ProxyContext,
    pod: &Workload,
    attrs: &ConnAttrs<'_>,
    reason: &str,
    request: Option<(&str, &str)>,
) {
    let (method, path) = request.unzip();
    tracing::info!(
        pod = %pod.name, src = %attrs.src, source = %who(attrs), dst = %attrs.dst, method, path, %reason,
        "denied by authorization policy"
    );
    ctx.metrics.denied(pod, if request.is_some() { DenyReason::HttpPolicy } else { DenyReason::Policy });
}

/// Logs and counts plaintext refused because the port is STRICT.
pub(super) fn denied_plaintext(
    ctx: &ProxyContext,
    pod: &Workload,
    src: SocketAddr,
    dst: SocketAddr,
    policies: &[String],
) {
    tracing::info!(
        pod = %pod.name, %src, %dst, decided_by = %policies.join(", "),
        "plaintext refused: mTLS is STRICT for this port"
    );
    ctx.metrics.denied(pod, DenyReason::MtlsStrict);
}

/// Serves a connection whose accept-time verdict was not a denial.
#[allow(clippy::too_many_arguments)]
pub(super) async fn serve<S>(
    ctx: ProxyContext,
    pod: Arc<Workload>,
    netns: Arc<Netns>,
    security: Arc<WorkloadSecurity>,
    arrival: Arrival,
    verdict: ConnVerdict,
    mut client: S,
    mut app: TcpStream,
    labels: ConnLabels,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let dst = arrival.dst;
    let result = match verdict {
        ConnVerdict::Decided(Decision::Deny(_)) => return,
        ConnVerdict::Decided(Decision::Allow) => copy::counted(&ctx.metrics, &labels, &mut client, &mut app).await,
        ConnVerdict::PerRequest => {
            let first = match read_first(&mut client, DETECT_TIMEOUT).await {
                Ok(first) => first,
                Err(e) => {
                    tracing::debug!(%dst, error = %e, "connection ended before its first bytes");
                    return;
                }
            };
            let mut client = Prefixed::new(first, client);
            if crate::l7::looks_like_http(client.prefix()) {
                let open = ctx.metrics.opened(&labels);
                let metrics = ctx.metrics.clone();
                inbound_http::serve(ctx, pod, netns, security, arrival, client, app).await;
                metrics.closed(&labels, open, 0, 0);
                return;
            }
            // Not HTTP: judged once, with the HTTP attributes unreadable.
            let attrs = arrival.attrs();
            match security.authz.check(&attrs, None) {
                Decision::Allow => copy::counted(&ctx.metrics, &labels, &mut client, &mut app).await,
                Decision::Deny(reason) => {
                    denied(&ctx, &pod, &attrs, &reason, None);
                    return;
                }
            }
        }
    };
    if let Err(e) = result {
        tracing::debug!(%dst, error = %e, "inbound connection ended with an error");
    }
}

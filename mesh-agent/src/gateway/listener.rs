//! One gateway port: accept under the caps, terminate TLS for the server the SNI names
//! (or serve plaintext HTTP), then hand the requests to the L7 engine with the
//! Gateways' routes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::LazyConfigAcceptor;
use tokio_util::sync::CancellationToken;
use x509_parser::extensions::GeneralName;

use super::{GatewayContext, PortPlan};
use crate::l7::server::RouteTable;
use crate::transport::sockets;

/// A client has this long to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The metrics' name for gateway listeners.
const LISTENER: &str = "gateway";

/// Accepts on `listener` until `stop`; each connection reads the plan current when it
/// arrives.
pub(super) async fn serve(
    ctx: GatewayContext,
    listener: TcpListener,
    plan: Arc<ArcSwap<PortPlan>>,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let peer = sockets::canonical(peer);
                    let permit = match ctx.limits.admit(peer.ip()) {
                        Ok(p) => p,
                        Err(hit) => {
                            ctx.l7.metrics.refused(LISTENER, hit.as_str());
                            if ctx.limits.should_log(peer.ip()) {
                                tracing::warn!(%peer, limit = hit.as_str(), "gateway connection refused at the cap");
                            }
                            sockets::reset(stream);
                            continue;
                        }
                    };
                    let _ = stream.set_nodelay(true);
                    let (ctx, plan) = (ctx.clone(), plan.load_full());
                    ctx.tasks.clone().spawn(async move {
                        handle(ctx, stream, peer, plan).await;
                        drop(permit);
                    });
                }
                Err(e) => {
                    ctx.l7.metrics.refused(LISTENER, "accept_error");
                    tracing::warn!(error = %e, "gateway accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}

async fn handle(ctx: GatewayContext, stream: TcpStream, peer: SocketAddr, plan: Arc<PortPlan>) {
    let Ok(local) = stream.local_addr() else { return };
    let (workload, netns) = (plan.workload.clone(), ctx.netns.clone());
    if !plan.terminates_tls() {
        let table = RouteTable::Gateway { gateways: plan.gateways(), port: plan.port, tls: false };
        crate::l7::server::serve(ctx.l7, workload, netns, stream, local, table).await;
        return;
    }
    let acceptor = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), stream);
    let start = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor).await {
        Ok(Ok(start)) => start,
        Ok(Err(e)) => return tracing::debug!(%peer, error = %e, "not a TLS client hello"),
        Err(_) => return tracing::debug!(%peer, "no TLS client hello in time"),
    };
    let sni = start.client_hello().server_name().map(str::to_owned);
    let Some(server) = plan.server_for_sni(sni.as_deref()) else {
        return tracing::debug!(%peer, ?sni, port = plan.port, "no server for this SNI; closed");
    };
    let Some(terminated) = &server.tls else { return };
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, start.into_stream(terminated.config.clone())).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => return tracing::debug!(%peer, ?sni, error = %e, "TLS handshake failed"),
        Err(_) => return tracing::debug!(%peer, ?sni, "TLS handshake timed out"),
    };
    if !terminated.client_names.is_empty() {
        let presented = tls.get_ref().1.peer_certificates().and_then(|c| c.first()).map(|c| names_in(c.as_ref()));
        if !presented.unwrap_or_default().iter().any(|n| terminated.client_names.contains(n)) {
            return tracing::info!(%peer, ?sni, "client certificate names none of the server's subjectAltNames; closed");
        }
    }
    let table = RouteTable::Gateway { gateways: Arc::new([server.gateway.clone()]), port: plan.port, tls: true };
    crate::l7::server::serve(ctx.l7, workload, netns, tls, local, table).await;
}

/// The DNS and URI names of a certificate.
fn names_in(der: &[u8]) -> Vec<String> {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else { return Vec::new() };
    let Ok(Some(san)) = cert.subject_alternative_name() else { return Vec::new() };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::DNSName(d) => Some(d.to_string()),
            GeneralName::URI(u) => Some(u.to_string()),
            _ => None,
        })
        .collect()
}

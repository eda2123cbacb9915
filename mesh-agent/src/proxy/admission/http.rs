//! Inbound HTTP under authorization: the destination's agent parses the requests
//! arriving for a workload whose policies read HTTP attributes, judges each one, and
//! forwards the allowed ones to the application over a connection of its own.
//!
//! What the application receives is what the policy judged: the normalized path,
//! re-serialized headers (no request smuggling through framing the app would read
//! differently), and no `h2c` upgrade (which would turn the rest of the connection
//! into HTTP/2 requests no policy sees).

use std::convert::Infallible;
use std::sync::Arc;

use http::{Request, Response, StatusCode};
use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::Mutex;

use super::Arrival;
use crate::authz::head::{self, BadHead};
use crate::authz::{Decision, RBAC_DENIED, RequestAttrs};
use crate::dataplane::Netns;
use crate::l7::server::{LogLine, Measured, Prefixed, RequestTally, RespBody};
use crate::proxy::ProxyContext;
use crate::state::Workload;
use crate::telemetry::trace;
use crate::telemetry::{ConnLabels, SeriesMemo, SharedPeers};
use crate::transport::{CONNECT_TIMEOUT, copy, sockets};

/// Connections to the application, opened as requests need them.
struct AppConns {
    /// The connection dialed when the tunnel was accepted, used first.
    fresh: Option<TcpStream>,
    h1: Option<http1::SendRequest<Prefixed>>,
    h2: Option<http2::SendRequest<Prefixed>>,
}

/// Everything one request needs, shared by the connection's requests.
struct Conn {
    ctx: ProxyContext,
    pod: Arc<Workload>,
    netns: Arc<Netns>,
    arrival: Arrival,
    /// Who, between whom, as the connection's metrics name them (verified identity
    /// first, the address only for plaintext).
    peers: SharedPeers,
    /// The request series its last answer went to.
    series: Arc<SeriesMemo>,
    app: Mutex<AppConns>,
}

/// Serves HTTP from `client` (bytes already read for detection included), judging
/// each request against the policies in force when it arrives; `app` is a connection
/// to the application's port.
pub(super) async fn serve<S>(
    ctx: ProxyContext,
    pod: Arc<Workload>,
    netns: Arc<Netns>,
    arrival: Arrival,
    labels: &ConnLabels,
    client: S,
    app: TcpStream,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let peers = SharedPeers::new(labels.peers.clone());
    let app = Mutex::new(AppConns { fresh: Some(app), h1: None, h2: None });
    let conn = Arc::new(Conn { ctx, pod, netns, arrival, peers, series: Arc::default(), app });
    let dst = conn.arrival.dst;
    let hbone = conn.arrival.peer.is_some();
    let shutdown = conn.ctx.shutdown.clone();
    let svc = hyper::service::service_fn(move |req: http::Request<_>| {
        let conn = conn.clone();
        async move {
            let version = req.version();
            let mut resp = handle(&conn, req).await;
            crate::transport::close_when_draining(version, &conn.ctx.shutdown, &mut resp);
            Ok::<_, Infallible>(resp)
        }
    });
    let builder = crate::transport::limits::http_server();
    // hyper lets go of the stream once it wrote its last response; an HBONE stream
    // (an authenticated peer) then waits for the client's end rather than resetting
    // (`transport::linger`). A plaintext TCP client's socket closes as it did.
    let client = crate::transport::linger::Lingering::new(client, hbone);
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(client), svc);
    if let Err(e) = crate::transport::until_drained_gently(conn, &shutdown, |c| c.graceful_shutdown()).await {
        tracing::debug!(%dst, error = %e, "inbound HTTP connection ended");
    }
}

/// Why the agent answered a request itself, carried out of the handler on the
/// response for the metrics and the access log.
#[derive(Debug, Clone)]
struct LocalReply {
    flags: &'static str,
    details: String,
}

fn local(status: StatusCode, body: &'static str) -> Response<RespBody> {
    local_because(status, body, "-", "direct_response".into())
}

fn local_because(status: StatusCode, body: &'static str, flags: &'static str, details: String) -> Response<RespBody> {
    let mut r = crate::l7::server::text_response(status, body);
    r.extensions_mut().insert(LocalReply { flags, details });
    r
}

async fn handle(conn: &Conn, req: Request<Incoming>) -> Response<RespBody> {
    let started = std::time::Instant::now();
    let mut req = req;
    let policy = conn.ctx.snapshot.load().telemetry(&conn.pod.key()).clone();
    let (span, logged) = crate::l7::server::observe(&conn.ctx.metrics, &policy, &mut req, trace::Kind::Server);
    let method = req.method().as_str().to_string();
    let tally = Arc::new(RequestTally::of(req.headers()));
    let counted = tally.clone();
    let mut response = judge_and_forward(conn, req.map(|body| Prefixed::counted(body, counted))).await;
    tracing::trace!(pod = %conn.pod.name, %method, status = %response.status(), "inbound request");
    let reply = response.extensions_mut().remove::<LocalReply>();
    let flags = reply.as_ref().map_or("-", |r| r.flags);
    let dst = conn.arrival.dst;
    let log = logged.map(|(start, request, tags)| {
        Box::new(LogLine {
            start,
            request,
            tags,
            upstream_host: reply.is_none().then_some(dst),
            upstream_cluster: format!("inbound|{}||", dst.port()),
            details: reply.map_or_else(|| "via_upstream".into(), |r| r.details),
            client: conn.arrival.src,
            dialed: dst,
        })
    });
    // The request body went to the application counted as it passed.
    let request_bytes = Some(tally);
    let measured = Measured {
        metrics: conn.ctx.metrics.clone(),
        policy,
        series: conn.series.clone(),
        started,
        request_bytes,
        log,
        span,
    };
    measured.answer(conn.peers.clone(), flags, response)
}

async fn judge_and_forward(conn: &Conn, mut req: Request<Prefixed>) -> Response<RespBody> {
    let judged = match head::judge(req.method(), req.uri(), req.headers()) {
        Ok(j) => j,
        Err(e @ BadHead::Path(_)) => {
            tracing::info!(pod = %conn.pod.name, src = %conn.arrival.src, error = %e, "inbound request refused: bad path");
            return local(StatusCode::BAD_REQUEST, "invalid request path");
        }
        Err(BadHead::LowerCaseMethod) => return local(StatusCode::BAD_REQUEST, "method must be upper case"),
        Err(BadHead::Target) => return local(StatusCode::BAD_REQUEST, "invalid request target"),
    };
    strip_h2c_upgrade(req.headers_mut());
    let attrs = conn.arrival.attrs();
    let request = RequestAttrs {
        method: req.method().as_str(),
        path: &judged.path,
        host_lowercase: &judged.host_lowercase,
        headers: req.headers(),
    };
    // The policies in force now, not those the connection was accepted under.
    let snapshot = conn.ctx.snapshot.load();
    let security = snapshot.security(&conn.pod.key());
    if let Decision::Deny(reason) = security.authz.check(&attrs, Some(&request)) {
        super::denied(&conn.ctx, &conn.pod, &attrs, &reason, Some((req.method().as_str(), &judged.path)));
        let details = crate::authz::denial_details(&reason);
        return local_because(StatusCode::FORBIDDEN, RBAC_DENIED, "-", details);
    }
    // Forward what was judged: the normalized path with the original query.
    *req.uri_mut() = judged.target;
    forward(conn, req).await
}

/// Removes an `Upgrade: h2c` offer: the request is served as plain HTTP/1.1.
fn strip_h2c_upgrade(headers: &mut http::HeaderMap) {
    let offers_h2c = headers
        .get_all(http::header::UPGRADE)
        .iter()
        .any(|v| v.to_str().is_ok_and(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case("h2c"))));
    if offers_h2c {
        headers.remove(http::header::UPGRADE);
        headers.remove("http2-settings");
        headers.remove(http::header::CONNECTION);
    }
}

async fn app_stream(conn: &Conn, apps: &mut AppConns) -> Result<TcpStream, crate::transport::Error> {
    match apps.fresh.take() {
        Some(s) => Ok(s),
        None => {
            let (dst, client) = (conn.arrival.dst, conn.arrival.src.ip());
            sockets::deliver_in(&conn.netns, dst, client, conn.ctx.dialer.bypass_mark, CONNECT_TIMEOUT).await
        }
    }
}

async fn forward(conn: &Conn, mut req: Request<Prefixed>) -> Response<RespBody> {
    let dst = conn.arrival.dst;
    let unavailable = |what: &str, e: &dyn std::fmt::Display| {
        tracing::warn!(pod = %conn.pod.name, %dst, error = %e, "{what}");
        let details = "upstream_reset_before_response_started{connection_failure}".into();
        local_because(StatusCode::SERVICE_UNAVAILABLE, "upstream connect error", "UF", details)
    };
    let result = if req.version() == http::Version::HTTP_2 {
        let mut sender = {
            let mut apps = conn.app.lock().await;
            match apps.h2.as_ref().filter(|s| !s.is_closed()).cloned() {
                Some(s) => s,
                None => {
                    let io = match app_stream(conn, &mut apps).await {
                        Ok(io) => io,
                        Err(e) => return unavailable("application unreachable", &e),
                    };
                    let (sender, c) = match http2::handshake(TokioExecutor::new(), TokioIo::new(io)).await {
                        Ok(pair) => pair,
                        Err(e) => return unavailable("HTTP/2 to the application failed", &e),
                    };
                    tokio::spawn(async move {
                        let _ = c.await;
                    });
                    apps.h2 = Some(sender.clone());
                    sender
                }
            }
        };
        sender.send_request(req).await
    } else {
        let client_upgrade = crate::l7::server::is_upgrade(&req).then(|| hyper::upgrade::on(&mut req));
        let mut sender = {
            let mut apps = conn.app.lock().await;
            match apps.h1.take().filter(|s| !s.is_closed()) {
                Some(s) => s,
                None => {
                    let io = match app_stream(conn, &mut apps).await {
                        Ok(io) => io,
                        Err(e) => return unavailable("application unreachable", &e),
                    };
                    let (sender, c) = match http1::handshake(TokioIo::new(io)).await {
                        Ok(pair) => pair,
                        Err(e) => return unavailable("HTTP/1.1 to the application failed", &e),
                    };
                    tokio::spawn(async move {
                        let _ = c.with_upgrades().await;
                    });
                    sender
                }
            }
        };
        if let Err(e) = sender.ready().await {
            return unavailable("application connection closed", &e);
        }
        let sent = sender.send_request(req).await;
        // One request at a time per HTTP/1.1 connection: the next waits in ready().
        if !sender.is_closed() {
            conn.app.lock().await.h1 = Some(sender);
        }
        match (sent, client_upgrade) {
            (Ok(mut res), Some(client_upgrade)) if res.status() == StatusCode::SWITCHING_PROTOCOLS => {
                let server_upgrade = hyper::upgrade::on(&mut res);
                tokio::spawn(async move {
                    if let Ok((c, s)) = tokio::try_join!(client_upgrade, server_upgrade) {
                        let (mut c, mut s) = (TokioIo::new(c), TokioIo::new(s));
                        let _ = copy::bidirectional(&mut c, &mut s).await;
                    }
                });
                Ok(res)
            }
            (sent, _) => sent,
        }
    };
    match result {
        Ok(res) => res.map(|b| b.map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>).boxed_unsync()),
        Err(e) => unavailable("request to the application failed", &e),
    }
}

//! The HTTP side of an outbound connection: requests the pod sends to a Service with
//! traffic rules are parsed (HTTP/1.1 or HTTP/2), routed by the VirtualService, and
//! forwarded to an endpoint chosen under the DestinationRule, with timeouts, retries,
//! faults, header operations and mirroring.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full, combinators::UnsyncBoxBody};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use rand::Rng as _;

use super::balance::{Outcome, Overflow};
use super::upstream::{ConnSettings, SendError, UpBody};
use crate::dataplane::Netns;
use crate::l7::grpc_messages::GrpcMessages;
use crate::snapshot::Snapshot;
use crate::state::{Service, TagValue, TelemetryPolicy, Workload};
use crate::telemetry::{PeerLabels, RequestLabels, RequestSeries, SeriesMemo, ServiceLabels, SharedPeers};
use crate::telemetry::{access_log, trace};
use crate::traffic::route::{Abort, Action, Backend, CorsVerdict, RedirectPort, RequestView, Rule, WeightedBackend};

/// Request bodies up to this size are buffered, so retries and mirrors can replay them;
/// a larger body streams through once, without retries or mirror copy (as Envoy does
/// past its retry buffer).
const RETRY_BUFFER: usize = 1 << 20;
/// First retry back-off; doubles per retry up to [`MAX_BACKOFF`], with jitter (Envoy's
/// defaults).
const BASE_BACKOFF: Duration = Duration::from_millis(25);
const MAX_BACKOFF: Duration = Duration::from_millis(250);

type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Response body of every answer the agent gives.
pub type RespBody = UnsyncBoxBody<Bytes, BoxError>;

/// Which rules route the requests of a connection.
#[derive(Debug, Clone)]
pub enum RouteTable {
    /// A pod's connection to a Service (`namespace/name`): its VirtualService, or the
    /// default rule when only a DestinationRule applies.
    Service(Arc<str>),
    /// A pod's connection to a ServiceEntry's host: a mesh VirtualService's `http:`
    /// routes for it (such as to an egress gateway), or, without any, the entry's
    /// destination (a port declared HTTP, read for its request metrics).
    Entry {
        /// The entry, `namespace/name`.
        key: Arc<str>,
        /// Its first host, what metrics call the destination.
        host: Arc<str>,
    },
    /// A gateway server: the VirtualServices bound to the Gateways (`namespace/name`)
    /// served on `port`, chosen by the request's host (the first Gateway serving it).
    Gateway {
        /// The Gateways, in the order they are asked.
        gateways: Arc<[Arc<str>]>,
        /// The server port.
        port: u16,
        /// Whether the gateway terminated TLS (the request's scheme is https).
        tls: bool,
        /// The client outside the mesh, as the gateway's socket sees it.
        client: SocketAddr,
        /// The client as a mesh peer, when an ISTIO_MUTUAL server verified its
        /// identity (principals built once per connection).
        peer: Option<crate::authz::Peer>,
        /// When the client certificate the server verified expires: no request is
        /// served under it past then.
        client_not_after: Option<std::time::SystemTime>,
    },
}

impl RouteTable {
    /// The table of a pod's connections to `service`.
    pub fn service(service: &Service) -> Self {
        RouteTable::Service(service.key().into())
    }
}

/// Serves one client connection whose bytes are HTTP, from `client`, dialed to
/// `orig`, routed by `table`.
pub async fn serve<S>(
    ctx: super::Context,
    pod: Arc<Workload>,
    netns: Arc<Netns>,
    stream: S,
    (client, orig): (SocketAddr, SocketAddr),
    table: RouteTable,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let shutdown = ctx.shutdown.clone();
    let _open = ctx.metrics.serving_http();
    let last = Arc::new(LastAnswer::default());
    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
        let (ctx, pod, netns, table, last) = (ctx.clone(), pod.clone(), netns.clone(), table.clone(), last.clone());
        async move {
            let version = req.version();
            let mut resp = handle(&ctx, &pod, &netns, &table, &last, (client, orig), req).await;
            crate::transport::close_when_draining(version, &ctx.shutdown, &mut resp);
            Ok::<_, Infallible>(resp)
        }
    });
    let builder = crate::transport::limits::http_server();
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), svc);
    if let Err(e) = crate::transport::until_drained_gently(conn, &shutdown, |c| c.graceful_shutdown()).await {
        tracing::debug!(%orig, error = %e, "HTTP client connection ended");
    }
}

/// What one client connection's last answer was labelled with: a connection's
/// requests mostly go to the same endpoint of the same Service with the same outcome,
/// and their labels made again would cost allocations, a hash of every label and, in
/// each of the six series lookups, a comparison of every label.
#[derive(Default)]
struct LastAnswer {
    peers: std::sync::Mutex<Option<(PeersOf, SharedPeers)>>,
    series: Arc<SeriesMemo>,
}

/// What a source-reported answer's peer labels are made of, besides the connection's
/// own pod and route table.
struct PeersOf {
    endpoint: Option<Arc<Workload>>,
    service: Option<String>,
    mtls: bool,
}

impl PeersOf {
    fn matches(&self, answer: &Answer) -> bool {
        let endpoint = answer.endpoint.as_ref();
        let same_endpoint = match (&self.endpoint, endpoint) {
            (Some(kept), Some(r)) => Arc::ptr_eq(kept, &r.workload),
            (None, None) => true,
            _ => false,
        };
        same_endpoint
            && self.service.as_deref() == answer.backend.as_ref().map(|b| b.service.as_str())
            && self.mtls == endpoint.is_some_and(|r| r.mtls)
    }
}

impl LastAnswer {
    /// The peer labels of `answer` to a request of `pod` routed by `table`: the last
    /// answer's when made of the same (the endpoint's workload is compared by identity,
    /// so a new snapshot's makes them again).
    fn peers(&self, pod: &Workload, table: &RouteTable, answer: &Answer) -> SharedPeers {
        let mut kept = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((of, peers)) = kept.as_ref()
            && of.matches(answer)
        {
            return peers.clone();
        }
        let endpoint = answer.endpoint.as_ref();
        let mtls = endpoint.is_some_and(|r| r.mtls);
        let peers = SharedPeers::new(PeerLabels::source(
            pod,
            endpoint.map(|r| &*r.workload),
            service_labels(table, answer.backend.as_ref()),
            mtls,
        ));
        let of = PeersOf {
            endpoint: endpoint.map(|r| r.workload.clone()),
            service: answer.backend.as_ref().map(|b| b.service.clone()),
            mtls,
        };
        *kept = Some((of, peers.clone()));
        peers
    }
}

/// Who calls, from where, to what: the same for every request of one connection (the
/// snapshot is the one the request started with).
struct Caller<'a> {
    ctx: &'a super::Context,
    snap: &'a Arc<Snapshot>,
    pod: &'a Arc<Workload>,
    netns: &'a Arc<Netns>,
    /// The address the pod dialed.
    orig: SocketAddr,
    /// Request body bytes read from the client so far.
    request_bytes: &'a Arc<RequestTally>,
}

/// The answer and what the metrics say of it.
struct Answer {
    response: Response<RespBody>,
    flags: &'static str,
    backend: Option<Backend>,
    endpoint: Option<Reached>,
}

/// The endpoint a request was sent to, and whether over mTLS.
#[derive(Clone)]
struct Reached {
    workload: Arc<Workload>,
    addr: SocketAddr,
    mtls: bool,
}

fn local(status: StatusCode, flags: &'static str, body: &'static str) -> Answer {
    Answer { response: text_response(status, body), flags, backend: None, endpoint: None }
}

/// An answer the agent makes itself: `status` with a plain-text `body`.
pub(crate) fn text_response(status: StatusCode, body: &'static str) -> Response<RespBody> {
    let mut r = Response::new(full(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut().insert(http::header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    r
}

fn full(b: Bytes) -> RespBody {
    Full::new(b).map_err(|never: Infallible| match never {}).boxed_unsync()
}

fn roll(percent: f64) -> bool {
    percent >= 100.0 || (percent > 0.0 && rand::rng().random_range(0.0..100.0) < percent)
}

async fn handle(
    ctx: &super::Context,
    pod: &Arc<Workload>,
    netns: &Arc<Netns>,
    table: &RouteTable,
    last: &LastAnswer,
    (client, orig): (SocketAddr, SocketAddr),
    req: Request<Incoming>,
) -> Response<RespBody> {
    let started = std::time::Instant::now();
    let snap = ctx.snapshot.load_full();
    let request_bytes = Arc::new(RequestTally::of(req.headers()));
    let caller = Caller { ctx, snap: &snap, pod, netns, orig, request_bytes: &request_bytes };
    let mut req = req;
    let refused = match table {
        RouteTable::Gateway { client_not_after: Some(t), .. } if std::time::SystemTime::now() >= *t => {
            Some(super::edge::Refusal {
                status: StatusCode::UNAUTHORIZED,
                flags: "UAEX",
                body: "the client certificate has expired\n",
            })
        }
        RouteTable::Gateway { client, tls, peer, .. } => {
            let at = super::edge::Arrival {
                snapshot: &snap,
                gateway: pod,
                client: *client,
                local: orig,
                tls: *tls,
                peer: peer.as_ref(),
            };
            super::edge::admit(&at, &ctx.metrics, &mut req).err()
        }
        RouteTable::Service(_) | RouteTable::Entry { .. } => None,
    };
    let policy = snap.telemetry(&pod.key()).clone();
    let (span, logged) = observe(&ctx.metrics, &policy, &mut req, trace::Kind::Client);
    let answer = match refused {
        Some(r) => Answer { response: text_response(r.status, r.body), flags: r.flags, backend: None, endpoint: None },
        None => route(&caller, table, req).await,
    };
    let peers = last.peers(pod, table, &answer);
    let log = logged.map(|(start, request, tags)| {
        let port = answer.backend.as_ref().and_then(|b| b.port).unwrap_or(orig.port());
        let subset = answer.backend.as_ref().and_then(|b| b.subset.as_deref()).unwrap_or("");
        Box::new(LogLine {
            start,
            request,
            tags,
            upstream_host: answer.endpoint.as_ref().map(|r| r.addr),
            upstream_cluster: format!("outbound|{port}|{subset}|{}", peers.service.destination_service),
            details: details(answer.flags, answer.endpoint.is_some()).into(),
            client,
            dialed: orig,
        })
    });
    let measured = Measured {
        metrics: ctx.metrics.clone(),
        policy,
        series: last.series.clone(),
        started,
        request_bytes: Some(request_bytes.clone()),
        log,
        span,
    };
    measured.answer(peers, answer.flags, answer.response)
}

/// Gives a request its `x-request-id` (when it has none, as Envoy does) and, when
/// requests are traced, this hop's span, whose context is injected into the request
/// going on. Returns the span, and what the access log line and the span will need of
/// the request when either is written.
#[allow(clippy::type_complexity)]
pub(crate) fn observe<B>(
    metrics: &crate::telemetry::Metrics,
    policy: &TelemetryPolicy,
    req: &mut Request<B>,
    kind: trace::Kind,
) -> (Option<trace::Begun>, Option<(std::time::SystemTime, access_log::Request, Vec<(String, String)>)>) {
    trace::ensure_request_id(req.headers_mut());
    let source = kind == trace::Kind::Client;
    let tracing = policy.tracing.as_ref();
    let span = metrics.tracer().map(|t| {
        let report = tracing.is_none_or(|p| p.report && p.sides.has(source));
        t.begin(trace::SpanContext::extract(req.headers()), kind, tracing.and_then(|p| p.sampling), report)
    });
    if let Some(s) = &span {
        s.inject(req.headers_mut());
    }
    let traced = span.is_some_and(|s| s.ctx.sampled && s.report);
    let logged = metrics.access_log().is_some_and(|l| l.may_log(policy, source));
    if !(traced || logged) {
        return (span, None);
    }
    // Custom tags read the request now, while it is here.
    let tags = match tracing {
        Some(p) if traced => p
            .tags
            .iter()
            .map(|(name, value)| {
                let v = match value {
                    TagValue::Literal(v) => v.clone(),
                    TagValue::Header { name, default } => req
                        .headers()
                        .get(name.as_str())
                        .and_then(|v| v.to_str().ok())
                        .map(|v| {
                            let mut end = v.len().min(crate::config::telemetry::MAX_TAG_VALUE);
                            while !v.is_char_boundary(end) {
                                end -= 1;
                            }
                            v[..end].to_string()
                        })
                        .or_else(|| default.clone())
                        .unwrap_or_default(),
                };
                (name.clone(), v)
            })
            .collect(),
        _ => Vec::new(),
    };
    (span, Some((std::time::SystemTime::now(), access_log::Request::of(req), tags)))
}

/// The span of a request that ended, with Istio's attributes: the request's, the
/// answer's, and both sides' workloads.
fn finished_span(
    tracer: &trace::Tracer,
    begun: trace::Begun,
    line: &LogLine,
    labels: &RequestLabels,
    (request_bytes, response_bytes): (Option<u64>, u64),
) -> trace::Finished {
    let peers = &labels.peers;
    let (src, dst) = (&peers.source.0, &peers.destination.0);
    let own = match begun.kind {
        trace::Kind::Client => src,
        trace::Kind::Server => dst,
    };
    let r = &line.request;
    let authority = r.authority.as_deref().unwrap_or("-");
    let code = labels.response_code;
    let attributes = vec![
        ("component", "proxy".to_string()),
        ("node_id", tracer.node.clone()),
        ("guid:x-request-id", r.request_id.clone().unwrap_or_default()),
        ("http.url", format!("http://{authority}{}", r.path)),
        ("http.method", r.method.clone()),
        ("http.protocol", r.protocol.to_string()),
        ("http.status_code", code.to_string()),
        ("user_agent", r.user_agent.clone().unwrap_or_else(|| "-".into())),
        ("downstream_cluster", "-".to_string()),
        ("peer.address", line.client.ip().to_string()),
        ("request_size", request_bytes.unwrap_or(0).to_string()),
        ("response_size", response_bytes.to_string()),
        ("response_flags", labels.response_flags.to_string()),
        ("upstream_cluster", line.upstream_cluster.clone()),
        ("upstream_cluster.name", line.upstream_cluster.clone()),
        ("istio.mesh_id", tracer.mesh_id.clone()),
        ("istio.reporter", peers.reporter.to_string()),
        ("istio.canonical_service", own.canonical_service.clone()),
        ("istio.canonical_revision", own.canonical_revision.clone()),
        ("istio.namespace", own.namespace.clone()),
        ("istio.source_workload", src.workload.clone()),
        ("istio.source_namespace", src.namespace.clone()),
        ("istio.source_principal", src.principal.clone()),
        ("istio.destination_workload", dst.workload.clone()),
        ("istio.destination_namespace", dst.namespace.clone()),
        ("istio.destination_principal", dst.principal.clone()),
        ("istio.destination_service", peers.service.destination_service.clone()),
        ("istio.destination_service_name", peers.service.destination_service_name.clone()),
    ];
    let mut attributes: Vec<(String, String)> = attributes.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
    attributes.extend(line.tags.iter().cloned());
    trace::Finished {
        begun,
        name: format!("{}:{}/*", peers.service.destination_service, line.dialed.port()),
        end: std::time::SystemTime::now(),
        attributes,
        error: code == 0 || code >= 500,
        workload: own.clone(),
    }
}

/// Envoy's `%RESPONSE_CODE_DETAILS%` for an answer with these response flags.
fn details(flags: &str, upstream_answered: bool) -> &'static str {
    match flags {
        "UF" => "upstream_reset_before_response_started{connection_failure}",
        "UC" => "upstream_reset_before_response_started{connection_termination}",
        "UT" => "response_timeout",
        "UH" => "no_healthy_upstream",
        "UO" => "upstream_reset_before_response_started{overflow}",
        "NR" => "route_not_found",
        "FI" => "fault_filter_abort",
        _ if upstream_answered => "via_upstream",
        _ => "direct_response",
    }
}

/// What a request's access log line needs besides its labels and measures.
pub(crate) struct LogLine {
    /// When the request arrived.
    pub start: std::time::SystemTime,
    /// The request's method, path, headers.
    pub request: access_log::Request,
    /// The endpoint it was sent to.
    pub upstream_host: Option<SocketAddr>,
    /// Envoy's cluster name.
    pub upstream_cluster: String,
    /// Envoy's response code details.
    pub details: String,
    /// The Telemetry API's custom tags for the span, read from the request.
    pub tags: Vec<(String, String)>,
    /// The client's address.
    pub client: SocketAddr,
    /// The address the client dialed.
    pub dialed: SocketAddr,
}

/// What measures one request: counted as its answer leaves (`istio_requests_total`),
/// timed and sized as its body ends (the request histograms).
pub(crate) struct Measured {
    /// Where it is counted.
    pub metrics: Arc<crate::telemetry::Metrics>,
    /// What the Telemetry API says for the reporting workload.
    pub policy: Arc<TelemetryPolicy>,
    /// The request series its connection's last answer went to.
    pub series: Arc<SeriesMemo>,
    /// When the request arrived.
    pub started: std::time::Instant,
    /// Request body bytes and gRPC messages read from the client, where the path
    /// counts them.
    pub request_bytes: Option<Arc<RequestTally>>,
    /// What the access log line and the span need (when either is written).
    pub log: Option<Box<LogLine>>,
    /// This hop's span, when requests are traced.
    pub span: Option<trace::Begun>,
}

impl Measured {
    /// Labels `response` (status, gRPC or HTTP, the gRPC status when the headers carry
    /// it) and counts it now, unless a gRPC status is still to come in trailers: then
    /// when they arrive, or the body ends or is dropped without them.
    pub(crate) fn answer(
        self,
        peers: SharedPeers,
        flags: &'static str,
        response: Response<RespBody>,
    ) -> Response<RespBody> {
        let is_grpc = is_grpc(response.headers());
        let labels = RequestLabels {
            peers,
            request_protocol: if is_grpc { "grpc" } else { "http" },
            response_code: response.status().as_u16(),
            response_flags: flags,
            grpc_response_status: grpc_status(response.headers()),
        };
        let counted = !is_grpc || labels.grpc_response_status.is_some();
        let series = counted.then(|| self.series.series(&self.metrics, &labels, &self.policy));
        if let Some(series) = &series {
            series.request();
        }
        response.map(|inner| {
            let messages = is_grpc.then(GrpcMessages::default);
            Completion { inner, labels: Some(labels), series, measured: self, bytes: 0, messages }.boxed_unsync()
        })
    }
}

/// The Service a request went to: the backend routed to (a Service `namespace/name`
/// or a ServiceEntry host), else what the table serves.
fn service_labels(table: &RouteTable, backend: Option<&Backend>) -> ServiceLabels {
    let entry_namespace = match table {
        RouteTable::Entry { key, .. } => key.split_once('/').map(|(ns, _)| ns),
        _ => None,
    };
    let name = match (backend, table) {
        (Some(b), _) => b.service.as_str(),
        (None, RouteTable::Service(key)) => key,
        (None, RouteTable::Entry { host, .. }) => host,
        (None, RouteTable::Gateway { .. }) => return ServiceLabels::unknown(),
    };
    if name.contains('/') {
        ServiceLabels::service(Some(name))
    } else {
        ServiceLabels::host(name, entry_namespace.unwrap_or("unknown"))
    }
}

/// A response body on its way to the client: counts its bytes, and when it ends (or
/// is dropped) records the request's duration and response size; a gRPC request not
/// counted yet is counted then, with the status from the trailers.
struct Completion {
    inner: RespBody,
    labels: Option<RequestLabels>,
    /// The series `istio_requests_total` already counted it in, if it did.
    series: Option<RequestSeries>,
    measured: Measured,
    /// The response body bytes that passed.
    bytes: u64,
    /// The response's gRPC messages, for a gRPC request.
    messages: Option<GrpcMessages>,
}

impl Completion {
    fn count(&mut self) {
        if let Some(labels) = self.labels.take() {
            let m = &mut self.measured;
            let series = match self.series.take() {
                Some(counted) if m.metrics.still_current(&counted) => counted,
                // Its series was dropped (a workload left) while the answer passed.
                Some(_) => m.series.series(&m.metrics, &labels, &m.policy),
                None => {
                    let series = m.series.series(&m.metrics, &labels, &m.policy);
                    series.request();
                    series
                }
            };
            let request_bytes = m.request_bytes.as_ref().map(|b| b.bytes.load(std::sync::atomic::Ordering::Relaxed));
            let duration = m.started.elapsed();
            series.done(duration, (request_bytes, self.bytes));
            if let Some(messages) = &self.messages {
                let sent = m.request_bytes.as_ref().map(|b| b.messages.load(std::sync::atomic::Ordering::Relaxed));
                m.metrics.grpc_messages(&labels, &m.policy, sent, messages.count);
            }
            let Some(line) = m.log.take() else { return };
            if let (Some(begun), Some(tracer)) = (m.span, m.metrics.tracer()) {
                tracer.finish(finished_span(tracer, begun, &line, &labels, (request_bytes, self.bytes)));
            }
            let code = labels.response_code;
            if let Some(log) =
                m.metrics.access_log().filter(|l| l.logs(&m.policy, labels.peers.reporter == "source", code))
            {
                let principal =
                    |side: &crate::state::WorkloadMeta| (side.principal != "unknown").then(|| side.principal.clone());
                log.record(access_log::Entry {
                    start: line.start,
                    reporter: labels.peers.reporter,
                    request: Some(line.request),
                    response_code: code,
                    response_flags: labels.response_flags.into(),
                    response_code_details: line.details,
                    bytes_received: request_bytes,
                    bytes_sent: self.bytes,
                    duration,
                    upstream_host: line.upstream_host,
                    upstream_cluster: line.upstream_cluster,
                    downstream_local: line.dialed,
                    downstream_remote: line.client,
                    source_principal: principal(&labels.peers.source.0),
                    destination_principal: principal(&labels.peers.destination.0),
                });
            }
        }
    }
}

impl http_body::Body for Completion {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            std::task::Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.bytes += data.len() as u64;
                    if let Some(m) = self.messages.as_mut() {
                        m.feed(data);
                    }
                }
                if let Some(code) = frame.trailers_ref().and_then(grpc_status) {
                    if self.series.is_none()
                        && let Some(l) = self.labels.as_mut()
                    {
                        l.grpc_response_status = Some(code);
                    }
                    self.count();
                }
            }
            std::task::Poll::Ready(_) => self.count(),
            std::task::Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    // The client sees the length the upstream declared (Content-Length, not chunks).
    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Completion {
    fn drop(&mut self) {
        self.count();
    }
}

/// Routes one request: the steps below, in Envoy's order (route match, CORS, faults,
/// direct answers and redirects, then the forwarded request with mirrors, upgrade or
/// timeout, then response headers).
async fn route(caller: &Caller<'_>, table: &RouteTable, mut req: Request<Incoming>) -> Answer {
    let Caller { snap, pod, orig, .. } = *caller;
    // A protocol upgrade (WebSocket): routed like any request, then the two upgraded
    // connections are spliced.
    let client_upgrade = is_upgrade(&req).then(|| hyper::upgrade::on(&mut req));
    let (parts, body) = req.into_parts();
    let authority = authority_of(&parts);
    let view = RequestView {
        method: parts.method.as_str(),
        path: parts.uri.path(),
        query: parts.uri.query(),
        authority: &authority,
        scheme: if matches!(table, RouteTable::Gateway { tls: true, .. }) { "https" } else { "http" },
        headers: &parts.headers,
        port: orig.port(),
        source: pod,
    };
    let default_rule;
    let routes = match table {
        RouteTable::Service(key) => snap.routes(key),
        RouteTable::Entry { key, .. } => snap.external_routes(key),
        RouteTable::Gateway { gateways, port, tls, .. } => {
            let host = authority.rsplit_once(':').filter(|(_, p)| p.bytes().all(|b| b.is_ascii_digit()));
            let host = host.map_or(authority.as_str(), |(h, _)| h);
            let mut ports = gateways.iter().filter_map(|g| snap.gateway(g)?.routes.get(port));
            if !tls && ports.clone().any(|p| p.redirects(host)) {
                return https_redirect(host, &parts);
            }
            match ports.find_map(|p| p.for_host(host)) {
                Some(r) => Some(r),
                None => return local(StatusCode::NOT_FOUND, "NR", "no route for this host\n"),
            }
        }
    };
    let rule: &Rule = match (routes, table) {
        (Some(routes), _) => match routes.first_match(&view) {
            Some(r) => r,
            None => return local(StatusCode::NOT_FOUND, "NR", "no route matched\n"),
        },
        // Without routes, everything goes where the pod was going.
        (None, RouteTable::Service(key) | RouteTable::Entry { host: key, .. }) => {
            default_rule = super::default_rule(key);
            &default_rule
        }
        (None, RouteTable::Gateway { .. }) => return local(StatusCode::NOT_FOUND, "NR", "no route\n"),
    };
    let cors = rule.cors.as_ref().map(|c| c.verdict(&parts.method, &parts.headers));
    if let Some(answer) = cors.as_ref().and_then(preflight_answer) {
        return answer;
    }
    let flags = match inject_faults(rule).await {
        Ok(flags) => flags,
        Err(aborted) => return aborted,
    };
    let backends = match &rule.action {
        Action::Direct { status, body } => return direct_answer(rule, *status, body),
        Action::Redirect { uri, authority: new_host, port, scheme, code } => {
            let to = Redirect { uri, host: new_host, port, scheme, code: *code };
            return redirect_answer(&to, &authority, &parts, orig.port());
        }
        Action::Route(backends) => backends,
    };
    let Some(chosen) = crate::traffic::route::pick_weighted(backends) else {
        return local(StatusCode::SERVICE_UNAVAILABLE, "NR", "route has no destination\n");
    };
    let body = match read_body(body, caller.ctx, caller.request_bytes).await {
        Ok(b) => b,
        Err(a) => return a,
    };
    let rewritten_path = rule.rewritten_path(&view);
    let fwd = forwarded_request(parts, rule, chosen, rewritten_path, &authority);
    if let ReqBody::Buffered(bytes, _) = &body {
        for (mirror, share) in &rule.mirrors {
            if roll(*share) {
                mirror_copy(caller, mirror, &fwd, bytes.clone());
            }
        }
    }
    if let Some(client_upgrade) = client_upgrade {
        return upgraded(caller, &chosen.backend, &fwd, body, client_upgrade).await;
    }
    let mut answer = forward_within_timeout(caller, rule, &chosen.backend, &fwd, body).await;
    chosen.response_headers.apply(answer.response.headers_mut());
    rule.response_headers.apply(answer.response.headers_mut());
    if let Some(CorsVerdict::Decorate(headers)) = cors {
        answer.response.headers_mut().extend(headers);
    }
    if answer.flags == "-" {
        answer.flags = flags;
    }
    answer
}

/// A gateway server's `httpsRedirect`: the same host and path over https (port 443).
fn https_redirect(host: &str, parts: &http::request::Parts) -> Answer {
    // The host comes from the client: only a plain name goes into Location.
    let plain_name = !host.is_empty() && host.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
    if !plain_name {
        return local(StatusCode::BAD_REQUEST, "-", "bad host\n");
    }
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let mut r = Response::new(full(Bytes::new()));
    *r.status_mut() = StatusCode::MOVED_PERMANENTLY;
    if let Ok(location) = HeaderValue::from_str(&format!("https://{host}{path}")) {
        r.headers_mut().insert(http::header::LOCATION, location);
    }
    Answer { response: r, flags: "-", backend: None, endpoint: None }
}

/// The request's authority: from the URI (HTTP/2, absolute form) or the Host header.
fn authority_of(parts: &http::request::Parts) -> String {
    parts
        .uri
        .authority()
        .map(|a| a.as_str().to_string())
        .or_else(|| parts.headers.get(http::header::HOST).and_then(|h| h.to_str().ok()).map(str::to_owned))
        .unwrap_or_default()
}

/// The answer to a CORS preflight, which never reaches the application.
fn preflight_answer(cors: &CorsVerdict) -> Option<Answer> {
    match cors {
        CorsVerdict::Preflight(headers) => {
            let mut r = Response::new(full(Bytes::new()));
            r.headers_mut().extend(headers.clone());
            Some(Answer { response: r, flags: "-", backend: None, endpoint: None })
        }
        CorsVerdict::RefusePreflight => {
            Some(Answer { response: Response::new(full(Bytes::new())), flags: "-", backend: None, endpoint: None })
        }
        _ => None,
    }
}

/// The rule's fault injection, as Envoy's fault filter does it: the delay first, then
/// the abort. Ok carries the response flag to report (`DI` when delayed); Err the
/// aborted answer.
async fn inject_faults(rule: &Rule) -> Result<&'static str, Answer> {
    let mut flags = "-";
    if let Some((delay, share)) = rule.fault.delay
        && roll(share)
    {
        tokio::time::sleep(delay).await;
        flags = "DI";
    }
    if let Some((abort, share)) = rule.fault.abort
        && roll(share)
    {
        return Err(match abort {
            Abort::Http(status) => local(
                StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
                "FI",
                "fault filter abort",
            ),
            Abort::Grpc(code) => {
                let mut a = local(StatusCode::OK, "FI", "");
                let h = a.response.headers_mut();
                h.insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
                h.insert("grpc-status", HeaderValue::from(code));
                h.insert("grpc-message", HeaderValue::from_static("fault filter abort"));
                a
            }
        });
    }
    Ok(flags)
}

/// `directResponse`: the rule answers itself.
fn direct_answer(rule: &Rule, status: u16, body: &Bytes) -> Answer {
    let mut r = Response::new(full(body.clone()));
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
    rule.response_headers.apply(r.headers_mut());
    Answer { response: r, flags: "-", backend: None, endpoint: None }
}

/// A rule's `redirect`, borrowed from it.
struct Redirect<'a> {
    uri: &'a Option<String>,
    host: &'a Option<String>,
    port: &'a RedirectPort,
    scheme: &'a Option<String>,
    code: u16,
}

/// The redirect's answer: the `Location` built from the request's authority and path
/// with the rule's replacements.
fn redirect_answer(to: &Redirect<'_>, authority: &str, parts: &http::request::Parts, dialed_port: u16) -> Answer {
    let (req_host, req_port) = match authority.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => (h, Some(p)),
        _ => (authority, None),
    };
    let name = to.host.clone().unwrap_or_else(|| req_host.to_string());
    let host = match to.port {
        RedirectPort::Fixed(p) => format!("{name}:{p}"),
        RedirectPort::Request => format!("{name}:{}", req_port.map_or_else(|| dialed_port.to_string(), str::to_owned)),
        RedirectPort::ProtocolDefault => name,
        RedirectPort::Keep => match (to.host, req_port) {
            (None, Some(p)) => format!("{name}:{p}"),
            _ => name,
        },
    };
    let path = to.uri.clone().unwrap_or_else(|| parts.uri.path_and_query().map_or("/".into(), |p| p.to_string()));
    let location = format!("{}://{host}{path}", to.scheme.as_deref().unwrap_or("http"));
    let mut r = Response::new(full(Bytes::new()));
    *r.status_mut() = StatusCode::from_u16(to.code).unwrap_or(StatusCode::MOVED_PERMANENTLY);
    if let Ok(v) = HeaderValue::from_str(&location) {
        r.headers_mut().insert(http::header::LOCATION, v);
    }
    Answer { response: r, flags: "-", backend: None, endpoint: None }
}

/// The request as forwarded: rewrites and header operations applied once, in origin
/// form with the authority in `Host`.
fn forwarded_request(
    parts: http::request::Parts,
    rule: &Rule,
    chosen: &WeightedBackend,
    rewritten_path: Option<String>,
    authority: &str,
) -> Request<()> {
    let mut fwd = Request::from_parts(parts, ());
    if let Some(path) = rewritten_path {
        let pq = match fwd.uri().query() {
            Some(q) => format!("{path}?{q}"),
            None => path,
        };
        if let Ok(uri) = pq.parse() {
            *fwd.uri_mut() = uri;
        }
    }
    if let Some(a) = &rule.rewrite_authority
        && let Ok(v) = HeaderValue::from_str(a)
    {
        fwd.headers_mut().insert(http::header::HOST, v);
    }
    rule.request_headers.apply(fwd.headers_mut());
    chosen.request_headers.apply(fwd.headers_mut());
    if fwd.headers().get(http::header::HOST).is_none()
        && let Ok(v) = HeaderValue::from_str(authority)
    {
        fwd.headers_mut().insert(http::header::HOST, v);
    }
    let origin_form = fwd.uri().path_and_query().map_or("/".into(), |p| p.to_string());
    if let Ok(uri) = origin_form.parse() {
        *fwd.uri_mut() = uri;
    }
    fwd
}

/// An upgrade request (WebSocket): one attempt, then the two upgraded connections are
/// spliced once the backend switched protocols.
async fn upgraded(
    caller: &Caller<'_>,
    backend: &Backend,
    fwd: &Request<()>,
    body: ReqBody,
    client_upgrade: hyper::upgrade::OnUpgrade,
) -> Answer {
    let mut answer = try_once(caller, backend, fwd, body.into_upstream(), None).await.into_answer(backend);
    if answer.response.status() == StatusCode::SWITCHING_PROTOCOLS {
        let server_upgrade = hyper::upgrade::on(&mut answer.response);
        tokio::spawn(async move {
            match tokio::try_join!(client_upgrade, server_upgrade) {
                Ok((client, server)) => {
                    let (mut client, mut server) = (TokioIo::new(client), TokioIo::new(server));
                    let _ = crate::transport::copy::bidirectional(&mut client, &mut server).await;
                }
                Err(e) => tracing::debug!(error = %e, "protocol upgrade not completed"),
            }
        });
    }
    answer
}

/// Forwards with the rule's retries, within the rule's `timeout` (all tries together).
async fn forward_within_timeout(
    caller: &Caller<'_>,
    rule: &Rule,
    backend: &Backend,
    fwd: &Request<()>,
    body: ReqBody,
) -> Answer {
    let forwarded = forward(caller, rule, backend, fwd, body);
    match rule.timeout {
        Some(t) => match tokio::time::timeout(t, forwarded).await {
            Ok(a) => a,
            Err(_) => {
                let mut a = local(StatusCode::GATEWAY_TIMEOUT, "UT", "upstream request timeout");
                a.backend = Some(backend.clone());
                a
            }
        },
        None => forwarded.await,
    }
}

/// A slot under the destination's `maxRetries`, or None when they are all taken.
fn retry_slot(caller: &Caller<'_>, backend: &Backend) -> Option<super::balance::RetrySlot> {
    let port = backend.port.unwrap_or(caller.orig.port());
    let policy = caller.snap.traffic_policy(&backend.service, backend.subset.as_deref(), port);
    let cluster = caller.ctx.runtime.clusters.get(&caller.pod.key(), &backend.service, backend.subset.as_deref());
    cluster.try_retry(policy.pool.max_retries)
}

/// `grpc-status` of a trailers-only gRPC answer (the status rides in the headers).
/// The gRPC status an answer carries. A code gRPC does not define (above 16) is
/// UNKNOWN (2), as gRPC's own clients read it: the metric label stays one of 17 values,
/// whatever an application sends.
fn grpc_status(headers: &http::HeaderMap) -> Option<u32> {
    grpc_code(headers.get("grpc-status")?.as_bytes())
}

/// A `grpc-status` value: codes beyond gRPC's own (0 to 16) are UNKNOWN (2).
pub(crate) fn grpc_code(value: &[u8]) -> Option<u32> {
    let code: u32 = std::str::from_utf8(value).ok()?.trim().parse().ok()?;
    Some(if code > 16 { 2 } else { code })
}

/// An HTTP/1.1 request asking to switch protocols (`Connection: upgrade` + `Upgrade`).
pub(crate) fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.headers().contains_key(http::header::UPGRADE)
        && req
            .headers()
            .get_all(http::header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("upgrade")))
}

fn cookie<'a>(req: &'a Request<()>, name: &str) -> Option<&'a str> {
    req.headers()
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim_matches('"'))
}

/// A generated affinity cookie names its endpoint (hex of `ip:port`), so it keeps
/// pointing there whatever else joins or leaves.
fn cookie_value(addr: SocketAddr) -> String {
    addr.to_string().bytes().map(|b| format!("{b:02x}")).collect()
}

fn cookie_endpoint(value: &str) -> Option<SocketAddr> {
    let bytes: Option<Vec<u8>> =
        (0..value.len()).step_by(2).map(|i| u8::from_str_radix(value.get(i..i + 2)?, 16).ok()).collect();
    String::from_utf8(bytes?).ok()?.parse().ok()
}

fn hash_key(lb: &crate::traffic::policy::LbPolicy, req: &Request<()>, pod: &Workload) -> Option<Vec<u8>> {
    use crate::traffic::policy::LbPolicy;
    match lb {
        LbPolicy::HashHeader(h) => req.headers().get(h).map(|v| v.as_bytes().to_vec()),
        LbPolicy::HashCookie(c) => cookie(req, &c.name).map(|v| v.as_bytes().to_vec()),
        LbPolicy::HashSourceIp => pod.ips.first().map(|ip| ip.to_string().into_bytes()),
        LbPolicy::HashQuery(q) => req
            .uri()
            .query()
            .unwrap_or("")
            .split('&')
            .filter_map(|p| p.split_once('='))
            .find(|(k, _)| k == q)
            .map(|(_, v)| v.as_bytes().to_vec()),
        _ => None,
    }
}

/// A request body as the agent holds it.
enum ReqBody {
    /// Read whole: can be sent again. The permit holds its bytes' share of the
    /// node's body budget until the request is done.
    Buffered(Bytes, Option<tokio::sync::OwnedSemaphorePermit>),
    /// Too large to keep (or no budget left): the part read so far, then the rest as
    /// it arrives.
    Streaming(UpBody),
}

impl ReqBody {
    fn into_upstream(self) -> UpBody {
        match self {
            ReqBody::Buffered(b, _) => buffered(b),
            ReqBody::Streaming(s) => s,
        }
    }
}

/// How long a request body may go without a byte while the agent buffers it.
const BODY_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

fn buffered(b: Bytes) -> UpBody {
    Full::new(b).map_err(|never: Infallible| match never {}).boxed()
}

/// Reads the body up to [`RETRY_BUFFER`], within the node's body budget; past either,
/// hands back a stream of what was read followed by the rest. A body that stops
/// arriving for [`BODY_IDLE_TIMEOUT`] while buffered ends the request (408).
///
/// The budget is charged for the buffer's capacity, before it grows: what the agent
/// holds for bodies is the budget, not some multiple of it.
async fn read_body(mut body: Incoming, ctx: &super::Context, counted: &Arc<RequestTally>) -> Result<ReqBody, Answer> {
    let mut buf = BodyBuffer::new(ctx.runtime.body_budget.clone());
    // A declared length is reserved whole, once.
    if let Some(len) = http_body::Body::size_hint(&body).exact()
        && let Ok(len) = usize::try_from(len)
        && len <= RETRY_BUFFER
        && !buf.grow_to(len)
    {
        ctx.metrics.refused("l7", "body_budget");
        return Ok(ReqBody::Streaming(Prefixed::body(Vec::new(), body, counted.clone())));
    }
    loop {
        let frame = match tokio::time::timeout(BODY_IDLE_TIMEOUT, body.frame()).await {
            Ok(f) => f,
            Err(_) => return Err(local(StatusCode::REQUEST_TIMEOUT, "-", "request body stalled\n")),
        };
        match frame {
            None => return Ok(buf.into_buffered(counted)),
            Some(Err(_)) => return Err(local(StatusCode::BAD_REQUEST, "-", "request body ended early\n")),
            Some(Ok(frame)) => {
                // Request trailers are rare; a buffered body ends at them.
                let Ok(data) = frame.into_data() else { return Ok(buf.into_buffered(counted)) };
                let needed = buf.bytes.len() + data.len();
                let fits = needed <= RETRY_BUFFER
                    && (needed <= buf.bytes.capacity()
                        || buf.grow_to(needed.max(buf.bytes.capacity() * 2).min(RETRY_BUFFER)));
                if !fits {
                    if needed <= RETRY_BUFFER {
                        ctx.metrics.refused("l7", "body_budget");
                    }
                    // Streaming: the bytes read so far go first; nothing is kept.
                    let read = buf.bytes.freeze();
                    return Ok(ReqBody::Streaming(Prefixed::body(vec![read, data], body, counted.clone())));
                }
                buf.bytes.extend_from_slice(&data);
            }
        }
    }
}

/// A body being buffered, with the budget share that pays for its capacity.
struct BodyBuffer {
    bytes: bytes::BytesMut,
    budget: Arc<tokio::sync::Semaphore>,
    held: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl BodyBuffer {
    fn new(budget: Arc<tokio::sync::Semaphore>) -> Self {
        BodyBuffer { bytes: bytes::BytesMut::new(), budget, held: None }
    }

    /// Makes room for `capacity` bytes, paid from the budget first; false (and no
    /// growth) when the budget cannot pay.
    fn grow_to(&mut self, capacity: usize) -> bool {
        let paid = self.held.as_ref().map_or(0, |p| p.num_permits());
        if capacity > paid {
            let Ok(extra) = u32::try_from(capacity - paid) else { return false };
            let Ok(permit) = self.budget.clone().try_acquire_many_owned(extra) else { return false };
            match &mut self.held {
                Some(h) => h.merge(permit),
                None => self.held = Some(permit),
            }
        }
        if capacity > self.bytes.capacity() {
            self.bytes.reserve(capacity - self.bytes.len());
        }
        true
    }

    /// The whole body, its size and gRPC messages stored in `counted`.
    fn into_buffered(self, counted: &RequestTally) -> ReqBody {
        counted.bytes.store(self.bytes.len() as u64, std::sync::atomic::Ordering::Relaxed);
        if counted.grpc {
            let mut messages = GrpcMessages::default();
            messages.feed(&self.bytes);
            counted.messages.store(messages.count, std::sync::atomic::Ordering::Relaxed);
        }
        ReqBody::Buffered(self.bytes.freeze(), self.held)
    }
}

/// Whether headers say gRPC (`content-type: application/grpc[+proto|...]`).
fn is_grpc(headers: &http::HeaderMap) -> bool {
    headers.get(http::header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// A request body's bytes and gRPC messages, counted as they pass to the upstream.
#[derive(Debug, Default)]
pub(crate) struct RequestTally {
    /// Bytes.
    pub bytes: std::sync::atomic::AtomicU64,
    /// gRPC messages begun (for gRPC requests only: other bodies are not parsed).
    pub messages: std::sync::atomic::AtomicU64,
    /// Whether the request is gRPC, so its body's messages are counted.
    grpc: bool,
}

impl RequestTally {
    /// The tally of the request with `headers`.
    pub(crate) fn of(headers: &http::HeaderMap) -> Self {
        Self { grpc: is_grpc(headers), ..Self::default() }
    }
}

/// The bytes already read, then the rest of the client's body, counted as they pass
/// (bytes and gRPC messages).
pub(crate) struct Prefixed {
    prefix: std::collections::VecDeque<Bytes>,
    rest: Incoming,
    counted: Arc<RequestTally>,
    messages: GrpcMessages,
}

impl Prefixed {
    /// The client's body as it comes, counted into `counted`.
    pub(crate) fn counted(rest: Incoming, counted: Arc<RequestTally>) -> Self {
        Prefixed { prefix: Default::default(), rest, counted, messages: GrpcMessages::default() }
    }

    fn body(prefix: Vec<Bytes>, rest: Incoming, counted: Arc<RequestTally>) -> UpBody {
        let prefix = prefix.into_iter().filter(|b| !b.is_empty()).collect();
        Prefixed { prefix, rest, counted, messages: GrpcMessages::default() }
            .map_err(|e| Box::new(e) as BoxError)
            .boxed()
    }
}

impl http_body::Body for Prefixed {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, hyper::Error>>> {
        let polled = match self.prefix.pop_front() {
            Some(p) => std::task::Poll::Ready(Some(Ok(http_body::Frame::data(p)))),
            None => std::pin::Pin::new(&mut self.rest).poll_frame(cx),
        };
        if let std::task::Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            self.counted.bytes.fetch_add(data.len() as u64, std::sync::atomic::Ordering::Relaxed);
            if self.counted.grpc {
                // Prefixed is Unpin: its fields can be borrowed apart.
                let this = &mut *self;
                this.messages.feed(data);
                this.counted.messages.store(this.messages.count, std::sync::atomic::Ordering::Relaxed);
            }
        }
        polled
    }
}

/// Tries, and retries as the rule allows, until an answer or the attempts run out. A
/// streamed body is sent once.
async fn forward(caller: &Caller<'_>, rule: &Rule, backend: &Backend, req: &Request<()>, body: ReqBody) -> Answer {
    let retries = &rule.retries;
    retries.on_request();
    // The budget share is held until the last attempt is done.
    let (bytes, _budget) = match body {
        ReqBody::Buffered(b, permit) => (b, permit),
        ReqBody::Streaming(s) => {
            return try_once(caller, backend, req, s, retries.per_try_timeout).await.into_answer(backend);
        }
    };
    let mut attempt = 0u32;
    let mut _retry_in_flight = None;
    loop {
        let outcome = try_once(caller, backend, req, buffered(bytes.clone()), retries.per_try_timeout).await;
        let retriable = match &outcome {
            TryOutcome::Answer(a) => match grpc_status(a.response.headers()) {
                Some(code) if code != 0 => retries.retries_grpc(code),
                _ => retries.retries_status(a.response.status().as_u16()),
            },
            TryOutcome::Failed { failure, .. } => retries.retries_failure(*failure),
            TryOutcome::Final(_) => false,
        };
        if !retriable || attempt >= retries.attempts {
            let mut a = outcome.into_answer(backend);
            if attempt > 0 && attempt >= retries.attempts && retriable && a.flags == "-" {
                a.flags = "URX";
            }
            return a;
        }
        // maxRetries: retries in flight to this destination at once (Envoy's retry
        // circuit breaker); with none left, the answer stands.
        let Some(retry_slot) = retry_slot(caller, backend) else {
            let mut a = outcome.into_answer(backend);
            if a.flags == "-" {
                a.flags = "URX";
            }
            return a;
        };
        attempt += 1;
        let backoff = (BASE_BACKOFF * 2u32.pow(attempt - 1)).min(MAX_BACKOFF);
        let jitter = rand::rng().random_range(0..=backoff.as_millis() as u64);
        tokio::time::sleep(Duration::from_millis(jitter)).await;
        tracing::debug!(service = %backend.service, attempt, "retrying");
        // Held through the retry it allowed, released when the next one takes over.
        _retry_in_flight = Some(retry_slot);
    }
}

enum TryOutcome {
    /// The endpoint answered.
    Answer(Answer),
    /// No answer: maybe retried.
    Failed { failure: crate::traffic::route::Failure, endpoint: Option<Reached>, detail: String },
    /// Answered locally, never retried (overflow, no endpoints).
    Final(Answer),
}

impl TryOutcome {
    fn into_answer(self, backend: &Backend) -> Answer {
        let mut a = match self {
            TryOutcome::Answer(a) | TryOutcome::Final(a) => a,
            TryOutcome::Failed { failure, endpoint, detail } => {
                tracing::debug!(service = %backend.service, ?failure, %detail, "request failed");
                let mut a = match failure {
                    crate::traffic::route::Failure::Timeout => {
                        local(StatusCode::GATEWAY_TIMEOUT, "UT", "upstream request timeout")
                    }
                    crate::traffic::route::Failure::Connect => local(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "UF",
                        "upstream connect error or disconnect/reset before headers. reset reason: connection failure",
                    ),
                    _ => local(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "UC",
                        "upstream connect error or disconnect/reset before headers. reset reason: connection termination",
                    ),
                };
                a.endpoint = endpoint;
                a
            }
        };
        a.backend = Some(backend.clone());
        a
    }
}

/// One attempt: admission under the circuit breaker, an endpoint, the request sent
/// within the per-try timeout, and the outcome recorded for outlier detection.
async fn try_once(
    caller: &Caller<'_>,
    backend: &Backend,
    req: &Request<()>,
    body: UpBody,
    per_try_timeout: Option<Duration>,
) -> TryOutcome {
    let Caller { ctx, snap, pod, netns, orig, .. } = *caller;
    let target = match super::Target::reach(&ctx.runtime, snap, pod, backend, orig).await {
        Ok(t) => t,
        Err(why) => {
            tracing::debug!(pod = %pod.name, service = %backend.service, %why, "no address for the destination");
            return TryOutcome::Final(local(StatusCode::SERVICE_UNAVAILABLE, "UH", "no healthy upstream"));
        }
    };
    let (policy, cluster) = (&target.policy, &target.cluster);
    if target.endpoints.is_empty() {
        return TryOutcome::Final(local(StatusCode::SERVICE_UNAVAILABLE, "UH", "no healthy upstream"));
    }
    let _admission = match admit(cluster, policy, backend).await {
        Ok(a) => a,
        Err(overflow) => return TryOutcome::Final(overflow),
    };
    let Some(Chosen { workload, addr, _guard, set_cookie }) = choose_endpoint(&target, req, pod, orig) else {
        return TryOutcome::Final(local(StatusCode::SERVICE_UNAVAILABLE, "UH", "no healthy upstream"));
    };
    if policy.istio_mutual && !workload.enrolled {
        // Istio would originate mTLS and fail against a plaintext pod; never send plaintext.
        return TryOutcome::Failed {
            failure: crate::traffic::route::Failure::Connect,
            endpoint: Some(Reached { workload: workload.clone(), addr, mtls: false }),
            detail: "DestinationRule tls ISTIO_MUTUAL, but the endpoint is outside the mesh".into(),
        };
    }
    // Only a request whose TLS the agent originates reads the gateway's Secrets.
    let secrets = policy.origination.as_ref().and(ctx.secrets.as_ref()).map(|s| s.load_full());
    let tls = policy.origination.as_ref().map(|settings| super::upstream::Originate {
        settings,
        host: &backend.service,
        credentials: crate::transport::originate::Credentials {
            allowed_dir: &ctx.egress_tls_dir,
            secrets: secrets.as_deref(),
        },
    });
    let from = super::upstream::From { dialer: &ctx.dialer, snapshot: snap, pod, netns, tls };
    let sent =
        ctx.runtime.upstreams.send(from, &workload, addr, upstream_request(req, body), conn_settings(policy, req));
    let result = match per_try_timeout {
        Some(t) => tokio::time::timeout(t, sent).await.map_err(|_| ()),
        None => Ok(sent.await),
    };
    let (n, outlier) = (target.endpoints.len(), policy.outlier.as_ref());
    let endpoint = Some(Reached { mtls: snap.tunnels_to(&workload, addr.port()), workload: workload.clone(), addr });
    // An answer or a local-origin failure (a reset, a connect failure, the per-try
    // timeout) counts alike towards ejection, and an ejection is logged whichever did it.
    let record = |outcome| {
        if cluster.record(addr, outcome, outlier, n) {
            tracing::info!(service = %backend.service, endpoint = %workload.name, %addr, ?outcome, "endpoint ejected (outlier detection)");
        }
    };
    match result {
        Ok(Ok(res)) => {
            record(Outcome::Status(res.status().as_u16()));
            let mut res = res.map(|b| b.map_err(|e| Box::new(e) as BoxError).boxed_unsync());
            if let Some((c, ttl)) = set_cookie
                && let Some(h) = affinity_cookie(&c, ttl, addr)
            {
                res.headers_mut().append(http::header::SET_COOKIE, h);
            }
            TryOutcome::Answer(Answer { response: res, flags: "-", backend: None, endpoint })
        }
        Ok(Err(e)) => {
            record(Outcome::LocalFailure);
            let failure = match &e {
                SendError::Connect { .. } => crate::traffic::route::Failure::Connect,
                SendError::Reset { .. } => crate::traffic::route::Failure::Reset,
            };
            TryOutcome::Failed { failure, endpoint, detail: e.to_string() }
        }
        Err(()) => {
            record(Outcome::LocalFailure);
            TryOutcome::Failed {
                failure: crate::traffic::route::Failure::Timeout,
                endpoint,
                detail: "per-try timeout".into(),
            }
        }
    }
}

/// A place under the DestinationRule's connection-pool limits, or the `UO` answer
/// when the circuit breaker is open.
async fn admit(
    cluster: &Arc<super::balance::Cluster>,
    policy: &crate::traffic::policy::TrafficPolicy,
    backend: &Backend,
) -> Result<super::balance::Admission, Answer> {
    cluster.admit(&policy.pool).await.map_err(|o| {
        tracing::debug!(service = %backend.service, overflow = ?o, "circuit breaker open");
        let reason = match o {
            Overflow::Requests => "upstream connect error: overflow (max requests)",
            Overflow::Pending => "upstream connect error: overflow (pending requests)",
        };
        local(StatusCode::SERVICE_UNAVAILABLE, "UO", reason)
    })
}

/// The endpoint an attempt goes to, held as loaded until dropped.
struct Chosen {
    workload: Arc<Workload>,
    addr: SocketAddr,
    _guard: super::balance::EndpointGuard,
    /// Cookie affinity with a ttl and no cookie yet: set one naming this endpoint.
    set_cookie: Option<(crate::traffic::policy::CookiePolicy, Duration)>,
}

/// Chooses the endpoint under the load-balancing policy. Cookie affinity: a cookie the
/// agent generated names its endpoint; a missing one is generated for the endpoint
/// chosen now when the rule has a ttl.
fn choose_endpoint(target: &super::Target, req: &Request<()>, pod: &Workload, dialed: SocketAddr) -> Option<Chosen> {
    let policy = &target.policy;
    let key = hash_key(&policy.lb, req, pod);
    let mut lb = policy.lb.clone();
    let mut pinned = dialed;
    let mut set_cookie = None;
    if let crate::traffic::policy::LbPolicy::HashCookie(c) = &policy.lb {
        match key.as_deref().and_then(|v| std::str::from_utf8(v).ok()) {
            Some(v) => {
                if let Some(a) = cookie_endpoint(v).filter(|a| target.endpoints.iter().any(|(_, e)| e == a)) {
                    (lb, pinned) = (crate::traffic::policy::LbPolicy::Passthrough, a);
                }
            }
            None => set_cookie = c.ttl.map(|ttl| (c.clone(), ttl)),
        }
    }
    let (workload, addr, guard) = target.pick(&lb, key.as_deref(), pinned)?;
    Some(Chosen { workload, addr, _guard: guard, set_cookie })
}

/// The `Set-Cookie` value pinning the client to `addr`.
fn affinity_cookie(c: &crate::traffic::policy::CookiePolicy, ttl: Duration, addr: SocketAddr) -> Option<HeaderValue> {
    let mut v = format!("{}=\"{}\"; HttpOnly", c.name, cookie_value(addr));
    if !ttl.is_zero() {
        v.push_str(&format!("; Max-Age={}", ttl.as_secs()));
    }
    if let Some(p) = &c.path {
        v.push_str(&format!("; Path={p}"));
    }
    HeaderValue::from_str(&v).ok()
}

/// The forwarded request with this attempt's body.
fn upstream_request(req: &Request<()>, body: UpBody) -> Request<UpBody> {
    let mut upstream_req = Request::new(body);
    *upstream_req.method_mut() = req.method().clone();
    *upstream_req.uri_mut() = req.uri().clone();
    *upstream_req.headers_mut() = req.headers().clone();
    upstream_req
}

/// Per-request connection settings from the DestinationRule's connection pool.
fn conn_settings(policy: &crate::traffic::policy::TrafficPolicy, req: &Request<()>) -> ConnSettings {
    ConnSettings {
        connect_timeout: policy.pool.connect_timeout,
        max_requests_per_connection: policy.pool.max_requests_per_connection,
        idle_timeout: policy.pool.idle_timeout,
        // HTTP/2 clients (gRPC needs it end to end) and h2UpgradePolicy: UPGRADE.
        // Protocol upgrades (WebSocket) are HTTP/1.1 only.
        http2: (req.version() == http::Version::HTTP_2 || policy.pool.h2_upgrade) && !is_upgrade(req),
    }
}

/// How long a mirror copy may take; it is dropped after (its answer is not read).
const MIRROR_TIMEOUT: Duration = Duration::from_secs(30);

/// Sends a copy to the mirror, fire and forget: the answer is read and dropped, and
/// the Host carries Istio's `-shadow` suffix so the mirror can tell copies apart.
fn mirror_copy(caller: &Caller<'_>, mirror: &Backend, req: &Request<()>, body: Bytes) {
    let mut copy = Request::new(());
    *copy.method_mut() = req.method().clone();
    *copy.uri_mut() = req.uri().clone();
    *copy.headers_mut() = req.headers().clone();
    if let Some(host) = req.headers().get(http::header::HOST).and_then(|h| h.to_str().ok()) {
        let (name, port) = match host.rsplit_once(':') {
            Some((n, p)) if p.bytes().all(|b| b.is_ascii_digit()) => (n, Some(p)),
            _ => (host, None),
        };
        let shadow = match port {
            Some(p) => format!("{name}-shadow:{p}"),
            None => format!("{name}-shadow"),
        };
        if let Ok(v) = HeaderValue::from_str(&shadow) {
            copy.headers_mut().insert(http::header::HOST, v);
        }
    }
    let Ok(slot) = caller.ctx.runtime.mirrors.clone().try_acquire_owned() else {
        caller.ctx.metrics.refused("l7", "mirror_budget");
        return;
    };
    let (ctx, snap, pod, netns) = (caller.ctx.clone(), caller.snap.clone(), caller.pod.clone(), caller.netns.clone());
    let (mirror, orig) = (mirror.clone(), caller.orig);
    tokio::spawn(async move {
        let _slot = slot;
        // A mirror's body is the original's copy: not counted again.
        let uncounted = Arc::default();
        let caller = Caller { ctx: &ctx, snap: &snap, pod: &pod, netns: &netns, orig, request_bytes: &uncounted };
        match try_once(&caller, &mirror, &copy, buffered(body), Some(MIRROR_TIMEOUT)).await {
            TryOutcome::Answer(a) => {
                // Drain so the connection goes back to the pool.
                let _ = a.response.into_body().collect().await;
            }
            TryOutcome::Failed { detail, .. } => tracing::debug!(service = %mirror.service, %detail, "mirror failed"),
            TryOutcome::Final(_) => {}
        }
    });
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::{BodyBuffer, cookie_endpoint, cookie_value, grpc_status};

    /// A gRPC stream's messages both ways: the request's as the path counted them, the
    /// response's as they pass (a message split across frames counts once), under the
    /// request's labels with the status from the trailers.
    #[tokio::test]
    async fn grpc_messages_are_counted_each_way() {
        use http_body_util::BodyExt as _;
        let mut registry = prometheus_client::registry::Registry::default();
        let metrics = Arc::new(crate::telemetry::Metrics::new(&mut registry));
        let tally = Arc::new(super::RequestTally::default());
        tally.messages.store(2, std::sync::atomic::Ordering::Relaxed);
        let measured = super::Measured {
            metrics,
            policy: Arc::default(),
            series: Arc::default(),
            started: std::time::Instant::now(),
            request_bytes: Some(tally),
            log: None,
            span: None,
        };
        let message = |len: u8| [&[0, 0, 0, 0, len][..], &vec![9; len as usize]].concat();
        let stream = [message(4), message(10), message(0)].concat();
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", "0".parse().unwrap());
        let frames: Vec<Result<http_body::Frame<bytes::Bytes>, super::BoxError>> = vec![
            Ok(http_body::Frame::data(bytes::Bytes::copy_from_slice(&stream[..7]))),
            Ok(http_body::Frame::data(bytes::Bytes::copy_from_slice(&stream[7..]))),
            Ok(http_body::Frame::trailers(trailers)),
        ];
        let body = http_body_util::StreamBody::new(futures::stream::iter(frames)).boxed_unsync();
        let response = http::Response::builder().header("content-type", "application/grpc").body(body).unwrap();
        let w = crate::state::Workload::outside("client", "shop", "10.0.0.1".parse().unwrap(), "cluster.local");
        let peers = crate::telemetry::SharedPeers::new(crate::telemetry::PeerLabels::source(
            &w,
            None,
            crate::telemetry::ServiceLabels::service(Some("shop/cart")),
            true,
        ));
        let answered = measured.answer(peers, "-", response);
        let _ = answered.into_body().collect().await.unwrap();
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        let value = |name: &str| {
            text.lines()
                .find(|l| {
                    l.starts_with(name)
                        && l.contains("request_protocol=\"grpc\"")
                        && l.contains("grpc_response_status=\"0\"")
                })
                .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        };
        assert_eq!(value("request_messages_total{"), Some(2), "{text}");
        assert_eq!(value("response_messages_total{"), Some(3), "{text}");
        assert_eq!(value("requests_total{"), Some(1), "{text}");
    }

    /// Request bodies are parsed for gRPC messages only when the request is gRPC: other
    /// bodies are counted in bytes and nothing more.
    #[test]
    fn only_grpc_request_bodies_are_parsed_for_messages() {
        let budget = Arc::new(tokio::sync::Semaphore::new(1024));
        for (content_type, messages) in [("application/grpc", 2), ("application/json", 0)] {
            let mut headers = http::HeaderMap::new();
            headers.insert(http::header::CONTENT_TYPE, content_type.parse().unwrap());
            let tally = super::RequestTally::of(&headers);
            let mut buf = BodyBuffer::new(budget.clone());
            assert!(buf.grow_to(64));
            buf.bytes.extend_from_slice(&[0, 0, 0, 0, 1, 7, 0, 0, 0, 0, 0]);
            let _ = buf.into_buffered(&tally);
            assert_eq!(tally.bytes.load(std::sync::atomic::Ordering::Relaxed), 11);
            assert_eq!(tally.messages.load(std::sync::atomic::Ordering::Relaxed), messages, "{content_type}");
        }
    }

    /// An application cannot grow the metric's label space with made-up codes.
    #[test]
    fn grpc_statuses_beyond_grpcs_own_are_unknown() {
        let status = |v: &str| {
            let mut h = http::HeaderMap::new();
            h.insert("grpc-status", v.parse().unwrap());
            grpc_status(&h)
        };
        assert_eq!(status("0"), Some(0));
        assert_eq!(status("16"), Some(16));
        assert_eq!(status("17"), Some(2));
        assert_eq!(status("4294967295"), Some(2));
        assert_eq!(status("x"), None);
    }

    #[test]
    fn affinity_cookie_names_its_endpoint() {
        let a: std::net::SocketAddr = "10.10.2.2:8080".parse().unwrap();
        assert_eq!(cookie_endpoint(&cookie_value(a)), Some(a));
        assert_eq!(cookie_endpoint("not-hex"), None);
        assert_eq!(cookie_endpoint("abc"), None, "odd length");
    }

    #[test]
    fn a_buffered_body_pays_for_its_capacity_before_it_grows() {
        let budget = Arc::new(tokio::sync::Semaphore::new(100_000));
        let mut a = BodyBuffer::new(budget.clone());
        assert!(a.grow_to(60_000));
        assert!(a.bytes.capacity() >= 60_000);
        assert_eq!(budget.available_permits(), 40_000, "charged for the capacity, not the bytes in it");
        let mut b = BodyBuffer::new(budget.clone());
        assert!(!b.grow_to(50_000), "the budget cannot pay");
        assert_eq!(b.bytes.capacity(), 0, "and nothing was allocated");
        assert!(b.grow_to(40_000));
        assert_eq!(budget.available_permits(), 0);
        drop(a);
        assert_eq!(budget.available_permits(), 60_000, "a finished body gives its share back");
        drop(b);
        assert_eq!(budget.available_permits(), 100_000);
    }
}

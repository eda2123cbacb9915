//! Distributed tracing: trace context read from and written to requests (W3C
//! `traceparent`/`tracestate`, B3 single and multi header), one span per hop the agent
//! handles at L7 (client side at the source, server side at the destination), sampled
//! by percentage, exported over OTLP (HTTP or gRPC) to a collector such as Jaeger.
//!
//! Spans leave the data path through a bounded queue; a full queue drops the span and
//! counts it. The exporter batches and posts in the background, so a slow or absent
//! collector costs requests nothing.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span, Status, span, status};
use prometheus_client::metrics::counter::Counter;
use prost::Message as _;
use rand::Rng as _;
use tokio::sync::mpsc;

use crate::state::WorkloadMeta;

const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
const B3: HeaderName = HeaderName::from_static("b3");
const B3_TRACE_ID: HeaderName = HeaderName::from_static("x-b3-traceid");
const B3_SPAN_ID: HeaderName = HeaderName::from_static("x-b3-spanid");
const B3_PARENT_SPAN_ID: HeaderName = HeaderName::from_static("x-b3-parentspanid");
const B3_SAMPLED: HeaderName = HeaderName::from_static("x-b3-sampled");
const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Spans waiting for the exporter; beyond this they are dropped.
const QUEUE: usize = 8192;
/// Spans per export request at most.
const BATCH: usize = 512;
/// How long the exporter waits to fill a batch.
const BATCH_DELAY: Duration = Duration::from_secs(1);
/// One export's connect and answer, at most.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// Where a trace stands at one hop: the trace, the span that is the parent of what
/// comes next, and whether the trace is recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpanContext {
    /// The trace.
    pub trace_id: [u8; 16],
    /// The span.
    pub span_id: [u8; 8],
    /// Whether the trace is sampled (recorded).
    pub sampled: bool,
}

fn hex<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != N * 2 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let mut out = [0u8; N];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(&s[i * 2..i * 2 + 2], 16).ok()?;
    }
    Some(out)
}

fn to_hex(b: &[u8]) -> String {
    use std::fmt::Write as _;
    // One allocation: this runs for every request without an x-request-id.
    let mut s = String::with_capacity(b.len() * 2);
    for x in b {
        let _ = write!(s, "{x:02x}");
    }
    s
}

impl SpanContext {
    /// The context a request carries: W3C `traceparent` first, then B3 single header
    /// (`b3`), then B3 multi headers. Malformed or all-zero ids are no context.
    pub fn extract(headers: &HeaderMap) -> Option<Self> {
        let get = |n: &HeaderName| headers.get(n).and_then(|v| v.to_str().ok());
        let valid = |c: Self| (c.trace_id != [0; 16] && c.span_id != [0; 8]).then_some(c);
        if let Some(tp) = get(&TRACEPARENT) {
            let parts: Vec<&str> = tp.trim().split('-').collect();
            if parts.len() >= 4 && parts[0].len() == 2 && parts[0] != "ff" {
                let flags = hex::<1>(parts[3])?[0];
                return valid(Self { trace_id: hex(parts[1])?, span_id: hex(parts[2])?, sampled: flags & 1 == 1 });
            }
            return None;
        }
        if let Some(b3) = get(&B3) {
            let parts: Vec<&str> = b3.trim().split('-').collect();
            if parts.len() < 2 {
                return None;
            }
            let sampled = parts.get(2).is_none_or(|s| *s == "1" || *s == "d");
            return valid(Self { trace_id: trace_id_b3(parts[0])?, span_id: hex(parts[1])?, sampled });
        }
        let trace_id = trace_id_b3(get(&B3_TRACE_ID)?)?;
        let span_id = hex(get(&B3_SPAN_ID)?)?;
        let sampled = get(&B3_SAMPLED).is_none_or(|s| s == "1" || s.eq_ignore_ascii_case("true"));
        valid(Self { trace_id, span_id, sampled })
    }

    /// Writes this context into `headers` as both W3C `traceparent` and B3 multi
    /// headers (`parent` as `x-b3-parentspanid`); a B3 single header is replaced by
    /// the multi headers. `tracestate` passes unchanged.
    pub fn inject(&self, headers: &mut HeaderMap, parent: Option<[u8; 8]>) {
        let (trace, span) = (to_hex(&self.trace_id), to_hex(&self.span_id));
        let flags = if self.sampled { "01" } else { "00" };
        let value = |s: String| HeaderValue::from_str(&s).expect("hex is a header value");
        headers.insert(TRACEPARENT, value(format!("00-{trace}-{span}-{flags}")));
        headers.remove(B3);
        headers.insert(B3_TRACE_ID, value(trace));
        headers.insert(B3_SPAN_ID, value(span));
        match parent {
            Some(p) => headers.insert(B3_PARENT_SPAN_ID, value(to_hex(&p))),
            None => headers.remove(B3_PARENT_SPAN_ID),
        };
        headers.insert(B3_SAMPLED, HeaderValue::from_static(if self.sampled { "1" } else { "0" }));
    }
}

/// A 64-bit B3 trace id is the low half of a 128-bit one.
fn trace_id_b3(s: &str) -> Option<[u8; 16]> {
    match s.len() {
        16 => {
            let low: [u8; 8] = hex(s)?;
            let mut id = [0u8; 16];
            id[8..].copy_from_slice(&low);
            Some(id)
        }
        _ => hex(s),
    }
}

/// A random (version 4) UUID, as Envoy makes for `x-request-id`.
pub fn new_request_id() -> HeaderValue {
    let mut b: [u8; 16] = rand::rng().random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex = to_hex(&b);
    let id = format!("{}-{}-{}-{}-{}", &hex[..8], &hex[8..12], &hex[12..16], &hex[16..20], &hex[20..]);
    HeaderValue::from_str(&id).expect("hex and dashes are a header value")
}

/// Gives a request an `x-request-id` when it has none (Envoy does for every request).
pub fn ensure_request_id(headers: &mut HeaderMap) {
    if !headers.contains_key(X_REQUEST_ID) {
        headers.insert(X_REQUEST_ID, new_request_id());
    }
}

/// Which side of a hop a span stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The source's agent, sending the request on.
    Client,
    /// The destination's agent, receiving it for its workload.
    Server,
}

/// A span begun at one hop: its context (to propagate) and its parent.
#[derive(Debug, Clone, Copy)]
pub struct Begun {
    /// This span.
    pub ctx: SpanContext,
    /// The span it is the child of (the incoming context), if any.
    pub parent: Option<[u8; 8]>,
    /// Which side.
    pub kind: Kind,
    /// When it began.
    pub start: SystemTime,
    /// Whether it is reported when sampled (a Telemetry may keep a side's spans in).
    pub report: bool,
}

impl Begun {
    /// Writes this span's context into the request going on.
    pub fn inject(&self, headers: &mut HeaderMap) {
        self.ctx.inject(headers, self.parent);
    }
}

/// A finished span, ready for export.
#[derive(Debug, Clone)]
pub struct Finished {
    /// The span as begun.
    pub begun: Begun,
    /// Operation name.
    pub name: String,
    /// When it ended.
    pub end: SystemTime,
    /// Istio's span attributes.
    pub attributes: Vec<(String, String)>,
    /// Whether it failed (5xx, or no upstream answer).
    pub error: bool,
    /// The workload whose hop it is: names the exporting service.
    pub workload: Arc<WorkloadMeta>,
}

/// Where spans go: OTLP over HTTP (protobuf) or gRPC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// `http://host:port[/path]`: POST protobuf to the path (`/v1/traces` by default).
    Http {
        /// `host:port`.
        authority: String,
        /// Request path.
        path: String,
    },
    /// `grpc://host:port`: `TraceService/Export` over HTTP/2.
    Grpc {
        /// `host:port`.
        authority: String,
    },
}

impl std::str::FromStr for Endpoint {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (scheme, rest) =
            s.split_once("://").ok_or_else(|| format!("{s}: expected http://host:port or grpc://host:port"))?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        let port_ok = authority.rsplit_once(':').is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok());
        if !port_ok {
            return Err(format!("{s}: the collector address needs a host and a port"));
        }
        match scheme {
            "http" => Ok(Endpoint::Http {
                authority: authority.into(),
                path: if path.is_empty() || path == "/" { "/v1/traces".into() } else { path.into() },
            }),
            "grpc" if path.is_empty() || path == "/" => Ok(Endpoint::Grpc { authority: authority.into() }),
            "grpc" => Err(format!("{s}: a gRPC endpoint has no path")),
            other => Err(format!("{s}: scheme {other} is not http or grpc (TLS to the collector is not supported)")),
        }
    }
}

/// Samples, and hands finished spans to the exporter.
#[derive(Debug)]
pub struct Tracer {
    /// Percent of new traces recorded (0 to 100); a request that carries a context
    /// keeps its caller's decision.
    sampling: f64,
    queue: mpsc::Sender<Finished>,
    dropped: Counter,
    /// The node, Envoy's `node_id` attribute.
    pub node: String,
    /// The mesh id (the trust domain), `istio.mesh_id`.
    pub mesh_id: String,
}

impl Tracer {
    /// Starts exporting to `endpoint`, sampling `sampling` percent of new traces.
    pub fn start(endpoint: Endpoint, sampling: f64, node: String, mesh_id: String, counters: TraceCounters) -> Self {
        let (queue, rx) = mpsc::channel(QUEUE);
        tokio::spawn(export_loop(rx, endpoint, counters.clone()));
        Self { sampling: sampling.clamp(0.0, 100.0), queue, dropped: counters.dropped, node, mesh_id }
    }

    /// Begins a span of `kind` under the request's incoming context: the same trace and
    /// sampling decision, or a new trace sampled at `sampling` percent (the configured
    /// percentage when None). `report`: whether the span is exported when sampled.
    pub fn begin(&self, incoming: Option<SpanContext>, kind: Kind, sampling: Option<f64>, report: bool) -> Begun {
        let mut rng = rand::rng();
        let percent = sampling.unwrap_or(self.sampling);
        let sampled = match incoming {
            Some(c) => c.sampled,
            None => percent >= 100.0 || (percent > 0.0 && rng.random_range(0.0..100.0) < percent),
        };
        let trace_id = incoming.map_or_else(|| rng.random(), |c| c.trace_id);
        let ctx = SpanContext { trace_id, span_id: rng.random(), sampled };
        Begun { ctx, parent: incoming.map(|c| c.span_id), kind, start: SystemTime::now(), report }
    }

    /// Queues a finished span for export (sampled and reported ones only); drops it
    /// when the exporter is behind.
    pub fn finish(&self, span: Finished) {
        if span.begun.ctx.sampled && span.begun.report && self.queue.try_send(span).is_err() {
            self.dropped.inc();
        }
    }
}

/// The tracer's counters.
#[derive(Debug, Clone, Default)]
pub struct TraceCounters {
    /// Spans dropped because the exporter fell behind.
    pub dropped: Counter,
    /// Spans the collector took.
    pub exported: Counter,
    /// Export requests that failed.
    pub failed: Counter,
}

async fn export_loop(mut rx: mpsc::Receiver<Finished>, endpoint: Endpoint, counters: TraceCounters) {
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        let Some(first) = rx.recv().await else { return };
        batch.push(first);
        let deadline = tokio::time::Instant::now() + BATCH_DELAY;
        while batch.len() < BATCH {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(s)) => batch.push(s),
                Ok(None) | Err(_) => break,
            }
        }
        let n = batch.len() as u64;
        let request = export_request(std::mem::take(&mut batch));
        match tokio::time::timeout(EXPORT_TIMEOUT, send(&endpoint, request.encode_to_vec())).await {
            Ok(Ok(())) => {
                counters.exported.inc_by(n);
            }
            Ok(Err(e)) => {
                counters.failed.inc();
                tracing::warn!(?endpoint, error = %e, spans = n, "trace export failed");
            }
            Err(_) => {
                counters.failed.inc();
                tracing::warn!(?endpoint, spans = n, "trace export timed out");
            }
        }
    }
}

fn string(key: &str, value: impl Into<String>) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue { value: Some(any_value::Value::StringValue(value.into())) }),
        ..Default::default()
    }
}

fn nanos(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// The OTLP request for `spans`, one resource per workload (`service.name` is
/// `<canonical service>.<namespace>`, as Istio's proxies name themselves).
pub fn export_request(spans: Vec<Finished>) -> ExportTraceServiceRequest {
    let mut by_workload: Vec<(Arc<WorkloadMeta>, Vec<Span>)> = Vec::new();
    for f in spans {
        let span = Span {
            trace_id: f.begun.ctx.trace_id.to_vec(),
            span_id: f.begun.ctx.span_id.to_vec(),
            parent_span_id: f.begun.parent.map(|p| p.to_vec()).unwrap_or_default(),
            flags: 0x100 | u32::from(f.begun.ctx.sampled),
            name: f.name,
            kind: match f.begun.kind {
                Kind::Client => span::SpanKind::Client as i32,
                Kind::Server => span::SpanKind::Server as i32,
            },
            start_time_unix_nano: nanos(f.begun.start),
            end_time_unix_nano: nanos(f.end),
            attributes: f.attributes.into_iter().map(|(k, v)| string(&k, v)).collect(),
            status: Some(Status {
                code: if f.error { status::StatusCode::Error } else { status::StatusCode::Unset } as i32,
                ..Default::default()
            }),
            ..Default::default()
        };
        match by_workload.iter_mut().find(|(w, _)| *w == f.workload) {
            Some((_, list)) => list.push(span),
            None => by_workload.push((f.workload, vec![span])),
        }
    }
    let resource_spans = by_workload
        .into_iter()
        .map(|(w, spans)| ResourceSpans {
            resource: Some(Resource {
                attributes: vec![
                    string("service.name", format!("{}.{}", w.canonical_service, w.namespace)),
                    string("k8s.namespace.name", w.namespace.clone()),
                ],
                ..Default::default()
            }),
            scope_spans: vec![ScopeSpans {
                scope: Some(InstrumentationScope { name: "mesh-agent".into(), ..Default::default() }),
                spans,
                ..Default::default()
            }],
            ..Default::default()
        })
        .collect();
    ExportTraceServiceRequest { resource_spans }
}

/// Posts one encoded export request.
async fn send(endpoint: &Endpoint, body: Vec<u8>) -> Result<(), String> {
    let authority = match endpoint {
        Endpoint::Http { authority, .. } | Endpoint::Grpc { authority } => authority,
    };
    let addr: SocketAddr = tokio::net::lookup_host(authority.as_str())
        .await
        .map_err(|e| format!("resolving {authority}: {e}"))?
        .next()
        .ok_or_else(|| format!("{authority} has no address"))?;
    let tcp = tokio::net::TcpStream::connect(addr).await.map_err(|e| format!("connecting to {addr}: {e}"))?;
    let io = TokioIo::new(tcp);
    match endpoint {
        Endpoint::Http { path, .. } => {
            let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await.map_err(|e| e.to_string())?;
            tokio::spawn(conn);
            let req = http::Request::post(path.as_str())
                .header(http::header::HOST, authority.as_str())
                .header(http::header::CONTENT_TYPE, "application/x-protobuf")
                .body(Full::new(Bytes::from(body)))
                .map_err(|e| e.to_string())?;
            let res = sender.send_request(req).await.map_err(|e| e.to_string())?;
            let status = res.status();
            let _ = res.into_body().collect().await;
            status.is_success().then_some(()).ok_or_else(|| format!("collector answered {status}"))
        }
        Endpoint::Grpc { .. } => {
            let (mut sender, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await.map_err(|e| e.to_string())?;
            tokio::spawn(conn);
            // gRPC's length-prefixed message: not compressed, then the length.
            let mut framed = Vec::with_capacity(body.len() + 5);
            framed.push(0);
            framed.extend_from_slice(&u32::try_from(body.len()).map_err(|_| "export too large")?.to_be_bytes());
            framed.extend_from_slice(&body);
            let uri = format!("http://{authority}/opentelemetry.proto.collector.trace.v1.TraceService/Export");
            let req = http::Request::post(uri)
                .header(http::header::CONTENT_TYPE, "application/grpc")
                .header("te", "trailers")
                .body(Full::new(Bytes::from(framed)))
                .map_err(|e| e.to_string())?;
            let res = sender.send_request(req).await.map_err(|e| e.to_string())?;
            if !res.status().is_success() {
                return Err(format!("collector answered {}", res.status()));
            }
            let collected = res.into_body().collect().await.map_err(|e| e.to_string())?;
            let grpc_status = collected
                .trailers()
                .and_then(|t| t.get("grpc-status"))
                .and_then(|v| v.to_str().ok())
                .unwrap_or("0")
                .to_string();
            (grpc_status == "0").then_some(()).ok_or_else(|| format!("collector answered grpc-status {grpc_status}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(HeaderName::from_bytes(k.as_bytes()).unwrap(), v.parse().unwrap());
        }
        h
    }

    #[test]
    fn contexts_are_read_from_w3c_and_both_b3_forms() {
        let w3c = SpanContext::extract(&headers(&[(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )]))
        .unwrap();
        assert_eq!(to_hex(&w3c.trace_id), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(to_hex(&w3c.span_id), "00f067aa0ba902b7");
        assert!(w3c.sampled);
        let single = SpanContext::extract(&headers(&[("b3", "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-0")]));
        assert_eq!(single.map(|c| c.sampled), Some(false));
        let multi = SpanContext::extract(&headers(&[
            ("x-b3-traceid", "463ac35c9f6413ad"),
            ("x-b3-spanid", "a2fb4a1d1a96d312"),
            ("x-b3-sampled", "1"),
        ]))
        .unwrap();
        assert_eq!(to_hex(&multi.trace_id), "0000000000000000463ac35c9f6413ad", "64-bit ids widen");
        for bad in [
            vec![("traceparent", "00-00000000000000000000000000000000-00f067aa0ba902b7-01")],
            vec![("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7")],
            vec![("traceparent", "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")],
            vec![("x-b3-traceid", "zz"), ("x-b3-spanid", "a2fb4a1d1a96d312")],
        ] {
            assert_eq!(SpanContext::extract(&headers(&bad)), None, "{bad:?}");
        }
    }

    #[test]
    fn a_child_keeps_the_trace_and_the_callers_sampling_and_is_injected_both_ways() {
        let (tx, _rx) = mpsc::channel(1);
        let tracer = Tracer {
            sampling: 0.0,
            queue: tx,
            dropped: Counter::default(),
            node: "n".into(),
            mesh_id: "cluster.local".into(),
        };
        let parent = SpanContext { trace_id: [7; 16], span_id: [9; 8], sampled: true };
        let child = tracer.begin(Some(parent), Kind::Client, None, true);
        assert_eq!(child.ctx.trace_id, parent.trace_id);
        assert_ne!(child.ctx.span_id, parent.span_id);
        assert!(child.ctx.sampled, "the caller's decision wins over 0%");
        assert_eq!(child.parent, Some(parent.span_id));
        let mut h = headers(&[("b3", "x"), ("tracestate", "vendor=1")]);
        child.inject(&mut h);
        assert_eq!(SpanContext::extract(&h), Some(child.ctx), "traceparent carries the child");
        h.remove(TRACEPARENT);
        assert_eq!(SpanContext::extract(&h), Some(child.ctx), "so do the B3 headers");
        assert_eq!(h["x-b3-parentspanid"], "0909090909090909");
        assert_eq!(h["tracestate"], "vendor=1");
        assert!(!tracer.begin(None, Kind::Server, None, true).ctx.sampled, "a new trace at 0% is not recorded");
        assert!(tracer.begin(None, Kind::Server, Some(100.0), true).ctx.sampled, "a Telemetry's percentage wins");
    }

    #[test]
    fn endpoints_parse_and_bad_ones_say_why() {
        assert_eq!(
            "http://jaeger-collector.istio-system:4318".parse::<Endpoint>(),
            Ok(Endpoint::Http { authority: "jaeger-collector.istio-system:4318".into(), path: "/v1/traces".into() })
        );
        assert_eq!(
            "grpc://127.0.0.1:4317".parse::<Endpoint>(),
            Ok(Endpoint::Grpc { authority: "127.0.0.1:4317".into() })
        );
        for bad in ["jaeger:4317", "https://jaeger:4318", "http://jaeger", "grpc://j:4317/x"] {
            assert!(bad.parse::<Endpoint>().is_err(), "{bad}");
        }
    }
}

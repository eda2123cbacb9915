//! Access logs: one line per HTTP request and per TCP connection, in Envoy's default
//! text format as Istio configures it, or as JSON with Istio's field names, plus the
//! SPIFFE identities of both sides.
//!
//! The data path never waits on the log: entries go through a bounded queue to one
//! writer task, and an entry that finds the queue full is dropped and counted
//! (`istio_mesh_access_log_dropped_total`), so a slow stdout sheds lines, not requests.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncWrite, AsyncWriteExt as _};
use tokio::sync::mpsc;

use crate::state::TelemetryPolicy;

/// Entries waiting for the writer; beyond this they are dropped.
const QUEUE: usize = 4096;

/// How lines are written (`--access-log`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// None, unless a Telemetry turns access logging on for a workload (then text).
    Off,
    /// Envoy's default format, as Istio's `accessLogFile` writes it.
    Text,
    /// One JSON object per line, Istio's `accessLogEncoding: JSON` field names.
    Json,
}

/// The request part of an HTTP entry.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Request {
    /// `:method`.
    pub method: String,
    /// Path and query as the client sent them.
    pub path: String,
    /// `HTTP/1.1`, `HTTP/2`...
    pub protocol: &'static str,
    /// `:authority` / `Host`.
    pub authority: Option<String>,
    /// `user-agent`.
    pub user_agent: Option<String>,
    /// `x-request-id`.
    pub request_id: Option<String>,
    /// `x-forwarded-for`.
    pub forwarded_for: Option<String>,
}

impl Request {
    /// What an entry keeps of `req`.
    pub fn of<B>(req: &http::Request<B>) -> Self {
        let header = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
        Self {
            method: req.method().as_str().to_string(),
            path: req.uri().path_and_query().map_or_else(|| req.uri().path().to_string(), |p| p.as_str().to_string()),
            protocol: match req.version() {
                http::Version::HTTP_10 => "HTTP/1.0",
                http::Version::HTTP_2 => "HTTP/2",
                http::Version::HTTP_3 => "HTTP/3",
                _ => "HTTP/1.1",
            },
            authority: req.uri().authority().map(|a| a.to_string()).or_else(|| header("host")),
            user_agent: header("user-agent"),
            request_id: header("x-request-id"),
            forwarded_for: header("x-forwarded-for"),
        }
    }
}

/// One access log line: an HTTP request (with `request`) or a TCP connection.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// When the request or connection began.
    pub start: SystemTime,
    /// `source` or `destination`: which agent wrote it.
    pub reporter: &'static str,
    /// The request, for HTTP.
    pub request: Option<Request>,
    /// HTTP status; 0 for TCP.
    pub response_code: u16,
    /// Envoy's response flags, `-` when none.
    pub response_flags: String,
    /// Why this answer: `via_upstream`, `rbac_access_denied_matched_policy[...]`, ...
    pub response_code_details: String,
    /// Bytes from the client (the request body, for HTTP), when counted.
    pub bytes_received: Option<u64>,
    /// Bytes to the client.
    pub bytes_sent: u64,
    /// From the start to the last byte.
    pub duration: Duration,
    /// The address the request or connection was sent to.
    pub upstream_host: Option<SocketAddr>,
    /// Envoy's cluster name: `outbound|<port>|<subset>|<service>` or `inbound|<port>||`.
    pub upstream_cluster: String,
    /// The address the client dialed.
    pub downstream_local: SocketAddr,
    /// The client's address.
    pub downstream_remote: SocketAddr,
    /// The client's SPIFFE identity, when known.
    pub source_principal: Option<String>,
    /// The server's SPIFFE identity, when known.
    pub destination_principal: Option<String>,
}

/// Where entries go.
#[derive(Debug)]
pub struct AccessLog {
    queue: mpsc::Sender<Entry>,
    dropped: Counter,
    /// Whether workloads no Telemetry speaks for are logged.
    default_on: bool,
}

impl AccessLog {
    /// Starts the writer task on `out` in `format` (text for `Off`, which logs only
    /// the workloads a Telemetry turns logging on for). Entries the queue cannot take
    /// are counted on `dropped`.
    pub fn start<W>(format: Format, out: W, dropped: Counter) -> Self
    where
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let (queue, rx) = mpsc::channel(QUEUE);
        tokio::spawn(write_lines(rx, format, out));
        Self { queue, dropped, default_on: format != Format::Off }
    }

    /// Whether traffic of a workload under `policy`, seen by the source's agent
    /// (`source`) or the destination's, may be logged (its response code not known
    /// yet).
    pub fn may_log(&self, policy: &TelemetryPolicy, source: bool) -> bool {
        policy.access_log.as_ref().map_or(self.default_on, |p| p.enabled && p.sides.has(source))
    }

    /// Whether an entry with response `code` (0 for TCP) is logged.
    pub fn logs(&self, policy: &TelemetryPolicy, source: bool, code: u16) -> bool {
        policy.access_log.as_ref().map_or(self.default_on, |p| p.logs(source, code))
    }

    /// Queues `entry` for the writer, or drops it when the queue is full.
    pub fn record(&self, entry: Entry) {
        if self.queue.try_send(entry).is_err() {
            self.dropped.inc();
        }
    }
}

/// Writes entries as they come, flushing whenever the queue runs empty.
async fn write_lines<W: AsyncWrite + Unpin>(mut rx: mpsc::Receiver<Entry>, format: Format, out: W) {
    let mut out = tokio::io::BufWriter::new(out);
    let mut line = String::with_capacity(512);
    while let Some(entry) = rx.recv().await {
        let mut next = Some(entry);
        while let Some(e) = next {
            line.clear();
            match format {
                Format::Json => json(&e, &mut line),
                _ => text(&e, &mut line),
            }
            line.push('\n');
            if out.write_all(line.as_bytes()).await.is_err() {
                return;
            }
            next = rx.try_recv().ok();
        }
        if out.flush().await.is_err() {
            return;
        }
    }
}

fn timestamp(t: SystemTime) -> String {
    jiff::Timestamp::try_from(t).map_or_else(|_| "-".into(), |ts| format!("{ts:.3}"))
}

fn or_dash(v: Option<&str>) -> &str {
    v.filter(|s| !s.is_empty()).unwrap_or("-")
}

/// Envoy's default format, as Istio sets it:
/// `[%START_TIME%] "%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%"
/// %RESPONSE_CODE% %RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS%
/// %CONNECTION_TERMINATION_DETAILS% "%UPSTREAM_TRANSPORT_FAILURE_REASON%"
/// %BYTES_RECEIVED% %BYTES_SENT% %DURATION% %RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)%
/// "%REQ(X-FORWARDED-FOR)%" "%REQ(USER-AGENT)%" "%REQ(X-REQUEST-ID)%"
/// "%REQ(:AUTHORITY)%" "%UPSTREAM_HOST%" %UPSTREAM_CLUSTER_RAW%
/// %UPSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_REMOTE_ADDRESS%
/// %REQUESTED_SERVER_NAME% %ROUTE_NAME%`.
pub fn text(e: &Entry, out: &mut String) {
    let r = e.request.as_ref();
    let upstream = e.upstream_host.map(|a| a.to_string());
    let _ = write!(
        out,
        "[{}] \"{} {} {}\" {} {} {} - \"-\" {} {} {} - \"{}\" \"{}\" \"{}\" \"{}\" \"{}\" {} - {} {} - -",
        timestamp(e.start),
        or_dash(r.map(|r| r.method.as_str())),
        or_dash(r.map(|r| r.path.as_str())),
        or_dash(r.map(|r| r.protocol)),
        e.response_code,
        or_dash(Some(&e.response_flags)),
        or_dash(Some(&e.response_code_details)),
        e.bytes_received.unwrap_or(0),
        e.bytes_sent,
        e.duration.as_millis(),
        or_dash(r.and_then(|r| r.forwarded_for.as_deref())),
        or_dash(r.and_then(|r| r.user_agent.as_deref())),
        or_dash(r.and_then(|r| r.request_id.as_deref())),
        or_dash(r.and_then(|r| r.authority.as_deref())),
        or_dash(upstream.as_deref()),
        or_dash(Some(&e.upstream_cluster)),
        e.downstream_local,
        e.downstream_remote,
    );
}

/// One JSON object with Istio's JSON access log keys, plus `reporter` and both sides'
/// SPIFFE identities (`upstream_peer_principal` is the server's, as ztunnel names it).
pub fn json(e: &Entry, out: &mut String) {
    let r = e.request.as_ref();
    let value = serde_json::json!({
        "start_time": timestamp(e.start),
        "reporter": e.reporter,
        "method": r.map(|r| r.method.as_str()),
        "path": r.map(|r| r.path.as_str()),
        "protocol": r.map_or("TCP", |r| r.protocol),
        "response_code": e.response_code,
        "response_flags": or_dash(Some(&e.response_flags)),
        "response_code_details": (!e.response_code_details.is_empty()).then_some(&e.response_code_details),
        "bytes_received": e.bytes_received.unwrap_or(0),
        "bytes_sent": e.bytes_sent,
        "duration": u64::try_from(e.duration.as_millis()).unwrap_or(u64::MAX),
        "x_forwarded_for": r.and_then(|r| r.forwarded_for.as_deref()),
        "user_agent": r.and_then(|r| r.user_agent.as_deref()),
        "request_id": r.and_then(|r| r.request_id.as_deref()),
        "authority": r.and_then(|r| r.authority.as_deref()),
        "upstream_host": e.upstream_host.map(|a| a.to_string()),
        "upstream_cluster": e.upstream_cluster,
        "downstream_local_address": e.downstream_local.to_string(),
        "downstream_remote_address": e.downstream_remote.to_string(),
        "source_principal": e.source_principal,
        "upstream_peer_principal": e.destination_principal,
    });
    let _ = write!(out, "{value}");
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncBufReadExt as _;

    use super::*;

    fn entry() -> Entry {
        Entry {
            start: SystemTime::UNIX_EPOCH + Duration::from_millis(1_606_339_578_409),
            reporter: "source",
            request: Some(Request {
                method: "GET".into(),
                path: "/status/418".into(),
                protocol: "HTTP/1.1",
                authority: Some("httpbin:8000".into()),
                user_agent: Some("curl/8.5.0".into()),
                request_id: Some("84961386-6d84-929d-98bd-c5aee93b5c88".into()),
                forwarded_for: None,
            }),
            response_code: 418,
            response_flags: "-".into(),
            response_code_details: "via_upstream".into(),
            bytes_received: Some(0),
            bytes_sent: 135,
            duration: Duration::from_millis(4),
            upstream_host: Some("10.44.1.27:80".parse().unwrap()),
            upstream_cluster: "outbound|8000||httpbin.foo.svc.cluster.local".into(),
            downstream_local: "10.0.45.184:8000".parse().unwrap(),
            downstream_remote: "10.44.1.23:46520".parse().unwrap(),
            source_principal: Some("spiffe://cluster.local/ns/foo/sa/sleep".into()),
            destination_principal: Some("spiffe://cluster.local/ns/foo/sa/httpbin".into()),
        }
    }

    /// The line Istio's documentation shows for this request, field for field.
    #[test]
    fn text_is_envoys_default_format() {
        let mut line = String::new();
        text(&entry(), &mut line);
        assert_eq!(
            line,
            "[2020-11-25T21:26:18.409Z] \"GET /status/418 HTTP/1.1\" 418 - via_upstream - \"-\" 0 135 4 - \"-\" \
             \"curl/8.5.0\" \"84961386-6d84-929d-98bd-c5aee93b5c88\" \"httpbin:8000\" \"10.44.1.27:80\" \
             outbound|8000||httpbin.foo.svc.cluster.local - 10.0.45.184:8000 10.44.1.23:46520 - -"
        );
        let tcp = Entry { request: None, response_code: 0, response_code_details: String::new(), ..entry() };
        line.clear();
        text(&tcp, &mut line);
        assert!(line.starts_with("[2020-11-25T21:26:18.409Z] \"- - -\" 0 - - - \"-\" 0 135 4 - "), "{line}");
    }

    #[test]
    fn json_has_istios_keys_and_both_identities() {
        let mut line = String::new();
        json(&entry(), &mut line);
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["start_time"], "2020-11-25T21:26:18.409Z");
        assert_eq!(v["method"], "GET");
        assert_eq!(v["response_code"], 418);
        assert_eq!(v["upstream_host"], "10.44.1.27:80");
        assert_eq!(v["source_principal"], "spiffe://cluster.local/ns/foo/sa/sleep");
        assert_eq!(v["upstream_peer_principal"], "spiffe://cluster.local/ns/foo/sa/httpbin");
        assert_eq!(v["x_forwarded_for"], serde_json::Value::Null);
    }

    /// A writer that takes nothing never blocks a recorder: entries beyond the queue
    /// are dropped and counted; a reader gets every line that was queued.
    #[tokio::test]
    async fn a_stalled_writer_sheds_lines_and_never_blocks() {
        let (out, far) = tokio::io::duplex(64);
        let dropped = Counter::default();
        let log = AccessLog::start(Format::Json, out, dropped.clone());
        for _ in 0..QUEUE * 2 {
            log.record(entry());
        }
        assert!(dropped.get() >= QUEUE as u64 - 1, "dropped {}", dropped.get());
        let mut lines = tokio::io::BufReader::new(far).lines();
        let first = lines.next_line().await.unwrap().unwrap();
        assert!(first.contains("\"response_code\":418"), "{first}");
    }
}

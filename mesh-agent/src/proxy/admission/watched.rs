//! Inbound HTTP/1.1 watched, not served: a connection allowed as a whole whose only
//! use for HTTP is the destination's request metrics is copied byte for byte, as a
//! spliced one is, while the agent follows each message's framing beside the copy (a
//! head's end, `Content-Length`, chunks, the connection's end) and counts each
//! exchange as its response passes.
//!
//! Serving such a connection (`admission/http.rs`: an HTTP server towards the client,
//! a client towards the application) parses, allocates and re-serializes every
//! message, and it is what made the destination the largest consumer of the mesh's
//! CPU. Nothing of a watched connection's bytes is changed (but for `connection:
//! close` on its responses once the agent drains, as a served connection gets), so
//! nothing is enforced by reading them either: the path is taken only when the
//! connection's verdict does not depend on its requests, and only request metrics are
//! wanted (no span, which must be injected, and no access log line, which wants what
//! the served path reads).
//!
//! The follower can only lose track, never hold the bytes back: a head it cannot parse
//! or that outgrows [`H1_MAX_BUF`], framing it does not understand, more requests read
//! ahead than [`MAX_PENDING`], or a protocol switch, and it stops counting for the rest
//! of the connection while the copy goes on. What it holds is bounded by those limits.

use std::collections::VecDeque;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use crate::l7::server::grpc_code;
use crate::state::TelemetryPolicy;
use crate::telemetry::{Metrics, RequestLabels, RequestSeries, SeriesMemo, SharedPeers};
use crate::transport::CLIENT_DRAIN_GRACE;
use crate::transport::limits::H1_MAX_BUF;

/// Headers one head may carry (hyper's default); a head with more is not followed.
const MAX_HEADERS: usize = 100;

/// Requests read ahead of their responses (pipelined) that are followed; a client
/// pipelining more is not followed further.
pub(crate) const MAX_PENDING: usize = 32;

/// A head buffer larger than this is freed once the head is parsed, so a connection
/// that once sent a large head does not keep its buffer.
const KEPT_HEAD_BUFFER: usize = 4 * 1024;

/// Whether a connection whose first bytes are `first`, to a workload whose Telemetry
/// is `policy`, can be watched rather than served: HTTP/1.x (not HTTP/2's preface),
/// no tracer (a span needs its context injected into the request) and no access log
/// for it (a line needs the request's details).
pub(super) fn suffices(metrics: &Metrics, policy: &TelemetryPolicy, first: &[u8]) -> bool {
    !first.starts_with(b"PRI ")
        && metrics.tracer().is_none()
        && !metrics.access_log().is_some_and(|l| l.may_log(policy, false))
}

/// A client stream whose exchanges are counted as they pass: what is read from it is
/// requests, what is written to it is responses.
pub struct Watched<S> {
    inner: S,
    follow: Follow,
    report: Report,
    drain: Drain,
}

/// How a watched connection ends once the agent drains, as a served one ends: each
/// final response from then on gets `connection: close` after its status line (the
/// only bytes the agent ever adds), so the client closes after reading it rather than
/// racing a close with its next request; a connection that asks nothing for
/// [`CLIENT_DRAIN_GRACE`] is closed between exchanges (its client side reads as
/// ended, so the copy closes both).
struct Drain {
    token: CancellationToken,
    /// Wakes the connection's task when the agent drains. Polled once per task, not
    /// per read: polling it takes a lock every connection of the agent shares.
    signal: Pin<Box<WaitForCancellationFutureOwned>>,
    registered: Option<std::task::Waker>,
    /// Set once drained: ready when the grace is over.
    grace: Option<Pin<Box<tokio::time::Sleep>>>,
    /// A status line and the added header, to be written before anything else.
    out: Vec<u8>,
    written: usize,
    /// A response has told the client to close.
    told: bool,
}

impl<S> Watched<S> {
    /// Watches `inner`, counting its exchanges as `peers` into `metrics`, under the
    /// destination's Telemetry `policy`; ended as said above once `shutdown`.
    pub fn new(
        inner: S,
        (metrics, policy, peers): (Arc<Metrics>, Arc<TelemetryPolicy>, SharedPeers),
        shutdown: CancellationToken,
    ) -> Self {
        let drain = Drain {
            signal: Box::pin(shutdown.clone().cancelled_owned()),
            token: shutdown,
            registered: None,
            grace: None,
            out: Vec::new(),
            written: 0,
            told: false,
        };
        Self {
            inner,
            follow: Follow::default(),
            report: Report { metrics, policy, peers, answering: None, last: SeriesMemo::default() },
            drain,
        }
    }

    /// Whether the agent drains; the first time it is seen, the grace starts.
    fn drained(&mut self, cx: &mut Context<'_>) -> bool {
        let drain = &mut self.drain;
        if drain.grace.is_some() {
            return true;
        }
        let mut drained = drain.token.is_cancelled();
        if !drained && !drain.registered.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            drained = drain.signal.as_mut().poll(cx).is_ready();
            drain.registered = Some(cx.waker().clone());
        }
        if drained {
            drain.grace = Some(Box::pin(tokio::time::sleep(CLIENT_DRAIN_GRACE)));
        }
        drained
    }

    /// Whether the client's side reads as ended now: drained, between exchanges, and
    /// the client told to close or silent for the grace.
    fn closes_now(&mut self, cx: &mut Context<'_>) -> bool {
        if !self.drained(cx) || !self.follow.between_exchanges() || self.follow.exchanges == 0 {
            return false;
        }
        self.drain.told || self.drain.grace.as_mut().is_some_and(|g| g.as_mut().poll(cx).is_ready())
    }
}

impl<S: AsyncWrite + Unpin> Watched<S> {
    /// Writes what the drain added, before anything else.
    fn write_added(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.drain.written < self.drain.out.len() {
            match Pin::new(&mut self.inner).poll_write(cx, &self.drain.out[self.drain.written..]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => self.drain.written += n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        self.drain.out = Vec::new();
        self.drain.written = 0;
        Poll::Ready(Ok(()))
    }

    /// After a response's bytes passed: if that is where to close, the reading side
    /// (the same task, waiting on the client) is woken to see it.
    fn after_response(&mut self, cx: &mut Context<'_>) {
        if self.closes_now(cx) {
            cx.waker().wake_by_ref();
        }
    }

    fn responses(&mut self, written: &[u8]) {
        if !self.follow.lost {
            let report = &mut self.report;
            self.follow.feed(Dir::Responses, written, &mut |e| report.record(e));
        }
    }
}

impl<S> Drop for Watched<S> {
    fn drop(&mut self) {
        let report = &mut self.report;
        self.follow.abandon(&mut |e| report.record(e));
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.closes_now(cx) {
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        let read = &buf.filled()[before..];
        if !read.is_empty() && !this.follow.lost {
            let report = &mut this.report;
            this.follow.feed(Dir::Requests, read, &mut |e| report.record(e));
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        std::task::ready!(this.write_added(cx))?;
        if !this.drain.told
            && this.follow.at_response_start()
            && this.drained(cx)
            && let Some(line) = buf.iter().position(|&b| b == b'\n').map(|end| &buf[..=end])
            && is_final_status_line(line)
        {
            let added = [line, b"connection: close\r\n"].concat();
            this.responses(&added);
            (this.drain.out, this.drain.told) = (added, true);
            // The bytes are taken: what the socket does not take now goes first next time.
            if let Poll::Ready(Err(e)) = this.write_added(cx) {
                return Poll::Ready(Err(e));
            }
            return Poll::Ready(Ok(line.len()));
        }
        let polled = Pin::new(&mut this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = polled {
            this.responses(&buf[..n]);
            this.after_response(cx);
        }
        polled
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        // Once drained, a response head may get its header: through `poll_write`.
        if this.drain.grace.is_some() || !this.drain.out.is_empty() || this.drain.token.is_cancelled() {
            let first = bufs.iter().find(|b| !b.is_empty()).map_or(&[][..], |b| &b[..]);
            return Pin::new(this).poll_write(cx, first);
        }
        let polled = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(mut n)) = polled {
            for b in bufs {
                if n == 0 || this.follow.lost {
                    break;
                }
                let taken = n.min(b.len());
                this.responses(&b[..taken]);
                n -= taken;
            }
            this.after_response(cx);
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        std::task::ready!(this.write_added(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    /// The application's end: a response it delimits is complete.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        std::task::ready!(this.write_added(cx))?;
        let report = &mut this.report;
        this.follow.responses_end(&mut |e| report.record(e));
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

/// Whether `line` is the status line of a final response that may close the
/// connection: not informational, not a protocol switch (`HTTP/1.x 1xx`).
fn is_final_status_line(line: &[u8]) -> bool {
    line.len() >= 13
        && line.starts_with(b"HTTP/1.")
        && line[8] == b' '
        && line[9..12].iter().all(u8::is_ascii_digit)
        && line[9] != b'1'
}

/// Counts what the follower saw, as the served path does: a request when its
/// response's head passes (a gRPC one when its status is known), its duration and
/// sizes when the response ends.
struct Report {
    metrics: Arc<Metrics>,
    policy: Arc<TelemetryPolicy>,
    peers: SharedPeers,
    /// The response passing now: its series, once known (a gRPC answer's status may
    /// come in its trailers), and its status until then.
    answering: Option<Answering>,
    /// The series the last answer went to: most answers of a connection land in the
    /// same one.
    last: SeriesMemo,
}

enum Answering {
    Counted(RequestSeries),
    /// A gRPC answer whose status is still to come.
    Waiting {
        status: u16,
    },
}

impl Report {
    /// The series of an answer: its status, gRPC or not, its gRPC status.
    fn series(&self, (status, grpc, grpc_status): (u16, bool, Option<u32>)) -> RequestSeries {
        let labels = RequestLabels {
            peers: self.peers.clone(),
            request_protocol: if grpc { "grpc" } else { "http" },
            response_code: status,
            response_flags: "-",
            grpc_response_status: grpc_status,
        };
        self.last.series(&self.metrics, &labels, &self.policy)
    }

    fn record(&mut self, event: Event) {
        match event {
            Event::Answered { status, grpc, grpc_status } => {
                self.answering = Some(if grpc && grpc_status.is_none() {
                    Answering::Waiting { status }
                } else {
                    let series = self.series((status, grpc, grpc_status));
                    series.request();
                    Answering::Counted(series)
                });
            }
            Event::Done { took, request_bytes, response_bytes, trailer_grpc_status } => {
                let series = match self.answering.take() {
                    None => return,
                    Some(Answering::Counted(series)) => series,
                    Some(Answering::Waiting { status }) => {
                        let series = self.series((status, true, trailer_grpc_status));
                        series.request();
                        series
                    }
                };
                series.done(took, (Some(request_bytes), response_bytes));
            }
        }
    }
}

/// What the follower saw of an exchange.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Event {
    /// A final response's head passed.
    Answered {
        /// Its status.
        status: u16,
        /// Whether it is gRPC (`content-type: application/grpc...`).
        grpc: bool,
        /// The gRPC status in its head.
        grpc_status: Option<u32>,
    },
    /// That response's last byte passed (or the connection ended, or the follower lost
    /// track, before it did).
    Done {
        /// From the request's head to the response's end.
        took: Duration,
        /// The request's body bytes read by then.
        request_bytes: u64,
        /// The response's body bytes.
        response_bytes: u64,
        /// The gRPC status in the response's trailers.
        trailer_grpc_status: Option<u32>,
    },
}

/// Which way bytes go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dir {
    /// Client to application.
    Requests,
    /// Application to client.
    Responses,
}

/// Both directions' framing, and the requests waiting for their responses.
#[derive(Debug, Default)]
pub(crate) struct Follow {
    requests: Side,
    responses: Side,
    pending: VecDeque<Pending>,
    /// Given up: nothing more is counted on this connection.
    pub(crate) lost: bool,
    /// Responses that have ended.
    pub(super) exchanges: u64,
}

/// A request whose response has not ended.
#[derive(Debug)]
struct Pending {
    arrived: Instant,
    /// Its response has no body (HEAD).
    head_only: bool,
    /// A `CONNECT`: a 2xx response turns the connection into a tunnel.
    connect: bool,
    /// Its body's bytes, once it has ended (before, they are its side's count).
    body: Option<u64>,
    /// Its response's head has passed.
    answered: bool,
}

/// One direction's parser.
#[derive(Debug, Default)]
struct Side {
    stage: Stage,
    /// A head (or a trailer section) that came in more than one piece, so far.
    held: Vec<u8>,
    /// The current message's body bytes so far.
    body: u64,
    /// The gRPC status found in the current message's trailers.
    trailer_grpc_status: Option<u32>,
    /// How the head being read ends so far.
    head_end: LineEnd,
}

/// Where a head's last bytes leave its end: a head ends at an empty line.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum LineEnd {
    /// Within a line.
    #[default]
    Within,
    /// Just past a line feed.
    Lf,
    /// Past a line feed and a carriage return.
    LfCr,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Between messages, or within a head.
    #[default]
    Head,
    /// This many bytes of a sized body are still to come.
    Sized(u64),
    /// Within a chunked body.
    Chunk(Chunk),
    /// A response body delimited by the connection's end.
    UntilClose,
    /// Not followed any more: the requests after a protocol switch was asked for.
    Off,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// A chunk-size line: the size so far, its digits, whether past them (extensions).
    Size { size: u64, digits: u8, past: bool },
    /// This many data bytes still to come.
    Data(u64),
    /// The line end after a chunk's data.
    DataEnd,
    /// The trailer section; whether the line being read is empty so far.
    Trailers { line_empty: bool },
}

/// How a message's body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Empty,
    Sized(u64),
    Chunked,
    UntilClose,
}

/// What a request's head says that matters for following the exchange.
#[derive(Debug)]
struct RequestHead {
    framing: Framing,
    head_only: bool,
    connect: bool,
    upgrade: bool,
}

/// What a response's head says.
#[derive(Debug)]
struct ResponseHead {
    status: u16,
    /// `Transfer-Encoding`/`Content-Length` as sent; the request decides if it counts.
    framing: Option<Framing>,
    grpc: bool,
    grpc_status: Option<u32>,
}

#[derive(Debug)]
enum Head {
    Request(RequestHead),
    Response(ResponseHead),
}

/// Not followed: the bytes are not HTTP/1.1 the follower understands.
#[derive(Debug)]
struct Unfollowable;

/// What one step of a side's parser did.
enum Step {
    /// Used this many bytes; the message goes on.
    Used(usize),
    /// Used this many bytes, which ended the message.
    Ended(usize),
    /// Used this many bytes, which ended a head.
    Head(usize, Head),
    /// Lost track.
    Lost,
}

impl Follow {
    /// Follows `data`, the next bytes going `dir`; reports exchanges to `out`.
    pub(crate) fn feed(&mut self, dir: Dir, mut data: &[u8], out: &mut impl FnMut(Event)) {
        while !data.is_empty() && !self.lost {
            let side = match dir {
                Dir::Requests => &mut self.requests,
                Dir::Responses => &mut self.responses,
            };
            let used = match side.step(dir, data) {
                Step::Used(n) => n,
                Step::Ended(n) => {
                    self.message_ended(dir, out);
                    n
                }
                Step::Head(n, head) => {
                    self.head(head, out);
                    n
                }
                Step::Lost => {
                    self.lose(out);
                    return;
                }
            };
            data = &data[used..];
        }
    }

    /// Whether the connection is between exchanges: every request answered, and
    /// nothing of another read.
    pub(super) fn between_exchanges(&self) -> bool {
        !self.lost
            && self.pending.is_empty()
            && self.requests.stage == Stage::Head
            && self.requests.held.is_empty()
            && self.requests.head_end == LineEnd::Within
    }

    /// Requests read whose responses have not ended.
    pub(crate) fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Head and trailer bytes held, both ways.
    pub(crate) fn held(&self) -> usize {
        self.requests.held.len() + self.responses.held.len()
    }

    /// Whether the next response bytes begin a response to a request read.
    pub(super) fn at_response_start(&self) -> bool {
        !self.lost
            && !self.pending.is_empty()
            && self.responses.stage == Stage::Head
            && self.responses.held.is_empty()
            && self.responses.head_end == LineEnd::Within
    }

    /// The application's end: a response delimited by it ends; nothing follows.
    pub(crate) fn responses_end(&mut self, out: &mut impl FnMut(Event)) {
        if self.lost {
            return;
        }
        if self.responses.stage == Stage::UntilClose {
            self.message_ended(Dir::Responses, out);
        }
        self.lose(out);
    }

    /// The connection is gone: a response under way ends with what passed of it.
    pub(crate) fn abandon(&mut self, out: &mut impl FnMut(Event)) {
        self.lose(out);
    }

    /// Stops following, ending the response under way (if any) where it is.
    fn lose(&mut self, out: &mut impl FnMut(Event)) {
        if !self.lost && self.pending.front().is_some_and(|p| p.answered) {
            self.response_done(out);
        }
        self.lost = true;
        self.pending.clear();
        self.requests.held = Vec::new();
        self.responses.held = Vec::new();
    }

    fn head(&mut self, head: Head, out: &mut impl FnMut(Event)) {
        match head {
            Head::Request(r) => {
                if self.pending.len() >= MAX_PENDING {
                    return self.lose(out);
                }
                let upgrading = r.connect || r.upgrade;
                self.pending.push_back(Pending {
                    arrived: Instant::now(),
                    head_only: r.head_only,
                    connect: r.connect,
                    body: upgrading.then_some(0),
                    answered: false,
                });
                self.requests.body = 0;
                // What follows a protocol switch's request is not HTTP if it is
                // accepted, so it is not read (its response is still counted).
                self.requests.stage = match r.framing {
                    _ if upgrading => Stage::Off,
                    Framing::Empty => {
                        self.message_ended(Dir::Requests, out);
                        Stage::Head
                    }
                    Framing::Sized(n) => Stage::Sized(n),
                    Framing::Chunked => Stage::Chunk(Chunk::Size { size: 0, digits: 0, past: false }),
                    Framing::UntilClose => return self.lose(out),
                };
            }
            Head::Response(r) => {
                let Some(request) = self.pending.front_mut() else {
                    // A response to nothing: not an exchange the follower understands.
                    return self.lose(out);
                };
                if (100..200).contains(&r.status) && r.status != 101 {
                    // Informational (100 Continue, 103 Early Hints): the final one follows.
                    return;
                }
                request.answered = true;
                let switched = r.status == 101 || (request.connect && (200..300).contains(&r.status));
                let framing = if switched || request.head_only || r.status == 204 || r.status == 304 {
                    Framing::Empty
                } else {
                    r.framing.unwrap_or(Framing::UntilClose)
                };
                self.responses.body = 0;
                self.responses.trailer_grpc_status = None;
                out(Event::Answered { status: r.status, grpc: r.grpc, grpc_status: r.grpc_status });
                match framing {
                    Framing::Empty => {
                        self.message_ended(Dir::Responses, out);
                        if switched {
                            self.lose(out);
                        }
                    }
                    Framing::Sized(n) => self.responses.stage = Stage::Sized(n),
                    Framing::Chunked => {
                        self.responses.stage = Stage::Chunk(Chunk::Size { size: 0, digits: 0, past: false })
                    }
                    Framing::UntilClose => self.responses.stage = Stage::UntilClose,
                }
            }
        }
    }

    fn message_ended(&mut self, dir: Dir, out: &mut impl FnMut(Event)) {
        match dir {
            Dir::Requests => {
                self.requests.stage = Stage::Head;
                // The request read last is the newest pending one, unless its
                // response has already ended (an early answer).
                if let Some(p) = self.pending.back_mut().filter(|p| p.body.is_none()) {
                    p.body = Some(self.requests.body);
                }
            }
            Dir::Responses => {
                self.responses.stage = Stage::Head;
                self.response_done(out);
                // After a protocol switch was asked for and refused, the requests
                // side is not followed: nothing further can be.
                if self.requests.stage == Stage::Off && self.pending.is_empty() {
                    self.lose(out);
                }
            }
        }
    }

    fn response_done(&mut self, out: &mut impl FnMut(Event)) {
        let Some(request) = self.pending.pop_front() else { return };
        self.exchanges += 1;
        let request_bytes = request.body.unwrap_or(self.requests.body);
        out(Event::Done {
            took: request.arrived.elapsed(),
            request_bytes,
            response_bytes: self.responses.body,
            trailer_grpc_status: self.responses.trailer_grpc_status.take(),
        });
    }
}

impl Side {
    /// Parses what it can of `data` (not empty) in the current stage.
    fn step(&mut self, dir: Dir, data: &[u8]) -> Step {
        match &mut self.stage {
            Stage::Head => self.head(dir, data),
            Stage::Sized(left) => {
                let n = usize::try_from(*left).unwrap_or(usize::MAX).min(data.len());
                *left -= n as u64;
                self.body += n as u64;
                if *left == 0 { Step::Ended(n) } else { Step::Used(n) }
            }
            Stage::Chunk(chunk) => {
                let mut chunk = *chunk;
                let step = self.chunked(&mut chunk, dir, data);
                if let Step::Used(_) = step {
                    self.stage = Stage::Chunk(chunk);
                }
                step
            }
            Stage::UntilClose => {
                self.body += data.len() as u64;
                Step::Used(data.len())
            }
            Stage::Off => Step::Used(data.len()),
        }
    }

    /// A head: its end found by scanning each byte once, then parsed where it lies
    /// when it came whole, else gathered first (never parsed again per piece: a head
    /// sent a byte at a time costs what it costs whole).
    fn head(&mut self, dir: Dir, data: &[u8]) -> Step {
        if self.held.is_empty() && self.head_end == LineEnd::Within {
            // Empty lines between messages are ignored (RFC 9112, 2.2), not held.
            let empty = data.iter().take_while(|&&b| b == b'\r' || b == b'\n').count();
            if empty > 0 {
                return Step::Used(empty);
            }
        }
        let Some(end) = self.find_head_end(data) else {
            if self.held.len() + data.len() > H1_MAX_BUF {
                return Step::Lost;
            }
            self.held.extend_from_slice(data);
            return Step::Used(data.len());
        };
        self.head_end = LineEnd::Within;
        if self.held.len() + end > H1_MAX_BUF {
            return Step::Lost;
        }
        let parsed = if self.held.is_empty() {
            parse_head(dir, &data[..end])
        } else {
            self.held.extend_from_slice(&data[..end]);
            let parsed = parse_head(dir, &self.held);
            self.clear_held();
            parsed
        };
        match parsed {
            Ok(Some(head)) => Step::Head(end, head),
            _ => Step::Lost,
        }
    }

    /// Where in `data` the head ends (just past its empty line), carrying what the
    /// bytes before it left off across pieces.
    fn find_head_end(&mut self, data: &[u8]) -> Option<usize> {
        for (i, &b) in data.iter().enumerate() {
            self.head_end = match (b, self.head_end) {
                (b'\n', LineEnd::Lf | LineEnd::LfCr) => return Some(i + 1),
                (b'\n', _) => LineEnd::Lf,
                (b'\r', LineEnd::Lf) => LineEnd::LfCr,
                (b'\r', end) => end,
                _ => LineEnd::Within,
            };
        }
        None
    }

    fn clear_held(&mut self) {
        if self.held.capacity() > KEPT_HEAD_BUFFER {
            self.held = Vec::new();
        } else {
            self.held.clear();
        }
    }

    /// One step within a chunked body; `chunk` is where it is, updated.
    fn chunked(&mut self, chunk: &mut Chunk, dir: Dir, data: &[u8]) -> Step {
        match chunk {
            Chunk::Data(left) => {
                let n = usize::try_from(*left).unwrap_or(usize::MAX).min(data.len());
                *left -= n as u64;
                self.body += n as u64;
                if *left == 0 {
                    *chunk = Chunk::DataEnd;
                }
                Step::Used(n)
            }
            Chunk::DataEnd => match data[0] {
                b'\r' => Step::Used(1),
                b'\n' => {
                    *chunk = Chunk::Size { size: 0, digits: 0, past: false };
                    Step::Used(1)
                }
                _ => Step::Lost,
            },
            Chunk::Size { size, digits, past } => {
                for (i, &b) in data.iter().enumerate() {
                    match b {
                        b'\n' if *digits == 0 => return Step::Lost,
                        b'\n' if *size == 0 => {
                            *chunk = Chunk::Trailers { line_empty: true };
                            return Step::Used(i + 1);
                        }
                        b'\n' => {
                            *chunk = Chunk::Data(*size);
                            return Step::Used(i + 1);
                        }
                        _ if *past => {}
                        b';' | b' ' | b'\t' | b'\r' => *past = true,
                        _ => {
                            let Some(d) = (b as char).to_digit(16) else { return Step::Lost };
                            // Sixteen hex digits hold any u64; more is not a size.
                            if *digits == 16 {
                                return Step::Lost;
                            }
                            *size = *size * 16 + u64::from(d);
                            *digits += 1;
                        }
                    }
                }
                Step::Used(data.len())
            }
            Chunk::Trailers { line_empty } => {
                for (i, &b) in data.iter().enumerate() {
                    if dir == Dir::Responses {
                        if self.held.len() >= H1_MAX_BUF {
                            return Step::Lost;
                        }
                        self.held.push(b);
                    }
                    match b {
                        b'\n' if *line_empty => {
                            self.trailer_grpc_status = grpc_in_trailers(&self.held);
                            self.clear_held();
                            return Step::Ended(i + 1);
                        }
                        b'\n' => *line_empty = true,
                        b'\r' => {}
                        _ => *line_empty = false,
                    }
                }
                Step::Used(data.len())
            }
        }
    }
}

/// Parses `bytes`, a head up to and including its empty line: what it says (None if
/// the parser finds it incomplete all the same).
fn parse_head(dir: Dir, bytes: &[u8]) -> Result<Option<Head>, Unfollowable> {
    let mut headers = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let config = httparse::ParserConfig::default();
    match dir {
        Dir::Requests => {
            let mut req = httparse::Request::new(&mut []);
            match config.parse_request_with_uninit_headers(&mut req, bytes, &mut headers) {
                Ok(httparse::Status::Complete(_)) => {
                    let method = req.method.unwrap_or_default();
                    let head = RequestHead {
                        framing: framing(req.headers)?.unwrap_or(Framing::Empty),
                        head_only: method == "HEAD",
                        connect: method == "CONNECT",
                        upgrade: req.headers.iter().any(|h| h.name.eq_ignore_ascii_case("upgrade")),
                    };
                    // A request whose body the connection's end would delimit is not
                    // HTTP/1.1 (RFC 9112, 6.3).
                    if head.framing == Framing::UntilClose {
                        return Err(Unfollowable);
                    }
                    Ok(Some(Head::Request(head)))
                }
                Ok(httparse::Status::Partial) => Ok(None),
                Err(_) => Err(Unfollowable),
            }
        }
        Dir::Responses => {
            let mut res = httparse::Response::new(&mut []);
            match config.parse_response_with_uninit_headers(&mut res, bytes, &mut headers) {
                Ok(httparse::Status::Complete(_)) => {
                    let header = |name: &str| res.headers.iter().find(|h| h.name.eq_ignore_ascii_case(name));
                    let head = ResponseHead {
                        status: res.code.unwrap_or_default(),
                        framing: framing(res.headers)?,
                        grpc: header("content-type").is_some_and(|h| h.value.starts_with(b"application/grpc")),
                        grpc_status: header("grpc-status").and_then(|h| grpc_code(h.value)),
                    };
                    Ok(Some(Head::Response(head)))
                }
                Ok(httparse::Status::Partial) => Ok(None),
                Err(_) => Err(Unfollowable),
            }
        }
    }
}

/// A message's framing by its headers (RFC 9112, 6.3): chunked when that is its last
/// transfer coding, delimited by the connection's end for any other coding, else its
/// `Content-Length` (every value the same), else None.
fn framing(headers: &[httparse::Header<'_>]) -> Result<Option<Framing>, Unfollowable> {
    let mut last_coding = None;
    let mut length = None;
    for h in headers {
        if h.name.eq_ignore_ascii_case("transfer-encoding") {
            let value = std::str::from_utf8(h.value).map_err(|_| Unfollowable)?;
            if let Some(coding) = value.rsplit(',').map(str::trim).find(|c| !c.is_empty()) {
                last_coding = Some(coding.eq_ignore_ascii_case("chunked"));
            }
        } else if h.name.eq_ignore_ascii_case("content-length") {
            let value = std::str::from_utf8(h.value).map_err(|_| Unfollowable)?;
            for v in value.split(',') {
                let v = v.trim();
                if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(Unfollowable);
                }
                let n: u64 = v.parse().map_err(|_| Unfollowable)?;
                if length.is_some_and(|l| l != n) {
                    return Err(Unfollowable);
                }
                length = Some(n);
            }
        }
    }
    Ok(match (last_coding, length) {
        (Some(true), _) => Some(Framing::Chunked),
        (Some(false), _) => Some(Framing::UntilClose),
        (None, Some(0)) => Some(Framing::Empty),
        (None, Some(n)) => Some(Framing::Sized(n)),
        (None, None) => None,
    })
}

/// The gRPC status in a trailer section (its lines, ending with the empty one).
fn grpc_in_trailers(section: &[u8]) -> Option<u32> {
    let mut headers = [httparse::EMPTY_HEADER; 16];
    match httparse::parse_headers(section, &mut headers) {
        Ok(httparse::Status::Complete((_, headers))) => {
            headers.iter().find(|h| h.name.eq_ignore_ascii_case("grpc-status")).and_then(|h| grpc_code(h.value))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests;

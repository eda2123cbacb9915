//! The agent's side of a connection the kernel splices: it watches the two sockets'
//! ends, keeps the kernel's allowance moving, writes on what the kernel held back for
//! a slow peer, and passes each half-close on once the bytes before it are through.

use std::task::Poll;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::dataplane::splice::{self, Joined};

/// How often the bytes of a kernel-spliced connection are read into its metrics (and
/// its idleness checked).
pub const KERNEL_PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// Watches a connection the kernel splices until both sides have closed (each
/// half-close passed on), one is reset, `stop` is cancelled, or nothing moved for
/// `idle`. `progress` gets the bytes moved since its last call (client to server,
/// server to client).
pub(super) async fn watch_kernel_splice(
    joined: &Joined,
    sockets: [&TcpStream; 2],
    idle: Duration,
    stop: Option<&CancellationToken>,
    mut progress: impl FnMut([u64; 2]),
) -> std::io::Result<()> {
    let mut closed = [false; 2];
    let mut reported = [0u64; 2];
    let mut last_move = Instant::now();
    let mut report = |reported: &mut [u64; 2]| {
        let now = joined.moved();
        let delta = [now[0].saturating_sub(reported[0]), now[1].saturating_sub(reported[1])];
        *reported = now;
        progress(delta);
        delta != [0, 0]
    };
    let mut tick = tokio::time::interval_at(Instant::now() + KERNEL_PROGRESS_EVERY, KERNEL_PROGRESS_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Pinned here, polled in place: the watch is what a kernel-spliced connection holds
    // for its whole life, so it keeps no futures of its own (no `select!` over them).
    let mut stopped = std::pin::pin!(stop.map(CancellationToken::cancelled));
    // The kernel's allowance is renewed as often as the connection needs: about a
    // quarter of the window used between renewals.
    let mut renew_every = RENEW_FIRST;
    let mut renew = std::pin::pin!(tokio::time::sleep(renew_every));
    let mut taken_at_renewal = [0u64; 2];
    let outcome = loop {
        if closed == [true, true] {
            break Ok(());
        }
        let woken = std::future::poll_fn(|cx| {
            if super::poll_stopped(stopped.as_mut(), cx).is_ready() {
                return Poll::Ready(Ok(Wake::Stopped));
            }
            if renew.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Ok(Wake::Renew));
            }
            if tick.poll_tick(cx).is_ready() {
                return Poll::Ready(Ok(Wake::Tick));
            }
            for side in [0, 1] {
                if !closed[side]
                    && let Poll::Ready(r) = sockets[side].poll_read_ready(cx)
                {
                    return Poll::Ready(r.map(|()| Wake::Readable(side)));
                }
            }
            Poll::Pending
        })
        .await;
        let from = match woken {
            Err(e) => break Err(e),
            Ok(Wake::Stopped) => break Ok(()),
            Ok(Wake::Renew) => {
                let mut used = 0;
                for from in [0, 1] {
                    if let Ok(taken) = joined.renew_allowance(from, std::os::fd::AsFd::as_fd(sockets[1 - from])) {
                        used = used.max(taken.saturating_sub(taken_at_renewal[from]));
                        taken_at_renewal[from] = taken;
                    }
                }
                renew_every = next_renewal(renew_every, used);
                renew.as_mut().reset(Instant::now() + renew_every);
                continue;
            }
            Ok(Wake::Tick) => {
                if report(&mut reported) {
                    last_move = Instant::now();
                } else if last_move.elapsed() >= idle {
                    break Err(std::io::Error::new(std::io::ErrorKind::TimedOut, format!("idle for {idle:?}")));
                }
                continue;
            }
            Ok(Wake::Readable(side)) => side,
        };
        let (socket, other) = (sockets[from], sockets[1 - from]);
        // Woken by bytes the kernel held back (the other side reads slower than this
        // one sends), by the end of the stream (a read of none), or for nothing: what
        // is held is written on here.
        // Boxed, as below: rare and short, not worth a place in what the connection
        // holds for its life (like the buffer `forward_held` takes per wake-up).
        let forwarded = tokio::select! {
            r = Box::pin(tokio::time::timeout(idle, forward_held(joined, from, socket, other))) => r,
            () = until_stopped(stopped.as_mut()) => break Ok(()),
        };
        let at_end = match forwarded {
            Ok(Ok(at_end)) => at_end,
            // A reset, or the other side gone.
            Ok(Err(e)) => break Err(e),
            Err(_) => break Err(std::io::Error::new(std::io::ErrorKind::TimedOut, format!("stalled for {idle:?}"))),
        };
        if !at_end {
            continue;
        }
        if let Ok(Some(e)) = socket.take_error() {
            break Err(e);
        }
        // A half-close: passed on once everything before it is in the other socket.
        let finished = tokio::select! {
            r = Box::pin(finish_direction(joined, from, socket, other, idle)) => r,
            () = until_stopped(stopped.as_mut()) => break Ok(()),
        };
        if let Err(e) = finished {
            break Err(e);
        }
        let _ = socket2::SockRef::from(other).shutdown(std::net::Shutdown::Write);
        closed[from] = true;
    };
    report(&mut reported);
    outcome
}

/// What woke the watch of a kernel-spliced connection.
enum Wake {
    Stopped,
    Renew,
    Tick,
    Readable(usize),
}

/// Completes when `stopped` (the connection's stop signal, if it has one) does.
fn until_stopped<'a, F: Future<Output = ()>>(
    mut stopped: std::pin::Pin<&'a mut Option<F>>,
) -> impl Future<Output = ()> + 'a {
    std::future::poll_fn(move |cx| super::poll_stopped(stopped.as_mut(), cx))
}

/// The first renewal of a kernel splice's allowance: soon, so a bulk transfer does not
/// run out of its first window before the agent has looked.
const RENEW_FIRST: Duration = Duration::from_millis(1);
/// The longest between two renewals (a quiet connection).
const RENEW_LONGEST: Duration = Duration::from_secs(1);

/// The time to the next renewal of an allowance, after `used` bytes were taken in
/// `last`: a quarter of the window per period, twice as long when nothing moved.
fn next_renewal(last: Duration, used: u64) -> Duration {
    if used == 0 {
        return (last * 2).min(RENEW_LONGEST);
    }
    let aim = splice::WINDOW as f64 / 4.0;
    last.mul_f64(aim / used as f64).clamp(RENEW_FIRST, RENEW_LONGEST)
}

/// How much of what the kernel held back the agent reads at a time.
const HELD_CHUNK: usize = 16 * 1024;

/// Writes on what the kernel held back on `socket` (side `from`) to `other`, once
/// every byte the kernel took before it is in `other`; returns true at the end of the
/// stream.
async fn forward_held(joined: &Joined, from: usize, socket: &TcpStream, other: &TcpStream) -> std::io::Result<bool> {
    use std::os::fd::AsFd as _;
    // Allocated per wake-up: the kernel holds bytes back only for a peer slower than
    // its client, so a connection that keeps up never allocates here.
    let mut buf = vec![0u8; HELD_CHUNK];
    loop {
        let n = match socket.try_read(&mut buf) {
            Ok(0) => return Ok(true),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) => return Err(e),
        };
        let mut backoff = Backoff::default();
        while !joined.kernel_caught_up(from, other.as_fd())? {
            backoff.wait().await;
        }
        let mut rest = &buf[..n];
        while !rest.is_empty() {
            other.writable().await?;
            match other.try_write(rest) {
                Ok(written) => rest = &rest[written..],
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        joined.copied(from, n as u64, other.as_fd())?;
    }
}

/// Waits until every byte side `from` received is in `other` (the FIN wakes the agent
/// before the kernel has taken the bytes that came with it, and the kernel hands bytes
/// on from a work queue), writing on what was held back, for at most `idle`.
async fn finish_direction(
    joined: &Joined,
    from: usize,
    socket: &TcpStream,
    other: &TcpStream,
    idle: Duration,
) -> std::io::Result<()> {
    use std::os::fd::AsFd as _;
    let mut backoff = Backoff::default();
    let give_up = Instant::now() + idle;
    loop {
        forward_held(joined, from, socket, other).await?;
        if joined.handed_on((from, socket.as_fd()), other.as_fd())? {
            return Ok(());
        }
        if Instant::now() >= give_up {
            tracing::debug!("kernel splice: bytes not handed on before the close; closing anyway");
            return Ok(());
        }
        backoff.wait().await;
    }
}

/// The pauses between looks at what the kernel's work queue has done, which has no
/// event to wait on: none for the first [`Backoff::QUICK_LOOKS`] (it usually finishes
/// within microseconds, and a timer is a millisecond at best), then sleeps from 1 ms
/// doubling to 20 ms.
struct Backoff {
    looks: u32,
    pause: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self { looks: 0, pause: Duration::from_millis(1) }
    }
}

impl Backoff {
    /// About 100 µs of looking (each look is a few syscalls) before the first sleep.
    const QUICK_LOOKS: u32 = 16;

    async fn wait(&mut self) {
        if self.looks < Self::QUICK_LOOKS {
            self.looks += 1;
            tokio::task::yield_now().await;
            return;
        }
        tokio::time::sleep(self.pause).await;
        self.pause = (self.pause * 2).min(Duration::from_millis(20));
    }
}

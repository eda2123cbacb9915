//! Writes of an HBONE connection gathered into one TLS record and one syscall per
//! scheduler round.
//!
//! The HTTP/2 connection task writes and flushes what its streams have ready each time
//! it is woken. Under load it is woken once per stream that sent, so every small
//! request or response became its own TLS record and its own `writev` on the tunnel
//! socket; on veth the sender's syscall also runs the receiving namespace's stack, which
//! made those writes the largest cost of a proxied request (docs/benchmarks.md, "Why
//! cross-node is not faster still"). [`Coalesced`] sits between HTTP/2 and TLS: writes
//! land in a buffer, and the first flush of a small buffer yields the task once (it
//! wakes itself and returns `Pending`) so that streams made ready meanwhile add their
//! frames; the next flush writes everything as one record. A buffer of a full record or
//! more is written at once, and a large write (a bulk transfer's frames) goes on at
//! once and uncopied, with what is held in front of it in the same `writev`.
//!
//! The wait pays only when other streams are busy. A yield that gathered nothing worth
//! it (one stream, or a bulk transfer whose other direction sends only window updates)
//! makes the next flushes write at once, 2, 4, ... up to 64 of them, until a yield
//! gathers again; so a lone request or a bulk stream pays the wait about once in 64
//! flushes.
//!
//! What it costs: one more poll of the connection task per flush that waits
//! (microseconds, and only when the runtime has other ready tasks does the wait last
//! longer than that), and one copy of the small writes (TLS copies them anyway).

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A buffer this large is written at once: it fills a TLS record (2^14 bytes of
/// plaintext), so waiting would gather nothing the record could still take.
const FULL: usize = 16 * 1024;
/// Most bytes held: four full records, one `writev`.
const MOST: usize = 64 * 1024;
/// A write this large is not copied: it goes on at once, in one vectored write with
/// what is held. Copying it would cost more than the syscall it could save.
const LARGE: usize = 4 * 1024;
/// A buffer up to this size is kept for the next round; larger ones are freed so an
/// idle connection holds no more than this.
const KEPT: usize = 4 * 1024;
/// Most flushes written at once after yields that gathered nothing: 2^6.
const MOST_FUTILE: u32 = 6;
/// What a wait must gather to count: more than a window update or two (13 bytes
/// each), which is all the receiving end of a bulk transfer writes. Waiting for
/// those delays the updates the sender's window waits for, and saves no write worth
/// having.
const WORTH_WAITING: usize = 64;

/// `T` with its writes gathered until a flush that finds nothing more to gather.
#[derive(Debug)]
pub struct Coalesced<T> {
    inner: T,
    buf: Vec<u8>,
    /// How much of `buf` the inner writer has taken.
    written: usize,
    /// Set when the flush already yielded once for what `buf` holds: `buf`'s length
    /// then ([`WORTH_WAITING`] more after it means the wait gathered).
    yielded_at: Option<usize>,
    /// Yields in a row that gathered nothing (at most [`MOST_FUTILE`]).
    futile: u32,
    /// Flushes left that write at once without waiting.
    skips: u32,
}

impl<T> Coalesced<T> {
    /// Wraps `inner`.
    pub fn new(inner: T) -> Self {
        Self { inner, buf: Vec::new(), written: 0, yielded_at: None, futile: 0, skips: 0 }
    }
}

impl<T: AsyncWrite + Unpin> Coalesced<T> {
    /// Writes out all that `buf` holds.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.written < self.buf.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.buf[self.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        self.emptied();
        Poll::Ready(Ok(()))
    }

    /// Everything held has been written.
    fn emptied(&mut self) {
        self.written = 0;
        self.yielded_at = None;
        if self.buf.capacity() > KEPT {
            self.buf = Vec::new();
        } else {
            self.buf.clear();
        }
    }

    /// Hands `slices` (at least [`LARGE`] bytes) on uncopied, behind what is held, in
    /// one vectored write. The bytes of `slices` taken.
    fn poll_hand_on(&mut self, cx: &mut Context<'_>, slices: &[IoSlice<'_>]) -> Poll<io::Result<usize>> {
        loop {
            let held = &self.buf[self.written..];
            if held.is_empty() {
                return Pin::new(&mut self.inner).poll_write_vectored(cx, slices);
            }
            let mut parts = [IoSlice::new(&[]); 8];
            parts[0] = IoSlice::new(held);
            let count = 1 + slices.len().min(parts.len() - 1);
            parts[1..count].copy_from_slice(&slices[..count - 1]);
            let held = held.len();
            let n = ready!(Pin::new(&mut self.inner).poll_write_vectored(cx, &parts[..count]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            if n < held {
                self.written += n;
                continue;
            }
            self.emptied();
            if n > held {
                return Poll::Ready(Ok(n - held));
            }
        }
    }

    /// Takes `len` bytes of `slices` into the buffer, writing it out first when they
    /// would not fit; or hands them on uncopied when they are [`LARGE`]. The bytes
    /// taken.
    fn poll_take(&mut self, cx: &mut Context<'_>, slices: &[IoSlice<'_>], len: usize) -> Poll<io::Result<usize>> {
        if len >= LARGE {
            return self.poll_hand_on(cx, slices);
        }
        if self.buf.len() + len > MOST {
            ready!(self.poll_drain(cx))?;
        }
        let room = MOST - self.buf.len();
        let mut taken = 0;
        for slice in slices {
            let part = &slice[..slice.len().min(room - taken)];
            self.buf.extend_from_slice(part);
            taken += part.len();
            if taken == room {
                break;
            }
        }
        Poll::Ready(Ok(taken))
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Coalesced<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Coalesced<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        self.poll_take(cx, &[IoSlice::new(data)], data.len())
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        slices: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let len = slices.iter().map(|s| s.len()).sum();
        self.poll_take(cx, slices, len)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let held = self.buf.len() - self.written;
        if held > 0 {
            if held < FULL && self.yielded_at.is_none() {
                if self.skips == 0 {
                    // Waking itself puts the task at the back of its worker's queue:
                    // the tasks woken before it (streams with more to send) run first.
                    self.yielded_at = Some(self.buf.len());
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
                self.skips -= 1;
            }
            let waited = self.yielded_at.map(|len| self.buf.len() >= len + WORTH_WAITING);
            ready!(self.poll_drain(cx))?;
            match waited {
                Some(true) => self.futile = 0,
                Some(false) => {
                    self.futile = (self.futile + 1).min(MOST_FUTILE);
                    self.skips = 1 << self.futile;
                }
                None => {}
            }
        }
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_drain(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::Wake;

    /// Records each write it is given; takes at most `step` bytes per write.
    #[derive(Default)]
    struct Recorder {
        writes: Vec<Vec<u8>>,
        flushes: usize,
        shut: bool,
        step: Option<usize>,
    }

    impl AsyncWrite for Recorder {
        fn poll_write(mut self: Pin<&mut Self>, _: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
            let n = self.step.map_or(data.len(), |s| s.min(data.len()));
            self.writes.push(data[..n].to_vec());
            Poll::Ready(Ok(n))
        }
        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            slices: &[IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            let mut all: Vec<u8> = slices.iter().flat_map(|s| s.iter().copied()).collect();
            all.truncate(self.step.unwrap_or(all.len()));
            let n = all.len();
            self.writes.push(all);
            Poll::Ready(Ok(n))
        }
        fn poll_flush(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.flushes += 1;
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.shut = true;
            Poll::Ready(Ok(()))
        }
    }

    struct CountWakes(AtomicUsize);
    impl Wake for CountWakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
        fn wake_by_ref(self: &Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn write(c: &mut Coalesced<Recorder>, cx: &mut Context<'_>, data: &[u8]) -> usize {
        match Pin::new(c).poll_write(cx, data) {
            Poll::Ready(Ok(n)) => n,
            other => panic!("write: {other:?}"),
        }
    }

    #[test]
    fn small_writes_wait_one_yield_then_go_as_one() {
        let wakes = Arc::new(CountWakes(AtomicUsize::new(0)));
        let waker = std::task::Waker::from(wakes.clone());
        let mut cx = Context::from_waker(&waker);
        let mut c = Coalesced::new(Recorder::default());
        assert_eq!(write(&mut c, &mut cx, b"frame one "), 10);
        assert!(Pin::new(&mut c).poll_flush(&mut cx).is_pending(), "the first flush yields");
        assert_eq!(wakes.0.load(Ordering::Relaxed), 1, "and wakes its task so it is polled again");
        assert!(c.inner.writes.is_empty());
        // Frames made ready while the task waited join the same write.
        let two = [b'2'; WORTH_WAITING];
        write(&mut c, &mut cx, &two);
        assert!(Pin::new(&mut c).poll_flush(&mut cx).is_ready());
        assert_eq!(c.inner.writes, vec![[&b"frame one "[..], &two].concat()]);
        assert_eq!(c.inner.flushes, 1);
        // The wait gathered a frame: the next round yields again.
        write(&mut c, &mut cx, b"three");
        assert!(Pin::new(&mut c).poll_flush(&mut cx).is_pending());
        assert!(Pin::new(&mut c).poll_flush(&mut cx).is_ready());
        assert_eq!(c.inner.writes.len(), 2);
    }

    /// Flushes `c` to the end, counting the times it waited.
    fn flush_all(c: &mut Coalesced<Recorder>, cx: &mut Context<'_>) -> usize {
        let mut waits = 0;
        while Pin::new(&mut *c).poll_flush(cx).is_pending() {
            waits += 1;
        }
        waits
    }

    #[test]
    fn waits_that_gather_nothing_back_off_and_one_that_gathers_resumes() {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut c = Coalesced::new(Recorder::default());
        // A lone stream: each wait gathers nothing, so 2, then 4, ... flushes go at once.
        let mut waited = Vec::new();
        for _ in 0..200 {
            write(&mut c, &mut cx, b"lone");
            waited.push(flush_all(&mut c, &mut cx));
        }
        assert_eq!(c.inner.writes.len(), 200, "every flush still writes");
        let waits: Vec<usize> = waited.iter().enumerate().filter(|(_, w)| **w > 0).map(|(i, _)| i).collect();
        assert_eq!(&waits[..5], &[0, 3, 8, 17, 34], "waits spaced 2, 4, 8, 16 flushes apart");
        assert!(waits.windows(2).all(|w| w[1] - w[0] <= 65), "never more than 64 flushes without a wait");
        // A wait that gathers resets the backoff: the next flush waits again.
        while c.skips > 0 {
            write(&mut c, &mut cx, b"x");
            flush_all(&mut c, &mut cx);
        }
        write(&mut c, &mut cx, b"a");
        assert!(Pin::new(&mut c).poll_flush(&mut cx).is_pending());
        write(&mut c, &mut cx, &[b'b'; 26]);
        assert!(Pin::new(&mut c).poll_flush(&mut cx).is_ready());
        assert!(c.skips > 0, "two window updates are not worth a wait");
        while c.skips > 0 {
            write(&mut c, &mut cx, b"x");
            flush_all(&mut c, &mut cx);
        }
        write(&mut c, &mut cx, b"a");
        assert!(Pin::new(&mut c).poll_flush(&mut cx).is_pending());
        write(&mut c, &mut cx, &[b'b'; WORTH_WAITING]);
        assert!(Pin::new(&mut c).poll_flush(&mut cx).is_ready());
        write(&mut c, &mut cx, b"c");
        assert!(Pin::new(&mut c).poll_flush(&mut cx).is_pending(), "busy again: the wait is back");
    }

    #[test]
    fn a_flush_with_nothing_held_does_not_wait() {
        let mut c = Coalesced::new(Recorder::default());
        let mut cx = Context::from_waker(std::task::Waker::noop());
        assert!(Pin::new(&mut c).poll_flush(&mut cx).is_ready());
        assert_eq!(c.inner.flushes, 1);
    }

    #[test]
    fn a_full_record_goes_at_once() {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut c = Coalesced::new(Recorder::default());
        // Small writes that reach a record's size are written by the first flush.
        for _ in 0..FULL / 2048 {
            write(&mut c, &mut cx, &[7u8; 2048]);
        }
        assert!(c.inner.writes.is_empty());
        assert!(Pin::new(&mut c).poll_flush(&mut cx).is_ready());
        assert_eq!(c.inner.writes.len(), 1);
        assert_eq!(c.inner.writes[0].len(), FULL);
    }

    #[test]
    fn a_large_write_goes_on_uncopied_behind_what_is_held() {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut c = Coalesced::new(Recorder::default());
        let big = vec![7u8; LARGE];
        assert_eq!(write(&mut c, &mut cx, &big), LARGE);
        assert_eq!(c.inner.writes, vec![big.clone()], "nothing held: straight on");
        write(&mut c, &mut cx, b"window update");
        assert_eq!(write(&mut c, &mut cx, &big), LARGE);
        assert_eq!(c.inner.writes.len(), 2, "what was held and the large write in one write");
        assert_eq!(&c.inner.writes[1][..13], b"window update");
        assert_eq!(c.inner.writes[1].len(), 13 + LARGE);
        assert!(c.buf.is_empty());
        assert_eq!(flush_all(&mut c, &mut cx), 0, "nothing left to wait for");
        // An inner stream taking a few bytes at a time: the held bytes go first, in order.
        let mut c = Coalesced::new(Recorder { step: Some(5), ..Recorder::default() });
        write(&mut c, &mut cx, b"0123456789");
        let sent = write(&mut c, &mut cx, &big);
        assert_eq!(sent, 5, "the held bytes went in two writes, then five of the large one");
        flush_all(&mut c, &mut cx);
        let all = c.inner.writes.concat();
        assert_eq!(&all[..10], b"0123456789");
        assert_eq!(all.len(), 10 + sent, "every byte taken was written once");
    }

    #[test]
    fn the_buffer_is_bounded_and_order_kept() {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut c = Coalesced::new(Recorder::default());
        let mut sent = Vec::new();
        for i in 0..200u32 {
            let chunk = vec![(i % 251) as u8; 1000];
            let mut at = 0;
            while at < chunk.len() {
                at += write(&mut c, &mut cx, &chunk[at..]);
                assert!(c.buf.len() <= MOST);
            }
            sent.extend_from_slice(&chunk);
        }
        while Pin::new(&mut c).poll_flush(&mut cx).is_pending() {}
        assert_eq!(c.inner.writes.concat(), sent);
        assert!(c.inner.writes.len() <= sent.len() / MOST + 2, "{} writes", c.inner.writes.len());
        assert!(c.buf.capacity() <= KEPT, "the drained buffer is let go");
    }

    #[test]
    fn partial_writes_of_the_inner_stream_are_resumed() {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut c = Coalesced::new(Recorder { step: Some(3), ..Recorder::default() });
        write(&mut c, &mut cx, b"0123456789");
        while Pin::new(&mut c).poll_flush(&mut cx).is_pending() {}
        assert_eq!(c.inner.writes.concat(), b"0123456789");
        assert_eq!(c.inner.writes.len(), 4);
    }

    #[test]
    fn shutdown_writes_what_is_held_first() {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut c = Coalesced::new(Recorder::default());
        write(&mut c, &mut cx, b"last words");
        assert!(Pin::new(&mut c).poll_shutdown(&mut cx).is_ready());
        assert_eq!(c.inner.writes, vec![b"last words".to_vec()]);
        assert!(c.inner.shut);
    }

    #[test]
    fn vectored_writes_are_gathered_whole() {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut c = Coalesced::new(Recorder::default());
        let slices = [IoSlice::new(b"head"), IoSlice::new(b"payload")];
        let n = match Pin::new(&mut c).poll_write_vectored(&mut cx, &slices) {
            Poll::Ready(Ok(n)) => n,
            other => panic!("{other:?}"),
        };
        assert_eq!(n, 11);
        while Pin::new(&mut c).poll_flush(&mut cx).is_pending() {}
        assert_eq!(c.inner.writes, vec![b"headpayload".to_vec()]);
    }

    #[tokio::test]
    async fn a_duplex_pair_carries_every_byte() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (a, mut b) = tokio::io::duplex(1 << 20);
        let mut a = Coalesced::new(a);
        let writer = tokio::spawn(async move {
            for i in 0..1000u32 {
                a.write_all(&i.to_be_bytes()).await.unwrap();
                if i % 7 == 0 {
                    a.flush().await.unwrap();
                }
            }
            a.shutdown().await.unwrap();
        });
        let mut got = Vec::new();
        b.read_to_end(&mut got).await.unwrap();
        writer.await.unwrap();
        let want: Vec<u8> = (0..1000u32).flat_map(|i| i.to_be_bytes()).collect();
        assert_eq!(got, want);
    }
}

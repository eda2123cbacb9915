//! Copying both ways between two streams, as `tokio::io::copy_bidirectional` does, with
//! one difference: when writing to one side fails, what that side already sent is still
//! delivered to the other before the copy ends. An HBONE stream the server resets once
//! its answer is out (`RST_STREAM(NO_ERROR)` after a complete HTTP/1.0 response) fails
//! the next write or flush towards it; tokio's copy then returned at once and the client
//! lost the answer that was waiting to be read, now and then, under load.
//!
//! A failed read ends the copy at once, as before: the side it came from is gone, and
//! nothing it sent is left to deliver.
//!
//! A direction holds its buffer only while it has bytes to move: when its reader has
//! nothing and everything read was written, the buffer goes back to a small spare list
//! of the worker thread, and the next read takes one from there. An idle connection
//! holds no buffer at all (tokio's copy holds two for the connection's whole life).

use std::cell::RefCell;
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Copies `a` to `b` and `b` to `a` with a buffer of `buffer` bytes each way, until
/// both directions are done: each one's end of stream passed on as a shutdown, or its
/// writes failed and the other direction has finished delivering what it read. Returns
/// the bytes each way, or the first error.
pub(crate) async fn copy_both_ways<A, B>(a: &mut A, b: &mut B, buffer: usize) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let mut copy = BothWays::new(buffer);
    poll_fn(|cx| copy.poll(cx, &mut *a, &mut *b)).await
}

/// The state of a copy both ways, polled by whoever holds the two streams: what a
/// spliced connection keeps for its whole life, so it is kept small (two directions,
/// no future of its own).
pub(crate) struct BothWays {
    a_to_b: Direction,
    b_to_a: Direction,
}

impl BothWays {
    /// A copy with a buffer of `buffer` bytes each way, taken only while bytes move.
    pub(crate) fn new(buffer: usize) -> Self {
        Self { a_to_b: Direction::new(buffer), b_to_a: Direction::new(buffer) }
    }

    /// Moves bytes both ways; Ready with the bytes written each way once both are
    /// done, or with the first error (see [`copy_both_ways`]).
    pub(crate) fn poll<A, B>(&mut self, cx: &mut Context<'_>, a: &mut A, b: &mut B) -> Poll<io::Result<(u64, u64)>>
    where
        A: AsyncRead + AsyncWrite + Unpin + ?Sized,
        B: AsyncRead + AsyncWrite + Unpin + ?Sized,
    {
        let forward = self.a_to_b.poll(cx, &mut *a, &mut *b);
        let back = self.b_to_a.poll(cx, &mut *b, &mut *a);
        for state in [&mut self.a_to_b, &mut self.b_to_a] {
            if let State::ReadFailed(_) = state.state {
                return Poll::Ready(Err(state.take_error()));
            }
        }
        if forward.is_pending() || back.is_pending() {
            return Poll::Pending;
        }
        match (self.a_to_b.take_result(), self.b_to_a.take_result()) {
            (Ok(forward), Ok(back)) => Poll::Ready(Ok((forward, back))),
            (Err(e), _) | (_, Err(e)) => Poll::Ready(Err(e)),
        }
    }

    /// Bytes read so far from `a` and from `b`.
    pub(crate) fn read(&self) -> [u64; 2] {
        [self.a_to_b.read, self.b_to_a.read]
    }

    /// Bytes read and written so far, both ways: it changes whenever the copy moved.
    pub(crate) fn moved(&self) -> u64 {
        self.a_to_b.read + self.a_to_b.copied + self.b_to_a.read + self.b_to_a.copied
    }
}

/// Spare buffers kept per worker thread: enough for the directions that wake on one
/// thread together, few enough that what a burst leaves behind stays small.
const SPARE_PER_THREAD: usize = 16;

thread_local! {
    static SPARE: RefCell<Vec<Box<[u8]>>> = const { RefCell::new(Vec::new()) };
}

/// A buffer of `size` bytes: a spare one of this thread's, else a new one.
fn take_buffer(size: usize) -> Box<[u8]> {
    let spare = SPARE.with(|s| {
        let mut s = s.borrow_mut();
        let i = s.iter().rposition(|b| b.len() == size)?;
        Some(s.swap_remove(i))
    });
    spare.unwrap_or_else(|| vec![0; size].into_boxed_slice())
}

/// Keeps `buf` for the next direction with bytes to move on this thread, or frees it.
fn give_back(buf: Box<[u8]>) {
    SPARE.with(|s| {
        let mut s = s.borrow_mut();
        if s.len() < SPARE_PER_THREAD {
            s.push(buf);
        }
    });
}

/// One direction of the copy.
struct Direction {
    state: State,
    /// Held only while there are bytes to move (see the module's doc).
    buf: Option<Box<[u8]>>,
    size: usize,
    /// Bytes in `buf` not yet written: `buf[pos..cap]`.
    pos: usize,
    cap: usize,
    read_done: bool,
    need_flush: bool,
    /// Bytes read from the reader, and written to the writer.
    read: u64,
    copied: u64,
}

enum State {
    Copying,
    ShuttingDown,
    Done,
    /// The reader failed: the whole copy ends.
    ReadFailed(io::Error),
    /// The writer failed: this direction is over; the other one still delivers.
    WriteFailed(io::Error),
    /// The error was handed out.
    Taken,
}

impl Direction {
    fn new(buffer: usize) -> Self {
        Self {
            state: State::Copying,
            buf: None,
            size: buffer,
            pos: 0,
            cap: 0,
            read_done: false,
            need_flush: false,
            read: 0,
            copied: 0,
        }
    }

    /// Moves this direction on; Ready once it is over (done or failed).
    fn poll<R, W>(&mut self, cx: &mut Context<'_>, reader: &mut R, writer: &mut W) -> Poll<()>
    where
        R: AsyncRead + Unpin + ?Sized,
        W: AsyncWrite + Unpin + ?Sized,
    {
        loop {
            match self.state {
                State::Copying => match ready!(self.poll_copy(cx, reader, writer)) {
                    Ok(()) => self.state = State::ShuttingDown,
                    Err(Failure::Read(e)) => self.state = State::ReadFailed(e),
                    Err(Failure::Write(e)) => self.state = State::WriteFailed(e),
                },
                State::ShuttingDown => {
                    self.state = match ready!(Pin::new(&mut *writer).poll_shutdown(cx)) {
                        Ok(()) => State::Done,
                        Err(e) => State::WriteFailed(e),
                    };
                }
                State::Done | State::ReadFailed(_) | State::WriteFailed(_) | State::Taken => return Poll::Ready(()),
            }
        }
    }

    /// Reads and writes until the reader's end of stream is written and flushed.
    fn poll_copy<R, W>(&mut self, cx: &mut Context<'_>, reader: &mut R, writer: &mut W) -> Poll<Result<(), Failure>>
    where
        R: AsyncRead + Unpin + ?Sized,
        W: AsyncWrite + Unpin + ?Sized,
    {
        loop {
            // Every pass moves bytes; the budget keeps one busy connection from holding
            // its worker thread.
            let coop = ready!(tokio::task::coop::poll_proceed(cx));
            if self.cap < self.size && !self.read_done {
                let buf = self.buf.get_or_insert_with(|| take_buffer(self.size));
                let mut read = ReadBuf::new(&mut buf[self.cap..]);
                match Pin::new(&mut *reader).poll_read(cx, &mut read) {
                    Poll::Ready(Ok(())) => {
                        let n = read.filled().len();
                        self.read_done = n == 0;
                        self.cap += n;
                        self.read += n as u64;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(Failure::Read(e))),
                    Poll::Pending if self.pos == self.cap => {
                        // Nothing to write, nothing read: the buffer is not needed
                        // until the reader has bytes again.
                        if let Some(buf) = self.buf.take() {
                            give_back(buf);
                        }
                        // Flush what was written, in case the reader waits on it.
                        if self.need_flush {
                            ready!(Pin::new(&mut *writer).poll_flush(cx)).map_err(Failure::Write)?;
                            self.need_flush = false;
                        }
                        return Poll::Pending;
                    }
                    Poll::Pending => {}
                }
            }
            while self.pos < self.cap {
                let buf = self.buf.as_deref().expect("bytes to write are in the held buffer");
                let n =
                    ready!(Pin::new(&mut *writer).poll_write(cx, &buf[self.pos..self.cap])).map_err(Failure::Write)?;
                if n == 0 {
                    let e = io::Error::new(io::ErrorKind::WriteZero, "write zero bytes into the writer");
                    return Poll::Ready(Err(Failure::Write(e)));
                }
                self.pos += n;
                self.copied += n as u64;
                self.need_flush = true;
                coop.made_progress();
            }
            self.pos = 0;
            self.cap = 0;
            if self.read_done {
                if let Some(buf) = self.buf.take() {
                    give_back(buf);
                }
                ready!(Pin::new(&mut *writer).poll_flush(cx)).map_err(Failure::Write)?;
                return Poll::Ready(Ok(()));
            }
        }
    }

    fn take_error(&mut self) -> io::Error {
        match std::mem::replace(&mut self.state, State::Taken) {
            State::ReadFailed(e) | State::WriteFailed(e) => e,
            _ => io::Error::other("the copy's error was already taken"),
        }
    }

    fn take_result(&mut self) -> io::Result<u64> {
        match self.state {
            State::Done => Ok(self.copied),
            _ => Err(self.take_error()),
        }
    }
}

impl Drop for Direction {
    fn drop(&mut self) {
        if let Some(buf) = self.buf.take() {
            give_back(buf);
        }
    }
}

/// Which end of a direction failed.
enum Failure {
    Read(io::Error),
    Write(io::Error),
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    /// A stream that delivers `answer` and then its end, and fails every write: a peer
    /// that reset its receiving side once it had answered.
    struct AnsweredThenReset {
        answer: &'static [u8],
    }

    impl AsyncRead for AnsweredThenReset {
        fn poll_read(mut self: Pin<&mut Self>, _: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
            let n = self.answer.len().min(buf.remaining());
            buf.put_slice(&self.answer[..n]);
            self.answer = &self.answer[n..];
            Poll::Ready(Ok(()))
        }
    }

    impl AsyncWrite for AnsweredThenReset {
        fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, _: &[u8]) -> Poll<io::Result<usize>> {
            Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()))
        }
    }

    #[tokio::test]
    async fn a_peer_that_stops_receiving_still_gets_its_answer_delivered() {
        let (mut client, mut agent_side) = tokio::io::duplex(1024);
        client.write_all(b"GET / HTTP/1.0\r\n\r\n").await.unwrap();
        let mut server = AnsweredThenReset { answer: b"HTTP/1.0 200 OK\r\n\r\nhello" };
        let copy = tokio::spawn(async move { copy_both_ways(&mut agent_side, &mut server, 64).await });
        let mut answer = Vec::new();
        client.read_to_end(&mut answer).await.unwrap();
        assert_eq!(answer, b"HTTP/1.0 200 OK\r\n\r\nhello", "the answer reached the client, then its end");
        let result = copy.await.unwrap();
        assert_eq!(result.unwrap_err().kind(), io::ErrorKind::BrokenPipe, "the failed write is still reported");
    }

    #[tokio::test]
    async fn a_failed_read_ends_the_copy_at_once() {
        struct Broken;
        impl AsyncRead for Broken {
            fn poll_read(self: Pin<&mut Self>, _: &mut Context<'_>, _: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
                Poll::Ready(Err(io::ErrorKind::ConnectionReset.into()))
            }
        }
        impl AsyncWrite for Broken {
            fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
                Poll::Ready(Ok(b.len()))
            }
            fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
                Poll::Ready(Ok(()))
            }
            fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
                Poll::Ready(Ok(()))
            }
        }
        // The other side never sends nor closes: only the failed read can end the copy.
        let (_client, mut agent_side) = tokio::io::duplex(1024);
        let result = copy_both_ways(&mut agent_side, &mut Broken, 64).await;
        assert_eq!(result.unwrap_err().kind(), io::ErrorKind::ConnectionReset);
    }

    #[tokio::test]
    async fn both_ways_in_order_with_each_end_passed_on() {
        let (mut client, mut agent_client) = tokio::io::duplex(4096);
        let (mut agent_server, mut server) = tokio::io::duplex(4096);
        let copy = tokio::spawn(async move { copy_both_ways(&mut agent_client, &mut agent_server, 1000).await });
        let request: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let sent = request.clone();
        let writer = tokio::spawn(async move {
            client.write_all(&sent).await.unwrap();
            client.shutdown().await.unwrap();
            client
        });
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert!(got == request, "100 kB in order, then the end of the stream");
        server.write_all(b"done").await.unwrap();
        server.shutdown().await.unwrap();
        let mut client = writer.await.unwrap();
        let mut answer = Vec::new();
        client.read_to_end(&mut answer).await.unwrap();
        assert_eq!(answer, b"done");
        assert_eq!(copy.await.unwrap().unwrap(), (100_000, 4));
    }

    #[tokio::test]
    async fn a_direction_holds_its_buffer_only_while_it_has_bytes_to_move() {
        let (mut client, mut agent_side) = tokio::io::duplex(4096);
        let (mut agent_out, mut server) = tokio::io::duplex(4096);
        let mut direction = Direction::new(1024);
        let mut poll = |d: &mut Direction| {
            let mut cx = Context::from_waker(std::task::Waker::noop());
            d.poll(&mut cx, &mut agent_side, &mut agent_out)
        };
        assert!(poll(&mut direction).is_pending());
        assert!(direction.buf.is_none(), "idle from the start: no buffer");
        client.write_all(b"hello").await.unwrap();
        assert!(poll(&mut direction).is_pending());
        assert!(direction.buf.is_none(), "idle again once the bytes were written");
        let mut got = [0u8; 5];
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hello");
        assert_eq!(direction.copied, 5);
    }
}

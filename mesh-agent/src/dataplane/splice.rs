//! Connections spliced in the kernel: once the agent has admitted a connection and has
//! nothing left to do but copy it, both of its sockets (the client's, accepted by the
//! agent, and the agent's own to the other end) join `SPLICE_SOCKETS`, and the
//! `mesh_splice` verdict program sends what each receives out of the other. The bytes
//! no longer wake the agent; it keeps both sockets and only watches their ends.
//!
//! Invariants:
//! - a socket's `SPLICE_ENDS` entry exists for as long as the socket is in
//!   `SPLICE_SOCKETS` (written before it joins, removed after it leaves);
//! - a connection is joined before the agent has read a byte of it (or after it has
//!   read everything queued), so the kernel sends every byte once and in order;
//! - the tables are the running agent's own (not pinned): if it dies, its sockets close
//!   and take their connections with them (fail closed);
//! - what waits in the kernel for a slow peer is bounded: the kernel hands on at most
//!   [`WINDOW`] bytes beyond what the peer socket had taken into its send queue when the
//!   agent last looked (it looks more often the faster the connection moves); past
//!   that it holds the bytes back on the receiving socket (charged to it: TCP closes
//!   the sender's window), and the agent writes them on itself before the kernel takes
//!   over again.

use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use aya::maps::{HashMap as BpfHashMap, MapData, SockHash};
use mesh_common::{SpliceEnd, SpliceLimit};

use super::sockopt;

/// Why a connection is not spliced in the kernel.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A socket option or the table refused; nothing was handed to the kernel, so the
    /// agent copies the connection itself.
    #[error("not spliced in the kernel: {0}")]
    NotJoined(String),
    /// Bytes may have been lost while joining failed half-way: the connection must be
    /// closed.
    #[error("kernel splice failed half-way; the connection is broken: {0}")]
    Broken(String),
}

/// Bytes the kernel may hand on from one socket beyond what its peer had taken into its
/// send queue when the agent last renewed the allowance: the most a slow peer leaves
/// waiting in the kernel, per direction, on top of the sockets' own buffers.
pub const WINDOW: u64 = 4 << 20;

/// The receive buffer of a spliced socket: wide enough that bytes the kernel has
/// taken but not yet written into the peer (at most [`WINDOW`]) never close the
/// window (the kernel doubles the value; TCP advertises part of it).
const RECEIVE_BUFFER: u32 = WINDOW as u32;

/// The splice tables of the running agent, behind one lock (so no two are ever taken
/// in different orders).
pub struct KernelSplice(Mutex<Tables>);

struct Tables {
    sockets: SockHash<MapData, u64>,
    ends: BpfHashMap<MapData, u64, SpliceEnd>,
    limits: BpfHashMap<MapData, u64, SpliceLimit>,
}

impl std::fmt::Debug for KernelSplice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelSplice").finish_non_exhaustive()
    }
}

impl KernelSplice {
    /// The tables, with the verdict program already attached to `sockets`.
    pub(super) fn new(
        sockets: SockHash<MapData, u64>,
        ends: BpfHashMap<MapData, u64, SpliceEnd>,
        limits: BpfHashMap<MapData, u64, SpliceLimit>,
    ) -> Self {
        Self(Mutex::new(Tables { sockets, ends, limits }))
    }

    /// Hands the connection between `a` and `b` to the kernel: from now on what `a`
    /// receives is sent out of `b` and the other way round. Call before reading
    /// anything from either socket (a peek is fine). The splice lasts until the
    /// returned [`Joined`] is dropped.
    pub fn join(self: &Arc<Self>, a: &impl AsFd, b: &impl AsFd) -> Result<Joined, Error> {
        let not_joined = |what: &str, e: &dyn std::fmt::Display| Error::NotJoined(format!("{what}: {e}"));
        let (a, b) = (a.as_fd(), b.as_fd());
        let cookies = [
            sockopt::cookie(a).map_err(|e| not_joined("cookie", &e))?,
            sockopt::cookie(b).map_err(|e| not_joined("cookie", &e))?,
        ];
        let queued_before = [
            sockopt::bytes_queued_to_send(a).map_err(|e| not_joined("tcp info", &e))?,
            sockopt::bytes_queued_to_send(b).map_err(|e| not_joined("tcp info", &e))?,
        ];

        // The kernel charges what it hands on to the receiving socket until its work
        // queue has written it into the peer, and sends no window update when it lets
        // go: a window that closed meanwhile stays closed until the sender's zero-window
        // probe, 200 ms or more later. A window wider than the allowance never closes
        // for that reason (only for bytes held back, which the agent reads).
        for fd in [a, b] {
            if let Err(e) = sockopt::set_receive_buffer(fd, RECEIVE_BUFFER) {
                tracing::debug!(error = %e, "kernel splice: receive buffer left as it was");
            }
        }

        // Dropping `joined` from here on removes whatever entries were written.
        let mut joined =
            Joined { splice: self.clone(), cookies, queued_before, copied: Default::default(), in_table: [false; 2] };
        {
            let mut t = self.tables();
            // No allowance until both sockets are in the table: a redirect to a peer
            // not in it yet would lose the bytes, so until then they are held back.
            for cookie in cookies {
                let first = SpliceLimit { allowance: 0, copied: 0 };
                t.limits.insert(cookie, first, 0).map_err(|e| not_joined("SPLICE_LIMITS", &e))?;
            }
            for (cookie, peer) in [(cookies[0], cookies[1]), (cookies[1], cookies[0])] {
                let end = SpliceEnd { peer, ..SpliceEnd::default() };
                t.ends.insert(cookie, end, 0).map_err(|e| not_joined("SPLICE_ENDS", &e))?;
            }
            t.sockets.insert(cookies[0], a, 0).map_err(|e| not_joined("SPLICE_SOCKETS", &e))?;
            joined.in_table[0] = true;
            if let Err(e) = t.sockets.insert(cookies[1], b, 0) {
                let _ = t.sockets.remove(&cookies[0]);
                joined.in_table[0] = false;
                // What `a` received meanwhile was held back on it (no allowance yet),
                // and leaving the table drops what is held.
                let end = t.ends.get(&cookies[0], 0).unwrap_or_default();
                return match end.taken + end.passed {
                    0 => Err(not_joined("SPLICE_SOCKETS", &e)),
                    _ => Err(Error::Broken(e.to_string())),
                };
            }
            joined.in_table[1] = true;
            for cookie in cookies {
                let open = SpliceLimit { allowance: WINDOW, copied: 0 };
                t.limits.insert(cookie, open, 0).map_err(|e| Error::Broken(format!("SPLICE_LIMITS: {e}")))?;
            }
        }
        // Bytes that arrived before a socket joined wait in its queue for the next
        // segment: have the kernel look at them now.
        for fd in [a, b] {
            sockopt::signal_queued(fd).map_err(|e| Error::Broken(format!("SO_RCVLOWAT: {e}")))?;
        }
        Ok(joined)
    }

    /// Whether every table is empty.
    #[cfg(test)]
    pub(super) fn is_empty(&self) -> bool {
        let t = self.tables();
        t.sockets.keys().next().is_none() && t.ends.keys().next().is_none() && t.limits.keys().next().is_none()
    }

    fn tables(&self) -> std::sync::MutexGuard<'_, Tables> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn end(&self, cookie: u64) -> SpliceEnd {
        self.tables().ends.get(&cookie, 0).unwrap_or_default()
    }
}

/// A connection spliced in the kernel; dropping it hands the sockets back (they leave
/// the tables, first the sockets, then their entries). Sides are numbered as joined:
/// 0 for `a`, 1 for `b`.
#[derive(Debug)]
pub struct Joined {
    splice: Arc<KernelSplice>,
    /// The cookies of `a` and `b`.
    cookies: [u64; 2],
    /// What each socket had been given to send before it joined.
    queued_before: [u64; 2],
    /// Bytes the agent wrote on itself, from each side, of what the kernel held back.
    copied: [AtomicU64; 2],
    in_table: [bool; 2],
}

impl Joined {
    /// Bytes delivered from `a` to `b` and from `b` to `a` so far: handed on by the
    /// kernel, or held back and written on by the agent.
    pub fn moved(&self) -> [u64; 2] {
        [0, 1].map(|side| self.splice.end(self.cookies[side]).taken + self.copied[side].load(Ordering::Relaxed))
    }

    /// Whether every byte the kernel took from side `from` for `to` (the other socket)
    /// is in `to`'s send queue or sent: the agent writes held-back bytes on only then,
    /// so they never overtake the kernel's.
    pub fn kernel_caught_up(&self, from: usize, to: BorrowedFd<'_>) -> io::Result<bool> {
        let taken = self.splice.end(self.cookies[from]).taken;
        Ok(self.written_by_kernel(from, to)? >= taken)
    }

    /// Bytes from side `from` in `to`'s send queue (or sent) that the kernel wrote.
    fn written_by_kernel(&self, from: usize, to: BorrowedFd<'_>) -> io::Result<u64> {
        let queued = sockopt::bytes_queued_to_send(to)?.saturating_sub(self.queued_before[1 - from]);
        Ok(queued.saturating_sub(self.copied[from].load(Ordering::Relaxed)))
    }

    /// Records `n` held-back bytes of side `from` written on by the agent (to `to`),
    /// and renews the side's allowance.
    pub fn copied(&self, from: usize, n: u64, to: BorrowedFd<'_>) -> io::Result<()> {
        self.copied[from].fetch_add(n, Ordering::Relaxed);
        self.renew_allowance(from, to).map(drop)
    }

    /// Lets the kernel hand on [`WINDOW`] bytes of side `from` beyond what `to` (the
    /// other socket) has taken into its send queue by now; returns the bytes the
    /// kernel has taken from `from` so far.
    pub fn renew_allowance(&self, from: usize, to: BorrowedFd<'_>) -> io::Result<u64> {
        let allowance = self.written_by_kernel(from, to)? + WINDOW;
        let limit = SpliceLimit { allowance, copied: self.copied[from].load(Ordering::Relaxed) };
        self.splice.tables().limits.insert(self.cookies[from], limit, 0).map_err(io::Error::other)?;
        Ok(self.splice.end(self.cookies[from]).taken)
    }

    /// Whether every byte socket `from` received before its peer's FIN has reached the
    /// other socket (`to`): taken and in its send queue, or held back and written on
    /// by the agent. Only then may `to`'s sending side be shut down without losing the
    /// tail. The FIN wakes the agent before the kernel has handed on the bytes that
    /// came with it. Call only once `from` has seen the FIN and the agent has read what
    /// was held back up to it.
    pub fn handed_on(&self, (from, from_socket): (usize, BorrowedFd<'_>), to: BorrowedFd<'_>) -> io::Result<bool> {
        let end = self.splice.end(self.cookies[from]);
        // The socket was joined before anything was read from it: every byte it ever
        // received is the kernel's to hand on or hold (the FIN counts one).
        let received = sockopt::sequence_received(from_socket)?.saturating_sub(1);
        let copied = self.copied[from].load(Ordering::Relaxed);
        Ok(end.taken + end.passed >= received && copied >= end.passed && self.kernel_caught_up(from, to)?)
    }
}

impl Drop for Joined {
    fn drop(&mut self) {
        let mut t = self.splice.tables();
        for (cookie, _) in self.cookies.iter().zip(self.in_table).filter(|(_, joined)| *joined) {
            // Already gone when the socket closed first.
            let _ = t.sockets.remove(cookie);
        }
        for cookie in &self.cookies {
            let _ = t.ends.remove(cookie);
            let _ = t.limits.remove(cookie);
        }
    }
}

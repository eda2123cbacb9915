//! Hands the heap's freed memory back to the kernel once the allocator holds much more
//! than the program uses. glibc's allocator keeps what the program freed in its arenas
//! (one per worker thread) for the next allocations, so an agent that served a c64 L7
//! burst kept 2.7× its idle anonymous memory long after it, and one that took 1,000 new
//! connections a second for ten minutes kept 1 MiB more than before, freed but resident
//! in fragmented arenas. Every [`LOOK_EVERY`] (or later, see below) the agent compares
//! its resident anonymous memory with the heap's bytes in use: when the difference
//! (what the allocator holds beyond the program's use) grew by more than
//! [`SLACK_GREW_BY`] since the last hand-back, it asks glibc to release the free pages
//! (`malloc_trim`). A burst's end
//! shows as such growth (the bytes in use fall, the memory stays); so does slow
//! fragmentation under steady churn, which no fall of the bytes in use would show.
//!
//! Both `mallinfo2` and `malloc_trim` walk the arena's free chunks holding its lock, and
//! with one arena every allocating thread waits meanwhile: microseconds for an idle
//! agent's heap, but 10 ms for the agent's at 10,000 Services and 190 ms for a heap of
//! a million free chunks (measured). So the look backs off as it gets slower (at most
//! [`LOOK_SHARE`] of the time is spent looking), and everything else that reports the
//! bytes in use (the metrics, the dashboard's sampler) reads the last look's figure
//! ([`last_bytes_in_use`]) instead of walking again.
#![expect(unsafe_code, reason = "glibc's mallinfo2 and malloc_trim have no safe wrapper")]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

/// How often the heap is looked at while a look is quick: `mallinfo2` walks the
/// arenas' free lists, and `/proc/self/statm` is one small read.
pub const LOOK_EVERY: Duration = Duration::from_secs(2);

/// The longest wait between two looks, however slow a look is: a burst's memory goes
/// back within this of its end (issue 17 asks for 30 s).
pub const LOOK_AT_LEAST_EVERY: Duration = Duration::from_secs(20);

/// The share of the time a look (and the hand-back it leads to) may hold the arena.
pub const LOOK_SHARE: u32 = 500;

/// The heap's bytes in use at the last look; `usize::MAX` before the first.
static LAST_IN_USE: AtomicUsize = AtomicUsize::new(usize::MAX);

/// How much more the allocator may come to hold beyond the program's use before the
/// free pages are handed back: less would trim for a few requests' worth of memory;
/// a trim walks every arena under its lock.
pub const SLACK_GREW_BY: usize = 256 << 10;

/// Looks at the heap until `shutdown`, every [`LOOK_EVERY`] or later after a slow look
/// ([`next_look`]), handing freed memory back whenever the allocator's slack grew.
pub async fn hand_back_after_bursts(shutdown: CancellationToken) {
    let mut slack = Slack::default();
    let mut wait = Duration::ZERO;
    loop {
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = shutdown.cancelled() => return,
        }
        let started = Instant::now();
        let (Some(in_use), Some(anon)) = (bytes_in_use(), resident_anonymous_bytes()) else { return };
        LAST_IN_USE.store(in_use, Ordering::Relaxed);
        if slack.grew(anon, in_use) {
            let released = release_free_pages();
            let (Some(in_use), Some(anon_after)) = (bytes_in_use(), resident_anonymous_bytes()) else { return };
            LAST_IN_USE.store(in_use, Ordering::Relaxed);
            slack.handed_back(anon_after, in_use);
            tracing::debug!(in_use, released, before = anon, after = anon_after, "heap: freed memory handed back");
        }
        wait = next_look(started.elapsed());
    }
}

/// The wait before the next look, after one that took `took`.
fn next_look(took: Duration) -> Duration {
    took.saturating_mul(LOOK_SHARE).clamp(LOOK_EVERY, LOOK_AT_LEAST_EVERY)
}

/// The heap's bytes in use at the last look (at most [`LOOK_AT_LEAST_EVERY`] old);
/// None before the first, and where the allocator is not glibc's. Reading it walks
/// nothing.
pub fn last_bytes_in_use() -> Option<usize> {
    Some(LAST_IN_USE.load(Ordering::Relaxed)).filter(|&b| b != usize::MAX)
}

/// Keeps glibc to `max` arenas (`M_ARENA_MAX`); call before any thread starts.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn limit_arenas(max: i32) {
    // SAFETY: mallopt takes two integers and changes only the allocator's parameters.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, max) };
}

/// Keeps glibc to `max` arenas: nothing to do with another allocator.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn limit_arenas(_max: i32) {}

/// The allocator's slack (resident anonymous memory beyond the heap's bytes in use)
/// right after the last hand-back, or its lowest since.
#[derive(Debug, Default)]
struct Slack {
    floor: Option<usize>,
}

impl Slack {
    /// Takes a reading; true when the slack grew more than [`SLACK_GREW_BY`] over its
    /// floor, and at the first reading (what starting up freed goes back at once).
    fn grew(&mut self, resident_anonymous: usize, in_use: usize) -> bool {
        let slack = resident_anonymous.saturating_sub(in_use);
        match self.floor {
            None => true,
            Some(floor) if slack > floor + SLACK_GREW_BY => true,
            Some(floor) => {
                self.floor = Some(floor.min(slack));
                false
            }
        }
    }

    /// The reading after a hand-back is the new floor: what could not be released (a
    /// free page between two in use) does not make the next look trim again.
    fn handed_back(&mut self, resident_anonymous: usize, in_use: usize) {
        self.floor = Some(resident_anonymous.saturating_sub(in_use));
    }
}

/// Resident anonymous memory of this process (resident pages less those backed by a
/// file or shared memory), from `/proc/self/statm`.
fn resident_anonymous_bytes() -> Option<usize> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let mut fields = statm.split_whitespace().skip(1).map(|f| f.parse::<usize>().ok());
    let (resident, shared) = (fields.next()??, fields.next()??);
    Some(resident.saturating_sub(shared) * page_size())
}

fn page_size() -> usize {
    nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE).ok().flatten().map_or(4096, |p| p as usize)
}

/// The bytes the program has allocated and not freed, over every arena; None where
/// the allocator is not glibc's.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub(crate) fn bytes_in_use() -> Option<usize> {
    // SAFETY: mallinfo2 takes no argument and returns a plain struct by value; glibc
    // takes each arena's lock while it reads.
    let info = unsafe { libc::mallinfo2() };
    Some(info.uordblks + info.hblkhd)
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub(crate) fn bytes_in_use() -> Option<usize> {
    None
}

/// Releases the free pages of every arena; whether any memory was released.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub(crate) fn release_free_pages() -> bool {
    // SAFETY: malloc_trim takes the padding to keep (0) and works under the arenas'
    // own locks; no pointer is passed.
    unsafe { libc::malloc_trim(0) == 1 }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub(crate) fn release_free_pages() -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn freed_memory_the_allocator_keeps_past_the_slack_is_handed_back() {
        let mut slack = Slack::default();
        let (idle, anon) = (4 << 20, 6 << 20);
        assert!(slack.grew(anon, idle), "what starting up freed is handed back at the first look");
        slack.handed_back(anon, idle);
        assert!(!slack.grew(anon + (12 << 20), idle + (12 << 20)), "a burst in use is no slack");
        assert!(!slack.grew(anon + 1000, idle), "a few requests' worth is no reason to trim");
        assert!(slack.grew(anon + (12 << 20), idle), "a burst freed and kept: handed back");
        slack.handed_back(anon + (1 << 20), idle);
        assert!(!slack.grew(anon + (1 << 20), idle), "what a trim could not release is the new floor");
        assert!(!slack.grew(anon, idle), "less slack lowers the floor");
        assert!(slack.grew(anon + SLACK_GREW_BY + 4096, idle), "slow fragmentation adds up to a hand-back");
    }

    #[test]
    fn a_slow_look_looks_less_often() {
        assert_eq!(next_look(Duration::from_micros(50)), LOOK_EVERY, "an idle agent's heap: every 2 s");
        assert_eq!(next_look(Duration::from_millis(10)), Duration::from_secs(5), "10 ms: 0.2% of the time");
        assert_eq!(next_look(Duration::from_millis(190)), LOOK_AT_LEAST_EVERY, "however slow, 20 s at most");
    }

    #[test]
    fn resident_anonymous_memory_is_read() {
        let anon = resident_anonymous_bytes().expect("/proc/self/statm");
        let status_kib = rss_anon_kib();
        // Both read the same counters a moment apart.
        assert!((anon / 1024).abs_diff(status_kib as usize) < 4096, "{anon} B vs RssAnon {status_kib} KiB");
    }

    /// Memory freed in other threads' arenas, below a block still in use (so no arena
    /// shrinks by itself), is released by the hand-back.
    #[test]
    fn freed_memory_is_handed_back() {
        if bytes_in_use().is_none() {
            eprintln!("skipping: the allocator is not glibc's");
            return;
        }
        // Many small blocks from two threads (two arenas), freed but for one block
        // each at the end, which keeps the arena's top from shrinking by itself.
        let held: Vec<Vec<Box<[u8; 512]>>> = std::thread::scope(|s| {
            let workers: Vec<_> = (0..2)
                .map(|_| {
                    s.spawn(|| {
                        let mut blocks: Vec<Box<[u8; 512]>> = (0..32 * 1024).map(|_| Box::new([7u8; 512])).collect();
                        let last = blocks.pop().expect("one block");
                        drop(blocks);
                        vec![last]
                    })
                })
                .collect();
            workers.into_iter().map(|w| w.join().expect("worker")).collect()
        });
        let rss_before = rss_anon_kib();
        assert!(release_free_pages(), "the two arenas' free pages are released");
        let rss_after = rss_anon_kib();
        eprintln!("RssAnon {rss_before} KiB before the hand-back, {rss_after} KiB after");
        drop(held);
    }

    fn rss_anon_kib() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").expect("status");
        let line = status.lines().find(|l| l.starts_with("RssAnon:")).expect("RssAnon");
        line.split_whitespace().nth(1).and_then(|n| n.parse().ok()).expect("a number")
    }
}

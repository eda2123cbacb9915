//! Hands the heap's freed memory back to the kernel once a burst is over. glibc's
//! allocator keeps what a burst freed in its arenas (one per worker thread) for the next
//! burst, so an agent that served a c64 L7 burst kept 2.7× its idle anonymous memory
//! long after it. Every [`LOOK_EVERY`] the agent compares the heap's bytes in use with
//! their peak since it last looked; when they fell by more than [`FELL_BY`], it asks
//! glibc to release the free pages (`malloc_trim`).
#![expect(unsafe_code, reason = "glibc's mallinfo2 and malloc_trim have no safe wrapper")]

use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// How often the heap is looked at: `mallinfo2` walks the arenas' free lists, cheap
/// at this agent's heap sizes.
pub const LOOK_EVERY: Duration = Duration::from_secs(2);

/// How far the bytes in use must fall from their peak before the free pages are
/// handed back: less would trim after every few requests for nothing.
pub const FELL_BY: usize = 1 << 20;

/// Looks at the heap every [`LOOK_EVERY`] until `shutdown`, handing freed memory back
/// after each burst.
pub async fn hand_back_after_bursts(shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(LOOK_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut bursts = Bursts::default();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shutdown.cancelled() => return,
        }
        let Some(in_use) = bytes_in_use() else { return };
        if bursts.ended(in_use) {
            let released = release_free_pages();
            tracing::debug!(in_use, released, "heap: freed memory handed back after a burst");
        }
    }
}

/// The peak of the heap's bytes in use since the last hand-back, and whether a burst
/// has ended.
#[derive(Debug, Default)]
struct Bursts {
    peak: usize,
}

impl Bursts {
    /// Takes a new reading of the bytes in use; true when they fell more than
    /// [`FELL_BY`] below the peak (the peak then starts again from here).
    fn ended(&mut self, in_use: usize) -> bool {
        self.peak = self.peak.max(in_use);
        if self.peak - in_use > FELL_BY {
            self.peak = in_use;
            return true;
        }
        false
    }
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
fn release_free_pages() -> bool {
    // SAFETY: malloc_trim takes the padding to keep (0) and works under the arenas'
    // own locks; no pointer is passed.
    unsafe { libc::malloc_trim(0) == 1 }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn release_free_pages() -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_ends_when_the_heap_falls_well_below_its_peak() {
        let mut bursts = Bursts::default();
        let idle = 4 << 20;
        assert!(!bursts.ended(idle), "the first reading is the peak");
        assert!(!bursts.ended(idle + (12 << 20)), "rising is no end");
        assert!(!bursts.ended(idle + (12 << 20) - 1000), "a few requests' worth is no end");
        assert!(bursts.ended(idle), "12 MiB freed: handed back");
        assert!(!bursts.ended(idle), "and not again until the next burst");
        assert!(!bursts.ended(idle - (512 << 10)), "a small fall from the new peak is no end");
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

//! Unmaps the pages of code and read-only data that one-off work touched, once the
//! agent has been quiet for a moment, so that what stays resident is what serving
//! touches.
//!
//! Starting up runs code that serving never runs again: settings parsing, the BPF
//! object's loading and relocation, the first certificates, the kernel tables' first
//! fill. A config compile, a pod's enrollment and a certificate renewal run more of it,
//! now and then. Every page of the binary (and of libc and the loader) that this
//! touched stayed mapped in the agent for its life: about half of its resident text
//! (docs/benchmarks.md, "The agent's text laid out by use"). Once such work is done
//! and [`QUIET`] has passed without more, the agent drops its mappings of those pages
//! (`madvise(MADV_DONTNEED)`): the next use of any of them maps it again from the page
//! cache, a minor fault, so nothing is lost but the mapping. The release build lays
//! out the code that serving runs first (`mesh-agent/link-order.txt`, measured by
//! `cargo xtask link-order`), so serving maps back a few packed megabytes, not pages
//! scattered through the whole text. Traffic's end is treated alike
//! ([`OneOffWork::after_traffic`]): once no connection has been open or opened for
//! [`TRAFFIC_QUIET`], serving's pages go too, and an idle agent maps back only what its
//! idle work runs, which the link order puts first of all.
//!
//! Only private, read-only mappings of a file that hold no page of their own
//! (`Anonymous: 0 kB` in `/proc/self/smaps`) are dropped: such a mapping reads exactly
//! what the file holds. A mapping with a page of its own (relocated read-only data,
//! a debugger's breakpoint, a uprobe) is left alone, since dropping it would bring
//! back the file's bytes instead of the page's.
#![expect(unsafe_code, reason = "madvise over mappings the loader made has no safe wrapper")]

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// How long after the last one-off work the pages go: the work's tail (a compile's
/// follow-up, the certificates a new pod asks for) has run by then, and a burst of
/// config changes unmaps once, after it.
pub const QUIET: Duration = Duration::from_secs(2);

/// How long traffic must have stopped (no connection open, none opened) before
/// serving's pages go too: longer than the gaps between a client's connections, so
/// steady traffic keeps its code mapped; what serves the next connection maps back
/// from the page cache.
pub const TRAFFIC_QUIET: Duration = Duration::from_secs(10);

/// What the agent's connections were at one look.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Traffic {
    /// Connections opened since start.
    pub opened: u64,
    /// Connections open now.
    pub open: u64,
}

/// Tells the unmapping task that one-off work was done (cheap: a permit is stored).
#[derive(Debug, Clone, Default)]
pub struct OneOffWork {
    notify: Arc<Notify>,
    /// Whether anything is unmapped at all (`--unmap-one-off-pages`).
    on: bool,
}

impl OneOffWork {
    /// The handle the agent tells; when `unmap` (`--unmap-one-off-pages`), a task
    /// unmaps one-off work's pages [`QUIET`] after the last [`OneOffWork::done`], until
    /// `shutdown`.
    pub fn start(unmap: bool, shutdown: &CancellationToken) -> Self {
        let work = Self { notify: Arc::default(), on: unmap };
        if unmap {
            tokio::spawn(after_quiet(work.clone(), shutdown.clone(), QUIET, release_logged));
        }
        work
    }

    /// One-off work was done: its pages go once [`QUIET`] passes without more.
    pub fn done(&self) {
        self.notify.notify_one();
    }

    /// Counts traffic's end as one-off work's, until `shutdown`: once connections were
    /// served and then none was open and none opened for [`TRAFFIC_QUIET`] (`traffic`
    /// says), the pages serving touched go as well, so an agent whose traffic stopped
    /// comes back to what an idle one holds. Nothing when unmapping is off.
    pub fn after_traffic(&self, traffic: impl Fn() -> Traffic + Send + 'static, shutdown: &CancellationToken) {
        if self.on {
            tokio::spawn(when_traffic_stops(self.clone(), traffic, shutdown.clone(), TRAFFIC_QUIET));
        }
    }
}

/// Tells `work` once per stretch of traffic, at the first look (every `quiet`) that
/// finds no connection open and none opened since the look before.
async fn when_traffic_stops(
    work: OneOffWork,
    traffic: impl Fn() -> Traffic,
    shutdown: CancellationToken,
    quiet: Duration,
) {
    let mut last = traffic();
    let mut told_at = last.opened;
    loop {
        tokio::select! {
            () = tokio::time::sleep(quiet) => {}
            () = shutdown.cancelled() => return,
        }
        let now = traffic();
        if now.opened == last.opened && now.open == 0 && now.opened != told_at {
            work.done();
            told_at = now.opened;
        }
        last = now;
    }
}

/// Runs `act` (blocking, on the blocking pool) `quiet` after the last `done`, once per
/// burst of them.
async fn after_quiet(work: OneOffWork, shutdown: CancellationToken, quiet: Duration, act: fn()) {
    loop {
        tokio::select! {
            () = work.notify.notified() => {}
            () = shutdown.cancelled() => return,
        }
        loop {
            tokio::select! {
                () = tokio::time::sleep(quiet) => break,
                () = work.notify.notified() => {}
                () = shutdown.cancelled() => return,
            }
        }
        if tokio::task::spawn_blocking(act).await.is_err() {
            return;
        }
    }
}

/// One mapping of `/proc/self/smaps`, as far as deciding whether to drop it needs.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Mapping {
    start: usize,
    end: usize,
    perms: String,
    path: String,
    rss_kb: u64,
    anonymous_kb: u64,
}

impl Mapping {
    /// A private read-only mapping of a file with no page of its own: dropping its
    /// pages loses nothing, the file has every byte.
    fn droppable(&self) -> bool {
        matches!(self.perms.as_str(), "r-xp" | "r--p") && self.path.starts_with('/') && self.anonymous_kb == 0
    }
}

/// What [`release`] unmapped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Released {
    /// Mappings whose pages were dropped.
    pub mappings: usize,
    /// Their resident bytes before.
    pub bytes: u64,
}

/// Drops this process's mappings of the pages of its files' code and read-only data.
/// The pages the agent goes on using map back on their next use.
pub fn release() -> std::io::Result<Released> {
    let smaps = std::fs::read_to_string("/proc/self/smaps")?;
    let mut released = Released::default();
    for mapping in parse_smaps(&smaps).into_iter().filter(Mapping::droppable) {
        if mapping.rss_kb == 0 {
            continue;
        }
        // SAFETY: the range is a whole mapping the kernel reported for this process,
        // private and read-only, with no anonymous page: MADV_DONTNEED only unmaps
        // its pages, and any later access maps the same file bytes back. Nothing in
        // Rust holds a reference that the unmapping could change.
        let done = unsafe {
            libc::madvise(mapping.start as *mut libc::c_void, mapping.end - mapping.start, libc::MADV_DONTNEED)
        };
        if done == 0 {
            released.mappings += 1;
            released.bytes += mapping.rss_kb * 1024;
        }
    }
    Ok(released)
}

/// [`release`], logged.
fn release_logged() {
    match release() {
        Ok(r) => {
            tracing::debug!(mappings = r.mappings, bytes = r.bytes, "one-off work's code and read-only pages unmapped")
        }
        Err(e) => tracing::debug!(error = %e, "reading /proc/self/smaps to unmap one-off work's pages"),
    }
}

/// The mappings of an smaps text: a header line (`start-end perms offset dev inode
/// [path]`) then `Key: value kB` lines.
fn parse_smaps(text: &str) -> Vec<Mapping> {
    let mut mappings: Vec<Mapping> = Vec::new();
    for line in text.lines() {
        if let Some(mapping) = header(line) {
            mappings.push(mapping);
            continue;
        }
        let Some(current) = mappings.last_mut() else { continue };
        let Some((key, value)) = line.split_once(':') else { continue };
        let kb = || value.trim().trim_end_matches("kB").trim().parse::<u64>().ok();
        match key {
            "Rss" => current.rss_kb = kb().unwrap_or(0),
            // Unreadable, it counts as holding pages of its own: kept.
            "Anonymous" => current.anonymous_kb = kb().unwrap_or(u64::MAX),
            _ => {}
        }
    }
    mappings
}

fn header(line: &str) -> Option<Mapping> {
    let mut fields = line.splitn(6, ' ');
    let range = fields.next()?;
    let (lo, hi) = range.split_once('-')?;
    let start = usize::from_str_radix(lo, 16).ok()?;
    let end = usize::from_str_radix(hi, 16).ok()?;
    let perms = fields.next()?;
    if perms.len() != 4 {
        return None;
    }
    let (_offset, _dev, _inode) = (fields.next()?, fields.next()?, fields.next()?);
    let path = fields.next().unwrap_or("").trim().to_string();
    // Until its Anonymous line is read, a mapping is taken to hold pages of its own.
    Some(Mapping { start, end, perms: perms.to_string(), path, rss_kb: 0, anonymous_kb: u64::MAX })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS: &str = "\
5600a0000000-5600a0200000 r--p 00000000 fd:01 1234                       /usr/bin/mesh-agent
Rss:                1024 kB
Anonymous:             0 kB
5600a0200000-5600a1400000 r-xp 00200000 fd:01 1234                       /usr/bin/mesh-agent
Rss:                9000 kB
Anonymous:             0 kB
5600a1400000-5600a1480000 r--p 01400000 fd:01 1234                       /usr/bin/mesh-agent
Rss:                 400 kB
Anonymous:           400 kB
5600a1480000-5600a1490000 rw-p 01480000 fd:01 1234                       /usr/bin/mesh-agent
Rss:                  64 kB
Anonymous:            64 kB
7f0000000000-7f0000100000 r-xp 00000000 fd:01 99                         /usr/lib/libc.so.6 (deleted)
Rss:                 800 kB
Anonymous:             0 kB
7f0000200000-7f0000201000 r-xp 00000000 00:00 0                          [vdso]
Rss:                   4 kB
Anonymous:             0 kB
7f0000300000-7f0000400000 r--s 00000000 00:0e 77                         /sys/fs/bpf/map
Rss:                 100 kB
Anonymous:             0 kB
7f0000500000-7f0000600000 r-xp 00000000 fd:01 55                         /usr/lib/libbroken.so
Rss:                 100 kB
";

    #[test]
    fn only_private_read_only_file_mappings_without_pages_of_their_own_are_dropped() {
        let mappings = parse_smaps(SMAPS);
        assert_eq!(mappings.len(), 8);
        assert_eq!(mappings[1].rss_kb, 9000);
        assert_eq!(mappings[4].path, "/usr/lib/libc.so.6 (deleted)");
        let dropped: Vec<(usize, &str)> =
            mappings.iter().filter(|m| m.droppable()).map(|m| (m.start, m.perms.as_str())).collect();
        // The binary's read-only data and code, and libc's code. Not the relocated
        // read-only data (pages of its own), the writable data, the vDSO, a shared
        // mapping, nor a mapping whose Anonymous line is missing.
        assert_eq!(dropped, [(0x5600a0000000, "r--p"), (0x5600a0200000, "r-xp"), (0x7f0000000000, "r-xp")]);
    }

    static ACTED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

    fn count() {
        ACTED.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }

    fn acted() -> usize {
        ACTED.load(std::sync::atomic::Ordering::SeqCst)
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_of_one_off_work_is_followed_by_one_unmapping_once_quiet() {
        let (work, shutdown) = (OneOffWork::default(), CancellationToken::new());
        let task = tokio::spawn(after_quiet(work.clone(), shutdown.clone(), QUIET, count));
        let settle = || async {
            // The blocking pool runs outside paused time: let it finish.
            for _ in 0..50 {
                tokio::task::yield_now().await;
                std::thread::sleep(Duration::from_millis(1));
            }
        };
        tokio::time::sleep(QUIET * 3).await;
        settle().await;
        assert_eq!(acted(), 0, "nothing done, nothing unmapped");
        // Work keeps coming for longer than QUIET: no unmapping in between.
        for _ in 0..5 {
            work.done();
            tokio::time::sleep(QUIET / 2).await;
        }
        settle().await;
        assert_eq!(acted(), 0, "unmapped while work was still coming");
        tokio::time::sleep(QUIET).await;
        settle().await;
        assert_eq!(acted(), 1, "one unmapping after the burst");
        tokio::time::sleep(QUIET * 3).await;
        settle().await;
        assert_eq!(acted(), 1, "quiet since: nothing more");
        work.done();
        tokio::time::sleep(QUIET + Duration::from_millis(1)).await;
        settle().await;
        assert_eq!(acted(), 2, "the next work's pages go too");
        shutdown.cancel();
        task.await.expect("the task ends at shutdown");
    }

    #[tokio::test(start_paused = true)]
    async fn serving_counts_as_done_once_no_connection_is_open_or_opening() {
        use std::sync::Mutex;
        let (work, shutdown) = (OneOffWork::default(), CancellationToken::new());
        let traffic = Arc::new(Mutex::new(Traffic::default()));
        let task = tokio::spawn(when_traffic_stops(
            work.clone(),
            {
                let traffic = traffic.clone();
                move || *traffic.lock().unwrap()
            },
            shutdown.clone(),
            TRAFFIC_QUIET,
        ));
        let set = |opened: u64, open: u64| *traffic.lock().unwrap() = Traffic { opened, open };
        let told = || async { tokio::time::timeout(Duration::from_millis(1), work.notify.notified()).await.is_ok() };
        tokio::time::sleep(TRAFFIC_QUIET * 3).await;
        assert!(!told().await, "no traffic yet: nothing to drop");
        // Connections keep opening: serving goes on.
        for n in 1..=4 {
            set(3 * n, 1);
            tokio::time::sleep(TRAFFIC_QUIET).await;
        }
        assert!(!told().await, "told while connections still opened");
        // None opens, but one stays open: it may carry requests.
        tokio::time::sleep(TRAFFIC_QUIET * 2).await;
        assert!(!told().await, "told while a connection was open");
        set(12, 0);
        tokio::time::sleep(TRAFFIC_QUIET).await;
        assert!(told().await, "told once none was open and none opened");
        tokio::time::sleep(TRAFFIC_QUIET * 3).await;
        assert!(!told().await, "once per stretch of traffic");
        set(13, 0);
        tokio::time::sleep(TRAFFIC_QUIET * 2 + Duration::from_millis(1)).await;
        assert!(told().await, "the next stretch's end too");
        shutdown.cancel();
        task.await.expect("the task ends at shutdown");
    }

    #[test]
    fn release_unmaps_this_process_pages_and_they_map_back_on_use() {
        let file_resident = || {
            let status = std::fs::read_to_string("/proc/self/status").expect("reading /proc/self/status");
            let line = status.lines().find(|l| l.starts_with("RssFile:")).expect("an RssFile line");
            line.split_whitespace().nth(1).and_then(|kb| kb.parse::<u64>().ok()).expect("RssFile in kB")
        };
        let before = file_resident();
        let released = release().expect("reading /proc/self/smaps");
        // This code is on a page just dropped: running on shows it mapped back.
        let after = file_resident();
        assert!(released.mappings > 0 && released.bytes > 0, "{released:?}");
        assert!(after < before, "file-backed resident {before} kB before, {after} kB after {released:?}");
    }
}

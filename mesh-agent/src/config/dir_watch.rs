//! Watching the config directory: one message per burst of changes, sent as soon as the
//! burst looks finished.
//!
//! A burst ends when no event has come for a while, and how long that is depends on
//! the last event: a write may go on (an editor's save, `cp` of a large file), so after
//! one the watch waits [`DEBOUNCE`]; a rename into place, a write's close or a removal
//! leaves a whole file (or none), so after one it waits only [`SETTLE`], long enough to
//! take in the rest of the same batch of events. Reading early is never unsafe: a
//! half-written file is refused and its last good version stays until the next event
//! brings the rest; waiting only delays every change.

use std::path::Path;
use std::time::Duration;

use notify::event::{AccessKind, AccessMode, ModifyKind, RenameMode};
use notify::{Event, EventKind, RecursiveMode, Watcher as _};
use tokio::sync::mpsc;

/// Quiet time after an event that may be followed by more of the same write.
pub(super) const DEBOUNCE: Duration = Duration::from_millis(25);
/// Quiet time after an event that ends a write: a rename's two halves and the events of
/// one `rename(2)` or `close(2)` arrive together, well within this.
pub(super) const SETTLE: Duration = Duration::from_millis(3);

/// How long to wait after `event` for the next before reading; None for an event that
/// is no change at all.
fn quiet_after(event: &Event) -> Option<Duration> {
    match event.kind {
        // The write is whole once it is closed, unless it went to a hidden file, which is
        // no config file of its own: a temporary one about to be renamed into place.
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => {
            Some(if event.paths.iter().any(|p| is_hidden(p)) { DEBOUNCE } else { SETTLE })
        }
        // Opening and reading a file is no change; counting it as one would make every
        // reload (which reads the files) trigger the next, for ever, and every agent
        // reading the same directory would trigger the others.
        EventKind::Access(_) => None,
        // A rename into place (what tools, `kubectl cp` and ConfigMap volumes' `..data`
        // swap do) and a removal leave nothing half done.
        EventKind::Modify(ModifyKind::Name(RenameMode::To | RenameMode::Both)) | EventKind::Remove(_) => Some(SETTLE),
        _ => Some(DEBOUNCE),
    }
}

/// Whether `path` names a hidden file: never a config file of its own.
pub(super) fn is_hidden(path: &Path) -> bool {
    path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with('.'))
}

/// Watches `dir` and sends one message per burst of changes. The watcher lives as long
/// as the returned guard.
pub fn watch(dir: &Path) -> notify::Result<(notify::RecommendedWatcher, mpsc::Receiver<()>)> {
    let (raw_tx, raw_rx) = mpsc::unbounded_channel();
    let mut watcher = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
        // A watch error (the queue overflowed) may have lost a change: read again after
        // the long wait.
        let quiet = match ev {
            Ok(event) => quiet_after(&event),
            Err(_) => Some(DEBOUNCE),
        };
        if let Some(quiet) = quiet {
            let _ = raw_tx.send(quiet);
        }
    })?;
    watcher.watch(dir, RecursiveMode::NonRecursive)?;
    let (tx, rx) = mpsc::channel(1);
    tokio::spawn(bursts(raw_rx, tx));
    Ok((watcher, rx))
}

/// Turns events (each with the quiet time it asks for) into one message per burst: the
/// burst ends when the last event's quiet time has passed with no other event.
async fn bursts(mut events: mpsc::UnboundedReceiver<Duration>, out: mpsc::Sender<()>) {
    while let Some(mut quiet) = events.recv().await {
        while let Ok(Some(next)) = tokio::time::timeout(quiet, events.recv()).await {
            quiet = next;
        }
        if out.send(()).await.is_err() {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::time::Instant;

    use notify::event::{CreateKind, DataChange, RemoveKind};

    use super::*;

    fn event(kind: EventKind, path: &str) -> Event {
        Event::new(kind).add_path(PathBuf::from(path))
    }

    #[test]
    fn a_finished_write_settles_quickly_one_that_may_go_on_waits() {
        let close_write = EventKind::Access(AccessKind::Close(AccessMode::Write));
        assert_eq!(quiet_after(&event(close_write, "/c/routes.yaml")), Some(SETTLE));
        assert_eq!(
            quiet_after(&event(EventKind::Modify(ModifyKind::Name(RenameMode::To)), "/c/routes.yaml")),
            Some(SETTLE)
        );
        assert_eq!(quiet_after(&event(EventKind::Remove(RemoveKind::File), "/c/routes.yaml")), Some(SETTLE));
        // A temporary file closed: its rename is still to come.
        assert_eq!(quiet_after(&event(close_write, "/c/.routes.yaml.tmp")), Some(DEBOUNCE));
        assert_eq!(
            quiet_after(&event(EventKind::Modify(ModifyKind::Data(DataChange::Any)), "/c/routes.yaml")),
            Some(DEBOUNCE)
        );
        assert_eq!(quiet_after(&event(EventKind::Create(CreateKind::File), "/c/routes.yaml")), Some(DEBOUNCE));
        // Reads are no change (a reload reads every file).
        assert_eq!(quiet_after(&event(EventKind::Access(AccessKind::Open(AccessMode::Read)), "/c/a.yaml")), None);
        assert_eq!(quiet_after(&event(EventKind::Access(AccessKind::Close(AccessMode::Read)), "/c/a.yaml")), None);
    }

    /// What this kernel's inotify says for the two ways files land: written in place
    /// (the burst ends on the close) and written aside then renamed in (on the rename).
    #[test]
    fn real_writes_end_on_an_event_that_settles() {
        let dir = tempfile::tempdir().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let mut watcher = notify::recommended_watcher(move |ev: notify::Result<Event>| {
            if let Ok(event) = ev {
                let _ = tx.send(event);
            }
        })
        .unwrap();
        watcher.watch(dir.path(), RecursiveMode::NonRecursive).unwrap();
        let last_quiet = |rx: &std::sync::mpsc::Receiver<Event>| {
            let mut last = None;
            let mut seen = Vec::new();
            while let Ok(event) = rx.recv_timeout(Duration::from_millis(200)) {
                seen.push(event.kind);
                last = quiet_after(&event).or(last);
            }
            (last, seen)
        };
        std::fs::write(dir.path().join("in-place.yaml"), "a: 1\n").unwrap();
        let (quiet, seen) = last_quiet(&rx);
        assert_eq!(quiet, Some(SETTLE), "written in place: {seen:?}");
        let tmp = dir.path().join(".aside.yaml.tmp");
        std::fs::write(&tmp, "a: 2\n").unwrap();
        std::fs::rename(&tmp, dir.path().join("aside.yaml")).unwrap();
        let (quiet, seen) = last_quiet(&rx);
        assert_eq!(quiet, Some(SETTLE), "renamed into place: {seen:?}");
        std::fs::remove_file(dir.path().join("aside.yaml")).unwrap();
        let (quiet, seen) = last_quiet(&rx);
        assert_eq!(quiet, Some(SETTLE), "removed: {seen:?}");
        // Half a write (no close yet) keeps the long wait.
        let mut open = std::fs::File::create(dir.path().join("slow.yaml")).unwrap();
        std::io::Write::write_all(&mut open, b"a: 3\n").unwrap();
        let (quiet, seen) = last_quiet(&rx);
        assert_eq!(quiet, Some(DEBOUNCE), "still open for writing: {seen:?}");
        drop(open);
    }

    /// The last event decides: a write that goes on after a rename keeps the burst open
    /// for the long wait, and a burst is one message however many events it had.
    #[tokio::test(start_paused = true)]
    async fn a_burst_ends_when_its_last_event_has_been_quiet_for_its_own_wait() {
        let (events, raw) = mpsc::unbounded_channel();
        let (out, mut rx) = mpsc::channel(1);
        tokio::spawn(bursts(raw, out));
        let start = Instant::now();
        let t0 = tokio::time::Instant::now();
        events.send(DEBOUNCE).unwrap();
        events.send(SETTLE).unwrap();
        rx.recv().await.unwrap();
        assert_eq!(t0.elapsed(), SETTLE, "ended by the settling event");
        let t1 = tokio::time::Instant::now();
        events.send(SETTLE).unwrap();
        events.send(DEBOUNCE).unwrap();
        rx.recv().await.unwrap();
        assert_eq!(t1.elapsed(), DEBOUNCE, "a write after the rename may go on");
        assert!(rx.try_recv().is_err(), "one message per burst");
        assert!(start.elapsed() < Duration::from_secs(5), "paused clock");
    }
}

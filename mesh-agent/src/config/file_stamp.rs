//! [`ReadStamps`]: which config files are certainly unchanged since they were read,
//! from their metadata alone, so a re-read of the directory reads only what changed.
//!
//! A file whose inode, size, mtime and ctime are those seen when it was last read is
//! unchanged, unless it was written again within the filesystem's timestamp
//! granularity of that read (the write then leaves the same times). So, as git does
//! for its index, the metadata is trusted only for a file that had not changed for
//! [`SETTLED`] when it was read; any other is read and compared. A write always sets
//! ctime, which no user can set back, so a tool restoring an old mtime is caught too.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// How long a file must have been unchanged, when read, for its metadata to vouch for
/// it later: wider than any filesystem's timestamp granularity (FAT's is 2 s).
const SETTLED: Duration = Duration::from_secs(3);

/// What a file's metadata says about its contents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Stamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Stamp {
    fn of(path: &Path) -> Option<Self> {
        let m = std::fs::metadata(path).ok()?;
        Some(Self {
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        })
    }

    /// The later of the two change times.
    fn changed_at(&self) -> SystemTime {
        let at = |(s, ns): (i64, i64)| {
            let (s, ns) = (u64::try_from(s).unwrap_or(0), u32::try_from(ns).unwrap_or(0));
            SystemTime::UNIX_EPOCH + Duration::new(s, ns)
        };
        at(self.mtime).max(at(self.ctime))
    }
}

/// The stamp of each file as last read, with whether it can vouch for the file.
#[derive(Debug)]
pub(super) struct ReadStamps {
    read: BTreeMap<PathBuf, (Stamp, bool)>,
    /// [`SETTLED`], but in tests.
    settled: Duration,
}

impl Default for ReadStamps {
    fn default() -> Self {
        Self { read: BTreeMap::new(), settled: SETTLED }
    }
}

impl ReadStamps {
    /// The file's stamp now, to hand to [`ReadStamps::record`] once it is read; `None`
    /// when the file is certainly as it was when last read.
    pub(super) fn check(&self, path: &Path) -> Option<Option<Stamp>> {
        let now = Stamp::of(path);
        match (self.read.get(path), now) {
            (Some((seen, true)), Some(now)) if *seen == now => None,
            _ => Some(now),
        }
    }

    /// Notes that `path` was read with metadata `stamp` (taken before the read: a write
    /// during the read changes it, and the next check reads again).
    pub(super) fn record(&mut self, path: &Path, stamp: Option<Stamp>) {
        match stamp {
            Some(stamp) => {
                let settled =
                    SystemTime::now().duration_since(stamp.changed_at()).is_ok_and(|quiet| quiet >= self.settled);
                self.read.insert(path.to_owned(), (stamp, settled));
            }
            None => {
                self.read.remove(path);
            }
        }
    }

    /// Keeps the stamps of `paths` only.
    pub(super) fn retain(&mut self, paths: &[PathBuf]) {
        self.read.retain(|p, _| paths.binary_search(p).is_ok());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set_times(path: &Path, ago: Duration) {
        let at = SystemTime::now() - ago;
        let f = std::fs::File::options().write(true).open(path).unwrap();
        f.set_times(std::fs::FileTimes::new().set_modified(at).set_accessed(at)).unwrap();
    }

    #[test]
    fn a_file_changed_just_before_it_was_read_is_read_again_even_with_the_same_metadata() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.yaml");
        std::fs::write(&path, "one").unwrap();
        let mut stamps = ReadStamps::default();
        let stamp = stamps.check(&path).expect("never read");
        stamps.record(&path, stamp);
        // Written within the timestamp granularity: same size, maybe the same times.
        assert!(stamps.check(&path).is_some(), "a fresh file is not vouched for by its metadata");
    }

    #[test]
    fn a_settled_file_is_skipped_until_any_write_touches_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.yaml");
        std::fs::write(&path, "one").unwrap();
        // ctime cannot be set back, so no file here is settled: take any as settled.
        let mut stamps = ReadStamps { settled: Duration::ZERO, ..ReadStamps::default() };
        let stamp = stamps.check(&path).expect("never read");
        stamps.record(&path, stamp);
        assert!(stamps.check(&path).is_none(), "unchanged and settled: not read again");
        // Same size, and an old mtime put back: ctime still moves.
        std::thread::sleep(Duration::from_millis(20));
        std::fs::write(&path, "two").unwrap();
        set_times(&path, SETTLED * 10);
        assert!(stamps.check(&path).is_some(), "a rewrite with the old mtime restored is read again");
        let stamp = stamps.check(&path).unwrap();
        stamps.record(&path, stamp);
        stamps.retain(&[]);
        assert!(stamps.check(&path).is_some(), "a forgotten file is read again");
    }
}

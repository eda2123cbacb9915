//! Finding the cgroup v2 mount and making sure bpffs is mounted.

use std::path::{Path, PathBuf};

use nix::mount::{MsFlags, mount};
use nix::sys::statfs::{BPF_FS_MAGIC, statfs};

use super::Error;

/// Where bpffs is conventionally mounted.
const BPFFS: &str = "/sys/fs/bpf";

/// The cgroup v2 mount point, from `/proc/mounts` (hybrid hosts mount it at
/// `/sys/fs/cgroup/unified`, pure v2 hosts at `/sys/fs/cgroup`).
pub fn cgroup2_root() -> Result<PathBuf, Error> {
    let mounts =
        std::fs::read_to_string("/proc/mounts").map_err(|source| Error::Io { path: "/proc/mounts".into(), source })?;
    cgroup2_mount(&mounts).ok_or_else(|| Error::Io {
        path: "/proc/mounts".into(),
        source: std::io::Error::new(std::io::ErrorKind::NotFound, "no cgroup2 mount: the mesh needs cgroup v2"),
    })
}

/// The cgroup2 mount point in `mounts` (the text of /proc/mounts).
pub fn cgroup2_mount(mounts: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        let (_, dir, fstype) = (f.next()?, f.next()?, f.next()?);
        (fstype == "cgroup2").then(|| PathBuf::from(dir))
    })
}

/// Whether `path` is on a bpffs mount.
pub fn is_bpffs(path: &Path) -> bool {
    statfs(path).map(|s| s.filesystem_type() == BPF_FS_MAGIC).unwrap_or(false)
}

/// Makes sure `pin_dir` is on a bpffs, mounting one at /sys/fs/bpf if none is, then
/// creates `pin_dir`.
pub fn ensure_bpffs(pin_dir: &Path) -> Result<(), Error> {
    let bpffs = Path::new(BPFFS);
    if !is_bpffs(bpffs) && pin_dir.starts_with(bpffs) {
        std::fs::create_dir_all(bpffs).map_err(|source| Error::Io { path: bpffs.into(), source })?;
        mount(
            Some("bpffs"),
            bpffs,
            Some("bpf"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            None::<&str>,
        )
        .map_err(|source| Error::Sys { call: format!("mount bpffs on {BPFFS}"), source })?;
        tracing::info!(path = BPFFS, "mounted bpffs");
    }
    std::fs::create_dir_all(pin_dir).map_err(|source| Error::Io { path: pin_dir.into(), source })?;
    if !is_bpffs(pin_dir) {
        return Err(Error::Io {
            path: pin_dir.into(),
            source: std::io::Error::other("not on a bpffs mount; pin maps under /sys/fs/bpf"),
        });
    }
    Ok(())
}

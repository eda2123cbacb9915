//! Running socket calls inside a pod's network namespace.
//!
//! A socket belongs to the netns it was created in, for its whole life. The agent's
//! threads stay in the host (node) netns; to create a socket in a pod's netns, the
//! calling thread switches in, creates the socket, and switches straight back, with no
//! `.await` in between, so no other task ever runs in the wrong namespace.

use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use nix::sched::{CloneFlags, setns};

use super::Error;
use super::transparent::DeliveryRecord;

/// `NSFS_MAGIC` from `linux/magic.h`.
const NSFS_MAGIC: i64 = 0x6e73_6673;

/// The agent's own netns, captured once at start-up before any switching, with its
/// inode.
static HOST_NETNS: OnceLock<(File, u64)> = OnceLock::new();

/// A handle on a pod's network namespace. Holding it keeps the namespace alive, so a
/// pod the agent gives up on must drop every handle (and every socket in it).
#[derive(Debug)]
pub struct Netns {
    file: File,
    path: PathBuf,
    inode: u64,
    /// Set once the namespace is set up for transparent delivery
    /// ([`super::transparent`]): the agent then connects to the application from its
    /// client's address, recording each delivery here while it connects.
    transparent: Mutex<Option<Arc<dyn DeliveryRecord>>>,
}

impl Netns {
    /// Records the current thread's netns as the agent's own. Call once, first thing.
    pub fn init_host() -> Result<(), Error> {
        let path = Path::new("/proc/thread-self/ns/net");
        let f = File::open(path).map_err(|source| Error::Io { path: path.into(), source })?;
        let inode = f.metadata().map_err(|source| Error::Io { path: path.into(), source })?.ino();
        let _ = HOST_NETNS.set((f, inode));
        Ok(())
    }

    /// The inode of the agent's own netns, once [`Netns::init_host`] recorded it.
    pub fn host_inode() -> Option<u64> {
        HOST_NETNS.get().map(|(_, inode)| *inode)
    }

    /// A handle on the agent's own netns (recorded first if it was not): sockets "in"
    /// it are made right here. What a pod that shares the host's network gets, and
    /// what in-process tests run their pods in, without privileges.
    pub fn host() -> Result<Self, Error> {
        Self::init_host()?;
        Self::open(Path::new("/proc/thread-self/ns/net"))
    }

    /// Opens the netns at `path` (`/proc/<pid>/ns/net`).
    pub fn open(path: &Path) -> Result<Self, Error> {
        let file = File::open(path).map_err(|source| Error::Io { path: path.into(), source })?;
        Self::from_file(file, path.to_owned())
    }

    /// The netns of `fd` (handed over by the CNI plugin); `label` names it in errors.
    pub fn from_fd(fd: OwnedFd, label: impl Into<PathBuf>) -> Result<Self, Error> {
        Self::from_file(File::from(fd), label.into())
    }

    fn from_file(file: File, path: PathBuf) -> Result<Self, Error> {
        let meta = file.metadata().map_err(|source| Error::Io { path: path.clone(), source })?;
        // A network namespace file lives on nsfs; anything else (a regular file a
        // caller passed by mistake) is not one, and setns would fail later.
        if nix::sys::statfs::fstatfs(&file).map(|s| s.filesystem_type().0 != NSFS_MAGIC).unwrap_or(true) {
            return Err(Error::Io {
                path,
                source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a namespace (nsfs) file"),
            });
        }
        Ok(Self { file, inode: meta.ino(), path, transparent: Mutex::new(None) })
    }

    /// The namespace's inode: the same for every handle on it, and what the kernel
    /// tables key the pod by.
    pub fn inode(&self) -> u64 {
        self.inode
    }

    /// The namespace file, for attaching programs.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// The namespace path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether this is the agent's own namespace (a host-network pod, or in-process
    /// tests), which the agent never reconfigures.
    pub fn is_host(&self) -> bool {
        HOST_NETNS.get().is_some_and(|(_, inode)| *inode == self.inode)
    }

    /// Where deliveries into the namespace are recorded, when they come from the
    /// client's address.
    pub fn transparent(&self) -> Option<Arc<dyn DeliveryRecord>> {
        self.transparent.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Records that [`super::transparent::prepare`] set the namespace up (Some, with
    /// the kernel's table), or that deliveries come from the pod's own address (None).
    pub fn set_transparent(&self, record: Option<Arc<dyn DeliveryRecord>>) {
        *self.transparent.lock().unwrap_or_else(|p| p.into_inner()) = record;
    }

    /// Runs `f` with the current thread inside this netns.
    ///
    /// # Panics
    /// If the thread cannot return to the host netns: continuing would make every later
    /// socket on this thread land in the pod's namespace.
    pub fn run<R>(&self, f: impl FnOnce() -> R) -> Result<R, Error> {
        let (host, host_inode) = HOST_NETNS.get().ok_or_else(|| Error::Io {
            path: "/proc/thread-self/ns/net".into(),
            source: std::io::Error::other("Netns::init_host was not called"),
        })?;
        // Agent threads always stay in the host netns: nothing to switch.
        if self.inode == *host_inode {
            return Ok(f());
        }
        setns(self.file.as_fd(), CloneFlags::CLONE_NEWNET)
            .map_err(|source| Error::Sys { call: format!("setns {}", self.path.display()), source })?;
        let out = f();
        if let Err(e) = setns(host.as_fd(), CloneFlags::CLONE_NEWNET) {
            panic!("cannot return to the agent's network namespace: {e}");
        }
        Ok(out)
    }
}

//! Running socket calls inside a pod's network namespace.
//!
//! A socket belongs to the netns it was created in, for its whole life. The agent's
//! threads stay in the host (node) netns; to create a socket in a pod's netns, the
//! calling thread switches in, creates the socket, and switches straight back, with no
//! `.await` in between, so no other task ever runs in the wrong namespace.

use std::fs::File;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use nix::sched::{CloneFlags, setns};

use super::Error;

/// The agent's own netns, captured once at start-up before any switching.
static HOST_NETNS: OnceLock<File> = OnceLock::new();

/// A handle on a pod's network namespace.
#[derive(Debug)]
pub struct Netns {
    file: File,
    path: PathBuf,
}

impl Netns {
    /// Records the current thread's netns as the agent's own. Call once, first thing.
    pub fn init_host() -> Result<(), Error> {
        let path = Path::new("/proc/thread-self/ns/net");
        let f = File::open(path).map_err(|source| Error::Io { path: path.into(), source })?;
        let _ = HOST_NETNS.set(f);
        Ok(())
    }

    /// Opens a named netns (e.g. `/var/run/netns/<pod>`).
    pub fn open(path: &Path) -> Result<Self, Error> {
        let file = File::open(path).map_err(|source| Error::Io { path: path.into(), source })?;
        Ok(Self { file, path: path.to_owned() })
    }

    /// The namespace file, for attaching programs.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// The namespace path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` with the current thread inside this netns.
    ///
    /// # Panics
    /// If the thread cannot return to the host netns: continuing would make every later
    /// socket on this thread land in the pod's namespace.
    pub fn run<R>(&self, f: impl FnOnce() -> R) -> Result<R, Error> {
        let host = HOST_NETNS.get().ok_or_else(|| Error::Io {
            path: "/proc/thread-self/ns/net".into(),
            source: std::io::Error::other("Netns::init_host was not called"),
        })?;
        setns(self.file.as_fd(), CloneFlags::CLONE_NEWNET)
            .map_err(|source| Error::Sys { call: format!("setns {}", self.path.display()), source })?;
        let out = f();
        if let Err(e) = setns(host.as_fd(), CloneFlags::CLONE_NEWNET) {
            panic!("cannot return to the agent's network namespace: {e}");
        }
        Ok(out)
    }
}

//! Handing the running agent's sockets to its successor, so an upgrade, a downgrade or
//! a restart refuses no connection and resets none (docs/ARCHITECTURE.md, "Upgrades").
//!
//! The successor connects to the predecessor's unix socket (`SOCK_SEQPACKET`, 0600 in
//! the CNI socket's 0700 directory, and the peer must be the same user) before it loads
//! anything and says hello with its protocol number. The predecessor stops changing the
//! kernel tables and its pods, stops serving its admin ports, and sends every listening
//! socket it has (each pod's 15001, 15006, 15008 and DNS sockets, and the admin ports),
//! one per message with `SCM_RIGHTS`. The successor starts with those in place of
//! binding new ones ([`crate::transport::inherited`]); once it answers ready it says
//! `adopted`, and the predecessor stops accepting and serves the connections it has
//! until they end. Should the successor exit before that, the predecessor takes control
//! back: nothing was changed under it.
//!
//! Protocol numbers differ only when the exchange itself changes; a predecessor that
//! does not speak the successor's refuses with a message saying what to do, and the
//! successor exits with it rather than start beside a running agent.

use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use socket2::{Domain, SockAddr, Socket, Type};

use crate::cni::fdpass::{recv_with_fd, send_with_fd};
use crate::transport::inherited::{Inherited, SocketKey};

/// The version of the exchange below. Bump it only when a message changes meaning.
pub const PROTOCOL: u32 = 1;

/// The handoff socket's file name, beside the CNI socket.
pub const SOCKET_NAME: &str = "agent-handoff.sock";

/// How long either side waits for the other's next message while sockets are handed.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(30);

/// Largest message: a hello or one socket's key.
const MAX_MESSAGE: usize = 4096;

/// Errors of the handoff.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The unix socket could not be bound, reached, read or written.
    #[error("agent handoff socket {path}: {source}")]
    Io {
        /// The socket's path.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The running agent refused to hand over.
    #[error("the running agent refused to hand over its sockets: {reason}")]
    Refused {
        /// What it said.
        reason: String,
    },
    /// The other side sent something this side does not understand.
    #[error("agent handoff: {0}")]
    Protocol(String),
}

/// One message of the exchange, as JSON in one `SOCK_SEQPACKET` record.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Message {
    /// Successor → predecessor: who is asking.
    Hello {
        /// [`PROTOCOL`] of the successor.
        protocol: u32,
        /// The successor's version, for the logs.
        version: String,
    },
    /// Predecessor → successor: no handoff, and why.
    Refused { reason: String },
    /// Predecessor → successor: one socket, attached.
    Socket(SocketKey),
    /// Predecessor → successor: that was all of them.
    Sent { count: usize },
    /// Successor → predecessor: serving now; stop accepting.
    Adopted,
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |source| Error::Io { path: path.to_owned(), source }
}

fn send(socket: &Socket, message: &Message, fd: Option<&OwnedFd>, path: &Path) -> Result<(), Error> {
    let bytes = serde_json::to_vec(message).map_err(|e| Error::Protocol(e.to_string()))?;
    send_with_fd(socket.as_fd(), &bytes, fd.map(AsFd::as_fd)).map_err(io(path))
}

/// The next message, with the descriptor that came with it; `None` when the other side
/// closed.
fn recv(socket: &Socket, path: &Path) -> Result<Option<(Message, Option<OwnedFd>)>, Error> {
    let mut buf = [0u8; MAX_MESSAGE];
    let (len, fd) = recv_with_fd(socket.as_fd(), &mut buf).map_err(io(path))?;
    if len == 0 && fd.is_none() {
        return Ok(None);
    }
    let message = serde_json::from_slice(&buf[..len])
        .map_err(|e| Error::Protocol(format!("unreadable message ({len} bytes): {e}")))?;
    Ok(Some((message, fd)))
}

/// Whether the peer of `socket` runs as this process's user.
fn same_user(socket: &Socket) -> Result<(), String> {
    let cred = nix::sys::socket::getsockopt(socket, nix::sys::socket::sockopt::PeerCredentials)
        .map_err(|e| format!("reading the peer's credentials: {e}"))?;
    let me = nix::unistd::geteuid().as_raw();
    if cred.uid() != me {
        return Err(format!("peer uid {} is not this agent's ({me})", cred.uid()));
    }
    Ok(())
}

/// The agent running before this one, once it handed its sockets over; tell it
/// [`Predecessor::adopted`] once this agent serves.
#[derive(Debug)]
pub struct Predecessor {
    socket: Socket,
    path: PathBuf,
    /// Its version, for the logs.
    pub version: String,
}

impl Predecessor {
    /// Asks the agent listening at `path` for its sockets and puts them in `into`.
    /// `Ok(None)` when no agent listens there (a first start, or one after a stop).
    pub fn take_over(path: &Path, version: &str, into: &Inherited) -> Result<Option<Self>, Error> {
        let socket = Socket::new(Domain::UNIX, Type::SEQPACKET.cloexec(), None).map_err(io(path))?;
        let address = SockAddr::unix(path).map_err(io(path))?;
        match socket.connect(&address) {
            Ok(()) => {}
            Err(e) if matches!(e.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused) => {
                return Ok(None);
            }
            Err(e) => return Err(io(path)(e)),
        }
        same_user(&socket).map_err(|reason| Error::Refused { reason })?;
        socket.set_read_timeout(Some(EXCHANGE_TIMEOUT)).map_err(io(path))?;
        send(&socket, &Message::Hello { protocol: PROTOCOL, version: version.into() }, None, path)?;
        let mut received = 0usize;
        let mut predecessor_version = String::from("unknown");
        loop {
            match recv(&socket, path)? {
                None => return Err(Error::Protocol("the running agent closed the handoff before it was done".into())),
                Some((Message::Refused { reason }, _)) => return Err(Error::Refused { reason }),
                Some((Message::Hello { version, .. }, _)) => predecessor_version = version,
                Some((Message::Socket(key), Some(fd))) => {
                    received += 1;
                    if let Err(e) = into.insert(key, fd) {
                        // Closed, not served: the successor binds its own instead.
                        tracing::warn!(?key, error = %e, "a handed-over socket is not what it was announced as");
                    }
                }
                Some((Message::Socket(key), None)) => {
                    return Err(Error::Protocol(format!("socket {key:?} announced without its descriptor")));
                }
                Some((Message::Sent { count }, _)) if count == received => break,
                Some((Message::Sent { count }, _)) => {
                    return Err(Error::Protocol(format!("{count} sockets announced, {received} arrived")));
                }
                Some((Message::Adopted, _)) => return Err(Error::Protocol("unexpected message `adopted`".into())),
            }
        }
        Ok(Some(Self { socket, path: path.to_owned(), version: predecessor_version }))
    }

    /// Tells the predecessor this agent serves now: it stops accepting and drains.
    pub fn adopted(self) -> Result<(), Error> {
        send(&self.socket, &Message::Adopted, None, &self.path)
    }
}

/// The predecessor's side: the unix socket successors connect to.
#[derive(Debug)]
pub struct Listener {
    socket: Socket,
    path: PathBuf,
}

impl Listener {
    /// Binds `path` (replacing a file left there: the agent that made it has handed
    /// over, or is gone), mode 0600.
    pub fn bind(path: &Path) -> Result<Self, Error> {
        use std::os::unix::fs::PermissionsExt as _;
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(path)(e)),
        }
        let socket = Socket::new(Domain::UNIX, Type::SEQPACKET.cloexec(), None).map_err(io(path))?;
        socket.bind(&SockAddr::unix(path).map_err(io(path))?).map_err(io(path))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io(path))?;
        socket.listen(4).map_err(io(path))?;
        Ok(Self { socket, path: path.to_owned() })
    }

    /// Waits (blocking) for the next successor that says hello in this agent's
    /// protocol; one that does not is refused with what to do and logged.
    pub fn next(&self, version: &str) -> Result<Successor, Error> {
        loop {
            let (socket, _) = self.socket.accept().map_err(io(&self.path))?;
            let path = self.path.clone();
            match hello(&socket, &path, version) {
                Ok(their_version) => return Ok(Successor { socket, path, version: their_version }),
                Err(e) => tracing::error!(error = %e, "a would-be successor was turned away"),
            }
        }
    }
}

/// This agent's version and process, as a handoff names it in the other side's log.
pub fn own_version() -> String {
    format!("{} (pid {})", env!("CARGO_PKG_VERSION"), std::process::id())
}

/// Successors that said hello, accepted on a thread of their own (accepting blocks)
/// and passed to the agent's loop one at a time.
#[derive(Debug)]
pub struct Successors {
    rx: tokio::sync::mpsc::Receiver<Successor>,
    /// The listening socket, to shut when this agent stops without a successor.
    listener: Option<Socket>,
}

impl Successors {
    /// Starts accepting on `listener`.
    pub fn accept(listener: Listener) -> Self {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let handle = listener.socket.try_clone().ok();
        let version = own_version();
        let spawned = std::thread::Builder::new().name("handoff".into()).spawn(move || {
            loop {
                match listener.next(&version) {
                    Ok(successor) => {
                        if tx.blocking_send(successor).is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "no longer accepting successors");
                        return;
                    }
                }
            }
        });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "no handoff thread; this agent cannot hand over");
        }
        Self { rx, listener: handle }
    }

    /// The next successor.
    pub async fn recv(&mut self) -> Option<Successor> {
        self.rx.recv().await
    }

    /// Stops accepting: an agent that starts now finds nobody to take over from and
    /// starts afresh (this one is stopping on its own).
    pub fn close(&mut self) {
        if let Some(l) = self.listener.take() {
            let _ = l.shutdown(std::net::Shutdown::Both);
        }
        self.rx.close();
    }
}

/// Reads a successor's hello; refuses (and says why to it) one this agent cannot serve.
fn hello(socket: &Socket, path: &Path, version: &str) -> Result<String, Error> {
    let refuse = |reason: String| {
        let _ = send(socket, &Message::Refused { reason: reason.clone() }, None, path);
        Error::Refused { reason }
    };
    same_user(socket).map_err(refuse)?;
    socket.set_read_timeout(Some(EXCHANGE_TIMEOUT)).map_err(io(path))?;
    match recv(socket, path)? {
        Some((Message::Hello { protocol, version: theirs }, _)) if protocol == PROTOCOL => Ok(theirs),
        Some((Message::Hello { protocol, version: theirs }, _)) => Err(refuse(format!(
            "the running agent ({version}) hands over with protocol {PROTOCOL}, the new one ({theirs}) speaks \
             protocol {protocol}; roll out a version that speaks protocol {PROTOCOL} first, or stop the running \
             agent before starting the new one (its pods refuse connections until the new one is ready)"
        ))),
        Some((other, _)) => Err(refuse(format!("expected hello, got {other:?}"))),
        None => Err(Error::Protocol("the successor left before saying hello".into())),
    }
}

/// A successor that said hello: send it the sockets, then learn whether it took over.
#[derive(Debug)]
pub struct Successor {
    socket: Socket,
    path: PathBuf,
    /// Its version, for the logs.
    pub version: String,
}

/// How a handoff ended, seen from the predecessor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The successor serves: stop accepting, drain.
    Adopted,
    /// The successor went away before it served: take control back.
    Abandoned,
}

impl Successor {
    /// Sends `sockets` (each one's own descriptor: the caller keeps its copies serving
    /// until the outcome), then waits (blocking, for as long as the successor runs)
    /// for it to say it took over.
    pub fn hand_over(self, own_version: &str, sockets: &[(SocketKey, OwnedFd)]) -> Result<Outcome, Error> {
        let path = &self.path;
        send(&self.socket, &Message::Hello { protocol: PROTOCOL, version: own_version.into() }, None, path)?;
        for (key, fd) in sockets {
            send(&self.socket, &Message::Socket(*key), Some(fd), path)?;
        }
        send(&self.socket, &Message::Sent { count: sockets.len() }, None, path)?;
        // As long as it takes the successor to get its pods' certificates: no timeout;
        // its exit closes the socket.
        self.socket.set_read_timeout(None).map_err(io(path))?;
        match recv(&self.socket, path) {
            Ok(Some((Message::Adopted, _))) => Ok(Outcome::Adopted),
            Ok(None) => Ok(Outcome::Abandoned),
            Ok(Some((other, _))) => {
                tracing::error!(message = ?other, "unexpected message from the successor; keeping control");
                Ok(Outcome::Abandoned)
            }
            Err(e) => {
                tracing::error!(error = %e, "the successor's handoff failed; keeping control");
                Ok(Outcome::Abandoned)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listener_fd() -> (OwnedFd, SocketKey) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let fd = OwnedFd::from(l);
        let key = SocketKey::of(&fd, 42).unwrap();
        (fd, key)
    }

    #[test]
    fn sockets_cross_and_the_predecessor_learns_it_was_adopted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(SOCKET_NAME);
        let listener = Listener::bind(&path).unwrap();
        let (fd, key) = listener_fd();
        let queued = std::net::TcpStream::connect(key.addr).unwrap();
        let predecessor = std::thread::spawn(move || {
            let successor = listener.next("old").unwrap();
            assert_eq!(successor.version, "new");
            successor.hand_over("old", &[(key, fd)]).unwrap()
        });
        let inherited = Inherited::default();
        let taken = Predecessor::take_over(&path, "new", &inherited).unwrap().expect("a running agent");
        assert_eq!(taken.version, "old");
        let listener = inherited.tcp_listener(42, key.addr).expect("handed over");
        listener.set_nonblocking(false).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        assert_eq!(accepted.peer_addr().unwrap(), queued.local_addr().unwrap(), "the queued connection waited");
        taken.adopted().unwrap();
        assert_eq!(predecessor.join().unwrap(), Outcome::Adopted);
    }

    #[test]
    fn a_successor_that_leaves_early_gives_control_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(SOCKET_NAME);
        let listener = Listener::bind(&path).unwrap();
        let predecessor = std::thread::spawn(move || listener.next("old").unwrap().hand_over("old", &[]).unwrap());
        let taken = Predecessor::take_over(&path, "new", &Inherited::default()).unwrap().unwrap();
        drop(taken);
        assert_eq!(predecessor.join().unwrap(), Outcome::Abandoned);
    }

    #[test]
    fn another_protocol_is_refused_with_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(SOCKET_NAME);
        let listener = Listener::bind(&path).unwrap();
        std::thread::spawn(move || {
            let _ = listener.next("old");
        });
        let socket = Socket::new(Domain::UNIX, Type::SEQPACKET, None).unwrap();
        socket.connect(&SockAddr::unix(&path).unwrap()).unwrap();
        send(&socket, &Message::Hello { protocol: PROTOCOL + 1, version: "future".into() }, None, &path).unwrap();
        match recv(&socket, &path).unwrap() {
            Some((Message::Refused { reason }, None)) => {
                assert!(reason.contains("protocol 1") && reason.contains("stop the running agent"), "{reason}")
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn an_agent_stopping_on_its_own_is_not_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(SOCKET_NAME);
        let mut successors = Successors::accept(Listener::bind(&path).unwrap());
        successors.close();
        assert!(Predecessor::take_over(&path, "new", &Inherited::default()).unwrap().is_none());
    }

    #[test]
    fn no_running_agent_is_a_first_start() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(SOCKET_NAME);
        assert!(Predecessor::take_over(&path, "new", &Inherited::default()).unwrap().is_none());
        // A file left by an agent that died: nobody listens.
        drop(Listener::bind(&path).unwrap());
        assert!(Predecessor::take_over(&path, "new", &Inherited::default()).unwrap().is_none());
    }
}

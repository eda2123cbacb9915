//! The agent's end of the CNI socket: one request per connection, handed to the
//! agent's reconcile loop, which answers once the pod is captured (or why not).
//!
//! Only root on the node reaches the socket (0600 in a 0700 directory, peer checked
//! with `SO_PEERCRED`); connections are bounded in number, size and time, so even a
//! misbehaving runtime cannot make the agent allocate without bound.

use std::os::fd::{AsFd as _, OwnedFd};
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt as _;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::protocol::{MAX_REQUEST, Reply, Request};
use super::{Error, fdpass};

/// How long a client may take to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the agent may take to answer: longer than its wait for a pod the config
/// source has not shown it yet (the agent's loop), shorter than the runtime's CNI timeout.
const REPLY_TIMEOUT: Duration = Duration::from_secs(40);
/// Connections served at once; more wait in the listen backlog.
const MAX_CONNECTIONS: usize = 32;

/// A request for the agent's reconcile loop, with the pod's netns for `ADD`.
#[derive(Debug)]
pub struct CniRequest {
    /// What the plugin asked.
    pub request: Request,
    /// The pod's network namespace (`ADD` only).
    pub netns: Option<OwnedFd>,
    /// Where the answer goes.
    pub reply: oneshot::Sender<Reply>,
}

/// Binds the socket at `path` (its directory made 0700, the socket 0600), replacing a
/// socket left by an earlier run.
pub fn bind(path: &Path) -> Result<UnixListener, Error> {
    let io = |source| Error::Io { path: path.to_owned(), source };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|source| Error::Io { path: dir.to_owned(), source })?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|source| Error::Io { path: dir.to_owned(), source })?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(e)),
    }
    let listener = UnixListener::bind(path).map_err(io)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
    Ok(listener)
}

/// Serves the socket until `stop`, sending each request to `agent`.
pub async fn serve(listener: UnixListener, agent: mpsc::Sender<CniRequest>, stop: CancellationToken) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let permit = tokio::select! {
            _ = stop.cancelled() => return,
            p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
        };
        let stream = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "CNI socket accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let agent = agent.clone();
        tokio::spawn(async move {
            if let Err(e) = connection(stream, agent).await {
                tracing::warn!(error = %e, "CNI request failed");
            }
            drop(permit);
        });
    }
}

async fn connection(mut stream: UnixStream, agent: mpsc::Sender<CniRequest>) -> Result<(), Error> {
    let io = |source| Error::Io { path: "CNI socket".into(), source };
    let reply = match stream.peer_cred() {
        Ok(cred) if cred.uid() == 0 => handle(&stream, agent).await,
        Ok(cred) => Reply::Failed { reason: format!("only root may enroll pods (peer uid {})", cred.uid()) },
        Err(e) => return Err(io(e)),
    };
    stream.write_all(&reply.encode()).await.map_err(io)?;
    stream.shutdown().await.map_err(io)
}

async fn handle(stream: &UnixStream, agent: mpsc::Sender<CniRequest>) -> Reply {
    let mut buf = vec![0u8; MAX_REQUEST];
    let read = tokio::time::timeout(READ_TIMEOUT, async {
        loop {
            stream.readable().await?;
            match stream.try_io(tokio::io::Interest::READABLE, || fdpass::recv_with_fd(stream.as_fd(), &mut buf)) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                other => return other,
            }
        }
    })
    .await;
    let (len, netns) = match read {
        Ok(Ok(x)) => x,
        Ok(Err(e)) => return Reply::Failed { reason: format!("reading the request: {e}") },
        Err(_) => return Reply::Failed { reason: format!("no request within {READ_TIMEOUT:?}") },
    };
    let request = match Request::decode(&buf[..len]) {
        Ok(r) => r,
        Err(e) => return Reply::Failed { reason: e.to_string() },
    };
    if matches!(request, Request::Add { .. }) && netns.is_none() {
        return Reply::Failed { reason: "ADD without the pod's network namespace descriptor".into() };
    }
    let (tx, rx) = oneshot::channel();
    if agent.send(CniRequest { request, netns, reply: tx }).await.is_err() {
        return Reply::Failed { reason: "the agent is shutting down".into() };
    }
    match tokio::time::timeout(REPLY_TIMEOUT, rx).await {
        Ok(Ok(reply)) => reply,
        Ok(Err(_)) => Reply::Failed { reason: "the agent dropped the request".into() },
        Err(_) => Reply::Failed { reason: format!("no answer from the agent within {REPLY_TIMEOUT:?}") },
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd as _;

    use super::*;

    #[tokio::test]
    async fn a_request_reaches_the_agent_with_its_namespace_and_the_answer_comes_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/cni.sock");
        let listener = bind(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let (tx, mut rx) = mpsc::channel(4);
        let stop = CancellationToken::new();
        tokio::spawn(serve(listener, tx, stop.clone()));
        tokio::spawn(async move {
            while let Some(r) = rx.recv().await {
                let reply = match (&r.request, r.netns.is_some()) {
                    (Request::Add { name, .. }, true) => Reply::NotInMesh { reason: format!("{name} checked") },
                    _ => Reply::Removed,
                };
                let _ = r.reply.send(reply);
            }
        });

        let netns = std::fs::File::open("/proc/self/ns/net").unwrap();
        let client = std::os::unix::net::UnixStream::connect(&path).unwrap();
        let add = Request::Add { uid: "u".into(), namespace: "n".into(), name: "web".into(), ips: vec![] };
        let reply = tokio::task::spawn_blocking(move || {
            fdpass::send_with_fd(client.as_fd(), &add.encode(), Some(netns.as_fd())).unwrap();
            std::io::read_to_string(&client).unwrap()
        })
        .await
        .unwrap();
        assert_eq!(Reply::decode(reply.trim().as_bytes()).unwrap(), Reply::NotInMesh { reason: "web checked".into() });

        // ADD without a descriptor is refused before the agent sees it.
        let client = std::os::unix::net::UnixStream::connect(&path).unwrap();
        let add = Request::Add { uid: "u".into(), namespace: "n".into(), name: "web".into(), ips: vec![] };
        let reply = tokio::task::spawn_blocking(move || {
            fdpass::send_with_fd(client.as_fd(), &add.encode(), None).unwrap();
            std::io::read_to_string(&client).unwrap()
        })
        .await
        .unwrap();
        assert!(reply.contains("without the pod's network namespace"), "{reply}");
        stop.cancel();
    }
}

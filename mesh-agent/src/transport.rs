//! How the agent reaches things and bounds its connections: the [`Dialer`] that takes a
//! pod's connection to a destination (over the HBONE tunnel or in plaintext, decided in
//! one place), the HBONE client pool and the HBONE wire both ends speak, sockets made
//! in pods' network namespaces, the byte pump between two sockets, and the limits
//! every HTTP server and client of the agent runs with.
//!
//! Everything above it (the L4 proxy, the L7 proxy, later the gateway) reaches a
//! destination through [`Dialer::connect`]; nothing here knows about routes or policy.

pub mod accept;
pub mod coalesce;
mod connect;
pub mod copy;
mod double;
pub mod hbone;
pub mod inherited;
pub mod limits;
pub mod linger;
pub mod originate;
mod pool;
pub mod sockets;

pub use connect::{Dialer, Upstream, lookup};
#[cfg(test)]
pub(crate) use pool::handshake;
pub use pool::{Pool, Tunnel};

use std::net::SocketAddr;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// How long a TCP connect to a peer or an application may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a TLS handshake may take before the connection is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors of the proxy.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An HBONE connection closed before a stream could be sent on it (a fresh one
    /// before its first stream, a pooled one whose peer went away).
    #[error("HBONE connection to {addr} closed before use")]
    Closed {
        /// The peer agent.
        addr: SocketAddr,
    },
    /// An I/O error on a connection.
    #[error("{what} {addr}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The address involved.
        addr: SocketAddr,
        /// The error.
        source: std::io::Error,
    },
    /// A timeout.
    #[error("{what} {addr}: timed out after {after:?}")]
    Timeout {
        /// What was being done.
        what: &'static str,
        /// The address involved.
        addr: SocketAddr,
        /// The timeout.
        after: Duration,
    },
    /// The TLS handshake failed (peer identity, chain, protocol).
    #[error("TLS with {addr}: {}", tls_reason(source))]
    Tls {
        /// The peer.
        addr: SocketAddr,
        /// The error.
        source: std::io::Error,
    },
    /// HTTP/2 failure on the tunnel.
    #[error("HBONE to {addr}: {source}")]
    Http {
        /// The peer.
        addr: SocketAddr,
        /// The error.
        source: h2::Error,
    },
    /// The destination is on another network, and no east-west gateway leads there.
    #[error("{target} is on network {network}, which no east-west gateway leads to")]
    NoRoute {
        /// The destination.
        target: SocketAddr,
        /// Its network.
        network: String,
    },
    /// The peer agent refused the CONNECT.
    #[error("HBONE to {addr}: CONNECT {target} answered {status}")]
    Refused {
        /// The peer.
        addr: SocketAddr,
        /// The requested target.
        target: SocketAddr,
        /// The status.
        status: http::StatusCode,
    },
    /// TLS toward a destination outside the mesh could not be set up (a file the
    /// DestinationRule names, a bad SNI).
    #[error("TLS origination to {addr}: {reason}")]
    Origination {
        /// The destination.
        addr: SocketAddr,
        /// Why.
        reason: String,
    },
    /// A ServiceEntry's destination could not be found (a DNS lookup failed or found
    /// nothing).
    #[error("{0}")]
    Lookup(String),
    /// Entering a pod netns or another data-plane operation failed.
    #[error(transparent)]
    Dataplane(#[from] crate::dataplane::Error),
    /// No certificate for an identity.
    #[error(transparent)]
    Identity(#[from] crate::identity::Error),
}

impl Error {
    /// A peer ended a connection mid-copy with a reset (a client that gave up, a
    /// server that closed early): the connection's business, not the agent's, so
    /// it is logged at debug rather than as a warning per connection.
    pub fn is_reset_mid_copy(&self) -> bool {
        matches!(self, Error::Io { what: "copy to", source, .. } if matches!(
            source.kind(),
            std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionAborted
        ))
    }
}

/// A TLS failure as an operator reads it: our own verifier's reason (wrong identity,
/// foreign trust domain) in plain words rather than rustls' nested debug form.
fn tls_reason(e: &std::io::Error) -> String {
    if let Some(rustls::Error::InvalidCertificate(rustls::CertificateError::Other(other))) =
        e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        return format!("invalid peer certificate: {}", other.0);
    }
    e.to_string()
}

/// Serves an HTTP server connection until it ends. When the agent starts draining it
/// is asked to finish (`goaway`: hyper's `graceful_shutdown`, an HTTP/2 GOAWAY or, on
/// HTTP/1, a close after the response in flight), so peers open new streams elsewhere
/// while the ones in flight complete.
pub async fn until_drained<C, T>(conn: C, shutdown: &CancellationToken, goaway: impl FnOnce(std::pin::Pin<&mut C>)) -> T
where
    C: std::future::Future<Output = T>,
{
    serve_until(conn, shutdown.cancelled(), goaway).await
}

/// How long a client's HTTP connection keeps being served once the agent drains
/// before it is asked to finish: an HTTP/1 client in the middle of its requests gets
/// `connection: close` on its next response ([`close_when_draining`]) and closes itself,
/// which no request can race; one that sent nothing meanwhile is closed.
pub const CLIENT_DRAIN_GRACE: Duration = Duration::from_secs(1);

/// Serves a pod's HTTP connection (the client's side) until it ends; once the agent
/// drains, [`until_drained`] after [`CLIENT_DRAIN_GRACE`].
pub async fn until_drained_gently<C, T>(
    conn: C,
    shutdown: &CancellationToken,
    goaway: impl FnOnce(std::pin::Pin<&mut C>),
) -> T
where
    C: std::future::Future<Output = T>,
{
    let drained_a_while = async {
        shutdown.cancelled().await;
        tokio::time::sleep(CLIENT_DRAIN_GRACE).await;
    };
    serve_until(conn, drained_a_while, goaway).await
}

/// Serves `conn` until it ends, asking it to finish (`goaway`) once `finish` is done.
async fn serve_until<C, T>(
    conn: C,
    finish: impl std::future::Future<Output = ()>,
    goaway: impl FnOnce(std::pin::Pin<&mut C>),
) -> T
where
    C: std::future::Future<Output = T>,
{
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => return r,
        () = finish => goaway(conn.as_mut()),
    }
    conn.await
}

/// Marks an HTTP/1 response `connection: close` once the agent drains, so the client
/// takes its next request elsewhere (the agent that took over) instead of racing a
/// close. Upgrades are left alone; HTTP/2 hears GOAWAY instead.
pub fn close_when_draining<B>(
    request_version: http::Version,
    shutdown: &CancellationToken,
    resp: &mut http::Response<B>,
) {
    if shutdown.is_cancelled()
        && request_version < http::Version::HTTP_2
        && resp.status() != http::StatusCode::SWITCHING_PROTOCOLS
    {
        resp.headers_mut().insert(http::header::CONNECTION, http::HeaderValue::from_static("close"));
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::sync::Arc;
    use std::time::Duration;

    use bytes::Bytes;
    use http_body_util::Empty;
    use hyper::{Request, Response};
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use tokio::net::{TcpListener, TcpStream};
    use tokio::sync::Notify;
    use tokio_util::sync::CancellationToken;

    use super::{Error, limits, until_drained};

    #[test]
    fn only_a_reset_mid_copy_is_the_peers_business() {
        let io = |what, kind: std::io::ErrorKind| Error::Io {
            what,
            addr: "10.0.0.1:80".parse().unwrap(),
            source: kind.into(),
        };
        assert!(io("copy to", std::io::ErrorKind::ConnectionReset).is_reset_mid_copy());
        assert!(io("copy to", std::io::ErrorKind::BrokenPipe).is_reset_mid_copy());
        assert!(!io("connect", std::io::ErrorKind::ConnectionReset).is_reset_mid_copy(), "a destination refusing");
        assert!(!io("copy to", std::io::ErrorKind::TimedOut).is_reset_mid_copy());
    }

    #[tokio::test]
    async fn a_draining_http2_server_says_goaway_and_finishes_what_is_in_flight() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (shutdown, release) = (CancellationToken::new(), Arc::new(Notify::new()));
        let server = {
            let (shutdown, release) = (shutdown.clone(), release.clone());
            tokio::spawn(async move {
                let (stream, _) = listener.accept().await.unwrap();
                let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    let release = release.clone();
                    async move {
                        if req.uri().path() == "/slow" {
                            release.notified().await;
                        }
                        Ok::<_, Infallible>(Response::new(Empty::<Bytes>::new()))
                    }
                });
                let conn = limits::h2_server().serve_connection(TokioIo::new(stream), svc);
                until_drained(conn, &shutdown, |c| c.graceful_shutdown()).await
            })
        };
        let stream = TcpStream::connect(addr).await.unwrap();
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await.unwrap();
        tokio::spawn(conn);
        let get = |path: &str| Request::get(format!("http://mesh{path}")).body(Empty::<Bytes>::new()).unwrap();
        let slow = tokio::spawn(sender.send_request(get("/slow")));
        tokio::time::sleep(Duration::from_millis(100)).await;

        shutdown.cancel();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let refused = match sender.ready().await {
            Err(_) => true,
            Ok(()) => sender.send_request(get("/fast")).await.is_err(),
        };
        assert!(refused, "a new stream after GOAWAY is not served");

        release.notify_one();
        let slow = tokio::time::timeout(Duration::from_secs(5), slow).await.unwrap().unwrap();
        assert_eq!(slow.unwrap().status(), 200, "the stream in flight finishes");
        let served = tokio::time::timeout(Duration::from_secs(5), server).await.unwrap().unwrap();
        assert!(served.is_ok(), "the connection ends cleanly: {served:?}");
    }
}

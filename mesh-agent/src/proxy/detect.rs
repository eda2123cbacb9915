//! What a connection speaks, told from its first bytes: HTTP (routed or judged per
//! request) or anything else (opaque TCP). Every listener asks here: outbound peeks at
//! a socket, inbound reads the first bytes of a tunnel stream and replays them.

use std::io;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt as _};
use tokio::net::TcpStream;

/// How long the first bytes may take before a connection is treated as opaque TCP:
/// server-first protocols (databases, SMTP) send nothing until the server speaks, so
/// detection must give up quickly rather than stall them.
pub const DETECT_TIMEOUT: Duration = Duration::from_millis(300);

/// What a connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// HTTP/1.x or HTTP/2 (prior knowledge).
    Http,
    /// Anything else, including TLS the application terminates itself.
    Opaque,
}

/// The protocol `first` bytes show, or None when they are too few to tell.
pub fn classify(first: &[u8]) -> Option<Protocol> {
    const METHODS: &[&[u8]] =
        &[b"GET ", b"POST ", b"PUT ", b"DELETE ", b"HEAD ", b"OPTIONS ", b"PATCH ", b"TRACE ", b"PRI * HTTP/2"];
    if METHODS.iter().any(|m| first.len() >= m.len() && first.starts_with(m)) {
        Some(Protocol::Http)
    } else if first.len() >= 14 || first.first().is_some_and(|b| !b.is_ascii_uppercase()) {
        // Longer than every method prefix, or a first byte no method starts with.
        Some(Protocol::Opaque)
    } else {
        None
    }
}

/// Whether `first` bytes are certainly HTTP.
pub fn is_http(first: &[u8]) -> bool {
    classify(first) == Some(Protocol::Http)
}

/// Peeks at a socket's first bytes, leaving them to be read: the protocol, decided
/// within [`DETECT_TIMEOUT`] (opaque when the client stays silent or goes away).
pub async fn peek(stream: &TcpStream) -> Protocol {
    let mut buf = [0u8; 16];
    let deadline = tokio::time::Instant::now() + DETECT_TIMEOUT;
    loop {
        let n = match tokio::time::timeout_at(deadline, stream.peek(&mut buf)).await {
            Ok(Ok(n)) => n,
            _ => return Protocol::Opaque,
        };
        if n == 0 {
            return Protocol::Opaque;
        }
        if let Some(p) = classify(&buf[..n]) {
            return p;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// The largest client hello read for its SNI: one TLS record.
const MAX_HELLO: usize = 16 * 1024 + 5;

/// The SNI of the TLS client hello waiting on `stream`, read with `peek` so the bytes
/// stay for the destination.
pub async fn peek_sni(stream: &TcpStream) -> Result<String, String> {
    let mut buf = vec![0u8; MAX_HELLO];
    let mut last = 0;
    loop {
        let n = stream.peek(&mut buf).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("closed before a client hello".into());
        }
        match sni_in_hello(&buf[..n])? {
            Some(name) => return Ok(name),
            None if n < buf.len() => {
                if n == last {
                    // Nothing new yet: wait for more bytes rather than spin on peek.
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                last = n;
            }
            None => return Err("client hello larger than one record".into()),
        }
    }
}

/// The SNI of the TLS client hello that `bytes` start with: None while the hello is
/// incomplete, an error when the bytes are not a client hello or name no server.
pub fn sni_in_hello(bytes: &[u8]) -> Result<Option<String>, String> {
    let mut acceptor = rustls::server::Acceptor::default();
    let mut rest = bytes;
    acceptor.read_tls(&mut rest).map_err(|e| e.to_string())?;
    match acceptor.accept() {
        Ok(Some(hello)) => {
            hello.client_hello().server_name().map(|n| Some(n.to_owned())).ok_or_else(|| "no SNI".to_string())
        }
        Ok(None) => Ok(None),
        Err((e, _)) => Err(format!("not a TLS client hello: {e}")),
    }
}

/// How long a connection to an unknown address may take to show the name it is for.
const NAME_TIMEOUT: Duration = Duration::from_secs(1);

/// The name a connection waiting on `stream` asks for, read with `peek` so the bytes
/// stay for the destination: the Host header of an HTTP/1 request, or the SNI of a
/// TLS client hello. None when the bytes carry no name, the client stays silent for
/// [`NAME_TIMEOUT`], or they are neither.
pub async fn peek_name(stream: &TcpStream) -> Option<String> {
    let mut first = [0u8; 1];
    let n = tokio::time::timeout(NAME_TIMEOUT, stream.peek(&mut first)).await.ok()?.ok()?;
    if n == 0 {
        return None;
    }
    if first[0] == 0x16 {
        return tokio::time::timeout(NAME_TIMEOUT, peek_sni(stream)).await.ok()?.ok();
    }
    tokio::time::timeout(NAME_TIMEOUT, peek_host(stream)).await.ok()?
}

/// The largest HTTP/1 head read for its Host header.
const MAX_HEAD: usize = 8 * 1024;

async fn peek_host(stream: &TcpStream) -> Option<String> {
    let mut buf = vec![0u8; MAX_HEAD];
    let mut last = 0;
    loop {
        let n = stream.peek(&mut buf).await.ok()?;
        if n == 0 || classify(&buf[..n]) == Some(Protocol::Opaque) {
            return None;
        }
        match host_in_head(&buf[..n]) {
            HeadScan::Found(host) => return Some(host),
            HeadScan::Ended => return None,
            HeadScan::Partial if n == buf.len() => return None,
            HeadScan::Partial => {
                if n == last {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                last = n;
            }
        }
    }
}

/// What the start of an HTTP/1 request says of its Host.
#[derive(Debug, PartialEq, Eq)]
pub enum HeadScan {
    /// The Host header, lower-cased, without a port.
    Found(String),
    /// The head ended without one.
    Ended,
    /// Not all of the head is here yet.
    Partial,
}

/// What the start of an HTTP/1 request (`bytes`) says of its Host.
pub fn host_in_head(bytes: &[u8]) -> HeadScan {
    // Whole lines only: the request line first, then headers until the empty line.
    let mut lines = bytes.split(|b| *b == b'\n');
    let complete = bytes.iter().filter(|b| **b == b'\n').count();
    let _request_line = lines.next();
    for line in lines.take(complete.saturating_sub(1)) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            return HeadScan::Ended;
        }
        let Some(colon) = line.iter().position(|b| *b == b':') else { continue };
        if line[..colon].eq_ignore_ascii_case(b"host") {
            let value = String::from_utf8_lossy(&line[colon + 1..]).trim().to_ascii_lowercase();
            // `name:port`, or `[v6]:port`.
            let host = match value.strip_prefix('[') {
                Some(v6) => format!("[{}]", v6.split(']').next().unwrap_or_default()),
                None => value.split(':').next().unwrap_or_default().to_string(),
            };
            return HeadScan::Found(host);
        }
    }
    HeadScan::Partial
}

/// Reads the first bytes of `s` (a stream that cannot be peeked, such as an HBONE
/// tunnel) until they tell the protocol, `timeout` passes or the peer stops sending.
/// The caller replays them ([`super::prefixed::Prefixed`]).
pub async fn read_first<S: AsyncRead + Unpin>(s: &mut S, timeout: Duration) -> io::Result<Vec<u8>> {
    let mut first = Vec::with_capacity(64);
    let mut buf = [0u8; 64];
    let deadline = tokio::time::Instant::now() + timeout;
    while classify(&first).is_none() {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(0)) | Err(_) => break,
            Ok(Ok(n)) => first.extend_from_slice(&buf[..n]),
            Ok(Err(e)) => return Err(e),
        }
    }
    Ok(first)
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    async fn pair() -> (TcpStream, TcpStream) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (server, _) = l.accept().await.unwrap();
        (client, server)
    }

    #[test]
    fn http_methods_and_the_h2_preface_only() {
        assert!(is_http(b"GET / HTTP/1.1\r\n"));
        assert!(is_http(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"));
        assert_eq!(classify(b"\x16\x03\x01\x02\x00"), Some(Protocol::Opaque), "TLS ClientHello is not HTTP");
        assert_eq!(classify(b"GE"), None, "too short to tell");
        assert_eq!(classify(b"SSH-2.0-OpenSSH"), Some(Protocol::Opaque));
    }

    #[tokio::test]
    async fn http_is_detected_and_left_unread() {
        let (mut client, mut accepted) = pair().await;
        client.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        assert_eq!(peek(&accepted).await, Protocol::Http);
        let mut first = [0u8; 3];
        accepted.read_exact(&mut first).await.unwrap();
        assert_eq!(&first, b"GET", "peeked bytes are still there for the HTTP server");
    }

    #[tokio::test]
    async fn a_silent_client_is_not_stalled_past_the_detection_timeout() {
        // A server-first protocol: the client waits for the server's greeting.
        let (_client, accepted) = pair().await;
        let started = std::time::Instant::now();
        assert_eq!(peek(&accepted).await, Protocol::Opaque);
        assert!(started.elapsed() < DETECT_TIMEOUT + Duration::from_millis(200));
    }

    #[tokio::test]
    async fn tls_and_binary_protocols_are_not_http() {
        let (mut client, accepted) = pair().await;
        client.write_all(&[0x16, 0x03, 0x01, 0x00, 0xa5, 0x01]).await.unwrap();
        let started = std::time::Instant::now();
        assert_eq!(peek(&accepted).await, Protocol::Opaque);
        assert!(started.elapsed() < Duration::from_millis(100), "decided on the first byte");
    }

    #[tokio::test]
    async fn read_first_stops_once_it_can_tell_and_on_silence() {
        let (mut a, mut b) = tokio::io::duplex(1024);
        a.write_all(b"GET /x HTTP/1.1\r\n\r\n").await.unwrap();
        let first = read_first(&mut b, Duration::from_secs(5)).await.unwrap();
        assert!(is_http(&first));

        let (_quiet, mut server_first) = tokio::io::duplex(64);
        let started = std::time::Instant::now();
        assert!(read_first(&mut server_first, Duration::from_millis(100)).await.unwrap().is_empty());
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn the_host_header_is_found_in_whole_lines_only() {
        let head = b"GET / HTTP/1.1\r\nUser-Agent: x\r\nHOST: API.Example.com:8080\r\n\r\n";
        assert_eq!(host_in_head(head), HeadScan::Found("api.example.com".into()));
        assert_eq!(host_in_head(b"GET / HTTP/1.1\r\nHost: api.exa"), HeadScan::Partial);
        assert_eq!(host_in_head(b"GET / HTTP/1.1\r\nAccept: */*\r\n\r\n"), HeadScan::Ended);
        assert_eq!(host_in_head(b"GET / HTTP/1.1\nHost: plain.example\n\n"), HeadScan::Found("plain.example".into()));
    }
}

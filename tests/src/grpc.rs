//! One gRPC unary call over h2c, as the lab's clients make it: the echo app's `grpc`
//! command and the kubelet stand-in's `grpc.health.v1` probes.

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Request};
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;

/// What came back.
#[derive(Debug)]
pub struct Reply {
    /// HTTP status.
    pub http_status: u16,
    /// `grpc-status`, from the trailers (or a trailers-only answer's headers).
    pub grpc_status: Option<String>,
    /// The response message, without its 5-byte frame header.
    pub message: Vec<u8>,
}

/// Calls `path` on `addr` (`host:port`) with `message` framed as gRPC, and `headers`.
pub async fn unary(
    addr: &str,
    path: &str,
    message: &[u8],
    headers: &[(HeaderName, HeaderValue)],
) -> anyhow::Result<Reply> {
    let tcp = TcpStream::connect(addr).await?;
    let (mut sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp)).await?;
    tokio::spawn(conn);
    let mut frame = vec![0u8];
    frame.extend_from_slice(&u32::try_from(message.len())?.to_be_bytes());
    frame.extend_from_slice(message);
    let mut req = Request::post(format!("http://{addr}{path}"))
        .header(http::header::CONTENT_TYPE, "application/grpc")
        .header("te", "trailers")
        .body(Full::new(Bytes::from(frame)))?;
    for (name, value) in headers {
        req.headers_mut().insert(name.clone(), value.clone());
    }
    let res = sender.send_request(req).await?;
    let http_status = res.status().as_u16();
    let mut grpc_status = res.headers().get("grpc-status").and_then(|v| v.to_str().ok()).map(str::to_owned);
    let mut body = res.into_body();
    let mut data = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame?;
        if let Some(t) = frame.trailers_ref() {
            grpc_status = t.get("grpc-status").and_then(|v| v.to_str().ok()).map(str::to_owned).or(grpc_status);
        } else if let Some(d) = frame.data_ref() {
            data.extend_from_slice(d);
        }
    }
    Ok(Reply { http_status, grpc_status, message: data.get(5..).unwrap_or_default().to_vec() })
}

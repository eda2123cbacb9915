//! HBONE client: pooled HTTP/2 connections to peer agents, one CONNECT stream per
//! proxied TCP connection.
//!
//! Invariants: a pooled connection is keyed by (source pod, destination identity,
//! destination address), so a stream never rides a connection authenticated as another
//! workload; a connection that failed or closed is never handed out again.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::Empty;
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use mesh_common::ports;
use rustls::pki_types::ServerName;
use tokio_rustls::TlsConnector;

use super::hbone::{CONNECTION_WINDOW, STREAM_WINDOW};
use super::{CONNECT_TIMEOUT, Error, HANDSHAKE_TIMEOUT, ProxyContext, sockets};
use crate::dataplane::Netns;
use crate::identity::Identity;
use crate::state::Workload;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    /// `namespace/name` of the source pod: connections leave from its netns.
    source_pod: String,
    destination: Identity,
    addr: SocketAddr,
}

/// The pool.
#[derive(Debug, Default)]
pub struct Pool {
    conns: Mutex<HashMap<Key, SendRequest<Empty<Bytes>>>>,
}

impl Pool {
    /// Opens a tunnelled connection from `source` to `target` (a port of `dest`),
    /// reusing a pooled HTTP/2 connection when one is open.
    pub async fn connect(
        &self,
        ctx: &ProxyContext,
        source: &Workload,
        netns: &Netns,
        dest: &Workload,
        target: SocketAddr,
    ) -> Result<TokioIo<hyper::upgrade::Upgraded>, Error> {
        let key = Key {
            source_pod: format!("{}/{}", source.namespace, source.name),
            destination: dest.identity.clone(),
            addr: SocketAddr::new(target.ip(), ports::INBOUND_HBONE),
        };
        let pooled = self.conns.lock().unwrap_or_else(|p| p.into_inner()).get(&key).filter(|s| !s.is_closed()).cloned();
        let mut sender = match pooled {
            Some(s) => s,
            None => {
                let s = self.dial(ctx, source, netns, &key).await?;
                self.conns.lock().unwrap_or_else(|p| p.into_inner()).insert(key.clone(), s.clone());
                s
            }
        };
        sender.ready().await.map_err(|source| Error::Http { addr: key.addr, source })?;
        let req = Request::builder()
            .method(Method::CONNECT)
            .uri(target.to_string())
            .body(Empty::new())
            .expect("CONNECT request from a socket address is always valid");
        let res = sender.send_request(req).await.map_err(|source| {
            self.forget(&key);
            Error::Http { addr: key.addr, source }
        })?;
        if res.status() != StatusCode::OK {
            return Err(Error::Refused { addr: key.addr, target, status: res.status() });
        }
        let upgraded = hyper::upgrade::on(res).await.map_err(|source| Error::Http { addr: key.addr, source })?;
        Ok(TokioIo::new(upgraded))
    }

    fn forget(&self, key: &Key) {
        self.conns.lock().unwrap_or_else(|p| p.into_inner()).remove(key);
    }

    async fn dial(
        &self,
        ctx: &ProxyContext,
        source: &Workload,
        netns: &Netns,
        key: &Key,
    ) -> Result<SendRequest<Empty<Bytes>>, Error> {
        let tls = crate::identity::client_config(
            ctx.certs.clone(),
            source.identity.clone(),
            key.destination.clone(),
            &ctx.verifier,
        )?;
        let tcp = sockets::connect_in(netns, key.addr, ctx.bypass_mark, CONNECT_TIMEOUT).await?;
        // The server name is not used for verification (the SPIFFE identity is); it only
        // fills SNI, so an IP address (which rustls does not send as SNI) is enough.
        let name = ServerName::IpAddress(key.addr.ip().into());
        let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, TlsConnector::from(tls).connect(name, tcp)).await {
            Ok(Ok(s)) => s,
            Ok(Err(source)) => return Err(Error::Tls { addr: key.addr, source }),
            Err(_) => {
                return Err(Error::Timeout { what: "TLS handshake with", addr: key.addr, after: HANDSHAKE_TIMEOUT });
            }
        };
        let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|source| Error::Http { addr: key.addr, source })?;
        let addr = key.addr;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%addr, error = %e, "HBONE connection closed");
            }
        });
        tracing::debug!(source = %key.source_pod, destination = %key.destination, %addr, "HBONE connection opened");
        Ok(sender)
    }
}

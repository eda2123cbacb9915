//! `meshctl dashboard`: opens a dashboard on a local port, as `istioctl dashboard` does.
//!
//! - `mesh` (the default): the mesh's own page, with the data of every agent named by
//!   `--admin` merged (each agent only sees its own node).
//! - `kiali`, `jaeger`, `prometheus`, `grafana`: the addon's pod (by its `app` label in
//!   the addons' namespace), port-forwarded as istioctl does: each connection to the
//!   local port becomes a port-forward stream through the API server (the pod's
//!   `portforward` subresource over WebSocket, with the user's credentials), so
//!   anything HTTP carries, WebSocket upgrades included, reaches the addon.
//!
//! The local port answers only to a loopback `Host` (the first request of each
//! connection is read for it), so a web page cannot reach it by DNS rebinding.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::admin::dashboard::{AgentView, CSP, DashboardData, PAGE, host_is_local};

/// Which dashboard.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Target {
    /// The mesh's own page: service graph, workloads, policies, denials, config.
    Mesh,
    /// Kiali (the `kiali` addon).
    Kiali,
    /// Jaeger's UI (the `jaeger` addon).
    Jaeger,
    /// Prometheus (the `prometheus` addon).
    Prometheus,
    /// Grafana with Istio's dashboards (the `grafana` addon).
    Grafana,
}

impl Target {
    /// The addon's `app` label and the port its UI listens on (istioctl's local
    /// defaults are the same ports).
    pub fn addon(self) -> Option<(&'static str, u16)> {
        match self {
            Target::Mesh => None,
            Target::Kiali => Some(("kiali", 20001)),
            Target::Jaeger => Some(("jaeger", 16686)),
            Target::Prometheus => Some(("prometheus", 9090)),
            Target::Grafana => Some(("grafana", 3000)),
        }
    }

    /// The local port used when none is given.
    pub fn default_port(self) -> u16 {
        self.addon().map_or(15100, |(_, port)| port)
    }
}

/// Why a dashboard cannot open.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No running pod of the addon.
    #[error(
        "no running pod with label app={app} in namespace {namespace}: install the addon (kubectl apply -k deploy/addons) or pass -n"
    )]
    NoPod {
        /// The addon.
        app: &'static str,
        /// Where it was looked for.
        namespace: String,
    },
    /// The API server refused or failed the lookup.
    #[error("listing pods app={app} in {namespace}: {source}")]
    Api {
        /// The addon.
        app: &'static str,
        /// Where it was looked for.
        namespace: String,
        /// kube's error.
        source: kube::Error,
    },
}

/// The running pod of an addon and the port to proxy to.
pub async fn addon_pod(client: &kube::Client, namespace: &str, target: Target) -> Result<(String, u16), Error> {
    use k8s_openapi::api::core::v1::Pod;
    let Some((app, port)) = target.addon() else {
        return Err(Error::NoPod { app: "mesh", namespace: namespace.into() });
    };
    let pods: kube::Api<Pod> = kube::Api::namespaced(client.clone(), namespace);
    for selector in [format!("app={app}"), format!("app.kubernetes.io/name={app}")] {
        let list = pods
            .list(&kube::api::ListParams::default().labels(&selector))
            .await
            .map_err(|source| Error::Api { app, namespace: namespace.into(), source })?;
        let running = list.items.into_iter().find(|p| {
            p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
                && p.metadata.deletion_timestamp.is_none()
        });
        if let Some(pod) = running {
            // The addon's own port when it declares the usual one or none; else the
            // first it declares (an addon installed with another port).
            let declared: Vec<u16> = pod
                .spec
                .iter()
                .flat_map(|s| &s.containers)
                .flat_map(|c| c.ports.iter().flatten())
                .filter_map(|p| u16::try_from(p.container_port).ok())
                .collect();
            let port = if declared.is_empty() || declared.contains(&port) { port } else { declared[0] };
            return Ok((pod.metadata.name.unwrap_or_default(), port));
        }
    }
    Err(Error::NoPod { app, namespace: namespace.into() })
}

/// How long one agent may take to answer.
const AGENT_TIMEOUT: Duration = Duration::from_secs(5);

/// Every agent's dashboard data, merged; an agent that cannot be asked is listed with
/// why.
pub async fn gather(admins: &[SocketAddr]) -> DashboardData {
    let asks = admins.iter().map(|admin| async move {
        let answer = tokio::time::timeout(AGENT_TIMEOUT, crate::cli::proxy_config::get_json(*admin, "/dashboard/data"))
            .await
            .unwrap_or_else(|_| Err(format!("{admin}: no answer within {}s", AGENT_TIMEOUT.as_secs())));
        match answer.and_then(|v| serde_json::from_value::<DashboardData>(v).map_err(|e| format!("{admin}: {e}"))) {
            Ok(data) => data,
            Err(error) => DashboardData {
                agents: vec![AgentView {
                    node: admin.to_string(),
                    ready: false,
                    version: 0,
                    config_digest: String::new(),
                    kinds: Default::default(),
                    config: Vec::new(),
                    error: Some(error),
                }],
                ..Default::default()
            },
        }
    });
    DashboardData::merge(futures::future::join_all(asks).await)
}

type Reply = Response<UnsyncBoxBody<Bytes, std::io::Error>>;

fn reply(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Reply {
    let mut r = Response::new(Full::new(body.into()).map_err(|never| match never {}).boxed_unsync());
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static(content_type));
    r
}

/// What the local server serves.
#[derive(Clone)]
pub enum Backend {
    /// The mesh page, with the data of these agents.
    Mesh(std::sync::Arc<Vec<SocketAddr>>),
    /// An addon's pod, port-forwarded.
    Addon {
        /// The pods of the addon's namespace, with the user's credentials.
        pods: kube::Api<k8s_openapi::api::core::v1::Pod>,
        /// The addon's pod.
        pod: String,
        /// Its port.
        port: u16,
    },
}

impl Backend {
    /// `pod`'s `port` in `namespace`, port-forwarded.
    pub fn addon(client: kube::Client, namespace: &str, pod: &str, port: u16) -> Self {
        Backend::Addon { pods: kube::Api::namespaced(client, namespace), pod: pod.into(), port }
    }

    /// The mesh page's answer to one request.
    async fn answer(admins: &[SocketAddr], req: Request<Incoming>) -> Reply {
        if !host_is_local(req.headers()) {
            return reply(StatusCode::FORBIDDEN, "text/plain", "meshctl dashboard answers only to a loopback Host\n");
        }
        match req.uri().path() {
            "/" | "/dashboard" | "/dashboard/" => {
                let mut r = reply(StatusCode::OK, "text/html; charset=utf-8", PAGE);
                r.headers_mut().insert("content-security-policy", header::HeaderValue::from_static(CSP));
                r
            }
            "/dashboard/data" => match serde_json::to_string(&gather(admins).await) {
                Ok(j) => reply(StatusCode::OK, "application/json", j),
                Err(e) => reply(StatusCode::INTERNAL_SERVER_ERROR, "text/plain", e.to_string()),
            },
            _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
        }
    }
}

/// The largest request head read for its `Host` before a connection is forwarded.
const MAX_HEAD: usize = 16 << 10;
/// How long a client may take to send its first request head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a local connection was not forwarded.
#[derive(Debug, thiserror::Error)]
enum ForwardError {
    #[error("reading the first request: {0}")]
    Read(#[from] std::io::Error),
    #[error("no request head within {0} bytes")]
    HeadTooLarge(usize),
    #[error("not an HTTP/1 request: {0}")]
    NotHttp(httparse::Error),
    #[error("the first request did not arrive in time")]
    Timeout,
}

/// Reads the first request head of `client` (all of it, and whatever came after):
/// whether its `Host` is a loopback one.
async fn first_request(client: &mut tokio::net::TcpStream) -> Result<(Vec<u8>, bool), ForwardError> {
    use tokio::io::AsyncReadExt as _;
    let mut buf = Vec::with_capacity(1024);
    loop {
        let mut chunk = [0u8; 2048];
        let n = match tokio::time::timeout(HEAD_TIMEOUT, client.read(&mut chunk)).await {
            Ok(read) => read?,
            Err(_) => return Err(ForwardError::Timeout),
        };
        if n == 0 {
            return Err(ForwardError::Read(std::io::ErrorKind::UnexpectedEof.into()));
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf) {
            Ok(httparse::Status::Complete(_)) => {
                let mut map = http::HeaderMap::new();
                if let Some(h) = req.headers.iter().find(|h| h.name.eq_ignore_ascii_case("host"))
                    && let Ok(v) = header::HeaderValue::from_bytes(h.value)
                {
                    map.insert(header::HOST, v);
                }
                let local = host_is_local(&map);
                return Ok((buf, local));
            }
            Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => continue,
            Ok(httparse::Status::Partial) => return Err(ForwardError::HeadTooLarge(MAX_HEAD)),
            Err(e) => return Err(ForwardError::NotHttp(e)),
        }
    }
}

/// Carries one local connection to the addon's pod over a port-forward stream, once
/// its first request names a loopback `Host`.
async fn port_forward(
    pods: &kube::Api<k8s_openapi::api::core::v1::Pod>,
    pod: &str,
    port: u16,
    mut client: tokio::net::TcpStream,
) {
    use tokio::io::AsyncWriteExt as _;
    let plain = |status: &str, why: &str| {
        format!(
            "HTTP/1.1 {status}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{why}",
            why.len()
        )
    };
    let head = match first_request(&mut client).await {
        Ok((head, true)) => head,
        Ok((_, false)) => {
            let answer = plain("403 Forbidden", "meshctl dashboard answers only to a loopback Host\n");
            let _ = client.write_all(answer.as_bytes()).await;
            return;
        }
        Err(e) => {
            let _ = client.write_all(plain("400 Bad Request", &format!("{e}\n")).as_bytes()).await;
            return;
        }
    };
    let mut forwarder = match pods.portforward(pod, &[port]).await {
        Ok(f) => f,
        Err(e) => {
            let why = format!("port-forward to pod {pod} port {port}: {e}\n");
            eprintln!("meshctl: {}", why.trim_end());
            let _ = client.write_all(plain("502 Bad Gateway", &why).as_bytes()).await;
            return;
        }
    };
    let (Some(mut upstream), Some(errors)) = (forwarder.take_stream(port), forwarder.take_error(port)) else {
        return;
    };
    let pod_name = pod.to_string();
    tokio::spawn(async move {
        if let Some(e) = errors.await {
            eprintln!("meshctl: port-forward to pod {pod_name} port {port}: {e}");
        }
    });
    if upstream.write_all(&head).await.is_ok() {
        let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
    }
    drop(upstream);
    let _ = forwarder.join().await;
}

/// Serves `backend` on `listener` until `stop`.
pub async fn serve(listener: TcpListener, backend: Backend, stop: tokio_util::sync::CancellationToken) {
    loop {
        let stream = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let backend = backend.clone();
        tokio::spawn(async move {
            match backend {
                Backend::Mesh(admins) => {
                    let svc = hyper::service::service_fn(move |req| {
                        let admins = admins.clone();
                        async move { Ok::<_, std::convert::Infallible>(Backend::answer(&admins, req).await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                }
                Backend::Addon { pods, pod, port } => port_forward(&pods, &pod, port, stream).await,
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_addon_has_istioctls_port_and_the_mesh_page_its_own() {
        assert_eq!(Target::Kiali.default_port(), 20001);
        assert_eq!(Target::Jaeger.default_port(), 16686);
        assert_eq!(Target::Prometheus.default_port(), 9090);
        assert_eq!(Target::Grafana.default_port(), 3000);
        assert_eq!(Target::Mesh.default_port(), 15100);
    }
}

//! `meshctl dashboard`: opens a dashboard on a local port, as `istioctl dashboard` does.
//!
//! - `mesh` (the default): the mesh's own page, with the data of every agent named by
//!   `--admin` merged (each agent only sees its own node).
//! - `kiali`, `jaeger`, `prometheus`, `grafana`: the addon's pod (by its `app` label in
//!   the addons' namespace), reached through the API server's pod proxy: every request
//!   to the local port goes to `…/pods/<pod>:<port>/proxy/<path>` with the user's
//!   credentials, as `kubectl proxy` carries it. Plain HTTP only: unlike istioctl's
//!   port-forward stream, WebSocket upgrades are not carried (Grafana's live panels).
//!
//! The local server answers only to a loopback `Host`, so a web page cannot reach it by
//! DNS rebinding.

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
    /// An addon's pod through the API server's pod proxy.
    Addon {
        /// Client with the user's credentials.
        client: kube::Client,
        /// `/api/v1/namespaces/<ns>/pods/<pod>:<port>/proxy`.
        base: String,
    },
}

impl Backend {
    /// The pod proxy of `pod`'s `port` in `namespace`.
    pub fn addon(client: kube::Client, namespace: &str, pod: &str, port: u16) -> Self {
        Backend::Addon { client, base: format!("/api/v1/namespaces/{namespace}/pods/{pod}:{port}/proxy") }
    }

    async fn answer(&self, req: Request<Incoming>) -> Reply {
        if !host_is_local(req.headers()) {
            return reply(StatusCode::FORBIDDEN, "text/plain", "meshctl dashboard answers only to a loopback Host\n");
        }
        match self {
            Backend::Mesh(admins) => match req.uri().path() {
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
            },
            Backend::Addon { client, base } => forward(client, base, req).await,
        }
    }
}

/// Request headers not carried to the pod proxy: hop-by-hop ones, and `Authorization`,
/// which on the way to the API server is the user's kubeconfig credential (a browser's
/// own would replace it). Cookies are carried: Grafana and Kiali log in with them.
const DROPPED: [header::HeaderName; 6] = [
    header::HOST,
    header::CONNECTION,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::AUTHORIZATION,
    header::PROXY_AUTHORIZATION,
];

/// Largest request body carried to an addon (a Grafana dashboard save, say).
const MAX_BODY: usize = 16 << 20;

async fn forward(client: &kube::Client, base: &str, req: Request<Incoming>) -> Reply {
    let (parts, body) = req.into_parts();
    let path_and_query = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let body = match http_body_util::Limited::new(body, MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return reply(StatusCode::PAYLOAD_TOO_LARGE, "text/plain", format!("request body: {e}\n")),
    };
    let mut out = Request::builder().method(parts.method).uri(format!("{base}{path_and_query}"));
    for (name, value) in parts.headers.iter().filter(|(n, _)| !DROPPED.contains(n)) {
        out = out.header(name, value);
    }
    let Ok(out) = out.body(kube::client::Body::from(body)) else {
        return reply(StatusCode::BAD_REQUEST, "text/plain", "bad request\n");
    };
    match client.send(out).await {
        Ok(res) => {
            let (mut parts, body) = res.into_parts();
            for h in [header::CONNECTION, header::TRANSFER_ENCODING] {
                parts.headers.remove(h);
            }
            Response::from_parts(parts, body.map_err(std::io::Error::other).boxed_unsync())
        }
        Err(e) => reply(StatusCode::BAD_GATEWAY, "text/plain", format!("the API server's pod proxy: {e}\n")),
    }
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
            let svc = hyper::service::service_fn(move |req| {
                let backend = backend.clone();
                async move { Ok::<_, std::convert::Infallible>(backend.answer(req).await) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
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

//! The CA service's server: Istio's certificate service and the trust bundle over TLS
//! 1.3 and HTTP/2, and the loop that follows the CA files (or the `cacerts` Secret), so
//! a root rotation is picked up without a restart.
//!
//! Invariants: a certificate is signed only for an identity of a pod scheduled on the
//! caller's node, in this mesh's trust domain, for the key the CSR proves; nothing the
//! CSR names is copied into the certificate. Connections, streams, request sizes and
//! handshake times are bounded, and so are held watches: only an authenticated caller's
//! is held, at most `MAX_HELD_WATCHES` at once, each at most
//! `MAX_WATCH_WAIT`; beyond the budget a watch is answered at once.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt as _, Full, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::sync::Semaphore;

use super::{Authenticator, Error, NodeWorkloads, RemoteSecrets, Settings};
use crate::identity::ca_protocol::{
    self, GrpcStatus, IstioCertificateRequest, IstioCertificateResponse, TrustBundle, Watch, status,
};
use crate::identity::{CaFiles, Identity, MeshCa};

/// Connections served at once. Each agent and gateway holds up to two while idle (its
/// watches of the trust bundle and of the remote clusters).
const MAX_CONNECTIONS: usize = 1024;
/// Watches held at once; the other connections stay free for certificate requests.
/// Beyond it a watch is answered at once, and its caller asks again at its own pace.
const MAX_HELD_WATCHES: usize = 768;
/// How often a held watch looks at its answer again.
const WATCH_CHECK: Duration = Duration::from_secs(1);
/// Streams one connection may have open.
const MAX_STREAMS: u32 = 16;
/// How long a TLS handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a request may take, from its headers to its answer.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// The shortest validity granted: shorter requests get this.
const MIN_TTL: Duration = Duration::from_secs(1);
/// The CA service's own certificate lives this long and is re-issued at half-life.
const SERVING_TTL: Duration = Duration::from_secs(24 * 3600);

type Body = BoxBody<Bytes, Infallible>;

/// What the handlers read.
struct State {
    ca: ArcSwap<MeshCa>,
    serving: ArcSwap<CertifiedKey>,
    serving_since: std::sync::Mutex<Instant>,
    bundle: ArcSwap<TrustBundle>,
    authn: Authenticator,
    workloads: NodeWorkloads,
    remotes: RemoteSecrets,
    trust_domain: String,
    max_ttl: Duration,
    /// Permits of the watches held now.
    held: Semaphore,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State").field("trust_domain", &self.trust_domain).finish_non_exhaustive()
    }
}

/// Serves the current certificate of the service itself.
#[derive(Debug)]
struct ServingCert(Arc<State>);

impl ResolvesServerCert for ServingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.serving.load_full())
    }
}

fn pem(kind: &str, der: &[u8]) -> String {
    let config = pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF);
    pem::encode_config(&pem::Pem::new(kind, der.to_vec()), config)
}

fn bundle_of(ca: &MeshCa) -> TrustBundle {
    TrustBundle { roots: ca.roots().iter().map(|r| pem("CERTIFICATE", r)).collect(), issuer: ca.issuer_digest() }
}

fn serving_cert(ca: &MeshCa, settings: &Settings) -> Result<CertifiedKey, Error> {
    let (chain, key) = ca.issue_server(&settings.server_names, &settings.server_ips, SERVING_TTL)?;
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key));
    let signer = rustls::crypto::ring::sign::any_supported_type(&key).map_err(crate::identity::Error::Tls)?;
    Ok(CertifiedKey::new(chain, signer))
}

/// Runs the CA service until SIGTERM/SIGINT.
pub async fn run(settings: Settings) -> Result<(), Error> {
    let client = settings.source.kube_client().await.map_err(Error::Kube)?;
    let secret = match &settings.ca_secret {
        Some(s) => Some(
            s.split_once('/')
                .map(|(ns, n)| (ns.to_string(), n.to_string()))
                .ok_or_else(|| Error::Settings(format!("--ca-secret {s:?}: expected namespace/name")))?,
        ),
        None => None,
    };
    let mut secret_data = None;
    if let (Some(client), Some((ns, name))) = (&client, &secret) {
        let trust_domain = settings.trust_domain.clone();
        let make_root = move || match crate::identity::SelfSignedRoot::generate(&trust_domain) {
            Ok(root) => Some(root.secret_data()),
            Err(e) => {
                tracing::error!(error = %e, "generating a self-signed root");
                None
            }
        };
        let data = crate::config::kube_source::read_or_create_secret(client, ns, name, make_root).await;
        CaFiles::write_from_secret(&settings.ca_dir, &data)?;
        tracing::info!(secret = %format!("{ns}/{name}"), "mesh CA read from its Secret");
        secret_data = Some(data);
    }
    let ca = MeshCa::load_or_create(&settings.ca_dir, &settings.trust_domain)?;
    let authn = match (&client, &settings.token_file) {
        (Some(client), _) => {
            let accounts = |list: &[String]| {
                list.iter().map(|a| format!("system:serviceaccount:{}", a.replacen('/', ":", 1))).collect()
            };
            Authenticator::Kube {
                client: client.clone(),
                trusted: accounts(&settings.trusted_agents),
                gateways: accounts(&settings.gateway_accounts),
                audience: settings.audience.clone(),
            }
        }
        (None, Some(file)) => Authenticator::from_token_file(file).map_err(Error::Settings)?,
        (None, None) => return Err(Error::Settings("--token-file is required with --config-source files".into())),
    };
    // Pods and remote secrets come from the same place: the API server or the files.
    let (workloads, remotes) = match (&client, &settings.source.config_dir) {
        (Some(client), _) => {
            let namespace = settings
                .remote_secrets_namespace
                .clone()
                .or_else(|| secret.as_ref().map(|(ns, _)| ns.clone()))
                .unwrap_or_else(|| "istio-system".into());
            (NodeWorkloads::Kube(client.clone()), RemoteSecrets::follow(client.clone(), &namespace))
        }
        (None, Some(dir)) => {
            let files = || std::sync::Mutex::new(crate::config::DirSource::new(dir));
            (NodeWorkloads::Files(files()), RemoteSecrets::Files(files()))
        }
        (None, None) => return Err(Error::Settings("--config-dir is required with --config-source files".into())),
    };
    let state = Arc::new(State {
        serving: ArcSwap::from_pointee(serving_cert(&ca, &settings)?),
        serving_since: std::sync::Mutex::new(Instant::now()),
        bundle: ArcSwap::from_pointee(bundle_of(&ca)),
        ca: ArcSwap::from_pointee(ca),
        authn,
        workloads,
        remotes,
        trust_domain: settings.trust_domain.clone(),
        max_ttl: settings.max_ttl,
        held: Semaphore::new(MAX_HELD_WATCHES),
    });
    publish_roots(client.as_ref(), &settings, &state.bundle.load()).await;
    tokio::spawn(follow_ca(state.clone(), settings.clone(), client.clone(), secret, secret_data));

    let listener = tokio::net::TcpListener::bind(settings.listen)
        .await
        .map_err(|source| Error::Listen { addr: settings.listen, source })?;
    let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(crate::identity::Error::Tls)?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(ServingCert(state.clone())));
    tls.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    tracing::info!(listen = %settings.listen, trust_domain = %settings.trust_domain, "mesh CA service ready");
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let stop = shutdown_signal();
    tokio::pin!(stop);
    loop {
        let permit = tokio::select! {
            () = &mut stop => break,
            p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
        };
        let (tcp, peer) = tokio::select! {
            () = &mut stop => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let (acceptor, state) = (acceptor.clone(), state.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => return tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                Err(_) => return tracing::debug!(%peer, "TLS handshake timed out"),
            };
            let svc = hyper::service::service_fn(move |req| {
                let state = state.clone();
                async move {
                    let answer = tokio::time::timeout(time_allowed(&req), handle(&state, req)).await;
                    Ok::<_, Infallible>(answer.unwrap_or_else(|_| {
                        grpc_error(GrpcStatus { code: status::UNAVAILABLE, message: "request timed out".into() })
                    }))
                }
            });
            // No ping within a watch's longest hold: a held ask would otherwise wake its
            // agent every ping to answer it. A dead caller is found when its answer is
            // written, at the hold's end at the latest.
            let served = crate::transport::limits::h2_server()
                .keep_alive_interval(ca_protocol::MAX_WATCH_WAIT)
                .max_concurrent_streams(MAX_STREAMS)
                .serve_connection(TokioIo::new(tls), svc)
                .await;
            if let Err(e) = served {
                tracing::debug!(%peer, error = %e, "connection ended");
            }
        });
    }
    tracing::info!("mesh CA service stopped");
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

async fn handle(state: &State, req: Request<Incoming>) -> Response<Body> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, ca_protocol::TRUST_BUNDLE) => {
            // The bundle is anyone's to read, but only a caller the CA knows may have its
            // watch held: a held watch costs the CA a connection. A plain read is not
            // authenticated at all.
            let watch = match (Watch::parse(req.uri().query()), bearer(&req)) {
                (Some(watch), Some(token)) if state.authn.caller(&token).await.is_ok() => Some(watch),
                _ => None,
            };
            let body =
                held(watch, &state.held, || serde_json::to_vec(&**state.bundle.load()).unwrap_or_default()).await;
            json(StatusCode::OK, body)
        }
        (&Method::POST, ca_protocol::CREATE_CERTIFICATE) => match create_certificate(state, req).await {
            Ok(answer) => grpc_ok(&answer),
            Err(s) => grpc_error(s),
        },
        (&Method::GET, ca_protocol::REMOTE_CLUSTERS) => remote_clusters(state, &req).await,
        _ => {
            let mut r = Response::new(Full::new(Bytes::from_static(b"not found\n")).boxed());
            *r.status_mut() = StatusCode::NOT_FOUND;
            r
        }
    }
}

/// The remote clusters' kubeconfigs, for an authenticated agent or gateway only: they
/// hold the other clusters' reader tokens.
async fn remote_clusters(state: &State, req: &Request<Incoming>) -> Response<Body> {
    let answer = |code: StatusCode, body: Vec<u8>| {
        let mut r = Response::new(Full::new(Bytes::from(body)).boxed());
        *r.status_mut() = code;
        r
    };
    let Some(token) = bearer(req) else {
        return answer(StatusCode::UNAUTHORIZED, b"no bearer token\n".to_vec());
    };
    if let Err(why) = state.authn.caller(&token).await {
        tracing::warn!(%why, "remote clusters refused: caller not authenticated");
        return answer(StatusCode::UNAUTHORIZED, format!("{why}\n").into_bytes());
    }
    let watch = Watch::parse(req.uri().query());
    json(
        StatusCode::OK,
        held(watch, &state.held, || serde_json::to_vec(&state.remotes.clusters()).unwrap_or_default()).await,
    )
}

/// How long `req` may take: [`REQUEST_TIMEOUT`], plus the wait of a watch on a path
/// that holds watches (nowhere else does a query lengthen a request).
fn time_allowed<B>(req: &Request<B>) -> Duration {
    let watched = req.method() == Method::GET
        && matches!(req.uri().path(), ca_protocol::TRUST_BUNDLE | ca_protocol::REMOTE_CLUSTERS);
    let wait =
        if watched { Watch::parse(req.uri().query()).map_or(Duration::ZERO, |w| w.wait) } else { Duration::ZERO };
    REQUEST_TIMEOUT + wait
}

/// A JSON answer.
fn json(code: StatusCode, body: Vec<u8>) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(body)).boxed());
    *r.status_mut() = code;
    r.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
    r
}

/// The answer `current` gives, once it differs from the version `watch` holds or the
/// watch's wait has passed, looked at every [`WATCH_CHECK`]; at once without a watch,
/// or when `permits` has none left.
async fn held(watch: Option<Watch>, permits: &Semaphore, current: impl Fn() -> Vec<u8>) -> Vec<u8> {
    let mut body = current();
    let Some(watch) = watch else { return body };
    let Ok(_permit) = permits.try_acquire() else { return body };
    let deadline = tokio::time::Instant::now() + watch.wait;
    while ca_protocol::version_of(&body) == watch.version {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            break;
        }
        tokio::time::sleep(left.min(WATCH_CHECK)).await;
        body = current();
    }
    body
}

/// The request's bearer token.
fn bearer<B>(req: &Request<B>) -> Option<String> {
    req.headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_owned)
}

fn refuse(code: u32, message: impl Into<String>) -> GrpcStatus {
    GrpcStatus { code, message: message.into() }
}

async fn create_certificate(state: &State, req: Request<Incoming>) -> Result<IstioCertificateResponse, GrpcStatus> {
    let token = bearer(&req).ok_or_else(|| refuse(status::UNAUTHENTICATED, "no bearer token"))?;
    let caller = state.authn.caller(&token).await.map_err(|why| {
        tracing::warn!(%why, "certificate request refused: caller not authenticated");
        refuse(status::UNAUTHENTICATED, why)
    })?;
    let body = Limited::new(req.into_body(), ca_protocol::MAX_REQUEST)
        .collect()
        .await
        .map_err(|e| refuse(status::INVALID_ARGUMENT, format!("request body: {e}")))?
        .to_bytes();
    let request: IstioCertificateRequest =
        ca_protocol::unframe(&body).map_err(|e| refuse(status::INVALID_ARGUMENT, e))?;
    let denied = |why: String| {
        tracing::warn!(node = %caller.node, account = %caller.account, %why, "certificate request refused");
        refuse(status::PERMISSION_DENIED, why)
    };
    let asked = request.impersonated_identity().ok_or_else(|| {
        denied("a node agent must name the workload identity it asks for (ImpersonatedIdentity)".into())
    })?;
    let identity = Identity::parse(asked).map_err(|e| refuse(status::INVALID_ARGUMENT, e.to_string()))?;
    if *identity.trust_domain != state.trust_domain {
        return Err(denied(format!("{identity} is outside trust domain {}", state.trust_domain)));
    }
    // A gateway holds its own identity and no other; a node agent those of its pods.
    if let Some((ns, sa)) = &caller.own_identity
        && (*identity.namespace != *ns || *identity.service_account != *sa)
    {
        return Err(denied(format!("{} may ask only for its own identity, not {identity}", caller.account)));
    }
    let on_node = state
        .workloads
        .identities_on(&caller.node, &state.trust_domain)
        .await
        .map_err(|e| refuse(status::UNAVAILABLE, e))?;
    if !on_node.contains(&identity) {
        return Err(denied(format!("no pod with identity {identity} is scheduled on node {}", caller.node)));
    }
    let asked_ttl = Duration::from_secs(u64::try_from(request.validity_duration).unwrap_or(0));
    let ttl = if asked_ttl.is_zero() { state.max_ttl } else { asked_ttl.clamp(MIN_TTL, state.max_ttl) };
    let ca = state.ca.load();
    let (chain, _) =
        ca.issue_for_csr(&identity, &request.csr, ttl).map_err(|e| refuse(status::INVALID_ARGUMENT, e.to_string()))?;
    tracing::info!(node = %caller.node, %identity, ttl_secs = ttl.as_secs(), "certificate issued");
    let roots: Vec<&CertificateDer<'_>> = ca.roots().iter().collect();
    Ok(IstioCertificateResponse { cert_chain: chain.iter().chain(roots).map(|c| pem("CERTIFICATE", c)).collect() })
}

fn grpc_response(data: Option<Bytes>, s: &GrpcStatus) -> Response<Body> {
    let mut frames: Vec<Result<Frame<Bytes>, Infallible>> = Vec::new();
    if let Some(d) = data {
        frames.push(Ok(Frame::data(d)));
    }
    frames.push(Ok(Frame::trailers(ca_protocol::status_headers(s))));
    let mut r = Response::new(StreamBody::new(futures::stream::iter(frames)).boxed());
    r.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/grpc"));
    r
}

fn grpc_ok(answer: &IstioCertificateResponse) -> Response<Body> {
    grpc_response(Some(ca_protocol::frame(answer)), &GrpcStatus { code: status::OK, message: String::new() })
}

fn grpc_error(s: GrpcStatus) -> Response<Body> {
    grpc_response(None, &s)
}

/// Follows the CA: the `cacerts` Secret (cluster) is written to the CA directory when it
/// changes, and the directory is re-read when its files change. A new CA (a rotated
/// root, a new intermediate) signs from then on, the trust bundle says so (agents then
/// re-issue), and the service's own certificate is re-issued under it.
async fn follow_ca(
    state: Arc<State>,
    settings: Settings,
    client: Option<kube::Client>,
    secret: Option<(String, String)>,
    mut secret_data: Option<BTreeMap<String, Vec<u8>>>,
) {
    let files = CaFiles::in_dir(&settings.ca_dir);
    let fingerprint = |files: &CaFiles| -> Vec<u8> {
        [&files.ca_cert, &files.ca_key, &files.root_cert, &files.cert_chain]
            .iter()
            .flat_map(|p| std::fs::read(p).unwrap_or_default())
            .collect()
    };
    let mut seen = fingerprint(&files);
    let mut tick = tokio::time::interval(settings.reload_interval);
    loop {
        tick.tick().await;
        if let (Some(client), Some((ns, name))) = (&client, &secret) {
            let api: kube::Api<k8s_openapi::api::core::v1::Secret> = kube::Api::namespaced(client.clone(), ns);
            if let Ok(s) = api.get(name).await {
                let data: BTreeMap<String, Vec<u8>> =
                    s.data.unwrap_or_default().into_iter().map(|(k, v)| (k, v.0)).collect();
                if secret_data.as_ref() != Some(&data) {
                    match CaFiles::write_from_secret(&settings.ca_dir, &data) {
                        Ok(_) => secret_data = Some(data),
                        Err(e) => {
                            tracing::error!(error = %e, "the CA Secret changed and cannot be used; the old CA keeps signing")
                        }
                    }
                }
            }
        }
        let now = fingerprint(&files);
        let stale_serving = state.serving_since.lock().unwrap_or_else(|p| p.into_inner()).elapsed() > SERVING_TTL / 2;
        if now == seen && !stale_serving {
            continue;
        }
        if now != seen {
            match MeshCa::load(&files) {
                Ok(ca) => {
                    let bundle = bundle_of(&ca);
                    tracing::info!(roots = bundle.roots.len(), issuer = %bundle.issuer, "CA files changed: signing with the new CA");
                    state.ca.store(Arc::new(ca));
                    publish_roots(client.as_ref(), &settings, &bundle).await;
                    state.bundle.store(Arc::new(bundle));
                    seen = now;
                }
                Err(e) => {
                    // Half-written files are common while an operator copies them in.
                    tracing::warn!(error = %e, "the CA files changed and cannot be loaded (yet); the old CA keeps signing");
                    continue;
                }
            }
        }
        match serving_cert(&state.ca.load(), &settings) {
            Ok(c) => {
                state.serving.store(Arc::new(c));
                *state.serving_since.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
            }
            Err(e) => tracing::error!(error = %e, "re-issuing the CA service's own certificate"),
        }
    }
}

/// Publishes the roots in the configured ConfigMap (`root-cert.pem`), which agents
/// mount to trust the CA at start.
async fn publish_roots(client: Option<&kube::Client>, settings: &Settings, bundle: &TrustBundle) {
    let Some(client) = client else { return };
    for target in &settings.root_configmap {
        publish_roots_in(client, target, bundle).await;
    }
}

async fn publish_roots_in(client: &kube::Client, target: &str, bundle: &TrustBundle) {
    let Some((ns, name)) = target.split_once('/') else {
        return tracing::error!(configmap = %target, "--root-configmap: expected namespace/name");
    };
    let cm = serde_json::json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": name, "namespace": ns, "labels": {"app.kubernetes.io/part-of": "mesh"}},
        "data": {"root-cert.pem": bundle.roots.concat()},
    });
    let api: kube::Api<k8s_openapi::api::core::v1::ConfigMap> = kube::Api::namespaced(client.clone(), ns);
    let params = kube::api::PatchParams::apply("mesh-ca").force();
    match api.patch(name, &params, &kube::api::Patch::Apply(&cm)).await {
        Ok(_) => tracing::info!(configmap = %target, "root bundle published"),
        Err(e) => tracing::error!(configmap = %target, error = %e, "publishing the root bundle"),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::identity::ca_protocol::MAX_WATCH_WAIT;

    fn watching(body: &[u8], wait: Duration) -> Option<Watch> {
        Some(Watch { version: ca_protocol::version_of(body), wait })
    }

    #[tokio::test(start_paused = true)]
    async fn a_watch_is_answered_when_its_answer_changes_or_its_wait_ends() {
        let permits = Semaphore::new(1);
        let start = tokio::time::Instant::now();
        // News: answered at once.
        assert_eq!(held(watching(b"old", Duration::from_secs(300)), &permits, || b"new".to_vec()).await, b"new");
        assert_eq!(start.elapsed(), Duration::ZERO);
        // No news: held for the wait, then answered with what there is.
        assert_eq!(held(watching(b"same", Duration::from_secs(30)), &permits, || b"same".to_vec()).await, b"same");
        assert_eq!(start.elapsed(), Duration::from_secs(30));
        // A change while held: answered within a check of it.
        let looks = AtomicUsize::new(0);
        let start = tokio::time::Instant::now();
        let changing = || if looks.fetch_add(1, Ordering::Relaxed) < 5 { b"same".to_vec() } else { b"new".to_vec() };
        assert_eq!(held(watching(b"same", Duration::from_secs(300)), &permits, changing).await, b"new");
        assert_eq!(start.elapsed(), WATCH_CHECK * 5);
        assert_eq!(permits.available_permits(), 1, "the permit goes back");
    }

    #[test]
    fn only_a_watch_on_a_watched_path_lengthens_a_request() {
        let req = |method: Method, uri: &str| Request::builder().method(method).uri(uri).body(()).unwrap();
        let watch = "?version=ab&wait=300";
        assert_eq!(
            time_allowed(&req(Method::GET, &format!("{}{watch}", ca_protocol::TRUST_BUNDLE))),
            REQUEST_TIMEOUT + MAX_WATCH_WAIT
        );
        assert_eq!(
            time_allowed(&req(Method::GET, &format!("{}{watch}", ca_protocol::REMOTE_CLUSTERS))),
            REQUEST_TIMEOUT + MAX_WATCH_WAIT
        );
        assert_eq!(time_allowed(&req(Method::GET, ca_protocol::TRUST_BUNDLE)), REQUEST_TIMEOUT);
        // A certificate request (a slow body, say) gets no longer for naming a watch.
        assert_eq!(
            time_allowed(&req(Method::POST, &format!("{}{watch}", ca_protocol::CREATE_CERTIFICATE))),
            REQUEST_TIMEOUT
        );
        assert_eq!(time_allowed(&req(Method::POST, &format!("{}{watch}", ca_protocol::TRUST_BUNDLE))), REQUEST_TIMEOUT);
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_watch_or_a_permit_the_answer_comes_at_once() {
        let permits = Semaphore::new(1);
        let start = tokio::time::Instant::now();
        assert_eq!(held(None, &permits, || b"same".to_vec()).await, b"same");
        let _taken = permits.try_acquire().unwrap();
        assert_eq!(held(watching(b"same", Duration::from_secs(300)), &permits, || b"same".to_vec()).await, b"same");
        assert_eq!(start.elapsed(), Duration::ZERO);
    }
}

//! An in-process Kubernetes API server double, as far as list and watch go, following
//! the API conventions: every change bumps a cluster-wide `resourceVersion`; a list
//! returns the current objects with the version it saw; a watch from version `v`
//! streams the changes after `v` as JSON events (`ADDED`, `MODIFIED`, `DELETED`),
//! `BOOKMARK`s while idle when asked for, and `ERROR` with a 410 `Expired` Status when
//! `v` is older than the history it keeps (after [`ApiServer::compact`]). Unknown
//! resources answer 404, as a cluster without the CRD does. [`ApiServer::stop`] and
//! [`ApiServer::start`] make an outage on the same port.
//!
//! For `meshctl`, it also takes writes the way a client sees them: `POST` creates (409
//! `AlreadyExists` if present), server-side apply `PATCH` creates or merges (top-level
//! fields replaced, labels and annotations merged), `DELETE` removes (404 if absent);
//! namespaced paths (`/api/v1/namespaces/<ns>/<plural>[/<name>]`) as well as
//! cluster-scoped ones; `GET /version`; and the pod proxy subresource
//! (`.../pods/<name>:<port>/proxy/<path>`), forwarded to the pod's `status.podIP`; and
//! the `portforward` subresource over WebSocket (`v4.channel.k8s.io`: per port a data
//! and an error channel, each opened with the port number), to the pod's address.
//! `TokenReview` creates are answered from the tokens a test registered
//! ([`ApiServer::add_token`]), as the API server answers for service-account tokens.
//!
//! For a real `kubectl`: discovery and OpenAPI v3 of the built-in kinds it serves
//! ([`super::kinds`]), `dryRun=All` (nothing stored), and `fieldValidation=Strict` on
//! creates and applies (400 for undeclared or mistyped fields, 422 for a broken rule).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::sync::{Notify, watch};

use crate::kinds;

type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

#[derive(Default)]
struct Collection {
    objects: BTreeMap<String, Value>,
    /// (resourceVersion, event type, object) after `compacted`.
    history: Vec<(u64, &'static str, Value)>,
}

#[derive(Default)]
struct State {
    rv: u64,
    /// Watches from before this version get 410.
    compacted: u64,
    collections: BTreeMap<String, Collection>,
}

/// The double.
#[derive(Clone)]
pub struct ApiServer {
    state: Arc<Mutex<State>>,
    changed: Arc<Notify>,
    addr: SocketAddr,
    /// Flipped to stop the listener and every open watch.
    running: Arc<Mutex<Option<watch::Sender<bool>>>>,
    /// 410 Gone answers sent.
    gone: Arc<std::sync::atomic::AtomicUsize>,
    /// Writes taken from clients, in order.
    writes: Arc<Mutex<Vec<String>>>,
    /// Tokens TokenReview authenticates: token -> `status.user`.
    tokens: Arc<Mutex<BTreeMap<String, Value>>>,
    /// What SubjectAccessReview allows: (username, verb, non-resource path).
    grants: Arc<Mutex<Vec<(String, String, String)>>>,
    /// When set, the only bearer token any request is served with (others get 401).
    required_token: Arc<Mutex<Option<String>>>,
    /// Requests refused for their token.
    unauthorized: Arc<std::sync::atomic::AtomicUsize>,
}

/// `/api/v1/pods`, `/apis/networking.istio.io/v1/virtualservices`.
pub fn collection_path(group: &str, version: &str, plural: &str) -> String {
    if group.is_empty() { format!("/api/{version}/{plural}") } else { format!("/apis/{group}/{version}/{plural}") }
}

impl ApiServer {
    /// Serves the collections named (others answer 404) on a free loopback port.
    pub async fn new(collections: &[String]) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        Self::new_at(addr, collections).await
    }

    /// Serves the collections named (others answer 404) at `addr`.
    pub async fn new_at(addr: SocketAddr, collections: &[String]) -> Self {
        let mut st = State { rv: 1, ..Default::default() };
        for c in collections {
            st.collections.insert(c.clone(), Collection::default());
        }
        let s = Self {
            state: Arc::new(Mutex::new(st)),
            changed: Arc::new(Notify::new()),
            addr,
            running: Arc::new(Mutex::new(None)),
            gone: Arc::default(),
            writes: Arc::default(),
            tokens: Arc::default(),
            grants: Arc::default(),
            required_token: Arc::default(),
            unauthorized: Arc::default(),
        };
        s.start().await;
        s
    }

    /// Starts serving `collection` (a CRD installed while clients run).
    pub fn serve(&self, collection: &str) {
        self.state.lock().unwrap().collections.entry(collection.to_string()).or_default();
        self.changed.notify_waiters();
    }

    /// Makes TokenReview authenticate `token` as `user` (`{"username": ..., "extra": ...}`).
    pub fn add_token(&self, token: &str, user: Value) {
        self.tokens.lock().unwrap().insert(token.to_string(), user);
    }

    /// Makes SubjectAccessReview allow `user` to `verb` the non-resource URL `path`, as
    /// a ClusterRole with `nonResourceURLs` bound to it would.
    pub fn grant(&self, user: &str, verb: &str, path: &str) {
        self.grants.lock().unwrap().push((user.into(), verb.into(), path.into()));
    }

    /// Serves only requests that carry `Authorization: Bearer <token>`, as an API server
    /// serves a service account's client; the rest get 401.
    pub fn require_token(&self, token: &str) {
        *self.required_token.lock().unwrap() = Some(token.to_string());
    }

    /// Requests refused 401 for their token.
    pub fn unauthorized(&self) -> usize {
        self.unauthorized.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Writes a kubeconfig for this server into `dir` (for `meshctl`), and returns it.
    pub fn kubeconfig(&self, dir: &std::path::Path) -> std::path::PathBuf {
        let path = dir.join("kubeconfig");
        let text = format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: double\n\
             clusters: [{{name: double, cluster: {{server: \"{}\"}}}}]\n\
             users: [{{name: admin, user: {{}}}}]\n\
             contexts: [{{name: double, context: {{cluster: double, user: admin}}}}]\n",
            self.url()
        );
        std::fs::write(&path, text).unwrap();
        path
    }

    /// Starts serving (again, after [`ApiServer::stop`]).
    pub async fn start(&self) {
        let listener = loop {
            match tokio::net::TcpListener::bind(self.addr).await {
                Ok(l) => break l,
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        };
        let (tx, rx) = watch::channel(true);
        *self.running.lock().unwrap() = Some(tx);
        let me = self.clone();
        tokio::spawn(async move {
            let mut stop = rx.clone();
            loop {
                tokio::select! {
                    _ = stop.changed() => break,
                    accepted = listener.accept() => {
                        let Ok((tcp, _)) = accepted else { continue };
                        let (me, rx) = (me.clone(), rx.clone());
                        let mut down = rx.clone();
                        tokio::spawn(async move {
                            let svc = hyper::service::service_fn(move |req| {
                                let (me, rx) = (me.clone(), rx.clone());
                                async move { Ok::<_, Infallible>(me.handle(req, rx).await) }
                            });
                            let conn = hyper::server::conn::http1::Builder::new()
                                .serve_connection(TokioIo::new(tcp), svc)
                                .with_upgrades();
                            // An outage drops kept-alive connections too.
                            tokio::select! {
                                _ = conn => {}
                                _ = down.changed() => {}
                            }
                        });
                    }
                }
            }
        });
    }

    /// Closes the listener and every open watch: an API outage.
    pub async fn stop(&self) {
        if let Some(tx) = self.running.lock().unwrap().take() {
            let _ = tx.send(false);
        }
        self.changed.notify_waiters();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    /// How many watches were answered 410 Gone.
    pub fn gone_sent(&self) -> usize {
        self.gone.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Creates or replaces an object (by namespace/name) in `collection`; returns it as
    /// stored.
    pub fn apply(&self, collection: &str, mut object: Value) -> Value {
        let mut st = self.state.lock().unwrap();
        st.rv += 1;
        let rv = st.rv;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        let key = format!(
            "{}/{}",
            object["metadata"]["namespace"].as_str().unwrap_or(""),
            object["metadata"]["name"].as_str().unwrap()
        );
        let c = st.collections.get_mut(collection).expect("collection served");
        let kind = if c.objects.contains_key(&key) { "MODIFIED" } else { "ADDED" };
        c.objects.insert(key, object.clone());
        c.history.push((rv, kind, object.clone()));
        drop(st);
        self.changed.notify_waiters();
        object
    }

    /// Deletes an object.
    pub fn delete(&self, collection: &str, namespace: &str, name: &str) {
        let mut st = self.state.lock().unwrap();
        st.rv += 1;
        let rv = st.rv;
        let c = st.collections.get_mut(collection).expect("collection served");
        if let Some(mut o) = c.objects.remove(&format!("{namespace}/{name}")) {
            o["metadata"]["resourceVersion"] = json!(rv.to_string());
            c.history.push((rv, "DELETED", o));
        }
        drop(st);
        self.changed.notify_waiters();
    }

    /// Forgets the history so far (as etcd compaction does): a watch resuming from any
    /// version seen until now gets 410.
    pub fn compact(&self) {
        let mut st = self.state.lock().unwrap();
        st.rv += 1;
        st.compacted = st.rv;
        for c in st.collections.values_mut() {
            c.history.clear();
        }
    }

    /// Ends every open watch (as an API server does at its timeout), so clients must
    /// resume from their last version.
    pub async fn drop_watches(&self) {
        self.stop().await;
        self.start().await;
    }

    async fn handle(&self, req: Request<Incoming>, running: watch::Receiver<bool>) -> Response<Body> {
        let path = req.uri().path().to_string();
        let required = self.required_token.lock().unwrap().clone();
        if let Some(token) = required {
            let given = req.headers().get(http::header::AUTHORIZATION).and_then(|v| v.to_str().ok());
            if given != Some(format!("Bearer {token}").as_str()) {
                self.unauthorized.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                return status(
                    StatusCode::UNAUTHORIZED,
                    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Unauthorized", "code": 401}),
                );
            }
        }
        let query: BTreeMap<String, String> = req
            .uri()
            .query()
            .unwrap_or("")
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), percent_decode(v)))
            .collect();
        if path == "/version" {
            return status(
                StatusCode::OK,
                json!({"major": "1", "minor": "32", "gitVersion": "v1.32.4", "platform": "linux/amd64"}),
            );
        }
        if path == "/apis/authentication.k8s.io/v1/tokenreviews" && req.method() == http::Method::POST {
            let Ok(body) = req.into_body().collect().await else { return bad_request("unreadable body") };
            let Ok(mut review) = serde_json::from_slice::<Value>(&body.to_bytes()) else {
                return bad_request("the body is not JSON");
            };
            let token = review["spec"]["token"].as_str().unwrap_or("").to_string();
            review["status"] = match self.tokens.lock().unwrap().get(&token) {
                Some(user) => json!({"authenticated": true, "user": user, "audiences": review["spec"]["audiences"]}),
                None => json!({"authenticated": false, "error": "invalid bearer token"}),
            };
            return status(StatusCode::CREATED, review);
        }
        if path == "/apis/authorization.k8s.io/v1/subjectaccessreviews" && req.method() == http::Method::POST {
            let Ok(body) = req.into_body().collect().await else { return bad_request("unreadable body") };
            let Ok(mut review) = serde_json::from_slice::<Value>(&body.to_bytes()) else {
                return bad_request("the body is not JSON");
            };
            let spec = &review["spec"];
            let asked = (
                spec["user"].as_str().unwrap_or("").to_string(),
                spec["nonResourceAttributes"]["verb"].as_str().unwrap_or("").to_string(),
                spec["nonResourceAttributes"]["path"].as_str().unwrap_or("").to_string(),
            );
            let allowed = self.grants.lock().unwrap().contains(&asked);
            review["status"] = json!({"allowed": allowed});
            return status(StatusCode::CREATED, review);
        }
        if req.method() == http::Method::GET
            && let Some(answer) = self.describe(&path)
        {
            return status(StatusCode::OK, answer);
        }
        let dry_run = query.get("dryRun").is_some_and(|d| d == "All");
        let strict = query.get("fieldValidation").is_some_and(|v| v == "Strict");
        let Some(target) = route(&path) else { return not_found(&path) };
        let method = req.method().clone();
        match target {
            Target::Proxy { namespace, pod, port, rest } => self.proxy(&namespace, &pod, port, &rest, req).await,
            Target::PortForward { namespace, pod } => {
                let port = query.get("ports").and_then(|p| p.parse::<u16>().ok());
                let Some(port) = port else { return bad_request("one port in ?ports= is served here") };
                self.port_forward(&namespace, &pod, port, req)
            }
            Target::Status { collection, namespace, name } => {
                if !self.serves(&collection) {
                    return not_found(&path);
                }
                let key = format!("{namespace}/{name}");
                let Some(existing) = self.state.lock().unwrap().collections[&collection].objects.get(&key).cloned()
                else {
                    return not_found_named(&name);
                };
                if method == http::Method::GET {
                    return status(StatusCode::OK, existing);
                }
                if method != http::Method::PATCH {
                    return status(StatusCode::METHOD_NOT_ALLOWED, json!({"kind": "Status", "code": 405}));
                }
                let Ok(body) = req.into_body().collect().await else { return bad_request("unreadable body") };
                let Ok(patch) = serde_json::from_slice::<Value>(&body.to_bytes()) else {
                    return bad_request("the body is not JSON");
                };
                let wanted = &patch["metadata"]["resourceVersion"];
                if wanted.is_string() && *wanted != existing["metadata"]["resourceVersion"] {
                    return status(
                        StatusCode::CONFLICT,
                        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Conflict", "code": 409, "message": "the object has been modified"}),
                    );
                }
                let mut updated = existing;
                updated["status"] = patch["status"].clone();
                self.writes.lock().unwrap().push(format!("status {collection} {key}"));
                status(StatusCode::OK, self.apply(&collection, updated))
            }
            Target::Object { collection, namespace, name } => {
                if !self.serves(&collection) {
                    return not_found(&path);
                }
                let key = format!("{namespace}/{name}");
                match method {
                    http::Method::GET => {
                        let st = self.state.lock().unwrap();
                        match st.collections[&collection].objects.get(&key) {
                            Some(o) => status(StatusCode::OK, o.clone()),
                            None => not_found_named(&name),
                        }
                    }
                    http::Method::PATCH => {
                        let Ok(body) = req.into_body().collect().await else { return bad_request("unreadable body") };
                        let Ok(patch) = serde_json::from_slice::<Value>(&body.to_bytes()) else {
                            return bad_request("the body is not JSON");
                        };
                        let existing = self.state.lock().unwrap().collections[&collection].objects.get(&key).cloned();
                        let created = existing.is_none();
                        let mut merged = existing.unwrap_or_else(|| json!({"metadata": {}}));
                        for (k, v) in patch.as_object().into_iter().flatten() {
                            if k == "metadata" {
                                for (mk, mv) in v.as_object().into_iter().flatten() {
                                    if (mk == "labels" || mk == "annotations") && merged["metadata"][mk].is_object() {
                                        for (lk, lv) in mv.as_object().into_iter().flatten() {
                                            merged["metadata"][mk][lk] = lv.clone();
                                        }
                                    } else {
                                        merged["metadata"][mk] = mv.clone();
                                    }
                                }
                            } else {
                                merged[k] = v.clone();
                            }
                        }
                        if !namespace.is_empty() {
                            merged["metadata"]["namespace"] = json!(namespace);
                        }
                        merged["metadata"]["name"] = json!(name);
                        if strict && let Some(refused) = refusal(&collection, &patch) {
                            return refused;
                        }
                        if dry_run {
                            return status(if created { StatusCode::CREATED } else { StatusCode::OK }, merged);
                        }
                        self.writes.lock().unwrap().push(format!("apply {collection} {key}"));
                        let stored = self.apply(&collection, merged);
                        status(if created { StatusCode::CREATED } else { StatusCode::OK }, stored)
                    }
                    http::Method::DELETE => {
                        let gone = self.state.lock().unwrap().collections[&collection].objects.get(&key).cloned();
                        match gone {
                            Some(o) => {
                                self.writes.lock().unwrap().push(format!("delete {collection} {key}"));
                                self.delete(&collection, &namespace, &name);
                                status(StatusCode::OK, o)
                            }
                            None => not_found_named(&name),
                        }
                    }
                    _ => status(StatusCode::METHOD_NOT_ALLOWED, json!({"kind": "Status", "code": 405})),
                }
            }
            Target::Collection { collection, namespace } => {
                if !self.serves(&collection) {
                    return not_found(&path);
                }
                if method == http::Method::POST {
                    let Ok(body) = req.into_body().collect().await else { return bad_request("unreadable body") };
                    let Ok(mut object) = serde_json::from_slice::<Value>(&body.to_bytes()) else {
                        return bad_request("the body is not JSON");
                    };
                    if let Some(ns) = &namespace {
                        object["metadata"]["namespace"] = json!(ns);
                    }
                    let name = object["metadata"]["name"].as_str().unwrap_or("").to_string();
                    let key = format!("{}/{name}", namespace.as_deref().unwrap_or(""));
                    if self.state.lock().unwrap().collections[&collection].objects.contains_key(&key) {
                        return status(
                            StatusCode::CONFLICT,
                            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "AlreadyExists", "code": 409, "message": format!("{name} already exists")}),
                        );
                    }
                    if strict && let Some(refused) = refusal(&collection, &object) {
                        return refused;
                    }
                    if dry_run {
                        return status(StatusCode::CREATED, object);
                    }
                    self.writes.lock().unwrap().push(format!("create {collection} {key}"));
                    let stored = self.apply(&collection, object);
                    return status(StatusCode::CREATED, stored);
                }
                let selector = query.get("fieldSelector").cloned();
                let label_selector = query.get("labelSelector").cloned();
                let in_namespace = move |o: &Value| {
                    namespace.as_deref().is_none_or(|ns| o["metadata"]["namespace"].as_str() == Some(ns))
                        && selects(selector.as_deref(), o)
                        && selects_labels(label_selector.as_deref(), o)
                };
                if query.get("watch").is_some_and(|w| w == "true" || w == "1") {
                    let from: u64 = query.get("resourceVersion").and_then(|v| v.parse().ok()).unwrap_or(0);
                    return self.watch(
                        collection,
                        from,
                        Box::new(in_namespace),
                        query.get("allowWatchBookmarks").is_some_and(|b| b == "true"),
                        running,
                    );
                }
                let st = self.state.lock().unwrap();
                // As a real API server, list items carry no apiVersion or kind.
                let items: Vec<Value> = st.collections[&collection]
                    .objects
                    .values()
                    .filter(|o| in_namespace(o))
                    .map(|o| {
                        let mut item = o.clone();
                        if let Some(m) = item.as_object_mut() {
                            m.remove("apiVersion");
                            m.remove("kind");
                        }
                        item
                    })
                    .collect();
                // As a real API server: `<Kind>List` of the collection's group version
                // (kubectl reads the items' kind from it).
                let kind = kinds::builtin().into_iter().find(|k| k.collection() == collection);
                let (list_kind, api_version) = match kind {
                    Some(k) => (format!("{}List", k.kind), k.group_version()),
                    None => ("List".to_string(), "v1".to_string()),
                };
                status(
                    StatusCode::OK,
                    json!({"kind": list_kind, "apiVersion": api_version, "metadata": {"resourceVersion": st.rv.to_string()}, "items": items}),
                )
            }
        }
    }

    /// Discovery and OpenAPI v3 for the built-in kinds the double serves.
    fn describe(&self, path: &str) -> Option<Value> {
        let all = kinds::builtin();
        let served: Vec<&kinds::Kind> = all.iter().filter(|k| self.serves(&k.collection())).collect();
        let group_version = |p: &str| -> Option<String> {
            match p.strip_prefix("/apis/") {
                Some(gv) if gv.matches('/').count() == 1 => Some(gv.to_string()),
                _ => (p == "/api/v1").then(|| "v1".to_string()),
            }
        };
        match path {
            "/api" => Some(kinds::api_versions()),
            "/apis" => Some(kinds::api_group_list(&served)),
            "/openapi/v3" => Some(kinds::openapi_root(&served)),
            _ => {
                if let Some(doc) = path.strip_prefix("/openapi/v3") {
                    let gv = group_version(doc)?;
                    return Some(kinds::openapi_group_version(&gv, &served));
                }
                let gv = group_version(path)?;
                served.iter().any(|k| k.group_version() == gv).then(|| kinds::api_resource_list(&gv, &served))
            }
        }
    }

    fn serves(&self, collection: &str) -> bool {
        self.state.lock().unwrap().collections.contains_key(collection)
    }

    /// The address of pod `namespace/pod`, from its `status.podIP`.
    fn pod_ip(&self, namespace: &str, pod: &str) -> Option<String> {
        let st = self.state.lock().unwrap();
        st.collections
            .get("/api/v1/pods")
            .and_then(|c| c.objects.get(&format!("{namespace}/{pod}")))
            .and_then(|p| p["status"]["podIP"].as_str().map(str::to_owned))
    }

    /// Upgrades to a WebSocket speaking `v4.channel.k8s.io` and carries channel 0 to and
    /// from the pod's `port`; a pod that refuses gets its error on channel 1.
    fn port_forward(&self, namespace: &str, pod: &str, port: u16, req: Request<Incoming>) -> Response<Body> {
        use futures::{SinkExt as _, StreamExt as _};
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        use tokio_tungstenite::tungstenite::{Message, handshake::derive_accept_key, protocol::Role};
        let Some(ip) = self.pod_ip(namespace, pod) else { return not_found_named(pod) };
        let offered = req
            .headers()
            .get_all(http::header::SEC_WEBSOCKET_PROTOCOL)
            .iter()
            .any(|v| v.to_str().is_ok_and(|v| v.split(',').any(|p| p.trim() == "v4.channel.k8s.io")));
        let Some(key) = req.headers().get(http::header::SEC_WEBSOCKET_KEY).map(|k| derive_accept_key(k.as_bytes()))
        else {
            return bad_request("port-forward needs a WebSocket upgrade");
        };
        if !offered {
            return bad_request("port-forward speaks v4.channel.k8s.io only here");
        }
        let upgrade = hyper::upgrade::on(req);
        tokio::spawn(async move {
            let Ok(upgraded) = upgrade.await else { return };
            let ws = tokio_tungstenite::WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None);
            let (mut sink, mut from_client) = ws.await.split();
            let [lo, hi] = port.to_le_bytes();
            for channel in [0u8, 1] {
                if sink.send(Message::binary(vec![channel, lo, hi])).await.is_err() {
                    return;
                }
            }
            let mut tcp = match tokio::net::TcpStream::connect((ip.as_str(), port)).await {
                Ok(t) => t,
                Err(e) => {
                    let why = format!("error forwarding port {port} to pod {ip}: {e}");
                    let mut frame = vec![1u8];
                    frame.extend_from_slice(why.as_bytes());
                    let _ = sink.send(Message::binary(frame)).await;
                    let _ = sink.send(Message::Close(None)).await;
                    return;
                }
            };
            let mut buf = vec![0u8; 16 << 10];
            loop {
                tokio::select! {
                    read = tcp.read(&mut buf) => match read {
                        Ok(n) if n > 0 => {
                            let mut frame = Vec::with_capacity(n + 1);
                            frame.push(0u8);
                            frame.extend_from_slice(&buf[..n]);
                            if sink.send(Message::binary(frame)).await.is_err() {
                                return;
                            }
                        }
                        _ => {
                            let _ = sink.send(Message::Close(None)).await;
                            return;
                        }
                    },
                    msg = from_client.next() => match msg {
                        Some(Ok(Message::Binary(data))) if data.first() == Some(&0) => {
                            if tcp.write_all(&data[1..]).await.is_err() {
                                return;
                            }
                        }
                        Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return,
                        Some(Ok(_)) => {}
                    },
                }
            }
        });
        Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header(http::header::CONNECTION, "Upgrade")
            .header(http::header::UPGRADE, "websocket")
            .header(http::header::SEC_WEBSOCKET_ACCEPT, key)
            .header(http::header::SEC_WEBSOCKET_PROTOCOL, "v4.channel.k8s.io")
            .body(Full::new(Bytes::new()).boxed())
            .unwrap()
    }

    /// Forwards a request (method, query, body, end-to-end headers) to the pod's
    /// address, as the API server's pod proxy does.
    async fn proxy(&self, namespace: &str, pod: &str, port: u16, rest: &str, req: Request<Incoming>) -> Response<Body> {
        let Some(ip) = self.pod_ip(namespace, pod) else { return not_found_named(pod) };
        let unavailable = |why: String| {
            status(
                StatusCode::SERVICE_UNAVAILABLE,
                json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "ServiceUnavailable", "code": 503, "message": why}),
            )
        };
        let tcp = match tokio::net::TcpStream::connect((ip.as_str(), port)).await {
            Ok(t) => t,
            Err(e) => return unavailable(format!("error trying to reach service: {e}")),
        };
        let Ok((mut sender, conn)) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await else {
            return unavailable("handshake failed".into());
        };
        tokio::spawn(conn);
        let (parts, body) = req.into_parts();
        let Ok(body) = body.collect().await.map(|b| b.to_bytes()) else { return bad_request("unreadable body") };
        let target = match parts.uri.query() {
            Some(q) => format!("/{rest}?{q}"),
            None => format!("/{rest}"),
        };
        let mut forwarded = Request::builder().method(parts.method).uri(target);
        for (name, value) in &parts.headers {
            if ![http::header::HOST, http::header::AUTHORIZATION, http::header::CONNECTION].contains(name) {
                forwarded = forwarded.header(name, value);
            }
        }
        let req = forwarded.header(http::header::HOST, format!("{ip}:{port}")).body(Full::new(body)).unwrap();
        match sender.send_request(req).await {
            Ok(resp) => {
                let (parts, body) = resp.into_parts();
                let bytes = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                Response::from_parts(parts, Full::new(bytes).boxed())
            }
            Err(e) => unavailable(e.to_string()),
        }
    }

    /// Every write taken (`create|apply|delete <collection> <ns>/<name>`), in order.
    pub fn writes(&self) -> Vec<String> {
        self.writes.lock().unwrap().clone()
    }

    /// The stored object, if any.
    pub fn get(&self, collection: &str, namespace: &str, name: &str) -> Option<Value> {
        self.state.lock().unwrap().collections.get(collection)?.objects.get(&format!("{namespace}/{name}")).cloned()
    }

    fn watch(
        &self,
        path: String,
        from: u64,
        filter: Box<dyn Fn(&Value) -> bool + Send + Sync>,
        bookmarks: bool,
        mut running: watch::Receiver<bool>,
    ) -> Response<Body> {
        let me = self.clone();
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(64);
        tokio::spawn(async move {
            let send = |v: Value| {
                let mut line = serde_json::to_vec(&v).unwrap();
                line.push(b'\n');
                Ok(Frame::data(Bytes::from(line)))
            };
            if from < me.state.lock().unwrap().compacted {
                let gone = json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Expired", "code": 410, "message": format!("too old resource version: {from}")}});
                me.gone.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let _ = tx.send(send(gone)).await;
                return;
            }
            let mut seen = from;
            loop {
                let notified = me.changed.notified();
                let (events, now) = {
                    let st = me.state.lock().unwrap();
                    let evs: Vec<Value> = st.collections[&path]
                        .history
                        .iter()
                        .filter(|(rv, _, o)| *rv > seen && filter(o))
                        .map(|(_, t, o)| json!({"type": t, "object": o}))
                        .collect();
                    (evs, st.rv)
                };
                for e in events {
                    if tx.send(send(e)).await.is_err() {
                        return;
                    }
                }
                seen = now;
                tokio::select! {
                    _ = notified => {}
                    _ = running.changed() => return,
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {
                        if bookmarks {
                            let bm = json!({"type": "BOOKMARK", "object": {"kind": "Status", "apiVersion": "v1", "metadata": {"resourceVersion": now.to_string()}}});
                            if tx.send(send(bm)).await.is_err() {
                                return;
                            }
                        }
                    }
                }
                if !*running.borrow() {
                    return;
                }
            }
        });
        let body = StreamBody::new(tokio_stream_from(rx)).boxed();
        let mut r = Response::new(body);
        r.headers_mut().insert(http::header::CONTENT_TYPE, "application/json".parse().unwrap());
        r
    }
}

/// What a request path names.
enum Target {
    /// A collection, all namespaces or one.
    Collection { collection: String, namespace: Option<String> },
    /// One object (`namespace` empty for a cluster-scoped one).
    Object { collection: String, namespace: String, name: String },
    /// An object's `status` subresource: a PATCH changes `status` alone, and is refused
    /// (409) when it names a `resourceVersion` the object no longer has.
    Status { collection: String, namespace: String, name: String },
    /// The pod proxy subresource.
    Proxy { namespace: String, pod: String, port: u16, rest: String },
    /// The pod's `portforward` subresource.
    PortForward { namespace: String, pod: String },
}

fn route(path: &str) -> Option<Target> {
    let (prefix, rest) = if let Some(rest) = path.strip_prefix("/api/v1") {
        ("/api/v1".to_string(), rest)
    } else {
        let rest = path.strip_prefix("/apis/")?;
        let mut it = rest.splitn(3, '/');
        let (group, version) = (it.next()?, it.next()?);
        (format!("/apis/{group}/{version}"), it.next().map_or("", |r| r))
    };
    let parts: Vec<&str> = rest.trim_start_matches('/').split('/').filter(|p| !p.is_empty()).collect();
    let coll = |plural: &str| format!("{prefix}/{plural}");
    Some(match parts.as_slice() {
        [plural] => Target::Collection { collection: coll(plural), namespace: None },
        ["namespaces", ns, plural] => Target::Collection { collection: coll(plural), namespace: Some(ns.to_string()) },
        ["namespaces", ns, "pods", target, "proxy", rest @ ..] => {
            let (pod, port) = target.split_once(':')?;
            Target::Proxy { namespace: ns.to_string(), pod: pod.into(), port: port.parse().ok()?, rest: rest.join("/") }
        }
        ["namespaces", ns, "pods", pod, "portforward"] => {
            Target::PortForward { namespace: ns.to_string(), pod: pod.to_string() }
        }
        ["namespaces", ns, plural, name] => {
            Target::Object { collection: coll(plural), namespace: ns.to_string(), name: name.to_string() }
        }
        [plural, name] => Target::Object { collection: coll(plural), namespace: String::new(), name: name.to_string() },
        ["namespaces", ns, plural, name, "status"] => {
            Target::Status { collection: coll(plural), namespace: ns.to_string(), name: name.to_string() }
        }
        [plural, name, "status"] => {
            Target::Status { collection: coll(plural), namespace: String::new(), name: name.to_string() }
        }
        _ => return None,
    })
}

/// `fieldValidation=Strict` for the built-in kinds, then validation: 400 naming every
/// field the type does not have, 422 for a rule broken, as the API server answers.
fn refusal(collection: &str, object: &Value) -> Option<Response<Body>> {
    let kind = kinds::builtin().into_iter().find(|k| k.collection() == collection)?;
    let name = object["metadata"]["name"].as_str().unwrap_or("");
    let (code, reason, message) = match kind.validate(object) {
        Ok(()) => return None,
        Err(kinds::Refusal::Decoding(problems)) => (
            StatusCode::BAD_REQUEST,
            "BadRequest",
            format!("{} {name}: strict decoding error: {}", kind.kind, problems.join(", ")),
        ),
        Err(kinds::Refusal::Invalid(problems)) => {
            let group = if kind.group.is_empty() { String::new() } else { format!(".{}", kind.group) };
            (
                StatusCode::UNPROCESSABLE_ENTITY,
                "Invalid",
                format!("{}{group} \"{name}\" is invalid: {}", kind.kind, problems.join(", ")),
            )
        }
    };
    Some(status(
        code,
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason, "code": code.as_u16(), "message": message}),
    ))
}

fn not_found(path: &str) -> Response<Body> {
    status(
        StatusCode::NOT_FOUND,
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": format!("the server could not find the requested resource ({path})")}),
    )
}

fn not_found_named(name: &str) -> Response<Body> {
    status(
        StatusCode::NOT_FOUND,
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": format!("{name} not found")}),
    )
}

fn bad_request(why: &str) -> Response<Body> {
    status(
        StatusCode::BAD_REQUEST,
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "BadRequest", "code": 400, "message": why}),
    )
}

/// `app=mesh-agent,tier=x` style equality label selectors.
fn selects_labels(selector: Option<&str>, o: &Value) -> bool {
    let Some(sel) = selector.filter(|s| !s.is_empty()) else { return true };
    sel.split(',').all(|term| match term.split_once('=') {
        Some((k, want)) => o["metadata"]["labels"][k].as_str() == Some(want),
        None => true,
    })
}

fn tokio_stream_from(
    mut rx: tokio::sync::mpsc::Receiver<Result<Frame<Bytes>, Infallible>>,
) -> impl futures::Stream<Item = Result<Frame<Bytes>, Infallible>> {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

fn status(code: StatusCode, body: Value) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(serde_json::to_vec(&body).unwrap())).boxed());
    *r.status_mut() = code;
    r.headers_mut().insert(http::header::CONTENT_TYPE, "application/json".parse().unwrap());
    r
}

/// `spec.nodeName=node1` style equality selectors.
fn selects(selector: Option<&str>, o: &Value) -> bool {
    let Some(sel) = selector.filter(|s| !s.is_empty()) else { return true };
    sel.split(',').all(|term| match term.split_once('=') {
        Some((field, want)) => {
            let mut v = o;
            for part in field.split('.') {
                v = &v[part];
            }
            v.as_str() == Some(want)
        }
        None => true,
    })
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let escaped = (b[i] == b'%' && i + 2 < b.len() + 1)
            .then(|| std::str::from_utf8(b.get(i + 1..i + 3)?).ok())
            .flatten()
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match escaped {
            Some(v) => {
                out.push(v);
                i += 3;
            }
            None => {
                out.push(if b[i] == b'+' { b' ' } else { b[i] });
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

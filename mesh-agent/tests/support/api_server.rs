//! An in-process Kubernetes API server double, as far as list and watch go, following
//! the API conventions: every change bumps a cluster-wide `resourceVersion`; a list
//! returns the current objects with the version it saw; a watch from version `v`
//! streams the changes after `v` as JSON events (`ADDED`, `MODIFIED`, `DELETED`),
//! `BOOKMARK`s while idle when asked for, and `ERROR` with a 410 `Expired` Status when
//! `v` is older than the history it keeps (after [`ApiServer::compact`]). Unknown
//! resources answer 404, as a cluster without the CRD does. [`ApiServer::stop`] and
//! [`ApiServer::start`] make an outage on the same port.

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
        };
        s.start().await;
        s
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
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
                                async move { Ok::<_, Infallible>(me.handle(req, rx)) }
                            });
                            let conn = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), svc);
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

    /// Creates or replaces an object (by namespace/name) in `collection`.
    pub fn apply(&self, collection: &str, mut object: Value) {
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
        c.history.push((rv, kind, object));
        drop(st);
        self.changed.notify_waiters();
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

    fn handle(&self, req: Request<Incoming>, running: watch::Receiver<bool>) -> Response<Body> {
        let path = req.uri().path().to_string();
        let query: BTreeMap<String, String> = req
            .uri()
            .query()
            .unwrap_or("")
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), percent_decode(v)))
            .collect();
        // GET of one namespaced object: /api/v1/namespaces/<ns>/<plural>/<name>.
        if let Some((collection, ns, name)) = single_object(&path) {
            let st = self.state.lock().unwrap();
            return match st.collections.get(&collection).and_then(|c| c.objects.get(&format!("{ns}/{name}"))) {
                Some(o) => status(StatusCode::OK, o.clone()),
                None => status(
                    StatusCode::NOT_FOUND,
                    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": format!("{name} not found")}),
                ),
            };
        }
        if !self.state.lock().unwrap().collections.contains_key(&path) {
            return status(
                StatusCode::NOT_FOUND,
                json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": format!("the server could not find the requested resource ({path})")}),
            );
        }
        let selector = query.get("fieldSelector").cloned();
        if query.get("watch").is_some_and(|w| w == "true" || w == "1") {
            let from: u64 = query.get("resourceVersion").and_then(|v| v.parse().ok()).unwrap_or(0);
            return self.watch(
                path,
                from,
                selector,
                query.get("allowWatchBookmarks").is_some_and(|b| b == "true"),
                running,
            );
        }
        let st = self.state.lock().unwrap();
        // As a real API server, list items carry no apiVersion or kind.
        let items: Vec<Value> = st.collections[&path]
            .objects
            .values()
            .filter(|o| selects(selector.as_deref(), o))
            .map(|o| {
                let mut item = o.clone();
                if let Some(m) = item.as_object_mut() {
                    m.remove("apiVersion");
                    m.remove("kind");
                }
                item
            })
            .collect();
        status(
            StatusCode::OK,
            json!({"kind": "List", "apiVersion": "v1", "metadata": {"resourceVersion": st.rv.to_string()}, "items": items}),
        )
    }

    fn watch(
        &self,
        path: String,
        from: u64,
        selector: Option<String>,
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
                        .filter(|(rv, _, o)| *rv > seen && selects(selector.as_deref(), o))
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

/// `/api/v1/namespaces/<ns>/<plural>/<name>` as (collection path, ns, name).
fn single_object(path: &str) -> Option<(String, String, String)> {
    let rest = path.strip_prefix("/api/v1/namespaces/")?;
    let mut parts = rest.split('/');
    let (ns, plural, name) = (parts.next()?, parts.next()?, parts.next()?);
    parts.next().is_none().then(|| (format!("/api/v1/{plural}"), ns.to_string(), name.to_string()))
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

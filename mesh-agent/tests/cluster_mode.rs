//! The agent binary in cluster mode (`--config-source kubernetes`) against the API
//! server double: it reads its CA from the `cacerts` Secret (key 0600), does not call
//! itself ready before every kind is listed, then serves what the API lists and
//! follows changes; `meshctl proxy-status` reaches it through the API server's pod
//! proxy and reports it SYNCED with the digest of its config. Needs root (it loads its eBPF programs into a cgroup of its own);
//! skips with a message without it, fails under MESH_REQUIRE_LAB.

mod support;

use std::os::unix::fs::PermissionsExt as _;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use aya::maps::MapData;
use mesh_agent::config::kube_source::KINDS;
use serde_json::json;
use support::api_server::{ApiServer, collection_path};
use support::ca_secret;

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("Uid:")).map(|l| l.split_whitespace().nth(2) == Some("0")))
        .unwrap_or(false)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// What the test created on the host, removed on drop (also on panic).
struct Scratch {
    agent: Option<Child>,
    cgroup: PathBuf,
    pins: PathBuf,
    /// Processes the test started (pods' stand-ins), killed and reaped.
    children: Vec<Child>,
    /// cgroups below `cgroup`, removed deepest first.
    cgroups: Vec<PathBuf>,
    /// Network namespaces the test made, by name.
    netns: Vec<String>,
    _dir: tempfile::TempDir,
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Some(mut a) = self.agent.take() {
            let _ = Command::new("kill").args(["-TERM", &a.id().to_string()]).status();
            let deadline = Instant::now() + Duration::from_secs(5);
            while a.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = a.kill();
            let _ = a.wait();
        }
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        // Unpinning the links detaches the programs; then the maps and the cgroups go.
        let _ = std::fs::remove_dir_all(&self.pins);
        for ns in &self.netns {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        let mut cgroups = self.cgroups.clone();
        cgroups.sort_by_key(|c| std::cmp::Reverse(c.components().count()));
        for cg in cgroups.iter().chain([&self.cgroup]) {
            // Killed processes leave their cgroup a moment later.
            for _ in 0..50 {
                if !cg.exists() || std::fs::remove_dir(cg).is_ok() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

async fn get(url: &str) -> Option<(u16, String)> {
    get_as(url, None).await
}

/// GET with `token` as the bearer token, if any.
async fn get_as(url: &str, token: Option<&str>) -> Option<(u16, String)> {
    let mut curl = tokio::process::Command::new("curl");
    curl.args(["-s", "-m", "5", "-w", "\n%{http_code}", url]);
    if let Some(t) = token {
        curl.args(["-H", &format!("Authorization: Bearer {t}")]);
    }
    let out = curl.output().await.ok()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n')?;
    Some((code.parse().ok()?, body.to_string()))
}

/// The cgroup2 mount.
fn cgroup_root() -> PathBuf {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
    mounts
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(2) == Some(&"cgroup2")).then(|| PathBuf::from(f[1]))
        })
        .expect("cgroup v2 mounted")
}

/// Whether this test can run here (root); says why not, or fails under MESH_REQUIRE_LAB.
fn can_run(test: &str) -> bool {
    if is_root() {
        return true;
    }
    assert!(std::env::var_os("MESH_REQUIRE_LAB").is_none(), "cluster-mode test required but not root");
    eprintln!("skipping {test}: not root");
    false
}

/// Scratch resources of one test, named after it and this process.
fn scratch(test: &str) -> Scratch {
    let id = format!("{test}-{}", std::process::id());
    let s = Scratch {
        agent: None,
        cgroup: cgroup_root().join(format!("mesh-cluster-{id}")),
        pins: PathBuf::from(format!("/sys/fs/bpf/mesh-cluster-{id}")),
        children: Vec::new(),
        cgroups: Vec::new(),
        netns: Vec::new(),
        _dir: tempfile::tempdir().unwrap(),
    };
    std::fs::create_dir_all(&s.cgroup).unwrap();
    s
}

/// Admin, metrics and readiness ports of an agent started by [`spawn_agent`].
struct Ports {
    admin: u16,
    metrics: u16,
    ready: u16,
}

/// Every collection the agent and the CA read or write.
fn collections() -> Vec<String> {
    let mut c: Vec<String> = KINDS.iter().map(|k| collection_path(k.group, k.version, k.plural)).collect();
    c.extend(["/api/v1/secrets".to_string(), "/api/v1/configmaps".to_string()]);
    c
}

/// The agent's service-account token, and the pod it is bound to (`mesh-agent-abcde`
/// on node1), as TokenReview reports them.
const AGENT_TOKEN: &str = "projected-token-of-mesh-agent-abcde";
const AGENT_POD_UID: &str = "5a5a5a5a-0000-4000-8000-00000000abcd";

/// Registers the agent's token and its pod with the double, for the CA's TokenReview.
fn register_agent(api: &ApiServer, metrics_port: u16) {
    api.add_token(
        AGENT_TOKEN,
        json!({"username": "system:serviceaccount:istio-system:mesh-agent",
               "extra": {"authentication.kubernetes.io/pod-name": ["mesh-agent-abcde"],
                         "authentication.kubernetes.io/pod-uid": [AGENT_POD_UID]}}),
    );
    api.apply("/api/v1/pods", agent_pod("mesh-agent-abcde", AGENT_POD_UID, "node1", metrics_port));
}

/// An agent pod as the DaemonSet makes it.
fn agent_pod(name: &str, uid: &str, node: &str, port: u16) -> serde_json::Value {
    json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "istio-system", "uid": uid, "labels": {"app": "mesh-agent"}},
        "spec": {"nodeName": node, "serviceAccountName": "mesh-agent", "containers": [{"name": "mesh-agent", "image": "mesh-agent:test",
            "ports": [{"name": "http-metrics", "containerPort": port}]}]},
        "status": {"phase": "Running", "podIP": "127.0.0.1"}})
}

/// Starts the CA service in cluster mode against `api_url` (its key from the `cacerts`
/// Secret, agents known by TokenReview); returns its address.
fn spawn_ca(api_url: &str, dir: &std::path::Path, scratch: &mut Scratch) -> String {
    let port = free_port();
    let ca = Command::new(env!("CARGO_BIN_EXE_mesh-ca"))
        .args(["--config-source", "kubernetes", "--kube-api-url", api_url, "--ca-secret", "istio-system/cacerts"])
        .args(["--listen", &format!("127.0.0.1:{port}"), "--server-name", "mesh-ca.test", "--server-ip", "127.0.0.1"])
        .args(["--root-configmap", "istio-system/mesh-ca-root-cert"])
        .arg("--ca-dir")
        .arg(dir.join("ca"))
        .env("MESH_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("ca.log")).unwrap())
        .spawn()
        .unwrap();
    scratch.children.push(ca);
    format!("127.0.0.1:{port}")
}

/// Starts the agent binary in cluster mode against `api_url`, on node1, with the
/// scratch cgroup as its node cgroup and the CA at `ca`; logs to `dir/agent.log`. It
/// trusts the root the `cacerts` Secret was made from (the ConfigMap mount, in a
/// cluster) and holds no CA key.
fn spawn_agent(api_url: &str, ca: &str, dir: &std::path::Path, scratch: &mut Scratch) -> Ports {
    let ports = Ports { admin: free_port(), metrics: free_port(), ready: free_port() };
    std::fs::write(dir.join("agent-token"), AGENT_TOKEN).unwrap();
    let agent = Command::new(env!("CARGO_BIN_EXE_mesh-agent"))
        .args(["--node", "node1", "--config-source", "kubernetes", "--kube-api-url", api_url])
        .args(["--ca-address", ca, "--ca-server-name", "mesh-ca.test", "--trust-refresh", "1s"])
        .arg("--ca-root-cert")
        .arg(dir.join("ca-source/root-cert.pem"))
        .arg("--ca-token-file")
        .arg(dir.join("agent-token"))
        .arg("--node-cgroup")
        .arg(&scratch.cgroup)
        .arg("--cni-socket")
        .arg(dir.join("cni/cni.sock"))
        .arg("--bpf-pin-dir")
        .arg(&scratch.pins)
        .args(["--admin-addr", &format!("127.0.0.1:{}", ports.admin)])
        .args(["--metrics-addr", &format!("127.0.0.1:{}", ports.metrics)])
        .args(["--readiness-addr", &format!("127.0.0.1:{}", ports.ready)])
        .args(["--cluster-id", "cluster1", "--remote-clusters-refresh", "1s"])
        .env("MESH_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("agent.log")).unwrap())
        .spawn()
        .unwrap();
    scratch.agent = Some(agent);
    ports
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_waits_for_the_api_then_serves_and_follows_it() {
    if !can_run("the_agent_waits_for_the_api_then_serves_and_follows_it") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut scratch = scratch("follows");

    let api = ApiServer::new(&collections()).await;
    api.apply("/api/v1/secrets", ca_secret(dir.path()));
    api.apply(
        "/api/v1/namespaces",
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "production", "labels": {"istio-injection": "enabled"}}}),
    );
    // The API is down when the CA and the agent start.
    api.stop().await;

    let ca = spawn_ca(&api.url(), dir.path(), &mut scratch);
    let Ports { admin, metrics, ready } = spawn_agent(&api.url(), &ca, dir.path(), &mut scratch);
    register_agent(&api, metrics);
    let ca_dir = dir.path().join("ca");
    let log = || std::fs::read_to_string(dir.path().join("agent.log")).unwrap_or_default();
    let ca_log = || std::fs::read_to_string(dir.path().join("ca.log")).unwrap_or_default();

    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = get(&format!("http://127.0.0.1:{ready}/healthz/ready")).await;
    assert!(before.as_ref().is_none_or(|(c, _)| *c != 200), "ready without its API server: {before:?}\n{}", log());
    assert!(ca_log().contains("waiting for the mesh CA Secret"), "{}", ca_log());

    api.start().await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while get(&format!("http://127.0.0.1:{ready}/healthz/ready")).await.is_none_or(|(c, _)| c != 200) {
        assert!(Instant::now() < deadline, "never ready after the API came back:\n{}", log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The key is the CA's alone: 0600 in its own directory; the agent never reads it.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ca_log().contains("mesh CA read from its Secret") {
        assert!(Instant::now() < deadline, "the CA never read its Secret:\n{}", ca_log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let key_mode = std::fs::metadata(ca_dir.join("ca-key.pem")).unwrap().permissions().mode() & 0o777;
    assert_eq!(key_mode, 0o600);
    assert!(ca_log().contains("mesh CA read from its Secret"), "{}", ca_log());
    assert!(!log().contains("ca-key") && !log().contains("cacerts"), "{}", log());
    // The CA publishes the roots agents mount.
    let deadline = Instant::now() + Duration::from_secs(10);
    while api.get("/api/v1/configmaps", "istio-system", "mesh-ca-root-cert").is_none() {
        assert!(Instant::now() < deadline, "root ConfigMap never published:\n{}", ca_log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let published = api.get("/api/v1/configmaps", "istio-system", "mesh-ca-root-cert").unwrap();
    let root = std::fs::read_to_string(dir.path().join("ca-source/root-cert.pem")).unwrap();
    assert_eq!(published["data"]["root-cert.pem"], root.as_str());

    // What the API lists is served; a pod added later shows up.
    api.apply(
        "/api/v1/pods",
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "myapp-v1", "namespace": "production", "labels": {"app": "myapp"}},
               "spec": {"serviceAccountName": "myapp", "nodeName": "node2", "containers": [{"name": "app"}]},
               "status": {"podIP": "10.1.2.3"}}),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let dump = get(&format!("http://127.0.0.1:{admin}/config_dump")).await.map(|(_, b)| b).unwrap_or_default();
        if dump.contains("myapp-v1") && dump.contains("spiffe://cluster.local/ns/production/sa/myapp") {
            break;
        }
        assert!(Instant::now() < deadline, "the pod never reached the agent:\n{dump}\n{}", log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // proxy-status: the agent's pod, as the DaemonSet would run it, reached through
    // the API server's pod proxy on its http-metrics port.
    let digest =
        |dump: &str| serde_json::from_str::<serde_json::Value>(dump).ok()?["config_digest"].as_str().map(str::to_owned);
    let kubeconfig = api.kubeconfig(dir.path());
    let proxy_status = || {
        let kc = kubeconfig.clone();
        tokio::task::spawn_blocking(move || {
            let out = Command::new(env!("CARGO_BIN_EXE_meshctl"))
                .arg("proxy-status")
                .env("KUBECONFIG", kc)
                .env("NO_COLOR", "1")
                .output()
                .unwrap();
            (
                out.status.code(),
                format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
            )
        })
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (code, out) = proxy_status().await.unwrap();
        let dump = get(&format!("http://127.0.0.1:{admin}/config_dump")).await.map(|(_, b)| b).unwrap_or_default();
        let want = digest(&dump).expect("the dump has a digest");
        // The agent may still be taking in its own pod: retry until the two agree.
        if code == Some(0) && out.contains("mesh-agent-abcde") && out.contains("SYNCED") && out.contains(&want) {
            break;
        }
        assert!(Instant::now() < deadline, "proxy-status never showed the agent SYNCED at {want}:\n{out}\n{}", log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The metrics port gives any pod the sync status, not the config dump.
    let (code, _) = get(&format!("http://127.0.0.1:{metrics}/config_dump")).await.unwrap();
    assert_eq!(code, 404);
    // Nor the metrics: those are for a scraper whose account may `get /metrics`
    // (TokenReview, then SubjectAccessReview).
    let scrape = format!("http://127.0.0.1:{metrics}/metrics");
    api.add_token("token-of-a-pod", json!({"username": "system:serviceaccount:production:myapp"}));
    api.add_token("token-of-prometheus", json!({"username": "system:serviceaccount:monitoring:prometheus"}));
    api.grant("system:serviceaccount:monitoring:prometheus", "get", "/metrics");
    assert_eq!(get(&scrape).await.unwrap().0, 401, "no token");
    assert_eq!(get_as(&scrape, Some("made-up")).await.unwrap().0, 401, "a token the API does not know");
    let (code, body) = get_as(&scrape, Some("token-of-a-pod")).await.unwrap();
    assert_eq!(code, 403, "an account without the permission: {body}");
    let (code, body) = get_as(&scrape, Some("token-of-prometheus")).await.unwrap();
    assert_eq!(code, 200, "{body}\n{}", log());
    assert!(body.contains("istio_mesh_enrolled_pods"), "{body}");
    // Allowed /metrics only: the decision cached for it is not reused for another path.
    let other = format!("http://127.0.0.1:{metrics}/stats/prometheus");
    assert_eq!(get_as(&other, Some("token-of-prometheus")).await.unwrap().0, 403, "not granted /stats/prometheus");
    assert!(!log().contains("token-of-"), "tokens are never logged");
    // The admin address (loopback) is the node's own and is not asked.
    assert_eq!(get(&format!("http://127.0.0.1:{admin}/metrics")).await.unwrap().0, 200);

    // A pod of this node the agent cannot capture (its UID cannot name a cgroup) makes
    // the agent NOT READY, with the pod and the reason under its line.
    api.apply(
        "/api/v1/pods",
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "broken", "namespace": "production", "uid": "not-a-uuid"},
               "spec": {"nodeName": "node1", "containers": [{"name": "app"}]}, "status": {"podIP": "10.1.2.9"}}),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let out = loop {
        let (code, out) = proxy_status().await.unwrap();
        if code == Some(1) && out.contains("pod production/broken (uid not-a-uuid) not captured") {
            break out;
        }
        assert!(Instant::now() < deadline, "proxy-status never showed the failed pod:\n{out}\n{}", log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(out.lines().any(|l| l.contains("mesh-agent-abcde") && l.contains("NOT READY")), "{out}");
    assert!(out.contains("metadata.uid is missing or not a UUID"), "{out}");
    api.delete("/api/v1/pods", "production", "broken");

    // An agent that does not answer is named, and the command fails.
    api.apply(
        "/api/v1/pods",
        agent_pod("mesh-agent-fghij", "5a5a5a5a-0000-4000-8000-00000000fghi", "node2", free_port()),
    );
    let (code, out) = proxy_status().await.unwrap();
    assert_eq!(code, Some(1), "{out}");
    assert!(out.lines().any(|l| l.contains("mesh-agent-fghij") && l.contains("UNREACHABLE")), "{out}");
    assert!(out.lines().any(|l| l.contains("mesh-agent-abcde") && l.contains("SYNCED")), "{out}");
}

/// A pod of an API server double: `name` in production, labelled `app`, at `ip`.
fn app_pod(name: &str, app: &str, node: &str, ip: &str) -> serde_json::Value {
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "production", "labels": {"app": app}},
           "spec": {"serviceAccountName": app, "nodeName": node, "containers": [{"name": "app", "ports": [{"containerPort": 8080}]}]},
           "status": {"phase": "Running", "podIP": ip, "conditions": [{"type": "Ready", "status": "True"}]}})
}

/// A Service of an API server double selecting `app` in production.
fn app_service(app: &str, cluster_ip: &str) -> serde_json::Value {
    json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": app, "namespace": "production"},
           "spec": {"selector": {"app": app}, "clusterIP": cluster_ip, "ports": [{"port": 80, "targetPort": 8080}]}})
}

/// The agent's `/config_dump` as JSON, once it answers.
async fn config_dump(admin: u16) -> serde_json::Value {
    let body = get(&format!("http://127.0.0.1:{admin}/config_dump")).await.map(|(_, b)| b).unwrap_or_default();
    serde_json::from_str(&body).unwrap_or_default()
}

/// `(service, address, cluster)` of every endpoint in a config dump, sorted.
fn endpoints_of(dump: &serde_json::Value) -> Vec<(String, String, String)> {
    let mut v: Vec<_> = dump["endpoints"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            let field = |k: &str| e[k].as_str().unwrap_or_default().to_string();
            (field("service"), field("address"), field("cluster"))
        })
        .collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_secret_brings_in_the_other_clusters_services_until_it_is_removed() {
    if !can_run("a_remote_secret_brings_in_the_other_clusters_services_until_it_is_removed") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut scratch = scratch("remote");
    let namespace = json!({"apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": "production", "labels": {"istio.io/dataplane-mode": "ambient"}}});
    // Cluster1, where the agent runs: myapp with one pod.
    let api = ApiServer::new(&collections()).await;
    api.apply("/api/v1/secrets", ca_secret(dir.path()));
    api.apply("/api/v1/namespaces", namespace.clone());
    api.apply("/api/v1/pods", app_pod("myapp-v1", "myapp", "node2", "10.1.2.3"));
    api.apply("/api/v1/services", app_service("myapp", "10.96.0.20"));
    // Cluster2, read with its reader's token only: myapp too, and db, which cluster1
    // does not have. Its pods name node1, this agent's node, as clusters' nodes may.
    let remote = ApiServer::new(&collections()).await;
    const READER_TOKEN: &str = "reader-token-of-cluster2";
    remote.require_token(READER_TOKEN);
    remote.apply("/api/v1/namespaces", namespace);
    remote.apply("/api/v1/pods", app_pod("myapp-far", "myapp", "node1", "10.2.0.5"));
    remote.apply("/api/v1/pods", app_pod("db-0", "db", "node1", "10.2.0.6"));
    remote.apply("/api/v1/services", app_service("myapp", "10.97.0.20"));
    remote.apply("/api/v1/services", app_service("db", "10.97.0.30"));

    let ca = spawn_ca(&api.url(), dir.path(), &mut scratch);
    let Ports { admin, metrics, ready } = spawn_agent(&api.url(), &ca, dir.path(), &mut scratch);
    register_agent(&api, metrics);
    let log = || std::fs::read_to_string(dir.path().join("agent.log")).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(30);
    while get(&format!("http://127.0.0.1:{ready}/healthz/ready")).await.is_none_or(|(c, _)| c != 200) {
        assert!(Instant::now() < deadline, "never ready:\n{}", log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let local_only = vec![("production/myapp".to_string(), "10.1.2.3:8080".to_string(), "cluster1".to_string())];
    assert_eq!(endpoints_of(&config_dump(admin).await), local_only);

    // The remote secret, as `meshctl x create-remote-secret` prints it, applied in
    // cluster1: the agent follows cluster2.
    let kubeconfig = format!(
        "apiVersion: v1\nkind: Config\ncurrent-context: cluster2\n\
         clusters: [{{name: cluster2, cluster: {{server: \"{}\"}}}}]\n\
         users: [{{name: cluster2, user: {{token: {READER_TOKEN}}}}}]\n\
         contexts: [{{name: cluster2, context: {{cluster: cluster2, user: cluster2}}}}]\n",
        remote.url()
    );
    api.apply(
        "/api/v1/secrets",
        json!({"apiVersion": "v1", "kind": "Secret",
               "metadata": {"name": "istio-remote-secret-cluster2", "namespace": "istio-system",
                            "labels": {"istio/multiCluster": "true"}, "annotations": {"networking.istio.io/cluster": "cluster2"}},
               "type": "Opaque", "data": {"cluster2": base64(&kubeconfig)}}),
    );
    let merged = vec![
        ("production/db".to_string(), "10.2.0.6:8080".to_string(), "cluster2".to_string()),
        ("production/myapp".to_string(), "10.1.2.3:8080".to_string(), "cluster1".to_string()),
        ("production/myapp".to_string(), "10.2.0.5:8080".to_string(), "cluster2".to_string()),
    ];
    let deadline = Instant::now() + Duration::from_secs(20);
    let dump = loop {
        let dump = config_dump(admin).await;
        if endpoints_of(&dump) == merged {
            break dump;
        }
        assert!(Instant::now() < deadline, "cluster2's endpoints never merged: {:?}\n{}", endpoints_of(&dump), log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // db, only in cluster2, is reached at cluster2's address for it; myapp keeps its own.
    let service =
        |name: &str| dump["services"].as_array().unwrap().iter().find(|s| s["name"] == name).cloned().unwrap();
    assert_eq!(service("db")["vips"], json!(["10.97.0.30"]));
    assert_eq!(service("myapp")["vips"], json!(["10.96.0.20"]));
    // Cluster2's pods say node1: this agent still captures none of them.
    assert_eq!(dump["enrolled_pods"], json!([]), "{dump}");
    assert!(remote.unauthorized() == 0, "every request to cluster2 carried the reader's token");
    assert!(!log().contains(READER_TOKEN), "the token is never logged");

    // meshctl remote-clusters, through the API server's pod proxy to the agent.
    let kubeconfig_path = api.kubeconfig(dir.path());
    let remote_clusters = || {
        let kc = kubeconfig_path.clone();
        tokio::task::spawn_blocking(move || {
            let out = Command::new(env!("CARGO_BIN_EXE_meshctl"))
                // The double's kubeconfig context, named as a user would (`--context`).
                .args(["remote-clusters", "--context", "double"])
                .env("KUBECONFIG", kc)
                .env("NO_COLOR", "1")
                .output()
                .unwrap();
            (
                out.status.code(),
                format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
            )
        })
    };
    let (code, out) = remote_clusters().await.unwrap();
    assert_eq!(code, Some(0), "{out}");
    let line = out.lines().find(|l| l.contains("mesh-agent-abcde")).unwrap_or_default().to_string();
    let fields: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(fields, ["mesh-agent-abcde", "node1", "cluster2", "SYNCED", "2", "2"], "{out}");

    // Cluster2 changes: followed.
    remote.delete("/api/v1/pods", "production", "myapp-far");
    let deadline = Instant::now() + Duration::from_secs(10);
    while endpoints_of(&config_dump(admin).await).len() != 2 {
        assert!(Instant::now() < deadline, "cluster2's change never arrived:\n{}", log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The secret removed: cluster2 is no longer followed.
    api.delete("/api/v1/secrets", "istio-system", "istio-remote-secret-cluster2");
    let deadline = Instant::now() + Duration::from_secs(20);
    while endpoints_of(&config_dump(admin).await) != local_only {
        assert!(Instant::now() < deadline, "cluster2 still followed after its secret went:\n{}", log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (code, out) = remote_clusters().await.unwrap();
    assert_eq!(code, Some(0), "{out}");
    assert!(out.lines().any(|l| l.contains("mesh-agent-abcde") && l.contains("(none)")), "{out}");
}

fn base64(text: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(text)
}

/// Runs `sleep` as a pod's process: inside `netns` (the host's when None), then in
/// `cgroup`, in that order, as a runtime starts a sandbox.
fn start_process(scratch: &mut Scratch, netns: Option<&str>, cgroup: &std::path::Path) {
    std::fs::create_dir_all(cgroup).unwrap();
    let mut c = scratch.cgroup.clone();
    for part in cgroup.strip_prefix(&scratch.cgroup).unwrap().components() {
        c.push(part);
        scratch.cgroups.push(c.clone());
    }
    let join = format!("echo $$ > {}/cgroup.procs && exec sleep 600", cgroup.display());
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = Command::new("nsenter");
            c.arg(format!("--net=/var/run/netns/{ns}"));
            c
        }
        None => Command::new("env"),
    };
    let child = cmd.args(["bash", "-c", &join]).stdin(Stdio::null()).spawn().unwrap();
    scratch.children.push(child);
}

/// A pod named after a node-wide cgroup (as the old name lookup would have taken
/// `<node cgroup>/<pod name>`) captures nothing: pods are found by UID only, so the
/// node's `kubepods` tree and its processes stay uncaptured, and the agent binds nothing
/// in the node's network namespace. A pod with a UID kubelet laid out is captured.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_named_like_a_node_cgroup_captures_nothing_but_pods_are_found_by_uid() {
    if !can_run("a_pod_named_like_a_node_cgroup_captures_nothing_but_pods_are_found_by_uid") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut scratch = scratch("byuid");
    // The node: kubelet's tree with a process in it (in the node's own netns), and a
    // real pod (UID web) with its sandbox in a netns of its own.
    let kubepods = scratch.cgroup.join("kubepods");
    start_process(&mut scratch, None, &kubepods.join("system-daemon"));
    let web_uid = "7d9e1f00-1111-4222-8333-444455556666";
    let web_ns = format!("mesh-cluster-web-{}", std::process::id());
    assert!(Command::new("ip").args(["netns", "add", &web_ns]).status().unwrap().success());
    scratch.netns.push(web_ns.clone());
    let web_cgroup = kubepods.join("besteffort").join(format!("pod{web_uid}"));
    start_process(&mut scratch, Some(&web_ns), &web_cgroup.join("sandbox"));

    let api = ApiServer::new(&collections()).await;
    api.apply("/api/v1/secrets", ca_secret(dir.path()));
    api.apply(
        "/api/v1/namespaces",
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "production", "labels": {"istio-injection": "enabled"}}}),
    );
    let pod = |name: &str, uid: &str, ip: &str| {
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "production", "uid": uid},
               "spec": {"nodeName": "node1", "containers": [{"name": "app"}]},
               "status": {"phase": "Running", "podIP": ip}})
    };
    for (name, uid, ip) in [
        ("kubepods", "00000000-aaaa-4bbb-8ccc-000000000001", "10.77.0.2"),
        ("system.slice", "00000000-aaaa-4bbb-8ccc-000000000002", "10.77.0.3"),
        ("web", web_uid, "10.77.0.4"),
    ] {
        api.apply("/api/v1/pods", pod(name, uid, ip));
    }
    let ca = spawn_ca(&api.url(), dir.path(), &mut scratch);
    let ports = spawn_agent(&api.url(), &ca, dir.path(), &mut scratch);
    register_agent(&api, ports.metrics);
    let log = || std::fs::read_to_string(dir.path().join("agent.log")).unwrap_or_default();

    let deadline = Instant::now() + Duration::from_secs(20);
    let dump = loop {
        let dump = get(&format!("http://127.0.0.1:{}/config_dump", ports.admin)).await.map(|(_, b)| b);
        let v: serde_json::Value = dump.and_then(|d| serde_json::from_str(&d).ok()).unwrap_or_default();
        if v["enrolled_pods"].as_array().is_some_and(|e| e.iter().any(|p| p == "production/web")) {
            break v;
        }
        assert!(Instant::now() < deadline, "web was never captured:\n{}", log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let state_of = |name: &str| {
        dump["local_pods"].as_array().unwrap().iter().find(|p| p["pod"] == format!("production/{name}")).cloned()
    };
    for name in ["kubepods", "system.slice"] {
        let s = state_of(name).unwrap_or_else(|| panic!("{name} not reported: {dump}"));
        assert_eq!(s["state"], "not_started", "{s}");
        assert!(s["reason"].as_str().unwrap().contains("no cgroup for pod uid"), "{s}");
    }

    // The kernel captures the web pod's cgroup and nothing else.
    let enrolled = MapData::from_pin(scratch.pins.join("ENROLLED_PODS")).unwrap();
    let enrolled: aya::maps::HashMap<_, u64, mesh_common::PodInfo> =
        aya::maps::HashMap::try_from(aya::maps::Map::HashMap(enrolled)).unwrap();
    let ids: Vec<u64> = enrolled.keys().map(Result::unwrap).collect();
    use std::os::unix::fs::MetadataExt as _;
    let ino = |p: &std::path::Path| std::fs::metadata(p).unwrap().ino();
    assert_eq!(ids, vec![ino(&web_cgroup)], "only web's cgroup is captured (kubepods is {})", ino(&kubepods));
    let links: Vec<String> = std::fs::read_dir(scratch.pins.join("links"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with("mesh_sk_lookup"))
        .collect();
    assert_eq!(links.len(), 1, "{links:?}");
    assert!(links[0].contains(web_uid), "{links:?}");
    // Nothing of the agent's per-pod listeners in the node's own namespace.
    let out = Command::new("ss").args(["-ltnH", "sport = :15006"]).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).trim().is_empty(), "the agent listens in the node's namespace");
}

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

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use mesh_agent::config::kube_source::KINDS;
use serde_json::json;
use support::api_server::{ApiServer, collection_path};

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
        // Unpinning the links detaches the programs; then the maps and the cgroup go.
        let _ = std::fs::remove_dir_all(&self.pins);
        let _ = std::fs::remove_dir(&self.cgroup);
    }
}

async fn get(url: &str) -> Option<(u16, String)> {
    let out = tokio::process::Command::new("curl")
        .args(["-s", "-m", "1", "-w", "\n%{http_code}", url])
        .output()
        .await
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n')?;
    Some((code.parse().ok()?, body.to_string()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_waits_for_the_api_then_serves_and_follows_it() {
    if !is_root() {
        assert!(std::env::var_os("MESH_REQUIRE_LAB").is_none(), "cluster-mode test required but not root");
        eprintln!("skipping the_agent_waits_for_the_api_then_serves_and_follows_it: not root");
        return;
    }
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
    let cg_root = mounts
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(2) == Some(&"cgroup2")).then(|| PathBuf::from(f[1]))
        })
        .expect("cgroup v2 mounted");
    let id = std::process::id();
    let dir = tempfile::tempdir().unwrap();
    let mut scratch = Scratch {
        agent: None,
        cgroup: cg_root.join(format!("mesh-cluster-test-{id}")),
        pins: PathBuf::from(format!("/sys/fs/bpf/mesh-cluster-test-{id}")),
        _dir: tempfile::tempdir().unwrap(),
    };
    std::fs::create_dir_all(&scratch.cgroup).unwrap();
    std::fs::create_dir_all(dir.path().join("netns")).unwrap();

    // The mesh CA as a cluster has it: a cacerts Secret.
    let ca_source = dir.path().join("ca-source");
    mesh_agent::identity::MeshCa::load_or_create(&ca_source, "cluster.local").unwrap();
    let data = ["ca-cert.pem", "ca-key.pem"]
        .iter()
        .map(|n| (n.to_string(), ByteString(std::fs::read(ca_source.join(n)).unwrap())))
        .collect();
    let secret = Secret {
        metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
            name: Some("cacerts".into()),
            namespace: Some("istio-system".into()),
            ..Default::default()
        },
        data: Some(data),
        ..Default::default()
    };
    let mut collections: Vec<String> = KINDS.iter().map(|k| collection_path(k.group, k.version, k.plural)).collect();
    collections.push("/api/v1/secrets".into());
    let api = ApiServer::new(&collections).await;
    let mut secret_json = serde_json::to_value(&secret).unwrap();
    secret_json["apiVersion"] = json!("v1");
    secret_json["kind"] = json!("Secret");
    api.apply("/api/v1/secrets", secret_json);
    api.apply(
        "/api/v1/namespaces",
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "production", "labels": {"istio-injection": "enabled"}}}),
    );
    // The API is down when the agent starts.
    api.stop().await;

    let (admin, metrics, ready) = (free_port(), free_port(), free_port());
    let ca_dir = dir.path().join("ca");
    let agent = Command::new(env!("CARGO_BIN_EXE_mesh-agent"))
        .args(["--node", "node1", "--config-source", "kubernetes", "--kube-api-url", &api.url()])
        .args(["--ca-secret", "istio-system/cacerts", "--ca-dir"])
        .arg(&ca_dir)
        .arg("--node-cgroup")
        .arg(&scratch.cgroup)
        .arg("--netns-dir")
        .arg(dir.path().join("netns"))
        .arg("--bpf-pin-dir")
        .arg(&scratch.pins)
        .args(["--admin-addr", &format!("127.0.0.1:{admin}")])
        .args(["--metrics-addr", &format!("127.0.0.1:{metrics}")])
        .args(["--readiness-addr", &format!("127.0.0.1:{ready}")])
        .env("MESH_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("agent.log")).unwrap())
        .spawn()
        .unwrap();
    scratch.agent = Some(agent);
    let log = || std::fs::read_to_string(dir.path().join("agent.log")).unwrap_or_default();

    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = get(&format!("http://127.0.0.1:{ready}/healthz/ready")).await;
    assert!(before.as_ref().is_none_or(|(c, _)| *c != 200), "ready without its API server: {before:?}\n{}", log());
    assert!(log().contains("waiting for the mesh CA Secret"), "{}", log());

    api.start().await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while get(&format!("http://127.0.0.1:{ready}/healthz/ready")).await.is_none_or(|(c, _)| c != 200) {
        assert!(Instant::now() < deadline, "never ready after the API came back:\n{}", log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let key_mode = std::fs::metadata(ca_dir.join("ca-key.pem")).unwrap().permissions().mode() & 0o777;
    assert_eq!(key_mode, 0o600);
    assert!(log().contains("mesh CA read from its Secret"), "{}", log());

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
    let agent_pod = |name: &str, node: &str, port: u16| {
        json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "istio-system", "labels": {"app": "mesh-agent"}},
            "spec": {"nodeName": node, "containers": [{"name": "mesh-agent", "image": "mesh-agent:test",
                "ports": [{"name": "http-metrics", "containerPort": port}]}]},
            "status": {"phase": "Running", "podIP": "127.0.0.1"}})
    };
    api.apply("/api/v1/pods", agent_pod("mesh-agent-abcde", "node1", metrics));
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

    // An agent that does not answer is named, and the command fails.
    api.apply("/api/v1/pods", agent_pod("mesh-agent-fghij", "node2", free_port()));
    let (code, out) = proxy_status().await.unwrap();
    assert_eq!(code, Some(1), "{out}");
    assert!(out.lines().any(|l| l.contains("mesh-agent-fghij") && l.contains("UNREACHABLE")), "{out}");
    assert!(out.lines().any(|l| l.contains("mesh-agent-abcde") && l.contains("SYNCED")), "{out}");
}

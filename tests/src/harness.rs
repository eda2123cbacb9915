//! Shared pieces of the lab integration tests: bringing a lab up for one test (and down
//! on drop, also on panic), waiting for a condition, and reading what the pods and
//! agents saw.
//!
//! The lab's names are fixed, so tests take a process-wide lock. A test skips with a
//! message where the machine cannot run the lab, unless `MESH_REQUIRE_LAB` is set
//! (`cargo xtask test` sets it on capable machines), which turns a skip into a failure.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::lab::{DEFAULT_STATE_DIR, Lab, Options};

static LAB_LOCK: Mutex<()> = Mutex::new(());

/// Owns a running lab for one test and removes it on drop.
pub struct LabGuard {
    lab: Option<Lab>,
    _lock: std::sync::MutexGuard<'static, ()>,
}

impl std::ops::Deref for LabGuard {
    type Target = Lab;
    fn deref(&self) -> &Lab {
        self.lab.as_ref().expect("lab is up")
    }
}

impl std::ops::DerefMut for LabGuard {
    fn deref_mut(&mut self) -> &mut Lab {
        self.lab.as_mut().expect("lab is up")
    }
}

impl Drop for LabGuard {
    fn drop(&mut self) {
        if let Some(lab) = self.lab.take()
            && let Err(e) = lab.down()
        {
            eprintln!("lab teardown: {e:#}");
        }
    }
}

/// The lab's lock and the directory of the binaries it runs, with any lab left over
/// (one or two clusters) removed; None (after saying why) where the lab cannot run.
fn lab_turn(test: &str) -> Option<(std::sync::MutexGuard<'static, ()>, PathBuf)> {
    let lock = LAB_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let profile = std::env::var("MESH_LAB_PROFILE").unwrap_or_else(|_| "debug".into());
    let bins = root().join("target").join(&profile);
    let missing = ["mesh-agent", "mesh-echo", "mesh-apiserver"].iter().find(|b| !bins.join(b).exists());
    let why =
        crate::sys::lab_unsupported().or_else(|| missing.map(|b| format!("{b} not built (run cargo xtask test)")));
    if let Some(why) = why {
        if std::env::var_os("MESH_REQUIRE_LAB").is_some() {
            panic!("{test}: lab required but unavailable: {why}");
        }
        eprintln!("skipping {test}: {why}");
        return None;
    }
    let (one, two) = crate::multicluster::state_dirs(DEFAULT_STATE_DIR.as_ref());
    for dir in [two, one] {
        if Lab::exists(&dir) {
            Lab::load(&dir).unwrap().down().unwrap();
        }
    }
    Some((lock, bins))
}

/// The workspace root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ is inside the workspace").to_path_buf()
}

/// Brings the lab up, or returns None (after saying why) where it cannot run.
pub fn lab(test: &str) -> Option<LabGuard> {
    lab_with_env(test, &[])
}

/// [`lab`], with more environment for the agents (`MESH_*` settings). The lab runs the
/// debug build; `MESH_LAB_PROFILE=release` runs the release build instead (built by
/// `cargo build --release`), for figures such as `tests/connections.rs`'s.
pub fn lab_with_env(test: &str, agent_env: &[(&str, &str)]) -> Option<LabGuard> {
    let (lock, bins) = lab_turn(test)?;
    let opts = Options {
        manifests: root().join("examples/lab"),
        state_dir: DEFAULT_STATE_DIR.into(),
        agent_bin: bins.join("mesh-agent"),
        echo_bin: bins.join("mesh-echo"),
        agent_log: "info,mesh_agent=debug,mesh_ebpf=debug".into(),
        agent_env: agent_env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        placement: Default::default(),
        plugin_ca: None,
    };
    let lab = Lab::up(&opts).unwrap_or_else(|e| panic!("{test}: lab up: {e:#}"));
    Some(LabGuard { lab: Some(lab), _lock: lock })
}

/// Owns a running two-cluster lab for one test and removes it on drop.
pub struct ClustersGuard {
    clusters: Option<crate::multicluster::Clusters>,
    _lock: std::sync::MutexGuard<'static, ()>,
}

impl std::ops::Deref for ClustersGuard {
    type Target = crate::multicluster::Clusters;
    fn deref(&self) -> &Self::Target {
        self.clusters.as_ref().expect("the clusters are up")
    }
}

impl std::ops::DerefMut for ClustersGuard {
    fn deref_mut(&mut self) -> &mut Self::Target {
        self.clusters.as_mut().expect("the clusters are up")
    }
}

impl Drop for ClustersGuard {
    fn drop(&mut self) {
        if let Some(c) = self.clusters.take()
            && let Err(e) = c.down()
        {
            eprintln!("two-cluster lab teardown: {e:#}");
        }
    }
}

/// Brings the two-cluster lab (`examples/multicluster`) up, or returns None (after
/// saying why) where the lab cannot run.
pub fn two_clusters(test: &str) -> Option<ClustersGuard> {
    let (lock, bins) = lab_turn(test)?;
    let (one, two) = crate::multicluster::state_dirs(DEFAULT_STATE_DIR.as_ref());
    let dir = root().join("examples/multicluster");
    let opts = |manifests: PathBuf, state_dir: PathBuf| Options {
        manifests,
        state_dir,
        agent_bin: bins.join("mesh-agent"),
        echo_bin: bins.join("mesh-echo"),
        agent_log: "info,mesh_agent=debug".into(),
        agent_env: [("MESH_REMOTE_CLUSTERS_REFRESH".to_string(), "1s".to_string())].into_iter().collect(),
        placement: Default::default(),
        plugin_ca: None,
    };
    let clusters = crate::multicluster::Clusters::up(opts(dir.join("cluster1"), one), opts(dir.join("cluster2"), two))
        .unwrap_or_else(|e| panic!("{test}: two clusters up: {e:#}"));
    Some(ClustersGuard { clusters: Some(clusters), _lock: lock })
}

/// Applies `examples/seed/<name>`, the reference configs as written.
pub fn apply_seed(lab: &Lab, name: &str) {
    lab.apply(&root().join("examples/seed").join(name)).unwrap();
}

/// Writes `yaml` to the lab's scratch directory as `name` and applies it.
pub fn apply_yaml(lab: &Lab, name: &str, yaml: &str) {
    let dir = lab.state_dir.join("scratch");
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join(name);
    std::fs::write(&f, yaml).unwrap();
    lab.apply(&f).unwrap();
}

/// An AuthorizationPolicy refusing `/admin` on legacy-service: the lab tests' denial.
pub const DENY_ADMIN: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-admin, namespace: production}
spec:
  selector: {matchLabels: {app: legacy-service}}
  action: DENY
  rules: [{to: [{operation: {paths: [/admin]}}]}]
"#;

/// Retries `f` until it returns Some or the patience (MESH_TEST_PATIENCE_MS, default
/// 10 s) runs out.
pub fn eventually<T>(what: &str, f: impl FnMut() -> Option<T>) -> T {
    let patience = std::env::var("MESH_TEST_PATIENCE_MS").ok().and_then(|v| v.parse().ok()).unwrap_or(10_000);
    eventually_within(what, Duration::from_millis(patience), f)
}

/// [`eventually`] for what is known to take longer than the usual patience (a timeout
/// or a back-off on the way).
pub fn eventually_within<T>(what: &str, patience: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + patience;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// curl from `pod`; returns (exit ok, stdout).
pub fn curl(lab: &Lab, pod: &str, url: &str) -> (bool, String) {
    let out = lab.exec(pod, &["curl", "-s", "-m", "5", url]).unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The echo pod that answered a GET of `url` from `pod`, and the peer address it saw;
/// None when the request failed.
pub fn answered_by(lab: &Lab, pod: &str, url: &str) -> Option<(String, String)> {
    let (ok, body) = curl(lab, pod, url);
    let v: serde_json::Value = serde_json::from_str(&body).ok().filter(|_| ok)?;
    Some((v["pod"].as_str()?.to_string(), v["peer"].as_str()?.to_string()))
}

/// The `pod` field of an echo app's answer.
pub fn reply_pod(body: &str) -> Option<String> {
    serde_json::from_str::<serde_json::Value>(body).ok()?["pod"].as_str().map(str::to_owned)
}

/// Connections `lab`'s `node` counted as the server side (reporter destination) for
/// workload `dst` from clients that authenticated as `principal`.
pub fn inbound_from(lab: &Lab, node: &str, dst: &str, principal: &str) -> u64 {
    metrics(lab, node)
        .lines()
        .filter(|l| l.starts_with("istio_tcp_connections_opened_total{"))
        .filter(|l| l.contains(r#"reporter="destination""#))
        .filter(|l| l.contains(&format!(r#"destination_workload="{dst}""#)))
        .filter(|l| l.contains(&format!(r#"source_principal="{principal}""#)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}

/// `node`'s agent metrics, read as a scraper does: on the metrics port, with the lab's
/// scraper token.
pub fn metrics(lab: &Lab, node: &str) -> String {
    let n = lab.node(node).unwrap();
    let auth = format!("Authorization: Bearer {}", lab.metrics_token().unwrap());
    let out = crate::sys::output(&[
        "ip",
        "netns",
        "exec",
        &n.netns,
        "curl",
        "-sf",
        "-H",
        &auth,
        "http://127.0.0.1:15020/metrics",
    ])
    .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn opened(metrics: &str, direction: &str, src: &str, dst: &str) -> u64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("istio_tcp_connections_opened_total"))
        .filter(|l| {
            l.contains(&format!("direction=\"{direction}\""))
                && l.contains(&format!("source_workload=\"{src}\""))
                && l.contains(&format!("destination_workload=\"{dst}\""))
                && l.contains("connection_security_policy=\"mutual_tls\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// A certificate for `name` from a fresh CA: (CA PEM, certificate PEM, key PEM).
pub fn cert_from_fresh_ca(name: &str) -> (String, String, String) {
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    // Distinct names: openssl takes a leaf named as its issuer for self-signed.
    ca.distinguished_name.push(rcgen::DnType::CommonName, "test CA");
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let ca_pem = ca.self_signed(&ca_key).unwrap().pem();
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec![name.to_string()]).unwrap();
    params.distinguished_name.push(rcgen::DnType::CommonName, name);
    let cert = params.signed_by(&key, &issuer).unwrap();
    (ca_pem, cert.pem(), key.serialize_pem())
}

/// [`cert_from_fresh_ca`], written to the lab's scratch directory as
/// `<prefix>-ca.pem`, `<prefix>-cert.pem` and `<prefix>-key.pem`; returns the three paths.
pub fn write_cert_from_fresh_ca(lab: &Lab, prefix: &str, name: &str) -> (String, String, String) {
    let dir = lab.state_dir.join("scratch");
    std::fs::create_dir_all(&dir).unwrap();
    let (ca, cert, key) = cert_from_fresh_ca(name);
    let mut paths = Vec::new();
    for (suffix, pem) in [("ca", ca), ("cert", cert), ("key", key)] {
        let p = dir.join(format!("{prefix}-{suffix}.pem"));
        std::fs::write(&p, pem).unwrap();
        paths.push(p.display().to_string());
    }
    (paths[0].clone(), paths[1].clone(), paths[2].clone())
}

/// Starts `mesh-echo steady ARGS` in `pod` ([`crate::steady`]); read its report with
/// [`steady_report`].
pub fn start_steady(lab: &Lab, pod: &str, args: &[&str]) -> std::process::Child {
    let echo = root().join("target/debug/mesh-echo").display().to_string();
    let argv: Vec<String> = [echo.as_str(), "steady"].iter().chain(args).map(|s| s.to_string()).collect();
    lab.pod_command(pod, &argv)
        .unwrap()
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits for a [`start_steady`] client and reads what it reported; `who` names it in a
/// panic.
pub fn steady_report(child: std::process::Child, who: &str) -> crate::steady::Report {
    let out = child.wait_with_output().unwrap();
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{who}: not a report ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

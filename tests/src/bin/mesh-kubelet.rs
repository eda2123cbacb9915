//! `mesh-kubelet`: the lab's kubelet stand-in, one per node, run in the node's network
//! namespace and in the node's kubelet cgroup (the agent recognises its probes by that
//! cgroup). It runs the `readinessProbe` and `livenessProbe` of each container of the
//! node's pods as written in their specs (`httpGet`, `tcpSocket` and `grpc`, on a port
//! number or a named port; `initialDelaySeconds`, `periodSeconds`, `timeoutSeconds`,
//! `successThreshold`, `failureThreshold` with Kubernetes' defaults), and publishes
//! readiness as the kubelet does: the pod's `Ready` condition, written into the pod's
//! manifest in the lab's config directory (the lab's API). A liveness failure is
//! reported as the kubelet reports it (an `Unhealthy` warning, then `Killing`).
//!
//! Pods without probes are left alone: they count as ready, as hand-written manifests do.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser;
use serde::Deserialize as _;
use serde_yaml::Value;

#[derive(Parser)]
#[command(about = "The lab's kubelet stand-in: runs the node's pods' probes and publishes readiness")]
struct Cli {
    /// The node whose pods it probes (`spec.nodeName`).
    #[arg(long)]
    node: String,
    /// The lab's config directory (where the pods' manifests are).
    #[arg(long)]
    config_dir: PathBuf,
}

/// One probe of one container, as the spec says.
#[derive(Debug, Clone, PartialEq)]
struct Probe {
    action: Action,
    initial_delay: Duration,
    period: Duration,
    timeout: Duration,
    success_threshold: u32,
    failure_threshold: u32,
}

#[derive(Debug, Clone, PartialEq)]
enum Action {
    Http {
        port: u16,
        path: String,
    },
    Tcp {
        port: u16,
    },
    /// `grpc.health.v1.Health/Check` for `service`.
    Grpc {
        port: u16,
        service: String,
    },
}

/// Where a probe stands.
struct Tracker {
    probe: Probe,
    first_seen: Instant,
    last_run: Option<Instant>,
    successes: u32,
    failures: u32,
    /// The probe's verdict (readiness: starts false; liveness: starts true).
    passing: bool,
}

impl Tracker {
    fn new(probe: Probe, passing: bool) -> Self {
        Tracker { probe, first_seen: Instant::now(), last_run: None, successes: 0, failures: 0, passing }
    }

    fn due(&self, now: Instant) -> bool {
        now >= self.first_seen + self.probe.initial_delay && self.last_run.is_none_or(|t| now >= t + self.probe.period)
    }

    /// Records one result; returns the verdict if it changed.
    fn record(&mut self, ok: bool, now: Instant) -> Option<bool> {
        self.last_run = Some(now);
        if ok {
            self.successes += 1;
            self.failures = 0;
        } else {
            self.failures += 1;
            self.successes = 0;
        }
        let verdict = if !self.passing && self.successes >= self.probe.success_threshold {
            true
        } else if self.passing && self.failures >= self.probe.failure_threshold {
            false
        } else {
            return None;
        };
        self.passing = verdict;
        Some(verdict)
    }
}

/// The probes of one pod.
#[derive(Default)]
struct PodProbes {
    readiness: Vec<Tracker>,
    liveness: Vec<Tracker>,
    restarts: u32,
    /// The `Ready` condition last written.
    published: Option<bool>,
}

fn seconds(v: &Value, key: &str, default: u64) -> Duration {
    Duration::from_secs(v.get(key).and_then(Value::as_u64).unwrap_or(default))
}

/// The probe at `container[kind]`, with Kubernetes' defaults; named ports resolve
/// through the container's `ports`.
fn probe(container: &Value, kind: &str) -> Option<Probe> {
    let p = container.get(kind)?;
    let port_of = |v: &Value| -> Option<u16> {
        match v {
            Value::Number(n) => u16::try_from(n.as_u64()?).ok(),
            Value::String(name) => container
                .get("ports")?
                .as_sequence()?
                .iter()
                .find(|cp| cp.get("name").and_then(Value::as_str) == Some(name.as_str()))?
                .get("containerPort")?
                .as_u64()
                .and_then(|n| u16::try_from(n).ok()),
            _ => None,
        }
    };
    let action = if let Some(h) = p.get("httpGet") {
        let path = h.get("path").and_then(Value::as_str).unwrap_or("/").to_string();
        Action::Http { port: port_of(h.get("port")?)?, path }
    } else if let Some(t) = p.get("tcpSocket") {
        Action::Tcp { port: port_of(t.get("port")?)? }
    } else if let Some(g) = p.get("grpc") {
        // A gRPC probe's port is a number only, as in the API.
        let port = g.get("port")?.as_u64().and_then(|n| u16::try_from(n).ok())?;
        Action::Grpc { port, service: g.get("service").and_then(Value::as_str).unwrap_or("").to_string() }
    } else {
        eprintln!("mesh-kubelet: a {kind} without httpGet, tcpSocket or grpc is not run");
        return None;
    };
    let threshold = |key: &str, default: u64| p.get(key).and_then(Value::as_u64).unwrap_or(default) as u32;
    Some(Probe {
        action,
        initial_delay: seconds(p, "initialDelaySeconds", 0),
        period: seconds(p, "periodSeconds", 10),
        timeout: seconds(p, "timeoutSeconds", 1),
        success_threshold: threshold("successThreshold", 1),
        failure_threshold: threshold("failureThreshold", 3),
    })
}

/// Runs `probe` against `ip`; Err says why it failed, as the kubelet words it.
fn run(probe: &Probe, ip: std::net::IpAddr) -> Result<(), String> {
    match &probe.action {
        Action::Grpc { port, service } => {
            let addr = SocketAddr::new(ip, *port);
            let runtime =
                tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
            match runtime.block_on(async { tokio::time::timeout(probe.timeout, grpc_health(addr, service)).await }) {
                Ok(Ok(1)) => Ok(()),
                Ok(Ok(status)) => Err(format!("service unhealthy (responded with {:?})", serving_status(status))),
                Ok(Err(e)) => Err(format!("failed to connect service {addr:?}: {e}")),
                Err(_) => Err(format!("timeout: health rpc did not complete within {:?}", probe.timeout)),
            }
        }
        Action::Tcp { port } => TcpStream::connect_timeout(&SocketAddr::new(ip, *port), probe.timeout)
            .map(drop)
            .map_err(|e| format!("dial tcp {ip}:{port}: {e}")),
        Action::Http { port, path } => {
            let addr = SocketAddr::new(ip, *port);
            let mut s = TcpStream::connect_timeout(&addr, probe.timeout)
                .map_err(|e| format!("Get \"http://{addr}{path}\": dial tcp {addr}: {e}"))?;
            let _ = s.set_read_timeout(Some(probe.timeout));
            let request = format!(
                "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: kube-probe/1.32\r\nConnection: close\r\n\r\n"
            );
            s.write_all(request.as_bytes()).map_err(|e| format!("Get \"http://{addr}{path}\": {e}"))?;
            let mut head = [0u8; 64];
            let n = s.read(&mut head).map_err(|e| format!("Get \"http://{addr}{path}\": {e}"))?;
            let line = String::from_utf8_lossy(&head[..n]);
            let code: u16 = line.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
            if (200..400).contains(&code) { Ok(()) } else { Err(format!("HTTP probe failed with statuscode: {code}")) }
        }
    }
}

fn serving_status(status: u8) -> &'static str {
    match status {
        1 => "SERVING",
        2 => "NOT_SERVING",
        3 => "SERVICE_UNKNOWN",
        _ => "UNKNOWN",
    }
}

/// `grpc.health.v1.Health/Check` over h2c: the `status` of the HealthCheckResponse.
async fn grpc_health(addr: SocketAddr, service: &str) -> anyhow::Result<u8> {
    // HealthCheckRequest { service } (field 1, a string).
    let mut request = Vec::new();
    if !service.is_empty() {
        request.push(0x0a);
        request.push(u8::try_from(service.len()).context("service name too long")?);
        request.extend_from_slice(service.as_bytes());
    }
    let reply = mesh_tests::grpc::unary(&addr.to_string(), "/grpc.health.v1.Health/Check", &request, &[]).await?;
    anyhow::ensure!(reply.grpc_status.as_deref() == Some("0"), "rpc error: grpc-status {:?}", reply.grpc_status);
    // HealthCheckResponse { status } (field 1, a varint).
    match reply.message.as_slice() {
        [0x08, status, ..] => Ok(*status),
        _ => Ok(0),
    }
}

/// A node's probed pod: (file, document index, namespace/name, address, containers).
type ProbedPod = (PathBuf, usize, String, std::net::IpAddr, Vec<Value>);

/// What one file held for this node, as of its [`FileStamp`].
type FileCache = BTreeMap<PathBuf, (FileStamp, Vec<ProbedPod>)>;

/// Size, modification time and inode: a file replaced by a rename (as `lab apply` and
/// this kubelet write them) is a new inode.
type FileStamp = (u64, Option<std::time::SystemTime>, u64);

/// The node's pods with probes, in the config directory. A file is parsed again only
/// when its [`FileStamp`] changed: the scale bench puts 10 MB of
/// generated objects in the directory, and parsing them five times a second took more
/// CPU than the agents whose apply time it measures.
fn node_pods(dir: &Path, node: &str, cache: &mut FileCache) -> Vec<ProbedPod> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else { return out };
    let mut seen = Vec::new();
    for e in entries.flatten() {
        let path = e.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.starts_with('.') || !(name.ends_with(".yaml") || name.ends_with(".yml")) {
            continue;
        }
        let Ok(meta) = e.metadata() else { continue };
        let stamp = (meta.len(), meta.modified().ok(), std::os::unix::fs::MetadataExt::ino(&meta));
        seen.push(path.clone());
        if let Some((cached, pods)) = cache.get(&path)
            && *cached == stamp
        {
            out.extend(pods.iter().cloned());
            continue;
        }
        let pods = file_pods(&path, node);
        out.extend(pods.iter().cloned());
        cache.insert(path, (stamp, pods));
    }
    cache.retain(|p, _| seen.contains(p));
    out
}

/// The node's pods with probes in one file.
fn file_pods(path: &Path, node: &str) -> Vec<ProbedPod> {
    let mut out = Vec::new();
    let Ok(text) = std::fs::read_to_string(path) else { return out };
    for (i, doc) in serde_yaml::Deserializer::from_str(&text).enumerate() {
        let Ok(v) = Value::deserialize(doc) else { continue };
        if v.get("kind").and_then(Value::as_str) != Some("Pod")
            || v.get("spec").and_then(|s| s.get("nodeName")).and_then(Value::as_str) != Some(node)
        {
            continue;
        }
        let containers = v["spec"]["containers"].as_sequence().cloned().unwrap_or_default();
        if !containers.iter().any(|c| c.get("readinessProbe").is_some() || c.get("livenessProbe").is_some()) {
            continue;
        }
        let meta = &v["metadata"];
        let key = format!(
            "{}/{}",
            meta.get("namespace").and_then(Value::as_str).unwrap_or("default"),
            meta.get("name").and_then(Value::as_str).unwrap_or("")
        );
        let Some(ip) = v["status"].get("podIP").and_then(Value::as_str).and_then(|s| s.parse().ok()) else {
            continue;
        };
        out.push((path.to_owned(), i, key, ip, containers));
    }
    out
}

/// Sets the `Ready` condition of document `index` of `file` (as the kubelet patches
/// the pod's status), atomically. A file that changed or went away meanwhile is left
/// as it is (false: not written).
fn publish_ready(file: &Path, index: usize, ready: bool) -> anyhow::Result<bool> {
    let text = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let mut docs: Vec<Value> =
        serde_yaml::Deserializer::from_str(&text).map(Value::deserialize).collect::<Result<_, _>>()?;
    let doc = docs.get_mut(index).context("the pod's document is gone")?;
    let status = if ready { "True" } else { "False" };
    let mut condition = serde_yaml::Mapping::new();
    condition.insert("type".into(), "Ready".into());
    condition.insert("status".into(), status.into());
    let pod_status = doc.get_mut("status").and_then(Value::as_mapping_mut).context("the pod has no status")?;
    pod_status.insert("conditions".into(), Value::Sequence(vec![Value::Mapping(condition)]));
    let mut out = String::new();
    for d in &docs {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(d)?);
    }
    let tmp =
        file.with_file_name(format!(".{}.kubelet.tmp", file.file_name().and_then(|n| n.to_str()).unwrap_or("pod")));
    std::fs::write(&tmp, out)?;
    // A pod deleted (its file removed or rewritten) while we probed stays deleted.
    if std::fs::read_to_string(file).ok().as_deref() != Some(text.as_str()) {
        let _ = std::fs::remove_file(&tmp);
        return Ok(false);
    }
    std::fs::rename(&tmp, file)?;
    Ok(true)
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let mut pods: BTreeMap<String, PodProbes> = BTreeMap::new();
    let mut files = FileCache::new();
    println!("mesh-kubelet: probing the pods of {} from {}", cli.node, cli.config_dir.display());
    loop {
        let now = Instant::now();
        let present = node_pods(&cli.config_dir, &cli.node, &mut files);
        pods.retain(|k, _| present.iter().any(|p| &p.2 == k));
        for (file, index, key, ip, containers) in present {
            let entry = pods.entry(key.clone()).or_insert_with(|| {
                let mut p = PodProbes::default();
                for c in &containers {
                    p.readiness.extend(probe(c, "readinessProbe").map(|pr| Tracker::new(pr, false)));
                    p.liveness.extend(probe(c, "livenessProbe").map(|pr| Tracker::new(pr, true)));
                }
                p
            });
            for t in entry.readiness.iter_mut().filter(|t| t.due(now)) {
                let result = run(&t.probe, ip);
                if let Err(why) = &result {
                    println!("Warning  Unhealthy  pod/{key}  Readiness probe failed: {why}");
                }
                t.record(result.is_ok(), now);
            }
            for t in entry.liveness.iter_mut().filter(|t| t.due(now)) {
                let result = run(&t.probe, ip);
                if let Err(why) = &result {
                    println!("Warning  Unhealthy  pod/{key}  Liveness probe failed: {why}");
                }
                if t.record(result.is_ok(), now) == Some(false) {
                    entry.restarts += 1;
                    println!(
                        "Normal   Killing    pod/{key}  Container failed liveness probe, will be restarted (restarts: {})",
                        entry.restarts
                    );
                    // The lab's app is not restarted by its kubelet: the probe starts over.
                    t.passing = true;
                    t.failures = 0;
                }
            }
            // Published once every readiness probe has a verdict, then on each change.
            let decided = entry.readiness.iter().all(|t| t.last_run.is_some());
            let ready = entry.readiness.iter().all(|t| t.passing);
            if decided && entry.published != Some(ready) {
                match publish_ready(&file, index, ready) {
                    Ok(false) => {}
                    Ok(true) => {
                        entry.published = Some(ready);
                        println!("mesh-kubelet: pod/{key} Ready={ready}");
                    }
                    Err(e) => eprintln!("mesh-kubelet: pod/{key}: cannot publish readiness: {e:#}"),
                }
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

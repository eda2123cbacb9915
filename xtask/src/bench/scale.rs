//! `cargo xtask bench --scale`: the control plane of the lab's node agents at 100, 1,000
//! and 10,000 Services with 10 endpoints each (generated Services without a selector
//! and their EndpointSlices, in the agents' config directory).
//!
//! Per size: how long after the file lands each agent has compiled the snapshot and
//! brought its pods and kernel tables in line (the agent's own `last_apply` stamp in
//! `/sync_status`, against the clock read just before the file was renamed into
//! place); then one object changed, 20 times, in a file of its own; each agent's
//! resident memory; and how long `/sync_status` and `/config_dump` take to answer.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};
use mesh_tests::lab::Lab;
use mesh_tests::measure::{self, ResidentMemory};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::BenchArgs;
use crate::root;

/// Service counts measured (`--quick`: the first two).
const SIZES: [usize; 3] = [100, 1_000, 10_000];
/// Endpoints of each generated Service.
const ENDPOINTS_PER_SERVICE: usize = 10;
/// Single-object changes timed per size.
const CHANGES: usize = 20;
/// The generated objects' file in the agents' config directory.
const SCALE_FILE: &str = "bench-scale.yaml";
/// The file whose one object changes.
const CHANGE_FILE: &str = "bench-scale-change.yaml";
/// How long an agent may take to apply a change before the run gives up.
const APPLY_TIMEOUT: Duration = Duration::from_secs(120);

/// One size's figures; per-agent figures are the slowest (largest) agent's.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScalePoint {
    /// Services generated.
    pub services: usize,
    /// Endpoints generated.
    pub endpoints: usize,
    /// Size of the generated file, bytes.
    pub file_bytes: u64,
    /// From the file landing to the agents' snapshot applied and pods reconciled, ms.
    pub full_apply_ms: f64,
    /// The agents' own time for that apply (read, compile, swap, reconcile), ms.
    pub full_apply_agent_ms: f64,
    /// Of the agents' own time, the compile, swap and kernel tables and pods brought in
    /// line (reading and parsing the files left out), ms: the slowest agent's.
    #[serde(default)]
    pub full_compile_sync_ms: f64,
    /// One object changed: median and worst of [`CHANGES`] changes, ms.
    pub change_apply_p50_ms: f64,
    /// See `change_apply_p50_ms`; with 20 samples the worst stands for p99.
    pub change_apply_p99_ms: f64,
    /// The agents' own time for one change (read to reconciled), worst of the changes,
    /// ms: the rest of `change_apply_p99_ms` is the watch's wait for the burst's end and
    /// waiting for CPU.
    #[serde(default)]
    pub change_agent_p99_ms: f64,
    /// The largest agent's memory once applied.
    pub agent_memory: ResidentMemory,
    /// `/sync_status` (what `meshctl proxy-status` reads) answered in, ms.
    pub sync_status_ms: f64,
    /// `/config_dump` answered in, ms.
    pub config_dump_ms: f64,
    /// `/config_dump` size, bytes.
    pub config_dump_bytes: u64,
}

/// The run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScaleReport {
    /// When (UTC).
    pub date: String,
    /// Each size measured.
    pub points: Vec<ScalePoint>,
}

/// Measures every size in the lab; writes the JSON next to the bench report and, on a
/// full run, `docs/benchmarks-scale.md`.
pub fn run(lab: &Lab, args: &BenchArgs) -> anyhow::Result<ScaleReport> {
    let sizes: &[usize] = if args.quick { &SIZES[..2] } else { &SIZES };
    let dir = lab.state_dir.join("bench");
    std::fs::create_dir_all(&dir)?;
    let mut points = Vec::new();
    for &services in sizes {
        println!("[bench] scale: {services} Services x {ENDPOINTS_PER_SERVICE} endpoints");
        let file = dir.join(SCALE_FILE);
        std::fs::write(&file, generate(services))?;
        let file_bytes = std::fs::metadata(&file)?.len();
        let full = timed_apply(lab, &file)?;
        let mut changes = Vec::new();
        let mut change_agent_p99_ms = 0f64;
        for n in 0..CHANGES {
            let change = dir.join(CHANGE_FILE);
            std::fs::write(&change, changed_service(n))?;
            let applied = timed_apply(lab, &change)?;
            changes.push(applied.landed_ms);
            change_agent_p99_ms = change_agent_p99_ms.max(applied.agent_ms);
        }
        changes.sort_by(f64::total_cmp);
        let agent_memory = lab
            .nodes
            .iter()
            .map(|n| measure::cgroup_memory(&lab.cgroup_root.join(&n.agent_cgroup)))
            .collect::<anyhow::Result<Vec<_>>>()?
            .into_iter()
            .max_by_key(|m| m.vm_rss_kib)
            .unwrap_or_default();
        let mut sync_status_ms = 0f64;
        let mut config_dump = (0f64, 0u64);
        for n in &lab.nodes {
            sync_status_ms = sync_status_ms.max(timed_get(lab, &n.name, "http://127.0.0.1:15020/sync_status", true)?.0);
            let dump = timed_get(lab, &n.name, "http://127.0.0.1:15000/config_dump", false)?;
            config_dump = (config_dump.0.max(dump.0), config_dump.1.max(dump.1));
        }
        let point = ScalePoint {
            services,
            endpoints: services * ENDPOINTS_PER_SERVICE,
            file_bytes,
            full_apply_ms: full.landed_ms,
            full_apply_agent_ms: full.agent_ms,
            full_compile_sync_ms: full.compile_sync_ms,
            change_agent_p99_ms,
            change_apply_p50_ms: changes[changes.len() / 2],
            change_apply_p99_ms: *changes.last().unwrap_or(&0.0),
            agent_memory,
            sync_status_ms,
            config_dump_ms: config_dump.0,
            config_dump_bytes: config_dump.1,
        };
        println!("[bench] scale: {point:?}");
        points.push(point);
        // Versions read before the files go: an agent quick to apply the removal would
        // otherwise already be past the version the wait starts from.
        let (before, start) = (versions(lab)?, now_ms());
        lab.delete(Path::new(SCALE_FILE))?;
        lab.delete(Path::new(CHANGE_FILE))?;
        wait_applied(lab, &before, start)?;
    }
    let date = mesh_tests::sys::run(&["date", "-u", "+%Y-%m-%dT%H:%M:%SZ"]).unwrap_or_default().trim().to_string();
    let report = ScaleReport { date, points };
    let json = report_path(&args.report);
    if let Some(parent) = json.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&json, serde_json::to_string_pretty(&report)?)?;
    println!("{}", report.table());
    println!("[bench] scale report: {}", json.display());
    if !args.quick {
        let md = root().join("docs/benchmarks-scale.md");
        std::fs::write(&md, report.markdown())?;
        println!("[bench] {} regenerated", md.display());
    }
    Ok(report)
}

/// `scale.json` beside the bench's report.
fn report_path(report: &Path) -> PathBuf {
    root().join(report).with_file_name("scale.json")
}

/// `services` Services without a selector, each with an EndpointSlice of
/// [`ENDPOINTS_PER_SERVICE`] ready addresses outside the mesh.
fn generate(services: usize) -> String {
    let mut out = String::with_capacity(services * 700);
    for i in 0..services {
        let vip = [10, 100 + (i >> 16) as u8, (i >> 8) as u8, i as u8];
        let _ = write!(
            out,
            "apiVersion: v1\nkind: Service\nmetadata: {{name: svc-{i}, namespace: scale}}\n\
             spec: {{clusterIP: {}.{}.{}.{}, ports: [{{name: http, port: 80, targetPort: 8080}}]}}\n---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata: {{name: svc-{i}-a, namespace: scale, labels: {{kubernetes.io/service-name: svc-{i}}}}}\n\
             addressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints:\n",
            vip[0], vip[1], vip[2], vip[3]
        );
        for e in 0..ENDPOINTS_PER_SERVICE {
            let n = i * ENDPOINTS_PER_SERVICE + e;
            let _ = writeln!(
                out,
                "- {{addresses: [{}.{}.{}.{}], conditions: {{ready: true}}}}",
                172,
                16 + (n >> 16) as u8,
                (n >> 8) as u8,
                n as u8
            );
        }
        out.push_str("---\n");
    }
    out
}

/// One Service whose port differs from one change to the next.
fn changed_service(n: usize) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: changing, namespace: scale}}\n\
         spec: {{clusterIP: 10.99.255.1, ports: [{{name: http, port: {}, targetPort: 8080}}]}}\n",
        8000 + n
    )
}

fn now_ms() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64() * 1000.0)
}

/// Each agent's `/sync_status`.
fn sync_status(lab: &Lab, node: &str) -> anyhow::Result<Value> {
    let (_, _, body) = get(lab, node, "http://127.0.0.1:15020/sync_status", true)?;
    serde_json::from_slice(&body).context("/sync_status is not JSON")
}

/// Each agent's config version, by node.
fn versions(lab: &Lab) -> anyhow::Result<Vec<(String, u64)>> {
    lab.nodes
        .iter()
        .map(|n| Ok((n.name.clone(), sync_status(lab, &n.name)?["version"].as_u64().unwrap_or(0))))
        .collect()
}

/// How long an apply took, the slowest agent's figure for each, ms.
#[derive(Debug, Default, Clone, Copy)]
struct Applied {
    /// From just before the file landed to the agent's stamp.
    landed_ms: f64,
    /// The agent's own time, read to reconciled.
    agent_ms: f64,
    /// The agent's own time without the read.
    compile_sync_ms: f64,
}

/// Applies `file` and waits until every agent applied a newer version.
fn timed_apply(lab: &Lab, file: &Path) -> anyhow::Result<Applied> {
    let before = versions(lab)?;
    let start = now_ms();
    lab.apply(file)?;
    wait_applied(lab, &before, start)
}

fn wait_applied(lab: &Lab, before: &[(String, u64)], start: f64) -> anyhow::Result<Applied> {
    let deadline = Instant::now() + APPLY_TIMEOUT;
    let mut worst = Applied::default();
    for (node, was) in before {
        let mut was = *was;
        loop {
            let status = sync_status(lab, node)?;
            let applied = &status["last_apply"];
            let version = applied["version"].as_u64().unwrap_or(0);
            let at = applied["at_unix_ms"].as_f64().unwrap_or(0.0);
            // Applied before the file landed: something else changed (a kubelet
            // stand-in's status); the change is still to come.
            if version > was && at < start {
                was = version;
            }
            if version > was {
                let took = applied["took_ms"].as_f64().unwrap_or(0.0);
                let read = applied["read_ms"].as_f64().unwrap_or(0.0);
                worst = Applied {
                    landed_ms: worst.landed_ms.max(at - start),
                    agent_ms: worst.agent_ms.max(took),
                    compile_sync_ms: worst.compile_sync_ms.max(took - read),
                };
                break;
            }
            if Instant::now() > deadline {
                bail!("agent on {node} did not apply the change within {}s", APPLY_TIMEOUT.as_secs());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    Ok(worst)
}

/// GET `url` in `node`'s netns (with the scraper's token when `metrics_port`): the
/// answer's time (curl's own, ms), size and body.
fn get(lab: &Lab, node: &str, url: &str, metrics_port: bool) -> anyhow::Result<(f64, u64, Vec<u8>)> {
    let n = lab.node(node)?;
    let auth = format!("Authorization: Bearer {}", lab.metrics_token()?);
    let dir = lab.state_dir.join("bench");
    let body_file = dir.join(format!("scale-get-{node}"));
    let body_path = body_file.display().to_string();
    let mut argv =
        vec!["ip", "netns", "exec", &n.netns, "curl", "-sf", "-o", &body_path, "-w", "%{time_total} %{size_download}"];
    if metrics_port {
        argv.extend(["-H", &auth]);
    }
    argv.push(url);
    let out = mesh_tests::sys::output(&argv)?;
    if !out.status.success() {
        bail!("GET {url} on {node} failed");
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut it = text.split_whitespace();
    let secs: f64 = it.next().and_then(|s| s.parse().ok()).unwrap_or(0.0);
    let size: u64 = it.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = std::fs::read(&body_file).unwrap_or_default();
    let _ = std::fs::remove_file(&body_file);
    Ok((secs * 1000.0, size, body))
}

fn timed_get(lab: &Lab, node: &str, url: &str, metrics_port: bool) -> anyhow::Result<(f64, u64)> {
    get(lab, node, url, metrics_port).map(|(ms, size, _)| (ms, size))
}

/// Scale targets (issue 17).
const FULL_APPLY_MS: f64 = 1000.0;
const CHANGE_APPLY_MS: f64 = 50.0;
const AGENT_RSS_MIB: f64 = 150.0;

impl ScaleReport {
    /// The curve, one row per size.
    pub fn table(&self) -> String {
        let mut t = String::from(
            "| Services | endpoints | file MiB | full apply ms (agent's own) | full compile + kernel sync ms | one change p50 / p99 ms (agent's own p99) | agent VmRSS / RssAnon MiB | /sync_status ms | /config_dump ms (MiB) |\n\
             |---|---|---|---|---|---|---|---|---|\n",
        );
        for p in &self.points {
            let _ = writeln!(
                t,
                "| {} | {} | {:.1} | {:.0} ({:.0}) | {:.0} | {:.1} / {:.1} ({:.1}) | {:.1} / {:.1} | {:.1} | {:.0} ({:.1}) |",
                p.services,
                p.endpoints,
                p.file_bytes as f64 / 1048576.0,
                p.full_apply_ms,
                p.full_apply_agent_ms,
                p.full_compile_sync_ms,
                p.change_apply_p50_ms,
                p.change_apply_p99_ms,
                p.change_agent_p99_ms,
                p.agent_memory.vm_rss_kib as f64 / 1024.0,
                p.agent_memory.rss_anon_kib as f64 / 1024.0,
                p.sync_status_ms,
                p.config_dump_ms,
                p.config_dump_bytes as f64 / 1048576.0,
            );
        }
        t
    }

    /// `docs/benchmarks-scale.md`: the curve and the targets at the largest size.
    pub fn markdown(&self) -> String {
        let mut md = format!(
            "# Control plane at scale\n\nGenerated by `cargo xtask bench --scale` on {} (do not edit by hand). The lab's two node\n\
             agents read generated Services (no selector, port 80) with one EndpointSlice of {ENDPOINTS_PER_SERVICE} ready\n\
             addresses each from their config directory (the file source, as `--config-dir`). \"Full apply\" runs from the\n\
             file's rename into the directory to the agent's own stamp after the new snapshot is swapped in and its pods\n\
             and kernel tables are reconciled (the slower of the two agents); in brackets, the agent's own time from\n\
             reading to reconciled. \"Full compile + kernel sync\" is that time without reading the files (9.1 MiB of YAML\n\
             at 10,000 Services, parsed by each agent and the gateway at once on the lab's two cores; in a cluster the\n\
             objects arrive parsed, one watch event at a time): the compile, the swap and the kernel tables and pods\n\
             brought in line, what the target names. \"One change\" is a single Service in a file of its own, changed\n\
             {CHANGES} times, written aside and renamed into place, from the write to the slower agent's stamp (after a\n\
             rename the watch waits 3 ms for the rest of the burst; after a write that may go on, 25 ms); in brackets the\n\
             agents' own time, read to reconciled. Memory\n\
             is the larger agent's, after the changes. `/sync_status` is what `meshctl proxy-status` reads through the API\n\
             server (no API server here: its own time is reported); `/config_dump` is on the admin address.\n\n",
            self.date
        );
        md.push_str(&self.table());
        if let Some(p) = self.points.iter().max_by_key(|p| p.services) {
            let verdict = |ok: bool| if ok { "met" } else { "not met" };
            let rss = p.agent_memory.vm_rss_kib as f64 / 1024.0;
            let _ = write!(
                md,
                "\n## Targets at {} Services\n\n| target | figure | met |\n|---|---|---|\n\
                 | full compile and kernel sync ≤ {FULL_APPLY_MS:.0} ms | {:.0} ms | {} |\n\
                 | (for reference, not the target: full apply from the file landing, YAML read included) | {:.0} ms | |\n\
                 | one object changed ≤ {CHANGE_APPLY_MS:.0} ms p99 | {:.1} ms | {} |\n\
                 | agent RSS ≤ {AGENT_RSS_MIB:.0} MiB | {rss:.1} MiB | {} |\n",
                p.services,
                p.full_compile_sync_ms,
                verdict(p.full_compile_sync_ms > 0.0 && p.full_compile_sync_ms <= FULL_APPLY_MS),
                p.full_apply_ms,
                p.change_apply_p99_ms,
                verdict(p.change_apply_p99_ms <= CHANGE_APPLY_MS),
                verdict(rss <= AGENT_RSS_MIB),
            );
        }
        md
    }
}

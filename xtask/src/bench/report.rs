//! The benchmark's results: one object per scenario, ratios against `direct` and `peer`
//! on the same path, a terminal table, `report.json`, and docs/benchmarks.md.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;
use mesh_tests::measure::ResidentMemory;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::BenchArgs;

/// Latency of the fixed-rate run, milliseconds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Latency {
    /// Median.
    pub p50_ms: f64,
    /// 90th percentile.
    pub p90_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// Slowest request.
    pub max_ms: f64,
    /// Requests completed.
    pub requests: u64,
    /// Rate achieved, requests/s.
    pub achieved_rps: f64,
}

impl Latency {
    /// From oha's JSON (seconds) with its coordinated-omission correction applied.
    pub fn from_oha(v: &Value) -> anyhow::Result<Self> {
        let pct = |k: &str| -> anyhow::Result<f64> {
            v["latencyPercentiles"][k]
                .as_f64()
                .map(|s| s * 1000.0)
                .with_context(|| format!("oha: latencyPercentiles.{k}"))
        };
        let requests = v["statusCodeDistribution"]
            .as_object()
            .context("oha: statusCodeDistribution")?
            .values()
            .filter_map(Value::as_u64)
            .sum();
        Ok(Self {
            p50_ms: pct("p50")?,
            p90_ms: pct("p90")?,
            p99_ms: pct("p99")?,
            max_ms: v["summary"]["slowest"].as_f64().context("oha: summary.slowest")? * 1000.0,
            requests,
            achieved_rps: v["summary"]["requestsPerSec"].as_f64().context("oha: summary.requestsPerSec")?,
        })
    }
}

/// One scenario on one path.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Scenario {
    /// `direct`, `peer`, `mesh-l4`, `mesh-l4-tcp`, `mesh-l4-podaddr`, `mesh-l7`,
    /// `mesh-l7-trace1`, `mesh-l7-trace100`.
    pub name: String,
    /// `cross-node` or `same-node`.
    pub path: String,
    /// `ok` or `skipped`.
    pub status: String,
    /// Why it was skipped.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Fixed-rate latency.
    pub latency: Option<Latency>,
    /// Closed-loop maximum at the configured concurrency, requests/s.
    pub max_rps: Option<f64>,
    /// iperf3 throughput, Gbit/s.
    pub throughput_gbps: Option<f64>,
    /// Proxies on the path (0 for direct, 2 for sidecars, 1 or 2 node agents).
    pub proxies: usize,
    /// Summed RSS of the path's proxies before the load, MiB.
    pub proxy_rss_idle_mib: Option<f64>,
    /// Peak summed RSS of the path's proxies during the fixed-rate run, MiB.
    pub proxy_rss_load_mib: Option<f64>,
    /// CPU seconds the path's proxies used per 1000 requests of the fixed-rate run.
    pub proxy_cpu_s_per_1000_req: Option<f64>,
    /// This scenario's figures divided by `direct`'s on the same path.
    pub ratio_to_direct: Option<BTreeMap<String, f64>>,
    /// This scenario's figures divided by `peer`'s on the same path.
    pub ratio_to_peer: Option<BTreeMap<String, f64>>,
    /// p99 minus direct's p99, ms: the latency the proxies add.
    pub added_p99_ms_vs_direct: Option<f64>,
    /// Whether that difference is smaller than the p99 spread across rounds of either
    /// side: not a finding.
    #[serde(default)]
    pub added_p99_within_noise: Option<bool>,
    /// Rounds measured.
    #[serde(default)]
    pub rounds: u32,
    /// p99 of each round, ms (the reported p99 is their median).
    #[serde(default)]
    pub round_p99_ms: Vec<f64>,
    /// Whom the server application saw as its peer, for scenarios from the client pod:
    /// `client` (the client pod's address, as without a proxy), `server` (its own pod's
    /// address), `loopback` (a proxy in its pod), or `other`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_saw_peer: Option<String>,
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 })
}

fn spread(v: &[f64]) -> f64 {
    let max = v.iter().copied().fold(f64::MIN, f64::max);
    let min = v.iter().copied().fold(f64::MAX, f64::min);
    if v.is_empty() { 0.0 } else { max - min }
}

/// One scenario per (name, path) from several rounds, in the first round's order:
/// each figure is the median of the rounds', except the slowest request and the peak
/// RSS (the worst of any round) and the request count (their sum).
pub fn combine_rounds(rounds: Vec<Vec<Scenario>>) -> Vec<Scenario> {
    let Some(first) = rounds.first() else { return Vec::new() };
    let mut out = Vec::new();
    for s in first {
        let all: Vec<&Scenario> =
            rounds.iter().flatten().filter(|x| x.name == s.name && x.path == s.path && x.status == "ok").collect();
        if all.is_empty() {
            out.push(s.clone());
            continue;
        }
        let pick = |f: &dyn Fn(&Scenario) -> Option<f64>| median(all.iter().filter_map(|x| f(x)).collect());
        let worst = |f: &dyn Fn(&Scenario) -> Option<f64>| all.iter().filter_map(|x| f(x)).reduce(f64::max);
        let lat = |f: fn(&Latency) -> f64| pick(&|x: &Scenario| x.latency.as_ref().map(f));
        let latency = all.iter().all(|x| x.latency.is_some()).then(|| Latency {
            p50_ms: lat(|l| l.p50_ms).unwrap_or_default(),
            p90_ms: lat(|l| l.p90_ms).unwrap_or_default(),
            p99_ms: lat(|l| l.p99_ms).unwrap_or_default(),
            max_ms: worst(&|x: &Scenario| x.latency.as_ref().map(|l| l.max_ms)).unwrap_or_default(),
            requests: all.iter().filter_map(|x| x.latency.as_ref()).map(|l| l.requests).sum(),
            achieved_rps: lat(|l| l.achieved_rps).unwrap_or_default(),
        });
        out.push(Scenario {
            latency,
            max_rps: pick(&|x: &Scenario| x.max_rps),
            throughput_gbps: pick(&|x: &Scenario| x.throughput_gbps),
            proxy_rss_idle_mib: pick(&|x: &Scenario| x.proxy_rss_idle_mib),
            proxy_rss_load_mib: worst(&|x: &Scenario| x.proxy_rss_load_mib),
            proxy_cpu_s_per_1000_req: pick(&|x: &Scenario| x.proxy_cpu_s_per_1000_req),
            rounds: all.len() as u32,
            round_p99_ms: all.iter().filter_map(|x| x.latency.as_ref()).map(|l| l.p99_ms).collect(),
            ..s.clone()
        });
    }
    out
}

impl Scenario {
    /// A scenario that could not be measured, and why.
    pub fn skipped(name: &str, path: &str, reason: &str) -> Self {
        Scenario {
            name: name.into(),
            path: path.into(),
            status: "skipped".into(),
            reason: Some(reason.into()),
            latency: None,
            max_rps: None,
            throughput_gbps: None,
            proxies: 0,
            proxy_rss_idle_mib: None,
            proxy_rss_load_mib: None,
            proxy_cpu_s_per_1000_req: None,
            ratio_to_direct: None,
            ratio_to_peer: None,
            added_p99_ms_vs_direct: None,
            added_p99_within_noise: None,
            rounds: 0,
            round_p99_ms: Vec::new(),
            server_saw_peer: None,
        }
    }

    /// Named figures, for ratios.
    fn figures(&self) -> BTreeMap<String, f64> {
        let mut f = BTreeMap::new();
        if let Some(l) = &self.latency {
            f.insert("p50".into(), l.p50_ms);
            f.insert("p90".into(), l.p90_ms);
            f.insert("p99".into(), l.p99_ms);
            f.insert("max".into(), l.max_ms);
        }
        let optional = [
            ("max_rps", self.max_rps),
            ("throughput", self.throughput_gbps),
            ("rss_idle", self.proxy_rss_idle_mib),
            ("rss_load", self.proxy_rss_load_mib),
            ("cpu_per_1000_req", self.proxy_cpu_s_per_1000_req),
        ];
        f.extend(optional.into_iter().filter_map(|(k, v)| Some((k.to_string(), v?))));
        f
    }
}

/// The machine the figures come from.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Machine {
    /// `uname -r`.
    pub kernel: String,
    /// CPU model.
    pub cpu: String,
    /// Online CPUs.
    pub cpus: usize,
    /// Memory, GiB.
    pub memory_gib: f64,
    /// Versions of the tools used.
    pub tools: BTreeMap<String, String>,
}

impl Machine {
    fn probe() -> Self {
        let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .map(|l| l.trim_start_matches([' ', '\t', ':']).to_string())
            .unwrap_or_else(|| "unknown".into());
        let memory_kib: f64 = fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| m.lines().find_map(|l| l.strip_prefix("MemTotal:"))?.split_whitespace().next()?.parse().ok())
            .unwrap_or(0.0);
        let version = |argv: &[&str]| {
            mesh_tests::sys::output(argv)
                .ok()
                .map(|o| {
                    let text = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
                    text.lines().next().unwrap_or("").trim().to_string()
                })
                .unwrap_or_default()
        };
        let oha = crate::setup::command_path("oha").map(|p| p.display().to_string()).unwrap_or_else(|| "oha".into());
        let tools = [
            ("oha", version(&[&oha, "--version"])),
            ("haproxy", version(&["haproxy", "-v"])),
            ("iperf3", version(&["iperf3", "--version"])),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        Self {
            kernel: version(&["uname", "-r"]),
            cpu,
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            memory_gib: memory_kib / 1024.0 / 1024.0,
            tools,
        }
    }
}

/// Settings of the run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Settings {
    /// Quick (smoke) mode: figures are not meaningful.
    pub quick: bool,
    /// Fixed request rate, requests/s.
    pub rate: u32,
    /// Latency run length, s.
    pub latency_secs: u64,
    /// Maximum-throughput run length, s.
    pub max_rps_secs: u64,
    /// Concurrency of the maximum-throughput run.
    pub concurrency: u32,
    /// iperf3 run length, s.
    pub iperf_secs: u64,
    /// Response body, bytes.
    pub body_bytes: usize,
    /// Rounds of every scenario; the run lengths above are per round.
    #[serde(default)]
    pub rounds: u32,
    /// Run on debug-built binaries (`--dev-build`): the harness proved, nothing measured.
    #[serde(default)]
    pub dev_build: bool,
}

/// The whole report.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    /// When (UTC, RFC 3339).
    pub date: String,
    /// Where.
    pub machine: Machine,
    /// How.
    pub settings: Settings,
    /// What was measured.
    pub scenarios: Vec<Scenario>,
    /// Each node agent's resident memory at the points the targets name.
    #[serde(default)]
    pub agent_memory: Vec<AgentMemory>,
}

/// One node agent's resident memory through the run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentMemory {
    /// The agent's node.
    pub node: String,
    /// With the lab's pods enrolled, before any load, once idle (a few seconds after
    /// enrolling, as `after_bench` is read).
    pub fresh: ResidentMemory,
    /// After every scenario's bursts, idle again.
    pub after_bench: ResidentMemory,
    /// Highest `RssAnon` seen during the closed-loop L7 burst, KiB.
    pub l7_burst_peak_rss_anon_kib: u64,
    /// `settle_secs` after that burst.
    pub after_burst: ResidentMemory,
    /// How long after the burst `after_burst` was read, s.
    pub settle_secs: u64,
}

/// Memory targets (issue 17): idle VmRSS and RssAnon, RssAnon during the burst, and
/// how much of the burst's growth is handed back.
const IDLE_VM_RSS_MIB: f64 = 8.0;
const IDLE_RSS_ANON_MIB: f64 = 4.0;
const BURST_RSS_ANON_MIB: f64 = 16.0;
const SETTLED_TO_IDLE: f64 = 1.5;

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

impl Report {
    /// Collects the run's settings and machine with its scenarios.
    pub fn new(
        args: &BenchArgs,
        latency: Duration,
        max_rps: Duration,
        iperf: Duration,
        scenarios: Vec<Scenario>,
    ) -> Self {
        let date = mesh_tests::sys::run(&["date", "-u", "+%Y-%m-%dT%H:%M:%SZ"]).unwrap_or_default().trim().to_string();
        Self {
            date,
            machine: Machine::probe(),
            settings: Settings {
                quick: args.quick,
                rate: args.rate,
                latency_secs: latency.as_secs(),
                max_rps_secs: max_rps.as_secs(),
                concurrency: args.concurrency,
                iperf_secs: iperf.as_secs(),
                body_bytes: args.body,
                rounds: args.rounds(),
                dev_build: args.dev_build,
            },
            scenarios,
            agent_memory: Vec::new(),
        }
    }

    /// Issue 17's latency, throughput and CPU targets against the peer and direct on
    /// the same path, each marked met or not (memory: [`Report::memory_table`]).
    pub fn targets_table(&self) -> String {
        let find = |name: &str, path: &str| {
            self.scenarios.iter().find(|s| s.name == name && s.path == path && s.status == "ok")
        };
        let p50 = |s: &Scenario| s.latency.as_ref().map(|l| l.p50_ms);
        let p99 = |s: &Scenario| s.latency.as_ref().map(|l| l.p99_ms);
        let spread_of = |s: &Scenario| spread(&s.round_p99_ms);
        let mut t = String::from("| target | path | figure | met |\n|---|---|---|---|\n");
        let mut row = |target: &str, path: &str, figure: Option<(f64, bool)>, unit: &str| {
            let (fig, met) = match figure {
                Some((v, ok)) => (format!("{v:.3}{unit}"), if ok { "met" } else { "not met" }),
                None => ("-".into(), "not measured"),
            };
            let _ = writeln!(t, "| {target} | {path} | {fig} | {met} |");
        };
        // mesh-l4-tcp is the L4 path with the destination's request metrics off, what
        // ztunnel offers: the L4 targets are judged for it too.
        for (path, name) in [
            ("cross-node", "mesh-l4"),
            ("cross-node", "mesh-l4-tcp"),
            ("same-node", "mesh-l4"),
            ("same-node", "mesh-l4-tcp"),
        ] {
            let (Some(mesh), Some(peer), Some(direct)) = (find(name, path), find("peer", path), find("direct", path))
            else {
                continue;
            };
            let added = |f: &dyn Fn(&Scenario) -> Option<f64>, s: &Scenario| Some(f(s)? - f(direct)?);
            let ratio = |a: Option<f64>, b: Option<f64>| Some(a? / b?);
            let peer_added_p50 = ratio(added(&p50, mesh), added(&p50, peer));
            let peer_added_p99 = ratio(added(&p99, mesh), added(&p99, peer));
            let rps_peer = ratio(mesh.max_rps, peer.max_rps);
            let rps_direct = ratio(mesh.max_rps, direct.max_rps);
            let gbps_peer = ratio(mesh.throughput_gbps, peer.throughput_gbps);
            let gbps_direct = ratio(mesh.throughput_gbps, direct.throughput_gbps);
            if path == "cross-node" {
                row(&format!("{name} added p50 ≤ 0.35× peer's"), path, peer_added_p50.map(|r| (r, r <= 0.35)), "×");
                row(&format!("{name} added p99 ≤ 0.35× peer's"), path, peer_added_p99.map(|r| (r, r <= 0.35)), "×");
                // One round has no spread to compare.
                let spread = (mesh.round_p99_ms.len() > 1 && direct.round_p99_ms.len() > 1)
                    .then(|| (spread_of(mesh), spread_of(mesh) <= spread_of(direct)));
                row(&format!("{name} rounds' p99 spread ≤ direct's"), path, spread, " ms");
                row(&format!("{name} max req/s ≥ 1.5× peer"), path, rps_peer.map(|r| (r, r >= 1.5)), "×");
                row(&format!("{name} iperf3 ≥ 1.5× peer"), path, gbps_peer.map(|r| (r, r >= 1.5)), "×");
            } else {
                row(&format!("{name} added p99 ≤ 0.25× peer's"), path, peer_added_p99.map(|r| (r, r <= 0.25)), "×");
                row(&format!("{name} max req/s ≥ 0.8× direct"), path, rps_direct.map(|r| (r, r >= 0.8)), "×");
                row(&format!("{name} iperf3 ≥ 0.8× direct"), path, gbps_direct.map(|r| (r, r >= 0.8)), "×");
            }
            let cpu = mesh.proxy_cpu_s_per_1000_req.map(|c| c / mesh.proxies.max(1) as f64);
            row(&format!("{name} CPU ≤ 0.05 s per 1000 req per agent"), path, cpu.map(|c| (c, c <= 0.05)), " s");
            if let Some(l7) = find("mesh-l7", path).filter(|_| name == "mesh-l4") {
                let l7_added = added(&p99, l7);
                let peer_l4 = added(&p99, peer);
                row("mesh-l7 added p99 ≤ peer's (L4)", path, l7_added.zip(peer_l4).map(|(a, b)| (a, a <= b)), " ms");
                row("mesh-l7 max req/s ≥ 1.2× peer", path, ratio(l7.max_rps, peer.max_rps).map(|r| (r, r >= 1.2)), "×");
            }
        }
        t
    }

    /// The agents' memory, and each memory target met or not.
    pub fn memory_table(&self) -> String {
        let mut t = String::from(
            "| agent | fresh VmRSS / RssAnon / RssFile MiB | after the bench | L7 burst peak RssAnon MiB | after the burst |\n\
             |---|---|---|---|---|\n",
        );
        let m = |r: &ResidentMemory| {
            format!("{:.1} / {:.1} / {:.1}", mib(r.vm_rss_kib), mib(r.rss_anon_kib), mib(r.rss_file_kib))
        };
        for a in &self.agent_memory {
            let _ = writeln!(
                t,
                "| {} | {} | {} | {:.1} | {} ({} s after) |",
                a.node,
                m(&a.fresh),
                m(&a.after_bench),
                mib(a.l7_burst_peak_rss_anon_kib),
                m(&a.after_burst),
                a.settle_secs
            );
        }
        t.push_str("\n| target | agent | figure | met |\n|---|---|---|---|\n");
        let verdict = |ok: bool| if ok { "met" } else { "not met" };
        for a in &self.agent_memory {
            for (when, r) in [("fresh", &a.fresh), ("after the bench", &a.after_bench)] {
                let (vm, anon) = (mib(r.vm_rss_kib), mib(r.rss_anon_kib));
                let _ = writeln!(
                    t,
                    "| idle VmRSS ≤ {IDLE_VM_RSS_MIB} MiB, {when} | {} | {vm:.1} | {} |",
                    a.node,
                    verdict(vm <= IDLE_VM_RSS_MIB)
                );
                let _ = writeln!(
                    t,
                    "| idle RssAnon ≤ {IDLE_RSS_ANON_MIB} MiB, {when} | {} | {anon:.1} | {} |",
                    a.node,
                    verdict(anon <= IDLE_RSS_ANON_MIB)
                );
            }
            let peak = mib(a.l7_burst_peak_rss_anon_kib);
            let _ = writeln!(
                t,
                "| RssAnon ≤ {BURST_RSS_ANON_MIB} MiB during the L7 burst | {} | {peak:.1} | {} |",
                a.node,
                verdict(peak <= BURST_RSS_ANON_MIB)
            );
            let ratio = a.after_burst.rss_anon_kib as f64 / a.after_bench.rss_anon_kib.max(1) as f64;
            let _ = writeln!(
                t,
                "| RssAnon ≤ {SETTLED_TO_IDLE}× idle {} s after the burst | {} | {ratio:.2}× | {} |",
                a.settle_secs,
                a.node,
                verdict(ratio <= SETTLED_TO_IDLE)
            );
        }
        t
    }

    /// Fills each scenario's ratios to `direct` and `peer` on the same path.
    pub fn compute_ratios(&mut self) {
        let find = |name: &str, path: &str, all: &[Scenario]| {
            all.iter().find(|s| s.name == name && s.path == path && s.status == "ok").map(Scenario::figures)
        };
        let snapshot = self.scenarios.clone();
        for s in self.scenarios.iter_mut().filter(|s| s.status == "ok" && s.name != "direct") {
            let mine = s.figures();
            let ratio = |base: Option<BTreeMap<String, f64>>| {
                let base = base?;
                Some(
                    mine.iter()
                        .filter_map(|(k, v)| base.get(k).filter(|b| **b > 0.0).map(|b| (k.clone(), v / b)))
                        .collect::<BTreeMap<_, _>>(),
                )
            };
            s.ratio_to_direct = ratio(find("direct", &s.path, &snapshot));
            if s.name != "peer" {
                s.ratio_to_peer = ratio(find("peer", &s.path, &snapshot));
            }
            let direct = snapshot.iter().find(|d| d.name == "direct" && d.path == s.path);
            let direct_p99 = direct.and_then(|d| d.latency.as_ref()).map(|l| l.p99_ms);
            s.added_p99_ms_vs_direct = s.latency.as_ref().zip(direct_p99).map(|(l, d)| l.p99_ms - d);
            let noise = spread(&s.round_p99_ms).max(direct.map_or(0.0, |d| spread(&d.round_p99_ms)));
            s.added_p99_within_noise = s.added_p99_ms_vs_direct.map(|a| a < 0.0 || a.abs() <= noise);
        }
    }

    /// Checks that every scenario and path is present and that measured scenarios carry
    /// their figures (no timing is judged); returns (checks passed, failures).
    pub fn check_shape(&self) -> (usize, Vec<String>) {
        let mut passed = 0;
        let mut failed = Vec::new();
        let expected = [
            "direct",
            "peer",
            "mesh-l4",
            "mesh-l4-tcp",
            "mesh-l4-podaddr",
            "mesh-l7",
            "mesh-l7-trace1",
            "mesh-l7-trace100",
        ]
        .into_iter()
        .flat_map(|name| ["cross-node", "same-node"].map(|path| (name, path)))
        .chain(["direct", "peer", "gateway"].map(|name| (name, "ingress")));
        for (name, path) in expected {
            let Some(s) = self.scenarios.iter().find(|s| s.name == name && s.path == path) else {
                failed.push(format!("{name} {path}: missing"));
                continue;
            };
            let problem = match s.status.as_str() {
                "skipped" if s.reason.as_deref().is_some_and(|r| !r.is_empty()) => None,
                "skipped" => Some("skipped without a reason".to_string()),
                "ok" => {
                    let l = s.latency.as_ref();
                    // Throughput is an L4 figure: L7 and ingress scenarios have none.
                    let l4 = !name.starts_with("mesh-l7") && path != "ingress";
                    let throughput = if l4 { s.throughput_gbps } else { Some(1.0) };
                    let positive = [l.map(|l| l.p50_ms), l.map(|l| l.p99_ms), s.max_rps, throughput];
                    let has_proxy_costs = s.proxies == 0
                        || (s.proxy_rss_load_mib.is_some_and(|v| v > 0.0) && s.proxy_cpu_s_per_1000_req.is_some());
                    if positive.iter().any(|v| !v.is_some_and(|v| v > 0.0)) {
                        Some("a latency, rate or throughput figure is missing".into())
                    } else if !has_proxy_costs {
                        Some("proxy memory or CPU missing".into())
                    } else if name != "direct" && s.ratio_to_direct.is_none() {
                        Some("no ratio to direct".into())
                    } else {
                        None
                    }
                }
                other => Some(format!("unknown status {other}")),
            };
            match problem {
                Some(p) => failed.push(format!("{name} {path}: {p}")),
                None => passed += 1,
            }
        }
        (passed, failed)
    }

    /// The results as a Markdown table.
    /// Whom each server application saw as its peer, per scenario from the client pod.
    pub fn peer_table(&self) -> String {
        let mut t = String::from("| scenario | path | server saw |\n|---|---|---|\n");
        for s in self.scenarios.iter().filter(|s| s.server_saw_peer.is_some()) {
            let _ = writeln!(t, "| {} | {} | {} |", s.name, s.path, s.server_saw_peer.as_deref().unwrap_or("-"));
        }
        t
    }

    pub fn table(&self) -> String {
        let mut t = String::from(
            "| scenario | path | p50 ms | p90 ms | p99 ms (rounds) | max ms | added p99 ms | max req/s (c64) | iperf3 Gbit/s | proxy RSS idle / load MiB | proxy CPU s per 1000 req |\n\
             |---|---|---|---|---|---|---|---|---|---|---|\n",
        );
        let n = |v: Option<f64>, digits: usize| v.map_or("-".to_string(), |v| format!("{v:.digits$}"));
        for s in &self.scenarios {
            if s.status != "ok" {
                let _ =
                    writeln!(t, "| {} | {} | skipped: {} |||||||||", s.name, s.path, s.reason.as_deref().unwrap_or(""));
                continue;
            }
            let l = s.latency.as_ref();
            let rounds = if s.round_p99_ms.len() > 1 {
                let r: Vec<String> = s.round_p99_ms.iter().map(|v| format!("{v:.2}")).collect();
                format!(" ({})", r.join(", "))
            } else {
                String::new()
            };
            let added = match (s.added_p99_ms_vs_direct, s.added_p99_within_noise) {
                (Some(a), Some(true)) => format!("{a:.3} (noise)"),
                (a, _) => n(a, 3),
            };
            let _ = writeln!(
                t,
                "| {} | {} | {} | {} | {}{rounds} | {} | {added} | {} | {} | {} / {} | {} |",
                s.name,
                s.path,
                n(l.map(|l| l.p50_ms), 3),
                n(l.map(|l| l.p90_ms), 3),
                n(l.map(|l| l.p99_ms), 3),
                n(l.map(|l| l.max_ms), 2),
                n(s.max_rps, 0),
                n(s.throughput_gbps, 2),
                n(s.proxy_rss_idle_mib, 1),
                n(s.proxy_rss_load_mib, 1),
                n(s.proxy_cpu_s_per_1000_req, 4),
            );
        }
        t
    }

    /// Ratios as a Markdown table (mesh and peer against direct, mesh against peer).
    pub fn ratio_table(&self) -> String {
        let mut t = String::from(
            "| scenario | path | against | p50 | p99 | max req/s | Gbit/s | RSS load | CPU per 1000 req |\n|---|---|---|---|---|---|---|---|---|\n",
        );
        for s in self.scenarios.iter().filter(|s| s.status == "ok") {
            for (against, r) in [("direct", &s.ratio_to_direct), ("peer", &s.ratio_to_peer)] {
                let Some(r) = r else { continue };
                let g = |k: &str| r.get(k).map_or("-".to_string(), |v| format!("{v:.2}x"));
                let _ = writeln!(
                    t,
                    "| {} | {} | {against} | {} | {} | {} | {} | {} | {} |",
                    s.name,
                    s.path,
                    g("p50"),
                    g("p99"),
                    g("max_rps"),
                    g("throughput"),
                    g("rss_load"),
                    g("cpu_per_1000_req")
                );
            }
        }
        t
    }

    /// Prints both tables.
    pub fn print_table(&self) {
        println!("\n{}\n{}\n{}", self.table(), self.ratio_table(), self.memory_table());
    }

    /// Writes `report.json`.
    pub fn write_json(&self, path: &Path) -> anyhow::Result<()> {
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir)?;
        }
        fs::write(path, serde_json::to_string_pretty(self)? + "\n")
            .with_context(|| format!("writing {}", path.display()))
    }

    /// Regenerates docs/benchmarks.md, keeping the hand-written analysis after
    /// [`ANALYSIS_MARKER`].
    pub fn write_markdown(&self, path: &Path) -> anyhow::Result<()> {
        let old = fs::read_to_string(path).unwrap_or_default();
        let analysis = old
            .split_once(ANALYSIS_MARKER)
            .map(|(_, rest)| rest.to_string())
            .unwrap_or_else(|| "\n## Analysis\n\n(not written yet)\n".into());
        let m = &self.machine;
        let s = &self.settings;
        let mut md = String::new();
        let _ = writeln!(md, "# Benchmarks\n");
        let _ = writeln!(
            md,
            "Generated by `cargo xtask bench` on {} from `target/bench/report.json`; do not edit above the\n\
             analysis marker (the generator keeps everything after it).\n",
            self.date
        );
        let _ = writeln!(md, "## Machine\n");
        let _ = writeln!(md, "- kernel {}, {} x {}, {:.1} GiB memory", m.kernel, m.cpus, m.cpu, m.memory_gib);
        for (k, v) in &m.tools {
            let _ = writeln!(md, "- {k}: {v}");
        }
        let _ = writeln!(md, "\n## Method\n");
        let _ = writeln!(
            md,
            "All scenarios run in one lab, on the same pods: client `frontend` (node1) to `myapp-v1` (node2,\n\
             cross-node) and `myapp-v2` (node1, same-node). `direct` and `peer` run with the namespace\n\
             unenrolled; `mesh-*` with it enrolled. `peer` is HAProxy in TCP mode as an mTLS client sidecar in\n\
             the client pod and an mTLS server sidecar in the server pod (TLS 1.3, certificates from the mesh\n\
             CA). `mesh-l4` has the server's agent read each HTTP request for its metrics (L7 telemetry, the\n\
             default); `mesh-l4-tcp` is the same with a Telemetry turning request metrics off at the server,\n\
             whose agent then splices: the difference between them is the cost of L7 telemetry.\n\
             `mesh-l4-podaddr` is `mesh-l4` with the agents delivering from the server pod's own address\n\
             (`--inbound-transparent off`): against `mesh-l4`, the cost of showing the application its\n\
             client's address (the \"peer seen\" table says what each server application saw).\n\
             `mesh-l7-trace1` and `mesh-l7-trace100` are `mesh-l7` with the agents tracing at 1% and 100%\n\
             sampling (OTLP/HTTP to a collector in pod `outside`): against `mesh-l7`, the cost of tracing. Every\n\
             scenario is measured in {} rounds; the phases (unenrolled, enrolled) alternate which\n\
             goes first, and each figure is the median round's (slowest request and peak RSS: the worst\n\
             round's); the p99 of each round is listed, and an added p99 smaller than that spread is marked\n\
             noise. Per round: latency with oha at a fixed {} requests/s for {} s over {} keep-alive\n\
             connections, with coordinated-omission correction, {} byte responses; maximum with oha closed\n\
             loop at concurrency {} for {} s; throughput with iperf3 for {} s. Proxy RSS is the sum over the\n\
             path's proxies (two sidecars; one agent same-node, two cross-node), idle before the load and peak\n\
             during the fixed-rate run; CPU is their cgroups' `usage_usec` over the fixed-rate run. The\n\
             `ingress` path runs from the outside client (netns `meshlab-client`) to `myapp-v1` over HTTPS:\n\
             `direct` is plain HTTP to the pod, `peer` an HAProxy HTTPS edge (HTTP mode, TLS terminated, plain\n\
             HTTP to the pod), `gateway` the mesh's ingress gateway (TLS terminated, HBONE to the pod); its\n\
             proxies are the gateway and the server node's agent.\n",
            s.rounds.max(1),
            s.rate,
            s.latency_secs,
            super::LATENCY_CONNECTIONS,
            s.body_bytes,
            s.concurrency,
            s.max_rps_secs,
            s.iperf_secs
        );
        let _ = writeln!(md, "## Results\n\n{}\n## Ratios\n\n{}", self.table(), self.ratio_table());
        let _ = writeln!(md, "## Peer seen by the server application\n\n{}", self.peer_table());
        let _ = writeln!(md, "## Targets (issue 17)\n\n{}", self.targets_table());
        let _ = writeln!(md, "## Agent memory\n\n{}", self.memory_table());
        md.push_str(ANALYSIS_MARKER);
        md.push_str(&analysis);
        fs::write(path, md).with_context(|| format!("writing {}", path.display()))
    }
}

/// Everything after this line in docs/benchmarks.md is written by hand and kept.
pub const ANALYSIS_MARKER: &str = "<!-- analysis: written by hand, kept when the file is regenerated -->\n";

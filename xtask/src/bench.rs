//! `cargo xtask bench`: the mesh against the physical limit and a sidecar peer, measured
//! side by side in one run on the same lab pods.
//!
//! Scenarios, each cross-node (frontend -> myapp-v1) and same-node (frontend -> myapp-v2):
//! - `direct`: no mesh (the pods' namespace is unenrolled for this phase);
//! - `peer`: HAProxy as an mTLS client proxy in the client pod and an mTLS server proxy
//!   in the server pod (TLS 1.3, certificates from the mesh CA), as sidecars run;
//! - `mesh-l4`: the same pods enrolled: both node agents and the HBONE mTLS tunnel
//!   (the server's agent reads each HTTP request for its metrics: L7 telemetry);
//! - `mesh-l4-tcp`: the same, with a Telemetry turning the request metrics off at the
//!   server's agent, which then splices: the difference is what L7 telemetry costs;
//! - `mesh-l4-podaddr`: `mesh-l4` with the agents delivering from the server pod's own
//!   address (`--inbound-transparent off`): against `mesh-l4`, what showing the
//!   application its client's address costs;
//! - `mesh-l7`: the same pods through the Service VIP with a VirtualService (and a
//!   DestinationRule subset) on the route: HTTP parsed, matched and routed;
//! - `mesh-l7-trace1`, `mesh-l7-trace100`: `mesh-l7` with the agents tracing (OTLP/HTTP
//!   to a collector in pod `outside`) at 1% and 100% sampling: a client span at the
//!   source's agent and a server span at the destination's for each sampled request.
//!
//! And on the `ingress` path, from the outside client (netns `meshlab-client`) to
//! `myapp-v1` over HTTPS:
//! - `direct`: plain HTTP to the pod, no proxy;
//! - `peer`: an HAProxy HTTPS edge in the gateway pod's netns, terminating TLS and
//!   forwarding plain HTTP to the pod, as a conventional ingress does;
//! - `gateway`: the mesh's ingress gateway (a Gateway and a VirtualService bound to
//!   it), terminating TLS and carrying each request over the HBONE tunnel to the pod.
//!
//! Each scenario gets a fixed-rate latency run (oha, coordinated-omission corrected), a
//! closed-loop maximum at fixed concurrency, an iperf3 throughput run, and the proxies'
//! RSS (idle and under load) and CPU time, read from their own cgroups.
//!
//! A shared machine drifts over minutes, so the scenarios are measured in rounds
//! (`--rounds`), each round measuring every scenario, the unenrolled and enrolled phases
//! alternating which goes first; each figure reported is the median round's, with the
//! p99 spread across rounds kept to tell a difference from noise.

pub mod churn;
pub mod link_order;
mod peer;
mod report;
pub mod scale;
pub mod soak;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use mesh_tests::lab::{CLIENT_NETNS, DEFAULT_STATE_DIR, Lab, Options};
use mesh_tests::measure;
use serde_json::Value;

use crate::{build, root, setup};
pub use report::Report;
use report::{Latency, Scenario};

/// Options of `cargo xtask bench`.
#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// A few seconds per scenario: proves the harness; figures are not meaningful and
    /// docs/benchmarks.md is left alone.
    #[arg(long)]
    pub quick: bool,
    /// Request rate of the latency run, requests/s.
    #[arg(long, default_value_t = 1000)]
    pub rate: u32,
    /// Length of the latency run per scenario, seconds, split across the rounds.
    #[arg(long, default_value_t = 30)]
    pub duration: u64,
    /// Rounds of every scenario (1 with --quick).
    #[arg(long, default_value_t = 3)]
    pub rounds: u32,
    /// Response body size, bytes.
    #[arg(long, default_value_t = 1024)]
    pub body: usize,
    /// Concurrency of the maximum-throughput run.
    #[arg(long, default_value_t = 64)]
    pub concurrency: u32,
    /// Where the JSON report is written.
    #[arg(long, default_value = "target/bench/report.json")]
    pub report: PathBuf,
    /// Measure the control plane instead of the data path: the node agents with 100,
    /// 1,000 and 10,000 generated Services (`scale.json` beside the report, and
    /// docs/benchmarks-scale.md on a full run; --quick: 100 and 1,000).
    #[arg(long)]
    pub scale: bool,
    /// Soak instead: fixed-rate HTTP at L4 and L7 for DURATION (`10m`, `1h`), RSS,
    /// descriptors and p99 sampled every 10 s; fails when an agent's RSS grows more
    /// than 1% after warm-up. Writes target/bench/soak.json and soak.svg (and, from an
    /// hour, its result into docs/benchmarks.md).
    #[arg(long, value_name = "DURATION", value_parser = soak::parse_duration)]
    pub soak: Option<Duration>,
    /// Connection churn instead: --rate new connections per second (one HTTP request
    /// each, no keep-alive) across the tunnel for DURATION; reports each agent's CPU per
    /// 1,000 new connections and fails unless its descriptors and memory come back
    /// after the load. Writes target/bench/churn.json (and, from 10 minutes, its result
    /// into docs/benchmarks.md).
    #[arg(long, value_name = "DURATION", value_parser = soak::parse_duration, conflicts_with = "soak")]
    pub churn: Option<Duration>,
    /// Measure nothing: render docs/benchmarks.md again from the report at --report
    /// (after the generator changed; the analysis section is kept).
    #[arg(long)]
    pub render: bool,
    /// With --quick: run the lab on the debug build instead of a release one. Proves
    /// the harness without a release build (what `cargo xtask test` does); the figures
    /// say nothing of the agent's speed.
    #[arg(long, requires = "quick")]
    pub dev_build: bool,
}

/// How long each part of a scenario runs.
#[derive(Debug, Clone, Copy)]
struct Durations {
    latency: Duration,
    max_rps: Duration,
    iperf: Duration,
}

impl BenchArgs {
    fn rounds(&self) -> u32 {
        if self.quick { 1 } else { self.rounds.max(1) }
    }

    /// Durations of one round.
    fn durations(&self) -> Durations {
        if self.quick {
            Durations {
                latency: Duration::from_secs(2),
                max_rps: Duration::from_secs(2),
                iperf: Duration::from_secs(1),
            }
        } else {
            Durations {
                latency: Duration::from_secs((self.duration / u64::from(self.rounds())).max(1)),
                max_rps: Duration::from_secs(5),
                iperf: Duration::from_secs(5),
            }
        }
    }
}

/// The client pod and the two servers; fixed by the lab's default manifests.
const CLIENT: &str = "frontend";
const SERVER_CROSS: &str = "myapp-v1";
const SERVER_SAME: &str = "myapp-v2";
/// Connections of the fixed-rate run: enough to hold the rate at several ms latency.
const LATENCY_CONNECTIONS: u32 = 16;
/// iperf3's server port in each server pod.
const IPERF_PORT: u16 = 5201;

/// How long the agents are left alone before an idle memory reading: as long as an
/// agent left idle takes to settle. The heap loop (`mesh_agent::heap::LOOK_EVERY`,
/// 2 s) has handed back what the last work freed (enrolling the pods, the scenarios),
/// and what the agent unmapped 2 s after that work (`mesh_agent::code_pages::QUIET`)
/// has been mapped back as far as its resync, idle loops and pooled connections run
/// it: read 4 s after enrollment, an agent showed 4.3 MiB VmRSS that was 11.0-11.8
/// MiB from 15 s on. The fresh and the after-the-bench readings wait alike.
const IDLE_SETTLE: Duration = Duration::from_secs(30);

/// `--render`: docs/benchmarks.md from the report already at `--report`.
pub fn render(args: &BenchArgs) -> anyhow::Result<Report> {
    let path = report_path(&args.report);
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let report: Report = serde_json::from_str(&text).with_context(|| format!("{} is not a report", path.display()))?;
    if report.settings.quick {
        bail!("{} is a --quick run: its figures do not go into docs/benchmarks.md", path.display());
    }
    report.write_markdown(&root().join("docs/benchmarks.md"))?;
    Ok(report)
}

/// Runs the benchmark and writes the report (and, on full runs, docs/benchmarks.md).
pub fn run(args: &BenchArgs) -> anyhow::Result<Report> {
    setup::ensure_bench_tools()?;
    let tools = Tools::find()?;
    in_bench_lab(args, |lab| run_in_lab(lab, args, &tools))
}

/// `--scale`: the control plane at 100, 1,000 and 10,000 Services ([`scale`]).
pub fn run_scale(args: &BenchArgs) -> anyhow::Result<scale::ScaleReport> {
    in_bench_lab(args, |lab| scale::run(lab, args))
}

/// `--soak`: the agents under steady load for a long time ([`soak`]).
pub fn run_soak(args: &BenchArgs, duration: Duration) -> anyhow::Result<soak::SoakReport> {
    setup::ensure_bench_tools()?;
    in_bench_lab(args, |lab| soak::run(lab, args, duration))
}

/// `--churn`: new connections at a fixed rate ([`churn`]).
pub fn run_churn(args: &BenchArgs, duration: Duration) -> anyhow::Result<churn::ChurnReport> {
    setup::ensure_bench_tools()?;
    in_bench_lab(args, |lab| churn::run(lab, args, duration))
}

/// Brings a release-built lab up (debug-built with `--dev-build`), runs `f` in it, and
/// takes it down.
fn in_bench_lab<T>(args: &BenchArgs, f: impl FnOnce(&mut Lab) -> anyhow::Result<T>) -> anyhow::Result<T> {
    in_lab_running(!args.dev_build, Ok, f)
}

/// [`in_bench_lab`] with the agent binary `agent` makes of the one just built (a copy
/// elsewhere, for `link-order`).
fn in_lab_running<T>(
    release: bool,
    agent: impl FnOnce(PathBuf) -> anyhow::Result<PathBuf>,
    f: impl FnOnce(&mut Lab) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    if let Some(why) = mesh_tests::sys::lab_unsupported() {
        bail!("the benchmark runs in the lab, which cannot run here: {why}");
    }
    let bins = build::binaries(release)?;
    let state_dir = PathBuf::from(DEFAULT_STATE_DIR);
    if Lab::exists(&state_dir) {
        println!("[bench] a lab is up; taking it down to start from a clean one");
        Lab::load(&state_dir)?.down()?;
    }
    let opts = Options {
        manifests: root().join("examples/lab"),
        state_dir,
        agent_bin: agent(bins.agent)?,
        echo_bin: bins.echo,
        // Logging at warn: the benchmark measures the proxy, not its log writer.
        agent_log: "warn".into(),
        agent_env: Default::default(),
        placement: Default::default(),
        plugin_ca: None,
    };
    println!("[bench] lab up ({} build)", if release { "release" } else { "debug" });
    let mut lab = Lab::up(&opts)?;
    let result = f(&mut lab);
    if result.is_err() {
        print_helper_logs(&lab);
    }
    let down = lab.down();
    let report = result?;
    down.context("taking the benchmark lab down")?;
    Ok(report)
}

/// The helpers' last words, before `down` removes the logs with the lab.
fn print_helper_logs(lab: &Lab) {
    for h in &lab.helpers {
        let log = lab.state_dir.join("logs").join(format!("helper-{}.log", h.name));
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(10).collect();
        eprintln!("--- {} (last lines) ---", h.name);
        for l in tail.iter().rev() {
            eprintln!("{l}");
        }
    }
}

/// Load tools, resolved once.
struct Tools {
    oha: PathBuf,
    iperf3: PathBuf,
    haproxy: PathBuf,
}

impl Tools {
    fn find() -> anyhow::Result<Self> {
        let find = |n: &str| setup::command_path(n).with_context(|| format!("{n} is not installed"));
        Ok(Self { oha: find("oha")?, iperf3: find("iperf3")?, haproxy: find("haproxy")? })
    }
}

fn run_in_lab(lab: &mut Lab, args: &BenchArgs, tools: &Tools) -> anyhow::Result<Report> {
    let d = args.durations();
    for server in [SERVER_CROSS, SERVER_SAME] {
        let argv = vec![tools.iperf3.display().to_string(), "-s".into(), "-p".into(), IPERF_PORT.to_string()];
        lab.start_helper(&format!("iperf3-{server}"), server, &argv)?;
    }
    set_enrollment(lab, true)?;
    std::thread::sleep(IDLE_SETTLE);
    let fresh = agents_memory(lab)?;
    let rounds = args.rounds();
    let mut per_round = Vec::new();
    for round in 0..rounds {
        println!("[bench] round {}/{rounds}", round + 1);
        let mut scenarios = Vec::new();
        // Alternate which phase goes first, so slow drift does not favour one side.
        let enrolled_first = round % 2 == 1;
        for enrolled in [enrolled_first, !enrolled_first] {
            if enrolled {
                scenarios.extend(mesh_phase(lab, tools, args, d)?);
            } else {
                scenarios.extend(baseline_phase(lab, tools, args, d)?);
            }
        }
        per_round.push(scenarios);
    }
    let scenarios = report::combine_rounds(per_round);

    let mut report = Report::new(args, d.latency, d.max_rps, d.iperf, scenarios);
    report.agent_memory = memory_phase(lab, args, tools, d, fresh)?;
    report.compute_ratios();
    report.print_table();
    let path = report_path(&args.report);
    report.write_json(&path)?;
    println!("[bench] report: {}", path.display());
    if !args.quick {
        let docs = root().join("docs/benchmarks.md");
        report.write_markdown(&docs)?;
        println!("[bench] {} regenerated", docs.display());
    }
    Ok(report)
}

/// Each node agent's resident memory now, by node.
fn agents_memory(lab: &Lab) -> anyhow::Result<Vec<(String, measure::ResidentMemory)>> {
    lab.nodes.iter().map(|n| Ok((n.name.clone(), measure::cgroup_memory(&agent_cgroup(lab, &n.name)?)?))).collect()
}

/// After every scenario: the agents' idle memory, a closed-loop L7 burst cross-node
/// (both agents on the path) with their `RssAnon` sampled, and their memory a while
/// after it (30 s; 5 with --quick), against `fresh` (enrolled, before any load).
fn memory_phase(
    lab: &mut Lab,
    args: &BenchArgs,
    tools: &Tools,
    d: Durations,
    fresh: Vec<(String, measure::ResidentMemory)>,
) -> anyhow::Result<Vec<report::AgentMemory>> {
    set_enrollment(lab, true)?;
    std::thread::sleep(IDLE_SETTLE);
    let after_bench = agents_memory(lab)?;
    let vip = route_all_to(lab, SERVER_CROSS)?;
    let cgroups: Vec<(String, PathBuf)> =
        lab.nodes.iter().map(|n| Ok((n.name.clone(), agent_cgroup(lab, &n.name)?))).collect::<anyhow::Result<_>>()?;
    let url = format!("http://{vip}/bytes/{}", args.body);
    let secs = format!("{}s", d.max_rps.as_secs().max(2));
    let rss_anon_kib = |i: usize| measure::cgroup_memory(&cgroups[i].1).map_or(0.0, |m| m.rss_anon_kib as f64);
    let (burst, peaks) = peaks_while(cgroups.len(), Duration::from_millis(100), rss_anon_kib, || {
        oha(lab, tools, Origin::ClientPod, &url, &["-z", &secs, "-c", &args.concurrency.to_string()])
    });
    lab.delete(Path::new(L7_CONFIG))?;
    burst.context("the L7 burst")?;
    let settle = if args.quick { 5 } else { 30 };
    std::thread::sleep(Duration::from_secs(settle));
    let after_burst = agents_memory(lab)?;
    let of = |list: &[(String, measure::ResidentMemory)], node: &str| {
        list.iter().find(|(n, _)| n == node).map(|(_, m)| *m).unwrap_or_default()
    };
    Ok(cgroups
        .iter()
        .zip(peaks)
        .map(|((node, _), peak)| report::AgentMemory {
            node: node.clone(),
            fresh: of(&fresh, node),
            after_bench: of(&after_bench, node),
            l7_burst_peak_rss_anon_kib: peak as u64,
            after_burst: of(&after_burst, node),
            settle_secs: settle,
        })
        .collect())
}

/// Phase 1, unenrolled: the physical limit and the sidecar peer, on both paths.
fn baseline_phase(lab: &mut Lab, tools: &Tools, args: &BenchArgs, d: Durations) -> anyhow::Result<Vec<Scenario>> {
    let cross_ip = lab.pod(SERVER_CROSS)?.ip;
    let same_ip = lab.pod(SERVER_SAME)?.ip;
    let mut scenarios = Vec::new();
    set_enrollment(lab, false)?;
    let peer = peer::Peer::start(lab, &tools.haproxy, CLIENT, [(SERVER_CROSS, cross_ip), (SERVER_SAME, same_ip)])?;
    for (path, ip, server) in [("cross-node", cross_ip, SERVER_CROSS), ("same-node", same_ip, SERVER_SAME)] {
        let target = Target::to_pod("direct", path, &ip.to_string(), args.body, Vec::new());
        scenarios.push(measure_scenario(lab, tools, args, d, &target)?);
        let (http_port, iperf_port) = peer.local_ports(server)?;
        let target = Target {
            name: "peer",
            path,
            url: format!("http://127.0.0.1:{http_port}/bytes/{}", args.body),
            iperf: Some(("127.0.0.1".into(), iperf_port)),
            proxies: peer.cgroups(lab, server)?,
            origin: Origin::ClientPod,
            oha_args: Vec::new(),
        };
        scenarios.push(measure_scenario(lab, tools, args, d, &target)?);
    }
    peer.stop(lab)?;
    // The ingress path: straight to the pod, then through the HAProxy HTTPS edge.
    let target = Target {
        name: "direct",
        path: INGRESS,
        url: format!("http://{cross_ip}:8080/bytes/{}", args.body),
        iperf: None,
        proxies: Vec::new(),
        origin: Origin::Outside,
        oha_args: Vec::new(),
    };
    scenarios.push(measure_scenario(lab, tools, args, d, &target)?);
    let edge = peer::Edge::start(lab, &tools.haproxy, GATEWAY_POD, cross_ip)?;
    let target = Target {
        name: "peer",
        path: INGRESS,
        url: format!("https://{INGRESS_HOST}:{}/bytes/{}", edge.port, args.body),
        iperf: None,
        proxies: edge.cgroups(lab)?,
        origin: Origin::Outside,
        oha_args: edge.oha_args(),
    };
    scenarios.push(measure_scenario(lab, tools, args, d, &target)?);
    edge.stop(lab)?;
    Ok(scenarios)
}

/// Phase 2, enrolled: the same pods through the mesh, at L4 and at L7.
fn mesh_phase(lab: &mut Lab, tools: &Tools, args: &BenchArgs, d: Durations) -> anyhow::Result<Vec<Scenario>> {
    let cross_ip = lab.pod(SERVER_CROSS)?.ip;
    let same_ip = lab.pod(SERVER_SAME)?.ip;
    let mut scenarios = Vec::new();
    set_enrollment(lab, true)?;
    for (path, ip, server) in [("cross-node", cross_ip, SERVER_CROSS), ("same-node", same_ip, SERVER_SAME)] {
        let proxies = path_agents(lab, server)?;
        let target = Target::to_pod("mesh-l4", path, &ip.to_string(), args.body, proxies);
        let l7_proxies = target.proxies.clone();
        scenarios.push(measure_scenario(lab, tools, args, d, &target)?);
        // mesh-l4-tcp: the same, with the server's agent splicing instead of reading
        // each request for its metrics (a Telemetry turns the request metrics off at
        // the destination): what L7 telemetry costs.
        let telemetry = splice_at_destination(lab, server)?;
        let spliced = Target { name: "mesh-l4-tcp", proxies: l7_proxies.clone(), ..target };
        scenarios.push(measure_scenario(lab, tools, args, d, &spliced)?);
        lab.delete(&telemetry)?;
        // mesh-l7: the Service VIP, with a VirtualService routing every request to the
        // same server pod (through a DestinationRule subset), so HTTP is parsed and
        // routed on the same path.
        let vip = route_all_to(lab, server)?;
        let target = Target {
            name: "mesh-l7",
            path,
            url: format!("http://{vip}/bytes/{}", args.body),
            iperf: None,
            proxies: l7_proxies,
            origin: Origin::ClientPod,
            oha_args: Vec::new(),
        };
        scenarios.push(measure_scenario(lab, tools, args, d, &target)?);
        lab.delete(Path::new(L7_CONFIG))?;
    }
    scenarios.extend(pod_address_phase(lab, tools, args, d)?);
    scenarios.extend(tracing_phase(lab, tools, args, d)?);
    // The ingress path through the mesh's gateway: TLS there, HBONE to myapp-v1.
    route_ingress_to(lab, SERVER_CROSS)?;
    let mut proxies = vec![lab.cgroup_root.join(&lab.pod(GATEWAY_POD)?.cgroup)];
    proxies.push(agent_cgroup(lab, &lab.pod(SERVER_CROSS)?.node)?);
    let target = Target {
        name: "gateway",
        path: INGRESS,
        url: format!("https://{INGRESS_HOST}/bytes/{}", args.body),
        iperf: None,
        proxies,
        origin: Origin::Outside,
        oha_args: gateway_oha_args(lab)?,
    };
    scenarios.push(measure_scenario(lab, tools, args, d, &target)?);
    lab.delete(Path::new(INGRESS_CONFIG))?;
    Ok(scenarios)
}

/// The path name of the ingress scenarios.
const INGRESS: &str = "ingress";
/// The host the ingress scenarios ask for (the lab gateway Secret's certificate names it).
const INGRESS_HOST: &str = "myapp.example.com";
/// The lab's ingress gateway pod.
const GATEWAY_POD: &str = "istio-ingressgateway";
/// File name of the gateway scenario's config in the agents' config directory.
const INGRESS_CONFIG: &str = "bench-ingress.yaml";

/// oha's arguments to reach [`INGRESS_HOST`] at the lab's gateway pod, trusting the
/// lab's edge CA.
fn gateway_oha_args(lab: &Lab) -> anyhow::Result<Vec<String>> {
    let ca = lab.edge_ca_path().display().to_string();
    let gateway_ip = lab.pod(GATEWAY_POD)?.ip;
    Ok(vec!["--cacert".into(), ca, "--connect-to".into(), format!("{INGRESS_HOST}:443:{gateway_ip}:443")])
}

/// Applies a Gateway on the lab's ingress gateway and a VirtualService bound to it that
/// sends every request to `server` (through a DestinationRule subset); waits until the
/// gateway answers from `server`.
fn route_ingress_to(lab: &Lab, server: &str) -> anyhow::Result<()> {
    let subset = lab.pod(server)?.labels.get("version").cloned().context("server pod has a version label")?;
    let yaml = format!(
        "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {{name: bench-ingress, namespace: production}}\n\
         spec:\n  selector: {{istio: ingressgateway}}\n  servers:\n  - port: {{number: 443, name: https, protocol: HTTPS}}\n\
         \x20   hosts: [{INGRESS_HOST}]\n    tls: {{mode: SIMPLE, credentialName: {secret}}}\n---\n\
         apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: bench-ingress, namespace: production}}\n\
         spec:\n  host: myapp\n  subsets: [{{name: {subset}, labels: {{version: {subset}}}}}]\n---\n\
         apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: bench-ingress, namespace: production}}\n\
         spec:\n  hosts: [{INGRESS_HOST}]\n  gateways: [bench-ingress]\n  http:\n\
         \x20 - route: [{{destination: {{host: myapp, subset: {subset}, port: {{number: 80}}}}}}]\n",
        secret = mesh_tests::lab::GATEWAY_SECRET,
    );
    let dir = lab.state_dir.join("bench");
    std::fs::create_dir_all(&dir)?;
    let file = dir.join(INGRESS_CONFIG);
    std::fs::write(&file, yaml)?;
    lab.apply(&file)?;
    let ca = lab.edge_ca_path().display().to_string();
    let gateway_ip = lab.pod(GATEWAY_POD)?.ip;
    let resolve = format!("{INGRESS_HOST}:443:{gateway_ip}");
    let url = format!("https://{INGRESS_HOST}/probe");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let argv = [
            "ip",
            "netns",
            "exec",
            CLIENT_NETNS,
            "curl",
            "-s",
            "-m",
            "2",
            "--cacert",
            &ca,
            "--resolve",
            &resolve,
            &url,
        ];
        let body = mesh_tests::sys::output(&argv).map(|o| String::from_utf8_lossy(&o.stdout).into_owned())?;
        if body.contains(&format!("\"pod\":\"{server}\"")) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the ingress gateway does not route {INGRESS_HOST} to {server} after 20 s: {body}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// What one scenario sends its load to, and which proxies it charges.
struct Target {
    name: &'static str,
    path: &'static str,
    url: String,
    /// iperf3 server (host, port); `None` where throughput is not an L7 figure.
    iperf: Option<(String, u16)>,
    /// cgroups of the proxies on the path.
    proxies: Vec<PathBuf>,
    /// Where the load comes from.
    origin: Origin,
    /// More oha arguments (CA, address override).
    oha_args: Vec<String>,
}

impl Target {
    /// From the client pod straight to a server pod's port 8080 at `ip` (iperf3 too),
    /// through `proxies`.
    fn to_pod(name: &'static str, path: &'static str, ip: &str, body: usize, proxies: Vec<PathBuf>) -> Self {
        Target {
            name,
            path,
            url: format!("http://{ip}:8080/bytes/{body}"),
            iperf: Some((ip.to_string(), IPERF_PORT)),
            proxies,
            origin: Origin::ClientPod,
            oha_args: Vec::new(),
        }
    }
}

/// Where a scenario's load comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    /// The client pod (captured by the mesh when enrolled).
    ClientPod,
    /// The outside client's netns, as a user of an ingress is.
    Outside,
}

/// The node agents on the path from the client pod to `server`: one same-node, two
/// cross-node.
fn path_agents(lab: &Lab, server: &str) -> anyhow::Result<Vec<PathBuf>> {
    let client_node = &lab.pod(CLIENT)?.node;
    let server_node = &lab.pod(server)?.node;
    let mut agents = vec![agent_cgroup(lab, client_node)?];
    if server_node != client_node {
        agents.push(agent_cgroup(lab, server_node)?);
    }
    Ok(agents)
}

fn agent_cgroup(lab: &Lab, node: &str) -> anyhow::Result<PathBuf> {
    Ok(lab.cgroup_root.join(&lab.node(node)?.agent_cgroup))
}

fn measure_scenario(lab: &Lab, tools: &Tools, args: &BenchArgs, d: Durations, t: &Target) -> anyhow::Result<Scenario> {
    println!("[bench] {} ({}): {}", t.name, t.path, t.url);
    // Warm up: connections, pools, certificates, caches.
    let oha = |extra: &[&str]| {
        let mut all: Vec<&str> = t.oha_args.iter().map(String::as_str).collect();
        all.extend(extra);
        oha(lab, tools, t.origin, &t.url, &all)
    };
    oha(&["-n", "200", "-c", "4"])?;
    std::thread::sleep(Duration::from_millis(300));
    let rss_idle = rss_mib(&t.proxies)?;

    let cpu_before = cpu_usec(&t.proxies)?;
    let secs = format!("{}s", d.latency.as_secs());
    let rate = args.rate.to_string();
    let conns = LATENCY_CONNECTIONS.to_string();
    let (fixed, rss_load) =
        sample_rss_while(&t.proxies, || oha(&["-z", &secs, "-q", &rate, "-c", &conns, "--latency-correction"]))?;
    let cpu_used = cpu_usec(&t.proxies)? - cpu_before;
    let latency = Latency::from_oha(&fixed)?;

    let max = oha(&["-z", &format!("{}s", d.max_rps.as_secs()), "-c", &args.concurrency.to_string()])?;
    let max_rps = max["summary"]["requestsPerSec"].as_f64().context("oha: summary.requestsPerSec")?;

    let throughput = match &t.iperf {
        Some((host, port)) => Some(iperf(lab, tools, host, *port, d.iperf)?),
        None => None,
    };
    let cpu_per_1000 = (!t.proxies.is_empty() && latency.requests > 0)
        .then(|| cpu_used as f64 / 1e6 / (latency.requests as f64 / 1000.0));
    Ok(Scenario {
        name: t.name.into(),
        path: t.path.into(),
        status: "ok".into(),
        reason: None,
        latency: Some(latency),
        max_rps: Some(max_rps),
        throughput_gbps: throughput,
        proxies: t.proxies.len(),
        proxy_rss_idle_mib: (!t.proxies.is_empty()).then_some(rss_idle),
        proxy_rss_load_mib: (!t.proxies.is_empty()).then_some(rss_load),
        proxy_cpu_s_per_1000_req: cpu_per_1000,
        ratio_to_direct: None,
        ratio_to_peer: None,
        added_p99_ms_vs_direct: None,
        added_p99_within_noise: None,
        rounds: 1,
        round_p99_ms: Vec::new(),
        server_saw_peer: server_saw_peer(lab, t),
    })
}

/// Whom the server application saw as the peer of one request of `t` (the echo app
/// answers `/` with the peer it accepted): for scenarios from the client pod.
fn server_saw_peer(lab: &Lab, t: &Target) -> Option<String> {
    if !matches!(t.origin, Origin::ClientPod) {
        return None;
    }
    let base = t.url.split("/bytes/").next()?;
    let out = lab.exec(CLIENT, &["curl", "-s", "-m", "5", &format!("{base}/")]).ok()?;
    let reply: Value = serde_json::from_slice(&out.stdout).ok()?;
    let peer: std::net::SocketAddr = reply["peer"].as_str()?.parse().ok()?;
    let server = reply["pod"].as_str().and_then(|pod| lab.pod(pod).ok()).map(|p| std::net::IpAddr::V4(p.ip));
    let seen = peer.ip().to_canonical();
    Some(
        if seen == std::net::IpAddr::V4(lab.pod(CLIENT).ok()?.ip) {
            "client"
        } else if Some(seen) == server {
            "server"
        } else if seen.is_loopback() {
            "loopback"
        } else {
            "other"
        }
        .into(),
    )
}

/// Runs oha in the client pod (inside its netns and cgroup, so the mesh captures it when
/// enrolled) or in the outside client's netns, and returns its JSON summary; fails if
/// any request failed.
fn oha(lab: &Lab, tools: &Tools, origin: Origin, url: &str, extra: &[&str]) -> anyhow::Result<Value> {
    let mut argv: Vec<String> =
        vec![tools.oha.display().to_string(), "--no-tui".into(), "--output-format".into(), "json".into()];
    argv.extend(extra.iter().map(|s| s.to_string()));
    argv.push(url.into());
    let mut command = match origin {
        Origin::ClientPod => lab.pod_command(CLIENT, &argv)?,
        Origin::Outside => {
            let mut c = std::process::Command::new("ip");
            c.args(["netns", "exec", CLIENT_NETNS]).args(&argv);
            c
        }
    };
    let out = command.stdin(Stdio::null()).output().context("running oha")?;
    if !out.status.success() {
        bail!("oha {url} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    let v: Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("oha output is not JSON: {}", String::from_utf8_lossy(&out.stdout)))?;
    let ok = v["summary"]["successRate"].as_f64().unwrap_or(0.0);
    if ok < 1.0 {
        bail!("{url}: only {:.2}% of requests succeeded: {}", ok * 100.0, v["errorDistribution"]);
    }
    let codes = v["statusCodeDistribution"].as_object().context("oha: statusCodeDistribution")?;
    if codes.keys().any(|c| c != "200") {
        bail!("{url}: non-200 answers: {}", v["statusCodeDistribution"]);
    }
    Ok(v)
}

/// iperf3 from the client pod for `time`; received Gbit/s.
fn iperf(lab: &Lab, tools: &Tools, host: &str, port: u16, time: Duration) -> anyhow::Result<f64> {
    let argv: Vec<String> = [
        tools.iperf3.display().to_string(),
        "-c".into(),
        host.into(),
        "-p".into(),
        port.to_string(),
        "-t".into(),
        time.as_secs().max(1).to_string(),
        "-J".into(),
    ]
    .into();
    let out = lab.pod_command(CLIENT, &argv)?.stdin(Stdio::null()).output().context("running iperf3")?;
    let v: Value = serde_json::from_slice(&out.stdout).context("iperf3 output is not JSON")?;
    if let Some(e) = v["error"].as_str() {
        bail!("iperf3 to {host}:{port}: {e}");
    }
    let bps = v["end"]["sum_received"]["bits_per_second"].as_f64().context("iperf3: end.sum_received")?;
    Ok(bps / 1e9)
}

fn rss_mib(cgroups: &[PathBuf]) -> anyhow::Result<f64> {
    let mut total = 0;
    for cg in cgroups {
        total += measure::cgroup_rss_bytes(cg)?;
    }
    Ok(total as f64 / (1024.0 * 1024.0))
}

fn cpu_usec(cgroups: &[PathBuf]) -> anyhow::Result<u64> {
    cgroups.iter().map(|cg| measure::cgroup_cpu_usec(cg)).sum()
}

/// Runs `f` on this thread while another samples the proxies' RSS; returns f's result and
/// the peak RSS seen, in MiB.
fn sample_rss_while<T>(cgroups: &[PathBuf], f: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<(T, f64)> {
    let (r, peaks) = peaks_while(1, Duration::from_millis(200), |_| rss_mib(cgroups).unwrap_or(0.0), f);
    r.map(|v| (v, peaks[0]))
}

/// Runs `f` on this thread while another reads `sample(i)` for each `i` in `0..n`
/// every `period`; returns f's result and each sample's peak.
fn peaks_while<T>(
    n: usize,
    period: Duration,
    sample: impl Fn(usize) -> f64 + Sync,
    f: impl FnOnce() -> T,
) -> (T, Vec<f64>) {
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        let sampler = s.spawn(|| {
            let mut peaks = vec![0.0f64; n];
            while !stop.load(std::sync::atomic::Ordering::Acquire) {
                for (i, peak) in peaks.iter_mut().enumerate() {
                    *peak = peak.max(sample(i));
                }
                std::thread::sleep(period);
            }
            peaks
        });
        let r = f();
        stop.store(true, std::sync::atomic::Ordering::Release);
        (r, sampler.join().expect("the sampler does not panic"))
    })
}

/// File name of the mesh-l7 scenario's config in the agents' config directory.
const L7_CONFIG: &str = "bench-l7.yaml";

/// Applies a DestinationRule with `server`'s subset (its `version` label) and a
/// VirtualService sending every request for `myapp` there; waits until requests on
/// fresh connections all reach `server`. Returns the Service VIP.
fn route_all_to(lab: &Lab, server: &str) -> anyhow::Result<String> {
    let subset = lab.pod(server)?.labels.get("version").cloned().context("server pod has a version label")?;
    let yaml = format!(
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: bench-myapp, namespace: production}}\n\
         spec:\n  host: myapp\n  subsets: [{{name: {subset}, labels: {{version: {subset}}}}}]\n---\n\
         apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: bench-myapp, namespace: production}}\n\
         spec:\n  hosts: [myapp]\n  http:\n  - route: [{{destination: {{host: myapp, subset: {subset}}}}}]\n"
    );
    let dir = lab.state_dir.join("bench");
    std::fs::create_dir_all(&dir)?;
    let file = dir.join(L7_CONFIG);
    std::fs::write(&file, yaml)?;
    lab.apply(&file)?;
    let vip = lab.services.get("production/myapp").map(|(_, ip)| ip.clone()).context("lab has no myapp Service")?;
    let url = format!("http://{vip}/probe?i=[1-6]");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = lab.exec(CLIENT, &["curl", "-s", "-m", "2", "-H", "connection: close", &url])?;
        let body = String::from_utf8_lossy(&out.stdout);
        if body.matches(&format!("\"pod\":\"{server}\"")).count() == 6 {
            return Ok(vip);
        }
        if Instant::now() > deadline {
            bail!("VirtualService for the mesh-l7 scenario not in force after 20 s");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Applies a Telemetry that turns the request metrics off at `server`'s agent (so it
/// splices the pod's traffic), and waits until a request to the pod is no longer
/// counted there. Returns the file to delete afterwards.
fn splice_at_destination(lab: &Lab, server: &str) -> anyhow::Result<PathBuf> {
    let pod = lab.pod(server)?;
    let version = pod.labels.get("version").context("server pod has a version label")?;
    let yaml = format!(
        "apiVersion: telemetry.istio.io/v1\nkind: Telemetry\nmetadata: {{name: bench-splice, namespace: production}}\n\
         spec:\n  selector: {{matchLabels: {{version: {version}}}}}\n  metrics:\n  - overrides:\n\
         {}",
        ["REQUEST_COUNT", "REQUEST_DURATION", "REQUEST_SIZE", "RESPONSE_SIZE"]
            .map(|m| format!("    - {{match: {{metric: {m}, mode: SERVER}}, disabled: true}}\n"))
            .concat()
    );
    let dir = lab.state_dir.join("bench");
    std::fs::create_dir_all(&dir)?;
    let file = dir.join(TELEMETRY_CONFIG);
    std::fs::write(&file, yaml)?;
    lab.apply(&file)?;
    let counted = || -> u64 {
        mesh_tests::harness::metrics(lab, &pod.node)
            .lines()
            .filter(|l| {
                l.starts_with("istio_requests_total{reporter=\"destination\"")
                    && l.contains(&format!("destination_workload=\"{server}\""))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    };
    let url = format!("http://{}:8080/probe", pod.ip);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let before = counted();
        lab.exec(CLIENT, &["curl", "-s", "-m", "2", "-o", "/dev/null", &url])?;
        if counted() == before {
            return Ok(file);
        }
        if Instant::now() > deadline {
            bail!("the Telemetry for the mesh-l4-tcp scenario not in force after 20 s");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `mesh-l4` with the agents restarted under `--inbound-transparent off`: deliveries
/// come from the server pod's own address instead of the client's, so `mesh-l4` against
/// it is what showing the application its client costs.
fn pod_address_phase(lab: &mut Lab, tools: &Tools, args: &BenchArgs, d: Durations) -> anyhow::Result<Vec<Scenario>> {
    let saved = lab.agent_env.clone();
    lab.agent_env.insert("MESH_INBOUND_TRANSPARENT".into(), "off".into());
    let measured = restart_agents(lab).and_then(|()| {
        let mut scenarios = Vec::new();
        for (path, server) in [("cross-node", SERVER_CROSS), ("same-node", SERVER_SAME)] {
            let ip = lab.pod(server)?.ip;
            let proxies = path_agents(lab, server)?;
            let target = Target::to_pod("mesh-l4-podaddr", path, &ip.to_string(), args.body, proxies);
            scenarios.push(measure_scenario(lab, tools, args, d, &target)?);
        }
        Ok(scenarios)
    });
    lab.agent_env = saved;
    restart_agents(lab)?;
    measured
}

/// The tracing scenarios' names and their sampling percentages.
const TRACED: [(&str, u32); 2] = [("mesh-l7-trace1", 1), ("mesh-l7-trace100", 100)];

/// `mesh-l7` with tracing on at each of [`TRACED`]'s samplings: the agents restarted
/// with an OTLP endpoint (the `outside` pod's HTTP server, which answers the exports
/// 200) and the sampling, measured, then restarted as they were. A phase that cannot
/// trace reports its scenarios skipped with why (the other figures stand).
fn tracing_phase(lab: &mut Lab, tools: &Tools, args: &BenchArgs, d: Durations) -> anyhow::Result<Vec<Scenario>> {
    let saved = lab.agent_env.clone();
    let measured = traced_scenarios(lab, tools, args, d);
    lab.agent_env = saved;
    restart_agents(lab)?;
    Ok(measured.unwrap_or_else(|e| {
        println!("[bench] tracing scenarios skipped: {e:#}");
        TRACED
            .iter()
            .flat_map(|(name, _)| {
                ["cross-node", "same-node"].map(|path| Scenario::skipped(name, path, &format!("{e:#}")))
            })
            .collect()
    }))
}

fn traced_scenarios(lab: &mut Lab, tools: &Tools, args: &BenchArgs, d: Durations) -> anyhow::Result<Vec<Scenario>> {
    let collector = format!("http://{}:8080/v1/traces", lab.pod("outside")?.ip);
    let mut scenarios = Vec::new();
    for (name, sampling) in TRACED {
        lab.agent_env.insert("MESH_TRACE_ENDPOINT".into(), collector.clone());
        lab.agent_env.insert("MESH_TRACE_SAMPLING".into(), sampling.to_string());
        restart_agents(lab)?;
        let exported_before = spans_exported(lab);
        for (path, server) in [("cross-node", SERVER_CROSS), ("same-node", SERVER_SAME)] {
            let proxies = path_agents(lab, server)?;
            let vip = route_all_to(lab, server)?;
            let target = Target {
                name,
                path,
                url: format!("http://{vip}/bytes/{}", args.body),
                iperf: None,
                proxies,
                origin: Origin::ClientPod,
                oha_args: Vec::new(),
            };
            scenarios.push(measure_scenario(lab, tools, args, d, &target)?);
            lab.delete(Path::new(L7_CONFIG))?;
        }
        // The spans were made and reached the collector: the figures are tracing's.
        let exported = spans_exported(lab) - exported_before;
        if exported == 0 {
            bail!("no span reached the collector at {collector} ({sampling}% sampling)");
        }
        println!("[bench] {name}: {exported} spans exported");
    }
    Ok(scenarios)
}

/// Spans the node agents' exporters had accepted by the collector.
fn spans_exported(lab: &Lab) -> u64 {
    lab.nodes
        .iter()
        .map(|n| mesh_tests::harness::metrics(lab, &n.name))
        .flat_map(|m| {
            m.lines()
                .filter(|l| l.starts_with("istio_mesh_spans_exported_total"))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
                .collect::<Vec<_>>()
        })
        .sum()
}

/// Restarts every node agent with the lab's current `agent_env` (pods stay captured:
/// the kernel's maps are pinned).
fn restart_agents(lab: &mut Lab) -> anyhow::Result<()> {
    let nodes: Vec<String> = lab.nodes.iter().map(|n| n.name.clone()).collect();
    for node in nodes {
        lab.stop_agent(&node, "TERM")?;
        lab.start_agent(&node)?;
    }
    Ok(())
}

/// File name of the mesh-l4-tcp scenario's Telemetry in the agents' config directory.
const TELEMETRY_CONFIG: &str = "bench-telemetry.yaml";

/// Enrolls or unenrolls the `production` namespace by rewriting the lab's namespaces
/// file, then waits until every agent has caught up.
fn set_enrollment(lab: &Lab, enrolled: bool) -> anyhow::Result<()> {
    let original = root().join("examples/lab/namespaces.yaml");
    let file = if enrolled {
        original
    } else {
        let text = std::fs::read_to_string(&original)?;
        let unlabelled = text.replace("  labels:\n    istio-injection: enabled\n", "");
        if unlabelled == text {
            bail!("{}: expected the production namespace's istio-injection label", original.display());
        }
        let dir = lab.state_dir.join("bench");
        std::fs::create_dir_all(&dir)?;
        let f = dir.join("namespaces.yaml");
        std::fs::write(&f, unlabelled)?;
        f
    };
    lab.apply(&file)?;
    let want: usize = if enrolled { lab.pods.iter().filter(|p| p.namespace == "production").count() } else { 0 };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut total = 0;
        for n in &lab.nodes {
            total += enrolled_pods(&n.netns)?;
        }
        if total == want {
            println!("[bench] {} pods enrolled", total);
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("agents report {total} enrolled pods, expected {want}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `mesh_enrolled_pods` from the agent in `netns` (its admin address: on the node, no
/// scraper token needed).
fn enrolled_pods(netns: &str) -> anyhow::Result<usize> {
    let text = mesh_tests::sys::run(&["ip", "netns", "exec", netns, "curl", "-sf", "http://127.0.0.1:15000/metrics"])?;
    text.lines()
        .find(|l| l.contains("mesh_enrolled_pods ") && !l.starts_with('#'))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .context("agent metrics have no mesh_enrolled_pods")
}

/// Absolute path of a report path given on the command line (relative to the repository).
pub fn report_path(p: &Path) -> PathBuf {
    if p.is_absolute() { p.to_path_buf() } else { root().join(p) }
}

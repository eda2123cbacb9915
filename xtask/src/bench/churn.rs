//! `cargo xtask bench --churn DURATION`: new connections at a fixed rate (one HTTP
//! request each, no keep-alive) from frontend to myapp-v1's address, across the tunnel:
//! node1's agent takes each one outbound, node2's admits it inbound. In 10-s windows it
//! samples both agents' anonymous memory, descriptors and CPU time. It reports the CPU
//! each agent spends per 1,000 new connections, and fails when a connection failed or
//! when, after the load, an agent's descriptors or memory did not come back to where
//! they were before it. Writes `target/bench/churn.json`; a run of 10 minutes or more
//! also writes its result into docs/benchmarks.md (between the churn markers).

use std::fmt::Write as _;
use std::process::Child;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use mesh_tests::lab::Lab;
use mesh_tests::measure::ResidentMemory;
use serde::Serialize;

use super::soak::{WINDOW, chrono_free_date, window_result};
use super::{BenchArgs, CLIENT, SERVER_CROSS, Tools};
use crate::root;

/// Concurrent requests of the load generator: enough to hold the rate at a few ms each.
const CONCURRENCY: &str = "32";
/// Runs at least this long write their result into the docs.
const DOCUMENTED: Duration = Duration::from_secs(600);
/// After the load, how long the agents get to let go (their heap trimmer looks every
/// 2 s) before the last sample.
const SETTLE: Duration = Duration::from_secs(15);
/// What "back where it was" allows an agent's anonymous memory: 5% or 1 MiB over the
/// baseline, whichever is more (allocator caches and maps grown by the burst).
const MEMORY_SLACK: (f64, u64) = (0.05, 1024);
/// Descriptors over the baseline allowed after the load (a pooled tunnel opened since).
const FD_SLACK: usize = 2;

/// Both agents at one moment.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct AgentSample {
    /// `RssAnon` of node1's and node2's agent, KiB.
    pub rss_anon_kib: [u64; 2],
    /// Heap bytes allocated and not freed (the agents' `istio_mesh_heap_in_use_bytes`),
    /// KiB: anonymous memory above it is what the allocator keeps.
    pub heap_in_use_kib: [u64; 2],
    /// Open descriptors.
    pub fds: [usize; 2],
    /// User and system CPU time since the agent started, s.
    pub cpu_s: [f64; 2],
}

/// One window of load.
#[derive(Debug, Clone, Serialize)]
pub struct Window {
    /// Seconds since the load started, at the end of the window.
    pub at_s: u64,
    /// The agents after the window.
    pub agents: AgentSample,
    /// Connections (requests) answered 200.
    pub ok: u64,
    /// Connections that failed or were answered otherwise.
    pub failed: u64,
    /// p99 of connect plus request, ms.
    pub p99_ms: f64,
}

/// What `churn.json` holds.
#[derive(Debug, Serialize)]
pub struct ChurnReport {
    /// Asked duration, seconds.
    pub duration_s: u64,
    /// New connections per second asked for.
    pub rate: u32,
    /// The agents before the load (after a warm-up window).
    pub before: AgentSample,
    /// Every window.
    pub windows: Vec<Window>,
    /// The agents [`SETTLE`] after the load.
    pub after: AgentSample,
    /// Connections answered.
    pub ok: u64,
    /// Connections that failed.
    pub failed: u64,
    /// CPU seconds of node1's (source) and node2's (destination) agent per 1,000 new
    /// connections.
    pub cpu_s_per_1000: [f64; 2],
    /// Connections per second achieved.
    pub achieved_rate: f64,
}

/// Runs the churn in `lab` for `duration`.
pub fn run(lab: &mut Lab, args: &BenchArgs, duration: Duration) -> anyhow::Result<ChurnReport> {
    let tools = Tools::find()?;
    let v1 = lab.pod(SERVER_CROSS)?.ip;
    let url = format!("http://{v1}:8080/bytes/{}", args.body);
    let pids = [super::soak::agent_pid(lab, "node1")?, super::soak::agent_pid(lab, "node2")?];
    // A thousand connections a second leave a thousand sockets a second in TIME_WAIT
    // for a minute at whichever end closes first: more than the default ephemeral range.
    // The client and server pods are tuned as any such load generator must be.
    for pod in [CLIENT, SERVER_CROSS] {
        let tune =
            "echo 1 > /proc/sys/net/ipv4/tcp_tw_reuse && echo '1024 65000' > /proc/sys/net/ipv4/ip_local_port_range";
        let out = lab.exec(pod, &["sh", "-c", tune])?;
        if !out.status.success() {
            bail!("tuning {pod}'s TCP: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
    println!(
        "[churn] {} s of {} new connections/s to {url} (frontend -> node1 -> node2 -> myapp-v1)",
        duration.as_secs(),
        args.rate
    );
    // One window to open the pools and fill the caches, then the baseline.
    window_result(spawn_churn(lab, &tools, &url, args.rate)?)?;
    std::thread::sleep(SETTLE);
    let before = sample(lab, pids)?;
    println!("[churn] before: {}", describe(&before));
    let started = Instant::now();
    let mut windows = Vec::new();
    while started.elapsed() + WINDOW <= duration + Duration::from_secs(1) {
        let (p99_ms, ok, failed) = window_result(spawn_churn(lab, &tools, &url, args.rate)?)?;
        let window = Window { at_s: started.elapsed().as_secs(), agents: sample(lab, pids)?, ok, failed, p99_ms };
        println!(
            "[churn] {:>5} s  {}  ok {}  failed {}  p99 {:.2} ms",
            window.at_s,
            describe(&window.agents),
            ok,
            failed,
            p99_ms
        );
        windows.push(window);
    }
    let elapsed = started.elapsed();
    std::thread::sleep(SETTLE);
    let after = sample(lab, pids)?;
    println!("[churn] after ({} s settled): {}", SETTLE.as_secs(), describe(&after));
    let report = verdict(duration, args.rate, before, windows, after, elapsed);
    let dir = root().join("target/bench");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("churn.json"), serde_json::to_string_pretty(&report)?)?;
    println!(
        "[churn] wrote target/bench/churn.json: {} connections ({:.0}/s), {} failed; CPU per 1,000: node1 {:.3} s, node2 {:.3} s",
        report.ok + report.failed,
        report.achieved_rate,
        report.failed,
        report.cpu_s_per_1000[0],
        report.cpu_s_per_1000[1]
    );
    if duration >= DOCUMENTED {
        document(&report)?;
    }
    let problems = report.problems();
    if !problems.is_empty() {
        bail!("churn failed: {}", problems.join("; "));
    }
    println!("[churn] passed: no connection failed, descriptors and memory back where they were");
    Ok(report)
}

/// One window of new connections: oha without keep-alive.
fn spawn_churn(lab: &Lab, tools: &Tools, url: &str, rate: u32) -> anyhow::Result<Child> {
    super::soak::spawn_oha(lab, tools, url, (rate, CONCURRENCY), &["--disable-keepalive"])
}

/// Both agents' anonymous memory, descriptors and CPU time now.
fn sample(lab: &Lab, pids: [u32; 2]) -> anyhow::Result<AgentSample> {
    let mut s = AgentSample { rss_anon_kib: [0; 2], heap_in_use_kib: [0; 2], fds: [0; 2], cpu_s: [0.0; 2] };
    for (i, pid) in pids.iter().enumerate() {
        s.heap_in_use_kib[i] = heap_in_use_kib(lab, ["node1", "node2"][i]);
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).context("an agent exited")?;
        s.rss_anon_kib[i] = ResidentMemory::parse(&status).map_or(0, |m| m.rss_anon_kib);
        s.fds[i] = std::fs::read_dir(format!("/proc/{pid}/fd"))?.count();
        s.cpu_s[i] = cpu_seconds(&std::fs::read_to_string(format!("/proc/{pid}/stat"))?)?;
    }
    Ok(s)
}

/// What `node`'s agent says its heap holds, KiB (0 if it does not say).
fn heap_in_use_kib(lab: &Lab, node: &str) -> u64 {
    let metrics = mesh_tests::harness::metrics(lab, node);
    let line = metrics.lines().find(|l| l.starts_with("istio_mesh_heap_in_use_bytes "));
    line.and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok()).map_or(0, |b| (b / 1024.0) as u64)
}

/// User plus system time of a process from its `/proc/<pid>/stat`, seconds (clock
/// ticks of 1/100 s, as Linux reports them to user space).
fn cpu_seconds(stat: &str) -> anyhow::Result<f64> {
    // The command name (field 2) may hold spaces; fields count from after its `)`.
    let rest = stat.rsplit_once(')').context("unreadable /proc stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> anyhow::Result<u64> { Ok(fields.get(i).context("short /proc stat")?.parse()?) };
    // utime and stime are fields 14 and 15, the 12th and 13th after the name.
    Ok((ticks(11)? + ticks(12)?) as f64 / 100.0)
}

fn describe(s: &AgentSample) -> String {
    format!(
        "anon {} / {} KiB  heap {} / {} KiB  fds {} / {}  cpu {:.1} / {:.1} s",
        s.rss_anon_kib[0],
        s.rss_anon_kib[1],
        s.heap_in_use_kib[0],
        s.heap_in_use_kib[1],
        s.fds[0],
        s.fds[1],
        s.cpu_s[0],
        s.cpu_s[1]
    )
}

fn verdict(
    duration: Duration,
    rate: u32,
    before: AgentSample,
    windows: Vec<Window>,
    after: AgentSample,
    elapsed: Duration,
) -> ChurnReport {
    let ok: u64 = windows.iter().map(|w| w.ok).sum();
    let failed: u64 = windows.iter().map(|w| w.failed).sum();
    let end = windows.last().map_or(before, |w| w.agents);
    let thousands = (ok + failed) as f64 / 1000.0;
    let cpu_s_per_1000 =
        [0, 1].map(|i| if thousands > 0.0 { (end.cpu_s[i] - before.cpu_s[i]) / thousands } else { 0.0 });
    let achieved_rate = (ok + failed) as f64 / elapsed.as_secs_f64().max(1.0);
    ChurnReport {
        duration_s: duration.as_secs(),
        rate,
        before,
        windows,
        after,
        ok,
        failed,
        cpu_s_per_1000,
        achieved_rate,
    }
}

impl ChurnReport {
    /// What failed the run, each said in a sentence; empty when it passed.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.failed > 0 {
            problems.push(format!("{} of {} connections failed", self.failed, self.ok + self.failed));
        }
        for (i, node) in ["node1", "node2"].iter().enumerate() {
            let (fds_before, fds_after) = (self.before.fds[i], self.after.fds[i]);
            if fds_after > fds_before + FD_SLACK {
                problems
                    .push(format!("{node}'s agent holds {fds_after} descriptors after the load, {fds_before} before"));
            }
            let (base, now) = (self.before.rss_anon_kib[i], self.after.rss_anon_kib[i]);
            let allowed = base + ((base as f64 * MEMORY_SLACK.0) as u64).max(MEMORY_SLACK.1);
            if now > allowed {
                problems.push(format!(
                    "{node}'s agent holds {now} KiB of anonymous memory after the load, {base} before (at most {allowed})"
                ));
            }
        }
        problems
    }
}

/// Writes the result between the churn markers of docs/benchmarks.md.
fn document(r: &ChurnReport) -> anyhow::Result<()> {
    const BEGIN: &str = "<!-- churn:begin -->";
    const END: &str = "<!-- churn:end -->";
    let path = root().join("docs/benchmarks.md");
    let text = std::fs::read_to_string(&path)?;
    let peak = |i: usize| r.windows.iter().map(|w| w.agents.rss_anon_kib[i]).max().unwrap_or(0);
    let peak_fds = |i: usize| r.windows.iter().map(|w| w.agents.fds[i]).max().unwrap_or(0);
    let mut section = String::new();
    let _ = writeln!(section, "{BEGIN}");
    let _ = writeln!(
        section,
        "`cargo xtask bench --churn {}s` ({}, release build): {} new connections/s asked, {:.0}/s achieved, one\n\
         HTTP request each without keep-alive (oha, {CONCURRENCY} at a time) from frontend to myapp-v1's address across\n\
         the tunnel. {} connections, {} failed.\n\n\
         | | node1 (source) | node2 (destination) |\n|---|---|---|\n\
         | CPU per 1,000 new connections | {:.3} s | {:.3} s |\n\
         | anonymous memory before / peak / {} s after | {} / {} / {} KiB | {} / {} / {} KiB |\n\
         | descriptors before / peak / after | {} / {} / {} | {} / {} / {} |",
        r.duration_s,
        chrono_free_date(),
        r.rate,
        r.achieved_rate,
        r.ok + r.failed,
        r.failed,
        r.cpu_s_per_1000[0],
        r.cpu_s_per_1000[1],
        SETTLE.as_secs(),
        r.before.rss_anon_kib[0],
        peak(0),
        r.after.rss_anon_kib[0],
        r.before.rss_anon_kib[1],
        peak(1),
        r.after.rss_anon_kib[1],
        r.before.fds[0],
        peak_fds(0),
        r.after.fds[0],
        r.before.fds[1],
        peak_fds(1),
        r.after.fds[1],
    );
    let _ = writeln!(section, "{END}");
    let text = super::soak::between_markers(&text, (BEGIN, END), &section, "\n\n### Connection churn\n\n");
    std::fs::write(&path, text)?;
    println!("[churn] wrote the result into docs/benchmarks.md");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agents(anon: u64, fds: usize, cpu: f64) -> AgentSample {
        AgentSample {
            rss_anon_kib: [anon, anon],
            heap_in_use_kib: [anon / 2, anon / 2],
            fds: [fds, fds],
            cpu_s: [cpu, cpu / 2.0],
        }
    }

    #[test]
    fn cpu_time_is_read_past_a_command_name_with_spaces() {
        let stat = "1234 (mesh agent) S 1 1234 1234 0 -1 4194560 500 0 0 0 250 125 0 0 20 0 8 0 100 0 0";
        assert!((cpu_seconds(stat).unwrap() - 3.75).abs() < 1e-9);
    }

    #[test]
    fn memory_and_descriptors_must_come_back_and_cpu_is_charged_per_thousand() {
        let window = |cpu| Window { at_s: 10, agents: agents(9000, 80, cpu), ok: 10_000, failed: 0, p99_ms: 2.0 };
        let r = verdict(
            Duration::from_secs(20),
            1000,
            agents(5000, 70, 1.0),
            vec![window(3.0), window(5.0)],
            agents(5200, 71, 5.0),
            Duration::from_secs(20),
        );
        assert!(r.problems().is_empty(), "{:?}", r.problems());
        assert!((r.cpu_s_per_1000[0] - 0.2).abs() < 1e-9, "4 s over 20,000 connections");
        assert!((r.achieved_rate - 1000.0).abs() < 1e-9);
        let kept = verdict(
            Duration::from_secs(20),
            1000,
            agents(5000, 70, 1.0),
            vec![window(3.0)],
            agents(7000, 90, 5.0),
            Duration::from_secs(10),
        );
        assert_eq!(kept.problems().len(), 4, "{:?}", kept.problems());
    }
}

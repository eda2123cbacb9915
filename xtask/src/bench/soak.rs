//! `cargo xtask bench --soak DURATION`: fixed-rate HTTP at L4 (frontend to myapp-v1's
//! address, across the tunnel) and at L7 (the myapp Service VIP with a VirtualService)
//! at once, for as long as asked, in 10-s windows. After each window it samples both
//! agents' RSS and descriptors and the window's p99 and failures. It writes
//! `target/bench/soak.json` and `target/bench/soak.svg` (RSS, descriptors and p99 over
//! time) and fails when an agent's RSS grew by more than 1% from just after warm-up to
//! the end, or a request failed. A run of an hour or more also writes its result into
//! docs/benchmarks.md (between the soak markers) and the plot to docs/soak.svg.

use std::fmt::Write as _;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use mesh_tests::lab::Lab;
use mesh_tests::measure;
use serde::Serialize;
use serde_json::Value;

use super::{BenchArgs, CLIENT, SERVER_CROSS, Tools, route_all_to};
use crate::root;

/// Length of one window: load, then a sample.
pub(super) const WINDOW: Duration = Duration::from_secs(10);
/// Keep-alive connections of each load generator.
const CONNECTIONS: &str = "16";
/// Growth of an agent's RSS past warm-up that fails the soak.
const MAX_GROWTH: f64 = 0.01;
/// Runs at least this long write their result into the docs.
const DOCUMENTED: Duration = Duration::from_secs(3600);

/// One window's figures.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    /// Seconds since the soak started, at the end of the window.
    pub at_s: u64,
    /// VmRSS of node1's and node2's agent, KiB.
    pub rss_kib: [u64; 2],
    /// Open descriptors of node1's and node2's agent.
    pub fds: [usize; 2],
    /// p99 latency at L4 and at L7, ms.
    pub p99_ms: [f64; 2],
    /// Requests answered 200 at L4 and at L7.
    pub ok: [u64; 2],
    /// Requests that failed or were answered otherwise, at L4 and at L7.
    pub failed: [u64; 2],
}

/// What `soak.json` holds.
#[derive(Debug, Serialize)]
pub struct SoakReport {
    /// Asked duration, seconds.
    pub duration_s: u64,
    /// Requests per second of each load (L4 and L7 each).
    pub rate: u32,
    /// Samples before this are warm-up.
    pub warmup_s: u64,
    /// Every window.
    pub samples: Vec<Sample>,
    /// RSS growth of each agent from just after warm-up to the end (0.01 = 1%).
    pub rss_growth: [f64; 2],
    /// Every request failed across the run.
    pub failed: u64,
    /// Every request answered.
    pub ok: u64,
}

/// Parses `90s`, `10m`, `1h`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = n.parse().map_err(|_| format!("{s:?}: expected a number and s, m or h (e.g. 1h)"))?;
    let secs = match unit {
        "s" | "" => n,
        "m" => n * 60,
        "h" => n * 3600,
        _ => return Err(format!("{s:?}: unit must be s, m or h")),
    };
    if secs < 3 * WINDOW.as_secs() {
        return Err(format!("{s:?}: a soak needs at least {} s", 3 * WINDOW.as_secs()));
    }
    Ok(Duration::from_secs(secs))
}

/// Runs the soak in `lab` for `duration`.
pub fn run(lab: &mut Lab, args: &BenchArgs, duration: Duration) -> anyhow::Result<SoakReport> {
    let tools = Tools::find()?;
    let v1 = lab.pod(SERVER_CROSS)?.ip;
    let vip = route_all_to(lab, SERVER_CROSS)?;
    let urls = [format!("http://{v1}:8080/bytes/{}", args.body), format!("http://{vip}/bytes/{}", args.body)];
    let agents = [agent_pid(lab, "node1")?, agent_pid(lab, "node2")?];
    let warmup = (duration / 5).min(Duration::from_secs(120)).max(WINDOW);
    println!(
        "[soak] {} s at {} req/s each at L4 ({}) and L7 ({}); warm-up {} s",
        duration.as_secs(),
        args.rate,
        urls[0],
        urls[1],
        warmup.as_secs()
    );
    let started = Instant::now();
    let mut samples = Vec::new();
    while started.elapsed() + WINDOW <= duration + Duration::from_secs(1) {
        let loads: Vec<Child> = urls
            .iter()
            .map(|u| spawn_oha(lab, &tools, u, (args.rate, CONNECTIONS), &["--latency-correction"]))
            .collect::<Result<_, _>>()?;
        let mut p99_ms = [0.0; 2];
        let mut ok = [0; 2];
        let mut failed = [0; 2];
        for (i, child) in loads.into_iter().enumerate() {
            (p99_ms[i], ok[i], failed[i]) = window_result(child)?;
        }
        let sample = Sample {
            at_s: started.elapsed().as_secs(),
            rss_kib: agents.map(|pid| measure::rss_bytes(pid) / 1024),
            fds: agents.map(|pid| std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, Iterator::count)),
            p99_ms,
            ok,
            failed,
        };
        println!(
            "[soak] {:>5} s  rss {} / {} KiB  fds {} / {}  p99 {:.2} / {:.2} ms  failed {}",
            sample.at_s,
            sample.rss_kib[0],
            sample.rss_kib[1],
            sample.fds[0],
            sample.fds[1],
            sample.p99_ms[0],
            sample.p99_ms[1],
            failed[0] + failed[1]
        );
        samples.push(sample);
        if agents.iter().any(|pid| !Path::new(&format!("/proc/{pid}")).exists()) {
            bail!("an agent exited during the soak");
        }
    }
    let report = verdict(duration, args.rate, warmup, samples);
    let dir = root().join("target/bench");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("soak.json"), serde_json::to_string_pretty(&report)?)?;
    let svg = plot(&report);
    std::fs::write(dir.join("soak.svg"), &svg)?;
    println!("[soak] wrote target/bench/soak.json and target/bench/soak.svg");
    if duration >= DOCUMENTED {
        document(&report, &svg)?;
    }
    if report.failed > 0 {
        bail!("{} of {} requests failed during the soak", report.failed, report.failed + report.ok);
    }
    for (node, growth) in ["node1", "node2"].iter().zip(report.rss_growth) {
        if growth > MAX_GROWTH {
            bail!(
                "the agent of {node} grew {:.2}% after warm-up (more than {:.0}%)",
                growth * 100.0,
                MAX_GROWTH * 100.0
            );
        }
    }
    println!(
        "[soak] passed: RSS growth {:.2}% / {:.2}%, 0 failed of {}",
        report.rss_growth[0] * 100.0,
        report.rss_growth[1] * 100.0,
        report.ok
    );
    Ok(report)
}

pub(super) fn agent_pid(lab: &Lab, node: &str) -> anyhow::Result<u32> {
    lab.node(node)?.agent_pid.with_context(|| format!("no agent on {node}"))
}

/// One window of oha from the client pod at `rate` requests/s over `connections`, with
/// `extra` options (as `--latency-correction` or `--disable-keepalive`).
pub(super) fn spawn_oha(
    lab: &Lab,
    tools: &Tools,
    url: &str,
    (rate, connections): (u32, &str),
    extra: &[&str],
) -> anyhow::Result<Child> {
    let mut argv: Vec<String> = [
        tools.oha.display().to_string(),
        "--no-tui".into(),
        "--output-format".into(),
        "json".into(),
        "-z".into(),
        format!("{}s", WINDOW.as_secs()),
        "-q".into(),
        rate.to_string(),
        "-c".into(),
        connections.into(),
    ]
    .into();
    argv.extend(extra.iter().map(|s| s.to_string()));
    argv.push(url.into());
    Ok(lab.pod_command(CLIENT, &argv)?.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::null()).spawn()?)
}

/// p99 (ms), requests answered 200 and the rest, of one oha window.
pub(super) fn window_result(child: Child) -> anyhow::Result<(f64, u64, u64)> {
    let out = child.wait_with_output()?;
    let v: Value = serde_json::from_slice(&out.stdout).context("oha output is not JSON")?;
    Ok(window_figures(&v))
}

/// p99 (ms), requests answered 200 and the rest, from oha's JSON summary.
fn window_figures(v: &Value) -> (f64, u64, u64) {
    let p99 = v["latencyPercentiles"]["p99"].as_f64().unwrap_or(0.0) * 1000.0;
    let codes = v["statusCodeDistribution"].as_object().cloned().unwrap_or_default();
    let ok = codes.get("200").and_then(Value::as_u64).unwrap_or(0);
    let other: u64 = codes.iter().filter(|(c, _)| *c != "200").filter_map(|(_, n)| n.as_u64()).sum();
    // A request still in flight when the window's time is up is cut by oha itself
    // ("aborted due to deadline"): the load's end, not a failure of the mesh.
    let errors: u64 = v["errorDistribution"]
        .as_object()
        .map(|e| e.iter().filter(|(why, _)| !why.contains("deadline")).filter_map(|(_, n)| n.as_u64()).sum())
        .unwrap_or(0);
    (p99, ok, other + errors)
}

/// RSS growth per agent: the median of the last three samples against the median of
/// the first three after warm-up.
fn verdict(duration: Duration, rate: u32, warmup: Duration, samples: Vec<Sample>) -> SoakReport {
    let median = |mut v: Vec<u64>| -> f64 {
        v.sort_unstable();
        v.get(v.len() / 2).copied().unwrap_or(0) as f64
    };
    let after: Vec<&Sample> = samples.iter().filter(|s| s.at_s >= warmup.as_secs()).collect();
    let rss_growth = [0, 1].map(|i| {
        let start = median(after.iter().take(3).map(|s| s.rss_kib[i]).collect());
        let end = median(after.iter().rev().take(3).map(|s| s.rss_kib[i]).collect());
        if start > 0.0 { end / start - 1.0 } else { 0.0 }
    });
    let failed = samples.iter().map(|s| s.failed[0] + s.failed[1]).sum();
    let ok = samples.iter().map(|s| s.ok[0] + s.ok[1]).sum();
    SoakReport { duration_s: duration.as_secs(), rate, warmup_s: warmup.as_secs(), samples, rss_growth, failed, ok }
}

/// Three panels over time: RSS (MiB), descriptors and p99 (ms), node1/L4 in one colour
/// and node2/L7 in another, the warm-up shaded.
pub fn plot(r: &SoakReport) -> String {
    const W: f64 = 900.0;
    const PANEL: f64 = 170.0;
    const LEFT: f64 = 70.0;
    const TOP: f64 = 70.0;
    const GAP: f64 = 40.0;
    let span = r.samples.last().map_or(1, |s| s.at_s).max(1) as f64;
    let x = |t: u64| LEFT + (W - LEFT - 20.0) * t as f64 / span;
    let mut svg = String::new();
    let height = TOP + 3.0 * (PANEL + GAP);
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        svg,
        r#"<text x="{LEFT}" y="18" font-size="14">Soak: {} s at {} req/s each at L4 and L7 (warm-up shaded)</text>"#,
        r.duration_s, r.rate
    );
    let _ = writeln!(
        svg,
        r#"<text x="{LEFT}" y="36" font-size="13">RSS growth after warm-up: {:+.2}% (node1), {:+.2}% (node2); {} failed of {} requests</text>"#,
        r.rss_growth[0] * 100.0,
        r.rss_growth[1] * 100.0,
        r.failed,
        r.failed + r.ok
    );
    type Series = (&'static str, fn(&Sample) -> [f64; 2], [&'static str; 2]);
    let panels: [Series; 3] = [
        ("agent RSS, MiB", |s| s.rss_kib.map(|k| k as f64 / 1024.0), ["node1 agent", "node2 agent"]),
        ("agent open descriptors", |s| s.fds.map(|f| f as f64), ["node1 agent", "node2 agent"]),
        ("p99 latency, ms", |s| s.p99_ms, ["L4", "L7"]),
    ];
    let colours = ["#1f77b4", "#d62728"];
    for (i, (title, value, names)) in panels.iter().enumerate() {
        let top = TOP + i as f64 * (PANEL + GAP);
        let values: Vec<[f64; 2]> = r.samples.iter().map(value).collect();
        let max = values.iter().flat_map(|v| v.iter().copied()).fold(0.0_f64, f64::max).max(1e-9) * 1.1;
        let y = |v: f64| top + PANEL - PANEL * v / max;
        let warm = x(r.warmup_s) - LEFT;
        let _ = writeln!(svg, r##"<rect x="{LEFT}" y="{top}" width="{warm:.1}" height="{PANEL}" fill="#eee"/>"##);
        let _ = writeln!(
            svg,
            r#"<rect x="{LEFT}" y="{top}" width="{:.1}" height="{PANEL}" fill="none" stroke="black"/>"#,
            W - LEFT - 20.0
        );
        let _ = writeln!(svg, r#"<text x="{LEFT}" y="{:.1}">{title}</text>"#, top - 6.0);
        let _ = writeln!(svg, r#"<text x="5" y="{:.1}">{:.1}</text>"#, top + 12.0, max);
        let _ = writeln!(svg, r#"<text x="5" y="{:.1}">0</text>"#, top + PANEL);
        for (k, colour) in colours.iter().enumerate() {
            let points: Vec<String> =
                r.samples.iter().zip(&values).map(|(s, v)| format!("{:.1},{:.1}", x(s.at_s), y(v[k]))).collect();
            let _ = writeln!(
                svg,
                r#"<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{}"/>"#,
                points.join(" ")
            );
            let _ = writeln!(
                svg,
                r#"<text x="{:.1}" y="{:.1}" fill="{colour}">{}</text>"#,
                W - 200.0 + 90.0 * k as f64,
                top - 6.0,
                names[k]
            );
        }
    }
    let bottom = TOP + 3.0 * (PANEL + GAP) - GAP + 15.0;
    let _ = writeln!(svg, r#"<text x="{LEFT}" y="{bottom:.1}">0 s</text>"#);
    let _ = writeln!(svg, r#"<text x="{:.1}" y="{bottom:.1}">{} s</text>"#, W - 80.0, span as u64);
    svg.push_str("</svg>\n");
    svg
}

/// Writes the result between the soak markers of docs/benchmarks.md (in the part the
/// generator keeps) and the plot to docs/soak.svg.
fn document(r: &SoakReport, svg: &str) -> anyhow::Result<()> {
    const BEGIN: &str = "<!-- soak:begin -->";
    const END: &str = "<!-- soak:end -->";
    let docs = root().join("docs");
    std::fs::write(docs.join("soak.svg"), svg)?;
    let path = docs.join("benchmarks.md");
    let text = std::fs::read_to_string(&path)?;
    let last = r.samples.last().context("no sample")?;
    let first_after = r.samples.iter().find(|s| s.at_s >= r.warmup_s).context("no sample after warm-up")?;
    let mut section = String::new();
    let _ = writeln!(section, "{BEGIN}");
    let _ = writeln!(
        section,
        "`cargo xtask bench --soak {}s` ({}): {} requests/s each at L4 (frontend to myapp-v1's address, across\n\
         the tunnel) and at L7 (the myapp Service through a VirtualService), 16 keep-alive connections each,\n\
         sampled every 10 s. {} requests, {} failed. Agent RSS after warm-up ({} s) to the end: node1 {} → {} KiB\n\
         ({:+.2}%), node2 {} → {} KiB ({:+.2}%); descriptors {} / {} at the end; p99 at the end {:.2} ms (L4),\n\
         {:.2} ms (L7).\n\n![soak](soak.svg)",
        r.duration_s,
        chrono_free_date(),
        r.rate,
        r.ok + r.failed,
        r.failed,
        r.warmup_s,
        first_after.rss_kib[0],
        last.rss_kib[0],
        r.rss_growth[0] * 100.0,
        first_after.rss_kib[1],
        last.rss_kib[1],
        r.rss_growth[1] * 100.0,
        last.fds[0],
        last.fds[1],
        last.p99_ms[0],
        last.p99_ms[1]
    );
    let _ = writeln!(section, "{END}");
    std::fs::write(&path, between_markers(&text, (BEGIN, END), &section, "\n## Soak\n\n"))?;
    println!("[soak] wrote the result into docs/benchmarks.md and docs/soak.svg");
    Ok(())
}

/// `text` with what lies between the `begin` and `end` markers (both included)
/// replaced by `section` (which carries them); `section` appended under `heading` where
/// the markers are missing. The generated part of a doc, kept among hand-written text.
pub(super) fn between_markers(text: &str, (begin, end): (&str, &str), section: &str, heading: &str) -> String {
    match (text.find(begin), text.find(end)) {
        (Some(b), Some(e)) if b < e => format!("{}{}{}", &text[..b], section.trim_end(), &text[e + end.len()..]),
        _ => format!("{}{heading}{section}", text.trim_end()),
    }
}

/// Today's date from `date -u +%F` (the xtask has no date library).
pub(super) fn chrono_free_date() -> String {
    std::process::Command::new("date")
        .args(["-u", "+%F"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(at_s: u64, rss: u64) -> Sample {
        Sample { at_s, rss_kib: [rss, 1000], fds: [40, 40], p99_ms: [1.0, 2.0], ok: [10, 10], failed: [0, 0] }
    }

    #[test]
    fn a_request_cut_at_the_windows_end_is_not_a_failure() {
        let v = serde_json::json!({
            "latencyPercentiles": {"p99": 0.00081},
            "statusCodeDistribution": {"200": 9998, "503": 1},
            "errorDistribution": {"aborted due to deadline": 1, "connection reset": 1}
        });
        let (p99, ok, failed) = window_figures(&v);
        assert!((p99 - 0.81).abs() < 1e-9);
        assert_eq!((ok, failed), (9998, 2), "the 503 and the reset count; the deadline does not");
    }

    #[test]
    fn a_generated_section_replaces_its_markers_and_keeps_the_rest() {
        let markers = ("<!-- x:begin -->", "<!-- x:end -->");
        let section = "<!-- x:begin -->\nnew\n<!-- x:end -->\n";
        let doc = "# Doc\n\n<!-- x:begin -->\nold\n<!-- x:end -->\n\nhand-written\n";
        assert_eq!(
            between_markers(doc, markers, section, "\n## X\n\n"),
            "# Doc\n\n<!-- x:begin -->\nnew\n<!-- x:end -->\n\nhand-written\n"
        );
        assert_eq!(between_markers("# Doc\n", markers, section, "\n## X\n\n"), format!("# Doc\n## X\n\n{section}"));
    }

    #[test]
    fn durations_read_as_an_operator_writes_them() {
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert!(parse_duration("5s").is_err(), "shorter than three windows");
        assert!(parse_duration("1d").is_err());
    }

    #[test]
    fn growth_is_measured_after_warm_up_from_medians() {
        // A warm-up climb is not growth; a steady rise after it is.
        let flat: Vec<Sample> = [500, 900, 1000, 1001, 999, 1000, 1000, 1002]
            .iter()
            .enumerate()
            .map(|(i, r)| sample(i as u64 * 10, *r))
            .collect();
        let r = verdict(Duration::from_secs(80), 1000, Duration::from_secs(20), flat);
        assert!(r.rss_growth[0].abs() < 0.005, "{:?}", r.rss_growth);
        let rising: Vec<Sample> = (0..8).map(|i| sample(i * 10, 1000 + i * 10)).collect();
        let r = verdict(Duration::from_secs(80), 1000, Duration::from_secs(20), rising);
        assert!(r.rss_growth[0] > 0.01, "{:?}", r.rss_growth);
        assert!(plot(&r).starts_with("<svg") && plot(&r).contains("polyline"));
    }
}

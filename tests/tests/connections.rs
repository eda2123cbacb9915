//! Ten thousand connections through one agent, from four pods on both nodes, held idle
//! and then closed: what each costs the agent (memory, descriptors), and that all of it
//! is handed back; then five hundred busy ones, and what each costs while it moves
//! bytes. Figures go to `target/conns/report.txt` and docs/benchmarks.md.
//!
//! Lab test: it skips with a message where the lab cannot run, unless
//! `MESH_REQUIRE_LAB` is set.
#![forbid(unsafe_code)]

use std::io::{BufRead as _, BufReader};
use std::process::{Child, Stdio};
use std::time::Duration;

use mesh_tests::harness::{lab_with_env, root};
use mesh_tests::lab::Lab;
use mesh_tests::steady::Held;

mod support;

/// Connections per client; four clients.
const PER_CLIENT: usize = 2500;

/// Active connections per client in the second phase; two clients.
const ACTIVE_PER_CLIENT: usize = 250;

/// Starts `mesh-echo hold` of `conns` connections in `pod` (each kept busy when
/// `active`) and returns it once every connection is open, with what opening them gave.
fn hold(lab: &Lab, pod: &str, target: &str, conns: usize, active: bool) -> (Child, Held) {
    let echo = root().join("target/debug/mesh-echo").display().to_string();
    let conns = conns.to_string();
    let mut argv: Vec<String> =
        [echo.as_str(), "hold", target, "--conns", &conns].iter().map(|s| s.to_string()).collect();
    if active {
        argv.push("--active".into());
    }
    let mut child = lab.pod_command(pod, &argv).unwrap().stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
    let mut first = String::new();
    BufReader::new(child.stdout.as_mut().unwrap()).read_line(&mut first).unwrap();
    let opened: Held = serde_json::from_str(&first).unwrap_or_else(|e| panic!("{pod}: {e}: {first}"));
    (child, opened)
}

/// The agent's anonymous resident memory (its heap and stacks, KiB), all its resident
/// memory (with the binary's pages, KiB) and its descriptors, after its heap trimmer ran.
fn footprint(pid: u32) -> (u64, u64, usize) {
    std::thread::sleep(Duration::from_secs(3));
    (support::status_kib(pid, "RssAnon"), support::status_kib(pid, "VmRSS"), support::fds(pid))
}

#[test]
fn ten_thousand_idle_connections_through_one_agent_cost_little_and_are_all_handed_back() {
    // The agent caps connections at half its descriptor limit by default (two each, as
    // a plaintext or same-node connection takes); tunnelled ones take one, so 10,000 of
    // them fit where the node allows 20,000 descriptors (this machine's hard limit).
    let Some(lab) = lab_with_env(
        "ten_thousand_idle_connections_through_one_agent_cost_little_and_are_all_handed_back",
        // Pooled tunnels close 3 s after their last stream, so the test sees everything
        // handed back rather than waiting out the default 5 minutes.
        &[("MESH_MAX_CONNECTIONS", "16000"), ("MESH_POOL_IDLE_TIMEOUT", "3s")],
    ) else {
        return;
    };
    let agent = lab.node("node1").unwrap().agent_pid.unwrap();
    // Warm the paths (tunnels, pools) so the baseline is a serving agent's.
    let echo = root().join("target/debug/mesh-echo").display().to_string();
    for (pod, target) in [("frontend", "10.10.2.2:9000"), ("myapp-v1", "10.10.1.3:9000")] {
        let out = lab.exec(pod, &[&echo, "load", target, "--conns", "20", "--bytes", "1024"]).unwrap();
        assert!(out.status.success(), "{pod}: {}", String::from_utf8_lossy(&out.stderr));
    }
    let (rss_before, vm_before, fds_before) = footprint(agent);

    // Through node1's agent: out of its two pods (to myapp-v1 across the tunnel) and
    // into myapp-v2 from node2's two pods (over HBONE).
    let clients = [
        ("frontend", "10.10.2.2:9000"),
        ("myapp-v2", "10.10.2.2:9000"),
        ("myapp-v1", "10.10.1.3:9000"),
        ("legacy-service", "10.10.1.3:9000"),
    ];
    let mut held = Vec::new();
    for (pod, target) in clients {
        let (child, opened) = hold(&lab, pod, target, PER_CLIENT, false);
        assert_eq!(opened.failed, 0, "{pod} -> {target}: {:?}", opened.errors);
        held.push((pod, child));
    }
    let total = PER_CLIENT * clients.len();
    let (rss_held, vm_held, fds_held) = footprint(agent);
    let per_conn_kib = (rss_held.saturating_sub(rss_before)) as f64 / total as f64;
    let fds_per_conn = (fds_held.saturating_sub(fds_before)) as f64 / total as f64;

    // Closing: each echoes once more (all still alive after the hold) and closes.
    close_all(held, PER_CLIENT);
    // Closed connections' descriptors go at once; the tunnels they rode (one per 100
    // streams, per source pod and destination) once idle for the pool's timeout, 3 s.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let (rss_after, vm_after, fds_after) = loop {
        let (rss, vm, fds) = footprint(agent);
        if fds <= fds_before || std::time::Instant::now() > deadline {
            break (rss, vm, fds);
        }
    };
    // Memory once the heap trimmer has seen the tunnels go too: it looks at the heap
    // every 2 s, less often after a slow look (a heap holding 10,000 connections'
    // chunks), but at least every `LOOK_AT_LEAST_EVERY`.
    let handed_back = |rss: u64| rss <= rss_before + (rss_held - rss_before) / 5;
    let (rss_after, vm_after) = if fds_after <= fds_before {
        let deadline = std::time::Instant::now() + mesh_agent::heap::LOOK_AT_LEAST_EVERY + Duration::from_secs(5);
        loop {
            let (rss, vm, _) = footprint(agent);
            if handed_back(rss) || std::time::Instant::now() > deadline {
                break (rss, vm);
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    } else {
        (rss_after, vm_after)
    };
    // Active: connections each echoing 16 KiB after 16 KiB, out across the tunnel and
    // in over HBONE, measured while they move bytes (each direction holds a buffer only
    // while it has bytes to move).
    let mut busy = Vec::new();
    for (pod, target) in [clients[0], clients[2]] {
        let (child, opened) = hold(&lab, pod, target, ACTIVE_PER_CLIENT, true);
        assert_eq!(opened.failed, 0, "{pod} -> {target}: {:?}", opened.errors);
        busy.push((pod, child));
    }
    let active = ACTIVE_PER_CLIENT * busy.len();
    let (rss_active, _, _) = footprint(agent);
    close_all(busy, ACTIVE_PER_CLIENT);
    let per_active_kib = (rss_active.saturating_sub(rss_after)) as f64 / active as f64;
    let report = format!(
        "{total} idle connections through node1's agent (2 pods out across the tunnel, 2 pods in over HBONE)\n\
         agent RssAnon: {rss_before} KiB before, {rss_held} KiB holding them, {rss_after} KiB after\n\
         agent VmRSS: {vm_before} KiB before, {vm_held} KiB holding them, {vm_after} KiB after\n\
         per idle connection: {per_conn_kib:.2} KiB, {fds_per_conn:.2} descriptors\n\
         descriptors: {fds_before} before, {fds_held} holding, {fds_after} after\n\
         {active} active connections (16 KiB echoes back to back, half out, half in): agent RssAnon {rss_after} KiB \
         before, {rss_active} KiB while active, {per_active_kib:.2} KiB per active connection\n"
    );
    eprintln!("{report}");
    let dir = root().join("target/conns");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("report.txt"), &report).unwrap();

    assert!(fds_after <= fds_before, "descriptors handed back: {fds_before} -> {fds_held} -> {fds_after}");
    assert!(fds_per_conn < 1.05, "one descriptor per connection (tunnels are shared): {fds_per_conn:.2}");
    // Issue 18's target is 4 KiB; measured 3.95 (release and debug, 2026-12-05). This
    // bound catches a regression (a task holding its future twice cost 8 KiB more).
    assert!(per_conn_kib <= 5.0, "an idle connection costs the agent {per_conn_kib:.2} KiB");
    assert!(handed_back(rss_after), "memory handed back: {rss_before} -> {rss_held} -> {rss_after} KiB");
    // At most a buffer each way while bytes move (2 x 16 KiB) over the idle cost.
    assert!(per_active_kib <= 40.0, "an active connection costs the agent {per_active_kib:.2} KiB");
}

/// Closes the `held` clients (stdin closed): each connection echoes once more and
/// closes cleanly, `per_client` of them each.
fn close_all(held: Vec<(&str, Child)>, per_client: usize) {
    for (pod, mut child) in held {
        drop(child.stdin.take());
        let out = child.wait_with_output().unwrap();
        let last = String::from_utf8_lossy(&out.stdout).lines().last().unwrap_or_default().to_string();
        let closed: Held = serde_json::from_str(&last).unwrap_or_else(|e| panic!("{pod}: {e}: {last}"));
        assert_eq!((closed.ok, closed.failed), (per_client as u64, 0), "{pod}: {:?}", closed.errors);
    }
}

//! The mesh's own dashboard in the lab: after real traffic (allowed requests and one a
//! DENY policy refuses), node2's agent serves the page on its admin address, and
//! headless Chromium (Debian's `chromium`) renders it. The DOM must hold the graph's
//! nodes and the edge with its rate, error rate, p99 and padlock, the workload's
//! policies and the denial; a screenshot is saved under `target/artifacts/`.
#![forbid(unsafe_code)]

use std::process::Stdio;

use mesh_tests::harness::{DENY_ADMIN, apply_yaml, eventually, lab, root};
use mesh_tests::lab::Lab;

fn status(lab: &Lab, url: &str) -> String {
    let out = lab.exec("frontend", &["curl", "-s", "-m", "5", "-o", "/dev/null", "-w", "%{http_code}", url]);
    String::from_utf8_lossy(&out.unwrap().stdout).into_owned()
}

/// Runs `argv` in `node`'s network namespace (where its agent's admin address is).
fn on_node(lab: &Lab, node: &str, argv: &[&str]) -> std::process::Output {
    let argv: Vec<String> = argv.iter().map(|s| s.to_string()).collect();
    lab.host_command(node, &argv).unwrap().stdin(Stdio::null()).output().unwrap()
}

fn chromium() -> Option<String> {
    ["chromium", "chromium-browser", "google-chrome"]
        .into_iter()
        .find_map(mesh_tests::sys::which)
        .map(|p| p.display().to_string())
}

/// The value of attribute `name` in the first tag of `dom` that holds all of `has`.
fn attr(dom: &str, has: &[&str], name: &str) -> Option<String> {
    let tag = dom.split('<').find(|t| has.iter().all(|h| t.contains(h)))?;
    let (_, rest) = tag.split_once(&format!(" {name}=\""))?;
    Some(rest.split('"').next()?.to_string())
}

#[test]
fn the_dashboard_shows_the_graph_policies_and_denials_in_a_real_browser() {
    let Some(lab) = lab("the_dashboard_shows_the_graph_policies_and_denials_in_a_real_browser") else { return };
    let Some(browser) = chromium() else {
        assert!(std::env::var_os("MESH_REQUIRE_LAB").is_none(), "chromium is not installed (cargo xtask setup)");
        eprintln!("skipping: chromium is not installed (cargo xtask setup installs it)");
        return;
    };
    apply_yaml(&lab, "deny-admin.yaml", DENY_ADMIN);
    eventually("the DENY policy is in force", || (status(&lab, "http://legacy-service/admin") == "403").then_some(()));
    for _ in 0..20 {
        assert_eq!(status(&lab, "http://legacy-service/ok"), "200");
    }

    // legacy-service runs on node2: its agent reports the requests as their destination.
    let data = || {
        let out = on_node(&lab, "node2", &["curl", "-sf", "-m", "5", "http://127.0.0.1:15000/dashboard/data"]);
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap_or_default()
    };
    let edge_of = |d: &serde_json::Value| {
        d["graph"]["edges"]
            .as_array()?
            .iter()
            .find(|e| {
                e["source"] == "production/frontend"
                    && e["destination"] == "production/legacy-service"
                    && e["protocol"] == "http"
                    && e["rate"].as_f64().unwrap_or(0.0) > 0.0
            })
            .cloned()
    };
    // The sampler reads the metrics every 5 s.
    let edge = {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            if let Some(e) = edge_of(&data()) {
                break e;
            }
            assert!(std::time::Instant::now() < deadline, "no edge frontend → legacy-service in {}", data());
            std::thread::sleep(std::time::Duration::from_millis(500));
        }
    };
    assert_eq!(edge["reporter"], "destination");
    assert_eq!(edge["mtls"], 1.0, "frontend → legacy-service rides the mTLS tunnel: {edge}");
    assert!(edge["p99_ms"].as_f64().is_some(), "{edge}");
    assert!(edge["error_rate"].as_f64().unwrap() == 0.0, "403 is not a server error: {edge}");
    let d = data();
    let legacy = d["workloads"].as_array().unwrap().iter().find(|w| w["id"] == "production/legacy-service").cloned();
    let legacy = legacy.unwrap_or_else(|| panic!("node2 reports legacy-service: {d}"));
    assert_eq!(legacy["identity"], "spiffe://cluster.local/ns/production/sa/legacy-service");
    assert_eq!(legacy["authorization"]["DENY"][0], "production/deny-admin");
    assert_eq!(legacy["denials"][0]["reason"], "http_policy", "{legacy}");
    assert!(
        legacy["denials"][0]["source"]
            .as_str()
            .unwrap()
            .starts_with("spiffe://cluster.local/ns/production/sa/frontend")
    );
    assert!(
        d["agents"][0]["config"].as_array().unwrap().iter().any(|c| c == "AuthorizationPolicy production/deny-admin"),
        "{d}"
    );

    // The page asks for data with a loopback Host only (DNS rebinding).
    let rebound = on_node(
        &lab,
        "node2",
        &[
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-H",
            "Host: evil.example",
            "http://127.0.0.1:15000/dashboard/data",
        ],
    );
    assert_eq!(String::from_utf8_lossy(&rebound.stdout), "403");

    let profile = lab.state_dir.join("chromium-profile");
    let artifacts = root().join("target/artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let shot = artifacts.join("dashboard.png");
    let _ = std::fs::remove_file(&shot);
    let browse = |extra: &[&str]| {
        let mut argv = vec![
            browser.as_str(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--hide-scrollbars",
            "--window-size=1400,1100",
            "--virtual-time-budget=4000",
        ];
        let dir = format!("--user-data-dir={}", profile.display());
        argv.push(&dir);
        argv.extend_from_slice(extra);
        argv.push("http://127.0.0.1:15000/dashboard");
        on_node(&lab, "node2", &argv)
    };
    let out = browse(&["--dump-dom"]);
    let dom = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        dom.contains("data-loaded=\"true\""),
        "the page read its data: {dom}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for node in ["production/frontend", "production/legacy-service"] {
        assert!(dom.contains(&format!("class=\"node\" data-id=\"{node}\"")), "graph node {node}: {dom}");
    }
    let edge_tag = [
        "class=\"edge\"",
        "data-source=\"production/frontend\"",
        "data-destination=\"production/legacy-service\"",
        "data-protocol=\"http\"",
    ];
    let rate: f64 = attr(&dom, &edge_tag, "data-rate").expect("the edge is drawn").parse().unwrap();
    assert!(rate > 0.0, "the edge carries its request rate");
    assert_eq!(attr(&dom, &edge_tag, "data-mtls").as_deref(), Some("1.000"));
    assert!(attr(&dom, &edge_tag, "data-p99-ms").is_some_and(|v| !v.is_empty()));
    assert!(dom.contains("rps · 0.0% err · p99 "), "the edge's label: {dom}");
    assert!(dom.contains("class=\"padlock\""), "the padlock: {dom}");
    assert!(attr(&dom, &["class=\"padlock\""], "data-full").is_some_and(|v| v == "true"), "all of it mTLS");
    assert!(dom.contains("DENY: production/deny-admin"), "the policy in force: {dom}");
    assert!(dom.contains("class=\"denial bad\" data-reason=\"http_policy\""), "the denial: {dom}");
    assert!(dom.contains("AuthorizationPolicy production/deny-admin"), "the config held: {dom}");

    let shot_arg = format!("--screenshot={}", shot.display());
    let out = browse(&[&shot_arg]);
    let size = std::fs::metadata(&shot).map(|m| m.len()).unwrap_or(0);
    assert!(size > 10_000, "a screenshot was saved ({size} bytes): {}", String::from_utf8_lossy(&out.stderr));
    eprintln!("dashboard screenshot: {}", shot.display());
    let _ = std::fs::remove_dir_all(&profile);
}

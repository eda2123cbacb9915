//! Lab integration tests: real netns, real eBPF programs, real agents, real clients.
//!
//! Each test brings the lab up and tears it down (also on panic) through [`LabGuard`];
//! the lab's names are fixed, so tests take a process-wide lock. Tests skip with a
//! message where the machine cannot run the lab, unless `MESH_REQUIRE_LAB` is set
//! (`cargo xtask test` sets it on capable machines), which turns a skip into a failure.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mesh_tests::harness::{apply_yaml, curl, eventually, lab, lab_with_env, metrics, opened, reply_pod, root};
use mesh_tests::wire::Capture;
use support::{foreign_issuer, mesh_issuer, write_leaf};

mod support;

#[test]
fn frontend_reaches_myapp_through_both_agents_over_mtls() {
    let Some(lab) = lab("frontend_reaches_myapp_through_both_agents_over_mtls") else { return };
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..4 {
        let (ok, body) = curl(&lab, "frontend", "http://myapp/");
        assert!(ok, "curl failed: {body}");
        let pod = reply_pod(&body).unwrap_or_else(|| panic!("not an echo reply: {body}"));
        assert!(pod.starts_with("myapp-"), "{pod}");
        seen.insert(pod);
    }
    assert_eq!(seen.len(), 2, "round robin reaches both myapp pods: {seen:?}");
    // Cross-node: frontend (node1) -> myapp-v1 (node2) was counted by both agents.
    assert!(opened(&metrics(&lab, "node1"), "Outbound", "frontend", "myapp-v1") >= 1);
    assert!(opened(&metrics(&lab, "node2"), "Inbound", "frontend", "myapp-v1") >= 1);
    // Same-node goes through the same checks.
    assert!(opened(&metrics(&lab, "node1"), "Inbound", "frontend", "myapp-v2") >= 1);
}

/// The address the echo application saw as its peer, from its JSON reply.
fn app_peer(body: &str) -> std::net::IpAddr {
    let v: serde_json::Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("not an echo reply: {body}: {e}"));
    let peer: SocketAddr = v["peer"].as_str().unwrap().parse().unwrap();
    peer.ip().to_canonical()
}

#[test]
fn applications_see_their_clients_address() {
    let Some(lab) = lab("applications_see_their_clients_address") else { return };
    let frontend = std::net::IpAddr::V4(lab.pod("frontend").unwrap().ip);
    // Over the tunnel, cross-node (myapp-v1 on node2) and same-node (myapp-v2 on
    // node1): the destination's agent delivers from frontend's address.
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..4 {
        let (ok, body) = curl(&lab, "frontend", "http://myapp/");
        assert!(ok, "curl failed: {body}");
        assert_eq!(app_peer(&body), frontend, "{body}");
        seen.insert(reply_pod(&body).unwrap());
    }
    assert_eq!(seen.len(), 2, "both myapp pods answered: {seen:?}");
    // Plaintext from outside the mesh: the outside client's own address.
    let outside = std::net::IpAddr::V4(lab.pod("outside").unwrap().ip);
    let v1 = lab.pod("myapp-v1").unwrap().ip;
    let (ok, body) = curl(&lab, "outside", &format!("http://{v1}:8080/"));
    assert!(ok, "curl failed: {body}");
    assert_eq!(app_peer(&body), outside, "{body}");
}

#[test]
fn original_destination_in_bpf_map_matches_what_client_dialed() {
    use std::io::BufRead as _;
    use std::process::Stdio;

    use aya::maps::{HashMap, Map, MapData};
    use mesh_common::{OrigDst, SockAddrKey};
    let Some(lab) = lab("original_destination_in_bpf_map_matches_what_client_dialed") else { return };
    let echo = root().join("target/debug/mesh-echo").display().to_string();
    let pins = lab.node("node1").unwrap().pin_dir.clone();
    let orig_dst = || {
        let map = MapData::from_pin(pins.join("ORIG_DST")).unwrap();
        HashMap::<_, SockAddrKey, OrigDst>::try_from(Map::LruHashMap(map)).unwrap()
    };
    let by_cookie = || {
        let map = MapData::from_pin(pins.join("COOKIE_ORIG_DST")).unwrap();
        HashMap::<_, u64, OrigDst>::try_from(Map::LruHashMap(map)).unwrap()
    };
    let entries = || (orig_dst().keys().count(), by_cookie().keys().count());
    let before = entries();
    for dialed in ["10.96.0.20:80", "[::ffff:10.96.0.20]:80"] {
        // Held open while the maps are read, then closed.
        let argv: Vec<String> = [echo.as_str(), "dial", dialed, "--hold-ms", "1500"].map(String::from).to_vec();
        let mut child = lab.pod_command("frontend", &argv).unwrap().stdout(Stdio::piped()).spawn().unwrap();
        let mut first = String::new();
        std::io::BufReader::new(child.stdout.as_mut().unwrap()).read_line(&mut first).unwrap();
        let v: serde_json::Value =
            serde_json::from_str(&first).unwrap_or_else(|e| panic!("dial {dialed}: {first:?}: {e}"));
        let local: SocketAddr = v["local"].as_str().unwrap().parse().unwrap();
        let peer: SocketAddr = v["peer"].as_str().unwrap().parse().unwrap();
        // getpeername shows what the application dialed, not the agent's listener.
        let want: SocketAddr = "10.96.0.20:80".parse().unwrap();
        assert_eq!(SocketAddr::new(peer.ip().to_canonical(), peer.port()), want, "getpeername for {dialed}");
        let key = SockAddrKey::from_socket_addr(SocketAddr::new(local.ip().to_canonical(), local.port()));
        let orig = orig_dst().get(&key, 0).unwrap_or_else(|e| panic!("no ORIG_DST entry for {local}: {e}"));
        assert_eq!(orig.socket_addr(), want, "recorded original destination for {dialed}");
        assert_eq!(orig.family, if dialed.starts_with('[') { 6 } else { 4 });
        assert!(child.wait().unwrap().success(), "dial {dialed}");
        // Closed: its entries are gone, not left for the LRU to push out.
        eventually("the closed connection's ORIG_DST entry goes", || orig_dst().get(&key, 0).is_err().then_some(()));
    }
    // Many connections later, the maps hold what they held before.
    let out = lab.exec("frontend", &[&echo, "load", "10.96.0.20:9000", "--conns", "300", "--bytes", "1024"]).unwrap();
    assert!(out.status.success(), "load: {}", String::from_utf8_lossy(&out.stderr));
    eventually("the maps hold no closed connection", || {
        let now = entries();
        (now.0 <= before.0 && now.1 <= before.1).then_some(())
    });
}

#[test]
fn wire_between_nodes_is_tls13_and_foreign_certificates_are_refused() {
    let Some(lab) = lab("wire_between_nodes_is_tls13_and_foreign_certificates_are_refused") else { return };
    // Every TCP byte between the nodes while frontend (node1) talks to myapp-v1 (node2):
    // a TLS 1.3 handshake and no plaintext, on any port.
    let capture = Capture::start(&lab, "wire-test.pcap", "tcp").unwrap();
    for _ in 0..6 {
        let (ok, body) = curl(&lab, "frontend", "http://myapp/");
        assert!(ok && reply_pod(&body).is_some(), "curl failed: {body}");
    }
    let wire = capture.finish();
    assert!(opened(&metrics(&lab, "node2"), "Inbound", "frontend", "myapp-v1") >= 1, "cross-node traffic");
    assert!(wire.tls13_handshake, "no TLS 1.3 ServerHello in {} bytes ({})", wire.bytes, wire.pcap.display());
    assert!(wire.plaintext.is_empty(), "plaintext on the wire: {:?} ({})", wire.plaintext, wire.pcap.display());

    let dir = lab.state_dir.join("certs");
    std::fs::create_dir_all(&dir).unwrap();
    // A client certificate from another CA, with a perfectly plausible identity.
    write_leaf(&dir, "other", "spiffe://cluster.local/ns/production/sa/frontend", &foreign_issuer());
    // A certificate from the mesh CA but for another trust domain.
    write_leaf(&dir, "td", "spiffe://evil.example/ns/production/sa/frontend", &mesh_issuer(&lab));

    let v1 = lab.pod("myapp-v1").unwrap().ip;
    let target = format!("{v1}:15008");
    let s_client = |version: &str, cert: Option<&str>| -> (bool, String) {
        let mut argv = vec!["openssl", "s_client", "-connect", &target, version, "-alpn", "h2", "-brief"];
        let (c, k);
        if let Some(name) = cert {
            c = dir.join(format!("{name}.pem")).display().to_string();
            k = dir.join(format!("{name}.key")).display().to_string();
            argv.extend(["-cert", &c, "-key", &k]);
        }
        // In TLS 1.3 the client finishes its side before the server has judged the
        // client certificate; keeping stdin open for a second lets s_client read the
        // server's verdict (an alert) instead of quitting first.
        let script = format!("sleep 1 | timeout 5 {}", argv.join(" "));
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", "outside", "bash", "-c", &script])
            .output()
            .unwrap();
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        (text.contains("CONNECTION ESTABLISHED") && !text.contains("alert"), text)
    };
    for cert in [None, Some("other"), Some("td")] {
        let (accepted, text) = s_client("-tls1_3", cert);
        assert!(!accepted, "client certificate {cert:?} was accepted:\n{text}");
        assert!(text.contains("alert") || text.contains("error"), "no TLS refusal for {cert:?}:\n{text}");
    }
    let log = std::fs::read_to_string(lab.agent_log_path("node2")).unwrap();
    assert!(log.contains("HBONE connection refused"), "refusals are logged with the reason");
    assert!(log.contains("outside the accepted trust domains"), "trust-domain refusal reason logged");

    // TLS 1.2 is not offered at all.
    let (_, text) = s_client("-tls1_2", None);
    assert!(!text.contains("CONNECTION ESTABLISHED"), "TLS 1.2 accepted:\n{text}");
}

#[test]
fn killed_agent_fails_closed_and_restart_restores_service_with_pinned_maps() {
    let Some(mut lab) = lab("killed_agent_fails_closed_and_restart_restores_service_with_pinned_maps") else { return };
    assert!(curl(&lab, "frontend", "http://myapp/").0);
    lab.stop_agent("node1", "KILL").unwrap();
    let pins_before = std::fs::read_dir(lab.node("node1").unwrap().pin_dir.join("ENROLLED_PODS")).is_err();
    assert!(pins_before, "ENROLLED_PODS is a pinned map file, not a directory");
    assert!(
        lab.node("node1").unwrap().pin_dir.join("ENROLLED_PODS").exists(),
        "maps stay pinned while the agent is down"
    );
    // Outbound from an enrolled pod: refused, never sent around the mesh in plaintext.
    for url in ["http://myapp/", "http://10.10.2.2:8080/", "http://10.10.1.4:8080/"] {
        let (ok, body) = curl(&lab, "frontend", url);
        assert!(!ok, "{url} reached without the agent: {body}");
    }
    // Inbound plaintext to an enrolled pod on the dead agent's node: dropped in the kernel.
    let (ok, body) = curl(&lab, "outside", "http://10.10.1.3:8080/");
    assert!(!ok, "plaintext reached myapp-v2 without its agent: {body}");

    lab.start_agent("node1").unwrap();
    let body = eventually("service restored after restart", || {
        let (ok, body) = curl(&lab, "frontend", "http://myapp/");
        ok.then_some(body)
    });
    assert!(reply_pod(&body).is_some_and(|p| p.starts_with("myapp-")), "{body}");
    let (ok, _) = curl(&lab, "outside", "http://10.10.1.3:8080/");
    assert!(ok, "inbound restored");
    // Old links were replaced, not stacked: one pinned link per program.
    let links: Vec<String> = std::fs::read_dir(lab.node("node1").unwrap().pin_dir.join("links"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let connect4 = links.iter().filter(|l| l.starts_with("mesh_connect4@")).count();
    assert_eq!(connect4, 1, "links after restart: {links:?}");
}

/// How many kernel programs and maps of each mesh name are loaded, machine-wide (both
/// lab nodes' and any other mesh on this kernel).
fn kernel_objects() -> std::collections::BTreeMap<String, usize> {
    let mut counts = std::collections::BTreeMap::new();
    let programs = aya::programs::loaded_programs().filter_map(Result::ok).filter_map(|p| {
        let name = p.name_as_str()?;
        name.starts_with("mesh_").then(|| format!("program {name}"))
    });
    let maps = aya::maps::loaded_maps().filter_map(Result::ok).filter_map(|m| {
        let name = m.name_as_str()?;
        // The kernel object's maps are named in upper case (`ENROLLED_PODS`, ...).
        (name.len() > 3 && name.chars().all(|c| c.is_ascii_uppercase() || c == '_')).then(|| format!("map {name}"))
    });
    for name in programs.chain(maps) {
        *counts.entry(name).or_insert(0) += 1;
    }
    counts
}

/// What an OOM kill does to a process: SIGKILL, no drain. Three times over, the
/// agent's pods fail closed while it is gone, and each new agent comes back with every
/// pod captured and the kernel holding exactly what it held before: no program, map or
/// pinned link left behind by the killed one.
#[test]
fn sigkilled_agent_comes_back_with_every_pod_and_no_duplicate_kernel_objects() {
    let Some(mut lab) = lab("sigkilled_agent_comes_back_with_every_pod_and_no_duplicate_kernel_objects") else {
        return;
    };
    let links = |lab: &mesh_tests::lab::Lab| -> Vec<String> {
        let dir = lab.node("node1").unwrap().pin_dir.join("links");
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            // `<program>[@<pod uid>]@<generation>-<n>`: what is linked, not when.
            .map(|l| l.rsplit_once('@').map_or(l.clone(), |(what, _)| what.to_string()))
            .collect();
        names.sort();
        names
    };
    let before = (kernel_objects(), links(&lab));
    assert!(before.0.keys().any(|k| k == "program mesh_connect4"), "{:?}", before.0);
    for round in 1..=3 {
        lab.stop_agent("node1", "KILL").unwrap();
        let (ok, body) = curl(&lab, "frontend", "http://10.10.2.2:8080/");
        assert!(!ok, "round {round}: reached without the agent: {body}");
        let (ok, body) = curl(&lab, "outside", "http://10.10.1.3:8080/");
        assert!(!ok, "round {round}: plaintext reached myapp-v2 without its agent: {body}");
        lab.start_agent("node1").unwrap();
        for pod in ["frontend", "outside"] {
            let (ok, body) = curl(&lab, pod, "http://10.10.1.3:8080/");
            assert!(ok, "round {round}: {pod} -> myapp-v2: {body}");
        }
        let (ok, body) = curl(&lab, "frontend", "http://10.10.2.2:8080/");
        assert!(ok, "round {round}: frontend -> myapp-v1: {body}");
        eventually(&format!("round {round}: the killed agent's kernel objects are gone"), || {
            let now = (kernel_objects(), links(&lab));
            (now == before).then_some(())
        });
    }
}

#[test]
fn bad_yaml_keeps_old_config_serving_and_logs_one_clear_error() {
    let Some(lab) = lab("bad_yaml_keeps_old_config_serving_and_logs_one_clear_error") else { return };
    let cases = [
        ("broken-syntax.yaml", "apiVersion: v1\nkind: Service\nmetadata: {name: [\n", "YAML syntax error"),
        ("broken-kind.yaml", "apiVersion: v1\nkind: Gizmo\nmetadata: {name: g}\n", "field kind: unknown kind"),
        (
            "broken-field.yaml",
            "apiVersion: v1\nkind: Service\nmetadata: {name: myapp, namespace: production}\nspec: {ports: [{name: http}]}\n",
            "field spec.ports[0].port: required field is missing",
        ),
    ];
    let tmp = lab.state_dir.join("bad");
    std::fs::create_dir_all(&tmp).unwrap();
    for (name, yaml, reason) in cases {
        let f = tmp.join(name);
        std::fs::write(&f, yaml).unwrap();
        lab.apply(&f).unwrap();
        eventually(&format!("error for {name} logged"), || {
            let log = std::fs::read_to_string(lab.agent_log_path("node1")).ok()?;
            let lines: Vec<&str> = log.lines().filter(|l| l.contains("config rejected") && l.contains(name)).collect();
            if lines.is_empty() {
                return None;
            }
            assert_eq!(lines.len(), 1, "one error per bad file: {lines:?}");
            assert!(lines[0].contains(reason), "{}", lines[0]);
            Some(())
        });
        let (ok, body) = curl(&lab, "frontend", "http://myapp/");
        assert!(ok && reply_pod(&body).is_some(), "traffic stopped after {name}: {body}");
    }
    // A valid edit applies without restart: a new Service becomes reachable.
    let svc = tmp.join("extra.yaml");
    std::fs::write(
        &svc,
        "apiVersion: v1\nkind: Service\nmetadata: {name: myapp-v1-only, namespace: production}\nspec: {selector: {app: myapp, version: v1}, clusterIP: 10.96.0.99, ports: [{port: 80, targetPort: 8080}]}\n",
    )
    .unwrap();
    lab.apply(&svc).unwrap();
    let body = eventually("new service routable", || {
        let (ok, body) = curl(&lab, "frontend", "http://10.96.0.99/");
        ok.then_some(body)
    });
    assert_eq!(reply_pod(&body).as_deref(), Some("myapp-v1"));
}

#[test]
fn two_hundred_concurrent_connections_keep_every_byte() {
    let Some(lab) = lab("two_hundred_concurrent_connections_keep_every_byte") else { return };
    let echo = root().join("target/debug/mesh-echo").display().to_string();
    for target in ["10.96.0.20:9000", "10.10.2.2:9000"] {
        let out = lab.exec("frontend", &[&echo, "load", target, "--conns", "200", "--bytes", "65536"]).unwrap();
        assert!(
            out.status.success(),
            "load to {target}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["failed"], 0);
        assert_eq!(v["conns"], 200);
    }
    let m = metrics(&lab, "node1");
    assert!(opened(&m, "Outbound", "frontend", "myapp-v1") >= 200, "load went through the mesh");
}

/// The sum of the samples of `name` whose labels contain every one of `with`.
fn sum_of(metrics: &str, name: &str, with: &[&str]) -> u64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .filter(|l| with.iter().all(|w| l.contains(w)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// Holds a connection from frontend to `target` open while a DENY of frontend at
/// myapp-v2 arrives; the dial's last report (whether the peer closed it, and when).
fn held_while_frontend_is_denied(lab: &mesh_tests::lab::Lab, echo: &str, target: &str) -> serde_json::Value {
    let held = std::thread::scope(|s| {
        let dial = s.spawn(|| lab.exec("frontend", &[echo, "dial", target, "--hold-ms", "15000"]).unwrap());
        std::thread::sleep(Duration::from_secs(1));
        apply_yaml(
            lab,
            "deny-frontend-v2.yaml",
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: deny-frontend-v2, namespace: production}\nspec:\n  selector: {matchLabels: {app: myapp, version: v2}}\n  action: DENY\n  rules: [{from: [{source: {principals: [cluster.local/ns/production/sa/frontend]}}]}]\n",
        );
        dial.join().unwrap()
    });
    let lines: Vec<serde_json::Value> =
        String::from_utf8_lossy(&held.stdout).lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    lines.last().cloned().expect("dial reported")
}

/// frontend and myapp-v2 share node1: their TCP is admitted by node1's agent and then
/// passed on by the kernel (sockmap), every byte intact, counted at both ends from the
/// kernel's tally, and still under myapp's policy: a live connection is closed and new
/// ones refused once a DENY names frontend. With the direct path off: every connection
/// takes the agent (with it on, only a pair's first ones do; the test below).
#[test]
fn same_node_tcp_is_spliced_in_the_kernel_and_still_judged() {
    let name = "same_node_tcp_is_spliced_in_the_kernel_and_still_judged";
    let Some(lab) = lab_with_env(name, &[("MESH_SAME_NODE_DIRECT", "off")]) else { return };
    let echo = root().join("target/debug/mesh-echo").display().to_string();
    let target = format!("{}:9000", lab.pod("myapp-v2").unwrap().ip);
    let spliced = |m: &str| sum_of(m, "istio_mesh_kernel_spliced_connections_total", &[]);
    let before = spliced(&metrics(&lab, "node1"));
    let out = lab.exec("frontend", &[&echo, "load", &target, "--conns", "50", "--bytes", "262144"]).unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "load: {report}{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((v["conns"].as_u64(), v["failed"].as_u64()), (Some(50), Some(0)), "{report}");
    let m = metrics(&lab, "node1");
    assert!(spliced(&m) >= before + 50, "spliced in the kernel: {} -> {}", before, spliced(&m));
    let pair = ["source_workload=\"frontend\"", "destination_workload=\"myapp-v2\""];
    for reporter in ["reporter=\"source\"", "reporter=\"destination\""] {
        let with = [pair[0], pair[1], reporter];
        let received = sum_of(&m, "istio_tcp_received_bytes_total", &with);
        let sent = sum_of(&m, "istio_tcp_sent_bytes_total", &with);
        assert!(received >= 50 * 262_144 && sent >= 50 * 262_144, "{reporter}: {received} / {sent} bytes counted");
    }
    // A connection held open while a DENY for frontend arrives is closed by the agent.
    let end = held_while_frontend_is_denied(&lab, &echo, &target);
    assert_eq!(end["closed_by_peer"], true, "the spliced connection was not closed: {end}");
    assert!(end["held_ms"].as_u64().unwrap() < 10_000, "{end}");
    let out = lab.exec("frontend", &[&echo, "load", &target, "--conns", "1", "--bytes", "1024"]).unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    assert_ne!(v["failed"].as_u64(), Some(0), "refused once denied: {}", String::from_utf8_lossy(&out.stdout));
}

/// The request metrics of myapp-v2 (server side) turned off: its agent has nothing
/// to read in its connections, so same-node pairs may go direct.
const V2_TCP_ONLY: &str = "apiVersion: telemetry.istio.io/v1\nkind: Telemetry\nmetadata: {name: v2-tcp-only, namespace: production}\nspec:\n  selector: {matchLabels: {version: v2}}\n  metrics:\n  - overrides:\n    - {match: {metric: REQUEST_COUNT, mode: SERVER}, disabled: true}\n    - {match: {metric: REQUEST_DURATION, mode: SERVER}, disabled: true}\n    - {match: {metric: REQUEST_SIZE, mode: SERVER}, disabled: true}\n    - {match: {metric: RESPONSE_SIZE, mode: SERVER}, disabled: true}\n";

/// frontend and myapp-v2 share node1. Once node1's agent has admitted a frontend ->
/// myapp-v2:9000 connection with nothing to read in it, the pair's next connections go
/// straight from frontend's socket to the application (one TCP connection, no agent),
/// every byte intact and counted at both ends from the kernel's reports; a DENY closes
/// a live direct connection and refuses the next; with its agent killed, nothing goes
/// direct (refused at once), and the restarted agent serves the pair again.
#[test]
fn same_node_pairs_connect_directly_once_admitted_and_stay_judged() {
    let Some(mut lab) = lab("same_node_pairs_connect_directly_once_admitted_and_stay_judged") else { return };
    let echo = root().join("target/debug/mesh-echo").display().to_string();
    let target = format!("{}:9000", lab.pod("myapp-v2").unwrap().ip);
    let load = |lab: &mesh_tests::lab::Lab, conns: &str, bytes: &str| -> serde_json::Value {
        let out = lab.exec("frontend", &[&echo, "load", &target, "--conns", conns, "--bytes", bytes]).unwrap();
        serde_json::from_slice(&out.stdout).unwrap_or_default()
    };
    let direct = |m: &str| sum_of(m, "istio_mesh_kernel_events_total", &["event=\"direct_delivered\""]);
    apply_yaml(&lab, "v2-tcp-only.yaml", V2_TCP_ONLY);
    // Admitted by the agent first; then direct.
    eventually("the pair goes direct", || {
        let v = load(&lab, "1", "1024");
        assert_eq!(v["failed"].as_u64(), Some(0), "{v}");
        (direct(&metrics(&lab, "node1")) > 0).then_some(())
    });
    // The kernel's counts reach the metrics on the agent's 2 s tick.
    std::thread::sleep(Duration::from_millis(2500));
    let before = metrics(&lab, "node1");
    let v = load(&lab, "50", "262144");
    assert_eq!((v["conns"].as_u64(), v["failed"].as_u64()), (Some(50), Some(0)), "{v}");
    let m = eventually("50 direct connections counted", || {
        let m = metrics(&lab, "node1");
        (direct(&m) >= direct(&before) + 50).then_some(m)
    });
    let redirected = |m: &str| sum_of(m, "istio_mesh_kernel_events_total", &["event=\"outbound_redirected\""]);
    assert_eq!(redirected(&m), redirected(&before), "no connection of the pair reached the agent");
    // Counted from the kernel's reports (read on the agent's 2 s tick).
    let pair = ["source_workload=\"frontend\"", "destination_workload=\"myapp-v2\""];
    eventually("direct connections counted at both ends", || {
        let m = metrics(&lab, "node1");
        let counted = ["reporter=\"source\"", "reporter=\"destination\""].iter().all(|reporter| {
            let with = [pair[0], pair[1], reporter];
            let grew = |name| sum_of(&m, name, &with) >= sum_of(&before, name, &with);
            let bytes = |name| sum_of(&m, name, &with) - sum_of(&before, name, &with);
            grew("istio_tcp_received_bytes_total")
                && bytes("istio_tcp_received_bytes_total") >= 50 * 262_144
                && bytes("istio_tcp_sent_bytes_total") >= 50 * 262_144
                && sum_of(&m, "istio_tcp_connections_closed_total", &with)
                    >= sum_of(&before, "istio_tcp_connections_closed_total", &with) + 50
        });
        counted.then_some(())
    });
    // A live direct connection is closed by the agent once a DENY names frontend.
    let end = held_while_frontend_is_denied(&lab, &echo, &target);
    assert_eq!(end["closed_by_peer"], true, "the direct connection was not closed: {end}");
    assert!(end["held_ms"].as_u64().unwrap() < 10_000, "{end}");
    assert_ne!(load(&lab, "1", "1024")["failed"].as_u64(), Some(0), "refused once denied");
    // Allowed again, admitted again, direct again; then the agent dies.
    lab.delete(std::path::Path::new("deny-frontend-v2.yaml")).unwrap();
    let before = direct(&metrics(&lab, "node1"));
    eventually("direct again", || {
        let v = load(&lab, "1", "1024");
        (v["failed"].as_u64() == Some(0) && direct(&metrics(&lab, "node1")) > before).then_some(())
    });
    lab.stop_agent("node1", "KILL").unwrap();
    let v = load(&lab, "1", "1024");
    assert_eq!(v["failed"].as_u64(), Some(1), "a pair went direct without its agent: {v}");
    lab.start_agent("node1").unwrap();
    eventually("served after restart", || (load(&lab, "1", "1024")["failed"].as_u64() == Some(0)).then_some(()));
}

#[test]
fn sigterm_drains_in_flight_connections_then_fails_closed() {
    let Some(mut lab) = lab("sigterm_drains_in_flight_connections_then_fails_closed") else { return };
    assert!(curl(&lab, "frontend", "http://myapp/").0);
    let spawn_curl = |url: &str| {
        let argv: Vec<String> = ["curl", "-s", "-m", "10", "-o", "/dev/null", "-w", "%{http_code}", url]
            .iter()
            .map(|s| s.to_string())
            .collect();
        lab.pod_command("frontend", &argv)
            .unwrap()
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap()
    };
    // The lab's agents drain for 2 s: one request ends inside that, one outlives it.
    let short = spawn_curl("http://10.10.2.2:8080/delay/1200");
    let long = spawn_curl("http://10.10.2.2:8080/delay/6000");
    std::thread::sleep(Duration::from_millis(400));
    let stopping = Instant::now();
    lab.stop_agent("node1", "TERM").unwrap();
    let stopped_after = stopping.elapsed();

    let short = short.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&short.stdout), "200", "in-flight request finished during the drain");
    let long = long.wait_with_output().unwrap();
    assert_ne!(String::from_utf8_lossy(&long.stdout), "200", "a request outliving the drain timeout is cut");
    assert!(stopped_after < Duration::from_millis(4500), "agent exited {stopped_after:?} after SIGTERM");
    let log = std::fs::read_to_string(lab.agent_log_path("node1")).unwrap();
    assert!(log.contains("draining") && log.contains("agent stopped"), "drain logged");
    assert!(log.contains("drain timeout reached"), "the connection cut at the timeout is reported");
    // The kernel stopped steering new connections to it before anything else.
    let released = log.find("inbound listeners out of the kernel's table").expect("listeners released");
    assert!(released < log.find("drain timeout reached").unwrap_or(0), "listeners released first");
    // Once gone, new connections from its pods fail closed.
    let (ok, body) = curl(&lab, "frontend", "http://myapp/");
    assert!(!ok, "reached myapp after the agent stopped: {body}");
}

#[test]
fn a_process_in_a_container_cgroup_below_its_pod_is_captured() {
    // Kubernetes runs each container in a cgroup below its pod's: capture must find the
    // pod among the caller's ancestors, not only in its own cgroup.
    let Some(lab) = lab("a_process_in_a_container_cgroup_below_its_pod_is_captured") else { return };
    let pod = lab.pod("frontend").unwrap().clone();
    let container = lab.cgroup_root.join(&pod.cgroup).join("container-app");
    std::fs::create_dir_all(&container).unwrap();
    // Into the pod's netns first, then its (container) cgroup, as a runtime starts it.
    // nsenter keeps the host's mounts (`ip netns exec` would hide the cgroup2 mount);
    // without the pod's hosts file, the Service is dialed at its VIP.
    let (_, vip) = &lab.services["production/myapp"];
    let script = format!("echo $$ > {}/cgroup.procs && exec curl -s -m 5 http://{vip}/", container.display());
    let out = std::process::Command::new("nsenter")
        .args([&format!("--net=/var/run/netns/{}", pod.netns), "bash", "-c", &script])
        .output()
        .unwrap();
    let body = String::from_utf8_lossy(&out.stdout);
    // The container's processes have all exited; its cgroup can go.
    let _ = std::fs::remove_dir(&container);
    assert!(reply_pod(&body).is_some_and(|p| p.starts_with("myapp-")), "not captured from a child cgroup: {body}");
    let m = metrics(&lab, "node1");
    let through = opened(&m, "Outbound", "frontend", "myapp-v1") + opened(&m, "Outbound", "frontend", "myapp-v2");
    assert!(through >= 1, "through the agent");
}

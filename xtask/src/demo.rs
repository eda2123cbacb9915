//! `cargo xtask demo`: the lab with real traffic, and proof that what crosses the wire
//! between nodes is TLS 1.3.

use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;
use mesh_tests::harness::reply_pod;
use mesh_tests::lab::{DEFAULT_STATE_DIR, Lab};
use mesh_tests::wire::Capture;

use crate::lab;

pub fn run() -> anyhow::Result<()> {
    if Lab::exists(DEFAULT_STATE_DIR.as_ref()) {
        println!("[demo] a lab is already up; rebuilding it fresh");
        lab::down()?;
    }
    println!("[demo] building and starting the lab (2 nodes, 5 pods, one agent per node)");
    let mut lab = lab::up(None, false)?;
    print!("{}", lab.status());

    // Tunnel port only: the outside pod is not in the mesh, its plaintext is expected
    // and is not part of this check.
    let capture = Capture::start(&lab, "wire-hbone.pcap", "tcp port 15008").context("starting tcpdump")?;
    println!("\n[demo] traffic");
    let mut rows = Vec::new();
    for i in 0..4 {
        let out = lab.exec("frontend", &["curl", "-s", "-m", "5", "http://myapp/"])?;
        let pod = reply_pod(&String::from_utf8_lossy(&out.stdout))
            .unwrap_or_else(|| format!("FAILED: {}", String::from_utf8_lossy(&out.stderr).trim()));
        rows.push((format!("frontend -> http://myapp/ #{}", i + 1), pod));
    }
    let out =
        lab.exec("frontend", &["curl", "-s", "-m", "5", "http://legacy-service.production.svc.cluster.local/"])?;
    let pod = reply_pod(&String::from_utf8_lossy(&out.stdout)).unwrap_or_else(|| "FAILED".into());
    rows.push(("frontend -> legacy-service (FQDN)".into(), pod));
    let v1 = lab.pod("myapp-v1")?.ip;
    let out = lab.exec("outside", &["curl", "-s", "-m", "5", &format!("http://{v1}:8080/")])?;
    let pod = reply_pod(&String::from_utf8_lossy(&out.stdout)).unwrap_or_else(|| "FAILED".into());
    rows.push((format!("outside (not in mesh) -> {v1}:8080"), pod));
    let wire = capture.finish();

    for (what, answer) in &rows {
        println!("  {what:<45} answered by {answer}");
    }
    show_wire("wire between nodes (tunnel port 15008)", &wire);

    println!("\n[demo] agent metrics (istio_tcp_connections_opened_total)");
    for n in &lab.nodes {
        // As a scraper reads them: the metrics port with the lab's scraper token.
        let text = mesh_tests::harness::metrics(&lab, &n.name);
        for line in text.lines().filter(|l| l.starts_with("istio_tcp_connections_opened_total")) {
            println!("  {}: {}", n.name, shorten(line));
        }
    }
    let l7_ok = l7_routing(&lab)?;
    let ingress_ok = ingress(&lab)?;
    let security_ok = zero_trust(&lab)?;
    prometheus(&mut lab);
    let ok = rows.iter().all(|(_, a)| !a.starts_with("FAILED"))
        && wire.tls13_handshake
        && wire.plaintext.is_empty()
        && l7_ok
        && ingress_ok
        && security_ok;
    println!(
        "\n[demo] {}",
        if ok {
            "mesh works: traffic flows, the wire is TLS 1.3 only, and the Istio routes and policies apply as written"
        } else {
            "SOMETHING FAILED: see above and `cargo xtask lab logs node1`"
        }
    );
    println!(
        "\nThe lab is still up, with the reference DestinationRule, VirtualService, PeerAuthentication and \
         AuthorizationPolicy applied. Try:\n  \
         cargo xtask lab exec frontend -- curl -s -H 'x-version: v2' http://myapp/api/users\n  \
         cargo xtask lab exec frontend -- curl -s -X DELETE http://myapp/api/x\n  \
         cargo xtask lab delete examples/seed/authorizationpolicy-myapp.yaml   # lift the policy\n  \
         ip netns exec meshlab-client curl -s --cacert /run/meshlab/edge-ca.pem \\\n    \
         --resolve myapp.example.com:443:10.10.1.100 https://myapp.example.com/   # ingress\n  \
         cargo xtask lab delete examples/seed/virtualservice-myapp.yaml   # remove the routes again\n  \
         cargo xtask lab status\n  cargo xtask lab logs node1\n  cargo xtask lab down"
    );
    if !ok {
        anyhow::bail!("demo checks failed");
    }
    Ok(())
}

/// Starts a real Prometheus scraping both agents and prints what it read back: the
/// request graph Kiali draws and the connection counts. Informational: a machine
/// without Prometheus still runs the demo.
fn prometheus(lab: &mut Lab) {
    println!(
        "\n[demo] Prometheus (Debian's prometheus in pod `outside`, scraping both agents with the scraper's token)"
    );
    if let Err(e) = lab.start_prometheus() {
        println!("  not started: {e:#}");
        return;
    }
    // Traffic after the first scrape, so rates have two points.
    for _ in 0..5 {
        let _ = lab.exec("frontend", &["curl", "-s", "-m", "5", "-o", "/dev/null", "http://myapp/"]);
        let _ = lab.exec("frontend", &["curl", "-s", "-m", "5", "-o", "/dev/null", "http://legacy-service/health"]);
    }
    std::thread::sleep(Duration::from_secs(3));
    let graph =
        "sum(istio_requests_total{reporter=\"destination\"})by(source_workload,destination_workload,response_code)";
    println!(
        "  query: cargo xtask lab exec outside -- curl -s 'http://{}/api/v1/query?query=<PromQL>'",
        mesh_tests::lab::PROMETHEUS_ADDR
    );
    println!("  {graph}:");
    match lab.prometheus_query(graph) {
        Ok(rows) if !rows.is_empty() => {
            for (m, v) in rows {
                let s = |k: &str| m[k].as_str().unwrap_or("-").to_string();
                println!(
                    "    {:<15} -> {:<15} {:<4} {v}",
                    s("source_workload"),
                    s("destination_workload"),
                    s("response_code")
                );
            }
        }
        Ok(_) => println!("    (no series yet)"),
        Err(e) => println!("    query failed: {e:#}"),
    }
    let tcp = "sum(istio_tcp_connections_opened_total)by(reporter,connection_security_policy)";
    println!("  {tcp}:");
    // Both agents' latest scrape: each reports one side.
    let both = |rows: &[(serde_json::Value, f64)]| {
        ["source", "destination"].iter().all(|r| rows.iter().any(|(m, _)| m["reporter"] == *r))
    };
    let mut read = lab.prometheus_query(tcp);
    for _ in 0..20 {
        if read.as_ref().is_ok_and(|rows| both(rows)) {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
        read = lab.prometheus_query(tcp);
    }
    if let Ok(rows) = read {
        for (m, v) in rows {
            let s = |k: &str| m[k].as_str().unwrap_or("-").to_string();
            println!("    {:<12} {:<12} {v}", s("reporter"), s("connection_security_policy"));
        }
    }
}

/// Applies the reference DestinationRule and VirtualService as written and shows their
/// routes: the x-version header, the 90/10 split on /api, the default route.
fn l7_routing(lab: &mesh_tests::lab::Lab) -> anyhow::Result<bool> {
    println!("\n[demo] L7 routing with the reference configs (examples/seed), applied as written");
    for f in ["destinationrule-myapp.yaml", "virtualservice-myapp.yaml"] {
        lab.apply(&crate::root().join("examples/seed").join(f))?;
        println!("  applied {f}");
    }
    let pods = |headers: &[&str], url: &str| -> anyhow::Result<Vec<String>> {
        let mut argv = vec!["curl", "-s", "-m", "5", "-H", "connection: close"];
        for h in headers {
            argv.extend(["-H", h]);
        }
        argv.push(url);
        let out = lab.exec("frontend", &argv)?;
        let text = String::from_utf8_lossy(&out.stdout).replace("}{", "}\n{");
        Ok(text
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?["pod"].as_str().map(str::to_owned))
            .collect())
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while pods(&["x-version: v2"], "http://myapp/probe?i=[1-6]")?.iter().filter(|p| *p == "myapp-v2").count() < 6 {
        if std::time::Instant::now() > deadline {
            println!("  routes not in force after 10 s");
            return Ok(false);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let count = |v: &[String], pod: &str| v.iter().filter(|p| *p == pod).count();
    let header = pods(&["x-version: v2"], "http://myapp/?i=[1-20]")?;
    let api = pods(&[], "http://myapp/api/items?i=[1-200]")?;
    let rest = pods(&[], "http://myapp/home?i=[1-20]")?;
    println!("  {:<45} myapp-v2 {}/{}", "x-version: v2 -> http://myapp/", count(&header, "myapp-v2"), header.len());
    println!(
        "  {:<45} myapp-v1 {}, myapp-v2 {} (90/10)",
        "http://myapp/api/items x200",
        count(&api, "myapp-v1"),
        count(&api, "myapp-v2")
    );
    println!("  {:<45} myapp-v1 {}/{}", "http://myapp/home (default route)", count(&rest, "myapp-v1"), rest.len());
    Ok(count(&header, "myapp-v2") == 20 && api.len() == 200 && count(&rest, "myapp-v1") == 20)
}

/// Applies the reference Gateway as written and reaches myapp from outside the cluster
/// through the lab's gateway pod: http is redirected, https is routed by the reference
/// VirtualService, and the certificate is the credentialName Secret's.
fn ingress(lab: &mesh_tests::lab::Lab) -> anyhow::Result<bool> {
    use mesh_tests::lab::CLIENT_NETNS;
    println!("\n[demo] ingress: the reference Gateway, served by the gateway pod, from a client outside the cluster");
    lab.apply(&crate::root().join("examples/seed/gateway-myapp.yaml"))?;
    println!("  applied gateway-myapp.yaml");
    let ca = lab.edge_ca_path().display().to_string();
    let curl = |extra: &[&str]| -> anyhow::Result<String> {
        let mut argv = vec!["ip", "netns", "exec", CLIENT_NETNS, "curl", "-s", "-m", "5", "--cacert", &ca];
        argv.extend(["-w", "\n@@%{http_code} %{redirect_url}"]);
        argv.extend(extra);
        let out = mesh_tests::sys::output(&argv)?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let redirect = loop {
        let r = curl(&["--resolve", "myapp.example.com:80:10.10.1.100", "http://myapp.example.com/shop"])?;
        if r.contains("@@301") || std::time::Instant::now() > deadline {
            break r;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let (_, redirect) = redirect.rsplit_once("@@").unwrap_or(("", &redirect));
    println!("  {:<45} {redirect}", "http://myapp.example.com/shop");
    let https = |headers: &[&str]| -> anyhow::Result<(String, Option<String>)> {
        let mut argv = vec!["--resolve", "myapp.example.com:443:10.10.1.100"];
        for h in headers {
            argv.extend(["-H", h]);
        }
        argv.push("https://myapp.example.com/");
        let r = curl(&argv)?;
        let (body, tail) = r.rsplit_once("@@").unwrap_or((&r, ""));
        let pod =
            serde_json::from_str::<serde_json::Value>(body).ok().and_then(|v| v["pod"].as_str().map(String::from));
        Ok((tail.split(' ').next().unwrap_or("").to_string(), pod))
    };
    let v2 = https(&["x-version: v2"])?;
    let plain = https(&[])?;
    println!("  {:<45} {} {}", "https (x-version: v2), edge CA verified", v2.0, v2.1.as_deref().unwrap_or("-"));
    println!("  {:<45} {} {}", "https (default route)", plain.0, plain.1.as_deref().unwrap_or("-"));
    Ok(redirect.starts_with("301 https://myapp.example.com/shop")
        && v2 == ("200".into(), Some("myapp-v2".into()))
        && plain == ("200".into(), Some("myapp-v1".into())))
}

/// Applies the reference PeerAuthentication and AuthorizationPolicy as written and shows
/// what they allow: plaintext refused by STRICT myapp and accepted by PERMISSIVE
/// legacy-service; frontend's identity on /api, anyone on /health, nothing else.
fn zero_trust(lab: &Lab) -> anyhow::Result<bool> {
    println!("\n[demo] zero trust with the reference policies (examples/seed), applied as written");
    for f in ["peerauthentication.yaml", "authorizationpolicy-myapp.yaml"] {
        lab.apply(&crate::root().join("examples/seed").join(f))?;
        println!("  applied {f}");
    }
    let code = |pod: &str, args: &[&str]| -> anyhow::Result<String> {
        let mut argv = vec!["curl", "-s", "-m", "3", "-o", "/dev/null", "-w", "%{http_code}"];
        argv.extend(args);
        Ok(String::from_utf8_lossy(&lab.exec(pod, &argv)?.stdout).into_owned())
    };
    let (v1, legacy) = (lab.pod("myapp-v1")?.ip, lab.pod("legacy-service")?.ip);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while code("frontend", &["http://myapp/other"])? != "403" {
        if std::time::Instant::now() > deadline {
            println!("  policies not in force after 10 s");
            return Ok(false);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let (url_v1, url_legacy) = (format!("http://{v1}:8080/"), format!("http://{legacy}:8080/"));
    let checks: [(&str, &str, Vec<&str>, &str); 6] = [
        ("outside", "plaintext -> myapp-v1 (STRICT)", vec![&url_v1], "000"),
        ("outside", "plaintext -> legacy-service (PERMISSIVE)", vec![&url_legacy], "200"),
        ("frontend", "GET /api/users (frontend's identity)", vec!["http://myapp/api/users"], "200"),
        ("frontend", "DELETE /api/x (not GET or POST)", vec!["-X", "DELETE", "http://myapp/api/x"], "403"),
        ("legacy-service", "GET /health (any identity)", vec!["http://myapp/health"], "200"),
        ("legacy-service", "GET /api/users (not frontend)", vec!["http://myapp/api/users"], "403"),
    ];
    let mut ok = true;
    for (pod, what, args, want) in checks {
        let got = code(pod, &args)?;
        ok &= got == want;
        let shown = |c: &str| if c == "000" { "refused".to_string() } else { c.to_string() };
        let verdict =
            if got == want { "as the policy says".to_string() } else { format!("WRONG, want {}", shown(want)) };
        println!("  {pod:<15} {what:<42} {:<8} {verdict}", shown(&got));
    }
    Ok(ok)
}

/// Prints what a capture on the wire saw; true when it was TLS 1.3 and nothing else.
fn show_wire(title: &str, wire: &mesh_tests::wire::WireReport) -> bool {
    println!("\n[demo] {title}, {} bytes captured in {}", wire.bytes, wire.pcap.display());
    println!("  TLS 1.3 handshake seen:        {}", if wire.tls13_handshake { "yes" } else { "NO" });
    println!(
        "  plaintext HTTP visible:        {}",
        if wire.plaintext.is_empty() { "none".to_string() } else { wire.plaintext.join(", ") }
    );
    wire.tls13_handshake && wire.plaintext.is_empty()
}

fn shorten(line: &str) -> String {
    let keep = ["direction", "source_workload=", "destination_workload=", "connection_security_policy"];
    let (labels, value) = line.rsplit_once(' ').unwrap_or((line, ""));
    let inner = labels.split_once('{').map(|(_, r)| r.trim_end_matches('}')).unwrap_or("");
    let picked: Vec<&str> = inner.split(',').filter(|kv| keep.iter().any(|k| kv.starts_with(k))).collect();
    format!("{{{}}} {value}", picked.join(","))
}

/// `cargo xtask demo --clusters 2`: the two-cluster lab (`examples/multicluster`) with
/// real traffic: a Service only cluster2 has, reached through network2's east-west
/// gateway as the client itself; locality preference, failover to cluster2 when the
/// local pod dies, and back; cluster2's policy on a cluster1 identity; and the wire
/// between the networks carrying TLS 1.3 only.
pub fn run_two_clusters() -> anyhow::Result<()> {
    use mesh_tests::harness::{answered_by, inbound_from};
    if Lab::exists(DEFAULT_STATE_DIR.as_ref()) {
        println!("[demo] a lab is already up; rebuilding it fresh");
        lab::down()?;
    }
    println!("[demo] building and starting two clusters on two networks (examples/multicluster)");
    let mut clusters = lab::up_two(false)?;
    print!("{}", clusters.status());
    let capture =
        Capture::start(&clusters.cluster1, "wire-two-clusters.pcap", "tcp port 15008").context("starting tcpdump")?;
    let (greeter, helloworld, gateway2) = ("http://10.97.0.20/", "http://10.96.0.10:5000/", "10.20.1.100");
    let ask = |clusters: &mesh_tests::multicluster::Clusters, url: &str| answered_by(&clusters.cluster1, "sleep", url);
    let wait_for = |what: &str, f: &mut dyn FnMut() -> bool| -> bool {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !f() {
            if std::time::Instant::now() > deadline {
                println!("  {what}: not after 20 s");
                return false;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        true
    };
    let mut ok = true;
    println!("\n[demo] cluster1's sleep -> greeter, a Service only cluster2 has");
    ok &= wait_for("cluster2 discovered", &mut || ask(&clusters, greeter).is_some());
    let (pod, peer) = ask(&clusters, greeter).unwrap_or_default();
    let sleep = "spiffe://cluster.local/ns/sample/sa/sleep";
    let seen = inbound_from(&clusters.cluster2, "c2-node2", "greeter", sleep);
    println!("  answered by {pod}, which saw the connection come from {peer} (network2's east-west gateway)");
    println!("  greeter's agent authenticated {sleep}: {seen} connection(s)");
    ok &= pod == "greeter" && peer.starts_with(gateway2) && seen > 0;

    println!("\n[demo] helloworld is in both clusters: the local one first, cluster2 when it dies, and back");
    let served = |clusters: &mesh_tests::multicluster::Clusters, n: usize| -> Vec<String> {
        (0..n).filter_map(|_| ask(clusters, helloworld)).map(|(p, _)| p).collect::<Vec<_>>()
    };
    let before = served(&clusters, 4);
    println!("  sleep -> helloworld x4: {}", before.join(", "));
    ok &= before.len() == 4 && before.iter().all(|p| p == "helloworld-v1");
    clusters.cluster1.kill_app("helloworld-v1")?;
    let died = std::time::Instant::now();
    ok &= wait_for("failover", &mut || ask(&clusters, helloworld).is_some_and(|(p, _)| p == "helloworld-v2"));
    println!("  helloworld-v1's app killed: cluster2 serves {:?} later", died.elapsed());
    let after = served(&clusters, 4);
    println!("  sleep -> helloworld x4: {}", after.join(", "));
    ok &= after.iter().all(|p| p == "helloworld-v2");
    clusters.cluster1.restart_app("helloworld-v1")?;
    ok &= wait_for("failback", &mut || ask(&clusters, helloworld).is_some_and(|(p, _)| p == "helloworld-v1"));
    println!("  helloworld-v1 back: after its ejection ends, sleep -> helloworld: {}", served(&clusters, 2).join(", "));

    println!("\n[demo] cluster2's AuthorizationPolicy on cluster1's identity");
    let deny = crate::root().join("examples/multicluster/deny-sleep.yaml");
    clusters.cluster2.apply(&deny)?;
    ok &= wait_for("DENY in force", &mut || ask(&clusters, greeter).is_none());
    println!("  DENY sleep on greeter (applied to cluster2): sleep -> greeter refused");
    clusters.cluster2.delete(Path::new("deny-sleep.yaml"))?;
    ok &= wait_for("DENY lifted", &mut || ask(&clusters, greeter).is_some());
    println!("  lifted: sleep -> greeter answered again");

    let wire = capture.finish();
    ok &= show_wire("the wire (port 15008: tunnels to the gateways)", &wire);
    println!(
        "\n[demo] {}",
        if ok {
            "two clusters, one mesh: discovery through remote secrets, double HBONE through the east-west \
             gateways, locality failover and back, identities verified end to end"
        } else {
            "SOMETHING FAILED: see above and `cargo xtask lab logs node1`"
        }
    );
    println!(
        "\nBoth clusters are still up. Try:\n  \
         cargo xtask lab exec sleep -- curl -s http://10.97.0.20/\n  \
         cargo xtask lab status\n  cargo xtask lab logs c2-node2\n  cargo xtask lab down"
    );
    if !ok {
        anyhow::bail!("demo checks failed");
    }
    Ok(())
}

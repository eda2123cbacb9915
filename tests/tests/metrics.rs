//! The agents' metrics, as a scraper and as a tenant see them: a real Prometheus with
//! the scraper's token reads every agent; a pod without one reads nothing; and the
//! series of a pod that was deleted leave the agents.
#![forbid(unsafe_code)]

use mesh_tests::harness::{DENY_ADMIN, apply_seed, curl, eventually, lab, metrics};
use mesh_tests::lab::Lab;

/// `curl` from `pod`: the status code and body.
fn get(lab: &Lab, pod: &str, url: &str, headers: &[&str]) -> (String, String) {
    let mut argv = vec!["curl", "-s", "-m", "5", "-w", "\n%{http_code}"];
    for h in headers {
        argv.extend(["-H", h]);
    }
    argv.push(url);
    let out = lab.exec(pod, &argv).unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.to_string(), body.to_string())
}

#[test]
fn prometheus_scrapes_the_agents_with_its_token_and_pods_read_nothing() {
    let Some(mut lab) = lab("prometheus_scrapes_the_agents_with_its_token_and_pods_read_nothing") else { return };
    if mesh_tests::sys::which("prometheus").is_none() {
        // `cargo xtask setup` installs it; without it the lab tests above still ran.
        assert!(std::env::var_os("MESH_REQUIRE_LAB").is_none(), "prometheus is not installed (cargo xtask setup)");
        eprintln!("skipping the Prometheus part: prometheus is not installed (cargo xtask setup)");
        return;
    }
    let gateways: Vec<String> = lab.nodes.iter().map(|n| format!("{}:15020", n.gateway)).collect();

    // A pod reaches the metrics port and is refused; readiness stays open to probes.
    let url = format!("http://{}/metrics", gateways[0]);
    for pod in ["frontend", "outside"] {
        let (code, body) = get(&lab, pod, &url, &[]);
        assert_eq!(code, "401", "{pod} read the metrics: {body}");
        assert!(!body.contains("istio_"), "{body}");
        let (code, _) = get(&lab, pod, &url, &["Authorization: Bearer guessed"]);
        assert_eq!(code, "401", "{pod} with a made-up token");
    }
    let ready = format!("http://{}:15021/healthz/ready", lab.nodes[0].gateway);
    assert_eq!(get(&lab, "outside", &ready, &[]).0, "200", "the readiness probe needs no token");

    // Traffic, so there is something to scrape: HTTP the agent routes (the reference
    // DestinationRule puts myapp's requests through L7), measured per request.
    apply_seed(&lab, "destinationrule-myapp.yaml");
    eventually("frontend's requests to myapp are routed at L7", || {
        assert!(curl(&lab, "frontend", "http://myapp/").0);
        metrics(&lab, "node1").contains("istio_requests_total{reporter=\"source\"").then_some(())
    });
    let before = requests_measured(&metrics(&lab, "node1"));
    const SENT: u64 = 5;
    for _ in 0..SENT {
        assert!(curl(&lab, "frontend", "http://myapp/").0);
    }
    eventually("each request's duration is measured", || {
        (requests_measured(&metrics(&lab, "node1")) == before + SENT).then_some(())
    });

    // Prometheus in the `outside` pod (as a cluster runs it: a pod scraping each
    // node's agent), one job with the scraper's token and one without.
    lab.start_prometheus().unwrap();
    let (_, body) = get(&lab, "outside", &format!("http://{}/api/v1/targets", mesh_tests::lab::PROMETHEUS_ADDR), &[]);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    let targets = v["data"]["activeTargets"].as_array().cloned().unwrap_or_default();
    assert_eq!(targets.len(), gateways.len() + 1, "{body}");
    for t in &targets {
        let job = t["labels"]["job"].as_str().unwrap_or_default();
        match job {
            "mesh-agents" => assert_eq!(t["health"], "up", "the scraper with its token: {t}"),
            _ => {
                assert_eq!(t["health"], "down", "without a token: {t}");
                assert!(t["lastError"].as_str().unwrap_or_default().contains("401"), "{t}");
            }
        }
    }
    // And what it stored is the agents' own figures.
    let stored = lab.prometheus_query("istio_mesh_enrolled_pods").unwrap();
    let enrolled: f64 = stored.iter().map(|(_, v)| v).sum();
    let lab_enrolled = lab.pods.iter().filter(|p| p.namespace == "production").count() as f64;
    assert_eq!(enrolled, lab_enrolled, "{stored:?}");
    // The request duration histogram, as Istio's dashboards query it.
    let series = |q: &str| lab.prometheus_query(q).unwrap();
    let query = |q: &str| -> Vec<f64> { series(q).into_iter().map(|(_, v)| v).collect() };
    let measured = eventually("Prometheus has the duration histogram", || {
        let n = query("sum(istio_request_duration_milliseconds_count{reporter=\"source\"})");
        n.first().copied().filter(|n| *n as u64 == before + SENT)
    });
    assert_eq!(measured as u64, before + SENT);
    let p99 =
        query("histogram_quantile(0.99,sum(istio_request_duration_milliseconds_bucket{reporter=\"source\"})by(le))");
    assert!(
        p99.first().is_some_and(|ms| *ms > 0.0 && *ms <= 5000.0),
        "p99 of {} lab requests: {p99:?} ms",
        before + SENT
    );

    kiali_graph_sees_the_traffic_sent(&lab, &series);
    grafana_dashboard_reads_what_the_agents_export(&lab);
    lab.stop_helper("prometheus").unwrap();
}

/// What Kiali's graph asks Prometheus (its query, its labels), checked against
/// traffic sent now: HTTP to legacy-service, which has no route and no L7 policy, so
/// only its own agent (reporter=destination) reads the requests; raw TCP to myapp's
/// `tcp-echo` port, spliced and counted in bytes as they pass.
fn kiali_graph_sees_the_traffic_sent(lab: &Lab, series: &dyn Fn(&str) -> Vec<(serde_json::Value, f64)>) {
    let echo = mesh_tests::harness::root().join("target/debug/mesh-echo").display().to_string();
    let send = |ok: usize, teapots: usize, conns: &str| {
        for _ in 0..ok {
            assert_eq!(get(lab, "frontend", "http://legacy-service/", &[]).0, "200");
        }
        for _ in 0..teapots {
            assert_eq!(get(lab, "frontend", "http://legacy-service/status/418", &[]).0, "418");
        }
        let out =
            lab.exec("frontend", &[&echo, "load", "10.96.0.20:9000", "--conns", conns, "--bytes", "4096"]).unwrap();
        assert!(out.status.success(), "load: {}", String::from_utf8_lossy(&out.stderr));
    };
    // The series exist before the traffic measured: rate() counts increases.
    send(1, 1, "1");
    let by_code = "sum(istio_requests_total{reporter=\"destination\",source_workload=\"frontend\",\
                   destination_workload=\"legacy-service\"})by(response_code)";
    let counts = |code: &str| -> u64 {
        series(by_code).iter().find(|(m, _)| m["response_code"] == code).map_or(0, |(_, v)| *v as u64)
    };
    eventually("Prometheus has legacy-service's requests", || (counts("200") >= 1 && counts("418") >= 1).then_some(()));
    let before = (counts("200"), counts("418"));
    send(4, 2, "4");
    // The agent's own count, as Prometheus stores it: what was sent.
    eventually("Prometheus has every request, by response code", || {
        (counts("200") == before.0 + 4 && counts("418") == before.1 + 2).then_some(())
    });

    // Kiali's graph query (its grouping labels, as its graph appender sends them).
    let kiali = "sum(rate(istio_requests_total{reporter=\"destination\"}[1m]))by(source_cluster,\
                 source_workload_namespace,source_workload,source_canonical_service,source_canonical_revision,\
                 destination_cluster,destination_service_namespace,destination_service,destination_service_name,\
                 destination_workload_namespace,destination_workload,destination_canonical_service,\
                 destination_canonical_revision,request_protocol,response_code,grpc_response_status,response_flags)>0";
    let edges = series(kiali);
    let edge = |code: &str| {
        edges.iter().find(|(m, _)| {
            m["source_workload"] == "frontend"
                && m["destination_workload"] == "legacy-service"
                && m["response_code"] == code
        })
    };
    for code in ["200", "418"] {
        let (m, rate) = edge(code).unwrap_or_else(|| panic!("no frontend -> legacy-service {code} edge in {edges:?}"));
        assert!(*rate > 0.0, "{m}");
        assert_eq!(m["source_workload_namespace"], "production", "{m}");
        assert_eq!(m["source_canonical_service"], "frontend", "{m}");
        assert_eq!(m["source_cluster"], "Kubernetes", "{m}");
        assert_eq!(m["destination_service"], "legacy-service.production.svc.cluster.local", "{m}");
        assert_eq!(m["destination_service_name"], "legacy-service", "{m}");
        assert_eq!(m["destination_canonical_service"], "legacy-service", "{m}");
        assert_eq!(m["request_protocol"], "http", "{m}");
        assert_eq!(m["response_flags"], "-", "{m}");
    }
    // The security view: mTLS between them, under the verified identity.
    let secured = series(
        "sum(istio_requests_total{reporter=\"destination\",source_workload=\"frontend\",\
         destination_workload=\"legacy-service\"})by(connection_security_policy,source_principal)",
    );
    assert_eq!(secured.len(), 1, "{secured:?}");
    assert_eq!(secured[0].0["connection_security_policy"], "mutual_tls");
    assert_eq!(secured[0].0["source_principal"], "spiffe://cluster.local/ns/production/sa/frontend");

    // TCP: bytes from frontend to myapp's tcp-echo port, at both ends. Five
    // connections of 4096 bytes each way, at least (other tests may have sent more).
    let tcp = |metric: &str, reporter: &str| -> f64 {
        let q = format!(
            "sum({metric}{{reporter=\"{reporter}\",source_workload=\"frontend\",\
             destination_service=\"myapp.production.svc.cluster.local\",request_protocol=\"tcp\"}})"
        );
        series(&q).first().map_or(0.0, |(_, v)| *v)
    };
    eventually("the TCP byte counters reached Prometheus", || {
        let all = ["istio_tcp_received_bytes_total", "istio_tcp_sent_bytes_total"]
            .iter()
            .flat_map(|m| [tcp(m, "source"), tcp(m, "destination")])
            .all(|bytes| bytes >= 5.0 * 4096.0);
        all.then_some(())
    });
    let rate = series(
        "sum(rate(istio_tcp_received_bytes_total{reporter=\"destination\",source_workload=\"frontend\"}[1m]))\
         by(destination_workload)",
    );
    assert!(rate.iter().any(|(_, r)| *r > 0.0), "TCP byte rate: {rate:?}");
}

/// The Grafana dashboard of `deploy/addons`: every query is one Prometheus accepts, and
/// every metric it names is one a real agent exports (under the same job name).
fn grafana_dashboard_reads_what_the_agents_export(lab: &Lab) {
    // A family is exported once it has a series: a refusal gives the denial panel one.
    mesh_tests::harness::apply_yaml(lab, "deny-admin.yaml", DENY_ADMIN);
    eventually("a request is refused by policy", || {
        (get(lab, "frontend", "http://legacy-service/admin", &[]).0 == "403").then_some(())
    });
    // Counted only when a cap is hit, which this test does not provoke (hostile.rs does).
    const ONLY_WHEN_IT_HAPPENS: &[&str] = &["istio_mesh_connections_refused_total"];
    let path = mesh_tests::harness::root().join("deploy/addons/dashboards/mesh-agents.json");
    let dashboard: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let exposition = metrics(lab, "node1") + &metrics(lab, "node2");
    let exported: std::collections::BTreeSet<String> = exposition
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .flat_map(|l| {
            let mut it = l.split_whitespace();
            let (name, kind) = (it.next().unwrap_or_default().to_string(), it.next().unwrap_or_default());
            match kind {
                "counter" => vec![format!("{name}_total")],
                "histogram" => ["_bucket", "_sum", "_count"].iter().map(|s| format!("{name}{s}")).collect(),
                _ => vec![name],
            }
        })
        .collect();
    let exprs: Vec<String> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .filter_map(|t| t["expr"].as_str().map(str::to_string))
        .collect();
    assert!(exprs.len() >= 15, "{exprs:?}");
    for expr in &exprs {
        for name in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
            if (name.starts_with("istio_") || name.starts_with("process_")) && !ONLY_WHEN_IT_HAPPENS.contains(&name) {
                assert!(exported.contains(name), "the dashboard reads {name}, which no agent exports: {expr}");
            }
        }
        let answer = lab.prometheus_answer(&expr.replace("$namespace", ".*")).unwrap();
        assert_eq!(answer["status"], "success", "Prometheus refused the dashboard's {expr}: {answer}");
    }
    // And with the lab's traffic, its first panel has a series.
    let first = exprs[0].replace("$namespace", ".*");
    assert!(!lab.prometheus_query(&first).unwrap().is_empty(), "{first}");
}

/// `istio_request_duration_milliseconds_count` of every series an agent reports as the
/// source.
fn requests_measured(metrics: &str) -> u64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("istio_request_duration_milliseconds_count{reporter=\"source\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

#[test]
fn the_series_of_a_deleted_pod_leave_the_agents() {
    let Some(mut lab) = lab("the_series_of_a_deleted_pod_leave_the_agents") else { return };
    let manifest = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: short-lived\n  namespace: production\n  \
                    uid: 3f0e2d1c-0000-4000-8000-00000000005a\n  labels: {app: short-lived}\nspec:\n  \
                    serviceAccountName: short-lived\n  nodeName: node1\n  \
                    containers: [{name: app, image: mesh-echo, ports: [{name: http, containerPort: 8080}]}]\n\
                    status: {podIP: 10.10.1.90}\n";
    let pod = lab.add_pod(manifest).unwrap();
    assert!(pod.failed.is_none(), "{:?}", pod.failed);
    assert!(curl(&lab, "frontend", "http://myapp/").0);
    // It talks to a pod on the other node: both agents count it. node2's agent learns
    // of the new pod on its own schedule (until then it names the source unknown), so
    // the request is sent again until both have it.
    let named = |node: &str| metrics(&lab, node).lines().any(|l| l.contains("\"short-lived\""));
    eventually("both agents count the pod", || {
        assert!(curl(&lab, "short-lived", "http://legacy-service/").0);
        (named("node1") && named("node2")).then_some(())
    });

    // Deleted from the API (the config directory here): its series go on both nodes.
    std::fs::remove_file(lab.config_dir().join("pod-production-short-lived.yaml")).unwrap();
    eventually("the pod's series expire", || (!named("node1") && !named("node2")).then_some(()));
    // The others stay.
    let node1 = metrics(&lab, "node1");
    assert!(node1.contains("source_workload=\"frontend\""), "{node1}");
}

/// The agents' own health and the kernel's counters, as a scraper reads them: the
/// process (memory, CPU, descriptors), the runtime, the certificates, the BPF maps'
/// fill, and what the kernel programs did (redirected, steered).
#[test]
fn agents_report_their_health_and_the_kernels_counters() {
    let Some(lab) = lab("agents_report_their_health_and_the_kernels_counters") else { return };
    assert!(curl(&lab, "frontend", "http://myapp/").0);
    // Plaintext from a pod outside the mesh to an enrolled pod on node1: steered to
    // its agent by sk_lookup (PERMISSIVE by default).
    assert!(curl(&lab, "outside", "http://10.10.1.3:8080/").0);
    let value = |text: &str, prefix: &str| -> Option<f64> {
        text.lines().find(|l| l.starts_with(prefix))?.rsplit(' ').next()?.parse().ok()
    };
    let node1 = eventually("node1 has counted the kernel's events", || {
        let m = metrics(&lab, "node1");
        let redirected = value(&m, "istio_mesh_kernel_events_total{event=\"outbound_redirected\"}")?;
        let steered = value(&m, "istio_mesh_kernel_events_total{event=\"inbound_steered\"}")?;
        (redirected >= 1.0 && steered >= 1.0).then_some(m)
    });
    assert_eq!(value(&node1, "istio_mesh_kernel_events_total{event=\"record_failed\"}"), Some(0.0), "{node1}");
    assert!(value(&node1, "process_resident_memory_bytes ").is_some_and(|v| v > 1e6), "{node1}");
    assert!(value(&node1, "process_cpu_seconds_total ").is_some_and(|v| v > 0.0), "{node1}");
    assert!(value(&node1, "process_open_fds ").is_some_and(|v| v > 3.0), "{node1}");
    assert!(value(&node1, "process_max_fds ").is_some_and(|v| v > 1024.0), "{node1}");
    assert!(value(&node1, "istio_mesh_tokio_alive_tasks ").is_some_and(|v| v > 0.0), "{node1}");
    assert!(value(&node1, "istio_mesh_workload_certs ").is_some_and(|v| v >= 1.0), "{node1}");
    assert!(value(&node1, "istio_agent_cert_expiry_seconds ").is_some_and(|v| v > 0.0), "{node1}");
    assert_eq!(value(&node1, "istio_mesh_bpf_map_capacity{map=\"ENROLLED_PODS\"}"), Some(4096.0), "{node1}");
    assert!(value(&node1, "istio_mesh_bpf_map_entries{map=\"ORIG_DST\"}").is_some(), "{node1}");

    // What the agent holds, as `meshctl proxy-config` reads it on the node.
    let meshctl = mesh_tests::harness::root().join("target/debug/meshctl").display().to_string();
    let netns = lab.node("node1").unwrap().netns.clone();
    let proxy_config = |section: &str| {
        let out = mesh_tests::sys::output(&["ip", "netns", "exec", &netns, &meshctl, "proxy-config", section]).unwrap();
        assert!(out.status.success(), "{section}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let secrets = proxy_config("secrets");
    assert!(secrets.contains("spiffe://cluster.local/ns/production/sa/frontend"), "{secrets}");
    assert!(!secrets.contains("PRIVATE KEY"), "{secrets}");
    let endpoints = proxy_config("endpoints");
    let line = endpoints
        .lines()
        .find(|l| l.split_whitespace().next() == Some("production/myapp") && l.contains("10.10.2.2:8080"));
    assert!(line.is_some_and(|l| l.ends_with("HBONE")), "{endpoints}");
    let policies = proxy_config("policies");
    let frontend = policies.lines().find(|l| l.split_whitespace().next() == Some("production/frontend"));
    assert!(frontend.is_some_and(|l| l.contains("PERMISSIVE")), "{policies}");
    let clusters = proxy_config("clusters");
    let myapp = clusters.lines().find(|l| l.split_whitespace().take(2).eq(["production", "myapp"]));
    assert!(myapp.is_some_and(|l| l.contains("10.96.0.20") && l.ends_with(" 2")), "{clusters}");
}

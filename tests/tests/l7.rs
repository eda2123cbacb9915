//! L7 traffic management in the lab, with the user's reference configs applied as
//! written (`examples/seed`) and real clients (curl).
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use mesh_tests::harness::{apply_seed, apply_yaml, eventually, lab, metrics, opened, reply_pod, root};
use mesh_tests::lab::Lab;

/// curl from frontend; returns (status codes, seconds taken, pod that answered) per
/// request. `urls` may use curl's `[1-N]` globbing; `parallel` runs them at once.
fn requests(lab: &Lab, urls: &str, headers: &[&str], parallel: bool) -> Vec<(u16, f64, Option<String>)> {
    let mut argv = vec!["curl", "-s", "-m", "20", "-w", "\n@@ %{http_code} %{time_total}\n"];
    if parallel {
        argv.extend(["-Z", "--parallel-immediate", "--parallel-max", "300"]);
    }
    for h in headers {
        argv.extend(["-H", h]);
    }
    argv.push(urls);
    let out = lab.exec("frontend", &argv).unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut result = Vec::new();
    let mut body = String::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("@@ ") {
            let mut f = rest.split_whitespace();
            let code = f.next().and_then(|c| c.parse().ok()).unwrap_or(0);
            let secs = f.next().and_then(|c| c.parse().ok()).unwrap_or(0.0);
            result.push((code, secs, reply_pod(&body)));
            body.clear();
        } else {
            body.push_str(line);
        }
    }
    result
}

fn count_pods(results: &[(u16, f64, Option<String>)]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for (_, _, pod) in results {
        *m.entry(pod.clone().unwrap_or_else(|| "none".into())).or_default() += 1;
    }
    m
}

/// Requests the echo app in `pod` saw on `path` (read over the pod's loopback).
fn seen(lab: &Lab, pod: &str, path: &str) -> (u64, Vec<String>) {
    let out = lab.exec(pod, &["curl", "-s", "http://127.0.0.1:8080/_stats"]).unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let count = v[path]["count"].as_u64().unwrap_or(0);
    let hosts = v[path]["hosts"].as_array().map(|a| a.iter().filter_map(|h| h.as_str().map(String::from)).collect());
    (count, hosts.unwrap_or_default())
}

/// Waits until routing sends requests with `headers` to `want_pod`: six requests on
/// six connections must all land there (L4 round robin, before the rule applies,
/// alternates between pods and cannot pass by chance).
fn wait_routed(lab: &Lab, what: &str, headers: &[&str], want_pod: &str) {
    let mut h = headers.to_vec();
    h.push("connection: close");
    eventually(what, || {
        let r = requests(lab, "http://myapp/probe?i=[1-6]", &h, false);
        (r.len() == 6 && r.iter().all(|x| x.2.as_deref() == Some(want_pod))).then_some(())
    });
}

#[test]
fn seed_virtualservice_routes_header_to_v2_splits_api_and_defaults_to_v1() {
    let Some(lab) = lab("seed_virtualservice_routes_header_to_v2_splits_api_and_defaults_to_v1") else { return };
    apply_seed(&lab, "destinationrule-myapp.yaml");
    apply_seed(&lab, "virtualservice-myapp.yaml");
    wait_routed(&lab, "header route applied", &["x-version: v2"], "myapp-v2");

    let v2 = requests(&lab, "http://myapp/anything?i=[1-30]", &["x-version: v2"], false);
    assert_eq!(count_pods(&v2), BTreeMap::from([("myapp-v2".into(), 30)]), "x-version: v2 always reaches v2");

    let api = requests(&lab, "http://myapp/api/items?i=[1-1000]", &[], false);
    assert_eq!(api.len(), 1000);
    assert!(api.iter().all(|r| r.0 == 200), "every /api request answered");
    let c = count_pods(&api);
    let to_v2 = c.get("myapp-v2").copied().unwrap_or(0);
    // 10% of 1000: mean 100, sd 9.5; 60..140 is over four standard deviations.
    assert!((60..=140).contains(&to_v2), "/api split 90/10, got {c:?}");
    assert_eq!(c.get("myapp-v1").copied().unwrap_or(0) + to_v2, 1000);

    let rest = requests(&lab, "http://myapp/home?i=[1-30]", &[], false);
    assert_eq!(count_pods(&rest), BTreeMap::from([("myapp-v1".into(), 30)]), "default route goes to v1");

    let m = metrics(&lab, "node1");
    assert!(
        m.lines().any(|l| l.starts_with("istio_requests_total{reporter=\"source\"")
            && l.contains("destination_version=\"v2\"")
            && l.contains("response_code=\"200\"")),
        "requests counted by subset"
    );
}

#[test]
fn seed_default_route_retries_503_three_times_and_times_out() {
    let Some(lab) = lab("seed_default_route_retries_503_three_times_and_times_out") else { return };
    apply_seed(&lab, "destinationrule-myapp.yaml");
    apply_seed(&lab, "virtualservice-myapp.yaml");
    wait_routed(&lab, "routes applied", &["x-version: v2"], "myapp-v2");

    // retryOn includes 503 and attempts is 3: one request, four tries at v1.
    let r = requests(&lab, "http://myapp/status/503", &[], false);
    assert_eq!(r[0].0, 503, "the last answer is passed on");
    let (tries, _) = seen(&lab, "myapp-v1", "/status/503");
    assert_eq!(tries, 4, "first try plus 3 retries");
    // 500 is not in retryOn: no retry.
    requests(&lab, "http://myapp/status/500", &[], false);
    assert_eq!(seen(&lab, "myapp-v1", "/status/500").0, 1, "500 is not retried");

    // The seed's 30 s timeout, shortened for the test: same rule, `timeout: 1s`.
    let seed = std::fs::read_to_string(root().join("examples/seed/virtualservice-myapp.yaml")).unwrap();
    assert!(seed.contains("timeout: 30s"));
    apply_yaml(&lab, "virtualservice-myapp.yaml", &seed.replace("timeout: 30s", "timeout: 1s"));
    let started = Instant::now();
    let slow = eventually("1 s timeout applied", || {
        let r = requests(&lab, "http://myapp/delay/3000", &[], false);
        (r[0].0 == 504).then_some(r)
    });
    assert!(slow[0].1 < 2.5, "answered at the timeout, took {} s", slow[0].1);
    assert!(started.elapsed() < Duration::from_secs(15));
    let fast = requests(&lab, "http://myapp/delay/200", &[], false);
    assert_eq!(fast[0].0, 200, "requests inside the timeout are untouched");
}

#[test]
fn seed_mirror_copies_to_v2_while_client_sees_v1() {
    let Some(lab) = lab("seed_mirror_copies_to_v2_while_client_sees_v1") else { return };
    apply_seed(&lab, "destinationrule-myapp.yaml");
    apply_seed(&lab, "virtualservice-mirror.yaml");
    // Six requests on six connections all answered by v1: the rule is in force (L4
    // round robin would alternate).
    wait_routed(&lab, "mirror rule applied", &[], "myapp-v1");
    let r = requests(&lab, "http://myapp/mirrored?i=[1-20]", &[], false);
    assert_eq!(count_pods(&r), BTreeMap::from([("myapp-v1".into(), 20)]), "the client only sees v1");
    let (copies, hosts) = eventually("copies delivered", || {
        let s = seen(&lab, "myapp-v2", "/mirrored");
        (s.0 >= 20).then_some(s)
    });
    assert_eq!(copies, 20, "mirrorPercentage 100: every request copied once");
    assert_eq!(hosts, vec!["myapp-shadow".to_string()], "mirrored Host carries -shadow");
}

#[test]
fn seed_fault_injection_delays_and_aborts_at_configured_rates() {
    let Some(lab) = lab("seed_fault_injection_delays_and_aborts_at_configured_rates") else { return };
    apply_seed(&lab, "virtualservice-fault.yaml");
    eventually("fault rule applied", || {
        let r = requests(&lab, "http://myapp/f?i=[1-20]", &["x-test-fault: inject"], true);
        r.iter().any(|x| x.1 >= 4.9 || x.0 == 503).then_some(())
    });
    let r = requests(&lab, "http://myapp/f?i=[1-200]", &["x-test-fault: inject"], true);
    assert_eq!(r.len(), 200);
    let aborted = r.iter().filter(|x| x.0 == 503).count();
    let delayed = r.iter().filter(|x| x.1 >= 4.9).count();
    // abort 10% (sd 4.2 of 200), delay 50% (sd 7.1).
    assert!((5..=40).contains(&aborted), "aborts: {aborted} of 200");
    assert!((65..=135).contains(&delayed), "delays: {delayed} of 200");
    // Without the header: the second rule, no faults.
    let clean = requests(&lab, "http://myapp/f?i=[1-20]", &[], true);
    assert!(clean.iter().all(|x| x.0 == 200 && x.1 < 2.0), "no fault without the header");
}

#[test]
fn seed_circuit_breaker_overflows_with_503_and_ejects_a_failing_endpoint() {
    let Some(lab) = lab("seed_circuit_breaker_overflows_with_503_and_ejects_a_failing_endpoint") else { return };
    apply_seed(&lab, "destinationrule-circuit-breaker.yaml");
    // http2MaxRequests 100: 250 requests held at once overflow. The batch that first
    // shows a 503 may have started before the rule applied (its early requests count
    // as in flight but were admitted unlimited), so the measured batch is a fresh one.
    eventually("circuit breaker applied", || {
        let r = requests(&lab, "http://myapp/delay/1000?i=[1-250]", &[], true);
        r.iter().any(|x| x.0 == 503).then_some(())
    });
    // Held 3 s: long enough that all 250 are in flight together even on a loaded
    // machine, so no admitted request frees its slot before the last one arrives.
    let r = requests(&lab, "http://myapp/delay/3000?i=[1-250]", &[], true);
    let ok = r.iter().filter(|x| x.0 == 200).count();
    let overflow = r.iter().filter(|x| x.0 == 503).count();
    assert!(ok >= 90 && overflow >= 100, "ok {ok}, overflow {overflow}");
    let m = metrics(&lab, "node1");
    assert!(m.lines().any(|l| l.contains("response_flags=\"UO\"")), "overflow reported with flag UO");

    // consecutive5xxErrors 3: myapp-v1 failing every request gets ejected, the rest
    // goes to myapp-v2 (retries of the 503s land there too).
    let before = seen(&lab, "myapp-v1", "/eject").0;
    requests(&lab, "http://myapp/eject?i=[1-20]", &["x-fail-on: myapp-v1"], false);
    let mid = seen(&lab, "myapp-v1", "/eject").0;
    assert!(mid - before >= 3, "v1 got its three failures");
    let r = requests(&lab, "http://myapp/eject?i=[1-30]", &["x-fail-on: myapp-v1"], false);
    assert_eq!(seen(&lab, "myapp-v1", "/eject").0, mid, "ejected endpoint gets no more requests");
    assert!(r.iter().all(|x| x.0 == 200 && x.2.as_deref() == Some("myapp-v2")));
    let log = std::fs::read_to_string(lab.agent_log_path("node1")).unwrap();
    assert!(log.contains("endpoint ejected"), "ejection logged");
}

#[test]
fn least_request_prefers_the_less_loaded_endpoint() {
    let Some(lab) = lab("least_request_prefers_the_less_loaded_endpoint") else { return };
    // The seed DR: LEAST_REQUEST at the top level (no VirtualService: whole service).
    apply_seed(&lab, "destinationrule-myapp.yaml");
    eventually("rule applied", || {
        let m = metrics(&lab, "node1");
        requests(&lab, "http://myapp/probe", &[], false);
        m.contains("istio_requests_total{reporter=\"source\"").then_some(())
    });
    // myapp-v1 takes 500 ms per request, myapp-v2 answers at once: with requests in
    // flight counted, most go to v2. Round robin would give each half. Counted by the
    // apps themselves (parallel curl output interleaves bodies).
    // Ten in flight at a time: a steady load rather than one burst, where every pick
    // would see both endpoints idle.
    let out = lab
        .exec(
            "frontend",
            &[
                "curl",
                "-s",
                "-Z",
                "--parallel-immediate",
                "--parallel-max",
                "10",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}\n",
                "-H",
                "x-slow-on: myapp-v1",
                "http://myapp/lr?i=[1-100]",
            ],
        )
        .unwrap();
    let codes = String::from_utf8_lossy(&out.stdout);
    assert_eq!(codes.lines().filter(|c| *c == "200").count(), 100, "every request answered");
    let (v1, v2) = (seen(&lab, "myapp-v1", "/lr").0, seen(&lab, "myapp-v2", "/lr").0);
    assert_eq!(v1 + v2, 100);
    assert!(v1 < 30, "least request sent {v1} of 100 to the slow endpoint (v2: {v2}); round robin: 50");
}

#[test]
fn invalid_route_configs_are_rejected_and_the_last_good_keeps_serving() {
    let Some(lab) = lab("invalid_route_configs_are_rejected_and_the_last_good_keeps_serving") else { return };
    apply_seed(&lab, "destinationrule-myapp.yaml");
    apply_seed(&lab, "virtualservice-myapp.yaml");
    wait_routed(&lab, "routes applied", &["x-version: v2"], "myapp-v2");
    let seed = std::fs::read_to_string(root().join("examples/seed/virtualservice-myapp.yaml")).unwrap();
    let cases = [
        (seed.replace("prefix: /api", "regex: \"/api/(\""), "field spec.http[1].match[0].uri.regex: invalid regex"),
        (seed.replace("weight: 10", "weight: 20"), "field spec.http[1].route: weights add up to 110"),
        (
            seed.replace("timeout: 30s", "timeout: -30s"),
            "field spec.http[2].timeout: duration \"-30s\" must not be negative",
        ),
    ];
    for (i, (yaml, reason)) in cases.iter().enumerate() {
        apply_yaml(&lab, "virtualservice-myapp.yaml", yaml);
        eventually(&format!("case {i} rejected"), || {
            let log = std::fs::read_to_string(lab.agent_log_path("node1")).ok()?;
            log.lines()
                .any(|l| {
                    l.contains("config rejected") && l.contains("VirtualService production/myapp") && l.contains(reason)
                })
                .then_some(())
        });
        let r = requests(&lab, "http://myapp/x?i=[1-5]", &["x-version: v2"], false);
        assert_eq!(count_pods(&r), BTreeMap::from([("myapp-v2".into(), 5)]), "old routes still serve after case {i}");
    }
    // Unknown subset and duplicate subset names.
    apply_yaml(
        &lab,
        "destinationrule-myapp.yaml",
        "apiVersion: networking.istio.io/v1beta1\nkind: DestinationRule\nmetadata: {name: myapp, namespace: production}\nspec:\n  host: myapp\n  subsets: [{name: v1, labels: {version: v1}}, {name: v1, labels: {version: v2}}]\n",
    );
    eventually("duplicate subset rejected", || {
        let log = std::fs::read_to_string(lab.agent_log_path("node1")).ok()?;
        log.contains("field spec.subsets[1].name: subset \"v1\" is defined twice").then_some(())
    });
    let r = requests(&lab, "http://myapp/x?i=[1-5]", &["x-version: v2"], false);
    assert_eq!(count_pods(&r), BTreeMap::from([("myapp-v2".into(), 5)]), "old subsets still serve");
}

#[test]
fn route_change_applies_within_a_second_without_dropping_in_flight_requests() {
    let Some(lab) = lab("route_change_applies_within_a_second_without_dropping_in_flight_requests") else { return };
    apply_seed(&lab, "destinationrule-myapp.yaml");
    let to = |subset: &str| {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: myapp, namespace: production}}\nspec:\n  hosts: [myapp]\n  http:\n  - route: [{{destination: {{host: myapp, subset: {subset}}}}}]\n"
        )
    };
    apply_yaml(&lab, "vs.yaml", &to("v1"));
    wait_routed(&lab, "all to v1", &[], "myapp-v1");
    let argv: Vec<String> =
        ["curl", "-s", "-m", "10", "-o", "/dev/null", "-w", "%{http_code}", "http://myapp/delay/2500"]
            .iter()
            .map(|s| s.to_string())
            .collect();
    let in_flight = lab.pod_command("frontend", &argv).unwrap().stdout(std::process::Stdio::piped()).spawn().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    apply_yaml(&lab, "vs.yaml", &to("v2"));
    let applied = Instant::now();
    eventually("new route in force", || {
        let r = requests(&lab, "http://myapp/probe?i=[1-3]", &["connection: close"], false);
        r.iter().all(|x| x.2.as_deref() == Some("myapp-v2")).then_some(())
    });
    let took = applied.elapsed();
    assert!(took < Duration::from_secs(1), "route change took {took:?}");
    let out = in_flight.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "200", "in-flight request finished on the old route");
}

#[test]
fn seed_trafficsplit_shares_myapp_between_version_services() {
    let Some(lab) = lab("seed_trafficsplit_shares_myapp_between_version_services") else { return };
    apply_seed(&lab, "trafficsplit-canary.yaml");
    eventually("split in force", || {
        requests(&lab, "http://myapp/probe", &[], false);
        metrics(&lab, "node1").contains("destination_service=\"myapp-v1.production.svc.cluster.local\"").then_some(())
    });
    let r = requests(&lab, "http://myapp/ts?i=[1-1000]", &[], false);
    assert_eq!(r.len(), 1000);
    assert!(r.iter().all(|x| x.0 == 200));
    let c = count_pods(&r);
    let v2 = c.get("myapp-v2").copied().unwrap_or(0);
    assert!((60..=140).contains(&v2), "900m/100m split, got {c:?}");
    let m = metrics(&lab, "node1");
    assert!(m.contains("destination_service=\"myapp-v2.production.svc.cluster.local\""), "backend services reported");
}

#[test]
fn seed_serviceprofile_retries_stop_at_the_budget_and_routes_time_out() {
    let Some(lab) = lab("seed_serviceprofile_retries_stop_at_the_budget_and_routes_time_out") else { return };
    let seed = std::fs::read_to_string(root().join("examples/seed/serviceprofile-myapp.yaml")).unwrap();
    // The profile as written, with the GET route's 5 s timeout shortened to 300 ms so
    // the 500 ms x-slow-on delay crosses it.
    assert!(seed.contains("timeout: 5s"));
    apply_yaml(&lab, "serviceprofile-myapp.yaml", &seed.replace("timeout: 5s", "timeout: 300ms"));
    let timed_out = eventually("profile in force", || {
        let r = requests(&lab, "http://myapp/api/users", &["x-slow-on: *"], false);
        (r[0].0 == 504).then_some(r)
    });
    assert!(timed_out[0].1 < 0.9, "answered at the route timeout: {} s", timed_out[0].1);
    assert_eq!(requests(&lab, "http://myapp/api/users", &[], false)[0].0, 200, "fast requests pass");

    // GET /api/users is not retryable: one try per request even when it fails.
    let before = seen(&lab, "myapp-v1", "/api/users").0 + seen(&lab, "myapp-v2", "/api/users").0;
    let r = requests(&lab, "http://myapp/api/users?i=[1-10]", &["x-fail-on: *"], false);
    assert!(r.iter().all(|x| x.0 == 503));
    let after = seen(&lab, "myapp-v1", "/api/users").0 + seen(&lab, "myapp-v2", "/api/users").0;
    assert_eq!(after - before, 10, "no retries on a route that is not retryable");

    // POST /api/orders is retryable under retryRatio 0.2, 10 retries/s, ttl 10s: with
    // every answer failing, retries stop at the budget, far below 10 per request.
    let n = 200u64;
    // All at once: the budget is a rate (its 10 retries/s would refill during a slow
    // sequential run).
    let mut argv: Vec<String> = [
        "curl",
        "-s",
        "-Z",
        "--parallel-immediate",
        "--parallel-max",
        "200",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}\n",
        "-X",
        "POST",
        "-H",
        "x-fail-on: *",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    argv.push(format!("http://myapp/api/orders?i=[1-{n}]"));
    let out = lab.pod_command("frontend", &argv).unwrap().output().unwrap();
    let codes = String::from_utf8_lossy(&out.stdout);
    assert_eq!(codes.lines().filter(|c| *c == "503").count() as u64, n, "failures reach the client");
    let tries = seen(&lab, "myapp-v1", "/api/orders").0 + seen(&lab, "myapp-v2", "/api/orders").0;
    let retries = tries - n;
    // min 10/s over the 10 s window plus 20% of the requests, with slack for timing.
    assert!(retries >= 20, "retryable failures are retried: {retries}");
    assert!(retries <= 10 * 10 + n / 5 + 30, "retries exceed the budget: {retries} for {n} requests");
}

#[test]
fn http2_h2_upgrade_policy_and_protocol_upgrades_pass_through_routing() {
    let Some(lab) = lab("http2_h2_upgrade_policy_and_protocol_upgrades_pass_through_routing") else { return };
    apply_seed(&lab, "destinationrule-myapp.yaml");
    apply_seed(&lab, "virtualservice-myapp.yaml");
    wait_routed(&lab, "routes applied", &["x-version: v2"], "myapp-v2");
    let body = |argv: &[&str]| -> serde_json::Value {
        let out = lab.exec("frontend", argv).unwrap();
        serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("{}", String::from_utf8_lossy(&out.stdout)))
    };
    // An HTTP/2 (prior knowledge) client is routed per request and reaches the app
    // over HTTP/2.
    let v = body(&["curl", "-s", "--http2-prior-knowledge", "-H", "x-version: v2", "http://myapp/h2"]);
    assert_eq!(v["pod"], "myapp-v2");
    assert_eq!(v["http_version"], "HTTP/2.0");
    // The seed DestinationRule sets h2UpgradePolicy: UPGRADE: HTTP/1.1 clients reach
    // the app over HTTP/2 too.
    let v = body(&["curl", "-s", "--http1.1", "http://myapp/h1"]);
    assert_eq!(v["pod"], "myapp-v1");
    assert_eq!(v["http_version"], "HTTP/2.0", "h2UpgradePolicy UPGRADE");
    // A protocol upgrade (as WebSocket does) is routed, switched and spliced.
    let echo = root().join("target/debug/mesh-echo").display().to_string();
    let v = body(&[&echo, "upgrade", "myapp:80", "--message", "ping over the switched protocol"]);
    assert!(v["status"].as_str().unwrap().contains("101"), "{v}");
    assert_eq!(v["echoed"], "ping over the switched protocol");
}

#[test]
fn cors_preflight_is_answered_by_the_agent_and_responses_carry_cors_headers() {
    let Some(lab) = lab("cors_preflight_is_answered_by_the_agent_and_responses_carry_cors_headers") else { return };
    apply_yaml(
        &lab,
        "vs-cors.yaml",
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: myapp, namespace: production}\nspec:\n  hosts: [myapp]\n  http:\n  - route: [{destination: {host: myapp}}]\n    corsPolicy:\n      allowOrigins: [{exact: \"https://app.example.com\"}, {regex: \"https://.*\\\\.trusted\\\\.example\"}]\n      allowMethods: [GET, POST]\n      allowHeaders: [x-custom]\n      exposeHeaders: [x-served-by]\n      maxAge: 24h\n      allowCredentials: true\n",
    );
    let head = |argv: &[&str]| String::from_utf8_lossy(&lab.exec("frontend", argv).unwrap().stdout).to_lowercase();
    let preflight = eventually("CORS rule in force", || {
        let h = head(&[
            "curl",
            "-s",
            "-D",
            "-",
            "-o",
            "/dev/null",
            "-X",
            "OPTIONS",
            "-H",
            "origin: https://app.example.com",
            "-H",
            "access-control-request-method: POST",
            "http://myapp/cors",
        ]);
        h.contains("access-control-allow-origin").then_some(h)
    });
    assert!(preflight.starts_with("http/1.1 200"), "{preflight}");
    assert!(preflight.contains("access-control-allow-methods: get,post"), "{preflight}");
    assert!(preflight.contains("access-control-max-age: 86400"), "{preflight}");
    assert!(preflight.contains("access-control-allow-credentials: true"), "{preflight}");
    // (Probes sent before the rule applied may have reached the app; count from here.)
    let at_app = || seen(&lab, "myapp-v1", "/cors").0 + seen(&lab, "myapp-v2", "/cors").0;
    let before = at_app();
    head(&[
        "curl",
        "-s",
        "-o",
        "/dev/null",
        "-X",
        "OPTIONS",
        "-H",
        "origin: https://app.example.com",
        "-H",
        "access-control-request-method: GET",
        "http://myapp/cors",
    ]);
    assert_eq!(at_app(), before, "an allowed preflight is answered by the agent");

    let actual = head(&[
        "curl",
        "-s",
        "-D",
        "-",
        "-o",
        "/dev/null",
        "-H",
        "origin: https://a.trusted.example",
        "http://myapp/cors",
    ]);
    assert!(actual.contains("access-control-allow-origin: https://a.trusted.example"), "{actual}");
    assert!(actual.contains("access-control-expose-headers: x-served-by"), "{actual}");
    let other =
        head(&["curl", "-s", "-D", "-", "-o", "/dev/null", "-H", "origin: https://evil.example", "http://myapp/cors"]);
    assert!(!other.contains("access-control-allow-origin"), "other origins get no CORS headers: {other}");
}

#[test]
fn grpc_passes_through_with_trailers_and_unavailable_is_retried() {
    let Some(lab) = lab("grpc_passes_through_with_trailers_and_unavailable_is_retried") else { return };
    apply_yaml(
        &lab,
        "vs-grpc.yaml",
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: myapp, namespace: production}\nspec:\n  hosts: [myapp]\n  http:\n  - route: [{destination: {host: myapp}}]\n    retries: {attempts: 2, retryOn: unavailable}\n",
    );
    let echo = root().join("target/debug/mesh-echo").display().to_string();
    let call = |extra: &[&str]| -> serde_json::Value {
        let mut argv = vec![echo.as_str(), "grpc", "myapp:80", "--message", "over grpc"];
        argv.extend(extra);
        let out = lab.exec("frontend", &argv).unwrap();
        serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
            panic!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
        })
    };
    // Routed at L7 once a trailers-only UNAVAILABLE is retried: 3 tries per call.
    let at_app = || seen(&lab, "myapp-v1", "/echo.Echo/Say").0 + seen(&lab, "myapp-v2", "/echo.Echo/Say").0;
    eventually("retry rule in force", || {
        let before = at_app();
        let v = call(&["--header", "x-fail-on: *"]);
        (v["grpc_status"] == "14" && at_app() - before == 3).then_some(())
    });
    // A good call: the message comes back and grpc-status 0 arrives in trailers.
    let v = call(&[]);
    assert_eq!(v["http_status"], 200);
    assert_eq!(v["grpc_status"], "0", "status from trailers: {v}");
    assert_eq!(v["message"], "over grpc");
    // The agent reports the gRPC status, from trailers for a normal answer.
    let m = metrics(&lab, "node1");
    let grpc = |code: &str| {
        m.lines()
            .any(|l| l.starts_with("istio_requests_total") && l.contains(&format!("grpc_response_status=\"{code}\"")))
    };
    assert!(grpc("0"), "status 0 read from trailers");
    assert!(grpc("14"), "trailers-only UNAVAILABLE reported");
}

#[test]
fn large_request_bodies_stream_through_and_small_ones_are_retried() {
    let Some(lab) = lab("large_request_bodies_stream_through_and_small_ones_are_retried") else { return };
    apply_seed(&lab, "destinationrule-myapp.yaml");
    apply_seed(&lab, "virtualservice-myapp.yaml");
    wait_routed(&lab, "routes applied", &["x-version: v2"], "myapp-v2");
    // 5 MiB: past the 1 MiB retry buffer, so it streams through once, byte for byte.
    let dir = lab.state_dir.join("scratch");
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("upload.bin");
    let data: Vec<u8> = (0..5u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
    std::fs::write(&file, &data).unwrap();
    let out = lab
        .exec(
            "frontend",
            &["curl", "-s", "-m", "20", "--data-binary", &format!("@{}", file.display()), "http://myapp/echo"],
        )
        .unwrap();
    assert_eq!(out.stdout.len(), data.len(), "whole body echoed");
    assert!(out.stdout == data, "every byte of the streamed body arrived in order");
    // A small body on the default route (retries on 503) is replayed on each try.
    let r = requests(&lab, "http://myapp/status/503", &[], false);
    assert_eq!(r[0].0, 503);
    let out = lab
        .exec(
            "frontend",
            &["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-d", "small body", "http://myapp/status/503"],
        )
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "503");
    assert_eq!(seen(&lab, "myapp-v1", "/status/503").0, 8, "both requests tried four times");
}

#[test]
fn redirect_direct_response_rewrite_and_header_operations() {
    let Some(lab) = lab("redirect_direct_response_rewrite_and_header_operations") else { return };
    apply_yaml(
        &lab,
        "vs-ops.yaml",
        r#"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: myapp, namespace: production}
spec:
  hosts: [myapp]
  http:
  - match: [{uri: {exact: /old}}]
    redirect: {uri: /new, authority: newhost.example, redirectCode: 302}
  - match: [{uri: {prefix: /keep-port}}]
    redirect: {uri: /elsewhere}
  - match: [{uri: {prefix: /health}}]
    directResponse: {status: 200, body: {string: "healthy\n"}}
  - match: [{uri: {prefix: /v1/}}]
    rewrite: {uri: /api/}
    headers:
      request: {set: {x-routed-by: mesh}, remove: [x-secret]}
      response: {add: {x-served-by: mesh-agent}}
    route: [{destination: {host: myapp}}]
"#,
    );
    let run = |argv: &[&str]| String::from_utf8_lossy(&lab.exec("frontend", argv).unwrap().stdout).into_owned();
    let direct = eventually("rules in force", || {
        let body = run(&["curl", "-s", "http://myapp/health"]);
        (body == "healthy\n").then_some(body)
    });
    assert_eq!(direct, "healthy\n", "directResponse answered by the agent");

    let head = run(&["curl", "-s", "-D", "-", "-o", "/dev/null", "http://myapp/old"]).to_lowercase();
    assert!(head.starts_with("http/1.1 302"), "{head}");
    assert!(head.contains("location: http://newhost.example/new"), "{head}");
    let head = run(&["curl", "-s", "-D", "-", "-o", "/dev/null", "-H", "host: myapp:8080", "http://myapp/keep-port"])
        .to_lowercase();
    assert!(head.starts_with("http/1.1 301"), "{head}");
    assert!(head.contains("location: http://myapp:8080/elsewhere"), "the Host's port is kept: {head}");

    let out = run(&["curl", "-s", "-D", "/dev/stderr", "-H", "x-secret: s3cr3t", "http://myapp/v1/users?id=7"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|_| panic!("{out}"));
    assert_eq!(v["path"], "/api/users", "prefix rewritten, rest kept");
    assert_eq!(v["headers"]["x-routed-by"], "mesh", "request header set");
    assert!(v["headers"].get("x-secret").is_none(), "request header removed: {v}");
    let head = run(&["curl", "-s", "-D", "-", "-o", "/dev/null", "http://myapp/v1/x"]).to_lowercase();
    assert!(head.contains("x-served-by: mesh-agent"), "response header added: {head}");
}

#[test]
fn virtualservice_tcp_routes_steer_opaque_connections_by_weight() {
    let Some(lab) = lab("virtualservice_tcp_routes_steer_opaque_connections_by_weight") else { return };
    apply_seed(&lab, "destinationrule-myapp.yaml");
    apply_yaml(
        &lab,
        "vs-tcp.yaml",
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: myapp-tcp, namespace: production}\nspec:\n  hosts: [myapp]\n  tcp:\n  - match: [{port: 9000}]\n    route: [{destination: {host: myapp, subset: v2, port: {number: 9000}}, weight: 100}]\n",
    );
    let echo = root().join("target/debug/mesh-echo").display().to_string();
    let load = |conns: &str| {
        let out =
            lab.exec("frontend", &[&echo, "load", "10.96.0.20:9000", "--conns", conns, "--bytes", "4096"]).unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    };
    let counts = || {
        let m = metrics(&lab, "node1");
        (opened(&m, "Outbound", "frontend", "myapp-v1"), opened(&m, "Outbound", "frontend", "myapp-v2"))
    };
    eventually("tcp rule in force", || {
        let (v1, v2) = counts();
        load("6");
        let (v1b, v2b) = counts();
        (v1b == v1 && v2b == v2 + 6).then_some(())
    });
    let (v1, v2) = counts();
    load("40");
    let (v1b, v2b) = counts();
    assert_eq!(v1b, v1, "no connection to the subset the rule excludes");
    assert_eq!(v2b - v2, 40, "every connection to myapp-v2, bytes checked by the echo load");
}

#[test]
fn cookie_affinity_sets_a_cookie_and_keeps_a_client_on_one_endpoint() {
    let Some(lab) = lab("cookie_affinity_sets_a_cookie_and_keeps_a_client_on_one_endpoint") else { return };
    apply_yaml(
        &lab,
        "dr-cookie.yaml",
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: myapp, namespace: production}\nspec:\n  host: myapp\n  trafficPolicy:\n    loadBalancer:\n      consistentHash: {httpCookie: {name: affinity, ttl: 0s, path: /}}\n",
    );
    let head = eventually("cookie rule in force", || {
        let out = lab.exec("frontend", &["curl", "-s", "-D", "-", "-o", "/dev/null", "http://myapp/first"]).unwrap();
        let h = String::from_utf8_lossy(&out.stdout).to_lowercase();
        h.contains("set-cookie: affinity=").then_some(h)
    });
    assert!(head.contains("path=/"), "{head}");
    for round in 0..3 {
        // curl keeps the cookie it is given across the globbed requests (its cookie engine).
        let jar = lab.state_dir.join(format!("scratch-jar-{round}"));
        let jar = jar.display().to_string();
        let out =
            lab.exec("frontend", &["curl", "-s", "-c", &jar, "-b", &jar, "http://myapp/sticky?i=[1-12]"]).unwrap();
        let text = String::from_utf8_lossy(&out.stdout).replace("}{", "}\n{");
        let pods: std::collections::BTreeSet<String> = text.lines().filter_map(reply_pod).collect();
        assert_eq!(pods.len(), 1, "one endpoint for a client holding the cookie: {pods:?}");
    }
}

//! Kubelet probes (HTTP, TCP, gRPC) under STRICT mTLS, in the lab: the kubelet's plaintext connections to
//! a STRICT pod reach its application, recognised in the kernel by the kubelet's cgroup
//! (`mesh_probe_sockops` records its connections; the pod's `sk_lookup` lets those
//! through), while the same plaintext from any other process of the node is dropped.
#![forbid(unsafe_code)]

use std::process::{Command, Stdio};

use mesh_tests::harness::{apply_seed, eventually, lab, metrics, root};
use mesh_tests::lab::Lab;

/// Who on node1 sends the probe.
#[derive(Clone, Copy, Debug)]
enum From {
    /// The kubelet (its cgroup).
    Kubelet,
    /// Another process of the node, in the node's network namespace.
    Host,
}

fn command(lab: &Lab, from: From, argv: &[&str]) -> Command {
    let argv: Vec<String> = argv.iter().map(|s| s.to_string()).collect();
    match from {
        From::Kubelet => lab.kubelet_command("node1", &argv),
        From::Host => lab.host_command("node1", &argv),
    }
    .unwrap()
}

/// An HTTP probe (`httpGet`): the status code, `000` without an answer.
fn http_probe(lab: &Lab, from: From, url: &str) -> String {
    let out = command(lab, from, &["curl", "-s", "-m", "3", "-o", "/dev/null", "-w", "%{http_code}", url])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A TCP probe (`tcpSocket`): whether the connection opens.
fn tcp_probe(lab: &Lab, from: From, addr: &str) -> bool {
    let echo = root().join("target/debug/mesh-echo").display().to_string();
    command(lab, from, &["timeout", "3", &echo, "dial", addr]).stdin(Stdio::null()).output().unwrap().status.success()
}

/// A gRPC probe (`grpc`): whether the call completes with `grpc-status: 0`.
fn grpc_probe(lab: &Lab, from: From, addr: &str) -> bool {
    let echo = root().join("target/debug/mesh-echo").display().to_string();
    let out = command(lab, from, &["timeout", "3", &echo, "grpc", addr]).stdin(Stdio::null()).output().unwrap();
    out.status.success() && String::from_utf8_lossy(&out.stdout).contains("\"grpc_status\":\"0\"")
}

fn probes_counted(lab: &Lab) -> u64 {
    metrics(lab, "node1")
        .lines()
        .find(|l| l.starts_with("istio_mesh_probe_connections_total"))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0)
}

#[test]
fn kubelet_probes_reach_a_strict_pod_and_no_other_host_process_does() {
    let Some(lab) = lab("kubelet_probes_reach_a_strict_pod_and_no_other_host_process_does") else { return };
    // myapp-v2 runs on node1, as the kubelet that probes it.
    let v2 = lab.pod("myapp-v2").unwrap().ip;
    let (health, tcp, grpc) = (format!("http://{v2}:8080/health"), format!("{v2}:9000"), format!("{v2}:8080"));
    assert_eq!(http_probe(&lab, From::Host, &health), "200", "PERMISSIVE: any plaintext is served");

    apply_seed(&lab, "peerauthentication.yaml");
    eventually("STRICT in force for host processes", || (http_probe(&lab, From::Host, &health) == "000").then_some(()));
    for _ in 0..3 {
        assert_eq!(http_probe(&lab, From::Kubelet, &health), "200", "the kubelet's HTTP probe under STRICT");
        assert!(tcp_probe(&lab, From::Kubelet, &tcp), "the kubelet's TCP probe under STRICT");
        assert!(grpc_probe(&lab, From::Kubelet, &grpc), "the kubelet's gRPC probe under STRICT");
        assert_eq!(http_probe(&lab, From::Host, &health), "000", "plaintext from another host process");
        assert!(!tcp_probe(&lab, From::Host, &tcp), "a TCP connection from another host process");
        assert!(!grpc_probe(&lab, From::Host, &grpc), "gRPC from another host process");
    }
    // Counted apart from mesh traffic.
    eventually("probes counted", || (probes_counted(&lab) >= 9).then_some(()));
}

/// The backend named in an echo reply.
fn replier(lab: &Lab) -> Option<String> {
    let (ok, body) = mesh_tests::harness::curl(lab, "frontend", "http://myapp/");
    ok.then(|| mesh_tests::harness::reply_pod(&body)).flatten()
}

#[test]
fn a_pod_failing_its_readiness_probe_leaves_the_service_and_comes_back() {
    let Some(mut lab) = lab("a_pod_failing_its_readiness_probe_leaves_the_service_and_comes_back") else { return };
    // Probes go to a STRICT pod: they pass as the kubelet's.
    apply_seed(&lab, "peerauthentication.yaml");
    let manifest = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: myapp-v3\n  namespace: production\n  \
                    uid: 3f0e2d1c-0000-4000-8000-00000000005f\n  labels: {app: myapp, version: v3}\nspec:\n  \
                    serviceAccountName: myapp\n  nodeName: node1\n  containers:\n  - name: app\n    \
                    image: mesh-echo\n    ports: [{name: http, containerPort: 8080}, {name: echo, containerPort: 9000}]\n    \
                    readinessProbe: {httpGet: {path: /healthz, port: http}, periodSeconds: 1, failureThreshold: 1}\n    \
                    livenessProbe: {grpc: {port: 8080}, initialDelaySeconds: 2, periodSeconds: 1, failureThreshold: 2}\n\
                    status: {podIP: 10.10.1.95}\n";
    let pod = lab.add_pod(manifest).unwrap();
    assert!(pod.failed.is_none(), "{:?}", pod.failed);
    eventually("myapp-v3 Ready (its probes pass STRICT)", || {
        (lab.pod_ready("production", "myapp-v3") == Some(true)).then_some(())
    });
    eventually("myapp-v3 serves the Service", || (replier(&lab).as_deref() == Some("myapp-v3")).then_some(()));

    // Its health endpoint fails: NotReady within the probe period, out of the Service.
    let flip = |to: &str| {
        let url = format!("http://127.0.0.1:8080/_health/{to}");
        assert!(lab.exec("myapp-v3", &["curl", "-sf", "-X", "POST", &url]).unwrap().status.success());
    };
    let kubelet_log = || std::fs::read_to_string(lab.state_dir.join("logs/kubelet-node1.log")).unwrap();
    assert!(!kubelet_log().contains("Killing"), "healthy so far:\n{}", kubelet_log());
    flip("fail");
    eventually("myapp-v3 NotReady", || (lab.pod_ready("production", "myapp-v3") == Some(false)).then_some(()));
    eventually("myapp-v3 out of the endpoints", || {
        (0..12).all(|_| replier(&lab).is_some_and(|p| p != "myapp-v3")).then_some(())
    });
    assert!(lab.status().contains("NotReady"), "lab status shows it:\n{}", lab.status());

    eventually("the liveness failure reported", || kubelet_log().contains("will be restarted").then_some(()));

    // Recovered: back in.
    flip("ok");
    eventually("myapp-v3 Ready again", || (lab.pod_ready("production", "myapp-v3") == Some(true)).then_some(()));
    eventually("myapp-v3 serves again", || (replier(&lab).as_deref() == Some("myapp-v3")).then_some(()));
    // Reported as the kubelet reports them: each failed probe an Unhealthy warning,
    // and the liveness failure past its threshold a Killing event.
    let log = kubelet_log();
    for line in [
        "pod/production/myapp-v3  Readiness probe failed: HTTP probe failed with statuscode: 503",
        "pod/production/myapp-v3  Liveness probe failed: service unhealthy (responded with \"NOT_SERVING\")",
        "pod/production/myapp-v3  Container failed liveness probe, will be restarted",
    ] {
        assert!(log.contains(line), "{line:?} not in:\n{log}");
    }
}

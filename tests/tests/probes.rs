//! Kubelet probes under STRICT mTLS, in the lab: the kubelet's plaintext connections to
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
    let (health, tcp) = (format!("http://{v2}:8080/health"), format!("{v2}:9000"));
    assert_eq!(http_probe(&lab, From::Host, &health), "200", "PERMISSIVE: any plaintext is served");

    apply_seed(&lab, "peerauthentication.yaml");
    eventually("STRICT in force for host processes", || (http_probe(&lab, From::Host, &health) == "000").then_some(()));
    for _ in 0..3 {
        assert_eq!(http_probe(&lab, From::Kubelet, &health), "200", "the kubelet's HTTP probe under STRICT");
        assert!(tcp_probe(&lab, From::Kubelet, &tcp), "the kubelet's TCP probe under STRICT");
        assert_eq!(http_probe(&lab, From::Host, &health), "000", "plaintext from another host process");
        assert!(!tcp_probe(&lab, From::Host, &tcp), "a TCP connection from another host process");
    }
    // Counted apart from mesh traffic.
    eventually("probes counted", || (probes_counted(&lab) >= 6).then_some(()));
}

//! Enrollment as a hostile tenant would test it, in the lab: pods are captured before
//! their app runs (the CNI plugin), by UID (two pods may share a name), on every address
//! they have (a secondary IP, IPv6 link-local, the ports the agent uses on the node, both
//! families of a dual-stack pod), and a pod that cannot be captured never starts and is
//! reported.
#![forbid(unsafe_code)]

use std::os::unix::fs::MetadataExt as _;
use std::process::Stdio;
use std::time::Duration;

use mesh_tests::harness::{apply_seed, apply_yaml, curl, eventually, lab, root};
use mesh_tests::lab::Lab;

/// HTTP status of a plaintext GET from `pod` (`000`: no HTTP answer).
fn status(lab: &Lab, pod: &str, url: &str) -> String {
    let out = lab.exec(pod, &["curl", "-s", "-g", "-m", "3", "-o", "/dev/null", "-w", "%{http_code}", url]).unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The node agent's admin endpoint (`/sync_status`, `/config_dump`) as JSON.
fn admin(lab: &Lab, node: &str, path: &str) -> serde_json::Value {
    let n = lab.node(node).unwrap();
    let out = mesh_tests::sys::output(&[
        "ip",
        "netns",
        "exec",
        &n.netns,
        "curl",
        "-s",
        "-m",
        "3",
        &format!("http://127.0.0.1:15000{path}"),
    ])
    .unwrap();
    serde_json::from_slice(&out.stdout).unwrap_or_default()
}

/// A pod of `namespace` on node1 at `ip`, named `name`, with a UID made from `n`.
fn pod_manifest(name: &str, namespace: &str, ip: &str, n: u32) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {namespace}\n  uid: 3f0e2d1c-0000-4000-8000-{n:012}\n  labels: {{app: {name}}}\nspec:\n  serviceAccountName: {name}\n  nodeName: node1\n  containers: [{{name: app, image: mesh-echo, ports: [{{name: http, containerPort: 8080}}]}}]\nstatus: {{podIP: {ip}}}\n"
    )
}

/// Waits until plaintext from `outside` to an enrolled pod is dropped (STRICT applied).
fn wait_strict(lab: &Lab) {
    let v1 = lab.pod("myapp-v1").unwrap().ip;
    eventually("STRICT in force", || (status(lab, "outside", &format!("http://{v1}:8080/")) == "000").then_some(()));
}

#[test]
fn a_strict_pods_first_connection_is_never_served_in_plaintext() {
    let Some(mut lab) = lab("a_strict_pods_first_connection_is_never_served_in_plaintext") else { return };
    apply_seed(&lab, "peerauthentication.yaml");
    wait_strict(&lab);
    // A client that knocks on the new pod's address every few milliseconds, from before
    // it exists until well after its app is up: any answer at all is plaintext served
    // to a STRICT pod.
    // Knocks on an address no pod has yet leave its neighbour entry unresolved, and
    // Linux asks again only once a second: ask every 10 ms, so the client reaches the
    // pod as soon as its interface is up, not up to a second later.
    let outside = lab.pod("outside").unwrap().netns.clone();
    mesh_tests::sys::run(&["ip", "netns", "exec", &outside, "sysctl", "-qw", "net.ipv4.neigh.eth0.retrans_time_ms=10"])
        .unwrap();
    let echo = root().join("target/debug/mesh-echo").display().to_string();
    let argv: Vec<String> =
        [echo.as_str(), "knock", "10.10.1.50:8080", "--for-ms", "6000", "--every-ms", "3"].map(String::from).into();
    let knocker = lab.pod_command("outside", &argv).unwrap().stdout(Stdio::piped()).spawn().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let fresh = lab.add_pod(&pod_manifest("fresh", "production", "10.10.1.50", 1)).unwrap();
    assert!(fresh.failed.is_none(), "the pod started: {:?}", fresh.failed);
    let out = knocker.wait_with_output().unwrap();
    let knocks: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(knocks["tries"].as_u64().unwrap() > 1000, "the client kept knocking: {knocks}");
    assert_eq!(knocks["answered"], 0, "plaintext reached the STRICT pod: {knocks}");
    // It is up and in the mesh: mutual TLS reaches it from the first request.
    let (ok, body) = curl(&lab, "frontend", "http://10.10.1.50:8080/");
    assert!(ok && body.contains("\"pod\":\"fresh\""), "{body}");
}

#[test]
fn every_address_and_port_of_an_enrolled_pod_gets_the_pods_verdict() {
    let Some(mut lab) = lab("every_address_and_port_of_an_enrolled_pod_gets_the_pods_verdict") else { return };
    let pod = lab.pod("myapp-v2").unwrap().clone();
    // What a tenant with NET_ADMIN can do in its own namespace: another address; and
    // what any dual-stack pod has: an IPv6 link-local address.
    mesh_tests::sys::run(&["ip", "-n", &pod.netns, "addr", "add", "10.10.1.200/24", "dev", "eth0"]).unwrap();
    let link_local = mesh_tests::sys::run(&["ip", "-n", &pod.netns, "-6", "-o", "addr", "show", "dev", "eth0"])
        .unwrap()
        .split_whitespace()
        .find(|w| w.starts_with("fe80::"))
        .expect("an IPv6 link-local address")
        .split('/')
        .next()
        .unwrap()
        .to_string();
    // An application port the agent uses on the node (metrics), inside the pod.
    let echo = root().join("target/debug/mesh-echo").display().to_string();
    let argv: Vec<String> = [echo.as_str(), "serve", "--pod", "metrics-app", "--port", "15020", "--tcp-port", "19000"]
        .map(String::from)
        .into();
    lab.start_helper("metrics-app", "myapp-v2", &argv).unwrap();
    let urls = [
        format!("http://{}:8080/", pod.ip),
        "http://10.10.1.200:8080/".to_string(),
        format!("http://[{link_local}%eth0]:8080/"),
        format!("http://{}:15020/", pod.ip),
    ];
    for url in &urls {
        eventually(&format!("plaintext reaches {url} before any policy"), || {
            (status(&lab, "outside", url) == "200").then_some(())
        });
    }
    apply_seed(&lab, "peerauthentication.yaml");
    wait_strict(&lab);
    for url in &urls {
        eventually(&format!("{url} refused under STRICT"), || (status(&lab, "outside", url) == "000").then_some(()));
        for _ in 0..3 {
            assert_eq!(status(&lab, "outside", url), "000", "plaintext to {url} got through STRICT");
        }
    }
    let (ok, body) = curl(&lab, "frontend", "http://myapp/");
    assert!(ok, "mesh traffic still flows: {body}");
    // The agent's delivery from a secondary address is not steered back to itself.
    let log = std::fs::read_to_string(lab.agent_log_path("node1")).unwrap();
    let looped = log.lines().filter(|l| l.contains("src=10.10.1.3:") && l.contains("dst=10.10.1.200")).count();
    assert_eq!(looped, 0, "the agent's own delivery came back through its inbound listener");
}

#[test]
fn pods_with_the_same_name_in_two_namespaces_are_both_captured() {
    let Some(mut lab) = lab("pods_with_the_same_name_in_two_namespaces_are_both_captured") else { return };
    apply_yaml(
        &lab,
        "staging.yaml",
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: staging, labels: {istio-injection: enabled}}\n---\n\
         apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: staging}\n\
         spec: {mtls: {mode: STRICT}}\n",
    );
    apply_seed(&lab, "peerauthentication.yaml");
    wait_strict(&lab);
    let a = lab.add_pod(&pod_manifest("web", "production", "10.10.1.60", 2)).unwrap();
    let b = lab.add_pod(&pod_manifest("web", "staging", "10.10.1.61", 3)).unwrap();
    assert!(a.failed.is_none() && b.failed.is_none(), "{:?} {:?}", a.failed, b.failed);
    assert_ne!(a.netns, b.netns);
    let dump = admin(&lab, "node1", "/config_dump");
    let enrolled: Vec<&str> = dump["enrolled_pods"].as_array().unwrap().iter().filter_map(|p| p.as_str()).collect();
    assert!(enrolled.contains(&"production/web") && enrolled.contains(&"staging/web"), "{enrolled:?}");
    for ip in ["10.10.1.60", "10.10.1.61"] {
        assert_eq!(status(&lab, "outside", &format!("http://{ip}:8080/")), "000", "plaintext reached web at {ip}");
    }
    for (ip, ns) in [("10.10.1.60", "production"), ("10.10.1.61", "staging")] {
        let (ok, body) = curl(&lab, "frontend", &format!("http://{ip}:8080/"));
        assert!(ok && body.contains(&format!("\"namespace\":\"{ns}\"")), "mesh traffic to web in {ns}: {body}");
    }
    // Each pod's capture is pinned under its own UID.
    let links = std::fs::read_dir(lab.node("node1").unwrap().pin_dir.join("links")).unwrap();
    let names: Vec<String> = links.filter_map(|e| e.ok()?.file_name().into_string().ok()).collect();
    for uid in [&a.uid, &b.uid] {
        assert!(names.iter().any(|n| n.contains(uid.as_str())), "no link for {uid}: {names:?}");
    }
}

#[test]
fn a_pod_that_cannot_be_captured_never_starts_and_is_reported() {
    let Some(mut lab) = lab("a_pod_that_cannot_be_captured_never_starts_and_is_reported") else { return };
    let p = lab.add_pod_without_cgroup(&pod_manifest("orphan", "production", "10.10.1.70", 4)).unwrap();
    let why = p.failed.clone().expect("the plugin refused the pod");
    assert!(why.contains("cannot be captured") && why.contains("no cgroup"), "{why}");
    assert!(p.app_pid.is_none(), "its app never started");
    assert!(lab.status().contains("not started"), "{}", lab.status());

    let status = admin(&lab, "node1", "/sync_status");
    assert_eq!(status["ready"], true, "the agent decided about every pod: {status}");
    let failed = status["failed_pods"].as_array().unwrap();
    let orphan = failed.iter().find(|f| f["pod"] == "production/orphan").unwrap_or_else(|| panic!("{status}"));
    assert_eq!(orphan["uid"], p.uid.as_str());
    assert!(orphan["reason"].as_str().unwrap().contains("no cgroup"), "{orphan}");

    // Nothing of the agent stays in the pod's namespace: no descriptor, no listener.
    let ino = std::fs::metadata(format!("/var/run/netns/{}", p.netns)).unwrap().ino();
    let agent = lab.node("node1").unwrap().agent_pid.unwrap();
    let held: Vec<String> = std::fs::read_dir(format!("/proc/{agent}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .map(|l| l.display().to_string())
        .filter(|l| l == &format!("net:[{ino}]"))
        .collect();
    assert!(held.is_empty(), "the agent holds the refused pod's namespace open: {held:?}");
    let sockets = mesh_tests::sys::run(&["ip", "netns", "exec", &p.netns, "ss", "-ltnH"]).unwrap();
    assert!(sockets.trim().is_empty(), "listeners left in the refused pod's namespace: {sockets}");
}

/// A dual-stack lab pod manifest.
fn dual_stack_pod(name: &str, namespace: &str, uid_tail: &str, node: &str, ip: &str, ip6: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {namespace}\n  \
         uid: 3f0e2d1c-0000-4000-8000-0000000000{uid_tail}\n  labels: {{app: {name}}}\nspec:\n  \
         serviceAccountName: {name}\n  nodeName: {node}\n  \
         containers: [{{name: app, image: mesh-echo, ports: [{{name: http, containerPort: 8080}}]}}]\n\
         status:\n  podIP: {ip}\n  podIPs: [{{ip: {ip}}}, {{ip: '{ip6}'}}]\n"
    )
}

#[test]
fn a_dual_stack_pod_is_captured_and_judged_on_both_families() {
    let Some(mut lab) = lab("a_dual_stack_pod_is_captured_and_judged_on_both_families") else { return };
    let (n1, n2) = (lab.node("node1").unwrap().clone(), lab.node("node2").unwrap().clone());
    let v6 = |n: &mesh_tests::lab::Node, host: &str| n.subnet6().replace("::/64", &format!("::{host}"));
    let (a6, b6, out6) = (v6(&n1, "5c"), v6(&n2, "5d"), v6(&n2, "5e"));
    for (name, ns, uid, node, ip, ip6) in [
        ("dual-a", "production", "5c", "node1", "10.10.1.92", &a6),
        ("dual-b", "production", "5d", "node2", "10.10.2.93", &b6),
        // Outside the mesh, on the other node.
        ("dual-outside", "default", "5e", "node2", "10.10.2.94", &out6),
    ] {
        let pod = lab.add_pod(&dual_stack_pod(name, ns, uid, node, ip, ip6)).unwrap();
        assert!(pod.failed.is_none(), "{name}: {:?}", pod.failed);
    }
    let b4 = "http://10.10.2.93:8080/".to_string();
    let b6_url = format!("http://[{b6}]:8080/");

    // Mesh traffic over either family: captured on node1, tunnelled, delivered on node2.
    for url in [&b4, &b6_url] {
        eventually(&format!("dual-a reaches {url}"), || (status(&lab, "dual-a", url) == "200").then_some(()));
    }
    let opened = |node: &str, direction: &str| {
        mesh_tests::harness::opened(&mesh_tests::harness::metrics(&lab, node), direction, "dual-a", "dual-b")
    };
    // node1's agent learns of dual-b (a pod of node2) on its own schedule: until then
    // its connections go out as plaintext passthrough, which PERMISSIVE serves. Once
    // it knows, both families go through it and the tunnel.
    eventually("dual-a's connections over both families go through its agent and arrive over mTLS", || {
        for url in [&b4, &b6_url] {
            status(&lab, "dual-a", url);
        }
        (opened("node1", "Outbound") >= 2 && opened("node2", "Inbound") >= 2).then_some(())
    });

    // Plaintext from outside the mesh, over either family: served while PERMISSIVE,
    // dropped in the kernel under STRICT.
    for url in [&b4, &b6_url] {
        eventually(&format!("plaintext reaches {url} before any policy"), || {
            (status(&lab, "dual-outside", url) == "200").then_some(())
        });
    }
    apply_seed(&lab, "peerauthentication.yaml");
    for url in [&b4, &b6_url] {
        eventually(&format!("{url} refused under STRICT"), || {
            (status(&lab, "dual-outside", url) == "000").then_some(())
        });
        for _ in 0..3 {
            assert_eq!(status(&lab, "dual-outside", url), "000", "plaintext to {url} got through STRICT");
        }
        assert_eq!(status(&lab, "dual-a", url), "200", "mTLS to {url} still flows under STRICT");
    }
}

#[test]
fn a_recreated_sandbox_is_captured_again_in_its_new_namespace() {
    let Some(mut lab) = lab("a_recreated_sandbox_is_captured_again_in_its_new_namespace") else { return };
    apply_seed(&lab, "peerauthentication.yaml");
    wait_strict(&lab);
    let pod = lab.pod("myapp-v2").unwrap().clone();
    let netns_ino = |name: &str| std::fs::metadata(format!("/var/run/netns/{name}")).unwrap().ino();
    let before = netns_ino(&pod.netns);
    let url = format!("http://{}:8080/", pod.ip);
    assert_eq!(status(&lab, "frontend", &url), "200");

    lab.recreate_sandbox("myapp-v2").unwrap();
    assert_ne!(netns_ino(&pod.netns), before, "a new namespace");
    // Captured again, in the new namespace, from its first connection (CNI ADD is
    // answered before the app starts; tunnels to the old one were let go): mesh
    // traffic reaches the app, plaintext is refused in the kernel as before.
    assert_eq!(status(&lab, "frontend", &url), "200", "the recreated pod's first connection");
    for _ in 0..3 {
        assert_eq!(status(&lab, "outside", &url), "000", "plaintext reached the recreated pod under STRICT");
    }
    let log = std::fs::read_to_string(lab.agent_log_path("node1")).unwrap();
    assert!(log.contains("CNI DEL: its sandbox is gone"), "the old sandbox's capture was dropped");
    // One sk_lookup link for the pod: the old namespace's went with it.
    let uid = &pod.uid;
    let links: Vec<String> = std::fs::read_dir(lab.node("node1").unwrap().pin_dir.join("links"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|l| l.contains(uid.as_str()))
        .collect();
    assert_eq!(links.len(), 1, "sk_lookup links of {uid}: {links:?}");
}

//! `meshctl` as users run it: analyze, pre-flight checks, version and completions.
//! The pre-flight tests need root (they mount and unmount bpffs in private mount
//! namespaces of their own, never touching the host's mounts) and skip without it.
#![forbid(unsafe_code)]

use std::path::Path;
use std::process::{Command, Output};

use mesh_tests::harness::root;

fn meshctl() -> Command {
    let bin = root().join("target/debug/meshctl");
    assert!(bin.exists(), "meshctl not built: run cargo build -p mesh-agent --bins (cargo xtask test does)");
    Command::new(bin)
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn scratch(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (name, body) in files {
        std::fs::write(dir.path().join(name), body).unwrap();
    }
    dir
}

#[test]
fn analyze_accepts_the_reference_configs_and_lab() {
    let seed = root().join("examples/seed");
    let mut args = vec!["analyze".to_string()];
    for f in [
        "destinationrule-myapp.yaml",
        "virtualservice-myapp.yaml",
        "peerauthentication.yaml",
        "authorizationpolicy-myapp.yaml",
        "serviceprofile-myapp.yaml",
        "trafficsplit-canary.yaml",
        "gateway-myapp.yaml",
    ] {
        args.extend(["-f".to_string(), seed.join(f).display().to_string()]);
    }
    args.extend(["-f".to_string(), root().join("examples/lab").display().to_string()]);
    let out = meshctl().args(&args).output().unwrap();
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    // The lab's default namespace holds the non-mesh `outside` pod, on purpose.
    assert!(t.contains("Info [IST0102] (Namespace default)"), "{t}");
    assert!(!t.contains("Error"), "{t}");
    // The reference document routes myapp three ways; applied together, the
    // VirtualService wins and the analyzer says so.
    assert!(t.contains("Warning [MESH0105] (ServiceProfile production/myapp.production.svc.cluster.local)"), "{t}");
    assert!(t.contains("Warning [MESH0105] (TrafficSplit production/myapp-canary)"), "{t}");
    assert!(t.contains("routed by VirtualService production/myapp, which takes precedence"), "{t}");
    // The VirtualService binds myapp-gateway, which the lab's gateway pod serves; its
    // namespace is outside the mesh's capture on purpose.
    assert!(!t.contains("(Gateway production/myapp-gateway)"), "{t}");
    assert!(!t.contains("(Namespace istio-ingress)"), "{t}");
}

#[test]
fn analyze_knows_the_gateway_api_example_and_says_what_a_route_cannot_do() {
    let example = root().join("examples/gateway-api");
    let lab = root().join("examples/lab");
    let out = meshctl().arg("analyze").arg("-f").arg(&example).arg("-f").arg(&lab).output().unwrap();
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(!t.contains("MESH0110"), "{t}");
    // A backend in another namespace without a ReferenceGrant, and a missing Gateway.
    let dir = scratch(&[(
        "routes.yaml",
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: cross, namespace: default}\nspec:\n  parentRefs: [{name: web, namespace: istio-ingress}]\n  rules: [{backendRefs: [{name: myapp, namespace: production, port: 80}]}]\n---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: lost, namespace: production}\nspec:\n  parentRefs: [{name: nowhere}]\n  rules: [{backendRefs: [{name: myapp, port: 80}]}]\n",
    )]);
    let out = meshctl()
        .arg("analyze")
        .arg("-f")
        .arg(&example)
        .arg("-f")
        .arg(&lab)
        .arg("-f")
        .arg(dir.path())
        .output()
        .unwrap();
    let t = text(&out);
    assert!(t.contains("[MESH0110] (HTTPRoute default/cross)") && t.contains("no ReferenceGrant in production"), "{t}");
    assert!(t.contains("[MESH0110] (HTTPRoute production/lost)") && t.contains("does not exist"), "{t}");
}

#[test]
fn analyze_passes_the_reference_configs_alone() {
    let out = meshctl().args(["analyze", "-f"]).arg(root().join("examples/seed")).output().unwrap();
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(t.contains("No validation issues found") && t.contains("gateway-myapp.yaml"), "{t}");
}

const SVC: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: myapp, namespace: production}\nspec: {selector: {app: myapp}, ports: [{port: 80, targetPort: 8080}]}\n";
const POD: &str = "apiVersion: v1\nkind: Pod\nmetadata: {name: myapp-v1, namespace: production, labels: {app: myapp, version: v1}}\nspec: {serviceAccountName: myapp, nodeName: node1}\nstatus: {podIP: 10.10.1.5}\n";

#[test]
fn analyze_reports_what_the_agent_refuses_and_what_no_single_file_shows() {
    let dir = scratch(&[
        ("svc.yaml", SVC),
        ("pod.yaml", POD),
        (
            "vs.yaml",
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: myapp, namespace: production}\nspec:\n  hosts: [myapp]\n  http:\n  - route: [{destination: {host: myapp, subset: v3}}]\n",
        ),
        (
            "ap.yaml",
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: typo, namespace: production}\nspec:\n  selector: {matchLabels: {app: my-app}}\n  rules: [{}]\n",
        ),
        (
            "bad.yaml",
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: broken, namespace: production}\nspec:\n  hosts: [myapp]\n  http:\n  - match: [{uri: {regex: \"(\"}}]\n    route: [{destination: {host: myapp}}]\n",
        ),
    ]);
    let out = meshctl().args(["analyze", "-f"]).arg(dir.path()).output().unwrap();
    let t = text(&out);
    assert_eq!(out.status.code(), Some(79), "errors exit 79 as istioctl analyze does:\n{t}");
    assert!(
        t.contains("Error [IST0106] (VirtualService production/broken)")
            && t.contains("spec.http[0].match[0].uri.regex"),
        "{t}"
    );
    assert!(t.contains("Error [IST0101] (VirtualService production/myapp)") && t.contains("subset v3"), "{t}");
    assert!(t.contains("Warning [IST0127] (AuthorizationPolicy production/typo)") && t.contains("app=my-app"), "{t}");
}

#[test]
fn analyze_names_a_missing_input() {
    let out = meshctl().args(["analyze", "-f", "/nonexistent/mesh.yaml"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).contains("/nonexistent/mesh.yaml: no such file or directory"));
}

#[test]
fn version_and_completions() {
    let out = meshctl().arg("version").output().unwrap();
    assert!(text(&out).starts_with("meshctl version "), "{}", text(&out));
    let out = meshctl().args(["completion", "bash"]).output().unwrap();
    assert!(out.status.success() && text(&out).contains("meshctl"), "{}", text(&out));
}

/// Runs `script` in a private mount namespace (its mounts vanish with it).
fn in_private_mounts(script: &str) -> Output {
    Command::new("unshare").args(["--mount", "--propagation", "private", "bash", "-c", script]).output().unwrap()
}

fn can_run_preflight() -> bool {
    if mesh_tests::sys::lab_unsupported().is_some() {
        assert!(
            std::env::var_os("MESH_REQUIRE_LAB").is_none(),
            "pre-flight tests required but unsupported: {:?}",
            mesh_tests::sys::lab_unsupported()
        );
        eprintln!("skipping pre-flight test: {:?}", mesh_tests::sys::lab_unsupported());
        return false;
    }
    true
}

#[test]
fn check_pre_passes_on_this_node_and_loads_the_programs() {
    if !can_run_preflight() {
        return;
    }
    let bin = root().join("target/debug/meshctl").display().to_string();
    let out = in_private_mounts(&format!(
        "mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf; NO_COLOR=1 {bin} check --pre"
    ));
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    for want in [
        "Linux kernel",
        "kernel BTF",
        "cgroup v2",
        "bpffs: mounted at /sys/fs/bpf",
        "capabilities",
        "eBPF programs: verifier accepted mesh_connect4",
    ] {
        assert!(t.contains(want), "missing {want:?} in:\n{t}");
    }
    // The probe's scratch pins are gone (visible here when the host has bpffs mounted).
    let leftovers: Vec<_> = std::fs::read_dir(Path::new("/sys/fs/bpf"))
        .map(|d| {
            d.filter_map(|e| e.ok()).filter(|e| e.file_name().to_string_lossy().starts_with("mesh-check-")).collect()
        })
        .unwrap_or_default();
    assert!(leftovers.is_empty(), "probe left pins behind: {leftovers:?}");
}

#[test]
fn check_pre_fails_clearly_without_bpffs() {
    if !can_run_preflight() {
        return;
    }
    let bin = root().join("target/debug/meshctl").display().to_string();
    let out = in_private_mounts(&format!(
        "while mountpoint -q /sys/fs/bpf; do umount /sys/fs/bpf || exit 9; done; NO_COLOR=1 {bin} check --pre"
    ));
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert!(t.contains("bpffs: /sys/fs/bpf is not a bpffs mount"), "{t}");
    assert!(t.contains("fix: mount it on the host (mount -t bpf bpf /sys/fs/bpf)"), "{t}");
    assert!(t.contains("eBPF programs: not tried"), "{t}");
}

#[test]
fn manifest_generate_and_install_dry_run_take_istioctl_sets() {
    let out = meshctl()
        .args([
            "manifest",
            "generate",
            "--set",
            "profile=minimal",
            "--set",
            "values.global.proxy.resources.limits.memory=256Mi",
        ])
        .output()
        .unwrap();
    let t = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", text(&out));
    assert!(t.contains("kind: DaemonSet") && t.contains("memory: 256Mi"), "{t}");
    assert!(!t.contains("kind: CustomResourceDefinition"), "minimal has no CRDs");

    let out = meshctl().args(["install", "--set", "profile=demo", "-y", "--dry-run"]).output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("objects would be applied"));

    let out = meshctl()
        .args(["install", "--set", "values.global.proxy.resource.requests.cpu=1", "--dry-run"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).contains("did you mean values.global.proxy.resources.requests.cpu?"), "{}", text(&out));

    let out = meshctl().args(["uninstall", "--dry-run"]).output().unwrap();
    let t = String::from_utf8_lossy(&out.stdout);
    // Reverse install order: the gateways first, then the agents, the CA, the CRDs.
    assert!(t.starts_with("would delete Service istio-ingress/istio-ingressgateway"), "{t}");
    assert!(t.contains("would delete Service istio-system/mesh-agent-metrics"), "{t}");
    assert!(t.trim_end().ends_with("would delete Namespace istio-system"), "the namespace goes last: {t}");

    // Without a cluster, install says so and how to get the manifests instead.
    let out = meshctl().args(["install", "-y"]).env("KUBECONFIG", "/nonexistent/kubeconfig").output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).contains("--dry-run"), "{}", text(&out));
}

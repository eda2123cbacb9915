//! The `deploy/` tree through the real tools users run it with: `kubectl kustomize`
//! builds each overlay, Helm's own library (the `helm-python-sdk` wheel, which bundles
//! it) lints the chart strictly and renders it, and `kubectl apply --server-side
//! --dry-run=server` applies each profile to the API-server double, whose strict field
//! validation decodes every object into its Kubernetes type. What they make must be the
//! objects `meshctl manifest generate` makes for the same profile.
//!
//! `cargo xtask setup` installs both (Helm in `target/tools/helm`). A missing tool
//! skips its test with a message, and fails it under `MESH_REQUIRE_LAB=1` (set by
//! `cargo xtask test`, which installed them).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use mesh_agent::cli::manifest::{self, Profile, Values};
use serde_json::Value;
use support::api_server::ApiServer;

mod support;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(name)).find(|p| p.is_file())
}

/// The tool, or None after saying why the test skips (a failure where tools are
/// required).
fn tool(test: &str, found: Option<PathBuf>, what: &str) -> Option<PathBuf> {
    if found.is_none() {
        assert!(std::env::var_os("MESH_REQUIRE_LAB").is_none(), "{test}: {what} is not installed (cargo xtask setup)");
        eprintln!("skipping {test}: {what} is not installed (cargo xtask setup)");
    }
    found
}

/// Python with `helm_python` importable: `MESH_HELM_PYTHON`, or setup's venv.
fn helm_python() -> Option<PathBuf> {
    let p = std::env::var_os("MESH_HELM_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target/tools/helm/bin/python"));
    let ok = Command::new(&p).args(["-c", "import helm_python"]).output().is_ok_and(|o| o.status.success());
    ok.then_some(p)
}

fn parse(text: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(text)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .filter(|v: &Value| !v.is_null())
        .collect()
}

/// `0.0` and `0` are one number to YAML and the API server; kustomize writes the
/// second where the generator's schemas have the first.
fn normalized(v: &Value) -> Value {
    match v {
        Value::Number(n) if n.as_f64().is_some_and(|f| f.fract() == 0.0 && n.is_f64()) => {
            Value::from(n.as_f64().unwrap_or_default() as i64)
        }
        Value::Array(a) => Value::Array(a.iter().map(normalized).collect()),
        Value::Object(o) => Value::Object(o.iter().map(|(k, v)| (k.clone(), normalized(v))).collect()),
        other => other.clone(),
    }
}

fn as_set(objects: &[Value]) -> BTreeSet<String> {
    objects
        .iter()
        .map(normalized)
        .map(|o| format!("{} {}/{} {o}", o["kind"], o["metadata"]["namespace"], o["metadata"]["name"]))
        .collect()
}

/// Asserts both hold the same objects; names only the ones that differ.
fn assert_same(have: &[Value], want: &[Value], what: &str) {
    let (have, want) = (as_set(have), as_set(want));
    let short = |s: &&String| s.chars().take(300).collect::<String>();
    let extra: Vec<_> = have.difference(&want).map(|s| short(&s)).collect();
    let missing: Vec<_> = want.difference(&have).map(|s| short(&s)).collect();
    assert!(extra.is_empty() && missing.is_empty(), "{what}:\nnot in the profile: {extra:#?}\nmissing: {missing:#?}");
}

fn profile(p: Profile) -> Vec<Value> {
    manifest::objects(&Values::for_profile(p))
}

#[test]
fn kubectl_kustomize_builds_each_overlay_as_its_profile() {
    let Some(kubectl) = tool("kubectl_kustomize_builds_each_overlay_as_its_profile", which("kubectl"), "kubectl")
    else {
        return;
    };
    for (dir, p) in [
        ("deploy/kustomize/base", Profile::Minimal),
        ("deploy/kustomize/overlays/default", Profile::Default),
        ("deploy/kustomize/overlays/demo", Profile::Demo),
    ] {
        let out = Command::new(&kubectl).arg("kustomize").arg(repo().join(dir)).output().unwrap();
        assert!(out.status.success(), "kubectl kustomize {dir}: {}", String::from_utf8_lossy(&out.stderr));
        let built = parse(&String::from_utf8_lossy(&out.stdout));
        assert_same(&built, &profile(p), dir);
    }
}

/// Runs `script` with the Helm-bundling Python; its stdout is JSON.
fn helm(python: &Path, script: &str) -> Value {
    let out = Command::new(python).args(["-c", script]).arg(repo().join("deploy/helm/mesh")).output().unwrap();
    assert!(
        out.status.success(),
        "helm: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

const RENDER: &str = r#"
import json, sys, helm_python
chart = helm_python.Chart.load(sys.argv[1])
values = json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
rendered = chart.render(values, name="mesh", namespace="istio-system", is_install=True)
print(json.dumps({"templates": rendered, "crds": [c["data"] for c in chart.crds]}))
"#;

/// The objects Helm renders with `values`, and the CRDs it would install first.
fn render(python: &Path, values: &str) -> (Vec<Value>, Vec<Value>) {
    let out =
        Command::new(python).args(["-c", RENDER]).arg(repo().join("deploy/helm/mesh")).arg(values).output().unwrap();
    assert!(out.status.success(), "helm render: {}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let objects = v["templates"].as_object().unwrap().values().flat_map(|t| parse(t.as_str().unwrap())).collect();
    let crds = v["crds"].as_array().unwrap().iter().flat_map(|c| parse(c.as_str().unwrap())).collect();
    (objects, crds)
}

#[test]
fn helm_lints_the_chart_strictly_and_renders_the_default_profile() {
    let test = "helm_lints_the_chart_strictly_and_renders_the_default_profile";
    let Some(python) = tool(test, helm_python(), "Helm (helm-python-sdk)") else { return };
    let lint = helm(
        &python,
        "import json, sys, helm_python; print(json.dumps(helm_python.lint(sys.argv[1], strict=True, namespace='istio-system')))",
    );
    assert_eq!(lint["errors"], serde_json::json!([]), "{lint}");
    // Helm's strict lint fails on warnings too; an info ("icon is recommended") is fine.
    let worse: Vec<_> =
        lint["messages"].as_array().unwrap().iter().filter(|m| m["severity"].as_u64() > Some(1)).collect();
    assert!(worse.is_empty(), "{lint}");

    // Rendered with its own values: the default profile, less the namespace (Helm's
    // `--create-namespace` makes it) and the CRDs (installed from crds/, untemplated).
    let (mut chart, crds) = render(&python, "{}");
    chart.extend(crds);
    let want: Vec<Value> = profile(Profile::Default).into_iter().filter(|o| o["kind"] != "Namespace").collect();
    assert_same(&chart, &want, "helm template");

    // Values a user sets reach the objects; telemetry off drops the metrics Service.
    let (objects, _) = render(
        &python,
        r#"{"global": {"hub": "registry.example/mesh", "tag": "9.9.9"}, "telemetry": {"enabled": false}}"#,
    );
    let ds = objects.iter().find(|o| o["kind"] == "DaemonSet").expect("the agent's DaemonSet");
    assert_eq!(ds["spec"]["template"]["spec"]["containers"][0]["image"], "registry.example/mesh/mesh-agent:9.9.9");
    assert!(!objects.iter().any(|o| o["metadata"]["name"] == "mesh-agent-metrics"), "telemetry.enabled=false");
}

/// `kubectl apply --server-side --dry-run=server --validate=strict -f file` against
/// the double: success, and what kubectl printed.
async fn kubectl_apply(kubectl: &Path, kubeconfig: &Path, file: &Path) -> (bool, String) {
    let mut cmd = Command::new(kubectl);
    cmd.arg("--kubeconfig")
        .arg(kubeconfig)
        .args(["apply", "--server-side", "--dry-run=server", "--validate=strict", "-f"])
        .arg(file);
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap()).await.unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

#[tokio::test(flavor = "multi_thread")]
async fn kubectl_applies_every_profile_and_the_api_refuses_a_field_it_does_not_declare() {
    let test = "kubectl_applies_every_profile_and_the_api_refuses_a_field_it_does_not_declare";
    let Some(kubectl) = tool(test, which("kubectl"), "kubectl") else { return };
    let collections: Vec<String> = support::kinds::builtin().iter().map(|k| k.collection()).collect();
    let api = ApiServer::new(&collections).await;
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = api.kubeconfig(dir.path());
    for profile in ["minimal", "default", "demo"] {
        let file = repo().join(format!("deploy/manifests/{profile}.yaml"));
        let (ok, text) = kubectl_apply(&kubectl, &kubeconfig, &file).await;
        assert!(ok, "kubectl apply of the {profile} profile: {text}");
        let objects = std::fs::read_to_string(&file).unwrap().matches("\nkind: ").count();
        assert_eq!(text.matches("serverside-applied (server dry run)").count(), objects, "{profile}: {text}");
    }
    assert!(api.writes().is_empty(), "a dry run stored nothing: {:?}", api.writes());

    // The class of mistake a hand check misses: a misspelt field, a value of the wrong
    // type. kubectl reports the API's refusal with the field's path.
    let manifest = std::fs::read_to_string(repo().join("deploy/manifests/default.yaml")).unwrap();
    for (from, to, field) in [
        ("mountPropagation: HostToContainer", "mountPropagaton: HostToContainer", "mountPropagaton"),
        ("readOnlyRootFilesystem: true", "readOnlyRootFilesystem: 'yes'", "readOnlyRootFilesystem"),
        // What the DaemonSet once had: the agent's bpffs with Bidirectional propagation,
        // which only a privileged container may use.
        ("mountPropagation: HostToContainer", "mountPropagation: Bidirectional", "available only to privileged"),
    ] {
        assert!(manifest.contains(from), "{from}");
        let file = dir.path().join("broken.yaml");
        std::fs::write(&file, manifest.replacen(from, to, 1)).unwrap();
        let (ok, text) = kubectl_apply(&kubectl, &kubeconfig, &file).await;
        assert!(!ok, "kubectl applied {to:?}: {text}");
        assert!(text.contains(field) && (text.contains("Error from server") || text.contains("is invalid")), "{text}");
        let refusal = text.lines().find(|l| l.contains(field)).unwrap_or_default();
        eprintln!("kubectl refused {to:?}: {refusal}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_addons_build_apply_strictly_and_are_what_meshctl_dashboard_opens() {
    let test = "the_addons_build_apply_strictly_and_are_what_meshctl_dashboard_opens";
    let Some(kubectl) = tool(test, which("kubectl"), "kubectl") else { return };
    let out = Command::new(&kubectl).arg("kustomize").arg(repo().join("deploy/addons")).output().unwrap();
    assert!(out.status.success(), "kubectl kustomize deploy/addons: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let objects = parse(&text);

    // The API (strict field validation) takes every object as written.
    let collections: Vec<String> = support::kinds::builtin().iter().map(|k| k.collection()).collect();
    let api = ApiServer::new(&collections).await;
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = api.kubeconfig(dir.path());
    let file = dir.path().join("addons.yaml");
    std::fs::write(&file, &text).unwrap();
    let (ok, said) = kubectl_apply(&kubectl, &kubeconfig, &file).await;
    assert!(ok, "kubectl apply of deploy/addons: {said}");
    assert_eq!(said.matches("serverside-applied (server dry run)").count(), objects.len(), "{said}");

    // What `meshctl dashboard <addon>` looks for: a pod labelled app=<addon> in
    // istio-system declaring the port it proxies to.
    use mesh_agent::cli::dashboard::Target;
    for target in [Target::Kiali, Target::Jaeger, Target::Prometheus, Target::Grafana] {
        let (app, port) = target.addon().unwrap();
        let deployment = objects
            .iter()
            .find(|o| o["kind"] == "Deployment" && o["spec"]["template"]["metadata"]["labels"]["app"] == app)
            .unwrap_or_else(|| panic!("no Deployment of app={app}"));
        assert_eq!(deployment["metadata"]["namespace"], "istio-system", "{app}");
        let ports: Vec<i64> = deployment["spec"]["template"]["spec"]["containers"][0]["ports"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|p| p["containerPort"].as_i64())
            .collect();
        assert!(ports.contains(&i64::from(port)), "{app} declares {ports:?}, meshctl opens {port}");
    }
    // The demo profile's agents export spans to the Jaeger collector Service here.
    let endpoint = manifest::DEMO_TRACE_ENDPOINT.trim_start_matches("grpc://");
    let (host, port) = endpoint.rsplit_once(':').unwrap();
    let collector = objects
        .iter()
        .find(|o| {
            o["kind"] == "Service"
                && host.starts_with(&format!("{}.istio-system.", o["metadata"]["name"].as_str().unwrap()))
        })
        .expect("the collector Service the demo profile names");
    assert!(collector["spec"]["ports"].as_array().unwrap().iter().any(|p| p["port"].as_i64() == port.parse().ok()));
    // Prometheus sends its token only to the mesh's pods: the job with credentials keeps
    // only the agents' and gateways' app labels in the mesh's namespaces.
    let config = objects.iter().find(|o| o["kind"] == "ConfigMap" && o["metadata"]["name"] == "prometheus").unwrap();
    let prometheus_yml = config["data"]["prometheus.yml"].as_str().unwrap();
    let scrape: Value = serde_yaml::from_str(prometheus_yml).unwrap();
    for job in scrape["scrape_configs"].as_array().unwrap() {
        if job.get("authorization").is_some() {
            let keeps: Vec<&Value> =
                job["relabel_configs"].as_array().unwrap().iter().filter(|r| r["action"] == "keep").collect();
            assert!(keeps.iter().any(|r| r["source_labels"][0] == "__meta_kubernetes_pod_label_app"), "{job}");
            assert_eq!(job["kubernetes_sd_configs"][0]["namespaces"]["names"][0], "istio-system", "{job}");
        }
    }
    // And Prometheus's own checker accepts it: relabel rules, regexes, auth. Debian
    // builds Prometheus without Kubernetes discovery, so each job's discovery is
    // swapped for a static target first; the rest is checked as written.
    if let Some(promtool) = tool(test, which("promtool"), "promtool (Debian's prometheus)") {
        let mut checked = scrape.clone();
        for job in checked["scrape_configs"].as_array_mut().unwrap() {
            let job = job.as_object_mut().unwrap();
            assert!(job.remove("kubernetes_sd_configs").is_some());
            job.insert("static_configs".into(), serde_json::json!([{"targets": ["127.0.0.1:9"]}]));
        }
        let path = dir.path().join("prometheus.yml");
        std::fs::write(&path, serde_yaml::to_string(&checked).unwrap()).unwrap();
        let out = Command::new(promtool).args(["check", "config", "--syntax-only"]).arg(&path).output().unwrap();
        assert!(
            out.status.success(),
            "promtool check config: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // The Grafana dashboard is provisioned from the file (lab: metrics.rs runs its
    // queries against a real Prometheus scraping real agents).
    let dashboards = objects.iter().find(|o| o["metadata"]["name"] == "grafana-mesh-dashboards").unwrap();
    let json: Value = serde_json::from_str(dashboards["data"]["mesh-agents.json"].as_str().unwrap()).unwrap();
    assert_eq!(json["uid"], "mesh-agents");
    assert!(api.writes().is_empty());
}

/// The addons' alert rules, by Prometheus' own `promtool`: they load, and over series
/// the agents would export they fire when they should and not before (a certificate
/// whose renewal keeps failing, a config source outage, a rejected config), and stay
/// quiet for a healthy agent.
#[test]
fn the_alert_rules_load_and_fire_on_what_they_name() {
    let test = "the_alert_rules_load_and_fire_on_what_they_name";
    let Some(promtool) = tool(test, which("promtool"), "promtool (Debian's prometheus)") else { return };
    let objects = parse(&std::fs::read_to_string(repo().join("deploy/addons/prometheus.yaml")).unwrap());
    let config = objects.iter().find(|o| o["kind"] == "ConfigMap" && o["metadata"]["name"] == "prometheus").unwrap();
    let rules = config["data"]["mesh-alerts.yml"].as_str().expect("the ConfigMap carries mesh-alerts.yml");
    let prometheus_yml = config["data"]["prometheus.yml"].as_str().unwrap();
    assert!(prometheus_yml.contains("rule_files: [/etc/prometheus/mesh-alerts.yml]"), "Prometheus loads the rules");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("mesh-alerts.yml"), rules).unwrap();
    let checked =
        Command::new(&promtool).arg("check").arg("rules").arg(dir.path().join("mesh-alerts.yml")).output().unwrap();
    assert!(checked.status.success(), "promtool check rules: {}", String::from_utf8_lossy(&checked.stderr));

    let cases = r#"
rule_files: [mesh-alerts.yml]
evaluation_interval: 1m
tests:
- interval: 1m
  input_series:
  # Agent a: its certificate's renewal fails; 25000 s left, 600 s less each minute.
  - series: 'istio_agent_cert_expiry_seconds{pod="mesh-agent-a", node="node1"}'
    values: '25000-600x30'
  # Agent b: its config source goes away at 2m; a config is rejected at 3m.
  - series: 'istio_mesh_config_source_up{pod="mesh-agent-b", node="node2"}'
    values: '1 1 0 0 0 0 0 0 0 0'
  - series: 'istio_mesh_config_rejected_total{pod="mesh-agent-b", node="node2"}'
    values: '0 0 0 1 1 1 1 1 1 1'
  # Agent c: healthy, its certificate renewed at half-life.
  - series: 'istio_agent_cert_expiry_seconds{pod="mesh-agent-c", node="node2"}'
    values: '50000-60x30'
  - series: 'istio_mesh_config_source_up{pod="mesh-agent-c", node="node2"}'
    values: '1x30'
  - series: 'istio_mesh_config_rejected_total{pod="mesh-agent-c", node="node2"}'
    values: '0x30'
  - series: 'up{job="mesh-agents", pod="mesh-agent-c", node="node2"}'
    values: '1x30'
  alert_rule_test:
  # Under 6 h from 7m on; 5 minutes later it fires.
  - eval_time: 10m
    alertname: MeshWorkloadCertificateExpiring
    exp_alerts: []
  - eval_time: 13m
    alertname: MeshWorkloadCertificateExpiring
    exp_alerts:
    - exp_labels: {severity: warning, pod: mesh-agent-a, node: node1}
      exp_annotations:
        summary: "A workload certificate held by mesh-agent-a expires in 4h 46m 40s"
        description: "Renewal from the mesh CA has been failing; its pods' connections are refused once it expires."
  - eval_time: 13m
    alertname: MeshWorkloadCertificateExpiringSoon
    exp_alerts: []
  - eval_time: 3m
    alertname: MeshConfigSourceDown
    exp_alerts: []
  - eval_time: 5m
    alertname: MeshConfigSourceDown
    exp_alerts:
    - exp_labels: {severity: warning, pod: mesh-agent-b, node: node2}
      exp_annotations:
        summary: "mesh-agent-b cannot read its config source; it serves the last config read"
  - eval_time: 5m
    alertname: MeshConfigRejected
    exp_alerts:
    - exp_labels: {severity: warning, pod: mesh-agent-b, node: node2}
      exp_annotations:
        summary: "mesh-agent-b rejected config (see meshctl analyze or /config_dump); the last good version stays"
  - eval_time: 20m
    alertname: MeshAgentDown
    exp_alerts: []
"#;
    std::fs::write(dir.path().join("cases.yml"), cases).unwrap();
    let out = Command::new(&promtool).current_dir(dir.path()).args(["test", "rules", "cases.yml"]).output().unwrap();
    assert!(
        out.status.success(),
        "promtool test rules:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs `script` with bash (`pipefail`), `$MESHCTL` and `$KUBECTL` set and the double's kubeconfig:
/// success, standard output and standard error.
async fn pipeline(script: &str, kubectl: &Path, kubeconfig: &Path) -> (bool, String, String) {
    let mut cmd = Command::new("bash");
    cmd.args(["-c", &format!("set -eu -o pipefail; {script}")])
        .env("MESHCTL", env!("CARGO_BIN_EXE_meshctl"))
        .env("KUBECTL", kubectl)
        .env("KUBECONFIG", kubeconfig)
        .env("NO_COLOR", "1");
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap()).await.unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn linkerds_install_and_inject_pipelines_apply_with_kubectl() {
    let test = "linkerds_install_and_inject_pipelines_apply_with_kubectl";
    let Some(kubectl) = tool(test, which("kubectl"), "kubectl") else { return };
    let collections: Vec<String> = support::kinds::builtin().iter().map(|k| k.collection()).collect();
    let api = ApiServer::new(&collections).await;
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = api.kubeconfig(dir.path());
    // The double does server-side apply (what the whole object sends); kubectl's
    // client-side apply sends strategic merge patches, which it does not implement.
    let apply = "$KUBECTL apply --server-side -f -";

    // `linkerd install --crds | kubectl apply -f -`: the CRDs alone.
    let (ok, out, err) = pipeline(&format!("$MESHCTL install --crds | {apply}"), &kubectl, &kubeconfig).await;
    assert!(ok, "{out}{err}");
    let crds = manifest::crd_objects(&Values::for_profile(Profile::Default)).len();
    assert!(crds > 0);
    assert_eq!(out.matches("serverside-applied").count(), crds, "{out}");
    assert!(out.lines().all(|l| l.starts_with("customresourcedefinition")), "{out}");

    // `linkerd install | kubectl apply -f -`: the rest, printed because standard output
    // is a pipe (-y would apply it itself).
    let (ok, out, err) = pipeline(&format!("$MESHCTL install | {apply}"), &kubectl, &kubeconfig).await;
    assert!(ok, "{out}{err}");
    assert!(err.contains("printed the manifests"), "{err}");
    let objects = manifest::objects(&Values::for_profile(Profile::Default)).len();
    assert_eq!(out.matches("serverside-applied").count(), objects, "{out}");
    assert!(api.get("/apis/apps/v1/daemonsets", "istio-system", "mesh-agent").is_some());

    // `kubectl get deploy -o yaml | linkerd inject - | kubectl apply -f -`.
    api.apply(
        "/apis/apps/v1/deployments",
        serde_json::json!({"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "web", "namespace": "production"},
            "spec": {"selector": {"matchLabels": {"app": "web"}},
                     "template": {"metadata": {"labels": {"app": "web"}},
                                  "spec": {"containers": [{"name": "web", "image": "web:1"}]}}}}),
    );
    let script = format!("$KUBECTL get deploy -n production -o yaml | $MESHCTL inject - | {apply}");
    let (ok, out, err) = pipeline(&script, &kubectl, &kubeconfig).await;
    assert!(ok, "{out}{err}");
    assert!(err.contains("deployment \"web\" injected"), "{err}");
    let web = api.get("/apis/apps/v1/deployments", "production", "web").unwrap();
    assert_eq!(web["spec"]["template"]["metadata"]["annotations"]["linkerd.io/inject"], "enabled", "{web}");
    assert_eq!(web["spec"]["template"]["spec"]["containers"].as_array().unwrap().len(), 1, "no sidecar: {web}");
}

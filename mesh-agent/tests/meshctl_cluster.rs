//! `meshctl` against a cluster (the API server double, reached through a kubeconfig as
//! a user's cluster is): install applies in order, creates the CA Secret and leaves
//! what it did not create alone (Istio's CRDs, an existing namespace, a plug-in CA);
//! `check` / `verify-install` finds what is missing and passes once the cluster is
//! healthy; `uninstall` removes only the mesh's objects; `analyze --cluster` and
//! `check --pre --cluster` read the cluster. `proxy-status` against running agents is
//! in `cluster_mode.rs`.

mod support;

use std::process::{Command, Output, Stdio};

use mesh_agent::config::kube_source::KINDS;
use serde_json::{Value, json};
use support::api_server::{ApiServer, collection_path};

const CRDS: &str = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions";
const SECRETS: &str = "/api/v1/secrets";
const NAMESPACES: &str = "/api/v1/namespaces";

async fn cluster() -> ApiServer {
    let mut c: Vec<String> = KINDS.iter().map(|k| collection_path(k.group, k.version, k.plural)).collect();
    for extra in [
        "/api/v1/secrets",
        "/api/v1/configmaps",
        "/api/v1/nodes",
        "/apis/apps/v1/daemonsets",
        "/apis/apps/v1/deployments",
        "/apis/rbac.authorization.k8s.io/v1/clusterroles",
        "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings",
        "/apis/rbac.authorization.k8s.io/v1/roles",
        "/apis/rbac.authorization.k8s.io/v1/rolebindings",
        "/apis/networking.k8s.io/v1/networkpolicies",
        CRDS,
    ] {
        c.push(extra.into());
    }
    ApiServer::new(&c).await
}

/// Runs meshctl with the kubeconfig of `api` (blocking: call from spawn_blocking).
fn meshctl(kubeconfig: &std::path::Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_meshctl"))
        .args(args)
        .env("KUBECONFIG", kubeconfig)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

async fn run(kubeconfig: &std::path::Path, args: &[&str]) -> (Option<i32>, String) {
    let (k, a): (std::path::PathBuf, Vec<String>) = (kubeconfig.into(), args.iter().map(|s| s.to_string()).collect());
    let out = tokio::task::spawn_blocking(move || {
        let refs: Vec<&str> = a.iter().map(String::as_str).collect();
        meshctl(&k, &refs)
    })
    .await
    .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code(), text)
}

fn istio_crd() -> Value {
    json!({"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": "virtualservices.networking.istio.io", "labels": {"app": "istio-pilot", "chart": "istio"}},
        "spec": {"group": "networking.istio.io", "scope": "Namespaced",
            "names": {"plural": "virtualservices", "kind": "VirtualService"},
            "versions": [{"name": "v1", "served": true, "storage": true}, {"name": "v1beta1", "served": true, "storage": false}]},
        "status": {"conditions": [{"type": "Established", "status": "True"}]}})
}

fn node(name: &str, kernel: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name},
        "status": {"nodeInfo": {"kernelVersion": kernel, "kubeletVersion": "v1.32.4", "osImage": "Debian",
            "architecture": "amd64", "bootID": "", "containerRuntimeVersion": "containerd://2.0", "kubeProxyVersion": "",
            "machineID": "", "operatingSystem": "linux", "systemUUID": ""}}})
}

fn agent_pod(node: &str, tag: &str, ready: bool) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": format!("mesh-agent-{node}"), "namespace": "istio-system", "labels": {"app": "mesh-agent"}},
        "spec": {"nodeName": node, "containers": [{"name": "mesh-agent", "image": format!("ghcr.io/example/mesh/mesh-agent:{tag}")}]},
        "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]}})
}

/// What the controllers would do after an install: CRDs established, the DaemonSet
/// rolled out, an agent pod per node.
fn settle(api: &ApiServer, nodes: &[&str]) {
    let crds: Vec<Value> = [
        "virtualservices.networking.istio.io",
        "destinationrules.networking.istio.io",
        "gateways.networking.istio.io",
        "serviceentries.networking.istio.io",
        "peerauthentications.security.istio.io",
        "authorizationpolicies.security.istio.io",
        "serviceprofiles.linkerd.io",
        "trafficsplits.split.smi-spec.io",
        "gatewayclasses.gateway.networking.k8s.io",
        "gateways.gateway.networking.k8s.io",
        "httproutes.gateway.networking.k8s.io",
        "grpcroutes.gateway.networking.k8s.io",
        "referencegrants.gateway.networking.k8s.io",
        "telemetries.telemetry.istio.io",
    ]
    .iter()
    .filter_map(|n| api.get(CRDS, "", n))
    .collect();
    for mut crd in crds {
        crd["status"] = json!({"conditions": [{"type": "Established", "status": "True"}]});
        api.apply(CRDS, crd);
    }
    let mut ds = api.get("/apis/apps/v1/daemonsets", "istio-system", "mesh-agent").expect("DaemonSet applied");
    ds["metadata"]["generation"] = json!(1);
    let n = nodes.len();
    ds["status"] = json!({"observedGeneration": 1, "desiredNumberScheduled": n, "currentNumberScheduled": n,
        "numberReady": n, "updatedNumberScheduled": n, "numberAvailable": n, "numberMisscheduled": 0});
    api.apply("/apis/apps/v1/daemonsets", ds);
    for name in nodes {
        api.apply("/api/v1/nodes", node(name, "6.1.0-28-amd64"));
        api.apply("/api/v1/pods", agent_pod(name, env!("CARGO_PKG_VERSION"), true));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn install_check_and_uninstall_against_a_cluster() {
    let api = cluster().await;
    let dir = tempfile::tempdir().unwrap();
    let kc = api.kubeconfig(dir.path());
    // Istio is already there with its own VirtualService CRD.
    api.apply(CRDS, istio_crd());

    // No terminal and no -y: the manifests are printed (for `| kubectl apply -f -`,
    // Linkerd's way), and nothing is changed.
    let (code, out) = run(&kc, &["install"]).await;
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("printed the manifests") && out.contains("kind: DaemonSet"), "{out}");
    assert!(api.writes().is_empty(), "{:?}", api.writes());

    let (code, out) = run(&kc, &["install", "-y"]).await;
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("kept CustomResourceDefinition virtualservices.networking.istio.io: installed by another owner"),
        "{out}"
    );
    assert!(out.contains("created Secret istio-system/cacerts"), "{out}");
    assert!(out.contains("applied DaemonSet istio-system/mesh-agent"), "{out}");
    assert!(!out.contains("PRIVATE KEY"), "key material printed: {out}");

    // Istio's CRD is untouched; ours are applied; the order is namespace, CA, ..., DaemonSet.
    assert_eq!(
        api.get(CRDS, "", "virtualservices.networking.istio.io").unwrap()["metadata"]["labels"]["chart"],
        "istio"
    );
    assert!(api.get(CRDS, "", "destinationrules.networking.istio.io").is_some());
    let writes = api.writes();
    let at = |what: &str| {
        writes.iter().position(|w| w.contains(what)).unwrap_or_else(|| panic!("{what} not written: {writes:?}"))
    };
    assert!(at("namespaces /istio-system") < at("secrets istio-system/cacerts"));
    assert!(at("secrets istio-system/cacerts") < at("daemonsets istio-system/mesh-agent"));
    assert!(!writes.iter().any(|w| w.contains("virtualservices.networking.istio.io")), "{writes:?}");

    // The generated CA is a usable root the agent would load.
    let secret: k8s_openapi::api::core::v1::Secret =
        serde_json::from_value(api.get(SECRETS, "istio-system", "cacerts").unwrap()).unwrap();
    let ca_dir = dir.path().join("ca");
    let data: std::collections::BTreeMap<String, Vec<u8>> =
        secret.data.unwrap().into_iter().map(|(k, v)| (k, v.0)).collect();
    assert_eq!(data.len(), 4, "{:?}", data.keys());
    let files = mesh_agent::identity::CaFiles::write_from_secret(&ca_dir, &data).unwrap();
    mesh_agent::identity::MeshCa::load(&files).expect("the generated CA loads");

    // A second install changes nothing it should not: the CA is kept.
    let (code, out) = run(&kc, &["install", "-y"]).await;
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("kept Secret istio-system/cacerts: plug-in CA present"), "{out}");
    assert!(out.contains("kept Namespace istio-system: exists"), "{out}");

    // Before the controllers did their part, check says what is missing and exits 1.
    let (code, out) = run(&kc, &["check"]).await;
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("\u{2718} agent DaemonSet: 0 desired"), "{out}");
    assert!(out.contains("is not Established yet"), "{out}");
    assert!(out.contains("fix: "), "{out}");

    settle(&api, &["node1", "node2"]);
    let (code, out) = run(&kc, &["verify-install"]).await;
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("a ready agent on each of 2 node(s)"), "{out}");
    assert!(out.contains("every agent is ready"), "{out}");

    // A node without a ready agent, and an agent at another version, are named.
    api.apply("/api/v1/nodes", node("node3", "6.1.0-28-amd64"));
    api.apply("/api/v1/pods", agent_pod("node2", "0.0.9", false));
    let (code, out) = run(&kc, &["check"]).await;
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("node2 (agent mesh-agent-node2 not ready)") && out.contains("node3 (no agent)"), "{out}");
    assert!(out.contains("mesh-agent-node2 runs 0.0.9"), "{out}");

    // Uninstall: the mesh's objects go, CRDs stay without --purge, Istio's always.
    let (code, out) = run(&kc, &["uninstall", "-y"]).await;
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("deleted DaemonSet istio-system/mesh-agent"), "{out}");
    assert!(out.contains("deleted Secret istio-system/cacerts"), "{out}");
    assert!(out.contains("deleted Namespace istio-system"), "{out}");
    assert!(api.get("/apis/apps/v1/daemonsets", "istio-system", "mesh-agent").is_none());
    assert!(api.get(CRDS, "", "destinationrules.networking.istio.io").is_some(), "CRDs stay without --purge");
    let (code, out) = run(&kc, &["uninstall", "--purge", "-y"]).await;
    assert_eq!(code, Some(0), "{out}");
    assert!(api.get(CRDS, "", "destinationrules.networking.istio.io").is_none(), "{out}");
    assert!(api.get(CRDS, "", "virtualservices.networking.istio.io").is_some(), "Istio's CRD is never ours to delete");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_existing_namespace_and_plug_in_ca_are_used_and_left_alone() {
    let api = cluster().await;
    let dir = tempfile::tempdir().unwrap();
    let kc = api.kubeconfig(dir.path());
    api.apply(NAMESPACES, json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "istio-system"}}));
    let plug_in = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "cacerts", "namespace": "istio-system"},
        "data": {"ca-cert.pem": "Y2VydA==", "ca-key.pem": "a2V5"}});
    api.apply(SECRETS, plug_in.clone());

    let (code, out) = run(&kc, &["install", "-y", "--set", "profile=minimal"]).await;
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("kept Namespace istio-system: exists; used as it is"), "{out}");
    assert!(out.contains("kept Secret istio-system/cacerts: plug-in CA present"), "{out}");
    assert_eq!(api.get(SECRETS, "istio-system", "cacerts").unwrap()["data"], plug_in["data"]);
    assert!(api.get(CRDS, "", "destinationrules.networking.istio.io").is_none(), "minimal installs no CRDs");

    let (code, out) = run(&kc, &["uninstall", "-y", "--purge", "--set", "profile=minimal"]).await;
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("kept Secret istio-system/cacerts: a plug-in CA"), "{out}");
    assert!(out.contains("kept Namespace istio-system: not installed by the mesh"), "{out}");
    assert!(api.get(NAMESPACES, "", "istio-system").is_some());
    assert!(api.get(SECRETS, "istio-system", "cacerts").is_some());

    // A CA Secret without its key is refused with the fix.
    api.apply(
        SECRETS,
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "cacerts", "namespace": "istio-system"},
        "data": {"ca-cert.pem": "Y2VydA=="}}),
    );
    let (code, out) = run(&kc, &["install", "-y", "--set", "profile=minimal"]).await;
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("Secret istio-system/cacerts: it has no ca-key.pem key"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn analyze_and_preflight_read_the_cluster() {
    let api = cluster().await;
    let dir = tempfile::tempdir().unwrap();
    let kc = api.kubeconfig(dir.path());
    let vs = |name: &str, subset: &str| {
        json!({"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
            "metadata": {"name": name, "namespace": "production"},
            "spec": {"hosts": ["myapp"], "http": [{"route": [{"destination": {"host": "myapp", "subset": subset}}]}]}})
    };
    api.apply(
        "/api/v1/services",
        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "myapp", "namespace": "production"},
            "spec": {"selector": {"app": "myapp"}, "clusterIP": "10.96.0.20", "ports": [{"port": 80}]}}),
    );
    api.apply(
        &collection_path("networking.istio.io", "v1", "destinationrules"),
        json!({"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
            "metadata": {"name": "myapp", "namespace": "production"},
            "spec": {"host": "myapp", "subsets": [{"name": "v2", "labels": {"version": "v2"}}]}}),
    );
    api.apply(&collection_path("networking.istio.io", "v1", "virtualservices"), vs("myapp", "v1"));
    let (code, out) = run(&kc, &["analyze", "--cluster"]).await;
    assert_eq!(code, Some(79), "{out}");
    assert!(out.contains("IST0101") && out.contains("VirtualService production/myapp"), "{out}");
    assert!(out.contains("Analyzers found issues when analyzing the cluster"), "{out}");

    // A regex the agent refuses is reported by object and field.
    let mut bad = vs("broken", "v1");
    bad["spec"]["http"][0]["match"] = json!([{"uri": {"regex": "("}}]);
    api.apply(&collection_path("networking.istio.io", "v1", "virtualservices"), bad);
    let (_, out) = run(&kc, &["analyze", "--cluster"]).await;
    assert!(out.contains("IST0106") && out.contains("spec.http[0].match[0].uri.regex"), "{out}");

    // A NetworkPolicy that lets in only the application's port closes the tunnel to
    // the enrolled pods it selects.
    api.apply(
        "/api/v1/namespaces",
        json!({"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": "production", "labels": {"istio.io/dataplane-mode": "ambient"}}}),
    );
    api.apply(
        "/api/v1/pods",
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "myapp-v1", "namespace": "production", "labels": {"app": "myapp"}},
            "spec": {"nodeName": "node1", "containers": [{"name": "app", "ports": [{"containerPort": 8080}]}]},
            "status": {"podIP": "10.10.2.2"}}),
    );
    api.apply(
        "/apis/networking.k8s.io/v1/networkpolicies",
        json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": "myapp-in", "namespace": "production"},
            "spec": {"podSelector": {"matchLabels": {"app": "myapp"}}, "ingress": [{"ports": [{"port": 8080}]}]}}),
    );
    let (_, out) = run(&kc, &["analyze", "--cluster"]).await;
    assert!(out.contains("MESH0106") && out.contains("NetworkPolicy production/myapp-in"), "{out}");

    api.apply("/api/v1/nodes", node("node1", "6.1.0-28-amd64"));
    let (code, out) = run(&kc, &["check", "--pre", "--cluster"]).await;
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("Kubernetes version: v1.32.4") && out.contains("node1: 6.1.0-28-amd64"), "{out}");
    api.apply("/api/v1/nodes", node("old", "4.19.0-27-amd64"));
    let (code, out) = run(&kc, &["check", "--pre", "--cluster"]).await;
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("old: 4.19.0-27-amd64 is older than 5.10"), "{out}");

    // No cluster: a clear message, not a hang.
    api.stop().await;
    let (code, out) = run(&kc, &["check"]).await;
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("Kubernetes API: unreachable"), "{out}");
}

/// The reference document's multi-cluster step, `istioctl install -f` with its
/// IstioOperator, through meshctl: the agents are told their cluster, network and mesh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_istio_operator_file_installs_the_cluster_it_names() {
    let api = cluster().await;
    let dir = tempfile::tempdir().unwrap();
    let kc = api.kubeconfig(dir.path());
    let iop = dir.path().join("iop.yaml");
    std::fs::write(
        &iop,
        "apiVersion: install.istio.io/v1alpha1\nkind: IstioOperator\nspec:\n  values:\n    global:\n      meshID: mesh1\n      \
         multiCluster:\n        clusterName: cluster1\n      network: network1\n",
    )
    .unwrap();
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        "apiVersion: install.istio.io/v1alpha1\nkind: IstioOperator\nspec: {values: {global: {netwrok: n1}}}\n",
    )
    .unwrap();
    let (code, out) = run(&kc, &["install", "-y", "-f", bad.to_str().unwrap()]).await;
    assert_eq!(code, Some(2), "{out}");
    assert!(
        out.contains("spec.values.global.netwrok: not a value meshctl reads (did you mean values.global.network?)"),
        "{out}"
    );
    assert!(api.writes().is_empty(), "a refused file changes nothing: {:?}", api.writes());

    let (code, out) = run(&kc, &["install", "-y", "-f", iop.to_str().unwrap()]).await;
    assert_eq!(code, Some(0), "{out}");
    let cm = api.get("/api/v1/configmaps", "istio-system", "mesh-agent").expect("the agents' ConfigMap");
    assert_eq!(cm["data"]["MESH_CLUSTER_ID"], "cluster1", "{cm}");
    assert_eq!(cm["data"]["MESH_NETWORK"], "network1");
    assert_eq!(cm["data"]["MESH_MESH_ID"], "mesh1");
}

/// The reference document's `istioctl x create-remote-secret --context=cluster1
/// --name=cluster1 | kubectl apply -f - --context=cluster2`, through meshctl: a Secret
/// labelled for the other cluster's agents, holding a kubeconfig whose user is the
/// install's read-only reader account.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_secret_holds_a_read_only_kubeconfig_for_the_cluster() {
    use base64::Engine as _;
    let api = cluster().await;
    let dir = tempfile::tempdir().unwrap();
    let kc = api.kubeconfig(dir.path());
    let create = ["x", "create-remote-secret", "--context", "double", "--name", "cluster1"];
    let (code, out) = run(&kc, &create).await;
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("no ServiceAccount istio-system/mesh-reader in context double: install the mesh there first"),
        "{out}"
    );

    let (code, out) = run(&kc, &["install", "-y"]).await;
    assert_eq!(code, Some(0), "{out}");
    let role =
        api.get("/apis/rbac.authorization.k8s.io/v1/clusterroles", "", "mesh-reader").expect("the reader's role");
    let verbs: Vec<&str> = role["rules"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| r["verbs"].as_array().unwrap())
        .filter_map(Value::as_str)
        .collect();
    assert!(verbs.iter().all(|v| ["get", "list", "watch"].contains(v)), "the reader only reads: {verbs:?}");

    // The cluster's token controller fills the token Secret meshctl creates.
    let filler = tokio::spawn({
        let api = api.clone();
        async move {
            loop {
                if let Some(mut s) = api.get(SECRETS, "istio-system", "mesh-reader-token") {
                    s["data"] = json!({"token": base64::engine::general_purpose::STANDARD.encode("r3ader-t0ken")});
                    api.apply(SECRETS, s);
                    return;
                }
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    });
    let (code, out) = run(&kc, &create).await;
    assert_eq!(code, Some(0), "{out}");
    filler.await.unwrap();
    let token_secret = api.get(SECRETS, "istio-system", "mesh-reader-token").unwrap();
    assert_eq!(token_secret["type"], "kubernetes.io/service-account-token");
    assert_eq!(token_secret["metadata"]["annotations"]["kubernetes.io/service-account.name"], "mesh-reader");

    let secret: Value = serde_yaml::from_str(&out).unwrap();
    assert_eq!(secret["kind"], "Secret");
    assert_eq!(secret["metadata"]["name"], "istio-remote-secret-cluster1");
    assert_eq!(secret["metadata"]["labels"]["istio/multiCluster"], "true");
    assert_eq!(secret["metadata"]["annotations"]["networking.istio.io/cluster"], "cluster1");
    let kubeconfig: Value = serde_yaml::from_str(secret["stringData"]["cluster1"].as_str().unwrap()).unwrap();
    assert_eq!(kubeconfig["clusters"][0]["cluster"]["server"], api.url());
    assert_eq!(kubeconfig["users"][0]["user"]["token"], "r3ader-t0ken");
    assert_eq!(kubeconfig["current-context"], "cluster1");

    let (code, out) = run(&kc, &["x", "create-remote-secret", "--context", "double", "--name", "Cluster_1"]).await;
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("--name \"Cluster_1\": lowercase letters"), "{out}");
}

//! The CA service binary (`mesh-ca`) on loopback, asked by the agent's own client: it
//! signs a node's workloads for that node's token and nothing else (another node's pod,
//! an unknown token, another trust domain), caps validity, serves the trust bundle, and
//! picks up a root rotation from its files without a restart. No root needed.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mesh_agent::identity::ca_protocol::Watch;
use mesh_agent::identity::{CaClient, CaFiles, Identity, MeshCa, PeerVerifier, peer_identity};
use rustls::pki_types::CertificateDer;
use serde_json::json;
use support::api_server::ApiServer;

mod support;

/// The CA process, stopped on drop.
struct Ca {
    child: Child,
    addr: String,
    dir: tempfile::TempDir,
}

impl Drop for Ca {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const PODS: &str = "apiVersion: v1\nkind: Pod\nmetadata: {name: web, namespace: shop, uid: 11111111-0000-4000-8000-000000000001}\n\
spec: {serviceAccountName: web, nodeName: node1}\nstatus: {podIP: 10.1.0.2}\n---\n\
apiVersion: v1\nkind: Pod\nmetadata: {name: db, namespace: shop, uid: 11111111-0000-4000-8000-000000000002}\n\
spec: {serviceAccountName: db, nodeName: node2}\nstatus: {podIP: 10.2.0.2}\n---\n\
apiVersion: v1\nkind: Pod\nmetadata: {name: old, namespace: shop, uid: 11111111-0000-4000-8000-000000000003}\n\
spec: {serviceAccountName: batch, nodeName: node1}\nstatus: {podIP: 10.1.0.3, phase: Succeeded}\n---\n\
apiVersion: v1\nkind: Pod\nmetadata: {name: gw, namespace: istio-ingress, uid: 11111111-0000-4000-8000-000000000004}\n\
spec: {serviceAccountName: istio-ingressgateway, nodeName: node1}\nstatus: {podIP: 10.1.0.4}\n";

fn start_ca() -> Ca {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("config")).unwrap();
    std::fs::write(dir.path().join("config/pods.yaml"), PODS).unwrap();
    std::fs::write(
        dir.path().join("tokens"),
        "token-of-node1 node1\ntoken-of-node2 node2\ntoken-of-gw node1 istio-ingress/istio-ingressgateway\n",
    )
    .unwrap();
    let (config, tokens) = (dir.path().join("config"), dir.path().join("tokens"));
    let ca = Ca::spawn(dir, |cmd| {
        cmd.args(["--max-ttl", "1h", "--reload-interval", "200ms"])
            .arg("--config-dir")
            .arg(config)
            .arg("--token-file")
            .arg(tokens);
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(&ca.addr).is_err() || !ca.dir.path().join("ca/root-cert.pem").exists() {
        assert!(Instant::now() < deadline, "mesh-ca never listened: {}", ca.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    ca
}

impl Ca {
    /// Starts `mesh-ca` on a free loopback port with its CA files in `dir/ca` and its
    /// log in `dir/ca.log`; `configure` adds the mode's own arguments.
    fn spawn(dir: tempfile::TempDir, configure: impl FnOnce(&mut Command)) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_mesh-ca"));
        cmd.args(["--listen", &format!("127.0.0.1:{port}"), "--server-name", "mesh-ca.test"])
            .arg("--ca-dir")
            .arg(dir.path().join("ca"))
            .env("MESH_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("ca.log")).unwrap());
        configure(&mut cmd);
        Ca { child: cmd.spawn().unwrap(), addr: format!("127.0.0.1:{port}"), dir }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("ca.log")).unwrap_or_default()
    }

    /// The agent's client, with `token`, trusting the root in the CA's directory.
    fn client(&self, token: &str) -> CaClient {
        let roots = roots_in(&self.dir.path().join("ca/root-cert.pem"));
        let token_file = self.dir.path().join(format!("token-{token}"));
        std::fs::write(&token_file, format!("{token}\n")).unwrap();
        CaClient {
            address: self.addr.clone(),
            server_name: "mesh-ca.test".into(),
            token_file: Some(token_file),
            root_file: None,
            verifier: PeerVerifier::new(&roots, vec!["cluster.local".into()]).unwrap(),
        }
    }
}

fn roots_in(path: &Path) -> Vec<CertificateDer<'static>> {
    rustls_pemfile::certs(&mut std::fs::read(path).unwrap().as_slice()).collect::<Result<_, _>>().unwrap()
}

fn id(ns: &str, sa: &str) -> Identity {
    Identity::new("cluster.local", ns, sa)
}

/// The validity, in seconds, of a DER certificate.
fn lifetime(cert: &CertificateDer<'_>) -> i64 {
    let (_, x) = x509_parser::parse_x509_certificate(cert).unwrap();
    x.validity().not_after.timestamp() - x.validity().not_before.timestamp()
}

#[tokio::test]
async fn a_node_gets_its_own_pods_identities_and_nothing_else() {
    let ca = start_ca();
    let node1 = ca.client("token-of-node1");
    let issued = node1.sign(&id("shop", "web"), Duration::from_secs(3600)).await.unwrap();
    assert_eq!(peer_identity(&issued.chain[0]), Some(id("shop", "web")));
    assert_eq!(issued.roots, roots_in(&ca.dir.path().join("ca/root-cert.pem")), "the roots come with the chain");

    // The test: a CSR for a pod on another node is refused.
    let e = node1.sign(&id("shop", "db"), Duration::from_secs(3600)).await.unwrap_err().to_string();
    assert!(e.contains("no pod with identity spiffe://cluster.local/ns/shop/sa/db is scheduled on node node1"), "{e}");
    assert!(e.contains("gRPC 7"), "PERMISSION_DENIED: {e}");
    // ... which node2 gets.
    assert!(ca.client("token-of-node2").sign(&id("shop", "db"), Duration::from_secs(60)).await.is_ok());
    // A finished pod's service account is not running there any more.
    assert!(node1.sign(&id("shop", "batch"), Duration::from_secs(60)).await.is_err());
    // Unknown callers and other trust domains.
    let e = ca.client("stolen-guess").sign(&id("shop", "web"), Duration::from_secs(60)).await.unwrap_err().to_string();
    assert!(e.contains("unknown token") && e.contains("gRPC 16"), "UNAUTHENTICATED: {e}");
    let foreign = Identity::new("evil.example", "shop", "web");
    let e = node1.sign(&foreign, Duration::from_secs(60)).await.unwrap_err().to_string();
    assert!(e.contains("outside trust domain cluster.local"), "{e}");
    // Validity is capped (--max-ttl 1h), whatever is asked.
    let long = node1.sign(&id("shop", "web"), Duration::from_secs(30 * 24 * 3600)).await.unwrap();
    assert!(lifetime(&long.chain[0]) <= 3600 + 5 * 60, "capped, plus the clock-skew back-dating");
    assert!(ca.log().contains("certificate request refused"), "{}", ca.log());
    assert!(!ca.log().contains("token-of-node1"), "tokens never logged");
}

#[tokio::test]
async fn a_gateway_gets_its_own_identity_and_no_other() {
    let ca = start_ca();
    let gateway = ca.client("token-of-gw");
    let own = id("istio-ingress", "istio-ingressgateway");
    let issued = gateway.sign(&own, Duration::from_secs(3600)).await.unwrap();
    assert_eq!(peer_identity(&issued.chain[0]), Some(own));
    // Not the identity of another pod on its node, which that node's agent may ask for.
    let e = gateway.sign(&id("shop", "web"), Duration::from_secs(60)).await.unwrap_err().to_string();
    assert!(e.contains("may ask only for its own identity") && e.contains("gRPC 7"), "{e}");
    assert!(ca.client("token-of-node1").sign(&id("shop", "web"), Duration::from_secs(60)).await.is_ok());
}

#[tokio::test]
async fn a_root_rotation_in_the_ca_files_reaches_the_bundle_and_new_certificates() {
    let ca = start_ca();
    let client = ca.client("token-of-node1");
    let (before, version) = client.trust_bundle(None).await.unwrap();
    assert_eq!(before.roots.len(), 1);
    // An agent follows the bundle with a long poll the CA holds while nothing changes;
    // a caller the CA does not know is answered at once (holding costs a connection).
    let watch = Watch { version, wait: Duration::from_secs(60) };
    let stranger = ca.client("nobody");
    let answered = tokio::time::timeout(Duration::from_secs(5), stranger.trust_bundle(Some(&watch))).await;
    assert_eq!(answered.expect("not held").unwrap().1, watch.version);
    let held = tokio::spawn({
        let (client, watch) = (client.clone(), watch.clone());
        async move { client.trust_bundle(Some(&watch)).await }
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!held.is_finished(), "held while the bundle is unchanged");

    // Istio's plug-in CA rotation, in its order. 1: the new root joins the bundle while
    // the old CA still signs, so every client trusts both before anything moves.
    let new_root = tempfile::tempdir().unwrap();
    let new_ca = MeshCa::load_or_create(new_root.path(), "cluster.local").unwrap();
    let files = CaFiles::in_dir(&ca.dir.path().join("ca"));
    let new_files = CaFiles::in_dir(new_root.path());
    let old_root_pem = std::fs::read_to_string(&files.root_cert).unwrap();
    let new_root_pem = std::fs::read_to_string(&new_files.root_cert).unwrap();
    std::fs::write(&files.root_cert, format!("{old_root_pem}{new_root_pem}")).unwrap();
    let (news, news_version) =
        tokio::time::timeout(Duration::from_secs(10), held).await.expect("answered on the change").unwrap().unwrap();
    assert_eq!(news.roots.len(), 2, "the held watch brings the new root");
    assert_ne!(news_version, watch.version);
    let both = wait_bundle(&client, |b| b.roots.len() == 2 && b.issuer == before.issuer).await;
    let both: Vec<CertificateDer<'static>> = both.roots.iter().flat_map(|p| roots_in_pem(p)).collect();
    assert!(client.verifier.set_roots(&both).unwrap(), "what the agent does with the bundle");

    // 2: the new CA signs (key first, then its certificate: the CA re-reads until the
    // pair loads).
    std::fs::copy(&new_files.ca_key, &files.ca_key).unwrap();
    std::fs::copy(&new_files.ca_cert, &files.ca_cert).unwrap();
    std::fs::copy(&new_files.cert_chain, &files.cert_chain).unwrap();
    let after = wait_bundle(&client, |b| b.issuer != before.issuer).await;
    assert_eq!(after.issuer, new_ca.issuer_digest());
    assert_eq!(after.roots.len(), 2);
    // New certificates chain to the new root.
    let issued = client.sign(&id("shop", "web"), Duration::from_secs(600)).await.unwrap();
    let (_, leaf) = x509_parser::parse_x509_certificate(&issued.chain[0]).unwrap();
    let new_ca_der = roots_in(&new_files.ca_cert);
    let (_, new_ca_cert) = x509_parser::parse_x509_certificate(&new_ca_der[0]).unwrap();
    assert_eq!(leaf.issuer(), new_ca_cert.subject(), "signed by the new CA");
}

/// Polls the trust bundle until `f` accepts it.
async fn wait_bundle(
    client: &CaClient,
    f: impl Fn(&mesh_agent::identity::ca_protocol::TrustBundle) -> bool,
) -> mesh_agent::identity::ca_protocol::TrustBundle {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (b, _) = client.trust_bundle(None).await.unwrap();
        if f(&b) {
            return b;
        }
        assert!(Instant::now() < deadline, "the CA never took the new files");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn roots_in_pem(pem: &str) -> Vec<CertificateDer<'static>> {
    rustls_pemfile::certs(&mut pem.as_bytes()).collect::<Result<_, _>>().unwrap()
}

/// A pod of the double: `name` in `ns` with service account `sa`, on `node`.
fn api_pod(name: &str, ns: &str, uid: &str, sa: &str, node: &str) -> serde_json::Value {
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": ns, "uid": uid},
           "spec": {"serviceAccountName": sa, "nodeName": node, "containers": [{"name": "app"}]},
           "status": {"phase": "Running", "podIP": "10.0.0.9"}})
}

/// A token TokenReview authenticates as `account`, bound to `pod` (name, uid) if given.
fn bound_user(account: &str, pod: Option<(&str, &str)>) -> serde_json::Value {
    let extra = pod.map_or(json!({}), |(name, uid)| {
        json!({"authentication.kubernetes.io/pod-name": [name], "authentication.kubernetes.io/pod-uid": [uid]})
    });
    json!({"username": format!("system:serviceaccount:{account}"), "extra": extra})
}

#[tokio::test]
async fn in_a_cluster_agents_are_known_by_token_review_and_get_their_nodes_pods_only() {
    let api = ApiServer::new(&["/api/v1/pods".into(), "/api/v1/secrets".into(), "/api/v1/configmaps".into()]).await;
    let dir = tempfile::tempdir().unwrap();
    api.apply("/api/v1/secrets", support::ca_secret(dir.path()));
    let agent_uid = "aaaaaaaa-0000-4000-8000-000000000001";
    api.apply("/api/v1/pods", api_pod("mesh-agent-x", "istio-system", agent_uid, "mesh-agent", "node1"));
    api.apply("/api/v1/pods", api_pod("web", "shop", "aaaaaaaa-0000-4000-8000-000000000002", "web", "node1"));
    api.apply("/api/v1/pods", api_pod("db", "shop", "aaaaaaaa-0000-4000-8000-000000000003", "db", "node2"));
    api.add_token("agent", bound_user("istio-system:mesh-agent", Some(("mesh-agent-x", agent_uid))));
    // A workload's own token, the token of an agent pod since replaced, an unbound one.
    api.add_token("workload", bound_user("shop:web", Some(("web", "aaaaaaaa-0000-4000-8000-000000000002"))));
    api.add_token(
        "stale",
        bound_user("istio-system:mesh-agent", Some(("mesh-agent-x", "aaaaaaaa-0000-4000-8000-0000000000ff"))),
    );
    api.add_token("unbound", bound_user("istio-system:mesh-agent", None));
    let gateway_uid = "aaaaaaaa-0000-4000-8000-000000000004";
    api.apply("/api/v1/pods", api_pod("gw", "istio-ingress", gateway_uid, "istio-ingressgateway", "node1"));
    api.add_token("gateway", bound_user("istio-ingress:istio-ingressgateway", Some(("gw", gateway_uid))));

    let ca = Ca::spawn(dir, |cmd| {
        cmd.args([
            "--config-source",
            "kubernetes",
            "--kube-api-url",
            &api.url(),
            "--ca-secret",
            "istio-system/cacerts",
        ]);
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(&ca.addr).is_err() {
        assert!(Instant::now() < deadline, "mesh-ca never listened: {}", ca.log());
        // The double serves on this runtime: wait without blocking it.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let client = |token: &str| {
        let c = ca.client(token);
        // The agent trusts the root the cacerts Secret was made from.
        c.verifier.set_roots(&roots_in(&ca.dir.path().join("ca-source/root-cert.pem"))).unwrap();
        c
    };
    let agent = client("agent");
    let issued = agent.sign(&id("shop", "web"), Duration::from_secs(600)).await.unwrap();
    assert_eq!(peer_identity(&issued.chain[0]), Some(id("shop", "web")));
    let e = agent.sign(&id("shop", "db"), Duration::from_secs(600)).await.unwrap_err().to_string();
    assert!(e.contains("is scheduled on node node1"), "another node's pod: {e}");
    // A gateway's account (--gateway-account's default) gets its own identity only.
    let gateway = client("gateway");
    assert!(gateway.sign(&id("istio-ingress", "istio-ingressgateway"), Duration::from_secs(600)).await.is_ok());
    let e = gateway.sign(&id("shop", "web"), Duration::from_secs(600)).await.unwrap_err().to_string();
    assert!(e.contains("may ask only for its own identity"), "{e}");
    for (token, why) in [
        ("workload", "is not a node agent's or a gateway's account"),
        ("stale", "no longer exists"),
        ("unbound", "not bound to a pod"),
        ("nobody", "not authenticated"),
    ] {
        let e = client(token).sign(&id("shop", "web"), Duration::from_secs(600)).await.unwrap_err().to_string();
        assert!(e.contains(why), "{token}: {e}");
    }
    // The remote clusters' kubeconfigs hold tokens: for agents and gateways only.
    assert_eq!(agent.remote_clusters(None).await.unwrap().0, []);
    assert!(gateway.remote_clusters(None).await.is_ok());
    for token in ["nobody", "workload"] {
        let e = client(token).remote_clusters(None).await.unwrap_err().to_string();
        assert!(e.contains("401"), "{token}: {e}");
    }
}

#[tokio::test]
async fn in_a_cluster_without_a_ca_secret_the_ca_makes_one_and_keeps_it() {
    let api = ApiServer::new(&["/api/v1/pods".into(), "/api/v1/secrets".into(), "/api/v1/configmaps".into()]).await;
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::spawn(dir, |cmd| {
        cmd.args([
            "--config-source",
            "kubernetes",
            "--kube-api-url",
            &api.url(),
            "--ca-secret",
            "istio-system/cacerts",
            "--root-configmap",
            "istio-system/mesh-ca-root-cert",
        ]);
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(&ca.addr).is_err() {
        assert!(Instant::now() < deadline, "mesh-ca never listened: {}", ca.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Istio's plug-in layout, a root that is its own issuer, and the root published
    // for the agents is that one.
    let secret = api.get("/api/v1/secrets", "istio-system", "cacerts").expect("the CA made its Secret");
    let data = |k: &str| {
        use base64::Engine as _;
        let b64 = secret["data"][k].as_str().unwrap_or_else(|| panic!("no {k}"));
        String::from_utf8(base64::engine::general_purpose::STANDARD.decode(b64).unwrap()).unwrap()
    };
    assert!(data("ca-key.pem").contains("PRIVATE KEY"));
    assert_eq!(data("root-cert.pem"), data("ca-cert.pem"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while api.get("/api/v1/configmaps", "istio-system", "mesh-ca-root-cert").is_none() {
        assert!(Instant::now() < deadline, "root ConfigMap never published:\n{}", ca.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let published = api.get("/api/v1/configmaps", "istio-system", "mesh-ca-root-cert").unwrap();
    assert_eq!(published["data"]["root-cert.pem"], data("root-cert.pem").as_str());
    assert!(!ca.log().contains("PRIVATE KEY"), "the key is never logged");
}

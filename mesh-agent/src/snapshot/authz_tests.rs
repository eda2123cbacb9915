//! Policy semantics against the Istio reference: the seed policies, evaluation order,
//! empty-rule meanings, TCP semantics, identities, and the kernel's plaintext verdicts.

use std::net::SocketAddr;
use std::path::Path;

use http::HeaderMap;

use crate::authz::mtls::Mode;
use crate::authz::*;
use crate::config::parse_documents;
use crate::snapshot::Snapshot;
use crate::state::MeshScope;

const LAB: &[&str] = &["namespaces.yaml", "pods.yaml", "services.yaml"];

fn root() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

fn snapshot_with(mesh: &MeshScope, extra: &[(&str, String)]) -> Snapshot {
    let mut objects = Vec::new();
    for f in LAB {
        let p = root().join("examples/lab").join(f);
        objects.extend(parse_documents(&p, &std::fs::read_to_string(&p).unwrap()).unwrap());
    }
    for (name, yaml) in extra {
        objects.extend(parse_documents(Path::new(name), yaml).unwrap_or_else(|e| panic!("{e}")));
    }
    Snapshot::compile_in(&objects, mesh, 1)
}

fn snapshot(extra: &[(&str, String)]) -> Snapshot {
    snapshot_with(&MeshScope::new("cluster.local"), extra)
}

fn seed(name: &str) -> (&'static str, String) {
    let text = std::fs::read_to_string(root().join("examples/seed").join(name)).unwrap();
    ("seed.yaml", text)
}

fn policy(yaml: &str) -> (&'static str, String) {
    ("test.yaml", yaml.to_string())
}

fn peer(ns: &str, sa: &str, snap: &Snapshot) -> Peer {
    Peer::from_identity(&crate::identity::Identity::new("cluster.local", ns, sa), &snap.equivalent_domains)
}

fn conn<'a>(peer: Option<&'a Peer>, port: u16) -> ConnAttrs<'a> {
    ConnAttrs {
        src: "10.10.1.2:40000".parse::<SocketAddr>().unwrap(),
        dst: SocketAddr::new("10.10.2.2".parse().unwrap(), port),
        peer,
    }
}

fn req<'a>(method: &'a str, path: &'a str, headers: &'a HeaderMap) -> RequestAttrs<'a> {
    RequestAttrs { method, path, host_lowercase: "myapp", headers }
}

fn allowed(d: Decision) -> bool {
    d == Decision::Allow
}

#[test]
fn seed_policy_allows_frontend_api_and_anyone_health_only() {
    let snap = snapshot(&[seed("authorizationpolicy-myapp.yaml")]);
    let sec = snap.security("production/myapp-v1");
    let authz = &sec.authz;
    let h = HeaderMap::new();
    let frontend = peer("production", "frontend", &snap);
    let legacy = peer("production", "legacy-service", &snap);
    let c = conn(Some(&frontend), 8080);
    assert!(allowed(authz.check(&c, Some(&req("GET", "/api/users", &h)))));
    assert!(allowed(authz.check(&c, Some(&req("POST", "/api/orders", &h)))));
    assert!(!allowed(authz.check(&c, Some(&req("DELETE", "/api/x", &h)))), "DELETE is not in the methods");
    assert!(!allowed(authz.check(&c, Some(&req("GET", "/apix", &h)))), "/api/* is a prefix of /api/, not /api");
    assert!(!allowed(authz.check(&c, Some(&req("GET", "/other", &h)))), "implicit deny");
    for who in [None, Some(&legacy)] {
        let c = conn(who, 8080);
        assert!(allowed(authz.check(&c, Some(&req("GET", "/health", &h)))), "health from {who:?}");
        assert!(allowed(authz.check(&c, Some(&req("GET", "/ready", &h)))));
        assert!(!allowed(authz.check(&c, Some(&req("POST", "/health", &h)))));
        assert!(!allowed(authz.check(&c, Some(&req("GET", "/api/users", &h)))), "only frontend may use /api");
    }
    // Every ALLOW rule reads HTTP attributes: opaque TCP matches none of them.
    assert!(!allowed(authz.check(&c, None)));
    assert_eq!(authz.check_connection(&c), ConnVerdict::PerRequest);
    // The policy selects app=myapp only.
    assert!(snap.security("production/legacy-service").authz.is_empty());
    assert!(snap.security("production/frontend").authz.is_empty());
    match authz.check(&c, Some(&req("GET", "/other", &h))) {
        Decision::Deny(why) => assert!(why.contains("production/myapp-authz"), "{why}"),
        Decision::Allow => unreachable!(),
    }
}

#[test]
fn empty_rules_allow_nothing_rules_with_an_empty_rule_allow_everything() {
    let h = HeaderMap::new();
    let allow_nothing = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: none, namespace: production}\nspec: {}\n";
    let snap = snapshot(&[policy(allow_nothing)]);
    let a = &snap.security("production/frontend").authz;
    assert!(!allowed(a.check(&conn(None, 8080), Some(&req("GET", "/", &h)))));
    assert!(!allowed(a.check(&conn(None, 8080), None)));

    let allow_all = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: all, namespace: production}\nspec:\n  rules: [{}]\n";
    let snap = snapshot(&[policy(allow_all)]);
    let a = &snap.security("production/frontend").authz;
    assert!(allowed(a.check(&conn(None, 8080), None)));

    let deny_nothing = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: d, namespace: production}\nspec:\n  action: DENY\n";
    let snap = snapshot(&[policy(deny_nothing)]);
    let a = &snap.security("production/frontend").authz;
    assert!(allowed(a.check(&conn(None, 8080), None)), "DENY without rules denies nothing");
}

#[test]
fn deny_is_evaluated_before_allow_and_audit_changes_nothing() {
    let yaml = r#"
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: {name: allow-all, namespace: production}
spec:
  rules: [{}]
---
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: {name: no-admin, namespace: production}
spec:
  action: DENY
  rules:
  - to: [{operation: {paths: ["/admin*"]}}]
---
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: {name: watch, namespace: production}
spec:
  action: AUDIT
  rules:
  - to: [{operation: {methods: ["GET"]}}]
"#;
    let snap = snapshot(&[policy(yaml)]);
    let a = &snap.security("production/myapp-v2").authz;
    let h = HeaderMap::new();
    assert!(allowed(a.check(&conn(None, 8080), Some(&req("GET", "/", &h)))));
    let d = a.check(&conn(None, 8080), Some(&req("GET", "/admin/users", &h)));
    assert_eq!(d, Decision::Deny("denied by DENY policy production/no-admin".into()));
    // TCP: the DENY rule's HTTP attribute counts as matched, so all TCP is denied.
    assert!(!allowed(a.check(&conn(None, 8080), None)));
}

#[test]
fn tcp_deny_rules_scope_by_port_and_allow_rules_need_l4_only_fields() {
    let yaml = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-post, namespace: production}
spec:
  action: DENY
  rules:
  - to: [{operation: {methods: ["POST"], ports: ["8080"]}}]
"#;
    let snap = snapshot(&[policy(yaml)]);
    let a = &snap.security("production/myapp-v1").authz;
    assert!(!allowed(a.check(&conn(None, 8080), None)), "TCP on 8080 denied");
    assert!(allowed(a.check(&conn(None, 9090), None)), "other ports untouched");
    let h = HeaderMap::new();
    assert!(allowed(a.check(&conn(None, 8080), Some(&req("GET", "/", &h)))), "HTTP GET on 8080 is fine");
}

#[test]
fn principals_namespaces_and_service_accounts_come_from_the_peer_identity() {
    let yaml = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: who, namespace: production}
spec:
  selector: {matchLabels: {app: myapp}}
  rules:
  - from: [{source: {principals: ["cluster.local/ns/production/*"], notPrincipals: ["*/sa/legacy-service"]}}]
  - from: [{source: {serviceAccounts: ["batch"]}}]
  - from: [{source: {namespaces: ["ops"], ipBlocks: ["10.10.1.0/24"], notIpBlocks: ["10.10.1.9"]}}]
"#;
    let snap = snapshot(&[policy(yaml)]);
    let a = &snap.security("production/myapp-v1").authz;
    let ok = |p: Option<&Peer>| allowed(a.check(&conn(p, 8080), None));
    assert!(ok(Some(&peer("production", "frontend", &snap))));
    assert!(!ok(Some(&peer("production", "legacy-service", &snap))), "notPrincipals suffix");
    assert!(ok(Some(&peer("production", "batch", &snap))), "serviceAccounts without namespace: the policy's");
    assert!(!ok(Some(&peer("staging", "batch", &snap))));
    assert!(ok(Some(&peer("ops", "anyone", &snap))), "namespace and source ip");
    assert!(!ok(None), "plaintext has no principal or namespace");
    let ops = peer("ops", "x", &snap);
    let mut c = conn(Some(&ops), 8080);
    c.src = "10.10.1.9:1".parse().unwrap();
    assert!(!allowed(a.check(&c, None)), "notIpBlocks");
    assert_eq!(a.check_connection(&conn(None, 8080)), ConnVerdict::Decided(a.check(&conn(None, 8080), None)));
}

#[test]
fn trust_domain_aliases_and_cluster_local_name_the_same_mesh() {
    let yaml = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: td, namespace: production}
spec:
  rules:
  - from: [{source: {principals: ["cluster.local/ns/production/sa/frontend"]}}]
"#;
    let mesh = MeshScope {
        trust_domain: "new.example".into(),
        aliases: vec!["old.example".into()],
        root_namespace: "istio-system".into(),
        outbound: Default::default(),
        dns_capture: false,
        cluster_id: crate::state::DEFAULT_CLUSTER_ID.into(),
        network: String::new(),
    };
    let snap = snapshot_with(&mesh, &[policy(yaml)]);
    let a = &snap.security("production/myapp-v1").authz;
    for td in ["new.example", "old.example"] {
        let p = Peer::from_identity(
            &crate::identity::Identity::new(td, "production", "frontend"),
            &snap.equivalent_domains,
        );
        assert!(allowed(a.check(&conn(Some(&p), 8080), None)), "{td}");
    }
    let foreign = Peer::from_identity(
        &crate::identity::Identity::new("evil.example", "production", "frontend"),
        &snap.equivalent_domains,
    );
    assert!(!allowed(a.check(&conn(Some(&foreign), 8080), None)));
}

#[test]
fn conditions_read_headers_ports_ips_and_identity() {
    let yaml = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: cond, namespace: production}
spec:
  rules:
  - when:
    - {key: "request.headers[X-Token]", values: ["secret-*"]}
    - {key: destination.port, values: ["8080"]}
    - {key: source.ip, notValues: ["10.10.9.0/24"]}
    - {key: source.namespace, values: ["production"]}
"#;
    let snap = snapshot(&[policy(yaml)]);
    let a = &snap.security("production/myapp-v1").authz;
    let p = peer("production", "frontend", &snap);
    let mut h = HeaderMap::new();
    assert!(!allowed(a.check(&conn(Some(&p), 8080), Some(&req("GET", "/", &h)))), "header missing");
    h.insert("x-token", "secret-1".parse().unwrap());
    assert!(allowed(a.check(&conn(Some(&p), 8080), Some(&req("GET", "/", &h)))));
    assert!(!allowed(a.check(&conn(Some(&p), 9090), Some(&req("GET", "/", &h)))), "destination.port");
    assert!(!allowed(a.check(&conn(None, 8080), Some(&req("GET", "/", &h)))), "source.namespace needs mTLS");
    h.append("x-token", "other".parse().unwrap());
    assert!(allowed(a.check(&conn(Some(&p), 8080), Some(&req("GET", "/", &h)))), "duplicates join: secret-1,other");
}

#[test]
fn seed_peer_authentications_make_production_strict_and_legacy_permissive() {
    let snap = snapshot(&[seed("peerauthentication.yaml")]);
    let myapp = snap.security("production/myapp-v1");
    assert_eq!(myapp.mtls.default, Mode::Strict);
    assert_eq!(myapp.plaintext_verdicts(), (true, vec![]));
    let legacy = snap.security("production/legacy-service");
    assert_eq!(legacy.mtls.default, Mode::Permissive);
    assert_eq!(legacy.plaintext_verdicts(), (false, vec![]));
    assert_eq!(legacy.mtls.from[0], "PeerAuthentication production/legacy-service");
    // Mesh-wide STRICT reaches namespaces without a policy of their own.
    assert_eq!(snap.security("default/outside").mtls.default, Mode::Strict);
}

#[test]
fn unset_inherits_and_port_level_overrides_only_its_port() {
    let yaml = r#"
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec: {mtls: {mode: STRICT}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: ns, namespace: production}
spec: {mtls: {mode: UNSET}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: v1, namespace: production}
spec:
  selector: {matchLabels: {version: v1}}
  portLevelMtls:
    8080: {mode: PERMISSIVE}
    "9090": {mode: UNSET}
"#;
    let snap = snapshot(&[policy(yaml)]);
    let v1 = snap.security("production/myapp-v1");
    assert_eq!(v1.mtls.default, Mode::Strict, "UNSET at workload and namespace: the mesh's STRICT");
    assert_eq!(v1.mtls.mode(8080), Mode::Permissive);
    assert_eq!(v1.mtls.mode(9090), Mode::Strict);
    assert_eq!(v1.plaintext_verdicts(), (true, vec![(8080, false)]));
    assert_eq!(snap.security("production/myapp-v2").mtls.mode(8080), Mode::Strict);
}

#[test]
fn kernel_verdicts_drop_plaintext_no_allow_rule_could_admit() {
    let yaml = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: mtls-only, namespace: production}
spec:
  selector: {matchLabels: {app: myapp}}
  rules:
  - from: [{source: {principals: ["*"]}}]
  - from: [{source: {ipBlocks: ["10.10.1.4"]}}]
    to: [{operation: {ports: ["9000"]}}]
"#;
    let snap = snapshot(&[policy(yaml)]);
    let s = snap.security("production/myapp-v1");
    // Port 9000 admits one plaintext source; every other port needs an identity.
    assert_eq!(s.plaintext_verdicts(), (true, vec![(9000, false)]));
    assert!(s.refuses_all_plaintext(8080));
}

#[test]
fn a_policy_in_the_root_namespace_applies_everywhere() {
    let yaml = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: deny-v2, namespace: istio-system}\nspec:\n  action: DENY\n  selector: {matchLabels: {version: v2}}\n  rules: [{}]\n";
    let snap = snapshot(&[policy(yaml)]);
    assert!(!allowed(snap.security("production/myapp-v2").authz.check(&conn(None, 8080), None)));
    assert!(snap.security("production/myapp-v1").authz.is_empty());
    assert_eq!(snap.security("production/myapp-v2").plaintext_verdicts(), (true, vec![]), "deny-all on every port");
}

fn rejected(yaml: &str) -> String {
    match parse_documents(Path::new("bad.yaml"), yaml) {
        Ok(_) => "accepted".into(),
        Err(e) => e.to_string(),
    }
}

#[test]
fn what_cannot_be_enforced_is_refused_by_name() {
    let ap = |spec: &str| {
        format!(
            "apiVersion: security.istio.io/v1beta1\nkind: AuthorizationPolicy\nmetadata: {{name: p, namespace: production}}\nspec:\n{spec}"
        )
    };
    let cases = [
        (ap("  action: CUSTOM\n  provider: {name: ext}\n  rules: [{}]\n"), "field spec.action: CUSTOM"),
        (
            ap("  rules:\n  - from: [{source: {requestPrincipals: [\"*\"]}}]\n"),
            "spec.rules[0].from[0].source.requestPrincipals: needs RequestAuthentication",
        ),
        (ap("  rules:\n  - when: [{key: \"request.auth.claims[iss]\", values: [x]}]\n"), "spec.rules[0].when[0].key"),
        (
            ap("  rules:\n  - from: [{source: {ipBlocks: [\"10.0.0.0/33\"]}}]\n"),
            "ipBlocks[0]: \"10.0.0.0/33\" is neither",
        ),
        (ap("  rules:\n  - to: [{operation: {ports: [\"http\"]}}]\n"), "ports[0]: \"http\" is not a port number"),
        (ap("  rules:\n  - to: [{operation: {paths: [\"/a*b\"]}}]\n"), "'*' is only allowed at the start or the end"),
        (ap("  rules:\n  - to: [{operation: {paths: [\"/foo/{*}\"]}}]\n"), "path templates"),
        (ap("  rules:\n  - from: [{source: {}}]\n"), "spec.rules[0].from[0].source: must not be empty"),
        (ap("  rules:\n  - when: [{key: source.ip}]\n"), "at least one of values or notValues"),
        (ap("  targetRefs: [{kind: Gateway, name: gw}]\n"), "spec.targetRefs"),
        (ap("  action: MAYBE\n"), "spec.action"),
        (
            ap("  rules:\n  - from: [{source: {serviceAccounts: [a], principals: [b]}}]\n"),
            "cannot be set with namespaces or principals",
        ),
    ];
    for (yaml, want) in cases {
        let got = rejected(&yaml);
        assert!(got.contains("AuthorizationPolicy production/p") || got.contains("AuthorizationPolicy p"), "{got}");
        assert!(got.contains(want), "want {want:?} in {got}");
    }
    let pa = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: p, namespace: production}\nspec:\n  portLevelMtls: {8080: {mode: DISABLE}}\n";
    assert!(rejected(pa).contains("spec.portLevelMtls: requires a workload selector"), "{}", rejected(pa));
    let pa = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: p, namespace: production}\nspec:\n  mtls: {mode: STRIKT}\n";
    assert!(rejected(pa).contains("spec.mtls.mode"), "{}", rejected(pa));
    let pa = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: p, namespace: production}\nspec:\n  selector: {matchLabels: {a: b}}\n  portLevelMtls: {70000: {mode: STRICT}}\n";
    assert!(rejected(pa).contains("not a port number"), "{}", rejected(pa));
}

#[test]
fn the_seed_security_configs_parse_as_written() {
    for f in ["peerauthentication.yaml", "authorizationpolicy-myapp.yaml"] {
        let (_, text) = seed(f);
        let objects = parse_documents(Path::new(f), &text).unwrap_or_else(|e| panic!("{e}"));
        assert!(!objects.is_empty());
    }
}

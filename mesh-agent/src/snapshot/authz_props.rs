//! Property tests (proptest) of the policy parser and matcher: random policies built
//! from Istio's vocabulary and random inputs, checking what enforcement relies on:
//!
//! * parsing never panics, and whatever validates also compiles;
//! * judging a connection as TCP never allows what some HTTP request on it would be
//!   denied (so misreading HTTP as TCP fails safe);
//! * when the kernel is told to drop plaintext to a port, the agent would deny every
//!   plaintext connection and request to that port anyway;
//! * path normalization is idempotent and leaves no dot segments, double or back
//!   slashes.

use std::net::SocketAddr;
use std::path::Path;

use http::HeaderMap;
use proptest::prelude::*;

use crate::authz::*;
use crate::config::parse_documents;
use crate::snapshot::Snapshot;
use crate::state::MeshScope;

const PRINCIPALS: &[&str] = &[
    "cluster.local/ns/production/sa/frontend",
    "*",
    "cluster.local/ns/production/*",
    "*/sa/myapp",
    "other.td/ns/x/sa/y",
];
const NAMESPACES: &[&str] = &["production", "default", "*", "prod*"];
const IPS: &[&str] = &["10.10.1.0/24", "10.10.2.2", "0.0.0.0/0", "10.10.9.9/32"];
const PORTS: &[&str] = &["8080", "9000"];
const METHODS: &[&str] = &["GET", "POST", "*", "DEL*"];
const PATHS: &[&str] = &["/api/*", "/health", "*", "*/x", "/"];
const HOSTS: &[&str] = &["myapp", "*.example.com", "myapp*"];
const KEYS: &[(&str, &[&str])] = &[
    ("source.ip", &["10.10.1.0/24", "10.10.2.0/24"]),
    ("destination.port", &["8080", "9000"]),
    ("source.namespace", &["production", "*"]),
    ("source.principal", &["cluster.local/ns/production/sa/frontend", "*"]),
    ("request.headers[x-token]", &["secret", "*"]),
];

fn pick(pool: &'static [&'static str]) -> impl Strategy<Value = Vec<&'static str>> {
    proptest::sample::subsequence(pool, 0..=2)
}

fn list(name: &str, values: &[&str]) -> String {
    if values.is_empty() {
        String::new()
    } else {
        let quoted: Vec<String> = values.iter().map(|v| format!("{v:?}")).collect();
        format!("{name}: [{}], ", quoted.join(", "))
    }
}

prop_compose! {
    fn source()(p in pick(PRINCIPALS), np in pick(PRINCIPALS), ns in pick(NAMESPACES), ip in pick(IPS), nip in pick(IPS)) -> String {
        let fields = format!("{}{}{}{}{}", list("principals", &p), list("notPrincipals", &np), list("namespaces", &ns), list("ipBlocks", &ip), list("notIpBlocks", &nip));
        if fields.is_empty() { "ipBlocks: [\"0.0.0.0/0\"]".into() } else { fields.trim_end_matches(", ").to_string() }
    }
}

prop_compose! {
    fn operation()(ports in pick(PORTS), nports in pick(PORTS), m in pick(METHODS), p in pick(PATHS), np in pick(PATHS), h in pick(HOSTS)) -> String {
        let fields = format!("{}{}{}{}{}{}", list("ports", &ports), list("notPorts", &nports), list("methods", &m), list("paths", &p), list("notPaths", &np), list("hosts", &h));
        if fields.is_empty() { "ports: [\"8080\"]".into() } else { fields.trim_end_matches(", ").to_string() }
    }
}

prop_compose! {
    fn condition()(k in 0..KEYS.len(), vals in any::<bool>(), pick_value in 0usize..2) -> String {
        let (key, values) = KEYS[k];
        let which = if vals { "values" } else { "notValues" };
        format!("{{key: {key:?}, {which}: [{:?}]}}", values[pick_value])
    }
}

prop_compose! {
    fn rule()(from in proptest::collection::vec(source(), 0..=2), to in proptest::collection::vec(operation(), 0..=2), when in proptest::collection::vec(condition(), 0..=2)) -> String {
        let mut parts = Vec::new();
        if !from.is_empty() {
            parts.push(format!("from: [{}]", from.iter().map(|s| format!("{{source: {{{s}}}}}")).collect::<Vec<_>>().join(", ")));
        }
        if !to.is_empty() {
            parts.push(format!("to: [{}]", to.iter().map(|o| format!("{{operation: {{{o}}}}}")).collect::<Vec<_>>().join(", ")));
        }
        if !when.is_empty() {
            parts.push(format!("when: [{}]", when.join(", ")));
        }
        format!("{{{}}}", parts.join(", "))
    }
}

prop_compose! {
    fn policy_yaml(index: usize)(action in prop_oneof![Just("ALLOW"), Just("DENY"), Just("AUDIT")], rules in proptest::collection::vec(rule(), 0..=3), select in any::<bool>()) -> String {
        let selector = if select { "  selector: {matchLabels: {app: myapp}}\n" } else { "" };
        format!("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: p{index}, namespace: production}}\nspec:\n{selector}  action: {action}\n  rules: [{}]\n", rules.join(", "))
    }
}

/// A request to judge: (peer sa or plaintext, source ip, port, method, path, token).
type Probe = (Option<&'static str>, &'static str, u16, &'static str, &'static str, bool);

fn probe() -> impl Strategy<Value = Probe> {
    (
        proptest::option::of(proptest::sample::select(&["frontend", "myapp", "legacy-service"][..])),
        proptest::sample::select(&["10.10.1.2", "10.10.2.3", "10.10.9.9"][..]),
        proptest::sample::select(&[8080u16, 9000, 1234][..]),
        proptest::sample::select(&["GET", "POST", "DELETE", "PUT"][..]),
        proptest::sample::select(&["/api/users", "/health", "/x", "/", "/a/x"][..]),
        any::<bool>(),
    )
}

fn snapshot_of(policies: &[String]) -> Option<Snapshot> {
    let mut objects = Vec::new();
    for (i, yaml) in policies.iter().enumerate() {
        match parse_documents(Path::new(&format!("p{i}.yaml")), yaml) {
            Ok(o) => objects.extend(o),
            Err(_) => return None,
        }
    }
    let pod = "apiVersion: v1\nkind: Pod\nmetadata: {name: myapp-v1, namespace: production, labels: {app: myapp}}\nspec: {serviceAccountName: myapp}\nstatus: {podIP: 10.10.2.2}\n";
    objects.extend(parse_documents(Path::new("pod.yaml"), pod).unwrap());
    Some(Snapshot::compile_in(&objects, &MeshScope::new("cluster.local"), 1))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 384, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_text_never_panics_the_parser(text in "\\PC{0,400}") {
        let _ = parse_documents(Path::new("fuzz.yaml"), &text);
        let _ = crate::config::security::ConditionKey::parse(&text);
        let _ = path::normalize(&text);
    }

    #[test]
    fn mutated_policies_are_accepted_or_refused_with_a_field(yaml in policy_yaml(0), cut in 0usize..400, junk in "[ -~]{0,6}") {
        // A valid policy with a few bytes replaced: never a panic, and a refusal
        // always names the object or document and a field.
        let mut bytes = yaml.into_bytes();
        let at = cut.min(bytes.len());
        bytes.splice(at..(at + junk.len()).min(bytes.len()), junk.bytes());
        let text = String::from_utf8_lossy(&bytes).into_owned();
        if let Err(e) = parse_documents(Path::new("m.yaml"), &text) {
            prop_assert!(e.object.is_some(), "{e}");
            prop_assert!(e.field.is_some() || e.reason.contains("syntax"), "{e}");
        }
    }

    #[test]
    fn tcp_is_never_allowed_more_than_http_and_kernel_drops_are_sound(
        policies in proptest::collection::vec((0usize..1000).prop_flat_map(policy_yaml), 1..=3),
        probes in proptest::collection::vec(probe(), 1..=12),
    ) {
        // Generated policies are valid by construction; an invalid one is a generator
        // bug, and too many rejections fail the test.
        let snap = snapshot_of(&policies);
        prop_assume!(snap.is_some());
        let snap = snap.unwrap();
        let sec = snap.security("production/myapp-v1");
        for (sa, src, port, method, path_, token) in probes {
            let peer = sa.map(|sa| Peer::from_identity(&crate::identity::Identity::new("cluster.local", "production", sa), &snap.equivalent_domains));
            let c = ConnAttrs { src: SocketAddr::new(src.parse().unwrap(), 40000), dst: SocketAddr::new("10.10.2.2".parse().unwrap(), port), peer: peer.as_ref() };
            let mut headers = HeaderMap::new();
            if token {
                headers.insert("x-token", "secret".parse().unwrap());
            }
            let r = RequestAttrs { method, path: path_, host_lowercase: "myapp", headers: &headers };
            let tcp = sec.authz.check(&c, None);
            let http = sec.authz.check(&c, Some(&r));
            prop_assert!(!(tcp == Decision::Allow && http != Decision::Allow), "TCP allowed, HTTP {method} {path_} denied: {http:?}\n{policies:#?}");
            if peer.is_none() && sec.refuses_all_plaintext(port) {
                prop_assert_ne!(&tcp, &Decision::Allow, "kernel drops plaintext the agent would allow (TCP)\n{:#?}", policies);
                prop_assert_ne!(&http, &Decision::Allow, "kernel drops plaintext the agent would allow ({} {})\n{:#?}", method, path_, policies);
            }
            // The kernel's per-port table says the same as the direct question.
            let (default_drop, overrides) = sec.plaintext_verdicts();
            let table = overrides.iter().find(|(p, _)| *p == port).map_or(default_drop, |(_, d)| *d);
            prop_assert_eq!(table, sec.refuses_all_plaintext(port), "port {} table {:?}", port, overrides);
        }
    }

    #[test]
    fn normalized_paths_are_clean_and_stable(segments in proptest::collection::vec("(\\.|\\.\\.|%2e%2e|%2F|[a-z]{1,3}|\\\\|)", 0..8)) {
        let raw = format!("/{}", segments.join("/"));
        if let Ok(p) = path::normalize(&raw) {
            prop_assert!(p.starts_with('/'));
            prop_assert!(!p.contains("//") && !p.contains('\\'), "{raw} -> {p}");
            prop_assert!(!p.split('/').any(|s| s == "." || s == ".."), "{raw} -> {p}");
            let again = path::normalize(&p);
            prop_assert_eq!(again.as_deref(), Ok(p.as_str()), "not idempotent for {}", raw);
        }
    }
}

//! YAML documents -> typed objects. A file is accepted whole or not at all, so a half
//! applied file never reaches the data plane.

use std::collections::HashSet;
use std::path::Path;

use serde::de::DeserializeOwned;
use serde_yaml::Value;

use super::Error;
use super::Object;
use super::gateway_api::{GATEWAY_API_VERSIONS, GRPC_ROUTE_VERSIONS, REFERENCE_GRANT_VERSIONS};
use super::istio::NETWORKING_VERSIONS;
use super::linkerd::{SERVICE_PROFILE_VERSIONS, TRAFFIC_SPLIT_VERSIONS};
use super::resources::EndpointSlice;
use super::security::{AuthorizationPolicy, PeerAuthentication, SECURITY_VERSIONS, WorkloadSelector};

/// Kinds from other API groups the mesh will read but this version does not enforce yet.
/// They are refused by name rather than silently ignored: a policy that is accepted but
/// not enforced is worse than an error.
const NOT_YET_SUPPORTED: &[&str] = &["RequestAuthentication", "Sidecar"];

/// Parses every YAML document in `text` (the contents of `file`).
pub fn parse_documents(file: &Path, text: &str) -> Result<Vec<Object>, Error> {
    let mut objects = Vec::new();
    let mut seen = HashSet::new();
    for (index, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let value = <Value as serde::Deserialize>::deserialize(doc).map_err(|e| syntax_error(file, index, &e))?;
        if value.is_null() {
            continue; // empty document, e.g. a trailing `---`
        }
        let object = parse_object(file, index, value)?;
        let key = object.key();
        if !seen.insert(key.clone()) {
            return Err(Error {
                file: file.to_owned(),
                object: Some(describe(&key)),
                field: Some("metadata.name".into()),
                reason: "defined twice in this file".into(),
            });
        }
        objects.push(object);
    }
    Ok(objects)
}

/// The security kinds whose rejection must fail closed, as the stand-in each gets.
const FAIL_CLOSED_KINDS: [&str; 2] = ["AuthorizationPolicy", "PeerAuthentication"];

/// Fail-closed stand-ins for the security policies a rejected `text` meant to define
/// that `good` (its source's last good version) lacks, with the rejection `e` told so:
/// an AuthorizationPolicy stands in as allow-nothing and a PeerAuthentication as
/// STRICT, over the scope the broken object meant, so a broken policy closes instead of
/// leaving its workloads open.
pub fn fail_closed_standins(text: &str, good: &[Object], e: &mut Error) -> Vec<Object> {
    let standins: Vec<Object> = intended_policies(text)
        .into_iter()
        .filter(|p| !good.iter().any(|o| o.key() == (p.kind, p.namespace.clone(), p.name.clone())))
        .map(|p| match p.kind {
            "PeerAuthentication" => Object::PeerAuthentication(std::sync::Arc::new(
                PeerAuthentication::strict_standin(&p.namespace, &p.name, p.selector),
            )),
            _ => Object::AuthorizationPolicy(std::sync::Arc::new(AuthorizationPolicy::allow_nothing(
                &p.namespace,
                &p.name,
                p.selector,
            ))),
        })
        .collect();
    let names = |kind: &str| -> Vec<String> {
        standins.iter().map(Object::key).filter(|k| k.0 == kind).map(|k| describe(&k)).collect()
    };
    let (policies, peer_auths) = (names("AuthorizationPolicy"), names("PeerAuthentication"));
    if !policies.is_empty() {
        e.reason.push_str(&format!(
            "; {} never applied, so the workloads it would select allow nothing until it is fixed",
            policies.join(", ")
        ));
    }
    if !peer_auths.is_empty() {
        e.reason.push_str(&format!(
            "; {} never applied, so the workloads it would select refuse plaintext (STRICT) until it is fixed",
            peer_auths.join(", ")
        ));
    }
    standins
}

/// A security policy a rejected file meant to define, as far as it can be read.
struct IntendedPolicy {
    kind: &'static str,
    namespace: String,
    name: String,
    selector: Option<WorkloadSelector>,
}

/// The security policies a rejected file meant to define. A document that does not
/// parse at all but names one of [`FAIL_CLOSED_KINDS`] counts too, scoped to its
/// namespace (or `default`) with no selector: a broken policy must close more, not less,
/// than its author meant.
fn intended_policies(text: &str) -> Vec<IntendedPolicy> {
    let mut out = Vec::new();
    // Documents are split by hand: a syntax error stops serde_yaml's document stream.
    let mut docs = vec![String::new()];
    for line in text.lines() {
        if line.starts_with("---") {
            docs.push(String::new());
        } else if let Some(d) = docs.last_mut() {
            d.push_str(line);
            d.push('\n');
        }
    }
    for doc in docs {
        match serde_yaml::from_str::<Value>(&doc) {
            Ok(v) => {
                let Some(kind) = v.get("kind").and_then(Value::as_str).and_then(fail_closed_kind) else { continue };
                let meta = v.get("metadata");
                let field = |k: &str| meta.and_then(|m| m.get(k)).and_then(Value::as_str).map(str::to_owned);
                let selector = v
                    .get("spec")
                    .and_then(|s| s.get("selector"))
                    .and_then(|s| serde_yaml::from_value::<WorkloadSelector>(s.clone()).ok());
                out.push(IntendedPolicy {
                    kind,
                    namespace: field("namespace").unwrap_or_else(|| "default".into()),
                    name: field("name").unwrap_or_else(|| "unnamed".into()),
                    selector,
                });
            }
            Err(_) => {
                let kind =
                    doc.lines().find_map(|l| l.trim().strip_prefix("kind:").and_then(|k| fail_closed_kind(k.trim())));
                if let Some(kind) = kind {
                    let value_of = |key: &str| {
                        doc.lines().find_map(|l| {
                            let t = l.trim_start();
                            (l.len() > t.len()).then(|| t.strip_prefix(key)).flatten().map(|v| v.trim().to_string())
                        })
                    };
                    out.push(IntendedPolicy {
                        kind,
                        namespace: value_of("namespace:").filter(|v| !v.is_empty()).unwrap_or_else(|| "default".into()),
                        name: value_of("name:").filter(|v| !v.is_empty()).unwrap_or_else(|| "unparsed".into()),
                        selector: None,
                    });
                }
            }
        }
    }
    out
}

fn fail_closed_kind(kind: &str) -> Option<&'static str> {
    FAIL_CLOSED_KINDS.into_iter().find(|k| *k == kind)
}

/// `Kind namespace/name` or `Kind name`.
pub(crate) fn describe(key: &(&'static str, String, String)) -> String {
    let (kind, ns, name) = key;
    if ns.is_empty() { format!("{kind} {name}") } else { format!("{kind} {ns}/{name}") }
}

fn syntax_error(file: &Path, index: usize, e: &serde_yaml::Error) -> Error {
    let at = e.location().map(|l| format!(" at line {} column {}", l.line(), l.column())).unwrap_or_default();
    Error {
        file: file.to_owned(),
        object: Some(format!("document {}", index + 1)),
        field: None,
        reason: format!("YAML syntax error{at}: {e}"),
    }
}

fn parse_object(file: &Path, index: usize, value: Value) -> Result<Object, Error> {
    let err = |object: Option<String>, field: &str, reason: String| Error {
        file: file.to_owned(),
        object: object.or_else(|| Some(format!("document {}", index + 1))),
        field: Some(field.to_string()),
        reason,
    };
    if !value.is_mapping() {
        return Err(err(None, "(root)", "a Kubernetes object must be a mapping".into()));
    }
    let kind =
        value.get("kind").and_then(Value::as_str).ok_or_else(|| err(None, "kind", "missing or not a string".into()))?;
    let name = value.get("metadata").and_then(|m| m.get("name")).and_then(Value::as_str).map(str::to_owned);
    let namespace = value.get("metadata").and_then(|m| m.get("namespace")).and_then(Value::as_str);
    let name = name.as_deref().unwrap_or("<unnamed>");
    // Named as everywhere else: `Kind namespace/name` when the object says its namespace.
    let label = Some(match namespace {
        Some(ns) if !ns.is_empty() => format!("{kind} {ns}/{name}"),
        _ => format!("{kind} {name}"),
    });
    let api_version = value
        .get("apiVersion")
        .and_then(Value::as_str)
        .ok_or_else(|| err(label.clone(), "apiVersion", "missing or not a string".into()))?;

    // Two API groups name a kind `Gateway`: the group says which.
    let kind = if kind == "Gateway" && api_version.starts_with("gateway.networking.k8s.io/") {
        super::resource::KUBE_GATEWAY
    } else {
        kind
    };
    let expected_versions: &[&str] = match kind {
        "Namespace" | "Pod" | "Service" | "ServiceAccount" | "Secret" => &["v1"],
        "EndpointSlice" => &["discovery.k8s.io/v1"],
        "VirtualService" | "DestinationRule" | "Gateway" | "ServiceEntry" => NETWORKING_VERSIONS,
        "ServiceProfile" => SERVICE_PROFILE_VERSIONS,
        "TrafficSplit" => TRAFFIC_SPLIT_VERSIONS,
        "PeerAuthentication" | "AuthorizationPolicy" => SECURITY_VERSIONS,
        "NetworkPolicy" => &["networking.k8s.io/v1"],
        "GatewayClass" | "HTTPRoute" | super::resource::KUBE_GATEWAY => GATEWAY_API_VERSIONS,
        "GRPCRoute" => GRPC_ROUTE_VERSIONS,
        "ReferenceGrant" => REFERENCE_GRANT_VERSIONS,
        "Telemetry" => super::telemetry::TELEMETRY_VERSIONS,
        k if NOT_YET_SUPPORTED.contains(&k) => {
            return Err(err(label, "kind", format!("{k} ({api_version}) is not supported by this agent version yet")));
        }
        other => return Err(err(label, "kind", format!("unknown kind {other:?} (apiVersion {api_version})"))),
    };
    if !expected_versions.contains(&api_version) {
        return Err(err(
            label,
            "apiVersion",
            format!("{kind} must be apiVersion {}, got {api_version}", expected_versions.join(" or ")),
        ));
    }
    if super::resource::SPEC_REQUIRED.contains(&kind) && value.get("spec").is_none() {
        return Err(err(label, "spec", "required field is missing".into()));
    }
    let object = match kind {
        "Namespace" => decode(value, Object::Namespace),
        "Pod" => decode(value, Object::Pod),
        "VirtualService" => decode(value, Object::VirtualService),
        "DestinationRule" => decode(value, Object::DestinationRule),
        "Gateway" => decode(value, Object::Gateway),
        "ServiceEntry" => decode(value, Object::ServiceEntry),
        "ServiceProfile" => decode(value, Object::ServiceProfile),
        "TrafficSplit" => decode(value, Object::TrafficSplit),
        "PeerAuthentication" => decode(value, Object::PeerAuthentication),
        "AuthorizationPolicy" => decode(value, Object::AuthorizationPolicy),
        "ServiceAccount" => decode(value, Object::ServiceAccount),
        "Secret" => decode(value, Object::Secret),
        "EndpointSlice" => decode(value, Object::EndpointSlice),
        "NetworkPolicy" => decode(value, Object::NetworkPolicy),
        "Telemetry" => decode(value, Object::Telemetry),
        "GatewayClass" => decode(value, Object::GatewayClass),
        "HTTPRoute" => decode(value, Object::HttpRoute),
        "GRPCRoute" => decode(value, Object::GrpcRoute),
        "ReferenceGrant" => decode(value, Object::ReferenceGrant),
        super::resource::KUBE_GATEWAY => decode(value, Object::KubeGateway),
        _ => decode(value, Object::Service),
    }
    .map_err(|(f, r)| err(label.clone(), &f, r))?;
    let key = object.key();
    validate(&object).map_err(|(f, r)| err(Some(describe(&key)), &f, r)).map(|()| object)
}

/// Deserializes one kind's object and wraps it as an [`Object`].
fn decode<T: DeserializeOwned>(value: Value, wrap: fn(T) -> Object) -> Result<Object, (String, String)> {
    typed(value).map(wrap)
}

/// Deserializes with the path of the failing field.
fn typed<T: DeserializeOwned>(value: Value) -> Result<T, (String, String)> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner().to_string();
        // serde reports a missing field at its parent; name the field itself.
        match inner.strip_prefix("missing field `").and_then(|s| s.split('`').next()) {
            Some(missing) if path == "." => (missing.to_string(), "required field is missing".into()),
            Some(missing) => (format!("{path}.{missing}"), "required field is missing".into()),
            None => (path, inner),
        }
    })
}

/// The API server's checks of an EndpointSlice: a known address type and addresses of
/// that type.
fn validate_slice(slice: &EndpointSlice) -> Result<(), (String, String)> {
    let want_v4 = match slice.address_type.as_str() {
        "IPv4" => Some(true),
        "IPv6" => Some(false),
        // Names the mesh cannot resolve to a socket without DNS: kept, never dialed.
        "FQDN" => None,
        other => return Err(("addressType".into(), format!("{other:?} is not IPv4, IPv6 or FQDN"))),
    };
    for (i, e) in slice.endpoints.iter().enumerate() {
        if e.addresses.is_empty() {
            return Err((format!("endpoints[{i}].addresses"), "must list at least one address".into()));
        }
        let Some(v4) = want_v4 else { continue };
        for (j, a) in e.addresses.iter().enumerate() {
            match a.parse::<std::net::IpAddr>() {
                Ok(ip) if ip.is_ipv4() == v4 => {}
                _ => {
                    return Err((
                        format!("endpoints[{i}].addresses[{j}]"),
                        format!("{a:?} is not an {} address", slice.address_type),
                    ));
                }
            }
        }
    }
    Ok(())
}

/// Checks the API server would make before storing the object.
fn validate(object: &Object) -> Result<(), (String, String)> {
    let meta = object.metadata();
    if !is_dns1123_subdomain(&meta.name) {
        return Err(("metadata.name".into(), format!("{:?} is not a valid DNS-1123 name", meta.name)));
    }
    match object {
        Object::VirtualService(v) => v.validate()?,
        Object::DestinationRule(d) => d.validate()?,
        Object::Gateway(g) => g.validate()?,
        Object::ServiceEntry(e) => e.spec.validate()?,
        Object::Secret(s) => s.validate()?,
        Object::ServiceProfile(p) => p.validate()?,
        Object::TrafficSplit(t) => t.validate()?,
        Object::PeerAuthentication(p) => p.validate()?,
        Object::AuthorizationPolicy(a) => a.validate()?,
        Object::GatewayClass(c) => c.validate()?,
        Object::KubeGateway(g) => g.validate()?,
        Object::HttpRoute(r) => r.validate()?,
        Object::GrpcRoute(r) => r.validate()?,
        Object::ReferenceGrant(g) => g.validate()?,
        Object::Telemetry(t) => t.spec.validate()?,
        _ => {}
    }
    if let Object::EndpointSlice(slice) = object {
        validate_slice(slice)?;
    }
    if let Object::Service(svc) = object {
        let mut ports = HashSet::new();
        for (i, p) in svc.spec.ports.iter().enumerate() {
            if p.port == 0 {
                return Err((format!("spec.ports[{i}].port"), "must be between 1 and 65535".into()));
            }
            if !ports.insert(p.port) {
                return Err((format!("spec.ports[{i}].port"), format!("port {} is listed twice", p.port)));
            }
        }
        if let Some(ip) = &svc.spec.cluster_ip
            && !ip.is_empty()
            && ip != "None"
            && ip.parse::<std::net::IpAddr>().is_err()
        {
            return Err(("spec.clusterIP".into(), format!("{ip:?} is neither an IP address nor \"None\"")));
        }
    }
    Ok(())
}

/// Kubernetes object names: lowercase alphanumerics, `-` and `.`, at most 253 bytes,
/// starting and ending with an alphanumeric.
fn is_dns1123_subdomain(s: &str) -> bool {
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    !s.is_empty()
        && s.len() <= 253
        && s.bytes().all(|b| alnum(b) || b == b'-' || b == b'.')
        && s.bytes().next().is_some_and(alnum)
        && s.bytes().last().is_some_and(alnum)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parses `yaml` and returns the error as a string, or "ok".
    fn check(yaml: &str) -> String {
        match parse_documents(Path::new("t.yaml"), yaml) {
            Ok(objs) => format!("ok {}", objs.len()),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn destination_rule_tls_is_the_mesh_s_own_or_originated_from_files_or_a_gateway_s_secret() {
        let dr = |tls: &str| {
            check(&format!(
                "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: d}}\nspec:\n  host: api.example.com\n  trafficPolicy:\n    tls: {tls}\n"
            ))
        };
        for ok in [
            "{mode: ISTIO_MUTUAL}",
            "{mode: SIMPLE}",
            "{mode: SIMPLE, caCertificates: /etc/certs/ca.pem, sni: api.example.com}",
            "{mode: MUTUAL, clientCertificate: /etc/certs/c.pem, privateKey: /etc/certs/k.pem}",
            // A gateway reads it from its namespace; a node agent refuses to originate.
            "{mode: MUTUAL, credentialName: client-credential}",
        ] {
            assert_eq!(dr(ok), "ok 1", "{ok}");
        }
        for (bad, field) in [
            ("{mode: DISABLE}", "spec.trafficPolicy.tls.mode"),
            ("{mode: MUTUAL, clientCertificate: /c.pem}", "spec.trafficPolicy.tls.privateKey"),
            (
                "{mode: SIMPLE, credentialName: api-tls, caCertificates: /c.pem}",
                "spec.trafficPolicy.tls.caCertificates",
            ),
            ("{mode: SIMPLE, insecureSkipVerify: true}", "spec.trafficPolicy.tls.insecureSkipVerify"),
            ("{mode: SIMPLE, caCertificates: certs/ca.pem}", "spec.trafficPolicy.tls.caCertificates"),
            ("{mode: SIMPLE, subjectAltNames: [api.example.com]}", "spec.trafficPolicy.tls.subjectAltNames"),
        ] {
            let got = dr(bad);
            assert!(got.contains(&format!("field {field}")) || got.contains(field), "{bad}: {got}");
        }
    }

    #[test]
    fn locality_settings_are_checked_with_the_field_named() {
        let dr = |lb: &str| {
            check(&format!(
                "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: d}}\nspec:\n  host: myapp\n  trafficPolicy:\n    loadBalancer: {{localityLbSetting: {lb}}}\n"
            ))
        };
        for ok in [
            "{enabled: true}",
            "{enabled: false}",
            "{failover: [{from: us-east, to: us-west}]}",
            "{failoverPriority: [topology.istio.io/network, topology.istio.io/cluster]}",
            "{failoverPriority: [topology.istio.io/cluster=cluster1]}",
            "{distribute: [{from: us-east/*, to: {us-east/*: 80, us-west/*: 20}}]}",
            "{distribute: [{from: us-east/a/*, to: {us-east/a/*: 100}}, {from: '*', to: {us-east: 100}}]}",
        ] {
            assert_eq!(dr(ok), "ok 1", "{ok}");
        }
        for (bad, field) in [
            ("{distribute: [{from: us-east/*, to: {us-east/*: 90}}]}", "localityLbSetting.distribute[0].to"),
            ("{distribute: [{from: us-east/*, to: {us-east/*: 0, b: 100}}]}", "distribute[0].to[us-east/*]"),
            ("{distribute: [{from: 'us-*', to: {a: 100}}]}", "localityLbSetting.distribute[0].from"),
            ("{distribute: [{from: '*/a', to: {a: 100}}]}", "localityLbSetting.distribute[0].from"),
            ("{distribute: [{from: a, to: {}}]}", "localityLbSetting.distribute[0].to"),
            ("{distribute: [{from: a, to: {a: 100}}, {from: a, to: {b: 100}}]}", "distribute[1].from"),
            ("{distribute: [{from: a, to: {a: 100}}], failover: [{from: a, to: b}]}", "localityLbSetting.distribute"),
            ("{failover: [{from: us-east, to: us-east}]}", "localityLbSetting.failover[0]"),
            ("{failover: [{from: us-east/a, to: us-west}]}", "localityLbSetting.failover[0].from"),
            ("{failoverPriority: ['']}", "localityLbSetting.failoverPriority[0]"),
        ] {
            let got = dr(bad);
            assert!(got.contains(field), "{bad}: {got}");
        }
    }

    #[test]
    fn tls_routes_are_accepted_at_gateways_and_for_mesh_traffic_with_sni_matches() {
        let vs = |gateways: &str| {
            format!(
                "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: s, namespace: n}}\nspec:\n  \
                 hosts: [s.example.com]\n  gateways: {gateways}\n  tls:\n  - match: [{{sniHosts: [s.example.com]}}]\n    \
                 route: [{{destination: {{host: s, port: {{number: 443}}}}}}]\n"
            )
        };
        assert_eq!(check(&vs("[edge]")), "ok 1");
        assert_eq!(check(&vs("[mesh, edge]")), "ok 1");
        let no_sni = vs("[edge]").replace("sniHosts: [s.example.com]", "port: 443");
        assert!(check(&no_sni).contains("sniHosts"), "{}", check(&no_sni));
    }

    #[test]
    fn parses_lab_style_objects() {
        let yaml = r#"
apiVersion: v1
kind: Namespace
metadata: {name: production, labels: {istio-injection: enabled}}
---
apiVersion: v1
kind: Pod
metadata: {name: myapp-v1, namespace: production, labels: {app: myapp, version: v1}}
spec:
  serviceAccountName: myapp
  nodeName: node2
  containers: [{name: app, image: echo, ports: [{containerPort: 8080}]}]
status: {podIP: 10.10.2.2}
---
apiVersion: v1
kind: Service
metadata: {name: myapp, namespace: production}
spec:
  selector: {app: myapp}
  clusterIP: 10.96.0.20
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: myapp, namespace: production}
---
"#;
        assert_eq!(check(yaml), "ok 4");
    }

    #[test]
    fn errors_name_file_object_and_field() {
        let cases = [
            (
                "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {ports: [{name: x}]}\n",
                "t.yaml: Service a: field spec.ports[0].port: required field is missing",
            ),
            (
                "apiVersion: v1\nkind: Gizmo\nmetadata: {name: a}\n",
                "t.yaml: Gizmo a: field kind: unknown kind \"Gizmo\" (apiVersion v1)",
            ),
            (
                "apiVersion: v1\nkind: Pod\nmetadata: {name: a}\nspec: {containers: [{name: c, ports: [{containerPort: http}]}]}\n",
                "t.yaml: Pod a: field spec.containers[0].ports[0].containerPort: invalid type: string \"http\", expected u16",
            ),
            (
                "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {clusterIP: 10.0.0.999}\n",
                "t.yaml: Service default/a: field spec.clusterIP: \"10.0.0.999\" is neither an IP address nor \"None\"",
            ),
            (
                "apiVersion: v1\nkind: Namespace\nmetadata: {labels: {}}\n",
                "t.yaml: Namespace <unnamed>: field metadata.name: required field is missing",
            ),
            ("kind: Pod\nmetadata: {name: a}\n", "t.yaml: Pod a: field apiVersion: missing or not a string"),
            (
                "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: a, namespace: n}\n",
                "t.yaml: VirtualService n/a: field spec: required field is missing",
            ),
            (
                "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: a, namespace: n}\nstatus: {}\n",
                "ok 1",
            ),
        ];
        for (yaml, want) in cases {
            assert_eq!(check(yaml), want, "for {yaml}");
        }
    }

    #[test]
    fn syntax_error_reports_line() {
        let got = check("apiVersion: v1\nkind: Pod\nmetadata: {name: [\n");
        assert!(got.starts_with("t.yaml: document 1: YAML syntax error at line"), "{got}");
    }

    #[test]
    fn not_yet_supported_kinds_are_refused_by_name() {
        let got = check("apiVersion: networking.istio.io/v1beta1\nkind: Sidecar\nmetadata: {name: se}\n");
        assert!(got.contains("Sidecar (networking.istio.io/v1beta1) is not supported"), "{got}");
    }

    #[test]
    fn duplicate_in_one_file_is_refused() {
        let doc = "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n";
        let got = check(&format!("{doc}---\n{doc}"));
        assert!(got.contains("defined twice"), "{got}");
    }

    fn seed(name: &str) -> String {
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/seed").join(name)).unwrap()
    }

    #[test]
    fn seed_traffic_configs_parse_as_written() {
        for f in [
            "virtualservice-myapp.yaml",
            "virtualservice-mirror.yaml",
            "virtualservice-fault.yaml",
            "destinationrule-myapp.yaml",
            "destinationrule-circuit-breaker.yaml",
            "serviceprofile-myapp.yaml",
            "trafficsplit-canary.yaml",
        ] {
            assert_eq!(check(&seed(f)), "ok 1", "{f}");
        }
    }

    #[test]
    fn invalid_traffic_configs_name_the_field() {
        let vs = |http: &str| {
            format!(
                "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: v, namespace: production}}\nspec:\n  hosts: [myapp]\n  http:\n{http}"
            )
        };
        let cases = [
            (
                vs("  - match: [{uri: {regex: \"/api/(\"}}]\n    route: [{destination: {host: myapp}}]\n"),
                "field spec.http[0].match[0].uri.regex: invalid regex",
            ),
            (
                vs("  - route: [{destination: {host: myapp, subset: v1}, weight: 90}, {destination: {host: myapp, subset: v2}, weight: 20}]\n"),
                "field spec.http[0].route: weights add up to 110",
            ),
            (vs("  - route: [{destination: {host: myapp}}]\n    timeout: -1s\n"), "field spec.http[0].timeout: duration \"-1s\" must not be negative"),
            (
                vs("  - route: [{destination: {host: myapp}}]\n    retries: {attempts: 2, retryOn: \"5xx,sometimes\"}\n"),
                "field spec.http[0].retries.retryOn: unknown retry condition \"sometimes\"",
            ),
            (vs("  - route: [{destination: {host: myapp}}]\n    delegate: {name: other}\n"), "field spec.http[0].delegate: is not supported"),
            (
                vs("  - route: [{destination: {host: myapp}}]\n    timeuot: 1s\n"),
                "unknown field `timeuot`",
            ),
            (
                "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: d}\nspec:\n  host: myapp\n  subsets: [{name: v1, labels: {version: v1}}, {name: v1, labels: {version: v2}}]\n".to_string(),
                "field spec.subsets[1].name: subset \"v1\" is defined twice",
            ),
            (
                "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: d}\nspec:\n  host: myapp\n  trafficPolicy: {outlierDetection: {baseEjectionTime: -30s}}\n".to_string(),
                "field spec.trafficPolicy.outlierDetection.baseEjectionTime: duration \"-30s\" must not be negative",
            ),
            (
                // Found by the config fuzz target: two huge weights overflowed the sum.
                "apiVersion: split.smi-spec.io/v1alpha2\nkind: TrafficSplit\nmetadata: {name: t, namespace: production}\nspec:\n  service: myapp\n  backends: [{service: a, weight: 4000000}, {service: b, weight: 1000000G}]\n".to_string(),
                "field spec.backends[1].weight: weights add up to more than 4294967295m",
            ),
        ];
        for (yaml, want) in cases {
            let got = check(&yaml);
            assert!(got.contains(want), "want {want:?} in {got:?}");
        }
    }
}

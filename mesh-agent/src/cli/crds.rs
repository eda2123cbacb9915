//! CustomResourceDefinitions for every API group the mesh reads, with OpenAPI schemas
//! generated from the same Rust types the agent parses with (schemars), so the API
//! server refuses what the agent would refuse for its shape. Semantic checks (regexes,
//! weights, references) stay in the agent and `meshctl analyze`.
//!
//! Kubernetes wants *structural* schemas: a type on every node, no `$ref`, no
//! `additionalProperties` beside `properties`; free-form fields marked
//! `x-kubernetes-preserve-unknown-fields`. [`structural`] turns schemars' OpenAPI 3
//! output into that, and [`violations`] checks it.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceDefinition, CustomResourceDefinitionNames, CustomResourceDefinitionSpec,
    CustomResourceDefinitionVersion, CustomResourceSubresourceStatus, CustomResourceSubresources,
    CustomResourceValidation, JSONSchemaProps,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use schemars::JsonSchema;
use schemars::generate::SchemaSettings;
use serde_json::{Map, Value, json};

use crate::config::gateway::GatewaySpec;
use crate::config::gateway_api::{
    GATEWAY_API_VERSIONS, GROUP, GRPC_ROUTE_VERSIONS, GatewayClassSpec, GrpcRouteSpec, HttpRouteSpec, KubeGatewaySpec,
    REFERENCE_GRANT_VERSIONS, ReferenceGrantSpec,
};
use crate::config::istio::{DestinationRuleSpec, NETWORKING_VERSIONS, VirtualServiceSpec};
use crate::config::linkerd::{SERVICE_PROFILE_VERSIONS, ServiceProfileSpec, TRAFFIC_SPLIT_VERSIONS, TrafficSplitSpec};
use crate::config::security::{AuthorizationPolicySpec, PeerAuthenticationSpec, SECURITY_VERSIONS};
use crate::config::service_entry::ServiceEntrySpec;
use crate::config::telemetry::{TELEMETRY_VERSIONS, TelemetrySpec};

pub use crate::config::schema::{any_value, int_or_string};

/// One kind to define.
struct Kind {
    group: &'static str,
    kind: &'static str,
    plural: &'static str,
    short: &'static [&'static str],
    /// `group/version` strings the agent accepts; the first is stored.
    versions: &'static [&'static str],
    spec: fn() -> Value,
    /// Cluster-scoped rather than namespaced.
    cluster: bool,
    /// `status` is a subresource, written by the controller alone (the Gateway API's).
    status_subresource: bool,
}

/// A namespaced kind whose status is written with the object (Istio's, Linkerd's, SMI's).
const fn namespaced(
    group: &'static str,
    kind: &'static str,
    plural: &'static str,
    short: &'static [&'static str],
    versions: &'static [&'static str],
    spec: fn() -> Value,
) -> Kind {
    Kind { group, kind, plural, short, versions, spec, cluster: false, status_subresource: false }
}

/// A Gateway API kind: status is a subresource, written by the controller alone.
const fn gateway_api(
    kind: &'static str,
    plural: &'static str,
    short: &'static [&'static str],
    versions: &'static [&'static str],
    spec: fn() -> Value,
) -> Kind {
    Kind { status_subresource: true, ..namespaced(GROUP, kind, plural, short, versions, spec) }
}

fn spec_schema<T: JsonSchema>() -> Value {
    let generator = SchemaSettings::openapi3()
        .with(|s| {
            s.inline_subschemas = true;
            s.meta_schema = None;
        })
        .into_generator();
    structural(generator.into_root_schema_for::<T>().to_value())
}

const KINDS: &[Kind] = &[
    namespaced(
        "networking.istio.io",
        "VirtualService",
        "virtualservices",
        &["vs"],
        NETWORKING_VERSIONS,
        spec_schema::<VirtualServiceSpec>,
    ),
    namespaced(
        "networking.istio.io",
        "DestinationRule",
        "destinationrules",
        &["dr"],
        NETWORKING_VERSIONS,
        spec_schema::<DestinationRuleSpec>,
    ),
    namespaced("networking.istio.io", "Gateway", "gateways", &["gw"], NETWORKING_VERSIONS, spec_schema::<GatewaySpec>),
    namespaced(
        "networking.istio.io",
        "ServiceEntry",
        "serviceentries",
        &["se"],
        NETWORKING_VERSIONS,
        spec_schema::<ServiceEntrySpec>,
    ),
    namespaced(
        "security.istio.io",
        "PeerAuthentication",
        "peerauthentications",
        &["pa"],
        SECURITY_VERSIONS,
        spec_schema::<PeerAuthenticationSpec>,
    ),
    namespaced(
        "security.istio.io",
        "AuthorizationPolicy",
        "authorizationpolicies",
        &["ap"],
        SECURITY_VERSIONS,
        spec_schema::<AuthorizationPolicySpec>,
    ),
    namespaced(
        "telemetry.istio.io",
        "Telemetry",
        "telemetries",
        &["telemetry"],
        TELEMETRY_VERSIONS,
        spec_schema::<TelemetrySpec>,
    ),
    namespaced(
        "linkerd.io",
        "ServiceProfile",
        "serviceprofiles",
        &["sp"],
        SERVICE_PROFILE_VERSIONS,
        spec_schema::<ServiceProfileSpec>,
    ),
    namespaced(
        "split.smi-spec.io",
        "TrafficSplit",
        "trafficsplits",
        &["ts"],
        TRAFFIC_SPLIT_VERSIONS,
        spec_schema::<TrafficSplitSpec>,
    ),
    Kind {
        cluster: true,
        ..gateway_api("GatewayClass", "gatewayclasses", &["gc"], GATEWAY_API_VERSIONS, spec_schema::<GatewayClassSpec>)
    },
    gateway_api("Gateway", "gateways", &["gtw"], GATEWAY_API_VERSIONS, spec_schema::<KubeGatewaySpec>),
    gateway_api("HTTPRoute", "httproutes", &[], GATEWAY_API_VERSIONS, spec_schema::<HttpRouteSpec>),
    gateway_api("GRPCRoute", "grpcroutes", &[], GRPC_ROUTE_VERSIONS, spec_schema::<GrpcRouteSpec>),
    gateway_api(
        "ReferenceGrant",
        "referencegrants",
        &["refgrant"],
        REFERENCE_GRANT_VERSIONS,
        spec_schema::<ReferenceGrantSpec>,
    ),
];

/// Every CRD, in a stable order.
pub fn all() -> Vec<CustomResourceDefinition> {
    KINDS.iter().map(crd).collect()
}

/// The `openAPIV3Schema` of a kind's objects.
pub fn object_schema(spec: Value) -> Value {
    json!({
        "type": "object",
        "properties": {
            "spec": spec,
            "status": { "type": "object", "x-kubernetes-preserve-unknown-fields": true },
        },
    })
}

fn crd(k: &Kind) -> CustomResourceDefinition {
    let schema = object_schema((k.spec)());
    let props: JSONSchemaProps = serde_json::from_value(schema).expect("generated schemas fit JSONSchemaProps");
    let versions = k
        .versions
        .iter()
        .enumerate()
        .map(|(i, gv)| CustomResourceDefinitionVersion {
            name: gv.rsplit('/').next().unwrap_or(gv).to_string(),
            served: true,
            storage: i == 0,
            schema: Some(CustomResourceValidation { open_api_v3_schema: Some(props.clone()) }),
            subresources: k.status_subresource.then(|| CustomResourceSubresources {
                status: Some(CustomResourceSubresourceStatus(serde_json::json!({}))),
                ..Default::default()
            }),
            ..Default::default()
        })
        .collect();
    let singular = k.kind.to_ascii_lowercase();
    CustomResourceDefinition {
        metadata: ObjectMeta {
            name: Some(format!("{}.{}", k.plural, k.group)),
            labels: Some([("app.kubernetes.io/part-of".to_string(), "mesh".to_string())].into_iter().collect()),
            ..Default::default()
        },
        spec: CustomResourceDefinitionSpec {
            group: k.group.into(),
            scope: if k.cluster { "Cluster" } else { "Namespaced" }.into(),
            names: CustomResourceDefinitionNames {
                kind: k.kind.into(),
                list_kind: Some(format!("{}List", k.kind)),
                plural: k.plural.into(),
                singular: Some(singular),
                short_names: Some(k.short.iter().map(|s| s.to_string()).collect()),
                ..Default::default()
            },
            versions,
            ..Default::default()
        },
        status: None,
    }
}

/// Rewrites a schemars OpenAPI 3 schema into a Kubernetes structural schema.
pub fn structural(v: Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(structural_object(m)),
        Value::Bool(_) => json!({ "x-kubernetes-preserve-unknown-fields": true }),
        other => other,
    }
}

/// A free-form object: what a recursive reference (a ServiceProfile condition's
/// `all`/`any`/`not`) becomes, as in Linkerd's own CRD; the agent still checks it.
fn free_object() -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("type".into(), json!("object"));
    m.insert("x-kubernetes-preserve-unknown-fields".into(), Value::Bool(true));
    m
}

fn structural_object(mut m: Map<String, Value>) -> Map<String, Value> {
    if m.contains_key("$ref") {
        let nullable = m.get("nullable").cloned();
        let mut free = free_object();
        if let Some(n) = nullable {
            free.insert("nullable".into(), n);
        }
        return free;
    }
    // `anyOf: [x, null]` (an optional recursive field): x, nullable.
    if !m.contains_key("type")
        && let Some(Value::Array(any)) = m.get("anyOf")
        && any.len() == 2
        && let Some(x) = any.iter().find(|a| a.get("enum") != Some(&json!([null]))).cloned()
        && let Value::Object(mut inner) = x
    {
        m.remove("anyOf");
        inner.insert("nullable".into(), Value::Bool(true));
        for (k, v) in m {
            inner.entry(k).or_insert(v);
        }
        return structural_object(inner);
    }
    // `allOf: [x]` (how a documented or boxed field is wrapped): x itself.
    if !m.contains_key("type")
        && let Some(Value::Array(all)) = m.get("allOf")
        && all.len() == 1
        && let Some(Value::Object(inner)) = all.first().cloned()
    {
        m.remove("allOf");
        let mut merged = inner;
        for (k, v) in m {
            merged.entry(k).or_insert(v);
        }
        return structural_object(merged);
    }
    for k in ["$schema", "title", "$id", "definitions", "$defs", "components", "default", "examples", "example"] {
        m.remove(k);
    }
    // One enum from schemars' per-variant `oneOf: [{enum: [A]}, ...]` (documented variants).
    if let Some(Value::Array(alts)) = m.get("oneOf")
        && !alts.is_empty()
        && alts.iter().all(|a| a.get("enum").is_some_and(|e| e.as_array().is_some_and(|e| e.len() == 1)))
    {
        let values: Vec<Value> = alts.iter().filter_map(|a| a["enum"].get(0).cloned()).collect();
        m.remove("oneOf");
        m.insert("type".into(), json!("string"));
        m.insert("enum".into(), Value::Array(values));
    }
    if m.contains_key("properties") && m.get("additionalProperties") == Some(&Value::Bool(false)) {
        m.remove("additionalProperties");
    }
    if let Some(Value::String(f)) = m.get("format")
        && f.starts_with("uint")
    {
        m.insert("format".into(), json!("int64"));
    }
    if m.get("format").and_then(Value::as_str).is_some_and(|f| !matches!(f, "int32" | "int64" | "float" | "double")) {
        m.remove("format");
    }
    // `{}` (any value) carries no type: keep it free-form.
    if m.is_empty() {
        m.insert("x-kubernetes-preserve-unknown-fields".into(), Value::Bool(true));
        return m;
    }
    let mut out = Map::new();
    for (k, v) in m {
        let v = match (k.as_str(), v) {
            ("properties", Value::Object(props)) => {
                Value::Object(props.into_iter().map(|(name, s)| (name, structural(s))).collect())
            }
            ("items" | "additionalProperties", s @ (Value::Object(_) | Value::Bool(true))) => structural(s),
            ("anyOf" | "allOf" | "oneOf", Value::Array(alts)) => {
                Value::Array(alts.into_iter().map(structural).collect())
            }
            (_, v) => v,
        };
        out.insert(k, v);
    }
    out
}

/// What makes `schema` non-structural, each with the JSON path where it is.
pub fn violations(schema: &Value) -> Vec<String> {
    let mut out = Vec::new();
    walk(schema, "$", &mut out);
    out
}

fn walk(s: &Value, at: &str, out: &mut Vec<String>) {
    let Some(m) = s.as_object() else {
        out.push(format!("{at}: a schema must be an object"));
        return;
    };
    if m.contains_key("$ref") {
        out.push(format!("{at}: $ref is not allowed"));
    }
    let free = ["x-kubernetes-preserve-unknown-fields", "x-kubernetes-int-or-string"]
        .iter()
        .any(|k| m.get(*k) == Some(&Value::Bool(true)));
    if !m.contains_key("type") && !free {
        out.push(format!("{at}: no type"));
    }
    if m.contains_key("properties") && m.contains_key("additionalProperties") {
        out.push(format!("{at}: properties and additionalProperties together"));
    }
    if let Some(Value::Object(props)) = m.get("properties") {
        for (name, p) in props {
            walk(p, &format!("{at}.{name}"), out);
        }
    }
    for key in ["items", "additionalProperties"] {
        if let Some(sub @ Value::Object(_)) = m.get(key) {
            walk(sub, &format!("{at}.{key}"), out);
        }
    }
}

/// Checks `v` against a structural schema (type, properties, required, enum, items,
/// additionalProperties, free-form and int-or-string): what the API server's
/// validation would refuse, with the path. Enough to prove the generated schemas accept
/// the configs users write.
pub fn validate(schema: &Value, v: &Value, at: &str, out: &mut Vec<String>) {
    let Some(s) = schema.as_object() else { return };
    if s.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true)) && !s.contains_key("type") {
        return;
    }
    if s.get("x-kubernetes-int-or-string") == Some(&Value::Bool(true)) {
        if !(v.is_i64() || v.is_u64() || v.is_string()) {
            out.push(format!("{at}: must be an integer or a string"));
        }
        return;
    }
    if v.is_null() {
        if s.get("nullable") != Some(&Value::Bool(true)) {
            out.push(format!("{at}: must not be null"));
        }
        return;
    }
    let type_ok = match s.get("type").and_then(Value::as_str) {
        Some("object") => v.is_object(),
        Some("array") => v.is_array(),
        Some("string") => v.is_string(),
        Some("integer") => v.is_i64() || v.is_u64(),
        Some("number") => v.is_number(),
        Some("boolean") => v.is_boolean(),
        _ => true,
    };
    if !type_ok {
        out.push(format!("{at}: expected {}", s["type"]));
        return;
    }
    if let Some(Value::Array(allowed)) = s.get("enum")
        && !allowed.contains(v)
    {
        out.push(format!("{at}: {v} is not one of {}", Value::Array(allowed.clone())));
    }
    if let Value::Object(obj) = v {
        let props = s.get("properties").and_then(Value::as_object);
        if let Some(Value::Array(req)) = s.get("required") {
            for r in req.iter().filter_map(Value::as_str) {
                if !obj.contains_key(r) {
                    out.push(format!("{at}.{r}: required"));
                }
            }
        }
        for (k, child) in obj {
            match (props.and_then(|p| p.get(k)), s.get("additionalProperties")) {
                (Some(p), _) => validate(p, child, &format!("{at}.{k}"), out),
                (None, Some(ap @ Value::Object(_))) => validate(ap, child, &format!("{at}.{k}"), out),
                (None, _)
                    if props.is_some() && s.get("x-kubernetes-preserve-unknown-fields") != Some(&Value::Bool(true)) =>
                {
                    out.push(format!("{at}.{k}: unknown field"))
                }
                _ => {}
            }
        }
    }
    if let (Value::Array(items), Some(item_schema)) = (v, s.get("items")) {
        for (i, item) in items.iter().enumerate() {
            validate(item_schema, item, &format!("{at}[{i}]"), out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema_of(kind: &str) -> Value {
        let crd = all().into_iter().find(|c| c.spec.names.kind == kind).unwrap();
        serde_json::to_value(crd.spec.versions[0].schema.as_ref().unwrap().open_api_v3_schema.as_ref().unwrap())
            .unwrap()
    }

    #[test]
    fn every_schema_is_structural() {
        for crd in all() {
            for v in &crd.spec.versions {
                let schema =
                    serde_json::to_value(v.schema.as_ref().unwrap().open_api_v3_schema.as_ref().unwrap()).unwrap();
                let bad = violations(&schema);
                assert!(bad.is_empty(), "{} {}: {bad:#?}", crd.spec.names.kind, v.name);
            }
            assert_eq!(crd.spec.versions.iter().filter(|v| v.storage).count(), 1, "one storage version");
        }
    }

    /// Every seed config, as written, passes the CRD schema of its kind.
    #[test]
    fn the_reference_configs_pass_their_schemas() {
        let dir = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/seed"));
        let mut checked = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_none_or(|e| e != "yaml") {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            for doc in serde_yaml::Deserializer::from_str(&text) {
                let v: Value = serde::Deserialize::deserialize(doc).unwrap();
                let Some(kind) = v["kind"].as_str() else { continue };
                if !KINDS.iter().any(|k| k.kind == kind) {
                    continue; // a kind the mesh does not read
                }
                let mut errors = Vec::new();
                validate(&schema_of(kind), &json!({"spec": v["spec"]}), "$", &mut errors);
                assert!(errors.is_empty(), "{}: {errors:#?}", path.display());
                checked += 1;
            }
        }
        assert!(checked >= 10, "checked {checked} seed objects");
    }

    #[test]
    fn the_schemas_refuse_what_the_agent_refuses_for_its_shape() {
        let cases = [
            ("VirtualService", json!({"hosts": ["a"], "htpp": []}), "$.spec.htpp: unknown field"),
            ("VirtualService", json!({"hosts": "a"}), "$.spec.hosts: expected \"array\""),
            ("AuthorizationPolicy", json!({"action": "MAYBE"}), "$.spec.action: \"MAYBE\" is not one of"),
            ("PeerAuthentication", json!({"mtls": {"mode": "STRIKT"}}), "$.spec.mtls.mode: \"STRIKT\" is not one of"),
            ("DestinationRule", json!({"host": "a", "subsets": [{"labels": {}}]}), "$.spec.subsets[0].name: required"),
        ];
        for (kind, spec, want) in cases {
            let mut errors = Vec::new();
            validate(&schema_of(kind), &json!({ "spec": spec }), "$", &mut errors);
            assert!(errors.iter().any(|e| e.starts_with(want)), "{kind}: want {want:?} in {errors:#?}");
        }
    }
}

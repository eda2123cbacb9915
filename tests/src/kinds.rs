//! The built-in kinds an install of the mesh writes, as the API server describes and
//! checks them, so that a real `kubectl` can apply the manifests to the double:
//! discovery (`APIVersions`, `APIGroupList`, `APIResourceList`), OpenAPI v3 documents
//! whose PATCH and POST operations take `fieldValidation` (kubectl then leaves field
//! validation to the server, as against any API server since 1.27), and that
//! validation: the object is decoded into its Kubernetes type (k8s-openapi, generated
//! from the API's own OpenAPI), and a field the type does not declare or a value of the
//! wrong type is refused with its path, as `fieldValidation=Strict` refuses it.

use k8s_openapi::Resource;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

/// One kind.
pub struct Kind {
    /// API group (`""` for the core group).
    pub group: &'static str,
    /// Version.
    pub version: &'static str,
    /// Kind.
    pub kind: &'static str,
    /// Resource (plural).
    pub plural: &'static str,
    /// Namespaced or cluster-scoped.
    pub namespaced: bool,
    decode: fn(&Value) -> Result<(), Refusal>,
}

/// Why the API server refuses an object.
#[derive(Debug)]
pub enum Refusal {
    /// 400: fields the type does not declare, values of the wrong type.
    Decoding(Vec<String>),
    /// 422: the object decodes but breaks a validation rule.
    Invalid(Vec<String>),
}

impl Kind {
    fn of<T: Resource + DeserializeOwned>(namespaced: bool) -> Self {
        Kind {
            group: T::GROUP,
            version: T::VERSION,
            kind: T::KIND,
            plural: T::URL_PATH_SEGMENT,
            namespaced,
            decode: strictly::<T>,
        }
    }

    /// `/api/v1` or `/apis/<group>/<version>`.
    pub fn group_version_path(&self) -> String {
        if self.group.is_empty() {
            format!("/api/{}", self.version)
        } else {
            format!("/apis/{}/{}", self.group, self.version)
        }
    }

    /// `v1` or `<group>/<version>`.
    pub fn group_version(&self) -> String {
        if self.group.is_empty() { self.version.to_string() } else { format!("{}/{}", self.group, self.version) }
    }

    /// The collection path the double serves it on.
    pub fn collection(&self) -> String {
        format!("{}/{}", self.group_version_path(), self.plural)
    }

    /// Strict field validation (every field declared, every value of its type), then
    /// validation.
    pub fn validate(&self, object: &Value) -> Result<(), Refusal> {
        (self.decode)(object)
    }
}

/// The kinds `meshctl manifest generate` writes.
pub fn builtin() -> Vec<Kind> {
    use k8s_openapi::api::{apps::v1 as apps, core::v1 as core, rbac::v1 as rbac};
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1 as apiextensions;
    vec![
        Kind::of::<core::Namespace>(false),
        Kind::of::<core::ServiceAccount>(true),
        Kind::of::<core::ConfigMap>(true),
        Kind::of::<core::Secret>(true),
        Kind::of::<core::Service>(true),
        Kind::of::<core::Pod>(true),
        Kind::of::<apps::DaemonSet>(true),
        Kind::of::<apps::Deployment>(true),
        Kind::of::<rbac::ClusterRole>(false),
        Kind::of::<rbac::ClusterRoleBinding>(false),
        Kind::of::<rbac::Role>(true),
        Kind::of::<rbac::RoleBinding>(true),
        Kind::of::<apiextensions::CustomResourceDefinition>(false),
    ]
}

/// Decodes `object` as a `T`, collecting the fields `T` does not declare, then applies
/// the one rule beyond the schema that a node agent's manifest can break (the API
/// server's pod validation): Bidirectional mount propagation needs a privileged
/// container.
fn strictly<T: DeserializeOwned>(object: &Value) -> Result<(), Refusal> {
    let mut unknown = Vec::new();
    let decoded: Result<T, _> = serde_path_to_error::deserialize(serde_ignored::Deserializer::new(
        object.clone(),
        &mut |path: serde_ignored::Path<'_>| {
            unknown.push(format!("{}: field not declared in schema", field_path(&path.to_string())))
        },
    ));
    let mut problems = unknown;
    if let Err(e) = decoded {
        problems.push(format!(".{}: {}", e.path(), e.inner()));
    }
    if !problems.is_empty() {
        return Err(Refusal::Decoding(problems));
    }
    let pod = if object["kind"] == "Pod" { &object["spec"] } else { &object["spec"]["template"]["spec"] };
    let prefix = if object["kind"] == "Pod" { "spec" } else { "spec.template.spec" };
    for (i, c) in pod["containers"].as_array().into_iter().flatten().enumerate() {
        let privileged = c["securityContext"]["privileged"] == true;
        for (j, m) in c["volumeMounts"].as_array().into_iter().flatten().enumerate() {
            if m["mountPropagation"] == "Bidirectional" && !privileged {
                problems.push(format!(
                    "{prefix}.containers[{i}].volumeMounts[{j}].mountPropagation: Forbidden: \
                     Bidirectional mount propagation is available only to privileged containers"
                ));
            }
        }
    }
    if problems.is_empty() { Ok(()) } else { Err(Refusal::Invalid(problems)) }
}

/// `spec.?.containers.?.0.name` (serde_ignored's path) as the API server writes it:
/// `.spec.containers[0].name`.
fn field_path(path: &str) -> String {
    let mut out = String::new();
    for part in path.split('.').filter(|p| *p != "?") {
        if part.parse::<usize>().is_ok() {
            out.push_str(&format!("[{part}]"));
        } else {
            out.push('.');
            out.push_str(part);
        }
    }
    out
}

/// `GET /api`.
pub fn api_versions() -> Value {
    json!({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []})
}

/// `GET /apis`: the groups of `kinds`.
pub fn api_group_list(kinds: &[&Kind]) -> Value {
    let mut groups: Vec<(&str, &str)> =
        kinds.iter().filter(|k| !k.group.is_empty()).map(|k| (k.group, k.version)).collect();
    groups.sort();
    groups.dedup();
    let groups: Vec<Value> = groups
        .iter()
        .map(|(g, v)| {
            let gv = json!({"groupVersion": format!("{g}/{v}"), "version": v});
            json!({"name": g, "versions": [gv.clone()], "preferredVersion": gv})
        })
        .collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

/// The short names kubectl knows a resource by (`kubectl get deploy`), as the API
/// server's discovery lists them.
fn short_names(plural: &str) -> Vec<&'static str> {
    match plural {
        "deployments" => vec!["deploy"],
        "daemonsets" => vec!["ds"],
        "services" => vec!["svc"],
        "namespaces" => vec!["ns"],
        "configmaps" => vec!["cm"],
        "serviceaccounts" => vec!["sa"],
        "customresourcedefinitions" => vec!["crd", "crds"],
        _ => Vec::new(),
    }
}

/// `GET /api/v1` or `/apis/<group>/<version>`: the resources of `kinds` there.
pub fn api_resource_list(group_version: &str, kinds: &[&Kind]) -> Value {
    let resources: Vec<Value> = kinds
        .iter()
        .filter(|k| k.group_version() == group_version)
        .map(|k| {
            json!({
                "name": k.plural,
                "singularName": k.kind.to_lowercase(),
                "namespaced": k.namespaced,
                "kind": k.kind,
                "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"],
                "shortNames": short_names(k.plural),
            })
        })
        .collect();
    json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version, "resources": resources})
}

/// `GET /openapi/v3`: where each group version's document is.
pub fn openapi_root(kinds: &[&Kind]) -> Value {
    let paths: serde_json::Map<String, Value> = kinds
        .iter()
        .map(|k| {
            let key = k.group_version_path().trim_start_matches('/').to_string();
            let url = format!("/openapi/v3/{key}?hash=0");
            (key, json!({"serverRelativeURL": url}))
        })
        .collect();
    json!({"paths": paths})
}

/// `GET /openapi/v3/<group version path>`: for each kind, its object path with PATCH,
/// PUT and its collection with POST, each taking `dryRun`, `fieldManager` and
/// `fieldValidation`.
pub fn openapi_group_version(group_version: &str, kinds: &[&Kind]) -> Value {
    let params = json!([
        {"name": "dryRun", "in": "query", "schema": {"type": "string"}},
        {"name": "fieldManager", "in": "query", "schema": {"type": "string"}},
        {"name": "fieldValidation", "in": "query", "schema": {"type": "string"}},
        {"name": "force", "in": "query", "schema": {"type": "boolean"}},
    ]);
    let mut paths = serde_json::Map::new();
    for k in kinds.iter().filter(|k| k.group_version() == group_version) {
        let gvk = json!({"group": k.group, "version": k.version, "kind": k.kind});
        let op = json!({"x-kubernetes-group-version-kind": gvk, "parameters": params, "responses": {}});
        let scope = if k.namespaced { "/namespaces/{namespace}" } else { "" };
        let collection = format!("{}{scope}/{}", k.group_version_path(), k.plural);
        paths.insert(format!("{collection}/{{name}}"), json!({"patch": op, "put": op}));
        paths.insert(collection, json!({"post": op}));
    }
    json!({
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": "v1.32.4"},
        "paths": paths,
        "components": {"schemas": {}},
    })
}

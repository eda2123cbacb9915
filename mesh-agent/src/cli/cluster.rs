//! `meshctl` against a live cluster (the kubeconfig's current context, or the pod's
//! service account): `install` / `uninstall` by server-side apply (field manager
//! `meshctl`), `check` (`verify-install`), `proxy-status`, the objects `analyze
//! --cluster` reads, and the cluster half of `check --pre`.
//!
//! Invariants: install never takes over what it did not create (an existing namespace,
//! another owner's CRDs such as Istio's, a plug-in CA in `cacerts`), and uninstall
//! removes only what carries the mesh's label; key material is never printed.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod, Secret};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams, PostParams,
};
use serde::Deserialize;
use serde_json::Value;

use super::analyze::{self, Diagnostic};
use super::check::Finding;
use super::manifest::{self, AGENT, CA_SECRET, Values};
use crate::config::kube_source::KINDS;
use crate::config::{Object, parse_documents};
use crate::identity::{SECRET_REQUIRED_KEYS, SelfSignedRoot};

/// The label every object the mesh installs carries; uninstall removes only these.
pub(crate) const PART_OF: (&str, &str) = ("app.kubernetes.io/part-of", "mesh");
/// Field manager of server-side apply.
const FIELD_MANAGER: &str = "meshctl";

/// Errors of the cluster commands.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No kubeconfig and not in a pod.
    #[error(
        "no Kubernetes cluster configured ({0}); set KUBECONFIG or ~/.kube/config, or use --dry-run / \
         `meshctl manifest generate | kubectl apply -f -`"
    )]
    NoCluster(String),
    /// An API call failed.
    #[error("{action} {object}: {reason}{hint}")]
    Api {
        /// `apply`, `get`, `delete`, ...
        action: &'static str,
        /// `Kind namespace/name`.
        object: String,
        /// The API server's answer.
        reason: String,
        /// A fix, where the answer suggests one.
        hint: String,
    },
    /// The manifests hold an object of a kind this module cannot address.
    #[error("{0}: kind not known to meshctl")]
    UnknownKind(String),
    /// Generating the mesh CA failed.
    #[error("generating the mesh CA: {0}")]
    Ca(String),
}

pub(crate) fn api_error(action: &'static str, object: &str, e: kube::Error) -> Error {
    let (reason, hint) = match &e {
        kube::Error::Api(s) if s.code == 403 => (
            s.message.clone(),
            " (your kubeconfig user lacks this permission; meshctl install needs cluster-admin, as istioctl does)"
                .to_string(),
        ),
        kube::Error::Api(s) => (format!("{} ({})", s.message, s.code), String::new()),
        other => (other.to_string(), " (is the API server reachable? check `kubectl cluster-info`)".to_string()),
    };
    Error::Api { action, object: object.to_string(), reason, hint }
}

/// How long one agent may take to answer `proxy-status`.
const AGENT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// A client for `context` (default: the current one), with a command line's patience: bounded
/// timeouts and no minutes-long retrying of 503s (kube's default is a controller's).
pub async fn client(context: Option<&str>) -> Result<kube::Client, Error> {
    let mut config = match context {
        None => kube::Config::infer().await.map_err(|e| Error::NoCluster(e.to_string()))?,
        Some(c) => {
            let options = kube::config::KubeConfigOptions { context: Some(c.into()), ..Default::default() };
            kube::Config::from_kubeconfig(&options)
                .await
                .map_err(|e| Error::NoCluster(format!("--context {c}: {e}")))?
        }
    };
    config.default_retry = false;
    config.connect_timeout = Some(std::time::Duration::from_secs(10));
    config.read_timeout = Some(std::time::Duration::from_secs(60));
    kube::Client::try_from(config).map_err(|e| Error::NoCluster(e.to_string()))
}

/// What one step of install or uninstall did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Server-side applied.
    Applied,
    /// Created (the CA Secret).
    Created,
    /// Deleted.
    Deleted,
    /// Left as it is, and why.
    Kept(String),
    /// Not there to delete.
    Absent,
}

/// One object's step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// `Kind namespace/name`.
    pub object: String,
    /// What happened to it.
    pub action: Action,
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.action {
            Action::Applied => write!(f, "applied {}", self.object),
            Action::Created => write!(f, "created {}", self.object),
            Action::Deleted => write!(f, "deleted {}", self.object),
            Action::Kept(why) => write!(f, "kept {}: {why}", self.object),
            Action::Absent => write!(f, "{} was not there", self.object),
        }
    }
}

/// The REST resource of a kind the manifests use, and whether it is namespaced.
fn resource_of(api_version: &str, kind: &str) -> Option<(ApiResource, bool)> {
    let (plural, namespaced) = match kind {
        "Namespace" => ("namespaces", false),
        "ServiceAccount" => ("serviceaccounts", true),
        "ConfigMap" => ("configmaps", true),
        "Secret" => ("secrets", true),
        "Service" => ("services", true),
        "ClusterRole" => ("clusterroles", false),
        "ClusterRoleBinding" => ("clusterrolebindings", false),
        "Role" => ("roles", true),
        "RoleBinding" => ("rolebindings", true),
        "DaemonSet" => ("daemonsets", true),
        "Deployment" => ("deployments", true),
        "PodDisruptionBudget" => ("poddisruptionbudgets", true),
        "CustomResourceDefinition" => ("customresourcedefinitions", false),
        _ => return None,
    };
    let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
    let gvk = GroupVersionKind::gvk(group, version, kind);
    Some((ApiResource::from_gvk_with_plural(&gvk, plural), namespaced))
}

/// An installed object: its API, name and `Kind namespace/name`.
struct Target {
    api: Api<DynamicObject>,
    name: String,
    label: String,
}

/// `Kind namespace/name` (`Kind name` when cluster-scoped) of a manifest object.
pub fn describe(o: &Value) -> String {
    let kind = o["kind"].as_str().unwrap_or("?");
    let name = o["metadata"]["name"].as_str().unwrap_or("?");
    match o["metadata"]["namespace"].as_str() {
        Some(ns) => format!("{kind} {ns}/{name}"),
        None => format!("{kind} {name}"),
    }
}

fn target(client: &kube::Client, o: &Value) -> Result<Target, Error> {
    let kind = o["kind"].as_str().unwrap_or("");
    let name = o["metadata"]["name"].as_str().unwrap_or("").to_string();
    let (ar, namespaced) =
        resource_of(o["apiVersion"].as_str().unwrap_or(""), kind).ok_or_else(|| Error::UnknownKind(kind.into()))?;
    let api = match o["metadata"]["namespace"].as_str().filter(|_| namespaced) {
        Some(ns) => Api::namespaced_with(client.clone(), ns, &ar),
        None => Api::all_with(client.clone(), &ar),
    };
    Ok(Target { api, label: describe(o), name })
}

/// The first key of Istio's cacerts layout that `secret` lacks.
fn missing_ca_key(secret: &Secret) -> Option<&'static str> {
    let data = secret.data.as_ref();
    SECRET_REQUIRED_KEYS.into_iter().find(|k| data.is_none_or(|d| !d.contains_key(*k)))
}

fn is_ours(meta: &ObjectMeta) -> bool {
    meta.labels.as_ref().and_then(|l| l.get(PART_OF.0)).is_some_and(|v| v == PART_OF.1)
}

/// Applies the install for `values`: namespace, the CA Secret, then the rest in order.
pub async fn install(client: &kube::Client, values: &Values) -> Result<Vec<Step>, Error> {
    install_objects(client, values, manifest::objects(values)).await
}

/// Server-side applies the mesh's CustomResourceDefinitions alone (`install --crds`).
pub async fn install_crds(client: &kube::Client, values: &Values) -> Result<Vec<Step>, Error> {
    install_objects(client, values, manifest::crd_objects(values)).await
}

async fn install_objects(
    client: &kube::Client,
    values: &Values,
    objects: Vec<serde_json::Value>,
) -> Result<Vec<Step>, Error> {
    let mut steps = Vec::new();
    let params = PatchParams::apply(FIELD_MANAGER).force();
    for o in objects {
        let t = target(client, &o)?;
        let existing = t.api.get_opt(&t.name).await.map_err(|e| api_error("get", &t.label, e))?;
        let namespace = o["kind"] == "Namespace";
        let kept = match o["kind"].as_str() {
            // istio-system with Istio in it, say: used, not taken over (so uninstall
            // will not delete it).
            Some("Namespace") if existing.is_some() => Some("exists; used as it is"),
            Some("CustomResourceDefinition") if existing.as_ref().is_some_and(|e| !is_ours(&e.metadata)) => {
                Some("installed by another owner (Istio's own CRD?); the mesh reads it")
            }
            _ => None,
        };
        match kept {
            Some(why) => steps.push(Step { object: t.label, action: Action::Kept(why.into()) }),
            None => {
                t.api.patch(&t.name, &params, &Patch::Apply(&o)).await.map_err(|e| api_error("apply", &t.label, e))?;
                steps.push(Step { object: t.label, action: Action::Applied });
            }
        }
        if namespace {
            // Before the CA service and the DaemonSet: the CA reads the Secret, the
            // agents mount the roots.
            let (step, root) = ensure_ca(client, values).await?;
            steps.push(step);
            steps.push(publish_root(client, values, &root).await?);
        }
    }
    Ok(steps)
}

/// The roots of a `cacerts` Secret's data (`root-cert.pem`, else `ca-cert.pem`).
fn roots_of(data: &BTreeMap<String, ByteString>) -> String {
    let pick = data.get("root-cert.pem").or_else(|| data.get("ca-cert.pem"));
    pick.map(|b| String::from_utf8_lossy(&b.0).into_owned()).unwrap_or_default()
}

/// The `mesh-ca-root-cert` ConfigMap agents mount to trust the CA at start (the CA
/// service keeps it current afterwards).
async fn publish_root(client: &kube::Client, values: &Values, root: &str) -> Result<Step, Error> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), &values.namespace);
    let label = format!("ConfigMap {}/{}", values.namespace, manifest::ROOT_CONFIGMAP);
    let cm = ConfigMap {
        metadata: ObjectMeta {
            name: Some(manifest::ROOT_CONFIGMAP.into()),
            namespace: Some(values.namespace.clone()),
            labels: Some([(PART_OF.0.to_string(), PART_OF.1.to_string())].into()),
            ..Default::default()
        },
        data: Some([("root-cert.pem".to_string(), root.to_string())].into()),
        ..Default::default()
    };
    let mut json = serde_json::to_value(&cm).map_err(|e| Error::Ca(e.to_string()))?;
    json["apiVersion"] = "v1".into();
    json["kind"] = "ConfigMap".into();
    let params = PatchParams::apply(FIELD_MANAGER).force();
    api.patch(manifest::ROOT_CONFIGMAP, &params, &Patch::Apply(&json))
        .await
        .map_err(|e| api_error("apply", &label, e))?;
    Ok(Step { object: label, action: Action::Applied })
}

/// The `cacerts` Secret: a plug-in CA already there is used as it is; otherwise a new
/// self-signed root is created (never printed). Returns the roots agents must trust.
async fn ensure_ca(client: &kube::Client, values: &Values) -> Result<(Step, String), Error> {
    let api: Api<Secret> = Api::namespaced(client.clone(), &values.namespace);
    let label = format!("Secret {}/{CA_SECRET}", values.namespace);
    if let Some(existing) = api.get_opt(CA_SECRET).await.map_err(|e| api_error("get", &label, e))? {
        if let Some(missing) = missing_ca_key(&existing) {
            return Err(Error::Api {
                action: "use",
                object: label,
                reason: format!("it has no {missing} key, so the agents cannot issue certificates"),
                hint: " (a plug-in CA needs ca-cert.pem, ca-key.pem and optionally root-cert.pem, cert-chain.pem; \
                       or delete it to let meshctl create a self-signed root)"
                    .into(),
            });
        }
        let roots = roots_of(&existing.data.clone().unwrap_or_default());
        return Ok((Step { object: label, action: Action::Kept("plug-in CA present; used as it is".into()) }, roots));
    }
    let root = SelfSignedRoot::generate(&values.trust_domain).map_err(|e| Error::Ca(e.to_string()))?;
    let data: BTreeMap<String, ByteString> = root.secret_data().into_iter().map(|(k, v)| (k, ByteString(v))).collect();
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(CA_SECRET.into()),
            namespace: Some(values.namespace.clone()),
            labels: Some([(PART_OF.0.to_string(), PART_OF.1.to_string())].into()),
            ..Default::default()
        },
        type_: Some("Opaque".into()),
        data: Some(data),
        ..Default::default()
    };
    match api.create(&PostParams::default(), &secret).await {
        Ok(_) => Ok((Step { object: label, action: Action::Created }, root.cert_pem.clone())),
        // Created by someone else meanwhile: theirs wins.
        Err(kube::Error::Api(s)) if s.code == 409 => {
            let theirs = api.get(CA_SECRET).await.map_err(|e| api_error("get", &label, e))?;
            let roots = roots_of(&theirs.data.unwrap_or_default());
            Ok((Step { object: label, action: Action::Kept("created meanwhile by another client".into()) }, roots))
        }
        Err(e) => Err(api_error("create", &label, e)),
    }
}

/// Deletes what `install` applied, in reverse order. CRDs (and with them every custom
/// resource) go only with `purge`, and only the mesh's own; the namespace and the CA
/// Secret only if the mesh created them.
pub async fn uninstall(client: &kube::Client, values: &Values, purge: bool) -> Result<Vec<Step>, Error> {
    let mut steps = Vec::new();
    let mut objects = manifest::objects(values);
    objects.reverse();
    for o in objects {
        let t = target(client, &o)?;
        let Some(existing) = t.api.get_opt(&t.name).await.map_err(|e| api_error("get", &t.label, e))? else {
            steps.push(Step { object: t.label, action: Action::Absent });
            continue;
        };
        let kept = match o["kind"].as_str() {
            _ if !is_ours(&existing.metadata) => Some("not installed by the mesh".to_string()),
            Some("CustomResourceDefinition") if !purge => {
                Some("CRDs stay, and the configuration in them; --purge removes them".into())
            }
            _ => None,
        };
        // The generated CA goes with the mesh's own namespace, or with --purge.
        if o["kind"] == "Namespace" && (kept.is_none() || purge) {
            steps.push(delete_root(client, values).await?);
            steps.push(delete_ca(client, values).await?);
        }
        if let Some(why) = kept {
            steps.push(Step { object: t.label, action: Action::Kept(why) });
            continue;
        }
        t.api.delete(&t.name, &DeleteParams::default()).await.map_err(|e| api_error("delete", &t.label, e))?;
        steps.push(Step { object: t.label, action: Action::Deleted });
    }
    Ok(steps)
}

/// The root ConfigMap the mesh published.
async fn delete_root(client: &kube::Client, values: &Values) -> Result<Step, Error> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), &values.namespace);
    let label = format!("ConfigMap {}/{}", values.namespace, manifest::ROOT_CONFIGMAP);
    match api.get_opt(manifest::ROOT_CONFIGMAP).await.map_err(|e| api_error("get", &label, e))? {
        None => Ok(Step { object: label, action: Action::Absent }),
        Some(_) => {
            api.delete(manifest::ROOT_CONFIGMAP, &DeleteParams::default())
                .await
                .map_err(|e| api_error("delete", &label, e))?;
            Ok(Step { object: label, action: Action::Deleted })
        }
    }
}

/// The CA Secret goes only if meshctl generated it: a plug-in CA is the user's.
async fn delete_ca(client: &kube::Client, values: &Values) -> Result<Step, Error> {
    let api: Api<Secret> = Api::namespaced(client.clone(), &values.namespace);
    let label = format!("Secret {}/{CA_SECRET}", values.namespace);
    match api.get_opt(CA_SECRET).await.map_err(|e| api_error("get", &label, e))? {
        None => Ok(Step { object: label, action: Action::Absent }),
        Some(s) if !is_ours(&s.metadata) => {
            Ok(Step { object: label, action: Action::Kept("a plug-in CA, not generated by meshctl".into()) })
        }
        Some(_) => {
            api.delete(CA_SECRET, &DeleteParams::default()).await.map_err(|e| api_error("delete", &label, e))?;
            Ok(Step { object: label, action: Action::Deleted })
        }
    }
}

/// `meshctl check` / `verify-install`: every object of the install present, CRDs
/// established and serving what the agent reads, the CA usable, the DaemonSet rolled
/// out with an agent ready on every node, and agents at meshctl's version.
pub async fn verify(client: &kube::Client, values: &Values) -> Vec<Finding> {
    let mut out = Vec::new();
    match client.apiserver_version().await {
        Ok(v) => out.push(Finding::pass("Kubernetes API", format!("reachable, {}", v.git_version))),
        Err(e) => {
            out.push(Finding::fail(
                "Kubernetes API",
                format!("unreachable: {e}"),
                "check the kubeconfig context (`kubectl config current-context`) and `kubectl cluster-info`",
            ));
            return out;
        }
    }
    let mut missing = Vec::new();
    for o in manifest::objects(values).iter().filter(|o| o["kind"] != "CustomResourceDefinition") {
        match target(client, o) {
            Ok(t) => match t.api.get_opt(&t.name).await {
                Ok(Some(_)) => {}
                Ok(None) => missing.push(t.label),
                Err(e) => missing.push(format!("{} ({e})", t.label)),
            },
            Err(e) => missing.push(e.to_string()),
        }
    }
    out.push(if missing.is_empty() {
        Finding::pass("install objects", format!("all present in {}", values.namespace))
    } else {
        Finding::fail("install objects", format!("missing: {}", missing.join(", ")), "run `meshctl install`")
    });
    out.push(check_crds(client, values.crds).await);
    out.push(check_ca(client, &values.namespace).await);
    out.extend(check_agents(client, &values.namespace).await);
    out
}

/// CRDs of the kinds the agent reads. Without the mesh's own CRDs (profile minimal),
/// only Istio's are required: a missing Linkerd or SMI CRD means none of that kind.
async fn check_crds(client: &kube::Client, mesh_crds: bool) -> Finding {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let mut problems = Vec::new();
    let mut absent = Vec::new();
    // The watched kinds that come from CRDs: those the mesh has a CRD of.
    let mesh_crds_of = super::crds::all();
    let from_crds = KINDS
        .iter()
        .filter(|k| mesh_crds_of.iter().any(|c| c.spec.group == k.group && c.spec.names.plural == k.plural));
    for k in from_crds {
        let name = format!("{}.{}", k.plural, k.group);
        let required = mesh_crds || k.group.ends_with(".istio.io");
        match api.get_opt(&name).await {
            Ok(Some(crd)) => {
                let established = crd
                    .status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|c| c.iter().any(|c| c.type_ == "Established" && c.status == "True"));
                let serves = crd.spec.versions.iter().any(|v| v.served && k.versions().any(|r| r == v.name));
                if !established {
                    problems.push(format!("{name} is not Established yet"));
                } else if !serves {
                    let read: Vec<&str> = k.versions().collect();
                    problems.push(format!("{name} serves none of {} (the versions the agent reads)", read.join(", ")));
                }
            }
            Ok(None) if required => problems.push(format!("{name} is not installed")),
            Ok(None) => absent.push(name),
            Err(e) => problems.push(format!("{name}: {e}")),
        }
    }
    if problems.is_empty() && absent.is_empty() {
        Finding::pass("CRDs", "every API group the mesh reads is served")
    } else if problems.is_empty() {
        Finding::pass("CRDs", format!("served; not installed (so none read): {}", absent.join(", ")))
    } else {
        Finding::fail(
            "CRDs",
            problems.join("; "),
            "install them with `meshctl install` (profile default), or Istio's/Linkerd's own CRDs",
        )
    }
}

async fn check_ca(client: &kube::Client, namespace: &str) -> Finding {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    match api.get_opt(CA_SECRET).await {
        Ok(Some(s)) => match missing_ca_key(&s) {
            None => Finding::pass("mesh CA", format!("Secret {namespace}/{CA_SECRET} has ca-cert.pem and ca-key.pem")),
            Some(k) => Finding::fail(
                "mesh CA",
                format!("Secret {namespace}/{CA_SECRET} has no {k}"),
                "recreate it in Istio's cacerts layout (ca-cert.pem, ca-key.pem, root-cert.pem, cert-chain.pem)",
            ),
        },
        Ok(None) => Finding::fail(
            "mesh CA",
            format!("Secret {namespace}/{CA_SECRET} does not exist: agents wait for it"),
            "run `meshctl install` (creates a self-signed root) or create a plug-in CA Secret",
        ),
        Err(e) => Finding::fail("mesh CA", format!("cannot read Secret {namespace}/{CA_SECRET}: {e}"), "check RBAC"),
    }
}

fn image_tag(pod: &Pod) -> Option<String> {
    let image = pod.spec.as_ref()?.containers.iter().find(|c| c.name == AGENT)?.image.clone()?;
    let tail = image.rsplit('/').next().unwrap_or(&image);
    tail.split_once(':').map(|(_, tag)| tag.split('@').next().unwrap_or(tag).to_string())
}

fn pod_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

async fn agent_pods(client: &kube::Client, namespace: &str) -> Result<Vec<Pod>, kube::Error> {
    let api: Api<Pod> = Api::namespaced(client.clone(), namespace);
    Ok(api.list(&ListParams::default().labels(&format!("app={AGENT}"))).await?.items)
}

async fn check_agents(client: &kube::Client, namespace: &str) -> Vec<Finding> {
    let mut out = Vec::new();
    let ds_api: Api<DaemonSet> = Api::namespaced(client.clone(), namespace);
    match ds_api.get_opt(AGENT).await {
        Ok(Some(ds)) => {
            let st = ds.status.unwrap_or_default();
            let generation = ds.metadata.generation.unwrap_or(0);
            let updated = st.updated_number_scheduled.unwrap_or(0);
            let current = st.observed_generation.unwrap_or(0) >= generation;
            if current
                && st.desired_number_scheduled > 0
                && st.number_ready == st.desired_number_scheduled
                && updated == st.desired_number_scheduled
            {
                out.push(Finding::pass(
                    "agent DaemonSet",
                    format!("{}/{} ready and up to date", st.number_ready, st.desired_number_scheduled),
                ));
            } else {
                out.push(Finding::fail(
                    "agent DaemonSet",
                    format!(
                        "{} desired, {} ready, {updated} updated{}",
                        st.desired_number_scheduled,
                        st.number_ready,
                        if current { "" } else { ", rollout not yet observed" }
                    ),
                    format!("kubectl -n {namespace} rollout status daemonset/{AGENT}; kubectl -n {namespace} describe daemonset/{AGENT}"),
                ));
            }
        }
        Ok(None) => {
            out.push(Finding::fail(
                "agent DaemonSet",
                format!("{namespace}/{AGENT} does not exist"),
                "run `meshctl install`",
            ));
            return out;
        }
        Err(e) => {
            out.push(Finding::fail("agent DaemonSet", e.to_string(), "check RBAC and the namespace (-i)"));
            return out;
        }
    }
    let (nodes, pods) = match (
        Api::<Node>::all(client.clone()).list(&ListParams::default()).await,
        agent_pods(client, namespace).await,
    ) {
        (Ok(n), Ok(p)) => (n.items, p),
        (Err(e), _) | (_, Err(e)) => {
            out.push(Finding::fail("agents on nodes", e.to_string(), "check RBAC (list nodes, list pods)"));
            return out;
        }
    };
    let on_node = |node: &str| pods.iter().find(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node));
    let mut without = Vec::new();
    for n in &nodes {
        let name = n.metadata.name.clone().unwrap_or_default();
        match on_node(&name) {
            Some(p) if pod_ready(p) => {}
            Some(p) => {
                without.push(format!("{name} (agent {} not ready)", p.metadata.name.clone().unwrap_or_default()))
            }
            None => without.push(format!("{name} (no agent)")),
        }
    }
    out.push(if without.is_empty() {
        Finding::pass("agents on nodes", format!("a ready agent on each of {} node(s)", nodes.len()))
    } else {
        Finding::fail(
            "agents on nodes",
            without.join(", "),
            format!("kubectl -n {namespace} get pods -l app={AGENT} -o wide; `meshctl check --pre` on those nodes"),
        )
    });
    let mine = env!("CARGO_PKG_VERSION");
    let other: Vec<String> = pods
        .iter()
        .filter_map(|p| {
            let tag = image_tag(p)?;
            (tag != mine).then(|| format!("{} runs {tag}", p.metadata.name.clone().unwrap_or_default()))
        })
        .collect();
    out.push(if other.is_empty() {
        Finding::pass("versions", format!("agents and meshctl at {mine}"))
    } else {
        Finding::fail(
            "versions",
            format!("meshctl is {mine}; {}", other.join(", ")),
            format!("upgrade with `meshctl install` (meshctl {mine}), or use the meshctl of the agents' version"),
        )
    });
    out
}

/// What an agent reports on `/sync_status`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct SyncStatus {
    /// Its node.
    pub node: String,
    /// Its version.
    pub agent_version: String,
    /// Serving every local pod.
    pub ready: bool,
    /// Config changes applied since start.
    pub version: u64,
    /// Digest of the config in force.
    pub config_digest: String,
    /// Pods enrolled on its node.
    pub enrolled_pods: usize,
    /// Pods of its node it should capture and cannot, with why (agents before this
    /// field report none).
    #[serde(default)]
    pub failed_pods: Vec<FailedPod>,
    /// Objects it refuses.
    pub rejected_config: usize,
    /// The mesh's other clusters it follows (agents before this field report none).
    #[serde(default)]
    pub remote_clusters: Vec<RemoteClusterReport>,
}

/// Where an agent stands with one of the mesh's other clusters.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct RemoteClusterReport {
    /// The cluster's name.
    pub cluster: String,
    /// Every kind of it listed: its Services are in the agent's config.
    pub synced: bool,
    /// Why it is not followed, or why its API server does not answer now.
    #[serde(default)]
    pub error: Option<String>,
    /// Its Services held.
    pub services: usize,
    /// Its pods held.
    pub pods: usize,
}

impl RemoteClusterReport {
    /// `SYNCED`; `STALE` while its API server does not answer (the last state serves);
    /// `NOT SYNCED` before it was listed or when it cannot be followed.
    pub fn state(&self) -> &'static str {
        match (self.synced, &self.error) {
            (true, None) => "SYNCED",
            (true, Some(_)) => "STALE",
            (false, _) => "NOT SYNCED",
        }
    }
}

/// A pod an agent should capture and cannot.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct FailedPod {
    /// `namespace/name`.
    pub pod: String,
    /// `metadata.uid`.
    pub uid: String,
    /// Why.
    #[serde(default)]
    pub reason: String,
}

/// One agent's line of `meshctl proxy-status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentStatus {
    /// Agent pod name.
    pub pod: String,
    /// Its node.
    pub node: String,
    /// What it reported, or why it could not be asked.
    pub report: Result<SyncStatus, String>,
    /// How its config compares with the other agents'.
    pub state: SyncState,
}

/// An agent's state in `meshctl proxy-status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncState {
    /// Serving the config most agents hold.
    Synced,
    /// Serving another config.
    Stale,
    /// Answered, but does not serve every local pod (not ready yet, or a pod it
    /// should capture failed).
    NotReady,
    /// Did not answer.
    Unreachable,
}

impl std::fmt::Display for SyncState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SyncState::Synced => "SYNCED",
            SyncState::Stale => "STALE",
            SyncState::NotReady => "NOT READY",
            SyncState::Unreachable => "UNREACHABLE",
        })
    }
}

/// Asks every agent for its sync status through the API server's pod proxy and
/// compares their config digests: an agent whose digest differs from the one most
/// agents hold is `STALE`.
pub async fn proxy_status(client: &kube::Client, namespace: &str) -> Result<Vec<AgentStatus>, Error> {
    let pods = agent_pods(client, namespace)
        .await
        .map_err(|e| api_error("list", &format!("Pods {namespace} app={AGENT}"), e))?;
    // Asked all at once: a cluster's worth of agents, each bounded by AGENT_TIMEOUT.
    let asks = pods.into_iter().map(|p| async move {
        let pod = p.metadata.name.clone().unwrap_or_default();
        let node = p.spec.as_ref().and_then(|s| s.node_name.clone()).unwrap_or_default();
        let port = p
            .spec
            .as_ref()
            .and_then(|s| s.containers.iter().find(|c| c.name == AGENT))
            .and_then(|c| c.ports.as_ref()?.iter().find(|p| p.name.as_deref() == Some("http-metrics")))
            .map_or(15020, |p| p.container_port);
        let uri = format!("/api/v1/namespaces/{namespace}/pods/{pod}:{port}/proxy/sync_status");
        let report = match http::Request::get(&uri).body(Vec::new()) {
            Ok(req) => match tokio::time::timeout(AGENT_TIMEOUT, client.request::<SyncStatus>(req)).await {
                Ok(r) => r.map_err(|e| e.to_string()),
                Err(_) => Err(format!("no answer within {}s", AGENT_TIMEOUT.as_secs())),
            },
            Err(e) => Err(e.to_string()),
        };
        AgentStatus { pod, node, report, state: SyncState::Unreachable }
    });
    let mut rows = futures::future::join_all(asks).await;
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for r in rows.iter().filter_map(|r| r.report.as_ref().ok()) {
        *counts.entry(r.config_digest.as_str()).or_default() += 1;
    }
    let majority = counts.iter().max_by_key(|(_, n)| **n).map(|(d, _)| d.to_string());
    for r in &mut rows {
        r.state = match &r.report {
            Err(_) => SyncState::Unreachable,
            Ok(s) if !s.ready || !s.failed_pods.is_empty() => SyncState::NotReady,
            Ok(s) if Some(&s.config_digest) == majority.as_ref() => SyncState::Synced,
            Ok(_) => SyncState::Stale,
        };
    }
    Ok(rows)
}

/// `meshctl analyze --cluster`: every object of the kinds the agent watches, read and
/// validated as the agent does (each refused one reported), then analyzed together.
pub async fn analyze_cluster(client: &kube::Client, mesh: &crate::state::MeshScope) -> Result<Vec<Diagnostic>, Error> {
    let mut objects: Vec<Object> = Vec::new();
    let mut found = Vec::new();
    for k in KINDS {
        let mut served = None;
        for version in k.versions() {
            match k.api_at(client.clone(), version).list(&ListParams::default()).await {
                Ok(l) => {
                    served = Some((version, l));
                    break;
                }
                // This version is not served: try the next, then none of this kind.
                Err(kube::Error::Api(s)) if s.code == 404 => continue,
                Err(e) => return Err(api_error("list", k.plural, e)),
            }
        }
        let Some((version, list)) = served else { continue };
        for o in list.items {
            match parse_documents(std::path::Path::new("cluster"), &k.to_json_at(o, version)) {
                Ok(parsed) => objects.extend(parsed),
                Err(e) => found.push(analyze::refused(&e, "cluster")),
            }
        }
    }
    // NetworkPolicies: the agent does not watch them; read here for what they close.
    let policies = Api::<k8s_openapi::api::networking::v1::NetworkPolicy>::all(client.clone());
    match policies.list(&ListParams::default()).await {
        Ok(list) => {
            for np in list.items {
                let json = serde_json::to_string(&np).unwrap_or_default();
                match parse_documents(std::path::Path::new("cluster"), &json) {
                    Ok(parsed) => objects.extend(parsed),
                    Err(e) => found.push(analyze::refused(&e, "cluster")),
                }
            }
        }
        // Not served, or not readable by this user: nothing to say about them.
        Err(kube::Error::Api(s)) if s.code == 404 || s.code == 403 => {}
        Err(e) => return Err(api_error("list", "networkpolicies", e)),
    }
    Ok(analyze::analyze_objects(&objects, mesh, found))
}

/// The cluster half of `meshctl check --pre`: the API server's version, and the kernel
/// of every node (as the kubelet reports it) against what the agent needs.
pub async fn preflight(client: &kube::Client) -> Vec<Finding> {
    let mut out = Vec::new();
    match client.apiserver_version().await {
        Ok(v) => {
            let minor: u32 = v.minor.trim_end_matches('+').parse().unwrap_or(0);
            out.push(if v.major == "1" && minor >= 26 {
                Finding::pass("Kubernetes version", format!("{} (1.26 or later needed)", v.git_version))
            } else {
                Finding::fail(
                    "Kubernetes version",
                    format!("{} is older than 1.26", v.git_version),
                    "upgrade the cluster: the mesh needs discovery.k8s.io/v1 EndpointSlices and policy/v1",
                )
            });
        }
        Err(e) => {
            out.push(Finding::fail("Kubernetes API", format!("unreachable: {e}"), "check `kubectl cluster-info`"));
            return out;
        }
    }
    match Api::<Node>::all(client.clone()).list(&ListParams::default()).await {
        Ok(nodes) => {
            for n in nodes.items {
                let name = n.metadata.name.clone().unwrap_or_default();
                let info = n.status.and_then(|s| s.node_info);
                let kernel = info.as_ref().map(|i| i.kernel_version.clone()).unwrap_or_default();
                let what = "node kernel";
                out.push(match super::check::parse_release(&kernel) {
                    Some(v) if v >= super::check::MIN_KERNEL => Finding::pass(what, format!("{name}: {kernel}")),
                    Some(_) => Finding::fail(
                        what,
                        format!(
                            "{name}: {kernel} is older than {}.{}",
                            super::check::MIN_KERNEL.0,
                            super::check::MIN_KERNEL.1
                        ),
                        "use nodes with a newer kernel (cgroup sock_addr, sk_lookup and BTF are needed)",
                    ),
                    None => Finding::fail(
                        what,
                        format!("{name}: kernel version {kernel:?} not reported"),
                        "check the node's kubelet",
                    ),
                });
            }
        }
        Err(e) => out.push(Finding::fail("nodes", e.to_string(), "check RBAC (list nodes)")),
    }
    out
}

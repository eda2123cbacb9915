//! The Kubernetes manifests of an install, built from typed k8s-openapi objects (so a
//! field the API does not have cannot be written) for a profile and `--set` values,
//! as `istioctl install --set profile=... --set values...` takes them.
//!
//! Least privilege by construction: no hostNetwork, no privileged mode; the agent gets
//! exactly the capabilities it uses, read-only RBAC on what it watches, and read
//! access to one Secret (the mesh CA) by name.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    DaemonSet, DaemonSetSpec, DaemonSetUpdateStrategy, Deployment, DeploymentSpec, RollingUpdateDaemonSet,
};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMap, ConfigMapEnvSource, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource,
    EnvFromSource, EnvVar, EnvVarSource, HTTPGetAction, HostPathVolumeSource, Namespace, ObjectFieldSelector, PodSpec,
    PodTemplateSpec, Probe, ProjectedVolumeSource, ResourceRequirements, SeccompProfile, SecurityContext, Service,
    ServiceAccount, ServiceAccountTokenProjection, ServicePort, ServiceSpec, TCPSocketAction, Toleration, Volume,
    VolumeMount, VolumeProjection,
};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::crds;

pub mod gateways;

/// Name of the agent's DaemonSet, ServiceAccount, roles and ConfigMap.
pub const AGENT: &str = "mesh-agent";
/// The Secret holding the mesh CA (Istio's plug-in CA layout: `ca-cert.pem`, ...),
/// read by the CA service alone.
pub const CA_SECRET: &str = "cacerts";
/// Name of the CA service's Deployment, Service, ServiceAccount and roles.
pub const CA: &str = "mesh-ca";
/// The ConfigMap the CA publishes the mesh's roots in (`root-cert.pem`), which agents
/// mount to trust the CA at start.
pub const ROOT_CONFIGMAP: &str = "mesh-ca-root-cert";
/// The audience of the agents' projected tokens for the CA.
pub const CA_AUDIENCE: &str = "mesh-ca";
/// The ClusterRole a metrics scraper's account needs (`get` on `/metrics`).
pub const METRICS_READER: &str = "mesh-metrics-reader";

/// Errors of manifest generation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// A `--set` without `=`.
    #[error("--set {0:?}: expected key=value")]
    NotKeyValue(String),
    /// A key no profile reads.
    #[error("--set {key}: unknown key{hint}; known keys: {known}")]
    UnknownKey {
        /// The key.
        key: String,
        /// ` (did you mean X?)` when one is close.
        hint: String,
        /// Every key.
        known: String,
    },
    /// A value of the wrong shape.
    #[error("--set {key}={value}: {reason}")]
    BadValue {
        /// The key.
        key: String,
        /// The value.
        value: String,
        /// Why.
        reason: String,
    },
    /// An IstioOperator file (`-f`) that cannot be read as one, or one of its fields.
    #[error("{file}: {field}: {reason}")]
    Operator {
        /// The file as given.
        file: String,
        /// The field, e.g. `spec.values.global.network`.
        field: String,
        /// Why.
        reason: String,
    },
}

/// One value and where it was said: a `--set`, or a field of an IstioOperator file.
struct Said {
    key: String,
    value: String,
    /// (file, field) for a value from a file.
    from: Option<(String, String)>,
}

impl Said {
    /// `e`, which `--set` would word as its own, worded for the file's field instead.
    fn locate(&self, e: Error) -> Error {
        let Some((file, field)) = &self.from else { return e };
        let reason = match e {
            Error::UnknownKey { hint, .. } => format!("not a value meshctl reads{hint}"),
            Error::BadValue { value, reason, .. } => format!("{value:?}: {reason}"),
            other => other.to_string(),
        };
        Error::Operator { file: file.clone(), field: field.clone(), reason }
    }
}

/// The apiVersion and kind of the IstioOperator files `-f` takes.
const OPERATOR_API: (&str, &str) = ("install.istio.io/v1alpha1", "IstioOperator");

/// The values an IstioOperator file `file` (its text `yaml`) says, as `--set` keys:
/// `spec.profile`, `spec.hub`, `spec.tag`, `spec.namespace`, and every scalar under
/// `spec.values` and `spec.meshConfig` (`spec.values.global.network` is
/// `values.global.network`).
fn operator_values(file: &str, yaml: &str) -> Result<Vec<Said>, Error> {
    let at = |field: &str, reason: String| Error::Operator { file: file.into(), field: field.into(), reason };
    let doc: serde_yaml::Value = serde_yaml::from_str(yaml).map_err(|e| at("(document)", e.to_string()))?;
    for (field, want) in [("apiVersion", OPERATOR_API.0), ("kind", OPERATOR_API.1)] {
        let got = doc.get(field).and_then(serde_yaml::Value::as_str);
        if got != Some(want) {
            return Err(at(field, format!("expected {want}, found {}", got.unwrap_or("nothing"))));
        }
    }
    let mut said = Vec::new();
    let Some(spec) = doc.get("spec").filter(|s| !s.is_null()) else { return Ok(said) };
    let spec = spec.as_mapping().ok_or_else(|| at("spec", "expected a mapping".into()))?;
    for (k, v) in spec {
        let k = k.as_str().unwrap_or_default();
        let field = format!("spec.{k}");
        let key = match k {
            "profile" => "profile",
            "hub" => "values.global.hub",
            "tag" => "values.global.tag",
            "namespace" => "values.global.istioNamespace",
            "values" | "meshConfig" => {
                flatten(file, k, &field, v, &mut said)?;
                continue;
            }
            _ => {
                return Err(at(
                    &field,
                    "not read by meshctl, which takes spec.profile, spec.hub, spec.tag, spec.namespace, spec.values \
                     and spec.meshConfig"
                        .into(),
                ));
            }
        };
        let value = scalar(v).ok_or_else(|| at(&field, "expected a single value".into()))?;
        said.push(Said { key: key.into(), value, from: Some((file.into(), field)) });
    }
    Ok(said)
}

/// Every scalar under `v` as `key.sub.key` (the file's `field.sub.key`).
fn flatten(file: &str, key: &str, field: &str, v: &serde_yaml::Value, said: &mut Vec<Said>) -> Result<(), Error> {
    let at = |reason: &str| Error::Operator { file: file.into(), field: field.into(), reason: reason.into() };
    match v {
        serde_yaml::Value::Null => Ok(()),
        serde_yaml::Value::Mapping(m) => {
            for (k, sub) in m {
                let k = k.as_str().ok_or_else(|| at("a key that is not a string"))?;
                flatten(file, &format!("{key}.{k}"), &format!("{field}.{k}"), sub, said)?;
            }
            Ok(())
        }
        other => {
            let value = scalar(other).ok_or_else(|| at("a list; meshctl's values are single values"))?;
            said.push(Said { key: key.into(), value, from: Some((file.into(), field.into())) });
            Ok(())
        }
    }
}

/// A YAML scalar as `--set` would write it.
fn scalar(v: &serde_yaml::Value) -> Option<String> {
    match v {
        serde_yaml::Value::String(s) => Some(s.clone()),
        serde_yaml::Value::Bool(b) => Some(b.to_string()),
        serde_yaml::Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// A name for a cluster, network or mesh: letters, digits, `-`, `_` and `.`, starting
/// and ending with a letter or digit, at most 63 (it becomes a label value and a
/// metric label).
fn mesh_name(value: &str) -> Result<String, String> {
    let ok = !value.is_empty()
        && value.len() <= 63
        && value.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && value.starts_with(|c: char| c.is_ascii_alphanumeric())
        && value.ends_with(|c: char| c.is_ascii_alphanumeric());
    if ok {
        Ok(value.into())
    } else {
        Err("at most 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit".into())
    }
}

/// An install profile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    /// The agent only (CRDs come from an existing Istio/Linkerd install).
    Minimal,
    /// The agent, the CRDs of every API group it reads, a metrics Service.
    Default,
    /// Default with debug logging and small requests, for trying it out.
    Demo,
}

impl Profile {
    /// Every profile, by name.
    pub const ALL: [(&'static str, Profile); 3] =
        [("minimal", Profile::Minimal), ("default", Profile::Default), ("demo", Profile::Demo)];
}

/// What the manifests are made from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Values {
    /// The profile the rest defaults from.
    pub profile: Profile,
    /// Namespace of the agent (`values.global.istioNamespace`).
    pub namespace: String,
    /// Image registry (`values.global.hub`).
    pub hub: String,
    /// Image tag (`values.global.tag`).
    pub tag: String,
    /// Agent log filter (`values.global.logging.level`).
    pub log_level: String,
    /// `meshConfig.trustDomain`.
    pub trust_domain: String,
    /// `meshConfig.rootNamespace`.
    pub root_namespace: String,
    /// `meshConfig.outboundTrafficPolicy.mode`: `ALLOW_ANY` or `REGISTRY_ONLY`.
    pub outbound_traffic_policy: String,
    /// `values.cni.ambient.dnsCapture`: `true` or `false`, whether enrolled pods' DNS
    /// goes to the agents' DNS proxies where their namespace or pod does not say.
    pub dns_capture: String,
    /// Workload certificate lifetime (`values.global.workloadCertTtl`).
    pub cert_ttl: String,
    /// `values.global.proxy.resources.{requests,limits}.{cpu,memory}`.
    pub resources: BTreeMap<(String, String), String>,
    /// Whether the CRDs are part of the manifests (`values.base.enableCRDs`).
    pub crds: bool,
    /// Whether a Service exposes the agents' metrics port (`values.telemetry.enabled`).
    pub metrics_service: bool,
    /// The gateways installed: the ingress gateway from `default` on, the egress
    /// gateway in `demo`, as Istio's profiles have them.
    pub gateways: Vec<gateways::GatewaySpec>,
    /// Access log (`meshConfig.accessLogFile` `/dev/stdout` or empty, with
    /// `meshConfig.accessLogEncoding`): `off`, `text` or `json`. On in `demo`, as Istio's
    /// demo profile has it.
    pub access_log: String,
    /// Where agents export spans over OTLP (`values.telemetry.tracing.endpoint`,
    /// `grpc://host:port` or `http://host:port`); empty: not traced. `demo` points at
    /// the Jaeger of `deploy/addons`.
    pub trace_endpoint: String,
    /// Percent of new traces sampled (`meshConfig.defaultConfig.tracing.sampling`);
    /// empty: the agent's default (1).
    pub trace_sampling: String,
    /// The mesh's id (`values.global.meshID`); empty: the trust domain.
    pub mesh_id: String,
    /// This cluster's name (`values.global.multiCluster.clusterName`), which metrics
    /// report as `source_cluster`/`destination_cluster`.
    pub cluster_name: String,
    /// The network of this cluster's pods (`values.global.network`); empty: none named.
    pub network: String,
}

impl Values {
    /// The values of `profile` before any `--set`.
    pub fn for_profile(profile: Profile) -> Self {
        let (log_level, req_cpu, req_mem) = match profile {
            Profile::Demo => ("info,mesh_agent=debug", "10m", "40Mi"),
            _ => ("info", "50m", "64Mi"),
        };
        let resources = [
            (("requests", "cpu"), req_cpu),
            (("requests", "memory"), req_mem),
            (("limits", "cpu"), "2"),
            (("limits", "memory"), "512Mi"),
        ]
        .into_iter()
        .map(|((a, b), v)| ((a.to_string(), b.to_string()), v.to_string()))
        .collect();
        Values {
            profile,
            namespace: "istio-system".into(),
            hub: "ghcr.io/example/mesh".into(),
            tag: env!("CARGO_PKG_VERSION").into(),
            log_level: log_level.into(),
            trust_domain: "cluster.local".into(),
            root_namespace: "istio-system".into(),
            outbound_traffic_policy: "ALLOW_ANY".into(),
            dns_capture: "false".into(),
            cert_ttl: "24h".into(),
            resources,
            crds: profile != Profile::Minimal,
            metrics_service: profile != Profile::Minimal,
            gateways: match profile {
                Profile::Minimal => Vec::new(),
                Profile::Default => vec![gateways::INGRESS],
                Profile::Demo => vec![gateways::INGRESS, gateways::EGRESS],
            },
            access_log: if profile == Profile::Demo { "text" } else { "off" }.into(),
            trace_endpoint: if profile == Profile::Demo { DEMO_TRACE_ENDPOINT } else { "" }.into(),
            trace_sampling: if profile == Profile::Demo { "100" } else { "" }.into(),
            mesh_id: String::new(),
            cluster_name: crate::state::DEFAULT_CLUSTER_ID.into(),
            network: String::new(),
        }
    }

    /// Values from `--set key=value` arguments; `profile=` is read first, whatever
    /// its position, so the other keys override the profile's defaults.
    pub fn from_sets(sets: &[String]) -> Result<Self, Error> {
        Self::from_sources(&[], sets)
    }

    /// Values from IstioOperator files (`-f`: each a file name and its text) and then
    /// `--set` arguments, which override the files as with istioctl; the last
    /// `profile` said is read first.
    pub fn from_sources(operators: &[(String, String)], sets: &[String]) -> Result<Self, Error> {
        let mut said = Vec::new();
        for (file, yaml) in operators {
            said.extend(operator_values(file, yaml)?);
        }
        for s in sets {
            let (k, v) = s.split_once('=').ok_or_else(|| Error::NotKeyValue(s.clone()))?;
            said.push(Said { key: k.trim().to_string(), value: v.trim().to_string(), from: None });
        }
        let profile = match said.iter().rev().find(|s| s.key == "profile") {
            None => Profile::Default,
            Some(s) => Profile::ALL.iter().find(|(n, _)| *n == s.value).map(|(_, p)| *p).ok_or_else(|| {
                s.locate(Error::BadValue {
                    key: "profile".into(),
                    value: s.value.clone(),
                    reason: "profiles are minimal, default and demo".into(),
                })
            })?,
        };
        let mut values = Values::for_profile(profile);
        for s in said.into_iter().filter(|s| s.key != "profile") {
            values.set(&s.key, s.value.clone()).map_err(|e| s.locate(e))?;
        }
        Ok(values)
    }

    fn set(&mut self, key: &str, value: String) -> Result<(), Error> {
        let bad = |reason: &str| Error::BadValue { key: key.into(), value: value.clone(), reason: reason.into() };
        let boolean = |v: &str| match v {
            "true" => Ok(true),
            "false" => Ok(false),
            _ => Err(bad("expected true or false")),
        };
        if let Some(rest) = key.strip_prefix("values.global.proxy.resources.")
            && let Some((kind, resource)) = rest.split_once('.')
            && matches!(kind, "requests" | "limits")
            && matches!(resource, "cpu" | "memory")
        {
            if !is_quantity(&value) {
                return Err(bad("not a Kubernetes quantity (e.g. 100m, 0.5, 128Mi, 1Gi)"));
            }
            self.resources.insert((kind.to_string(), resource.to_string()), value);
            return Ok(());
        }
        match key {
            "values.global.istioNamespace" => self.namespace = dns_label(&value).map_err(|r| bad(&r))?,
            "values.global.hub" => self.hub = value,
            "values.global.tag" => self.tag = value,
            "values.global.logging.level" => self.log_level = value,
            "meshConfig.trustDomain" => {
                self.trust_domain = crate::identity::parse_trust_domain(&value).map_err(|r| bad(&r))?
            }
            "meshConfig.rootNamespace" => self.root_namespace = dns_label(&value).map_err(|r| bad(&r))?,
            "meshConfig.outboundTrafficPolicy.mode" => match value.as_str() {
                "ALLOW_ANY" | "REGISTRY_ONLY" => self.outbound_traffic_policy = value,
                _ => return Err(bad("expected ALLOW_ANY or REGISTRY_ONLY")),
            },
            "values.global.workloadCertTtl" => {
                crate::config::duration::parse_duration(&value).map_err(|r| bad(&r))?;
                self.cert_ttl = value;
            }
            "values.base.enableCRDs" => self.crds = boolean(&value)?,
            "values.cni.ambient.dnsCapture" => self.dns_capture = boolean(&value)?.to_string(),
            "values.telemetry.enabled" => self.metrics_service = boolean(&value)?,
            "meshConfig.accessLogFile" => match value.as_str() {
                "" => self.access_log = "off".into(),
                "/dev/stdout" if self.access_log == "off" => self.access_log = "text".into(),
                "/dev/stdout" => {}
                _ => return Err(bad("agents write their access log to /dev/stdout (or nowhere: empty)")),
            },
            "meshConfig.accessLogEncoding" => match value.as_str() {
                "TEXT" | "JSON" if self.access_log == "off" => {
                    return Err(bad("set meshConfig.accessLogFile=/dev/stdout first"));
                }
                "TEXT" => self.access_log = "text".into(),
                "JSON" => self.access_log = "json".into(),
                _ => return Err(bad("expected TEXT or JSON")),
            },
            "values.telemetry.tracing.endpoint" => {
                if !value.is_empty() {
                    value.parse::<crate::telemetry::trace::Endpoint>().map_err(|r| bad(&r))?;
                }
                self.trace_endpoint = value;
            }
            "values.global.meshID" => self.mesh_id = mesh_name(&value).map_err(|r| bad(&r))?,
            "values.global.multiCluster.clusterName" => self.cluster_name = mesh_name(&value).map_err(|r| bad(&r))?,
            "values.global.network" => self.network = mesh_name(&value).map_err(|r| bad(&r))?,
            "meshConfig.defaultConfig.tracing.sampling" => {
                match value.parse::<f64>() {
                    Ok(p) if (0.0..=100.0).contains(&p) => {}
                    _ => return Err(bad("a percentage, 0 to 100")),
                }
                self.trace_sampling = value;
            }
            _ => {
                let known = known_keys();
                let hint = closest(key, &known).map(|k| format!(" (did you mean {k}?)")).unwrap_or_default();
                return Err(Error::UnknownKey { key: key.into(), hint, known: known.join(", ") });
            }
        }
        Ok(())
    }

    fn image(&self) -> String {
        format!("{}/mesh-agent:{}", self.hub, self.tag)
    }
}

/// Where the demo profile's agents send spans: the Jaeger collector of
/// `deploy/addons` (OTLP/gRPC).
pub const DEMO_TRACE_ENDPOINT: &str = "grpc://jaeger-collector.istio-system.svc:4317";

/// The agents' telemetry settings that differ from their defaults.
fn telemetry_env(v: &Values) -> Vec<(String, String)> {
    let mut env = Vec::new();
    if v.access_log != "off" {
        env.push(("MESH_ACCESS_LOG".to_string(), v.access_log.clone()));
    }
    if !v.trace_endpoint.is_empty() {
        env.push(("MESH_TRACE_ENDPOINT".to_string(), v.trace_endpoint.clone()));
    }
    if !v.trace_sampling.is_empty() {
        env.push(("MESH_TRACE_SAMPLING".to_string(), v.trace_sampling.clone()));
    }
    env
}

/// Every `--set` key.
pub fn known_keys() -> Vec<String> {
    let mut keys: Vec<String> = [
        "profile",
        "values.global.istioNamespace",
        "values.global.hub",
        "values.global.tag",
        "values.global.logging.level",
        "values.global.workloadCertTtl",
        "meshConfig.trustDomain",
        "meshConfig.rootNamespace",
        "meshConfig.outboundTrafficPolicy.mode",
        "values.base.enableCRDs",
        "values.cni.ambient.dnsCapture",
        "values.telemetry.enabled",
        "values.telemetry.tracing.endpoint",
        "meshConfig.accessLogFile",
        "meshConfig.accessLogEncoding",
        "meshConfig.defaultConfig.tracing.sampling",
        "values.global.meshID",
        "values.global.multiCluster.clusterName",
        "values.global.network",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for kind in ["requests", "limits"] {
        for r in ["cpu", "memory"] {
            keys.push(format!("values.global.proxy.resources.{kind}.{r}"));
        }
    }
    keys
}

fn closest<'a>(key: &str, known: &'a [String]) -> Option<&'a String> {
    known
        .iter()
        .map(|k| (levenshtein(key, k), k))
        .filter(|(d, k)| *d <= k.len() / 4 + 2)
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

fn levenshtein(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            cur.push((prev[j] + usize::from(ca != *cb)).min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

/// Kubernetes quantities: a decimal number with an optional SI or binary suffix.
fn is_quantity(v: &str) -> bool {
    const SUFFIXES: &[&str] = &["Ki", "Mi", "Gi", "Ti", "Pi", "Ei", "m", "k", "M", "G", "T", "P", "E", ""];
    SUFFIXES.iter().any(|s| {
        v.strip_suffix(s).is_some_and(|n| !n.is_empty() && n.parse::<f64>().is_ok_and(|x| x >= 0.0 && x.is_finite()))
    })
}

fn dns_label(v: &str) -> Result<String, String> {
    let ok = !v.is_empty()
        && v.len() <= 63
        && v.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !v.starts_with('-')
        && !v.ends_with('-');
    if ok { Ok(v.to_string()) } else { Err("not a valid namespace name (DNS-1123 label)".into()) }
}

fn labels() -> BTreeMap<String, String> {
    labels_of(AGENT)
}

fn labels_of(app: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app".to_string(), app.to_string()),
        ("app.kubernetes.io/name".to_string(), app.to_string()),
        ("app.kubernetes.io/part-of".to_string(), "mesh".to_string()),
    ])
}

fn meta(name: &str, namespace: Option<&str>) -> ObjectMeta {
    meta_of(AGENT, name, namespace)
}

fn meta_of(app: &str, name: &str, namespace: Option<&str>) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.into()),
        namespace: namespace.map(Into::into),
        labels: Some(labels_of(app)),
        ..Default::default()
    }
}

fn binding_subject(name: &str, namespace: &str) -> Subject {
    Subject {
        kind: "ServiceAccount".into(),
        name: name.into(),
        namespace: Some(namespace.into()),
        ..Default::default()
    }
}

fn role_ref(kind: &str, name: &str) -> RoleRef {
    RoleRef { api_group: "rbac.authorization.k8s.io".into(), kind: kind.into(), name: name.into() }
}

fn rule(groups: &[&str], resources: &[&str], verbs: &[&str]) -> PolicyRule {
    PolicyRule {
        api_groups: Some(groups.iter().map(|s| s.to_string()).collect()),
        resources: Some(resources.iter().map(|s| s.to_string()).collect()),
        verbs: verbs.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

const READ: &[&str] = &["get", "list", "watch"];

/// The account whose token a remote secret carries (Istio's
/// `istio-reader-service-account`), and its ClusterRole.
pub const READER: &str = "mesh-reader";

/// Reads of everything the agents' config comes from.
fn discovery_rules() -> Vec<PolicyRule> {
    vec![
        rule(&[""], &["namespaces", "pods", "services", "serviceaccounts"], READ),
        rule(&["discovery.k8s.io"], &["endpointslices"], READ),
        rule(&["networking.istio.io"], &["virtualservices", "destinationrules", "gateways", "serviceentries"], READ),
        rule(&["security.istio.io"], &["peerauthentications", "authorizationpolicies"], READ),
        rule(&["linkerd.io"], &["serviceprofiles"], READ),
        rule(
            &["gateway.networking.k8s.io"],
            &["gatewayclasses", "gateways", "httproutes", "grpcroutes", "referencegrants"],
            READ,
        ),
        rule(&["split.smi-spec.io"], &["trafficsplits"], READ),
        rule(&["telemetry.istio.io"], &["telemetries"], READ),
    ]
}

/// The objects of an install, in apply order, as YAML documents.
pub fn render(values: &Values) -> Result<String, serde_yaml::Error> {
    render_objects(&objects(values))
}

/// The CustomResourceDefinitions of an install (whatever `values.base.enableCRDs`
/// says), as `install --crds` applies or prints them.
pub fn crd_objects(values: &Values) -> Vec<serde_json::Value> {
    let with_crds = Values { crds: true, ..values.clone() };
    objects(&with_crds).into_iter().filter(|o| o["kind"] == "CustomResourceDefinition").collect()
}

/// Objects as YAML documents.
pub fn render_objects(docs: &[serde_json::Value]) -> Result<String, serde_yaml::Error> {
    let mut out = String::new();
    for d in docs {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(d)?);
    }
    Ok(out)
}

/// The objects of an install, in apply order.
pub fn objects(v: &Values) -> Vec<serde_json::Value> {
    let ns = v.namespace.as_str();
    let mut out: Vec<serde_json::Value> = Vec::new();
    let push = |out: &mut Vec<serde_json::Value>, o: serde_json::Value| out.push(o);
    let mut ns_labels = labels();
    // The agent's own namespace is never captured.
    ns_labels.insert("istio.io/dataplane-mode".into(), "none".into());
    push(
        &mut out,
        to_json(&Namespace {
            metadata: ObjectMeta { labels: Some(ns_labels), ..meta(ns, None) },
            ..Default::default()
        }),
    );
    if v.crds {
        out.extend(crds::all().iter().map(to_json));
    }
    push(&mut out, to_json(&ServiceAccount { metadata: meta(AGENT, Some(ns)), ..Default::default() }));
    push(
        &mut out,
        to_json(&ClusterRole {
            metadata: meta(AGENT, None),
            rules: Some(
                discovery_rules()
                    .into_iter()
                    .chain([
                        // Who is scraping /metrics, and may they (as kube-rbac-proxy asks).
                        rule(&["authentication.k8s.io"], &["tokenreviews"], &["create"]),
                        rule(&["authorization.k8s.io"], &["subjectaccessreviews"], &["create"]),
                    ])
                    .collect(),
            ),
            ..Default::default()
        }),
    );
    // What another cluster's agents read of this one, through the kubeconfig
    // `meshctl x create-remote-secret` prints: the same reads, nothing else.
    push(&mut out, to_json(&ServiceAccount { metadata: meta(READER, Some(ns)), ..Default::default() }));
    push(
        &mut out,
        to_json(&ClusterRole { metadata: meta(READER, None), rules: Some(discovery_rules()), ..Default::default() }),
    );
    push(
        &mut out,
        to_json(&ClusterRoleBinding {
            metadata: meta(READER, None),
            role_ref: RoleRef {
                api_group: "rbac.authorization.k8s.io".into(),
                kind: "ClusterRole".into(),
                name: READER.into(),
            },
            subjects: Some(vec![Subject {
                kind: "ServiceAccount".into(),
                name: READER.into(),
                namespace: Some(ns.into()),
                ..Default::default()
            }]),
        }),
    );
    // Bind this to the scraper's service account (Prometheus' usually has it already).
    push(
        &mut out,
        to_json(&ClusterRole {
            metadata: meta(METRICS_READER, None),
            rules: Some(vec![PolicyRule {
                non_resource_urls: Some(vec!["/metrics".into(), "/stats/prometheus".into()]),
                verbs: vec!["get".into()],
                ..Default::default()
            }]),
            ..Default::default()
        }),
    );
    let subject = || Subject {
        kind: "ServiceAccount".into(),
        name: AGENT.into(),
        namespace: Some(ns.into()),
        ..Default::default()
    };
    push(
        &mut out,
        to_json(&ClusterRoleBinding {
            metadata: meta(AGENT, None),
            role_ref: RoleRef {
                api_group: "rbac.authorization.k8s.io".into(),
                kind: "ClusterRole".into(),
                name: AGENT.into(),
            },
            subjects: Some(vec![subject()]),
        }),
    );
    out.extend(ca_objects(v));
    push(
        &mut out,
        to_json(&ConfigMap {
            metadata: meta(AGENT, Some(ns)),
            data: Some(
                BTreeMap::from([
                    ("MESH_TRUST_DOMAIN".to_string(), v.trust_domain.clone()),
                    ("MESH_ROOT_NAMESPACE".to_string(), v.root_namespace.clone()),
                    ("MESH_OUTBOUND_TRAFFIC_POLICY".to_string(), v.outbound_traffic_policy.clone()),
                    ("MESH_DNS_CAPTURE".to_string(), v.dns_capture.clone()),
                    ("MESH_CERT_TTL".to_string(), v.cert_ttl.clone()),
                    ("MESH_CLUSTER_ID".to_string(), v.cluster_name.clone()),
                    ("MESH_MESH_ID".to_string(), v.mesh_id.clone()),
                    ("MESH_NETWORK".to_string(), v.network.clone()),
                    ("MESH_LOG".to_string(), v.log_level.clone()),
                    ("MESH_CONFIG_SOURCE".to_string(), "kubernetes".to_string()),
                    ("MESH_METRICS_AUTH".to_string(), "kubernetes".to_string()),
                    ("MESH_CA_ADDRESS".to_string(), format!("{CA}.{ns}.svc:15012")),
                    ("MESH_CA_SERVER_NAME".to_string(), format!("{CA}.{ns}.svc")),
                ])
                .into_iter()
                .chain(telemetry_env(v))
                .collect(),
            ),
            ..Default::default()
        }),
    );
    push(&mut out, to_json(&daemon_set(v)));
    if v.metrics_service {
        push(
            &mut out,
            to_json(&Service {
                metadata: meta(&format!("{AGENT}-metrics"), Some(ns)),
                spec: Some(ServiceSpec {
                    cluster_ip: Some("None".into()),
                    selector: Some(BTreeMap::from([("app".to_string(), AGENT.to_string())])),
                    ports: Some(vec![service_port("http-metrics", 15020)]),
                    ..Default::default()
                }),
                ..Default::default()
            }),
        );
    }
    for g in &v.gateways {
        out.extend(gateways::objects(v, *g));
    }
    out
}

/// The CA service: the one workload that reads the CA key. A Deployment (not on every
/// node), its Service on Istio's CA port, and RBAC for what it needs alone: TokenReview
/// (who is asking), pods (which node they are on, and what runs there), the `cacerts`
/// Secret, the remote secrets beside it, and the root ConfigMap it publishes.
fn ca_objects(v: &Values) -> Vec<serde_json::Value> {
    let ns = v.namespace.as_str();
    vec![
        to_json(&ServiceAccount { metadata: meta_of(CA, CA, Some(ns)), ..Default::default() }),
        to_json(&ClusterRole {
            metadata: meta_of(CA, CA, None),
            rules: Some(vec![
                rule(&["authentication.k8s.io"], &["tokenreviews"], &["create"]),
                rule(&[""], &["pods"], &["get", "list"]),
            ]),
            ..Default::default()
        }),
        to_json(&ClusterRoleBinding {
            metadata: meta_of(CA, CA, None),
            role_ref: role_ref("ClusterRole", CA),
            subjects: Some(vec![binding_subject(CA, ns)]),
        }),
        to_json(&Role {
            metadata: meta_of(CA, CA, Some(ns)),
            rules: Some(
                [
                    PolicyRule { resource_names: Some(vec![CA_SECRET.into()]), ..rule(&[""], &["secrets"], &["get"]) },
                    // The remote secrets (`istio/multiCluster: "true"`), handed to the
                    // agents, which may read no Secret: RBAC cannot narrow a list to a
                    // label, so this is every Secret of the install's namespace, where
                    // the CA already holds the most sensitive one. And `create`, for
                    // `cacerts` when nobody made it (the manifests applied without
                    // meshctl): RBAC cannot narrow a create to a name either.
                    rule(&[""], &["secrets"], &["list", "watch", "create"]),
                ]
                .into_iter()
                .chain(root_publisher_rules())
                .collect(),
            ),
        }),
        to_json(&RoleBinding {
            metadata: meta_of(CA, CA, Some(ns)),
            role_ref: role_ref("Role", CA),
            subjects: Some(vec![binding_subject(CA, ns)]),
        }),
        to_json(&ca_deployment(v)),
        to_json(&Service {
            metadata: meta_of(CA, CA, Some(ns)),
            spec: Some(ServiceSpec {
                selector: Some(BTreeMap::from([("app".to_string(), CA.to_string())])),
                ports: Some(vec![service_port("grpc-tls", 15012)]),
                ..Default::default()
            }),
            ..Default::default()
        }),
    ]
}

fn ca_deployment(v: &Values) -> Deployment {
    let ns = v.namespace.as_str();
    let container = Container {
        name: CA.into(),
        image: Some(v.image()),
        command: Some(vec!["/mesh-ca".into()]),
        args: Some(vec![
            format!("--ca-secret={ns}/{CA_SECRET}"),
            format!(
                "--root-configmap={}",
                std::iter::once(format!("{ns}/{ROOT_CONFIGMAP}"))
                    .chain(v.gateways.iter().map(|g| g.root_configmap()))
                    .collect::<Vec<_>>()
                    .join(",")
            ),
            "--ca-dir=/var/lib/mesh-ca".into(),
            format!("--trusted-agent={ns}/{AGENT}"),
            format!("--audience={CA_AUDIENCE}"),
            format!("--server-name={CA}.{ns}.svc,{CA}.{ns}.svc.cluster.local"),
        ]),
        // The mesh's settings (trust domain, config source, log level) as the agents
        // have them.
        env_from: Some(vec![EnvFromSource {
            config_map_ref: Some(ConfigMapEnvSource { name: AGENT.into(), optional: Some(false) }),
            ..Default::default()
        }]),
        ports: Some(vec![ContainerPort { name: Some("grpc-tls".into()), container_port: 15012, ..Default::default() }]),
        readiness_probe: Some(Probe {
            tcp_socket: Some(TCPSocketAction { port: IntOrString::Int(15012), ..Default::default() }),
            period_seconds: Some(5),
            ..Default::default()
        }),
        security_context: Some(unprivileged()),
        // The key is written here from the Secret: memory, never a node's disk.
        volume_mounts: Some(vec![mount("ca", "/var/lib/mesh-ca", false, None)]),
        ..Default::default()
    };
    Deployment {
        metadata: meta_of(CA, CA, Some(ns)),
        spec: Some(DeploymentSpec {
            replicas: Some(1),
            selector: LabelSelector {
                match_labels: Some(BTreeMap::from([("app".to_string(), CA.to_string())])),
                ..Default::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta { labels: Some(labels_of(CA)), ..Default::default() }),
                spec: Some(PodSpec {
                    service_account_name: Some(CA.into()),
                    priority_class_name: Some("system-cluster-critical".into()),
                    containers: vec![container],
                    volumes: Some(vec![Volume {
                        name: "ca".into(),
                        empty_dir: Some(EmptyDirVolumeSource { medium: Some("Memory".into()), ..Default::default() }),
                        ..Default::default()
                    }]),
                    ..Default::default()
                }),
            },
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// What the CA needs in a namespace to publish the root bundle there: creation cannot
/// be limited by name in RBAC; the rest can.
fn root_publisher_rules() -> Vec<PolicyRule> {
    vec![
        rule(&[""], &["configmaps"], &["create"]),
        PolicyRule {
            resource_names: Some(vec![ROOT_CONFIGMAP.into()]),
            ..rule(&[""], &["configmaps"], &["get", "patch", "update"])
        },
    ]
}

/// The metrics (15020) and readiness (15021) ports of the agent's binary, in any mode.
fn status_ports() -> [ContainerPort; 2] {
    [
        ContainerPort { name: Some("http-metrics".into()), container_port: 15020, ..Default::default() },
        ContainerPort { name: Some("http-ready".into()), container_port: 15021, ..Default::default() },
    ]
}

/// Ready when `/healthz/ready` on 15021 says so.
fn readiness_probe() -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some("/healthz/ready".into()),
            port: IntOrString::Int(15021),
            ..Default::default()
        }),
        period_seconds: Some(5),
        failure_threshold: Some(3),
        ..Default::default()
    }
}

/// A container with no capability, no root, no writable root filesystem.
fn unprivileged() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(true),
        run_as_non_root: Some(true),
        run_as_user: Some(65532),
        capabilities: Some(Capabilities { drop: Some(vec!["ALL".into()]), ..Default::default() }),
        seccomp_profile: Some(SeccompProfile { type_: "RuntimeDefault".into(), ..Default::default() }),
        ..Default::default()
    }
}

/// The CA's root bundle, as it publishes it in the pod's namespace.
fn ca_root_volume() -> Volume {
    Volume {
        name: "ca-root".into(),
        config_map: Some(ConfigMapVolumeSource { name: ROOT_CONFIGMAP.into(), ..Default::default() }),
        ..Default::default()
    }
}

/// A projected token for the CA's audience, which the CA reviews to know who asks.
fn ca_token_volume() -> Volume {
    Volume {
        name: "ca-token".into(),
        projected: Some(ProjectedVolumeSource {
            sources: Some(vec![VolumeProjection {
                service_account_token: Some(ServiceAccountTokenProjection {
                    audience: Some(CA_AUDIENCE.into()),
                    expiration_seconds: Some(3600),
                    path: "mesh-ca-token".into(),
                }),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// An environment variable from the pod's own fields (the downward API).
fn env_from_field(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector { field_path: path.into(), ..Default::default() }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A Service port that targets the same port of the container.
fn service_port(name: &str, port: i32) -> ServicePort {
    ServicePort { name: Some(name.into()), port, target_port: Some(IntOrString::Int(port)), ..Default::default() }
}

fn to_json<T: serde::Serialize>(o: &T) -> serde_json::Value {
    serde_json::to_value(o).expect("k8s-openapi objects serialize")
}

/// Where the agent's CNI socket lives, on the node and in the agent's container alike.
const CNI_SOCKET_DIR: &str = "/var/run/mesh";

/// How long an agent that was sent SIGTERM serves its open connections (after a
/// handoff to its successor, or when it leaves the node), in seconds.
const DRAIN_SECONDS: i64 = 60;

fn host_path(name: &str, path: &str, kind: &str) -> Volume {
    Volume {
        name: name.into(),
        host_path: Some(HostPathVolumeSource { path: path.into(), type_: Some(kind.into()) }),
        ..Default::default()
    }
}

fn mount(name: &str, path: &str, read_only: bool, propagation: Option<&str>) -> VolumeMount {
    VolumeMount {
        name: name.into(),
        mount_path: path.into(),
        read_only: Some(read_only),
        mount_propagation: propagation.map(Into::into),
        ..Default::default()
    }
}

fn daemon_set(v: &Values) -> DaemonSet {
    let quantities = |kind: &str| -> BTreeMap<String, Quantity> {
        v.resources.iter().filter(|((k, _), _)| k == kind).map(|((_, r), q)| (r.clone(), Quantity(q.clone()))).collect()
    };
    let container = Container {
        name: AGENT.into(),
        image: Some(v.image()),
        args: Some(vec![
            "--config-dir=/etc/mesh/config".into(),
            "--node-cgroup=/host/sys/fs/cgroup".into(),
            // Pods reach the agent through the CNI plugin, chained into the node's
            // network configuration at start; the socket's path is the same on the
            // host (where the plugin runs) and here.
            format!("--cni-socket={CNI_SOCKET_DIR}/cni.sock"),
            "--cni-conf-dir=/host/etc/cni/net.d".into(),
            "--cni-bin-dir=/host/opt/cni/bin".into(),
            "--cni-plugin=/mesh-cni".into(),
            "--ca-root-cert=/var/run/mesh-ca/root-cert.pem".into(),
            "--ca-token-file=/var/run/secrets/tokens/mesh-ca-token".into(),
            format!("--cni-exclude-namespaces=kube-system,{}", v.namespace),
            format!("--drain-timeout={DRAIN_SECONDS}s"),
        ]),
        env: Some(vec![
            env_from_field("MESH_NODE_NAME", "spec.nodeName"),
            env_from_field("POD_NAMESPACE", "metadata.namespace"),
        ]),
        env_from: Some(vec![EnvFromSource {
            config_map_ref: Some(ConfigMapEnvSource { name: AGENT.into(), optional: Some(false) }),
            ..Default::default()
        }]),
        ports: Some(status_ports().to_vec()),
        readiness_probe: Some(readiness_probe()),
        resources: Some(ResourceRequirements {
            requests: Some(quantities("requests")),
            limits: Some(quantities("limits")),
            ..Default::default()
        }),
        security_context: Some(SecurityContext {
            privileged: Some(false),
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_user: Some(0),
            run_as_non_root: Some(false),
            capabilities: Some(Capabilities {
                // BPF: programs and maps. NET_ADMIN: sockets in pod netns, SO_MARK,
                // IP_TRANSPARENT, the delivery rule and route in pod netns.
                // SYS_ADMIN: setns into pod netns, bpffs. SYS_PTRACE: open
                // /proc/<pid>/ns/net of pod processes (hostPID). SYS_RESOURCE: memlock
                // on old kernels.
                add: Some(["BPF", "NET_ADMIN", "SYS_ADMIN", "SYS_PTRACE", "SYS_RESOURCE"].map(String::from).to_vec()),
                drop: Some(vec!["ALL".into()]),
            }),
            seccomp_profile: Some(SeccompProfile { type_: "RuntimeDefault".into(), ..Default::default() }),
            ..Default::default()
        }),
        volume_mounts: Some(vec![
            // The node's own bpffs (systemd mounts it; `meshctl check --pre` checks):
            // pins live there and outlive the agent's container. Bidirectional would
            // need a privileged container, which the agent is not.
            mount("bpffs", "/sys/fs/bpf", false, Some("HostToContainer")),
            mount("cgroup", "/host/sys/fs/cgroup", true, None),
            mount("cni-socket", CNI_SOCKET_DIR, false, None),
            mount("cni-conf", "/host/etc/cni/net.d", false, None),
            mount("cni-bin", "/host/opt/cni/bin", false, None),
            mount("config", "/etc/mesh/config", false, None),
            // The mesh's roots, as the CA publishes them; and the agent's token for the
            // CA. No CA key: signing happens in the CA service.
            mount("ca-root", "/var/run/mesh-ca", true, None),
            mount("ca-token", "/var/run/secrets/tokens", true, None),
        ]),
        ..Default::default()
    };
    DaemonSet {
        metadata: meta(AGENT, Some(&v.namespace)),
        spec: Some(DaemonSetSpec {
            selector: LabelSelector {
                match_labels: Some(BTreeMap::from([("app".to_string(), AGENT.to_string())])),
                ..Default::default()
            },
            // The new agent starts beside the old one and takes its sockets over
            // (app::handoff); only once it is ready is the old one sent SIGTERM. A
            // node never goes without an agent, so none is unavailable.
            update_strategy: Some(DaemonSetUpdateStrategy {
                type_: Some("RollingUpdate".into()),
                rolling_update: Some(RollingUpdateDaemonSet {
                    max_surge: Some(IntOrString::Int(1)),
                    max_unavailable: Some(IntOrString::Int(0)),
                }),
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels()),
                    annotations: Some(BTreeMap::from([(
                        "kubectl.kubernetes.io/default-container".to_string(),
                        AGENT.to_string(),
                    )])),
                    ..Default::default()
                }),
                spec: Some(PodSpec {
                    service_account_name: Some(AGENT.into()),
                    priority_class_name: Some("system-node-critical".into()),
                    // Pods of the node are found through its /proc and cgroups.
                    host_pid: Some(true),
                    host_network: Some(false),
                    // The drain (--drain-timeout) and a margin: the kubelet's SIGKILL
                    // comes after the agent has let its last connections go. No
                    // preStop: SIGTERM itself starts the drain.
                    termination_grace_period_seconds: Some(DRAIN_SECONDS + 5),
                    tolerations: Some(vec![Toleration { operator: Some("Exists".into()), ..Default::default() }]),
                    containers: vec![container],
                    volumes: Some(vec![
                        host_path("bpffs", "/sys/fs/bpf", "Directory"),
                        host_path("cgroup", "/sys/fs/cgroup", "Directory"),
                        host_path("cni-socket", CNI_SOCKET_DIR, "DirectoryOrCreate"),
                        host_path("cni-conf", "/etc/cni/net.d", "DirectoryOrCreate"),
                        host_path("cni-bin", "/opt/cni/bin", "DirectoryOrCreate"),
                        Volume { name: "config".into(), empty_dir: Some(Default::default()), ..Default::default() },
                        ca_root_volume(),
                        ca_token_volume(),
                    ]),
                    ..Default::default()
                }),
            },
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    use serde_json::Value;

    use super::*;

    /// Parses `doc` as the k8s-openapi type of its kind and back: equal only if every
    /// field is one the Kubernetes API has, with the type it has.
    fn round_trip(doc: &Value) -> Value {
        fn through<T: serde::de::DeserializeOwned + serde::Serialize>(doc: &Value) -> Value {
            serde_json::to_value(serde_json::from_value::<T>(doc.clone()).unwrap()).unwrap()
        }
        match doc["kind"].as_str().unwrap() {
            "Namespace" => through::<Namespace>(doc),
            "CustomResourceDefinition" => through::<CustomResourceDefinition>(doc),
            "ServiceAccount" => through::<ServiceAccount>(doc),
            "ClusterRole" => through::<ClusterRole>(doc),
            "ClusterRoleBinding" => through::<ClusterRoleBinding>(doc),
            "Role" => through::<Role>(doc),
            "RoleBinding" => through::<RoleBinding>(doc),
            "ConfigMap" => through::<ConfigMap>(doc),
            "DaemonSet" => through::<DaemonSet>(doc),
            "Deployment" => through::<Deployment>(doc),
            "Service" => through::<Service>(doc),
            other => panic!("unexpected kind {other}"),
        }
    }

    fn parse_all(yaml: &str) -> Vec<Value> {
        serde_yaml::Deserializer::from_str(yaml)
            .map(|d| serde::Deserialize::deserialize(d).unwrap())
            .filter(|v: &Value| !v.is_null())
            .collect()
    }

    fn agent_config(v: &Values) -> Value {
        objects(v).into_iter().find(|o| o["kind"] == "ConfigMap" && o["metadata"]["name"] == AGENT).unwrap()["data"]
            .clone()
    }

    #[test]
    fn the_demo_profile_logs_and_traces_to_the_addons_and_others_do_not() {
        let demo = agent_config(&Values::for_profile(Profile::Demo));
        assert_eq!(demo["MESH_ACCESS_LOG"], "text");
        assert_eq!(demo["MESH_TRACE_ENDPOINT"], DEMO_TRACE_ENDPOINT);
        assert_eq!(demo["MESH_TRACE_SAMPLING"], "100");
        let default = agent_config(&Values::for_profile(Profile::Default));
        for key in ["MESH_ACCESS_LOG", "MESH_TRACE_ENDPOINT", "MESH_TRACE_SAMPLING"] {
            assert!(default.get(key).is_none(), "{key} stays at the agent's default");
        }
        let sets = |s: &[&str]| Values::from_sets(&s.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        let v = sets(&[
            "meshConfig.accessLogFile=/dev/stdout",
            "meshConfig.accessLogEncoding=JSON",
            "values.telemetry.tracing.endpoint=http://otel.observability:4318",
            "meshConfig.defaultConfig.tracing.sampling=2.5",
        ])
        .unwrap();
        let cm = agent_config(&v);
        assert_eq!((cm["MESH_ACCESS_LOG"].as_str(), cm["MESH_TRACE_SAMPLING"].as_str()), (Some("json"), Some("2.5")));
        assert_eq!(cm["MESH_TRACE_ENDPOINT"], "http://otel.observability:4318");
        let off = sets(&["profile=demo", "meshConfig.accessLogFile="]).unwrap();
        assert!(agent_config(&off).get("MESH_ACCESS_LOG").is_none());
        for (bad, why) in [
            ("meshConfig.accessLogFile=/var/log/mesh.log", "/dev/stdout"),
            ("meshConfig.accessLogEncoding=JSON", "accessLogFile=/dev/stdout first"),
            ("values.telemetry.tracing.endpoint=jaeger:4317", "expected http://host:port or grpc://host:port"),
            ("meshConfig.defaultConfig.tracing.sampling=150", "0 to 100"),
        ] {
            let e = sets(&[bad]).unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn every_profile_renders_objects_the_kubernetes_api_knows() {
        for (name, profile) in Profile::ALL {
            let yaml = render(&Values::for_profile(profile)).unwrap();
            let docs = parse_all(&yaml);
            assert!(docs.iter().any(|d| d["kind"] == "DaemonSet"), "{name}");
            for d in &docs {
                assert_eq!(
                    &round_trip(d),
                    d,
                    "{name}: {} {} has fields the API does not",
                    d["kind"],
                    d["metadata"]["name"]
                );
            }
            let crds = docs.iter().filter(|d| d["kind"] == "CustomResourceDefinition").count();
            assert_eq!(crds, if profile == Profile::Minimal { 0 } else { 14 }, "{name}");
        }
    }

    /// The RBAC rules every profile grants to the service account `name`, following
    /// each (Cluster)RoleBinding to its role.
    fn rules_of(docs: &[Value], name: &str) -> Vec<Value> {
        let mut out = Vec::new();
        for b in docs.iter().filter(|d| d["kind"] == "RoleBinding" || d["kind"] == "ClusterRoleBinding") {
            let bound = b["subjects"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|s| s["kind"] == "ServiceAccount" && s["name"] == name);
            if !bound {
                continue;
            }
            let role_kind = b["roleRef"]["kind"].as_str().unwrap();
            // A RoleBinding names a Role of its own namespace.
            let same_place =
                |d: &&Value| role_kind == "ClusterRole" || d["metadata"]["namespace"] == b["metadata"]["namespace"];
            let role = docs
                .iter()
                .filter(same_place)
                .find(|d| d["kind"] == role_kind && d["metadata"]["name"] == b["roleRef"]["name"])
                .unwrap_or_else(|| panic!("{role_kind} {} is not in the install", b["roleRef"]["name"]));
            out.extend(role["rules"].as_array().into_iter().flatten().cloned());
        }
        out
    }

    #[test]
    fn only_the_ca_service_may_read_the_ca_key_and_only_its_secret() {
        for (name, profile) in Profile::ALL {
            let docs = parse_all(&render(&Values::for_profile(profile)).unwrap());
            let touches_secrets =
                |r: &Value| r["resources"].as_array().into_iter().flatten().any(|x| x == "secrets" || x == "*");
            // The node agents' token cannot read the key: no rule bound to them names
            // Secrets, and none is a wildcard.
            let agent = rules_of(&docs, AGENT);
            assert!(!agent.is_empty(), "{name}: the agent has its read rules");
            assert!(!agent.iter().any(touches_secrets), "{name}: the agent may read Secrets: {agent:?}");
            // The CA may get the cacerts Secret, by name, list and watch the remote
            // secrets and create cacerts in its own namespace (a Role); it updates or
            // deletes no Secret.
            let ca: Vec<Value> = rules_of(&docs, CA).into_iter().filter(|r| touches_secrets(r)).collect();
            assert_eq!(ca.len(), 2, "{name}: {ca:?}");
            assert_eq!(ca[0]["resourceNames"], serde_json::json!([CA_SECRET]), "{name}");
            assert_eq!(ca[0]["verbs"], serde_json::json!(["get"]), "{name}");
            assert_eq!(ca[1]["verbs"], serde_json::json!(["list", "watch", "create"]), "{name}");
            let ca_roles: Vec<&Value> = docs
                .iter()
                .filter(|d| d["metadata"]["name"] == CA && d["kind"].as_str().is_some_and(|k| k.ends_with("Role")))
                .filter(|d| d["rules"].as_array().into_iter().flatten().any(touches_secrets))
                .collect();
            assert!(ca_roles.iter().all(|d| d["kind"] == "Role"), "{name}: Secrets cluster-wide: {ca_roles:?}");
            // Gateways read Secrets in their own namespaces only, never where the key is.
            let gateways = Values::for_profile(profile).gateways;
            for g in &gateways {
                for b in docs.iter().filter(|d| d["kind"] == "RoleBinding" || d["kind"] == "ClusterRoleBinding") {
                    let bound = b["subjects"].as_array().into_iter().flatten().any(|s| s["name"] == g.name);
                    let role = &b["roleRef"];
                    let reads_secrets = docs
                        .iter()
                        .filter(|d| d["kind"] == role["kind"] && d["metadata"]["name"] == role["name"])
                        .filter(|d| d["metadata"]["namespace"] == b["metadata"]["namespace"])
                        .any(|d| d["rules"].as_array().into_iter().flatten().any(touches_secrets));
                    if bound && reads_secrets {
                        assert_eq!(b["kind"], "RoleBinding", "{name}: {b}");
                        assert_eq!(b["metadata"]["namespace"], g.namespace, "{name}: {b}");
                    }
                }
            }
            // The reader another cluster holds a token of reads what the agents read, and
            // no Secret.
            let reader = rules_of(&docs, READER);
            assert!(!reader.is_empty(), "{name}: the reader has its rules");
            for r in &reader {
                assert_eq!(r["verbs"], serde_json::json!(["get", "list", "watch"]), "{name}: {r}");
                assert!(!touches_secrets(r), "{name}: the reader may read Secrets: {r}");
            }
            // Nobody else is bound to anything.
            for b in docs.iter().filter(|d| d["kind"] == "RoleBinding" || d["kind"] == "ClusterRoleBinding") {
                for s in b["subjects"].as_array().into_iter().flatten() {
                    let known = [AGENT, CA, READER].iter().any(|n| s["name"] == *n)
                        || gateways.iter().any(|g| s["name"] == g.name);
                    assert!(known, "{name}: unexpected subject {s}");
                }
            }
            // The agent mounts no Secret and no CA directory; only a projected token.
            let ds = docs.iter().find(|d| d["kind"] == "DaemonSet").unwrap();
            let volumes = ds["spec"]["template"]["spec"]["volumes"].as_array().unwrap();
            assert!(!volumes.iter().any(|v| v.get("secret").is_some()), "{name}: {volumes:?}");
        }
    }

    #[test]
    fn the_daemon_set_runs_with_named_capabilities_and_no_host_network() {
        let v = Values::for_profile(Profile::Default);
        let ds = daemon_set(&v);
        let pod = ds.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
        assert_eq!(pod.host_network, Some(false));
        let c = &pod.containers[0];
        let sc = c.security_context.as_ref().unwrap();
        assert_eq!(sc.privileged, Some(false));
        assert_eq!(sc.capabilities.as_ref().unwrap().drop.as_deref(), Some(&["ALL".to_string()][..]));
        let probe = c.readiness_probe.as_ref().unwrap().http_get.as_ref().unwrap();
        assert_eq!(probe.port, IntOrString::Int(15021));
        let strategy = ds.spec.as_ref().unwrap().update_strategy.as_ref().unwrap();
        let rolling = strategy.rolling_update.as_ref().unwrap();
        assert_eq!(
            (&rolling.max_surge, &rolling.max_unavailable),
            (&Some(IntOrString::Int(1)), &Some(IntOrString::Int(0)))
        );
        assert!(pod.termination_grace_period_seconds.unwrap() > DRAIN_SECONDS, "the kubelet waits out the drain");
    }

    #[test]
    fn sets_follow_istioctl_keys_and_refuse_unknown_ones_with_a_hint() {
        // The reference document's production example, as written.
        let sets: Vec<String> = [
            "profile=default",
            "values.global.proxy.resources.requests.cpu=100m",
            "values.global.proxy.resources.requests.memory=128Mi",
            "values.global.proxy.resources.limits.cpu=500m",
            "values.global.proxy.resources.limits.memory=256Mi",
        ]
        .map(String::from)
        .to_vec();
        let v = Values::from_sets(&sets).unwrap();
        let yaml = render(&v).unwrap();
        let ds = parse_all(&yaml).into_iter().find(|d| d["kind"] == "DaemonSet").unwrap();
        let res = &ds["spec"]["template"]["spec"]["containers"][0]["resources"];
        assert_eq!(res["requests"]["cpu"], "100m");
        assert_eq!(res["limits"]["memory"], "256Mi");
        assert_eq!(Values::from_sets(&["profile=demo".into()]).unwrap().profile, Profile::Demo);

        let e = Values::from_sets(&["values.global.proxy.resources.request.cpu=1".into()]).unwrap_err().to_string();
        assert!(
            e.contains("unknown key") && e.contains("did you mean values.global.proxy.resources.requests.cpu?"),
            "{e}"
        );
        let e =
            Values::from_sets(&["values.global.proxy.resources.limits.memory=lots".into()]).unwrap_err().to_string();
        assert!(e.contains("not a Kubernetes quantity"), "{e}");
        let e = Values::from_sets(&["profile=huge".into()]).unwrap_err().to_string();
        assert!(e.contains("profiles are minimal, default and demo"), "{e}");
        assert!(Values::from_sets(&["novalue".into()]).unwrap_err().to_string().contains("expected key=value"));
    }

    /// The reference document's multi-cluster IstioOperator, as written.
    const MULTI_CLUSTER_IOP: &str = "\
apiVersion: install.istio.io/v1alpha1
kind: IstioOperator
spec:
  values:
    global:
      meshID: mesh1
      multiCluster:
        clusterName: cluster1
      network: network1
";

    /// The agents' environment from the ConfigMap the manifests carry.
    fn agent_env(v: &Values) -> serde_json::Value {
        let yaml = render(v).unwrap();
        let cm = parse_all(&yaml).into_iter().find(|d| d["kind"] == "ConfigMap" && d["metadata"]["name"] == AGENT);
        cm.expect("the agents' ConfigMap")["data"].clone()
    }

    #[test]
    fn an_istio_operator_file_sets_what_its_fields_say_and_set_overrides_it() {
        let iop = ("iop.yaml".to_string(), MULTI_CLUSTER_IOP.to_string());
        let v = Values::from_sources(std::slice::from_ref(&iop), &[]).unwrap();
        let env = agent_env(&v);
        assert_eq!(env["MESH_CLUSTER_ID"], "cluster1", "metrics name the cluster");
        assert_eq!(env["MESH_NETWORK"], "network1");
        assert_eq!(env["MESH_MESH_ID"], "mesh1");
        // --set over the file, as with istioctl; the file's profile and meshConfig too.
        let with_profile = (
            "demo.yaml".to_string(),
            format!("{MULTI_CLUSTER_IOP}  profile: demo\n  meshConfig: {{trustDomain: example.org}}\n"),
        );
        let sets = ["values.global.network=network9".to_string()];
        let v = Values::from_sources(&[with_profile], &sets).unwrap();
        assert_eq!(
            (v.profile, v.trust_domain.as_str(), v.network.as_str()),
            (Profile::Demo, "example.org", "network9")
        );
        // Defaults: Istio's cluster name, no network, the trust domain as the mesh's id.
        let env = agent_env(&Values::from_sets(&[]).unwrap());
        assert_eq!((env["MESH_CLUSTER_ID"].as_str(), env["MESH_NETWORK"].as_str()), (Some("Kubernetes"), Some("")));
    }

    #[test]
    fn a_bad_istio_operator_file_is_refused_naming_the_file_and_field() {
        let refused = |yaml: &str| {
            Values::from_sources(&[("iop.yaml".to_string(), yaml.to_string())], &[]).unwrap_err().to_string()
        };
        let e = refused("apiVersion: install.istio.io/v1alpha1\nkind: IstioOperatr\n");
        assert_eq!(e, "iop.yaml: kind: expected IstioOperator, found IstioOperatr");
        let e = refused(&MULTI_CLUSTER_IOP.replace("network: network1", "networks: network1"));
        assert!(e.starts_with("iop.yaml: spec.values.global.networks: not a value meshctl reads"), "{e}");
        assert!(e.contains("did you mean values.global.network?"), "{e}");
        let e = refused(&MULTI_CLUSTER_IOP.replace("clusterName: cluster1", "clusterName: \"cluster 1\""));
        assert!(
            e.starts_with("iop.yaml: spec.values.global.multiCluster.clusterName: \"cluster 1\": at most 63"),
            "{e}"
        );
        let e = refused(&format!("{MULTI_CLUSTER_IOP}  components: {{cni: {{enabled: true}}}}\n"));
        assert!(e.starts_with("iop.yaml: spec.components: not read by meshctl"), "{e}");
        let e = refused(&MULTI_CLUSTER_IOP.replace("network: network1", "network: [a, b]"));
        assert!(e.contains("spec.values.global.network: a list"), "{e}");
    }
}

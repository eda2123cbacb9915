//! Typed Kubernetes objects, with the fields of the upstream API the mesh uses. Unknown
//! fields are ignored, as the API server would keep them: users' manifests carry many
//! fields that are none of the mesh's business.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::Deserialize;

/// `metadata`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ObjectMeta {
    /// Object name.
    pub name: String,
    /// `metadata.uid`, set by the API server.
    #[serde(default)]
    pub uid: Option<String>,
    /// Namespace; `default` when absent, as kubectl does.
    #[serde(default)]
    pub namespace: Option<String>,
    /// Labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Annotations.
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    /// Set once deletion has begun: a terminating pod takes no new connections.
    #[serde(default)]
    pub deletion_timestamp: Option<String>,
    /// When the API server stored it first (RFC 3339); orders Gateway API routes.
    #[serde(default)]
    pub creation_timestamp: Option<String>,
    /// The spec's version, which status conditions report as `observedGeneration`.
    #[serde(default)]
    pub generation: Option<i64>,
    /// Objects it belongs to; a pod's controller names its workload in telemetry.
    #[serde(default)]
    pub owner_references: Vec<OwnerReference>,
}

/// `metadata.ownerReferences[]`: only what names an owner.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct OwnerReference {
    /// Kind of the owner (`ReplicaSet`, `Job`, `StatefulSet`...).
    #[serde(default)]
    pub kind: String,
    /// Name of the owner.
    #[serde(default)]
    pub name: String,
    /// Whether the owner is the managing controller.
    #[serde(default)]
    pub controller: Option<bool>,
}

impl ObjectMeta {
    /// The namespace, `default` when unset.
    pub fn namespace_or_default(&self) -> String {
        self.namespace_str().to_string()
    }

    /// The namespace, `default` when unset, borrowed: for lookups that run once per
    /// object of the whole config.
    pub fn namespace_str(&self) -> &str {
        self.namespace.as_deref().unwrap_or("default")
    }

    /// `namespace/name`, as objects are named in logs and lookups.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace_or_default(), self.name)
    }
}

/// `v1/Namespace`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Namespace {
    /// Metadata; labels decide enrollment.
    pub metadata: ObjectMeta,
}

/// `v1/Secret`: TLS certificates a gateway serves (`credentialName`). Values never
/// appear in logs, errors or dumps: `Debug` names the keys only.
#[derive(Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Secret {
    /// Metadata.
    pub metadata: ObjectMeta,
    /// `kubernetes.io/tls`, `Opaque`, ...
    #[serde(default, rename = "type")]
    pub secret_type: Option<String>,
    /// Base64 values.
    #[serde(default)]
    pub data: BTreeMap<String, String>,
    /// Plain-text values (kubectl merges them into `data`).
    #[serde(default)]
    pub string_data: BTreeMap<String, String>,
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let keys: Vec<&String> = self.data.keys().chain(self.string_data.keys()).collect();
        f.debug_struct("Secret")
            .field("metadata", &self.metadata)
            .field("type", &self.secret_type)
            .field("keys", &keys)
            .finish()
    }
}

impl Secret {
    /// The value under `key` (`stringData` wins over `data`, as the API server merges
    /// them); an error when `data` holds something that is not base64.
    pub fn value(&self, key: &str) -> Result<Option<Vec<u8>>, String> {
        use base64::Engine as _;
        if let Some(v) = self.string_data.get(key) {
            return Ok(Some(v.as_bytes().to_vec()));
        }
        let Some(v) = self.data.get(key) else { return Ok(None) };
        let compact: String = v.chars().filter(|c| !c.is_ascii_whitespace()).collect();
        base64::engine::general_purpose::STANDARD
            .decode(compact)
            .map(Some)
            .map_err(|_| format!("data.{key}: not base64"))
    }

    /// The checks the API server makes: base64 values, and `tls.crt` and `tls.key` in a
    /// `kubernetes.io/tls` Secret.
    pub(super) fn validate(&self) -> Result<(), (String, String)> {
        for key in self.data.keys() {
            self.value(key).map_err(|reason| (format!("data.{key}"), reason))?;
        }
        if self.secret_type.as_deref() == Some("kubernetes.io/tls") {
            for key in ["tls.crt", "tls.key"] {
                if !self.data.contains_key(key) && !self.string_data.contains_key(key) {
                    return Err((format!("data.{key}"), "required in a kubernetes.io/tls Secret".into()));
                }
            }
        }
        Ok(())
    }
}

/// `v1/ServiceAccount`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ServiceAccount {
    /// Metadata.
    pub metadata: ObjectMeta,
}

/// `v1/Pod`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Pod {
    /// Metadata.
    pub metadata: ObjectMeta,
    /// Spec.
    pub spec: PodSpec,
    /// Status: `podIP` is where the pod is reached.
    #[serde(default)]
    pub status: PodStatus,
}

/// `Pod.spec`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodSpec {
    /// Service account; its SPIFFE identity is the pod's identity (`default` if unset).
    #[serde(default)]
    pub service_account_name: Option<String>,
    /// Node the pod runs on.
    #[serde(default)]
    pub node_name: Option<String>,
    /// Containers (only their ports matter to the mesh).
    #[serde(default)]
    pub containers: Vec<Container>,
    /// The pod shares the node's network namespace: its address is the node's, so it is
    /// never enrolled (capturing it would capture the node) and never indexed by IP.
    #[serde(default)]
    pub host_network: bool,
}

/// `Pod.spec.containers[]`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Container {
    /// Container name.
    pub name: String,
    /// Declared ports.
    #[serde(default)]
    pub ports: Vec<ContainerPort>,
}

/// A port by number or by name.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum PortRef {
    /// A number.
    Number(u16),
    /// A container port's name.
    Name(String),
}

/// `networking.k8s.io/v1/NetworkPolicy`, with what decides which ports it lets in.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct NetworkPolicy {
    /// Metadata.
    pub metadata: ObjectMeta,
    /// Spec.
    #[serde(default)]
    pub spec: NetworkPolicySpec,
}

/// `NetworkPolicy.spec`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetworkPolicySpec {
    /// The pods it applies to (in its namespace).
    #[serde(default)]
    pub pod_selector: LabelSelector,
    /// `Ingress`, `Egress`; when absent, Ingress (and Egress if rules are given).
    #[serde(default)]
    pub policy_types: Vec<String>,
    /// Ingress rules: what may come in (none: nothing).
    #[serde(default)]
    pub ingress: Vec<NetworkPolicyIngressRule>,
}

/// One ingress rule: its peers may reach its ports (all ports when none are listed).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct NetworkPolicyIngressRule {
    /// Ports; empty: all.
    #[serde(default)]
    pub ports: Vec<NetworkPolicyPort>,
}

/// A port (or range) of an ingress rule.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetworkPolicyPort {
    /// `TCP` (default), `UDP`, `SCTP`.
    #[serde(default)]
    pub protocol: Option<String>,
    /// Number or named port; absent: every port.
    #[serde(default)]
    pub port: Option<PortRef>,
    /// Last port of a range starting at `port`.
    #[serde(default)]
    pub end_port: Option<u16>,
}

/// A Kubernetes label selector.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LabelSelector {
    /// Labels all required.
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
    /// Expressions all required.
    #[serde(default)]
    pub match_expressions: Vec<LabelSelectorRequirement>,
}

/// `In`, `NotIn`, `Exists`, `DoesNotExist`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, schemars::JsonSchema)]
pub struct LabelSelectorRequirement {
    /// Label key.
    pub key: String,
    /// Operator.
    pub operator: String,
    /// Values (for `In` and `NotIn`).
    #[serde(default)]
    pub values: Vec<String>,
}

impl LabelSelector {
    /// Whether `labels` are selected (an empty selector selects everything).
    pub fn selects(&self, labels: &BTreeMap<String, String>) -> bool {
        self.match_labels.iter().all(|(k, v)| labels.get(k) == Some(v))
            && self.match_expressions.iter().all(|e| {
                let value = labels.get(&e.key);
                match e.operator.as_str() {
                    "In" => value.is_some_and(|v| e.values.contains(v)),
                    "NotIn" => value.is_none_or(|v| !e.values.contains(v)),
                    "Exists" => value.is_some(),
                    "DoesNotExist" => value.is_none(),
                    _ => false,
                }
            })
    }
}

impl NetworkPolicy {
    /// Whether it restricts ingress.
    pub fn restricts_ingress(&self) -> bool {
        self.spec.policy_types.is_empty() || self.spec.policy_types.iter().any(|t| t == "Ingress")
    }

    /// Whether some ingress rule lets TCP `port` in (from some peer); `named` resolves
    /// a port name on the selected pod.
    pub fn allows_tcp(&self, port: u16, named: &dyn Fn(&str) -> Option<u16>) -> bool {
        self.spec.ingress.iter().any(|rule| {
            rule.ports.is_empty()
                || rule.ports.iter().any(|p| {
                    let tcp = p.protocol.as_deref().is_none_or(|proto| proto.eq_ignore_ascii_case("TCP"));
                    let covers = match &p.port {
                        None => true,
                        Some(PortRef::Number(first)) => (*first..=p.end_port.unwrap_or(*first)).contains(&port),
                        Some(PortRef::Name(name)) => named(name) == Some(port),
                    };
                    tcp && covers
                })
        })
    }
}

/// `Pod.spec.containers[].ports[]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerPort {
    /// Port number.
    pub container_port: u16,
    /// Port name, referenced by a Service `targetPort`.
    #[serde(default)]
    pub name: Option<String>,
    /// `TCP` (default), `UDP` or `SCTP`.
    #[serde(default)]
    pub protocol: Option<String>,
}

/// `Pod.status`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodStatus {
    /// Primary address.
    #[serde(default, rename = "podIP")]
    pub pod_ip: Option<IpAddr>,
    /// All addresses (dual stack).
    #[serde(default, rename = "podIPs")]
    pub pod_ips: Vec<PodIp>,
    /// `Pending`, `Running`, `Succeeded`, `Failed` or `Unknown`.
    #[serde(default)]
    pub phase: Option<String>,
    /// Conditions; `Ready` decides whether the pod is a Service endpoint.
    #[serde(default)]
    pub conditions: Vec<PodCondition>,
}

/// `Pod.status.conditions[]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct PodCondition {
    /// `Ready`, `ContainersReady`, `PodScheduled`, ...
    #[serde(rename = "type")]
    pub kind: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
}

impl Pod {
    /// `Succeeded` or `Failed`: its containers are gone for good and its address may
    /// already belong to a new pod.
    pub fn is_finished(&self) -> bool {
        matches!(self.status.phase.as_deref(), Some("Succeeded" | "Failed"))
    }

    /// Whether the pod takes new connections as a Service endpoint, as kube-proxy
    /// decides: not finished, not being deleted, and `Ready` unless it reports no
    /// conditions at all (a manifest written by hand, as in the lab).
    pub fn is_serving(&self) -> bool {
        let finished = self.is_finished();
        let ready = self.status.conditions.iter().find(|c| c.kind == "Ready").is_none_or(|c| c.status == "True");
        !finished && self.metadata.deletion_timestamp.is_none() && ready
    }
}

/// `Pod.status.podIPs[]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct PodIp {
    /// The address.
    pub ip: IpAddr,
}

/// `v1/Service`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Service {
    /// Metadata.
    pub metadata: ObjectMeta,
    /// Spec.
    pub spec: ServiceSpec,
    /// Status: the load balancer's addresses.
    #[serde(default)]
    pub status: ServiceStatus,
}

/// `Service.status`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceStatus {
    /// The load balancer in front of a `LoadBalancer` Service.
    #[serde(default)]
    pub load_balancer: LoadBalancerStatus,
}

/// `Service.status.loadBalancer`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct LoadBalancerStatus {
    /// Its addresses.
    #[serde(default)]
    pub ingress: Vec<LoadBalancerIngress>,
}

/// `Service.status.loadBalancer.ingress[]`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct LoadBalancerIngress {
    /// An IP address (a hostname-only ingress has none).
    #[serde(default)]
    pub ip: Option<String>,
}

impl Service {
    /// The addresses the Service is reached at from outside its cluster: the load
    /// balancer's, then `spec.externalIPs`; the ones that do not parse are skipped.
    pub fn external_addresses(&self) -> Vec<IpAddr> {
        let lb = self.status.load_balancer.ingress.iter().filter_map(|i| i.ip.as_deref());
        lb.chain(self.spec.external_ips.iter().map(String::as_str)).filter_map(|a| a.parse().ok()).collect()
    }
}

/// `Service.spec`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceSpec {
    /// Pods with all these labels (same namespace) are the endpoints.
    #[serde(default)]
    pub selector: BTreeMap<String, String>,
    /// Ports.
    #[serde(default)]
    pub ports: Vec<ServicePort>,
    /// The virtual IP, or `None` for a headless service.
    #[serde(default, rename = "clusterIP")]
    pub cluster_ip: Option<String>,
    /// All virtual IPs (dual stack).
    #[serde(default, rename = "clusterIPs")]
    pub cluster_ips: Vec<String>,
    /// Addresses outside the cluster that route to the Service.
    #[serde(default, rename = "externalIPs")]
    pub external_ips: Vec<String>,
}

/// `Service.spec.ports[]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServicePort {
    /// Port name.
    #[serde(default)]
    pub name: Option<String>,
    /// The service port clients dial.
    pub port: u16,
    /// The pod port: a number or a container port name; defaults to `port`.
    #[serde(default)]
    pub target_port: Option<IntOrString>,
    /// `TCP` (default).
    #[serde(default)]
    pub protocol: Option<String>,
    /// The application protocol (`http`, `kubernetes.io/h2c`, `tcp`...).
    #[serde(default)]
    pub app_protocol: Option<String>,
}

/// Kubernetes `IntOrString`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum IntOrString {
    /// A number.
    Int(u16),
    /// A name.
    String(String),
}

/// Label naming the Service an EndpointSlice belongs to.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// `discovery.k8s.io/v1/EndpointSlice`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointSlice {
    /// Metadata; the `kubernetes.io/service-name` label names the Service.
    pub metadata: ObjectMeta,
    /// `IPv4`, `IPv6` or `FQDN`.
    pub address_type: String,
    /// Endpoints.
    #[serde(default)]
    pub endpoints: Vec<SliceEndpoint>,
    /// Ports, named as the Service's ports.
    #[serde(default)]
    pub ports: Vec<SlicePort>,
}

impl EndpointSlice {
    /// The Service (same namespace) it lists endpoints for.
    pub fn service(&self) -> Option<&str> {
        self.metadata.labels.get(SERVICE_NAME_LABEL).map(String::as_str)
    }
}

/// `EndpointSlice.endpoints[]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SliceEndpoint {
    /// Addresses (all of the slice's `addressType`).
    pub addresses: Vec<String>,
    /// Readiness; an absent `ready` means ready, as the API specifies.
    #[serde(default)]
    pub conditions: SliceConditions,
    /// The pod (or other object) behind it.
    #[serde(default)]
    pub target_ref: Option<ObjectReference>,
    /// Node it runs on.
    #[serde(default)]
    pub node_name: Option<String>,
}

/// `EndpointSlice.endpoints[].conditions`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct SliceConditions {
    /// Ready for new connections.
    #[serde(default)]
    pub ready: Option<bool>,
    /// Being deleted.
    #[serde(default)]
    pub terminating: Option<bool>,
}

/// `EndpointSlice.endpoints[].targetRef`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ObjectReference {
    /// Kind (`Pod`).
    #[serde(default)]
    pub kind: Option<String>,
    /// Name.
    #[serde(default)]
    pub name: Option<String>,
}

/// `EndpointSlice.ports[]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct SlicePort {
    /// The Service port's name (empty for a single unnamed port).
    #[serde(default)]
    pub name: Option<String>,
    /// The endpoint's port.
    #[serde(default)]
    pub port: Option<u16>,
    /// `TCP` (default), `UDP` or `SCTP`.
    #[serde(default)]
    pub protocol: Option<String>,
}

//! The gateways of an install: the mesh's own binary in gateway mode, as a Deployment
//! with a Service labelled as Istio's are (`istio: ingressgateway`, `istio:
//! egressgateway`), each in a namespace of its own, outside the capture: the `default`
//! profile installs the ingress gateway, `demo` adds the egress gateway.
//!
//! Least privilege: a gateway reads the mesh's config (the agents' read-only role), the
//! Secrets of its own namespace (its certificates; never `istio-system`, where the CA
//! key is), writes the Gateway API `status` subresources (nothing else of those
//! objects), and holds one identity, which the CA signs for its service account only.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::core::v1::{
    Container, ContainerPort, EnvVar, Namespace, PodSecurityContext, PodSpec, PodTemplateSpec, Service, ServiceAccount,
    ServiceSpec, Sysctl,
};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};

use super::{
    AGENT, CA, READ, ROOT_CONFIGMAP, Values, binding_subject, ca_root_volume, ca_token_volume, env_from_field,
    labels_of, meta_of, mount, readiness_probe, role_ref, root_publisher_rules, rule, service_port, status_ports,
    to_json, unprivileged,
};

/// One gateway of an install.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GatewaySpec {
    /// Deployment, Service and service account name.
    pub name: &'static str,
    /// Its namespace (Istio's recommended one, apart from `istio-system`).
    pub namespace: &'static str,
    /// The `istio:` label Gateways select it by.
    pub istio_label: &'static str,
    /// Whether its Service is a LoadBalancer (ingress) or cluster-internal (egress).
    pub load_balancer: bool,
}

/// The ingress gateway (`default` and `demo`).
pub const INGRESS: GatewaySpec = GatewaySpec {
    name: "istio-ingressgateway",
    namespace: "istio-ingress",
    istio_label: "ingressgateway",
    load_balancer: true,
};

/// The egress gateway (`demo`).
pub const EGRESS: GatewaySpec = GatewaySpec {
    name: "istio-egressgateway",
    namespace: "istio-egress",
    istio_label: "egressgateway",
    load_balancer: false,
};

impl GatewaySpec {
    fn labels(&self) -> BTreeMap<String, String> {
        let mut l = labels_of(self.name);
        l.insert("istio".into(), self.istio_label.into());
        l
    }

    fn meta(&self, namespace: Option<&str>) -> ObjectMeta {
        ObjectMeta { labels: Some(self.labels()), ..meta_of(self.name, self.name, namespace) }
    }

    /// `namespace/name` of the root bundle the CA publishes for it.
    pub fn root_configmap(&self) -> String {
        format!("{}/{ROOT_CONFIGMAP}", self.namespace)
    }
}

/// Every object of gateway `g`.
pub fn objects(v: &Values, g: GatewaySpec) -> Vec<serde_json::Value> {
    let ns = g.namespace;
    let mut ns_labels = labels_of(g.name);
    // A gateway holds its own identity: its namespace is never captured.
    ns_labels.insert("istio.io/dataplane-mode".into(), "none".into());
    let status_role = format!("{}-gateway-status", g.name);
    vec![
        to_json(&Namespace {
            metadata: ObjectMeta { labels: Some(ns_labels), ..meta_of(g.name, ns, None) },
            ..Default::default()
        }),
        to_json(&ServiceAccount { metadata: g.meta(Some(ns)), ..Default::default() }),
        // The mesh's config, read-only, as the agents read it.
        to_json(&ClusterRoleBinding {
            metadata: g.meta(None),
            role_ref: role_ref("ClusterRole", AGENT),
            subjects: Some(vec![binding_subject(g.name, ns)]),
        }),
        // The Gateway API status of what it serves, as a controller writes it.
        to_json(&ClusterRole {
            metadata: ObjectMeta { labels: Some(g.labels()), ..meta_of(g.name, &status_role, None) },
            rules: Some(vec![rule(
                &["gateway.networking.k8s.io"],
                &["gatewayclasses/status", "gateways/status", "httproutes/status", "grpcroutes/status"],
                &["get", "patch", "update"],
            )]),
            ..Default::default()
        }),
        to_json(&ClusterRoleBinding {
            metadata: ObjectMeta { labels: Some(g.labels()), ..meta_of(g.name, &status_role, None) },
            role_ref: role_ref("ClusterRole", &status_role),
            subjects: Some(vec![binding_subject(g.name, ns)]),
        }),
        // Its certificates: the Secrets of its own namespace.
        to_json(&Role { metadata: g.meta(Some(ns)), rules: Some(vec![rule(&[""], &["secrets"], READ)]) }),
        to_json(&RoleBinding {
            metadata: g.meta(Some(ns)),
            role_ref: role_ref("Role", g.name),
            subjects: Some(vec![binding_subject(g.name, ns)]),
        }),
        // The CA publishes the root bundle here, which the gateway mounts.
        to_json(&Role { metadata: meta_of(CA, CA, Some(ns)), rules: Some(root_publisher_rules()) }),
        to_json(&RoleBinding {
            metadata: meta_of(CA, CA, Some(ns)),
            role_ref: role_ref("Role", CA),
            subjects: Some(vec![binding_subject(CA, &v.namespace)]),
        }),
        to_json(&deployment(v, g)),
        to_json(&service(g)),
    ]
}

fn deployment(v: &Values, g: GatewaySpec) -> Deployment {
    let value = |name: &str, value: String| EnvVar { name: name.into(), value: Some(value), ..Default::default() };
    let mesh_ns = v.namespace.as_str();
    let container = Container {
        name: "istio-proxy".into(),
        image: Some(v.image()),
        command: Some(vec!["/mesh-agent".into()]),
        args: Some(vec![
            "--mode=gateway".into(),
            "--ca-root-cert=/var/run/mesh-ca/root-cert.pem".into(),
            "--ca-token-file=/var/run/secrets/tokens/mesh-ca-token".into(),
            "--metrics-addr=0.0.0.0:15020".into(),
            "--readiness-addr=0.0.0.0:15021".into(),
        ]),
        env: Some(vec![
            env_from_field("MESH_NODE_NAME", "spec.nodeName"),
            env_from_field("POD_NAME", "metadata.name"),
            env_from_field("POD_NAMESPACE", "metadata.namespace"),
            value("MESH_POD", "$(POD_NAMESPACE)/$(POD_NAME)".into()),
            value("MESH_CONFIG_SOURCE", "kubernetes".into()),
            value("MESH_METRICS_AUTH", "kubernetes".into()),
            value("MESH_TRUST_DOMAIN", v.trust_domain.clone()),
            value("MESH_ROOT_NAMESPACE", v.root_namespace.clone()),
            value("MESH_CERT_TTL", v.cert_ttl.clone()),
            value("MESH_CLUSTER_ID", v.cluster_name.clone()),
            value("MESH_MESH_ID", v.mesh_id.clone()),
            value("MESH_NETWORK", v.network.clone()),
            value("MESH_LOG", v.log_level.clone()),
            value("MESH_CA_ADDRESS", format!("{CA}.{mesh_ns}.svc:15012")),
            value("MESH_CA_SERVER_NAME", format!("{CA}.{mesh_ns}.svc")),
        ]),
        ports: Some(
            [
                ContainerPort { name: Some("http2".into()), container_port: 80, ..Default::default() },
                ContainerPort { name: Some("https".into()), container_port: 443, ..Default::default() },
            ]
            .into_iter()
            .chain(status_ports())
            .collect(),
        ),
        readiness_probe: Some(readiness_probe()),
        security_context: Some(unprivileged()),
        volume_mounts: Some(vec![
            mount("ca-root", "/var/run/mesh-ca", true, None),
            mount("ca-token", "/var/run/secrets/tokens", true, None),
        ]),
        ..Default::default()
    };
    let selector = BTreeMap::from([("istio".to_string(), g.istio_label.to_string())]);
    Deployment {
        metadata: g.meta(Some(g.namespace)),
        spec: Some(DeploymentSpec {
            replicas: Some(1),
            selector: LabelSelector { match_labels: Some(selector), ..Default::default() },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta { labels: Some(g.labels()), ..Default::default() }),
                spec: Some(PodSpec {
                    service_account_name: Some(g.name.into()),
                    // Ports 80 and 443 without a capability, as Istio's gateways do.
                    security_context: Some(PodSecurityContext {
                        sysctls: Some(vec![Sysctl {
                            name: "net.ipv4.ip_unprivileged_port_start".into(),
                            value: "0".into(),
                        }]),
                        ..Default::default()
                    }),
                    containers: vec![container],
                    volumes: Some(vec![ca_root_volume(), ca_token_volume()]),
                    ..Default::default()
                }),
            },
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn service(g: GatewaySpec) -> Service {
    Service {
        metadata: g.meta(Some(g.namespace)),
        spec: Some(ServiceSpec {
            type_: Some(if g.load_balancer { "LoadBalancer" } else { "ClusterIP" }.into()),
            selector: Some(BTreeMap::from([("istio".to_string(), g.istio_label.to_string())])),
            ports: Some(vec![service_port("http2", 80), service_port("https", 443)]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

//! [`Object`]: one parsed object of any kind the mesh reads.

use std::sync::Arc;

use super::resource::KUBE_GATEWAY;
use super::resources::{EndpointSlice, Namespace, NetworkPolicy, ObjectMeta, Pod, Secret, Service, ServiceAccount};
use super::{gateway, gateway_api, istio, linkerd, security, service_entry, telemetry};

/// A parsed object from any source.
#[derive(Debug, Clone, PartialEq)]
pub enum Object {
    /// `v1/Namespace`.
    Namespace(Arc<Namespace>),
    /// `v1/Pod`.
    Pod(Arc<Pod>),
    /// `v1/Service`.
    Service(Arc<Service>),
    /// `discovery.k8s.io/v1/EndpointSlice`: the endpoints of Services without a
    /// selector (and of any the API server knows pods for that the mesh does not).
    EndpointSlice(Arc<EndpointSlice>),
    /// `v1/ServiceAccount`: read so manifests that declare them apply whole; a pod's
    /// identity comes from its `serviceAccountName`.
    ServiceAccount(Arc<ServiceAccount>),
    /// `v1/Secret`: read for the certificates gateways serve; never logged.
    Secret(Arc<Secret>),
    /// `networking.istio.io/*/VirtualService`.
    VirtualService(Arc<istio::VirtualService>),
    /// `networking.istio.io/*/DestinationRule`.
    DestinationRule(Arc<istio::DestinationRule>),
    /// `networking.istio.io/*/Gateway`: served by the gateway workloads it selects;
    /// what VirtualServices bind to.
    Gateway(Arc<gateway::Gateway>),
    /// `networking.istio.io/*/ServiceEntry`: destinations outside the Services.
    ServiceEntry(Arc<service_entry::ServiceEntry>),
    /// `linkerd.io/v1alpha2/ServiceProfile`.
    ServiceProfile(Arc<linkerd::ServiceProfile>),
    /// `split.smi-spec.io/*/TrafficSplit`.
    TrafficSplit(Arc<linkerd::TrafficSplit>),
    /// `security.istio.io/*/PeerAuthentication`.
    PeerAuthentication(Arc<security::PeerAuthentication>),
    /// `security.istio.io/*/AuthorizationPolicy`.
    AuthorizationPolicy(Arc<security::AuthorizationPolicy>),
    /// `gateway.networking.k8s.io/*/GatewayClass` (cluster-scoped).
    GatewayClass(Arc<gateway_api::GatewayClass>),
    /// `gateway.networking.k8s.io/*/Gateway`: a Gateway API gateway, kind
    /// `Gateway.gateway.networking.k8s.io` here to tell it from Istio's.
    KubeGateway(Arc<gateway_api::KubeGateway>),
    /// `gateway.networking.k8s.io/*/HTTPRoute`.
    HttpRoute(Arc<gateway_api::HttpRoute>),
    /// `gateway.networking.k8s.io/*/GRPCRoute`.
    GrpcRoute(Arc<gateway_api::GrpcRoute>),
    /// `gateway.networking.k8s.io/*/ReferenceGrant`.
    ReferenceGrant(Arc<gateway_api::ReferenceGrant>),
    /// `telemetry.istio.io/*/Telemetry`: metrics, access log and tracing settings.
    Telemetry(Arc<telemetry::Telemetry>),
    /// `networking.k8s.io/v1/NetworkPolicy`: enforced by the network plugin, not by the
    /// mesh; read so `meshctl analyze` can say when one blocks what the mesh needs.
    NetworkPolicy(Arc<NetworkPolicy>),
}

impl Object {
    /// `(kind, namespace, name)`; cluster-scoped objects have an empty namespace.
    pub fn key(&self) -> (&'static str, String, String) {
        let (kind, namespace, name) = self.key_ref();
        (kind, namespace.to_string(), name.to_string())
    }

    /// [`Object::key`], borrowed from the object: what a pass over every object of the
    /// config hashes, without two strings allocated per object.
    pub fn key_ref(&self) -> (&'static str, &str, &str) {
        let (kind, meta) = self.kind_and_metadata();
        let namespace = match self {
            Object::Namespace(_) | Object::GatewayClass(_) => "",
            _ => meta.namespace_str(),
        };
        (kind, namespace, &meta.name)
    }

    /// Where the object is held: two `Object`s have the same address only when they
    /// are one parsed object (the metadata lives in the object's own allocation).
    pub fn address(&self) -> usize {
        std::ptr::from_ref(self.metadata()) as usize
    }

    /// The kind's name, as `kind:` writes it.
    pub fn kind(&self) -> &'static str {
        self.kind_and_metadata().0
    }

    /// `metadata`.
    pub fn metadata(&self) -> &ObjectMeta {
        self.kind_and_metadata().1
    }

    fn kind_and_metadata(&self) -> (&'static str, &ObjectMeta) {
        match self {
            Object::Namespace(o) => ("Namespace", &o.metadata),
            Object::Pod(o) => ("Pod", &o.metadata),
            Object::Service(o) => ("Service", &o.metadata),
            Object::ServiceAccount(o) => ("ServiceAccount", &o.metadata),
            Object::EndpointSlice(o) => ("EndpointSlice", &o.metadata),
            Object::Secret(o) => ("Secret", &o.metadata),
            Object::VirtualService(o) => ("VirtualService", &o.metadata),
            Object::DestinationRule(o) => ("DestinationRule", &o.metadata),
            Object::Gateway(o) => ("Gateway", &o.metadata),
            Object::ServiceEntry(o) => ("ServiceEntry", &o.metadata),
            Object::ServiceProfile(o) => ("ServiceProfile", &o.metadata),
            Object::TrafficSplit(o) => ("TrafficSplit", &o.metadata),
            Object::PeerAuthentication(o) => ("PeerAuthentication", &o.metadata),
            Object::AuthorizationPolicy(o) => ("AuthorizationPolicy", &o.metadata),
            Object::NetworkPolicy(o) => ("NetworkPolicy", &o.metadata),
            Object::Telemetry(o) => ("Telemetry", &o.metadata),
            Object::GatewayClass(o) => ("GatewayClass", &o.metadata),
            Object::KubeGateway(o) => (KUBE_GATEWAY, &o.metadata),
            Object::HttpRoute(o) => ("HTTPRoute", &o.metadata),
            Object::GrpcRoute(o) => ("GRPCRoute", &o.metadata),
            Object::ReferenceGrant(o) => ("ReferenceGrant", &o.metadata),
        }
    }
}

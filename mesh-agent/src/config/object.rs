//! [`Object`]: one parsed object of any kind the mesh reads.

use super::resources::{EndpointSlice, Namespace, NetworkPolicy, ObjectMeta, Pod, Service, ServiceAccount};
use super::{istio, linkerd, security};

/// A parsed object from any source.
#[derive(Debug, Clone, PartialEq)]
pub enum Object {
    /// `v1/Namespace`.
    Namespace(Namespace),
    /// `v1/Pod`.
    Pod(Pod),
    /// `v1/Service`.
    Service(Service),
    /// `discovery.k8s.io/v1/EndpointSlice`: the endpoints of Services without a
    /// selector (and of any the API server knows pods for that the mesh does not).
    EndpointSlice(EndpointSlice),
    /// `v1/ServiceAccount`: read so manifests that declare them apply whole; a pod's
    /// identity comes from its `serviceAccountName`.
    ServiceAccount(ServiceAccount),
    /// `networking.istio.io/*/VirtualService`.
    VirtualService(Box<istio::VirtualService>),
    /// `networking.istio.io/*/DestinationRule`.
    DestinationRule(Box<istio::DestinationRule>),
    /// `linkerd.io/v1alpha2/ServiceProfile`.
    ServiceProfile(Box<linkerd::ServiceProfile>),
    /// `split.smi-spec.io/*/TrafficSplit`.
    TrafficSplit(Box<linkerd::TrafficSplit>),
    /// `security.istio.io/*/PeerAuthentication`.
    PeerAuthentication(Box<security::PeerAuthentication>),
    /// `security.istio.io/*/AuthorizationPolicy`.
    AuthorizationPolicy(Box<security::AuthorizationPolicy>),
    /// `networking.k8s.io/v1/NetworkPolicy`: enforced by the network plugin, not by the
    /// mesh; read so `meshctl analyze` can say when one blocks what the mesh needs.
    NetworkPolicy(Box<NetworkPolicy>),
}

impl Object {
    /// `(kind, namespace, name)`; cluster-scoped objects have an empty namespace.
    pub fn key(&self) -> (&'static str, String, String) {
        let meta = self.metadata();
        let namespace = match self {
            Object::Namespace(_) => String::new(),
            _ => meta.namespace_or_default(),
        };
        (self.kind(), namespace, meta.name.clone())
    }

    /// The kind's name, as `kind:` writes it.
    pub fn kind(&self) -> &'static str {
        match self {
            Object::Namespace(_) => "Namespace",
            Object::Pod(_) => "Pod",
            Object::Service(_) => "Service",
            Object::ServiceAccount(_) => "ServiceAccount",
            Object::EndpointSlice(_) => "EndpointSlice",
            Object::VirtualService(_) => "VirtualService",
            Object::DestinationRule(_) => "DestinationRule",
            Object::ServiceProfile(_) => "ServiceProfile",
            Object::TrafficSplit(_) => "TrafficSplit",
            Object::PeerAuthentication(_) => "PeerAuthentication",
            Object::AuthorizationPolicy(_) => "AuthorizationPolicy",
            Object::NetworkPolicy(_) => "NetworkPolicy",
        }
    }

    /// `metadata`.
    pub fn metadata(&self) -> &ObjectMeta {
        match self {
            Object::Namespace(o) => &o.metadata,
            Object::Pod(o) => &o.metadata,
            Object::Service(o) => &o.metadata,
            Object::ServiceAccount(o) => &o.metadata,
            Object::EndpointSlice(o) => &o.metadata,
            Object::VirtualService(o) => &o.metadata,
            Object::DestinationRule(o) => &o.metadata,
            Object::ServiceProfile(o) => &o.metadata,
            Object::TrafficSplit(o) => &o.metadata,
            Object::PeerAuthentication(o) => &o.metadata,
            Object::AuthorizationPolicy(o) => &o.metadata,
            Object::NetworkPolicy(o) => &o.metadata,
        }
    }
}

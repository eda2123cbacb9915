//! [`Object`]: one parsed object of any kind the mesh reads.

use super::resources::{EndpointSlice, Namespace, NetworkPolicy, Pod, Service, ServiceAccount};
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
        match self {
            Object::Namespace(n) => ("Namespace", String::new(), n.metadata.name.clone()),
            Object::Pod(p) => ("Pod", p.metadata.namespace_or_default(), p.metadata.name.clone()),
            Object::Service(s) => ("Service", s.metadata.namespace_or_default(), s.metadata.name.clone()),
            Object::ServiceAccount(s) => ("ServiceAccount", s.metadata.namespace_or_default(), s.metadata.name.clone()),
            Object::EndpointSlice(e) => ("EndpointSlice", e.metadata.namespace_or_default(), e.metadata.name.clone()),
            Object::VirtualService(v) => ("VirtualService", v.metadata.namespace_or_default(), v.metadata.name.clone()),
            Object::DestinationRule(d) => {
                ("DestinationRule", d.metadata.namespace_or_default(), d.metadata.name.clone())
            }
            Object::ServiceProfile(p) => ("ServiceProfile", p.metadata.namespace_or_default(), p.metadata.name.clone()),
            Object::TrafficSplit(t) => ("TrafficSplit", t.metadata.namespace_or_default(), t.metadata.name.clone()),
            Object::PeerAuthentication(p) => {
                ("PeerAuthentication", p.metadata.namespace_or_default(), p.metadata.name.clone())
            }
            Object::AuthorizationPolicy(a) => {
                ("AuthorizationPolicy", a.metadata.namespace_or_default(), a.metadata.name.clone())
            }
            Object::NetworkPolicy(n) => ("NetworkPolicy", n.metadata.namespace_or_default(), n.metadata.name.clone()),
        }
    }
}

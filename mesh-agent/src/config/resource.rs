//! [`Resource`]: an object of one of the custom kinds the mesh reads (Istio, Linkerd,
//! SMI): metadata and spec, with `apiVersion` and `kind` (checked by the parser first)
//! and the controllers' `status` accepted as written.

use serde::Deserialize;

use super::resources::ObjectMeta;
use super::schema::AnyValue;

/// One object of a custom kind with spec type `S`.
///
/// A missing `spec` reads as the default spec here; the kinds that require one
/// ([`SPEC_REQUIRED`]) are refused by the parser before they get this far.
#[derive(Debug, Clone, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Resource<S: Default> {
    /// Metadata.
    pub metadata: ObjectMeta,
    /// Spec.
    #[serde(default)]
    pub spec: S,
    #[serde(default, rename = "apiVersion")]
    _api_version: Option<String>,
    #[serde(default, rename = "kind")]
    _kind: Option<String>,
    /// Written by controllers (status conditions); not read.
    #[serde(default, rename = "status")]
    _status: Option<AnyValue>,
}

impl<S: Default> Resource<S> {
    /// An object built by the mesh itself (the stand-ins of rejected policies).
    pub fn new(metadata: ObjectMeta, spec: S) -> Self {
        Self { metadata, spec, _api_version: None, _kind: None, _status: None }
    }
}

/// The kind a Gateway API Gateway is known by, beside Istio's `Gateway`.
pub const KUBE_GATEWAY: &str = "Gateway.gateway.networking.k8s.io";

/// Kinds whose objects must carry a `spec`; PeerAuthentication and
/// AuthorizationPolicy may omit it (an empty AuthorizationPolicy allows nothing).
pub const SPEC_REQUIRED: &[&str] = &[
    "VirtualService",
    "DestinationRule",
    "Gateway",
    "ServiceProfile",
    "TrafficSplit",
    "GatewayClass",
    KUBE_GATEWAY,
    "HTTPRoute",
    "GRPCRoute",
    "ReferenceGrant",
];

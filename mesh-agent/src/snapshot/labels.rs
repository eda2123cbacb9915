//! What namespaces and pods say about the mesh through their labels and annotations:
//! enrollment, DNS capture, the network they are on.

use std::collections::{BTreeMap, HashMap};

use crate::config::Object;
use crate::state::Workload;

/// Namespace labels that enroll a namespace (Istio sidecar and ambient spellings).
const ENROLL_LABELS: &[(&str, &str)] = &[("istio-injection", "enabled"), ("istio.io/dataplane-mode", "ambient")];
/// Pod labels that opt a pod out of an enrolled namespace.
pub(super) const OPT_OUT_LABELS: &[(&str, &str)] =
    &[("istio.io/dataplane-mode", "none"), ("sidecar.istio.io/inject", "false")];
/// Namespace annotation Linkerd users set for the same purpose (also a pod's own:
/// what `linkerd inject` and `meshctl inject` write into a pod template).
pub const LINKERD_INJECT: (&str, &str) = ("linkerd.io/inject", "enabled");
/// Pod labels that enroll the pod itself in a namespace that is not enrolled (Istio
/// ambient's per-pod label; the sidecar injector's per-pod opt-in).
pub(super) const OPT_IN_LABELS: &[(&str, &str)] =
    &[("istio.io/dataplane-mode", "ambient"), ("sidecar.istio.io/inject", "true")];
/// Namespace label, or pod annotation or label, turning DNS capture on (`"true"`) or
/// off (`"false"`) for its pods, whatever the mesh's default (Istio ambient's key).
pub(super) const DNS_CAPTURE: &str = "ambient.istio.io/dns-capture";

/// What a namespace says about its pods.
#[derive(Debug, Clone, Default, PartialEq)]
pub(super) struct NamespaceModes {
    pub(super) enrolled: bool,
    /// `DNS_CAPTURE`, when it says.
    pub(super) dns_capture: Option<bool>,
    /// [`NETWORK_LABEL`], when it says.
    pub(super) network: Option<String>,
}

/// Istio's network label, on a pod or its namespace: the network its addresses are on.
/// Another network than this cluster's is reached only through that network's
/// east-west gateway.
pub(super) const NETWORK_LABEL: &str = "topology.istio.io/network";

/// `"true"` / `"false"` (any case); anything else says nothing.
pub(super) fn switch(value: Option<&String>) -> Option<bool> {
    match value?.to_ascii_lowercase().as_str() {
        "true" => Some(true),
        "false" => Some(false),
        _ => None,
    }
}

/// What each Namespace among `objects` says about its pods.
pub(super) fn namespace_modes(objects: &[Object]) -> HashMap<String, NamespaceModes> {
    let mut namespaces = HashMap::new();
    for o in objects {
        if let Object::Namespace(ns) = o {
            let by_label = ENROLL_LABELS.iter().any(|(k, v)| ns.metadata.labels.get(*k).is_some_and(|x| x == v));
            let by_annotation = ns.metadata.annotations.get(LINKERD_INJECT.0).is_some_and(|v| v == LINKERD_INJECT.1);
            let modes = NamespaceModes {
                enrolled: by_label || by_annotation,
                dns_capture: switch(ns.metadata.labels.get(DNS_CAPTURE)),
                network: ns.metadata.labels.get(NETWORK_LABEL).cloned(),
            };
            namespaces.insert(ns.metadata.name.clone(), modes);
        }
    }
    namespaces
}

/// Whether a Service in `namespace` with `selector` (not empty) selects `workload` by
/// its namespace and labels (whether it serves is asked apart).
pub(super) fn selects(workload: &Workload, namespace: &str, selector: &BTreeMap<String, String>) -> bool {
    workload.namespace == namespace && selector.iter().all(|(k, v)| workload.labels.get(k) == Some(v))
}

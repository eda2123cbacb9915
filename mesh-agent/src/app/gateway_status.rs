//! Gateway API status, written back by the gateway pods in cluster mode, as a Gateway
//! API controller does: GatewayClasses of the mesh's controller, the Gateways of the
//! pod's own namespace (whose Secrets it reads, so whose listeners it can judge), and
//! on each route the `parents` entries for those Gateways, beside other controllers'.
//!
//! Every gateway pod of a namespace computes the same status from the same objects, so
//! several replicas write the same thing. A write carries the `resourceVersion` it was
//! computed from; a conflict is retried on the next reload. Nothing is written when the
//! object already says it.

use std::collections::HashMap;
use std::sync::Arc;

use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams};
use serde_json::{Value, json};

use crate::config::gateway_api::translate::ObjectStatus;
use crate::config::gateway_api::{CONTROLLER_NAME, GROUP};

/// Follows the statuses each snapshot computes and writes them, off the gateway's
/// reload path; what failed is tried again every `retry`.
pub fn spawn(
    client: kube::Client,
    namespace: String,
    mut statuses: tokio::sync::watch::Receiver<Arc<Vec<ObjectStatus>>>,
    retry: std::time::Duration,
) {
    tokio::spawn(async move {
        let mut writer = StatusWriter::new(client, namespace);
        let mut tick = tokio::time::interval(retry);
        loop {
            tokio::select! {
                changed = statuses.changed() => if changed.is_err() { return },
                _ = tick.tick() => {}
            }
            let latest = statuses.borrow_and_update().clone();
            writer.write(&latest).await;
        }
    });
}

/// Writes the status of what a gateway pod in `namespace` controls.
pub struct StatusWriter {
    client: kube::Client,
    namespace: String,
    /// What was last written per object, to write only what changed.
    written: HashMap<(&'static str, String, String), Value>,
}

impl StatusWriter {
    /// A writer for the gateway pod's `namespace`.
    pub fn new(client: kube::Client, namespace: String) -> Self {
        Self { client, namespace, written: HashMap::new() }
    }

    /// Brings the API objects' status in line with `statuses`.
    pub async fn write(&mut self, statuses: &[ObjectStatus]) {
        for s in statuses {
            let Some(ours) = self.scope(s) else { continue };
            let key = (s.kind, s.namespace.clone(), s.name.clone());
            if self.written.get(&key) == Some(&ours) {
                continue;
            }
            match self.write_one(s, &ours).await {
                Ok(()) => {
                    self.written.insert(key, ours);
                }
                Err(e) => {
                    tracing::info!(kind = s.kind, object = %format!("{}/{}", s.namespace, s.name), error = %e, "status not written; tried again shortly");
                }
            }
        }
        // Objects gone from the config are forgotten.
        self.written.retain(|(kind, ns, name), _| {
            statuses.iter().any(|s| s.kind == *kind && s.namespace == *ns && s.name == *name)
        });
    }

    /// The part of `s` this pod writes: GatewayClasses whole, Gateways of its namespace
    /// whole, and the route parents that are Gateways of its namespace.
    fn scope(&self, s: &ObjectStatus) -> Option<Value> {
        match s.kind {
            "GatewayClass" => Some(s.status.clone()),
            "Gateway" => (s.namespace == self.namespace).then(|| s.status.clone()),
            _ => {
                let parents: Vec<Value> = s.status["parents"]
                    .as_array()?
                    .iter()
                    .filter(|p| parent_namespace(&p["parentRef"], &s.namespace) == self.namespace)
                    .cloned()
                    .collect();
                (!parents.is_empty()).then(|| json!({ "parents": parents }))
            }
        }
    }

    async fn write_one(&self, s: &ObjectStatus, ours: &Value) -> Result<(), String> {
        let (plural, versions): (&str, &[&str]) = match s.kind {
            "GatewayClass" => ("gatewayclasses", &["v1", "v1beta1"]),
            "Gateway" => ("gateways", &["v1", "v1beta1"]),
            "HTTPRoute" => ("httproutes", &["v1", "v1beta1"]),
            _ => ("grpcroutes", &["v1", "v1alpha2"]),
        };
        for version in versions {
            let resource = ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(GROUP, version, s.kind), plural);
            let api: Api<DynamicObject> = if s.namespace.is_empty() {
                Api::all_with(self.client.clone(), &resource)
            } else {
                Api::namespaced_with(self.client.clone(), &s.namespace, &resource)
            };
            let current = match api.get(&s.name).await {
                Ok(o) => o,
                Err(kube::Error::Api(e)) if e.code == 404 => continue,
                Err(e) => return Err(e.to_string()),
            };
            let existing = current.data.get("status").cloned().unwrap_or(Value::Null);
            let now = Timestamp::now().to_string();
            let merged = match s.kind {
                "GatewayClass" | "Gateway" => stamped(ours.clone(), &existing, &now),
                _ => merge_parents(&existing, ours, &now, |p| parent_namespace(p, &s.namespace) == self.namespace),
            };
            if merged == existing {
                return Ok(());
            }
            let patch = json!({
                "metadata": {"resourceVersion": current.metadata.resource_version},
                "status": merged,
            });
            api.patch_status(&s.name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .map_err(|e| e.to_string())?;
            tracing::info!(kind = s.kind, object = %format!("{}/{}", s.namespace, s.name), "status written");
            return Ok(());
        }
        Err(format!("not found in any of {}", versions.join(", ")))
    }
}

/// The namespace a route's `parentRef` names (the route's own when unset).
fn parent_namespace(parent_ref: &Value, route_namespace: &str) -> String {
    parent_ref["namespace"].as_str().unwrap_or(route_namespace).to_string()
}

/// `desired` with each condition's `lastTransitionTime` taken from `existing` where the
/// condition's status did not change, and `now` where it did (conditions are found by
/// type, in the status and in each listener, by name).
fn stamped(mut desired: Value, existing: &Value, now: &str) -> Value {
    stamp(&mut desired["conditions"], &existing["conditions"], now);
    if let Some(listeners) = desired["listeners"].as_array_mut() {
        for l in listeners {
            let before = existing["listeners"]
                .as_array()
                .and_then(|e| e.iter().find(|x| x["name"] == l["name"]))
                .map(|x| x["conditions"].clone())
                .unwrap_or(Value::Null);
            stamp(&mut l["conditions"], &before, now);
        }
    }
    desired
}

fn stamp(desired: &mut Value, existing: &Value, now: &str) {
    let Some(conditions) = desired.as_array_mut() else { return };
    for c in conditions {
        let before = existing.as_array().and_then(|e| e.iter().find(|x| x["type"] == c["type"]));
        c["lastTransitionTime"] = match before {
            Some(b) if b["status"] == c["status"] && b["lastTransitionTime"].is_string() => {
                b["lastTransitionTime"].clone()
            }
            _ => json!(now),
        };
    }
}

/// A route's status with `ours` in place of this controller's entries for the parents
/// `owned` says are ours; every other entry (other controllers', other namespaces'
/// gateways) stays as it is.
fn merge_parents(existing: &Value, ours: &Value, now: &str, owned: impl Fn(&Value) -> bool) -> Value {
    let before: Vec<Value> = existing["parents"].as_array().cloned().unwrap_or_default();
    let is_ours = |p: &Value| p["controllerName"] == CONTROLLER_NAME && owned(&p["parentRef"]);
    let mut parents: Vec<Value> = before.iter().filter(|p| !is_ours(p)).cloned().collect();
    for mut p in ours["parents"].as_array().cloned().unwrap_or_default() {
        let prev = before
            .iter()
            .find(|b| is_ours(b) && b["parentRef"] == p["parentRef"])
            .map(|b| b["conditions"].clone())
            .unwrap_or(Value::Null);
        stamp(&mut p["conditions"], &prev, now);
        parents.push(p);
    }
    let mut merged = if existing.is_object() { existing.clone() } else { json!({}) };
    merged["parents"] = json!(parents);
    merged
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cond(t: &str, s: &str) -> Value {
        json!({"type": t, "status": s, "reason": t, "message": ""})
    }

    #[test]
    fn transition_times_move_only_when_a_condition_changes() {
        let existing = json!({"conditions": [
            {"type": "Accepted", "status": "True", "reason": "Accepted", "message": "", "lastTransitionTime": "T0"},
            {"type": "Programmed", "status": "False", "reason": "Programmed", "message": "", "lastTransitionTime": "T0"},
        ]});
        let desired = json!({"conditions": [cond("Accepted", "True"), cond("Programmed", "True")]});
        let out = stamped(desired, &existing, "T1");
        assert_eq!(out["conditions"][0]["lastTransitionTime"], "T0", "unchanged");
        assert_eq!(out["conditions"][1]["lastTransitionTime"], "T1", "changed");
        // Stamping again with the result is a fixed point: nothing more to write.
        let again = stamped(json!({"conditions": [cond("Accepted", "True"), cond("Programmed", "True")]}), &out, "T2");
        assert_eq!(again, out);
    }

    #[test]
    fn route_parents_of_other_controllers_and_namespaces_stay() {
        let theirs = json!({"parentRef": {"name": "edge", "namespace": "a"}, "controllerName": "example.com/other", "conditions": []});
        let other_ns = json!({"parentRef": {"name": "web", "namespace": "b"}, "controllerName": CONTROLLER_NAME, "conditions": []});
        let stale = json!({"parentRef": {"name": "web", "namespace": "a"}, "controllerName": CONTROLLER_NAME,
            "conditions": [{"type": "Accepted", "status": "True", "lastTransitionTime": "T0"}]});
        let existing = json!({"parents": [theirs.clone(), other_ns.clone(), stale]});
        let ours = json!({"parents": [{"parentRef": {"name": "web", "namespace": "a"}, "controllerName": CONTROLLER_NAME,
            "conditions": [cond("Accepted", "True"), cond("ResolvedRefs", "False")]}]});
        let merged = merge_parents(&existing, &ours, "T1", |p| p["namespace"] == "a");
        let parents = merged["parents"].as_array().unwrap();
        assert_eq!(parents.len(), 3);
        assert_eq!((&parents[0], &parents[1]), (&theirs, &other_ns));
        assert_eq!(parents[2]["conditions"][0]["lastTransitionTime"], "T0");
        assert_eq!(parents[2]["conditions"][1]["lastTransitionTime"], "T1");
    }
}

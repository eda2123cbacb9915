//! `meshctl inject`: workloads in, the same workloads out with their pods enrolled, as
//! `linkerd inject` does for `kubectl get deploy -o yaml | linkerd inject - | kubectl
//! apply -f -`. A sidecarless mesh adds no container: the pod template gets the
//! annotation `linkerd.io/inject: enabled`, which enrolls the pod whatever its
//! namespace says (a pod's own `istio.io/dataplane-mode: none` still opts it out).
//!
//! Everything else passes through unchanged, in order (a `List` as its items, one
//! document each); what was injected or skipped is reported for the user, never mixed
//! into the YAML.

use serde_yaml::{Mapping, Value};

/// The annotation written, and its value: the one the snapshot enrolls a pod by.
pub use crate::snapshot::LINKERD_INJECT as ANNOTATION;

/// Errors of `inject`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A document is not YAML.
    #[error("{source_name}: document {document}: {reason}")]
    Parse {
        /// The input's name (`-` for standard input).
        source_name: String,
        /// Its position, from 1.
        document: usize,
        /// The parser's reason.
        reason: String,
    },
}

/// What happened to one object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// `deployment "web"`, as linkerd names it.
    pub object: String,
    /// Injected, already injected, or skipped and why.
    pub result: Result<Injected, String>,
}

/// How an object's pods were enrolled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Injected {
    /// The annotation was added.
    Added,
    /// It was there already.
    Already,
}

/// The workloads of `input` (YAML or JSON documents; `List`s are opened) with their
/// pod templates annotated, as YAML documents, and what happened to each object.
pub fn inject(source_name: &str, input: &str) -> Result<(String, Vec<Outcome>), Error> {
    let mut out = Vec::new();
    let mut outcomes = Vec::new();
    for (i, doc) in serde_yaml::Deserializer::from_str(input).enumerate() {
        let mut value: Value = serde::Deserialize::deserialize(doc).map_err(|e| Error::Parse {
            source_name: source_name.to_string(),
            document: i + 1,
            reason: e.to_string(),
        })?;
        if value.is_null() {
            continue;
        }
        if kind(&value).ends_with("List") {
            // A list (`kubectl get -o yaml`) is written back as its items, one document
            // each: what `kubectl apply -f -` takes whatever its schema discovery.
            let items = match value.get_mut("items").map(std::mem::take) {
                Some(Value::Sequence(items)) => items,
                _ => Vec::new(),
            };
            for mut item in items {
                outcomes.push(inject_object(&mut item));
                out.push(item);
            }
        } else {
            outcomes.push(inject_object(&mut value));
            out.push(value);
        }
    }
    let mut yaml = String::new();
    for v in &out {
        yaml.push_str("---\n");
        yaml.push_str(&serde_yaml::to_string(v).unwrap_or_default());
    }
    Ok((yaml, outcomes))
}

fn kind(v: &Value) -> &str {
    v.get("kind").and_then(Value::as_str).unwrap_or("")
}

/// Annotates the pod template of one object, where it has one.
fn inject_object(object: &mut Value) -> Outcome {
    let kind = kind(object).to_string();
    let name = object.get("metadata").and_then(|m| m.get("name")).and_then(Value::as_str).unwrap_or("").to_string();
    let described = format!("{} {name:?}", kind.to_ascii_lowercase());
    // Where each kind keeps the metadata of the pods it makes.
    let path: &[&str] = match kind.as_str() {
        "Pod" => &["metadata"],
        "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "ReplicationController" | "Job" => {
            &["spec", "template", "metadata"]
        }
        "CronJob" => &["spec", "jobTemplate", "spec", "template", "metadata"],
        "" => return Outcome { object: described, result: Err("not a Kubernetes object (no kind)".into()) },
        _ => return Outcome { object: described, result: Err(format!("{kind} has no pods to enroll")) },
    };
    if kind == "Pod" {
        // A running pod's metadata cannot enroll it retroactively: it is captured when
        // recreated with the annotation, as linkerd says of injected pods.
        if object.get("status").is_some_and(|s| s.get("phase").is_some()) {
            return Outcome {
                object: described,
                result: Err("a pod that exists is not changed; inject the workload that makes it".into()),
            };
        }
    }
    let mut at = object;
    for key in path {
        let Some(map) = at.as_mapping_mut() else {
            return Outcome { object: described, result: Err(format!("{key}: not a mapping")) };
        };
        at = map.entry(Value::from(*key)).or_insert_with(|| Value::Mapping(Mapping::new()));
    }
    let Some(metadata) = at.as_mapping_mut() else {
        return Outcome { object: described, result: Err("the pod metadata is not a mapping".into()) };
    };
    let annotations = metadata.entry(Value::from("annotations")).or_insert_with(|| Value::Mapping(Mapping::new()));
    if annotations.is_null() {
        *annotations = Value::Mapping(Mapping::new());
    }
    let Some(annotations) = annotations.as_mapping_mut() else {
        return Outcome { object: described, result: Err("metadata.annotations is not a mapping".into()) };
    };
    let already = annotations.get(ANNOTATION.0).and_then(Value::as_str) == Some(ANNOTATION.1);
    annotations.insert(Value::from(ANNOTATION.0), Value::from(ANNOTATION.1));
    Outcome { object: described, result: Ok(if already { Injected::Already } else { Injected::Added }) }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIST: &str = r#"
apiVersion: v1
kind: List
items:
- apiVersion: apps/v1
  kind: Deployment
  metadata: {name: web, namespace: production}
  spec:
    selector: {matchLabels: {app: web}}
    template:
      metadata: {labels: {app: web}, annotations: {prometheus.io/scrape: "true"}}
      spec: {containers: [{name: web, image: web:1}]}
- apiVersion: v1
  kind: Service
  metadata: {name: web, namespace: production}
  spec: {selector: {app: web}, ports: [{port: 80}]}
"#;

    #[test]
    fn a_list_from_kubectl_comes_back_with_its_pods_enrolled_and_the_rest_as_it_was() {
        let (yaml, outcomes) = inject("-", LIST).unwrap();
        let out: Vec<serde_json::Value> =
            serde_yaml::Deserializer::from_str(&yaml).map(|d| serde::Deserialize::deserialize(d).unwrap()).collect();
        let deploy = &out[0];
        assert_eq!(deploy["spec"]["template"]["metadata"]["annotations"]["linkerd.io/inject"], "enabled");
        assert_eq!(deploy["spec"]["template"]["metadata"]["annotations"]["prometheus.io/scrape"], "true");
        assert_eq!(deploy["spec"]["template"]["spec"]["containers"][0]["image"], "web:1", "no container added");
        assert_eq!(out[1]["spec"]["ports"][0]["port"], 80);
        assert_eq!(out.len(), 2, "the list's items, one document each");
        assert_eq!(outcomes[0], Outcome { object: "deployment \"web\"".into(), result: Ok(Injected::Added) });
        assert!(outcomes[1].result.as_ref().unwrap_err().contains("Service has no pods"), "{outcomes:?}");
        // Again: nothing changes.
        let (again, outcomes) = inject("-", &yaml).unwrap();
        assert_eq!(again, yaml);
        assert_eq!(outcomes[0].result, Ok(Injected::Already));
    }

    #[test]
    fn each_workload_kind_is_annotated_where_it_keeps_its_pods() {
        let docs = "kind: CronJob\nmetadata: {name: nightly}\nspec: {jobTemplate: {spec: {template: {spec: {}}}}}\n\
                    ---\nkind: Pod\nmetadata: {name: p, annotations: null}\nspec: {}\n\
                    ---\nkind: Pod\nmetadata: {name: running}\nstatus: {phase: Running}\n";
        let (yaml, outcomes) = inject("w.yaml", docs).unwrap();
        let parsed: Vec<serde_json::Value> =
            serde_yaml::Deserializer::from_str(&yaml).map(|d| serde::Deserialize::deserialize(d).unwrap()).collect();
        assert_eq!(
            parsed[0]["spec"]["jobTemplate"]["spec"]["template"]["metadata"]["annotations"]["linkerd.io/inject"],
            "enabled"
        );
        assert_eq!(parsed[1]["metadata"]["annotations"]["linkerd.io/inject"], "enabled");
        assert!(parsed[2]["metadata"].get("annotations").is_none());
        assert!(outcomes[2].result.is_err());
    }

    #[test]
    fn input_that_is_not_yaml_names_the_document() {
        let e = inject("w.yaml", "kind: Pod\n---\nkind: [\n").unwrap_err().to_string();
        assert!(e.starts_with("w.yaml: document 2:"), "{e}");
    }
}

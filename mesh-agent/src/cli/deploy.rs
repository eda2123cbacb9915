//! The `deploy/` tree, generated from the same objects as `meshctl manifest generate`
//! so the three ways to install cannot drift apart:
//!
//! - `deploy/manifests/<profile>.yaml`: one file per profile, for `kubectl apply -f`;
//! - `deploy/helm/mesh`: a Helm chart (CRDs in `crds/`, the rest templated from the
//!   default profile with `.Values` in place of the values `--set` would change);
//! - `deploy/kustomize`: `base` (the minimal profile) and `overlays/default`,
//!   `overlays/demo`.
//!
//! `cargo xtask manifests` writes it; a unit test fails when a committed file differs,
//! and `mesh-agent/tests/deploy_tools.rs` builds it with the real tools (`kubectl
//! kustomize`, Helm's library) and compares what they make with the profiles.

use std::path::PathBuf;

use super::manifest::{self, Profile, Values};

/// Placeholders rendered into the chart's template, then turned into Helm expressions.
const HELM: &[(&str, &str)] = &[
    ("helm-namespace", "{{ .Release.Namespace }}"),
    ("helm-hub", "{{ .Values.global.hub }}"),
    ("helm-tag", "{{ .Values.global.tag }}"),
    ("helm-log-level", "{{ .Values.global.logging.level | quote }}"),
    ("helm-trust-domain", "{{ .Values.meshConfig.trustDomain | quote }}"),
    ("helm-root-namespace", "{{ .Values.meshConfig.rootNamespace | quote }}"),
    ("helm-outbound-traffic-policy", "{{ .Values.meshConfig.outboundTrafficPolicy.mode | quote }}"),
    ("helm-cert-ttl", "{{ .Values.global.workloadCertTtl | quote }}"),
    ("helm-dns-capture", "{{ .Values.cni.ambient.dnsCapture | quote }}"),
    ("helm-cluster-name", "{{ .Values.global.multiCluster.clusterName | quote }}"),
    ("helm-mesh-id", "{{ .Values.global.meshID | quote }}"),
    ("helm-network", "{{ .Values.global.network | quote }}"),
    ("helm-requests-cpu", "{{ .Values.global.proxy.resources.requests.cpu | quote }}"),
    ("helm-requests-memory", "{{ .Values.global.proxy.resources.requests.memory | quote }}"),
    ("helm-limits-cpu", "{{ .Values.global.proxy.resources.limits.cpu | quote }}"),
    ("helm-limits-memory", "{{ .Values.global.proxy.resources.limits.memory | quote }}"),
];

fn yaml_docs(objects: &[serde_json::Value]) -> String {
    let mut out = String::new();
    for o in objects {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(o).expect("objects serialize"));
    }
    out
}

fn kind(o: &serde_json::Value) -> &str {
    o["kind"].as_str().unwrap_or("")
}

/// Every file of `deploy/`, relative to it, with its contents.
pub fn files() -> Vec<(PathBuf, String)> {
    let mut out = Vec::new();
    for (name, profile) in Profile::ALL {
        let text = manifest::render(&Values::for_profile(profile)).expect("objects serialize");
        out.push((PathBuf::from(format!("manifests/{name}.yaml")), text));
    }
    out.extend(helm_chart());
    out.extend(kustomize());
    out
}

fn helm_chart() -> Vec<(PathBuf, String)> {
    let defaults = Values::for_profile(Profile::Default);
    let version = env!("CARGO_PKG_VERSION");
    // Serialized, not formatted: a `: ` in a hand-written description once made the
    // chart unloadable by Helm.
    let chart = serde_yaml::to_string(&serde_json::json!({
        "apiVersion": "v2",
        "name": "mesh",
        "description": "eBPF-accelerated sidecarless service mesh: one agent per node",
        "type": "application",
        "version": version,
        "appVersion": version,
    }))
    .expect("chart metadata serializes");
    let res = |k: &str, r: &str| defaults.resources.get(&(k.to_string(), r.to_string())).cloned().unwrap_or_default();
    let values = serde_json::json!({
        "global": {
            "hub": defaults.hub,
            "tag": defaults.tag,
            "logging": {"level": defaults.log_level},
            "workloadCertTtl": defaults.cert_ttl,
            "meshID": defaults.mesh_id,
            "multiCluster": {"clusterName": defaults.cluster_name},
            "network": defaults.network,
            "proxy": {"resources": {
                "requests": {"cpu": res("requests", "cpu"), "memory": res("requests", "memory")},
                "limits": {"cpu": res("limits", "cpu"), "memory": res("limits", "memory")},
            }},
        },
        "meshConfig": {
            "trustDomain": defaults.trust_domain,
            "rootNamespace": defaults.root_namespace,
            "outboundTrafficPolicy": {"mode": defaults.outbound_traffic_policy},
        },
        "telemetry": {"enabled": true},
        "cni": {"ambient": {"dnsCapture": defaults.dns_capture == "true"}},
    });
    let values = format!(
        "# Defaults of the `default` profile; the keys are the ones `meshctl install --set` takes.\n{}",
        serde_yaml::to_string(&values).expect("values serialize")
    );
    let mut marked = defaults.clone();
    marked.namespace = "helm-namespace".into();
    marked.hub = "helm-hub".into();
    marked.tag = "helm-tag".into();
    marked.log_level = "helm-log-level".into();
    marked.trust_domain = "helm-trust-domain".into();
    marked.root_namespace = "helm-root-namespace".into();
    marked.outbound_traffic_policy = "helm-outbound-traffic-policy".into();
    marked.cert_ttl = "helm-cert-ttl".into();
    marked.dns_capture = "helm-dns-capture".into();
    marked.cluster_name = "helm-cluster-name".into();
    marked.mesh_id = "helm-mesh-id".into();
    marked.network = "helm-network".into();
    for k in ["requests", "limits"] {
        for r in ["cpu", "memory"] {
            marked.resources.insert((k.into(), r.into()), format!("helm-{k}-{r}"));
        }
    }
    // Helm installs crds/ first and does not template it; the release namespace is
    // Helm's (`helm install -n istio-system --create-namespace`).
    let objects = manifest::objects(&marked);
    let crds: Vec<_> = objects.iter().filter(|o| kind(o) == "CustomResourceDefinition").cloned().collect();
    let mut template = String::from("# Generated by `cargo xtask manifests` from the default profile; do not edit.\n");
    for o in objects.iter().filter(|o| !matches!(kind(o), "CustomResourceDefinition" | "Namespace")) {
        let doc = yaml_docs(std::slice::from_ref(o));
        if kind(o) == "Service" && o["metadata"]["name"] == format!("{}-metrics", manifest::AGENT) {
            template.push_str("{{- if .Values.telemetry.enabled }}\n");
            template.push_str(&doc);
            template.push_str("{{- end }}\n");
        } else {
            template.push_str(&doc);
        }
    }
    for (marker, expr) in HELM {
        template = template.replace(marker, expr);
    }
    vec![
        (PathBuf::from("helm/mesh/Chart.yaml"), chart),
        (PathBuf::from("helm/mesh/values.yaml"), values),
        (PathBuf::from("helm/mesh/crds/crds.yaml"), yaml_docs(&crds)),
        (PathBuf::from("helm/mesh/templates/mesh.yaml"), template),
    ]
}

/// `kind namespace/name`: what kustomize calls a resource's id.
fn id(o: &serde_json::Value) -> (String, String, String) {
    let meta = &o["metadata"];
    let field = |v: &serde_json::Value| v.as_str().unwrap_or("").to_string();
    (kind(o).to_string(), field(&meta["namespace"]), field(&meta["name"]))
}

/// What an overlay adds to the objects of `under`: the objects it does not have (new
/// resources) and those it has otherwise (whole-object strategic-merge patches).
fn overlay(
    under: &[serde_json::Value],
    profile: &[serde_json::Value],
) -> (Vec<serde_json::Value>, Vec<serde_json::Value>) {
    let known: Vec<_> = under.iter().map(id).collect();
    let added = profile.iter().filter(|o| !known.contains(&id(o))).cloned().collect();
    let changed = profile.iter().filter(|o| known.contains(&id(o)) && !under.contains(o)).cloned().collect();
    (added, changed)
}

fn kustomize() -> Vec<(PathBuf, String)> {
    let minimal = manifest::objects(&Values::for_profile(Profile::Minimal));
    let default = manifest::objects(&Values::for_profile(Profile::Default));
    let demo = manifest::objects(&Values::for_profile(Profile::Demo));
    let (extra, default_patches) = overlay(&minimal, &default);
    let crds: Vec<_> = extra.iter().filter(|o| kind(o) == "CustomResourceDefinition").cloned().collect();
    let rest: Vec<_> = extra.iter().filter(|o| kind(o) != "CustomResourceDefinition").cloned().collect();
    let (demo_extra, demo_patches) = overlay(&default, &demo);
    let header = |what: &str| format!("# {what} (whole objects, applied as strategic-merge patches).\n");
    vec![
        (PathBuf::from("kustomize/base/kustomization.yaml"), "resources:\n- mesh.yaml\n".into()),
        (PathBuf::from("kustomize/base/mesh.yaml"), yaml_docs(&minimal)),
        (
            PathBuf::from("kustomize/overlays/default/kustomization.yaml"),
            "resources:\n- ../../base\n- crds.yaml\n- extras.yaml\npatches:\n- path: patches.yaml\n".into(),
        ),
        (PathBuf::from("kustomize/overlays/default/crds.yaml"), yaml_docs(&crds)),
        (PathBuf::from("kustomize/overlays/default/extras.yaml"), yaml_docs(&rest)),
        (
            PathBuf::from("kustomize/overlays/default/patches.yaml"),
            header("The default profile's changes to the minimal one") + &yaml_docs(&default_patches),
        ),
        (
            PathBuf::from("kustomize/overlays/demo/kustomization.yaml"),
            "resources:\n- ../default\n- extras.yaml\npatches:\n- path: demo.yaml\n".into(),
        ),
        (PathBuf::from("kustomize/overlays/demo/extras.yaml"), yaml_docs(&demo_extra)),
        (
            PathBuf::from("kustomize/overlays/demo/demo.yaml"),
            header("The demo profile's changes to the default one") + &yaml_docs(&demo_patches),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn deploy_dir() -> &'static Path {
        Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy"))
    }

    #[test]
    fn committed_deploy_tree_matches_the_generator() {
        for (rel, want) in files() {
            let path = deploy_dir().join(&rel);
            let have = std::fs::read_to_string(&path).unwrap_or_default();
            assert!(have == want, "{} is stale: run cargo xtask manifests", path.display());
        }
    }
}

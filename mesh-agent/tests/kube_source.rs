//! The cluster config source against an API server double that implements list, watch
//! with resourceVersion, bookmarks and 410 Gone as the API conventions specify: adds,
//! updates and deletes; invalid objects; a missing CRD; re-list after 410 without
//! flapping; an API outage that keeps the last state.

mod support;

use std::time::{Duration, Instant};

use mesh_agent::config::kube_source::{KINDS, KubeSource};
use mesh_agent::config::{Object, Reload};
use serde_json::{Value, json};
use support::api_server::{ApiServer, collection_path};

fn path_of(kind: &str) -> String {
    let k = KINDS.iter().find(|k| k.kind == kind).unwrap();
    collection_path(k.group, k.version, k.plural)
}

fn all_collections() -> Vec<String> {
    KINDS.iter().map(|k| collection_path(k.group, k.version, k.plural)).collect()
}

fn client(url: &str) -> kube::Client {
    kube::Client::try_from(kube::Config::new(url.parse().unwrap())).unwrap()
}

fn namespace() -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "production", "labels": {"istio-injection": "enabled"}}})
}

fn pod() -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "myapp-v1", "namespace": "production", "uid": "0d5c", "labels": {"app": "myapp", "version": "v1"}},
        "spec": {"serviceAccountName": "myapp", "nodeName": "node1", "containers": [{"name": "app", "image": "x", "ports": [{"containerPort": 8080, "name": "http"}]}]},
        "status": {"phase": "Running", "podIP": "10.1.2.3", "podIPs": [{"ip": "10.1.2.3"}]}})
}

fn virtual_service(regex: &str) -> Value {
    json!({"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
        "metadata": {"name": "myapp", "namespace": "production", "generation": 3},
        "spec": {"hosts": ["myapp"], "http": [{"match": [{"uri": {"regex": regex}}], "route": [{"destination": {"host": "myapp"}}]}]},
        "status": {"observedGeneration": 3}})
}

fn names(r: &Reload) -> Vec<String> {
    let mut v: Vec<String> = r.objects.iter().map(|o| format!("{} {}/{}", o.key().0, o.key().1, o.key().2)).collect();
    v.sort();
    v
}

fn regex_of(r: &Reload) -> Option<String> {
    r.objects.iter().find_map(|o| match o {
        Object::VirtualService(v) => v.spec.http[0].matches[0].uri.as_ref()?.regex.clone(),
        _ => None,
    })
}

/// Reloads until `f` accepts the result (10 s at most).
async fn until(source: &mut KubeSource, what: &str, mut f: impl FnMut(&Reload) -> bool) -> Reload {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = source.reload();
        if (r.changed || !r.objects.is_empty()) && f(&r) {
            return r;
        }
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn lists_then_follows_adds_updates_and_deletes() {
    let api = ApiServer::new(&all_collections()).await;
    api.apply(&path_of("Namespace"), namespace());
    api.apply(&path_of("Pod"), pod());
    let (mut source, _changes) = KubeSource::start(client(&api.url()));
    let r = until(&mut source, "initial list", |r| r.objects.len() == 2).await;
    assert!(r.new_errors.is_empty(), "{:?}", r.new_errors);
    assert!(source.synced());

    api.apply(&path_of("VirtualService"), virtual_service("/v1/.*"));
    until(&mut source, "added", |r| regex_of(r).as_deref() == Some("/v1/.*")).await;
    api.apply(&path_of("VirtualService"), virtual_service("/v2/.*"));
    until(&mut source, "modified", |r| regex_of(r).as_deref() == Some("/v2/.*")).await;
    api.delete(&path_of("VirtualService"), "production", "myapp");
    let r = until(&mut source, "deleted", |r| regex_of(r).is_none()).await;
    assert_eq!(names(&r), vec!["Namespace /production", "Pod production/myapp-v1"]);
}

#[tokio::test]
async fn kinds_whose_crd_is_missing_do_not_hold_up_the_rest() {
    // No Linkerd or SMI in this cluster: their collections answer 404.
    let served: Vec<String> =
        all_collections().into_iter().filter(|p| !p.contains("linkerd.io") && !p.contains("smi-spec.io")).collect();
    let api = ApiServer::new(&served).await;
    api.apply(&path_of("Namespace"), namespace());
    let (mut source, _changes) = KubeSource::start(client(&api.url()));
    let r = until(&mut source, "synced without the missing kinds", |r| r.objects.len() == 1).await;
    assert_eq!(names(&r), vec!["Namespace /production"]);
}

#[tokio::test]
async fn security_kinds_served_only_as_v1beta1_are_read_at_that_version() {
    // Istio before 1.22 serves security.istio.io at v1beta1 only.
    let served: Vec<String> = KINDS
        .iter()
        .map(|k| {
            let version = if k.group == "security.istio.io" { "v1beta1" } else { k.version };
            collection_path(k.group, version, k.plural)
        })
        .collect();
    let api = ApiServer::new(&served).await;
    let strict = json!({"apiVersion": "security.istio.io/v1beta1", "kind": "PeerAuthentication",
        "metadata": {"name": "default", "namespace": "production"}, "spec": {"mtls": {"mode": "STRICT"}}});
    api.apply(&collection_path("security.istio.io", "v1beta1", "peerauthentications"), strict);
    let (mut source, _changes) = KubeSource::start(client(&api.url()));
    let r = until(&mut source, "the v1beta1 policy", |r| r.objects.len() == 1).await;
    assert_eq!(names(&r), vec!["PeerAuthentication production/default"]);
    assert!(r.new_errors.is_empty(), "{:?}", r.new_errors);
}

#[tokio::test]
async fn an_unserved_security_kind_is_an_error_and_nothing_applies_until_it_is_served() {
    // No AuthorizationPolicy CRD at any version: "no policies" would be a guess.
    let served: Vec<String> = all_collections().into_iter().filter(|p| !p.contains("authorizationpolicies")).collect();
    let api = ApiServer::new(&served).await;
    api.apply(&path_of("Namespace"), namespace());
    let (mut source, _changes) = KubeSource::start(client(&api.url()));
    let deadline = Instant::now() + Duration::from_secs(10);
    let error = loop {
        if let Some(e) = source.standing_errors().first() {
            break e.to_string();
        }
        assert!(Instant::now() < deadline, "no error reported for the unserved kind");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        error.contains("authorizationpolicies.security.istio.io") && error.contains("v1, v1beta1"),
        "names the CRD and the versions tried: {error}"
    );
    assert!(!source.synced(), "nothing is published without the policies");
    assert!(source.reload().objects.is_empty());

    api.serve(&path_of("AuthorizationPolicy"));
    let r = until(&mut source, "published once the kind is served", |r| r.objects.len() == 1).await;
    assert_eq!(names(&r), vec!["Namespace /production"]);
    assert!(source.standing_errors().is_empty(), "the error clears");
}

#[tokio::test]
async fn an_invalid_object_keeps_its_last_good_version_and_a_new_invalid_policy_fails_closed() {
    let api = ApiServer::new(&all_collections()).await;
    api.apply(&path_of("VirtualService"), virtual_service("/v1/.*"));
    let (mut source, _changes) = KubeSource::start(client(&api.url()));
    until(&mut source, "good version", |r| regex_of(r).is_some()).await;

    api.apply(&path_of("VirtualService"), virtual_service("("));
    let r = until(&mut source, "bad edit reported", |r| !r.new_errors.is_empty()).await;
    let e = r.new_errors[0].to_string();
    assert!(e.contains("VirtualService production/myapp") && e.contains("spec.http[0].match[0].uri.regex"), "{e}");
    assert_eq!(regex_of(&r).as_deref(), Some("/v1/.*"), "the last good version stays in force");
    assert_eq!(source.standing_errors().len(), 1);

    let bad_policy = json!({"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
        "metadata": {"name": "p", "namespace": "production"},
        "spec": {"selector": {"matchLabels": {"app": "myapp"}}, "rules": [{"from": [{"source": {"ipBlocks": ["10.0.0.0/99"]}}]}]}});
    api.apply(&path_of("AuthorizationPolicy"), bad_policy);
    let r = until(&mut source, "fail closed", |r| {
        r.objects.iter().any(|o| matches!(o, Object::AuthorizationPolicy(a) if a.is_fail_closed_placeholder()))
    })
    .await;
    assert!(r.new_errors.iter().any(|e| e.to_string().contains("allow nothing until it is fixed")));
}

#[tokio::test]
async fn a_relist_after_410_gone_brings_news_without_flapping() {
    let api = ApiServer::new(&all_collections()).await;
    api.apply(&path_of("Namespace"), namespace());
    api.apply(&path_of("Pod"), pod());
    let (mut source, _changes) = KubeSource::start(client(&api.url()));
    until(&mut source, "initial list", |r| r.objects.len() == 2).await;

    // History compacted, then the watches end: resuming from their versions gets
    // 410, so the watchers list again.
    api.compact();
    api.apply(&path_of("VirtualService"), virtual_service("/after/.*"));
    api.drop_watches().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = source.reload();
        if r.changed {
            assert!(
                names(&r).contains(&"Pod production/myapp-v1".to_string()),
                "the pod flapped away: {:?}",
                names(&r)
            );
        }
        if regex_of(&r).as_deref() == Some("/after/.*") {
            break;
        }
        assert!(Instant::now() < deadline, "re-list never brought the VirtualService");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(api.gone_sent() > 0, "no watch was answered 410: the re-list path was not taken");
}

#[tokio::test]
async fn an_api_outage_keeps_the_last_state_and_catches_up_after() {
    let api = ApiServer::new(&all_collections()).await;
    api.apply(&path_of("Namespace"), namespace());
    let (mut source, _changes) = KubeSource::start(client(&api.url()));
    until(&mut source, "initial list", |r| r.objects.len() == 1).await;

    api.stop().await;
    api.apply(&path_of("Pod"), pod());
    let r = until(&mut source, "the outage is seen", |r| r.unavailable.is_some()).await;
    assert!(!r.changed, "nothing changes while the API is away");
    assert_eq!(r.objects.len(), 1, "the last state keeps serving");
    assert!(r.unavailable.as_deref().is_some_and(|u| u.starts_with("watching ")), "{:?}", r.unavailable);
    assert!(source.synced());

    api.start().await;
    let r = until(&mut source, "caught up after the outage", |r| r.objects.len() == 2).await;
    assert_eq!(names(&r), vec!["Namespace /production", "Pod production/myapp-v1"]);
    let r = until(&mut source, "the outage is over", |r| r.unavailable.is_none()).await;
    assert_eq!(r.objects.len(), 2);
}

#[tokio::test]
async fn a_service_without_selector_follows_its_endpoint_slices() {
    use mesh_agent::snapshot::Snapshot;
    let api = ApiServer::new(&all_collections()).await;
    api.apply(&path_of("Namespace"), namespace());
    api.apply(
        &path_of("Service"),
        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "db", "namespace": "production"},
            "spec": {"clusterIP": "10.96.0.30", "ports": [{"name": "sql", "port": 5432}]}}),
    );
    let slice = |ready: bool| {
        json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "db-x7k2p", "namespace": "production", "labels": {"kubernetes.io/service-name": "db"}},
            "addressType": "IPv4", "ports": [{"name": "sql", "port": 15432, "protocol": "TCP"}],
            "endpoints": [{"addresses": ["192.0.2.10"], "conditions": {"ready": ready}}]})
    };
    api.apply(&path_of("EndpointSlice"), slice(true));
    let (mut source, _changes) = KubeSource::start(client(&api.url()));
    let endpoints = |r: &Reload| {
        Snapshot::compile(&r.objects, "cluster.local", 1)
            .endpoints("production/db", None, 5432)
            .into_iter()
            .map(|(_, a)| a.to_string())
            .collect::<Vec<_>>()
    };
    until(&mut source, "endpoint from the slice", |r| endpoints(r) == ["192.0.2.10:15432"]).await;
    api.apply(&path_of("EndpointSlice"), slice(false));
    until(&mut source, "not ready: no endpoint", |r| r.changed && endpoints(r).is_empty()).await;
    api.apply(&path_of("EndpointSlice"), slice(true));
    until(&mut source, "ready again", |r| endpoints(r).len() == 1).await;
    api.delete(&path_of("EndpointSlice"), "production", "db-x7k2p");
    until(&mut source, "slice deleted", |r| r.changed && endpoints(r).is_empty()).await;
}

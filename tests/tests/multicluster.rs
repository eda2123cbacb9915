//! Two clusters on two networks (`cargo xtask lab up --clusters 2`, see
//! `examples/multicluster`): real clients in cluster1 reach Services of cluster2
//! through the east-west gateways, as themselves; locality load balancing prefers the
//! local cluster and fails over and back; cluster2's policies judge cluster1's
//! identities; a removed remote secret ends the discovery.
#![forbid(unsafe_code)]

use std::time::{Duration, Instant};

use mesh_tests::harness::{answered_by, apply_yaml, eventually, eventually_within, inbound_from, two_clusters};
use mesh_tests::lab::Lab;

/// `greeter`, only in cluster2.
const GREETER: &str = "http://10.97.0.20/";
/// `helloworld` as cluster1 has it (endpoints in both clusters).
const HELLOWORLD: &str = "http://10.96.0.10:5000/";
/// The east-west gateway of network2: the only way into it.
const NETWORK2_GATEWAY: &str = "10.20.1.100";

/// The pod that answered a GET of `url` from `sleep`, and the peer it saw.
fn answered(lab: &Lab, url: &str) -> Option<(String, String)> {
    answered_by(lab, "sleep", url)
}

#[test]
fn a_client_in_cluster1_reaches_cluster2_through_the_gateways_as_itself() {
    let Some(clusters) = two_clusters("a_client_in_cluster1_reaches_cluster2_through_the_gateways_as_itself") else {
        return;
    };
    let (one, two) = (&clusters.cluster1, &clusters.cluster2);
    // The networks are apart: cluster1's node has no route to cluster2's pods.
    let direct = one
        .host_command("node1", &["curl".into(), "-s".into(), "-m".into(), "2".into(), "http://10.20.2.2:8080/".into()]);
    let direct = direct.unwrap().output().unwrap();
    assert!(!direct.status.success(), "cluster2's pods are not routed from cluster1");

    // A Service only cluster2 has, by its address there: through network2's gateway.
    let (pod, peer) = eventually("greeter answers sleep", || answered(one, GREETER));
    assert_eq!(pod, "greeter");
    assert!(peer.starts_with(NETWORK2_GATEWAY), "the stream came through the east-west gateway: {peer}");
    // The server's agent authenticated sleep itself (the inner tunnel), not the gateway.
    let sleep = "spiffe://cluster.local/ns/sample/sa/sleep";
    assert!(inbound_from(two, "c2-node2", "greeter", sleep) >= 1, "greeter's agent saw {sleep}");
    // ... and names its source by that identity, with the cluster it runs in, once
    // cluster2 has read cluster1 through its own remote secret (a connection opened
    // before then is labelled with the identity alone).
    let named = || {
        mesh_tests::harness::metrics(two, "c2-node2").lines().any(|l| {
            l.starts_with("istio_tcp_connections_opened_total{")
                && l.contains(r#"reporter="destination""#)
                && l.contains(r#"source_workload="sleep""#)
                && l.contains(r#"source_cluster="cluster1""#)
                && l.contains(r#"destination_cluster="cluster2""#)
        })
    };
    eventually("greeter's agent reports source_workload sleep of cluster1", || {
        answered(one, GREETER);
        named().then_some(())
    });
    assert_eq!(
        inbound_from(two, "c2-node2", "greeter", "spiffe://cluster.local/ns/istio-system/sa/istio-eastwestgateway"),
        0
    );

    // A DENY in cluster2 on cluster1's principal holds, and lifting it lets sleep back.
    let deny = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: no-sleep, namespace: sample}\n\
                spec:\n  selector: {matchLabels: {app: greeter}}\n  action: DENY\n  \
                rules: [{from: [{source: {principals: [cluster.local/ns/sample/sa/sleep]}}]}]\n";
    apply_yaml(two, "deny-sleep.yaml", deny);
    eventually("cluster2 refuses sleep", || answered(one, GREETER).is_none().then_some(()));
    for _ in 0..3 {
        assert!(answered(one, GREETER).is_none(), "the DENY holds");
    }
    two.delete(std::path::Path::new("deny-sleep.yaml")).unwrap();
    eventually("greeter answers sleep again", || answered(one, GREETER));

    // Removing cluster1's remote secret for cluster2 ends the discovery: greeter's
    // address means nothing in cluster1 any more. Put back, it comes back.
    let secret = clusters.remove_remote_secret("cluster1", "cluster2").unwrap();
    eventually_within("cluster1 forgets cluster2", Duration::from_secs(20), || {
        answered(one, GREETER).is_none().then_some(())
    });
    let dump = config_dump(one, "node1");
    assert!(!dump.contains("greeter"), "no greeter in node1's config any more");
    clusters.restore_remote_secret("cluster1", "cluster2", &secret).unwrap();
    eventually_within("cluster1 finds cluster2 again", Duration::from_secs(20), || answered(one, GREETER));
}

#[test]
fn a_service_in_both_clusters_prefers_local_fails_over_to_cluster2_and_comes_back() {
    let Some(mut clusters) =
        two_clusters("a_service_in_both_clusters_prefers_local_fails_over_to_cluster2_and_comes_back")
    else {
        return;
    };
    // Local endpoints first: helloworld-v1 is in cluster1, v2 in cluster2, once
    // cluster1 has read cluster2 (greeter, only there, answering says it has).
    eventually("cluster1 reads cluster2", || answered(&clusters.cluster1, GREETER));
    for _ in 0..6 {
        let (pod, _) = answered(&clusters.cluster1, HELLOWORLD).expect("helloworld answers");
        assert_eq!(pod, "helloworld-v1", "the local cluster's endpoint serves while it is healthy");
    }
    // The local pod dies: the failed request ejects it, and cluster2 serves.
    clusters.cluster1.kill_app("helloworld-v1").unwrap();
    let died = Instant::now();
    let (pod, peer) = eventually("cluster2 serves helloworld", || {
        answered(&clusters.cluster1, HELLOWORLD).filter(|(pod, _)| pod == "helloworld-v2")
    });
    let failed_over = died.elapsed();
    assert!(peer.starts_with(NETWORK2_GATEWAY), "{pod} reached through network2's gateway: {peer}");
    eprintln!("failed over to cluster2 {failed_over:?} after the local pod died");
    assert!(failed_over < Duration::from_secs(5), "within the outlier detection's reach: {failed_over:?}");
    for _ in 0..4 {
        assert_eq!(answered(&clusters.cluster1, HELLOWORLD).map(|(p, _)| p).as_deref(), Some("helloworld-v2"));
    }
    // It comes back: once its ejection (baseEjectionTime 5s) ends, the local pod serves.
    clusters.cluster1.restart_app("helloworld-v1").unwrap();
    eventually_within("helloworld-v1 serves again", Duration::from_secs(20), || {
        answered(&clusters.cluster1, HELLOWORLD).filter(|(pod, _)| pod == "helloworld-v1")
    });
    for _ in 0..4 {
        assert_eq!(answered(&clusters.cluster1, HELLOWORLD).map(|(p, _)| p).as_deref(), Some("helloworld-v1"));
    }
}

/// `node`'s `/config_dump`.
fn config_dump(lab: &Lab, node: &str) -> String {
    let n = lab.node(node).unwrap();
    let out =
        mesh_tests::sys::output(&["ip", "netns", "exec", &n.netns, "curl", "-s", "http://127.0.0.1:15000/config_dump"])
            .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

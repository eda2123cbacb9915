//! The DNS proxy in-process: what it answers from the mesh's names and what it leaves
//! to the upstream, with real UDP sockets on loopback for the serving loop.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use hickory_proto::op::{Edns, Message, MessageType, ResponseCode};
use hickory_proto::rr::rdata::SRV;
use hickory_proto::rr::{Name, RData, Record, RecordType};
use prometheus_client::registry::Registry;
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;

use super::{DnsContext, Reply, Upstream, answer, serve, serve_tcp};
use crate::config::parse_documents;
use crate::snapshot::Snapshot;
use crate::telemetry::Metrics;

const CONFIG: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: production, labels: {istio-injection: enabled}}
---
apiVersion: v1
kind: Pod
metadata: {name: web-0, namespace: production, labels: {app: web}}
spec: {nodeName: node1}
status: {podIP: 10.10.1.5, podIPs: [{ip: 10.10.1.5}, {ip: "fd00::5"}], phase: Running}
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: production, labels: {app: web}}
spec: {nodeName: node1}
status: {podIP: 10.10.1.6, phase: Running}
---
apiVersion: v1
kind: Service
metadata: {name: myapp, namespace: production}
spec: {clusterIP: 10.96.0.20, ports: [{port: 80}], selector: {app: web}}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: production}
spec: {clusterIP: None, ports: [{port: 80}], selector: {app: web}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: db, namespace: production}
spec:
  hosts: [db.internal]
  addresses: [192.0.2.10, 198.51.100.0/24]
  ports: [{number: 5432, name: tcp, protocol: TCP}]
  resolution: STATIC
  endpoints: [{address: 203.0.113.7}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: api, namespace: production}
spec:
  hosts: [api.example.com]
  ports: [{number: 443, name: tls, protocol: TLS}]
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: partners, namespace: production}
spec:
  hosts: ["*.partner.example"]
  ports: [{number: 443, name: tls, protocol: TLS}]
  resolution: NONE
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: private, namespace: billing}
spec:
  hosts: [ledger.internal]
  addresses: [192.0.2.99]
  ports: [{number: 80, name: http, protocol: HTTP}]
  exportTo: ["."]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: passthrough, namespace: production}
spec:
  hosts: [legacy.example.com]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: NONE
"#;

fn snapshot() -> Snapshot {
    Snapshot::compile(&parse_documents(Path::new("dns.yaml"), CONFIG).unwrap(), "cluster.local", 1)
}

fn query(name: &str, kind: RecordType) -> Vec<u8> {
    let mut m = Message::query();
    m.metadata.id = 0x4242;
    m.metadata.recursion_desired = true;
    m.add_query(hickory_proto::op::Query::query(Name::from_ascii(name).unwrap(), kind));
    m.to_vec().unwrap()
}

/// The addresses of an answered query; panics when the proxy would forward it.
fn addresses(reply: Reply) -> Vec<IpAddr> {
    let Reply::Answered(bytes) = reply else { panic!("forwarded, expected an answer") };
    let m = Message::from_vec(&bytes).unwrap();
    assert_eq!(m.metadata.id, 0x4242);
    assert_eq!(m.metadata.message_type, MessageType::Response);
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(m.metadata.recursion_desired && m.metadata.recursion_available);
    m.answers
        .iter()
        .map(|r| {
            assert_eq!(r.ttl, super::ANSWER_TTL);
            match &r.data {
                RData::A(a) => IpAddr::V4(a.0),
                RData::AAAA(a) => IpAddr::V6(a.0),
                other => panic!("unexpected record {other:?}"),
            }
        })
        .collect()
}

fn ips(list: &[&str]) -> Vec<IpAddr> {
    list.iter().map(|s| s.parse().unwrap()).collect()
}

#[test]
fn services_are_answered_with_their_cluster_ip_or_their_ready_pods() {
    let s = snapshot();
    let a = |name: &str, kind| answer(&s, "production", &query(name, kind));
    assert_eq!(addresses(a("myapp.production.svc.cluster.local.", RecordType::A)), ips(&["10.96.0.20"]));
    assert_eq!(addresses(a("MyApp.Production.svc.cluster.local", RecordType::A)), ips(&["10.96.0.20"]));
    // A known name without an address of the family: NODATA, not a trip upstream.
    assert_eq!(addresses(a("myapp.production.svc.cluster.local.", RecordType::AAAA)), ips(&[]));
    // Headless: the pods themselves, each family apart.
    assert_eq!(addresses(a("web.production.svc.cluster.local.", RecordType::A)), ips(&["10.10.1.5", "10.10.1.6"]));
    assert_eq!(addresses(a("web.production.svc.cluster.local.", RecordType::AAAA)), ips(&["fd00::5"]));
    // Services are seen from every namespace, as the cluster DNS shows them.
    assert_eq!(addresses(answer(&s, "other", &query("myapp.production.svc.cluster.local.", RecordType::A))).len(), 1);
}

#[test]
fn service_entry_hosts_get_their_addresses_or_an_allocated_one() {
    let s = snapshot();
    let a = |name: &str, ns: &str| answer(&s, ns, &query(name, RecordType::A));
    // Its single addresses; a block names no one host.
    assert_eq!(addresses(a("db.internal.", "production")), ips(&["192.0.2.10"]));
    // No addresses: one from 240.240.0.0/16, the same for every pod and agent.
    let allocated = addresses(a("api.example.com.", "production"));
    assert_eq!(allocated.len(), 1);
    let IpAddr::V4(v4) = allocated[0] else { panic!("{allocated:?}") };
    assert_eq!(&v4.octets()[..2], &[240, 240]);
    assert_eq!(addresses(a("api.example.com.", "elsewhere")), allocated);
    // ... and a connection to it is the entry's, by its address alone (TCP included).
    let dialed = SocketAddr::new(allocated[0], 443);
    let entry = s.external.by_address(dialed, "production").expect("the allocated address names the entry");
    assert_eq!(entry.key, "production/api");
    assert_eq!(
        entry.target(dialed, None),
        crate::traffic::external::ExternalTarget::Lookup("api.example.com".into(), 443),
        "an allocated address is looked up by the host it stands for"
    );
    // exportTo: [.] hides an entry from other namespaces' pods.
    assert_eq!(addresses(a("ledger.internal.", "billing")), ips(&["192.0.2.99"]));
    assert_eq!(a("ledger.internal.", "production"), Reply::Forward);
    // Wildcards and NONE get no address: the name goes upstream.
    assert_eq!(a("x.partner.example.", "production"), Reply::Forward);
    assert_eq!(a("legacy.example.com.", "production"), Reply::Forward);
}

#[test]
fn everything_else_is_left_to_the_upstream() {
    let s = snapshot();
    let forwarded = |bytes: Vec<u8>| assert_eq!(answer(&s, "production", &bytes), Reply::Forward);
    // Other record types, of names the mesh knows too: SRV must reach the cluster DNS.
    forwarded(query("_http._tcp.myapp.production.svc.cluster.local.", RecordType::SRV));
    forwarded(query("myapp.production.svc.cluster.local.", RecordType::SRV));
    forwarded(query("myapp.production.svc.cluster.local.", RecordType::TXT));
    forwarded(query("20.0.96.10.in-addr.arpa.", RecordType::PTR));
    // Names it does not know: a search-list expansion, another cluster's, the world's.
    forwarded(query("myapp.production.svc.cluster.local.production.svc.cluster.local.", RecordType::A));
    forwarded(query("nothere.production.svc.cluster.local.", RecordType::A));
    forwarded(query("example.org.", RecordType::A));
    // Not a question it can parse, or not one question.
    forwarded(vec![0x42; 7]);
    forwarded(Vec::new());
    let mut two = Message::from_vec(&query("db.internal.", RecordType::A)).unwrap();
    two.add_query(hickory_proto::op::Query::query(Name::from_ascii("db.internal.").unwrap(), RecordType::AAAA));
    forwarded(two.to_vec().unwrap());
}

#[test]
fn an_answer_too_large_for_udp_is_truncated_so_the_resolver_asks_over_tcp() {
    let mut yaml = String::from(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: big, labels: {istio-injection: enabled}}\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {name: many, namespace: big}\n\
         spec: {clusterIP: None, ports: [{port: 80}], selector: {app: many}}\n",
    );
    for i in 0..100 {
        yaml.push_str(&format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: p{i}, namespace: big, labels: {{app: many}}}}\n\
             spec: {{nodeName: node1}}\nstatus: {{podIP: 10.20.0.{i}, phase: Running}}\n"
        ));
    }
    let s = Snapshot::compile(&parse_documents(Path::new("big.yaml"), &yaml).unwrap(), "cluster.local", 1);
    let Reply::Answered(bytes) = answer(&s, "big", &query("many.big.svc.cluster.local.", RecordType::A)) else {
        panic!("forwarded")
    };
    assert!(bytes.len() <= 512);
    let m = Message::from_vec(&bytes).unwrap();
    assert!(m.metadata.truncation && m.answers.is_empty());
    // A resolver that says it takes 4096 bytes gets all hundred.
    let mut big = Message::from_vec(&query("many.big.svc.cluster.local.", RecordType::A)).unwrap();
    let mut edns = Edns::new();
    edns.set_max_payload(4096);
    big.set_edns(edns);
    assert_eq!(addresses(answer(&s, "big", &big.to_vec().unwrap())).len(), 100);
    // Over TCP nothing is truncated.
    let tcp = super::answer_tcp(&s, "big", &query("many.big.svc.cluster.local.", RecordType::A));
    assert_eq!(addresses(tcp).len(), 100);
}

/// An upstream server on loopback: answers every query with one SRV record, and says
/// how many it saw.
async fn upstream() -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    let seen = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = seen.clone();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        while let Ok((n, from)) = socket.recv_from(&mut buf).await {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let q = Message::from_vec(&buf[..n]).unwrap();
            let mut r = Message::response(q.metadata.id, q.metadata.op_code);
            r.add_queries(q.queries.iter().cloned());
            let target = Name::from_ascii("web-0.web.production.svc.cluster.local.").unwrap();
            r.add_answer(Record::from_rdata(q.queries[0].name().clone(), 5, RData::SRV(SRV::new(0, 50, 80, target))));
            socket.send_to(&r.to_vec().unwrap(), from).await.unwrap();
        }
    });
    (addr, seen)
}

#[tokio::test]
async fn the_pods_proxy_answers_it_forwards_the_rest_unchanged_and_serves_only_the_pod() {
    let yaml = CONFIG.replace("podIP: 10.10.1.6", "podIP: 127.0.0.61");
    let snap = Snapshot::compile(&parse_documents(Path::new("dns.yaml"), &yaml).unwrap(), "cluster.local", 1);
    let pod = snap.workloads.iter().find(|w| w.name == "web-1").unwrap().clone();
    let (upstream_addr, seen) = upstream().await;
    let mut registry = Registry::default();
    let metrics = Arc::new(Metrics::new(&mut registry));
    let ctx = DnsContext {
        workload: pod,
        snapshot: Arc::new(ArcSwap::from_pointee(snap)),
        upstream: Arc::new(Upstream::new(vec![upstream_addr])),
        metrics: metrics.clone(),
    };
    let proxy = UdpSocket::bind("127.0.0.62:0").await.unwrap();
    let proxy_addr = proxy.local_addr().unwrap();
    let stop = CancellationToken::new();
    tokio::spawn(serve(ctx, proxy.into(), stop.clone()));

    let client = UdpSocket::bind("127.0.0.61:0").await.unwrap();
    let ask = |bytes: Vec<u8>| {
        let client = &client;
        async move {
            client.send_to(&bytes, proxy_addr).await.unwrap();
            let mut buf = vec![0u8; 4096];
            let (n, from) = tokio::time::timeout(Duration::from_secs(5), client.recv_from(&mut buf))
                .await
                .expect("an answer")
                .unwrap();
            assert_eq!(from, proxy_addr);
            Message::from_vec(&buf[..n]).unwrap()
        }
    };
    let a = ask(query("myapp.production.svc.cluster.local.", RecordType::A)).await;
    assert!(matches!(&a.answers[0].data, RData::A(ip) if ip.0.to_string() == "10.96.0.20"));
    assert_eq!(seen.load(std::sync::atomic::Ordering::SeqCst), 0, "answered without the upstream");

    let srv = ask(query("_http._tcp.web.production.svc.cluster.local.", RecordType::SRV)).await;
    assert_eq!(srv.metadata.id, 0x4242);
    assert!(matches!(&srv.answers[0].data, RData::SRV(s) if s.port == 80 && s.weight == 50), "{srv:?}");
    assert_eq!(seen.load(std::sync::atomic::Ordering::SeqCst), 1);

    // A datagram larger than any query: dropped, nothing sent upstream.
    client.send_to(&vec![0u8; 5000], proxy_addr).await.unwrap();
    // Another address reaching the pod's proxy is not the pod: no answer, nothing sent.
    let stranger = UdpSocket::bind("127.0.0.63:0").await.unwrap();
    stranger.send_to(&query("example.org.", RecordType::A), proxy_addr).await.unwrap();
    let mut buf = [0u8; 512];
    assert!(tokio::time::timeout(Duration::from_millis(300), stranger.recv_from(&mut buf)).await.is_err());
    assert_eq!(seen.load(std::sync::atomic::Ordering::SeqCst), 1);

    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    for (outcome, n) in [("answered", 1), ("forwarded", 1), ("refused", 2)] {
        assert!(text.contains(&format!("mesh_dns_requests_total{{outcome=\"{outcome}\"}} {n}")), "{outcome}: {text}");
    }
    stop.cancel();
}

/// A DNS-over-TCP upstream on loopback: answers each query with one SRV record.
async fn tcp_upstream() -> SocketAddr {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let mut len = [0u8; 2];
            tcp.read_exact(&mut len).await.unwrap();
            let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
            tcp.read_exact(&mut buf).await.unwrap();
            let q = Message::from_vec(&buf).unwrap();
            let mut r = Message::response(q.metadata.id, q.metadata.op_code);
            r.add_queries(q.queries.iter().cloned());
            let target = Name::from_ascii("web-0.web.production.svc.cluster.local.").unwrap();
            r.add_answer(Record::from_rdata(q.queries[0].name().clone(), 5, RData::SRV(SRV::new(0, 50, 80, target))));
            let bytes = r.to_vec().unwrap();
            tcp.write_all(&(bytes.len() as u16).to_be_bytes()).await.unwrap();
            tcp.write_all(&bytes).await.unwrap();
        }
    });
    addr
}

#[tokio::test]
async fn over_tcp_the_mesh_answers_in_full_and_the_rest_goes_upstream_over_tcp() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut registry = Registry::default();
    let snap = snapshot();
    let ctx = DnsContext {
        workload: snap.workloads[0].clone(),
        snapshot: Arc::new(ArcSwap::from_pointee(snap)),
        upstream: Arc::new(Upstream::new(vec![tcp_upstream().await])),
        metrics: Arc::new(Metrics::new(&mut registry)),
    };
    let (mut client, server) = tokio::io::duplex(64 * 1024);
    tokio::spawn(serve_tcp(ctx, server));
    // Two queries on one connection, as RFC 7766 allows.
    for (name, kind) in [
        ("myapp.production.svc.cluster.local.", RecordType::A),
        ("_http._tcp.web.production.svc.cluster.local.", RecordType::SRV),
    ] {
        let q = query(name, kind);
        client.write_all(&(q.len() as u16).to_be_bytes()).await.unwrap();
        client.write_all(&q).await.unwrap();
        let mut len = [0u8; 2];
        tokio::time::timeout(Duration::from_secs(5), client.read_exact(&mut len)).await.unwrap().unwrap();
        let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
        client.read_exact(&mut buf).await.unwrap();
        let m = Message::from_vec(&buf).unwrap();
        assert_eq!(m.metadata.id, 0x4242);
        match kind {
            RecordType::A => assert!(matches!(&m.answers[0].data, RData::A(ip) if ip.0.to_string() == "10.96.0.20")),
            _ => assert!(matches!(&m.answers[0].data, RData::SRV(s) if s.port == 80), "{m:?}"),
        }
    }
}

#[test]
fn upstreams_come_from_resolv_conf_nameservers() {
    let conf = "# generated\nsearch production.svc.cluster.local svc.cluster.local\nnameserver 10.96.0.10\n\
                nameserver fe80::1%eth0 # link-local\noptions ndots:5\nnameserver bogus\n";
    assert_eq!(
        Upstream::from_resolv_conf(conf),
        vec!["10.96.0.10:53".parse::<SocketAddr>().unwrap(), "[fe80::1]:53".parse().unwrap()]
    );
}

//! The service graph the mesh's own dashboard draws: workloads as nodes, and per edge
//! the request rate, error rate, p99 latency, TCP throughput and whether the traffic
//! was mTLS, over the last minute.
//!
//! It is read from the agent's own metric exposition (sampled every
//! [`SAMPLE_EVERY`]), not from counters of its own: the data path pays nothing for the
//! dashboard, and the page cannot disagree with what Prometheus and Kiali read from the
//! same series. Rates and the p99 are computed as `rate(...[1m])` and
//! `histogram_quantile(0.99, ...)` compute them. While no connection is open or opened
//! the series cannot move, so the sampler takes the last reading again instead of
//! encoding and parsing the whole registry ([`Sampler::unchanged`]): an idle agent
//! runs none of that code, and its pages stay unmapped (`code_pages`).
//!
//! An agent sees its node's side of each connection: `reporter="source"` for its pods'
//! outbound traffic, `reporter="destination"` for their inbound. [`Graph::merge`] joins
//! agents' graphs and keeps, per edge, the destination's report where there is one (as
//! Kiali does), so an edge seen by both ends counts once.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// How often the exposition is sampled.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(5);
/// The window rates are computed over (Kiali's default).
pub const WINDOW: Duration = Duration::from_secs(60);
/// Edges kept per sample: the series behind them are already bounded by the workloads
/// the snapshot holds; this bounds the sampler's copy of them too.
pub const MAX_EDGES: usize = 4096;

/// Which side reported an edge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reporter {
    /// The client's agent.
    Source,
    /// The server's agent.
    Destination,
}

/// What an edge carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    /// Requests (HTTP or gRPC), read at L7.
    Http,
    /// Connections, spliced.
    Tcp,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct EdgeKey {
    reporter: Reporter,
    protocol: Protocol,
    source: String,
    destination: String,
}

/// Cumulative counts of one edge at one sample.
#[derive(Debug, Clone, Default)]
struct Totals {
    /// Requests, or connections opened.
    count: f64,
    /// Requests answered 5xx (or not at all); connections are never errors here.
    errors: f64,
    /// Of `count`, over mTLS.
    mtls: f64,
    /// TCP bytes both ways.
    bytes: f64,
    /// Request duration buckets by upper bound (`f64::to_bits` of a positive bound sorts
    /// as the bound does, `+Inf` last).
    buckets: BTreeMap<u64, f64>,
}

/// A workload (or a destination outside the mesh) in the graph.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Node {
    /// `namespace/workload`, a ServiceEntry host, or `unknown`.
    pub id: String,
    /// The workload's name (`unknown` outside the mesh).
    pub workload: String,
    /// Its namespace.
    pub namespace: String,
    /// Its canonical service (the `app` label).
    pub app: String,
    /// Its SPIFFE identity, when its traffic was mTLS.
    pub principal: String,
}

/// Traffic from one node to another over the window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Edge {
    /// Client node id.
    pub source: String,
    /// Server node id.
    pub destination: String,
    /// HTTP (requests) or TCP (connections).
    pub protocol: Protocol,
    /// Whose report this is.
    pub reporter: Reporter,
    /// Requests (or connections) per second.
    pub rate: f64,
    /// Share of requests answered 5xx or not at all, 0..=1.
    pub error_rate: f64,
    /// 99th percentile request duration in milliseconds (HTTP only).
    pub p99_ms: Option<f64>,
    /// TCP bytes per second, both ways.
    pub bytes_per_second: f64,
    /// Share of the traffic that was mTLS, 0..=1.
    pub mtls: f64,
    /// Requests (or connections) since the agent started.
    pub total: f64,
}

/// Nodes and edges with traffic in the window.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Graph {
    /// Seconds the rates are computed over (0 before two samples).
    pub window_seconds: f64,
    /// Every node an edge names.
    pub nodes: Vec<Node>,
    /// Edges, sorted.
    pub edges: Vec<Edge>,
}

struct Sample {
    at: Instant,
    /// Shared with the samples taken again from it ([`Sampler::unchanged`]).
    series: Arc<Series>,
}

/// What one reading of the exposition found.
#[derive(Default)]
struct Series {
    edges: HashMap<EdgeKey, Totals>,
    nodes: HashMap<String, Node>,
}

/// Samples of the exposition over the last [`WINDOW`].
#[derive(Default)]
pub struct Sampler {
    samples: Mutex<VecDeque<Sample>>,
}

impl Sampler {
    /// Reads the request and TCP series of `exposition` (Prometheus or OpenMetrics text)
    /// as the sample at `at`, and forgets samples older than the window needs.
    pub fn sample(&self, at: Instant, exposition: &str) {
        let sample = Sample { at, series: Arc::new(parse(exposition)) };
        keep(&mut self.samples.lock().unwrap_or_else(|p| p.into_inner()), sample);
    }

    /// Takes the newest sample again as the sample at `at`, without reading the
    /// exposition: for a caller that knows no series the graph reads moved since (no
    /// connection open then or now, none opened in between). False, and nothing taken,
    /// before the first sample.
    pub fn unchanged(&self, at: Instant) -> bool {
        let mut samples = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        let Some(series) = samples.back().map(|newest| newest.series.clone()) else { return false };
        keep(&mut samples, Sample { at, series });
        true
    }

    /// The graph over the window: from the oldest sample kept to the newest.
    pub fn graph(&self) -> Graph {
        let samples = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        let (Some(newest), Some(oldest)) = (samples.back(), samples.front()) else { return Graph::default() };
        let seconds = newest.at.duration_since(oldest.at).as_secs_f64();
        let mut edges = Vec::new();
        for (key, now) in &newest.series.edges {
            let then = oldest.series.edges.get(key).cloned().unwrap_or_default();
            let count = (now.count - then.count).max(0.0);
            let bytes = (now.bytes - then.bytes).max(0.0);
            if seconds > 0.0 && count == 0.0 && bytes == 0.0 {
                continue;
            }
            let ratio = |part: f64, whole: f64| if whole > 0.0 { (part / whole).clamp(0.0, 1.0) } else { 0.0 };
            let (errors, mtls) = if count > 0.0 {
                (ratio(now.errors - then.errors, count), ratio(now.mtls - then.mtls, count))
            } else {
                (ratio(now.errors, now.count), ratio(now.mtls, now.count))
            };
            let per_second = |n: f64| if seconds > 0.0 { n / seconds } else { 0.0 };
            let buckets: Vec<(f64, f64)> = now
                .buckets
                .iter()
                .map(|(le, n)| (f64::from_bits(*le), n - then.buckets.get(le).copied().unwrap_or(0.0)))
                .collect();
            edges.push(Edge {
                source: key.source.clone(),
                destination: key.destination.clone(),
                protocol: key.protocol,
                reporter: key.reporter,
                rate: per_second(count),
                error_rate: errors,
                p99_ms: quantile(0.99, &buckets),
                bytes_per_second: per_second(bytes),
                mtls,
                total: now.count,
            });
        }
        let mut graph = Graph { window_seconds: seconds, nodes: Vec::new(), edges };
        graph.nodes = nodes_of(&graph.edges, |id| newest.series.nodes.get(id).cloned());
        graph.sort();
        graph
    }
}

impl Graph {
    /// Joins graphs of several agents: per edge, the destination's report if any agent
    /// has one, else the source's.
    pub fn merge(graphs: impl IntoIterator<Item = Graph>) -> Graph {
        let mut nodes: HashMap<String, Node> = HashMap::new();
        let mut edges: BTreeMap<(String, String, Protocol), Edge> = BTreeMap::new();
        let mut window: f64 = 0.0;
        for g in graphs {
            window = window.max(g.window_seconds);
            for n in g.nodes {
                let known = nodes.entry(n.id.clone()).or_insert_with(|| n.clone());
                if known.principal.is_empty() {
                    known.principal = n.principal;
                }
            }
            for e in g.edges {
                let key = (e.source.clone(), e.destination.clone(), e.protocol);
                match edges.get_mut(&key) {
                    Some(kept) if kept.reporter == e.reporter => {
                        // Two agents reporting one side of an edge (a workload with pods
                        // on both): their traffic adds up.
                        let (a, b) = (kept.rate, e.rate);
                        let weight = |x: f64, y: f64| if a + b > 0.0 { (x * a + y * b) / (a + b) } else { x.max(y) };
                        kept.error_rate = weight(kept.error_rate, e.error_rate);
                        kept.mtls = weight(kept.mtls, e.mtls);
                        kept.p99_ms = match (kept.p99_ms, e.p99_ms) {
                            (Some(x), Some(y)) => Some(x.max(y)),
                            (x, y) => x.or(y),
                        };
                        kept.rate += e.rate;
                        kept.bytes_per_second += e.bytes_per_second;
                        kept.total += e.total;
                    }
                    Some(kept) if kept.reporter == Reporter::Destination => {}
                    _ => {
                        edges.insert(key, e);
                    }
                }
            }
        }
        let edges: Vec<Edge> = edges.into_values().collect();
        let mut graph = Graph { window_seconds: window, nodes: nodes_of(&edges, |id| nodes.get(id).cloned()), edges };
        graph.sort();
        graph
    }

    fn sort(&mut self) {
        self.nodes.sort_by(|a, b| a.id.cmp(&b.id));
        self.edges.sort_by(|a, b| {
            (&a.source, &a.destination, a.protocol, a.reporter).cmp(&(
                &b.source,
                &b.destination,
                b.protocol,
                b.reporter,
            ))
        });
    }
}

/// Adds `sample` as the newest and forgets samples older than the window needs.
fn keep(samples: &mut VecDeque<Sample>, sample: Sample) {
    let at = sample.at;
    samples.push_back(sample);
    // Keep one sample at or beyond the window's start, so a full window is covered.
    while samples.len() > 2 && samples.get(1).is_some_and(|s| at.duration_since(s.at) >= WINDOW) {
        samples.pop_front();
    }
}

/// The nodes `edges` name, as `known` describes them (or bare).
fn nodes_of(edges: &[Edge], known: impl Fn(&str) -> Option<Node>) -> Vec<Node> {
    let mut ids: Vec<&str> = edges.iter().flat_map(|e| [e.source.as_str(), e.destination.as_str()]).collect();
    ids.sort_unstable();
    ids.dedup();
    ids.into_iter()
        .map(|id| {
            known(id).unwrap_or_else(|| Node {
                id: id.to_string(),
                workload: id.to_string(),
                namespace: String::new(),
                app: String::new(),
                principal: String::new(),
            })
        })
        .collect()
}

/// `histogram_quantile` over cumulative `(upper bound, count)` buckets, sorted: linear
/// within the bucket the rank falls in, as Prometheus computes it. None without
/// observations.
fn quantile(q: f64, buckets: &[(f64, f64)]) -> Option<f64> {
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut lower = (0.0, 0.0);
    for &(le, count) in buckets {
        if count >= rank {
            if le.is_infinite() {
                // Beyond the last finite bound: the bound is all that is known.
                return Some(lower.0);
            }
            let width = count - lower.1;
            let into = if width > 0.0 { (rank - lower.1) / width } else { 1.0 };
            return Some(lower.0 + (le - lower.0) * into);
        }
        lower = (le, count);
    }
    Some(lower.0)
}

const REQUESTS: &str = "istio_requests_total";
const DURATION_BUCKET: &str = "istio_request_duration_milliseconds_bucket";
const OPENED: &str = "istio_tcp_connections_opened_total";
const SENT: &str = "istio_tcp_sent_bytes_total";
const RECEIVED: &str = "istio_tcp_received_bytes_total";

fn parse(exposition: &str) -> Series {
    let mut sample = Series::default();
    for line in exposition.lines() {
        let Some((name, rest)) = line.split_once('{') else { continue };
        if ![REQUESTS, DURATION_BUCKET, OPENED, SENT, RECEIVED].contains(&name) {
            continue;
        }
        let Some((labels, value)) = split_labels(rest) else { continue };
        let Some(value) = value.split_whitespace().next().and_then(|v| v.parse::<f64>().ok()) else { continue };
        let label = |k: &str| labels.iter().find(|(n, _)| n == k).map_or("", |(_, v)| v.as_str());
        let reporter = match label("reporter") {
            "source" => Reporter::Source,
            "destination" => Reporter::Destination,
            _ => continue,
        };
        let protocol = if name == REQUESTS || name == DURATION_BUCKET { Protocol::Http } else { Protocol::Tcp };
        let source = node(&label, "source", false);
        let destination = node(&label, "destination", true);
        let key = EdgeKey { reporter, protocol, source: source.id.clone(), destination: destination.id.clone() };
        if !sample.edges.contains_key(&key) && sample.edges.len() >= MAX_EDGES {
            continue;
        }
        for n in [source, destination] {
            let known = sample.nodes.entry(n.id.clone()).or_insert_with(|| n.clone());
            if known.principal.is_empty() {
                known.principal = n.principal;
            }
        }
        let totals = sample.edges.entry(key).or_default();
        let mtls = label("connection_security_policy") == "mutual_tls";
        match name {
            REQUESTS | OPENED => {
                totals.count += value;
                if mtls {
                    totals.mtls += value;
                }
                let code = label("response_code");
                if name == REQUESTS && (code.starts_with('5') || code == "0") {
                    totals.errors += value;
                }
            }
            DURATION_BUCKET => {
                let le = match label("le") {
                    "+Inf" => f64::INFINITY,
                    le => match le.parse::<f64>() {
                        Ok(v) if v >= 0.0 => v,
                        _ => continue,
                    },
                };
                *totals.buckets.entry(le.to_bits()).or_default() += value;
            }
            _ => totals.bytes += value,
        }
    }
    sample
}

/// One side of a series as a node: `namespace/workload`, or for a destination outside
/// the mesh the Service (host) it was asked for.
fn node<'a>(label: &impl Fn(&str) -> &'a str, side: &str, destination: bool) -> Node {
    let get = |k: &str| label(&format!("{side}_{k}")).to_string();
    let (workload, namespace) = (get("workload"), get("workload_namespace"));
    let known = |v: &str| !v.is_empty() && v != "unknown";
    let id = if known(&workload) {
        format!("{namespace}/{workload}")
    } else if destination && known(label("destination_service")) {
        label("destination_service").to_string()
    } else {
        "unknown".to_string()
    };
    let principal = get("principal");
    Node {
        id,
        workload,
        namespace,
        app: get("canonical_service"),
        principal: if known(&principal) { principal } else { String::new() },
    }
}

/// Splits `k="v",k2="v2"} value` into unescaped labels and what follows the `}`.
fn split_labels(s: &str) -> Option<(Vec<(String, String)>, &str)> {
    let mut labels = Vec::new();
    let mut rest = s;
    loop {
        rest = rest.trim_start_matches(',');
        if let Some(after) = rest.strip_prefix('}') {
            return Some((labels, after));
        }
        let (name, after) = rest.split_once("=\"")?;
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            let (i, c) = chars.next()?;
            match c {
                '"' => break i,
                '\\' => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                c => value.push(c),
            }
        };
        labels.push((name.to_string(), value));
        rest = &after[end + 1..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn series(name: &str, reporter: &str, src: &str, dst: &str, extra: &str, value: f64) -> String {
        format!(
            "{name}{{reporter=\"{reporter}\",source_workload=\"{src}\",source_workload_namespace=\"default\",\
             source_principal=\"spiffe://cluster.local/ns/default/sa/{src}\",source_canonical_service=\"{src}\",\
             destination_workload=\"{dst}\",destination_workload_namespace=\"default\",\
             destination_principal=\"unknown\",destination_canonical_service=\"{dst}\",\
             destination_service=\"{dst}.default.svc.cluster.local\"{extra}}} {value}\n"
        )
    }

    fn http(reporter: &str, code: &str, n: f64, buckets: &[(&str, f64)]) -> String {
        let extra = format!(",connection_security_policy=\"mutual_tls\",response_code=\"{code}\"");
        let mut text = series(REQUESTS, reporter, "frontend", "myapp-v1", &extra, n);
        for (le, count) in buckets {
            let extra = format!("{extra},le=\"{le}\"");
            text += &series(DURATION_BUCKET, reporter, "frontend", "myapp-v1", &extra, *count);
        }
        text
    }

    #[test]
    fn rates_error_share_and_p99_come_from_the_window_as_prometheus_computes_them() {
        let sampler = Sampler::default();
        let t0 = Instant::now();
        let b0 = [("1.0", 0.0), ("5.0", 0.0), ("10.0", 0.0), ("+Inf", 0.0)];
        sampler.sample(t0, &(http("destination", "200", 0.0, &b0) + &http("destination", "503", 0.0, &[])));
        // 90 answered 200 and 10 answered 503 in 10 s; 99 of the 100 took at most 5 ms.
        let b1 = [("1.0", 50.0), ("5.0", 99.0), ("10.0", 100.0), ("+Inf", 100.0)];
        sampler.sample(
            t0 + Duration::from_secs(10),
            &(http("destination", "200", 90.0, &b1) + &http("destination", "503", 10.0, &[])),
        );
        let g = sampler.graph();
        assert_eq!(g.window_seconds, 10.0);
        let [edge] = &g.edges[..] else { panic!("one edge: {g:?}") };
        assert_eq!((edge.source.as_str(), edge.destination.as_str()), ("default/frontend", "default/myapp-v1"));
        assert_eq!(edge.protocol, Protocol::Http);
        assert!((edge.rate - 10.0).abs() < 1e-9, "{edge:?}");
        assert!((edge.error_rate - 0.1).abs() < 1e-9, "{edge:?}");
        assert_eq!(edge.mtls, 1.0);
        assert!((edge.p99_ms.unwrap() - 5.0).abs() < 1e-9, "{edge:?}");
        let frontend = g.nodes.iter().find(|n| n.id == "default/frontend").unwrap();
        assert_eq!(frontend.principal, "spiffe://cluster.local/ns/default/sa/frontend");
        let myapp = g.nodes.iter().find(|n| n.id == "default/myapp-v1").unwrap();
        assert_eq!(myapp.principal, "", "unknown is not an identity");
    }

    #[test]
    fn idle_edges_leave_the_graph_and_old_samples_are_dropped() {
        let sampler = Sampler::default();
        let t0 = Instant::now();
        let tcp = |n: f64| {
            series(OPENED, "source", "frontend", "db", ",connection_security_policy=\"none\"", n)
                + &series(SENT, "source", "frontend", "db", ",connection_security_policy=\"none\"", n * 100.0)
        };
        sampler.sample(t0, &tcp(1.0));
        sampler.sample(t0 + Duration::from_secs(5), &tcp(3.0));
        let g = sampler.graph();
        assert_eq!(g.edges.len(), 1);
        assert_eq!(g.edges[0].protocol, Protocol::Tcp);
        assert!((g.edges[0].rate - 0.4).abs() < 1e-9);
        assert!((g.edges[0].bytes_per_second - 40.0).abs() < 1e-9);
        assert_eq!(g.edges[0].mtls, 0.0);
        for s in 2..20 {
            sampler.sample(t0 + Duration::from_secs(5 * s), &tcp(3.0));
        }
        assert!(sampler.samples.lock().unwrap().len() <= 14, "samples beyond the window are dropped");
        assert!(sampler.graph().edges.is_empty(), "no traffic in the window: {:?}", sampler.graph());
    }

    #[test]
    fn a_reading_taken_again_moves_the_window_on_as_an_unchanged_exposition_would() {
        let sampler = Sampler::default();
        let t0 = Instant::now();
        assert!(!sampler.unchanged(t0), "nothing to take again before the first reading");
        let tcp = |n: f64| series(OPENED, "source", "frontend", "db", ",connection_security_policy=\"none\"", n);
        sampler.sample(t0, &tcp(1.0));
        sampler.sample(t0 + Duration::from_secs(5), &tcp(3.0));
        let read = Sampler::default();
        read.sample(t0, &tcp(1.0));
        read.sample(t0 + Duration::from_secs(5), &tcp(3.0));
        for s in 2..20 {
            let at = t0 + Duration::from_secs(5 * s);
            assert!(sampler.unchanged(at));
            read.sample(at, &tcp(3.0));
            assert_eq!(sampler.graph(), read.graph(), "after {} s", 5 * s);
        }
        assert!(sampler.graph().edges.is_empty(), "the window passed with nothing new");
        assert_eq!(sampler.samples.lock().unwrap().len(), read.samples.lock().unwrap().len());
    }

    #[test]
    fn merging_keeps_the_destinations_report_and_adds_up_one_sides_reports() {
        let edge = |reporter, rate| Edge {
            source: "default/frontend".into(),
            destination: "default/myapp-v1".into(),
            protocol: Protocol::Http,
            reporter,
            rate,
            error_rate: 0.0,
            p99_ms: Some(3.0),
            bytes_per_second: 0.0,
            mtls: 1.0,
            total: rate * 60.0,
        };
        let node1 = Graph { window_seconds: 60.0, nodes: vec![], edges: vec![edge(Reporter::Source, 10.0)] };
        let node2 = Graph { window_seconds: 60.0, nodes: vec![], edges: vec![edge(Reporter::Destination, 4.0)] };
        let node3 = Graph { window_seconds: 60.0, nodes: vec![], edges: vec![edge(Reporter::Destination, 6.0)] };
        let merged = Graph::merge([node1.clone(), node2, node3]);
        let [e] = &merged.edges[..] else { panic!("{merged:?}") };
        assert_eq!(e.reporter, Reporter::Destination);
        assert_eq!(e.rate, 10.0);
        assert_eq!(merged.nodes.len(), 2);
        assert_eq!(Graph::merge([node1]).edges[0].reporter, Reporter::Source);
    }

    #[test]
    fn label_values_are_unescaped_and_bad_lines_skipped() {
        let (labels, rest) = split_labels(r#"a="x\"y",b="1\\2\n"} 7"#).unwrap();
        assert_eq!(labels, vec![("a".into(), "x\"y".into()), ("b".into(), "1\\2\n".into())]);
        assert_eq!(rest.trim(), "7");
        assert!(split_labels(r#"a="unterminated"#).is_none());
        let s = parse("istio_requests_total{reporter=\"x\"} 1\nistio_requests_total{oops 2\n# EOF\n");
        assert!(s.edges.is_empty());
    }

    #[test]
    fn quantile_interpolates_within_the_bucket() {
        let b = [(10.0, 50.0), (20.0, 100.0), (f64::INFINITY, 100.0)];
        assert_eq!(quantile(0.5, &b), Some(10.0));
        assert!((quantile(0.75, &b).unwrap() - 15.0).abs() < 1e-9);
        assert_eq!(quantile(0.99, &[(f64::INFINITY, 0.0)]), None);
        assert_eq!(quantile(0.99, &[(5.0, 0.0), (f64::INFINITY, 10.0)]), Some(5.0));
    }
}

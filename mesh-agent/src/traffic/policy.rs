//! DestinationRule traffic policies compiled per Service and subset. A subset's policy
//! replaces the top-level one group by group (loadBalancer, connectionPool,
//! outlierDetection), as Istio merges them.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use http::HeaderName;

use crate::config::istio::{self, DestinationRule};
use crate::state::Workload;

/// How an endpoint is chosen.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum LbPolicy {
    /// In turn.
    RoundRobin,
    /// Power of two choices on requests in flight (Istio's default).
    #[default]
    LeastRequest,
    /// Uniformly at random.
    Random,
    /// The address the client dialed, when it is an endpoint.
    Passthrough,
    /// Consistent hash of a header.
    HashHeader(HeaderName),
    /// Consistent hash of a cookie; with a ttl, the agent sets the cookie when the
    /// request has none (as Envoy does), naming the endpoint chosen.
    HashCookie(CookiePolicy),
    /// Consistent hash of the client address.
    HashSourceIp,
    /// Consistent hash of a query parameter.
    HashQuery(String),
}

/// `consistentHash.httpCookie`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CookiePolicy {
    /// Cookie name.
    pub name: String,
    /// Set the cookie when missing; zero means a session cookie.
    pub ttl: Option<Duration>,
    /// Cookie path.
    pub path: Option<String>,
}

/// `connectionPool` limits; `None` is unlimited (Istio maps 0 to its default, unlimited).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PoolLimits {
    /// Upstream connections (HTTP/1: requests being served) across the endpoints.
    pub max_connections: Option<u32>,
    /// Upstream connect timeout.
    pub connect_timeout: Option<Duration>,
    /// Requests queued for a connection.
    pub max_pending: Option<u32>,
    /// Requests in flight.
    pub max_requests: Option<u32>,
    /// Requests per upstream connection.
    pub max_requests_per_connection: Option<u32>,
    /// Idle upstream connections close after this.
    pub idle_timeout: Option<Duration>,
    /// `h2UpgradePolicy: UPGRADE`: HTTP/1.1 requests go upstream as HTTP/2.
    pub h2_upgrade: bool,
    /// Retries in flight at once.
    pub max_retries: Option<u32>,
}

/// `outlierDetection`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outlier {
    /// 5xx in a row that eject.
    pub consecutive_5xx: Option<u32>,
    /// 502/503/504 or connect failures in a row that eject.
    pub consecutive_gateway: Option<u32>,
    /// Sweep interval: ejected hosts come back at a sweep, and each healthy sweep lowers
    /// a host's ejection multiplier by one.
    pub interval: Duration,
    /// Ejection time per ejection so far.
    pub base_ejection: Duration,
    /// Most endpoints ejected at once, percent.
    pub max_ejection_percent: u32,
    /// Below this share of healthy endpoints ejection is ignored, percent.
    pub min_health_percent: u32,
    /// `splitExternalLocalOriginErrors`: local failures (connect, timeout) do not count.
    pub split_local_origin: bool,
}

/// The policy in force for one Service or subset.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TrafficPolicy {
    /// Load balancing.
    pub lb: LbPolicy,
    /// Limits.
    pub pool: PoolLimits,
    /// Ejection, when configured.
    pub outlier: Option<Outlier>,
    /// `tls.mode: ISTIO_MUTUAL`: only mesh endpoints (reached over mTLS) may serve.
    pub istio_mutual: bool,
    /// `tls.mode: SIMPLE` or `MUTUAL`: the agent opens TLS to the destination itself,
    /// for a pod that sends plaintext (ServiceEntry hosts).
    pub origination: Option<TlsOrigination>,
    /// Locality-aware load balancing (`loadBalancer.localityLbSetting`), in force
    /// where outlier detection is.
    pub locality: LocalityPolicy,
}

/// Which endpoints serve first, by how they stand to the client: Istio's
/// `localityLbSetting`. On by default (Istio's mesh default) and applied only with
/// outlier detection, which is what says an endpoint is unhealthy.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LocalityPolicy {
    /// `enabled: false`.
    pub disabled: bool,
    /// `failover`: (client region, region to fail over to).
    pub failover: Vec<(String, String)>,
    /// `failoverPriority`: label names (or `name=value`), most important first.
    pub failover_priority: Vec<String>,
    /// `distribute`: (the clients' locality, the localities their traffic goes to
    /// with each one's share), in order; the first that covers a client applies.
    pub distribute: Vec<(String, Vec<(String, u32)>)>,
}

impl LocalityPolicy {
    fn of(l: &istio::LocalityLbSetting) -> Self {
        Self {
            disabled: l.enabled == Some(false),
            failover: l.failover.iter().map(|f| (f.from.clone(), f.to.clone())).collect(),
            failover_priority: l.failover_priority.clone(),
            distribute: l.distribute.iter().map(|d| (d.from.clone(), d.to.clone().into_iter().collect())).collect(),
        }
    }

    /// `distribute`'s shares for `client`: the localities its traffic goes to and the
    /// share of each, from the first entry whose `from` covers the client's locality.
    pub fn shares(&self, client: &Workload) -> Option<&[(String, u32)]> {
        self.distribute.iter().find(|(from, _)| locality_covers(from, &client.locality)).map(|(_, to)| to.as_slice())
    }

    /// Whether it ranks endpoints under `policy`.
    pub fn applies(policy: &TrafficPolicy) -> bool {
        !policy.locality.disabled && policy.outlier.is_some()
    }

    /// The rank of `endpoint` for `client`, lowest first: the leading
    /// `failoverPriority` labels it shares with the client, then its locality (same
    /// subzone, zone, region, the region `failover` names, anywhere), as Envoy's
    /// priority levels. A client of unknown locality prefers no locality.
    pub fn priority(&self, client: &Workload, endpoint: &Workload) -> u32 {
        let labels = u32::try_from(self.failover_priority.len()).unwrap_or(u32::MAX);
        let shared = self.failover_priority.iter().take_while(|l| label_matches(l, client, endpoint)).count();
        let label_rank = labels - u32::try_from(shared).unwrap_or(0);
        let (c, e) = (&client.locality, &endpoint.locality);
        let same_place = e.region == c.region && e.zone == c.zone && e.subzone == c.subzone;
        let locality_rank = if c.region.is_empty() || same_place {
            0
        } else if e.region == c.region && e.zone == c.zone {
            1
        } else if e.region == c.region {
            2
        } else if self.failover.iter().any(|(from, to)| *from == c.region && *to == e.region) {
            3
        } else {
            4
        };
        label_rank * 5 + locality_rank
    }
}

/// Whether `pattern` (`region[/zone[/subzone]]`, a part `*` covering the rest) covers
/// `locality`.
pub fn locality_covers(pattern: &str, locality: &crate::state::Locality) -> bool {
    for (part, value) in pattern.split('/').zip([&locality.region, &locality.zone, &locality.subzone]) {
        if part == "*" {
            return true;
        }
        if part != value {
            return false;
        }
    }
    true
}

/// The value of label `name` for `w`, with Istio's topology labels from what the mesh
/// knows of it (its cluster, network and locality).
fn topology_label<'a>(w: &'a Workload, name: &str) -> Option<&'a str> {
    let known = match name {
        "topology.istio.io/cluster" => w.meta.cluster.as_str(),
        "topology.istio.io/network" => w.network.as_str(),
        "topology.kubernetes.io/region" => w.locality.region.as_str(),
        "topology.kubernetes.io/zone" => w.locality.zone.as_str(),
        "topology.istio.io/subzone" => w.locality.subzone.as_str(),
        _ => return w.labels.get(name).map(String::as_str),
    };
    (!known.is_empty()).then_some(known)
}

/// `failoverPriority` entry `label` (`name`, or `name=value` pinning the value) holds
/// for `endpoint` as seen from `client`.
fn label_matches(label: &str, client: &Workload, endpoint: &Workload) -> bool {
    match label.split_once('=') {
        Some((name, value)) => topology_label(endpoint, name) == Some(value),
        None => topology_label(client, label).is_some_and(|v| topology_label(endpoint, label) == Some(v)),
    }
}

/// TLS the agent originates toward a destination outside the mesh.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsOrigination {
    /// `MUTUAL`: the agent presents `client_certificate`.
    pub mutual: bool,
    /// The SNI (and the name the certificate is checked for); the host when unset.
    pub sni: Option<String>,
    /// Roots the server's certificate must chain to; the system's when unset.
    pub ca_certificates: Option<std::path::PathBuf>,
    /// Client certificate chain (MUTUAL).
    pub client_certificate: Option<std::path::PathBuf>,
    /// Its key (MUTUAL).
    pub private_key: Option<std::path::PathBuf>,
    /// A Secret of the originating gateway's namespace holding all of them instead.
    pub credential_name: Option<String>,
}

impl TlsOrigination {
    /// What `tls` asks the agent to originate, if anything.
    fn of(tls: &istio::ClientTls) -> Option<Self> {
        let mutual = match tls.mode.as_deref() {
            Some("SIMPLE") => false,
            Some("MUTUAL") => true,
            _ => return None,
        };
        let path = |p: &Option<String>| p.as_ref().map(std::path::PathBuf::from);
        Some(Self {
            mutual,
            sni: tls.sni.clone(),
            ca_certificates: path(&tls.ca_certificates),
            client_certificate: path(&tls.client_certificate),
            private_key: path(&tls.private_key),
            credential_name: tls.credential_name.clone(),
        })
    }
}

/// A DestinationRule compiled for its Service.
#[derive(Debug, Clone, Default)]
pub struct DestinationPolicy {
    /// `namespace/name` of the DestinationRule.
    pub rule: String,
    /// Top-level policy.
    pub policy: TrafficPolicy,
    /// Top-level policy for ports with `portLevelSettings`.
    pub ports: HashMap<u16, TrafficPolicy>,
    /// Subsets: labels and merged policy.
    pub subsets: HashMap<String, Subset>,
}

/// A compiled subset.
#[derive(Debug, Clone, Default)]
pub struct Subset {
    /// Endpoints must have all these labels.
    pub labels: BTreeMap<String, String>,
    /// Merged policy.
    pub policy: TrafficPolicy,
    /// Merged policy for ports with `portLevelSettings`.
    pub ports: HashMap<u16, TrafficPolicy>,
}

fn positive(v: Option<i64>) -> Option<u32> {
    v.filter(|n| *n > 0).map(|n| n.min(i64::from(u32::MAX)) as u32)
}

fn dur(v: &Option<String>) -> Option<Duration> {
    v.as_deref().and_then(|d| istio::duration("", d).ok()).filter(|d| !d.is_zero())
}

fn lb(l: &istio::LoadBalancer) -> LbPolicy {
    if let Some(h) = &l.consistent_hash {
        if let Some(name) = h.http_header_name.as_ref().and_then(|n| HeaderName::from_bytes(n.as_bytes()).ok()) {
            return LbPolicy::HashHeader(name);
        }
        if let Some(c) = &h.http_cookie {
            return LbPolicy::HashCookie(CookiePolicy {
                name: c.name.clone(),
                ttl: c.ttl.as_deref().and_then(|t| istio::duration("", t).ok()),
                path: c.path.clone(),
            });
        }
        if let Some(q) = &h.http_query_parameter_name {
            return LbPolicy::HashQuery(q.clone());
        }
        return LbPolicy::HashSourceIp;
    }
    match l.simple.as_deref() {
        Some("ROUND_ROBIN") => LbPolicy::RoundRobin,
        Some("RANDOM") => LbPolicy::Random,
        Some("PASSTHROUGH") => LbPolicy::Passthrough,
        _ => LbPolicy::LeastRequest,
    }
}

fn pool(p: &istio::ConnectionPool) -> PoolLimits {
    let tcp = p.tcp.clone().unwrap_or_default();
    let http = p.http.clone().unwrap_or_default();
    PoolLimits {
        max_connections: positive(tcp.max_connections),
        connect_timeout: dur(&tcp.connect_timeout),
        max_pending: positive(http.http1_max_pending_requests),
        max_requests: positive(http.http2_max_requests),
        max_requests_per_connection: positive(http.max_requests_per_connection),
        idle_timeout: dur(&http.idle_timeout),
        h2_upgrade: http.h2_upgrade_policy.as_deref() == Some("UPGRADE"),
        max_retries: positive(http.max_retries),
    }
}

fn outlier(o: &istio::OutlierDetection) -> Outlier {
    Outlier {
        consecutive_5xx: o.consecutive_5xx_errors.map(|n| n.max(0) as u32).filter(|n| *n > 0),
        consecutive_gateway: o
            .consecutive_gateway_errors
            .or(o.consecutive_errors)
            .map(|n| n.max(0) as u32)
            .filter(|n| *n > 0),
        interval: dur(&o.interval).unwrap_or(Duration::from_secs(10)),
        base_ejection: dur(&o.base_ejection_time).unwrap_or(Duration::from_secs(30)),
        max_ejection_percent: o.max_ejection_percent.unwrap_or(10).clamp(0, 100) as u32,
        min_health_percent: o.min_health_percent.unwrap_or(0).clamp(0, 100) as u32,
        split_local_origin: o.split_external_local_origin_errors.unwrap_or(false),
    }
}

/// Per-port policies: `inherited` ones (from an outer level) with `p`'s port settings
/// applied over them, or over `base` for ports only `p` names.
fn port_policies(
    base: &TrafficPolicy,
    p: Option<&istio::TrafficPolicy>,
    inherited: &HashMap<u16, TrafficPolicy>,
) -> HashMap<u16, TrafficPolicy> {
    let mut out = inherited.clone();
    for pl in p.map(|p| p.port_level_settings.as_slice()).unwrap_or_default() {
        let Ok(port) = u16::try_from(pl.port.number) else { continue };
        let under = inherited.get(&port).unwrap_or(base);
        out.insert(port, merge(under, Some(&pl.as_policy())));
    }
    out
}

/// Applies the groups `p` sets on top of `base`.
fn merge(base: &TrafficPolicy, p: Option<&istio::TrafficPolicy>) -> TrafficPolicy {
    let Some(p) = p else { return base.clone() };
    TrafficPolicy {
        lb: p.load_balancer.as_ref().map_or_else(|| base.lb.clone(), lb),
        pool: p.connection_pool.as_ref().map_or_else(|| base.pool.clone(), pool),
        outlier: p.outlier_detection.as_ref().map(outlier).or_else(|| base.outlier.clone()),
        istio_mutual: p.tls.as_ref().map_or(base.istio_mutual, |t| t.mode.as_deref() == Some("ISTIO_MUTUAL")),
        origination: p.tls.as_ref().map_or_else(|| base.origination.clone(), TlsOrigination::of),
        locality: p
            .load_balancer
            .as_ref()
            .and_then(|l| l.locality_lb_setting.as_ref())
            .map_or_else(|| base.locality.clone(), LocalityPolicy::of),
    }
}

impl DestinationPolicy {
    /// Whether any level of it asks the agent to originate TLS.
    pub fn originates_tls(&self) -> bool {
        let levels = std::iter::once(&self.policy)
            .chain(self.ports.values())
            .chain(self.subsets.values().flat_map(|s| std::iter::once(&s.policy).chain(s.ports.values())));
        levels.into_iter().any(|p| p.origination.is_some())
    }

    /// Compiles `dr`.
    /// Compiles `dr`. Order of precedence, later wins group by group: top level, its
    /// port-level settings, the subset, the subset's port-level settings.
    pub fn compile(dr: &DestinationRule) -> Self {
        let top = dr.spec.traffic_policy.as_ref();
        let policy = merge(&TrafficPolicy::default(), top);
        let ports = port_policies(&policy, top, &HashMap::new());
        let subsets = dr
            .spec
            .subsets
            .iter()
            .map(|s| {
                let sub = s.traffic_policy.as_ref();
                let own = merge(&policy, sub);
                // The top level's port settings still apply under the subset, below its own.
                let inherited: HashMap<u16, TrafficPolicy> =
                    ports.iter().map(|(port, p)| (*port, merge(p, sub))).collect();
                let sub_ports = port_policies(&own, sub, &inherited);
                (s.name.clone(), Subset { labels: s.labels.clone(), policy: own, ports: sub_ports })
            })
            .collect();
        Self { rule: dr.metadata.key(), policy, ports, subsets }
    }

    /// The policy for `subset` (if any) on service port `port`.
    pub fn effective(&self, subset: Option<&str>, port: u16) -> TrafficPolicy {
        match subset.and_then(|s| self.subsets.get(s)) {
            Some(s) => s.ports.get(&port).unwrap_or(&s.policy).clone(),
            None => self.ports.get(&port).unwrap_or(&self.policy).clone(),
        }
    }

    /// Adds the subsets of a later rule for the same host that this one lacks (Istio
    /// merges DestinationRules of one host; the first keeps its traffic policy).
    pub fn merge_from(&mut self, other: &DestinationPolicy) {
        for (name, s) in &other.subsets {
            self.subsets.entry(name.clone()).or_insert_with(|| s.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::net::IpAddr;
    use std::sync::Arc;

    use crate::state::{Locality, WorkloadMeta};

    fn at(locality: &str, cluster: &str) -> Workload {
        let mut w = Workload::outside("w", "production", IpAddr::from([10, 0, 0, 1]), "cluster.local");
        w.locality = Locality::of_labels(&BTreeMap::from([("istio-locality".to_string(), locality.to_string())]));
        w.meta = Arc::new(WorkloadMeta { cluster: cluster.into(), ..(*WorkloadMeta::unknown()).clone() });
        w
    }

    #[test]
    fn distribute_entries_cover_localities_by_pattern_and_the_first_covering_one_applies() {
        let l = |s: &str| at(s, "c").locality;
        assert!(locality_covers("us-east/a/*", &l("us-east.a.1")));
        assert!(locality_covers("us-east/*", &l("us-east.b.2")));
        assert!(locality_covers("us-east", &l("us-east.b.2")));
        assert!(locality_covers("*", &l("eu.c.3")));
        assert!(!locality_covers("us-east/a/*", &l("us-east.b.1")));
        assert!(!locality_covers("us-east/a/1", &l("us-east.a.2")));
        let policy = LocalityPolicy {
            distribute: vec![
                ("us-east/a/*".into(), vec![("us-east/a/*".into(), 100)]),
                ("us-east/*".into(), vec![("us-west/*".into(), 100)]),
            ],
            ..Default::default()
        };
        assert_eq!(policy.shares(&at("us-east.a.1", "c")).unwrap()[0].0, "us-east/a/*");
        assert_eq!(policy.shares(&at("us-east.b.1", "c")).unwrap()[0].0, "us-west/*");
        assert!(policy.shares(&at("eu.a.1", "c")).is_none(), "no entry for eu: ranks apply");
    }

    #[test]
    fn endpoints_rank_by_shared_labels_then_locality_as_istio_orders_them() {
        let client = at("us-east.a.1", "cluster1");
        let plain = LocalityPolicy::default();
        let rank = |p: &LocalityPolicy, e: &str, cluster: &str| p.priority(&client, &at(e, cluster));
        assert_eq!(rank(&plain, "us-east.a.1", "cluster1"), 0);
        assert_eq!(rank(&plain, "us-east.a.2", "cluster1"), 1);
        assert_eq!(rank(&plain, "us-east.b.1", "cluster1"), 2);
        assert_eq!(rank(&plain, "us-west.a.1", "cluster1"), 4);
        let failover = LocalityPolicy { failover: vec![("us-east".into(), "us-west".into())], ..Default::default() };
        assert_eq!(rank(&failover, "us-west.a.1", "cluster1"), 3, "the failover region before the rest");
        assert_eq!(rank(&failover, "eu.a.1", "cluster1"), 4);
        // failoverPriority first: this cluster's endpoints before any other's, whatever
        // their locality; `name=value` pins the value.
        let by_cluster =
            LocalityPolicy { failover_priority: vec!["topology.istio.io/cluster".into()], ..Default::default() };
        assert!(rank(&by_cluster, "us-west.a.1", "cluster1") < rank(&by_cluster, "us-east.a.1", "cluster2"));
        let pinned = LocalityPolicy {
            failover_priority: vec!["topology.istio.io/cluster=cluster2".into()],
            ..Default::default()
        };
        assert!(rank(&pinned, "us-east.a.1", "cluster2") < rank(&pinned, "us-east.a.1", "cluster1"));
        // A client of unknown locality prefers none.
        let nowhere = at("", "cluster1");
        assert_eq!(plain.priority(&nowhere, &at("us-east.a.1", "cluster1")), 0);
        assert_eq!(plain.priority(&nowhere, &at("eu.b.2", "cluster1")), 0);
    }

    use super::*;
    use crate::config::{Object, parse_documents};

    const DR: &str = r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: myapp, namespace: production}
spec:
  host: myapp
  trafficPolicy:
    loadBalancer: {simple: RANDOM}
    connectionPool: {http: {http2MaxRequests: 100}}
    portLevelSettings:
    - port: {number: 9000}
      loadBalancer: {simple: ROUND_ROBIN}
  subsets:
  - name: v1
    labels: {version: v1}
    trafficPolicy:
      connectionPool: {http: {http2MaxRequests: 7}}
      portLevelSettings:
      - port: {number: 80}
        loadBalancer: {consistentHash: {useSourceIp: true}}
"#;

    #[test]
    fn port_level_settings_override_their_level_and_subsets_override_the_top() {
        let objs = parse_documents(std::path::Path::new("dr.yaml"), DR).unwrap();
        let Object::DestinationRule(dr) = &objs[0] else { panic!() };
        let p = DestinationPolicy::compile(dr);
        assert_eq!(p.effective(None, 80).lb, LbPolicy::Random);
        assert_eq!(p.effective(None, 9000).lb, LbPolicy::RoundRobin, "top-level port setting");
        let v1_80 = p.effective(Some("v1"), 80);
        assert_eq!(v1_80.lb, LbPolicy::HashSourceIp, "subset port setting");
        assert_eq!(v1_80.pool.max_requests, Some(7), "subset connection pool");
        let v1_9000 = p.effective(Some("v1"), 9000);
        assert_eq!(v1_9000.lb, LbPolicy::RoundRobin, "top-level port setting still applies under the subset");
        assert_eq!(v1_9000.pool.max_requests, Some(7));
    }
}

//! Runtime state per destination cluster (Service + subset, per source pod as each
//! sidecar keeps its own): endpoint choice, circuit breaking and outlier ejection.
//!
//! Invariants: counters outlive config snapshots (a route edit does not reset
//! ejections); every admitted request releases its slots on drop, also when the client
//! goes away mid-request.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use rand::Rng as _;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::traffic::policy::{LbPolicy, Outlier, PoolLimits};

/// How locality-aware load balancing splits a target's endpoints for one client (one
/// entry per endpoint, in the target's order).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Localities {
    /// `failover`/`failoverPriority` ranks, lowest first: only the best rank with a
    /// healthy endpoint serves.
    Ranked(Vec<u32>),
    /// `distribute`: each endpoint's locality group (the index of the `to` entry that
    /// covers it; None: a locality `to` does not name), and each group's share.
    Weighted {
        /// Per endpoint.
        group: Vec<Option<u32>>,
        /// Per group.
        weights: Vec<u32>,
    },
}

impl Localities {
    fn len(&self) -> usize {
        match self {
            Localities::Ranked(r) => r.len(),
            Localities::Weighted { group, .. } => group.len(),
        }
    }
}

/// The part of `pool` (an in-order part of `candidates`) in one locality group, drawn
/// by the groups' shares among those with an endpoint in the pool. A locality the
/// shares do not name gets no traffic, unless no named one has an endpoint left.
fn weighted_locality(
    candidates: &[SocketAddr],
    pool: &[SocketAddr],
    group: &[Option<u32>],
    weights: &[u32],
) -> Vec<SocketAddr> {
    let mut next = pool.iter().peekable();
    let mut in_pool: Vec<(SocketAddr, Option<u32>)> = Vec::with_capacity(pool.len());
    for (a, g) in candidates.iter().zip(group) {
        if next.peek() == Some(&a) {
            next.next();
            in_pool.push((*a, *g));
        }
    }
    let mut present: Vec<u32> = in_pool.iter().filter_map(|(_, g)| *g).collect();
    present.sort_unstable();
    present.dedup();
    let share = |g: u32| weights.get(g as usize).copied().unwrap_or(0);
    let total: u32 = present.iter().map(|g| share(*g)).sum();
    if total == 0 {
        return pool.to_vec();
    }
    let mut draw = rand::rng().random_range(0..total);
    let chosen = present
        .iter()
        .copied()
        .find(|g| {
            if draw < share(*g) {
                return true;
            }
            draw -= share(*g);
            false
        })
        .unwrap_or(present[0]);
    in_pool.into_iter().filter(|(_, g)| *g == Some(chosen)).map(|(a, _)| a).collect()
}

/// One cluster's state.
#[derive(Debug, Default)]
pub struct Cluster {
    rr: AtomicUsize,
    retries_in_flight: Arc<AtomicU32>,
    in_flight: AtomicU32,
    pending: AtomicU32,
    /// (limit it was made for, permits): rebuilt when maxConnections changes.
    connections: Mutex<Option<(u32, Arc<Semaphore>)>>,
    endpoints: Mutex<HashMap<SocketAddr, EndpointStats>>,
}

#[derive(Debug, Default, Clone)]
struct EndpointStats {
    active: u32,
    consecutive_5xx: u32,
    consecutive_gateway: u32,
    ejections: u32,
    ejected_until: Option<Instant>,
}

/// Why a request was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overflow {
    /// http2MaxRequests reached.
    Requests,
    /// maxConnections in use and http1MaxPendingRequests queued already.
    Pending,
}

/// Slots a request holds while it runs.
#[derive(Debug)]
pub struct Admission {
    cluster: Arc<Cluster>,
    _connection: Option<OwnedSemaphorePermit>,
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.cluster.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A retry in flight under `maxRetries`; released on drop.
#[derive(Debug)]
pub struct RetrySlot(Option<Arc<AtomicU32>>);

impl Drop for RetrySlot {
    fn drop(&mut self) {
        if let Some(c) = &self.0 {
            c.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// A request in flight on one endpoint; counts for LEAST_REQUEST until dropped.
#[derive(Debug)]
pub struct EndpointGuard {
    cluster: Arc<Cluster>,
    addr: SocketAddr,
}

impl EndpointGuard {
    /// Records that connecting to the endpoint failed (the L4 path, which reads no
    /// answer), under the ejection rules it was chosen with among `endpoints`; true
    /// when that ejected it.
    pub fn connect_failed(&self, outlier: Option<&Outlier>, endpoints: usize) -> bool {
        self.cluster.record(self.addr, Outcome::LocalFailure, outlier, endpoints)
    }
}

impl Drop for EndpointGuard {
    fn drop(&mut self) {
        if let Some(s) = self.cluster.endpoints.lock().unwrap_or_else(|p| p.into_inner()).get_mut(&self.addr) {
            s.active = s.active.saturating_sub(1);
        }
    }
}

/// What an answer (or its absence) says about an endpoint.
#[derive(Debug, Clone, Copy)]
pub enum Outcome {
    /// An HTTP status.
    Status(u16),
    /// Connect failure, reset or timeout: counts as a gateway error.
    LocalFailure,
}

impl Cluster {
    /// Admits a request under the pool limits, queueing for a connection slot when
    /// `maxConnections` are busy and the pending queue has room.
    pub async fn admit(self: &Arc<Self>, limits: &PoolLimits) -> Result<Admission, Overflow> {
        let in_flight = self.in_flight.fetch_add(1, Ordering::AcqRel) + 1;
        let admission = |permit| Admission { cluster: self.clone(), _connection: permit };
        if limits.max_requests.is_some_and(|max| in_flight > max) {
            drop(admission(None));
            return Err(Overflow::Requests);
        }
        let Some(max_conns) = limits.max_connections else { return Ok(admission(None)) };
        let sem = {
            let mut slot = self.connections.lock().unwrap_or_else(|p| p.into_inner());
            match &*slot {
                Some((limit, sem)) if *limit == max_conns => sem.clone(),
                _ => {
                    let sem = Arc::new(Semaphore::new(max_conns as usize));
                    *slot = Some((max_conns, sem.clone()));
                    sem
                }
            }
        };
        if let Ok(p) = sem.clone().try_acquire_owned() {
            return Ok(admission(Some(p)));
        }
        let queued = self.pending.fetch_add(1, Ordering::AcqRel) + 1;
        // Istio's default pending limit is effectively unbounded.
        if limits.max_pending.is_some_and(|max| queued > max) {
            self.pending.fetch_sub(1, Ordering::AcqRel);
            drop(admission(None));
            return Err(Overflow::Pending);
        }
        let permit = sem.acquire_owned().await;
        self.pending.fetch_sub(1, Ordering::AcqRel);
        Ok(admission(permit.ok()))
    }

    /// Takes a retry slot when fewer than `max` retries are in flight (no limit: always).
    pub fn try_retry(&self, max: Option<u32>) -> Option<RetrySlot> {
        let Some(max) = max else { return Some(RetrySlot(None)) };
        let counter = &self.retries_in_flight;
        counter
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1))
            .ok()
            .map(|_| RetrySlot(Some(counter.clone())))
    }

    /// Chooses an endpoint among `candidates` (addresses in a stable order), skipping
    /// ejected ones unless too few would be left (`minHealthPercent`, Envoy's panic
    /// threshold). With `priorities` (one per candidate, lowest first), only the best
    /// rank that has an endpoint to choose from serves: traffic fails over to the next
    /// rank when every endpoint of the best is ejected or gone, and comes back when one
    /// returns.
    pub fn pick(
        self: &Arc<Self>,
        candidates: &[SocketAddr],
        localities: Option<&Localities>,
        lb: &LbPolicy,
        outlier: Option<&Outlier>,
        hash_key: Option<&[u8]>,
        dialed: SocketAddr,
    ) -> Option<(SocketAddr, EndpointGuard)> {
        if candidates.is_empty() {
            return None;
        }
        let now = Instant::now();
        let mut stats = self.endpoints.lock().unwrap_or_else(|p| p.into_inner());
        let healthy: Vec<SocketAddr> = candidates
            .iter()
            .copied()
            .filter(|a| stats.get(a).and_then(|s| s.ejected_until).is_none_or(|t| t <= now))
            .collect();
        let min_health = outlier.map_or(0, |o| o.min_health_percent) as usize;
        let pool: &[SocketAddr] = if healthy.is_empty() || healthy.len() * 100 < candidates.len() * min_health {
            candidates
        } else {
            &healthy
        };
        let ranked: Vec<SocketAddr>;
        let pool: &[SocketAddr] = match localities.filter(|l| l.len() == candidates.len()) {
            Some(Localities::Weighted { group, weights }) => {
                ranked = weighted_locality(candidates, pool, group, weights);
                &ranked
            }
            Some(Localities::Ranked(ranks)) => {
                // The pool is the candidates or an in-order part of them: one walk of
                // both keeps the pool's members of the best rank.
                let mut best_of_pool = Vec::with_capacity(pool.len());
                let mut best = u32::MAX;
                let mut next = pool.iter().peekable();
                for (a, rank) in candidates.iter().zip(ranks) {
                    if next.peek() != Some(&a) {
                        continue;
                    }
                    next.next();
                    if *rank < best {
                        best = *rank;
                        best_of_pool.clear();
                    }
                    if *rank == best {
                        best_of_pool.push(*a);
                    }
                }
                ranked = best_of_pool;
                &ranked
            }
            None => pool,
        };
        let chosen = match lb {
            LbPolicy::RoundRobin => pool[self.rr.fetch_add(1, Ordering::Relaxed) % pool.len()],
            LbPolicy::Random => pool[rand::rng().random_range(0..pool.len())],
            LbPolicy::LeastRequest => {
                let active = |a: &SocketAddr| stats.get(a).map_or(0, |s| s.active);
                if pool.len() == 1 {
                    pool[0]
                } else {
                    let mut rng = rand::rng();
                    let i = rng.random_range(0..pool.len());
                    let mut j = rng.random_range(0..pool.len() - 1);
                    if j >= i {
                        j += 1;
                    }
                    if active(&pool[j]) < active(&pool[i]) { pool[j] } else { pool[i] }
                }
            }
            LbPolicy::Passthrough => {
                if pool.contains(&dialed) {
                    dialed
                } else {
                    pool[self.rr.fetch_add(1, Ordering::Relaxed) % pool.len()]
                }
            }
            LbPolicy::HashHeader(_) | LbPolicy::HashCookie(_) | LbPolicy::HashSourceIp | LbPolicy::HashQuery(_) => {
                match hash_key {
                    // Rendezvous hashing: a key keeps its endpoint while that endpoint
                    // stays, and only its keys move when it goes.
                    Some(key) => *pool.iter().max_by_key(|a| rendezvous(key, a)).expect("pool is not empty"),
                    None => pool[self.rr.fetch_add(1, Ordering::Relaxed) % pool.len()],
                }
            }
        };
        stats.entry(chosen).or_default().active += 1;
        Some((chosen, EndpointGuard { cluster: self.clone(), addr: chosen }))
    }

    /// Records an answer; ejects the endpoint when it crossed a consecutive-error
    /// threshold and the ejection cap allows. Returns true when it was ejected now.
    pub fn record(&self, addr: SocketAddr, outcome: Outcome, outlier: Option<&Outlier>, endpoints: usize) -> bool {
        let Some(o) = outlier else { return false };
        let now = Instant::now();
        let mut stats = self.endpoints.lock().unwrap_or_else(|p| p.into_inner());
        let ejected_now = stats.values().filter(|s| s.ejected_until.is_some_and(|t| t > now)).count();
        let s = stats.entry(addr).or_default();
        let (is_5xx, is_gateway) = match outcome {
            Outcome::Status(c) => ((500..=599).contains(&c), matches!(c, 502..=504)),
            // Split mode: local-origin failures say nothing about the endpoint's answers.
            Outcome::LocalFailure if o.split_local_origin => return false,
            Outcome::LocalFailure => (true, true),
        };
        s.consecutive_5xx = if is_5xx { s.consecutive_5xx + 1 } else { 0 };
        s.consecutive_gateway = if is_gateway { s.consecutive_gateway + 1 } else { 0 };
        if s.ejected_until.is_some_and(|t| t > now) {
            return false;
        }
        let tripped = o.consecutive_5xx.is_some_and(|n| s.consecutive_5xx >= n)
            || o.consecutive_gateway.is_some_and(|n| s.consecutive_gateway >= n);
        // maxEjectionPercent of the endpoints, but Envoy always allows one ejection.
        let cap = ((endpoints * o.max_ejection_percent as usize) / 100).max(usize::from(o.max_ejection_percent > 0));
        if !tripped || ejected_now >= cap {
            return false;
        }
        // Envoy lowers a host's ejection multiplier by one for every sweep interval it
        // spent healthy since its last ejection ended.
        if let Some(released) = s.ejected_until.filter(|t| *t <= now) {
            let healthy_sweeps = (now - released).as_nanos() / o.interval.as_nanos().max(1);
            s.ejections = s.ejections.saturating_sub(u32::try_from(healthy_sweeps).unwrap_or(u32::MAX));
        }
        s.ejections += 1;
        // Hosts come back at the first sweep after their ejection time.
        s.ejected_until = Some(next_sweep(now + o.base_ejection * s.ejections, o.interval));
        s.consecutive_5xx = 0;
        s.consecutive_gateway = 0;
        true
    }

    /// Endpoints ejected right now.
    pub fn ejected(&self) -> Vec<SocketAddr> {
        let now = Instant::now();
        let stats = self.endpoints.lock().unwrap_or_else(|p| p.into_inner());
        stats.iter().filter(|(_, s)| s.ejected_until.is_some_and(|t| t > now)).map(|(a, _)| *a).collect()
    }
}

/// The first outlier sweep at or after `t`: sweeps run every `interval` from a fixed
/// start, as Envoy's outlier detector runs its analysis on a timer.
fn next_sweep(t: Instant, interval: Duration) -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let epoch = *EPOCH.get_or_init(Instant::now);
    let step = interval.as_nanos();
    if step == 0 || t <= epoch {
        return t;
    }
    let sweeps = (t - epoch).as_nanos().div_ceil(step);
    epoch + Duration::from_nanos(u64::try_from(sweeps * step).unwrap_or(u64::MAX))
}

fn rendezvous(key: &[u8], addr: &SocketAddr) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    key.hash(&mut h);
    addr.hash(&mut h);
    h.finish()
}

/// (source pod, service, subset).
type ClusterKey = (String, String, Option<String>);

/// Every cluster's state, keyed by (source pod, service, subset).
#[derive(Debug, Default)]
pub struct Clusters {
    map: Mutex<HashMap<ClusterKey, Arc<Cluster>>>,
}

impl Clusters {
    /// The cluster for `source` pod to `service`/`subset`, created on first use.
    pub fn get(&self, source: &str, service: &str, subset: Option<&str>) -> Arc<Cluster> {
        let key = (source.to_string(), service.to_string(), subset.map(str::to_owned));
        self.map.lock().unwrap_or_else(|p| p.into_inner()).entry(key).or_default().clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn addrs(n: u8) -> Vec<SocketAddr> {
        (1..=n).map(|i| SocketAddr::from(([10, 0, 0, i], 8080))).collect()
    }

    fn outlier(n: u32, max_pct: u32) -> Outlier {
        Outlier {
            consecutive_5xx: Some(n),
            consecutive_gateway: None,
            interval: Duration::from_secs(10),
            base_ejection: Duration::from_secs(30),
            max_ejection_percent: max_pct,
            min_health_percent: 0,
            split_local_origin: false,
        }
    }

    #[test]
    fn least_request_prefers_the_idle_endpoint() {
        let c = Arc::new(Cluster::default());
        let eps = addrs(2);
        let mut held = Vec::new();
        for _ in 0..5 {
            held.push(c.pick(&eps[..1], None, &LbPolicy::RoundRobin, None, None, eps[0]).unwrap());
        }
        let picks: Vec<_> =
            (0..50).map(|_| c.pick(&eps, None, &LbPolicy::LeastRequest, None, None, eps[0]).unwrap().0).collect();
        assert!(picks.iter().all(|a| *a == eps[1]), "busy endpoint chosen: {picks:?}");
    }

    #[test]
    fn the_best_rank_serves_until_its_endpoints_are_ejected_and_again_when_they_return() {
        let c = Arc::new(Cluster::default());
        let eps = addrs(3);
        // eps[0] and eps[1] near the client, eps[2] in the next rank.
        let ranks = Localities::Ranked(vec![0, 0, 1]);
        let o = Outlier {
            interval: Duration::from_millis(20),
            base_ejection: Duration::from_millis(60),
            ..outlier(1, 100)
        };
        let pick = || c.pick(&eps, Some(&ranks), &LbPolicy::RoundRobin, Some(&o), None, eps[0]).unwrap().0;
        let seen: std::collections::BTreeSet<_> = (0..10).map(|_| pick()).collect();
        assert_eq!(seen, [eps[0], eps[1]].into(), "only the near rank serves");
        assert!(c.record(eps[0], Outcome::Status(503), Some(&o), 3));
        assert!((0..10).all(|_| pick() == eps[1]), "one near endpoint left: it serves alone");
        assert!(c.record(eps[1], Outcome::Status(503), Some(&o), 3));
        assert!((0..10).all(|_| pick() == eps[2]), "the near rank ejected: the next serves");
        std::thread::sleep(Duration::from_millis(150));
        let seen: std::collections::BTreeSet<_> = (0..10).map(|_| pick()).collect();
        assert_eq!(seen, [eps[0], eps[1]].into(), "back to the near rank once its ejections end");
    }

    #[test]
    fn distribute_splits_by_locality_shares_and_moves_a_dead_localitys_share_to_the_rest() {
        let c = Arc::new(Cluster::default());
        let eps = addrs(4);
        // eps[0], eps[1] in the 80% locality, eps[2] in the 20% one, eps[3] in one
        // the shares do not name.
        let split = Localities::Weighted { group: vec![Some(0), Some(0), Some(1), None], weights: vec![80, 20] };
        let o = outlier(1, 100);
        let pick = || c.pick(&eps, Some(&split), &LbPolicy::RoundRobin, Some(&o), None, eps[0]).unwrap().0;
        let mut counts = [0usize; 4];
        for _ in 0..2000 {
            let chosen = pick();
            counts[eps.iter().position(|a| *a == chosen).unwrap()] += 1;
        }
        let first = counts[0] + counts[1];
        assert!((1450..=1750).contains(&first), "about 80% to the first locality: {counts:?}");
        assert!(counts[0] > 500 && counts[1] > 500, "spread within it: {counts:?}");
        assert_eq!(counts[3], 0, "a locality the shares do not name gets nothing: {counts:?}");
        // The 20% locality ejected: its share goes to the rest that are named.
        assert!(c.record(eps[2], Outcome::Status(503), Some(&o), 4));
        assert!((0..200).map(|_| pick()).all(|a| a == eps[0] || a == eps[1]));
        // Every named locality ejected: the unnamed one serves rather than nothing.
        assert!(c.record(eps[0], Outcome::Status(503), Some(&o), 4));
        assert!(c.record(eps[1], Outcome::Status(503), Some(&o), 4));
        assert!((0..20).map(|_| pick()).all(|a| a == eps[3]));
    }

    #[test]
    fn consecutive_5xx_eject_within_the_cap_and_ejected_endpoints_are_skipped() {
        let c = Arc::new(Cluster::default());
        let eps = addrs(2);
        let o = outlier(3, 50);
        assert!(!c.record(eps[0], Outcome::Status(503), Some(&o), 2));
        assert!(!c.record(eps[0], Outcome::Status(500), Some(&o), 2));
        assert!(c.record(eps[0], Outcome::Status(503), Some(&o), 2), "third 5xx ejects");
        assert_eq!(c.ejected(), vec![eps[0]]);
        for _ in 0..10 {
            assert_eq!(c.pick(&eps, None, &LbPolicy::RoundRobin, Some(&o), None, eps[0]).unwrap().0, eps[1]);
        }
        for _ in 0..3 {
            c.record(eps[1], Outcome::LocalFailure, Some(&o), 2);
        }
        assert_eq!(c.ejected().len(), 1, "maxEjectionPercent 50 of 2 endpoints caps at one");
    }

    #[test]
    fn ejections_end_at_a_sweep_and_the_multiplier_decays_while_healthy() {
        let c = Cluster::default();
        let a = addrs(1)[0];
        let o = Outlier {
            interval: Duration::from_millis(40),
            base_ejection: Duration::from_millis(100),
            ..outlier(1, 100)
        };
        let started = Instant::now();
        assert!(c.record(a, Outcome::Status(503), Some(&o), 1));
        let until = |c: &Cluster| c.endpoints.lock().unwrap()[&a].ejected_until.unwrap();
        let first = until(&c);
        assert!(
            first >= started + o.base_ejection
                && first < started + o.base_ejection + o.interval + Duration::from_millis(20)
        );
        assert_eq!(first, next_sweep(first, o.interval), "released on a sweep boundary");
        // Ejected again right after coming back: twice the base time.
        std::thread::sleep(first.saturating_duration_since(Instant::now()) + Duration::from_millis(5));
        let t = Instant::now();
        assert!(c.record(a, Outcome::Status(503), Some(&o), 1));
        assert!(until(&c) >= t + o.base_ejection * 2, "multiplier 2");
        // Healthy for several sweeps: the multiplier decays back to one.
        let second = until(&c);
        std::thread::sleep(second.saturating_duration_since(Instant::now()) + o.interval * 3);
        let t = Instant::now();
        assert!(c.record(a, Outcome::Status(503), Some(&o), 1));
        assert!(until(&c) < t + o.base_ejection + o.interval + Duration::from_millis(20), "multiplier back to 1");
    }

    #[test]
    fn split_mode_ignores_local_origin_failures() {
        let c = Cluster::default();
        let o = Outlier { split_local_origin: true, ..outlier(1, 100) };
        let a = addrs(1)[0];
        assert!(!c.record(a, Outcome::LocalFailure, Some(&o), 1), "connect failures do not eject in split mode");
        assert!(c.record(a, Outcome::Status(503), Some(&o), 1), "an answered 5xx still does");
    }

    #[test]
    fn success_resets_the_error_run() {
        let c = Cluster::default();
        let o = outlier(2, 100);
        let a = addrs(1)[0];
        c.record(a, Outcome::Status(503), Some(&o), 1);
        c.record(a, Outcome::Status(200), Some(&o), 1);
        assert!(!c.record(a, Outcome::Status(503), Some(&o), 1));
    }

    #[tokio::test]
    async fn requests_over_the_limits_overflow() {
        let c = Arc::new(Cluster::default());
        let limits = PoolLimits { max_requests: Some(2), ..Default::default() };
        let a = c.admit(&limits).await.unwrap();
        let _b = c.admit(&limits).await.unwrap();
        assert_eq!(c.admit(&limits).await.unwrap_err(), Overflow::Requests);
        drop(a);
        assert!(c.admit(&limits).await.is_ok(), "a finished request frees its slot");

        let c = Arc::new(Cluster::default());
        let limits = PoolLimits { max_connections: Some(1), max_pending: Some(1), ..Default::default() };
        let first = c.admit(&limits).await.unwrap();
        let c2 = c.clone();
        let l2 = limits.clone();
        let queued = tokio::spawn(async move { c2.admit(&l2).await.map(|_| ()) });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(c.admit(&limits).await.unwrap_err(), Overflow::Pending, "queue of one is full");
        drop(first);
        assert!(queued.await.unwrap().is_ok(), "the queued request gets the connection");
    }

    #[test]
    fn retries_in_flight_are_capped_by_max_retries() {
        let c = Cluster::default();
        let first = c.try_retry(Some(1)).expect("one retry allowed");
        assert!(c.try_retry(Some(1)).is_none(), "second concurrent retry refused");
        drop(first);
        assert!(c.try_retry(Some(1)).is_some());
        assert!(c.try_retry(None).is_some(), "no limit configured");
    }

    #[test]
    fn consistent_hash_keeps_a_key_on_its_endpoint() {
        let c = Arc::new(Cluster::default());
        let eps = addrs(4);
        let lb = LbPolicy::HashSourceIp;
        let first = c.pick(&eps, None, &lb, None, Some(b"10.1.1.1"), eps[0]).unwrap().0;
        for _ in 0..10 {
            assert_eq!(c.pick(&eps, None, &lb, None, Some(b"10.1.1.1"), eps[0]).unwrap().0, first);
        }
    }
}

//! The pods of this node: which to capture, starting and stopping their proxies and
//! kernel enrollment, the namespaces the CNI plugin handed over, and what each pod's
//! state is (reported on `/sync_status`, answered to the plugin).
//!
//! Invariants:
//! - A pod is known by its UID; its name is only ever a label in logs and reports.
//! - A pod that should be captured and is not is `Failed` with the reason, and its
//!   kernel state from an earlier enrollment stays (fail closed); only a pod that left
//!   the node or the mesh is unenrolled.
//! - A failed pod holds no handle on its namespace: no listener, no fd.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::admin::{PodReport, PodState};
use crate::cni::{Reply, Request};
use crate::dataplane::{Dataplane, Netns, PlaintextVerdicts, PodEnrollment, PodUid};
use crate::proxy::{PodProxy, ProxyContext};
use crate::snapshot::Snapshot;
use crate::state::Workload;

/// How long a CNI `ADD` waits for the config source to show the pod (the API server
/// has it before the runtime starts the sandbox, but the agent's watch may lag).
const CNI_WAIT: Duration = Duration::from_secs(30);

/// A pod this agent serves.
struct RunningPod {
    proxy: PodProxy,
    enrollment: PodEnrollment,
    /// The namespace served, to tell a recreated sandbox.
    netns: u64,
    /// What the kernel holds for the pod's plaintext, to write only changes.
    plaintext: Option<PlaintextVerdicts>,
    /// Whether the kernel sends the pod's DNS queries to its proxy.
    dns_capture: bool,
}

/// A sandbox the CNI plugin announced: the pod's namespace and addresses.
struct Sandbox {
    netns: Arc<Netns>,
    ips: Vec<IpAddr>,
    since: Instant,
}

/// A CNI `ADD` waiting for the pod's state to be known.
struct Waiter {
    uid: PodUid,
    pod: String,
    since: Instant,
    reply: oneshot::Sender<Reply>,
}

/// The node's pods.
#[derive(Default)]
pub(super) struct Pods {
    running: HashMap<PodUid, RunningPod>,
    /// Enrollments whose proxy was stopped to be started again (new addresses or
    /// identity): their kernel entries keep the pod closed until the new enrollment
    /// replaces them, then their link goes.
    replaced: HashMap<PodUid, PodEnrollment>,
    /// Where each pod stands, by its UID as written (`namespace/name` without one), so
    /// a pod whose UID is invalid is reported too.
    state: BTreeMap<String, PodReport>,
    sandboxes: HashMap<PodUid, Sandbox>,
    waiting: Vec<Waiter>,
    /// Whether pods' namespaces are set up so deliveries come from the client's
    /// address (`--inbound-transparent`).
    transparent_delivery: bool,
}

/// A local pod that should be captured, with the addresses to serve it at.
struct Wanted {
    uid: PodUid,
    workload: Arc<Workload>,
}

impl Pods {
    /// No pods yet; `transparent_delivery`: whether to set pods' namespaces up so
    /// deliveries come from the client's address.
    pub fn new(transparent_delivery: bool) -> Self {
        Self { transparent_delivery, ..Self::default() }
    }

    /// The pods enrolled now.
    pub fn enrollments(&self) -> Vec<&PodEnrollment> {
        self.running.values().map(|p| &p.enrollment).collect()
    }

    /// Whether a pod waits for its certificate.
    pub fn waiting_for_certificates(&self) -> bool {
        self.state.values().any(|r| matches!(r.state, PodState::Pending(_)))
    }

    /// `namespace/name` of the pods waiting for a certificate.
    pub fn pending(&self) -> Vec<&str> {
        self.state.values().filter(|r| matches!(r.state, PodState::Pending(_))).map(|r| r.pod.as_str()).collect()
    }

    /// How many pods are captured now.
    pub fn enrolled_count(&self) -> usize {
        self.running.len()
    }

    /// Closes this agent's listening sockets of every pod served (draining: the
    /// accept loops have stopped; the connections they took go on).
    pub fn close_listeners(&mut self) {
        for pod in self.running.values_mut() {
            pod.proxy.close_listeners();
        }
    }

    /// A copy of every socket of the pods served, named for a successor agent.
    pub fn sockets(&self) -> Vec<(crate::transport::inherited::SocketKey, std::os::fd::OwnedFd)> {
        self.running.values().flat_map(|pod| pod.proxy.sockets()).collect()
    }

    /// Every local pod that should be captured, with its state.
    pub fn report(&self) -> Vec<PodReport> {
        self.state.values().cloned().collect()
    }

    /// UIDs of the local pods that should be captured (for the kernel takeover).
    pub fn wanted_uids(snap: &Snapshot, node: &str) -> HashSet<PodUid> {
        local_pods(snap, node).filter(|w| w.enrolled).filter_map(|w| PodUid::parse(w.uid.as_deref()?).ok()).collect()
    }

    /// A request from the CNI plugin. `ADD` is answered once the pod's state is known
    /// ([`Pods::answer_waiters`], after the next reconcile); `DEL` at once.
    pub fn cni(
        &mut self,
        dataplane: &Dataplane,
        request: Request,
        netns: Option<OwnedFd>,
        reply: oneshot::Sender<Reply>,
    ) {
        match request {
            Request::Add { uid, namespace, name, ips } => {
                let pod = format!("{namespace}/{name}");
                let uid = match PodUid::parse(&uid) {
                    Ok(u) => u,
                    Err(e) => {
                        let _ = reply.send(Reply::Failed { reason: e.to_string() });
                        return;
                    }
                };
                let Some(fd) = netns else {
                    let _ = reply.send(Reply::Failed { reason: "no network namespace descriptor".into() });
                    return;
                };
                let netns = match Netns::from_fd(fd, format!("netns of pod {pod} (from CNI)")) {
                    Ok(n) => Arc::new(n),
                    Err(e) => {
                        let _ = reply.send(Reply::Failed { reason: e.to_string() });
                        return;
                    }
                };
                tracing::info!(%pod, %uid, netns = netns.inode(), "CNI ADD: pod sandbox starting");
                // A new sandbox for a pod already served (the runtime recreated it):
                // the old namespace is gone, so is its capture.
                if let Some(old) = self.running.get(&uid)
                    && old.netns != netns.inode()
                {
                    self.stop(dataplane, &uid, "its sandbox was recreated");
                }
                self.sandboxes.insert(uid.clone(), Sandbox { netns, ips, since: Instant::now() });
                self.waiting.push(Waiter { uid, pod, since: Instant::now(), reply });
            }
            Request::Del { uid } => {
                if let Ok(uid) = PodUid::parse(&uid) {
                    self.sandboxes.remove(&uid);
                    if self.running.contains_key(&uid) {
                        self.stop(dataplane, &uid, "CNI DEL: its sandbox is gone");
                    }
                }
                let _ = reply.send(Reply::Removed);
            }
        }
    }

    /// Brings the served pods in line with `snap`.
    pub fn reconcile(&mut self, ctx: &ProxyContext, dataplane: &Dataplane, snap: &Snapshot, node: &str) {
        let mut wanted = Vec::new();
        let mut state = BTreeMap::new();
        for w in local_pods(snap, node).filter(|w| w.enrolled) {
            match self.wanted(w) {
                Ok(want) => wanted.push(want),
                Err((uid, reason)) => {
                    let key = if uid.is_empty() { w.key() } else { uid.clone() };
                    let report = PodReport { pod: w.key(), uid, state: PodState::Failed(reason) };
                    if self.state.get(&key) != Some(&report) {
                        tracing::warn!(pod = %report.pod, uid = %report.uid, state = ?report.state, "pod cannot be captured");
                    }
                    state.insert(key, report);
                }
            }
        }
        let wanted_uids: HashSet<&PodUid> = wanted.iter().map(|w| &w.uid).collect();
        let gone: Vec<PodUid> = self.running.keys().filter(|u| !wanted_uids.contains(u)).cloned().collect();
        for uid in gone {
            self.stop(dataplane, &uid, "it left this node or the mesh");
        }
        let gone: Vec<PodUid> = self.replaced.keys().filter(|u| !wanted_uids.contains(u)).cloned().collect();
        for uid in gone {
            if let Some(old) = self.replaced.remove(&uid)
                && let Err(e) = dataplane.unenroll(old)
            {
                tracing::error!(%uid, error = %e, "unenroll failed");
            }
        }
        // Identities are issued before the pods' proxies start, so the first handshake
        // finds its certificate.
        ctx.dialer.certs.set_local(wanted.iter().map(|w| w.workload.identity.clone()));
        for want in &wanted {
            let report = |state| PodReport { pod: want.workload.key(), uid: want.uid.to_string(), state };
            let changed = self.running.get(&want.uid).is_some_and(|p| {
                p.proxy.workload.ips != want.workload.ips || p.proxy.workload.identity != want.workload.identity
            });
            if changed && let Some(p) = self.running.remove(&want.uid) {
                // Listeners are bound again below; until then the old kernel entries
                // keep the pod closed (its listeners are gone, so nothing gets through).
                p.proxy.stop();
                self.replaced.insert(want.uid.clone(), p.enrollment);
            }
            if self.running.contains_key(&want.uid) {
                state.insert(want.uid.to_string(), report(PodState::Enrolled));
                continue;
            }
            let result = self.start(ctx, dataplane, want);
            let pod_state = match result {
                Ok(p) => {
                    tracing::info!(pod = %want.workload.key(), uid = %want.uid, "pod captured");
                    if let Some(old) = self.replaced.remove(&want.uid)
                        && let Err(e) = dataplane.retire_link(old)
                    {
                        tracing::warn!(pod = %want.workload.key(), error = %e, "removing the replaced sk_lookup link");
                    }
                    self.running.insert(want.uid.clone(), p);
                    PodState::Enrolled
                }
                Err(s) => s,
            };
            if let PodState::Failed(reason) = &pod_state
                && self.state.get(want.uid.as_str()).is_none_or(|r| r.state != pod_state)
            {
                tracing::warn!(pod = %want.workload.key(), uid = %want.uid, %reason, "pod cannot be captured; will retry");
            }
            state.insert(want.uid.to_string(), report(pod_state));
        }
        self.state = state;
        self.set_plaintext_verdicts(dataplane, snap);
        self.set_dns_capture(dataplane, &wanted);
        // Namespaces announced by the plugin for pods the config never showed.
        self.sandboxes.retain(|uid, s| wanted_uids.contains(uid) || s.since.elapsed() < CNI_WAIT);
    }

    /// The pod to capture for workload `w`, or why it cannot be: `(uid, reason)`.
    fn wanted(&self, w: &Arc<Workload>) -> Result<Wanted, (String, String)> {
        let raw = w.uid.clone().unwrap_or_default();
        let uid = PodUid::parse(&raw)
            .map_err(|_| (raw.clone(), "metadata.uid is missing or not a UUID: pods are found by UID only".into()))?;
        // The plugin's addresses come from the network plugin itself; the API shows
        // them only once the sandbox is up.
        let workload = match self.sandboxes.get(&uid) {
            Some(s) if !s.ips.is_empty() && s.ips != w.ips => {
                Arc::new(Workload { ips: s.ips.clone(), ..(**w).clone() })
            }
            _ => w.clone(),
        };
        Ok(Wanted { uid, workload })
    }

    fn start(&self, ctx: &ProxyContext, dataplane: &Dataplane, want: &Wanted) -> Result<RunningPod, PodState> {
        let w = &want.workload;
        if w.ips.is_empty() {
            return Err(PodState::NotStarted("no address yet".into()));
        }
        if !ctx.dialer.certs.has(&w.identity) {
            let why = ctx.dialer.certs.last_error().map(|e| format!(" (last answer: {e})")).unwrap_or_default();
            return Err(PodState::Pending(format!("waiting for a certificate for {} from the CA{why}", w.identity)));
        }
        let netns = match self.sandboxes.get(&want.uid) {
            Some(s) => s.netns.clone(),
            None => match dataplane.running_pod_netns(&want.uid) {
                Ok(n) => Arc::new(n),
                // No cgroup or no process: nothing of the pod runs here yet.
                Err(crate::dataplane::Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                    return Err(PodState::NotStarted(source.to_string()));
                }
                Err(e) => return Err(PodState::Failed(e.to_string())),
            },
        };
        // What enrolling needs first, looked up before any listener is bound: a pod that
        // cannot be captured leaves no listener behind whose task has yet to notice it
        // was stopped (the next attempt would find its port taken and report that
        // instead of why).
        dataplane.pod_cgroup_id(&want.uid).map_err(|e| PodState::Failed(e.to_string()))?;
        if self.transparent_delivery && netns.transparent().is_none() && !netns.is_host() {
            // Fidelity, not security: without it the application sees the pod's own
            // address as every peer's, as before.
            match crate::dataplane::transparent::prepare(&netns) {
                Ok(()) => netns.set_transparent(Some(dataplane.deliveries())),
                Err(e) => tracing::warn!(pod = %w.name, error = %e, "deliveries will not show the client's address"),
            }
        }
        let proxy = PodProxy::start(ctx, w.clone(), netns.clone()).map_err(|e| PodState::Failed(e.to_string()))?;
        match dataplane.enroll(&want.uid, &netns, &w.ips, &proxy, w.dns_capture) {
            Ok(enrollment) => {
                Ok(RunningPod { proxy, enrollment, netns: netns.inode(), plaintext: None, dns_capture: w.dns_capture })
            }
            Err(e) => {
                // Dropping the proxy closes its listeners: no handle on the namespace stays.
                proxy.stop();
                Err(PodState::Failed(e.to_string()))
            }
        }
    }

    fn stop(&mut self, dataplane: &Dataplane, uid: &PodUid, why: &str) {
        if let Some(p) = self.running.remove(uid) {
            p.proxy.stop();
            let pod = p.proxy.workload.key();
            if let Err(e) = dataplane.unenroll(p.enrollment) {
                tracing::error!(%pod, %uid, error = %e, "unenroll failed");
            }
            tracing::info!(%pod, %uid, why, "pod no longer served");
        }
        self.state.remove(uid.as_str());
    }

    /// Follows a namespace's or pod's DNS capture setting changing while the pod runs.
    fn set_dns_capture(&mut self, dataplane: &Dataplane, wanted: &[Wanted]) {
        for want in wanted {
            let Some(p) = self.running.get_mut(&want.uid) else { continue };
            let on = want.workload.dns_capture;
            if p.dns_capture == on {
                continue;
            }
            match dataplane.set_dns_capture(&p.enrollment, on) {
                Ok(()) => {
                    tracing::info!(pod = %want.workload.key(), dns_capture = on, "DNS capture changed");
                    p.dns_capture = on;
                }
                Err(e) => tracing::error!(pod = %want.workload.key(), error = %e, "changing DNS capture failed"),
            }
        }
    }

    fn set_plaintext_verdicts(&mut self, dataplane: &Dataplane, snap: &Snapshot) {
        for p in self.running.values_mut() {
            let key = p.proxy.workload.key();
            let (default_drop, ports) = snap.security(&key).plaintext_verdicts();
            let desired = PlaintextVerdicts { default_drop, ports };
            if p.plaintext.as_ref() == Some(&desired) {
                continue;
            }
            match dataplane.set_plaintext_verdicts(&p.enrollment, &desired) {
                Ok(true) => {
                    tracing::info!(pod = %key, drop_by_default = desired.default_drop, ports = ?desired.ports, "kernel plaintext verdicts set");
                    p.plaintext = Some(desired);
                }
                Ok(false) => {
                    tracing::warn!(pod = %key, ports = desired.ports.len(), "too many per-port plaintext verdicts for the kernel table; the agent judges this pod's plaintext alone");
                    p.plaintext = Some(desired);
                }
                // The agent still refuses what the kernel would have dropped.
                Err(e) => tracing::error!(pod = %key, error = %e, "writing plaintext verdicts failed"),
            }
        }
    }

    /// Answers the CNI `ADD`s whose pod state is known, and those that waited too long.
    pub fn answer_waiters(&mut self, snap: &Snapshot, node: &str) {
        let waiting = std::mem::take(&mut self.waiting);
        for w in waiting {
            match self.answer(snap, node, &w) {
                Some(reply) => {
                    tracing::info!(pod = %w.pod, uid = %w.uid, ?reply, "CNI ADD answered");
                    let _ = w.reply.send(reply);
                }
                None if w.since.elapsed() >= CNI_WAIT => {
                    let reason = match self.state.get(w.uid.as_str()).map(|r| &r.state) {
                        Some(PodState::Pending(why) | PodState::NotStarted(why)) => {
                            format!("pod {} not captured after {CNI_WAIT:?}: {why}; the runtime will retry", w.pod)
                        }
                        _ => format!(
                            "pod {} (uid {}) is not known to the agent after {CNI_WAIT:?}; the runtime will retry",
                            w.pod, w.uid
                        ),
                    };
                    tracing::warn!(pod = %w.pod, uid = %w.uid, "{reason}");
                    let _ = w.reply.send(Reply::Failed { reason });
                }
                None => self.waiting.push(w),
            }
        }
    }

    fn answer(&self, snap: &Snapshot, node: &str, w: &Waiter) -> Option<Reply> {
        let workload = snap
            .workloads
            .iter()
            .find(|x| x.uid.as_deref().and_then(|u| PodUid::parse(u).ok()) == Some(w.uid.clone()))?;
        if workload.node.as_deref() != Some(node) {
            return Some(Reply::Failed {
                reason: format!(
                    "the API server has pod {} on node {}, not {node}",
                    workload.key(),
                    workload.node.as_deref().unwrap_or("(none)")
                ),
            });
        }
        if !workload.enrolled {
            return Some(Reply::NotInMesh { reason: format!("{} is not in the mesh", workload.key()) });
        }
        match self.state.get(w.uid.as_str()).map(|r| &r.state) {
            Some(PodState::Enrolled) => Some(Reply::Enrolled),
            Some(PodState::Failed(reason)) => Some(Reply::Failed { reason: reason.clone() }),
            _ => None,
        }
    }
}

/// Pods scheduled on `node`.
fn local_pods<'a>(snap: &'a Snapshot, node: &'a str) -> impl Iterator<Item = &'a Arc<Workload>> + 'a {
    snap.workloads.iter().filter(move |w| w.node.as_deref() == Some(node))
}

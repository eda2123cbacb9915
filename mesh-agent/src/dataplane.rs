//! The kernel side as the agent drives it: loading and attaching the programs, pinning
//! maps and links under a per-node bpffs directory, and keeping the tables in sync with
//! the enrolled pods.
//!
//! Architecture invariant: this is the only module that calls aya. Capture stays in
//! place when the agent exits (links are pinned), so a dead agent fails closed: enrolled
//! pods' connections are refused, never sent around the mesh in plaintext.

pub mod direct;
mod locate;
mod mounts;
mod netns;
mod sockopt;
pub mod splice;
pub mod transparent;

pub use locate::PodUid;
pub use mounts::{cgroup2_mount, cgroup2_root, ensure_bpffs, is_bpffs};
pub use netns::Netns;

use std::collections::{BTreeSet, HashSet};
use std::fs::File;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use aya::maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray, SockHash, SockMap};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::{CgroupAttachMode, CgroupSockAddr, SkLookup, SkSkb, SockOps};
use aya::{Ebpf, EbpfLoader};
use mesh_common::{
    CONFIG_FLAG_READY, IpKey, MeshConfig, NetnsPod, NetnsPortKey, OrigDst, PLAINTEXT_ALLOW, PLAINTEXT_DROP,
    POD_FLAG_DNS, POD_FLAG_ENROLLED, POD_FLAG_HAS_IP6, PodInfo, SockAddrKey, capacity, globals, maps, programs,
};

/// The kernel object built by `mesh-ebpf` (see build.rs).
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/mesh-ebpf"));

/// Sub-directory of the pin directory holding pinned links.
const LINKS_DIR: &str = "links";

/// Where systemd puts the kubelet (its `kubelet.service` unit), relative to the cgroup2
/// mount: the default kubelet cgroup.
pub const KUBELET_UNIT_CGROUP: &str = "system.slice/kubelet.service";

/// Errors of the data plane.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Loading the object or a program failed (the verifier log is in the source).
    #[error("loading eBPF: {0}")]
    Load(#[from] aya::EbpfError),
    /// A program could not be loaded or attached.
    #[error("program {program}: {source}")]
    Program {
        /// Program name.
        program: &'static str,
        /// aya's error, with the verifier log for load failures.
        source: aya::programs::ProgramError,
    },
    /// The compiled object lacks a program the agent needs (kernel and agent built
    /// from different sources).
    #[error("program {program} is missing from the eBPF object")]
    MissingProgram {
        /// Program name.
        program: &'static str,
    },
    /// A map is missing or could not be updated.
    #[error("map {map}: {reason}")]
    Map {
        /// Map name.
        map: &'static str,
        /// What failed.
        reason: String,
    },
    /// A link could not be pinned or unpinned.
    #[error("link {path}: {reason}")]
    Link {
        /// Pin path.
        path: PathBuf,
        /// What failed.
        reason: String,
    },
    /// A file the data plane needs (cgroup, netns, bpffs) is not usable.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A system call failed.
    #[error("{call}: {source}")]
    Sys {
        /// What was called.
        call: String,
        /// errno.
        source: nix::Error,
    },
    /// No slot left for another pod on this node.
    #[error("no free inbound listener slot ({0} pods enrolled)")]
    NoSlot(u32),
}

fn map_err(map: &'static str) -> impl Fn(aya::maps::MapError) -> Error {
    move |e| Error::Map { map, reason: e.to_string() }
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |source| Error::Io { path: path.to_owned(), source }
}

/// Where the node's kernel objects live.
#[derive(Debug, Clone)]
pub struct Paths {
    /// cgroup v2 directory the capture programs attach to; pods' cgroups are found
    /// below it by UID, in kubelet's layouts.
    pub node_cgroup: PathBuf,
    /// `/proc` of the host's PID namespace, for the namespaces of running pods.
    pub proc_dir: PathBuf,
    /// bpffs directory for this node's maps and links.
    pub pin_dir: PathBuf,
    /// The kubelet's cgroup: its connections to pods are probes, which reach the
    /// application whatever the pod's policy. None: probes are judged as any plaintext.
    pub kubelet_cgroup: Option<PathBuf>,
}

/// Tables written by the reconcile loop; one lock, writes are rare.
struct Tables {
    enrolled: BpfHashMap<MapData, u64, PodInfo>,
    netns_pods: BpfHashMap<MapData, u64, NetnsPod>,
    listeners: SockMap<MapData>,
    config: Array<MapData, MeshConfig>,
    excluded_ports: BpfHashMap<MapData, u32, u32>,
    plaintext: BpfHashMap<MapData, NetnsPortKey, u32>,
}

/// A pod's plaintext verdicts as the kernel holds them (`true`: dropped in the kernel).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PlaintextVerdicts {
    /// For every port without its own entry.
    pub default_drop: bool,
    /// Ports whose verdict differs from the default.
    pub ports: Vec<(u16, bool)>,
}

/// A pod's kernel-side enrollment.
#[derive(Debug)]
pub struct PodEnrollment {
    uid: PodUid,
    cgroup_id: u64,
    netns: u64,
    slot: u32,
    sk_lookup_pin: PathBuf,
}

impl PodEnrollment {
    /// The pod.
    pub fn uid(&self) -> &PodUid {
        &self.uid
    }
}

/// The loaded programs and their maps.
pub struct Dataplane {
    ebpf: Mutex<Ebpf>,
    tables: Mutex<Tables>,
    orig_dst: BpfHashMap<MapData, SockAddrKey, OrigDst>,
    /// The agent's transparent deliveries being connected.
    deliveries: std::sync::Arc<transparent::Deliveries>,
    probe_stats: PerCpuArray<MapData, u64>,
    /// What the kernel programs did, per `mesh_common::events` index and CPU.
    kernel_events: PerCpuArray<MapData, u64>,
    /// Admitted connections spliced in the kernel; None where the verdict program
    /// could not be attached (the agent then copies every connection itself).
    splice: Option<std::sync::Arc<splice::KernelSplice>>,
    /// The direct path between pods of this node.
    direct: std::sync::Arc<direct::DirectPath>,
    paths: Paths,
    /// Suffix of this run's pinned links, so a restart can tell old links from new.
    generation: String,
    /// Links pinned by an earlier run, detached once this run's are in place (or the
    /// pod they capture is gone).
    stale_links: Mutex<Vec<PathBuf>>,
    /// aya-log level of every program this run loads.
    kernel_log_level: u8,
    /// Links pinned by this run, to name each pin uniquely.
    pins: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for Dataplane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dataplane").field("paths", &self.paths).field("generation", &self.generation).finish()
    }
}

impl Dataplane {
    /// Loads the programs, reusing maps pinned by an earlier run, and attaches the cgroup
    /// programs to the node cgroup. Links of an earlier run are detached by
    /// [`Dataplane::finish_takeover`] once this run serves every pod.
    pub fn load(paths: Paths, bypass_mark: u32, excluded_ports: &[u16]) -> Result<Self, Error> {
        ensure_bpffs(&paths.pin_dir)?;
        let links_dir = paths.pin_dir.join(LINKS_DIR);
        std::fs::create_dir_all(&links_dir).map_err(io_err(&links_dir))?;
        let stale_links = list_dir(&links_dir)?;

        let kernel_log_level: u8 = if tracing::enabled!(target: "mesh_ebpf", tracing::Level::DEBUG) { 4 } else { 2 };
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&paths.pin_dir)
            .map_pin_path(maps::AYA_LOGS, paths.pin_dir.join(maps::AYA_LOGS))
            .override_global("AYA_LOG_LEVEL", &kernel_log_level, false)
            .load(EBPF_OBJECT)?;
        start_kernel_log(&mut ebpf);

        let generation = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0).to_string();
        let tables = Tables {
            enrolled: take_map(&mut ebpf, maps::ENROLLED_PODS)?,
            netns_pods: take_map(&mut ebpf, maps::NETNS_PODS)?,
            listeners: take_map(&mut ebpf, maps::INBOUND_LISTENERS)?,
            config: take_map(&mut ebpf, maps::MESH_CONFIG)?,
            excluded_ports: take_map(&mut ebpf, maps::EXCLUDED_PORTS)?,
            plaintext: take_map(&mut ebpf, maps::PLAINTEXT_POLICY)?,
        };
        let orig_dst = take_map(&mut ebpf, maps::ORIG_DST)?;
        let deliveries = transparent::Deliveries::new(take_map(&mut ebpf, maps::DELIVERIES)?);
        let probe_stats = take_map(&mut ebpf, maps::PROBE_STATS)?;
        let kernel_events = take_map(&mut ebpf, maps::KERNEL_EVENTS)?;
        let direct = std::sync::Arc::new(direct::DirectPath::new(
            take_map(&mut ebpf, maps::DIRECT_PAIRS)?,
            take_map(&mut ebpf, maps::DIRECT_FLOWS)?,
            take_map(&mut ebpf, maps::DIRECT_EVENTS)?,
            take_map(&mut ebpf, maps::DIRECT_STATS)?,
        ));
        let splice = match attach_splice(&mut ebpf) {
            Ok(s) => Some(std::sync::Arc::new(s)),
            Err(e) => {
                tracing::warn!(error = %e, "admitted connections will be copied by the agent, not spliced in the kernel");
                None
            }
        };

        let dp = Self {
            ebpf: Mutex::new(ebpf),
            tables: Mutex::new(tables),
            orig_dst,
            deliveries: std::sync::Arc::new(deliveries),
            probe_stats,
            kernel_events,
            splice,
            direct,
            paths,
            generation,
            stale_links: Mutex::new(stale_links),
            kernel_log_level,
            pins: std::sync::atomic::AtomicU64::new(0),
        };
        dp.write_config(bypass_mark, excluded_ports)?;
        dp.attach_cgroup_programs()?;
        Ok(dp)
    }

    /// The paths this data plane uses.
    pub fn paths(&self) -> &Paths {
        &self.paths
    }

    fn write_config(&self, bypass_mark: u32, excluded_ports: &[u16]) -> Result<(), Error> {
        let mut t = self.tables.lock().unwrap_or_else(|p| p.into_inner());
        let cfg = MeshConfig { bypass_mark, flags: CONFIG_FLAG_READY };
        t.config.set(0, cfg, 0).map_err(map_err(maps::MESH_CONFIG))?;
        let stale: Vec<u32> = t.excluded_ports.keys().filter_map(Result::ok).collect();
        for p in stale {
            if !excluded_ports.contains(&(p as u16)) {
                t.excluded_ports.remove(&p).map_err(map_err(maps::EXCLUDED_PORTS))?;
            }
        }
        for p in excluded_ports {
            t.excluded_ports.insert(u32::from(*p), 1, 0).map_err(map_err(maps::EXCLUDED_PORTS))?;
        }
        Ok(())
    }

    fn attach_cgroup_programs(&self) -> Result<(), Error> {
        let cgroup = File::open(&self.paths.node_cgroup).map_err(io_err(&self.paths.node_cgroup))?;
        let mut ebpf = self.ebpf.lock().unwrap_or_else(|p| p.into_inner());
        for name in programs::CGROUP_SOCK_ADDR {
            let prog: &mut CgroupSockAddr = program(&mut ebpf, name)?;
            prog.load().map_err(|source| Error::Program { program: name, source })?;
            // Attached through a bpf link (kernel >= 5.7), which coexists with other links
            // on the cgroup whatever the mode ("Single" is the only mode bpf_link_create
            // accepts): the previous run's program stays attached until ours is in
            // place, so there is no window without capture during a restart.
            let link = prog.attach(&cgroup, CgroupAttachMode::Single).and_then(|id| prog.take_link(id));
            self.pin_link(name, link)?;
        }
        let name = programs::SOCKOPS;
        let prog: &mut SockOps = program(&mut ebpf, name)?;
        prog.load().map_err(|source| Error::Program { program: name, source })?;
        let link = prog.attach(&cgroup, CgroupAttachMode::Single).and_then(|id| prog.take_link(id));
        self.pin_link(name, link)?;

        tracing::info!(cgroup = %self.paths.node_cgroup.display(), pin_dir = %self.paths.pin_dir.display(), "capture programs attached");

        match &self.paths.kubelet_cgroup {
            Some(kubelet) => {
                let cgroup = File::open(kubelet).map_err(io_err(kubelet))?;
                let name = programs::PROBE_SOCKOPS;
                let prog: &mut SockOps = program(&mut ebpf, name)?;
                prog.load().map_err(|source| Error::Program { program: name, source })?;
                let link = prog.attach(&cgroup, CgroupAttachMode::Single).and_then(|id| prog.take_link(id));
                self.pin_link(name, link)?;
                tracing::info!(cgroup = %kubelet.display(), "kubelet probes recognised by their cgroup");
            }
            None => tracing::warn!(
                "no kubelet cgroup (--kubelet-cgroup): the kubelet's plaintext probes are judged as any plaintext, and dropped for STRICT pods"
            ),
        }
        Ok(())
    }

    /// Kubelet probe connections the kernel has let through to pods' applications.
    pub fn probe_connections(&self) -> u64 {
        self.probe_stats.get(&0, 0).map(|per_cpu| per_cpu.iter().sum()).unwrap_or(0)
    }

    /// How full the maps the agent keeps are: `(map, entries, capacity)`. Counting walks
    /// each map's keys (one system call a key): call it seldom.
    pub fn map_fill(&self) -> Vec<(&'static str, usize, u32)> {
        use mesh_common::capacity;
        let t = self.tables.lock().unwrap_or_else(|p| p.into_inner());
        vec![
            (maps::ENROLLED_PODS, t.enrolled.keys().count(), capacity::PODS),
            (maps::NETNS_PODS, t.netns_pods.keys().count(), capacity::PODS),
            (maps::PLAINTEXT_POLICY, t.plaintext.keys().count(), capacity::PLAINTEXT_POLICY),
            (maps::ORIG_DST, self.orig_dst.keys().count(), capacity::CONNECTIONS),
        ]
    }

    /// What the kernel programs did so far, summed over the CPUs, by
    /// `mesh_common::events` index.
    pub fn kernel_events(&self) -> [u64; mesh_common::events::COUNT as usize] {
        summed_per_cpu(&self.kernel_events)
    }

    /// Pins a freshly attached program's link under this run's generation.
    fn pin_link<L>(&self, name: &'static str, link: Result<L, aya::programs::ProgramError>) -> Result<PathBuf, Error>
    where
        FdLink: TryFrom<L, Error = aya::programs::links::LinkError>,
    {
        let link = link.map_err(|source| Error::Program { program: name, source })?;
        let link = FdLink::try_from(link).map_err(|e| Error::Link { path: name.into(), reason: e.to_string() })?;
        self.pin(link, name)
    }

    fn pin(&self, link: FdLink, name: &str) -> Result<PathBuf, Error> {
        // A pod enrolled again in the same run gets a second link before its first goes.
        // (bpffs refuses names with a dot.)
        let seq = self.pins.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = self.paths.pin_dir.join(LINKS_DIR).join(format!("{name}@{}-{seq}", self.generation));
        link.pin(&path).map_err(|e| Error::Link { path: path.clone(), reason: e.to_string() })?;
        Ok(path)
    }

    /// Removes what an earlier run left for pods that are no longer wanted here, and
    /// its links where this run has replaced them. `wanted` are the pods that should be
    /// enrolled on this node, `current` those this run has enrolled. The kernel state of
    /// a wanted pod this run could not enroll yet stays: its capture fails closed
    /// (connections refused) instead of letting it talk around the mesh.
    pub fn finish_takeover(&self, wanted: &HashSet<PodUid>, current: &[&PodEnrollment]) -> Result<(), Error> {
        let current_uids: HashSet<&PodUid> = current.iter().map(|p| &p.uid).collect();
        let current_netns: BTreeSet<(u64, &PodUid)> = current.iter().map(|p| (p.netns, &p.uid)).collect();
        {
            let mut stale = self.stale_links.lock().unwrap_or_else(|p| p.into_inner());
            let mut kept = Vec::new();
            for path in std::mem::take(&mut *stale) {
                match link_pod(&path) {
                    Some(uid) if wanted.contains(&uid) && !current_uids.contains(&uid) => kept.push(path),
                    _ => unpin(&path)?,
                }
            }
            *stale = kept;
        }
        let mut t = self.tables.lock().unwrap_or_else(|p| p.into_inner());
        let gone: Vec<u64> = t
            .enrolled
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, pod)| !wanted.contains(&PodUid::from_bytes(&pod.uid)))
            .map(|(k, _)| k)
            .collect();
        for k in gone {
            t.enrolled.remove(&k).map_err(map_err(maps::ENROLLED_PODS))?;
        }
        // A wanted pod's entry for another namespace than the one this run enrolled is
        // that of a sandbox the pod no longer has.
        let gone: Vec<u64> = t
            .netns_pods
            .iter()
            .filter_map(Result::ok)
            .filter(|(ino, pod)| {
                let uid = PodUid::from_bytes(&pod.uid);
                !wanted.contains(&uid) || (current_uids.contains(&uid) && !current_netns.contains(&(*ino, &uid)))
            })
            .map(|(k, _)| k)
            .collect();
        for k in gone {
            t.netns_pods.remove(&k).map_err(map_err(maps::NETNS_PODS))?;
        }
        let kept: BTreeSet<u64> = t.netns_pods.keys().filter_map(Result::ok).collect();
        let gone: Vec<NetnsPortKey> =
            t.plaintext.keys().filter_map(Result::ok).filter(|k| !kept.contains(&k.netns)).collect();
        for k in gone {
            t.plaintext.remove(&k).map_err(map_err(maps::PLAINTEXT_POLICY))?;
        }
        Ok(())
    }

    /// Whether links of an earlier run are still pinned for pods this run has not
    /// enrolled yet ([`Dataplane::finish_takeover`] removes them once it has).
    pub fn has_stale_links(&self) -> bool {
        !self.stale_links.lock().unwrap_or_else(|p| p.into_inner()).is_empty()
    }

    /// Makes the kernel's plaintext verdicts for `pod` exactly `v`: new entries first,
    /// then the ones `v` no longer has. A pod whose verdicts would take more than its
    /// share of the table ([`capacity::PLAINTEXT_PER_POD`]) gets none: the kernel then
    /// passes its plaintext to the agent, which refuses what the verdicts would have.
    /// Returns whether the kernel holds the verdicts.
    pub fn set_plaintext_verdicts(&self, pod: &PodEnrollment, v: &PlaintextVerdicts) -> Result<bool, Error> {
        let verdict = |drop: bool| if drop { PLAINTEXT_DROP } else { PLAINTEXT_ALLOW };
        let key = |port: u16| NetnsPortKey { netns: pod.netns, port: u32::from(port), _pad: 0 };
        let mut desired = Vec::new();
        if v.default_drop {
            desired.push((key(0), PLAINTEXT_DROP));
        }
        for (port, drop) in &v.ports {
            desired.push((key(*port), verdict(*drop)));
        }
        let fits = desired.len() <= capacity::PLAINTEXT_PER_POD as usize;
        if !fits {
            desired.clear();
        }
        let mut t = self.tables.lock().unwrap_or_else(|p| p.into_inner());
        for (k, value) in &desired {
            t.plaintext.insert(k, value, 0).map_err(map_err(maps::PLAINTEXT_POLICY))?;
        }
        let stale: Vec<NetnsPortKey> = t
            .plaintext
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.netns == pod.netns && !desired.iter().any(|(d, _)| d == k))
            .collect();
        for k in stale {
            t.plaintext.remove(&k).map_err(map_err(maps::PLAINTEXT_POLICY))?;
        }
        Ok(fits)
    }

    /// The cgroup v2 id of pod `uid` (the inode number of its cgroup directory).
    pub fn pod_cgroup_id(&self, uid: &PodUid) -> Result<u64, Error> {
        let path = locate::pod_cgroup(&self.paths.node_cgroup, uid)?;
        Ok(std::fs::metadata(&path).map_err(io_err(&path))?.ino())
    }

    /// The network namespace of running pod `uid`: that of its sandbox process. Never
    /// the node's own (the agent's, or init's): a process of the pod's cgroup that is
    /// not in the pod's namespace yet must not make the agent capture the node.
    pub fn running_pod_netns(&self, uid: &PodUid) -> Result<Netns, Error> {
        let cgroup = locate::pod_cgroup(&self.paths.node_cgroup, uid)?;
        let path = locate::running_pod_netns(&self.paths.proc_dir, &cgroup, uid)?;
        let netns = Netns::open(&path)?;
        let node_namespaces = [Path::new("/proc/self/ns/net").to_owned(), self.paths.proc_dir.join("1/ns/net")];
        if node_namespaces.iter().filter_map(|p| std::fs::metadata(p).ok()).any(|m| m.ino() == netns.inode()) {
            return Err(Error::Io {
                path,
                source: std::io::Error::other(format!(
                    "the oldest process of pod uid {uid} is in the node's network namespace, not a pod's"
                )),
            });
        }
        Ok(netns)
    }

    /// Starts capturing pod `uid`: steers connections to any of its addresses to
    /// `inbound_listener` (a listening socket in the pod's netns) and redirects its
    /// outbound connections to its outbound listener. Listeners must exist before this
    /// is called. Enrolling a pod again (new listeners) replaces its entries in place,
    /// so it is never uncaptured in between. With `dns`, its DNS queries go to its DNS
    /// proxy too.
    pub fn enroll(
        &self,
        uid: &PodUid,
        netns: &Netns,
        ips: &[std::net::IpAddr],
        inbound_listener: &impl AsRawFd,
        dns: bool,
    ) -> Result<PodEnrollment, Error> {
        let cgroup_id = self.pod_cgroup_id(uid)?;
        let uid_bytes = uid.to_bytes();
        let ino = netns.inode();
        let flags = if dns { POD_FLAG_ENROLLED | POD_FLAG_DNS } else { POD_FLAG_ENROLLED };
        let mut info = PodInfo { flags, uid: uid_bytes, ..Default::default() };
        for ip in ips {
            match ip {
                std::net::IpAddr::V4(v4) if info.ip4 == 0 => info.ip4 = mesh_common::ip4_word(*v4),
                std::net::IpAddr::V6(_) if info.flags & POD_FLAG_HAS_IP6 == 0 => {
                    info.ip6 = IpKey::from_ip(*ip);
                    info.flags |= POD_FLAG_HAS_IP6;
                }
                _ => {}
            }
        }
        let (slot, prior) = {
            let mut t = self.tables.lock().unwrap_or_else(|p| p.into_inner());
            let prior = t.netns_pods.get(&ino, 0).ok();
            let slot = match prior {
                // The same pod, enrolled by an earlier run or attempt: its slot stays.
                Some(p) if p.uid == uid_bytes => p.slot,
                _ => free_slot(&t.netns_pods)?,
            };
            // Reserves the slot (a slot is in use while an entry names it) and tells
            // the pod's sk_lookup instance where its listener is.
            let entry = NetnsPod { slot, flags: 0, uid: uid_bytes };
            t.netns_pods.insert(ino, entry, 0).map_err(map_err(maps::NETNS_PODS))?;
            (slot, prior)
        };
        let result = self.attach_pod(uid, netns, inbound_listener, slot, cgroup_id, info);
        if result.is_err() {
            let mut t = self.tables.lock().unwrap_or_else(|p| p.into_inner());
            match prior {
                // An earlier run's capture of this namespace stays as it was: fail closed.
                Some(p) => {
                    let _ = t.netns_pods.insert(ino, p, 0);
                }
                None => {
                    let _ = t.netns_pods.remove(&ino);
                    let _ = t.listeners.clear_index(&slot);
                }
            }
        }
        result.map(|sk_lookup_pin| PodEnrollment { uid: uid.clone(), cgroup_id, netns: ino, slot, sk_lookup_pin })
    }

    fn attach_pod(
        &self,
        uid: &PodUid,
        netns: &Netns,
        inbound_listener: &impl AsRawFd,
        slot: u32,
        cgroup_id: u64,
        info: PodInfo,
    ) -> Result<PathBuf, Error> {
        self.tables
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .listeners
            .set(slot, inbound_listener, 0)
            .map_err(map_err(maps::INBOUND_LISTENERS))?;
        // The sk_lookup link is attached to the pod's netns and pinned, so inbound
        // capture survives an agent restart.
        let pin = self.attach_sk_lookup(uid, netns)?;
        // Last: outbound capture starts only once everything that serves it exists.
        let mut t = self.tables.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = t.enrolled.insert(cgroup_id, info, 0) {
            drop(t);
            let _ = unpin(&pin);
            return Err(map_err(maps::ENROLLED_PODS)(e));
        }
        Ok(pin)
    }

    /// Loads an sk_lookup instance that knows `netns` (the program has no helper that
    /// names its namespace on the kernels the mesh supports) and attaches it there.
    /// Every instance shares the pinned maps, the log buffer included.
    fn attach_sk_lookup(&self, uid: &PodUid, netns: &Netns) -> Result<PathBuf, Error> {
        let ino = netns.inode();
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&self.paths.pin_dir)
            .map_pin_path(maps::AYA_LOGS, self.paths.pin_dir.join(maps::AYA_LOGS))
            .override_global("AYA_LOG_LEVEL", &self.kernel_log_level, false)
            .override_global(globals::NETNS_INO, &ino, true)
            .load(EBPF_OBJECT)?;
        let prog: &mut SkLookup = program(&mut ebpf, programs::SK_LOOKUP)?;
        let sk_err = |source| Error::Program { program: programs::SK_LOOKUP, source };
        prog.load().map_err(sk_err)?;
        let id = prog.attach(netns.file()).map_err(sk_err)?;
        let link = prog.take_link(id).map_err(sk_err)?;
        self.pin(FdLink::from(link), &format!("{}@{uid}", programs::SK_LOOKUP))
    }

    /// Takes every pod's inbound listener out of the kernel's table: the first step of a
    /// drain. New plaintext connections to enrolled pods are then dropped in the kernel
    /// (fail closed) instead of queueing on listeners that will not accept them again;
    /// connections already accepted finish. Returns how many were taken out. A new agent
    /// puts its own listeners back when it enrolls the pods.
    pub fn release_listeners(&self) -> usize {
        let mut t = self.tables.lock().unwrap_or_else(|p| p.into_inner());
        let slots: Vec<u32> = t.netns_pods.iter().filter_map(Result::ok).map(|(_, pod)| pod.slot).collect();
        slots.iter().filter(|slot| t.listeners.clear_index(slot).is_ok()).count()
    }

    /// Stops capturing a pod that is gone or no longer in the mesh.
    pub fn unenroll(&self, pod: PodEnrollment) -> Result<(), Error> {
        {
            let mut t = self.tables.lock().unwrap_or_else(|p| p.into_inner());
            let _ = t.enrolled.remove(&pod.cgroup_id);
            let verdicts: Vec<NetnsPortKey> =
                t.plaintext.keys().filter_map(Result::ok).filter(|k| k.netns == pod.netns).collect();
            for k in verdicts {
                let _ = t.plaintext.remove(&k);
            }
            let _ = t.netns_pods.remove(&pod.netns);
            let _ = t.listeners.clear_index(&pod.slot);
        }
        unpin(&pod.sk_lookup_pin)
    }

    /// Turns the capture of an enrolled pod's DNS queries on or off.
    pub fn set_dns_capture(&self, pod: &PodEnrollment, on: bool) -> Result<(), Error> {
        let mut t = self.tables.lock().unwrap_or_else(|p| p.into_inner());
        let mut info = t.enrolled.get(&pod.cgroup_id, 0).map_err(map_err(maps::ENROLLED_PODS))?;
        info.flags = if on { info.flags | POD_FLAG_DNS } else { info.flags & !POD_FLAG_DNS };
        t.enrolled.insert(pod.cgroup_id, info, 0).map_err(map_err(maps::ENROLLED_PODS))
    }

    /// Removes the sk_lookup link of an enrollment another one of the same pod has
    /// replaced (same namespace and cgroup, so the table entries are the new one's).
    pub fn retire_link(&self, old: PodEnrollment) -> Result<(), Error> {
        unpin(&old.sk_lookup_pin)
    }

    /// The kernel splice, where the verdict program is attached.
    pub fn kernel_splice(&self) -> Option<std::sync::Arc<splice::KernelSplice>> {
        self.splice.clone()
    }

    /// The direct path between pods of this node.
    pub fn direct(&self) -> std::sync::Arc<direct::DirectPath> {
        self.direct.clone()
    }

    /// Where transparent deliveries are recorded for the kernel's sk_lookup.
    pub fn deliveries(&self) -> std::sync::Arc<transparent::Deliveries> {
        self.deliveries.clone()
    }

    /// The original destination of a connection accepted on an outbound listener, looked
    /// up by its peer (the client) address.
    pub fn orig_dst(&self, client: SocketAddr) -> Option<SocketAddr> {
        let key = SockAddrKey::from_socket_addr(client);
        self.orig_dst.get(&key, 0).ok().map(|o| o.socket_addr())
    }
}

/// The first `N` slots of a per-CPU counter array, each summed over the CPUs (0 for a
/// slot that cannot be read).
fn summed_per_cpu<const N: usize>(counters: &PerCpuArray<MapData, u64>) -> [u64; N] {
    std::array::from_fn(|i| {
        let index = u32::try_from(i).unwrap_or(u32::MAX);
        counters.get(&index, 0).map(|per_cpu| per_cpu.iter().sum()).unwrap_or(0)
    })
}

/// A slot no pod's entry names. Entries left by an earlier run keep theirs until they
/// are removed, so a pod whose old capture still runs is never steered to another pod.
fn free_slot(netns_pods: &BpfHashMap<MapData, u64, NetnsPod>) -> Result<u32, Error> {
    let used: BTreeSet<u32> = netns_pods.iter().filter_map(Result::ok).map(|(_, p)| p.slot).collect();
    (0..capacity::PODS).find(|s| !used.contains(s)).ok_or(Error::NoSlot(used.len() as u32))
}

/// The pod whose sk_lookup link `path` is (`mesh_sk_lookup@<uid>@<generation>`); None
/// for the node-wide programs' links.
fn link_pod(path: &Path) -> Option<PodUid> {
    let name = path.file_name()?.to_str()?;
    let rest = name.strip_prefix(programs::SK_LOOKUP)?.strip_prefix('@')?;
    PodUid::parse(rest.split('@').next()?).ok()
}

/// Loads every program of the agent's object through the kernel verifier without
/// attaching any, in a scratch pin directory under `bpffs` removed afterwards: what
/// `meshctl check --pre` asks of a node. Returns the programs the kernel accepted.
pub fn probe_programs(bpffs: &Path) -> Result<Vec<&'static str>, Error> {
    let dir = bpffs.join(format!("mesh-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
    let result = load_every_program(&dir);
    // Loading pinned the maps by name in `dir`; nothing of the probe stays behind.
    for pinned in list_dir(&dir).unwrap_or_default() {
        let _ = std::fs::remove_file(pinned);
    }
    let _ = std::fs::remove_dir(&dir);
    result
}

fn load_every_program(pin_dir: &Path) -> Result<Vec<&'static str>, Error> {
    let mut ebpf = EbpfLoader::new().default_map_pin_directory(pin_dir).load(EBPF_OBJECT)?;
    let mut loaded = Vec::new();
    for name in programs::CGROUP_SOCK_ADDR {
        let prog: &mut CgroupSockAddr = program(&mut ebpf, name)?;
        prog.load().map_err(|source| Error::Program { program: name, source })?;
        loaded.push(name);
    }
    let prog: &mut SockOps = program(&mut ebpf, programs::SOCKOPS)?;
    prog.load().map_err(|source| Error::Program { program: programs::SOCKOPS, source })?;
    loaded.push(programs::SOCKOPS);
    let prog: &mut SkLookup = program(&mut ebpf, programs::SK_LOOKUP)?;
    prog.load().map_err(|source| Error::Program { program: programs::SK_LOOKUP, source })?;
    loaded.push(programs::SK_LOOKUP);
    let prog: &mut SockOps = program(&mut ebpf, programs::PROBE_SOCKOPS)?;
    prog.load().map_err(|source| Error::Program { program: programs::PROBE_SOCKOPS, source })?;
    loaded.push(programs::PROBE_SOCKOPS);
    Ok(loaded)
}

/// Takes map `name` out of the loaded object as the map type `T` it must be.
fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, Error>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or(Error::Map { map: name, reason: "missing from the object".into() })?;
    T::try_from(map).map_err(map_err(name))
}

/// Loads the splice verdict program and attaches it to `SPLICE_SOCKETS`. The program
/// stays attached for as long as the map lives, which is as long as this agent does.
fn attach_splice(ebpf: &mut Ebpf) -> Result<splice::KernelSplice, Error> {
    let sockets: SockHash<MapData, u64> = take_map(ebpf, maps::SPLICE_SOCKETS)?;
    let ends = take_map(ebpf, maps::SPLICE_ENDS)?;
    let limits = take_map(ebpf, maps::SPLICE_LIMITS)?;
    let name = programs::SPLICE;
    let prog: &mut SkSkb = program(ebpf, name)?;
    prog.load().map_err(|source| Error::Program { program: name, source })?;
    prog.attach(sockets.fd()).map_err(|source| Error::Program { program: name, source })?;
    Ok(splice::KernelSplice::new(sockets, ends, limits))
}

/// The kernel splice alone, for benchmarks and tests: the object loaded with its pinned
/// maps in `pin_dir` (a bpffs directory the caller owns and removes). The program stays
/// attached while the returned [`StandaloneSplice`] lives.
pub fn standalone_kernel_splice(
    pin_dir: &Path,
) -> Result<(std::sync::Arc<splice::KernelSplice>, StandaloneSplice), Error> {
    let mut ebpf = EbpfLoader::new().default_map_pin_directory(pin_dir).load(EBPF_OBJECT)?;
    let splice = attach_splice(&mut ebpf)?;
    Ok((std::sync::Arc::new(splice), StandaloneSplice(ebpf)))
}

/// The loaded object behind [`standalone_kernel_splice`].
pub struct StandaloneSplice(#[allow(dead_code, reason = "held for its attachment")] Ebpf);

/// A kernel splice of a test's own, in a fresh bpffs directory removed with the
/// returned guard. None (with the reason printed) where this is not root or has no
/// bpffs at `/sys/fs/bpf`.
#[cfg(test)]
pub(crate) fn test_kernel_splice() -> Option<(std::sync::Arc<splice::KernelSplice>, TestPins)> {
    let root = Path::new("/sys/fs/bpf");
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = root.join(format!("mesh-test-splice-{}-{n}", std::process::id()));
    if !is_bpffs(root) || std::fs::create_dir(&dir).is_err() {
        assert!(std::env::var_os("MESH_REQUIRE_LAB").is_none(), "no root or no bpffs: the kernel splice cannot load");
        eprintln!("skipping: the kernel splice needs root and bpffs at /sys/fs/bpf");
        return None;
    }
    let (splice, loaded) = standalone_kernel_splice(&dir).expect("the splice loads and attaches");
    Some((splice, TestPins(dir, loaded)))
}

/// Whether no socket and no entry is left in `splice`'s tables.
#[cfg(test)]
pub(crate) fn test_splice_is_empty(splice: &splice::KernelSplice) -> bool {
    splice.is_empty()
}

/// A test's loaded object and bpffs directory, removed on drop.
#[cfg(test)]
pub(crate) struct TestPins(PathBuf, #[allow(dead_code, reason = "held for its attachments")] StandaloneSplice);

#[cfg(test)]
impl Drop for TestPins {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, Error>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let prog = ebpf.program_mut(name).ok_or(Error::MissingProgram { program: name })?;
    prog.try_into().map_err(|source| Error::Program { program: name, source })
}

fn unpin(path: &Path) -> Result<(), Error> {
    match PinnedLink::from_pin(path) {
        Ok(link) => {
            // Dropping the unpinned link closes its last fd, which detaches it.
            link.unpin().map_err(|e| Error::Link { path: path.to_owned(), reason: e.to_string() })?;
            Ok(())
        }
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "stale pinned link could not be opened; removing the pin");
            let _ = std::fs::remove_file(path);
            Ok(())
        }
    }
}

fn list_dir(dir: &Path) -> Result<Vec<PathBuf>, Error> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).map_err(io_err(dir))? {
        out.push(e.map_err(io_err(dir))?.path());
    }
    Ok(out)
}

/// Forwards aya-log records from the kernel programs to the agent's log (target
/// `mesh_ebpf`, debug level for per-connection events).
fn start_kernel_log(ebpf: &mut Ebpf) {
    match aya_log::EbpfLogger::init(ebpf) {
        Ok(logger) => match tokio::io::unix::AsyncFd::with_interest(logger, tokio::io::Interest::READABLE) {
            Ok(mut fd) => {
                tokio::spawn(async move {
                    loop {
                        let Ok(mut guard) = fd.readable_mut().await else { break };
                        guard.get_inner_mut().flush();
                        guard.clear_ready();
                    }
                });
            }
            Err(e) => tracing::warn!(error = %e, "kernel log forwarding unavailable"),
        },
        // No log statements compiled in at this level: nothing to forward.
        Err(e) => tracing::debug!(error = %e, "kernel log forwarding not started"),
    }
}

//! Finding a pod's cgroup and network namespace on this node, by its UID only.
//!
//! Nothing a pod chooses takes part: not its name, labels or addresses. The cgroup is
//! where kubelet puts pod `uid` (`kubepods/<qos>/pod<uid>` with the cgroupfs driver,
//! `kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid_with_underscores>.slice`
//! with systemd); the UID is the API server's, checked to be a UUID before it is used in
//! a path. The network namespace comes from the CNI plugin when the pod starts (the
//! `cni` module, which builds on this one), or, for a pod that was already running, from
//! the oldest process in its cgroup tree: the sandbox (pause) process, which the runtime
//! starts in the pod's namespace before any container of the tenant runs. The agent
//! runs with the host's PID namespace, so `/proc/<pid>/ns/net` is that process's
//! namespace.

use std::fmt;
use std::path::{Path, PathBuf};

use super::Error;

/// A pod's `metadata.uid`, validated as the API server writes it (a UUID): never a path
/// component that could name anything but kubelet's directory for that pod.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PodUid(String);

impl PodUid {
    /// Parses `8-4-4-4-12` hexadecimal digits.
    pub fn parse(s: &str) -> Result<Self, Error> {
        let groups: Vec<&str> = s.split('-').collect();
        let lengths_ok = groups.iter().map(|g| g.len()).eq([8, 4, 4, 4, 12]);
        if !lengths_ok || !s.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
            return Err(Error::Io {
                path: PathBuf::from(s),
                source: std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!("pod UID {s:?} is not a UUID; pods are found by the UID the API server gave them"),
                ),
            });
        }
        Ok(Self(s.to_ascii_lowercase()))
    }

    /// The UID as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The 16 bytes of the UUID, as the kernel tables record it.
    pub fn to_bytes(&self) -> mesh_common::PodUidBytes {
        let hex: Vec<u8> = self.0.bytes().filter(|b| *b != b'-').collect();
        let mut out = [0u8; 16];
        for (i, pair) in hex.chunks(2).enumerate() {
            let digit = |b: u8| (b as char).to_digit(16).unwrap_or(0) as u8;
            out[i] = digit(pair[0]) << 4 | digit(pair[1]);
        }
        out
    }

    /// The UID whose bytes these are.
    pub fn from_bytes(b: &mesh_common::PodUidBytes) -> Self {
        let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
        Self(format!("{}-{}-{}-{}-{}", &hex[0..8], &hex[8..12], &hex[12..16], &hex[16..20], &hex[20..32]))
    }

    /// Whether `dir_name` is kubelet's cgroup directory for this pod, in either
    /// driver's spelling. Exact names only: a name that merely contains the UID is not it.
    fn names_pod(&self, dir_name: &str) -> bool {
        if dir_name == format!("pod{}", self.0) {
            return true;
        }
        let systemd = format!("pod{}.slice", self.0.replace('-', "_"));
        dir_name.strip_suffix(&systemd).is_some_and(|prefix| {
            matches!(prefix, "kubepods-" | "kubepods-burstable-" | "kubepods-besteffort-" | "kubepods-guaranteed-")
        })
    }
}

impl fmt::Display for PodUid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// How deep under the node cgroup a pod's cgroup may sit.
const MAX_DEPTH: usize = 4;

fn not_found(what: &str, uid: &PodUid, looked: &Path) -> Error {
    Error::Io {
        path: looked.to_owned(),
        source: std::io::Error::new(std::io::ErrorKind::NotFound, format!("no {what} for pod uid {uid}")),
    }
}

/// Directories kubelet nests pods in: `kubepods` and its QoS classes, in either
/// driver's spelling.
fn is_pod_parent(dir_name: &str) -> bool {
    matches!(
        dir_name,
        "kubepods"
            | "burstable"
            | "besteffort"
            | "kubepods.slice"
            | "kubepods-burstable.slice"
            | "kubepods-besteffort.slice"
    )
}

/// The pod's cgroup directory: kubelet's directory for `uid` under `node_cgroup`.
/// Only kubelet's own directories are searched below the top level, so nothing a pod
/// names (a pod called `kubepods.slice`, say) can be taken for another pod's cgroup.
pub fn pod_cgroup(node_cgroup: &Path, uid: &PodUid) -> Result<PathBuf, Error> {
    let mut level = vec![node_cgroup.to_path_buf()];
    for depth in 0..MAX_DEPTH {
        let mut next = Vec::new();
        for dir in &level {
            let Ok(entries) = std::fs::read_dir(dir) else { continue };
            for e in entries.filter_map(Result::ok) {
                let path = e.path();
                if !path.is_dir() {
                    continue;
                }
                let name = e.file_name().to_string_lossy().into_owned();
                if is_pod_parent(&name) {
                    next.push(path);
                } else if depth > 0 && uid.names_pod(&name) {
                    return Ok(path);
                } else if depth == 0 {
                    // A node cgroup of the root (a systemd slice holding kubepods).
                    next.push(path);
                }
            }
        }
        level = next;
    }
    Err(not_found("cgroup", uid, node_cgroup))
}

/// The oldest process in `cgroup` or in a cgroup below it: `(start time, pid)`.
fn oldest_process_in(proc_dir: &Path, cgroup: &Path, depth: usize) -> Option<(u64, u32)> {
    let procs = std::fs::read_to_string(cgroup.join("cgroup.procs")).unwrap_or_default();
    let here = procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()).filter_map(|pid| {
        let started = start_time(proc_dir, pid)?;
        Some((started, pid))
    });
    let below = (depth > 0)
        .then(|| std::fs::read_dir(cgroup).ok())
        .flatten()
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter(|e| e.path().is_dir())
        .filter_map(|e| oldest_process_in(proc_dir, &e.path(), depth - 1));
    here.chain(below).min()
}

/// Field 22 of `/proc/<pid>/stat`: when the process started, in clock ticks since boot.
fn start_time(proc_dir: &Path, pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(proc_dir.join(pid.to_string()).join("stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces or ')'.
    let after_name = &stat[stat.rfind(')')? + 1..];
    after_name.split_whitespace().nth(19)?.parse().ok()
}

/// The network namespace of a running pod: that of the oldest process in its cgroup
/// tree (the sandbox), so a tenant process that makes a namespace of its own cannot be
/// taken for the pod.
pub fn running_pod_netns(proc_dir: &Path, cgroup: &Path, uid: &PodUid) -> Result<PathBuf, Error> {
    let (_, pid) = oldest_process_in(proc_dir, cgroup, 2)
        .ok_or_else(|| not_found("process (so no network namespace)", uid, cgroup))?;
    Ok(proc_dir.join(pid.to_string()).join("ns/net"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mkdir(p: &Path) {
        std::fs::create_dir_all(p).unwrap();
    }

    fn uid(s: &str) -> PodUid {
        PodUid::parse(s).unwrap()
    }

    #[test]
    fn pod_uids_are_uuids_and_round_trip_through_bytes() {
        let u = uid("5C1B7A8E-0d2f-4a61-9f31-6b2e1e0c9a77");
        assert_eq!(u.as_str(), "5c1b7a8e-0d2f-4a61-9f31-6b2e1e0c9a77");
        assert_eq!(PodUid::from_bytes(&u.to_bytes()), u);
        for bad in
            ["", "kubepods", "../../x", "5c1b7a8e-0d2f-4a61-9f31-6b2e1e0c9a7", "5c1b7a8e/0d2f-4a61-9f31-6b2e1e0c9a77"]
        {
            assert!(PodUid::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn kubelet_layouts_are_found_by_uid() {
        let t = tempfile::tempdir().unwrap();
        let cg = t.path().join("cgroup");
        // systemd driver, Burstable pod with one container.
        let sd = uid("5c1b7a8e-0d2f-4a61-9f31-6b2e1e0c9a77");
        let pod_dir = cg
            .join("kubepods.slice/kubepods-burstable.slice")
            .join(format!("kubepods-burstable-pod{}.slice", sd.as_str().replace('-', "_")));
        mkdir(&pod_dir.join("cri-containerd-abc.scope"));
        assert_eq!(pod_cgroup(&cg, &sd).unwrap(), pod_dir);
        // cgroupfs driver, Guaranteed pod.
        let fs = uid("11111111-2222-3333-4444-555555555555");
        mkdir(&cg.join(format!("kubepods/pod{fs}")));
        assert_eq!(pod_cgroup(&cg, &fs).unwrap(), cg.join(format!("kubepods/pod{fs}")));
        // Under a node cgroup of the root (the lab, or a slice holding kubepods).
        let lab = uid("0a0b0c0d-0000-4000-8000-00000000000a");
        mkdir(&cg.join(format!("node1/kubepods/besteffort/pod{lab}")));
        assert_eq!(pod_cgroup(&cg, &lab).unwrap(), cg.join(format!("node1/kubepods/besteffort/pod{lab}")));

        let missing = uid("00000000-0000-0000-0000-000000000000");
        let e = pod_cgroup(&cg, &missing).unwrap_err().to_string();
        assert!(e.contains("no cgroup for pod uid 00000000-0000-0000-0000-000000000000"), "{e}");
    }

    #[test]
    fn directories_a_tenant_could_name_are_never_a_pods_cgroup() {
        let t = tempfile::tempdir().unwrap();
        let cg = t.path().join("cgroup");
        let victim = uid("5c1b7a8e-0d2f-4a61-9f31-6b2e1e0c9a77");
        // A directory whose name carries the UID but is not kubelet's name for it, and
        // the node-wide cgroups a pod named `kubepods.slice` or `system.slice` pointed
        // the old name lookup at.
        mkdir(&cg.join(format!("system.slice/evil-pod{}.slice", victim.as_str().replace('-', "_"))));
        mkdir(&cg.join(format!("kubepods/besteffort/xpod{victim}")));
        mkdir(&cg.join("kubepods.slice"));
        assert!(pod_cgroup(&cg, &victim).is_err(), "only kubelet's exact names are a pod's cgroup");
    }

    #[test]
    fn a_running_pods_namespace_is_its_oldest_process() {
        let t = tempfile::tempdir().unwrap();
        let (cg, proc_dir) = (t.path().join("pod"), t.path().join("proc"));
        mkdir(&cg.join("sandbox"));
        mkdir(&cg.join("app"));
        std::fs::write(cg.join("cgroup.procs"), "").unwrap();
        std::fs::write(cg.join("sandbox/cgroup.procs"), "100\n").unwrap();
        std::fs::write(cg.join("app/cgroup.procs"), "90\n200\n").unwrap();
        let stat = |pid: u32, started: u64| {
            mkdir(&proc_dir.join(pid.to_string()));
            let fields: Vec<String> = (3..=21).map(|i| i.to_string()).collect();
            let line = format!("{pid} (a) name) {} {started} 0\n", fields.join(" "));
            std::fs::write(proc_dir.join(pid.to_string()).join("stat"), line).unwrap();
        };
        // pid 90 is a lower number but started later (pids wrap): age decides.
        stat(100, 5_000);
        stat(90, 9_000);
        stat(200, 7_000);
        let u = uid("5c1b7a8e-0d2f-4a61-9f31-6b2e1e0c9a77");
        assert_eq!(running_pod_netns(&proc_dir, &cg, &u).unwrap(), proc_dir.join("100/ns/net"));
        let empty = t.path().join("empty");
        mkdir(&empty);
        assert!(running_pod_netns(&proc_dir, &empty, &u).is_err());
    }
}

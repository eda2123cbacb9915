//! Finding a pod's cgroup and network namespace on this node.
//!
//! Named first (the lab, or any runtime that names them after pods): `<pod cgroup
//! dir>/<pod name>` and `<netns dir>/<pod name>`. Otherwise as kubelet lays them out:
//! the pod's cgroup is the directory under the node's cgroup tree whose name carries
//! the pod UID (`kubepods/<qos>/pod<uid>` with the cgroupfs driver,
//! `kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid_with_underscores>.slice`
//! with systemd), and its network namespace is that of any process in it or in its
//! containers' cgroups below (`/proc/<pid>/ns/net`; the agent runs with the host's PID
//! namespace).

use std::path::{Path, PathBuf};

use super::Error;

/// What identifies a pod on this node.
#[derive(Debug, Clone, Copy)]
pub struct PodRef<'a> {
    /// Pod name.
    pub name: &'a str,
    /// `metadata.uid`, known in cluster mode.
    pub uid: Option<&'a str>,
}

/// How deep under the node cgroup a pod's cgroup may sit.
const MAX_DEPTH: usize = 4;

fn not_found(what: &str, pod: &PodRef<'_>, looked: &Path) -> Error {
    Error::Io {
        path: looked.to_owned(),
        source: std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("no {what} for pod {} (uid {})", pod.name, pod.uid.unwrap_or("unknown")),
        ),
    }
}

/// Whether a cgroup directory name is kubelet's for pod `uid`.
fn names_pod(dir_name: &str, uid: &str) -> bool {
    dir_name == format!("pod{uid}") || dir_name.contains(&format!("pod{}", uid.replace('-', "_")))
}

/// Directories kubelet nests pods in: `kubepods*` and the cgroupfs QoS classes.
fn is_pod_parent(dir_name: &str) -> bool {
    dir_name.starts_with("kubepods") || matches!(dir_name, "burstable" | "besteffort")
}

/// The pod's cgroup directory.
pub fn pod_cgroup(named_dir: &Path, node_cgroup: &Path, pod: &PodRef<'_>) -> Result<PathBuf, Error> {
    let named = named_dir.join(pod.name);
    if named.is_dir() {
        return Ok(named);
    }
    let Some(uid) = pod.uid else { return Err(not_found("cgroup", pod, &named)) };
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
                if names_pod(&name, uid) {
                    return Ok(path);
                }
                // At the top, anything may hold kubepods (a node cgroup of the root);
                // below it, only kubelet's own directories.
                if depth == 0 || is_pod_parent(&name) {
                    next.push(path);
                }
            }
        }
        level = next;
    }
    Err(not_found("cgroup", pod, node_cgroup))
}

/// A process in `cgroup` or in a cgroup below it.
fn a_process_in(cgroup: &Path, depth: usize) -> Option<u32> {
    let procs = std::fs::read_to_string(cgroup.join("cgroup.procs")).unwrap_or_default();
    if let Some(pid) = procs.lines().find_map(|l| l.trim().parse().ok()) {
        return Some(pid);
    }
    if depth == 0 {
        return None;
    }
    std::fs::read_dir(cgroup)
        .ok()?
        .filter_map(Result::ok)
        .filter(|e| e.path().is_dir())
        .find_map(|e| a_process_in(&e.path(), depth - 1))
}

/// The path of the pod's network namespace.
pub fn pod_netns(netns_dir: &Path, proc_dir: &Path, cgroup: Option<&Path>, pod: &PodRef<'_>) -> Result<PathBuf, Error> {
    let named = netns_dir.join(pod.name);
    if named.exists() {
        return Ok(named);
    }
    let Some(cgroup) = cgroup else { return Err(not_found("network namespace", pod, &named)) };
    let pid = a_process_in(cgroup, 2).ok_or_else(|| not_found("process (so no network namespace)", pod, cgroup))?;
    Ok(proc_dir.join(pid.to_string()).join("ns/net"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mkdir(p: &Path) {
        std::fs::create_dir_all(p).unwrap();
    }

    #[test]
    fn named_layouts_win_and_kubelet_layouts_are_found_by_uid() {
        let t = tempfile::tempdir().unwrap();
        let cg = t.path().join("cgroup");
        // systemd driver, Burstable pod with one container holding pid 4242.
        let uid = "5c1b7a8e-0d2f-4a61-9f31-6b2e1e0c9a77";
        let pod_dir = cg
            .join("kubepods.slice/kubepods-burstable.slice")
            .join(format!("kubepods-burstable-pod{}.slice", uid.replace('-', "_")));
        mkdir(&pod_dir.join("cri-containerd-abc.scope"));
        std::fs::write(pod_dir.join("cgroup.procs"), "").unwrap();
        std::fs::write(pod_dir.join("cri-containerd-abc.scope/cgroup.procs"), "4242\n").unwrap();
        // cgroupfs driver, Guaranteed pod.
        let other = "11111111-2222-3333-4444-555555555555";
        mkdir(&cg.join(format!("kubepods/pod{other}")));
        // Unrelated services are not searched below the top.
        mkdir(&cg.join("system.slice/containerd.service"));

        let pod = PodRef { name: "myapp-v1", uid: Some(uid) };
        let found = pod_cgroup(&cg, &cg, &pod).unwrap();
        assert_eq!(found, pod_dir);
        let netns = pod_netns(&t.path().join("netns"), Path::new("/proc"), Some(&found), &pod).unwrap();
        assert_eq!(netns, PathBuf::from("/proc/4242/ns/net"));
        let g = PodRef { name: "db", uid: Some(other) };
        assert_eq!(pod_cgroup(&cg, &cg, &g).unwrap(), cg.join(format!("kubepods/pod{other}")));

        // Named (the lab) first.
        mkdir(&cg.join("frontend"));
        mkdir(&t.path().join("netns"));
        std::fs::write(t.path().join("netns/frontend"), "").unwrap();
        let lab = PodRef { name: "frontend", uid: None };
        assert_eq!(pod_cgroup(&cg, &cg, &lab).unwrap(), cg.join("frontend"));
        assert_eq!(
            pod_netns(&t.path().join("netns"), Path::new("/proc"), None, &lab).unwrap(),
            t.path().join("netns/frontend")
        );

        let missing = PodRef { name: "gone", uid: Some("00000000-0000-0000-0000-000000000000") };
        let e = pod_cgroup(&cg, &cg, &missing).unwrap_err().to_string();
        assert!(e.contains("no cgroup for pod gone"), "{e}");
    }
}

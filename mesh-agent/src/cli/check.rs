//! `meshctl check --pre`: can this node run the mesh agent? Each check says what it
//! found and, when it fails, what to do about it. The kernel check is not a version
//! comparison alone: it loads the agent's own programs through the verifier.

use std::path::{Path, PathBuf};

use crate::dataplane::{cgroup2_mount, is_bpffs};

/// Oldest kernel with everything the data plane uses: sk_lookup (5.9), bpf links on
/// cgroups (5.7), getpeername hooks (5.8), and the verifier features the programs
/// need, tested from 5.10 (an LTS).
pub const MIN_KERNEL: (u32, u32) = (5, 10);

/// Linux capabilities the agent needs, by number (`capability.h`).
const CAPABILITIES: &[(u32, &str, &str)] = &[
    (12, "CAP_NET_ADMIN", "listeners and sockets inside pod network namespaces"),
    (21, "CAP_SYS_ADMIN", "entering pod network namespaces (setns) and mounting bpffs"),
    (39, "CAP_BPF", "loading programs and maps"),
];

/// One check's outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// What was checked.
    pub what: &'static str,
    /// What was found.
    pub detail: String,
    /// How to fix it; None when it passed.
    pub fix: Option<String>,
}

impl Finding {
    /// A check that passed.
    pub fn pass(what: &'static str, detail: impl Into<String>) -> Self {
        Self { what, detail: detail.into(), fix: None }
    }

    /// A check that failed, with the fix.
    pub fn fail(what: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Self {
        Self { what, detail: detail.into(), fix: Some(fix.into()) }
    }

    /// Whether the check passed.
    pub fn ok(&self) -> bool {
        self.fix.is_none()
    }

    /// The heading it is listed under, as `linkerd check` groups its checks.
    pub fn group(&self) -> &'static str {
        match self.what {
            "Kubernetes API" | "nodes" => "kubernetes-api",
            "Kubernetes version" => "kubernetes-version",
            "install objects" => "mesh-existence",
            "CRDs" => "mesh-config",
            "mesh CA" => "mesh-identity",
            "agent DaemonSet" | "agents on nodes" => "mesh-data-plane",
            "versions" => "mesh-version",
            // The node's own checks (`check --pre` on a node).
            _ => "pre-node-setup",
        }
    }
}

/// Findings as `linkerd check` prints them: each group under its heading, a mark and
/// the finding per line, the fix below a failure, and a last line that sums up.
pub fn render(findings: &[Finding], style: super::Style) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let mut heading = None;
    for f in findings {
        if heading != Some(f.group()) {
            if heading.is_some() {
                out.push('\n');
            }
            let _ = writeln!(out, "{}\n{}", f.group(), "-".repeat(f.group().len()));
            heading = Some(f.group());
        }
        match &f.fix {
            None => {
                let _ = writeln!(out, "{} {}: {}", style.ok("\u{2714}"), f.what, f.detail);
            }
            Some(fix) => {
                let _ = writeln!(out, "{} {}: {}\n    fix: {fix}", style.bad("\u{2718}"), f.what, f.detail);
            }
        }
    }
    let mark = if findings.iter().all(Finding::ok) { style.ok("\u{2714}") } else { style.bad("\u{2718}") };
    let _ = writeln!(out, "\nStatus check results are {mark}");
    out
}

/// Where the checks look: the real host, or a test's stand-ins.
#[derive(Debug, Clone)]
pub struct Host {
    /// `/proc`.
    pub proc: PathBuf,
    /// `/sys`.
    pub sys: PathBuf,
    /// Where bpffs must be mounted.
    pub bpffs: PathBuf,
}

impl Default for Host {
    fn default() -> Self {
        Self { proc: "/proc".into(), sys: "/sys".into(), bpffs: "/sys/fs/bpf".into() }
    }
}

/// Runs every pre-flight check on `host`. `load_programs` also loads the agent's
/// programs (needs root and a mounted bpffs; skipped when an earlier check failed).
pub fn preflight(host: &Host, load_programs: bool) -> Vec<Finding> {
    let mut out = vec![kernel(host), btf(host), cgroup2(host), kubelet(host), bpffs(host), capabilities(host)];
    if load_programs {
        out.push(if out.iter().all(Finding::ok) {
            programs(&host.bpffs)
        } else {
            Finding::fail("eBPF programs", "not tried: an earlier check failed", "fix the checks above first")
        });
    }
    out
}

/// `(major, minor)` of a `uname -r` style release.
pub fn parse_release(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.trim().split(['.', '-']);
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

fn kernel(host: &Host) -> Finding {
    let what = "Linux kernel";
    let path = host.proc.join("sys/kernel/osrelease");
    match std::fs::read_to_string(&path).ok().as_deref().map(|r| (r.trim().to_string(), parse_release(r))) {
        Some((r, Some(v))) if v >= MIN_KERNEL => {
            Finding::pass(what, format!("{r} (>= {}.{})", MIN_KERNEL.0, MIN_KERNEL.1))
        }
        Some((r, Some(_))) => Finding::fail(
            what,
            format!("{r} is older than {}.{}", MIN_KERNEL.0, MIN_KERNEL.1),
            "run the mesh on nodes with Linux 5.10 or newer (sk_lookup, cgroup bpf links, getpeername hooks)",
        ),
        _ => Finding::fail(what, format!("cannot read {}", path.display()), "is /proc mounted?"),
    }
}

fn btf(host: &Host) -> Finding {
    let what = "kernel BTF";
    let path = host.sys.join("kernel/btf/vmlinux");
    if path.exists() {
        Finding::pass(what, format!("{} present", path.display()))
    } else {
        Finding::fail(what, format!("{} missing", path.display()), "use a kernel built with CONFIG_DEBUG_INFO_BTF=y")
    }
}

fn cgroup2(host: &Host) -> Finding {
    let what = "cgroup v2";
    let mounts = std::fs::read_to_string(host.proc.join("mounts")).unwrap_or_default();
    match cgroup2_mount(&mounts) {
        Some(dir) => Finding::pass(what, format!("mounted at {}", dir.display())),
        None => Finding::fail(
            what,
            "no cgroup2 mount in /proc/mounts",
            "boot with systemd.unified_cgroup_hierarchy=1, or mount cgroup2 (hybrid layouts work)",
        ),
    }
}

/// Where the kubelet's cgroup is: its probes pass STRICT by it. Not a failure when
/// missing (the kubelet may run elsewhere, given with `--kubelet-cgroup`), but said.
fn kubelet(host: &Host) -> Finding {
    let what = "kubelet cgroup";
    let mounts = std::fs::read_to_string(host.proc.join("mounts")).unwrap_or_default();
    let Some(root) = cgroup2_mount(&mounts) else {
        return Finding::pass(what, "not looked for: no cgroup2 mount");
    };
    let unit = root.join(crate::dataplane::KUBELET_UNIT_CGROUP);
    if unit.is_dir() {
        Finding::pass(what, format!("{}: the kubelet's probes reach STRICT pods", unit.display()))
    } else {
        Finding::pass(
            what,
            format!(
                "no {} here: unless the agent is given --kubelet-cgroup, kubelet probes to STRICT pods are dropped",
                unit.display()
            ),
        )
    }
}

fn bpffs(host: &Host) -> Finding {
    let what = "bpffs";
    if is_bpffs(&host.bpffs) {
        Finding::pass(what, format!("mounted at {}", host.bpffs.display()))
    } else {
        Finding::fail(
            what,
            format!("{} is not a bpffs mount", host.bpffs.display()),
            format!(
                "mount it on the host (mount -t bpf bpf {0}) and mount {0} into the agent: pinned maps and links \
                 must outlive the agent so pods stay captured (fail closed) across restarts",
                host.bpffs.display()
            ),
        )
    }
}

/// Effective capability set from a `/proc/<pid>/status` text.
pub fn effective_caps(status: &str) -> Option<u64> {
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?.trim();
    u64::from_str_radix(hex, 16).ok()
}

fn capabilities(host: &Host) -> Finding {
    let what = "capabilities";
    let status = std::fs::read_to_string(host.proc.join("self/status")).unwrap_or_default();
    let Some(eff) = effective_caps(&status) else {
        return Finding::fail(what, "cannot read CapEff from /proc/self/status", "is /proc mounted?");
    };
    let missing: Vec<String> = CAPABILITIES
        .iter()
        .filter(|(bit, ..)| eff & (1u64 << bit) == 0)
        .map(|(_, n, why)| format!("{n} ({why})"))
        .collect();
    if missing.is_empty() {
        Finding::pass(what, CAPABILITIES.iter().map(|(_, n, _)| *n).collect::<Vec<_>>().join(", "))
    } else {
        Finding::fail(
            what,
            format!("missing {}", missing.join("; ")),
            "run as root, or grant the DaemonSet these capabilities (meshctl manifest generate does)",
        )
    }
}

fn programs(bpffs: &Path) -> Finding {
    let what = "eBPF programs";
    match crate::dataplane::probe_programs(bpffs) {
        Ok(names) => Finding::pass(what, format!("verifier accepted {}", names.join(", "))),
        Err(e) => Finding::fail(
            what,
            format!("the kernel refused the agent's programs: {e}"),
            "the kernel lacks a program type or helper the mesh needs; see `meshctl check --pre -v` and the kernel log",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn findings_print_grouped_under_headings_as_linkerd_check_does() {
        let findings = [
            Finding::pass("Kubernetes API", "reachable, v1.32.4"),
            Finding::pass("install objects", "all present in istio-system"),
            Finding::fail("mesh CA", "no ca-key.pem", "add it"),
            Finding::pass("agents on nodes", "a ready agent on each of 2 node(s)"),
        ];
        let out = render(&findings, crate::cli::Style::plain());
        let want = "kubernetes-api\n--------------\n\u{2714} Kubernetes API: reachable, v1.32.4\n\n\
                    mesh-existence\n--------------\n\u{2714} install objects: all present in istio-system\n\n\
                    mesh-identity\n-------------\n\u{2718} mesh CA: no ca-key.pem\n    fix: add it\n\n\
                    mesh-data-plane\n---------------\n\u{2714} agents on nodes: a ready agent on each of 2 node(s)\n\n\
                    Status check results are \u{2718}\n";
        assert_eq!(out, want);
    }

    #[test]
    fn releases_and_capabilities_parse() {
        assert_eq!(parse_release("6.18.44-fc-v595\n"), Some((6, 18)));
        assert_eq!(parse_release("5.10.0-23-amd64"), Some((5, 10)));
        assert_eq!(parse_release("nonsense"), None);
        assert!((5, 4) < MIN_KERNEL && (6, 1) >= MIN_KERNEL);
        let status = "Name:\tx\nCapEff:\t000001ffffffffff\n";
        assert_eq!(effective_caps(status), Some(0x1ff_ffff_ffff));
        let mounts = "proc /proc proc rw 0 0\ncgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n";
        assert_eq!(cgroup2_mount(mounts), Some(PathBuf::from("/sys/fs/cgroup/unified")));
    }

    #[test]
    fn a_host_missing_requirements_fails_each_with_a_fix() {
        let dir = tempfile::tempdir().unwrap();
        let proc = dir.path().join("proc");
        std::fs::create_dir_all(proc.join("sys/kernel")).unwrap();
        std::fs::create_dir_all(proc.join("self")).unwrap();
        std::fs::write(proc.join("sys/kernel/osrelease"), "4.19.0\n").unwrap();
        std::fs::write(proc.join("mounts"), "proc /proc proc rw 0 0\n").unwrap();
        std::fs::write(proc.join("self/status"), "CapEff:\t0000000000000000\n").unwrap();
        let host = Host { proc, sys: dir.path().join("sys"), bpffs: dir.path().join("bpf") };
        let found = preflight(&host, true);
        assert_eq!(found.len(), 7);
        for f in found.iter().filter(|f| f.what != "kubelet cgroup") {
            assert!(!f.ok(), "{f:?}");
            assert!(f.fix.as_deref().is_some_and(|x| !x.is_empty()));
        }
        assert!(found[0].detail.contains("4.19.0 is older than 5.10"));
        assert!(found[5].detail.contains("CAP_BPF"));
    }

    #[test]
    fn the_kubelet_cgroup_is_reported_found_or_not() {
        let dir = tempfile::tempdir().unwrap();
        let (proc, cgroup) = (dir.path().join("proc"), dir.path().join("cgroup"));
        std::fs::create_dir_all(&proc).unwrap();
        std::fs::write(proc.join("mounts"), format!("cgroup2 {} cgroup2 rw 0 0\n", cgroup.display())).unwrap();
        let host = Host { proc, sys: dir.path().join("sys"), bpffs: dir.path().join("bpf") };
        let missing = kubelet(&host);
        assert!(missing.ok() && missing.detail.contains("--kubelet-cgroup"), "{missing:?}");
        std::fs::create_dir_all(cgroup.join("system.slice/kubelet.service")).unwrap();
        let found = kubelet(&host);
        assert!(found.detail.contains("kubelet.service: the kubelet's probes reach STRICT pods"), "{found:?}");
    }
}

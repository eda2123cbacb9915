//! What a process group costs: resident memory and CPU time, read from a cgroup v2
//! directory and /proc, so a benchmark can charge each proxy exactly what it used.

use std::fs;
use std::path::Path;

use anyhow::Context as _;

/// Pids in the cgroup (not its children).
pub fn cgroup_pids(cgroup: &Path) -> anyhow::Result<Vec<u32>> {
    let procs = cgroup.join("cgroup.procs");
    let text = fs::read_to_string(&procs).with_context(|| format!("reading {}", procs.display()))?;
    Ok(text.lines().filter_map(|l| l.trim().parse().ok()).collect())
}

/// Resident set size of a process in bytes (`VmRSS`), 0 if it is gone.
pub fn rss_bytes(pid: u32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| parse_vm_rss_kib(&s))
        .map_or(0, |kib| kib * 1024)
}

fn parse_vm_rss_kib(status: &str) -> Option<u64> {
    status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?.split_whitespace().next()?.parse().ok()
}

/// A process's resident memory, by kind, in KiB (`/proc/<pid>/status`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ResidentMemory {
    /// `VmRSS`: everything resident.
    pub vm_rss_kib: u64,
    /// `RssAnon`: heap, stacks and other anonymous pages.
    pub rss_anon_kib: u64,
    /// `RssFile`: file-backed pages (the binary's text and read-only data).
    pub rss_file_kib: u64,
}

impl ResidentMemory {
    /// Parsed from a `/proc/<pid>/status` text.
    pub fn parse(status: &str) -> Option<Self> {
        let field = |name: &str| -> Option<u64> {
            status.lines().find_map(|l| l.strip_prefix(name))?.split_whitespace().next()?.parse().ok()
        };
        Some(Self { vm_rss_kib: field("VmRSS:")?, rss_anon_kib: field("RssAnon:")?, rss_file_kib: field("RssFile:")? })
    }

    fn add(self, other: Self) -> Self {
        Self {
            vm_rss_kib: self.vm_rss_kib + other.vm_rss_kib,
            rss_anon_kib: self.rss_anon_kib + other.rss_anon_kib,
            rss_file_kib: self.rss_file_kib + other.rss_file_kib,
        }
    }
}

/// The resident memory of every process in the cgroup, summed.
pub fn cgroup_memory(cgroup: &Path) -> anyhow::Result<ResidentMemory> {
    Ok(cgroup_pids(cgroup)?
        .into_iter()
        .filter_map(|pid| ResidentMemory::parse(&fs::read_to_string(format!("/proc/{pid}/status")).ok()?))
        .fold(ResidentMemory::default(), ResidentMemory::add))
}

/// Summed RSS of every process in the cgroup, in bytes.
pub fn cgroup_rss_bytes(cgroup: &Path) -> anyhow::Result<u64> {
    Ok(cgroup_pids(cgroup)?.into_iter().map(rss_bytes).sum())
}

/// CPU time used by the cgroup and its descendants since it was made, in microseconds
/// (`usage_usec` of `cpu.stat`, kept by cgroup v2 with or without the cpu controller).
pub fn cgroup_cpu_usec(cgroup: &Path) -> anyhow::Result<u64> {
    let path = cgroup.join("cpu.stat");
    let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    parse_usage_usec(&text).with_context(|| format!("{} has no usage_usec", path.display()))
}

fn parse_usage_usec(cpu_stat: &str) -> Option<u64> {
    cpu_stat.lines().find_map(|l| l.strip_prefix("usage_usec "))?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_status_and_cpu_stat() {
        let status = "Name:\tmesh-agent\nVmPeak:\t  99999 kB\nVmRSS:\t   12345 kB\nThreads:\t3\n";
        assert_eq!(parse_vm_rss_kib(status), Some(12345));
        assert_eq!(parse_usage_usec("usage_usec 4711\nuser_usec 11\nsystem_usec 4700\n"), Some(4711));
        assert_eq!(parse_usage_usec("user_usec 11\n"), None);
        let status = "VmRSS:\t   12345 kB\nRssAnon:\t    2345 kB\nRssFile:\t   10000 kB\nRssShmem:\t       0 kB\n";
        let m = ResidentMemory::parse(status).unwrap();
        assert_eq!((m.vm_rss_kib, m.rss_anon_kib, m.rss_file_kib), (12345, 2345, 10000));
        assert_eq!(ResidentMemory::parse("VmRSS:\t1 kB\n"), None);
    }

    #[test]
    fn this_process_has_resident_memory() {
        assert!(rss_bytes(std::process::id()) > 0);
    }
}

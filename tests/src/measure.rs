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
    }

    #[test]
    fn this_process_has_resident_memory() {
        assert!(rss_bytes(std::process::id()) > 0);
    }
}

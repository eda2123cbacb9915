//! The agent's own health, read at scrape time: the process (resident memory, CPU,
//! open and allowed file descriptors, threads, start time, under the standard
//! `process_*` names), the tokio runtime (workers, alive tasks, global queue depth) and
//! the workload certificates it holds (how many, seconds until the first expires).

use std::sync::Arc;
use std::time::SystemTime;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric as _};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

use crate::identity::CertStore;

/// Reads the process, the runtime and the certificates on each scrape.
#[derive(Debug)]
pub struct Health {
    /// The workload certificates, where the process holds any.
    pub certs: Option<Arc<CertStore>>,
}

/// What `/proc/self` says of the process.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct ProcessStats {
    /// Resident memory, bytes.
    pub rss_bytes: f64,
    /// User and system CPU time, seconds.
    pub cpu_seconds: f64,
    /// Threads.
    pub threads: f64,
    /// Start time, seconds since the epoch.
    pub start_time: f64,
    /// Open file descriptors.
    pub open_fds: f64,
    /// The soft limit on file descriptors.
    pub max_fds: f64,
}

impl ProcessStats {
    /// Reads `/proc/self`; fields it cannot read stay 0.
    pub fn read() -> Self {
        let mut s = Self::default();
        use nix::unistd::{SysconfVar, sysconf};
        let conf = |v| sysconf(v).ok().flatten().unwrap_or(0);
        let (ticks, page) = (conf(SysconfVar::CLK_TCK), conf(SysconfVar::PAGE_SIZE));
        if let Ok(stat) = std::fs::read_to_string("/proc/self/stat") {
            // Fields after the command name (which may hold spaces), from field 3 on.
            let fields: Vec<&str> =
                stat.rsplit_once(')').map_or(Vec::new(), |(_, rest)| rest.split_whitespace().collect());
            let field = |n: usize| fields.get(n - 3).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
            let ticks = ticks.max(1) as f64;
            s.cpu_seconds = (field(14) + field(15)) / ticks;
            s.threads = field(20);
            s.rss_bytes = field(24) * page.max(1) as f64;
            let boot = std::fs::read_to_string("/proc/stat")
                .ok()
                .and_then(|t| t.lines().find_map(|l| l.strip_prefix("btime ")?.trim().parse::<f64>().ok()))
                .unwrap_or(0.0);
            s.start_time = boot + field(22) / ticks;
        }
        s.open_fds = std::fs::read_dir("/proc/self/fd").map_or(0.0, |d| d.count() as f64);
        if let Ok((soft, _)) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE) {
            s.max_fds = soft as f64;
        }
        s
    }
}

fn gauge(e: &mut DescriptorEncoder, name: &str, help: &str, value: f64) -> Result<(), std::fmt::Error> {
    let g = ConstGauge::new(value);
    g.encode(e.encode_descriptor(name, help, None, g.metric_type())?)
}

impl Collector for Health {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let p = ProcessStats::read();
        let cpu = ConstCounter::new(p.cpu_seconds);
        cpu.encode(e.encode_descriptor(
            "process_cpu_seconds",
            "User and system CPU time, seconds",
            None,
            cpu.metric_type(),
        )?)?;
        gauge(&mut e, "process_resident_memory_bytes", "Resident memory, bytes", p.rss_bytes)?;
        gauge(&mut e, "process_open_fds", "Open file descriptors", p.open_fds)?;
        gauge(&mut e, "process_max_fds", "The limit on open file descriptors", p.max_fds)?;
        gauge(&mut e, "process_threads", "Threads", p.threads)?;
        gauge(&mut e, "process_start_time_seconds", "Start time, seconds since the epoch", p.start_time)?;
        if let Some(in_use) = crate::heap::last_bytes_in_use() {
            // Beside the resident memory: what the allocator keeps that the program
            // freed is the difference (caches and fragmentation, not a leak). The
            // heap loop's figure: a walk per scrape would hold the arena each time.
            gauge(&mut e, "istio_mesh_heap_in_use_bytes", "Heap bytes allocated and not freed", in_use as f64)?;
        }
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let m = rt.metrics();
            gauge(&mut e, "istio_mesh_tokio_workers", "Tokio worker threads", m.num_workers() as f64)?;
            gauge(&mut e, "istio_mesh_tokio_alive_tasks", "Tokio tasks alive", m.num_alive_tasks() as f64)?;
            gauge(
                &mut e,
                "istio_mesh_tokio_global_queue_depth",
                "Tasks waiting in the runtime's global queue",
                m.global_queue_depth() as f64,
            )?;
        }
        if let Some(certs) = &self.certs {
            let (held, first) = certs.expiry();
            gauge(&mut e, "istio_mesh_workload_certs", "Workload certificates held for this node's pods", held as f64)?;
            if let Some(first) = first {
                let left = first.duration_since(SystemTime::now()).map_or(0.0, |d| d.as_secs_f64());
                gauge(
                    &mut e,
                    "istio_agent_cert_expiry_seconds",
                    "Seconds until the first workload certificate held expires",
                    left,
                )?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_process_reads_itself() {
        let p = ProcessStats::read();
        assert!(p.rss_bytes > 1_000_000.0, "{p:?}");
        assert!(p.open_fds >= 3.0 && p.max_fds >= p.open_fds, "{p:?}");
        assert!(p.threads >= 1.0, "{p:?}");
        let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs_f64();
        assert!(p.start_time > now - 86_400.0 && p.start_time <= now + 1.0, "{p:?} vs {now}");
    }

    #[tokio::test]
    async fn a_scrape_has_the_process_the_runtime_and_the_certificates() {
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register_collector(Box::new(Health { certs: None }));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        for name in [
            "process_cpu_seconds_total ",
            "process_resident_memory_bytes ",
            "process_open_fds ",
            "process_max_fds ",
            "process_start_time_seconds ",
            "istio_mesh_tokio_alive_tasks ",
        ] {
            assert!(text.lines().any(|l| l.starts_with(name)), "{name} in {text}");
        }
    }
}

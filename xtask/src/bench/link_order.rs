//! `cargo xtask link-order`: which of the agent's functions and read-only data it
//! touches, written to `mesh-agent/link-order.txt` for the release link to put first.
//!
//! A page of the binary becomes resident when it is touched, and the kernel maps the
//! 64 KiB around it too (fault-around) from the page cache. The agent's hot code lay
//! scattered through ~19 MB of text, so touching a few megabytes of it made 14 MB
//! resident. Packed together by the linker (`mesh-agent/build.rs`), the touched
//! functions make the resident text the size of what is run.
//!
//! What an agent left idle runs comes first (resync, idle loops, pooled connections),
//! then the rest of what serving touches (traffic, probes, scrapes), then what one-off
//! work touches (enrollment, config compiles, the config dump); start-up's code is not
//! listed. Laid out first, the idle set measured no smaller while the agents still
//! asked the CA every few seconds over fresh TLS (the handshake's code was part of it);
//! with the CA's answers held (long polls) it is small and is what an idle agent keeps
//! resident (docs/benchmarks.md). The agent
//! unmaps the pages one-off work touched once it has been quiet for a moment
//! (`mesh-agent/src/code_pages.rs`): what serving runs maps back, and that is what
//! stays resident, so that is what must lie packed.
//!
//! How the touched sets are measured: the release agent is copied (debug info
//! stripped, layout unchanged) onto a small ext4 image mounted from a loop device whose
//! read-ahead is off, and each of the lab's node agents runs from its own copy (the
//! gateway pods keep the first). Each reading takes the pages mapped in each process
//! (`/proc/PID/pagemap`), then pages them out (`process_madvise(MADV_PAGEOUT)`, which
//! also drops them from the page cache) and drops the rest of the copies' cached pages.
//! With nothing cached and no read-ahead, a fault reads just its own page and
//! fault-around finds no neighbour cached to map, so the next reading holds exactly the
//! pages touched since: the bench's traffic (L4 cross-node and same-node, spliced, L7,
//! HTTP/2, the ingress gateway), probes, scrapes and the idle loops count as serving;
//! each config change is read apart, after it is applied. The agents' own unmapping is
//! off meanwhile. Every symbol on a touched page is listed, in address order.
//!
//! Symbols are named as the linker sees them (mangled, with their hash): a dependency
//! update or a renamed item leaves a name the build no longer has, which lld skips.
//! Run this again after such changes; the list only reorders, it never changes code.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use mesh_tests::lab::Lab;
use mesh_tests::sys;

use super::{
    INGRESS_CONFIG, INGRESS_HOST, L7_CONFIG, Origin, SERVER_CROSS, SERVER_SAME, Tools, gateway_oha_args,
    in_lab_running, oha, route_all_to, route_ingress_to, set_enrollment, splice_at_destination,
};
use crate::{root, setup};

/// The page size the layout is measured in.
const PAGE: u64 = 4096;
/// How long each kind of traffic runs.
const TRAFFIC: Duration = Duration::from_secs(2);
/// Copies of the binary: the one the lab starts from (and its gateway pods keep), and
/// one for each of the lab's two node agents.
const AGENTS: usize = 3;
/// What the agents' idle loops (heap trim, metrics sampler) get to run before reading.
const IDLE: Duration = Duration::from_secs(3);
/// How long an idle reading leaves the agents alone: several of their resync (2 s) and
/// heap-loop periods, a metrics sampler's, and the upstream reaper's (5 s).
const IDLE_READING: Duration = Duration::from_secs(20);
/// What the agents get to apply a config change and finish what follows it.
const SETTLE: Duration = Duration::from_secs(2);

/// Measures the touched sets and writes `mesh-agent/link-order.txt`.
pub fn run() -> anyhow::Result<()> {
    setup::ensure_bench_tools()?;
    let tools = Tools::find()?;
    let work = root().join("target/link-order");
    let cold = std::cell::OnceCell::new();
    let listed = in_lab_running(
        true,
        |built| {
            let copy = ColdCopy::make(&work, &built)?;
            let first = copy.binaries[0].clone();
            let _ = cold.set(copy);
            Ok(first)
        },
        |lab| {
            let cold = cold.get().context("the cold copy was made")?;
            // This measures what the agents touch without their own unmapping.
            lab.agent_env.insert("MESH_UNMAP_ONE_OFF_PAGES".into(), "off".into());
            let processes = own_copies(lab, cold)?;
            std::thread::sleep(IDLE);
            let mut touched = Touched::after_start_up(&processes)?;
            set_enrollment(lab, true)?;
            touched.one_off_done()?;
            // Left alone with its pods, and again once its pooled connections are up.
            std::thread::sleep(IDLE_READING);
            touched.idle_done()?;
            traffic(lab, &tools, &mut touched)?;
            std::thread::sleep(IDLE_READING);
            touched.idle_done()?;
            let symbols = read_symbols(&processes[0].1)?;
            let serving_pages: BTreeSet<u64> = touched.serving.keys().copied().collect();
            let serving = most_used_first(touched_symbols(&symbols, &serving_pages), &touched.serving);
            let one_off = touched_symbols(&symbols, &touched.one_off);
            let idle = most_used_first(touched_symbols(&symbols, &touched.idle), &touched.serving);
            for (what, pages, listed) in [
                ("idle (laid out first)", &touched.idle, &idle),
                ("serving", &serving_pages, &serving),
                ("one-off work", &touched.one_off, &one_off),
            ] {
                let bytes: u64 = listed.iter().map(|s| s.size).sum();
                println!(
                    "[link-order] {what}: {} pages touched ({:.1} MiB), {} symbols on them ({:.1} MiB)",
                    pages.len(),
                    (pages.len() as u64 * PAGE) as f64 / 1048576.0,
                    listed.len(),
                    bytes as f64 / 1048576.0
                );
            }
            Ok(idle.into_iter().chain(serving).chain(one_off).collect::<Vec<_>>())
        },
    );
    drop(cold);
    let listed = listed?;
    let out = root().join("mesh-agent/link-order.txt");
    let mut text = String::new();
    let mut seen = std::collections::HashSet::new();
    for s in &listed {
        if seen.insert(s.name.as_str()) {
            text.push_str(&s.name);
            text.push('\n');
        }
    }
    std::fs::write(&out, text).with_context(|| format!("writing {}", out.display()))?;
    println!("[link-order] wrote {} ({} names); the next release build lays them out first", out.display(), seen.len());
    Ok(())
}

/// The pages the agents (and gateways) touched, by kind of work. Each reading pages
/// out what it read (and the page cache drops it), so the next one sees only what was
/// touched since.
struct Touched<'a> {
    processes: &'a [(u32, PathBuf)],
    /// Touched while serving traffic, probes and scrapes, and by the idle loops: how
    /// many readings of a process held each page.
    serving: BTreeMap<u64, u32>,
    /// Touched by one-off work: enrollment, config compiles, the config dump.
    one_off: BTreeSet<u64>,
    /// Touched while nothing was served (resync, idle loops, pooled connections): also
    /// counted in `serving`, and listed first.
    idle: BTreeSet<u64>,
}

impl<'a> Touched<'a> {
    /// Starts counting: what starting up touched is not counted (the agent unmaps it
    /// once ready, `mesh-agent/src/code_pages.rs`).
    fn after_start_up(processes: &'a [(u32, PathBuf)]) -> anyhow::Result<Self> {
        let touched = Self { processes, serving: BTreeMap::new(), one_off: BTreeSet::new(), idle: BTreeSet::new() };
        touched.forget()?;
        Ok(touched)
    }

    /// What was touched since the last reading was serving.
    fn serving_done(&mut self) -> anyhow::Result<()> {
        let pages = self.read()?;
        self.count_serving(&pages);
        self.forget()
    }

    /// What was touched since the last reading ran while nothing was served: serving
    /// too (an agent left idle runs it), and shown apart.
    fn idle_done(&mut self) -> anyhow::Result<()> {
        let pages = self.read()?;
        self.count_serving(&pages);
        self.idle.extend(pages.into_iter().flatten());
        self.forget()
    }

    fn count_serving(&mut self, pages: &[BTreeSet<u64>]) {
        for page in pages.iter().flatten() {
            *self.serving.entry(*page).or_default() += 1;
        }
    }

    /// What was touched since the last reading was one-off work (given [`SETTLE`] to
    /// finish: the agents apply a config change when they see it).
    fn one_off_done(&mut self) -> anyhow::Result<()> {
        std::thread::sleep(SETTLE);
        self.one_off.extend(self.read()?.into_iter().flatten());
        self.forget()
    }

    /// Each process's mapped pages.
    fn read(&self) -> anyhow::Result<Vec<BTreeSet<u64>>> {
        self.processes.iter().map(|(pid, binary)| touched_pages(*pid, binary)).collect()
    }

    /// Unmaps every process's pages and drops them from the page cache.
    fn forget(&self) -> anyhow::Result<()> {
        for (pid, binary) in self.processes {
            page_out(*pid, binary)?;
        }
        for (_, binary) in self.processes {
            evict_unmapped(binary)?;
        }
        Ok(())
    }
}

/// Gives every node's agent a copy of its own: a page two processes map is not paged
/// out of either ([`page_out`]). The lab started them from the first copy, which the
/// gateway pods (the same binary) keep. Returns each agent's and gateway's pid and
/// binary.
fn own_copies(lab: &mut Lab, cold: &ColdCopy) -> anyhow::Result<Vec<(u32, PathBuf)>> {
    let (shared, own) = cold.binaries.split_first().context("the cold copies")?;
    let started_from = lab.agent_bin.clone();
    let nodes: Vec<String> = lab.nodes.iter().map(|n| n.name.clone()).collect();
    if own.len() < nodes.len() {
        anyhow::bail!("{} nodes, {} copies of the agent for them", nodes.len(), own.len());
    }
    for (node, binary) in nodes.iter().zip(own) {
        lab.agent_bin = binary.clone();
        let restarted = lab.stop_agent(node, "TERM").and_then(|()| lab.start_agent(node));
        lab.agent_bin = started_from.clone();
        restarted.with_context(|| format!("restarting {node}'s agent from {}", binary.display()))?;
    }
    let mut processes = Vec::new();
    for (node, binary) in lab.nodes.iter().zip(own) {
        let pid = node.agent_pid.with_context(|| format!("{} has no agent", node.name))?;
        processes.push((pid, binary.clone()));
    }
    for pod in lab.pods.iter().filter(|p| p.runs_gateway()) {
        let pid = pod.app_pid.with_context(|| format!("gateway pod {} is not running", pod.name))?;
        processes.push((pid, shared.clone()));
    }
    Ok(processes)
}

/// The traffic the bench sends, briefly, and the config changes around it: what a
/// serving agent runs, told apart from the one-off work.
fn traffic(lab: &mut Lab, tools: &Tools, touched: &mut Touched) -> anyhow::Result<()> {
    let secs = format!("{}s", TRAFFIC.as_secs());
    let load = |url: &str, origin: Origin, extra: &[&str]| -> anyhow::Result<()> {
        let mut args = vec!["-z", &secs, "-c", "16"];
        args.extend_from_slice(extra);
        oha(lab, tools, origin, url, &args).map(|_| ())
    };
    for server in [SERVER_CROSS, SERVER_SAME] {
        let url = format!("http://{}:8080/bytes/1024", lab.pod(server)?.ip);
        load(&url, Origin::ClientPod, &[])?;
        touched.serving_done()?;
        // HTTP/2 is the served path at the destination; where it fails, the list
        // still holds everything else.
        if let Err(e) = load(&url, Origin::ClientPod, &["--http2"]) {
            println!("[link-order] HTTP/2 to {server} left out: {e:#}");
        }
        touched.serving_done()?;
        let telemetry = splice_at_destination(lab, server)?;
        touched.one_off_done()?;
        load(&url, Origin::ClientPod, &[])?;
        touched.serving_done()?;
        lab.delete(&telemetry)?;
        let vip = route_all_to(lab, server)?;
        touched.one_off_done()?;
        load(&format!("http://{vip}/bytes/1024"), Origin::ClientPod, &[])?;
        touched.serving_done()?;
        lab.delete(Path::new(L7_CONFIG))?;
        touched.one_off_done()?;
    }
    route_ingress_to(lab, SERVER_CROSS)?;
    let gateway = gateway_oha_args(lab)?;
    let gateway: Vec<&str> = gateway.iter().map(String::as_str).collect();
    touched.one_off_done()?;
    load(&format!("https://{INGRESS_HOST}/bytes/1024"), Origin::Outside, &gateway)?;
    touched.serving_done()?;
    lab.delete(Path::new(INGRESS_CONFIG))?;
    touched.one_off_done()?;
    // What Prometheus and the kubelet read now and then, and what an operator asks.
    for (paths, serving) in [(&["metrics", "healthz/ready"][..], true), (&["config_dump"][..], false)] {
        for node in &lab.nodes {
            for path in paths {
                let url = format!("http://127.0.0.1:15000/{path}");
                sys::run(&["ip", "netns", "exec", &node.netns, "curl", "-s", "-o", "/dev/null", "-m", "5", &url])?;
            }
        }
        if serving { touched.serving_done()? } else { touched.one_off_done()? }
    }
    Ok(())
}

/// The agent binary on a loop-mounted ext4 image with read-ahead off, and an empty
/// page cache: removed (unmounted, detached) when dropped.
struct ColdCopy {
    /// The lab's, then one per node agent (see [`own_copies`]).
    binaries: Vec<PathBuf>,
    mount: PathBuf,
    image: PathBuf,
    loop_dev: String,
}

impl ColdCopy {
    fn make(work: &Path, built: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(work)?;
        let image = work.join("cold.img");
        let mount = work.join("mnt");
        std::fs::create_dir_all(&mount)?;
        // Stripped of debug info, the copy has the same loaded segments in ~30 MB.
        let size = std::fs::metadata(built)?.len() / 2 * AGENTS as u64 + (64 << 20);
        std::fs::File::create(&image)?.set_len(size)?;
        sys::run(&["mkfs.ext4", "-q", "-F", &path(&image)?])?;
        let loop_dev = sys::run(&["losetup", "--find", "--show", &path(&image)?])?.trim().to_string();
        let binaries = (0..AGENTS)
            .map(|i| mount.join(if i == 0 { "mesh-agent".into() } else { format!("mesh-agent-{i}") }))
            .collect();
        let copy = Self { binaries, mount, image, loop_dev };
        let dev_name =
            Path::new(&copy.loop_dev).file_name().context("loop device name")?.to_string_lossy().into_owned();
        std::fs::write(format!("/sys/block/{dev_name}/queue/read_ahead_kb"), "0")
            .context("turning the loop device's read-ahead off")?;
        copy.mount_it()?;
        for binary in &copy.binaries {
            sys::run(&["objcopy", "--strip-debug", &path(built)?, &path(binary)?])?;
        }
        // The lab finds the CA and the CNI plugin beside the agent.
        for sibling in ["mesh-ca", "mesh-cni"] {
            std::os::unix::fs::symlink(built.with_file_name(sibling), copy.mount.join(sibling))?;
        }
        // Unmounted and mounted again, nothing of the copy is left in the page cache.
        sys::run(&["umount", &path(&copy.mount)?])?;
        copy.mount_it()?;
        Ok(copy)
    }

    fn mount_it(&self) -> anyhow::Result<()> {
        sys::run(&["mount", &self.loop_dev, &path(&self.mount)?]).map(|_| ())
    }
}

impl Drop for ColdCopy {
    fn drop(&mut self) {
        if let Ok(mount) = path(&self.mount) {
            sys::run_quiet(&["umount", &mount]);
        }
        sys::run_quiet(&["losetup", "-d", &self.loop_dev]);
        let _ = std::fs::remove_file(&self.image);
    }
}

/// Drops `binary`'s pages that no process maps from the page cache (`dd`'s `nocache`
/// is `posix_fadvise(POSIX_FADV_DONTNEED)` over the whole file).
fn evict_unmapped(binary: &Path) -> anyhow::Result<()> {
    let input = format!("if={}", path(binary)?);
    sys::run(&["dd", &input, "iflag=nocache", "count=0", "status=none"]).map(|_| ())
}

/// Unmaps process `pid`'s pages of `binary` and reclaims them from the page cache
/// (`process_madvise(MADV_PAGEOUT)`), as memory pressure would. The kernel leaves a
/// page that another process maps too.
#[expect(unsafe_code, reason = "pidfd_open and process_madvise have no safe wrapper")]
fn page_out(pid: u32, binary: &Path) -> anyhow::Result<()> {
    use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
    let ranges: Vec<libc::iovec> = mappings(pid, binary)?
        .into_iter()
        .filter(|m| !m.writable)
        .map(|m| libc::iovec { iov_base: m.start as *mut libc::c_void, iov_len: (m.end - m.start) as usize })
        .collect();
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("pidfd_open({pid})"));
    }
    // SAFETY: the descriptor was just opened and nothing else owns it.
    let pidfd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    for range in &ranges {
        // SAFETY: the kernel reads one iovec from this process (`range`, alive for the
        // call) and advises the target's mapping it names; no memory of this process
        // is written.
        let done = unsafe {
            libc::syscall(
                libc::SYS_process_madvise,
                pidfd.as_raw_fd(),
                range as *const libc::iovec,
                1,
                libc::MADV_PAGEOUT,
                0,
            )
        };
        if done < 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("process_madvise(MADV_PAGEOUT) of {pid}'s {}", binary.display()));
        }
    }
    Ok(())
}

/// `p` as a command argument.
fn path(p: &Path) -> anyhow::Result<String> {
    p.to_str().map(str::to_string).with_context(|| format!("{} is not UTF-8", p.display()))
}

/// One mapping of `binary` in a process.
struct Mapping {
    start: u64,
    end: u64,
    offset: u64,
    writable: bool,
}

/// Process `pid`'s mappings of `binary`, from `/proc/PID/maps`.
fn mappings(pid: u32, binary: &Path) -> anyhow::Result<Vec<Mapping>> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))?;
    let want = binary.to_string_lossy();
    Ok(maps
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() == 6 && f[5] == want).then_some(())?;
            let (lo, hi) = f[0].split_once('-')?;
            Some(Mapping {
                start: u64::from_str_radix(lo, 16).ok()?,
                end: u64::from_str_radix(hi, 16).ok()?,
                offset: u64::from_str_radix(f[2], 16).ok()?,
                writable: f[1].contains('w'),
            })
        })
        .collect())
}

/// The pages of `binary` (as link-time addresses / [`PAGE`]) mapped in process `pid`.
fn touched_pages(pid: u32, binary: &Path) -> anyhow::Result<BTreeSet<u64>> {
    use std::io::{Read as _, Seek as _, SeekFrom};
    let mappings = mappings(pid, binary)?;
    // A position-independent executable's first segment is file offset 0 at address 0:
    // where it is mapped is the load bias.
    let bias = mappings
        .iter()
        .find(|m| m.offset == 0)
        .map(|m| m.start)
        .with_context(|| format!("{} is not mapped in {pid}", binary.display()))?;
    let mut pagemap = std::fs::File::open(format!("/proc/{pid}/pagemap"))?;
    let mut pages = BTreeSet::new();
    for Mapping { start, end, .. } in mappings {
        let n = ((end - start) / PAGE) as usize;
        let mut entries = vec![0u8; n * 8];
        pagemap.seek(SeekFrom::Start(start / PAGE * 8))?;
        pagemap.read_exact(&mut entries)?;
        for (i, e) in entries.chunks_exact(8).enumerate() {
            let entry = u64::from_le_bytes(e.try_into().expect("8 bytes"));
            // Bit 63: the page is present in the process.
            if entry >> 63 == 1 {
                pages.insert((start - bias) / PAGE + i as u64);
            }
        }
    }
    Ok(pages)
}

/// A function or read-only object of the binary.
#[derive(Debug, Clone, PartialEq)]
struct Symbol {
    address: u64,
    size: u64,
    name: String,
}

/// The binary's sized code and read-only data symbols (`nm -S`).
fn read_symbols(binary: &Path) -> anyhow::Result<Vec<Symbol>> {
    let text = sys::run(&["nm", "-S", "--defined-only", &path(binary)?])?;
    Ok(parse_nm(&text))
}

fn parse_nm(text: &str) -> Vec<Symbol> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let [address, size, kind, name] = f[..] else { return None };
            matches!(kind, "t" | "T" | "r" | "R").then_some(())?;
            let size = u64::from_str_radix(size, 16).ok().filter(|s| *s > 0)?;
            Some(Symbol { address: u64::from_str_radix(address, 16).ok()?, size, name: name.to_string() })
        })
        .collect()
}

/// `symbols` (in address order) with those on pages more readings held first: what
/// every process runs in every kind of traffic (the runtime, TLS records, the tunnel)
/// lies together, and what one role runs (the gateway's) after it, so a fault's
/// neighbours are code of the same use.
fn most_used_first(mut symbols: Vec<Symbol>, readings: &BTreeMap<u64, u32>) -> Vec<Symbol> {
    let uses = |s: &Symbol| {
        let (first, last) = (s.address / PAGE, (s.address + s.size - 1) / PAGE);
        readings.range(first..=last).map(|(_, n)| *n).max().unwrap_or(0)
    };
    // Stable: address order among equals.
    symbols.sort_by_key(|s| std::cmp::Reverse(uses(s)));
    symbols
}

/// The symbols that lie (at least partly) on a touched page, in address order.
fn touched_symbols(symbols: &[Symbol], pages: &BTreeSet<u64>) -> Vec<Symbol> {
    let mut hit: Vec<Symbol> = symbols
        .iter()
        .filter(|s| {
            let (first, last) = (s.address / PAGE, (s.address + s.size - 1) / PAGE);
            pages.range(first..=last).next().is_some()
        })
        .cloned()
        .collect();
    hit.sort_by_key(|s| s.address);
    hit
}

#[cfg(test)]
mod tests {
    use super::*;

    const NM: &str = "\
0000000000001000 0000000000000010 T hot_start
0000000000001ff8 0000000000000010 t straddles_into_page_2
0000000000003000 0000000000000100 T cold
0000000000004000 0000000000000008 R hot_table
0000000000005000 T no_size
0000000000006000 0000000000000020 D data_is_not_laid_out
";

    #[test]
    fn nm_lines_give_sized_code_and_read_only_data_only() {
        let names: Vec<String> = parse_nm(NM).into_iter().map(|s| s.name).collect();
        assert_eq!(names, ["hot_start", "straddles_into_page_2", "cold", "hot_table"]);
    }

    #[test]
    fn a_symbol_is_listed_when_any_page_it_lies_on_was_touched() {
        let symbols = parse_nm(NM);
        // Page 2 holds only the tail of straddles_into_page_2; page 4 holds hot_table.
        let pages = BTreeSet::from([2, 4]);
        let names: Vec<String> = touched_symbols(&symbols, &pages).into_iter().map(|s| s.name).collect();
        assert_eq!(names, ["straddles_into_page_2", "hot_table"]);
        let pages = BTreeSet::from([1]);
        let names: Vec<String> = touched_symbols(&symbols, &pages).into_iter().map(|s| s.name).collect();
        assert_eq!(names, ["hot_start", "straddles_into_page_2"]);
        assert!(touched_symbols(&symbols, &BTreeSet::from([7])).is_empty());
    }

    #[test]
    fn symbols_on_pages_more_readings_held_come_first_then_by_address() {
        let symbols = parse_nm(NM);
        // hot_table's page in five readings, the straddling one's second page in three,
        // the rest in one.
        let readings = BTreeMap::from([(1, 1), (2, 3), (3, 1), (4, 5)]);
        let names: Vec<String> = most_used_first(symbols, &readings).into_iter().map(|s| s.name).collect();
        assert_eq!(names, ["hot_table", "straddles_into_page_2", "hot_start", "cold"]);
    }
}

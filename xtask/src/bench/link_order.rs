//! `cargo xtask link-order`: which of the agent's functions and read-only data it
//! touches, written to `mesh-agent/link-order.txt` for the release link to put first.
//!
//! A page of the binary becomes resident when it is touched, and the kernel maps the
//! 64 KiB around it too (fault-around) from the page cache. The agent's hot code lay
//! scattered through ~19 MB of text, so touching a few megabytes of it made 14 MB
//! resident. Packed together by the linker (`mesh-agent/build.rs`), the touched
//! functions make the resident text the size of what is run.
//!
//! How the touched set is measured: the release agent is copied (debug info stripped,
//! layout unchanged) onto a small ext4 image mounted from a loop device whose
//! read-ahead is off, and the lab runs both node agents from that copy. With an empty
//! page cache and no read-ahead, a fault reads just its own page and fault-around finds
//! no neighbour cached to map, so the pages mapped in the agents (`/proc/PID/pagemap`)
//! are exactly the pages they touched: start-up, enrollment, then the bench's traffic
//! (L4 cross-node and same-node, spliced, L7, HTTP/2, the ingress gateway). Every symbol
//! on a touched page is listed, in address order.
//!
//! Symbols are named as the linker sees them (mangled, with their hash): a dependency
//! update or a renamed item leaves a name the build no longer has, which lld skips.
//! Run this again after such changes; the list only reorders, it never changes code.

use std::collections::BTreeSet;
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
/// What the agents' idle loops (heap trim, metrics sampler) get to run before reading.
const IDLE: Duration = Duration::from_secs(3);

/// Measures the touched set and writes `mesh-agent/link-order.txt`.
pub fn run() -> anyhow::Result<()> {
    setup::ensure_bench_tools()?;
    let tools = Tools::find()?;
    let work = root().join("target/link-order");
    let cold = std::cell::OnceCell::new();
    let symbols = in_lab_running(
        true,
        |built| {
            let copy = ColdCopy::make(&work, &built)?;
            let bin = copy.binary.clone();
            let _ = cold.set(copy);
            Ok(bin)
        },
        |lab| {
            let cold = cold.get().context("the cold copy was made")?;
            traffic(lab, &tools)?;
            std::thread::sleep(IDLE);
            let mut pages = BTreeSet::new();
            for node in &lab.nodes {
                let pid = node.agent_pid.with_context(|| format!("{} has no agent", node.name))?;
                pages.extend(touched_pages(pid, &cold.binary)?);
            }
            let symbols = read_symbols(&cold.binary)?;
            let listed = touched_symbols(&symbols, &pages);
            let bytes: u64 = listed.iter().map(|s| s.size).sum();
            println!(
                "[link-order] {} pages touched ({:.1} MiB), {} symbols on them ({:.1} MiB)",
                pages.len(),
                (pages.len() as u64 * PAGE) as f64 / 1048576.0,
                listed.len(),
                bytes as f64 / 1048576.0
            );
            Ok(listed)
        },
    );
    drop(cold);
    let symbols = symbols?;
    let out = root().join("mesh-agent/link-order.txt");
    let mut text = String::new();
    let mut seen = std::collections::HashSet::new();
    for s in &symbols {
        if seen.insert(s.name.as_str()) {
            text.push_str(&s.name);
            text.push('\n');
        }
    }
    std::fs::write(&out, text).with_context(|| format!("writing {}", out.display()))?;
    println!("[link-order] wrote {} ({} names); the next release build lays them out first", out.display(), seen.len());
    Ok(())
}

/// The traffic the bench sends, briefly: what a serving agent runs.
fn traffic(lab: &mut Lab, tools: &Tools) -> anyhow::Result<()> {
    set_enrollment(lab, true)?;
    let secs = format!("{}s", TRAFFIC.as_secs());
    let load = |url: &str, origin: Origin, extra: &[&str]| -> anyhow::Result<()> {
        let mut args = vec!["-z", &secs, "-c", "16"];
        args.extend_from_slice(extra);
        oha(lab, tools, origin, url, &args).map(|_| ())
    };
    for server in [SERVER_CROSS, SERVER_SAME] {
        let url = format!("http://{}:8080/bytes/1024", lab.pod(server)?.ip);
        load(&url, Origin::ClientPod, &[])?;
        // HTTP/2 is the served path at the destination; where it fails, the list
        // still holds everything else.
        if let Err(e) = load(&url, Origin::ClientPod, &["--http2"]) {
            println!("[link-order] HTTP/2 to {server} left out: {e:#}");
        }
        let telemetry = splice_at_destination(lab, server)?;
        load(&url, Origin::ClientPod, &[])?;
        lab.delete(&telemetry)?;
        let vip = route_all_to(lab, server)?;
        load(&format!("http://{vip}/bytes/1024"), Origin::ClientPod, &[])?;
        lab.delete(Path::new(L7_CONFIG))?;
    }
    route_ingress_to(lab, SERVER_CROSS)?;
    let gateway = gateway_oha_args(lab)?;
    let gateway: Vec<&str> = gateway.iter().map(String::as_str).collect();
    load(&format!("https://{INGRESS_HOST}/bytes/1024"), Origin::Outside, &gateway)?;
    lab.delete(Path::new(INGRESS_CONFIG))?;
    // The admin endpoints an operator or Prometheus reads.
    for node in &lab.nodes {
        for path in ["metrics", "config_dump", "healthz/ready"] {
            let url = format!("http://127.0.0.1:15000/{path}");
            sys::run(&["ip", "netns", "exec", &node.netns, "curl", "-s", "-o", "/dev/null", "-m", "5", &url])?;
        }
    }
    Ok(())
}

/// The agent binary on a loop-mounted ext4 image with read-ahead off, and an empty
/// page cache: removed (unmounted, detached) when dropped.
struct ColdCopy {
    binary: PathBuf,
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
        let size = std::fs::metadata(built)?.len() / 2 + (64 << 20);
        std::fs::File::create(&image)?.set_len(size)?;
        sys::run(&["mkfs.ext4", "-q", "-F", &path(&image)?])?;
        let loop_dev = sys::run(&["losetup", "--find", "--show", &path(&image)?])?.trim().to_string();
        let copy = Self { binary: mount.join("mesh-agent"), mount, image, loop_dev };
        let dev_name =
            Path::new(&copy.loop_dev).file_name().context("loop device name")?.to_string_lossy().into_owned();
        std::fs::write(format!("/sys/block/{dev_name}/queue/read_ahead_kb"), "0")
            .context("turning the loop device's read-ahead off")?;
        copy.mount_it()?;
        sys::run(&["objcopy", "--strip-debug", &path(built)?, &path(&copy.binary)?])?;
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

/// `p` as a command argument.
fn path(p: &Path) -> anyhow::Result<String> {
    p.to_str().map(str::to_string).with_context(|| format!("{} is not UTF-8", p.display()))
}

/// The pages of `binary` (as link-time addresses / [`PAGE`]) mapped in process `pid`.
fn touched_pages(pid: u32, binary: &Path) -> anyhow::Result<BTreeSet<u64>> {
    use std::io::{Read as _, Seek as _, SeekFrom};
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))?;
    let want = binary.to_string_lossy();
    // (start, end, file offset) of each mapping of the binary.
    let mappings: Vec<(u64, u64, u64)> = maps
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() == 6 && f[5] == want).then_some(())?;
            let (lo, hi) = f[0].split_once('-')?;
            Some((
                u64::from_str_radix(lo, 16).ok()?,
                u64::from_str_radix(hi, 16).ok()?,
                u64::from_str_radix(f[2], 16).ok()?,
            ))
        })
        .collect();
    // A position-independent executable's first segment is file offset 0 at address 0:
    // where it is mapped is the load bias.
    let bias =
        mappings.iter().find(|m| m.2 == 0).map(|m| m.0).with_context(|| format!("{want} is not mapped in {pid}"))?;
    let mut pagemap = std::fs::File::open(format!("/proc/{pid}/pagemap"))?;
    let mut pages = BTreeSet::new();
    for (lo, hi, _) in mappings {
        let n = ((hi - lo) / PAGE) as usize;
        let mut entries = vec![0u8; n * 8];
        pagemap.seek(SeekFrom::Start(lo / PAGE * 8))?;
        pagemap.read_exact(&mut entries)?;
        for (i, e) in entries.chunks_exact(8).enumerate() {
            let entry = u64::from_le_bytes(e.try_into().expect("8 bytes"));
            // Bit 63: the page is present in the process.
            if entry >> 63 == 1 {
                pages.insert((lo - bias) / PAGE + i as u64);
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
}

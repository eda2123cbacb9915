//! What crosses the wire between lab nodes: a tcpdump capture on the bridge that links
//! the nodes, and the two questions asked of it — was a TLS 1.3 handshake seen, and is
//! any plaintext HTTP visible.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::lab::{Lab, WIRE_NETNS};

/// ServerHello `supported_versions` extension selecting TLS 1.3: type 0x002b, length 2,
/// version 0x0304. Present in every TLS 1.3 ServerHello, absent from TLS 1.2.
const TLS13_SELECTED: &[u8] = &[0x00, 0x2b, 0x00, 0x02, 0x03, 0x04];
/// Plaintext that would show up on the wire if HTTP were not encrypted.
const PLAINTEXT_MARKERS: &[&str] = &["GET / HTTP/1.1", "HTTP/1.1 200", "\"pod\":"];

/// A running capture on the inter-node bridge; [`Capture::finish`] stops it.
pub struct Capture {
    tcpdump: Child,
    pcap: PathBuf,
}

/// What a finished capture holds.
pub struct WireReport {
    /// Bytes captured (pcap file size).
    pub bytes: usize,
    /// A TLS 1.3 ServerHello was seen.
    pub tls13_handshake: bool,
    /// Plaintext HTTP markers found on the wire (empty when everything was encrypted).
    pub plaintext: Vec<String>,
    /// Where the capture was written.
    pub pcap: PathBuf,
}

impl Capture {
    /// Starts tcpdump on the bridge between nodes with the pcap `filter` (e.g. `tcp`
    /// or `tcp port 15008`), writing to `name` in the lab's state directory.
    pub fn start(lab: &Lab, name: &str, filter: &str) -> std::io::Result<Capture> {
        let pcap = lab.state_dir.join(name);
        let tcpdump = Command::new("ip")
            .args(["netns", "exec", WIRE_NETNS, "tcpdump", "-i", "br0", "-U", "-s", "0", "-w"])
            .arg(&pcap)
            .args(filter.split_whitespace())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        // tcpdump opens the interface asynchronously; give it a moment so the first
        // handshake is not missed.
        std::thread::sleep(Duration::from_millis(700));
        Ok(Capture { tcpdump, pcap })
    }

    /// Stops the capture (SIGINT, so tcpdump flushes) and reads what it holds.
    pub fn finish(mut self) -> WireReport {
        std::thread::sleep(Duration::from_millis(300));
        let _ = Command::new("kill").args(["-INT", &self.tcpdump.id().to_string()]).status();
        let _ = self.tcpdump.wait();
        WireReport::read(&self.pcap)
    }
}

impl WireReport {
    /// Reads a pcap file written by [`Capture`].
    pub fn read(pcap: &Path) -> WireReport {
        let data = std::fs::read(pcap).unwrap_or_default();
        WireReport {
            bytes: data.len(),
            tls13_handshake: contains(&data, TLS13_SELECTED),
            plaintext: PLAINTEXT_MARKERS
                .iter()
                .filter(|m| contains(&data, m.as_bytes()))
                .map(|m| m.to_string())
                .collect(),
            pcap: pcap.to_path_buf(),
        }
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

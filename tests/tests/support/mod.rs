//! Certificates for tests that play peers the mesh must refuse (or accept): leaves
//! signed by the lab's mesh CA or by a CA of their own, valid or expired.
#![allow(dead_code, reason = "each test file uses the part it needs")]

use std::path::Path;

use mesh_tests::lab::Lab;

/// The lab's mesh CA, as an rcgen issuer.
pub fn mesh_issuer(lab: &Lab) -> rcgen::Issuer<'static, rcgen::KeyPair> {
    let key = rcgen::KeyPair::from_pem(&std::fs::read_to_string(lab.ca_dir().join("ca-key.pem")).unwrap()).unwrap();
    rcgen::Issuer::from_ca_cert_pem(&std::fs::read_to_string(lab.ca_dir().join("ca-cert.pem")).unwrap(), key).unwrap()
}

/// A CA the mesh has never heard of.
pub fn foreign_issuer() -> rcgen::Issuer<'static, rcgen::KeyPair> {
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    rcgen::Issuer::new(ca_params, rcgen::KeyPair::generate().unwrap())
}

/// Writes `<name>.pem` / `<name>.key`: a leaf certificate with `uri` as its only SAN,
/// signed by `issuer`.
pub fn write_leaf(dir: &Path, name: &str, uri: &str, issuer: &rcgen::Issuer<'_, rcgen::KeyPair>) {
    write_leaf_valid(dir, name, uri, issuer, None);
}

/// [`write_leaf`] with a validity window `(not_before, not_after)` in seconds relative
/// to now (negative: in the past), e.g. `(-7200, -3600)` for one that expired an hour ago.
pub fn write_leaf_valid(
    dir: &Path,
    name: &str,
    uri: &str,
    issuer: &rcgen::Issuer<'_, rcgen::KeyPair>,
    window: Option<(i64, i64)>,
) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.subject_alt_names = vec![rcgen::SanType::URI(uri.try_into().unwrap())];
    if let Some((from, to)) = window {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
        params.not_before = rcgen::date_time_ymd(1970, 1, 1) + time_secs(now + from);
        params.not_after = rcgen::date_time_ymd(1970, 1, 1) + time_secs(now + to);
    }
    let cert = params.signed_by(&key, issuer).unwrap();
    std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).unwrap();
    std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).unwrap();
}

fn time_secs(s: i64) -> std::time::Duration {
    std::time::Duration::from_secs(s.max(0) as u64)
}

/// Runs `f` on a thread inside network namespace `netns` (the thread stays there and
/// ends with `f`), for clients that must stand where a pod or a node stands.
pub fn in_netns<T: Send + 'static>(netns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    use std::os::fd::AsFd as _;
    let path = format!("/var/run/netns/{netns}");
    std::thread::spawn(move || {
        let ns = std::fs::File::open(&path).unwrap();
        nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        f()
    })
    .join()
    .unwrap()
}

/// A field of `/proc/<pid>/status` in KiB (`VmRSS`, `VmHWM`).
pub fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Resets the peak RSS (`VmHWM`) of `pid` (Linux: `clear_refs` value 5).
pub fn reset_peak(pid: u32) {
    let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
}

/// Open file descriptors of `pid`.
pub fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

/// Whether `pid` runs (not gone, not a zombie).
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| s.rsplit(')').next().and_then(|r| r.split_whitespace().next()) != Some("Z"))
}

//! `cargo xtask image`: the agent image, built on this machine with no registry. The
//! binaries are built on the host as static executables (glibc's `crt-static`), put in
//! an image `FROM scratch` and committed with buildah (or podman, or docker). The same
//! image runs the node agent, the CA service (`/mesh-ca`), the CNI plugin the agent
//! installs (`/mesh-cni`) and `meshctl`.
//!
//! `check` runs the image as the DaemonSet would, with `podman run`: the agent's
//! `--version`, and `meshctl check --pre` loading the programs through this kernel's
//! verifier with the DaemonSet's capabilities and the node's bpffs.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, bail};

use crate::root;

/// What goes in the image, all at `/`.
const BINARIES: &[&str] = &["mesh-agent", "meshctl", "mesh-cni", "mesh-ca"];

/// The image: the binaries and nothing else (no shell, no libc, no package manager).
/// The agent runs as root with the capabilities the DaemonSet grants; see
/// deploy/manifests.
const CONTAINERFILE: &str = "FROM scratch\n\
    COPY mesh-agent meshctl mesh-cni mesh-ca /\n\
    ENTRYPOINT [\"/mesh-agent\"]\n";

/// The image the manifests reference by default (`values.global.hub` and `tag`).
pub fn default_tag() -> String {
    format!("ghcr.io/example/mesh/mesh-agent:{}", env!("CARGO_PKG_VERSION"))
}

/// A builder that answered its health check, or why each one did not. buildah and
/// podman need no daemon; docker is tried last.
pub fn find_builder() -> Result<&'static str, Vec<String>> {
    let mut why = Vec::new();
    for (tool, check) in [("buildah", &["version"][..]), ("podman", &["version"][..]), ("docker", &["info"][..])] {
        match Command::new(tool).args(check).output() {
            Ok(o) if o.status.success() => return Ok(tool),
            Ok(o) => {
                let err = String::from_utf8_lossy(&o.stderr);
                let first = err.lines().find(|l| !l.trim().is_empty()).unwrap_or("").trim().to_string();
                why.push(format!("{tool} {}: {first}", check.join(" ")));
            }
            Err(e) => why.push(format!("{tool}: {e}")),
        }
    }
    Err(why)
}

/// Builds the static binaries with cargo `profile` (`release`, `dev`), then the image,
/// tagged `tag`.
pub fn run(tag: Option<String>, profile: &str) -> anyhow::Result<String> {
    let tag = tag.unwrap_or_else(default_tag);
    let builder = match find_builder() {
        Ok(b) => b,
        Err(why) => bail!(
            "no container builder works on this machine, so the image cannot be built here:\n  {}\n\
             `cargo xtask setup` installs buildah and podman on Debian; elsewhere\n  \
             docker build -f deploy/Dockerfile -t {tag} .",
            why.join("\n  ")
        ),
    };
    let bins = static_binaries(profile)?;
    let context = root().join("target/image");
    std::fs::create_dir_all(&context)?;
    for bin in &bins {
        let to = context.join(bin.file_name().expect("a binary has a name"));
        std::fs::copy(bin, &to).with_context(|| format!("copying {} to {}", bin.display(), to.display()))?;
    }
    std::fs::write(context.join("Containerfile"), CONTAINERFILE)?;
    let file = context.join("Containerfile").display().to_string();
    let dir = context.display().to_string();
    let args: Vec<&str> = match builder {
        "buildah" => vec!["bud", "--quiet", "-f", &file, "-t", &tag, &dir],
        _ => vec!["build", "--quiet", "-f", &file, "-t", &tag, &dir],
    };
    println!("[image] {builder} {}", args.join(" "));
    let status = Command::new(builder).args(&args).status().with_context(|| format!("running {builder}"))?;
    if !status.success() {
        bail!("{builder} could not build the image");
    }
    println!("[image] built {tag} (FROM scratch: {})", BINARIES.join(", "));
    Ok(tag)
}

/// The host's target triple, as rustc reports it.
fn host_triple() -> anyhow::Result<String> {
    let out = Command::new("rustc").arg("-vV").output().context("running rustc -vV")?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines().find_map(|l| l.strip_prefix("host: ")).map(str::to_string).context("rustc -vV names no host triple")
}

/// A static C runtime, and no debug info: the image carries the binaries only, and
/// symbols stay for backtraces.
const STATIC_FLAGS: &str = "-C target-feature=+crt-static -C debuginfo=0 -C strip=debuginfo";

/// `cargo build` of the image's binaries for the host triple with a static C runtime;
/// naming the target keeps build scripts and proc macros dynamic, and the static
/// objects apart from the lab's binaries.
fn static_binaries(profile: &str) -> anyhow::Result<Vec<PathBuf>> {
    let triple = host_triple()?;
    let flags_var = format!("CARGO_TARGET_{}_RUSTFLAGS", triple.to_uppercase().replace('-', "_"));
    let mut cmd = Command::new("cargo");
    cmd.current_dir(root())
        .args(["build", "--locked", "--profile", profile, "--target", &triple, "--package", "mesh-agent"])
        .env(&flags_var, STATIC_FLAGS)
        // One-off builds: incremental state would only fill the disk.
        .env("CARGO_INCREMENTAL", "0");
    for bin in BINARIES {
        cmd.args(["--bin", bin]);
    }
    println!("[image] static binaries: {flags_var}='{STATIC_FLAGS}' cargo build --profile {profile} --target {triple}");
    if !cmd.status().context("running cargo build")?.success() {
        bail!("building the static binaries failed");
    }
    let dir = root().join("target").join(&triple).join(if profile == "dev" { "debug" } else { profile });
    let bins: Vec<PathBuf> = BINARIES.iter().map(|b| dir.join(b)).collect();
    for bin in &bins {
        if has_interpreter(bin)? {
            bail!("{} is dynamically linked: it would not run FROM scratch", bin.display());
        }
    }
    Ok(bins)
}

/// Whether the ELF file asks for a dynamic loader (a `PT_INTERP` program header).
fn has_interpreter(path: &Path) -> anyhow::Result<bool> {
    const PT_INTERP: u32 = 3;
    let elf = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let word = |at: usize, n: usize| -> anyhow::Result<u64> {
        let bytes = elf.get(at..at + n).with_context(|| format!("{}: truncated ELF", path.display()))?;
        Ok(bytes.iter().rev().fold(0u64, |v, b| (v << 8) | u64::from(*b)))
    };
    // 64-bit little-endian ELF only: what the host triple builds here.
    if elf.get(..6) != Some(&[0x7f, b'E', b'L', b'F', 2, 1][..]) {
        bail!("{}: not a 64-bit little-endian ELF file", path.display());
    }
    let (phoff, phentsize, phnum) = (word(0x20, 8)? as usize, word(0x36, 2)? as usize, word(0x38, 2)? as usize);
    for i in 0..phnum {
        if word(phoff + i * phentsize, 4)? as u32 == PT_INTERP {
            return Ok(true);
        }
    }
    Ok(false)
}

/// `podman run` with what this machine allows: runc where installed (crun refuses
/// hybrid cgroup hierarchies), and resource limits no higher than the host's (the
/// defaults ask for more than an unprivileged-limits host grants).
fn podman_run() -> Command {
    let mut cmd = Command::new("podman");
    if mesh_tests::sys::have("runc") {
        cmd.args(["--runtime", "runc"]);
    }
    cmd.args(["run", "--rm", "--network", "none", "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]);
    cmd
}

/// Runs the image as a node would: the agent's version, then `meshctl check --pre`
/// with the DaemonSet's capabilities and the node's bpffs and cgroup tree.
pub fn check(tag: &str) -> anyhow::Result<()> {
    let out = podman_run().args([tag, "--version"]).output().context("running podman")?;
    let version = String::from_utf8_lossy(&out.stdout);
    let want = format!("mesh-agent {}", env!("CARGO_PKG_VERSION"));
    if !out.status.success() || version.trim() != want {
        bail!(
            "podman run {tag} --version: {} (stdout {version:?}, stderr {})",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    println!("[image] podman run {tag} --version: {}", version.trim());

    let mut cmd = podman_run();
    cmd.args(["--cap-drop", "ALL"]);
    for cap in DAEMONSET_CAPABILITIES {
        cmd.args(["--cap-add", cap]);
    }
    cmd.args(["-v", "/sys/fs/bpf:/sys/fs/bpf", "-v", "/sys/fs/cgroup:/host/sys/fs/cgroup:ro"]).args([
        "--entrypoint",
        "/meshctl",
        tag,
        "check",
        "--pre",
    ]);
    let out = cmd.output().context("running podman")?;
    let report = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if !out.status.success() {
        bail!("meshctl check --pre in the image failed ({}):\n{report}", out.status);
    }
    println!("[image] meshctl check --pre in the image:\n{report}");
    Ok(())
}

/// The capabilities the generated DaemonSet grants the agent (kept equal to the
/// manifests by `capabilities_match_the_daemon_set`).
pub const DAEMONSET_CAPABILITIES: &[&str] = &["BPF", "NET_ADMIN", "SYS_ADMIN", "SYS_PTRACE", "SYS_RESOURCE"];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capabilities_match_the_daemon_set() {
        let manifest = std::fs::read_to_string(root().join("deploy/manifests/default.yaml")).unwrap();
        let daemon_set = manifest.split("\n---\n").find(|d| d.contains("\nkind: DaemonSet\n")).unwrap();
        let (_, rest) = daemon_set.split_once("capabilities:\n").unwrap();
        let granted: Vec<&str> = rest
            .lines()
            .skip_while(|l| l.trim() != "add:")
            .skip(1)
            .map_while(|l| l.trim().strip_prefix("- "))
            .collect();
        assert_eq!(granted, DAEMONSET_CAPABILITIES);
    }

    #[test]
    fn a_dynamic_executable_is_told_apart_and_a_non_elf_file_is_an_error() {
        let rustc =
            String::from_utf8(Command::new("rustc").arg("--print").arg("sysroot").output().unwrap().stdout).unwrap();
        let rustc = PathBuf::from(rustc.trim()).join("bin/rustc");
        assert!(has_interpreter(&rustc).unwrap(), "rustc is linked dynamically");
        assert!(has_interpreter(Path::new("/etc/hostname")).is_err());
    }
}

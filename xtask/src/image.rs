//! `cargo xtask image`: builds the agent image from deploy/Dockerfile with the first
//! container builder that works here (docker, podman, buildah), or says why none can.

use std::process::Command;

use anyhow::{Context as _, bail};

use crate::root;

/// The image the manifests reference by default (`values.global.hub` and `tag`).
pub fn default_tag() -> String {
    format!("ghcr.io/example/mesh/mesh-agent:{}", env!("CARGO_PKG_VERSION"))
}

/// A builder that answered its health check, or why each one did not.
pub fn find_builder() -> Result<&'static str, Vec<String>> {
    let mut why = Vec::new();
    for (tool, check) in [("docker", &["info"][..]), ("podman", &["info"][..]), ("buildah", &["version"][..])] {
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

/// Builds and tags the image.
pub fn run(tag: Option<String>) -> anyhow::Result<String> {
    let tag = tag.unwrap_or_else(default_tag);
    let builder = match find_builder() {
        Ok(b) => b,
        Err(why) => bail!(
            "no container builder works on this machine, so the image cannot be built here:\n  {}\n\
             The image is defined in deploy/Dockerfile; on a machine with Docker run\n  \
             docker build -f deploy/Dockerfile -t {tag} .",
            why.join("\n  ")
        ),
    };
    let args: Vec<String> = match builder {
        "buildah" => vec!["bud".into(), "-f".into(), "deploy/Dockerfile".into(), "-t".into(), tag.clone(), ".".into()],
        _ => vec!["build".into(), "-f".into(), "deploy/Dockerfile".into(), "-t".into(), tag.clone(), ".".into()],
    };
    println!("[image] {builder} {}", args.join(" "));
    let status =
        Command::new(builder).current_dir(root()).args(&args).status().with_context(|| format!("running {builder}"))?;
    if !status.success() {
        bail!("{builder} build failed");
    }
    println!("[image] built {tag}");
    Ok(tag)
}

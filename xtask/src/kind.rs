//! `cargo xtask kind-e2e`: the lab's scenarios on a real Kubernetes cluster (kind):
//! build the image, create a two-node cluster, `meshctl install` (which creates the
//! cacerts Secret) and `meshctl verify-install`, deploy the lab's workloads as
//! Deployments, check that traffic flows over the mesh and that the reference policies
//! hold, `meshctl proxy-status`, `analyze --cluster` and `uninstall --purge`, then
//! delete the cluster.
//!
//! It needs a container engine, kind, kubectl and images from a registry. Where any is
//! missing (as on the build machines, which have no Docker daemon and no registry) it
//! says which and exits without running anything.

use std::process::Command;

use anyhow::{Context as _, bail};

use crate::{image, root};

const CLUSTER: &str = "mesh-e2e";

/// What is missing to run here; empty when everything is.
pub fn missing() -> Vec<String> {
    let mut out = Vec::new();
    if let Err(why) = image::find_builder() {
        out.push(format!("a container engine to build the image ({})", why.join("; ")));
    }
    for tool in ["kind", "kubectl"] {
        if crate::setup::command_path(tool).is_none() {
            out.push(format!("{tool} (not on PATH)"));
        }
    }
    out
}

fn run(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        // meshctl prints its findings on stdout, errors on stderr: show both.
        bail!(
            "{cmd:?} failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn kubectl(args: &[&str]) -> anyhow::Result<String> {
    run(Command::new("kubectl").args(["--context", &format!("kind-{CLUSTER}")]).args(args))
}

/// Runs the end-to-end scenarios, or reports that it cannot here.
pub fn e2e() -> anyhow::Result<()> {
    let missing = missing();
    if !missing.is_empty() {
        println!("kind-e2e: skipped: this machine cannot run a kind cluster; it lacks:");
        for m in &missing {
            println!("  - {m}");
        }
        println!(
            "Run it where Docker (or podman), kind and kubectl are installed and images can be pulled:\n  \
             cargo xtask kind-e2e\n(docs/operating.md, \"Running on Kubernetes\")"
        );
        return Ok(());
    }
    let tag = image::run(None, "release")?;
    let config = root().join("target/kind-config.yaml");
    std::fs::write(
        &config,
        "kind: Cluster\napiVersion: kind.x-k8s.io/v1alpha4\nnodes:\n- role: control-plane\n- role: worker\n",
    )?;
    run(Command::new("kind").args(["create", "cluster", "--name", CLUSTER, "--config"]).arg(&config))?;
    let result = scenarios(&tag);
    let _ = run(Command::new("kind").args(["delete", "cluster", "--name", CLUSTER]));
    result
}

fn scenarios(tag: &str) -> anyhow::Result<()> {
    run(Command::new("kind").args(["load", "docker-image", tag, "--name", CLUSTER]))?;
    let meshctl_bin = root().join("target/release/meshctl");
    run(Command::new("cargo").current_dir(root()).args([
        "build",
        "--release",
        "-p",
        "mesh-agent",
        "--bin",
        "meshctl",
    ]))?;
    // kind made its cluster the current context, which meshctl uses.
    let meshctl = |args: &[&str]| run(Command::new(&meshctl_bin).env("NO_COLOR", "1").args(args));
    // Creates the cacerts Secret (a new self-signed root), then the rest.
    println!("{}", meshctl(&["install", "-y", "--set", "profile=demo"])?);
    kubectl(&["-n", "istio-system", "rollout", "status", "daemonset/mesh-agent", "--timeout=180s"])?;
    println!("{}", meshctl(&["verify-install"])?);
    // The lab's workloads as Deployments, in the enrolled production namespace.
    kubectl(&["apply", "-f", &root().join("examples/kind/workloads.yaml").display().to_string()])?;
    kubectl(&["-n", "production", "wait", "--for=condition=available", "deployment", "--all", "--timeout=180s"])?;
    let curl = |path: &str, extra: &[&str]| -> anyhow::Result<String> {
        let mut args = vec![
            "-n",
            "production",
            "exec",
            "deploy/frontend",
            "--",
            "curl",
            "-s",
            "-m",
            "5",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
        ];
        args.extend(extra);
        let url = format!("http://myapp{path}");
        args.push(&url);
        kubectl(&args)
    };
    expect("frontend -> myapp", &curl("/", &[])?, "200")?;
    for f in ["peerauthentication.yaml", "authorizationpolicy-myapp.yaml"] {
        kubectl(&["apply", "-f", &root().join("examples/seed").join(f).display().to_string()])?;
    }
    std::thread::sleep(std::time::Duration::from_secs(3));
    expect("GET /api/users from frontend", &curl("/api/users", &[])?, "200")?;
    expect("DELETE /api/x from frontend", &curl("/api/x", &["-X", "DELETE"])?, "403")?;
    println!("{}", meshctl(&["proxy-status"])?);
    println!("{}", meshctl(&["analyze", "--cluster"])?);
    println!("{}", meshctl(&["uninstall", "-y", "--purge", "--set", "profile=demo"])?);
    println!("kind-e2e: passed");
    Ok(())
}

fn expect(what: &str, got: &str, want: &str) -> anyhow::Result<()> {
    println!("  {what:<40} {got} (want {want})");
    if got.trim() != want {
        bail!("{what}: got {got}, want {want}");
    }
    Ok(())
}

//! `mesh-cni`: the mesh's CNI plugin, chained after the cluster's network plugin. The
//! container runtime runs it with the CNI environment and the network configuration on
//! stdin; it hands the agent each new pod before the pod's containers start (see
//! `mesh_agent::cni`).
#![forbid(unsafe_code)]

use std::io::Read as _;

fn main() {
    let env: std::collections::HashMap<String, String> = std::env::vars().collect();
    let mut stdin = Vec::new();
    if env.get("CNI_COMMAND").is_none_or(|c| c != "VERSION") && std::io::stdin().read_to_end(&mut stdin).is_err() {
        stdin.clear();
    }
    match mesh_agent::cni::run_plugin(&env, &stdin) {
        Ok(Some(out)) => println!("{out}"),
        Ok(None) => {}
        Err((version, e)) => {
            // The runtime reads the error from stdout; stderr goes to its log.
            println!("{}", mesh_agent::cni::error_json(&version, &e));
            eprintln!("mesh-cni: {}: {}", e.msg, e.details);
            std::process::exit(1);
        }
    }
}

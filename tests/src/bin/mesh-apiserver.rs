//! `mesh-apiserver`: a lab cluster's Kubernetes API, as far as another cluster's
//! agents read it through a remote secret. It serves the API server double
//! ([`mesh_tests::api_server`]) with the Namespaces, Pods, Services, EndpointSlices and
//! ServiceAccounts of a directory of manifests (the cluster's config directory), and
//! follows the directory: a file changed, added or removed is a watch event. Only the
//! bearer token in `--token-file` is served, as the API server serves the remote
//! secret's reader account; nothing else of the directory (Secrets above all) is.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use mesh_tests::api_server::ApiServer;
use serde_json::Value;

/// The kinds a remote cluster's reader may list and watch.
const SERVED: &[&str] = &["Namespace", "Pod", "Service", "EndpointSlice", "ServiceAccount"];

#[derive(Parser)]
struct Args {
    /// Address to listen on.
    #[arg(long)]
    listen: SocketAddr,
    /// Directory of manifests (`*.yaml`), re-read every `--interval`.
    #[arg(long)]
    dir: PathBuf,
    /// File holding the one bearer token served.
    #[arg(long)]
    token_file: PathBuf,
    /// How often the directory is read.
    #[arg(long, default_value = "500ms", value_parser = humantime_ms)]
    interval: Duration,
}

fn humantime_ms(s: &str) -> Result<Duration, String> {
    let ms = s.strip_suffix("ms").ok_or("say milliseconds, as 500ms")?;
    ms.parse().map(Duration::from_millis).map_err(|e| format!("{s}: {e}"))
}

/// (collection, namespace, name) -> object, for every served object in `dir`.
fn read_dir(
    dir: &Path,
    collections: &BTreeMap<&str, String>,
) -> anyhow::Result<BTreeMap<(String, String, String), Value>> {
    let mut objects = BTreeMap::new();
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    for file in files {
        // A file being written may not parse yet: it is read again next time.
        let Ok(text) = std::fs::read_to_string(&file) else { continue };
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let Ok(v) = <Value as serde::Deserialize>::deserialize(doc) else { continue };
            let Some(collection) = v["kind"].as_str().and_then(|k| collections.get(k)) else { continue };
            let Some(name) = v["metadata"]["name"].as_str() else { continue };
            let mut v = v.clone();
            let namespaced = v["kind"] != "Namespace";
            let ns = if namespaced {
                v["metadata"]["namespace"].as_str().unwrap_or("default").to_string()
            } else {
                String::new()
            };
            if namespaced {
                v["metadata"]["namespace"] = Value::from(ns.clone());
            }
            objects.insert((collection.clone(), ns, name.to_string()), v);
        }
    }
    Ok(objects)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let token = std::fs::read_to_string(&args.token_file).context("--token-file")?.trim().to_string();
    let kinds = mesh_tests::kinds::builtin();
    let collections: BTreeMap<&str, String> =
        kinds.iter().filter(|k| SERVED.contains(&k.kind)).map(|k| (k.kind, k.collection())).collect();
    let api = ApiServer::new_at(args.listen, &collections.values().cloned().collect::<Vec<_>>()).await;
    api.require_token(&token);
    eprintln!("mesh-apiserver: serving {} on {}", args.dir.display(), args.listen);
    let mut served: BTreeMap<(String, String, String), Value> = BTreeMap::new();
    loop {
        match read_dir(&args.dir, &collections) {
            Ok(now) => {
                for ((collection, ns, name), v) in &now {
                    let key = (collection.clone(), ns.clone(), name.clone());
                    if served.get(&key) != Some(v) {
                        api.apply(collection, v.clone());
                    }
                }
                for (collection, ns, name) in served.keys().filter(|k| !now.contains_key(*k)) {
                    api.delete(collection, ns, name);
                }
                served = now;
            }
            Err(e) => eprintln!("mesh-apiserver: {e:#}"),
        }
        tokio::time::sleep(args.interval).await;
    }
}

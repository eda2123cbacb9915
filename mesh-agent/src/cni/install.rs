//! Chaining `mesh-cni` into the node's CNI configuration, as istio-cni does: the
//! binary goes to the runtime's plugin directory, and an entry for it is appended to
//! the network configuration the runtime uses (the first file of the configuration
//! directory, by name). A single-plugin `.conf` becomes a `.conflist` holding the
//! original plugin and ours. Both steps write a temporary file and rename it, so the
//! runtime never reads half a file; installing twice changes nothing.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use super::{Error, PLUGIN_TYPE};

fn io(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |source| Error::Io { path: path.to_owned(), source }
}

fn invalid(path: &Path, reason: impl Into<String>) -> Error {
    Error::Invalid { what: path.display().to_string(), reason: reason.into() }
}

fn write_atomically(path: &Path, bytes: &[u8], mode: u32) -> Result<(), Error> {
    let tmp = path.with_extension("mesh-tmp");
    std::fs::write(&tmp, bytes).map_err(io(&tmp))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode)).map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

/// The network configuration the runtime reads: the first `.conflist`, `.conf` or
/// `.json` of `conf_dir` by name, as containerd and CRI-O pick it.
fn primary_conf(conf_dir: &Path) -> Result<PathBuf, Error> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(conf_dir)
        .map_err(io(conf_dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().and_then(|e| e.to_str()).is_some_and(|e| matches!(e, "conflist" | "conf" | "json")))
        .collect();
    files.sort();
    files.into_iter().next().ok_or_else(|| {
        invalid(conf_dir, "no CNI network configuration yet: the cluster's network plugin installs one first")
    })
}

/// Copies `plugin_binary` to `bin_dir/mesh-cni` and chains `plugin_conf` (our entry,
/// with `"type": "mesh-cni"`) into the node's network configuration in `conf_dir`.
/// Returns the configuration file written.
pub fn install(plugin_binary: &Path, bin_dir: &Path, conf_dir: &Path, plugin_conf: &Value) -> Result<PathBuf, Error> {
    let bytes = std::fs::read(plugin_binary).map_err(io(plugin_binary))?;
    std::fs::create_dir_all(bin_dir).map_err(io(bin_dir))?;
    write_atomically(&bin_dir.join(PLUGIN_TYPE), &bytes, 0o755)?;

    let path = primary_conf(conf_dir)?;
    let text = std::fs::read_to_string(&path).map_err(io(&path))?;
    let conf: Value = serde_json::from_str(&text).map_err(|e| invalid(&path, e.to_string()))?;
    let mut list = if conf.get("plugins").is_some() {
        conf
    } else {
        // A single plugin: the list holds it, with the name and version moved up.
        let mut plugin = conf.clone();
        if let Some(o) = plugin.as_object_mut() {
            o.remove("cniVersion");
            o.remove("name");
        }
        json!({"cniVersion": conf.get("cniVersion").cloned().unwrap_or(json!("1.0.0")),
            "name": conf.get("name").cloned().unwrap_or(json!("k8s-pod-network")), "plugins": [plugin]})
    };
    let plugins = list
        .get_mut("plugins")
        .and_then(Value::as_array_mut)
        .ok_or_else(|| invalid(&path, "\"plugins\" is not a list"))?;
    let mut entry = plugin_conf.clone();
    entry["type"] = json!(PLUGIN_TYPE);
    match plugins.iter_mut().find(|p| p.get("type").and_then(Value::as_str) == Some(PLUGIN_TYPE)) {
        Some(existing) => *existing = entry,
        None => plugins.push(entry),
    }
    let target = path.with_extension("conflist");
    let text = serde_json::to_string_pretty(&list).map_err(|e| invalid(&path, e.to_string()))?;
    write_atomically(&target, text.as_bytes(), 0o644)?;
    if target != path {
        std::fs::remove_file(&path).map_err(io(&path))?;
    }
    Ok(target)
}

/// Removes the mesh's entry from the node's network configuration (the binary stays:
/// a runtime may be running it).
pub fn uninstall(conf_dir: &Path) -> Result<(), Error> {
    let path = primary_conf(conf_dir)?;
    let text = std::fs::read_to_string(&path).map_err(io(&path))?;
    let mut list: Value = serde_json::from_str(&text).map_err(|e| invalid(&path, e.to_string()))?;
    let Some(plugins) = list.get_mut("plugins").and_then(Value::as_array_mut) else { return Ok(()) };
    let before = plugins.len();
    plugins.retain(|p| p.get("type").and_then(Value::as_str) != Some(PLUGIN_TYPE));
    if plugins.len() == before {
        return Ok(());
    }
    let text = serde_json::to_string_pretty(&list).map_err(|e| invalid(&path, e.to_string()))?;
    write_atomically(&path, text.as_bytes(), 0o644)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ours() -> Value {
        json!({"socket": "/var/run/mesh/cni.sock", "excludeNamespaces": ["kube-system", "istio-system"]})
    }

    #[test]
    fn chains_after_the_network_plugin_once_and_comes_out_again() {
        let t = tempfile::tempdir().unwrap();
        let (bin, conf) = (t.path().join("bin"), t.path().join("net.d"));
        std::fs::create_dir_all(&conf).unwrap();
        let binary = t.path().join("mesh-cni-build");
        std::fs::write(&binary, b"\x7fELF").unwrap();
        let flannel = json!({"name": "cbr0", "cniVersion": "1.0.0", "plugins": [
            {"type": "flannel", "delegate": {"hairpinMode": true}}, {"type": "portmap", "capabilities": {"portMappings": true}}]});
        std::fs::write(conf.join("10-flannel.conflist"), flannel.to_string()).unwrap();
        std::fs::write(conf.join("99-loopback.conf"), r#"{"cniVersion": "1.0.0", "name": "lo", "type": "loopback"}"#)
            .unwrap();

        let written = install(&binary, &bin, &conf, &ours()).unwrap();
        assert_eq!(written, conf.join("10-flannel.conflist"), "the first file by name is the one the runtime uses");
        install(&binary, &bin, &conf, &ours()).unwrap();
        let list: Value = serde_json::from_str(&std::fs::read_to_string(&written).unwrap()).unwrap();
        let types: Vec<&str> =
            list["plugins"].as_array().unwrap().iter().map(|p| p["type"].as_str().unwrap()).collect();
        assert_eq!(types, ["flannel", "portmap", "mesh-cni"], "appended once, after the network plugins");
        assert_eq!(list["plugins"][2]["socket"], "/var/run/mesh/cni.sock");
        let mode = std::fs::metadata(bin.join("mesh-cni")).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o755);

        uninstall(&conf).unwrap();
        let list: Value = serde_json::from_str(&std::fs::read_to_string(&written).unwrap()).unwrap();
        assert_eq!(list, flannel, "uninstall gives back the network plugin's own list");
    }

    #[test]
    fn a_single_plugin_conf_becomes_a_list() {
        let t = tempfile::tempdir().unwrap();
        let conf = t.path().join("net.d");
        std::fs::create_dir_all(&conf).unwrap();
        let binary = t.path().join("mesh-cni-build");
        std::fs::write(&binary, b"x").unwrap();
        std::fs::write(
            conf.join("10-bridge.conf"),
            r#"{"cniVersion": "0.4.0", "name": "bridge", "type": "bridge", "bridge": "cni0"}"#,
        )
        .unwrap();
        let written = install(&binary, &t.path().join("bin"), &conf, &ours()).unwrap();
        assert_eq!(written, conf.join("10-bridge.conflist"));
        assert!(!conf.join("10-bridge.conf").exists(), "the runtime must not read both");
        let list: Value = serde_json::from_str(&std::fs::read_to_string(&written).unwrap()).unwrap();
        assert_eq!(list["cniVersion"], "0.4.0");
        assert_eq!(list["plugins"][0], json!({"type": "bridge", "bridge": "cni0"}));
        assert_eq!(list["plugins"][1]["type"], "mesh-cni");

        let empty = t.path().join("empty");
        std::fs::create_dir_all(&empty).unwrap();
        let e = install(&binary, &t.path().join("bin"), &empty, &ours()).unwrap_err().to_string();
        assert!(e.contains("no CNI network configuration yet"), "{e}");
    }
}

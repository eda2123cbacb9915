//! The CNI plugin (`mesh-cni`), chained after the cluster's network plugin: the
//! container runtime runs it with the CNI environment (`CNI_COMMAND`, `CNI_NETNS`,
//! `CNI_ARGS`, ...) and the network configuration on stdin, `prevResult` included.
//!
//! `ADD` sends the agent the pod's identity (the `K8S_POD_*` arguments the runtime
//! sets), the addresses the network plugin gave it and its namespace (the fd), and
//! passes `prevResult` on only once the agent says the pod is captured or not in the
//! mesh. Anything else fails the sandbox, so the pod never starts uncaptured: an agent
//! that is restarting makes new pods wait (CNI code 11, try again later), never run
//! around the mesh. Namespaces listed in `excludeNamespaces` (the mesh's own, and
//! kube-system) never wait for the agent, so the agent's own pod can always start.

use std::collections::HashMap;
use std::io::Read as _;
use std::net::IpAddr;
use std::os::fd::AsFd as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde_json::{Value, json};

use super::protocol::{Reply, Request};
use super::{DEFAULT_SOCKET, fdpass};

/// CNI versions this plugin speaks (its results are `prevResult`, passed on).
const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];
/// How long `ADD` waits for the agent's answer (the agent answers within 40 s).
const AGENT_TIMEOUT: Duration = Duration::from_secs(45);

/// CNI error codes (spec, "Error codes").
mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const INVALID_CONFIG: u32 = 4;
    pub const INVALID_ENV: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    /// Plugin-specific (100 and up): the agent refused the pod.
    pub const NOT_CAPTURED: u32 = 100;
}

/// A CNI error result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniError {
    /// CNI error code.
    pub code: u32,
    /// Short message.
    pub msg: String,
    /// What to do about it.
    pub details: String,
}

impl CniError {
    fn new(code: u32, msg: impl Into<String>, details: impl Into<String>) -> Self {
        Self { code, msg: msg.into(), details: details.into() }
    }
}

/// The network configuration the runtime passes on stdin.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct NetConf {
    cni_version: String,
    #[serde(rename = "type")]
    kind: String,
    /// The agent's socket.
    #[serde(default)]
    socket: Option<PathBuf>,
    /// Namespaces whose pods never wait for the agent.
    #[serde(default)]
    exclude_namespaces: Vec<String>,
    /// The network plugin's result.
    #[serde(default)]
    prev_result: Option<Value>,
}

/// Runs one CNI command: `env` is the process environment, `stdin` the network
/// configuration. Returns what to print on success (nothing for DEL and CHECK).
pub fn run(env: &HashMap<String, String>, stdin: &[u8]) -> Result<Option<String>, (String, CniError)> {
    let command = env.get("CNI_COMMAND").map(String::as_str).unwrap_or("");
    if command == "VERSION" {
        let v = json!({"cniVersion": "1.0.0", "supportedVersions": SUPPORTED_VERSIONS});
        return Ok(Some(v.to_string()));
    }
    let conf: NetConf = serde_json::from_slice(stdin).map_err(|e| {
        ("1.0.0".to_string(), CniError::new(code::INVALID_CONFIG, "invalid network configuration", e.to_string()))
    })?;
    let version = conf.cni_version.clone();
    let fail = |e: CniError| (version.clone(), e);
    if !SUPPORTED_VERSIONS.contains(&version.as_str()) {
        return Err(fail(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!("CNI version {version} is not supported"),
            format!("supported: {}", SUPPORTED_VERSIONS.join(", ")),
        )));
    }
    if conf.kind != super::PLUGIN_TYPE {
        return Err(fail(CniError::new(
            code::INVALID_CONFIG,
            format!("configuration type {:?} is not {}", conf.kind, super::PLUGIN_TYPE),
            "",
        )));
    }
    match command {
        "ADD" => add(env, &conf).map(Some).map_err(fail),
        "DEL" => {
            del(env, &conf);
            Ok(None)
        }
        // The agent keeps its own pods captured; there is nothing more to check here.
        "CHECK" | "GC" | "STATUS" => Ok(None),
        other => Err(fail(CniError::new(code::INVALID_ENV, format!("unknown CNI_COMMAND {other:?}"), ""))),
    }
}

/// `K8S_POD_NAMESPACE`, `K8S_POD_NAME`, `K8S_POD_UID` from `CNI_ARGS`.
fn pod_args(env: &HashMap<String, String>) -> HashMap<String, String> {
    env.get("CNI_ARGS")
        .map(|a| {
            a.split(';')
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
                .collect()
        })
        .unwrap_or_default()
}

/// The addresses in `prevResult.ips[].address` (`10.1.2.3/24`).
fn prev_ips(prev: &Value) -> Vec<IpAddr> {
    prev.get("ips")
        .and_then(Value::as_array)
        .map(|ips| ips.iter().filter_map(|ip| ip.get("address")?.as_str()?.split('/').next()?.parse().ok()).collect())
        .unwrap_or_default()
}

fn socket(conf: &NetConf) -> PathBuf {
    conf.socket.clone().unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET))
}

fn add(env: &HashMap<String, String>, conf: &NetConf) -> Result<String, CniError> {
    let args = pod_args(env);
    let arg = |k: &str| args.get(k).cloned().unwrap_or_default();
    let (namespace, name, uid) = (arg("K8S_POD_NAMESPACE"), arg("K8S_POD_NAME"), arg("K8S_POD_UID"));
    let Some(prev) = &conf.prev_result else {
        return Err(CniError::new(
            code::INVALID_CONFIG,
            "mesh-cni must be chained after a network plugin (no prevResult)",
            "add it to the plugins list of the node's .conflist, after the network plugin",
        ));
    };
    let result = prev.to_string();
    if conf.exclude_namespaces.contains(&namespace) {
        return Ok(result);
    }
    if namespace.is_empty() || name.is_empty() || uid.is_empty() {
        return Err(CniError::new(
            code::INVALID_ENV,
            "CNI_ARGS lacks K8S_POD_NAMESPACE, K8S_POD_NAME or K8S_POD_UID",
            "the mesh identifies pods by UID; use a container runtime that passes it (containerd, CRI-O)",
        ));
    }
    let netns_path = env.get("CNI_NETNS").map(PathBuf::from).unwrap_or_default();
    let socket = socket(conf);
    if !socket.exists() {
        // The agent has never run on this node (or the mesh was removed from it): no
        // pod here can be captured, and none is expected to be.
        return Ok(result);
    }
    // Before the agent enrolls the pod: its container cannot write the namespace's
    // sysctls. Best effort: without it the agent delivers from the pod's own address.
    if let Err(e) = crate::dataplane::Netns::init_host()
        .and_then(|()| crate::dataplane::Netns::open(&netns_path))
        .and_then(|ns| crate::dataplane::transparent::enable_mark_inheritance(&ns))
    {
        eprintln!("mesh-cni: pod {namespace}/{name}: tcp_fwmark_accept and fwmark_reflect not set: {e}");
    }
    let request = Request::Add { uid, namespace: namespace.clone(), name: name.clone(), ips: prev_ips(prev) };
    match ask_agent(&socket, &request, Some(&netns_path)) {
        Ok(Reply::Enrolled) | Ok(Reply::NotInMesh { .. }) => Ok(result),
        Ok(Reply::Failed { reason }) => Err(CniError::new(
            code::NOT_CAPTURED,
            format!("pod {namespace}/{name} cannot be captured by the mesh"),
            reason,
        )),
        Ok(other) => Err(CniError::new(code::NOT_CAPTURED, format!("unexpected agent reply {other:?}"), "")),
        Err(e) if in_mesh_when_last_seen(&socket, &namespace) => Err(CniError::new(
            code::TRY_AGAIN_LATER,
            format!("the mesh agent did not answer for pod {namespace}/{name}"),
            format!("{e}; the pod starts once the agent on this node is running"),
        )),
        // A namespace the agent did not enroll when it last ran: nothing to capture.
        Err(_) => Ok(result),
    }
}

/// Whether `namespace` was enrolled when the agent last wrote its hint file next to the
/// socket ([`super::write_enrolled_namespaces`]). Without the file, every namespace is
/// taken to be enrolled: waiting is the safe side.
fn in_mesh_when_last_seen(socket: &Path, namespace: &str) -> bool {
    match std::fs::read_to_string(super::enrolled_namespaces_file(socket)) {
        Ok(text) => text.lines().any(|l| l.trim() == namespace),
        Err(_) => true,
    }
}

fn del(env: &HashMap<String, String>, conf: &NetConf) {
    let uid = pod_args(env).get("K8S_POD_UID").cloned().unwrap_or_default();
    let socket = socket(conf);
    if uid.is_empty() || !socket.exists() {
        return;
    }
    // DEL must succeed whatever happens (the runtime retries it forever otherwise);
    // the agent also notices pods that are gone from the API.
    if let Err(e) = ask_agent(&socket, &Request::Del { uid }, None) {
        eprintln!("mesh-cni: DEL: {e}");
    }
}

fn ask_agent(socket: &Path, request: &Request, netns: Option<&Path>) -> std::io::Result<Reply> {
    let netns = netns.map(std::fs::File::open).transpose()?;
    let stream = std::os::unix::net::UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(AGENT_TIMEOUT))?;
    stream.set_write_timeout(Some(AGENT_TIMEOUT))?;
    fdpass::send_with_fd(stream.as_fd(), &request.encode(), netns.as_ref().map(|f| f.as_fd()))?;
    let mut line = Vec::new();
    (&stream).take(64 * 1024).read_to_end(&mut line)?;
    Reply::decode(&line).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))
}

/// The CNI error document printed on stdout.
pub fn error_json(version: &str, e: &CniError) -> String {
    json!({"cniVersion": version, "code": e.code, "msg": e.msg, "details": e.details}).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(command: &str, args: &str) -> HashMap<String, String> {
        HashMap::from([
            ("CNI_COMMAND".to_string(), command.to_string()),
            ("CNI_ARGS".to_string(), args.to_string()),
            ("CNI_NETNS".to_string(), "/proc/self/ns/net".to_string()),
        ])
    }

    const ARGS: &str = "IgnoreUnknown=1;K8S_POD_NAMESPACE=production;K8S_POD_NAME=web;K8S_POD_INFRA_CONTAINER_ID=abc;K8S_POD_UID=5c1b7a8e-0d2f-4a61-9f31-6b2e1e0c9a77";

    fn conf(socket: &Path) -> Vec<u8> {
        json!({"cniVersion": "1.0.0", "name": "k8s-pod-network", "type": "mesh-cni",
            "socket": socket, "excludeNamespaces": ["kube-system"],
            "prevResult": {"cniVersion": "1.0.0", "interfaces": [{"name": "eth0"}],
                "ips": [{"address": "10.10.1.5/24", "interface": 0}]}})
        .to_string()
        .into_bytes()
    }

    #[test]
    fn version_and_configuration_errors_follow_the_spec() {
        let out = run(&env("VERSION", ""), b"").unwrap().unwrap();
        assert!(out.contains("\"supportedVersions\"") && out.contains("1.0.0"), "{out}");
        let (_, e) = run(&env("ADD", ARGS), b"{").unwrap_err();
        assert_eq!(e.code, code::INVALID_CONFIG);
        let bad = br#"{"cniVersion": "9.9.9", "type": "mesh-cni"}"#;
        assert_eq!(run(&env("ADD", ARGS), bad).unwrap_err().1.code, code::INCOMPATIBLE_VERSION);
        let unchained = br#"{"cniVersion": "1.0.0", "type": "mesh-cni"}"#;
        assert_eq!(run(&env("ADD", ARGS), unchained).unwrap_err().1.code, code::INVALID_CONFIG);
    }

    #[test]
    fn an_agent_that_does_not_answer_keeps_the_pod_from_starting() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("cni.sock");
        // The socket of an agent that has run here and is down now.
        drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
        let (_, e) = run(&env("ADD", ARGS), &conf(&socket)).unwrap_err();
        assert_eq!(e.code, code::TRY_AGAIN_LATER, "{e:?}");
        assert!(e.msg.contains("production/web"), "{e:?}");
        // With the agent's last word on which namespaces are enrolled, only those wait.
        crate::cni::write_enrolled_namespaces(&socket, ["production"]).unwrap();
        assert!(run(&env("ADD", ARGS), &conf(&socket)).is_err());
        let default_ns = ARGS.replace("K8S_POD_NAMESPACE=production", "K8S_POD_NAMESPACE=default");
        assert!(run(&env("ADD", &default_ns), &conf(&socket)).is_ok(), "a pod outside the mesh starts");

        // Excluded namespaces never wait; DEL always succeeds.
        let kube_system = ARGS.replace("K8S_POD_NAMESPACE=production", "K8S_POD_NAMESPACE=kube-system");
        let out = run(&env("ADD", &kube_system), &conf(&socket)).unwrap().unwrap();
        assert!(out.contains("10.10.1.5/24"), "prevResult passed on: {out}");
        assert_eq!(run(&env("DEL", ARGS), &conf(&socket)).unwrap(), None);

        // A pod without its UID cannot be identified.
        let no_uid = ARGS.replace(";K8S_POD_UID=5c1b7a8e-0d2f-4a61-9f31-6b2e1e0c9a77", "");
        assert_eq!(run(&env("ADD", &no_uid), &conf(&socket)).unwrap_err().1.code, code::INVALID_ENV);
    }

    #[test]
    fn the_agents_answer_decides_and_prev_result_is_passed_on() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("cni.sock");
        let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        let agent = std::thread::spawn(move || {
            let mut seen = Vec::new();
            for reply in [Reply::Enrolled, Reply::Failed { reason: "no cgroup for pod uid x".into() }] {
                let (conn, _) = listener.accept().unwrap();
                let mut buf = [0u8; 4096];
                let (n, fd) = fdpass::recv_with_fd(conn.as_fd(), &mut buf).unwrap();
                seen.push((Request::decode(&buf[..n]).unwrap(), fd.is_some()));
                std::io::Write::write_all(&mut &conn, &reply.encode()).unwrap();
            }
            seen
        });
        let out = run(&env("ADD", ARGS), &conf(&socket)).unwrap().unwrap();
        assert!(out.contains("10.10.1.5/24"), "{out}");
        let (_, e) = run(&env("ADD", ARGS), &conf(&socket)).unwrap_err();
        assert_eq!((e.code, e.details.as_str()), (code::NOT_CAPTURED, "no cgroup for pod uid x"));
        let seen = agent.join().unwrap();
        assert_eq!(
            seen[0],
            (
                Request::Add {
                    uid: "5c1b7a8e-0d2f-4a61-9f31-6b2e1e0c9a77".into(),
                    namespace: "production".into(),
                    name: "web".into(),
                    ips: vec!["10.10.1.5".parse().unwrap()],
                },
                true
            ),
            "identity from CNI_ARGS, addresses from prevResult, the namespace as a descriptor"
        );
    }
}

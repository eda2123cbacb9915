//! The lab: a cluster of network namespaces on one machine.
//!
//! Every node is a netns with a bridge (`br0`) for its pods; nodes meet on a "wire"
//! bridge in one more netns, which is where the tunnel's bytes can be captured. Every pod
//! is a netns (named after the pod, or `<name>.<namespace>` when two pods share a name)
//! plus a cgroup laid out as kubelet's cgroupfs driver does it
//! (`<node cgroup>/kubepods/besteffort/pod<uid>`), under its node's cgroup, where the
//! agent's capture programs are attached. Nothing in the lab has a route to any outside
//! network: the lab's namespaces are never connected to the host's.
//!
//! The lab starts a pod as a container runtime does: network namespace and cgroup
//! first, then the CNI plugin chain (`mesh-cni`, which hands the pod to its node's
//! agent and answers only once the pod is captured or not in the mesh), and the pod's
//! app only after that. A pod the plugin refuses never starts, and `status` says why.
//!
//! Everything the lab creates is recorded in `<state dir>/state.json`, and `down` removes
//! exactly that: processes by pid and by the lab's own cgroups, namespaces, cgroups,
//! pinned maps and the state directory.

use std::collections::BTreeMap;
use std::fs;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};
use serde_yaml::Value;

use crate::sys::{cgroup2_root, output, run, run_quiet};

/// Where [`Lab::start_prometheus`]'s Prometheus listens, in the `outside` pod's netns.
pub const PROMETHEUS_ADDR: &str = "127.0.0.1:19090";

/// Default state directory.
pub const DEFAULT_STATE_DIR: &str = "/run/meshlab";
/// Name of the cgroup subtree holding every lab cgroup.
const CGROUP_NAME: &str = "meshlab";
/// Where each node's maps and links are pinned.
const PIN_ROOT: &str = "/sys/fs/bpf/meshlab";
/// The netns holding the bridge between nodes, where inter-node bytes can be captured.
pub const WIRE_NETNS: &str = "meshlab-wire";
/// The wire's subnet: node i is 10.255.0.i.
const WIRE_PREFIX: [u8; 3] = [10, 255, 0];
/// The CA service's netns, on the wire like a node, as a Deployment runs off the nodes.
pub const CA_NETNS: &str = "meshlab-ca";
/// The CA service's address on the wire, and its port (Istio's CA port).
pub const CA_ADDR: &str = "10.255.0.250:15012";
/// [`CA_ADDR`]'s address.
const CA_IP: Ipv4Addr = Ipv4Addr::new(10, 255, 0, 250);
/// [`CA_ADDR`]'s port.
const CA_PORT: u16 = 15012;
/// The DNS name in the CA service's certificate, which agents check.
pub const CA_SERVER_NAME: &str = "mesh-ca.istio-system.svc";
/// A client outside the cluster, on the wire like a load balancer's clients, with a
/// route to every node's pods: what reaches the gateway pods.
pub const CLIENT_NETNS: &str = "meshlab-client";
/// The outside client's address.
pub const CLIENT_ADDR: &str = "10.255.0.200";
/// The lab's cluster DNS: agents forward to it what their DNS proxies do not answer,
/// and a pod given a resolv.conf ([`Lab::use_cluster_dns`]) asks it. Nothing listens
/// there unless a test starts a server in the outside client's netns (which also
/// stands for "the internet"): pods have no resolv.conf of their own by default, as a
/// resolver that waits on a silent server stalls tools that never needed one.
pub const CLUSTER_DNS: &str = CLIENT_ADDR;
/// The image name that makes a lab pod run the mesh's gateway instead of the echo app.
pub const GATEWAY_IMAGE: &str = "mesh-gateway";
/// The TLS Secret the lab writes for the reference Gateway's `credentialName`, in the
/// gateway pods' namespace, signed by the lab's edge CA (`edge-ca.pem` in the state
/// directory) for `myapp.example.com` and `*.example.com`.
pub const GATEWAY_SECRET: &str = "myapp-tls-secret";
/// How long to wait for an agent or an app to come up.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// How to build the lab.
#[derive(Debug, Clone)]
pub struct Options {
    /// Directory of manifests (Namespaces, Pods, Services).
    pub manifests: PathBuf,
    /// State directory.
    pub state_dir: PathBuf,
    /// The `mesh-agent` binary.
    pub agent_bin: PathBuf,
    /// The `mesh-echo` binary.
    pub echo_bin: PathBuf,
    /// `MESH_LOG` for the agents.
    pub agent_log: String,
    /// More environment for the agents (`MESH_*` settings such as `MESH_CERT_TTL`).
    pub agent_env: BTreeMap<String, String>,
    /// Which cluster of the lab this is.
    pub placement: Placement,
    /// A plug-in CA directory (Istio's `cacerts` files) the CA service signs with;
    /// None: the CA makes its own root.
    pub plugin_ca: Option<PathBuf>,
}

/// Where one cluster of the lab sits: what differs between the clusters of a
/// multi-cluster lab (`cargo xtask lab up --clusters 2`), which share the wire. The
/// default is the single-cluster lab's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    /// Istio's cluster name (`MESH_CLUSTER_ID`); empty: the mesh's default.
    pub cluster: String,
    /// Istio's network (`MESH_NETWORK`); empty: none named.
    pub network: String,
    /// Node `i` (from 0) is at `10.255.0.<wire_base + i>` on the wire.
    pub wire_base: u8,
    /// The CA service's netns.
    pub ca_netns: String,
    /// The CA service's address on the wire (its API server double's too, in a
    /// multi-cluster lab).
    pub ca_ip: Ipv4Addr,
    /// Whether this cluster's lab makes (and removes) the wire and the outside client:
    /// the first cluster's does.
    pub owns_wire: bool,
}

impl Default for Placement {
    fn default() -> Self {
        Self {
            cluster: String::new(),
            network: String::new(),
            wire_base: 1,
            ca_netns: CA_NETNS.into(),
            ca_ip: CA_IP,
            owns_wire: true,
        }
    }
}

impl Placement {
    /// Cluster `n` (from 1) of a multi-cluster lab: `cluster<n>` on `network<n>`.
    pub fn cluster(n: u8) -> Self {
        let first = n == 1;
        Self {
            cluster: format!("cluster{n}"),
            network: format!("network{n}"),
            wire_base: 1 + 10 * (n - 1),
            ca_netns: if first { CA_NETNS.into() } else { format!("{CA_NETNS}{n}") },
            ca_ip: Ipv4Addr::new(WIRE_PREFIX[0], WIRE_PREFIX[1], WIRE_PREFIX[2], 251 - n),
            owns_wire: first,
        }
    }

    /// The CA service's `host:port`.
    pub fn ca_addr(&self) -> String {
        format!("{}:{CA_PORT}", self.ca_ip)
    }

    /// The cgroup of the CA service (and its API server double).
    fn ca_cgroup(&self) -> String {
        if self.ca_netns == CA_NETNS { format!("{CGROUP_NAME}/ca") } else { format!("{CGROUP_NAME}/{}", self.ca_netns) }
    }

    /// The CA's end of its veth, in the wire's netns.
    fn ca_wire_end(&self) -> String {
        if self.ca_netns == CA_NETNS {
            "nwca".into()
        } else {
            format!("nw{}", self.ca_netns.trim_start_matches("meshlab-"))
        }
    }

    /// The settings the cluster's agents and gateways run with.
    fn agent_env(&self) -> BTreeMap<String, String> {
        let mut env = BTreeMap::new();
        if !self.cluster.is_empty() {
            env.insert("MESH_CLUSTER_ID".into(), self.cluster.clone());
        }
        if !self.network.is_empty() {
            env.insert("MESH_NETWORK".into(), self.network.clone());
        }
        env
    }
}

/// Where a cluster's API server double listens (in its CA's netns), for the other
/// clusters' remote secrets.
pub const API_PORT: u16 = 6443;

/// A node of the lab.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Node {
    /// Node name (`spec.nodeName` of its pods).
    pub name: String,
    /// The node's netns (the agent runs here).
    pub netns: String,
    /// Address on the wire.
    pub wire_ip: Ipv4Addr,
    /// Pod subnet, `a.b.c.0/24`.
    pub subnet: String,
    /// Gateway of the pod subnet (on the node's bridge).
    pub gateway: Ipv4Addr,
    /// cgroup (relative to the cgroup2 root) holding the node's pods.
    pub cgroup: String,
    /// cgroup of the node's agent process.
    pub agent_cgroup: String,
    /// bpffs pin directory.
    pub pin_dir: PathBuf,
    /// Agent pid, when running.
    pub agent_pid: Option<u32>,
    /// The kubelet stand-in's pid, when running.
    #[serde(default)]
    pub kubelet_pid: Option<u32>,
    /// The agent's CNI socket.
    #[serde(default)]
    pub cni_socket: PathBuf,
}

impl Node {
    /// The cgroup (relative to the cgroup2 root) of the node's kubelet stand-in: what
    /// the agent is told is the kubelet (`--kubelet-cgroup`).
    pub fn kubelet_cgroup(&self) -> String {
        format!("{CGROUP_NAME}/kubelet-{}", self.name)
    }

    /// A cgroup for other processes of the node (not the kubelet, not a pod).
    pub fn host_cgroup(&self) -> String {
        format!("{CGROUP_NAME}/host-{}", self.name)
    }

    /// The node's IPv6 pod subnet, `fd00:a:b:c::/64` for the IPv4 subnet `a.b.c.0/24`:
    /// every lab node is dual-stack, its pods are when their manifest says so.
    pub fn subnet6(&self) -> String {
        format!("{}/64", self.v6(0))
    }

    /// The IPv6 gateway of the pod subnet (on the node's bridge).
    pub fn gateway6(&self) -> Ipv6Addr {
        self.v6(1)
    }

    /// The node's IPv6 address on the wire, `fd00:ff::<i>` for `10.255.0.<i>`.
    pub fn wire_ip6(&self) -> Ipv6Addr {
        Ipv6Addr::new(0xfd00, 0xff, 0, 0, 0, 0, 0, u16::from(self.wire_ip.octets()[3]))
    }

    fn v6(&self, host: u16) -> Ipv6Addr {
        let o = self.gateway.octets();
        Ipv6Addr::new(0xfd00, u16::from(o[0]), u16::from(o[1]), u16::from(o[2]), 0, 0, 0, host)
    }
}

/// A pod of the lab.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PodInfo {
    /// Pod name.
    pub name: String,
    /// `metadata.uid`: how the agent finds the pod's cgroup.
    #[serde(default)]
    pub uid: String,
    /// Its network namespace (`ip netns` name): the pod name, or `<name>.<namespace>`
    /// when another lab pod has the same name.
    #[serde(default)]
    pub netns: String,
    /// Namespace.
    pub namespace: String,
    /// Node.
    pub node: String,
    /// Address.
    pub ip: Ipv4Addr,
    /// IPv6 address of a dual-stack pod (`status.podIPs`), in its node's IPv6 subnet
    /// ([`Node::subnet6`]).
    #[serde(default)]
    pub ip6: Option<Ipv6Addr>,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// cgroup, relative to the cgroup2 root.
    pub cgroup: String,
    /// Host-side veth name in the node netns.
    pub veth: String,
    /// Echo app pid.
    pub app_pid: Option<u32>,
    /// The first container's image: [`GATEWAY_IMAGE`] runs the gateway.
    #[serde(default)]
    pub image: Option<String>,
    /// Why the CNI plugin refused the pod, which then never started.
    #[serde(default)]
    pub failed: Option<String>,
}

impl PodInfo {
    /// Whether the pod runs the mesh's gateway.
    pub fn runs_gateway(&self) -> bool {
        self.image.as_deref() == Some(GATEWAY_IMAGE)
    }
}

/// The recorded state of a running lab.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Lab {
    /// State directory.
    pub state_dir: PathBuf,
    /// cgroup2 mount.
    pub cgroup_root: PathBuf,
    /// Nodes.
    pub nodes: Vec<Node>,
    /// Pods.
    pub pods: Vec<PodInfo>,
    /// Service name -> cluster IP, for hosts files.
    pub services: BTreeMap<String, (String, String)>,
    /// The agent binary used.
    pub agent_bin: PathBuf,
    /// Agents' log filter.
    pub agent_log: String,
    /// More environment for the agents, kept across restarts.
    #[serde(default)]
    pub agent_env: BTreeMap<String, String>,
    /// Helper processes (benchmark servers, sidecar proxies) started in pod netns.
    #[serde(default)]
    pub helpers: Vec<Helper>,
    /// The echo app binary pods run.
    #[serde(default)]
    pub echo_bin: PathBuf,
    /// The CA service's pid, when running.
    #[serde(default)]
    pub ca_pid: Option<u32>,
    /// Which cluster of the lab this is.
    #[serde(default)]
    pub placement: Placement,
    /// The API server double's pid (a multi-cluster lab's), when running.
    #[serde(default)]
    pub api_pid: Option<u32>,
}

/// A process the lab started next to a pod, in a cgroup of its own outside every
/// node's subtree (so no agent captures it), as a sidecar or a benchmark tool runs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Helper {
    /// Unique name; also its cgroup's name.
    pub name: String,
    /// Pod whose netns it runs in.
    pub pod: String,
    /// cgroup, relative to the cgroup2 root.
    pub cgroup: String,
    /// Pid.
    pub pid: u32,
}

/// Copies Istio's plug-in CA files (`ca-cert.pem`, `ca-key.pem`, `root-cert.pem`,
/// `cert-chain.pem`) from `from` into the CA service's directory, the key 0600.
fn copy_plugin_ca(from: &Path, ca_dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt as _;
    fs::DirBuilder::new().recursive(true).mode(0o700).create(ca_dir)?;
    for name in ["ca-cert.pem", "root-cert.pem", "cert-chain.pem"] {
        fs::copy(from.join(name), ca_dir.join(name)).with_context(|| format!("plug-in CA {name}"))?;
    }
    private(&ca_dir.join("ca-key.pem"), &fs::read_to_string(from.join("ca-key.pem")).context("plug-in CA key")?)
}

/// A lab pod from its manifest (its place in the lab is filled in later).
fn pod_info(v: &Value) -> anyhow::Result<PodInfo> {
    let s = |path: &[&str]| -> Option<String> {
        let mut cur = v;
        for p in path {
            cur = cur.get(*p)?;
        }
        cur.as_str().map(str::to_owned)
    };
    let name = s(&["metadata", "name"]).context("Pod without metadata.name")?;
    let namespace = s(&["metadata", "namespace"]).unwrap_or_else(|| "default".into());
    let uid = s(&["metadata", "uid"]).with_context(|| {
        format!("Pod {namespace}/{name}: metadata.uid is required in the lab (the agent finds pods by UID only)")
    })?;
    let node = s(&["spec", "nodeName"]).with_context(|| format!("Pod {name}: spec.nodeName is required in the lab"))?;
    let ip: Ipv4Addr = s(&["status", "podIP"])
        .with_context(|| format!("Pod {name}: status.podIP is required in the lab"))?
        .parse()
        .with_context(|| format!("Pod {name}: status.podIP must be IPv4"))?;
    // A dual-stack pod lists its IPv6 address in `status.podIPs`.
    let ip6 = v
        .get("status")
        .and_then(|st| st.get("podIPs"))
        .and_then(Value::as_sequence)
        .into_iter()
        .flatten()
        .filter_map(|e| e.get("ip")?.as_str()?.parse::<Ipv6Addr>().ok())
        .next();
    let labels = v
        .get("metadata")
        .and_then(|m| m.get("labels"))
        .and_then(Value::as_mapping)
        .map(|m| m.iter().filter_map(|(k, v)| Some((k.as_str()?.to_string(), v.as_str()?.to_string()))).collect())
        .unwrap_or_default();
    Ok(PodInfo {
        name,
        uid,
        netns: String::new(),
        namespace,
        node,
        ip,
        ip6,
        labels,
        cgroup: String::new(),
        veth: String::new(),
        app_pid: None,
        image: v
            .get("spec")
            .and_then(|s| s.get("containers"))
            .and_then(|c| c.get(0))
            .and_then(|c| c.get("image"))
            .and_then(Value::as_str)
            .map(str::to_owned),
        failed: None,
    })
}

/// Manifests read for the topology.
struct Manifests {
    pods: Vec<PodInfo>,
    services: BTreeMap<String, (String, String)>,
    /// `namespace/pod` -> `spec.serviceAccountName`.
    accounts: BTreeMap<String, String>,
}

fn read_manifests(dir: &Path) -> anyhow::Result<Manifests> {
    let mut pods = Vec::new();
    let mut services = BTreeMap::new();
    let mut accounts = BTreeMap::new();
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .with_context(|| format!("reading manifests in {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    for file in files {
        let text = fs::read_to_string(&file)?;
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let v: Value = serde::Deserialize::deserialize(doc).with_context(|| format!("{}", file.display()))?;
            let s = |path: &[&str]| -> Option<String> {
                let mut cur = &v;
                for p in path {
                    cur = cur.get(*p)?;
                }
                cur.as_str().map(str::to_owned)
            };
            let ns = s(&["metadata", "namespace"]).unwrap_or_else(|| "default".into());
            match s(&["kind"]).as_deref() {
                Some("Pod") => {
                    let pod = pod_info(&v)?;
                    if let Some(sa) = s(&["spec", "serviceAccountName"]) {
                        accounts.insert(format!("{}/{}", pod.namespace, pod.name), sa);
                    }
                    pods.push(pod);
                }
                Some("Service") => {
                    let name = s(&["metadata", "name"]).context("Service without metadata.name")?;
                    if let Some(ip) = s(&["spec", "clusterIP"]).filter(|ip| ip != "None") {
                        services.insert(format!("{ns}/{name}"), (name, ip));
                    }
                }
                _ => {}
            }
        }
    }
    if pods.is_empty() {
        bail!("no Pod in {}", dir.display());
    }
    Ok(Manifests { pods, services, accounts })
}

impl Lab {
    /// Reads the state of a running lab.
    pub fn load(state_dir: &Path) -> anyhow::Result<Self> {
        let path = state_dir.join("state.json");
        let text = fs::read_to_string(&path)
            .with_context(|| format!("no lab is up ({} missing); run `cargo xtask lab up`", path.display()))?;
        Ok(serde_json::from_str(&text)?)
    }

    /// True when a lab state exists in `state_dir`.
    pub fn exists(state_dir: &Path) -> bool {
        state_dir.join("state.json").exists()
    }

    pub(crate) fn save(&self) -> anyhow::Result<()> {
        fs::write(self.state_dir.join("state.json"), serde_json::to_string_pretty(self)?)?;
        Ok(())
    }

    /// Starts `argv` in the CA service's netns and cgroup (the cluster's control
    /// plane), its output appended to `log`.
    pub(crate) fn spawn_in_ca(&self, argv: &[String], log: &Path) -> anyhow::Result<std::process::Child> {
        let cgroup = self.cgroup_root.join(self.placement.ca_cgroup());
        let log = fs::OpenOptions::new().create(true).append(true).open(log)?;
        in_cgroup_netns(&cgroup, &self.placement.ca_netns, Enter::Nsenter, argv)
            .env("MESH_LOG", &self.agent_log)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", argv[0]))
    }

    /// The HTTP status curl gets from the CA service's netns for `args` (its URL last),
    /// within a second; `000` when nothing answered.
    pub(crate) fn status_from_ca(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut argv = vec!["ip", "netns", "exec", &self.placement.ca_netns, "curl", "-s", "-m", "1"];
        argv.extend(["-o", "/dev/null", "-w", "%{http_code}"]);
        argv.extend(args);
        Ok(String::from_utf8_lossy(&output(&argv)?.stdout).into_owned())
    }

    /// Config directory every agent watches.
    pub fn config_dir(&self) -> PathBuf {
        self.state_dir.join("config")
    }

    /// The CA service's directory (its key is here, and nowhere an agent reads).
    pub fn ca_dir(&self) -> PathBuf {
        self.state_dir.join("ca")
    }

    /// A node agent's token for the CA service.
    pub fn agent_token_path(&self, node: &str) -> PathBuf {
        self.state_dir.join("tokens").join(node)
    }

    /// The token a scraper shows the agents' metrics port (one line, 0600).
    pub fn metrics_token_path(&self) -> PathBuf {
        self.state_dir.join("tokens").join("metrics")
    }

    /// The scraper's token.
    pub fn metrics_token(&self) -> anyhow::Result<String> {
        Ok(fs::read_to_string(self.metrics_token_path())?.trim().to_string())
    }

    /// Log file of the CA service.
    pub fn ca_log_path(&self) -> PathBuf {
        self.state_dir.join("logs").join("mesh-ca.log")
    }

    /// Log file of a node's agent.
    pub fn agent_log_path(&self, node: &str) -> PathBuf {
        self.state_dir.join("logs").join(format!("agent-{node}.log"))
    }

    /// A pod by name, or by `namespace/name` where two pods share a name.
    pub fn pod(&self, name: &str) -> anyhow::Result<&PodInfo> {
        let found: Vec<&PodInfo> = match name.split_once('/') {
            Some((ns, n)) => self.pods.iter().filter(|p| p.namespace == ns && p.name == n).collect(),
            None => self.pods.iter().filter(|p| p.name == name).collect(),
        };
        match found.as_slice() {
            [one] => Ok(one),
            [] => {
                let names: Vec<_> = self.pods.iter().map(|p| format!("{}/{}", p.namespace, p.name)).collect();
                bail!("no pod {name:?} in the lab (pods: {})", names.join(", "))
            }
            many => {
                let names: Vec<_> = many.iter().map(|p| format!("{}/{}", p.namespace, p.name)).collect();
                bail!("pod name {name:?} is ambiguous: say {}", names.join(" or "))
            }
        }
    }

    /// A node by name.
    pub fn node(&self, name: &str) -> anyhow::Result<&Node> {
        self.nodes.iter().find(|n| n.name == name).with_context(|| format!("no node {name:?} in the lab"))
    }

    /// Brings a lab up from manifests. On failure, whatever was created is removed.
    pub fn up(opts: &Options) -> anyhow::Result<Self> {
        if Lab::exists(&opts.state_dir) {
            bail!("a lab is already up in {}; run `cargo xtask lab down` first", opts.state_dir.display());
        }
        let m = read_manifests(&opts.manifests)?;
        let mut node_names: Vec<String> = m.pods.iter().map(|p| p.node.clone()).collect();
        node_names.sort();
        node_names.dedup();
        let cgroup_root = cgroup2_root()?;
        let mut nodes = Vec::new();
        for (i, name) in node_names.iter().enumerate() {
            let first = m.pods.iter().find(|p| &p.node == name).expect("node comes from a pod");
            let o = first.ip.octets();
            nodes.push(Node {
                name: name.clone(),
                netns: format!("meshlab-{name}"),
                wire_ip: Ipv4Addr::new(
                    WIRE_PREFIX[0],
                    WIRE_PREFIX[1],
                    WIRE_PREFIX[2],
                    opts.placement.wire_base + i as u8,
                ),
                subnet: format!("{}.{}.{}.0/24", o[0], o[1], o[2]),
                gateway: Ipv4Addr::new(o[0], o[1], o[2], 1),
                cgroup: format!("{CGROUP_NAME}/{name}"),
                agent_cgroup: format!("{CGROUP_NAME}/agent-{name}"),
                pin_dir: Path::new(PIN_ROOT).join(name),
                agent_pid: None,
                kubelet_pid: None,
                cni_socket: opts.state_dir.join("cni").join(name).join("cni.sock"),
            });
        }
        let mut pods: Vec<PodInfo> = Vec::new();
        for (i, p) in m.pods.into_iter().enumerate() {
            pods.push(place_pod(p, i, &pods));
        }
        fs::create_dir_all(opts.state_dir.join("logs"))?;
        let mut lab = Lab {
            state_dir: opts.state_dir.clone(),
            cgroup_root,
            nodes,
            pods,
            services: m.services,
            agent_bin: opts.agent_bin.clone(),
            agent_log: opts.agent_log.clone(),
            agent_env: opts.placement.agent_env().into_iter().chain(opts.agent_env.clone()).collect(),
            helpers: Vec::new(),
            echo_bin: opts.echo_bin.clone(),
            ca_pid: None,
            placement: opts.placement.clone(),
            api_pid: None,
        };
        // Record first, so `down` can clean up a half-built lab.
        lab.save()?;
        let built = lab.build(opts);
        if let Err(e) = built {
            // The state directory goes with the lab: show the agents' last words first.
            for n in &lab.nodes {
                if let Ok(log) = fs::read_to_string(lab.agent_log_path(&n.name)) {
                    let tail: Vec<&str> = log.lines().rev().take(15).collect();
                    eprintln!("--- agent {} log (last lines) ---", n.name);
                    for l in tail.iter().rev() {
                        eprintln!("{l}");
                    }
                }
            }
            let _ = lab.clone().down();
            return Err(e);
        }
        Ok(lab)
    }

    fn build(&mut self, opts: &Options) -> anyhow::Result<()> {
        self.build_network()?;
        self.build_cgroups()?;
        self.write_hosts()?;
        let config = self.config_dir();
        fs::create_dir_all(&config)?;
        for e in fs::read_dir(&opts.manifests)? {
            let p = e?.path();
            if p.extension().is_some_and(|e| e == "yaml" || e == "yml") {
                fs::copy(&p, config.join(p.file_name().expect("file")))?;
            }
        }
        self.write_gateway_secret()?;
        if let Some(plugin) = &opts.plugin_ca {
            copy_plugin_ca(plugin, &self.ca_dir())?;
        }
        self.start_ca()?;
        let names: Vec<String> = self.nodes.iter().map(|n| n.name.clone()).collect();
        for n in &names {
            self.start_agent(n)?;
            self.start_kubelet(n)?;
        }
        for i in 0..self.pods.len() {
            self.start_pod(i)?;
        }
        self.save()?;
        for p in self.pods.iter().filter(|p| p.failed.is_none()) {
            self.wait_app(p)?;
        }
        if let Some(p) = self.pods.iter().find(|p| p.failed.is_some()) {
            bail!("pod {}/{} did not start: {}", p.namespace, p.name, p.failed.as_deref().unwrap_or(""));
        }
        Ok(())
    }

    /// Starts the CA service in its own netns on the wire, with a fresh token for each
    /// node's agent, and waits until it answers.
    fn start_ca(&mut self) -> anyhow::Result<()> {
        let (ca_netns, wire_end) = (self.placement.ca_netns.clone(), self.placement.ca_wire_end());
        let ca_netns = ca_netns.as_str();
        run(&["ip", "netns", "add", ca_netns])?;
        run(&["ip", "-n", ca_netns, "link", "set", "lo", "up"])?;
        run(&[
            "ip", "-n", WIRE_NETNS, "link", "add", &wire_end, "type", "veth", "peer", "name", "wire0", "netns",
            ca_netns,
        ])?;
        run(&["ip", "-n", WIRE_NETNS, "link", "set", &wire_end, "master", "br0", "up"])?;
        let ip = self.placement.ca_ip.to_string();
        let ip = ip.as_str();
        run(&["ip", "-n", ca_netns, "addr", "add", &format!("{ip}/24"), "dev", "wire0"])?;
        run(&["ip", "-n", ca_netns, "link", "set", "wire0", "up"])?;
        // Gateways run in pods and ask for their own certificate.
        for n in &self.nodes {
            run(&["ip", "-n", ca_netns, "route", "add", &n.subnet, "via", &n.wire_ip.to_string()])?;
        }
        fs::create_dir_all(self.state_dir.join("tokens"))?;
        // The scraper's token, which the agents accept on their metrics port.
        private(&self.metrics_token_path(), &random_token()?)?;
        let mut table = String::new();
        for n in &self.nodes {
            let token = random_token()?;
            private(&self.agent_token_path(&n.name), &token)?;
            table.push_str(&format!("{token} {}\n", n.name));
        }
        // A gateway's token names its node and the one identity it may hold.
        for p in self.pods.iter().filter(|p| p.runs_gateway()) {
            let token = random_token()?;
            private(&self.gateway_token_path(p), &token)?;
            let account = self.service_account_of(p)?;
            table.push_str(&format!("{token} {} {}/{account}\n", p.node, p.namespace));
        }
        let table_path = self.state_dir.join("ca-tokens");
        private(&table_path, &table)?;
        let cgroup = self.placement.ca_cgroup();
        fs::create_dir_all(self.cgroup_root.join(&cgroup))?;
        let argv: Vec<String> = [
            self.agent_bin.with_file_name("mesh-ca").display().to_string(),
            "--listen".into(),
            format!("0.0.0.0:{CA_PORT}"),
            "--ca-dir".into(),
            self.ca_dir().display().to_string(),
            "--config-dir".into(),
            self.config_dir().display().to_string(),
            "--token-file".into(),
            table_path.display().to_string(),
            "--server-name".into(),
            CA_SERVER_NAME.into(),
            "--server-ip".into(),
            ip.into(),
            "--reload-interval".into(),
            "1s".into(),
        ]
        .into();
        let child = self.spawn_in_ca(&argv, &self.ca_log_path())?;
        self.ca_pid = Some(child.id());
        self.save()?;
        let deadline = Instant::now() + READY_TIMEOUT;
        while Instant::now() < deadline {
            if !is_alive(child.id()) {
                bail!("mesh-ca exited; see {}", self.ca_log_path().display());
            }
            let url = format!("https://{}/v1/trust-bundle", self.placement.ca_addr());
            if self.status_from_ca(&["-k", "--http2", &url])? == "200" && self.ca_dir().join("root-cert.pem").exists() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("mesh-ca not answering after {READY_TIMEOUT:?}; see {}", self.ca_log_path().display())
    }

    /// Starts pod `i` as a runtime does: the CNI chain first (the mesh's plugin hands
    /// the pod to its node's agent), its app only once the chain succeeded. A pod the
    /// plugin refuses is recorded as failed and never runs.
    fn start_pod(&mut self, i: usize) -> anyhow::Result<()> {
        let p = self.pods[i].clone();
        match self.cni(&p, "ADD") {
            Ok(()) => {
                let pid = self.start_app(&p)?;
                self.pods[i].app_pid = Some(pid);
                self.pods[i].failed = None;
            }
            Err(e) => self.pods[i].failed = Some(format!("{e:#}")),
        }
        self.save()
    }

    /// Runs the CNI plugin for `p` as the container runtime would: CNI environment,
    /// network configuration with the network plugin's result on stdin.
    fn cni(&self, p: &PodInfo, command: &str) -> anyhow::Result<()> {
        let node = self.node(&p.node)?;
        let mut ips = vec![
            serde_json::json!({"address": format!("{}/24", p.ip), "interface": 0, "gateway": node.gateway.to_string()}),
        ];
        if let Some(ip6) = p.ip6 {
            ips.push(serde_json::json!({"address": format!("{ip6}/64"), "interface": 0, "gateway": node.gateway6().to_string()}));
        }
        let netconf = serde_json::json!({
            "cniVersion": "1.0.0",
            "name": "meshlab",
            "type": "mesh-cni",
            "socket": node.cni_socket,
            "excludeNamespaces": [],
            "prevResult": {
                "cniVersion": "1.0.0",
                "interfaces": [{"name": "eth0", "sandbox": format!("/var/run/netns/{}", p.netns)}],
                "ips": ips,
            },
        });
        let args = format!(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID={};K8S_POD_UID={}",
            p.namespace, p.name, p.uid, p.uid
        );
        let mut child = Command::new(self.cni_bin())
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", &p.uid)
            .env("CNI_NETNS", format!("/var/run/netns/{}", p.netns))
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", self.cni_bin().parent().unwrap_or(Path::new("/")))
            .env("CNI_ARGS", args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("running mesh-cni")?;
        {
            use std::io::Write as _;
            let mut stdin = child.stdin.take().context("mesh-cni stdin")?;
            stdin.write_all(netconf.to_string().as_bytes())?;
        }
        let out = child.wait_with_output()?;
        if !out.status.success() {
            let result: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
            bail!(
                "CNI {command} refused: {}: {}",
                result["msg"].as_str().unwrap_or("(no message)"),
                result["details"].as_str().unwrap_or(&String::from_utf8_lossy(&out.stderr))
            );
        }
        Ok(())
    }

    /// Waits until the agent of `p`'s node lists `p` in its config dump.
    fn wait_agent_knows(&self, p: &PodInfo) -> anyhow::Result<()> {
        let node = self.node(&p.node)?;
        let deadline = Instant::now() + READY_TIMEOUT;
        while Instant::now() < deadline {
            let out = output(&[
                "ip",
                "netns",
                "exec",
                &node.netns,
                "curl",
                "-s",
                "-m",
                "1",
                "http://127.0.0.1:15000/config_dump",
            ])?;
            let dump: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
            let known = dump["workloads"].as_array().is_some_and(|w| {
                w.iter().any(|w| w["name"] == p.name.as_str() && w["namespace"] == p.namespace.as_str())
            });
            if known {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("the agent of {} never saw pod {}/{}", p.node, p.namespace, p.name)
    }

    /// The agent binary with what every mode needs: its node, the config directory, the
    /// CA and the token it authenticates with.
    fn mesh_args(&self, node: &str, token: &Path) -> Vec<String> {
        vec![
            self.agent_bin.display().to_string(),
            "--node".into(),
            node.into(),
            "--config-dir".into(),
            self.config_dir().display().to_string(),
            "--ca-address".into(),
            self.placement.ca_addr(),
            "--ca-server-name".into(),
            CA_SERVER_NAME.into(),
            "--ca-root-cert".into(),
            self.ca_dir().join("root-cert.pem").display().to_string(),
            "--ca-token-file".into(),
            token.display().to_string(),
        ]
    }

    /// The token a gateway pod authenticates to the CA with.
    pub fn gateway_token_path(&self, p: &PodInfo) -> PathBuf {
        self.state_dir.join("tokens").join(format!("gateway-{}", p.netns))
    }

    /// The CA that signed the lab's gateway certificate ([`GATEWAY_SECRET`]).
    pub fn edge_ca_path(&self) -> PathBuf {
        self.state_dir.join("edge-ca.pem")
    }

    /// `spec.serviceAccountName` of a lab pod, from the config directory's manifests.
    fn service_account_of(&self, p: &PodInfo) -> anyhow::Result<String> {
        let m = read_manifests(&self.config_dir())?;
        Ok(m.accounts.get(&format!("{}/{}", p.namespace, p.name)).cloned().unwrap_or_else(|| "default".into()))
    }

    /// Writes the gateway certificate's Secret into the config directory (for every
    /// namespace that has a gateway pod) and its CA where clients find it.
    fn write_gateway_secret(&self) -> anyhow::Result<()> {
        let namespaces: std::collections::BTreeSet<&str> =
            self.pods.iter().filter(|p| p.runs_gateway()).map(|p| p.namespace.as_str()).collect();
        if namespaces.is_empty() {
            return Ok(());
        }
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params.distinguished_name.push(rcgen::DnType::CommonName, "meshlab edge CA");
        let ca_key = rcgen::KeyPair::generate()?;
        let ca_cert = ca_params.self_signed(&ca_key)?;
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let mut params =
            rcgen::CertificateParams::new(vec!["myapp.example.com".to_string(), "*.example.com".to_string()])?;
        params.distinguished_name.push(rcgen::DnType::CommonName, "myapp.example.com");
        let key = rcgen::KeyPair::generate()?;
        let cert = params.signed_by(&key, &issuer)?;
        fs::write(self.edge_ca_path(), ca_cert.pem())?;
        let indent = |pem: &str| pem.lines().map(|l| format!("    {l}\n")).collect::<String>();
        let mut yaml = String::new();
        for ns in namespaces {
            yaml.push_str(&format!(
                "---\napiVersion: v1\nkind: Secret\nmetadata: {{name: {GATEWAY_SECRET}, namespace: {ns}}}\n\
                 type: kubernetes.io/tls\nstringData:\n  tls.crt: |\n{}  tls.key: |\n{}",
                indent(&cert.pem()),
                indent(&key.serialize_pem())
            ));
        }
        private(&self.config_dir().join("lab-gateway-secret.yaml"), &yaml)
    }

    /// The `mesh-cni` binary, built next to the agent.
    fn cni_bin(&self) -> PathBuf {
        self.agent_bin.with_file_name("mesh-cni")
    }

    /// Adds a pod from its manifest (YAML with `metadata.uid`, `spec.nodeName` on an
    /// existing node and `status.podIP` in that node's subnet) to the running lab: its
    /// manifest goes to the agents' config first, as the API server has a pod before its
    /// node starts it, then it starts as every lab pod does. Returns the pod; a pod the
    /// CNI plugin refused comes back with `failed` set and no app.
    pub fn add_pod(&mut self, manifest: &str) -> anyhow::Result<PodInfo> {
        self.add_pod_with(manifest, true)
    }

    /// [`Lab::add_pod`] for a pod whose cgroup kubelet has not made: the agent cannot
    /// find it, so the pod must not start.
    pub fn add_pod_without_cgroup(&mut self, manifest: &str) -> anyhow::Result<PodInfo> {
        self.add_pod_with(manifest, false)
    }

    fn add_pod_with(&mut self, manifest: &str, make_cgroup: bool) -> anyhow::Result<PodInfo> {
        let v: Value = serde_yaml::from_str(manifest).context("pod manifest")?;
        let p = pod_info(&v)?;
        self.node(&p.node)?;
        if self.pods.iter().any(|x| x.name == p.name && x.namespace == p.namespace) {
            bail!("pod {}/{} is already in the lab", p.namespace, p.name);
        }
        let i = self.pods.len();
        let p = place_pod(p, i, &self.pods);
        self.pods.push(p.clone());
        self.save()?;
        let file = self.config_dir().join(format!("pod-{}-{}.yaml", p.namespace, p.name));
        let tmp = self.config_dir().join(format!(".pod-{}-{}.yaml.tmp", p.namespace, p.name));
        fs::write(&tmp, manifest)?;
        fs::rename(&tmp, &file)?;
        // As on a node: the pod is in the API (and the agent's config) before the kubelet
        // starts it, so a mesh that only captured on its own schedule would leave it open.
        self.wait_agent_knows(&p)?;
        self.build_pod_network(&p)?;
        if make_cgroup {
            fs::create_dir_all(self.cgroup_root.join(&p.cgroup))?;
        }
        self.write_hosts()?;
        self.start_pod(i)?;
        let p = self.pods[i].clone();
        if p.failed.is_none() {
            self.wait_app(&p)?;
        }
        Ok(p)
    }

    /// Kills `pod`'s application (SIGKILL, as a crash): its sandbox and capture stay.
    pub fn kill_app(&mut self, pod: &str) -> anyhow::Result<()> {
        let i = self.pods.iter().position(|p| p.name == pod).with_context(|| format!("no pod {pod}"))?;
        if let Some(pid) = self.pods[i].app_pid.take() {
            stop_pid(pid, "KILL");
        }
        self.save()
    }

    /// Starts `pod`'s application again (after [`Lab::kill_app`]) and waits until it
    /// answers.
    pub fn restart_app(&mut self, pod: &str) -> anyhow::Result<()> {
        let i = self.pods.iter().position(|p| p.name == pod).with_context(|| format!("no pod {pod}"))?;
        let p = self.pods[i].clone();
        let pid = self.start_app(&p)?;
        self.pods[i].app_pid = Some(pid);
        self.save()?;
        self.wait_app(&p)
    }

    /// Cuts the CA service off the wire (`false`: its port on the bridge goes down, so
    /// what is sent to it is lost, as in a partition) or joins it back (`true`).
    pub fn ca_reachable(&self, reachable: bool) -> anyhow::Result<()> {
        let wire_end = self.placement.ca_wire_end();
        run(&["ip", "-n", WIRE_NETNS, "link", "set", &wire_end, if reachable { "up" } else { "down" }])?;
        Ok(())
    }

    /// Delays every packet a node sends onto the wire by `delay` (so a round trip
    /// between the nodes takes twice that more), until called with `None`. The kernel
    /// has no `tc netem`: an iptables rule in each node's forwarding path hands the
    /// packets to a netfilter queue, where a helper (`mesh-echo delay`, named
    /// `delay-<node>`) lets each through `delay` after it arrived.
    pub fn wire_delay(&mut self, delay: Option<Duration>) -> anyhow::Result<()> {
        const CHAIN: &str = "MESHLAB-DELAY";
        for n in self.nodes.clone() {
            let ipt = empty_fault_chain(&n.netns, CHAIN)?;
            let helper = format!("delay-{}", n.name);
            if self.helpers.iter().any(|h| h.name == helper) {
                self.stop_helper(&helper)?;
            }
            let Some(delay) = delay else { continue };
            let argv: Vec<String> = [
                self.echo_bin.display().to_string(),
                "delay".into(),
                "--queue".into(),
                "0".into(),
                "--ms".into(),
                delay.as_millis().to_string(),
            ]
            .into();
            self.start_helper_in(&helper, &n.name, &n.netns, &argv)?;
            let log = self.state_dir.join("logs").join(format!("helper-{helper}.log"));
            let deadline = Instant::now() + READY_TIMEOUT;
            while !fs::read_to_string(&log).unwrap_or_default().contains("ready") {
                if Instant::now() > deadline {
                    bail!("{helper} did not bind its queue: {}", fs::read_to_string(&log).unwrap_or_default());
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            // --queue-bypass: were the helper gone, packets would pass rather than drop.
            ipt(&["-A", CHAIN, "-o", "wire0", "-j", "NFQUEUE", "--queue-num", "0", "--queue-bypass"])?;
        }
        Ok(())
    }

    /// Drops `percent` of the packets crossing the wire in or out of every node (100: a
    /// partition), at random, until called with `None`. This kernel has no queueing
    /// disciplines (`tc netem` cannot add latency here); the loss is iptables'
    /// `statistic` match in each node's forwarding path, in a chain of the lab's own.
    pub fn wire_loss(&self, percent: Option<u32>) -> anyhow::Result<()> {
        const CHAIN: &str = "MESHLAB-FAULT";
        for n in &self.nodes {
            let ipt = empty_fault_chain(&n.netns, CHAIN)?;
            let Some(percent) = percent else { continue };
            let probability = format!("{:.2}", f64::from(percent.min(100)) / 100.0);
            for dir in ["-i", "-o"] {
                let mut rule = vec!["-A", CHAIN, dir, "wire0"];
                if percent < 100 {
                    rule.extend(["-m", "statistic", "--mode", "random", "--probability", &probability]);
                }
                rule.extend(["-j", "DROP"]);
                ipt(&rule)?;
            }
        }
        Ok(())
    }

    /// Recreates `pod`'s sandbox as a container runtime does when it died: the app is
    /// killed, CNI DEL, the network plugin removes the pod's veth and the namespace is
    /// deleted; then a new namespace of the same name, address and UID is built, CNI
    /// ADD, and the app starts again. Returns once the app answers.
    pub fn recreate_sandbox(&mut self, pod: &str) -> anyhow::Result<()> {
        let i = self.pods.iter().position(|p| p.name == pod).with_context(|| format!("no pod {pod}"))?;
        let p = self.pods[i].clone();
        if let Some(pid) = p.app_pid {
            stop_pid(pid, "KILL");
        }
        self.cni(&p, "DEL")?;
        let node = self.node(&p.node)?.netns.clone();
        run(&["ip", "-n", &node, "link", "del", &p.veth])?;
        run(&["ip", "netns", "del", &p.netns])?;
        self.build_pod_network(&p)?;
        // The new interface has a new MAC: what a CNI's gratuitous ARP does for the
        // neighbours (the node and the pods on its bridge) that cached the old one.
        let ip = p.ip.to_string();
        let neighbours = self.pods.iter().filter(|o| o.node == p.node && o.name != p.name).map(|o| o.netns.clone());
        for ns in std::iter::once(node).chain(neighbours) {
            run_quiet(&["ip", "-n", &ns, "neigh", "flush", "to", &ip]);
        }
        self.start_pod(i)?;
        let p = self.pods[i].clone();
        if let Some(why) = &p.failed {
            bail!("pod {pod} did not start again: {why}");
        }
        self.wait_app(&p)
    }

    fn build_network(&self) -> anyhow::Result<()> {
        if self.placement.owns_wire {
            run(&["ip", "netns", "add", WIRE_NETNS])?;
            run(&["ip", "-n", WIRE_NETNS, "link", "add", "br0", "type", "bridge"])?;
            run(&["ip", "-n", WIRE_NETNS, "link", "set", "br0", "up"])?;
        }
        for (i, n) in self.nodes.iter().enumerate() {
            let wire_end = format!("nw{}", n.wire_ip.octets()[3]);
            run(&["ip", "netns", "add", &n.netns])?;
            run(&["ip", "-n", &n.netns, "link", "set", "lo", "up"])?;
            run(&[
                "ip", "-n", WIRE_NETNS, "link", "add", &wire_end, "type", "veth", "peer", "name", "wire0", "netns",
                &n.netns,
            ])?;
            run(&["ip", "-n", WIRE_NETNS, "link", "set", &wire_end, "master", "br0", "up"])?;
            run(&["ip", "-n", &n.netns, "addr", "add", &format!("{}/24", n.wire_ip), "dev", "wire0"])?;
            run(&["ip", "-n", &n.netns, "link", "set", "wire0", "up"])?;
            run(&["ip", "-n", &n.netns, "link", "add", "br0", "type", "bridge"])?;
            // A bridge without an address of its own takes the lowest of its ports'
            // (random) MACs, so a pod added later could change the pods' gateway MAC
            // under their ARP caches: their traffic off the pod would then vanish until
            // the entries expire. CNI bridges fix it; so does the lab.
            let mac = format!("02:6d:65:73:68:{:02x}", i + 1);
            run(&["ip", "-n", &n.netns, "link", "set", "br0", "address", &mac])?;
            run(&["ip", "-n", &n.netns, "addr", "add", &format!("{}/24", n.gateway), "dev", "br0"])?;
            run(&["ip", "-n", &n.netns, "link", "set", "br0", "up"])?;
            run(&["ip", "netns", "exec", &n.netns, "sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
            // Dual-stack: nodad, so the addresses are usable at once.
            run(&["ip", "netns", "exec", &n.netns, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"])?;
            run(&["ip", "-n", &n.netns, "addr", "add", &format!("{}/64", n.wire_ip6()), "dev", "wire0", "nodad"])?;
            run(&["ip", "-n", &n.netns, "addr", "add", &format!("{}/64", n.gateway6()), "dev", "br0", "nodad"])?;
            for other in self.nodes.iter().filter(|o| o.name != n.name) {
                run(&["ip", "-n", &n.netns, "route", "add", &other.subnet, "via", &other.wire_ip.to_string()])?;
                let via = other.wire_ip6().to_string();
                run(&["ip", "-n", &n.netns, "-6", "route", "add", &other.subnet6(), "via", &via])?;
            }
        }
        for p in &self.pods {
            self.build_pod_network(p)?;
        }
        if self.placement.owns_wire {
            self.build_client_network()?;
        }
        Ok(())
    }

    /// The outside client: on the wire, with a route to each node's pods through it.
    fn build_client_network(&self) -> anyhow::Result<()> {
        run(&["ip", "netns", "add", CLIENT_NETNS])?;
        run(&["ip", "-n", CLIENT_NETNS, "link", "set", "lo", "up"])?;
        run(&[
            "ip",
            "-n",
            WIRE_NETNS,
            "link",
            "add",
            "nwclient",
            "type",
            "veth",
            "peer",
            "name",
            "wire0",
            "netns",
            CLIENT_NETNS,
        ])?;
        run(&["ip", "-n", WIRE_NETNS, "link", "set", "nwclient", "master", "br0", "up"])?;
        run(&["ip", "-n", CLIENT_NETNS, "addr", "add", &format!("{CLIENT_ADDR}/24"), "dev", "wire0"])?;
        run(&["ip", "-n", CLIENT_NETNS, "link", "set", "wire0", "up"])?;
        for n in &self.nodes {
            run(&["ip", "-n", CLIENT_NETNS, "route", "add", &n.subnet, "via", &n.wire_ip.to_string()])?;
        }
        Ok(())
    }

    /// The pod's netns, its veth on the node's bridge, its address and route: what the
    /// network plugin does before `mesh-cni` runs.
    fn build_pod_network(&self, p: &PodInfo) -> anyhow::Result<()> {
        let node = self.node(&p.node)?;
        let ns = p.netns.as_str();
        run(&["ip", "netns", "add", ns])?;
        run(&["ip", "-n", ns, "link", "set", "lo", "up"])?;
        run(&["ip", "-n", &node.netns, "link", "add", &p.veth, "type", "veth", "peer", "name", "eth0", "netns", ns])?;
        run(&["ip", "-n", &node.netns, "link", "set", &p.veth, "master", "br0", "up"])?;
        run(&["ip", "-n", ns, "addr", "add", &format!("{}/24", p.ip), "dev", "eth0"])?;
        run(&["ip", "-n", ns, "link", "set", "eth0", "up"])?;
        run(&["ip", "-n", ns, "route", "add", "default", "via", &node.gateway.to_string()])?;
        if let Some(ip6) = p.ip6 {
            run(&["ip", "-n", ns, "addr", "add", &format!("{ip6}/64"), "dev", "eth0", "nodad"])?;
            run(&["ip", "-n", ns, "-6", "route", "add", "default", "via", &node.gateway6().to_string()])?;
        }
        Ok(())
    }

    fn build_cgroups(&self) -> anyhow::Result<()> {
        for n in &self.nodes {
            fs::create_dir_all(self.cgroup_root.join(&n.cgroup))?;
            fs::create_dir_all(self.cgroup_root.join(&n.agent_cgroup))?;
            fs::create_dir_all(self.cgroup_root.join(n.kubelet_cgroup()))?;
            fs::create_dir_all(self.cgroup_root.join(n.host_cgroup()))?;
        }
        for p in &self.pods {
            fs::create_dir_all(self.cgroup_root.join(&p.cgroup))?;
        }
        Ok(())
    }

    /// Gives `pod` the resolv.conf a kubelet writes (search list of its namespace),
    /// naming [`CLUSTER_DNS`]: `/etc/netns/<pod>/resolv.conf`, which the pod's
    /// commands see over /etc/resolv.conf. `down` removes it with the pod.
    pub fn use_cluster_dns(&self, pod: &str) -> anyhow::Result<()> {
        let p = self.pod(pod)?;
        let ns = &p.namespace;
        fs::write(
            Path::new("/etc/netns").join(&p.netns).join("resolv.conf"),
            format!(
                "nameserver {CLUSTER_DNS}\nsearch {ns}.svc.cluster.local svc.cluster.local cluster.local\n\
                 options ndots:5 timeout:1 attempts:2\n"
            ),
        )?;
        Ok(())
    }

    /// `/etc/netns/<pod>/hosts`: `ip netns exec` bind-mounts it over /etc/hosts, so
    /// pods resolve `svc`, `svc.ns` and `svc.ns.svc.cluster.local`.
    fn write_hosts(&self) -> anyhow::Result<()> {
        for p in &self.pods {
            let dir = Path::new("/etc/netns").join(&p.netns);
            fs::create_dir_all(&dir)?;
            let mut hosts = String::from("127.0.0.1 localhost\n::1 localhost\n");
            hosts.push_str(&format!("{} {}\n", p.ip, p.name));
            for (key, (name, ip)) in &self.services {
                let ns = key.split('/').next().unwrap_or("default");
                let short = if ns == p.namespace { name.clone() } else { String::new() };
                hosts.push_str(&format!("{ip} {short} {name}.{ns} {name}.{ns}.svc {name}.{ns}.svc.cluster.local\n"));
            }
            fs::write(dir.join("hosts"), hosts)?;
        }
        Ok(())
    }

    /// A command that runs `argv` inside `pod`'s netns and cgroup.
    pub fn pod_command(&self, pod: &str, argv: &[String]) -> anyhow::Result<Command> {
        let p = self.pod(pod)?;
        Ok(in_cgroup_netns(&self.cgroup_root.join(&p.cgroup), &p.netns, Enter::IpNetnsExec, argv))
    }

    /// A command that runs `argv` in `node`'s network namespace as its kubelet would:
    /// in the kubelet's cgroup.
    pub fn kubelet_command(&self, node: &str, argv: &[String]) -> anyhow::Result<Command> {
        let n = self.node(node)?;
        Ok(in_cgroup_netns(&self.cgroup_root.join(n.kubelet_cgroup()), &n.netns, Enter::Nsenter, argv))
    }

    /// A command that runs `argv` in `node`'s network namespace as another process of
    /// the node (a hostNetwork pod, a daemon): outside the kubelet's cgroup.
    pub fn host_command(&self, node: &str, argv: &[String]) -> anyhow::Result<Command> {
        let n = self.node(node)?;
        Ok(in_cgroup_netns(&self.cgroup_root.join(n.host_cgroup()), &n.netns, Enter::Nsenter, argv))
    }

    /// Runs `argv` in `pod` and returns its output.
    pub fn exec(&self, pod: &str, argv: &[&str]) -> anyhow::Result<std::process::Output> {
        let argv: Vec<String> = argv.iter().map(|s| s.to_string()).collect();
        Ok(self.pod_command(pod, &argv)?.stdin(Stdio::null()).output()?)
    }

    /// Starts a real Prometheus (Debian's `prometheus`) in the `outside` pod, as a
    /// cluster runs one: scraping every node's agent every second with the scraper's
    /// token, on [`PROMETHEUS_ADDR`] in that pod's netns. A second job without a token
    /// shows the agents refusing it. Waits until every target was scraped once.
    pub fn start_prometheus(&mut self) -> anyhow::Result<()> {
        let Some(prometheus) = crate::sys::which("prometheus") else {
            bail!("prometheus is not installed (cargo xtask setup installs it)");
        };
        let gateways: Vec<String> = self.nodes.iter().map(|n| format!("'{}:15020'", n.gateway)).collect();
        let dir = self.state_dir.join("prometheus");
        fs::create_dir_all(&dir)?;
        let config = format!(
            "global: {{scrape_interval: 1s, scrape_timeout: 1s}}\n\
             scrape_configs:\n\
             - job_name: mesh-agents\n  \
               authorization: {{type: Bearer, credentials_file: '{}'}}\n  \
               static_configs: [{{targets: [{}]}}]\n\
             - job_name: no-token\n  \
               static_configs: [{{targets: [{}]}}]\n",
            self.metrics_token_path().display(),
            gateways.join(", "),
            gateways[0],
        );
        fs::write(dir.join("prometheus.yml"), config)?;
        let argv: Vec<String> = vec![
            prometheus.display().to_string(),
            format!("--config.file={}", dir.join("prometheus.yml").display()),
            format!("--storage.tsdb.path={}", dir.join("data").display()),
            format!("--web.listen-address={PROMETHEUS_ADDR}"),
        ];
        self.start_helper("prometheus", "outside", &argv)?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let out =
                self.exec("outside", &["curl", "-s", "-m", "2", &format!("http://{PROMETHEUS_ADDR}/api/v1/targets")])?;
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
            let active = v["data"]["activeTargets"].as_array().cloned().unwrap_or_default();
            if active.len() == gateways.len() + 1 && active.iter().all(|t| t["health"] != "unknown") {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("Prometheus did not scrape every agent within 60 s");
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// An instant query to the Prometheus [`Lab::start_prometheus`] started: each
    /// series' labels and value.
    /// Prometheus's whole answer to the instant query `q` (status, error, data).
    pub fn prometheus_answer(&self, q: &str) -> anyhow::Result<serde_json::Value> {
        // Percent-encoded: curl would read `{...}` as a glob, and quotes need escaping.
        let encoded: String = q
            .chars()
            .filter(|c| !c.is_whitespace())
            .map(|c| match c {
                'a'..='z' | 'A'..='Z' | '0'..='9' | '_' | '.' | '(' | ')' | ',' => c.to_string(),
                other => format!("%{:02X}", other as u32),
            })
            .collect();
        let url = format!("http://{PROMETHEUS_ADDR}/api/v1/query?query={encoded}");
        let out = self.exec("outside", &["curl", "-s", "-m", "5", &url])?;
        Ok(serde_json::from_slice(&out.stdout).unwrap_or_default())
    }

    pub fn prometheus_query(&self, q: &str) -> anyhow::Result<Vec<(serde_json::Value, f64)>> {
        let v = self.prometheus_answer(q)?;
        let results = v["data"]["result"].as_array().cloned().unwrap_or_default();
        Ok(results
            .into_iter()
            .filter_map(|r| {
                let value = r["value"][1].as_str()?.parse::<f64>().ok()?;
                Some((r["metric"].clone(), value))
            })
            .collect())
    }

    /// Starts `argv` as helper `name` in `pod`'s netns (or the outside client's, for
    /// `CLIENT_NETNS`), in its own cgroup outside the
    /// node's subtree, logging to `logs/helper-<name>.log`. `down` stops it.
    pub fn start_helper(&mut self, name: &str, pod: &str, argv: &[String]) -> anyhow::Result<u32> {
        // The outside client's netns stands for "the internet" too: servers there are
        // reached by no Service, only by address.
        let netns = if pod == CLIENT_NETNS { CLIENT_NETNS.to_string() } else { self.pod(pod)?.netns.clone() };
        self.start_helper_in(name, pod, &netns, argv)
    }

    /// [`Lab::start_helper`] in the network namespace `netns`, for `owner` (a pod, or
    /// a node for what runs on its wire).
    fn start_helper_in(&mut self, name: &str, owner: &str, netns: &str, argv: &[String]) -> anyhow::Result<u32> {
        if self.helpers.iter().any(|h| h.name == name) {
            bail!("helper {name} is already running");
        }
        let cgroup = format!("{CGROUP_NAME}/helpers/{name}");
        fs::create_dir_all(self.cgroup_root.join(&cgroup))?;
        let log = fs::File::create(self.state_dir.join("logs").join(format!("helper-{name}.log")))?;
        let child = in_cgroup_netns(&self.cgroup_root.join(&cgroup), netns, Enter::IpNetnsExec, argv)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting helper {name}"))?;
        let pid = child.id();
        self.helpers.push(Helper { name: name.into(), pod: owner.into(), cgroup, pid });
        self.save()?;
        Ok(pid)
    }

    /// Stops helper `name` and removes its cgroup.
    pub fn stop_helper(&mut self, name: &str) -> anyhow::Result<()> {
        let Some(i) = self.helpers.iter().position(|h| h.name == name) else { bail!("no helper {name}") };
        let h = self.helpers.remove(i);
        self.kill_helper(&h);
        self.save()
    }

    fn kill_helper(&self, h: &Helper) {
        stop_pid(h.pid, "TERM");
        let cg = self.cgroup_root.join(&h.cgroup);
        let _ = fs::write(cg.join("cgroup.kill"), "1");
        remove_cgroup(&cg);
    }

    /// Starts `node`'s kubelet stand-in (`mesh-kubelet`): in the node's network
    /// namespace and the node's kubelet cgroup, probing the node's pods as their specs
    /// say and publishing their readiness; it logs to `logs/kubelet-<node>.log`.
    pub fn start_kubelet(&mut self, node: &str) -> anyhow::Result<()> {
        let n = self.node(node)?.clone();
        let log = fs::File::create(self.state_dir.join("logs").join(format!("kubelet-{node}.log")))?;
        let argv: Vec<String> = vec![
            self.echo_bin.with_file_name("mesh-kubelet").display().to_string(),
            "--node".into(),
            n.name.clone(),
            "--config-dir".into(),
            self.config_dir().display().to_string(),
        ];
        let child = in_cgroup_netns(&self.cgroup_root.join(n.kubelet_cgroup()), &n.netns, Enter::Nsenter, &argv)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting mesh-kubelet")?;
        let pid = child.id();
        if let Some(x) = self.nodes.iter_mut().find(|x| x.name == node) {
            x.kubelet_pid = Some(pid);
        }
        self.save()
    }

    /// Starts (or restarts) the agent of `node`.
    pub fn start_agent(&mut self, node: &str) -> anyhow::Result<()> {
        self.spawn_agent(node)?;
        self.wait_agent(node)
    }

    /// Replaces the running agent of `node` as a rolling update does: the new one
    /// (`agent_bin`, which may be another build) starts beside it and takes its sockets
    /// over (`agent-handoff.sock`, beside the CNI socket); once the new one answers
    /// ready the old one stops accepting and serves its open connections until they
    /// end. Returns when the new one is ready, with the old one's pid (still running
    /// while it drains; `down` stops it with the node's agent cgroup).
    pub fn upgrade_agent(&mut self, node: &str) -> anyhow::Result<Option<u32>> {
        use std::os::unix::fs::MetadataExt as _;
        let n = self.node(node)?.clone();
        let old = n.agent_pid.filter(|pid| is_alive(*pid));
        let handoff = n.cni_socket.with_file_name("agent-handoff.sock");
        let before = fs::metadata(&handoff).ok().map(|m| m.ino());
        self.spawn_agent(node)?;
        if old.is_some() {
            // The new agent binds a socket of its own once it holds the old one's: a
            // ready answer from then on is its own (the old one answers not ready
            // from the hello on).
            let deadline = Instant::now() + READY_TIMEOUT;
            while fs::metadata(&handoff).ok().map(|m| m.ino()) == before {
                let pid = self.node(node)?.agent_pid.unwrap_or(0);
                if !is_alive(pid) {
                    bail!("the new agent of {node} exited; see {}", self.agent_log_path(node).display());
                }
                if Instant::now() > deadline {
                    bail!("the new agent of {node} did not take over in {READY_TIMEOUT:?}");
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        self.wait_agent(node)?;
        Ok(old)
    }

    /// Starts an agent for `node` and records it as the node's, without waiting.
    fn spawn_agent(&mut self, node: &str) -> anyhow::Result<()> {
        let n = self.node(node)?.clone();
        let log_path = self.agent_log_path(node);
        let log = fs::OpenOptions::new().create(true).append(true).open(&log_path)?;
        let mut argv = self.mesh_args(&n.name, &self.agent_token_path(&n.name));
        argv.extend::<[String; _]>([
            "--node-cgroup".into(),
            self.cgroup_root.join(&n.cgroup).display().to_string(),
            "--bpf-pin-dir".into(),
            n.pin_dir.display().to_string(),
            "--cni-socket".into(),
            n.cni_socket.display().to_string(),
            "--kubelet-cgroup".into(),
            self.cgroup_root.join(n.kubelet_cgroup()).display().to_string(),
            "--metrics-auth".into(),
            format!("token-file:{}", self.metrics_token_path().display()),
            "--admin-addr".into(),
            "127.0.0.1:15000".into(),
            "--drain-timeout".into(),
            "2s".into(),
        ]);
        let mut cmd = in_cgroup_netns(&self.cgroup_root.join(&n.agent_cgroup), &n.netns, Enter::Nsenter, &argv);
        let child = cmd
            .env("MESH_LOG", &self.agent_log)
            .env("MESH_DNS_UPSTREAM", format!("{CLUSTER_DNS}:53"))
            .envs(&self.agent_env)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting mesh-agent")?;
        let pid = child.id();
        for x in self.nodes.iter_mut().filter(|x| x.name == node) {
            x.agent_pid = Some(pid);
        }
        self.save()
    }

    /// Waits until the agent of `node` answers ready.
    pub fn wait_agent(&self, node: &str) -> anyhow::Result<()> {
        let n = self.node(node)?;
        let deadline = Instant::now() + READY_TIMEOUT;
        while Instant::now() < deadline {
            if let Some(pid) = n.agent_pid
                && !is_alive(pid)
            {
                bail!("agent of {node} exited; see {}", self.agent_log_path(node).display());
            }
            let out = output(&[
                "ip",
                "netns",
                "exec",
                &n.netns,
                "curl",
                "-sf",
                "-m",
                "1",
                "http://127.0.0.1:15021/healthz/ready",
            ])?;
            if out.status.success() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!("agent of {node} not ready after {READY_TIMEOUT:?}; see {}", self.agent_log_path(node).display())
    }

    /// Stops the agent of `node` with `signal` (`TERM` or `KILL`) and waits for it.
    pub fn stop_agent(&mut self, node: &str, signal: &str) -> anyhow::Result<()> {
        let pid = self.node(node)?.agent_pid;
        if let Some(pid) = pid {
            stop_pid(pid, signal);
        }
        for x in self.nodes.iter_mut().filter(|x| x.name == node) {
            x.agent_pid = None;
        }
        self.save()
    }

    fn start_app(&self, p: &PodInfo) -> anyhow::Result<u32> {
        if p.runs_gateway() {
            return self.start_gateway(p);
        }
        let labels: Vec<String> = p.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let argv: Vec<String> = [
            self.echo_bin.display().to_string(),
            "serve".into(),
            "--pod".into(),
            p.name.clone(),
            "--namespace".into(),
            p.namespace.clone(),
            "--labels".into(),
            labels.join(","),
        ]
        .into();
        self.spawn_app(p, &argv, &[])
    }

    /// Runs a pod's app in the pod's netns and cgroup, logging to `app-<netns>.log`.
    fn spawn_app(&self, p: &PodInfo, argv: &[String], env: &[(&str, &str)]) -> anyhow::Result<u32> {
        let log = fs::File::create(self.state_dir.join("logs").join(format!("app-{}.log", p.netns)))?;
        let child = in_cgroup_netns(&self.cgroup_root.join(&p.cgroup), &p.netns, Enter::IpNetnsExec, argv)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting the app of pod {}", p.name))?;
        Ok(child.id())
    }

    /// A gateway pod's container: the agent binary in gateway mode, with the pod's own
    /// token for the CA and the agents' `MESH_*` settings (the same binary reads them).
    fn start_gateway(&self, p: &PodInfo) -> anyhow::Result<u32> {
        let mut argv = self.mesh_args(&p.node, &self.gateway_token_path(p));
        argv.extend::<[String; _]>([
            "--mode".into(),
            "gateway".into(),
            "--pod".into(),
            format!("{}/{}", p.namespace, p.name),
            "--admin-addr".into(),
            "127.0.0.1:15000".into(),
            "--metrics-addr".into(),
            "0.0.0.0:15020".into(),
            "--readiness-addr".into(),
            "0.0.0.0:15021".into(),
            "--drain-timeout".into(),
            "2s".into(),
        ]);
        let mut env: Vec<(&str, &str)> = vec![("MESH_LOG", &self.agent_log)];
        env.extend(self.agent_env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        self.spawn_app(p, &argv, &env)
    }

    fn wait_app(&self, p: &PodInfo) -> anyhow::Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        // Loopback inside the pod is never captured, so this checks the app alone.
        let url = if p.runs_gateway() { "http://127.0.0.1:15021/healthz/ready" } else { "http://127.0.0.1:8080/ready" };
        while Instant::now() < deadline {
            let out = output(&["ip", "netns", "exec", &p.netns, "curl", "-sf", "-m", "1", url])?;
            if out.status.success() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // The state directory goes with a failed lab: say what the app said.
        let log =
            fs::read_to_string(self.state_dir.join("logs").join(format!("app-{}.log", p.netns))).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(12).collect::<Vec<_>>().into_iter().rev().collect();
        bail!("app in pod {} not answering after {READY_TIMEOUT:?}; its last words:\n{}", p.name, tail.join("\n"))
    }

    /// Copies `file` into the config directory (replacing a file of the same name).
    pub fn apply(&self, file: &Path) -> anyhow::Result<PathBuf> {
        let name = file.file_name().with_context(|| format!("{} is not a file", file.display()))?;
        let dest = self.config_dir().join(name);
        // Write then rename, so an agent never reads half a file.
        let tmp = self.config_dir().join(format!(".{}.tmp", name.to_string_lossy()));
        fs::copy(file, &tmp).with_context(|| format!("reading {}", file.display()))?;
        fs::rename(&tmp, &dest)?;
        Ok(dest)
    }

    /// Removes a file from the config directory by name.
    pub fn delete(&self, file: &Path) -> anyhow::Result<()> {
        let name = file.file_name().with_context(|| format!("{} is not a file", file.display()))?;
        let path = self.config_dir().join(name);
        fs::remove_file(&path).with_context(|| format!("{} is not applied", path.display()))
    }

    /// The `Ready` condition of pod `namespace/name` as its node's kubelet stand-in
    /// published it in the config directory; None when it has none (no readiness
    /// probe: the pod counts as ready).
    pub fn pod_ready(&self, namespace: &str, name: &str) -> Option<bool> {
        for e in fs::read_dir(self.config_dir()).ok()?.flatten() {
            let path = e.path();
            if path.file_name().and_then(|n| n.to_str()).is_none_or(|n| n.starts_with('.')) {
                continue;
            }
            let Ok(text) = fs::read_to_string(&path) else { continue };
            for doc in serde_yaml::Deserializer::from_str(&text) {
                let Ok(v) = <Value as serde::Deserialize>::deserialize(doc) else { continue };
                let meta = &v["metadata"];
                if v["kind"].as_str() != Some("Pod")
                    || meta["name"].as_str() != Some(name)
                    || meta["namespace"].as_str().unwrap_or("default") != namespace
                {
                    continue;
                }
                let conditions = v["status"]["conditions"].as_sequence()?;
                let ready = conditions.iter().find(|c| c["type"].as_str() == Some("Ready"))?;
                return Some(ready["status"].as_str() == Some("True"));
            }
        }
        None
    }

    /// A human-readable status.
    pub fn status(&self) -> String {
        let mut s = format!("lab state: {}\n", self.state_dir.display());
        if !self.placement.cluster.is_empty() {
            s.push_str(&format!("cluster {} on network {}\n", self.placement.cluster, self.placement.network));
        }
        let ca_up = self.ca_pid.is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists());
        s.push_str(&format!(
            "ca   mesh-ca  netns {:<16} addr {:<20} {}\n",
            self.placement.ca_netns,
            self.placement.ca_addr(),
            if ca_up { format!("running (pid {})", self.ca_pid.unwrap_or(0)) } else { "down".into() }
        ));
        for n in &self.nodes {
            let up = n.agent_pid.is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists());
            s.push_str(&format!(
                "node {:<8} netns {:<16} wire {:<12} pods {:<15} agent {}\n",
                n.name,
                n.netns,
                n.wire_ip,
                n.subnet,
                if up { format!("running (pid {})", n.agent_pid.unwrap_or(0)) } else { "down".into() }
            ));
        }
        for p in &self.pods {
            let up = p.app_pid.is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists());
            let app = match (&p.failed, up) {
                (Some(why), _) => format!("not started: {why}"),
                (None, true) => "running".into(),
                (None, false) => "down".into(),
            };
            let ready = match self.pod_ready(&p.namespace, &p.name) {
                Some(true) => "Ready",
                Some(false) => "NotReady",
                None => "Ready (no probe)",
            };
            let app = if p.runs_gateway() { format!("{app} (gateway)") } else { app };
            s.push_str(&format!(
                "pod  {:<15} ns {:<11} node {:<6} ip {:<11} {:<16} app {}\n",
                p.name, p.namespace, p.node, p.ip, ready, app
            ));
        }
        if self.placement.owns_wire {
            s.push_str(&format!(
                "client       netns {CLIENT_NETNS:<16} addr {CLIENT_ADDR:<20} outside the cluster: reaches the gateway pods\n"
            ));
        }
        if let Some(pid) = self.api_pid {
            s.push_str(&format!(
                "api  mesh-apiserver at http://{}:{API_PORT} (pid {pid}): what the other cluster's agents read\n",
                self.placement.ca_ip
            ));
        }
        s
    }

    /// Tears everything down. Safe to call on a half-built lab.
    pub fn down(self) -> anyhow::Result<()> {
        for h in &self.helpers {
            self.kill_helper(h);
        }
        remove_cgroup(&self.cgroup_root.join(CGROUP_NAME).join("helpers"));
        for n in &self.nodes {
            if let Some(pid) = n.agent_pid {
                stop_pid(pid, "TERM");
            }
            if let Some(pid) = n.kubelet_pid {
                stop_pid(pid, "KILL");
            }
        }
        if let Some(pid) = self.ca_pid {
            stop_pid(pid, "TERM");
        }
        for p in &self.pods {
            if let Some(pid) = p.app_pid {
                stop_pid(pid, "KILL");
            }
        }
        // Anything else started inside the lab's own cgroups (lab exec leftovers).
        if let Some(pid) = self.api_pid {
            stop_pid(pid, "TERM");
        }
        let ca_cgroup = self.placement.ca_cgroup();
        let node_cgroups: Vec<String> =
            self.nodes.iter().flat_map(|n| [n.agent_cgroup.clone(), n.kubelet_cgroup(), n.host_cgroup()]).collect();
        for cg in self.pods.iter().map(|p| &p.cgroup).chain(&node_cgroups).chain(std::iter::once(&ca_cgroup)) {
            let kill = self.cgroup_root.join(cg).join("cgroup.kill");
            if kill.exists() {
                let _ = fs::write(kill, "1");
            }
        }
        for n in &self.nodes {
            // Unlinking pinned links detaches the programs; unlinking maps frees them.
            let _ = fs::remove_dir_all(&n.pin_dir);
        }
        let _ = fs::remove_dir(PIN_ROOT);
        for p in &self.pods {
            run_quiet(&["ip", "netns", "del", &p.netns]);
            let _ = fs::remove_dir_all(Path::new("/etc/netns").join(&p.netns));
        }
        for n in &self.nodes {
            run_quiet(&["ip", "netns", "del", &n.netns]);
        }
        run_quiet(&["ip", "netns", "del", &self.placement.ca_netns]);
        if self.placement.owns_wire {
            run_quiet(&["ip", "netns", "del", CLIENT_NETNS]);
            run_quiet(&["ip", "netns", "del", WIRE_NETNS]);
        }
        for p in &self.pods {
            remove_cgroup(&self.cgroup_root.join(&p.cgroup));
        }
        for n in &self.nodes {
            for parent in ["kubepods/besteffort", "kubepods"] {
                remove_cgroup(&self.cgroup_root.join(&n.cgroup).join(parent));
            }
            remove_cgroup(&self.cgroup_root.join(&n.cgroup));
            remove_cgroup(&self.cgroup_root.join(&n.agent_cgroup));
            remove_cgroup(&self.cgroup_root.join(n.kubelet_cgroup()));
            remove_cgroup(&self.cgroup_root.join(n.host_cgroup()));
        }
        remove_cgroup(&self.cgroup_root.join(&ca_cgroup));
        remove_cgroup(&self.cgroup_root.join(CGROUP_NAME));
        fs::remove_dir_all(&self.state_dir).with_context(|| format!("removing {}", self.state_dir.display()))?;
        Ok(())
    }
}

/// How a lab process enters its network namespace.
#[derive(Clone, Copy)]
enum Enter {
    /// As `ip netns exec` does for what matters here: the netns, and
    /// `/etc/netns/<name>/hosts` and `resolv.conf` over /etc's in a private mount
    /// namespace (pods resolve Services by name). /sys is not remounted, so the cgroup2 mount stays.
    IpNetnsExec,
    /// The netns alone, with the host's mounts: the agent needs the cgroup2 and bpffs
    /// mounts (a DaemonSet pod gets them as hostPath mounts).
    Nsenter,
}

/// Enters the netns first, then a shell there moves itself into the cgroup and execs
/// the program, so the program starts inside both with the same pid. In that order, a
/// process is never in a pod's cgroup while still in another namespace, as with a
/// runtime, whose sandbox process starts in the pod's namespace.
fn in_cgroup_netns(cgroup: &Path, netns: &str, enter: Enter, argv: &[String]) -> Command {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net=/var/run/netns/{netns}"));
    let join = "echo $$ > \"$0/cgroup.procs\" && exec \"$@\"";
    match enter {
        Enter::IpNetnsExec => {
            let dir = Path::new("/etc/netns").join(netns);
            let script = format!(
                "[ -f {0}/hosts ] && mount --bind {0}/hosts /etc/hosts; \
                 [ -f {0}/resolv.conf ] && mount --bind {0}/resolv.conf /etc/resolv.conf; {join}",
                dir.display()
            );
            cmd.args(["unshare", "--mount", "--propagation", "private", "bash", "-c", &script]);
        }
        Enter::Nsenter => {
            cmd.args(["bash", "-c", join]);
        }
    }
    cmd.arg(cgroup).args(argv);
    cmd
}

/// Gives pod `p` (the `index`-th) its place in the lab: kubelet's cgroup for its UID,
/// its veth, and its netns name (`<name>.<namespace>` if a pod in `others` has its name).
fn place_pod(mut p: PodInfo, index: usize, others: &[PodInfo]) -> PodInfo {
    p.cgroup = format!("{CGROUP_NAME}/{}/kubepods/besteffort/pod{}", p.node, p.uid);
    p.veth = format!("vp{index}");
    p.netns =
        if others.iter().any(|o| o.name == p.name) { format!("{}.{}", p.name, p.namespace) } else { p.name.clone() };
    p
}

fn stop_pid(pid: u32, signal: &str) {
    let proc = format!("/proc/{pid}");
    if !Path::new(&proc).exists() {
        return;
    }
    run_quiet(&["kill", &format!("-{signal}"), &pid.to_string()]);
    let deadline = Instant::now() + Duration::from_secs(5);
    while Path::new(&proc).exists() && Instant::now() < deadline {
        // Reap it if it is our child; otherwise wait for init to.
        if let Ok(stat) = fs::read_to_string(format!("{proc}/stat"))
            && stat.split_whitespace().nth(2) == Some("Z")
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    if Path::new(&proc).exists() && signal != "KILL" {
        run_quiet(&["kill", "-KILL", &pid.to_string()]);
    }
}

/// Whether `pid` runs (a child that exited and was not reaped yet is a zombie).
fn is_alive(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .is_some_and(|stat| stat.rsplit(')').next().and_then(|r| r.split_whitespace().next()) != Some("Z"))
}

fn remove_cgroup(path: &Path) {
    // A cgroup is removed with rmdir once its processes are gone; they exit
    // asynchronously after cgroup.kill, so try for a moment.
    for _ in 0..50 {
        if !path.exists() || fs::remove_dir(path).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Writes `text` to a new file only root can read.
/// Writes `text` to `path`, readable by its owner only (0600).
pub(crate) fn private(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path)?;
    f.write_all(text.as_bytes())?;
    Ok(())
}

/// 24 random bytes, hex.
/// iptables in network namespace `netns`, with `chain` there, jumped to first from
/// FORWARD and emptied: a fault's rules go in it, and emptying it lifts the fault.
fn empty_fault_chain(netns: &str, chain: &str) -> anyhow::Result<impl Fn(&[&str]) -> anyhow::Result<String>> {
    let netns = netns.to_string();
    let ipt = move |args: &[&str]| -> anyhow::Result<String> {
        let mut argv = vec!["ip", "netns", "exec", netns.as_str(), "iptables", "-w"];
        argv.extend(args);
        run(&argv)
    };
    if ipt(&["-S", chain]).is_err() {
        ipt(&["-N", chain])?;
        ipt(&["-I", "FORWARD", "1", "-j", chain])?;
    }
    ipt(&["-F", chain])?;
    Ok(ipt)
}

pub(crate) fn random_token() -> anyhow::Result<String> {
    let mut raw = [0u8; 24];
    fs::File::open("/dev/urandom").and_then(|mut f| std::io::Read::read_exact(&mut f, &mut raw))?;
    Ok(raw.iter().map(|b| format!("{b:02x}")).collect())
}

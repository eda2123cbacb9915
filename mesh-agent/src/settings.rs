//! The agent's own settings, from flags and environment, read in one place.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use crate::config::duration::parse_duration;

/// Workload certificate lifetime; Istio's default is 24 h, rotated at half-life.
pub const DEFAULT_CERT_TTL: Duration = Duration::from_secs(24 * 3600);
/// How long SIGTERM waits for open connections before exiting.
pub const DEFAULT_DRAIN: Duration = Duration::from_secs(10);
/// `SO_MARK` on the agent's sockets; the kernel programs never capture a marked socket.
/// 1337 is the mark Istio uses for the same purpose.
pub const DEFAULT_BYPASS_MARK: u32 = 1337;

/// Where configuration comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ConfigSourceKind {
    /// A watched directory of YAML (standalone mode, the lab).
    Files,
    /// The Kubernetes API server (cluster mode).
    Kubernetes,
}

/// Where a process reads the mesh's objects: the flags the agent, the gateway and the
/// CA service share, so they parse and connect the same way.
#[derive(Debug, Clone, clap::Args)]
pub struct SourceArgs {
    /// Where the configuration comes from: a watched directory of YAML (`files`) or the
    /// Kubernetes API (`kubernetes`: in-cluster service account, KUBECONFIG, or
    /// --kube-api-url).
    #[arg(long, env = "MESH_CONFIG_SOURCE", value_enum, default_value_t = ConfigSourceKind::Files)]
    pub config_source: ConfigSourceKind,

    /// Directory of Kubernetes/Istio YAML manifests (`--config-source files`); watched.
    #[arg(long, env = "MESH_CONFIG_DIR", required_if_eq("config_source", "files"))]
    pub config_dir: Option<PathBuf>,

    /// API server URL for `--config-source kubernetes`, without credentials (tests,
    /// `kubectl proxy`); by default the in-cluster service account or KUBECONFIG.
    #[arg(long, env = "MESH_KUBE_API_URL")]
    pub kube_api_url: Option<String>,
}

impl SourceArgs {
    /// The API client for `--config-source kubernetes`; `None` with files.
    pub async fn kube_client(&self) -> Result<Option<kube::Client>, String> {
        if self.config_source == ConfigSourceKind::Files {
            return Ok(None);
        }
        let config = match &self.kube_api_url {
            Some(url) => kube::Config::new(url.parse().map_err(|e| format!("--kube-api-url {url}: {e}"))?),
            None => kube::Config::infer().await.map_err(|e| e.to_string())?,
        };
        kube::Client::try_from(config).map(Some).map_err(|e| e.to_string())
    }
}

/// What this process is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// The node agent (a DaemonSet): captures the node's enrolled pods.
    Agent,
    /// An ingress or egress gateway (a Deployment): serves the Gateways that select its
    /// pod, with its own identity.
    Gateway,
}

/// Node agent of the mesh.
#[derive(Debug, Clone, Parser)]
#[command(name = "mesh-agent", version, about = "eBPF-accelerated sidecarless service mesh: node agent")]
pub struct Settings {
    /// `agent` (the node agent) or `gateway` (serves the Gateways selecting `--pod`).
    #[arg(long, env = "MESH_MODE", value_enum, default_value_t = Mode::Agent)]
    pub mode: Mode,

    /// The gateway's own pod, `namespace/name` (gateway mode; from the downward API).
    #[arg(long, env = "MESH_POD", required_if_eq("mode", "gateway"))]
    pub pod: Option<String>,

    /// Address gateway listeners bind (gateway mode).
    #[arg(long, env = "MESH_GATEWAY_BIND", default_value = "0.0.0.0")]
    pub gateway_bind: std::net::IpAddr,

    /// Name of this node; only pods whose spec.nodeName matches are enrolled here.
    #[arg(long, env = "MESH_NODE_NAME")]
    pub node: String,

    /// Where the configuration comes from.
    #[command(flatten)]
    pub source: SourceArgs,

    /// `host:port` of the CA service that signs this node's workload certificates
    /// (`mesh-ca`, or istiod: the same gRPC service). The signing key is never on the
    /// node: the agent sends CSRs, authenticated by its token.
    #[arg(long, env = "MESH_CA_ADDRESS", default_value = "mesh-ca.istio-system.svc:15012")]
    pub ca_address: String,

    /// The DNS name in the CA service's certificate.
    #[arg(long, env = "MESH_CA_SERVER_NAME", default_value = "mesh-ca.istio-system.svc")]
    pub ca_server_name: String,

    /// PEM file of the mesh root(s): trusted at start, for the CA service and peers;
    /// the CA's trust bundle replaces it while running.
    #[arg(long, env = "MESH_CA_ROOT_CERT", default_value = "/var/run/mesh-ca/root-cert.pem")]
    pub ca_root_cert: PathBuf,

    /// The agent's token for the CA service (a projected service-account token in a
    /// cluster), read at each request.
    #[arg(long, env = "MESH_CA_TOKEN_FILE")]
    pub ca_token_file: Option<PathBuf>,

    /// How often the agent asks the CA service for the mesh's trust bundle, e.g. `30s`:
    /// how soon a root rotation reaches it.
    #[arg(long, env = "MESH_TRUST_REFRESH", default_value = "30s", value_parser = parse_duration)]
    pub trust_refresh: Duration,

    /// How often the agent asks the CA service which other clusters the mesh has (the
    /// remote secrets), e.g. `10s`: how soon a new or removed remote secret takes
    /// effect.
    #[arg(long, env = "MESH_REMOTE_CLUSTERS_REFRESH", default_value = "10s", value_parser = parse_duration)]
    pub remote_clusters_refresh: Duration,

    /// SPIFFE trust domain of this mesh.
    #[arg(long, env = "MESH_TRUST_DOMAIN", default_value = "cluster.local", value_parser = crate::identity::parse_trust_domain)]
    pub trust_domain: String,

    /// Other trust domains whose identities are accepted (migrations, multi-cluster).
    #[arg(
        long = "trust-domain-alias",
        env = "MESH_TRUST_DOMAIN_ALIASES",
        value_delimiter = ',',
        value_parser = crate::identity::parse_trust_domain
    )]
    pub trust_domain_aliases: Vec<String>,

    /// Namespace whose PeerAuthentication and AuthorizationPolicy apply mesh-wide
    #[arg(long, env = "MESH_ROOT_NAMESPACE", default_value = "istio-system")]
    pub root_namespace: String,

    /// cgroup v2 directory of this node's pods; the capture programs attach here, and
    /// pods' cgroups are found below it by UID, in kubelet's layouts (never by name).
    /// Relative paths are resolved against the cgroup2 mount found in /proc/mounts.
    /// Required for the node agent; a gateway captures nothing.
    #[arg(long, env = "MESH_NODE_CGROUP", required_if_eq("mode", "agent"))]
    pub node_cgroup: Option<PathBuf>,

    /// cgroup v2 directory of the node's kubelet: its connections to pods are probes,
    /// which the kernel lets through to the application even under STRICT (recognised
    /// by the cgroup they come from, not by their address). Relative paths are resolved
    /// against the cgroup2 mount. Default: `system.slice/kubelet.service` where it
    /// exists (systemd's unit); without one, probes are judged as any plaintext.
    #[arg(long, env = "MESH_KUBELET_CGROUP")]
    pub kubelet_cgroup: Option<PathBuf>,

    /// Unix socket on which the CNI plugin (`mesh-cni`) hands the agent each new pod
    /// before its containers start. Its directory is made 0700, the socket 0600.
    #[arg(long, env = "MESH_CNI_SOCKET", default_value = crate::cni::DEFAULT_SOCKET)]
    pub cni_socket: PathBuf,

    /// Node directory of CNI network configurations (`/etc/cni/net.d` as the agent sees
    /// it): when set, the agent chains `mesh-cni` into the first one at start.
    #[arg(long, env = "MESH_CNI_CONF_DIR", requires = "cni_bin_dir")]
    pub cni_conf_dir: Option<PathBuf>,

    /// Node directory of CNI plugin binaries (`/opt/cni/bin`), where `mesh-cni` is copied.
    #[arg(long, env = "MESH_CNI_BIN_DIR", requires = "cni_conf_dir")]
    pub cni_bin_dir: Option<PathBuf>,

    /// The `mesh-cni` binary to install (default: next to the agent's own binary).
    #[arg(long, env = "MESH_CNI_PLUGIN")]
    pub cni_plugin: Option<PathBuf>,

    /// Namespaces whose pods the CNI plugin never holds for the agent (the mesh's own,
    /// so the agent's pod can always start).
    #[arg(
        long,
        env = "MESH_CNI_EXCLUDE_NAMESPACES",
        value_delimiter = ',',
        default_value = "kube-system,istio-system"
    )]
    pub cni_exclude_namespaces: Vec<String>,

    /// `/proc` of the host PID namespace (the DaemonSet runs with hostPID).
    #[arg(long, env = "MESH_PROC_DIR", default_value = "/proc")]
    pub proc_dir: PathBuf,

    /// bpffs directory where this node's maps and links are pinned.
    #[arg(long, env = "MESH_BPF_PIN_DIR")]
    pub bpf_pin_dir: Option<PathBuf>,

    /// Admin server (config dump, health).
    #[arg(long, env = "MESH_ADMIN_ADDR", default_value = "127.0.0.1:15000")]
    pub admin_addr: SocketAddr,

    /// Prometheus metrics.
    #[arg(long, env = "MESH_METRICS_ADDR", default_value = "0.0.0.0:15020")]
    pub metrics_addr: SocketAddr,

    /// Who may read `/metrics` on the metrics and readiness addresses: `kubernetes`
    /// (TokenReview, then SubjectAccessReview for `get` on the path, as
    /// kube-rbac-proxy does), `token-file:PATH` (bearer tokens, one per line), `none`,
    /// or `auto` (`kubernetes` with the Kubernetes config source, else `none`). The
    /// admin address (loopback) is not checked.
    #[arg(long, env = "MESH_METRICS_AUTH", default_value = "auto")]
    pub metrics_auth: crate::admin::ScrapeAuthMode,

    /// Readiness probe (`/healthz/ready`).
    #[arg(long, env = "MESH_READINESS_ADDR", default_value = "0.0.0.0:15021")]
    pub readiness_addr: SocketAddr,

    /// Lifetime of workload certificates, e.g. `24h`, `90m`.
    #[arg(long, env = "MESH_CERT_TTL", default_value = "24h", value_parser = parse_duration)]
    pub cert_ttl: Duration,

    /// How long to drain connections on SIGTERM, e.g. `10s`.
    #[arg(long, env = "MESH_DRAIN_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub drain_timeout: Duration,

    /// Socket mark that exempts a socket from capture (0 disables).
    #[arg(long, env = "MESH_BYPASS_MARK", default_value_t = DEFAULT_BYPASS_MARK)]
    pub bypass_mark: u32,

    /// Outbound destination ports that are never captured (comma separated).
    #[arg(long, env = "MESH_EXCLUDE_PORTS", value_delimiter = ',')]
    pub exclude_ports: Vec<u16>,

    /// Proxied connections one source pod may hold on this node; more are closed at
    /// once, logged and counted (`istio_mesh_connections_refused_total`).
    #[arg(long, env = "MESH_MAX_CONNECTIONS_PER_SOURCE", default_value_t = crate::transport::limits::DEFAULT_PER_SOURCE)]
    pub max_connections_per_source: usize,

    /// Proxied connections the node may hold (default: from the file-descriptor limit,
    /// raised to its hard limit at start, two per connection).
    #[arg(long, env = "MESH_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,

    /// A spliced TCP connection with no byte either way for this long is closed, e.g.
    /// `1h` (Istio's default).
    #[arg(long, env = "MESH_TCP_IDLE_TIMEOUT", default_value = "1h", value_parser = parse_duration)]
    pub tcp_idle_timeout: Duration,

    /// A pooled HBONE connection to a peer agent with no stream for this long is closed
    /// (ztunnel's pool closes after 5 minutes too).
    #[arg(long, env = "MESH_POOL_IDLE_TIMEOUT", default_value = "5m", value_parser = parse_duration)]
    pub pool_idle_timeout: Duration,

    /// Where enrolled pods may connect outside the registry (Services, pods,
    /// ServiceEntries): `ALLOW_ANY`, or `REGISTRY_ONLY` (the rest is refused, logged
    /// and counted), as Istio's `meshConfig.outboundTrafficPolicy.mode`.
    #[arg(long, env = "MESH_OUTBOUND_TRAFFIC_POLICY", value_enum, default_value = "ALLOW_ANY")]
    pub outbound_traffic_policy: crate::state::OutboundPolicy,

    /// The only directory whose files a DestinationRule's TLS origination may name
    /// (`caCertificates`, `clientCertificate`, `privateKey`): the agent is shared by every
    /// tenant of the node, so a rule may not make it read any other file. Mount the
    /// certificates there (a Secret volume).
    #[arg(long, env = "MESH_EGRESS_TLS_DIR", default_value = "/etc/mesh/egress-tls")]
    pub egress_tls_dir: PathBuf,

    /// Log format: `text` or `json`.
    #[arg(long, env = "MESH_LOG_FORMAT", default_value = "text")]
    pub log_format: LogFormat,

    /// Whether enrolled pods' DNS queries (UDP to port 53) go to the agent's DNS proxy,
    /// which answers for Services and ServiceEntry hosts and forwards the rest
    /// unchanged: `on` or `off` (`true`/`false`, as Istio's
    /// `values.cni.ambient.dnsCapture`). A namespace label or pod annotation
    /// `ambient.istio.io/dns-capture: "true"|"false"` overrides it for its pods.
    #[arg(long, env = "MESH_DNS_CAPTURE", value_enum, default_value = "off")]
    pub dns_capture: DnsCapture,

    /// Where the DNS proxy forwards what it does not answer (`ip:port`, comma
    /// separated, tried in order); default: the nameservers of the agent's own
    /// `/etc/resolv.conf` (the cluster DNS, for a DaemonSet with
    /// `dnsPolicy: ClusterFirstWithHostNet`).
    #[arg(long, env = "MESH_DNS_UPSTREAM", value_delimiter = ',')]
    pub dns_upstream: Vec<SocketAddr>,

    /// Whether allowed inbound HTTP (by protocol selection, or detected on ports that
    /// declare nothing) is served per request so the destination's agent reports
    /// request metrics (`istio_requests_total{reporter="destination"}`) for every HTTP
    /// workload, not only those with L7 policies: `on` or `off` (spliced as TCP, which
    /// costs less per request).
    #[arg(long, env = "MESH_L7_TELEMETRY", value_enum, default_value = "on")]
    pub l7_telemetry: Switch,

    /// Whether applications see their client's address as the peer of connections
    /// the agent delivers (as without a mesh, and as ztunnel's in-pod mode does): `on`
    /// sets each pod's namespace up for it (a routing rule and route for marked
    /// sockets, `net.ipv4.tcp_fwmark_accept`); `off` delivers from the pod's own
    /// address.
    #[arg(long, env = "MESH_INBOUND_TRANSPARENT", value_enum, default_value = "on")]
    pub inbound_transparent: Switch,

    /// Whether connections the agent has admitted and only copies (TCP both ways, no
    /// HTTP read) are spliced in the kernel (`on`: a sockmap verdict program passes
    /// their bytes on without waking the agent) or copied by the agent (`off`).
    #[arg(long, env = "MESH_KERNEL_SPLICE", value_enum, default_value = "on")]
    pub kernel_splice: Switch,

    /// Whether a pair of this node's pods (client pod, peer pod's address and port)
    /// the agent has admitted, and would only pass bytes for, connects directly from
    /// then on (`on`: the kernel sends the pair's next connections straight to the
    /// peer's application, and reports them to the agent) or always through the agent
    /// (`off`).
    #[arg(long, env = "MESH_SAME_NODE_DIRECT", value_enum, default_value = "on")]
    pub same_node_direct: Switch,

    /// Access log of every HTTP request and TCP connection, on standard output: `off`,
    /// `text` (Envoy's default format, as Istio's `accessLogFile` writes it) or `json`
    /// (Istio's JSON field names, plus both sides' SPIFFE identities). Written by a task
    /// of its own: when standard output falls behind, lines are dropped and counted
    /// (`istio_mesh_access_log_dropped_total`), never waited for.
    #[arg(long, env = "MESH_ACCESS_LOG", value_enum, default_value = "off")]
    pub access_log: crate::telemetry::access_log::Format,

    /// Where to export trace spans over OTLP: `http://host:port[/path]` (OTLP/HTTP,
    /// protobuf, `/v1/traces` by default) or `grpc://host:port` (OTLP/gRPC), such as
    /// Jaeger's collector. Unset: requests are not traced (their trace headers pass
    /// unchanged).
    #[arg(long, env = "MESH_TRACE_ENDPOINT")]
    pub trace_endpoint: Option<crate::telemetry::trace::Endpoint>,

    /// Percent of new traces recorded, 0 to 100 (Istio's
    /// `meshConfig.defaultConfig.tracing.sampling`, default 1). A request that carries a
    /// trace context keeps its caller's decision.
    #[arg(long, env = "MESH_TRACE_SAMPLING", default_value_t = 1.0, value_parser = parse_percent)]
    pub trace_sampling: f64,

    /// The cluster's id, which metrics, access logs and traces report as
    /// `source_cluster`/`destination_cluster` (Istio's `CLUSTER_ID`).
    #[arg(long, env = "MESH_CLUSTER_ID", default_value = crate::state::DEFAULT_CLUSTER_ID)]
    pub cluster_id: String,

    /// The network this cluster's pods are on (Istio's `values.global.network`):
    /// pods labelled `topology.istio.io/network` (or in a namespace so labelled) with
    /// another network are reached through that network's east-west gateway (double
    /// HBONE), and are no Service endpoints while none is known. Empty: no network
    /// named, every pod reached directly.
    #[arg(long, env = "MESH_NETWORK", default_value = "")]
    pub network: String,

    /// glibc malloc arenas at most (`M_ARENA_MAX`). One: under 1,000 new connections a
    /// second for minutes the agent's memory stays flat, where an arena per worker
    /// thread (glibc's default) kept 1 MiB more, fragmented beyond what a trim
    /// releases, at about the same CPU per connection (within 4% in a 2-minute run of
    /// each; docs/benchmarks.md, "Connection churn").
    #[arg(long, env = "MESH_MALLOC_ARENAS", default_value_t = 1, value_parser = clap::value_parser!(i32).range(1..=64))]
    pub malloc_arenas: i32,

    /// Whether the agent unmaps the pages of its code and read-only data that one-off
    /// work touched (starting up, a config compile, a pod's enrollment) once it has
    /// been quiet for two seconds. What it goes on running maps back from the page
    /// cache on its next use (a minor fault), so what stays resident is what serving
    /// runs: about half the resident text. `off` keeps every page ever touched mapped.
    #[arg(long, env = "MESH_UNMAP_ONE_OFF_PAGES", value_enum, default_value = "on")]
    pub unmap_one_off_pages: Switch,

    /// The mesh's id (Istio's `values.global.meshID`), which traces report as
    /// `istio.mesh_id`. Empty: the trust domain, as Istio defaults it.
    #[arg(long, env = "MESH_MESH_ID", default_value = "")]
    pub mesh_id: String,
}

/// `--dns-capture`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DnsCapture {
    /// Pods' DNS goes where they send it, unless their namespace or pod says otherwise.
    #[value(alias = "false")]
    Off,
    /// Pods' DNS goes to the agent, unless their namespace or pod says otherwise.
    #[value(alias = "true")]
    On,
}

fn parse_percent(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(p) if (0.0..=100.0).contains(&p) => Ok(p),
        _ => Err(format!("{s}: a percentage from 0 to 100")),
    }
}

/// A feature that is `on` or `off` (`true`/`false`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Switch {
    /// Off.
    #[value(alias = "false")]
    Off,
    /// On.
    #[value(alias = "true")]
    On,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

impl LogFormat {
    /// Sends the process's logs to stderr in this format, filtered by `MESH_LOG`
    /// (default `info`), coloured only on a terminal.
    pub fn init(self) {
        use std::io::IsTerminal as _;
        let filter = tracing_subscriber::EnvFilter::try_from_env("MESH_LOG")
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
        let builder = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .with_ansi(std::io::stderr().is_terminal());
        match self {
            LogFormat::Json => builder.json().init(),
            LogFormat::Text => builder.init(),
        }
    }
}

impl Settings {
    /// What the snapshot compilation needs of the mesh.
    pub fn mesh_scope(&self) -> crate::state::MeshScope {
        crate::state::MeshScope {
            trust_domain: self.trust_domain.clone(),
            aliases: self.trust_domain_aliases.clone(),
            root_namespace: self.root_namespace.clone(),
            outbound: self.outbound_traffic_policy,
            dns_capture: self.dns_capture == DnsCapture::On,
            cluster_id: self.cluster_id.clone(),
            network: self.network.clone(),
        }
    }

    /// The mesh's id: `--mesh-id`, else the trust domain.
    pub fn mesh_id(&self) -> String {
        if self.mesh_id.is_empty() { self.trust_domain.clone() } else { self.mesh_id.clone() }
    }

    /// Every trust domain whose identities are accepted.
    pub fn accepted_trust_domains(&self) -> Vec<String> {
        let mut tds = vec![self.trust_domain.clone()];
        tds.extend(self.trust_domain_aliases.iter().cloned());
        tds
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;

    #[test]
    fn the_install_values_for_a_cluster_reach_the_mesh_scope_and_traces() {
        let s = Settings::try_parse_from([
            "mesh-agent",
            "--node",
            "node1",
            "--cluster-id",
            "cluster1",
            "--network",
            "network1",
        ])
        .unwrap();
        let mesh = s.mesh_scope();
        assert_eq!((mesh.cluster_id.as_str(), mesh.network.as_str()), ("cluster1", "network1"));
        assert_eq!(s.mesh_id(), "cluster.local", "without a mesh id, traces name the trust domain, as Istio's do");
        let s = Settings::try_parse_from(["mesh-agent", "--node", "node1", "--mesh-id", "mesh1"]).unwrap();
        assert_eq!(s.mesh_id(), "mesh1");
        assert!(s.mesh_scope().network.is_empty(), "no network named: every pod is reached directly");
    }
}

//! The peer baseline: HAProxy as sidecars. One mTLS client proxy in the client pod and
//! one mTLS server proxy in each server pod, TLS 1.3 only, with certificates from the
//! lab's mesh CA for the same SPIFFE identities the mesh uses.

use std::fs;
use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use mesh_tests::lab::Lab;

/// Port the server-side proxies take mTLS HTTP on, in each server pod.
const SERVER_HTTP_PORT: u16 = 18443;
/// Port the server-side proxies take mTLS iperf3 traffic on.
const SERVER_IPERF_PORT: u16 = 18444;
/// First local port of the client-side proxy; each server gets two (HTTP, iperf3).
const CLIENT_BASE_PORT: u16 = 18080;

/// The running sidecars.
pub struct Peer {
    client_helper: String,
    servers: Vec<String>,
}

fn server_helper(server: &str) -> String {
    format!("peer-server-{server}")
}

impl Peer {
    /// Writes certificates and configs and starts the proxies; returns once all listen.
    pub fn start(lab: &mut Lab, haproxy: &Path, client: &str, servers: [(&str, Ipv4Addr); 2]) -> anyhow::Result<Self> {
        let dir = lab.state_dir.join("bench/peer");
        fs::create_dir_all(&dir)?;
        let ca = lab.ca_dir();
        let issuer = Issuer::load(&ca)?;
        let root_pem = ca.join("ca-cert.pem");
        let client_pem = issuer.write_leaf(&dir, "client", "spiffe://cluster.local/ns/production/sa/frontend")?;
        let server_pem = issuer.write_leaf(&dir, "server", "spiffe://cluster.local/ns/production/sa/myapp")?;

        let mut client_cfg = String::from(GLOBAL);
        for (i, (server, ip)) in servers.iter().enumerate() {
            let (http, iperf) = local_ports(i);
            for (name, local, remote) in [("http", http, SERVER_HTTP_PORT), ("iperf", iperf, SERVER_IPERF_PORT)] {
                client_cfg.push_str(&format!(
                    "frontend {name}_{server}\n  bind 127.0.0.1:{local}\n  default_backend {name}_{server}\n\
                     backend {name}_{server}\n  server s {ip}:{remote} ssl crt {c} ca-file {r} verify required \
                     ssl-min-ver TLSv1.3\n",
                    c = client_pem.display(),
                    r = root_pem.display(),
                ));
            }
        }
        let client_file = dir.join("client.cfg");
        fs::write(&client_file, client_cfg)?;
        let client_helper = "peer-client".to_string();
        lab.start_helper(&client_helper, client, &haproxy_argv(haproxy, &client_file))?;

        let mut started = Vec::new();
        for (server, ip) in servers {
            let mut cfg = String::from(GLOBAL);
            for (name, port, app) in [("http", SERVER_HTTP_PORT, 8080), ("iperf", SERVER_IPERF_PORT, super::IPERF_PORT)]
            {
                cfg.push_str(&format!(
                    "frontend {name}\n  bind {ip}:{port} ssl crt {s} ca-file {r} verify required ssl-min-ver TLSv1.3\n  \
                     default_backend {name}\nbackend {name}\n  server app 127.0.0.1:{app}\n",
                    s = server_pem.display(),
                    r = root_pem.display(),
                ));
            }
            let file = dir.join(format!("server-{server}.cfg"));
            fs::write(&file, cfg)?;
            lab.start_helper(&server_helper(server), server, &haproxy_argv(haproxy, &file))?;
            started.push(server.to_string());
        }
        let peer = Self { client_helper, servers: started };
        for (i, _) in servers.iter().enumerate() {
            wait_http(lab, client, local_ports(i).0)?;
        }
        Ok(peer)
    }

    /// The client proxy's local (HTTP, iperf3) ports towards `server`.
    pub fn local_ports(&self, server: &str) -> anyhow::Result<(u16, u16)> {
        let i = self.servers.iter().position(|s| s == server).with_context(|| format!("no peer proxy for {server}"))?;
        Ok(local_ports(i))
    }

    /// cgroups of the two proxies on the path to `server`.
    pub fn cgroups(&self, lab: &Lab, server: &str) -> anyhow::Result<Vec<PathBuf>> {
        [self.client_helper.clone(), server_helper(server)]
            .iter()
            .map(|name| {
                let h = lab.helpers.iter().find(|h| &h.name == name).with_context(|| format!("helper {name}"))?;
                Ok(lab.cgroup_root.join(&h.cgroup))
            })
            .collect()
    }

    /// Stops every proxy.
    pub fn stop(self, lab: &mut Lab) -> anyhow::Result<()> {
        lab.stop_helper(&self.client_helper)?;
        for s in &self.servers {
            lab.stop_helper(&server_helper(s))?;
        }
        Ok(())
    }
}

fn local_ports(i: usize) -> (u16, u16) {
    let base = CLIENT_BASE_PORT + 2 * i as u16;
    (base, base + 1)
}

/// Defaults as a sidecar would run them: TCP mode (a tunnel, like the mesh's L4 path),
/// HAProxy's own thread count, generous timeouts.
const GLOBAL: &str = "global\n  maxconn 4000\n\
defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 120s\n  timeout server 120s\n";

fn haproxy_argv(haproxy: &Path, cfg: &Path) -> Vec<String> {
    // -db: stay in the foreground, so the lab owns the process and its cgroup.
    vec![haproxy.display().to_string(), "-db".into(), "-f".into(), cfg.display().to_string()]
}

fn wait_http(lab: &Lab, client: &str, port: u16) -> anyhow::Result<()> {
    let url = format!("http://127.0.0.1:{port}/bytes/1");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = lab.exec(client, &["curl", "-sf", "-m", "2", "-o", "/dev/null", &url])?;
        if out.status.success() {
            return Ok(());
        }
        if Instant::now() > deadline {
            let logs = lab.state_dir.join("logs");
            bail!("peer proxies not answering on {url}; see {}/helper-peer-*.log", logs.display());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Port the HAProxy HTTPS edge listens on, in the gateway pod's netns (the gateway's
/// own servers keep 80 and 443).
const EDGE_PORT: u16 = 18445;

/// The ingress baseline: HAProxy as a conventional HTTPS edge, terminating TLS with a
/// certificate for the ingress host and forwarding plain HTTP to the pod.
pub struct Edge {
    helper: String,
    ca: PathBuf,
    ip: Ipv4Addr,
    /// The port clients reach it on.
    pub port: u16,
}

impl Edge {
    /// Starts it in `pod`'s netns, in front of `server_ip:8080`; returns once it answers.
    pub fn start(lab: &mut Lab, haproxy: &Path, pod: &str, server_ip: Ipv4Addr) -> anyhow::Result<Self> {
        let dir = lab.state_dir.join("bench/edge");
        fs::create_dir_all(&dir)?;
        let ca_dir = lab.ca_dir();
        let crt = Issuer::load(&ca_dir)?.write_dns_leaf(&dir, "edge", super::INGRESS_HOST)?;
        let ip = lab.pod(pod)?.ip;
        let cfg = format!(
            "global\n  maxconn 4000\n\
             defaults\n  mode http\n  timeout connect 5s\n  timeout client 120s\n  timeout server 120s\n\
             frontend https\n  bind {ip}:{EDGE_PORT} ssl crt {c} ssl-min-ver TLSv1.2\n  default_backend app\n\
             backend app\n  http-reuse always\n  server app {server_ip}:8080\n",
            c = crt.display(),
        );
        let file = dir.join("edge.cfg");
        fs::write(&file, cfg)?;
        let helper = "edge-https".to_string();
        lab.start_helper(&helper, pod, &haproxy_argv(haproxy, &file))?;
        let edge = Self { helper, ca: ca_dir.join("ca-cert.pem"), ip, port: EDGE_PORT };
        let deadline = Instant::now() + Duration::from_secs(10);
        let url = format!("https://{}:{EDGE_PORT}/bytes/1", super::INGRESS_HOST);
        loop {
            let args = edge.curl_args();
            let mut argv =
                vec!["ip", "netns", "exec", mesh_tests::lab::CLIENT_NETNS, "curl", "-sf", "-m", "2", "-o", "/dev/null"];
            argv.extend(args.iter().map(String::as_str));
            argv.push(&url);
            if mesh_tests::sys::output(&argv).is_ok_and(|o| o.status.success()) {
                return Ok(edge);
            }
            if Instant::now() > deadline {
                bail!(
                    "the HAProxy edge is not answering on {url}; see {}/logs/helper-edge-https.log",
                    lab.state_dir.display()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn curl_args(&self) -> Vec<String> {
        let resolve = format!("{}:{}:{}", super::INGRESS_HOST, self.port, self.ip);
        vec!["--cacert".into(), self.ca.display().to_string(), "--resolve".into(), resolve]
    }

    /// oha's arguments to reach it by name.
    pub fn oha_args(&self) -> Vec<String> {
        let to = format!("{host}:{p}:{ip}:{p}", host = super::INGRESS_HOST, p = self.port, ip = self.ip);
        vec!["--cacert".into(), self.ca.display().to_string(), "--connect-to".into(), to]
    }

    /// Its cgroup.
    pub fn cgroups(&self, lab: &Lab) -> anyhow::Result<Vec<PathBuf>> {
        let h =
            lab.helpers.iter().find(|h| h.name == self.helper).with_context(|| format!("helper {}", self.helper))?;
        Ok(vec![lab.cgroup_root.join(&h.cgroup)])
    }

    /// Stops it.
    pub fn stop(self, lab: &mut Lab) -> anyhow::Result<()> {
        lab.stop_helper(&self.helper)
    }
}

/// The lab's mesh CA, to sign the peer's certificates.
struct Issuer(rcgen::Issuer<'static, rcgen::KeyPair>);

impl Issuer {
    fn load(ca_dir: &Path) -> anyhow::Result<Self> {
        let read = |f: &str| {
            fs::read_to_string(ca_dir.join(f)).with_context(|| format!("reading {f} in {}", ca_dir.display()))
        };
        let key = rcgen::KeyPair::from_pem(&read("ca-key.pem")?)?;
        Ok(Self(rcgen::Issuer::from_ca_cert_pem(&read("ca-cert.pem")?, key)?))
    }

    /// Writes `<name>.pem`: certificate then key, as HAProxy's `crt` wants; mode 0600.
    fn write_leaf(&self, dir: &Path, name: &str, spiffe: &str) -> anyhow::Result<PathBuf> {
        self.write_with(dir, name, rcgen::SanType::URI(spiffe.try_into()?))
    }

    /// [`Issuer::write_leaf`] for a DNS name.
    fn write_dns_leaf(&self, dir: &Path, name: &str, dns: &str) -> anyhow::Result<PathBuf> {
        self.write_with(dir, name, rcgen::SanType::DnsName(dns.try_into()?))
    }

    fn write_with(&self, dir: &Path, name: &str, san: rcgen::SanType) -> anyhow::Result<PathBuf> {
        let key = rcgen::KeyPair::generate()?;
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        params.subject_alt_names = vec![san];
        let cert = params.signed_by(&key, &self.0)?;
        let path = dir.join(format!("{name}.pem"));
        fs::write(&path, "")?;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600))?;
        fs::write(&path, format!("{}{}", cert.pem(), key.serialize_pem()))?;
        Ok(path)
    }
}

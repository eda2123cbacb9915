//! Two clusters of the lab on one wire (`cargo xtask lab up --clusters 2`): cluster1 on
//! network1 and cluster2 on network2, each with its own nodes, pod networks, CA
//! service and API server double, joined as Istio's multi-primary, multi-network
//! install joins them.
//!
//! - One root, one intermediate per cluster: each CA service signs with its cluster's
//!   intermediate (Istio's plug-in CA files), so the clusters' workloads verify each
//!   other through the shared root.
//! - Each cluster's config holds a remote secret for the other (the format `meshctl x
//!   create-remote-secret` prints): a kubeconfig for the other cluster's API server
//!   double (`mesh-apiserver`, in that cluster's CA netns, serving that cluster's config
//!   directory to the reader's token only).
//! - The pod networks are not routed to each other. A node reaches only the other
//!   network's east-west gateway address, as a load balancer's: a host route to it and
//!   SNAT to the node's wire address, so the gateway answers the node, never a pod of
//!   the other network.
//!
//! `down` removes cluster2 first (cluster1 owns the wire).

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use crate::lab::{API_PORT, Lab, Options, Placement, private};
use crate::sys::run;

/// Where cluster2's lab state lives (cluster1's is the single lab's).
pub const CLUSTER2_STATE_DIR: &str = "/run/meshlab-cluster2";
/// The label that marks an east-west gateway pod (Istio's Gateway deployment label).
const EAST_WEST_GATEWAY: (&str, &str) = ("gateway.networking.k8s.io/gateway-name", "istio-eastwestgateway");
/// The remote secret's file in each cluster's config directory.
pub fn remote_secret_file(other: &str) -> String {
    format!("lab-remote-secret-{other}.yaml")
}

/// Both clusters.
#[derive(Debug)]
pub struct Clusters {
    /// cluster1, network1: the wire, the outside client and the first CA.
    pub cluster1: Lab,
    /// cluster2, network2.
    pub cluster2: Lab,
}

impl Clusters {
    /// Brings both clusters up from `cluster1` and `cluster2` (whose manifests, state
    /// directories and placements are set here) and joins them. On failure, whatever
    /// was made is removed.
    pub fn up(mut cluster1: Options, mut cluster2: Options) -> anyhow::Result<Self> {
        let pki = std::env::temp_dir().join(format!("meshlab-pki-{}", std::process::id()));
        let made = write_plugin_cas(&pki, &["cluster1", "cluster2"]);
        let result = made.and_then(|()| {
            cluster1.placement = Placement::cluster(1);
            cluster1.plugin_ca = Some(pki.join("cluster1"));
            cluster2.placement = Placement::cluster(2);
            cluster2.plugin_ca = Some(pki.join("cluster2"));
            let one = Lab::up(&cluster1)?;
            match Lab::up(&cluster2) {
                Ok(two) => Ok(Self { cluster1: one, cluster2: two }),
                Err(e) => {
                    let _ = one.down();
                    Err(e)
                }
            }
        });
        let _ = std::fs::remove_dir_all(&pki);
        let mut clusters = result?;
        if let Err(e) = clusters.join() {
            let _ = clusters.down();
            return Err(e);
        }
        Ok(clusters)
    }

    /// Reads both clusters' state.
    pub fn load(cluster1: &Path) -> anyhow::Result<Self> {
        Ok(Self { cluster1: Lab::load(cluster1)?, cluster2: Lab::load(Path::new(CLUSTER2_STATE_DIR))? })
    }

    /// Whether a two-cluster lab is up.
    pub fn exists() -> bool {
        Lab::exists(Path::new(CLUSTER2_STATE_DIR))
    }

    /// Removes cluster2, then cluster1.
    pub fn down(self) -> anyhow::Result<()> {
        let two = self.cluster2.down();
        self.cluster1.down()?;
        two
    }

    /// The lab of a cluster by name.
    pub fn cluster(&self, name: &str) -> anyhow::Result<&Lab> {
        [&self.cluster1, &self.cluster2]
            .into_iter()
            .find(|l| l.placement.cluster == name)
            .with_context(|| format!("no cluster {name:?} (cluster1, cluster2)"))
    }

    /// Each cluster's API server, the remote secrets, and the routes to the other
    /// network's east-west gateway.
    fn join(&mut self) -> anyhow::Result<()> {
        let one = self.cluster1.start_api_server()?;
        let two = self.cluster2.start_api_server()?;
        write_remote_secret(&self.cluster1, "cluster2", &two)?;
        write_remote_secret(&self.cluster2, "cluster1", &one)?;
        route_to_gateway(&self.cluster1, &self.cluster2)?;
        route_to_gateway(&self.cluster2, &self.cluster1)?;
        Ok(())
    }

    /// Removes `cluster`'s remote secret for the other cluster; returns the file, to
    /// put back with [`Clusters::restore_remote_secret`].
    pub fn remove_remote_secret(&self, cluster: &str, other: &str) -> anyhow::Result<String> {
        let lab = self.cluster(cluster)?;
        let path = lab.config_dir().join(remote_secret_file(other));
        let text = std::fs::read_to_string(&path).with_context(|| format!("{}", path.display()))?;
        std::fs::remove_file(&path)?;
        Ok(text)
    }

    /// Puts a removed remote secret back.
    pub fn restore_remote_secret(&self, cluster: &str, other: &str, text: &str) -> anyhow::Result<()> {
        let lab = self.cluster(cluster)?;
        private(&lab.config_dir().join(remote_secret_file(other)), text)
    }

    /// Both clusters' status.
    pub fn status(&self) -> String {
        format!("{}\n{}", self.cluster1.status(), self.cluster2.status())
    }
}

/// The API server double of one cluster, as a remote secret names it.
#[derive(Debug, Clone)]
pub struct ApiEndpoint {
    /// `http://<ip>:<port>`.
    pub url: String,
    /// The reader's bearer token.
    pub token: String,
}

impl Lab {
    /// Starts this cluster's API server double in its CA's netns (the control plane's
    /// place on the wire), serving its config directory to a fresh reader token.
    pub fn start_api_server(&mut self) -> anyhow::Result<ApiEndpoint> {
        let token = crate::lab::random_token()?;
        let token_file = self.state_dir.join("tokens").join("api-reader");
        private(&token_file, &token)?;
        let addr = format!("{}:{API_PORT}", self.placement.ca_ip);
        let argv: Vec<String> = vec![
            self.echo_bin.with_file_name("mesh-apiserver").display().to_string(),
            "--listen".into(),
            addr.clone(),
            "--dir".into(),
            self.config_dir().display().to_string(),
            "--token-file".into(),
            token_file.display().to_string(),
        ];
        let child = self.spawn_in_ca(&argv, &self.state_dir.join("logs").join("mesh-apiserver.log"))?;
        self.api_pid = Some(child.id());
        self.save()?;
        let url = format!("http://{addr}");
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            let auth = format!("Authorization: Bearer {token}");
            if self.status_from_ca(&["-H", &auth, &format!("{url}/api/v1/pods")])? == "200" {
                return Ok(ApiEndpoint { url, token });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("mesh-apiserver of {} not answering at {url}", self.placement.cluster)
    }

    /// The east-west gateway pod's address, if the cluster has one.
    pub fn east_west_gateway(&self) -> Option<Ipv4Addr> {
        self.pods
            .iter()
            .find(|p| p.labels.get(EAST_WEST_GATEWAY.0).is_some_and(|v| v == EAST_WEST_GATEWAY.1))
            .map(|p| p.ip)
    }
}

/// A shared root and one intermediate per cluster, as Istio's
/// `tools/certs/Makefile.selfsigned.mk` makes them: `<dir>/<cluster>/` holds
/// `ca-cert.pem`, `ca-key.pem`, `root-cert.pem` and `cert-chain.pem`.
fn write_plugin_cas(dir: &Path, clusters: &[&str]) -> anyhow::Result<()> {
    let ca_params = |name: &str| -> anyhow::Result<rcgen::CertificateParams> {
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new())?;
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::DigitalSignature];
        p.distinguished_name.push(rcgen::DnType::OrganizationName, "Istio");
        p.distinguished_name.push(rcgen::DnType::CommonName, name);
        Ok(p)
    };
    let root_key = rcgen::KeyPair::generate()?;
    let root_params = ca_params("Root CA")?;
    let root_pem = root_params.self_signed(&root_key)?.pem();
    let root = rcgen::Issuer::new(root_params, root_key);
    for cluster in clusters {
        let out = dir.join(cluster);
        std::fs::create_dir_all(&out)?;
        let key = rcgen::KeyPair::generate()?;
        let mut params = ca_params("Intermediate CA")?;
        params.distinguished_name.push(rcgen::DnType::LocalityName, *cluster);
        let cert = params.signed_by(&key, &root)?;
        std::fs::write(out.join("ca-cert.pem"), cert.pem())?;
        private(&out.join("ca-key.pem"), &key.serialize_pem())?;
        std::fs::write(out.join("root-cert.pem"), &root_pem)?;
        std::fs::write(out.join("cert-chain.pem"), format!("{}{root_pem}", cert.pem()))?;
    }
    Ok(())
}

/// Writes into `lab`'s config the remote secret for cluster `other`, whose API server
/// is `api`, as `meshctl x create-remote-secret --name <other>` prints it.
fn write_remote_secret(lab: &Lab, other: &str, api: &ApiEndpoint) -> anyhow::Result<()> {
    let kubeconfig = format!(
        "apiVersion: v1\nkind: Config\ncurrent-context: {other}\n\
         clusters: [{{name: {other}, cluster: {{server: \"{}\"}}}}]\n\
         users: [{{name: mesh-reader-{other}, user: {{token: {}}}}}]\n\
         contexts: [{{name: {other}, context: {{cluster: {other}, user: mesh-reader-{other}}}}}]\n",
        api.url, api.token
    );
    let indented: String = kubeconfig.lines().map(|l| format!("    {l}\n")).collect();
    let secret = format!(
        "# The remote secret for {other}: what `meshctl x create-remote-secret --name {other}` prints.\n\
         apiVersion: v1\nkind: Secret\nmetadata:\n  name: istio-remote-secret-{other}\n  namespace: istio-system\n  \
         labels: {{istio/multiCluster: \"true\"}}\n  annotations: {{networking.istio.io/cluster: {other}}}\n\
         type: Opaque\nstringData:\n  {other}: |\n{indented}"
    );
    private(&lab.config_dir().join(remote_secret_file(other)), &secret)
}

/// Lets `from`'s nodes reach `to`'s east-west gateway, and nothing else of `to`'s
/// network: a host route through the gateway's node, and SNAT to the node's own wire
/// address (a load balancer's clients are the nodes, not the pods).
fn route_to_gateway(from: &Lab, to: &Lab) -> anyhow::Result<()> {
    let Some(gateway) = to.east_west_gateway() else { return Ok(()) };
    let pod = to.pods.iter().find(|p| p.ip == gateway).expect("the gateway is a pod");
    let via = to.node(&pod.node)?.wire_ip.to_string();
    let dest = format!("{gateway}/32");
    for n in &from.nodes {
        run(&["ip", "-n", &n.netns, "route", "add", &dest, "via", &via])?;
        run(&[
            "ip",
            "netns",
            "exec",
            &n.netns,
            "iptables",
            "-t",
            "nat",
            "-A",
            "POSTROUTING",
            "-d",
            &dest,
            "-o",
            "wire0",
            "-j",
            "MASQUERADE",
        ])?;
    }
    Ok(())
}

/// The default state directories of a two-cluster lab: cluster1's is the single lab's.
pub fn state_dirs(cluster1: &Path) -> (PathBuf, PathBuf) {
    (cluster1.to_path_buf(), PathBuf::from(CLUSTER2_STATE_DIR))
}

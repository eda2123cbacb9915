//! The mesh's edge: a gateway workload (the agent binary in gateway mode) serving the
//! Istio Gateways whose selector picks it. Each server port gets a listener; TLS is
//! terminated with the certificate of the server the client's SNI names; requests are
//! routed by the VirtualServices bound to the Gateway with the same L7 engine the node
//! agents use ([`crate::l7`]), and reach the mesh through the same [`Dialer`]: mutual TLS
//! over HBONE as the gateway's own identity.
//!
//! Architecture invariant: a configuration change never drops a live connection. A
//! listener's plan (servers, certificates) is swapped whole and read once per
//! connection; a port that stays keeps its socket; a server whose certificate cannot be
//! built keeps the last one that could.
//!
//! [`Dialer`]: crate::transport::Dialer

mod east_west;
mod listener;
pub mod tls;

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::gateway::{Server, TlsMode};
use crate::dataplane::Netns;
use crate::snapshot::Snapshot;
use crate::state::Workload;
use crate::transport::limits::ConnLimits;
use tls::{Secrets, Terminated};

/// What every listener of a gateway shares.
#[derive(Debug, Clone)]
pub struct GatewayContext {
    /// The L7 engine: snapshot, dialer, runtime, metrics, drain signal.
    pub l7: crate::l7::Context,
    /// The network namespace the gateway dials from.
    pub netns: Arc<Netns>,
    /// Connection caps per client address and in all.
    pub limits: Arc<ConnLimits>,
    /// Every connection task, for draining.
    pub tasks: TaskTracker,
    /// A spliced (TCP or PASSTHROUGH) connection idle this long is closed.
    pub tcp_idle_timeout: std::time::Duration,
}

/// One server a port serves.
#[derive(Debug, Clone)]
struct PlannedServer {
    /// The Gateway it belongs to.
    gateway: Arc<str>,
    /// Host patterns (namespace part dropped): `*`, `*.suffix` or names.
    hosts: Vec<String>,
    /// The TLS it terminates; None for plaintext HTTP and for PASSTHROUGH.
    tls: Option<Terminated>,
    /// PASSTHROUGH: TLS routed by SNI to a destination that terminates it.
    passthrough: bool,
    /// TCP: bytes routed by VirtualService `tcp:` rules.
    opaque: bool,
    /// HBONE: the outer tunnel of double HBONE ends here (an east-west gateway).
    east_west: bool,
}

/// What one port serves, swapped whole on each change.
#[derive(Debug, Clone)]
struct PortPlan {
    port: u16,
    /// The gateway's own workload (source of every request it forwards).
    workload: Arc<Workload>,
    servers: Vec<PlannedServer>,
    /// The Gateways of `servers`, each once, in order: asked in turn for a request's
    /// host or a connection's route (made once per change, not per connection).
    gateways: Arc<[Arc<str>]>,
}

impl PortPlan {
    /// A port terminates TLS when its servers do (Istio refuses mixing on one port).
    fn terminates_tls(&self) -> bool {
        self.servers.iter().any(|s| s.tls.is_some())
    }

    /// A TCP port: its servers route bytes, not requests.
    fn is_opaque(&self) -> bool {
        self.servers.iter().all(|s| s.opaque)
    }

    /// Whether a PASSTHROUGH server of this port serves `sni`.
    fn passes_through(&self, sni: &str) -> bool {
        let sni = sni.to_ascii_lowercase();
        self.servers.iter().filter(|s| s.passthrough).flat_map(|s| &s.hosts).any(|h| match h.strip_prefix('*') {
            Some(suffix) => sni.ends_with(&suffix.to_ascii_lowercase()),
            None => h.eq_ignore_ascii_case(&sni),
        })
    }

    /// The TLS server for a client's SNI: the most specific host that covers it, then
    /// one with `*`; without SNI, the only server of the port.
    fn server_for_sni(&self, sni: Option<&str>) -> Option<&PlannedServer> {
        let tls_servers = || self.servers.iter().filter(|s| s.tls.is_some());
        let Some(sni) = sni else {
            let mut all = tls_servers();
            return match (all.next(), all.next()) {
                (Some(only), None) => Some(only),
                _ => tls_servers().find(|s| s.hosts.iter().any(|h| h == "*")),
            };
        };
        let sni = sni.to_ascii_lowercase();
        let score = |h: &str| match h.strip_prefix('*') {
            Some("") => Some(0),
            Some(suffix) if sni.ends_with(&suffix.to_ascii_lowercase()) => Some(suffix.len()),
            Some(_) => None,
            None => h.eq_ignore_ascii_case(&sni).then_some(usize::MAX),
        };
        tls_servers()
            .filter_map(|s| Some((s.hosts.iter().filter_map(|h| score(h)).max()?, s)))
            .max_by_key(|(n, _)| *n)
            .map(|(_, s)| s)
    }

    fn new(port: u16, workload: Arc<Workload>, servers: Vec<PlannedServer>) -> Self {
        let mut gateways: Vec<Arc<str>> = Vec::new();
        for s in &servers {
            if !gateways.contains(&s.gateway) {
                gateways.push(s.gateway.clone());
            }
        }
        Self { port, workload, servers, gateways: gateways.into() }
    }
}

struct RunningPort {
    plan: Arc<ArcSwap<PortPlan>>,
    stop: CancellationToken,
}

/// The listeners of one gateway workload, kept in line with the configuration.
pub struct Gateway {
    ctx: GatewayContext,
    /// `namespace/name` of the gateway's own pod.
    pod: String,
    /// Where listeners bind (every address in the gateway's pod; one address in tests).
    bind: IpAddr,
    ports: BTreeMap<u16, RunningPort>,
    /// Last good TLS per server (gateway, port, hosts): kept when a new version of its
    /// Secret cannot be used.
    last_good: HashMap<String, Terminated>,
}

impl Gateway {
    /// A gateway for the pod `namespace/name`, binding on `bind`.
    pub fn new(ctx: GatewayContext, pod: String, bind: IpAddr) -> Self {
        Self { ctx, pod, bind, ports: BTreeMap::new(), last_good: HashMap::new() }
    }

    /// The gateway's pod, `namespace/name`.
    pub fn pod(&self) -> &str {
        &self.pod
    }

    /// The ports listening now.
    pub fn ports(&self) -> Vec<u16> {
        self.ports.keys().copied().collect()
    }

    /// Brings the listeners in line with `snap` and the gateway namespace's `secrets`:
    /// one per port of the servers of every Gateway that selects this pod. Returns
    /// what could not be served, one line per server, naming it and why.
    pub async fn apply(&mut self, snap: &Snapshot, secrets: &Secrets) -> Vec<String> {
        let mut problems = Vec::new();
        let Some(workload) = snap.workloads.iter().find(|w| w.key() == self.pod).cloned() else {
            problems.push(format!("the gateway's pod {} is not in the configuration; serving nothing", self.pod));
            self.stop_ports(|_| true);
            return problems;
        };
        let mut wanted: BTreeMap<u16, Vec<PlannedServer>> = BTreeMap::new();
        for gw in snap.gateways_selecting(&workload) {
            for (i, server) in gw.servers.iter().enumerate() {
                let what = format!("Gateway {} spec.servers[{i}]", gw.key);
                match self.plan_server(&gw.key, server, secrets, &workload.identity) {
                    Ok((port, planned)) => wanted.entry(port).or_default().push(planned),
                    Err(reason) => problems.push(format!("{what}: {reason}")),
                }
            }
        }
        self.stop_ports(|port| !wanted.contains_key(&port));
        for (port, servers) in wanted {
            let plan = PortPlan::new(port, workload.clone(), servers);
            if plan.servers.iter().any(|s| s.opaque) && !plan.is_opaque() {
                problems.push(format!("port {port}: TCP and other servers on one port; only TCP is served there"));
            }
            if plan.terminates_tls() && plan.servers.iter().any(|s| s.tls.is_none() && !s.passthrough && !s.opaque) {
                problems.push(format!(
                    "port {port}: plaintext and TLS servers on one port; the plaintext ones are not served"
                ));
            }
            match self.ports.get(&port) {
                Some(running) => running.plan.store(Arc::new(plan)),
                None => match self.start_port(plan).await {
                    Ok(running) => {
                        self.ports.insert(port, running);
                    }
                    Err(e) => problems.push(format!("port {port}: cannot listen: {e}")),
                },
            }
        }
        problems
    }

    fn plan_server(
        &mut self,
        gateway: &str,
        server: &Server,
        secrets: &Secrets,
        own: &crate::identity::Identity,
    ) -> Result<(u16, PlannedServer), String> {
        let port = server.port.as_ref().ok_or("no port")?;
        let number = u16::try_from(port.number).map_err(|_| format!("port {} is not a port number", port.number))?;
        let hosts: Vec<String> =
            server.hosts.iter().map(|h| h.split_once('/').map_or(h.as_str(), |(_, h)| h).to_string()).collect();
        if port.protocol.eq_ignore_ascii_case("HBONE") {
            return self.plan_east_west(gateway, server, number, hosts, own);
        }
        let mut passthrough = false;
        let opaque = port.is_opaque() && server.tls.is_none();
        let tls = match (&server.tls, port.is_tls(), port.is_plain_http()) {
            (_, false, true) => None,
            (None, false, false) if opaque => None,
            (Some(tls), true, _) if tls.mode == TlsMode::Passthrough && !tls.https_redirect => {
                passthrough = true;
                None
            }
            (Some(tls), true, _) if tls.mode == TlsMode::IstioMutual => {
                let dialer = &self.ctx.l7.dialer;
                Some(tls::terminate_mesh(tls, dialer.certs.clone(), own.clone(), &dialer.verifier)?)
            }
            (Some(tls), true, _) if matches!(tls.mode, TlsMode::Simple | TlsMode::Mutual | TlsMode::OptionalMutual) => {
                let key = format!("{gateway} {number} {}", hosts.join(","));
                match tls::terminate(tls, secrets) {
                    Ok(t) => {
                        self.last_good.insert(key, t.clone());
                        Some(t)
                    }
                    Err(reason) => match self.last_good.get(&key) {
                        Some(previous) => {
                            tracing::error!(gateway, port = number, %reason, "TLS settings rejected; the last good certificate stays in use");
                            Some(previous.clone())
                        }
                        None => return Err(reason),
                    },
                }
            }
            (tls, _, _) => {
                let mode = tls.as_ref().map(|t| format!(" with tls mode {:?}", t.mode)).unwrap_or_default();
                return Err(format!("protocol {}{mode} is not served by this gateway yet", port.protocol));
            }
        };
        Ok((number, PlannedServer { gateway: gateway.into(), hosts, tls, passthrough, opaque, east_west: false }))
    }

    /// An HBONE server (Istio ambient's east-west gateway): the mesh's own mutual TLS
    /// and HTTP/2, whatever `tls` says short of another mode.
    fn plan_east_west(
        &self,
        gateway: &str,
        server: &Server,
        number: u16,
        hosts: Vec<String>,
        own: &crate::identity::Identity,
    ) -> Result<(u16, PlannedServer), String> {
        if let Some(tls) = server.tls.as_ref().filter(|t| t.mode != TlsMode::IstioMutual) {
            return Err(format!(
                "protocol HBONE ends the mesh's own mutual TLS (ISTIO_MUTUAL); tls mode {:?} is not served",
                tls.mode
            ));
        }
        let dialer = &self.ctx.l7.dialer;
        let config = crate::identity::server_config(dialer.certs.clone(), own.clone(), &dialer.verifier)
            .map_err(|e| e.to_string())?;
        let tls = Some(Terminated { config, client_names: Vec::new(), mesh: true });
        let planned =
            PlannedServer { gateway: gateway.into(), hosts, tls, passthrough: false, opaque: false, east_west: true };
        Ok((number, planned))
    }

    async fn start_port(&self, plan: PortPlan) -> std::io::Result<RunningPort> {
        let listener = tokio::net::TcpListener::bind(SocketAddr::new(self.bind, plan.port)).await?;
        let stop = self.ctx.l7.shutdown.child_token();
        let plan = Arc::new(ArcSwap::from_pointee(plan));
        tokio::spawn(listener::serve(self.ctx.clone(), listener, plan.clone(), stop.clone()));
        Ok(RunningPort { plan, stop })
    }

    /// Stops accepting on the ports `gone` picks; their connections finish on their own.
    fn stop_ports(&mut self, gone: impl Fn(u16) -> bool) {
        self.ports.retain(|port, running| {
            let keep = !gone(*port);
            if !keep {
                tracing::info!(port, "gateway port closed");
                running.stop.cancel();
            }
            keep
        });
    }
}

#[cfg(test)]
mod tests;

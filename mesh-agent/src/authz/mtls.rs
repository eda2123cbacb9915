//! PeerAuthentication resolved for one workload: the mTLS mode of each of its ports.
//!
//! Precedence as Istio documents it: a workload policy (selector) over the namespace
//! policy over the mesh policy (root namespace, no selector); UNSET inherits from the
//! next level up, PERMISSIVE at the top. Among several policies of one level the first
//! by name wins and the others are reported (Istio takes the oldest; files carry no
//! creation time).

use std::collections::BTreeMap;

use crate::config::security::{MtlsMode, PeerAuthentication};
use crate::state::{Problem, Workload};

/// A resolved mode: never UNSET.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mode {
    /// Only mTLS (HBONE) reaches the workload.
    Strict,
    /// mTLS and plaintext.
    Permissive,
    /// Not tunnelled: mesh clients send plaintext, plaintext is accepted.
    Disable,
}

impl Mode {
    /// Whether a plaintext connection may reach the workload.
    pub fn accepts_plaintext(self) -> bool {
        self != Mode::Strict
    }
}

/// The modes of one workload's ports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortModes {
    /// Every port not listed in `ports`.
    pub default: Mode,
    /// `portLevelMtls` of the workload's policy, UNSET entries left out.
    pub ports: BTreeMap<u16, Mode>,
    /// `Kind namespace/name` of the policies that decided, most specific first.
    pub from: Vec<String>,
}

impl Default for PortModes {
    fn default() -> Self {
        Self { default: Mode::Permissive, ports: BTreeMap::new(), from: Vec::new() }
    }
}

impl PortModes {
    /// The mode for workload port `port`.
    pub fn mode(&self, port: u16) -> Mode {
        self.ports.get(&port).copied().unwrap_or(self.default)
    }
}

fn resolved(m: MtlsMode) -> Option<Mode> {
    match m {
        MtlsMode::Unset => None,
        MtlsMode::Strict => Some(Mode::Strict),
        MtlsMode::Permissive => Some(Mode::Permissive),
        MtlsMode::Disable => Some(Mode::Disable),
    }
}

fn name(p: &PeerAuthentication) -> String {
    format!("PeerAuthentication {}", p.metadata.key())
}

/// Resolves the policies in `sorted` (by namespace/name) for `w`; conflicts go to
/// `problems`.
pub fn resolve<'a>(
    w: &Workload,
    sorted: &[&'a PeerAuthentication],
    root_ns: &str,
    problems: &mut Vec<Problem>,
) -> PortModes {
    let pick = |level: &str, candidates: Vec<&'a PeerAuthentication>, problems: &mut Vec<Problem>| {
        pick_first(w, level, candidates, problems)
    };
    let in_ns = |p: &&&PeerAuthentication, ns: &str| p.metadata.namespace_or_default() == ns;
    let mesh = pick(
        "mesh-wide",
        sorted.iter().filter(|p| in_ns(p, root_ns) && p.spec.selector.is_none()).copied().collect(),
        problems,
    );
    let namespace = if w.namespace == root_ns {
        None
    } else {
        pick(
            "namespace",
            sorted.iter().filter(|p| in_ns(p, &w.namespace) && p.spec.selector.is_none()).copied().collect(),
            problems,
        )
    };
    // Selector policies in the root namespace are ignored, as Istio does.
    let workload = if w.namespace == root_ns {
        None
    } else {
        pick(
            "workload",
            sorted
                .iter()
                .filter(|p| in_ns(p, &w.namespace) && p.spec.selector.as_ref().is_some_and(|s| s.selects(&w.labels)))
                .copied()
                .collect(),
            problems,
        )
    };
    let mut out = PortModes::default();
    let levels = [workload, namespace, mesh];
    let mode_of = |p: Option<&PeerAuthentication>| p.and_then(|p| p.spec.mtls.as_ref()).and_then(|m| resolved(m.mode));
    if let Some(m) = levels.iter().find_map(|p| mode_of(*p)) {
        out.default = m;
    }
    if let Some(wp) = workload {
        for (port, m) in &wp.spec.port_level_mtls {
            if let Some(mode) = resolved(m.mode) {
                out.ports.insert(port.0, mode);
            }
        }
    }
    out.from = levels.iter().flatten().map(|p| name(p)).collect();
    out
}

/// The first of `candidates` (name order); the others are reported as conflicts.
fn pick_first<'a>(
    w: &Workload,
    level: &str,
    candidates: Vec<&'a PeerAuthentication>,
    problems: &mut Vec<Problem>,
) -> Option<&'a PeerAuthentication> {
    let (winner, others) = candidates.split_first()?;
    for other in others {
        problems.push(Problem::new(
            "MESH0101",
            name(other),
            format!(
                "{} and it are both {level} policies for workload {}; {} applies",
                name(winner),
                w.key(),
                name(winner)
            ),
        ));
    }
    Some(winner)
}

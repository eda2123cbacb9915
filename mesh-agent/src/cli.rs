//! `meshctl`, the operator's command line (istioctl / linkerd style): pre-flight checks,
//! config analysis, manifests, install, status. One module per command family; the
//! binary (`src/bin/meshctl.rs`) only parses flags and prints.

pub mod analyze;
pub mod check;
pub mod cluster;
pub mod crds;
pub mod dashboard;
pub mod deploy;
pub mod inject;
pub mod manifest;
pub mod proxy_config;
pub mod remote_secret;

use std::io::IsTerminal as _;

/// Colours only when writing to a terminal (and `NO_COLOR` is unset).
#[derive(Debug, Clone, Copy)]
pub struct Style {
    color: bool,
}

impl Style {
    /// Style for standard output.
    pub fn stdout() -> Self {
        Self { color: std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none() }
    }

    /// No colours.
    pub fn plain() -> Self {
        Self { color: false }
    }

    fn paint(&self, code: &str, text: &str) -> String {
        if self.color { format!("\u{1b}[{code}m{text}\u{1b}[0m") } else { text.to_string() }
    }

    /// Green.
    pub fn ok(&self, text: &str) -> String {
        self.paint("32", text)
    }

    /// Red.
    pub fn bad(&self, text: &str) -> String {
        self.paint("31", text)
    }

    /// Yellow.
    pub fn warn(&self, text: &str) -> String {
        self.paint("33", text)
    }
}

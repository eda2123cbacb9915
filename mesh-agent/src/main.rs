//! `mesh-agent`: the node agent binary.

use std::io::IsTerminal as _;

use clap::Parser as _;
use mesh_agent::settings::{LogFormat, Settings};
use tracing_subscriber::EnvFilter;

fn main() -> anyhow::Result<()> {
    let settings = Settings::parse();
    let filter = EnvFilter::try_from_env("MESH_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match settings.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
    // The netns switch in dataplane::Netns is per thread and needs no extra threads;
    // two workers match a small node agent's budget and the 2-core lab.
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(mesh_agent::app::run(settings))?;
    Ok(())
}

//! `mesh-ca`: the mesh's certificate authority, the one process that holds the signing
//! key (see `mesh_agent::ca_service`).

use std::io::IsTerminal as _;

use clap::Parser as _;
use mesh_agent::ca_service::Settings;
use mesh_agent::settings::LogFormat;
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
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(mesh_agent::ca_service::run(settings))?;
    Ok(())
}

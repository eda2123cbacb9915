//! `mesh-ca`: the mesh's certificate authority, the one process that holds the signing
//! key (see `mesh_agent::ca_service`).

use clap::Parser as _;
use mesh_agent::ca_service::Settings;

fn main() -> anyhow::Result<()> {
    let settings = Settings::parse();
    settings.log_format.init();
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(mesh_agent::ca_service::run(settings))?;
    Ok(())
}

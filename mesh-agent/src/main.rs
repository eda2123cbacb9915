//! `mesh-agent`: the node agent binary.

use clap::Parser as _;
use mesh_agent::settings::Settings;

fn main() -> anyhow::Result<()> {
    let settings = Settings::parse();
    // Before any other thread starts: each thread's first allocation picks its arena.
    mesh_agent::heap::limit_arenas(settings.malloc_arenas);
    settings.log_format.init();
    // The netns switch in dataplane::Netns is per thread and needs no extra threads;
    // two workers match a small node agent's budget and the 2-core lab.
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    match settings.mode {
        mesh_agent::settings::Mode::Agent => runtime.block_on(mesh_agent::app::run(settings))?,
        mesh_agent::settings::Mode::Gateway => runtime.block_on(mesh_agent::app::gateway::run(settings))?,
    }
    Ok(())
}

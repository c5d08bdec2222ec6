//! `kiln-master export`: a published image in the forms other tools take.

use kiln_spool::LocalSpool;

#[derive(clap::Args, Debug)]
pub struct ExportArgs {
    /// The published image's id.
    pub id: String,
}

pub fn run(_spool: &LocalSpool, args: &ExportArgs) -> anyhow::Result<()> {
    anyhow::bail!("exporting {} is not built yet", args.id)
}

//! `kiln-master tui`: the operator's console over a spool.

use std::path::Path;

/// Runs the TUI on the spool at `spool` until the operator quits.
pub fn run(spool: &Path) -> anyhow::Result<()> {
    anyhow::bail!("the TUI is not built yet (spool {})", spool.display())
}

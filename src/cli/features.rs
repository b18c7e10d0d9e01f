//! `features pull`: copies shards published to a feature store into ROOT/features.

use anyhow::Context;
use clap::{Args, Subcommand};
use lazarus::features::store;
use lazarus::layout::Layout;

#[derive(Debug, Subcommand)]
pub enum FeaturesCommand {
    /// Copy the published shards (those with a .done) of a dataset from a
    /// feature store into ROOT/features, for train, verify and predict.
    Pull(PullArgs),
}

#[derive(Debug, Args)]
pub struct PullArgs {
    /// The store workers published to: file:///ABSOLUTE/PATH or s3://BUCKET/PREFIX.
    #[arg(long, value_name = "URL")]
    pub from: String,
    /// Dataset name, as given to `lazarus dataset add`.
    #[arg(long, value_name = "NAME")]
    pub dataset: String,
    /// Only this fingerprint folder (default: every one the store has for the dataset).
    #[arg(long, value_name = "FINGERPRINT")]
    pub fingerprint: Option<String>,
    /// Print machine-readable JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(layout: &Layout, command: FeaturesCommand) -> anyhow::Result<()> {
    match command {
        FeaturesCommand::Pull(args) => pull(layout, args),
    }
}

fn pull(layout: &Layout, args: PullArgs) -> anyhow::Result<()> {
    let feature_store =
        store::open_store(&args.from).context("--from: cannot open the feature store")?;
    let pulled = store::pull(
        feature_store.as_ref(),
        &layout.features_dir(),
        &args.dataset,
        args.fingerprint.as_deref(),
    )?;
    if pulled.iter().all(|folder| folder.published == 0) {
        anyhow::bail!(
            "{}: no published shards of dataset '{}'{} in this store",
            args.from,
            args.dataset,
            args.fingerprint
                .as_deref()
                .map(|f| format!(" under fingerprint {f}"))
                .unwrap_or_default()
        );
    }
    if args.json {
        return super::print_json(&pulled);
    }
    for folder in &pulled {
        println!(
            "{} / {}: {} published shards, {} copied to {}",
            folder.dataset,
            folder.fingerprint.chars().take(12).collect::<String>(),
            folder.published,
            folder.copied,
            layout
                .features_dir()
                .join(&folder.dataset)
                .join(&folder.fingerprint)
                .display()
        );
    }
    Ok(())
}

//! `features pull` (copies shards published to a feature store into
//! ROOT/features) and `features migrate` (converts a cache of the layout
//! before issue 18).

use anyhow::Context;
use clap::{Args, Subcommand};
use lazarus::features::{migrate, store};
use lazarus::layout::Layout;

#[derive(Debug, Subcommand)]
pub enum FeaturesCommand {
    /// Copy the published shards (those with a .done) of a feature store's
    /// fingerprint folders into ROOT/features, for train, verify and predict.
    Pull(PullArgs),
    /// Convert features/DATASET/FINGERPRINT folders written before issue 18
    /// (rows named by manifest position) into features/FINGERPRINT (rows named
    /// by content id), checking every image file against its recorded sha256.
    Migrate(MigrateArgs),
}

#[derive(Debug, Args)]
pub struct PullArgs {
    /// The store workers published to: file:///ABSOLUTE/PATH or s3://BUCKET/PREFIX.
    #[arg(long, value_name = "URL")]
    pub from: String,
    /// The dataset the features are for (must be registered here); folders
    /// are shared by every dataset, so every published shard is copied.
    #[arg(long, value_name = "NAME")]
    pub dataset: Option<String>,
    /// Only this fingerprint folder (default: every one the store has).
    #[arg(long, value_name = "FINGERPRINT")]
    pub fingerprint: Option<String>,
    /// Print machine-readable JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct MigrateArgs {
    /// Print machine-readable JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(layout: &Layout, command: FeaturesCommand) -> anyhow::Result<()> {
    match command {
        FeaturesCommand::Pull(args) => pull(layout, args),
        FeaturesCommand::Migrate(args) => run_migrate(layout, args),
    }
}

fn pull(layout: &Layout, args: PullArgs) -> anyhow::Result<()> {
    let feature_store =
        store::open_store(&args.from).context("--from: cannot open the feature store")?;
    if let Some(dataset) = &args.dataset {
        lazarus::dataset::load_info(layout, dataset)?;
    }
    let pulled = store::pull(
        feature_store.as_ref(),
        &layout.features_dir(),
        args.dataset.as_deref(),
        args.fingerprint.as_deref(),
    )?;
    if pulled.is_empty() {
        anyhow::bail!(
            "{}: no published shards{} in this store",
            args.from,
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
            "{}: {} published shards, {} copied to {}",
            folder.fingerprint.chars().take(12).collect::<String>(),
            folder.published,
            folder.copied,
            layout.features_dir().join(&folder.fingerprint).display()
        );
    }
    Ok(())
}

fn run_migrate(layout: &Layout, args: MigrateArgs) -> anyhow::Result<()> {
    let report = migrate::migrate(layout)?;
    if args.json {
        super::print_json(&report)?;
    } else {
        if report.migrated.is_empty() && report.refused.is_empty() {
            println!(
                "nothing to migrate: {} holds no folder of the old layout",
                layout.features_dir().display()
            );
        }
        for folder in &report.migrated {
            println!(
                "{} -> {}: {} shards, {} rows; {} rows dropped, {} corrupt shards",
                folder.from.display(),
                folder.to.display(),
                folder.shards,
                folder.rows,
                folder.dropped.len(),
                folder.corrupt.len()
            );
            for dropped in &folder.dropped {
                println!(
                    "  dropped image {} of shard {}: {}",
                    dropped.image_index, dropped.shard, dropped.reason
                );
            }
            for (shard, reason) in &folder.corrupt {
                println!("  corrupt shard {shard}: {reason}");
            }
        }
        for folder in &report.refused {
            println!("refused {}: {}", folder.dir.display(), folder.reason);
        }
    }
    let dropped: usize = report.migrated.iter().map(|f| f.dropped.len()).sum();
    let corrupt: usize = report.migrated.iter().map(|f| f.corrupt.len()).sum();
    if dropped + corrupt > 0 && !args.json {
        println!(
            "run `lazarus verify --repair` and `lazarus run-worker` to extract the dropped images again"
        );
    }
    if !report.refused.is_empty() {
        anyhow::bail!(
            "{} folders were not migrated (see above); extract their datasets again",
            report.refused.len()
        );
    }
    Ok(())
}

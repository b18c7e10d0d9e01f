//! `dataset add|update|list|show`.

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Args, Subcommand, ValueEnum};
use lazarus::dataset::{
    self, AddConfig, DatasetInfo, LabelColumn, MaskKind, SourceFormat, SplitConfig, UpdateConfig,
};
use lazarus::layout::Layout;
use serde_json::json;

use super::print_json;

#[derive(Debug, Subcommand)]
pub enum DatasetCommand {
    /// Register a dataset: an ImageFolder tree, a CSV/TSV manifest, a
    /// whitespace-separated label file, a folder of unlabeled images, or
    /// images/ and masks/ folders (segmentation).
    Add(AddArgs),
    /// Rescan a dataset's source (or another SOURCE) and publish what changed
    /// as a new version: new images are added (split as `add` splits), images
    /// no longer there are removed, every other image keeps its index, split
    /// and cached features.
    Update(UpdateArgs),
    /// List registered datasets.
    List {
        /// Print machine-readable JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show a dataset's classes, splits, duplicates and skipped files.
    Show(ShowArgs),
}

#[derive(Debug, Args)]
pub struct AddArgs {
    /// Name to register the dataset under (letters, digits, '-', '_', '.').
    pub name: String,
    /// Folder or manifest file.
    pub source: PathBuf,
    /// Manifest column holding the label: a number counted from 1, or a header name.
    #[arg(long, value_name = "COLUMN")]
    pub label_column: Option<LabelColumn>,
    /// Source format; detected when omitted.
    #[arg(long, value_enum)]
    pub format: Option<FormatArg>,
    /// Train/val/test split when the manifest gives none, e.g. 80/10/10.
    #[arg(long, default_value = "80/10/10", value_name = "TRAIN/VAL/TEST")]
    pub split: String,
    /// Seed of the deterministic stratified split.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// How mask values are read: binary (value > 0 is foreground) or class index.
    #[arg(long, value_enum, default_value = "binary")]
    pub mask_kind: MaskKindArg,
    /// Rename or merge classes: OLD=NEW pairs separated by commas, or a file
    /// with one OLD=NEW per line. The new names are the dataset's classes
    /// everywhere (training, tables, plots, predictions, bundles).
    #[arg(long, value_name = "OLD=NEW,...|FILE")]
    pub label_map: Option<String>,
    /// Folder that relative paths in a manifest resolve against (default:
    /// the manifest's own folder). Absolute paths are taken as written.
    #[arg(long, value_name = "DIR")]
    pub base_dir: Option<PathBuf>,
    /// Print machine-readable JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct UpdateArgs {
    /// Name of the registered dataset.
    pub name: String,
    /// Folder or manifest file to rescan (default: the dataset's source).
    pub source: Option<PathBuf>,
    /// Manifest column holding the label (default: as registered).
    #[arg(long, value_name = "COLUMN")]
    pub label_column: Option<LabelColumn>,
    /// Source format (default: as registered).
    #[arg(long, value_enum)]
    pub format: Option<FormatArg>,
    /// Class renames and merges (default: as registered); see `dataset add`.
    #[arg(long, value_name = "OLD=NEW,...|FILE")]
    pub label_map: Option<String>,
    /// Folder relative manifest paths resolve against (default: as registered).
    #[arg(long, value_name = "DIR")]
    pub base_dir: Option<PathBuf>,
    /// Print machine-readable JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum MaskKindArg {
    Binary,
    Index,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum FormatArg {
    ImageFolder,
    Manifest,
    LabelFile,
    Unlabeled,
    MaskFolders,
}

impl From<FormatArg> for SourceFormat {
    fn from(format: FormatArg) -> Self {
        match format {
            FormatArg::ImageFolder => SourceFormat::ImageFolder,
            FormatArg::Manifest => SourceFormat::Manifest,
            FormatArg::LabelFile => SourceFormat::LabelFile,
            FormatArg::Unlabeled => SourceFormat::Unlabeled,
            FormatArg::MaskFolders => SourceFormat::MaskFolders,
        }
    }
}

#[derive(Debug, Args)]
pub struct ShowArgs {
    /// Dataset name.
    pub name: String,
    /// List every image: manifest index, id, path, label, split.
    #[arg(long)]
    pub images: bool,
    /// With --images: print CSV (the default for --images).
    #[arg(long, requires = "images")]
    pub csv: bool,
    /// Print machine-readable JSON.
    #[arg(long, conflicts_with = "csv")]
    pub json: bool,
}

pub fn run(layout: &Layout, command: DatasetCommand) -> anyhow::Result<()> {
    match command {
        DatasetCommand::Add(args) => add(layout, args),
        DatasetCommand::Update(args) => update(layout, args),
        DatasetCommand::List { json } => list(layout, json),
        DatasetCommand::Show(args) => show(layout, args),
    }
}

fn add(layout: &Layout, args: AddArgs) -> anyhow::Result<()> {
    let (train, val, test) =
        SplitConfig::parse_fractions(&args.split).map_err(anyhow::Error::msg)?;
    let config = AddConfig {
        format: args.format.map(SourceFormat::from),
        label_column: args.label_column,
        split: SplitConfig {
            train,
            val,
            test,
            seed: args.seed,
        },
        mask_kind: match args.mask_kind {
            MaskKindArg::Binary => MaskKind::Binary,
            MaskKindArg::Index => MaskKind::Index,
        },
        label_map: args
            .label_map
            .as_deref()
            .map(dataset::parse_label_map)
            .transpose()?
            .unwrap_or_default(),
        base_dir: args.base_dir,
    };
    let info = dataset::add(layout, &args.name, &args.source, &config)?;
    if args.json {
        return print_json(&summary_json(&info));
    }
    println!(
        "Registered dataset '{}': {} images ({}) from {}",
        info.name,
        info.images,
        info.format,
        info.source.display()
    );
    print_summary(&info);
    Ok(())
}

fn update(layout: &Layout, args: UpdateArgs) -> anyhow::Result<()> {
    let config = UpdateConfig {
        source: args.source,
        format: args.format.map(SourceFormat::from),
        label_column: args.label_column,
        split: None,
        mask_kind: None,
        label_map: args
            .label_map
            .as_deref()
            .map(dataset::parse_label_map)
            .transpose()?,
        base_dir: args.base_dir,
    };
    let outcome = dataset::update(layout, &args.name, &config)?;
    if args.json {
        let mut value = summary_json(&outcome.info);
        value["previous_version"] = json!(outcome.previous_version);
        value["changed"] = json!(outcome.changed);
        value["added"] = json!(outcome.added);
        value["removed"] = json!(outcome.removed);
        value["changed_rows"] = json!(outcome.changed_rows);
        value["kept"] = json!(outcome.kept);
        return print_json(&value);
    }
    let info = &outcome.info;
    if !outcome.changed {
        println!(
            "Dataset '{}' is unchanged at version {} ({} images from {})",
            info.name,
            info.version,
            info.images,
            info.source.display()
        );
        return Ok(());
    }
    println!(
        "Dataset '{}' version {} (was {}): {} images from {}; {} added, {} removed, {} moved or relabeled, {} kept",
        info.name,
        info.version,
        outcome.previous_version,
        info.images,
        info.source.display(),
        outcome.added,
        outcome.removed,
        outcome.changed_rows,
        outcome.kept
    );
    print_summary(info);
    Ok(())
}

fn list(layout: &Layout, json: bool) -> anyhow::Result<()> {
    let names = dataset::list(layout)?;
    let infos = names
        .iter()
        .map(|name| dataset::load_info(layout, name))
        .collect::<Result<Vec<_>, _>>()?;
    if json {
        let rows: Vec<_> = infos.iter().map(summary_json).collect();
        return print_json(&json!({ "datasets": rows }));
    }
    if infos.is_empty() {
        println!(
            "No datasets registered under {}.",
            layout.datasets_dir().display()
        );
        println!("Add one with: lazarus dataset add NAME SOURCE");
        return Ok(());
    }
    println!(
        "{:<24} {:>9} {:>8} {:>8}  {:<13} source",
        "name", "images", "classes", "version", "format"
    );
    for info in &infos {
        println!(
            "{:<24} {:>9} {:>8} {:>8}  {:<13} {}",
            info.name,
            info.images,
            info.classes.len(),
            info.version,
            info.format.as_str(),
            info.source.display()
        );
    }
    Ok(())
}

fn show(layout: &Layout, args: ShowArgs) -> anyhow::Result<()> {
    if args.images {
        let dataset = dataset::load(layout, &args.name)?;
        if args.json {
            return print_json(&json!({ "name": args.name, "images": dataset.images }));
        }
        let stdout = std::io::stdout();
        return match dataset::write_images_csv(&dataset.images, stdout.lock()) {
            // A reader that stopped early (`| head`) is not an error.
            Err(err) if matches!(err.kind(), csv::ErrorKind::Io(io) if io.kind() == std::io::ErrorKind::BrokenPipe) => {
                Ok(())
            }
            other => {
                other.with_context(|| format!("writing the image list of dataset '{}'", args.name))
            }
        };
    }
    if args.csv {
        bail!("--csv needs --images");
    }
    let info = dataset::load_info(layout, &args.name)?;
    if args.json {
        return print_json(&summary_json(&info));
    }
    println!(
        "Dataset '{}': {} images ({}) from {}",
        info.name,
        info.images,
        info.format,
        info.source.display()
    );
    println!(
        "registered {} by lazarus {}; version {}",
        info.created_at, info.lazarus_version, info.version
    );
    for version in &info.versions {
        println!(
            "  version {}: {} images ({} added, {} removed) from {} at {}",
            version.version,
            version.images,
            version.added,
            version.removed,
            version.source.display(),
            version.created_at
        );
    }
    print_summary(&info);
    Ok(())
}

/// The JSON users script against: `images` is the count, `classes` maps name to count.
fn summary_json(info: &DatasetInfo) -> serde_json::Value {
    json!({
        "name": info.name,
        "source": info.source,
        "format": info.format,
        "created_at": info.created_at,
        "images": info.images,
        "classes": info.classes,
        "class_order": info.class_order,
        "imbalance_ratio": info.imbalance_ratio,
        "splits": info.splits,
        "split_source": info.split_source,
        "split_config": info.split_config,
        "has_masks": info.has_masks,
        "mask_kind": info.has_masks.then_some(info.mask_kind.as_str()),
        "duplicates": info.duplicates,
        "skipped": info.skipped,
        "version": info.version,
        "versions": info.versions,
        "label_map": info.label_map,
    })
}

fn print_summary(info: &DatasetInfo) {
    if info.classes.is_empty() {
        println!("unlabeled");
    } else {
        println!("{:<28} {:>9} {:>7}", "class", "images", "share");
        for name in &info.class_order {
            let count = info.classes.get(name).copied().unwrap_or(0);
            let share = 100.0 * count as f64 / info.images.max(1) as f64;
            println!("{name:<28} {count:>9} {share:>6.1}%");
        }
        if let Some(ratio) = info.imbalance_ratio {
            println!("imbalance ratio (largest / smallest class): {ratio:.2}");
        }
    }
    let split_counts: Vec<String> = ["train", "val", "test"]
        .iter()
        .map(|s| format!("{s} {}", info.splits.get(*s).copied().unwrap_or(0)))
        .collect();
    let how = if info.split_source == "manifest" {
        "from the manifest".to_string()
    } else {
        format!("stratified, seed {}", info.split_config.seed)
    };
    println!("splits: {} ({how})", split_counts.join(", "));
    if info.duplicates.is_empty() {
        println!("duplicates: none");
    } else {
        let dropped: usize = info.duplicates.iter().map(|g| g.dropped.len()).sum();
        println!(
            "duplicates: {dropped} exact copies dropped in {} groups",
            info.duplicates.len()
        );
        for group in &info.duplicates {
            let conflict = if group.conflicting_labels {
                " (different labels!)"
            } else {
                ""
            };
            for dropped in &group.dropped {
                println!(
                    "  {} duplicates {}{conflict}",
                    dropped.display(),
                    group.kept.display()
                );
            }
        }
    }
    if info.skipped.is_empty() {
        println!("skipped: none");
    } else {
        println!("skipped: {} files", info.skipped.len());
        for file in &info.skipped {
            println!("  {}: {}", file.path.display(), file.reason);
        }
    }
}

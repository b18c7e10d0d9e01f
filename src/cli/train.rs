//! `lazarus train`: arguments to a `TrainConfig`; the work is in `lazarus::train`.

use std::collections::BTreeMap;

use clap::{Args, ValueEnum};
use lazarus::layout::Layout;
use lazarus::runs::TrainRequest;
use lazarus::runs::settings::{Source, train_settings};
use lazarus::train::run::FitOptions;
use toml::Value;

use super::queue::DeviceArg;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TaskKind {
    Classify,
    Anomaly,
    Segment,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ScorerKind {
    Knn,
    Mahalanobis,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum HeadKind {
    Linear,
    Mlp,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum OptimizerKind {
    Adamw,
    Sgd,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ScheduleKind {
    Constant,
    Cosine,
    Step,
    Plateau,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ActivationKind {
    Relu,
    Gelu,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum PrecisionKind {
    F32,
    Bf16,
    F16,
}

/// `--train-views`.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum TrainViewsKind {
    Sample,
    First,
}

/// `--eval-views`.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum EvalViewsKind {
    Mean,
    First,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum SamplerKind {
    Uniform,
    Balanced,
}

#[derive(Debug, Args)]
pub struct TrainArgs {
    #[arg(long, required_unless_present = "resume")]
    pub dataset: Option<String>,
    /// Encoder name; checked against the shards' `encoder` metadata when present.
    #[arg(long, required_unless_present = "resume")]
    pub encoder: Option<String>,
    /// Feature folder (features/FINGERPRINT); optional when only one folder
    /// of this encoder holds the dataset's images.
    #[arg(long)]
    pub fingerprint: Option<String>,
    #[command(flatten)]
    pub folder: super::queue::PooledFolderArgs,
    /// Segmentation and patch-level anomaly: only the spatial folder of
    /// these maps (as `enqueue --maps`, e.g. `4,8,16,32`), when a dataset
    /// has several. The run uses every map of the folder it reads.
    #[arg(long, value_name = "LIST")]
    pub maps: Option<String>,
    /// Train on the images that have features when some lack them (extraction
    /// unfinished or failed) instead of refusing; the run records how many
    /// lacked (param images_lacking).
    #[arg(long)]
    pub allow_partial: bool,
    /// Continue a killed run from its newest checkpoint, with its own settings.
    #[arg(long, value_name = "RUN", conflicts_with_all = ["dataset", "encoder"])]
    pub resume: Option<String>,
    /// Start from this finished run's head weights: layers whose shapes match
    /// load, an output layer for other classes is re-initialised.
    #[arg(long, value_name = "RUN", conflicts_with = "resume")]
    pub init_from: Option<String>,
    /// classify: a head over all classes (pooled features); anomaly: a scorer
    /// fitted on normal images only; segment: a per-pixel head (spatial
    /// features and masks; the monitor defaults to val/dice).
    #[arg(long, value_enum, default_value = "classify")]
    pub task: TaskKind,
    /// Anomaly: the normal class(es), repeated or comma-separated.
    #[arg(long = "normal-label", value_name = "CLASS", value_delimiter = ',')]
    pub normal_labels: Vec<String>,
    /// Anomaly: the classes scored as anomalous (default: every class that is
    /// not normal); images of other classes are left out of the metrics.
    #[arg(long = "anomaly-label", value_name = "CLASS", value_delimiter = ',')]
    pub anomaly_labels: Vec<String>,
    /// Anomaly: knn (mean distance to the k nearest normal rows) or mahalanobis
    /// (Ledoit-Wolf Gaussian) [default: knn].
    #[arg(long, value_enum)]
    pub scorer: Option<ScorerKind>,
    /// Anomaly, knn: neighbours averaged [default: 5].
    #[arg(long)]
    pub k: Option<usize>,
    /// Anomaly, knn: keep a greedy k-center coreset of the normal rows, a
    /// fraction (0.1) or a row count (200).
    #[arg(long, value_name = "FRACTION|COUNT")]
    pub coreset: Option<String>,
    /// Anomaly: patch-level scores and heat maps on the spatial features
    /// (`enqueue --spatial`): PatchCore (knn) or PaDiM (mahalanobis) style.
    #[arg(long)]
    pub spatial: bool,
    /// Anomaly, --spatial: keep a seeded random subset of this many channels
    /// of the concatenated maps, or `all` [default: all for knn, 100 for
    /// mahalanobis].
    #[arg(long, value_name = "N|all")]
    pub channels: Option<String>,
    /// Anomaly, --spatial: Gaussian smoothing of heat maps, sigma in image
    /// pixels (0: none) [default: 4].
    #[arg(long, value_name = "PIXELS")]
    pub heatmap_sigma: Option<f64>,
    #[arg(long, value_enum, default_value = "linear")]
    pub head: HeadKind,
    /// MLP hidden sizes, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "256")]
    pub hidden: Vec<usize>,
    /// MLP dropout rate [default: 0].
    #[arg(long)]
    pub dropout: Option<f64>,
    #[arg(long, value_enum, default_value = "relu")]
    pub activation: ActivationKind,
    #[arg(long, default_value_t = 20)]
    pub epochs: usize,
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f64,
    #[arg(long, default_value_t = 1e-4)]
    pub weight_decay: f64,
    #[arg(long, value_enum, default_value = "adamw")]
    pub optimizer: OptimizerKind,
    #[arg(long, default_value_t = 0.9)]
    pub momentum: f64,
    #[arg(long, value_enum, default_value = "constant")]
    pub schedule: ScheduleKind,
    /// Cosine warmup, in optimiser steps.
    #[arg(long, default_value_t = 0)]
    pub warmup_steps: usize,
    /// Step schedule: multiply the rate by --step-gamma every N epochs.
    #[arg(long, default_value_t = 10)]
    pub step_epochs: usize,
    #[arg(long, default_value_t = 0.1)]
    pub step_gamma: f64,
    /// Plateau schedule: epochs without improvement of --monitor before the rate drops.
    #[arg(long, default_value_t = 3)]
    pub plateau_patience: usize,
    /// Plateau schedule: multiply the rate by this on each drop.
    #[arg(long, default_value_t = 0.1)]
    pub plateau_factor: f64,
    /// Effective batch; split into micro-batches when the memory budget asks.
    #[arg(long, default_value_t = 256)]
    pub batch_size: usize,
    #[arg(long, default_value = "4GiB")]
    pub memory_budget: String,
    /// Clip the global gradient norm to this value.
    #[arg(long)]
    pub clip_grad_norm: Option<f64>,
    #[arg(long, default_value_t = 0.0)]
    pub label_smoothing: f64,
    /// Validation metric for early stopping, plateau and best-head selection,
    /// e.g. val/macro_f1 [default: val/accuracy; segment: val/dice].
    #[arg(long)]
    pub monitor: Option<String>,
    /// Stop after this many epochs without improvement of --monitor.
    #[arg(long)]
    pub patience: Option<usize>,
    /// Forward and backward dtype; master weights stay f32 (f16 uses dynamic loss scaling).
    #[arg(long, value_enum, default_value = "f32")]
    pub precision: PrecisionKind,
    /// none, balanced (n / (classes * n_class); segmentation: over training
    /// pixels), or a file of class,weight lines or a JSON object.
    #[arg(long, default_value = "none", value_name = "none|balanced|FILE")]
    pub class_weights: String,
    /// balanced: each class equally often (segmentation: tiles with and
    /// without foreground), with replacement.
    #[arg(long, value_enum, default_value = "uniform")]
    pub sampler: SamplerKind,
    /// On features of several views per image (`enqueue --views`): sample
    /// one view per image each epoch, drawn from the seed, the epoch and the
    /// image (anomaly: fit on every view), or train on view 0 (the image as
    /// it is) only.
    #[arg(long, value_enum, default_value = "sample")]
    pub train_views: TrainViewsKind,
    /// On features of several views per image: evaluate (and predict) with
    /// the mean of the class probabilities, or anomaly scores, over an
    /// image's views, or with view 0 only. Metrics count each image once.
    /// With --unfreeze-from and --augment-maps: the mean over those views
    /// of the map, or the map as cached.
    #[arg(long, value_enum, default_value = "mean")]
    pub eval_views: EvalViewsKind,
    /// Write a resumable checkpoint every N epochs (0: never).
    #[arg(long, default_value_t = 1)]
    pub checkpoint_every: usize,
    /// Partial fine-tuning: train the encoder's blocks after block K with
    /// the head, from the cached output of block K (a spatial folder of
    /// `enqueue --spatial --maps S`: for EfficientNet-Lite, K is the block
    /// whose output is the stride-S map; lite0: 10 for stride 16, 4 for 8,
    /// 2 for 4).
    #[arg(long, value_name = "K")]
    pub unfreeze_from: Option<usize>,
    /// --unfreeze-from: the blocks' AdamW learning rate (the head's
    /// --schedule scales it alike) [default: 1e-4].
    #[arg(long)]
    pub blocks_lr: Option<f64>,
    /// --unfreeze-from: the blocks' decoupled weight decay [default: 0.01].
    #[arg(long)]
    pub blocks_weight_decay: Option<f64>,
    /// --unfreeze-from: stochastic depth of the trained blocks, the rate at
    /// the encoder's last block, scaled down linearly to its first (as
    /// EfficientNet was trained: 0.2) [default: 0].
    #[arg(long, value_name = "RATE")]
    pub blocks_drop_path: Option<f64>,
    /// --unfreeze-from: the blocks' matrix products in bf16 with f32 sums
    /// (twice the multiply-adds per instruction on CPUs with AVX-512 BF16;
    /// elsewhere the same rounding, no faster); weights, moments and the
    /// head stay f32. `auto` times a micro-batch in each at the start and
    /// takes bf16 only where it is clearly faster (recorded as param
    /// `blocks_precision_chosen`; `--resume` repeats it) [default: f32].
    #[arg(long, value_name = "f32|bf16|auto")]
    pub blocks_precision: Option<String>,
    /// --unfreeze-from: how the trained head convolution's map becomes the
    /// head's input: each channel's mean, or its mean and its maximum side by
    /// side (`mean-max`: twice the features; a defect a few pixels wide moves
    /// the maximum, which the mean spreads over the whole image)
    /// [default: mean].
    #[arg(long, value_name = "mean|mean-max")]
    pub blocks_pool: Option<String>,
    /// --unfreeze-from: each training map seen flipped (`flips`) or flipped
    /// and rotated (`dihedral`), drawn per image and epoch from the seed;
    /// evaluation and prediction average the class probabilities over the
    /// same views of the map (`--eval-views first`: the map as cached)
    /// [default: 1].
    #[arg(long, value_name = "1|flips|dihedral")]
    pub augment_maps: Option<String>,
    /// --unfreeze-from: each training batch's maps mixed with a shuffled
    /// partner's from the same batch and the targets alike, the weight drawn from
    /// Beta(ALPHA, ALPHA): `mixup:ALPHA` blends whole maps, `cutmix:ALPHA`
    /// pastes a box of the partner's map [default: none].
    #[arg(long, value_name = "none|mixup:ALPHA|cutmix:ALPHA")]
    pub mix_maps: Option<String>,
    /// --unfreeze-from: evaluate, keep and save the exponential moving
    /// average of the blocks' and the head's weights over the steps (decay
    /// warmed up as (1 + step) / (10 + step) until it reaches DECAY; e.g.
    /// 0.998) [default: 0, off].
    #[arg(long, value_name = "DECAY")]
    pub ema: Option<f64>,
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: DeviceArg,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Experiment the run is recorded under in experiments/experiments.db.
    #[arg(long, default_value = "train")]
    pub experiment: String,
    #[arg(long)]
    pub json: bool,
}

/// Parses sizes such as `4GiB`, `512MiB`, `1000000` (`memory::parse_bytes`,
/// which sweep files use too).
pub fn parse_bytes(text: &str) -> anyhow::Result<u64> {
    lazarus::memory::parse_bytes(text).map_err(anyhow::Error::msg)
}

/// The flags as the settings a sweep file names the same way (`--step-gamma`
/// is `step_gamma`): flags without a default only when given, so that
/// `runs::settings` can refuse those that do not apply.
fn settings(args: &TrainArgs) -> anyhow::Result<BTreeMap<String, Value>> {
    fn name(value: impl ValueEnum) -> Value {
        let value = value.to_possible_value().expect("no value is skipped");
        Value::String(value.get_name().to_string())
    }
    fn count(value: impl TryInto<i64>) -> anyhow::Result<Value> {
        let value = value
            .try_into()
            .map_err(|_| anyhow::anyhow!("a count past {} is not supported", i64::MAX))?;
        Ok(Value::Integer(value))
    }
    fn labels(labels: &[String]) -> Option<Value> {
        (!labels.is_empty())
            .then(|| Value::Array(labels.iter().cloned().map(Value::String).collect()))
    }
    let text = |text: &str| Some(Value::String(text.to_string()));
    let optional_count = |value: Option<usize>| value.map(count).transpose();
    let hidden = args
        .hidden
        .iter()
        .map(|&size| count(size))
        .collect::<Result<_, _>>()?;
    let given: Vec<(&str, Option<Value>)> = vec![
        ("task", Some(name(args.task))),
        ("fingerprint", args.fingerprint.as_deref().and_then(text)),
        ("layers", args.folder.layers.as_deref().and_then(text)),
        (
            "image_size",
            args.folder
                .image_size
                .map(|size| Value::Integer(size.into())),
        ),
        ("resize", args.folder.resize.map(name)),
        ("views", args.folder.views.as_deref().and_then(text)),
        ("maps", args.maps.as_deref().and_then(text)),
        ("init_from", args.init_from.as_deref().and_then(text)),
        ("normal_label", labels(&args.normal_labels)),
        ("anomaly_label", labels(&args.anomaly_labels)),
        ("scorer", args.scorer.map(name)),
        ("k", optional_count(args.k)?),
        ("coreset", args.coreset.as_deref().and_then(text)),
        ("spatial", args.spatial.then_some(Value::Boolean(true))),
        ("channels", args.channels.as_deref().and_then(text)),
        ("heatmap_sigma", args.heatmap_sigma.map(Value::Float)),
        ("head", Some(name(args.head))),
        ("hidden", Some(Value::Array(hidden))),
        ("dropout", args.dropout.map(Value::Float)),
        ("activation", Some(name(args.activation))),
        ("epochs", Some(count(args.epochs)?)),
        ("lr", Some(Value::Float(args.lr))),
        ("weight_decay", Some(Value::Float(args.weight_decay))),
        ("optimizer", Some(name(args.optimizer))),
        ("momentum", Some(Value::Float(args.momentum))),
        ("schedule", Some(name(args.schedule))),
        ("warmup_steps", Some(count(args.warmup_steps)?)),
        ("step_epochs", Some(count(args.step_epochs)?)),
        ("step_gamma", Some(Value::Float(args.step_gamma))),
        ("plateau_patience", Some(count(args.plateau_patience)?)),
        ("plateau_factor", Some(Value::Float(args.plateau_factor))),
        ("batch_size", Some(count(args.batch_size)?)),
        ("memory_budget", text(&args.memory_budget)),
        ("clip_grad_norm", args.clip_grad_norm.map(Value::Float)),
        ("label_smoothing", Some(Value::Float(args.label_smoothing))),
        ("monitor", args.monitor.as_deref().and_then(text)),
        ("patience", optional_count(args.patience)?),
        ("precision", Some(name(args.precision))),
        ("class_weights", text(&args.class_weights)),
        ("sampler", Some(name(args.sampler))),
        ("train_views", Some(name(args.train_views))),
        ("eval_views", Some(name(args.eval_views))),
        ("checkpoint_every", Some(count(args.checkpoint_every)?)),
        ("unfreeze_from", optional_count(args.unfreeze_from)?),
        ("blocks_lr", args.blocks_lr.map(Value::Float)),
        (
            "blocks_weight_decay",
            args.blocks_weight_decay.map(Value::Float),
        ),
        ("blocks_drop_path", args.blocks_drop_path.map(Value::Float)),
        (
            "blocks_precision",
            args.blocks_precision.as_deref().and_then(text),
        ),
        ("blocks_pool", args.blocks_pool.as_deref().and_then(text)),
        ("mix_maps", args.mix_maps.as_deref().and_then(text)),
        ("ema", args.ema.map(Value::Float)),
        ("augment_maps", args.augment_maps.as_deref().and_then(text)),
        ("seed", Some(count(args.seed)?)),
    ];
    Ok(given
        .into_iter()
        .filter_map(|(key, value)| Some((key.to_string(), value?)))
        .collect())
}

/// The run the flags ask for.
fn request(args: &TrainArgs) -> anyhow::Result<TrainRequest> {
    let settings = train_settings(&settings(args)?, Source::Flags).map_err(anyhow::Error::msg)?;
    Ok(TrainRequest {
        dataset: args.dataset.clone().expect("clap requires --dataset"),
        encoder: args.encoder.clone().expect("clap requires --encoder"),
        fingerprint: settings.fingerprint,
        pooled: settings.pooled,
        experiment: args.experiment.clone(),
        allow_partial: args.allow_partial,
        config: settings.config,
        class_weights_file: settings.class_weights_file,
    })
}

pub fn train(layout: &Layout, args: TrainArgs) -> anyhow::Result<()> {
    // The run reports its memory from here on, data loading included.
    lazarus::memory::track();
    let options = FitOptions {
        device: super::queue::device(args.device)?,
        progress: !args.json,
    };
    let trained = match &args.resume {
        Some(run_id) => lazarus::runs::resume(layout, run_id, &options)?,
        None => lazarus::runs::train(layout, &request(&args)?, &options)?,
    };
    if let Some(note) = trained.note() {
        // On stderr with --json, so stdout stays one JSON document.
        if args.json {
            eprintln!("{note}");
        } else {
            println!("{note}");
        }
    }
    if args.json {
        return super::print_json(&trained);
    }
    for line in trained.lines() {
        println!("{line}");
    }
    Ok(())
}

#[derive(Debug, Args)]
pub struct SweepArgs {
    /// The sweep file (TOML): fixed settings, [grid], optional [random] and [label_map].
    pub file: std::path::PathBuf,
    /// Retrain configurations that already FINISHED.
    #[arg(long)]
    pub force: bool,
    /// Metric of the comparison chart and the summary table [default:
    /// test/roc_auc when every head is an anomaly scorer, else test/accuracy].
    #[arg(long)]
    pub metric: Option<String>,
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: DeviceArg,
    /// Train on the images that have features when some lack them, instead
    /// of refusing.
    #[arg(long)]
    pub allow_partial: bool,
    #[arg(long)]
    pub json: bool,
}

pub fn sweep(layout: &Layout, args: SweepArgs) -> anyhow::Result<()> {
    let sweep = lazarus::runs::sweep_file::read(&args.file)?;
    let started = std::time::Instant::now();
    let metric = args
        .metric
        .clone()
        .unwrap_or_else(|| sweep.default_chart_metric().to_string());
    let options = lazarus::runs::SweepOptions {
        fit: FitOptions {
            device: super::queue::device(args.device)?,
            progress: !args.json,
        },
        force: args.force,
        chart_metric: metric.clone(),
        allow_partial: args.allow_partial,
    };
    let outcome = lazarus::runs::sweep(layout, &sweep, &options)?;
    // On stderr, so that stdout stays one JSON document with --json.
    for note in &outcome.notes {
        eprintln!("{note}");
    }
    // Runs that failed are reported after everything else, and fail the verb.
    let failed = || -> anyhow::Result<()> {
        for error in &outcome.failed {
            eprintln!("error: {error}");
        }
        if !outcome.failed.is_empty() {
            anyhow::bail!(
                "{} of the sweep's runs failed (recorded FAILED; the others finished)",
                outcome.failed.len()
            );
        }
        Ok(())
    };
    if args.json {
        super::print_json(&outcome)?;
        return failed();
    }
    let anomaly = if outcome.anomaly.is_empty() {
        String::new()
    } else {
        format!(", {} anomaly scorers fitted", outcome.anomaly.len())
    };
    println!(
        "sweep {}: {} heads, {} trained in {} pass(es) over the features{anomaly}, {} already finished (skipped), {:.1} s",
        sweep.name,
        sweep.points.len(),
        outcome.trained.len() + outcome.segmented.len(),
        outcome.passes,
        outcome.skipped.len(),
        started.elapsed().as_secs_f64()
    );
    for report in &outcome.trained {
        println!(
            "  run {}: {} {:.4}",
            report.run_id,
            metric,
            report.test.get(&metric).copied().unwrap_or(f64::NAN)
        );
    }
    for report in &outcome.anomaly {
        println!(
            "  run {} ({}): {} {:.4}",
            report.run_id,
            report.scorer,
            metric,
            report.metrics.get(&metric).copied().unwrap_or(f64::NAN)
        );
    }
    for report in &outcome.segmented {
        println!(
            "  run {} (segment): test/dice {:.4}, test/iou {:.4}",
            report.run_id, report.test["test/dice"], report.test["test/iou"]
        );
    }
    for chart in &outcome.charts {
        println!("chart: {}", chart.display());
    }
    failed()
}

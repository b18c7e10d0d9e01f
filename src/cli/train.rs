//! `lazarus train`: arguments to a `TrainConfig`; the work is in `lazarus::train`.

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use lazarus::features::catalog::FeatureKind;
use lazarus::layout::Layout;
use lazarus::runs::ResumedRun;
use lazarus::train::anomaly::patch::{self, PatchConfig};
use lazarus::train::anomaly::{
    self, AnomalyConfig, AnomalyOptions, AnomalyReport, Coreset, DEFAULT_K, Scorer,
};
use lazarus::train::config::{
    Activation, ClassWeights, EarlyStopping, HeadConfig, Optimizer, Precision, Sampler, Task,
    TrainConfig,
};
use lazarus::train::data::SplitLabels;
use lazarus::train::run::{FitOptions, RunReport, load_config};
use lazarus::train::schedule::Schedule;
use lazarus::train::session;

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
    /// Validation metric for early stopping, plateau and best-head selection, e.g. val/macro_f1.
    #[arg(long, default_value = "val/accuracy")]
    pub monitor: String,
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
    /// Write a resumable checkpoint every N epochs (0: never).
    #[arg(long, default_value_t = 1)]
    pub checkpoint_every: usize,
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

/// The run configuration the flags describe (class weights from a file are
/// resolved against the dataset's classes by the caller).
fn config(args: &TrainArgs, class_weights: ClassWeights) -> anyhow::Result<TrainConfig> {
    Ok(TrainConfig {
        task: match args.task {
            // An anomaly run's task and settings are set from `anomaly_config`.
            TaskKind::Classify | TaskKind::Anomaly => Task::Classify,
            TaskKind::Segment => Task::Segment,
        },
        head: match args.head {
            HeadKind::Linear if args.dropout.is_some() => {
                anyhow::bail!(
                    "--dropout applies to --head mlp: a linear head has no hidden layer to drop"
                )
            }
            HeadKind::Linear => HeadConfig::Linear,
            HeadKind::Mlp => HeadConfig::Mlp {
                hidden: args.hidden.clone(),
                dropout: args.dropout.unwrap_or(0.0),
                activation: match args.activation {
                    ActivationKind::Relu => Activation::Relu,
                    ActivationKind::Gelu => Activation::Gelu,
                },
            },
        },
        epochs: args.epochs,
        learning_rate: args.lr,
        weight_decay: args.weight_decay,
        optimizer: match args.optimizer {
            OptimizerKind::Adamw => Optimizer::AdamW,
            OptimizerKind::Sgd => Optimizer::Sgd {
                momentum: args.momentum,
            },
        },
        schedule: match args.schedule {
            ScheduleKind::Constant => Schedule::Constant,
            ScheduleKind::Cosine => Schedule::Cosine {
                warmup_steps: args.warmup_steps,
            },
            ScheduleKind::Step => Schedule::Step {
                every_epochs: args.step_epochs,
                gamma: args.step_gamma,
            },
            ScheduleKind::Plateau => Schedule::ReduceOnPlateau {
                patience: args.plateau_patience,
                factor: args.plateau_factor,
            },
        },
        batch_size: args.batch_size,
        memory_budget_bytes: parse_bytes(&args.memory_budget)?,
        gradient_clip: args.clip_grad_norm,
        label_smoothing: args.label_smoothing,
        monitor: args.monitor.clone(),
        early_stopping: args.patience.map(|patience| EarlyStopping { patience }),
        precision: match args.precision {
            PrecisionKind::F32 => Precision::F32,
            PrecisionKind::Bf16 => Precision::Bf16,
            PrecisionKind::F16 => Precision::F16,
        },
        class_weights,
        sampler: match args.sampler {
            SamplerKind::Uniform => Sampler::Uniform,
            SamplerKind::Balanced => Sampler::Balanced,
        },
        checkpoint_every: args.checkpoint_every,
        seed: args.seed,
        label_map: Default::default(),
        init_from: args.init_from.clone(),
        anomaly: None,
    })
}

/// The anomaly settings the flags describe; anomaly flags without
/// `--task anomaly` are refused rather than ignored.
fn anomaly_config(args: &TrainArgs) -> anyhow::Result<Option<AnomalyConfig>> {
    if args.task != TaskKind::Anomaly {
        let given = [
            ("--normal-label", !args.normal_labels.is_empty()),
            ("--anomaly-label", !args.anomaly_labels.is_empty()),
            ("--scorer", args.scorer.is_some()),
            ("--k", args.k.is_some()),
            ("--coreset", args.coreset.is_some()),
            ("--spatial", args.spatial),
        ];
        if let Some((flag, _)) = given.iter().find(|(_, set)| *set) {
            bail!("{flag} applies to --task anomaly only");
        }
        return Ok(None);
    }
    if !args.spatial
        && let Some(flag) = [
            ("--channels", args.channels.is_some()),
            ("--heatmap-sigma", args.heatmap_sigma.is_some()),
        ]
        .iter()
        .find(|(_, set)| *set)
        .map(|(flag, _)| flag)
    {
        bail!("{flag} applies to --task anomaly --spatial only");
    }
    let default_k = if args.spatial {
        patch::DEFAULT_PATCH_K
    } else {
        DEFAULT_K
    };
    let scorer = match args.scorer.unwrap_or(ScorerKind::Knn) {
        ScorerKind::Knn => Scorer::Knn {
            k: args.k.unwrap_or(default_k),
            coreset: args.coreset.as_deref().map(Coreset::parse).transpose()?,
        },
        ScorerKind::Mahalanobis => {
            if args.k.is_some() || args.coreset.is_some() {
                bail!("--k and --coreset apply to --scorer knn only");
            }
            Scorer::Mahalanobis
        }
    };
    let patch = if args.spatial {
        Some(PatchConfig {
            channels: match args.channels.as_deref() {
                Some("all") => None,
                Some(text) => Some(text.parse().with_context(|| {
                    format!("--channels {text:?}: give a number of channels or `all`")
                })?),
                None => patch::default_channels(&scorer),
            },
            heatmap_sigma: args.heatmap_sigma.unwrap_or(patch::DEFAULT_HEATMAP_SIGMA),
        })
    } else {
        None
    };
    Ok(Some(AnomalyConfig {
        normal_labels: args.normal_labels.clone(),
        anomaly_labels: args.anomaly_labels.clone(),
        scorer,
        patch,
    }))
}

pub fn train(layout: &Layout, args: TrainArgs) -> anyhow::Result<()> {
    // The run reports its memory from here on, data loading included.
    lazarus::memory::track();
    let options = FitOptions {
        device: super::queue::device(args.device)?,
        progress: !args.json,
    };
    if let Some(run_id) = &args.resume {
        return match lazarus::runs::resume(layout, run_id, &options)? {
            ResumedRun::Classify(report) => print_report(&report, args.json),
            ResumedRun::Segment(report) => print_segment_report(&report, args.json),
        };
    }
    let dataset = args.dataset.as_deref().expect("clap requires --dataset");
    let encoder = args.encoder.as_deref().expect("clap requires --encoder");
    let anomaly = anomaly_config(&args)?;
    if let TaskKind::Segment = args.task {
        return train_segment(layout, &args, dataset, encoder, options.device);
    }
    let mut probe = config(&args, ClassWeights::None)?;
    if anomaly.is_some() {
        probe.task = Task::Anomaly;
        probe.anomaly = anomaly;
    }
    probe.validate()?;
    let mut load = load_config(&probe);
    load.encoder = Some(encoder.to_string());
    load.allow_partial = args.allow_partial;
    // Classifiers and image-level scorers read pooled features; patch-level
    // anomaly scoring spatial ones. A folder named by --fingerprint is taken
    // as it is: the task's own checks say what it needs.
    load.kind = match (
        &args.fingerprint,
        probe.task == Task::Anomaly && args.spatial,
    ) {
        (Some(_), _) => None,
        (None, true) => Some(FeatureKind::Spatial),
        (None, false) => Some(FeatureKind::Pooled),
    };
    if probe.task == Task::Anomaly {
        load.split_labels = SplitLabels::Any;
    }
    let data = lazarus::train::data::load(layout, dataset, args.fingerprint.as_deref(), &load)?;
    if probe.task == Task::Anomaly {
        let options = AnomalyOptions {
            device: options.device,
        };
        let report = anomaly::train(layout, &data, &args.experiment, probe, &options)?;
        return print_anomaly_report(&report, args.json);
    }
    let class_weights = session::class_weights_from(&args.class_weights, &data.class_names)?;
    let config = config(&args, class_weights)?;
    let warm = match &args.init_from {
        Some(source) => {
            let warm = lazarus::train::warm::plan(layout, source, &config, &data)?;
            // On stderr with --json, so stdout stays one JSON document.
            if args.json {
                eprintln!("{}", warm.summary.describe());
            } else {
                println!("{}", warm.summary.describe());
            }
            Some(warm)
        }
        None => None,
    };
    let report = session::train_warm(layout, &data, &args.experiment, config, warm, &options)?;
    print_report(&report, args.json)
}

fn train_segment(
    layout: &Layout,
    args: &TrainArgs,
    dataset: &str,
    encoder: &str,
    device: candle_core::Device,
) -> anyhow::Result<()> {
    // A weights file names pixel classes, known once the masks are read.
    let (class_weights, class_weights_file) = match args.class_weights.as_str() {
        "none" => (ClassWeights::None, None),
        "balanced" => (ClassWeights::Balanced, None),
        file => (ClassWeights::None, Some(std::path::PathBuf::from(file))),
    };
    let request = lazarus::segment::train::SegmentRequest {
        dataset: dataset.to_string(),
        encoder: encoder.to_string(),
        fingerprint: args.fingerprint.clone(),
        experiment: args.experiment.clone(),
        config: config(args, class_weights)?,
        device,
        progress: !args.json,
        extra_params: Vec::new(),
        class_weights_file,
        allow_partial: args.allow_partial,
    };
    let report = lazarus::segment::train::train(layout, &request)?;
    print_segment_report(&report, args.json)
}

/// ", resumed after epoch N" for a resumed run, nothing for a fresh one.
fn resumed_note(resumed_from_epoch: usize) -> String {
    if resumed_from_epoch > 0 {
        format!(", resumed after epoch {resumed_from_epoch}")
    } else {
        String::new()
    }
}

fn print_segment_report(
    report: &lazarus::segment::train::SegmentReport,
    json: bool,
) -> anyhow::Result<()> {
    if json {
        return super::print_json(report);
    }
    let resumed = resumed_note(report.resumed_from_epoch);
    println!(
        "run {} ({} epochs{resumed}, best epoch {}): test/dice {:.4}, test/iou {:.4}, test/pixel_accuracy {:.4}",
        report.run_id,
        report.epochs_run,
        report.best_epoch + 1,
        report.test["test/dice"],
        report.test["test/iou"],
        report.test["test/pixel_accuracy"]
    );
    Ok(())
}

fn print_report(report: &RunReport, json: bool) -> anyhow::Result<()> {
    if json {
        return super::print_json(report);
    }
    let resumed = resumed_note(report.resumed_from_epoch);
    println!(
        "run {} ({} epochs{resumed}, best epoch {}): test/accuracy {:.4}, test/macro_f1 {:.4}",
        report.run_id,
        report.epochs_run,
        report.best_epoch + 1,
        report.test["test/accuracy"],
        report.test["test/macro_f1"]
    );
    if report.skipped_steps > 0 {
        println!(
            "{} f16 steps skipped for inf/NaN gradients",
            report.skipped_steps
        );
    }
    if let Some(line) = memory_line(&report.memory) {
        println!("{line}");
    }
    println!(
        "recorded in experiments/experiments.db; files in {}",
        report.run_dir.display()
    );
    Ok(())
}

/// "memory: ..." with what the run needed and what the page cache held.
fn memory_line(memory: &lazarus::memory::MemoryReport) -> Option<String> {
    let mib = |bytes: u64| bytes as f64 / (1u64 << 20) as f64;
    let anonymous = memory.peak_anonymous_bytes?;
    let mut line = format!(
        "memory: peak {:.0} MiB anonymous (what the run needs), {:.0} MiB of mapped feature pages (page cache, released as the run reads on)",
        mib(anonymous),
        mib(memory.peak_file_backed_bytes.unwrap_or(0)),
    );
    if let Some(cgroup) = &memory.cgroup {
        line.push_str(&format!(
            "; cgroup limit {:.0} MiB, peak {}",
            mib(cgroup.limit_bytes),
            cgroup
                .peak_bytes
                .map_or("unknown".to_string(), |p| format!("{:.0} MiB", mib(p)))
        ));
    }
    Some(line)
}

fn print_anomaly_report(report: &AnomalyReport, json: bool) -> anyhow::Result<()> {
    if json {
        return super::print_json(report);
    }
    let m = &report.metrics;
    let bank = report
        .memory_bank_rows
        .map(|rows| format!(", memory bank {rows} rows"))
        .unwrap_or_default();
    println!(
        "run {} (anomaly, {}; {} normal training images{bank}; normal: {}; anomalous: {})",
        report.run_id,
        report.scorer,
        report.normal_train_rows,
        report.normal_classes.join(", "),
        report.anomaly_classes.join(", "),
    );
    println!(
        "val/roc_auc {:.4}, test/roc_auc {:.4}, test/pr_auc {:.4}, test/best_f1 {:.4} at score {:.4}",
        m["val/roc_auc"],
        m["test/roc_auc"],
        m["test/pr_auc"],
        m["test/best_f1"],
        m["test/best_f1_threshold"],
    );
    println!(
        "recorded in experiments/experiments.db; files in {}",
        report.run_dir.display()
    );
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
    let all_anomaly = sweep.points.iter().all(|p| p.config.task == Task::Anomaly);
    let metric = args.metric.clone().unwrap_or_else(|| {
        if all_anomaly {
            "test/roc_auc".into()
        } else {
            "test/accuracy".into()
        }
    });
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

//! `lazarus train`: one entry for a run of any task. The run's
//! [`TaskConfig`] picks the trainer (`train::session` for classifiers,
//! `train::anomaly` for scorers, `segment::train` for segmentation heads),
//! and the [`TrainedRun`] it returns prints itself as `train` shows it
//! (text lines, or the task's report as JSON), so the CLI has no task
//! branches of its own.

use std::path::PathBuf;

use serde::Serialize;

use super::RunsError;
use crate::features::catalog::{FeatureKind, PooledChoice};
use crate::layout::Layout;
use crate::segment::train::{self as segment, SegmentReport};
use crate::train::anomaly::{self, AnomalyOptions, AnomalyReport};
use crate::train::auto_precision::ChosenPrecision;
use crate::train::config::{TaskConfig, TrainConfig};
use crate::train::data::{self, SplitLabels};
use crate::train::run::{FitOptions, RunReport, load_config};
use crate::train::{finetune, session, warm};

/// A new run of any task: its data, where it is recorded and its settings.
#[derive(Debug, Clone)]
pub struct TrainRequest {
    pub dataset: String,
    /// Checked against the features' `encoder` metadata.
    pub encoder: String,
    /// The feature folder; found by encoder (and task) when None.
    pub fingerprint: Option<String>,
    /// Only pooled features of these extraction options.
    pub pooled: PooledChoice,
    /// The experiment the run is recorded under.
    pub experiment: String,
    /// Train on the images that have features when some lack them.
    pub allow_partial: bool,
    pub config: TrainConfig,
    /// `class_weights = FILE`: read against the run's classes once they are
    /// known; it replaces `config.class_weights`.
    pub class_weights_file: Option<PathBuf>,
}

/// A run trained now (fresh or resumed), as its task's trainer reports it.
#[derive(Debug, Clone)]
pub enum TrainedRun {
    Classify {
        report: Box<RunReport>,
        /// What the run says before its report, in words: what a warm
        /// start (`init_from`) loaded, or a device it could not use.
        note: Option<String>,
    },
    Anomaly(Box<AnomalyReport>),
    Segment(Box<SegmentReport>),
}

/// The task's report, as `train --json` has always printed it.
impl Serialize for TrainedRun {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            TrainedRun::Classify { report, .. } => report.serialize(serializer),
            TrainedRun::Anomaly(report) => report.serialize(serializer),
            TrainedRun::Segment(report) => report.serialize(serializer),
        }
    }
}

impl TrainedRun {
    pub fn run_id(&self) -> &str {
        match self {
            TrainedRun::Classify { report, .. } => &report.run_id,
            TrainedRun::Anomaly(report) => &report.run_id,
            TrainedRun::Segment(report) => &report.run_id,
        }
    }

    /// What a warm start loaded, or that a fine-tuned run trained on the
    /// CPU whatever the device, said before the report (on stderr when the
    /// report is JSON, so stdout stays one JSON document).
    pub fn note(&self) -> Option<&str> {
        match self {
            TrainedRun::Classify { note, .. } => note.as_deref(),
            TrainedRun::Anomaly(_) | TrainedRun::Segment(_) => None,
        }
    }

    /// The report as `train` prints it without `--json`.
    pub fn lines(&self) -> Vec<String> {
        let recorded = |run_dir: &std::path::Path| {
            format!(
                "recorded in experiments/experiments.db; files in {}",
                run_dir.display()
            )
        };
        match self {
            TrainedRun::Classify { report, .. } => {
                let mut lines = vec![format!(
                    "run {} ({} epochs{}, best epoch {}): test/accuracy {:.4}, test/macro_f1 {:.4}",
                    report.run_id,
                    report.epochs_run,
                    resumed_note(report.resumed_from_epoch),
                    report.best_epoch + 1,
                    report.test["test/accuracy"],
                    report.test["test/macro_f1"]
                )];
                if report.skipped_steps > 0 {
                    lines.push(format!(
                        "{} f16 steps skipped for inf/NaN gradients",
                        report.skipped_steps
                    ));
                }
                lines.extend(report.blocks_precision.as_ref().map(auto_precision_line));
                lines.extend(memory_line(&report.memory));
                lines.push(recorded(&report.run_dir));
                lines
            }
            TrainedRun::Anomaly(report) => {
                let m = &report.metrics;
                let bank = report
                    .memory_bank_rows
                    .map(|rows| format!(", memory bank {rows} rows"))
                    .unwrap_or_default();
                vec![
                    format!(
                        "run {} (anomaly, {}; {} normal training images{bank}; normal: {}; anomalous: {})",
                        report.run_id,
                        report.scorer,
                        report.normal_train_rows,
                        report.normal_classes.join(", "),
                        report.anomaly_classes.join(", "),
                    ),
                    format!(
                        "val/roc_auc {:.4}, test/roc_auc {:.4}, test/pr_auc {:.4}, test/best_f1 {:.4} at score {:.4}",
                        m["val/roc_auc"],
                        m["test/roc_auc"],
                        m["test/pr_auc"],
                        m["test/best_f1"],
                        m["test/best_f1_threshold"],
                    ),
                    recorded(&report.run_dir),
                ]
            }
            TrainedRun::Segment(report) => vec![format!(
                "run {} ({} epochs{}, best epoch {}): test/dice {:.4}, test/iou {:.4}, test/pixel_accuracy {:.4}",
                report.run_id,
                report.epochs_run,
                resumed_note(report.resumed_from_epoch),
                report.best_epoch + 1,
                report.test["test/dice"],
                report.test["test/iou"],
                report.test["test/pixel_accuracy"]
            )],
        }
    }
}

/// What `--blocks-precision auto` took, as `train` and `sweep` say it.
pub fn auto_precision_line(chosen: &ChosenPrecision) -> String {
    format!(
        "blocks precision auto: {} (a training pass of {} maps took {:.3} s in f32, {:.3} s \
         in bf16)",
        chosen.precision.name(),
        chosen.n_images,
        chosen.f32_seconds,
        chosen.bf16_seconds
    )
}

/// ", resumed after epoch N" for a resumed run, nothing for a fresh one.
fn resumed_note(resumed_from_epoch: usize) -> String {
    if resumed_from_epoch > 0 {
        format!(", resumed after epoch {resumed_from_epoch}")
    } else {
        String::new()
    }
}

/// "memory: ..." with what the run needed and what the page cache held.
fn memory_line(memory: &crate::memory::MemoryReport) -> Option<String> {
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

/// Trains a new run of the task its config names and records it in
/// experiments.db. Settings are checked before any data is read.
pub fn train(
    layout: &Layout,
    request: &TrainRequest,
    options: &FitOptions,
) -> Result<TrainedRun, RunsError> {
    let mut config = request.config.clone();
    if let TaskConfig::Segment = config.task {
        let report = segment::train(
            layout,
            &segment::SegmentRequest {
                dataset: request.dataset.clone(),
                encoder: request.encoder.clone(),
                fingerprint: request.fingerprint.clone(),
                maps: request.pooled.maps.clone(),
                image_size: request.pooled.image_size,
                experiment: request.experiment.clone(),
                config,
                device: options.device.clone(),
                progress: options.progress,
                extra_params: Vec::new(),
                class_weights_file: request.class_weights_file.clone(),
                allow_partial: request.allow_partial,
            },
        )?;
        return Ok(TrainedRun::Segment(Box::new(report)));
    }
    config.validate()?;
    if config.unfreeze.is_some() {
        return train_fine_tuned(layout, request, config, options);
    }
    let anomaly = config.task.anomaly();
    let mut load = load_config(&config);
    load.encoder = Some(request.encoder.clone());
    load.pooled = request.pooled.clone();
    load.allow_partial = request.allow_partial;
    // Classifiers and image-level scorers read pooled features; patch-level
    // anomaly scoring spatial ones. A folder named by `fingerprint` is taken
    // as it is: the task's own checks say what it needs.
    let spatial = anomaly.is_some_and(|a| a.patch.is_some());
    load.kind = match (&request.fingerprint, spatial) {
        (Some(_), _) => None,
        (None, true) => Some(FeatureKind::Spatial),
        (None, false) => Some(FeatureKind::Pooled),
    };
    if anomaly.is_some() {
        load.split_labels = SplitLabels::Any;
    }
    let data = data::load(
        layout,
        &request.dataset,
        request.fingerprint.as_deref(),
        &load,
    )?;
    if anomaly.is_some() {
        let options = AnomalyOptions {
            device: options.device.clone(),
        };
        let report = anomaly::train(layout, &data, &request.experiment, config, &options)?;
        return Ok(TrainedRun::Anomaly(Box::new(report)));
    }
    if let Some(file) = &request.class_weights_file {
        config.class_weights =
            session::class_weights_from(&file.to_string_lossy(), &data.class_names)?;
    }
    let warm = config
        .init_from
        .as_ref()
        .map(|source| warm::plan(layout, source, &config, &data))
        .transpose()?;
    let note = warm.as_ref().map(|w| w.summary.describe());
    let report = session::train_warm(layout, &data, &request.experiment, config, warm, options)?;
    Ok(TrainedRun::Classify {
        report: Box::new(report),
        note,
    })
}

/// `train --unfreeze-from K`: a classifier trained with the encoder's
/// blocks after K, on the spatial folder whose map of block K's output
/// (stride 4, 8 or 16) it holds (`--maps` picks among several spatial folders).
fn train_fine_tuned(
    layout: &Layout,
    request: &TrainRequest,
    mut config: TrainConfig,
    options: &FitOptions,
) -> Result<TrainedRun, RunsError> {
    let mut load = load_config(&config);
    load.encoder = Some(request.encoder.clone());
    // A spatial folder is picked by its maps and its input square.
    load.pooled = PooledChoice {
        maps: request.pooled.maps.clone(),
        image_size: request.pooled.image_size,
        ..PooledChoice::default()
    };
    load.allow_partial = request.allow_partial;
    let data = finetune::load_spatial(
        layout,
        &request.dataset,
        request.fingerprint.as_deref(),
        load,
    )?;
    if let Some(file) = &request.class_weights_file {
        config.class_weights =
            session::class_weights_from(&file.to_string_lossy(), &data.class_names)?;
    }
    let report = finetune::train(layout, &data, &request.experiment, config, &[], options)?;
    Ok(TrainedRun::Classify {
        report: Box::new(report),
        note: finetune::device_note(&options.device),
    })
}

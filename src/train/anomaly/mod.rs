//! Anomaly detection on cached features (`lazarus train --task anomaly`):
//! a scorer is fitted on the features of normal training images only, then
//! every validation and test image gets an anomaly score (higher = more
//! anomalous), scored against its label (normal or not).
//!
//! Scorers (`scorer.rs`): `knn`, the mean Euclidean distance to the `k`
//! nearest rows of a memory bank of normal training rows (optionally a greedy
//! k-center coreset of them, as PatchCore), and `mahalanobis`, the
//! Mahalanobis distance under a Gaussian with a Ledoit-Wolf shrunk
//! covariance (as PaDiM, on pooled features). Both work on features
//! standardised with the normal training rows' mean and std.
//!
//! A run is recorded in experiments.db like a classification run (params,
//! tag `task=anomaly`, summary metrics, artifacts): `scorer.safetensors`
//! (standardisation, memory bank or Gaussian), `scores.csv`, `metrics.json`,
//! `config.json`/`config.toml`, `model_card.json` and `plots/roc_curve.*`.
//! A run has no epochs and no checkpoints: a killed run is started again.

pub mod patch;
pub mod scorer;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::time::Instant;

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::TrainError;
use super::config::{EvalViews, Task, TrainConfig, TrainViews};
use super::data::{SplitRows, TrainData};
use super::run::{RESIDENT_FEATURE_BYTES, RunInputs, peak_rss_bytes, run_inputs};
use crate::experiments::run_files::{self, RunFolder};
use crate::experiments::{self, ExperimentsDb, ParamValue, RunHandle, RunStatus, plots::RocCurve};
use crate::layout::Layout;
use crate::train::metrics::{average_precision, best_f1, f1_at, roc_auc, roc_curve};
use scorer::{Gaussian, MemoryBank, QUERY_BLOCK, Standardiser, gaussian_fit_bytes};

/// The process itself before any data (as head training counts it).
const PROCESS_BASE_BYTES: u64 = 48 << 20;
/// Per feature row: the manifest record while loading, row index, split lists.
const BYTES_PER_ROW: u64 = 320;

/// Default neighbours of the k-NN scorer (scikit-learn's NearestNeighbors default).
pub const DEFAULT_K: usize = 5;

/// What an anomaly run fits and how it is evaluated.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AnomalyConfig {
    /// Classes (after any label map) whose training images are normal.
    pub normal_labels: Vec<String>,
    /// Classes that count as anomalous in evaluation; empty: every class that
    /// is not normal. Images of other classes are left out of the metrics.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub anomaly_labels: Vec<String>,
    pub scorer: Scorer,
    /// Patch-level scores on spatial features (`--spatial`, see `patch`);
    /// absent: image-level scores on pooled features.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patch: Option<patch::PatchConfig>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Scorer {
    /// Mean distance to the `k` nearest memory-bank rows.
    Knn {
        k: usize,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        coreset: Option<Coreset>,
    },
    /// Mahalanobis distance under a Ledoit-Wolf Gaussian.
    Mahalanobis,
}

/// How many normal training rows the memory bank keeps (greedy k-center).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Coreset {
    /// This share of the normal training rows, rounded up.
    Fraction(f64),
    /// This many rows (all of them if there are fewer).
    Count(usize),
}

impl Coreset {
    /// `0.1` (a number with a point: a fraction in (0, 1]) or `200` (a count).
    pub fn parse(text: &str) -> Result<Self, TrainError> {
        let text = text.trim();
        let bad = || {
            TrainError::Invalid(format!(
                "coreset {text:?} must be a fraction in (0, 1] such as 0.1, or a row count such as 200"
            ))
        };
        let coreset = if text.contains(['.', 'e', 'E']) {
            Coreset::Fraction(text.parse().map_err(|_| bad())?)
        } else {
            Coreset::Count(text.parse().map_err(|_| bad())?)
        };
        coreset.validate()?;
        Ok(coreset)
    }

    fn validate(&self) -> Result<(), TrainError> {
        match *self {
            Coreset::Fraction(f) if !(f > 0.0 && f <= 1.0) => Err(TrainError::Invalid(format!(
                "coreset fraction {f} must be in (0, 1]"
            ))),
            Coreset::Count(0) => Err(TrainError::Invalid(
                "coreset count must be at least 1".into(),
            )),
            _ => Ok(()),
        }
    }

    /// Rows kept out of `rows`.
    pub fn rows(&self, rows: usize) -> usize {
        match *self {
            Coreset::Fraction(f) => ((rows as f64 * f).ceil() as usize).clamp(1, rows.max(1)),
            Coreset::Count(n) => n.min(rows),
        }
    }
}

impl Scorer {
    pub fn name(&self) -> &'static str {
        match self {
            Scorer::Knn { .. } => "knn",
            Scorer::Mahalanobis => "mahalanobis",
        }
    }
}

impl AnomalyConfig {
    pub fn validate(&self) -> Result<(), TrainError> {
        let bad = |message: String| Err(TrainError::Invalid(message));
        if self.normal_labels.is_empty() {
            return bad("task anomaly needs at least one normal label (--normal-label)".into());
        }
        if let Some(both) = self
            .anomaly_labels
            .iter()
            .find(|l| self.normal_labels.contains(l))
        {
            return bad(format!("label {both:?} is named both normal and anomalous"));
        }
        if let Scorer::Knn { k, coreset } = &self.scorer {
            if *k == 0 {
                return bad("k must be at least 1".into());
            }
            if let Some(coreset) = coreset {
                coreset.validate()?;
            }
        }
        if let Some(patch) = &self.patch {
            patch.validate()?;
        }
        Ok(())
    }

    /// `knn k=5, coreset 0.1` and the like.
    pub fn describe(&self) -> String {
        let scorer = self.describe_scorer();
        match &self.patch {
            None => scorer,
            Some(patch::PatchConfig {
                channels: Some(channels),
                ..
            }) => format!("{scorer}, patch level, {channels} channels"),
            Some(_) => format!("{scorer}, patch level"),
        }
    }

    fn describe_scorer(&self) -> String {
        match &self.scorer {
            Scorer::Knn { k, coreset: None } => format!("knn k={k}"),
            Scorer::Knn {
                k,
                coreset: Some(Coreset::Fraction(f)),
            } => format!("knn k={k}, coreset {f}"),
            Scorer::Knn {
                k,
                coreset: Some(Coreset::Count(n)),
            } => format!("knn k={k}, coreset {n} rows"),
            Scorer::Mahalanobis => "mahalanobis (Ledoit-Wolf)".into(),
        }
    }
}

/// How anomaly runs compute.
pub struct AnomalyOptions {
    /// Where the distance matrix products run.
    pub device: Device,
}

/// What a finished anomaly run reports.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AnomalyReport {
    pub run_id: String,
    pub run_dir: PathBuf,
    pub config_hash: String,
    pub task: Task,
    pub scorer: String,
    pub normal_classes: Vec<String>,
    pub anomaly_classes: Vec<String>,
    /// Normal training rows the scorer was fitted on.
    pub normal_train_rows: usize,
    /// Rows in the k-NN memory bank (after the coreset), if any.
    pub memory_bank_rows: Option<usize>,
    /// `val/*`, `test/*` and `train/*` metrics.
    pub metrics: BTreeMap<String, f64>,
    /// How the memory budget was spent.
    pub plan: MemoryPlan,
    pub fit_secs: f64,
    pub score_secs: f64,
    pub peak_rss_bytes: Option<u64>,
    /// Heat-map overlays of the highest-scored test images (patch level),
    /// relative to the run folder.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub heatmaps: Vec<String>,
}

/// Evaluated rows of one split: normal (false) or anomalous (true).
struct Evaluated {
    rows: Vec<usize>,
    labels: Vec<usize>,
    anomalous: Vec<bool>,
    excluded: usize,
}

/// Which rows a run fits on and scores, from its normal and anomaly labels.
struct Selection {
    normal_classes: Vec<usize>,
    anomaly_classes: Vec<usize>,
    normal_train: Vec<usize>,
    /// The rows pooled scorers fit on: every view of the normal training
    /// images (`--train-views sample`, the default) or view 0 only
    /// (`first`); `normal_train` itself in folders of one view.
    fit_rows: Vec<usize>,
    val: Evaluated,
    test: Evaluated,
}

fn class_indices(
    data: &TrainData,
    labels: &[String],
    role: &str,
) -> Result<Vec<usize>, TrainError> {
    labels
        .iter()
        .map(|label| {
            data.class_names
                .iter()
                .position(|c| c == label)
                .ok_or_else(|| {
                    TrainError::Invalid(format!(
                        "{role} label {label:?} is not a class of dataset {}; its classes are {}",
                        data.dataset_name,
                        data.class_names.join(", ")
                    ))
                })
        })
        .collect()
}

fn class_counts(data: &TrainData, split: &SplitRows) -> String {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for &label in &split.labels {
        *counts.entry(data.class_names[label].as_str()).or_default() += 1;
    }
    counts
        .iter()
        .map(|(c, n)| format!("{c}: {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

impl Selection {
    fn new(
        data: &TrainData,
        config: &AnomalyConfig,
        train_views: TrainViews,
    ) -> Result<Self, TrainError> {
        let normal_classes = class_indices(data, &config.normal_labels, "normal")?;
        let anomaly_classes = if config.anomaly_labels.is_empty() {
            (0..data.class_names.len())
                .filter(|c| !normal_classes.contains(c))
                .collect()
        } else {
            class_indices(data, &config.anomaly_labels, "anomaly")?
        };
        if anomaly_classes.is_empty() {
            return Err(TrainError::Invalid(format!(
                "every class of dataset {} is normal ({}): nothing is anomalous",
                data.dataset_name,
                config.normal_labels.join(", ")
            )));
        }
        // Patch scoring fits and scores images through their first row.
        let indices = data.features.image_indices();
        let counted = |row: usize| config.patch.is_none() || is_first_row(indices, row);
        let normal_train: Vec<usize> = data
            .train
            .rows
            .iter()
            .zip(&data.train.labels)
            .filter(|(row, label)| counted(**row) && normal_classes.contains(label))
            .map(|(&row, _)| row)
            .collect();
        if normal_train.is_empty() {
            return Err(TrainError::Invalid(format!(
                "no training image of dataset {} has a normal label ({}); the train split has {}",
                data.dataset_name,
                config.normal_labels.join(", "),
                class_counts(data, &data.train)
            )));
        }
        let evaluated = |split: &SplitRows, name: &str| -> Result<Evaluated, TrainError> {
            let mut out = Evaluated {
                rows: Vec::new(),
                labels: Vec::new(),
                anomalous: Vec::new(),
                excluded: 0,
            };
            for (&row, &label) in split.rows.iter().zip(&split.labels) {
                if !counted(row) {
                    continue;
                }
                let anomalous = if normal_classes.contains(&label) {
                    false
                } else if anomaly_classes.contains(&label) {
                    true
                } else {
                    out.excluded += 1;
                    continue;
                };
                out.rows.push(row);
                out.labels.push(label);
                out.anomalous.push(anomalous);
            }
            let anomalies = out.anomalous.iter().filter(|a| **a).count();
            if anomalies == 0 || anomalies == out.rows.len() {
                return Err(TrainError::Invalid(format!(
                    "split {name} of dataset {} needs both normal and anomalous images to be \
                     scored; it has {anomalies} anomalous of {} evaluated ({})",
                    data.dataset_name,
                    out.rows.len(),
                    class_counts(data, split)
                )));
            }
            Ok(out)
        };
        let fit_views = match train_views {
            TrainViews::Sample => data.views,
            TrainViews::First => 1,
        };
        let fit_rows = super::data::view_rows(&normal_train, fit_views);
        Ok(Selection {
            val: evaluated(&data.val, "val")?,
            test: evaluated(&data.test, "test")?,
            normal_classes,
            anomaly_classes,
            normal_train,
            fit_rows,
        })
    }
}

/// Whether `row` is its image's first: spatial sets hold a row per tile,
/// the tiles of an image in consecutive rows.
fn is_first_row(indices: &[usize], row: usize) -> bool {
    row == 0 || indices[row - 1] != indices[row]
}

/// A fitted scorer.
enum Fitted {
    Knn { bank: MemoryBank, k: usize },
    Mahalanobis(Gaussian),
}

/// Memory the scorer and its distance blocks may use.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct MemoryPlan {
    /// Bank rows per distance block (k-NN; 0 for Mahalanobis).
    pub bank_block: usize,
    /// Bytes counted before distance blocks: runtime, memory bank or
    /// covariance fit, one block of query rows.
    pub fixed_bytes: u64,
    /// Bytes per bank row in a distance block (k-NN).
    pub per_bank_row_bytes: u64,
}

fn runtime_bytes(data: &TrainData) -> u64 {
    PROCESS_BASE_BYTES + data.features.len() as u64 * BYTES_PER_ROW + RESIDENT_FEATURE_BYTES
}

fn over_budget(what: String, needed: u64, budget: u64) -> TrainError {
    TrainError::Invalid(format!(
        "memory budget of {budget} bytes cannot hold {what} ({needed} bytes with the runtime)"
    ))
}

/// Fits the scorer on the normal training rows, within the memory budget.
fn fit(
    data: &TrainData,
    selection: &Selection,
    config: &TrainConfig,
    anomaly: &AnomalyConfig,
    standardiser: &Standardiser,
    device: &Device,
) -> Result<(Fitted, MemoryPlan), TrainError> {
    let dim = data.features.feature_dim();
    let budget = config.memory_budget_bytes;
    let runtime = runtime_bytes(data);
    let normal = &selection.fit_rows;
    match &anomaly.scorer {
        Scorer::Knn { k, coreset } => {
            let bank_rows = coreset.map_or(normal.len(), |c| c.rows(normal.len()));
            if *k > bank_rows {
                return Err(TrainError::Invalid(format!(
                    "k = {k} is larger than the memory bank ({bank_rows} rows of normal training images{})",
                    if coreset.is_some() {
                        " after the coreset"
                    } else {
                        ""
                    }
                )));
            }
            // The normal rows are held once; a coreset copies the rows it keeps.
            let kept = if coreset.is_some() { bank_rows } else { 0 };
            let held = ((normal.len() + kept) * dim * 4 + normal.len() * 4) as u64;
            if runtime + held > budget {
                return Err(over_budget(
                    format!(
                        "the {} normal training rows of the memory bank",
                        normal.len()
                    ),
                    runtime + held,
                    budget,
                ));
            }
            // One query block, and as many bank rows per block as the rest allows
            // (a block of distances exists twice: the product and its copy).
            let query_bytes = (QUERY_BLOCK * dim * 4) as u64;
            let fixed = runtime + (bank_rows * dim * 4) as u64 + query_bytes;
            let per_bank_row = (QUERY_BLOCK * 4 * 2) as u64;
            if fixed + per_bank_row > budget {
                return Err(over_budget(
                    format!("a memory bank of {bank_rows} rows and one distance block"),
                    fixed + per_bank_row,
                    budget,
                ));
            }
            let bank_block = (((budget - fixed) / per_bank_row) as usize).min(bank_rows);
            let values = standardiser.gather(&data.features, normal);
            let values = match coreset {
                None => values,
                Some(_) => {
                    let chosen = scorer::greedy_coreset(&values, dim, bank_rows, config.seed);
                    chosen
                        .iter()
                        .flat_map(|&i| values[i * dim..(i + 1) * dim].iter().copied())
                        .collect()
                }
            };
            let bank = MemoryBank::new(values, dim, device)?;
            Ok((
                Fitted::Knn { bank, k: *k },
                MemoryPlan {
                    bank_block,
                    fixed_bytes: fixed,
                    per_bank_row_bytes: per_bank_row,
                },
            ))
        }
        Scorer::Mahalanobis => {
            let needed = runtime + gaussian_fit_bytes(dim) + (4096 * dim * 8) as u64;
            if needed > budget {
                return Err(over_budget(
                    format!("a {dim}x{dim} covariance fit"),
                    needed,
                    budget,
                ));
            }
            let gaussian = Gaussian::fit(&data.features, normal, standardiser, device)?;
            Ok((
                Fitted::Mahalanobis(gaussian),
                MemoryPlan {
                    bank_block: 0,
                    fixed_bytes: needed,
                    per_bank_row_bytes: 0,
                },
            ))
        }
    }
}

impl Fitted {
    /// Anomaly scores of the images whose first rows are `images`,
    /// gathered and scored one query block at a time: in a folder of
    /// several views, the mean of the scores of an image's views
    /// (`eval_views` mean) or its view 0's (`first`).
    fn scores(
        &self,
        data: &TrainData,
        standardiser: &Standardiser,
        images: &[usize],
        eval_views: EvalViews,
        plan: &MemoryPlan,
        device: &Device,
    ) -> Result<Vec<f64>, TrainError> {
        let dim = data.features.feature_dim();
        let rows = super::data::view_rows(images, data.views);
        let mut out = Vec::with_capacity(rows.len());
        for block in rows.chunks(QUERY_BLOCK) {
            let queries = standardiser.gather(&data.features, block);
            out.extend(self.score_standardised(&queries, dim, plan, device)?);
        }
        if data.views > 1 {
            out = super::data::average_views(&out, 1, data.views, eval_views.rows_used(data.views));
        }
        Ok(out)
    }

    fn score_standardised(
        &self,
        queries: &[f32],
        dim: usize,
        plan: &MemoryPlan,
        device: &Device,
    ) -> Result<Vec<f64>, TrainError> {
        match self {
            Fitted::Knn { bank, k } => bank.knn_scores(queries, dim, *k, plan.bank_block),
            Fitted::Mahalanobis(gaussian) => gaussian.scores(queries, device),
        }
    }

    /// The tensors `scorer.safetensors` holds besides the standardisation.
    fn tensors(&self) -> Result<Vec<(String, Tensor)>, TrainError> {
        Ok(match self {
            Fitted::Knn { bank, .. } => vec![("memory_bank".to_string(), bank.to_cpu_tensor()?)],
            Fitted::Mahalanobis(gaussian) => {
                let dim = gaussian.mean.len();
                vec![
                    (
                        "gaussian_mean".to_string(),
                        Tensor::from_slice(&gaussian.mean, dim, &Device::Cpu)?,
                    ),
                    (
                        "whitening".to_string(),
                        Tensor::from_slice(&gaussian.whitening, (dim, dim), &Device::Cpu)?,
                    ),
                ]
            }
        })
    }
}

/// A finished anomaly run's scorer, read back from its run folder
/// (`scorer.safetensors`, `config.json`, `metrics.json`).
pub struct SavedScorer {
    model: Model,
    /// Pooled feature dimension (0 for patch scorers).
    dim: usize,
    /// The validation split's best-F1 threshold: scores at or above it are anomalous.
    pub threshold: f64,
    /// `knn k=5` and the like.
    pub description: String,
}

/// Scores per distance block when a saved scorer is used (about 64 MiB of distances).
const PREDICT_DISTANCE_BYTES: usize = 64 << 20;

impl SavedScorer {
    pub fn load(run_dir: &std::path::Path, device: &Device) -> Result<Self, TrainError> {
        let inputs = super::run::read_run_inputs(run_dir)?;
        let anomaly = anomaly_config(&inputs.config)?;
        let folder = RunFolder::new(run_dir);
        let path = folder.scorer();
        let metrics_path = folder.metrics();
        let missing = |what: &std::path::Path| {
            TrainError::Checkpoint(format!(
                "{} is missing: the anomaly run did not finish",
                what.display()
            ))
        };
        if !path.is_file() {
            return Err(missing(&path));
        }
        let report: AnomalyReport = serde_json::from_slice(
            &std::fs::read(&metrics_path).map_err(|_| missing(&metrics_path))?,
        )
        .map_err(|e| {
            TrainError::Checkpoint(format!(
                "{} is not an anomaly report: {e}",
                metrics_path.display()
            ))
        })?;
        let threshold = *report.metrics.get("val/best_f1_threshold").ok_or_else(|| {
            TrainError::Checkpoint(format!(
                "{} has no val/best_f1_threshold",
                metrics_path.display()
            ))
        })?;
        let tensors = super::checkpoint::load_tensors(&path, &Device::Cpu)?;
        if anomaly.patch.is_some() {
            let info: patch::PatchInfo = super::checkpoint::header_json(&path, "patch")?
                .ok_or_else(|| {
                    TrainError::Checkpoint(format!(
                        "{} has no readable 'patch' metadata",
                        path.display()
                    ))
                })?;
            let scorer = patch::PatchScorer::load(&tensors, info, &anomaly.scorer, &path, device)?;
            return Ok(SavedScorer {
                model: Model::Patch(Box::new(scorer)),
                dim: 0,
                threshold,
                description: anomaly.describe(),
            });
        }
        let vector = |name: &str| -> Result<Tensor, TrainError> {
            tensors.get(name).cloned().ok_or_else(|| {
                TrainError::Checkpoint(format!("{} has no tensor {name}", path.display()))
            })
        };
        let mean = vector("input_mean")?.to_vec1::<f32>()?;
        let std = vector("input_std")?.to_vec1::<f32>()?;
        let dim = mean.len();
        let standardiser = Standardiser::from_parts(mean, std);
        let fitted = match &anomaly.scorer {
            Scorer::Knn { k, .. } => {
                let bank = vector("memory_bank")?;
                let values = bank.flatten_all()?.to_vec1::<f32>()?;
                Fitted::Knn {
                    bank: MemoryBank::new(values, dim, device)?,
                    k: *k,
                }
            }
            Scorer::Mahalanobis => Fitted::Mahalanobis(Gaussian::from_parts(
                vector("gaussian_mean")?.to_vec1::<f32>()?,
                vector("whitening")?.flatten_all()?.to_vec1::<f32>()?,
                report
                    .metrics
                    .get("train/shrinkage")
                    .copied()
                    .unwrap_or(0.0),
            )),
        };
        Ok(SavedScorer {
            model: Model::Pooled {
                standardiser,
                fitted,
            },
            dim,
            threshold,
            description: anomaly.describe(),
        })
    }

    pub fn feature_dim(&self) -> usize {
        self.dim
    }

    /// The patch scorer of a spatial run; None for image-level runs.
    pub fn patch(&self) -> Option<&patch::PatchScorer> {
        match &self.model {
            Model::Patch(scorer) => Some(scorer),
            Model::Pooled { .. } => None,
        }
    }

    /// Distance blocks of saved scorers (about 64 MiB of distances).
    pub fn plan() -> MemoryPlan {
        MemoryPlan {
            bank_block: (PREDICT_DISTANCE_BYTES / (QUERY_BLOCK * 8)).max(1),
            fixed_bytes: 0,
            per_bank_row_bytes: (QUERY_BLOCK * 8) as u64,
        }
    }

    /// Anomaly scores of raw (not standardised) pooled feature rows, `rows x dim`.
    pub fn scores(&self, rows: &[f32], device: &Device) -> Result<Vec<f64>, TrainError> {
        let dim = self.dim;
        if !rows.len().is_multiple_of(dim) {
            return Err(TrainError::Invalid(format!(
                "{} feature values are not rows of {dim}",
                rows.len()
            )));
        }
        let Model::Pooled {
            standardiser,
            fitted,
        } = &self.model
        else {
            return Err(TrainError::Invalid(
                "a patch-level scorer scores feature maps, not pooled rows".into(),
            ));
        };
        let plan = Self::plan();
        let mut out = Vec::with_capacity(rows.len() / dim);
        for block in rows.chunks(QUERY_BLOCK * dim) {
            let queries = standardiser.standardise(block.to_vec());
            out.extend(fitted.score_standardised(&queries, dim, &plan, device)?);
        }
        Ok(out)
    }
}

/// Metrics of one scored split: ROC-AUC, PR-AUC (average precision), the
/// best F1 and its threshold, and the counts.
fn split_metrics(
    name: &str,
    scores: &[f64],
    evaluated: &Evaluated,
) -> Result<BTreeMap<String, f64>, TrainError> {
    let positives = &evaluated.anomalous;
    let undefined = || TrainError::Invalid(format!("split {name} has no anomalous image"));
    let best = best_f1(scores, positives).ok_or_else(undefined)?;
    let anomalous = positives.iter().filter(|p| **p).count();
    Ok(BTreeMap::from([
        (
            format!("{name}/roc_auc"),
            roc_auc(scores, positives).ok_or_else(undefined)?,
        ),
        (
            format!("{name}/pr_auc"),
            average_precision(scores, positives).ok_or_else(undefined)?,
        ),
        (format!("{name}/best_f1"), best.f1),
        (format!("{name}/best_f1_threshold"), best.threshold),
        (format!("{name}/anomalous"), anomalous as f64),
        (
            format!("{name}/normal"),
            (positives.len() - anomalous) as f64,
        ),
        (format!("{name}/excluded"), evaluated.excluded as f64),
    ]))
}

/// The params row of an anomaly run (sweep-file names of its settings).
pub fn params(config: &TrainConfig, dataset: &str, encoder: &str) -> Vec<(String, ParamValue)> {
    let mut out: Vec<(String, ParamValue)> = vec![
        ("dataset".into(), dataset.into()),
        ("encoder".into(), encoder.into()),
        ("task".into(), config.task.name().into()),
        ("seed".into(), (config.seed as f64).into()),
    ];
    if let Some(anomaly) = config.task.anomaly() {
        out.push(("scorer".into(), anomaly.scorer.name().into()));
        out.push((
            "normal_label".into(),
            anomaly.normal_labels.join(",").into(),
        ));
        if !anomaly.anomaly_labels.is_empty() {
            out.push((
                "anomaly_label".into(),
                anomaly.anomaly_labels.join(",").into(),
            ));
        }
        if let Scorer::Knn { k, coreset } = &anomaly.scorer {
            out.push(("k".into(), (*k as f64).into()));
            match coreset {
                Some(Coreset::Fraction(f)) => out.push(("coreset".into(), (*f).into())),
                Some(Coreset::Count(n)) => out.push(("coreset_rows".into(), (*n as f64).into())),
                None => {}
            }
        }
        if let Some(patch) = &anomaly.patch {
            out.push(("spatial".into(), "true".into()));
            out.push((
                "channels".into(),
                match patch.channels {
                    Some(n) => (n as f64).into(),
                    None => "all".into(),
                },
            ));
            out.push(("heatmap_sigma".into(), patch.heatmap_sigma.into()));
        }
    }
    if !config.label_map.is_empty() {
        let classes: BTreeSet<&String> = config.label_map.values().collect();
        let text: Vec<&str> = classes.into_iter().map(String::as_str).collect();
        out.push(("label_map".into(), text.join(",").into()));
    }
    out
}

fn anomaly_config(config: &TrainConfig) -> Result<&AnomalyConfig, TrainError> {
    config.validate()?;
    config.task.anomaly().ok_or_else(|| {
        TrainError::Invalid(format!(
            "an anomaly run needs task anomaly, got task {}",
            config.task.name()
        ))
    })
}

/// Refuses a feature set of the wrong kind for the run: patch scoring needs
/// spatial features (`enqueue --spatial`), image-level scoring pooled ones.
pub fn check_features(data: &TrainData, anomaly: &AnomalyConfig) -> Result<(), TrainError> {
    let spatial = !data.features.maps().is_empty();
    let encoder = data
        .features
        .metadata()
        .get("encoder")
        .cloned()
        .unwrap_or_else(|| "ENCODER".into());
    let dataset = &data.dataset_name;
    match (anomaly.patch.is_some(), spatial) {
        (true, false) => Err(TrainError::NoFeatures(format!(
            "features {} of dataset {dataset} are pooled only; patch-level anomaly scores \
             (--spatial) need spatial features: run `lazarus enqueue --dataset {dataset} \
             --encoder {encoder} --spatial` and a worker",
            data.fingerprint
        ))),
        (false, true) => Err(TrainError::NoFeatures(format!(
            "features {} of dataset {dataset} are spatial (a row per tile); image-level anomaly \
             scores read pooled features: run `lazarus enqueue --dataset {dataset} --encoder \
             {encoder}` (without --spatial) and a worker, or add --spatial for patch-level scores",
            data.fingerprint
        ))),
        _ => Ok(()),
    }
}

/// Fits and scores one anomaly detector as a new run of `experiment`.
pub fn train(
    layout: &Layout,
    data: &TrainData,
    experiment: &str,
    config: TrainConfig,
    options: &AnomalyOptions,
) -> Result<AnomalyReport, TrainError> {
    let anomaly = anomaly_config(&config)?;
    // Refuse bad labels and features of the wrong kind before a run is recorded.
    check_features(data, anomaly)?;
    Selection::new(data, anomaly, config.train_views)?;
    let db = ExperimentsDb::open(layout)?;
    let inputs = run_inputs(data, &config);
    let handle = super::record::start(&db, experiment, &inputs, &maps_param(data, anomaly))?;
    fit_and_finish(layout, data, handle, &inputs, options)
}

/// A patch-level run's param `maps`: the maps of the spatial folder it
/// scores (`enqueue --maps`; absent in the metadata: the default). None for
/// image-level runs.
fn maps_param(data: &TrainData, anomaly: &AnomalyConfig) -> Vec<(String, ParamValue)> {
    if anomaly.patch.is_none() {
        return Vec::new();
    }
    let maps = data.features.recorded_maps();
    vec![("maps".to_string(), ParamValue::from(maps.as_str()))]
}

/// Runs fitted now, and (config hash, run id) of configs skipped as FINISHED.
pub type SweepRuns = (Vec<AnomalyReport>, Vec<(String, String)>);

/// The anomaly heads of a sweep on one feature set: each config FINISHED
/// before is skipped (returned as (config hash, run id)) unless `force`.
pub fn sweep_runs(
    layout: &Layout,
    db: &ExperimentsDb,
    data: &TrainData,
    sweep_name: &str,
    configs: &[TrainConfig],
    force: bool,
    options: &AnomalyOptions,
) -> Result<SweepRuns, TrainError> {
    let sweep_param = vec![("sweep".to_string(), ParamValue::from(sweep_name))];
    let mut seen = BTreeSet::new();
    let mut planned = Vec::new();
    let mut skipped = Vec::new();
    for config in configs {
        let anomaly = anomaly_config(config)?;
        check_features(data, anomaly)?;
        Selection::new(data, anomaly, config.train_views)?;
        let inputs = run_inputs(data, config);
        if !seen.insert(inputs.config_hash.clone()) {
            continue; // the same settings twice (k on a mahalanobis point)
        }
        if !force && let Some(id) = db.find_finished(&inputs.config_hash)? {
            skipped.push((inputs.config_hash.clone(), id));
            continue;
        }
        planned.push(inputs);
    }
    let mut reports = Vec::new();
    for inputs in planned {
        let mut params = sweep_param.clone();
        if let Some(anomaly) = inputs.config.task.anomaly() {
            params.extend(maps_param(data, anomaly));
        }
        let handle = super::record::start(db, sweep_name, &inputs, &params)?;
        reports.push(fit_and_finish(layout, data, handle, &inputs, options)?);
    }
    Ok((reports, skipped))
}

/// A fitted scorer of either level.
enum Model {
    /// Image level, on pooled features.
    Pooled {
        standardiser: Standardiser,
        fitted: Fitted,
    },
    /// Patch level, on spatial features (boxed: it is the larger one).
    Patch(Box<patch::PatchScorer>),
}

impl Model {
    /// The tensors of `scorer.safetensors` and the metadata of this kind.
    fn tensors(&self) -> Result<patch::ScorerFile, TrainError> {
        let (standardiser, fitted) = match self {
            Model::Pooled {
                standardiser,
                fitted,
            } => (standardiser, fitted),
            Model::Patch(scorer) => return scorer.tensors(),
        };
        let dim = standardiser.mean.len();
        let mut tensors = vec![
            (
                "input_mean".to_string(),
                Tensor::from_slice(&standardiser.mean, dim, &Device::Cpu)?,
            ),
            (
                "input_std".to_string(),
                Tensor::from_slice(&standardiser.std, dim, &Device::Cpu)?,
            ),
        ];
        tensors.extend(fitted.tensors()?);
        let metadata = match fitted {
            Fitted::Knn { k, .. } => HashMap::from([("k".to_string(), k.to_string())]),
            Fitted::Mahalanobis(gaussian) => {
                HashMap::from([("shrinkage".to_string(), gaussian.shrinkage.to_string())])
            }
        };
        Ok((tensors, metadata))
    }
}

/// Images of the test split whose heat maps a run writes (highest scores first).
const HEATMAP_IMAGES: usize = 8;
/// At most this many pixels per image enter the pixel-level ROC-AUC (a
/// regular subsample of larger images).
const PIXELS_PER_IMAGE: usize = 16_384;

fn fit_and_finish(
    layout: &Layout,
    data: &TrainData,
    handle: RunHandle,
    inputs: &RunInputs,
    options: &AnomalyOptions,
) -> Result<AnomalyReport, TrainError> {
    let config = &inputs.config;
    let anomaly = anomaly_config(config)?;
    let selection = Selection::new(data, anomaly, config.train_views)?;
    let device = &options.device;
    let started = Instant::now();
    let mut metrics = BTreeMap::new();
    let (mut model, plan) = match &anomaly.patch {
        None => {
            let standardiser = Standardiser::fit(&data.features, &selection.fit_rows);
            let (fitted, plan) = fit(data, &selection, config, anomaly, &standardiser, device)?;
            (
                Model::Pooled {
                    standardiser,
                    fitted,
                },
                plan,
            )
        }
        Some(patch_config) => {
            let request = patch::PatchFit {
                features: &data.features,
                normal_images: &selection.normal_train,
                scorer: &anomaly.scorer,
                patch: patch_config,
                seed: config.seed,
                budget: config.memory_budget_bytes,
                runtime_bytes: runtime_bytes(data),
            };
            let (scorer, plan, stats) = patch::fit(&request, device)?;
            metrics.insert("train/patches".to_string(), stats.patches as f64);
            metrics.insert("train/channels".to_string(), stats.channels as f64);
            if let Some(shrinkage) = stats.mean_shrinkage {
                metrics.insert("train/shrinkage".to_string(), shrinkage);
            }
            if let Some(rows) = scorer.memory_bank_rows() {
                metrics.insert("train/memory_bank".to_string(), rows as f64);
            }
            (Model::Patch(Box::new(scorer)), plan)
        }
    };
    let fit_secs = started.elapsed().as_secs_f64();
    let started = Instant::now();
    let (val_scores, test_scores, test_images) = match &mut model {
        Model::Pooled {
            standardiser,
            fitted,
        } => (
            fitted.scores(
                data,
                standardiser,
                &selection.val.rows,
                config.eval_views,
                &plan,
                device,
            )?,
            fitted.scores(
                data,
                standardiser,
                &selection.test.rows,
                config.eval_views,
                &plan,
                device,
            )?,
            Vec::new(),
        ),
        Model::Patch(scorer) => {
            let val = scorer.score_images(&data.features, &selection.val.rows, &plan, device)?;
            let test = scorer.score_images(&data.features, &selection.test.rows, &plan, device)?;
            let lowest = val
                .iter()
                .flat_map(|image| image.tiles.iter().flat_map(|(_, grid)| grid.iter()))
                .fold(f32::INFINITY, |a, &b| a.min(b)) as f64;
            let highest = val
                .iter()
                .map(|i| i.score)
                .fold(f64::NEG_INFINITY, f64::max);
            scorer.info.heat_range = [lowest, highest.max(lowest + 1e-6)];
            (
                val.iter().map(|i| i.score).collect(),
                test.iter().map(|i| i.score).collect(),
                test,
            )
        }
    };
    let score_secs = started.elapsed().as_secs_f64();

    let val = split_metrics("val", &val_scores, &selection.val)?;
    metrics.extend(val.clone());
    metrics.extend(split_metrics("test", &test_scores, &selection.test)?);
    // The threshold chosen on validation, applied to test: what a deployment would see.
    metrics.insert(
        "test/f1_at_val_threshold".into(),
        f1_at(
            &test_scores,
            &selection.test.anomalous,
            val["val/best_f1_threshold"],
        ),
    );
    metrics.insert("train/normal".into(), selection.normal_train.len() as f64);
    let memory_bank_rows = match &model {
        Model::Pooled {
            fitted: Fitted::Knn { bank, .. },
            ..
        } => {
            metrics.insert("train/memory_bank".into(), bank.len() as f64);
            Some(bank.len())
        }
        Model::Pooled {
            fitted: Fitted::Mahalanobis(gaussian),
            ..
        } => {
            metrics.insert("train/shrinkage".into(), gaussian.shrinkage);
            None
        }
        Model::Patch(scorer) => scorer.memory_bank_rows(),
    };
    let mut heatmaps = Vec::new();
    if let Model::Patch(scorer) = &model {
        let dataset =
            crate::dataset::load_at(layout, &data.dataset_name, Some(data.dataset_version))?;
        let records: Vec<&crate::dataset::ImageRecord> = selection
            .test
            .rows
            .iter()
            .map(|&row| {
                dataset
                    .record(data.features.image_indices()[row])
                    .expect("bound rows are listed images")
            })
            .collect();
        if let Some(auc) = pixel_roc_auc(scorer, &records, &test_images, &selection.test.anomalous)?
        {
            metrics.insert("test/pixel_roc_auc".into(), auc);
        }
        heatmaps = write_heat_maps(&handle, scorer, &records, &test_images)?;
    }
    let values: Vec<(&str, f64)> = val.iter().map(|(k, v)| (k.as_str(), *v)).collect();
    handle.log_metrics(1, &values)?;

    let report = AnomalyReport {
        run_id: handle.id().to_string(),
        run_dir: handle.dir().to_path_buf(),
        config_hash: inputs.config_hash.clone(),
        task: Task::Anomaly,
        scorer: anomaly.describe(),
        normal_classes: names(data, &selection.normal_classes),
        anomaly_classes: names(data, &selection.anomaly_classes),
        normal_train_rows: selection.normal_train.len(),
        memory_bank_rows,
        metrics,
        plan,
        fit_secs,
        score_secs,
        peak_rss_bytes: peak_rss_bytes(),
        heatmaps,
    };
    write_artifacts(
        &handle,
        &report,
        data,
        config,
        &model,
        &[
            ("val", &selection.val, &val_scores),
            ("test", &selection.test, &test_scores),
        ],
    )?;
    let mut summary: Vec<(String, f64)> = report
        .metrics
        .iter()
        .map(|(k, v)| (k.clone(), *v))
        .collect();
    if let Some(peak) = report.peak_rss_bytes {
        summary.push(("peak_rss_bytes".into(), peak as f64));
    }
    handle.finish(RunStatus::Finished, &summary)?;
    Ok(report)
}

/// The decoded image of a dataset record.
fn read_image(record: &crate::dataset::ImageRecord) -> Result<image::RgbImage, TrainError> {
    let bytes = std::fs::read(&record.path).map_err(|e| {
        TrainError::Invalid(format!("cannot read image {}: {e}", record.path.display()))
    })?;
    crate::preprocess::decode_rgb8(
        &bytes,
        &record.path,
        crate::preprocess::PreprocessConfig::DEFAULT_MAX_PIXELS,
    )
    .map_err(|e| TrainError::Invalid(e.to_string()))
}

/// Pixel-level ROC-AUC of the test heat maps against the masks (foreground
/// = anomalous), when every scored test image has a mask; None otherwise.
/// Larger images enter with a regular subsample of their pixels.
fn pixel_roc_auc(
    scorer: &patch::PatchScorer,
    records: &[&crate::dataset::ImageRecord],
    images: &[patch::ScoredImage],
    anomalous: &[bool],
) -> Result<Option<f64>, TrainError> {
    if records.is_empty() || records.iter().any(|r| r.mask.is_none()) {
        return Ok(None);
    }
    let mut scores = Vec::new();
    let mut positives = Vec::new();
    for ((record, image), &image_anomalous) in records.iter().zip(images).zip(anomalous) {
        let mask_path = record.mask.as_ref().expect("checked above");
        let mask = crate::spatial::mask::read_mask(mask_path, crate::dataset::MaskKind::Binary)?;
        if (mask.width, mask.height) != (record.width, record.height) {
            return Err(TrainError::Invalid(format!(
                "mask {} is {}x{}, its image {} is {}x{}",
                mask_path.display(),
                mask.width,
                mask.height,
                record.path.display(),
                record.width,
                record.height
            )));
        }
        let heat = scorer.heat_map(image, record.width, record.height);
        let pixels = heat.len();
        let step = ((pixels as f64 / PIXELS_PER_IMAGE as f64).sqrt().ceil() as usize).max(1);
        let width = record.width as usize;
        for y in (0..record.height as usize).step_by(step) {
            for x in (0..width).step_by(step) {
                scores.push(heat[y * width + x] as f64);
                // A normal image's pixels are normal whatever its mask says.
                positives.push(image_anomalous && mask.classes[y * width + x] > 0);
            }
        }
    }
    Ok(roc_auc(&scores, &positives))
}

/// `heatmaps/RANK-STEM.png`: overlays of the highest-scored test images.
fn write_heat_maps(
    handle: &RunHandle,
    scorer: &patch::PatchScorer,
    records: &[&crate::dataset::ImageRecord],
    images: &[patch::ScoredImage],
) -> Result<Vec<String>, TrainError> {
    let mut order: Vec<usize> = (0..images.len()).collect();
    order.sort_by(|&a, &b| images[b].score.total_cmp(&images[a].score));
    let mut written = Vec::new();
    for (rank, &i) in order.iter().take(HEATMAP_IMAGES).enumerate() {
        let record = records[i];
        let picture = read_image(record)?;
        let heat = scorer.heat_map(&images[i], picture.width(), picture.height());
        let (_, overlay) = patch::render(&picture, &heat, scorer.info.heat_range);
        let stem = record
            .path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| record.index.to_string());
        let name = format!("heatmaps/{:02}-{stem}.png", rank + 1);
        handle.write_artifact(
            &name,
            &patch::png_bytes(&image::DynamicImage::ImageRgb8(overlay))?,
        )?;
        written.push(name);
    }
    Ok(written)
}

fn names(data: &TrainData, classes: &[usize]) -> Vec<String> {
    classes
        .iter()
        .map(|&c| data.class_names[c].clone())
        .collect()
}

#[derive(Serialize)]
struct ModelCard<'a> {
    run_id: &'a str,
    created_at: String,
    lazarus_version: &'static str,
    task: &'static str,
    dataset: &'a str,
    encoder: Option<String>,
    encoder_fingerprint: &'a str,
    scorer: &'a str,
    normal_classes: &'a [String],
    anomaly_classes: &'a [String],
    normal_train_rows: usize,
    config: &'a TrainConfig,
    metrics: &'a BTreeMap<String, f64>,
    intended_use: &'static str,
    limitations: &'static str,
}

type ScoredSplit<'a> = (&'a str, &'a Evaluated, &'a Vec<f64>);

fn write_artifacts(
    handle: &RunHandle,
    report: &AnomalyReport,
    data: &TrainData,
    config: &TrainConfig,
    model: &Model,
    splits: &[ScoredSplit<'_>],
) -> Result<(), TrainError> {
    let json = serde_json::to_vec_pretty(report).map_err(|e| TrainError::Invalid(e.to_string()))?;
    handle.write_artifact(run_files::METRICS_FILE, &json)?;

    let (tensors, mut metadata) = model.tensors()?;
    metadata.extend([
        ("task".to_string(), Task::Anomaly.name().to_string()),
        ("fingerprint".to_string(), data.fingerprint.clone()),
        ("scorer".to_string(), report.scorer.clone()),
        (
            "normal_classes".to_string(),
            serde_json::to_string(&report.normal_classes).expect("strings serialise"),
        ),
        (
            "val_best_f1_threshold".to_string(),
            report.metrics["val/best_f1_threshold"].to_string(),
        ),
    ]);
    handle.write_artifact(
        run_files::SCORER_FILE,
        &super::checkpoint::safetensors_bytes(&tensors, Some(metadata))?,
    )?;

    // One line per scored image, for review and threshold choices.
    let csv_error = |e: csv::Error| TrainError::Invalid(format!("writing scores.csv: {e}"));
    let mut csv = csv::Writer::from_writer(Vec::new());
    csv.write_record(["image_index", "split", "label", "anomalous", "score"])
        .map_err(csv_error)?;
    let indices = data.features.image_indices();
    for (name, evaluated, scores) in splits {
        for ((&row, &label), (anomalous, score)) in evaluated
            .rows
            .iter()
            .zip(&evaluated.labels)
            .zip(evaluated.anomalous.iter().zip(scores.iter()))
        {
            csv.write_record([
                indices[row].to_string().as_str(),
                name,
                &data.class_names[label],
                if *anomalous { "1" } else { "0" },
                &score.to_string(),
            ])
            .map_err(csv_error)?;
        }
    }
    let csv = csv
        .into_inner()
        .map_err(|e| TrainError::Invalid(format!("writing scores.csv: {e}")))?;
    handle.write_artifact(run_files::SCORES_FILE, &csv)?;

    let card = ModelCard {
        run_id: &report.run_id,
        created_at: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        lazarus_version: crate::VERSION,
        task: "image anomaly detection from frozen-encoder features, fitted on normal images",
        dataset: &data.dataset_name,
        encoder: data.features.metadata().get("encoder").cloned(),
        encoder_fingerprint: &data.fingerprint,
        scorer: &report.scorer,
        normal_classes: &report.normal_classes,
        anomaly_classes: &report.anomaly_classes,
        normal_train_rows: report.normal_train_rows,
        config,
        metrics: &report.metrics,
        intended_use: "Ranking images like those of the training dataset by how unlike the \
                       normal training images they are, for review; the best-F1 thresholds \
                       are chosen on labelled splits and should be re-checked on new data.",
        limitations: match model {
            Model::Pooled { .. } => {
                "Image-level scores from pooled features: small or local defects may not \
                 move them. Measured on one held-out split of one dataset."
            }
            Model::Patch(_) => {
                "Patch scores on the encoder's stride-16 grid: defects smaller than a grid \
                 cell may be missed and heat maps are interpolated. Measured on one \
                 held-out split of one dataset."
            }
        },
    };
    super::record::write_config_and_card(handle, config, &card)?;

    let curves: Vec<RocCurve> = splits
        .iter()
        .filter_map(|(name, evaluated, scores)| {
            let points = roc_curve(scores, &evaluated.anomalous)?;
            Some(RocCurve {
                label: name.to_string(),
                points,
                auc: report.metrics[&format!("{name}/roc_auc")],
            })
        })
        .collect();
    let plots = handle.folder().plots();
    std::fs::create_dir_all(&plots).map_err(TrainError::io(&plots))?;
    experiments::plots::roc_curves(&plots, &curves)?;
    let curves = run_files::ScoreCurves {
        positive: "anomalous".into(),
        splits: splits
            .iter()
            .map(|(name, evaluated, scores)| {
                crate::train::metrics::split_curves(name, scores, &evaluated.anomalous)
            })
            .collect(),
    };
    let json =
        serde_json::to_vec_pretty(&curves).map_err(|e| TrainError::Invalid(e.to_string()))?;
    handle.write_artifact(run_files::CURVES_FILE, &json)?;
    Ok(())
}

//! `lazarus predict`: a trained model on new images, one path for every
//! task and caller. A [`Predictor`] is the model loaded once: opened from a
//! run by the task the run recorded ([`Predictor::open_run`]: a classifier
//! head, an anomaly scorer or a segmentation head), or from an exported
//! bundle (`bundle::open`). Every task works alike: images already in the
//! feature cache (same content id, `features::catalog::FeatureCache`) reuse
//! their cached features; the others go through the encoder, weights and
//! preprocessing that made the cache ([`EncoderReference`]: the weights'
//! sha256 is checked before they are loaded). [`predict_files`] is the one
//! per-image loop of `lazarus predict` (runs through [`predict_run`], and
//! bundles): a bad image gets its own error and the rest continue; `serve`
//! calls the same predictor's `prepare` and `predict`.
//!
//! [`TrainedHead`] is also what `review` scores cached features with.

pub mod anomaly;
mod predictor;
pub mod segment;

pub use predictor::{
    FineTunedModel, Model, Outcome, Predictor, PredictorParts, PrepareError, Prepared, RawResult,
    TILE_GROUP,
};

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{D, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::encoders::{self, Encoder, PooledLayers, SpatialMaps, ViewSet, WeightsSource};
use crate::features::FeatureSet;
use crate::layout::Layout;
use crate::preprocess::PreprocessConfig;
use crate::train::config::{HeadConfig, Task};
use crate::train::head::Head;
use crate::train::run::{RunInputs, read_run_inputs};

#[derive(Debug, thiserror::Error)]
pub enum PredictError {
    #[error("run {run} not found: {reason}")]
    UnknownRun { run: String, reason: String },
    #[error("run {run}: {message}")]
    Run { run: String, message: String },
    /// `owner` is "run ID" or "bundle DIR".
    #[error("{owner}: {message}")]
    Model { owner: String, message: String },
    #[error("encoder for {owner}: {message}")]
    Encoder { owner: String, message: String },
    #[error(
        "encoder {encoder} for {owner}: the installed weights have sha256 {installed}, \
         not {wanted} (the weights that made the head's features)"
    )]
    WeightsMismatch {
        owner: String,
        encoder: String,
        installed: String,
        wanted: String,
    },
    #[error(transparent)]
    Train(#[from] crate::train::TrainError),
    #[error(transparent)]
    Segment(Box<crate::segment::SegmentError>),
    #[error(transparent)]
    Spatial(#[from] crate::spatial::SpatialError),
    #[error(transparent)]
    Features(#[from] crate::features::FeatureError),
    #[error(transparent)]
    Dataset(#[from] crate::dataset::DatasetError),
    #[error("tensor computation failed: {0}")]
    Tensor(#[from] candle_core::Error),
}

impl From<crate::segment::SegmentError> for PredictError {
    fn from(error: crate::segment::SegmentError) -> Self {
        PredictError::Segment(Box::new(error))
    }
}

/// How to predict.
pub struct PredictConfig {
    pub top_k: usize,
    pub device: Device,
    /// Images per encoder forward pass.
    pub batch_size: usize,
}

/// One image's result: its top classes, or why it has none.
#[derive(Debug, Clone, Serialize)]
pub struct Prediction {
    pub path: PathBuf,
    pub image_id: Option<String>,
    /// "cache" when cached features were reused, "encoder" otherwise.
    pub features_from: Option<&'static str>,
    /// (class, probability), most likely first.
    pub top: Vec<(String, f64)>,
    pub error: Option<String>,
}

/// Feature rows scored per head forward pass.
const ROWS_PER_PASS: usize = 1024;

/// A trained head with its standardisation, ready to score feature rows.
pub struct TrainedHead {
    head: Head,
    mean: Tensor,
    std: Tensor,
    class_names: Vec<String>,
}

impl TrainedHead {
    /// A head from its `head.safetensors` tensors (`layers.N.*`,
    /// `input_mean`, `input_std`); `source` names the file in errors.
    pub fn from_tensors(
        config: &HeadConfig,
        tensors: &HashMap<String, Tensor>,
        class_names: Vec<String>,
        source: &Path,
    ) -> Result<Self, crate::train::TrainError> {
        let tensor = |name: &str| {
            tensors.get(name).cloned().ok_or_else(|| {
                crate::train::TrainError::Checkpoint(format!(
                    "{} has no tensor {name}",
                    source.display()
                ))
            })
        };
        let (mean, std) = (tensor("input_mean")?, tensor("input_std")?);
        let head = Head::from_tensors(config, tensors, mean.dims1()?)?;
        if head.classes() != class_names.len() {
            return Err(crate::train::TrainError::Checkpoint(format!(
                "{}: head has {} outputs for {} classes",
                source.display(),
                head.classes(),
                class_names.len()
            )));
        }
        Ok(TrainedHead {
            head,
            mean,
            std,
            class_names,
        })
    }

    pub fn class_names(&self) -> &[String] {
        &self.class_names
    }

    /// The feature dimension the head reads.
    pub fn input_dim(&self) -> usize {
        self.mean.dims()[0]
    }

    /// Class probabilities for a batch of raw (unstandardised) features [n, dim].
    pub fn probabilities(&self, pooled: &Tensor) -> Result<Vec<Vec<f32>>, PredictError> {
        let x = pooled
            .to_dtype(candle_core::DType::F32)?
            .broadcast_sub(&self.mean)?
            .broadcast_div(&self.std)?;
        let logits = self.head.forward(&x, candle_core::DType::F32, None)?;
        Ok(candle_nn::ops::softmax(&logits, D::Minus1)?.to_vec2::<f32>()?)
    }

    /// Class probabilities for cached feature rows, in the order given.
    pub fn probabilities_of_rows(
        &self,
        features: &FeatureSet,
        rows: &[usize],
    ) -> Result<Vec<Vec<f32>>, PredictError> {
        let dim = features.feature_dim();
        let device = self.mean.device();
        let mut out = Vec::with_capacity(rows.len());
        for chunk in rows.chunks(ROWS_PER_PASS) {
            let values: Vec<half::f16> = chunk
                .iter()
                .flat_map(|&row| features.pooled(row).iter().copied())
                .collect();
            let pooled = Tensor::from_vec(values, (chunk.len(), dim), device)?;
            out.extend(self.probabilities(&pooled)?);
        }
        Ok(out)
    }

    fn top_k(&self, probabilities: &[f32], k: usize) -> Vec<(String, f64)> {
        top_k(probabilities, k)
            .into_iter()
            .map(|(c, p)| (self.class_names[c].clone(), p as f64))
            .collect()
    }
}

/// Class indices with their probabilities, most likely first (ties: lower index).
pub fn top_k(probabilities: &[f32], k: usize) -> Vec<(usize, f32)> {
    let mut order: Vec<usize> = (0..probabilities.len()).collect();
    order.sort_by(|&a, &b| {
        probabilities[b]
            .total_cmp(&probabilities[a])
            .then(a.cmp(&b))
    });
    order
        .into_iter()
        .take(k.max(1))
        .map(|c| (c, probabilities[c]))
        .collect()
}

/// An image file as every predictor reads it: its bytes and its content id
/// (the sha256 that keys cached rows), or the per-image error to report.
pub(crate) struct ImageFile {
    pub bytes: Vec<u8>,
    pub sha256: [u8; 32],
    pub id: String,
}

pub(crate) fn read_image(path: &Path) -> Result<ImageFile, String> {
    let bytes = crate::files::read_regular_file(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let sha256 = crate::digest::sha256(&bytes);
    Ok(ImageFile {
        id: hex::encode(sha256),
        bytes,
        sha256,
    })
}

/// The folder of run `run_id`, which experiments.db must record: a run id is
/// never taken as a path.
pub fn run_folder(layout: &Layout, run_id: &str) -> Result<PathBuf, PredictError> {
    let unknown = |reason: String| PredictError::UnknownRun {
        run: run_id.to_string(),
        reason,
    };
    let dir = crate::experiments::recorded_run_dir(layout, run_id).map_err(|e| match e {
        crate::experiments::ExperimentsError::UnknownRun { .. } => unknown(e.to_string()),
        other => PredictError::Run {
            run: run_id.to_string(),
            message: other.to_string(),
        },
    })?;
    if !dir.is_dir() {
        return Err(unknown(format!("no folder {}", dir.display())));
    }
    Ok(dir)
}

/// A finished run's head and what its folder records about its inputs.
pub fn load_run_head(
    layout: &Layout,
    run_id: &str,
    device: &Device,
) -> Result<(TrainedHead, RunInputs), PredictError> {
    let run_dir = run_folder(layout, run_id)?;
    let head_path = run_dir.join("head.safetensors");
    if !head_path.is_file() {
        return Err(PredictError::Run {
            run: run_id.to_string(),
            message: format!("{} is missing: the run did not finish", head_path.display()),
        });
    }
    let inputs = read_run_inputs(&run_dir)?;
    if let Some(unfreeze) = inputs.config.unfreeze {
        return Err(PredictError::Run {
            run: run_id.to_string(),
            message: format!(
                "it trained the encoder's blocks after block {} with its head (--unfreeze-from): \
                 its head reads their output, not cached features; predict, export and serve \
                 run the blocks",
                unfreeze.after_block
            ),
        });
    }
    let head = read_run_head(&run_dir, &inputs, device)?;
    Ok((head, inputs))
}

/// The head file of a run folder (`inputs` read from it), on `device`.
pub(crate) fn read_run_head(
    run_dir: &Path,
    inputs: &RunInputs,
    device: &Device,
) -> Result<TrainedHead, PredictError> {
    let head_path = crate::experiments::run_files::RunFolder::new(run_dir).head();
    let tensors = crate::train::checkpoint::load_tensors(&head_path, device)?;
    Ok(TrainedHead::from_tensors(
        &inputs.config.head,
        &tensors,
        inputs.class_names.clone(),
        &head_path,
    )?)
}

/// The encoder, weights and preprocessing that made a head's features.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EncoderReference {
    /// Registry name, e.g. `efficientnet-lite0`.
    pub name: String,
    /// `sha256:HEX` of the weights file, or `random:SEED`.
    pub weights: String,
    pub preprocess: PreprocessConfig,
    /// The feature fingerprint (encoder, weights, preprocessing, format).
    pub fingerprint: String,
    pub feature_dim: usize,
    /// The layers the pooled features are made of (absent in bundles
    /// written before `--layers`: `last`).
    #[serde(default, skip_serializing_if = "PooledLayers::is_last")]
    pub layers: PooledLayers,
    /// The views of each image the features hold (`enqueue --views`;
    /// absent in bundles written before it: `1`): a new image is encoded
    /// in these views, in this order.
    #[serde(default, skip_serializing_if = "ViewSet::is_single")]
    pub views: ViewSet,
    /// The spatial maps of a spatial folder (`enqueue --maps`; absent in
    /// bundles written before it: `16,32`): tiles the cache lacks are
    /// encoded into these maps.
    #[serde(default, skip_serializing_if = "SpatialMaps::is_default")]
    pub maps: SpatialMaps,
}

impl EncoderReference {
    /// What a feature folder's shard metadata says made it; None when the
    /// shards do not name a registered encoder and its weights.
    pub fn from_features(
        features: &FeatureSet,
        fingerprint: &str,
    ) -> Result<Option<Self>, PredictError> {
        let metadata = features.metadata();
        let (Some(name), Some(weights)) = (metadata.get("encoder"), metadata.get("weights")) else {
            return Ok(None);
        };
        let Ok(spec) = encoders::lookup(name) else {
            return Ok(None);
        };
        let preprocess = match metadata.get("preprocess") {
            Some(json) => serde_json::from_str(json).map_err(|e| PredictError::Encoder {
                owner: format!("features {}", features.dir().display()),
                message: format!("shard metadata preprocess is not readable: {e}"),
            })?,
            None => spec.preprocess.clone(),
        };
        let layers = match metadata.get("layers") {
            Some(text) => PooledLayers::parse(text).map_err(|e| PredictError::Encoder {
                owner: format!("features {}", features.dir().display()),
                message: format!("shard metadata layers: {e}"),
            })?,
            None => PooledLayers::last(),
        };
        let maps = match metadata.get("maps") {
            Some(text) => SpatialMaps::parse(text).map_err(|e| PredictError::Encoder {
                owner: format!("features {}", features.dir().display()),
                message: format!("shard metadata maps: {e}"),
            })?,
            None => SpatialMaps::default(),
        };
        let views = features.views()?;
        Ok(Some(EncoderReference {
            layers,
            views,
            maps,
            name: name.clone(),
            weights: weights.clone(),
            preprocess,
            fingerprint: fingerprint.to_string(),
            feature_dim: features.feature_dim(),
        }))
    }

    /// The sha256 the weights must have (None for random weights).
    pub fn weights_sha256(&self) -> Option<&str> {
        self.weights.strip_prefix("sha256:")
    }

    /// Builds the encoder: seeded random weights, or the installed weights
    /// after checking their sha256 against this reference. `owner` names the
    /// run or bundle in errors.
    pub fn load(&self, device: &Device, owner: &str) -> Result<Box<dyn Encoder>, PredictError> {
        let encoder_error = |message: String| PredictError::Encoder {
            owner: owner.to_string(),
            message,
        };
        // The square the features were computed at (`enqueue --image-size`).
        let spec = encoders::lookup(&self.name)
            .map_err(|e| encoder_error(e.to_string()))?
            .with_preprocess(&self.preprocess);
        let source = match self.weights.strip_prefix("random:") {
            Some(seed) => WeightsSource::Random {
                seed: seed
                    .parse()
                    .map_err(|_| encoder_error(format!("bad weights id {}", self.weights)))?,
            },
            None => {
                let wanted = self
                    .weights_sha256()
                    .ok_or_else(|| encoder_error(format!("bad weights id {}", self.weights)))?;
                // Checked before loading: a wrong file fails here by name,
                // not later on a missing tensor.
                let installed = crate::weights::installed(&self.name).ok_or_else(|| {
                    encoder_error(format!(
                        "no weights installed for {}; run `lazarus weights fetch {}` \
                         (sha256 {wanted} is needed)",
                        self.name, self.name
                    ))
                })?;
                if installed.sha256 != wanted {
                    return Err(PredictError::WeightsMismatch {
                        owner: owner.to_string(),
                        encoder: self.name.clone(),
                        installed: installed.sha256,
                        wanted: wanted.to_string(),
                    });
                }
                WeightsSource::Installed
            }
        };
        // `Installed` re-hashes the file against its recorded sha256.
        encoders::load_encoder_layers(&spec, source, device, &self.layers)
            .map_err(|e| encoder_error(e.to_string()))
    }
}

/// What a run predicted, by the task it recorded.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum RunPredictions {
    /// Top classes per image.
    Classify(Vec<Prediction>),
    /// Scores (and heat maps) per image, with the scorer's threshold.
    Anomaly(anomaly::AnomalyPredictions),
    /// A mask and an overlay per image.
    Segment(Vec<segment::SegmentPrediction>),
}

impl RunPredictions {
    /// The task the predictions are of.
    pub fn task(&self) -> Task {
        match self {
            RunPredictions::Classify(_) => Task::Classify,
            RunPredictions::Anomaly(_) => Task::Anomaly,
            RunPredictions::Segment(_) => Task::Segment,
        }
    }

    /// Images predicted.
    pub fn len(&self) -> usize {
        match self {
            RunPredictions::Classify(p) => p.len(),
            RunPredictions::Anomaly(p) => p.images.len(),
            RunPredictions::Segment(p) => p.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// What was done to each image, for "N of M images could not be …".
    pub fn verb(&self) -> &'static str {
        match self {
            RunPredictions::Classify(_) => "predicted",
            RunPredictions::Anomaly(_) => "scored",
            RunPredictions::Segment(_) => "segmented",
        }
    }

    /// The answers as text, one line per image: `Ok` for an answer, `Err`
    /// for an image that has none (`error: PATH: why`), in image order; an
    /// anomaly run's first line names its scorer and threshold.
    pub fn lines(&self) -> Vec<Result<String, String>> {
        let failed = |path: &Path, error: &str| Err(format!("error: {}: {error}", path.display()));
        let mut lines = Vec::new();
        match self {
            RunPredictions::Classify(predictions) => {
                for p in predictions {
                    lines.push(match &p.error {
                        Some(error) => failed(&p.path, error),
                        None => {
                            let classes: Vec<String> = p
                                .top
                                .iter()
                                .map(|(class, probability)| format!("{class} {probability:.3}"))
                                .collect();
                            Ok(format!(
                                "{}: {} ({})",
                                p.path.display(),
                                classes.join(", "),
                                p.features_from.unwrap_or("")
                            ))
                        }
                    });
                }
            }
            RunPredictions::Anomaly(scored) => {
                lines.push(Ok(format!(
                    "run {} ({}): anomalous at score >= {:.4} (best F1 on the validation split)",
                    scored.run, scored.scorer, scored.threshold
                )));
                for p in &scored.images {
                    match (&p.error, p.score, p.anomalous) {
                        (Some(error), _, _) => lines.push(failed(&p.path, error)),
                        (None, Some(score), Some(anomalous)) => lines.push(Ok(format!(
                            "{}: score {score:.4} {} ({}){}",
                            p.path.display(),
                            if anomalous { "anomalous" } else { "normal" },
                            p.features_from.unwrap_or(""),
                            p.heatmap
                                .as_ref()
                                .map(|h| format!(", heat map {}", h.display()))
                                .unwrap_or_default()
                        ))),
                        _ => {}
                    }
                }
            }
            RunPredictions::Segment(predictions) => {
                for p in predictions {
                    match (&p.error, &p.mask) {
                        (Some(error), _) => lines.push(failed(&p.path, error)),
                        (None, Some(mask)) => lines.push(Ok(format!(
                            "{}: {}x{} in {} tiles, foreground {:.3}: {} ({})",
                            p.path.display(),
                            p.width,
                            p.height,
                            p.tiles,
                            p.foreground_fraction.unwrap_or(0.0),
                            mask.display(),
                            p.features_from.unwrap_or("")
                        ))),
                        (None, None) => {}
                    }
                }
            }
        }
        lines
    }

    /// Images that got an error instead of a prediction.
    pub fn failed(&self) -> usize {
        match self {
            RunPredictions::Classify(p) => p.iter().filter(|p| p.error.is_some()).count(),
            RunPredictions::Anomaly(p) => p.images.iter().filter(|p| p.error.is_some()).count(),
            RunPredictions::Segment(p) => p.iter().filter(|p| p.error.is_some()).count(),
        }
    }

    /// Writes the predictions to `path`: CSV for a `.csv` name (one table
    /// per task, see each task's `write_csv`), JSON otherwise.
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        if path.extension().and_then(|e| e.to_str()) == Some("csv") {
            match self {
                RunPredictions::Classify(p) => write_csv(p, path),
                RunPredictions::Anomaly(p) => anomaly::write_csv(&p.images, path),
                RunPredictions::Segment(p) => segment::write_csv(p, path),
            }
        } else {
            let json = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
            crate::atomic::write_file(path, &json)
        }
    }
}

/// The task run `run_id` recorded when it started (its `config.json`).
pub fn run_task(layout: &Layout, run_id: &str) -> Result<Task, PredictError> {
    let dir = run_folder(layout, run_id)?;
    Ok(read_run_inputs(&dir)?.config.task.kind())
}

/// Predicts `images` with run `run_id`, whatever its task: the one entry
/// point for runs. Segmentation and patch-level anomaly runs write their
/// pictures (masks, heat maps, overlays) into `out_dir`, which they need.
pub fn predict_run(
    layout: &Layout,
    run_id: &str,
    images: &[PathBuf],
    config: &PredictConfig,
    out_dir: Option<&Path>,
) -> Result<RunPredictions, PredictError> {
    let predictor = Predictor::open_run(layout, run_id, &config.device)?;
    predict_files(&predictor, images, config, out_dir)
}

/// Predicts the classes of `images` with run `run_id`'s head.
pub fn predict(
    layout: &Layout,
    run_id: &str,
    images: &[PathBuf],
    config: &PredictConfig,
) -> Result<Vec<Prediction>, PredictError> {
    match predict_run(layout, run_id, images, config, None)? {
        RunPredictions::Classify(predictions) => Ok(predictions),
        other => Err(PredictError::Run {
            run: run_id.to_string(),
            message: format!("a {} run, not a classification run", other.task().name()),
        }),
    }
}

/// The one per-image loop: each file is read (a bad one gets its own
/// error), prepared (content id, cached rows or preprocessed input) and
/// predicted in batches of up to `config.batch_size` images or encoder
/// inputs by `predictor`; the
/// answers are put in the task's terms, tile-based tasks writing their
/// pictures into `out_dir`.
pub fn predict_files(
    predictor: &Predictor,
    images: &[PathBuf],
    config: &PredictConfig,
    out_dir: Option<&Path>,
) -> Result<RunPredictions, PredictError> {
    let mut predictions = match predictor.model() {
        Model::Classify(_) | Model::FineTuned(_) => {
            RunPredictions::Classify(Vec::with_capacity(images.len()))
        }
        Model::Anomaly(scorer) => RunPredictions::Anomaly(anomaly::AnomalyPredictions {
            run: predictor.run_id().to_string(),
            scorer: scorer.description.clone(),
            threshold: scorer.threshold,
            images: Vec::with_capacity(images.len()),
        }),
        Model::Segment(_) => RunPredictions::Segment(Vec::with_capacity(images.len())),
    };
    let out_dir = match (predictor.is_tiled(), out_dir) {
        (false, _) => None,
        (true, Some(out_dir)) => {
            std::fs::create_dir_all(out_dir).map_err(|e| PredictError::Model {
                owner: predictor.owner().to_string(),
                message: format!("cannot create {}: {e}", out_dir.display()),
            })?;
            Some(out_dir)
        }
        (true, None) => {
            let pictures = match predictor.task() {
                Task::Segment => "a segmentation model writes masks and overlays",
                _ => "a patch-level anomaly model writes heat maps",
            };
            return Err(PredictError::Model {
                owner: predictor.owner().to_string(),
                message: format!("{pictures}: give --out DIR"),
            });
        }
    };
    // A batch closes at `batch_size` images or encoder inputs (tiles), so
    // tile-based tasks hold few images' tiles at once.
    let limit = config.batch_size.max(1);
    // (path, content id, outcome or error) per image of the batch, in order.
    let mut answers: Vec<(&PathBuf, Option<String>, Result<Outcome, String>)> = Vec::new();
    let mut batch: Vec<Prepared> = Vec::new();
    let mut slots = Vec::new();
    let mut inputs = 0;
    for (index, path) in images.iter().enumerate() {
        match read_image(path) {
            Err(e) => answers.push((path, None, Err(e))),
            Ok(file) => match predictor.prepare_identified(&file.bytes, &file.sha256, path) {
                Err(e) => answers.push((path, Some(file.id), Err(e.to_string()))),
                Ok(prepared) => {
                    slots.push(answers.len());
                    answers.push((path, Some(file.id), Err(String::new())));
                    inputs += prepared.encoder_inputs();
                    batch.push(prepared);
                }
            },
        }
        if answers.len() < limit && inputs < limit && index + 1 < images.len() {
            continue;
        }
        for (slot, outcome) in slots
            .drain(..)
            .zip(predictor.predict(std::mem::take(&mut batch))?)
        {
            answers[slot].2 = outcome;
        }
        inputs = 0;
        for (path, image_id, outcome) in answers.drain(..) {
            let answer = Answer {
                path,
                image_id,
                outcome,
            };
            match (&mut predictions, predictor.model()) {
                (
                    RunPredictions::Classify(out),
                    model @ (Model::Classify(_) | Model::FineTuned(_)),
                ) => {
                    let head = model.classifier().expect("a classifier");
                    out.push(classified(head, answer, config.top_k))
                }
                (RunPredictions::Anomaly(out), Model::Anomaly(scorer)) => out
                    .images
                    .push(anomaly::scored(predictor, scorer, answer, out_dir)?),
                (RunPredictions::Segment(out), Model::Segment(trained)) => {
                    out.push(segment::segmented(predictor, trained, answer, out_dir)?)
                }
                _ => unreachable!("predictions are of the model's task"),
            }
        }
    }
    Ok(predictions)
}

/// One image's answer from the per-image loop, before a task words it.
pub(crate) struct Answer<'a> {
    pub path: &'a Path,
    pub image_id: Option<String>,
    pub outcome: Result<Outcome, String>,
}

/// A classifier's answer: the top classes.
fn classified(head: &TrainedHead, answer: Answer, top_k: usize) -> Prediction {
    let mut prediction = Prediction {
        path: answer.path.to_path_buf(),
        image_id: answer.image_id,
        features_from: None,
        top: Vec::new(),
        error: None,
    };
    match answer.outcome {
        Err(error) => prediction.error = Some(error),
        Ok(Outcome {
            features_from,
            result: RawResult::Classes(probabilities),
            ..
        }) => {
            prediction.top = head.top_k(&probabilities, top_k);
            prediction.features_from = Some(features_from);
        }
        Ok(_) => prediction.error = Some("a result of another task".into()),
    }
    prediction
}

/// The file name stem pictures of `path` are written under.
pub(crate) fn picture_stem(path: &Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "image".into())
}

/// The paths of a registered dataset's images, in manifest order.
pub fn dataset_images(layout: &Layout, name: &str) -> Result<Vec<PathBuf>, PredictError> {
    Ok(crate::dataset::load(layout, name)?
        .images
        .into_iter()
        .map(|r| r.path)
        .collect())
}

/// The columns of a classifier's CSV: one row per image and rank.
const CSV_HEADER: &str = "path,image_id,features_from,rank,class,probability,error";

/// Writes predictions as CSV (`path,image_id,features_from,rank,class,probability,error`).
pub fn write_csv(predictions: &[Prediction], path: &Path) -> std::io::Result<()> {
    let mut rows = Vec::new();
    for p in predictions {
        let [file, id, from] = image_columns(&p.path, &p.image_id, p.features_from);
        let row = |rank: String, class: String, probability: String, error: String| {
            [
                file.clone(),
                id.clone(),
                from.clone(),
                rank,
                class,
                probability,
                error,
            ]
        };
        if let Some(error) = &p.error {
            rows.push(row(
                String::new(),
                String::new(),
                String::new(),
                error.clone(),
            ));
        }
        for (rank, (class, probability)) in p.top.iter().enumerate() {
            rows.push(row(
                (rank + 1).to_string(),
                class.clone(),
                format!("{probability:.6}"),
                String::new(),
            ));
        }
    }
    write_table(path, CSV_HEADER, rows)
}

/// The columns every task's CSV starts with: the image's path, its content
/// id and where its features came from (empty when unknown).
fn image_columns(
    path: &Path,
    image_id: &Option<String>,
    features_from: Option<&str>,
) -> [String; 3] {
    [
        path.display().to_string(),
        image_id.clone().unwrap_or_default(),
        features_from.unwrap_or("").to_string(),
    ]
}

/// A path column: the path, or empty.
fn path_column(path: &Option<PathBuf>) -> String {
    path.as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_default()
}

/// Writes `header` (column names, comma-separated) and `rows` as one CSV
/// file (through `atomic::write_file`).
fn write_table<const N: usize>(
    path: &Path,
    header: &str,
    rows: impl IntoIterator<Item = [String; N]>,
) -> std::io::Result<()> {
    let mut writer = csv::Writer::from_writer(Vec::new());
    writer.write_record(header.split(','))?;
    for row in rows {
        writer.write_record(row)?;
    }
    let bytes = writer.into_inner().map_err(|e| e.into_error())?;
    crate::atomic::write_file(path, &bytes)
}

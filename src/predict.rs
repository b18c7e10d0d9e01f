//! `lazarus predict`: a trained run's head on new images. Images already in
//! the run's feature cache (same content id in its dataset) reuse their
//! cached features; the others go through the same encoder, weights and
//! preprocessing that made the cache. A bad image gets its own error and the
//! rest continue.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{D, Device, Tensor};
use serde::Serialize;

use crate::encoders::{self, WeightsSource};
use crate::features::{FeatureSet, feature_dir};
use crate::layout::Layout;
use crate::train::head::Head;
use crate::train::run::read_run_inputs;

#[derive(Debug, thiserror::Error)]
pub enum PredictError {
    #[error("run {run} not found: no folder {path}")]
    UnknownRun { run: String, path: PathBuf },
    #[error("run {run}: {message}")]
    Run { run: String, message: String },
    #[error("encoder for run {run}: {message}")]
    Encoder { run: String, message: String },
    #[error(transparent)]
    Train(#[from] crate::train::TrainError),
    #[error(transparent)]
    Features(#[from] crate::features::FeatureError),
    #[error(transparent)]
    Dataset(#[from] crate::dataset::DatasetError),
    #[error("tensor computation failed: {0}")]
    Tensor(#[from] candle_core::Error),
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
    /// "cache" when the run's cached features were reused, "encoder" otherwise.
    pub features_from: Option<&'static str>,
    /// (class, probability), most likely first.
    pub top: Vec<(String, f64)>,
    pub error: Option<String>,
}

/// A run's head with its standardisation, ready to score feature rows.
struct TrainedHead {
    head: Head,
    mean: Tensor,
    std: Tensor,
    class_names: Vec<String>,
}

impl TrainedHead {
    fn probabilities(&self, pooled: &Tensor) -> Result<Vec<Vec<f32>>, PredictError> {
        let x = pooled
            .to_dtype(candle_core::DType::F32)?
            .broadcast_sub(&self.mean)?
            .broadcast_div(&self.std)?;
        let logits = self.head.forward(&x, candle_core::DType::F32, None)?;
        Ok(candle_nn::ops::softmax(&logits, D::Minus1)?.to_vec2::<f32>()?)
    }
}

/// Predicts the classes of `images` with run `run_id`'s head.
pub fn predict(
    layout: &Layout,
    run_id: &str,
    images: &[PathBuf],
    config: &PredictConfig,
) -> Result<Vec<Prediction>, PredictError> {
    let run_dir = layout.experiments_dir().join("runs").join(run_id);
    if !run_dir.is_dir() {
        return Err(PredictError::UnknownRun {
            run: run_id.to_string(),
            path: run_dir,
        });
    }
    let run_error = |message: String| PredictError::Run {
        run: run_id.to_string(),
        message,
    };
    let head_path = run_dir.join("head.safetensors");
    if !head_path.is_file() {
        return Err(run_error(format!(
            "{} is missing: the run did not finish",
            head_path.display()
        )));
    }
    let inputs = read_run_inputs(&run_dir)?;
    let tensors = crate::train::checkpoint::load_tensors(&head_path, &config.device)?;
    let tensor = |name: &str| {
        tensors
            .get(name)
            .cloned()
            .ok_or_else(|| run_error(format!("{} has no tensor {name}", head_path.display())))
    };
    let (mean, std) = (tensor("input_mean")?, tensor("input_std")?);
    let head = Head::from_tensors(&inputs.config.head, &tensors, mean.dims1()?)?;
    if head.classes() != inputs.class_names.len() {
        return Err(run_error(format!(
            "head has {} outputs for {} classes",
            head.classes(),
            inputs.class_names.len()
        )));
    }
    let trained = TrainedHead {
        head,
        mean,
        std,
        class_names: inputs.class_names.clone(),
    };

    // Cached rows by image content id.
    let features = FeatureSet::open(&feature_dir(layout, &inputs.dataset, &inputs.fingerprint))?;
    let dataset = crate::dataset::load(layout, &inputs.dataset)?;
    let row_of_index: HashMap<usize, usize> = features
        .image_indices()
        .iter()
        .enumerate()
        .map(|(row, &index)| (index, row))
        .collect();
    let cached_row: HashMap<&str, usize> = dataset
        .images
        .iter()
        .filter_map(|r| row_of_index.get(&r.index).map(|&row| (r.id.as_str(), row)))
        .collect();

    let mut predictions: Vec<Prediction> = Vec::with_capacity(images.len());
    let mut to_encode: Vec<(usize, Vec<f32>)> = Vec::new();
    let metadata = features.metadata().clone();
    let spec = metadata
        .get("encoder")
        .map(|name| encoders::lookup(name))
        .transpose()
        .map_err(|e| PredictError::Encoder {
            run: run_id.to_string(),
            message: e.to_string(),
        })?;
    for path in images {
        let mut prediction = Prediction {
            path: path.clone(),
            image_id: None,
            features_from: None,
            top: Vec::new(),
            error: None,
        };
        match std::fs::read(path) {
            Err(e) => prediction.error = Some(format!("cannot read {}: {e}", path.display())),
            Ok(bytes) => {
                let id = crate::dataset::content_id(&bytes);
                if let Some(&row) = cached_row.get(id.as_str()) {
                    let pooled = Tensor::from_slice(
                        features.pooled(row),
                        (1, features.feature_dim()),
                        &config.device,
                    )?;
                    prediction.top =
                        top_k(&trained, &trained.probabilities(&pooled)?[0], config.top_k);
                    prediction.features_from = Some("cache");
                } else if let Some(spec) = &spec {
                    match crate::preprocess::preprocess_bytes(&bytes, path, &spec.preprocess) {
                        Ok(values) => to_encode.push((predictions.len(), values)),
                        Err(e) => prediction.error = Some(e.to_string()),
                    }
                } else {
                    prediction.error = Some(format!(
                        "not in the cache, and the features of run {run_id} do not name their encoder"
                    ));
                }
                prediction.image_id = Some(id);
            }
        }
        predictions.push(prediction);
    }

    if let (false, Some(spec)) = (to_encode.is_empty(), &spec) {
        let source = match metadata.get("weights").map(String::as_str) {
            Some(id) if id.starts_with("random:") => WeightsSource::Random {
                seed: id["random:".len()..]
                    .parse()
                    .map_err(|_| PredictError::Encoder {
                        run: run_id.to_string(),
                        message: format!("bad weights id {id}"),
                    })?,
            },
            _ => WeightsSource::Installed,
        };
        let encoder = encoders::load_encoder(spec, source, &config.device).map_err(|e| {
            PredictError::Encoder {
                run: run_id.to_string(),
                message: e.to_string(),
            }
        })?;
        if let (Some(sha256), Some(wanted)) = (
            encoder.weights_sha256(),
            metadata
                .get("weights")
                .and_then(|w| w.strip_prefix("sha256:")),
        ) && sha256 != wanted
        {
            return Err(PredictError::Encoder {
                run: run_id.to_string(),
                message: format!(
                    "the installed weights of {} (sha256 {sha256}) are not those that made the run's features ({wanted})",
                    spec.name
                ),
            });
        }
        let side = spec.preprocess.input_size as usize;
        for batch in to_encode.chunks(config.batch_size.max(1)) {
            let values: Vec<f32> = batch.iter().flat_map(|(_, v)| v.iter().copied()).collect();
            let images = Tensor::from_vec(values, (batch.len(), 3, side, side), &config.device)?;
            let pooled = encoder
                .forward_pooled(&images)
                .map_err(|e| PredictError::Encoder {
                    run: run_id.to_string(),
                    message: e.to_string(),
                })?;
            for ((slot, _), probabilities) in batch.iter().zip(trained.probabilities(&pooled)?) {
                predictions[*slot].top = top_k(&trained, &probabilities, config.top_k);
                predictions[*slot].features_from = Some("encoder");
            }
        }
    }
    Ok(predictions)
}

fn top_k(trained: &TrainedHead, probabilities: &[f32], k: usize) -> Vec<(String, f64)> {
    let mut order: Vec<usize> = (0..probabilities.len()).collect();
    order.sort_by(|&a, &b| {
        probabilities[b]
            .total_cmp(&probabilities[a])
            .then(a.cmp(&b))
    });
    order
        .into_iter()
        .take(k.max(1))
        .map(|c| (trained.class_names[c].clone(), probabilities[c] as f64))
        .collect()
}

/// The paths of a registered dataset's images, in manifest order.
pub fn dataset_images(layout: &Layout, name: &str) -> Result<Vec<PathBuf>, PredictError> {
    Ok(crate::dataset::load(layout, name)?
        .images
        .into_iter()
        .map(|r| r.path)
        .collect())
}

/// Writes predictions as CSV (`path,image_id,features_from,rank,class,probability,error`).
pub fn write_csv(predictions: &[Prediction], path: &Path) -> std::io::Result<()> {
    let mut writer = csv::Writer::from_writer(Vec::new());
    writer.write_record([
        "path",
        "image_id",
        "features_from",
        "rank",
        "class",
        "probability",
        "error",
    ])?;
    for p in predictions {
        let base = [
            p.path.display().to_string(),
            p.image_id.clone().unwrap_or_default(),
            p.features_from.unwrap_or("").to_string(),
        ];
        if let Some(error) = &p.error {
            writer.write_record(base.iter().cloned().chain([
                String::new(),
                String::new(),
                String::new(),
                error.clone(),
            ]))?;
        }
        for (rank, (class, probability)) in p.top.iter().enumerate() {
            writer.write_record(base.iter().cloned().chain([
                (rank + 1).to_string(),
                class.clone(),
                format!("{probability:.6}"),
                String::new(),
            ]))?;
        }
    }
    let bytes = writer.into_inner().map_err(|e| e.into_error())?;
    crate::atomic::write_file(path, &bytes)
}

//! `lazarus predict` on an anomaly run (`train --task anomaly`): each image
//! gets the run's anomaly score, and is called anomalous when the score is at
//! or above the validation split's best-F1 threshold. Features come as in
//! `predict.rs`: the run's cache where the image's content id is there, the
//! run's encoder (same weights sha256, same preprocessing) otherwise; a bad
//! image gets its own error and the rest continue.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::Tensor;
use serde::Serialize;

use crate::encoders::{self, WeightsSource};
use crate::features::{FeatureSet, feature_dir};
use crate::layout::Layout;
use crate::predict::{PredictConfig, PredictError};
use crate::train::anomaly::SavedScorer;
use crate::train::config::Task;
use crate::train::run::read_run_inputs;

/// One image's anomaly score, or why it has none.
#[derive(Debug, Clone, Serialize)]
pub struct AnomalyPrediction {
    pub path: PathBuf,
    pub image_id: Option<String>,
    /// "cache" when the run's cached features were reused, "encoder" otherwise.
    pub features_from: Option<&'static str>,
    pub score: Option<f64>,
    /// Score at or above the run's validation best-F1 threshold.
    pub anomalous: Option<bool>,
    pub error: Option<String>,
}

/// What `score_images` returns: the scores and the scorer that gave them.
#[derive(Debug, Clone, Serialize)]
pub struct AnomalyPredictions {
    pub run: String,
    pub scorer: String,
    pub threshold: f64,
    pub images: Vec<AnomalyPrediction>,
}

fn run_dir(layout: &Layout, run_id: &str) -> Result<PathBuf, PredictError> {
    let dir = layout.experiments_dir().join("runs").join(run_id);
    if !dir.is_dir() {
        return Err(PredictError::UnknownRun {
            run: run_id.to_string(),
            path: dir,
        });
    }
    Ok(dir)
}

/// Whether `run_id` is an anomaly run (its `config.json` says task anomaly).
pub fn is_anomaly_run(layout: &Layout, run_id: &str) -> Result<bool, PredictError> {
    let dir = run_dir(layout, run_id)?;
    Ok(read_run_inputs(&dir)?.config.task == Task::Anomaly)
}

/// Scores `images` with anomaly run `run_id`.
pub fn score_images(
    layout: &Layout,
    run_id: &str,
    images: &[PathBuf],
    config: &PredictConfig,
) -> Result<AnomalyPredictions, PredictError> {
    let dir = run_dir(layout, run_id)?;
    let inputs = read_run_inputs(&dir)?;
    let scorer = SavedScorer::load(&dir, &config.device)?;
    let encoder_error = |message: String| PredictError::Encoder {
        owner: run_id.to_string(),
        message,
    };

    let features = FeatureSet::open(&feature_dir(layout, &inputs.dataset, &inputs.fingerprint))?;
    if features.feature_dim() != scorer.feature_dim() {
        return Err(PredictError::Run {
            run: run_id.to_string(),
            message: format!(
                "the scorer expects {} features, the run's cache has {}",
                scorer.feature_dim(),
                features.feature_dim()
            ),
        });
    }
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
    let metadata = features.metadata().clone();
    let spec = metadata
        .get("encoder")
        .map(|name| encoders::lookup(name))
        .transpose()
        .map_err(|e| encoder_error(e.to_string()))?;

    let mut out: Vec<AnomalyPrediction> = Vec::with_capacity(images.len());
    // (slot, pooled row) of cached images; (slot, preprocessed pixels) of the others.
    let mut cached: Vec<(usize, Vec<f32>)> = Vec::new();
    let mut to_encode: Vec<(usize, Vec<f32>)> = Vec::new();
    for path in images {
        let mut prediction = AnomalyPrediction {
            path: path.clone(),
            image_id: None,
            features_from: None,
            score: None,
            anomalous: None,
            error: None,
        };
        match std::fs::read(path) {
            Err(e) => prediction.error = Some(format!("cannot read {}: {e}", path.display())),
            Ok(bytes) => {
                let id = crate::dataset::content_id(&bytes);
                if let Some(&row) = cached_row.get(id.as_str()) {
                    let values = features.pooled(row).iter().map(|v| v.to_f32()).collect();
                    cached.push((out.len(), values));
                    prediction.features_from = Some("cache");
                } else if let Some(spec) = &spec {
                    match crate::preprocess::preprocess_bytes(&bytes, path, &spec.preprocess) {
                        Ok(values) => to_encode.push((out.len(), values)),
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
        out.push(prediction);
    }

    let mut scored: Vec<(usize, Vec<f32>)> = cached;
    if let (false, Some(spec)) = (to_encode.is_empty(), &spec) {
        let source = match metadata.get("weights").map(String::as_str) {
            Some(id) if id.starts_with("random:") => WeightsSource::Random {
                seed: id["random:".len()..]
                    .parse()
                    .map_err(|_| encoder_error(format!("bad weights id {id}")))?,
            },
            _ => WeightsSource::Installed,
        };
        let encoder = encoders::load_encoder(spec, source, &config.device)
            .map_err(|e| encoder_error(e.to_string()))?;
        if let (Some(sha256), Some(wanted)) = (
            encoder.weights_sha256(),
            metadata
                .get("weights")
                .and_then(|w| w.strip_prefix("sha256:")),
        ) && sha256 != wanted
        {
            return Err(encoder_error(format!(
                "the installed weights of {} (sha256 {sha256}) are not those that made the run's features ({wanted})",
                spec.name
            )));
        }
        let side = spec.preprocess.input_size as usize;
        for batch in to_encode.chunks(config.batch_size.max(1)) {
            let values: Vec<f32> = batch.iter().flat_map(|(_, v)| v.iter().copied()).collect();
            let pixels = Tensor::from_vec(values, (batch.len(), 3, side, side), &config.device)?;
            let pooled = encoder
                .forward_pooled(&pixels)
                .map_err(|e| encoder_error(e.to_string()))?
                .to_dtype(candle_core::DType::F32)?
                .to_vec2::<f32>()?;
            for ((slot, _), row) in batch.iter().zip(pooled) {
                out[*slot].features_from = Some("encoder");
                scored.push((*slot, row));
            }
        }
    }
    let rows: Vec<f32> = scored.iter().flat_map(|(_, r)| r.iter().copied()).collect();
    let scores = scorer.scores(&rows, &config.device)?;
    for ((slot, _), score) in scored.iter().zip(scores) {
        out[*slot].score = Some(score);
        out[*slot].anomalous = Some(score >= scorer.threshold);
    }
    Ok(AnomalyPredictions {
        run: run_id.to_string(),
        scorer: scorer.description.clone(),
        threshold: scorer.threshold,
        images: out,
    })
}

/// Writes scores as CSV (`path,image_id,features_from,score,anomalous,error`).
pub fn write_csv(predictions: &[AnomalyPrediction], path: &Path) -> std::io::Result<()> {
    let mut writer = csv::Writer::from_writer(Vec::new());
    writer.write_record([
        "path",
        "image_id",
        "features_from",
        "score",
        "anomalous",
        "error",
    ])?;
    for p in predictions {
        writer.write_record([
            p.path.display().to_string(),
            p.image_id.clone().unwrap_or_default(),
            p.features_from.unwrap_or("").to_string(),
            p.score.map(|s| format!("{s:.6}")).unwrap_or_default(),
            p.anomalous
                .map(|a| (a as u8).to_string())
                .unwrap_or_default(),
            p.error.clone().unwrap_or_default(),
        ])?;
    }
    let bytes = writer.into_inner().map_err(|e| e.into_error())?;
    crate::atomic::write_file(path, &bytes)
}

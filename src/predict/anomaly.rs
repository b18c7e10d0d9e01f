//! `lazarus predict` on an anomaly run (`train --task anomaly`): each image
//! gets the run's anomaly score, and is called anomalous when the score is at
//! or above the validation split's best-F1 threshold. Features come as for
//! a classifier: the run's cache where the image's content id is there, the
//! run's encoder otherwise, with the weights (sha256 checked before they are
//! loaded) and preprocessing its features recorded; a bad image gets its
//! own error and the rest continue.

use std::path::{Path, PathBuf};

use candle_core::Tensor;
use serde::Serialize;

use super::{EncoderReference, PredictConfig, PredictError};
use crate::features::catalog::FeatureCache;
use crate::layout::Layout;
use crate::train::anomaly::SavedScorer;
use crate::train::anomaly::patch::{self, PatchScorer, ScoredImage};
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
    /// Patch-level runs: `STEM.heatmap.png` (8-bit patch scores over the
    /// run's heat range) and `STEM.overlay.png` in the output folder.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub heatmap: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub overlay: Option<PathBuf>,
    /// Patch-level runs: the heat map's hottest pixel, [x, y].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peak: Option<[usize; 2]>,
    pub error: Option<String>,
}

impl AnomalyPrediction {
    fn new(path: &Path) -> Self {
        AnomalyPrediction {
            path: path.to_path_buf(),
            image_id: None,
            features_from: None,
            score: None,
            anomalous: None,
            heatmap: None,
            overlay: None,
            peak: None,
            error: None,
        }
    }
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
    super::run_folder(layout, run_id)
}

/// Scores `images` with anomaly run `run_id`. A patch-level run also
/// writes each image's heat map and overlay into `heatmaps` (required for
/// those runs).
pub fn score_images(
    layout: &Layout,
    run_id: &str,
    images: &[PathBuf],
    config: &PredictConfig,
    heatmaps: Option<&Path>,
) -> Result<AnomalyPredictions, PredictError> {
    let dir = run_dir(layout, run_id)?;
    let inputs = read_run_inputs(&dir)?;
    let scorer = SavedScorer::load(&dir, &config.device)?;
    if let Some(patch) = scorer.patch() {
        let Some(out_dir) = heatmaps else {
            return Err(PredictError::Run {
                run: run_id.to_string(),
                message: "a patch-level anomaly run writes heat maps: give --out DIR".into(),
            });
        };
        let out = score_patches(layout, run_id, &inputs, patch, images, config, out_dir)?;
        return Ok(AnomalyPredictions {
            run: run_id.to_string(),
            scorer: scorer.description.clone(),
            threshold: scorer.threshold,
            images: out
                .into_iter()
                .map(|mut p| {
                    p.anomalous = p.score.map(|s| s >= scorer.threshold);
                    p
                })
                .collect(),
        });
    }
    let owner = format!("run {run_id}");
    let cache = FeatureCache::open(layout, &inputs.fingerprint)?;
    let features = cache.features();
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
    // The encoder, weights and preprocessing the run's features recorded;
    // the weights' sha256 is checked before they are loaded.
    let reference = EncoderReference::from_features(features, &inputs.fingerprint)?;

    let mut out: Vec<AnomalyPrediction> = Vec::with_capacity(images.len());
    // (slot, pooled row) of cached images; (slot, preprocessed pixels) of the others.
    let mut cached: Vec<(usize, Vec<f32>)> = Vec::new();
    let mut to_encode: Vec<(usize, Vec<f32>)> = Vec::new();
    for path in images {
        let mut prediction = AnomalyPrediction::new(path);
        match super::read_image(path) {
            Err(e) => prediction.error = Some(e),
            Ok(super::ImageFile { bytes, sha256, id }) => {
                if let Some(row) = cache.rows(&sha256).map(|rows| rows.start) {
                    let values = features.pooled(row).iter().map(|v| v.to_f32()).collect();
                    cached.push((out.len(), values));
                    prediction.features_from = Some("cache");
                } else if let Some(reference) = &reference {
                    match crate::preprocess::preprocess_bytes(&bytes, path, &reference.preprocess) {
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
    if let (false, Some(reference)) = (to_encode.is_empty(), &reference) {
        let encoder = reference.load(&config.device, &owner)?;
        let side = reference.preprocess.input_size as usize;
        for batch in to_encode.chunks(config.batch_size.max(1)) {
            let values: Vec<f32> = batch.iter().flat_map(|(_, v)| v.iter().copied()).collect();
            let pixels = Tensor::from_vec(values, (batch.len(), 3, side, side), &config.device)?;
            let pooled = encoder
                .forward_pooled(&pixels)
                .map_err(|e| PredictError::Encoder {
                    owner: owner.clone(),
                    message: e.to_string(),
                })?
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

/// Patch scores, heat maps and overlays of images with a patch-level run:
/// cached maps by content id, the run's encoder on the run's tiles
/// otherwise.
fn score_patches(
    layout: &Layout,
    run_id: &str,
    inputs: &crate::train::run::RunInputs,
    scorer: &PatchScorer,
    images: &[PathBuf],
    config: &PredictConfig,
    out_dir: &Path,
) -> Result<Vec<AnomalyPrediction>, PredictError> {
    let owner = format!("run {run_id}");
    let cache = FeatureCache::open(layout, &inputs.fingerprint)?;
    let features = cache.features();
    let reference = EncoderReference::from_features(features, &inputs.fingerprint)?;
    let mut encoder: Option<Box<dyn crate::encoders::Encoder>> = None;
    let tiling = scorer.info.tiling.unwrap_or_default();
    let plan = SavedScorer::plan();
    super::create_out_dir(run_id, out_dir)?;
    let mut out = Vec::with_capacity(images.len());
    for path in images {
        let mut prediction = AnomalyPrediction::new(path);
        let super::ImageFile { bytes, sha256, id } = match super::read_image(path) {
            Ok(image) => image,
            Err(e) => {
                prediction.error = Some(e);
                out.push(prediction);
                continue;
            }
        };
        let scored = match cache.rows(&sha256) {
            Some(tile_rows) => {
                let rows: Vec<usize> = tile_rows.collect();
                let values = scorer
                    .geometry()
                    .cached_rows(features, &rows, &config.device)?;
                let scores = scorer.patch_scores(values, &plan, &config.device)?;
                let positions = scorer.geometry().positions();
                let tiles = rows
                    .iter()
                    .zip(scores.chunks(positions))
                    .map(|(&row, grid)| (features.tile(row).unwrap_or([0; 4]), grid.to_vec()))
                    .collect();
                prediction.features_from = Some("cache");
                crate::preprocess::decode_rgb8(
                    &bytes,
                    path,
                    crate::preprocess::PreprocessConfig::DEFAULT_MAX_PIXELS,
                )
                .map(|image| (image, ScoredImage::new(tiles)))
                .map_err(|e| e.to_string())
            }
            None => match &reference {
                None => Err(format!(
                    "not in the cache, and the features of run {run_id} do not name their encoder"
                )),
                Some(reference) => {
                    if encoder.is_none() {
                        encoder = Some(reference.load(&config.device, &owner)?);
                    }
                    let encoder = encoder.as_deref().expect("loaded above");
                    prediction.features_from = Some("encoder");
                    match crate::spatial::tile::preprocess_tiles(
                        path,
                        &reference.preprocess,
                        &tiling,
                    ) {
                        Err(e) => Err(e.to_string()),
                        Ok((image, tiles)) => {
                            let scored = encode_and_score(scorer, encoder, tiles, config, &plan)?;
                            Ok((image, scored))
                        }
                    }
                }
            },
        };
        prediction.image_id = Some(id);
        match scored {
            Err(error) => {
                prediction.features_from = None;
                prediction.error = Some(error);
            }
            Ok((image, scored)) => {
                let (width, height) = image.dimensions();
                let heat = scorer.heat_map(&scored, width, height);
                let (gray, overlay) = patch::render(&image, &heat, scorer.info.heat_range);
                let stem = path
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_else(|| "image".into());
                let heatmap_path = out_dir.join(format!("{stem}.heatmap.png"));
                let overlay_path = out_dir.join(format!("{stem}.overlay.png"));
                for (file, picture) in [
                    (&heatmap_path, image::DynamicImage::ImageLuma8(gray)),
                    (&overlay_path, image::DynamicImage::ImageRgb8(overlay)),
                ] {
                    crate::spatial::render::write_png(file, &picture).map_err(|e| {
                        PredictError::Run {
                            run: run_id.to_string(),
                            message: e.to_string(),
                        }
                    })?;
                }
                let (x, y) = patch::peak(&heat, width as usize);
                prediction.peak = Some([x, y]);
                prediction.score = Some(scored.score);
                prediction.heatmap = Some(heatmap_path);
                prediction.overlay = Some(overlay_path);
            }
        }
        out.push(prediction);
    }
    Ok(out)
}

/// An image's tiles through the run's encoder, then the patch scorer.
fn encode_and_score(
    scorer: &PatchScorer,
    encoder: &dyn crate::encoders::Encoder,
    tiles: Vec<crate::spatial::tile::PreparedTile>,
    config: &PredictConfig,
    plan: &crate::train::anomaly::MemoryPlan,
) -> Result<ScoredImage, PredictError> {
    let size = encoder.spec().input_size as usize;
    let positions = scorer.geometry().positions();
    let mut scored = Vec::with_capacity(tiles.len());
    for group in tiles.chunks(config.batch_size.max(1)) {
        let flat: Vec<f32> = group.iter().flat_map(|(_, v)| v.iter().copied()).collect();
        let input = Tensor::from_vec(flat, (group.len(), 3, size, size), &config.device)?;
        let maps = crate::spatial::encode_maps(encoder, &input)?;
        let values = scorer.geometry().rows(&maps)?;
        let scores = scorer.patch_scores(values, plan, &config.device)?;
        for ((tile, _), grid) in group.iter().zip(scores.chunks(positions)) {
            scored.push((*tile, grid.to_vec()));
        }
    }
    Ok(ScoredImage::new(scored))
}

/// The columns of an anomaly run's CSV.
const CSV_HEADER: &str = "path,image_id,features_from,score,anomalous,error,heatmap,overlay";

/// Writes scores as CSV (`CSV_HEADER`; heatmap and overlay are filled only
/// for patch-level runs).
pub fn write_csv(predictions: &[AnomalyPrediction], path: &Path) -> std::io::Result<()> {
    let rows = predictions.iter().map(|p| {
        let [file, id, from] = super::image_columns(&p.path, &p.image_id, p.features_from);
        [
            file,
            id,
            from,
            p.score.map(|s| format!("{s:.6}")).unwrap_or_default(),
            p.anomalous
                .map(|a| (a as u8).to_string())
                .unwrap_or_default(),
            p.error.clone().unwrap_or_default(),
            super::path_column(&p.heatmap),
            super::path_column(&p.overlay),
        ]
    });
    super::write_table(path, CSV_HEADER, rows)
}

//! `lazarus predict` on an anomaly run (`train --task anomaly`) or bundle:
//! each image gets the run's anomaly score, and is called anomalous when the
//! score is at or above the validation split's best-F1 threshold. The scores
//! come from [`super::Predictor`] (cache by content id, else the encoder);
//! this module words them and writes patch-level heat maps and overlays.

use std::path::{Path, PathBuf};

use serde::Serialize;

use super::{Answer, Outcome, PredictError, Predictor, RawResult};
use crate::train::anomaly::SavedScorer;
use crate::train::anomaly::patch;

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

/// What an anomaly model predicted: the scores and the scorer that gave them.
#[derive(Debug, Clone, Serialize)]
pub struct AnomalyPredictions {
    pub run: String,
    pub scorer: String,
    pub threshold: f64,
    pub images: Vec<AnomalyPrediction>,
}

/// An anomaly model's answer: the score and the call at the threshold;
/// patch-level models also write the image's heat map and overlay into
/// `out_dir` and give the heat map's peak.
pub(crate) fn scored(
    predictor: &Predictor,
    scorer: &SavedScorer,
    answer: Answer,
    out_dir: Option<&Path>,
) -> Result<AnomalyPrediction, PredictError> {
    let mut prediction = AnomalyPrediction::new(answer.path);
    prediction.image_id = answer.image_id;
    let (features_from, score, grids) = match answer.outcome {
        Err(error) => {
            prediction.error = Some(error);
            return Ok(prediction);
        }
        Ok(Outcome {
            features_from,
            result: RawResult::Score { score, patch },
            ..
        }) => (features_from, score, patch),
        Ok(_) => {
            prediction.error = Some("a result of another task".into());
            return Ok(prediction);
        }
    };
    prediction.features_from = Some(features_from);
    prediction.score = Some(score);
    prediction.anomalous = Some(score >= scorer.threshold);
    if let (Some(grids), Some(patch_scorer), Some(out_dir)) = (grids, scorer.patch(), out_dir) {
        let (image, scored) = *grids;
        let (width, height) = image.dimensions();
        let heat = patch_scorer.heat_map(&scored, width, height);
        let (gray, overlay) = patch::render(&image, &heat, patch_scorer.info.heat_range);
        let stem = super::picture_stem(answer.path);
        let heatmap_path = out_dir.join(format!("{stem}.heatmap.png"));
        let overlay_path = out_dir.join(format!("{stem}.overlay.png"));
        for (file, picture) in [
            (&heatmap_path, image::DynamicImage::ImageLuma8(gray)),
            (&overlay_path, image::DynamicImage::ImageRgb8(overlay)),
        ] {
            crate::spatial::render::write_png(file, &picture).map_err(|e| PredictError::Model {
                owner: predictor.owner().to_string(),
                message: e.to_string(),
            })?;
        }
        let (x, y) = patch::peak(&heat, width as usize);
        prediction.peak = Some([x, y]);
        prediction.heatmap = Some(heatmap_path);
        prediction.overlay = Some(overlay_path);
    }
    Ok(prediction)
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

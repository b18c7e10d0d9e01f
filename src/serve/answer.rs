//! The JSON the server answers with. Prediction keys mirror `lazarus predict
//! --json` (`image_id`, `features_from`, `top`, `score`, `anomalous`,
//! `peak`, `width`, `height`, `tiles`, `foreground_fraction`); the server
//! adds what an HTTP client needs: the request id, each image's index and
//! file name, all class probabilities, and pictures inline as base64 PNG.

use base64::Engine;
use serde::{Deserialize, Serialize};

use super::model::Rendered;

/// `POST /v1/models/{name}/predict`, 200.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PredictResponse {
    pub request_id: String,
    pub model: String,
    pub task: String,
    pub model_sha256: String,
    pub predictions: Vec<ImagePrediction>,
    /// From the request's arrival to its answer, in milliseconds.
    pub latency_ms: f64,
}

/// One image's answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImagePrediction {
    /// Position of the image in the request (0 for a raw body; parts of a
    /// multipart body in order).
    pub index: usize,
    /// A multipart part's file name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filename: Option<String>,
    /// sha256 of the image's bytes.
    pub image_id: String,
    /// "cache" when the run's cached features were reused, "encoder" otherwise.
    pub features_from: String,
    #[serde(flatten)]
    pub answer: Answer,
}

/// A task's answer; its keys say which task gave it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Answer {
    Classify {
        /// [class, probability], most likely first (`?top_k=`, default 5).
        top: Vec<(String, f64)>,
        /// Every class's probability.
        probabilities: std::collections::BTreeMap<String, f64>,
    },
    Anomaly {
        score: f64,
        /// The run's validation best-F1 threshold.
        threshold: f64,
        /// `score >= threshold`.
        anomalous: bool,
        /// Patch-level runs: the heat map's hottest pixel, [x, y].
        #[serde(default, skip_serializing_if = "Option::is_none")]
        peak: Option<[usize; 2]>,
        /// Patch-level runs with `?heatmap=true`: 8-bit gray PNG, base64.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        heatmap_png: Option<String>,
    },
    Segment {
        width: u32,
        height: u32,
        tiles: usize,
        /// Share of pixels not in class 0.
        foreground_fraction: f64,
        /// With `?mask=true`: the mask PNG (binary masks 0/255, else class
        /// index per pixel), base64.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        mask_png: Option<String>,
    },
}

impl From<Rendered> for Answer {
    fn from(rendered: Rendered) -> Self {
        let base64 = |bytes: Vec<u8>| base64::engine::general_purpose::STANDARD.encode(bytes);
        match rendered {
            Rendered::Classes { top, probabilities } => Answer::Classify {
                top,
                probabilities: probabilities.into_iter().collect(),
            },
            Rendered::Anomaly {
                score,
                threshold,
                anomalous,
                peak,
                heatmap_png,
            } => Answer::Anomaly {
                score,
                threshold,
                anomalous,
                peak,
                heatmap_png: heatmap_png.map(base64),
            },
            Rendered::Mask {
                width,
                height,
                tiles,
                foreground_fraction,
                mask_png,
            } => Answer::Segment {
                width,
                height,
                tiles,
                foreground_fraction,
                mask_png: mask_png.map(base64),
            },
        }
    }
}

impl Answer {
    /// The answer as the audit trail keeps it: pictures replaced by their
    /// sha256 (`heatmap_png_sha256`, `mask_png_sha256`), so records stay small.
    pub fn audit_json(&self) -> serde_json::Value {
        let mut value = serde_json::to_value(self).unwrap_or(serde_json::Value::Null);
        if let Some(object) = value.as_object_mut() {
            for key in ["heatmap_png", "mask_png"] {
                if let Some(serde_json::Value::String(text)) = object.remove(key) {
                    let bytes = base64::engine::general_purpose::STANDARD
                        .decode(text.as_bytes())
                        .unwrap_or_default();
                    object.insert(
                        format!("{key}_sha256"),
                        serde_json::Value::String(crate::digest::sha256_hex(&bytes)),
                    );
                }
            }
        }
        value
    }
}

/// Every error answer: its status, what went wrong, and the request it
/// belongs to.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorResponse {
    pub error: ErrorBody,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorBody {
    pub status: u16,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
}

//! The server's one adapter to the library's predictor: a run or a bundle
//! is opened once as a [`crate::predict::Predictor`] (the object `lazarus
//! predict` uses: content id, the cache by content id, the encoder with its
//! weights' sha256 checked and the preprocessing the features recorded, and
//! a batch whose answers do not depend on its other images); this file adds
//! only what HTTP needs: the model's description (`GET /v1/models/NAME`),
//! the server's pixel guard on the image header, refusals sorted by kind,
//! and answers put into words and PNG bytes. Everything else in `serve`
//! sees only [`LoadedModel`], [`Prepared`] and [`Outcome`].

use std::path::{Path, PathBuf};

use candle_core::Device;
use serde::Serialize;

use crate::bundle;
use crate::layout::Layout;
use crate::predict::{Model, Predictor, PrepareError};
pub use crate::predict::{Outcome, Prepared, RawResult};
use crate::preprocess::{PreprocessConfig, PreprocessError};
use crate::train::config::Task;

/// Where a served model comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// A run id recorded in the root's experiments database.
    Run(String),
    /// An exported bundle folder.
    Bundle(PathBuf),
}

impl std::fmt::Display for ModelSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ModelSource::Run(run) => write!(f, "run {run}"),
            ModelSource::Bundle(dir) => write!(f, "bundle {}", dir.display()),
        }
    }
}

/// Why a model could not be loaded (named by the caller).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct LoadError(pub String);

fn load_error(error: impl std::fmt::Display) -> LoadError {
    LoadError(error.to_string())
}

/// Why one image cannot be predicted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageProblem {
    /// The image has no bytes.
    Empty,
    /// The bytes are not a format lazarus decodes.
    UnknownFormat,
    /// More pixels than the server's guard allows (decompression bombs).
    TooManyPixels,
    /// A recognised format that does not decode (truncated, corrupt).
    Undecodable,
    /// Not in the cache, and the model cannot encode new images.
    NoEncoder,
    /// The image's cached rows are not what the model's features hold (a
    /// damaged cache): the server's fault, not the image's.
    DamagedCache,
}

/// One image's refusal, with a message that names it.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct ImageError {
    pub problem: ImageProblem,
    pub message: String,
}

impl From<PrepareError> for ImageError {
    fn from(error: PrepareError) -> Self {
        match error {
            PrepareError::Image(error) => error.into(),
            PrepareError::NoEncoder { .. } => ImageError {
                problem: ImageProblem::NoEncoder,
                message: error.to_string(),
            },
            PrepareError::Features(_) => ImageError {
                problem: ImageProblem::DamagedCache,
                message: error.to_string(),
            },
        }
    }
}

impl From<PreprocessError> for ImageError {
    fn from(error: PreprocessError) -> Self {
        let problem = match &error {
            PreprocessError::Empty { .. } => ImageProblem::Empty,
            PreprocessError::UnknownFormat { .. } => ImageProblem::UnknownFormat,
            PreprocessError::TooLarge { .. } => ImageProblem::TooManyPixels,
            PreprocessError::Read { .. } | PreprocessError::Decode { .. } => {
                ImageProblem::Undecodable
            }
        };
        ImageError {
            problem,
            message: error.to_string(),
        }
    }
}

/// What `GET /v1/models/{name}` says about a model.
#[derive(Debug, Clone, Serialize)]
pub struct ModelInfo {
    pub name: String,
    pub task: &'static str,
    /// `run ID` or `bundle DIR`.
    pub source: String,
    /// Class names in output order (classification and segmentation runs).
    pub classes: Vec<String>,
    pub encoder: Option<EncoderInfo>,
    /// The sha256 of the model's files: a bundle's `manifest.json` (which
    /// lists the sha256 of every other file), or for a run the lines
    /// `FILE SHA256` of the run files it was loaded from.
    pub model_sha256: String,
    /// The feature fingerprint whose cached rows are reused by content id.
    pub feature_cache: Option<String>,
    /// Anomaly runs: scores at or above it are called anomalous.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub threshold: Option<f64>,
    /// Anomaly runs: `knn k=5` and the like.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scorer: Option<String>,
    /// Anomaly runs: patch-level (heat maps on request).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub patch_level: Option<bool>,
    /// The run's model card (`model_card.json`), or null.
    pub model_card: serde_json::Value,
}

/// The encoder that makes a model's features.
#[derive(Debug, Clone, Serialize)]
pub struct EncoderInfo {
    pub name: String,
    /// `sha256:HEX` or `random:SEED`.
    pub weights: String,
    pub weights_sha256: Option<String>,
    pub input_size: u32,
    pub preprocess: PreprocessConfig,
}

impl EncoderInfo {
    fn of(name: &str, weights: &str, preprocess: &PreprocessConfig) -> Self {
        EncoderInfo {
            name: name.to_string(),
            weights: weights.to_string(),
            weights_sha256: weights.strip_prefix("sha256:").map(str::to_string),
            input_size: preprocess.input_size,
            preprocess: preprocess.clone(),
        }
    }
}

/// A model loaded once, shared by the request handlers (prepare, answer)
/// and its batch thread (predict).
pub struct LoadedModel {
    info: ModelInfo,
    predictor: Predictor,
}

/// What a model's answer holds besides its numbers, in a task's terms.
#[derive(Debug, Clone)]
pub enum Rendered {
    Classes {
        /// (class, probability), most likely first.
        top: Vec<(String, f64)>,
        /// (class, probability) in class order.
        probabilities: Vec<(String, f64)>,
    },
    Anomaly {
        score: f64,
        threshold: f64,
        anomalous: bool,
        /// Patch-level runs: the heat map's hottest pixel, [x, y].
        peak: Option<[usize; 2]>,
        /// Patch-level runs, on request: the 8-bit heat map as PNG.
        heatmap_png: Option<Vec<u8>>,
    },
    Mask {
        width: u32,
        height: u32,
        tiles: usize,
        foreground_fraction: f64,
        /// On request: the mask as PNG (binary masks 0/255, else class index).
        mask_png: Option<Vec<u8>>,
    },
}

/// What an answer should include.
#[derive(Debug, Clone, Copy)]
pub struct RenderOptions {
    pub top_k: usize,
    pub heatmap: bool,
    pub mask: bool,
}

impl LoadedModel {
    /// Loads `source` on `device`: the head or scorer, the feature cache a
    /// run's `predict` reads, and the encoder (with its weights' sha256
    /// checked) for images the cache lacks.
    pub fn load(
        layout: &Layout,
        name: &str,
        source: &ModelSource,
        device: &Device,
    ) -> Result<Self, LoadError> {
        let (predictor, model_sha256, model_card) = match source {
            ModelSource::Bundle(dir) => {
                let opened = bundle::open(dir, device).map_err(load_error)?;
                let manifest_path = dir.join(bundle::MANIFEST_FILE);
                let manifest = std::fs::read(&manifest_path)
                    .map_err(|e| load_error(format!("{}: {e}", manifest_path.display())))?;
                let model_card = read_json(&dir.join(bundle::MODEL_CARD_FILE));
                (
                    opened.predictor,
                    crate::digest::sha256_hex(&manifest),
                    model_card,
                )
            }
            ModelSource::Run(run) => {
                let predictor = Predictor::open_run(layout, run, device).map_err(load_error)?;
                let run_dir = crate::predict::run_folder(layout, run).map_err(load_error)?;
                let model_files: &[&str] = match predictor.task() {
                    Task::Classify | Task::Segment => &[bundle::HEAD_FILE],
                    Task::Anomaly => &[
                        bundle::SCORER_FILE,
                        crate::experiments::run_files::METRICS_FILE,
                    ],
                };
                let mut files = vec![crate::experiments::run_files::INPUTS_FILE];
                files.extend(model_files);
                let model_card =
                    read_json(&run_dir.join(crate::experiments::run_files::MODEL_CARD_FILE));
                (predictor, files_sha256(&run_dir, &files)?, model_card)
            }
        };
        // Loaded now rather than on the first request that needs it.
        if predictor.encoder_reference().is_some() {
            predictor.load_encoder().map_err(load_error)?;
        }
        let (threshold, scorer, patch_level) = match predictor.model() {
            Model::Anomaly(scorer) => (
                Some(scorer.threshold),
                Some(scorer.description.clone()),
                Some(scorer.patch().is_some()),
            ),
            Model::Classify(_) | Model::FineTuned(_) | Model::Segment(_) => (None, None, None),
        };
        let info = ModelInfo {
            name: name.to_string(),
            task: predictor.task().name(),
            source: predictor.owner().to_string(),
            classes: predictor.class_names().to_vec(),
            encoder: predictor.encoder_reference().map(|reference| {
                EncoderInfo::of(&reference.name, &reference.weights, &reference.preprocess)
            }),
            model_sha256,
            feature_cache: predictor
                .cache()
                .map(|_| predictor.fingerprint().to_string()),
            threshold,
            scorer,
            patch_level,
            model_card,
        };
        Ok(LoadedModel { info, predictor })
    }

    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    pub fn name(&self) -> &str {
        &self.info.name
    }

    pub fn task(&self) -> &'static str {
        self.info.task
    }

    /// The image's content id, its cached rows or its preprocessed input.
    /// `name` names the image in errors; `max_pixels` is the server's guard,
    /// checked on the header before anything is decoded.
    pub fn prepare(
        &self,
        bytes: &[u8],
        name: &str,
        max_pixels: u64,
    ) -> Result<Prepared, ImageError> {
        let path = Path::new(name);
        let (width, height) = crate::preprocess::probe_dimensions(bytes, path)?;
        let pixels = width as u64 * height as u64;
        if pixels > max_pixels {
            return Err(ImageError {
                problem: ImageProblem::TooManyPixels,
                message: format!(
                    "{name}: {width}x{height} = {pixels} pixels exceeds the server's limit of \
                     {max_pixels} pixels (decompression-bomb guard, --max-pixels)"
                ),
            });
        }
        self.predictor.prepare(bytes, path).map_err(|error| {
            let mut error = ImageError::from(error);
            if error.problem == ImageProblem::NoEncoder {
                error.message = format!("{name}: {}", error.message);
            }
            error
        })
    }

    /// Predicts a batch through the library's predictor: one encoder pass,
    /// then each image scored on its own. A failure of the encoder fails
    /// every image of the batch, a head's failure the image it concerns,
    /// with its message.
    pub fn predict(&self, batch: Vec<Prepared>) -> Vec<Result<Outcome, String>> {
        let count = batch.len();
        match self.predictor.predict(batch) {
            Ok(outcomes) => outcomes,
            Err(error) => {
                let message = error.to_string();
                (0..count).map(|_| Err(message.clone())).collect()
            }
        }
    }

    /// Puts an outcome into a task's terms: top classes, the call at the
    /// threshold and the heat map, the foreground share and the mask.
    pub fn render(&self, result: RawResult, options: &RenderOptions) -> Result<Rendered, String> {
        Ok(match (self.predictor.model(), result) {
            (
                model @ (Model::Classify(_) | Model::FineTuned(_)),
                RawResult::Classes(probabilities),
            ) => {
                let names = model.classifier().expect("a classifier").class_names();
                Rendered::Classes {
                    top: crate::predict::top_k(&probabilities, options.top_k)
                        .into_iter()
                        .map(|(class, p)| (names[class].clone(), p as f64))
                        .collect(),
                    probabilities: names
                        .iter()
                        .cloned()
                        .zip(probabilities.iter().map(|&p| p as f64))
                        .collect(),
                }
            }
            (Model::Anomaly(anomaly_scorer), RawResult::Score { score, patch }) => {
                let threshold = anomaly_scorer.threshold;
                let (peak, heatmap_png) = match (patch, anomaly_scorer.patch()) {
                    (Some(patch), Some(scorer)) => {
                        let (image, scored) = *patch;
                        let (width, height) = image.dimensions();
                        let heat = scorer.heat_map(&scored, width, height);
                        let (x, y) = crate::train::anomaly::patch::peak(&heat, width as usize);
                        let png = if options.heatmap {
                            let (gray, _) = crate::train::anomaly::patch::render(
                                &image,
                                &heat,
                                scorer.info.heat_range,
                            );
                            Some(
                                crate::train::anomaly::patch::png_bytes(
                                    &image::DynamicImage::ImageLuma8(gray),
                                )
                                .map_err(|e| e.to_string())?,
                            )
                        } else {
                            None
                        };
                        (Some([x, y]), png)
                    }
                    _ => (None, None),
                };
                Rendered::Anomaly {
                    score,
                    threshold,
                    anomalous: score >= threshold,
                    peak,
                    heatmap_png,
                }
            }
            (
                Model::Segment(trained),
                RawResult::Mask {
                    image,
                    tiles,
                    classes,
                },
            ) => {
                let (width, height) = image.dimensions();
                let foreground = classes.iter().filter(|&&c| c > 0).count();
                let mask_png = if options.mask {
                    // Binary masks as 0/255, as `predict` writes them.
                    let binary = trained.info.outputs == 1;
                    let mask = image::GrayImage::from_fn(width, height, |x, y| {
                        let class = classes[(y * width + x) as usize];
                        image::Luma([if binary && class > 0 { 255 } else { class }])
                    });
                    Some(
                        crate::train::anomaly::patch::png_bytes(&image::DynamicImage::ImageLuma8(
                            mask,
                        ))
                        .map_err(|e| e.to_string())?,
                    )
                } else {
                    None
                };
                Rendered::Mask {
                    width,
                    height,
                    tiles,
                    foreground_fraction: foreground as f64 / classes.len().max(1) as f64,
                    mask_png,
                }
            }
            _ => return Err(format!("{}: a result of another task", self.info.source)),
        })
    }
}

/// sha256 of the lines `FILE SHA256` of a run's model files.
fn files_sha256(dir: &Path, files: &[&str]) -> Result<String, LoadError> {
    let mut lines = String::new();
    for file in files {
        let path = dir.join(file);
        let bytes =
            std::fs::read(&path).map_err(|e| LoadError(format!("{}: {e}", path.display())))?;
        lines.push_str(&format!("{file} {}\n", crate::digest::sha256_hex(&bytes)));
    }
    Ok(crate::digest::sha256_hex(lines.as_bytes()))
}

/// A JSON file's value, or null when it is missing or unreadable.
fn read_json(path: &Path) -> serde_json::Value {
    std::fs::read(path)
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .unwrap_or(serde_json::Value::Null)
}

//! The server's one adapter to model code: load a run or a bundle once,
//! prepare an image from its bytes, predict a batch of prepared images of one
//! model. Everything else in `serve` sees only [`LoadedModel`], [`Prepared`]
//! and [`Outcome`]; when the library gets one predict entry point (issue 21),
//! this is the file that changes.
//!
//! An image goes through the steps `lazarus predict` takes: the sha256 of
//! its bytes, the run's cached features by content id where the cache has
//! them, the run's encoder (same weights sha256, same preprocessing)
//! otherwise. A batch shares one encoder pass: EfficientNet-Lite's CPU
//! kernels give an image the same bits in any batch. Heads and scorers then
//! score each image on its own rows (a matmul rounds differently with the
//! number of rows it multiplies), grouped as `predict` groups them: one
//! pooled row per image, an image's tiles in groups of [`TILE_GROUP`]. So an
//! answer never depends on the other images of its batch, and equals what
//! `lazarus predict` gives for the image alone.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use image::RgbImage;
use serde::Serialize;

use crate::bundle;
use crate::encoders::Encoder;
use crate::features::catalog::FeatureCache;
use crate::layout::Layout;
use crate::predict::{EncoderReference, TrainedHead};
use crate::preprocess::{PreprocessConfig, PreprocessError};
use crate::segment::model::TrainedSegmentHead;
use crate::spatial::tile::{PreparedTile, TileConfig};
use crate::train::anomaly::SavedScorer;
use crate::train::anomaly::patch::ScoredImage;
use crate::train::config::Task;

/// `lazarus predict`'s default `--batch-size`: tile-based runs score an
/// image's tiles in groups of this many, as `predict` does.
pub const TILE_GROUP: usize = 16;

/// Most encoder inputs (images or tiles) in one forward pass.
const ENCODER_CHUNK: usize = 64;

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
}

/// One image's refusal, with a message that names it.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct ImageError {
    pub problem: ImageProblem,
    pub message: String,
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
    device: Device,
    kind: Kind,
}

enum Kind {
    Classify(Box<Classifier>),
    Anomaly(Box<AnomalyModel>),
    Segment(Box<Segmenter>),
}

/// Where a pooled task's new images go: the encoder and its preprocessing.
struct PooledEncoder {
    encoder: Box<dyn Encoder>,
    preprocess: PreprocessConfig,
}

struct Classifier {
    head: TrainedHead,
    cache: Option<FeatureCache>,
    encoder: Option<PooledEncoder>,
    owner: String,
}

struct AnomalyModel {
    scorer: SavedScorer,
    cache: FeatureCache,
    /// Image-level runs: the encoder of the run's features.
    pooled: Option<PooledEncoder>,
    /// Patch-level runs: the run's encoder, spatial preprocessing and tiles.
    tiled: Option<TiledEncoder>,
    owner: String,
}

/// Where a tile-based task's new images go.
struct TiledEncoder {
    encoder: Box<dyn Encoder>,
    preprocess: PreprocessConfig,
    tiling: TileConfig,
}

struct Segmenter {
    trained: TrainedSegmentHead,
    cache: Option<FeatureCache>,
    tiles: TiledEncoder,
}

/// An image ready for its model's batch: its content id and its input.
pub struct Prepared {
    pub image_id: String,
    input: Input,
}

enum Input {
    /// A pooled task's cached row.
    CachedRow(usize),
    /// A pooled task's preprocessed pixels (CHW f32).
    Pixels(Vec<f32>),
    /// A tile-based task's cached tile rows, with the decoded image.
    CachedTiles { image: RgbImage, rows: Vec<usize> },
    /// A tile-based task's preprocessed tiles, with the decoded image.
    Tiles {
        image: RgbImage,
        tiles: Vec<PreparedTile>,
    },
}

impl Prepared {
    /// How many encoder inputs (images or tiles) the image needs.
    pub fn encoder_inputs(&self) -> usize {
        match &self.input {
            Input::Pixels(_) => 1,
            Input::Tiles { tiles, .. } => tiles.len(),
            Input::CachedRow(_) | Input::CachedTiles { .. } => 0,
        }
    }
}

/// One image's prediction before it is put into words.
pub struct Outcome {
    pub image_id: String,
    /// "cache" or "encoder", as `lazarus predict` says.
    pub features_from: &'static str,
    pub result: RawResult,
}

/// A prediction's numbers.
pub enum RawResult {
    /// Probabilities in class order.
    Classes(Vec<f32>),
    /// An anomaly score; patch-level runs add the image and its patch grids.
    Score {
        score: f64,
        patch: Option<Box<(RgbImage, ScoredImage)>>,
    },
    /// A segmentation: class per pixel, row-major.
    Mask {
        width: u32,
        height: u32,
        tiles: usize,
        classes: Vec<u8>,
    },
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
        match source {
            ModelSource::Bundle(dir) => load_bundle(name, dir, device),
            ModelSource::Run(run) => load_run(layout, name, run, device),
        }
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
        let sha256 = crate::digest::sha256(bytes);
        let image_id = hex::encode(sha256);
        let no_encoder = |owner: &str| ImageError {
            problem: ImageProblem::NoEncoder,
            message: format!(
                "{name}: not in the cache, and the features of {owner} do not name their encoder"
            ),
        };
        let pooled = |cache: Option<&FeatureCache>,
                      encoder: Option<&PooledEncoder>,
                      owner: &str|
         -> Result<Input, ImageError> {
            if let Some(rows) = cache.and_then(|c| c.rows(&sha256)) {
                return Ok(Input::CachedRow(rows.start));
            }
            let encoder = encoder.ok_or_else(|| no_encoder(owner))?;
            let pixels = crate::preprocess::preprocess_bytes(bytes, path, &encoder.preprocess)?;
            Ok(Input::Pixels(pixels))
        };
        let tiled = |cache: Option<&FeatureCache>,
                     tiles: Option<&TiledEncoder>,
                     decode_limit: u64,
                     owner: &str|
         -> Result<Input, ImageError> {
            if let Some(rows) = cache.and_then(|c| c.rows(&sha256)) {
                let image = crate::preprocess::decode_rgb8(bytes, path, decode_limit)?;
                return Ok(Input::CachedTiles {
                    image,
                    rows: rows.collect(),
                });
            }
            let tiles = tiles.ok_or_else(|| no_encoder(owner))?;
            let (image, tiles) = crate::spatial::tile::preprocess_tile_bytes(
                bytes,
                path,
                &tiles.preprocess,
                &tiles.tiling,
            )?;
            Ok(Input::Tiles { image, tiles })
        };
        let input = match &self.kind {
            Kind::Classify(c) => pooled(c.cache.as_ref(), c.encoder.as_ref(), &c.owner)?,
            Kind::Anomaly(a) if a.scorer.patch().is_some() => tiled(
                Some(&a.cache),
                a.tiled.as_ref(),
                // `predict` decodes cached images of patch runs with the default guard.
                PreprocessConfig::DEFAULT_MAX_PIXELS,
                &a.owner,
            )?,
            Kind::Anomaly(a) => pooled(Some(&a.cache), a.pooled.as_ref(), &a.owner)?,
            Kind::Segment(s) => tiled(
                s.cache.as_ref(),
                Some(&s.tiles),
                s.tiles.preprocess.max_pixels,
                &self.info.source,
            )?,
        };
        Ok(Prepared { image_id, input })
    }

    /// Predicts a batch: one encoder pass over every image (or tile) the
    /// cache lacks, then each image scored on its own. A failure of the
    /// encoder or a head fails the images it concerns, with its message.
    pub fn predict(&self, batch: Vec<Prepared>) -> Vec<Result<Outcome, String>> {
        let encoded = match self.encode(&batch) {
            Ok(encoded) => encoded,
            Err(message) => return batch.iter().map(|_| Err(message.clone())).collect(),
        };
        let mut next_row = 0;
        batch
            .into_iter()
            .map(|prepared| {
                let count = prepared.encoder_inputs();
                let rows = next_row..next_row + count;
                next_row += count;
                self.score(prepared, encoded.as_ref(), rows)
                    .map_err(|e| e.to_string())
            })
            .collect()
    }

    /// The encoder's output for the batch's encoder inputs, in order: pooled
    /// features [n, dim] or feature maps (one [n, c, h, w] per level).
    fn encode(&self, batch: &[Prepared]) -> Result<Option<Encoded>, String> {
        let total: usize = batch.iter().map(Prepared::encoder_inputs).sum();
        if total == 0 {
            return Ok(None);
        }
        let (encoder, side, maps) = match &self.kind {
            Kind::Classify(c) => {
                let e = c.encoder.as_ref().expect("prepare checked the encoder");
                (e.encoder.as_ref(), e.preprocess.input_size, false)
            }
            Kind::Anomaly(a) => match (&a.pooled, &a.tiled) {
                (Some(e), _) => (e.encoder.as_ref(), e.preprocess.input_size, false),
                (None, Some(t)) => (t.encoder.as_ref(), t.preprocess.input_size, true),
                (None, None) => unreachable!("prepare checked the encoder"),
            },
            Kind::Segment(s) => (
                s.tiles.encoder.as_ref(),
                s.tiles.preprocess.input_size,
                true,
            ),
        };
        let side = side as usize;
        let mut values = Vec::with_capacity(total * 3 * side * side);
        for prepared in batch {
            match &prepared.input {
                Input::Pixels(pixels) => values.extend_from_slice(pixels),
                Input::Tiles { tiles, .. } => {
                    for (_, pixels) in tiles {
                        values.extend_from_slice(pixels);
                    }
                }
                Input::CachedRow(_) | Input::CachedTiles { .. } => {}
            }
        }
        // At most ENCODER_CHUNK inputs per forward pass (a batch of large
        // images can hold hundreds of tiles); the kernels give each input
        // the same bits in any pass, so chunks change no answer.
        let per_input = 3 * side * side;
        let encoder_error =
            |e: &dyn std::fmt::Display| format!("{}: encoder: {e}", self.info.source);
        let mut pooled_parts = Vec::new();
        let mut map_parts: Vec<Vec<Tensor>> = Vec::new();
        for chunk in values.chunks(ENCODER_CHUNK * per_input) {
            let n = chunk.len() / per_input;
            let input = Tensor::from_slice(chunk, (n, 3, side, side), &self.device)
                .map_err(|e| encoder_error(&e))?;
            if maps {
                let levels =
                    crate::spatial::encode_maps(encoder, &input).map_err(|e| encoder_error(&e))?;
                map_parts.push(levels);
            } else {
                let pooled = encoder
                    .forward_pooled(&input)
                    .map_err(|e| encoder_error(&e))?;
                pooled_parts.push(pooled);
            }
        }
        if maps {
            let levels = map_parts.first().map_or(0, Vec::len);
            let joined = (0..levels)
                .map(|level| {
                    let parts: Vec<&Tensor> = map_parts.iter().map(|p| &p[level]).collect();
                    Tensor::cat(&parts, 0)
                })
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| encoder_error(&e))?;
            Ok(Some(Encoded::Maps(joined)))
        } else {
            let joined = Tensor::cat(&pooled_parts, 0).map_err(|e| encoder_error(&e))?;
            Ok(Some(Encoded::Pooled(joined)))
        }
    }

    /// One image's prediction from its cached rows or its rows of the batch's
    /// encoder output.
    fn score(
        &self,
        prepared: Prepared,
        encoded: Option<&Encoded>,
        rows: std::ops::Range<usize>,
    ) -> Result<Outcome, ScoreError> {
        let device = &self.device;
        let from_cache = matches!(
            prepared.input,
            Input::CachedRow(_) | Input::CachedTiles { .. }
        );
        let result = match (&self.kind, prepared.input) {
            (Kind::Classify(c), Input::CachedRow(row)) => {
                let cache = c.cache.as_ref().expect("a cached row has a cache");
                let probabilities = c.head.probabilities_of_rows(cache.features(), &[row])?;
                RawResult::Classes(probabilities.into_iter().next().unwrap_or_default())
            }
            (Kind::Classify(c), Input::Pixels(_)) => {
                let pooled = encoded.expect("encoded").pooled_rows(rows)?;
                let probabilities = c.head.probabilities(&pooled)?;
                RawResult::Classes(probabilities.into_iter().next().unwrap_or_default())
            }
            (Kind::Anomaly(a), Input::CachedRow(row)) => {
                let values: Vec<f32> = a
                    .cache
                    .features()
                    .pooled(row)
                    .iter()
                    .map(|v| v.to_f32())
                    .collect();
                RawResult::Score {
                    score: single(a.scorer.scores(&values, device)?)?,
                    patch: None,
                }
            }
            (Kind::Anomaly(a), Input::Pixels(_)) => {
                let values = encoded
                    .expect("encoded")
                    .pooled_rows(rows)?
                    .to_dtype(DType::F32)?
                    .flatten_all()?
                    .to_vec1::<f32>()?;
                RawResult::Score {
                    score: single(a.scorer.scores(&values, device)?)?,
                    patch: None,
                }
            }
            (Kind::Anomaly(a), Input::CachedTiles { image, rows }) => {
                let scorer = a.scorer.patch().expect("tiles only for patch runs");
                let features = a.cache.features();
                let values = scorer.geometry().cached_rows(features, &rows, device)?;
                let scores = scorer.patch_scores(values, &SavedScorer::plan(), device)?;
                let positions = scorer.geometry().positions();
                let tiles = rows
                    .iter()
                    .zip(scores.chunks(positions))
                    .map(|(&row, grid)| (features.tile(row).unwrap_or([0; 4]), grid.to_vec()))
                    .collect();
                let scored = ScoredImage::new(tiles);
                RawResult::Score {
                    score: scored.score,
                    patch: Some(Box::new((image, scored))),
                }
            }
            (Kind::Anomaly(a), Input::Tiles { image, tiles }) => {
                let scorer = a.scorer.patch().expect("tiles only for patch runs");
                let maps = encoded.expect("encoded").maps()?;
                let plan = SavedScorer::plan();
                let positions = scorer.geometry().positions();
                let mut scored = Vec::with_capacity(tiles.len());
                for (group, group_rows) in tile_groups(&tiles, rows) {
                    let values = scorer.geometry().rows(&narrow_maps(maps, group_rows)?)?;
                    let scores = scorer.patch_scores(values, &plan, device)?;
                    for ((tile, _), grid) in group.iter().zip(scores.chunks(positions)) {
                        scored.push((*tile, grid.to_vec()));
                    }
                }
                let scored = ScoredImage::new(scored);
                RawResult::Score {
                    score: scored.score,
                    patch: Some(Box::new((image, scored))),
                }
            }
            (Kind::Segment(s), Input::CachedTiles { image, rows }) => {
                let cache = s.cache.as_ref().expect("cached tiles have a cache");
                let logits =
                    crate::predict::segment::cached_logits(&s.trained, cache, &rows, device)?;
                segment_result(&s.trained, &image, &logits)
            }
            (Kind::Segment(s), Input::Tiles { image, tiles }) => {
                let maps = encoded.expect("encoded").maps()?;
                let mut logits = Vec::with_capacity(tiles.len());
                for (group, group_rows) in tile_groups(&tiles, rows) {
                    let grid = crate::segment::model::grid_logits(
                        &s.trained.geometry,
                        &s.trained.head,
                        &narrow_maps(maps, group_rows)?,
                        DType::F32,
                        None,
                    )?
                    .to_vec3::<f32>()?;
                    logits.extend(group.iter().map(|(tile, _)| *tile).zip(grid));
                }
                segment_result(&s.trained, &image, &logits)
            }
            _ => unreachable!("prepare makes inputs of the model's kind"),
        };
        Ok(Outcome {
            image_id: prepared.image_id,
            features_from: if from_cache { "cache" } else { "encoder" },
            result,
        })
    }

    /// Puts an outcome into a task's terms: top classes, the call at the
    /// threshold and the heat map, the foreground share and the mask.
    pub fn render(&self, result: RawResult, options: &RenderOptions) -> Result<Rendered, String> {
        Ok(match (&self.kind, result) {
            (Kind::Classify(c), RawResult::Classes(probabilities)) => {
                let names = c.head.class_names();
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
            (Kind::Anomaly(a), RawResult::Score { score, patch }) => {
                let threshold = a.scorer.threshold;
                let (peak, heatmap_png) = match (patch, a.scorer.patch()) {
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
                Kind::Segment(s),
                RawResult::Mask {
                    width,
                    height,
                    tiles,
                    classes,
                },
            ) => {
                let foreground = classes.iter().filter(|&&c| c > 0).count();
                let mask_png = if options.mask {
                    // Binary masks as 0/255, as `predict` writes them.
                    let binary = s.trained.info.outputs == 1;
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

/// The batch's encoder output.
enum Encoded {
    Pooled(Tensor),
    Maps(Vec<Tensor>),
}

impl Encoded {
    fn pooled_rows(&self, rows: std::ops::Range<usize>) -> Result<Tensor, candle_core::Error> {
        match self {
            Encoded::Pooled(pooled) => pooled.narrow(0, rows.start, rows.len()),
            Encoded::Maps(_) => Err(candle_core::Error::Msg(
                "pooled rows of feature maps".into(),
            )),
        }
    }

    fn maps(&self) -> Result<&[Tensor], candle_core::Error> {
        match self {
            Encoded::Maps(maps) => Ok(maps),
            Encoded::Pooled(_) => Err(candle_core::Error::Msg(
                "feature maps of pooled features".into(),
            )),
        }
    }
}

/// An image's tiles in groups of [`TILE_GROUP`], each with its rows of the
/// batch's maps.
fn tile_groups(
    tiles: &[PreparedTile],
    rows: std::ops::Range<usize>,
) -> impl Iterator<Item = (&[PreparedTile], std::ops::Range<usize>)> {
    tiles.chunks(TILE_GROUP).enumerate().map(move |(g, group)| {
        let start = rows.start + g * TILE_GROUP;
        (group, start..start + group.len())
    })
}

/// Rows `rows` of every level's maps.
fn narrow_maps(
    maps: &[Tensor],
    rows: std::ops::Range<usize>,
) -> Result<Vec<Tensor>, candle_core::Error> {
    maps.iter()
        .map(|level| level.narrow(0, rows.start, rows.len()))
        .collect()
}

fn single(scores: Vec<f64>) -> Result<f64, ScoreError> {
    match scores.as_slice() {
        [score] => Ok(*score),
        other => Err(ScoreError(format!(
            "the scorer gave {} scores for one image",
            other.len()
        ))),
    }
}

fn segment_result(
    trained: &TrainedSegmentHead,
    image: &RgbImage,
    logits: &crate::predict::segment::TileLogits,
) -> RawResult {
    let classes = crate::predict::segment::stitch(trained, image.width(), image.height(), logits);
    RawResult::Mask {
        width: image.width(),
        height: image.height(),
        tiles: logits.len(),
        classes,
    }
}

/// A failure while scoring one image, as text.
#[derive(Debug)]
struct ScoreError(String);

impl std::fmt::Display for ScoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

macro_rules! score_error_from {
    ($($error:ty),*) => {$(
        impl From<$error> for ScoreError {
            fn from(error: $error) -> Self {
                ScoreError(error.to_string())
            }
        }
    )*};
}
score_error_from!(
    candle_core::Error,
    crate::predict::PredictError,
    crate::train::TrainError,
    crate::segment::SegmentError
);

fn load_bundle(name: &str, dir: &Path, device: &Device) -> Result<LoadedModel, LoadError> {
    let owner = format!("bundle {}", dir.display());
    let opened = bundle::open(dir, device).map_err(load_error)?;
    let manifest = std::fs::read(dir.join(bundle::MANIFEST_FILE)).map_err(|e| {
        load_error(format!(
            "{}: {e}",
            dir.join(bundle::MANIFEST_FILE).display()
        ))
    })?;
    let model_card = read_json(&dir.join(bundle::MODEL_CARD_FILE));
    let reference = opened.encoder.clone();
    let encoder = reference.load(device, &owner).map_err(load_error)?;
    let info = ModelInfo {
        name: name.to_string(),
        task: Task::Classify.name(),
        source: owner.clone(),
        classes: opened.head.class_names().to_vec(),
        encoder: Some(EncoderInfo::of(
            &reference.name,
            &reference.weights,
            &reference.preprocess,
        )),
        model_sha256: crate::digest::sha256_hex(&manifest),
        feature_cache: None,
        threshold: None,
        scorer: None,
        patch_level: None,
        model_card,
    };
    Ok(LoadedModel {
        info,
        device: device.clone(),
        kind: Kind::Classify(Box::new(Classifier {
            head: opened.head,
            cache: None,
            encoder: Some(PooledEncoder {
                encoder,
                preprocess: reference.preprocess,
            }),
            owner,
        })),
    })
}

fn load_run(
    layout: &Layout,
    name: &str,
    run: &str,
    device: &Device,
) -> Result<LoadedModel, LoadError> {
    let owner = format!("run {run}");
    let run_dir = crate::predict::run_folder(layout, run).map_err(load_error)?;
    let inputs = crate::train::run::read_run_inputs(&run_dir).map_err(load_error)?;
    let model_card = read_json(&run_dir.join(crate::experiments::run_files::MODEL_CARD_FILE));
    let mut info = ModelInfo {
        name: name.to_string(),
        task: inputs.config.task.name(),
        source: owner.clone(),
        classes: inputs.class_names.clone(),
        encoder: None,
        model_sha256: String::new(),
        feature_cache: None,
        threshold: None,
        scorer: None,
        patch_level: None,
        model_card,
    };
    let (kind, model_files) = match inputs.config.task.kind() {
        Task::Classify => {
            let (head, _) =
                crate::predict::load_run_head(layout, run, device).map_err(load_error)?;
            let cache = FeatureCache::open(layout, &inputs.fingerprint).map_err(load_error)?;
            let reference = EncoderReference::from_features(cache.features(), &inputs.fingerprint)
                .map_err(load_error)?;
            let encoder = match &reference {
                Some(reference) => {
                    info.encoder = Some(EncoderInfo::of(
                        &reference.name,
                        &reference.weights,
                        &reference.preprocess,
                    ));
                    Some(PooledEncoder {
                        encoder: reference.load(device, &owner).map_err(load_error)?,
                        preprocess: reference.preprocess.clone(),
                    })
                }
                None => None,
            };
            info.feature_cache = Some(inputs.fingerprint.clone());
            let kind = Kind::Classify(Box::new(Classifier {
                head,
                cache: Some(cache),
                encoder,
                owner,
            }));
            (kind, vec!["head.safetensors"])
        }
        Task::Anomaly => {
            let scorer = SavedScorer::load(&run_dir, device).map_err(load_error)?;
            let cache = FeatureCache::open(layout, &inputs.fingerprint).map_err(load_error)?;
            info.feature_cache = Some(inputs.fingerprint.clone());
            info.threshold = Some(scorer.threshold);
            info.scorer = Some(scorer.description.clone());
            info.patch_level = Some(scorer.patch().is_some());
            info.classes = Vec::new();
            let (pooled, tiled) = match scorer.patch() {
                Some(patch_scorer) => {
                    let reference =
                        EncoderReference::from_features(cache.features(), &inputs.fingerprint)
                            .map_err(load_error)?;
                    let tiled = match reference {
                        Some(reference) => {
                            info.encoder = Some(EncoderInfo::of(
                                &reference.name,
                                &reference.weights,
                                &reference.preprocess,
                            ));
                            Some(TiledEncoder {
                                encoder: reference.load(device, &owner).map_err(load_error)?,
                                preprocess: reference.preprocess,
                                tiling: patch_scorer.info.tiling.unwrap_or_default(),
                            })
                        }
                        None => None,
                    };
                    (None, tiled)
                }
                None => {
                    if cache.features().feature_dim() != scorer.feature_dim() {
                        return Err(LoadError(format!(
                            "the scorer expects {} features, the run's cache has {}",
                            scorer.feature_dim(),
                            cache.features().feature_dim()
                        )));
                    }
                    let pooled =
                        anomaly_pooled_encoder(&cache, &inputs.fingerprint, device, &owner)?;
                    if let Some(encoder) = &pooled {
                        let weights = cache
                            .features()
                            .metadata()
                            .get("weights")
                            .cloned()
                            .unwrap_or_default();
                        info.encoder = Some(EncoderInfo::of(
                            encoder.encoder.spec().name,
                            &weights,
                            &encoder.preprocess,
                        ));
                    }
                    (pooled, None)
                }
            };
            let kind = Kind::Anomaly(Box::new(AnomalyModel {
                scorer,
                cache,
                pooled,
                tiled,
                owner,
            }));
            (
                kind,
                vec![
                    "scorer.safetensors",
                    crate::experiments::run_files::METRICS_FILE,
                ],
            )
        }
        Task::Segment => {
            let trained = crate::segment::model::load_head(&run_dir, &inputs.config, device)
                .map_err(load_error)?;
            let cache =
                FeatureCache::open_if_present(layout, &inputs.fingerprint).map_err(load_error)?;
            if cache.is_some() {
                info.feature_cache = Some(inputs.fingerprint.clone());
            }
            // The encoder, weights and tile preprocessing that made the run's
            // features, as `lazarus predict` finds them (sha256 checked
            // before the weights are read).
            let owner = format!("run {run}");
            let reference =
                crate::predict::segment::encoder_reference(&trained, cache.as_ref(), &owner)
                    .map_err(load_error)?;
            let preprocess = reference.preprocess.clone();
            info.encoder = Some(EncoderInfo::of(
                &reference.name,
                &reference.weights,
                &preprocess,
            ));
            let encoder = reference.load(device, &owner).map_err(load_error)?;
            let tiling = trained.info.tiling.unwrap_or_default();
            let kind = Kind::Segment(Box::new(Segmenter {
                trained,
                cache,
                tiles: TiledEncoder {
                    encoder,
                    preprocess,
                    tiling,
                },
            }));
            (kind, vec!["head.safetensors"])
        }
    };
    let mut files = vec![crate::train::run::RUN_INPUTS_FILE];
    files.extend(model_files);
    info.model_sha256 = files_sha256(&run_dir, &files)?;
    Ok(LoadedModel {
        info,
        device: device.clone(),
        kind,
    })
}

/// The encoder of an image-level anomaly run's features, as `predict`
/// loads it: the preprocessing the features recorded, seeded random weights
/// or the installed ones (sha256 checked before they are read).
fn anomaly_pooled_encoder(
    cache: &FeatureCache,
    fingerprint: &str,
    device: &Device,
    owner: &str,
) -> Result<Option<PooledEncoder>, LoadError> {
    let Some(reference) =
        EncoderReference::from_features(cache.features(), fingerprint).map_err(load_error)?
    else {
        return Ok(None);
    };
    let encoder = reference.load(device, owner).map_err(load_error)?;
    Ok(Some(PooledEncoder {
        encoder,
        preprocess: reference.preprocess,
    }))
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

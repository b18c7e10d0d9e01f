//! [`Predictor`]: a trained model of any task, loaded once, and the one
//! per-image path every caller takes (`lazarus predict` through
//! [`super::predict_files`], `predict --bundle`, `serve`).
//!
//! A predictor is opened from a run ([`Predictor::open_run`]) or built by
//! `bundle::open` from a bundle's files. An image is first prepared from
//! its bytes ([`Predictor::prepare`]: content id, the cached rows by content
//! id where the cache has them, else its preprocessed pixels or tiles with
//! the preprocessing the features recorded), then a batch of prepared
//! images is predicted ([`Predictor::predict`]). A batch shares one encoder
//! pass (the encoder's weights sha256 is checked before they are loaded,
//! through [`EncoderReference::load`]): EfficientNet-Lite's CPU kernels give
//! an image the same bits in any batch. Heads and scorers then score each
//! image on its own rows (a matmul rounds differently with the number of
//! rows it multiplies): one pooled row per image, an image's tiles in groups
//! of [`TILE_GROUP`]. So an answer never depends on the other images of its
//! batch: `serve` and `predict` give an image the same bits.

use std::path::Path;
use std::sync::OnceLock;

use candle_core::{DType, Device, Tensor};
use image::RgbImage;

use super::{EncoderReference, PredictError, TrainedHead};
use crate::encoders::{Encoder, ViewSet};
use crate::features::catalog::FeatureCache;
use crate::layout::Layout;
use crate::preprocess::{PreprocessConfig, PreprocessError};
use crate::segment::model::TrainedSegmentHead;
use crate::spatial::tile::{PreparedTile, TileConfig};
use crate::train::anomaly::SavedScorer;
use crate::train::anomaly::patch::ScoredImage;
use crate::train::blocks::{MapSize, append_channels_last};
use crate::train::config::{EvalViews, Task};
use crate::train::data::average_views;
use crate::train::finetune::{FineTunedBlocks, view_maps};

/// An image's tiles are scored in groups of this many (`predict`'s default
/// `--batch-size` before issue 21, which tile-based runs scored with).
pub const TILE_GROUP: usize = 16;

/// Most encoder inputs (images or tiles) in one forward pass.
const ENCODER_CHUNK: usize = 64;

/// What scores features: one model per task.
pub enum Model {
    /// A classification head with its standardisation.
    Classify(TrainedHead),
    /// A classifier whose encoder blocks after block K were trained with
    /// its head (`train --unfreeze-from K`): the blocks run on block K's
    /// map (stride 4, 8 or 16; cached, or from the encoder), then the head.
    FineTuned(Box<FineTunedModel>),
    /// An anomaly scorer, image-level or patch-level.
    Anomaly(SavedScorer),
    /// A segmentation head over the tiles' maps.
    Segment(TrainedSegmentHead),
}

/// A fine-tuned classifier: its trained blocks and its head.
pub struct FineTunedModel {
    pub head: TrainedHead,
    pub blocks: FineTunedBlocks,
}

impl Model {
    /// The classification head of a classifier, fine-tuned or not.
    pub fn classifier(&self) -> Option<&TrainedHead> {
        match self {
            Model::Classify(head) => Some(head),
            Model::FineTuned(model) => Some(&model.head),
            Model::Anomaly(_) | Model::Segment(_) => None,
        }
    }
}

/// What a predictor is built from (a run's files, or a bundle's).
pub struct PredictorParts {
    /// "run ID" or "bundle DIR", for messages.
    pub owner: String,
    /// The run that trained the model.
    pub run_id: String,
    /// The fingerprint of the features the model reads.
    pub fingerprint: String,
    pub device: Device,
    pub model: Model,
    /// Class names in output order (classification and segmentation).
    pub class_names: Vec<String>,
    /// Cached features of the model's fingerprint, reused by content id.
    pub cache: Option<FeatureCache>,
    /// The encoder that made the features; None when they do not name it
    /// (then only cached images can be predicted).
    pub encoder: Option<EncoderReference>,
    /// How an answer reads an image's views when the features hold several
    /// (`enqueue --views`): the mean over all of them, or view 0, as the
    /// run's evaluation did.
    pub eval_views: EvalViews,
}

/// A model loaded once, with its cache and (loaded on first need) its encoder.
pub struct Predictor {
    parts: PredictorParts,
    encoder: OnceLock<Box<dyn Encoder>>,
    /// The views per image the features hold, and how many of them (from
    /// view 0) an answer averages.
    views: ViewSet,
    views_used: usize,
}

/// Why an image cannot be prepared.
#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    #[error(transparent)]
    Image(#[from] PreprocessError),
    #[error("not in the cache, and the features of {owner} do not name their encoder")]
    NoEncoder { owner: String },
    #[error(transparent)]
    Features(#[from] crate::features::FeatureError),
}

/// An image ready for its model's batch: its content id and its input.
pub struct Prepared {
    pub image_id: String,
    input: Input,
}

enum Input {
    /// A pooled task's cached rows: the image's views an answer averages
    /// (one row in folders of one view).
    CachedRows(std::ops::Range<usize>),
    /// A pooled task's preprocessed pixels (CHW f32), one square per view
    /// an answer averages, in view order.
    Pixels { values: Vec<f32>, views: usize },
    /// A tile-based task's cached tile rows, with the decoded image where
    /// the answer draws on it (not for a fine-tuned classifier, whose
    /// cached map is all it reads).
    CachedTiles {
        image: Option<RgbImage>,
        rows: Vec<usize>,
    },
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
            Input::Pixels { views, .. } => *views,
            Input::Tiles { tiles, .. } => tiles.len(),
            Input::CachedRows(_) | Input::CachedTiles { .. } => 0,
        }
    }
}

/// One image's prediction before it is put into words.
pub struct Outcome {
    pub image_id: String,
    /// "cache" or "encoder".
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
    /// A segmentation: class per pixel, row-major, with the image.
    Mask {
        image: Box<RgbImage>,
        tiles: usize,
        classes: Vec<u8>,
    },
}

impl Predictor {
    pub fn new(parts: PredictorParts) -> Self {
        // The encoder reference names the features' views; a cache whose
        // shards name no encoder says them itself.
        let views = match (&parts.encoder, &parts.cache) {
            (Some(reference), _) => reference.views,
            (None, Some(cache)) => cache.features().views().unwrap_or_default(),
            (None, None) => ViewSet::Single,
        };
        Predictor {
            views_used: parts.eval_views.rows_used(views.count()),
            views,
            parts,
            encoder: OnceLock::new(),
        }
    }

    /// Opens run `run_id` by the task it recorded: its head or scorer, the
    /// feature cache of its fingerprint and the reference to the encoder
    /// that made it (the encoder itself is loaded when first needed, or by
    /// [`Predictor::load_encoder`]).
    pub fn open_run(layout: &Layout, run_id: &str, device: &Device) -> Result<Self, PredictError> {
        let run_dir = super::run_folder(layout, run_id)?;
        let inputs = crate::train::run::read_run_inputs(&run_dir)?;
        let owner = format!("run {run_id}");
        let run_error = |message: String| PredictError::Run {
            run: run_id.to_string(),
            message,
        };
        let (model, class_names, cache, encoder) = match inputs.config.task.kind() {
            Task::Classify if inputs.config.unfreeze.is_some() => {
                let folder = crate::experiments::run_files::RunFolder::new(&run_dir);
                let head = super::read_run_head(&run_dir, &inputs, device)
                    .map_err(|e| run_error(format!("{e} (the run did not finish?)")))?;
                let blocks = FineTunedBlocks::read(&folder.blocks())?;
                let cache = FeatureCache::open(layout, &inputs.fingerprint)?;
                let reference =
                    EncoderReference::from_features(cache.features(), &inputs.fingerprint)?;
                let names = head.class_names().to_vec();
                let model = FineTunedModel { head, blocks };
                model.check(&owner, reference.as_ref())?;
                (
                    Model::FineTuned(Box::new(model)),
                    names,
                    Some(cache),
                    reference,
                )
            }
            Task::Classify => {
                let (head, _) = super::load_run_head(layout, run_id, device)?;
                let cache = FeatureCache::open(layout, &inputs.fingerprint)?;
                let reference =
                    EncoderReference::from_features(cache.features(), &inputs.fingerprint)?;
                let names = head.class_names().to_vec();
                (Model::Classify(head), names, Some(cache), reference)
            }
            Task::Anomaly => {
                let scorer = SavedScorer::load(&run_dir, device)?;
                let cache = FeatureCache::open(layout, &inputs.fingerprint)?;
                let dim = cache.features().feature_dim();
                if scorer.patch().is_none() && dim != scorer.feature_dim() {
                    return Err(run_error(format!(
                        "the scorer expects {} features, the run's cache has {dim}",
                        scorer.feature_dim()
                    )));
                }
                let reference =
                    EncoderReference::from_features(cache.features(), &inputs.fingerprint)?;
                (Model::Anomaly(scorer), Vec::new(), Some(cache), reference)
            }
            Task::Segment => {
                let trained = crate::segment::model::load_head(&run_dir, &inputs.config, device)?;
                // Without its feature folder (removed to save space), every
                // image goes through the encoder.
                let cache = FeatureCache::open_if_present(layout, &inputs.fingerprint)
                    .map_err(|e| run_error(e.to_string()))?;
                let reference =
                    super::segment::encoder_reference(&trained, cache.as_ref(), &owner)?;
                let names = inputs.class_names.clone();
                (Model::Segment(trained), names, cache, Some(reference))
            }
        };
        Ok(Predictor::new(PredictorParts {
            owner,
            run_id: run_id.to_string(),
            fingerprint: inputs.fingerprint.clone(),
            device: device.clone(),
            model,
            class_names,
            cache,
            encoder,
            eval_views: inputs.config.eval_views,
        }))
    }

    /// The same predictor reading `cache` (or none) for cached features.
    pub fn with_cache(mut self, cache: Option<FeatureCache>) -> Self {
        self.parts.cache = cache;
        self
    }

    pub fn task(&self) -> Task {
        match &self.parts.model {
            Model::Classify(_) | Model::FineTuned(_) => Task::Classify,
            Model::Anomaly(_) => Task::Anomaly,
            Model::Segment(_) => Task::Segment,
        }
    }

    pub fn model(&self) -> &Model {
        &self.parts.model
    }

    /// "run ID" or "bundle DIR".
    pub fn owner(&self) -> &str {
        &self.parts.owner
    }

    /// The run that trained the model.
    pub fn run_id(&self) -> &str {
        &self.parts.run_id
    }

    /// The fingerprint of the features the model reads.
    pub fn fingerprint(&self) -> &str {
        &self.parts.fingerprint
    }

    pub fn device(&self) -> &Device {
        &self.parts.device
    }

    pub fn class_names(&self) -> &[String] {
        &self.parts.class_names
    }

    pub fn cache(&self) -> Option<&FeatureCache> {
        self.parts.cache.as_ref()
    }

    pub fn encoder_reference(&self) -> Option<&EncoderReference> {
        self.parts.encoder.as_ref()
    }

    /// Patch-level anomaly and segmentation models read tiles and answer
    /// with pictures (heat maps, masks).
    pub fn is_tiled(&self) -> bool {
        match &self.parts.model {
            Model::Classify(_) | Model::FineTuned(_) => false,
            Model::Anomaly(scorer) => scorer.patch().is_some(),
            Model::Segment(_) => true,
        }
    }

    /// Whether images reach the model as tiles' maps: tile-based models,
    /// and fine-tuned classifiers (one tile per image, whose map their
    /// blocks read).
    fn reads_maps(&self) -> bool {
        self.is_tiled() || matches!(self.parts.model, Model::FineTuned(_))
    }

    /// How tile-based models cut an image (the tiling their features used).
    fn tiling(&self) -> TileConfig {
        match &self.parts.model {
            Model::Anomaly(scorer) => scorer
                .patch()
                .and_then(|p| p.info.tiling)
                .unwrap_or_default(),
            Model::Segment(trained) => trained.info.tiling.unwrap_or_default(),
            Model::FineTuned(model) => model.blocks.info().tiling.unwrap_or_default(),
            Model::Classify(_) => TileConfig::default(),
        }
    }

    /// The encoder, loaded once (weights sha256 checked before loading).
    pub fn load_encoder(&self) -> Result<&dyn Encoder, PredictError> {
        if let Some(encoder) = self.encoder.get() {
            return Ok(encoder.as_ref());
        }
        let reference = self.parts.encoder.as_ref().ok_or_else(|| {
            let owner = self.parts.owner.clone();
            PredictError::Encoder {
                message: PrepareError::NoEncoder {
                    owner: owner.clone(),
                }
                .to_string(),
                owner,
            }
        })?;
        let loaded = reference.load(&self.parts.device, &self.parts.owner)?;
        // Another thread may have loaded it meanwhile: either copy serves.
        let _ = self.encoder.set(loaded);
        Ok(self.encoder.get().expect("set above").as_ref())
    }

    /// The image's content id, its cached rows or its preprocessed input.
    /// `path` names the image in errors.
    pub fn prepare(&self, bytes: &[u8], path: &Path) -> Result<Prepared, PrepareError> {
        self.prepare_identified(bytes, &crate::digest::sha256(bytes), path)
    }

    /// [`Predictor::prepare`] for bytes whose sha256 is known.
    pub fn prepare_identified(
        &self,
        bytes: &[u8],
        sha256: &[u8; 32],
        path: &Path,
    ) -> Result<Prepared, PrepareError> {
        let cached = self.parts.cache.as_ref().and_then(|c| c.rows(sha256));
        let reference = self.parts.encoder.as_ref();
        let no_encoder = || PrepareError::NoEncoder {
            owner: self.parts.owner.clone(),
        };
        let input = if !self.reads_maps() {
            match (cached, reference) {
                (Some(rows), _) => {
                    // The image's rows must be its views in order.
                    let features = self.parts.cache.as_ref().expect("cached").features();
                    features.check_view_rows(rows.start, self.views.count())?;
                    Input::CachedRows(rows.start..rows.start + self.views_used)
                }
                (None, Some(reference)) => {
                    let pixels =
                        crate::preprocess::preprocess_bytes(bytes, path, &reference.preprocess)?;
                    let side = reference.preprocess.input_size as usize;
                    let mut values = Vec::with_capacity(pixels.len() * self.views_used);
                    for view in 0..self.views_used {
                        if view == 0 {
                            values.extend_from_slice(&pixels);
                        } else {
                            values.extend(self.views.apply(view, &pixels, side));
                        }
                    }
                    Input::Pixels {
                        values,
                        views: self.views_used,
                    }
                }
                (None, None) => return Err(no_encoder()),
            }
        } else {
            match (cached, reference) {
                (Some(rows), _) => {
                    let decode_limit = match (&self.parts.model, reference) {
                        (Model::Segment(_), Some(reference)) => reference.preprocess.max_pixels,
                        // Patch runs decode cached images with the default guard.
                        _ => PreprocessConfig::DEFAULT_MAX_PIXELS,
                    };
                    let image = match self.parts.model {
                        Model::FineTuned(_) => None,
                        _ => Some(crate::preprocess::decode_rgb8(bytes, path, decode_limit)?),
                    };
                    Input::CachedTiles {
                        image,
                        rows: rows.collect(),
                    }
                }
                (None, Some(reference)) => {
                    let (image, tiles) = crate::spatial::tile::preprocess_tile_bytes(
                        bytes,
                        path,
                        &reference.preprocess,
                        &self.tiling(),
                    )?;
                    Input::Tiles { image, tiles }
                }
                (None, None) => return Err(no_encoder()),
            }
        };
        Ok(Prepared {
            image_id: hex::encode(sha256),
            input,
        })
    }

    /// Predicts a batch: one encoder pass over every image (or tile) the
    /// cache lacks, then each image scored on its own. The encoder failing
    /// to load or run fails the batch; a scoring failure fails its image.
    pub fn predict(
        &self,
        batch: Vec<Prepared>,
    ) -> Result<Vec<Result<Outcome, String>>, PredictError> {
        let encoded = self.encode(&batch)?;
        let mut next_row = 0;
        Ok(batch
            .into_iter()
            .map(|prepared| {
                let count = prepared.encoder_inputs();
                let rows = next_row..next_row + count;
                next_row += count;
                self.score(prepared, encoded.as_ref(), rows)
                    .map_err(|e| e.to_string())
            })
            .collect())
    }

    /// The encoder's output for the batch's encoder inputs, in order: pooled
    /// features [n, dim] or feature maps (one [n, c, h, w] per level).
    fn encode(&self, batch: &[Prepared]) -> Result<Option<Encoded>, PredictError> {
        let total: usize = batch.iter().map(Prepared::encoder_inputs).sum();
        if total == 0 {
            return Ok(None);
        }
        let encoder = self.load_encoder()?;
        let side = match &self.parts.encoder {
            Some(reference) => reference.preprocess.input_size as usize,
            None => encoder.spec().input_size as usize,
        };
        let maps = self.reads_maps();
        // The maps the model's features hold (a reference names them).
        let spatial_maps = self
            .parts
            .encoder
            .as_ref()
            .map(|reference| reference.maps.clone())
            .unwrap_or_default();
        let mut values = Vec::with_capacity(total * 3 * side * side);
        for prepared in batch {
            match &prepared.input {
                Input::Pixels { values: pixels, .. } => values.extend_from_slice(pixels),
                Input::Tiles { tiles, .. } => {
                    for (_, pixels) in tiles {
                        values.extend_from_slice(pixels);
                    }
                }
                Input::CachedRows(_) | Input::CachedTiles { .. } => {}
            }
        }
        // At most ENCODER_CHUNK inputs per forward pass (a batch of large
        // images can hold hundreds of tiles); the kernels give each input
        // the same bits in any pass, so chunks change no answer.
        let per_input = 3 * side * side;
        let encoder_error = |e: &dyn std::fmt::Display| PredictError::Encoder {
            owner: self.parts.owner.clone(),
            message: e.to_string(),
        };
        let mut pooled_parts = Vec::new();
        let mut map_parts: Vec<Vec<Tensor>> = Vec::new();
        for chunk in values.chunks(ENCODER_CHUNK * per_input) {
            let n = chunk.len() / per_input;
            let input = Tensor::from_slice(chunk, (n, 3, side, side), &self.parts.device)?;
            if maps {
                let levels = crate::spatial::encode_maps(encoder, &input, &spatial_maps)
                    .map_err(|e| encoder_error(&e))?;
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
                .collect::<Result<Vec<_>, _>>()?;
            Ok(Some(Encoded::Maps(joined)))
        } else {
            Ok(Some(Encoded::Pooled(Tensor::cat(&pooled_parts, 0)?)))
        }
    }

    /// One image's prediction from its cached rows or its rows of the batch's
    /// encoder output.
    fn score(
        &self,
        prepared: Prepared,
        encoded: Option<&Encoded>,
        rows: std::ops::Range<usize>,
    ) -> Result<Outcome, PredictError> {
        let device = &self.parts.device;
        let from_cache = matches!(
            prepared.input,
            Input::CachedRows(_) | Input::CachedTiles { .. }
        );
        let cache = || {
            self.parts
                .cache
                .as_ref()
                .expect("cached inputs come from the cache")
        };
        let encoded = || encoded.expect("encoder inputs were encoded");
        let result = match (&self.parts.model, prepared.input) {
            (Model::Classify(head), Input::CachedRows(rows)) => {
                let rows: Vec<usize> = rows.collect();
                let probabilities = head.probabilities_of_rows(cache().features(), &rows)?;
                RawResult::Classes(self.view_mean(&probabilities.concat(), head))
            }
            (Model::Classify(head), Input::Pixels { .. }) => {
                let probabilities = head.probabilities(&encoded().pooled_rows(rows)?)?;
                RawResult::Classes(self.view_mean(&probabilities.concat(), head))
            }
            (Model::Anomaly(scorer), Input::CachedRows(rows)) => {
                let features = cache().features();
                let values: Vec<f32> = rows
                    .flat_map(|row| features.pooled(row).iter().map(|v| v.to_f32()))
                    .collect();
                RawResult::Score {
                    score: self.single(scorer.scores(&values, device)?)?,
                    patch: None,
                }
            }
            (Model::Anomaly(scorer), Input::Pixels { .. }) => {
                let values = encoded()
                    .pooled_rows(rows)?
                    .to_dtype(DType::F32)?
                    .flatten_all()?
                    .to_vec1::<f32>()?;
                RawResult::Score {
                    score: self.single(scorer.scores(&values, device)?)?,
                    patch: None,
                }
            }
            (Model::Anomaly(scorer), Input::CachedTiles { image, rows }) => {
                let image = image.expect("patch runs decode cached images");
                let scorer = scorer.patch().expect("tiles only for patch runs");
                let features = cache().features();
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
            (Model::Anomaly(scorer), Input::Tiles { image, tiles }) => {
                let scorer = scorer.patch().expect("tiles only for patch runs");
                let maps = encoded().maps()?;
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
            (Model::Segment(trained), Input::CachedTiles { image, rows }) => {
                let image = image.expect("segmentation runs decode cached images");
                let logits = super::segment::cached_logits(trained, cache(), &rows, device)?;
                segment_result(trained, image, &logits)
            }
            (Model::Segment(trained), Input::Tiles { image, tiles }) => {
                let maps = encoded().maps()?;
                let mut logits = Vec::with_capacity(tiles.len());
                for (group, group_rows) in tile_groups(&tiles, rows) {
                    let grid = crate::segment::model::grid_logits(
                        &trained.geometry,
                        &trained.head,
                        &narrow_maps(maps, group_rows)?,
                        DType::F32,
                        None,
                    )?
                    .to_vec3::<f32>()?;
                    logits.extend(group.iter().map(|(tile, _)| *tile).zip(grid));
                }
                segment_result(trained, image, &logits)
            }
            (Model::FineTuned(model), Input::CachedTiles { rows, .. }) => {
                let row = self.single_tile(rows.len())?;
                let features = cache().features();
                let level = model.cached_level(features, &self.parts.owner)?;
                let shape = features.maps()[level];
                let size = MapSize {
                    height: shape.height,
                    width: shape.width,
                };
                let mut input = Vec::with_capacity(shape.channels * size.pixels());
                append_channels_last(
                    features.map(rows[row], level),
                    shape.channels,
                    size,
                    &mut input,
                );
                RawResult::Classes(model.probabilities(input, size, &self.parts.owner, device)?)
            }
            (Model::FineTuned(model), Input::Tiles { tiles, .. }) => {
                self.single_tile(tiles.len())?;
                let reference = self
                    .parts
                    .encoder
                    .as_ref()
                    .expect("tiles come from the encoder");
                let level = model.encoded_level(reference, &self.parts.owner)?;
                let map = encoded().maps()?[level].narrow(0, rows.start, 1)?;
                let (_, channels, height, width) = map.dims4()?;
                let values = map.flatten_all()?.to_vec1::<f32>()?;
                let size = MapSize { height, width };
                let mut input = Vec::with_capacity(values.len());
                append_channels_last(&values, channels, size, &mut input);
                RawResult::Classes(model.probabilities(input, size, &self.parts.owner, device)?)
            }
            _ => unreachable!("prepare makes inputs of the model's kind"),
        };
        Ok(Outcome {
            image_id: prepared.image_id,
            features_from: if from_cache { "cache" } else { "encoder" },
            result,
        })
    }

    /// A fine-tuned classifier reads one map per image: the image's only
    /// tile (0), or the refusal of an image larger than the tile size.
    fn single_tile(&self, tiles: usize) -> Result<usize, PredictError> {
        if tiles == 1 {
            return Ok(0);
        }
        Err(PredictError::Model {
            owner: self.parts.owner.clone(),
            message: format!(
                "the image is cut into {tiles} tiles; a fine-tuned classifier reads one map per \
                 image (images up to the tile size of {} pixels)",
                self.tiling().size
            ),
        })
    }

    /// An image's anomaly score from the scores of the views it was scored
    /// in: their mean, as the run's evaluation took it.
    fn single(&self, scores: Vec<f64>) -> Result<f64, PredictError> {
        if scores.len() != self.views_used {
            return Err(PredictError::Model {
                owner: self.parts.owner.clone(),
                message: format!(
                    "the scorer gave {} scores for one image of {} views",
                    scores.len(),
                    self.views_used
                ),
            });
        }
        Ok(average_views(&scores, 1, self.views_used, self.views_used)[0])
    }

    /// An image's class probabilities from those of the views it was
    /// scored in (`views_used` rows): their mean, as the run's evaluation
    /// took it.
    fn view_mean(&self, probabilities: &[f32], head: &TrainedHead) -> Vec<f32> {
        let classes = head.class_names().len();
        average_views(probabilities, classes, self.views_used, self.views_used)
            .into_iter()
            .map(|p| p as f32)
            .collect()
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

fn segment_result(
    trained: &TrainedSegmentHead,
    image: RgbImage,
    logits: &super::segment::TileLogits,
) -> RawResult {
    let classes = super::segment::stitch(trained, image.width(), image.height(), logits);
    RawResult::Mask {
        image: Box::new(image),
        tiles: logits.len(),
        classes,
    }
}

impl FineTunedModel {
    /// Checks that the blocks continue the encoder that made the features
    /// (`reference`): same encoder, same weights, block K's map kept.
    pub fn check(
        &self,
        owner: &str,
        reference: Option<&EncoderReference>,
    ) -> Result<(), PredictError> {
        let mismatch = |message: String| PredictError::Model {
            owner: owner.to_string(),
            message,
        };
        let info = self.blocks.info();
        if let Some(reference) = reference {
            if reference.name != info.encoder || reference.weights != info.weights {
                return Err(mismatch(format!(
                    "its blocks continue {} with weights {}, its features were made by {} with \
                     weights {}",
                    info.encoder, info.weights, reference.name, reference.weights
                )));
            }
            self.encoded_level(reference, owner)?;
            if reference.feature_dim != self.blocks.blocks().head_channels() {
                return Err(mismatch(format!(
                    "its blocks' head convolution gives {} channels, the encoder's pooled \
                     features are {}",
                    self.blocks.blocks().head_channels(),
                    reference.feature_dim
                )));
            }
        }
        if self.blocks.blocks().feature_dim() != self.head.input_dim() {
            return Err(mismatch(format!(
                "its blocks give {} features, its head reads {}",
                self.blocks.blocks().feature_dim(),
                self.head.input_dim()
            )));
        }
        Ok(())
    }

    /// Which of the encoder's maps (`reference.maps`, in order) the blocks read.
    fn encoded_level(
        &self,
        reference: &EncoderReference,
        owner: &str,
    ) -> Result<usize, PredictError> {
        let stride = self.blocks.info().stride;
        reference
            .maps
            .strides()
            .iter()
            .position(|&s| s == stride)
            .ok_or_else(|| PredictError::Model {
                owner: owner.to_string(),
                message: format!(
                    "its blocks read the stride-{stride} map; the features keep the maps {}",
                    reference.maps
                ),
            })
    }

    /// Which of a cached folder's maps the blocks read.
    fn cached_level(
        &self,
        features: &crate::features::FeatureSet,
        owner: &str,
    ) -> Result<usize, PredictError> {
        let stride = self.blocks.info().stride;
        features
            .maps()
            .iter()
            .position(|shape| shape.stride == stride)
            .ok_or_else(|| PredictError::Model {
                owner: owner.to_string(),
                message: format!(
                    "its blocks read the stride-{stride} map, which folder {} does not hold",
                    features.dir().display()
                ),
            })
    }

    /// Class probabilities of one image from its map (channels last,
    /// `size`): the mean over the blocks' views, as the run evaluated.
    fn probabilities(
        &self,
        input: Vec<f32>,
        size: MapSize,
        owner: &str,
        device: &Device,
    ) -> Result<Vec<f32>, PredictError> {
        let model_error = |message: String| PredictError::Model {
            owner: owner.to_string(),
            message,
        };
        let views = self.blocks.info().views;
        if !views.is_single() && size.height != size.width {
            return Err(model_error(format!(
                "it averages over the {views} views of its maps, which need squares; this \
                 image's map is {}x{}",
                size.height, size.width
            )));
        }
        // Every view in one pass of the blocks: a batch of `count` maps.
        let count = views.count();
        let channels = self.blocks.blocks().in_channels();
        let mut batch = Vec::with_capacity(input.len() * count);
        for view in 0..count {
            let start = batch.len();
            batch.extend_from_slice(&input);
            view_maps(views, view, &mut batch[start..], size, channels);
        }
        let pooled = self
            .blocks
            .pooled(batch, count, size)
            .map_err(|e| model_error(e.to_string()))?;
        let dim = pooled.len() / count;
        let pooled = Tensor::from_vec(pooled, (count, dim), device)?;
        let rows = self.head.probabilities(&pooled)?;
        let classes = rows[0].len();
        Ok(average_views(&rows.concat(), classes, count, count)
            .into_iter()
            .map(|p| p as f32)
            .collect())
    }
}

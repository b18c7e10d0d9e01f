//! `train --task segment`: a per-position head (1×1 convolution, or a small
//! MLP per position) over the encoder's feature maps. Coarser maps are
//! upsampled bilinearly to the finest map's grid and concatenated (Lite0:
//! stride 32 onto stride 16, 1280 + 112 channels); the head's logits are
//! upsampled bilinearly to the mask resolution and trained with BCE plus
//! soft Dice (binary masks) or cross-entropy plus soft Dice (index masks).
//!
//! The optimiser, schedule, early stopping and best-head bookkeeping are the
//! classification trainer's (`HeadTrainer`); only the loss differs. Masks are
//! read from the dataset once per run and resampled to the training
//! resolution per tile; they never enter the feature shards.
//!
//! Class weights (`--class-weights`) weight the BCE or cross-entropy term
//! per pixel by its true class (balanced: from the training targets' pixel
//! counts); the soft Dice term and the evaluation losses are unweighted.
//! `--sampler balanced` draws tiles with and without foreground equally
//! often. Checkpoints, `best.safetensors` and `--resume` are the
//! classification runs' (`train::checkpoint`, `train::record`): a
//! run resumed at an epoch boundary ends bit for bit as an uninterrupted one.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::Serialize;

use super::SegmentError;
use super::metrics::PixelConfusion;
use super::model::{HEAD_INFO_KEY, SegmentHeadInfo, grid_logits, loss, predicted_classes};
use crate::dataset::{self, MaskKind, Split};
use crate::experiments::run_files::{self, DICE_FILE, ImageDice, dice_csv};
use crate::experiments::{ExperimentsDb, ParamValue, RunHandle, RunStatus};
use crate::features::FeatureSet;
use crate::features::catalog::{self, FeatureKind, FeatureRequest};
use crate::layout::Layout;
use crate::spatial::grid::Geometry;
use crate::spatial::map_tensors;
use crate::spatial::mask::read_mask;
use crate::spatial::stitch::upsample_operator;
use crate::train::checkpoint;
use crate::train::config::{ClassWeights, Task, TaskConfig, TrainConfig};
use crate::train::data::SplitRows;
use crate::train::head::Head;
use crate::train::record;
use crate::train::run::{EpochStream, RunInputs, dropout_stream, seeded};
use crate::train::trainer::{BatchPlan, HeadTrainer};
use crate::train::warm::{self, WarmStart, WarmStartSummary, WarmTarget};

/// Finest grid cells per side are upsampled by this factor for the loss and
/// the metrics (Lite0: 14 × 8 = 112 pixels per tile side)...
const MASK_UPSAMPLING: usize = 8;
/// ...or by the largest whole factor that keeps the mask side within this
/// many pixels, at least 1: finer grids (`enqueue --maps 4,8`: 56 and 28
/// cells) get masks of 112 pixels, not 448 (the loss's dense upsampling
/// operator grows with the fourth power of the side). Grids of up to 16
/// cells, every grid before `--maps`, keep the factor 8.
const MASK_SIDE: usize = 128;

/// Pixels per side of the masks a grid of `side` cells is trained against.
fn mask_resolution(side: usize) -> usize {
    side * (MASK_SIDE / side.max(1)).clamp(1, MASK_UPSAMPLING)
}

/// What `train --task segment` is asked to do.
#[derive(Debug, Clone)]
pub struct SegmentRequest {
    pub dataset: String,
    pub encoder: String,
    /// The spatial feature folder; found by encoder when None.
    pub fingerprint: Option<String>,
    /// Only a folder of these maps (`train --maps`, canonical), when the
    /// fingerprint is not given.
    pub maps: Option<String>,
    /// Only a folder of tiles encoded at this square (`train --image-size`,
    /// `enqueue --spatial --image-size N`), when the fingerprint is not given.
    pub image_size: Option<u32>,
    pub experiment: String,
    pub config: TrainConfig,
    pub device: Device,
    /// One line per epoch on stderr.
    pub progress: bool,
    /// Extra params for experiments.db (a sweep's name).
    pub extra_params: Vec<(String, ParamValue)>,
    /// `--class-weights FILE`: read against the run's classes (`background`,
    /// `foreground` for binary masks; `0`, `1`, ... for index masks) once the
    /// masks are loaded, it replaces `config.class_weights`.
    pub class_weights_file: Option<PathBuf>,
    /// Train on the images that have features when some lack them.
    pub allow_partial: bool,
}

/// What a segmentation run did (also `metrics.json`).
#[derive(Debug, Clone, Serialize)]
pub struct SegmentReport {
    pub run_id: String,
    pub run_dir: PathBuf,
    pub task: &'static str,
    pub dataset: String,
    pub fingerprint: String,
    /// Rows (tiles) per split.
    pub split_rows: BTreeMap<&'static str, usize>,
    pub epochs_run: usize,
    /// Zero-based epoch of the kept head.
    pub best_epoch: usize,
    /// The epoch a resumed run started from (0 for a fresh run).
    pub resumed_from_epoch: usize,
    pub stopped_early: bool,
    /// Loss weight per class of the BCE / cross-entropy term, when weighted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub class_weights: Option<BTreeMap<String, f64>>,
    pub plan: BatchPlan,
    /// `--init-from RUN`: which layers of that segmentation run's head loaded.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warm_start: Option<WarmStartSummary>,
    /// Per epoch: `train/loss`, `val/loss`, `val/dice`, `val/iou`, `val/pixel_accuracy`, ...
    pub epochs: Vec<BTreeMap<String, f64>>,
    /// `test/loss`, `test/dice`, `test/iou`, `test/pixel_accuracy` of the kept head.
    pub test: BTreeMap<String, f64>,
}

/// The checked inputs of a run: feature rows per split and their masks.
struct SegmentData {
    features: FeatureSet,
    /// The manifest version the rows are joined to.
    dataset_version: u32,
    /// Listed images without features (with `allow_partial`).
    images_lacking: usize,
    fingerprint: String,
    encoder: String,
    info: SegmentHeadInfo,
    train: Vec<usize>,
    val: Vec<usize>,
    test: Vec<usize>,
    /// Per feature row: classes at `resolution` x `resolution`.
    targets: Vec<Vec<u8>>,
    mean: Vec<f32>,
    std: Vec<f32>,
}

/// (feature row, classes at the training resolution) of one image's tiles.
type TileTargets = Vec<(usize, Vec<u8>)>;

/// Which features a run reads: dataset, encoder and, when known, the folder.
struct DataSource<'a> {
    dataset: &'a str,
    /// The manifest version; `None` for the current one.
    version: Option<u32>,
    encoder: &'a str,
    fingerprint: Option<&'a str>,
    /// Only a folder of these maps (`train --maps`).
    maps: Option<&'a str>,
    /// Only a folder of this input square (`train --image-size`).
    image_size: Option<u32>,
    allow_partial: bool,
}

fn load_data(layout: &Layout, source: &DataSource<'_>) -> Result<SegmentData, SegmentError> {
    let dataset_name = source.dataset;
    let choice = catalog::PooledChoice {
        maps: source.maps.map(str::to_string),
        image_size: source.image_size,
        ..catalog::PooledChoice::default()
    };
    let opened = catalog::open(
        layout,
        &FeatureRequest {
            dataset: dataset_name,
            version: source.version,
            encoder: Some(source.encoder),
            kind: Some(FeatureKind::Spatial),
            fingerprint: source.fingerprint,
            pooled: (!choice.is_any()).then_some(&choice),
        },
    )
    .map_err(|e| match e {
        crate::features::FeatureError::NoFeatures(message) => SegmentError::NoFeatures(message),
        other => SegmentError::from(other),
    })?;
    if !opened.lacking.is_empty() && !source.allow_partial {
        return Err(SegmentError::Invalid(catalog::lacking_message(
            dataset_name,
            opened.info.version,
            &opened.fingerprint,
            opened.lacking_by_split(),
            opened.info.images,
        )));
    }
    let images_lacking = opened.lacking.len();
    let dataset_version = opened.info.version;
    let dataset = dataset::load_at(layout, dataset_name, Some(dataset_version))?;
    let fingerprint = opened.fingerprint;
    let features = opened.features;
    let dir = features.dir().to_path_buf();
    if features.maps().is_empty() {
        return Err(SegmentError::NoFeatures(format!(
            "{} holds pooled features only; segmentation needs `enqueue --spatial`",
            dir.display()
        )));
    }
    let encoder = features
        .metadata()
        .get("encoder")
        .cloned()
        .unwrap_or_default();
    if encoder != source.encoder {
        return Err(SegmentError::Invalid(format!(
            "features {fingerprint} were made by encoder {encoder}, not {}",
            source.encoder
        )));
    }
    let maps = features.maps().to_vec();
    let resolution = mask_resolution(maps[0].height.max(maps[0].width));

    // Masks: read each image's once, then resample each of its tiles.
    let mut rows_by_image: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for (row, &image) in features.image_indices().iter().enumerate() {
        rows_by_image.entry(image).or_default().push(row);
    }
    let kind = dataset.info.mask_kind;
    let per_image: Vec<Result<TileTargets, SegmentError>> = rows_by_image
        .par_iter()
        .map(|(&image, rows)| {
            let record = dataset.record(image).ok_or_else(|| {
                SegmentError::Invalid(format!(
                    "feature row for image {image} is outside dataset {dataset_name} ({} images)",
                    dataset.images.len()
                ))
            })?;
            let path = record.mask.as_ref().ok_or_else(|| SegmentError::Mask {
                path: record.path.clone(),
                message: format!("image has no mask in dataset {dataset_name}"),
            })?;
            let mask = read_mask(path, kind)?;
            if (mask.width, mask.height) != (record.width, record.height) {
                return Err(SegmentError::MaskSize {
                    mask: path.clone(),
                    mask_width: mask.width,
                    mask_height: mask.height,
                    image: record.path.clone(),
                    image_width: record.width,
                    image_height: record.height,
                });
            }
            Ok(rows
                .iter()
                .map(|&row| {
                    let tile = features
                        .tile(row)
                        .unwrap_or([0, 0, record.width, record.height]);
                    (row, mask.tile_resized(tile, resolution as u32))
                })
                .collect())
        })
        .collect();
    let mut targets = vec![Vec::new(); features.len()];
    for result in per_image {
        for (row, classes) in result? {
            targets[row] = classes;
        }
    }
    let outputs = match kind {
        MaskKind::Binary => 1,
        MaskKind::Index => {
            let largest = targets.iter().flatten().copied().max().unwrap_or(0) as usize;
            (largest + 1).max(2)
        }
    };

    let mut splits: [Vec<usize>; 3] = Default::default();
    for (row, &image) in features.image_indices().iter().enumerate() {
        let split = dataset
            .record(image)
            .map(|record| record.split)
            .expect("bound rows are listed images");
        let position = match split {
            Split::Train => 0,
            Split::Val => 1,
            Split::Test => 2,
        };
        splits[position].push(row);
    }
    let [train, val, test] = splits;
    for (name, rows) in [("train", &train), ("val", &val), ("test", &test)] {
        if rows.is_empty() {
            return Err(SegmentError::Invalid(format!(
                "split {name} of dataset {dataset_name} has no images with spatial features"
            )));
        }
    }

    // Per-channel standardisation over every position of the training rows.
    let channels: usize = maps.iter().map(|m| m.channels).sum();
    let mut sums = vec![0f64; channels];
    let mut squares = vec![0f64; channels];
    let mut counts = vec![0f64; channels];
    for &row in &train {
        let mut offset = 0;
        for (m, shape) in maps.iter().enumerate() {
            let plane = shape.height * shape.width;
            for (c, values) in features.map(row, m).chunks_exact(plane).enumerate() {
                for v in values {
                    let v = v.to_f64();
                    if !v.is_finite() {
                        return Err(SegmentError::Invalid(format!(
                            "feature row {row} (image {}) holds NaN or inf",
                            features.image_indices()[row]
                        )));
                    }
                    sums[offset + c] += v;
                    squares[offset + c] += v * v;
                }
                counts[offset + c] += plane as f64;
            }
            offset += shape.channels;
        }
    }
    let mean: Vec<f32> = sums
        .iter()
        .zip(&counts)
        .map(|(s, n)| (s / n) as f32)
        .collect();
    let std: Vec<f32> = (0..channels)
        .map(|c| {
            let variance = (squares[c] / counts[c] - (sums[c] / counts[c]).powi(2)).max(0.0);
            let std = variance.sqrt() as f32;
            if std > 1e-6 { std } else { 1.0 }
        })
        .collect();

    let tiling = features
        .metadata()
        .get("tiling")
        .and_then(|text| serde_json::from_str(text).ok());
    let weights = features.metadata().get("weights").cloned();
    Ok(SegmentData {
        info: SegmentHeadInfo {
            encoder: encoder.clone(),
            fingerprint: fingerprint.clone(),
            maps: crate::spatial::map_arrays(&maps),
            outputs,
            mask_kind: kind,
            resolution,
            tiling,
            weights,
        },
        features,
        dataset_version,
        images_lacking,
        fingerprint,
        encoder,
        train,
        val,
        test,
        targets,
        mean,
        std,
    })
}

/// Target tensor of rows: [n, pixels] of 0/1 for one output, one-hot
/// [n, outputs, pixels] otherwise.
fn target_tensor(
    data: &SegmentData,
    rows: &[usize],
    device: &Device,
) -> Result<Tensor, SegmentError> {
    let pixels = data.info.resolution * data.info.resolution;
    let outputs = data.info.outputs;
    if outputs == 1 {
        let values: Vec<f32> = rows
            .iter()
            .flat_map(|&r| data.targets[r].iter().map(|&c| c as f32))
            .collect();
        return Ok(Tensor::from_vec(values, (rows.len(), pixels), device)?);
    }
    let mut values = vec![0f32; rows.len() * outputs * pixels];
    for (i, &row) in rows.iter().enumerate() {
        for (pixel, &class) in data.targets[row].iter().enumerate() {
            values[(i * outputs + class as usize) * pixels + pixel] = 1.0;
        }
    }
    Ok(Tensor::from_vec(
        values,
        (rows.len(), outputs, pixels),
        device,
    )?)
}

/// Logits of rows at the mask resolution: [n, outputs, resolution²].
fn mask_logits(
    geometry: &Geometry,
    head: &Head,
    upsample: &Tensor,
    maps: &[Tensor],
    dtype: DType,
    dropout: Option<&mut ChaCha8Rng>,
) -> Result<Tensor, SegmentError> {
    let grid = grid_logits(geometry, head, maps, dtype, dropout)?;
    let (n, outputs, cells) = grid.dims3()?;
    let pixels = upsample.dim(1)?;
    Ok(grid
        .reshape((n * outputs, cells))?
        .matmul(upsample)?
        .reshape((n, outputs, pixels))?)
}

/// Loss and pixel metrics of a split with the head as it is.
/// What scoring a split needs besides the head.
struct Scoring<'a> {
    data: &'a SegmentData,
    geometry: &'a Geometry,
    upsample: &'a Tensor,
    micro_batch: usize,
    device: &'a Device,
}

/// `per_image`, when given, also collects each image's pixel confusion over
/// its tiles (image index -> tiles, confusion).
fn evaluate(
    scoring: &Scoring<'_>,
    head: &Head,
    rows: &[usize],
    split: &str,
    mut per_image: Option<&mut BTreeMap<usize, (usize, PixelConfusion)>>,
) -> Result<BTreeMap<String, f64>, SegmentError> {
    let Scoring {
        data,
        geometry,
        upsample,
        micro_batch,
        device,
    } = *scoring;
    let mut confusion = PixelConfusion::new(data.info.classes());
    let mut loss_sum = 0f64;
    for chunk in rows.chunks(micro_batch) {
        let maps = map_tensors(&data.features, chunk, device)?;
        let logits = mask_logits(geometry, head, upsample, &maps, DType::F32, None)?;
        let targets = target_tensor(data, chunk, device)?;
        // Unweighted, as classification's val/loss: the model's fit, not the objective.
        loss_sum += loss(&logits, &targets, None)?.to_scalar::<f32>()? as f64 * chunk.len() as f64;
        for (predicted, &row) in predicted_classes(&logits)?.iter().zip(chunk) {
            confusion.add(&data.targets[row], predicted);
            if let Some(images) = per_image.as_deref_mut() {
                let image = data.features.image_indices()[row];
                let (tiles, pixels) = images
                    .entry(image)
                    .or_insert_with(|| (0, PixelConfusion::new(data.info.classes())));
                *tiles += 1;
                pixels.add(&data.targets[row], predicted);
            }
        }
    }
    let mut metrics = confusion.metrics(split);
    metrics.insert(format!("{split}/loss"), loss_sum / rows.len() as f64);
    Ok(metrics)
}

/// Plans micro-batches for the budget: per example, the gathered maps, the
/// upsampled and standardised positions (three f32 copies with gradients)
/// and the logits at mask resolution with the loss's intermediates; fixed,
/// the head with its optimiser state, the grid-to-mask operator and the
/// operators that bring each coarser map onto the finest grid (stride 4:
/// 56² cells, 16 times stride 16's positions).
fn plan(
    data: &SegmentData,
    config: &TrainConfig,
    parameters: u64,
) -> Result<BatchPlan, SegmentError> {
    let info = &data.info;
    let cells = (info.maps[0][2] * info.maps[0][3]) as u64;
    let channels: u64 = info.maps.iter().map(|m| m[1] as u64).sum();
    let raw: u64 = info.maps.iter().map(|m| (m[1] * m[2] * m[3]) as u64).sum();
    let pixels = (info.resolution * info.resolution) as u64;
    let per_example = 4 * (raw + 3 * cells * channels + 8 * pixels * info.outputs as u64);
    let map_operators: u64 = info
        .maps
        .iter()
        .map(|m| (m[2] * m[3]) as u64)
        .filter(|&map_cells| map_cells != cells)
        .map(|map_cells| map_cells * cells)
        .sum();
    let fixed = parameters * 4 * 9 + 4 * cells * pixels + 4 * map_operators;
    let budget = config.memory_budget_bytes;
    let fits = budget.saturating_sub(fixed) / per_example;
    if fits == 0 {
        return Err(SegmentError::Invalid(format!(
            "memory budget of {budget} bytes cannot hold one tile: {fixed} bytes of head and \
             upsampling, {per_example} bytes per tile; raise --memory-budget"
        )));
    }
    let micro_batch = config.batch_size.min(fits as usize).max(1);
    Ok(BatchPlan {
        micro_batch,
        accumulation_steps: config.batch_size.div_ceil(micro_batch),
        fixed_bytes: fixed,
        per_example_bytes: per_example,
    })
}

/// The run's configuration as segmentation trains it: the task, `val/dice`
/// as the default monitor, and classification-only settings refused rather
/// than ignored.
fn segment_config(mut config: TrainConfig) -> Result<TrainConfig, SegmentError> {
    config.task = TaskConfig::Segment;
    if config.monitor == TrainConfig::default().monitor {
        config.monitor = "val/dice".into();
    }
    if config.label_smoothing != 0.0 {
        return Err(SegmentError::Invalid(format!(
            "label smoothing {} (--label-smoothing) applies to classification heads only",
            config.label_smoothing
        )));
    }
    config.validate()?;
    Ok(config)
}

/// The class names of a run's pixels: what class-weight files name.
fn class_names(info: &SegmentHeadInfo) -> Vec<String> {
    match info.mask_kind {
        MaskKind::Binary => vec!["background".into(), "foreground".into()],
        MaskKind::Index => (0..info.classes()).map(|c| c.to_string()).collect(),
    }
}

/// Loss weight per pixel class (None without class weighting): balanced
/// weights are n / (classes x n_class) over the training targets' pixels,
/// as classification's over its training rows.
fn pixel_class_weights(
    config: &TrainConfig,
    data: &SegmentData,
) -> Result<Option<Vec<f32>>, SegmentError> {
    if config.class_weights == ClassWeights::None {
        return Ok(None);
    }
    let mut counts = vec![0usize; data.info.classes()];
    for &row in &data.train {
        for &class in &data.targets[row] {
            counts[class as usize] += 1;
        }
    }
    Ok(Some(crate::train::trainer::class_weights(
        &config.class_weights,
        &counts,
    )?))
}

/// Per-pixel loss weights of a batch's tiles, scaled so that their mean
/// over the whole batch is 1: micro-batch losses, each weighted by its
/// share of the batch, then add up to the batch's weighted mean.
struct PixelWeights {
    classes: Vec<f32>,
    /// Per feature row: the sum of its pixels' weights.
    row_sums: Vec<f64>,
    pixels: usize,
}

impl PixelWeights {
    fn new(classes: Vec<f32>, data: &SegmentData) -> Self {
        let row_sums = data
            .targets
            .iter()
            .map(|t| t.iter().map(|&c| classes[c as usize] as f64).sum())
            .collect();
        PixelWeights {
            classes,
            row_sums,
            pixels: data.info.resolution * data.info.resolution,
        }
    }

    /// The batch's mean pixel weight (1 when every pixel weighs 0).
    fn batch_mean(&self, batch: &[usize]) -> f64 {
        let total: f64 = batch.iter().map(|&r| self.row_sums[r]).sum();
        let mean = total / (batch.len() * self.pixels) as f64;
        if mean > 0.0 { mean } else { 1.0 }
    }

    /// [rows, pixels] of each pixel's class weight over `batch_mean`.
    fn tensor(
        &self,
        data: &SegmentData,
        rows: &[usize],
        batch_mean: f64,
        device: &Device,
    ) -> Result<Tensor, SegmentError> {
        let values: Vec<f32> = rows
            .iter()
            .flat_map(|&r| {
                data.targets[r]
                    .iter()
                    .map(move |&c| (self.classes[c as usize] as f64 / batch_mean) as f32)
            })
            .collect();
        Ok(Tensor::from_vec(values, (rows.len(), self.pixels), device)?)
    }
}

/// The warm start `config.init_from` asks for: another segmentation run's
/// head, planned for this run's maps, classes and standardisation.
fn warm_start(
    layout: &Layout,
    dataset: &str,
    config: &TrainConfig,
    data: &SegmentData,
) -> Result<Option<WarmStart>, SegmentError> {
    let Some(source) = &config.init_from else {
        return Ok(None);
    };
    let class_names = class_names(&data.info);
    let target = WarmTarget {
        task: Task::Segment,
        dataset_name: dataset,
        feature_dim: data.mean.len(),
        encoder: Some(data.encoder.as_str()),
        class_names: &class_names,
        outputs: data.info.outputs,
        mean: &data.mean,
        std: &data.std,
    };
    Ok(Some(warm::plan_for(layout, source, config, &target)?))
}

/// Trains a segmentation head as a new run and records it in experiments.db.
pub fn train(layout: &Layout, request: &SegmentRequest) -> Result<SegmentReport, SegmentError> {
    let mut config = segment_config(request.config.clone())?;
    let data = load_data(
        layout,
        &DataSource {
            dataset: &request.dataset,
            version: None,
            encoder: &request.encoder,
            fingerprint: request.fingerprint.as_deref(),
            maps: request.maps.as_deref(),
            image_size: request.image_size,
            allow_partial: request.allow_partial,
        },
    )?;
    if let Some(file) = &request.class_weights_file {
        config.class_weights = ClassWeights::Given {
            weights: crate::train::config::read_class_weights(file, &class_names(&data.info))?,
        };
        config.validate()?;
    }
    let inputs = RunInputs {
        dataset: request.dataset.clone(),
        dataset_version: data.dataset_version,
        images_lacking: data.images_lacking,
        fingerprint: data.fingerprint.clone(),
        encoder: Some(data.encoder.clone()),
        class_names: class_names(&data.info),
        config_hash: config.config_hash_at(
            &request.dataset,
            data.dataset_version,
            &data.fingerprint,
        ),
        config: config.clone(),
        pooled: None,
        blocks_precision: None,
    };
    let warm = warm_start(layout, &request.dataset, &config, &data)?;
    let db = ExperimentsDb::open(layout)?;
    // A segmentation run records its task as a param too.
    let mut extra_params = warm.as_ref().map(record::warm_params).unwrap_or_default();
    extra_params.push(("task".into(), Task::Segment.name().into()));
    // The maps the run read (`enqueue --maps`; absent in the metadata: the default).
    extra_params.push(("maps".into(), data.features.recorded_maps().as_str().into()));
    extra_params.extend(request.extra_params.iter().cloned());
    let handle = record::start(&db, &request.experiment, &inputs, &extra_params)?;
    let options = FitOptions {
        device: &request.device,
        progress: request.progress,
        resume: false,
        warm: warm.as_ref(),
    };
    fit(handle, &request.dataset, &data, &config, &options)
}

/// Continues a killed segmentation run from its newest checkpoint, with its
/// own settings: the same checks as `train --resume` of a classification run.
pub fn resume(
    layout: &Layout,
    run_id: &str,
    device: &Device,
    progress: bool,
) -> Result<SegmentReport, SegmentError> {
    let db = ExperimentsDb::open(layout)?;
    let (run_dir, inputs) = record::resumable_run(&db, run_id)?;
    if inputs.config.task != Task::Segment {
        return Err(SegmentError::Invalid(format!(
            "run {run_id} is a {} run, not a segmentation run",
            inputs.config.task.name()
        )));
    }
    let encoder = inputs.encoder.clone().unwrap_or_default();
    let data = load_data(
        layout,
        &DataSource {
            dataset: &inputs.dataset,
            version: Some(inputs.dataset_version),
            encoder: &encoder,
            fingerprint: Some(&inputs.fingerprint),
            maps: None,
            image_size: None,
            allow_partial: inputs.images_lacking > 0,
        },
    )?;
    let config = segment_config(inputs.config.clone())?;
    let from = checkpoint::latest_epoch(&run_dir)?;
    // Killed before its first checkpoint: start from the source's weights again.
    let warm = if from == 0 {
        warm_start(layout, &inputs.dataset, &config, &data)?
    } else {
        None
    };
    let handle = db.resume_run(run_id, from as u64)?;
    let options = FitOptions {
        device,
        progress,
        resume: true,
        warm: warm.as_ref(),
    };
    fit(handle, &inputs.dataset, &data, &config, &options)
}

/// How `fit` runs.
struct FitOptions<'a> {
    device: &'a Device,
    progress: bool,
    /// Continue from the newest checkpoint in the run's folder, if any.
    resume: bool,
    /// Start from another segmentation run's weights (a checkpoint wins).
    warm: Option<&'a WarmStart>,
}

/// Trains the head of run `handle` (fresh, or from its newest checkpoint),
/// writes its files and finishes it.
fn fit(
    handle: RunHandle,
    dataset: &str,
    data: &SegmentData,
    config: &TrainConfig,
    options: &FitOptions<'_>,
) -> Result<SegmentReport, SegmentError> {
    let device = options.device;
    let maps = data.features.maps().to_vec();
    let geometry = Geometry::new(maps, &data.mean, &data.std, device)?;
    let resolution = data.info.resolution;
    let upsample = upsample_operator(geometry.grid, (resolution, resolution), device)?;

    let mut parameters = 0u64;
    let mut previous = geometry.channels as u64;
    for size in config.head.layer_sizes(data.info.outputs) {
        parameters += previous * size as u64 + size as u64;
        previous = size as u64;
    }
    let plan = plan(data, config, parameters)?;
    // Mapped pages beyond half the budget are released as training reads on.
    data.features
        .set_resident_limit(config.memory_budget_bytes / 2);
    let class_weights = pixel_class_weights(config, data)?;
    // The trainer's per-row class weights are for classification targets:
    // segmentation weights its pixels in its own loss (`PixelWeights`).
    let trainer_config = TrainConfig {
        class_weights: ClassWeights::None,
        ..config.clone()
    };
    let mut trainer = HeadTrainer::new(
        trainer_config,
        geometry.channels,
        data.info.outputs,
        &vec![0; data.info.outputs],
        plan,
        device,
    )?;
    if let Some(warm) = options.warm {
        warm.apply(&trainer.head)?;
    }
    let warm = options.warm;
    let run_dir = handle.dir().to_path_buf();
    let resumed_from_epoch = if options.resume {
        checkpoint::restore_latest(&run_dir, config, &mut trainer, device)?
    } else {
        0
    };
    let micro_batch = trainer.plan.micro_batch;
    let scoring = Scoring {
        data,
        geometry: &geometry,
        upsample: &upsample,
        micro_batch,
        device,
    };
    let weights = class_weights.clone().map(|w| PixelWeights::new(w, data));
    // Tiles are drawn as classification rows are, labelled 1 when they hold
    // foreground: the balanced sampler draws both kinds equally often.
    let train_rows = SplitRows {
        rows: data.train.clone(),
        labels: data
            .train
            .iter()
            .map(|&r| usize::from(data.targets[r].iter().any(|&c| c > 0)))
            .collect(),
    };

    let batch_size = config.batch_size;
    let steps_per_epoch = data.train.len().div_ceil(batch_size);
    let total_steps = steps_per_epoch * config.epochs;
    let dtype = config.precision.dtype();
    while trainer.is_active() {
        let epoch = trainer.state.epochs_done;
        let stream = EpochStream {
            seed: config.seed,
            batch_size,
            sampler: config.sampler,
            epoch,
        };
        let order: Vec<usize> = stream
            .order(&train_rows, 2)
            .into_iter()
            .map(|(row, _)| row)
            .collect();
        let mut dropout = seeded(config.seed, dropout_stream(epoch));
        let mut loss_sum = 0f64;
        for batch in order.chunks(batch_size) {
            let batch_mean = weights.as_ref().map(|w| w.batch_mean(batch));
            let mut accumulated: Option<Vec<Tensor>> = None;
            for micro in batch.chunks(micro_batch) {
                let maps = map_tensors(&data.features, micro, device)?;
                let logits = mask_logits(
                    &geometry,
                    &trainer.head,
                    &upsample,
                    &maps,
                    dtype,
                    Some(&mut dropout),
                )?;
                let targets = target_tensor(data, micro, device)?;
                let pixel_weights = match (&weights, batch_mean) {
                    (Some(w), Some(mean)) => Some(w.tensor(data, micro, mean, device)?),
                    _ => None,
                };
                let micro_loss = loss(
                    &logits.to_dtype(DType::F32)?,
                    &targets,
                    pixel_weights.as_ref(),
                )?;
                loss_sum += micro_loss.to_scalar::<f32>()? as f64 * micro.len() as f64;
                // Each micro-batch's mean, weighted by its share: the batch mean.
                let share = micro.len() as f64 / batch.len() as f64;
                accumulated = Some(trainer.accumulate_gradients(
                    &micro_loss.affine(share * trainer.state.loss_scale, 0.0)?,
                    accumulated,
                )?);
            }
            trainer.apply_gradients(
                accumulated.expect("a batch holds at least one tile"),
                total_steps,
            )?;
        }
        let mut metrics = evaluate(&scoring, &trainer.head, &data.val, "val", None)?;
        metrics.insert("train/loss".into(), loss_sum / order.len() as f64);
        for split in ["train", "val"] {
            if !metrics[&format!("{split}/loss")].is_finite() {
                trainer.diverge(format!(
                    "the {split} loss stopped being finite at epoch {} (learning rate {}); lower --lr",
                    epoch + 1,
                    config.learning_rate
                ));
            }
        }
        if let Some(error) = trainer.divergence(handle.id()) {
            return Err(record::fail_run(handle, error)?.into());
        }
        let improved = trainer.end_epoch(metrics)?;
        let logged = trainer.state.history.last().expect("end_epoch recorded it");
        let values: Vec<(&str, f64)> = logged.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        handle.log_metrics(epoch as u64 + 1, &values)?;
        if options.progress {
            eprintln!(
                "epoch {}: train/loss {:.4}, val/loss {:.4}, val/dice {:.4}, val/iou {:.4}",
                epoch + 1,
                logged["train/loss"],
                logged["val/loss"],
                logged["val/dice"],
                logged["val/iou"]
            );
        }
        if improved {
            checkpoint::publish_best(&run_dir, &head_file_bytes(data, config, &trainer, true)?)?;
        }
        checkpoint::save_if_due(&run_dir, config, &trainer)?;
    }
    trainer.restore_best()?;
    let mut per_image = BTreeMap::new();
    let test = evaluate(
        &scoring,
        &trainer.head,
        &data.test,
        "test",
        Some(&mut per_image),
    )?;
    let image_dice: Vec<ImageDice> = per_image
        .into_iter()
        .map(|(image_index, (tiles, pixels))| ImageDice {
            image_index,
            tiles,
            dice: pixels.dice(),
            iou: pixels.iou(),
        })
        .collect();
    if !test["test/loss"].is_finite() {
        trainer.diverge("the test loss is not finite".to_string());
    }
    if let Some(error) = trainer.divergence(handle.id()) {
        return Err(record::fail_run(handle, error)?.into());
    }
    let report = SegmentReport {
        run_id: handle.id().to_string(),
        run_dir: run_dir.clone(),
        task: Task::Segment.name(),
        dataset: dataset.to_string(),
        fingerprint: data.fingerprint.clone(),
        split_rows: BTreeMap::from([
            ("train", data.train.len()),
            ("val", data.val.len()),
            ("test", data.test.len()),
        ]),
        epochs_run: trainer.state.epochs_done,
        best_epoch: trainer.state.best_epoch,
        resumed_from_epoch,
        stopped_early: trainer.state.stopped_early,
        class_weights: class_weights.map(|w| {
            class_names(&data.info)
                .into_iter()
                .zip(w)
                .map(|(name, weight)| (name, weight as f64))
                .collect()
        }),
        plan: trainer.plan,
        warm_start: warm.map(|w| w.summary.clone()),
        epochs: trainer.state.history.clone(),
        test,
    };
    // Before metrics.json, which marks the run's files complete.
    handle.write_artifact(DICE_FILE, &dice_csv(&image_dice))?;
    write_artifacts(&handle, &report, config, data, &trainer)?;
    let summary = record::summary_metrics(
        &report.test,
        &report.epochs,
        report.best_epoch,
        report.epochs_run,
    );
    handle.finish(RunStatus::Finished, &summary)?;
    Ok(report)
}

/// The head file: layers, standardisation, and the `segment` metadata
/// `predict` needs; of the best head so far with `best`.
fn head_file_bytes(
    data: &SegmentData,
    config: &TrainConfig,
    trainer: &HeadTrainer,
    best: bool,
) -> Result<Vec<u8>, SegmentError> {
    let cpu = Device::Cpu;
    let mut tensors = vec![
        (
            "input_mean".to_string(),
            Tensor::from_slice(&data.mean, data.mean.len(), &cpu)?,
        ),
        (
            "input_std".to_string(),
            Tensor::from_slice(&data.std, data.std.len(), &cpu)?,
        ),
    ];
    tensors.extend(trainer.head_tensors(best));
    let metadata = HashMap::from([
        (
            HEAD_INFO_KEY.to_string(),
            serde_json::to_string(&data.info).expect("head info serialises"),
        ),
        ("fingerprint".to_string(), data.fingerprint.clone()),
        ("head".to_string(), config.head.name().to_string()),
    ]);
    Ok(crate::train::checkpoint::safetensors_bytes(
        &tensors,
        Some(metadata),
    )?)
}

fn write_artifacts(
    handle: &RunHandle,
    report: &SegmentReport,
    config: &TrainConfig,
    data: &SegmentData,
    trainer: &HeadTrainer,
) -> Result<(), SegmentError> {
    // restore_best already put the kept head in place.
    let bytes = head_file_bytes(data, config, trainer, false)?;
    handle.write_artifact(run_files::HEAD_FILE, &bytes)?;
    let json = serde_json::to_vec_pretty(report).expect("report serialises");
    handle.write_artifact(run_files::METRICS_FILE, &json)?;
    let card = serde_json::json!({
        "run_id": report.run_id,
        "lazarus_version": crate::VERSION,
        "task": "semantic segmentation from frozen-encoder feature maps",
        "dataset": report.dataset,
        "encoder": data.encoder,
        "encoder_fingerprint": report.fingerprint,
        "mask_kind": data.info.mask_kind,
        "split_tiles": report.split_rows,
        "head": config.head.name(),
        "config": config,
        "class_weights": report.class_weights,
        "best_epoch": report.best_epoch + 1,
        "test_metrics": report.test,
        "intended_use": "Masks for images like those of the training dataset, with the same \
                         encoder, preprocessing and tiling; review them before use.",
        "limitations": "The head sees the encoder's stride-16 (or patch) grid: boundaries are \
                        interpolated and structures smaller than a grid cell may be missed. \
                        Measured on one held-out split of one dataset.",
    });
    record::write_config_and_card(handle, config, &card)?;
    let points: Vec<crate::experiments::plots::EpochPoint> = report
        .epochs
        .iter()
        .enumerate()
        .map(|(epoch, m)| crate::experiments::plots::EpochPoint {
            epoch: epoch as u64 + 1,
            train_loss: m.get("train/loss").copied(),
            validation_loss: m.get("val/loss").copied(),
            validation_metric: m.get(&config.monitor).copied(),
        })
        .collect();
    let plots = handle.folder().plots();
    std::fs::create_dir_all(&plots).map_err(|source| SegmentError::Io {
        path: plots.clone(),
        source,
    })?;
    crate::experiments::plots::learning_curves(
        &plots,
        &crate::experiments::plots::LearningCurves {
            metric_name: &config.monitor,
            epochs: &points,
        },
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::mask_resolution;

    #[test]
    fn finer_grids_keep_masks_of_about_112_pixels() {
        // Grids before `--maps` keep the factor 8: Lite0's stride 32 (7) and
        // 16 (14), DINOv2's 16 patches per side.
        assert_eq!(mask_resolution(7), 56);
        assert_eq!(mask_resolution(14), 112);
        assert_eq!(mask_resolution(16), 128);
        // Stride 8 (28 cells) and 4 (56 cells) of a 224 tile.
        assert_eq!(mask_resolution(28), 112);
        assert_eq!(mask_resolution(56), 112);
        assert_eq!(mask_resolution(200), 200);
    }
}

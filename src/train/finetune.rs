//! Partial fine-tuning (issue 22, `train --unfreeze-from K`): a
//! classification head trained together with an EfficientNet-Lite's top
//! blocks (`blocks::TopBlocks`) on a spatial folder whose stride-4, -8 or
//! -16 map is the output of block K (Lite0: K 2, 4 or 10), as a run recorded
//! like any other.
//!
//! Each step gathers the batch's cached maps (f16 `[C, H, W]` rows, turned
//! channels-last once), runs the blocks and the head convolution, pools
//! (the mean, and under `--blocks-pool mean-max` the maximum too),
//! standardises with fixed statistics of the pretrained blocks' output
//! (`head_input_statistics`: the head's inputs keep their scale while the
//! blocks move), and steps the head through its
//! `HeadTrainer` (`InputStep`: class weights, label smoothing, dropout, the
//! schedule, plateau, early stopping and the kept best head as for heads on
//! frozen features). The head's input gradient flows back into the blocks,
//! updated by their own AdamW with their own rate (scaled by the head's
//! schedule alike) and decay. Batches larger than the memory budget allows
//! run as micro-batches whose gradients add up to the batch's.
//!
//! # Crash behaviour
//!
//! As for heads (`run.rs`): every `checkpoint_every` epochs the checkpoint
//! pair holds the head's state plus the blocks, their moments, the best
//! epoch's blocks and, under `--ema`, the weights' average and its kept
//! head; the data order, the map views, dropout, drop path and map mixing
//! (`mix`) come from (seed, epoch), so a run killed at any point resumes
//! from its newest checkpoint and ends with the metrics of an
//! uninterrupted run. The blocks file is written before
//! `metrics.json`, whose presence marks the run finished.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::OnceLock;

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::TrainError;
use super::auto_precision::{self, ChosenPrecision};
use super::blocks::{
    self, BlockGradients, BlocksLayout, BlocksOptimizer, BlocksStep, EvaluationPacking,
    InputGradient, MapSize, TopBlocks, append_channels_last,
};
use super::checkpoint;
use super::config::{BlocksPooling, BlocksPrecision, TrainConfig, Unfreeze};
use super::data::{self, Standardisation, TrainData};
use super::host::{HostHead, Threads, softmax_rows};
use super::mix;
use super::record::{fail_run, resumable_run, start};
use super::run::{
    EpochStream, FitOptions, RunObserver, RunReport, binary_curves, drawn_view, dropout_stream,
    resume_load_config, run_inputs, runtime_bytes, seeded, split_evaluation, write_run,
};
use super::session::{EpochLogger, finish_run, require_two_classes};
use super::trainer::{BatchPlan, HeadTrainer, lend_first_layers, return_first_layers};
use crate::encoders::ViewSet;
use crate::encoders::cpu_kernels::scratch;
use crate::encoders::efficientnet_lite::{Config, EfficientNetLite};
use crate::experiments::{ExperimentsDb, ParamValue, RunHandle};
use crate::features::catalog::FeatureKind;
use crate::layout::Layout;
use crate::spatial::tile::TileConfig;

/// The stride of the cached map that is block `after_block`'s output (4, 8
/// or 16: `Config::block_maps`), or why no cached map is.
pub fn cached_stride(
    encoder_name: &str,
    after_block: usize,
    folder: &str,
    maps: &str,
) -> Result<usize, TrainError> {
    let config = Config::for_name(encoder_name).ok_or_else(|| {
        TrainError::Invalid(format!(
            "--unfreeze-from {after_block}: {encoder_name} is not an EfficientNet-Lite, whose \
             blocks are the ones fine-tuned"
        ))
    })?;
    config.map_after_block(after_block).map_err(|why| {
        TrainError::Invalid(format!(
            "--unfreeze-from {after_block}: folder {folder} caches the maps {maps}; the blocks \
             after block K are trained from the cached output of block K, and {why}"
        ))
    })
}

/// The encoder whose blocks are fine-tuned, and what identifies it in a
/// feature folder's metadata: the folder's maps must come from the same
/// weights, or the blocks would continue another network.
#[derive(Clone, Copy)]
pub struct FinetuneEncoder<'a> {
    pub model: &'a EfficientNetLite,
    /// The registry name (`efficientnet-lite0`).
    pub name: &'a str,
    /// sha256 (hex) of the weights file the model was built from.
    pub weights_sha256: &'a str,
}

/// An encoder loaded for fine-tuning, with what names it.
pub struct LoadedEncoder {
    pub model: EfficientNetLite,
    pub name: String,
    pub weights_sha256: String,
}

impl LoadedEncoder {
    pub fn borrowed(&self) -> FinetuneEncoder<'_> {
        FinetuneEncoder {
            model: &self.model,
            name: &self.name,
            weights_sha256: &self.weights_sha256,
        }
    }
}

/// The installed weights of the encoder `data`'s folder names, checked
/// against the sha256 the folder recorded before they are read.
pub fn load_folder_encoder(data: &TrainData) -> Result<LoadedEncoder, TrainError> {
    let folder = data.features.dir().display().to_string();
    let metadata = data.features.metadata();
    let Some(name) = metadata.get("encoder") else {
        return Err(TrainError::Invalid(format!(
            "folder {folder} does not name its encoder: its blocks cannot be fine-tuned"
        )));
    };
    let recorded = metadata.get("weights").map_or("nothing", String::as_str);
    let Some(expected) = recorded.strip_prefix("sha256:") else {
        return Err(TrainError::Invalid(format!(
            "folder {folder} was extracted by {name} with weights {recorded}; fine-tuning \
             continues pretrained blocks: extract with installed weights (lazarus weights fetch)"
        )));
    };
    let installed = crate::weights::installed(name).ok_or_else(|| {
        TrainError::Invalid(format!(
            "folder {folder} was extracted by {name}, whose weights are not installed here: \
             lazarus weights fetch {name}"
        ))
    })?;
    let bytes = std::fs::read(&installed.path).map_err(TrainError::io(&installed.path))?;
    let actual = crate::digest::sha256_hex(&bytes);
    drop(bytes);
    if actual != expected {
        return Err(TrainError::Invalid(format!(
            "folder {folder} was extracted by {name} with weights sha256:{expected}; the \
             installed weights {} are sha256:{actual}",
            installed.path.display()
        )));
    }
    let model = crate::encoders::load_lite_classifier(name, &installed.path, &Device::Cpu)
        .map_err(|e| TrainError::Invalid(format!("fine-tuning {name}: {e}")))?;
    Ok(LoadedEncoder {
        model,
        name: name.clone(),
        weights_sha256: actual,
    })
}

/// Index (into `FeatureSet::maps`) of the map the blocks after
/// `after_block` read, after checking the folder and the block: made by
/// `encoder`'s weights, holding the map that is block `after_block`'s output
/// (stride 4, 8 or 16: see [`cached_stride`]), one row per image (no views,
/// no tiles).
pub fn check_folder(
    data: &TrainData,
    encoder: FinetuneEncoder,
    after_block: usize,
) -> Result<usize, TrainError> {
    let features = &data.features;
    let folder = features.dir().display();
    let maps = features.recorded_maps();
    let recorded = |key: &str| {
        features
            .metadata()
            .get(key)
            .map_or("nothing", String::as_str)
    };
    let weights = format!("sha256:{}", encoder.weights_sha256);
    if recorded("encoder") != encoder.name || recorded("weights") != weights {
        return Err(TrainError::Invalid(format!(
            "folder {folder} was extracted by {} with weights {}; the blocks to fine-tune \
             are {} with weights {weights}",
            recorded("encoder"),
            recorded("weights"),
            encoder.name
        )));
    }
    let stride = cached_stride(encoder.name, after_block, &folder.to_string(), &maps)?;
    let Some(index) = features
        .maps()
        .iter()
        .position(|shape| shape.stride == stride)
    else {
        return Err(TrainError::Invalid(format!(
            "--unfreeze-from {after_block}: folder {folder} holds the maps {maps}, not the \
             stride-{stride} map (block {after_block}'s output); extract it with enqueue \
             --cache-at {after_block} (the same as --spatial --maps {stride})"
        )));
    };
    if data.views != 1 {
        return Err(TrainError::Invalid(format!(
            "--unfreeze-from {after_block}: folder {folder} holds {} views per image; \
             fine-tuning reads one map per image",
            data.views
        )));
    }
    let indices = features.image_indices();
    if let Some(pair) = indices.windows(2).find(|pair| pair[0] == pair[1]) {
        return Err(TrainError::Invalid(format!(
            "--unfreeze-from {after_block}: folder {folder} cut image {} into several tiles; \
             fine-tuning classifies one map per image (images up to the tile size)",
            pair[0]
        )));
    }
    Ok(index)
}

/// Gathers the maps of `rows` channels-last (`[rows, h, w, c]`, f32).
fn gather_maps(data: &TrainData, map: usize, rows: &[usize]) -> Vec<f32> {
    let shape = data.features.maps()[map];
    let size = MapSize {
        height: shape.height,
        width: shape.width,
    };
    let mut input = scratch::with_capacity(rows.len() * shape.channels * size.pixels());
    for &row in rows {
        append_channels_last(
            data.features.map(row, map),
            shape.channels,
            size,
            &mut input,
        );
    }
    data.features.enforce_resident_limit();
    input
}

/// A training batch's maps as the step sees them: gathered channels-last
/// and turned into each position's drawn view.
struct TrainingMaps<'b> {
    data: &'b TrainData,
    map: usize,
    augment: ViewSet,
    /// The batch's (row, label) pairs and each position's view.
    batch: &'b [(usize, usize)],
    views: &'b [usize],
    side: usize,
    channels: usize,
}

impl TrainingMaps<'_> {
    /// The maps of the batch's `positions`, in that order.
    fn gather(&self, positions: &[usize]) -> Vec<f32> {
        let rows: Vec<usize> = positions.iter().map(|&at| self.batch[at].0).collect();
        let mut input = gather_maps(self.data, self.map, &rows);
        let per_map = self.channels * self.side * self.side;
        for (map, &at) in input.chunks_exact_mut(per_map).zip(positions) {
            if self.views[at] > 0 {
                let seen =
                    self.augment
                        .apply_channels_last(self.views[at], map, self.side, self.channels);
                map.copy_from_slice(&seen);
            }
        }
        input
    }
}

/// The head's input: pooled features standardised with `input`.
fn standardise(pooled: &mut [f32], input: Standardisation<'_>) {
    for row in pooled.chunks_exact_mut(input.mean.len()) {
        for ((v, mean), std) in row.iter_mut().zip(input.mean).zip(input.std) {
            *v = (*v - mean) / std;
        }
    }
}

/// What the head's inputs are standardised with: for the means, the
/// training split's statistics of the folder's pooled rows (the pretrained
/// blocks' own output, kept fixed so the head's inputs keep their scale while
/// the blocks move); under `--blocks-pool mean-max`, for the maxima, their
/// statistics over one pass of the pretrained `blocks` over the training
/// split's maps as cached, `micro_batch` maps at a time (bf16 products run
/// the batch forward, which keeps a backward pass's activations).
fn head_input_statistics(
    data: &TrainData,
    blocks: &TopBlocks,
    (map, size): (usize, MapSize),
    micro_batch: usize,
) -> Result<(Vec<f32>, Vec<f32>), TrainError> {
    let (mut mean, mut std) = (data.mean.clone(), data.std.clone());
    if blocks.pooling() == BlocksPooling::MeanMax {
        let channels = blocks.head_channels();
        let evaluation = blocks.for_evaluation();
        let mut maxima = Vec::with_capacity(data.train.rows.len() * channels);
        for rows in data.train.rows.chunks(micro_batch.max(1)) {
            let maps = gather_maps(data, map, rows);
            let pooled = evaluation.pooled(maps, rows.len(), size)?;
            for image in pooled.chunks_exact(2 * channels) {
                maxima.extend_from_slice(&image[channels..]);
            }
        }
        let (max_mean, max_std) = data::mean_and_std(
            channels,
            maxima
                .chunks_exact(channels)
                .map(|row| row.iter().map(|&v| f64::from(v))),
        );
        mean.extend(max_mean);
        std.extend(max_std);
    }
    Ok((mean, std))
}

/// What a run's blocks file records besides the tensors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BlocksInfo {
    pub layout: BlocksLayout,
    /// The encoder the blocks came from, and its weights (`sha256:HEX`).
    pub encoder: String,
    pub weights: String,
    /// The stride of the map the blocks read.
    pub stride: usize,
    /// How the folder cut images into tiles (one tile per image here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tiling: Option<TileConfig>,
    /// The views of the map whose class probabilities an answer averages
    /// (test-time augmentation: the run's `--augment-maps` under
    /// `--eval-views mean`); `1` in files from before, which read the map
    /// as cached.
    #[serde(default, skip_serializing_if = "ViewSet::is_single")]
    pub views: ViewSet,
    /// The blocks' matrix products as trained (`--blocks-precision`), which
    /// every answer from them repeats; f32 in files from before.
    #[serde(default, skip_serializing_if = "BlocksPrecision::is_f32")]
    pub precision: BlocksPrecision,
    /// How the head convolution's map is pooled (`--blocks-pool`); the mean
    /// in files from before.
    #[serde(default, skip_serializing_if = "BlocksPooling::is_mean")]
    pub pooling: BlocksPooling,
}

/// Turns each square channels-last map of `maps` (`size`, `channels`) into
/// its view `view` of `views`, in place; view 0 is the map as cached.
pub fn view_maps(views: ViewSet, view: usize, maps: &mut [f32], size: MapSize, channels: usize) {
    if view == 0 {
        return;
    }
    debug_assert_eq!(size.height, size.width, "views need square maps");
    for map in maps.chunks_exact_mut(channels * size.pixels()) {
        let seen = views.apply_channels_last(view, map, size.height, channels);
        map.copy_from_slice(&seen);
    }
}

/// A fine-tuned run's trained blocks, as its blocks file holds them.
/// Read-only: the weights are packed for evaluation on the first `pooled`
/// and the packing kept for every later answer.
#[derive(Debug)]
pub struct FineTunedBlocks {
    blocks: TopBlocks,
    info: BlocksInfo,
    packing: OnceLock<EvaluationPacking>,
}

impl Clone for FineTunedBlocks {
    fn clone(&self) -> Self {
        FineTunedBlocks::new(self.blocks.clone(), self.info.clone())
    }
}

/// The header metadata key of a blocks file.
const BLOCKS_METADATA_KEY: &str = "blocks";

impl FineTunedBlocks {
    fn new(blocks: TopBlocks, info: BlocksInfo) -> Self {
        FineTunedBlocks {
            blocks,
            info,
            packing: OnceLock::new(),
        }
    }

    pub fn blocks(&self) -> &TopBlocks {
        &self.blocks
    }

    pub fn info(&self) -> &BlocksInfo {
        &self.info
    }

    pub fn into_blocks(self) -> TopBlocks {
        self.blocks
    }

    pub fn to_bytes(&self) -> Result<Vec<u8>, TrainError> {
        let metadata = HashMap::from([(
            BLOCKS_METADATA_KEY.to_string(),
            serde_json::to_string(&self.info).expect("blocks info serialises"),
        )]);
        checkpoint::safetensors_bytes(&self.blocks.tensors("")?, Some(metadata))
    }

    /// The blocks of a blocks file's `bytes` (read from `path`).
    pub fn from_bytes(bytes: &[u8], path: &Path) -> Result<Self, TrainError> {
        let (_, header) = safetensors::SafeTensors::read_metadata(bytes)
            .map_err(|e| TrainError::Checkpoint(format!("{}: {e}", path.display())))?;
        let info: BlocksInfo = header
            .metadata()
            .as_ref()
            .and_then(|m| m.get(BLOCKS_METADATA_KEY))
            .ok_or_else(|| {
                TrainError::Checkpoint(format!(
                    "{}: no `{BLOCKS_METADATA_KEY}` metadata: not a blocks file",
                    path.display()
                ))
            })
            .and_then(|text| {
                serde_json::from_str(text).map_err(|e| {
                    TrainError::Checkpoint(format!("{}: blocks metadata: {e}", path.display()))
                })
            })?;
        let tensors = checkpoint::tensors_from_bytes(bytes, path, &Device::Cpu)?;
        let blocks = TopBlocks::from_layout(&info.layout, &tensors, "", path)?
            .with_precision(info.precision)
            .with_pooling(info.pooling);
        Ok(FineTunedBlocks::new(blocks, info))
    }

    pub fn read(path: &Path) -> Result<Self, TrainError> {
        let bytes = std::fs::read(path)
            .map_err(|e| TrainError::Checkpoint(format!("cannot read {}: {e}", path.display())))?;
        Self::from_bytes(&bytes, path)
    }

    /// Pooled features of maps given channels-last (`[n, h, w, c]`).
    pub fn pooled(&self, input: Vec<f32>, n: usize, size: MapSize) -> Result<Vec<f32>, TrainError> {
        let packing = self
            .packing
            .get_or_init(|| self.blocks.pack_for_evaluation());
        self.blocks.with_packing(packing).pooled(input, n, size)
    }
}

/// Checkpoint tensor prefixes of the blocks, their moments and the best blocks.
const BLOCKS_PREFIX: &str = "blocks.";
const BEST_BLOCKS_PREFIX: &str = "best_blocks.";
const AVERAGE_BLOCKS_PREFIX: &str = "average_blocks.";
const AVERAGE_HEAD_PREFIX: &str = "average_head.";
const BEST_AVERAGE_HEAD_PREFIX: &str = "best_average_head.";

/// The exponential moving average of the blocks' and the head's weights
/// (`--ema`): what evaluation reads, the kept epoch keeps and the run
/// writes. The decay warms up as (1 + step) / (10 + step), so the head's
/// random start fades within the first steps.
struct Averaged {
    decay: f64,
    blocks: TopBlocks,
    head: HostHead,
    /// The average at the kept epoch.
    best_head: Option<HostHead>,
}

impl Averaged {
    /// Moves the average towards the weights after step `step` (1-based).
    fn update(&mut self, step: usize, blocks: &TopBlocks, head: Vec<&[f32]>) {
        let decay = self.decay.min((1 + step) as f64 / (10 + step) as f64) as f32;
        let mix = |average: &mut [f32], current: &[f32]| {
            for (a, &c) in average.iter_mut().zip(current) {
                *a = decay * *a + (1.0 - decay) * c;
            }
        };
        for (average, current) in self
            .blocks
            .parameters_mut()
            .into_iter()
            .zip(blocks.parameters())
        {
            mix(average, current);
        }
        let averages = self
            .head
            .layers
            .iter_mut()
            .flat_map(|layer| [&mut layer.weight, &mut layer.bias]);
        for (average, current) in averages.zip(head) {
            mix(average, current);
        }
    }
}

/// The names and shapes of a head's layers' tensors in checkpoints
/// (`0.weight`, `0.bias`, ... as flat 1-D tensors).
fn head_names_and_shapes(head: &HostHead) -> (Vec<String>, Vec<Vec<usize>>) {
    head.layers
        .iter()
        .enumerate()
        .flat_map(|(index, layer)| {
            [
                (format!("{index}.weight"), vec![layer.weight.len()]),
                (format!("{index}.bias"), vec![layer.bias.len()]),
            ]
        })
        .unzip()
}

/// A head's layers as named 1-D tensors (checkpoints).
fn head_tensors(head: &HostHead, prefix: &str) -> Result<Vec<(String, Tensor)>, TrainError> {
    let (names, shapes) = head_names_and_shapes(head);
    let values = head
        .layers
        .iter()
        .flat_map(|layer| [layer.weight.as_slice(), layer.bias.as_slice()])
        .collect();
    blocks::named_tensors(prefix, &names, &shapes, values)
}

/// Replaces `head`'s layers with the named tensors `head_tensors` wrote.
fn load_head(
    head: &mut HostHead,
    tensors: &HashMap<String, Tensor>,
    prefix: &str,
    source: &Path,
) -> Result<(), TrainError> {
    let (names, shapes) = head_names_and_shapes(head);
    let read = blocks::read_named(tensors, prefix, &names, &shapes, source)?;
    let targets = head
        .layers
        .iter_mut()
        .flat_map(|layer| [&mut layer.weight, &mut layer.bias]);
    for (target, values) in targets.zip(read) {
        *target = values;
    }
    Ok(())
}

/// The random stream of an epoch's stochastic-depth draws (apart from the
/// data order's and dropout's, `2 * epoch + 1` and `2 * epoch + 2`).
fn drop_path_stream(epoch: usize) -> u64 {
    (1 << 40) + epoch as u64
}

/// The stream of an epoch's map mixing (`--mix-maps`).
fn mix_stream(epoch: usize) -> u64 {
    (1 << 41) + epoch as u64
}

/// A fine-tuning in progress: the head's trainer (weights, moments,
/// schedule state, best head, history), the blocks and their optimiser,
/// and the blocks of the best epoch so far.
struct Finetuning<'a> {
    data: &'a TrainData,
    unfreeze: Unfreeze,
    /// Index of the map the blocks read (block K's output) in the folder's maps.
    map: usize,
    size: MapSize,
    trainer: HeadTrainer,
    blocks: TopBlocks,
    optimizer: BlocksOptimizer,
    best_blocks: Option<TopBlocks>,
    /// `--ema`: the weights' moving average.
    averaged: Option<Averaged>,
    encoder: String,
    weights: String,
    /// The map views evaluation averages over (see `BlocksInfo::views`).
    eval_views: ViewSet,
    /// The head's input standardisation (`head_input_statistics`).
    input_mean: Vec<f32>,
    input_std: Vec<f32>,
    /// What `--blocks-precision auto` took; None for a fixed precision.
    auto_precision: Option<ChosenPrecision>,
}

impl<'a> Finetuning<'a> {
    /// `recorded_precision`: what `--blocks-precision auto` took when the
    /// run started (a resume repeats it).
    fn new(
        data: &'a TrainData,
        encoder: FinetuneEncoder,
        config: &TrainConfig,
        recorded_precision: Option<ChosenPrecision>,
    ) -> Result<Self, TrainError> {
        config.validate()?;
        let unfreeze = config.unfreeze.ok_or_else(|| {
            TrainError::Invalid("a fine-tuning run needs --unfreeze-from K".into())
        })?;
        let map = check_folder(data, encoder, unfreeze.after_block)?;
        let blocks = TopBlocks::from_encoder(encoder.model, unfreeze.after_block)?
            .with_pooling(unfreeze.pooling);
        let shape = data.features.maps()[map];
        let folder = data.features.dir().display();
        if shape.channels != blocks.in_channels() {
            return Err(TrainError::Invalid(format!(
                "folder {folder}: its stride-{} map has {} channels; block {} reads {}",
                shape.stride,
                shape.channels,
                unfreeze.after_block + 1,
                blocks.in_channels()
            )));
        }
        if blocks.head_channels() != data.features.feature_dim() {
            return Err(TrainError::Invalid(format!(
                "folder {folder} holds {} pooled features per row; the head convolution after \
                 block {} gives {}",
                data.features.feature_dim(),
                unfreeze.after_block,
                blocks.head_channels()
            )));
        }
        let size = MapSize {
            height: shape.height,
            width: shape.width,
        };
        if !config.augment_maps.is_single() && size.height != size.width {
            return Err(TrainError::Invalid(format!(
                "--augment-maps {}: folder {folder} holds {}x{} maps; flips and rotations of \
                 maps need squares",
                config.augment_maps, size.height, size.width
            )));
        }
        if !unfreeze.mix.is_none() && size.height != size.width {
            return Err(TrainError::Invalid(format!(
                "--mix-maps {}: folder {folder} holds {}x{} maps; mixing takes square maps",
                unfreeze.mix.name(),
                size.height,
                size.width
            )));
        }
        // `auto`: what the run recorded (a resume), else a timing on a
        // micro-batch of its own maps under the plan of the larger
        // precision.
        let (blocks, auto_precision) = match (unfreeze.precision.fixed(), recorded_precision) {
            (Some(precision), _) => (blocks.with_precision(precision), None),
            (None, Some(chosen)) => (blocks.with_precision(chosen.precision), Some(chosen)),
            (None, None) => {
                let blocks = blocks.with_precision(BlocksPrecision::Bf16);
                let micro_batch = plan_memory(data, &blocks, size, config)?.micro_batch;
                let rows = &data.train.rows[..micro_batch.min(data.train.rows.len())];
                if rows.is_empty() {
                    return Err(TrainError::Invalid(format!(
                        "--blocks-precision auto: folder {folder} has no training maps to time"
                    )));
                }
                let maps = gather_maps(data, map, rows);
                let chosen = auto_precision::choose(&blocks, &maps, rows.len(), size)?;
                scratch::recycle(maps);
                (blocks.with_precision(chosen.precision), Some(chosen))
            }
        };
        let plan = plan_memory(data, &blocks, size, config)?;
        let (input_mean, input_std) =
            head_input_statistics(data, &blocks, (map, size), plan.micro_batch)?;
        let classes = data.class_names.len();
        let mut counts = vec![0usize; classes];
        for &label in &data.train.labels {
            counts[label] += 1;
        }
        let trainer = HeadTrainer::new(
            config.clone(),
            blocks.feature_dim(),
            classes,
            &counts,
            plan,
            &Device::Cpu,
        )?;
        let averaged = if unfreeze.ema > 0.0 {
            Some(Averaged {
                decay: unfreeze.ema,
                blocks: blocks.clone(),
                head: trainer.evaluation_head()?.expect("f32 CPU head"),
                best_head: None,
            })
        } else {
            None
        };
        Ok(Finetuning {
            data,
            unfreeze,
            map,
            size,
            trainer,
            optimizer: BlocksOptimizer::new(&blocks),
            blocks,
            best_blocks: None,
            averaged,
            encoder: encoder.name.to_string(),
            weights: format!("sha256:{}", encoder.weights_sha256),
            eval_views: if config.eval_views.is_mean() {
                config.augment_maps
            } else {
                ViewSet::Single
            },
            input_mean,
            input_std,
            auto_precision,
        })
    }

    /// Continues from the newest checkpoint of `run_dir`, if there is one.
    fn restore(&mut self, run_dir: &Path) -> Result<(), TrainError> {
        let config = self.trainer.config.clone();
        let Some((tensors, source)) =
            checkpoint::restore_latest_with(run_dir, &config, &mut self.trainer, &Device::Cpu)?
        else {
            return Ok(());
        };
        self.blocks.load_tensors(&tensors, BLOCKS_PREFIX, &source)?;
        self.optimizer = BlocksOptimizer::from_tensors(
            &self.blocks,
            &tensors,
            BLOCKS_PREFIX,
            self.trainer.state.updates,
            &source,
        )?;
        if let Some(averaged) = &mut self.averaged {
            averaged
                .blocks
                .load_tensors(&tensors, AVERAGE_BLOCKS_PREFIX, &source)?;
            load_head(&mut averaged.head, &tensors, AVERAGE_HEAD_PREFIX, &source)?;
            averaged.best_head = if self.trainer.state.best_score.is_some() {
                let mut best = averaged.head.clone();
                load_head(&mut best, &tensors, BEST_AVERAGE_HEAD_PREFIX, &source)?;
                Some(best)
            } else {
                None
            };
        }
        self.best_blocks = if self.trainer.state.best_score.is_some() {
            let mut best = self.blocks.clone();
            best.load_tensors(&tensors, BEST_BLOCKS_PREFIX, &source)?;
            Some(best)
        } else {
            None
        };
        Ok(())
    }

    /// What a checkpoint holds beside the head's state.
    fn checkpoint_tensors(&self) -> Result<Vec<(String, Tensor)>, TrainError> {
        let mut tensors = self.blocks.tensors(BLOCKS_PREFIX)?;
        tensors.extend(self.optimizer.tensors(&self.blocks, BLOCKS_PREFIX)?);
        if let Some(best) = &self.best_blocks {
            tensors.extend(best.tensors(BEST_BLOCKS_PREFIX)?);
        }
        if let Some(averaged) = &self.averaged {
            tensors.extend(averaged.blocks.tensors(AVERAGE_BLOCKS_PREFIX)?);
            tensors.extend(head_tensors(&averaged.head, AVERAGE_HEAD_PREFIX)?);
            if let Some(best) = &averaged.best_head {
                tensors.extend(head_tensors(best, BEST_AVERAGE_HEAD_PREFIX)?);
            }
        }
        Ok(tensors)
    }

    /// One epoch's steps; returns the mean training loss of its batches.
    fn run_epoch(&mut self, progress: bool) -> Result<f64, TrainError> {
        let data = self.data;
        let head_input = Standardisation {
            mean: &self.input_mean,
            std: &self.input_std,
        };
        let config = self.trainer.config.clone();
        let epoch = self.trainer.state.epochs_done;
        let order = EpochStream {
            seed: config.seed,
            batch_size: config.batch_size,
            sampler: config.sampler,
            epoch,
        }
        .order(&data.train, data.class_names.len());
        let steps_per_epoch = order.len().div_ceil(config.batch_size);
        let mut dropout_rng = seeded(config.seed, dropout_stream(epoch));
        let mut drop_path_rng = seeded(config.seed, drop_path_stream(epoch));
        let mut mix_rng = seeded(config.seed, mix_stream(epoch));
        let classes = data.class_names.len();
        let mut gradients: BlockGradients = self.blocks.zero_gradients();
        let bar = epoch_bar(progress, steps_per_epoch, epoch, config.epochs);
        let mut first = lend_first_layers(&mut [&mut self.trainer])?;
        let mut loss_sum = 0f64;
        let augment = config.augment_maps;
        let images = data.features.image_indices();
        // Which of its draws in this epoch an image's draw is (the
        // balanced sampler draws some images more than once).
        let mut draws: HashMap<usize, usize> = HashMap::new();
        let channels = self.blocks.in_channels();
        let side = self.size.height;
        let stepped = (|| -> Result<(), TrainError> {
            for batch in order.chunks(config.batch_size) {
                let labels: Vec<usize> = batch.iter().map(|&(_, label)| label).collect();
                let mut step = self.trainer.begin_input_step(&mut first, &labels)?;
                gradients.zero();
                // Each position's view, drawn in batch order.
                let views: Vec<usize> = batch
                    .iter()
                    .map(|&(row, _)| {
                        if augment.is_single() {
                            return 0;
                        }
                        let occurrence = draws.entry(row).or_insert(0);
                        *occurrence += 1;
                        drawn_view(
                            config.seed,
                            epoch,
                            images[row],
                            *occurrence - 1,
                            augment.count(),
                        )
                    })
                    .collect();
                let mixing = mix::draw(self.unfreeze.mix, batch.len(), side, &mut mix_rng);
                if let Some(mixing) = &mixing {
                    step.mix_targets(&mixing.partners, mixing.weight, classes);
                }
                let seen = TrainingMaps {
                    data,
                    map: self.map,
                    augment,
                    batch,
                    views: &views,
                    side,
                    channels,
                };
                let micro_batch = self.trainer.plan.micro_batch;
                for (micro_index, micro) in batch.chunks(micro_batch).enumerate() {
                    let rows: Vec<usize> = micro.iter().map(|&(row, _)| row).collect();
                    let positions: Vec<usize> =
                        (micro_index * micro_batch..).take(micro.len()).collect();
                    let mut input = seen.gather(&positions);
                    if let Some(mixing) = &mixing {
                        let partners: Vec<usize> =
                            positions.iter().map(|&at| mixing.partners[at]).collect();
                        let partner_maps = seen.gather(&partners);
                        mixing.apply(&mut input, &partner_maps, side, channels);
                        scratch::recycle(partner_maps);
                    }
                    let forward = if self.unfreeze.drop_path > 0.0 {
                        let draw = self.blocks.draw_drop_path(
                            self.unfreeze.drop_path,
                            rows.len(),
                            &mut drop_path_rng,
                        );
                        self.blocks
                            .forward_with_drop_path(input, rows.len(), self.size, &draw)?
                    } else {
                        self.blocks.forward(input, rows.len(), self.size)?
                    };
                    let mut x = forward.pooled().to_vec();
                    standardise(&mut x, head_input);
                    let (mut pooled_gradient, loss) = self.trainer.input_micro_batch(
                        &mut step,
                        &mut first,
                        &x,
                        rows.len(),
                        &mut dropout_rng,
                        Threads::Pool,
                    );
                    loss_sum += loss;
                    // Back through the standardisation into the blocks.
                    for row in pooled_gradient.chunks_exact_mut(head_input.std.len()) {
                        for (g, std) in row.iter_mut().zip(head_input.std) {
                            *g /= std;
                        }
                    }
                    self.blocks.backward(
                        forward,
                        &pooled_gradient,
                        &mut gradients,
                        InputGradient::Skip,
                    )?;
                }
                self.trainer
                    .finish_input_step(&mut first, steps_per_epoch)?;
                if self.trainer.state.diverged.is_some() {
                    return Ok(());
                }
                if !gradients.norm_sq(1.0).is_finite() {
                    self.trainer.diverge(format!(
                        "the encoder blocks' gradients stopped being finite at epoch {}, step {} \
                         (blocks learning rate {}); lower --blocks-lr",
                        epoch + 1,
                        self.trainer.state.global_step,
                        self.unfreeze.blocks_learning_rate
                    ));
                    return Ok(());
                }
                // The head's scheduled rate, scaled to the blocks' base rate.
                let lr = self.trainer.state.learning_rate * self.unfreeze.blocks_learning_rate
                    / config.learning_rate;
                self.optimizer.update(
                    &mut self.blocks,
                    &gradients,
                    BlocksStep {
                        lr,
                        weight_decay: self.unfreeze.blocks_weight_decay,
                        scale: 1.0,
                    },
                );
                if let Some(averaged) = &mut self.averaged {
                    averaged.update(
                        self.trainer.state.global_step,
                        &self.blocks,
                        self.trainer.lent_parameters(&first),
                    );
                }
                if let Some(bar) = &bar {
                    bar.inc(1);
                }
            }
            Ok(())
        })();
        return_first_layers(first, &mut [&mut self.trainer])?;
        if let Some(bar) = bar {
            bar.finish_and_clear();
        }
        stepped?;
        Ok(loss_sum / steps_per_epoch as f64)
    }

    /// Class probabilities (`[rows, classes]`) of `rows` through `blocks`
    /// and `head`, in micro-batches, each the mean over `eval_views`.
    fn probabilities(
        &self,
        blocks: &TopBlocks,
        head: &HostHead,
        rows: &[usize],
    ) -> Result<Vec<f32>, TrainError> {
        let classes = self.data.class_names.len();
        let views = self.eval_views.count();
        let mut out = Vec::with_capacity(rows.len() * classes);
        let evaluation = blocks.for_evaluation();
        for chunk in rows.chunks(self.trainer.plan.micro_batch) {
            let cached = gather_maps(self.data, self.map, chunk);
            // Image-major, each image's views in order, as `average_views` reads them.
            let mut by_image = vec![0f32; chunk.len() * views * classes];
            for view in 0..views {
                let mut input = scratch::copied(&cached);
                view_maps(
                    self.eval_views,
                    view,
                    &mut input,
                    self.size,
                    blocks.in_channels(),
                );
                let mut pooled = evaluation.pooled(input, chunk.len(), self.size)?;
                standardise(&mut pooled, self.input());
                let mut probabilities = head.logits(&pooled, chunk.len(), Threads::Pool);
                softmax_rows(&mut probabilities, classes);
                for (image, row) in probabilities.chunks_exact(classes).enumerate() {
                    let at = (image * views + view) * classes;
                    by_image[at..at + classes].copy_from_slice(row);
                }
            }
            scratch::recycle(cached);
            out.extend(
                data::average_views(&by_image, classes, views, views)
                    .into_iter()
                    .map(|p| p as f32),
            );
        }
        Ok(out)
    }

    /// Trains the remaining epochs (checkpoints into `run_dir` when given,
    /// epochs to `observer`), then scores the best epoch's blocks and head
    /// on the test split.
    fn fit(
        &mut self,
        run: Option<(&str, &Path)>,
        observer: &mut dyn RunObserver,
        progress: bool,
    ) -> Result<RunReport, TrainError> {
        let _scratch = ReleaseScratch;
        let data = self.data;
        let resumed_from = self.trainer.state.epochs_done;
        while self.trainer.is_active() {
            let train_loss = self.run_epoch(progress)?;
            if self.trainer.state.diverged.is_some() {
                break;
            }
            let (blocks, head) = match &self.averaged {
                Some(averaged) => (&averaged.blocks, averaged.head.clone()),
                None => (
                    &self.blocks,
                    self.trainer.evaluation_head()?.expect("f32 CPU head"),
                ),
            };
            let probabilities = self.probabilities(blocks, &head, &data.val.rows)?;
            let evaluation = split_evaluation(data, &data.val, "val", &probabilities)?;
            if !evaluation.finite {
                self.trainer.diverge(format!(
                    "its outputs on the val split stopped being finite after epoch {}; lower \
                     --lr or --blocks-lr",
                    self.trainer.state.epochs_done + 1
                ));
                break;
            }
            let mut metrics: BTreeMap<String, f64> = evaluation.metrics;
            metrics.insert("train/loss".into(), train_loss);
            if self.trainer.end_epoch(metrics)? {
                match &mut self.averaged {
                    Some(averaged) => {
                        self.best_blocks = Some(averaged.blocks.clone());
                        averaged.best_head = Some(averaged.head.clone());
                    }
                    None => self.best_blocks = Some(self.blocks.clone()),
                }
            }
            let done = self.trainer.state.epochs_done;
            observer.epoch(0, done - 1, &self.trainer.state.history[done - 1])?;
            if let Some((_, run_dir)) = run {
                let config = self.trainer.config.clone();
                checkpoint::save_if_due_with(run_dir, &config, &self.trainer, || {
                    self.checkpoint_tensors()
                })?;
            }
        }
        let run_id = run.map_or("", |(id, _)| id);
        if let Some(diverged) = self.trainer.divergence(run_id) {
            return Err(diverged);
        }
        self.trainer.restore_best()?;
        if let Some(best) = self.best_blocks.take() {
            self.blocks = best;
        }
        // The kept average is the run's head (written by `write_run`).
        if let Some(best) = self.averaged.as_ref().and_then(|a| a.best_head.as_ref()) {
            self.trainer.set_head_weights(best)?;
        }
        let head = self.trainer.evaluation_head()?.expect("f32 CPU head");
        let probabilities = self.probabilities(&self.blocks, &head, &data.test.rows)?;
        let test = split_evaluation(data, &data.test, "test", &probabilities)?;
        if !test.finite {
            return Err(TrainError::Diverged {
                run: run_id.to_string(),
                reason: "its outputs on the test split are not finite".into(),
            });
        }
        let memory = crate::memory::process_report();
        let state = &self.trainer.state;
        Ok(RunReport {
            run_id: run_id.to_string(),
            run_dir: run.map(|(_, dir)| dir.to_path_buf()).unwrap_or_default(),
            config_hash: self.trainer.config.config_hash_at(
                &data.dataset_name,
                data.dataset_version,
                &data.fingerprint,
            ),
            plan: self.trainer.plan,
            epochs_run: state.epochs_done,
            best_epoch: state.best_epoch,
            resumed_from_epoch: resumed_from,
            stopped_early: state.stopped_early,
            skipped_steps: state.skipped_steps,
            epochs: state.history.clone(),
            test: test.metrics,
            test_confusion_matrix: test.matrix,
            test_curves: binary_curves(data, &data.test, "test", &probabilities),
            peak_rss_bytes: memory.peak_rss_bytes.or_else(super::run::peak_rss_bytes),
            memory,
            blocks_precision: self.auto_precision,
        })
    }

    /// The trained (best) blocks as the run's blocks file holds them.
    fn fine_tuned(&self) -> FineTunedBlocks {
        FineTunedBlocks::new(
            self.blocks.clone(),
            BlocksInfo {
                layout: self.blocks.layout(),
                encoder: self.encoder.clone(),
                weights: self.weights.clone(),
                stride: self.data.features.maps()[self.map].stride,
                tiling: self
                    .data
                    .features
                    .metadata()
                    .get("tiling")
                    .and_then(|text| serde_json::from_str(text).ok()),
                views: self.eval_views,
                precision: self.blocks.precision(),
                pooling: self.blocks.pooling(),
            },
        )
    }

    /// The head's input standardisation.
    fn input(&self) -> Standardisation<'_> {
        Standardisation {
            mean: &self.input_mean,
            std: &self.input_std,
        }
    }
}

/// Micro-batches that fit `config.memory_budget_bytes`: what one image's
/// pass keeps for backward (measured on one map) and its gradients, beside
/// the runtime, the blocks (weights, gradients, two moments, the best copy)
/// and the head.
fn plan_memory(
    data: &TrainData,
    blocks: &TopBlocks,
    size: MapSize,
    config: &TrainConfig,
) -> Result<BatchPlan, TrainError> {
    let map_floats = blocks.in_channels() * size.pixels();
    let probe = blocks.forward(vec![0f32; map_floats], 1, size)?;
    // bf16 products convert their operands first: up to half an
    // activation's bytes more per image while one runs (and kept by the
    // scratch pool after).
    let conversions = match blocks.precision() {
        BlocksPrecision::F32 => 0,
        BlocksPrecision::Bf16 => probe.stored_bytes() / 2,
    };
    let per_example_bytes = 2 * probe.stored_bytes() + conversions + map_floats as u64 * 4;
    let parameters: u64 = blocks.parameters().iter().map(|p| p.len() as u64).sum();
    let classes = data.class_names.len();
    let head_parameters: u64 = {
        let mut inputs = blocks.feature_dim();
        config
            .head
            .layer_sizes(classes)
            .into_iter()
            .map(|outputs| {
                let n = (inputs * outputs + outputs) as u64;
                inputs = outputs;
                n
            })
            .sum()
    };
    // Weights, gradients, two moments and the best copy, and the average's
    // two copies under --ema.
    let copies = if config.unfreeze.is_some_and(|u| u.ema > 0.0) {
        7
    } else {
        5
    };
    let fixed_bytes = runtime_bytes(data) + parameters * 4 * copies + head_parameters * 4 * 9;
    let budget = config.memory_budget_bytes;
    let room = budget.saturating_sub(fixed_bytes) / per_example_bytes;
    if room == 0 {
        return Err(TrainError::Invalid(format!(
            "memory budget of {budget} bytes cannot fine-tune blocks {}..: they need {fixed_bytes} \
             bytes besides {per_example_bytes} bytes per image",
            blocks.after_block() + 1
        )));
    }
    let micro_batch = (room as usize).min(config.batch_size);
    Ok(BatchPlan {
        micro_batch,
        accumulation_steps: config.batch_size.div_ceil(micro_batch),
        fixed_bytes,
        per_example_bytes,
    })
}

fn epoch_bar(
    wanted: bool,
    steps: usize,
    epoch: usize,
    epochs: usize,
) -> Option<indicatif::ProgressBar> {
    use std::io::IsTerminal;
    if !wanted || !std::io::stderr().is_terminal() {
        return None;
    }
    Some(super::run::batch_bar(
        steps,
        format!("epoch {}/{epochs} (fine-tuning)", epoch + 1),
    ))
}

/// Observes nothing (`fit` outside a recorded run).
struct Unobserved;

impl RunObserver for Unobserved {
    fn epoch(&mut self, _: usize, _: usize, _: &BTreeMap<String, f64>) -> Result<(), TrainError> {
        Ok(())
    }
}

/// Empties the kernels' scratch pool when a fine-tuning ends, however it
/// ends: what the process does next (a sweep's next run, a head under its
/// own memory plan) does not carry the steps' buffers.
struct ReleaseScratch;

impl Drop for ReleaseScratch {
    fn drop(&mut self) {
        scratch::release();
    }
}

/// Fine-tunes `config.unfreeze`'s blocks of `encoder` with `config.head` on
/// `data` outside any run (benchmarks, library use): the report of the best
/// epoch on the test split, and the trained blocks.
pub fn fit(
    data: &TrainData,
    encoder: FinetuneEncoder,
    config: &TrainConfig,
) -> Result<(RunReport, FineTunedBlocks), TrainError> {
    let mut tuning = Finetuning::new(data, encoder, config, None)?;
    let report = tuning.fit(None, &mut Unobserved, false)?;
    Ok((report, tuning.fine_tuned()))
}

/// What a fine-tuning run says when it was asked for another device: its
/// blocks' step is host code (f32 CPU matmuls), so the run trains on the
/// CPU whatever `--device` names.
pub fn device_note(device: &Device) -> Option<String> {
    (!device.is_cpu()).then(|| {
        "note: --unfreeze-from trains the blocks and the head on the CPU (the \
         blocks' step has no GPU path yet); --device is not used by this run"
            .to_string()
    })
}

/// How `runs::train` loads the features of a fine-tuning run.
pub fn load_spatial(
    layout: &Layout,
    dataset: &str,
    fingerprint: Option<&str>,
    load: data::LoadConfig,
) -> Result<TrainData, TrainError> {
    data::load(
        layout,
        dataset,
        fingerprint,
        &data::LoadConfig {
            kind: Some(FeatureKind::Spatial),
            ..load
        },
    )
}

/// Trains `config` (with `unfreeze`) as a new run of `experiment` on
/// `data`, a spatial folder (see `check_folder`), recorded as classification
/// runs are, with the blocks file beside its head.
pub fn train(
    layout: &Layout,
    data: &TrainData,
    experiment: &str,
    config: TrainConfig,
    extra_params: &[(String, ParamValue)],
    options: &FitOptions,
) -> Result<RunReport, TrainError> {
    require_two_classes(data)?;
    let encoder = load_folder_encoder(data)?;
    let tuning = Finetuning::new(data, encoder.borrowed(), &config, None)?;
    let db = ExperimentsDb::open(layout)?;
    let mut inputs = run_inputs(data, &config);
    inputs.blocks_precision = tuning.auto_precision;
    let mut params = blocks_params(&tuning);
    params.extend(extra_params.iter().cloned());
    let handle = start(&db, experiment, &inputs, &params)?;
    run_and_finish(handle, tuning, options)
}

/// Continues killed fine-tuning run `run_id` from its newest checkpoint.
pub fn resume(
    layout: &Layout,
    run_id: &str,
    options: &FitOptions,
) -> Result<RunReport, TrainError> {
    let db = ExperimentsDb::open(layout)?;
    let (run_dir, inputs) = resumable_run(&db, run_id)?;
    let load = resume_load_config(&inputs);
    let data = load_spatial(layout, &inputs.dataset, Some(&inputs.fingerprint), load)?;
    let encoder = load_folder_encoder(&data)?;
    let mut tuning = Finetuning::new(
        &data,
        encoder.borrowed(),
        &inputs.config,
        inputs.blocks_precision,
    )?;
    tuning.restore(&run_dir)?;
    let handle = db.resume_run(run_id, tuning.trainer.state.epochs_done as u64)?;
    run_and_finish(handle, tuning, options)
}

/// The params that say which blocks a run trains, and in which precision
/// `--blocks-precision auto` trains them.
fn blocks_params(tuning: &Finetuning<'_>) -> Vec<(String, ParamValue)> {
    let blocks = &tuning.blocks;
    let first = blocks.after_block() + 1;
    let last = blocks.after_block() + blocks.n_blocks();
    let mut params = vec![(
        "trained_blocks".to_string(),
        format!("{first}-{last},head_conv").as_str().into(),
    )];
    if let Some(chosen) = tuning.auto_precision {
        params.push((
            "blocks_precision_chosen".to_string(),
            chosen.precision.name().into(),
        ));
    }
    params
}

fn run_and_finish(
    handle: RunHandle,
    mut tuning: Finetuning<'_>,
    options: &FitOptions,
) -> Result<RunReport, TrainError> {
    let run_dir = handle.dir().to_path_buf();
    let run_id = handle.id().to_string();
    let fitted = {
        let handles = [handle];
        let fitted = tuning.fit(
            Some((run_id.as_str(), run_dir.as_path())),
            &mut EpochLogger { handles: &handles },
            options.progress,
        );
        let [handle] = handles;
        (handle, fitted)
    };
    let (handle, fitted) = fitted;
    let report = match fitted {
        Ok(report) => report,
        Err(error @ TrainError::Diverged { .. }) => return Err(fail_run(handle, error)?),
        // Other errors drop the handle, which records the run FAILED.
        Err(error) => return Err(error),
    };
    let blocks = tuning.fine_tuned();
    let path = handle.folder().blocks();
    crate::atomic::write_file(&path, &blocks.to_bytes()?).map_err(TrainError::io(&path))?;
    write_run(
        &run_dir,
        &report,
        tuning.data,
        tuning.input(),
        &tuning.trainer,
    )?;
    let config = tuning.trainer.config.clone();
    finish_run(handle, &report, &config, tuning.data)?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cpu_run_has_no_device_note() {
        // The note is for runs asked to train on another device (`--device
        // cuda`), which a CPU-only build cannot create; the CPU says nothing.
        assert_eq!(device_note(&Device::Cpu), None);
    }
}

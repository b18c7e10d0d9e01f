//! What one head's training run is: the head, the optimiser, the schedule,
//! precision, imbalance handling, checkpoints and the seed. Stored with every
//! run (so `--resume` and sweeps can rebuild it) and hashed into the config
//! hash that identifies a run's configuration.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::TrainError;
use super::anomaly::AnomalyConfig;
use super::schedule::Schedule;
use crate::encoders::ViewSet;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Activation {
    Relu,
    Gelu,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum HeadConfig {
    Linear,
    Mlp {
        hidden: Vec<usize>,
        dropout: f64,
        activation: Activation,
    },
}

impl HeadConfig {
    pub fn name(&self) -> &'static str {
        match self {
            HeadConfig::Linear => "linear",
            HeadConfig::Mlp { .. } => "mlp",
        }
    }

    /// Output sizes of each layer for `classes` outputs.
    pub fn layer_sizes(&self, classes: usize) -> Vec<usize> {
        let mut sizes = match self {
            HeadConfig::Linear => Vec::new(),
            HeadConfig::Mlp { hidden, .. } => hidden.clone(),
        };
        sizes.push(classes);
        sizes
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Optimizer {
    AdamW,
    /// SGD with this momentum.
    Sgd {
        momentum: f64,
    },
}

/// The dtype of the forward and backward pass; master weights stay f32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    F32,
    Bf16,
    /// f16 with dynamic loss scaling.
    F16,
}

impl Precision {
    pub fn dtype(self) -> candle_core::DType {
        match self {
            Precision::F32 => candle_core::DType::F32,
            Precision::Bf16 => candle_core::DType::BF16,
            Precision::F16 => candle_core::DType::F16,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
            Precision::F16 => "f16",
        }
    }

    pub fn parse(text: &str) -> Result<Self, TrainError> {
        match text {
            "f32" => Ok(Precision::F32),
            "bf16" => Ok(Precision::Bf16),
            "f16" => Ok(Precision::F16),
            other => Err(TrainError::Invalid(format!(
                "unknown precision {other:?}: use f32, bf16 or f16"
            ))),
        }
    }
}

/// The operands of the fine-tuned blocks' matrix products
/// (`--blocks-precision`): f32, or bf16 with f32 sums (mixed precision:
/// weights, moments, gradients' sums and every other loop stay f32; bf16
/// keeps f32's exponent range, so no loss scaling).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BlocksPrecision {
    #[default]
    F32,
    Bf16,
}

impl BlocksPrecision {
    pub fn name(self) -> &'static str {
        match self {
            BlocksPrecision::F32 => "f32",
            BlocksPrecision::Bf16 => "bf16",
        }
    }

    pub fn parse(text: &str) -> Result<Self, TrainError> {
        match text {
            "f32" => Ok(BlocksPrecision::F32),
            "bf16" => Ok(BlocksPrecision::Bf16),
            other => Err(TrainError::Invalid(format!(
                "unknown blocks precision {other:?}: use f32 or bf16"
            ))),
        }
    }

    pub fn is_f32(&self) -> bool {
        *self == BlocksPrecision::F32
    }
}

/// What `--blocks-precision` asks for: one precision, or `auto`, which
/// times a training micro-batch of the blocks in each at the run's start
/// and takes bf16 only where it is clearly faster (AVX-512 BF16 without AMX
/// tiles, e.g. AMD Zen 4; on Intel Xeons with AMX our bf16 products are
/// slower than f32). The run records what it took
/// (`RunInputs::blocks_precision`, param `blocks_precision_chosen`) and a
/// resume repeats it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BlocksPrecisionChoice {
    #[default]
    F32,
    Bf16,
    Auto,
}

impl From<BlocksPrecision> for BlocksPrecisionChoice {
    fn from(precision: BlocksPrecision) -> Self {
        match precision {
            BlocksPrecision::F32 => BlocksPrecisionChoice::F32,
            BlocksPrecision::Bf16 => BlocksPrecisionChoice::Bf16,
        }
    }
}

impl BlocksPrecisionChoice {
    pub fn name(self) -> &'static str {
        self.fixed().map_or("auto", BlocksPrecision::name)
    }

    pub fn parse(text: &str) -> Result<Self, TrainError> {
        if text == "auto" {
            return Ok(BlocksPrecisionChoice::Auto);
        }
        BlocksPrecision::parse(text).map(Self::from).map_err(|_| {
            TrainError::Invalid(format!(
                "unknown blocks precision {text:?}: use f32, bf16 or auto"
            ))
        })
    }

    /// The precision asked for; None under `auto`.
    pub fn fixed(self) -> Option<BlocksPrecision> {
        match self {
            BlocksPrecisionChoice::F32 => Some(BlocksPrecision::F32),
            BlocksPrecisionChoice::Bf16 => Some(BlocksPrecision::Bf16),
            BlocksPrecisionChoice::Auto => None,
        }
    }

    pub fn is_f32(&self) -> bool {
        *self == BlocksPrecisionChoice::F32
    }
}

/// How the trained head convolution's output map becomes the head's input
/// (`--blocks-pool`): each channel's mean over the map (as the encoder
/// pools), or its mean and its maximum side by side (`mean-max`, twice the
/// features: a crack a few pixels wide moves its channels' maximum while the
/// mean spreads it over the whole cell).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BlocksPooling {
    #[default]
    Mean,
    MeanMax,
}

impl BlocksPooling {
    pub fn name(self) -> &'static str {
        match self {
            BlocksPooling::Mean => "mean",
            BlocksPooling::MeanMax => "mean-max",
        }
    }

    pub fn parse(text: &str) -> Result<Self, TrainError> {
        match text {
            "mean" => Ok(BlocksPooling::Mean),
            "mean-max" => Ok(BlocksPooling::MeanMax),
            other => Err(TrainError::Invalid(format!(
                "unknown blocks pooling {other:?}: use mean or mean-max"
            ))),
        }
    }

    pub fn is_mean(&self) -> bool {
        *self == BlocksPooling::Mean
    }

    /// Pooled features per channel of the head convolution.
    pub fn parts(self) -> usize {
        match self {
            BlocksPooling::Mean => 1,
            BlocksPooling::MeanMax => 2,
        }
    }
}

/// Mixing of the training maps (`--mix-maps`): each batch's maps are
/// paired with a shuffled partner from the same batch, mixed with a
/// weight drawn from Beta(alpha, alpha) per batch, and the
/// targets mixed with the same weight (mixup on block K's output, as
/// manifold mixup does; CutMix pastes a box of the partner's map whose
/// share of the map's pixels is the partner's weight). Evaluation and
/// prediction read the maps unmixed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum MapMix {
    #[default]
    None,
    Mixup {
        alpha: f64,
    },
    Cutmix {
        alpha: f64,
    },
}

impl MapMix {
    /// `none`, `mixup:ALPHA` or `cutmix:ALPHA`, as `--mix-maps` takes it.
    pub fn parse(text: &str) -> Result<Self, TrainError> {
        let bad = || {
            TrainError::Invalid(format!(
                "unknown map mixing {text:?}: use none, mixup:ALPHA or cutmix:ALPHA with ALPHA \
                 a positive number (e.g. mixup:0.2, cutmix:1)"
            ))
        };
        if text == "none" {
            return Ok(MapMix::None);
        }
        let (kind, alpha) = text.split_once(':').ok_or_else(bad)?;
        let alpha: f64 = alpha.trim().parse().map_err(|_| bad())?;
        if !(alpha.is_finite() && alpha > 0.0) {
            return Err(bad());
        }
        match kind {
            "mixup" => Ok(MapMix::Mixup { alpha }),
            "cutmix" => Ok(MapMix::Cutmix { alpha }),
            _ => Err(bad()),
        }
    }

    /// The text `parse` reads back.
    pub fn name(&self) -> String {
        match self {
            MapMix::None => "none".into(),
            MapMix::Mixup { alpha } => format!("mixup:{alpha}"),
            MapMix::Cutmix { alpha } => format!("cutmix:{alpha}"),
        }
    }

    pub fn is_none(&self) -> bool {
        *self == MapMix::None
    }
}

/// Per-class loss weights.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum ClassWeights {
    None,
    /// n / (classes * count of the class) over the training split, as scikit-learn's "balanced".
    Balanced,
    /// Explicit weights in class-index order (read from a file by the caller).
    Given {
        weights: Vec<f64>,
    },
}

impl ClassWeights {
    pub fn name(&self) -> &'static str {
        match self {
            ClassWeights::None => "none",
            ClassWeights::Balanced => "balanced",
            ClassWeights::Given { .. } => "file",
        }
    }
}

/// How training examples are drawn each epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Sampler {
    /// Every training example once per epoch, shuffled.
    Uniform,
    /// As many draws as examples, with replacement, each class equally likely.
    Balanced,
}

impl Sampler {
    pub fn name(self) -> &'static str {
        match self {
            Sampler::Uniform => "uniform",
            Sampler::Balanced => "balanced",
        }
    }
}

/// Which view of an image a training step sees when its feature folder
/// holds several (`enqueue --views`); one folder of one view ignores it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TrainViews {
    /// One view per image and epoch, drawn from (seed, epoch, image): an
    /// epoch costs as much as with one view, and a resumed run draws the
    /// same. Anomaly scorers fit on every view instead.
    #[default]
    Sample,
    /// View 0 only (the image as it is).
    First,
}

impl TrainViews {
    pub fn name(self) -> &'static str {
        match self {
            TrainViews::Sample => "sample",
            TrainViews::First => "first",
        }
    }

    pub fn is_sample(&self) -> bool {
        *self == TrainViews::Sample
    }
}

/// How evaluation and prediction read an image's views when its feature
/// folder holds several (`enqueue --views`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EvalViews {
    /// The mean of the class probabilities (anomaly scores) over every
    /// view: test-time augmentation.
    #[default]
    Mean,
    /// View 0 only.
    First,
}

impl EvalViews {
    pub fn name(self) -> &'static str {
        match self {
            EvalViews::Mean => "mean",
            EvalViews::First => "first",
        }
    }

    pub fn is_mean(&self) -> bool {
        *self == EvalViews::Mean
    }

    /// How many of an image's `views` rows, from view 0, an answer averages.
    pub fn rows_used(self, views: usize) -> usize {
        match self {
            EvalViews::Mean => views.max(1),
            EvalViews::First => 1,
        }
    }
}

/// The kind of run: a classifier head over pooled features (default), an
/// anomaly scorer fitted on normal images only, or a per-pixel head over
/// spatial features (`enqueue --spatial`). Its settings are a [`TaskConfig`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Task {
    #[default]
    Classify,
    Anomaly,
    Segment,
}

impl Task {
    pub fn name(self) -> &'static str {
        match self {
            Task::Classify => "classify",
            Task::Anomaly => "anomaly",
            Task::Segment => "segment",
        }
    }

    /// Serde helper: the default task is left out of stored configs, so
    /// classification config hashes stay what they were before tasks existed.
    pub fn is_classify(&self) -> bool {
        *self == Task::Classify
    }
}

/// What a run learns, with the settings only that task has: the anomaly
/// scorer's settings exist exactly when the task is anomaly.
#[derive(Debug, Clone, Default, PartialEq)]
pub enum TaskConfig {
    #[default]
    Classify,
    Segment,
    Anomaly(AnomalyConfig),
}

impl TaskConfig {
    pub fn kind(&self) -> Task {
        match self {
            TaskConfig::Classify => Task::Classify,
            TaskConfig::Segment => Task::Segment,
            TaskConfig::Anomaly(_) => Task::Anomaly,
        }
    }

    pub fn name(&self) -> &'static str {
        self.kind().name()
    }

    /// The anomaly scorer's settings of an anomaly run.
    pub fn anomaly(&self) -> Option<&AnomalyConfig> {
        match self {
            TaskConfig::Anomaly(anomaly) => Some(anomaly),
            TaskConfig::Classify | TaskConfig::Segment => None,
        }
    }
}

impl PartialEq<Task> for TaskConfig {
    fn eq(&self, task: &Task) -> bool {
        self.kind() == *task
    }
}

/// Partial fine-tuning (`train --unfreeze-from K`): the encoder blocks after
/// block K train with the head, from their pretrained weights, with their
/// own AdamW rate and decoupled weight decay (the head's schedule scales
/// both rates alike). The run reads a spatial folder whose stride-4, -8 or
/// -16 map is block K's output (`train::finetune`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Unfreeze {
    pub after_block: usize,
    pub blocks_learning_rate: f64,
    pub blocks_weight_decay: f64,
    /// Stochastic depth of the trained blocks (`--blocks-drop-path`): the
    /// rate at the encoder's last block, scaled down linearly to the first
    /// (`TopBlocks::draw_drop_path`). 0 (off) is left out of stored configs,
    /// which stay as before it existed.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub drop_path: f64,
    /// The blocks' matrix products (`--blocks-precision`); f32 is left out
    /// of stored configs, which stay as before it existed (`f32` and `bf16`
    /// are written as before `auto` existed).
    #[serde(default, skip_serializing_if = "BlocksPrecisionChoice::is_f32")]
    pub precision: BlocksPrecisionChoice,
    /// How the head convolution's map is pooled (`--blocks-pool`); mean is
    /// left out of stored configs, which stay as before it existed.
    #[serde(default, skip_serializing_if = "BlocksPooling::is_mean")]
    pub pooling: BlocksPooling,
    /// Mixing of the training maps (`--mix-maps`); none is left out of
    /// stored configs, which stay as before it existed.
    #[serde(default, skip_serializing_if = "MapMix::is_none")]
    pub mix: MapMix,
    /// Decay of the exponential moving average of the blocks' and the
    /// head's weights (`--ema`) that evaluation, the kept epoch and the
    /// run's files use; 0 (off) is left out of stored configs, which stay
    /// as before it existed.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub ema: f64,
}

fn is_zero(value: &f64) -> bool {
    *value == 0.0
}

impl Unfreeze {
    /// `--blocks-lr`'s default: the best of 3e-5, 1e-4 and 3e-4 on elpv
    /// (BENCHMARKS.md, partial fine-tuning).
    pub const DEFAULT_LEARNING_RATE: f64 = 1e-4;
    /// `--blocks-weight-decay`'s default.
    pub const DEFAULT_WEIGHT_DECAY: f64 = 0.01;
}

/// Early stopping on a validation metric (higher is better; `*/loss` is negated).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EarlyStopping {
    pub patience: usize,
}

/// One run's settings. Stored (`config.json`, model cards) and hashed as
/// [`StoredConfig`], the shape runs have always been written in.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(into = "StoredConfig", try_from = "StoredConfig")]
pub struct TrainConfig {
    /// `task = "anomaly"` or `"segment"` in TOML, `--task ...` on the command
    /// line, with the anomaly scorer's settings.
    pub task: TaskConfig,
    pub head: HeadConfig,
    pub epochs: usize,
    pub learning_rate: f64,
    pub weight_decay: f64,
    pub optimizer: Optimizer,
    pub schedule: Schedule,
    pub batch_size: usize,
    pub memory_budget_bytes: u64,
    pub gradient_clip: Option<f64>,
    pub label_smoothing: f64,
    /// The validation metric that picks the kept head, drives early stopping
    /// and reduce-on-plateau, e.g. `val/accuracy`, `val/macro_f1`, `val/loss`.
    pub monitor: String,
    pub early_stopping: Option<EarlyStopping>,
    pub precision: Precision,
    pub class_weights: ClassWeights,
    pub sampler: Sampler,
    /// Write a resumable checkpoint every N epochs (0: never).
    pub checkpoint_every: usize,
    pub seed: u64,
    /// Renames or merges classes before training (e.g. every defect grade to
    /// "defective"); classes not named keep their name.
    pub label_map: BTreeMap<String, String>,
    /// Start from this run's head weights (`train --init-from`) instead of
    /// the seeded initialisation; see `warm`.
    pub init_from: Option<String>,
    /// Which view a step sees in a folder of several (`--train-views`).
    pub train_views: TrainViews,
    /// How evaluation and prediction read an image's views (`--eval-views`).
    pub eval_views: EvalViews,
    /// Encoder blocks trained with the head (`--unfreeze-from`); None: the
    /// encoder stays frozen.
    pub unfreeze: Option<Unfreeze>,
    /// Fine-tuning: each training map seen flipped or rotated
    /// (`--augment-maps`); `1`: as cached.
    pub augment_maps: ViewSet,
}

/// `TrainConfig` as runs store it: the task's kind, and the anomaly
/// settings beside the other fields (last), absent for other tasks. The
/// stored JSON and with it every config hash stay as before `TaskConfig`.
#[derive(Serialize, Deserialize)]
struct StoredConfig {
    #[serde(default, skip_serializing_if = "Task::is_classify")]
    task: Task,
    head: HeadConfig,
    epochs: usize,
    learning_rate: f64,
    weight_decay: f64,
    optimizer: Optimizer,
    schedule: Schedule,
    batch_size: usize,
    memory_budget_bytes: u64,
    gradient_clip: Option<f64>,
    label_smoothing: f64,
    monitor: String,
    early_stopping: Option<EarlyStopping>,
    precision: Precision,
    class_weights: ClassWeights,
    sampler: Sampler,
    checkpoint_every: usize,
    seed: u64,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    label_map: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    init_from: Option<String>,
    // The defaults are left out: stored configs and their hashes stay as
    // before `--views`.
    #[serde(default, skip_serializing_if = "TrainViews::is_sample")]
    train_views: TrainViews,
    #[serde(default, skip_serializing_if = "EvalViews::is_mean")]
    eval_views: EvalViews,
    // Absent for frozen encoders: their configs and hashes stay as before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    unfreeze: Option<Unfreeze>,
    #[serde(default, skip_serializing_if = "ViewSet::is_single")]
    augment_maps: ViewSet,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    anomaly: Option<AnomalyConfig>,
}

/// Moves the fields `TrainConfig` and `StoredConfig` share from one to the other.
macro_rules! shared_fields {
    ($from:expr, $to:ident { $($field:ident: $value:expr),* $(,)? }) => {{
        let from = $from;
        $to {
            $($field: $value,)*
            head: from.head,
            epochs: from.epochs,
            learning_rate: from.learning_rate,
            weight_decay: from.weight_decay,
            optimizer: from.optimizer,
            schedule: from.schedule,
            batch_size: from.batch_size,
            memory_budget_bytes: from.memory_budget_bytes,
            gradient_clip: from.gradient_clip,
            label_smoothing: from.label_smoothing,
            monitor: from.monitor,
            early_stopping: from.early_stopping,
            precision: from.precision,
            class_weights: from.class_weights,
            sampler: from.sampler,
            checkpoint_every: from.checkpoint_every,
            seed: from.seed,
            label_map: from.label_map,
            init_from: from.init_from,
            train_views: from.train_views,
            eval_views: from.eval_views,
            unfreeze: from.unfreeze,
            augment_maps: from.augment_maps,
        }
    }};
}

impl From<TrainConfig> for StoredConfig {
    fn from(mut config: TrainConfig) -> Self {
        let task = std::mem::take(&mut config.task);
        let kind = task.kind();
        let settings = match task {
            TaskConfig::Anomaly(anomaly) => Some(anomaly),
            TaskConfig::Classify | TaskConfig::Segment => None,
        };
        shared_fields!(
            config,
            StoredConfig {
                task: kind,
                anomaly: settings,
            }
        )
    }
}

impl TryFrom<StoredConfig> for TrainConfig {
    type Error = String;

    fn try_from(mut stored: StoredConfig) -> Result<Self, String> {
        let task_config = match (stored.task, stored.anomaly.take()) {
            (Task::Anomaly, Some(anomaly)) => TaskConfig::Anomaly(anomaly),
            (Task::Anomaly, None) => {
                return Err("task anomaly needs its settings (normal labels, scorer)".into());
            }
            (task @ (Task::Classify | Task::Segment), Some(_)) => {
                return Err(format!("anomaly settings given for task {}", task.name()));
            }
            (Task::Classify, None) => TaskConfig::Classify,
            (Task::Segment, None) => TaskConfig::Segment,
        };
        Ok(shared_fields!(stored, TrainConfig { task: task_config }))
    }
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            task: TaskConfig::Classify,
            head: HeadConfig::Linear,
            epochs: 20,
            learning_rate: 1e-3,
            weight_decay: 1e-4,
            optimizer: Optimizer::AdamW,
            schedule: Schedule::Constant,
            batch_size: 256,
            memory_budget_bytes: 4 << 30,
            gradient_clip: None,
            label_smoothing: 0.0,
            monitor: "val/accuracy".into(),
            early_stopping: None,
            precision: Precision::F32,
            class_weights: ClassWeights::None,
            sampler: Sampler::Uniform,
            checkpoint_every: 1,
            seed: 0,
            label_map: BTreeMap::new(),
            init_from: None,
            train_views: TrainViews::Sample,
            eval_views: EvalViews::Mean,
            unfreeze: None,
            augment_maps: ViewSet::Single,
        }
    }
}

impl TrainConfig {
    /// Refuses settings no run can use, naming the value.
    pub fn validate(&self) -> Result<(), TrainError> {
        let bad = |message: String| Err(TrainError::Invalid(message));
        if self.epochs == 0 {
            return bad("epochs must be at least 1".into());
        }
        if self.batch_size == 0 {
            return bad("batch size must be at least 1".into());
        }
        if !(self.learning_rate.is_finite() && self.learning_rate > 0.0) {
            return bad(format!(
                "learning rate {} must be positive",
                self.learning_rate
            ));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return bad(format!(
                "weight decay {} must be zero or positive",
                self.weight_decay
            ));
        }
        if !(0.0..1.0).contains(&self.label_smoothing) {
            return bad(format!(
                "label smoothing {} must be in [0, 1)",
                self.label_smoothing
            ));
        }
        if let Optimizer::Sgd { momentum } = self.optimizer
            && !(0.0..1.0).contains(&momentum)
        {
            return bad(format!("momentum {momentum} must be in [0, 1)"));
        }
        if let Some(clip) = self.gradient_clip
            && !(clip.is_finite() && clip > 0.0)
        {
            return bad(format!("gradient clip {clip} must be positive"));
        }
        if let HeadConfig::Mlp {
            hidden, dropout, ..
        } = &self.head
        {
            if hidden.is_empty() || hidden.contains(&0) {
                return bad(format!(
                    "MLP hidden sizes {hidden:?} must be one or more positive sizes"
                ));
            }
            if !(0.0..1.0).contains(dropout) {
                return bad(format!("dropout {dropout} must be in [0, 1)"));
            }
        }
        if let TaskConfig::Anomaly(anomaly) = &self.task {
            anomaly.validate()?;
        }
        if let Some(unfreeze) = &self.unfreeze {
            self.validate_unfreeze(unfreeze)?;
        } else if !self.augment_maps.is_single() {
            return bad(format!(
                "--augment-maps {} applies to --unfreeze-from K (the maps fine-tuned blocks read)",
                self.augment_maps
            ));
        }
        if !self.monitor.starts_with("val/") {
            return bad(format!(
                "monitor {} must be a validation metric such as val/accuracy",
                self.monitor
            ));
        }
        if let ClassWeights::Given { weights } = &self.class_weights
            && weights.iter().any(|w| !(w.is_finite() && *w >= 0.0))
        {
            return bad(format!(
                "class weights {weights:?} must be finite and non-negative"
            ));
        }
        Ok(())
    }

    /// What partial fine-tuning supports: a classifier trained in f32 with
    /// AdamW, without gradient clipping or a warm start (the blocks' step
    /// has no loss scaling, and a head trained on frozen features would
    /// start the blocks elsewhere than where its inputs came from).
    fn validate_unfreeze(&self, unfreeze: &Unfreeze) -> Result<(), TrainError> {
        let bad = |message: String| Err(TrainError::Invalid(message));
        let rate = unfreeze.blocks_learning_rate;
        if !(rate.is_finite() && rate > 0.0) {
            return bad(format!("blocks learning rate {rate} must be positive"));
        }
        let decay = unfreeze.blocks_weight_decay;
        if !(decay.is_finite() && decay >= 0.0) {
            return bad(format!(
                "blocks weight decay {decay} must be zero or positive"
            ));
        }
        let drop_path = unfreeze.drop_path;
        if !(0.0..1.0).contains(&drop_path) {
            return bad(format!(
                "blocks drop-path rate {drop_path} must be in [0, 1)"
            ));
        }
        let ema = unfreeze.ema;
        if !(0.0..1.0).contains(&ema) {
            return bad(format!(
                "weight average decay {ema} must be in [0, 1) (0: off; 0.998 averages about \
                 the last 500 steps)"
            ));
        }
        let k = unfreeze.after_block;
        if self.task != Task::Classify {
            return bad(format!(
                "--unfreeze-from {k} trains encoder blocks with a classification head; task {} \
                 keeps the encoder frozen",
                self.task.name()
            ));
        }
        if self.precision != Precision::F32 {
            return bad(format!(
                "--unfreeze-from {k} trains the head in f32; --precision {} applies to heads \
                 on frozen features (--blocks-precision bf16 runs the blocks' products in bf16)",
                self.precision.name()
            ));
        }
        if self.optimizer != Optimizer::AdamW {
            return bad(format!(
                "--unfreeze-from {k} trains with AdamW (the blocks' optimiser); --optimizer sgd \
                 applies to heads on frozen features"
            ));
        }
        if let Some(clip) = self.gradient_clip {
            return bad(format!(
                "--unfreeze-from {k}: --clip-grad-norm {clip} is not supported with trained \
                 encoder blocks"
            ));
        }
        if let Some(source) = &self.init_from {
            return bad(format!(
                "--unfreeze-from {k}: --init-from {source} starts a head trained on frozen \
                 features; a fine-tuned run starts its head and blocks together"
            ));
        }
        Ok(())
    }

    /// sha256 of the canonical JSON of this config plus the feature set it
    /// trains on: equal hashes mean the same run would be repeated.
    pub fn config_hash(&self, dataset: &str, fingerprint: &str) -> String {
        self.config_hash_at(dataset, 1, fingerprint)
    }

    /// `config_hash` on a dataset's manifest version: a grown dataset is new
    /// training data, so its runs are not the earlier version's (version 1
    /// hashes as before versions existed, keeping recorded hashes valid).
    pub fn config_hash_at(&self, dataset: &str, version: u32, fingerprint: &str) -> String {
        let canonical = if version <= 1 {
            serde_json::json!({
                "config": self,
                "dataset": dataset,
                "fingerprint": fingerprint,
            })
        } else {
            serde_json::json!({
                "config": self,
                "dataset": dataset,
                "dataset_version": version,
                "fingerprint": fingerprint,
            })
        };
        crate::digest::sha256_hex(canonical.to_string().as_bytes())[..16].to_string()
    }
}

/// Reads per-class loss weights from a file: JSON (`{"class": weight}`) or
/// lines of `class,weight` (a header line is allowed). Every class needs a
/// weight; unknown classes are refused.
pub fn read_class_weights(
    path: &std::path::Path,
    class_names: &[String],
) -> Result<Vec<f64>, TrainError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        TrainError::Invalid(format!("cannot read class weights {}: {e}", path.display()))
    })?;
    let mut given: Vec<(String, f64, String)> = Vec::new();
    if text.trim_start().starts_with('{') {
        let map: std::collections::BTreeMap<String, f64> =
            serde_json::from_str(&text).map_err(|e| {
                TrainError::Invalid(format!(
                    "class weights {}: not a JSON object of numbers: {e}",
                    path.display()
                ))
            })?;
        given.extend(
            map.into_iter()
                .map(|(k, v)| (k.clone(), v, format!("key {k:?}"))),
        );
    } else {
        for (number, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let Some((class, weight)) = line.rsplit_once([',', '\t']) else {
                return Err(TrainError::Invalid(format!(
                    "class weights {} line {}: expected class,weight, got {line:?}",
                    path.display(),
                    number + 1
                )));
            };
            match weight.trim().parse::<f64>() {
                Ok(w) => given.push((class.trim().to_string(), w, format!("line {}", number + 1))),
                // A first line that does not parse is a header.
                Err(_) if given.is_empty() && number == 0 => continue,
                Err(_) => {
                    return Err(TrainError::Invalid(format!(
                        "class weights {} line {}: weight {:?} is not a number",
                        path.display(),
                        number + 1,
                        weight.trim()
                    )));
                }
            }
        }
    }
    let mut weights = vec![None; class_names.len()];
    for (class, weight, place) in given {
        let Some(index) = class_names.iter().position(|c| *c == class) else {
            return Err(TrainError::Invalid(format!(
                "class weights {} {place}: unknown class {class:?}; classes are {}",
                path.display(),
                class_names.join(", ")
            )));
        };
        weights[index] = Some(weight);
    }
    let missing: Vec<&str> = class_names
        .iter()
        .zip(&weights)
        .filter(|(_, w)| w.is_none())
        .map(|(c, _)| c.as_str())
        .collect();
    if !missing.is_empty() {
        return Err(TrainError::Invalid(format!(
            "class weights {}: no weight for class {}",
            path.display(),
            missing.join(", ")
        )));
    }
    Ok(weights.into_iter().map(|w| w.expect("checked")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Configs as main (fa5bffa, before `TaskConfig`) serialised them, with
    /// the config hashes main computed for them on dataset `elpv`, features
    /// `fp0123`, at dataset version 1 and 3 (printed by that commit's
    /// `TrainConfig` for a classifier, a segmentation head, an image-level
    /// and a patch-level anomaly scorer). Runs written by main must read
    /// back as the same config, store the same JSON and hash the same.
    const STORED_BY_MAIN: [(&str, &str, &str); 4] = [
        (
            r#"{"head":{"kind":"mlp","hidden":[64,32],"dropout":0.25,"activation":"gelu"},"epochs":20,"learning_rate":0.001,"weight_decay":0.0001,"optimizer":{"kind":"sgd","momentum":0.8},"schedule":{"kind":"cosine","warmup_steps":10},"batch_size":256,"memory_budget_bytes":4294967296,"gradient_clip":1.5,"label_smoothing":0.0,"monitor":"val/accuracy","early_stopping":{"patience":4},"precision":"f32","class_weights":{"kind":"given","weights":[1.0,2.5]},"sampler":"balanced","checkpoint_every":1,"seed":7,"label_map":{"a":"b"},"init_from":"20260101-000000-abcd"}"#,
            "f044bd134cdd37c8",
            "1b3f03568ac2cf61",
        ),
        (
            r#"{"task":"segment","head":{"kind":"linear"},"epochs":20,"learning_rate":0.001,"weight_decay":0.0001,"optimizer":{"kind":"adamw"},"schedule":{"kind":"reduce_on_plateau","patience":3,"factor":0.1},"batch_size":256,"memory_budget_bytes":4294967296,"gradient_clip":null,"label_smoothing":0.0,"monitor":"val/dice","early_stopping":null,"precision":"bf16","class_weights":{"kind":"balanced"},"sampler":"uniform","checkpoint_every":1,"seed":0}"#,
            "82e8fec17a77d6bd",
            "fca6a26d32061b68",
        ),
        (
            r#"{"task":"anomaly","head":{"kind":"linear"},"epochs":20,"learning_rate":0.001,"weight_decay":0.0001,"optimizer":{"kind":"adamw"},"schedule":{"kind":"constant"},"batch_size":256,"memory_budget_bytes":4294967296,"gradient_clip":null,"label_smoothing":0.0,"monitor":"val/accuracy","early_stopping":null,"precision":"f32","class_weights":{"kind":"none"},"sampler":"uniform","checkpoint_every":1,"seed":0,"anomaly":{"normal_labels":["0.0"],"anomaly_labels":["1.0"],"scorer":{"kind":"knn","k":5,"coreset":{"fraction":0.1}}}}"#,
            "6c4b2e2c7c44839d",
            "9fd8594618850e7e",
        ),
        (
            r#"{"task":"anomaly","head":{"kind":"linear"},"epochs":20,"learning_rate":0.001,"weight_decay":0.0001,"optimizer":{"kind":"adamw"},"schedule":{"kind":"step","every_epochs":10,"gamma":0.1},"batch_size":256,"memory_budget_bytes":4294967296,"gradient_clip":null,"label_smoothing":0.0,"monitor":"val/accuracy","early_stopping":null,"precision":"f32","class_weights":{"kind":"none"},"sampler":"uniform","checkpoint_every":1,"seed":0,"anomaly":{"normal_labels":["good","ok"],"scorer":{"kind":"mahalanobis"},"patch":{"channels":100,"heatmap_sigma":4.0}}}"#,
            "c741f08b6ab62ee8",
            "491363de4d364467",
        ),
    ];

    #[test]
    fn configs_stored_by_main_read_store_and_hash_as_main_did() {
        for (json, hash_v1, hash_v3) in STORED_BY_MAIN {
            let config: TrainConfig = serde_json::from_str(json).unwrap();
            config.validate().unwrap();
            assert_eq!(serde_json::to_string(&config).unwrap(), json);
            assert_eq!(config.config_hash("elpv", "fp0123"), hash_v1, "{json}");
            assert_eq!(
                config.config_hash_at("elpv", 3, "fp0123"),
                hash_v3,
                "{json}"
            );
        }
    }

    #[test]
    fn anomaly_settings_exist_exactly_when_the_task_is_anomaly() {
        let read = |json: &str| serde_json::from_str::<TrainConfig>(json);
        let value = |json: &str| serde_json::from_str::<serde_json::Value>(json).unwrap();
        let (classify, segment, patch) = (
            STORED_BY_MAIN[0].0,
            STORED_BY_MAIN[1].0,
            STORED_BY_MAIN[3].0,
        );
        assert_eq!(read(classify).unwrap().task, TaskConfig::Classify);
        assert_eq!(read(segment).unwrap().task, TaskConfig::Segment);
        let config = read(patch).unwrap();
        assert_eq!(config.task, Task::Anomaly);
        let anomaly = config.task.anomaly().expect("anomaly settings");
        assert_eq!(anomaly.normal_labels, ["good", "ok"]);
        assert_eq!(anomaly.patch.as_ref().unwrap().channels, Some(100));

        // Stored configs whose task and settings disagree are refused.
        let mut mixed = value(segment);
        mixed["anomaly"] = value(patch)["anomaly"].clone();
        let error = read(&mixed.to_string()).unwrap_err().to_string();
        assert!(
            error.contains("anomaly settings given for task segment"),
            "{error}"
        );
        let mut bare = value(patch);
        bare.as_object_mut().unwrap().remove("anomaly");
        let error = read(&bare.to_string()).unwrap_err().to_string();
        assert!(error.contains("task anomaly needs its settings"), "{error}");
    }
}

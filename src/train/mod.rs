//! Head-only training on cached features (issue 7).
//!
//! `config` says what a run is, `data` validates and gathers memory-mapped
//! rows, `head` is the model, `trainer` holds one head's optimisation state,
//! `run` drives one or many heads over shared batches and writes run folders,
//! `host` is the f32 CPU step without an autograd graph, `blocks` the
//! trainable top blocks of an EfficientNet-Lite and `finetune` their training
//! with a head from a spatial folder (partial fine-tuning), `mix` mixup and
//! CutMix of its training maps,
//! `checkpoint` makes runs resumable, `schedule` gives the learning rate per
//! step, `metrics` scores predictions, `warm` starts a head from another
//! run's weights; `anomaly` fits and scores anomaly detectors (k-NN,
//! Mahalanobis) on normal images' features.

pub mod anomaly;
pub mod auto_precision;
pub mod blocks;
pub mod checkpoint;
pub mod config;
pub mod data;
pub mod finetune;
pub mod head;
pub mod host;
pub mod metrics;
pub mod mix;
pub mod record;
pub mod run;
pub mod schedule;
pub mod session;
pub mod trainer;
pub mod warm;

use std::path::Path;

use crate::dataset::DatasetError;
use crate::features::FeatureError;

/// Errors at the training boundary.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// Inputs to a metric or a run do not fit together.
    #[error("invalid training input: {0}")]
    Invalid(String),
    #[error("no finished features: {0}")]
    NoFeatures(String),
    #[error("incomplete features: {0}")]
    Incomplete(String),
    #[error("split {0} has no examples with features and a label")]
    EmptySplit(&'static str),
    #[error("label set differs between splits: {0}")]
    LabelMismatch(String),
    #[error("feature row for image {image_index} holds NaN or inf")]
    NonFinite { image_index: usize },
    #[error("checkpoint: {0}")]
    Checkpoint(String),
    /// The head's loss, gradients or outputs stopped being finite.
    #[error("run {run} diverged and is recorded FAILED: {reason}")]
    Diverged { run: String, reason: String },
    #[error(transparent)]
    Experiments(#[from] crate::experiments::ExperimentsError),
    #[error(transparent)]
    Features(#[from] FeatureError),
    #[error(transparent)]
    Dataset(#[from] DatasetError),
    #[error("tensor computation failed: {0}")]
    Tensor(#[from] candle_core::Error),
    #[error(transparent)]
    Spatial(#[from] crate::spatial::SpatialError),
    /// Writing a run's files failed (a full disk, a read-only folder).
    #[error("cannot write {}: {error}", path.display())]
    Io {
        path: std::path::PathBuf,
        error: std::io::Error,
    },
}

impl TrainError {
    /// `Io` for a write to `path`, for `map_err`.
    pub fn io(path: &Path) -> impl Fn(std::io::Error) -> TrainError + '_ {
        move |error| TrainError::Io {
            path: path.to_path_buf(),
            error,
        }
    }
}

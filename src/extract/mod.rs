//! Feature extraction as queue jobs: planning which images go into which job
//! (`plan`), the job kinds a worker can run (`jobs`), and status in terms of
//! datasets, encoders and images (`report`).
//!
//! The queue sees opaque payloads; this module is the only one that knows a
//! payload is JSON naming a dataset, an encoder and the chunk's images (each
//! by manifest index, content id and path). A job's
//! `group` is the dataset name, its `variant` the encoder name, and its
//! `fingerprint` the sha256 of everything its features depend on, so a
//! changed configuration never reuses stale features.

pub mod jobs;
pub mod plan;
pub mod report;
pub mod run;
pub mod verify;

use std::path::PathBuf;

use crate::dataset::DatasetError;
use crate::encoders::EncoderError;
use crate::queue::QueueError;

/// Job kind of a chunk of images to run through an encoder.
pub const KIND_EXTRACT: &str = "extract";
/// Job kind that does nothing: for tests and the queue benchmark.
pub const KIND_NOOP: &str = "noop";
/// Group, variant and fingerprint of no-op jobs.
pub const NOOP_GROUP: &str = "noop";

/// Version of the features' values; part of every fingerprint. Frozen at 1
/// through issue 18, whose change was the shard layout (rows named by
/// content), not the values: that is `features::SHARD_FORMAT_VERSION`, in
/// each `.done` marker. Keeping it keeps every fingerprint, and so recorded
/// runs, bundles and config hashes, valid.
pub const FEATURE_FORMAT_VERSION: u32 = 1;

/// Errors at the extraction boundary.
#[derive(Debug, thiserror::Error)]
pub enum ExtractError {
    #[error(transparent)]
    Dataset(#[from] DatasetError),
    #[error(transparent)]
    Encoder(#[from] EncoderError),
    #[error(transparent)]
    Queue(#[from] QueueError),
    #[error(transparent)]
    Features(#[from] crate::features::FeatureError),
    #[error("--chunk-size must be at least 1 (got 0)")]
    ZeroChunkSize,
    #[error(
        "no weights installed for encoder '{encoder}'; run `lazarus weights fetch {encoder}` or pass --weights FILE|random:SEED"
    )]
    NoWeights { encoder: String },
    #[error("--weights {path}: {error}")]
    WeightsFile {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("--weights {value}: a seed after 'random:' must be a whole number")]
    BadSeed { value: String },
    #[error("encoder '{encoder}' has no spatial feature map; drop --spatial")]
    NoSpatial { encoder: String },
    #[error("--tile-size/--tile-overlap: {message}")]
    Tiling { message: String },
    #[error("--views {views}: {reason}")]
    Views { views: String, reason: String },
    #[error("{queue}: malformed job payload: {message}")]
    Payload { queue: String, message: String },
}

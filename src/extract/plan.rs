//! `enqueue`: split the images of a dataset that no live job covers yet into
//! extraction jobs of `chunk_size` images.
//!
//! Everything that can be refused (chunk size, dataset, encoder, weights) is
//! checked before the queue file is opened, so a refused enqueue leaves it
//! untouched. Coverage is per dataset, encoder and fingerprint: a changed
//! configuration is a new fingerprint and covers every image again.

use std::collections::BTreeSet;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{ExtractError, FEATURE_FORMAT_VERSION, KIND_EXTRACT, KIND_NOOP, NOOP_GROUP};
use crate::digest::sha256_hex;
use crate::encoders::{self, EncoderSpec};
use crate::layout::Layout;
use crate::queue::{EnqueueReport, NewJob, Queue};
use crate::segment::tile::TileConfig;

/// Where the encoder weights come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WeightsChoice {
    /// The converted weights in the local cache (`lazarus weights fetch`).
    Installed,
    /// A safetensors file given by path.
    File(PathBuf),
    /// Random initialisation from a seed (for tests and baselines).
    Random(u64),
}

impl WeightsChoice {
    /// Parses `--weights`: `random:SEED` or a file path.
    pub fn parse(value: &str) -> Result<Self, ExtractError> {
        match value.strip_prefix("random:") {
            Some(seed) => {
                seed.parse()
                    .map(WeightsChoice::Random)
                    .map_err(|_| ExtractError::BadSeed {
                        value: value.to_string(),
                    })
            }
            None => Ok(WeightsChoice::File(PathBuf::from(value))),
        }
    }
}

/// Weights resolved to an identity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResolvedWeights {
    /// `sha256:HEX` of the file, or `random:SEED`.
    pub id: String,
    pub path: Option<PathBuf>,
}

/// What `lazarus enqueue` asks for.
#[derive(Debug, Clone)]
pub struct EnqueueRequest {
    pub dataset: String,
    pub encoder: String,
    pub chunk_size: usize,
    /// Retire the live jobs of this configuration and cover every image again.
    pub force: bool,
    /// Store the encoder's spatial maps per tile (segmentation) instead of
    /// pooled features of the center crop.
    pub spatial: bool,
    /// How `spatial` extraction cuts large images.
    pub tiling: TileConfig,
    pub weights: WeightsChoice,
}

/// The payload of an extraction job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExtractPayload {
    pub dataset: String,
    pub encoder: String,
    pub fingerprint: String,
    pub weights: ResolvedWeights,
    /// Manifest indices (rows of images.csv) of the chunk, ascending.
    pub image_indices: Vec<usize>,
    pub spatial: bool,
    /// Tiling of spatial jobs (absent in pooled jobs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tiling: Option<TileConfig>,
}

impl ExtractPayload {
    /// The tiling of a spatial job; None for pooled jobs.
    pub fn spatial_tiling(&self) -> Option<TileConfig> {
        self.spatial.then(|| self.tiling.unwrap_or_default())
    }
}

/// What an enqueue did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EnqueueOutcome {
    /// The queue file, or its URL without the password.
    pub queue: String,
    pub dataset: String,
    pub encoder: String,
    pub fingerprint: String,
    pub weights: String,
    pub images: usize,
    /// Images already in a live job of this configuration (before `--force`).
    pub already_covered: usize,
    /// Live jobs retired by `--force`.
    pub superseded: u64,
    pub images_enqueued: usize,
    pub jobs_added: u64,
    /// Jobs an identical concurrent enqueue had already added.
    pub jobs_skipped: u64,
}

/// The fingerprint of an extraction configuration: sha256 over the JSON of
/// encoder name, weights identity, preprocessing, spatial flag and feature
/// format; spatial sets add their tiling and use their own preprocessing, so
/// pooled and spatial features never share a fingerprint.
pub fn fingerprint(
    encoder: &EncoderSpec,
    weights_id: &str,
    spatial: Option<&TileConfig>,
) -> String {
    let identity = match spatial {
        None => serde_json::json!({
            "encoder": encoder.name,
            "weights": weights_id,
            "preprocess": encoder.preprocess,
            "spatial": false,
            "feature_format": FEATURE_FORMAT_VERSION,
        }),
        Some(tiling) => serde_json::json!({
            "encoder": encoder.name,
            "weights": weights_id,
            "preprocess": spatial_preprocess(encoder),
            "spatial": true,
            "tiling": tiling,
            "maps": "all, finest first",
            "feature_format": FEATURE_FORMAT_VERSION,
        }),
    };
    sha256_hex(identity.to_string().as_bytes())
}

/// Spatial extraction stretches each tile to the input square (no crop), so
/// every pixel of the image lies in some tile and masks align with the maps.
pub fn spatial_preprocess(encoder: &EncoderSpec) -> crate::preprocess::PreprocessConfig {
    crate::preprocess::PreprocessConfig {
        resize: crate::preprocess::ResizePolicy::Stretch,
        ..encoder.preprocess.clone()
    }
}

fn sha256_file(path: &Path) -> Result<String, ExtractError> {
    let io_err = |source| ExtractError::WeightsFile {
        path: path.to_path_buf(),
        error: source,
    };
    let mut file = std::fs::File::open(path).map_err(io_err)?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buffer).map_err(io_err)?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
    }
    let digest: [u8; 32] = hasher.finalize().into();
    Ok(hex::encode(digest))
}

/// Resolves the weights to an identity without loading them.
pub fn resolve_weights(
    encoder: &str,
    choice: &WeightsChoice,
) -> Result<ResolvedWeights, ExtractError> {
    match choice {
        WeightsChoice::Installed => match crate::weights::installed(encoder) {
            Some(installed) => Ok(ResolvedWeights {
                id: format!("sha256:{}", installed.sha256),
                path: Some(installed.path),
            }),
            None => Err(ExtractError::NoWeights {
                encoder: encoder.to_string(),
            }),
        },
        WeightsChoice::File(path) => Ok(ResolvedWeights {
            id: format!("sha256:{}", sha256_file(path)?),
            path: Some(path.clone()),
        }),
        WeightsChoice::Random(seed) => Ok(ResolvedWeights {
            id: format!("random:{seed}"),
            path: None,
        }),
    }
}

/// Enqueues extraction jobs for the images of a dataset not yet covered.
pub fn enqueue(layout: &Layout, request: &EnqueueRequest) -> Result<EnqueueOutcome, ExtractError> {
    if request.chunk_size == 0 {
        return Err(ExtractError::ZeroChunkSize);
    }
    let dataset = crate::dataset::load(layout, &request.dataset)?;
    let encoder = encoders::lookup(&request.encoder)?;
    if request.spatial && encoder.spatial.is_none() {
        return Err(ExtractError::NoSpatial {
            encoder: encoder.name.to_string(),
        });
    }
    let weights = resolve_weights(encoder.name, &request.weights)?;
    let tiling = request.spatial.then_some(request.tiling);
    if let Some(tiling) = &tiling {
        tiling.validate().map_err(|e| ExtractError::Tiling {
            message: e.to_string(),
        })?;
    }
    let fingerprint = fingerprint(&encoder, &weights.id, tiling.as_ref());

    let queue = layout.queue().open()?;
    let queue = queue.as_ref();
    let group = dataset.info.name.as_str();
    let covered = covered_indices(queue, group, encoder.name, &fingerprint)?;
    let already_covered = covered.len();
    let superseded = if request.force {
        queue.supersede(group, encoder.name, &fingerprint)?
    } else {
        0
    };
    let todo: Vec<usize> = dataset
        .images
        .iter()
        .map(|image| image.index)
        .filter(|index| request.force || !covered.contains(index))
        .collect();
    let jobs: Vec<NewJob> = todo
        .chunks(request.chunk_size)
        .map(|chunk| {
            let payload = ExtractPayload {
                dataset: group.to_string(),
                encoder: encoder.name.to_string(),
                fingerprint: fingerprint.clone(),
                weights: weights.clone(),
                image_indices: chunk.to_vec(),
                spatial: request.spatial,
                tiling,
            };
            let payload = serde_json::to_string(&payload).expect("payload serialises");
            NewJob {
                kind: KIND_EXTRACT.to_string(),
                group: group.to_string(),
                variant: encoder.name.to_string(),
                fingerprint: fingerprint.clone(),
                // Two identical enqueues racing produce identical chunks: one wins.
                dedup_key: format!(
                    "{KIND_EXTRACT}:{}",
                    sha256_hex(format!("{group}\n{}\n{payload}", encoder.name).as_bytes())
                ),
                items: chunk.len() as u64,
                payload,
            }
        })
        .collect();
    let EnqueueReport { added, skipped } = queue.enqueue(&jobs)?;
    Ok(EnqueueOutcome {
        queue: queue.location(),
        dataset: group.to_string(),
        encoder: encoder.name.to_string(),
        fingerprint,
        weights: weights.id,
        images: dataset.images.len(),
        already_covered,
        superseded,
        images_enqueued: todo.len(),
        jobs_added: added,
        jobs_skipped: skipped,
    })
}

/// Manifest indices in live jobs of this dataset, encoder and fingerprint.
fn covered_indices(
    queue: &dyn Queue,
    group: &str,
    encoder: &str,
    fingerprint: &str,
) -> Result<BTreeSet<usize>, ExtractError> {
    let mut covered = BTreeSet::new();
    for payload in queue.live_payloads(group, encoder, fingerprint)? {
        let payload: ExtractPayload =
            serde_json::from_str(&payload).map_err(|err| ExtractError::Payload {
                queue: queue.location(),
                message: err.to_string(),
            })?;
        covered.extend(payload.image_indices);
    }
    Ok(covered)
}

/// The payload of a no-op job.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NoopPayload {
    /// Where the job leaves a marker file `job-ID-attempt-N` naming its worker,
    /// so tests can count executions.
    pub marker_dir: Option<PathBuf>,
    /// Items the job reports as failed (exercises per-item failures).
    #[serde(default)]
    pub fail_items: Vec<String>,
    /// How long the job takes (exercises heartbeats, crashes and shutdown).
    #[serde(default)]
    pub sleep_ms: u64,
    /// Sleep through stop requests too (a hung job: exercises the stop deadline).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub ignore_stop: bool,
    /// Panic with this message after sleeping (a bug inside a job).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub panic: Option<String>,
}

/// What a no-op enqueue did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NoopOutcome {
    pub queue: String,
    pub jobs_added: u64,
}

/// Enqueues `count` no-op jobs (hidden `--noop-jobs`: tests and benchmarks).
pub fn enqueue_noop(
    layout: &Layout,
    count: u64,
    payload: &NoopPayload,
) -> Result<NoopOutcome, ExtractError> {
    let queue = layout.queue().open()?;
    let text = serde_json::to_string(payload).expect("payload serialises");
    // Each no-op job is new: the key only has to be unique.
    static CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let nonce = format!(
        "{}-{}-{}",
        std::process::id(),
        crate::queue::Clock::now_ms(&crate::queue::SystemClock),
        CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    let jobs: Vec<NewJob> = (0..count)
        .map(|i| NewJob {
            kind: KIND_NOOP.to_string(),
            group: NOOP_GROUP.to_string(),
            variant: NOOP_GROUP.to_string(),
            fingerprint: NOOP_GROUP.to_string(),
            dedup_key: format!("{KIND_NOOP}:{nonce}:{i}"),
            items: payload.fail_items.len() as u64,
            payload: text.clone(),
        })
        .collect();
    let report = queue.enqueue(&jobs)?;
    Ok(NoopOutcome {
        queue: queue.location(),
        jobs_added: report.added,
    })
}

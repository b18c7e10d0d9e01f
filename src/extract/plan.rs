//! `enqueue`: split the images of a dataset that no live job covers yet into
//! extraction jobs of `chunk_size` images.
//!
//! Everything that can be refused (chunk size, dataset, encoder, weights) is
//! checked before the queue file is opened, so a refused enqueue leaves it
//! untouched. Coverage is by content id, per fingerprint, across datasets:
//! an image is covered when a live job of the fingerprint (of any dataset)
//! holds its content, or a published shard of `features/FINGERPRINT` has a
//! row of it. A changed configuration is a new fingerprint and covers every
//! image again. The coverage read and the new jobs are one queue
//! transaction (`Queue::plan_and_enqueue`), so concurrent enqueues never
//! schedule an image twice.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{ExtractError, FEATURE_FORMAT_VERSION, KIND_EXTRACT, KIND_NOOP, NOOP_GROUP};
use crate::dataset::ImageRecord;
use crate::digest::{ContentId, sha256_hex};
use crate::encoders::{
    self, EncoderSpec, InputChoice, InputResize, PooledLayers, SpatialMaps, ViewSet,
};
use crate::layout::Layout;
use crate::queue::{LiveJob, NewJob, Plan};
use crate::spatial::tile::{TileConfig, spatial_preprocess};

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
    /// Which layers pooled features are made of (`--layers`).
    pub layers: PooledLayers,
    /// Which maps `spatial` extraction keeps (`--maps`).
    pub maps: SpatialMaps,
    /// The input square of pooled features (`--image-size`, `--resize`);
    /// the encoder's own when None.
    pub input: Option<InputChoice>,
    /// Flipped or rotated copies of each image's input square encoded
    /// beside it (`--views`), a row each.
    pub views: ViewSet,
}

/// One image of an extraction job: everything the worker needs, so it
/// never reads a manifest (which may have grown since).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobImage {
    /// Manifest index in the job's dataset (failures are reported by it).
    pub index: usize,
    /// The content id the file must still have: its sha256 (hex).
    pub id: String,
    pub path: PathBuf,
    pub width: u32,
    pub height: u32,
}

impl JobImage {
    fn of(record: &ImageRecord) -> Self {
        JobImage {
            index: record.index,
            id: record.id.clone(),
            path: record.path.clone(),
            width: record.width,
            height: record.height,
        }
    }
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
    /// The chunk's images (jobs enqueued before issue 18 have none: their
    /// images are the manifest rows `image_indices` names).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub images: Vec<JobImage>,
    pub spatial: bool,
    /// Tiling of spatial jobs (absent in pooled jobs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tiling: Option<TileConfig>,
    /// The layers of pooled features (absent: `last`, as before `--layers`).
    #[serde(default, skip_serializing_if = "PooledLayers::is_last")]
    pub layers: PooledLayers,
    /// The maps of a spatial job (absent: `16,32`, as before `--maps`).
    #[serde(default, skip_serializing_if = "SpatialMaps::is_default")]
    pub maps: SpatialMaps,
    /// The input square (absent: the encoder's registered one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input: Option<InputChoice>,
    /// The views of each image (absent: `1`, as before `--views`).
    #[serde(default, skip_serializing_if = "ViewSet::is_single")]
    pub views: ViewSet,
}

impl ExtractPayload {
    /// The tiling of a spatial job; None for pooled jobs.
    pub fn spatial_tiling(&self) -> Option<TileConfig> {
        self.spatial.then(|| self.tiling.unwrap_or_default())
    }

    /// The chunk's images; for a job of the old payload, read from its
    /// dataset's manifest rows (`rows` caches manifests by dataset).
    pub fn job_images(
        &self,
        layout: &Layout,
        rows: &mut ManifestRows,
    ) -> Result<Vec<JobImage>, ExtractError> {
        if !self.images.is_empty() || self.image_indices.is_empty() {
            return Ok(self.images.clone());
        }
        let manifest = rows.of(layout, &self.dataset)?;
        self.image_indices
            .iter()
            .map(|&index| {
                manifest
                    .get(index)
                    .map(JobImage::of)
                    .ok_or_else(|| ExtractError::Payload {
                        queue: format!("job of dataset '{}'", self.dataset),
                        message: format!(
                            "image index {index} is outside dataset '{}' ({} rows)",
                            self.dataset,
                            manifest.len()
                        ),
                    })
            })
            .collect()
    }
}

/// Every row of the datasets old payloads name, read once per dataset.
#[derive(Default)]
pub struct ManifestRows {
    rows: HashMap<String, Vec<ImageRecord>>,
}

impl ManifestRows {
    fn of(&mut self, layout: &Layout, dataset: &str) -> Result<&[ImageRecord], ExtractError> {
        if !self.rows.contains_key(dataset) {
            let rows = crate::dataset::load_all_rows(layout, dataset)?;
            self.rows.insert(dataset.to_string(), rows);
        }
        Ok(&self.rows[dataset])
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
    /// Images whose content a live job or a published shard of this
    /// fingerprint already covers, whatever dataset it came from (before
    /// `--force`).
    pub already_covered: usize,
    /// Live jobs retired by `--force`.
    pub superseded: u64,
    /// Shards of the retired jobs removed from the local features/ folder
    /// (their images are enqueued again; left there, they would hold a
    /// second row for each image until `verify --repair`).
    pub shards_removed: usize,
    pub images_enqueued: usize,
    /// With `--force`: images of other datasets that were in retired jobs,
    /// enqueued again under their own datasets.
    pub other_images_enqueued: usize,
    pub jobs_added: u64,
    /// Jobs an identical concurrent enqueue had already added.
    pub jobs_skipped: u64,
}

/// The fingerprint of an extraction configuration: sha256 over the JSON of
/// encoder name, weights identity, preprocessing, spatial flag, pooled layers
/// (when not `last`), views (when not `1`) and feature
/// format; spatial sets add their tiling and maps and use their own
/// preprocessing, so pooled and spatial features never share a fingerprint.
pub fn fingerprint(
    encoder: &EncoderSpec,
    weights_id: &str,
    spatial: Option<(&TileConfig, &SpatialMaps)>,
    layers: &PooledLayers,
    views: ViewSet,
) -> String {
    let identity = match spatial {
        None => {
            let mut identity = serde_json::json!({
                "encoder": encoder.name,
                "weights": weights_id,
                "preprocess": encoder.preprocess,
                "spatial": false,
                "feature_format": FEATURE_FORMAT_VERSION,
            });
            // `last` adds no key: fingerprints from before `--layers` stay
            // (keys serialise sorted, so where it goes does not matter).
            if !layers.is_last() {
                identity["layers"] = layers.to_string().into();
            }
            // Likewise `1` view: fingerprints from before `--views` stay.
            if !views.is_single() {
                identity["views"] = views.name().into();
            }
            identity
        }
        Some((tiling, maps)) => serde_json::json!({
            "encoder": encoder.name,
            "weights": weights_id,
            "preprocess": spatial_preprocess(encoder),
            "spatial": true,
            "tiling": tiling,
            // The default keeps the value of every fingerprint from before
            // `--maps`; another choice names its strides.
            "maps": if maps.is_default() {
                "all, finest first".to_string()
            } else {
                maps.to_string()
            },
            "feature_format": FEATURE_FORMAT_VERSION,
        }),
    };
    sha256_hex(identity.to_string().as_bytes())
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
        WeightsChoice::File(path) => {
            // Stored absolute: workers start in other folders.
            let absolute =
                std::path::absolute(path).map_err(|error| ExtractError::WeightsFile {
                    path: path.clone(),
                    error,
                })?;
            Ok(ResolvedWeights {
                id: format!("sha256:{}", sha256_file(&absolute)?),
                path: Some(absolute),
            })
        }
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
    let registered = encoders::lookup(&request.encoder)?;
    if request.spatial
        && let Some(input) = request.input
        && input.resize != InputResize::Stretch
    {
        return Err(ExtractError::Encoder(encoders::EncoderError::InputChoice {
            encoder: request.encoder.clone(),
            reason: format!(
                "spatial tiles are stretched whole to the input square; --resize {} applies \
                 to pooled features",
                input.resize.name()
            ),
        }));
    }
    // The registry's own square is no choice: its fingerprint stays (for
    // spatial tiles, always stretched, its own size).
    let input = request.input.filter(|input| {
        if request.spatial {
            input.size != registered.input_size
        } else {
            input.preprocess(&registered) != registered.preprocess
        }
    });
    let encoder = registered.with_input(input.as_ref())?;
    if request.spatial && encoder.spatial.is_none() {
        return Err(ExtractError::NoSpatial {
            encoder: encoder.name.to_string(),
        });
    }
    request.layers.check(&encoder)?;
    if request.spatial && !request.layers.is_last() {
        return Err(ExtractError::Encoder(encoders::EncoderError::Layers {
            value: request.layers.to_string(),
            reason: "spatial features keep the encoder's own maps; drop --layers or --spatial"
                .into(),
        }));
    }
    if !request.spatial && !request.maps.is_default() {
        return Err(ExtractError::Encoder(encoders::EncoderError::Maps {
            value: request.maps.to_string(),
            reason: "maps are kept by spatial extraction only; add --spatial".into(),
        }));
    }
    request.maps.check(&encoder)?;
    if request.spatial && !request.views.is_single() {
        return Err(ExtractError::Views {
            views: request.views.to_string(),
            reason: "spatial maps keep the encoder's own geometry (segmentation and patch scores are placed by it); drop --views or --spatial".into(),
        });
    }
    let weights = resolve_weights(encoder.name, &request.weights)?;
    let tiling = request.spatial.then_some(request.tiling);
    if let Some(tiling) = &tiling {
        tiling.validate().map_err(|e| ExtractError::Tiling {
            message: e.to_string(),
        })?;
    }
    let fingerprint = fingerprint(
        &encoder,
        &weights.id,
        tiling.as_ref().map(|tiling| (tiling, &request.maps)),
        &request.layers,
        request.views,
    );
    // Rows already published count as covered (shards pulled from a store,
    // or migrated, may have no job in this queue).
    let published =
        crate::features::published_content_ids(&crate::features::feature_dir(layout, &fingerprint));

    let queue = layout.queue().open()?;
    let group = dataset.info.name.as_str();
    let job_of = |dataset: &str, images: &[JobImage]| -> NewJob {
        let payload = ExtractPayload {
            dataset: dataset.to_string(),
            encoder: encoder.name.to_string(),
            fingerprint: fingerprint.clone(),
            weights: weights.clone(),
            image_indices: images.iter().map(|image| image.index).collect(),
            images: images.to_vec(),
            spatial: request.spatial,
            tiling,
            layers: request.layers.clone(),
            maps: request.maps.clone(),
            input,
            views: request.views,
        };
        let payload = serde_json::to_string(&payload).expect("payload serialises");
        NewJob {
            kind: KIND_EXTRACT.to_string(),
            group: dataset.to_string(),
            variant: encoder.name.to_string(),
            fingerprint: fingerprint.clone(),
            // Two identical enqueues racing produce identical chunks: one wins.
            dedup_key: format!(
                "{KIND_EXTRACT}:{}",
                sha256_hex(format!("{dataset}\n{}\n{payload}", encoder.name).as_bytes())
            ),
            items: images.len() as u64,
            payload,
        }
    };
    let mut counts = (0, 0, 0);
    let mut retired: Vec<i64> = Vec::new();
    let mut manifests = ManifestRows::default();
    let location = queue.location();
    let report = queue.plan_and_enqueue(&fingerprint, &mut |live: &[LiveJob]| {
        let mut coverage = Coverage::default();
        coverage.add_full(&published);
        let mine: Vec<ContentId> = dataset.images.iter().map(|r| r.content_id()).collect();
        let mine_keys: HashSet<[u8; 8]> = mine.iter().map(short_key).collect();
        let mut plan = Plan::default();
        // Images of other datasets in jobs `--force` retires: (dataset, image).
        let mut orphaned: BTreeMap<String, Vec<JobImage>> = BTreeMap::new();
        for job in live {
            let payload: ExtractPayload = serde_json::from_str(&job.payload)
                .map_err(|err| format!("{location}: malformed job payload: {err}"))?;
            let images = payload
                .job_images(layout, &mut manifests)
                .map_err(|err| err.to_string())?;
            let ids: Vec<ContentId> = images
                .iter()
                .map(|image| {
                    ContentId::parse(&image.id).ok_or_else(|| {
                        format!("job {}: image id '{}' is not a sha256", job.id, image.id)
                    })
                })
                .collect::<Result<_, _>>()?;
            if request.force && ids.iter().any(|id| mine_keys.contains(&short_key(id))) {
                plan.supersede.push(job.id);
                for (image, id) in images.into_iter().zip(&ids) {
                    if !mine_keys.contains(&short_key(id)) {
                        orphaned
                            .entry(payload.dataset.clone())
                            .or_default()
                            .push(image);
                    }
                }
            } else {
                for id in &ids {
                    coverage.add(id);
                }
            }
        }
        let already_covered = mine.iter().filter(|id| coverage.covers(id)).count();
        let todo: Vec<JobImage> = dataset
            .images
            .iter()
            .zip(&mine)
            .filter(|(_, id)| request.force || !coverage.covers(id))
            .map(|(record, _)| JobImage::of(record))
            .collect();
        plan.jobs = todo
            .chunks(request.chunk_size)
            .map(|chunk| job_of(group, chunk))
            .collect();
        let mut others = 0;
        for (other, mut images) in orphaned {
            images.sort_by_key(|image| image.index);
            images.dedup_by_key(|image| image.index);
            others += images.len();
            plan.jobs.extend(
                images
                    .chunks(request.chunk_size)
                    .map(|chunk| job_of(&other, chunk)),
            );
        }
        counts = (already_covered, todo.len(), others);
        retired = plan.supersede.clone();
        Ok(plan)
    })?;
    let (already_covered, images_enqueued, other_images_enqueued) = counts;
    // The retirement is committed: the retired jobs' shards are stale (a
    // fenced-off attempt of one can no longer complete), so they go now, not
    // at the next `verify --repair`. A shard in a feature store stays for
    // `verify --repair --feature-store`.
    let folder = crate::features::feature_dir(layout, &fingerprint);
    let mut shards_removed = 0;
    for job_id in retired {
        if crate::features::remove_shard(&folder, job_id as u64)? {
            shards_removed += 1;
        }
    }
    Ok(EnqueueOutcome {
        queue: queue.location(),
        dataset: group.to_string(),
        encoder: encoder.name.to_string(),
        fingerprint,
        weights: weights.id,
        images: dataset.images.len(),
        already_covered,
        superseded: report.superseded,
        shards_removed,
        images_enqueued,
        other_images_enqueued,
        jobs_added: report.added,
        jobs_skipped: report.skipped,
    })
}

/// The first 8 bytes of a content id: all an old manifest's id knows.
pub(crate) fn short_key(id: &ContentId) -> [u8; 8] {
    id.known_bytes()[..8]
        .try_into()
        .expect("ids know at least 8 bytes")
}

/// Content ids already covered, full or short (old manifests).
#[derive(Default)]
pub(crate) struct Coverage {
    full: HashSet<[u8; 32]>,
    /// The first 8 bytes of every id above, and the short ids.
    short: HashSet<[u8; 8]>,
    /// Short ids alone (their full digest unknown).
    short_only: HashSet<[u8; 8]>,
}

impl Coverage {
    pub(crate) fn add_full(&mut self, ids: &[[u8; 32]]) {
        for id in ids {
            self.add(&ContentId::full(*id));
        }
    }

    pub(crate) fn add(&mut self, id: &ContentId) {
        let key = short_key(id);
        self.short.insert(key);
        match id.sha256() {
            Some(full) => {
                self.full.insert(*full);
            }
            None => {
                self.short_only.insert(key);
            }
        }
    }

    /// A full id is covered by itself or an old id of its prefix; an old
    /// id by anything with its prefix.
    pub(crate) fn covers(&self, id: &ContentId) -> bool {
        let key = short_key(id);
        match id.sha256() {
            Some(full) => self.full.contains(full) || self.short_only.contains(&key),
            None => self.short.contains(&key),
        }
    }
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

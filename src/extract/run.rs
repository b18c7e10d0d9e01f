//! Running one extraction job: read the chunk's images, check each file
//! still has the content id the job expects, decode and preprocess them in
//! parallel, run the frozen encoder in micro-batches, write one float16
//! shard (each row with the sha256 of the bytes it was computed from) and
//! its `.done` marker, and report the images that failed.
//!
//! A worker keeps encoders between jobs, keyed by fingerprint, and nothing
//! else: a job names its images (path and content id), so jobs of several
//! datasets on one fingerprint never read each other's manifests (the bug
//! of issue 18). A file whose bytes no longer hash to the id the job
//! expects is that image's failure, naming the file and both ids; its
//! features are never written under the old id.
//!
//! Crash behaviour: the shard of job J is `shard-J` in the folder of the
//! job's fingerprint, so a rerun of the same job (after a kill or a lost
//! lease) rewrites the same file with the same bytes; `features::write_shard`
//! publishes it atomically, marker last. The queue records the job done only
//! after the marker is durable. On start a worker reconciles: temp files and
//! unpublished shards are removed, and done jobs whose shard is missing or
//! corrupt go back to pending. With `--feature-store` the shard goes to the
//! store's `FINGERPRINT` folder through `store::publish_shard` (same
//! order: shard, then marker) and reconciling checks the store instead.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use half::f16;
use rayon::prelude::*;
use serde::Serialize;

use super::plan::{ExtractPayload, JobImage, ManifestRows, fingerprint};
use super::{ExtractError, KIND_EXTRACT};
use crate::digest::ContentId;
use crate::encoders::{self, Encoder, WeightsSource};
use crate::features::store::{self, FeatureStore};
use crate::features::{self, JobRef, MapData, ReconcileConfig, ShardData, SpatialData};
use crate::layout::Layout;
use crate::queue::worker::Outcome;
use crate::queue::{ItemFailure, JobResult, Lease, Queue};
use crate::spatial::tile::{self, PreparedTile, TileConfig, spatial_preprocess};

/// Settings of the extraction side of a worker.
#[derive(Debug, Clone)]
pub struct ExtractConfig {
    pub device: Device,
    /// Images per encoder forward pass.
    pub batch_size: usize,
    /// How finished work is reported on stderr.
    pub reporting: Reporting,
    /// Where shards are published: `None` for the local features/ folder,
    /// or a shared store (`--feature-store`).
    pub feature_store: Option<Arc<dyn FeatureStore>>,
}

/// Progress output of a worker.
#[derive(Debug, Clone)]
pub enum Reporting {
    Silent,
    /// One plain line per finished job (logs, pipes).
    Lines,
    /// A progress bar advanced per micro-batch (terminals).
    Bar(indicatif::ProgressBar),
}

impl Default for ExtractConfig {
    fn default() -> Self {
        ExtractConfig {
            device: Device::Cpu,
            batch_size: 16,
            reporting: Reporting::Silent,
            feature_store: None,
        }
    }
}

/// What one job runs on: the worker's encoder for the job's fingerprint,
/// and the job's images.
struct Loaded {
    encoder: Arc<dyn Encoder>,
    images: Vec<JobImage>,
}

/// Runs extraction jobs; encoders are loaded once per fingerprint and
/// reused for every later chunk. Nothing else is cached: the fingerprint
/// does not name a dataset.
pub struct Extractor {
    layout: Layout,
    config: ExtractConfig,
    encoders: Mutex<HashMap<String, Arc<dyn Encoder>>>,
}

/// One decoded, preprocessed image of a chunk: the sha256 of the bytes
/// decoded, and its pixels.
type Prepared = ([u8; 32], Vec<f32>);

/// One decoded image of a spatial chunk: the sha256 of its bytes, its tiles.
type PreparedTiles = ([u8; 32], Vec<PreparedTile>);

/// Reads one image of a job and checks that its bytes are the content the
/// job expects; returns them with their sha256.
fn read_expected(image: &JobImage, dataset: &str) -> Result<(Vec<u8>, [u8; 32]), ItemFailure> {
    let failure = |reason: String| ItemFailure {
        item: image.index.to_string(),
        reason,
    };
    let bytes = crate::files::read_regular_file(&image.path)
        .map_err(|err| failure(format!("cannot read {}: {err}", image.path.display())))?;
    let sha256 = crate::digest::sha256(&bytes);
    let expected = ContentId::parse(&image.id).ok_or_else(|| {
        failure(format!(
            "the job's content id '{}' is not a sha256",
            image.id
        ))
    })?;
    if !expected.matches(&sha256) {
        return Err(failure(format!(
            "{}: the file changed after `dataset add`: its content is now sha256 {}, dataset '{dataset}' lists it as {}; its features are not written under the old id (run `lazarus dataset update {dataset}` to register the new content)",
            image.path.display(),
            hex::encode(sha256),
            image.id
        )));
    }
    Ok((bytes, sha256))
}

impl Extractor {
    pub fn new(layout: Layout, config: ExtractConfig) -> Self {
        Extractor {
            layout,
            config,
            encoders: Mutex::new(HashMap::new()),
        }
    }

    fn load(&self, payload: &ExtractPayload) -> Result<Loaded, String> {
        // Jobs enqueued before issue 18 name manifest rows: read them now.
        let images = payload
            .job_images(&self.layout, &mut ManifestRows::default())
            .map_err(|e| e.to_string())?;
        let encoder = self.encoder(payload)?;
        Ok(Loaded { encoder, images })
    }

    fn encoder(&self, payload: &ExtractPayload) -> Result<Arc<dyn Encoder>, String> {
        if let Some(encoder) = self
            .encoders
            .lock()
            .expect("lock")
            .get(&payload.fingerprint)
        {
            return Ok(Arc::clone(encoder));
        }
        let spec = encoders::lookup(&payload.encoder)
            .and_then(|spec| spec.with_input(payload.input.as_ref()))
            .map_err(|e| e.to_string())?;
        // The fingerprint covers the preprocessing: a binary whose
        // preprocessing differs from the enqueuer's must not write these features.
        let expected = fingerprint(
            &spec,
            &payload.weights.id,
            payload
                .spatial_tiling()
                .as_ref()
                .map(|tiling| (tiling, &payload.maps)),
            &payload.layers,
            payload.views,
        );
        if expected != payload.fingerprint {
            return Err(format!(
                "fingerprint mismatch: the job was enqueued as {} but this lazarus {} computes {expected} for encoder {} with weights {}; re-enqueue with this binary",
                payload.fingerprint,
                crate::VERSION,
                payload.encoder,
                payload.weights.id
            ));
        }
        let source = match (
            payload.weights.id.strip_prefix("random:"),
            &payload.weights.path,
        ) {
            (Some(seed), _) => WeightsSource::Random {
                seed: seed
                    .parse()
                    .map_err(|_| format!("bad weights id {}", payload.weights.id))?,
            },
            (None, Some(path)) => WeightsSource::File(path.clone()),
            (None, None) => WeightsSource::Installed,
        };
        let encoder =
            encoders::load_encoder_layers(&spec, source, &self.config.device, &payload.layers)
                .map_err(|e| e.to_string())?;
        if let (Some(sha256), Some(wanted)) = (
            encoder.weights_sha256(),
            payload.weights.id.strip_prefix("sha256:"),
        ) && sha256 != wanted
        {
            return Err(format!(
                "the weights of {} changed since enqueue: sha256 {sha256}, the job wants {wanted}",
                payload.encoder
            ));
        }
        let encoder: Arc<dyn Encoder> = Arc::from(encoder);
        self.encoders
            .lock()
            .expect("lock")
            .insert(payload.fingerprint.clone(), Arc::clone(&encoder));
        Ok(encoder)
    }

    /// Runs one extraction job to an outcome for the queue.
    /// Removes the shard a superseded job's attempt published (the
    /// `enqueue --force` that retired the job removed the shards there were;
    /// this one came after). Its shard index is its job id, which no other
    /// job shares, so nothing else is touched.
    pub fn discard(&self, lease: &Lease) -> Result<(), String> {
        let shard_index = lease.job_id as u64;
        match &self.config.feature_store {
            None => {
                let dir = features::feature_dir(&self.layout, &lease.fingerprint);
                features::remove_shard(&dir, shard_index).map(|_| ())
            }
            Some(feature_store) => store::remove_shard(
                feature_store.as_ref(),
                &store::store_folder(&lease.fingerprint),
                shard_index,
            ),
        }
        .map_err(|e| e.to_string())
    }

    pub fn execute(&self, lease: &Lease, stop: &AtomicBool) -> Outcome {
        let payload: ExtractPayload = match serde_json::from_str(&lease.payload) {
            Ok(payload) => payload,
            Err(err) => return Outcome::Failed(format!("malformed extract payload: {err}")),
        };
        let loaded = match self.load(&payload) {
            Ok(loaded) => loaded,
            Err(message) => return Outcome::Failed(message),
        };
        match self.extract(lease, &payload, &loaded, stop) {
            Ok(Some(result)) => {
                let seconds = result.detail["seconds"].as_f64().unwrap_or(0.0);
                let rows = result.detail["rows"].as_u64().unwrap_or(0);
                let images = (loaded.images.len() - result.failures.len()) as u64;
                // Spatial jobs write a row per tile.
                let tiles = if payload.spatial {
                    format!(" ({rows} tiles)")
                } else {
                    String::new()
                };
                let line = format!(
                    "{}: job {} ({} {}): {images} images{tiles} in {seconds:.1} s ({:.1} images/s), {} failed",
                    lease.worker,
                    lease.job_id,
                    payload.dataset,
                    payload.encoder,
                    images as f64 / seconds.max(1e-9),
                    result.failures.len()
                );
                match &self.config.reporting {
                    Reporting::Silent => {}
                    Reporting::Lines => eprintln!("{line}"),
                    Reporting::Bar(bar) => bar.set_message(line),
                }
                Outcome::Completed(result)
            }
            Ok(None) => Outcome::Interrupted,
            Err(message) => Outcome::Failed(message),
        }
    }

    /// Decodes the next micro-batch on the rayon pool while the encoder runs
    /// the current one, so decoding overlaps with encoding.
    fn extract(
        &self,
        lease: &Lease,
        payload: &ExtractPayload,
        loaded: &Loaded,
        stop: &AtomicBool,
    ) -> Result<Option<JobResult>, String> {
        let started = Instant::now();
        if let Some(tiling) = payload.spatial_tiling() {
            return self.extract_spatial(lease, payload, loaded, stop, &tiling, started);
        }
        let spec = loaded.encoder.spec();
        let preprocess = &spec.preprocess;
        let size = preprocess.input_size as usize;
        // Every view of an image is an encoder input of its own, views in
        // order: the image's rows are consecutive, view 0 first.
        let views = payload.views;
        let per_image = views.count();
        let mut failures = Vec::new();
        let prepare = |images: &[JobImage]| -> Vec<Result<Prepared, ItemFailure>> {
            images
                .par_iter()
                .map(|image| {
                    let (bytes, sha256) = read_expected(image, &payload.dataset)?;
                    crate::preprocess::preprocess_bytes(&bytes, &image.path, preprocess)
                        .map(|values| (sha256, views.apply_all(&values, size)))
                        .map_err(|err| ItemFailure {
                            item: image.index.to_string(),
                            reason: err.to_string(),
                        })
                })
                .collect()
        };

        let batches = micro_batches(&loaded.images, self.config.batch_size);
        let mut content_ids: Vec<[u8; 32]> = Vec::with_capacity(loaded.images.len());
        let mut pooled: Vec<f16> = Vec::new();
        let mut next = batches.first().map(|batch| prepare(batch));
        for position in 0..batches.len() {
            if stop.load(Ordering::SeqCst) {
                return Ok(None);
            }
            let current = next.take().expect("prepared batch");
            let (encoded, following) = rayon::join(
                || -> Result<_, String> {
                    let mut ok: Vec<Prepared> = Vec::with_capacity(current.len());
                    let mut failed = Vec::new();
                    for item in current {
                        match item {
                            Ok(prepared) => ok.push(prepared),
                            Err(failure) => failed.push(failure),
                        }
                    }
                    if ok.is_empty() {
                        return Ok((ok, None, failed));
                    }
                    let inputs = ok.len() * per_image;
                    let mut flat = Vec::with_capacity(inputs * 3 * size * size);
                    for (_, values) in &ok {
                        flat.extend_from_slice(values);
                    }
                    let input =
                        Tensor::from_vec(flat, (inputs, 3, size, size), &self.config.device)
                            .map_err(|e| format!("building the input batch: {e}"))?;
                    let output = loaded
                        .encoder
                        .forward_pooled(&input)
                        .map_err(|e| format!("encoder {}: {e}", spec.name))?;
                    Ok((ok, Some(output), failed))
                },
                || batches.get(position + 1).map(|batch| prepare(batch)),
            );
            next = following;
            let (ok, output, failed) = encoded?;
            if let Reporting::Bar(bar) = &self.config.reporting {
                bar.inc((ok.len() + failed.len()) as u64);
            }
            failures.extend(failed);
            let Some(output) = output else { continue };
            for (sha256, _) in &ok {
                content_ids.extend(std::iter::repeat_n(*sha256, per_image));
            }
            pooled.extend(to_f16(&output)?);
        }
        let view_of_row: Vec<u8> = (0..content_ids.len())
            .map(|row| (row % per_image) as u8)
            .collect();
        let data = ShardData {
            content_ids: &content_ids,
            pooled: &pooled,
            feature_dim: payload.layers.feature_dim(spec),
            spatial: None,
            views: (!views.is_single()).then_some(view_of_row.as_slice()),
        };
        let metadata = shard_metadata(payload, &spec.preprocess);
        self.finish(lease, payload, &data, metadata, failures, started)
    }

    /// Publishes the shard (when any image succeeded) and the job's result.
    fn finish(
        &self,
        lease: &Lease,
        payload: &ExtractPayload,
        data: &ShardData<'_>,
        metadata: HashMap<String, String>,
        failures: Vec<ItemFailure>,
        started: Instant,
    ) -> Result<Option<JobResult>, String> {
        let rows = data.content_ids.len();
        let mut detail = serde_json::json!({
            "rows": rows,
            "seconds": started.elapsed().as_secs_f64(),
            "worker": lease.worker,
            "attempt": lease.attempt,
        });
        if rows > 0 {
            let job = JobRef {
                job_id: lease.job_id,
                attempt: lease.attempt,
            };
            let shard_index = lease.job_id as u64;
            let published = match &self.config.feature_store {
                None => {
                    let dir = features::feature_dir(&self.layout, &payload.fingerprint);
                    features::write_shard(&dir, shard_index, data, metadata, job)
                }
                Some(feature_store) => {
                    let folder = store::store_folder(&payload.fingerprint);
                    store::publish_shard(
                        feature_store.as_ref(),
                        &folder,
                        shard_index,
                        data,
                        metadata,
                        job,
                    )
                }
            };
            let marker = published.map_err(|e| e.to_string())?;
            detail["shard"] = serde_json::Value::String(marker.shard);
        }
        Ok(Some(JobResult { failures, detail }))
    }

    /// A spatial job: each image is cut into tiles (one when it fits), every
    /// tile stretched to the input square and run through the encoder's
    /// `forward_maps`; a shard row per tile holds its geometry, pooled
    /// features and every map. Images are decoded in parallel one
    /// micro-batch at a time; the encoder sees up to `batch_size` tiles.
    fn extract_spatial(
        &self,
        lease: &Lease,
        payload: &ExtractPayload,
        loaded: &Loaded,
        stop: &AtomicBool,
        tiling: &TileConfig,
        started: Instant,
    ) -> Result<Option<JobResult>, String> {
        let spec = loaded.encoder.spec();
        let preprocess = spatial_preprocess(spec);
        let size = preprocess.input_size as usize;
        let batch_size = self.config.batch_size.max(1);
        let mut failures = Vec::new();
        let mut content_ids: Vec<[u8; 32]> = Vec::new();
        let mut tiles: Vec<[i64; 4]> = Vec::new();
        let mut pooled: Vec<f16> = Vec::new();
        let mut maps: Vec<(usize, [usize; 3], Vec<f16>)> = Vec::new();
        // Images are decoded a group at a time, a group holding about
        // `batch_size` tiles (counted from the manifest's sizes), so large
        // images do not hold many batches of preprocessed tiles at once.
        let mut groups: Vec<Vec<&JobImage>> = Vec::new();
        let mut group_tiles = 0;
        for image in &loaded.images {
            let count = tile::tiles(image.width, image.height, tiling).len();
            if groups.is_empty() || group_tiles + count > batch_size {
                groups.push(Vec::new());
                group_tiles = 0;
            }
            groups.last_mut().expect("pushed above").push(image);
            group_tiles += count;
        }
        for chunk in &groups {
            if stop.load(Ordering::SeqCst) {
                return Ok(None);
            }
            let prepared: Vec<Result<PreparedTiles, ItemFailure>> = chunk
                .par_iter()
                .map(|image| {
                    let (bytes, sha256) = read_expected(image, &payload.dataset)?;
                    tile::preprocess_tile_bytes(&bytes, &image.path, &preprocess, tiling)
                        .map(|(_, tiles)| (sha256, tiles))
                        .map_err(|err| ItemFailure {
                            item: image.index.to_string(),
                            reason: err.to_string(),
                        })
                })
                .collect();
            let mut batch: Vec<([u8; 32], PreparedTile)> = Vec::new();
            for result in prepared {
                match result {
                    Ok((sha256, prepared)) => {
                        batch.extend(prepared.into_iter().map(|t| (sha256, t)))
                    }
                    Err(failure) => failures.push(failure),
                }
            }
            if let Reporting::Bar(bar) = &self.config.reporting {
                bar.inc(chunk.len() as u64);
            }
            for group in batch.chunks(batch_size) {
                let mut flat = Vec::with_capacity(group.len() * 3 * size * size);
                for (_, (_, values)) in group {
                    flat.extend_from_slice(values);
                }
                let input =
                    Tensor::from_vec(flat, (group.len(), 3, size, size), &self.config.device)
                        .map_err(|e| format!("building the input batch: {e}"))?;
                let output = loaded
                    .encoder
                    .forward_maps(&input, &payload.maps)
                    .map_err(|e| format!("encoder {}: {e}", spec.name))?;
                if output.maps.is_empty() {
                    return Err(format!("encoder {} has no spatial maps", spec.name));
                }
                for (position, map) in output.maps.iter().enumerate() {
                    let (_, channels, height, width) = map
                        .values
                        .dims4()
                        .map_err(|e| format!("spatial map: {e}"))?;
                    if maps.len() <= position {
                        maps.push((map.stride, [channels, height, width], Vec::new()));
                    }
                    maps[position].2.extend(to_f16(&map.values)?);
                }
                pooled.extend(to_f16(&output.pooled)?);
                for (sha256, (tile, _)) in group {
                    content_ids.push(*sha256);
                    tiles.push(tile.map(i64::from));
                }
            }
        }
        let map_data: Vec<MapData<'_>> = maps
            .iter()
            .map(|(stride, shape, values)| MapData {
                stride: *stride,
                values,
                shape: *shape,
            })
            .collect();
        let data = ShardData {
            content_ids: &content_ids,
            pooled: &pooled,
            feature_dim: spec.feature_dim,
            spatial: Some(SpatialData {
                tiles: &tiles,
                maps: &map_data,
            }),
            views: None,
        };
        let mut metadata = shard_metadata(payload, &preprocess);
        metadata.insert(
            "tiling".to_string(),
            serde_json::to_string(tiling).expect("tiling serialises"),
        );
        self.finish(lease, payload, &data, metadata, failures, started)
    }
}

/// The job's images in encoder micro-batches of `batch_size`, except the
/// first: nothing overlaps its decoding (each later batch is decoded while the
/// encoder runs the one before), so it holds one image per thread only.
fn micro_batches<T>(images: &[T], batch_size: usize) -> Vec<&[T]> {
    let first = rayon::current_num_threads().clamp(1, batch_size.max(1));
    let (head, rest) = images.split_at(first.min(images.len()));
    std::iter::once(head)
        .filter(|head| !head.is_empty())
        .chain(rest.chunks(batch_size.max(1)))
        .collect()
}

fn to_f16(tensor: &Tensor) -> Result<Vec<f16>, String> {
    tensor
        .to_dtype(DType::F16)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f16>())
        .map_err(|e| format!("converting features to f16: {e}"))
}

fn shard_metadata(
    payload: &ExtractPayload,
    preprocess: &crate::preprocess::PreprocessConfig,
) -> HashMap<String, String> {
    // No dataset: a fingerprint folder is shared by every dataset.
    let mut metadata = HashMap::from([
        ("encoder".to_string(), payload.encoder.clone()),
        ("fingerprint".to_string(), payload.fingerprint.clone()),
        ("weights".to_string(), payload.weights.id.clone()),
        (
            "preprocess".to_string(),
            serde_json::to_string(preprocess).expect("preprocess serialises"),
        ),
        ("lazarus_version".to_string(), crate::VERSION.to_string()),
    ]);
    // Absent means `last`, as in every shard from before `--layers`.
    if !payload.layers.is_last() {
        metadata.insert("layers".to_string(), payload.layers.to_string());
    }
    // Absent means `16,32`, as in every spatial shard from before `--maps`.
    if !payload.maps.is_default() {
        metadata.insert("maps".to_string(), payload.maps.to_string());
    }
    // Absent means `1`, as in every shard from before `--views`.
    if !payload.views.is_single() {
        metadata.insert("views".to_string(), payload.views.name().to_string());
    }
    metadata
}

/// What reconciling the feature cache with the queue found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ReconcileSummary {
    pub removed_temp_files: usize,
    pub removed_unpublished: usize,
    /// Done jobs whose shard was missing or corrupt, sent back to pending.
    pub reopened_jobs: Vec<i64>,
    /// Done jobs whose shard is still in the layout before issue 18
    /// (`features/DATASET/FINGERPRINT/`): left done, for `features migrate`
    /// to convert rather than a worker to extract again.
    pub awaiting_migration: Vec<i64>,
}

/// Makes the feature cache and the queue agree: cleans each feature folder of
/// done extract jobs (temp files and unpublished shards older than
/// `config.grace`, corrupt shards) and sends done jobs whose shard is not
/// valid back to pending. Workers run it at start, with the lease length as
/// the grace period, so files of workers still writing are left alone.
/// With `feature_store`, the folders checked are the store's (where such
/// workers publish) and the local features/ folder is not touched. A done
/// job whose shard is still in the layout before issue 18 is left done
/// (`awaiting_migration`): `features migrate` converts it, where extracting
/// it again would throw the old work away.
pub fn reconcile(
    layout: &Layout,
    queue: &dyn Queue,
    config: &ReconcileConfig,
    feature_store: Option<&dyn FeatureStore>,
) -> Result<ReconcileSummary, ExtractError> {
    let mut summary = ReconcileSummary::default();
    let done = queue.done_jobs(KIND_EXTRACT, None)?;
    // fingerprint -> done jobs (with their dataset) and the rows each wrote.
    let mut by_folder: HashMap<String, Vec<(i64, String, usize)>> = HashMap::new();
    for job in &done {
        let Ok(payload) = serde_json::from_str::<ExtractPayload>(&job.payload) else {
            continue;
        };
        let rows = done_rows(job.result.as_deref());
        by_folder
            .entry(payload.fingerprint)
            .or_default()
            .push((job.id, payload.dataset, rows));
    }
    let mut reopen = Vec::new();
    for (fingerprint, jobs) in by_folder {
        let valid = match feature_store {
            None => {
                let dir = features::feature_dir(layout, &fingerprint);
                let report = features::reconcile(&dir, config)?;
                summary.removed_temp_files += report.removed_temp_files.len();
                summary.removed_unpublished += report.removed_unpublished.len();
                report.valid
            }
            Some(feature_store) => {
                let folder = store::store_folder(&fingerprint);
                let report = store::reconcile_store(feature_store, &folder, config.grace)?;
                summary.removed_unpublished += report.removed_unpublished.len();
                report.valid
            }
        };
        for (job_id, dataset, rows) in jobs {
            // A job whose images all failed has no shard, and that is fine.
            if rows == 0 || valid.contains(&(job_id as u64)) {
                continue;
            }
            let legacy = features::legacy_feature_dir(layout, &dataset, &fingerprint);
            if feature_store.is_none()
                && legacy
                    .join(features::done_file_name(job_id as u64))
                    .is_file()
            {
                summary.awaiting_migration.push(job_id);
            } else {
                reopen.push(job_id);
            }
        }
    }
    if !reopen.is_empty() {
        queue.reopen(&reopen)?;
    }
    summary.reopened_jobs = reopen;
    Ok(summary)
}

/// Rows a completed job wrote, from its result's `detail.rows`.
fn done_rows(result: Option<&str>) -> usize {
    result
        .and_then(|text| serde_json::from_str::<JobResult>(text).ok())
        .and_then(|result| result.detail.get("rows").and_then(|v| v.as_u64()))
        .map(|rows| rows as usize)
        .unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn micro_batches_keep_every_image_in_order_with_a_small_first_batch() {
        let threads = rayon::current_num_threads();
        for (len, batch_size) in [(64, 16), (5, 16), (1, 16), (0, 16), (64, 1), (7, 3)] {
            let indices: Vec<usize> = (0..len).collect();
            let batches = micro_batches(&indices, batch_size);
            assert_eq!(
                batches.concat(),
                indices,
                "{len} images, batches of {batch_size}"
            );
            assert!(
                batches
                    .iter()
                    .all(|b| !b.is_empty() && b.len() <= batch_size)
            );
            if len > 0 {
                assert_eq!(batches[0].len(), threads.min(batch_size).min(len));
            }
        }
    }
}

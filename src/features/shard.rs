//! Writing one shard and its `.done` marker, and checking them.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use half::f16;
use safetensors::Dtype;
use safetensors::tensor::TensorView;
use serde::{Deserialize, Serialize};

use super::FeatureError;

/// The layout of shards and their markers. Version 2 (issue 18) names each
/// row's image by the sha256 of its bytes (`content_sha256`) and lives in a
/// folder per fingerprint shared by every dataset; version 1 shards (an
/// `image_index` into one dataset's manifest, under `DATASET/FINGERPRINT`)
/// are read only by `lazarus features migrate`.
pub const SHARD_FORMAT_VERSION: u32 = 2;

/// Name of the per-row content id tensor: U8 [rows, 32].
pub const CONTENT_TENSOR: &str = "content_sha256";

/// The features of one chunk, borrowed from the caller.
#[derive(Debug, Clone, Copy)]
pub struct ShardData<'a> {
    /// The sha256 of the bytes each row was computed from.
    pub content_ids: &'a [[u8; 32]],
    /// Pooled features, row-major [rows, feature_dim].
    pub pooled: &'a [f16],
    pub feature_dim: usize,
    /// Spatial maps and tile geometry, for dense tasks (`enqueue --spatial`).
    pub spatial: Option<SpatialData<'a>>,
    /// The view of each row (`enqueue --views`, tensor `view`): an image's
    /// rows are consecutive, view 0 first; None in folders of one view.
    pub views: Option<&'a [u8]>,
}

/// Name of the per-row view tensor: U8 [rows] (`enqueue --views`).
pub const VIEW_TENSOR: &str = "view";

/// The spatial part of a shard: rows are tiles of images (an image small
/// enough for one tile has one row), each with its maps.
#[derive(Debug, Clone, Copy)]
pub struct SpatialData<'a> {
    /// Per row: x, y, width, height of its tile in the original image's pixels.
    pub tiles: &'a [[i64; 4]],
    /// Every map, finest first.
    pub maps: &'a [MapData<'a>],
}

/// One spatial map of every row of a shard, stored as tensor `spatial_sSTRIDE`.
#[derive(Debug, Clone, Copy)]
pub struct MapData<'a> {
    pub stride: usize,
    /// Row-major [rows, channels, height, width].
    pub values: &'a [f16],
    /// [channels, height, width].
    pub shape: [usize; 3],
}

/// The tensor name of a spatial map of this stride.
pub fn map_tensor_name(stride: usize) -> String {
    format!("spatial_s{stride}")
}

/// Which queue attempt produced a shard (for fencing and for the marker).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobRef {
    pub job_id: i64,
    pub attempt: u32,
}

/// The `.done` marker: the shard is complete and these are its facts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DoneMarker {
    pub shard: String,
    pub rows: usize,
    pub bytes: u64,
    pub sha256: String,
    pub job_id: i64,
    pub attempt: u32,
    pub lazarus_version: String,
    /// The shard format (`SHARD_FORMAT_VERSION`); markers before issue 18
    /// have none and are version 1.
    #[serde(default = "legacy_format")]
    pub format: u32,
}

fn legacy_format() -> u32 {
    1
}

pub fn shard_file_name(shard_index: u64) -> String {
    format!("shard-{shard_index:06}.safetensors")
}

pub fn done_file_name(shard_index: u64) -> String {
    format!("shard-{shard_index:06}.done")
}

/// Removes shard `shard_index` of the folder `dir`, marker first (so a
/// reader never finds a marker without its shard). Missing files are fine:
/// safe to repeat. Returns whether anything was there.
pub fn remove_shard(dir: &Path, shard_index: u64) -> Result<bool, FeatureError> {
    let mut removed = false;
    for name in [done_file_name(shard_index), shard_file_name(shard_index)] {
        let path = dir.join(name);
        match fs::remove_file(&path) {
            Ok(()) => removed = true,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(FeatureError::Io { path, source }),
        }
    }
    Ok(removed)
}

/// The shard index in a `shard-NNNNNN.done` or `.safetensors` name.
pub fn parse_shard_index(file_name: &str) -> Option<u64> {
    let stem = file_name.strip_prefix("shard-")?;
    let digits = stem
        .strip_suffix(".done")
        .or_else(|| stem.strip_suffix(".safetensors"))?;
    digits.parse().ok()
}

fn f16_bytes(values: &[f16]) -> &[u8] {
    bytemuck::cast_slice(values)
}

/// Serialises, writes and publishes a shard in a local folder: shard file
/// first (temp, fsync, rename), then its `.done` marker the same way. A crash
/// between the two leaves a shard without a marker, which readers ignore and
/// reconcile removes. (`store::publish_shard` does the same for any store.)
pub fn write_shard(
    dir: &Path,
    shard_index: u64,
    data: &ShardData<'_>,
    metadata: HashMap<String, String>,
    job: JobRef,
) -> Result<DoneMarker, FeatureError> {
    let local = super::store::LocalFeatureStore::new(dir);
    super::store::publish_shard(&local, "", shard_index, data, metadata, job)
}

/// The safetensors bytes of a shard and the marker that publishes them;
/// `location` names the shard in errors.
pub(crate) fn encode_shard(
    location: &Path,
    shard_index: u64,
    data: &ShardData<'_>,
    metadata: HashMap<String, String>,
    job: JobRef,
) -> Result<(Vec<u8>, DoneMarker), FeatureError> {
    let rows = data.content_ids.len();
    let invalid = |message: String| FeatureError::InvalidShard {
        path: location.to_path_buf(),
        message,
    };
    if data.pooled.len() != rows * data.feature_dim {
        return Err(invalid(format!(
            "pooled has {} values, expected {rows} rows x {} = {}",
            data.pooled.len(),
            data.feature_dim,
            rows * data.feature_dim
        )));
    }
    let id_bytes: &[u8] = data.content_ids.as_flattened();
    let mut tensors: Vec<(&str, TensorView<'_>)> = vec![
        (
            CONTENT_TENSOR,
            TensorView::new(Dtype::U8, vec![rows, 32], id_bytes)
                .map_err(|e| invalid(e.to_string()))?,
        ),
        (
            "pooled",
            TensorView::new(
                Dtype::F16,
                vec![rows, data.feature_dim],
                f16_bytes(data.pooled),
            )
            .map_err(|e| invalid(e.to_string()))?,
        ),
    ];
    let names: Vec<String> = data
        .spatial
        .iter()
        .flat_map(|spatial| spatial.maps.iter().map(|map| map_tensor_name(map.stride)))
        .collect();
    if let Some(views) = data.views {
        if views.len() != rows {
            return Err(invalid(format!("{} views for {rows} rows", views.len())));
        }
        tensors.push((
            VIEW_TENSOR,
            TensorView::new(Dtype::U8, vec![rows], views).map_err(|e| invalid(e.to_string()))?,
        ));
    }
    if let Some(spatial) = data.spatial {
        if spatial.tiles.len() != rows {
            return Err(invalid(format!(
                "{} tiles for {rows} rows",
                spatial.tiles.len()
            )));
        }
        tensors.push((
            "tile",
            TensorView::new(
                Dtype::I64,
                vec![rows, 4],
                bytemuck::cast_slice(spatial.tiles),
            )
            .map_err(|e| invalid(e.to_string()))?,
        ));
        for (map, name) in spatial.maps.iter().zip(&names) {
            let [channels, height, width] = map.shape;
            if map.values.len() != rows * channels * height * width {
                return Err(invalid(format!(
                    "{name} has {} values, expected {rows}x{channels}x{height}x{width}",
                    map.values.len()
                )));
            }
            tensors.push((
                name.as_str(),
                TensorView::new(
                    Dtype::F16,
                    vec![rows, channels, height, width],
                    f16_bytes(map.values),
                )
                .map_err(|e| invalid(e.to_string()))?,
            ));
        }
    }
    let bytes =
        safetensors::serialize(tensors, Some(metadata)).map_err(|e| invalid(e.to_string()))?;
    let marker = DoneMarker {
        shard: shard_file_name(shard_index),
        rows,
        bytes: bytes.len() as u64,
        sha256: crate::digest::sha256_hex(&bytes),
        job_id: job.job_id,
        attempt: job.attempt,
        lazarus_version: crate::VERSION.to_string(),
        format: SHARD_FORMAT_VERSION,
    };
    Ok((bytes, marker))
}

/// How thoroughly to check a shard against its marker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckLevel {
    /// Marker parses and the shard's size matches: cheap, for readers.
    Size,
    /// Also the sha256 of the whole shard: for verify and reconcile.
    Checksum,
}

/// Reads a marker and checks its shard. `Err` carries the reason it is not usable.
pub fn check_shard(dir: &Path, shard_index: u64, level: CheckLevel) -> Result<DoneMarker, String> {
    let done_path = dir.join(done_file_name(shard_index));
    let text =
        fs::read_to_string(&done_path).map_err(|e| format!("{}: {e}", done_path.display()))?;
    let marker: DoneMarker = serde_json::from_str(&text)
        .map_err(|e| format!("{}: unreadable marker: {e}", done_path.display()))?;
    let shard_path = dir.join(shard_file_name(shard_index));
    let size = fs::metadata(&shard_path)
        .map_err(|e| format!("{}: {e}", shard_path.display()))?
        .len();
    if size != marker.bytes {
        return Err(format!(
            "{}: {size} bytes, marker says {}",
            shard_path.display(),
            marker.bytes
        ));
    }
    if level == CheckLevel::Checksum {
        let bytes = fs::read(&shard_path).map_err(|e| format!("{}: {e}", shard_path.display()))?;
        let sha256 = crate::digest::sha256_hex(&bytes);
        if sha256 != marker.sha256 {
            return Err(format!(
                "{}: sha256 {sha256}, marker says {}",
                shard_path.display(),
                marker.sha256
            ));
        }
    }
    Ok(marker)
}

/// What `reconcile` found and did in one feature folder.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize)]
pub struct ReconcileReport {
    /// Temp files left by killed writers, now removed.
    pub removed_temp_files: Vec<PathBuf>,
    /// Shards without a marker (never published), now removed.
    pub removed_unpublished: Vec<PathBuf>,
    /// Shards whose marker or content is wrong, now removed, with the reason:
    /// their jobs must be redone.
    pub invalid: Vec<(u64, String)>,
    /// Shards that checked out.
    pub valid: Vec<u64>,
}

/// How `reconcile` treats files that may belong to a writer still at work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReconcileConfig {
    /// Temp files and unpublished shards younger than this are left alone:
    /// another worker may be between its writes. Zero when no writer runs.
    pub grace: std::time::Duration,
}

fn older_than(path: &Path, grace: std::time::Duration) -> bool {
    if grace.is_zero() {
        return true;
    }
    fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|modified| modified.elapsed().ok())
        .is_some_and(|age| age >= grace)
}

/// Brings a feature folder to a state where every file is a published,
/// checksum-valid shard with its marker. Safe to repeat; safe beside live
/// writers as long as `config.grace` exceeds the time one shard write takes.
pub fn reconcile(dir: &Path, config: &ReconcileConfig) -> Result<ReconcileReport, FeatureError> {
    let mut report = ReconcileReport::default();
    if !dir.exists() {
        return Ok(report);
    }
    let mut shards = Vec::new();
    let mut markers = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| FeatureError::io(dir, e))? {
        let entry = entry.map_err(|e| FeatureError::io(dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if crate::atomic::is_temp_name(&name) {
            if older_than(&entry.path(), config.grace) {
                remove_if_present(&entry.path())?;
                report.removed_temp_files.push(entry.path());
            }
        } else if let Some(index) = parse_shard_index(&name) {
            if name.ends_with(".done") {
                markers.push(index);
            } else {
                shards.push(index);
            }
        }
    }
    markers.sort_unstable();
    for &index in &shards {
        let path = dir.join(shard_file_name(index));
        if markers.binary_search(&index).is_err() && older_than(&path, config.grace) {
            remove_if_present(&path)?;
            report.removed_unpublished.push(path);
        }
    }
    for index in markers {
        match check_shard(dir, index, CheckLevel::Checksum) {
            Ok(_) => report.valid.push(index),
            Err(reason) => {
                // Marker first: a crash here leaves an unpublished shard, never a false marker.
                for name in [done_file_name(index), shard_file_name(index)] {
                    remove_if_present(&dir.join(name))?;
                }
                report.invalid.push((index, reason));
            }
        }
    }
    if !report.removed_temp_files.is_empty() || !report.invalid.is_empty() {
        crate::atomic::sync_dir(dir).map_err(|e| FeatureError::io(dir, e))?;
    }
    Ok(report)
}

/// Removes a file; one that another process removed first is fine.
fn remove_if_present(path: &Path) -> Result<(), FeatureError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(FeatureError::io(path, e)),
    }
}

//! `lazarus features migrate`: converts a feature cache of the layout before
//! issue 18 (`features/DATASET/FINGERPRINT/`, rows named by their index in
//! one dataset's manifest) into the shared layout (`features/FINGERPRINT/`,
//! rows named by content id).
//!
//! A row is kept only when the image file its manifest row names still
//! hashes to the id the manifest recorded at `dataset add`; its new id is
//! that file's full sha256. Rows whose file changed or went missing are
//! dropped and reported (`verify --repair` then re-queues their jobs).
//!
//! A fingerprint with folders under several datasets is refused: a worker
//! of those versions cached one manifest per fingerprint, so one dataset's
//! shards may hold another's features (issue 18), and nothing in the shards
//! can tell. Those folders are left in place; extract the datasets again.
//!
//! Each migrated shard keeps its shard index (its job's id) and is written
//! like a worker's (shard, then marker, each atomically); the old folder is
//! removed once all its shards are converted. A killed migration is simply
//! run again: shards already converted are kept.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use half::f16;
use serde::Serialize;

use super::catalog::fingerprint_folders;
use super::{
    CheckLevel, FeatureError, JobRef, MapData, ShardData, SpatialData, check_shard, feature_dir,
    marked_shards, shard_file_name, write_shard,
};
use crate::dataset::{self, ImageRecord};
use crate::layout::Layout;

/// One old folder converted.
#[derive(Debug, Clone, Serialize)]
pub struct MigratedFolder {
    pub dataset: String,
    pub fingerprint: String,
    /// The old folder, now removed.
    pub from: PathBuf,
    pub to: PathBuf,
    pub shards: usize,
    pub rows: usize,
    /// Rows not carried over, with the reason.
    pub dropped: Vec<DroppedRow>,
    /// Shards whose checksum or content was wrong (not carried over).
    pub corrupt: Vec<(u64, String)>,
}

/// A row of an old shard that could not be identified.
#[derive(Debug, Clone, Serialize)]
pub struct DroppedRow {
    pub shard: u64,
    pub image_index: usize,
    pub path: Option<PathBuf>,
    pub reason: String,
}

/// An old folder left as it was, and why.
#[derive(Debug, Clone, Serialize)]
pub struct RefusedFolder {
    pub dataset: String,
    pub fingerprint: String,
    pub dir: PathBuf,
    pub reason: String,
}

/// What `migrate` did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct MigrateReport {
    pub migrated: Vec<MigratedFolder>,
    pub refused: Vec<RefusedFolder>,
}

/// Every old-layout folder under `features/`: (dataset, fingerprint, folder).
pub fn legacy_layout_folders(
    layout: &Layout,
) -> Result<Vec<(String, String, PathBuf)>, FeatureError> {
    let features = layout.features_dir();
    let shared: Vec<String> = fingerprint_folders(&features)?;
    let entries = match std::fs::read_dir(&features) {
        Ok(entries) => entries,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(err) => return Err(FeatureError::io(&features, err)),
    };
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| FeatureError::io(&features, e))?;
        let dataset = entry.file_name().to_string_lossy().into_owned();
        if crate::atomic::is_temp_name(&dataset)
            || !entry.path().is_dir()
            || shared.contains(&dataset)
        {
            continue;
        }
        for folder in super::catalog::legacy_folders(&features, &dataset) {
            let fingerprint = folder
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            found.push((dataset.clone(), fingerprint, folder));
        }
    }
    found.sort();
    Ok(found)
}

/// Converts every old-layout folder that can be trusted (see the module's note).
pub fn migrate(layout: &Layout) -> Result<MigrateReport, FeatureError> {
    let folders = legacy_layout_folders(layout)?;
    let mut datasets_of: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (dataset, fingerprint, _) in &folders {
        datasets_of.entry(fingerprint).or_default().push(dataset);
    }
    let mut report = MigrateReport::default();
    for (dataset, fingerprint, dir) in &folders {
        let sharing = &datasets_of[fingerprint.as_str()];
        if sharing.len() > 1 {
            report.refused.push(RefusedFolder {
                dataset: dataset.clone(),
                fingerprint: fingerprint.clone(),
                dir: dir.clone(),
                reason: format!(
                    "fingerprint {} has folders of datasets {}: a worker before issue 18 may have written one dataset's features under another's images, which the shards cannot show; extract again (`lazarus enqueue --dataset {dataset} --encoder ENCODER`, `lazarus run-worker`) and delete {}",
                    &fingerprint[..fingerprint.len().min(12)],
                    sharing.join(", "),
                    dir.display()
                ),
            });
            continue;
        }
        let records = match dataset::load_all_rows(layout, dataset) {
            Ok(rows) => rows,
            Err(err) => {
                report.refused.push(RefusedFolder {
                    dataset: dataset.clone(),
                    fingerprint: fingerprint.clone(),
                    dir: dir.clone(),
                    reason: format!(
                        "its rows name images of dataset '{dataset}', which cannot be read ({err})"
                    ),
                });
                continue;
            }
        };
        report
            .migrated
            .push(migrate_folder(layout, dataset, fingerprint, dir, &records)?);
    }
    Ok(report)
}

fn migrate_folder(
    layout: &Layout,
    dataset: &str,
    fingerprint: &str,
    dir: &Path,
    records: &[ImageRecord],
) -> Result<MigratedFolder, FeatureError> {
    let to = feature_dir(layout, fingerprint);
    let mut out = MigratedFolder {
        dataset: dataset.to_string(),
        fingerprint: fingerprint.to_string(),
        from: dir.to_path_buf(),
        to: to.clone(),
        shards: 0,
        rows: 0,
        dropped: Vec::new(),
        corrupt: Vec::new(),
    };
    // The sha256 of each image file, read once (tiles share an image).
    let mut hashed: HashMap<usize, Result<[u8; 32], String>> = HashMap::new();
    for shard_index in marked_shards(dir)? {
        let marker = match check_shard(dir, shard_index, CheckLevel::Checksum) {
            Ok(marker) => marker,
            Err(reason) => {
                out.corrupt.push((shard_index, reason));
                continue;
            }
        };
        if check_shard(&to, shard_index, CheckLevel::Checksum).is_ok() {
            // Converted by an earlier, interrupted run (or rewritten by its job).
            out.shards += 1;
            continue;
        }
        let path = dir.join(shard_file_name(shard_index));
        let bytes = std::fs::read(&path).map_err(|e| FeatureError::io(&path, e))?;
        let old = match OldShard::parse(&path, &bytes) {
            Ok(old) => old,
            Err(reason) => {
                out.corrupt.push((shard_index, reason));
                continue;
            }
        };
        let mut keep: Vec<(usize, [u8; 32])> = Vec::new();
        for (row, &image_index) in old.image_index.iter().enumerate() {
            let Some(record) = records.get(image_index).filter(|r| r.index == image_index) else {
                out.dropped.push(DroppedRow {
                    shard: shard_index,
                    image_index,
                    path: None,
                    reason: format!("dataset '{dataset}' has no image {image_index}"),
                });
                continue;
            };
            let hash = hashed
                .entry(image_index)
                .or_insert_with(|| hash_image(record));
            match hash {
                Ok(sha256) => keep.push((row, *sha256)),
                Err(reason) => out.dropped.push(DroppedRow {
                    shard: shard_index,
                    image_index,
                    path: Some(record.path.clone()),
                    reason: reason.clone(),
                }),
            }
        }
        if keep.is_empty() {
            continue;
        }
        let content_ids: Vec<[u8; 32]> = keep.iter().map(|(_, id)| *id).collect();
        let rows: Vec<usize> = keep.iter().map(|(row, _)| *row).collect();
        let pooled = pick_rows(&old.pooled, old.feature_dim, &rows);
        let tiles: Option<Vec<[i64; 4]>> = old
            .tiles
            .as_ref()
            .map(|tiles| rows.iter().map(|&row| tiles[row]).collect());
        let map_values: Vec<(usize, [usize; 3], Vec<f16>)> = old
            .maps
            .iter()
            .map(|(stride, shape, values)| {
                (
                    *stride,
                    *shape,
                    pick_rows(values, shape.iter().product(), &rows),
                )
            })
            .collect();
        let maps: Vec<MapData<'_>> = map_values
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
            feature_dim: old.feature_dim,
            spatial: tiles
                .as_ref()
                .map(|tiles| SpatialData { tiles, maps: &maps }),
            views: None,
        };
        let mut metadata = old.metadata;
        metadata.remove("dataset");
        metadata.insert(
            "migrated_from".to_string(),
            format!("{dataset}/{fingerprint}"),
        );
        write_shard(
            &to,
            shard_index,
            &data,
            metadata,
            JobRef {
                job_id: marker.job_id,
                attempt: marker.attempt,
            },
        )?;
        out.shards += 1;
        out.rows += content_ids.len();
    }
    std::fs::remove_dir_all(dir).map_err(|e| FeatureError::io(dir, e))?;
    if let Some(parent) = dir.parent() {
        // The dataset's folder goes once its last fingerprint did.
        let _ = std::fs::remove_dir(parent);
    }
    Ok(out)
}

/// The file's sha256 when it still matches the id `dataset add` recorded.
fn hash_image(record: &ImageRecord) -> Result<[u8; 32], String> {
    let bytes = crate::files::read_regular_file(&record.path)
        .map_err(|e| format!("{}: {e}", record.path.display()))?;
    let sha256 = crate::digest::sha256(&bytes);
    if record.content_id().matches(&sha256) {
        Ok(sha256)
    } else {
        Err(format!(
            "{}: changed since `dataset add` (sha256 {}, the manifest has {})",
            record.path.display(),
            hex::encode(sha256),
            record.id
        ))
    }
}

fn pick_rows(values: &[f16], row_len: usize, rows: &[usize]) -> Vec<f16> {
    let mut out = Vec::with_capacity(rows.len() * row_len);
    for &row in rows {
        out.extend_from_slice(&values[row * row_len..(row + 1) * row_len]);
    }
    out
}

/// A shard of the old format, copied out of its bytes.
struct OldShard {
    image_index: Vec<usize>,
    pooled: Vec<f16>,
    feature_dim: usize,
    tiles: Option<Vec<[i64; 4]>>,
    /// (stride, [channels, height, width], values)
    maps: Vec<(usize, [usize; 3], Vec<f16>)>,
    metadata: HashMap<String, String>,
}

impl OldShard {
    fn parse(path: &Path, bytes: &[u8]) -> Result<Self, String> {
        let bad = |message: String| format!("{}: {message}", path.display());
        let tensors =
            safetensors::SafeTensors::deserialize(bytes).map_err(|e| bad(e.to_string()))?;
        let (_, header) =
            safetensors::SafeTensors::read_metadata(bytes).map_err(|e| bad(e.to_string()))?;
        let metadata = header.metadata().clone().unwrap_or_default();
        let index = tensors
            .tensor("image_index")
            .map_err(|_| bad("no 'image_index' tensor".into()))?;
        let image_index: Vec<usize> = index
            .data()
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")) as usize)
            .collect();
        let rows = image_index.len();
        let f16s = |name: &str| -> Result<(Vec<f16>, Vec<usize>), String> {
            let view = tensors
                .tensor(name)
                .map_err(|_| bad(format!("no '{name}' tensor")))?;
            let values = view
                .data()
                .chunks_exact(2)
                .map(|c| f16::from_le_bytes([c[0], c[1]]))
                .collect();
            Ok((values, view.shape().to_vec()))
        };
        let (pooled, shape) = f16s("pooled")?;
        if shape.first() != Some(&rows) {
            return Err(bad(format!("pooled has shape {shape:?} for {rows} rows")));
        }
        let feature_dim = shape.get(1).copied().unwrap_or(0);
        let tiles = match tensors.tensor("tile") {
            Ok(view) => Some(
                view.data()
                    .chunks_exact(32)
                    .map(|c| {
                        std::array::from_fn(|i| {
                            i64::from_le_bytes(c[i * 8..i * 8 + 8].try_into().expect("8 bytes"))
                        })
                    })
                    .collect::<Vec<[i64; 4]>>(),
            ),
            Err(_) => None,
        };
        let mut maps = Vec::new();
        for name in tensors.names() {
            if let Some(stride) = name
                .strip_prefix("spatial_s")
                .and_then(|digits| digits.parse::<usize>().ok())
            {
                let (values, shape) = f16s(name)?;
                let [n, channels, height, width] = shape[..] else {
                    return Err(bad(format!("{name} has shape {shape:?}")));
                };
                if n != rows {
                    return Err(bad(format!("{name} has {n} rows, image_index {rows}")));
                }
                maps.push((stride, [channels, height, width], values));
            }
        }
        maps.sort_by_key(|(stride, _, _)| *stride);
        Ok(OldShard {
            image_index,
            pooled,
            feature_dim,
            tiles,
            maps,
            metadata,
        })
    }
}

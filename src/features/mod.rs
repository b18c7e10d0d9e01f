//! The feature cache: float16 safetensors shards with `.done` markers under
//! `features/FINGERPRINT/`, one folder per encoder fingerprint shared by
//! every dataset, and the memory-mapped reader the training side uses.
//!
//! Identity: a feature row belongs to image content, not to a dataset. Each
//! shard stores, per row, the sha256 of the bytes the worker decoded
//! (`content_sha256`), so the same image in two datasets (or twice under two
//! names) is one row per fingerprint, and a reader joins a dataset's
//! manifest to rows by content id (`catalog`), never by position.
//!
//! Crash behaviour: a shard is written to a temp file, fsynced and renamed;
//! only then is its `.done` marker written the same way. A process killed at
//! any point leaves (a) a temp file, removed by `reconcile`; (b) a shard
//! without a marker, never read and removed by `reconcile`; or (c) a shard
//! with its marker, complete. A marker whose size or checksum does not match
//! its shard makes the shard corrupt: readers refuse it by name.
//!
//! `store` puts publishing behind the `FeatureStore` trait: the local file
//! system by default, an object store (S3 and compatible) as an option, with
//! the same order (shard, then `.done`) and `download` to map remote shards.
//! `migrate` converts caches of the layout before issue 18.

pub mod catalog;
pub mod migrate;
mod set;
mod shard;
pub mod store;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::layout::Layout;

pub use set::{FeatureSet, MapShape};
pub use shard::{
    CONTENT_TENSOR, CheckLevel, DoneMarker, JobRef, MapData, ReconcileConfig, ReconcileReport,
    SHARD_FORMAT_VERSION, ShardData, SpatialData, VIEW_TENSOR, check_shard, done_file_name,
    map_tensor_name, parse_shard_index, reconcile, remove_shard, shard_file_name, write_shard,
};

/// The command that rebuilds a damaged shard, for messages.
pub const REPAIR_COMMAND: &str = "`lazarus verify --repair`, then `lazarus run-worker`";

/// Errors at the feature-cache boundary; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum FeatureError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{location}: {message}")]
    Store { location: String, message: String },
    #[error("{path}: invalid shard: {message}")]
    InvalidShard { path: PathBuf, message: String },
    #[error("corrupt feature shard: {reason}; run {REPAIR_COMMAND} to extract it again")]
    CorruptShard { path: PathBuf, reason: String },
    #[error(
        "{dir}: image {id} has rows in both {first} and {second}; run `lazarus verify --repair`"
    )]
    DuplicateImage {
        dir: PathBuf,
        id: String,
        first: PathBuf,
        second: PathBuf,
    },
    #[error(
        "{dir} holds features in the layout of lazarus before issue 18 (rows named by manifest position, which cannot be checked); run `lazarus features migrate` to convert it (it checks every image against its sha256), or extract again with `lazarus enqueue --dataset {dataset} --encoder ENCODER`"
    )]
    LegacyLayout { dir: PathBuf, dataset: String },
    #[error("{0}")]
    NoFeatures(String),
    #[error(
        "{dir}: {ambiguous} feature rows match the short id {id} of dataset {dataset}'s manifest; run `lazarus dataset update {dataset}` to record full sha256 ids"
    )]
    AmbiguousId {
        dir: PathBuf,
        dataset: String,
        id: String,
        ambiguous: usize,
    },
    #[error(transparent)]
    Dataset(#[from] crate::dataset::DatasetError),
}

impl FeatureError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        FeatureError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// The folder of the features of one encoder fingerprint.
pub fn feature_dir(layout: &Layout, fingerprint: &str) -> PathBuf {
    layout.features_dir().join(fingerprint)
}

/// Where lazarus before issue 18 kept one dataset's features under one
/// fingerprint (read only by `migrate`).
pub fn legacy_feature_dir(layout: &Layout, dataset: &str, fingerprint: &str) -> PathBuf {
    layout.features_dir().join(dataset).join(fingerprint)
}

/// Indices of the shards in `dir` that have a `.done` marker, ascending.
/// A missing folder has none.
pub fn marked_shards(dir: &Path) -> Result<Vec<u64>, FeatureError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(err) => return Err(FeatureError::io(dir, err)),
    };
    let mut indices = Vec::new();
    for entry in entries {
        let name = entry
            .map_err(|e| FeatureError::io(dir, e))?
            .file_name()
            .to_string_lossy()
            .into_owned();
        if name.ends_with(".done")
            && let Some(index) = parse_shard_index(&name)
        {
            indices.push(index);
        }
    }
    indices.sort_unstable();
    Ok(indices)
}

/// The rows of a folder's published shards, as `verify` reads them: every
/// shard checked against its marker (full checksum) and its content ids.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FolderRows {
    /// The content id of each row, per checksum-valid shard.
    pub shards: BTreeMap<u64, Vec<[u8; 32]>>,
    /// Shards whose marker, checksum or content is wrong, with the reason.
    pub corrupt: Vec<(u64, String)>,
}

/// The content ids of the rows of one shard's bytes; `path` names it in
/// errors. Refuses shards of another format and ids that do not match the
/// row count.
pub fn shard_content_ids(path: &Path, bytes: &[u8]) -> Result<Vec<[u8; 32]>, String> {
    let tensors = safetensors::SafeTensors::deserialize(bytes)
        .map_err(|e| format!("{}: not a safetensors file: {e}", path.display()))?;
    let ids = tensors.tensor(CONTENT_TENSOR).map_err(|_| {
        format!(
            "{}: no '{CONTENT_TENSOR}' tensor (a shard of the layout before issue 18?)",
            path.display()
        )
    })?;
    if ids.dtype() != safetensors::Dtype::U8 || ids.shape().len() != 2 || ids.shape()[1] != 32 {
        return Err(format!(
            "{}: '{CONTENT_TENSOR}' is {:?} {:?}, expected U8 [rows, 32]",
            path.display(),
            ids.dtype(),
            ids.shape()
        ));
    }
    let rows = tensors
        .tensor("pooled")
        .map(|pooled| pooled.shape().first().copied().unwrap_or(0))
        .map_err(|_| format!("{}: no 'pooled' tensor", path.display()))?;
    if ids.shape()[0] != rows {
        return Err(format!(
            "{}: {} content ids for {rows} rows",
            path.display(),
            ids.shape()[0]
        ));
    }
    Ok(ids
        .data()
        .chunks_exact(32)
        .map(|chunk| chunk.try_into().expect("32 bytes"))
        .collect())
}

/// Reads every shard in `dir` with its marker (full checksum) and content
/// ids. Reads only; repairs are the caller's (see `reconcile`).
pub fn read_folder_rows(dir: &Path) -> Result<FolderRows, FeatureError> {
    let mut rows = FolderRows::default();
    for shard_index in marked_shards(dir)? {
        let marker = match check_shard(dir, shard_index, CheckLevel::Checksum) {
            Ok(marker) => marker,
            Err(reason) => {
                rows.corrupt.push((shard_index, reason));
                continue;
            }
        };
        let path = dir.join(shard_file_name(shard_index));
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(err) => {
                rows.corrupt
                    .push((shard_index, format!("{}: {err}", path.display())));
                continue;
            }
        };
        add_shard_rows(&mut rows, &path, shard_index, &marker, &bytes);
    }
    Ok(rows)
}

/// [`read_folder_rows`] for a folder of a [`store::FeatureStore`].
pub fn read_store_rows(
    store: &dyn store::FeatureStore,
    folder: &str,
) -> Result<FolderRows, FeatureError> {
    let mut rows = FolderRows::default();
    for shard_index in store::published_shards(store, folder)? {
        let marker =
            match store::check_stored_shard(store, folder, shard_index, CheckLevel::Checksum) {
                Ok(marker) => marker,
                Err(reason) => {
                    rows.corrupt.push((shard_index, reason));
                    continue;
                }
            };
        let name = shard_file_name(shard_index);
        let path = PathBuf::from(store.describe(folder, &name));
        let Some(bytes) = store.read(folder, &name)? else {
            rows.corrupt.push((
                shard_index,
                format!("{}: removed while verifying", path.display()),
            ));
            continue;
        };
        add_shard_rows(&mut rows, &path, shard_index, &marker, &bytes);
    }
    Ok(rows)
}

fn add_shard_rows(
    rows: &mut FolderRows,
    path: &Path,
    shard_index: u64,
    marker: &DoneMarker,
    bytes: &[u8],
) {
    if marker.format != SHARD_FORMAT_VERSION {
        rows.corrupt.push((
            shard_index,
            format!(
                "{}: shard format {}, this lazarus reads {SHARD_FORMAT_VERSION} here",
                path.display(),
                marker.format
            ),
        ));
        return;
    }
    match shard_content_ids(path, bytes) {
        Ok(ids) => {
            rows.shards.insert(shard_index, ids);
        }
        Err(reason) => rows.corrupt.push((shard_index, reason)),
    }
}

/// The content ids of the rows of the published shards in `dir`, read from
/// each shard's header and id tensor alone, without the checksum: for
/// `enqueue`'s coverage, where a damaged shard only means an image is not
/// redone (`verify` finds the damage). A missing folder has none.
pub fn published_content_ids(dir: &Path) -> Vec<[u8; 32]> {
    let mut ids = Vec::new();
    for shard_index in marked_shards(dir).unwrap_or_default() {
        if let Ok(shard_ids) = header_content_ids(&dir.join(shard_file_name(shard_index))) {
            ids.extend(shard_ids);
        }
    }
    ids
}

fn invalid_data(message: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, message)
}

/// A shard's safetensors header (JSON) and its length, read alone.
fn shard_header(file: &mut std::fs::File) -> std::io::Result<(serde_json::Value, u64)> {
    use std::io::Read;
    let mut length = [0u8; 8];
    file.read_exact(&mut length)?;
    let header_len = u64::from_le_bytes(length);
    if header_len > 100 << 20 {
        return Err(invalid_data("header too large"));
    }
    let mut header = vec![0u8; header_len as usize];
    file.read_exact(&mut header)?;
    let header = serde_json::from_slice(&header).map_err(|_| invalid_data("header is not JSON"))?;
    Ok((header, header_len))
}

/// What made a folder's features, as its shard headers say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FolderKind {
    /// The encoder named in the metadata.
    pub encoder: Option<String>,
    /// Whether the rows hold spatial maps.
    pub spatial: bool,
    /// The pooled layers (`enqueue --layers`), canonical: `last` when the
    /// metadata names none.
    pub layers: String,
    /// The input square and resize policy (`crop`, `stretch` or `pad`) of the
    /// recorded preprocessing; None when the metadata has none.
    pub input: Option<(u32, String)>,
    /// The views per image (`enqueue --views`): `1` when the metadata
    /// names none.
    pub views: String,
    /// The spatial maps (`enqueue --maps`), canonical: `16,32` when the
    /// metadata names none.
    pub maps: String,
}

/// The extraction options shard metadata records: the pooled layers
/// (`layers`, canonical; `last` when absent) and the input square with its
/// resize policy (from `preprocess`; None when it is absent or unreadable).
pub fn recorded_options(
    layers: Option<&str>,
    preprocess: Option<&str>,
) -> (String, Option<(u32, &'static str)>) {
    let input = preprocess
        .and_then(|text| serde_json::from_str::<crate::preprocess::PreprocessConfig>(text).ok())
        .map(|preprocess| (preprocess.input_size, preprocess.resize.name()));
    (layers.unwrap_or("last").to_string(), input)
}

/// What made a folder's features, from its first published shard's header
/// alone. `None` when no shard's header reads.
pub fn folder_kind(dir: &Path) -> Option<FolderKind> {
    for shard_index in marked_shards(dir).unwrap_or_default() {
        let path = dir.join(shard_file_name(shard_index));
        let Ok((header, _)) = std::fs::File::open(&path).and_then(|mut f| shard_header(&mut f))
        else {
            continue;
        };
        let encoder = header["__metadata__"]["encoder"]
            .as_str()
            .map(str::to_string);
        let spatial = header
            .as_object()
            .is_some_and(|tensors| tensors.keys().any(|name| name.starts_with("spatial_s")));
        let metadata = &header["__metadata__"];
        let (layers, input) =
            recorded_options(metadata["layers"].as_str(), metadata["preprocess"].as_str());
        return Some(FolderKind {
            encoder,
            spatial,
            layers,
            input: input.map(|(size, resize)| (size, resize.to_string())),
            views: metadata["views"].as_str().unwrap_or("1").to_string(),
            maps: metadata["maps"].as_str().unwrap_or("16,32").to_string(),
        });
    }
    None
}

/// The `content_sha256` tensor of a shard, read by seeking past the rest.
fn header_content_ids(path: &Path) -> std::io::Result<Vec<[u8; 32]>> {
    use std::io::{Read, Seek, SeekFrom};
    let invalid = invalid_data;
    let mut file = std::fs::File::open(path)?;
    let (header, header_len) = shard_header(&mut file)?;
    let entry = &header[CONTENT_TENSOR];
    let offsets = entry["data_offsets"]
        .as_array()
        .and_then(|o| Some((o.first()?.as_u64()?, o.get(1)?.as_u64()?)))
        .ok_or_else(|| invalid("no content ids"))?;
    if entry["dtype"] != "U8" || offsets.1 < offsets.0 || (offsets.1 - offsets.0) % 32 != 0 {
        return Err(invalid("content ids are not U8 [rows, 32]"));
    }
    file.seek(SeekFrom::Start(8 + header_len + offsets.0))?;
    let mut bytes = vec![0u8; (offsets.1 - offsets.0) as usize];
    file.read_exact(&mut bytes)?;
    Ok(bytes
        .chunks_exact(32)
        .map(|chunk| chunk.try_into().expect("32 bytes"))
        .collect())
}

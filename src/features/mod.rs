//! The feature cache: float16 safetensors shards with `.done` markers under
//! `features/DATASET/FINGERPRINT/`, and the memory-mapped reader the training
//! side uses.
//!
//! Crash behaviour: a shard is written to a temp file, fsynced and renamed;
//! only then is its `.done` marker written the same way. A process killed at
//! any point leaves (a) a temp file, removed by `reconcile`; (b) a shard
//! without a marker, never read and removed by `reconcile`; or (c) a shard
//! with its marker, complete. A marker whose size or checksum does not match
//! its shard is treated as missing.
//!
//! `store` puts publishing behind the `FeatureStore` trait: the local file
//! system by default, an object store (S3 and compatible) as an option, with
//! the same order (shard, then `.done`) and `download` to map remote shards.

mod set;
mod shard;
pub mod store;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::layout::Layout;

pub use set::{FeatureSet, MapShape};
pub use shard::{
    CheckLevel, DoneMarker, JobRef, MapData, ReconcileConfig, ReconcileReport, ShardData,
    SpatialData, check_shard, done_file_name, map_tensor_name, parse_shard_index, reconcile,
    shard_file_name, write_shard,
};

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
    #[error(
        "{dir}: image {image_index} has rows in both {first} and {second}; run `lazarus verify --repair`"
    )]
    DuplicateImage {
        dir: PathBuf,
        image_index: usize,
        first: PathBuf,
        second: PathBuf,
    },
}

impl FeatureError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        FeatureError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// The folder of one dataset's features under one encoder fingerprint.
pub fn feature_dir(layout: &Layout, dataset: &str, fingerprint: &str) -> PathBuf {
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

/// What `verify` found in a feature folder.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct VerifyReport {
    /// Nothing missing, duplicated or corrupt.
    pub ok: bool,
    /// Feature rows in valid shards.
    pub rows: usize,
    /// Expected manifest indices with no row.
    pub missing: Vec<usize>,
    /// Manifest indices with more than one row, with the shards holding them.
    pub duplicates: BTreeMap<usize, Vec<u64>>,
    /// Shards whose marker or content is wrong, with the reason.
    pub corrupt: Vec<(u64, String)>,
    /// Rows for manifest indices that were not expected.
    pub unexpected: Vec<usize>,
}

/// Checks every shard in `dir` against its marker (full checksum) and the
/// expected manifest indices: each exactly once. Reads only; repairs are the
/// caller's (see `reconcile`).
pub fn verify(dir: &Path, expected: &[usize]) -> Result<VerifyReport, FeatureError> {
    let mut tally = RowTally::default();
    if dir.exists() {
        for shard_index in marked_shards(dir)? {
            if let Err(reason) = check_shard(dir, shard_index, CheckLevel::Checksum) {
                tally.report.corrupt.push((shard_index, reason));
                continue;
            }
            let path = dir.join(shard_file_name(shard_index));
            let bytes = std::fs::read(&path).map_err(|e| FeatureError::io(&path, e))?;
            tally.add_shard(&path, shard_index, &bytes)?;
        }
    }
    Ok(tally.finish(expected))
}

/// [`verify`] for a folder of a [`store::FeatureStore`]: every published
/// shard against its marker (full checksum) and the expected indices.
pub fn verify_store(
    store: &dyn store::FeatureStore,
    folder: &str,
    expected: &[usize],
) -> Result<VerifyReport, FeatureError> {
    let mut tally = RowTally::default();
    for shard_index in store::published_shards(store, folder)? {
        if let Err(reason) =
            store::check_stored_shard(store, folder, shard_index, CheckLevel::Checksum)
        {
            tally.report.corrupt.push((shard_index, reason));
            continue;
        }
        let name = shard_file_name(shard_index);
        let path = PathBuf::from(store.describe(folder, &name));
        let Some(bytes) = store.read(folder, &name)? else {
            tally.report.corrupt.push((
                shard_index,
                format!("{}: removed while verifying", path.display()),
            ));
            continue;
        };
        tally.add_shard(&path, shard_index, &bytes)?;
    }
    Ok(tally.finish(expected))
}

/// The rows of the shards `verify` has read so far, by manifest index.
#[derive(Default)]
struct RowTally {
    report: VerifyReport,
    holders: BTreeMap<usize, Vec<u64>>,
}

impl RowTally {
    fn add_shard(
        &mut self,
        path: &Path,
        shard_index: u64,
        bytes: &[u8],
    ) -> Result<(), FeatureError> {
        let invalid = |message: String| FeatureError::InvalidShard {
            path: path.to_path_buf(),
            message,
        };
        let tensors =
            safetensors::SafeTensors::deserialize(bytes).map_err(|e| invalid(e.to_string()))?;
        let view = tensors
            .tensor("image_index")
            .map_err(|e| invalid(e.to_string()))?;
        for chunk in view.data().chunks_exact(8) {
            let image = i64::from_le_bytes(chunk.try_into().expect("8 bytes")) as usize;
            let shards = self.holders.entry(image).or_default();
            // Tiles of one image are several rows of the same shard.
            if shards.last() != Some(&shard_index) {
                shards.push(shard_index);
            }
            self.report.rows += 1;
        }
        Ok(())
    }

    fn finish(self, expected: &[usize]) -> VerifyReport {
        let RowTally {
            mut report,
            holders,
        } = self;
        let expected_set: std::collections::BTreeSet<usize> = expected.iter().copied().collect();
        report.missing = expected_set
            .iter()
            .filter(|image| !holders.contains_key(image))
            .copied()
            .collect();
        report.unexpected = holders
            .keys()
            .filter(|image| !expected_set.contains(image))
            .copied()
            .collect();
        report.duplicates = holders
            .into_iter()
            .filter(|(_, shards)| shards.len() > 1)
            .collect();
        report.ok = report.missing.is_empty()
            && report.duplicates.is_empty()
            && report.corrupt.is_empty()
            && report.unexpected.is_empty();
        report
    }
}

//! Datasets: scan a source (ImageFolder tree, CSV/TSV manifest, whitespace
//! label file, folder of unlabeled images) into a manifest of images with
//! content ids (the sha256 of each file), labels and a deterministic
//! stratified split; grow it with new versions.
//!
//! A registered dataset lives in `jobs/datasets/NAME/`:
//! - `images.csv`: every row the dataset ever listed, in index order. A row
//!   is immutable except for its `removed` column: its `index` (the
//!   manifest index) never changes, `added` is the version that first lists
//!   it and `removed` the version that no longer does.
//! - `dataset.json`: the summary of the current version; writing it is what
//!   publishes a version.
//! - `versions/N.json`: the summary of version N, for runs resumed on it.
//!
//! `add` stages the folder under a temp name and renames it into place, so
//! a dataset is fully registered or absent; an existing dataset is never
//! overwritten by `add`. `update` (see `scan::update`) holds the dataset's
//! lock, writes `versions/N+1.json`, then `images.csv` with the new rows
//! appended (readers of version N filter them out), then `dataset.json`:
//! a reader sees version N or version N+1, never a mix, and a killed update
//! leaves rows of an unpublished version that the next update drops.

mod scan;
mod split;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::digest::ContentId;
use crate::layout::Layout;

pub use scan::{
    AddConfig, LabelColumn, SourceFormat, UpdateConfig, UpdateOutcome, add, content_id,
    parse_label_map, update,
};
pub use split::{Split, SplitConfig};

/// Errors at the dataset boundary. Each names the file (and line) at fault.
#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    #[error("source {path} does not exist")]
    MissingSource { path: PathBuf },
    #[error("{path}: no images found{detail}")]
    NoImages { path: PathBuf, detail: String },
    #[error("{path}:{line}: {message}")]
    Row {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("{path}: {message}")]
    Source { path: PathBuf, message: String },
    #[error(
        "dataset '{name}' already exists in {dir}; pick another name, or run `lazarus dataset update {name} SOURCE` to add its new images as a new version"
    )]
    AlreadyExists { name: String, dir: PathBuf },
    #[error("dataset '{name}' has no version {version} (its versions are 1 to {current})")]
    UnknownVersion {
        name: String,
        version: u32,
        current: u32,
    },
    #[error("dataset '{name}' is not registered under {dir}{hint}")]
    Unknown {
        name: String,
        dir: PathBuf,
        hint: String,
    },
    #[error(
        "invalid dataset name '{name}': use letters, digits, '-', '_' and '.', at most 64, not starting with '.'"
    )]
    InvalidName { name: String },
    #[error("{0}")]
    Config(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: corrupt dataset record: {message}")]
    Corrupt { path: PathBuf, message: String },
}

impl DatasetError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        DatasetError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// How mask pixel values are read (`dataset add --mask-kind`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MaskKind {
    /// Every value above 0 is foreground (class 1).
    #[default]
    Binary,
    /// The value is the class index (0 is background).
    Index,
}

impl MaskKind {
    pub fn as_str(self) -> &'static str {
        match self {
            MaskKind::Binary => "binary",
            MaskKind::Index => "index",
        }
    }
}

/// One image of a registered dataset.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageRecord {
    /// Row number in the manifest, stable for the life of the dataset.
    pub index: usize,
    /// The content id: the file's sha256 in hex (64 digits; manifests
    /// written before issue 18 hold its first 16). Feature rows are found
    /// by it, so renamed files keep their features.
    pub id: String,
    pub path: PathBuf,
    pub label: Option<String>,
    pub split: Split,
    pub mask: Option<PathBuf>,
    pub width: u32,
    pub height: u32,
    /// The manifest version that first lists this row.
    #[serde(default = "first_version")]
    pub added: u32,
    /// The first version that no longer lists it.
    #[serde(default)]
    pub removed: Option<u32>,
}

impl ImageRecord {
    /// The parsed content id (checked when the manifest is read).
    pub fn content_id(&self) -> ContentId {
        ContentId::parse(&self.id).expect("ids are checked when a manifest is read")
    }

    /// Whether manifest version `version` lists this row.
    pub fn listed_in(&self, version: u32) -> bool {
        self.added <= version && self.removed.is_none_or(|removed| removed > version)
    }
}

fn first_version() -> u32 {
    1
}

/// One version in a dataset's history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VersionRecord {
    pub version: u32,
    pub created_at: String,
    pub source: PathBuf,
    /// Images this version lists.
    pub images: usize,
    /// Rows added by this version (new images, and images that moved or
    /// changed label, which are removed and added again with their split).
    pub added: usize,
    /// Rows this version no longer lists.
    pub removed: usize,
}

/// A file the scan did not register, and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SkippedFile {
    pub path: PathBuf,
    pub reason: String,
}

/// Files with identical content: the first is kept, the others are dropped.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DuplicateGroup {
    pub id: String,
    pub kept: PathBuf,
    pub dropped: Vec<PathBuf>,
    /// True when the copies carry different labels.
    pub conflicting_labels: bool,
}

/// The summary of a registered dataset (`dataset.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DatasetInfo {
    pub name: String,
    pub source: PathBuf,
    pub format: SourceFormat,
    pub created_at: String,
    pub lazarus_version: String,
    pub images: usize,
    /// Class name to image count, in class-index order; empty when unlabeled.
    pub classes: BTreeMap<String, usize>,
    /// Class names in class-index order (numeric labels sort numerically).
    pub class_order: Vec<String>,
    /// Largest class count over smallest; null when unlabeled.
    pub imbalance_ratio: Option<f64>,
    pub splits: BTreeMap<String, usize>,
    /// "manifest" when the source gave the split, else "stratified".
    pub split_source: String,
    pub split_config: SplitConfig,
    pub has_masks: bool,
    /// How the masks' values are read (datasets before masks: binary).
    #[serde(default)]
    pub mask_kind: MaskKind,
    pub duplicates: Vec<DuplicateGroup>,
    pub skipped: Vec<SkippedFile>,
    /// The manifest version this summary describes (datasets before
    /// versions: 1).
    #[serde(default = "first_version")]
    pub version: u32,
    /// Every version so far, oldest first (empty for datasets registered
    /// before versions, whose only version is 1).
    #[serde(default)]
    pub versions: Vec<VersionRecord>,
    /// Class renames and merges applied to the source's labels
    /// (`dataset add --label-map`); updates apply them again.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub label_map: BTreeMap<String, String>,
    /// The manifest column the labels came from, when one was named.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label_column: Option<String>,
    /// Where relative manifest paths were resolved (`--base-dir`), when not
    /// the manifest's own folder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_dir: Option<PathBuf>,
}

/// A registered dataset at one version: its summary and the images that
/// version lists, in index order.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub info: DatasetInfo,
    pub images: Vec<ImageRecord>,
}

impl Dataset {
    /// The class index of a label in `info.class_order`.
    pub fn class_index(&self, label: &str) -> Option<usize> {
        self.info.class_order.iter().position(|c| c == label)
    }

    /// The listed image with manifest index `index`.
    pub fn record(&self, index: usize) -> Option<&ImageRecord> {
        self.images
            .binary_search_by_key(&index, |record| record.index)
            .ok()
            .map(|position| &self.images[position])
    }
}

const INFO_FILE: &str = "dataset.json";
const IMAGES_FILE: &str = "images.csv";
const VERSIONS_DIR: &str = "versions";
const LOCK_FILE: &str = ".lock";

fn version_file(dir: &Path, version: u32) -> PathBuf {
    dir.join(VERSIONS_DIR).join(format!("{version}.json"))
}

/// Checks a dataset name: it becomes a folder name.
pub fn validate_name(name: &str) -> Result<(), DatasetError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(DatasetError::InvalidName {
            name: name.to_string(),
        })
    }
}

/// Names of all registered datasets, sorted.
pub fn list(layout: &Layout) -> Result<Vec<String>, DatasetError> {
    let dir = layout.datasets_dir();
    let entries = match fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(err) => return Err(DatasetError::io(&dir, err)),
    };
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| DatasetError::io(&dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !crate::atomic::is_temp_name(&name) && entry.path().join(INFO_FILE).exists() {
            names.push(name);
        }
    }
    names.sort();
    Ok(names)
}

/// The summary of a registered dataset's current version, without reading
/// its image list.
pub fn load_info(layout: &Layout, name: &str) -> Result<DatasetInfo, DatasetError> {
    validate_name(name)?;
    let dir = layout.dataset_dir(name);
    let path = dir.join(INFO_FILE);
    let text = match fs::read_to_string(&path) {
        Ok(text) => text,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            let known = list(layout)?;
            let hint = if known.is_empty() {
                "; no datasets are registered yet (lazarus dataset add NAME SOURCE)".to_string()
            } else {
                format!("; registered: {}", known.join(", "))
            };
            return Err(DatasetError::Unknown {
                name: name.to_string(),
                dir: layout.datasets_dir(),
                hint,
            });
        }
        Err(err) => return Err(DatasetError::io(&path, err)),
    };
    serde_json::from_str(&text).map_err(|err| DatasetError::Corrupt {
        path,
        message: err.to_string(),
    })
}

/// The summary of version `version` of a dataset (`None`: the current one).
pub fn load_info_at(
    layout: &Layout,
    name: &str,
    version: Option<u32>,
) -> Result<DatasetInfo, DatasetError> {
    let current = load_info(layout, name)?;
    let Some(version) = version.filter(|&v| v != current.version) else {
        return Ok(current);
    };
    if version == 0 || version > current.version {
        return Err(DatasetError::UnknownVersion {
            name: name.to_string(),
            version,
            current: current.version,
        });
    }
    let path = version_file(&layout.dataset_dir(name), version);
    let text = fs::read_to_string(&path).map_err(|e| DatasetError::io(&path, e))?;
    serde_json::from_str(&text).map_err(|err| DatasetError::Corrupt {
        path,
        message: err.to_string(),
    })
}

/// A registered dataset's current version with every image it lists.
pub fn load(layout: &Layout, name: &str) -> Result<Dataset, DatasetError> {
    load_at(layout, name, None)
}

/// Version `version` of a dataset (`None`: the current one) with every
/// image it lists.
pub fn load_at(layout: &Layout, name: &str, version: Option<u32>) -> Result<Dataset, DatasetError> {
    let mut images = Vec::new();
    let info = visit_images_at(layout, name, version, |record| {
        images.push(record);
        Ok(())
    })?;
    Ok(Dataset { info, images })
}

/// Streams the image records of a dataset's current version in manifest
/// order without holding them all (a manifest of millions of rows stays out
/// of memory).
pub fn visit_images(
    layout: &Layout,
    name: &str,
    visit: impl FnMut(ImageRecord) -> Result<(), DatasetError>,
) -> Result<DatasetInfo, DatasetError> {
    visit_images_at(layout, name, None, visit)
}

/// [`visit_images`] of version `version` (`None`: the current one).
pub fn visit_images_at(
    layout: &Layout,
    name: &str,
    version: Option<u32>,
    mut visit: impl FnMut(ImageRecord) -> Result<(), DatasetError>,
) -> Result<DatasetInfo, DatasetError> {
    let info = load_info_at(layout, name, version)?;
    let path = layout.dataset_dir(name).join(IMAGES_FILE);
    let mut listed = 0;
    visit_rows(&path, |record| {
        if record.listed_in(info.version) {
            listed += 1;
            visit(record)?;
        }
        Ok(())
    })?;
    if listed != info.images {
        return Err(DatasetError::Corrupt {
            path,
            message: format!(
                "{listed} rows listed in version {}, but its summary says {} images",
                info.version, info.images
            ),
        });
    }
    Ok(info)
}

/// Every row a dataset ever listed, in index order (the position is the
/// index), whatever version lists it.
pub fn load_all_rows(layout: &Layout, name: &str) -> Result<Vec<ImageRecord>, DatasetError> {
    let info = load_info(layout, name)?;
    let mut rows = Vec::new();
    visit_rows(&layout.dataset_dir(name).join(IMAGES_FILE), |record| {
        // Rows of an update killed before it published are not rows yet.
        if record.added <= info.version {
            rows.push(record);
        }
        Ok(())
    })?;
    Ok(rows)
}

/// Every row of an `images.csv`, listed or not, checked: indices count up
/// from 0 and ids are content ids.
fn visit_rows(
    path: &Path,
    mut visit: impl FnMut(ImageRecord) -> Result<(), DatasetError>,
) -> Result<(), DatasetError> {
    let mut reader = csv::Reader::from_path(path).map_err(|err| DatasetError::Corrupt {
        path: path.to_path_buf(),
        message: err.to_string(),
    })?;
    for (row, record) in reader.deserialize::<ImageRow>().enumerate() {
        let record = record.map_err(|err| DatasetError::Corrupt {
            path: path.to_path_buf(),
            message: err.to_string(),
        })?;
        if record.index != row {
            return Err(DatasetError::Corrupt {
                path: path.to_path_buf(),
                message: format!("row {} has index {}", row + 2, record.index),
            });
        }
        if ContentId::parse(&record.id).is_none() {
            return Err(DatasetError::Corrupt {
                path: path.to_path_buf(),
                message: format!(
                    "row {} has id '{}', not a sha256 (64 hex digits, or 16 in older manifests)",
                    row + 2,
                    record.id
                ),
            });
        }
        visit(record.into_record())?;
    }
    Ok(())
}

/// Writes a dataset's images as CSV (the `images.csv` format) to any writer.
pub fn write_images_csv(
    images: &[ImageRecord],
    writer: impl std::io::Write,
) -> Result<(), csv::Error> {
    let mut csv_writer = csv::Writer::from_writer(writer);
    for image in images {
        csv_writer.serialize(ImageRow::from_record(image))?;
    }
    csv_writer.flush()?;
    Ok(())
}

/// The flat CSV form of an `ImageRecord`.
#[derive(Debug, Serialize, Deserialize)]
struct ImageRow {
    index: usize,
    id: String,
    path: String,
    label: String,
    split: Split,
    mask: String,
    width: u32,
    height: u32,
    /// Absent in manifests written before versions: 1.
    #[serde(default = "first_version")]
    added: u32,
    /// Empty while listed.
    #[serde(default, deserialize_with = "empty_is_none")]
    removed: Option<u32>,
}

fn empty_is_none<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<u32>, D::Error> {
    let text = String::deserialize(deserializer)?;
    if text.trim().is_empty() {
        return Ok(None);
    }
    text.trim()
        .parse()
        .map(Some)
        .map_err(|_| serde::de::Error::custom(format!("removed: not a version number: {text}")))
}

impl ImageRow {
    fn from_record(image: &ImageRecord) -> Self {
        ImageRow {
            index: image.index,
            id: image.id.clone(),
            path: image.path.display().to_string(),
            label: image.label.clone().unwrap_or_default(),
            split: image.split,
            mask: image
                .mask
                .as_ref()
                .map(|m| m.display().to_string())
                .unwrap_or_default(),
            width: image.width,
            height: image.height,
            added: image.added,
            removed: image.removed,
        }
    }

    fn into_record(self) -> ImageRecord {
        ImageRecord {
            index: self.index,
            id: self.id,
            path: PathBuf::from(self.path),
            label: (!self.label.is_empty()).then_some(self.label),
            split: self.split,
            mask: (!self.mask.is_empty()).then(|| PathBuf::from(self.mask)),
            width: self.width,
            height: self.height,
            added: self.added,
            removed: self.removed,
        }
    }
}

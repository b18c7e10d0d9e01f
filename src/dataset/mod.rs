//! Datasets: scan a source (ImageFolder tree, CSV/TSV manifest, whitespace
//! label file, folder of unlabeled images) into a manifest of images with
//! content-hash ids, labels and a deterministic stratified split.
//!
//! A registered dataset lives in `jobs/datasets/NAME/` as `dataset.json`
//! (summary) and `images.csv` (one row per image; the row number is the
//! manifest index that feature shards refer to). The folder is written under
//! a temp name and renamed into place, so a dataset is either fully
//! registered or absent; an existing dataset is never overwritten.

mod scan;
mod split;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::layout::Layout;

pub use scan::{AddConfig, LabelColumn, SourceFormat, add, content_id};
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
    #[error("dataset '{name}' already exists in {dir}; pick another name")]
    AlreadyExists { name: String, dir: PathBuf },
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
    /// Row number in the manifest; feature shards refer to images by it.
    pub index: usize,
    /// First 16 hex digits of the file's sha256: stable across renames.
    pub id: String,
    pub path: PathBuf,
    pub label: Option<String>,
    pub split: Split,
    pub mask: Option<PathBuf>,
    pub width: u32,
    pub height: u32,
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
}

/// A registered dataset: its summary and every image.
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
}

const INFO_FILE: &str = "dataset.json";
const IMAGES_FILE: &str = "images.csv";

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

/// The summary of a registered dataset, without reading its image list.
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

/// A registered dataset with every image record.
pub fn load(layout: &Layout, name: &str) -> Result<Dataset, DatasetError> {
    let mut images = Vec::new();
    let info = visit_images(layout, name, |record| {
        images.push(record);
        Ok(())
    })?;
    Ok(Dataset { info, images })
}

/// Streams a registered dataset's image records in manifest order without
/// holding them all (a manifest of millions of rows stays out of memory).
pub fn visit_images(
    layout: &Layout,
    name: &str,
    mut visit: impl FnMut(ImageRecord) -> Result<(), DatasetError>,
) -> Result<DatasetInfo, DatasetError> {
    let info = load_info(layout, name)?;
    let path = layout.dataset_dir(name).join(IMAGES_FILE);
    let mut reader = csv::Reader::from_path(&path).map_err(|err| DatasetError::Corrupt {
        path: path.clone(),
        message: err.to_string(),
    })?;
    let mut rows = 0;
    for (row, record) in reader.deserialize::<ImageRow>().enumerate() {
        let record = record.map_err(|err| DatasetError::Corrupt {
            path: path.clone(),
            message: err.to_string(),
        })?;
        if record.index != row {
            return Err(DatasetError::Corrupt {
                path: path.clone(),
                message: format!("row {} has index {}", row + 2, record.index),
            });
        }
        visit(record.into_record())?;
        rows += 1;
    }
    if rows != info.images {
        return Err(DatasetError::Corrupt {
            path,
            message: format!("{rows} rows, but dataset.json says {} images", info.images),
        });
    }
    Ok(info)
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
        }
    }
}

//! Scanning a source into a manifest: find candidate images (with labels,
//! splits and masks where the source gives them), hash and probe them in
//! parallel, drop exact duplicates, order classes, assign splits, publish.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::fs;
use std::path::{Component, Path, PathBuf};
use std::str::FromStr;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::split::{self, Split, SplitConfig};
use super::{
    DatasetError, DatasetInfo, DuplicateGroup, IMAGES_FILE, INFO_FILE, ImageRecord, SkippedFile,
};
use crate::layout::Layout;

/// What kind of source a dataset was registered from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SourceFormat {
    /// SOURCE/<class>/<image>
    ImageFolder,
    /// CSV or TSV: path, label, optional split, optional mask (or named columns).
    Manifest,
    /// Whitespace-separated columns, such as elpv-dataset's labels.csv.
    LabelFile,
    /// A folder of images without labels.
    Unlabeled,
    /// SOURCE/images/<image> and SOURCE/masks/<mask>, matched by file stem.
    MaskFolders,
}

impl SourceFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            SourceFormat::ImageFolder => "image-folder",
            SourceFormat::Manifest => "manifest",
            SourceFormat::LabelFile => "label-file",
            SourceFormat::Unlabeled => "unlabeled",
            SourceFormat::MaskFolders => "mask-folders",
        }
    }
}

impl fmt::Display for SourceFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A manifest column, by 1-based number or by header name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LabelColumn {
    Number(usize),
    Name(String),
}

impl FromStr for LabelColumn {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text.parse::<usize>() {
            Ok(0) => Err("columns are counted from 1".to_string()),
            Ok(number) => Ok(LabelColumn::Number(number)),
            Err(_) if !text.trim().is_empty() => Ok(LabelColumn::Name(text.trim().to_string())),
            Err(_) => Err("empty column name".to_string()),
        }
    }
}

impl fmt::Display for LabelColumn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LabelColumn::Number(number) => write!(f, "{number}"),
            LabelColumn::Name(name) => f.write_str(name),
        }
    }
}

/// Settings for `dataset add`.
#[derive(Debug, Clone, Default)]
pub struct AddConfig {
    /// Force a source format instead of detecting it.
    pub format: Option<SourceFormat>,
    /// Which manifest column holds the label (default: `label`/`class` header, else column 2).
    pub label_column: Option<LabelColumn>,
    /// Used unless the manifest gives a split column.
    pub split: SplitConfig,
    /// How mask values are read.
    pub mask_kind: super::MaskKind,
}

/// An image the source names, before it is read.
struct Candidate {
    path: PathBuf,
    label: Option<String>,
    split: Option<Split>,
    mask: Option<PathBuf>,
    /// Where the source names it, for messages: "labels.csv:17" or the folder.
    origin: String,
}

/// What reading one candidate found.
enum Probe {
    Image { id: String, width: u32, height: u32 },
    Skipped(String),
}

/// Scans `source`, registers it as dataset `name`, and returns its summary.
/// Nothing is written unless the whole scan succeeds; an existing dataset is
/// never touched.
pub fn add(
    layout: &Layout,
    name: &str,
    source: &Path,
    config: &AddConfig,
) -> Result<DatasetInfo, DatasetError> {
    super::validate_name(name)?;
    config.split.validate().map_err(DatasetError::Config)?;
    let target = layout.dataset_dir(name);
    if target.exists() {
        return Err(DatasetError::AlreadyExists {
            name: name.to_string(),
            dir: layout.datasets_dir(),
        });
    }
    if !source.exists() {
        return Err(DatasetError::MissingSource {
            path: source.to_path_buf(),
        });
    }
    let source = std::path::absolute(source).map_err(|e| DatasetError::io(source, e))?;
    let format = match config.format {
        Some(format) => format,
        None => detect_format(&source)?,
    };
    let (candidates, mut skipped) = match format {
        SourceFormat::ImageFolder => scan_image_folder(&source)?,
        SourceFormat::Unlabeled => scan_unlabeled(&source)?,
        SourceFormat::MaskFolders => scan_mask_folders(&source)?,
        SourceFormat::Manifest | SourceFormat::LabelFile => {
            (read_manifest(&source, format, config)?, Vec::new())
        }
    };
    if candidates.is_empty() {
        return Err(no_images(&source, &skipped));
    }

    let probes: Vec<Probe> = candidates.par_iter().map(probe_candidate).collect();
    let mut kept: Vec<(Candidate, String, u32, u32)> = Vec::with_capacity(candidates.len());
    let mut first_by_id: HashMap<String, usize> = HashMap::new();
    let mut duplicates: BTreeMap<String, DuplicateGroup> = BTreeMap::new();
    for (candidate, probe) in candidates.into_iter().zip(probes) {
        match probe {
            Probe::Skipped(reason) => skipped.push(SkippedFile {
                path: candidate.path,
                reason,
            }),
            Probe::Image { id, width, height } => {
                if let Some(&first) = first_by_id.get(&id) {
                    let kept_one = &kept[first].0;
                    let group = duplicates
                        .entry(id.clone())
                        .or_insert_with(|| DuplicateGroup {
                            id: id.clone(),
                            kept: kept_one.path.clone(),
                            dropped: Vec::new(),
                            conflicting_labels: false,
                        });
                    group.conflicting_labels |= kept_one.label != candidate.label;
                    group.dropped.push(candidate.path);
                } else {
                    first_by_id.insert(id.clone(), kept.len());
                    kept.push((candidate, id, width, height));
                }
            }
        }
    }
    if kept.is_empty() {
        return Err(no_images(&source, &skipped));
    }
    check_masks(&kept)?;

    let (splits, split_source) = resolve_splits(&kept, config)?;
    let class_order = class_order(kept.iter().filter_map(|k| k.0.label.as_deref()));
    let images: Vec<ImageRecord> = kept
        .into_iter()
        .zip(&splits)
        .enumerate()
        .map(
            |(index, ((candidate, id, width, height), split))| ImageRecord {
                index,
                id,
                path: candidate.path,
                label: candidate.label,
                split: *split,
                mask: candidate.mask,
                width,
                height,
            },
        )
        .collect();

    let info = summarise(SummaryInput {
        name,
        source: &source,
        format,
        images: &images,
        class_order,
        split_source,
        split_config: config.split,
        mask_kind: config.mask_kind,
        duplicates: duplicates.into_values().collect(),
        skipped,
    });
    publish(layout, &target, &info, &images)?;
    Ok(info)
}

fn no_images(source: &Path, skipped: &[SkippedFile]) -> DatasetError {
    let detail = if skipped.is_empty() {
        String::new()
    } else {
        format!(
            " ({} files skipped, e.g. {}: {})",
            skipped.len(),
            skipped[0].path.display(),
            skipped[0].reason
        )
    };
    DatasetError::NoImages {
        path: source.to_path_buf(),
        detail,
    }
}

/// Folders holding exactly `images/` and `masks/` are segmentation sets,
/// other folders with class sub-folders are ImageFolder trees, the rest are
/// unlabeled; files are manifests, TSV/CSV by delimiter, else whitespace.
fn detect_format(source: &Path) -> Result<SourceFormat, DatasetError> {
    if source.is_dir() {
        let mut folders: Vec<String> = read_dir_sorted(source)?
            .iter()
            .filter(|entry| entry.is_dir() && !is_hidden(entry))
            .filter_map(|entry| entry.file_name().map(|n| n.to_string_lossy().into_owned()))
            .collect();
        folders.sort();
        if folders == ["images", "masks"] {
            return Ok(SourceFormat::MaskFolders);
        }
        let has_subfolder = read_dir_sorted(source)?
            .iter()
            .any(|entry| entry.is_dir() && !is_hidden(entry));
        return Ok(if has_subfolder {
            SourceFormat::ImageFolder
        } else {
            SourceFormat::Unlabeled
        });
    }
    let text = fs::read_to_string(source).map_err(|e| manifest_read_error(source, e))?;
    let first_line = text.lines().find(|line| !line.trim().is_empty());
    Ok(match first_line {
        Some(line) if line.contains('\t') || line.contains(',') => SourceFormat::Manifest,
        _ => SourceFormat::LabelFile,
    })
}

fn manifest_read_error(path: &Path, err: std::io::Error) -> DatasetError {
    if err.kind() == std::io::ErrorKind::InvalidData {
        DatasetError::Source {
            path: path.to_path_buf(),
            message: "not a text manifest (invalid UTF-8); give a folder or a CSV/TSV/label file"
                .to_string(),
        }
    } else {
        DatasetError::io(path, err)
    }
}

fn is_hidden(path: &Path) -> bool {
    path.file_name()
        .is_some_and(|n| n.to_string_lossy().starts_with('.'))
}

fn read_dir_sorted(dir: &Path) -> Result<Vec<PathBuf>, DatasetError> {
    let mut paths = fs::read_dir(dir)
        .map_err(|e| DatasetError::io(dir, e))?
        .map(|entry| entry.map(|e| e.path()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| DatasetError::io(dir, e))?;
    paths.sort();
    Ok(paths)
}

/// Every non-hidden file below `dir`, sorted, recursing into sub-folders.
fn files_below(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), DatasetError> {
    for path in read_dir_sorted(dir)? {
        if is_hidden(&path) {
            continue;
        }
        if path.is_dir() {
            files_below(&path, out)?;
        } else {
            out.push(path);
        }
    }
    Ok(())
}

fn scan_image_folder(source: &Path) -> Result<(Vec<Candidate>, Vec<SkippedFile>), DatasetError> {
    let mut candidates = Vec::new();
    let mut skipped = Vec::new();
    for entry in read_dir_sorted(source)? {
        if is_hidden(&entry) {
            continue;
        }
        if !entry.is_dir() {
            skipped.push(SkippedFile {
                path: entry,
                reason: "not inside a class folder".to_string(),
            });
            continue;
        }
        let class = entry
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut files = Vec::new();
        files_below(&entry, &mut files)?;
        candidates.extend(files.into_iter().map(|path| Candidate {
            origin: entry.display().to_string(),
            path,
            label: Some(class.clone()),
            split: None,
            mask: None,
        }));
    }
    Ok((candidates, skipped))
}

fn scan_unlabeled(source: &Path) -> Result<(Vec<Candidate>, Vec<SkippedFile>), DatasetError> {
    if !source.is_dir() {
        return Err(DatasetError::Source {
            path: source.to_path_buf(),
            message: "an unlabeled dataset must be a folder of images".to_string(),
        });
    }
    let mut files = Vec::new();
    files_below(source, &mut files)?;
    let candidates = files
        .into_iter()
        .map(|path| Candidate {
            origin: source.display().to_string(),
            path,
            label: None,
            split: None,
            mask: None,
        })
        .collect();
    Ok((candidates, Vec::new()))
}

/// SOURCE/images/* with SOURCE/masks/*, each image's mask found by file stem
/// (any extension, searched recursively with the same sub-folder).
fn scan_mask_folders(source: &Path) -> Result<(Vec<Candidate>, Vec<SkippedFile>), DatasetError> {
    let images_dir = source.join("images");
    let masks_dir = source.join("masks");
    for dir in [&images_dir, &masks_dir] {
        if !dir.is_dir() {
            return Err(DatasetError::Source {
                path: dir.clone(),
                message: "a mask-folders dataset needs both images/ and masks/ folders".into(),
            });
        }
    }
    let stem_key = |root: &Path, path: &Path| -> PathBuf {
        let relative = path.strip_prefix(root).unwrap_or(path);
        relative.with_extension("")
    };
    let mut masks = Vec::new();
    files_below(&masks_dir, &mut masks)?;
    let mut by_stem: HashMap<PathBuf, PathBuf> = HashMap::new();
    for mask in masks {
        let key = stem_key(&masks_dir, &mask);
        if let Some(first) = by_stem.insert(key, mask.clone()) {
            return Err(DatasetError::Source {
                path: mask,
                message: format!(
                    "two masks share this file stem ({} too); keep one",
                    first.display()
                ),
            });
        }
    }
    let mut images = Vec::new();
    files_below(&images_dir, &mut images)?;
    let mut candidates = Vec::with_capacity(images.len());
    for path in images {
        let key = stem_key(&images_dir, &path);
        let mask = by_stem
            .get(&key)
            .cloned()
            .ok_or_else(|| DatasetError::Source {
                path: path.clone(),
                message: format!(
                    "no mask for this image: expected a file named {}.* in {}",
                    key.display(),
                    masks_dir.display()
                ),
            })?;
        candidates.push(Candidate {
            origin: images_dir.display().to_string(),
            path,
            label: None,
            split: None,
            mask: Some(mask),
        });
    }
    Ok((candidates, Vec::new()))
}

const PATH_NAMES: [&str; 6] = [
    "path",
    "image",
    "file",
    "filename",
    "filepath",
    "image_path",
];
const LABEL_NAMES: [&str; 5] = ["label", "class", "target", "category", "y"];
const SPLIT_NAMES: [&str; 2] = ["split", "subset"];
const MASK_NAMES: [&str; 2] = ["mask", "mask_path"];

/// Column positions (0-based) within a manifest row.
struct Columns {
    path: usize,
    label: Option<usize>,
    split: Option<usize>,
    mask: Option<usize>,
}

impl Columns {
    fn needed(&self) -> usize {
        [Some(self.path), self.label]
            .into_iter()
            .flatten()
            .max()
            .unwrap_or(0)
            + 1
    }
}

fn find_named(header: &[String], names: &[&str]) -> Option<usize> {
    header
        .iter()
        .position(|cell| names.contains(&cell.trim().to_ascii_lowercase().as_str()))
}

/// Decides which columns hold what, from the header if there is one.
fn resolve_columns(
    manifest: &Path,
    first_row: &[String],
    format: SourceFormat,
    label_column: Option<&LabelColumn>,
) -> Result<(Columns, bool), DatasetError> {
    let has_header = find_named(first_row, &PATH_NAMES).is_some();
    let column_error = |message: String| DatasetError::Row {
        path: manifest.to_path_buf(),
        line: 1,
        message,
    };
    if has_header {
        let label = match label_column {
            Some(LabelColumn::Name(name)) => Some(
                first_row
                    .iter()
                    .position(|cell| cell.trim() == name)
                    .ok_or_else(|| {
                        column_error(format!(
                            "unknown label column '{name}'; columns: {}",
                            first_row.join(", ")
                        ))
                    })?,
            ),
            Some(LabelColumn::Number(number)) => Some(number - 1),
            None => find_named(first_row, &LABEL_NAMES),
        };
        let columns = Columns {
            path: find_named(first_row, &PATH_NAMES).unwrap_or(0),
            label,
            split: find_named(first_row, &SPLIT_NAMES),
            mask: find_named(first_row, &MASK_NAMES),
        };
        if let Some(label) = columns.label
            && label >= first_row.len()
        {
            return Err(column_error(format!(
                "unknown label column {}; the header has {} columns: {}",
                label + 1,
                first_row.len(),
                first_row.join(", ")
            )));
        }
        return Ok((columns, true));
    }
    let label = match label_column {
        Some(LabelColumn::Name(name)) => {
            return Err(column_error(format!(
                "unknown label column '{name}': this manifest has no header row (name the column by number, counted from 1)"
            )));
        }
        Some(LabelColumn::Number(number)) => *number - 1,
        None => 1,
    };
    let positional = format == SourceFormat::Manifest;
    Ok((
        Columns {
            path: 0,
            label: Some(label),
            split: positional.then_some(2),
            mask: positional.then_some(3),
        },
        false,
    ))
}

/// Lexically resolves `relative` against `base` and refuses paths that leave `base`.
fn resolve_inside(base: &Path, relative: &str) -> Result<PathBuf, String> {
    let joined = base.join(relative);
    let mut resolved = PathBuf::new();
    for component in joined.components() {
        match component {
            Component::ParentDir => {
                if !resolved.pop() {
                    return Err(format!("path '{relative}' escapes the manifest's folder"));
                }
            }
            Component::CurDir => {}
            other => resolved.push(other.as_os_str()),
        }
    }
    if resolved.starts_with(base) {
        Ok(resolved)
    } else {
        Err(format!(
            "path '{relative}' escapes the manifest's folder {}",
            base.display()
        ))
    }
}

fn read_manifest(
    manifest: &Path,
    format: SourceFormat,
    config: &AddConfig,
) -> Result<Vec<Candidate>, DatasetError> {
    if manifest.is_dir() {
        return Err(DatasetError::Source {
            path: manifest.to_path_buf(),
            message: format!("expected a {format} file, found a folder"),
        });
    }
    let text = fs::read_to_string(manifest).map_err(|e| manifest_read_error(manifest, e))?;
    let rows = split_rows(manifest, &text, format)?;
    let Some((_, first_row)) = rows.first() else {
        return Err(DatasetError::Source {
            path: manifest.to_path_buf(),
            message: "empty manifest: no rows".to_string(),
        });
    };
    let (columns, has_header) =
        resolve_columns(manifest, first_row, format, config.label_column.as_ref())?;
    let base = manifest.parent().unwrap_or(Path::new("/")).to_path_buf();
    let row_error = |line: usize, message: String| DatasetError::Row {
        path: manifest.to_path_buf(),
        line,
        message,
    };
    let optional_cell = |row: &[String], column: Option<usize>| {
        column
            .and_then(|c| row.get(c))
            .map(|cell| cell.trim().to_string())
            .filter(|cell| !cell.is_empty())
    };
    let mut candidates = Vec::new();
    for (line, row) in rows.iter().skip(usize::from(has_header)) {
        let line = *line;
        if row.len() < columns.needed() {
            return Err(row_error(
                line,
                format!(
                    "expected at least {} columns, found {}",
                    columns.needed(),
                    row.len()
                ),
            ));
        }
        let path_cell = row[columns.path].trim();
        if path_cell.is_empty() {
            return Err(row_error(line, "empty path".to_string()));
        }
        let path = resolve_inside(&base, path_cell).map_err(|m| row_error(line, m))?;
        let label = match columns.label {
            Some(column) => {
                let cell = row[column].trim();
                if cell.is_empty() {
                    return Err(row_error(
                        line,
                        format!("empty label in column {}", column + 1),
                    ));
                }
                Some(cell.to_string())
            }
            None => None,
        };
        let split = optional_cell(row, columns.split)
            .map(|cell| cell.parse::<Split>().map_err(|m| row_error(line, m)))
            .transpose()?;
        let mask = optional_cell(row, columns.mask)
            .map(|cell| resolve_inside(&base, &cell).map_err(|m| row_error(line, m)))
            .transpose()?;
        candidates.push(Candidate {
            path,
            label,
            split,
            mask,
            origin: format!("{}:{line}", manifest.display()),
        });
    }
    Ok(candidates)
}

/// Splits manifest text into (1-based line number, cells), skipping blank lines.
fn split_rows(
    manifest: &Path,
    text: &str,
    format: SourceFormat,
) -> Result<Vec<(usize, Vec<String>)>, DatasetError> {
    if format == SourceFormat::LabelFile {
        return Ok(text
            .lines()
            .enumerate()
            .filter(|(_, line)| !line.trim().is_empty())
            .map(|(index, line)| {
                let cells = line.split_whitespace().map(str::to_string).collect();
                (index + 1, cells)
            })
            .collect());
    }
    let first_line = text.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
    let delimiter = if first_line.contains('\t') {
        b'\t'
    } else {
        b','
    };
    let mut reader = csv::ReaderBuilder::new()
        .delimiter(delimiter)
        .has_headers(false)
        .flexible(true)
        .from_reader(text.as_bytes());
    let mut rows = Vec::new();
    for record in reader.records() {
        let record = record.map_err(|err| {
            let line = err.position().map(|p| p.line() as usize).unwrap_or(0);
            DatasetError::Row {
                path: manifest.to_path_buf(),
                line,
                message: err.to_string(),
            }
        })?;
        let line = record.position().map(|p| p.line() as usize).unwrap_or(0);
        let cells: Vec<String> = record.iter().map(str::to_string).collect();
        if cells.iter().all(|c| c.trim().is_empty()) {
            continue;
        }
        rows.push((line, cells));
    }
    Ok(rows)
}

/// Reads one file: content id and dimensions, or why it is not usable.
fn probe_candidate(candidate: &Candidate) -> Probe {
    let bytes = match fs::read(&candidate.path) {
        Ok(bytes) => bytes,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            return Probe::Skipped(format!("file not found (named at {})", candidate.origin));
        }
        Err(err) => return Probe::Skipped(format!("cannot read: {err}")),
    };
    match crate::preprocess::probe_dimensions(&bytes, &candidate.path) {
        Ok((width, height)) => Probe::Image {
            id: content_id(&bytes),
            width,
            height,
        },
        Err(err) => {
            // The error names the path; the skip list already does.
            let message = err.to_string();
            let prefix = format!("{}: ", candidate.path.display());
            Probe::Skipped(
                message
                    .strip_prefix(&prefix)
                    .unwrap_or(&message)
                    .to_string(),
            )
        }
    }
}

/// The stable image id: the first 16 hex digits of the content's sha256.
pub fn content_id(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    hex::encode(&digest[..8])
}

/// Every mask exists, is a readable image, and has its image's size.
fn check_masks(kept: &[(Candidate, String, u32, u32)]) -> Result<(), DatasetError> {
    let results: Vec<Result<(), DatasetError>> = kept
        .par_iter()
        .map(|(candidate, _, width, height)| {
            let Some(mask) = &candidate.mask else {
                return Ok(());
            };
            if !mask.is_file() {
                return Err(DatasetError::Source {
                    path: mask.clone(),
                    message: format!("mask not found (named at {})", candidate.origin),
                });
            }
            let bytes = fs::read(mask).map_err(|e| DatasetError::io(mask, e))?;
            let (mask_width, mask_height) = crate::preprocess::probe_dimensions(&bytes, mask)
                .map_err(|err| DatasetError::Source {
                    path: mask.clone(),
                    message: format!("unreadable mask for {}: {err}", candidate.path.display()),
                })?;
            if (mask_width, mask_height) != (*width, *height) {
                return Err(DatasetError::Source {
                    path: mask.clone(),
                    message: format!(
                        "mask is {mask_width}x{mask_height} but its image {} is {width}x{height}",
                        candidate.path.display()
                    ),
                });
            }
            Ok(())
        })
        .collect();
    results.into_iter().collect()
}

/// The manifest's splits when it gives them for every row, else a stratified assignment.
/// Returns the splits and where they came from ("manifest" or "stratified").
fn resolve_splits(
    kept: &[(Candidate, String, u32, u32)],
    config: &AddConfig,
) -> Result<(Vec<Split>, &'static str), DatasetError> {
    let given = kept.iter().filter(|k| k.0.split.is_some()).count();
    if given == kept.len() {
        return Ok((kept.iter().filter_map(|k| k.0.split).collect(), "manifest"));
    }
    if given > 0 {
        let missing = kept
            .iter()
            .find(|k| k.0.split.is_none())
            .expect("some row lacks a split");
        return Err(DatasetError::Config(format!(
            "{}: the manifest gives a split for {given} of {} images but not for this one; give a split for every row or for none",
            missing.0.origin,
            kept.len()
        )));
    }
    let items: Vec<(Option<&str>, &str)> = kept
        .iter()
        .map(|k| (k.0.label.as_deref(), k.1.as_str()))
        .collect();
    Ok((split::assign(&items, &config.split), "stratified"))
}

/// Class names in index order: numerically when every label is a number.
fn class_order<'a>(labels: impl Iterator<Item = &'a str>) -> Vec<String> {
    let mut names: Vec<String> = labels.map(str::to_string).collect();
    names.sort();
    names.dedup();
    let numeric: Option<Vec<f64>> = names.iter().map(|n| n.parse::<f64>().ok()).collect();
    if let Some(values) = numeric {
        let mut pairs: Vec<(f64, String)> = values.into_iter().zip(names).collect();
        pairs.sort_by(|a, b| a.0.total_cmp(&b.0));
        return pairs.into_iter().map(|p| p.1).collect();
    }
    names
}

struct SummaryInput<'a> {
    name: &'a str,
    source: &'a Path,
    format: SourceFormat,
    images: &'a [ImageRecord],
    class_order: Vec<String>,
    split_source: &'static str,
    split_config: SplitConfig,
    mask_kind: super::MaskKind,
    duplicates: Vec<DuplicateGroup>,
    skipped: Vec<SkippedFile>,
}

fn summarise(input: SummaryInput<'_>) -> DatasetInfo {
    let mut classes = BTreeMap::new();
    for image in input.images {
        if let Some(label) = &image.label {
            *classes.entry(label.clone()).or_insert(0usize) += 1;
        }
    }
    let imbalance_ratio = match (classes.values().max(), classes.values().min()) {
        (Some(&max), Some(&min)) if min > 0 => Some(max as f64 / min as f64),
        _ => None,
    };
    let mut splits: BTreeMap<String, usize> = Split::ALL
        .iter()
        .map(|s| (s.as_str().to_string(), 0))
        .collect();
    for image in input.images {
        *splits.entry(image.split.as_str().to_string()).or_insert(0) += 1;
    }
    DatasetInfo {
        name: input.name.to_string(),
        source: input.source.to_path_buf(),
        format: input.format,
        created_at: now_rfc3339(),
        lazarus_version: crate::VERSION.to_string(),
        images: input.images.len(),
        classes,
        class_order: input.class_order,
        imbalance_ratio,
        splits,
        split_source: input.split_source.to_string(),
        split_config: input.split_config,
        has_masks: input.images.iter().any(|i| i.mask.is_some()),
        mask_kind: input.mask_kind,
        duplicates: input.duplicates,
        skipped: input.skipped,
    }
}

/// UTC time as RFC 3339, to the second.
fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

/// Writes both files into a temp folder and renames it into place.
fn publish(
    layout: &Layout,
    target: &Path,
    info: &DatasetInfo,
    images: &[ImageRecord],
) -> Result<(), DatasetError> {
    let datasets_dir = layout.datasets_dir();
    fs::create_dir_all(&datasets_dir).map_err(|e| DatasetError::io(&datasets_dir, e))?;
    let staging = crate::atomic::temp_path_for(target);
    fs::create_dir(&staging).map_err(|e| DatasetError::io(&staging, e))?;
    let result = (|| {
        let info_json = serde_json::to_vec_pretty(info).expect("dataset info serialises");
        let info_path = staging.join(INFO_FILE);
        crate::atomic::write_file(&info_path, &info_json)
            .map_err(|e| DatasetError::io(&info_path, e))?;
        let images_path = staging.join(IMAGES_FILE);
        crate::atomic::write_file_with(&images_path, |file| {
            super::write_images_csv(images, std::io::BufWriter::new(file))
                .map_err(std::io::Error::other)
        })
        .map_err(|e| DatasetError::io(&images_path, e))?;
        crate::atomic::publish_dir(&staging, target).map_err(|err| {
            if err.kind() == std::io::ErrorKind::AlreadyExists {
                DatasetError::AlreadyExists {
                    name: info.name.clone(),
                    dir: datasets_dir.clone(),
                }
            } else {
                DatasetError::io(target, err)
            }
        })
    })();
    if result.is_err() {
        let _ = fs::remove_dir_all(&staging);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolve_inside_refuses_escapes() {
        let base = Path::new("/data/set");
        assert_eq!(
            resolve_inside(base, "a/b.png").unwrap(),
            PathBuf::from("/data/set/a/b.png")
        );
        assert_eq!(
            resolve_inside(base, "a/../b.png").unwrap(),
            PathBuf::from("/data/set/b.png")
        );
        assert!(resolve_inside(base, "../other/b.png").is_err());
        assert!(resolve_inside(base, "/etc/passwd").is_err());
    }

    #[test]
    fn numeric_classes_sort_numerically() {
        let order = class_order(
            [
                "1.0",
                "0.3333333333333333",
                "0.0",
                "0.6666666666666666",
                "1.0",
            ]
            .into_iter(),
        );
        assert_eq!(
            order,
            vec!["0.0", "0.3333333333333333", "0.6666666666666666", "1.0"]
        );
        let order = class_order(["b", "a", "10"].into_iter());
        assert_eq!(order, vec!["10", "a", "b"]);
    }

    #[test]
    fn rfc3339_has_the_right_shape() {
        let now = now_rfc3339();
        assert_eq!(now.len(), 20, "{now}");
        assert!(now.starts_with("20"), "{now}");
    }
}

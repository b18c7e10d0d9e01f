//! Scanning a source into a manifest: find candidate images (with labels,
//! splits and masks where the source gives them), hash and probe them in
//! parallel, drop exact duplicates, order classes, assign splits, publish.
//! `update` rescans a registered dataset's source into a new version.
//!
//! Files: only regular files are read. A FIFO, socket or device among the
//! images is listed as skipped with its kind (it is never opened in a way
//! that could block). Symbolic links to files are followed wherever they
//! point, as a manifest may name any path; symbolic links to folders are
//! not followed (listed as skipped), so a scan never loops.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::fs;
use std::path::{Component, Path, PathBuf};
use std::str::FromStr;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::split::{self, Split, SplitConfig};
use super::{
    DatasetError, DatasetInfo, DuplicateGroup, IMAGES_FILE, INFO_FILE, ImageRecord, LOCK_FILE,
    SkippedFile, VERSIONS_DIR, VersionRecord, version_file,
};
use crate::digest::ContentId;
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
    /// Renames or merges of the source's classes (old name to new name).
    pub label_map: BTreeMap<String, String>,
    /// Where relative manifest paths resolve (default: the manifest's folder).
    pub base_dir: Option<PathBuf>,
}

/// Settings for `dataset update`: each left `None` keeps what the dataset
/// was registered with.
#[derive(Debug, Clone, Default)]
pub struct UpdateConfig {
    /// The source to rescan (default: the dataset's own source).
    pub source: Option<PathBuf>,
    pub format: Option<SourceFormat>,
    pub label_column: Option<LabelColumn>,
    /// Must equal the dataset's split settings when given: splits never move.
    pub split: Option<SplitConfig>,
    pub mask_kind: Option<super::MaskKind>,
    pub label_map: Option<BTreeMap<String, String>>,
    pub base_dir: Option<PathBuf>,
}

/// What `dataset update` did.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct UpdateOutcome {
    /// The summary of the dataset's version now current.
    pub info: DatasetInfo,
    pub previous_version: u32,
    /// False when the rescan found nothing new: no version was written.
    pub changed: bool,
    /// Images of the new version that were not listed before.
    pub added: usize,
    /// Images listed before that the new version no longer lists.
    pub removed: usize,
    /// Images listed before whose path, label or mask changed (a new row
    /// each, with the same content id and split).
    pub changed_rows: usize,
    /// Images listed before and now, unchanged.
    pub kept: usize,
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

/// A candidate that is an image: (candidate, content id, width, height).
type Kept = (Candidate, String, u32, u32);

/// The images a source holds, deduplicated by content.
struct Scan {
    source: PathBuf,
    format: SourceFormat,
    kept: Vec<Kept>,
    /// The classes of the kept images in class-index order, label map applied.
    class_order: Vec<String>,
    duplicates: Vec<DuplicateGroup>,
    skipped: Vec<SkippedFile>,
}

/// What a scan reads and how.
struct ScanSettings<'a> {
    format: Option<SourceFormat>,
    label_column: Option<&'a LabelColumn>,
    label_map: &'a BTreeMap<String, String>,
    base_dir: Option<&'a Path>,
}

/// Finds, reads and deduplicates the images of `source`, with the label map
/// applied to their labels.
fn scan_source(source: &Path, settings: &ScanSettings<'_>) -> Result<Scan, DatasetError> {
    if !source.exists() {
        return Err(DatasetError::MissingSource {
            path: source.to_path_buf(),
        });
    }
    let source = std::path::absolute(source).map_err(|e| DatasetError::io(source, e))?;
    let detected = settings.format.is_none();
    let format = match settings.format {
        Some(format) => format,
        None => detect_format(&source)?,
    };
    let (mut candidates, mut skipped) = match format {
        SourceFormat::ImageFolder => scan_image_folder(&source)?,
        SourceFormat::Unlabeled => scan_unlabeled(&source)?,
        SourceFormat::MaskFolders => scan_mask_folders(&source)?,
        SourceFormat::Manifest | SourceFormat::LabelFile => {
            let base = settings.base_dir.map(Path::to_path_buf);
            let read = read_manifest(&source, format, settings.label_column, base.as_deref());
            match read {
                Err(DatasetError::Row {
                    path,
                    line,
                    message,
                }) if detected && format == SourceFormat::Manifest => {
                    return Err(DatasetError::Row {
                        path,
                        line,
                        message: format!(
                            "{message} (read as a CSV/TSV manifest because its first line has tabs or commas; \
                             for a whitespace-separated label file pass --format label-file)"
                        ),
                    });
                }
                read => (read?, Vec::new()),
            }
        }
    };
    if candidates.is_empty() {
        return Err(no_images(&source, &skipped));
    }
    // Classes are ordered by the source's own names (numeric grades stay
    // in order), then renamed.
    let raw_order = mapped_class_order(
        &class_order(candidates.iter().filter_map(|c| c.label.as_deref())),
        settings.label_map,
    );
    apply_label_map(&source, &mut candidates, settings.label_map)?;

    let probes: Vec<Probe> = candidates.par_iter().map(probe_candidate).collect();
    let mut kept: Vec<Kept> = Vec::with_capacity(candidates.len());
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
    let present: BTreeSet<&str> = kept.iter().filter_map(|k| k.0.label.as_deref()).collect();
    let class_order = raw_order
        .into_iter()
        .filter(|name| present.contains(name.as_str()))
        .collect();
    Ok(Scan {
        source,
        format,
        kept,
        class_order,
        duplicates: duplicates.into_values().collect(),
        skipped,
    })
}

/// Renames or merges labels; a class the map names but the source lacks is
/// refused, so a typo never passes silently.
fn apply_label_map(
    source: &Path,
    candidates: &mut [Candidate],
    label_map: &BTreeMap<String, String>,
) -> Result<(), DatasetError> {
    if label_map.is_empty() {
        return Ok(());
    }
    let present: BTreeSet<&str> = candidates
        .iter()
        .filter_map(|c| c.label.as_deref())
        .collect();
    if let Some(unknown) = label_map
        .keys()
        .find(|from| !present.contains(from.as_str()))
    {
        let mut classes: Vec<&str> = present.into_iter().collect();
        classes.sort();
        return Err(DatasetError::Source {
            path: source.to_path_buf(),
            message: format!(
                "--label-map names class {unknown:?}, which this source does not have; its classes are {}",
                if classes.is_empty() {
                    "none (unlabeled)".to_string()
                } else {
                    classes.join(", ")
                }
            ),
        });
    }
    for candidate in candidates {
        if let Some(label) = &candidate.label
            && let Some(to) = label_map.get(label)
        {
            candidate.label = Some(to.clone());
        }
    }
    Ok(())
}

/// Parses `--label-map`: `OLD=NEW` pairs separated by commas, or the path of
/// a file with one `OLD=NEW` (or `OLD,NEW`) per line.
pub fn parse_label_map(value: &str) -> Result<BTreeMap<String, String>, DatasetError> {
    let path = Path::new(value);
    let (text, origin) = if !value.contains('=') && path.is_file() {
        let text = fs::read_to_string(path).map_err(|e| DatasetError::io(path, e))?;
        (text, Some(path))
    } else {
        (value.replace(',', "\n"), None)
    };
    let mut map = BTreeMap::new();
    for (number, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let pair = line.split_once('=').or_else(|| line.split_once(','));
        let bad = |message: String| match origin {
            Some(path) => DatasetError::Row {
                path: path.to_path_buf(),
                line: number + 1,
                message,
            },
            None => DatasetError::Config(format!("--label-map {value}: {message}")),
        };
        let Some((from, to)) = pair.map(|(a, b)| (a.trim(), b.trim())) else {
            return Err(bad(format!("'{line}' is not OLD=NEW")));
        };
        if from.is_empty() || to.is_empty() {
            return Err(bad(format!("'{line}': empty class name")));
        }
        if map.insert(from.to_string(), to.to_string()).is_some() {
            return Err(bad(format!("class {from:?} is mapped twice")));
        }
    }
    if map.is_empty() {
        return Err(DatasetError::Config(format!(
            "--label-map {value}: no OLD=NEW pairs"
        )));
    }
    Ok(map)
}

/// Scans `source`, registers it as dataset `name`, and returns its summary.
/// Nothing is written unless the whole scan succeeds; an existing dataset is
/// never touched (`update` makes new versions).
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
    let base_dir = absolute_base(config.base_dir.as_deref())?;
    let scan = scan_source(
        source,
        &ScanSettings {
            format: config.format,
            label_column: config.label_column.as_ref(),
            label_map: &config.label_map,
            base_dir: base_dir.as_deref(),
        },
    )?;
    check_masks(scan.kept.iter())?;

    let (splits, split_source) = resolve_splits(&scan.kept, &[], config.split)?;
    let class_order = scan.class_order;
    let images: Vec<ImageRecord> = scan
        .kept
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
                added: 1,
                removed: None,
            },
        )
        .collect();
    let created_at = now_rfc3339();
    let info = summarise(SummaryInput {
        name,
        source: &scan.source,
        format: scan.format,
        images: &images,
        class_order,
        split_source,
        split_config: config.split,
        mask_kind: config.mask_kind,
        duplicates: scan.duplicates,
        skipped: scan.skipped,
        created_at: created_at.clone(),
        version: 1,
        versions: vec![VersionRecord {
            version: 1,
            created_at,
            source: scan.source.clone(),
            images: images.len(),
            added: images.len(),
            removed: 0,
        }],
        label_map: config.label_map.clone(),
        label_column: config.label_column.as_ref().map(|c| c.to_string()),
        base_dir,
    });
    publish(layout, &target, &info, &images)?;
    Ok(info)
}

fn absolute_base(base_dir: Option<&Path>) -> Result<Option<PathBuf>, DatasetError> {
    base_dir
        .map(|dir| {
            if !dir.is_dir() {
                return Err(DatasetError::Source {
                    path: dir.to_path_buf(),
                    message: "--base-dir is not a folder".to_string(),
                });
            }
            std::path::absolute(dir).map_err(|e| DatasetError::io(dir, e))
        })
        .transpose()
}

/// Rescans a registered dataset's source (or `config.source`) and publishes
/// what changed as a new manifest version: images listed before keep their
/// index and split; new images are appended with a split from the same
/// deterministic assignment as `add` (over every image the new version
/// lists); images no longer found are marked removed (their rows, and
/// their cached features, stay for older versions and other datasets).
/// An image whose path, label or mask changed gets a new row with its old
/// split. Nothing is written when nothing changed.
pub fn update(
    layout: &Layout,
    name: &str,
    config: &UpdateConfig,
) -> Result<UpdateOutcome, DatasetError> {
    super::load_info(layout, name)?;
    let dir = layout.dataset_dir(name);
    // One update at a time per dataset; readers need no lock (see mod.rs).
    let lock_path = dir.join(LOCK_FILE);
    let lock = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| DatasetError::io(&lock_path, e))?;
    lock.lock().map_err(|e| DatasetError::io(&lock_path, e))?;
    // Read under the lock: another update may have published meanwhile.
    let previous = super::load_info(layout, name)?;
    let version = previous.version + 1;
    if let Some(split) = config.split
        && split != previous.split_config
    {
        return Err(DatasetError::Config(format!(
            "dataset '{name}' was split with {}/{}/{} and seed {}; an update keeps every image's split, so --split and --seed cannot change (got {}/{}/{} and seed {})",
            previous.split_config.train,
            previous.split_config.val,
            previous.split_config.test,
            previous.split_config.seed,
            split.train,
            split.val,
            split.test,
            split.seed
        )));
    }
    let label_map = config
        .label_map
        .clone()
        .unwrap_or_else(|| previous.label_map.clone());
    let label_column = match &config.label_column {
        Some(column) => Some(column.clone()),
        None => previous
            .label_column
            .as_deref()
            .map(LabelColumn::from_str)
            .transpose()
            .map_err(DatasetError::Config)?,
    };
    let base_dir = match &config.base_dir {
        Some(dir) => absolute_base(Some(dir))?,
        None => previous.base_dir.clone(),
    };
    let source = config.source.clone().unwrap_or(previous.source.clone());
    let scan = scan_source(
        &source,
        &ScanSettings {
            format: Some(config.format.unwrap_or(previous.format)),
            label_column: label_column.as_ref(),
            label_map: &label_map,
            base_dir: base_dir.as_deref(),
        },
    )?;

    // Every row so far; rows of a version that was never published (an
    // update killed before its dataset.json) are dropped.
    let mut rows: Vec<ImageRecord> = Vec::new();
    super::visit_rows(&dir.join(IMAGES_FILE), |mut record| {
        if record.added <= previous.version {
            if record.removed.is_some_and(|r| r > previous.version) {
                record.removed = None;
            }
            rows.push(record);
        }
        Ok(())
    })?;
    let listed: Vec<usize> = (0..rows.len())
        .filter(|&i| rows[i].listed_in(previous.version))
        .collect();
    // The latest split of each content, listed or not: a returning image
    // keeps its split too.
    let mut split_of: ContentMap<Split> = ContentMap::default();
    for row in &rows {
        split_of.insert(&row.content_id(), row.split);
    }
    let mut listed_by_id: ContentMap<usize> = ContentMap::default();
    for &i in &listed {
        listed_by_id.insert(&rows[i].content_id(), i);
    }
    // Where a file and its copy are both in the source, the copy the
    // dataset already lists stays the kept one.
    let mut kept = scan.kept;
    for (candidate, id, _, _) in kept.iter_mut() {
        let full = ContentId::parse(id).expect("scanned ids are full");
        let Some(row) = listed_by_id.get(&full) else {
            continue;
        };
        let listed_path = &rows[row].path;
        if &candidate.path != listed_path
            && scan
                .duplicates
                .iter()
                .any(|group| &group.id == id && group.dropped.contains(listed_path))
        {
            candidate.path = listed_path.clone();
        }
    }

    let mut matched: BTreeSet<usize> = BTreeSet::new();
    // Listed rows whose path, label or mask changed: removed, added again.
    let mut replaced: Vec<usize> = Vec::new();
    let mut outcome_kept = 0;
    // Each new row with its split when already known.
    let mut new_rows: Vec<(Kept, Option<Split>)> = Vec::new();
    for item in kept {
        let full = ContentId::parse(&item.1).expect("scanned ids are full");
        match listed_by_id.get(&full) {
            Some(row) => {
                matched.insert(row);
                let record = &mut rows[row];
                let same = record.path == item.0.path
                    && record.label == item.0.label
                    && record.mask == item.0.mask;
                if same {
                    // Same image: an old manifest's short id becomes the full one.
                    record.id = item.1.clone();
                    outcome_kept += 1;
                } else {
                    replaced.push(row);
                    let split = record.split;
                    new_rows.push((item, Some(split)));
                }
            }
            None => {
                let split = split_of.get(&full);
                new_rows.push((item, split));
            }
        }
    }
    let changed_rows = replaced.len();
    let removed_rows: Vec<usize> = listed
        .iter()
        .copied()
        .filter(|row| !matched.contains(row))
        .collect();
    let added_images = new_rows.len() - changed_rows;
    if new_rows.is_empty() && removed_rows.is_empty() {
        return Ok(UpdateOutcome {
            info: previous.clone(),
            previous_version: previous.version,
            changed: false,
            added: 0,
            removed: 0,
            changed_rows: 0,
            kept: outcome_kept,
        });
    }
    check_masks(new_rows.iter().map(|(item, _)| item))?;

    // Splits of new images: the manifest's when it gives one for every
    // scanned image, else the stratified assignment over every image this
    // version lists, read for the new ones only.
    let replaced_set: BTreeSet<usize> = replaced.iter().copied().collect();
    let still_listed: Vec<&ImageRecord> = matched
        .iter()
        .filter(|row| !replaced_set.contains(row))
        .map(|&row| &rows[row])
        .collect();
    let unknown: Vec<&Kept> = new_rows
        .iter()
        .filter(|(_, split)| split.is_none())
        .map(|(item, _)| item)
        .collect();
    let fixed: Vec<(Option<&str>, &str)> = still_listed
        .iter()
        .map(|r| (r.label.as_deref(), r.id.as_str()))
        .chain(
            new_rows
                .iter()
                .filter(|(_, split)| split.is_some())
                .map(|(item, _)| (item.0.label.as_deref(), item.1.as_str())),
        )
        .collect();
    let (assigned, _) = resolve_splits_of(&unknown, &fixed, previous.split_config)?;
    let mut assigned = assigned.into_iter();

    for &row in removed_rows.iter().chain(&replaced) {
        rows[row].removed = Some(version);
    }
    for (item, split) in new_rows {
        let split = match split {
            Some(split) => split,
            None => assigned.next().expect("one split per new image"),
        };
        let (candidate, id, width, height) = item;
        rows.push(ImageRecord {
            index: rows.len(),
            id,
            path: candidate.path,
            label: candidate.label,
            split,
            mask: candidate.mask,
            width,
            height,
            added: version,
            removed: None,
        });
    }
    let images_now: Vec<&ImageRecord> = rows.iter().filter(|r| r.listed_in(version)).collect();
    let class_order = updated_class_order(&previous.class_order, &scan.class_order, &images_now);
    let created_at = now_rfc3339();
    let mut versions = previous.versions.clone();
    if versions.is_empty() {
        versions.push(VersionRecord {
            version: previous.version,
            created_at: previous.created_at.clone(),
            source: previous.source.clone(),
            images: previous.images,
            added: previous.images,
            removed: 0,
        });
    }
    versions.push(VersionRecord {
        version,
        created_at: created_at.clone(),
        source: scan.source.clone(),
        images: images_now.len(),
        added: added_images + changed_rows,
        removed: removed_rows.len() + replaced.len(),
    });
    let listed_records: Vec<ImageRecord> = images_now.into_iter().cloned().collect();
    let mut info = summarise(SummaryInput {
        name,
        source: &scan.source,
        format: scan.format,
        images: &listed_records,
        class_order,
        split_source: if previous.split_source == "manifest" {
            "manifest"
        } else {
            "stratified"
        },
        split_config: previous.split_config,
        mask_kind: config.mask_kind.unwrap_or(previous.mask_kind),
        duplicates: scan.duplicates,
        skipped: scan.skipped,
        created_at,
        version,
        versions,
        label_map,
        label_column: label_column.map(|c| c.to_string()),
        base_dir,
    });
    info.created_at = previous.created_at.clone();
    publish_version(&dir, &previous, &info, &rows)?;
    Ok(UpdateOutcome {
        info,
        previous_version: previous.version,
        changed: true,
        added: added_images,
        removed: removed_rows.len(),
        changed_rows,
        kept: outcome_kept,
    })
}

/// Values by content id: rows with a full sha256 by all of it, rows of old
/// manifests by their 8 bytes; a full id finds either.
struct ContentMap<T> {
    full: HashMap<[u8; 32], T>,
    short: HashMap<[u8; 8], T>,
}

impl<T> Default for ContentMap<T> {
    fn default() -> Self {
        ContentMap {
            full: HashMap::new(),
            short: HashMap::new(),
        }
    }
}

impl<T: Copy> ContentMap<T> {
    fn insert(&mut self, id: &ContentId, value: T) {
        match id.sha256() {
            Some(full) => {
                self.full.insert(*full, value);
            }
            None => {
                let key = id.known_bytes()[..8].try_into().expect("8 bytes");
                self.short.insert(key, value);
            }
        }
    }

    /// The value of the image whose full id is `id`.
    fn get(&self, id: &ContentId) -> Option<T> {
        let full = id.sha256().expect("scanned ids are full");
        let short: [u8; 8] = full[..8].try_into().expect("8 bytes");
        self.full
            .get(full)
            .or_else(|| self.short.get(&short))
            .copied()
    }
}

/// The class order of a new version: the previous classes still present,
/// in their order (class indices stay where they were), then new classes.
fn updated_class_order(
    previous: &[String],
    scanned: &[String],
    images: &[&ImageRecord],
) -> Vec<String> {
    let present: BTreeSet<&str> = images.iter().filter_map(|r| r.label.as_deref()).collect();
    let mut order: Vec<String> = Vec::new();
    for name in previous.iter().chain(scanned) {
        if present.contains(name.as_str()) && !order.contains(name) {
            order.push(name.clone());
        }
    }
    order
}

/// Writes version `info.version` of the dataset in `dir`: its summary
/// under versions/, every row in images.csv, then dataset.json, which
/// publishes it. The previous version's summary is kept under versions/.
fn publish_version(
    dir: &Path,
    previous: &DatasetInfo,
    info: &DatasetInfo,
    rows: &[ImageRecord],
) -> Result<(), DatasetError> {
    let versions = dir.join(VERSIONS_DIR);
    fs::create_dir_all(&versions).map_err(|e| DatasetError::io(&versions, e))?;
    let previous_path = version_file(dir, previous.version);
    if !previous_path.exists() {
        write_json(&previous_path, previous)?;
    }
    write_json(&version_file(dir, info.version), info)?;
    let images_path = dir.join(IMAGES_FILE);
    crate::atomic::write_file_with(&images_path, |file| {
        super::write_images_csv(rows, std::io::BufWriter::new(file)).map_err(std::io::Error::other)
    })
    .map_err(|e| DatasetError::io(&images_path, e))?;
    write_json(&dir.join(INFO_FILE), info)
}

fn write_json(path: &Path, info: &DatasetInfo) -> Result<(), DatasetError> {
    let json = serde_json::to_vec_pretty(info).expect("dataset info serialises");
    crate::atomic::write_file(path, &json).map_err(|e| DatasetError::io(path, e))
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
        // Links to folders are not followed, so they are not sub-folders.
        let is_folder = |entry: &PathBuf| {
            !is_hidden(entry) && fs::symlink_metadata(entry).is_ok_and(|m| m.is_dir())
        };
        let mut folders: Vec<String> = read_dir_sorted(source)?
            .iter()
            .filter(|entry| is_folder(entry))
            .filter_map(|entry| entry.file_name().map(|n| n.to_string_lossy().into_owned()))
            .collect();
        folders.sort();
        if folders == ["images", "masks"] {
            return Ok(SourceFormat::MaskFolders);
        }
        let has_subfolder = !folders.is_empty();
        return Ok(if has_subfolder {
            SourceFormat::ImageFolder
        } else {
            SourceFormat::Unlabeled
        });
    }
    let text = read_text(source)?;
    let first_line = text.lines().find(|line| !line.trim().is_empty());
    Ok(match first_line {
        Some(line) if line.contains('\t') || line.contains(',') => SourceFormat::Manifest,
        _ => SourceFormat::LabelFile,
    })
}

/// A manifest's text; a FIFO or device given as the source is refused
/// without blocking.
fn read_text(path: &Path) -> Result<String, DatasetError> {
    let bytes = crate::files::read_regular_file(path).map_err(|err| match err {
        crate::files::ReadError::Io(err) => DatasetError::io(path, err),
        not_regular => DatasetError::Source {
            path: path.to_path_buf(),
            message: format!("{not_regular}; give a folder or a CSV/TSV/label file"),
        },
    })?;
    String::from_utf8(bytes).map_err(|_| DatasetError::Source {
        path: path.to_path_buf(),
        message: "not a text manifest (invalid UTF-8); give a folder or a CSV/TSV/label file"
            .to_string(),
    })
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

/// What a folder entry is, under the scan's link rule.
enum Entry {
    /// A folder to descend into (never a link to one).
    Folder,
    /// Anything else to read as an image: a file, a link to one, or a
    /// special file that reading will list as skipped.
    File,
    /// Not scanned, with the reason.
    Skipped(String),
}

/// Classifies `path` without following a link to a folder.
fn entry_kind(path: &Path) -> Result<Entry, DatasetError> {
    let own = fs::symlink_metadata(path).map_err(|e| DatasetError::io(path, e))?;
    if own.is_dir() {
        return Ok(Entry::Folder);
    }
    if own.file_type().is_symlink() {
        return Ok(match fs::metadata(path) {
            Ok(target) if target.is_dir() => Entry::Skipped(
                "symbolic link to a folder: not followed (links to files are)".to_string(),
            ),
            Ok(_) => Entry::File,
            Err(err) => Entry::Skipped(format!("broken symbolic link: {err}")),
        });
    }
    Ok(Entry::File)
}

/// Every non-hidden file below `dir`, sorted, recursing into sub-folders;
/// links to folders go to `skipped`.
fn files_below(
    dir: &Path,
    out: &mut Vec<PathBuf>,
    skipped: &mut Vec<SkippedFile>,
) -> Result<(), DatasetError> {
    for path in read_dir_sorted(dir)? {
        if is_hidden(&path) {
            continue;
        }
        match entry_kind(&path)? {
            Entry::Folder => files_below(&path, out, skipped)?,
            Entry::File => out.push(path),
            Entry::Skipped(reason) => skipped.push(SkippedFile { path, reason }),
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
        match entry_kind(&entry)? {
            Entry::Folder => {}
            Entry::File => {
                skipped.push(SkippedFile {
                    path: entry,
                    reason: "not inside a class folder".to_string(),
                });
                continue;
            }
            Entry::Skipped(reason) => {
                skipped.push(SkippedFile {
                    path: entry,
                    reason,
                });
                continue;
            }
        }
        let class = entry
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut files = Vec::new();
        files_below(&entry, &mut files, &mut skipped)?;
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
    let mut skipped = Vec::new();
    files_below(source, &mut files, &mut skipped)?;
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
    Ok((candidates, skipped))
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
    let mut skipped = Vec::new();
    files_below(&masks_dir, &mut masks, &mut skipped)?;
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
    files_below(&images_dir, &mut images, &mut skipped)?;
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
    Ok((candidates, skipped))
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

/// A manifest's path cell as a path: absolute paths as written, relative
/// ones against `base` (the manifest's folder, or `--base-dir`), with `.`
/// and `..` resolved lexically. Paths may lead anywhere: people keep a CSV
/// apart from their images.
fn resolve_path(base: &Path, cell: &str) -> PathBuf {
    let joined = base.join(cell);
    let mut resolved = PathBuf::new();
    for component in joined.components() {
        match component {
            // `..` above the root stays at the root, as the OS resolves it.
            Component::ParentDir => {
                resolved.pop();
            }
            Component::CurDir => {}
            other => resolved.push(other.as_os_str()),
        }
    }
    resolved
}

fn read_manifest(
    manifest: &Path,
    format: SourceFormat,
    label_column: Option<&LabelColumn>,
    base_dir: Option<&Path>,
) -> Result<Vec<Candidate>, DatasetError> {
    if manifest.is_dir() {
        return Err(DatasetError::Source {
            path: manifest.to_path_buf(),
            message: format!("expected a {format} file, found a folder"),
        });
    }
    let text = read_text(manifest)?;
    let rows = split_rows(manifest, &text, format)?;
    let Some((_, first_row)) = rows.first() else {
        return Err(DatasetError::Source {
            path: manifest.to_path_buf(),
            message: "empty manifest: no rows".to_string(),
        });
    };
    let (columns, has_header) = resolve_columns(manifest, first_row, format, label_column)?;
    let base = match base_dir {
        Some(dir) => dir.to_path_buf(),
        None => manifest.parent().unwrap_or(Path::new("/")).to_path_buf(),
    };
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
        let path = resolve_path(&base, path_cell);
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
        let mask = optional_cell(row, columns.mask).map(|cell| resolve_path(&base, &cell));
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
    let bytes = match crate::files::read_regular_file(&candidate.path) {
        Ok(bytes) => bytes,
        Err(crate::files::ReadError::Io(err)) if err.kind() == std::io::ErrorKind::NotFound => {
            return Probe::Skipped(format!("file not found (named at {})", candidate.origin));
        }
        Err(crate::files::ReadError::Io(err)) => {
            return Probe::Skipped(format!("cannot read: {err}"));
        }
        Err(not_regular) => return Probe::Skipped(not_regular.to_string()),
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

/// The content id of an image file's bytes: its sha256, 64 hex digits.
pub fn content_id(bytes: &[u8]) -> String {
    crate::digest::sha256_hex(bytes)
}

/// Every mask exists, is a readable image, and has its image's size.
fn check_masks<'a>(kept: impl Iterator<Item = &'a Kept>) -> Result<(), DatasetError> {
    let kept: Vec<&Kept> = kept.collect();
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
            let bytes = crate::files::read_regular_file(mask).map_err(|err| match err {
                crate::files::ReadError::Io(err) => DatasetError::io(mask, err),
                not_regular => DatasetError::Source {
                    path: mask.clone(),
                    message: not_regular.to_string(),
                },
            })?;
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
    kept: &[Kept],
    fixed: &[(Option<&str>, &str)],
    config: SplitConfig,
) -> Result<(Vec<Split>, &'static str), DatasetError> {
    let kept: Vec<&Kept> = kept.iter().collect();
    resolve_splits_of(&kept, fixed, config)
}

/// The splits of `new` images: the manifest's when it gives one for each,
/// else their places in the stratified assignment of `new` together with
/// `fixed` (label, id) images whose splits are already set.
fn resolve_splits_of(
    new: &[&Kept],
    fixed: &[(Option<&str>, &str)],
    config: SplitConfig,
) -> Result<(Vec<Split>, &'static str), DatasetError> {
    let given = new.iter().filter(|k| k.0.split.is_some()).count();
    if given == new.len() {
        return Ok((new.iter().filter_map(|k| k.0.split).collect(), "manifest"));
    }
    if given > 0 {
        let missing = new
            .iter()
            .find(|k| k.0.split.is_none())
            .expect("some row lacks a split");
        return Err(DatasetError::Config(format!(
            "{}: the manifest gives a split for {given} of {} images but not for this one; give a split for every row or for none",
            missing.0.origin,
            new.len()
        )));
    }
    let items: Vec<(Option<&str>, &str)> = new
        .iter()
        .map(|k| (k.0.label.as_deref(), k.1.as_str()))
        .chain(fixed.iter().copied())
        .collect();
    let mut splits = split::assign(&items, &config);
    splits.truncate(new.len());
    Ok((splits, "stratified"))
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

/// The class order of the source's own labels, then renamed by the label
/// map (merged classes take the place of the first): mapping elpv's
/// 0.0 .. 1.0 to names keeps the grades in order.
fn mapped_class_order(raw: &[String], label_map: &BTreeMap<String, String>) -> Vec<String> {
    let mut order: Vec<String> = Vec::with_capacity(raw.len());
    for name in raw {
        let mapped = label_map.get(name).unwrap_or(name);
        if !order.contains(mapped) {
            order.push(mapped.clone());
        }
    }
    order
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
    created_at: String,
    version: u32,
    versions: Vec<VersionRecord>,
    label_map: BTreeMap<String, String>,
    label_column: Option<String>,
    base_dir: Option<PathBuf>,
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
        created_at: input.created_at,
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
        version: input.version,
        versions: input.versions,
        label_map: input.label_map,
        label_column: input.label_column,
        base_dir: input.base_dir,
    }
}

/// UTC time as RFC 3339, to the second.
fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

/// Writes the files of version 1 into a temp folder and renames it into place.
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
        let versions = staging.join(VERSIONS_DIR);
        fs::create_dir(&versions).map_err(|e| DatasetError::io(&versions, e))?;
        write_json(&version_file(&staging, info.version), info)?;
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
    fn manifest_paths_resolve_anywhere() {
        let base = Path::new("/data/set");
        assert_eq!(
            resolve_path(base, "a/b.png"),
            PathBuf::from("/data/set/a/b.png")
        );
        assert_eq!(
            resolve_path(base, "a/../b.png"),
            PathBuf::from("/data/set/b.png")
        );
        assert_eq!(
            resolve_path(base, "../other/b.png"),
            PathBuf::from("/data/other/b.png")
        );
        assert_eq!(
            resolve_path(base, "/images/b.png"),
            PathBuf::from("/images/b.png")
        );
        assert_eq!(
            resolve_path(base, "../../../../b.png"),
            PathBuf::from("/b.png")
        );
    }

    #[test]
    fn label_maps_parse_inline_and_keep_grade_order() {
        let map = parse_label_map("0.0=functional, 1.0=defective").unwrap();
        assert_eq!(map["0.0"], "functional");
        assert_eq!(map["1.0"], "defective");
        assert!(parse_label_map("a=b,a=c").is_err());
        assert!(parse_label_map("nonsense").is_err());
        let raw: Vec<String> = ["0.0", "0.3333333333333333", "0.6666666666666666", "1.0"]
            .map(String::from)
            .to_vec();
        let map = parse_label_map(
            "0.0=functional,0.3333333333333333=mild,0.6666666666666666=defective,1.0=defective",
        )
        .unwrap();
        assert_eq!(
            mapped_class_order(&raw, &map),
            vec!["functional", "mild", "defective"]
        );
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

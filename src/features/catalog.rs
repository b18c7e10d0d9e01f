//! The one place that finds features: for a dataset (at a manifest
//! version), an encoder, pooled or spatial features and an optional
//! fingerprint, which fingerprint folder holds them, and the rows of the
//! dataset's images in it, joined by content id. `train`, `sweep`,
//! `review`, `drift`, segmentation and anomaly runs read features through
//! [`open`]; prediction (every task, from a run or a bundle) looks cached
//! images up by content id in the whole folder a run recorded, through
//! [`FeatureCache`].
//!
//! A fingerprint folder is shared by every dataset, so "the features of
//! dataset D" are the folders holding rows of D's images. Without a
//! fingerprint, the folders made by the encoder (and of the kind) asked for
//! are candidates; those holding rows of D's images are the choice, and
//! more than one is refused with a list to pick from (`--fingerprint`).

use std::ops::Range;
use std::path::{Path, PathBuf};

use super::{FeatureError, FeatureSet, feature_dir, legacy_feature_dir};
use crate::dataset::{self, DatasetInfo, Split};
use crate::digest::ContentId;
use crate::layout::Layout;

/// Pooled features of the center crop, or spatial maps per tile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeatureKind {
    Pooled,
    Spatial,
}

impl FeatureKind {
    fn of(set: &FeatureSet) -> Self {
        if set.maps().is_empty() {
            FeatureKind::Pooled
        } else {
            FeatureKind::Spatial
        }
    }

    fn name(self) -> &'static str {
        match self {
            FeatureKind::Pooled => "pooled",
            FeatureKind::Spatial => "spatial",
        }
    }
}

/// Which features a reader wants.
#[derive(Debug, Clone, Copy, Default)]
pub struct FeatureRequest<'a> {
    pub dataset: &'a str,
    /// The manifest version; `None` for the current one.
    pub version: Option<u32>,
    /// Only folders made by this encoder (shard metadata `encoder`).
    pub encoder: Option<&'a str>,
    /// Only folders of this kind; `None` accepts either.
    pub kind: Option<FeatureKind>,
    /// This folder and no other.
    pub fingerprint: Option<&'a str>,
    /// Only folders of these extraction options.
    pub pooled: Option<&'a PooledChoice>,
}

/// Which pooled folder a reader wants by the options `enqueue` made it
/// with (`--layers`, `--image-size`, `--resize`, `--views`); None accepts
/// any. The `train` flags and sweep keys of the same names.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PooledChoice {
    /// Canonical, as `PooledLayers` prints them: `last`, `1,2,3,4,5,6,7,head`.
    pub layers: Option<String>,
    pub image_size: Option<u32>,
    /// `crop`, `stretch` or `pad`.
    pub resize: Option<String>,
    /// `1`, `flips` or `dihedral` (`ViewSet::name`).
    pub views: Option<String>,
    /// The maps of a spatial folder, canonical as `SpatialMaps` prints
    /// them (`enqueue --maps`: `16,32`, `4,8,16,32`).
    pub maps: Option<String>,
}

impl PooledChoice {
    pub fn is_any(&self) -> bool {
        *self == PooledChoice::default()
    }

    fn accepts(&self, folder: &super::FolderKind) -> bool {
        let input = folder.input.as_ref();
        self.layers.as_ref().is_none_or(|l| *l == folder.layers)
            && self
                .image_size
                .is_none_or(|size| input.is_some_and(|(s, _)| *s == size))
            && self
                .resize
                .as_ref()
                .is_none_or(|resize| input.is_some_and(|(_, r)| r == resize))
            && self.views.as_ref().is_none_or(|v| *v == folder.views)
            && self.maps.as_ref().is_none_or(|m| *m == folder.maps)
    }

    /// ` of layers L, N px, R` for what was asked.
    fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(layers) = &self.layers {
            parts.push(format!("layers {layers}"));
        }
        if let Some(size) = self.image_size {
            parts.push(format!("{size} px"));
        }
        if let Some(resize) = &self.resize {
            parts.push(resize.clone());
        }
        if let Some(views) = &self.views {
            parts.push(format!("views {views}"));
        }
        if let Some(maps) = &self.maps {
            parts.push(format!("maps {maps}"));
        }
        if parts.is_empty() {
            String::new()
        } else {
            format!(" of {}", parts.join(", "))
        }
    }

    /// The `enqueue` flags that make such a folder.
    fn enqueue_flags(&self) -> String {
        let mut flags = String::new();
        if let Some(layers) = self.layers.as_ref().filter(|l| *l != "last") {
            flags.push_str(&format!(" --layers {layers}"));
        }
        if let Some(size) = self.image_size {
            flags.push_str(&format!(" --image-size {size}"));
        }
        if let Some(resize) = &self.resize {
            flags.push_str(&format!(" --resize {resize}"));
        }
        if let Some(views) = self.views.as_ref().filter(|v| *v != "1") {
            flags.push_str(&format!(" --views {views}"));
        }
        flags
    }
}

/// One image of the dataset that has no feature row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lacking {
    pub index: usize,
    pub split: Split,
}

/// A dataset version's features: the folder's rows of its images, in
/// manifest order (`FeatureSet::image_indices` gives each row's image).
pub struct DatasetFeatures {
    /// The summary of the manifest version read.
    pub info: DatasetInfo,
    pub fingerprint: String,
    pub features: FeatureSet,
    /// Listed images without a row (extraction unfinished, or failed).
    pub lacking: Vec<Lacking>,
}

impl DatasetFeatures {
    /// Images lacking per split: (train, val, test).
    pub fn lacking_by_split(&self) -> [usize; 3] {
        let mut counts = [0; 3];
        for lacking in &self.lacking {
            counts[split_slot(lacking.split)] += 1;
        }
        counts
    }
}

fn split_slot(split: Split) -> usize {
    match split {
        Split::Train => 0,
        Split::Val => 1,
        Split::Test => 2,
    }
}

/// Why an incomplete feature set is refused, as one message: how many
/// images lack features per split, and the two ways on.
pub fn lacking_message(
    dataset: &str,
    version: u32,
    fingerprint: &str,
    lacking: [usize; 3],
    of: usize,
) -> String {
    let total: usize = lacking.iter().sum();
    format!(
        "features {} lack {total} of the {of} images of dataset {dataset} (version {version}) \
         ({} train, {} val, {} test): extraction is unfinished or failed for them; see \
         `lazarus status`, finish with `lazarus run-worker` (`lazarus verify --repair` re-queues \
         lost work), or pass --allow-partial to use the images that have features",
        &fingerprint[..fingerprint.len().min(12)],
        lacking[0],
        lacking[1],
        lacking[2],
    )
}

/// Opens the features of `request.dataset` (see the module's note on how
/// the folder is found) bound to the images of its manifest version.
pub fn open(
    layout: &Layout,
    request: &FeatureRequest<'_>,
) -> Result<DatasetFeatures, FeatureError> {
    let ids = dataset_ids(layout, request)?;
    let (fingerprint, set) = find(layout, request, &ids)?;
    let info = dataset::load_info_at(layout, request.dataset, request.version)?;
    let (features, lacking_indices) = set.bind(
        request.dataset,
        ids.iter().map(|image| (image.index, image.id)),
    )?;
    let lacking = lacking_indices
        .into_iter()
        .map(|index| {
            let position = ids
                .binary_search_by_key(&index, |image| image.index)
                .expect("lacking images are listed");
            Lacking {
                index,
                split: ids[position].split,
            }
        })
        .collect();
    Ok(DatasetFeatures {
        info,
        fingerprint,
        features,
        lacking,
    })
}

/// What the join needs of one listed image.
struct ListedImage {
    index: usize,
    id: ContentId,
    split: Split,
}

fn dataset_ids(
    layout: &Layout,
    request: &FeatureRequest<'_>,
) -> Result<Vec<ListedImage>, FeatureError> {
    let mut ids = Vec::new();
    dataset::visit_images_at(layout, request.dataset, request.version, |record| {
        ids.push(ListedImage {
            index: record.index,
            id: record.content_id(),
            split: record.split,
        });
        Ok(())
    })?;
    Ok(ids)
}

/// Cached feature rows of one fingerprint folder, found by image content
/// id: any image some dataset extracted with these settings, not only the
/// images of the run's dataset.
pub struct FeatureCache {
    features: FeatureSet,
}

impl FeatureCache {
    /// The features of `fingerprint` (every published shard of its folder).
    pub fn open(layout: &Layout, fingerprint: &str) -> Result<Self, FeatureError> {
        let features = FeatureSet::open(&feature_dir(layout, fingerprint))?;
        Ok(FeatureCache { features })
    }

    /// The cache of `fingerprint` when its folder exists; None otherwise
    /// (removed to save space: every image then goes through the encoder).
    pub fn open_if_present(
        layout: &Layout,
        fingerprint: &str,
    ) -> Result<Option<Self>, FeatureError> {
        if feature_dir(layout, fingerprint).is_dir() {
            Self::open(layout, fingerprint).map(Some)
        } else {
            Ok(None)
        }
    }

    pub fn features(&self) -> &FeatureSet {
        &self.features
    }

    /// The cached rows of the image whose bytes hash to `sha256` (a
    /// spatial set's tiles of it, in order), or None when the cache lacks it.
    pub fn rows(&self, sha256: &[u8; 32]) -> Option<Range<usize>> {
        Some(self.features.rows_of(sha256)).filter(|rows| !rows.is_empty())
    }
}

/// The fingerprint folder a request names (see the module's note), opened whole.
pub fn find_fingerprint(
    layout: &Layout,
    request: &FeatureRequest<'_>,
) -> Result<String, FeatureError> {
    let ids = dataset_ids(layout, request)?;
    Ok(find(layout, request, &ids)?.0)
}

fn find(
    layout: &Layout,
    request: &FeatureRequest<'_>,
    ids: &[ListedImage],
) -> Result<(String, FeatureSet), FeatureError> {
    let dataset = request.dataset;
    if let Some(fingerprint) = request.fingerprint {
        let dir = feature_dir(layout, fingerprint);
        if !dir.is_dir() {
            if legacy_feature_dir(layout, dataset, fingerprint).is_dir() {
                return Err(FeatureError::LegacyLayout {
                    dir: legacy_feature_dir(layout, dataset, fingerprint),
                    dataset: dataset.to_string(),
                });
            }
            return Err(FeatureError::NoFeatures(format!(
                "no features with fingerprint {fingerprint}: {} does not exist",
                dir.display()
            )));
        }
        let set = FeatureSet::open(&dir)?;
        check_kind(&set, request, fingerprint)?;
        return Ok((fingerprint.to_string(), set));
    }
    // Candidates are judged from shard headers and ids alone (cheap, and a
    // damaged folder of another configuration cannot stop this reader);
    // only the chosen folder is opened and checked.
    let mut chosen: Vec<(String, String, usize)> = Vec::new();
    let mut seen: Vec<String> = Vec::new();
    for fingerprint in fingerprint_folders(&layout.features_dir())? {
        let dir = feature_dir(layout, &fingerprint);
        let Some(folder) = super::folder_kind(&dir) else {
            continue;
        };
        let kind = if folder.spatial {
            FeatureKind::Spatial
        } else {
            FeatureKind::Pooled
        };
        let made_by = folder.encoder.clone();
        let described = describe(&folder, kind);
        if request
            .encoder
            .is_some_and(|e| made_by.as_deref() != Some(e))
            || request.kind.is_some_and(|k| k != kind)
            || request.pooled.is_some_and(|p| !p.accepts(&folder))
        {
            seen.push(format!("{} ({described})", short(&fingerprint)));
            continue;
        }
        let mut present = super::published_content_ids(&dir);
        present.sort_unstable();
        present.dedup();
        let covered = ids
            .iter()
            .filter(|image| {
                let prefix = image.id.known_bytes();
                let start = present.partition_point(|id| &id[..prefix.len()] < prefix);
                present.get(start).is_some_and(|id| id.starts_with(prefix))
            })
            .count();
        if covered > 0 {
            chosen.push((fingerprint, described, covered));
        } else {
            seen.push(format!("{} (no image of {dataset})", short(&fingerprint)));
        }
    }
    let kind = request
        .kind
        .map_or(String::new(), |k| format!("{} ", k.name()));
    let made_by = request
        .encoder
        .map_or(String::new(), |e| format!(" made by {e}"));
    let of_options = request.pooled.map_or(String::new(), PooledChoice::describe);
    let what = format!("{kind}features{of_options} of dataset {dataset}{made_by}");
    match chosen.len() {
        1 => {
            let (fingerprint, _, _) = chosen.pop().expect("one");
            let set = FeatureSet::open(&feature_dir(layout, &fingerprint))?;
            Ok((fingerprint, set))
        }
        0 => {
            if let Some(dir) = legacy_folders(&layout.features_dir(), dataset).first() {
                return Err(FeatureError::LegacyLayout {
                    dir: dir.clone(),
                    dataset: dataset.to_string(),
                });
            }
            Err(FeatureError::NoFeatures(format!(
                "no {what} under {}{}; extract them with `lazarus enqueue --dataset {dataset} --encoder {}{}` and `lazarus run-worker`",
                layout.features_dir().display(),
                if seen.is_empty() {
                    String::new()
                } else {
                    format!(" (found {})", seen.join(", "))
                },
                request.encoder.unwrap_or("ENCODER"),
                match (request.kind, request.pooled) {
                    (Some(FeatureKind::Spatial), pooled) => {
                        let mut flags = " --spatial".to_string();
                        if let Some(pooled) = pooled {
                            if let Some(maps) = &pooled.maps {
                                flags.push_str(&format!(" --maps {maps}"));
                            }
                            // The input square, as for pooled folders.
                            flags.push_str(&pooled.enqueue_flags());
                        }
                        flags
                    }
                    (_, Some(pooled)) => pooled.enqueue_flags(),
                    _ => String::new(),
                }
            )))
        }
        _ => {
            let listed: Vec<String> = chosen
                .iter()
                .map(|(fingerprint, described, covered)| {
                    format!(
                        "{fingerprint} ({described}, {covered} of {} images)",
                        ids.len()
                    )
                })
                .collect();
            Err(FeatureError::NoFeatures(format!(
                "several folders hold {what}; name the encoder (--encoder), the options they were extracted with (--layers, --image-size, --resize, --views, --maps) or the folder (--fingerprint): {}",
                listed.join(", ")
            )))
        }
    }
}

/// `encoder, kind`, then for pooled folders their layers when not `last`
/// and their input square (`224 px crop`).
fn describe(folder: &super::FolderKind, kind: FeatureKind) -> String {
    let encoder = folder.encoder.as_deref().unwrap_or("unknown encoder");
    let mut text = format!("{encoder}, {}", kind.name());
    if kind == FeatureKind::Pooled {
        if folder.layers != "last" {
            text.push_str(&format!(", layers {}", folder.layers));
        }
        if let Some((size, resize)) = &folder.input {
            text.push_str(&format!(", {size} px {resize}"));
        }
        if folder.views != "1" {
            text.push_str(&format!(", views {}", folder.views));
        }
    } else {
        text.push_str(&format!(", maps {}", folder.maps));
    }
    text
}

fn short(fingerprint: &str) -> &str {
    &fingerprint[..fingerprint.len().min(12)]
}

fn check_kind(
    set: &FeatureSet,
    request: &FeatureRequest<'_>,
    fingerprint: &str,
) -> Result<(), FeatureError> {
    let kind = FeatureKind::of(set);
    if let Some(wanted) = request.kind
        && !set.is_empty()
        && kind != wanted
    {
        return Err(FeatureError::NoFeatures(format!(
            "features {fingerprint} are {}, not {}{}",
            kind.name(),
            wanted.name(),
            if wanted == FeatureKind::Spatial {
                format!(
                    "; run `lazarus enqueue --dataset {} --encoder ENCODER --spatial` and a worker",
                    request.dataset
                )
            } else {
                String::new()
            }
        )));
    }
    if let (Some(encoder), Some(made_by)) = (request.encoder, set.metadata().get("encoder"))
        && encoder != made_by
    {
        return Err(FeatureError::NoFeatures(format!(
            "features {fingerprint} were made by encoder {made_by}, not {encoder}"
        )));
    }
    Ok(())
}

/// The fingerprint folders under `features_dir`, sorted: folders holding
/// shards directly (a folder of the old layout holds folders instead).
pub fn fingerprint_folders(features_dir: &Path) -> Result<Vec<String>, FeatureError> {
    let entries = match std::fs::read_dir(features_dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(err) => return Err(FeatureError::io(features_dir, err)),
    };
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| FeatureError::io(features_dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if crate::atomic::is_temp_name(&name) || !entry.path().is_dir() {
            continue;
        }
        if !super::marked_shards(&entry.path())?.is_empty() {
            names.push(name);
        }
    }
    names.sort();
    Ok(names)
}

/// Folders of the old layout (`features/DATASET/FINGERPRINT/` holding
/// shards) of one dataset.
pub fn legacy_folders(features_dir: &Path, dataset: &str) -> Vec<PathBuf> {
    let parent = features_dir.join(dataset);
    let Ok(entries) = std::fs::read_dir(&parent) else {
        return Vec::new();
    };
    let mut found: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|path| {
            path.is_dir() && super::marked_shards(path).is_ok_and(|shards| !shards.is_empty())
        })
        .collect();
    found.sort();
    found
}

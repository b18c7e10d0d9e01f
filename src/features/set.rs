//! `FeatureSet`: every published shard of one fingerprint folder,
//! memory-mapped, with random access by row and zero-copy f16 views.
//!
//! Opened whole, a set's rows are ordered by content id (an image's rows,
//! one per tile of a spatial set, are consecutive) and found with
//! [`FeatureSet::rows_of`]. [`FeatureSet::bind`] narrows it to the images
//! of one dataset version, in manifest order, which is how every reader
//! that trains or compares sees it (through `catalog`).
//!
//! Every shard is checked against its `.done` marker's sha256 the first
//! time it is opened; the result is kept in `verified.json` in the folder,
//! keyed by the file's size, inode and modification and change times, so a
//! shard is hashed again whenever its file changed.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::Read;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use half::f16;
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};
use serde::{Deserialize, Serialize};
use sha2::Digest;

use super::FeatureError;
use super::shard::{
    CONTENT_TENSOR, CheckLevel, DoneMarker, SHARD_FORMAT_VERSION, VIEW_TENSOR, check_shard,
    shard_file_name,
};
use crate::digest::ContentId;

struct MappedShard {
    path: PathBuf,
    mmap: Mmap,
    pooled: Range<usize>,
    /// Byte ranges of the spatial maps, in `FeatureSet::maps` order.
    maps: Vec<Range<usize>>,
    /// Byte range of the `tile` tensor ([rows, 4] i64), in spatial shards.
    tiles: Option<Range<usize>>,
    /// Byte range of the `view` tensor ([rows] u8), in shards of several
    /// views per image (`enqueue --views`).
    views: Option<Range<usize>>,
}

/// One kind of spatial map in a feature set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapShape {
    pub stride: usize,
    pub channels: usize,
    pub height: usize,
    pub width: usize,
}

/// The published features of one encoder fingerprint: all of them, or
/// those of one dataset version's images (`bind`).
pub struct FeatureSet {
    dir: PathBuf,
    shards: Vec<MappedShard>,
    /// For each row: (shard position, row within shard); ordered by content
    /// id, or by manifest index once bound to a dataset.
    locations: Vec<(u32, u32)>,
    /// The content id (sha256 of the image's bytes) of each row.
    ids: Vec<[u8; 32]>,
    /// Once bound: the manifest index of each row, ascending.
    image_index: Vec<usize>,
    bound: bool,
    feature_dim: usize,
    maps: Vec<MapShape>,
    metadata: HashMap<String, String>,
    /// Bytes of mapped rows read since the mapped pages were last released.
    touched_bytes: AtomicU64,
    /// Release the mapped pages once this many bytes were read (`u64::MAX`: never).
    resident_limit_bytes: AtomicU64,
}

impl std::fmt::Debug for FeatureSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FeatureSet")
            .field("dir", &self.dir)
            .field("shards", &self.shards.len())
            .field("rows", &self.locations.len())
            .field("feature_dim", &self.feature_dim)
            .finish()
    }
}

/// Where one tensor's bytes sit in the mapped file, and its shape.
type TensorSpan = (Range<usize>, Vec<usize>);

fn tensor_range(
    path: &Path,
    tensors: &SafeTensors<'_>,
    base: usize,
    name: &str,
    dtype: Dtype,
) -> Result<Option<TensorSpan>, FeatureError> {
    let view = match tensors.tensor(name) {
        Ok(view) => view,
        Err(_) => return Ok(None),
    };
    if view.dtype() != dtype {
        return Err(FeatureError::InvalidShard {
            path: path.to_path_buf(),
            message: format!("tensor '{name}' is {:?}, expected {dtype:?}", view.dtype()),
        });
    }
    // The view borrows the mmap; keep only its byte range so the set owns plain data.
    let start = view.data().as_ptr() as usize - base;
    Ok(Some((
        start..start + view.data().len(),
        view.shape().to_vec(),
    )))
}

/// File-backed resident bytes of this process (mapped files and shared
/// memory), from `/proc/self/statm`; `None` where it does not exist.
fn file_resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let shared_pages: u64 = statm.split_whitespace().nth(2)?.parse().ok()?;
    Some(shared_pages * 4096)
}

/// The file of a folder's checksum cache.
pub const VERIFIED_FILE: &str = "verified.json";

/// What identifies one state of a shard file: if any of it changed, the
/// file may have, and its checksum is computed again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct FileStamp {
    /// The sha256 the file had (and its marker names).
    sha256: String,
    bytes: u64,
    device: u64,
    inode: u64,
    modified_ns: i128,
    changed_ns: i128,
}

impl FileStamp {
    fn of(metadata: &std::fs::Metadata, sha256: &str) -> Self {
        #[cfg(unix)]
        let (device, inode, modified_ns, changed_ns) = {
            use std::os::unix::fs::MetadataExt;
            (
                metadata.dev(),
                metadata.ino(),
                metadata.mtime() as i128 * 1_000_000_000 + metadata.mtime_nsec() as i128,
                metadata.ctime() as i128 * 1_000_000_000 + metadata.ctime_nsec() as i128,
            )
        };
        #[cfg(not(unix))]
        let (device, inode, modified_ns, changed_ns) = {
            let modified = metadata
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_nanos() as i128);
            (0, 0, modified, modified)
        };
        FileStamp {
            sha256: sha256.to_string(),
            bytes: metadata.len(),
            device,
            inode,
            modified_ns,
            changed_ns,
        }
    }
}

/// The shards of a folder whose checksum matched, as of their stamps.
#[derive(Debug, Default, Serialize, Deserialize)]
struct VerifiedShards {
    shards: BTreeMap<String, FileStamp>,
    #[serde(skip)]
    changed: bool,
}

impl VerifiedShards {
    fn load(dir: &Path) -> Self {
        std::fs::read(dir.join(VERIFIED_FILE))
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_default()
    }

    /// Checks `path` against its marker: at once when its stamp was
    /// verified before, else by reading and hashing the whole file.
    fn check(&mut self, path: &Path, marker: &DoneMarker) -> Result<(), String> {
        let metadata = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let stamp = FileStamp::of(&metadata, &marker.sha256);
        if self.shards.get(&marker.shard) == Some(&stamp) {
            return Ok(());
        }
        let mut file = File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut hasher = sha2::Sha256::new();
        let mut buffer = vec![0u8; 1 << 20];
        loop {
            let n = file
                .read(&mut buffer)
                .map_err(|e| format!("{}: {e}", path.display()))?;
            if n == 0 {
                break;
            }
            hasher.update(&buffer[..n]);
        }
        let sha256 = hex::encode(hasher.finalize());
        if sha256 != marker.sha256 {
            return Err(format!(
                "{}: sha256 {sha256}, its marker says {}",
                path.display(),
                marker.sha256
            ));
        }
        // Stamped after hashing: a write in between changes the change time.
        if let Ok(after) = std::fs::metadata(path)
            && FileStamp::of(&after, &marker.sha256) == stamp
        {
            self.shards.insert(marker.shard.clone(), stamp);
            self.changed = true;
        }
        Ok(())
    }

    /// Keeps the cache; a folder that cannot be written (a read-only mount)
    /// only costs hashing again next time.
    fn save(&self, dir: &Path) {
        if self.changed {
            let json = serde_json::to_vec(self).expect("stamps serialise");
            let _ = crate::atomic::write_file(&dir.join(VERIFIED_FILE), &json);
        }
    }
}

impl FeatureSet {
    /// Maps every published shard (one with a `.done` marker) in `dir`,
    /// after checking it against its marker (see the module's note on
    /// `verified.json`). A shard whose marker, size or checksum is wrong is
    /// refused by name, as is an image with rows in two shards.
    pub fn open(dir: &Path) -> Result<Self, FeatureError> {
        if !dir.is_dir() {
            return Err(FeatureError::io(
                dir,
                std::io::Error::new(std::io::ErrorKind::NotFound, "no such feature folder"),
            ));
        }
        let indices = super::marked_shards(dir)?;
        let mut verified = VerifiedShards::load(dir);

        let mut set = FeatureSet {
            dir: dir.to_path_buf(),
            shards: Vec::new(),
            locations: Vec::new(),
            ids: Vec::new(),
            image_index: Vec::new(),
            bound: false,
            feature_dim: 0,
            maps: Vec::new(),
            metadata: HashMap::new(),
            touched_bytes: AtomicU64::new(0),
            resident_limit_bytes: AtomicU64::new(u64::MAX),
        };
        let mut rows: Vec<([u8; 32], u32, u32)> = Vec::new();
        for shard_index in indices {
            let path = dir.join(shard_file_name(shard_index));
            let corrupt = |reason: String| FeatureError::CorruptShard {
                path: path.clone(),
                reason,
            };
            let marker = check_shard(dir, shard_index, CheckLevel::Size).map_err(corrupt)?;
            if marker.format != SHARD_FORMAT_VERSION {
                return Err(corrupt(format!(
                    "{}: shard format {}, this lazarus reads {SHARD_FORMAT_VERSION} in a fingerprint folder",
                    path.display(),
                    marker.format
                )));
            }
            verified.check(&path, &marker).map_err(corrupt)?;
            let file = File::open(&path).map_err(|e| FeatureError::io(&path, e))?;
            // SAFETY: published shards are never modified in place: writers
            // create a new file and rename it over the old one, so the mapped
            // bytes stay valid for the life of this mapping.
            let mmap = unsafe { Mmap::map(&file) }.map_err(|e| FeatureError::io(&path, e))?;
            let invalid = |message: String| FeatureError::InvalidShard {
                path: path.clone(),
                message,
            };
            let tensors = SafeTensors::deserialize(&mmap).map_err(|e| invalid(e.to_string()))?;
            let base = mmap.as_ptr() as usize;
            let (id_range, id_shape) =
                tensor_range(&path, &tensors, base, CONTENT_TENSOR, Dtype::U8)?
                    .ok_or_else(|| invalid(format!("no '{CONTENT_TENSOR}' tensor")))?;
            let (pooled, pooled_shape) = tensor_range(&path, &tensors, base, "pooled", Dtype::F16)?
                .ok_or_else(|| invalid("no 'pooled' tensor".to_string()))?;
            let mut map_spans: Vec<(usize, TensorSpan)> = Vec::new();
            for name in tensors.names() {
                if let Some(stride) = name
                    .strip_prefix("spatial_s")
                    .and_then(|digits| digits.parse::<usize>().ok())
                {
                    let span = tensor_range(&path, &tensors, base, name, Dtype::F16)?
                        .expect("the name was listed");
                    if span.1.len() != 4 || span.1[0] != pooled_shape[0] {
                        return Err(invalid(format!(
                            "{name} has shape {:?}, expected [{}, channels, height, width]",
                            span.1, pooled_shape[0]
                        )));
                    }
                    map_spans.push((stride, span));
                }
            }
            map_spans.sort_by_key(|(stride, _)| *stride);
            let shapes: Vec<MapShape> = map_spans
                .iter()
                .map(|(stride, (_, shape))| MapShape {
                    stride: *stride,
                    channels: shape[1],
                    height: shape[2],
                    width: shape[3],
                })
                .collect();
            let tiles = tensor_range(&path, &tensors, base, "tile", Dtype::I64)?;
            if let Some((_, shape)) = &tiles
                && shape.as_slice() != [pooled_shape[0], 4]
            {
                return Err(invalid(format!(
                    "tile has shape {shape:?}, expected [{}, 4]",
                    pooled_shape[0]
                )));
            }
            let views = tensor_range(&path, &tensors, base, VIEW_TENSOR, Dtype::U8)?;
            if let Some((_, shape)) = &views
                && shape.as_slice() != [pooled_shape[0]]
            {
                return Err(invalid(format!(
                    "{VIEW_TENSOR} has shape {shape:?}, expected [{}]",
                    pooled_shape[0]
                )));
            }
            let n_rows = pooled_shape[0];
            let dim = pooled_shape.get(1).copied().unwrap_or(0);
            if set.shards.is_empty() {
                set.feature_dim = dim;
                set.maps = shapes;
                let (_, header) =
                    SafeTensors::read_metadata(&mmap).map_err(|e| invalid(e.to_string()))?;
                set.metadata = header.metadata().clone().unwrap_or_default();
            } else if dim != set.feature_dim {
                return Err(invalid(format!(
                    "feature dimension {dim}, but earlier shards have {}",
                    set.feature_dim
                )));
            } else if shapes != set.maps {
                return Err(invalid(format!(
                    "spatial maps {shapes:?}, but earlier shards have {:?}",
                    set.maps
                )));
            }
            if id_shape.as_slice() != [n_rows, 32] {
                return Err(invalid(format!(
                    "{CONTENT_TENSOR} has shape {id_shape:?}, expected [{n_rows}, 32]"
                )));
            }
            for range in std::iter::once(&pooled).chain(map_spans.iter().map(|(_, s)| &s.0)) {
                bytemuck::try_cast_slice::<u8, f16>(&mmap[range.clone()])
                    .map_err(|e| invalid(format!("f16 tensor: {e}")))?;
            }
            if let Some((range, _)) = &tiles {
                bytemuck::try_cast_slice::<u8, i64>(&mmap[range.clone()])
                    .map_err(|e| invalid(format!("tile: {e}")))?;
            }
            let position = set.shards.len() as u32;
            rows.extend(
                mmap[id_range]
                    .chunks_exact(32)
                    .enumerate()
                    .map(|(row, id)| (id.try_into().expect("32 bytes"), position, row as u32)),
            );
            set.shards.push(MappedShard {
                path,
                mmap,
                pooled,
                maps: map_spans.into_iter().map(|(_, (range, _))| range).collect(),
                tiles: tiles.map(|(range, _)| range),
                views: views.map(|(range, _)| range),
            });
        }
        verified.save(dir);
        rows.sort_unstable();
        for pair in rows.windows(2) {
            // Tiles of one image are rows of the same shard; two shards never share an image.
            if pair[0].0 == pair[1].0 && pair[0].1 != pair[1].1 {
                return Err(FeatureError::DuplicateImage {
                    dir: dir.to_path_buf(),
                    id: hex::encode(pair[0].0),
                    first: set.shards[pair[0].1 as usize].path.clone(),
                    second: set.shards[pair[1].1 as usize].path.clone(),
                });
            }
        }
        set.ids = rows.iter().map(|r| r.0).collect();
        set.locations = rows.iter().map(|r| (r.1, r.2)).collect();
        // Reading headers and ids faulted in pages of every shard.
        set.release_pages();
        Ok(set)
    }

    /// The rows (consecutive) of the image whose bytes hash to `sha256`, in
    /// a set opened whole; empty when the set lacks it.
    pub fn rows_of(&self, sha256: &[u8; 32]) -> Range<usize> {
        self.rows_with_prefix(sha256)
    }

    /// Rows whose content id starts with `prefix` (a full id, or an old
    /// manifest's 8 bytes), in a set opened whole.
    pub fn rows_with_prefix(&self, prefix: &[u8]) -> Range<usize> {
        debug_assert!(!self.bound, "a bound set is not ordered by content id");
        let start = self.ids.partition_point(|id| &id[..prefix.len()] < prefix);
        let end = self.ids.partition_point(|id| &id[..prefix.len()] <= prefix);
        start..end
    }

    /// The set narrowed to the images of one dataset version, given as
    /// (manifest index, content id) in manifest order: its rows are those
    /// images' rows in manifest order (an image's tiles consecutive), and
    /// `image_indices` gives each row's manifest index. Also returns the
    /// manifest indices of the images the set has no row for.
    pub fn bind(
        mut self,
        dataset: &str,
        images: impl IntoIterator<Item = (usize, ContentId)>,
    ) -> Result<(Self, Vec<usize>), FeatureError> {
        debug_assert!(!self.bound, "a set is bound once");
        let mut locations = Vec::new();
        let mut ids = Vec::new();
        let mut image_index = Vec::new();
        let mut lacking = Vec::new();
        for (index, id) in images {
            let range = self.rows_with_prefix(id.known_bytes());
            if range.is_empty() {
                lacking.push(index);
                continue;
            }
            // A short (old manifest) id must name one image.
            let first = self.ids[range.start];
            if !id.is_full() {
                let distinct = self.ids[range.clone()]
                    .iter()
                    .filter(|other| **other != first)
                    .count();
                if distinct > 0 {
                    return Err(FeatureError::AmbiguousId {
                        dir: self.dir.clone(),
                        dataset: dataset.to_string(),
                        id: id.to_string(),
                        ambiguous: range.len(),
                    });
                }
            }
            for row in range {
                locations.push(self.locations[row]);
                ids.push(self.ids[row]);
                image_index.push(index);
            }
        }
        self.locations = locations;
        self.ids = ids;
        self.image_index = image_index;
        self.bound = true;
        Ok((self, lacking))
    }

    /// The content id (sha256 of the image's bytes) of a row.
    pub fn content_id(&self, row: usize) -> &[u8; 32] {
        &self.ids[row]
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Number of rows (images with features; tiles in spatial sets).
    pub fn len(&self) -> usize {
        self.locations.len()
    }

    pub fn is_empty(&self) -> bool {
        self.locations.is_empty()
    }

    pub fn feature_dim(&self) -> usize {
        self.feature_dim
    }

    /// The spatial maps of every row, finest first (empty for pooled-only sets).
    pub fn maps(&self) -> &[MapShape] {
        &self.maps
    }

    /// The metadata of the first shard (encoder, weights, preprocessing, version).
    pub fn metadata(&self) -> &HashMap<String, String> {
        &self.metadata
    }

    /// Manifest index of each row, ascending, in a set bound to a dataset
    /// (`bind`); empty in a set opened whole.
    pub fn image_indices(&self) -> &[usize] {
        debug_assert!(self.bound, "image indices belong to a bound set");
        &self.image_index
    }

    /// Feature rows whose manifest index satisfies `keep`, e.g. one split.
    pub fn rows_where(&self, keep: impl Fn(usize) -> bool) -> Vec<usize> {
        (0..self.len())
            .filter(|&row| keep(self.image_index[row]))
            .collect()
    }

    /// Bounds the mapped pages this set keeps resident: once rows worth
    /// `bytes` were read, every mapping drops its pages (they stay in the page
    /// cache and fault back in on the next read). Without a limit a pass over
    /// a cache larger than memory would count it all as this process's RSS.
    pub fn set_resident_limit(&self, bytes: u64) {
        self.resident_limit_bytes
            .store(bytes.max(1), Ordering::Relaxed);
    }

    /// Bytes of mapped feature data: what full residency would cost.
    pub fn mapped_bytes(&self) -> u64 {
        self.shards.iter().map(|s| s.mmap.len() as u64).sum()
    }

    /// Tells the kernel the next reads come in random row order (a shuffled
    /// training epoch): `MADV_RANDOM` on every mapping, so a page fault reads
    /// and maps only the page it needs. Without it a fault reads around the
    /// row (the disk's `read_ahead_kb`, 8 MiB on this project's VM: a whole
    /// 2.6 MB shard for one 2.5 KB row), and once the cache no longer fits in
    /// memory each random row costs megabytes of reads. Best effort.
    pub fn read_randomly(&self) {
        for shard in &self.shards {
            let _ = shard.mmap.advise(memmap2::Advice::Random);
        }
    }

    /// Back to the kernel's default read-around, for passes in row order
    /// (evaluation, statistics), where reading whole shards ahead is right.
    pub fn read_in_order(&self) {
        for shard in &self.shards {
            let _ = shard.mmap.advise(memmap2::Advice::Normal);
        }
    }

    /// Drops the resident pages of every mapping now.
    pub fn release_pages(&self) {
        self.touched_bytes.store(0, Ordering::Relaxed);
        #[cfg(unix)]
        for shard in &self.shards {
            // SAFETY: the mappings are read-only views of files that are never
            // modified in place; after MADV_DONTNEED the next access reads the
            // same bytes back from the file, so borrowed slices stay valid.
            // A failed advice only means the pages stay resident.
            let _ = unsafe {
                shard
                    .mmap
                    .unchecked_advise(memmap2::UncheckedAdvice::DontNeed)
            };
        }
    }

    /// Counts a read of `bytes` towards the resident limit. Where the OS
    /// reports it (Linux `/proc/self/statm`), the file-backed resident size is
    /// measured every so often, since the kernel maps neighbouring pages
    /// around each fault and counting reads would underestimate it.
    fn touch(&self, bytes: usize) {
        let limit = self.resident_limit_bytes.load(Ordering::Relaxed);
        if limit == u64::MAX {
            return;
        }
        // A random row spans at most one page more than its size.
        let touched = bytes as u64 + 4096;
        let before = self.touched_bytes.fetch_add(touched, Ordering::Relaxed);
        let total = before + touched;
        // Measure after every ~1/16 of the limit read (at least every 64 KiB).
        let step = (limit / 16).max(64 << 10);
        if total / step == before / step {
            return;
        }
        let over = match file_resident_bytes() {
            Some(resident) => resident > limit,
            None => total > limit,
        };
        if over {
            self.release_pages();
        }
    }

    /// Measures the file-backed resident size now and drops the mapped pages
    /// if it is over the limit. Callers that read a batch of rows call it
    /// once per batch: counting reads alone can miss how much the kernel
    /// maps around each fault, and readers on several threads fault faster
    /// than the periodic check in `touch` sees.
    pub fn enforce_resident_limit(&self) {
        let limit = self.resident_limit_bytes.load(Ordering::Relaxed);
        if limit == u64::MAX {
            return;
        }
        if file_resident_bytes().is_some_and(|resident| resident > limit) {
            self.release_pages();
        }
    }

    /// The pooled features of one row, straight from the mapped file.
    pub fn pooled(&self, row: usize) -> &[f16] {
        self.touch(self.feature_dim * 2);
        let (shard, row_in_shard) = self.locations[row];
        let shard = &self.shards[shard as usize];
        let values: &[f16] = bytemuck::cast_slice(&shard.mmap[shard.pooled.clone()]);
        let start = row_in_shard as usize * self.feature_dim;
        &values[start..start + self.feature_dim]
    }

    /// Map `map` (an index into `maps()`) of one row, [channels, height, width] row-major.
    pub fn map(&self, row: usize, map: usize) -> &[f16] {
        let shape = self.maps[map];
        let size = shape.channels * shape.height * shape.width;
        self.touch(size * 2);
        let (shard, row_in_shard) = self.locations[row];
        let shard = &self.shards[shard as usize];
        let values: &[f16] = bytemuck::cast_slice(&shard.mmap[shard.maps[map].clone()]);
        let start = row_in_shard as usize * size;
        &values[start..start + size]
    }

    /// The views per image the folder holds (`enqueue --views`, from the
    /// shard metadata; `1` when it names none): each image has that many
    /// consecutive rows, view 0 first.
    pub fn views(&self) -> Result<crate::encoders::ViewSet, FeatureError> {
        match self.metadata.get("views") {
            None => Ok(crate::encoders::ViewSet::Single),
            Some(text) => text.parse().map_err(|e: crate::encoders::EncoderError| {
                FeatureError::InvalidShard {
                    path: self.dir.clone(),
                    message: format!("shard metadata views: {e}"),
                }
            }),
        }
    }

    /// The spatial maps the folder records (`enqueue --maps`), canonical:
    /// the default `16,32` when its metadata names none (every folder from
    /// before `--maps`).
    pub fn recorded_maps(&self) -> String {
        self.metadata
            .get("maps")
            .cloned()
            .unwrap_or_else(|| crate::encoders::SpatialMaps::default().to_string())
    }

    /// The view of one row (`enqueue --views`); None in shards without
    /// views (one row per image).
    pub fn view(&self, row: usize) -> Option<usize> {
        let (shard, row_in_shard) = self.locations[row];
        let shard = &self.shards[shard as usize];
        let values = &shard.mmap[shard.views.clone()?];
        Some(values[row_in_shard as usize] as usize)
    }

    /// Checks that the `count` rows from `first` are one image's views in
    /// order (row k is view k, all of one content id), as `count` > 1
    /// folders must hold them; `count` 1 asks nothing.
    pub fn check_view_rows(&self, first: usize, count: usize) -> Result<(), FeatureError> {
        if count <= 1 {
            return Ok(());
        }
        let invalid = |message: String| FeatureError::InvalidShard {
            path: self.dir.clone(),
            message,
        };
        let id = self.ids.get(first);
        for view in 0..count {
            let row = first + view;
            if row >= self.len() || self.ids.get(row) != id {
                return Err(invalid(format!(
                    "image {} has {view} rows, its folder holds {count} views per image",
                    id.map(hex::encode).unwrap_or_default()
                )));
            }
            if self.view(row) != Some(view) {
                return Err(invalid(format!(
                    "row {view} of image {} is view {:?}, expected view {view}",
                    hex::encode(self.ids[row]),
                    self.view(row)
                )));
            }
        }
        if first + count < self.len() && self.ids.get(first + count) == id {
            return Err(invalid(format!(
                "image {} has more than {count} rows, its folder holds {count} views per image",
                id.map(hex::encode).unwrap_or_default()
            )));
        }
        Ok(())
    }

    /// The tile of one row (x, y, width, height in the original image's
    /// pixels); None in shards without tiles.
    pub fn tile(&self, row: usize) -> Option<[u32; 4]> {
        let (shard, row_in_shard) = self.locations[row];
        let shard = &self.shards[shard as usize];
        let values: &[i64] = bytemuck::cast_slice(&shard.mmap[shard.tiles.clone()?]);
        let at = row_in_shard as usize * 4;
        Some(std::array::from_fn(|i| values[at + i] as u32))
    }
}

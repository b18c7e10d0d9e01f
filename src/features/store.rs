//! Where feature shards are published: the local file system (the default,
//! read memory-mapped by `FeatureSet`) or an object store shared by workers
//! on many machines ([`ObjectFeatureStore`], behind the `object-store` cargo
//! feature; S3 needs `s3` as well).
//!
//! A store holds folders (one per `FINGERPRINT`) of whole files. Every write
//! is atomic: a reader sees a file whole or not at all (local: temp file,
//! fsync, rename; object stores: a PUT becomes visible only when complete).
//! [`publish_shard`] writes the shard first and its `.done` marker second, so
//! a shard without its marker was never published: [`published_shards`]
//! ignores it and [`reconcile_store`] removes it once it is older than the
//! grace period.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use super::FeatureError;
use super::shard::{
    CheckLevel, DoneMarker, JobRef, ShardData, done_file_name, encode_shard, parse_shard_index,
    shard_file_name,
};

/// One file in a store folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredFile {
    pub name: String,
    pub bytes: u64,
    /// When it was written, where the store knows.
    pub modified: Option<SystemTime>,
}

/// A place shards are published to: folders of files written atomically.
pub trait FeatureStore: Send + Sync + std::fmt::Debug {
    /// How messages name a file of this store.
    fn describe(&self, folder: &str, name: &str) -> String;
    /// The names of the sub-folders of `parent` ("" for the top), sorted.
    fn folders(&self, parent: &str) -> Result<Vec<String>, FeatureError>;
    /// The files of a folder; a folder that does not exist has none.
    fn list(&self, folder: &str) -> Result<Vec<StoredFile>, FeatureError>;
    /// A file's bytes; `None` when it does not exist.
    fn read(&self, folder: &str, name: &str) -> Result<Option<Vec<u8>>, FeatureError>;
    /// Writes a whole file atomically: readers see the old file or the new one.
    fn write(&self, folder: &str, name: &str, bytes: &[u8]) -> Result<(), FeatureError>;
    /// Removes a file; one that is already gone is fine.
    fn remove(&self, folder: &str, name: &str) -> Result<(), FeatureError>;
}

/// The local file system under one folder (normally ROOT/features).
#[derive(Debug, Clone)]
pub struct LocalFeatureStore {
    root: PathBuf,
}

impl LocalFeatureStore {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    fn path(&self, folder: &str, name: &str) -> PathBuf {
        self.root.join(folder).join(name)
    }
}

impl FeatureStore for LocalFeatureStore {
    fn describe(&self, folder: &str, name: &str) -> String {
        self.path(folder, name).display().to_string()
    }

    fn folders(&self, parent: &str) -> Result<Vec<String>, FeatureError> {
        let dir = self.root.join(parent);
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(err) => return Err(FeatureError::io(&dir, err)),
        };
        let mut names = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| FeatureError::io(&dir, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if entry.path().is_dir() && !crate::atomic::is_temp_name(&name) {
                names.push(name);
            }
        }
        names.sort();
        Ok(names)
    }

    fn list(&self, folder: &str) -> Result<Vec<StoredFile>, FeatureError> {
        let dir = self.root.join(folder);
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(err) => return Err(FeatureError::io(&dir, err)),
        };
        let mut files = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| FeatureError::io(&dir, e))?;
            let Ok(metadata) = entry.metadata() else {
                continue; // removed since the listing: not there any more
            };
            if metadata.is_file() {
                files.push(StoredFile {
                    name: entry.file_name().to_string_lossy().into_owned(),
                    bytes: metadata.len(),
                    modified: metadata.modified().ok(),
                });
            }
        }
        files.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(files)
    }

    fn read(&self, folder: &str, name: &str) -> Result<Option<Vec<u8>>, FeatureError> {
        let path = self.path(folder, name);
        match std::fs::read(&path) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(err) => Err(FeatureError::io(&path, err)),
        }
    }

    fn write(&self, folder: &str, name: &str, bytes: &[u8]) -> Result<(), FeatureError> {
        let dir = self.root.join(folder);
        std::fs::create_dir_all(&dir).map_err(|e| FeatureError::io(&dir, e))?;
        let path = dir.join(name);
        crate::atomic::write_file(&path, bytes).map_err(|e| FeatureError::io(&path, e))
    }

    fn remove(&self, folder: &str, name: &str) -> Result<(), FeatureError> {
        let path = self.path(folder, name);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(err) => Err(FeatureError::io(&path, err)),
        }
    }
}

/// Removes shard `shard_index` from `folder`, marker first (a reader never
/// finds a marker without its shard); files already gone are fine.
pub fn remove_shard(
    store: &dyn FeatureStore,
    folder: &str,
    shard_index: u64,
) -> Result<(), FeatureError> {
    store.remove(folder, &super::done_file_name(shard_index))?;
    store.remove(folder, &super::shard_file_name(shard_index))
}

/// Serialises a shard and publishes it in `folder`: the shard first, then
/// its `.done` marker, each written atomically.
pub fn publish_shard(
    store: &dyn FeatureStore,
    folder: &str,
    shard_index: u64,
    data: &ShardData<'_>,
    metadata: HashMap<String, String>,
    job: JobRef,
) -> Result<DoneMarker, FeatureError> {
    let location = PathBuf::from(store.describe(folder, &shard_file_name(shard_index)));
    let (bytes, marker) = encode_shard(&location, shard_index, data, metadata, job)?;
    store.write(folder, &shard_file_name(shard_index), &bytes)?;
    let marker_json = serde_json::to_vec_pretty(&marker).expect("marker serialises");
    store.write(folder, &done_file_name(shard_index), &marker_json)?;
    Ok(marker)
}

/// Reads a marker and checks its shard in a store; `Err` carries the reason
/// it is not usable.
pub fn check_stored_shard(
    store: &dyn FeatureStore,
    folder: &str,
    shard_index: u64,
    level: CheckLevel,
) -> Result<DoneMarker, String> {
    let done_name = done_file_name(shard_index);
    let shard_name = shard_file_name(shard_index);
    let text = store
        .read(folder, &done_name)
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("{}: no marker", store.describe(folder, &done_name)))?;
    let marker: DoneMarker = serde_json::from_slice(&text).map_err(|e| {
        format!(
            "{}: unreadable marker: {e}",
            store.describe(folder, &done_name)
        )
    })?;
    let shard_location = store.describe(folder, &shard_name);
    let size = match level {
        CheckLevel::Size => store
            .list(folder)
            .map_err(|e| e.to_string())?
            .into_iter()
            .find(|file| file.name == shard_name)
            .map(|file| file.bytes),
        CheckLevel::Checksum => {
            let bytes = store.read(folder, &shard_name).map_err(|e| e.to_string())?;
            if let Some(bytes) = &bytes {
                let sha256 = crate::digest::sha256_hex(bytes);
                if sha256 != marker.sha256 {
                    return Err(format!(
                        "{shard_location}: sha256 {sha256}, marker says {}",
                        marker.sha256
                    ));
                }
            }
            bytes.map(|b| b.len() as u64)
        }
    };
    match size {
        None => Err(format!("{shard_location}: marker without its shard")),
        Some(size) if size != marker.bytes => Err(format!(
            "{shard_location}: {size} bytes, marker says {}",
            marker.bytes
        )),
        Some(_) => Ok(marker),
    }
}

/// Indices of the shards of `folder` whose marker exists, ascending. A shard
/// without a marker is not published and is not listed.
pub fn published_shards(store: &dyn FeatureStore, folder: &str) -> Result<Vec<u64>, FeatureError> {
    let mut indices: Vec<u64> = store
        .list(folder)?
        .iter()
        .filter(|file| file.name.ends_with(".done"))
        .filter_map(|file| parse_shard_index(&file.name))
        .collect();
    indices.sort_unstable();
    Ok(indices)
}

/// What [`reconcile_store`] found and did in one folder.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoreReconcileReport {
    /// Shards without a marker older than the grace period, now removed.
    pub removed_unpublished: Vec<u64>,
    /// Shards whose marker or content is wrong, now removed, with the reason.
    pub invalid: Vec<(u64, String)>,
    /// Shards that checked out (full checksum).
    pub valid: Vec<u64>,
}

/// Removes unpublished shards older than `grace` (a writer may still be
/// between its two writes) and shards that fail their checksum, marker first.
pub fn reconcile_store(
    store: &dyn FeatureStore,
    folder: &str,
    grace: Duration,
) -> Result<StoreReconcileReport, FeatureError> {
    let mut report = StoreReconcileReport::default();
    let files = store.list(folder)?;
    let marked = published_shards(store, folder)?;
    for file in &files {
        let Some(index) = parse_shard_index(&file.name) else {
            continue;
        };
        let old_enough = grace.is_zero()
            || file
                .modified
                .and_then(|modified| modified.elapsed().ok())
                .is_some_and(|age| age >= grace);
        if file.name.ends_with(".safetensors")
            && marked.binary_search(&index).is_err()
            && old_enough
        {
            store.remove(folder, &file.name)?;
            report.removed_unpublished.push(index);
        }
    }
    for index in marked {
        match check_stored_shard(store, folder, index, CheckLevel::Checksum) {
            Ok(_) => report.valid.push(index),
            Err(reason) => {
                // Marker first: a crash here leaves an unpublished shard, never a false marker.
                store.remove(folder, &done_file_name(index))?;
                store.remove(folder, &shard_file_name(index))?;
                report.invalid.push((index, reason));
            }
        }
    }
    Ok(report)
}

/// Copies the published, checksum-valid shards of a store folder (and their
/// markers) into a local folder, so that `FeatureSet` can map them. Shards
/// already there with the same checksum are kept. Returns how many were copied.
pub fn download(
    store: &dyn FeatureStore,
    folder: &str,
    local_dir: &Path,
) -> Result<usize, FeatureError> {
    let local = LocalFeatureStore::new(local_dir);
    let mut copied = 0;
    for index in published_shards(store, folder)? {
        let remote = check_stored_shard(store, folder, index, CheckLevel::Size);
        let Ok(marker) = remote else { continue };
        if check_stored_shard(&local, "", index, CheckLevel::Checksum)
            .is_ok_and(|have| have.sha256 == marker.sha256)
        {
            continue;
        }
        let shard_name = shard_file_name(index);
        let Some(bytes) = store.read(folder, &shard_name)? else {
            continue; // removed since the listing
        };
        if crate::digest::sha256_hex(&bytes) != marker.sha256 {
            continue; // rewritten since the marker was read; the next download takes it
        }
        local.write("", &shard_name, &bytes)?;
        let marker_json = serde_json::to_vec_pretty(&marker).expect("marker serialises");
        local.write("", &done_file_name(index), &marker_json)?;
        copied += 1;
    }
    Ok(copied)
}

/// The URL forms `--feature-store` accepts, for messages.
pub const STORE_URL_FORMS: &str = "file:///ABSOLUTE/PATH or s3://BUCKET/PREFIX";

/// Opens the store a `--feature-store` URL names: `file:///ABSOLUTE/PATH`
/// (a shared mount, through object_store's local file system) or
/// `s3://BUCKET/PREFIX` (builds with the `s3` feature; credentials and
/// endpoint from the `AWS_*` variables).
pub fn open_store(url: &str) -> Result<std::sync::Arc<dyn FeatureStore>, FeatureError> {
    let refuse = |message: String| FeatureError::Store {
        location: url.to_string(),
        message,
    };
    let scheme = url
        .split_once("://")
        .map(|(scheme, _)| scheme.to_ascii_lowercase());
    match scheme.as_deref() {
        Some("file") => {
            if !url["file://".len()..].starts_with('/') {
                return Err(refuse(format!(
                    "a file:// URL needs an absolute path (file:///ABSOLUTE/PATH); expected {STORE_URL_FORMS}"
                )));
            }
            open_object_store(url)
        }
        Some("s3") => {
            if cfg!(feature = "s3") {
                open_object_store(url)
            } else {
                Err(refuse(
                    "s3:// needs a lazarus built with the `s3` cargo feature (cargo build --features s3)"
                        .to_string(),
                ))
            }
        }
        _ => Err(refuse(format!(
            "not a feature store URL; expected {STORE_URL_FORMS}"
        ))),
    }
}

#[cfg(feature = "object-store")]
fn open_object_store(url: &str) -> Result<std::sync::Arc<dyn FeatureStore>, FeatureError> {
    Ok(std::sync::Arc::new(ObjectFeatureStore::from_url(url)?))
}

#[cfg(not(feature = "object-store"))]
fn open_object_store(url: &str) -> Result<std::sync::Arc<dyn FeatureStore>, FeatureError> {
    Err(FeatureError::Store {
        location: url.to_string(),
        message: "this lazarus was built without the `object-store` cargo feature, which feature stores need"
            .to_string(),
    })
}

/// The store folder of the features of one fingerprint (shared by every
/// dataset, as `features/FINGERPRINT` is locally).
pub fn store_folder(fingerprint: &str) -> String {
    fingerprint.to_string()
}

/// What [`pull`] did for one fingerprint folder.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PulledFolder {
    /// The dataset the pull was asked for, if one was.
    pub dataset: Option<String>,
    pub fingerprint: String,
    /// Shards with a `.done` marker in the store.
    pub published: usize,
    /// Shards copied now (the others were already here with the same checksum,
    /// or failed their size check in the store).
    pub copied: usize,
}

/// Mirrors the published shards of the store's fingerprint folders (one,
/// or every one the store has) into `features_root/FINGERPRINT`, so that
/// training and prediction map them locally. Each file is written
/// atomically, shard before marker, so a killed pull leaves nothing a reader
/// takes for published; a second pull copies only what changed. `dataset`
/// only labels the result: folders are shared by every dataset.
pub fn pull(
    store: &dyn FeatureStore,
    features_root: &Path,
    dataset: Option<&str>,
    fingerprint: Option<&str>,
) -> Result<Vec<PulledFolder>, FeatureError> {
    let fingerprints = match fingerprint {
        Some(fingerprint) => vec![fingerprint.to_string()],
        None => store.folders("")?,
    };
    let mut pulled = Vec::new();
    for fingerprint in fingerprints {
        let folder = store_folder(&fingerprint);
        let published = published_shards(store, &folder)?.len();
        if published == 0 {
            continue;
        }
        let local_dir = features_root.join(&fingerprint);
        let copied = download(store, &folder, &local_dir)?;
        pulled.push(PulledFolder {
            dataset: dataset.map(str::to_string),
            fingerprint,
            published,
            copied,
        });
    }
    Ok(pulled)
}

#[cfg(feature = "object-store")]
pub use object::ObjectFeatureStore;

#[cfg(feature = "object-store")]
mod object {
    use std::sync::Arc;

    use futures::TryStreamExt;
    use object_store::path::Path as ObjectPath;
    use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

    use super::{FeatureError, FeatureStore, StoredFile};

    /// Shards in an object store (S3 and compatible, or object_store's local
    /// and in-memory stores), under a prefix. Calls block on a private
    /// single-threaded runtime, so callers stay synchronous.
    pub struct ObjectFeatureStore {
        store: Arc<dyn ObjectStore>,
        prefix: ObjectPath,
        /// How messages name the store (URL without credentials).
        name: String,
        runtime: tokio::runtime::Runtime,
    }

    impl std::fmt::Debug for ObjectFeatureStore {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("ObjectFeatureStore")
                .field("store", &self.name)
                .field("prefix", &self.prefix)
                .finish()
        }
    }

    impl ObjectFeatureStore {
        /// A store over `store`, with every folder under `prefix`.
        pub fn new(
            store: Arc<dyn ObjectStore>,
            prefix: &str,
            name: &str,
        ) -> Result<Self, FeatureError> {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .build()
                .map_err(|e| FeatureError::Store {
                    location: name.to_string(),
                    message: format!("cannot start the I/O runtime: {e}"),
                })?;
            Ok(Self {
                store,
                prefix: ObjectPath::from(prefix),
                name: name.to_string(),
                runtime,
            })
        }

        /// Opens a store from a URL: `s3://BUCKET/PREFIX` (with the `s3`
        /// feature; credentials and endpoint from the usual `AWS_*`
        /// variables), `file:///PATH`, or `memory:///`.
        pub fn from_url(url: &str) -> Result<Self, FeatureError> {
            let invalid = |message: String| FeatureError::Store {
                location: url.to_string(),
                message,
            };
            let parsed = url::Url::parse(url).map_err(|e| invalid(e.to_string()))?;
            let options = std::env::vars()
                .filter(|(key, _)| key.starts_with("AWS_"))
                .map(|(key, value)| (key.to_ascii_lowercase(), value));
            let (store, prefix) = object_store::parse_url_opts(&parsed, options)
                .map_err(|e| invalid(e.to_string()))?;
            Self::new(Arc::from(store), prefix.as_ref(), url)
        }

        fn location(&self, folder: &str, name: &str) -> ObjectPath {
            let mut path = self.prefix.clone();
            for part in folder.split('/').chain([name]).filter(|p| !p.is_empty()) {
                path = path.clone().join(part);
            }
            path
        }

        fn error(&self, folder: &str, name: &str, err: object_store::Error) -> FeatureError {
            FeatureError::Store {
                location: self.describe(folder, name),
                message: err.to_string(),
            }
        }
    }

    impl FeatureStore for ObjectFeatureStore {
        fn describe(&self, folder: &str, name: &str) -> String {
            format!("{} ({})", self.location(folder, name), self.name)
        }

        fn folders(&self, parent: &str) -> Result<Vec<String>, FeatureError> {
            let prefix = self.location(parent, "");
            let listing = self
                .runtime
                .block_on(self.store.list_with_delimiter(Some(&prefix)))
                .map_err(|e| self.error(parent, "", e))?;
            let mut names: Vec<String> = listing
                .common_prefixes
                .iter()
                .filter_map(|path| path.filename().map(str::to_string))
                .collect();
            names.sort();
            Ok(names)
        }

        fn list(&self, folder: &str) -> Result<Vec<StoredFile>, FeatureError> {
            let prefix = self.location(folder, "");
            let objects: Vec<object_store::ObjectMeta> = self
                .runtime
                .block_on(self.store.list(Some(&prefix)).try_collect())
                .map_err(|e| self.error(folder, "", e))?;
            let mut files: Vec<StoredFile> = objects
                .into_iter()
                .filter_map(|meta| {
                    // Only the folder's own files, not those of sub-folders.
                    let rest: Vec<_> = meta.location.prefix_match(&prefix)?.collect();
                    let [name] = rest.as_slice() else {
                        return None;
                    };
                    Some(StoredFile {
                        name: name.as_ref().to_string(),
                        bytes: meta.size,
                        modified: Some(meta.last_modified.into()),
                    })
                })
                .collect();
            files.sort_by(|a, b| a.name.cmp(&b.name));
            Ok(files)
        }

        fn read(&self, folder: &str, name: &str) -> Result<Option<Vec<u8>>, FeatureError> {
            let location = self.location(folder, name);
            let result = self.runtime.block_on(async {
                match self.store.get(&location).await {
                    Ok(found) => found.bytes().await.map(Some),
                    Err(object_store::Error::NotFound { .. }) => Ok(None),
                    Err(err) => Err(err),
                }
            });
            result
                .map(|bytes| bytes.map(|b| b.to_vec()))
                .map_err(|e| self.error(folder, name, e))
        }

        fn write(&self, folder: &str, name: &str, bytes: &[u8]) -> Result<(), FeatureError> {
            let location = self.location(folder, name);
            let payload = PutPayload::from(bytes::Bytes::copy_from_slice(bytes));
            self.runtime
                .block_on(self.store.put(&location, payload))
                .map(|_| ())
                .map_err(|e| self.error(folder, name, e))
        }

        fn remove(&self, folder: &str, name: &str) -> Result<(), FeatureError> {
            let location = self.location(folder, name);
            match self.runtime.block_on(self.store.delete(&location)) {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                Err(err) => Err(self.error(folder, name, err)),
            }
        }
    }
}

//! `verify`: every feature shard against its `.done` marker and the queue's
//! record of what should exist: each image of a live extraction job has
//! exactly one row, except the images its done job reported as failed.
//! With repair, what is wrong goes back to the queue and stale files go.
//! The shards are read from the local features/ folder, or from the store
//! workers published to (`VerifyConfig::feature_store`).

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use super::plan::ExtractPayload;
use super::{ExtractError, KIND_EXTRACT};
use crate::features::store::{self, FeatureStore};
use crate::features::{self, FeatureError, ReconcileConfig};
use crate::layout::Layout;
use crate::queue::{JobResult, Queue};

/// Verification of one dataset, encoder and fingerprint.
#[derive(Debug, Clone, Serialize)]
pub struct GroupVerification {
    pub dataset: String,
    pub encoder: String,
    pub fingerprint: String,
    pub expected: usize,
    pub rows: usize,
    /// Images of live jobs with no row (jobs not yet done included).
    pub missing: Vec<usize>,
    /// Images with more than one row.
    pub duplicates: Vec<usize>,
    /// Shards whose marker or content is wrong, with the reason.
    pub corrupt: Vec<(u64, String)>,
    /// Shards of jobs that are not done and live (e.g. retired by --force).
    pub stale_shards: Vec<u64>,
    /// Done jobs sent back to pending by --repair.
    pub reopened_jobs: Vec<i64>,
}

/// The whole verification; `ok` only when nothing is missing, duplicated,
/// corrupt or stale.
#[derive(Debug, Clone, Serialize)]
pub struct Verification {
    pub ok: bool,
    pub rows: usize,
    pub missing: usize,
    pub duplicates: usize,
    pub corrupt: usize,
    pub stale: usize,
    pub groups: Vec<GroupVerification>,
}

/// Whether `verify` repairs what it finds, and where the shards are.
#[derive(Debug, Clone, Default)]
pub struct VerifyConfig {
    /// Reopen done jobs whose shard is missing or corrupt, remove stale
    /// shards and leftovers. Run it when no worker is writing.
    pub repair: bool,
    /// The store workers published to (`--feature-store`); `None` for the
    /// local features/ folder.
    pub feature_store: Option<Arc<dyn FeatureStore>>,
}

/// The shards of one group: a local folder or a folder of a store.
enum Shards<'a> {
    Local(PathBuf),
    Store(&'a dyn FeatureStore, String),
}

impl Shards<'_> {
    fn marked(&self) -> Result<Vec<u64>, FeatureError> {
        match self {
            Shards::Local(dir) => features::marked_shards(dir),
            Shards::Store(store, folder) => store::published_shards(*store, folder),
        }
    }

    /// Removes a shard, marker first.
    fn remove(&self, index: u64) -> Result<(), FeatureError> {
        for name in [
            features::done_file_name(index),
            features::shard_file_name(index),
        ] {
            match self {
                Shards::Local(dir) => {
                    let path = dir.join(name);
                    if let Err(err) = std::fs::remove_file(&path)
                        && err.kind() != std::io::ErrorKind::NotFound
                    {
                        return Err(FeatureError::Io { path, source: err });
                    }
                }
                Shards::Store(store, folder) => store.remove(folder, &name)?,
            }
        }
        Ok(())
    }

    /// Removes leftovers and corrupt shards at once; returns the valid shards.
    fn reconcile(&self) -> Result<BTreeSet<u64>, FeatureError> {
        let valid = match self {
            Shards::Local(dir) => {
                features::reconcile(
                    dir,
                    &ReconcileConfig {
                        grace: Duration::ZERO,
                    },
                )?
                .valid
            }
            Shards::Store(store, folder) => {
                store::reconcile_store(*store, folder, Duration::ZERO)?.valid
            }
        };
        Ok(valid.into_iter().collect())
    }

    fn verify(&self, expected: &[usize]) -> Result<features::VerifyReport, FeatureError> {
        match self {
            Shards::Local(dir) => features::verify(dir, expected),
            Shards::Store(store, folder) => features::verify_store(*store, folder, expected),
        }
    }
}

fn failed_items(result: Option<&str>) -> Vec<usize> {
    result
        .and_then(|text| serde_json::from_str::<JobResult>(text).ok())
        .map(|result| {
            result
                .failures
                .iter()
                .filter_map(|failure| failure.item.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Verifies the features of every extraction configuration in the queue
/// (or one dataset's), repairing when asked.
pub fn verify(
    layout: &Layout,
    queue: &dyn Queue,
    dataset: Option<&str>,
    config: VerifyConfig,
) -> Result<Verification, ExtractError> {
    let status = queue.status(dataset)?;
    let done = queue.done_jobs(KIND_EXTRACT, dataset)?;
    let mut groups = Vec::new();
    for group in status
        .groups
        .iter()
        .filter(|g| g.group != super::NOOP_GROUP)
    {
        let payloads = queue.live_payloads(&group.group, &group.variant, &group.fingerprint)?;
        let mut expected: BTreeSet<usize> = BTreeSet::new();
        for text in &payloads {
            let payload: ExtractPayload =
                serde_json::from_str(text).map_err(|err| ExtractError::Payload {
                    queue: queue.location(),
                    message: err.to_string(),
                })?;
            expected.extend(payload.image_indices);
        }
        // Done job id -> (its images, those that failed).
        let done_here: HashMap<u64, (usize, Vec<usize>)> = done
            .iter()
            .filter(|job| {
                job.group == group.group
                    && job.variant == group.variant
                    && job.fingerprint == group.fingerprint
            })
            .map(|job| {
                let images = serde_json::from_str::<ExtractPayload>(&job.payload)
                    .map(|p| p.image_indices.len())
                    .unwrap_or(0);
                (job.id as u64, (images, failed_items(job.result.as_deref())))
            })
            .collect();
        for (_, failures) in done_here.values() {
            for image in failures {
                expected.remove(image);
            }
        }
        let shards = match &config.feature_store {
            None => Shards::Local(features::feature_dir(
                layout,
                &group.group,
                &group.fingerprint,
            )),
            Some(feature_store) => Shards::Store(
                feature_store.as_ref(),
                store::store_folder(&group.group, &group.fingerprint),
            ),
        };
        let mut stale_shards: Vec<u64> = shards
            .marked()?
            .into_iter()
            .filter(|index| !done_here.contains_key(index))
            .collect();
        let mut reopened_jobs = Vec::new();
        if config.repair {
            for &index in &stale_shards {
                shards.remove(index)?;
            }
            let valid = shards.reconcile()?;
            // A done job whose every image failed has no shard by design.
            reopened_jobs = done_here
                .iter()
                .filter(|(id, (images, failures))| !valid.contains(id) && failures.len() < *images)
                .map(|(&id, _)| id as i64)
                .collect();
            reopened_jobs.sort_unstable();
            queue.reopen(&reopened_jobs)?;
            stale_shards.clear();
        }
        let expected: Vec<usize> = expected.into_iter().collect();
        let report = shards.verify(&expected)?;
        groups.push(GroupVerification {
            dataset: group.group.clone(),
            encoder: group.variant.clone(),
            fingerprint: group.fingerprint.clone(),
            expected: expected.len(),
            rows: report.rows,
            missing: report.missing,
            duplicates: report.duplicates.keys().copied().collect(),
            corrupt: report.corrupt,
            stale_shards,
            reopened_jobs,
        });
    }
    let sum = |f: fn(&GroupVerification) -> usize| groups.iter().map(f).sum::<usize>();
    let (missing, duplicates, corrupt, stale) = (
        sum(|g| g.missing.len()),
        sum(|g| g.duplicates.len()),
        sum(|g| g.corrupt.len()),
        sum(|g| g.stale_shards.len()),
    );
    Ok(Verification {
        ok: missing + duplicates + corrupt + stale == 0,
        rows: sum(|g| g.rows),
        missing,
        duplicates,
        corrupt,
        stale,
        groups,
    })
}

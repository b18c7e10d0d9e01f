//! `verify`: every feature shard against its `.done` marker and the queue's
//! record of what should exist. A fingerprint folder is shared by every
//! dataset, so the check is per fingerprint: each image of a live
//! extraction job has exactly one row (except the images its done job
//! reported as failed), each shard's rows are images its job asked for
//! (content ids checked against the job, whose ids came from the dataset's
//! manifest), and no image is in two live jobs.
//!
//! With repair, what is wrong goes back to the queue and stale files go:
//! shards of jobs that are not live and done are removed, corrupt shards
//! are removed and their jobs re-queued, done jobs without their shard are
//! re-queued, and an image enqueued twice (by enqueues that raced before
//! issue 19) keeps its oldest job: a later job holding it is retired, its
//! shard removed, and its other images enqueued again in a new job.
//! The shards are read from the local features/ folder, or from the store
//! workers published to (`VerifyConfig::feature_store`).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use super::plan::{Coverage, ExtractPayload, JobImage, ManifestRows, short_key};
use super::{ExtractError, KIND_EXTRACT};
use crate::digest::{ContentId, sha256_hex};
use crate::features::store::{self, FeatureStore};
use crate::features::{self, FeatureError, FolderRows, ReconcileConfig};
use crate::layout::Layout;
use crate::queue::{JobResult, LiveJob, NewJob, Plan, Queue};

/// Verification of one dataset, encoder and fingerprint.
#[derive(Debug, Clone, Serialize)]
pub struct GroupVerification {
    pub dataset: String,
    pub encoder: String,
    pub fingerprint: String,
    pub expected: usize,
    /// Rows in the shards of this group's jobs.
    pub rows: usize,
    /// Manifest indices of images of live jobs with no row (jobs not yet
    /// done included).
    pub missing: Vec<usize>,
    /// Manifest indices of images with more than one row, or in more than
    /// one live job.
    pub duplicates: Vec<usize>,
    /// Shards whose marker, checksum or rows are wrong, with the reason.
    pub corrupt: Vec<(u64, String)>,
    /// Shards of jobs that are not done and live (e.g. retired by --force).
    pub stale_shards: Vec<u64>,
    /// Done jobs sent back to pending by --repair.
    pub reopened_jobs: Vec<i64>,
    /// Jobs retired by --repair because an older live job holds their images.
    pub retired_jobs: Vec<i64>,
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
    /// Reopen done jobs whose shard is missing or corrupt, retire jobs that
    /// duplicate older ones, remove stale shards and leftovers. Run it when
    /// no worker is writing.
    pub repair: bool,
    /// The store workers published to (`--feature-store`); `None` for the
    /// local features/ folder.
    pub feature_store: Option<Arc<dyn FeatureStore>>,
}

/// The shards of one fingerprint: a local folder or a folder of a store.
enum Shards<'a> {
    Local(PathBuf),
    Store(&'a dyn FeatureStore, String),
}

impl Shards<'_> {
    fn rows(&self) -> Result<FolderRows, FeatureError> {
        match self {
            Shards::Local(dir) => features::read_folder_rows(dir),
            Shards::Store(store, folder) => features::read_store_rows(*store, folder),
        }
    }

    /// Removes a shard, marker first.
    fn remove(&self, index: u64) -> Result<(), FeatureError> {
        match self {
            Shards::Local(dir) => {
                features::remove_shard(dir, index)?;
            }
            Shards::Store(store, folder) => store::remove_shard(*store, folder, index)?,
        }
        Ok(())
    }

    /// Removes leftovers and shards that fail their checksum.
    fn reconcile(&self) -> Result<(), FeatureError> {
        match self {
            Shards::Local(dir) => {
                features::reconcile(
                    dir,
                    &ReconcileConfig {
                        grace: Duration::ZERO,
                    },
                )?;
            }
            Shards::Store(store, folder) => {
                store::reconcile_store(*store, folder, Duration::ZERO)?;
            }
        }
        Ok(())
    }
}

/// Manifest indices the done job's result lists as failed.
fn failed_items(result: Option<&str>) -> BTreeSet<usize> {
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

/// One live job with its images and what it reported.
struct Job {
    live: LiveJob,
    dataset: String,
    images: Vec<(JobImage, ContentId)>,
    failed: BTreeSet<usize>,
    payload: ExtractPayload,
}

impl Job {
    fn done(&self) -> bool {
        self.live.state == "done"
    }
}

/// The live jobs of one fingerprint with their images.
fn live_jobs(
    layout: &Layout,
    queue: &dyn Queue,
    fingerprint: &str,
    manifests: &mut ManifestRows,
) -> Result<Vec<Job>, ExtractError> {
    let done: HashMap<i64, Option<String>> = queue
        .done_jobs(KIND_EXTRACT, None)?
        .into_iter()
        .filter(|job| job.fingerprint == fingerprint)
        .map(|job| (job.id, job.result))
        .collect();
    let mut jobs = Vec::new();
    for live in queue.live_jobs(fingerprint)? {
        let payload: ExtractPayload =
            serde_json::from_str(&live.payload).map_err(|err| ExtractError::Payload {
                queue: queue.location(),
                message: err.to_string(),
            })?;
        let images = payload
            .job_images(layout, manifests)?
            .into_iter()
            .map(|image| {
                let id = ContentId::parse(&image.id).ok_or_else(|| ExtractError::Payload {
                    queue: queue.location(),
                    message: format!("job {}: '{}' is not a content id", live.id, image.id),
                })?;
                Ok((image, id))
            })
            .collect::<Result<Vec<_>, ExtractError>>()?;
        let failed = failed_items(done.get(&live.id).and_then(|r| r.as_deref()));
        jobs.push(Job {
            dataset: payload.dataset.clone(),
            live,
            images,
            failed,
            payload,
        });
    }
    Ok(jobs)
}

/// What the rows of one fingerprint folder say about its live jobs.
struct Findings {
    /// Per shard: the problem with it.
    corrupt: BTreeMap<u64, String>,
    stale: Vec<u64>,
    /// Valid shards of live done jobs: their rows.
    rows: BTreeMap<u64, usize>,
    /// Shards holding each content (full id).
    holders: HashMap<[u8; 32], Vec<u64>>,
    /// The same by the first 8 bytes, for old (short) ids.
    short_holders: HashMap<[u8; 8], Vec<u64>>,
}

fn examine(jobs: &[Job], rows: FolderRows) -> Findings {
    let by_id: HashMap<u64, &Job> = jobs.iter().map(|job| (job.live.id as u64, job)).collect();
    let mut findings = Findings {
        corrupt: rows.corrupt.into_iter().collect(),
        stale: Vec::new(),
        rows: BTreeMap::new(),
        holders: HashMap::new(),
        short_holders: HashMap::new(),
    };
    for (shard, ids) in rows.shards {
        let Some(job) = by_id.get(&shard).filter(|job| job.done()) else {
            findings.stale.push(shard);
            continue;
        };
        // Every row must be an image its job asked for.
        let wanted: Vec<&ContentId> = job.images.iter().map(|(_, id)| id).collect();
        if let Some((row, id)) = ids
            .iter()
            .enumerate()
            .find(|(_, id)| !wanted.iter().any(|w| w.matches(id)))
        {
            findings.corrupt.insert(
                shard,
                format!(
                    "row {row} has content id {}, which job {} did not ask for",
                    hex::encode(id),
                    job.live.id
                ),
            );
            continue;
        }
        findings.rows.insert(shard, ids.len());
        let mut seen = HashSet::new();
        for id in ids {
            // Tiles of one image are several rows of one shard.
            if seen.insert(id) {
                findings.holders.entry(id).or_default().push(shard);
                findings
                    .short_holders
                    .entry(id[..8].try_into().expect("8 bytes"))
                    .or_default()
                    .push(shard);
            }
        }
    }
    findings
}

impl Findings {
    fn holders_of(&self, id: &ContentId) -> &[u64] {
        let found = match id.sha256() {
            Some(full) => self.holders.get(full),
            None => self.short_holders.get(&short_key(id)),
        };
        found.map_or(&[], Vec::as_slice)
    }
}

/// Plans the retirement of jobs whose images an older live job holds (see
/// the module's note); returns the plan and the retired jobs' ids.
fn duplicate_plan(jobs: &[Job]) -> Plan {
    let mut covered = Coverage::default();
    let mut plan = Plan::default();
    for job in jobs {
        let duplicate = job.images.iter().any(|(_, id)| covered.covers(id));
        if !duplicate {
            for (_, id) in &job.images {
                covered.add(id);
            }
            continue;
        }
        plan.supersede.push(job.live.id);
        let rest: Vec<JobImage> = job
            .images
            .iter()
            .filter(|(_, id)| !covered.covers(id))
            .map(|(image, _)| image.clone())
            .collect();
        for (_, id) in &job.images {
            covered.add(id);
        }
        if rest.is_empty() {
            continue;
        }
        let payload = ExtractPayload {
            image_indices: rest.iter().map(|image| image.index).collect(),
            images: rest,
            ..job.payload.clone()
        };
        let text = serde_json::to_string(&payload).expect("payload serialises");
        plan.jobs.push(NewJob {
            kind: KIND_EXTRACT.to_string(),
            group: job.live.group.clone(),
            variant: job.live.variant.clone(),
            fingerprint: payload.fingerprint.clone(),
            dedup_key: format!(
                "{KIND_EXTRACT}:{}",
                sha256_hex(format!("{}\n{}\n{text}", job.live.group, job.live.variant).as_bytes())
            ),
            items: payload.images.len() as u64,
            payload: text,
        });
    }
    plan
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
    let fingerprints: BTreeSet<String> = status
        .groups
        .iter()
        .filter(|g| g.group != super::NOOP_GROUP)
        .map(|g| g.fingerprint.clone())
        .collect();
    let mut manifests = ManifestRows::default();
    let mut groups = Vec::new();
    for fingerprint in fingerprints {
        let shards = match &config.feature_store {
            None => Shards::Local(features::feature_dir(layout, &fingerprint)),
            Some(feature_store) => {
                Shards::Store(feature_store.as_ref(), store::store_folder(&fingerprint))
            }
        };
        let mut reopened: Vec<i64> = Vec::new();
        let mut retired: Vec<i64> = Vec::new();
        if config.repair {
            // Images in two live jobs: the later job goes, with its shard.
            let mut planned = Vec::new();
            let mut repair_manifests = ManifestRows::default();
            queue.plan_and_enqueue(&fingerprint, &mut |live| {
                let jobs: Vec<Job> = live_jobs_of(layout, live, &mut repair_manifests)?;
                let plan = duplicate_plan(&jobs);
                planned = plan.supersede.clone();
                Ok(plan)
            })?;
            retired = planned;
            let jobs = live_jobs(layout, queue, &fingerprint, &mut manifests)?;
            let findings = examine(&jobs, shards.rows()?);
            for &shard in findings.stale.iter().chain(findings.corrupt.keys()) {
                shards.remove(shard)?;
            }
            shards.reconcile()?;
            let valid: BTreeSet<u64> = findings
                .rows
                .keys()
                .copied()
                .filter(|shard| !findings.corrupt.contains_key(shard))
                .collect();
            // A done job whose every image failed has no shard by design.
            reopened = jobs
                .iter()
                .filter(|job| {
                    job.done()
                        && !valid.contains(&(job.live.id as u64))
                        && job.failed.len() < job.images.len()
                })
                .map(|job| job.live.id)
                .collect();
            queue.reopen(&reopened)?;
        }
        let jobs = live_jobs(layout, queue, &fingerprint, &mut manifests)?;
        let findings = examine(&jobs, shards.rows()?);
        // Images in more than one live job, by job.
        let mut first_job: HashMap<[u8; 8], i64> = HashMap::new();
        let mut doubly_enqueued: HashSet<(i64, usize)> = HashSet::new();
        for job in &jobs {
            for (image, id) in &job.images {
                if let Some(&other) = first_job.get(&short_key(id))
                    && other != job.live.id
                {
                    doubly_enqueued.insert((job.live.id, image.index));
                } else {
                    first_job.insert(short_key(id), job.live.id);
                }
            }
        }
        // Folder-wide problems are reported with the fingerprint's first group.
        let mut folder_problems_reported = false;
        let mut by_group: BTreeMap<(String, String), Vec<&Job>> = BTreeMap::new();
        for job in &jobs {
            by_group
                .entry((job.dataset.clone(), job.live.variant.clone()))
                .or_default()
                .push(job);
        }
        for ((group, variant), group_jobs) in by_group {
            if dataset.is_some_and(|d| d != group) {
                continue;
            }
            let mut report = GroupVerification {
                dataset: group.clone(),
                encoder: variant,
                fingerprint: fingerprint.clone(),
                expected: 0,
                rows: 0,
                missing: Vec::new(),
                duplicates: Vec::new(),
                corrupt: Vec::new(),
                stale_shards: Vec::new(),
                reopened_jobs: reopened
                    .iter()
                    .copied()
                    .filter(|id| group_jobs.iter().any(|job| job.live.id == *id))
                    .collect(),
                retired_jobs: Vec::new(),
            };
            let mut duplicates = BTreeSet::new();
            let mut missing = BTreeSet::new();
            for job in &group_jobs {
                let shard = job.live.id as u64;
                report.rows += findings.rows.get(&shard).copied().unwrap_or(0);
                if let Some(reason) = findings.corrupt.get(&shard) {
                    report.corrupt.push((shard, reason.clone()));
                }
                for (image, id) in &job.images {
                    if job.failed.contains(&image.index) {
                        continue;
                    }
                    report.expected += 1;
                    let holders = findings.holders_of(id);
                    if holders.is_empty() {
                        missing.insert(image.index);
                    } else if holders.len() > 1 {
                        duplicates.insert(image.index);
                    }
                    if doubly_enqueued.contains(&(job.live.id, image.index)) {
                        duplicates.insert(image.index);
                    }
                }
            }
            if !folder_problems_reported {
                folder_problems_reported = true;
                report.stale_shards = findings.stale.clone();
                report.retired_jobs = retired.clone();
                let own: HashSet<u64> = jobs.iter().map(|job| job.live.id as u64).collect();
                report.corrupt.extend(
                    findings
                        .corrupt
                        .iter()
                        .filter(|(shard, _)| !own.contains(shard))
                        .map(|(shard, reason)| (*shard, reason.clone())),
                );
            }
            report.missing = missing.into_iter().collect();
            report.duplicates = duplicates.into_iter().collect();
            groups.push(report);
        }
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

/// [`live_jobs`] from jobs a planner was handed (no done-job results).
fn live_jobs_of(
    layout: &Layout,
    live: &[LiveJob],
    manifests: &mut ManifestRows,
) -> Result<Vec<Job>, String> {
    live.iter()
        .map(|live| {
            let payload: ExtractPayload = serde_json::from_str(&live.payload)
                .map_err(|err| format!("job {}: malformed payload: {err}", live.id))?;
            let images = payload
                .job_images(layout, manifests)
                .map_err(|err| err.to_string())?
                .into_iter()
                .map(|image| {
                    let id = ContentId::parse(&image.id).ok_or_else(|| {
                        format!("job {}: '{}' is not a content id", live.id, image.id)
                    })?;
                    Ok((image, id))
                })
                .collect::<Result<Vec<_>, String>>()?;
            Ok(Job {
                dataset: payload.dataset.clone(),
                live: live.clone(),
                images,
                failed: BTreeSet::new(),
                payload,
            })
        })
        .collect()
}

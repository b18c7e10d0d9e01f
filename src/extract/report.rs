//! `status` in the user's terms: jobs per dataset and encoder, images done
//! out of total, failed images with reasons, failed and dead jobs, throughput.

use serde::Serialize;

use super::ExtractError;
use crate::layout::Layout;
use crate::queue::{ItemCounts, Millis, QueueStatus, StateCounts, Throughput};

/// Completion rate in images.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Rate {
    /// Completions the rate is computed from (the most recent ones).
    pub window_jobs: u64,
    pub jobs_per_sec: Option<f64>,
    pub images_per_sec: Option<f64>,
}

impl From<&Throughput> for Rate {
    fn from(t: &Throughput) -> Self {
        Rate {
            window_jobs: t.window_jobs,
            jobs_per_sec: t.jobs_per_sec,
            images_per_sec: t.items_per_sec,
        }
    }
}

/// One dataset, encoder and fingerprint.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GroupReport {
    pub dataset: String,
    pub encoder: String,
    pub fingerprint: String,
    pub jobs: StateCounts,
    pub images: ItemCounts,
    /// Running jobs whose lease has passed (their worker died or stalled).
    pub expired_leases: u64,
    pub throughput: Rate,
    pub eta_secs: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FailedImage {
    pub dataset: String,
    pub encoder: String,
    pub job_id: i64,
    /// Manifest index of the image.
    pub image: String,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct JobReport {
    pub job_id: i64,
    pub dataset: String,
    pub encoder: String,
    pub tries: u32,
    pub last_error: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_at_ms: Option<Millis>,
}

/// What `lazarus status --json` prints: one object.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StatusReport {
    /// The queue file, or its URL without the password.
    pub queue: String,
    /// Summed over the groups shown.
    pub jobs: StateCounts,
    pub images: ItemCounts,
    pub throughput: Rate,
    pub eta_secs: Option<f64>,
    pub groups: Vec<GroupReport>,
    pub failed_images: Vec<FailedImage>,
    pub failed_jobs: Vec<JobReport>,
    pub dead_jobs: Vec<JobReport>,
}

/// Status of the queue under `layout`, for one dataset or all. A missing
/// queue file reports zeros and is not created.
pub fn status(layout: &Layout, dataset: Option<&str>) -> Result<StatusReport, ExtractError> {
    let location = layout.queue();
    let status = match location.open_existing()? {
        Some(queue) => queue.status(dataset)?,
        None => QueueStatus {
            now_ms: 0,
            groups: Vec::new(),
            throughput: Throughput::default(),
            failed_items: Vec::new(),
            failed_jobs: Vec::new(),
            dead_jobs: Vec::new(),
        },
    };
    Ok(report(location.describe(), &status))
}

/// Renames the queue's generic status into datasets, encoders and images.
pub fn report(queue: String, status: &QueueStatus) -> StatusReport {
    let job = |j: &crate::queue::JobProblem| JobReport {
        job_id: j.job_id,
        dataset: j.group.clone(),
        encoder: j.variant.clone(),
        tries: j.tries,
        last_error: j.last_error.clone(),
        retry_at_ms: j.retry_at_ms,
    };
    StatusReport {
        queue,
        jobs: status.job_totals(),
        images: status.item_totals(),
        throughput: Rate::from(&status.throughput),
        eta_secs: status.throughput.eta_secs,
        groups: status
            .groups
            .iter()
            .map(|g| GroupReport {
                dataset: g.group.clone(),
                encoder: g.variant.clone(),
                fingerprint: g.fingerprint.clone(),
                jobs: g.jobs,
                images: g.items,
                expired_leases: g.expired_leases,
                throughput: Rate::from(&g.throughput),
                eta_secs: g.throughput.eta_secs,
            })
            .collect(),
        failed_images: status
            .failed_items
            .iter()
            .map(|f| FailedImage {
                dataset: f.group.clone(),
                encoder: f.variant.clone(),
                job_id: f.job_id,
                image: f.item.clone(),
                reason: f.reason.clone(),
            })
            .collect(),
        failed_jobs: status.failed_jobs.iter().map(job).collect(),
        dead_jobs: status.dead_jobs.iter().map(job).collect(),
    }
}

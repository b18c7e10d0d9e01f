//! The job state machine, once for every backend: what a stored row means,
//! where a failed try leads, why a late call is refused, and how status
//! adds up. A backend reads and writes rows with its own SQL and leaves
//! every decision to this module (the lifecycle is drawn in the module
//! documentation of [`crate::queue`]).

use std::path::Path;

use super::{
    FailedItem, GroupStatus, ItemCounts, JobProblem, JobRecord, JobResult, JobState, LiveJob,
    Millis, Plan, Planner, QueueError, QueueStatus, RetryPolicy, StateCounts, throughput,
};

/// Completions the throughput is computed from.
pub(crate) const THROUGHPUT_WINDOW: i64 = 200;

/// Rows listed per problem kind in status.
pub(crate) const LIST_LIMIT: i64 = 1000;

/// The state columns of a job row, as every backend stores them.
pub(crate) struct StoredState {
    /// The `state` column: `pending`, `running`, `done`, `failed` or `dead`.
    pub name: String,
    pub worker: Option<String>,
    pub attempt: u32,
    pub lease_deadline_ms: Option<Millis>,
    pub retry_at_ms: Option<Millis>,
    pub last_error: Option<String>,
}

impl StoredState {
    /// The state these columns describe; an unknown name is a corrupt record.
    pub fn parse(self, location: &Path) -> Result<JobState, QueueError> {
        Ok(match self.name.as_str() {
            "pending" => JobState::Pending,
            "running" => JobState::Running {
                worker: self.worker.unwrap_or_default(),
                attempt: self.attempt,
                lease_deadline_ms: self.lease_deadline_ms.unwrap_or(0),
            },
            "done" => JobState::Done,
            "failed" => JobState::Failed {
                retry_at_ms: self.retry_at_ms.unwrap_or(0),
                last_error: self.last_error.unwrap_or_default(),
            },
            "dead" => JobState::Dead {
                last_error: self.last_error.unwrap_or_default(),
            },
            other => return Err(unknown_state(location, other)),
        })
    }
}

fn unknown_state(location: &Path, name: &str) -> QueueError {
    QueueError::Corrupt {
        path: location.to_path_buf(),
        message: format!("unknown job state '{name}'"),
    }
}

/// A whole job row, as `job` reads it.
pub(crate) struct StoredJob {
    pub id: i64,
    pub kind: String,
    pub group: String,
    pub variant: String,
    pub fingerprint: String,
    pub items: u64,
    pub payload: String,
    pub state: StoredState,
    pub tries: u32,
    /// The completion's result JSON.
    pub result: Option<String>,
    pub superseded: bool,
}

impl StoredJob {
    pub fn into_record(self, location: &Path) -> Result<JobRecord, QueueError> {
        let attempt = self.state.attempt;
        let state = self.state.parse(location)?;
        let result = match self.result {
            None => None,
            Some(text) => Some(
                serde_json::from_str(&text).map_err(|err| QueueError::Corrupt {
                    path: location.to_path_buf(),
                    message: format!("job {} result: {err}", self.id),
                })?,
            ),
        };
        Ok(JobRecord {
            id: self.id,
            kind: self.kind,
            group: self.group,
            variant: self.variant,
            fingerprint: self.fingerprint,
            items: self.items,
            payload: self.payload,
            state,
            attempt,
            tries: self.tries,
            result,
            superseded: self.superseded,
        })
    }
}

/// A completion's result as stored in the `result` column.
pub(crate) fn result_json(result: &JobResult) -> Result<String, QueueError> {
    serde_json::to_string(result).map_err(|err| QueueError::Invalid(format!("job result: {err}")))
}

/// Who holds a job now, read when a fenced call changed no row.
pub(crate) struct Holder {
    pub state: String,
    pub attempt: u32,
    pub worker: Option<String>,
    pub superseded: bool,
}

/// The refusal of a call by `attempt` that no longer holds `job_id`; `now`
/// is the job's row as it is (`None`: there is no such job).
pub(crate) fn lease_lost(
    location: &Path,
    job_id: i64,
    attempt: u32,
    now: Option<Holder>,
) -> QueueError {
    let Some(holder) = now else {
        return QueueError::NoSuchJob {
            path: location.to_path_buf(),
            job_id,
        };
    };
    let current = if holder.superseded {
        "the job was superseded by a forced enqueue".to_string()
    } else if holder.state == "running" {
        format!(
            "now attempt {}, running on {}",
            holder.attempt,
            holder.worker.unwrap_or_default()
        )
    } else {
        format!("now {} at attempt {}", holder.state, holder.attempt)
    };
    QueueError::LeaseLost {
        path: location.to_path_buf(),
        job_id,
        attempt,
        current,
    }
}

/// Where a running job goes when a try fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AfterFailure {
    /// `failed`, claimable again from `retry_at_ms`.
    Retry { retry_at_ms: Millis },
    /// `dead`: its tries reached `max_attempts`; only `requeue` brings it back.
    Dead,
}

impl AfterFailure {
    pub fn into_state(self, error: &str) -> JobState {
        match self {
            AfterFailure::Retry { retry_at_ms } => JobState::Failed {
                retry_at_ms,
                last_error: error.to_string(),
            },
            AfterFailure::Dead => JobState::Dead {
                last_error: error.to_string(),
            },
        }
    }
}

impl RetryPolicy {
    /// Where a job goes when its `tries`-th try fails at `now`: retried
    /// after the backoff, or dead once the tries reach `max_attempts`.
    pub(crate) fn after_failure(&self, tries: u32, now: Millis) -> AfterFailure {
        if tries >= self.max_attempts {
            AfterFailure::Dead
        } else {
            AfterFailure::Retry {
                retry_at_ms: now.saturating_add(self.backoff(tries).as_millis() as Millis),
            }
        }
    }
}

/// Runs a planner over the live jobs; its refusal becomes [`QueueError::Plan`].
pub(crate) fn decide(
    plan: &mut Planner<'_>,
    live: &[LiveJob],
    location: &Path,
) -> Result<Plan, QueueError> {
    plan(live).map_err(|message| QueueError::Plan {
        path: location.to_path_buf(),
        message,
    })
}

/// Live jobs of one group, variant, fingerprint and state: one row of the
/// `GROUP BY grp, variant, fingerprint, state` that status starts from.
pub(crate) struct StateCountRow {
    pub group: String,
    pub variant: String,
    pub fingerprint: String,
    /// The `state` column.
    pub state: String,
    pub jobs: u64,
    pub items: u64,
    /// Items that failed inside done jobs.
    pub failed_items: u64,
    /// Running jobs whose lease deadline has passed.
    pub expired_leases: u64,
}

/// What status reads from a backend, in one snapshot, limited to the group
/// the reader was made for (all groups when none).
pub(crate) trait StatusReader {
    type Error: From<QueueError>;

    /// Live jobs counted per group, variant, fingerprint and state, ordered
    /// by group, variant and fingerprint (bytewise).
    fn state_counts(&mut self, now: Millis) -> Result<Vec<StateCountRow>, Self::Error>;

    /// The [`THROUGHPUT_WINDOW`] most recent live completions as
    /// (finished_at_ms, items), newest first: of one group, variant and
    /// fingerprint, or of every group shown when `of` is `None`.
    fn recent_completions(
        &mut self,
        of: Option<&GroupStatus>,
    ) -> Result<Vec<(Millis, u64)>, Self::Error>;

    /// Up to [`LIST_LIMIT`] failed items of live done jobs, by job and order of failure.
    fn failed_items(&mut self) -> Result<Vec<FailedItem>, Self::Error>;

    /// Up to [`LIST_LIMIT`] live jobs in `state` (`failed` or `dead`), by id.
    fn problems(&mut self, state: &'static str) -> Result<Vec<JobProblem>, Self::Error>;
}

/// Jobs and items still to do, for the ETA.
fn remaining(jobs: &StateCounts, items: &ItemCounts) -> (u64, u64) {
    let jobs_left = jobs.pending + jobs.running + jobs.failed;
    let items_left = items
        .total
        .saturating_sub(items.done + items.failed)
        .min(items.total);
    (jobs_left, items_left)
}

/// Everything `status` reports, assembled from what `reader` reads at `now`.
pub(crate) fn read_status<R: StatusReader>(
    reader: &mut R,
    now: Millis,
    location: &Path,
) -> Result<QueueStatus, R::Error> {
    let mut groups: Vec<GroupStatus> = Vec::new();
    for row in reader.state_counts(now)? {
        let same = groups.last().is_some_and(|g| {
            (&g.group, &g.variant, &g.fingerprint) == (&row.group, &row.variant, &row.fingerprint)
        });
        if !same {
            groups.push(GroupStatus {
                group: row.group,
                variant: row.variant,
                fingerprint: row.fingerprint,
                jobs: StateCounts::default(),
                items: ItemCounts::default(),
                expired_leases: 0,
                throughput: Default::default(),
            });
        }
        let entry = groups.last_mut().expect("pushed above");
        entry.items.total += row.items;
        match row.state.as_str() {
            "pending" => entry.jobs.pending += row.jobs,
            "running" => entry.jobs.running += row.jobs,
            "done" => {
                entry.jobs.done += row.jobs;
                entry.items.done += row.items.saturating_sub(row.failed_items);
                entry.items.failed += row.failed_items;
            }
            "failed" => entry.jobs.failed += row.jobs,
            "dead" => entry.jobs.dead += row.jobs,
            other => return Err(unknown_state(location, other).into()),
        }
        entry.expired_leases += row.expired_leases;
    }
    for entry in &mut groups {
        let recent = reader.recent_completions(Some(entry))?;
        let (jobs_left, items_left) = remaining(&entry.jobs, &entry.items);
        entry.throughput = throughput(&recent, jobs_left, items_left);
    }
    let recent_all = reader.recent_completions(None)?;
    let mut jobs_total = StateCounts::default();
    let mut items_total = ItemCounts::default();
    for entry in &groups {
        jobs_total.add(&entry.jobs);
        items_total.add(&entry.items);
    }
    let (jobs_left, items_left) = remaining(&jobs_total, &items_total);
    let overall = throughput(&recent_all, jobs_left, items_left);
    let failed_items = reader.failed_items()?;
    let failed_jobs = reader.problems("failed")?;
    let mut dead_jobs = reader.problems("dead")?;
    // A dead job is never retried, whatever retry time its row still holds.
    for job in &mut dead_jobs {
        job.retry_at_ms = None;
    }
    Ok(QueueStatus {
        now_ms: now,
        groups,
        throughput: overall,
        failed_items,
        failed_jobs,
        dead_jobs,
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_failure_is_retried_with_doubling_backoff_until_the_last_try() {
        let policy = RetryPolicy {
            max_attempts: 3,
            base_delay: Duration::from_secs(10),
            max_delay: Duration::from_secs(15),
        };
        assert_eq!(
            policy.after_failure(1, 1_000),
            AfterFailure::Retry {
                retry_at_ms: 11_000
            }
        );
        // 20 s capped at 15 s.
        assert_eq!(
            policy.after_failure(2, 1_000),
            AfterFailure::Retry {
                retry_at_ms: 16_000
            }
        );
        assert_eq!(policy.after_failure(3, 1_000), AfterFailure::Dead);
        assert_eq!(
            AfterFailure::Dead.into_state("boom"),
            JobState::Dead {
                last_error: "boom".into()
            }
        );
    }

    #[test]
    fn an_unknown_stored_state_is_a_corrupt_record() {
        let stored = StoredState {
            name: "paused".into(),
            worker: None,
            attempt: 1,
            lease_deadline_ms: None,
            retry_at_ms: None,
            last_error: None,
        };
        let err = stored.parse(Path::new("jobs/queue.db")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "jobs/queue.db: corrupt queue record: unknown job state 'paused'"
        );
    }

    #[test]
    fn lease_lost_says_who_holds_the_job_now() {
        let location = Path::new("q.db");
        let holder = |state: &str, superseded| Holder {
            state: state.into(),
            attempt: 3,
            worker: Some("w2".into()),
            superseded,
        };
        let message = |now| lease_lost(location, 7, 2, now).to_string();
        assert!(message(Some(holder("running", false))).contains("now attempt 3, running on w2"));
        assert!(message(Some(holder("done", false))).contains("now done at attempt 3"));
        assert!(message(Some(holder("running", true))).contains("superseded by a forced enqueue"));
        assert_eq!(message(None), "q.db: no job 7");
    }
}

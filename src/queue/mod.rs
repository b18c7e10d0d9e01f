//! The job queue: durable jobs with opaque payloads, claimed by workers under
//! a lease, completed or failed, retried with backoff, fenced by attempt number.
//!
//! The queue knows nothing about images or encoders. A job carries a `kind`
//! (which executor runs it), a `group` and `variant` (labels status is
//! reported by; lazarus uses the dataset and encoder names), a `fingerprint`
//! (the configuration the result depends on), a `dedup_key` (enqueueing a key
//! that is already live adds nothing), an item count and an opaque payload.
//! [`Queue`] is the contract; [`sqlite::SqliteQueue`] (one file, one machine)
//! and [`postgres::PostgresQueue`] (one database, many machines) implement it
//! and pass the same conformance tests. [`QueueLocation`] says which one a
//! verb opens. The state machine below (what a stored row means, where a
//! failed try goes, why a late call is refused, how status adds up) is
//! written once, in `state`; each backend holds only its SQL.
//!
//! # Lifecycle
//!
//! ```text
//! pending --claim--> running --complete--> done
//!    ^                  |  \--fail (tries < max)--> failed --retry_at passes--> claimable
//!    |                  |   \-fail (tries = max)--> dead
//!    +----release-------+
//! running with lease_deadline <= now: claimable by anyone (tries < max), else dead
//! failed, dead --requeue--> pending (tries reset)
//! ```
//!
//! Every claim increments the job's `attempt`: it is the fencing token.
//! `heartbeat`, `complete`, `fail` and `release` name the attempt they hold
//! and are refused with [`QueueError::LeaseLost`] when the job has moved on
//! (reclaimed by a newer attempt, requeued, superseded), so a slow worker
//! that lost its lease can never overwrite a newer result. A holder whose
//! lease expired but whom nobody has reclaimed yet is still the current
//! attempt: its heartbeat or completion is accepted. `tries` counts the
//! attempts that count against `max_attempts`; a release gives the try back.
//! `supersede` (enqueue `--force`) hides a configuration's live jobs from
//! claims, status and coverage and fences off their running attempts.
//!
//! # Crash behaviour
//!
//! Every transition is one database transaction, so a worker killed at any
//! point leaves the job in exactly one state:
//! - killed before its claim commits: the job is still pending (or failed, or
//!   leased to the previous holder) and nothing changed.
//! - killed while running a job (after the claim, before the completion
//!   commits): the job stays running until its lease deadline passes, then
//!   any worker reclaims it with a new attempt number; a late completion from
//!   the killed attempt would be refused. Work done by the killed attempt
//!   must be idempotent (extraction overwrites its own shard).
//!   A job whose workers keep dying is marked dead once its tries reach
//!   `max_attempts`, with "lease expired" as its last error.
//! - killed after the completion commits: the job is done; nothing is redone.
//! - SIGINT/SIGTERM to `run-worker` is not a crash: the worker finishes the
//!   current job (or releases it without spending a try) and exits 0. A job
//!   that ignores the request past `--stop-grace-secs` is released by the
//!   worker's monitor thread and the worker exits 1; a second signal exits
//!   at once, leaving the lease to expire.
//! - a panic inside a job fails that job (the try counts, the panic message
//!   is its error) and the worker goes on.
//!
//! A job is therefore run at least once and recorded done at most once per
//! live enqueue; it may run more than once only after a lease expired.

pub mod postgres;
pub mod sqlite;
mod state;
pub mod worker;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Milliseconds since the Unix epoch: the queue's unit of time.
pub type Millis = i64;

/// Where the queue gets the time from; tests inject a [`ManualClock`].
pub trait Clock: Send + Sync {
    fn now_ms(&self) -> Millis;
}

/// The system's wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> Millis {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as Millis)
            .unwrap_or(0)
    }
}

/// A clock that only moves when told to; shared by clones.
#[derive(Debug, Clone, Default)]
pub struct ManualClock(Arc<AtomicI64>);

impl ManualClock {
    pub fn new(start_ms: Millis) -> Self {
        Self(Arc::new(AtomicI64::new(start_ms)))
    }

    pub fn advance(&self, by: Duration) {
        self.0.fetch_add(by.as_millis() as Millis, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> Millis {
        self.0.load(Ordering::SeqCst)
    }
}

/// How failed jobs are retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Tries after which a failing job is dead.
    pub max_attempts: u32,
    /// Delay before the first retry; doubles with every further failure.
    pub base_delay: Duration,
    /// Upper bound on the delay.
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 5,
            base_delay: Duration::from_secs(10),
            max_delay: Duration::from_secs(600),
        }
    }
}

impl RetryPolicy {
    /// The wait after the `tries`-th failed try (1-based): base * 2^(tries-1), capped.
    pub fn backoff(&self, tries: u32) -> Duration {
        let doublings = tries.saturating_sub(1).min(30);
        self.base_delay
            .saturating_mul(1u32 << doublings)
            .min(self.max_delay)
    }
}

/// The state of one job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum JobState {
    Pending,
    Running {
        worker: String,
        attempt: u32,
        lease_deadline_ms: Millis,
    },
    Done,
    /// Failed, to be retried once `retry_at_ms` has passed.
    Failed {
        retry_at_ms: Millis,
        last_error: String,
    },
    /// Failed `max_attempts` times; only `requeue` brings it back.
    Dead {
        last_error: String,
    },
}

impl JobState {
    pub fn name(&self) -> &'static str {
        match self {
            JobState::Pending => "pending",
            JobState::Running { .. } => "running",
            JobState::Done => "done",
            JobState::Failed { .. } => "failed",
            JobState::Dead { .. } => "dead",
        }
    }
}

/// A job to add.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewJob {
    pub kind: String,
    pub group: String,
    pub variant: String,
    pub fingerprint: String,
    /// Enqueueing a job whose key is already live (not superseded) adds nothing.
    pub dedup_key: String,
    /// How many items (images) the job covers; status sums them.
    pub items: u64,
    /// Opaque to the queue (lazarus stores JSON text).
    pub payload: String,
}

/// What an enqueue did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct EnqueueReport {
    pub added: u64,
    /// Jobs whose dedup key was already live.
    pub skipped: u64,
}

impl EnqueueReport {
    /// Counts one job: added, or skipped because its dedup key was live.
    pub(crate) fn count(&mut self, added: bool) {
        if added {
            self.added += 1;
        } else {
            self.skipped += 1;
        }
    }
}

/// A live (not superseded) job, as a planner sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveJob {
    pub id: i64,
    pub group: String,
    pub variant: String,
    /// The state's name (`pending`, `running`, `done`, `failed`, `dead`).
    pub state: String,
    pub payload: String,
}

/// What a planner decided: live jobs to retire and jobs to add.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Ids of live jobs to supersede (as `supersede` does).
    pub supersede: Vec<i64>,
    pub jobs: Vec<NewJob>,
}

/// What `plan_and_enqueue` did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct PlanReport {
    pub superseded: u64,
    pub added: u64,
    /// Jobs whose dedup key was already live.
    pub skipped: u64,
}

/// Decides a [`Plan`] from the live jobs of one fingerprint; an `Err` rolls
/// the transaction back with that message.
pub type Planner<'a> = dyn FnMut(&[LiveJob]) -> Result<Plan, String> + 'a;

/// A claimed job: the holder may run it until `lease_deadline_ms`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub job_id: i64,
    /// Fencing token: every later call about this job must name it.
    pub attempt: u32,
    pub worker: String,
    pub lease_deadline_ms: Millis,
    pub kind: String,
    pub group: String,
    pub variant: String,
    pub fingerprint: String,
    pub items: u64,
    pub payload: String,
}

/// One item of a job that could not be processed, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ItemFailure {
    pub item: String,
    pub reason: String,
}

/// What a completed job reports: the items that failed (the rest succeeded)
/// and opaque details.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct JobResult {
    pub failures: Vec<ItemFailure>,
    pub detail: serde_json::Value,
}

/// Unfinished jobs of one kind.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KindBacklog {
    pub kind: String,
    /// Pending, failed and waiting for a retry, or running with an expired lease.
    pub waiting: u64,
    /// Running under a lease that has not expired.
    pub running: u64,
}

/// Which failed or dead jobs `requeue` brings back.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequeueFilter {
    /// Only jobs of this group; all groups when `None`.
    pub group: Option<String>,
    pub failed: bool,
    pub dead: bool,
}

/// A live done job, as `done_jobs` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DoneJob {
    pub id: i64,
    pub group: String,
    pub variant: String,
    pub fingerprint: String,
    pub payload: String,
    /// The completion's result JSON (per-item failures and details).
    pub result: Option<String>,
}

/// One job as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct JobRecord {
    pub id: i64,
    pub kind: String,
    pub group: String,
    pub variant: String,
    pub fingerprint: String,
    pub items: u64,
    pub payload: String,
    pub state: JobState,
    /// Claims so far (the fencing counter).
    pub attempt: u32,
    /// Claims that counted against `max_attempts`.
    pub tries: u32,
    pub result: Option<JobResult>,
    pub superseded: bool,
}

/// Job counts per state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct StateCounts {
    pub pending: u64,
    pub running: u64,
    pub done: u64,
    pub failed: u64,
    pub dead: u64,
}

impl StateCounts {
    pub fn add(&mut self, other: &StateCounts) {
        self.pending += other.pending;
        self.running += other.running;
        self.done += other.done;
        self.failed += other.failed;
        self.dead += other.dead;
    }

    pub fn total(&self) -> u64 {
        self.pending + self.running + self.done + self.failed + self.dead
    }
}

/// Item counts: all items of live jobs, items of done jobs that succeeded,
/// items that failed inside done jobs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ItemCounts {
    pub total: u64,
    pub done: u64,
    pub failed: u64,
}

impl ItemCounts {
    pub fn add(&mut self, other: &ItemCounts) {
        self.total += other.total;
        self.done += other.done;
        self.failed += other.failed;
    }
}

/// Completion rate over the most recent completions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Throughput {
    /// Completions the rate is computed from.
    pub window_jobs: u64,
    pub jobs_per_sec: Option<f64>,
    pub items_per_sec: Option<f64>,
    /// Seconds until the remaining jobs are done at this rate.
    pub eta_secs: Option<f64>,
}

/// Status of the live jobs of one group, variant and fingerprint.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GroupStatus {
    pub group: String,
    pub variant: String,
    pub fingerprint: String,
    pub jobs: StateCounts,
    pub items: ItemCounts,
    /// Running jobs whose lease has passed: their worker is gone or stalled.
    pub expired_leases: u64,
    pub throughput: Throughput,
}

/// A failed item inside a done job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FailedItem {
    pub job_id: i64,
    pub group: String,
    pub variant: String,
    pub item: String,
    pub reason: String,
}

/// A failed or dead job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct JobProblem {
    pub job_id: i64,
    pub group: String,
    pub variant: String,
    pub state: &'static str,
    pub tries: u32,
    pub last_error: String,
    /// When a failed job becomes claimable again; `None` for dead jobs.
    pub retry_at_ms: Option<Millis>,
}

/// Everything `status` reports.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct QueueStatus {
    pub now_ms: Millis,
    pub groups: Vec<GroupStatus>,
    /// Over all groups shown.
    pub throughput: Throughput,
    pub failed_items: Vec<FailedItem>,
    pub failed_jobs: Vec<JobProblem>,
    pub dead_jobs: Vec<JobProblem>,
}

impl QueueStatus {
    pub fn job_totals(&self) -> StateCounts {
        let mut counts = StateCounts::default();
        for group in &self.groups {
            counts.add(&group.jobs);
        }
        counts
    }

    pub fn item_totals(&self) -> ItemCounts {
        let mut counts = ItemCounts::default();
        for group in &self.groups {
            counts.add(&group.items);
        }
        counts
    }
}

/// Errors at the queue boundary. Each names the queue (its file, or its URL
/// without the password, in `path` for both backends). Underlying errors
/// are part of the message (not a `source`), so `{:#}` prints them once.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error(
        "{path} is not a SQLite database (left untouched); move it aside or pass another --root"
    )]
    NotSqlite { path: PathBuf },
    #[error(
        "{path} has queue schema version {found}, newer than the {supported} this lazarus knows (left untouched); upgrade lazarus"
    )]
    NewerSchema {
        path: PathBuf,
        found: i64,
        supported: i64,
    },
    #[error(
        "{path}: job {job_id} attempt {attempt} no longer holds its lease ({current}); its result is discarded"
    )]
    LeaseLost {
        path: PathBuf,
        job_id: i64,
        attempt: u32,
        current: String,
    },
    #[error("{path}: no job {job_id}")]
    NoSuchJob { path: PathBuf, job_id: i64 },
    #[error(
        "{path}: still busy after retrying for {waited_secs} s; another process holds the write lock"
    )]
    Busy { path: PathBuf, waited_secs: u64 },
    #[error("{path}: corrupt queue record: {message}")]
    Corrupt { path: PathBuf, message: String },
    #[error("{path}: {error}")]
    Sqlite {
        path: PathBuf,
        error: rusqlite::Error,
    },
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{queue}: {message}")]
    Postgres { queue: String, message: String },
    #[error("{path}: {message}")]
    Plan { path: PathBuf, message: String },
    #[error("{0}")]
    Invalid(String),
}

/// The queue contract. All methods are atomic; all take the time from the
/// queue's clock. Implementations must be usable from several threads (a
/// worker heartbeats from a second thread) and several processes.
pub trait Queue: Send + Sync {
    /// Where the queue lives, for messages: a file path, or a URL without its password.
    fn location(&self) -> String;

    /// Adds jobs, skipping those whose dedup key is already live. Atomic.
    fn enqueue(&self, jobs: &[NewJob]) -> Result<EnqueueReport, QueueError>;

    /// Reads the live jobs of `fingerprint` (every group and variant, oldest
    /// first), lets `plan` choose jobs to supersede and jobs to add, and does
    /// both, all in one transaction that excludes every other
    /// `plan_and_enqueue` of the same fingerprint: two planners never both
    /// see the same work uncovered. `plan` may run more than once (busy
    /// retries); only its last plan is applied.
    fn plan_and_enqueue(
        &self,
        fingerprint: &str,
        plan: &mut Planner<'_>,
    ) -> Result<PlanReport, QueueError>;

    /// The live jobs of `fingerprint`, every group, oldest first (read
    /// under `plan_and_enqueue`'s exclusion, with nothing planned).
    fn live_jobs(&self, fingerprint: &str) -> Result<Vec<LiveJob>, QueueError> {
        let mut seen = Vec::new();
        self.plan_and_enqueue(fingerprint, &mut |live| {
            seen = live.to_vec();
            Ok(Plan::default())
        })?;
        Ok(seen)
    }

    /// Payloads of the live jobs of a group, variant and fingerprint, in any
    /// state: what is already covered.
    fn live_payloads(
        &self,
        group: &str,
        variant: &str,
        fingerprint: &str,
    ) -> Result<Vec<String>, QueueError>;

    /// Live done jobs of `kind` (all groups when `group` is `None`): their
    /// ids and payloads, so a caller can check the work they recorded.
    fn done_jobs(&self, kind: &str, group: Option<&str>) -> Result<Vec<DoneJob>, QueueError>;

    /// Sends live done jobs back to pending with their tries reset (their
    /// recorded work was lost). Jobs in any other state are left alone.
    /// Returns how many were reopened.
    fn reopen(&self, job_ids: &[i64]) -> Result<u64, QueueError>;

    /// Retires the live jobs of a group, variant and fingerprint (for `--force`):
    /// they leave status and coverage, their dedup keys become free, and a
    /// running attempt is fenced off. Returns how many were retired.
    fn supersede(&self, group: &str, variant: &str, fingerprint: &str) -> Result<u64, QueueError>;

    /// Claims the oldest claimable job of one of `kinds`: pending, failed with
    /// `retry_at` passed, or running with an expired lease.
    fn claim(
        &self,
        worker: &str,
        kinds: &[&str],
        lease: Duration,
    ) -> Result<Option<Lease>, QueueError>;

    /// Extends a lease to now + `lease`; refused when the attempt lost it.
    fn heartbeat(&self, job_id: i64, attempt: u32, lease: Duration) -> Result<Millis, QueueError>;

    /// Marks a job done with its result; refused when the attempt lost its lease.
    fn complete(&self, job_id: i64, attempt: u32, result: &JobResult) -> Result<(), QueueError>;

    /// `complete`, then `claim`, in one transaction where the backend can.
    fn complete_and_claim(
        &self,
        job_id: i64,
        attempt: u32,
        result: &JobResult,
        worker: &str,
        kinds: &[&str],
        lease: Duration,
    ) -> Result<Option<Lease>, QueueError> {
        self.complete(job_id, attempt, result)?;
        self.claim(worker, kinds, lease)
    }

    /// Records a failed try: failed with backoff, or dead after `max_attempts`.
    /// Returns the new state.
    fn fail(&self, job_id: i64, attempt: u32, error: &str) -> Result<JobState, QueueError>;

    /// Gives a job back as pending without spending a try (graceful shutdown).
    fn release(&self, job_id: i64, attempt: u32) -> Result<(), QueueError>;

    /// Brings failed and/or dead jobs back to pending with their tries reset.
    fn requeue(&self, filter: &RequeueFilter) -> Result<u64, QueueError>;

    /// Unfinished live jobs per kind (kinds with none are left out).
    fn backlog_by_kind(&self) -> Result<Vec<KindBacklog>, QueueError>;

    /// One job, live or superseded.
    fn job(&self, job_id: i64) -> Result<JobRecord, QueueError>;

    /// Counts, failures and throughput, for one group or all.
    fn status(&self, group: Option<&str>) -> Result<QueueStatus, QueueError>;
}

/// Which queue a verb opens: the SQLite file under the root (one machine), or
/// a PostgreSQL database (`--queue postgres://...` or `LAZARUS_QUEUE`) that
/// workers on many machines share.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueueLocation {
    Sqlite(PathBuf),
    Postgres(String),
}

impl QueueLocation {
    /// Parses a `--queue` value: a `postgres://` or `postgresql://` URL.
    pub fn parse(value: &str) -> Result<Self, QueueError> {
        let lower = value.to_ascii_lowercase();
        if lower.starts_with("postgres://") || lower.starts_with("postgresql://") {
            Ok(QueueLocation::Postgres(value.to_string()))
        } else {
            Err(QueueError::Invalid(format!(
                "--queue {}: expected a postgres:// or postgresql:// URL (without --queue the SQLite file ROOT/jobs/queue.db is used)",
                postgres::redact_url(value)
            )))
        }
    }

    /// How messages name it: the file, or the URL without its password.
    pub fn describe(&self) -> String {
        match self {
            QueueLocation::Sqlite(path) => path.display().to_string(),
            QueueLocation::Postgres(url) => postgres::redact_url(url),
        }
    }

    /// Opens the queue, creating its file or schema if absent.
    pub fn open(&self) -> Result<Box<dyn Queue>, QueueError> {
        Ok(match self {
            QueueLocation::Sqlite(path) => Box::new(sqlite::SqliteQueue::open(path)?),
            QueueLocation::Postgres(url) => Box::new(postgres::PostgresQueue::open(url)?),
        })
    }

    /// `open` with another retry policy for the jobs this handle fails.
    pub fn open_with_policy(&self, policy: RetryPolicy) -> Result<Box<dyn Queue>, QueueError> {
        let clock = Arc::new(SystemClock);
        Ok(match self {
            QueueLocation::Sqlite(path) => {
                Box::new(sqlite::SqliteQueue::open_with(path, clock, policy)?)
            }
            QueueLocation::Postgres(url) => {
                Box::new(postgres::PostgresQueue::open_with(url, clock, policy)?)
            }
        })
    }

    /// Opens the queue only if it exists; read-only verbs create nothing.
    pub fn open_existing(&self) -> Result<Option<Box<dyn Queue>>, QueueError> {
        Ok(match self {
            QueueLocation::Sqlite(path) => {
                sqlite::SqliteQueue::open_existing(path)?.map(|q| Box::new(q) as Box<dyn Queue>)
            }
            QueueLocation::Postgres(url) => {
                postgres::PostgresQueue::open_existing(url)?.map(|q| Box::new(q) as Box<dyn Queue>)
            }
        })
    }
}

/// Throughput over completions given as (finished_at_ms, items), newest first,
/// with `remaining_jobs`/`remaining_items` left to do.
pub fn throughput(
    recent: &[(Millis, u64)],
    remaining_jobs: u64,
    remaining_items: u64,
) -> Throughput {
    let window_jobs = recent.len() as u64;
    if recent.len() < 2 {
        return Throughput {
            window_jobs,
            ..Throughput::default()
        };
    }
    let newest = recent[0].0;
    let oldest = recent[recent.len() - 1].0;
    // A window that all finished within one millisecond has no measurable rate.
    let span_secs = (newest - oldest) as f64 / 1000.0;
    if span_secs <= 0.0 {
        return Throughput {
            window_jobs,
            ..Throughput::default()
        };
    }
    // The oldest completion opens the window; the jobs after it are the rate.
    let jobs_per_sec = (recent.len() - 1) as f64 / span_secs;
    let items: u64 = recent[..recent.len() - 1].iter().map(|(_, n)| n).sum();
    let items_per_sec = items as f64 / span_secs;
    let eta_secs = if remaining_jobs == 0 {
        Some(0.0)
    } else if items_per_sec > 0.0 && remaining_items > 0 {
        Some(remaining_items as f64 / items_per_sec)
    } else {
        Some(remaining_jobs as f64 / jobs_per_sec)
    };
    Throughput {
        window_jobs,
        jobs_per_sec: Some(jobs_per_sec),
        items_per_sec: Some(items_per_sec),
        eta_secs,
    }
}

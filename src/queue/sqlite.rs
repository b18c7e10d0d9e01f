//! The SQLite queue backend: one file (jobs/queue.db) shared by any number of
//! worker, enqueue and status processes.
//!
//! - WAL journal with `synchronous=NORMAL`: readers never block the writer, and
//!   a committed transition survives a process crash (a power cut may lose the
//!   last few commits, which then simply rerun: every transition is idempotent
//!   from the queue's point of view).
//! - Every write is a `BEGIN IMMEDIATE` transaction, so two workers can never
//!   read the same pending row and both claim it: the write lock is taken
//!   before the read. SQLITE_BUSY is retried with backoff (after SQLite's own
//!   busy timeout) for up to [`BUSY_GIVE_UP`], so "database is locked" never
//!   reaches a user under normal contention.
//! - The schema version lives in `PRAGMA user_version`. A file is validated
//!   (SQLite header, known version) before anything is written to it: a file
//!   that is not SQLite, or has a newer schema, is left byte for byte untouched.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rusqlite::{Connection, ErrorCode, OpenFlags, OptionalExtension, ToSql, Transaction};

use super::{
    Clock, DoneJob, EnqueueReport, FailedItem, GroupStatus, ItemCounts, JobProblem, JobRecord,
    JobResult, JobState, KindBacklog, Lease, LiveJob, Millis, NewJob, PlanReport, Planner, Queue,
    QueueError, QueueStatus, RequeueFilter, RetryPolicy, StateCounts, SystemClock, throughput,
};

/// The schema version this binary creates and understands.
pub const SCHEMA_VERSION: i64 = 1;

/// How long a busy database is retried before giving up with [`QueueError::Busy`].
pub const BUSY_GIVE_UP: Duration = Duration::from_secs(120);

/// SQLite's own wait on a lock before it reports SQLITE_BUSY to us.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Completions the throughput is computed from.
const THROUGHPUT_WINDOW: i64 = 200;

/// Rows listed per problem kind in status.
const LIST_LIMIT: i64 = 1000;

const SQLITE_MAGIC: &[u8; 16] = b"SQLite format 3\0";

const SCHEMA_V1: &str = "
CREATE TABLE jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT, -- ids are never reused
    kind TEXT NOT NULL,
    grp TEXT NOT NULL,
    variant TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    dedup_key TEXT NOT NULL,
    items INTEGER NOT NULL,
    payload TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('pending', 'running', 'done', 'failed', 'dead')),
    attempt INTEGER NOT NULL DEFAULT 0,
    tries INTEGER NOT NULL DEFAULT 0,
    worker TEXT,
    lease_deadline_ms INTEGER,
    retry_at_ms INTEGER,
    last_error TEXT,
    result TEXT,
    failed_items INTEGER NOT NULL DEFAULT 0,
    enqueued_at_ms INTEGER NOT NULL,
    finished_at_ms INTEGER,
    superseded INTEGER NOT NULL DEFAULT 0
);
CREATE UNIQUE INDEX jobs_live_dedup ON jobs (dedup_key) WHERE superseded = 0;
CREATE INDEX jobs_claim ON jobs (state, kind, id) WHERE superseded = 0;
CREATE INDEX jobs_lease ON jobs (state, lease_deadline_ms) WHERE superseded = 0;
CREATE INDEX jobs_retry ON jobs (state, retry_at_ms) WHERE superseded = 0;
CREATE INDEX jobs_group ON jobs (grp, variant, fingerprint) WHERE superseded = 0;
CREATE INDEX jobs_finished ON jobs (finished_at_ms) WHERE state = 'done' AND superseded = 0;
CREATE TABLE item_failures (
    job_id INTEGER NOT NULL REFERENCES jobs (id),
    item TEXT NOT NULL,
    reason TEXT NOT NULL
);
CREATE INDEX item_failures_job ON item_failures (job_id);
";

/// Failure inside a transaction: SQLite (maybe busy, then retried) or a queue verdict.
enum Fail {
    Sql(rusqlite::Error),
    Queue(QueueError),
}

impl From<rusqlite::Error> for Fail {
    fn from(err: rusqlite::Error) -> Self {
        Fail::Sql(err)
    }
}

fn is_busy(err: &rusqlite::Error) -> bool {
    matches!(
        err,
        rusqlite::Error::SqliteFailure(e, _)
            if matches!(e.code, ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked)
    )
}

/// A queue in one SQLite file.
pub struct SqliteQueue {
    path: PathBuf,
    connection: Mutex<Connection>,
    clock: Arc<dyn Clock>,
    policy: RetryPolicy,
}

impl std::fmt::Debug for SqliteQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteQueue")
            .field("path", &self.path)
            .field("policy", &self.policy)
            .finish()
    }
}

impl SqliteQueue {
    /// Opens (creating if absent) the queue at `path` with the system clock.
    pub fn open(path: &Path) -> Result<Self, QueueError> {
        Self::open_with(path, Arc::new(SystemClock), RetryPolicy::default())
    }

    /// Opens an existing queue; `Ok(None)` when the file does not exist.
    /// Used by read-only verbs so that they do not create a queue.
    pub fn open_existing(path: &Path) -> Result<Option<Self>, QueueError> {
        if !path.exists() {
            return Ok(None);
        }
        Self::open(path).map(Some)
    }

    /// Opens (creating if absent) the queue at `path` with a clock and retry policy.
    pub fn open_with(
        path: &Path,
        clock: Arc<dyn Clock>,
        policy: RetryPolicy,
    ) -> Result<Self, QueueError> {
        check_header(path)?;
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|source| QueueError::Io {
                path: parent.to_path_buf(),
                error: source,
            })?;
        }
        let sql_err = |source| QueueError::Sqlite {
            path: path.to_path_buf(),
            error: source,
        };
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let connection = Connection::open_with_flags(path, flags).map_err(sql_err)?;
        connection.busy_timeout(BUSY_TIMEOUT).map_err(sql_err)?;
        let queue = Self {
            path: path.to_path_buf(),
            connection: Mutex::new(connection),
            clock,
            policy,
        };
        // Validate before writing anything: reading user_version changes nothing.
        let version = queue.retry_busy(|conn| {
            Ok(conn.query_row("PRAGMA user_version", [], |row| row.get::<_, i64>(0))?)
        })?;
        queue.check_version(version)?;
        queue.retry_busy(|conn| {
            let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0))?;
            if !mode.eq_ignore_ascii_case("wal") {
                return Err(Fail::Queue(QueueError::Invalid(format!(
                    "{}: cannot switch to WAL journal mode (got {mode})",
                    path.display()
                ))));
            }
            conn.execute_batch("PRAGMA synchronous = NORMAL")?;
            Ok(())
        })?;
        queue.write(|tx, _| {
            let version: i64 = tx.query_row("PRAGMA user_version", [], |row| row.get(0))?;
            if version > SCHEMA_VERSION {
                return Err(Fail::Queue(queue.newer_schema(version)));
            }
            if version < 1 {
                tx.execute_batch(SCHEMA_V1)?;
                tx.execute_batch("PRAGMA user_version = 1")?;
            }
            Ok(())
        })?;
        Ok(queue)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn policy(&self) -> RetryPolicy {
        self.policy
    }

    fn newer_schema(&self, found: i64) -> QueueError {
        QueueError::NewerSchema {
            path: self.path.clone(),
            found,
            supported: SCHEMA_VERSION,
        }
    }

    fn check_version(&self, version: i64) -> Result<(), QueueError> {
        if version > SCHEMA_VERSION {
            Err(self.newer_schema(version))
        } else {
            Ok(())
        }
    }

    fn lock(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the connection leaves no open transaction
        // (rusqlite rolls back on drop), so a poisoned lock is still usable.
        self.connection
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn to_error(&self, fail: Fail) -> QueueError {
        match fail {
            Fail::Queue(err) => err,
            Fail::Sql(source) => QueueError::Sqlite {
                path: self.path.clone(),
                error: source,
            },
        }
    }

    /// Runs `op` on the connection, retrying SQLITE_BUSY with backoff.
    fn retry_busy<T>(
        &self,
        mut op: impl FnMut(&mut Connection) -> Result<T, Fail>,
    ) -> Result<T, QueueError> {
        let mut conn = self.lock();
        let started = Instant::now();
        let mut delay = Duration::from_millis(1);
        loop {
            match op(&mut conn) {
                Ok(value) => return Ok(value),
                Err(Fail::Sql(err)) if is_busy(&err) => {
                    if started.elapsed() >= BUSY_GIVE_UP {
                        return Err(QueueError::Busy {
                            path: self.path.clone(),
                            waited_secs: started.elapsed().as_secs(),
                        });
                    }
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(Duration::from_millis(100));
                }
                Err(fail) => return Err(self.to_error(fail)),
            }
        }
    }

    /// Runs `op` in a `BEGIN IMMEDIATE` transaction with the current time;
    /// commits on `Ok`, rolls back on `Err`; busy is retried.
    fn write<T>(
        &self,
        mut op: impl FnMut(&Transaction<'_>, Millis) -> Result<T, Fail>,
    ) -> Result<T, QueueError> {
        self.retry_busy(|conn| {
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let value = op(&tx, self.clock.now_ms())?;
            tx.commit()?;
            Ok(value)
        })
    }

    /// Runs `op` in a read transaction (one consistent snapshot); busy is retried.
    fn read<T>(
        &self,
        mut op: impl FnMut(&Transaction<'_>, Millis) -> Result<T, Fail>,
    ) -> Result<T, QueueError> {
        self.retry_busy(|conn| {
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Deferred)?;
            let value = op(&tx, self.clock.now_ms())?;
            tx.commit()?;
            Ok(value)
        })
    }

    /// Why an attempt no longer holds a job, for [`QueueError::LeaseLost`].
    fn lease_lost(&self, tx: &Transaction<'_>, job_id: i64, attempt: u32) -> Fail {
        let row = tx
            .query_row(
                "SELECT state, attempt, worker, superseded FROM jobs WHERE id = ?1",
                [job_id],
                |row| {
                    Ok((
                        row.get::<_, String>(0)?,
                        row.get::<_, u32>(1)?,
                        row.get::<_, Option<String>>(2)?,
                        row.get::<_, bool>(3)?,
                    ))
                },
            )
            .optional();
        let current = match row {
            Err(err) => return Fail::Sql(err),
            Ok(None) => {
                return Fail::Queue(QueueError::NoSuchJob {
                    path: self.path.clone(),
                    job_id,
                });
            }
            Ok(Some((_, _, _, true))) => "the job was superseded by a forced enqueue".to_string(),
            Ok(Some((state, current, worker, false))) if state == "running" => format!(
                "now attempt {current}, running on {}",
                worker.unwrap_or_default()
            ),
            Ok(Some((state, current, _, false))) => {
                format!("now {state} at attempt {current}")
            }
        };
        Fail::Queue(QueueError::LeaseLost {
            path: self.path.clone(),
            job_id,
            attempt,
            current,
        })
    }

    fn claim_in(
        &self,
        tx: &Transaction<'_>,
        now: Millis,
        worker: &str,
        kinds: &[&str],
        lease: Duration,
    ) -> Result<Option<Lease>, Fail> {
        if kinds.is_empty() {
            return Ok(None);
        }
        // Jobs whose workers keep dying must not be claimed forever.
        tx.prepare_cached(
            "UPDATE jobs SET state = 'dead', worker = NULL, lease_deadline_ms = NULL,
                 finished_at_ms = ?1,
                 last_error = 'lease expired: the worker died or stalled ' || tries || ' times'
             WHERE superseded = 0 AND state = 'running' AND lease_deadline_ms <= ?1
                 AND tries >= ?2",
        )?
        .execute(rusqlite::params![now, self.policy.max_attempts])?;

        // Numbered: ?1 is the time, the kinds follow.
        let marks = (2..kinds.len() + 2)
            .map(|n| format!("?{n}"))
            .collect::<Vec<_>>()
            .join(", ");
        let candidates = [
            format!(
                "SELECT id FROM jobs WHERE superseded = 0 AND state = 'running'
                 AND lease_deadline_ms <= ?1 AND kind IN ({marks})
                 ORDER BY lease_deadline_ms LIMIT 1"
            ),
            format!(
                "SELECT id FROM jobs WHERE superseded = 0 AND state = 'failed'
                 AND retry_at_ms <= ?1 AND kind IN ({marks})
                 ORDER BY retry_at_ms LIMIT 1"
            ),
            format!(
                "SELECT id FROM jobs WHERE superseded = 0 AND state = 'pending'
                 AND kind IN ({marks}) AND ?1 IS NOT NULL -- binds ?1 like its siblings
                 ORDER BY id LIMIT 1"
            ),
        ];
        let mut params: Vec<&dyn ToSql> = vec![&now];
        params.extend(kinds.iter().map(|k| k as &dyn ToSql));
        let mut found = None;
        for sql in &candidates {
            found = tx
                .prepare_cached(sql)?
                .query_row(&params[..], |row| row.get::<_, i64>(0))
                .optional()?;
            if found.is_some() {
                break;
            }
        }
        let Some(job_id) = found else {
            return Ok(None);
        };
        let deadline = now.saturating_add(lease.as_millis() as Millis);
        let lease = tx
            .prepare_cached(
                "UPDATE jobs SET state = 'running', attempt = attempt + 1, tries = tries + 1,
                     worker = ?2, lease_deadline_ms = ?3, retry_at_ms = NULL
                 WHERE id = ?1
                 RETURNING attempt, kind, grp, variant, fingerprint, items, payload",
            )?
            .query_row(rusqlite::params![job_id, worker, deadline], |row| {
                Ok(Lease {
                    job_id,
                    attempt: row.get(0)?,
                    worker: worker.to_string(),
                    lease_deadline_ms: deadline,
                    kind: row.get(1)?,
                    group: row.get(2)?,
                    variant: row.get(3)?,
                    fingerprint: row.get(4)?,
                    items: row.get(5)?,
                    payload: row.get(6)?,
                })
            })?;
        Ok(Some(lease))
    }

    fn complete_in(
        &self,
        tx: &Transaction<'_>,
        now: Millis,
        job_id: i64,
        attempt: u32,
        result: &JobResult,
    ) -> Result<(), Fail> {
        let result_json = serde_json::to_string(result)
            .map_err(|err| Fail::Queue(QueueError::Invalid(format!("job result: {err}"))))?;
        let changed = tx
            .prepare_cached(
                "UPDATE jobs SET state = 'done', lease_deadline_ms = NULL, result = ?3,
                     failed_items = ?4, finished_at_ms = ?5, last_error = NULL
                 WHERE id = ?1 AND attempt = ?2 AND state = 'running' AND superseded = 0",
            )?
            .execute(rusqlite::params![
                job_id,
                attempt,
                result_json,
                result.failures.len() as i64,
                now
            ])?;
        if changed == 0 {
            return Err(self.lease_lost(tx, job_id, attempt));
        }
        if !result.failures.is_empty() {
            let mut insert = tx.prepare_cached(
                "INSERT INTO item_failures (job_id, item, reason) VALUES (?1, ?2, ?3)",
            )?;
            for failure in &result.failures {
                insert.execute(rusqlite::params![job_id, failure.item, failure.reason])?;
            }
        }
        Ok(())
    }
}

/// Refuses a non-empty file that does not start with the SQLite header.
/// An empty file is what SQLite itself creates first, so it is accepted.
fn check_header(path: &Path) -> Result<(), QueueError> {
    let mut file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(QueueError::Io {
                path: path.to_path_buf(),
                error: source,
            });
        }
    };
    let mut head = Vec::with_capacity(16);
    file.by_ref()
        .take(16)
        .read_to_end(&mut head)
        .map_err(|source| QueueError::Io {
            path: path.to_path_buf(),
            error: source,
        })?;
    if head.is_empty() || head.as_slice() == SQLITE_MAGIC {
        Ok(())
    } else {
        Err(QueueError::NotSqlite {
            path: path.to_path_buf(),
        })
    }
}

fn parse_state(
    path: &Path,
    name: &str,
    worker: Option<String>,
    attempt: u32,
    lease_deadline_ms: Option<Millis>,
    retry_at_ms: Option<Millis>,
    last_error: Option<String>,
) -> Result<JobState, QueueError> {
    Ok(match name {
        "pending" => JobState::Pending,
        "running" => JobState::Running {
            worker: worker.unwrap_or_default(),
            attempt,
            lease_deadline_ms: lease_deadline_ms.unwrap_or(0),
        },
        "done" => JobState::Done,
        "failed" => JobState::Failed {
            retry_at_ms: retry_at_ms.unwrap_or(0),
            last_error: last_error.unwrap_or_default(),
        },
        "dead" => JobState::Dead {
            last_error: last_error.unwrap_or_default(),
        },
        other => {
            return Err(QueueError::Corrupt {
                path: path.to_path_buf(),
                message: format!("unknown job state '{other}'"),
            });
        }
    })
}

impl Queue for SqliteQueue {
    fn location(&self) -> String {
        self.path.display().to_string()
    }

    fn enqueue(&self, jobs: &[NewJob]) -> Result<EnqueueReport, QueueError> {
        self.write(|tx, now| {
            let mut insert = tx.prepare_cached(
                "INSERT INTO jobs (kind, grp, variant, fingerprint, dedup_key, items, payload,
                     state, enqueued_at_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 'pending', ?8)
                 ON CONFLICT (dedup_key) WHERE superseded = 0 DO NOTHING",
            )?;
            let mut report = EnqueueReport::default();
            for job in jobs {
                let added = insert.execute(rusqlite::params![
                    job.kind,
                    job.group,
                    job.variant,
                    job.fingerprint,
                    job.dedup_key,
                    job.items as i64,
                    job.payload,
                    now
                ])?;
                if added == 1 {
                    report.added += 1;
                } else {
                    report.skipped += 1;
                }
            }
            Ok(report)
        })
    }

    fn plan_and_enqueue(
        &self,
        fingerprint: &str,
        plan: &mut Planner<'_>,
    ) -> Result<PlanReport, QueueError> {
        // BEGIN IMMEDIATE: the read, the plan and the writes hold the write
        // lock together, so no other planner reads in between.
        self.write(|tx, now| {
            let live: Vec<LiveJob> = {
                let mut statement = tx.prepare_cached(
                    "SELECT id, grp, variant, state, payload FROM jobs
                     WHERE superseded = 0 AND fingerprint = ?1
                     ORDER BY id",
                )?;
                statement
                    .query_map([fingerprint], |row| {
                        Ok(LiveJob {
                            id: row.get(0)?,
                            group: row.get(1)?,
                            variant: row.get(2)?,
                            state: row.get(3)?,
                            payload: row.get(4)?,
                        })
                    })?
                    .collect::<Result<_, _>>()?
            };
            let decided = plan(&live).map_err(|message| {
                Fail::Queue(QueueError::Plan {
                    path: self.path.clone(),
                    message,
                })
            })?;
            let mut report = PlanReport::default();
            let mut retire = tx.prepare_cached(
                "UPDATE jobs SET superseded = 1
                 WHERE id = ?1 AND superseded = 0 AND fingerprint = ?2",
            )?;
            for id in &decided.supersede {
                report.superseded += retire.execute(rusqlite::params![id, fingerprint])? as u64;
            }
            let mut insert = tx.prepare_cached(
                "INSERT INTO jobs (kind, grp, variant, fingerprint, dedup_key, items, payload,
                     state, enqueued_at_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 'pending', ?8)
                 ON CONFLICT (dedup_key) WHERE superseded = 0 DO NOTHING",
            )?;
            for job in &decided.jobs {
                let added = insert.execute(rusqlite::params![
                    job.kind,
                    job.group,
                    job.variant,
                    job.fingerprint,
                    job.dedup_key,
                    job.items as i64,
                    job.payload,
                    now
                ])?;
                if added == 1 {
                    report.added += 1;
                } else {
                    report.skipped += 1;
                }
            }
            Ok(report)
        })
    }

    fn live_payloads(
        &self,
        group: &str,
        variant: &str,
        fingerprint: &str,
    ) -> Result<Vec<String>, QueueError> {
        self.read(|tx, _| {
            let mut statement = tx.prepare_cached(
                "SELECT payload FROM jobs
                 WHERE superseded = 0 AND grp = ?1 AND variant = ?2 AND fingerprint = ?3
                 ORDER BY id",
            )?;
            let rows = statement.query_map([group, variant, fingerprint], |row| row.get(0))?;
            Ok(rows.collect::<Result<Vec<String>, _>>()?)
        })
    }

    fn done_jobs(&self, kind: &str, group: Option<&str>) -> Result<Vec<DoneJob>, QueueError> {
        self.read(|tx, _| {
            let mut statement = tx.prepare_cached(
                "SELECT id, grp, variant, fingerprint, payload, result FROM jobs
                 WHERE superseded = 0 AND state = 'done' AND kind = ?1
                   AND (?2 IS NULL OR grp = ?2)
                 ORDER BY id",
            )?;
            let rows = statement.query_map(rusqlite::params![kind, group], |row| {
                Ok(DoneJob {
                    id: row.get(0)?,
                    group: row.get(1)?,
                    variant: row.get(2)?,
                    fingerprint: row.get(3)?,
                    payload: row.get(4)?,
                    result: row.get(5)?,
                })
            })?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
    }

    fn reopen(&self, job_ids: &[i64]) -> Result<u64, QueueError> {
        self.write(|tx, _| {
            let mut statement = tx.prepare_cached(
                "UPDATE jobs SET state = 'pending', tries = 0, retry_at_ms = NULL, worker = NULL,
                     finished_at_ms = NULL, result = NULL
                 WHERE id = ?1 AND superseded = 0 AND state = 'done'",
            )?;
            let mut reopened = 0;
            for id in job_ids {
                reopened += statement.execute([id])? as u64;
            }
            Ok(reopened)
        })
    }

    fn supersede(&self, group: &str, variant: &str, fingerprint: &str) -> Result<u64, QueueError> {
        self.write(|tx, _| {
            let changed = tx.execute(
                "UPDATE jobs SET superseded = 1
                 WHERE superseded = 0 AND grp = ?1 AND variant = ?2 AND fingerprint = ?3",
                [group, variant, fingerprint],
            )?;
            Ok(changed as u64)
        })
    }

    fn claim(
        &self,
        worker: &str,
        kinds: &[&str],
        lease: Duration,
    ) -> Result<Option<Lease>, QueueError> {
        self.write(|tx, now| self.claim_in(tx, now, worker, kinds, lease))
    }

    fn heartbeat(&self, job_id: i64, attempt: u32, lease: Duration) -> Result<Millis, QueueError> {
        self.write(|tx, now| {
            let deadline = now.saturating_add(lease.as_millis() as Millis);
            let changed = tx
                .prepare_cached(
                    "UPDATE jobs SET lease_deadline_ms = ?3
                     WHERE id = ?1 AND attempt = ?2 AND state = 'running' AND superseded = 0",
                )?
                .execute(rusqlite::params![job_id, attempt, deadline])?;
            if changed == 0 {
                return Err(self.lease_lost(tx, job_id, attempt));
            }
            Ok(deadline)
        })
    }

    fn complete(&self, job_id: i64, attempt: u32, result: &JobResult) -> Result<(), QueueError> {
        self.write(|tx, now| self.complete_in(tx, now, job_id, attempt, result))
    }

    fn complete_and_claim(
        &self,
        job_id: i64,
        attempt: u32,
        result: &JobResult,
        worker: &str,
        kinds: &[&str],
        lease: Duration,
    ) -> Result<Option<Lease>, QueueError> {
        self.write(|tx, now| {
            self.complete_in(tx, now, job_id, attempt, result)?;
            self.claim_in(tx, now, worker, kinds, lease)
        })
    }

    fn fail(&self, job_id: i64, attempt: u32, error: &str) -> Result<JobState, QueueError> {
        self.write(|tx, now| {
            let tries: Option<u32> = tx
                .query_row(
                    "SELECT tries FROM jobs
                     WHERE id = ?1 AND attempt = ?2 AND state = 'running' AND superseded = 0",
                    rusqlite::params![job_id, attempt],
                    |row| row.get(0),
                )
                .optional()?;
            let Some(tries) = tries else {
                return Err(self.lease_lost(tx, job_id, attempt));
            };
            if tries >= self.policy.max_attempts {
                tx.execute(
                    "UPDATE jobs SET state = 'dead', lease_deadline_ms = NULL, last_error = ?2,
                         finished_at_ms = ?3
                     WHERE id = ?1",
                    rusqlite::params![job_id, error, now],
                )?;
                Ok(JobState::Dead {
                    last_error: error.to_string(),
                })
            } else {
                let retry_at_ms =
                    now.saturating_add(self.policy.backoff(tries).as_millis() as Millis);
                tx.execute(
                    "UPDATE jobs SET state = 'failed', lease_deadline_ms = NULL, last_error = ?2,
                         retry_at_ms = ?3
                     WHERE id = ?1",
                    rusqlite::params![job_id, error, retry_at_ms],
                )?;
                Ok(JobState::Failed {
                    retry_at_ms,
                    last_error: error.to_string(),
                })
            }
        })
    }

    fn release(&self, job_id: i64, attempt: u32) -> Result<(), QueueError> {
        self.write(|tx, _| {
            let changed = tx.execute(
                "UPDATE jobs SET state = 'pending', tries = tries - 1, worker = NULL,
                     lease_deadline_ms = NULL
                 WHERE id = ?1 AND attempt = ?2 AND state = 'running' AND superseded = 0",
                rusqlite::params![job_id, attempt],
            )?;
            if changed == 0 {
                return Err(self.lease_lost(tx, job_id, attempt));
            }
            Ok(())
        })
    }

    fn requeue(&self, filter: &RequeueFilter) -> Result<u64, QueueError> {
        let mut states = Vec::new();
        if filter.failed {
            states.push("'failed'");
        }
        if filter.dead {
            states.push("'dead'");
        }
        if states.is_empty() {
            return Ok(0);
        }
        let sql = format!(
            "UPDATE jobs SET state = 'pending', tries = 0, retry_at_ms = NULL, worker = NULL,
                 finished_at_ms = NULL
             WHERE superseded = 0 AND state IN ({}) AND (?1 IS NULL OR grp = ?1)",
            states.join(", ")
        );
        self.write(|tx, _| Ok(tx.execute(&sql, [filter.group.as_deref()])? as u64))
    }

    fn backlog_by_kind(&self) -> Result<Vec<KindBacklog>, QueueError> {
        self.read(|tx, now| {
            let mut statement = tx.prepare_cached(
                "SELECT kind, SUM(state != 'running' OR lease_deadline_ms <= ?1),
                     SUM(state = 'running' AND lease_deadline_ms > ?1)
                 FROM jobs
                 WHERE superseded = 0 AND state IN ('pending', 'running', 'failed')
                 GROUP BY kind ORDER BY kind",
            )?;
            let rows = statement.query_map([now], |row| {
                Ok(KindBacklog {
                    kind: row.get(0)?,
                    waiting: row.get(1)?,
                    running: row.get(2)?,
                })
            })?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
    }

    fn job(&self, job_id: i64) -> Result<JobRecord, QueueError> {
        let row = self.read(|tx, _| {
            Ok(tx
                .query_row(
                    "SELECT kind, grp, variant, fingerprint, items, payload, state, attempt,
                         tries, worker, lease_deadline_ms, retry_at_ms, last_error, result,
                         superseded
                     FROM jobs WHERE id = ?1",
                    [job_id],
                    |row| {
                        Ok((
                            (
                                row.get::<_, String>(0)?,
                                row.get::<_, String>(1)?,
                                row.get::<_, String>(2)?,
                                row.get::<_, String>(3)?,
                                row.get::<_, u64>(4)?,
                                row.get::<_, String>(5)?,
                                row.get::<_, String>(6)?,
                                row.get::<_, u32>(7)?,
                            ),
                            (
                                row.get::<_, u32>(8)?,
                                row.get::<_, Option<String>>(9)?,
                                row.get::<_, Option<Millis>>(10)?,
                                row.get::<_, Option<Millis>>(11)?,
                                row.get::<_, Option<String>>(12)?,
                                row.get::<_, Option<String>>(13)?,
                                row.get::<_, bool>(14)?,
                            ),
                        ))
                    },
                )
                .optional()?)
        })?;
        let Some((
            (kind, group, variant, fingerprint, items, payload, state, attempt),
            (tries, worker, lease_deadline_ms, retry_at_ms, last_error, result, superseded),
        )) = row
        else {
            return Err(QueueError::NoSuchJob {
                path: self.path.clone(),
                job_id,
            });
        };
        let state = parse_state(
            &self.path,
            &state,
            worker,
            attempt,
            lease_deadline_ms,
            retry_at_ms,
            last_error,
        )?;
        let result = match result {
            None => None,
            Some(text) => Some(
                serde_json::from_str(&text).map_err(|err| QueueError::Corrupt {
                    path: self.path.clone(),
                    message: format!("job {job_id} result: {err}"),
                })?,
            ),
        };
        Ok(JobRecord {
            id: job_id,
            kind,
            group,
            variant,
            fingerprint,
            items,
            payload,
            state,
            attempt,
            tries,
            result,
            superseded,
        })
    }

    fn status(&self, group: Option<&str>) -> Result<QueueStatus, QueueError> {
        self.read(|tx, now| {
            let mut groups: Vec<GroupStatus> = Vec::new();
            {
                let mut statement = tx.prepare_cached(
                    "SELECT grp, variant, fingerprint, state, COUNT(*), SUM(items),
                         SUM(failed_items),
                         SUM(state = 'running' AND lease_deadline_ms <= ?1)
                     FROM jobs WHERE superseded = 0 AND (?2 IS NULL OR grp = ?2)
                     GROUP BY grp, variant, fingerprint, state
                     ORDER BY grp, variant, fingerprint",
                )?;
                let mut rows = statement.query(rusqlite::params![now, group])?;
                while let Some(row) = rows.next()? {
                    let key: (String, String, String) = (row.get(0)?, row.get(1)?, row.get(2)?);
                    let state: String = row.get(3)?;
                    let count: u64 = row.get(4)?;
                    let items: u64 = row.get(5)?;
                    let failed_items: u64 = row.get(6)?;
                    let expired: u64 = row.get(7)?;
                    let same = groups.last().is_some_and(|g| {
                        (&g.group, &g.variant, &g.fingerprint) == (&key.0, &key.1, &key.2)
                    });
                    if !same {
                        groups.push(GroupStatus {
                            group: key.0,
                            variant: key.1,
                            fingerprint: key.2,
                            jobs: StateCounts::default(),
                            items: ItemCounts::default(),
                            expired_leases: 0,
                            throughput: Default::default(),
                        });
                    }
                    let entry = groups.last_mut().expect("pushed above");
                    entry.items.total += items;
                    match state.as_str() {
                        "pending" => entry.jobs.pending += count,
                        "running" => entry.jobs.running += count,
                        "done" => {
                            entry.jobs.done += count;
                            entry.items.done += items.saturating_sub(failed_items);
                            entry.items.failed += failed_items;
                        }
                        "failed" => entry.jobs.failed += count,
                        "dead" => entry.jobs.dead += count,
                        other => {
                            return Err(Fail::Queue(QueueError::Corrupt {
                                path: self.path.clone(),
                                message: format!("unknown job state '{other}'"),
                            }));
                        }
                    }
                    entry.expired_leases += expired;
                }
            }
            let remaining = |jobs: &StateCounts, items: &ItemCounts| {
                let jobs_left = jobs.pending + jobs.running + jobs.failed;
                let items_left = items
                    .total
                    .saturating_sub(items.done + items.failed)
                    .min(items.total);
                (jobs_left, items_left)
            };
            let recent_in_group = |g: &GroupStatus| -> Result<Vec<(Millis, u64)>, Fail> {
                let mut statement = tx.prepare_cached(
                    "SELECT finished_at_ms, items FROM jobs
                     WHERE superseded = 0 AND state = 'done'
                         AND grp = ?1 AND variant = ?2 AND fingerprint = ?3
                     ORDER BY finished_at_ms DESC LIMIT ?4",
                )?;
                let rows = statement.query_map(
                    rusqlite::params![g.group, g.variant, g.fingerprint, THROUGHPUT_WINDOW],
                    |row| Ok((row.get(0)?, row.get(1)?)),
                )?;
                Ok(rows.collect::<Result<Vec<_>, _>>()?)
            };
            for entry in &mut groups {
                let recent = recent_in_group(entry)?;
                let (jobs_left, items_left) = remaining(&entry.jobs, &entry.items);
                entry.throughput = throughput(&recent, jobs_left, items_left);
            }
            let recent_all: Vec<(Millis, u64)> = {
                let mut statement = tx.prepare_cached(
                    "SELECT finished_at_ms, items FROM jobs
                     WHERE superseded = 0 AND state = 'done' AND (?1 IS NULL OR grp = ?1)
                     ORDER BY finished_at_ms DESC LIMIT ?2",
                )?;
                let rows = statement
                    .query_map(rusqlite::params![group, THROUGHPUT_WINDOW], |row| {
                        Ok((row.get(0)?, row.get(1)?))
                    })?;
                rows.collect::<Result<Vec<_>, _>>()?
            };
            let mut jobs_total = StateCounts::default();
            let mut items_total = ItemCounts::default();
            for entry in &groups {
                jobs_total.add(&entry.jobs);
                items_total.add(&entry.items);
            }
            let (jobs_left, items_left) = remaining(&jobs_total, &items_total);
            let overall = throughput(&recent_all, jobs_left, items_left);

            let failed_items = {
                let mut statement = tx.prepare_cached(
                    "SELECT f.job_id, j.grp, j.variant, f.item, f.reason
                     FROM item_failures f JOIN jobs j ON j.id = f.job_id
                     WHERE j.superseded = 0 AND j.state = 'done' AND (?1 IS NULL OR j.grp = ?1)
                     ORDER BY f.job_id, f.rowid LIMIT ?2",
                )?;
                let rows = statement.query_map(rusqlite::params![group, LIST_LIMIT], |row| {
                    Ok(FailedItem {
                        job_id: row.get(0)?,
                        group: row.get(1)?,
                        variant: row.get(2)?,
                        item: row.get(3)?,
                        reason: row.get(4)?,
                    })
                })?;
                rows.collect::<Result<Vec<_>, _>>()?
            };
            let problems = |state: &'static str| -> Result<Vec<JobProblem>, Fail> {
                let mut statement = tx.prepare_cached(
                    "SELECT id, grp, variant, tries, last_error, retry_at_ms FROM jobs
                     WHERE superseded = 0 AND state = ?1 AND (?2 IS NULL OR grp = ?2)
                     ORDER BY id LIMIT ?3",
                )?;
                let rows =
                    statement.query_map(rusqlite::params![state, group, LIST_LIMIT], |row| {
                        Ok(JobProblem {
                            job_id: row.get(0)?,
                            group: row.get(1)?,
                            variant: row.get(2)?,
                            state,
                            tries: row.get(3)?,
                            last_error: row.get::<_, Option<String>>(4)?.unwrap_or_default(),
                            retry_at_ms: row.get(5)?,
                        })
                    })?;
                Ok(rows.collect::<Result<Vec<_>, _>>()?)
            };
            let failed_jobs = problems("failed")?;
            let mut dead_jobs = problems("dead")?;
            for job in &mut dead_jobs {
                job.retry_at_ms = None;
            }
            Ok(QueueStatus {
                now_ms: now,
                groups: std::mem::take(&mut groups),
                throughput: overall,
                failed_items,
                failed_jobs,
                dead_jobs,
            })
        })
    }
}

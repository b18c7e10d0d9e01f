//! The SQLite queue backend: one file (jobs/queue.db) shared by any number of
//! worker, enqueue and status processes. Only its SQL lives here: opening,
//! WAL, busy retries and the schema version are [`crate::sqlite`]'s, and
//! every decision about states is [`super::state`]'s.
//!
//! - Every write is a `BEGIN IMMEDIATE` transaction, so two workers can never
//!   read the same pending row and both claim it: the write lock is taken
//!   before the read.
//! - The schema version lives in `PRAGMA user_version`. A file that is not
//!   SQLite, or has a newer schema, is left byte for byte untouched.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rusqlite::{OptionalExtension, ToSql, Transaction};

use super::state::{
    self, AfterFailure, Holder, LIST_LIMIT, StateCountRow, StatusReader, StoredJob, StoredState,
    THROUGHPUT_WINDOW,
};
use super::{
    Clock, DoneJob, EnqueueReport, FailedItem, GroupStatus, JobProblem, JobRecord, JobResult,
    JobState, KindBacklog, Lease, LiveJob, Millis, NewJob, PlanReport, Planner, Queue, QueueError,
    QueueStatus, RequeueFilter, RetryPolicy, SystemClock,
};
use crate::sqlite::{Database, Schema, TxError, VersionStore};

pub use crate::sqlite::BUSY_GIVE_UP;

/// The schema version this binary creates and understands.
pub const SCHEMA_VERSION: i64 = 1;

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

const SCHEMA: Schema = Schema {
    version_store: VersionStore::UserVersion,
    migrations: &[SCHEMA_V1],
    foreign_keys: false,
};

/// Failure inside a transaction: SQLite (maybe busy, then retried) or a queue verdict.
type Fail = TxError<QueueError>;

crate::sqlite::sqlite_owner_error!(QueueError);

/// A queue in one SQLite file.
pub struct SqliteQueue {
    db: Database,
    clock: Arc<dyn Clock>,
    policy: RetryPolicy,
}

impl std::fmt::Debug for SqliteQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteQueue")
            .field("path", &self.db.path())
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
        Ok(Self {
            db: Database::open(path, &SCHEMA)?,
            clock,
            policy,
        })
    }

    pub fn path(&self) -> &Path {
        self.db.path()
    }

    pub fn policy(&self) -> RetryPolicy {
        self.policy
    }

    /// Runs `op` in a `BEGIN IMMEDIATE` transaction with the current time;
    /// commits on `Ok`, rolls back on `Err`; busy is retried.
    fn write<T>(
        &self,
        mut op: impl FnMut(&Transaction<'_>, Millis) -> Result<T, Fail>,
    ) -> Result<T, QueueError> {
        self.db.write(|tx| op(tx, self.clock.now_ms()))
    }

    /// Runs `op` in a read transaction (one consistent snapshot); busy is retried.
    fn read<T>(
        &self,
        mut op: impl FnMut(&Transaction<'_>, Millis) -> Result<T, Fail>,
    ) -> Result<T, QueueError> {
        self.db.read(|tx| op(tx, self.clock.now_ms()))
    }

    /// Why an attempt no longer holds a job, for [`QueueError::LeaseLost`].
    fn lease_lost(&self, tx: &Transaction<'_>, job_id: i64, attempt: u32) -> Fail {
        let row = tx
            .query_row(
                "SELECT state, attempt, worker, superseded FROM jobs WHERE id = ?1",
                [job_id],
                |row| {
                    Ok(Holder {
                        state: row.get(0)?,
                        attempt: row.get(1)?,
                        worker: row.get(2)?,
                        superseded: row.get(3)?,
                    })
                },
            )
            .optional();
        match row {
            Err(err) => TxError::Sql(err),
            Ok(now) => state::lease_lost(self.path(), job_id, attempt, now).into(),
        }
    }

    /// Inserts jobs as pending, skipping those whose dedup key is live.
    fn insert_jobs(
        tx: &Transaction<'_>,
        now: Millis,
        jobs: &[NewJob],
    ) -> Result<EnqueueReport, Fail> {
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
            report.count(added == 1);
        }
        Ok(report)
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
        let result_json = state::result_json(result)?;
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

impl Queue for SqliteQueue {
    fn location(&self) -> String {
        self.path().display().to_string()
    }

    fn enqueue(&self, jobs: &[NewJob]) -> Result<EnqueueReport, QueueError> {
        self.write(|tx, now| Self::insert_jobs(tx, now, jobs))
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
            let decided = state::decide(plan, &live, self.path())?;
            let mut superseded = 0;
            let mut retire = tx.prepare_cached(
                "UPDATE jobs SET superseded = 1
                 WHERE id = ?1 AND superseded = 0 AND fingerprint = ?2",
            )?;
            for id in &decided.supersede {
                superseded += retire.execute(rusqlite::params![id, fingerprint])? as u64;
            }
            let inserted = Self::insert_jobs(tx, now, &decided.jobs)?;
            Ok(PlanReport {
                superseded,
                added: inserted.added,
                skipped: inserted.skipped,
            })
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
            let next = self.policy.after_failure(tries, now);
            match next {
                AfterFailure::Dead => tx.execute(
                    "UPDATE jobs SET state = 'dead', lease_deadline_ms = NULL, last_error = ?2,
                         finished_at_ms = ?3
                     WHERE id = ?1",
                    rusqlite::params![job_id, error, now],
                )?,
                AfterFailure::Retry { retry_at_ms } => tx.execute(
                    "UPDATE jobs SET state = 'failed', lease_deadline_ms = NULL, last_error = ?2,
                         retry_at_ms = ?3
                     WHERE id = ?1",
                    rusqlite::params![job_id, error, retry_at_ms],
                )?,
            };
            Ok(next.into_state(error))
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
        let stored = self.read(|tx, _| {
            Ok(tx
                .query_row(
                    "SELECT kind, grp, variant, fingerprint, items, payload, state, attempt,
                         tries, worker, lease_deadline_ms, retry_at_ms, last_error, result,
                         superseded
                     FROM jobs WHERE id = ?1",
                    [job_id],
                    |row| {
                        Ok(StoredJob {
                            id: job_id,
                            kind: row.get(0)?,
                            group: row.get(1)?,
                            variant: row.get(2)?,
                            fingerprint: row.get(3)?,
                            items: row.get(4)?,
                            payload: row.get(5)?,
                            state: StoredState {
                                name: row.get(6)?,
                                attempt: row.get(7)?,
                                worker: row.get(9)?,
                                lease_deadline_ms: row.get(10)?,
                                retry_at_ms: row.get(11)?,
                                last_error: row.get(12)?,
                            },
                            tries: row.get(8)?,
                            result: row.get(13)?,
                            superseded: row.get(14)?,
                        })
                    },
                )
                .optional()?)
        })?;
        let Some(stored) = stored else {
            return Err(QueueError::NoSuchJob {
                path: self.path().to_path_buf(),
                job_id,
            });
        };
        stored.into_record(self.path())
    }

    fn status(&self, group: Option<&str>) -> Result<QueueStatus, QueueError> {
        self.read(|tx, now| {
            let mut reader = Status { tx, group };
            state::read_status(&mut reader, now, self.path())
        })
    }
}

/// What status reads, in one read transaction, for one group or all.
struct Status<'a, 'tx> {
    tx: &'a Transaction<'tx>,
    group: Option<&'a str>,
}

impl StatusReader for Status<'_, '_> {
    type Error = Fail;

    fn state_counts(&mut self, now: Millis) -> Result<Vec<StateCountRow>, Fail> {
        let mut statement = self.tx.prepare_cached(
            "SELECT grp, variant, fingerprint, state, COUNT(*), SUM(items),
                 SUM(failed_items),
                 SUM(state = 'running' AND lease_deadline_ms <= ?1)
             FROM jobs WHERE superseded = 0 AND (?2 IS NULL OR grp = ?2)
             GROUP BY grp, variant, fingerprint, state
             ORDER BY grp, variant, fingerprint",
        )?;
        let rows = statement.query_map(rusqlite::params![now, self.group], |row| {
            Ok(StateCountRow {
                group: row.get(0)?,
                variant: row.get(1)?,
                fingerprint: row.get(2)?,
                state: row.get(3)?,
                jobs: row.get(4)?,
                items: row.get(5)?,
                failed_items: row.get(6)?,
                expired_leases: row.get(7)?,
            })
        })?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }

    fn recent_completions(&mut self, of: Option<&GroupStatus>) -> Result<Vec<(Millis, u64)>, Fail> {
        let pair = |row: &rusqlite::Row<'_>| -> rusqlite::Result<(Millis, u64)> {
            Ok((row.get(0)?, row.get(1)?))
        };
        let rows = match of {
            Some(g) => self
                .tx
                .prepare_cached(
                    "SELECT finished_at_ms, items FROM jobs
                     WHERE superseded = 0 AND state = 'done'
                         AND grp = ?1 AND variant = ?2 AND fingerprint = ?3
                     ORDER BY finished_at_ms DESC LIMIT ?4",
                )?
                .query_map(
                    rusqlite::params![g.group, g.variant, g.fingerprint, THROUGHPUT_WINDOW],
                    pair,
                )?
                .collect::<Result<Vec<_>, _>>()?,
            None => self
                .tx
                .prepare_cached(
                    "SELECT finished_at_ms, items FROM jobs
                     WHERE superseded = 0 AND state = 'done' AND (?1 IS NULL OR grp = ?1)
                     ORDER BY finished_at_ms DESC LIMIT ?2",
                )?
                .query_map(rusqlite::params![self.group, THROUGHPUT_WINDOW], pair)?
                .collect::<Result<Vec<_>, _>>()?,
        };
        Ok(rows)
    }

    fn failed_items(&mut self) -> Result<Vec<FailedItem>, Fail> {
        let mut statement = self.tx.prepare_cached(
            "SELECT f.job_id, j.grp, j.variant, f.item, f.reason
             FROM item_failures f JOIN jobs j ON j.id = f.job_id
             WHERE j.superseded = 0 AND j.state = 'done' AND (?1 IS NULL OR j.grp = ?1)
             ORDER BY f.job_id, f.rowid LIMIT ?2",
        )?;
        let rows = statement.query_map(rusqlite::params![self.group, LIST_LIMIT], |row| {
            Ok(FailedItem {
                job_id: row.get(0)?,
                group: row.get(1)?,
                variant: row.get(2)?,
                item: row.get(3)?,
                reason: row.get(4)?,
            })
        })?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }

    fn problems(&mut self, state: &'static str) -> Result<Vec<JobProblem>, Fail> {
        let mut statement = self.tx.prepare_cached(
            "SELECT id, grp, variant, tries, last_error, retry_at_ms FROM jobs
             WHERE superseded = 0 AND state = ?1 AND (?2 IS NULL OR grp = ?2)
             ORDER BY id LIMIT ?3",
        )?;
        let rows =
            statement.query_map(rusqlite::params![state, self.group, LIST_LIMIT], |row| {
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
    }
}

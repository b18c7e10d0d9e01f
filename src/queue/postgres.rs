//! The PostgreSQL queue backend: one database shared by workers on many
//! machines, with the same semantics as the SQLite backend.
//!
//! - Claims lock their candidate row with `FOR UPDATE SKIP LOCKED` inside the
//!   claim's transaction (READ COMMITTED), so concurrent workers never wait on
//!   each other's candidates and never claim the same row twice.
//! - Every transition is one transaction whose fenced `UPDATE ... WHERE id AND
//!   attempt AND state = 'running'` is atomic under row locks: a claim that
//!   moved the job on makes a late heartbeat or completion change no row.
//! - Time comes from the queue's [`Clock`] in Rust and is passed as a
//!   parameter (never `now()`), so all backends agree and tests can move it.
//! - The schema version lives in the table `lazarus_queue_schema`. It is read
//!   before anything is written; a newer version is refused untouched.
//!   Migrations run under a transaction-scoped advisory lock, so workers that
//!   start together on an empty database create the schema once.
//! - The tables live in the first schema of the connection's `search_path`;
//!   `?options=-c%20search_path%3DNAME` in the URL puts a queue in its own
//!   schema (tests use one each).
//! - Serialization failures and deadlocks are retried; a dropped connection is
//!   reopened on the next call.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use postgres::error::SqlState;
use postgres::types::ToSql;
use postgres::{Client, Config, IsolationLevel, NoTls, Row, Statement, Transaction};

use super::state::{
    self, AfterFailure, Holder, LIST_LIMIT, StateCountRow, StatusReader, StoredJob, StoredState,
    THROUGHPUT_WINDOW,
};
use super::{
    Clock, DoneJob, EnqueueReport, FailedItem, GroupStatus, JobProblem, JobRecord, JobResult,
    JobState, KindBacklog, Lease, LiveJob, Millis, NewJob, PlanReport, Planner, Queue, QueueError,
    QueueStatus, RequeueFilter, RetryPolicy, SystemClock,
};

/// The schema version this binary creates and understands.
pub const SCHEMA_VERSION: i32 = 1;

/// How long serialization failures and deadlocks are retried.
const RETRY_GIVE_UP: Duration = Duration::from_secs(120);

/// Used when the URL sets no `connect_timeout`.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Advisory lock key that serialises migrations ("lazarus" in ASCII).
const MIGRATION_LOCK: i64 = 0x6c_617a_6172_7573;

/// The advisory lock `plan_and_enqueue` takes for one fingerprint: the
/// first 8 bytes of a sha256 of it, in their own namespace.
fn plan_lock(fingerprint: &str) -> i64 {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(format!("lazarus plan {fingerprint}").as_bytes());
    i64::from_le_bytes(digest[..8].try_into().expect("8 bytes"))
}

const SCHEMA_V1: &str = "
CREATE TABLE jobs (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, -- ids are never reused
    kind TEXT NOT NULL,
    grp TEXT NOT NULL,
    variant TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    dedup_key TEXT NOT NULL,
    items BIGINT NOT NULL,
    payload TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('pending', 'running', 'done', 'failed', 'dead')),
    attempt INTEGER NOT NULL DEFAULT 0,
    tries INTEGER NOT NULL DEFAULT 0,
    worker TEXT,
    lease_deadline_ms BIGINT,
    retry_at_ms BIGINT,
    last_error TEXT,
    result TEXT,
    failed_items BIGINT NOT NULL DEFAULT 0,
    enqueued_at_ms BIGINT NOT NULL,
    finished_at_ms BIGINT,
    superseded BOOLEAN NOT NULL DEFAULT FALSE
);
CREATE UNIQUE INDEX jobs_live_dedup ON jobs (dedup_key) WHERE NOT superseded;
CREATE INDEX jobs_claim ON jobs (state, kind, id) WHERE NOT superseded;
CREATE INDEX jobs_lease ON jobs (state, lease_deadline_ms) WHERE NOT superseded;
CREATE INDEX jobs_retry ON jobs (state, retry_at_ms) WHERE NOT superseded;
CREATE INDEX jobs_group ON jobs (grp, variant, fingerprint) WHERE NOT superseded;
CREATE INDEX jobs_finished ON jobs (finished_at_ms) WHERE state = 'done' AND NOT superseded;
CREATE TABLE item_failures (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    job_id BIGINT NOT NULL REFERENCES jobs (id),
    item TEXT NOT NULL,
    reason TEXT NOT NULL
);
CREATE INDEX item_failures_job ON item_failures (job_id);
";

/// Failure inside a transaction: PostgreSQL (maybe retried) or a queue verdict.
enum Fail {
    Sql(postgres::Error),
    Queue(QueueError),
}

impl From<postgres::Error> for Fail {
    fn from(err: postgres::Error) -> Self {
        Fail::Sql(err)
    }
}

impl From<QueueError> for Fail {
    fn from(err: QueueError) -> Self {
        Fail::Queue(err)
    }
}

fn is_transient(err: &postgres::Error) -> bool {
    matches!(
        err.code(),
        Some(code) if *code == SqlState::T_R_SERIALIZATION_FAILURE
            || *code == SqlState::T_R_DEADLOCK_DETECTED
    )
}

/// The URL with its password replaced, for messages and status output.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let (authority, tail) = match rest.find(['/', '?']) {
        Some(at) => rest.split_at(at),
        None => (rest, ""),
    };
    let tail = redact_password_parameter(tail);
    match authority.rsplit_once('@') {
        Some((credentials, host)) => {
            let user = match credentials.split_once(':') {
                Some((user, _)) => format!("{user}:***"),
                None => credentials.to_string(),
            };
            format!("{scheme}://{user}@{host}{tail}")
        }
        None => format!("{scheme}://{authority}{tail}"),
    }
}

/// Hides a `password=` query parameter.
fn redact_password_parameter(tail: &str) -> String {
    let Some((path, query)) = tail.split_once('?') else {
        return tail.to_string();
    };
    let query: Vec<String> = query
        .split('&')
        .map(|pair| {
            if pair.starts_with("password=") {
                "password=***".to_string()
            } else {
                pair.to_string()
            }
        })
        .collect();
    format!("{path}?{}", query.join("&"))
}

/// A connection and the statements prepared on it: each is parsed and
/// planned once per connection, not once per call (half the round trips).
struct Session {
    client: Client,
    statements: HashMap<&'static str, Statement>,
}

/// A transaction whose queries go through the session's prepared statements.
struct Tx<'a> {
    inner: Transaction<'a>,
    statements: &'a mut HashMap<&'static str, Statement>,
}

impl Tx<'_> {
    fn statement(&mut self, sql: &'static str) -> Result<Statement, postgres::Error> {
        if let Some(statement) = self.statements.get(sql) {
            return Ok(statement.clone());
        }
        let statement = self.inner.prepare(sql)?;
        self.statements.insert(sql, statement.clone());
        Ok(statement)
    }

    fn query(
        &mut self,
        sql: &'static str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, postgres::Error> {
        let statement = self.statement(sql)?;
        self.inner.query(&statement, params)
    }

    fn query_opt(
        &mut self,
        sql: &'static str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<Row>, postgres::Error> {
        let statement = self.statement(sql)?;
        self.inner.query_opt(&statement, params)
    }

    fn query_one(
        &mut self,
        sql: &'static str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Row, postgres::Error> {
        let statement = self.statement(sql)?;
        self.inner.query_one(&statement, params)
    }

    fn execute(
        &mut self,
        sql: &'static str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<u64, postgres::Error> {
        let statement = self.statement(sql)?;
        self.inner.execute(&statement, params)
    }

    /// Unprepared: for migrations, whose tables may not exist yet.
    fn batch_execute(&mut self, sql: &str) -> Result<(), postgres::Error> {
        self.inner.batch_execute(sql)
    }
}

/// A queue in a PostgreSQL database.
pub struct PostgresQueue {
    /// The URL without its password: how messages name this queue.
    name: String,
    config: Config,
    session: Mutex<Session>,
    clock: Arc<dyn Clock>,
    policy: RetryPolicy,
}

impl std::fmt::Debug for PostgresQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresQueue")
            .field("url", &self.name)
            .field("policy", &self.policy)
            .finish()
    }
}

impl PostgresQueue {
    /// Opens (creating the schema if absent) the queue at `url` with the system clock.
    pub fn open(url: &str) -> Result<Self, QueueError> {
        Self::open_with(url, Arc::new(SystemClock), RetryPolicy::default())
    }

    /// Opens the queue only if its schema exists; `Ok(None)` otherwise.
    /// Used by read-only verbs so that they create nothing.
    pub fn open_existing(url: &str) -> Result<Option<Self>, QueueError> {
        let queue = Self::connect(url, Arc::new(SystemClock), RetryPolicy::default())?;
        match queue.schema_version()? {
            None => Ok(None),
            Some(version) => {
                queue.check_version(version)?;
                Ok(Some(queue))
            }
        }
    }

    /// Opens (creating the schema if absent) the queue at `url` with a clock and retry policy.
    pub fn open_with(
        url: &str,
        clock: Arc<dyn Clock>,
        policy: RetryPolicy,
    ) -> Result<Self, QueueError> {
        let queue = Self::connect(url, clock, policy)?;
        // Validate before writing anything.
        if let Some(version) = queue.schema_version()? {
            queue.check_version(version)?;
            if version == SCHEMA_VERSION {
                return Ok(queue);
            }
        }
        queue.transact(IsolationLevel::ReadCommitted, |tx, _| {
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])?;
            // Another process may have migrated while we waited for the lock.
            let version = read_version(tx)?;
            if let Some(found) = version.filter(|v| *v > SCHEMA_VERSION) {
                return Err(Fail::Queue(queue.newer_schema(found)));
            }
            if version.is_none() {
                tx.batch_execute(SCHEMA_V1)?;
                tx.batch_execute(
                    "CREATE TABLE lazarus_queue_schema (version INTEGER NOT NULL);
                     INSERT INTO lazarus_queue_schema (version) VALUES (1);",
                )?;
            }
            Ok(())
        })?;
        Ok(queue)
    }

    fn connect(url: &str, clock: Arc<dyn Clock>, policy: RetryPolicy) -> Result<Self, QueueError> {
        let name = redact_url(url);
        let mut config: Config = url.parse().map_err(|err| {
            QueueError::Invalid(format!("{name}: not a PostgreSQL connection URL: {err}"))
        })?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        if config.get_application_name().is_none() {
            config.application_name("lazarus");
        }
        let client = config.connect(NoTls).map_err(|err| QueueError::Postgres {
            queue: name.clone(),
            message: describe(&err),
        })?;
        Ok(Self {
            name,
            config,
            session: Mutex::new(Session {
                client,
                statements: HashMap::new(),
            }),
            clock,
            policy,
        })
    }

    /// The URL without its password.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn policy(&self) -> RetryPolicy {
        self.policy
    }

    fn schema_version(&self) -> Result<Option<i32>, QueueError> {
        self.transact(IsolationLevel::ReadCommitted, |tx, _| read_version(tx))
    }

    fn newer_schema(&self, found: i32) -> QueueError {
        QueueError::NewerSchema {
            path: self.name.clone().into(),
            found: found.into(),
            supported: SCHEMA_VERSION.into(),
        }
    }

    fn check_version(&self, version: i32) -> Result<(), QueueError> {
        if version > SCHEMA_VERSION {
            Err(self.newer_schema(version))
        } else {
            Ok(())
        }
    }

    /// The connection, reopened if the server dropped it.
    fn lock(&self) -> Result<MutexGuard<'_, Session>, QueueError> {
        // A panic while holding the session leaves no open transaction (the
        // transaction rolls back on drop), so a poisoned lock is still usable.
        let mut session = self
            .session
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if session.client.is_closed() {
            session.client = self
                .config
                .connect(NoTls)
                .map_err(|err| QueueError::Postgres {
                    queue: self.name.clone(),
                    message: describe(&err),
                })?;
            session.statements.clear();
        }
        Ok(session)
    }

    fn to_error(&self, fail: Fail) -> QueueError {
        match fail {
            Fail::Queue(err) => err,
            Fail::Sql(err) => QueueError::Postgres {
                queue: self.name.clone(),
                message: describe(&err),
            },
        }
    }

    /// Runs `op` in one transaction with the current time; commits on `Ok`,
    /// rolls back on `Err`; serialization failures and deadlocks are retried.
    fn transact<T>(
        &self,
        isolation: IsolationLevel,
        mut op: impl FnMut(&mut Tx<'_>, Millis) -> Result<T, Fail>,
    ) -> Result<T, QueueError> {
        let mut session = self.lock()?;
        let started = Instant::now();
        let mut delay = Duration::from_millis(1);
        loop {
            let attempt = (|| {
                let Session { client, statements } = &mut *session;
                let inner = client
                    .build_transaction()
                    .isolation_level(isolation)
                    .start()?;
                let mut tx = Tx { inner, statements };
                let value = op(&mut tx, self.clock.now_ms())?;
                tx.inner.commit()?;
                Ok(value)
            })();
            match attempt {
                Ok(value) => return Ok(value),
                Err(Fail::Sql(err)) if is_transient(&err) && started.elapsed() < RETRY_GIVE_UP => {
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(Duration::from_millis(100));
                }
                Err(fail) => return Err(self.to_error(fail)),
            }
        }
    }

    fn write<T>(
        &self,
        op: impl FnMut(&mut Tx<'_>, Millis) -> Result<T, Fail>,
    ) -> Result<T, QueueError> {
        self.transact(IsolationLevel::ReadCommitted, op)
    }

    /// One consistent snapshot for multi-statement reads.
    fn read<T>(
        &self,
        op: impl FnMut(&mut Tx<'_>, Millis) -> Result<T, Fail>,
    ) -> Result<T, QueueError> {
        self.transact(IsolationLevel::RepeatableRead, op)
    }

    /// Why an attempt no longer holds a job, for [`QueueError::LeaseLost`].
    fn lease_lost(&self, tx: &mut Tx<'_>, job_id: i64, attempt: u32) -> Fail {
        let row = tx.query_opt(
            "SELECT state, attempt, worker, superseded FROM jobs WHERE id = $1",
            &[&job_id],
        );
        match row {
            Err(err) => Fail::Sql(err),
            Ok(row) => {
                let now = row.map(|row| Holder {
                    state: row.get(0),
                    attempt: row.get::<_, i32>(1) as u32,
                    worker: row.get(2),
                    superseded: row.get(3),
                });
                state::lease_lost(self.location_path(), job_id, attempt, now).into()
            }
        }
    }

    /// How errors name this queue: its URL without the password.
    fn location_path(&self) -> &Path {
        Path::new(&self.name)
    }

    /// Inserts jobs as pending, skipping those whose dedup key is live.
    fn insert_jobs(tx: &mut Tx<'_>, now: Millis, jobs: &[NewJob]) -> Result<EnqueueReport, Fail> {
        let mut report = EnqueueReport::default();
        for job in jobs {
            let added = tx.execute(
                "INSERT INTO jobs (kind, grp, variant, fingerprint, dedup_key, items, payload,
                     state, enqueued_at_ms)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, 'pending', $8)
                 ON CONFLICT (dedup_key) WHERE NOT superseded DO NOTHING",
                &[
                    &job.kind,
                    &job.group,
                    &job.variant,
                    &job.fingerprint,
                    &job.dedup_key,
                    &(job.items as i64),
                    &job.payload,
                    &now,
                ],
            )?;
            report.count(added == 1);
        }
        Ok(report)
    }

    fn claim_in(
        &self,
        tx: &mut Tx<'_>,
        now: Millis,
        worker: &str,
        kinds: &[&str],
        lease: Duration,
    ) -> Result<Option<Lease>, Fail> {
        if kinds.is_empty() {
            return Ok(None);
        }
        // Jobs whose workers keep dying must not be claimed forever.
        tx.execute(
            "UPDATE jobs SET state = 'dead', worker = NULL, lease_deadline_ms = NULL,
                 finished_at_ms = $1,
                 last_error = 'lease expired: the worker died or stalled ' || tries || ' times'
             WHERE id IN (
                 SELECT id FROM jobs
                 WHERE NOT superseded AND state = 'running' AND lease_deadline_ms <= $1
                     AND tries >= $2
                 FOR UPDATE SKIP LOCKED)",
            &[&now, &(self.policy.max_attempts as i32)],
        )?;
        let kinds: Vec<&str> = kinds.to_vec();
        let mut found: Option<i64> = None;
        let expired = tx.query_opt(
            "SELECT id FROM jobs WHERE NOT superseded AND state = 'running'
                 AND lease_deadline_ms <= $1 AND kind = ANY($2)
             ORDER BY lease_deadline_ms, id LIMIT 1 FOR UPDATE SKIP LOCKED",
            &[&now, &kinds],
        )?;
        if let Some(row) = expired {
            found = Some(row.get(0));
        }
        if found.is_none() {
            let retry = tx.query_opt(
                "SELECT id FROM jobs WHERE NOT superseded AND state = 'failed'
                     AND retry_at_ms <= $1 AND kind = ANY($2)
                 ORDER BY retry_at_ms, id LIMIT 1 FOR UPDATE SKIP LOCKED",
                &[&now, &kinds],
            )?;
            found = retry.map(|row| row.get(0));
        }
        if found.is_none() {
            let pending = tx.query_opt(
                "SELECT id FROM jobs WHERE NOT superseded AND state = 'pending'
                     AND kind = ANY($1)
                 ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED",
                &[&kinds],
            )?;
            found = pending.map(|row| row.get(0));
        }
        let Some(job_id) = found else {
            return Ok(None);
        };
        let deadline = now.saturating_add(lease.as_millis() as Millis);
        let row = tx.query_one(
            "UPDATE jobs SET state = 'running', attempt = attempt + 1, tries = tries + 1,
                 worker = $2, lease_deadline_ms = $3, retry_at_ms = NULL
             WHERE id = $1
             RETURNING attempt, kind, grp, variant, fingerprint, items, payload",
            &[&job_id, &worker, &deadline],
        )?;
        Ok(Some(Lease {
            job_id,
            attempt: row.get::<_, i32>(0) as u32,
            worker: worker.to_string(),
            lease_deadline_ms: deadline,
            kind: row.get(1),
            group: row.get(2),
            variant: row.get(3),
            fingerprint: row.get(4),
            items: row.get::<_, i64>(5) as u64,
            payload: row.get(6),
        }))
    }

    fn complete_in(
        &self,
        tx: &mut Tx<'_>,
        now: Millis,
        job_id: i64,
        attempt: u32,
        result: &JobResult,
    ) -> Result<(), Fail> {
        let result_json = state::result_json(result)?;
        let changed = tx.execute(
            "UPDATE jobs SET state = 'done', lease_deadline_ms = NULL, result = $3,
                 failed_items = $4, finished_at_ms = $5, last_error = NULL
             WHERE id = $1 AND attempt = $2 AND state = 'running' AND NOT superseded",
            &[
                &job_id,
                &(attempt as i32),
                &result_json,
                &(result.failures.len() as i64),
                &now,
            ],
        )?;
        if changed == 0 {
            return Err(self.lease_lost(tx, job_id, attempt));
        }
        if !result.failures.is_empty() {
            let items: Vec<&str> = result.failures.iter().map(|f| f.item.as_str()).collect();
            let reasons: Vec<&str> = result.failures.iter().map(|f| f.reason.as_str()).collect();
            // unnest keeps the order, so ids follow the order of the failures.
            tx.execute(
                "INSERT INTO item_failures (job_id, item, reason)
                 SELECT $1, item, reason FROM unnest($2::TEXT[], $3::TEXT[])
                     WITH ORDINALITY AS f (item, reason, position)
                 ORDER BY position",
                &[&job_id, &items, &reasons],
            )?;
        }
        Ok(())
    }
}

/// The schema version, or `None` when the queue tables do not exist yet.
fn read_version(tx: &mut Tx<'_>) -> Result<Option<i32>, Fail> {
    // A catalog query under the statement's snapshot, not `to_regclass`: its
    // catalog cache is not refreshed by the advisory lock, so after waiting
    // for another process's migration it would miss the tables just created.
    let exists: bool = tx
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_tables
                 WHERE schemaname = current_schema() AND tablename = 'lazarus_queue_schema')",
            &[],
        )?
        .get(0);
    if !exists {
        return Ok(None);
    }
    let row = tx.query_opt("SELECT MAX(version) FROM lazarus_queue_schema", &[])?;
    Ok(row.and_then(|row| row.get::<_, Option<i32>>(0)))
}

/// An error with the server's own message, detail and hint when it sent them.
fn describe(err: &postgres::Error) -> String {
    match err.as_db_error() {
        Some(db) => {
            let mut text = format!("{}: {}", db.severity(), db.message());
            if let Some(detail) = db.detail() {
                text.push_str(&format!(" ({detail})"));
            }
            if let Some(hint) = db.hint() {
                text.push_str(&format!("; hint: {hint}"));
            }
            text
        }
        None => {
            let mut text = err.to_string();
            let mut source = std::error::Error::source(err);
            while let Some(cause) = source {
                text.push_str(&format!(": {cause}"));
                source = cause.source();
            }
            text
        }
    }
}

impl Queue for PostgresQueue {
    fn location(&self) -> String {
        self.name.clone()
    }

    fn enqueue(&self, jobs: &[NewJob]) -> Result<EnqueueReport, QueueError> {
        self.write(|tx, now| Self::insert_jobs(tx, now, jobs))
    }

    fn plan_and_enqueue(
        &self,
        fingerprint: &str,
        plan: &mut Planner<'_>,
    ) -> Result<PlanReport, QueueError> {
        let lock = plan_lock(fingerprint);
        self.write(|tx, now| {
            // Planners of one fingerprint take turns; under READ COMMITTED
            // the read below then sees every job the previous one committed.
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&lock])?;
            let live: Vec<LiveJob> = tx
                .query(
                    "SELECT id, grp, variant, state, payload FROM jobs
                     WHERE NOT superseded AND fingerprint = $1
                     ORDER BY id",
                    &[&fingerprint],
                )?
                .iter()
                .map(|row| LiveJob {
                    id: row.get(0),
                    group: row.get(1),
                    variant: row.get(2),
                    state: row.get(3),
                    payload: row.get(4),
                })
                .collect();
            let decided = state::decide(plan, &live, self.location_path())?;
            let superseded = if decided.supersede.is_empty() {
                0
            } else {
                tx.execute(
                    "UPDATE jobs SET superseded = TRUE
                     WHERE id = ANY($1) AND NOT superseded AND fingerprint = $2",
                    &[&decided.supersede, &fingerprint],
                )?
            };
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
            let rows = tx.query(
                "SELECT payload FROM jobs
                 WHERE NOT superseded AND grp = $1 AND variant = $2 AND fingerprint = $3
                 ORDER BY id",
                &[&group, &variant, &fingerprint],
            )?;
            Ok(rows.iter().map(|row| row.get(0)).collect())
        })
    }

    fn done_jobs(&self, kind: &str, group: Option<&str>) -> Result<Vec<DoneJob>, QueueError> {
        self.read(|tx, _| {
            let rows = tx.query(
                "SELECT id, grp, variant, fingerprint, payload, result FROM jobs
                 WHERE NOT superseded AND state = 'done' AND kind = $1
                   AND ($2::TEXT IS NULL OR grp = $2)
                 ORDER BY id",
                &[&kind, &group],
            )?;
            Ok(rows
                .iter()
                .map(|row| DoneJob {
                    id: row.get(0),
                    group: row.get(1),
                    variant: row.get(2),
                    fingerprint: row.get(3),
                    payload: row.get(4),
                    result: row.get(5),
                })
                .collect())
        })
    }

    fn reopen(&self, job_ids: &[i64]) -> Result<u64, QueueError> {
        if job_ids.is_empty() {
            return Ok(0);
        }
        let ids = job_ids.to_vec();
        self.write(|tx, _| {
            Ok(tx.execute(
                "UPDATE jobs SET state = 'pending', tries = 0, retry_at_ms = NULL, worker = NULL,
                     finished_at_ms = NULL, result = NULL
                 WHERE id = ANY($1) AND NOT superseded AND state = 'done'",
                &[&ids],
            )?)
        })
    }

    fn supersede(&self, group: &str, variant: &str, fingerprint: &str) -> Result<u64, QueueError> {
        self.write(|tx, _| {
            Ok(tx.execute(
                "UPDATE jobs SET superseded = TRUE
                 WHERE NOT superseded AND grp = $1 AND variant = $2 AND fingerprint = $3",
                &[&group, &variant, &fingerprint],
            )?)
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
            let changed = tx.execute(
                "UPDATE jobs SET lease_deadline_ms = $3
                 WHERE id = $1 AND attempt = $2 AND state = 'running' AND NOT superseded",
                &[&job_id, &(attempt as i32), &deadline],
            )?;
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
            let row = tx.query_opt(
                "SELECT tries FROM jobs
                 WHERE id = $1 AND attempt = $2 AND state = 'running' AND NOT superseded
                 FOR UPDATE",
                &[&job_id, &(attempt as i32)],
            )?;
            let Some(row) = row else {
                return Err(self.lease_lost(tx, job_id, attempt));
            };
            let tries = row.get::<_, i32>(0) as u32;
            let next = self.policy.after_failure(tries, now);
            match next {
                AfterFailure::Dead => tx.execute(
                    "UPDATE jobs SET state = 'dead', lease_deadline_ms = NULL, last_error = $2,
                         finished_at_ms = $3
                     WHERE id = $1",
                    &[&job_id, &error, &now],
                )?,
                AfterFailure::Retry { retry_at_ms } => tx.execute(
                    "UPDATE jobs SET state = 'failed', lease_deadline_ms = NULL, last_error = $2,
                         retry_at_ms = $3
                     WHERE id = $1",
                    &[&job_id, &error, &retry_at_ms],
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
                 WHERE id = $1 AND attempt = $2 AND state = 'running' AND NOT superseded",
                &[&job_id, &(attempt as i32)],
            )?;
            if changed == 0 {
                return Err(self.lease_lost(tx, job_id, attempt));
            }
            Ok(())
        })
    }

    fn requeue(&self, filter: &RequeueFilter) -> Result<u64, QueueError> {
        let mut states: Vec<&str> = Vec::new();
        if filter.failed {
            states.push("failed");
        }
        if filter.dead {
            states.push("dead");
        }
        if states.is_empty() {
            return Ok(0);
        }
        let group = filter.group.as_deref();
        self.write(|tx, _| {
            Ok(tx.execute(
                "UPDATE jobs SET state = 'pending', tries = 0, retry_at_ms = NULL, worker = NULL,
                     finished_at_ms = NULL
                 WHERE NOT superseded AND state = ANY($1) AND ($2::TEXT IS NULL OR grp = $2)",
                &[&states, &group],
            )?)
        })
    }

    fn backlog_by_kind(&self) -> Result<Vec<KindBacklog>, QueueError> {
        self.read(|tx, now| {
            let rows = tx.query(
                "SELECT kind,
                     COUNT(*) FILTER (WHERE state <> 'running' OR lease_deadline_ms <= $1),
                     COUNT(*) FILTER (WHERE state = 'running' AND lease_deadline_ms > $1)
                 FROM jobs
                 WHERE NOT superseded AND state IN ('pending', 'running', 'failed')
                 GROUP BY kind ORDER BY kind COLLATE \"C\"",
                &[&now],
            )?;
            Ok(rows
                .iter()
                .map(|row| KindBacklog {
                    kind: row.get(0),
                    waiting: row.get::<_, i64>(1) as u64,
                    running: row.get::<_, i64>(2) as u64,
                })
                .collect())
        })
    }

    fn job(&self, job_id: i64) -> Result<JobRecord, QueueError> {
        let row = self.read(|tx, _| {
            Ok(tx.query_opt(
                "SELECT kind, grp, variant, fingerprint, items, payload, state, attempt,
                     tries, worker, lease_deadline_ms, retry_at_ms, last_error, result,
                     superseded
                 FROM jobs WHERE id = $1",
                &[&job_id],
            )?)
        })?;
        let Some(row) = row else {
            return Err(QueueError::NoSuchJob {
                path: self.location_path().to_path_buf(),
                job_id,
            });
        };
        StoredJob {
            id: job_id,
            kind: row.get(0),
            group: row.get(1),
            variant: row.get(2),
            fingerprint: row.get(3),
            items: row.get::<_, i64>(4) as u64,
            payload: row.get(5),
            state: StoredState {
                name: row.get(6),
                attempt: row.get::<_, i32>(7) as u32,
                worker: row.get(9),
                lease_deadline_ms: row.get(10),
                retry_at_ms: row.get(11),
                last_error: row.get(12),
            },
            tries: row.get::<_, i32>(8) as u32,
            result: row.get(13),
            superseded: row.get(14),
        }
        .into_record(self.location_path())
    }

    fn status(&self, group: Option<&str>) -> Result<QueueStatus, QueueError> {
        self.read(|tx, now| {
            let mut reader = Status { tx, group };
            state::read_status(&mut reader, now, self.location_path())
        })
    }
}

/// What status reads, in one snapshot, for one group or all.
struct Status<'a, 'tx> {
    tx: &'a mut Tx<'tx>,
    group: Option<&'a str>,
}

impl StatusReader for Status<'_, '_> {
    type Error = Fail;

    fn state_counts(&mut self, now: Millis) -> Result<Vec<StateCountRow>, Fail> {
        let rows = self.tx.query(
            "SELECT grp, variant, fingerprint, state, COUNT(*), SUM(items)::BIGINT,
                 SUM(failed_items)::BIGINT,
                 COUNT(*) FILTER (WHERE state = 'running' AND lease_deadline_ms <= $1)
             FROM jobs WHERE NOT superseded AND ($2::TEXT IS NULL OR grp = $2)
             GROUP BY grp, variant, fingerprint, state
             ORDER BY grp COLLATE \"C\", variant COLLATE \"C\", fingerprint COLLATE \"C\"",
            &[&now, &self.group],
        )?;
        Ok(rows
            .iter()
            .map(|row| StateCountRow {
                group: row.get(0),
                variant: row.get(1),
                fingerprint: row.get(2),
                state: row.get(3),
                jobs: row.get::<_, i64>(4) as u64,
                items: row.get::<_, i64>(5) as u64,
                failed_items: row.get::<_, i64>(6) as u64,
                expired_leases: row.get::<_, i64>(7) as u64,
            })
            .collect())
    }

    fn recent_completions(&mut self, of: Option<&GroupStatus>) -> Result<Vec<(Millis, u64)>, Fail> {
        let rows = match of {
            Some(g) => self.tx.query(
                "SELECT finished_at_ms, items FROM jobs
                 WHERE NOT superseded AND state = 'done'
                     AND grp = $1 AND variant = $2 AND fingerprint = $3
                 ORDER BY finished_at_ms DESC LIMIT $4",
                &[&g.group, &g.variant, &g.fingerprint, &THROUGHPUT_WINDOW],
            )?,
            None => self.tx.query(
                "SELECT finished_at_ms, items FROM jobs
                 WHERE NOT superseded AND state = 'done' AND ($1::TEXT IS NULL OR grp = $1)
                 ORDER BY finished_at_ms DESC LIMIT $2",
                &[&self.group, &THROUGHPUT_WINDOW],
            )?,
        };
        Ok(rows
            .iter()
            .map(|row| (row.get::<_, i64>(0), row.get::<_, i64>(1) as u64))
            .collect())
    }

    fn failed_items(&mut self) -> Result<Vec<FailedItem>, Fail> {
        let rows = self.tx.query(
            "SELECT f.job_id, j.grp, j.variant, f.item, f.reason
             FROM item_failures f JOIN jobs j ON j.id = f.job_id
             WHERE NOT j.superseded AND j.state = 'done'
                 AND ($1::TEXT IS NULL OR j.grp = $1)
             ORDER BY f.job_id, f.id LIMIT $2",
            &[&self.group, &LIST_LIMIT],
        )?;
        Ok(rows
            .iter()
            .map(|row| FailedItem {
                job_id: row.get(0),
                group: row.get(1),
                variant: row.get(2),
                item: row.get(3),
                reason: row.get(4),
            })
            .collect())
    }

    fn problems(&mut self, state: &'static str) -> Result<Vec<JobProblem>, Fail> {
        let rows = self.tx.query(
            "SELECT id, grp, variant, tries, last_error, retry_at_ms FROM jobs
             WHERE NOT superseded AND state = $1 AND ($2::TEXT IS NULL OR grp = $2)
             ORDER BY id LIMIT $3",
            &[&state, &self.group, &LIST_LIMIT],
        )?;
        Ok(rows
            .iter()
            .map(|row| JobProblem {
                job_id: row.get(0),
                group: row.get(1),
                variant: row.get(2),
                state,
                tries: row.get::<_, i32>(3) as u32,
                last_error: row.get::<_, Option<String>>(4).unwrap_or_default(),
                retry_at_ms: row.get(5),
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::redact_url;

    #[test]
    fn passwords_never_reach_messages() {
        assert_eq!(
            redact_url("postgres://lazarus:s3cret@db.example:5432/jobs?sslmode=disable"),
            "postgres://lazarus:***@db.example:5432/jobs?sslmode=disable"
        );
        assert_eq!(
            redact_url("postgresql://db/jobs?user=a&password=s3cret"),
            "postgresql://db/jobs?user=a&password=***"
        );
        assert_eq!(
            redact_url("postgres://lazarus@127.0.0.1/jobs"),
            "postgres://lazarus@127.0.0.1/jobs"
        );
    }
}

//! `experiments/experiments.db`: opening, migrations, reaping dead runs, and
//! recording runs through [`RunHandle`].
//!
//! - Opened through [`crate::sqlite`]: WAL journal, foreign keys on, busy
//!   retried for up to [`crate::sqlite::BUSY_GIVE_UP`], so several training
//!   processes can write one file at once without losing rows.
//! - Every write is one `BEGIN IMMEDIATE` transaction.
//! - The schema version is the highest row of the `schema_version` table. A
//!   file is validated (SQLite header, known version) before anything is
//!   written to it; a newer version is refused and left untouched.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{ErrorCode, OptionalExtension, Transaction, params};

use super::{ExperimentsError, ParamValue, RunStart, RunStatus, io_error};
use crate::layout::Layout;
use crate::sqlite::{Database, Schema, TxError, VersionStore};

/// The schema version this binary creates and understands.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// Name of the lock file a live run holds inside its folder.
pub(crate) use super::run_files::LOCK_FILE;

/// Migration N (index N-1) takes the schema from version N-1 to N.
/// README.md ("Experiments database") documents the tables.
const MIGRATIONS: &[&str] = &[
    "
CREATE TABLE experiments (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL UNIQUE,
    created_ms INTEGER NOT NULL
);
CREATE TABLE runs (
    id TEXT PRIMARY KEY,
    experiment_id INTEGER NOT NULL REFERENCES experiments (id),
    status TEXT NOT NULL CHECK (status IN ('RUNNING', 'FINISHED', 'FAILED', 'KILLED')),
    start_ms INTEGER NOT NULL,
    end_ms INTEGER,
    dataset TEXT NOT NULL,
    encoder_fingerprint TEXT NOT NULL,
    config_hash TEXT NOT NULL,
    git_revision TEXT,
    host TEXT NOT NULL,
    pid INTEGER NOT NULL
);
CREATE INDEX runs_experiment ON runs (experiment_id, id);
CREATE INDEX runs_config_hash ON runs (config_hash, status);
CREATE INDEX runs_status ON runs (status, host);
CREATE TABLE params (
    run_id TEXT NOT NULL REFERENCES runs (id),
    key TEXT NOT NULL,
    value_number REAL,
    value_text TEXT,
    PRIMARY KEY (run_id, key),
    CHECK ((value_number IS NULL) <> (value_text IS NULL))
) WITHOUT ROWID;
CREATE INDEX params_key ON params (key, value_number, value_text);
CREATE TABLE metrics (
    run_id TEXT NOT NULL REFERENCES runs (id),
    key TEXT NOT NULL,
    step INTEGER NOT NULL,
    value REAL NOT NULL,
    time_ms INTEGER NOT NULL,
    PRIMARY KEY (run_id, key, step)
) WITHOUT ROWID;
CREATE TABLE summary_metrics (
    run_id TEXT NOT NULL REFERENCES runs (id),
    key TEXT NOT NULL,
    value REAL NOT NULL,
    PRIMARY KEY (run_id, key)
) WITHOUT ROWID;
CREATE INDEX summary_metrics_key ON summary_metrics (key, value);
CREATE TABLE tags (
    run_id TEXT NOT NULL REFERENCES runs (id),
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (run_id, key)
) WITHOUT ROWID;
CREATE TABLE artifacts (
    run_id TEXT NOT NULL REFERENCES runs (id),
    path TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    PRIMARY KEY (run_id, path)
) WITHOUT ROWID;
",
    "
CREATE TABLE sweep_runs (
    sweep TEXT NOT NULL,
    run_id TEXT NOT NULL REFERENCES runs (id),
    PRIMARY KEY (sweep, run_id)
) WITHOUT ROWID;
",
];

const SCHEMA: Schema = Schema {
    version_store: VersionStore::Table,
    migrations: MIGRATIONS,
    foreign_keys: true,
};

/// Failure inside a transaction: SQLite (maybe busy, then retried) or a verdict of ours.
pub(crate) type Fail = TxError<ExperimentsError>;

crate::sqlite::sqlite_owner_error!(ExperimentsError);

pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

pub(crate) struct Inner {
    db: Database,
    runs_dir: PathBuf,
    root: PathBuf,
    host: String,
}

/// The experiments database of one lazarus root. Cheap to clone; usable from
/// several threads (one connection behind a mutex) and processes (SQLite locks).
#[derive(Clone)]
pub struct ExperimentsDb {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for ExperimentsDb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExperimentsDb")
            .field("path", &self.path())
            .finish()
    }
}

impl ExperimentsDb {
    /// Opens (creating if absent) `experiments/experiments.db` under the
    /// layout's root, migrates it, and marks dead runs of this host `KILLED`.
    pub fn open(layout: &Layout) -> Result<Self, ExperimentsError> {
        let path = experiments_db_path(layout);
        let db = Self {
            inner: Arc::new(Inner {
                db: Database::open(&path, &SCHEMA)?,
                runs_dir: layout.experiments_dir().join("runs"),
                root: layout.root().to_path_buf(),
                host: host_name(),
            }),
        };
        db.reap_dead_runs()?;
        Ok(db)
    }

    /// Opens the database if it exists; `Ok(None)` otherwise, so that
    /// read-only verbs do not create one.
    pub fn open_existing(layout: &Layout) -> Result<Option<Self>, ExperimentsError> {
        if experiments_db_path(layout).exists() {
            Self::open(layout).map(Some)
        } else {
            Ok(None)
        }
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        self.inner.db.path()
    }

    /// `experiments/runs/<id>/`.
    pub fn run_dir(&self, run_id: &str) -> PathBuf {
        self.inner.runs_dir.join(run_id)
    }

    /// The host name recorded with runs started here.
    pub fn host(&self) -> &str {
        &self.inner.host
    }

    /// Marks `RUNNING` runs of this host whose process is gone as `KILLED`;
    /// returns their ids. [`ExperimentsDb::open`] calls it.
    pub fn reap_dead_runs(&self) -> Result<Vec<String>, ExperimentsError> {
        let running: Vec<String> = self.read(|tx| {
            let mut statement =
                tx.prepare("SELECT id FROM runs WHERE status = 'RUNNING' AND host = ?1")?;
            let ids = statement
                .query_map([&self.inner.host], |row| row.get(0))?
                .collect::<Result<_, _>>()?;
            Ok(ids)
        })?;
        let mut reaped = Vec::new();
        for id in running {
            let lock_path = super::run_files::RunFolder::new(self.run_dir(&id)).lock();
            // Taking the lock proves its holder is gone; it is released when `_held` drops.
            let _held = match File::open(&lock_path) {
                Ok(file) => match file.try_lock() {
                    Ok(()) => Some(file),
                    Err(std::fs::TryLockError::WouldBlock) => continue,
                    Err(std::fs::TryLockError::Error(error)) => {
                        return Err(ExperimentsError::Io {
                            path: lock_path,
                            error,
                        });
                    }
                },
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => None,
                Err(error) => {
                    return Err(ExperimentsError::Io {
                        path: lock_path,
                        error,
                    });
                }
            };
            let changed = self.write(|tx| {
                Ok(tx.execute(
                    "UPDATE runs SET status = 'KILLED', end_ms = ?2
                     WHERE id = ?1 AND status = 'RUNNING'",
                    params![id, now_ms()],
                )?)
            })?;
            if changed == 1 {
                reaped.push(id);
            }
        }
        Ok(reaped)
    }

    /// Starts a run: picks its id, creates and locks its folder, and records
    /// it with its params, tags, git revision and host, all in one transaction.
    pub fn start_run(&self, start: RunStart) -> Result<RunHandle, ExperimentsError> {
        validate_start(&start)?;
        let git_revision = git_revision(&self.inner.root);
        let runs_dir = self.inner.runs_dir.clone();
        std::fs::create_dir_all(&runs_dir).map_err(io_error(&runs_dir))?;
        let (id, dir, lock) = self.write(|tx| {
            let now = now_ms();
            let experiment_id = experiment_id(tx, &start.experiment, now)?;
            let prefix = run_id_prefix(now);
            let last: Option<String> = tx
                .query_row(
                    "SELECT MAX(id) FROM runs WHERE id >= ?1 AND id < ?2",
                    params![format!("{prefix}-"), format!("{prefix}.")],
                    |row| row.get(0),
                )
                .optional()?
                .flatten();
            let mut counter = last
                .and_then(|id| id.rsplit('-').next().and_then(|n| n.parse::<u64>().ok()))
                .map_or(0, |n| n + 1);
            // create_dir fails on an existing folder (one left by a deleted database).
            let (id, dir) = loop {
                let id = format!("{prefix}-{counter:03}");
                let dir = runs_dir.join(&id);
                match std::fs::create_dir(&dir) {
                    Ok(()) => break (id, dir),
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => counter += 1,
                    Err(e) => return Err(io_error(&dir)(e).into()),
                }
            };
            let recorded = (|| -> Result<File, Fail> {
                let lock_path = super::run_files::RunFolder::new(&dir).lock();
                let lock = File::create(&lock_path).map_err(io_error(&lock_path))?;
                lock.lock().map_err(io_error(&lock_path))?;
                tx.execute(
                    "INSERT INTO runs (id, experiment_id, status, start_ms, dataset,
                         encoder_fingerprint, config_hash, git_revision, host, pid)
                     VALUES (?1, ?2, 'RUNNING', ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                    params![
                        id,
                        experiment_id,
                        now,
                        start.dataset,
                        start.encoder_fingerprint,
                        start.config_hash,
                        git_revision,
                        self.inner.host,
                        std::process::id(),
                    ],
                )?;
                insert_params(tx, &id, &start.params)?;
                for (key, value) in &start.tags {
                    tx.execute(
                        "INSERT INTO tags (run_id, key, value) VALUES (?1, ?2, ?3)",
                        params![id, key, value],
                    )?;
                }
                Ok(lock)
            })();
            match recorded {
                Ok(lock) => Ok((id, dir, lock)),
                Err(fail) => {
                    let _ = std::fs::remove_dir_all(&dir);
                    Err(fail)
                }
            }
        })?;
        Ok(RunHandle {
            db: self.clone(),
            id,
            dir,
            lock: Some(lock),
        })
    }

    /// Reopens a `KILLED` or `FAILED` run to continue it (`train --resume`):
    /// takes its folder's lock, sets it `RUNNING` again, and drops metrics
    /// logged after `from_step`, which the resumed run logs anew.
    pub fn resume_run(&self, id: &str, from_step: u64) -> Result<RunHandle, ExperimentsError> {
        let dir = self.run_dir(id);
        let lock_path = super::run_files::RunFolder::new(&dir).lock();
        let lock = File::create(&lock_path).map_err(io_error(&lock_path))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(ExperimentsError::Invalid(format!(
                    "run {id} is still running in another process (its lock {} is held)",
                    lock_path.display()
                )));
            }
            Err(std::fs::TryLockError::Error(error)) => {
                return Err(ExperimentsError::Io {
                    path: lock_path,
                    error,
                });
            }
        }
        self.write(|tx| {
            let status: Option<String> = tx
                .query_row("SELECT status FROM runs WHERE id = ?1", [id], |row| {
                    row.get(0)
                })
                .optional()?;
            match status.as_deref() {
                None => {
                    return Err(Fail::Refused(ExperimentsError::Invalid(format!(
                        "run {id} is not in {}",
                        self.path().display()
                    ))));
                }
                // RUNNING with its lock free: its process died after the last reap.
                Some("KILLED" | "FAILED" | "RUNNING") => {}
                Some(other) => {
                    return Err(Fail::Refused(ExperimentsError::Invalid(format!(
                        "run {id} is {other}; only KILLED or FAILED runs resume"
                    ))));
                }
            }
            tx.execute(
                "UPDATE runs SET status = 'RUNNING', end_ms = NULL, host = ?2, pid = ?3 WHERE id = ?1",
                params![id, self.inner.host, std::process::id()],
            )?;
            tx.execute(
                "DELETE FROM metrics WHERE run_id = ?1 AND step > ?2",
                params![id, from_step as i64],
            )?;
            Ok(())
        })?;
        Ok(RunHandle {
            db: self.clone(),
            id: id.to_string(),
            dir,
            lock: Some(lock),
        })
    }

    /// The most recent `KILLED` or `FAILED` run with this config hash, which
    /// a re-run sweep continues instead of starting over.
    pub fn find_resumable(&self, config_hash: &str) -> Result<Option<String>, ExperimentsError> {
        self.read(|tx| {
            Ok(tx
                .query_row(
                    "SELECT id FROM runs WHERE config_hash = ?1 AND status IN ('KILLED', 'FAILED')
                     ORDER BY id DESC LIMIT 1",
                    [config_hash],
                    |row| row.get(0),
                )
                .optional()?)
        })
    }

    /// The most recent `FINISHED` run with this config hash, for sweeps that skip done work.
    pub fn find_finished(&self, config_hash: &str) -> Result<Option<String>, ExperimentsError> {
        self.read(|tx| {
            Ok(tx
                .query_row(
                    "SELECT id FROM runs WHERE config_hash = ?1 AND status = 'FINISHED'
                     ORDER BY id DESC LIMIT 1",
                    [config_hash],
                    |row| row.get(0),
                )
                .optional()?)
        })
    }

    /// Counts runs a sweep skipped as already FINISHED (trained by `train` or
    /// another sweep) among the sweep's own, so that `--where sweep=NAME`
    /// finds them beside the runs that carry the name as their param.
    pub fn add_to_sweep(&self, sweep: &str, run_ids: &[String]) -> Result<(), ExperimentsError> {
        self.write(|tx| {
            for run_id in run_ids {
                tx.execute(
                    "INSERT OR IGNORE INTO sweep_runs (sweep, run_id) VALUES (?1, ?2)",
                    params![sweep, run_id],
                )?;
            }
            Ok(())
        })
    }

    /// Runs `op` in a `BEGIN IMMEDIATE` transaction; commits on `Ok`, rolls
    /// back on `Err`; busy is retried.
    pub(crate) fn write<T>(
        &self,
        op: impl FnMut(&Transaction<'_>) -> Result<T, Fail>,
    ) -> Result<T, ExperimentsError> {
        self.inner.db.write(op)
    }

    /// Runs `op` in a read transaction (one consistent snapshot); busy is retried.
    pub(crate) fn read<T>(
        &self,
        op: impl FnMut(&Transaction<'_>) -> Result<T, Fail>,
    ) -> Result<T, ExperimentsError> {
        self.inner.db.read(op)
    }
}

/// A run in progress. Holds the run folder's lock until [`RunHandle::finish`]
/// (or drop, which records `FAILED`).
pub struct RunHandle {
    db: ExperimentsDb,
    id: String,
    dir: PathBuf,
    lock: Option<File>,
}

impl std::fmt::Debug for RunHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunHandle")
            .field("id", &self.id)
            .field("dir", &self.dir)
            .finish()
    }
}

impl RunHandle {
    /// The run id (`YYYYMMDD-HHMMSS-NNN`, UTC start time).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// `experiments/runs/<id>/`.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The run's folder and the names of its files.
    pub fn folder(&self) -> super::run_files::RunFolder {
        super::run_files::RunFolder::new(&self.dir)
    }

    /// Records metrics at one step (epoch), all in one transaction. Logging
    /// the same key at the same step twice is an error.
    pub fn log_metrics<K: AsRef<str>>(
        &self,
        step: u64,
        metrics: &[(K, f64)],
    ) -> Result<(), ExperimentsError> {
        let path = self.db.path().to_path_buf();
        self.db.write(|tx| {
            let time = now_ms();
            let mut statement = tx.prepare_cached(
                "INSERT INTO metrics (run_id, key, step, value, time_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
            )?;
            for (key, value) in metrics {
                let key = key.as_ref();
                match statement.execute(params![self.id, key, step as i64, value, time]) {
                    Ok(_) => {}
                    Err(err) if is_constraint(&err) => {
                        return Err(Fail::Refused(ExperimentsError::DuplicateMetric {
                            path: path.clone(),
                            run: self.id.clone(),
                            key: key.to_string(),
                            step,
                        }));
                    }
                    Err(err) => return Err(err.into()),
                }
            }
            Ok(())
        })
    }

    /// Sets (or replaces) tags of the run.
    pub fn set_tags<K: AsRef<str>, V: AsRef<str>>(
        &self,
        tags: &[(K, V)],
    ) -> Result<(), ExperimentsError> {
        self.db.write(|tx| {
            for (key, value) in tags {
                tx.execute(
                    "INSERT OR REPLACE INTO tags (run_id, key, value) VALUES (?1, ?2, ?3)",
                    params![self.id, key.as_ref(), value.as_ref()],
                )?;
            }
            Ok(())
        })
    }

    /// Writes `name` (a path relative to the run folder, such as
    /// `head.safetensors` or `plots/x.svg`) atomically; returns its full path.
    pub fn write_artifact(&self, name: &str, bytes: &[u8]) -> Result<PathBuf, ExperimentsError> {
        let relative = Path::new(name);
        let plain = relative
            .components()
            .all(|c| matches!(c, std::path::Component::Normal(_)));
        if name.is_empty() || !plain || name == LOCK_FILE {
            return Err(ExperimentsError::Invalid(format!(
                "artifact name `{name}` must be a relative path inside the run folder {}",
                self.dir.display()
            )));
        }
        let target = self.dir.join(relative);
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).map_err(io_error(parent))?;
        }
        crate::atomic::write_file(&target, bytes).map_err(io_error(&target))?;
        Ok(target)
    }

    /// Records the final status and summary metrics, lists the run folder's
    /// files as artifacts, then releases the lock.
    pub fn finish<K: AsRef<str>>(
        mut self,
        status: RunStatus,
        summary: &[(K, f64)],
    ) -> Result<(), ExperimentsError> {
        if status == RunStatus::Running {
            return Err(ExperimentsError::Invalid(format!(
                "run {}: a run finishes as FINISHED, FAILED or KILLED, not RUNNING",
                self.id
            )));
        }
        let summary: Vec<(&str, f64)> = summary.iter().map(|(k, v)| (k.as_ref(), *v)).collect();
        // Only a committed final status releases the lock. If this fails, drop
        // tries once more with FAILED; failing that, the next open reaps the run.
        self.close(status, &summary)
    }

    fn close(
        &mut self,
        status: RunStatus,
        summary: &[(&str, f64)],
    ) -> Result<(), ExperimentsError> {
        let artifacts = list_artifacts(&self.dir)?;
        self.db.write(|tx| {
            tx.execute(
                "UPDATE runs SET status = ?2, end_ms = ?3 WHERE id = ?1",
                params![self.id, status.as_str(), now_ms()],
            )?;
            for (key, value) in summary {
                tx.execute(
                    "INSERT OR REPLACE INTO summary_metrics (run_id, key, value) VALUES (?1, ?2, ?3)",
                    params![self.id, key, value],
                )?;
            }
            tx.execute("DELETE FROM artifacts WHERE run_id = ?1", [&self.id])?;
            for (path, bytes) in &artifacts {
                tx.execute(
                    "INSERT INTO artifacts (run_id, path, bytes) VALUES (?1, ?2, ?3)",
                    params![self.id, path, *bytes as i64],
                )?;
            }
            Ok(())
        })?;
        self.lock = None;
        let _ = std::fs::remove_file(self.folder().lock());
        Ok(())
    }
}

impl Drop for RunHandle {
    fn drop(&mut self) {
        if self.lock.is_some() {
            // Dropped without finish (an error or a panic unwound past it).
            let _ = self.close(RunStatus::Failed, &[]);
        }
    }
}

fn is_constraint(err: &rusqlite::Error) -> bool {
    matches!(err, rusqlite::Error::SqliteFailure(e, _) if e.code == ErrorCode::ConstraintViolation)
}

fn validate_start(start: &RunStart) -> Result<(), ExperimentsError> {
    for (what, value) in [
        ("experiment", &start.experiment),
        ("dataset", &start.dataset),
        ("encoder fingerprint", &start.encoder_fingerprint),
        ("config hash", &start.config_hash),
    ] {
        if value.trim().is_empty() {
            return Err(ExperimentsError::Invalid(format!(
                "a run needs a non-empty {what}"
            )));
        }
    }
    let mut seen = std::collections::BTreeSet::new();
    for (key, value) in &start.params {
        if key.is_empty() || !seen.insert(key.as_str()) {
            return Err(ExperimentsError::Invalid(format!(
                "run parameter `{key}` is empty or given twice"
            )));
        }
        if let ParamValue::Number(number) = value
            && !number.is_finite()
        {
            return Err(ExperimentsError::Invalid(format!(
                "run parameter `{key}` = {number} is not a finite number"
            )));
        }
    }
    let mut seen = std::collections::BTreeSet::new();
    for (key, _) in &start.tags {
        if key.is_empty() || !seen.insert(key.as_str()) {
            return Err(ExperimentsError::Invalid(format!(
                "run tag `{key}` is empty or given twice"
            )));
        }
    }
    Ok(())
}

fn insert_params(
    tx: &Transaction<'_>,
    run_id: &str,
    values: &[(String, ParamValue)],
) -> Result<(), rusqlite::Error> {
    let mut statement = tx.prepare_cached(
        "INSERT INTO params (run_id, key, value_number, value_text) VALUES (?1, ?2, ?3, ?4)",
    )?;
    for (key, value) in values {
        let (number, text) = match value {
            ParamValue::Number(n) => (Some(*n), None),
            ParamValue::Text(t) => (None, Some(t.as_str())),
        };
        statement.execute(params![run_id, key, number, text])?;
    }
    Ok(())
}

fn experiment_id(tx: &Transaction<'_>, name: &str, now: i64) -> Result<i64, rusqlite::Error> {
    tx.execute(
        "INSERT OR IGNORE INTO experiments (name, created_ms) VALUES (?1, ?2)",
        params![name, now],
    )?;
    tx.query_row(
        "SELECT id FROM experiments WHERE name = ?1",
        [name],
        |row| row.get(0),
    )
}

/// `YYYYMMDD-HHMMSS` of a UTC time in milliseconds.
fn run_id_prefix(now_ms: i64) -> String {
    let time = UNIX_EPOCH + Duration::from_millis(now_ms.max(0) as u64);
    // "2026-11-24T23:22:26Z" -> "20261124-232226"
    let text = humantime::format_rfc3339_seconds(time).to_string();
    let digits: String = text.chars().filter(char::is_ascii_digit).collect();
    format!("{}-{}", &digits[..8], &digits[8..14])
}

pub(crate) fn experiments_db_path(layout: &Layout) -> PathBuf {
    layout.experiments_dir().join("experiments.db")
}

/// Files under a run folder (relative paths with `/`, sizes), without the
/// lock and temp files.
pub(crate) fn list_artifacts(dir: &Path) -> Result<Vec<(String, u64)>, ExperimentsError> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(folder) = pending.pop() {
        for entry in std::fs::read_dir(&folder).map_err(io_error(&folder))? {
            let entry = entry.map_err(io_error(&folder))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name == LOCK_FILE || crate::atomic::is_temp_name(&name) {
                continue;
            }
            let path = entry.path();
            let metadata = entry.metadata().map_err(io_error(&path))?;
            if metadata.is_dir() {
                pending.push(path);
            } else if let Ok(relative) = path.strip_prefix(dir) {
                let relative: Vec<_> = relative
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy().into_owned())
                    .collect();
                found.push((relative.join("/"), metadata.len()));
            }
        }
    }
    found.sort();
    Ok(found)
}

/// `git rev-parse HEAD` in `root`, or `None` outside a git checkout or without git.
fn git_revision(root: &Path) -> Option<String> {
    let output = std::process::Command::new("git")
        .arg("-C")
        .arg(root)
        .args(["rev-parse", "HEAD"])
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    let text = String::from_utf8(output.stdout).ok()?;
    let revision = text.trim();
    (output.status.success() && !revision.is_empty()).then(|| revision.to_string())
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .or_else(|| std::env::var("COMPUTERNAME").ok())
        .map(|name| name.trim().to_string())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "unknown-host".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_id_prefix_is_utc_date_and_time() {
        // 2026-11-24T23:22:26Z, checked with `date -u -d @1795562546`.
        assert_eq!(run_id_prefix(1_795_562_546_123), "20261124-232226");
    }
}

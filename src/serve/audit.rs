//! The audit trail: every answered prediction as a row of
//! `ROOT/serving/inference_records.db` (SQLite, WAL, `synchronous = FULL`).
//!
//! Request handlers hand their records to [`AuditWriter`]'s thread before
//! they answer; the thread commits whatever has arrived in one transaction
//! at most every [`FLUSH_INTERVAL`], off the request path. A commit is all
//! of its records or none, so a killed server never leaves half a record;
//! a stopped one (`finish`) commits every record it was handed. `serve-log`
//! reads the rows back ([`query`]).
//!
//! This module is the third that speaks SQL (after the queue and
//! experiments): the trail is the server's own database, written by one
//! thread and shared with nothing else, with the same conventions (header
//! check before any write, `schema_version` table, newer versions refused).

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use serde::{Deserialize, Serialize};

use super::metrics::Metrics;

/// `ROOT/serving/`.
pub const SERVING_DIR: &str = "serving";
/// The audit database's file name in it.
pub const AUDIT_FILE: &str = "inference_records.db";
/// The schema this binary writes and reads.
pub const SCHEMA_VERSION: i64 = 1;
/// How long the writer gathers records before it commits them.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(20);
/// Most records in one commit.
const MAX_BATCH: usize = 4096;
/// Commits tried for the last records when the server stops.
const FINAL_ATTEMPTS: usize = 5;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS schema_version (
    version INTEGER PRIMARY KEY,
    applied_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS inference_records (
    request_id TEXT NOT NULL,
    image_index INTEGER NOT NULL,
    time TEXT NOT NULL,
    time_ms INTEGER NOT NULL,
    model TEXT NOT NULL,
    model_sha256 TEXT NOT NULL,
    task TEXT NOT NULL,
    image_sha256 TEXT NOT NULL,
    answer TEXT NOT NULL,
    latency_ms REAL NOT NULL,
    client TEXT NOT NULL,
    PRIMARY KEY (request_id, image_index)
);
CREATE INDEX IF NOT EXISTS inference_records_time ON inference_records (time_ms);
CREATE INDEX IF NOT EXISTS inference_records_model ON inference_records (model, time_ms);
CREATE INDEX IF NOT EXISTS inference_records_image ON inference_records (image_sha256);
";

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("{path}: {error}")]
    Sqlite {
        path: PathBuf,
        error: rusqlite::Error,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not an audit database: {reason}")]
    NotAudit { path: PathBuf, reason: String },
    #[error(
        "{path} has audit schema version {found}; this lazarus reads up to {SCHEMA_VERSION} \
         (use a newer lazarus)"
    )]
    NewerSchema { path: PathBuf, found: i64 },
    #[error(
        "{path} does not exist: no audit trail under this root (has `lazarus serve` run here?)"
    )]
    Missing { path: PathBuf },
    #[error("{path}: {records} inference records could not be committed: {message}")]
    Lost {
        path: PathBuf,
        records: usize,
        message: String,
    },
}

/// One answered prediction of one image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InferenceRecord {
    pub request_id: String,
    /// The image's position in its request.
    pub image_index: u32,
    /// RFC 3339, UTC, milliseconds.
    pub time: String,
    pub time_ms: i64,
    pub model: String,
    pub model_sha256: String,
    pub task: String,
    pub image_sha256: String,
    /// The image's answer as JSON (pictures replaced by their sha256).
    pub answer: serde_json::Value,
    pub latency_ms: f64,
    /// The client's address, `IP:PORT`.
    pub client: String,
}

/// `ROOT/serving/inference_records.db`.
pub fn audit_path(root: &Path) -> PathBuf {
    root.join(SERVING_DIR).join(AUDIT_FILE)
}

/// SQLite's answer, on the first read, for a file that is not a database
/// (checked that way rather than by reading the file: closing another
/// descriptor of a database file drops this process's POSIX locks on it,
/// those of its open connections included; see `crate::sqlite`).
fn not_audit(path: &Path, error: &rusqlite::Error) -> Option<AuditError> {
    crate::sqlite::is_not_a_database(error).then(|| AuditError::NotAudit {
        path: path.to_path_buf(),
        reason: "it is not an SQLite file".into(),
    })
}

fn schema_version(connection: &Connection) -> rusqlite::Result<i64> {
    let has_table: Option<String> = connection
        .query_row(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'",
            [],
            |row| row.get(0),
        )
        .optional()?;
    if has_table.is_none() {
        return Ok(0);
    }
    connection.query_row(
        "SELECT COALESCE(MAX(version), 0) FROM schema_version",
        [],
        |row| row.get(0),
    )
}

/// A connection to the audit database after its header check, with its
/// schema version (0: not created yet); newer versions are refused.
fn connect(path: &Path, flags: OpenFlags) -> Result<(Connection, i64), AuditError> {
    let sql = |error| AuditError::Sqlite {
        path: path.to_path_buf(),
        error,
    };
    let connection =
        Connection::open_with_flags(path, flags | OpenFlags::SQLITE_OPEN_NO_MUTEX).map_err(sql)?;
    connection
        .busy_timeout(Duration::from_secs(5))
        .map_err(sql)?;
    let version = schema_version(&connection)
        .map_err(|error| not_audit(path, &error).unwrap_or_else(|| sql(error)))?;
    if version > SCHEMA_VERSION {
        return Err(AuditError::NewerSchema {
            path: path.to_path_buf(),
            found: version,
        });
    }
    Ok((connection, version))
}

/// Opens (creating) the audit database for writing.
fn open_for_writing(path: &Path) -> Result<Connection, AuditError> {
    let sql = |error| AuditError::Sqlite {
        path: path.to_path_buf(),
        error,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|source| AuditError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
    }
    let (connection, version) = connect(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE,
    )?;
    let mode: String = connection
        .query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0))
        .map_err(sql)?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(AuditError::NotAudit {
            path: path.to_path_buf(),
            reason: format!("cannot switch to WAL journal mode (got {mode})"),
        });
    }
    connection
        .execute_batch("PRAGMA synchronous = FULL")
        .map_err(sql)?;
    if version < SCHEMA_VERSION {
        let now = now_ms();
        connection
            .execute_batch(&format!(
                "BEGIN IMMEDIATE; {SCHEMA} INSERT OR IGNORE INTO schema_version (version, applied_ms) \
                 VALUES ({SCHEMA_VERSION}, {now}); COMMIT;"
            ))
            .map_err(sql)?;
    }
    Ok(connection)
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// RFC 3339 in UTC with milliseconds.
pub fn format_time(time_ms: i64) -> String {
    let time = std::time::UNIX_EPOCH + Duration::from_millis(time_ms.max(0) as u64);
    humantime::format_rfc3339_millis(time).to_string()
}

enum Message {
    Record(Box<InferenceRecord>),
    Finish,
}

/// Hands records to the writer thread; cheap to clone.
#[derive(Clone)]
pub struct AuditSender {
    sender: mpsc::Sender<Message>,
}

impl AuditSender {
    /// Queues a record for the next commit.
    pub fn record(&self, record: InferenceRecord) {
        // The writer lives until `finish`, after the last handler is done.
        let _ = self.sender.send(Message::Record(Box::new(record)));
    }
}

/// The writer thread of the audit trail.
pub struct AuditWriter {
    path: PathBuf,
    sender: mpsc::Sender<Message>,
    thread: JoinHandle<Result<u64, AuditError>>,
}

impl AuditWriter {
    /// Opens (creating and migrating) `ROOT/serving/inference_records.db`
    /// and starts the writer thread.
    pub fn start(root: &Path, metrics: Metrics) -> Result<Self, AuditError> {
        let path = audit_path(root);
        let connection = open_for_writing(&path)?;
        let (sender, receiver) = mpsc::channel();
        let thread_path = path.clone();
        let thread = std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || write_loop(connection, &thread_path, receiver, &metrics))
            .map_err(|source| AuditError::Io {
                path: path.clone(),
                source,
            })?;
        Ok(AuditWriter {
            path,
            sender,
            thread,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn sender(&self) -> AuditSender {
        AuditSender {
            sender: self.sender.clone(),
        }
    }

    /// Commits every record handed over so far and stops the thread;
    /// returns how many records it committed in all.
    pub fn finish(self) -> Result<u64, AuditError> {
        let _ = self.sender.send(Message::Finish);
        match self.thread.join() {
            Ok(result) => result,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }
}

fn write_loop(
    mut connection: Connection,
    path: &Path,
    receiver: mpsc::Receiver<Message>,
    metrics: &Metrics,
) -> Result<u64, AuditError> {
    let mut pending: Vec<InferenceRecord> = Vec::new();
    let mut written = 0u64;
    let mut finishing = false;
    let mut failures = 0usize;
    while !finishing {
        // Wait for a record (or, with records left over from a failed
        // commit, at most a second before trying again).
        let first = if pending.is_empty() {
            receiver.recv().ok()
        } else {
            match receiver.recv_timeout(Duration::from_secs(1)) {
                Ok(message) => Some(message),
                Err(mpsc::RecvTimeoutError::Timeout) => None,
                Err(mpsc::RecvTimeoutError::Disconnected) => Some(Message::Finish),
            }
        };
        match first {
            Some(Message::Record(record)) => pending.push(*record),
            Some(Message::Finish) => finishing = true,
            None if pending.is_empty() => finishing = true,
            None => {}
        }
        let deadline = Instant::now() + FLUSH_INTERVAL;
        while !finishing && pending.len() < MAX_BATCH {
            let left = deadline.saturating_duration_since(Instant::now());
            match receiver.recv_timeout(left) {
                Ok(Message::Record(record)) => pending.push(*record),
                Ok(Message::Finish) | Err(mpsc::RecvTimeoutError::Disconnected) => finishing = true,
                Err(mpsc::RecvTimeoutError::Timeout) => break,
            }
        }
        if finishing {
            // Everything sent before Finish is already in the channel.
            while let Ok(message) = receiver.try_recv() {
                if let Message::Record(record) = message {
                    pending.push(*record);
                }
            }
        }
        if pending.is_empty() {
            continue;
        }
        let attempts = if finishing { FINAL_ATTEMPTS } else { 1 };
        let mut last_error = None;
        for attempt in 0..attempts {
            if attempt > 0 {
                std::thread::sleep(Duration::from_millis(200 << attempt.min(4)));
            }
            match commit(&mut connection, &pending) {
                Ok(()) => {
                    written += pending.len() as u64;
                    metrics.audit_records.inc_by(pending.len() as u64);
                    pending.clear();
                    failures = 0;
                    last_error = None;
                    break;
                }
                Err(error) => {
                    metrics.audit_errors.inc();
                    failures += 1;
                    if failures == 1 || failures.is_power_of_two() {
                        eprintln!(
                            "serve: audit trail {}: commit of {} records failed (attempt \
                             {failures}), retrying: {error}",
                            path.display(),
                            pending.len()
                        );
                    }
                    last_error = Some(error);
                }
            }
        }
        if finishing && let Some(error) = last_error {
            return Err(AuditError::Lost {
                path: path.to_path_buf(),
                records: pending.len(),
                message: error.to_string(),
            });
        }
    }
    Ok(written)
}

/// One transaction holding every record.
fn commit(connection: &mut Connection, records: &[InferenceRecord]) -> rusqlite::Result<()> {
    let transaction =
        connection.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    {
        let mut insert = transaction.prepare_cached(
            "INSERT INTO inference_records (request_id, image_index, time, time_ms, \
             model, model_sha256, task, image_sha256, answer, latency_ms, client) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
        )?;
        for r in records {
            insert.execute(params![
                r.request_id,
                r.image_index,
                r.time,
                r.time_ms,
                r.model,
                r.model_sha256,
                r.task,
                r.image_sha256,
                r.answer.to_string(),
                r.latency_ms,
                r.client,
            ])?;
        }
    }
    transaction.commit()
}

/// Which records `serve-log` lists.
#[derive(Debug, Clone, Default)]
pub struct LogQuery {
    pub model: Option<String>,
    pub request_id: Option<String>,
    /// A full sha256 or a prefix of one.
    pub image_sha256: Option<String>,
    /// A client address or its IP (`127.0.0.1` matches `127.0.0.1:*`).
    pub client: Option<String>,
    pub since_ms: Option<i64>,
    pub until_ms: Option<i64>,
    /// Most records listed (the newest, unless `oldest_first`).
    pub limit: Option<usize>,
    pub oldest_first: bool,
}

/// Records of `ROOT/serving/inference_records.db` matching `query`, newest
/// first (or oldest first).
pub fn query(root: &Path, query: &LogQuery) -> Result<Vec<InferenceRecord>, AuditError> {
    let path = audit_path(root);
    if !path.is_file() {
        return Err(AuditError::Missing { path });
    }
    let sql = |error| AuditError::Sqlite {
        path: path.clone(),
        error,
    };
    let (connection, version) = connect(&path, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    if version == 0 {
        return Err(AuditError::NotAudit {
            path: path.clone(),
            reason: "it has no schema_version table".into(),
        });
    }
    let mut conditions: Vec<&str> = Vec::new();
    let mut values: Vec<rusqlite::types::Value> = Vec::new();
    use rusqlite::types::Value;
    if let Some(model) = &query.model {
        conditions.push("model = ?");
        values.push(Value::Text(model.clone()));
    }
    if let Some(id) = &query.request_id {
        conditions.push("request_id = ?");
        values.push(Value::Text(id.clone()));
    }
    if let Some(prefix) = &query.image_sha256 {
        conditions.push("substr(image_sha256, 1, ?) = ?");
        values.push(Value::Integer(prefix.len() as i64));
        values.push(Value::Text(prefix.to_ascii_lowercase()));
    }
    if let Some(client) = &query.client {
        conditions.push("(client = ? OR substr(client, 1, ?) = ?)");
        values.push(Value::Text(client.clone()));
        values.push(Value::Integer(client.len() as i64 + 1));
        values.push(Value::Text(format!("{client}:")));
    }
    if let Some(since) = query.since_ms {
        conditions.push("time_ms >= ?");
        values.push(Value::Integer(since));
    }
    if let Some(until) = query.until_ms {
        conditions.push("time_ms < ?");
        values.push(Value::Integer(until));
    }
    let filter = if conditions.is_empty() {
        String::new()
    } else {
        format!("WHERE {}", conditions.join(" AND "))
    };
    let order = if query.oldest_first { "ASC" } else { "DESC" };
    let limit = query.limit.map_or(-1, |l| l as i64);
    values.push(Value::Integer(limit));
    let text = format!(
        "SELECT request_id, image_index, time, time_ms, model, model_sha256, task, \
         image_sha256, answer, latency_ms, client FROM inference_records {filter} \
         ORDER BY time_ms {order}, request_id {order}, image_index ASC LIMIT ?"
    );
    let mut statement = connection.prepare(&text).map_err(sql)?;
    let rows = statement
        .query_map(rusqlite::params_from_iter(values), |row| {
            let answer: String = row.get(8)?;
            Ok(InferenceRecord {
                request_id: row.get(0)?,
                image_index: row.get(1)?,
                time: row.get(2)?,
                time_ms: row.get(3)?,
                model: row.get(4)?,
                model_sha256: row.get(5)?,
                task: row.get(6)?,
                image_sha256: row.get(7)?,
                answer: serde_json::from_str(&answer).unwrap_or(serde_json::Value::String(answer)),
                latency_ms: row.get(9)?,
                client: row.get(10)?,
            })
        })
        .map_err(sql)?;
    rows.collect::<Result<Vec<_>, _>>().map_err(sql)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(request: &str, index: u32, model: &str, time_ms: i64) -> InferenceRecord {
        InferenceRecord {
            request_id: request.into(),
            image_index: index,
            time: format_time(time_ms),
            time_ms,
            model: model.into(),
            model_sha256: "ab".repeat(32),
            task: "classify".into(),
            // 64 hex digits whose first ones differ between times.
            image_sha256: format!("{time_ms:04x}").repeat(16),
            answer: serde_json::json!({"top": [["cat", 0.75]]}),
            latency_ms: 3.5,
            client: "127.0.0.1:5000".into(),
        }
    }

    #[test]
    fn records_written_by_the_thread_are_queried_back_with_filters() {
        let temp = tempfile::tempdir().unwrap();
        let writer = AuditWriter::start(temp.path(), Metrics::new()).unwrap();
        let sender = writer.sender();
        for (i, model) in ["a", "b", "a"].iter().enumerate() {
            sender.record(record(&format!("r{i}"), 0, model, 1_000 + i as i64));
        }
        sender.record(record("r2", 1, "a", 1_002));
        assert_eq!(writer.finish().unwrap(), 4);

        let all = query(temp.path(), &LogQuery::default()).unwrap();
        assert_eq!(all.len(), 4);
        assert_eq!(all[0].request_id, "r2", "newest first");
        assert_eq!(all[0], record("r2", 0, "a", 1_002));
        let of_a = query(
            temp.path(),
            &LogQuery {
                model: Some("a".into()),
                oldest_first: true,
                ..Default::default()
            },
        )
        .unwrap();
        let ids: Vec<_> = of_a
            .iter()
            .map(|r| (r.request_id.as_str(), r.image_index))
            .collect();
        assert_eq!(ids, [("r0", 0), ("r2", 0), ("r2", 1)]);
        let window = query(
            temp.path(),
            &LogQuery {
                since_ms: Some(1_001),
                until_ms: Some(1_002),
                client: Some("127.0.0.1".into()),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(window.len(), 1);
        assert_eq!(window[0].model, "b");
        let by_image = query(
            temp.path(),
            &LogQuery {
                image_sha256: Some(format!("{:04x}", 1_000).repeat(16)[..20].to_string()),
                limit: Some(5),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(by_image.len(), 1);
        assert_eq!(by_image[0].request_id, "r0");

        // A second server on the same root appends.
        let writer = AuditWriter::start(temp.path(), Metrics::new()).unwrap();
        writer.sender().record(record("r9", 0, "c", 2_000));
        assert_eq!(writer.finish().unwrap(), 1);
        assert_eq!(query(temp.path(), &LogQuery::default()).unwrap().len(), 5);
    }

    #[test]
    fn a_file_that_is_not_sqlite_is_refused_and_left_alone() {
        let temp = tempfile::tempdir().unwrap();
        let path = audit_path(temp.path());
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, b"my notes, not a database").unwrap();
        let error = AuditWriter::start(temp.path(), Metrics::new())
            .err()
            .unwrap()
            .to_string();
        assert!(error.contains("not an SQLite file"), "{error}");
        assert!(error.contains(AUDIT_FILE), "{error}");
        assert_eq!(std::fs::read(&path).unwrap(), b"my notes, not a database");
        let missing = query(&temp.path().join("elsewhere"), &LogQuery::default())
            .unwrap_err()
            .to_string();
        assert!(missing.contains("no audit trail"), "{missing}");
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let temp = tempfile::tempdir().unwrap();
        AuditWriter::start(temp.path(), Metrics::new())
            .unwrap()
            .finish()
            .unwrap();
        let connection = Connection::open(audit_path(temp.path())).unwrap();
        connection
            .execute(
                "INSERT INTO schema_version (version, applied_ms) VALUES (99, 0)",
                [],
            )
            .unwrap();
        drop(connection);
        let error = AuditWriter::start(temp.path(), Metrics::new())
            .err()
            .unwrap()
            .to_string();
        assert!(error.contains("schema version 99"), "{error}");
        let error = query(temp.path(), &LogQuery::default())
            .unwrap_err()
            .to_string();
        assert!(error.contains("schema version 99"), "{error}");
    }
}

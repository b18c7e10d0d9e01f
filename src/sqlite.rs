//! The SQLite files lazarus keeps (jobs/queue.db, experiments/experiments.db):
//! one way to open, validate, migrate and write them.
//!
//! - A file is validated before anything is written to it: a non-empty file
//!   that does not start with the SQLite header, or whose schema version is
//!   newer than this binary knows, is refused and left byte for byte untouched.
//! - WAL journal with `synchronous=NORMAL`: readers never block the writer,
//!   and a committed transaction survives a process crash (a power cut may
//!   lose the last few commits).
//! - Every write is one `BEGIN IMMEDIATE` transaction: the write lock is
//!   taken before the first read, so two processes never both act on what
//!   they read. SQLITE_BUSY is retried with backoff (after SQLite's own busy
//!   timeout) for up to [`BUSY_GIVE_UP`], so "database is locked" never
//!   reaches a user under normal contention.
//! - Migration N takes the schema from version N-1 to N; the missing ones run
//!   in one transaction. Where the version is kept is the file's
//!   [`VersionStore`] (each file keeps the one it always had).
//!
//! Each module that owns a file keeps its own error enum (its messages name
//! what the file is); [`SqliteError`] converts into it.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, ErrorCode, OpenFlags, Transaction, TransactionBehavior};

/// How long a busy database is retried before giving up with [`SqliteError::Busy`].
pub const BUSY_GIVE_UP: Duration = Duration::from_secs(120);

/// SQLite's own wait on a lock before it reports SQLITE_BUSY to us.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Where a file keeps its schema version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VersionStore {
    /// `PRAGMA user_version` (jobs/queue.db).
    UserVersion,
    /// The highest row of the table `schema_version (version, applied_ms)`,
    /// one row per migration applied (experiments/experiments.db).
    Table,
}

impl VersionStore {
    /// The version of the schema in `conn`; 0 for a new file.
    fn read(self, conn: &Connection) -> Result<i64, rusqlite::Error> {
        match self {
            VersionStore::UserVersion => {
                conn.query_row("PRAGMA user_version", [], |row| row.get(0))
            }
            VersionStore::Table => {
                let has_table: bool = conn.query_row(
                    "SELECT EXISTS (SELECT 1 FROM sqlite_master
                         WHERE type = 'table' AND name = 'schema_version')",
                    [],
                    |row| row.get(0),
                )?;
                if !has_table {
                    return Ok(0);
                }
                conn.query_row(
                    "SELECT COALESCE(MAX(version), 0) FROM schema_version",
                    [],
                    |row| row.get(0),
                )
            }
        }
    }

    /// Runs the migrations after `from` and records each version reached.
    fn migrate(
        self,
        tx: &Transaction<'_>,
        from: i64,
        migrations: &[&str],
    ) -> Result<(), rusqlite::Error> {
        if self == VersionStore::Table {
            tx.execute_batch(
                "CREATE TABLE IF NOT EXISTS schema_version (
                    version INTEGER PRIMARY KEY,
                    applied_ms INTEGER NOT NULL
                )",
            )?;
        }
        for (index, migration) in migrations.iter().enumerate().skip(from as usize) {
            let version = index as i64 + 1;
            tx.execute_batch(migration)?;
            match self {
                // A pragma takes no bound parameters; the version is a number we made.
                VersionStore::UserVersion => {
                    tx.execute_batch(&format!("PRAGMA user_version = {version}"))?
                }
                VersionStore::Table => {
                    tx.execute(
                        "INSERT INTO schema_version (version, applied_ms) VALUES (?1, ?2)",
                        rusqlite::params![version, now_ms()],
                    )?;
                }
            }
        }
        Ok(())
    }
}

/// The schema of one kind of file.
#[derive(Debug, Clone, Copy)]
pub struct Schema {
    pub version_store: VersionStore,
    /// Migration N (index N-1) takes the schema from version N-1 to N; the
    /// current version is their number.
    pub migrations: &'static [&'static str],
    /// `PRAGMA foreign_keys = ON` on the connection.
    pub foreign_keys: bool,
}

impl Schema {
    /// The schema version this binary creates and understands.
    pub fn version(&self) -> i64 {
        self.migrations.len() as i64
    }
}

/// What opening or using a database can fail with. The owning module turns
/// it into its own error (whose message says what the file is).
#[derive(Debug, thiserror::Error)]
pub enum SqliteError {
    #[error("{path} is not a SQLite database (left untouched)")]
    NotSqlite { path: PathBuf },
    #[error(
        "{path} has schema version {found}, newer than the {supported} this lazarus knows (left untouched)"
    )]
    NewerSchema {
        path: PathBuf,
        found: i64,
        supported: i64,
    },
    #[error(
        "{path}: still busy after retrying for {waited_secs} s; another process holds the write lock"
    )]
    Busy { path: PathBuf, waited_secs: u64 },
    #[error("{path}: cannot switch to WAL journal mode (got {mode})")]
    NoWal { path: PathBuf, mode: String },
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
}

/// Why a transaction's closure stopped: SQLite (retried when busy), or a
/// verdict `E` of the caller's, returned as it is.
pub enum TxError<E> {
    Sql(rusqlite::Error),
    Refused(E),
}

impl<E> From<rusqlite::Error> for TxError<E> {
    fn from(err: rusqlite::Error) -> Self {
        TxError::Sql(err)
    }
}

/// Makes `$owner`, the error enum of a module that owns a SQLite file, the
/// error of that file: `From<SqliteError>` onto its variants `NotSqlite`,
/// `NewerSchema`, `Busy`, `Sqlite`, `Io` and `Invalid(String)` (same fields;
/// the owner's messages say what the file is), and `From<$owner>` for
/// `TxError<$owner>` (a verdict inside a transaction).
macro_rules! sqlite_owner_error {
    ($owner:ty) => {
        impl From<$crate::sqlite::SqliteError> for $owner {
            fn from(err: $crate::sqlite::SqliteError) -> Self {
                use $crate::sqlite::SqliteError as E;
                match err {
                    E::NotSqlite { path } => Self::NotSqlite { path },
                    E::NewerSchema {
                        path,
                        found,
                        supported,
                    } => Self::NewerSchema {
                        path,
                        found,
                        supported,
                    },
                    E::Busy { path, waited_secs } => Self::Busy { path, waited_secs },
                    E::Sqlite { path, error } => Self::Sqlite { path, error },
                    E::Io { path, error } => Self::Io { path, error },
                    E::NoWal { .. } => Self::Invalid(err.to_string()),
                }
            }
        }

        impl From<$owner> for $crate::sqlite::TxError<$owner> {
            fn from(err: $owner) -> Self {
                $crate::sqlite::TxError::Refused(err)
            }
        }
    };
}
pub(crate) use sqlite_owner_error;

/// One SQLite file behind one connection: usable from several threads (the
/// connection sits behind a mutex) and processes (SQLite's locks).
pub struct Database {
    path: PathBuf,
    connection: Mutex<Connection>,
}

impl std::fmt::Debug for Database {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Database")
            .field("path", &self.path)
            .finish()
    }
}

impl Database {
    /// Opens (creating it and its folder if absent) the database at `path`,
    /// refuses a file that is not SQLite or has a newer schema before
    /// writing anything, switches to WAL and runs the missing migrations.
    pub fn open(path: &Path, schema: &Schema) -> Result<Self, SqliteError> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|error| SqliteError::Io {
                path: parent.to_path_buf(),
                error,
            })?;
        }
        let sql_err = |error| SqliteError::Sqlite {
            path: path.to_path_buf(),
            error,
        };
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let connection = Connection::open_with_flags(path, flags).map_err(sql_err)?;
        connection.busy_timeout(BUSY_TIMEOUT).map_err(sql_err)?;
        let db = Self {
            path: path.to_path_buf(),
            connection: Mutex::new(connection),
        };
        let store = schema.version_store;
        // Validate before writing anything: reading the version changes
        // nothing, and SQLite checks the file's header on this first read.
        // (Not by reading the file ourselves: closing another descriptor of
        // a database file drops this process's POSIX locks on it, those of
        // its open connections included, after which another process can
        // take itself for the last connection and remove the WAL under
        // them: their later commits stayed invisible until they closed.)
        let version = db
            .retry_busy::<_, SqliteError>(|conn| Ok(store.read(conn)?))
            .map_err(|error| match error {
                SqliteError::Sqlite { path, error } if is_not_a_database(&error) => {
                    SqliteError::NotSqlite { path }
                }
                other => other,
            })?;
        db.check_version(version, schema)?;
        db.retry_busy::<_, SqliteError>(|conn| {
            let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0))?;
            if !mode.eq_ignore_ascii_case("wal") {
                return Err(TxError::Refused(SqliteError::NoWal {
                    path: path.to_path_buf(),
                    mode,
                }));
            }
            conn.execute_batch("PRAGMA synchronous = NORMAL")?;
            if schema.foreign_keys {
                conn.execute_batch("PRAGMA foreign_keys = ON")?;
            }
            Ok(())
        })?;
        db.write::<_, SqliteError>(|tx| {
            // Another process may have migrated since the check above.
            let version = store.read(tx)?;
            db.check_version(version, schema)
                .map_err(TxError::Refused)?;
            if version < schema.version() {
                store.migrate(tx, version, schema.migrations)?;
            }
            Ok(())
        })?;
        Ok(db)
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn check_version(&self, version: i64, schema: &Schema) -> Result<(), SqliteError> {
        if version > schema.version() {
            Err(SqliteError::NewerSchema {
                path: self.path.clone(),
                found: version,
                supported: schema.version(),
            })
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

    /// Runs `op` on the connection, retrying SQLITE_BUSY with backoff.
    pub fn retry_busy<T, E: From<SqliteError>>(
        &self,
        mut op: impl FnMut(&mut Connection) -> Result<T, TxError<E>>,
    ) -> Result<T, E> {
        let mut conn = self.lock();
        let started = Instant::now();
        let mut delay = Duration::from_millis(1);
        loop {
            match op(&mut conn) {
                Ok(value) => return Ok(value),
                Err(TxError::Sql(err)) if is_busy(&err) => {
                    if started.elapsed() >= BUSY_GIVE_UP {
                        return Err(SqliteError::Busy {
                            path: self.path.clone(),
                            waited_secs: started.elapsed().as_secs(),
                        }
                        .into());
                    }
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(Duration::from_millis(100));
                }
                Err(TxError::Sql(error)) => {
                    return Err(SqliteError::Sqlite {
                        path: self.path.clone(),
                        error,
                    }
                    .into());
                }
                Err(TxError::Refused(err)) => return Err(err),
            }
        }
    }

    /// Runs `op` in a `BEGIN IMMEDIATE` transaction; commits on `Ok`, rolls
    /// back on `Err`; busy is retried (so `op` may run more than once).
    pub fn write<T, E: From<SqliteError>>(
        &self,
        op: impl FnMut(&Transaction<'_>) -> Result<T, TxError<E>>,
    ) -> Result<T, E> {
        self.transact(TransactionBehavior::Immediate, op)
    }

    /// Runs `op` in a read transaction (one consistent snapshot); busy is retried.
    pub fn read<T, E: From<SqliteError>>(
        &self,
        op: impl FnMut(&Transaction<'_>) -> Result<T, TxError<E>>,
    ) -> Result<T, E> {
        self.transact(TransactionBehavior::Deferred, op)
    }

    fn transact<T, E: From<SqliteError>>(
        &self,
        behavior: TransactionBehavior,
        mut op: impl FnMut(&Transaction<'_>) -> Result<T, TxError<E>>,
    ) -> Result<T, E> {
        self.retry_busy(|conn| {
            let tx = conn.transaction_with_behavior(behavior)?;
            let value = op(&tx)?;
            tx.commit()?;
            Ok(value)
        })
    }
}

fn is_busy(err: &rusqlite::Error) -> bool {
    matches!(
        err,
        rusqlite::Error::SqliteFailure(e, _)
            if matches!(e.code, ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked)
    )
}

/// Milliseconds since the Unix epoch by the system clock.
fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// SQLite's answer for a file that is not a database (on the first read of
/// a connection: how every SQLite file lazarus keeps is checked).
pub(crate) fn is_not_a_database(err: &rusqlite::Error) -> bool {
    matches!(
        err,
        rusqlite::Error::SqliteFailure(e, _) if e.code == ErrorCode::NotADatabase
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const TWO_STEPS: &[&str] = &[
        "CREATE TABLE a (x INTEGER NOT NULL)",
        "CREATE TABLE b (y INTEGER NOT NULL)",
    ];

    fn schema(store: VersionStore, migrations: &'static [&'static str]) -> Schema {
        Schema {
            version_store: store,
            migrations,
            foreign_keys: false,
        }
    }

    fn tables(db: &Database) -> Vec<String> {
        db.read(|tx| -> Result<_, TxError<SqliteError>> {
            let mut statement = tx.prepare(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name IN ('a', 'b')
                 ORDER BY name",
            )?;
            let names = statement
                .query_map([], |row| row.get(0))?
                .collect::<Result<_, _>>()?;
            Ok(names)
        })
        .unwrap()
    }

    /// A file at version 1 reopened by a binary that knows version 2 runs
    /// only migration 2, and records it where that file keeps its version.
    #[test]
    fn migrations_run_once_each_in_both_version_stores() {
        for store in [VersionStore::UserVersion, VersionStore::Table] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("nested/file.db");
            let db = Database::open(&path, &schema(store, &TWO_STEPS[..1])).unwrap();
            assert_eq!(tables(&db), ["a"]);
            drop(db);
            let db = Database::open(&path, &schema(store, TWO_STEPS)).unwrap();
            assert_eq!(tables(&db), ["a", "b"], "{store:?}");
            let version = db
                .retry_busy(|conn| -> Result<i64, TxError<SqliteError>> { Ok(store.read(conn)?) })
                .unwrap();
            assert_eq!(version, 2, "{store:?}");
            drop(db);
            // Reopening at the same version runs nothing (a rerun would fail:
            // the tables exist).
            Database::open(&path, &schema(store, TWO_STEPS)).unwrap();
        }
    }

    #[test]
    fn newer_schema_and_foreign_files_are_refused_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("file.db");
        drop(Database::open(&path, &schema(VersionStore::Table, TWO_STEPS)).unwrap());
        let before = std::fs::read(&path).unwrap();
        let err = Database::open(&path, &schema(VersionStore::Table, &TWO_STEPS[..1])).unwrap_err();
        assert!(
            matches!(
                err,
                SqliteError::NewerSchema {
                    found: 2,
                    supported: 1,
                    ..
                }
            ),
            "{err}"
        );
        assert_eq!(std::fs::read(&path).unwrap(), before, "left untouched");

        let text = dir.path().join("notes.db");
        std::fs::write(&text, "not a database, just notes\n").unwrap();
        let err = Database::open(&text, &schema(VersionStore::UserVersion, TWO_STEPS)).unwrap_err();
        assert!(matches!(err, SqliteError::NotSqlite { .. }), "{err}");
        assert_eq!(
            std::fs::read_to_string(&text).unwrap(),
            "not a database, just notes\n"
        );
    }
}

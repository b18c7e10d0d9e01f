//! The experiments database (`experiments/experiments.db`), run folders
//! (`experiments/runs/<id>/`), the queries behind `lazarus experiments`, and
//! plots.
//!
//! # Recording a run (what `train` and `sweep` call)
//!
//! ```no_run
//! use lazarus::experiments::{ExperimentsDb, ParamValue, RunStart, RunStatus};
//! # fn main() -> Result<(), lazarus::experiments::ExperimentsError> {
//! let layout = lazarus::layout::Layout::new(".");
//! let db = ExperimentsDb::open(&layout)?; // creates, migrates, reaps dead runs
//! if let Some(run) = db.find_finished("CONFIG-HASH")? {
//!     println!("already trained as {run}");
//!     return Ok(());
//! }
//! let run = db.start_run(RunStart {
//!     experiment: "elpv-heads".into(),
//!     dataset: "elpv".into(),
//!     encoder_fingerprint: "FINGERPRINT".into(),
//!     config_hash: "CONFIG-HASH".into(),
//!     params: vec![
//!         ("head".into(), ParamValue::Text("linear".into())),
//!         ("lr".into(), ParamValue::Number(1e-3)),
//!         ("seed".into(), ParamValue::Number(0.0)),
//!     ],
//!     tags: vec![("sweep".into(), "lr-grid".into())],
//! })?;
//! for epoch in 1..=3u64 {
//!     run.log_metrics(epoch, &[("train_loss", 0.5), ("val_loss", 0.6)])?;
//! }
//! run.write_artifact("metrics.json", b"{}")?;
//! run.finish(RunStatus::Finished, &[("val_accuracy", 0.9)])?;
//! # Ok(()) }
//! ```
//!
//! - [`ExperimentsDb::open`] creates the file (WAL, busy timeout, the
//!   `schema_version` table and migrations), refuses a file that is not SQLite
//!   or has a newer schema, and marks runs of this host whose process died as
//!   `KILLED`.
//! - [`ExperimentsDb::start_run`] picks a run id (`YYYYMMDD-HHMMSS-NNN`, UTC,
//!   sortable, unique across processes sharing the file), creates the run
//!   folder, takes an exclusive lock on its `.lock` file and records the git
//!   revision (`git rev-parse HEAD` in the root, or null) and host.
//! - [`RunHandle`] logs per-step metrics (one transaction per call), writes
//!   artifacts atomically into the run folder, and finishes the run with a
//!   status and summary metrics. A handle dropped without `finish` marks the
//!   run `FAILED`.
//!
//! # Liveness
//!
//! A running process holds an exclusive OS lock (`flock`) on
//! `runs/<id>/.lock` for as long as its run is `RUNNING`; the lock is taken
//! before the row becomes visible and released after the final status is
//! committed. At open, a `RUNNING` run *of this host* whose lock can be taken
//! (or whose lock file is gone) belongs to a dead process and becomes
//! `KILLED`. Runs recorded by other hosts are left to be reaped there: file
//! locks are not reliable across network file systems.
//!
//! # Queries
//!
//! [`ExperimentsDb::list_runs`], [`ExperimentsDb::show_run`],
//! [`ExperimentsDb::compare_runs`], [`ExperimentsDb::best_runs`] and
//! [`ExperimentsDb::ablate`] return serialisable reports; each has a `table()`
//! that [`Table`] renders as aligned text or CSV. All SQL is parameterised.
//! An unknown metric or parameter is an error that lists the known ones.

mod db;
pub mod mlflow;
pub mod plots;
mod query;
pub mod report;
pub mod run_files;
mod table;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use db::{ExperimentsDb, RunHandle, SCHEMA_VERSION};
pub use query::{
    AblationQuery, AblationReport, AblationRow, Artifact, BestQuery, BestReport, BestRow,
    Comparison, ComparisonRow, Direction, MetricPoint, MetricSeries, RunDetail, RunFilter,
    RunRecord, RunSnapshot, Selection, Snapshot, WhereClause, direction_of, runs_table,
};
pub use table::{Cell, Table};

/// The folder of run `run_id` as `experiments/experiments.db` records it:
/// verbs that take a run id (`predict`, `export`, `review`, `--init-from`)
/// look it up, so an id is never taken as a path (`../../elsewhere`).
pub fn recorded_run_dir(
    layout: &crate::layout::Layout,
    run_id: &str,
) -> Result<PathBuf, ExperimentsError> {
    match ExperimentsDb::open_existing(layout)? {
        Some(db) => db.recorded_run_dir(run_id),
        None => Err(ExperimentsError::UnknownRun {
            path: db::experiments_db_path(layout),
            run: run_id.to_string(),
            known: 0,
        }),
    }
}

/// Status of a run. Stored as the upper-case name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum RunStatus {
    Running,
    Finished,
    Failed,
    Killed,
}

impl RunStatus {
    pub const ALL: [RunStatus; 4] = [
        RunStatus::Running,
        RunStatus::Finished,
        RunStatus::Failed,
        RunStatus::Killed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Running => "RUNNING",
            RunStatus::Finished => "FINISHED",
            RunStatus::Failed => "FAILED",
            RunStatus::Killed => "KILLED",
        }
    }

    /// Parses a status name, case-insensitively.
    pub fn parse(text: &str) -> Result<Self, ExperimentsError> {
        Self::ALL
            .into_iter()
            .find(|status| status.as_str().eq_ignore_ascii_case(text))
            .ok_or_else(|| {
                ExperimentsError::Invalid(format!(
                    "unknown run status `{text}`; known: RUNNING, FINISHED, FAILED, KILLED"
                ))
            })
    }
}

impl std::fmt::Display for RunStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A run parameter: numbers are stored as REAL so that queries compare them numerically.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ParamValue {
    Number(f64),
    Text(String),
}

impl std::fmt::Display for ParamValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            // f64's Display is the shortest text that reads back the same (32, 0.001).
            ParamValue::Number(value) => write!(f, "{value}"),
            ParamValue::Text(text) => f.write_str(text),
        }
    }
}

impl From<f64> for ParamValue {
    fn from(value: f64) -> Self {
        ParamValue::Number(value)
    }
}

impl From<&str> for ParamValue {
    fn from(value: &str) -> Self {
        ParamValue::Text(value.to_string())
    }
}

impl From<String> for ParamValue {
    fn from(value: String) -> Self {
        ParamValue::Text(value)
    }
}

/// What a run is, recorded when it starts.
#[derive(Debug, Clone, Default)]
pub struct RunStart {
    /// Experiment name; created on first use.
    pub experiment: String,
    /// Registered dataset name.
    pub dataset: String,
    /// Fingerprint of the encoder features the run trained on.
    pub encoder_fingerprint: String,
    /// Hash of the full training configuration; `find_finished` looks runs up by it.
    pub config_hash: String,
    /// Hyperparameters, one value per key.
    pub params: Vec<(String, ParamValue)>,
    /// Free-form labels, one value per key.
    pub tags: Vec<(String, String)>,
}

/// Errors of the experiments database, its queries and plots.
#[derive(Debug, thiserror::Error)]
pub enum ExperimentsError {
    #[error(transparent)]
    Output(#[from] crate::output_dir::OutputError),
    #[error(
        "{path} is not a SQLite database (left untouched); move it aside or pass another --root"
    )]
    NotSqlite { path: PathBuf },
    #[error(
        "{path} has experiments schema version {found}, newer than the {supported} this lazarus knows (left untouched); upgrade lazarus"
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
    #[error(
        "{path}: no run `{run}` ({known} runs recorded; `lazarus experiments list` shows them)"
    )]
    UnknownRun {
        path: PathBuf,
        run: String,
        known: usize,
    },
    #[error("unknown metric `{metric}`; known metrics: {}", list_or_none(.known))]
    UnknownMetric { metric: String, known: Vec<String> },
    #[error("unknown parameter `{param}`; known parameters: {}", list_or_none(.known))]
    UnknownParam { param: String, known: Vec<String> },
    #[error("{path}: run {run} already has metric `{key}` at step {step}")]
    DuplicateMetric {
        path: PathBuf,
        run: String,
        key: String,
        step: u64,
    },
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
    #[error("{path}: cannot draw the plot: {message}")]
    Plot { path: PathBuf, message: String },
    #[error("{0}")]
    Invalid(String),
}

fn list_or_none(known: &[String]) -> String {
    if known.is_empty() {
        "none recorded yet".to_string()
    } else {
        known.join(", ")
    }
}

pub(crate) fn io_error(
    path: impl Into<PathBuf>,
) -> impl FnOnce(std::io::Error) -> ExperimentsError {
    let path = path.into();
    move |error| ExperimentsError::Io { path, error }
}

/// A thread pool for work that waits on the disk more than on the CPU
/// (reading run folders, writing many small files): more threads than
/// cores keep the disk busy.
pub(crate) fn io_pool() -> Result<rayon::ThreadPool, ExperimentsError> {
    const IO_THREADS: usize = 8;
    rayon::ThreadPoolBuilder::new()
        .num_threads(IO_THREADS.max(rayon::current_num_threads()))
        .build()
        .map_err(|e| ExperimentsError::Invalid(format!("cannot start threads: {e}")))
}

//! Where things live under a lazarus root (`--root`, default: the current directory).
//!
//! ```text
//! ROOT/jobs/          queue database (queue.db, unless --queue names PostgreSQL)
//!                     and dataset manifests (datasets/NAME/)
//! ROOT/features/      feature shards, one folder per encoder fingerprint (shared by every dataset)
//! ROOT/experiments/   experiments.db and one folder per run
//! ```

use std::path::{Path, PathBuf};

use crate::queue::QueueLocation;

/// The runtime folders of one lazarus root, and the queue it uses.
#[derive(Debug, Clone)]
pub struct Layout {
    root: PathBuf,
    /// A shared queue (PostgreSQL) instead of the root's SQLite file.
    queue: Option<QueueLocation>,
}

impl Layout {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            queue: None,
        }
    }

    /// The same root with its jobs in `queue` (for example a PostgreSQL
    /// database that workers on many machines share).
    pub fn with_queue(mut self, queue: QueueLocation) -> Self {
        self.queue = Some(queue);
        self
    }

    /// The queue verbs open: the one given, else `jobs/queue.db`.
    pub fn queue(&self) -> QueueLocation {
        self.queue
            .clone()
            .unwrap_or_else(|| QueueLocation::Sqlite(self.queue_db()))
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn jobs_dir(&self) -> PathBuf {
        self.root.join("jobs")
    }

    pub fn queue_db(&self) -> PathBuf {
        self.jobs_dir().join("queue.db")
    }

    pub fn datasets_dir(&self) -> PathBuf {
        self.jobs_dir().join("datasets")
    }

    pub fn dataset_dir(&self, name: &str) -> PathBuf {
        self.datasets_dir().join(name)
    }

    pub fn features_dir(&self) -> PathBuf {
        self.root.join("features")
    }

    pub fn experiments_dir(&self) -> PathBuf {
        self.root.join("experiments")
    }
}

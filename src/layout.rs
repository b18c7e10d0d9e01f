//! Where things live under a lazarus root (`--root`, default: the current directory).
//!
//! ```text
//! ROOT/jobs/          queue database (queue.db) and dataset manifests (datasets/NAME/)
//! ROOT/features/      feature shards, one folder per dataset and encoder fingerprint
//! ROOT/experiments/   experiments.db and one folder per run
//! ```

use std::path::{Path, PathBuf};

/// The runtime folders of one lazarus root.
#[derive(Debug, Clone)]
pub struct Layout {
    root: PathBuf,
}

impl Layout {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
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

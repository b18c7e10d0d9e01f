//! `enqueue`, `run-worker`, `status`, `requeue` (issue 3; extraction in issue 5).

use clap::Args;
use lazarus::layout::Layout;

#[derive(Debug, Args)]
pub struct EnqueueArgs {
    /// Dataset name, as given to `lazarus dataset add`.
    #[arg(long)]
    pub dataset: String,
    /// Encoder name, see `lazarus encoders list`.
    #[arg(long)]
    pub encoder: String,
    /// Images per job.
    #[arg(long, default_value_t = 64)]
    pub chunk_size: usize,
    /// Print machine-readable JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct RunWorkerArgs {
    /// Print machine-readable JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Print machine-readable JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct RequeueArgs {
    /// Print machine-readable JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn enqueue(_layout: &Layout, _args: EnqueueArgs) -> anyhow::Result<()> {
    super::not_landed("enqueue", 3, "the job queue")
}

pub fn run_worker(_layout: &Layout, _args: RunWorkerArgs) -> anyhow::Result<()> {
    super::not_landed("run-worker", 5, "feature extraction")
}

pub fn status(_layout: &Layout, _args: StatusArgs) -> anyhow::Result<()> {
    super::not_landed("status", 3, "the job queue")
}

pub fn requeue(_layout: &Layout, _args: RequeueArgs) -> anyhow::Result<()> {
    super::not_landed("requeue", 3, "the job queue")
}

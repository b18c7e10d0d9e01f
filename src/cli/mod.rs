//! Command-line types (clap) and dispatch. Each verb lives in its own file and
//! turns its arguments into library settings; the work happens in the library.

mod dataset;
mod drift;
mod encoders;
mod experiments;
mod features;
mod predict;
mod queue;
mod review;
mod serve;
mod train;

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use lazarus::layout::Layout;
use lazarus::queue::QueueLocation;

#[derive(Debug, Parser)]
#[command(
    name = "lazarus",
    version,
    about = "Run a frozen image encoder once, in resumable micro-jobs; train small heads on the cached features.",
    propagate_version = true
)]
pub struct Cli {
    /// Folder that holds jobs/, features/ and experiments/.
    #[arg(long, global = true, default_value = ".", value_name = "DIR")]
    pub root: PathBuf,

    /// A PostgreSQL queue shared by workers on many machines
    /// (postgres://USER:PASSWORD@HOST:PORT/DATABASE); default: ROOT/jobs/queue.db.
    #[arg(
        long,
        global = true,
        env = "LAZARUS_QUEUE",
        value_name = "URL",
        hide_env_values = true
    )]
    pub queue: Option<String>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Register and inspect datasets (image folders, CSV/TSV manifests, label files).
    #[command(subcommand)]
    Dataset(dataset::DatasetCommand),
    /// Split a dataset into extraction jobs (chunks of images) in jobs/queue.db.
    Enqueue(queue::EnqueueArgs),
    /// Claim chunks under a lease and extract their features, until stopped.
    RunWorker(queue::RunWorkerArgs),
    /// Job and image counts per dataset and encoder, failures, throughput, ETA.
    Status(queue::StatusArgs),
    /// Bring failed or dead jobs back to pending.
    Requeue(queue::RequeueArgs),
    /// Check feature shards against their .done markers and the queue; --repair re-queues what is wrong.
    Verify(queue::VerifyArgs),
    /// Move feature shards between a shared feature store and ROOT/features.
    #[command(subcommand)]
    Features(features::FeaturesCommand),
    /// Train a head on cached features.
    Train(Box<train::TrainArgs>),
    /// Train a grid of heads in one pass over the cached features.
    Sweep(train::SweepArgs),
    /// Query runs, compare them and print ablation tables.
    #[command(subcommand)]
    Experiments(experiments::ExperimentsCommand),
    /// Run encoder and head on new images (a run's, or an exported bundle's).
    Predict(predict::PredictArgs),
    /// Write a run's head as a self-contained bundle folder.
    Export(predict::ExportArgs),
    /// List the unlabeled or mispredicted images most worth a look (CSV and contact sheet).
    Review(review::ReviewArgs),
    /// Compare two datasets' cached features: does the candidate look like the reference?
    Drift(drift::DriftArgs),
    /// Serve runs and bundles over HTTP (dynamic batching, metrics, audit trail).
    Serve(serve::ServeArgs),
    /// List the audit trail of `serve`: answered predictions, filtered.
    ServeLog(serve::ServeLogArgs),
    /// List the encoders lazarus knows.
    #[command(subcommand)]
    Encoders(encoders::EncodersCommand),
    /// Fetch and inspect pretrained weights in the local cache.
    #[command(subcommand)]
    Weights(encoders::WeightsCommand),
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    let mut layout = Layout::new(cli.root);
    if let Some(queue) = cli.queue.as_deref().filter(|q| !q.is_empty()) {
        layout = layout.with_queue(QueueLocation::parse(queue)?);
    }
    match cli.command {
        Command::Dataset(command) => dataset::run(&layout, command),
        Command::Enqueue(args) => queue::enqueue(&layout, args),
        Command::RunWorker(args) => queue::run_worker(&layout, args),
        Command::Status(args) => queue::status(&layout, args),
        Command::Requeue(args) => queue::requeue(&layout, args),
        Command::Verify(args) => queue::verify(&layout, args),
        Command::Features(command) => features::run(&layout, command),
        Command::Train(args) => train::train(&layout, *args),
        Command::Sweep(args) => train::sweep(&layout, args),
        Command::Experiments(command) => experiments::run(&layout, command),
        Command::Predict(args) => predict::run(&layout, args),
        Command::Export(args) => predict::export(&layout, args),
        Command::Review(args) => review::run(&layout, args),
        Command::Drift(args) => drift::run(&layout, args),
        Command::Serve(args) => serve::serve(&layout, args),
        Command::ServeLog(args) => serve::serve_log(&layout, args),
        Command::Encoders(command) => encoders::run_encoders(&layout, command),
        Command::Weights(command) => encoders::run_weights(&layout, command),
    }
}

/// Prints a value as pretty JSON on stdout. A closed pipe (`| head`) is not an error.
pub fn print_json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    use std::io::Write;
    let text = serde_json::to_string_pretty(value)?;
    match writeln!(std::io::stdout().lock(), "{text}") {
        Err(err) if err.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other?),
    }
}

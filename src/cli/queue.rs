//! `enqueue`, `run-worker`, `status`, `requeue`, `verify`.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use lazarus::encoders::{InputChoice, InputResize};
use lazarus::extract::jobs::JobRunner;
use lazarus::extract::plan::{self, EnqueueRequest, NoopPayload, WeightsChoice};
use lazarus::extract::report::{self, StatusReport};
use lazarus::extract::run::{self, ExtractConfig, Extractor, Reporting};
use lazarus::extract::verify::VerifyConfig;
use lazarus::features::ReconcileConfig;
use lazarus::features::store::{self, FeatureStore};
use lazarus::layout::Layout;
use lazarus::queue::worker::{self, StopDeadline, StopReason, WorkerConfig};
use lazarus::queue::{RequeueFilter, RetryPolicy};

#[derive(Debug, Args)]
#[command(group = clap::ArgGroup::new("spatial_output").args(["spatial", "cache_at"]).multiple(true))]
pub struct EnqueueArgs {
    /// Dataset name, as given to `lazarus dataset add`.
    #[arg(long, required_unless_present = "noop_jobs")]
    pub dataset: Option<String>,
    /// Encoder name, see `lazarus encoders list`.
    #[arg(long, required_unless_present = "noop_jobs")]
    pub encoder: Option<String>,
    /// Images per job.
    #[arg(long, default_value_t = 64)]
    pub chunk_size: usize,
    /// Redo every image: retire this configuration's jobs and enqueue all images again.
    #[arg(long)]
    pub force: bool,
    /// Store the encoder's feature maps per tile for segmentation (Lite: the
    /// stride-16 and stride-32 maps; DINOv2: patch tokens), not the pooled
    /// features of the center crop. A separate feature set (own fingerprint).
    #[arg(long)]
    pub spatial: bool,
    /// Which layers pooled features are made of: `last` (the encoder's own),
    /// `all` (EfficientNet-Lite: each of its 7 stages and the head, each
    /// averaged over its pixels and concatenated) or a list such as
    /// `5,6,7,head`. A separate feature set (own fingerprint).
    #[arg(
        long,
        default_value = "last",
        value_name = "last|all|LIST",
        conflicts_with_all = ["spatial", "cache_at"]
    )]
    pub layers: String,
    /// With --spatial: which maps each tile keeps, a list of strides from
    /// 4, 8, 16 and 32 (default `16,32`). EfficientNet-Lite only for
    /// anything else: 4 and 8 are the outputs of its second and third
    /// stages (24 and 40 channels for Lite0), computed in the same forward
    /// pass; the finest map sets the segmentation grid (stride 4: 56×56 per
    /// 224 tile). A separate feature set (own fingerprint).
    #[arg(long, value_name = "LIST")]
    pub maps: Option<String>,
    /// Cache the activations after encoder block K (spatial, f16), what
    /// `train --unfreeze-from K` trains the later blocks from: for
    /// EfficientNet-Lite the map that is block K's output (lite0: 2 is the
    /// stride-4 map, 4 stride 8, 10 stride 16). Implies --spatial; the same
    /// feature set as `--spatial --maps` with that stride (added to --maps
    /// when given).
    #[arg(long, value_name = "K")]
    pub cache_at: Option<usize>,
    /// Features at this input square (pixels) instead of the encoder's own
    /// (EfficientNet-Lite only); e.g. an image's native size. With
    /// --spatial or --cache-at each tile is stretched to it, so the maps
    /// grow with it (300 px: a 38 x 38 stride-8 map instead of 28 x 28).
    #[arg(long, value_name = "N")]
    pub image_size: Option<u32>,
    /// How an image becomes the input square: `crop` (shorter side to
    /// size / 0.875, then the center, the default), `stretch` (the whole
    /// image, aspect ratio ignored) or `pad` (the whole image, aspect ratio
    /// kept, centered on the mean colour). Spatial tiles are always
    /// stretched.
    #[arg(long, value_enum)]
    pub resize: Option<ResizeArg>,
    /// Also encode flipped or rotated copies of each image's input square,
    /// a feature row each: `1` (the image alone), `flips` (identity,
    /// horizontal flip, vertical flip, both) or `dihedral` (the rotations
    /// by 0, 90, 180 and 270 degrees clockwise, then each transposed).
    /// Training samples a view per image each epoch and evaluation averages
    /// over them. Extraction costs that many times as much. A separate
    /// feature set (own fingerprint).
    #[arg(
        long,
        default_value = "1",
        value_name = "1|flips|dihedral",
        conflicts_with_all = ["spatial", "cache_at"]
    )]
    pub views: String,
    /// With --spatial or --cache-at: images larger than this (pixels, either side) are cut into tiles.
    #[arg(long, default_value_t = 512, requires = "spatial_output")]
    pub tile_size: u32,
    /// With --spatial or --cache-at: pixels shared by neighbouring tiles.
    #[arg(long, default_value_t = 64, requires = "spatial_output")]
    pub tile_overlap: u32,
    /// Weights to use instead of the installed ones: a safetensors FILE, or random:SEED.
    #[arg(long, value_name = "FILE|random:SEED")]
    pub weights: Option<String>,
    /// Print machine-readable JSON.
    #[arg(long)]
    pub json: bool,
    /// Enqueue N no-op jobs instead (tests and benchmarks).
    #[arg(long, hide = true, value_name = "N", conflicts_with_all = ["dataset", "encoder"])]
    pub noop_jobs: Option<u64>,
    /// No-op jobs leave a marker file per execution in DIR.
    #[arg(long, hide = true, value_name = "DIR", requires = "noop_jobs")]
    pub noop_marker_dir: Option<PathBuf>,
    /// Each no-op job takes this long, giving up early on SIGINT/SIGTERM.
    #[arg(
        long,
        hide = true,
        value_name = "MS",
        default_value_t = 0,
        requires = "noop_jobs"
    )]
    pub noop_sleep_ms: u64,
    /// No-op jobs sleep through SIGINT/SIGTERM (a hung job).
    #[arg(long, hide = true, requires = "noop_jobs")]
    pub noop_ignore_stop: bool,
    /// No-op jobs panic with this message (a bug inside a job).
    #[arg(long, hide = true, value_name = "MESSAGE", requires = "noop_jobs")]
    pub noop_panic: Option<String>,
}

#[derive(Debug, Args)]
pub struct RunWorkerArgs {
    /// Lease length in seconds; the worker renews it every third of that while a job runs.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    pub lease_secs: u64,
    /// Exit once no job this worker can run is left, instead of waiting for more.
    #[arg(long)]
    pub until_empty: bool,
    /// Exit after this many jobs.
    #[arg(long, value_name = "N")]
    pub max_jobs: Option<u64>,
    /// Name recorded on claimed jobs (default: worker-PID).
    #[arg(long, value_name = "ID")]
    pub worker_id: Option<String>,
    /// Threads for decoding and the encoder (default: all cores).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub threads: Option<u64>,
    /// Where the encoder runs; `cuda` needs a build with `--features cuda`.
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: DeviceArg,
    /// Images per encoder forward pass.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..))]
    pub batch_size: u64,
    /// Publish shards to this store instead of ROOT/features: file:///ABSOLUTE/PATH
    /// (e.g. a shared mount) or s3://BUCKET/PREFIX (builds with the `s3` feature).
    #[arg(
        long,
        env = "LAZARUS_FEATURE_STORE",
        value_name = "URL",
        hide_env_values = true
    )]
    pub feature_store: Option<String>,
    /// After SIGINT/SIGTERM, how long the running job may take to finish or
    /// give up; after that its lease is released and the worker exits with
    /// status 1. A second signal exits at once (the lease then expires).
    #[arg(long, default_value_t = 20, value_name = "SECS")]
    pub stop_grace_secs: u64,
    /// First retry delay of jobs this worker fails, in milliseconds (tests).
    #[arg(long, hide = true, value_name = "MS")]
    pub retry_delay_ms: Option<u64>,
    /// Print machine-readable JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Only this dataset.
    #[arg(long, value_name = "NAME")]
    pub dataset: Option<String>,
    /// Print machine-readable JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// Only this dataset.
    #[arg(long, value_name = "NAME")]
    pub dataset: Option<String>,
    /// Re-queue jobs whose shards are missing or corrupt and remove stale files
    /// (run it when no worker is writing).
    #[arg(long)]
    pub repair: bool,
    /// Check the shards in this store instead of ROOT/features: file:///ABSOLUTE/PATH
    /// (e.g. a shared mount) or s3://BUCKET/PREFIX (builds with the `s3` feature).
    #[arg(
        long,
        env = "LAZARUS_FEATURE_STORE",
        value_name = "URL",
        hide_env_values = true
    )]
    pub feature_store: Option<String>,
    /// Print machine-readable JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct RequeueArgs {
    /// Only this dataset's jobs.
    #[arg(long, value_name = "NAME")]
    pub dataset: Option<String>,
    /// Dead jobs (attempts exhausted). Without --dead or --failed: both.
    #[arg(long)]
    pub dead: bool,
    /// Failed jobs waiting for a retry. Without --dead or --failed: both.
    #[arg(long)]
    pub failed: bool,
    /// Print machine-readable JSON.
    #[arg(long)]
    pub json: bool,
}

/// `enqueue --resize`.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum ResizeArg {
    Crop,
    Stretch,
    Pad,
}

/// Which pooled feature folder a verb reads when a dataset has several
/// (`train`, `drift`): the options `enqueue` made it with.
#[derive(Debug, Args)]
pub struct PooledFolderArgs {
    /// Only features of these pooled layers (as `enqueue --layers`: `last`,
    /// `all` or a list such as `5,6,7,head`).
    #[arg(long, value_name = "last|all|LIST")]
    pub layers: Option<String>,
    /// Only features extracted at this input square (`enqueue --image-size`).
    #[arg(long, value_name = "N")]
    pub image_size: Option<u32>,
    /// Only features extracted with this resize policy (`enqueue --resize`).
    #[arg(long, value_enum)]
    pub resize: Option<ResizeArg>,
    /// Only features of these views per image (`enqueue --views`: `1`,
    /// `flips` or `dihedral`).
    #[arg(long, value_name = "1|flips|dihedral")]
    pub views: Option<String>,
}

impl PooledFolderArgs {
    /// The library's filter, layers in canonical form.
    pub fn choice(&self) -> anyhow::Result<lazarus::features::catalog::PooledChoice> {
        let layers = self
            .layers
            .as_deref()
            .map(lazarus::encoders::PooledLayers::parse)
            .transpose()?;
        Ok(lazarus::features::catalog::PooledChoice {
            layers: layers.map(|layers| layers.to_string()),
            image_size: self.image_size,
            resize: self.resize.map(|resize| resize.name().to_string()),
            views: self
                .views
                .as_deref()
                .map(str::parse::<lazarus::encoders::ViewSet>)
                .transpose()?
                .map(|views| views.name().to_string()),
            maps: None,
        })
    }
}

impl ResizeArg {
    /// The name as the flag and the feature folders spell it.
    pub fn name(self) -> &'static str {
        match self {
            ResizeArg::Crop => "crop",
            ResizeArg::Stretch => "stretch",
            ResizeArg::Pad => "pad",
        }
    }
}

/// `--image-size` and `--resize` as the library takes them: either alone
/// keeps the other as the encoder has it (its size; `crop`).
fn input_choice(
    encoder: &str,
    image_size: Option<u32>,
    resize: Option<ResizeArg>,
) -> anyhow::Result<Option<InputChoice>> {
    if image_size.is_none() && resize.is_none() {
        return Ok(None);
    }
    let spec = lazarus::encoders::lookup(encoder)?;
    Ok(Some(InputChoice {
        size: image_size.unwrap_or(spec.input_size),
        resize: match resize {
            Some(ResizeArg::Stretch) => InputResize::Stretch,
            Some(ResizeArg::Pad) => InputResize::Pad,
            Some(ResizeArg::Crop) | None => InputResize::Crop,
        },
    }))
}

pub fn enqueue(layout: &Layout, args: EnqueueArgs) -> anyhow::Result<()> {
    if let Some(count) = args.noop_jobs {
        let payload = NoopPayload {
            marker_dir: args.noop_marker_dir,
            fail_items: Vec::new(),
            sleep_ms: args.noop_sleep_ms,
            ignore_stop: args.noop_ignore_stop,
            panic: args.noop_panic,
        };
        let outcome = plan::enqueue_noop(layout, count, &payload)?;
        if args.json {
            return super::print_json(&outcome);
        }
        println!(
            "{} no-op jobs added to {}",
            outcome.jobs_added, outcome.queue
        );
        return Ok(());
    }
    let image_size = args.image_size;
    let (Some(dataset), Some(encoder)) = (args.dataset, args.encoder) else {
        bail!("--dataset and --encoder are required");
    };
    let weights = match args.weights.as_deref() {
        Some(value) => WeightsChoice::parse(value)?,
        None => WeightsChoice::Installed,
    };
    let request = EnqueueRequest {
        dataset,
        encoder: encoder.clone(),
        chunk_size: args.chunk_size,
        force: args.force,
        spatial: args.spatial || args.cache_at.is_some(),
        tiling: lazarus::spatial::tile::TileConfig {
            size: args.tile_size,
            overlap: args.tile_overlap,
        },
        weights,
        layers: lazarus::encoders::PooledLayers::parse(&args.layers)?,
        maps: match (&args.maps, args.cache_at) {
            (None, None) => lazarus::encoders::SpatialMaps::default(),
            (Some(value), None) if !args.spatial => {
                bail!("--maps '{value}': maps are kept by spatial extraction only; add --spatial")
            }
            (Some(value), None) => lazarus::encoders::SpatialMaps::parse(value)?,
            (also, Some(after_block)) => lazarus::encoders::SpatialMaps::cache_at(
                &encoder,
                after_block,
                also.as_deref()
                    .map(lazarus::encoders::SpatialMaps::parse)
                    .transpose()?,
            )?,
        },
        input: match input_choice(&encoder, image_size, args.resize)? {
            // Spatial tiles are stretched whole (no crop), whatever the
            // size; another --resize is refused by name.
            Some(input) if (args.spatial || args.cache_at.is_some()) && args.resize.is_none() => {
                Some(lazarus::encoders::InputChoice {
                    resize: lazarus::encoders::InputResize::Stretch,
                    ..input
                })
            }
            input => input,
        },
        views: args.views.parse()?,
    };
    let outcome = plan::enqueue(layout, &request)?;
    if args.json {
        return super::print_json(&outcome);
    }
    println!(
        "{} / {} (fingerprint {}): {} images, {} already covered{}; {} images in {} new jobs",
        outcome.dataset,
        outcome.encoder,
        &outcome.fingerprint[..12],
        outcome.images,
        outcome.already_covered,
        if outcome.superseded > 0 {
            format!(
                ", {} old jobs retired by --force ({} of their shards removed)",
                outcome.superseded, outcome.shards_removed
            )
        } else {
            String::new()
        },
        outcome.images_enqueued,
        outcome.jobs_added,
    );
    Ok(())
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum DeviceArg {
    Cpu,
    Cuda,
}

pub(super) fn device(arg: DeviceArg) -> anyhow::Result<candle_core::Device> {
    match arg {
        DeviceArg::Cpu => Ok(candle_core::Device::Cpu),
        DeviceArg::Cuda => candle_core::Device::new_cuda(0).context(
            "--device cuda: no usable CUDA device (is this binary built with --features cuda?)",
        ),
    }
}

/// A progress bar over the images still to extract on a terminal, plain lines otherwise.
fn reporting(layout: &Layout, json: bool) -> Reporting {
    use std::io::IsTerminal;
    if json {
        return Reporting::Silent;
    }
    if !std::io::stderr().is_terminal() {
        return Reporting::Lines;
    }
    let remaining = report::status(layout, None)
        .map(|s| {
            s.images
                .total
                .saturating_sub(s.images.done + s.images.failed)
        })
        .unwrap_or(0);
    let bar = indicatif::ProgressBar::new(remaining);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:30} {pos}/{len} images  {per_sec}  ETA {eta}  {wide_msg}",
        )
        .expect("valid template"),
    );
    Reporting::Bar(bar)
}

pub fn run_worker(layout: &Layout, args: RunWorkerArgs) -> anyhow::Result<()> {
    if let Some(threads) = args.threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads as usize)
            .build_global()
            .context("--threads: cannot size the thread pool")?;
    }
    let feature_store = open_feature_store(args.feature_store.as_deref())?;
    let reporting = reporting(layout, args.json);
    let extract_config = ExtractConfig {
        device: device(args.device)?,
        batch_size: args.batch_size as usize,
        reporting: reporting.clone(),
        feature_store: feature_store.clone(),
    };
    let stop = Arc::new(AtomicBool::new(false));
    let handler_flag = Arc::clone(&stop);
    let signals = AtomicU32::new(0);
    ctrlc::set_handler(move || {
        handler_flag.store(true, Ordering::SeqCst);
        if signals.fetch_add(1, Ordering::SeqCst) >= 1 {
            eprintln!(
                "error: second stop request: exiting now; a running job's lease expires on its own"
            );
            std::process::exit(1);
        }
    })
    .context("cannot install the SIGINT/SIGTERM handler")?;
    let queue = match args.retry_delay_ms {
        Some(ms) => layout.queue().open_with_policy(RetryPolicy {
            base_delay: Duration::from_millis(ms),
            ..RetryPolicy::default()
        })?,
        None => layout.queue().open()?,
    };
    let queue = queue.as_ref();
    let lease = Duration::from_secs(args.lease_secs);
    let reconciled = run::reconcile(
        layout,
        queue,
        &ReconcileConfig { grace: lease },
        feature_store.as_deref(),
    )?;
    if !args.json
        && (reconciled.removed_temp_files + reconciled.removed_unpublished > 0
            || !reconciled.reopened_jobs.is_empty())
    {
        eprintln!(
            "reconciled the feature cache: removed {} temp files and {} unpublished shards; {} done jobs had lost their shard and are pending again",
            reconciled.removed_temp_files,
            reconciled.removed_unpublished,
            reconciled.reopened_jobs.len()
        );
    }
    if !reconciled.awaiting_migration.is_empty() {
        eprintln!(
            "{} done jobs have their shards in the feature layout before issue 18 and are left done; run `lazarus features migrate` to convert them",
            reconciled.awaiting_migration.len()
        );
    }
    let runner = JobRunner::new(Extractor::new(layout.clone(), extract_config));
    let config = WorkerConfig {
        worker_id: args
            .worker_id
            .unwrap_or_else(|| format!("worker-{}", std::process::id())),
        lease,
        until_empty: args.until_empty,
        max_jobs: args.max_jobs,
        poll_interval: Duration::from_millis(500),
        stop_deadline: Some(StopDeadline {
            grace: Duration::from_secs(args.stop_grace_secs),
            abandon: exit_abandoned,
        }),
    };
    let report = worker::run(queue, &runner, &config, &stop);
    if let Reporting::Bar(bar) = &reporting {
        bar.finish();
    }
    let report = report?;
    if report.stopped == StopReason::Blocked {
        let reasons: Vec<String> = report
            .blocked_kinds
            .iter()
            .map(|(kind, count)| {
                format!("{count} '{kind}' jobs (no executor for this kind in this build)")
            })
            .collect();
        bail!(
            "worker {} ran {} jobs; nothing left it can run: {} are unfinished in {}",
            report.worker,
            report.completed + report.failed,
            reasons.join(", "),
            queue.location()
        );
    }
    if args.json {
        super::print_json(&report)?;
    } else {
        println!(
            "worker {}: {} completed, {} failed, {} lost their lease, {} released; stopped: {:?}",
            report.worker,
            report.completed,
            report.failed,
            report.lease_lost,
            report.released,
            report.stopped
        );
        if report.superseded_discarded > 0 {
            println!(
                "{} of them superseded by `enqueue --force` while they ran: their shards removed",
                report.superseded_discarded
            );
        }
        if report.waited_for_running_ms > 0 {
            println!(
                "waited {:.1} s for jobs running under other workers' leases",
                report.waited_for_running_ms as f64 / 1000.0
            );
        }
    }
    // Why jobs failed goes to stderr in both modes: it is what to fix.
    for failure in &report.failures {
        eprintln!(
            "job {} failed (attempt {}): {}",
            failure.job_id, failure.attempt, failure.reason
        );
    }
    for failure in &report.discard_failures {
        eprintln!(
            "job {} (attempt {}) {}; `lazarus verify --repair` removes it",
            failure.job_id, failure.attempt, failure.reason
        );
    }
    if args.until_empty && report.completed == 0 && report.failed > 0 {
        bail!(
            "worker {} ran until the queue was empty and no job succeeded: {} failed (reasons above; `lazarus status` lists them, `lazarus requeue` retries dead jobs)",
            report.worker,
            report.failed
        );
    }
    Ok(())
}

/// The stop deadline passed with a job still running: its lease is already
/// released (or expires), so the process ends here.
fn exit_abandoned(abandoned: &worker::Abandoned) -> ! {
    let job = match abandoned.job {
        Some((job_id, attempt)) if abandoned.released => {
            format!("job {job_id} (attempt {attempt}) did not stop and is pending again")
        }
        Some((job_id, attempt)) => format!(
            "job {job_id} (attempt {attempt}) did not stop; its release was refused, so its lease expires on its own"
        ),
        None => "a queue call did not return".to_string(),
    };
    eprintln!(
        "error: worker {} stopped by a signal: {job} {} s after the stop request (--stop-grace-secs); exiting",
        abandoned.worker,
        abandoned.grace.as_secs()
    );
    std::process::exit(1)
}

/// The store a `--feature-store` value names; `None` (also for an empty
/// value) means the local features/ folder.
pub(super) fn open_feature_store(
    url: Option<&str>,
) -> anyhow::Result<Option<Arc<dyn FeatureStore>>> {
    match url.filter(|url| !url.is_empty()) {
        None => Ok(None),
        Some(url) => Ok(Some(
            store::open_store(url).context("--feature-store: cannot open the feature store")?,
        )),
    }
}

pub fn status(layout: &Layout, args: StatusArgs) -> anyhow::Result<()> {
    let report = report::status(layout, args.dataset.as_deref())?;
    if args.json {
        return super::print_json(&report);
    }
    print_status(&report);
    Ok(())
}

pub fn requeue(layout: &Layout, args: RequeueArgs) -> anyhow::Result<()> {
    let both = !args.dead && !args.failed;
    let filter = RequeueFilter {
        group: args.dataset,
        failed: args.failed || both,
        dead: args.dead || both,
    };
    let requeued = match layout.queue().open_existing()? {
        Some(queue) => queue.requeue(&filter)?,
        None => 0,
    };
    if args.json {
        return super::print_json(&serde_json::json!({ "requeued": requeued }));
    }
    println!("{requeued} jobs back to pending");
    Ok(())
}

fn rate(value: Option<f64>) -> String {
    value.map_or("-".to_string(), |v| format!("{v:.1}"))
}

fn eta(secs: Option<f64>) -> String {
    match secs {
        None => "-".to_string(),
        Some(s) if s < 60.0 => format!("{s:.0}s"),
        Some(s) if s < 3600.0 => format!("{:.0}m{:02.0}s", (s / 60.0).floor(), s % 60.0),
        Some(s) => format!("{:.0}h{:02.0}m", (s / 3600.0).floor(), (s % 3600.0) / 60.0),
    }
}

fn print_status(report: &StatusReport) {
    println!("queue: {}", report.queue);
    if report.groups.is_empty() {
        println!("no jobs");
        return;
    }
    println!(
        "{:<20} {:<20} {:<12} {:>8} {:>8} {:>8} {:>7} {:>6} {:>17} {:>8} {:>9} {:>8}",
        "DATASET",
        "ENCODER",
        "FINGERPRINT",
        "PENDING",
        "RUNNING",
        "DONE",
        "FAILED",
        "DEAD",
        "IMAGES DONE/TOTAL",
        "IMG FAIL",
        "IMAGES/S",
        "ETA"
    );
    for g in &report.groups {
        println!(
            "{:<20} {:<20} {:<12} {:>8} {:>8} {:>8} {:>7} {:>6} {:>17} {:>8} {:>9} {:>8}",
            g.dataset,
            g.encoder,
            &g.fingerprint[..g.fingerprint.len().min(12)],
            g.jobs.pending,
            g.jobs.running,
            g.jobs.done,
            g.jobs.failed,
            g.jobs.dead,
            format!("{}/{}", g.images.done, g.images.total),
            g.images.failed,
            rate(g.throughput.images_per_sec),
            eta(g.eta_secs),
        );
        if g.expired_leases > 0 {
            println!(
                "  {} running jobs have an expired lease (worker gone?)",
                g.expired_leases
            );
        }
    }
    println!(
        "total: jobs {} pending, {} running, {} done, {} failed, {} dead; images {}/{} done, {} failed; {} jobs/s, ETA {}",
        report.jobs.pending,
        report.jobs.running,
        report.jobs.done,
        report.jobs.failed,
        report.jobs.dead,
        report.images.done,
        report.images.total,
        report.images.failed,
        rate(report.throughput.jobs_per_sec),
        eta(report.eta_secs),
    );
    for f in &report.failed_images {
        println!(
            "failed image {} ({} / {}, job {}): {}",
            f.image, f.dataset, f.encoder, f.job_id, f.reason
        );
    }
    for j in &report.failed_jobs {
        println!(
            "failed job {} ({} / {}, {} tries, retried later): {}",
            j.job_id, j.dataset, j.encoder, j.tries, j.last_error
        );
    }
    for j in &report.dead_jobs {
        println!(
            "dead job {} ({} / {}, {} tries): {}",
            j.job_id, j.dataset, j.encoder, j.tries, j.last_error
        );
    }
}

pub fn verify(layout: &Layout, args: VerifyArgs) -> anyhow::Result<()> {
    let queue = layout.queue().open()?;
    let config = VerifyConfig {
        repair: args.repair,
        feature_store: open_feature_store(args.feature_store.as_deref())?,
    };
    let report =
        lazarus::extract::verify::verify(layout, queue.as_ref(), args.dataset.as_deref(), config)?;
    if args.json {
        super::print_json(&report)?;
    } else {
        for group in &report.groups {
            println!(
                "{} / {} ({}): {} rows for {} expected images; {} missing, {} duplicated, {} corrupt shards, {} stale shards{}",
                group.dataset,
                group.encoder,
                &group.fingerprint[..12.min(group.fingerprint.len())],
                group.rows,
                group.expected,
                group.missing.len(),
                group.duplicates.len(),
                group.corrupt.len(),
                group.stale_shards.len(),
                if group.reopened_jobs.is_empty() {
                    String::new()
                } else {
                    format!("; re-queued jobs {:?}", group.reopened_jobs)
                }
            );
            for (shard, reason) in &group.corrupt {
                println!("  corrupt shard {shard}: {reason}");
            }
        }
        println!("{}", if report.ok { "ok" } else { "NOT ok" });
    }
    if !report.ok {
        bail!(
            "features are incomplete or damaged: {} missing, {} duplicated, {} corrupt, {} stale{}",
            report.missing,
            report.duplicates,
            report.corrupt,
            report.stale,
            if args.repair {
                "; affected jobs are pending again: run `lazarus run-worker`"
            } else {
                "; `lazarus verify --repair` re-queues them"
            }
        );
    }
    Ok(())
}

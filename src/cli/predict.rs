//! `lazarus predict` and `lazarus export`: arguments to settings; the work is
//! in `lazarus::predict` and `lazarus::bundle`.

use std::path::PathBuf;

use anyhow::bail;
use clap::Args;
use lazarus::layout::Layout;
use lazarus::predict::{PredictConfig, dataset_images, predict_run};
use lazarus::train::config::Task;

use super::queue::DeviceArg;

#[derive(Debug, Args)]
pub struct PredictArgs {
    /// The trained run whose head (and encoder) to use.
    #[arg(
        long,
        value_name = "RUN",
        required_unless_present = "bundle",
        conflicts_with = "bundle"
    )]
    pub run: Option<String>,
    /// An exported bundle (`lazarus export`, any task) instead of a run:
    /// needs neither experiments/ nor the run's features.
    #[arg(long, value_name = "DIR")]
    pub bundle: Option<PathBuf>,
    /// Image files.
    #[arg(required_unless_present = "dataset", conflicts_with = "dataset")]
    pub images: Vec<PathBuf>,
    /// Every image of a registered dataset instead of files.
    #[arg(long, value_name = "NAME")]
    pub dataset: Option<String>,
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    pub top_k: u64,
    /// Also write the predictions to FILE.csv or FILE.json.
    #[arg(long, value_name = "FILE")]
    pub output: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: DeviceArg,
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..))]
    pub batch_size: u64,
    /// The task the run or bundle must hold (it is recorded there, so
    /// this only confirms it); inferred when omitted.
    #[arg(long, value_enum)]
    pub task: Option<super::train::TaskKind>,
    /// Segmentation: the folder for STEM.mask.png and STEM.overlay.png;
    /// patch-level anomaly runs: for STEM.heatmap.png and STEM.overlay.png.
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    #[arg(long)]
    pub json: bool,
}

pub fn run(layout: &Layout, args: PredictArgs) -> anyhow::Result<()> {
    if let Some(output) = &args.output {
        let extension = output.extension().and_then(|e| e.to_str()).unwrap_or("");
        if extension != "csv" && extension != "json" {
            bail!(
                "--output {}: use a .csv or .json file name",
                output.display()
            );
        }
    }
    let images = match &args.dataset {
        Some(name) => dataset_images(layout, name)?,
        None => args.images.clone(),
    };
    let config = PredictConfig {
        top_k: args.top_k as usize,
        device: super::queue::device(args.device)?,
        batch_size: args.batch_size as usize,
    };
    let predictions = match (&args.run, &args.bundle) {
        (Some(run), _) => {
            // --task only confirms what the run recorded; the run decides.
            if let Some(task) = args.task {
                let recorded = lazarus::predict::run_task(layout, run)?;
                let wanted = task_of(task);
                if recorded != wanted {
                    bail!(
                        "--task {}: run {run} is a {} run",
                        wanted.name(),
                        recorded.name()
                    );
                }
            }
            predict_run(layout, run, &images, &config, args.out.as_deref())?
        }
        (None, Some(bundle)) => lazarus::bundle::predict_with(
            bundle,
            &images,
            &config,
            &lazarus::bundle::BundlePredictConfig {
                cache_root: args.dataset.as_ref().map(|_| layout),
                task: args.task.map(task_of),
                out_dir: args.out.as_deref(),
            },
        )?,
        (None, None) => bail!("give --run RUN or --bundle DIR"),
    };
    if let Some(output) = &args.output {
        predictions.write(output)?;
    }
    if args.json {
        super::print_json(&predictions)?;
    } else {
        for line in predictions.lines() {
            match line {
                Ok(answer) => println!("{answer}"),
                Err(error) => eprintln!("{error}"),
            }
        }
    }
    let failed = predictions.failed();
    if failed > 0 {
        bail!(
            "{failed} of {} images could not be {}",
            predictions.len(),
            predictions.verb()
        );
    }
    Ok(())
}

fn task_of(kind: super::train::TaskKind) -> Task {
    match kind {
        super::train::TaskKind::Classify => Task::Classify,
        super::train::TaskKind::Anomaly => Task::Anomaly,
        super::train::TaskKind::Segment => Task::Segment,
    }
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    /// The finished run to export.
    pub run: String,
    /// The bundle folder to create (new or empty).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Replace a bundle lazarus exported to DIR before; a folder holding
    /// anything else is never replaced.
    #[arg(long)]
    pub force: bool,
    #[arg(long)]
    pub json: bool,
}

pub fn export(layout: &Layout, args: ExportArgs) -> anyhow::Result<()> {
    let options = lazarus::output_dir::ReplaceOptions { force: args.force };
    let report = lazarus::bundle::export(layout, &args.run, &args.out, options)?;
    if args.json {
        return super::print_json(&report);
    }
    println!(
        "run {} exported to {} ({} files; encoder {}, weights {})",
        report.run_id,
        report.bundle.display(),
        report.manifest.files.len() + 1,
        report.encoder.name,
        report.encoder.weights
    );
    for (name, entry) in &report.manifest.files {
        println!(
            "  {name:<18} {:>10} bytes  sha256 {}",
            entry.bytes, entry.sha256
        );
    }
    Ok(())
}

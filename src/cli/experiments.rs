//! `experiments list | show | compare | best | ablate | report | export`.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use lazarus::experiments::mlflow::{MlflowConfig, export_mlflow};
use lazarus::experiments::plots::{self, SweepPoint};
use lazarus::experiments::report::{ReportConfig, write_report};
use lazarus::experiments::{
    AblationQuery, BestQuery, ExperimentsDb, RunFilter, RunStatus, Selection, Table, WhereClause,
    runs_table,
};
use lazarus::layout::Layout;

use super::print_json;

#[derive(Debug, Subcommand)]
pub enum ExperimentsCommand {
    /// List runs, oldest first.
    List(ListArgs),
    /// Everything recorded about one run: fields, params, metrics, tags, artifacts.
    Show(ShowArgs),
    /// Runs side by side: the parameters that differ and the summary metrics.
    Compare(CompareArgs),
    /// The best finished runs by a summary metric (lowest for metrics ending in `loss`).
    Best(BestArgs),
    /// Mean ± std of a metric per parameter level over seeds, with the difference from a baseline.
    Ablate(AblateArgs),
    /// Write a static HTML report (runs, experiments, ablations, curves) that opens from file://.
    Report(ReportArgs),
    /// Write runs into another tracker's format: MLflow's file store.
    Export(ExportArgs),
}

#[derive(Debug, Args)]
pub struct OutputArgs {
    /// Print machine-readable JSON.
    #[arg(long, conflicts_with = "csv")]
    pub json: bool,
    /// Print CSV with a header row.
    #[arg(long)]
    pub csv: bool,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    /// Only runs of this experiment.
    #[arg(long)]
    pub experiment: Option<String>,
    /// Only runs with this status: running, finished, failed or killed.
    #[arg(long)]
    pub status: Option<String>,
    /// Only runs where a parameter (or experiment, dataset, status) has this
    /// value, e.g. dataset_version=2; repeatable.
    #[arg(long = "where", value_name = "KEY=VALUE")]
    pub wheres: Vec<String>,
    #[command(flatten)]
    pub output: OutputArgs,
}

#[derive(Debug, Args)]
pub struct ShowArgs {
    /// Run id, as printed by `experiments list`.
    pub run: String,
    #[command(flatten)]
    pub output: OutputArgs,
}

#[derive(Debug, Args)]
pub struct CompareArgs {
    /// Two or more run ids.
    #[arg(required = true, num_args = 2..)]
    pub runs: Vec<String>,
    #[command(flatten)]
    pub output: OutputArgs,
}

#[derive(Debug, Args)]
pub struct BestArgs {
    /// Summary metric to rank by, such as val_accuracy.
    #[arg(long)]
    pub metric: String,
    /// Only runs where a parameter (or experiment, dataset, status) has this value; repeatable.
    #[arg(long = "where", value_name = "KEY=VALUE")]
    pub wheres: Vec<String>,
    /// How many runs to show.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    pub top: u64,
    #[command(flatten)]
    pub output: OutputArgs,
}

#[derive(Debug, Args)]
pub struct AblateArgs {
    /// Parameters to group by, comma-separated: head or head,hidden_dim.
    #[arg(
        long,
        value_delimiter = ',',
        required = true,
        value_name = "PARAM[,PARAM]"
    )]
    pub by: Vec<String>,
    /// Summary metric to aggregate, such as val_accuracy.
    #[arg(long)]
    pub metric: String,
    /// Only runs where a parameter (or experiment, dataset, status) has this value; repeatable.
    #[arg(long = "where", value_name = "KEY=VALUE")]
    pub wheres: Vec<String>,
    /// Baseline level, one comma-separated value per --by parameter (default: the first level).
    #[arg(long, value_delimiter = ',', value_name = "VALUE[,VALUE]")]
    pub baseline: Option<Vec<String>>,
    /// Also draw the table as a chart: writes PATH.svg and PATH.png.
    #[arg(long, value_name = "PATH")]
    pub chart: Option<PathBuf>,
    #[command(flatten)]
    pub output: OutputArgs,
}

/// Which runs `report` and `export` cover.
#[derive(Debug, Args)]
pub struct SelectionArgs {
    /// Only runs of this experiment; repeatable.
    #[arg(long, value_name = "NAME")]
    pub experiment: Vec<String>,
    /// Only runs where a parameter (or experiment, dataset, status) has this value; repeatable.
    #[arg(long = "where", value_name = "KEY=VALUE")]
    pub wheres: Vec<String>,
}

impl SelectionArgs {
    fn selection(self) -> anyhow::Result<Selection> {
        Ok(Selection {
            wheres: parse_wheres(&self.wheres)?,
            experiments: self.experiment,
        })
    }
}

#[derive(Debug, Args)]
pub struct ReportArgs {
    /// The report's folder; replaced as a whole if it holds an earlier report, refused otherwise.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    #[command(flatten)]
    pub selection: SelectionArgs,
    /// The metric runs are ranked by first (default: test/accuracy, test/dice or test/roc_auc,
    /// whichever the runs recorded).
    #[arg(long)]
    pub metric: Option<String>,
    /// Also a comparison page of these runs (two or more ids, comma-separated); repeatable.
    #[arg(long, value_name = "RUN,RUN[,RUN]")]
    pub compare: Vec<String>,
    /// Run files larger than this many MiB are listed in the report, not copied.
    #[arg(long, value_name = "MIB", default_value_t = 32)]
    pub max_file_size: u64,
    /// Print what was written as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum ExportFormat {
    /// MLflow's file store (`mlflow ui --backend-store-uri DIR`).
    Mlflow,
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    /// The tracker's format.
    #[arg(long, value_enum)]
    pub format: ExportFormat,
    /// The store's folder: new, empty, or an existing MLflow file store (updated in place).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    #[command(flatten)]
    pub selection: SelectionArgs,
    /// Print what was written as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(layout: &Layout, command: ExperimentsCommand) -> anyhow::Result<()> {
    match command {
        ExperimentsCommand::List(args) => list(layout, args),
        ExperimentsCommand::Show(args) => {
            let db = existing(layout)?;
            let detail = db.show_run(&args.run)?;
            emit(&args.output, &detail, &detail.table())
        }
        ExperimentsCommand::Compare(args) => {
            let db = existing(layout)?;
            let comparison = db.compare_runs(&args.runs)?;
            emit(&args.output, &comparison, &comparison.table())
        }
        ExperimentsCommand::Best(args) => {
            let db = existing(layout)?;
            let report = db.best_runs(&BestQuery {
                metric: args.metric,
                wheres: parse_wheres(&args.wheres)?,
                top: args.top as usize,
            })?;
            emit(&args.output, &report, &report.table())
        }
        ExperimentsCommand::Ablate(args) => {
            let db = existing(layout)?;
            let report = db.ablate(&AblationQuery {
                by: args.by,
                metric: args.metric,
                wheres: parse_wheres(&args.wheres)?,
                baseline: args.baseline,
            })?;
            if let Some(stem) = &args.chart {
                let written =
                    plots::sweep_chart(stem, &report.metric, &SweepPoint::from_ablation(&report))?;
                for path in written {
                    eprintln!("wrote {}", path.display());
                }
            }
            emit(&args.output, &report, &report.table())
        }
        ExperimentsCommand::Report(args) => report(layout, args),
        ExperimentsCommand::Export(args) => export(layout, args),
    }
}

fn report(layout: &Layout, args: ReportArgs) -> anyhow::Result<()> {
    let config = ReportConfig {
        selection: args.selection.selection()?,
        out: args.out,
        metric: args.metric,
        compare: args
            .compare
            .iter()
            .map(|list| {
                list.split(',')
                    .map(|id| id.trim().to_string())
                    .filter(|id| !id.is_empty())
                    .collect()
            })
            .collect(),
        max_artifact_bytes: args.max_file_size.saturating_mul(1 << 20),
    };
    let db = ExperimentsDb::open_existing(layout)?;
    let summary = write_report(db.as_ref(), layout, &config)?;
    for warning in &summary.warnings {
        eprintln!("warning: {warning}");
    }
    if args.json {
        return print_json(&summary);
    }
    println!(
        "wrote {} ({} runs, {} experiments, {} comparisons, {} pages, {} run files copied)",
        summary.index.display(),
        summary.runs,
        summary.experiments,
        summary.comparisons,
        summary.pages,
        summary.files_copied
    );
    Ok(())
}

fn export(layout: &Layout, args: ExportArgs) -> anyhow::Result<()> {
    let db = existing(layout)?;
    let summary = match args.format {
        ExportFormat::Mlflow => export_mlflow(
            &db,
            &MlflowConfig {
                out: args.out,
                selection: args.selection.selection()?,
            },
        )?,
    };
    for (original, exported) in &summary.renamed_keys {
        eprintln!(
            "note: `{original}` is exported as `{exported}` (MLflow does not accept it as it is)"
        );
    }
    if args.json {
        return print_json(&summary);
    }
    println!(
        "exported {} runs of {} experiments to {} ({} files written, {} unchanged; {} artifacts copied, {} unchanged)",
        summary.runs,
        summary.experiments.len(),
        summary.out.display(),
        summary.files_written,
        summary.files_unchanged,
        summary.artifacts_copied,
        summary.artifacts_unchanged
    );
    println!(
        "open it with: MLFLOW_ALLOW_FILE_STORE=true mlflow ui --backend-store-uri {}",
        summary.out.display()
    );
    Ok(())
}

fn list(layout: &Layout, args: ListArgs) -> anyhow::Result<()> {
    let status = args.status.as_deref().map(RunStatus::parse).transpose()?;
    let runs = match ExperimentsDb::open_existing(layout)? {
        Some(db) => db.list_runs(&RunFilter {
            experiment: args.experiment,
            status,
            wheres: parse_wheres(&args.wheres)?,
        })?,
        None => Vec::new(),
    };
    emit(&args.output, &runs, &runs_table(&runs))
}

fn existing(layout: &Layout) -> anyhow::Result<ExperimentsDb> {
    match ExperimentsDb::open_existing(layout)? {
        Some(db) => Ok(db),
        None => bail!(
            "no experiments recorded under {}: {} does not exist (`lazarus train` creates it)",
            layout.root().display(),
            layout.experiments_dir().join("experiments.db").display()
        ),
    }
}

fn parse_wheres(texts: &[String]) -> anyhow::Result<Vec<WhereClause>> {
    Ok(texts
        .iter()
        .map(|text| WhereClause::parse(text))
        .collect::<Result<_, _>>()?)
}

/// JSON of the report, or its table as CSV or aligned text.
fn emit(output: &OutputArgs, value: &impl serde::Serialize, table: &Table) -> anyhow::Result<()> {
    if output.json {
        return print_json(value);
    }
    let text = if output.csv {
        table.to_csv()
    } else {
        table.to_text()
    };
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(err) if err.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => other.context("writing to stdout"),
    }
}

//! `lazarus experiments report`: the experiments database as a static,
//! self-contained web site (no network, no CDN; works from `file://` and
//! from any static web server).
//!
//! ```text
//! OUT/index.html               runs (sortable, filterable), best run per metric,
//!                              experiments, comparisons
//! OUT/runs.csv                 the runs table as CSV (full precision)
//! OUT/experiments/SLUG.html    per experiment: best runs, parallel coordinates,
//!                              ablation tables (as `experiments ablate`), its runs
//! OUT/compare/SLUG.html        runs side by side (as `experiments compare`),
//!                              learning curves overlaid
//! OUT/runs/RUN/index.html      per run: params, metrics, learning curves,
//!                              confusion matrix, ROC/PR, Dice per image,
//!                              model card, artifacts
//! OUT/runs/RUN/files/...       copies of the run's files (checkpoints and
//!                              files over the size limit are listed, not copied)
//! OUT/assets/report.css
//! OUT/.lazarus-output.json     marker: the files lazarus wrote here
//! ```
//!
//! Every link is relative. Charts are SVG drawn here ([`svg`]); the only
//! script is a small inline one that sorts and filters tables and switches
//! between metrics. The site is written into a staging folder beside OUT,
//! fsynced, and renamed into place; an existing OUT is replaced as a whole,
//! and only if it holds lazarus's marker for a report.

mod html;
mod model;
mod pages;
mod run_page;
mod svg;

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde::Serialize;

use super::db::{LOCK_FILE, list_artifacts};
use super::query::Selection;
use super::run_files::{
    CURVES_FILE, DICE_FILE, INPUTS_FILE, ImageDice, METRICS_FILE, MODEL_CARD_FILE, ScoreCurves,
    read_dice_csv,
};
use super::{ExperimentsDb, ExperimentsError, RunSnapshot, Snapshot, io_error};
use crate::layout::Layout;
use crate::output_dir::{self, ReplaceOptions};
use model::Model;

/// The report's output folder: replaced whole by the next report, never
/// when it holds a file the report did not write (`output_dir`).
pub const REPORT_OUTPUT: output_dir::Kind = output_dir::Kind {
    verb: "lazarus experiments report",
    // Every report carries the marker: there is no older, unmarked kind.
    recognises: |_| false,
    replace_without_force: true,
};

/// Run files larger than this are listed in the report but not copied.
pub const DEFAULT_MAX_ARTIFACT_BYTES: u64 = 32 << 20;

/// Folder of a run's files inside the run's report folder.
const FILES_DIR: &str = "files";

/// What to report on and where.
#[derive(Debug, Clone)]
pub struct ReportConfig {
    pub selection: Selection,
    pub out: PathBuf,
    /// The metric runs are ranked by first (default: test accuracy, Dice or
    /// ROC-AUC, whichever the runs recorded).
    pub metric: Option<String>,
    /// Extra comparison pages, each of two or more run ids.
    pub compare: Vec<Vec<String>>,
    pub max_artifact_bytes: u64,
}

/// What `write_report` wrote.
#[derive(Debug, Clone, Serialize)]
pub struct ReportSummary {
    pub out: PathBuf,
    pub index: PathBuf,
    pub runs: usize,
    pub experiments: usize,
    pub comparisons: usize,
    pub pages: usize,
    pub files_copied: usize,
    pub bytes_copied: u64,
    /// Per run: what is missing or unreadable (the rest of the report is written).
    pub warnings: Vec<String>,
}

/// A file of a run folder and what the report does with it.
#[derive(Debug, Clone)]
pub(crate) struct RunFile {
    pub path: String,
    pub bytes: u64,
    pub state: FileState,
    /// The content of a file shown on the page, read once.
    pub content: Option<Vec<u8>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FileState {
    /// A text file shown on the run's page (a file of its own per file
    /// would make a report of many runs slow to write).
    Embedded,
    /// A picture (or a long text) copied into `runs/RUN/files/`.
    Copied,
    TooLarge,
    /// Checkpoints are resume state, not results.
    Checkpoint,
    /// Weights and other binary files: nothing a browser shows (`lazarus
    /// export` bundles a run's head).
    Binary,
    /// A plot `train` drew that the run's page draws again from the database.
    Redrawn,
}

impl FileState {
    /// What the files table says about a file that is not copied.
    pub fn reason(self) -> &'static str {
        match self {
            FileState::Embedded => "shown on this page",
            FileState::Copied => "copied",
            FileState::TooLarge => "not copied: larger than --max-file-size",
            FileState::Checkpoint => "not copied: resume state",
            FileState::Binary => "not copied: weights (`lazarus export` bundles them)",
            FileState::Redrawn => "not copied: drawn on this page",
        }
    }
}

/// Text files a reader opens: shown on the run's page up to [`EMBED_LIMIT`].
const TEXT: [&str; 9] = [
    "json", "csv", "tsv", "toml", "yaml", "yml", "txt", "md", "log",
];

/// Pictures a browser shows: copied.
const PICTURES: [&str; 6] = ["svg", "png", "jpg", "jpeg", "webp", "gif"];

/// Text files up to this size are shown on the page; larger ones are copied.
const EMBED_LIMIT: u64 = 256 << 10;

/// The plots `train` writes that the run page draws from the database
/// (learning curves, confusion matrix, ROC).
const REDRAWN: [&str; 3] = [
    "plots/learning_curves.",
    "plots/confusion_matrix.",
    "plots/roc_curve.",
];

/// A run's folder as found on disk.
#[derive(Debug, Clone, Default)]
pub(crate) struct RunFolder {
    pub dir: PathBuf,
    pub exists: bool,
    pub files: Vec<RunFile>,
    /// Recorded in the database, absent from the folder.
    pub missing: Vec<String>,
    pub warnings: Vec<String>,
    pub parsed: Parsed,
}

/// What the run page draws from the run's files.
#[derive(Debug, Clone, Default)]
pub(crate) struct Parsed {
    /// Class names and `matrix[true][predicted]` of the test split.
    pub confusion: Option<(Vec<String>, Vec<Vec<u64>>)>,
    pub curves: Option<ScoreCurves>,
    pub dice: Option<Vec<ImageDice>>,
    pub model_card: Option<serde_json::Value>,
}

impl RunFolder {
    /// The content of a file the folder listing found (read already if it
    /// is shown on the page).
    pub fn read(&self, path: &str) -> Option<Result<Cow<'_, [u8]>, String>> {
        let file = self.files.iter().find(|f| f.path == path)?;
        if let Some(content) = &file.content {
            return Some(Ok(Cow::Borrowed(content)));
        }
        let full = self.dir.join(path);
        Some(
            std::fs::read(&full)
                .map(Cow::Owned)
                .map_err(|e| format!("cannot read {}: {e}", full.display())),
        )
    }
}

/// Writes the report of the selected runs. Without a database (`db` is
/// `None`) the report says that nothing is recorded yet.
pub fn write_report(
    db: Option<&ExperimentsDb>,
    layout: &Layout,
    config: &ReportConfig,
) -> Result<ReportSummary, ExperimentsError> {
    let out = &config.out;
    // Refuse a folder lazarus did not write before doing any work.
    output_dir::check(out, &REPORT_OUTPUT, ReplaceOptions::default())?;
    let snapshot = match db {
        Some(db) => db.snapshot(&config.selection)?,
        None => Snapshot::default(),
    };
    let model = Model::new(&snapshot.runs, config.metric.as_deref(), &config.compare)?;
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(io_error(parent))?;
    }
    let staging = crate::atomic::temp_path_for(out);
    let pool = super::io_pool()?;
    let written = pool.install(
        || -> Result<(Vec<RunFolder>, usize, usize, u64), ExperimentsError> {
            // Files first: a page links only what was copied.
            let copied: Vec<(RunFolder, usize, u64)> = snapshot
                .runs
                .par_iter()
                .map(|run| {
                    let mut folder = run_folder(db, run, config.max_artifact_bytes);
                    let target = staging
                        .join("runs")
                        .join(&run.detail.run.id)
                        .join(FILES_DIR);
                    let (count, bytes) = copy_files(&mut folder, &target)?;
                    Ok((folder, count, bytes))
                })
                .collect::<Result<_, ExperimentsError>>()?;
            let files_copied = copied.iter().map(|(_, n, _)| n).sum();
            let bytes_copied = copied.iter().map(|(_, _, b)| b).sum();
            let folders: Vec<RunFolder> = copied.into_iter().map(|(folder, _, _)| folder).collect();
            let datasets = dataset_paths(layout, &snapshot.runs, &folders);
            let context = pages::Context {
                model: &model,
                snapshot: &snapshot,
                folders: &folders,
                datasets: &datasets,
                selection: &config.selection,
                database: db.map(|db| db.path().to_path_buf()),
                root: layout.root().to_path_buf(),
                written_at: humantime::format_rfc3339_seconds(std::time::SystemTime::now())
                    .to_string(),
            };
            let write = |relative: &str, bytes: &[u8]| -> Result<(), ExperimentsError> {
                let path = staging.join(relative);
                if let Some(parent) = path.parent() {
                    std::fs::create_dir_all(parent).map_err(io_error(parent))?;
                }
                std::fs::write(&path, bytes).map_err(io_error(&path))
            };
            write(html::STYLE_FILE, html::STYLE.as_bytes())?;
            write("index.html", pages::index(&context).as_bytes())?;
            write("runs.csv", pages::runs_csv(&context).as_bytes())?;
            let mut pages_written = 1;
            for experiment in &model.experiments {
                let page = pages::experiment(&context, experiment);
                write(
                    &format!("experiments/{}.html", experiment.slug),
                    page.as_bytes(),
                )?;
                pages_written += 1;
            }
            for comparison in &model.comparisons {
                let page = pages::comparison(&context, comparison);
                write(
                    &format!("compare/{}.html", comparison.slug),
                    page.as_bytes(),
                )?;
                pages_written += 1;
            }
            (0..snapshot.runs.len())
                .into_par_iter()
                .map(|index| {
                    let id = &snapshot.runs[index].detail.run.id;
                    write(
                        &format!("runs/{id}/index.html"),
                        run_page::render(&context, index).as_bytes(),
                    )
                })
                .collect::<Result<(), _>>()?;
            pages_written += snapshot.runs.len();
            let files = output_dir::files_under(&staging)?;
            output_dir::write_marker(&staging, &REPORT_OUTPUT, &files)?;
            crate::atomic::sync_tree(&staging).map_err(io_error(&staging))?;
            // Checked again: the folder may have changed while the report was written.
            let prior = output_dir::check(out, &REPORT_OUTPUT, ReplaceOptions::default())?;
            output_dir::publish(&staging, out, &prior)?;
            Ok((folders, pages_written, files_copied, bytes_copied))
        },
    );
    let (folders, pages, files_copied, bytes_copied) = match written {
        Ok(written) => written,
        Err(err) => {
            let _ = std::fs::remove_dir_all(&staging);
            return Err(err);
        }
    };
    let mut warnings = Vec::new();
    for (run, folder) in snapshot.runs.iter().zip(&folders) {
        for warning in &folder.warnings {
            warnings.push(format!("run {}: {warning}", run.detail.run.id));
        }
    }
    Ok(ReportSummary {
        index: out.join("index.html"),
        out: out.clone(),
        runs: snapshot.runs.len(),
        experiments: model.experiments.len(),
        comparisons: model.comparisons.len(),
        pages,
        files_copied,
        bytes_copied,
        warnings,
    })
}

/// The run's folder: its files (what is copied, what is not) and what the
/// database recorded that is gone.
fn run_folder(db: Option<&ExperimentsDb>, run: &RunSnapshot, max_bytes: u64) -> RunFolder {
    let Some(db) = db else {
        return RunFolder::default();
    };
    let dir = db.run_dir(&run.detail.run.id);
    let mut folder = RunFolder {
        dir: dir.clone(),
        exists: dir.is_dir(),
        ..RunFolder::default()
    };
    if !folder.exists {
        folder
            .warnings
            .push(format!("its folder {} is missing", dir.display()));
        return folder;
    }
    match list_artifacts(&dir) {
        Ok(found) => {
            for (path, bytes) in found {
                let extension = path
                    .rsplit_once('.')
                    .map(|(_, e)| e.to_ascii_lowercase())
                    .unwrap_or_default();
                let text = TEXT.contains(&extension.as_str());
                let state = if path.starts_with("checkpoints/") {
                    FileState::Checkpoint
                } else if !text && !PICTURES.contains(&extension.as_str()) {
                    FileState::Binary
                } else if REDRAWN.iter().any(|plot| path.starts_with(plot)) {
                    FileState::Redrawn
                } else if bytes > max_bytes {
                    FileState::TooLarge
                } else if text && bytes <= EMBED_LIMIT {
                    FileState::Embedded
                } else {
                    FileState::Copied
                };
                let content = if state == FileState::Embedded {
                    let full = dir.join(&path);
                    match std::fs::read(&full) {
                        Ok(content) => Some(content),
                        Err(err) => {
                            folder
                                .warnings
                                .push(format!("cannot read {}: {err}", full.display()));
                            None
                        }
                    }
                } else {
                    None
                };
                folder.files.push(RunFile {
                    path,
                    bytes,
                    state,
                    content,
                });
            }
        }
        Err(err) => folder
            .warnings
            .push(format!("cannot list its folder: {err}")),
    }
    for artifact in &run.detail.artifacts {
        if artifact.path != LOCK_FILE && !folder.files.iter().any(|f| f.path == artifact.path) {
            folder.missing.push(artifact.path.clone());
        }
    }
    folder.parsed = parse_files(&mut folder);
    if !folder.missing.is_empty() {
        folder.warnings.push(format!(
            "{} recorded file{} missing from {}: {}",
            folder.missing.len(),
            if folder.missing.len() == 1 {
                " is"
            } else {
                "s are"
            },
            dir.display(),
            folder.missing.join(", ")
        ));
    }
    folder
}

/// Reads the run files the page draws; what cannot be read becomes a warning.
fn parse_files(folder: &mut RunFolder) -> Parsed {
    let mut warnings = Vec::new();
    let mut json = |name: &str| -> Option<serde_json::Value> {
        match folder.read(name)? {
            Ok(bytes) => match serde_json::from_slice(&bytes) {
                Ok(value) => Some(value),
                Err(err) => {
                    warnings.push(format!("{name} is not valid JSON ({err})"));
                    None
                }
            },
            Err(err) => {
                warnings.push(err);
                None
            }
        }
    };
    let metrics = json(METRICS_FILE);
    let inputs = json(INPUTS_FILE);
    let model_card = json(MODEL_CARD_FILE);
    let curves_value = json(CURVES_FILE);
    let confusion = metrics.as_ref().and_then(|metrics| {
        let matrix: Vec<Vec<u64>> =
            serde_json::from_value(metrics.get("test_confusion_matrix")?.clone()).ok()?;
        let names: Option<Vec<String>> = inputs
            .as_ref()
            .and_then(|i| serde_json::from_value(i.get("class_names")?.clone()).ok())
            .or_else(|| {
                model_card
                    .as_ref()
                    .and_then(|c| serde_json::from_value(c.get("classes")?.clone()).ok())
            });
        let names = names
            .filter(|n| n.len() == matrix.len())
            .unwrap_or_else(|| (0..matrix.len()).map(|c| format!("class {c}")).collect());
        (!matrix.is_empty() && matrix.iter().all(|row| row.len() == matrix.len()))
            .then_some((names, matrix))
    });
    let curves = curves_value.and_then(|value| match serde_json::from_value(value) {
        Ok(curves) => Some(curves),
        Err(err) => {
            warnings.push(format!("{CURVES_FILE} is not a curves file ({err})"));
            None
        }
    });
    let dice = match folder.read(DICE_FILE) {
        Some(Ok(bytes)) => match read_dice_csv(&String::from_utf8_lossy(&bytes)) {
            Ok(images) => Some(images),
            Err(err) => {
                warnings.push(format!("{DICE_FILE}: {err}"));
                None
            }
        },
        Some(Err(err)) => {
            warnings.push(err);
            None
        }
        None => None,
    };
    folder.warnings.extend(warnings);
    Parsed {
        confusion,
        curves,
        dice,
        model_card,
    }
}

/// Copies the files the report keeps; returns how many and their bytes. A
/// file removed since the folder was listed becomes a missing one.
fn copy_files(folder: &mut RunFolder, target: &Path) -> Result<(usize, u64), ExperimentsError> {
    let mut count = 0;
    let mut bytes = 0;
    let mut vanished = Vec::new();
    for file in folder.files.iter().filter(|f| f.state == FileState::Copied) {
        let from = folder.dir.join(&file.path);
        let to = target.join(&file.path);
        if let Some(parent) = to.parent() {
            std::fs::create_dir_all(parent).map_err(io_error(parent))?;
        }
        match std::fs::copy(&from, &to) {
            Ok(copied) => {
                count += 1;
                bytes += copied;
            }
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                vanished.push(file.path.clone());
            }
            Err(error) => return Err(ExperimentsError::Io { path: from, error }),
        }
    }
    if !vanished.is_empty() {
        folder.files.retain(|f| !vanished.contains(&f.path));
        folder.warnings.push(format!(
            "removed from {} while the report was written: {}",
            folder.dir.display(),
            vanished.join(", ")
        ));
        folder.missing.extend(vanished);
    }
    Ok((count, bytes))
}

/// Image paths by manifest index, for datasets of runs with per-image scores.
fn dataset_paths(
    layout: &Layout,
    runs: &[RunSnapshot],
    folders: &[RunFolder],
) -> HashMap<String, Vec<PathBuf>> {
    let mut paths = HashMap::new();
    for (run, folder) in runs.iter().zip(folders) {
        let name = &run.detail.run.dataset;
        if folder.parsed.dice.is_some()
            && !paths.contains_key(name)
            && let Ok(dataset) = crate::dataset::load(layout, name)
        {
            paths.insert(
                name.clone(),
                dataset.images.into_iter().map(|image| image.path).collect(),
            );
        }
    }
    paths
}

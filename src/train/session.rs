//! Classification runs recorded in `experiments/experiments.db`: `train`
//! and `train --resume` (the top-level `runs` module's sweeps and resumes
//! start and finish heads through the same functions). Each head is one
//! run: started in the database (params, tags, config hash), its epochs logged as they finish,
//! its artifacts written into `experiments/runs/<id>/` (head, config,
//! metrics, model card, plots), then finished with its summary metrics. A run
//! whose process dies stays `RUNNING` until the next open of the database
//! marks it `KILLED`; `--resume` (or re-running the sweep) continues it from
//! its newest checkpoint.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::TrainError;
use super::config::{ClassWeights, HeadConfig, Optimizer, Task, TrainConfig};
use super::data::{self, TrainData};
use super::run::{
    FitOptions, PlannedRun, RunInputs, RunObserver, RunReport, fit, load_config, read_run_inputs,
    run_inputs, write_run_inputs,
};
use super::schedule::Schedule;
use super::warm::{self, WarmStart};
use crate::experiments::run_files::{self, RunFolder};
use crate::experiments::{self, ExperimentsDb, ParamValue, RunHandle, RunStart, RunStatus};
use crate::layout::Layout;

/// The params row of a run: the sweep-file names of its settings (an
/// anomaly run's are its scorer's, see `anomaly::params`).
pub fn params(config: &TrainConfig, dataset: &str, encoder: &str) -> Vec<(String, ParamValue)> {
    if config.task == super::config::Task::Anomaly {
        return super::anomaly::params(config, dataset, encoder);
    }
    let mut out: Vec<(String, ParamValue)> = vec![
        ("dataset".into(), dataset.into()),
        ("encoder".into(), encoder.into()),
        ("head".into(), config.head.name().into()),
        ("epochs".into(), (config.epochs as f64).into()),
        ("lr".into(), config.learning_rate.into()),
        ("weight_decay".into(), config.weight_decay.into()),
        ("batch_size".into(), (config.batch_size as f64).into()),
        ("precision".into(), config.precision.name().into()),
        ("class_weights".into(), config.class_weights.name().into()),
        ("sampler".into(), config.sampler.name().into()),
        ("seed".into(), (config.seed as f64).into()),
        ("label_smoothing".into(), config.label_smoothing.into()),
        ("monitor".into(), config.monitor.clone().into()),
    ];
    if let HeadConfig::Mlp {
        hidden,
        dropout,
        activation,
    } = &config.head
    {
        let sizes: Vec<String> = hidden.iter().map(usize::to_string).collect();
        out.push(("hidden".into(), sizes.join(",").into()));
        out.push(("dropout".into(), (*dropout).into()));
        out.push((
            "activation".into(),
            format!("{activation:?}").to_lowercase().into(),
        ));
    }
    match config.optimizer {
        Optimizer::AdamW => out.push(("optimizer".into(), "adamw".into())),
        Optimizer::Sgd { momentum } => {
            out.push(("optimizer".into(), "sgd".into()));
            out.push(("momentum".into(), momentum.into()));
        }
    }
    // The schedule and its own settings, under their sweep keys, so that a
    // sweep over any of them charts and ablates by it.
    match config.schedule {
        Schedule::Constant => out.push(("schedule".into(), "constant".into())),
        Schedule::Cosine { warmup_steps } => {
            out.push(("schedule".into(), "cosine".into()));
            out.push(("warmup_steps".into(), (warmup_steps as f64).into()));
        }
        Schedule::Step {
            every_epochs,
            gamma,
        } => {
            out.push(("schedule".into(), "step".into()));
            out.push(("step_epochs".into(), (every_epochs as f64).into()));
            out.push(("step_gamma".into(), gamma.into()));
        }
        Schedule::ReduceOnPlateau { patience, factor } => {
            out.push(("schedule".into(), "plateau".into()));
            out.push(("plateau_patience".into(), (patience as f64).into()));
            out.push(("plateau_factor".into(), factor.into()));
        }
    }
    out.push((
        "memory_budget".into(),
        (config.memory_budget_bytes as f64).into(),
    ));
    out.push((
        "checkpoint_every".into(),
        (config.checkpoint_every as f64).into(),
    ));
    if let Some(stop) = &config.early_stopping {
        out.push(("patience".into(), (stop.patience as f64).into()));
    }
    if let Some(clip) = config.gradient_clip {
        out.push(("clip_grad_norm".into(), clip.into()));
    }
    if !config.label_map.is_empty() {
        let classes: BTreeSet<&String> = config.label_map.values().collect();
        let text: Vec<&str> = classes.into_iter().map(String::as_str).collect();
        out.push(("label_map".into(), text.join(",").into()));
    }
    out
}

/// The params every run records about its data: the manifest version it
/// trained on (`experiments list --where dataset_version=2`), and how many
/// images lacked features when `--allow-partial` let it start anyway.
pub fn input_params(inputs: &RunInputs) -> Vec<(String, ParamValue)> {
    let mut out = vec![(
        "dataset_version".to_string(),
        (inputs.dataset_version as f64).into(),
    )];
    if inputs.images_lacking > 0 {
        out.push((
            "images_lacking".to_string(),
            (inputs.images_lacking as f64).into(),
        ));
    }
    out
}

/// Logs every finished epoch to the run's metrics table.
struct EpochLogger<'a> {
    handles: &'a [RunHandle],
}

impl RunObserver for EpochLogger<'_> {
    fn epoch(
        &mut self,
        run: usize,
        epoch: usize,
        metrics: &BTreeMap<String, f64>,
    ) -> Result<(), TrainError> {
        let values: Vec<(&str, f64)> = metrics.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        self.handles[run].log_metrics(epoch as u64 + 1, &values)?;
        Ok(())
    }
}

/// Trains one head as a new run of `experiment`; with `config.init_from`,
/// from that run's weights (see [`train_warm`] to plan the warm start first).
pub fn train(
    layout: &Layout,
    data: &TrainData,
    experiment: &str,
    config: TrainConfig,
    options: &FitOptions,
) -> Result<RunReport, TrainError> {
    let warm = match &config.init_from {
        Some(source) => Some(warm::plan(layout, source, &config, data)?),
        None => None,
    };
    train_warm(layout, data, experiment, config, warm, options)
}

/// Trains one head as a new run of `experiment`, starting from `warm` when
/// given (planned by `warm::plan` for the same config and data). The run
/// records `init_from` and `init_layers` (which layers loaded) as params.
pub fn train_warm(
    layout: &Layout,
    data: &TrainData,
    experiment: &str,
    mut config: TrainConfig,
    warm: Option<WarmStart>,
    options: &FitOptions,
) -> Result<RunReport, TrainError> {
    config.init_from = warm.as_ref().map(|w| w.summary.source_run.clone());
    config.validate()?;
    if config.task != Task::Classify {
        return Err(TrainError::Invalid(format!(
            "task {} is not trained as a classification head",
            config.task.name()
        )));
    }
    require_two_classes(data)?;
    let db = ExperimentsDb::open(layout)?;
    let inputs = run_inputs(data, &config);
    let extra = warm.as_ref().map(warm_params).unwrap_or_default();
    let handle = start(&db, experiment, &inputs, &extra)?;
    fit_and_finish(data, vec![(handle, inputs, false, warm)], options)?.remove(0)
}

/// A classifier needs two classes in its training split: with one, every
/// prediction is right and the run would report accuracy 1.0 having learnt
/// nothing.
pub(crate) fn require_two_classes(data: &TrainData) -> Result<(), TrainError> {
    let mut present: Vec<usize> = data.train.labels.clone();
    present.sort_unstable();
    present.dedup();
    if present.len() >= 2 {
        return Ok(());
    }
    let only = present
        .first()
        .map(|&c| data.class_names[c].as_str())
        .unwrap_or("none");
    Err(TrainError::Invalid(format!(
        "dataset {} has one class in its training split ({only}): a classifier has nothing \
         to learn; add images of another class, or train --task anomaly to learn what {only} \
         looks like",
        data.dataset_name
    )))
}

/// The params that say where a warm-started run came from and what loaded.
pub(crate) fn warm_params(warm: &WarmStart) -> Vec<(String, ParamValue)> {
    vec![
        ("init_from".into(), warm.summary.source_run.as_str().into()),
        ("init_layers".into(), warm.summary.layer_states().into()),
    ]
}

/// Continues a killed run from its newest checkpoint with its own settings.
/// Segmentation runs resume through `segment::train::resume`, on the same
/// checks (`resumable_run`) and checkpoints.
pub fn resume(
    layout: &Layout,
    run_id: &str,
    options: &FitOptions,
) -> Result<RunReport, TrainError> {
    let db = ExperimentsDb::open(layout)?;
    let (run_dir, inputs) = resumable_run(&db, run_id)?;
    if inputs.config.task != Task::Classify {
        return Err(TrainError::Checkpoint(format!(
            "run {run_id} is a {} run: it is not resumed as a classification run",
            inputs.config.task.name()
        )));
    }
    // The manifest version and coverage the run started on, whatever
    // the dataset has become since.
    let load = data::LoadConfig {
        version: Some(inputs.dataset_version),
        allow_partial: inputs.images_lacking > 0,
        ..load_config(&inputs.config)
    };
    let data = data::load(layout, &inputs.dataset, Some(&inputs.fingerprint), &load)?;
    let from = super::checkpoint::latest_epoch(&run_dir)?;
    // Killed before its first checkpoint: start from the source's weights again.
    let warm = match &inputs.config.init_from {
        Some(source) if from == 0 => Some(warm::plan(layout, source, &inputs.config, &data)?),
        _ => None,
    };
    let handle = db.resume_run(run_id, from as u64)?;
    fit_and_finish(&data, vec![(handle, inputs, true, warm)], options)?.remove(0)
}

/// The folder and recorded inputs of a run that `--resume` may continue:
/// it exists and has not finished. Anomaly runs (no checkpoints) are refused.
pub fn resumable_run(db: &ExperimentsDb, run_id: &str) -> Result<(PathBuf, RunInputs), TrainError> {
    let run_dir = db
        .recorded_run_dir(run_id)
        .map_err(|e| TrainError::Checkpoint(format!("run {run_id} not found: {e}")))?;
    if !run_dir.is_dir() {
        return Err(TrainError::Checkpoint(format!(
            "run {run_id} not found: no folder {}",
            run_dir.display()
        )));
    }
    let folder = RunFolder::new(&run_dir);
    if folder.is_finished() {
        return Err(TrainError::Checkpoint(format!(
            "run {run_id} already finished ({} exists); nothing to resume",
            folder.metrics().display()
        )));
    }
    let inputs = read_run_inputs(&run_dir)?;
    if inputs.config.task == Task::Anomaly {
        return Err(TrainError::Checkpoint(format!(
            "run {run_id} is a {} run: it has no checkpoints to resume; start it again",
            inputs.config.task.name()
        )));
    }
    Ok((run_dir, inputs))
}

/// Opens a run of `experiment` in the database (params, the task tag) and
/// writes its `config.json`.
pub(crate) fn start(
    db: &ExperimentsDb,
    experiment: &str,
    inputs: &RunInputs,
    extra_params: &[(String, ParamValue)],
) -> Result<RunHandle, TrainError> {
    let encoder = inputs.encoder.clone().unwrap_or_default();
    let mut params = params(&inputs.config, &inputs.dataset, &encoder);
    params.extend(input_params(inputs));
    params.extend(extra_params.iter().cloned());
    let handle = db.start_run(RunStart {
        experiment: experiment.to_string(),
        dataset: inputs.dataset.clone(),
        encoder_fingerprint: inputs.fingerprint.clone(),
        config_hash: inputs.config_hash.clone(),
        params,
        tags: vec![
            ("task".into(), inputs.config.task.name().into()),
            ("lazarus_version".into(), crate::VERSION.into()),
        ],
    })?;
    write_run_inputs(handle.dir(), inputs)?;
    Ok(handle)
}

/// A finished head's summary metrics: the test metrics, the kept epoch's
/// `val/*` metrics, which epoch that was (1-based) and how many ran.
pub(crate) fn summary_metrics(
    test: &BTreeMap<String, f64>,
    epochs: &[BTreeMap<String, f64>],
    best_epoch: usize,
    epochs_run: usize,
) -> Vec<(String, f64)> {
    let mut summary: Vec<(String, f64)> = test.iter().map(|(k, v)| (k.clone(), *v)).collect();
    if let Some(best) = epochs.get(best_epoch) {
        summary.extend(
            best.iter()
                .filter(|(k, _)| k.starts_with("val/"))
                .map(|(k, v)| (k.clone(), *v)),
        );
    }
    summary.push(("best_epoch".into(), best_epoch as f64 + 1.0));
    summary.push(("epochs_run".into(), epochs_run as f64));
    summary
}

/// Trains the runs together, then writes each one's artifacts and finishes
/// it; a run whose head diverged is finished FAILED and its error returned
/// in its place.
pub(crate) fn fit_and_finish(
    data: &TrainData,
    runs: Vec<(RunHandle, RunInputs, bool, Option<WarmStart>)>,
    options: &FitOptions,
) -> Result<Vec<Result<RunReport, TrainError>>, TrainError> {
    let mut planned: Vec<PlannedRun> = Vec::with_capacity(runs.len());
    let mut handles: Vec<RunHandle> = Vec::with_capacity(runs.len());
    for (handle, inputs, resume, init) in runs {
        planned.push(PlannedRun {
            run_id: handle.id().to_string(),
            run_dir: handle.dir().to_path_buf(),
            config: inputs.config,
            resume,
            init,
        });
        handles.push(handle);
    }
    // On an error the handles drop and their runs are recorded FAILED.
    let results = fit(
        data,
        &planned,
        options,
        &mut EpochLogger { handles: &handles },
    )?;
    let mut reports = Vec::with_capacity(results.len());
    for ((handle, result), run) in handles.into_iter().zip(results).zip(&planned) {
        let report = match result {
            Ok(report) => report,
            Err(error) => {
                reports.push(Err(fail_run(handle, error)?));
                continue;
            }
        };
        write_artifacts(&handle, &report, &run.config, data)?;
        let mut summary = summary_metrics(
            &report.test,
            &report.epochs,
            report.best_epoch,
            report.epochs_run,
        );
        summary.push(("skipped_steps".into(), report.skipped_steps as f64));
        if let Some(peak) = report.peak_rss_bytes {
            summary.push(("peak_rss_bytes".into(), peak as f64));
        }
        summary.extend(memory_summary(&report.memory));
        handle.finish(RunStatus::Finished, &summary)?;
        reports.push(Ok(report));
    }
    Ok(reports)
}

/// The summary metrics of a run's memory report (besides `peak_rss_bytes`).
pub(crate) fn memory_summary(memory: &crate::memory::MemoryReport) -> Vec<(String, f64)> {
    let mut out = Vec::new();
    let mut push = |key: &str, value: Option<u64>| {
        if let Some(value) = value {
            out.push((key.to_string(), value as f64));
        }
    };
    push("peak_anonymous_bytes", memory.peak_anonymous_bytes);
    push("peak_file_backed_bytes", memory.peak_file_backed_bytes);
    if let Some(cgroup) = &memory.cgroup {
        push("cgroup_memory_limit_bytes", Some(cgroup.limit_bytes));
        push("cgroup_memory_peak_bytes", cgroup.peak_bytes);
    }
    out
}

/// Records a run FAILED with `error` as its `error` tag (what `experiments
/// show` prints), and hands the error back.
pub(crate) fn fail_run(handle: RunHandle, error: TrainError) -> Result<TrainError, TrainError> {
    handle.set_tags(&[("error", error.to_string())])?;
    handle.finish::<&str>(RunStatus::Failed, &[])?;
    Ok(error)
}

/// A model card: what the head is, what it was trained and tested on, and
/// how well it did (accuracy with a 95% Wilson interval).
#[derive(Debug, Serialize)]
struct ModelCard<'a> {
    run_id: &'a str,
    created_at: String,
    lazarus_version: &'static str,
    task: &'static str,
    dataset: &'a str,
    /// The dataset's manifest version the head was trained on.
    dataset_version: u32,
    /// Images of that version without features (an `--allow-partial` run).
    images_lacking: usize,
    encoder: Option<String>,
    encoder_fingerprint: &'a str,
    classes: &'a [String],
    split_sizes: BTreeMap<&'static str, usize>,
    head: &'static str,
    config: &'a TrainConfig,
    best_epoch: usize,
    test_metrics: &'a BTreeMap<String, f64>,
    test_accuracy_95ci: Option<[f64; 2]>,
    /// Per class: the 95% Wilson interval of its test recall (n = its test images).
    test_recall_95ci: BTreeMap<String, [f64; 2]>,
    intended_use: &'static str,
    limitations: &'static str,
}

/// The 95% Wilson score interval of a proportion.
fn wilson_interval(proportion: f64, n: usize) -> Option<[f64; 2]> {
    if n == 0 {
        return None;
    }
    let (z, n) = (1.959_963_984_540_054f64, n as f64);
    let centre = (proportion + z * z / (2.0 * n)) / (1.0 + z * z / n);
    let half = z / (1.0 + z * z / n)
        * (proportion * (1.0 - proportion) / n + z * z / (4.0 * n * n)).sqrt();
    Some([centre - half, centre + half])
}

fn write_artifacts(
    handle: &RunHandle,
    report: &RunReport,
    config: &TrainConfig,
    data: &TrainData,
) -> Result<(), TrainError> {
    let toml = toml::to_string_pretty(config)
        .map_err(|e| TrainError::Invalid(format!("config as TOML: {e}")))?;
    handle.write_artifact(run_files::CONFIG_TOML_FILE, toml.as_bytes())?;
    let card = ModelCard {
        run_id: &report.run_id,
        created_at: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        lazarus_version: crate::VERSION,
        task: "image classification from frozen-encoder features",
        dataset: &data.dataset_name,
        dataset_version: data.dataset_version,
        images_lacking: data.images_lacking,
        encoder: data.features.metadata().get("encoder").cloned(),
        encoder_fingerprint: &data.fingerprint,
        classes: &data.class_names,
        split_sizes: BTreeMap::from([
            ("train", data.train.rows.len()),
            ("val", data.val.rows.len()),
            ("test", data.test.rows.len()),
        ]),
        head: config.head.name(),
        config,
        best_epoch: report.best_epoch + 1,
        test_metrics: &report.test,
        test_accuracy_95ci: report
            .test
            .get("test/accuracy")
            .and_then(|&a| wilson_interval(a, data.test.rows.len())),
        test_recall_95ci: data
            .class_names
            .iter()
            .enumerate()
            .filter_map(|(class, name)| {
                let n = data.test.labels.iter().filter(|&&l| l == class).count();
                let recall = report.test.get(&format!("test/recall/{name}"))?;
                Some((name.clone(), wilson_interval(*recall, n)?))
            })
            .collect(),
        intended_use: "Classifying images like those of the training dataset, with the same \
                       encoder and preprocessing; a starting point for review, not an automatic \
                       decision on its own.",
        limitations: "Measured on one held-out split of one dataset; images from other sources, \
                      devices or class balances may score lower. Small classes have wide \
                      intervals.",
    };
    let json = serde_json::to_vec_pretty(&card).map_err(|e| TrainError::Invalid(e.to_string()))?;
    handle.write_artifact(run_files::MODEL_CARD_FILE, &json)?;
    if let Some(test) = &report.test_curves {
        let curves = run_files::ScoreCurves {
            positive: data.class_names[1].clone(),
            splits: vec![test.clone()],
        };
        let json =
            serde_json::to_vec_pretty(&curves).map_err(|e| TrainError::Invalid(e.to_string()))?;
        handle.write_artifact(run_files::CURVES_FILE, &json)?;
    }

    let points: Vec<experiments::plots::EpochPoint> = report
        .epochs
        .iter()
        .enumerate()
        .map(|(epoch, m)| experiments::plots::EpochPoint {
            epoch: epoch as u64 + 1,
            train_loss: m.get("train/loss").copied(),
            validation_loss: m.get("val/loss").copied(),
            validation_metric: m.get(&config.monitor).copied(),
        })
        .collect();
    let plots = handle.folder().plots();
    std::fs::create_dir_all(&plots).map_err(TrainError::io(&plots))?;
    experiments::plots::learning_curves(
        &plots,
        &experiments::plots::LearningCurves {
            metric_name: &config.monitor,
            epochs: &points,
        },
    )?;
    experiments::plots::confusion_matrix(&plots, &data.class_names, &report.test_confusion_matrix)?;
    Ok(())
}

/// The class-weight setting a file names, resolved against the classes.
pub fn class_weights_from(
    setting: &str,
    class_names: &[String],
) -> Result<ClassWeights, TrainError> {
    Ok(match setting {
        "none" => ClassWeights::None,
        "balanced" => ClassWeights::Balanced,
        file => ClassWeights::Given {
            weights: super::config::read_class_weights(Path::new(file), class_names)?,
        },
    })
}

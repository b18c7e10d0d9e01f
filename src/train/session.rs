//! Classification runs recorded in `experiments/experiments.db`: `train`
//! and `train --resume` (the top-level `runs` module's sweeps and resumes
//! start and finish heads through the same functions). Each head is one
//! run: started in the database (params, tags, config hash), its epochs logged as they finish,
//! its artifacts written into `experiments/runs/<id>/` (head, config,
//! metrics, model card, plots), then finished with its summary metrics. A run
//! whose process dies stays `RUNNING` until the next open of the database
//! marks it `KILLED`; `--resume` (or re-running the sweep) continues it from
//! its newest checkpoint.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;

use super::TrainError;
use super::config::{ClassWeights, Task, TrainConfig};
use super::data::{self, TrainData};
use super::record::{self, fail_run, memory_summary, resumable_run, start, summary_metrics};
use super::run::{
    FitOptions, PlannedRun, RunInputs, RunObserver, RunReport, fit, resume_load_config, run_inputs,
};
use super::warm::{self, WarmStart};
use crate::experiments::run_files;
use crate::experiments::{self, ExperimentsDb, RunHandle, RunStatus};
use crate::layout::Layout;

/// Logs every finished epoch to the run's metrics table.
pub(crate) struct EpochLogger<'a> {
    pub(crate) handles: &'a [RunHandle],
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
    if let Some(unfreeze) = config.unfreeze {
        return Err(TrainError::Invalid(format!(
            "--unfreeze-from {} trains through train::finetune, not as a head on frozen features",
            unfreeze.after_block
        )));
    }
    require_two_classes(data)?;
    let db = ExperimentsDb::open(layout)?;
    let inputs = run_inputs(data, &config);
    let extra = warm.as_ref().map(record::warm_params).unwrap_or_default();
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
    if inputs.config.unfreeze.is_some() {
        return super::finetune::resume(layout, run_id, options);
    }
    let load = resume_load_config(&inputs);
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
        finish_run(handle, &report, &run.config, data)?;
        reports.push(Ok(report));
    }
    Ok(reports)
}

/// Writes a trained classifier's artifacts (model card, curves, plots) and
/// finishes its run with its summary metrics; its head and metrics.json
/// are written already.
pub(crate) fn finish_run(
    handle: RunHandle,
    report: &RunReport,
    config: &TrainConfig,
    data: &TrainData,
) -> Result<(), TrainError> {
    write_artifacts(&handle, report, config, data)?;
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
    Ok(())
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
    /// The encoder blocks trained with the head (`--unfreeze-from`), in
    /// words; absent when the encoder stayed frozen.
    #[serde(skip_serializing_if = "Option::is_none")]
    fine_tuned_blocks: Option<String>,
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
    let card = ModelCard {
        run_id: &report.run_id,
        created_at: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        lazarus_version: crate::VERSION,
        task: if config.unfreeze.is_some() {
            "image classification with fine-tuned top encoder blocks"
        } else {
            "image classification from frozen-encoder features"
        },
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
        fine_tuned_blocks: config.unfreeze.map(|unfreeze| {
            format!(
                "the blocks after block {} and the head convolution of {}, trained with the \
                 head from their pretrained weights (blocks.safetensors, {} matrix products); \
                 predictions run them on the cached or encoded output of block {}",
                unfreeze.after_block,
                data.features
                    .metadata()
                    .get("encoder")
                    .map_or("the encoder", String::as_str),
                unfreeze.precision.name(),
                unfreeze.after_block
            )
        }),
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
    record::write_config_and_card(handle, config, &card)?;
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

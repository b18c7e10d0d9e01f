//! The verbs that reach runs of any task and pick each run's trainer by
//! the task it records: `lazarus sweep FILE` ([`sweep`]: every head a sweep
//! file lists, `sweep_file`) and `lazarus train --resume RUN` ([`resume`]).
//! Classification heads on the same features train together in one pass
//! (`train::session`), anomaly scorers are fitted one by one
//! (`train::anomaly`), segmentation heads train one by one
//! (`segment::train`). A config that already FINISHED is skipped and a
//! killed one resumed from its newest checkpoint, whatever its task; the
//! comparison chart of the sweep's runs closes a sweep.
//!
//! This module sits above both `train` and `segment`, so neither imports
//! the other to run a sweep or a resume.

pub mod settings;
pub mod sweep_file;
pub mod train;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use serde::Serialize;

pub use sweep_file::{Sweep, SweepPoint};
pub use train::{TrainRequest, TrainedRun, train};

use crate::experiments::{self, AblationQuery, ExperimentsDb, ParamValue, WhereClause};
use crate::features::catalog::PooledChoice;
use crate::layout::Layout;
use crate::segment::SegmentError;
use crate::segment::train::{self as segment, SegmentReport};
use crate::train::TrainError;
use crate::train::anomaly::{self, AnomalyOptions, AnomalyReport};
use crate::train::checkpoint;
use crate::train::config::{Task, TrainConfig};
use crate::train::record::{start, warm_params};
use crate::train::run::{FitOptions, RunReport, load_config, read_run_inputs, run_inputs};
use crate::train::session::{class_weights_from, fit_and_finish, require_two_classes};
use crate::train::warm::{self, WarmStart};
use crate::train::{data, finetune};

/// Errors of a sweep or a resume: those of the task trainers it calls.
#[derive(Debug, thiserror::Error)]
pub enum RunsError {
    #[error(transparent)]
    Train(#[from] TrainError),
    #[error(transparent)]
    Segment(Box<SegmentError>),
    #[error(transparent)]
    Experiments(#[from] crate::experiments::ExperimentsError),
}

impl From<SegmentError> for RunsError {
    fn from(error: SegmentError) -> Self {
        RunsError::Segment(Box::new(error))
    }
}

/// What `sweep` did with each head.
#[derive(Debug, Clone, Serialize)]
pub struct SweepOutcome {
    pub sweep: String,
    /// Runs trained now (fresh or resumed).
    pub trained: Vec<RunReport>,
    /// Runs that failed (their heads diverged), recorded FAILED: why.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub failed: Vec<String>,
    /// Anomaly runs (`task = "anomaly"`) fitted now.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub anomaly: Vec<AnomalyReport>,
    /// (config hash, run id) of configs already FINISHED, skipped.
    pub skipped: Vec<(String, String)>,
    /// Passes over the features: one per feature set (and label map).
    pub passes: usize,
    /// Segmentation runs trained now (`task = "segment"`), one by one.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub segmented: Vec<SegmentReport>,
    /// The comparison chart of the sweep's runs.
    pub charts: Vec<PathBuf>,
    /// What the sweep says before its report: that its fine-tuned points
    /// trained on the CPU whatever `--device` named.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

/// How a sweep runs.
pub struct SweepOptions {
    pub fit: FitOptions,
    /// Retrain configs that already FINISHED.
    pub force: bool,
    /// The metric the comparison chart shows.
    pub chart_metric: String,
    /// Train on the images that have features when some lack them.
    pub allow_partial: bool,
}

/// Continues killed run `run_id` from its newest checkpoint with its own
/// settings, through the trainer of the task it recorded. Anomaly runs
/// have no checkpoints and are refused (`train::record::resumable_run`).
pub fn resume(
    layout: &Layout,
    run_id: &str,
    options: &FitOptions,
) -> Result<TrainedRun, RunsError> {
    let db = ExperimentsDb::open(layout)?;
    let run_dir = db
        .recorded_run_dir(run_id)
        .map_err(|e| TrainError::Checkpoint(format!("run {run_id} not found: {e}")))?;
    // A folder whose config cannot be read is refused by the classifier's
    // checks, which name what is wrong with it.
    let inputs = read_run_inputs(&run_dir).ok();
    let task = inputs
        .as_ref()
        .map_or(Task::Classify, |inputs| inputs.config.task.kind());
    let fine_tuned = inputs.is_some_and(|inputs| inputs.config.unfreeze.is_some());
    Ok(match task {
        Task::Segment => TrainedRun::Segment(Box::new(segment::resume(
            layout,
            run_id,
            &options.device,
            options.progress,
        )?)),
        // Fine-tuned classifiers resume through the same entry
        // (`session::resume` hands them to `finetune::resume`).
        Task::Classify | Task::Anomaly => TrainedRun::Classify {
            report: Box::new(crate::train::session::resume(layout, run_id, options)?),
            note: if fine_tuned {
                finetune::device_note(&options.device)
            } else {
                None
            },
        },
    })
}

/// Trains every head of a sweep; heads on the same features in one pass.
pub fn sweep(
    layout: &Layout,
    sweep: &Sweep,
    options: &SweepOptions,
) -> Result<SweepOutcome, RunsError> {
    let db = ExperimentsDb::open(layout)?;
    // Group heads by the features they read: pooled, or spatial for
    // patch-level anomaly points, in the folder a point names or the one
    // its dataset and encoder find.
    type Group = (String, String, bool, Option<String>, PooledChoice);
    let mut groups: BTreeMap<Group, Vec<usize>> = BTreeMap::new();
    let mut segment_points = Vec::new();
    for (i, point) in sweep.points.iter().enumerate() {
        if point.config.task == Task::Segment {
            segment_points.push(i);
            continue;
        }
        // Patch-level anomaly and fine-tuned (`unfreeze_from`) points read
        // spatial features.
        let spatial = point
            .config
            .task
            .anomaly()
            .is_some_and(|a| a.patch.is_some())
            || point.config.unfreeze.is_some();
        groups
            .entry((
                point.dataset.clone(),
                point.encoder.clone(),
                spatial,
                point.fingerprint.clone(),
                point.pooled.clone(),
            ))
            .or_default()
            .push(i);
    }
    let sweep_param = vec![("sweep".to_string(), ParamValue::from(sweep.name.as_str()))];
    let mut outcome = SweepOutcome {
        sweep: sweep.name.clone(),
        trained: Vec::new(),
        failed: Vec::new(),
        anomaly: Vec::new(),
        skipped: Vec::new(),
        passes: 0,
        segmented: Vec::new(),
        charts: Vec::new(),
        notes: Vec::new(),
    };
    for ((dataset, encoder, spatial, named, pooled), members) in groups {
        let fingerprint = match named {
            Some(fingerprint) => fingerprint,
            None => find_fingerprint(layout, &dataset, &encoder, spatial, &pooled)?,
        };
        let mut configs: Vec<TrainConfig> = Vec::new();
        for &i in &members {
            let mut config = sweep.points[i].config.clone();
            config.label_map = sweep.label_map.clone();
            configs.push(config);
        }
        let mut load = load_config(&configs[0]);
        load.allow_partial = options.allow_partial;
        if configs.iter().all(|c| c.task == Task::Anomaly) {
            load.split_labels = data::SplitLabels::Any;
        }
        let data = data::load(layout, &dataset, Some(&fingerprint), &load)?;
        // Class-weight files are read against the loaded classes, as
        // `train --class-weights FILE` reads them.
        for (config, &i) in configs.iter_mut().zip(&members) {
            if let Some(file) = &sweep.points[i].class_weights_file {
                config.class_weights =
                    class_weights_from(&file.to_string_lossy(), &data.class_names)?;
            }
        }
        // Anomaly scorers need no shared batches: each is fitted on its own.
        let (anomaly_configs, configs): (Vec<TrainConfig>, Vec<TrainConfig>) = configs
            .into_iter()
            .partition(|config| config.task == Task::Anomaly);
        if !anomaly_configs.is_empty() {
            let anomaly_options = AnomalyOptions {
                device: options.fit.device.clone(),
            };
            let (reports, skipped) = anomaly::sweep_runs(
                layout,
                &db,
                &data,
                &sweep.name,
                &anomaly_configs,
                options.force,
                &anomaly_options,
            )?;
            outcome.anomaly.extend(reports);
            outcome.skipped.extend(skipped);
        }
        // Fine-tuned points train their own blocks: each is its own pass.
        let (fine_tuned, configs): (Vec<TrainConfig>, Vec<TrainConfig>) = configs
            .into_iter()
            .partition(|config| config.unfreeze.is_some());
        for config in fine_tuned {
            let inputs = run_inputs(&data, &config);
            let report = match next_step(&db, &inputs.config_hash, options.force)? {
                Step::Skip(id) => {
                    outcome.skipped.push((inputs.config_hash, id));
                    continue;
                }
                Step::Resume(id) => finetune::resume(layout, &id, &options.fit),
                Step::Start => finetune::train(
                    layout,
                    &data,
                    &sweep.name,
                    config,
                    &sweep_param,
                    &options.fit,
                ),
            };
            outcome.passes += 1;
            if let Some(note) = finetune::device_note(&options.fit.device)
                && !outcome.notes.contains(&note)
            {
                outcome.notes.push(note);
            }
            if let Ok(RunReport {
                blocks_precision: Some(chosen),
                ..
            }) = &report
            {
                // The sweep's points share one timing: said once.
                let note = train::auto_precision_line(chosen);
                if !outcome.notes.contains(&note) {
                    outcome.notes.push(note);
                }
            }
            match report {
                Ok(report) => outcome.trained.push(report),
                Err(error @ TrainError::Diverged { .. }) => outcome.failed.push(error.to_string()),
                Err(error) => return Err(error.into()),
            }
        }
        if !configs.is_empty() {
            require_two_classes(&data)?;
        }
        let mut runs = Vec::new();
        let mut seen = BTreeSet::new();
        for config in configs {
            let inputs = run_inputs(&data, &config);
            if !seen.insert(inputs.config_hash.clone()) {
                continue; // the same head listed twice
            }
            let resumable = match next_step(&db, &inputs.config_hash, options.force)? {
                Step::Skip(id) => {
                    outcome.skipped.push((inputs.config_hash.clone(), id));
                    continue;
                }
                Step::Resume(id) => Some(id),
                Step::Start => None,
            };
            // `init_from`: the source run's weights, as `train --init-from`
            // plans them (a resumed run with a checkpoint starts from that).
            let plan_warm = |config: &TrainConfig| -> Result<Option<WarmStart>, TrainError> {
                config
                    .init_from
                    .as_ref()
                    .map(|source| warm::plan(layout, source, config, &data))
                    .transpose()
            };
            match resumable {
                Some(id) => {
                    let dir = db.run_dir(&id);
                    let from = checkpoint::latest_epoch(&dir)?;
                    let init = if from == 0 { plan_warm(&config)? } else { None };
                    let handle = db.resume_run(&id, from as u64)?;
                    runs.push((handle, inputs, true, init));
                }
                None => {
                    let init = plan_warm(&config)?;
                    let mut params = sweep_param.clone();
                    params.extend(init.as_ref().map(warm_params).unwrap_or_default());
                    let handle = start(&db, &sweep.name, &inputs, &params)?;
                    runs.push((handle, inputs, false, init));
                }
            }
        }
        if runs.is_empty() {
            continue;
        }
        outcome.passes += 1;
        for result in fit_and_finish(&data, runs, &options.fit)? {
            match result {
                Ok(report) => outcome.trained.push(report),
                Err(error) => outcome.failed.push(error.to_string()),
            }
        }
    }
    sweep_segment_points(layout, &db, sweep, &segment_points, options, &mut outcome)?;
    // A sweep of segmentation heads has no accuracy: chart its Dice instead.
    let chart_metric =
        if segment_points.len() == sweep.points.len() && options.chart_metric == "test/accuracy" {
            "test/dice"
        } else {
            options.chart_metric.as_str()
        };
    // Reused runs join the sweep's comparison (its chart and `--where sweep=`).
    let reused: Vec<String> = outcome.skipped.iter().map(|(_, id)| id.clone()).collect();
    db.add_to_sweep(&sweep.name, &reused)?;
    outcome.charts = sweep_chart(layout, &db, sweep, chart_metric)?;
    Ok(outcome)
}

/// What a sweep does with one config, whatever its task.
enum Step {
    /// A run of the same config hash FINISHED: skip it (the run's id).
    Skip(String),
    /// A run of it was killed: continue it from its newest checkpoint.
    Resume(String),
    Start,
}

/// The step for `config_hash`; `force` trains every config anew.
fn next_step(
    db: &ExperimentsDb,
    config_hash: &str,
    force: bool,
) -> Result<Step, crate::experiments::ExperimentsError> {
    if force {
        return Ok(Step::Start);
    }
    if let Some(id) = db.find_finished(config_hash)? {
        return Ok(Step::Skip(id));
    }
    Ok(match db.find_resumable(config_hash)? {
        Some(id) => Step::Resume(id),
        None => Step::Start,
    })
}

/// The folder of a sweep group's features: pooled, or spatial (patch-level
/// anomaly and segmentation points), made by `encoder` (`features::catalog`).
fn find_fingerprint(
    layout: &Layout,
    dataset: &str,
    encoder: &str,
    spatial: bool,
    pooled: &PooledChoice,
) -> Result<String, TrainError> {
    use crate::features::catalog::{FeatureKind, FeatureRequest, find_fingerprint};
    Ok(find_fingerprint(
        layout,
        &FeatureRequest {
            dataset,
            encoder: Some(encoder),
            kind: Some(if spatial {
                FeatureKind::Spatial
            } else {
                FeatureKind::Pooled
            }),
            pooled: Some(pooled),
            ..FeatureRequest::default()
        },
    )?)
}

/// Segmentation heads of a sweep: each its own run over the spatial
/// features. Finished configs are skipped and killed ones resumed from
/// their newest checkpoint, as for classification heads (unless `force`).
fn sweep_segment_points(
    layout: &Layout,
    db: &ExperimentsDb,
    sweep: &Sweep,
    points: &[usize],
    options: &SweepOptions,
    outcome: &mut SweepOutcome,
) -> Result<(), RunsError> {
    let mut seen = BTreeSet::new();
    for &i in points {
        let point = &sweep.points[i];
        let fingerprint = match &point.fingerprint {
            Some(fingerprint) => fingerprint.clone(),
            None => find_fingerprint(layout, &point.dataset, &point.encoder, true, &point.pooled)?,
        };
        let version = crate::dataset::load_info(layout, &point.dataset)
            .map_err(TrainError::from)?
            .version;
        let config_hash = point
            .config
            .config_hash_at(&point.dataset, version, &fingerprint);
        if !seen.insert(config_hash.clone()) {
            continue;
        }
        let resumable = match next_step(db, &config_hash, options.force)? {
            Step::Skip(id) => {
                outcome.skipped.push((config_hash, id));
                continue;
            }
            Step::Resume(id) => Some(id),
            Step::Start => None,
        };
        let report = match resumable {
            Some(id) => segment::resume(layout, &id, &options.fit.device, options.fit.progress)?,
            None => segment::train(
                layout,
                &segment::SegmentRequest {
                    dataset: point.dataset.clone(),
                    encoder: point.encoder.clone(),
                    fingerprint: Some(fingerprint),
                    maps: None,
                    image_size: None,
                    experiment: sweep.name.clone(),
                    config: point.config.clone(),
                    device: options.fit.device.clone(),
                    progress: options.fit.progress,
                    extra_params: vec![(
                        "sweep".to_string(),
                        ParamValue::from(sweep.name.as_str()),
                    )],
                    class_weights_file: point.class_weights_file.clone(),
                    allow_partial: options.allow_partial,
                },
            )?,
        };
        outcome.segmented.push(report);
    }
    Ok(())
}

/// experiments/sweeps/<name>/comparison.svg|png: every configuration of the
/// sweep (seeds pooled) by its mean chart metric, the runs it reused
/// included.
fn sweep_chart(
    layout: &Layout,
    db: &ExperimentsDb,
    sweep: &Sweep,
    metric: &str,
) -> Result<Vec<PathBuf>, TrainError> {
    // The axes that vary, seeds pooled.
    let mut by: Vec<String> = Vec::new();
    for point in &sweep.points {
        for (key, value) in &point.params {
            if key != "seed"
                && !by.contains(key)
                && sweep
                    .points
                    .iter()
                    .any(|other| other.params.get(key) != Some(value))
            {
                by.push(key.clone());
            }
        }
    }
    // Nothing varies: one bar, named by what every run records (anomaly
    // runs have a scorer, no head).
    let fallback = if sweep
        .points
        .iter()
        .all(|p| p.config.task.anomaly().is_some())
    {
        "scorer"
    } else {
        "head"
    };
    let report = loop {
        if by.is_empty() {
            by.push(fallback.into());
        }
        match db.ablate(&AblationQuery {
            by: by.clone(),
            metric: metric.to_string(),
            wheres: vec![WhereClause {
                key: "sweep".into(),
                value: sweep.name.clone(),
            }],
            baseline: None,
        }) {
            // No run was started or reused under any sweep's name (every
            // config failed before its run began): nothing to compare.
            Err(experiments::ExperimentsError::UnknownParam { param, .. }) if param == "sweep" => {
                return Ok(Vec::new());
            }
            // An axis runs do not record as a param (`fingerprint`: the
            // folder, whose options they record as `layers`, `image_size`
            // and `resize`): charted without it.
            Err(experiments::ExperimentsError::UnknownParam { param, .. })
                if by.contains(&param) && by != [fallback] =>
            {
                by.retain(|key| *key != param);
            }
            report => break report?,
        }
    };
    if report.rows.is_empty() {
        return Ok(Vec::new());
    }
    let dir = layout.experiments_dir().join("sweeps").join(&sweep.name);
    std::fs::create_dir_all(&dir).map_err(TrainError::io(&dir))?;
    let points = experiments::plots::SweepPoint::from_ablation(&report);
    Ok(experiments::plots::sweep_chart(
        &dir.join("comparison"),
        metric,
        &points,
    )?)
}

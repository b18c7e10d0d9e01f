//! The run recorder: how a run of any task is recorded in
//! `experiments/experiments.db` and its folder. A run starts with its
//! params, task tag and config hash, and its `config.json` ([`start`]); a
//! `--resume` is checked ([`resumable_run`]); a finished run writes its
//! config as TOML and its model card ([`write_config_and_card`]) and
//! records its summary metrics, a failed one its error ([`fail_run`]).
//! Classification (`session`), anomaly (`anomaly`) and segmentation
//! (`segment::train`) runs all record through it, so they cannot diverge.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use serde::Serialize;

use super::TrainError;
use super::config::{HeadConfig, Optimizer, Task, TrainConfig};
use super::run::{RunInputs, read_run_inputs, write_run_inputs};
use super::schedule::Schedule;
use super::warm::WarmStart;
use crate::experiments::run_files::{self, RunFolder};
use crate::experiments::{ExperimentsDb, ParamValue, RunHandle, RunStart, RunStatus};

/// The params row of a run: the sweep-file names of its settings (an
/// anomaly run's are its scorer's, see `anomaly::params`).
pub fn params(config: &TrainConfig, dataset: &str, encoder: &str) -> Vec<(String, ParamValue)> {
    if config.task == Task::Anomaly {
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
    if let Some(unfreeze) = &config.unfreeze {
        out.push(("unfreeze_from".into(), (unfreeze.after_block as f64).into()));
        out.push(("blocks_lr".into(), unfreeze.blocks_learning_rate.into()));
        out.push((
            "blocks_weight_decay".into(),
            unfreeze.blocks_weight_decay.into(),
        ));
        if unfreeze.drop_path > 0.0 {
            out.push(("blocks_drop_path".into(), unfreeze.drop_path.into()));
        }
        out.push(("blocks_precision".into(), unfreeze.precision.name().into()));
        if !unfreeze.pooling.is_mean() {
            out.push(("blocks_pool".into(), unfreeze.pooling.name().into()));
        }
        if !unfreeze.mix.is_none() {
            out.push(("mix_maps".into(), unfreeze.mix.name().into()));
        }
        if unfreeze.ema > 0.0 {
            out.push(("ema".into(), unfreeze.ema.into()));
        }
        out.push(("augment_maps".into(), config.augment_maps.name().into()));
        if !config.augment_maps.is_single() {
            out.push(("eval_views".into(), config.eval_views.name().into()));
        }
    }
    if !config.label_map.is_empty() {
        let classes: BTreeSet<&String> = config.label_map.values().collect();
        let text: Vec<&str> = classes.into_iter().map(String::as_str).collect();
        out.push(("label_map".into(), text.join(",").into()));
    }
    out
}

/// The params every run records about its data: the manifest version it
/// trained on (`experiments list --where dataset_version=2`), how many
/// images lacked features when `--allow-partial` let it start anyway, and
/// how pooled features were computed (`layers`, `image_size`, `resize`,
/// `views`, and with several views `train_views` and `eval_views`).
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
    if let Some(pooled) = &inputs.pooled {
        out.push(("layers".to_string(), pooled.layers.as_str().into()));
        out.push(("image_size".to_string(), (pooled.image_size as f64).into()));
        out.push(("resize".to_string(), pooled.resize.as_str().into()));
        out.push(("views".to_string(), pooled.views.as_str().into()));
        // How the run read its views: only where there were several.
        if pooled.views != "1" {
            let config = &inputs.config;
            out.push(("train_views".to_string(), config.train_views.name().into()));
            out.push(("eval_views".to_string(), config.eval_views.name().into()));
        }
    }
    out
}

/// The params that say where a warm-started run came from and what loaded.
pub fn warm_params(warm: &WarmStart) -> Vec<(String, ParamValue)> {
    vec![
        ("init_from".into(), warm.summary.source_run.as_str().into()),
        ("init_layers".into(), warm.summary.layer_states().into()),
    ]
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
pub fn start(
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
pub fn summary_metrics(
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

/// The summary metrics of a run's memory report (besides `peak_rss_bytes`).
pub fn memory_summary(memory: &crate::memory::MemoryReport) -> Vec<(String, f64)> {
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
pub fn fail_run(handle: RunHandle, error: TrainError) -> Result<TrainError, TrainError> {
    handle.set_tags(&[("error", error.to_string())])?;
    handle.finish::<&str>(RunStatus::Failed, &[])?;
    Ok(error)
}

/// Writes the run's config as TOML (for people; `config.json` is what runs
/// read) and its model card, whatever the task's card holds.
pub fn write_config_and_card(
    handle: &RunHandle,
    config: &TrainConfig,
    card: &impl Serialize,
) -> Result<(), TrainError> {
    let toml = toml::to_string_pretty(config)
        .map_err(|e| TrainError::Invalid(format!("config as TOML: {e}")))?;
    handle.write_artifact(run_files::CONFIG_TOML_FILE, toml.as_bytes())?;
    let json = serde_json::to_vec_pretty(card).map_err(|e| TrainError::Invalid(e.to_string()))?;
    handle.write_artifact(run_files::MODEL_CARD_FILE, &json)?;
    Ok(())
}

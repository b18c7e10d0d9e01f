//! Run folder files: head weights and resumable checkpoints.
//!
//! A checkpoint is published like a feature shard: `epoch-NNNN.safetensors`
//! (parameters, optimiser moments, the best head so far) first, then
//! `epoch-NNNN.json` (the trainer state) as its marker, each written to a
//! temp file, fsynced and renamed. A checkpoint without its JSON does not
//! exist; `latest` picks the newest complete pair, so a kill at any point
//! leaves the previous checkpoint usable. Older pairs are removed only after
//! a newer pair is durable. `best.safetensors` beside them is the head file
//! of the best epoch so far, rewritten whenever the monitored metric improves.
//!
//! Classification runs (`run::fit`) and segmentation runs
//! (`segment::train`) both checkpoint through `save_if_due`, `publish_best`
//! and `restore_latest`: the same files, markers and checks.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::TrainError;
use super::config::TrainConfig;
use super::trainer::{HeadTrainer, TrainerState};
use crate::experiments::run_files::RunFolder;

/// The checkpoint JSON: trainer state plus what checks a resume.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct CheckpointState {
    config: TrainConfig,
    state: TrainerState,
    rng: RngDescription,
}

/// The RNG streams the next epoch uses (ChaCha8 seeded with `seed`).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct RngDescription {
    algorithm: String,
    seed: u64,
    data_order_stream: u64,
    dropout_stream: u64,
}

impl RngDescription {
    fn for_epoch(seed: u64, epoch: usize) -> Self {
        RngDescription {
            algorithm: "ChaCha8".into(),
            seed,
            data_order_stream: super::run::data_order_stream(epoch),
            dropout_stream: super::run::dropout_stream(epoch),
        }
    }
}

/// After an epoch's `end_epoch`: publishes the trainer's checkpoint when one
/// is due (every `checkpoint_every` epochs, and when the head stops). `config`
/// is the run's configuration, which a resume must match.
pub fn save_if_due(
    run_dir: &Path,
    config: &TrainConfig,
    trainer: &HeadTrainer,
) -> Result<(), TrainError> {
    save_if_due_with(run_dir, config, trainer, || Ok(Vec::new()))
}

/// `save_if_due` with the tensors `more` gives beside the head's (a
/// fine-tuned run's blocks, their moments and the best blocks), asked for
/// only when a checkpoint is due.
pub fn save_if_due_with(
    run_dir: &Path,
    config: &TrainConfig,
    trainer: &HeadTrainer,
    more: impl FnOnce() -> Result<Vec<(String, Tensor)>, TrainError>,
) -> Result<(), TrainError> {
    let every = config.checkpoint_every;
    let epochs_done = trainer.state.epochs_done;
    if every == 0 || (!epochs_done.is_multiple_of(every) && trainer.is_active()) {
        return Ok(());
    }
    let state = CheckpointState {
        config: config.clone(),
        state: trainer.state.clone(),
        rng: RngDescription::for_epoch(config.seed, epochs_done),
    };
    let json = serde_json::to_vec_pretty(&state).map_err(|e| TrainError::Invalid(e.to_string()))?;
    let mut tensors = trainer.checkpoint_tensors();
    tensors.extend(more()?);
    publish(run_dir, epochs_done, &tensors, &json)
}

/// Writes `checkpoints/best.safetensors`: the head file of a new best epoch.
pub fn publish_best(run_dir: &Path, head_file: &[u8]) -> Result<(), TrainError> {
    let folder = RunFolder::new(run_dir);
    let dir = folder.checkpoints();
    std::fs::create_dir_all(&dir).map_err(TrainError::io(&dir))?;
    let path = folder.best_head();
    crate::atomic::write_file(&path, head_file).map_err(TrainError::io(&path))?;
    Ok(())
}

/// Loads the newest complete checkpoint of `run_dir` into `trainer`,
/// refusing one made with another configuration than `config`. Returns the
/// epochs it had finished (0, and the trainer untouched, without one).
pub fn restore_latest(
    run_dir: &Path,
    config: &TrainConfig,
    trainer: &mut HeadTrainer,
    device: &Device,
) -> Result<usize, TrainError> {
    restore_latest_with(run_dir, config, trainer, device)?;
    Ok(trainer.state.epochs_done)
}

/// Every tensor of a restored checkpoint, and the file they were read from.
pub type RestoredTensors = (HashMap<String, Tensor>, PathBuf);

/// `restore_latest`, handing back every tensor of the checkpoint (and its
/// file, for messages) so that the caller restores what it saved beside the
/// head; None, and the trainer untouched, without a checkpoint.
pub fn restore_latest_with(
    run_dir: &Path,
    config: &TrainConfig,
    trainer: &mut HeadTrainer,
    device: &Device,
) -> Result<Option<RestoredTensors>, TrainError> {
    let Some((weights, json)) = latest(run_dir)? else {
        return Ok(None);
    };
    let saved: CheckpointState = serde_json::from_slice(&json).map_err(|e| {
        TrainError::Checkpoint(format!(
            "checkpoint state in {} is not readable: {e}",
            run_dir.display()
        ))
    })?;
    if saved.config != *config {
        return Err(TrainError::Checkpoint(format!(
            "checkpoint in {} was made with a different configuration",
            run_dir.display()
        )));
    }
    let tensors = load_tensors(&weights, device)?;
    trainer.restore_checkpoint(saved.state, &tensors)?;
    Ok(Some((tensors, weights)))
}

/// The JSON value under `key` in a safetensors file's header metadata; None
/// when the key is missing or does not parse as `T`.
pub fn header_json<T: serde::de::DeserializeOwned>(
    path: &Path,
    key: &str,
) -> Result<Option<T>, TrainError> {
    let bytes = std::fs::read(path)
        .map_err(|e| TrainError::Checkpoint(format!("cannot read {}: {e}", path.display())))?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| TrainError::Checkpoint(format!("{}: {e}", path.display())))?;
    Ok(header
        .metadata()
        .as_ref()
        .and_then(|m| m.get(key))
        .and_then(|text| serde_json::from_str(text).ok()))
}

/// Serialises named tensors (converted to f32) with string metadata.
pub fn safetensors_bytes(
    tensors: &[(String, Tensor)],
    metadata: Option<HashMap<String, String>>,
) -> Result<Vec<u8>, TrainError> {
    let mut owned: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::with_capacity(tensors.len());
    for (name, tensor) in tensors {
        let values = tensor
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        owned.push((name.clone(), tensor.dims().to_vec(), values));
    }
    let views = owned
        .iter()
        .map(|(name, shape, values)| {
            safetensors::tensor::TensorView::new(
                safetensors::Dtype::F32,
                shape.clone(),
                bytemuck::cast_slice(values),
            )
            .map(|view| (name.clone(), view))
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TrainError::Invalid(format!("serialising tensors: {e}")))?;
    safetensors::tensor::serialize(views, metadata)
        .map_err(|e| TrainError::Invalid(format!("serialising tensors: {e}")))
}

/// Reads every tensor of a safetensors file onto `device`; refuses a file
/// whose float tensors hold NaN or infinity (see `tensors_from_bytes`).
pub fn load_tensors(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>, TrainError> {
    let bytes = std::fs::read(path)
        .map_err(|e| TrainError::Checkpoint(format!("cannot read {}: {e}", path.display())))?;
    tensors_from_bytes(&bytes, path, device)
}

/// The tensors of a head, scorer or checkpoint file (`bytes`, read from
/// `path`) onto `device`. Every float value must be finite: a head that
/// diverged in training (or a damaged file) would score every image NaN.
pub fn tensors_from_bytes(
    bytes: &[u8],
    path: &Path,
    device: &Device,
) -> Result<HashMap<String, Tensor>, TrainError> {
    let unreadable =
        |e: String| TrainError::Checkpoint(format!("cannot read {}: {e}", path.display()));
    let file =
        safetensors::SafeTensors::deserialize(bytes).map_err(|e| unreadable(e.to_string()))?;
    for (name, view) in file.tensors() {
        use half::{bf16, f16};
        let data = view.data();
        let finite = match view.dtype() {
            safetensors::Dtype::F32 => data
                .chunks_exact(4)
                .all(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]).is_finite()),
            safetensors::Dtype::F64 => data
                .chunks_exact(8)
                .all(|b| f64::from_le_bytes(b.try_into().expect("8 bytes")).is_finite()),
            safetensors::Dtype::F16 => data
                .chunks_exact(2)
                .all(|b| f16::from_le_bytes([b[0], b[1]]).is_finite()),
            safetensors::Dtype::BF16 => data
                .chunks_exact(2)
                .all(|b| bf16::from_le_bytes([b[0], b[1]]).is_finite()),
            _ => true,
        };
        if !finite {
            return Err(TrainError::Checkpoint(format!(
                "{}: tensor {name} holds NaN or infinite values (a head that diverged in \
                 training, or a damaged file); refusing to use it — retrain with a lower --lr",
                path.display()
            )));
        }
    }
    candle_core::safetensors::load_buffer(bytes, device).map_err(|e| unreadable(e.to_string()))
}

fn pair_paths(dir: &Path, epoch: usize) -> (PathBuf, PathBuf) {
    (
        dir.join(format!("epoch-{epoch:04}.safetensors")),
        dir.join(format!("epoch-{epoch:04}.json")),
    )
}

/// Publishes the checkpoint taken after `epoch` (1-based count of finished
/// epochs), then removes older ones.
pub fn publish(
    run_dir: &Path,
    epoch: usize,
    tensors: &[(String, Tensor)],
    state_json: &[u8],
) -> Result<(), TrainError> {
    let dir = RunFolder::new(run_dir).checkpoints();
    std::fs::create_dir_all(&dir).map_err(TrainError::io(&dir))?;
    let (weights, state) = pair_paths(&dir, epoch);
    crate::atomic::write_file(&weights, &safetensors_bytes(tensors, None)?)
        .map_err(TrainError::io(&weights))?;
    crate::atomic::write_file(&state, state_json).map_err(TrainError::io(&state))?;
    for older in complete_epochs(&dir)?.into_iter().filter(|&e| e < epoch) {
        let (w, s) = pair_paths(&dir, older);
        // The marker goes first, so a kill here never leaves a marker without weights.
        std::fs::remove_file(&s).map_err(TrainError::io(&s))?;
        std::fs::remove_file(&w).map_err(TrainError::io(&w))?;
    }
    Ok(())
}

/// Epochs with a complete (weights + marker) checkpoint, ascending.
fn complete_epochs(dir: &Path) -> Result<Vec<usize>, TrainError> {
    let mut epochs = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(epochs),
        Err(e) => return Err(TrainError::io(dir)(e)),
    };
    for entry in entries {
        let name = entry
            .map_err(TrainError::io(dir))?
            .file_name()
            .to_string_lossy()
            .into_owned();
        if let Some(epoch) = name
            .strip_prefix("epoch-")
            .and_then(|rest| rest.strip_suffix(".json"))
            .and_then(|n| n.parse::<usize>().ok())
            && pair_paths(dir, epoch).0.is_file()
        {
            epochs.push(epoch);
        }
    }
    epochs.sort_unstable();
    Ok(epochs)
}

/// The newest complete checkpoint: its weights file and state JSON.
pub fn latest(run_dir: &Path) -> Result<Option<(PathBuf, Vec<u8>)>, TrainError> {
    let dir = RunFolder::new(run_dir).checkpoints();
    let Some(&epoch) = complete_epochs(&dir)?.last() else {
        return Ok(None);
    };
    let (weights, state) = pair_paths(&dir, epoch);
    let json = std::fs::read(&state).map_err(TrainError::io(&state))?;
    Ok(Some((weights, json)))
}

/// Epochs finished at the newest complete checkpoint (0 when there is none).
pub fn latest_epoch(run_dir: &Path) -> Result<usize, TrainError> {
    Ok(complete_epochs(&RunFolder::new(run_dir).checkpoints())?
        .last()
        .copied()
        .unwrap_or(0))
}

//! Warm starts (`train --init-from RUN`): a new head starts from another
//! run's weights instead of its seeded initialisation. Classification heads
//! start from classification runs and segmentation heads from segmentation
//! runs (`WarmTarget` says what the new head reads and predicts); a head of
//! another task reads other features and is refused.
//!
//! Layers load in order while their shapes chain: the hidden layers of an
//! MLP load when the feature dimension and hidden sizes match; the output
//! layer loads only when the classes are the same, in the same order, and is
//! otherwise re-initialised (seeded, as a fresh run). Features of another
//! dimension or another encoder are refused: the source head's weights mean
//! nothing on them.
//!
//! The first layer is rewritten for the new run's standardisation, so the
//! loaded layers compute the same function of the raw features as in the
//! source run: with x_s = (x - m_s) / s_s (source) and x_n = (x - m_n) / s_n
//! (new), W x_s + b = (W diag(s_n / s_s)) x_n + (b + W ((m_n - m_s) / s_s)).
//! On the source's own training split the statistics are equal and the
//! weights load unchanged.

use candle_core::{DType, Device, Tensor};
use serde::Serialize;

use super::TrainError;
use super::config::{Task, TrainConfig};
use super::data::TrainData;
use super::head::Head;
use super::run::read_run_inputs;
use crate::experiments::run_files::RunFolder;
use crate::layout::Layout;

/// Which layers a warm start loads, with the weights to load.
#[derive(Debug, Clone)]
pub struct WarmStart {
    pub summary: WarmStartSummary,
    /// Per layer of the new head: weight and bias to load, or None to keep
    /// the seeded initialisation.
    layers: Vec<Option<(Tensor, Tensor)>>,
}

/// What a warm start does, for people and for experiments.db.
#[derive(Debug, Clone, Serialize)]
pub struct WarmStartSummary {
    pub source_run: String,
    /// Indices of the layers loaded from the source run.
    pub loaded: Vec<usize>,
    /// Indices of the layers that keep their seeded initialisation.
    pub reinitialised: Vec<usize>,
    /// Why each re-initialised layer was not loaded.
    pub reasons: Vec<String>,
}

impl WarmStartSummary {
    /// One line for the terminal.
    pub fn describe(&self) -> String {
        let list = |layers: &[usize]| {
            layers
                .iter()
                .map(usize::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut line = format!("warm start from run {}: ", self.source_run);
        if self.loaded.is_empty() {
            line.push_str("no layer loaded");
        } else {
            line.push_str(&format!("loaded layer(s) {}", list(&self.loaded)));
        }
        if !self.reinitialised.is_empty() {
            line.push_str(&format!(
                "; re-initialised layer(s) {} ({})",
                list(&self.reinitialised),
                self.reasons.join("; ")
            ));
        }
        line
    }

    /// `init_layers`-style text: "loaded" or "reinitialised" per layer, e.g.
    /// `0:loaded,1:loaded,2:reinitialised`.
    pub fn layer_states(&self) -> String {
        let count = self.loaded.len() + self.reinitialised.len();
        (0..count)
            .map(|i| {
                let state = if self.loaded.contains(&i) {
                    "loaded"
                } else {
                    "reinitialised"
                };
                format!("{i}:{state}")
            })
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// What a warm-started head reads and predicts: its task, its features'
/// dimension and encoder, its classes and outputs, and the standardisation
/// of its training split.
pub struct WarmTarget<'a> {
    pub task: Task,
    pub dataset_name: &'a str,
    pub feature_dim: usize,
    pub encoder: Option<&'a str>,
    /// The class names the run records (a binary mask's are background
    /// and foreground).
    pub class_names: &'a [String],
    /// The head's outputs: the classes, or 1 for a binary mask.
    pub outputs: usize,
    pub mean: &'a [f32],
    pub std: &'a [f32],
}

impl<'a> WarmTarget<'a> {
    /// A classification head on `data`.
    pub fn classifier(data: &'a TrainData) -> Self {
        WarmTarget {
            task: Task::Classify,
            dataset_name: &data.dataset_name,
            feature_dim: data.features.feature_dim(),
            encoder: data.features.metadata().get("encoder").map(String::as_str),
            class_names: &data.class_names,
            outputs: data.class_names.len(),
            mean: &data.mean,
            std: &data.std,
        }
    }
}

/// Plans a warm start of a classification head with `config` on `data`
/// from run `source_run`.
pub fn plan(
    layout: &Layout,
    source_run: &str,
    config: &TrainConfig,
    data: &TrainData,
) -> Result<WarmStart, TrainError> {
    plan_for(layout, source_run, config, &WarmTarget::classifier(data))
}

/// Plans a warm start of a head with `config` for `target` from run
/// `source_run`, which must be a finished run of the same task.
pub fn plan_for(
    layout: &Layout,
    source_run: &str,
    config: &TrainConfig,
    target: &WarmTarget<'_>,
) -> Result<WarmStart, TrainError> {
    let invalid =
        |message: String| TrainError::Invalid(format!("--init-from {source_run}: {message}"));
    let run_dir = crate::experiments::recorded_run_dir(layout, source_run)
        .map_err(|e| invalid(format!("run {source_run} not found: {e}")))?;
    if !run_dir.is_dir() {
        return Err(invalid(format!(
            "run {source_run} not found: no folder {}",
            run_dir.display()
        )));
    }
    let head_path = RunFolder::new(&run_dir).head();
    if !head_path.is_file() {
        return Err(invalid(format!(
            "{} is missing: the run did not finish",
            head_path.display()
        )));
    }
    let inputs = read_run_inputs(&run_dir)?;
    if inputs.config.task != target.task {
        return Err(invalid(format!(
            "run {source_run} is a {} run; a {} head starts only from another {} run",
            inputs.config.task.name(),
            target.task.name(),
            target.task.name()
        )));
    }
    if let Some(unfreeze) = inputs.config.unfreeze {
        return Err(invalid(format!(
            "run {source_run} trained the encoder's blocks after block {} with its head \
             (--unfreeze-from): its head reads their output, not the frozen encoder's features",
            unfreeze.after_block
        )));
    }
    let tensors = super::checkpoint::load_tensors(&head_path, &Device::Cpu)?;
    let tensor = |name: &str| {
        tensors
            .get(name)
            .map(|t| t.to_dtype(DType::F32))
            .transpose()?
            .ok_or_else(|| invalid(format!("{} has no tensor {name}", head_path.display())))
    };
    let (source_mean, source_std) = (tensor("input_mean")?, tensor("input_std")?);
    let source_dim = source_mean.dims1()?;
    let dim = target.feature_dim;
    let encoder = target.encoder;
    if source_dim != dim {
        return Err(invalid(format!(
            "its head reads {source_dim}-dimensional features (encoder {}), the features of \
             dataset {} have {dim} (encoder {}); a warm start needs features of the same encoder",
            inputs.encoder.as_deref().unwrap_or("unknown"),
            target.dataset_name,
            encoder.unwrap_or("unknown")
        )));
    }
    if let (Some(source), Some(this)) = (inputs.encoder.as_deref(), encoder)
        && source != this
    {
        return Err(invalid(format!(
            "its head was trained on features of encoder {source}, dataset {}'s features \
             are from {this}; a warm start needs features of the same encoder",
            target.dataset_name
        )));
    }
    let source = Head::from_tensors(&inputs.config.head, &tensors, source_dim)?;

    let mut sizes = vec![dim];
    sizes.extend(config.head.layer_sizes(target.outputs));
    let layer_count = sizes.len() - 1;
    let mut layers = Vec::with_capacity(layer_count);
    let mut summary = WarmStartSummary {
        source_run: source_run.to_string(),
        loaded: Vec::new(),
        reinitialised: Vec::new(),
        reasons: Vec::new(),
    };
    let mut chained = true;
    for i in 0..layer_count {
        let (inputs_wanted, outputs_wanted) = (sizes[i], sizes[i + 1]);
        let is_output = i + 1 == layer_count;
        let reason = match source.layers.get(i) {
            _ if !chained => Some(format!("layer {i}: an earlier layer was not loaded")),
            None => Some(format!(
                "layer {i}: the source head has {} layers",
                source.layers.len()
            )),
            Some(_) if is_output != (i + 1 == source.layers.len()) => Some(format!(
                "layer {i}: {} here, {} in the source head",
                if is_output {
                    "the output layer"
                } else {
                    "a hidden layer"
                },
                if is_output {
                    "a hidden layer"
                } else {
                    "the output layer"
                },
            )),
            Some((weight, _)) if weight.as_tensor().dims() != [outputs_wanted, inputs_wanted] => {
                Some(format!(
                    "layer {i}: shape {:?} in the source head, {:?} here{}",
                    weight.as_tensor().dims(),
                    [outputs_wanted, inputs_wanted],
                    if is_output {
                        format!(
                            " (source classes {}, this run {})",
                            inputs.class_names.join(","),
                            target.class_names.join(",")
                        )
                    } else {
                        String::new()
                    }
                ))
            }
            Some(_) if is_output && inputs.class_names.as_slice() != target.class_names => {
                Some(format!(
                    "output layer {i}: the source classes {} are not this run's {}",
                    inputs.class_names.join(","),
                    target.class_names.join(",")
                ))
            }
            Some(_) => None,
        };
        match reason {
            Some(reason) => {
                chained = false;
                summary.reinitialised.push(i);
                summary.reasons.push(reason);
                layers.push(None);
            }
            None => {
                let (weight, bias) = &source.layers[i];
                let (mut weight, mut bias) = (weight.as_tensor().clone(), bias.as_tensor().clone());
                if i == 0 {
                    (weight, bias) =
                        restandardise(&weight, &bias, (&source_mean, &source_std), target)?;
                }
                summary.loaded.push(i);
                layers.push(Some((weight, bias)));
            }
        }
    }
    Ok(WarmStart { summary, layers })
}

/// The first layer rewritten for the new run's standardisation (module docs).
fn restandardise(
    weight: &Tensor,
    bias: &Tensor,
    (source_mean, source_std): (&Tensor, &Tensor),
    target: &WarmTarget<'_>,
) -> Result<(Tensor, Tensor), TrainError> {
    let device = weight.device();
    let mean = Tensor::from_slice(target.mean, target.mean.len(), device)?;
    let std = Tensor::from_slice(target.std, target.std.len(), device)?;
    let scale = (std / source_std)?;
    let shift = ((mean - source_mean)? / source_std)?;
    let scaled = weight.broadcast_mul(&scale.unsqueeze(0)?)?;
    let moved = (bias + weight.matmul(&shift.unsqueeze(1)?)?.squeeze(1)?)?;
    Ok((scaled, moved))
}

impl WarmStart {
    /// Puts the loaded layers' weights into a freshly initialised head.
    pub fn apply(&self, head: &Head) -> Result<(), TrainError> {
        if head.layers.len() != self.layers.len() {
            return Err(TrainError::Invalid(format!(
                "warm start from run {} planned {} layers for a head of {}",
                self.summary.source_run,
                self.layers.len(),
                head.layers.len()
            )));
        }
        for ((weight, bias), loaded) in head.layers.iter().zip(&self.layers) {
            if let Some((new_weight, new_bias)) = loaded {
                weight.set(&new_weight.to_device(weight.device())?)?;
                bias.set(&new_bias.to_device(bias.device())?)?;
            }
        }
        Ok(())
    }
}

//! One training run: a linear or MLP head on standardised features, seeded
//! initialisation and shuffling, micro-batches with gradient accumulation,
//! AdamW or SGD with momentum, clipping, label smoothing and early stopping.

use std::collections::BTreeMap;
use std::path::PathBuf;

use candle_core::{D, DType, Device, Tensor, Var};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use super::TrainError;
use super::data::{SplitRows, TrainData};
use super::metrics::{Predictions, split_metrics};
use super::schedule::Schedule;
use crate::layout::Layout;

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub enum Activation {
    Relu,
    Gelu,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub enum HeadConfig {
    Linear,
    Mlp {
        hidden: Vec<usize>,
        dropout: f64,
        activation: Activation,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub enum Optimizer {
    AdamW,
    /// SGD with this momentum.
    Sgd {
        momentum: f64,
    },
}

/// Early stopping on a validation metric where higher is better (loss is negated).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EarlyStopping {
    pub metric: String,
    pub patience: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TrainConfig {
    pub head: HeadConfig,
    pub epochs: usize,
    pub learning_rate: f64,
    pub weight_decay: f64,
    pub optimizer: Optimizer,
    #[serde(skip)]
    pub schedule: Schedule,
    pub batch_size: usize,
    pub memory_budget_bytes: u64,
    pub gradient_clip: Option<f64>,
    pub label_smoothing: f64,
    pub early_stopping: Option<EarlyStopping>,
    pub seed: u64,
}

/// Micro-batch size and accumulation steps that fit the memory budget.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct BatchPlan {
    pub micro_batch: usize,
    pub accumulation_steps: usize,
}

/// Plans micro-batches: parameters cost weights, gradients, accumulated
/// gradients and two optimiser moments (5 f32 copies); each example costs its
/// gathered f32 row plus activations and their gradients (x3).
pub fn plan_batches(
    batch_size: usize,
    feature_dim: usize,
    layer_sizes: &[usize],
    budget_bytes: u64,
) -> Result<BatchPlan, TrainError> {
    let mut parameters = 0u64;
    let mut previous = feature_dim as u64;
    for &size in layer_sizes {
        parameters += previous * size as u64 + size as u64;
        previous = size as u64;
    }
    let fixed = parameters * 4 * 5;
    let activations: u64 = layer_sizes.iter().map(|&s| s as u64).sum();
    let per_example = 4 * (feature_dim as u64 + 3 * activations);
    let fits = budget_bytes.saturating_sub(fixed) / per_example.max(1);
    if fixed >= budget_bytes || fits == 0 {
        return Err(TrainError::Invalid(format!(
            "memory budget of {budget_bytes} bytes cannot hold the head ({parameters} parameters, \
             {fixed} bytes with gradients and optimiser state) plus one example ({per_example} bytes)"
        )));
    }
    let micro_batch = batch_size.min(fits as usize).max(1);
    Ok(BatchPlan {
        micro_batch,
        accumulation_steps: batch_size.div_ceil(micro_batch),
    })
}

struct Head {
    /// Weight [out, in] and bias [out] per layer.
    layers: Vec<(Var, Var)>,
    config: HeadConfig,
}

impl Head {
    fn new(config: &HeadConfig, sizes: &[usize], rng: &mut ChaCha8Rng) -> Result<Self, TrainError> {
        let mut layers = Vec::new();
        for pair in sizes.windows(2) {
            let (inputs, outputs) = (pair[0], pair[1]);
            // PyTorch's nn.Linear default range, drawn from the seeded RNG.
            let bound = 1.0 / (inputs as f32).sqrt();
            let weight: Vec<f32> = (0..inputs * outputs)
                .map(|_| rng.random_range(-bound..bound))
                .collect();
            let bias: Vec<f32> = (0..outputs)
                .map(|_| rng.random_range(-bound..bound))
                .collect();
            layers.push((
                Var::from_tensor(&Tensor::from_vec(weight, (outputs, inputs), &Device::Cpu)?)?,
                Var::from_tensor(&Tensor::from_vec(bias, outputs, &Device::Cpu)?)?,
            ));
        }
        Ok(Head {
            layers,
            config: config.clone(),
        })
    }

    fn parameters(&self) -> Vec<&Var> {
        self.layers.iter().flat_map(|(w, b)| [w, b]).collect()
    }

    /// Logits; `dropout_rng` is `Some` in training mode.
    fn forward(
        &self,
        x: &Tensor,
        mut dropout_rng: Option<&mut ChaCha8Rng>,
    ) -> Result<Tensor, TrainError> {
        let mut h = x.clone();
        let last = self.layers.len() - 1;
        for (i, (w, b)) in self.layers.iter().enumerate() {
            h = h
                .matmul(&w.as_tensor().t()?)?
                .broadcast_add(b.as_tensor())?;
            if i == last {
                break;
            }
            if let HeadConfig::Mlp {
                dropout,
                activation,
                ..
            } = &self.config
            {
                h = match activation {
                    Activation::Relu => h.relu()?,
                    Activation::Gelu => h.gelu_erf()?,
                };
                if let Some(rng) = dropout_rng.as_deref_mut()
                    && *dropout > 0.0
                {
                    // Seeded mask instead of candle's device RNG, for reproducible runs.
                    let keep = 1.0 - *dropout;
                    let mask: Vec<f32> = (0..h.elem_count())
                        .map(|_| {
                            if rng.random::<f64>() < keep {
                                (1.0 / keep) as f32
                            } else {
                                0.0
                            }
                        })
                        .collect();
                    let mask = Tensor::from_vec(mask, h.shape(), &Device::Cpu)?;
                    h = (h * mask)?;
                }
            }
        }
        Ok(h)
    }
}

/// Cross-entropy against smoothed one-hot targets, averaged over the rows.
fn smoothed_cross_entropy(
    logits: &Tensor,
    labels: &[usize],
    classes: usize,
    smoothing: f64,
) -> Result<Tensor, TrainError> {
    let off = smoothing / classes as f64;
    let mut targets = vec![off as f32; labels.len() * classes];
    for (i, &label) in labels.iter().enumerate() {
        targets[i * classes + label] += (1.0 - smoothing) as f32;
    }
    let targets = Tensor::from_vec(targets, (labels.len(), classes), &Device::Cpu)?;
    let log_probabilities = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    Ok((log_probabilities * targets)?
        .sum_all()?
        .neg()?
        .affine(1.0 / labels.len() as f64, 0.0)?)
}

struct OptimizerState {
    first: Vec<Tensor>,
    second: Vec<Tensor>,
    step: i32,
}

/// What a finished run reports.
#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    pub run_id: String,
    pub run_dir: PathBuf,
    pub plan: BatchPlan,
    pub epochs_run: usize,
    pub best_epoch: usize,
    /// Per epoch: `train/*` and `val/*` metrics.
    pub epochs: Vec<BTreeMap<String, f64>>,
    /// Final `test/*` metrics of the kept (best) head.
    pub test: BTreeMap<String, f64>,
    pub test_confusion_matrix: Vec<Vec<u64>>,
}

/// Trains a head, evaluates it, and writes `experiments/runs/<run-id>/`.
pub fn train(
    layout: &Layout,
    data: &TrainData,
    config: &TrainConfig,
) -> Result<RunReport, TrainError> {
    if config.epochs == 0 || config.batch_size == 0 {
        return Err(TrainError::Invalid(
            "epochs and batch size must be at least 1".into(),
        ));
    }
    let dim = data.features.feature_dim();
    let classes = data.class_names.len();
    let mut sizes = vec![dim];
    if let HeadConfig::Mlp { hidden, .. } = &config.head {
        sizes.extend(hidden);
    }
    sizes.push(classes);
    let plan = plan_batches(
        config.batch_size,
        dim,
        &sizes[1..],
        config.memory_budget_bytes,
    )?;

    let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
    let head = Head::new(&config.head, &sizes, &mut rng)?;
    let parameters: Vec<Var> = head.parameters().into_iter().cloned().collect();
    let mut state = OptimizerState {
        first: parameters
            .iter()
            .map(|p| p.zeros_like())
            .collect::<Result<_, _>>()?,
        second: parameters
            .iter()
            .map(|p| p.zeros_like())
            .collect::<Result<_, _>>()?,
        step: 0,
    };
    let steps_per_epoch = data.train.rows.len().div_ceil(config.batch_size);
    let total_steps = steps_per_epoch * config.epochs;
    let mut order = data
        .train
        .rows
        .iter()
        .copied()
        .zip(data.train.labels.iter().copied())
        .collect::<Vec<_>>();

    let mut epochs = Vec::new();
    let mut best: Option<(f64, usize, Vec<Tensor>)> = None;
    let mut since_best = 0;
    let mut global_step = 0;
    for epoch in 0..config.epochs {
        order.shuffle(&mut rng);
        for batch in order.chunks(config.batch_size) {
            let mut accumulated: Option<Vec<Tensor>> = None;
            for micro in batch.chunks(plan.micro_batch) {
                let rows: Vec<usize> = micro.iter().map(|&(r, _)| r).collect();
                let labels: Vec<usize> = micro.iter().map(|&(_, l)| l).collect();
                let x = Tensor::from_vec(data.gather(&rows), (rows.len(), dim), &Device::Cpu)?;
                let logits = head.forward(&x, Some(&mut rng))?;
                // Weight by share of the batch so accumulated gradients equal the batch mean.
                let loss =
                    smoothed_cross_entropy(&logits, &labels, classes, config.label_smoothing)?
                        .affine(micro.len() as f64 / batch.len() as f64, 0.0)?;
                let grads = loss.backward()?;
                let these = parameters
                    .iter()
                    .map(|p| grads.get(p).cloned().map_or_else(|| p.zeros_like(), Ok))
                    .collect::<Result<Vec<_>, _>>()?;
                accumulated = Some(match accumulated {
                    None => these,
                    Some(sum) => sum
                        .iter()
                        .zip(&these)
                        .map(|(a, b)| a + b)
                        .collect::<Result<_, _>>()?,
                });
            }
            let mut grads = accumulated.expect("a batch holds at least one example");
            if let Some(max_norm) = config.gradient_clip {
                let mut norm_sq = 0f64;
                for g in &grads {
                    norm_sq += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
                }
                let norm = norm_sq.sqrt();
                if norm > max_norm {
                    grads = grads
                        .iter()
                        .map(|g| g.affine(max_norm / norm, 0.0))
                        .collect::<Result<_, _>>()?;
                }
            }
            let lr = config.schedule.learning_rate(
                config.learning_rate,
                global_step,
                total_steps,
                epoch,
            );
            step(&parameters, &grads, &mut state, config, lr)?;
            global_step += 1;
        }

        let mut metrics = evaluate(&head, data, &data.train, "train")?.0;
        metrics.extend(evaluate(&head, data, &data.val, "val")?.0);
        epochs.push(metrics);
        let score = monitored(config, epochs.last().expect("just pushed"))?;
        if best.as_ref().is_none_or(|(b, _, _)| score > *b) {
            let snapshot = parameters
                .iter()
                .map(|p| p.as_tensor().copy())
                .collect::<Result<_, _>>()?;
            best = Some((score, epoch, snapshot));
            since_best = 0;
        } else {
            since_best += 1;
            if let Some(stop) = &config.early_stopping
                && since_best >= stop.patience
            {
                break;
            }
        }
    }
    let (_, best_epoch, snapshot) = best.expect("at least one epoch ran");
    for (p, t) in parameters.iter().zip(&snapshot) {
        p.set(t)?;
    }
    let (test, test_confusion_matrix) = evaluate(&head, data, &data.test, "test")?;

    let (run_id, run_dir) = new_run_dir(layout)?;
    let report = RunReport {
        run_id,
        run_dir: run_dir.clone(),
        plan,
        epochs_run: epochs.len(),
        best_epoch,
        epochs,
        test,
        test_confusion_matrix,
    };
    write_run(&run_dir, &report, config, data, &head)?;
    Ok(report)
}

/// The early-stopping score, higher is better; without early stopping, `val/accuracy`.
fn monitored(config: &TrainConfig, metrics: &BTreeMap<String, f64>) -> Result<f64, TrainError> {
    let name = config
        .early_stopping
        .as_ref()
        .map_or("val/accuracy", |e| e.metric.as_str());
    let value = *metrics.get(name).ok_or_else(|| {
        TrainError::Invalid(format!("early-stopping metric {name} is not computed"))
    })?;
    Ok(if name.ends_with("/loss") {
        -value
    } else {
        value
    })
}

fn step(
    parameters: &[Var],
    grads: &[Tensor],
    state: &mut OptimizerState,
    config: &TrainConfig,
    lr: f64,
) -> Result<(), TrainError> {
    state.step += 1;
    for (i, (p, g)) in parameters.iter().zip(grads).enumerate() {
        let w = p.as_tensor();
        let updated = match config.optimizer {
            Optimizer::AdamW => {
                let (beta1, beta2, eps) = (0.9f64, 0.999f64, 1e-8);
                state.first[i] = ((&state.first[i] * beta1)? + (g * (1.0 - beta1))?)?;
                state.second[i] = ((&state.second[i] * beta2)? + (g.sqr()? * (1.0 - beta2))?)?;
                let m_hat = (&state.first[i] / (1.0 - beta1.powi(state.step)))?;
                let v_hat = (&state.second[i] / (1.0 - beta2.powi(state.step)))?;
                let decayed = (w * (1.0 - lr * config.weight_decay))?;
                (decayed - (m_hat / (v_hat.sqrt()? + eps)?)?.affine(lr, 0.0)?)?
            }
            Optimizer::Sgd { momentum } => {
                // Coupled L2 decay, as in torch.optim.SGD.
                let g = (g + (w * config.weight_decay)?)?;
                state.first[i] = ((&state.first[i] * momentum)? + g)?;
                (w - (&state.first[i] * lr)?)?
            }
        };
        p.set(&updated)?;
    }
    Ok(())
}

/// Named metrics of one split and its confusion matrix.
type Evaluation = (BTreeMap<String, f64>, Vec<Vec<u64>>);

fn evaluate(
    head: &Head,
    data: &TrainData,
    split: &SplitRows,
    name: &str,
) -> Result<Evaluation, TrainError> {
    let dim = data.features.feature_dim();
    let mut probabilities = Vec::with_capacity(split.rows.len() * data.class_names.len());
    for rows in split.rows.chunks(1024) {
        let x = Tensor::from_vec(data.gather(rows), (rows.len(), dim), &Device::Cpu)?;
        let p = candle_nn::ops::softmax(&head.forward(&x, None)?, D::Minus1)?;
        probabilities.extend(p.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?);
    }
    let predictions = Predictions {
        probabilities: &probabilities,
        labels: &split.labels,
        class_count: data.class_names.len(),
    };
    Ok((
        split_metrics(name, &predictions, &data.class_names)?,
        super::metrics::confusion_matrix(&predictions)?,
    ))
}

fn new_run_dir(layout: &Layout) -> Result<(String, PathBuf), TrainError> {
    let runs = layout.root().join("experiments").join("runs");
    std::fs::create_dir_all(&runs)?;
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    // create_dir fails on an existing folder, so two runs in one second get distinct ids.
    for n in 0.. {
        let id = format!("{stamp}-{n}");
        let dir = runs.join(&id);
        match std::fs::create_dir(&dir) {
            Ok(()) => return Ok((id, dir)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e.into()),
        }
    }
    unreachable!("the loop returns")
}

fn write_run(
    dir: &std::path::Path,
    report: &RunReport,
    config: &TrainConfig,
    data: &TrainData,
    head: &Head,
) -> Result<(), TrainError> {
    let json = |v: serde_json::Value| serde_json::to_vec_pretty(&v).expect("JSON values serialise");
    crate::atomic::write_file(
        &dir.join("metrics.json"),
        &json(serde_json::to_value(report).map_err(|e| TrainError::Invalid(e.to_string()))?),
    )?;
    crate::atomic::write_file(
        &dir.join("config.json"),
        &json(serde_json::json!({
            "config": config,
            "schedule": format!("{:?}", config.schedule),
            "fingerprint": data.fingerprint,
            "class_names": data.class_names,
        })),
    )?;
    // Head weights plus the standardisation it was trained with.
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = vec![
        (
            "input_mean".into(),
            vec![data.mean.len()],
            bytemuck::cast_slice(&data.mean).to_vec(),
        ),
        (
            "input_std".into(),
            vec![data.std.len()],
            bytemuck::cast_slice(&data.std).to_vec(),
        ),
    ];
    for (i, (w, b)) in head.layers.iter().enumerate() {
        for (kind, t) in [("weight", w), ("bias", b)] {
            let values = t.as_tensor().flatten_all()?.to_vec1::<f32>()?;
            tensors.push((
                format!("layers.{i}.{kind}"),
                t.dims().to_vec(),
                bytemuck::cast_slice(&values).to_vec(),
            ));
        }
    }
    let views = tensors
        .iter()
        .map(|(name, shape, bytes)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes)
                .map(|v| (name.clone(), v))
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TrainError::Invalid(e.to_string()))?;
    let bytes = safetensors::tensor::serialize(views, None)
        .map_err(|e| TrainError::Invalid(e.to_string()))?;
    crate::atomic::write_file(&dir.join("head.safetensors"), &bytes)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_plan_accumulates_when_budget_is_tight_and_refuses_when_it_cannot_fit() {
        // Hand-computed for dim 8, 3 classes: parameters 8*3+3 = 27 -> 27*4*5 = 540
        // fixed bytes; one example 4 * (8 + 3*3) = 68 bytes.
        let roomy = plan_batches(16, 8, &[3], 1 << 20).unwrap();
        assert_eq!(
            roomy,
            BatchPlan {
                micro_batch: 16,
                accumulation_steps: 1
            }
        );
        let tight = plan_batches(16, 8, &[3], 540 + 68 * 5).unwrap();
        assert_eq!(
            tight,
            BatchPlan {
                micro_batch: 5,
                accumulation_steps: 4
            }
        );
        let error = plan_batches(16, 8, &[3], 540 + 67).unwrap_err().to_string();
        assert!(error.contains("memory budget of 607 bytes"), "{error}");
    }
}

//! One head's training state: master weights, optimiser moments, loss scale,
//! plateau and early-stopping bookkeeping, the best head so far. The driver
//! (`run.rs`) feeds it batches; everything here is a pure function of the
//! config, the seed and the batches, so a resumed head continues bit for bit.

use std::collections::{BTreeMap, HashMap};

use candle_core::{D, DType, Device, Tensor, Var};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::TrainError;
use super::config::{ClassWeights, Optimizer, Precision, TrainConfig};
use super::head::Head;
use super::host::{FirstLayer, FirstLayers, HostHead, HostTrainer, Threads, UpdateStep};
use super::schedule::Schedule;

/// Micro-batch size and accumulation steps that fit the memory budget.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct BatchPlan {
    pub micro_batch: usize,
    pub accumulation_steps: usize,
    /// What the plan counted: bytes that do not depend on the micro-batch,
    /// and bytes per micro-batch example.
    pub fixed_bytes: u64,
    pub per_example_bytes: u64,
}

/// Dynamic loss scaling for f16, as PyTorch's GradScaler: start at 2^16,
/// halve and skip the step on inf or NaN gradients, double after this many
/// good steps in a row.
const LOSS_SCALE_START: f64 = 65536.0;
const LOSS_SCALE_GROWTH_INTERVAL: usize = 2000;

/// Everything besides tensors that a resumed run needs (the checkpoint JSON).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainerState {
    /// Epochs finished.
    pub epochs_done: usize,
    /// Batches seen, skipped ones included (drives the schedule).
    pub global_step: usize,
    /// Optimiser updates applied (AdamW bias correction).
    pub updates: i32,
    pub loss_scale: f64,
    pub good_steps: usize,
    pub skipped_steps: usize,
    /// Reduce-on-plateau: current multiplier and epochs without improvement.
    pub lr_factor: f64,
    pub plateau_bad_epochs: usize,
    /// The rate of the last update.
    pub learning_rate: f64,
    pub best_score: Option<f64>,
    pub best_epoch: usize,
    pub since_best: usize,
    pub stopped_early: bool,
    /// Per epoch: `train/*` and `val/*` metrics.
    pub history: Vec<BTreeMap<String, f64>>,
    /// Why the head stopped for good: its gradients or outputs stopped being
    /// finite (beyond what f16 loss scaling recovers from). The run fails.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub diverged: Option<String>,
}

pub struct HeadTrainer {
    pub config: TrainConfig,
    pub head: Head,
    pub plan: BatchPlan,
    pub state: TrainerState,
    parameters: Vec<Var>,
    first_moments: Vec<Tensor>,
    second_moments: Vec<Tensor>,
    best: Option<Vec<Tensor>>,
    /// Loss weight per class (1 for every class without class weighting).
    class_weights: Vec<f32>,
    classes: usize,
    device: Device,
    /// The host copy of weights and moments while an epoch's steps run on
    /// the CPU f32 path (`host.rs`); `None` between epochs, when the `Var`s
    /// and moment tensors above hold the state.
    host: Option<HostTrainer>,
}

/// One gathered batch: standardised f32 rows `[rows, dim]` on the host, and
/// the same rows as a tensor on the device for heads on the candle path.
pub struct Batch<'a> {
    pub values: &'a [f32],
    pub dim: usize,
    pub tensor: Option<&'a Tensor>,
}

/// The gradients of one batch, wherever they live.
enum Gradients<'a> {
    /// In the host trainer's buffers, the first layer's in its rows of a
    /// `FirstLayers` (with the weight they update).
    Host(FirstLayer<'a>),
    Candle(Vec<Tensor>),
}

impl HeadTrainer {
    pub fn new(
        config: TrainConfig,
        input_dim: usize,
        classes: usize,
        train_class_counts: &[usize],
        plan: BatchPlan,
        device: &Device,
    ) -> Result<Self, TrainError> {
        let head = Head::new(&config.head, input_dim, classes, config.seed, device)?;
        let parameters = head.parameters();
        let zeros = |p: &Var| p.zeros_like();
        let class_weights = class_weights(&config.class_weights, train_class_counts)?;
        Ok(HeadTrainer {
            first_moments: parameters.iter().map(zeros).collect::<Result<_, _>>()?,
            second_moments: parameters.iter().map(zeros).collect::<Result<_, _>>()?,
            parameters,
            head,
            plan,
            state: TrainerState {
                epochs_done: 0,
                global_step: 0,
                updates: 0,
                loss_scale: if config.precision == Precision::F16 {
                    LOSS_SCALE_START
                } else {
                    1.0
                },
                good_steps: 0,
                skipped_steps: 0,
                lr_factor: 1.0,
                plateau_bad_epochs: 0,
                learning_rate: config.learning_rate,
                best_score: None,
                best_epoch: 0,
                since_best: 0,
                stopped_early: false,
                history: Vec::new(),
                diverged: None,
            },
            best: None,
            class_weights,
            classes,
            device: device.clone(),
            host: None,
            config,
        })
    }

    /// Whether steps take the host path: f32 on the CPU. Low precision and
    /// GPUs stay on candle, where the dtype and the device do the work.
    pub fn uses_host_path(&self) -> bool {
        self.device.is_cpu() && self.config.precision == Precision::F32
    }

    /// Ends an epoch's steps: the host copy goes back into the `Var`s and
    /// moment tensors, which everything between epochs reads.
    pub fn finish_steps(&mut self) -> Result<(), TrainError> {
        if let Some(host) = self.host.take() {
            host.store(
                &self.head,
                &mut self.first_moments,
                &mut self.second_moments,
            )?;
        }
        Ok(())
    }

    /// The current weights (weight and bias of each layer in order) while
    /// `first`, lent by this head alone, holds its first layer's weight:
    /// the weights a step has just updated.
    pub fn lent_parameters<'a>(&'a self, first: &'a FirstLayers) -> Vec<&'a [f32]> {
        let host = self
            .host
            .as_ref()
            .expect("lend_first_layers loaded the host copy");
        let mut out = Vec::with_capacity(2 * host.head.layers.len());
        for (index, layer) in host.head.layers.iter().enumerate() {
            out.push(if index == 0 {
                first.weight_of(0)
            } else {
                layer.weight.as_slice()
            });
            out.push(layer.bias.as_slice());
        }
        out
    }

    /// Replaces the head's weights with `head`'s (of the same layer
    /// sizes), between epochs: a run whose kept head is an average of its
    /// steps (`--ema`) writes it through the usual files.
    pub fn set_head_weights(&mut self, head: &HostHead) -> Result<(), TrainError> {
        if self.host.is_some() {
            return Err(TrainError::Invalid(
                "head weights replaced while an epoch's steps hold them".into(),
            ));
        }
        for (layer, pair) in head.layers.iter().zip(self.parameters.chunks_exact(2)) {
            let weight =
                Tensor::from_slice(&layer.weight, (layer.outputs, layer.inputs), &self.device)?;
            let bias = Tensor::from_slice(&layer.bias, layer.outputs, &self.device)?;
            pair[0].set(&weight.to_dtype(pair[0].dtype())?)?;
            pair[1].set(&bias.to_dtype(pair[1].dtype())?)?;
        }
        Ok(())
    }

    /// A host copy of the current weights for evaluation, on the host path.
    pub fn evaluation_head(&self) -> Result<Option<HostHead>, TrainError> {
        if self.uses_host_path() {
            Ok(Some(HostHead::from_head(&self.head, &self.config.head)?))
        } else {
            Ok(None)
        }
    }

    /// True while the head still has epochs to run.
    pub fn is_active(&self) -> bool {
        !self.state.stopped_early
            && self.state.diverged.is_none()
            && self.state.epochs_done < self.config.epochs
    }

    /// Marks the head diverged (the first reason is kept): it takes no more
    /// steps and its run fails with `reason`.
    pub fn diverge(&mut self, reason: String) {
        self.state.diverged.get_or_insert(reason);
    }

    /// The error a diverged head's run (`run`) ends with.
    pub fn divergence(&self, run: &str) -> Option<TrainError> {
        self.state
            .diverged
            .as_ref()
            .map(|reason| TrainError::Diverged {
                run: run.to_string(),
                reason: reason.clone(),
            })
    }

    /// One optimiser step over a batch of standardised rows with `labels`
    /// (`steps_per_epoch` batches make an epoch: the schedule's clock).
    /// Micro-batches of `plan.micro_batch` rows accumulate gradients that
    /// equal the batch's. `threads` says who runs the host path's matmuls.
    /// Host-path heads that share batches step together, faster, through
    /// `train_stacked_batch`; this is the same step for one head.
    pub fn train_batch(
        &mut self,
        batch: &Batch,
        labels: &[usize],
        steps_per_epoch: usize,
        dropout_rng: &mut ChaCha8Rng,
        threads: Threads,
    ) -> Result<(), TrainError> {
        if self.uses_host_path() {
            let mut first = lend_first_layers(&mut [&mut *self])?;
            let stepped = train_stacked_batch(
                &mut first,
                &mut [(&mut *self, dropout_rng)],
                batch,
                labels,
                steps_per_epoch,
                threads,
            );
            first.give_back(&mut [self.host_mut()?]);
            return stepped;
        }
        let (weights, targets) = self.batch_targets(labels);
        let grads = self.candle_gradients(batch, labels, &weights, &targets, dropout_rng)?;
        let mut norm_sq = 0f64;
        for g in &grads {
            norm_sq += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
        }
        let total_steps = steps_per_epoch * self.config.epochs;
        self.complete_step(Gradients::Candle(grads), norm_sq, 1.0, total_steps)
    }

    /// Each row's loss weight and the rule for its target row.
    fn batch_targets(&self, labels: &[usize]) -> (Vec<f32>, TargetRule) {
        let weights: Vec<f32> = labels.iter().map(|&l| self.class_weights[l]).collect();
        let total_weight: f32 = weights.iter().sum();
        let total_weight = if total_weight > 0.0 {
            total_weight
        } else {
            1.0
        };
        let targets = TargetRule {
            classes: self.classes,
            smoothing: self.config.label_smoothing as f32,
            total_weight,
        };
        (weights, targets)
    }

    /// The host copy of weights and moments, loaded from the `Var`s at the
    /// first step of an epoch.
    fn host_mut(&mut self) -> Result<&mut HostTrainer, TrainError> {
        if self.host.is_none() {
            self.host = Some(HostTrainer::load(
                &self.head,
                &self.config.head,
                &self.first_moments,
                &self.second_moments,
            )?);
        }
        Ok(self.host.as_mut().expect("loaded above"))
    }

    /// The rest of a step once gradients and their squared norm are known
    /// (`unscale` removes the loss scale from host-path gradients; candle
    /// gradients arrive unscaled): overflow skip and loss-scale update,
    /// clipping, the schedule's rate, the update.
    fn complete_step(
        &mut self,
        mut gradients: Gradients<'_>,
        norm_sq: f64,
        unscale: f64,
        total_steps: usize,
    ) -> Result<(), TrainError> {
        let epoch = self.state.epochs_done;
        if self.state.diverged.is_some() {
            return Ok(());
        }
        self.state.global_step += 1;
        if !norm_sq.is_finite() {
            // f16 overflow that a smaller loss scale can still avoid: skip
            // the update and back off. Anything else is divergence: the
            // weights or the loss themselves are no longer finite.
            if self.config.precision == Precision::F16 && self.state.loss_scale > 1.0 {
                self.state.skipped_steps += 1;
                self.state.good_steps = 0;
                self.state.loss_scale = (self.state.loss_scale / 2.0).max(1.0);
                return Ok(());
            }
            self.diverge(format!(
                "the gradients stopped being finite at epoch {}, step {} (learning rate {}{}); \
                 lower --lr, or bound the steps with --clip-grad-norm",
                epoch + 1,
                self.state.global_step,
                self.config.learning_rate,
                if self.config.precision == Precision::F16 {
                    ", f16 loss scale already at 1"
                } else {
                    ""
                }
            ));
            return Ok(());
        }
        if self.config.precision == Precision::F16 {
            self.state.good_steps += 1;
            if self.state.good_steps >= LOSS_SCALE_GROWTH_INTERVAL {
                self.state.loss_scale *= 2.0;
                self.state.good_steps = 0;
            }
        }
        let mut clip = 1.0;
        if let Some(max_norm) = self.config.gradient_clip {
            let norm = norm_sq.sqrt();
            if norm > max_norm {
                clip = max_norm / norm;
                if let Gradients::Candle(grads) = &mut gradients {
                    *grads = grads
                        .iter()
                        .map(|g| g.affine(clip, 0.0))
                        .collect::<Result<_, _>>()?;
                }
            }
        }
        let lr = self.config.schedule.learning_rate(
            self.config.learning_rate,
            self.state.global_step - 1,
            total_steps,
            epoch,
        ) * self.state.lr_factor;
        self.state.learning_rate = lr;
        match gradients {
            Gradients::Candle(grads) => self.update(&grads, lr),
            Gradients::Host(first) => {
                self.state.updates += 1;
                let step = UpdateStep {
                    optimizer: self.config.optimizer,
                    lr,
                    weight_decay: self.config.weight_decay,
                    updates: self.state.updates,
                    scale: (unscale * clip) as f32,
                };
                let host = self.host.as_mut().expect("the host path loaded it");
                host.update(first, step);
                Ok(())
            }
        }
    }

    /// The candle path's gradients of one batch (loss scale removed).
    fn candle_gradients(
        &self,
        batch: &Batch,
        labels: &[usize],
        weights: &[f32],
        targets: &TargetRule,
        dropout_rng: &mut ChaCha8Rng,
    ) -> Result<Vec<Tensor>, TrainError> {
        let dtype = self.config.precision.dtype();
        let owned;
        let x = match batch.tensor {
            Some(tensor) => tensor,
            None => {
                owned = Tensor::from_slice(batch.values, (labels.len(), batch.dim), &self.device)?;
                &owned
            }
        };
        let mut accumulated: Option<Vec<Tensor>> = None;
        let mut start = 0;
        while start < labels.len() {
            let len = self.plan.micro_batch.min(labels.len() - start);
            let micro_x = x.narrow(0, start, len)?.to_dtype(dtype)?;
            let logits = self.head.forward(&micro_x, dtype, Some(dropout_rng))?;
            let range = start..start + len;
            let targets = Tensor::from_vec(
                targets.values(&labels[range.clone()], &weights[range]),
                (len, self.classes),
                x.device(),
            )?;
            let log_probabilities = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
            let loss = (log_probabilities * targets)?
                .sum_all()?
                .affine(-self.state.loss_scale, 0.0)?;
            accumulated = Some(self.accumulate_gradients(&loss, accumulated)?);
            start += len;
        }
        let mut grads = accumulated.expect("a batch holds at least one example");
        if self.state.loss_scale != 1.0 {
            let unscale = 1.0 / self.state.loss_scale;
            grads = grads
                .iter()
                .map(|g| g.affine(unscale, 0.0))
                .collect::<Result<_, _>>()?;
        }
        Ok(grads)
    }

    fn update(&mut self, grads: &[Tensor], lr: f64) -> Result<(), TrainError> {
        self.state.updates += 1;
        for (i, (p, g)) in self.parameters.iter().zip(grads).enumerate() {
            let w = p.as_tensor();
            let updated = match self.config.optimizer {
                Optimizer::AdamW => {
                    let (beta1, beta2, eps) = (0.9f64, 0.999f64, 1e-8);
                    self.first_moments[i] =
                        ((&self.first_moments[i] * beta1)? + (g * (1.0 - beta1))?)?;
                    self.second_moments[i] =
                        ((&self.second_moments[i] * beta2)? + (g.sqr()? * (1.0 - beta2))?)?;
                    let m_hat = (&self.first_moments[i] / (1.0 - beta1.powi(self.state.updates)))?;
                    let v_hat = (&self.second_moments[i] / (1.0 - beta2.powi(self.state.updates)))?;
                    let decayed = (w * (1.0 - lr * self.config.weight_decay))?;
                    (decayed - (m_hat / (v_hat.sqrt()? + eps)?)?.affine(lr, 0.0)?)?
                }
                Optimizer::Sgd { momentum } => {
                    // Coupled L2 decay, as in torch.optim.SGD.
                    let g = (g + (w * self.config.weight_decay)?)?;
                    self.first_moments[i] = ((&self.first_moments[i] * momentum)? + g)?;
                    (w - (&self.first_moments[i] * lr)?)?
                }
            };
            p.set(&updated)?;
        }
        Ok(())
    }

    /// Records one epoch's metrics: keeps the best head by the monitored
    /// metric, applies reduce-on-plateau and early stopping. Returns true
    /// when this epoch gave a new best head.
    pub fn end_epoch(&mut self, mut metrics: BTreeMap<String, f64>) -> Result<bool, TrainError> {
        metrics.insert(
            "train/skipped_steps".into(),
            self.state.skipped_steps as f64,
        );
        metrics.insert("train/learning_rate".into(), self.state.learning_rate);
        if self.config.precision == Precision::F16 {
            metrics.insert("train/loss_scale".into(), self.state.loss_scale);
        }
        let score = monitored_score(&self.config.monitor, &metrics)?;
        let epoch = self.state.epochs_done;
        self.state.history.push(metrics);
        self.state.epochs_done += 1;
        let improved = self.state.best_score.is_none_or(|best| score > best);
        if improved {
            self.state.best_score = Some(score);
            self.state.best_epoch = epoch;
            self.state.since_best = 0;
            self.state.plateau_bad_epochs = 0;
            self.best = Some(
                self.parameters
                    .iter()
                    .map(|p| p.as_tensor().copy())
                    .collect::<Result<_, _>>()?,
            );
        } else {
            self.state.since_best += 1;
            if let Schedule::ReduceOnPlateau { patience, factor } = self.config.schedule {
                self.state.plateau_bad_epochs += 1;
                if self.state.plateau_bad_epochs > patience {
                    self.state.lr_factor *= factor;
                    self.state.plateau_bad_epochs = 0;
                }
            }
            if let Some(stop) = &self.config.early_stopping
                && self.state.since_best >= stop.patience
            {
                self.state.stopped_early = true;
            }
        }
        Ok(improved)
    }

    /// Puts the best head's weights in place (at the end of a run).
    pub fn restore_best(&mut self) -> Result<(), TrainError> {
        if let Some(best) = &self.best {
            for (p, t) in self.parameters.iter().zip(best) {
                p.set(t)?;
            }
        }
        Ok(())
    }

    /// Named tensors of the current or best head.
    pub fn head_tensors(&self, best: bool) -> Vec<(String, Tensor)> {
        let source: Vec<Tensor> = match (&self.best, best) {
            (Some(b), true) => b.clone(),
            _ => self
                .parameters
                .iter()
                .map(|p| p.as_tensor().clone())
                .collect(),
        };
        source
            .into_iter()
            .enumerate()
            .map(|(i, t)| {
                let kind = if i % 2 == 0 { "weight" } else { "bias" };
                (format!("layers.{}.{kind}", i / 2), t)
            })
            .collect()
    }

    /// Every tensor a resumed run needs: weights, moments, best head.
    pub fn checkpoint_tensors(&self) -> Vec<(String, Tensor)> {
        let mut tensors = self.head_tensors(false);
        for (i, t) in self.first_moments.iter().enumerate() {
            tensors.push((format!("optimizer.first.{i}"), t.clone()));
        }
        for (i, t) in self.second_moments.iter().enumerate() {
            tensors.push((format!("optimizer.second.{i}"), t.clone()));
        }
        if self.best.is_some() {
            for (name, t) in self.head_tensors(true) {
                tensors.push((format!("best.{name}"), t));
            }
        }
        tensors
    }

    /// Loads what `checkpoint_tensors` saved, checking names and shapes.
    pub fn restore_checkpoint(
        &mut self,
        state: TrainerState,
        tensors: &HashMap<String, Tensor>,
    ) -> Result<(), TrainError> {
        let take = |name: &str, like: &Tensor| -> Result<Tensor, TrainError> {
            let t = tensors.get(name).ok_or_else(|| {
                TrainError::Checkpoint(format!("checkpoint has no tensor {name}"))
            })?;
            if t.dims() != like.dims() {
                return Err(TrainError::Checkpoint(format!(
                    "tensor {name} has shape {:?}, the head needs {:?}",
                    t.dims(),
                    like.dims()
                )));
            }
            Ok(t.to_dtype(DType::F32)?)
        };
        let names: Vec<String> = self
            .head_tensors(false)
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        for (p, name) in self.parameters.iter().zip(&names) {
            p.set(&take(name, p.as_tensor())?)?;
        }
        for i in 0..self.parameters.len() {
            self.first_moments[i] = take(
                &format!("optimizer.first.{i}"),
                self.parameters[i].as_tensor(),
            )?;
            self.second_moments[i] = take(
                &format!("optimizer.second.{i}"),
                self.parameters[i].as_tensor(),
            )?;
        }
        self.best = if state.best_score.is_some() {
            Some(
                names
                    .iter()
                    .zip(&self.parameters)
                    .map(|(name, p)| take(&format!("best.{name}"), p.as_tensor()))
                    .collect::<Result<_, _>>()?,
            )
        } else {
            None
        };
        self.state = state;
        Ok(())
    }
}

/// Class-weighted, label-smoothed one-hot targets, divided by the whole
/// batch's weight so that micro-batch losses add up to the batch mean.
struct TargetRule {
    classes: usize,
    smoothing: f32,
    total_weight: f32,
}

impl TargetRule {
    fn values(&self, labels: &[usize], weights: &[f32]) -> Vec<f32> {
        let off = self.smoothing / self.classes as f32;
        let mut targets = vec![0f32; labels.len() * self.classes];
        for (row, (&label, &weight)) in targets
            .chunks_exact_mut(self.classes)
            .zip(labels.iter().zip(weights))
        {
            let scale = weight / self.total_weight;
            row.fill(off * scale);
            row[label] += (1.0 - self.smoothing) * scale;
        }
        targets
    }
}

impl HeadTrainer {
    /// The head's trainable parameters, in `head_tensors` order, for callers
    /// that compute their own loss (segmentation) and call `apply_gradients`.
    pub fn parameters(&self) -> &[Var] {
        &self.parameters
    }

    /// The gradient of `loss` for each parameter (zeros where the loss does
    /// not depend on one), added to `accumulated` (micro-batches).
    pub fn accumulate_gradients(
        &self,
        loss: &Tensor,
        accumulated: Option<Vec<Tensor>>,
    ) -> Result<Vec<Tensor>, TrainError> {
        let grads = loss.backward()?;
        let these = self
            .parameters
            .iter()
            .map(|p| grads.get(p).cloned().map_or_else(|| p.zeros_like(), Ok))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(match accumulated {
            None => these,
            Some(sum) => sum
                .iter()
                .zip(&these)
                .map(|(a, b)| a + b)
                .collect::<Result<_, _>>()?,
        })
    }

    /// One optimiser step from gradients of a caller's loss (multiplied by
    /// `state.loss_scale`), one per parameter: the same unscaling, overflow
    /// skip, clipping, schedule and update as `train_batch`.
    pub fn apply_gradients(
        &mut self,
        mut grads: Vec<Tensor>,
        total_steps: usize,
    ) -> Result<(), TrainError> {
        if self.state.loss_scale != 1.0 {
            let unscale = 1.0 / self.state.loss_scale;
            grads = grads
                .iter()
                .map(|g| g.affine(unscale, 0.0))
                .collect::<Result<_, _>>()?;
        }
        let mut norm_sq = 0f64;
        for g in &grads {
            norm_sq += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
        }
        self.complete_step(Gradients::Candle(grads), norm_sq, 1.0, total_steps)
    }
}

/// Loads the host copies of host-path `heads` (f32 on the CPU, all over the
/// same features) and stacks their first layers for an epoch's steps.
/// `return_first_layers` undoes it.
pub fn lend_first_layers(heads: &mut [&mut HeadTrainer]) -> Result<FirstLayers, TrainError> {
    let mut hosts = heads
        .iter_mut()
        .map(|t| t.host_mut())
        .collect::<Result<Vec<_>, _>>()?;
    Ok(FirstLayers::lend(&mut hosts))
}

/// Ends the epoch's steps of the heads `first` was lent by: first layers
/// back into their host copies, host copies into the `Var`s.
pub fn return_first_layers(
    first: FirstLayers,
    heads: &mut [&mut HeadTrainer],
) -> Result<(), TrainError> {
    let mut hosts = heads
        .iter_mut()
        .map(|t| t.host_mut())
        .collect::<Result<Vec<_>, _>>()?;
    first.give_back(&mut hosts);
    for head in heads {
        head.finish_steps()?;
    }
    Ok(())
}

/// One optimiser step for each host-path head of `heads` over the same
/// batch: per micro-batch, one matmul computes every head's first layer
/// and one every head's first weight gradient (`first`, from
/// `lend_first_layers` over these heads in this order), then each head's
/// other layers and update, head after head; `threads` runs all matmuls.
/// Every head's step equals its `train_batch` alone. The heads share
/// `plan.micro_batch`.
pub fn train_stacked_batch(
    first: &mut FirstLayers,
    heads: &mut [(&mut HeadTrainer, &mut ChaCha8Rng)],
    batch: &Batch,
    labels: &[usize],
    steps_per_epoch: usize,
    threads: Threads,
) -> Result<(), TrainError> {
    let Some(micro_batch) = heads.first().map(|(t, _)| t.plan.micro_batch) else {
        return Ok(());
    };
    if heads
        .iter()
        .any(|(t, _)| t.plan.micro_batch != micro_batch || !t.uses_host_path())
    {
        return Err(TrainError::Invalid(
            "heads stacked in one step must all be f32 CPU heads with one micro-batch size".into(),
        ));
    }
    // Targets for the whole batch; each row's depends only on its label.
    let targets: Vec<(Vec<f32>, f32)> = heads
        .iter()
        .map(|(t, _)| {
            let (weights, rule) = t.batch_targets(labels);
            (rule.values(labels, &weights), t.state.loss_scale as f32)
        })
        .collect();
    first.zero_gradients();
    for (t, _) in heads.iter_mut() {
        t.host_mut()?.zero_gradients();
    }
    let dim = batch.dim;
    let mut start = 0;
    while start < labels.len() {
        let rows = micro_batch.min(labels.len() - start);
        let x = &batch.values[start * dim..(start + rows) * dim];
        first.forward(x, rows, threads);
        let deltas = heads
            .iter_mut()
            .zip(&targets)
            .enumerate()
            .map(|(h, ((trainer, rng), (targets, loss_scale)))| {
                let classes = trainer.classes;
                let host = trainer.host.as_mut().expect("lent heads hold host copies");
                host.accumulate_after_first(
                    first.block(h),
                    &targets[start * classes..(start + rows) * classes],
                    *loss_scale,
                    rng,
                    threads,
                )
            })
            .collect::<Vec<_>>();
        first.accumulate(&deltas, x, rows, threads);
        start += rows;
    }
    let total_steps = |t: &HeadTrainer| steps_per_epoch * t.config.epochs;
    heads
        .iter_mut()
        .zip(first.split_mut())
        .try_for_each(|((trainer, _), part)| {
            let unscale = 1.0 / trainer.state.loss_scale;
            let host = trainer.host.as_ref().expect("lent heads hold host copies");
            let norm_sq = host.gradient_norm_sq(part.gradient, unscale as f32);
            let steps = total_steps(trainer);
            trainer.complete_step(Gradients::Host(part), norm_sq, unscale, steps)
        })
}

/// A host-path head's optimiser step whose inputs come from layers trained
/// below it (`finetune`'s encoder blocks): micro-batch by micro-batch the
/// head's gradients accumulate as in `train_stacked_batch`, and each
/// micro-batch's d loss / d input goes back to the caller, who continues
/// it into the lower layers; `finish` then updates the head as any step.
pub struct InputStep {
    /// The whole batch's weighted, smoothed targets.
    targets: Vec<f32>,
    loss_scale: f32,
    /// Rows of the batch consumed so far.
    next: usize,
}

impl InputStep {
    /// Mixes the batch's targets with their partners' (positions in the
    /// batch): row i becomes `weight` of its own targets and the rest of
    /// row `partners[i]`'s (mixup and CutMix on the maps, `mix`). Call
    /// before the first micro-batch.
    pub fn mix_targets(&mut self, partners: &[usize], weight: f32, classes: usize) {
        assert_eq!(self.next, 0, "targets mixed before the first micro-batch");
        assert_eq!(
            partners.len() * classes,
            self.targets.len(),
            "one partner per row"
        );
        let own = self.targets.clone();
        for (values, (row, &partner)) in self
            .targets
            .chunks_exact_mut(classes)
            .zip(partners.iter().enumerate())
        {
            let mine = &own[row * classes..(row + 1) * classes];
            let theirs = &own[partner * classes..(partner + 1) * classes];
            for ((value, &a), &b) in values.iter_mut().zip(mine).zip(theirs) {
                *value = weight * a + (1.0 - weight) * b;
            }
        }
    }
}

impl HeadTrainer {
    /// Starts a step over a batch with `labels` (its head lent to `first`
    /// by `lend_first_layers`).
    pub fn begin_input_step(
        &mut self,
        first: &mut FirstLayers,
        labels: &[usize],
    ) -> Result<InputStep, TrainError> {
        if !self.uses_host_path() {
            return Err(TrainError::Invalid(
                "layers below a head train with f32 heads on the CPU only".into(),
            ));
        }
        let (weights, rule) = self.batch_targets(labels);
        first.zero_gradients();
        self.host_mut()?.zero_gradients();
        Ok(InputStep {
            targets: rule.values(labels, &weights),
            loss_scale: self.state.loss_scale as f32,
            next: 0,
        })
    }

    /// The next `rows` rows of the step's batch (standardised inputs `x`,
    /// `[rows, dim]`): accumulates the head's gradients and returns
    /// d loss / d x (`[rows, dim]`, through the weights before the step)
    /// and the rows' share of the batch loss (without dropout).
    pub fn input_micro_batch(
        &mut self,
        step: &mut InputStep,
        first: &mut FirstLayers,
        x: &[f32],
        rows: usize,
        dropout_rng: &mut ChaCha8Rng,
        threads: Threads,
    ) -> (Vec<f32>, f64) {
        let classes = self.classes;
        let targets = &step.targets[step.next * classes..(step.next + rows) * classes];
        step.next += rows;
        first.forward(x, rows, threads);
        let product = first.block(0);
        let host = self
            .host
            .as_mut()
            .expect("begin_input_step loaded the host copy");
        let mut probabilities = host.head.logits_after_first(product.clone(), threads);
        super::host::softmax_rows(&mut probabilities, classes);
        let loss: f64 = probabilities
            .iter()
            .zip(targets)
            .map(|(&p, &t)| -f64::from(t) * f64::from(p.max(1e-12)).ln())
            .sum();
        let delta =
            host.accumulate_after_first(product, targets, step.loss_scale, dropout_rng, threads);
        first.accumulate(std::slice::from_ref(&delta), x, rows, threads);
        let dim = x.len() / rows;
        let outputs = delta.len() / rows;
        let mut input_gradient = vec![0f32; rows * dim];
        super::host::Product {
            a: super::host::row_major(&delta, rows, outputs),
            b: super::host::row_major(first.split_mut()[0].weight, outputs, dim),
        }
        .into(
            &mut input_gradient,
            super::host::Accumulate::Replace,
            threads,
        );
        (input_gradient, loss)
    }

    /// Ends the step: clipping, schedule and update of the head, as
    /// `train_batch` ends its steps (`steps_per_epoch`: the schedule's clock).
    pub fn finish_input_step(
        &mut self,
        first: &mut FirstLayers,
        steps_per_epoch: usize,
    ) -> Result<(), TrainError> {
        let part = first.split_mut().remove(0);
        let unscale = 1.0 / self.state.loss_scale;
        let host = self
            .host
            .as_ref()
            .expect("begin_input_step loaded the host copy");
        let norm_sq = host.gradient_norm_sq(part.gradient, unscale as f32);
        let total_steps = steps_per_epoch * self.config.epochs;
        self.complete_step(Gradients::Host(part), norm_sq, unscale, total_steps)
    }
}

/// The monitored score, higher is better (`*/loss` is negated).
pub fn monitored_score(name: &str, metrics: &BTreeMap<String, f64>) -> Result<f64, TrainError> {
    let value = *metrics.get(name).ok_or_else(|| {
        let known: Vec<&str> = metrics
            .keys()
            .filter(|k| k.starts_with("val/"))
            .map(String::as_str)
            .collect();
        TrainError::Invalid(format!(
            "monitored metric {name} is not computed; known: {}",
            known.join(", ")
        ))
    })?;
    Ok(if name.ends_with("/loss") {
        -value
    } else {
        value
    })
}

/// Loss weight per class: 1, scikit-learn's "balanced" n / (k * n_c) over
/// the training split, or the given weights.
pub fn class_weights(
    setting: &ClassWeights,
    train_class_counts: &[usize],
) -> Result<Vec<f32>, TrainError> {
    let classes = train_class_counts.len();
    Ok(match setting {
        ClassWeights::None => vec![1.0; classes],
        ClassWeights::Balanced => {
            let total: usize = train_class_counts.iter().sum();
            train_class_counts
                .iter()
                .map(|&n| {
                    if n == 0 {
                        0.0
                    } else {
                        total as f32 / (classes as f32 * n as f32)
                    }
                })
                .collect()
        }
        ClassWeights::Given { weights } => {
            if weights.len() != classes {
                return Err(TrainError::Invalid(format!(
                    "{} class weights given for {classes} classes",
                    weights.len()
                )));
            }
            weights.iter().map(|&w| w as f32).collect()
        }
    })
}

/// Plans micro-batches against the memory budget. Fixed costs: the process
/// itself (`runtime_bytes`: binary, manifest, row index, resident mapped
/// pages), each head's parameters times 9 (weights, gradients, accumulated
/// gradients, two moments, the best copy, checkpoint serialisation), and the
/// gathered batch (f32 plus a low-precision copy). Each micro-batch example
/// costs its activations and their gradients in f32 and low precision.
pub fn plan_batches(
    batch_size: usize,
    feature_dim: usize,
    layer_sizes: &[usize],
    budget_bytes: u64,
    runtime_bytes: u64,
) -> Result<BatchPlan, TrainError> {
    let mut parameters = 0u64;
    let mut previous = feature_dim as u64;
    for &size in layer_sizes {
        parameters += previous * size as u64 + size as u64;
        previous = size as u64;
    }
    let batch = batch_size as u64 * feature_dim as u64 * (4 + 2);
    let fixed = runtime_bytes + parameters * 4 * 9 + batch;
    let activations: u64 = layer_sizes.iter().map(|&s| s as u64).sum();
    let per_example = (4 + 2) * 3 * activations.max(1);
    let fits = budget_bytes.saturating_sub(fixed) / per_example;
    if fixed >= budget_bytes || fits == 0 {
        return Err(TrainError::Invalid(format!(
            "memory budget of {budget_bytes} bytes cannot hold the run: {runtime_bytes} bytes \
             of runtime and mapped features, a head of {parameters} parameters \
             ({} bytes with gradients, optimiser state and the best copy), a batch of \
             {batch_size} x {feature_dim} features ({batch} bytes), plus one example's \
             activations ({per_example} bytes); raise --memory-budget or lower --batch-size",
            parameters * 4 * 9
        )));
    }
    let micro_batch = batch_size.min(fits as usize).max(1);
    Ok(BatchPlan {
        micro_batch,
        accumulation_steps: batch_size.div_ceil(micro_batch),
        fixed_bytes: fixed,
        per_example_bytes: per_example,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_plan_accumulates_when_budget_is_tight_and_refuses_when_it_cannot_fit() {
        // Hand-computed for dim 8, 3 classes, batch 16, runtime 1000 bytes:
        // parameters 8*3+3 = 27 -> 27*4*9 = 972; batch 16*8*6 = 768;
        // fixed 1000+972+768 = 2740; one example 6*3*3 = 54 bytes.
        let roomy = plan_batches(16, 8, &[3], 1 << 20, 1000).unwrap();
        assert_eq!(
            roomy,
            BatchPlan {
                micro_batch: 16,
                accumulation_steps: 1,
                fixed_bytes: 2740,
                per_example_bytes: 54,
            }
        );
        let tight = plan_batches(16, 8, &[3], 2740 + 54 * 5, 1000).unwrap();
        assert_eq!((tight.micro_batch, tight.accumulation_steps), (5, 4));
        let error = plan_batches(16, 8, &[3], 2740 + 53, 1000)
            .unwrap_err()
            .to_string();
        assert!(error.contains("memory budget of 2793 bytes"), "{error}");
    }

    #[test]
    fn balanced_class_weights_follow_scikit_learn() {
        // scikit-learn compute_class_weight("balanced") on counts [6, 2, 0 -> absent]:
        // 8 / (3 * 6) = 0.444..., 8 / (3 * 2) = 1.333...
        let w = class_weights(&ClassWeights::Balanced, &[6, 2, 0]).unwrap();
        assert!((w[0] - 8.0 / 18.0).abs() < 1e-6);
        assert!((w[1] - 8.0 / 6.0).abs() < 1e-6);
        assert_eq!(w[2], 0.0);
        let error = class_weights(&ClassWeights::Given { weights: vec![1.0] }, &[1, 1])
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("1 class weights given for 2 classes"),
            "{error}"
        );
    }
}

//! The f32 CPU training step without candle's autograd graph: forward,
//! backward and the optimiser update of a linear or MLP head on flat
//! row-major buffers, with the kernels crate's matmul.
//!
//! Why: on a 1,280 x 10 head candle spends about 1.2 ms per step dispatching
//! some forty small ops (and re-reading the CPU count for every matmul),
//! several times the arithmetic. Here a step is three matmuls per layer and
//! a few loops over contiguous slices. The maths is the candle path's
//! (`trainer.rs`): same loss, same gradients, same AdamW and SGD updates,
//! same dropout draws; `tests::host_step_matches_candle` checks one against
//! the other.
//!
//! The first layers of all heads that train on the same batches are
//! stacked into one matrix (`FirstLayers`): one wide matmul computes every
//! head's first layer and one tall matmul every head's first weight
//! gradient, instead of one narrow matmul per head (a 10-class linear head
//! is a 1,280 x 10 matrix, where gemm runs far below its peak). The matmul
//! computes each output element in the same order whatever the stack's
//! width, so a head's numbers do not depend on its neighbours;
//! `tests::stacked_heads_match_heads_alone` checks it bit for bit.
//!
//! The trainer loads a `HostTrainer` from its candle `Var`s at the first
//! step of an epoch and stores it back at the end of the epoch, so
//! everything outside the training loop (evaluation snapshots, checkpoints,
//! resume) keeps seeing the `Var`s.

use candle_core::{Tensor, Var};
use lazarus_kernels::bf16::matmul_bf16;
pub(super) use lazarus_kernels::matmul::Accumulate;
use lazarus_kernels::matmul::{Matrix, Parallelism, matmul};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use super::TrainError;
use super::config::{Activation, BlocksPrecision, HeadConfig, Optimizer};
use super::head::Head;

/// Matmuls with fewer multiply-adds than this run on the calling thread:
/// below it, waking the pool costs more than it saves.
const PARALLEL_MIN_MULTIPLY_ADDS: usize = 1 << 20;

/// Who runs a head's matmuls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Threads {
    /// The calling thread only (heads already run in parallel).
    Caller,
    /// The rayon pool, for matmuls large enough to gain from it.
    Pool,
}

impl Threads {
    fn parallelism(self, multiply_adds: usize) -> Parallelism {
        match self {
            Threads::Pool if multiply_adds >= PARALLEL_MIN_MULTIPLY_ADDS => Parallelism::Pool,
            _ => Parallelism::Sequential,
        }
    }
}

/// One AdamW update of a parameter slice, shared by the heads' step and the
/// fine-tuned blocks' (`blocks::BlocksOptimizer`) so both follow the candle
/// path's maths (`trainer.rs`); its loop is in the optimised kernels crate.
pub(crate) use lazarus_kernels::training::AdamWStep;

/// `out[rows, cols] (+)= a[rows, inner] x b[inner, cols]`, all row-major,
/// either operand possibly given as its transpose (`row_major(..).transpose()`).
pub(super) struct Product<'a> {
    pub(super) a: Matrix<'a>,
    pub(super) b: Matrix<'a>,
}

impl Product<'_> {
    pub(super) fn into(self, out: &mut [f32], accumulate: Accumulate, threads: Threads) {
        self.into_at(out, accumulate, threads, BlocksPrecision::F32)
    }

    /// `into` with operands rounded to bf16 (f32 sums) under
    /// `BlocksPrecision::Bf16`.
    pub(super) fn into_at(
        self,
        out: &mut [f32],
        accumulate: Accumulate,
        threads: Threads,
        precision: BlocksPrecision,
    ) {
        let multiply_adds = self.a.rows * self.a.cols * self.b.cols;
        let product = match precision {
            BlocksPrecision::F32 => matmul,
            BlocksPrecision::Bf16 => matmul_bf16,
        };
        product(
            out,
            accumulate,
            self.a,
            self.b,
            threads.parallelism(multiply_adds),
        );
    }
}

pub(super) fn row_major(values: &[f32], rows: usize, cols: usize) -> Matrix<'_> {
    Matrix::row_major(values, rows, cols)
}

/// One dense layer: weight `[outputs, inputs]` row-major, bias `[outputs]`.
#[derive(Debug, Clone)]
pub struct HostLayer {
    pub weight: Vec<f32>,
    pub bias: Vec<f32>,
    pub inputs: usize,
    pub outputs: usize,
}

/// The hidden layers' nonlinearity and dropout (MLP heads).
#[derive(Debug, Clone, Copy)]
struct Hidden {
    activation: Activation,
    dropout: f64,
}

/// A head's weights on the host.
#[derive(Debug, Clone)]
pub struct HostHead {
    pub layers: Vec<HostLayer>,
    hidden: Option<Hidden>,
}

impl HostHead {
    /// A copy of `head`'s f32 master weights.
    pub fn from_head(head: &Head, config: &HeadConfig) -> Result<Self, TrainError> {
        let mut layers = Vec::with_capacity(head.layers.len());
        for (weight, bias) in &head.layers {
            let (outputs, inputs) = weight.as_tensor().dims2()?;
            layers.push(HostLayer {
                weight: weight.as_tensor().flatten_all()?.to_vec1::<f32>()?,
                bias: bias.as_tensor().to_vec1::<f32>()?,
                inputs,
                outputs,
            });
        }
        let hidden = match config {
            HeadConfig::Linear => None,
            HeadConfig::Mlp {
                activation,
                dropout,
                ..
            } => Some(Hidden {
                activation: *activation,
                dropout: *dropout,
            }),
        };
        Ok(HostHead { layers, hidden })
    }

    /// Puts these weights into `head`'s `Var`s.
    pub fn store(&self, head: &Head) -> Result<(), TrainError> {
        for (layer, (weight, bias)) in self.layers.iter().zip(&head.layers) {
            set(weight, &layer.weight)?;
            set(bias, &layer.bias)?;
        }
        Ok(())
    }

    /// Logits `[rows, classes]` of standardised rows, without dropout
    /// (evaluation). Needs the first layer's weight in place (not lent to a
    /// `FirstLayers`).
    pub fn logits(&self, x: &[f32], rows: usize, threads: Threads) -> Vec<f32> {
        let first = &self.layers[0];
        let mut output = vec![0f32; rows * first.outputs];
        Product {
            a: row_major(x, rows, first.inputs),
            b: row_major(&first.weight, first.outputs, first.inputs).transpose(),
        }
        .into(&mut output, Accumulate::Replace, threads);
        self.logits_after_first(output, threads)
    }

    /// Logits from the first layer's product `x W^T` (`[rows, outputs]`,
    /// bias not yet added), without dropout.
    pub fn logits_after_first(&self, mut output: Vec<f32>, threads: Threads) -> Vec<f32> {
        add_bias(&mut output, &self.layers[0].bias);
        let rows = output.len() / self.layers[0].outputs;
        for layer in &self.layers[1..] {
            let hidden = self.hidden.expect("a head with hidden layers is an MLP");
            for v in &mut output {
                *v = activate(hidden.activation, *v);
            }
            output = affine(layer, &output, rows, threads);
        }
        output
    }

    fn parameter_sizes(&self) -> Vec<usize> {
        self.layers
            .iter()
            .flat_map(|l| [l.weight.len(), l.bias.len()])
            .collect()
    }
}

fn set(var: &Var, values: &[f32]) -> Result<(), TrainError> {
    let tensor = var.as_tensor();
    var.set(&Tensor::from_slice(
        values,
        tensor.shape(),
        tensor.device(),
    )?)?;
    Ok(())
}

/// `input[rows, inputs] x weight^T + bias`.
fn affine(layer: &HostLayer, input: &[f32], rows: usize, threads: Threads) -> Vec<f32> {
    let mut output = vec![0f32; rows * layer.outputs];
    Product {
        a: row_major(input, rows, layer.inputs),
        b: row_major(&layer.weight, layer.outputs, layer.inputs).transpose(),
    }
    .into(&mut output, Accumulate::Replace, threads);
    add_bias(&mut output, &layer.bias);
    output
}

fn add_bias(output: &mut [f32], bias: &[f32]) {
    for row in output.chunks_exact_mut(bias.len()) {
        for (v, b) in row.iter_mut().zip(bias) {
            *v += b;
        }
    }
}

fn activate(activation: Activation, x: f32) -> f32 {
    match activation {
        Activation::Relu => x.max(0.0),
        Activation::Gelu => {
            0.5 * x * (1.0 + candle_core::cpu::erf::erf_f32(x * std::f32::consts::FRAC_1_SQRT_2))
        }
    }
}

/// d activation / dx, as candle's backward computes it (ReLU: 1 at 0).
fn activation_slope(activation: Activation, x: f32) -> f32 {
    match activation {
        Activation::Relu => {
            if x >= 0.0 {
                1.0
            } else {
                0.0
            }
        }
        Activation::Gelu => {
            let cdf =
                0.5 * (1.0 + candle_core::cpu::erf::erf_f32(x * std::f32::consts::FRAC_1_SQRT_2));
            let density = (-0.5 * x * x).exp() / (2.0 * std::f32::consts::PI).sqrt();
            cdf + x * density
        }
    }
}

/// Row-wise softmax and the fast `exp` it uses: in the optimised kernels
/// crate (one call per class per row per head in a sweep).
pub use lazarus_kernels::training::{exp, softmax_rows};

/// A head, its optimiser moments and its gradient buffers on the host.
pub struct HostTrainer {
    pub head: HostHead,
    /// Per parameter (weight, bias of each layer in order): AdamW's first
    /// moment or SGD's momentum buffer, and AdamW's second moment.
    first_moments: Vec<Vec<f32>>,
    second_moments: Vec<Vec<f32>>,
    gradients: Vec<Vec<f32>>,
}

impl HostTrainer {
    pub fn load(
        head: &Head,
        config: &HeadConfig,
        first_moments: &[Tensor],
        second_moments: &[Tensor],
    ) -> Result<Self, TrainError> {
        let head = HostHead::from_head(head, config)?;
        let flat = |tensors: &[Tensor]| -> Result<Vec<Vec<f32>>, TrainError> {
            tensors
                .iter()
                .map(|t| Ok(t.flatten_all()?.to_vec1::<f32>()?))
                .collect()
        };
        let gradients = head
            .parameter_sizes()
            .into_iter()
            .map(|n| vec![0f32; n])
            .collect();
        Ok(HostTrainer {
            first_moments: flat(first_moments)?,
            second_moments: flat(second_moments)?,
            head,
            gradients,
        })
    }

    /// Writes weights into `head` and the moments into `first`/`second`
    /// (tensors shaped like the parameters).
    pub fn store(
        &self,
        head: &Head,
        first_moments: &mut [Tensor],
        second_moments: &mut [Tensor],
    ) -> Result<(), TrainError> {
        self.head.store(head)?;
        for (i, p) in head.parameters().iter().enumerate() {
            let like = p.as_tensor();
            first_moments[i] =
                Tensor::from_slice(&self.first_moments[i], like.shape(), like.device())?;
            second_moments[i] =
                Tensor::from_slice(&self.second_moments[i], like.shape(), like.device())?;
        }
        Ok(())
    }

    /// Zeroes the gradient buffers this trainer holds (the first layer's
    /// weight gradient lives in `FirstLayers` while lent).
    pub fn zero_gradients(&mut self) {
        for g in &mut self.gradients {
            g.fill(0.0);
        }
    }

    /// Adds the gradient of `loss_scale * -sum(targets * log_softmax(head(x)))`
    /// over one micro-batch to the gradient buffers, given the first layer's
    /// product `first = x W^T` (`[rows, outputs]`, without bias, from
    /// `FirstLayers::forward`). Returns d loss / d first-layer output, which
    /// `FirstLayers::accumulate` turns into the first weight's gradient.
    /// `targets` are the weighted, smoothed one-hot rows of `trainer.rs`.
    pub fn accumulate_after_first(
        &mut self,
        first: Vec<f32>,
        targets: &[f32],
        loss_scale: f32,
        dropout_rng: &mut ChaCha8Rng,
        threads: Threads,
    ) -> Vec<f32> {
        let layer_count = self.head.layers.len();
        let rows = first.len() / self.head.layers[0].outputs;
        // Hidden activations (inputs of layers 1..), their pre-activations and dropout masks.
        let mut pre_activations: Vec<Vec<f32>> = Vec::with_capacity(layer_count - 1);
        let mut inputs: Vec<Vec<f32>> = Vec::with_capacity(layer_count - 1);
        let mut masks: Vec<Option<Vec<f32>>> = Vec::with_capacity(layer_count - 1);
        let mut output = first;
        add_bias(&mut output, &self.head.layers[0].bias);
        for index in 0..layer_count {
            if index > 0 {
                output = affine(&self.head.layers[index], &inputs[index - 1], rows, threads);
            }
            if index + 1 == layer_count {
                break;
            }
            let hidden = self
                .head
                .hidden
                .expect("a head with hidden layers is an MLP");
            let mut activated: Vec<f32> = output
                .iter()
                .map(|&v| activate(hidden.activation, v))
                .collect();
            let mask = (hidden.dropout > 0.0).then(|| {
                // The candle path's draws: one uniform f64 per element, row-major.
                let keep = 1.0 - hidden.dropout;
                let kept = (1.0 / keep) as f32;
                let mask: Vec<f32> = (0..activated.len())
                    .map(|_| {
                        if dropout_rng.random::<f64>() < keep {
                            kept
                        } else {
                            0.0
                        }
                    })
                    .collect();
                for (v, m) in activated.iter_mut().zip(&mask) {
                    *v *= m;
                }
                mask
            });
            pre_activations.push(std::mem::take(&mut output));
            inputs.push(activated);
            masks.push(mask);
        }

        // d loss / d logits = scale * (softmax * sum(targets) - targets), per row.
        let classes = self.head.layers[layer_count - 1].outputs;
        let mut delta = output;
        softmax_rows(&mut delta, classes);
        for (row, target_row) in delta
            .chunks_exact_mut(classes)
            .zip(targets.chunks_exact(classes))
        {
            let total: f32 = target_row.iter().sum();
            for (d, t) in row.iter_mut().zip(target_row) {
                *d = loss_scale * (*d * total - t);
            }
        }

        for index in (0..layer_count).rev() {
            let layer = &self.head.layers[index];
            let (weight_gradient, rest) = self.gradients[2 * index..].split_at_mut(1);
            let bias_gradient = &mut rest[0];
            lazarus_kernels::training::add_column_sums(bias_gradient, &delta);
            if index == 0 {
                break;
            }
            // dW[out, in] += delta^T[out, rows] x input[rows, in]
            let input = &inputs[index - 1];
            Product {
                a: row_major(&delta, rows, layer.outputs).transpose(),
                b: row_major(input, rows, layer.inputs),
            }
            .into(&mut weight_gradient[0], Accumulate::Add, threads);
            // d input[rows, in] = delta[rows, out] x W[out, in], then back
            // through dropout and the activation of the layer below.
            let mut below = vec![0f32; rows * layer.inputs];
            Product {
                a: row_major(&delta, rows, layer.outputs),
                b: row_major(&layer.weight, layer.outputs, layer.inputs),
            }
            .into(&mut below, Accumulate::Replace, threads);
            let hidden = self
                .head
                .hidden
                .expect("a head with hidden layers is an MLP");
            if let Some(mask) = &masks[index - 1] {
                for (g, m) in below.iter_mut().zip(mask) {
                    *g *= m;
                }
            }
            for (g, &z) in below.iter_mut().zip(&pre_activations[index - 1]) {
                *g *= activation_slope(hidden.activation, z);
            }
            delta = below;
        }
        delta
    }

    /// Squared L2 norm of the accumulated gradients, times `scale^2`; the
    /// first layer's weight gradient is `first_gradient` (its rows in a
    /// `FirstLayers`).
    pub fn gradient_norm_sq(&self, first_gradient: &[f32], scale: f32) -> f64 {
        let mut sum = 0f64;
        for (i, g) in self.gradients.iter().enumerate() {
            let g = if i == 0 { first_gradient } else { g };
            sum += lazarus_kernels::training::scaled_norm_sq_f32(g, scale) as f64;
        }
        sum
    }

    /// One optimiser update with the accumulated gradients times `scale`
    /// (loss-scale removal and clipping), at learning rate `lr`; `updates`
    /// counts this update (AdamW bias correction). The first layer's weight
    /// and its gradient are `first` (its rows in a `FirstLayers`).
    pub fn update(&mut self, first: FirstLayer, step: UpdateStep) {
        let (first_weight, first_gradient) = (first.weight, first.gradient);
        let mut parameters: Vec<(&mut [f32], &[f32])> = vec![(first_weight, first_gradient)];
        for (index, layer) in self.head.layers.iter_mut().enumerate() {
            if index > 0 {
                parameters.push((&mut layer.weight, &self.gradients[2 * index]));
            }
            parameters.push((&mut layer.bias, &self.gradients[2 * index + 1]));
        }
        // Weight, bias per layer: the moments' order.
        for (i, (weights, gradients)) in parameters.into_iter().enumerate() {
            let first = &mut self.first_moments[i];
            let scale = step.scale;
            match step.optimizer {
                Optimizer::AdamW => {
                    AdamWStep::new(step.lr, step.weight_decay, step.updates, scale).apply(
                        weights,
                        gradients,
                        first,
                        &mut self.second_moments[i],
                    );
                }
                Optimizer::Sgd { momentum } => {
                    // Coupled L2 decay, as in torch.optim.SGD.
                    let (momentum, decay, lr) =
                        (momentum as f32, step.weight_decay as f32, step.lr as f32);
                    for ((w, &g), b) in weights.iter_mut().zip(gradients).zip(first.iter_mut()) {
                        let g = g * scale + *w * decay;
                        *b = *b * momentum + g;
                        *w -= *b * lr;
                    }
                }
            }
        }
    }
}

/// What one optimiser update applies: the rule, the rate, the decay, the
/// update count (AdamW bias correction) and the factor on the gradients
/// (loss-scale removal times clipping).
#[derive(Debug, Clone, Copy)]
pub struct UpdateStep {
    pub optimizer: Optimizer,
    pub lr: f64,
    pub weight_decay: f64,
    pub updates: i32,
    pub scale: f32,
}

/// One head's rows of a `FirstLayers`: its first weight `[outputs, inputs]`
/// and that weight's accumulated gradient.
pub struct FirstLayer<'a> {
    pub weight: &'a mut [f32],
    pub gradient: &'a [f32],
}

/// The first layers of a group of heads, stacked row after row into one
/// `[total outputs, inputs]` weight matrix and its gradient; head h owns
/// rows `offsets[h]..offsets[h + 1]`, contiguous in both. See the module
/// documentation for why.
#[derive(Debug)]
pub struct FirstLayers {
    inputs: usize,
    offsets: Vec<usize>,
    weight: Vec<f32>,
    gradient: Vec<f32>,
    /// The last micro-batch's product `[rows, total outputs]` and its
    /// gradient, kept between micro-batches so steps do not allocate them.
    product: Vec<f32>,
    product_gradient: Vec<f32>,
}

impl FirstLayers {
    fn stack(inputs: usize, weights: Vec<Vec<f32>>) -> Self {
        let mut offsets = vec![0];
        let mut weight: Vec<f32> = Vec::new();
        for w in weights {
            offsets.push(offsets[offsets.len() - 1] + w.len() / inputs);
            if weight.is_empty() {
                // A lone head's weight moves in without a copy.
                weight = w;
            } else {
                weight.extend_from_slice(&w);
            }
        }
        FirstLayers {
            inputs,
            offsets,
            gradient: vec![0f32; weight.len()],
            weight,
            product: Vec::new(),
            product_gradient: Vec::new(),
        }
    }

    /// Takes the first-layer weights of `hosts` (all over the same inputs)
    /// for the steps of an epoch; `give_back` returns them. While lent, a
    /// host's first weight and its gradient buffer are empty.
    pub fn lend(hosts: &mut [&mut HostTrainer]) -> Self {
        let inputs = hosts.first().map_or(0, |h| h.head.layers[0].inputs);
        let weights = hosts
            .iter_mut()
            .map(|h| {
                debug_assert_eq!(h.head.layers[0].inputs, inputs);
                h.gradients[0] = Vec::new();
                std::mem::take(&mut h.head.layers[0].weight)
            })
            .collect();
        Self::stack(inputs, weights)
    }

    /// Returns each host its first-layer weight and a gradient buffer.
    pub fn give_back(mut self, hosts: &mut [&mut HostTrainer]) {
        if let [host] = hosts {
            host.head.layers[0].weight = std::mem::take(&mut self.weight);
            host.gradients[0] = self.gradient;
            return;
        }
        for (h, host) in hosts.iter_mut().enumerate() {
            let rows = self.offsets[h] * self.inputs..self.offsets[h + 1] * self.inputs;
            host.head.layers[0].weight = self.weight[rows.clone()].to_vec();
            host.gradients[0] = vec![0f32; rows.len()];
        }
    }

    /// A stack of evaluation heads' first layers, moved out of `heads`
    /// (after this, use `HostHead::logits_after_first` on them).
    pub fn of_heads<'a>(heads: impl Iterator<Item = &'a mut HostHead>) -> Self {
        let mut inputs = 0;
        let weights = heads
            .map(|head| {
                inputs = head.layers[0].inputs;
                std::mem::take(&mut head.layers[0].weight)
            })
            .collect();
        Self::stack(inputs, weights)
    }

    /// How many heads are stacked.
    pub fn len(&self) -> usize {
        self.offsets.len() - 1
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn total_outputs(&self) -> usize {
        self.offsets[self.offsets.len() - 1]
    }

    /// `x[rows, inputs] W^T` for every stacked head at once (`[rows, total
    /// outputs]`, no bias), kept for `block`.
    pub fn forward(&mut self, x: &[f32], rows: usize, threads: Threads) {
        let total = self.total_outputs();
        self.product.resize(rows * total, 0.0);
        Product {
            a: row_major(x, rows, self.inputs),
            b: row_major(&self.weight, total, self.inputs).transpose(),
        }
        .into(&mut self.product, Accumulate::Replace, threads);
    }

    /// Head `head`'s columns of the last `forward`, as `[rows, outputs]`.
    pub fn block(&self, head: usize) -> Vec<f32> {
        let total = self.total_outputs();
        let columns = self.offsets[head]..self.offsets[head + 1];
        self.product
            .chunks_exact(total)
            .flat_map(|row| &row[columns.clone()])
            .copied()
            .collect()
    }

    /// Adds `delta^T x` to the stacked weight gradient, where head h's
    /// `deltas[h]` is `[rows, outputs_h]` (from
    /// `HostTrainer::accumulate_after_first`).
    pub fn accumulate(&mut self, deltas: &[Vec<f32>], x: &[f32], rows: usize, threads: Threads) {
        let total = self.total_outputs();
        // Every column belongs to one head, so every value is overwritten.
        self.product_gradient.resize(rows * total, 0.0);
        for (h, delta) in deltas.iter().enumerate() {
            let (start, outputs) = (self.offsets[h], self.offsets[h + 1] - self.offsets[h]);
            for (row, part) in self
                .product_gradient
                .chunks_exact_mut(total)
                .zip(delta.chunks_exact(outputs))
            {
                row[start..start + outputs].copy_from_slice(part);
            }
        }
        Product {
            a: row_major(&self.product_gradient, rows, total).transpose(),
            b: row_major(x, rows, self.inputs),
        }
        .into(&mut self.gradient, Accumulate::Add, threads);
    }

    pub fn zero_gradients(&mut self) {
        self.gradient.fill(0.0);
    }

    /// Head `head`'s first-layer weight (`[outputs, inputs]`).
    pub fn weight_of(&self, head: usize) -> &[f32] {
        &self.weight[self.offsets[head] * self.inputs..self.offsets[head + 1] * self.inputs]
    }

    /// Each head's rows: weight (to update) and gradient, disjoint.
    pub fn split_mut(&mut self) -> Vec<FirstLayer<'_>> {
        let FirstLayers {
            inputs,
            offsets,
            weight,
            gradient,
            ..
        } = self;
        let mut parts = Vec::with_capacity(offsets.len() - 1);
        let mut weight = weight.as_mut_slice();
        let mut gradient = gradient.as_slice();
        for bounds in offsets.windows(2) {
            let size = (bounds[1] - bounds[0]) * *inputs;
            let (w, w_rest) = weight.split_at_mut(size);
            let (g, g_rest) = gradient.split_at(size);
            parts.push(FirstLayer {
                weight: w,
                gradient: g,
            });
            weight = w_rest;
            gradient = g_rest;
        }
        parts
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{D, DType, Device};
    use rand::SeedableRng;

    use super::*;

    /// The reference is candle's autograd on the same head, batch, targets
    /// and dropout draws (the path `trainer.rs` takes for bf16, f16 and GPUs).
    fn compare(config: HeadConfig) {
        let (rows, dim, classes) = (7, 12, 4);
        let device = Device::Cpu;
        let head = Head::new(&config, dim, classes, 3, &device).unwrap();
        let mut source = ChaCha8Rng::seed_from_u64(9);
        let x: Vec<f32> = (0..rows * dim)
            .map(|_| source.random_range(-2.0f32..2.0))
            .collect();
        let targets: Vec<f32> = (0..rows * classes)
            .map(|i| {
                if i % classes == (i / classes) % classes {
                    0.1
                } else {
                    0.01
                }
            })
            .collect();

        let mut candle_rng = ChaCha8Rng::seed_from_u64(5);
        let logits = head
            .forward(
                &Tensor::from_slice(&x, (rows, dim), &device).unwrap(),
                DType::F32,
                Some(&mut candle_rng),
            )
            .unwrap();
        let loss = (candle_nn::ops::log_softmax(&logits, D::Minus1).unwrap()
            * Tensor::from_slice(&targets, (rows, classes), &device).unwrap())
        .unwrap()
        .sum_all()
        .unwrap()
        .affine(-1.0, 0.0)
        .unwrap();
        let grads = loss.backward().unwrap();

        let zeros: Vec<Tensor> = head
            .parameters()
            .iter()
            .map(|p| p.zeros_like().unwrap())
            .collect();
        let mut host = HostTrainer::load(&head, &config, &zeros, &zeros).unwrap();
        let mut host_rng = ChaCha8Rng::seed_from_u64(5);
        let evaluation = host.head.clone();
        let mut first = FirstLayers::lend(&mut [&mut host]);
        first.forward(&x, rows, Threads::Caller);
        let delta = host.accumulate_after_first(
            first.block(0),
            &targets,
            1.0,
            &mut host_rng,
            Threads::Caller,
        );
        first.accumulate(&[delta], &x, rows, Threads::Caller);
        let mut host_gradients = host.gradients.clone();
        host_gradients[0] = first.gradient.clone();
        for (parameter, host_gradient) in head.parameters().iter().zip(&host_gradients) {
            let expected = grads
                .get(parameter)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            assert_eq!(expected.len(), host_gradient.len());
            for (e, h) in expected.iter().zip(host_gradient) {
                assert!((e - h).abs() <= 1e-5 * (1.0 + e.abs()), "{e} vs {h}");
            }
        }
        // Evaluation logits match candle's forward without dropout.
        let expected = head
            .forward(
                &Tensor::from_slice(&x, (rows, dim), &device).unwrap(),
                DType::F32,
                None,
            )
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for (e, h) in expected
            .iter()
            .zip(evaluation.logits(&x, rows, Threads::Pool))
        {
            assert!((e - h).abs() <= 1e-5 * (1.0 + e.abs()), "{e} vs {h}");
        }
    }

    /// Trains heads `indices` of a fixed set for two steps of two
    /// micro-batches through one `FirstLayers`; returns each head's weights.
    fn train_stacked(indices: &[usize]) -> Vec<Vec<f32>> {
        let (rows, dim, classes) = (33, 200, 5);
        let configs = [
            HeadConfig::Linear,
            HeadConfig::Mlp {
                hidden: vec![48],
                dropout: 0.2,
                activation: Activation::Relu,
            },
            HeadConfig::Mlp {
                hidden: vec![17, 9],
                dropout: 0.0,
                activation: Activation::Gelu,
            },
        ];
        let mut source = ChaCha8Rng::seed_from_u64(1);
        let x: Vec<f32> = (0..rows * dim)
            .map(|_| source.random_range(-2.0f32..2.0))
            .collect();
        let targets: Vec<f32> = (0..rows * classes)
            .map(|_| source.random_range(0.0f32..0.1))
            .collect();
        let mut hosts: Vec<HostTrainer> = indices
            .iter()
            .map(|&h| {
                let head = Head::new(&configs[h], dim, classes, h as u64, &Device::Cpu).unwrap();
                let zeros: Vec<Tensor> = head
                    .parameters()
                    .iter()
                    .map(|p| p.zeros_like().unwrap())
                    .collect();
                HostTrainer::load(&head, &configs[h], &zeros, &zeros).unwrap()
            })
            .collect();
        let mut rngs: Vec<ChaCha8Rng> = indices
            .iter()
            .map(|&h| ChaCha8Rng::seed_from_u64(100 + h as u64))
            .collect();
        let mut refs: Vec<&mut HostTrainer> = hosts.iter_mut().collect();
        let mut first = FirstLayers::lend(&mut refs);
        for updates in 1..=2 {
            first.zero_gradients();
            for host in refs.iter_mut() {
                host.zero_gradients();
            }
            for micro in [0..20, 20..rows] {
                let micro_x = &x[micro.start * dim..micro.end * dim];
                first.forward(micro_x, micro.len(), Threads::Pool);
                let deltas: Vec<Vec<f32>> = refs
                    .iter_mut()
                    .zip(&mut rngs)
                    .enumerate()
                    .map(|(h, (host, rng))| {
                        host.accumulate_after_first(
                            first.block(h),
                            &targets[micro.start * classes..micro.end * classes],
                            1.0,
                            rng,
                            Threads::Caller,
                        )
                    })
                    .collect();
                first.accumulate(&deltas, micro_x, micro.len(), Threads::Pool);
            }
            for (host, part) in refs.iter_mut().zip(first.split_mut()) {
                host.update(
                    part,
                    UpdateStep {
                        optimizer: Optimizer::AdamW,
                        lr: 0.01,
                        weight_decay: 0.01,
                        updates,
                        scale: 1.0,
                    },
                );
            }
        }
        first.give_back(&mut refs);
        hosts
            .iter()
            .map(|host| {
                host.head
                    .layers
                    .iter()
                    .flat_map(|l| l.weight.iter().chain(&l.bias).copied())
                    .collect()
            })
            .collect()
    }

    /// Stacking changes only the width of the first layer's matmuls: every
    /// head ends with the weights, bit for bit, that it reaches alone.
    #[test]
    fn stacked_heads_match_heads_alone() {
        let together = train_stacked(&[0, 1, 2]);
        for (h, stacked) in together.iter().enumerate() {
            let alone = &train_stacked(&[h])[0];
            assert_eq!(alone.len(), stacked.len());
            let differing = alone
                .iter()
                .zip(stacked)
                .filter(|(a, s)| a.to_bits() != s.to_bits())
                .count();
            assert_eq!(differing, 0, "head {h}: {differing} weights differ");
        }
    }

    /// Against std's f32::exp (libm) over the range softmax uses.
    #[test]
    fn fast_exp_matches_libm() {
        let mut x = -100.0f32;
        while x <= 88.0 {
            let (fast, reference) = (exp(x), x.exp());
            if x < -87.3 {
                assert_eq!(fast, 0.0, "{x}");
            } else {
                assert!(
                    (fast - reference).abs() <= 3e-7 * reference,
                    "{x}: {fast} vs {reference}"
                );
            }
            x += 0.0137;
        }
        assert_eq!(exp(0.0), 1.0);
    }

    #[test]
    fn host_step_matches_candle() {
        compare(HeadConfig::Linear);
        compare(HeadConfig::Mlp {
            hidden: vec![9, 6],
            dropout: 0.3,
            activation: Activation::Gelu,
        });
        compare(HeadConfig::Mlp {
            hidden: vec![5],
            dropout: 0.0,
            activation: Activation::Relu,
        });
    }

    /// One AdamW step by hand: m = 0.1 g, v = 0.001 g^2, m_hat = g, v_hat = g^2,
    /// w' = w (1 - lr wd) - lr g / (|g| + eps) (torch.optim.AdamW's first step).
    #[test]
    fn adamw_first_step_follows_torch() {
        let head = Head::new(&HeadConfig::Linear, 2, 1, 0, &Device::Cpu).unwrap();
        let zeros: Vec<Tensor> = head
            .parameters()
            .iter()
            .map(|p| p.zeros_like().unwrap())
            .collect();
        let mut host = HostTrainer::load(&head, &HeadConfig::Linear, &zeros, &zeros).unwrap();
        let before = host.head.layers[0].weight.clone();
        let mut weight = before.clone();
        host.update(
            FirstLayer {
                weight: &mut weight,
                gradient: &[0.5, -2.0],
            },
            UpdateStep {
                optimizer: Optimizer::AdamW,
                lr: 0.01,
                weight_decay: 0.1,
                updates: 1,
                scale: 1.0,
            },
        );
        for ((w, w0), g) in weight.iter().zip(&before).zip([0.5f32, -2.0]) {
            let expected = w0 * (1.0 - 0.01 * 0.1) - 0.01 * g / (g.abs() + 1e-8);
            assert!((w - expected).abs() < 1e-6, "{w} vs {expected}");
        }
    }
}

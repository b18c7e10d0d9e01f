//! The f32 CPU training step without candle's autograd graph: forward,
//! backward and the optimiser update of a linear or MLP head on flat
//! row-major buffers, with faer's matmul.
//!
//! Why: on a 1,280 x 10 head candle spends about 1.2 ms per step dispatching
//! some forty small ops (and re-reading the CPU count for every matmul),
//! several times the arithmetic. Here a step is three matmuls per layer and
//! a few loops over contiguous slices. The maths is the candle path's
//! (`trainer.rs`): same loss, same gradients, same AdamW and SGD updates,
//! same dropout draws; `tests::host_step_matches_candle` checks one against
//! the other.
//!
//! The trainer loads a `HostTrainer` from its candle `Var`s at the first
//! step of an epoch and stores it back at the end of the epoch, so
//! everything outside the training loop (evaluation snapshots, checkpoints,
//! resume) keeps seeing the `Var`s.

use candle_core::{Tensor, Var};
use faer::{Accum, MatMut, MatRef, Par};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use super::TrainError;
use super::config::{Activation, HeadConfig, Optimizer};
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
    fn par(self, multiply_adds: usize) -> Par {
        match self {
            Threads::Pool if multiply_adds >= PARALLEL_MIN_MULTIPLY_ADDS => {
                Par::rayon(rayon::current_num_threads())
            }
            _ => Par::Seq,
        }
    }
}

/// `out[rows, cols] (+)= a[rows, inner] x b[inner, cols]`, all row-major,
/// with `b` given as its transpose `[cols, inner]` when `b_transposed`.
struct Product<'a> {
    a: MatRef<'a, f32>,
    b: MatRef<'a, f32>,
}

impl Product<'_> {
    fn into(self, out: &mut [f32], accumulate: Accum, threads: Threads) {
        let (rows, inner, cols) = (self.a.nrows(), self.a.ncols(), self.b.ncols());
        let out = MatMut::from_row_major_slice_mut(out, rows, cols);
        faer::linalg::matmul::matmul(
            out,
            accumulate,
            self.a,
            self.b,
            1.0f32,
            threads.par(rows * inner * cols),
        );
    }
}

fn row_major(values: &[f32], rows: usize, cols: usize) -> MatRef<'_, f32> {
    MatRef::from_row_major_slice(values, rows, cols)
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

    /// Logits `[rows, classes]` of standardised rows, without dropout (evaluation).
    pub fn logits(&self, x: &[f32], rows: usize, threads: Threads) -> Vec<f32> {
        let last = self.layers.len() - 1;
        let mut output = affine(&self.layers[0], x, rows, threads);
        for layer in &self.layers[1..=last] {
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
    .into(&mut output, Accum::Replace, threads);
    for row in output.chunks_exact_mut(layer.outputs) {
        for (v, b) in row.iter_mut().zip(&layer.bias) {
            *v += b;
        }
    }
    output
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

/// Row-wise softmax in place.
pub fn softmax_rows(values: &mut [f32], classes: usize) {
    for row in values.chunks_exact_mut(classes) {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        for v in row.iter_mut() {
            *v = exp(*v - max);
        }
        let sum: f32 = row.iter().sum();
        for v in row.iter_mut() {
            *v /= sum;
        }
    }
}

/// e^x in f32 within about 2 ulp, branch-free so row loops vectorise.
/// libm's scalar expf was a quarter of a sweep's time (measured with perf:
/// one call per class per row per head, and a slow path in this process).
/// Range reduction x = n ln 2 + r with |r| <= ln 2 / 2, a degree-6 Taylor
/// polynomial for e^r (truncation error r^7/7! < 1.3e-7), then 2^n from the
/// exponent bits. Results below e^-87.3 (subnormal) are 0.
pub fn exp(x: f32) -> f32 {
    const LOG2_E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split in a part exact in f32 and the rest (Cody-Waite).
    const LN2_HIGH: f32 = 0.693_145_75;
    const LN2_LOW: f32 = 1.428_606_8e-6;
    let clamped = x.clamp(-87.3, 88.7);
    let n = (clamped * LOG2_E + 0.5).floor();
    let r = clamped - n * LN2_HIGH - n * LN2_LOW;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    let scale = f32::from_bits(((n as i32 + 127) as u32) << 23);
    if x < -87.3 { 0.0 } else { p * scale }
}

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

    pub fn zero_gradients(&mut self) {
        for g in &mut self.gradients {
            g.fill(0.0);
        }
    }

    /// Adds the gradient of `loss_scale * -sum(targets * log_softmax(head(x)))`
    /// over one micro-batch to the gradient buffers. `targets` are the
    /// weighted, smoothed one-hot rows of `trainer.rs`.
    pub fn accumulate(
        &mut self,
        x: &[f32],
        rows: usize,
        targets: &[f32],
        loss_scale: f32,
        dropout_rng: &mut ChaCha8Rng,
        threads: Threads,
    ) {
        let layer_count = self.head.layers.len();
        // Hidden activations (inputs of layers 1..), their pre-activations and dropout masks.
        let mut pre_activations: Vec<Vec<f32>> = Vec::with_capacity(layer_count - 1);
        let mut inputs: Vec<Vec<f32>> = Vec::with_capacity(layer_count - 1);
        let mut masks: Vec<Option<Vec<f32>>> = Vec::with_capacity(layer_count - 1);
        let mut logits = Vec::new();
        for index in 0..layer_count {
            let layer = &self.head.layers[index];
            let input = if index == 0 { x } else { &inputs[index - 1] };
            let output = affine(layer, input, rows, threads);
            if index + 1 == layer_count {
                logits = output;
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
            pre_activations.push(output);
            inputs.push(activated);
            masks.push(mask);
        }

        // d loss / d logits = scale * (softmax * sum(targets) - targets), per row.
        let classes = self.head.layers[layer_count - 1].outputs;
        let mut delta = logits;
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
            let input = if index == 0 { x } else { &inputs[index - 1] };
            let (weight_gradient, rest) = self.gradients[2 * index..].split_at_mut(1);
            // dW[out, in] += delta^T[out, rows] x input[rows, in]
            Product {
                a: row_major(&delta, rows, layer.outputs).transpose(),
                b: row_major(input, rows, layer.inputs),
            }
            .into(&mut weight_gradient[0], Accum::Add, threads);
            let bias_gradient = &mut rest[0];
            for row in delta.chunks_exact(layer.outputs) {
                for (g, d) in bias_gradient.iter_mut().zip(row) {
                    *g += d;
                }
            }
            if index == 0 {
                break;
            }
            // d input[rows, in] = delta[rows, out] x W[out, in], then back
            // through dropout and the activation of the layer below.
            let mut below = vec![0f32; rows * layer.inputs];
            Product {
                a: row_major(&delta, rows, layer.outputs),
                b: row_major(&layer.weight, layer.outputs, layer.inputs),
            }
            .into(&mut below, Accum::Replace, threads);
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
    }

    /// Squared L2 norm of the accumulated gradients, times `scale^2`.
    pub fn gradient_norm_sq(&self, scale: f32) -> f64 {
        let mut sum = 0f64;
        for g in &self.gradients {
            let part: f32 = g.iter().map(|v| (v * scale) * (v * scale)).sum();
            sum += part as f64;
        }
        sum
    }

    /// One optimiser update with the accumulated gradients times `scale`
    /// (loss-scale removal and clipping), at learning rate `lr`; `updates`
    /// counts this update (AdamW bias correction).
    pub fn update(
        &mut self,
        optimizer: Optimizer,
        lr: f64,
        weight_decay: f64,
        updates: i32,
        scale: f32,
    ) {
        let mut parameters: Vec<&mut Vec<f32>> = self
            .head
            .layers
            .iter_mut()
            .flat_map(|l| [&mut l.weight, &mut l.bias])
            .collect();
        for (i, weights) in parameters.iter_mut().enumerate() {
            let gradients = &self.gradients[i];
            let first = &mut self.first_moments[i];
            match optimizer {
                Optimizer::AdamW => {
                    let (beta1, beta2, eps) = (0.9f64, 0.999f64, 1e-8f32);
                    let correction1 = (1.0 - beta1.powi(updates)) as f32;
                    let correction2 = (1.0 - beta2.powi(updates)) as f32;
                    let decay = (1.0 - lr * weight_decay) as f32;
                    let (beta1, beta2, lr) = (beta1 as f32, beta2 as f32, lr as f32);
                    let second = &mut self.second_moments[i];
                    for (((w, &g), m), v) in weights
                        .iter_mut()
                        .zip(gradients)
                        .zip(first.iter_mut())
                        .zip(second.iter_mut())
                    {
                        let g = g * scale;
                        *m = *m * beta1 + g * (1.0 - beta1);
                        *v = *v * beta2 + g * g * (1.0 - beta2);
                        let m_hat = *m / correction1;
                        let v_hat = *v / correction2;
                        *w = *w * decay - lr * (m_hat / (v_hat.sqrt() + eps));
                    }
                }
                Optimizer::Sgd { momentum } => {
                    // Coupled L2 decay, as in torch.optim.SGD.
                    let (momentum, decay, lr) = (momentum as f32, weight_decay as f32, lr as f32);
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
        host.accumulate(&x, rows, &targets, 1.0, &mut host_rng, Threads::Caller);
        for (parameter, host_gradient) in head.parameters().iter().zip(&host.gradients) {
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
            .zip(host.head.logits(&x, rows, Threads::Pool))
        {
            assert!((e - h).abs() <= 1e-5 * (1.0 + e.abs()), "{e} vs {h}");
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
        host.gradients[0] = vec![0.5, -2.0];
        host.update(Optimizer::AdamW, 0.01, 0.1, 1, 1.0);
        for ((w, w0), g) in host.head.layers[0]
            .weight
            .iter()
            .zip(&before)
            .zip([0.5f32, -2.0])
        {
            let expected = w0 * (1.0 - 0.01 * 0.1) - 0.01 * g / (g.abs() + 1e-8);
            assert!((w - expected).abs() < 1e-6, "{w} vs {expected}");
        }
    }
}

//! A classification head over standardised features: linear, or an MLP with
//! ReLU or GELU and dropout. Weights are f32 `Var`s (the master copy); the
//! forward pass runs in the run's precision.

use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::TrainError;
use super::config::{Activation, HeadConfig};

pub struct Head {
    /// Weight [out, in] and bias [out] per layer.
    pub layers: Vec<(Var, Var)>,
    config: HeadConfig,
}

impl Head {
    /// Seeded initialisation in PyTorch's `nn.Linear` default range.
    pub fn new(
        config: &HeadConfig,
        input_dim: usize,
        classes: usize,
        seed: u64,
        device: &Device,
    ) -> Result<Self, TrainError> {
        // Stream 0 of the run's seed: initialisation never shares draws with
        // data order or dropout, so heads of one seed see the same batches.
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(0);
        let mut sizes = vec![input_dim];
        sizes.extend(config.layer_sizes(classes));
        let mut layers = Vec::new();
        for pair in sizes.windows(2) {
            let (inputs, outputs) = (pair[0], pair[1]);
            let bound = 1.0 / (inputs as f32).sqrt();
            let weight: Vec<f32> = (0..inputs * outputs)
                .map(|_| rng.random_range(-bound..bound))
                .collect();
            let bias: Vec<f32> = (0..outputs)
                .map(|_| rng.random_range(-bound..bound))
                .collect();
            layers.push((
                Var::from_tensor(&Tensor::from_vec(weight, (outputs, inputs), device)?)?,
                Var::from_tensor(&Tensor::from_vec(bias, outputs, device)?)?,
            ));
        }
        Ok(Head {
            layers,
            config: config.clone(),
        })
    }

    pub fn parameters(&self) -> Vec<Var> {
        self.layers
            .iter()
            .flat_map(|(w, b)| [w.clone(), b.clone()])
            .collect()
    }

    /// Weights and biases in all layers.
    pub fn parameter_count(&self) -> usize {
        self.layers
            .iter()
            .map(|(w, b)| w.elem_count() + b.elem_count())
            .sum()
    }

    /// Logits in f32. `x` is already in `dtype`; the weights are cast to it
    /// (so gradients flow back to the f32 masters). `dropout_rng` is `Some`
    /// in training mode.
    pub fn forward(
        &self,
        x: &Tensor,
        dtype: DType,
        mut dropout_rng: Option<&mut ChaCha8Rng>,
    ) -> Result<Tensor, TrainError> {
        let mut h = x.clone();
        let last = self.layers.len() - 1;
        for (i, (w, b)) in self.layers.iter().enumerate() {
            let w = w.as_tensor().to_dtype(dtype)?;
            let b = b.as_tensor().to_dtype(dtype)?;
            h = h.matmul(&w.t()?)?.broadcast_add(&b)?;
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
                    let mask = Tensor::from_vec(mask, h.shape(), h.device())?.to_dtype(dtype)?;
                    h = (h * mask)?;
                }
            }
        }
        Ok(h.to_dtype(DType::F32)?)
    }
}

impl Head {
    /// A trained head from its `head.safetensors` tensors (`layers.N.weight`,
    /// `layers.N.bias`), checked against `config`'s layer count and chained shapes.
    pub fn from_tensors(
        config: &HeadConfig,
        tensors: &std::collections::HashMap<String, Tensor>,
        input_dim: usize,
    ) -> Result<Self, TrainError> {
        let expected = config.layer_sizes(0).len();
        let mut layers = Vec::with_capacity(expected);
        let mut inputs = input_dim;
        for i in 0..expected {
            let get = |kind: &str| {
                tensors.get(&format!("layers.{i}.{kind}")).ok_or_else(|| {
                    TrainError::Checkpoint(format!("head has no tensor layers.{i}.{kind}"))
                })
            };
            let (weight, bias) = (get("weight")?, get("bias")?);
            let (outputs, weight_inputs) = weight.dims2()?;
            if weight_inputs != inputs || bias.dims() != [outputs] {
                return Err(TrainError::Checkpoint(format!(
                    "head layer {i} has weight {:?} and bias {:?}; it needs {inputs} inputs",
                    weight.dims(),
                    bias.dims()
                )));
            }
            layers.push((
                Var::from_tensor(&weight.to_dtype(DType::F32)?)?,
                Var::from_tensor(&bias.to_dtype(DType::F32)?)?,
            ));
            inputs = outputs;
        }
        Ok(Head {
            layers,
            config: config.clone(),
        })
    }

    /// Output size of the last layer.
    pub fn classes(&self) -> usize {
        self.layers
            .last()
            .map_or(0, |(_, bias)| bias.as_tensor().dims()[0])
    }
}

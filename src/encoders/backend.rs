//! Tensor sources for `VarBuilder`: a strict one over loaded tensors whose
//! errors name the tensor and both shapes, and a deterministic random one for
//! tests and for building a model without weights.

use std::collections::HashMap;

use candle_core::{DType, Device, Error, Result, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, init::NormalOrUniform};

/// Tensors loaded from a weights file; a missing or mis-shaped tensor is an
/// error naming it and both shapes.
pub struct StrictTensors(pub HashMap<String, Tensor>);

impl SimpleBackend for StrictTensors {
    fn get(&self, s: Shape, name: &str, _: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        let tensor = self.get_unchecked(name, dtype, dev)?;
        if tensor.shape() != &s {
            return Err(Error::Msg(format!(
                "tensor '{name}': the model expects shape {:?}, the weights have shape {:?}",
                s.dims(),
                tensor.dims()
            )));
        }
        Ok(tensor)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> Result<Tensor> {
        let tensor = self.0.get(name).ok_or_else(|| {
            Error::Msg(format!(
                "tensor '{name}' is missing from the weights ({} tensors present)",
                self.0.len()
            ))
        })?;
        tensor.to_dtype(dtype)?.to_device(dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.0.contains_key(name)
    }
}

/// Pseudo-random tensors, a pure function of (seed, tensor name, shape), so
/// the same seed builds the same model on every machine and device. The
/// model's init hints set each tensor's mean and variance.
pub struct RandomTensors {
    pub seed: u64,
}

/// splitmix64: small, fast and good enough for initial weights.
struct SplitMix(u64);

impl SplitMix {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Zero mean, unit variance. A uniform draw rather than a Gaussian: as
    /// good for initial weights and several times cheaper in debug builds.
    fn standard(&mut self) -> f64 {
        3f64.sqrt() * (2.0 * self.unit() - 1.0)
    }
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

impl SimpleBackend for RandomTensors {
    fn get(&self, s: Shape, name: &str, h: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        let count = s.elem_count();
        let mut rng = SplitMix(self.seed ^ fnv1a(name.as_bytes()));
        let values: Vec<f32> = match h {
            Init::Const(value) => vec![value as f32; count],
            Init::Randn { mean, stdev } => (0..count)
                .map(|_| (mean + stdev * rng.standard()) as f32)
                .collect(),
            Init::Uniform { lo, up } => (0..count)
                .map(|_| (lo + (up - lo) * rng.unit()) as f32)
                .collect(),
            Init::Kaiming {
                dist,
                fan,
                non_linearity,
            } => {
                let std = non_linearity.gain() / (fan.for_shape(&s) as f64).sqrt();
                match dist {
                    NormalOrUniform::Normal => {
                        (0..count).map(|_| (std * rng.standard()) as f32).collect()
                    }
                    NormalOrUniform::Uniform => {
                        let bound = 3f64.sqrt() * std;
                        (0..count)
                            .map(|_| (bound * (2.0 * rng.unit() - 1.0)) as f32)
                            .collect()
                    }
                }
            }
        };
        Tensor::from_vec(values, s, dev)?.to_dtype(dtype)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> Result<Tensor> {
        Err(Error::Msg(format!(
            "random weights have no shape for '{name}' unless the model states one"
        )))
    }

    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

/// Another backend with some tensors replaced. Used to turn a classifier into
/// an identity so that a model whose `forward` ends in its head returns the
/// features that feed it.
pub struct WithOverrides {
    pub inner: Box<dyn SimpleBackend>,
    pub tensors: HashMap<String, Tensor>,
}

impl SimpleBackend for WithOverrides {
    fn get(&self, s: Shape, name: &str, h: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        match self.tensors.get(name) {
            Some(tensor) if tensor.shape() == &s => tensor.to_dtype(dtype)?.to_device(dev),
            Some(tensor) => Err(Error::Msg(format!(
                "tensor '{name}': the model expects shape {:?}, the override has shape {:?}",
                s.dims(),
                tensor.dims()
            ))),
            None => self.inner.get(s, name, h, dtype, dev),
        }
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> Result<Tensor> {
        match self.tensors.get(name) {
            Some(tensor) => tensor.to_dtype(dtype)?.to_device(dev),
            None => self.inner.get_unchecked(name, dtype, dev),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.tensors.contains_key(name) || self.inner.contains_tensor(name)
    }
}

/// `rows` × `columns` weight whose first min(rows, columns) outputs copy the
/// inputs, and a zero bias: a linear layer that passes features through.
pub fn identity_linear(
    prefix: &str,
    rows: usize,
    columns: usize,
) -> Result<HashMap<String, Tensor>> {
    let device = Device::Cpu;
    let mut weight = vec![0f32; rows * columns];
    for i in 0..rows.min(columns) {
        weight[i * columns + i] = 1.0;
    }
    let mut tensors = HashMap::new();
    tensors.insert(
        format!("{prefix}.weight"),
        Tensor::from_vec(weight, (rows, columns), &device)?,
    );
    tensors.insert(
        format!("{prefix}.bias"),
        Tensor::zeros(rows, DType::F32, &device)?,
    );
    Ok(tensors)
}

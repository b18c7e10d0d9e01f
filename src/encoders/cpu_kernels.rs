//! CPU kernels for the EfficientNet-Lite forward pass, as candle custom ops on
//! contiguous f32 NCHW tensors: a direct depthwise convolution with TF "same"
//! padding and a fused bias + ReLU6. Both run one channel plane per rayon task.
//! Other devices keep the generic candle ops in `efficientnet_lite`.

use candle_core::{CpuStorage, CustomOp1, InplaceOp1, Layout, Result, Shape, bail};
use rayon::prelude::*;

/// TF "same" padding for one axis: (before, after), the extra pixel going after.
pub(crate) fn same_padding(input: usize, kernel: usize, stride: usize) -> (usize, usize) {
    let output = input.div_ceil(stride);
    let total = ((output - 1) * stride + kernel).saturating_sub(input);
    (total / 2, total - total / 2)
}

/// The contiguous f32 slice a custom op reads.
fn contiguous_f32<'a>(storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else {
        bail!("cpu kernels take f32 tensors")
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        bail!("cpu kernels take contiguous tensors")
    };
    Ok(&data[start..end])
}

/// Depthwise k×k convolution, stride 1 or 2, TF "same" padding, with the
/// per-channel bias and an optional ReLU6 applied in the same pass.
#[derive(Debug, Clone)]
pub struct Depthwise {
    /// [channels, kernel, kernel].
    pub weight: Vec<f32>,
    /// [channels].
    pub bias: Vec<f32>,
    pub kernel: usize,
    pub stride: usize,
    pub relu6: bool,
}

impl Depthwise {
    /// One output plane from one input plane of channel `channel`.
    fn plane(&self, channel: usize, input: &[f32], (h, w): (usize, usize), output: &mut [f32]) {
        let (k, s) = (self.kernel, self.stride);
        let out_w = w.div_ceil(s);
        let top = same_padding(h, k, s).0 as isize;
        let left = same_padding(w, k, s).0 as isize;
        let taps = &self.weight[channel * k * k..(channel + 1) * k * k];
        let bias = self.bias[channel];
        // Stride 2: split each row into even and odd columns once, so every
        // tap below reads a contiguous run (vectorisable) instead of a gather.
        let half = w.div_ceil(2);
        let split: Vec<f32> = if s == 2 {
            let mut split = vec![0f32; h * 2 * half];
            for (row, parts) in input.chunks_exact(w).zip(split.chunks_exact_mut(2 * half)) {
                let (even, odd) = parts.split_at_mut(half);
                for (i, &v) in row.iter().enumerate() {
                    if i % 2 == 0 {
                        even[i / 2] = v;
                    } else {
                        odd[i / 2] = v;
                    }
                }
            }
            split
        } else {
            Vec::new()
        };
        for (oy, out_row) in output.chunks_exact_mut(out_w).enumerate() {
            out_row.fill(bias);
            for ky in 0..k {
                let iy = (oy * s) as isize + ky as isize - top;
                if iy < 0 || iy >= h as isize {
                    continue;
                }
                let in_row = &input[iy as usize * w..(iy as usize + 1) * w];
                for kx in 0..k {
                    let tap = taps[ky * k + kx];
                    // Output columns whose input column ox*s + kx - left lies inside the row.
                    let shift = kx as isize - left;
                    let first = if shift < 0 {
                        ((-shift) as usize).div_ceil(s)
                    } else {
                        0
                    };
                    let last = (w as isize - 1 - shift).div_euclid(s as isize) + 1;
                    let last = (last.max(0) as usize).min(out_w);
                    if first >= last {
                        continue;
                    }
                    let outs = &mut out_row[first..last];
                    if s == 1 {
                        let start = (first as isize + shift) as usize;
                        let ins = &in_row[start..start + outs.len()];
                        for (o, &i) in outs.iter_mut().zip(ins) {
                            *o += tap * i;
                        }
                    } else {
                        // Input column 2 * ox + shift: parity of shift picks the half.
                        let parity = shift.rem_euclid(2) as usize;
                        let offset = (first as isize + shift.div_euclid(2)) as usize;
                        let row = &split[iy as usize * 2 * half + parity * half..];
                        let ins = &row[offset..offset + outs.len()];
                        for (o, &i) in outs.iter_mut().zip(ins) {
                            *o += tap * i;
                        }
                    }
                }
            }
            if self.relu6 {
                for o in out_row.iter_mut() {
                    *o = o.clamp(0.0, 6.0);
                }
            }
        }
    }
}

impl CustomOp1 for Depthwise {
    fn name(&self) -> &'static str {
        "depthwise-same"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, c, h, w) = layout.shape().dims4()?;
        if c * self.kernel * self.kernel != self.weight.len() || c != self.bias.len() {
            bail!(
                "depthwise: {c} input channels, weights for {}",
                self.bias.len()
            )
        }
        if !(1..=2).contains(&self.stride) {
            bail!("depthwise: stride {} (1 or 2 only)", self.stride)
        }
        let input = contiguous_f32(storage, layout)?;
        let (out_h, out_w) = (h.div_ceil(self.stride), w.div_ceil(self.stride));
        let mut output = vec![0f32; n * c * out_h * out_w];
        output
            .par_chunks_exact_mut(out_h * out_w)
            .zip(input.par_chunks_exact(h * w))
            .enumerate()
            .for_each(|(plane, (out, inp))| self.plane(plane % c, inp, (h, w), out));
        Ok((CpuStorage::F32(output), Shape::from((n, c, out_h, out_w))))
    }
}

/// `x + bias[channel]`, then an optional ReLU6, in one pass over NCHW.
#[derive(Debug, Clone)]
pub struct BiasActivation {
    /// [channels].
    pub bias: Vec<f32>,
    pub relu6: bool,
}

// In place: the matmul or convolution output it runs on is fresh, so this
// saves one allocation and copy of the largest activations per layer.
impl InplaceOp1 for BiasActivation {
    fn name(&self) -> &'static str {
        "bias-relu6"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> Result<()> {
        let (_, c, h, w) = layout.shape().dims4()?;
        if c != self.bias.len() {
            bail!("bias: {c} channels, {} biases", self.bias.len())
        }
        let CpuStorage::F32(data) = storage else {
            bail!("cpu kernels take f32 tensors")
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            bail!("cpu kernels take contiguous tensors")
        };
        data[start..end]
            .par_chunks_exact_mut(h * w)
            .enumerate()
            .for_each(|(plane, values)| {
                let bias = self.bias[plane % c];
                if self.relu6 {
                    values
                        .iter_mut()
                        .for_each(|v| *v = (*v + bias).clamp(0.0, 6.0));
                } else {
                    values.iter_mut().for_each(|v| *v += bias);
                }
            });
        Ok(())
    }
}

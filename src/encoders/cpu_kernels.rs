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
    ///
    /// The input is first copied into a zero-padded plane (for stride 2 with
    /// each row split into even and odd columns), so that every tap reads a
    /// contiguous run without bounds arithmetic; outputs are then computed
    /// eight columns at a time with the sum kept in registers across all k²
    /// taps, instead of k² passes over the output row.
    fn plane(&self, channel: usize, input: &[f32], (h, w): (usize, usize), output: &mut [f32]) {
        const BLOCK: usize = 8;
        let (k, s) = (self.kernel, self.stride);
        let (out_h, out_w) = (h.div_ceil(s), w.div_ceil(s));
        let top = same_padding(h, k, s).0;
        let left = same_padding(w, k, s).0;
        let taps = &self.weight[channel * k * k..(channel + 1) * k * k];
        let bias = self.bias[channel];
        let (padded_h, padded_w) = ((out_h - 1) * s + k, (out_w - 1) * s + k);
        // Stride 2: padded column c lives at (c % 2) * half + c / 2 of its row.
        let half = padded_w.div_ceil(2);
        let row_len = if s == 1 { padded_w } else { 2 * half };
        let place = |c: usize| if s == 1 { c } else { (c % 2) * half + c / 2 };
        let mut padded = vec![0f32; padded_h * row_len];
        for (iy, in_row) in input.chunks_exact(w).enumerate() {
            let Some(row) = padded.get_mut((iy + top) * row_len..(iy + top + 1) * row_len) else {
                break;
            };
            for (ix, &v) in in_row.iter().enumerate() {
                if ix + left < padded_w {
                    row[place(ix + left)] = v;
                }
            }
        }
        // Where tap kx's run starts within a padded row.
        let tap_offsets: Vec<usize> = (0..k).map(place).collect();
        for (oy, out_row) in output.chunks_exact_mut(out_w).enumerate() {
            let rows = &padded[oy * s * row_len..(oy * s + k) * row_len];
            for (block, outs) in out_row.chunks_mut(BLOCK).enumerate() {
                let ox = block * BLOCK;
                let mut acc = [bias; BLOCK];
                for (row, row_taps) in rows.chunks_exact(row_len).zip(taps.chunks_exact(k)) {
                    for (&tap, &offset) in row_taps.iter().zip(&tap_offsets) {
                        let ins = &row[offset + ox..];
                        if outs.len() == BLOCK {
                            // Fixed length: LLVM keeps `acc` in vector registers.
                            for (a, &i) in acc.iter_mut().zip(&ins[..BLOCK]) {
                                *a += tap * i;
                            }
                        } else {
                            for (a, &i) in acc.iter_mut().zip(&ins[..outs.len()]) {
                                *a += tap * i;
                            }
                        }
                    }
                }
                for (o, a) in outs.iter_mut().zip(acc) {
                    *o = if self.relu6 { a.clamp(0.0, 6.0) } else { a };
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

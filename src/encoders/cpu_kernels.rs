//! CPU kernels for the EfficientNet-Lite forward pass, as candle custom ops on
//! contiguous f32 tensors in NHWC layout (channels last), so that channels are
//! the contiguous, vectorised axis and a 1×1 convolution is one matrix product
//! over all pixels of the batch (`efficientnet_lite` runs those with candle's
//! matmul). Stem convolution, depthwise convolution and the bias/ReLU6/residual
//! epilogues are here; all are parallel over output rows (rayon) and use the
//! widest SIMD the CPU has (AVX-512 or AVX2+FMA through `pulp`'s runtime
//! dispatch, scalar elsewhere). Other devices keep the generic candle ops.

use candle_core::{CpuStorage, CustomOp1, InplaceOp1, InplaceOp2, Layout, Result, Shape, bail};
use pulp::{Arch, Simd, WithSimd};
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

/// The contiguous f32 slice an in-place op writes.
fn contiguous_f32_mut<'a>(storage: &'a mut CpuStorage, layout: &Layout) -> Result<&'a mut [f32]> {
    let CpuStorage::F32(data) = storage else {
        bail!("cpu kernels take f32 tensors")
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        bail!("cpu kernels take contiguous tensors")
    };
    Ok(&mut data[start..end])
}

/// Rows of pixels per rayon task in the element-wise epilogues: large enough
/// that scheduling is negligible, small enough to balance two or more cores.
const EPILOGUE_PIXELS: usize = 256;

/// Which range of taps of one axis lands inside the input, for the output
/// position whose first tap reads input position `start` (may be negative).
fn valid_taps(start: isize, kernel: usize, input: usize) -> (usize, usize) {
    let first = (-start).clamp(0, kernel as isize) as usize;
    let last = (input as isize - start).clamp(0, kernel as isize) as usize;
    (first, last.max(first))
}

/// Depthwise k×k convolution in NHWC, stride 1 or 2, TF "same" padding, with
/// the per-channel bias and an optional ReLU6 applied in the same pass.
#[derive(Debug, Clone)]
pub struct Depthwise {
    /// [kernel × kernel, channels], tap-major: one tap's weights for all
    /// channels are contiguous, like the channels of one input pixel.
    pub weight: Vec<f32>,
    /// [channels].
    pub bias: Vec<f32>,
    pub kernel: usize,
    pub stride: usize,
    pub relu6: bool,
}

/// One output row of a depthwise convolution, run under `pulp`'s dispatch.
struct DepthwiseRow<'a> {
    op: &'a Depthwise,
    /// One image, [h, w, c].
    image: &'a [f32],
    size: (usize, usize, usize),
    out_y: usize,
    /// [out_w, c].
    output: &'a mut [f32],
}

// Channel vectors are summed in blocks of 4, then 2, then 1 (`B`): the
// widest block keeps the sums in registers across all taps while each
// loaded value feeds several FMAs.

/// Depthwise sums of `B` channel vectors from `first` for `P` output pixels
/// side by side (their inputs `shift` vectors apart): each weight vector is
/// loaded once for all `P`. `taps`: the (input, weight) offsets, in vectors,
/// of every tap of the first pixel that lies inside the image.
#[inline(always)]
fn depthwise_block<S: Simd, const P: usize, const B: usize>(
    simd: S,
    (image, weights): (&[S::f32s], &[S::f32s]),
    taps: &[(usize, usize)],
    shift: usize,
    bias: &[S::f32s],
    first: usize,
) -> [[S::f32s; B]; P] {
    let bias = &bias[first..first + B];
    let mut acc: [[S::f32s; B]; P] = [std::array::from_fn(|j| bias[j]); P];
    for &(input_at, weight_at) in taps {
        let weight = &weights[weight_at + first..weight_at + first + B];
        for (pixel, acc) in acc.iter_mut().enumerate() {
            let at = input_at + pixel * shift + first;
            let input = &image[at..at + B];
            for j in 0..B {
                acc[j] = simd.mul_add_e_f32s(weight[j], input[j], acc[j]);
            }
        }
    }
    acc
}

/// All channels of `P` neighbouring output pixels (`out`: their vectors).
#[inline(always)]
fn depthwise_pixels<S: Simd, const P: usize>(
    simd: S,
    data: (&[S::f32s], &[S::f32s]),
    taps: &[(usize, usize)],
    shift: usize,
    (bias, relu6): (&[S::f32s], bool),
    out: &mut [S::f32s],
) {
    let vectors = bias.len();
    let mut first = 0;
    while first + 4 <= vectors {
        let acc = depthwise_block::<S, P, 4>(simd, data, taps, shift, bias, first);
        for (pixel, acc) in acc.into_iter().enumerate() {
            store(simd, relu6, acc, &mut out[pixel * vectors + first..]);
        }
        first += 4;
    }
    if first + 2 <= vectors {
        let acc = depthwise_block::<S, P, 2>(simd, data, taps, shift, bias, first);
        for (pixel, acc) in acc.into_iter().enumerate() {
            store(simd, relu6, acc, &mut out[pixel * vectors + first..]);
        }
        first += 2;
    }
    if first < vectors {
        let acc = depthwise_block::<S, P, 1>(simd, data, taps, shift, bias, first);
        for (pixel, acc) in acc.into_iter().enumerate() {
            store(simd, relu6, acc, &mut out[pixel * vectors + first..]);
        }
    }
}

/// Stem sums of `B` output-channel vectors from `first`: every input tap's
/// value times that tap's weights.
#[inline(always)]
fn stem_block<S: Simd, const B: usize>(
    simd: S,
    patch: &[f32],
    tap_weights: &[&[S::f32s]],
    bias: &[S::f32s],
    first: usize,
) -> [S::f32s; B] {
    let bias = &bias[first..first + B];
    let mut acc: [S::f32s; B] = std::array::from_fn(|j| bias[j]);
    for (&value, weight) in patch.iter().zip(tap_weights) {
        let value = simd.splat_f32s(value);
        let weight = &weight[first..first + B];
        for j in 0..B {
            acc[j] = simd.mul_add_e_f32s(value, weight[j], acc[j]);
        }
    }
    acc
}

/// Bias already added: an optional ReLU6, then the store.
#[inline(always)]
fn store<S: Simd, const B: usize>(simd: S, relu6: bool, acc: [S::f32s; B], out: &mut [S::f32s]) {
    let (zero, six) = (simd.splat_f32s(0.0), simd.splat_f32s(6.0));
    for (out, value) in out[..B].iter_mut().zip(acc) {
        *out = if relu6 {
            simd.min_f32s(simd.max_f32s(value, zero), six)
        } else {
            value
        };
    }
}

impl DepthwiseRow<'_> {
    /// Channel counts that are not a whole number of vectors (never in the
    /// Lite models, whose depthwise channels are multiples of 16): scalar.
    fn scalar(self) {
        let DepthwiseRow {
            op,
            image,
            size: (h, w, c),
            out_y,
            output,
        } = self;
        let (k, s) = (op.kernel, op.stride);
        let first_row = (out_y * s) as isize - same_padding(h, k, s).0 as isize;
        let (ky_first, ky_last) = valid_taps(first_row, k, h);
        let left = same_padding(w, k, s).0 as isize;
        for (out_x, out_pixel) in output.chunks_exact_mut(c).enumerate() {
            let first_column = (out_x * s) as isize - left;
            let (kx_first, kx_last) = valid_taps(first_column, k, w);
            for (channel, out) in out_pixel.iter_mut().enumerate() {
                let mut acc = op.bias[channel];
                for ky in ky_first..ky_last {
                    let row = (first_row + ky as isize) as usize;
                    for kx in kx_first..kx_last {
                        let column = (first_column + kx as isize) as usize;
                        acc += op.weight[(ky * k + kx) * c + channel]
                            * image[(row * w + column) * c + channel];
                    }
                }
                *out = if op.relu6 { acc.clamp(0.0, 6.0) } else { acc };
            }
        }
    }
}

impl WithSimd for DepthwiseRow<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) {
        let c = self.size.2;
        if !c.is_multiple_of(S::F32_LANES) {
            return self.scalar();
        }
        let DepthwiseRow {
            op,
            image,
            size: (h, w, _),
            out_y,
            output,
        } = self;
        let (k, s) = (op.kernel, op.stride);
        let first_row = (out_y * s) as isize - same_padding(h, k, s).0 as isize;
        let (ky_first, ky_last) = valid_taps(first_row, k, h);
        let left = same_padding(w, k, s).0 as isize;
        // Pixels are whole vectors: offsets below count vectors.
        let vectors = c / S::F32_LANES;
        let data = (S::as_simd_f32s(image).0, S::as_simd_f32s(&op.weight).0);
        let bias = (S::as_simd_f32s(&op.bias).0, op.relu6);
        let out_vectors = S::as_mut_simd_f32s(output).0;
        let out_w = out_vectors.len() / vectors;
        let mut taps: Vec<(usize, usize)> = Vec::with_capacity(k * k);
        let mut out_x = 0;
        while out_x < out_w {
            let first_column = (out_x * s) as isize - left;
            let columns = valid_taps(first_column, k, w);
            // Two neighbours with the same taps inside the image (away from
            // the left and right edges) share every weight load.
            let pair = out_x + 1 < out_w && valid_taps(first_column + s as isize, k, w) == columns;
            taps.clear();
            for ky in ky_first..ky_last {
                let row = (first_row + ky as isize) as usize;
                for kx in columns.0..columns.1 {
                    let column = (first_column + kx as isize) as usize;
                    taps.push(((row * w + column) * vectors, (ky * k + kx) * vectors));
                }
            }
            let shift = s * vectors;
            if pair {
                let out = &mut out_vectors[out_x * vectors..(out_x + 2) * vectors];
                depthwise_pixels::<S, 2>(simd, data, &taps, shift, bias, out);
                out_x += 2;
            } else {
                let out = &mut out_vectors[out_x * vectors..(out_x + 1) * vectors];
                depthwise_pixels::<S, 1>(simd, data, &taps, shift, bias, out);
                out_x += 1;
            }
        }
    }
}

impl CustomOp1 for Depthwise {
    fn name(&self) -> &'static str {
        "depthwise-same-nhwc"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, h, w, c) = layout.shape().dims4()?;
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
        let mut output = vec![0f32; n * out_h * out_w * c];
        let arch = Arch::new();
        output
            .par_chunks_exact_mut(out_w * c)
            .enumerate()
            .for_each(|(row, output)| {
                let image = row / out_h;
                arch.dispatch(DepthwiseRow {
                    op: self,
                    image: &input[image * h * w * c..(image + 1) * h * w * c],
                    size: (h, w, c),
                    out_y: row % out_h,
                    output,
                })
            });
        Ok((CpuStorage::F32(output), Shape::from((n, out_h, out_w, c))))
    }
}

/// The stem: a full k×k convolution (groups 1) with TF "same" padding from an
/// NCHW image batch to an NHWC output, bias and optional ReLU6 fused. The
/// input has few channels (3), so each output pixel gathers its c·k² inputs
/// once and accumulates them into all output channels.
#[derive(Debug, Clone)]
pub struct StemConv {
    /// [in_channels × kernel × kernel, out_channels]: one input tap's weights
    /// for all output channels are contiguous.
    pub weight: Vec<f32>,
    /// [out_channels].
    pub bias: Vec<f32>,
    pub kernel: usize,
    pub stride: usize,
    pub relu6: bool,
}

/// One output row of the stem, run under `pulp`'s dispatch.
struct StemRow<'a> {
    op: &'a StemConv,
    /// One image, [c, h, w].
    image: &'a [f32],
    size: (usize, usize, usize),
    out_y: usize,
    /// [out_w, out_channels].
    output: &'a mut [f32],
}

impl WithSimd for StemRow<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) {
        let StemRow {
            op,
            image,
            size: (c, h, w),
            out_y,
            output,
        } = self;
        let (k, s) = (op.kernel, op.stride);
        let out_c = op.bias.len();
        let top = same_padding(h, k, s).0 as isize;
        let left = same_padding(w, k, s).0 as isize;
        let vectors = out_c / S::F32_LANES;
        let tail_start = vectors * S::F32_LANES;
        let relu6 = op.relu6;
        let bias = S::as_simd_f32s(&op.bias).0;
        let tap_weights: Vec<&[S::f32s]> = op
            .weight
            .chunks_exact(out_c)
            .map(|tap| S::as_simd_f32s(tap).0)
            .collect();
        let mut patch = vec![0f32; c * k * k];
        for (out_x, out_pixel) in output.chunks_exact_mut(out_c).enumerate() {
            // Taps in (channel, ky, kx) order, zero outside the image.
            let mut values = patch.iter_mut();
            for channel in 0..c {
                for ky in 0..k {
                    let y = (out_y * s + ky) as isize - top;
                    for kx in 0..k {
                        let x = (out_x * s + kx) as isize - left;
                        let inside = (0..h as isize).contains(&y) && (0..w as isize).contains(&x);
                        *values.next().expect("c·k² taps") = if inside {
                            image[(channel * h + y as usize) * w + x as usize]
                        } else {
                            0.0
                        };
                    }
                }
            }
            let (out_vectors, out_tail) = S::as_mut_simd_f32s(out_pixel);
            let mut first = 0;
            while first + 4 <= vectors {
                let acc = stem_block::<S, 4>(simd, &patch, &tap_weights, bias, first);
                store(simd, relu6, acc, &mut out_vectors[first..]);
                first += 4;
            }
            if first + 2 <= vectors {
                let acc = stem_block::<S, 2>(simd, &patch, &tap_weights, bias, first);
                store(simd, relu6, acc, &mut out_vectors[first..]);
                first += 2;
            }
            if first < vectors {
                let acc = stem_block::<S, 1>(simd, &patch, &tap_weights, bias, first);
                store(simd, relu6, acc, &mut out_vectors[first..]);
            }
            for (channel, out) in (tail_start..out_c).zip(out_tail) {
                let mut acc = op.bias[channel];
                for (tap, &value) in patch.iter().enumerate() {
                    acc += op.weight[tap * out_c + channel] * value;
                }
                *out = if relu6 { acc.clamp(0.0, 6.0) } else { acc };
            }
        }
    }
}

impl CustomOp1 for StemConv {
    fn name(&self) -> &'static str {
        "stem-conv-same-nchw-to-nhwc"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, c, h, w) = layout.shape().dims4()?;
        let out_c = self.bias.len();
        if c * self.kernel * self.kernel * out_c != self.weight.len() {
            bail!(
                "stem: {c} input channels and {out_c} outputs, {} weights",
                self.weight.len()
            )
        }
        let input = contiguous_f32(storage, layout)?;
        let (out_h, out_w) = (h.div_ceil(self.stride), w.div_ceil(self.stride));
        let mut output = vec![0f32; n * out_h * out_w * out_c];
        let arch = Arch::new();
        output
            .par_chunks_exact_mut(out_w * out_c)
            .enumerate()
            .for_each(|(row, output)| {
                let image = row / out_h;
                arch.dispatch(StemRow {
                    op: self,
                    image: &input[image * c * h * w..(image + 1) * c * h * w],
                    size: (c, h, w),
                    out_y: row % out_h,
                    output,
                })
            });
        Ok((
            CpuStorage::F32(output),
            Shape::from((n, out_h, out_w, out_c)),
        ))
    }
}

/// `x + bias[channel]` (plus `residual` when given), then an optional ReLU6,
/// over pixels of `channels` values, under `pulp`'s dispatch.
struct Epilogue<'a> {
    values: &'a mut [f32],
    residual: Option<&'a [f32]>,
    bias: &'a [f32],
    relu6: bool,
}

impl WithSimd for Epilogue<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) {
        let Epilogue {
            values,
            residual,
            bias,
            relu6,
        } = self;
        let c = bias.len();
        let (zero, six) = (simd.splat_f32s(0.0), simd.splat_f32s(6.0));
        let (bias_vectors, bias_tail) = S::as_simd_f32s(bias);
        for (pixel, values) in values.chunks_exact_mut(c).enumerate() {
            let residual = residual.map(|r| &r[pixel * c..(pixel + 1) * c]);
            let (vectors, tail) = S::as_mut_simd_f32s(values);
            let (residual_vectors, residual_tail) = match residual {
                Some(r) => {
                    let (v, t) = S::as_simd_f32s(r);
                    (Some(v), Some(t))
                }
                None => (None, None),
            };
            for (i, v) in vectors.iter_mut().enumerate() {
                let mut sum = simd.add_f32s(*v, bias_vectors[i]);
                if let Some(r) = residual_vectors {
                    sum = simd.add_f32s(sum, r[i]);
                }
                *v = if relu6 {
                    simd.min_f32s(simd.max_f32s(sum, zero), six)
                } else {
                    sum
                };
            }
            for (i, v) in tail.iter_mut().enumerate() {
                let mut sum = *v + bias_tail[i];
                if let Some(r) = residual_tail {
                    sum += r[i];
                }
                *v = if relu6 { sum.clamp(0.0, 6.0) } else { sum };
            }
        }
    }
}

/// `x + bias[channel]`, then an optional ReLU6, in place over NHWC (any
/// shape whose last axis is the channels).
#[derive(Debug, Clone)]
pub struct BiasActivation {
    /// [channels].
    pub bias: Vec<f32>,
    pub relu6: bool,
}

// In place: the matmul output it runs on is fresh, so this saves one
// allocation and copy of the largest activations per layer.
impl InplaceOp1 for BiasActivation {
    fn name(&self) -> &'static str {
        "bias-relu6-nhwc"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> Result<()> {
        let c = layout.shape().dims().last().copied().unwrap_or(0);
        if c != self.bias.len() {
            bail!("bias: {c} channels, {} biases", self.bias.len())
        }
        let arch = Arch::new();
        contiguous_f32_mut(storage, layout)?
            .par_chunks_mut(EPILOGUE_PIXELS * c)
            .for_each(|values| {
                arch.dispatch(Epilogue {
                    values,
                    residual: None,
                    bias: &self.bias,
                    relu6: self.relu6,
                })
            });
        Ok(())
    }
}

/// `x + bias[channel] + residual`, in place over NHWC: the projection of an
/// inverted-residual block with its skip connection, one pass instead of two.
#[derive(Debug, Clone)]
pub struct BiasResidual {
    /// [channels].
    pub bias: Vec<f32>,
}

impl InplaceOp2 for BiasResidual {
    fn name(&self) -> &'static str {
        "bias-residual-nhwc"
    }

    fn cpu_fwd(
        &self,
        storage: &mut CpuStorage,
        layout: &Layout,
        residual: &CpuStorage,
        residual_layout: &Layout,
    ) -> Result<()> {
        let c = layout.shape().dims().last().copied().unwrap_or(0);
        if c != self.bias.len() || layout.shape() != residual_layout.shape() {
            bail!(
                "bias + residual: shape {:?} with residual {:?} and {} biases",
                layout.shape(),
                residual_layout.shape(),
                self.bias.len()
            )
        }
        let residual = contiguous_f32(residual, residual_layout)?;
        let arch = Arch::new();
        contiguous_f32_mut(storage, layout)?
            .par_chunks_mut(EPILOGUE_PIXELS * c)
            .zip(residual.par_chunks(EPILOGUE_PIXELS * c))
            .for_each(|(values, residual)| {
                arch.dispatch(Epilogue {
                    values,
                    residual: Some(residual),
                    bias: &self.bias,
                    relu6: false,
                })
            });
        Ok(())
    }
}

//! The per-element loops of the fine-tuned blocks' training step
//! (`lazarus::train::blocks`), on f32 in NHWC: depthwise convolution forward
//! and backward, a pointwise output's bias and ReLU6, and ReLU6's gradient
//! mask. The matrix products of the pointwise convolutions are
//! [`crate::matmul`]'s.
//!
//! They live in this crate, built optimised, because they are most of a
//! fine-tuning step's time outside the matrix products; each function holds
//! its whole loop (none is `#[inline]`), so the optimised code is the code
//! that runs whatever profile the caller is built with. The loops run under
//! `pulp`'s dispatch at the process's [`SimdLevel`], so they are compiled
//! for AVX-512 or AVX2 where the CPU has it (the crate's baseline is SSE2:
//! perf showed the depthwise loops in 4-lane SSE and ReLU6's mask as
//! a branch per value, together a third of a K 4 fine-tuning step).

use rayon::prelude::*;

use pulp::{Simd, WithSimd};

use crate::{SimdLevel, same_padding, scratch};

/// `pulp`'s dispatcher at the level in force for the process.
fn arch() -> pulp::Arch {
    SimdLevel::in_force_arch()
}

/// The height and width of a map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapSize {
    pub height: usize,
    pub width: usize,
}

impl MapSize {
    pub fn pixels(self) -> usize {
        self.height * self.width
    }
}

/// A k×k depthwise convolution with TF "same" padding: weight
/// `[kernel², channels]` tap-major (tap = dy · kernel + dx), bias `[channels]`.
#[derive(Debug, Clone, Copy)]
pub struct DepthwiseKernel<'a> {
    pub weight: &'a [f32],
    pub bias: &'a [f32],
    pub channels: usize,
    pub kernel: usize,
    pub stride: usize,
    pub relu6: bool,
}

/// The forward pass of a depthwise convolution as its backward pass reads it.
#[derive(Debug, Clone, Copy)]
pub struct DepthwiseTrace<'a> {
    pub input: &'a [f32],
    pub n_images: usize,
    pub size: MapSize,
    pub output_size: MapSize,
}

/// Whether a backward pass also returns d loss / d input (not for the first
/// layer trained).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wanted {
    Yes,
    No,
}

/// Values of a depthwise weight gradient per task when the images'
/// partials are added up.
const PARTIAL_VALUES: usize = 4096;

/// Rows of a pointwise output finished per task: bias and ReLU6 over this
/// many pixels at once.
const FINISH_PIXELS: usize = 64;

/// Adds `bias` to every row of `output` (`[pixels, bias.len()]`), then
/// clamps to [0, 6] when `relu6`.
pub fn add_bias_relu6(output: &mut [f32], bias: &[f32], relu6: bool) {
    let outputs = bias.len();
    let arch = arch();
    output
        .par_chunks_mut(FINISH_PIXELS * outputs)
        .for_each(|rows| {
            arch.dispatch(
                #[inline(always)]
                || {
                    for row in rows.chunks_exact_mut(outputs) {
                        for (v, b) in row.iter_mut().zip(bias) {
                            *v += b;
                            if relu6 {
                                *v = v.clamp(0.0, 6.0);
                            }
                        }
                    }
                },
            )
        });
}

/// Adds the column sums of `delta` (`[pixels, bias_gradient.len()]`) to
/// `bias_gradient`.
pub fn add_column_sums(bias_gradient: &mut [f32], delta: &[f32]) {
    arch().dispatch(
        #[inline(always)]
        || {
            for row in delta.chunks_exact(bias_gradient.len()) {
                for (g, d) in bias_gradient.iter_mut().zip(row) {
                    *g += d;
                }
            }
        },
    )
}

/// `values += other`, element by element (a residual connection).
pub fn add_assign(values: &mut [f32], other: &[f32]) {
    assert_eq!(values.len(), other.len(), "adding unequal lengths");
    let arch = arch();
    values
        .par_chunks_mut(1 << 14)
        .zip(other.par_chunks(1 << 14))
        .for_each(|(values, other)| {
            arch.dispatch(
                #[inline(always)]
                || {
                    for (v, o) in values.iter_mut().zip(other) {
                        *v += o;
                    }
                },
            )
        });
}

/// Multiplies each of `scales.len()` equal parts of `values` by its scale.
pub fn scale_parts(values: &mut [f32], scales: &[f32]) {
    assert!(
        values.len().is_multiple_of(scales.len().max(1)),
        "{} values in {} equal parts",
        values.len(),
        scales.len()
    );
    if scales.is_empty() {
        return;
    }
    let part = values.len() / scales.len();
    let arch = arch();
    values
        .par_chunks_mut(part.max(1))
        .zip(scales.par_iter())
        .for_each(|(values, &scale)| {
            arch.dispatch(
                #[inline(always)]
                || {
                    for v in values.iter_mut() {
                        *v *= scale;
                    }
                },
            )
        });
}

/// Per image, the mean over its `pixels` of `values`
/// (`[images, pixels, features]`): `[images, features]`.
pub fn mean_pool(values: &[f32], pixels: usize, features: usize) -> Vec<f32> {
    let image_len = pixels * features;
    assert!(
        image_len > 0 && values.len().is_multiple_of(image_len),
        "{} values in images of {pixels} x {features}",
        values.len()
    );
    let mut pooled = scratch::zeroed(values.len() / pixels);
    let scale = 1.0 / pixels as f32;
    let arch = arch();
    pooled
        .par_chunks_mut(features)
        .zip(values.par_chunks(image_len))
        .for_each(|(sum, image)| {
            arch.dispatch(
                #[inline(always)]
                || {
                    for pixel in image.chunks_exact(features) {
                        for (s, v) in sum.iter_mut().zip(pixel) {
                            *s += v;
                        }
                    }
                    for s in sum.iter_mut() {
                        *s *= scale;
                    }
                },
            )
        });
    pooled
}

/// The gradient of [`mean_pool`]: each of an image's `pixels` gets its
/// image's row of `pooled_gradient` (`[images, features]`) over `pixels`.
pub fn mean_pool_backward(pooled_gradient: &[f32], pixels: usize, features: usize) -> Vec<f32> {
    // Every element is written below.
    let mut delta = scratch::overwritten(pooled_gradient.len() * pixels);
    let scale = 1.0 / pixels as f32;
    let arch = arch();
    delta
        .par_chunks_mut(pixels * features)
        .zip(pooled_gradient.par_chunks(features))
        .for_each(|(image, upstream)| {
            arch.dispatch(
                #[inline(always)]
                || {
                    for pixel in image.chunks_exact_mut(features) {
                        for (d, u) in pixel.iter_mut().zip(upstream) {
                            *d = u * scale;
                        }
                    }
                },
            )
        });
    delta
}

/// Per image, the maximum over its `pixels` of `values` (`[images, pixels,
/// features]`) and the pixel that holds it (the first, where several do):
/// `[images, features]` each.
pub fn max_pool(values: &[f32], pixels: usize, features: usize) -> (Vec<f32>, Vec<u32>) {
    let image_len = pixels * features;
    assert!(
        image_len > 0 && values.len().is_multiple_of(image_len),
        "{} values in images of {pixels} x {features}",
        values.len()
    );
    assert!(u32::try_from(pixels).is_ok(), "{pixels} pixels");
    let n_images = values.len() / image_len;
    // Every element is written below.
    let mut maxima = scratch::overwritten(n_images * features);
    let mut at = vec![0u32; n_images * features];
    let arch = arch();
    maxima
        .par_chunks_mut(features)
        .zip(at.par_chunks_mut(features))
        .zip(values.par_chunks(image_len))
        .for_each(|((maxima, at), image)| {
            arch.dispatch(
                #[inline(always)]
                || {
                    maxima.copy_from_slice(&image[..features]);
                    at.fill(0);
                    for (pixel, values) in image.chunks_exact(features).enumerate().skip(1) {
                        for ((m, a), &v) in maxima.iter_mut().zip(at.iter_mut()).zip(values) {
                            if v > *m {
                                *m = v;
                                *a = pixel as u32;
                            }
                        }
                    }
                },
            )
        });
    (maxima, at)
}

/// Adds each image's `max_gradient` (`[images, features]`) to `delta`
/// (`[images, pixels, features]`) at the pixel `at` names: the gradient of
/// [`max_pool`].
pub fn max_pool_backward(
    delta: &mut [f32],
    max_gradient: &[f32],
    at: &[u32],
    pixels: usize,
    features: usize,
) {
    assert!(
        max_gradient.len() == at.len()
            && max_gradient.len().is_multiple_of(features.max(1))
            && delta.len() == max_gradient.len() * pixels,
        "{} deltas, {} gradients and {} pixel indices of images of {pixels} x {features}",
        delta.len(),
        max_gradient.len(),
        at.len()
    );
    delta
        .par_chunks_mut(pixels * features)
        .zip(max_gradient.par_chunks(features))
        .zip(at.par_chunks(features))
        .for_each(|((image, gradient), at)| {
            for (feature, (&g, &pixel)) in gradient.iter().zip(at).enumerate() {
                image[pixel as usize * features + feature] += g;
            }
        });
}

/// Zeroes the gradient where ReLU6 was flat (its output at 0 or 6) and
/// where it is subnormal (see [`flush_subnormals`]), in one pass.
pub fn relu6_mask(delta: &mut [f32], output: &[f32]) {
    let arch = arch();
    delta
        .par_chunks_mut(1 << 14)
        .zip(output.par_chunks(1 << 14))
        .for_each(|(delta, output)| {
            arch.dispatch(
                #[inline(always)]
                || {
                    // A select, not a branch, so the loop vectorises.
                    for (d, &y) in delta.iter_mut().zip(output) {
                        let inside = (y > 0.0) & (y < 6.0);
                        *d = if inside & !is_subnormal(*d) { *d } else { 0.0 };
                    }
                },
            )
        });
}

/// Whether `value` is subnormal (nonzero, below f32's smallest normal):
/// `f32::is_subnormal`, written as two compares so the loops that call it
/// stay a vector select (the std method goes through `classify`).
#[inline(always)]
fn is_subnormal(value: f32) -> bool {
    (value.abs() < f32::MIN_POSITIVE) & (value != 0.0)
}

/// Sets every subnormal value of `values` to zero.
///
/// A fine-tuning step's deltas turn subnormal late in a run, where the head
/// is sure of a training image (softmax gradients of 1e-30 and below): x86
/// takes a microcode assist for every vector operation with a subnormal
/// operand (the step's backward pass ran 1.7x slower with deltas of 1e-33,
/// 40x with 1e-38, `cargo bench --bench finetune_blocks` with
/// `LAZARUS_BENCH_DELTA_SCALE`), and the last epochs of a 16-epoch run
/// were 15 % slower than the first. This is what the flush-to-zero and
/// denormals-are-zero flags would do in hardware, which Rust code cannot
/// set soundly; the values are below 1.2e-38, nothing beside a batch's other
/// gradients.
pub fn flush_subnormals(values: &mut [f32]) {
    let arch = arch();
    values.par_chunks_mut(1 << 14).for_each(|values| {
        arch.dispatch(
            #[inline(always)]
            || {
                for v in values.iter_mut() {
                    *v = if is_subnormal(*v) { 0.0 } else { *v };
                }
            },
        )
    });
}

/// The input row and column a tap reads for an output row or column, if
/// inside the map: `output · stride + tap - padding`.
fn source(output: usize, tap: usize, stride: usize, padding: usize, size: usize) -> Option<usize> {
    (output * stride + tap)
        .checked_sub(padding)
        .filter(|&i| i < size)
}

/// The depthwise convolution of `n_images` maps of `size` (`input`:
/// `[n_images, height, width, channels]`), with its bias and ReLU6; returns
/// the output and its size.
pub fn depthwise_forward(
    conv: DepthwiseKernel,
    input: &[f32],
    n_images: usize,
    size: MapSize,
) -> (Vec<f32>, MapSize) {
    let (k, s, c) = (conv.kernel, conv.stride, conv.channels);
    let out_size = MapSize {
        height: size.height.div_ceil(s),
        width: size.width.div_ceil(s),
    };
    let padding = (
        same_padding(size.height, k, s).0,
        same_padding(size.width, k, s).0,
    );
    let arch = arch();
    // Every output starts from its bias (`DepthwiseForwardRow`).
    let mut output = scratch::overwritten(n_images * out_size.pixels() * c);
    output
        .par_chunks_mut(out_size.width * c)
        .enumerate()
        .for_each(|(row, out_row)| {
            let image = row / out_size.height;
            arch.dispatch(DepthwiseForwardRow {
                conv,
                image_input: &input[image * size.pixels() * c..][..size.pixels() * c],
                size,
                padding,
                oy: row % out_size.height,
                out_row,
            })
        });
    (output, out_size)
}

/// One output row of [`depthwise_forward`]. The loops run inside
/// `with_simd` (not a closure, which the compiler kept out of line, in SSE).
struct DepthwiseForwardRow<'a> {
    conv: DepthwiseKernel<'a>,
    /// The image's input map, `[height, width, channels]`.
    image_input: &'a [f32],
    size: MapSize,
    /// Top and left padding.
    padding: (usize, usize),
    oy: usize,
    out_row: &'a mut [f32],
}

impl WithSimd for DepthwiseForwardRow<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, _simd: S) {
        let DepthwiseForwardRow {
            conv,
            image_input,
            size,
            padding: (top, left),
            oy,
            out_row,
        } = self;
        let (k, s, c) = (conv.kernel, conv.stride, conv.channels);
        for (ox, out) in out_row.chunks_exact_mut(c).enumerate() {
            out.copy_from_slice(conv.bias);
            for dy in 0..k {
                let Some(iy) = source(oy, dy, s, top, size.height) else {
                    continue;
                };
                for dx in 0..k {
                    let Some(ix) = source(ox, dx, s, left, size.width) else {
                        continue;
                    };
                    let x = &image_input[(iy * size.width + ix) * c..][..c];
                    let w = &conv.weight[(dy * k + dx) * c..][..c];
                    for ((o, x), w) in out.iter_mut().zip(x).zip(w) {
                        *o += x * w;
                    }
                }
            }
            if conv.relu6 {
                for o in out.iter_mut() {
                    *o = o.clamp(0.0, 6.0);
                }
            }
        }
    }
}

/// Adds the depthwise weight and bias gradients, given d loss / d output
/// (`delta`, activation already undone); returns d loss / d input when
/// wanted.
pub fn depthwise_backward(
    conv: DepthwiseKernel,
    trace: DepthwiseTrace,
    delta: &[f32],
    (weight_gradient, bias_gradient): (&mut [f32], &mut [f32]),
    wanted: Wanted,
) -> Option<Vec<f32>> {
    let (k, s, c) = (conv.kernel, conv.stride, conv.channels);
    let DepthwiseTrace {
        input,
        n_images,
        size,
        output_size,
    } = trace;
    let padding = (
        same_padding(size.height, k, s).0,
        same_padding(size.width, k, s).0,
    );
    let in_image = size.pixels() * c;
    let out_image = output_size.pixels() * c;
    let arch = arch();
    // Per image: [kernel² + 1, c], the weight gradient's taps then the bias's.
    let partials: Vec<Vec<f32>> = (0..n_images)
        .into_par_iter()
        .map(|image| {
            arch.dispatch(DepthwiseParameterGradient {
                conv,
                image_input: &input[image * in_image..][..in_image],
                image_delta: &delta[image * out_image..][..out_image],
                size,
                output_size,
                padding,
            })
        })
        .collect();
    // Each value adds its images' partials in image order, stretches of
    // values on the pool.
    let add_partials = |gradient: &mut [f32], offset: usize| {
        gradient
            .par_chunks_mut(PARTIAL_VALUES)
            .enumerate()
            .for_each(|(index, gradient)| {
                let at = offset + index * PARTIAL_VALUES;
                for partial in &partials {
                    for (g, p) in gradient.iter_mut().zip(&partial[at..]) {
                        *g += p;
                    }
                }
            })
    };
    add_partials(weight_gradient, 0);
    add_partials(bias_gradient, k * k * c);
    (wanted == Wanted::Yes).then(|| {
        // Gathered per input row: every output a tap of which read this
        // pixel. Each row is zeroed by its own task, on the pool.
        let mut below = scratch::overwritten(n_images * in_image);
        below
            .par_chunks_mut(size.width * c)
            .enumerate()
            .for_each(|(row, below_row)| {
                let image = row / size.height;
                arch.dispatch(DepthwiseInputGradientRow {
                    conv,
                    image_delta: &delta[image * out_image..][..out_image],
                    output_size,
                    padding,
                    iy: row % size.height,
                    below_row,
                })
            });
        below
    })
}

/// One image's weight and bias gradient of [`depthwise_backward`]:
/// `[kernel² + 1, channels]`.
struct DepthwiseParameterGradient<'a> {
    conv: DepthwiseKernel<'a>,
    image_input: &'a [f32],
    image_delta: &'a [f32],
    size: MapSize,
    output_size: MapSize,
    padding: (usize, usize),
}

impl WithSimd for DepthwiseParameterGradient<'_> {
    type Output = Vec<f32>;

    #[inline(always)]
    fn with_simd<S: Simd>(self, _simd: S) -> Vec<f32> {
        let DepthwiseParameterGradient {
            conv,
            image_input,
            image_delta,
            size,
            output_size,
            padding: (top, left),
        } = self;
        let (k, s, c) = (conv.kernel, conv.stride, conv.channels);
        let mut partial = vec![0f32; (k * k + 1) * c];
        for oy in 0..output_size.height {
            for ox in 0..output_size.width {
                let d = &image_delta[(oy * output_size.width + ox) * c..][..c];
                for (g, d) in partial[k * k * c..].iter_mut().zip(d) {
                    *g += d;
                }
                for dy in 0..k {
                    let Some(iy) = source(oy, dy, s, top, size.height) else {
                        continue;
                    };
                    for dx in 0..k {
                        let Some(ix) = source(ox, dx, s, left, size.width) else {
                            continue;
                        };
                        let x = &image_input[(iy * size.width + ix) * c..][..c];
                        let g = &mut partial[(dy * k + dx) * c..][..c];
                        for ((g, x), d) in g.iter_mut().zip(x).zip(d) {
                            *g += x * d;
                        }
                    }
                }
            }
        }
        partial
    }
}

/// One input row of [`depthwise_backward`]'s d loss / d input.
struct DepthwiseInputGradientRow<'a> {
    conv: DepthwiseKernel<'a>,
    image_delta: &'a [f32],
    output_size: MapSize,
    padding: (usize, usize),
    iy: usize,
    below_row: &'a mut [f32],
}

impl WithSimd for DepthwiseInputGradientRow<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, _simd: S) {
        let DepthwiseInputGradientRow {
            conv,
            image_delta,
            output_size,
            padding: (top, left),
            iy,
            below_row,
        } = self;
        below_row.fill(0.0);
        let (k, s, c) = (conv.kernel, conv.stride, conv.channels);
        for dy in 0..k {
            // oy · s + dy - top = iy
            let Some(oy) = (iy + top).checked_sub(dy) else {
                continue;
            };
            if oy % s != 0 || oy / s >= output_size.height {
                continue;
            }
            let oy = oy / s;
            for (ix, b) in below_row.chunks_exact_mut(c).enumerate() {
                for dx in 0..k {
                    let Some(ox) = (ix + left).checked_sub(dx) else {
                        continue;
                    };
                    if ox % s != 0 || ox / s >= output_size.width {
                        continue;
                    }
                    let ox = ox / s;
                    let d = &image_delta[(oy * output_size.width + ox) * c..][..c];
                    let w = &conv.weight[(dy * k + dx) * c..][..c];
                    for ((b, d), w) in b.iter_mut().zip(d).zip(w) {
                        *b += d * w;
                    }
                }
            }
        }
    }
}

/// One AdamW update of a parameter slice (decoupled weight decay, bias
/// correction for the `updates`-th update), shared by the heads' step and
/// the fine-tuned blocks' (`lazarus::train`'s host step and blocks
/// optimiser), following candle's AdamW.
#[derive(Debug, Clone, Copy)]
pub struct AdamWStep {
    beta1: f32,
    beta2: f32,
    eps: f32,
    correction1: f32,
    correction2: f32,
    decay: f32,
    lr: f32,
    /// Multiplies every gradient first (loss-scale removal, clipping).
    scale: f32,
}

impl AdamWStep {
    pub fn new(lr: f64, weight_decay: f64, updates: i32, scale: f32) -> Self {
        let (beta1, beta2) = (0.9f64, 0.999f64);
        AdamWStep {
            beta1: beta1 as f32,
            beta2: beta2 as f32,
            eps: 1e-8,
            correction1: (1.0 - beta1.powi(updates)) as f32,
            correction2: (1.0 - beta2.powi(updates)) as f32,
            decay: (1.0 - lr * weight_decay) as f32,
            lr: lr as f32,
            scale,
        }
    }

    pub fn apply(
        self,
        weights: &mut [f32],
        gradients: &[f32],
        first_moments: &mut [f32],
        second_moments: &mut [f32],
    ) {
        arch().dispatch(
            #[inline(always)]
            || {
                for (((w, &g), m), v) in weights
                    .iter_mut()
                    .zip(gradients)
                    .zip(first_moments.iter_mut())
                    .zip(second_moments.iter_mut())
                {
                    let g = g * self.scale;
                    *m = *m * self.beta1 + g * (1.0 - self.beta1);
                    *v = *v * self.beta2 + g * g * (1.0 - self.beta2);
                    let m_hat = *m / self.correction1;
                    let v_hat = *v / self.correction2;
                    *w = *w * self.decay - self.lr * (m_hat / (v_hat.sqrt() + self.eps));
                }
            },
        )
    }
}

/// `Σ (v · scale)²` over `values`, summed in f32 (the heads' gradient norm).
pub fn scaled_norm_sq_f32(values: &[f32], scale: f32) -> f32 {
    values.iter().map(|v| (v * scale) * (v * scale)).sum()
}

/// `Σ (v · scale)²` over `values`, each term and the sum in f64 (the
/// fine-tuned blocks' gradient norm).
pub fn scaled_norm_sq_f64(values: &[f32], scale: f32) -> f64 {
    values
        .iter()
        .map(|v| f64::from(v * scale) * f64::from(v * scale))
        .sum()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnormal_deltas_become_zero_and_nothing_else_changes() {
        let tiny = f32::MIN_POSITIVE / 4.0;
        assert!(tiny.is_subnormal());
        let values = [
            tiny,
            -tiny,
            f32::MIN_POSITIVE,
            -f32::MIN_POSITIVE,
            1e-30,
            0.0,
            -0.0,
            2.5,
            f32::INFINITY,
        ];
        // Long enough for several tasks and vector tails.
        let many: Vec<f32> = values.iter().copied().cycle().take(40_003).collect();
        let mut flushed = many.clone();
        flush_subnormals(&mut flushed);
        for (before, after) in many.iter().zip(&flushed) {
            let expected = if before.is_subnormal() { 0.0 } else { *before };
            assert_eq!(after.to_bits(), expected.to_bits(), "{before}");
        }
        // The mask: inside ReLU6's linear part only normal deltas survive.
        let outputs: Vec<f32> = (0..many.len()).map(|i| [3.0, 0.0, 6.0][i % 3]).collect();
        let mut masked = many.clone();
        relu6_mask(&mut masked, &outputs);
        for ((before, after), output) in many.iter().zip(&masked).zip(&outputs) {
            let inside = *output == 3.0;
            let expected = if inside && !before.is_subnormal() {
                *before
            } else {
                0.0
            };
            assert_eq!(after.to_bits(), expected.to_bits(), "{before} at {output}");
        }
    }

    #[test]
    fn max_pool_finds_each_channels_first_maximum_and_sends_its_gradient_there() {
        // 2 images of 3 pixels x 2 features, by hand: image 0's feature 1
        // peaks twice (pixels 0 and 2: the first is kept).
        let values = [
            1.0, 5.0, /* pixel 1 */ 4.0, -1.0, /* pixel 2 */ 2.0, 5.0, //
            -3.0, -2.0, /* pixel 1 */ -4.0, 0.5, /* pixel 2 */ -1.0, 0.25,
        ];
        let (maxima, at) = max_pool(&values, 3, 2);
        assert_eq!(maxima, [4.0, 5.0, -1.0, 0.5]);
        assert_eq!(at, [1, 0, 2, 1]);
        let mut delta = vec![1.0f32; values.len()];
        max_pool_backward(&mut delta, &[10.0, 20.0, 30.0, 40.0], &at, 3, 2);
        assert_eq!(
            delta,
            [
                1.0, 21.0, 11.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 41.0, 31.0, 1.0
            ]
        );
        // Many images on the pool: each image's answer is its own.
        let n_images = 37;
        let (pixels, features) = (49, 16);
        let many: Vec<f32> = (0..n_images * pixels * features)
            .map(|i| ((i * 7919) % 1009) as f32 - 500.0)
            .collect();
        let (maxima, at) = max_pool(&many, pixels, features);
        for image in 0..n_images {
            for feature in 0..features {
                let value = |pixel: usize| many[(image * pixels + pixel) * features + feature];
                let best =
                    (0..pixels).fold(0, |best, p| if value(p) > value(best) { p } else { best });
                assert_eq!(at[image * features + feature] as usize, best);
                assert_eq!(maxima[image * features + feature], value(best));
            }
        }
    }
}

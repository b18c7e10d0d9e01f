//! Depthwise k×k convolution, stride 1 or 2, TF "same" padding, bias and
//! ReLU6 fused, on channel blocks (`[c / lanes][pixels][lanes]`: each block
//! of one vector's channels is a plane of contiguous pixel vectors).
//!
//! Each output row reads the `k` input rows of its windows (those inside the
//! image; rows above and below it are zero padding and skipped) from a ring
//! of rows that carry their left and right zero padding, so every output has
//! all its columns. Up to 8 neighbouring outputs of one channel block are
//! accumulated in registers at once, in loops of constant length: each
//! kernel row's `k` weights are loaded once per block and the inputs go
//! straight from L1 into the FMAs.

use pulp::{Simd, WithSimd};

/// A folded depthwise convolution, packed for one vector width.
#[derive(Debug, Clone)]
pub struct DepthwiseWeights {
    /// `[channels / lanes][kernel²][lanes]`: a channel block's taps together.
    weight: Vec<f32>,
    /// `[channels]`.
    bias: Vec<f32>,
    pub kernel: usize,
    pub stride: usize,
    pub relu6: bool,
    lanes: usize,
}

impl DepthwiseWeights {
    /// `weight`: `[kernel², channels]`, tap-major; `bias`: `[channels]`;
    /// `channels` a whole number of `lanes`.
    pub fn new(
        weight: &[f32],
        bias: &[f32],
        (kernel, stride): (usize, usize),
        relu6: bool,
        lanes: usize,
    ) -> Self {
        let channels = bias.len();
        let taps = kernel * kernel;
        assert_eq!(
            weight.len(),
            taps * channels,
            "depthwise weight is not [k², c]"
        );
        assert!(
            channels.is_multiple_of(lanes),
            "{channels} channels in vectors of {lanes}"
        );
        let mut packed = Vec::with_capacity(weight.len());
        for block in 0..channels / lanes {
            for tap in 0..taps {
                let at = tap * channels + block * lanes;
                packed.extend_from_slice(&weight[at..at + lanes]);
            }
        }
        Self {
            weight: packed,
            bias: bias.to_vec(),
            kernel,
            stride,
            relu6,
            lanes,
        }
    }

    pub fn channels(&self) -> usize {
        self.bias.len()
    }
}

/// The largest kernel the kernels take.
pub const MAX_KERNEL: usize = 7;

/// Output rows of one band, run under `pulp`'s dispatch.
pub struct DepthwiseRows<'a> {
    pub op: &'a DepthwiseWeights,
    /// `[c / lanes][capacity · padded width][lanes]`: input row `y` at slot
    /// `y % capacity`, with the left padding's zero columns before it and
    /// the right padding's after it.
    pub ring: &'a [f32],
    pub capacity: usize,
    /// Input height and padded width (pixels).
    pub size: (usize, usize),
    /// Top padding (rows) of TF "same" padding.
    pub top: usize,
    /// Image row of the band's first output row.
    pub first_row: usize,
    /// `[c / lanes][band rows · out width][lanes]`.
    pub output: &'a mut [f32],
}

impl WithSimd for DepthwiseRows<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) {
        let DepthwiseRows {
            op,
            ring,
            capacity,
            size: (height, padded_width),
            top,
            first_row,
            output,
        } = self;
        let lanes = S::F32_LANES;
        assert_eq!(op.lanes, lanes, "weights packed for another vector width");
        let (k, s) = (op.kernel, op.stride);
        assert!(k <= MAX_KERNEL, "depthwise kernel {k} above {MAX_KERNEL}");
        let blocks = op.channels() / lanes;
        let out_w = (padded_width - k) / s + 1;
        let plane_in = capacity * padded_width;
        let ring = S::as_simd_f32s(&ring[..blocks * plane_in * lanes]).0;
        let output = S::as_mut_simd_f32s(output).0;
        assert!(output.len().is_multiple_of(blocks * out_w));
        let plane_out = output.len() / blocks;
        let weights = S::as_simd_f32s(&op.weight).0;
        let bias = S::as_simd_f32s(&op.bias).0;
        for (block, out_plane) in output.chunks_exact_mut(plane_out).enumerate() {
            let in_plane = &ring[block * plane_in..][..plane_in];
            let taps = &weights[block * k * k..][..k * k];
            for (i, out_row) in out_plane.chunks_exact_mut(out_w).enumerate() {
                let mut rows: [(usize, &[S::f32s]); MAX_KERNEL] = [(0, &[]); MAX_KERNEL];
                let mut count = 0;
                for ky in 0..k {
                    let y = ((first_row + i) * s + ky) as isize - top as isize;
                    if (0..height as isize).contains(&y) {
                        let slot = y as usize % capacity;
                        rows[count] = (ky, &in_plane[slot * padded_width..][..padded_width]);
                        count += 1;
                    }
                }
                let row = Row {
                    taps,
                    bias: bias[block],
                    rows: &rows[..count],
                    relu6: op.relu6,
                };
                match (k, s) {
                    (3, 1) => row.run::<S, 3, 1>(simd, out_row),
                    (3, 2) => row.run::<S, 3, 2>(simd, out_row),
                    (5, 1) => row.run::<S, 5, 1>(simd, out_row),
                    (5, 2) => row.run::<S, 5, 2>(simd, out_row),
                    _ => row.any_kernel(simd, k, s, out_row),
                }
            }
        }
    }
}

/// One output row of one channel block.
struct Row<'r, V> {
    /// `[k²]` tap vectors.
    taps: &'r [V],
    bias: V,
    /// `(ky, padded input row)` for every kernel row inside the image.
    rows: &'r [(usize, &'r [V])],
    relu6: bool,
}

impl<V: Copy> Row<'_, V> {
    /// Blocks of 8 outputs, then one block of the rest.
    #[inline(always)]
    fn run<S: Simd<f32s = V>, const K: usize, const STRIDE: usize>(&self, simd: S, out: &mut [V]) {
        let mut chunks = out.chunks_exact_mut(8);
        let mut column = 0;
        for out in &mut chunks {
            self.block::<S, K, STRIDE, 8>(simd, column, out);
            column += 8 * STRIDE;
        }
        let rest = chunks.into_remainder();
        match rest.len() {
            0 => {}
            1 => self.block::<S, K, STRIDE, 1>(simd, column, rest),
            2 => self.block::<S, K, STRIDE, 2>(simd, column, rest),
            3 => self.block::<S, K, STRIDE, 3>(simd, column, rest),
            4 => self.block::<S, K, STRIDE, 4>(simd, column, rest),
            5 => self.block::<S, K, STRIDE, 5>(simd, column, rest),
            6 => self.block::<S, K, STRIDE, 6>(simd, column, rest),
            _ => self.block::<S, K, STRIDE, 7>(simd, column, rest),
        }
    }

    /// `P` neighbouring outputs, the first reading input column `column`:
    /// output `p` reads columns `column + p · STRIDE + kx`.
    #[inline(always)]
    fn block<S: Simd<f32s = V>, const K: usize, const STRIDE: usize, const P: usize>(
        &self,
        simd: S,
        column: usize,
        out: &mut [V],
    ) {
        let mut acc = [self.bias; P];
        let span = (P - 1) * STRIDE + K;
        for &(ky, row) in self.rows {
            let taps: &[V; K] = self.taps[ky * K..][..K].try_into().expect("K taps");
            let window = &row[column..][..span];
            for kx in 0..K {
                for p in 0..P {
                    acc[p] = simd.mul_add_e_f32s(taps[kx], window[p * STRIDE + kx], acc[p]);
                }
            }
        }
        let out = &mut out[..P];
        for p in 0..P {
            out[p] = finish(simd, self.relu6, acc[p]);
        }
    }

    /// Other kernel sizes and strides: one output at a time.
    fn any_kernel<S: Simd<f32s = V>>(&self, simd: S, k: usize, s: usize, out: &mut [V]) {
        for (x, out) in out.iter_mut().enumerate() {
            let mut acc = self.bias;
            for &(ky, row) in self.rows {
                for kx in 0..k {
                    acc = simd.mul_add_e_f32s(self.taps[ky * k + kx], row[x * s + kx], acc);
                }
            }
            *out = finish(simd, self.relu6, acc);
        }
    }
}

/// Bias already in: an optional ReLU6.
#[inline(always)]
fn finish<S: Simd>(simd: S, relu6: bool, value: S::f32s) -> S::f32s {
    if relu6 {
        simd.min_f32s(
            simd.max_f32s(value, simd.splat_f32s(0.0)),
            simd.splat_f32s(6.0),
        )
    } else {
        value
    }
}

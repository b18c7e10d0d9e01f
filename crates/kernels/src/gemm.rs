//! 1×1 convolutions: `out[pixel, n] = bias[n] + Σ_k in[pixel, k] · w[n, k]`
//! over a run of pixels, with an optional ReLU6 or residual add.
//!
//! The weights are packed once, at load, into panels of whole vectors of
//! output channels (`[k][panel width]`, zero-padded to whole vectors), so the
//! inner loop reads one contiguous stream. A register tile of `MR` pixels ×
//! `NV` vectors is accumulated over all of `k` (activations broadcast from
//! where they lie; on AVX-512 the broadcast folds into the FMA), then finished
//! in registers (the bias was its starting value; ReLU6 or the residual) and
//! stored once: no zero fill, no second pass over the output.
//!
//! Activations come and go in two layouts: rows of pixels (NHWC, `[pixels, c]`)
//! and channel blocks (`[c / lanes][pixels][lanes]`, what the depthwise
//! kernel reads and writes: each block of one vector's channels is a plane of
//! contiguous pixels).

use pulp::{Simd, WithSimd};
use rayon::prelude::*;

/// Packed sizes (floats) from which an input-major matrix is packed on the
/// rayon pool, and the values of `k` per task there.
const PARALLEL_PACK_FLOATS: usize = 1 << 19;
const PACK_ROWS: usize = 512;

/// Output channels of one panel: `vectors` whole vectors from `first`, of which
/// the first `width` channels are real (the rest are zero weights).
#[derive(Debug, Clone)]
struct Panel {
    first: usize,
    width: usize,
    vectors: usize,
    /// Offset of the panel's `[k][vectors · lanes]` weights.
    weights_at: usize,
    /// Offset of the panel's `vectors · lanes` biases.
    bias_at: usize,
}

/// What happens to the tile before its store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    None,
    Relu6,
}

/// A 1×1 convolution's weights and bias, packed for one vector width.
#[derive(Debug, Clone)]
pub struct PackedPointwise {
    /// Input channels.
    pub k: usize,
    /// Output channels.
    pub n: usize,
    pub activation: Activation,
    lanes: usize,
    panels: Vec<Panel>,
    weights: Vec<f32>,
    bias: Vec<f32>,
}

/// Register tile rows for a panel of `vectors` vectors of `lanes` floats:
/// AVX-512 (and any 16-lane unit) has 32 registers, AVX2 16. The tile plus
/// one row of weight vectors and a broadcast fill the register file.
fn panel_tile_rows(lanes: usize, vectors: usize) -> usize {
    match (lanes >= 16, vectors) {
        (true, 3) => 8,
        (true, _) => 12,
        (false, 2) => 6,
        (false, _) => 8,
    }
}

/// Vectors per panel: three on AVX-512 (8×3 tiles), two with 16 registers
/// (6×2 tiles: a 4×3 tile needs all 16 and spills one).
fn panel_vectors(lanes: usize) -> usize {
    if lanes >= 16 { 3 } else { 2 }
}

/// Output channels of a full panel.
pub(crate) fn panel_width(lanes: usize) -> usize {
    panel_vectors(lanes) * lanes
}

/// Rows of the register tile of a full panel.
pub(crate) fn tile_rows(lanes: usize) -> usize {
    panel_tile_rows(lanes, panel_vectors(lanes))
}

impl PackedPointwise {
    /// `weight`: [n, k] (output-major, as a 1×1 convolution's weight);
    /// `bias`: [n]. Panels are [`panel_vectors`] wide; the last one takes
    /// the remainder (whole vectors, the last possibly part-filled).
    pub fn new(
        weight: &[f32],
        bias: &[f32],
        k: usize,
        n: usize,
        activation: Activation,
        lanes: usize,
    ) -> Self {
        assert_eq!(bias.len(), n, "pointwise bias is not [n]");
        let mut packed = Self::from_matrix(weight, WeightLayout::OutputMajor, k, n, 0..n, lanes);
        packed.activation = activation;
        for panel in &packed.panels {
            let bias = &bias[panel.first..][..panel.width];
            packed.bias[panel.bias_at..][..panel.width].copy_from_slice(bias);
        }
        packed
    }

    /// The `columns` of a `[k, n]` right-hand side of a matrix product
    /// (`weight` laid out as `layout` says), packed with a zero bias and no
    /// activation: a product with `columns.len()` outputs.
    pub fn from_matrix(
        weight: &[f32],
        layout: WeightLayout,
        k: usize,
        n: usize,
        columns: std::ops::Range<usize>,
        lanes: usize,
    ) -> Self {
        assert_eq!(weight.len(), n * k, "pointwise weight is not {n} x {k}");
        assert!(columns.end <= n, "columns {columns:?} of {n}");
        let (offset, total) = (columns.start, n);
        let n = columns.len();
        let full = panel_width(lanes);
        let mut panels = Vec::new();
        let (mut first, mut packed_len) = (0, 0);
        while first < n {
            let width = full.min(n - first);
            let vectors = width.div_ceil(lanes);
            panels.push(Panel {
                first,
                width,
                vectors,
                weights_at: packed_len,
                // Every panel but the last is `full` wide.
                bias_at: first,
            });
            packed_len += k * vectors * lanes;
            first += width;
        }
        // Every value is written below (zeros where a part-filled vector
        // pads a panel): a pooled buffer, as products pack every step.
        let mut packed = crate::scratch::overwritten(packed_len);
        let mut parts = Vec::with_capacity(panels.len());
        let mut rest = packed.as_mut_slice();
        for panel in &panels {
            let (part, tail) = rest.split_at_mut(k * panel.vectors * lanes);
            parts.push((panel, part));
            rest = tail;
        }
        let fill = |panel: &Panel, first_k: usize, part: &mut [f32]| {
            let stride = panel.vectors * lanes;
            let columns = offset + panel.first..offset + panel.first + panel.width;
            for (kk, row) in (first_k..).zip(part.chunks_exact_mut(stride)) {
                let (row, padding) = row.split_at_mut(panel.width);
                padding.fill(0.0);
                match layout {
                    WeightLayout::OutputMajor => {
                        for (value, column) in row.iter_mut().zip(columns.clone()) {
                            *value = weight[column * k + kk];
                        }
                    }
                    WeightLayout::InputMajor => {
                        row.copy_from_slice(&weight[kk * total + columns.start..][..panel.width])
                    }
                }
            }
        };
        if layout == WeightLayout::OutputMajor || packed_len < PARALLEL_PACK_FLOATS {
            for (panel, part) in parts {
                fill(panel, 0, part);
            }
        } else {
            // A weight gradient packs a whole batch's deltas or activations
            // (MBs, rows of `k` copied whole): stretches of `k` of every
            // panel on the pool. Weights (a few hundred KB, gathered
            // across rows) measured faster on one thread.
            parts.into_par_iter().for_each(|(panel, part)| {
                let stride = panel.vectors * lanes;
                part.par_chunks_mut(PACK_ROWS * stride)
                    .enumerate()
                    .for_each(|(index, rows)| fill(panel, index * PACK_ROWS, rows));
            });
        }
        let bias_len = panels
            .last()
            .map_or(0, |panel| panel.bias_at + panel.vectors * lanes);
        Self {
            k,
            n,
            activation: Activation::None,
            lanes,
            panels,
            weights: packed,
            bias: vec![0.0; bias_len],
        }
    }

    /// Gives the packed weights to the scratch pool (a product's packing,
    /// done with).
    pub(crate) fn recycle(self) {
        crate::scratch::recycle(self.weights);
    }
}

/// How a pointwise weight lies in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightLayout {
    /// `[n, k]`: output-major, as a 1×1 convolution's or a linear layer's weight.
    OutputMajor,
    /// `[k, n]`: input-major, the right-hand side of a plain row-major product.
    InputMajor,
}

/// The activations a pointwise convolution reads.
#[derive(Debug, Clone, Copy)]
pub enum PointwiseInput<'a> {
    /// `[pixels, k]`, row-major (NHWC).
    Rows(&'a [f32]),
    /// `[k / lanes][pixels][lanes]`: channel blocks; `k` is whole vectors.
    Blocks(&'a [f32]),
    /// `[k, stride]` row-major, pixel `p`'s value `kk` at `kk · stride +
    /// first + p`: the left-hand side of a product stored as its transpose
    /// (a weight gradient's deltas), read where it lies instead of copied.
    Columns {
        values: &'a [f32],
        stride: usize,
        first: usize,
    },
}

/// Values of `k` per pass over a panel when `k` is longer than `LONG_K` (a
/// weight gradient sums over every pixel of a batch): the panel's `K_CHUNK
/// × 3` vectors (24 KB on AVX-512) stay in L1 while every register tile of
/// the band passes over them, and the tiles keep their running sums in the
/// output between passes. The sums' order does not change (one sum over `k`
/// in order, from the bias), so neither does a bit of the result. Measured
/// on the fine-tuned blocks' products (`cargo bench -p lazarus-kernels --bench products`):
/// 128 against 96 and 192, `LONG_K` 1024 against 256, 512 and 2048.
const K_CHUNK: usize = 128;
const LONG_K: usize = 1024;

/// Where a pointwise convolution writes.
#[derive(Debug)]
pub enum PointwiseOutput<'a> {
    /// `[pixels, n]`, row-major, plus `residual` (same shape) when given.
    Rows {
        values: &'a mut [f32],
        residual: Option<&'a [f32]>,
    },
    /// Channel blocks of `plane` pixels each, the pixels in rows of `width`
    /// that lie `row_stride` apart: channel vector `v` of output pixel `p` at
    /// vector `v · plane + first + (p / width) · row_stride + p % width`.
    /// `n` is whole vectors.
    Blocks {
        values: &'a mut [f32],
        plane: usize,
        first: usize,
        width: usize,
        row_stride: usize,
    },
}

/// One pointwise convolution over `pixels` pixels, run under `pulp`'s dispatch.
pub struct Pointwise<'a> {
    pub op: &'a PackedPointwise,
    pub pixels: usize,
    pub input: PointwiseInput<'a>,
    pub output: PointwiseOutput<'a>,
}

impl WithSimd for Pointwise<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) {
        let Pointwise {
            op,
            pixels,
            input,
            mut output,
        } = self;
        let lanes = S::F32_LANES;
        assert_eq!(op.lanes, lanes, "weights packed for another vector width");
        let (k, n) = (op.k, op.n);
        match input {
            PointwiseInput::Rows(values) => assert_eq!(values.len(), pixels * k),
            PointwiseInput::Blocks(values) => {
                assert!(k.is_multiple_of(lanes) && values.len() == pixels * k)
            }
            PointwiseInput::Columns {
                values,
                stride,
                first,
            } => assert!(values.len() == k * stride && first + pixels <= stride),
        }
        match &output {
            PointwiseOutput::Rows { values, residual } => {
                assert_eq!(values.len(), pixels * n);
                assert!(residual.is_none_or(|r| r.len() == pixels * n));
            }
            PointwiseOutput::Blocks {
                values,
                plane,
                first,
                width,
                row_stride,
            } => {
                let last = first + (pixels.max(1) - 1) / width * row_stride + width;
                assert!(
                    n.is_multiple_of(lanes)
                        && width <= row_stride
                        && last <= *plane
                        && values.len() >= (n / lanes) * plane * lanes
                )
            }
        }
        // Passes over `k` in chunks where the running sums can wait in a
        // row-major output; channel blocks (the encoder's short `k`) in one.
        let chunked = matches!(output, PointwiseOutput::Rows { .. })
            && !matches!(input, PointwiseInput::Blocks(_));
        let chunk = if chunked && k > LONG_K {
            K_CHUNK
        } else {
            k.max(1)
        };
        // Each pass over `k` goes through every panel, so the pass's stretch
        // of the input is read from memory once.
        let mut start = 0;
        loop {
            let end = (start + chunk).min(k);
            for panel in &op.panels {
                let stride = panel.vectors * lanes;
                let weights = S::as_simd_f32s(&op.weights[panel.weights_at..][..k * stride]).0;
                let bias = S::as_simd_f32s(&op.bias[panel.bias_at..][..stride]).0;
                let vectors = panel.vectors;
                let mut run = PanelRun {
                    input,
                    pixels,
                    k,
                    weights,
                    bias,
                    output: &mut output,
                    n,
                    first: panel.first,
                    width: panel.width,
                    relu6: op.activation == Activation::Relu6,
                    position: (0, 0),
                    chunk: start..end,
                };
                match (panel_tile_rows(lanes, vectors), vectors) {
                    (8, 3) => run.run::<S, 8, 3>(simd),
                    (12, 2) => run.run::<S, 12, 2>(simd),
                    (6, 2) => run.run::<S, 6, 2>(simd),
                    (12, 1) => run.run::<S, 12, 1>(simd),
                    (8, 1) => run.run::<S, 8, 1>(simd),
                    shape => unreachable!("no register tile for {shape:?}"),
                }
            }
            start = end;
            if start >= k {
                break;
            }
        }
    }
}

/// One panel of output channels over all pixels.
struct PanelRun<'a, 'o, V> {
    input: PointwiseInput<'a>,
    pixels: usize,
    k: usize,
    /// [k][NV] vectors.
    weights: &'a [V],
    /// [NV] vectors.
    bias: &'a [V],
    output: &'o mut PointwiseOutput<'a>,
    n: usize,
    first: usize,
    width: usize,
    relu6: bool,
    /// (row, column) of the next tile's first pixel in `Blocks` output rows.
    position: (usize, usize),
    /// The values of `k` this pass sums: the first pass starts from the
    /// bias, later ones from the running sums in `output`; only the last
    /// adds the residual and applies ReLU6.
    chunk: std::ops::Range<usize>,
}

impl<V: Copy> PanelRun<'_, '_, V> {
    /// Tiles of `MR` pixels, then the rest in tiles of 8, 4, 2 and 1.
    #[inline(always)]
    fn run<S: Simd<f32s = V>, const MR: usize, const NV: usize>(&mut self, simd: S) {
        let pixels = self.pixels;
        let mut row = 0;
        while row + MR <= pixels {
            self.tile::<S, MR, NV>(simd, row);
            row += MR;
        }
        if MR > 8 && pixels - row >= 8 {
            self.tile::<S, 8, NV>(simd, row);
            row += 8;
        }
        if MR > 4 && pixels - row >= 4 {
            self.tile::<S, 4, NV>(simd, row);
            row += 4;
        }
        if MR > 2 && pixels - row >= 2 {
            self.tile::<S, 2, NV>(simd, row);
            row += 2;
        }
        if MR > 1 && pixels - row >= 1 {
            self.tile::<S, 1, NV>(simd, row);
        }
    }

    /// Pixels `row..row + MR` of this panel.
    #[inline(always)]
    fn tile<S: Simd<f32s = V>, const MR: usize, const NV: usize>(&mut self, simd: S, row: usize) {
        let acc = self.accumulate::<S, MR, NV>(simd, row);
        self.store::<S, MR, NV>(simd, row, acc);
        if let PointwiseOutput::Blocks { width, .. } = self.output {
            let (mut y, mut x) = self.position;
            x += MR;
            while x >= *width {
                x -= *width;
                y += 1;
            }
            self.position = (y, x);
        }
    }

    /// The tile's sums over all of `k`, from the bias.
    ///
    /// `acc` is only ever indexed by constants (its loops unroll), so it
    /// lives in registers; the store's loops may stay rolled and index the
    /// returned copy at run time, which would otherwise put `acc` on the
    /// stack and store it at every FMA.
    #[inline(always)]
    fn accumulate<S: Simd<f32s = V>, const MR: usize, const NV: usize>(
        &self,
        simd: S,
        row: usize,
    ) -> [[V; NV]; MR] {
        let acc = match self.input {
            PointwiseInput::Rows(values) => self.accumulate_rows::<S, MR, NV>(simd, values, row),
            PointwiseInput::Columns {
                values,
                stride,
                first,
            } => self.accumulate_columns::<S, MR, NV>(simd, (values, stride, first), row),
            PointwiseInput::Blocks(values) => {
                self.accumulate_blocks::<S, MR, NV>(simd, values, row)
            }
        };
        let mut tile = [[simd.splat_f32s(0.0); NV]; MR];
        for r in 0..MR {
            for j in 0..NV {
                tile[r][j] = acc[r][j];
            }
        }
        tile
    }

    /// The tile's running sums before this pass: the bias, or what the
    /// previous pass over `k` left in the output.
    #[inline(always)]
    fn start<S: Simd<f32s = V>, const MR: usize, const NV: usize>(
        &self,
        simd: S,
        row: usize,
    ) -> [[V; NV]; MR] {
        let bias: &[V; NV] = self.bias.try_into().expect("NV bias vectors");
        let mut acc: [[V; NV]; MR] = [*bias; MR];
        if self.chunk.start == 0 {
            return acc;
        }
        let PointwiseOutput::Rows { values, .. } = &*self.output else {
            unreachable!("passes over k only into row-major outputs")
        };
        let lanes = S::F32_LANES;
        #[allow(clippy::needless_range_loop)]
        for r in 0..MR {
            let sums = &values[(row + r) * self.n + self.first..][..self.width];
            for j in 0..NV {
                acc[r][j] = load(simd, &sums[j * lanes..((j + 1) * lanes).min(self.width)]);
            }
        }
        acc
    }

    /// Adds this pass's terms of rows `row..row + MR` of a row-major input.
    #[inline(always)]
    fn accumulate_rows<S: Simd<f32s = V>, const MR: usize, const NV: usize>(
        &self,
        simd: S,
        values: &[f32],
        row: usize,
    ) -> [[V; NV]; MR] {
        let (k, chunk) = (self.k, self.chunk.clone());
        let len = chunk.len();
        let mut acc = self.start::<S, MR, NV>(simd, row);
        let inputs: [&[f32]; MR] =
            std::array::from_fn(|r| &values[(row + r) * k + chunk.start..][..len]);
        let weights = &self.weights[chunk.start * NV..][..len * NV];
        for (i, weights) in (0..len).zip(weights.chunks_exact(NV)) {
            let weights: &[V; NV] = weights.try_into().expect("NV weight vectors");
            for r in 0..MR {
                let value = simd.splat_f32s(inputs[r][i]);
                for j in 0..NV {
                    acc[r][j] = simd.mul_add_e_f32s(value, weights[j], acc[r][j]);
                }
            }
        }
        acc
    }

    /// Adds this pass's terms of pixels `row..row + MR` of a column input
    /// (`[k, stride]`, the pixels from `first`): at each `k` the tile's
    /// values lie side by side.
    #[inline(always)]
    fn accumulate_columns<S: Simd<f32s = V>, const MR: usize, const NV: usize>(
        &self,
        simd: S,
        (values, stride, first): (&[f32], usize, usize),
        row: usize,
    ) -> [[V; NV]; MR] {
        let chunk = self.chunk.clone();
        let mut acc = self.start::<S, MR, NV>(simd, row);
        let weights = &self.weights[chunk.start * NV..chunk.end * NV];
        for (kk, weights) in chunk.zip(weights.chunks_exact(NV)) {
            let weights: &[V; NV] = weights.try_into().expect("NV weight vectors");
            let inputs: &[f32; MR] = values[kk * stride + first + row..][..MR]
                .try_into()
                .expect("MR values");
            for r in 0..MR {
                let value = simd.splat_f32s(inputs[r]);
                for j in 0..NV {
                    acc[r][j] = simd.mul_add_e_f32s(value, weights[j], acc[r][j]);
                }
            }
        }
        acc
    }

    #[inline(always)]
    fn accumulate_blocks<S: Simd<f32s = V>, const MR: usize, const NV: usize>(
        &self,
        simd: S,
        values: &[f32],
        row: usize,
    ) -> [[V; NV]; MR] {
        let k = self.k;
        let bias: &[V; NV] = self.bias.try_into().expect("NV bias vectors");
        let mut acc: [[V; NV]; MR] = [*bias; MR];
        let lanes = S::F32_LANES;
        for (block, weights) in (0..k / lanes).zip(self.weights.chunks_exact(NV * lanes)) {
            // The tile's pixels of this channel block: [MR][lanes].
            let inputs = &values[(block * self.pixels + row) * lanes..][..MR * lanes];
            for (kk, weights) in (0..lanes).zip(weights.chunks_exact(NV)) {
                let weights: &[V; NV] = weights.try_into().expect("NV weight vectors");
                for r in 0..MR {
                    let value = simd.splat_f32s(inputs[r * lanes + kk]);
                    for j in 0..NV {
                        acc[r][j] = simd.mul_add_e_f32s(value, weights[j], acc[r][j]);
                    }
                }
            }
        }
        acc
    }

    /// Residual or ReLU6, then one store per vector.
    #[inline(always)]
    fn store<S: Simd<f32s = V>, const MR: usize, const NV: usize>(
        &mut self,
        simd: S,
        row: usize,
        acc: [[V; NV]; MR],
    ) {
        let (zero, six) = (simd.splat_f32s(0.0), simd.splat_f32s(6.0));
        let relu6 = |value| {
            if self.relu6 {
                simd.min_f32s(simd.max_f32s(value, zero), six)
            } else {
                value
            }
        };
        let lanes = S::F32_LANES;
        match self.output {
            PointwiseOutput::Rows { values, residual } => {
                // Running sums wait in the output for the next pass as
                // they are.
                let last = self.chunk.end == self.k;
                let residual = residual.filter(|_| last);
                let relu6 = |value| if last { relu6(value) } else { value };
                // Index loops, not iterators over `acc`: they unroll to
                // constant indices, so `acc` stays in registers.
                #[allow(clippy::needless_range_loop)]
                for r in 0..MR {
                    let at = (row + r) * self.n + self.first;
                    let out = &mut values[at..][..self.width];
                    let residual = residual.map(|residual| &residual[at..][..self.width]);
                    for j in 0..NV {
                        let mut value = acc[r][j];
                        let (lo, hi) = (j * lanes, ((j + 1) * lanes).min(self.width));
                        if let Some(residual) = residual {
                            value = simd.add_f32s(value, load(simd, &residual[lo..hi]));
                        }
                        store(simd, &mut out[lo..hi], relu6(value));
                    }
                }
            }
            PointwiseOutput::Blocks {
                values,
                plane,
                first,
                width,
                row_stride,
            } => {
                let (mut y, mut x) = self.position;
                let at: [usize; MR] = std::array::from_fn(|_| {
                    let at = *first + y * *row_stride + x;
                    x += 1;
                    if x == *width {
                        (x, y) = (0, y + 1);
                    }
                    at
                });
                let out = S::as_mut_simd_f32s(values).0;
                let first_vector = self.first / lanes;
                for j in 0..NV {
                    let out = &mut out[(first_vector + j) * *plane..][..*plane];
                    for r in 0..MR {
                        out[at[r]] = relu6(acc[r][j]);
                    }
                }
            }
        }
    }
}

/// One vector from `values` (a whole vector, or fewer lanes zero-extended).
#[inline(always)]
pub fn load<S: Simd>(simd: S, values: &[f32]) -> S::f32s {
    if values.len() == S::F32_LANES {
        S::as_simd_f32s(values).0[0]
    } else {
        simd.partial_load_f32s(values)
    }
}

/// Stores the first `values.len()` lanes of `vector`.
#[inline(always)]
pub fn store<S: Simd>(simd: S, values: &mut [f32], vector: S::f32s) {
    if values.len() == S::F32_LANES {
        S::as_mut_simd_f32s(values).0[0] = vector;
    } else {
        simd.partial_store_f32s(values, vector);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::SimdLevel;

    /// Deterministic values in [-2, 2).
    pub fn values(len: usize, seed: u64) -> Vec<f32> {
        let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 40) as f32 / (1u64 << 24) as f32 * 4.0 - 2.0
            })
            .collect()
    }

    /// `[pixels, c]` rows to `[c / lanes][pixels][lanes]` blocks.
    fn to_blocks(rows: &[f32], c: usize, lanes: usize) -> Vec<f32> {
        let pixels = rows.len() / c;
        let mut blocks = vec![0.0; rows.len()];
        for p in 0..pixels {
            for ch in 0..c {
                blocks[((ch / lanes) * pixels + p) * lanes + ch % lanes] = rows[p * c + ch];
            }
        }
        blocks
    }

    fn reference(
        (input, weight, bias): (&[f32], &[f32], &[f32]),
        (pixels, k, n): (usize, usize, usize),
        residual: Option<&[f32]>,
        activation: Activation,
    ) -> Vec<f64> {
        let mut out = Vec::with_capacity(pixels * n);
        for r in 0..pixels {
            for j in 0..n {
                let mut sum = bias[j] as f64;
                for kk in 0..k {
                    sum += input[r * k + kk] as f64 * weight[j * k + kk] as f64;
                }
                if let Some(residual) = residual {
                    sum += residual[r * n + j] as f64;
                }
                if activation == Activation::Relu6 {
                    sum = sum.clamp(0.0, 6.0);
                }
                out.push(sum);
            }
        }
        out
    }

    fn assert_near(got: f32, expected: f64, what: &str) {
        assert!(
            (got as f64 - expected).abs() <= 1e-4 * (1.0 + expected.abs()),
            "{what}: {got} vs {expected}"
        );
    }

    #[test]
    fn packed_pointwise_on_rows_equals_a_plain_matrix_product() {
        // Pixel counts with every tail (tiles of 12, 8, 6, 4, 2, 1), channel
        // counts below one vector, of part-filled vectors and of several
        // panels, and k = 1.
        for (pixels, k, n) in [
            (1, 1, 1),
            (7, 3, 5),
            (13, 16, 24),
            (23, 27, 32),
            (49, 40, 40),
            (50, 24, 144),
            (31, 96, 16),
            (17, 320, 72),
        ] {
            let input = values(pixels * k, 1);
            let weight = values(n * k, 2);
            let bias = values(n, 3);
            let residual = values(pixels * n, 4);
            for level in SimdLevel::available() {
                for (activation, with_residual) in [
                    (Activation::None, false),
                    (Activation::Relu6, false),
                    (Activation::None, true),
                ] {
                    let op = PackedPointwise::new(&weight, &bias, k, n, activation, level.lanes());
                    let residual = with_residual.then_some(&residual[..]);
                    let mut output = vec![f32::NAN; pixels * n];
                    level.arch().unwrap().dispatch(Pointwise {
                        op: &op,
                        pixels,
                        input: PointwiseInput::Rows(&input),
                        output: PointwiseOutput::Rows {
                            values: &mut output,
                            residual,
                        },
                    });
                    let expected = reference(
                        (&input, &weight, &bias),
                        (pixels, k, n),
                        residual,
                        activation,
                    );
                    for (i, (&got, &expected)) in output.iter().zip(&expected).enumerate() {
                        let what = format!(
                            "{level} {pixels}x{k}x{n} {activation:?} residual={with_residual} [{i}]"
                        );
                        assert_near(got, expected, &what);
                    }
                }
            }
        }
    }

    #[test]
    fn packed_pointwise_on_channel_blocks_equals_a_plain_matrix_product() {
        // Blocks in (k whole vectors), rows out; rows in, blocks out into a
        // plane whose rows are wider than the image (padding columns that
        // must stay untouched) starting mid-plane.
        for level in SimdLevel::available() {
            let lanes = level.lanes();
            for (pixels, k, n, width) in [(50, 2 * 16, 3 * 16, 7), (13, 16, 16, 13), (9, 48, 32, 2)]
            {
                let input = values(pixels * k, 5);
                let weight = values(n * k, 6);
                let bias = values(n, 7);
                let expected = reference(
                    (&input, &weight, &bias),
                    (pixels, k, n),
                    None,
                    Activation::Relu6,
                );
                let op = PackedPointwise::new(&weight, &bias, k, n, Activation::Relu6, lanes);
                let mut rows = vec![f32::NAN; pixels * n];
                level.arch().unwrap().dispatch(Pointwise {
                    op: &op,
                    pixels,
                    input: PointwiseInput::Blocks(&to_blocks(&input, k, lanes)),
                    output: PointwiseOutput::Rows {
                        values: &mut rows,
                        residual: None,
                    },
                });
                for (i, (&got, &expected)) in rows.iter().zip(&expected).enumerate() {
                    assert_near(got, expected, &format!("{level} blocks in [{i}]"));
                }
                // Out: rows of `width` pixels, 3 padding columns between them,
                // the first pixel at column 2 of plane row 1.
                let (row_stride, first) = (width + 3, row_stride_first(width));
                let image_rows = pixels.div_ceil(width);
                let plane = first + image_rows * row_stride;
                let mut blocks = vec![-7.0; n * plane];
                level.arch().unwrap().dispatch(Pointwise {
                    op: &op,
                    pixels,
                    input: PointwiseInput::Rows(&input),
                    output: PointwiseOutput::Blocks {
                        values: &mut blocks,
                        plane,
                        first,
                        width,
                        row_stride,
                    },
                });
                for at in 0..plane {
                    let inside = at >= first
                        && (at - first) % row_stride < width
                        && (at - first) / row_stride * width + (at - first) % row_stride < pixels;
                    for ch in 0..n {
                        let got = blocks[((ch / lanes) * plane + at) * lanes + ch % lanes];
                        if inside {
                            let p = (at - first) / row_stride * width + (at - first) % row_stride;
                            assert_near(got, expected[p * n + ch], &format!("{level} blocks out"));
                        } else {
                            assert_eq!(got, -7.0, "{level}: padding at {at} written");
                        }
                    }
                }
            }
        }
    }

    fn row_stride_first(width: usize) -> usize {
        (width + 3) + 2
    }
}

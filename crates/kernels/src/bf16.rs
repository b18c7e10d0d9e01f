//! Matrix products with bf16 operands and f32 sums (mixed precision for the
//! fine-tuned blocks): `out[rows, cols] (+)= a[rows, inner] × b[inner, cols]`
//! where every operand value is first rounded to bf16 (round to nearest even)
//! and every product is summed in f32.
//!
//! On a CPU with AVX-512 BF16 (`vdpbf16ps`: 32 bf16 products summed into 16
//! f32 per instruction, twice the multiply-adds of an f32 FMA) the operands
//! are converted once per product into pairs of consecutive `inner` values
//! (one bf16 pair per 32-bit lane) and a register tile of `MR` rows × `NV`
//! vectors is summed over the pairs, as in [`crate::gemm`]. Elsewhere (AVX2,
//! scalar, or `LAZARUS_SIMD` below `avx512`) the operands are rounded to bf16
//! values held in f32 and the f32 product runs: the same products (a
//! product of two bf16 values is exact in f32) summed in another order, so
//! not the same bits, and no faster.
//!
//! Every output element is a sum over `inner` in an order fixed by the
//! shapes alone (runs of [`PAIRS_PER_PASS`] pairs, each summed from zero in
//! order and added to the old `out` or the runs before): bands of rows or
//! columns and the thread count do not change it.
//!
//! The `unsafe` here is the intrinsics' (pointer loads and stores, calls
//! into functions compiled for AVX-512 BF16 after the CPU was checked for
//! it, and the bit cast of a vector to the bf16 vector type); each site says
//! why it holds.

use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
use crate::matmul::put_column_bands;
use crate::matmul::{Accumulate, Layout, Matrix, Parallelism, matmul, product_shape};
use crate::{SimdLevel, scratch};

/// f32 lanes of a 512-bit vector.
#[cfg(target_arch = "x86_64")]
const LANES: usize = 16;
/// Vectors per full panel, and the register tile's rows for each panel width:
/// 24 accumulators, the panel's vectors and a broadcast fit AVX-512's 32
/// registers.
#[cfg(target_arch = "x86_64")]
const PANEL_VECTORS: usize = 3;
#[cfg(target_arch = "x86_64")]
const PANEL_WIDTH: usize = PANEL_VECTORS * LANES;
/// Rows or columns per band below which a product is not split.
#[cfg(target_arch = "x86_64")]
const MIN_BAND: usize = 24;
/// Pairs of `inner` summed per pass over a band's rows: a panel's part
/// (256 × 48 lanes, 48 KiB) stays in L2 while every row tile reads it, where
/// a whole panel of a weight gradient (`inner` = a batch's pixels) would
/// stream from memory once per tile.
#[cfg(target_arch = "x86_64")]
const PAIRS_PER_PASS: usize = 256;
/// Values per task of a conversion.
const CONVERT_RUN: usize = 1 << 16;

/// The bits of `value` rounded to bf16 (nearest, ties to even), in the low
/// 16 bits; NaN stays a (quiet) NaN.
#[inline(always)]
fn bf16_bits(value: f32) -> u32 {
    let bits = value.to_bits();
    let rounded = (bits + 0x7fff + ((bits >> 16) & 1)) >> 16;
    // Integer compares only, so that loops over it vectorise.
    let nan = bits & 0x7fff_ffff > 0x7f80_0000;
    if nan { (bits >> 16) | 0x40 } else { rounded }
}

/// `value` rounded to bf16, as an f32.
#[inline(always)]
pub fn round_to_bf16(value: f32) -> f32 {
    f32::from_bits(bf16_bits(value) << 16)
}

/// One 32-bit lane of a pair: `first` in the low half (the lower address,
/// the even index `vdpbf16ps` pairs first), `second` in the high half.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn pair(first: f32, second: f32) -> f32 {
    f32::from_bits(bf16_bits(first) | (bf16_bits(second) << 16))
}

/// Whether this process runs the bf16 products natively: AVX-512 in force
/// (see [`SimdLevel::in_force`]) and the CPU has AVX-512 BF16.
pub fn native() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        SimdLevel::in_force() == SimdLevel::Avx512
            && std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx512vl")
            && std::is_x86_feature_detected!("avx512bw")
            && std::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `out = a × b` or `out += a × b` with bf16 operands and f32 sums; `out`
/// row-major `[a.rows, b.cols]`. Natively where [`native`] says so, else
/// through the f32 product on rounded copies of the operands.
pub fn matmul_bf16(
    out: &mut [f32],
    accumulate: Accumulate,
    a: Matrix<'_>,
    b: Matrix<'_>,
    parallelism: Parallelism,
) {
    let (rows, _, cols) = product_shape(out, a, b);
    if rows == 0 || cols == 0 {
        return;
    }
    if !native() {
        let rounded = |m: Matrix<'_>| {
            // Every element is written below.
            let mut values = scratch::overwritten(m.values.len());
            let round = |(out, values): (&mut [f32], &[f32])| {
                SimdLevel::in_force_arch().dispatch(
                    #[inline(always)]
                    || {
                        for (out, value) in out.iter_mut().zip(values) {
                            *out = round_to_bf16(*value);
                        }
                    },
                )
            };
            match parallelism {
                Parallelism::Sequential => round((&mut values, m.values)),
                Parallelism::Pool => values
                    .par_chunks_mut(CONVERT_RUN)
                    .zip(m.values.par_chunks(CONVERT_RUN))
                    .for_each(round),
            }
            values
        };
        let (a_values, b_values) = (rounded(a), rounded(b));
        let with = |m: Matrix<'_>, values| Matrix { values, ..m };
        matmul(
            out,
            accumulate,
            with(a, &a_values),
            with(b, &b_values),
            parallelism,
        );
        scratch::recycle(a_values);
        scratch::recycle(b_values);
        return;
    }
    #[cfg(target_arch = "x86_64")]
    native_product(out, accumulate, a, b, parallelism);
}

/// `a` as bf16 pairs, pair `p` of row `r` at `r · row_stride + p ·
/// pair_stride`: row by row (`[rows][pairs]`) from row-major storage, pair
/// by pair (`[pairs][rows]`) from transposed storage, so that either is one
/// pass along the stored rows.
#[cfg(target_arch = "x86_64")]
struct APairs {
    values: Vec<f32>,
    row_stride: usize,
    pair_stride: usize,
}

#[cfg(target_arch = "x86_64")]
fn a_pairs(a: Matrix<'_>, pairs: usize, threads: bool) -> APairs {
    let (rows, inner) = (a.rows, a.cols);
    // Every element is written below.
    let mut values = scratch::overwritten(rows * pairs);
    match a.layout {
        Layout::RowMajor => {
            // With `inner` even the rows' pairs are the whole matrix's
            // consecutive pairs: converted in long runs, not row by row.
            let run_rows = if inner % 2 == 0 {
                CONVERT_RUN.div_ceil(inner)
            } else {
                1
            };
            let convert = |(run, out): (usize, &mut [f32])| {
                let first_row = run * run_rows;
                let n_rows = out.len() / pairs;
                if inner % 2 == 0 {
                    // SAFETY: `native()` checked the CPU before any product came here.
                    unsafe {
                        convert_consecutive(&a.values[first_row * inner..][..n_rows * inner], out)
                    }
                } else {
                    for (row, out) in (first_row..).zip(out.chunks_exact_mut(pairs)) {
                        // SAFETY: as above.
                        unsafe { convert_consecutive(&a.values[row * inner..][..inner], out) }
                    }
                }
            };
            if threads {
                values
                    .par_chunks_mut(run_rows * pairs)
                    .enumerate()
                    .for_each(convert);
            } else {
                values
                    .chunks_mut(run_rows * pairs)
                    .enumerate()
                    .for_each(convert);
            }
            APairs {
                values,
                row_stride: pairs,
                pair_stride: 1,
            }
        }
        Layout::Transposed => {
            let convert = |(p, out): (usize, &mut [f32])| {
                let first = &a.values[2 * p * rows..][..rows];
                let second = (2 * p + 1 < inner).then(|| &a.values[(2 * p + 1) * rows..][..rows]);
                // SAFETY: as above.
                unsafe { interleave(first, second, out) }
            };
            if threads {
                values.par_chunks_mut(rows).enumerate().for_each(convert);
            } else {
                values.chunks_mut(rows).enumerate().for_each(convert);
            }
            APairs {
                values,
                row_stride: 1,
                pair_stride: rows,
            }
        }
    }
}

/// `values` as bf16 pairs of consecutive values (`out[i]` from
/// `values[2i], values[2i + 1]`, 0 past the end).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,avx512bf16")]
fn convert_consecutive(values: &[f32], out: &mut [f32]) {
    use std::arch::x86_64::*;
    assert_eq!(out.len(), values.len().div_ceil(2));
    let (whole, _) = values.as_chunks::<32>();
    for (chunk, out) in whole.iter().zip(out.chunks_exact_mut(LANES)) {
        // SAFETY: `chunk` holds 32 values and `out` 16 lanes.
        unsafe {
            let low = _mm512_loadu_ps(chunk.as_ptr());
            let high = _mm512_loadu_ps(chunk.as_ptr().add(LANES));
            let both = _mm512_cvtne2ps_pbh(high, low);
            _mm512_storeu_ps(
                out.as_mut_ptr(),
                std::mem::transmute::<__m512bh, __m512>(both),
            );
        }
    }
    let done = whole.len() * LANES;
    let rest = &values[2 * done..];
    for (index, out) in out[done..].iter_mut().enumerate() {
        let second = rest.get(2 * index + 1).copied().unwrap_or(0.0);
        *out = pair(rest[2 * index], second);
    }
}

/// `out[i]` = the bf16 pair (`first[i]`, `second[i]`, 0 without `second`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
fn interleave(first: &[f32], second: Option<&[f32]>, out: &mut [f32]) {
    use std::arch::x86_64::*;
    assert!(out.len() == first.len() && second.is_none_or(|s| s.len() == first.len()));
    // bf16 lane 2i from `first`'s value i (the low half of the pair), 2i + 1
    // from `second`'s (which `cvtne2ps` puts in the upper 16 bf16 lanes).
    let order: [i16; 32] = std::array::from_fn(|lane| (lane / 2 + (lane % 2) * 16) as i16);
    // SAFETY: 32 i16 are 64 bytes.
    let order = unsafe { _mm512_loadu_si512(order.as_ptr().cast()) };
    let zeros = [0f32; LANES];
    let whole = first.len() / LANES;
    for index in 0..whole {
        let at = index * LANES;
        // SAFETY: `at + 16 <= len` for `first`, `second` and `out`.
        unsafe {
            let low = _mm512_loadu_ps(first.as_ptr().add(at));
            let high = match second {
                Some(second) => _mm512_loadu_ps(second.as_ptr().add(at)),
                None => _mm512_loadu_ps(zeros.as_ptr()),
            };
            let both = std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(high, low));
            let pairs = _mm512_permutexvar_epi16(order, both);
            _mm512_storeu_si512(out.as_mut_ptr().add(at).cast(), pairs);
        }
    }
    for at in whole * LANES..first.len() {
        out[at] = pair(first[at], second.map_or(0.0, |s| s[at]));
    }
}

/// `b`'s `columns`, packed in panels of up to [`PANEL_VECTORS`] vectors:
/// panel by panel, `[pairs][panel vectors · LANES]` bf16 pairs, zero past
/// the last column.
#[cfg(target_arch = "x86_64")]
struct PackedB {
    pairs: usize,
    /// (first column, width, vectors, offset of its pairs) per panel.
    panels: Vec<(usize, usize, usize, usize)>,
    values: Vec<f32>,
}

#[cfg(target_arch = "x86_64")]
fn pack_b(b: Matrix<'_>, columns: std::ops::Range<usize>, pairs: usize, threads: bool) -> PackedB {
    let (inner, cols) = (b.rows, b.cols);
    let n = columns.len();
    let mut panels = Vec::new();
    let mut first = 0;
    let mut offset = 0;
    while first < n {
        let width = PANEL_WIDTH.min(n - first);
        let vectors = width.div_ceil(LANES);
        panels.push((first, width, vectors, offset));
        offset += pairs * vectors * LANES;
        first += width;
    }
    // Every element is written below (padding included).
    let mut values = scratch::overwritten(offset);
    // Value `k` of column `col` of a transposed `b` (stored `[cols, inner]`).
    let transposed_at = |k: usize, col: usize| -> f32 {
        if k < inner {
            b.values[col * inner + k]
        } else {
            0.0
        }
    };
    // Every panel but the last is PANEL_WIDTH wide: chunks of a full
    // panel's size are the panels.
    let pack = |(index, out): (usize, &mut [f32])| {
        let (first, width, vectors, _) = panels[index];
        let stride = vectors * LANES;
        let first_col = columns.start + first;
        for (p, out) in out.chunks_exact_mut(stride).enumerate() {
            let (out, padding) = out.split_at_mut(width);
            match b.layout {
                // Two stored rows, interleaved: the activations' case (a
                // weight gradient's right-hand side), tens of MB.
                Layout::RowMajor => {
                    let first = &b.values[2 * p * cols + first_col..][..width];
                    let second = (2 * p + 1 < inner)
                        .then(|| &b.values[(2 * p + 1) * cols + first_col..][..width]);
                    // SAFETY: `native()` checked the CPU before any product came here.
                    unsafe { interleave(first, second, out) }
                }
                // A weight matrix, small: value by value.
                Layout::Transposed => {
                    for (c, out) in out.iter_mut().enumerate() {
                        let col = first_col + c;
                        *out = pair(transposed_at(2 * p, col), transposed_at(2 * p + 1, col));
                    }
                }
            }
            padding.fill(0.0);
        }
    };
    let chunk = pairs * PANEL_WIDTH;
    if threads {
        values.par_chunks_mut(chunk).enumerate().for_each(pack);
    } else {
        values.chunks_mut(chunk).enumerate().for_each(pack);
    }
    PackedB {
        pairs,
        panels,
        values,
    }
}

#[cfg(target_arch = "x86_64")]
fn native_product(
    out: &mut [f32],
    accumulate: Accumulate,
    a: Matrix<'_>,
    b: Matrix<'_>,
    parallelism: Parallelism,
) {
    let (rows, inner, cols) = (a.rows, a.cols, b.cols);
    if inner == 0 {
        if accumulate == Accumulate::Replace {
            out.fill(0.0);
        }
        return;
    }
    let pairs = inner.div_ceil(2);
    let threads = match parallelism {
        Parallelism::Sequential => 1,
        Parallelism::Pool => rayon::current_num_threads(),
    };
    let pool = threads > 1;
    let a_pairs = a_pairs(a, pairs, pool);
    let tile = 8;
    let band_rows = rows.div_ceil(threads).next_multiple_of(tile);
    let band_cols = cols.div_ceil(threads).next_multiple_of(PANEL_WIDTH);
    let row_bands = pool && band_rows >= MIN_BAND && band_rows < rows;
    let column_bands = pool && !row_bands && band_cols >= MIN_BAND && band_cols < cols;
    let add = accumulate == Accumulate::Add;
    if column_bands {
        let bands: Vec<(usize, Vec<f32>)> = (0..cols)
            .step_by(band_cols)
            .collect::<Vec<_>>()
            .into_par_iter()
            .map(|first| {
                let columns = first..(first + band_cols).min(cols);
                let packed = pack_b(b, columns.clone(), pairs, false);
                let width = columns.len();
                // `Replace` writes every element.
                let mut band = scratch::overwritten(rows * width);
                run_rows(&packed, &a_pairs, 0, rows, &mut band, width, false);
                scratch::recycle(packed.values);
                (first, band)
            })
            .collect();
        put_column_bands(out, cols, accumulate, bands);
    } else {
        let packed = pack_b(b, 0..cols, pairs, pool);
        if row_bands {
            out.par_chunks_mut(band_rows * cols)
                .enumerate()
                .for_each(|(index, out)| {
                    let first_row = index * band_rows;
                    let n_rows = out.len() / cols;
                    run_rows(&packed, &a_pairs, first_row, n_rows, out, cols, add);
                });
        } else {
            run_rows(&packed, &a_pairs, 0, rows, out, cols, add);
        }
        scratch::recycle(packed.values);
    }
    scratch::recycle(a_pairs.values);
}

/// Rows `first_row .. first_row + n_rows` of the product with every panel
/// of `packed`, into `out` (`[n_rows, out_cols]`, the panels' columns at
/// their offsets), added to what is there when `add`.
#[cfg(target_arch = "x86_64")]
fn run_rows(
    packed: &PackedB,
    a: &APairs,
    first_row: usize,
    n_rows: usize,
    out: &mut [f32],
    out_cols: usize,
    add: bool,
) {
    let pairs = packed.pairs;
    assert_eq!(out.len(), n_rows * out_cols);
    if n_rows == 0 {
        return;
    }
    // The band's last row's last pair lies inside `a`.
    let a_values = &a.values[first_row * a.row_stride..];
    assert!((n_rows - 1) * a.row_stride + (pairs - 1) * a.pair_stride < a_values.len());
    for pass_start in (0..pairs).step_by(PAIRS_PER_PASS) {
        let pass_pairs = PAIRS_PER_PASS.min(pairs - pass_start);
        for &(first, width, vectors, offset) in &packed.panels {
            assert!(first + width <= out_cols && width <= vectors * LANES);
            let stride = vectors * LANES;
            let panel = &packed.values[offset + pass_start * stride..][..pass_pairs * stride];
            let tiles = Tiles {
                a: &a_values[pass_start * a.pair_stride..],
                row_stride: a.row_stride,
                pair_stride: a.pair_stride,
                pairs: pass_pairs,
                panel,
                out: &mut *out,
                out_cols,
                first,
                width,
                // Later passes add to the earlier ones' sums.
                add: add || pass_start > 0,
            };
            // SAFETY: `native()` checked that the CPU runs AVX-512 F, VL, BW and
            // BF16 before any product came here.
            unsafe {
                match vectors {
                    3 => tiles.run::<3>(n_rows),
                    2 => tiles.run::<2>(n_rows),
                    _ => tiles.run::<1>(n_rows),
                }
            }
        }
    }
}

/// One panel over a band's rows.
#[cfg(target_arch = "x86_64")]
struct Tiles<'a, 'o> {
    /// The band's pairs of `a`, from its first row's first pair.
    a: &'a [f32],
    row_stride: usize,
    pair_stride: usize,
    pairs: usize,
    panel: &'a [f32],
    out: &'o mut [f32],
    out_cols: usize,
    first: usize,
    width: usize,
    add: bool,
}

#[cfg(target_arch = "x86_64")]
impl Tiles<'_, '_> {
    /// Tiles of 8 rows (12 with one or two vectors), then the rest in
    /// tiles of 4, 2 and 1.
    #[target_feature(enable = "avx512f,avx512vl,avx512bf16")]
    fn run<const NV: usize>(mut self, n_rows: usize) {
        let mut row = 0;
        if NV < 3 {
            while row + 12 <= n_rows {
                self.tile::<12, NV>(row);
                row += 12;
            }
        }
        while row + 8 <= n_rows {
            self.tile::<8, NV>(row);
            row += 8;
        }
        if n_rows - row >= 4 {
            self.tile::<4, NV>(row);
            row += 4;
        }
        if n_rows - row >= 2 {
            self.tile::<2, NV>(row);
            row += 2;
        }
        if n_rows - row >= 1 {
            self.tile::<1, NV>(row);
        }
    }

    #[target_feature(enable = "avx512f,avx512vl,avx512bf16")]
    #[inline]
    fn tile<const MR: usize, const NV: usize>(&mut self, row: usize) {
        use std::arch::x86_64::*;
        let pairs = self.pairs;
        let (row_stride, pair_stride) = (self.row_stride, self.pair_stride);
        assert!((row + MR - 1) * row_stride + (pairs - 1) * pair_stride < self.a.len());
        assert_eq!(self.panel.len(), pairs * NV * LANES);
        let a = self.a[row * row_stride..].as_ptr();
        let b = self.panel.as_ptr();
        let mut acc = [[_mm512_setzero_ps(); NV]; MR];
        for p in 0..pairs {
            // SAFETY: the asserts above keep `p * NV * LANES + j * LANES +
            // 15` inside the panel and `r * row_stride + p * pair_stride`
            // inside the tile's pairs of `a`; the vectors hold bf16 pairs as the bits of
            // f32 lanes, which `__m512bh` reads as 32 bf16 values.
            unsafe {
                let weights: [__m512bh; NV] = std::array::from_fn(|j| {
                    std::mem::transmute::<__m512, __m512bh>(_mm512_loadu_ps(
                        b.add((p * NV + j) * LANES),
                    ))
                });
                // Index loops: they unroll to constant indices, so `acc`
                // stays in registers.
                #[allow(clippy::needless_range_loop)]
                for r in 0..MR {
                    let value = std::mem::transmute::<__m512, __m512bh>(_mm512_set1_ps(
                        *a.add(r * row_stride + p * pair_stride),
                    ));
                    for j in 0..NV {
                        acc[r][j] = _mm512_dpbf16_ps(acc[r][j], value, weights[j]);
                    }
                }
            }
        }
        #[allow(clippy::needless_range_loop)]
        for r in 0..MR {
            let at = (row + r) * self.out_cols + self.first;
            let out = &mut self.out[at..][..self.width];
            for j in 0..NV {
                let (lo, hi) = (j * LANES, ((j + 1) * LANES).min(self.width));
                let out = &mut out[lo..hi];
                let mask: __mmask16 = if hi - lo == LANES {
                    u16::MAX
                } else {
                    (1u16 << (hi - lo)) - 1
                };
                // SAFETY: the mask covers `out`'s `hi - lo` values only.
                unsafe {
                    let mut value = acc[r][j];
                    if self.add {
                        value = _mm512_add_ps(value, _mm512_maskz_loadu_ps(mask, out.as_ptr()));
                    }
                    _mm512_mask_storeu_ps(out.as_mut_ptr(), mask, value);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gemm::tests::values;
    use crate::matmul::tests::check_against_f64_sums;

    #[test]
    fn rounding_to_bf16_is_to_nearest_even() {
        // Reference: the bf16 grid near 1 is 2^-7 apart.
        assert_eq!(round_to_bf16(1.0), 1.0);
        assert_eq!(round_to_bf16(1.0 + 2f32.powi(-9)), 1.0);
        assert_eq!(
            round_to_bf16(1.0 + 3.0 * 2f32.powi(-9)),
            1.0 + 2f32.powi(-7)
        );
        // A tie goes to the even neighbour: 1 + 2^-8 lies halfway.
        assert_eq!(round_to_bf16(1.0 + 2f32.powi(-8)), 1.0);
        assert_eq!(
            round_to_bf16(1.0 + 3.0 * 2f32.powi(-8)),
            1.0 + 2.0 * 2f32.powi(-7)
        );
        assert_eq!(round_to_bf16(-2.5), -2.5);
        assert!(round_to_bf16(f32::NAN).is_nan());
        assert_eq!(round_to_bf16(f32::INFINITY), f32::INFINITY);
    }

    #[test]
    fn bf16_products_equal_an_f64_sum_of_rounded_operands() {
        // Reference: the f64 triple loop over operands rounded to bf16 (each
        // product exact); the kernel's f32 sums differ from it only by f32
        // rounding. Odd `inner` leaves the last pair half empty.
        check_against_f64_sums(
            matmul_bf16,
            round_to_bf16,
            &[
                (1, 1, 1),
                (10, 255, 33),
                (256, 40, 10),
                (61, 7, 130),
                (37, 96, 50),
                (5, 0, 3),
                (40, 33, 17),
                (9, 600, 20),
            ],
        );
    }

    #[test]
    fn bf16_elements_do_not_depend_on_bands_or_threads() {
        let (inner, cols) = (96, 170);
        let b_values = values(inner * cols, 5);
        let b = Matrix::row_major(&b_values, inner, cols);
        for rows in [300, 10] {
            let a_values = values(rows * inner, 4);
            let a = Matrix::row_major(&a_values, rows, inner);
            let mut pool = vec![0.0; rows * cols];
            matmul_bf16(&mut pool, Accumulate::Replace, a, b, Parallelism::Pool);
            let mut alone = vec![0.0; rows * cols];
            matmul_bf16(
                &mut alone,
                Accumulate::Replace,
                a,
                b,
                Parallelism::Sequential,
            );
            assert!(
                pool.iter()
                    .zip(&alone)
                    .all(|(p, a)| p.to_bits() == a.to_bits()),
                "{rows} rows"
            );
        }
    }
}

//! Dense f32 matrix products for the training steps (the heads' layers and
//! the fine-tuned blocks' 1×1 convolutions):
//! `out[rows, cols] (+)= a[rows, inner] × b[inner, cols]`, either operand
//! stored row-major or as its transpose.
//!
//! Built on the pointwise kernel ([`crate::gemm`]): `b` is packed into panels
//! of whole vectors, `a`'s rows are its "pixels" (a transposed `a` is read
//! in place, the kernel's column input), and an accumulating product adds
//! the old `out` as the kernel's residual. Every output element is one sum
//! over `inner` in order,
//! from zero, whatever the rows, columns or threads: a head's numbers do not
//! depend on the heads stacked beside it in one product (the sweep trains
//! them together and checks each against the head alone).

use rayon::prelude::*;

use crate::gemm::{
    PackedPointwise, Pointwise, PointwiseInput, PointwiseOutput, WeightLayout, panel_width,
    tile_rows,
};
use crate::{SimdLevel, scratch};

/// How a matrix lies in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// `[rows, cols]` row-major.
    RowMajor,
    /// Stored as its transpose: `[cols, rows]` row-major.
    Transposed,
}

/// A `rows × cols` matrix over a slice.
#[derive(Debug, Clone, Copy)]
pub struct Matrix<'a> {
    pub values: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub layout: Layout,
}

impl<'a> Matrix<'a> {
    /// `values` as a row-major `rows × cols` matrix.
    pub fn row_major(values: &'a [f32], rows: usize, cols: usize) -> Self {
        assert_eq!(values.len(), rows * cols, "matrix is not {rows} x {cols}");
        Matrix {
            values,
            rows,
            cols,
            layout: Layout::RowMajor,
        }
    }

    /// The transpose, over the same values.
    pub fn transpose(self) -> Self {
        Matrix {
            values: self.values,
            rows: self.cols,
            cols: self.rows,
            layout: match self.layout {
                Layout::RowMajor => Layout::Transposed,
                Layout::Transposed => Layout::RowMajor,
            },
        }
    }
}

/// Whether a product replaces `out` or is added to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accumulate {
    Replace,
    Add,
}

/// Who computes a product.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parallelism {
    /// The calling thread.
    Sequential,
    /// Bands of rows, or of columns when there are few rows, on the rayon
    /// pool.
    Pool,
}

/// Rows or columns per band below which a product is not split across
/// threads.
const MIN_BAND: usize = 24;

/// `out = a × b` or `out += a × b`, `out` row-major `[a.rows, b.cols]`.
///
/// Runs at the SIMD level in force for the process ([`SimdLevel::from_env`];
/// an unreadable `LAZARUS_SIMD` falls back to the detected level, the
/// encoder reports it). On the pool, a product is cut into bands of rows
/// that share one packed `b`, or, when it has few rows (a weight gradient
/// of a narrow layer), into bands of columns that each pack their own part.
pub fn matmul(
    out: &mut [f32],
    accumulate: Accumulate,
    a: Matrix<'_>,
    b: Matrix<'_>,
    parallelism: Parallelism,
) {
    let (rows, inner, cols) = product_shape(out, a, b);
    if rows == 0 || cols == 0 {
        return;
    }
    // `b` is packed, a copy of all of it; `a` is read where it lies. When
    // both are stored `inner`-major (a weight gradient: deltas by
    // activations, summed over the pixels) and `b` is the wider, the
    // transposed product `bᵀ × aᵀ` packs the narrower one instead, and its
    // small result is transposed into `out`. Every sum is the same, term by
    // term (a product's factors only swap places), so are the bits.
    if a.layout == Layout::Transposed && b.layout == Layout::RowMajor && cols > rows {
        let mut transposed = scratch::overwritten(rows * cols);
        matmul(
            &mut transposed,
            Accumulate::Replace,
            b.transpose(),
            a.transpose(),
            parallelism,
        );
        let put = |(row, out): (usize, &mut [f32])| {
            let column = transposed[row..].iter().step_by(rows);
            match accumulate {
                Accumulate::Replace => out.iter_mut().zip(column).for_each(|(o, t)| *o = *t),
                Accumulate::Add => out.iter_mut().zip(column).for_each(|(o, t)| *o += t),
            }
        };
        match parallelism {
            Parallelism::Sequential => out.chunks_exact_mut(cols).enumerate().for_each(put),
            Parallelism::Pool => out.par_chunks_exact_mut(cols).enumerate().for_each(put),
        }
        scratch::recycle(transposed);
        return;
    }
    let level = SimdLevel::in_force();
    let lanes = level.lanes();
    let product = Bands {
        arch: level.arch().expect("a level this CPU runs"),
        lanes,
        a,
        b,
        inner,
    };
    let threads = match parallelism {
        Parallelism::Sequential => 1,
        Parallelism::Pool => rayon::current_num_threads(),
    };
    // Bands of whole register tiles and whole panels, so that a band adds no
    // remainder tile of its own.
    let band_rows = rows.div_ceil(threads).next_multiple_of(tile_rows(lanes));
    let band_cols = cols.div_ceil(threads).next_multiple_of(panel_width(lanes));
    let row_bands = threads > 1 && band_rows >= MIN_BAND && band_rows < rows;
    let column_bands = threads > 1 && !row_bands && band_cols >= MIN_BAND && band_cols < cols;
    if column_bands {
        // Each band computed alone, then copied or added into `out`: the same
        // single add per element as the kernel's residual.
        let bands: Vec<(usize, Vec<f32>)> = (0..cols)
            .step_by(band_cols)
            .collect::<Vec<_>>()
            .into_par_iter()
            .map(|first| {
                let packed = product.pack(first..(first + band_cols).min(cols));
                // The product writes every value.
                let mut band = scratch::overwritten(rows * packed.n);
                product.rows_into(&packed, 0, None, &mut band);
                packed.recycle();
                (first, band)
            })
            .collect();
        put_column_bands(out, cols, accumulate, bands);
        return;
    }
    let packed = product.pack(0..cols);
    let residual = (accumulate == Accumulate::Add).then(|| scratch::copied(out));
    let residual_band = |first_row: usize, len: usize| {
        residual
            .as_deref()
            .map(|residual| &residual[first_row * cols..][..len])
    };
    if row_bands {
        out.par_chunks_mut(band_rows * cols)
            .enumerate()
            .for_each(|(index, out)| {
                let first_row = index * band_rows;
                product.rows_into(&packed, first_row, residual_band(first_row, out.len()), out)
            });
    } else {
        product.rows_into(&packed, 0, residual_band(0, out.len()), out);
    }
    packed.recycle();
    if let Some(residual) = residual {
        scratch::recycle(residual);
    }
}

/// A product's right-hand side packed once for many left-hand sides (the
/// fine-tuned blocks' weights through an evaluation: image after image,
/// each on one thread). `product` gives what [`matmul`] gives, bit for bit:
/// the same packing and the same sums.
#[derive(Debug, Clone)]
pub struct PackedRight {
    arch: pulp::Arch,
    packed: PackedPointwise,
}

impl PackedRight {
    /// `b` packed at the SIMD level in force for the process.
    pub fn new(b: Matrix<'_>) -> Self {
        let level = SimdLevel::in_force();
        PackedRight {
            arch: level.arch().expect("a level this CPU runs"),
            packed: pack_columns(b, 0..b.cols, level.lanes()),
        }
    }

    /// `out = a × b` (`a_rows`: `[rows, inner]` row-major; `out`: `[rows,
    /// cols]`), on the calling thread.
    pub fn product(&self, a_rows: &[f32], out: &mut [f32]) {
        let (inner, cols) = (self.packed.k, self.packed.n);
        let rows = out.len() / cols.max(1);
        assert!(
            a_rows.len() == rows * inner && out.len() == rows * cols,
            "product of {} values by {inner} x {cols} into {} values",
            a_rows.len(),
            out.len()
        );
        if rows == 0 || cols == 0 {
            return;
        }
        self.arch.dispatch(Pointwise {
            op: &self.packed,
            pixels: rows,
            input: PointwiseInput::Rows(a_rows),
            output: PointwiseOutput::Rows {
                values: out,
                residual: None,
            },
        })
    }
}

/// `b`'s `columns` packed into panels for `lanes`-wide vectors.
fn pack_columns(b: Matrix<'_>, columns: std::ops::Range<usize>, lanes: usize) -> PackedPointwise {
    let layout = match b.layout {
        Layout::RowMajor => WeightLayout::InputMajor,
        Layout::Transposed => WeightLayout::OutputMajor,
    };
    PackedPointwise::from_matrix(b.values, layout, b.rows, b.cols, columns, lanes)
}

/// `(rows, inner, cols)` of `out = a × b`, checked: `b` has `inner` rows and
/// `out` `rows × cols` values.
pub(crate) fn product_shape(out: &[f32], a: Matrix<'_>, b: Matrix<'_>) -> (usize, usize, usize) {
    let (rows, inner, cols) = (a.rows, a.cols, b.cols);
    assert_eq!(
        b.rows, inner,
        "product of {rows} x {inner} and {} x {cols}",
        b.rows
    );
    assert_eq!(out.len(), rows * cols, "product out is not {rows} x {cols}");
    (rows, inner, cols)
}

/// Copies or adds bands of columns, each `(first column, [rows, width]
/// values)`, into `out` (`[rows, cols]`): the same single add per element
/// as a kernel's residual. The bands go back to the scratch pool.
pub(crate) fn put_column_bands(
    out: &mut [f32],
    cols: usize,
    accumulate: Accumulate,
    bands: Vec<(usize, Vec<f32>)>,
) {
    let rows = out.len() / cols;
    for (first, band) in bands {
        let width = band.len() / rows;
        for (out, band) in out.chunks_exact_mut(cols).zip(band.chunks_exact(width)) {
            let out = &mut out[first..][..width];
            match accumulate {
                Accumulate::Replace => out.copy_from_slice(band),
                Accumulate::Add => out.iter_mut().zip(band).for_each(|(o, b)| *o += b),
            }
        }
        scratch::recycle(band);
    }
}

/// A product's operands, ready to be computed in bands.
struct Bands<'a> {
    arch: pulp::Arch,
    lanes: usize,
    /// Read where it lies: row-major, or as its transpose `[inner, rows]`
    /// (the kernel's column input).
    a: Matrix<'a>,
    b: Matrix<'a>,
    inner: usize,
}

impl Bands<'_> {
    /// `b`'s `columns`, packed.
    fn pack(&self, columns: std::ops::Range<usize>) -> PackedPointwise {
        pack_columns(self.b, columns, self.lanes)
    }

    /// Rows `first_row..` of the product with the columns `packed` holds,
    /// plus `residual` (the same rows and columns) when given, into `out`
    /// (`[band rows, packed columns]`).
    fn rows_into(
        &self,
        packed: &PackedPointwise,
        first_row: usize,
        residual: Option<&[f32]>,
        out: &mut [f32],
    ) {
        let band_rows = out.len() / packed.n;
        let inner = self.inner;
        let input = match self.a.layout {
            Layout::RowMajor => {
                PointwiseInput::Rows(&self.a.values[first_row * inner..][..band_rows * inner])
            }
            Layout::Transposed => PointwiseInput::Columns {
                values: self.a.values,
                stride: self.a.rows,
                first: first_row,
            },
        };
        self.arch.dispatch(Pointwise {
            op: packed,
            pixels: band_rows,
            input,
            output: PointwiseOutput::Rows {
                values: out,
                residual,
            },
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::gemm::tests::values;

    /// Element `(row, col)` of `m`, read through its layout.
    fn at(m: &Matrix, row: usize, col: usize) -> f32 {
        match m.layout {
            Layout::RowMajor => m.values[row * m.cols + col],
            Layout::Transposed => m.values[col * m.rows + row],
        }
    }

    /// A product with `matmul`'s signature.
    pub(crate) type Product = fn(&mut [f32], Accumulate, Matrix<'_>, Matrix<'_>, Parallelism);

    /// Checks `product` on every `(rows, inner, cols)` of `shapes`, in every
    /// layout, replacing and accumulating, on one thread and the pool,
    /// against the textbook triple loop in f64 over the operands as
    /// `operand` sees them (rounded to bf16, say: each product stays exact).
    pub(crate) fn check_against_f64_sums(
        product: Product,
        operand: fn(f32) -> f32,
        shapes: &[(usize, usize, usize)],
    ) {
        for &(rows, inner, cols) in shapes {
            let (a_values, b_values) = (values(rows * inner, 1), values(inner * cols, 2));
            let old = values(rows * cols, 3);
            for (a_layout, b_layout) in [
                (Layout::RowMajor, Layout::RowMajor),
                (Layout::RowMajor, Layout::Transposed),
                (Layout::Transposed, Layout::RowMajor),
                (Layout::Transposed, Layout::Transposed),
            ] {
                let a = match a_layout {
                    Layout::RowMajor => Matrix::row_major(&a_values, rows, inner),
                    Layout::Transposed => Matrix::row_major(&a_values, inner, rows).transpose(),
                };
                let b = match b_layout {
                    Layout::RowMajor => Matrix::row_major(&b_values, inner, cols),
                    Layout::Transposed => Matrix::row_major(&b_values, cols, inner).transpose(),
                };
                for accumulate in [Accumulate::Replace, Accumulate::Add] {
                    for parallelism in [Parallelism::Sequential, Parallelism::Pool] {
                        let mut out = old.clone();
                        product(&mut out, accumulate, a, b, parallelism);
                        for row in 0..rows {
                            for col in 0..cols {
                                let mut sum = (0..inner)
                                    .map(|k| {
                                        operand(at(&a, row, k)) as f64
                                            * operand(at(&b, k, col)) as f64
                                    })
                                    .sum::<f64>();
                                if accumulate == Accumulate::Add {
                                    sum += old[row * cols + col] as f64;
                                }
                                let got = out[row * cols + col] as f64;
                                assert!(
                                    (got - sum).abs() <= 1e-4 * (1.0 + sum.abs()),
                                    "{rows}x{inner}x{cols} {a_layout:?} {b_layout:?} \
                                     {accumulate:?} {parallelism:?} ({row}, {col}): {got} vs {sum}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn products_in_every_layout_equal_a_plain_f64_sum() {
        check_against_f64_sums(
            matmul,
            |value| value,
            &[
                (1, 1, 1),
                (10, 256, 33),
                (256, 40, 10),
                (61, 7, 130),
                (5, 0, 3),
                // Long sums (passes over `k`), wide weight gradients (the
                // transposed product) and packing on the pool.
                (24, 3000, 100),
                (100, 2500, 24),
            ],
        );
    }

    #[test]
    fn every_element_is_one_fused_sum_over_inner_in_order() {
        // What keeps a run's numbers whatever the shape takes the product
        // through (passes over a long `inner`, the transposed product of a
        // wide weight gradient, packing on the pool): element (row, col) is
        // fma(a[row, k], b[k, col], ·) for k = 0, 1, ... from 0, then + the
        // old value when accumulating. Checked bit for bit against that
        // chain (f32::mul_add rounds once, as the kernels' FMA; the scalar
        // level multiplies, then adds).
        let fused = SimdLevel::in_force() != SimdLevel::Scalar;
        for &(rows, inner, cols) in &[(24, 3000, 100), (100, 2500, 24), (9, 40, 300)] {
            let (a_values, b_values) = (values(rows * inner, 7), values(inner * cols, 8));
            let old = values(rows * cols, 9);
            let a_stored = Matrix::row_major(&a_values, inner, rows).transpose();
            let a_rows = Matrix::row_major(&a_values, rows, inner);
            let b = Matrix::row_major(&b_values, inner, cols);
            for a in [a_stored, a_rows] {
                for accumulate in [Accumulate::Replace, Accumulate::Add] {
                    for parallelism in [Parallelism::Sequential, Parallelism::Pool] {
                        let mut out = old.clone();
                        matmul(&mut out, accumulate, a, b, parallelism);
                        for row in 0..rows {
                            for col in 0..cols {
                                let mut sum = (0..inner).fold(0f32, |sum, k| {
                                    let (x, y) = (at(&a, row, k), at(&b, k, col));
                                    if fused {
                                        x.mul_add(y, sum)
                                    } else {
                                        x * y + sum
                                    }
                                });
                                if accumulate == Accumulate::Add {
                                    sum += old[row * cols + col];
                                }
                                assert_eq!(
                                    out[row * cols + col].to_bits(),
                                    sum.to_bits(),
                                    "{rows}x{inner}x{cols} {:?} {accumulate:?} {parallelism:?} \
                                     ({row}, {col})",
                                    a.layout
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn an_element_does_not_depend_on_its_neighbours_or_the_threads() {
        // The stacked heads' guarantee: a column block of a wide product, and
        // a band of rows, equal the narrow products bit for bit; with many
        // rows (split into bands of rows on the pool) and with few (bands of
        // columns).
        let (inner, cols) = (96, 170);
        let b_values = values(cols * inner, 5);
        let b = Matrix::row_major(&b_values, cols, inner).transpose();
        let (first, narrow_cols) = (57, 10);
        let b_narrow = Matrix::row_major(
            &b_values[first * inner..][..narrow_cols * inner],
            narrow_cols,
            inner,
        )
        .transpose();
        for rows in [300, 10] {
            let a_values = values(rows * inner, 4);
            let a = Matrix::row_major(&a_values, rows, inner);
            let mut wide = vec![0.0; rows * cols];
            matmul(&mut wide, Accumulate::Replace, a, b, Parallelism::Pool);
            let a_band = Matrix::row_major(&a_values[..7 * inner], 7, inner);
            let mut narrow = vec![0.0; 7 * narrow_cols];
            matmul(
                &mut narrow,
                Accumulate::Replace,
                a_band,
                b_narrow,
                Parallelism::Sequential,
            );
            for row in 0..7 {
                for col in 0..narrow_cols {
                    assert_eq!(
                        wide[row * cols + first + col].to_bits(),
                        narrow[row * narrow_cols + col].to_bits(),
                        "{rows} rows: ({row}, {col})"
                    );
                }
            }
        }
    }
}

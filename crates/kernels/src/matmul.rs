//! Dense f32 matrix products for the training steps (the heads' layers and
//! the fine-tuned blocks' 1×1 convolutions):
//! `out[rows, cols] (+)= a[rows, inner] × b[inner, cols]`, either operand
//! stored row-major or as its transpose.
//!
//! Built on the pointwise kernel ([`crate::gemm`]): `b` is packed into panels
//! of whole vectors, `a`'s rows are its "pixels" (a transposed `a` is copied
//! to rows first), and an accumulating product adds the old `out` as the
//! kernel's residual. Every output element is one sum over `inner` in order,
//! from zero, whatever the rows, columns or threads: a head's numbers do not
//! depend on the heads stacked beside it in one product (the sweep trains
//! them together and checks each against the head alone).

use std::borrow::Cow;

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
    let level = SimdLevel::in_force();
    let lanes = level.lanes();
    let product = Bands {
        arch: level.arch().expect("a level this CPU runs"),
        lanes,
        a_rows: match a.layout {
            Layout::RowMajor => Cow::Borrowed(a.values),
            Layout::Transposed => Cow::Owned(transposed(a.values, inner, rows)),
        },
        b,
        inner,
        cols,
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
                let mut band = vec![0.0; rows * packed.n];
                product.rows_into(&packed, 0, None, &mut band);
                (first, band)
            })
            .collect();
        put_column_bands(out, cols, accumulate, bands);
        product.recycle();
        return;
    }
    let packed = product.pack(0..cols);
    let residual = (accumulate == Accumulate::Add).then(|| out.to_vec());
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
    product.recycle();
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
    /// `a` as row-major `[rows, inner]`.
    a_rows: Cow<'a, [f32]>,
    b: Matrix<'a>,
    inner: usize,
    cols: usize,
}

impl Bands<'_> {
    /// Gives a transposed copy of `a` back to the scratch pool.
    fn recycle(self) {
        if let Cow::Owned(values) = self.a_rows {
            scratch::recycle(values);
        }
    }

    /// `b`'s `columns`, packed.
    fn pack(&self, columns: std::ops::Range<usize>) -> PackedPointwise {
        let layout = match self.b.layout {
            Layout::RowMajor => WeightLayout::InputMajor,
            Layout::Transposed => WeightLayout::OutputMajor,
        };
        PackedPointwise::from_matrix(
            self.b.values,
            layout,
            self.inner,
            self.cols,
            columns,
            self.lanes,
        )
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
        self.arch.dispatch(Pointwise {
            op: packed,
            pixels: band_rows,
            input: PointwiseInput::Rows(&self.a_rows[first_row * inner..][..band_rows * inner]),
            output: PointwiseOutput::Rows {
                values: out,
                residual,
            },
        })
    }
}

/// `[rows, cols]` row-major values of a matrix stored as `[cols, rows]`.
fn transposed(values: &[f32], stored_rows: usize, stored_cols: usize) -> Vec<f32> {
    const TILE: usize = 32;
    // Every element is written below.
    let mut out = scratch::overwritten(values.len());
    if values.is_empty() {
        return out;
    }
    // Bands of TILE output rows (stored columns) in parallel: the weight
    // gradients' transposes of a whole batch's deltas are tens of MB.
    out.par_chunks_mut(TILE * stored_rows)
        .enumerate()
        .for_each(|(band_index, band)| {
            let first_col = band_index * TILE;
            for row_tile in (0..stored_rows).step_by(TILE) {
                let rows = row_tile..(row_tile + TILE).min(stored_rows);
                for (col, out_row) in band.chunks_exact_mut(stored_rows).enumerate() {
                    for row in rows.clone() {
                        out_row[row] = values[row * stored_cols + first_col + col];
                    }
                }
            }
        });
    out
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
            ],
        );
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

//! The numeric side of anomaly scoring: standardisation fitted on normal
//! rows, the k-NN memory bank with its greedy k-center coreset, and the
//! Gaussian (Ledoit-Wolf shrunk covariance) for Mahalanobis distances.
//!
//! Distances are computed in blocks: a block of query rows against a block of
//! bank rows as one matrix product (`|q|^2 + |b|^2 - 2 q.b`), so no more than
//! `query block x bank block` distances exist at once, whatever the sizes.

use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use crate::features::FeatureSet;
use crate::train::TrainError;

/// Query rows scored per block (one matrix product each).
pub const QUERY_BLOCK: usize = 256;
/// Rows read per block when accumulating Gaussian statistics.
const FIT_BLOCK: usize = 1024;

/// Per-dimension mean and standard deviation of the normal training rows.
#[derive(Debug, Clone)]
pub struct Standardiser {
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
    inverse_std: Vec<f32>,
}

impl Standardiser {
    /// Statistics over `rows`, accumulated in f64; a constant dimension gets
    /// std 1 (as classification does), so it standardises to zero.
    pub fn fit(features: &FeatureSet, rows: &[usize]) -> Self {
        let dim = features.feature_dim();
        let mut sum = vec![0f64; dim];
        let mut sum_sq = vec![0f64; dim];
        for &row in rows {
            for (d, v) in features.pooled(row).iter().enumerate() {
                let v = v.to_f64();
                sum[d] += v;
                sum_sq[d] += v * v;
            }
        }
        Self::from_sums(&sum, &sum_sq, rows.len())
    }

    fn from_sums(sum: &[f64], sum_sq: &[f64], rows: usize) -> Self {
        let n = rows.max(1) as f64;
        let mean: Vec<f64> = sum.iter().map(|s| s / n).collect();
        let std: Vec<f32> = sum_sq
            .iter()
            .zip(&mean)
            .map(|(sq, m)| {
                let var = (sq / n - m * m).max(0.0);
                if var < 1e-12 { 1.0 } else { var.sqrt() as f32 }
            })
            .collect();
        Standardiser {
            mean: mean.into_iter().map(|m| m as f32).collect(),
            inverse_std: std.iter().map(|s| 1.0 / s).collect(),
            std,
        }
    }

    /// Rebuilds saved statistics.
    pub fn from_parts(mean: Vec<f32>, std: Vec<f32>) -> Self {
        Standardiser {
            inverse_std: std.iter().map(|s| 1.0 / s).collect(),
            mean,
            std,
        }
    }

    /// Standardises rows of raw values in place.
    pub fn standardise(&self, mut values: Vec<f32>) -> Vec<f32> {
        self.standardise_in_place(&mut values);
        values
    }

    /// Standardises rows of raw values where they are.
    pub fn standardise_in_place(&self, values: &mut [f32]) {
        lazarus_kernels::neighbours::standardise_rows(values, &self.mean, &self.inverse_std);
    }

    /// Standardised f32 copy of the given rows only.
    pub fn gather(&self, features: &FeatureSet, rows: &[usize]) -> Vec<f32> {
        use half::slice::HalfFloatSliceExt;
        let dim = features.feature_dim();
        let mut out = vec![0f32; rows.len() * dim];
        for (values, &row) in out.chunks_mut(dim).zip(rows) {
            features.pooled(row).convert_to_f32_slice(values);
        }
        self.standardise_in_place(&mut out);
        out
    }
}

/// Greedy k-center selection (as PatchCore's coreset): start from a seeded
/// random row, then repeatedly add the row farthest from everything chosen.
/// Returns `count` row positions in `points` (`rows x dim`), in the order
/// chosen. O(count x rows x dim) time, O(rows) extra memory.
pub fn greedy_coreset(points: &[f32], dim: usize, count: usize, seed: u64) -> Vec<usize> {
    let rows = points.len() / dim;
    let count = count.min(rows);
    if count == 0 {
        return Vec::new();
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut chosen = Vec::with_capacity(count);
    let mut nearest = vec![f32::INFINITY; rows];
    let mut next = rng.random_range(0..rows);
    while chosen.len() < count {
        chosen.push(next);
        let centre = &points[next * dim..(next + 1) * dim];
        lazarus_kernels::neighbours::lower_nearest_squared_distances(&mut nearest, points, centre);
        // The farthest row; ties go to the lowest position.
        next = 0;
        for (i, &d) in nearest.iter().enumerate() {
            if d > nearest[next] {
                next = i;
            }
        }
    }
    chosen
}

/// Bank rows per distance block on the CPU: their products with a query
/// block (`2048 x QUERY_BLOCK` f32, 2 MiB) are reused from block to block
/// and stay in cache while the nearest are kept.
const HOST_BANK_TILE: usize = 2048;

/// Where a memory bank's rows live.
enum BankRows {
    /// On the CPU: products by the kernels crate's matmul into one reused
    /// buffer (candle's would allocate and fault in a fresh product, then a
    /// nested copy of it, for every block).
    Host(Vec<f32>),
    /// On an accelerator: products by candle.
    Device(Tensor),
}

/// Standardised normal rows that queries are compared with.
pub struct MemoryBank {
    /// `len() x dim`, row-major.
    rows: BankRows,
    dim: usize,
    squared_norms: Vec<f32>,
}

impl MemoryBank {
    pub fn new(values: Vec<f32>, dim: usize, device: &Device) -> Result<Self, TrainError> {
        let count = values.len() / dim;
        let squared_norms = values
            .chunks(dim)
            .map(|row| row.iter().map(|v| v * v).sum())
            .collect();
        let rows = if device.is_cpu() {
            BankRows::Host(values)
        } else {
            BankRows::Device(Tensor::from_vec(values, (count, dim), device)?)
        };
        Ok(MemoryBank {
            rows,
            dim,
            squared_norms,
        })
    }

    pub fn len(&self) -> usize {
        self.squared_norms.len()
    }

    pub fn is_empty(&self) -> bool {
        self.squared_norms.is_empty()
    }

    /// The rows as a CPU tensor `[len, dim]` (what scorer files store).
    pub fn to_cpu_tensor(&self) -> Result<Tensor, TrainError> {
        Ok(match &self.rows {
            BankRows::Host(values) => {
                Tensor::from_slice(values, (self.len(), self.dim), &Device::Cpu)?
            }
            BankRows::Device(rows) => rows.to_device(&Device::Cpu)?,
        })
    }

    /// Mean Euclidean distance of each query row (`queries x dim`) to its
    /// `k` nearest bank rows. The bank is read in blocks of at most
    /// `bank_block` rows, so at most `queries x bank_block` distances exist
    /// at once.
    pub fn knn_scores(
        &self,
        queries: &[f32],
        dim: usize,
        k: usize,
        bank_block: usize,
    ) -> Result<Vec<f64>, TrainError> {
        let count = queries.len() / dim;
        if k == 0 || k > self.len() {
            return Err(TrainError::Invalid(format!(
                "k = {k} must be between 1 and the memory bank's {} rows",
                self.len()
            )));
        }
        if dim != self.dim {
            return Err(TrainError::Invalid(format!(
                "queries of {dim} values against a memory bank of {}",
                self.dim
            )));
        }
        let query_norms: Vec<f32> = queries
            .chunks(dim)
            .map(|row| row.iter().map(|v| v * v).sum())
            .collect();
        // The k smallest squared distances per query, ascending.
        let mut nearest: Vec<Vec<f32>> = vec![Vec::with_capacity(k + 1); count];
        let mut keep = |start: usize, length: usize, products: &[f32]| {
            let norms = &self.squared_norms[start..start + length];
            lazarus_kernels::neighbours::keep_k_nearest(
                &mut nearest,
                products,
                &query_norms,
                norms,
                k,
            );
        };
        match &self.rows {
            BankRows::Host(values) => {
                use lazarus_kernels::matmul::{Accumulate, Matrix, Parallelism, matmul};
                // Bank rows times the queries: the kernel packs the small
                // query block once per tile and streams the bank's rows.
                let block = bank_block.clamp(1, HOST_BANK_TILE);
                let mut products = vec![0f32; block.min(self.len()) * count];
                let q = Matrix::row_major(queries, count, dim).transpose();
                for start in (0..self.len()).step_by(block) {
                    let length = block.min(self.len() - start);
                    let out = &mut products[..length * count];
                    let rows = Matrix::row_major(
                        &values[start * dim..(start + length) * dim],
                        length,
                        dim,
                    );
                    matmul(out, Accumulate::Replace, rows, q, Parallelism::Pool);
                    keep(start, length, out);
                }
            }
            BankRows::Device(rows) => {
                let q = Tensor::from_slice(queries, (count, dim), rows.device())?;
                let block = bank_block.max(1);
                for start in (0..self.len()).step_by(block) {
                    let length = block.min(self.len() - start);
                    let products = rows
                        .narrow(0, start, length)?
                        .matmul(&q.t()?)?
                        .flatten_all()?
                        .to_vec1::<f32>()?;
                    keep(start, length, &products);
                }
            }
        }
        Ok(nearest
            .iter()
            .map(|best| best.iter().map(|&d| (d as f64).sqrt()).sum::<f64>() / k as f64)
            .collect())
    }
}

/// A Gaussian fitted on standardised normal rows: mean, and the whitening
/// matrix `W = L^-1` of the Cholesky factor of the shrunk covariance
/// (`covariance = L L^T`, so the precision matrix is `W^T W` and the squared
/// Mahalanobis distance of `x` is `|W (x - mean)|^2`).
pub struct Gaussian {
    pub mean: Vec<f32>,
    /// `dim x dim`, row-major, lower triangular.
    pub whitening: Vec<f32>,
    /// Ledoit-Wolf shrinkage towards `trace/dim x I`, in [0, 1].
    pub shrinkage: f64,
    dim: usize,
}

/// Bytes the Gaussian fit holds at once: scatter, factor and inverse in f64,
/// and the f32 whitening matrix.
pub fn gaussian_fit_bytes(dim: usize) -> u64 {
    let square = (dim * dim) as u64;
    square * (8 * 3 + 4)
}

impl Gaussian {
    /// Fits mean and Ledoit-Wolf covariance on `rows`, read in blocks.
    ///
    /// The shrinkage follows scikit-learn's `ledoit_wolf` (centred data, 1/n
    /// covariance): with `S` the empirical covariance, `mu = trace(S)/p`,
    /// `delta = (|S|_F^2 - p mu^2) / p`,
    /// `beta = (sum_k |x_k|^4 / n - |S|_F^2) / (p n)`, the shrinkage is
    /// `min(beta, delta) / delta` and the covariance `(1-s) S + s mu I`.
    pub fn fit(
        features: &FeatureSet,
        rows: &[usize],
        standardiser: &Standardiser,
        device: &Device,
    ) -> Result<Self, TrainError> {
        let blocks = || {
            rows.chunks(FIT_BLOCK)
                .map(|block| standardiser.gather(features, block))
        };
        Self::fit_blocks(features.feature_dim(), rows.len(), blocks, device)
    }

    /// The same fit on rows already standardised in memory (`rows x dim`):
    /// the per-position Gaussians of patch scoring.
    pub fn fit_rows(values: &[f32], dim: usize, device: &Device) -> Result<Self, TrainError> {
        let blocks = || values.chunks(FIT_BLOCK * dim).map(<[f32]>::to_vec);
        Self::fit_blocks(dim, values.len() / dim, blocks, device)
    }

    /// The fit over `n` standardised rows that `blocks` yields (twice: the
    /// mean first, then the centred scatter and fourth moment).
    fn fit_blocks<I: Iterator<Item = Vec<f32>>>(
        dim: usize,
        n: usize,
        blocks: impl Fn() -> I,
        device: &Device,
    ) -> Result<Self, TrainError> {
        if n < 2 {
            return Err(TrainError::Invalid(format!(
                "a Gaussian needs at least 2 normal training rows, got {n}"
            )));
        }
        let mut mean = vec![0f64; dim];
        for block in blocks() {
            for row in block.chunks(dim) {
                for (m, v) in mean.iter_mut().zip(row) {
                    *m += *v as f64;
                }
            }
        }
        mean.iter_mut().for_each(|m| *m /= n as f64);
        let mut scatter = Tensor::zeros((dim, dim), DType::F64, device)?;
        let mut fourth_moment = 0f64;
        for block in blocks() {
            let centred: Vec<f64> = block
                .chunks(dim)
                .flat_map(|row| row.iter().zip(&mean).map(|(v, m)| *v as f64 - m))
                .collect();
            for row in centred.chunks(dim) {
                let squared: f64 = row.iter().map(|v| v * v).sum();
                fourth_moment += squared * squared;
            }
            let x = Tensor::from_vec(centred, (block.len() / dim, dim), device)?;
            scatter = (scatter + x.t()?.matmul(&x)?)?;
        }
        let mut covariance: Vec<f64> = (scatter / n as f64)?.flatten_all()?.to_vec1::<f64>()?;
        let shrinkage = ledoit_wolf_shrinkage(&covariance, dim, n, fourth_moment);
        let mu = (0..dim).map(|i| covariance[i * dim + i]).sum::<f64>() / dim as f64;
        covariance.iter_mut().for_each(|v| *v *= 1.0 - shrinkage);
        for i in 0..dim {
            covariance[i * dim + i] += shrinkage * mu;
        }
        let factor = cholesky(&covariance, dim)?;
        let whitening = lower_triangular_inverse(&factor, dim);
        Ok(Gaussian {
            mean: mean.into_iter().map(|m| m as f32).collect(),
            whitening: whitening.into_iter().map(|v| v as f32).collect(),
            shrinkage,
            dim,
        })
    }

    /// Rebuilds a fitted Gaussian from its saved tensors.
    pub fn from_parts(mean: Vec<f32>, whitening: Vec<f32>, shrinkage: f64) -> Self {
        let dim = mean.len();
        Gaussian {
            mean,
            whitening,
            shrinkage,
            dim,
        }
    }

    /// Mahalanobis distance of each row of `queries` (`rows x dim`, standardised).
    pub fn scores(&self, queries: &[f32], device: &Device) -> Result<Vec<f64>, TrainError> {
        let dim = self.dim;
        let count = queries.len() / dim;
        let centred: Vec<f32> = queries
            .chunks(dim)
            .flat_map(|row| row.iter().zip(&self.mean).map(|(v, m)| v - m))
            .collect();
        let x = Tensor::from_vec(centred, (count, dim), device)?;
        let w = Tensor::from_slice(&self.whitening, (dim, dim), device)?;
        let whitened = x.matmul(&w.t()?)?.sqr()?.sum(1)?.to_vec1::<f32>()?;
        Ok(whitened.into_iter().map(|d| (d as f64).sqrt()).collect())
    }
}

/// Ledoit-Wolf shrinkage of the empirical covariance `covariance` (1/n, of
/// centred rows) of `n` rows, given `fourth_moment = sum_k |x_k|^4`.
fn ledoit_wolf_shrinkage(covariance: &[f64], dim: usize, n: usize, fourth_moment: f64) -> f64 {
    let (nf, p) = (n as f64, dim as f64);
    let mu = (0..dim).map(|i| covariance[i * dim + i]).sum::<f64>() / p;
    let frobenius_sq: f64 = covariance.iter().map(|v| v * v).sum();
    let delta = (frobenius_sq - p * mu * mu) / p;
    let beta = ((fourth_moment / nf - frobenius_sq) / (p * nf)).min(delta);
    if delta <= 0.0 || beta <= 0.0 {
        0.0
    } else {
        beta / delta
    }
}

/// Cholesky factor `L` (lower triangular, row-major) of a symmetric positive
/// definite matrix, computed in place of its lower triangle.
fn cholesky(matrix: &[f64], dim: usize) -> Result<Vec<f64>, TrainError> {
    let mut factor = vec![0f64; dim * dim];
    for j in 0..dim {
        let row_j: Vec<f64> = factor[j * dim..j * dim + j].to_vec();
        let diagonal = matrix[j * dim + j] - row_j.iter().map(|v| v * v).sum::<f64>();
        if !(diagonal > 0.0 && diagonal.is_finite()) {
            return Err(TrainError::Invalid(format!(
                "the covariance of the normal training rows is not positive definite \
                 (pivot {diagonal:e} at dimension {j}); use more normal images or the knn scorer"
            )));
        }
        let pivot = diagonal.sqrt();
        factor[j * dim + j] = pivot;
        // Column j below the diagonal; each row depends only on rows < j.
        factor[(j + 1) * dim..]
            .par_chunks_mut(dim)
            .enumerate()
            .for_each(|(offset, row)| {
                let i = j + 1 + offset;
                let dot: f64 = row[..j].iter().zip(&row_j).map(|(a, b)| a * b).sum();
                row[j] = (matrix[i * dim + j] - dot) / pivot;
            });
    }
    Ok(factor)
}

/// `L^-1` of a lower-triangular `L` (row-major), one column at a time by
/// forward substitution.
fn lower_triangular_inverse(factor: &[f64], dim: usize) -> Vec<f64> {
    let columns: Vec<Vec<f64>> = (0..dim)
        .into_par_iter()
        .map(|j| {
            // Column j of the inverse is zero above the diagonal.
            let mut column = vec![0f64; dim];
            column[j] = 1.0 / factor[j * dim + j];
            for i in j + 1..dim {
                let row = &factor[i * dim..i * dim + i];
                let dot: f64 = row[j..].iter().zip(&column[j..i]).map(|(a, b)| a * b).sum();
                column[i] = -dot / factor[i * dim + i];
            }
            column
        })
        .collect();
    let mut inverse = vec![0f64; dim * dim];
    for (j, column) in columns.iter().enumerate() {
        for (i, v) in column.iter().enumerate().skip(j) {
            inverse[i * dim + j] = *v;
        }
    }
    inverse
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cholesky_inverse_whitens_a_known_matrix() {
        // A = [[4, 2, 0.4], [2, 5, 1], [0.4, 1, 3]]; L L^T = A and W = L^-1
        // must give W A W^T = I (checked entry by entry).
        let a = [4.0, 2.0, 0.4, 2.0, 5.0, 1.0, 0.4, 1.0, 3.0];
        let l = cholesky(&a, 3).unwrap();
        // Hand-computed first column of L: 2, 1, 0.2.
        assert!((l[0] - 2.0).abs() < 1e-12 && (l[3] - 1.0).abs() < 1e-12);
        assert!((l[6] - 0.2).abs() < 1e-12);
        let w = lower_triangular_inverse(&l, 3);
        for i in 0..3 {
            for j in 0..3 {
                let mut v = 0.0;
                for r in 0..3 {
                    for c in 0..3 {
                        v += w[i * 3 + r] * a[r * 3 + c] * w[j * 3 + c];
                    }
                }
                let want = if i == j { 1.0 } else { 0.0 };
                assert!((v - want).abs() < 1e-12, "W A W^T [{i}][{j}] = {v}");
            }
        }
        let err = cholesky(&[1.0, 1.0, 1.0, 1.0], 2).unwrap_err().to_string();
        assert!(err.contains("not positive definite"), "{err}");
    }

    #[test]
    fn knn_scores_are_mean_distances_to_the_nearest_rows_in_any_block_size() {
        // Bank on a line: 0, 1, 3, 7 (dim 2, second coordinate 0).
        let bank = MemoryBank::new(
            vec![0.0, 0.0, 1.0, 0.0, 3.0, 0.0, 7.0, 0.0],
            2,
            &Device::Cpu,
        )
        .unwrap();
        // Query (2, 0): distances 2, 1, 1, 5 -> k=1: 1; k=3: (1 + 1 + 2)/3.
        let queries = [2.0, 0.0, 7.0, 3.0];
        for block in [1, 2, 3, 4, 100] {
            let k1 = bank.knn_scores(&queries, 2, 1, block).unwrap();
            assert!((k1[0] - 1.0).abs() < 1e-6 && (k1[1] - 3.0).abs() < 1e-6);
            let k3 = bank.knn_scores(&queries, 2, 3, block).unwrap();
            assert!((k3[0] - 4.0 / 3.0).abs() < 1e-6, "{k3:?}");
        }
        let err = bank.knn_scores(&queries, 2, 5, 4).unwrap_err().to_string();
        assert!(err.contains("k = 5") && err.contains("4 rows"), "{err}");
    }

    #[test]
    fn knn_scores_over_many_bank_tiles_equal_a_plain_search() {
        // More rows than one CPU tile, odd sizes; checked against an f64
        // brute-force search over every bank row.
        let (rows, queries, dim) = (2 * HOST_BANK_TILE + 37, 45, 11);
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let bank_values: Vec<f32> = (0..rows * dim)
            .map(|_| rng.random_range(-1.0..1.0))
            .collect();
        let query_values: Vec<f32> = (0..queries * dim)
            .map(|_| rng.random_range(-1.0..1.0))
            .collect();
        let bank = MemoryBank::new(bank_values.clone(), dim, &Device::Cpu).unwrap();
        for k in [1, 4] {
            let expected: Vec<f64> = query_values
                .chunks(dim)
                .map(|q| {
                    let mut d: Vec<f64> = bank_values
                        .chunks(dim)
                        .map(|b| {
                            let s: f64 =
                                q.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
                            s.sqrt()
                        })
                        .collect();
                    d.sort_by(f64::total_cmp);
                    d[..k].iter().sum::<f64>() / k as f64
                })
                .collect();
            for block in [7, HOST_BANK_TILE, rows] {
                let got = bank.knn_scores(&query_values, dim, k, block).unwrap();
                for (g, e) in got.iter().zip(&expected) {
                    assert!((g - e).abs() < 1e-4, "k {k} block {block}: {g} against {e}");
                }
            }
        }
        let tensor = bank.to_cpu_tensor().unwrap();
        assert_eq!(tensor.dims(), [rows, dim]);
        assert_eq!(
            tensor.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            bank_values
        );
    }

    #[test]
    fn coreset_picks_the_farthest_points_first() {
        // Two tight clusters and one outlier: after the seeded start, the
        // outlier and the other cluster are picked before any near-duplicate.
        let points = [0.0, 0.1, 0.2, 10.0, 10.1, 100.0];
        let chosen = greedy_coreset(&points, 1, 3, 0);
        let mut values: Vec<f32> = chosen.iter().map(|&i| points[i]).collect();
        values.sort_by(f32::total_cmp);
        assert_eq!(values.len(), 3);
        assert!(values[0] <= 0.2 && (10.0..=10.1).contains(&values[1]) && values[2] == 100.0);
        assert_eq!(chosen, greedy_coreset(&points, 1, 3, 0), "seeded");
    }

    #[test]
    fn ledoit_wolf_shrinkage_matches_scikit_learn() {
        // x_k = (sin k, sin k + 0.3 cos 2k, cos 3k), k = 0..11. Reference:
        // scikit-learn 1.9.1 `sklearn.covariance.ledoit_wolf(X)` gives
        // shrinkage 0.3045759491376417 and shrunk covariance [0][1] 0.34806279.
        let rows: Vec<[f64; 3]> = (0..12)
            .map(|k| {
                let k = k as f64;
                [k.sin(), k.sin() + 0.3 * (2.0 * k).cos(), (3.0 * k).cos()]
            })
            .collect();
        let mean: Vec<f64> = (0..3)
            .map(|d| rows.iter().map(|r| r[d]).sum::<f64>() / 12.0)
            .collect();
        let centred: Vec<Vec<f64>> = rows
            .iter()
            .map(|r| (0..3).map(|d| r[d] - mean[d]).collect())
            .collect();
        let mut covariance = vec![0.0; 9];
        for r in &centred {
            for i in 0..3 {
                for j in 0..3 {
                    covariance[i * 3 + j] += r[i] * r[j] / 12.0;
                }
            }
        }
        let fourth: f64 = centred
            .iter()
            .map(|r| r.iter().map(|v| v * v).sum::<f64>().powi(2))
            .sum();
        let shrinkage = ledoit_wolf_shrinkage(&covariance, 3, 12, fourth);
        assert!(
            (shrinkage - 0.3045759491376417).abs() < 1e-12,
            "{shrinkage}"
        );
        let shrunk = (1.0 - shrinkage) * covariance[1];
        assert!((shrunk - 0.34806279).abs() < 1e-8, "{shrunk}");
    }
}

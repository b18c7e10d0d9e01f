//! Distances of the anomaly scorers (`lazarus::train::anomaly`): the greedy
//! coreset's step, the k nearest memory-bank rows of each query, and the
//! standardisation of rows (theirs and the heads' batch gather's). Each
//! function holds its whole loop, so it runs
//! as compiled here (opt-level 3).

use rayon::prelude::*;

/// Lowers each `nearest[i]` to the squared distance from row `i` of `points`
/// (`[rows, centre.len()]`) to `centre` where that is smaller: one step of a
/// greedy (farthest-point) coreset.
pub fn lower_nearest_squared_distances(nearest: &mut [f32], points: &[f32], centre: &[f32]) {
    nearest
        .par_iter_mut()
        .zip(points.par_chunks(centre.len()))
        .for_each(|(best, row)| {
            let d: f32 = row.iter().zip(centre).map(|(a, b)| (a - b) * (a - b)).sum();
            if d < *best {
                *best = d;
            }
        });
}

/// Keeps in `nearest[q]` (ascending, at most `k`) the smallest squared
/// distances from query `q` to a block of bank rows, given the block's dot
/// products with the queries (`products[q][row]`) and the squared norms of
/// queries and rows: `|q|² + |r|² - 2 q·r`, clamped at 0.
pub fn keep_k_nearest(
    nearest: &mut [Vec<f32>],
    products: &[Vec<f32>],
    query_norms: &[f32],
    bank_norms: &[f32],
    k: usize,
) {
    nearest
        .par_iter_mut()
        .zip(products.par_iter())
        .zip(query_norms.par_iter())
        .for_each(|((best, dots), query_norm)| {
            for (dot, bank_norm) in dots.iter().zip(bank_norms) {
                let d = (query_norm + bank_norm - 2.0 * dot).max(0.0);
                if best.len() < k || d < best[k - 1] {
                    let at = best.partition_point(|&b| b <= d);
                    best.insert(at, d);
                    best.truncate(k);
                }
            }
        });
}

/// `(v - mean) · inverse_std` per column of `values` (`[rows, mean.len()]`),
/// in place, rows spread over the pool.
pub fn standardise_rows(values: &mut [f32], mean: &[f32], inverse_std: &[f32]) {
    values
        .par_chunks_mut(mean.len())
        .for_each(|row| standardise_row(row, mean, inverse_std));
}

/// [`standardise_rows`] of one row, on the calling thread (the heads' batch
/// gather, which already spreads its rows over the pool).
pub fn standardise_row(row: &mut [f32], mean: &[f32], inverse_std: &[f32]) {
    assert!(row.len() == mean.len() && mean.len() == inverse_std.len());
    for ((v, mean), inverse_std) in row.iter_mut().zip(mean).zip(inverse_std) {
        *v = (*v - mean) * inverse_std;
    }
}

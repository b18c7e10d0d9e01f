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

/// Queries whose distances one task of [`keep_k_nearest`] keeps.
const QUERY_CHUNK: usize = 64;

/// Keeps in `nearest[q]` (ascending, at most `k`) the smallest squared
/// distances from query `q` to a block of bank rows, given the block's dot
/// products with the queries (`products`, row-major `[bank_norms.len(),
/// queries]`: a bank row's products with every query side by side) and the
/// squared norms of queries and rows: `|q|² + |r|² - 2 q·r`, clamped at 0.
pub fn keep_k_nearest(
    nearest: &mut [Vec<f32>],
    products: &[f32],
    query_norms: &[f32],
    bank_norms: &[f32],
    k: usize,
) {
    let queries = query_norms.len();
    assert_eq!(nearest.len(), queries);
    assert_eq!(products.len(), queries * bank_norms.len());
    nearest
        .par_chunks_mut(QUERY_CHUNK)
        .zip(query_norms.par_chunks(QUERY_CHUNK))
        .enumerate()
        .for_each(|(chunk, (best, query_norms))| {
            let first = chunk * QUERY_CHUNK;
            let width = query_norms.len();
            // A distance enters `best` only below its k-th: checked for the
            // whole chunk at once, inserted one by one when any is.
            let mut limit = [f32::INFINITY; QUERY_CHUNK];
            for (l, b) in limit.iter_mut().zip(best.iter()) {
                if b.len() == k {
                    *l = b[k - 1];
                }
            }
            let mut distance = [0f32; QUERY_CHUNK];
            for (row, bank_norm) in bank_norms.iter().enumerate() {
                let dots = &products[row * queries + first..row * queries + first + width];
                let mut any = false;
                for (((d, dot), query_norm), l) in
                    distance.iter_mut().zip(dots).zip(query_norms).zip(&limit)
                {
                    *d = (query_norm + bank_norm - 2.0 * dot).max(0.0);
                    any |= *d < *l;
                }
                if !any {
                    continue;
                }
                for ((b, &d), l) in best.iter_mut().zip(&distance).zip(limit.iter_mut()) {
                    if d < *l {
                        let at = b.partition_point(|&x| x <= d);
                        b.insert(at, d);
                        b.truncate(k);
                        if b.len() == k {
                            *l = b[k - 1];
                        }
                    }
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

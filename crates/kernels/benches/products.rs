//! Benchmark: the matrix products of one fine-tuning step of Lite0's blocks
//! 5..=15 and head convolution (`--unfreeze-from 4`, the best elpv
//! configuration), batch 32 of 224 px images (a 28 × 28 cached map): per
//! 1×1 convolution, the forward product, the weight gradient (deltas by
//! activations, summed over every pixel of the batch) and the input
//! gradient, on the rayon pool. Prints GFLOP/s per shape and the
//! milliseconds of each kind per batch, best of `LAZARUS_BENCH_ITERS` (10).
//!
//! `cargo bench -p lazarus-kernels --bench products` (release profile) or
//! with `--profile dev` (the profile `scripts/build.sh` builds `lazarus` in).

use std::time::Instant;

use lazarus_kernels::matmul::{Accumulate, Matrix, Parallelism, matmul};

/// Deterministic values in [-0.5, 0.5] (the arithmetic does not depend on
/// them).
fn values(len: usize, seed: u64) -> Vec<f32> {
    (0..len)
        .map(|i| 0.5 * ((i as f32) * 0.618 + seed as f32).sin())
        .collect()
}

/// `(pixels of the batch, input channels, output channels)` of every 1×1
/// convolution of blocks 5..=15 and the head, in order.
fn convolutions() -> Vec<(usize, usize, usize)> {
    let (s28, s14, s7) = (32 * 28 * 28, 32 * 14 * 14, 32 * 7 * 7);
    let mut shapes = vec![(s28, 40, 240), (s14, 240, 80)];
    for _ in 0..2 {
        shapes.extend([(s14, 80, 480), (s14, 480, 80)]);
    }
    shapes.extend([(s14, 80, 480), (s14, 480, 112)]);
    for _ in 0..2 {
        shapes.extend([(s14, 112, 672), (s14, 672, 112)]);
    }
    shapes.extend([(s14, 112, 672), (s7, 672, 192)]);
    for _ in 0..3 {
        shapes.extend([(s7, 192, 1152), (s7, 1152, 192)]);
    }
    shapes.extend([(s7, 192, 1152), (s7, 1152, 320), (s7, 320, 1280)]);
    shapes
}

fn main() {
    let iterations: usize = std::env::var("LAZARUS_BENCH_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    println!(
        "SIMD level {}, {} threads",
        lazarus_kernels::SimdLevel::in_force(),
        rayon::current_num_threads()
    );
    let mut totals = [0.0f64; 3];
    for (pixels, inputs, outputs) in convolutions() {
        let activations = values(pixels * inputs, 1);
        let weight = values(outputs * inputs, 2);
        let deltas = values(pixels * outputs, 3);
        let mut output = vec![0.0; pixels * outputs];
        let mut weight_gradient = vec![0.0; outputs * inputs];
        let mut input_gradient = vec![0.0; pixels * inputs];
        let mut best = [f64::INFINITY; 3];
        for _ in 0..iterations {
            let timed = |product: &mut dyn FnMut()| {
                let started = Instant::now();
                product();
                started.elapsed().as_secs_f64()
            };
            // output[pixels, out] = activations × weightᵀ
            best[0] = best[0].min(timed(&mut || {
                matmul(
                    &mut output,
                    Accumulate::Replace,
                    Matrix::row_major(&activations, pixels, inputs),
                    Matrix::row_major(&weight, outputs, inputs).transpose(),
                    Parallelism::Pool,
                )
            }));
            // d weight[out, in] += deltasᵀ × activations
            best[1] = best[1].min(timed(&mut || {
                matmul(
                    &mut weight_gradient,
                    Accumulate::Add,
                    Matrix::row_major(&deltas, pixels, outputs).transpose(),
                    Matrix::row_major(&activations, pixels, inputs),
                    Parallelism::Pool,
                )
            }));
            // d input[pixels, in] = deltas × weight
            best[2] = best[2].min(timed(&mut || {
                matmul(
                    &mut input_gradient,
                    Accumulate::Replace,
                    Matrix::row_major(&deltas, pixels, outputs),
                    Matrix::row_major(&weight, outputs, inputs),
                    Parallelism::Pool,
                )
            }));
        }
        let gflop = 2.0 * (pixels * inputs * outputs) as f64 / 1e9;
        println!(
            "{pixels:>6} x {inputs:>4} -> {outputs:>4}: forward {:6.1} GFLOP/s, weight gradient {:6.1}, input gradient {:6.1}",
            gflop / best[0],
            gflop / best[1],
            gflop / best[2]
        );
        for (total, best) in totals.iter_mut().zip(best) {
            *total += best;
        }
        std::hint::black_box((&output, &weight_gradient, &input_gradient));
    }
    println!(
        "per batch of 32: forward {:.1} ms, weight gradients {:.1} ms, input gradients {:.1} ms",
        totals[0] * 1e3,
        totals[1] * 1e3,
        totals[2] * 1e3
    );
}

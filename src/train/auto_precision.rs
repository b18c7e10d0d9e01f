//! `--blocks-precision auto`: which precision the fine-tuned blocks' matrix
//! products take on this machine, decided by timing rather than guessed
//! from CPU flags. bf16 doubles the multiply-adds per instruction only with
//! AVX-512 BF16, and even there it lost to f32 on an Intel Xeon with AMX
//! tiles (BENCHMARKS.md: 25 % slower) while it won by 20 % on AMD Zen 4.
//!
//! A training pass (forward and backward) of one micro-batch of the run's
//! own maps runs in each precision, interleaved: one pass each to warm the
//! scratch pool and the packing, then [`TIMED_PASSES`] each, the fastest of
//! each kept. bf16 is taken only when it is at least [`BF16_MARGIN`]
//! faster: f32 is the reference, and a tie is noise. The decision is kept
//! per process for the same blocks, map size, micro-batch and thread count,
//! so the points of one sweep agree; a run records what it took
//! ([`ChosenPrecision`] in its inputs file) and a resume repeats it.

use std::sync::Mutex;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::TrainError;
use super::blocks::{InputGradient, MapSize, TopBlocks};
use super::config::BlocksPrecision;

/// Passes timed in each precision after the warm-up pass.
pub const TIMED_PASSES: usize = 2;

/// bf16 must take at most this share of f32's time to be chosen.
pub const BF16_MARGIN: f64 = 0.95;

/// What `auto` took, and the timings it took it from.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ChosenPrecision {
    pub precision: BlocksPrecision,
    /// Fastest training pass of one micro-batch in each precision.
    pub f32_seconds: f64,
    pub bf16_seconds: f64,
    /// Images in the timed micro-batch.
    pub n_images: usize,
}

impl ChosenPrecision {
    /// The rule: bf16 only when clearly faster.
    fn from_timings(f32_seconds: f64, bf16_seconds: f64, n_images: usize) -> Self {
        let precision = if bf16_seconds <= BF16_MARGIN * f32_seconds {
            BlocksPrecision::Bf16
        } else {
            BlocksPrecision::F32
        };
        ChosenPrecision {
            precision,
            f32_seconds,
            bf16_seconds,
            n_images,
        }
    }
}

/// Everything a timing depends on: the blocks' shape (not their weights),
/// the map, the micro-batch and the threads.
#[derive(Debug, Clone, PartialEq, Eq)]
struct TimingKey {
    after_block: usize,
    n_blocks: usize,
    in_channels: usize,
    head_channels: usize,
    feature_dim: usize,
    size: (usize, usize),
    n_images: usize,
    threads: usize,
}

/// This process's decisions so far.
static DECISIONS: Mutex<Vec<(TimingKey, ChosenPrecision)>> = Mutex::new(Vec::new());

/// Times `blocks` (any precision) on `maps` (`n_images` channels-last maps
/// of `size`) in f32 and in bf16 and returns the choice, or this process's
/// earlier choice for the same shapes.
pub fn choose(
    blocks: &TopBlocks,
    maps: &[f32],
    n_images: usize,
    size: MapSize,
) -> Result<ChosenPrecision, TrainError> {
    let key = TimingKey {
        after_block: blocks.after_block(),
        n_blocks: blocks.n_blocks(),
        in_channels: blocks.in_channels(),
        head_channels: blocks.head_channels(),
        feature_dim: blocks.feature_dim(),
        size: (size.height, size.width),
        n_images,
        threads: rayon::current_num_threads(),
    };
    let decisions = || {
        DECISIONS
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    };
    if let Some((_, chosen)) = decisions().iter().find(|(known, _)| *known == key) {
        return Ok(*chosen);
    }
    let chosen = time_both(blocks, maps, n_images, size)?;
    decisions().push((key, chosen));
    Ok(chosen)
}

fn time_both(
    blocks: &TopBlocks,
    maps: &[f32],
    n_images: usize,
    size: MapSize,
) -> Result<ChosenPrecision, TrainError> {
    let candidates = [
        blocks.clone().with_precision(BlocksPrecision::F32),
        blocks.clone().with_precision(BlocksPrecision::Bf16),
    ];
    let mut fastest = [f64::INFINITY; 2];
    for round in 0..=TIMED_PASSES {
        for (candidate, best) in candidates.iter().zip(&mut fastest) {
            let seconds = training_pass(candidate, maps, n_images, size)?;
            // Round 0 warms the scratch pool and the weights' packing.
            if round > 0 {
                *best = best.min(seconds);
            }
        }
    }
    Ok(ChosenPrecision::from_timings(
        fastest[0], fastest[1], n_images,
    ))
}

/// Seconds of one forward and backward pass, as a training step runs it.
fn training_pass(
    blocks: &TopBlocks,
    maps: &[f32],
    n_images: usize,
    size: MapSize,
) -> Result<f64, TrainError> {
    let pooled_gradient = vec![1.0 / n_images as f32; n_images * blocks.feature_dim()];
    let mut gradients = blocks.zero_gradients();
    let input = maps.to_vec();
    let start = Instant::now();
    let forward = blocks.forward(input, n_images, size)?;
    blocks.backward(
        forward,
        &pooled_gradient,
        &mut gradients,
        InputGradient::Skip,
    )?;
    Ok(start.elapsed().as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_is_taken_only_when_clearly_faster() {
        for (bf16_seconds, expected) in [
            (0.8, BlocksPrecision::Bf16),
            (0.95, BlocksPrecision::Bf16),
            (0.97, BlocksPrecision::F32),
            (1.25, BlocksPrecision::F32),
        ] {
            let chosen = ChosenPrecision::from_timings(1.0, bf16_seconds, 8);
            assert_eq!(chosen.precision, expected, "bf16 {bf16_seconds} s, f32 1 s");
        }
    }
}

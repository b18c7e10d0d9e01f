//! Benchmark: one training step of Lite0's top blocks (issue 22, partial
//! fine-tuning): blocks 11..=15 and the head convolution, forward from a
//! cached stride-16 map (112 × 14 × 14, a 224 px image), backward from
//! d pooled features to every parameter, and the AdamW update. Prints the
//! milliseconds of each phase per image and the total, per iteration, and
//! the best iteration.
//!
//! `cargo bench --bench finetune_blocks` (release profile) or with
//! `--profile dev`, the profile `scripts/build.sh` builds `lazarus` in.
//! `LAZARUS_BENCH_BATCH` (32) and `LAZARUS_BENCH_ITERS` (5) override the
//! batch and the iterations; `LAZARUS_BENCH_STRIDE=8` trains from the
//! stride-8 map instead (blocks 5..=15, 40 × 28 × 28: the best elpv
//! configuration's `--unfreeze-from 4`) and `LAZARUS_BENCH_PRECISION=bf16`
//! runs the blocks' products in bf16 (`--blocks-precision`);
//! `LAZARUS_BENCH_DELTA_SCALE` scales d loss / d pooled features (1e-3 at
//! most by default; 1e-35 makes every delta subnormal). The weights are a random-weight Lite0's: the
//! arithmetic does not depend on the values.

use std::time::Instant;

use candle_core::{DType, Device};
use candle_nn::{VarBuilder, VarMap};
use lazarus::encoders::efficientnet_lite::{Config, EfficientNetLite};
use lazarus::train::blocks::{BlocksOptimizer, BlocksStep, InputGradient, MapSize, TopBlocks};
use lazarus::train::config::BlocksPrecision;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|text| {
            text.split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_else(|_| "unknown".to_string())
}

fn main() {
    let batch = env_usize("LAZARUS_BENCH_BATCH", 32);
    let iterations = env_usize("LAZARUS_BENCH_ITERS", 5);
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let model = EfficientNetLite::new(Config::lite0(), vb).expect("a random-weight Lite0");
    let stride = env_usize("LAZARUS_BENCH_STRIDE", 16);
    let precision = BlocksPrecision::parse(
        &std::env::var("LAZARUS_BENCH_PRECISION").unwrap_or_else(|_| "f32".to_string()),
    )
    .expect("LAZARUS_BENCH_PRECISION: f32 or bf16");
    let after_block = model
        .map_block_index(stride)
        .unwrap_or_else(|e| panic!("Lite0 has no stride-{stride} map: {e}"));
    let mut top = TopBlocks::from_encoder(&model, after_block)
        .expect("Lite0's top blocks")
        .with_precision(precision);
    let size = MapSize {
        height: 224 / stride,
        width: 224 / stride,
    };
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let input: Vec<f32> = (0..batch * size.pixels() * top.in_channels())
        .map(|_| rng.random_range(-2.0..2.0))
        .collect();
    // `LAZARUS_BENCH_DELTA_SCALE=1e-35` makes the deltas subnormal, as a
    // confident training image's become late in a run.
    let delta_scale: f32 = std::env::var("LAZARUS_BENCH_DELTA_SCALE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1.0);
    let upstream: Vec<f32> = (0..batch * top.feature_dim())
        .map(|_| rng.random_range(-1e-3..1e-3) * delta_scale)
        .collect();
    let parameters: usize = top.parameters().iter().map(|p| p.len()).sum();
    println!(
        "top blocks after block {after_block}: {} blocks + head, {parameters} parameters, {} products; batch {batch}, {} threads, load {}",
        top.n_blocks(),
        precision.name(),
        rayon::current_num_threads(),
        load_average()
    );
    let mut optimizer = BlocksOptimizer::new(&top);
    let mut gradients = top.zero_gradients();
    let step = BlocksStep {
        lr: 1e-4,
        weight_decay: 1e-4,
        scale: 1.0,
    };
    let mut best = f64::INFINITY;
    // Iteration 0 warms up (page faults of first allocations, the pool).
    for iteration in 0..=iterations {
        let started = Instant::now();
        let forward = top.forward(input.clone(), batch, size).unwrap();
        let forwarded = Instant::now();
        gradients.zero();
        top.backward(forward, &upstream, &mut gradients, InputGradient::Skip)
            .unwrap();
        let backwarded = Instant::now();
        optimizer.update(&mut top, &gradients, step);
        let updated = Instant::now();
        let per_image = |a: Instant, b: Instant| (b - a).as_secs_f64() * 1e3 / batch as f64;
        let total = per_image(started, updated);
        if iteration > 0 {
            best = best.min(total);
        }
        println!(
            "{} {iteration}: forward {:.2} ms/image, backward {:.2}, update {:.2} (per batch), total {total:.2} ms/image",
            if iteration == 0 {
                "warm-up"
            } else {
                "iteration"
            },
            per_image(started, forwarded),
            per_image(forwarded, backwarded),
            (updated - backwarded).as_secs_f64() * 1e3,
        );
    }
    println!(
        "best: {best:.2} ms/image forward + backward + update ({:.1} images/s), load {}",
        1e3 / best,
        load_average()
    );
    // Evaluation (validation, test, prediction): pooled features only, the
    // batch's forward against `for_evaluation` (image by image, weights
    // packed once; packing counted), which must give the same bits.
    let (mut batch_best, mut evaluation_best) = (f64::INFINITY, f64::INFINITY);
    for _ in 0..iterations {
        let started = Instant::now();
        let forward = top.forward(input.clone(), batch, size).unwrap();
        let batch_pooled = forward.pooled().to_vec();
        forward.recycle();
        batch_best = batch_best.min(started.elapsed().as_secs_f64());
        let started = Instant::now();
        let pooled = top
            .for_evaluation()
            .pooled(input.clone(), batch, size)
            .unwrap();
        evaluation_best = evaluation_best.min(started.elapsed().as_secs_f64());
        assert!(
            pooled
                .iter()
                .zip(&batch_pooled)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "evaluation features differ from the batch forward's"
        );
    }
    // Packing the weights alone (what each `for_evaluation` pays before
    // its first image).
    let mut packing_best = f64::INFINITY;
    for _ in 0..iterations {
        let started = Instant::now();
        let evaluation = top.for_evaluation();
        packing_best = packing_best.min(started.elapsed().as_secs_f64());
        drop(evaluation);
    }
    println!(
        "packing the weights for evaluation, best of {iterations}: {:.2} ms",
        packing_best * 1e3
    );
    let per_image = |seconds: f64| seconds * 1e3 / batch as f64;
    println!(
        "evaluation forward, best of {iterations}: batch {:.2} ms/image, image by image {:.2} ms/image ({:.2}x), load {}",
        per_image(batch_best),
        per_image(evaluation_best),
        batch_best / evaluation_best,
        load_average()
    );
}

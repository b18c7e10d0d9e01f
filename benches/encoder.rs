//! Benchmark: EfficientNet-Lite0 forward on CPU, batch 64 at 224 px, in images/s.
//! Run with `cargo bench --bench encoder` (real weights after scripts/fetch_assets.sh,
//! random weights otherwise: the speed is the same, the run says which it used).
//! `LAZARUS_BENCH_BATCH` and `LAZARUS_BENCH_ITERS` override batch (64) and iterations (3).

use std::time::Instant;

use candle_core::{Device, Tensor};
use lazarus::encoders::{self, WeightsSource};
use lazarus::weights;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let batch = env_usize("LAZARUS_BENCH_BATCH", 64);
    let iterations = env_usize("LAZARUS_BENCH_ITERS", 3);
    let spec = encoders::lookup("efficientnet-lite0").unwrap();
    let source = if weights::installed("efficientnet-lite0").is_some() {
        println!("weights: installed efficientnet-lite0");
        WeightsSource::Installed
    } else {
        println!("weights: random (efficientnet-lite0 weights are not installed)");
        WeightsSource::Random { seed: 0 }
    };
    let device = Device::Cpu;
    let encoder = encoders::load_encoder(&spec, source, &device).unwrap();
    let images = Tensor::randn(0f32, 1.0, (batch, 3, 224, 224), &device).unwrap();
    // Warm-up: first-touch allocations and thread pool start.
    encoder.forward_pooled(&images).unwrap();
    let mut best = f64::MAX;
    for iteration in 0..iterations {
        let start = Instant::now();
        let pooled = encoder.forward_pooled(&images).unwrap();
        let seconds = start.elapsed().as_secs_f64();
        assert_eq!(pooled.dims(), &[batch, 1280]);
        println!(
            "iteration {iteration}: {seconds:.3} s, {:.1} images/s",
            batch as f64 / seconds
        );
        best = best.min(seconds);
    }
    println!(
        "lazarus efficientnet-lite0 batch {batch} 224px: best {:.1} images/s",
        batch as f64 / best
    );
}

//! Benchmark: EfficientNet-Lite0 forward on CPU, batch 64 at 224 px, in images/s.
//! Run with `cargo bench --bench encoder` (real weights after scripts/fetch_assets.sh,
//! random weights otherwise: the speed is the same, the run says which it used).
//! `LAZARUS_BENCH_BATCH` and `LAZARUS_BENCH_ITERS` override batch (64) and iterations (3).
//! Each iteration also prints images per CPU second (user + system time of the process).
//! `LAZARUS_SIMD=avx2` (or `scalar`) caps the CPU kernels' instruction set: the run
//! prints the level it used.

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
    match encoders::SimdLevel::from_env() {
        Ok(level) => println!(
            "simd: {level} (detected {}, {}={})",
            encoders::SimdLevel::detected(),
            encoders::SIMD_ENV,
            std::env::var(encoders::SIMD_ENV).unwrap_or_else(|_| "unset".into())
        ),
        Err(message) => panic!("{message}"),
    }
    let device = Device::Cpu;
    let encoder = encoders::load_encoder(&spec, source, &device).unwrap();
    let images = Tensor::randn(0f32, 1.0, (batch, 3, 224, 224), &device).unwrap();
    // Warm-up: first-touch allocations and thread pool start.
    encoder.forward_pooled(&images).unwrap();
    let mut best = f64::MAX;
    for iteration in 0..iterations {
        let (start, cpu_start) = (Instant::now(), cpu_seconds());
        let pooled = encoder.forward_pooled(&images).unwrap();
        let seconds = start.elapsed().as_secs_f64();
        let cpu = cpu_seconds() - cpu_start;
        assert_eq!(pooled.dims(), &[batch, 1280]);
        println!(
            "iteration {iteration}: {seconds:.3} s, {:.1} images/s; {cpu:.2} CPU s, {:.1} images per CPU second",
            batch as f64 / seconds,
            batch as f64 / cpu
        );
        best = best.min(seconds);
    }
    println!(
        "lazarus efficientnet-lite0 batch {batch} 224px: best {:.1} images/s",
        batch as f64 / best
    );
}

/// User plus system CPU time of this process so far (Linux /proc, 10 ms
/// ticks; 0 elsewhere): on a machine shared with other work, images per CPU
/// second move far less with the load than images per second do.
fn cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    // Fields after the parenthesised command name; utime and stime are the
    // 14th and 15th fields of the whole line.
    let after_name = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks: f64 = fields[11..13]
        .iter()
        .map(|f| f.parse::<f64>().unwrap_or(0.0))
        .sum();
    ticks / 100.0
}

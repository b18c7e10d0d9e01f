//! Benchmark: decode plus preprocess of real PNG files for efficientnet-lite0
//! (read the file, decode to 8-bit RGB, resize the shorter side, center crop to
//! 224 px, normalise to CHW f32), the CPU side of a worker before the encoder,
//! in images/s. Run with `cargo bench --bench preprocess` after
//! scripts/fetch_assets.sh (the first 512 elpv images, 300×300 PNG).
//! `LAZARUS_BENCH_ITERS` overrides the number of timed passes (3).

use std::path::PathBuf;
use std::time::Instant;

use lazarus::encoders;
use lazarus::preprocess::preprocess_file;
use rayon::prelude::*;

const IMAGES: usize = 512;

fn main() {
    let iterations = std::env::var("LAZARUS_BENCH_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let elpv = lazarus_cache().join("data/elpv");
    let labels = std::fs::read_to_string(elpv.join("labels.csv"))
        .expect("elpv missing: run scripts/fetch_assets.sh");
    let paths: Vec<PathBuf> = labels
        .lines()
        .take(IMAGES)
        .map(|line| elpv.join(line.split_whitespace().next().expect("a path per line")))
        .collect();
    let config = encoders::lookup("efficientnet-lite0").unwrap().preprocess;
    let threads = rayon::current_num_threads();
    let single = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    let pass = || {
        let values: usize = paths
            .par_iter()
            .map(|path| preprocess_file(path, &config).unwrap().len())
            .sum();
        assert_eq!(values, paths.len() * config.tensor_len());
    };
    // Warm-up: page cache and thread pools.
    pass();
    for (label, pool_threads) in [("all threads", threads), ("one thread", 1)] {
        let mut best = f64::MAX;
        for _ in 0..iterations {
            let start = Instant::now();
            if pool_threads == 1 {
                single.install(pass);
            } else {
                pass();
            }
            best = best.min(start.elapsed().as_secs_f64());
        }
        println!(
            "decode + preprocess (PNG files -> 224 px CHW f32), efficientnet-lite0, {} images, {label} ({pool_threads}): best {:.1} images/s",
            paths.len(),
            paths.len() as f64 / best
        );
    }
}

fn lazarus_cache() -> PathBuf {
    std::env::var_os("LAZARUS_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/lazarus"))
}

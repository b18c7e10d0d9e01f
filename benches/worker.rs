//! Benchmark: end to end from real PNG files to feature shards with
//! efficientnet-lite0 (real ImageNet weights) at 224 px: one
//! `lazarus run-worker --until-empty` over 512 elpv images in chunks of 64.
//! Run with `cargo bench --bench worker` after scripts/fetch_assets.sh.
//! `LAZARUS_BENCH_RUNS` (default 1) repeats the run on fresh roots and
//! reports the best. `LAZARUS_BENCH_BIN` names the lazarus binary to time instead of this
//! build's: checkouts that share one target folder also share its
//! `release/lazarus`, which the last build of any of them overwrites.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

const IMAGES: usize = 512;

fn lazarus(root: &Path, args: &[&str]) {
    let binary = std::env::var_os("LAZARUS_BENCH_BIN")
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_lazarus").into());
    let status = Command::new(binary)
        // The benchmark measures the root's own SQLite queue, never a shared one.
        .env_remove("LAZARUS_QUEUE")
        .arg("--root")
        .arg(root)
        .args(args)
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "lazarus {args:?} failed");
}

fn main() {
    let cache = lazarus_cache();
    let elpv = cache.join("data/elpv");
    let labels = std::fs::read_to_string(elpv.join("labels.csv"))
        .expect("elpv missing: run scripts/fetch_assets.sh");
    assert!(
        cache
            .join("weights/efficientnet-lite0/model.sha256")
            .exists(),
        "Lite0 weights missing: run scripts/fetch_assets.sh"
    );
    // A manifest of the first 512 images, beside the images.
    let subset: String = labels.lines().take(IMAGES).collect::<Vec<_>>().join("\n");
    let manifest = elpv.join(".bench-subset.txt");
    std::fs::write(&manifest, subset + "\n").unwrap();

    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let runs: usize = std::env::var("LAZARUS_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let mut best = f64::MAX;
    for run in 0..runs.max(1) {
        let root = tempfile::tempdir().unwrap();
        lazarus(
            root.path(),
            &["dataset", "add", "elpv", manifest.to_str().unwrap()],
        );
        lazarus(
            root.path(),
            &[
                "enqueue",
                "--dataset",
                "elpv",
                "--encoder",
                "efficientnet-lite0",
            ],
        );
        let (start, cpu_start) = (Instant::now(), children_cpu_seconds());
        lazarus(root.path(), &["run-worker", "--until-empty"]);
        let seconds = start.elapsed().as_secs_f64();
        let cpu = children_cpu_seconds() - cpu_start;
        println!(
            "run {run}: worker end to end (PNG files -> f16 shards), efficientnet-lite0 224 px, {IMAGES} images, chunks of 64, {threads} threads: {seconds:.1} s, {:.1} images/s, {:.2} s per chunk of 64; {cpu:.2} CPU s, {:.1} images per CPU second",
            IMAGES as f64 / seconds,
            seconds / (IMAGES as f64 / 64.0),
            IMAGES as f64 / cpu
        );
        best = best.min(seconds);
    }
    println!(
        "lazarus run-worker end to end, {IMAGES} images: best {:.1} images/s",
        IMAGES as f64 / best
    );
}

/// User plus system CPU time of the finished child processes so far (Linux
/// /proc, 10 ms ticks; 0 elsewhere): the worker's own CPU time, which moves
/// far less with other work on the machine than its wall time.
fn children_cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    // cutime and cstime are the 16th and 17th fields of the whole line.
    let after_name = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks: f64 = fields[13..15]
        .iter()
        .map(|f| f.parse::<f64>().unwrap_or(0.0))
        .sum();
    ticks / 100.0
}

fn lazarus_cache() -> PathBuf {
    std::env::var_os("LAZARUS_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/lazarus"))
}

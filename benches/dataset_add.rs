//! Benchmark: `lazarus dataset add` on the real elpv-dataset (2,624 PNGs):
//! read, sha256, header probe, split, publish. Run with
//! `cargo bench --bench dataset_add` after scripts/fetch_assets.sh.

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

fn main() {
    let cache = std::env::var_os("LAZARUS_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/lazarus"));
    let labels = cache.join("data/elpv/labels.csv");
    assert!(
        labels.is_file(),
        "{} missing: run scripts/fetch_assets.sh",
        labels.display()
    );
    let mut seconds = Vec::new();
    for run in 0..5 {
        let root = tempfile::tempdir().unwrap();
        let start = Instant::now();
        let status = Command::new(env!("CARGO_BIN_EXE_lazarus"))
            .arg("--root")
            .arg(root.path())
            .args(["dataset", "add", "elpv"])
            .arg(&labels)
            .args(["--label-column", "2", "--json"])
            .stdout(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(status.success());
        let elapsed = start.elapsed().as_secs_f64();
        println!("run {run}: {elapsed:.3} s");
        seconds.push(elapsed);
    }
    seconds.sort_by(f64::total_cmp);
    println!(
        "dataset add elpv (2624 images): median {:.3} s, min {:.3} s, max {:.3} s over 5 runs",
        seconds[2], seconds[0], seconds[4]
    );
}

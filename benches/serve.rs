//! Benchmark: `lazarus serve` against `lazarus predict` on the same images,
//! with the real Lite0 weights (scripts/fetch_assets.sh) on real elpv cells
//! resized to 224x224 RGB PNGs. Run with `cargo bench --bench serve`.
//!
//! 1. A root: 64 cells as a dataset (32 mono, 32 poly), extracted and a
//!    linear head trained, exported as a bundle (no feature cache: every
//!    request runs the encoder, as for new images).
//! 2. Offline: `lazarus predict --bundle` over the benchmark images (the
//!    first `LAZARUS_BENCH_IMAGES` cells not trained on, default 256), timed inside the
//!    process from its own report, images/s; and the forward pass of one
//!    image (median of 20 in this process).
//! 3. The server (`serve --bundle`, audit trail on): 16 concurrent clients
//!    each sending single images, throughput and p50/p99 latency; then one
//!    client sending them one after the other, p50/p99; and what that p50
//!    holds besides the forward pass: one image's decode + preprocess +
//!    sha256 (median, in this process) and one HTTP round trip without
//!    model work (GET /healthz, p50).
//!
//! The targets (issue 24): 16 clients reach 80% of predict's throughput;
//! one client's p50 is within 1.5x one image's forward pass.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};

const BIN: &str = env!("CARGO_BIN_EXE_lazarus");
const ENCODER: &str = "efficientnet-lite0";

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn lazarus(root: &Path, args: &[&str]) -> String {
    let output = Command::new(BIN)
        .arg("--root")
        .arg(root)
        .args(args)
        .env_remove("LAZARUS_QUEUE")
        .env_remove("LAZARUS_FEATURE_STORE")
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "lazarus {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// elpv cell `index` (1-based) as a 224x224 RGB PNG.
fn cell_png(elpv: &Path, index: usize) -> Vec<u8> {
    let path = elpv.join(format!("images/cell{index:04}.png"));
    let image = image::open(&path)
        .unwrap_or_else(|e| panic!("{}: {e}: run scripts/fetch_assets.sh", path.display()))
        .to_rgb8();
    let resized = image::imageops::resize(&image, 224, 224, image::imageops::FilterType::Triangle);
    let mut bytes = Vec::new();
    resized
        .write_to(
            &mut std::io::Cursor::new(&mut bytes),
            image::ImageFormat::Png,
        )
        .unwrap();
    bytes
}

/// Cell types (mono/poly) by image index, from labels.csv.
fn cell_types(elpv: &Path) -> Vec<String> {
    std::fs::read_to_string(elpv.join("labels.csv"))
        .unwrap()
        .lines()
        .map(|line| line.split_whitespace().last().unwrap_or("").to_string())
        .collect()
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let rank = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(120)))
        .build()
        .into()
}

/// Posts every image once from `clients` threads (each its share, in
/// turn), returning the wall time and each request's latency in seconds.
fn send_all(addr: SocketAddr, images: &Arc<Vec<Vec<u8>>>, clients: usize) -> (f64, Vec<f64>) {
    let start = Arc::new(Barrier::new(clients + 1));
    let threads: Vec<_> = (0..clients)
        .map(|client| {
            let (start, images) = (start.clone(), images.clone());
            std::thread::spawn(move || {
                let agent = agent();
                let url = format!("http://{addr}/v1/models/bench/predict");
                start.wait();
                let mut latencies = Vec::new();
                for image in images.iter().skip(client).step_by(clients) {
                    let sent = Instant::now();
                    let mut response = agent
                        .post(&url)
                        .header("Content-Type", "image/png")
                        .send(&image[..])
                        .unwrap();
                    let _ = response.body_mut().read_to_string().unwrap();
                    latencies.push(sent.elapsed().as_secs_f64());
                }
                latencies
            })
        })
        .collect();
    start.wait();
    let began = Instant::now();
    let mut latencies: Vec<f64> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    let wall = began.elapsed().as_secs_f64();
    latencies.sort_by(f64::total_cmp);
    (wall, latencies)
}

fn main() {
    let count = env_usize("LAZARUS_BENCH_IMAGES", 256);
    let elpv = lazarus::weights::cache_root().join("data/elpv");
    assert!(
        lazarus::weights::installed(ENCODER).is_some(),
        "{ENCODER} weights are not installed: run scripts/fetch_assets.sh"
    );
    println!(
        "machine: {} cores; simd: {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        lazarus::encoders::SimdLevel::from_env().unwrap()
    );
    let temp = tempfile::tempdir().unwrap();
    let root = temp.path().join("root");

    // 1. The model: a linear head on 64 cells, exported.
    let types = cell_types(&elpv);
    let tree = temp.path().join("cells");
    // 32 cells of each type (the first 64 cells hold too few poly ones for
    // a validation split with both classes).
    let mut per_type: std::collections::HashMap<&str, usize> = Default::default();
    let training: Vec<usize> = (1..=types.len())
        .filter(|&index| {
            let seen = per_type.entry(types[index - 1].as_str()).or_default();
            *seen += 1;
            *seen <= 32
        })
        .collect();
    for &index in &training {
        let class = tree.join(&types[index - 1]);
        std::fs::create_dir_all(&class).unwrap();
        std::fs::write(
            class.join(format!("cell{index:04}.png")),
            cell_png(&elpv, index),
        )
        .unwrap();
    }
    lazarus(&root, &["dataset", "add", "cells", tree.to_str().unwrap()]);
    lazarus(
        &root,
        &["enqueue", "--dataset", "cells", "--encoder", ENCODER],
    );
    lazarus(&root, &["run-worker", "--until-empty"]);
    let report: serde_json::Value = serde_json::from_str(&lazarus(
        &root,
        &[
            "train",
            "--dataset",
            "cells",
            "--encoder",
            ENCODER,
            "--epochs",
            "5",
            "--json",
        ],
    ))
    .unwrap();
    let run = report["run_id"].as_str().unwrap();
    let bundle = temp.path().join("bench");
    lazarus(&root, &["export", run, "--out", bundle.to_str().unwrap()]);

    // 2. The benchmark images, and predict's offline throughput on them.
    let images: Vec<Vec<u8>> = (1..=types.len())
        .filter(|index| !training.contains(index))
        .take(count)
        .map(|i| cell_png(&elpv, i))
        .collect();
    let files = temp.path().join("images");
    std::fs::create_dir_all(&files).unwrap();
    let paths: Vec<PathBuf> = images
        .iter()
        .enumerate()
        .map(|(i, bytes)| {
            let path = files.join(format!("{i:04}.png"));
            std::fs::write(&path, bytes).unwrap();
            path
        })
        .collect();
    let config = lazarus::predict::PredictConfig {
        top_k: 5,
        device: Device::Cpu,
        batch_size: 16,
    };
    // Warm-up (page cache, thread pool), then the best of two runs. A
    // predict call opens the bundle and loads the encoder first: that time
    // (measured alone) is taken off, so the figure is predict's images/s.
    lazarus::bundle::predict(&bundle, None, &paths[..16.min(count)], &config).unwrap();
    let began = Instant::now();
    let opened = lazarus::bundle::open(&bundle, &Device::Cpu).unwrap();
    drop(opened.encoder.load(&Device::Cpu, "bench").unwrap());
    let load = began.elapsed().as_secs_f64();
    let mut offline = f64::MAX;
    for _ in 0..2 {
        let began = Instant::now();
        let predictions = lazarus::bundle::predict(&bundle, None, &paths, &config).unwrap();
        assert!(predictions.iter().all(|p| p.error.is_none()));
        offline = offline.min(began.elapsed().as_secs_f64() - load);
    }
    let offline_rate = count as f64 / offline;
    println!(
        "predict (bundle, batch 16, in process, {:.0} ms of loading taken off): {count} images in {offline:.2} s, {offline_rate:.1} images/s",
        load * 1e3
    );
    let process = Instant::now();
    let mut args = vec!["predict", "--bundle", bundle.to_str().unwrap(), "--json"];
    let names: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
    args.extend(names.iter().map(String::as_str));
    lazarus(&root, &args);
    let process = process.elapsed().as_secs_f64();
    println!(
        "lazarus predict --bundle (process, load included): {count} images in {process:.2} s, {:.1} images/s",
        count as f64 / process
    );
    let spec = lazarus::encoders::lookup(ENCODER).unwrap();
    let encoder = lazarus::encoders::load_encoder(
        &spec,
        lazarus::encoders::WeightsSource::Installed,
        &Device::Cpu,
    )
    .unwrap();
    let pixels =
        lazarus::preprocess::preprocess_bytes(&images[0], Path::new("one"), &spec.preprocess)
            .unwrap();
    let one = Tensor::from_vec(pixels, (1, 3, 224, 224), &Device::Cpu).unwrap();
    encoder.forward_pooled(&one).unwrap();
    let mut forwards: Vec<f64> = (0..20)
        .map(|_| {
            let began = Instant::now();
            encoder.forward_pooled(&one).unwrap();
            began.elapsed().as_secs_f64()
        })
        .collect();
    forwards.sort_by(f64::total_cmp);
    let forward = percentile(&forwards, 0.5);
    println!("one image's forward pass: median {:.2} ms", forward * 1e3);
    drop(encoder);
    // What a lone request adds to the forward pass, part one: the decode
    // and preprocessing of its PNG (what the server's `prepare` runs, with
    // the sha256 of the bytes), median over the 1-client images.
    let mut decodes: Vec<f64> = images
        .iter()
        .take(64)
        .map(|bytes| {
            let began = Instant::now();
            let pixels =
                lazarus::preprocess::preprocess_bytes(bytes, Path::new("one"), &spec.preprocess)
                    .unwrap();
            let id = lazarus::digest::sha256(bytes);
            let elapsed = began.elapsed().as_secs_f64();
            std::hint::black_box((pixels, id));
            elapsed
        })
        .collect();
    decodes.sort_by(f64::total_cmp);
    let decode = percentile(&decodes, 0.5);
    println!(
        "one image's decode + preprocess + sha256: median {:.2} ms",
        decode * 1e3
    );

    // 3. The server.
    let mut child = Command::new(BIN)
        .arg("--root")
        .arg(&root)
        .args(["serve", "--addr", "127.0.0.1:0", "--bundle"])
        .arg(&bundle)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let addr: SocketAddr = loop {
        let line = lines.next().unwrap().unwrap();
        if let Some(addr) = line.strip_prefix("listening on http://") {
            break addr.parse().unwrap();
        }
    };
    for line in lines.by_ref() {
        if line.unwrap() == "ready" {
            break;
        }
    }
    std::thread::spawn(move || for _ in lines {});
    let images = Arc::new(images);
    send_all(addr, &Arc::new(images[..32.min(count)].to_vec()), 4); // warm-up
    let (wall, latencies) = send_all(addr, &images, 16);
    let rate = count as f64 / wall;
    println!(
        "serve, 16 clients: {count} images in {wall:.2} s, {rate:.1} images/s ({:.0}% of predict); latency p50 {:.1} ms, p99 {:.1} ms",
        100.0 * rate / offline_rate,
        percentile(&latencies, 0.5) * 1e3,
        percentile(&latencies, 0.99) * 1e3
    );
    let single = Arc::new(images[..64.min(count)].to_vec());
    let (_, latencies) = send_all(addr, &single, 1);
    let p50 = percentile(&latencies, 0.5);
    println!(
        "serve, 1 client: latency p50 {:.1} ms ({:.2}x one forward pass), p99 {:.1} ms",
        p50 * 1e3,
        p50 / forward,
        percentile(&latencies, 0.99) * 1e3
    );
    // Part two: an HTTP round trip with no model work (GET /healthz from
    // one client, as many times); the rest of the 1-client p50 is the
    // hand-offs between the server's threads, the head and the answer.
    let agent = agent();
    let health = format!("http://{addr}/healthz");
    let mut round_trips: Vec<f64> = (0..64)
        .map(|_| {
            let sent = Instant::now();
            let _ = agent
                .get(&health)
                .call()
                .unwrap()
                .body_mut()
                .read_to_string()
                .unwrap();
            sent.elapsed().as_secs_f64()
        })
        .collect();
    round_trips.sort_by(f64::total_cmp);
    let round_trip = percentile(&round_trips, 0.5);
    println!(
        "1-client p50 {:.2} ms = forward {:.2} + decode {:.2} + HTTP round trip {:.2} + rest {:.2} ms",
        p50 * 1e3,
        forward * 1e3,
        decode * 1e3,
        round_trip * 1e3,
        (p50 - forward - decode - round_trip) * 1e3
    );
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let status = child.wait().unwrap();
    assert!(status.success(), "serve exited with {status}");
}

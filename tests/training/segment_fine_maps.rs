//! `enqueue --spatial --maps`: EfficientNet-Lite's stride-4 and stride-8
//! maps (ends of its second and third stages) beside the stride-16 and
//! stride-32 ones, for small objects. Generated images of small blobs
//! (radius 3-6 px on a textured background) with their masks, a
//! random-weight encoder (`--weights random:0`): the shards hold the four
//! maps, the default fingerprint is main's, `train --task segment --maps`
//! picks the fine folder and trains on its 56x56 grid, and the run and its
//! bundle predict the same masks through the encoder. The Dice of the fine
//! maps with the real weights is measured by scripts/bench_blobs.sh
//! (BENCHMARKS.md), not here.

use crate::support;

use std::path::Path;

use image::ImageFormat;
use support::{fails, json, lazarus, ok};

fn enqueue(root: &Path, extra: &[&str]) -> serde_json::Value {
    let mut args = vec![
        "enqueue",
        "--dataset",
        "small",
        "--encoder",
        "efficientnet-lite0",
        "--weights",
        "random:0",
        "--spatial",
        "--json",
    ];
    args.extend_from_slice(extra);
    json(&ok(lazarus(root, &args)))
}

#[test]
fn fine_maps_are_extracted_in_their_own_folder_and_segment_on_the_stride_4_grid() {
    let temp = tempfile::tempdir().unwrap();
    let root = temp.path().join("root");
    let source = temp.path().join("small");
    // 224x224 images with masks of blobs of radius 3-6 px.
    super::segment::write_small_blobs(&source, 16, 500, (3.0, 3.0));
    ok(lazarus(
        &root,
        &["dataset", "add", "small", source.to_str().unwrap()],
    ));

    // The default is the fingerprint main (4ad2f9c) computes for
    // `enqueue --spatial --weights random:0` with Lite0 and the default
    // tiling (its binary, run on this configuration).
    let default = enqueue(&root, &[]);
    assert_eq!(
        default["fingerprint"],
        "f721ea96b63312e4036105e021fe7de01e9d17bfec5f238ad6f38ec4b2171d6d"
    );
    let explicit = enqueue(&root, &["--maps", "32,16"]);
    assert_eq!(explicit["fingerprint"], default["fingerprint"]);
    assert_eq!(explicit["jobs_added"], 0);
    let fine = enqueue(&root, &["--maps", "32,8,4,16"]);
    let fine_fp = fine["fingerprint"].as_str().unwrap().to_string();
    assert_ne!(fine["fingerprint"], default["fingerprint"]);
    assert_eq!(fine["images_enqueued"], 16);
    ok(lazarus(&root, &["run-worker", "--until-empty"]));
    let verified = json(&ok(lazarus(&root, &["verify", "--json"])));
    assert_eq!(verified["ok"], true, "{verified}");

    // The shards: four maps, [rows, C, 224/stride, 224/stride], and the
    // metadata names them.
    let set = lazarus::features::FeatureSet::open(&root.join("features").join(&fine_fp)).unwrap();
    let shapes: Vec<[usize; 4]> = set
        .maps()
        .iter()
        .map(|m| [m.stride, m.channels, m.height, m.width])
        .collect();
    assert_eq!(
        shapes,
        [
            [4, 24, 56, 56],
            [8, 40, 28, 28],
            [16, 112, 14, 14],
            [32, 1280, 7, 7]
        ]
    );
    assert_eq!(set.len(), 16);
    assert_eq!(set.metadata()["maps"], "4,8,16,32");
    let default_set = lazarus::features::FeatureSet::open(
        &root
            .join("features")
            .join(default["fingerprint"].as_str().unwrap()),
    )
    .unwrap();
    assert_eq!(default_set.maps().len(), 2);
    assert!(!default_set.metadata().contains_key("maps"));
    // The stride-16 and -32 maps are the same values in both folders.
    for (m, d) in [(2, 0), (3, 1)] {
        assert_eq!(set.map(0, m), default_set.map(0, d), "map {m}");
    }

    // Two spatial folders: train names the one it wants.
    let train = |extra: &[&str]| {
        let mut args = vec![
            "train",
            "--task",
            "segment",
            "--dataset",
            "small",
            "--encoder",
            "efficientnet-lite0",
            "--epochs",
            "1",
            "--batch-size",
            "8",
            "--json",
        ];
        args.extend_from_slice(extra);
        lazarus(&root, &args)
    };
    let message = fails(train(&[]));
    assert!(
        message.contains("several folders") && message.contains("maps 4,8,16,32"),
        "{message}"
    );
    let report = json(&ok(train(&["--maps", "4,16,8,32"])));
    assert_eq!(report["fingerprint"], fine_fp.as_str());
    let run = report["run_id"].as_str().unwrap().to_string();
    let shown = json(&ok(lazarus(
        &root,
        &["experiments", "show", &run, "--json"],
    )));
    assert!(
        shown.to_string().contains("\"maps\":\"4,8,16,32\""),
        "{shown}"
    );
    let coarse = json(&ok(train(&["--maps", "16,32"])));
    assert_eq!(coarse["fingerprint"], default["fingerprint"]);

    // Predict an image the cache lacks (other bytes): the run's encoder
    // computes the four maps; the bundle records them and predicts the
    // same mask, bit for bit.
    let fresh = temp.path().join("fresh.bmp");
    image::open(source.join("images/003.png"))
        .unwrap()
        .to_rgb8()
        .save_with_format(&fresh, ImageFormat::Bmp)
        .unwrap();
    let bundle = temp.path().join("bundle");
    let exported = json(&ok(lazarus(
        &root,
        &["export", &run, "--out", bundle.to_str().unwrap(), "--json"],
    )));
    assert_eq!(exported["encoder"]["maps"], "4,8,16,32", "{exported}");
    let predict = |flag: &str, model: &str, out: &Path| {
        json(&ok(lazarus(
            &root,
            &[
                "predict",
                flag,
                model,
                fresh.to_str().unwrap(),
                "--task",
                "segment",
                "--out",
                out.to_str().unwrap(),
                "--json",
            ],
        )))
    };
    let by_run_out = temp.path().join("by-run");
    let by_bundle_out = temp.path().join("by-bundle");
    let by_run = predict("--run", &run, &by_run_out);
    let by_bundle = predict("--bundle", bundle.to_str().unwrap(), &by_bundle_out);
    assert_eq!(by_run[0]["features_from"], "encoder", "{by_run}");
    assert_eq!(by_bundle[0]["features_from"], "encoder", "{by_bundle}");
    let mask = |prediction: &serde_json::Value| {
        std::fs::read(prediction[0]["mask"].as_str().unwrap()).unwrap()
    };
    assert_eq!(mask(&by_run), mask(&by_bundle));
    let decoded = image::open(by_run[0]["mask"].as_str().unwrap()).unwrap();
    assert_eq!((decoded.width(), decoded.height()), (224, 224));

    // Refusals name the value.
    let refused = |extra: &[&str]| {
        let mut args = vec!["enqueue", "--dataset", "small", "--weights", "random:0"];
        args.extend_from_slice(extra);
        fails(lazarus(&root, &args))
    };
    let message = refused(&[
        "--encoder",
        "efficientnet-lite0",
        "--spatial",
        "--maps",
        "4,2",
    ]);
    assert!(
        message.contains("'4,2'") && message.contains("stride 2"),
        "{message}"
    );
    let message = refused(&["--encoder", "efficientnet-lite0", "--maps", "4,8"]);
    assert!(
        message.contains("'4,8'") && message.contains("--spatial"),
        "{message}"
    );
    let message = refused(&[
        "--encoder",
        "dinov2-vits14",
        "--spatial",
        "--maps",
        "4,8,16,32",
    ]);
    assert!(
        message.contains("'4,8,16,32'") && message.contains("dinov2-vits14"),
        "{message}"
    );
    let message = fails(train(&["--maps", "8"]));
    assert!(message.contains("maps 8"), "{message}");
}

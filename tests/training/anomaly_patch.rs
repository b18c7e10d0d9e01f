//! Patch-level anomaly scoring through the CLI (`train --task anomaly
//! --spatial`) on generated 64x64 images: a regular woven texture with
//! noise; anomalous images carry one small bright blob (radius 4 to 6 px) at
//! a random place, with its exact mask. `dataset add` (manifest with split
//! and mask columns), `enqueue --spatial`, `run-worker`, `train` with both
//! scorers, `predict` with heat maps, a sweep, and the refusals of feature
//! sets of the wrong kind. Uses the real Lite0 weights
//! (scripts/fetch_assets.sh), as tests/training/segment.rs does.

use crate::support;

use std::path::Path;

use image::{GrayImage, ImageFormat, Luma, Rgb, RgbImage};
use support::{fails, hash_unit, json, lazarus, ok};

const FETCH_HINT: &str = "run scripts/fetch_assets.sh first (it installs the Lite0 weights into $LAZARUS_CACHE, default ~/.cache/lazarus)";
const SIDE: u32 = 64;
const ENCODER: &str = "efficientnet-lite0";

/// The texture (the same weave for every image, per-pixel noise of its
/// own) and, when `blob` is set, a bright disc; the mask is the disc.
fn part_image(seed: u64, blob: Option<[f32; 3]>) -> (RgbImage, GrayImage) {
    let inside = |x: u32, y: u32| {
        blob.is_some_and(|[cx, cy, r]| {
            let (dx, dy) = (x as f32 + 0.5 - cx, y as f32 + 0.5 - cy);
            dx * dx + dy * dy <= r * r
        })
    };
    let image = RgbImage::from_fn(SIDE, SIDE, |x, y| {
        let noise = hash_unit(seed * 7_919 + (y * SIDE + x) as u64) - 0.5;
        let weave = (x as f32 * 0.8).sin() * (y as f32 * 0.8).cos();
        let value = if inside(x, y) {
            230.0 + 20.0 * noise
        } else {
            100.0 + 35.0 * weave + 30.0 * noise
        };
        let v = value.clamp(0.0, 255.0) as u8;
        Rgb([v, v, (v as f32 * 0.9) as u8])
    });
    let mask = GrayImage::from_fn(SIDE, SIDE, |x, y| {
        Luma([if inside(x, y) { 255 } else { 0 }])
    });
    (image, mask)
}

/// A blob inside the image: centre and radius.
fn blob(seed: u64) -> [f32; 3] {
    let r = 4.0 + 2.0 * hash_unit(seed * 31 + 1);
    let margin = r + 2.0;
    let cx = margin + hash_unit(seed * 31 + 2) * (SIDE as f32 - 2.0 * margin);
    let cy = margin + hash_unit(seed * 31 + 3) * (SIDE as f32 - 2.0 * margin);
    [cx, cy, r]
}

/// (split, normal count, anomalous count).
const SPLITS: [(&str, usize, usize); 3] = [("train", 40, 0), ("val", 10, 10), ("test", 10, 10)];

/// Writes the images, masks and manifest; returns the anomalous test images
/// as (path, blob).
fn write_dataset(dir: &Path) -> Vec<(std::path::PathBuf, [f32; 3])> {
    std::fs::create_dir_all(dir).unwrap();
    let mut manifest = String::from("path,label,split,mask\n");
    let mut anomalous_test = Vec::new();
    let mut seed = 0u64;
    for (split, normal, anomalous) in SPLITS {
        for i in 0..normal + anomalous {
            seed += 1;
            let disc = (i >= normal).then(|| blob(seed));
            let (image, mask) = part_image(seed, disc);
            let name = format!("{split}-{i:02}");
            let path = dir.join(format!("{name}.png"));
            image.save_with_format(&path, ImageFormat::Png).unwrap();
            mask.save_with_format(dir.join(format!("{name}-mask.png")), ImageFormat::Png)
                .unwrap();
            let label = if disc.is_some() { "blob" } else { "good" };
            manifest.push_str(&format!("{name}.png,{label},{split},{name}-mask.png\n"));
            if let (Some(disc), "test") = (disc, split) {
                anomalous_test.push((path, disc));
            }
        }
    }
    std::fs::write(dir.join("manifest.csv"), manifest).unwrap();
    anomalous_test
}

/// The dataset written under `dir` and registered as `parts` in `dir/root`;
/// returns the root and the anomalous test images.
fn parts_root(dir: &Path) -> (std::path::PathBuf, Vec<(std::path::PathBuf, [f32; 3])>) {
    let root = dir.join("root");
    let source = dir.join("parts");
    let blobs = write_dataset(&source);
    let manifest = source.join("manifest.csv");
    ok(lazarus(
        &root,
        &["dataset", "add", "parts", manifest.to_str().unwrap()],
    ));
    (root, blobs)
}

fn train(root: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "train",
        "--dataset",
        "parts",
        "--encoder",
        ENCODER,
        "--task",
        "anomaly",
        "--normal-label",
        "good",
    ];
    args.extend_from_slice(extra);
    lazarus(root, &args)
}

#[test]
fn patch_scores_find_small_blobs_and_their_heat_maps_point_at_them() {
    assert!(
        lazarus::weights::installed(ENCODER).is_some(),
        "{ENCODER} weights are not installed: {FETCH_HINT}"
    );
    let temp = tempfile::tempdir().unwrap();
    let (root, blobs) = parts_root(temp.path());

    // Pooled features only: --spatial names the enqueue command it needs.
    ok(lazarus(
        &root,
        &["enqueue", "--dataset", "parts", "--encoder", ENCODER],
    ));
    ok(lazarus(&root, &["run-worker", "--until-empty"]));
    let error = fails(train(&root, &["--spatial"]));
    assert!(
        error.contains("no spatial features of dataset parts")
            && error
                .contains("lazarus enqueue --dataset parts --encoder efficientnet-lite0 --spatial"),
        "{error}"
    );

    let enqueued = json(&ok(lazarus(
        &root,
        &[
            "enqueue",
            "--dataset",
            "parts",
            "--encoder",
            ENCODER,
            "--spatial",
            "--json",
        ],
    )));
    let spatial = enqueued["fingerprint"].as_str().unwrap().to_string();
    ok(lazarus(&root, &["run-worker", "--until-empty"]));
    // The reverse: image-level scoring pointed at the spatial set.
    let error = fails(train(&root, &["--fingerprint", &spatial]));
    assert!(
        error.contains(&format!("features {spatial} of dataset parts are spatial"))
            && error.contains("without --spatial"),
        "{error}"
    );
    // Patch flags without --spatial are refused, not ignored.
    let error = fails(train(&root, &["--channels", "10"]));
    assert!(
        error.contains("--channels applies to --task anomaly --spatial only"),
        "{error}"
    );

    // PatchCore style: the memory bank of all 40 x 14 x 14 normal patches,
    // a quarter kept by the greedy coreset; PaDiM style: a Gaussian of 100
    // channels per position.
    let knn = json(&ok(train(
        &root,
        &[
            "--spatial",
            "--scorer",
            "knn",
            "--coreset",
            "0.25",
            "--json",
        ],
    )));
    let padim = json(&ok(train(
        &root,
        &["--spatial", "--scorer", "mahalanobis", "--json"],
    )));
    for (report, name) in [(&knn, "knn"), (&padim, "mahalanobis")] {
        let m = &report["metrics"];
        assert_eq!(m["train/normal"], 40.0, "{name}: {report:#}");
        assert_eq!(m["train/patches"], 40.0 * 196.0, "{name}: {report:#}");
        assert_eq!(m["test/anomalous"], 10.0);
        assert_eq!(m["test/normal"], 10.0);
        // Measured with the ImageNet Lite0 weights on this data: image-level
        // ROC-AUC and PR-AUC 1.0 on val and test for both scorers; test
        // pixel ROC-AUC 0.995 (knn) and 0.975 (mahalanobis). The bar of 0.9
        // leaves room for other machines' rounding, not for a scorer that
        // misses the blobs.
        for key in ["val/roc_auc", "test/roc_auc", "test/pr_auc"] {
            let value = m[key].as_f64().unwrap();
            assert!(value >= 0.9, "{name}: {key} {value}: {report:#}");
        }
        let pixel = m["test/pixel_roc_auc"].as_f64().unwrap();
        assert!(pixel >= 0.9, "{name}: test/pixel_roc_auc {pixel}");
        let run_dir = Path::new(report["run_dir"].as_str().unwrap());
        for file in ["scorer.safetensors", "scores.csv", "plots/roc_curve.png"] {
            assert!(run_dir.join(file).is_file(), "{name}: {file} missing");
        }
        // Heat-map overlays of the highest-scored test images.
        let heatmaps = report["heatmaps"].as_array().unwrap();
        assert_eq!(heatmaps.len(), 8, "{report:#}");
        let first = image::open(run_dir.join(heatmaps[0].as_str().unwrap())).unwrap();
        assert_eq!((first.width(), first.height()), (SIDE, SIDE));
    }
    assert_eq!(knn["metrics"]["train/memory_bank"], 1960.0);
    assert_eq!(padim["metrics"]["train/channels"], 100.0);
    assert_eq!(knn["metrics"]["train/channels"], 1392.0);

    // Recorded like any run: best by the image-level metric.
    let best = json(&ok(lazarus(
        &root,
        &[
            "experiments",
            "best",
            "--metric",
            "test/pixel_roc_auc",
            "--top",
            "5",
            "--json",
        ],
    )));
    assert_eq!(best["runs"].as_array().unwrap().len(), 2, "{best}");

    // Predict the anomalous test images: a score, the call, and a heat map
    // whose hottest pixel lies on (or next to) the blob. The test files are
    // in the cache (by content id); two new images, one with a blob nobody
    // saw and one without, go through the encoder on the run's tiles.
    let fresh_blob = [20.0, 44.0, 5.0];
    let (fresh, _) = part_image(9_999, Some(fresh_blob));
    let fresh_path = temp.path().join("fresh.png");
    fresh
        .save_with_format(&fresh_path, ImageFormat::Png)
        .unwrap();
    let (plain, _) = part_image(9_998, None);
    let plain_path = temp.path().join("plain.png");
    plain
        .save_with_format(&plain_path, ImageFormat::Png)
        .unwrap();
    for (report, name) in [(&knn, "knn"), (&padim, "mahalanobis")] {
        let run = report["run_id"].as_str().unwrap();
        let out = temp.path().join(format!("heat-{name}"));
        let mut args = vec![
            "predict",
            "--run",
            run,
            "--out",
            out.to_str().unwrap(),
            "--json",
        ];
        let paths: Vec<String> = blobs
            .iter()
            .map(|(p, _)| p.to_str().unwrap().to_string())
            .collect();
        args.extend(paths.iter().map(String::as_str));
        args.push(fresh_path.to_str().unwrap());
        args.push(plain_path.to_str().unwrap());
        let predicted = json(&ok(lazarus(&root, &args)));
        let mut images = predicted["images"].as_array().unwrap().clone();
        let plain = images.pop().unwrap();
        // Peaks within one grid cell (16 input pixels = 4.6 image pixels)
        // of the blob's edge for knn, two for the per-position Gaussians,
        // whose 40 training tiles per position make them noisier.
        let cells = if name == "knn" { 1.0 } else { 2.0 };
        let mut on_blob = 0;
        let expected: Vec<[f32; 3]> = blobs.iter().map(|(_, b)| *b).chain([fresh_blob]).collect();
        for (image, [cx, cy, r]) in images.iter().zip(&expected) {
            assert!(image["error"].is_null(), "{image}");
            let peak = &image["peak"];
            let (x, y) = (
                peak[0].as_f64().unwrap() as f32,
                peak[1].as_f64().unwrap() as f32,
            );
            let reach = r + cells * 16.0 * SIDE as f32 / 224.0;
            if ((x - cx).powi(2) + (y - cy).powi(2)).sqrt() <= reach {
                on_blob += 1;
            }
            let heatmap = image::open(image["heatmap"].as_str().unwrap()).unwrap();
            assert_eq!((heatmap.width(), heatmap.height()), (SIDE, SIDE));
            assert!(Path::new(image["overlay"].as_str().unwrap()).is_file());
        }
        // Measured: 11 of 11 peaks (knn, all within 2.8 px of the centre)
        // and 10 of 11 (mahalanobis).
        assert!(
            on_blob >= 8,
            "{name}: {on_blob} of 11 heat-map peaks on the blob"
        );
        let last = images.last().unwrap();
        assert_eq!(last["features_from"], "encoder", "{last}");
        assert_eq!(plain["features_from"], "encoder", "{plain}");
        assert_eq!(images[0]["features_from"], "cache");
        let score = |image: &serde_json::Value| image["score"].as_f64().unwrap();
        assert!(score(last) > score(&plain), "{last}\n{plain}");
        assert_eq!(plain["anomalous"], false, "{plain}");

        // Exported, the bundle (scorer with its channels, tiling and heat
        // range; threshold; encoder) scores and draws the new images as
        // the run did, bit for bit.
        let bundle = temp.path().join(format!("bundle-{name}"));
        ok(lazarus(
            &root,
            &["export", run, "--out", bundle.to_str().unwrap()],
        ));
        let bundle_out = temp.path().join(format!("bundle-heat-{name}"));
        let by_bundle = json(&ok(lazarus(
            &root,
            &[
                "predict",
                "--bundle",
                bundle.to_str().unwrap(),
                "--out",
                bundle_out.to_str().unwrap(),
                "--json",
                fresh_path.to_str().unwrap(),
                plain_path.to_str().unwrap(),
            ],
        )));
        assert_eq!(by_bundle["threshold"], predicted["threshold"]);
        for (from_bundle, from_run) in by_bundle["images"]
            .as_array()
            .unwrap()
            .iter()
            .zip([last, &plain])
        {
            for key in ["image_id", "features_from", "score", "anomalous", "peak"] {
                assert_eq!(from_bundle[key], from_run[key], "{name}: {key}");
            }
            for picture in ["heatmap", "overlay"] {
                assert_eq!(
                    std::fs::read(from_bundle[picture].as_str().unwrap()).unwrap(),
                    std::fs::read(from_run[picture].as_str().unwrap()).unwrap(),
                    "{name}: {picture}"
                );
            }
        }
    }

    // A sweep point on spatial features: one run per scorer.
    let sweep = temp.path().join("patch-sweep.toml");
    std::fs::write(
        &sweep,
        "name = \"patch-sweep\"\ndataset = \"parts\"\nencoder = \"efficientnet-lite0\"\n\
         task = \"anomaly\"\nnormal_label = \"good\"\nspatial = true\nchannels = 64\n\
         [grid]\nscorer = [\"knn\", \"mahalanobis\"]\n",
    )
    .unwrap();
    let swept = json(&ok(lazarus(
        &root,
        &["sweep", sweep.to_str().unwrap(), "--json"],
    )));
    let runs = swept["anomaly"].as_array().unwrap();
    assert_eq!(runs.len(), 2, "{swept}");
    for run in runs {
        assert_eq!(run["metrics"]["train/channels"], 64.0);
        assert!(
            run["metrics"]["test/roc_auc"].as_f64().unwrap() >= 0.9,
            "{run}"
        );
    }
}

#[test]
fn patch_scores_read_and_encode_tiles_at_another_square() {
    let temp = tempfile::tempdir().unwrap();
    let (root, blobs) = parts_root(temp.path());
    // The 64 px parts stretched to 128 px tiles instead of 224: an 8 x 8
    // stride-16 map per image.
    ok(lazarus(
        &root,
        &[
            "enqueue",
            "--dataset",
            "parts",
            "--encoder",
            ENCODER,
            "--spatial",
            "--maps",
            "16",
            "--image-size",
            "128",
        ],
    ));
    ok(lazarus(&root, &["run-worker", "--until-empty"]));
    let report = json(&ok(train(
        &root,
        &["--spatial", "--image-size", "128", "--json"],
    )));
    assert_eq!(
        report["metrics"]["train/patches"],
        40.0 * 64.0,
        "{report:#}"
    );
    let error = fails(train(&root, &["--spatial", "--image-size", "224"]));
    assert!(error.contains("224 px"), "{error}");

    // A copy of a cached image goes through the encoder at 128 px and
    // scores as the cached rows do.
    let (cached, _) = &blobs[0];
    let copy = temp.path().join("copy.png");
    support::reencoded_png(cached, &copy);
    let run = report["run_id"].as_str().unwrap();
    let out = temp.path().join("heat");
    let predicted = json(&ok(lazarus(
        &root,
        &[
            "predict",
            "--run",
            run,
            cached.to_str().unwrap(),
            copy.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--json",
        ],
    )));
    let images = predicted["images"].as_array().unwrap();
    assert_eq!(images[0]["features_from"], "cache", "{predicted}");
    assert_eq!(images[1]["features_from"], "encoder", "{predicted}");
    let score = |image: &serde_json::Value| image["score"].as_f64().unwrap();
    let difference = (score(&images[0]) - score(&images[1])).abs();
    assert!(
        difference <= 0.02 * score(&images[0]).abs(),
        "cache vs encoder: {predicted}"
    );
}

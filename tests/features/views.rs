//! `enqueue --views` (issue 22): flipped and rotated copies of each image's
//! input square are rows of their own feature set, consecutive per image in
//! view order; training samples a view per image, evaluation and every
//! reader of the run (predict from the cache or the encoder, the bundle,
//! anomaly scoring) average over an image's views. Random-weight
//! efficientnet-lite0 at a 32-pixel stretched square, on generated images
//! of exactly 32 x 32 pixels, so preprocessing resamples nothing and a view
//! of an image is exactly the preprocessing of the transformed file.

use crate::support;

use std::path::{Path, PathBuf};

use image::{Rgb, RgbImage};
use lazarus::features::{FeatureSet, catalog};
use support::{fails, json, lazarus, ok};

/// The options every folder of these tests is extracted with.
const OPTIONS: [&str; 8] = [
    "--encoder",
    "efficientnet-lite0",
    "--weights",
    "random:3",
    "--image-size",
    "32",
    "--resize",
    "stretch",
];

/// The fingerprint main (4543499, before `--views`) computed for
/// `OPTIONS` (`lazarus enqueue ... --json` with main's binary): the
/// one-view folder must keep it.
const MAIN_FINGERPRINT: &str = "92da7659faa91e52b91c4a07acb38aeb406920e8365fbf4becd1d8fd7280f2f5";

/// A 32 x 32 image without any symmetry (every pixel distinct).
fn square(seed: u32) -> RgbImage {
    RgbImage::from_fn(32, 32, |x, y| {
        let v = seed
            .wrapping_mul(2_654_435_761)
            .wrapping_add(x * 37 + y * 101 + x * y * 7);
        Rgb([
            (v & 255) as u8,
            ((v >> 8) & 255) as u8,
            ((v >> 5) & 255) as u8,
        ])
    })
}

/// A tree of `counts[i]` such images in class folder `class{i}`.
fn square_folder(dir: &Path, counts: &[usize], first_seed: u32) -> PathBuf {
    let root = dir.join("tree");
    let mut seed = first_seed;
    for (class, &count) in counts.iter().enumerate() {
        let folder = root.join(format!("class{class}"));
        std::fs::create_dir_all(&folder).unwrap();
        for i in 0..count {
            seed += 1;
            square(seed)
                .save(folder.join(format!("img{i:03}.png")))
                .unwrap();
        }
    }
    root
}

/// View `view` of `image` made with the `image` crate, in the order
/// `enqueue --views` documents: flips (identity, horizontal, vertical,
/// both), dihedral (0, 90, 180, 270 degrees clockwise, then each
/// transposed; a transpose is a horizontal flip of the clockwise rotation).
fn transformed(image: &RgbImage, views: &str, view: usize) -> RgbImage {
    use image::imageops::{flip_horizontal, flip_vertical, rotate90, rotate180, rotate270};
    match (views, view) {
        ("flips", 0) | ("dihedral", 0) => image.clone(),
        ("flips", 1) => flip_horizontal(image),
        ("flips", 2) => flip_vertical(image),
        ("flips", 3) => rotate180(image),
        ("dihedral", 1) => rotate90(image),
        ("dihedral", 2) => rotate180(image),
        ("dihedral", 3) => rotate270(image),
        ("dihedral", k) => flip_horizontal(&rotate90(&transformed(image, "dihedral", k - 4))),
        other => panic!("no view {other:?}"),
    }
}

fn enqueue(root: &Path, dataset: &str, extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["enqueue", "--dataset", dataset, "--json"];
    args.extend_from_slice(&OPTIONS);
    args.extend_from_slice(extra);
    json(&ok(lazarus(root, &args)))
}

fn folder(root: &Path, outcome: &serde_json::Value) -> FeatureSet {
    let fingerprint = outcome["fingerprint"].as_str().unwrap();
    FeatureSet::open(&root.join("features").join(fingerprint)).unwrap()
}

fn row_values(set: &FeatureSet, row: usize) -> Vec<f32> {
    set.pooled(row).iter().map(|v| v.to_f32()).collect()
}

#[test]
fn each_view_row_is_the_features_of_the_transformed_file() {
    let temp = tempfile::tempdir().unwrap();
    let root = temp.path();
    let tree = square_folder(root, &[2, 1], 0);
    ok(lazarus(
        root,
        &["dataset", "add", "toy", tree.to_str().unwrap()],
    ));
    // Every view of every image, as files on disk, in a dataset of its own.
    let images: Vec<PathBuf> = support::files_under(&tree)
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "png"))
        .collect();
    assert_eq!(images.len(), 3);
    let disk = root.join("disk/all");
    std::fs::create_dir_all(&disk).unwrap();
    for (i, path) in images.iter().enumerate() {
        let image = image::open(path).unwrap().to_rgb8();
        for view in 0..8 {
            transformed(&image, "dihedral", view)
                .save(disk.join(format!("{i}-{view}.png")))
                .unwrap();
        }
    }
    ok(lazarus(
        root,
        &[
            "dataset",
            "add",
            "disk",
            root.join("disk").to_str().unwrap(),
        ],
    ));

    let single = enqueue(root, "toy", &[]);
    let flips = enqueue(root, "toy", &["--views", "flips"]);
    let dihedral = enqueue(root, "toy", &["--views", "dihedral"]);
    // One view is the configuration of before `--views`.
    assert_eq!(single["fingerprint"], MAIN_FINGERPRINT);
    assert_eq!(
        enqueue(root, "toy", &["--views", "1"])["images_enqueued"],
        0
    );
    assert_ne!(flips["fingerprint"], single["fingerprint"]);
    assert_ne!(dihedral["fingerprint"], single["fingerprint"]);
    assert_ne!(dihedral["fingerprint"], flips["fingerprint"]);
    // The transformed files, one view each (the identity copies are the
    // images already covered).
    let on_disk = enqueue(root, "disk", &[]);
    assert_eq!(on_disk["fingerprint"], MAIN_FINGERPRINT);
    ok(lazarus(root, &["run-worker", "--until-empty"]));

    let plain = folder(root, &single);
    for (views, outcome, count) in [("flips", &flips, 4), ("dihedral", &dihedral, 8)] {
        let set = folder(root, outcome);
        assert_eq!(set.metadata()["views"], views);
        assert_eq!(set.len(), 3 * count, "{views}");
        for path in &images {
            let image = image::open(path).unwrap().to_rgb8();
            let rows = set.rows_of(&support::file_sha256(path));
            assert_eq!(rows.len(), count, "{views}: {}", path.display());
            for (view, row) in rows.enumerate() {
                // Row k is view k, by its view tensor and by its values.
                assert_eq!(set.view(row), Some(view));
                let file = root.join("view.png");
                transformed(&image, views, view).save(&file).unwrap();
                let expected_rows = plain.rows_of(&support::file_sha256(&file));
                assert_eq!(expected_rows.len(), 1, "{views} view {view} on disk");
                let expected = row_values(&plain, expected_rows.start);
                let got = row_values(&set, row);
                // The same pixels through the same encoder: equal up to the
                // f16 rounding of the shards (they were equal bit for bit
                // when this test was written; the tolerance is one f16 step).
                for (a, b) in got.iter().zip(&expected) {
                    assert!(
                        (a - b).abs() <= 1e-3 * b.abs().max(1.0),
                        "{views} view {view} of {}: {a} against {b}",
                        path.display()
                    );
                }
            }
        }
        // `verify` counts images, and the folder is sound.
        ok(lazarus(root, &["verify"]));
    }
}

/// Class probabilities of `predict --json` answers, by class name.
fn probabilities(answer: &serde_json::Value) -> Vec<(String, f64)> {
    let mut top: Vec<(String, f64)> = answer["top"]
        .as_array()
        .unwrap()
        .iter()
        .map(|pair| {
            (
                pair[0].as_str().unwrap().to_string(),
                pair[1].as_f64().unwrap(),
            )
        })
        .collect();
    top.sort_by(|a, b| a.0.cmp(&b.0));
    top
}

fn predict(root: &Path, source: &[&str], files: &[&Path]) -> serde_json::Value {
    let mut args = vec!["predict", "--top-k", "2", "--json"];
    args.extend_from_slice(source);
    let names: Vec<&str> = files.iter().map(|p| p.to_str().unwrap()).collect();
    args.extend_from_slice(&names);
    json(&ok(lazarus(root, &args)))
}

#[test]
fn training_on_views_counts_images_and_every_reader_averages_their_views() {
    let temp = tempfile::tempdir().unwrap();
    let root = temp.path();
    let tree = square_folder(root, &[12, 12], 100);
    ok(lazarus(
        root,
        &["dataset", "add", "toy", tree.to_str().unwrap()],
    ));
    let flips = enqueue(root, "toy", &["--views", "flips"]);
    ok(lazarus(root, &["run-worker", "--until-empty"]));
    let train = |extra: &[&str]| {
        let mut args = vec![
            "train",
            "--dataset",
            "toy",
            "--encoder",
            "efficientnet-lite0",
            "--views",
            "flips",
            "--epochs",
            "1",
            "--json",
        ];
        args.extend_from_slice(extra);
        json(&ok(lazarus(root, &args)))
    };
    let report = train(&[]);
    let run = report["run_id"].as_str().unwrap().to_string();
    let run_dir = root.join(report["run_dir"].as_str().unwrap());
    // Metrics count images: 24 images of 4 rows each, each image once.
    let card = json(&std::fs::read_to_string(run_dir.join("model_card.json")).unwrap());
    let sizes = &card["split_sizes"];
    let total: u64 = ["train", "val", "test"]
        .iter()
        .map(|s| sizes[s].as_u64().unwrap())
        .sum();
    assert_eq!(total, 24, "{sizes}");
    let matrix_total: u64 = report["test_confusion_matrix"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|row| row.as_array().unwrap().iter().map(|v| v.as_u64().unwrap()))
        .sum();
    assert_eq!(matrix_total, sizes["test"].as_u64().unwrap(), "{report}");
    // The run records its folder's views and how it read them.
    let shown = ok(lazarus(root, &["experiments", "show", &run, "--json"]));
    let shown = json(&shown);
    let params = &shown["params"];
    assert_eq!(params["views"], "flips", "{params}");
    assert_eq!(params["train_views"], "sample", "{params}");
    assert_eq!(params["eval_views"], "mean", "{params}");

    // A cached image: the mean of its four rows' probabilities (computed
    // here with the run's head on the cached rows, through the library).
    let cached = tree.join("class0/img000.png");
    let from_run = predict(root, &["--run", &run], &[&cached]);
    assert_eq!(from_run[0]["features_from"], "cache");
    let layout = lazarus::layout::Layout::new(root);
    let (head, _) =
        lazarus::predict::load_run_head(&layout, &run, &candle_core::Device::Cpu).unwrap();
    let set = folder(root, &flips);
    let rows: Vec<usize> = set.rows_of(&support::file_sha256(&cached)).collect();
    assert_eq!(rows.len(), 4);
    let per_view = head.probabilities_of_rows(&set, &rows).unwrap();
    let classes = head.class_names().to_vec();
    for (class, (name, p)) in probabilities(&from_run[0]).into_iter().enumerate() {
        assert_eq!(name, classes[class]);
        let mean = per_view.iter().map(|v| v[class] as f64).sum::<f64>() / 4.0;
        // Averaged in f64 and rounded to f32 as both sides do: equal to
        // f32 precision.
        assert!((p - mean).abs() < 1e-6, "{name}: {p} against {mean}");
    }

    // A new image goes through the encoder in the four views.
    let fresh = root.join("fresh.png");
    square(9_999).save(&fresh).unwrap();
    let encoded = predict(root, &["--run", &run], &[&fresh]);
    assert_eq!(encoded[0]["features_from"], "encoder");
    // The bundle records the views and answers the same.
    let bundle = root.join("bundle");
    ok(lazarus(
        root,
        &["export", &run, "--out", bundle.to_str().unwrap()],
    ));
    let encoder_json = json(&std::fs::read_to_string(bundle.join("encoder.json")).unwrap());
    assert_eq!(encoder_json["views"], "flips", "{encoder_json}");
    let from_bundle = predict(root, &["--bundle", bundle.to_str().unwrap()], &[&fresh]);
    assert_eq!(from_bundle[0]["top"], encoded[0]["top"]);
    // The same head reading view 0 only (one epoch from the same seed
    // trains the same weights; --eval-views changes only the reading):
    // each transformed file's answer is one view's probabilities of the
    // new image, and their mean is the averaged answer.
    let first = train(&["--eval-views", "first"]);
    let first_run = first["run_id"].as_str().unwrap().to_string();
    let image = image::open(&fresh).unwrap().to_rgb8();
    let mut sums = vec![0f64; classes.len()];
    for view in 0..4 {
        let file = root.join(format!("fresh-{view}.png"));
        transformed(&image, "flips", view).save(&file).unwrap();
        let answer = predict(root, &["--run", &first_run], &[&file]);
        for (sum, (_, p)) in sums.iter_mut().zip(probabilities(&answer[0])) {
            *sum += p;
        }
    }
    for ((name, p), sum) in probabilities(&encoded[0]).into_iter().zip(sums) {
        // One row per pass against four: the head's matmul rounds its f32
        // sums differently, well inside 1e-5.
        assert!(
            (p - sum / 4.0).abs() < 1e-5,
            "{name}: {p} against {}",
            sum / 4.0
        );
    }

    // A sweep axis over how views are read.
    let sweep = root.join("views.toml");
    std::fs::write(
        &sweep,
        "name = \"views\"\ndataset = \"toy\"\nencoder = \"efficientnet-lite0\"\nviews = \"flips\"\nepochs = 1\n\
         [grid]\ntrain_views = [\"sample\", \"first\"]\n",
    )
    .unwrap();
    let outcome = json(&ok(lazarus(
        root,
        &["sweep", sweep.to_str().unwrap(), "--json"],
    )));
    // The `sample` point is the run `train` made above: skipped as FINISHED.
    assert_eq!(outcome["trained"].as_array().unwrap().len(), 1, "{outcome}");
    assert_eq!(outcome["skipped"].as_array().unwrap().len(), 1, "{outcome}");
    assert_eq!(outcome["skipped"][0][1], run.as_str(), "{outcome}");
}

#[test]
fn anomaly_scores_on_views_are_the_mean_of_the_views_scores() {
    let temp = tempfile::tempdir().unwrap();
    let root = temp.path();
    let tree = square_folder(root, &[12, 8], 300);
    ok(lazarus(
        root,
        &["dataset", "add", "toy", tree.to_str().unwrap()],
    ));
    let flips = enqueue(root, "toy", &["--views", "flips"]);
    ok(lazarus(root, &["run-worker", "--until-empty"]));
    let report = json(&ok(lazarus(
        root,
        &[
            "train",
            "--dataset",
            "toy",
            "--encoder",
            "efficientnet-lite0",
            "--views",
            "flips",
            "--task",
            "anomaly",
            "--normal-label",
            "class0",
            "--scorer",
            "mahalanobis",
            "--json",
        ],
    )));
    let run = report["run_id"].as_str().unwrap().to_string();
    let run_dir = root.join(report["run_dir"].as_str().unwrap());
    // Scored per image: the test split's images, not their rows.
    let metrics = json(&std::fs::read_to_string(run_dir.join("metrics.json")).unwrap());
    assert!(metrics.to_string().contains("test/roc_auc"), "{metrics}");

    let cached = tree.join("class1/img000.png");
    let answer = json(&ok(lazarus(
        root,
        &["predict", "--run", &run, "--json", cached.to_str().unwrap()],
    )));
    let image = &answer["images"][0];
    assert_eq!(image["features_from"], "cache", "{answer}");
    let score = image["score"].as_f64().unwrap();
    // The scorer on each view row alone, through the library.
    let scorer =
        lazarus::train::anomaly::SavedScorer::load(&run_dir, &candle_core::Device::Cpu).unwrap();
    let set = folder(root, &flips);
    let rows: Vec<usize> = set.rows_of(&support::file_sha256(&cached)).collect();
    assert_eq!(rows.len(), 4);
    let mut scores = Vec::new();
    for &row in &rows {
        let values = row_values(&set, row);
        scores.extend(scorer.scores(&values, &candle_core::Device::Cpu).unwrap());
    }
    let mean = scores.iter().sum::<f64>() / 4.0;
    // Each view scored alone or four together: the same Gaussian, rounded
    // alike to well inside 1e-6 of the score.
    assert!(
        (score - mean).abs() <= 1e-6 * mean.abs().max(1.0),
        "{score} against {mean} ({scores:?})"
    );
    assert!(
        scores.iter().any(|s| (s - scores[0]).abs() > 1e-9),
        "{scores:?}"
    );
}

#[test]
fn views_are_refused_where_they_cannot_apply() {
    let temp = tempfile::tempdir().unwrap();
    let root = temp.path();
    let tree = square_folder(root, &[2, 2], 500);
    ok(lazarus(
        root,
        &["dataset", "add", "toy", tree.to_str().unwrap()],
    ));
    let enqueue = |extra: &[&str]| {
        let mut args = vec![
            "enqueue",
            "--dataset",
            "toy",
            "--encoder",
            "efficientnet-lite0",
            "--weights",
            "random:1",
        ];
        args.extend_from_slice(extra);
        lazarus(root, &args)
    };
    // A usage error (clap, exit 2) naming both flags.
    let output = enqueue(&["--views", "flips", "--spatial"]);
    assert_eq!(output.status.code(), Some(2));
    let error = support::stderr(&output);
    assert!(error.contains("--views"), "{error}");
    assert!(error.contains("--spatial"), "{error}");
    let error = fails(enqueue(&["--views", "x"]));
    assert!(error.contains("--views 'x'"), "{error}");
    assert!(error.contains("1, flips or dihedral"), "{error}");
    let error = fails(lazarus(
        root,
        &[
            "train",
            "--dataset",
            "toy",
            "--encoder",
            "efficientnet-lite0",
            "--views",
            "4",
        ],
    ));
    assert!(
        error.contains("'4'") && error.contains("1, flips or dihedral"),
        "{error}"
    );
    let error = fails(lazarus(
        root,
        &[
            "train",
            "--dataset",
            "toy",
            "--encoder",
            "efficientnet-lite0",
            "--views",
            "flips",
            "--task",
            "segment",
        ],
    ));
    assert!(error.contains("--views picks pooled features"), "{error}");
    // Nothing was enqueued by the refusals.
    let outcome = json(&ok(enqueue(&["--views", "flips", "--json"])));
    assert_eq!(outcome["images_enqueued"], 4, "{outcome}");
}

/// `drift` on dihedral folders compares images, each the mean of its eight
/// view rows: the row counts are images (not 8 x images, which would make
/// every p-value look eight times as certain), and the per-dimension means
/// are those of the view means, computed here from the rows themselves.
#[test]
fn drift_on_a_views_folder_compares_images_as_the_mean_of_their_views() {
    let temp = tempfile::tempdir().unwrap();
    let root = temp.path();
    let reference_tree = square_folder(&root.join("reference"), &[6, 6], 0);
    let candidate_tree = square_folder(&root.join("candidate"), &[5, 5], 500);
    for (name, tree) in [("ref", &reference_tree), ("cand", &candidate_tree)] {
        ok(lazarus(
            root,
            &["dataset", "add", name, tree.to_str().unwrap()],
        ));
    }
    let reference = enqueue(root, "ref", &["--views", "dihedral"]);
    let candidate = enqueue(root, "cand", &["--views", "dihedral"]);
    ok(lazarus(root, &["run-worker", "--until-empty"]));
    let report = json(&ok(lazarus(
        root,
        &[
            "drift",
            "--reference",
            "ref",
            "--candidate",
            "cand",
            "--views",
            "dihedral",
            "--components",
            "2",
            "--json",
        ],
    )));
    assert_eq!(report["reference"]["rows"], 12, "{report}");
    assert_eq!(report["reference"]["rows_used"], 12, "{report}");
    assert_eq!(report["candidate"]["rows"], 10, "{report}");
    assert_eq!(report["candidate"]["rows_used"], 10, "{report}");

    // The reported means of the most shifted dimensions are the means over
    // images of each image's view mean.
    let mean_of_view_means = |set: &FeatureSet, dimension: usize| {
        let images = set.len() / 8;
        let sum: f64 = (0..images)
            .map(|image| {
                (0..8)
                    .map(|view| f64::from(row_values(set, image * 8 + view)[dimension]))
                    .sum::<f64>()
                    / 8.0
            })
            .sum();
        sum / images as f64
    };
    // Both datasets' rows live in one folder (same options, one cache);
    // each dataset's own rows are what the catalog opens for it.
    assert_eq!(reference["fingerprint"], candidate["fingerprint"]);
    let layout = lazarus::layout::Layout::new(root);
    let dihedral = catalog::PooledChoice {
        views: Some("dihedral".to_string()),
        ..catalog::PooledChoice::default()
    };
    let rows_of = |dataset: &str| {
        catalog::open(
            &layout,
            &catalog::FeatureRequest {
                dataset,
                pooled: Some(&dihedral),
                ..catalog::FeatureRequest::default()
            },
        )
        .unwrap()
        .features
    };
    let reference_set = rows_of("ref");
    let candidate_set = rows_of("cand");
    assert_eq!(reference_set.len(), 12 * 8);
    let top = report["top_dimensions"].as_array().unwrap();
    assert!(!top.is_empty(), "{report}");
    for shift in top {
        let dimension = shift["dimension"].as_u64().unwrap() as usize;
        for (set, key) in [
            (&reference_set, "reference_mean"),
            (&candidate_set, "candidate_mean"),
        ] {
            let expected = mean_of_view_means(set, dimension);
            let reported = shift[key].as_f64().unwrap();
            assert!(
                (reported - expected).abs() <= 1e-4 * (1.0 + expected.abs()),
                "dimension {dimension} {key}: reported {reported}, view means give {expected}"
            );
        }
    }
}

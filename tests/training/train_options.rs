//! `lazarus train` options through the CLI on synthetic features: mixed
//! precision, class weighting and the balanced sampler, reduce-on-plateau,
//! class-weight files, and kill -9 then `--resume`.

use crate::support;

use std::path::Path;

use support::{Synthetic, fails, json, kill_after_checkpoint, lazarus, ok, synthetic_features};

fn train(root: &Path, dataset: &str, extra: &[&str]) -> serde_json::Value {
    let mut args = vec![
        "train",
        "--dataset",
        dataset,
        "--encoder",
        "toy-encoder",
        "--seed",
        "3",
        "--json",
    ];
    args.extend_from_slice(extra);
    json(&ok(lazarus(root, &args)))
}

fn test_metric(report: &serde_json::Value, name: &str) -> f64 {
    report["test"][name]
        .as_f64()
        .unwrap_or_else(|| panic!("no {name} in {report:#}"))
}

#[test]
fn f16_and_bf16_land_within_one_point_of_f32() {
    let temp = tempfile::tempdir().unwrap();
    let root = temp.path();
    // 4 overlapping classes: f32 lands well below 100%, so the comparison means something.
    synthetic_features(
        root,
        &Synthetic {
            name: "overlap",
            counts: &[750, 750, 750, 750],
            dim: 16,
            separation: 1.5,
        },
    );
    let common = ["--epochs", "8", "--lr", "0.01", "--batch-size", "64"];
    let f32_run = train(root, "overlap", &common);
    let f32_accuracy = test_metric(&f32_run, "test/accuracy");
    assert!(
        (0.5..0.97).contains(&f32_accuracy),
        "f32 accuracy {f32_accuracy} should show overlap"
    );
    for precision in ["bf16", "f16"] {
        let mut args = common.to_vec();
        args.extend(["--precision", precision]);
        let run = train(root, "overlap", &args);
        let accuracy = test_metric(&run, "test/accuracy");
        assert!(
            (accuracy - f32_accuracy).abs() <= 0.01,
            "{precision}: test accuracy {accuracy} vs f32 {f32_accuracy}"
        );
        let skipped = run["epochs"][0]["train/skipped_steps"].as_f64().unwrap();
        assert!(skipped >= 0.0);
        if precision == "f16" {
            assert!(
                run["epochs"][0].get("train/loss_scale").is_some(),
                "{run:#}"
            );
        }
    }
}

#[test]
fn class_weighting_and_balanced_sampler_help_the_rare_class() {
    let temp = tempfile::tempdir().unwrap();
    let root = temp.path();
    // 20:1 imbalance with overlapping classes: unweighted training favours class0.
    synthetic_features(
        root,
        &Synthetic {
            name: "imbalanced",
            counts: &[1000, 50],
            dim: 8,
            separation: 1.5,
        },
    );
    let common = ["--epochs", "10", "--lr", "0.01", "--batch-size", "64"];
    let rare_recall = |report: &serde_json::Value| test_metric(report, "test/recall/class1");
    let plain = train(root, "imbalanced", &common);
    let mut weighted_args = common.to_vec();
    weighted_args.extend(["--class-weights", "balanced"]);
    let weighted = train(root, "imbalanced", &weighted_args);
    let mut sampled_args = common.to_vec();
    sampled_args.extend(["--sampler", "balanced"]);
    let sampled = train(root, "imbalanced", &sampled_args);
    assert!(
        rare_recall(&weighted) > rare_recall(&plain),
        "balanced weights: rare recall {} vs {}",
        rare_recall(&weighted),
        rare_recall(&plain)
    );
    assert!(
        rare_recall(&sampled) > rare_recall(&plain),
        "balanced sampler: rare recall {} vs {}",
        rare_recall(&sampled),
        rare_recall(&plain)
    );

    // A weights file: the same weights as "balanced" give the same run.
    // Training counts: 800 and 40 of 840 -> 840/1600 and 840/80.
    let file = root.join("weights.csv");
    std::fs::write(&file, "class,weight\nclass0,0.525\nclass1,10.5\n").unwrap();
    let mut file_args = common.to_vec();
    file_args.extend(["--class-weights", file.to_str().unwrap()]);
    let from_file = train(root, "imbalanced", &file_args);
    assert_eq!(from_file["test"], weighted["test"]);

    std::fs::write(&file, "class0,1\nclass7,2\n").unwrap();
    let message = fails(lazarus(
        root,
        &[
            "train",
            "--dataset",
            "imbalanced",
            "--encoder",
            "toy-encoder",
            "--class-weights",
            file.to_str().unwrap(),
        ],
    ));
    assert!(
        message.contains("line 2") && message.contains("unknown class \"class7\""),
        "{message}"
    );
}

#[test]
fn plateau_schedule_lowers_the_rate_when_validation_stalls() {
    let temp = tempfile::tempdir().unwrap();
    let root = temp.path();
    synthetic_features(
        root,
        &Synthetic {
            name: "plateau",
            counts: &[100, 100],
            dim: 8,
            separation: 4.0,
        },
    );
    // Separable data: val accuracy reaches 1.0 within two epochs and cannot
    // improve after that.
    let run = train(
        root,
        "plateau",
        &[
            "--epochs",
            "6",
            "--lr",
            "0.1",
            "--schedule",
            "plateau",
            "--plateau-patience",
            "1",
            "--plateau-factor",
            "0.1",
            "--batch-size",
            "16",
        ],
    );
    let rates: Vec<f64> = run["epochs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["train/learning_rate"].as_f64().unwrap())
        .collect();
    let val: Vec<f64> = run["epochs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["val/accuracy"].as_f64().unwrap())
        .collect();
    assert_eq!(rates[0], 0.1, "{rates:?} {val:?}");
    // Patience 1: the rate drops after two epochs without a new best, by 10x.
    assert!(
        (rates.last().unwrap() - 0.01).abs() < 1e-9,
        "rate did not drop to 0.01: {rates:?} {val:?}"
    );
    assert!(rates.windows(2).all(|w| w[1] <= w[0]), "{rates:?}");
}

/// Kills `args` (a `train ... --json` run) in `killed_root` after its third
/// checkpoint, resumes it, runs the same in `clean_root` uninterrupted and
/// asserts both ended alike (epochs, test metrics, confusion matrix).
/// Returns the run id and the resumed run's report.
fn kill_resume_and_compare(
    killed_root: &Path,
    clean_root: &Path,
    args: &[&str],
) -> (String, serde_json::Value) {
    let run_dir = kill_after_checkpoint(killed_root, args, 3);
    let run_id = run_dir.file_name().unwrap().to_str().unwrap().to_string();
    let resumed = json(&ok(lazarus(
        killed_root,
        &["train", "--resume", &run_id, "--json"],
    )));
    assert!(
        resumed["resumed_from_epoch"].as_u64().unwrap() >= 3,
        "{resumed:#}"
    );
    let uninterrupted = json(&ok(lazarus(clean_root, args)));
    assert_eq!(resumed["epochs_run"], uninterrupted["epochs_run"]);
    assert_eq!(resumed["test"], uninterrupted["test"]);
    assert_eq!(resumed["epochs"], uninterrupted["epochs"]);
    assert_eq!(
        resumed["test_confusion_matrix"],
        uninterrupted["test_confusion_matrix"]
    );
    (run_id, resumed)
}

#[test]
fn killed_run_resumes_to_the_same_metrics() {
    let temp = tempfile::tempdir().unwrap();
    let killed_root = temp.path().join("killed");
    let clean_root = temp.path().join("clean");
    let spec = Synthetic {
        name: "resume",
        counts: &[600, 600, 600],
        dim: 32,
        separation: 1.0,
    };
    synthetic_features(&killed_root, &spec);
    synthetic_features(&clean_root, &spec);
    let args = [
        "train",
        "--dataset",
        "resume",
        "--encoder",
        "toy-encoder",
        "--head",
        "mlp",
        "--hidden",
        "128",
        "--dropout",
        "0.2",
        "--epochs",
        "40",
        "--batch-size",
        "32",
        "--schedule",
        "cosine",
        "--warmup-steps",
        "20",
        "--seed",
        "11",
        "--json",
    ];
    let (run_id, _) = kill_resume_and_compare(&killed_root, &clean_root, &args);
    let run_id = run_id.as_str();

    // A finished run is not resumed again; an unknown one is named.
    let message = fails(lazarus(&killed_root, &["train", "--resume", run_id]));
    assert!(message.contains("already finished"), "{message}");
    let message = fails(lazarus(&killed_root, &["train", "--resume", "nope"]));
    assert!(message.contains("run nope not found"), "{message}");
}

/// Features of 4 flip views per image (written as `enqueue --views flips`
/// writes them): each view is the class centre plus noise of its own, so
/// which view an epoch draws changes the gradient.
fn synthetic_flip_features(root: &Path, name: &str, counts: &[usize], dim: usize) {
    let tree = support::image_folder_from(&root.join(name), counts, support::name_seed(name));
    ok(lazarus(
        root,
        &["dataset", "add", name, tree.to_str().unwrap()],
    ));
    let dataset = lazarus::dataset::load(&lazarus::layout::Layout::new(root), name).unwrap();
    support::write_view_features_as(
        root,
        name,
        ("fp-flips", "toy-encoder"),
        ("flips", 4),
        dim,
        |record, view, d| {
            let class = dataset
                .class_index(record.label.as_deref().unwrap())
                .unwrap();
            let centre = if d == class % dim { 1.0 } else { 0.0 };
            centre + support::gaussian_noise(((record.index * 4 + view) * 1_000 + d) as u64 * 4)
        },
    );
}

#[test]
fn killed_run_on_views_resumes_to_the_same_draws_and_metrics() {
    // The view each image is trained on depends on (seed, epoch, image)
    // only, so a run killed after its third checkpoint and resumed must
    // end exactly as one never interrupted.
    let temp = tempfile::tempdir().unwrap();
    let killed_root = temp.path().join("killed");
    let clean_root = temp.path().join("clean");
    for root in [&killed_root, &clean_root] {
        synthetic_flip_features(root, "flipped", &[600, 600, 600], 32);
    }
    let args = [
        "train",
        "--dataset",
        "flipped",
        "--encoder",
        "toy-encoder",
        "--views",
        "flips",
        "--head",
        "mlp",
        "--hidden",
        "128",
        "--dropout",
        "0.2",
        "--epochs",
        "40",
        "--batch-size",
        "32",
        "--seed",
        "3",
        "--json",
    ];
    let (_, resumed) = kill_resume_and_compare(&killed_root, &clean_root, &args);
    // Metrics count images (1,800 of them), not their 7,200 rows.
    let test_images: u64 = resumed["test_confusion_matrix"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|row| row.as_array().unwrap().iter().map(|v| v.as_u64().unwrap()))
        .sum();
    assert!(test_images > 100 && test_images < 400, "{test_images}");
}

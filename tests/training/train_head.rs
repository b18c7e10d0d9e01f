//! `lazarus train` end to end: a registered ImageFolder dataset, features
//! written for its manifest rows, a linear head trained through the CLI.

use crate::support;

use std::collections::HashMap;
use std::path::Path;

use half::f16;
use lazarus::features::{self, JobRef, ShardData};
use lazarus::layout::Layout;
use support::{fails, image_folder, json, lazarus, ok};

const DIM: usize = 8;

/// Registers 3 classes x 40 images and writes linearly separable features:
/// class c is centred on +4 in dimension c, with small deterministic jitter.
/// Which features `setup` writes.
#[derive(PartialEq)]
enum Features {
    Clean,
    /// One NaN in the second row.
    NanRow,
    /// Only the training split's rows.
    TrainOnly,
}

fn setup(root: &Path, variant: Features) {
    let tree = image_folder(root, &[40, 40, 40]);
    ok(lazarus(
        root,
        &["dataset", "add", "toy", tree.to_str().unwrap()],
    ));
    let layout = Layout::new(root);
    let dataset = lazarus::dataset::load(&layout, "toy").unwrap();
    let mut content_ids = Vec::new();
    let mut pooled = Vec::new();
    for record in &dataset.images {
        if variant == Features::TrainOnly && record.split != lazarus::dataset::Split::Train {
            continue;
        }
        let class = dataset
            .class_index(record.label.as_deref().unwrap())
            .unwrap();
        content_ids.push(support::file_sha256(&record.path));
        for d in 0..DIM {
            let jitter = ((record.index * 7 + d * 13) % 11) as f32 / 11.0 - 0.5;
            let centre = if d == class { 4.0 } else { 0.0 };
            pooled.push(f16::from_f32(centre + jitter));
        }
    }
    if variant == Features::NanRow {
        pooled[DIM + 2] = f16::NAN;
    }
    let dir = features::feature_dir(&layout, "fp1");
    let data = ShardData {
        content_ids: &content_ids,
        pooled: &pooled,
        feature_dim: DIM,
        spatial: None,
        views: None,
    };
    let metadata = HashMap::from([("encoder".to_string(), "toy-encoder".to_string())]);
    features::write_shard(
        &dir,
        0,
        &data,
        metadata,
        JobRef {
            job_id: 1,
            attempt: 1,
        },
    )
    .unwrap();
}

fn train(root: &Path, extra: &[&str]) -> serde_json::Value {
    let mut args = vec![
        "train",
        "--dataset",
        "toy",
        "--encoder",
        "toy-encoder",
        "--head",
        "linear",
        "--epochs",
        "15",
        "--lr",
        "0.05",
        "--batch-size",
        "16",
        "--seed",
        "7",
        "--json",
    ];
    args.extend_from_slice(extra);
    json(&ok(lazarus(root, &args)))
}

#[test]
fn linear_head_separates_toy_features_reproducibly() {
    let temp = tempfile::tempdir().unwrap();
    let root = temp.path();
    setup(root, Features::Clean);
    let first = train(root, &[]);
    let accuracy = first["test"]["test/accuracy"].as_f64().unwrap();
    assert!(accuracy >= 0.99, "test accuracy {accuracy}: {first:#}");
    assert!(first["epochs"][0].get("val/macro_f1").is_some());
    let run_dir = Path::new(first["run_dir"].as_str().unwrap());
    for file in ["metrics.json", "config.json", "head.safetensors"] {
        assert!(
            run_dir.join(file).is_file(),
            "{file} missing in {}",
            run_dir.display()
        );
    }
    // Same seed, same metrics, in a separate run folder.
    let second = train(root, &[]);
    assert_ne!(first["run_id"], second["run_id"]);
    assert_eq!(first["epochs"], second["epochs"]);
    assert_eq!(first["test"], second["test"]);
    // The plan reports what it counted; a budget of the fixed cost plus 5
    // examples runs batch 16 as 4 micro-batches, with the same accuracy.
    let fixed = first["plan"]["fixed_bytes"].as_u64().unwrap();
    let per_example = first["plan"]["per_example_bytes"].as_u64().unwrap();
    let budget = (fixed + 5 * per_example).to_string();
    let tight = train(root, &["--memory-budget", &budget]);
    assert_eq!(tight["plan"]["micro_batch"], 5, "{tight:#}");
    assert_eq!(tight["plan"]["accumulation_steps"], 4, "{tight:#}");
    assert!(tight["test"]["test/accuracy"].as_f64().unwrap() >= 0.99);
    let too_small = (fixed + per_example - 1).to_string();
    let refused = fails(lazarus(
        root,
        &[
            "train",
            "--dataset",
            "toy",
            "--encoder",
            "toy-encoder",
            "--batch-size",
            "16",
            "--memory-budget",
            &too_small,
        ],
    ));
    assert!(
        refused.contains(&format!("memory budget of {too_small} bytes")),
        "{refused}"
    );
}

#[test]
fn non_finite_and_missing_features_are_refused() {
    let temp = tempfile::tempdir().unwrap();
    let root = temp.path();
    setup(root, Features::NanRow);
    let message = fails(lazarus(
        root,
        &["train", "--dataset", "toy", "--encoder", "toy-encoder"],
    ));
    assert!(message.contains("NaN or inf"), "{message}");
    // A registered dataset none of whose images has features.
    let other = root.join("other");
    for i in 0..3 {
        support::write_image(
            &other.join(format!("a/{i}.png")),
            1000 + i,
            image::ImageFormat::Png,
        );
    }
    ok(lazarus(
        root,
        &["dataset", "add", "other", other.to_str().unwrap()],
    ));
    let message = fails(lazarus(
        root,
        &["train", "--dataset", "other", "--encoder", "toy-encoder"],
    ));
    assert!(
        message.contains("no pooled features of dataset other made by toy-encoder")
            && message.contains("lazarus enqueue --dataset other --encoder toy-encoder"),
        "{message}"
    );
}

#[test]
fn split_without_features_is_refused() {
    let temp = tempfile::tempdir().unwrap();
    let root = temp.path();
    setup(root, Features::TrainOnly);
    // Issue 19: a set that lacks images is refused, saying how many per split.
    let message = fails(lazarus(
        root,
        &["train", "--dataset", "toy", "--encoder", "toy-encoder"],
    ));
    assert!(
        message.contains("lack 24 of the 120 images of dataset toy")
            && message.contains("(0 train, 12 val, 12 test)")
            && message.contains("--allow-partial"),
        "{message}"
    );
    // Allowed, the empty splits still refuse the run.
    let message = fails(lazarus(
        root,
        &[
            "train",
            "--dataset",
            "toy",
            "--encoder",
            "toy-encoder",
            "--allow-partial",
        ],
    ));
    assert!(message.contains("split val has no examples"), "{message}");
}

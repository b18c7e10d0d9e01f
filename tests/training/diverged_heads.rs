//! Heads whose training diverges, through the CLI: a non-finite loss or
//! output fails the run (recorded FAILED with the reason) instead of
//! finishing it with NaN probabilities that every metric counted as hits;
//! `experiments best` never ranks such a run; `predict` refuses a head or
//! scorer file holding NaN or infinity.

use crate::support;

use std::path::Path;

use support::{Synthetic, fails, json, lazarus, ok, synthetic_features};

fn setup(root: &Path) {
    synthetic_features(
        root,
        &Synthetic {
            name: "toy",
            counts: &[60, 60],
            dim: 8,
            separation: 3.0,
        },
    );
}

fn train(root: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "train",
        "--dataset",
        "toy",
        "--encoder",
        "toy-encoder",
        "--checkpoint-every",
        "0",
    ];
    args.extend_from_slice(extra);
    lazarus(root, &args)
}

fn runs(root: &Path) -> Vec<serde_json::Value> {
    json(&ok(lazarus(root, &["experiments", "list", "--json"])))
        .as_array()
        .unwrap()
        .clone()
}

/// Rewrites a safetensors file with its first value of `tensor` set to NaN.
fn poison(path: &Path, tensor: &str) {
    let bytes = std::fs::read(path).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = file
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            (
                name,
                view.dtype(),
                view.shape().to_vec(),
                view.data().to_vec(),
            )
        })
        .collect();
    let target = tensors
        .iter_mut()
        .find(|(name, ..)| name == tensor)
        .unwrap_or_else(|| panic!("{} has no tensor {tensor}", path.display()));
    assert_eq!(target.1, safetensors::Dtype::F32);
    target.3[..4].copy_from_slice(&f32::NAN.to_le_bytes());
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(name, dtype, shape, data)| {
            let view = safetensors::tensor::TensorView::new(*dtype, shape.clone(), data).unwrap();
            (name.clone(), view)
        })
        .collect();
    let out = safetensors::serialize(views, header.metadata().clone()).unwrap();
    std::fs::write(path, out).unwrap();
}

#[test]
fn a_diverging_head_fails_its_run_and_best_ranks_only_the_good_one() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    setup(root);
    // lr 1e38: the first step sends the weights to infinity. Before, the run
    // finished with accuracy 1.0 (NaN probabilities compared false, so
    // top-k counted every example a hit).
    let message = fails(train(
        root,
        &["--head", "linear", "--epochs", "2", "--lr", "1e38"],
    ));
    assert!(
        message.contains("diverged and is recorded FAILED"),
        "{message}"
    );
    assert!(message.contains("stopped being finite"), "{message}");
    assert!(message.contains("--lr"), "{message}");
    let listed = runs(root);
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["status"], "FAILED", "{listed:?}");
    let failed = listed[0]["id"].as_str().unwrap().to_string();
    let shown = json(&ok(lazarus(
        root,
        &["experiments", "show", &failed, "--json"],
    )));
    assert!(
        shown.to_string().contains("stopped being finite"),
        "the reason is recorded as the run's error tag: {shown}"
    );
    assert!(
        !root
            .join("experiments/runs")
            .join(&failed)
            .join("head.safetensors")
            .exists(),
        "a diverged run leaves no head to predict with"
    );

    let good = json(&ok(train(
        root,
        &[
            "--head", "linear", "--epochs", "3", "--lr", "0.01", "--json",
        ],
    )));
    let best = json(&ok(lazarus(
        root,
        &[
            "experiments",
            "best",
            "--metric",
            "test/accuracy",
            "--top",
            "5",
            "--json",
        ],
    )));
    let ranked: Vec<&str> = best["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["run"].as_str().unwrap())
        .collect();
    assert_eq!(ranked, [good["run_id"].as_str().unwrap()], "{best}");
}

#[test]
fn a_sweep_fails_the_diverged_head_and_finishes_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    setup(root);
    let file = root.join("sweep.toml");
    std::fs::write(
        &file,
        "name = \"lrs\"\ndataset = \"toy\"\nencoder = \"toy-encoder\"\nepochs = 2\n\
         [grid]\nhead = [\"linear\"]\nlr = [0.01, 1e38]\n",
    )
    .unwrap();
    let message = fails(lazarus(root, &["sweep", file.to_str().unwrap()]));
    assert!(
        message.contains("1 of the sweep's runs failed"),
        "{message}"
    );
    assert!(message.contains("stopped being finite"), "{message}");
    let mut statuses: Vec<String> = runs(root)
        .iter()
        .map(|r| r["status"].as_str().unwrap().to_string())
        .collect();
    statuses.sort();
    assert_eq!(statuses, ["FAILED", "FINISHED"]);
}

#[test]
fn predict_refuses_a_head_holding_nan() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    setup(root);
    let image = support::image_rows(root, "toy")[0][2].clone();

    let run = json(&ok(train(
        root,
        &["--head", "linear", "--epochs", "2", "--json"],
    )));
    let run_id = run["run_id"].as_str().unwrap();
    ok(lazarus(root, &["predict", "--run", run_id, &image]));
    let head = root
        .join("experiments/runs")
        .join(run_id)
        .join("head.safetensors");
    poison(&head, "layers.0.weight");
    let message = fails(lazarus(root, &["predict", "--run", run_id, &image]));
    assert!(message.contains("head.safetensors"), "{message}");
    assert!(
        message.contains("tensor layers.0.weight holds NaN or infinite values"),
        "{message}"
    );
}

#[test]
fn predict_refuses_an_anomaly_scorer_holding_nan() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    // Anomaly predict needs the run's encoder: real extraction, random weights.
    support::extract_toy(root, &[12, 12]);
    let image = support::image_rows(root, "toy")[0][2].clone();
    let scorer = json(&ok(lazarus(
        root,
        &[
            "train",
            "--dataset",
            "toy",
            "--encoder",
            "efficientnet-lite0",
            "--task",
            "anomaly",
            "--normal-label",
            "class0",
            "--scorer",
            "mahalanobis",
            "--json",
        ],
    )));
    let scorer_id = scorer["run_id"].as_str().unwrap();
    ok(lazarus(root, &["predict", "--run", scorer_id, &image]));
    let path = root
        .join("experiments/runs")
        .join(scorer_id)
        .join("scorer.safetensors");
    poison(&path, "input_mean");
    let message = fails(lazarus(root, &["predict", "--run", scorer_id, &image]));
    assert!(message.contains("scorer.safetensors"), "{message}");
    assert!(
        message.contains("tensor input_mean holds NaN or infinite values"),
        "{message}"
    );
}

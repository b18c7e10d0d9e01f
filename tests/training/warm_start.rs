//! `lazarus train --init-from RUN` on synthetic features: the same classes
//! load every layer (the first epoch's validation accuracy is the source
//! run's), other classes re-initialise only the output layer, other feature
//! dimensions and unknown runs are refused by name.

use crate::support;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use support::{Synthetic, fails, json, lazarus, ok, stderr, synthetic_features};

fn train(root: &Path, dataset: &str, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "train",
        "--dataset",
        dataset,
        "--encoder",
        "toy-encoder",
        "--head",
        "mlp",
        "--hidden",
        "16,8",
        "--batch-size",
        "16",
        "--json",
    ];
    args.extend_from_slice(extra);
    lazarus(root, &args)
}

fn head(report: &serde_json::Value) -> HashMap<String, Tensor> {
    let dir = Path::new(report["run_dir"].as_str().unwrap());
    lazarus::train::checkpoint::load_tensors(&dir.join("head.safetensors"), &Device::Cpu).unwrap()
}

fn max_difference(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn params(root: &Path, run: &serde_json::Value) -> serde_json::Value {
    let detail = json(&ok(lazarus(
        root,
        &["experiments", "show", run.as_str().unwrap(), "--json"],
    )));
    detail["params"].clone()
}

#[test]
fn warm_start_loads_matching_layers_and_reinitialises_the_output_for_other_classes() {
    let temp = tempfile::tempdir().unwrap();
    let root = temp.path();
    for (name, counts, dim) in [
        ("three", &[30, 30, 30][..], 8),
        ("two", &[30, 30][..], 8),
        ("narrow", &[20, 20][..], 4),
    ] {
        synthetic_features(
            root,
            &Synthetic {
                name,
                counts,
                dim,
                separation: 1.5,
            },
        );
    }
    let source = json(&ok(train(
        root,
        "three",
        &["--epochs", "6", "--lr", "0.01"],
    )));
    let source_run = source["run_id"].as_str().unwrap().to_string();
    let source_head = head(&source);

    // Same classes, a learning rate too small to move the weights: the first
    // epoch scores what the source's kept head scored.
    let output = train(
        root,
        "three",
        &["--epochs", "1", "--lr", "1e-9", "--init-from", &source_run],
    );
    let message = stderr(&output);
    let warm = json(&ok(output));
    assert!(
        message.contains(&format!(
            "warm start from run {source_run}: loaded layer(s) 0, 1, 2"
        )),
        "{message}"
    );
    let best = source["best_epoch"].as_u64().unwrap() as usize;
    assert_eq!(
        warm["epochs"][0]["val/accuracy"],
        source["epochs"][best]["val/accuracy"]
    );
    let warm_head = head(&warm);
    for name in [
        "layers.0.weight",
        "layers.0.bias",
        "layers.1.weight",
        "layers.2.weight",
        "layers.2.bias",
    ] {
        let difference = max_difference(&warm_head[name], &source_head[name]);
        assert!(difference < 1e-6, "{name} moved by {difference}");
    }
    // Control: the same run without --init-from starts elsewhere.
    let cold = json(&ok(train(
        root,
        "three",
        &["--epochs", "1", "--lr", "1e-9"],
    )));
    let difference = max_difference(
        &head(&cold)["layers.1.weight"],
        &source_head["layers.1.weight"],
    );
    assert!(
        difference > 1e-2,
        "a cold start is {difference} from the source"
    );
    let recorded = params(root, &warm["run_id"]);
    assert_eq!(recorded["init_from"], source_run.as_str());
    assert_eq!(recorded["init_layers"], "0:loaded,1:loaded,2:loaded");

    // Two classes instead of three: hidden layers load, the output layer is
    // re-initialised, and the run says so.
    let output = train(
        root,
        "two",
        &["--epochs", "1", "--lr", "1e-9", "--init-from", &source_run],
    );
    let message = stderr(&output);
    let other = json(&ok(output));
    assert!(
        message.contains("loaded layer(s) 0, 1; re-initialised layer(s) 2")
            && message.contains("source classes class0,class1,class2, this run class0,class1"),
        "{message}"
    );
    let other_head = head(&other);
    assert!(
        max_difference(
            &other_head["layers.1.weight"],
            &source_head["layers.1.weight"]
        ) < 1e-6
    );
    assert!(max_difference(&other_head["layers.1.bias"], &source_head["layers.1.bias"]) < 1e-6);
    assert_eq!(other_head["layers.2.weight"].dims(), [2, 8]);
    assert_eq!(source_head["layers.2.weight"].dims(), [3, 8]);
    // The first layer carries the source's function over to this dataset's
    // standardisation: W' = W diag(std_new / std_source).
    let scale = (&other_head["input_std"] / &source_head["input_std"]).unwrap();
    let expected = source_head["layers.0.weight"]
        .broadcast_mul(&scale.unsqueeze(0).unwrap())
        .unwrap();
    let difference = max_difference(&other_head["layers.0.weight"], &expected);
    assert!(difference < 1e-5, "first layer differs by {difference}");
    let recorded = params(root, &other["run_id"]);
    assert_eq!(recorded["init_layers"], "0:loaded,1:loaded,2:reinitialised");

    // Features of another dimension, and a run that does not exist.
    let message = fails(train(
        root,
        "narrow",
        &["--epochs", "1", "--init-from", &source_run],
    ));
    assert!(
        message.contains("reads 8-dimensional features")
            && message.contains("dataset narrow have 4"),
        "{message}"
    );
    let message = fails(train(
        root,
        "two",
        &["--epochs", "1", "--init-from", "nope"],
    ));
    assert!(message.contains("run nope not found"), "{message}");
}

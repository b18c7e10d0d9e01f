//! Small refusals and quiet exits through the CLI (issue 19, item 10): a
//! closed stdout pipe ends every verb quietly; a single-class dataset,
//! negative momentum and dropout on a linear head are refused; a run id is
//! looked up in experiments.db, never taken as a path; a write error while
//! training names the file, once, and the run is recorded FAILED.

use crate::support;

use std::path::Path;
use std::process::Stdio;

use support::{Synthetic, fails, json, lazarus, ok, queue_command, synthetic_features};

fn setup(root: &Path, counts: &[usize]) {
    synthetic_features(
        root,
        &Synthetic {
            name: "toy",
            counts,
            dim: 8,
            separation: 3.0,
        },
    );
}

fn train(root: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec!["train", "--dataset", "toy", "--encoder", "toy-encoder"];
    args.extend_from_slice(extra);
    lazarus(root, &args)
}

#[test]
fn every_verb_exits_quietly_when_stdout_is_a_closed_pipe() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    setup(root, &[30, 30]);
    ok(train(root, &["--epochs", "1"]));
    ok(lazarus(root, &["enqueue", "--noop-jobs", "2"]));
    let verbs: [&[&str]; 10] = [
        &["dataset", "show", "toy", "--images"],
        &["dataset", "show", "toy"],
        &["dataset", "list"],
        &["status"],
        &["encoders", "list"],
        &["experiments", "list"],
        &["experiments", "best", "--metric", "test/accuracy"],
        &[
            "train",
            "--dataset",
            "toy",
            "--encoder",
            "toy-encoder",
            "--epochs",
            "1",
        ],
        &["run-worker", "--until-empty"],
        &["dataset", "show", "toy", "--images", "--json"],
    ];
    for args in verbs {
        // The reader is gone before the first byte is written: `| head -0`.
        let mut child = queue_command(root, None)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take());
        let output = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            output.status.success(),
            "{args:?} failed on a closed pipe: {:?}\n{stderr}",
            output.status
        );
        assert!(
            !stderr.contains("panicked") && !stderr.contains("Broken pipe"),
            "{args:?}: {stderr}"
        );
    }
}

#[test]
fn a_single_class_dataset_is_refused_for_classification() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    setup(root, &[40]);
    let message = fails(train(root, &["--epochs", "1"]));
    assert!(
        message.contains("one class in its training split (class0)"),
        "{message}"
    );
    assert!(message.contains("--task anomaly"), "{message}");
    let runs = json(&ok(lazarus(root, &["experiments", "list", "--json"])));
    assert_eq!(runs.as_array().unwrap().len(), 0, "no run was started");
}

#[test]
fn negative_momentum_and_dropout_on_a_linear_head_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    setup(root, &[20, 20]);
    let message = fails(train(
        root,
        &["--optimizer", "sgd", "--momentum=-0.5", "--epochs", "1"],
    ));
    assert!(
        message.contains("momentum -0.5 must be in [0, 1)"),
        "{message}"
    );
    let message = fails(train(root, &["--momentum", "1.5", "--optimizer", "sgd"]));
    assert!(message.contains("momentum 1.5"), "{message}");
    let message = fails(train(root, &["--head", "linear", "--dropout", "0.3"]));
    assert!(
        message.contains("--dropout applies to --head mlp"),
        "{message}"
    );
    ok(train(
        root,
        &[
            "--head",
            "mlp",
            "--hidden",
            "4",
            "--dropout",
            "0.3",
            "--epochs",
            "1",
        ],
    ));
}

#[test]
fn a_run_id_is_looked_up_in_the_database_never_taken_as_a_path() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    setup(&root, &[20, 20]);
    let run = json(&ok(train(&root, &["--epochs", "1", "--json"])));
    let run_id = run["run_id"].as_str().unwrap();
    let image = support::image_rows(&root, "toy")[0][2].clone();
    // A copy of the run's folder outside the experiments: reachable by a
    // relative path from experiments/runs, but not a run of this database.
    let elsewhere = dir.path().join("elsewhere/copy");
    std::fs::create_dir_all(&elsewhere).unwrap();
    for entry in std::fs::read_dir(root.join("experiments/runs").join(run_id)).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            std::fs::copy(&path, elsewhere.join(path.file_name().unwrap())).unwrap();
        }
    }
    ok(lazarus(&root, &["predict", "--run", run_id, &image]));
    for id in ["../../../elsewhere/copy", "nope"] {
        let message = fails(lazarus(&root, &["predict", "--run", id, &image]));
        assert!(
            message.contains(&format!("run {id} not found")),
            "{message}"
        );
        assert!(message.contains("experiments.db"), "{message}");
        let out = dir.path().join("bundle");
        let message = fails(lazarus(
            &root,
            &["export", id, "--out", out.to_str().unwrap()],
        ));
        assert!(
            message.contains(&format!("run {id} not found")),
            "{message}"
        );
        let message = fails(train(&root, &["--init-from", id, "--epochs", "1"]));
        assert!(
            message.contains(&format!("run {id} not found")),
            "{message}"
        );
    }
}

#[test]
fn a_write_error_while_training_names_the_file_once_and_fails_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    // Wide features: the head file (2 x 131072 weights plus the mean and
    // standard deviation, over 1 MiB) is by far the largest write.
    synthetic_features(
        root,
        &Synthetic {
            name: "toy",
            counts: &[20, 20],
            dim: 131_072,
            separation: 3.0,
        },
    );
    ok(lazarus(root, &["experiments", "list"]));
    // Files may not grow past 512 KiB (1,024 blocks of 512 bytes; 1 MiB where
    // the shell counts KiB), with SIGXFSZ ignored: a write past it fails
    // with EFBIG, as a write to a full disk fails with ENOSPC.
    let output = std::process::Command::new("sh")
        .arg("-c")
        .arg("trap '' XFSZ; ulimit -f 1024; exec \"$@\"")
        .arg("sh")
        .arg(env!("CARGO_BIN_EXE_lazarus"))
        .args(["--root", root.to_str().unwrap()])
        .args([
            "train",
            "--dataset",
            "toy",
            "--encoder",
            "toy-encoder",
            "--epochs",
            "2",
            "--checkpoint-every",
            "0",
        ])
        .env_remove("LAZARUS_QUEUE")
        .output()
        .unwrap();
    let message = fails(output);
    let line = message.lines().find(|l| l.starts_with("error:")).unwrap();
    assert!(line.contains("best.safetensors"), "names the file: {line}");
    assert_eq!(
        line.matches("File too large").count(),
        1,
        "says the cause once: {line}"
    );
    let runs = json(&ok(lazarus(root, &["experiments", "list", "--json"])));
    assert_eq!(runs[0]["status"], "FAILED", "{runs}");
}

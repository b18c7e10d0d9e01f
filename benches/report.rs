//! `lazarus experiments report` over 1,000 runs, and the MLflow export of
//! the same runs. Not a timed test: it prints figures (BENCHMARKS.md).
//! Run with `cargo bench --bench report`.
//!
//! The runs look like a sweep's: two experiments (600 and 400 runs) of a
//! 4-class head over head x lr x class weights x seeds, 20 epochs of 42
//! per-step metrics each (840 rows per run), 34 summary metrics, and the
//! files `train` writes (config, model card, metrics.json with the
//! confusion matrix, SVG and PNG plots, head weights, a checkpoint).
//!
//! Timed, each the median of 3 rounds as a user runs it (the release
//! binary, process start included):
//! 1. `experiments report --out DIR` (rounds 2 and 3 replace the previous report);
//! 2. `experiments list --json` (the cheapest verb reading the same runs: a floor);
//! 3. `experiments export --format mlflow` into a new store, and again into it (no change).
//!
//! With `MLFLOW_PYTHON` set to a Python that has `mlflow` (scripts/mlflow_check.sh
//! installs one under the cache), also times MLflow reading the exported runs
//! (`mlflow.search_runs` with every metric), the nearest peer.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use lazarus::experiments::{ExperimentsDb, ParamValue, RunStart, RunStatus};
use lazarus::layout::Layout;

const RUNS: usize = 1_000;
const EPOCHS: u64 = 20;
const CLASSES: [&str; 4] = ["functional", "mild", "moderate", "severe"];
const ROUNDS: usize = 3;

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// A deterministic number in [0, 1) from a key (splitmix64).
fn unit(key: u64) -> f64 {
    let mut z = key.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64
}

/// The per-split metric keys `train` logs for 4 classes.
fn split_metrics(split: &str, quality: f64, key: u64) -> Vec<(String, f64)> {
    let mut metrics = vec![
        (format!("{split}/loss"), 1.2 - quality + 0.05 * unit(key)),
        (format!("{split}/accuracy"), quality),
        (format!("{split}/balanced_accuracy"), quality - 0.03),
        (format!("{split}/macro_f1"), quality - 0.05),
    ];
    for (c, class) in CLASSES.iter().enumerate() {
        let jitter = 0.1 * unit(key + c as u64 + 1);
        for what in ["precision", "recall", "f1", "roc_auc"] {
            metrics.push((
                format!("{split}/{what}/{class}"),
                (quality - 0.1 + jitter).min(1.0),
            ));
        }
    }
    metrics
}

/// Files of a finished run, written once and copied into every run folder.
struct Files(Vec<(&'static str, Vec<u8>)>);

fn files() -> Files {
    let dir = tempfile::tempdir().expect("temp dir");
    let epochs: Vec<lazarus::experiments::plots::EpochPoint> = (1..=EPOCHS)
        .map(|epoch| lazarus::experiments::plots::EpochPoint {
            epoch,
            train_loss: Some(1.0 / epoch as f64),
            validation_loss: Some(1.1 / epoch as f64 + 0.1),
            validation_metric: Some(0.6 + 0.015 * epoch as f64),
        })
        .collect();
    lazarus::experiments::plots::learning_curves(
        dir.path(),
        &lazarus::experiments::plots::LearningCurves {
            metric_name: "val/accuracy",
            epochs: &epochs,
        },
    )
    .expect("plot");
    let names: Vec<String> = CLASSES.iter().map(|c| c.to_string()).collect();
    let matrix = vec![
        vec![120, 10, 3, 1],
        vec![12, 40, 6, 2],
        vec![4, 7, 30, 5],
        vec![1, 2, 6, 50],
    ];
    lazarus::experiments::plots::confusion_matrix(dir.path(), &names, &matrix).expect("plot");
    let read = |name: &str| std::fs::read(dir.path().join(name)).expect("plot file");
    let weights: Vec<u8> = (0..20_944u32).map(|i| (i * 2_654_435_761) as u8).collect();
    Files(vec![
        (
            "config.json",
            serde_json::to_vec_pretty(&serde_json::json!({
                "dataset": "elpv", "class_names": CLASSES, "config_hash": "x",
            }))
            .unwrap(),
        ),
        ("config.toml", b"head = \"linear\"\nepochs = 20\n".to_vec()),
        (
            "model_card.json",
            serde_json::to_vec_pretty(&serde_json::json!({
                "task": "image classification from frozen-encoder features",
                "classes": CLASSES,
                "split_sizes": {"train": 1836, "val": 394, "test": 394},
                "intended_use": "Classifying images like those of the training dataset.",
            }))
            .unwrap(),
        ),
        (
            "metrics.json",
            serde_json::to_vec_pretty(&serde_json::json!({ "test_confusion_matrix": matrix }))
                .unwrap(),
        ),
        ("plots/learning_curves.svg", read("learning_curves.svg")),
        ("plots/learning_curves.png", read("learning_curves.png")),
        ("plots/confusion_matrix.svg", read("confusion_matrix.svg")),
        ("plots/confusion_matrix.png", read("confusion_matrix.png")),
        ("head.safetensors", weights.clone()),
        ("checkpoints/epoch-0020.safetensors", weights),
        ("checkpoints/epoch-0020.json", b"{}".to_vec()),
    ])
}

fn populate(root: &Path) {
    let files = files();
    let db = ExperimentsDb::open(&Layout::new(root)).expect("database opens");
    for n in 0..RUNS {
        let (experiment, index) = if n < 600 {
            ("elpv-heads", n)
        } else {
            ("elpv-defective", n - 600)
        };
        let head = ["linear", "mlp"][index % 2];
        let lr = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2][(index / 2) % 5];
        let weights = ["none", "balanced"][(index / 10) % 2];
        let seed = index / 20;
        let run = db
            .start_run(RunStart {
                experiment: experiment.into(),
                dataset: "elpv".into(),
                encoder_fingerprint: "3f1c0f4a9b2d7e66".into(),
                config_hash: format!("config-{n}"),
                params: vec![
                    ("head".into(), ParamValue::from(head)),
                    ("lr".into(), ParamValue::Number(lr)),
                    ("class_weights".into(), ParamValue::from(weights)),
                    ("seed".into(), ParamValue::Number(seed as f64)),
                    ("epochs".into(), ParamValue::Number(EPOCHS as f64)),
                    ("batch_size".into(), ParamValue::Number(256.0)),
                    ("sweep".into(), ParamValue::from(experiment)),
                ],
                tags: vec![("task".into(), "classify".into())],
            })
            .expect("run starts");
        let skill = 0.55 + 0.2 * unit(n as u64) + if head == "mlp" { 0.05 } else { 0.0 };
        for epoch in 1..=EPOCHS {
            let quality = skill * (1.0 - (-(epoch as f64) / 5.0).exp());
            let mut metrics = split_metrics("train", quality + 0.05, n as u64 * 100 + epoch);
            metrics.extend(split_metrics("val", quality, n as u64 * 1000 + epoch));
            metrics.push(("train/learning_rate".into(), lr));
            metrics.push(("train/skipped_steps".into(), 0.0));
            run.log_metrics(epoch, &metrics).expect("metrics logged");
        }
        // Written as plain files: the benchmark times the report, not the setup's fsyncs.
        for (name, bytes) in &files.0 {
            let path = run.dir().join(name);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, bytes).unwrap();
        }
        let mut summary = split_metrics("test", skill - 0.02, n as u64 * 7);
        summary.extend(split_metrics("val", skill, n as u64 * 1000 + EPOCHS));
        summary.push(("best_epoch".into(), 17.0));
        summary.push(("epochs_run".into(), EPOCHS as f64));
        summary.push(("skipped_steps".into(), 0.0));
        summary.push(("peak_rss_bytes".into(), 4.3e8));
        run.finish(RunStatus::Finished, &summary)
            .expect("run finishes");
    }
}

/// Seconds the command took, process start included; panics on failure.
fn timed(root: &Path, args: &[&str]) -> f64 {
    let started = Instant::now();
    let output = Command::new(env!("CARGO_BIN_EXE_lazarus"))
        .arg("--root")
        .arg(root)
        .args(args)
        .output()
        .expect("lazarus runs");
    let seconds = started.elapsed().as_secs_f64();
    assert!(
        output.status.success(),
        "lazarus {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    seconds
}

fn rounds(mut run: impl FnMut(usize) -> f64) -> (f64, Vec<f64>) {
    let all: Vec<f64> = (0..ROUNDS).map(&mut run).collect();
    (median(all.clone()), all)
}

fn main() {
    let dir = tempfile::tempdir().expect("temp dir");
    let root = dir.path().join("root");
    let started = Instant::now();
    populate(&root);
    println!(
        "setup: {RUNS} runs, {} per-step metric rows, in {:.1} s",
        RUNS as u64 * EPOCHS * 42,
        started.elapsed().as_secs_f64()
    );
    let out = dir.path().join("report");
    let out_text = out.to_str().unwrap().to_string();
    let (report, report_rounds) =
        rounds(|_| timed(&root, &["experiments", "report", "--out", &out_text]));
    let pages = std::fs::read_dir(out.join("runs")).unwrap().count();
    let bytes: u64 = walk_bytes(&out);
    println!(
        "experiments report, {RUNS} runs: median {report:.2} s (rounds {}), {pages} run pages, {:.1} MB written",
        format_rounds(&report_rounds),
        bytes as f64 / 1e6
    );
    let (list, list_rounds) = rounds(|_| timed(&root, &["experiments", "list", "--json"]));
    println!(
        "experiments list --json (floor: reading the runs): median {list:.2} s (rounds {})",
        format_rounds(&list_rounds)
    );
    let export_into = |store: &Path| {
        let args = ["experiments", "export", "--format", "mlflow", "--out"];
        let mut args: Vec<&str> = args.to_vec();
        args.push(store.to_str().unwrap());
        timed(&root, &args)
    };
    let (export, export_rounds) =
        rounds(|round| export_into(&dir.path().join(format!("mlruns-{round}"))));
    let store = dir.path().join("mlruns-0");
    let (again, again_rounds) = rounds(|_| export_into(&store));
    println!(
        "experiments export --format mlflow, {RUNS} runs: new store median {export:.2} s (rounds {}); \
         again into it (nothing changed) median {again:.2} s (rounds {})",
        format_rounds(&export_rounds),
        format_rounds(&again_rounds)
    );
    if let Ok(python) = std::env::var("MLFLOW_PYTHON") {
        let script = "import sys, time, mlflow\n\
            mlflow.set_tracking_uri('file://' + sys.argv[1])\n\
            ids = [e.experiment_id for e in mlflow.search_experiments()]\n\
            start = time.time()\n\
            frame = mlflow.search_runs(experiment_ids=ids, max_results=50000)\n\
            print(len(frame), time.time() - start)\n";
        let (peer, peer_rounds) = rounds(|_| {
            let started = Instant::now();
            let output = Command::new(&python)
                .env("MLFLOW_ALLOW_FILE_STORE", "true")
                .args(["-c", script, store.to_str().unwrap()])
                .output()
                .expect("python runs");
            let seconds = started.elapsed().as_secs_f64();
            let text = String::from_utf8_lossy(&output.stdout);
            assert!(
                output.status.success() && text.starts_with(&format!("{RUNS} ")),
                "mlflow failed: {text} {}",
                String::from_utf8_lossy(&output.stderr)
            );
            seconds
        });
        println!(
            "peer: MLflow {RUNS} runs via mlflow.search_runs on the exported store (python start and import included): \
             median {peer:.2} s (rounds {}); report / peer = {:.2}",
            format_rounds(&peer_rounds),
            report / peer
        );
    }
}

fn format_rounds(values: &[f64]) -> String {
    values
        .iter()
        .map(|v| format!("{v:.2}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn walk_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| {
            let entry = entry.unwrap();
            let metadata = entry.metadata().unwrap();
            if metadata.is_dir() {
                walk_bytes(&entry.path())
            } else {
                metadata.len()
            }
        })
        .sum()
}

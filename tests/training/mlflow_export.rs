//! `lazarus experiments export --format mlflow` through the CLI: MLflow's
//! file-store layout (experiments, runs with times and status, params,
//! metrics with steps and timestamps, tags, artifacts), read back here from
//! the files; exporting again updates and never duplicates. The same store
//! read by MLflow itself: `bash scripts/mlflow_check.sh`.

use crate::support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use lazarus::experiments::mlflow::run_uuid;
use lazarus::experiments::{ExperimentsDb, ParamValue, RunStart, RunStatus};
use lazarus::layout::Layout;
use support::{fails, files_under, json, lazarus, ok};

/// Two experiments: three finished runs with per-epoch metrics, summary
/// metrics (one sharing a per-epoch key) and files, and one FAILED run.
fn populate(root: &Path) -> Vec<String> {
    let db = ExperimentsDb::open(&Layout::new(root)).unwrap();
    let mut ids = Vec::new();
    for (n, (head, lr)) in [("linear", 0.001), ("mlp", 0.01), ("mlp", 0.001)]
        .into_iter()
        .enumerate()
    {
        let run = db
            .start_run(RunStart {
                experiment: "heads".into(),
                dataset: "toy".into(),
                encoder_fingerprint: "fingerprint-1".into(),
                config_hash: format!("config-{n}"),
                params: vec![
                    ("head".into(), ParamValue::Text(head.into())),
                    ("lr".into(), ParamValue::Number(lr)),
                    ("seed".into(), ParamValue::Number(n as f64)),
                ],
                tags: vec![("task".into(), "classify".into())],
            })
            .unwrap();
        for epoch in 1..=3u64 {
            run.log_metrics(
                epoch,
                &[
                    ("train/loss", 1.0 / (epoch as f64 + n as f64)),
                    ("val/accuracy", 0.5 + 0.1 * epoch as f64 - 0.01 * n as f64),
                    ("val/recall/cat+dog", 0.25 * epoch as f64),
                ],
            )
            .unwrap();
        }
        run.write_artifact("model_card.json", b"{\"head\": 1}")
            .unwrap();
        run.write_artifact("plots/learning_curves.svg", b"<svg/>")
            .unwrap();
        run.write_artifact("checkpoints/epoch-0001.json", b"{}")
            .unwrap();
        ids.push(run.id().to_string());
        run.finish(
            RunStatus::Finished,
            &[
                ("test/accuracy", 0.8 + 0.05 * n as f64),
                ("val/accuracy", 0.7 - 0.01 * n as f64),
                ("best_epoch", 2.0),
            ],
        )
        .unwrap();
    }
    let failed = db
        .start_run(RunStart {
            experiment: "other runs".into(),
            dataset: "toy".into(),
            encoder_fingerprint: "fingerprint-1".into(),
            config_hash: "broken".into(),
            params: vec![("head".into(), ParamValue::Text("mlp".into()))],
            tags: vec![],
        })
        .unwrap();
    failed.log_metrics(1, &[("train/loss", 2.5)]).unwrap();
    ids.push(failed.id().to_string());
    failed
        .finish(RunStatus::Failed, &[] as &[(&str, f64)])
        .unwrap();
    ids
}

fn export(root: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "experiments",
        "export",
        "--format",
        "mlflow",
        "--out",
        out.to_str().unwrap(),
        "--json",
    ];
    args.extend_from_slice(extra);
    lazarus(root, &args)
}

/// `key: value` lines of a meta.yaml, quotes removed.
fn meta(path: &Path) -> BTreeMap<String, String> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .filter_map(|line| line.split_once(": "))
        .map(|(k, v)| (k.to_string(), v.trim_matches(['"', '\'']).to_string()))
        .collect()
}

#[test]
fn export_writes_mlflows_file_store_and_updates_it_in_place() {
    let temp = tempfile::tempdir().unwrap();
    let root = temp.path().join("root");
    let ids = populate(&root);
    let out = temp.path().join("mlruns");
    let summary = json(&ok(export(&root, &out, &[])));
    assert_eq!(summary["runs"], 4);
    assert_eq!(summary["experiments"].as_array().unwrap().len(), 2);
    assert_eq!(
        summary["renamed_keys"]["val/recall/cat+dog"],
        "val/recall/cat_dog"
    );
    let experiment_id = summary["experiments"][0]["experiment_id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(summary["experiments"][0]["name"], "heads");

    // MLflow's own default experiment and trash folder, as a new store has them.
    assert_eq!(meta(&out.join("0/meta.yaml"))["name"], "Default");
    assert!(out.join(".trash").is_dir());
    let experiment = meta(&out.join(&experiment_id).join("meta.yaml"));
    assert_eq!(experiment["name"], "heads");
    assert_eq!(experiment["experiment_id"], experiment_id);
    assert_eq!(experiment["lifecycle_stage"], "active");

    let detail = json(&ok(lazarus(
        &root,
        &["experiments", "show", &ids[1], "--json"],
    )));
    let uuid = run_uuid(&ids[1]);
    assert_eq!(summary["run_ids"][&ids[1]], uuid.as_str());
    let run_dir = out.join(&experiment_id).join(&uuid);
    let run = meta(&run_dir.join("meta.yaml"));
    assert_eq!(run["run_id"], uuid);
    assert_eq!(run["run_name"], ids[1]);
    assert_eq!(run["experiment_id"], experiment_id);
    assert_eq!(run["status"], "3", "FINISHED");
    assert_eq!(run["start_time"], detail["run"]["start_ms"].to_string());
    assert_eq!(run["end_time"], detail["run"]["end_ms"].to_string());
    assert!(
        run["artifact_uri"].starts_with("file:///") && run["artifact_uri"].ends_with("/artifacts")
    );

    // Params as lazarus prints them; tags.
    let read = |path: &str| std::fs::read_to_string(run_dir.join(path)).unwrap();
    assert_eq!(read("params/lr"), "0.01");
    assert_eq!(read("params/head"), "mlp");
    assert_eq!(read("tags/mlflow.runName"), ids[1]);
    assert_eq!(read("tags/task"), "classify");
    assert_eq!(read("tags/lazarus.config_hash"), "config-1");

    // Per-epoch metrics with their steps and times; summaries at step 0,
    // `summary/` where a per-epoch series has the key.
    let history = read("metrics/val/accuracy");
    let lines: Vec<Vec<&str>> = history.lines().map(|l| l.split(' ').collect()).collect();
    assert_eq!(lines.len(), 3);
    for (line, epoch) in lines.iter().zip(1..) {
        assert_eq!(line[2], epoch.to_string());
        let value: f64 = line[1].parse().unwrap();
        assert_eq!(value, 0.5 + 0.1 * epoch as f64 - 0.01);
        let time: i64 = line[0].parse().unwrap();
        assert!(time >= detail["run"]["start_ms"].as_i64().unwrap());
    }
    let end = detail["run"]["end_ms"].as_i64().unwrap();
    assert_eq!(
        read("metrics/summary/val/accuracy"),
        format!("{end} {} 0\n", 0.7 - 0.01 * 1.0)
    );
    assert_eq!(
        read("metrics/test/accuracy"),
        format!("{end} {} 0\n", 0.8 + 0.05 * 1.0)
    );
    assert_eq!(read("metrics/val/recall/cat_dog").lines().count(), 3);

    // Files as artifacts, checkpoints left out.
    assert_eq!(read("artifacts/model_card.json"), "{\"head\": 1}");
    assert!(
        run_dir
            .join("artifacts/plots/learning_curves.svg")
            .is_file()
    );
    assert!(!run_dir.join("artifacts/checkpoints").exists());
    for folder in ["metrics", "params", "artifacts", "tags"] {
        assert!(run_dir.join(folder).is_dir(), "{folder}");
    }
    // The failed run in its own experiment, status 4, no summary.
    let failed_experiment = summary["experiments"][1]["experiment_id"].as_str().unwrap();
    let failed = meta(
        &out.join(failed_experiment)
            .join(run_uuid(&ids[3]))
            .join("meta.yaml"),
    );
    assert_eq!(failed["status"], "4");
    assert_eq!(failed["run_name"], ids[3]);

    // Exporting again changes nothing and duplicates nothing.
    let before: Vec<(PathBuf, Vec<u8>)> = files_under(&out)
        .into_iter()
        .map(|p| {
            let bytes = std::fs::read(&p).unwrap();
            (p, bytes)
        })
        .collect();
    // A note added in MLflow's UI is a tag file lazarus did not write: it stays.
    let note = run_dir.join("tags/mlflow.note.content");
    std::fs::write(&note, "looks good").unwrap();
    let again = json(&ok(export(&root, &out, &[])));
    assert_eq!(again["files_written"], 0, "{again:#}");
    assert_eq!(again["artifacts_copied"], 0, "{again:#}");
    assert_eq!(again["experiments"], summary["experiments"]);
    let after: Vec<(PathBuf, Vec<u8>)> = files_under(&out)
        .into_iter()
        .filter(|p| p != &note)
        .map(|p| {
            let bytes = std::fs::read(&p).unwrap();
            (p, bytes)
        })
        .collect();
    assert_eq!(before, after);
    assert_eq!(std::fs::read_to_string(&note).unwrap(), "looks good");

    // A new run is added beside the others; one experiment selected.
    let db = ExperimentsDb::open(&Layout::new(&root)).unwrap();
    let new = db
        .start_run(RunStart {
            experiment: "heads".into(),
            dataset: "toy".into(),
            encoder_fingerprint: "fingerprint-1".into(),
            config_hash: "config-new".into(),
            params: vec![("head".into(), ParamValue::Text("linear".into()))],
            tags: vec![],
        })
        .unwrap();
    let new_id = new.id().to_string();
    new.finish(RunStatus::Finished, &[("test/accuracy", 0.9)])
        .unwrap();
    let third = json(&ok(export(&root, &out, &["--experiment", "heads"])));
    assert_eq!(third["runs"], 4);
    let runs_in_experiment = std::fs::read_dir(out.join(&experiment_id))
        .unwrap()
        .filter(|e| e.as_ref().unwrap().path().join("meta.yaml").is_file())
        .count();
    assert_eq!(runs_in_experiment, 4);
    assert!(
        out.join(&experiment_id)
            .join(run_uuid(&new_id))
            .join("meta.yaml")
            .is_file()
    );
    assert!(third["files_written"].as_u64().unwrap() > 0);

    // Unknown experiments and folders that are not stores are refused.
    let message = fails(export(&root, &out, &["--experiment", "nope"]));
    assert!(
        message.contains("unknown experiment `nope`; known experiments: heads, other runs"),
        "{message}"
    );
    let theirs = temp.path().join("documents");
    std::fs::create_dir_all(&theirs).unwrap();
    std::fs::write(theirs.join("letter.txt"), "hello").unwrap();
    let message = fails(export(&root, &theirs, &[]));
    assert!(message.contains("is not an MLflow file store"), "{message}");
    assert_eq!(std::fs::read_dir(&theirs).unwrap().count(), 1);
}

//! `lazarus experiments list | show | compare | best | ablate` against a
//! database populated through the library API.

use crate::support;

use std::path::Path;

use lazarus::experiments::{ExperimentsDb, ParamValue, RunStart, RunStatus};
use lazarus::layout::Layout;
use support::{fails, json, lazarus, ok};

/// 2 heads x 2 learning rates x 3 seeds, all FINISHED, plus one FAILED run.
/// val_accuracy = 0.80 (+0.05 for mlp) (+0.02 for lr 0.01) + 0.01 * seed;
/// val_loss = 1 - val_accuracy. Returns run ids in start order.
fn populate(root: &Path) -> Vec<String> {
    let db = ExperimentsDb::open(&Layout::new(root)).unwrap();
    let mut ids = Vec::new();
    for head in ["linear", "mlp"] {
        for lr in [0.001, 0.01] {
            for seed in 0..3 {
                let accuracy = 0.80
                    + if head == "mlp" { 0.05 } else { 0.0 }
                    + if lr == 0.01 { 0.02 } else { 0.0 }
                    + 0.01 * seed as f64;
                let run = db
                    .start_run(RunStart {
                        experiment: "heads".into(),
                        dataset: "toy".into(),
                        encoder_fingerprint: "fingerprint-abcdef123456".into(),
                        config_hash: format!("{head}-{lr}-{seed}"),
                        params: vec![
                            ("head".into(), ParamValue::Text(head.into())),
                            ("lr".into(), ParamValue::Number(lr)),
                            ("seed".into(), ParamValue::Number(seed as f64)),
                        ],
                        tags: vec![("sweep".into(), "grid".into())],
                    })
                    .unwrap();
                for epoch in 1..=2 {
                    run.log_metrics(epoch, &[("train_loss", 1.0 / epoch as f64)])
                        .unwrap();
                }
                run.write_artifact("metrics.json", b"{}").unwrap();
                ids.push(run.id().to_string());
                run.finish(
                    RunStatus::Finished,
                    &[("val_accuracy", accuracy), ("val_loss", 1.0 - accuracy)],
                )
                .unwrap();
            }
        }
    }
    let failed = db
        .start_run(RunStart {
            experiment: "other".into(),
            dataset: "toy".into(),
            encoder_fingerprint: "fp".into(),
            config_hash: "broken".into(),
            params: vec![("head".into(), ParamValue::Text("mlp".into()))],
            tags: vec![],
        })
        .unwrap();
    ids.push(failed.id().to_string());
    failed
        .finish(RunStatus::Failed, &[] as &[(&str, f64)])
        .unwrap();
    ids
}

fn csv_rows(text: &str) -> Vec<Vec<String>> {
    csv::Reader::from_reader(text.as_bytes())
        .records()
        .map(|r| r.unwrap().iter().map(str::to_string).collect())
        .collect()
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-9
}

#[test]
fn list_filters_and_prints_table_json_and_csv() {
    let dir = tempfile::tempdir().unwrap();
    let ids = populate(dir.path());

    let text = ok(lazarus(dir.path(), &["experiments", "list"]));
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[0].starts_with("run "), "{text}");
    assert!(
        lines[0].contains("experiment") && lines[0].contains("status"),
        "{text}"
    );
    assert_eq!(lines.len(), 2 + ids.len(), "{text}");
    assert!(lines[2].starts_with(&ids[0]), "{text}");
    assert!(
        text.contains("FAILED") && text.contains("fingerprint-"),
        "{text}"
    );

    let runs = json(&ok(lazarus(dir.path(), &["experiments", "list", "--json"])));
    assert_eq!(runs.as_array().unwrap().len(), 13);
    assert_eq!(runs[0]["id"], ids[0].as_str());
    assert_eq!(runs[0]["status"], "FINISHED");
    assert_eq!(runs[12]["experiment"], "other");

    let csv = ok(lazarus(
        dir.path(),
        &["experiments", "list", "--status", "failed", "--csv"],
    ));
    let rows = csv_rows(&csv);
    assert_eq!(rows.len(), 1, "{csv}");
    assert_eq!(rows[0][0], ids[12]);
    assert_eq!(rows[0][2], "FAILED");

    let heads = json(&ok(lazarus(
        dir.path(),
        &["experiments", "list", "--experiment", "heads", "--json"],
    )));
    assert_eq!(heads.as_array().unwrap().len(), 12);

    let err = fails(lazarus(
        dir.path(),
        &["experiments", "list", "--experiment", "nope"],
    ));
    assert!(
        err.contains("unknown experiment `nope`; known experiments: heads, other"),
        "{err}"
    );
    let err = fails(lazarus(
        dir.path(),
        &["experiments", "list", "--status", "paused"],
    ));
    assert!(
        err.contains("unknown run status `paused`; known: RUNNING, FINISHED, FAILED, KILLED"),
        "{err}"
    );
}

#[test]
fn without_a_database_list_is_empty_and_queries_say_why() {
    let dir = tempfile::tempdir().unwrap();
    let text = ok(lazarus(dir.path(), &["experiments", "list", "--json"]));
    assert_eq!(json(&text), serde_json::json!([]));
    let err = fails(lazarus(dir.path(), &["experiments", "show", "x"]));
    assert!(err.contains("experiments.db does not exist"), "{err}");
    // Reading does not create the database.
    assert!(!dir.path().join("experiments").exists());
}

#[test]
fn show_prints_params_metrics_tags_and_artifacts() {
    let dir = tempfile::tempdir().unwrap();
    let ids = populate(dir.path());
    let text = ok(lazarus(dir.path(), &["experiments", "show", &ids[4]]));
    for needle in [
        "experiment",
        "heads",
        "FINISHED",
        "lr",
        "0.01",
        "val_accuracy",
        "0.8300", // linear, lr 0.01, seed 1
        "train_loss (2 steps, last at 2)",
        "sweep",
        "metrics.json",
    ] {
        assert!(text.contains(needle), "{needle} missing from\n{text}");
    }
    let detail = json(&ok(lazarus(
        dir.path(),
        &["experiments", "show", &ids[4], "--json"],
    )));
    assert_eq!(detail["run"]["id"], ids[4].as_str());
    assert_eq!(detail["params"]["head"], "linear");
    assert_eq!(detail["params"]["lr"], 0.01);
    assert!(close(
        detail["summary"]["val_accuracy"].as_f64().unwrap(),
        0.83
    ));
    assert_eq!(detail["artifacts"][0]["path"], "metrics.json");
    assert_eq!(detail["tags"]["sweep"], "grid");

    let csv = ok(lazarus(
        dir.path(),
        &["experiments", "show", &ids[4], "--csv"],
    ));
    let rows = csv_rows(&csv);
    assert!(
        rows.contains(&vec!["param".into(), "lr".into(), "0.01".into()]),
        "{csv}"
    );

    let err = fails(lazarus(
        dir.path(),
        &["experiments", "show", "19990101-000000-000"],
    ));
    assert!(
        err.contains("no run `19990101-000000-000` (13 runs recorded"),
        "{err}"
    );
}

#[test]
fn compare_shows_differing_params_and_metrics_side_by_side() {
    let dir = tempfile::tempdir().unwrap();
    let ids = populate(dir.path());
    // Same head and lr, seeds 0 and 2.
    let comparison = json(&ok(lazarus(
        dir.path(),
        &["experiments", "compare", &ids[0], &ids[2], "--json"],
    )));
    let rows = comparison["rows"].as_array().unwrap();
    let params: Vec<&str> = rows
        .iter()
        .filter(|r| r["kind"] == "param")
        .map(|r| r["key"].as_str().unwrap())
        .collect();
    assert_eq!(params, ["seed"]);
    assert_eq!(comparison["same_params"]["head"], "linear");
    let accuracy = rows
        .iter()
        .find(|r| r["kind"] == "metric" && r["key"] == "val_accuracy")
        .unwrap();
    assert!(close(accuracy["values"][0].as_f64().unwrap(), 0.80));
    assert!(close(accuracy["values"][1].as_f64().unwrap(), 0.82));

    let text = ok(lazarus(
        dir.path(),
        &["experiments", "compare", &ids[0], &ids[2]],
    ));
    let header = text.lines().next().unwrap();
    assert!(
        header.contains(&ids[0]) && header.contains(&ids[2]),
        "{text}"
    );
    assert!(text.contains("0.8000") && text.contains("0.8200"), "{text}");

    let err = fails(lazarus(
        dir.path(),
        &["experiments", "compare", &ids[0], "nope"],
    ));
    assert!(err.contains("no run `nope`"), "{err}");
}

#[test]
fn best_ranks_by_metric_direction_and_filters() {
    let dir = tempfile::tempdir().unwrap();
    let ids = populate(dir.path());
    // Highest accuracy: mlp, lr 0.01, seed 2 (the 12th run).
    let best = json(&ok(lazarus(
        dir.path(),
        &["experiments", "best", "--metric", "val_accuracy", "--json"],
    )));
    assert_eq!(best["direction"], "higher_is_better");
    assert_eq!(best["runs"].as_array().unwrap().len(), 1);
    assert_eq!(best["runs"][0]["run"], ids[11].as_str());
    assert!(close(best["runs"][0]["value"].as_f64().unwrap(), 0.89));

    // A loss is minimised: the same run has the lowest val_loss.
    let best = json(&ok(lazarus(
        dir.path(),
        &[
            "experiments",
            "best",
            "--metric",
            "val_loss",
            "--top",
            "2",
            "--json",
        ],
    )));
    assert_eq!(best["direction"], "lower_is_better");
    assert_eq!(best["runs"][0]["run"], ids[11].as_str());
    assert_eq!(best["runs"].as_array().unwrap().len(), 2);

    // Numeric filters compare as numbers: 1e-3 is lr 0.001.
    let csv = ok(lazarus(
        dir.path(),
        &[
            "experiments",
            "best",
            "--metric",
            "val_accuracy",
            "--where",
            "head=linear",
            "--where",
            "lr=1e-3",
            "--csv",
        ],
    ));
    let rows = csv_rows(&csv);
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0][1], ids[2]);
    assert!(close(rows[0][3].parse().unwrap(), 0.82), "{csv}");
    assert!(rows[0][4].contains("lr=0.001"), "{csv}");

    let text = ok(lazarus(
        dir.path(),
        &["experiments", "best", "--metric", "val_accuracy"],
    ));
    assert!(text.lines().nth(2).unwrap().contains(&ids[11]), "{text}");

    let err = fails(lazarus(
        dir.path(),
        &["experiments", "best", "--metric", "accuracy"],
    ));
    assert!(
        err.contains("unknown metric `accuracy`; known metrics: val_accuracy, val_loss"),
        "{err}"
    );
    let err = fails(lazarus(
        dir.path(),
        &[
            "experiments",
            "best",
            "--metric",
            "val_loss",
            "--where",
            "depth=3",
        ],
    ));
    assert!(
        err.contains(
            "unknown parameter `depth`; known parameters: head, lr, seed, experiment (run field)"
        ),
        "{err}"
    );
    let err = fails(lazarus(
        dir.path(),
        &[
            "experiments",
            "best",
            "--metric",
            "val_loss",
            "--where",
            "head",
        ],
    ));
    assert!(err.contains("expected KEY=VALUE"), "{err}");
}

#[test]
fn ablate_gives_mean_std_over_seeds_and_diff_from_baseline() {
    let dir = tempfile::tempdir().unwrap();
    populate(dir.path());
    let report = json(&ok(lazarus(
        dir.path(),
        &[
            "experiments",
            "ablate",
            "--by",
            "head",
            "--metric",
            "val_accuracy",
            "--json",
        ],
    )));
    let rows = report["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0]["levels"][0], "linear");
    assert_eq!(rows[0]["n"], 6);
    // linear: 0.80 0.81 0.82 0.82 0.83 0.84 -> mean 0.82, sample std sqrt(0.001/5)
    // (numpy: np.std([.80,.81,.82,.82,.83,.84], ddof=1) = 0.0141421).
    assert!(close(rows[0]["mean"].as_f64().unwrap(), 0.82));
    assert!(close(
        rows[0]["std"].as_f64().unwrap(),
        (0.001f64 / 5.0).sqrt()
    ));
    assert!(close(rows[0]["diff"].as_f64().unwrap(), 0.0));
    assert!(close(rows[1]["mean"].as_f64().unwrap(), 0.87));
    assert!(close(rows[1]["diff"].as_f64().unwrap(), 0.05));
    assert_eq!(report["baseline"][0], "linear");

    // Two parameters, a filter, an explicit baseline; text table.
    let text = ok(lazarus(
        dir.path(),
        &[
            "experiments",
            "ablate",
            "--by",
            "head,lr",
            "--metric",
            "val_accuracy",
            "--where",
            "experiment=heads",
            "--baseline",
            "mlp,0.001",
        ],
    ));
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines[0].starts_with("head") && lines[0].contains("val_accuracy mean"),
        "{text}"
    );
    assert_eq!(lines.len(), 2 + 4, "{text}");
    // linear 0.001: mean 0.81, std 0.01; baseline mlp 0.001: 0.86 -> diff -0.05.
    assert!(
        lines[2].contains("linear") && lines[2].contains("0.001"),
        "{text}"
    );
    assert!(
        lines[2].contains("0.8100") && lines[2].contains("± 0.0100"),
        "{text}"
    );
    assert!(lines[2].trim_end().ends_with("-0.0500"), "{text}");
    assert!(
        lines[4].contains("mlp") && lines[4].trim_end().ends_with("baseline"),
        "{text}"
    );

    // CSV: one row per level, full precision; the filter keeps 3 seeds.
    let csv = ok(lazarus(
        dir.path(),
        &[
            "experiments",
            "ablate",
            "--by",
            "head",
            "--metric",
            "val_loss",
            "--where",
            "lr=0.01",
            "--csv",
        ],
    ));
    let mut reader = csv::Reader::from_reader(csv.as_bytes());
    let header: Vec<String> = reader
        .headers()
        .unwrap()
        .iter()
        .map(str::to_string)
        .collect();
    assert_eq!(
        header,
        ["head", "n", "val_loss mean", "std", "diff vs baseline"]
    );
    let rows = csv_rows(&csv);
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0][1], "3");
    assert!(close(rows[0][2].parse().unwrap(), 1.0 - 0.83));
    assert_eq!(rows[0][4], "baseline");
    assert!(close(rows[1][4].parse().unwrap(), -0.05));

    // A chart of the ablation, as SVG and PNG.
    let chart = dir.path().join("charts/heads");
    ok(lazarus(
        dir.path(),
        &[
            "experiments",
            "ablate",
            "--by",
            "head,lr",
            "--metric",
            "val_accuracy",
            "--chart",
            chart.to_str().unwrap(),
        ],
    ));
    let svg = std::fs::read_to_string(chart.with_extension("svg")).unwrap();
    assert!(svg.contains("head=mlp, lr=0.01"), "{svg}");
    let png = image::open(chart.with_extension("png")).unwrap();
    assert_eq!(png.width(), 1000);
}

#[test]
fn ablate_refuses_unknown_names_and_levels() {
    let dir = tempfile::tempdir().unwrap();
    populate(dir.path());
    let err = fails(lazarus(
        dir.path(),
        &[
            "experiments",
            "ablate",
            "--by",
            "optimizer",
            "--metric",
            "val_accuracy",
        ],
    ));
    assert!(
        err.contains("unknown parameter `optimizer`; known parameters: head, lr, seed"),
        "{err}"
    );
    let err = fails(lazarus(
        dir.path(),
        &["experiments", "ablate", "--by", "head", "--metric", "f1"],
    ));
    assert!(
        err.contains("unknown metric `f1`; known metrics: val_accuracy, val_loss"),
        "{err}"
    );
    let err = fails(lazarus(
        dir.path(),
        &[
            "experiments",
            "ablate",
            "--by",
            "head",
            "--metric",
            "val_accuracy",
            "--baseline",
            "resnet",
        ],
    ));
    assert!(
        err.contains("--baseline resnet is not a level of head; levels: linear; mlp"),
        "{err}"
    );
    let err = fails(lazarus(
        dir.path(),
        &[
            "experiments",
            "ablate",
            "--by",
            "head",
            "--metric",
            "val_accuracy",
            "--where",
            "head=resnet",
        ],
    ));
    assert!(
        err.contains("no finished run has metric `val_accuracy`"),
        "{err}"
    );
}

/// SQL in --by, --where and --metric is a name or a value to match, never SQL.
#[test]
fn sql_in_ablate_and_where_is_matched_literally() {
    let dir = tempfile::tempdir().unwrap();
    let ids = populate(dir.path());
    let err = fails(lazarus(
        dir.path(),
        &[
            "experiments",
            "ablate",
            "--by",
            "head; DROP TABLE runs; --",
            "--metric",
            "val_accuracy",
        ],
    ));
    assert!(
        err.contains("unknown parameter `head; DROP TABLE runs; --`"),
        "{err}"
    );
    for clause in ["head=linear' OR '1'='1", "head=mlp\" OR 1=1 --"] {
        let err = fails(lazarus(
            dir.path(),
            &[
                "experiments",
                "ablate",
                "--by",
                "head",
                "--metric",
                "val_accuracy",
                "--where",
                clause,
            ],
        ));
        assert!(
            err.contains("no finished run has metric `val_accuracy`"),
            "{clause}: {err}"
        );
        let err = fails(lazarus(
            dir.path(),
            &[
                "experiments",
                "best",
                "--metric",
                "val_accuracy",
                "--where",
                clause,
            ],
        ));
        assert!(err.contains("no finished run"), "{clause}: {err}");
    }
    let err = fails(lazarus(
        dir.path(),
        &["experiments", "best", "--metric", "val_accuracy' OR 1=1 --"],
    ));
    assert!(err.contains("unknown metric"), "{err}");
    // Nothing was dropped or changed.
    let listed = json(&ok(lazarus(dir.path(), &["experiments", "list", "--json"])));
    assert_eq!(listed.as_array().unwrap().len(), ids.len());
}

#[test]
fn a_database_from_a_newer_lazarus_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    populate(dir.path());
    let path = dir.path().join("experiments/experiments.db");
    let connection = rusqlite::Connection::open(&path).unwrap();
    connection
        .execute(
            "INSERT INTO schema_version (version, applied_ms) VALUES (3, 0)",
            [],
        )
        .unwrap();
    drop(connection);
    let err = fails(lazarus(dir.path(), &["experiments", "list"]));
    assert!(
        err.contains("has experiments schema version 3, newer than the 2 this lazarus knows"),
        "{err}"
    );
}
